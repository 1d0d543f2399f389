//! The auditor: every `auditor.every`, one replica checks that each open incident is moving, because the
//! machinery that moves it (the dispatcher, its lease reaper, the report reconciler, the cap's release,
//! the unreached sweep) can stall without failing. What it finds is re-kicked (the dispatcher woken, an
//! expired lease requeued, a held call released, an overdue report given up on, so a call is redialled)
//! or reported loudly; every finding is counted in `/metrics` and listed by `/readyz`. After each clean
//! pass it calls `auditor.heartbeat_url`, so an outside watcher notices when the whole server is gone.
//!
//! One replica at a time: the pass runs on the replica holding the `auditor` job lease (a row judged by
//! the database's clock, renewed each pass, taken over by another replica three periods after its holder
//! stopped). Due times are judged by the store's clock; the passes tick on the process's timers.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use super::AppState;
use crate::domain::now_ms;

/// The job lease's name.
const LEASE: &str = "auditor";
/// A queued delivery due this long ago is not being claimed.
const QUEUED_GRACE_MS: i64 = 120_000;
/// A held call past its due time by this long was not released.
const HELD_GRACE_MS: i64 = 120_000;
/// An open incident past its unreached time by this long was not marked.
const UNREACHED_GRACE_MS: i64 = 60_000;
/// A report overdue at least this long, and at least `dispatch.report_wait_secs`, with no look-up
/// moving its deadline on: the reconciler has stalled.
const REPORT_GRACE_MS: i64 = 120_000;
/// This many calls or messages of one lane waiting past their report deadline: its provider has stopped
/// reporting.
const SILENT_LANE_MIN: i64 = 3;
/// Rows looked at per check and pass: a pass stays short whatever the backlog.
const BATCH: i64 = 200;
/// The heartbeat request's time limit.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// One kind of stall found in a pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `queued_overdue`, `sending_expired`, `report_stalled`, `held_overdue`, `unreached_overdue`,
    /// `provider_silent` or `check_failed`.
    pub kind: &'static str,
    /// How many deliveries, incidents or lanes (at most the batch looked at).
    pub count: usize,
    /// What was found and what was done about it.
    pub detail: String,
}

/// What the auditor of this replica last saw, for `/readyz`.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<Snapshot>,
}

#[derive(Debug, Clone, Default)]
struct Snapshot {
    /// Whether this replica holds the lease (runs the passes).
    auditing: bool,
    /// Wall-clock ms of the last pass and the last clean one (0: never).
    last_pass_at: i64,
    last_clean_pass_at: i64,
    findings: Vec<Finding>,
}

/// The auditor's part of `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// `auditing` (this replica runs the passes), `standby` (another replica does) or `starting`.
    pub role: &'static str,
    pub every_secs: u64,
    /// Seconds since the last pass on this replica; absent before the first.
    pub last_pass_age_secs: Option<f64>,
    /// Seconds since the last pass that found nothing; absent when none has.
    pub last_clean_pass_age_secs: Option<f64>,
    /// True when the last pass found something stalled; `stalls` says what.
    pub stalled: bool,
    pub stalls: Vec<Finding>,
}

impl Status {
    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current view, with ages as of the wall-clock `now_ms`.
    pub fn view(&self, every: Duration, now_ms: i64) -> StatusView {
        let s = self.lock().clone();
        let age = |at: i64| (at > 0).then(|| (now_ms - at).max(0) as f64 / 1000.0);
        StatusView {
            role: match (s.auditing, s.last_pass_at) {
                (true, _) => "auditing",
                (false, 0) => "starting",
                (false, _) => "standby",
            },
            every_secs: every.as_secs(),
            last_pass_age_secs: age(s.last_pass_at),
            last_clean_pass_age_secs: age(s.last_clean_pass_at),
            stalled: !s.findings.is_empty(),
            stalls: s.findings,
        }
    }

    fn standby(&self, at: i64) {
        let mut s = self.lock();
        s.auditing = false;
        s.last_pass_at = at;
        s.findings.clear();
    }

    fn passed(&self, findings: Vec<Finding>, at: i64) {
        let mut s = self.lock();
        s.auditing = true;
        s.last_pass_at = at;
        if findings.is_empty() {
            s.last_clean_pass_at = at;
        }
        s.findings = findings;
    }
}

/// Runs a pass every `auditor.every` until `shutdown` turns true. Errors are findings, never the end
/// of the task.
pub async fn run(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let every = state.settings.auditor.every();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut auditor = Auditor::new(state, every);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        auditor.pass().await;
    }
}

/// One replica's auditor, with what it saw in its previous pass.
struct Auditor {
    state: AppState,
    every: Duration,
    /// This replica's name in the job lease.
    owner: String,
    http: reqwest::Client,
    /// Overdue queued deliveries seen in the previous pass: seen again, the wake-up did not help.
    seen_queued: HashSet<String>,
    /// Unreached incidents already given an event.
    seen_unreached: HashSet<String>,
}

