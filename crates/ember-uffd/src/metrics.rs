//! Counters the page server keeps while it runs, and the serialisable
//! snapshot of them that it logs at exit, writes to the metrics file and
//! returns over the control socket.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Fault latency buckets: bucket `i` counts faults served in
/// `[2^(i-1), 2^i)` microseconds (bucket 0: under 1 µs); the last bucket is
/// open-ended.
pub const LATENCY_BUCKETS: usize = 24;

#[derive(Debug, Default)]
pub struct Metrics {
    pub faults: AtomicU64,
    pub faults_already_claimed: AtomicU64,
    pub pages_copied: AtomicU64,
    pub pages_zeroed: AtomicU64,
    pub pages_prefetched: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub eexist: AtomicU64,
    pub eagain: AtomicU64,
    pub remove_events: AtomicU64,
    pub bytes_removed: AtomicU64,
    pub write_protect_faults: AtomicU64,
    pub source_retries: AtomicU64,
    pub stale_after_remove: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    latency_sum_ns: AtomicU64,
    latency_max_ns: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn record_latency(&self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        let us = ns / 1000;
        let bucket = ((u64::BITS - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_ns.fetch_add(ns, Relaxed);
        self.latency_max_ns.fetch_max(ns, Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let histogram: Vec<u64> = self.latency.iter().map(|b| b.load(Relaxed)).collect();
        let served: u64 = histogram.iter().sum();
        MetricsSnapshot {
            faults: self.faults.load(Relaxed),
            faults_already_claimed: self.faults_already_claimed.load(Relaxed),
            pages_copied: self.pages_copied.load(Relaxed),
            pages_zeroed: self.pages_zeroed.load(Relaxed),
            pages_prefetched: self.pages_prefetched.load(Relaxed),
            bytes_copied: self.bytes_copied.load(Relaxed),
            eexist: self.eexist.load(Relaxed),
            eagain: self.eagain.load(Relaxed),
            remove_events: self.remove_events.load(Relaxed),
            bytes_removed: self.bytes_removed.load(Relaxed),
            write_protect_faults: self.write_protect_faults.load(Relaxed),
            source_retries: self.source_retries.load(Relaxed),
            stale_after_remove: self.stale_after_remove.load(Relaxed),
            fault_latency_us_log2: histogram,
            fault_latency_mean_us: if served == 0 {
                0.0
            } else {
                self.latency_sum_ns.load(Relaxed) as f64 / served as f64 / 1000.0
            },
            fault_latency_max_us: self.latency_max_ns.load(Relaxed) as f64 / 1000.0,
        }
    }
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// Missing-page faults read from the userfaultfd.
    pub faults: u64,
    /// Faults on a page another thread was already populating (served by
    /// that thread's copy; nothing copied twice).
    pub faults_already_claimed: u64,
    /// Pages (of the region's page size) populated from build data, by
    /// faults and their read-ahead.
    pub pages_copied: u64,
    /// Pages populated with zeros (nil mappings, removed ranges).
    pub pages_zeroed: u64,
    /// Pages populated ahead of any fault from the working set.
    pub pages_prefetched: u64,
    /// Bytes handed to `UFFDIO_COPY` that it mapped.
    pub bytes_copied: u64,
    /// `EEXIST`: the page was already mapped.
    pub eexist: u64,
    /// `EAGAIN` with nothing copied: an address-space event was queued.
    pub eagain: u64,
    pub remove_events: u64,
    pub bytes_removed: u64,
    pub write_protect_faults: u64,
    /// Source reads retried after a failure (`EFAULT` through the mapping, `EIO`).
    pub source_retries: u64,
    /// Copies that raced a REMOVE event and were zeroed again.
    pub stale_after_remove: u64,
    /// Bucket `i` counts faults served in `[2^(i-1), 2^i)` µs (bucket 0: < 1 µs).
    pub fault_latency_us_log2: Vec<u64>,
    pub fault_latency_mean_us: f64,
    pub fault_latency_max_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_log2_microsecond_buckets() {
        let m = Metrics::default();
        m.record_latency(Duration::from_nanos(500)); // 0 µs -> bucket 0
        m.record_latency(Duration::from_micros(1)); // bucket 1
        m.record_latency(Duration::from_micros(3)); // [2,4) -> bucket 2
        m.record_latency(Duration::from_secs(100)); // clamps to the last
        let s = m.snapshot();
        assert_eq!(s.fault_latency_us_log2[0], 1);
        assert_eq!(s.fault_latency_us_log2[1], 1);
        assert_eq!(s.fault_latency_us_log2[2], 1);
        assert_eq!(s.fault_latency_us_log2[LATENCY_BUCKETS - 1], 1);
        assert!(s.fault_latency_max_us >= 100e6);
    }
}
