//! The client commands of `ember`: `sandbox`, `snapshot`, `host` and `key`,
//! and `ember run`'s server mode. They talk to an `ember server` over its
//! REST API v1 (the wire types are `ember_control::wire`, the same ones the
//! server serves) and own nothing on this machine except the terminal.
//!
//! Where the server is and which key to present come from flags, then
//! `EMBER_API_URL` / `EMBER_API_KEY`, then `~/.config/ember/config.toml`
//! ([`config`]). Output is a table or `key: value` lines for people and, with
//! `--json`, the server's JSON unchanged (a JSON array for listings).
//!
//! Exit codes are part of the interface; see [`exit`].

pub mod api;
pub mod config;
pub mod exec;
pub mod host;
pub mod key;
pub mod output;
pub mod ports;
pub mod run;
pub mod sandbox;
pub mod snapshot;
pub mod template;
pub mod terminal;

use std::process::ExitCode;

pub use api::{Api, ClientError};
pub use config::ClientArgs;

/// Exit codes of the client commands, documented in `ember --help` and the
/// README. Commands that run a command in a sandbox (`sandbox exec`, `run`)
/// exit with the command's own code instead, and report every Ember failure
/// as [`exit::EMBER_FAILED`], since any other number could be the command's.
pub mod exit {
    /// The request was rejected as invalid (also clap's code for bad usage).
    pub const INVALID: u8 = 2;
    /// No such sandbox, template, key or team.
    pub const NOT_FOUND: u8 = 3;
    /// No API key, or the key is wrong, revoked or not allowed to do this.
    pub const AUTH: u8 = 4;
    /// The sandbox's state does not allow it now, or the name is taken.
    pub const CONFLICT: u8 = 5;
    /// No host has room for the sandbox.
    pub const NO_CAPACITY: u8 = 6;
    /// The command was killed by its `--timeout`.
    pub const TIMED_OUT: u8 = 124;
    /// Anything else Ember failed at: server unreachable, 5xx, broken stream.
    pub const EMBER_FAILED: u8 = 125;
    /// Interrupted with Ctrl-C.
    pub const INTERRUPTED: u8 = 130;
}

/// The text `ember --help` ends with.
pub const EXIT_CODES_HELP: &str = "\
Client commands (sandbox, snapshot, host, key) talk to `ember server` at
EMBER_API_URL (default http://127.0.0.1:3000) with the key in EMBER_API_KEY,
or `api_url` / `api_key` in ~/.config/ember/config.toml; flags override both.

Exit codes:
  0    success
  2    invalid request or usage
  3    not found (sandbox, template, key, team)
  4    authentication: no key, a wrong or revoked key, not allowed
  5    conflict: the sandbox's state does not allow it, or the name is taken
  6    no capacity: no host has room
  125  any other Ember failure (server unreachable, server error)
`ember run` and `ember sandbox exec` exit with the command's own code
instead (128+N if signal N killed it, 124 if --timeout did, 130 on Ctrl-C)
and with 125 for every Ember failure.";

/// Print a failed command's error and turn it into its exit code.
pub fn report(command: &str, result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ember {command}: {}", describe(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The message for an error: an API error as the server phrased it, anything
/// else with its chain of causes.
pub fn describe(err: &anyhow::Error) -> String {
    match err.downcast_ref::<ClientError>() {
        Some(e @ ClientError::Api { .. }) => e.to_string(),
        _ => format!("{err:#}"),
    }
}

/// The exit code for an error of a client command (see [`exit`]).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|e| e.downcast_ref::<ClientError>())
        .map_or(exit::EMBER_FAILED, ClientError::exit_code)
}
