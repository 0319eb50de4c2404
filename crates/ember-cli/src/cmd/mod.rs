//! One module per subcommand.

pub mod image;
pub mod uffd;
