//! One module per subcommand.

pub mod agent;
pub mod client;
pub mod image;
pub mod run;
pub mod server;
pub mod uffd;
