//! When to try again: exponential backoff with full jitter, and `Retry-After`.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderValue;

/// The bounds of the exponential backoff between attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BackoffConfig {
    /// The ceiling of the first wait.
    pub(crate) base: Duration,
    /// The largest ceiling; waits never exceed it.
    pub(crate) max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// The waits of one batch: "full jitter", a uniform draw in `[0, min(max, base * 2^n)]`, which
/// spreads the retries of many clients after a shared outage.
#[derive(Debug)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(config: BackoffConfig) -> Self {
        Backoff { config, attempt: 0 }
    }

    /// The ceiling of the next wait, without jitter.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(31));
        self.config.base.saturating_mul(factor).min(self.config.max)
    }

    /// The next wait, drawn at random below the current ceiling.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Reads a `Retry-After` header: delay seconds or an HTTP date (a past date means now).
pub(crate) fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_from_base_to_max() {
        let mut backoff = Backoff::new(BackoffConfig::default());
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            ceilings.push(backoff.ceiling().as_millis());
            let wait = backoff.next_wait();
            assert!(wait <= Duration::from_secs(30));
        }
        assert_eq!(
            ceilings,
            [
                200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000, 30000
            ]
        );
    }

    #[test]
    fn waits_are_jittered_below_the_ceiling() {
        let waits: Vec<_> = (0..50)
            .map(|_| {
                let mut b = Backoff {
                    config: BackoffConfig::default(),
                    attempt: 5,
                };
                b.next_wait()
            })
            .collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(6400)));
        let first = waits[0];
        assert!(waits.iter().any(|w| *w != first), "no jitter: {waits:?}");
    }

    #[test]
    fn many_attempts_do_not_overflow() {
        let mut backoff = Backoff::new(BackoffConfig::default());
        for _ in 0..200 {
            assert!(backoff.next_wait() <= Duration::from_secs(30));
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let header = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(parse_retry_after(&header("1"), now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after(&header(" 120 "), now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&header(&later), now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&header(&earlier), now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(&header("-1"), now), None);
        assert_eq!(parse_retry_after(&header("soon"), now), None);
    }
}
