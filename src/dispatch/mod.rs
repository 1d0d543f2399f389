//! The dispatcher: claims due deliveries under a lease, sends each through its channel's client within
//! that channel's limits, and records a truthful outcome. Never holds a transaction across a request.

mod lanes;
pub mod limits;
mod listener;
mod reconcile;
mod recorder;
pub mod retry;
mod sender;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

pub use self::lanes::{lanes, redial_policy, Lane};
pub use self::listener::listen_for_wakeups;
use self::recorder::PendingOutcome;
use self::retry::RetryPolicy;
use crate::domain::now_ms;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::store::{IncidentRow, Moved, Store};

/// An incident read once per claim, shared by the deliveries claimed with it.
type IncidentLookup = Result<Option<Arc<IncidentRow>>, String>;

/// Under load, how long freed permits are gathered before the next claim.
const CLAIM_GATHER: Duration = Duration::from_millis(2);

pub struct Dispatcher {
    store: Store,
    settings: Arc<Settings>,
    /// This process's lease owner name.
    owner: String,
    lanes: Vec<Arc<Lane>>,
    http: reqwest::Client,
    wake: Arc<Notify>,
    heartbeat: Arc<AtomicI64>,
    retry: RetryPolicy,
    lease: Duration,
    metrics: Arc<Metrics>,
    /// Outcomes on their way to the recorder, which commits them in batches.
    outcomes: mpsc::UnboundedSender<PendingOutcome>,
    outcomes_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<PendingOutcome>>>,
}

