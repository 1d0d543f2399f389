//! Per-channel concurrency and rate limits, and a per-provider pause after 429/503 or Retry-After, so
//! one throttled provider slows itself and not the others.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Shared by the channels of one provider (Exotel's calls and SMS use one account).
#[derive(Default)]
pub struct Pause {
    until: Mutex<Option<Instant>>,
}

impl Pause {
    /// Holds the provider back for `d` from now (never shortens a longer pause).
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut guard = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none_or(|u| u < until) {
            *guard = Some(until);
        }
    }

    pub fn remaining(&self) -> Option<Duration> {
        let guard = self.until.lock().unwrap_or_else(|p| p.into_inner());
        guard.and_then(|u| u.checked_duration_since(Instant::now()))
    }
}

pub struct Limits {
    pub concurrency: Arc<Semaphore>,
    rate: DefaultDirectRateLimiter,
    pub pause: Arc<Pause>,
}

impl Limits {
    /// `per_minute` requests a minute with a burst of up to `concurrency`: a handful of doctors' phones
    /// ring at once, a large fan-out is spread over the minute.
    pub fn new(concurrency: u32, per_minute: u32, pause: Arc<Pause>) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(concurrency.min(per_minute.get())).unwrap_or(NonZeroU32::MIN);
        Limits {
            concurrency: Arc::new(Semaphore::new(concurrency.max(1) as usize)),
            rate: RateLimiter::direct(Quota::per_minute(per_minute).allow_burst(burst)),
            pause,
        }
    }

    /// Waits until the provider is not paused and the rate allows one more request.
    pub async fn ready(&self) {
        loop {
            if let Some(wait) = self.pause.remaining() {
                tokio::time::sleep(wait).await;
                continue;
            }
            self.rate.until_ready().await;
            if self.pause.remaining().is_none() {
                return;
            }
        }
    }
}
