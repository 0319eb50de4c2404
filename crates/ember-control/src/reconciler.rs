//! The reconciler: makes the database and the hosts agree.
//!
//! [`decide`] is the whole policy, a pure function from (the database's rows
//! for one host, what that host reports, now) to a list of [`Action`]s;
//! [`run`] is the loop that gathers those inputs every few seconds and applies
//! the actions. Every action is a compare-and-set in the store (or an
//! idempotent host call), so several control-plane replicas reconciling the
//! same host at once do no harm: the first CAS wins and the rest no-op.
//!
//! The loop reads the database *before* it lists the host, so a sandbox the
//! database calls running was running before the listing began: if the host
//! does not report it, it is really gone.
//!
//! Policy:
//! - running in the DB, absent on its host → failed, with a reason;
//! - present on a host, unknown or destroyed in the DB → destroyed on the host
//!   once older than the grace period;
//! - failed in the DB but still on the host → destroyed on the host after the grace period;
//! - paused sandboxes are expected absent and left alone;
//! - a transitional state older than `stuck_after` (its operation's owner died)
//!   is finished from what the host reports;
//! - an unreachable host is marked unhealthy and nothing on it is killed or
//!   changed; only once it has been unreachable for `host_lost` are its
//!   running sandboxes (and operations stuck on it) marked failed, with a
//!   reason saying so. Paused sandboxes stay paused: their builds are on the
//!   host's disk and resume there when it returns. If the host does return
//!   with those VMs still alive, they are failed rows with a VM left, and are
//!   destroyed after the grace period like any other;
//! - a host that answers but no longer has a VM (its agent restarted and
//!   found the VM dead, or the VM died) is not "unreachable": the sandbox is
//!   failed at once, with the host's own reason when it gives one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::model::{Sandbox, SandboxState};

/// A sandbox as its host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub id: String,
    pub state: SandboxState,
    pub build_id: Option<String>,
    pub failure_reason: Option<String>,
    /// When the host created it, if the host said.
    pub created_at: Option<i64>,
}

/// What a host answered to `ListSandboxes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostView {
    Listed(Vec<Observed>),
    /// The host did not answer; it has not answered for `for_ms` (as far
    /// as this replica has watched it).
    Unreachable {
        error: String,
        for_ms: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// How old an orphan (on the host, unknown to the DB) must be before it is destroyed.
    pub grace_ms: i64,
    /// How long an operation may sit in a transitional state, with no call
    /// in this process owning it, before the reconciler settles it from
    /// what the host reports. A host that still reports the operation in
    /// progress is always left to finish it, so this need not cover the
    /// longest operation, only the moment between a row's change and the
    /// host's receipt of the call.
    pub stuck_after_ms: i64,
    /// How long a host may be unreachable before its running sandboxes are
    /// marked failed. Until then an unreachable host changes nothing.
    pub host_lost_ms: i64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            grace_ms: 60_000,
            stuck_after_ms: 30_000,
            host_lost_ms: 300_000,
        }
    }
}

/// One correction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    MarkFailed {
        sandbox_id: String,
        from: SandboxState,
        reason: String,
    },
    MarkRunning {
        sandbox_id: String,
        from: SandboxState,
    },
    MarkPaused {
        sandbox_id: String,
        from: SandboxState,
        build_id: Option<String>,
    },
    MarkDestroyed {
        sandbox_id: String,
        from: SandboxState,
    },
    /// Destroy the VM on the host; then, if `mark_destroyed_from` is set,
    /// CAS the row from that state to destroyed.
    DestroyOnHost {
        sandbox_id: String,
        mark_destroyed_from: Option<SandboxState>,
        why: &'static str,
    },
    HostUnreachable {
        error: String,
    },
    HostReachable,
}

