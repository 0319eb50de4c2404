//! Integration tests of `ember-guest` as a real process on the host,
//! driven through `GuestClient` over real HTTP. No VM is involved: the
//! agent runs with `--no-system-setup`.

mod auth;
mod common;
mod exec;
mod files;
mod pid1;
