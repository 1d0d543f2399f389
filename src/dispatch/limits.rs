//! Per-channel concurrency and rate limits, and a per-provider pause after 429/503 or Retry-After, so
//! one throttled provider slows itself and not the others. On PostgreSQL the rate is an account-wide
//! token bucket in the database, shared by every replica: three replicas must not send three times
//! the account's limit.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::store::Store;

/// The account-wide bucket a lane draws from (PostgreSQL only).
pub struct SharedRate {
    pub store: Store,
    /// One bucket per provider lane, e.g. `exotel:call`.
    pub name: String,
}

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

/// What [`Limits::ready`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// Send now; `waited` when it had to wait (the world may have changed meanwhile).
    Go { waited: bool },
    /// The wait would outlast the lease: hand the delivery back, due in `retry_in`.
    TooLate { retry_in: Duration },
}

pub struct Limits {
    pub concurrency: Arc<Semaphore>,
    rate: DefaultDirectRateLimiter,
    shared: Option<SharedRate>,
    per_minute: u32,
    burst: u32,
    pub pause: Arc<Pause>,
}

impl Limits {
    /// `per_minute` requests a minute with a burst of up to `concurrency`: a handful of doctors' phones
    /// ring at once, a large fan-out is spread over the minute.
    pub fn new(
        concurrency: u32,
        per_minute: u32,
        pause: Arc<Pause>,
        shared: Option<SharedRate>,
    ) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(concurrency.min(per_minute.get())).unwrap_or(NonZeroU32::MIN);
        Limits {
            concurrency: Arc::new(Semaphore::new(concurrency.max(1) as usize)),
            rate: RateLimiter::direct(Quota::per_minute(per_minute).allow_burst(burst)),
            shared,
            per_minute: per_minute.get(),
            burst: burst.get(),
            pause,
        }
    }

    /// Waits until the provider is not paused and the rate allows one more request, as long as the
    /// request can still start by `latest_start`. A wait that would run past it gives up at once,
    /// before taking any of the rate: the delivery is handed back unsent rather than held past its
    /// lease (another claim could then send it too).
    pub async fn ready(&self, latest_start: Instant) -> Ready {
        let started = Instant::now();
        loop {
            if let Some(wait) = self.pause.remaining() {
                if Instant::now() + wait > latest_start {
                    return Ready::TooLate { retry_in: wait };
                }
                tokio::time::sleep(wait).await;
                continue;
            }
            let left = latest_start.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, self.take_rate()).await.is_err() {
                return Ready::TooLate {
                    retry_in: Duration::ZERO,
                };
            }
            if self.pause.remaining().is_none() {
                return Ready::Go {
                    waited: started.elapsed() >= Duration::from_millis(5),
                };
            }
        }
    }

    /// One request's worth of the rate: from the shared bucket when there is one, else this process's.
    async fn take_rate(&self) {
        let Some(shared) = &self.shared else {
            self.rate.until_ready().await;
            return;
        };
        loop {
            match shared
                .store
                .take_rate_token(&shared.name, self.per_minute, self.burst)
                .await
            {
                Ok(None) => return,
                Ok(Some(wait)) => tokio::time::sleep(wait).await,
                Err(e) => {
                    // The database is the only place replicas meet; without it, this replica falls
                    // back to its own limit rather than stop alerting.
                    tracing::warn!(error = format!("{e:#}"), bucket = %shared.name, "shared rate limit unavailable; limiting this replica alone");
                    self.rate.until_ready().await;
                    return;
                }
            }
        }
    }
}
