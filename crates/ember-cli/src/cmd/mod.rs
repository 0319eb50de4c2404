//! One module per subcommand.

pub mod image;
pub mod server;
pub mod uffd;
