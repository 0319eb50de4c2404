//! Prometheus metrics of the control plane: sandboxes by state, lifecycle
//! latency histograms (as the API sees them: host time plus API overhead),
//! host health, and the hosts' own counters (page faults served by their
//! page servers, lifecycle operations). Host series are labelled with the
//! host and its backend: only Firecracker hosts run page servers, so a QEMU
//! host's fault count is 0 by construction, and the label says why.
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
    /// `firecracker` or `qemu`; `unknown` until the host has answered.
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostOperationLabel {
    pub host: String,
    pub backend: String,
    pub operation: String,
}

/// What the control plane knows of one host at scrape time.
#[derive(Debug, Clone)]
pub struct HostReport {
    pub id: String,
    pub healthy: bool,
    /// Its last `HostInfo`, if it ever answered one.
    pub info: Option<ember_proto::host::HostInfoReply>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostUsageLabel {
    pub host: String,
    pub backend: String,
    /// `cpu_percent`, `memory_bytes`, `disk_bytes`, `net_rx_bytes`, `net_tx_bytes`.
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// `create`, `fork`, `resume` or `pause`.
    pub operation: String,
    /// `control.*` (the control plane's), `host` (the whole host call) or
    /// `host.*` (the host agent's phases inside it).
    pub phase: String,
}

/// All of the control plane's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sandboxes: Family<StateLabel, Gauge>,
    latency: Family<OperationLabel, Histogram>,
    phase_latency: Family<PhaseLabel, Histogram>,
    page_faults: Family<HostLabel, Gauge<u64, AtomicU64>>,
    pages_prefetched: Family<HostLabel, Gauge<u64, AtomicU64>>,
    page_server_bytes: Family<HostLabel, Gauge<u64, AtomicU64>>,
    host_operations: Family<HostOperationLabel, Gauge<u64, AtomicU64>>,
    host_up: Family<HostLabel, Gauge>,
    /// Sums over each host's running sandboxes (from their cgroups).
    sandbox_usage: Family<HostUsageLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    hosts_healthy: Gauge,
    hosts_total: Gauge,
    ingress_requests: Family<StatusLabel, prometheus_client::metrics::counter::Counter>,
    rate_limited: prometheus_client::metrics::counter::Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The HTTP status the ingress answered (the guest's, or Ember's own).
    pub status: String,
}