impl Auditor {
    fn new(state: AppState, every: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(HEARTBEAT_TIMEOUT)
            .user_agent(concat!("exotel-sos/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Auditor {
            state,
            every,
            owner: format!("auditor-{}", uuid::Uuid::new_v4().simple()),
            http,
            seen_queued: HashSet::new(),
            seen_unreached: HashSet::new(),
        }
    }

    /// Wakes this replica's dispatcher and, on PostgreSQL, every other replica's: the one that should
    /// be claiming the work may be elsewhere.
    async fn wake(&self) {
        self.state.wake.notify_one();
        if let Err(e) = self.state.store.wake_replicas().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "auditor: waking the other replicas failed"
            );
        }
    }

    /// One pass, if this replica holds the lease: every check, then the figures, then the heartbeat.
    async fn pass(&mut self) {
        // Three periods: a replica that stopped is replaced within them, a slow pass keeps its lease.
        let lease = (self.every * 3).max(Duration::from_secs(3));
        match self
            .state
            .store
            .take_job_lease(LEASE, &self.owner, lease)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                self.state.auditor.standby(now_ms());
                return;
            }
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "auditor: cannot take its lease; this pass is skipped and not clean"
                );
                let failed = vec![failed("lease", &e)];
                self.state.metrics.auditor_pass(&counts(&failed), now_ms());
                self.state.auditor.passed(failed, now_ms());
                return;
            }
        }
        let mut findings = Vec::new();
        self.queued(&mut findings).await;
        self.sending(&mut findings).await;
        self.reports(&mut findings).await;
        self.held(&mut findings).await;
        self.unreached(&mut findings).await;
        self.lanes(&mut findings).await;
        if let Err(e) = self.state.store.prune_call_placements().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "auditor: pruning old call placements failed"
            );
        }
        let at = now_ms();
        self.state.metrics.auditor_pass(&counts(&findings), at);
        let clean = findings.is_empty();
        self.state.auditor.passed(findings, at);
        if clean {
            self.heartbeat().await;
        }
    }

    /// Queued deliveries well past their due time (also escalation steps, which are queued with their
    /// tier's due time): the dispatcher is woken; seen again on the next pass, it is not claiming.
    async fn queued(&mut self, findings: &mut Vec<Finding>) {
        let store = &self.state.store;
        let now = store.now_ms();
        let rows = match store.overdue_queued(now - QUEUED_GRACE_MS, BATCH).await {
            Ok(rows) => rows,
            Err(e) => return findings.push(failed("queued", &e)),
        };
        let ids: HashSet<String> = rows.iter().map(|r| r.id.clone()).collect();
        if rows.is_empty() {
            self.seen_queued = ids;
            return;
        }
        self.wake().await;
        let oldest = rows.iter().map(|r| r.due_at).min().unwrap_or(now);
        let late_s = (now - oldest) / 1000;
        let again: Vec<&String> = ids.intersection(&self.seen_queued).collect();
        let fresh: Vec<String> = ids.difference(&self.seen_queued).cloned().collect();
        let detail = format!(
            "due more than {} s ago (the oldest {late_s} s) and not claimed by any dispatcher; the \
             dispatcher was woken",
            QUEUED_GRACE_MS / 1000
        );
        if let Err(e) = store
            .record_events(&fresh, "audit", &format!("auditor: {detail}"))
            .await
        {
            tracing::warn!(error = format!("{e:#}"), "auditor: recording events failed");
        }
        if again.is_empty() {
            tracing::warn!(
                deliveries = rows.len(),
                oldest_late_secs = late_s,
                "auditor: queued deliveries overdue; dispatcher woken"
            );
        } else {
            tracing::error!(
                deliveries = rows.len(),
                still_overdue = again.len(),
                oldest_late_secs = late_s,
                "auditor: queued deliveries still overdue after a wake-up: no dispatcher is claiming \
                 (dispatch.enabled off on every replica, a paused provider, or a stuck dispatcher)"
            );
        }
        findings.push(Finding {
            kind: "queued_overdue",
            count: rows.len(),
            detail: format!("{} queued deliveries {detail}", rows.len()),
        });
        self.seen_queued = ids;
    }

    /// Deliveries still `sending` well after their lease ran out: the reaper should have requeued them.
    /// They are requeued now (or failed, after too many lost leases), each with its event.
    async fn sending(&self, findings: &mut Vec<Finding>) {
        let store = &self.state.store;
        let dispatch = &self.state.settings.dispatch;
        let slack = Duration::from_millis(dispatch.poll_interval_ms.saturating_mul(3).max(1000));
        let ids = match store.expired_sending(slack, BATCH).await {
            Ok(ids) if ids.is_empty() => return,
            Ok(ids) => ids,
            Err(e) => return findings.push(failed("sending", &e)),
        };
        let detail = format!(
            "still sending more than {} s after its lease ran out (no dispatcher reaped it)",
            slack.as_secs()
        );
        if let Err(e) = store
            .record_events(&ids, "audit", &format!("auditor: {detail}; requeued"))
            .await
        {
            tracing::warn!(error = format!("{e:#}"), "auditor: recording events failed");
        }
        let moved = match store.requeue_expired_leases(dispatch.max_attempts).await {
            Ok(moved) => moved.len(),
            Err(e) => return findings.push(failed("sending", &e)),
        };
        self.wake().await;
        tracing::error!(
            deliveries = ids.len(),
            requeued = moved,
            "auditor: deliveries stuck in sending past their lease; requeued"
        );
        findings.push(Finding {
            kind: "sending_expired",
            count: ids.len(),
            detail: format!("{} deliveries {detail}; {moved} requeued", ids.len()),
        });
    }

    /// Accepted calls and messages whose report deadline passed long ago with no look-up: the report
    /// reconciler has stalled. Their deadline is taken as passed now: a call counts as not reached and
    /// is redialled while redials remain, a message ends unconfirmed (a late report still settles it).
    async fn reports(&self, findings: &mut Vec<Finding>) {
        let store = &self.state.store;
        let settings = &self.state.settings;
        let grace = ((settings.dispatch.report_wait_secs * 1000.0) as i64).max(REPORT_GRACE_MS);
        let now = store.now_ms();
        let rows = match store.stalled_reports(now - grace, BATCH).await {
            Ok(rows) if rows.is_empty() => return,
            Ok(rows) => rows,
            Err(e) => return findings.push(failed("reports", &e)),
        };
        // The reason keeps "no status report": a late success report looks for it.
        let why = format!(
            "no status report, and none looked up for {} s past its deadline (the report reconciler \
             has stalled; found by the auditor)",
            grace / 1000
        );
        let mut ended = 0;
        for d in &rows {
            match store
                .report_deadline_passed(d, settings.redial_policy(), &why)
                .await
            {
                Ok(crate::store::CallbackEffect::Applied { from, to }) => {
                    ended += 1;
                    self.state.metrics.delivery_moved(d.channel, from, to, true);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(delivery_id = %d.id, error = format!("{e:#}"), "auditor: ending an overdue report failed")
                }
            }
        }
        self.wake().await;
        tracing::error!(
            deliveries = rows.len(),
            ended,
            "auditor: accepted deliveries far past their report deadline; deadline applied"
        );
        findings.push(Finding {
            kind: "report_stalled",
            count: rows.len(),
            detail: format!(
                "{} accepted deliveries without a report or look-up for {} s past their deadline; \
                 {ended} ended (calls redialled where redials remain)",
                rows.len(),
                grace / 1000
            ),
        });
    }

    /// Calls held by the cap well past their due time: nothing released them. Released now.
    async fn held(&self, findings: &mut Vec<Finding>) {
        let store = &self.state.store;
        let why = format!(
            "auditor: held more than {} s past its due time (nothing released it); queued again",
            HELD_GRACE_MS / 1000
        );
        let moved = match store
            .release_held(store.now_ms() - HELD_GRACE_MS, &why)
            .await
        {
            Ok(moved) if moved.is_empty() => return,
            Ok(moved) => moved,
            Err(e) => return findings.push(failed("held", &e)),
        };
        self.wake().await;
        tracing::error!(
            calls = moved.len(),
            "auditor: held calls past their due time; released"
        );
        findings.push(Finding {
            kind: "held_overdue",
            count: moved.len(),
            detail: format!(
                "{} calls held by the carrier-safe cap more than {} s past their due time; released",
                moved.len(),
                HELD_GRACE_MS / 1000
            ),
        });
    }

    /// Open incidents past their unreached time (the escalation policy exhausted, or `ack.deadline`)
    /// by more than a minute and still not marked unreached: the unreached sweep has stalled, and nobody
    /// has been alarmed. Reported (each incident once on its trail), not acted on: the alarm is the
    /// sweep's.
    async fn unreached(&mut self, findings: &mut Vec<Finding>) {
        let store = &self.state.store;
        let ids = match store
            .overdue_unreached(store.now_ms() - UNREACHED_GRACE_MS, BATCH)
            .await
        {
            Ok(ids) => ids,
            Err(e) => return findings.push(failed("unreached", &e)),
        };
        self.seen_unreached.retain(|id| ids.contains(id));
        if ids.is_empty() {
            return;
        }
        let detail = format!(
            "open, nobody acknowledged, more than {} s past its unreached time and not marked \
             unreached: the unreached sweep has stalled and nobody was alarmed",
            UNREACHED_GRACE_MS / 1000
        );
        for id in &ids {
            if self.seen_unreached.contains(id) {
                continue;
            }
            match store
                .record_incident_event(id, "audit", &format!("auditor: {detail}"))
                .await
            {
                Ok(()) => {
                    self.seen_unreached.insert(id.clone());
                }
                Err(e) => {
                    tracing::warn!(incident_id = %id, error = format!("{e:#}"), "auditor: recording an event failed")
                }
            }
        }
        tracing::error!(
            incidents = ids.len(),
            "auditor: incidents past their unreached time are not marked unreached"
        );
        findings.push(Finding {
            kind: "unreached_overdue",
            count: ids.len(),
            detail: format!("{} incidents {detail}", ids.len()),
        });
    }

    /// Lanes whose provider stopped reporting: several of their calls or messages wait past their
    /// report deadline at once. Reported: the reconciler looks them up, and gives up on them in time.
    async fn lanes(&self, findings: &mut Vec<Finding>) {
        let store = &self.state.store;
        let now = store.now_ms();
        let lanes = match store.silent_lanes(now, SILENT_LANE_MIN).await {
            Ok(lanes) => lanes,
            Err(e) => return findings.push(failed("lanes", &e)),
        };
        for lane in lanes {
            let since_s = (now - lane.since).max(0) / 1000;
            tracing::error!(
                lane = %lane.provider,
                waiting = lane.waiting,
                since_secs = since_s,
                "auditor: a provider has stopped reporting: its calls or messages wait past their report deadline"
            );
            findings.push(Finding {
                kind: "provider_silent",
                count: lane.waiting as usize,
                detail: format!(
                    "{}: {} calls or messages accepted and waiting past their report deadline (the \
                     oldest for {since_s} s): the provider has stopped reporting or answering look-ups",
                    lane.provider, lane.waiting
                ),
            });
        }
    }

    /// Tells the outside watcher this pass was clean. Its failure is logged, never fatal; the URL
    /// (which usually carries the check's secret) is not.
    async fn heartbeat(&self) {
        let url = self.state.settings.auditor.heartbeat_url.trim();
        if url.is_empty() {
            return;
        }
        match self.http.get(url).send().await {
            Ok(res) if res.status().is_success() => {}
            Ok(res) => tracing::warn!(
                status = res.status().as_u16(),
                "auditor: the heartbeat URL refused the clean pass"
            ),
            Err(e) => tracing::warn!(
                error = %e.without_url(),
                "auditor: the heartbeat URL could not be reached"
            ),
        }
    }
}

