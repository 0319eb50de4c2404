// Each test binary uses a part of the support code.
#![allow(dead_code)]

pub mod agent;
pub mod cli_server;
pub mod server;
