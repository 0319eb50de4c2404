pub mod agent;
// Only the client tests start servers.
#[allow(dead_code)]
pub mod server;
