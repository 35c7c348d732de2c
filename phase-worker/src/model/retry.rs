//! The retry policy as pure arithmetic: exponential back-off with full jitter between failed
//! tries, `Retry-After` (seconds or HTTP-date) read from a response and bounded, and the budget
//! a call has for waiting.
//!
//! Nothing here sleeps or talks to the network, so every rule can be tested with fixed inputs;
//! the client's try loop applies the numbers.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::config::ModelClientConfig;
use super::error::ModelError;

/// The shortest wait a `Retry-After` can impose, whatever it says.
const MIN_WAIT: Duration = Duration::from_millis(10);

/// Exponential backoff with full jitter; a server's `Retry-After` is a floor, itself capped.
#[derive(Clone, Copy, Debug)]
pub(super) struct Backoff {
    base: Duration,
    max: Duration,
    max_retry_after: Duration,
}

impl Backoff {
    pub(super) fn from_config(config: &ModelClientConfig) -> Self {
        Backoff {
            base: config.backoff_base,
            max: config.backoff_max,
            max_retry_after: config.max_retry_after,
        }
    }

    /// `jitter` in `[0, 1]` picks the point between zero and the exponential ceiling.
    pub(super) fn delay(&self, failed_try: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let jittered = self.ceiling(failed_try).mul_f64(jitter.clamp(0.0, 1.0));
        let floor = retry_after.map_or(Duration::ZERO, |wait| wait.min(self.max_retry_after));
        jittered.max(floor)
    }

    fn ceiling(&self, failed_try: u32) -> Duration {
        let doublings = failed_try.saturating_sub(1).min(31);
        self.base.saturating_mul(1 << doublings).min(self.max)
    }

    /// How long to wait when the provider asked for `asked`: capped at `max_retry_after`, and
    /// never less than the first backoff, so a `Retry-After: 0` (or a date already past) does
    /// not become a tight loop.
    pub(super) fn honoured_retry_after(&self, asked: Duration) -> Duration {
        let shortest = self.base.max(MIN_WAIT);
        asked.clamp(shortest, self.max_retry_after.max(shortest))
    }
}

/// `Retry-After` as seconds (integer or decimal) or as an HTTP-date (the
/// wait until then, zero if it has passed).
pub(super) fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        // Absurdly large values are kept (the caller caps them), not dropped.
        return (seconds >= 0.0).then(|| Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The total a call may spend waiting (Retry-After, rate limit).
pub(super) struct WaitBudget {
    limit: Duration,
    spent: Duration,
}

impl WaitBudget {
    pub(super) fn new(limit: Duration) -> Self {
        Self {
            limit,
            spent: Duration::ZERO,
        }
    }

    /// Books `wait` and returns the total so far, or fails when it would pass
    /// the limit.
    pub(super) fn spend(&mut self, wait: Duration, reason: &str) -> Result<Duration, ModelError> {
        let total = self.spent + wait;
        if total > self.limit {
            return Err(ModelError::WaitedTooLong {
                waited: self.spent,
                limit: self.limit,
                last: reason.to_string(),
            });
        }
        self.spent = total;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    const BACKOFF: Backoff = Backoff {
        base: Duration::from_millis(500),
        max: Duration::from_secs(10),
        max_retry_after: Duration::from_secs(60),
    };

    #[test]
    fn backoff_ceiling_doubles_per_try_and_stops_at_the_max() {
        assert_eq!(BACKOFF.delay(1, None, 1.0), Duration::from_millis(500));
        assert_eq!(BACKOFF.delay(2, None, 1.0), Duration::from_secs(1));
        assert_eq!(BACKOFF.delay(3, None, 1.0), Duration::from_secs(2));
        assert_eq!(BACKOFF.delay(10, None, 1.0), Duration::from_secs(10));
        assert_eq!(BACKOFF.delay(u32::MAX, None, 1.0), Duration::from_secs(10));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        assert_eq!(BACKOFF.delay(2, None, 0.0), Duration::ZERO);
        assert_eq!(BACKOFF.delay(2, None, 0.25), Duration::from_millis(250));
        assert_eq!(BACKOFF.delay(2, None, 7.0), Duration::from_secs(1));
    }

    #[test]
    fn retry_after_is_a_floor_capped_by_max_retry_after() {
        let one = Some(Duration::from_secs(1));
        assert_eq!(BACKOFF.delay(1, one, 0.0), Duration::from_secs(1));
        assert_eq!(BACKOFF.delay(5, one, 1.0), Duration::from_secs(8));
        let huge = Some(Duration::from_secs(3600));
        assert_eq!(BACKOFF.delay(1, huge, 0.0), Duration::from_secs(60));
    }

    #[test]
    fn honoured_retry_after_is_at_least_the_first_backoff_and_at_most_the_cap() {
        assert_eq!(BACKOFF.honoured_retry_after(Duration::ZERO), Duration::from_millis(500));
        assert_eq!(
            BACKOFF.honoured_retry_after(Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        assert_eq!(BACKOFF.honoured_retry_after(Duration::MAX), Duration::from_secs(60));
        let no_base = Backoff {
            base: Duration::ZERO,
            max_retry_after: Duration::ZERO,
            ..BACKOFF
        };
        assert_eq!(no_base.honoured_retry_after(Duration::ZERO), MIN_WAIT);
        assert_eq!(no_base.honoured_retry_after(Duration::from_secs(5)), MIN_WAIT);
    }

    #[test]
    fn retry_after_header_accepts_integer_and_decimal_seconds() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let parse = |text: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_str(text).unwrap());
            parse_retry_after(&headers, now)
        };
        assert_eq!(parse("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse(" 1.5 "), Some(Duration::from_millis(1500)));
        assert_eq!(parse("Wed, 21 Oct 2015 07:28:03 GMT"), Some(Duration::from_secs(3)));
        assert_eq!(parse("Wed, 21 Oct 2015 07:27:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse("-1"), None);
        assert_eq!(parse("1e400"), Some(Duration::MAX), "capped later, not ignored");
        assert_eq!(parse("NaN"), None);
        assert_eq!(parse("soon"), None);
        assert_eq!(parse_retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn waits_have_their_own_budget() {
        let mut budget = WaitBudget::new(Duration::from_secs(3));
        assert_eq!(
            budget.spend(Duration::from_secs(1), "a").unwrap(),
            Duration::from_secs(1)
        );
        assert_eq!(
            budget.spend(Duration::from_secs(2), "b").unwrap(),
            Duration::from_secs(3)
        );
        assert!(matches!(
            budget.spend(Duration::from_millis(1), "c"),
            Err(ModelError::WaitedTooLong { .. })
        ));
    }
}
