//! The dispatcher: claims due deliveries under a lease, sends each through its channel's client within
//! that channel's limits, and records a truthful outcome. Never holds a transaction across a request.
//!
//! This module is the claim loop; `sender` sends one claimed delivery, `recorder` commits outcomes,
//! `reconcile` looks overdue reports up, `lanes` builds the channels and `listener` relays wake-ups
//! from other replicas.

pub mod account;
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
use tokio::task::{JoinHandle, JoinSet};

pub use self::lanes::{lanes, Lane};
pub use self::listener::listen_for_wakeups;
use self::recorder::PendingOutcome;
use self::retry::RetryPolicy;
use crate::domain::{now_ms, DeliveryState};
use crate::messages::delivery::Texts;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::store::{DeliveryRow, IncidentRow, Moved, Store};

/// An incident read once per claim, shared by the deliveries claimed with it.
type IncidentLookup = Result<Option<Arc<IncidentRow>>, String>;

/// Under load, how long freed permits are gathered before the next claim.
const CLAIM_GATHER: Duration = Duration::from_millis(2);

/// What the dispatcher takes from other modules' settings, built once at start, so that it reads
/// no provider's settings itself.
pub struct Given {
    /// The SMS and WhatsApp texts.
    pub texts: Texts,
    /// How long a call may ring and be answered: a call accepted longer ago no longer holds back
    /// another call to the same phone.
    pub call_window: Duration,
}

pub struct Dispatcher {
    store: Store,
    settings: Arc<Settings>,
    texts: Texts,
    /// [`Given::call_window`], milliseconds.
    call_window_ms: i64,
    /// This process's lease owner name.
    owner: String,
    lanes: Vec<Arc<Lane>>,
    http: reqwest::Client,
    wake: Arc<Notify>,
    heartbeat: Arc<AtomicI64>,
    /// When orphaned deliveries were last looked for (ms since the epoch; 0 = never).
    last_adoption: AtomicI64,
    retry: RetryPolicy,
    lease: Duration,
    metrics: Arc<Metrics>,
    /// Outcomes on their way to the recorder, which commits them in batches.
    outcomes: mpsc::UnboundedSender<PendingOutcome>,
    outcomes_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<PendingOutcome>>>,
    /// Lanes that may have an account alarm open.
    account: account::AccountWatch,
}

