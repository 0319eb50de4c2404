//! Prometheus metrics of the control plane: sandboxes by state, lifecycle
//! latency histograms (as the API sees them: host time plus API overhead),
//! and the hosts' page-server counters.
//!
//! Gauges that mirror the database or the hosts are filled at scrape time, so
//! every replica reports the same truth and nothing drifts between scrapes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::model::SandboxState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabel {
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    pub operation: String,
}

/// All of the control plane's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sandboxes: Family<StateLabel, Gauge>,
    latency: Family<OperationLabel, Histogram>,
    page_faults: Family<HostLabel, Gauge<u64, AtomicU64>>,
    pages_prefetched: Family<HostLabel, Gauge<u64, AtomicU64>>,
    hosts_healthy: Gauge,
    hosts_total: Gauge,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ember");
        let sandboxes = Family::<StateLabel, Gauge>::default();
        registry.register("sandboxes", "Sandboxes by state", sandboxes.clone());
        let latency = Family::<OperationLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "sandbox_operation_seconds",
            "Latency of successful create, resume and pause requests as the API sees them",
            latency.clone(),
        );
        // Every operation's histogram exists from the start, so dashboards see zeros, not gaps.
        for op in ["create", "resume", "pause"] {
            let _ = latency.get_or_create(&OperationLabel {
                operation: op.to_owned(),
            });
        }
        let page_faults = Family::<HostLabel, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "host_page_faults_served",
            "Page faults served by the host's page servers since its agent started",
            page_faults.clone(),
        );
        let pages_prefetched = Family::<HostLabel, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "host_pages_prefetched",
            "Pages prefetched by the host's page servers since its agent started",
            pages_prefetched.clone(),
        );
        let hosts_healthy = Gauge::default();
        registry.register(
            "hosts_healthy",
            "Hosts answering their probes",
            hosts_healthy.clone(),
        );
        let hosts_total = Gauge::default();
        registry.register("hosts", "Hosts registered", hosts_total.clone());
        Metrics {
            registry,
            sandboxes,
            latency,
            page_faults,
            pages_prefetched,
            hosts_healthy,
            hosts_total,
        }
    }

    /// Record a successful lifecycle operation's latency ("create", "resume", "pause").
    pub fn observe(&self, operation: &str, seconds: f64) {
        self.latency
            .get_or_create(&OperationLabel {
                operation: operation.to_owned(),
            })
            .observe(seconds);
    }

    /// Set the state gauges from a count per state (every state is reported, zero included).
    pub fn set_sandbox_counts(&self, counts: &[(SandboxState, u64)]) {
        for state in SandboxState::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            self.sandboxes
                .get_or_create(&StateLabel {
                    state: state.as_str().to_owned(),
                })
                .set(n as i64);
        }
    }

    /// Set host gauges from the hosts' last `HostInfo` replies.
    pub fn set_hosts(
        &self,
        total: usize,
        healthy: usize,
        infos: &[(String, ember_proto::host::HostInfoReply)],
    ) {
        self.hosts_total.set(total as i64);
        self.hosts_healthy.set(healthy as i64);
        for (id, info) in infos {
            let label = HostLabel { host: id.clone() };
            let m = info.metrics.unwrap_or_default();
            self.page_faults
                .get_or_create(&label)
                .set(m.page_faults_served);
            self.pages_prefetched
                .get_or_create(&label)
                .set(m.pages_prefetched);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_state_and_the_histograms() {
        let m = Metrics::new();
        m.set_sandbox_counts(&[(SandboxState::Running, 3)]);
        m.observe("create", 0.2);
        let info = ember_proto::host::HostInfoReply {
            host_id: "host-a".into(),
            metrics: Some(ember_proto::host::HostMetrics {
                page_faults_served: 42,
                ..Default::default()
            }),
            ..Default::default()
        };
        m.set_hosts(1, 1, &[("host-a".into(), info)]);
        let text = m.encode();
        assert!(
            text.contains("ember_sandboxes{state=\"running\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("ember_sandboxes{state=\"paused\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("ember_sandbox_operation_seconds_count{operation=\"create\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ember_sandbox_operation_seconds_count{operation=\"resume\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("ember_host_page_faults_served{host=\"host-a\"} 42"),
            "{text}"
        );
    }
}
