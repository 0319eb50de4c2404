//! Timeouts: a running sandbox past its `expires_at` is killed or paused,
//! per its `on_timeout`. Two server-wide limits sit above what tenants set:
//! a maximum running time (counted from the last create or resume, so
//! activity that keeps pushing `expires_at` cannot keep a sandbox running
//! for ever; it too ends per `on_timeout`) and a retention for paused
//! sandboxes (past it they are destroyed, their builds freed).
//!
//! Expiry lives in the database (`timeout_s` → `expires_at`; exec, connect
//! and `POST /timeout` move it), so the sweep survives restarts and any
//! replica may run it: the kill or pause it starts is the same CAS the API
//! uses, so two replicas sweeping at once act once.

use std::sync::Arc;
use std::time::Duration;

use crate::model::{OnTimeout, Sandbox, SandboxState};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TtlAction {
    Kill { sandbox_id: String },
    Pause { sandbox_id: String },
}

/// Server-wide limits above tenants' timeouts (`None`: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// Longest a sandbox runs between a create or resume and its
    /// `on_timeout` action, whatever its timeout says.
    pub max_running_s: Option<u64>,
    /// Longest a sandbox stays paused before it is destroyed.
    pub paused_retention_s: Option<u64>,
    /// How long audit entries are kept (`None`: for ever).
    pub audit_retention_s: Option<u64>,
}

impl Default for Lifetime {
    /// 24 hours of running at a stretch; paused sandboxes kept until
    /// deleted (destroying a tenant's state is the operator's choice).
    fn default() -> Self {
        Lifetime {
            max_running_s: Some(DEFAULT_MAX_RUNNING_S),
            paused_retention_s: None,
            audit_retention_s: None,
        }
    }
}

/// The default [`Lifetime::max_running_s`].
pub const DEFAULT_MAX_RUNNING_S: u64 = 24 * 3600;

/// `now` minus `s` seconds, the cutoff for a limit of `s`.
pub fn cutoff(now: i64, s: u64) -> i64 {
    now.saturating_sub(i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000))
}

/// What a sandbox's `on_timeout` says to do with it.
pub fn action(s: &Sandbox) -> TtlAction {
    match s.on_timeout {
        OnTimeout::Kill => TtlAction::Kill {
            sandbox_id: s.id.clone(),
        },
        OnTimeout::Pause => TtlAction::Pause {
            sandbox_id: s.id.clone(),
        },
    }
}

/// The sandboxes among `rows` whose time is up at `now`, and what to do.
pub fn decide(rows: &[Sandbox], now: i64) -> Vec<TtlAction> {
    rows.iter()
        .filter(|s| s.state == SandboxState::Running)
        .filter(|s| s.expires_at.is_some_and(|e| e <= now))
        .map(action)
        .collect()
}

/// The new expiry when activity (exec, connect) touches a sandbox: its
/// timeout counted from now, never earlier than what it already has.
pub fn extended_expiry(current: Option<i64>, timeout_s: u64, now: i64) -> i64 {
    let timeout_ms = i64::try_from(timeout_s)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    let candidate = now.saturating_add(timeout_ms);
    current.map_or(candidate, |c| c.max(candidate))
}

/// Sweep every `interval` until `shutdown` fires.
pub async fn run(
    ops: Arc<crate::lifecycle::Operations>,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(err) = ops.sweep_expired().await {
            tracing::warn!(error = %err, "timeout sweep failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NetworkPolicy;

    fn sb(
        id: &str,
        state: SandboxState,
        expires_at: Option<i64>,
        on_timeout: OnTimeout,
    ) -> Sandbox {
        Sandbox {
            id: id.into(),
            team_id: "t".into(),
            state,
            host_id: Some("h".into()),
            template: "base".into(),
            source_build_id: None,
            build_id: None,
            vcpus: 1,
            memory_mib: 512,
            metadata: Default::default(),
            env: Default::default(),
            network: NetworkPolicy::default(),
            timeout_s: 60,
            on_timeout,
            expires_at,
            access_token_sha256: String::new(),
            failure_reason: None,
            created_at: 0,
            state_changed_at: 0,
            destroyed_at: None,
            last_operation: None,
            ingress: Default::default(),
        }
    }

    #[test]
    fn only_running_sandboxes_past_expiry_act_per_on_timeout() {
        let rows = [
            sb("kill", SandboxState::Running, Some(100), OnTimeout::Kill),
            sb("pause", SandboxState::Running, Some(100), OnTimeout::Pause),
            sb("exact", SandboxState::Running, Some(200), OnTimeout::Kill),
            sb("later", SandboxState::Running, Some(201), OnTimeout::Kill),
            sb("never", SandboxState::Running, None, OnTimeout::Kill),
            sb("paused", SandboxState::Paused, Some(1), OnTimeout::Kill),
            sb("busy", SandboxState::Pausing, Some(1), OnTimeout::Kill),
        ];
        assert_eq!(
            decide(&rows, 200),
            vec![
                TtlAction::Kill {
                    sandbox_id: "kill".into()
                },
                TtlAction::Pause {
                    sandbox_id: "pause".into()
                },
                TtlAction::Kill {
                    sandbox_id: "exact".into()
                },
            ]
        );
    }

    #[test]
    fn cutoffs_count_back_from_now_without_overflow() {
        assert_eq!(cutoff(100_000, 60), 40_000);
        assert_eq!(cutoff(0, u64::MAX), -i64::MAX);
        assert_eq!(Lifetime::default().max_running_s, Some(24 * 3600));
        assert_eq!(Lifetime::default().paused_retention_s, None);
        assert_eq!(Lifetime::default().audit_retention_s, None);
    }

    #[test]
    fn activity_extends_but_never_shortens() {
        assert_eq!(extended_expiry(None, 60, 1_000), 61_000);
        assert_eq!(extended_expiry(Some(10_000), 60, 1_000), 61_000);
        assert_eq!(extended_expiry(Some(900_000), 60, 1_000), 900_000);
        assert_eq!(extended_expiry(Some(0), u64::MAX, i64::MAX - 1), i64::MAX);
    }
}
