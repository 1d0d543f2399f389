//! Retry policy as data: the schedule from settings, jitter, and Retry-After within bounds.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub schedule: Vec<Duration>,
    pub max_attempts: u32,
    /// Transient failures are retried at least this long after the delivery was created, whatever
    /// the attempt count.
    pub retry_for: Duration,
    pub retry_after_max: Duration,
    /// Fraction of the wait added at random, so a provider's recovery is not met by a thundering herd.
    pub jitter: f64,
}

impl RetryPolicy {
    /// The dispatch retry policy of these settings (`dispatch.retry_schedule_secs`, `max_attempts`,
    /// `retry_for`, `retry_after_max_secs`), for anything else retried like a delivery.
    pub fn from_settings(d: &crate::settings::DispatchSettings) -> anyhow::Result<Self> {
        Ok(RetryPolicy {
            schedule: d.retry_schedule().map_err(anyhow::Error::msg)?,
            max_attempts: d.max_attempts,
            retry_for: Duration::from_secs(d.retry_for_secs().map_err(anyhow::Error::msg)?),
            retry_after_max: Duration::from_secs_f64(d.retry_after_max_secs),
            jitter: 0.2,
        })
    }

    /// The wait before the next try after attempt number `attempt` (1-based) failed transiently, the
    /// delivery being `age` old, or `None` when both the attempts and the time budget are used up.
    pub fn next_wait(
        &self,
        attempt: u32,
        age: Duration,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts && age >= self.retry_for {
            return None;
        }
        let idx = (attempt.saturating_sub(1) as usize).min(self.schedule.len().saturating_sub(1));
        let base = self
            .schedule
            .get(idx)
            .copied()
            .unwrap_or(Duration::from_secs(1));
        let jittered = base.mul_f64(1.0 + rand::thread_rng().gen_range(0.0..=self.jitter.max(0.0)));
        let floor = retry_after
            .map(|r| r.min(self.retry_after_max))
            .unwrap_or_default();
        Some(jittered.max(floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Older than the time budget: only the attempt count decides.
    const LATE: Duration = Duration::from_secs(601);

    fn policy() -> RetryPolicy {
        RetryPolicy {
            schedule: vec![Duration::from_secs(2), Duration::from_secs(10)],
            max_attempts: 4,
            retry_for: Duration::from_secs(600),
            retry_after_max: Duration::from_secs(60),
            jitter: 0.2,
        }
    }

    #[test]
    fn follows_the_schedule_with_jitter_then_gives_up() {
        let p = policy();
        let w1 = p.next_wait(1, LATE, None).unwrap();
        assert!(
            w1 >= Duration::from_secs(2) && w1 <= Duration::from_millis(2400),
            "{w1:?}"
        );
        let w3 = p.next_wait(3, LATE, None).unwrap();
        assert!(
            w3 >= Duration::from_secs(10) && w3 <= Duration::from_secs(12),
            "{w3:?}"
        );
        assert_eq!(p.next_wait(4, LATE, None), None);
    }

    #[test]
    fn an_outage_shorter_than_the_time_budget_does_not_use_up_the_attempts() {
        let p = policy();
        // Attempt 9 of 4, five minutes in: keep going at the schedule's last wait.
        let w = p.next_wait(9, Duration::from_secs(300), None).unwrap();
        assert!(
            w >= Duration::from_secs(10) && w <= Duration::from_secs(12),
            "{w:?}"
        );
        assert_eq!(p.next_wait(9, LATE, None), None);
        // Within the attempts, time alone never stops a retry.
        assert!(p.next_wait(2, Duration::from_secs(99_999), None).is_some());
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let p = policy();
        assert!(
            p.next_wait(1, LATE, Some(Duration::from_secs(30))).unwrap() >= Duration::from_secs(30)
        );
        assert!(
            p.next_wait(1, LATE, Some(Duration::from_secs(9999)))
                .unwrap()
                <= Duration::from_secs(60)
        );
    }
}