/// A check that could not run: the pass is not clean (and sends no heartbeat).
fn failed(check: &str, e: &anyhow::Error) -> Finding {
    tracing::error!(check, error = format!("{e:#}"), "auditor: a check failed");
    Finding {
        kind: "check_failed",
        count: 1,
        detail: format!("the {check} check could not run: {e:#}"),
    }
}

/// (kind, count) of each finding, for the metrics; the same kind twice adds up.
fn counts(findings: &[Finding]) -> Vec<(&'static str, usize)> {
    findings.iter().map(|f| (f.kind, f.count)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_says_who_audits_and_what_is_stalled() {
        let status = Status::default();
        let every = Duration::from_secs(30);
        let v = status.view(every, 10_000);
        assert_eq!(v.role, "starting");
        assert!(!v.stalled && v.last_pass_age_secs.is_none());

        status.passed(Vec::new(), 10_000);
        let v = status.view(every, 12_500);
        assert_eq!(v.role, "auditing");
        assert_eq!(v.last_clean_pass_age_secs, Some(2.5));
        assert!(!v.stalled);

        let stuck = Finding {
            kind: "queued_overdue",
            count: 3,
            detail: "3 queued deliveries".to_owned(),
        };
        status.passed(vec![stuck.clone()], 20_000);
        let v = status.view(every, 20_000);
        assert!(v.stalled);
        assert_eq!(v.stalls, vec![stuck]);
        // The last clean pass is the earlier one.
        assert_eq!(v.last_clean_pass_age_secs, Some(10.0));

        // Another replica took the lease: this one stands by and reports nothing stale.
        status.standby(21_000);
        let v = status.view(every, 21_000);
        assert_eq!(v.role, "standby");
        assert!(!v.stalled && v.stalls.is_empty());
    }

    #[test]
    fn findings_are_counted_by_kind() {
        let f = |kind, count| Finding {
            kind,
            count,
            detail: String::new(),
        };
        assert_eq!(
            counts(&[f("held_overdue", 2), f("provider_silent", 4)]),
            vec![("held_overdue", 2), ("provider_silent", 4)]
        );
    }
}
