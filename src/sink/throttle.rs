//! Rate-limits repetitive log lines (queue full, authentication faults).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one caller through per period; the others are told to stay quiet.
///
/// Lock-free: one atomic load on the quiet path, so it can sit on the request path.
#[derive(Debug)]
pub(crate) struct LogThrottle {
    origin: Instant,
    period_ms: u64,
    /// Milliseconds since `origin` at the last allowed log, plus one; zero means never.
    last: AtomicU64,
}

impl LogThrottle {
    pub(crate) fn new(period: Duration) -> Self {
        LogThrottle {
            origin: Instant::now(),
            period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
            last: AtomicU64::new(0),
        }
    }

    /// Whether the caller may log now. At most one caller per period gets `true`.
    pub(crate) fn allow(&self) -> bool {
        let now = u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.period_ms {
            return false;
        }
        self.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_one_per_period() {
        let throttle = LogThrottle::new(Duration::from_secs(60));
        assert!(throttle.allow());
        assert!(!throttle.allow());
        assert!(!throttle.allow());
    }

    #[test]
    fn allows_again_after_the_period() {
        let throttle = LogThrottle::new(Duration::from_millis(1));
        assert!(throttle.allow());
        std::thread::sleep(Duration::from_millis(5));
        assert!(throttle.allow());
    }
}
