//! Per-caller request limits: a token bucket (requests per second with a
//! burst) and a cap on requests in flight, for each API key and each
//! sandbox access token, so one caller cannot monopolise the control plane
//! or its database.
//!
//! The check runs right after a credential is verified (the lookup is the
//! one query every request makes anyway); counting before verification
//! would let anyone who knows a key's public prefix drain its bucket.
//! Limits are per replica: N replicas allow N times the rate in total.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits (each 0 = no limit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    /// Sustained requests per second per caller.
    pub per_second: f64,
    /// Requests a caller may make at once after being idle.
    pub burst: u32,
    /// Requests of one caller being handled at the same time.
    pub concurrent: u32,
}

impl Default for RateLimits {
    /// 100 requests/s with bursts of 200, 64 at a time: far above what an
    /// SDK or the CLI does, low enough that a runaway loop is contained.
    fn default() -> Self {
        RateLimits {
            per_second: 100.0,
            burst: 200,
            concurrent: 64,
        }
    }
}

/// Why a request was refused, and when to try again.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    Rate { retry_after: Duration },
    Concurrency,
}

impl Refusal {
    /// Whole seconds for `Retry-After` (at least 1).
    pub fn retry_after_s(&self) -> u64 {
        match self {
            Refusal::Rate { retry_after } => retry_after.as_secs_f64().ceil().max(1.0) as u64,
            Refusal::Concurrency => 1,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Entries idle this long are dropped when the table grows.
const IDLE: Duration = Duration::from_secs(600);
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug)]
pub struct RateLimiter {
    limits: RateLimits,
    buckets: Mutex<HashMap<String, Bucket>>,
    in_flight: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> RateLimiter {
        RateLimiter {
            limits,
            buckets: Mutex::default(),
            in_flight: Mutex::default(),
        }
    }

    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    /// Admit one request of `caller` at `now`: take a token and, when
    /// concurrency is limited, a permit to hold until the request is done.
    pub fn admit(
        &self,
        caller: &str,
        now: Instant,
    ) -> Result<Option<OwnedSemaphorePermit>, Refusal> {
        self.take_token(caller, now)?;
        if self.limits.concurrent == 0 {
            return Ok(None);
        }
        let sem = {
            let mut map = self.in_flight.lock().expect("limiter lock");
            if map.len() > PRUNE_ABOVE {
                map.retain(|_, s| s.available_permits() < self.limits.concurrent as usize);
            }
            map.entry(caller.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.limits.concurrent as usize)))
                .clone()
        };
        sem.try_acquire_owned()
            .map(Some)
            .map_err(|_| Refusal::Concurrency)
    }

    fn take_token(&self, caller: &str, now: Instant) -> Result<(), Refusal> {
        let RateLimits {
            per_second, burst, ..
        } = self.limits;
        if per_second <= 0.0 || burst == 0 {
            return Ok(());
        }
        let mut map = self.buckets.lock().expect("limiter lock");
        if map.len() > PRUNE_ABOVE {
            map.retain(|_, b| now.saturating_duration_since(b.last) < IDLE);
        }
        let b = map.entry(caller.to_owned()).or_insert(Bucket {
            tokens: f64::from(burst),
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_second).min(f64::from(burst));
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Refusal::Rate {
                retry_after: Duration::from_secs_f64((1.0 - b.tokens) / per_second),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: f64, burst: u32, concurrent: u32) -> RateLimiter {
        RateLimiter::new(RateLimits {
            per_second,
            burst,
            concurrent,
        })
    }

    #[test]
    fn a_burst_is_allowed_then_the_rate_with_a_retry_time() {
        let l = limiter(2.0, 3, 0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.admit("k", t0).is_ok());
        }
        let refused = l.admit("k", t0).unwrap_err();
        assert_eq!(
            refused,
            Refusal::Rate {
                retry_after: Duration::from_millis(500)
            }
        );
        assert_eq!(refused.retry_after_s(), 1);
        // Another caller has its own bucket.
        assert!(l.admit("other", t0).is_ok());
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.admit("k", t1).is_ok());
        assert!(l.admit("k", t1).is_err());
        // Idle long enough, the bucket is full again but no fuller.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.admit("k", t2).is_ok());
        }
        assert!(l.admit("k", t2).is_err());
    }

    #[test]
    fn requests_in_flight_are_capped_until_one_ends() {
        let l = limiter(0.0, 0, 2);
        let now = Instant::now();
        let a = l.admit("k", now).unwrap().expect("a permit");
        let _b = l.admit("k", now).unwrap().expect("a permit");
        assert_eq!(l.admit("k", now).unwrap_err(), Refusal::Concurrency);
        assert!(l.admit("other", now).is_ok());
        drop(a);
        assert!(l.admit("k", now).unwrap().is_some());
    }

    #[test]
    fn zero_means_unlimited() {
        let l = limiter(0.0, 0, 0);
        let now = Instant::now();
        for _ in 0..10_000 {
            assert!(l.admit("k", now).unwrap().is_none());
        }
    }
}
