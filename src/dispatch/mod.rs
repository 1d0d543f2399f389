//! The dispatcher: claims due deliveries under a lease, sends each through its channel's client within
//! that channel's limits, and records a truthful outcome. Never holds a transaction across a request.

mod lanes;
pub mod limits;
mod listener;
mod reconcile;
mod recorder;
pub mod retry;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tracing::Instrument;

pub use self::lanes::{lanes, redial_policy, Lane};
use self::limits::Ready;
pub use self::listener::listen_for_wakeups;
use self::recorder::PendingOutcome;
use self::retry::RetryPolicy;
use crate::domain::{mask, mask_numbers, now_ms, Channel};
use crate::messages::{self, Vars};
use crate::metrics::Metrics;
use crate::providers::{self, Job, Outcome};
use crate::settings::{RecordingLink, Settings};
use crate::store::{DeliveryRow, Finish, IncidentRow, Moved, Store};

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

    /// Hands the outcome to the recorder and waits until it is committed (so a permit is only freed
    /// once its work is on record); records it directly when no recorder runs. The status recorded, or
    /// `None` when the claim no longer held the lease.
    async fn record(
        &self,
        delivery_id: &str,
        token: &str,
        finish: Finish,
    ) -> anyhow::Result<Option<String>> {
        let (tx, rx) = oneshot::channel();
        if self
            .outcomes
            .send((delivery_id.to_owned(), token.to_owned(), finish.clone(), tx))
            .is_ok()
        {
            if let Ok(result) = rx.await {
                return result;
            }
        }
        let items = [(delivery_id.to_owned(), token.to_owned(), finish)];
        recorder::record_batch(&self.store, &items)
            .await
            .pop()
            .unwrap_or_else(|| Err(anyhow::anyhow!("nothing recorded")))
    }

    /// Counts deliveries that reached a final state away from a provider request.
    fn count_moved(&self, moved: &[Moved]) {
        for m in moved {
            if m.status == "failed" || m.status == "cancelled" {
                self.metrics.delivery_finished(&m.channel, &m.status);
            }
        }
    }

    /// Whether `status` is final for a delivery of `lane` (a WhatsApp acceptance is: no report follows).
    fn is_final(lane: &Lane, status: &str) -> bool {
        matches!(status, "delivered" | "failed" | "simulated" | "cancelled")
            || (status == "accepted" && !lane.client.reports_outcome())
    }

    async fn process(
        self: Arc<Self>,
        lane: Arc<Lane>,
        d: DeliveryRow,
        incident: IncidentLookup,
        lease_deadline: tokio::time::Instant,
        _permit: OwnedSemaphorePermit,
    ) {
        let span = tracing::info_span!(
            "delivery",
            delivery_id = %d.id,
            incident_id = %d.incident_id,
            channel = %d.channel,
            to = %mask(&d.phone),
            attempt = d.attempts,
        );
        async move {
            let finish = match incident {
                Ok(Some(incident)) => self.send(&lane, &d, &incident, lease_deadline).await,
                Ok(None) => Finish::Failed {
                    reason: "incident not found".to_owned(),
                },
                // Nothing was sent, but an incident that cannot be read may never be: spend an
                // attempt, so the retry policy bounds it.
                Err(reason) => self.after_transient(&d, reason, None),
            };
            match &finish {
                Finish::Accepted { provider_id, .. } => {
                    tracing::info!(provider_id = provider_id.as_deref().unwrap_or("-"), "accepted by provider")
                }
                Finish::Simulated { .. } => tracing::info!("dry-run: simulated"),
                Finish::Retry { reason, due_at } | Finish::Requeue { reason, due_at } => {
                    tracing::warn!(reason = %mask_numbers(reason), retry_in_ms = due_at - now_ms(), "not delivered yet; will try again")
                }
                Finish::Failed { reason } => tracing::error!(reason = %mask_numbers(reason), "DELIVERY FAILED"),
                Finish::Cancelled { reason } => tracing::info!(reason = %mask_numbers(reason), "cancelled"),
            }
            let token = d.lease_token.clone().unwrap_or_default();
            match self.record(&d.id, &token, finish).await {
                Ok(Some(status)) => {
                    if Self::is_final(&lane, &status) {
                        self.metrics.delivery_finished(&d.channel, &status);
                    }
                }
                Ok(None) => tracing::warn!("lease lost before the outcome was recorded; another claim owns it"),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "could not record the outcome; the lease will expire and the delivery will be sent again"
                ),
            }
        }
        .instrument(span)
        .await
    }

    async fn send(
        &self,
        lane: &Lane,
        d: &DeliveryRow,
        incident: &IncidentRow,
        lease_deadline: tokio::time::Instant,
    ) -> Finish {
        let job = Job {
            delivery_id: d.id.clone(),
            channel: lane.channel(),
            phone: d.phone.clone(),
            greeting_ref: d.greeting_ref.clone(),
            text: self.text_for(lane.channel(), d, incident),
        };
        let prepared = lane.client.prepare(&job);
        // Resolved between queueing and now (another replica, the API, Alertmanager): nobody is paged.
        if incident.status != "open" {
            return Finish::Cancelled {
                reason: format!("incident {} before this was sent", incident.status),
            };
        }
        if !lane.live {
            return Finish::Simulated {
                request: prepared.redacted_json(),
            };
        }
        // The request, and the recording of its outcome, must fit in the lease.
        let needed = prepared.timeout + self.settings.dispatch.lease_margin();
        let latest_start = lease_deadline.checked_sub(needed).unwrap_or(lease_deadline);
        match lane.limits.ready(latest_start).await {
            Ready::TooLate { retry_in } => {
                return Finish::Requeue {
                    due_at: now_ms() + retry_in.as_millis() as i64,
                    reason: "the provider's limits would have held it past its lease".to_owned(),
                };
            }
            Ready::Go { waited: false } => {}
            Ready::Go { waited: true } => {
                // It waited: the incident may have been resolved meanwhile, and the lease shortened.
                match self.store.incident(&incident.id).await {
                    Ok(Some(now)) if now.status != "open" => {
                        return Finish::Cancelled {
                            reason: format!(
                                "incident {} while this waited for the provider's limits; not sent",
                                now.status
                            ),
                        };
                    }
                    Ok(_) => {}
                    // Unknown: send rather than drop an alert that may still be needed.
                    Err(e) => tracing::warn!(
                        error = format!("{e:#}"),
                        "could not re-read the incident after waiting; sending"
                    ),
                }
                match self
                    .store
                    .renew_lease(
                        &d.id,
                        d.lease_token.as_deref().unwrap_or_default(),
                        self.lease,
                    )
                    .await
                {
                    Ok(true) => {}
                    // Another claim owns it now: sending could call twice.
                    Ok(false) => {
                        return Finish::Requeue {
                            due_at: now_ms(),
                            reason: "its lease was lost while it waited for the provider's limits"
                                .to_owned(),
                        };
                    }
                    // The database cannot say: hand it back rather than risk a second call.
                    Err(e) => {
                        return Finish::Requeue {
                            due_at: now_ms(),
                            reason: format!(
                                "its lease could not be renewed after waiting for the provider's limits: {e:#}"
                            ),
                        };
                    }
                }
            }
        }
        let started = std::time::Instant::now();
        let outcome = match providers::execute(&self.http, &prepared).await {
            Ok(answer) => lane.client.classify(&answer),
            Err(transport) => transport,
        };
        let label = match &outcome {
            Outcome::Accepted { .. } => "accepted",
            Outcome::Transient { .. } => "transient",
            Outcome::Permanent { .. } => "permanent",
        };
        self.metrics.provider_request(
            lane.channel().as_str(),
            label,
            started.elapsed().as_secs_f64(),
        );
        match outcome {
            Outcome::Accepted {
                provider_id,
                detail,
            } => Finish::Accepted {
                provider_id,
                detail,
                report_due_at: lane
                    .client
                    .reports_outcome()
                    .then(|| now_ms() + (self.settings.dispatch.report_wait_secs * 1000.0) as i64),
            },
            Outcome::Permanent { reason } => Finish::Failed { reason },
            Outcome::Transient {
                reason,
                retry_after,
            } => {
                if let Some(wait) = retry_after {
                    let bounded = wait.min(self.retry.retry_after_max);
                    tracing::warn!(
                        pause_ms = bounded.as_millis() as u64,
                        "provider asked us to slow down"
                    );
                    lane.limits.pause.pause_for(bounded);
                }
                self.after_transient(d, reason, retry_after)
            }
        }
    }

    fn after_transient(
        &self,
        d: &DeliveryRow,
        reason: String,
        retry_after: Option<Duration>,
    ) -> Finish {
        let age = Duration::from_millis((now_ms() - d.created_at).max(0) as u64);
        match self.retry.next_wait(d.attempts as u32, age, retry_after) {
            Some(wait) => Finish::Retry {
                due_at: now_ms() + wait.as_millis() as i64,
                reason,
            },
            None => Finish::Failed {
                reason: format!("gave up after {} attempts; last: {reason}", d.attempts),
            },
        }
    }

    /// The SMS or WhatsApp text from the operator's template.
    fn text_for(&self, channel: Channel, d: &DeliveryRow, incident: &IncidentRow) -> String {
        let m = &self.settings.messages;
        let template = match channel {
            Channel::Call => return String::new(),
            Channel::Sms => &m.sms,
            Channel::Whatsapp => &m.whatsapp,
        };
        let link = incident
            .recording_url
            .as_ref()
            .map(|url| match m.recording_link {
                RecordingLink::Direct => url.clone(),
                RecordingLink::Short => {
                    format!("{}/r/{}", self.settings.public_base(), d.greeting_ref)
                }
            });
        let vars = Vars {
            emergency_type: &incident.emergency_type,
            source: &incident.source,
            caller: incident.caller.as_deref(),
            time_ms: incident.occurred_at.unwrap_or(incident.received_at),
            recording: link.as_deref(),
            message: incident.message.as_deref(),
            incident: &incident.id,
        };
        messages::render(template, &vars, m.utc_offset_minutes)
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
