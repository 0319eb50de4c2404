//! Where a lifecycle operation's time goes: named phases, each run inside a
//! `phase` tracing span and timed, reported with the operation's result
//! (`SandboxRecord::last_operation_phases`, the gRPC `Sandbox.phases`).
//!
//! Phases that run concurrently overlap, so their sum may exceed the
//! operation's total; a phase that did not run is absent, not zero.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::Instrument;

/// One timed phase of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub micros: u64,
}

/// The phases of one operation, in the order they ended.
#[derive(Debug, Default)]
pub struct Phases {
    done: Mutex<Vec<Phase>>,
}

impl Phases {
    pub fn new() -> Phases {
        Phases::default()
    }

    /// Run `work` as phase `name`.
    pub async fn time<F: Future>(&self, name: &str, work: F) -> F::Output {
        let started = Instant::now();
        let out = work
            .instrument(tracing::info_span!("phase", phase = name))
            .await;
        self.record(name, started.elapsed());
        out
    }

    /// Record a phase timed elsewhere (e.g. inside the VMM). A phase that
    /// runs twice (a create that waits for its guest before and after
    /// making a warm base) counts once, with both times added.
    pub fn record(&self, name: &str, took: Duration) {
        tracing::debug!(phase = name, ms = took.as_secs_f64() * 1e3, "phase done");
        let micros = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let mut done = self.done.lock().expect("phases");
        match done.iter_mut().find(|p| p.name == name) {
            Some(p) => p.micros = p.micros.saturating_add(micros),
            None => done.push(Phase {
                name: name.to_owned(),
                micros,
            }),
        }
    }

    /// The phases so far, with `total` (the whole operation) last.
    pub fn finish(&self, total: Duration) -> Vec<Phase> {
        let mut done = std::mem::take(&mut *self.done.lock().expect("phases"));
        done.push(Phase {
            name: "total".to_owned(),
            micros: total.as_micros().min(u128::from(u64::MAX)) as u64,
        });
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_are_timed_in_the_order_they_end_and_total_is_last() {
        let phases = Phases::new();
        let started = Instant::now();
        let (a, b) = tokio::join!(
            phases.time("slow", async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                1
            }),
            phases.time("fast", async { 2 }),
        );
        assert_eq!((a, b), (1, 2));
        phases.record("vmm.spawn", Duration::from_micros(1500));
        let done = phases.finish(started.elapsed());
        let names: Vec<&str> = done.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["fast", "slow", "vmm.spawn", "total"]);
        assert!(done[1].micros >= 30_000, "{done:?}");
        assert_eq!(done[2].micros, 1500);
        assert!(done[3].micros >= done[1].micros);
        assert!(phases.finish(Duration::ZERO).len() == 1, "finish drains");
    }

    #[test]
    fn a_phase_run_twice_counts_once_with_both_times() {
        let phases = Phases::new();
        phases.record("guest.ready", Duration::from_micros(2000));
        phases.record("vmm.snapshot", Duration::from_micros(10));
        phases.record("guest.ready", Duration::from_micros(5));
        let done = phases.finish(Duration::from_micros(2100));
        let got: Vec<(&str, u64)> = done.iter().map(|p| (p.name.as_str(), p.micros)).collect();
        assert_eq!(
            got,
            [("guest.ready", 2005), ("vmm.snapshot", 10), ("total", 2100)]
        );
    }
}
