//! The one clock everything that waits reads: retries, redials, escalation steps, deadlines and the
//! auditor compare stored times with [`Clock::now_ms`]. It is the system's clock plus an offset that
//! only tests move forward ([`Clock::advance`]), so hours of escalation run in seconds. Leases are not
//! on it: they are judged by the database's clock, the one every replica shares.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Cheap to clone: clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Self {
        Clock::default()
    }

    /// Now, in milliseconds since the Unix epoch, as stored in both engines.
    pub fn now_ms(&self) -> i64 {
        super::now_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock (and every clone of it) forward by `by`. For tests that drive time.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX / 2);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// How far ahead of the system's clock this one runs.
    pub fn offset(&self) -> Duration {
        Duration::from_millis(self.offset_ms.load(Ordering::Relaxed).max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_offset() {
        let a = Clock::system();
        let b = a.clone();
        let before = b.now_ms();
        a.advance(Duration::from_secs(3600));
        let after = b.now_ms();
        assert!(after - before >= 3_600_000, "{before} {after}");
        assert_eq!(b.offset(), Duration::from_secs(3600));
    }
}