/// Phases are short: from 0.5 ms up.
fn phase_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
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
        let phase_latency = Family::<PhaseLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(phase_buckets())
        });
        registry.register(
            "sandbox_operation_phase_seconds",
            "Time of each phase of successful create, fork, resume and pause operations \
             (control-plane phases, the host call, and the host agent's phases inside it)",
            phase_latency.clone(),
        );
        let page_faults = Family::<HostLabel, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "host_page_faults_served",
            "Page faults served by the host's userfaultfd page servers since its agent started (Firecracker restores; always 0 on qemu hosts, which map snapshot memory directly)",
            page_faults.clone(),
        );
        let pages_prefetched = Family::<HostLabel, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "host_pages_prefetched",
            "Pages prefetched by the host's page servers since its agent started (always 0 on qemu hosts)",
            pages_prefetched.clone(),
        );
        let page_server_bytes = Family::<HostLabel, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "host_page_server_bytes_copied",
            "Bytes the host's page servers read from builds into guests since its agent started (always 0 on qemu hosts)",
            page_server_bytes.clone(),
        );
        let host_operations = Family::<HostOperationLabel, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "host_operations",
            "Lifecycle operations the host agent completed since it started, as it reports them",
            host_operations.clone(),
        );
        let host_up = Family::<HostLabel, Gauge>::default();
        registry.register(
            "host_up",
            "1 if the host answers its probes, 0 if it is unreachable",
            host_up.clone(),
        );
        let sandbox_usage =
            Family::<HostUsageLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "host_sandbox_usage",
            "What the host's running sandboxes use, summed over their latest samples \
             (cpu_percent of one core, memory/disk bytes, network bytes since each started)",
            sandbox_usage.clone(),
        );
        let hosts_healthy = Gauge::default();
        registry.register(
            "hosts_healthy",
            "Hosts answering their probes",
            hosts_healthy.clone(),
        );
        let hosts_total = Gauge::default();
        registry.register("hosts", "Hosts registered", hosts_total.clone());
        let ingress_requests =
            Family::<StatusLabel, prometheus_client::metrics::counter::Counter>::default();
        registry.register(
            "ingress_requests",
            "Requests to sandbox ports through the ingress proxy, by status",
            ingress_requests.clone(),
        );
        let rate_limited = prometheus_client::metrics::counter::Counter::default();
        registry.register(
            "api_rate_limited",
            "API requests refused 429 by the per-caller rate or concurrency limit",
            rate_limited.clone(),
        );
        Metrics {
            registry,
            sandboxes,
            latency,
            phase_latency,
            page_faults,
            pages_prefetched,
            page_server_bytes,
            host_operations,
            host_up,
            sandbox_usage,
            hosts_healthy,
            hosts_total,
            ingress_requests,
            rate_limited,
        }
    }

    /// Count one request refused by the per-caller limits.
    pub fn note_rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// Count one request through the ingress proxy.
    pub fn ingress_request(&self, status: &str) {
        self.ingress_requests
            .get_or_create(&StatusLabel {
                status: status.to_owned(),
            })
            .inc();
    }

    /// Record a successful lifecycle operation's latency ("create", "resume", "pause").
    pub fn observe(&self, operation: &str, seconds: f64) {
        self.latency
            .get_or_create(&OperationLabel {
                operation: operation.to_owned(),
            })
            .observe(seconds);
    }

    /// Record the phases of a successful lifecycle operation.
    pub fn observe_phases(&self, timing: &crate::model::OperationTiming) {
        for p in &timing.phases {
            self.phase_latency
                .get_or_create(&PhaseLabel {
                    operation: timing.operation.clone(),
                    phase: p.phase.clone(),
                })
                .observe(p.ms / 1e3);
        }
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

    /// Set host gauges from what the control plane knows of each host.
    pub fn set_hosts(&self, hosts: &[HostReport]) {
        self.hosts_total.set(hosts.len() as i64);
        self.hosts_healthy
            .set(hosts.iter().filter(|h| h.healthy).count() as i64);
        for h in hosts {
            let backend = h
                .info
                .as_ref()
                .map(|i| i.backend.clone())
                .filter(|b| !b.is_empty())
                .unwrap_or_else(|| "unknown".to_owned());
            let label = HostLabel {
                host: h.id.clone(),
                backend: backend.clone(),
            };
            if backend != "unknown" {
                // The placeholder series from before the host first answered.
                self.host_up.remove(&HostLabel {
                    host: h.id.clone(),
                    backend: "unknown".to_owned(),
                });
            }
            self.host_up.get_or_create(&label).set(i64::from(h.healthy));
            let Some(info) = &h.info else {
                continue;
            };
            let m = info.metrics.unwrap_or_default();
            self.page_faults
                .get_or_create(&label)
                .set(m.page_faults_served);
            self.pages_prefetched
                .get_or_create(&label)
                .set(m.pages_prefetched);
            self.page_server_bytes
                .get_or_create(&label)
                .set(m.page_server_bytes_copied);
            for (resource, v) in [
                ("cpu_percent", m.sandboxes_cpu_percent),
                ("memory_bytes", m.sandboxes_memory_bytes as f64),
                ("disk_bytes", m.sandboxes_disk_bytes as f64),
                ("net_rx_bytes", m.sandboxes_net_rx_bytes as f64),
                ("net_tx_bytes", m.sandboxes_net_tx_bytes as f64),
            ] {
                self.sandbox_usage
                    .get_or_create(&HostUsageLabel {
                        host: h.id.clone(),
                        backend: backend.clone(),
                        resource: resource.to_owned(),
                    })
                    .set(v);
            }
            for (operation, n) in [
                ("create", m.creates),
                ("pause", m.pauses),
                ("resume", m.resumes),
            ] {
                self.host_operations
                    .get_or_create(&HostOperationLabel {
                        host: h.id.clone(),
                        backend: backend.clone(),
                        operation: operation.to_owned(),
                    })
                    .set(n);
            }
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
            backend: "firecracker".into(),
            metrics: Some(ember_proto::host::HostMetrics {
                page_faults_served: 42,
                page_server_bytes_copied: 1 << 20,
                creates: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        m.set_hosts(&[
            HostReport {
                id: "host-a".into(),
                healthy: true,
                info: Some(info),
            },
            HostReport {
                id: "host-b".into(),
                healthy: false,
                info: None,
            },
        ]);
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
            text.contains(
                "ember_host_page_faults_served{host=\"host-a\",backend=\"firecracker\"} 42"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "ember_host_page_server_bytes_copied{host=\"host-a\",backend=\"firecracker\"} 1048576"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "ember_host_operations{host=\"host-a\",backend=\"firecracker\",operation=\"create\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("ember_host_up{host=\"host-b\",backend=\"unknown\"} 0"),
            "{text}"
        );
        assert!(text.contains("ember_hosts_healthy 1"), "{text}");
    }
}
