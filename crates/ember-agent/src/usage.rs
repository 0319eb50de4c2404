//! What each running sandbox uses, sampled every few seconds: CPU and
//! memory from its cgroup, disk from its disk layer's allocated blocks,
//! network bytes from its slot's host link. A sandbox keeps its recent
//! samples (a ring of [`KEEP`]); the host keeps running totals for
//! Prometheus.
//!
//! Not here: the cgroups themselves (`ember-jail`), serving the figures
//! (the gRPC service and the control plane).

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ember_jail::cgroup::Cgroup;

/// Samples a sandbox keeps: 10 minutes at the default interval.
pub const KEEP: usize = 120;
/// How often the agent samples.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// One moment of a sandbox's use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub at_unix_ms: u64,
    /// Share of one host core over the last interval (100 = one core).
    pub cpu_percent: f64,
    /// CPU time since the VM started.
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    /// Bytes the disk layer holds on the host (what the sandbox wrote).
    pub disk_bytes: u64,
    /// Bytes into and out of the sandbox since its slot was set up.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// Processes and threads of its VMM and page server.
    pub pids: u64,
}

/// A sandbox's recent samples.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl History {
    pub fn push(&mut self, sample: Sample) {
        if self.samples.len() == KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().copied().collect()
    }

    pub fn last(&self) -> Option<&Sample> {
        self.samples.back()
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }
}

/// Take a sample of a sandbox from its cgroup, disk layer and host link;
/// `previous` gives the CPU share since the last one.
pub fn sample(
    cgroup: Option<&Cgroup>,
    disk: Option<&Path>,
    host_link: Option<&str>,
    previous: Option<&Sample>,
) -> Sample {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let usage = cgroup.map(Cgroup::usage).unwrap_or_default();
    let cpu_seconds = usage.cpu_usage.as_secs_f64();
    let cpu_percent = match previous {
        Some(p) if now > p.at_unix_ms && cpu_seconds >= p.cpu_seconds => {
            (cpu_seconds - p.cpu_seconds) / ((now - p.at_unix_ms) as f64 / 1000.0) * 100.0
        }
        _ => 0.0,
    };
    let disk_bytes = disk.and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    let stat = |name: &str| -> u64 {
        host_link
            .and_then(|l| {
                std::fs::read_to_string(format!("/sys/class/net/{l}/statistics/{name}")).ok()
            })
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    Sample {
        at_unix_ms: now,
        cpu_percent,
        cpu_seconds,
        memory_bytes: usage.memory_bytes,
        memory_limit_bytes: usage.memory_limit_bytes.unwrap_or(0),
        disk_bytes,
        // The host end of the veth receives what the sandbox sends.
        net_rx_bytes: stat("tx_bytes"),
        net_tx_bytes: stat("rx_bytes"),
        pids: usage.pids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_most_recent() {
        let mut h = History::default();
        for i in 0..(KEEP as u64 + 5) {
            h.push(Sample {
                at_unix_ms: i,
                ..Sample::default()
            });
        }
        let s = h.samples();
        assert_eq!(s.len(), KEEP);
        assert_eq!(s[0].at_unix_ms, 5);
        assert_eq!(h.last().unwrap().at_unix_ms, KEEP as u64 + 4);
    }

    #[test]
    fn cpu_share_is_the_time_used_over_the_time_passed() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        std::fs::write(&disk, vec![1u8; 8192]).unwrap();
        let first = sample(None, Some(&disk), None, None);
        assert_eq!(first.cpu_percent, 0.0);
        assert!(first.disk_bytes >= 8192, "{first:?}");
        let earlier = Sample {
            at_unix_ms: first.at_unix_ms - 2000,
            cpu_seconds: 0.0,
            ..first
        };
        // No cgroup: no CPU used, whatever the interval.
        assert_eq!(sample(None, None, None, Some(&earlier)).cpu_percent, 0.0);
    }
}
