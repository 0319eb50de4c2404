//! The `ember` binary's commands, as a library so end-to-end tests can
//! drive the same code (`cmd::run::LocalSandbox`). Nothing else depends on
//! this crate.

pub mod cmd;
