//! Recording opens: one event per link and client in ten minutes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One open event per link and client in this time: a player's many range requests are one listen.
const OPEN_EVERY: Duration = Duration::from_secs(600);

/// Which (link, client) pairs were recorded as opened lately, so a player's range requests do not
/// each become a write. Per process: with replicas, a listen through two of them is two events.
#[derive(Debug, Default)]
pub struct OpenThrottle {
    seen: Mutex<HashMap<(String, String), Instant>>,
}

impl OpenThrottle {
    /// True when this open is to be recorded (the first from this client for this link in
    /// [`OPEN_EVERY`]).
    pub fn first(&self, reference: &str, client: &str) -> bool {
        let now = Instant::now();
        let Ok(mut seen) = self.seen.lock() else {
            return true;
        };
        if seen.len() > 10_000 {
            seen.retain(|_, at| now.duration_since(*at) < OPEN_EVERY);
        }
        let key = (reference.to_owned(), client.to_owned());
        match seen.get(&key) {
            Some(at) if now.duration_since(*at) < OPEN_EVERY => false,
            _ => {
                seen.insert(key, now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_open_per_link_and_client_in_ten_minutes() {
        let t = OpenThrottle::default();
        assert!(t.first("r1", "1.2.3.0/24"));
        assert!(!t.first("r1", "1.2.3.0/24"));
        assert!(t.first("r1", "5.6.7.0/24"));
        assert!(t.first("r2", "1.2.3.0/24"));
    }
}