impl Action {
    /// The sandbox the action corrects, if it is about one.
    pub fn sandbox_id(&self) -> Option<&str> {
        match self {
            Action::MarkFailed { sandbox_id, .. }
            | Action::MarkRunning { sandbox_id, .. }
            | Action::MarkPaused { sandbox_id, .. }
            | Action::MarkDestroyed { sandbox_id, .. }
            | Action::DestroyOnHost { sandbox_id, .. } => Some(sandbox_id),
            Action::HostUnreachable { .. } | Action::HostReachable => None,
        }
    }
}

/// The policy. `db` holds the host's rows that are not destroyed, plus those
/// destroyed recently (so a VM that outlived its destroy is caught).
pub fn decide(host_id: &str, db: &[Sandbox], view: &HostView, now: i64, p: &Params) -> Vec<Action> {
    let observed = match view {
        HostView::Unreachable { error, for_ms } => {
            let mut actions = vec![Action::HostUnreachable {
                error: error.clone(),
            }];
            if *for_ms >= p.host_lost_ms {
                actions.extend(lost_host(host_id, db, *for_ms, now, p));
            }
            return actions;
        }
        HostView::Listed(list) => list,
    };
    let mut actions = vec![Action::HostReachable];
    let on_host: HashMap<&str, &Observed> = observed.iter().map(|o| (o.id.as_str(), o)).collect();
    let live_on_host = |id: &str| {
        on_host
            .get(id)
            .copied()
            .filter(|o| o.state != SandboxState::Destroyed)
    };
    for row in db {
        let obs = live_on_host(&row.id);
        let id = row.id.clone();
        let age = now - row.state_changed_at;
        let host_failed = obs.filter(|o| o.state == SandboxState::Failed).map(|o| {
            o.failure_reason
                .clone()
                .unwrap_or_else(|| "the host reports the sandbox failed".into())
        });
        match row.state {
            SandboxState::Running => match obs {
                None => actions.push(Action::MarkFailed {
                    sandbox_id: id,
                    from: row.state,
                    reason: format!("the sandbox disappeared from host {host_id}"),
                }),
                Some(_) if host_failed.is_some() => actions.push(Action::MarkFailed {
                    sandbox_id: id,
                    from: row.state,
                    reason: host_failed.unwrap_or_default(),
                }),
                // A pause the database missed (its call's owner settled the
                // row from a stale answer): the host's word wins.
                Some(o) if o.state == SandboxState::Paused => actions.push(Action::MarkPaused {
                    sandbox_id: id,
                    from: row.state,
                    build_id: o.build_id.clone().or_else(|| row.build_id.clone()),
                }),
                Some(_) => {}
            },
            SandboxState::Failed if obs.is_some() && age >= p.grace_ms => {
                actions.push(Action::DestroyOnHost {
                    sandbox_id: id,
                    mark_destroyed_from: None,
                    why: "failed in the database",
                });
            }
            SandboxState::Paused | SandboxState::Failed => {}
            SandboxState::Destroyed => {
                let since = row.destroyed_at.unwrap_or(row.state_changed_at);
                if obs.is_some() && now - since >= p.grace_ms {
                    actions.push(Action::DestroyOnHost {
                        sandbox_id: id,
                        mark_destroyed_from: None,
                        why: "destroyed in the database",
                    });
                }
            }
            transitional if transitional.is_transitional() && age >= p.stuck_after_ms => {
                if transitional == SandboxState::Destroying {
                    actions.push(match obs {
                        Some(_) => Action::DestroyOnHost {
                            sandbox_id: id,
                            mark_destroyed_from: Some(transitional),
                            why: "an interrupted destroy",
                        },
                        None => Action::MarkDestroyed {
                            sandbox_id: id,
                            from: transitional,
                        },
                    });
                    continue;
                }
                if let Some(reason) = host_failed {
                    actions.push(Action::MarkFailed {
                        sandbox_id: id,
                        from: transitional,
                        reason,
                    });
                    continue;
                }
                let obs_state = obs.map(|o| o.state);
                let action = match (transitional, obs_state) {
                    (_, Some(SandboxState::Running)) => Action::MarkRunning {
                        sandbox_id: id,
                        from: transitional,
                    },
                    (
                        SandboxState::Pausing | SandboxState::Resuming,
                        Some(SandboxState::Paused),
                    ) => Action::MarkPaused {
                        sandbox_id: id,
                        from: transitional,
                        build_id: obs
                            .and_then(|o| o.build_id.clone())
                            .or_else(|| row.build_id.clone()),
                    },
                    // The resume never happened; the paused build is still there.
                    (SandboxState::Resuming, None) => Action::MarkPaused {
                        sandbox_id: id,
                        from: transitional,
                        build_id: row.build_id.clone(),
                    },
                    // Still busy on the host (e.g. a slow create): give it time.
                    (_, Some(_)) => continue,
                    (_, None) => Action::MarkFailed {
                        sandbox_id: id,
                        from: transitional,
                        reason: format!(
                            "{} was interrupted and host {host_id} has no sandbox left",
                            verb(transitional)
                        ),
                    },
                };
                actions.push(action);
            }
            _ => {}
        }
    }
    let known: HashMap<&str, &Sandbox> = db.iter().map(|s| (s.id.as_str(), s)).collect();
    for obs in observed {
        if obs.state == SandboxState::Destroyed || known.contains_key(obs.id.as_str()) {
            continue;
        }
        // Unknown to the database. Only old ones: a young one may belong to a
        // create whose row this pass read too early.
        if obs.created_at.is_some_and(|c| now - c >= p.grace_ms) {
            actions.push(Action::DestroyOnHost {
                sandbox_id: obs.id.clone(),
                mark_destroyed_from: None,
                why: "unknown to the database",
            });
        }
    }
    actions
}

