//! Counters the page server keeps while it runs, and the serialisable
//! snapshot of them that it logs at exit, writes to the metrics file and
//! returns over the control socket.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

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
    /// When serving began (the VMM's handshake taken): the clock of the
    /// restore's milestones below.
    serving_since: OnceLock<Instant>,
    /// Microseconds from then to the guest's first fault, and to the end
    /// of the working set's prefetch; 0 until it happens.
    first_fault_us: AtomicU64,
    prefetch_done_us: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Start the milestones' clock (once; later calls keep the first).
    pub fn start_clock(&self) {
        let _ = self.serving_since.set(Instant::now());
    }

    fn since_start_us(&self) -> u64 {
        self.serving_since
            .get()
            .map_or(0, |t| t.elapsed().as_micros() as u64)
            .max(1)
    }

    /// The guest faulted: the first fault sets the milestone.
    pub fn note_fault(&self) {
        if self.first_fault_us.load(Relaxed) == 0 {
            let _ =
                self.first_fault_us
                    .compare_exchange(0, self.since_start_us(), Relaxed, Relaxed);
        }
    }

    /// The working set's prefetch finished.
    pub fn note_prefetch_done(&self) {
        self.prefetch_done_us.store(self.since_start_us(), Relaxed);
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
            first_fault_us: Some(self.first_fault_us.load(Relaxed)).filter(|&us| us > 0),
            prefetch_done_us: Some(self.prefetch_done_us.load(Relaxed)).filter(|&us| us > 0),
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
    /// Microseconds from the VMM's handshake to the guest's first fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_fault_us: Option<u64>,
    /// Microseconds from the VMM's handshake to the end of the working
    /// set's prefetch (none without a working set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_done_us: Option<u64>,
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

    #[test]
    fn milestones_are_measured_from_the_start_of_serving() {
        let m = Metrics::default();
        assert_eq!(m.snapshot().first_fault_us, None);
        m.start_clock();
        std::thread::sleep(Duration::from_millis(2));
        m.note_fault();
        let first = m.snapshot().first_fault_us.expect("first fault noted");
        assert!(first >= 2000, "{first} us");
        std::thread::sleep(Duration::from_millis(2));
        m.note_fault();
        assert_eq!(
            m.snapshot().first_fault_us,
            Some(first),
            "only the first counts"
        );
        assert_eq!(m.snapshot().prefetch_done_us, None);
        m.note_prefetch_done();
        assert!(m.snapshot().prefetch_done_us.unwrap() > first);
        // Metrics files written before these fields existed still read.
        let mut json = serde_json::to_value(m.snapshot()).unwrap();
        json.as_object_mut().unwrap().remove("first_fault_us");
        let back: MetricsSnapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back.first_fault_us, None);
    }
}