impl Dispatcher {
    pub fn new(
        store: Store,
        settings: Arc<Settings>,
        lanes: Vec<Lane>,
        wake: Arc<Notify>,
        heartbeat: Arc<AtomicI64>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let d = &settings.dispatch;
        let retry = RetryPolicy {
            schedule: d.retry_schedule().map_err(anyhow::Error::msg)?,
            max_attempts: d.max_attempts,
            retry_for: Duration::from_secs(d.retry_for_secs().map_err(anyhow::Error::msg)?),
            retry_after_max: Duration::from_secs_f64(d.retry_after_max_secs),
            jitter: 0.2,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("exotel-sos/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let (outcomes, outcomes_rx) = mpsc::unbounded_channel();
        Ok(Dispatcher {
            outcomes,
            outcomes_rx: std::sync::Mutex::new(Some(outcomes_rx)),
            owner: format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple()),
            lease: Duration::from_secs_f64(d.lease_secs),
            store,
            settings,
            lanes: lanes.into_iter().map(Arc::new).collect(),
            http,
            wake,
            heartbeat,
            retry,
            metrics,
        })
    }

    /// Runs until `shutdown` turns true: then stops claiming, lets in-flight requests finish within the
    /// grace period, and releases the leases of whatever did not.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        for lane in &self.lanes {
            if !lane.live {
                tracing::warn!(
                    channel = %lane.channel(),
                    "DRY-RUN: {} credentials are not set; deliveries are recorded as simulated and NOT sent",
                    lane.channel()
                );
            }
        }
        tracing::info!(owner = %self.owner, "dispatcher started");
        let recorder = self
            .outcomes_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|rx| tokio::spawn(recorder::record_outcomes(self.store.clone(), rx)));
        let needs_reconciler = self.lanes.iter().any(|l| l.live);
        let mut reconciler =
            needs_reconciler.then(|| tokio::spawn(Arc::clone(&self).reconcile(shutdown.clone())));
        let poll = Duration::from_millis(self.settings.dispatch.poll_interval_ms.max(10));
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut last_reap: Option<tokio::time::Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            self.heartbeat.store(now_ms(), Ordering::Relaxed);
            // Report deadlines stop silently if the reconciler dies: start it again, loudly.
            if reconciler.as_ref().is_some_and(|r| r.is_finished()) && !*shutdown.borrow() {
                tracing::error!("the report reconciler stopped; starting it again");
                reconciler = Some(tokio::spawn(Arc::clone(&self).reconcile(shutdown.clone())));
            }
            if last_reap.is_none_or(|t| t.elapsed() >= poll) {
                last_reap = Some(tokio::time::Instant::now());
                match self
                    .store
                    .requeue_expired_leases(self.settings.dispatch.max_attempts)
                    .await
                {
                    Ok(moved) if moved.is_empty() => {}
                    Ok(moved) => {
                        tracing::warn!(
                            requeued = moved.len(),
                            "deliveries whose lease ran out (dispatcher died, or outcome not recordable) are queued again"
                        );
                        self.count_moved(&moved);
                    }
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "requeueing expired leases failed"
                    ),
                }
            }
            let mut saturated = false;
            // Calls first: when limits force an order, a ringing phone matters most.
            for lane in &self.lanes {
                if lane.live && lane.limits.pause.remaining().is_some() {
                    continue; // paused provider: claiming now would only burn leases
                }
                let free = lane.limits.concurrency.available_permits();
                if free == 0 {
                    continue;
                }
                // The lease runs by the database's clock from a moment after this one: judging it from
                // here on this process's monotonic clock errs on the safe side.
                let lease_deadline = tokio::time::Instant::now() + self.lease;
                match self
                    .store
                    .claim(lane.channel(), &self.owner, self.lease, free as i64)
                    .await
                {
                    Ok(rows) => {
                        saturated |= rows.len() == free;
                        // A fan-out claims many deliveries of one incident: read it once.
                        let mut incidents: HashMap<String, IncidentLookup> = HashMap::new();
                        for row in rows {
                            if !incidents.contains_key(&row.incident_id) {
                                let found = match self.store.incident(&row.incident_id).await {
                                    Ok(i) => Ok(i.map(Arc::new)),
                                    Err(e) => Err(format!("reading the incident: {e:#}")),
                                };
                                incidents.insert(row.incident_id.clone(), found);
                            }
                            let incident = incidents[&row.incident_id].clone();
                            let Ok(permit) = lane.limits.concurrency.clone().acquire_owned().await
                            else {
                                continue;
                            };
                            tasks.spawn(Arc::clone(&self).process(
                                Arc::clone(lane),
                                row,
                                incident,
                                lease_deadline,
                                permit,
                            ));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), channel = %lane.channel(), "claiming deliveries failed");
                    }
                }
            }
            while let Some(done) = tasks.try_join_next() {
                log_panic(done);
            }
            if saturated {
                tokio::task::yield_now().await;
                // Wait for a permit to free up rather than spinning; the poll bound keeps the heartbeat
                // fresh while every permit is held by a slow provider.
                if !tasks.is_empty() {
                    tokio::select! {
                        done = tasks.join_next() => {
                            if let Some(done) = done {
                                log_panic(done);
                            }
                            // Outcomes are committed in batches, so permits come back in batches: gather
                            // them for a moment and claim once for all, not once per permit.
                            let gather = tokio::time::sleep(CLAIM_GATHER);
                            tokio::pin!(gather);
                            loop {
                                tokio::select! {
                                    Some(done) = tasks.join_next(), if !tasks.is_empty() => log_panic(done),
                                    _ = &mut gather => break,
                                }
                            }
                        }
                        _ = tokio::time::sleep(poll) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => log_panic(done),
                _ = shutdown.changed() => {}
            }
        }

        let grace = Duration::from_secs_f64(self.settings.dispatch.shutdown_grace_secs);
        tracing::info!(in_flight = tasks.len(), "dispatcher stopping");
        let drained = tokio::time::timeout(grace, async {
            while let Some(done) = tasks.join_next().await {
                log_panic(done);
            }
        })
        .await
        .is_ok();
        if !drained {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        if let Some(r) = recorder {
            // Every task has ended, so every outcome it handed over has been answered.
            r.abort();
        }
        match self.store.release(&self.owner).await {
            Ok(moved) if moved.is_empty() => {}
            Ok(moved) => {
                tracing::warn!(
                    released = moved.len(),
                    "released unfinished deliveries; they will be sent again"
                );
                self.count_moved(&moved);
            }
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "could not release leases; they expire by themselves and the work resumes"
            ),
        }
        tracing::info!("dispatcher stopped");
    }

    /// Counts deliveries that reached a final state away from a provider request.
    fn count_moved(&self, moved: &[Moved]) {
        for m in moved {
            if m.status == "failed" || m.status == "cancelled" {
                self.metrics.delivery_finished(&m.channel, &m.status);
            }
        }
    }
}

/// A delivery task that panicked leaves its lease to expire (and the delivery to be sent again); say so.
fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "a delivery task panicked; its lease will expire and it will be sent again");
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "sos".to_owned())
}
