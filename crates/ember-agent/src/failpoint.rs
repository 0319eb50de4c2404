//! Failure injection for tests: named points in the agent's operations
//! where a test makes the agent fail on purpose, to prove that nothing a
//! failure can leave behind costs a user their sandbox.
//!
//! Only debug builds (what the test suite runs) read `EMBER_FAILPOINTS`;
//! in a release build every point compiles to nothing. The variable holds
//! `point=action` pairs separated by commas, where action is
//! - `error`: the operation returns an error at that point (what the
//!   caller sees is indistinguishable from a real failure there);
//! - `abort`: the agent process dies on the spot (a crash);
//! - `sleep-MS`: the operation stalls for MS milliseconds (a slow host).
//!
//! Points, each at the start (`.before`) and the end (`.after`: the work
//! is done and recorded, the reply not yet sent) of a host call:
//! `create`, `pause`, `resume`, `snapshot`, `destroy`. Inside the work:
//! - `pause.committed`: the pause's build is committed, the VM paused, the
//!   sandbox not yet recorded as paused (a restart finishes the pause);
//! - `snapshot.committed`: a template's build is committed, no template
//!   names it yet (a restart discards it; the VM goes on running).
//!
//! Processes other than the agent (the VMM, the page server, the control
//! plane) are killed by the tests themselves, from outside.

use crate::error::AgentError;

/// The environment variable that arms failure points (debug builds only).
pub const ENV: &str = "EMBER_FAILPOINTS";

#[cfg(debug_assertions)]
fn armed() -> &'static [(String, String)] {
    static ARMED: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.trim().split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
}

/// Pass point `name`: fail, crash or stall here if a test armed it.
#[cfg(debug_assertions)]
pub async fn hit(name: &str) -> Result<(), AgentError> {
    let Some((_, action)) = armed().iter().find(|(k, _)| k == name) else {
        return Ok(());
    };
    tracing::warn!(point = name, action = %action, "failure point hit");
    match action.as_str() {
        "error" => Err(AgentError::io(
            format!("failure injected at {name}"),
            std::io::Error::other(ENV),
        )),
        "abort" => std::process::abort(),
        other => {
            if let Some(ms) = other.strip_prefix("sleep-").and_then(|m| m.parse().ok()) {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            Ok(())
        }
    }
}

/// Release builds have no failure points.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub async fn hit(_name: &str) -> Result<(), AgentError> {
    Ok(())
}