impl Dispatcher {
    pub fn new(
        store: Store,
        settings: Arc<Settings>,
        given: Given,
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
        let account = account::AccountWatch::new(
            lanes
                .iter()
                .flat_map(|l| [l.name(), l.provider.account.as_str()]),
        );
        Ok(Dispatcher {
            account,
            outcomes,
            outcomes_rx: std::sync::Mutex::new(Some(outcomes_rx)),
            owner: format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple()),
            lease: Duration::from_secs_f64(d.lease_secs),
            store,
            settings,
            texts: given.texts,
            call_window_ms: i64::try_from(given.call_window.as_millis()).unwrap_or(i64::MAX / 2),
            lanes: lanes.into_iter().map(Arc::new).collect(),
            http,
            wake,
            heartbeat,
            last_adoption: AtomicI64::new(0),
            retry,
            metrics,
        })
    }

    /// Runs until `shutdown` turns true: then stops claiming, lets in-flight requests finish within the
    /// grace period, and releases the leases of whatever did not.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        self.warn_dry_runs();
        tracing::info!(owner = %self.owner, "dispatcher started");
        let recorder = self.start_recorder();
        let needs_reconciler = self.lanes.iter().any(|l| l.live);
        let mut reconciler = needs_reconciler.then(|| self.start_reconciler(&shutdown));
        // Settings refuse less than the minimum; the floor stays for settings built another way.
        let poll = Duration::from_millis(
            self.settings
                .dispatch
                .poll_interval_ms
                .max(crate::settings::MIN_POLL_INTERVAL_MS),
        );
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut last_reap: Option<tokio::time::Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            self.heartbeat.store(now_ms(), Ordering::Relaxed);
            self.keep_reconciler_running(&mut reconciler, &shutdown);
            if last_reap.is_none_or(|t| t.elapsed() >= poll) {
                last_reap = Some(tokio::time::Instant::now());
                self.reap_expired_leases().await;
            }
            let mut saturated = false;
            // Calls first: when limits force an order, a ringing phone matters most.
            for lane in &self.lanes {
                saturated |= self.claim_lane(lane, &mut tasks).await;
            }
            while let Some(done) = tasks.try_join_next() {
                log_panic(done);
            }
            if saturated {
                wait_for_permit(&mut tasks, poll, &mut shutdown).await;
            } else {
                self.wait_for_work(&mut tasks, poll, &mut shutdown).await;
            }
        }
        self.drain_and_release(tasks, recorder).await;
    }

    /// A lane without credentials only pretends to send: say so loudly at start.
    fn warn_dry_runs(&self) {
        for lane in self.lanes.iter().filter(|l| !l.live) {
            tracing::warn!(
                channel = %lane.channel(),
                "DRY-RUN: {} credentials are not set; deliveries are recorded as simulated and NOT sent",
                lane.channel()
            );
        }
    }

    /// Starts the task that commits outcomes in batches; `None` if it was already started once.
    fn start_recorder(&self) -> Option<JoinHandle<()>> {
        self.outcomes_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|rx| tokio::spawn(recorder::record_outcomes(self.store.clone(), rx)))
    }

    fn start_reconciler(self: &Arc<Self>, shutdown: &watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(Arc::clone(self).reconcile(shutdown.clone()))
    }

    /// Report deadlines stop silently if the reconciler dies: start it again, loudly.
    fn keep_reconciler_running(
        self: &Arc<Self>,
        reconciler: &mut Option<JoinHandle<()>>,
        shutdown: &watch::Receiver<bool>,
    ) {
        if reconciler.as_ref().is_some_and(|r| r.is_finished()) && !*shutdown.borrow() {
            tracing::error!("the report reconciler stopped; starting it again");
            *reconciler = Some(self.start_reconciler(shutdown));
        }
    }

    /// Queues again the deliveries whose lease ran out: their dispatcher died, or their outcome could
    /// not be recorded.
    async fn reap_expired_leases(&self) {
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
            Err(e) => tracing::error!(error = format!("{e:#}"), "requeueing expired leases failed"),
        }
        self.release_held().await;
        self.adopt_orphans().await;
    }

    /// Calls the carrier-safe cap held, whose hour now allows them, back to the queue (the claim
    /// counts again, so a release beyond the cap is held again).
    async fn release_held(&self) {
        let why = "the carrier-safe cap allows another call to this number now: queued again";
        match self.store.release_held(self.store.now_ms(), why).await {
            Ok(moved) if moved.is_empty() => {}
            Ok(moved) => tracing::info!(calls = moved.len(), "held calls released"),
            Err(e) => tracing::error!(error = format!("{e:#}"), "releasing held calls failed"),
        }
    }

    /// Counts and logs the calls the carrier-safe cap held back.
    fn count_held(&self, held: &[crate::store::HeldCall]) {
        self.metrics.calls_held(held.len());
        for h in held {
            tracing::warn!(
                delivery_id = %h.delivery_id,
                incident_id = %h.incident_id,
                to = %crate::domain::mask(&h.phone),
                calls_in_hour = h.calls_in_hour,
                due_in_secs = (h.until - self.store.now_ms()).max(0) / 1000,
                "call held by the carrier-safe cap (dispatch.max_calls_per_number_per_hour)"
            );
        }
    }

    /// Queued deliveries whose lane no process here sends (stored by an older build without a lane,
    /// or by a lane since removed) would never be claimed: each is given to the lane that now sends
    /// its channel, loudly.
    async fn adopt_orphans(&self) {
        // Rare (an upgrade, a removed lane) and a scan of the queue: once a minute is soon enough.
        let now = now_ms();
        let last = self.last_adoption.load(Ordering::Relaxed);
        if now - last < 60_000 {
            return;
        }
        self.last_adoption.store(now, Ordering::Relaxed);
        let known: Vec<&str> = self.lanes.iter().map(|l| l.name()).collect();
        let known = known.join(",");
        for channel in crate::domain::Channel::ALL {
            let Some(lane) = self.lanes.iter().rev().find(|l| l.channel() == channel) else {
                continue;
            };
            match self.store.adopt_orphans(channel, lane.name(), &known).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    adopted = n,
                    lane = lane.name(),
                    "queued deliveries of a lane nobody sends were given to this one"
                ),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "adopting orphaned deliveries failed"
                ),
            }
        }
    }

    /// Claims as many due deliveries of `lane` as it has free permits and starts sending them. Whether
    /// the lane is saturated (the claim took every free permit, so more work is likely waiting).
    async fn claim_lane(self: &Arc<Self>, lane: &Arc<Lane>, tasks: &mut JoinSet<()>) -> bool {
        if lane.live && lane.limits.pause.remaining().is_some() {
            return false; // paused provider: claiming now would only burn leases
        }
        let free = lane.limits.concurrency.available_permits();
        if free == 0 {
            return false;
        }
        // The lease runs by the database's clock from a moment after this one: judging it from
        // here on this process's monotonic clock errs on the safe side.
        let lease_deadline = tokio::time::Instant::now() + self.lease;
        let cap = self.settings.dispatch.max_calls_per_number_per_hour;
        match self
            .store
            .claim_capped(lane.name(), &self.owner, self.lease, free as i64, cap)
            .await
        {
            Ok(claimed) => {
                let saturated = claimed.rows.len() + claimed.held.len() == free;
                self.count_held(&claimed.held);
                self.spawn_claimed(lane, claimed.rows, lease_deadline, tasks)
                    .await;
                saturated
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), channel = %lane.channel(), "claiming deliveries failed");
                false
            }
        }
    }

    /// Starts one sending task per claimed row, each holding a permit of the lane's concurrency.
    async fn spawn_claimed(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        rows: Vec<DeliveryRow>,
        lease_deadline: tokio::time::Instant,
        tasks: &mut JoinSet<()>,
    ) {
        // A fan-out claims many deliveries of one incident: read it once.
        let mut incidents: HashMap<String, IncidentLookup> = HashMap::new();
        for row in rows {
            let incident = match incidents.get(&row.incident_id) {
                Some(found) => found.clone(),
                None => {
                    let found = self.read_incident(&row.incident_id).await;
                    incidents.insert(row.incident_id.clone(), found.clone());
                    found
                }
            };
            let Ok(permit) = lane.limits.concurrency.clone().acquire_owned().await else {
                continue;
            };
            tasks.spawn(Arc::clone(self).process(
                Arc::clone(lane),
                row,
                incident,
                lease_deadline,
                permit,
            ));
        }
    }

    async fn read_incident(&self, id: &str) -> IncidentLookup {
        match self.store.incident(id).await {
            Ok(i) => Ok(i.map(Arc::new)),
            Err(e) => Err(format!("reading the incident: {e:#}")),
        }
    }

    /// Idle: sleeps until woken (a new delivery here or, through the listener, on another replica),
    /// a task ends, shutdown begins, or the poll interval passes.
    async fn wait_for_work(
        &self,
        tasks: &mut JoinSet<()>,
        poll: Duration,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            Some(done) = tasks.join_next(), if !tasks.is_empty() => log_panic(done),
            _ = shutdown.changed() => {}
        }
    }

    /// Lets in-flight requests finish within the grace period, aborts the rest, stops the recorder and
    /// releases every lease this process still holds so another replica can send them.
    async fn drain_and_release(&self, mut tasks: JoinSet<()>, recorder: Option<JoinHandle<()>>) {
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
            // Only the provider-independent final states (failed, cancelled) arise here.
            self.metrics
                .delivery_moved(m.channel, DeliveryState::Sending, m.status, true);
        }
    }
}

/// Saturated: waits for a permit to free up rather than spinning; the poll bound keeps the heartbeat
/// fresh while every permit is held by a slow provider.
async fn wait_for_permit(
    tasks: &mut JoinSet<()>,
    poll: Duration,
    shutdown: &mut watch::Receiver<bool>,
) {
    tokio::task::yield_now().await;
    if tasks.is_empty() {
        return;
    }
    tokio::select! {
        done = tasks.join_next() => {
            if let Some(done) = done {
                log_panic(done);
            }
            gather_finished(tasks).await;
        }
        _ = tokio::time::sleep(poll) => {}
        _ = shutdown.changed() => {}
    }
}

/// Outcomes are committed in batches, so permits come back in batches: gather them for a moment and
/// claim once for all, not once per permit.
async fn gather_finished(tasks: &mut JoinSet<()>) {
    let gather = tokio::time::sleep(CLAIM_GATHER);
    tokio::pin!(gather);
    loop {
        tokio::select! {
            Some(done) = tasks.join_next(), if !tasks.is_empty() => log_panic(done),
            _ = &mut gather => break,
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

/// The host's name, so an operator can tell which replica holds a lease.
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