/// A host gone for longer than `host_lost`: its running sandboxes, and
/// operations stuck on it, are failed. Paused sandboxes and destroys are left
/// for when it returns.
fn lost_host(host_id: &str, db: &[Sandbox], for_ms: i64, now: i64, p: &Params) -> Vec<Action> {
    let reason = format!("host {host_id} unreachable for {} s", for_ms / 1000);
    db.iter()
        .filter(|row| match row.state {
            SandboxState::Running => true,
            SandboxState::Destroying => false,
            st => st.is_transitional() && now - row.state_changed_at >= p.stuck_after_ms,
        })
        .map(|row| Action::MarkFailed {
            sandbox_id: row.id.clone(),
            from: row.state,
            reason: reason.clone(),
        })
        .collect()
}

fn verb(state: SandboxState) -> &'static str {
    match state {
        SandboxState::Creating => "the create",
        SandboxState::Pausing => "the pause",
        SandboxState::Resuming => "the resume",
        SandboxState::Snapshotting => "the snapshot",
        SandboxState::Destroying => "the destroy",
        _ => "an operation",
    }
}

/// Reconcile every host every `interval` until `shutdown` fires.
pub async fn run(
    ops: Arc<crate::lifecycle::Operations>,
    interval: Duration,
    params: Params,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(err) = ops.reconcile_all(&params).await {
            tracing::warn!(error = %err, "reconcile pass failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NetworkPolicy, OnTimeout};

    const NOW: i64 = 1_000_000_000;
    const P: Params = Params {
        grace_ms: 60_000,
        stuck_after_ms: 300_000,
        host_lost_ms: 120_000,
    };

    fn row(id: &str, state: SandboxState, changed_ago: i64) -> Sandbox {
        Sandbox {
            id: id.into(),
            team_id: "team-a".into(),
            state,
            host_id: Some("h1".into()),
            template: "base".into(),
            source_build_id: None,
            build_id: None,
            vcpus: 1,
            memory_mib: 512,
            metadata: Default::default(),
            env: Default::default(),
            network: NetworkPolicy::default(),
            timeout_s: 60,
            on_timeout: OnTimeout::Kill,
            expires_at: None,
            access_token_sha256: String::new(),
            failure_reason: None,
            created_at: NOW - changed_ago,
            state_changed_at: NOW - changed_ago,
            destroyed_at: (state == SandboxState::Destroyed).then_some(NOW - changed_ago),
            last_operation: None,
            ingress: Default::default(),
        }
    }

    fn obs(id: &str, state: SandboxState, created_ago: i64) -> Observed {
        Observed {
            id: id.into(),
            state,
            build_id: None,
            failure_reason: None,
            created_at: Some(NOW - created_ago),
        }
    }

    fn listed(o: Vec<Observed>) -> HostView {
        HostView::Listed(o)
    }

    fn sandbox_actions(a: Vec<Action>) -> Vec<Action> {
        a.into_iter()
            .filter(|a| !matches!(a, Action::HostReachable))
            .collect()
    }

    #[test]
    fn agreement_needs_no_action() {
        let db = [
            row("a", SandboxState::Running, 10),
            row("p", SandboxState::Paused, 10),
        ];
        let a = decide(
            "h1",
            &db,
            &listed(vec![obs("a", SandboxState::Running, 10)]),
            NOW,
            &P,
        );
        assert_eq!(a, vec![Action::HostReachable]);
    }

    #[test]
    fn running_but_absent_fails_with_a_reason() {
        let db = [row("a", SandboxState::Running, 10)];
        let a = sandbox_actions(decide("h1", &db, &listed(vec![]), NOW, &P));
        assert_eq!(a.len(), 1);
        match &a[0] {
            Action::MarkFailed {
                sandbox_id,
                from,
                reason,
            } => {
                assert_eq!(sandbox_id, "a");
                assert_eq!(*from, SandboxState::Running);
                assert!(reason.contains("h1"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn running_but_failed_on_host_takes_the_hosts_reason() {
        let db = [row("a", SandboxState::Running, 10)];
        let mut o = obs("a", SandboxState::Failed, 10);
        o.failure_reason = Some("VMM exited with signal 9".into());
        let a = sandbox_actions(decide("h1", &db, &listed(vec![o]), NOW, &P));
        assert_eq!(
            a,
            vec![Action::MarkFailed {
                sandbox_id: "a".into(),
                from: SandboxState::Running,
                reason: "VMM exited with signal 9".into()
            }]
        );
    }

    #[test]
    fn running_but_paused_on_host_takes_the_hosts_build() {
        let db = [row("a", SandboxState::Running, 10)];
        let mut o = obs("a", SandboxState::Paused, 10);
        o.build_id = Some("b-host".into());
        let a = sandbox_actions(decide("h1", &db, &listed(vec![o]), NOW, &P));
        assert_eq!(
            a,
            vec![Action::MarkPaused {
                sandbox_id: "a".into(),
                from: SandboxState::Running,
                build_id: Some("b-host".into())
            }]
        );
    }

    #[test]
    fn paused_sandboxes_are_expected_absent() {
        let db = [row("p", SandboxState::Paused, 1_000_000)];
        assert!(sandbox_actions(decide("h1", &db, &listed(vec![]), NOW, &P)).is_empty());
    }

    #[test]
    fn an_unreachable_host_kills_nothing() {
        let db = [
            row("a", SandboxState::Running, 1_000_000),
            row("f", SandboxState::Creating, 1_000_000),
        ];
        let a = decide(
            "h1",
            &db,
            &HostView::Unreachable {
                error: "refused".into(),
                for_ms: P.host_lost_ms - 1,
            },
            NOW,
            &P,
        );
        assert_eq!(
            a,
            vec![Action::HostUnreachable {
                error: "refused".into()
            }]
        );
    }

    #[test]
    fn a_host_lost_for_long_fails_its_running_sandboxes_only() {
        let db = [
            row("run", SandboxState::Running, 10),
            row("paused", SandboxState::Paused, 1_000_000),
            row("failed", SandboxState::Failed, 1_000_000),
            row("fresh", SandboxState::Pausing, 1_000),
            row("stuck", SandboxState::Creating, P.stuck_after_ms),
            row("dying", SandboxState::Destroying, 1_000_000),
        ];
        let view = HostView::Unreachable {
            error: "refused".into(),
            for_ms: P.host_lost_ms + 5_000,
        };
        let a = sandbox_actions(decide("h1", &db, &view, NOW, &P));
        let reason = "host h1 unreachable for 125 s".to_owned();
        assert_eq!(
            a,
            vec![
                Action::HostUnreachable {
                    error: "refused".into()
                },
                Action::MarkFailed {
                    sandbox_id: "run".into(),
                    from: SandboxState::Running,
                    reason: reason.clone()
                },
                Action::MarkFailed {
                    sandbox_id: "stuck".into(),
                    from: SandboxState::Creating,
                    reason
                },
            ]
        );
    }

    #[test]
    fn a_lost_host_that_returns_has_its_leftover_vms_destroyed_after_grace() {
        // Failed while the host was away; the host comes back with the VM.
        let db = [row("run", SandboxState::Failed, P.grace_ms)];
        let view = listed(vec![obs("run", SandboxState::Running, 1_000_000)]);
        assert!(matches!(
            sandbox_actions(decide("h1", &db, &view, NOW, &P)).as_slice(),
            [Action::DestroyOnHost { sandbox_id, mark_destroyed_from: None, .. }] if sandbox_id == "run"
        ));
    }

    #[test]
    fn orphans_are_destroyed_only_after_the_grace_period() {
        let view = listed(vec![
            obs("old", SandboxState::Running, 120_000),
            obs("young", SandboxState::Running, 5_000),
            obs("gone", SandboxState::Destroyed, 999_000),
        ]);
        let a = sandbox_actions(decide("h1", &[], &view, NOW, &P));
        assert_eq!(
            a,
            vec![Action::DestroyOnHost {
                sandbox_id: "old".into(),
                mark_destroyed_from: None,
                why: "unknown to the database"
            }]
        );
    }

    #[test]
    fn an_orphan_without_a_creation_time_is_left_alone() {
        let mut o = obs("x", SandboxState::Running, 0);
        o.created_at = None;
        assert!(sandbox_actions(decide("h1", &[], &listed(vec![o]), NOW, &P)).is_empty());
    }

    #[test]
    fn destroyed_in_db_but_alive_on_host_is_destroyed_after_grace() {
        let view = listed(vec![obs("d", SandboxState::Running, 999_000)]);
        let recent = [row("d", SandboxState::Destroyed, 1_000)];
        assert!(sandbox_actions(decide("h1", &recent, &view, NOW, &P)).is_empty());
        let old = [row("d", SandboxState::Destroyed, 90_000)];
        assert!(matches!(
            sandbox_actions(decide("h1", &old, &view, NOW, &P)).as_slice(),
            [Action::DestroyOnHost {
                mark_destroyed_from: None,
                ..
            }]
        ));
    }

    #[test]
    fn failed_rows_with_a_vm_left_are_cleaned_after_grace() {
        let view = listed(vec![obs("f", SandboxState::Running, 999_000)]);
        assert!(
            sandbox_actions(decide(
                "h1",
                &[row("f", SandboxState::Failed, 5_000)],
                &view,
                NOW,
                &P
            ))
            .is_empty()
        );
        let a = sandbox_actions(decide(
            "h1",
            &[row("f", SandboxState::Failed, 70_000)],
            &view,
            NOW,
            &P,
        ));
        assert!(
            matches!(a.as_slice(), [Action::DestroyOnHost { sandbox_id, .. }] if sandbox_id == "f")
        );
        // Failed and gone: nothing to do, however old the failure.
        assert!(
            sandbox_actions(decide(
                "h1",
                &[row("f", SandboxState::Failed, 10 * P.stuck_after_ms)],
                &listed(vec![]),
                NOW,
                &P
            ))
            .is_empty()
        );
        assert!(
            sandbox_actions(decide(
                "h1",
                &[row("f", SandboxState::Failed, 70_000)],
                &listed(vec![]),
                NOW,
                &P
            ))
            .is_empty()
        );
    }

    #[test]
    fn fresh_transitions_are_left_to_their_owner() {
        for st in SandboxState::TRANSITIONAL {
            let db = [row("t", st, 1_000)];
            assert!(
                sandbox_actions(decide("h1", &db, &listed(vec![]), NOW, &P)).is_empty(),
                "{st}"
            );
        }
    }

    #[test]
    fn stuck_transitions_are_finished_from_what_the_host_reports() {
        let stuck = P.stuck_after_ms + 1;
        let run = |st, o: Vec<Observed>| {
            sandbox_actions(decide("h1", &[row("t", st, stuck)], &listed(o), NOW, &P))
        };
        let running = || vec![obs("t", SandboxState::Running, 1)];

        assert_eq!(
            run(SandboxState::Creating, running()),
            vec![Action::MarkRunning {
                sandbox_id: "t".into(),
                from: SandboxState::Creating
            }]
        );
        assert!(
            matches!(run(SandboxState::Creating, vec![]).as_slice(), [Action::MarkFailed { from: SandboxState::Creating, reason, .. }] if reason.contains("create"))
        );
        assert_eq!(
            run(SandboxState::Snapshotting, running()),
            vec![Action::MarkRunning {
                sandbox_id: "t".into(),
                from: SandboxState::Snapshotting
            }]
        );
        assert_eq!(
            run(SandboxState::Pausing, running()),
            vec![Action::MarkRunning {
                sandbox_id: "t".into(),
                from: SandboxState::Pausing
            }]
        );

        let mut paused = obs("t", SandboxState::Paused, 1);
        paused.build_id = Some("b9".into());
        assert_eq!(
            run(SandboxState::Pausing, vec![paused.clone()]),
            vec![Action::MarkPaused {
                sandbox_id: "t".into(),
                from: SandboxState::Pausing,
                build_id: Some("b9".into())
            }]
        );
        assert!(matches!(
            run(SandboxState::Pausing, vec![]).as_slice(),
            [Action::MarkFailed { .. }]
        ));
        assert_eq!(
            run(SandboxState::Resuming, running()),
            vec![Action::MarkRunning {
                sandbox_id: "t".into(),
                from: SandboxState::Resuming
            }]
        );
        assert!(matches!(
            run(SandboxState::Resuming, vec![]).as_slice(),
            [Action::MarkPaused {
                from: SandboxState::Resuming,
                ..
            }]
        ));

        assert_eq!(
            run(SandboxState::Destroying, vec![]),
            vec![Action::MarkDestroyed {
                sandbox_id: "t".into(),
                from: SandboxState::Destroying
            }]
        );
        assert!(matches!(
            run(SandboxState::Destroying, running()).as_slice(),
            [Action::DestroyOnHost {
                mark_destroyed_from: Some(SandboxState::Destroying),
                ..
            }]
        ));
        // A slow create still in progress on the host is given time.
        assert!(
            run(
                SandboxState::Creating,
                vec![obs("t", SandboxState::Creating, 1)]
            )
            .is_empty()
        );
    }

    #[test]
    fn a_stuck_transition_the_host_failed_takes_the_hosts_reason() {
        let mut o = obs("t", SandboxState::Failed, 1);
        o.failure_reason = Some("out of memory".into());
        let a = sandbox_actions(decide(
            "h1",
            &[row("t", SandboxState::Creating, 400_000)],
            &listed(vec![o]),
            NOW,
            &P,
        ));
        assert_eq!(
            a,
            vec![Action::MarkFailed {
                sandbox_id: "t".into(),
                from: SandboxState::Creating,
                reason: "out of memory".into()
            }]
        );
    }
}
