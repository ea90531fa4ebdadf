//! Retry timing: when a transaction that failed temporarily is attempted again.

use std::time::Duration;

/// The retry policy of an output chain (`output_handler.retry_params`).
///
/// The wait grows with the message's age, not with the attempt count:
/// `delay = clamp(age * factor, min_attempt_time, max_attempt_time)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    /// `None` is unlimited.
    pub max_attempts: Option<u32>,
    pub min_attempt_time: Duration,
    pub max_attempt_time: Duration,
    pub factor: f64,
    /// Give up when the next attempt would start later than this after creation.
    pub deadline: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            max_attempts: Some(30),
            min_attempt_time: Duration::from_secs(60),
            max_attempt_time: Duration::from_secs(3600),
            factor: 1.5,
            deadline: Some(Duration::from_secs(86400)),
        }
    }
}

/// What to do after attempt number `attempt` failed temporarily.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Try again at this Unix time (seconds).
    At(i64),
    /// Stop, with this `final_attempt_reason`.
    GiveUp(&'static str),
}

pub const REASON_MAX_ATTEMPTS: &str = "retry policy max attempts";
pub const REASON_DEADLINE: &str = "retry policy deadline";

impl Backoff {
    /// Decides the next attempt; `creation` and `now` are Unix seconds from one clock.
    pub fn next(&self, attempt: u32, creation: i64, now: i64) -> Retry {
        if let Some(max) = self.max_attempts
            && attempt >= max
        {
            return Retry::GiveUp(REASON_MAX_ATTEMPTS);
        }
        let age = (now - creation).max(0) as f64;
        let delay = (age * self.factor)
            .min(self.max_attempt_time.as_secs_f64())
            .max(self.min_attempt_time.as_secs_f64());
        let next = now + delay as i64;
        if let Some(deadline) = self.deadline
            && next - creation > deadline.as_secs() as i64
        {
            return Retry::GiveUp(REASON_DEADLINE);
        }
        Retry::At(next)
    }

    /// A short randomized pause before retrying a lost compare-and-swap (`i` = retries so
    /// far): none for the first retry, then `[2^i, 2^(i+1)]` milliseconds.
    pub fn conflict_pause(i: u32) -> Duration {
        if i == 0 {
            return Duration::ZERO;
        }
        let lo = 1u64 << i.min(10);
        Duration::from_millis(lo + rand::random_range(0..=lo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min: u64, max: u64, factor: f64) -> Backoff {
        Backoff {
            max_attempts: None,
            min_attempt_time: Duration::from_secs(min),
            max_attempt_time: Duration::from_secs(max),
            factor,
            deadline: None,
        }
    }

    #[test]
    fn vectors() {
        assert_eq!(policy(0, 3600, 2.0).next(1, 100, 101), Retry::At(103));
        assert_eq!(policy(7, 3600, 2.0).next(1, 100, 100), Retry::At(107));
        assert_eq!(policy(0, 17, 100.0).next(1, 100, 101), Retry::At(118));
        let mut p = policy(0, 3600, 2.0);
        p.max_attempts = Some(1);
        assert_eq!(p.next(1, 100, 101), Retry::GiveUp(REASON_MAX_ATTEMPTS));
        let mut p = policy(0, 3600, 2.0);
        p.deadline = Some(Duration::ZERO);
        assert_eq!(p.next(1, 100, 101), Retry::GiveUp(REASON_DEADLINE));
    }

    #[test]
    fn local_test_ingress_example() {
        // min 2, max 5, factor 1.5, 3 attempts, deadline 30.
        let p = Backoff {
            max_attempts: Some(3),
            min_attempt_time: Duration::from_secs(2),
            max_attempt_time: Duration::from_secs(5),
            factor: 1.5,
            deadline: Some(Duration::from_secs(30)),
        };
        assert_eq!(p.next(1, 0, 1), Retry::At(3));
        assert_eq!(p.next(2, 0, 4), Retry::At(9));
        assert_eq!(p.next(3, 0, 9), Retry::GiveUp(REASON_MAX_ATTEMPTS));
    }

    #[test]
    fn conflict_pause_bounds() {
        assert_eq!(Backoff::conflict_pause(0), Duration::ZERO);
        let d = Backoff::conflict_pause(3);
        assert!(d >= Duration::from_millis(8) && d <= Duration::from_millis(16));
    }
}
