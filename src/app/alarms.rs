//! Alarms: the sweep that marks incidents nobody acknowledged in time as unreached and alarms the
//! `[unreached]` teams, the sender that alarms the teams of an account alarm and POSTs every alarm to
//! `alarms.webhook_url`, and the watch on bursts of bad webhook tokens: Exotel's page people,
//! strangers' (scanners) are counted and reported only.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinSet;

use super::AppState;
use crate::dispatch::retry::RetryPolicy;
use crate::domain::message_kind::MessageKind;
use crate::domain::{Channel, Report, ReportOutcome};
use crate::providers::AccountProblem;
use crate::store::alarms::{AccountAlarm, AlarmTarget, DueAlarm, Raised, Tried, UnnotifiedAlarm};

/// How long one webhook POST may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Webhook POSTs one process has in flight at once: a receiver that hangs on one alarm holds only its
/// own POST, not the ones queued behind it, and one that is struggling gets a few requests at a time,
/// not a flood.
pub const WEBHOOK_CONCURRENCY: usize = 4;
/// The lease on an alarm being POSTed (each is POSTed on its own): several times one POST that runs
/// into [`WEBHOOK_TIMEOUT`] and the write of its outcome, so a slow receiver never lets another replica
/// claim and send it again, and an alarm left by a process that died is sent again within a minute.
const LEASE_MS: i64 = 60_000;
/// Wrong tokens on Exotel's webhooks within [`TOKEN_BURST_WINDOW_MS`] that raise an account alarm:
/// Exotel calling with an old token after a change looks like this, and every status callback and
/// keypress is then lost.
pub const TOKEN_BURST: usize = 5;
/// See [`TOKEN_BURST`].
pub const TOKEN_BURST_WINDOW_MS: i64 = 60_000;
/// The lane name of account alarms about our own webhooks.
pub const WEBHOOK_LANE: &str = "webhook";
/// How often refused requests of strangers are logged at most: a scanner sends thousands.
pub const STRANGER_LOG_EVERY_MS: i64 = 60_000;
/// The reason of the report of a burst of strangers' wrong tokens (a scanner): never paged.
pub const SCANNER_REASON: &str = "webhook_scanner";

/// Who a request to one of Exotel's webhooks looks like it came from, judged at the edge from its
/// parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// Exotel for this account: a CallSid of Exotel's form, to one of our numbers. A burst of wrong
    /// tokens from it pages people: real emergencies are being refused.
    Exotel,
    /// Anything else (a scanner): refused, counted, logged at most once a minute and reported, never
    /// paged, since anyone on the internet can send it.
    Stranger,
}

/// The `[unreached]` contacts of the current routing, each on every channel they have that a
/// provider lane sends, leaving out `avoid` (the channels of a failing lane or provider account)
/// unless nothing else is left.
pub fn alarm_targets(state: &AppState, avoid: &[Channel]) -> Vec<AlarmTarget> {
    let Some(plan) = state.routing.current().unreached_plan() else {
        return Vec::new();
    };
    let all: Vec<AlarmTarget> = plan
        .targets
        .iter()
        .filter_map(|t| {
            let lane = state.providers.for_channel(t.channel)?;
            Some(AlarmTarget {
                contact_name: t.contact_name.clone(),
                phone: t.phone.e164().to_owned(),
                channel: t.channel,
                provider: lane.name.clone(),
            })
        })
        .collect();
    let others: Vec<AlarmTarget> = all
        .iter()
        .filter(|t| !avoid.contains(&t.channel))
        .cloned()
        .collect();
    if others.is_empty() {
        all
    } else {
        others
    }
}

/// Marks every due incident unreached, every second, until `shutdown` turns true. Errors are logged
/// and retried on the next round.
pub async fn unreached_sweep(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        if let Err(e) = mark_unreached(&state).await {
            tracing::warn!(error = format!("{e:#}"), "unreached sweep failed");
        }
    }
}

/// One round of the sweep: how many incidents this round marked.
pub async fn mark_unreached(state: &AppState) -> anyhow::Result<usize> {
    let due = state.store.due_unreached().await?;
    if due.is_empty() {
        return Ok(0);
    }
    let webhook = !state.settings.alarms.webhook_url.trim().is_empty();
    let base = state.settings.public_base().to_owned();
    let mut marked = 0;
    for id in due {
        let Some(incident) = state.store.incident(&id).await? else {
            continue;
        };
        let targets = alarm_targets(state, &[]);
        let body = |tried: &[Tried], now: i64| {
            let summary = format!(
                "Nobody acknowledged the {} emergency (incident {}) in time: {} delivery(ies) tried",
                incident.emergency_type,
                incident.id,
                tried.len()
            );
            let json = serde_json::json!({
                "type": "unreached",
                "kind": "unreached",
                "incident_id": incident.id,
                "emergency_type": incident.emergency_type,
                "source": incident.source,
                "message": incident.message,
                "received_at": incident.received_at,
                "unreached_at": now,
                "summary": summary,
                "tried": tried,
                "console": format!("{base}/console/incidents/{}", incident.id),
                "api": format!("{base}/api/v1/incidents/{}", incident.id),
            });
            (summary, json)
        };
        match state
            .store
            .mark_unreached(&id, &targets, webhook, body)
            .await
        {
            Ok(Some(m)) => {
                marked += 1;
                state.metrics.incident_unreached();
                if targets.is_empty() {
                    tracing::error!(
                        incident_id = %id,
                        "UNREACHED: nobody acknowledged in time, and the stakeholder file has no [unreached] teams to alarm"
                    );
                } else {
                    tracing::error!(
                        incident_id = %id,
                        alarms = m.deliveries,
                        webhook = m.webhook,
                        "UNREACHED: nobody acknowledged in time; the [unreached] teams are alarmed"
                    );
                }
                state.wake.notify_one();
                state.alarm_watch.wake.notify_one();
            }
            // Acknowledged, resolved or marked by another replica meanwhile.
            Ok(None) => {}
            Err(e) => tracing::warn!(
                incident_id = %id,
                error = format!("{e:#}"),
                "could not mark the incident unreached; trying again next round"
            ),
        }
    }
    Ok(marked)
}

/// Sends the alarm outbox, every second and whenever an alarm is raised, until `shutdown` turns true:
/// account alarms are carried to the `[unreached]` teams, and every alarm due is POSTed to
/// `alarms.webhook_url` when one is set. The POSTs run beside the loop, at most
/// [`WEBHOOK_CONCURRENCY`] at once, each with its own retry: paging people never waits for the webhook,
/// and one alarm the receiver hangs on holds no other.
pub async fn alarm_sender(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let retry = match RetryPolicy::from_settings(&state.settings.dispatch) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "alarm sender not started: bad retry settings"
            );
            return;
        }
    };
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(WEBHOOK_TIMEOUT)
        .user_agent(concat!("exotel-sos/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "alarm sender not started: no HTTP client");
            return;
        }
    };
    let sender = WebhookSender {
        http,
        owner: format!("alarms-{}", uuid::Uuid::new_v4().simple()),
        retry,
    };
    let mut posts: JoinSet<()> = JoinSet::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = state.alarm_watch.wake.notified() => {}
            // A POST ended: its slot takes the next alarm due at once.
            Some(ended) = posts.join_next(), if !posts.is_empty() => post_ended(ended),
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            // The POSTs in flight are cut short and their alarms handed back, due at once: the next
            // process (or another replica) sends them without waiting out the lease.
            posts.shutdown().await;
            if let Err(e) = state.store.release_alarms(&sender.owner).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "could not hand back the alarms being POSTed on stopping"
                );
            }
            return;
        }
        while let Some(ended) = posts.try_join_next() {
            post_ended(ended);
        }
        if let Err(e) = notify_account_alarms(&state).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not alarm the [unreached] teams of an account alarm"
            );
        }
        if let Err(e) = sender.start_due(&state, &mut posts).await {
            tracing::warn!(error = format!("{e:#}"), "alarm webhook round failed");
        }
    }
}

/// Carries each new account alarm to the `[unreached]` teams (on the channels not affected, where
/// possible); how many.
pub async fn notify_account_alarms(state: &AppState) -> anyhow::Result<usize> {
    let alarms = state.store.unnotified_account_alarms().await?;
    let mut done = 0;
    for alarm in alarms {
        let avoid = alarm
            .lane
            .as_deref()
            .map(|scope| avoided_channels(state, scope))
            .unwrap_or_default();
        let targets = alarm_targets(state, &avoid);
        if let Some(incident_id) = notify_one(state, &alarm, &targets).await? {
            tracing::warn!(
                incident_id = %incident_id,
                alarms = targets.len(),
                "account alarm carried to the [unreached] teams"
            );
            state.wake.notify_one();
            done += 1;
        }
    }
    Ok(done)
}

/// The channels an account alarm about `scope` must not go through: the lane's own, or every lane's
/// of the provider account (an Exotel outage alarms through WhatsApp, not Exotel's SMS).
fn avoided_channels(state: &AppState, scope: &str) -> Vec<Channel> {
    state
        .providers
        .lanes()
        .iter()
        .filter(|l| l.name == scope || l.account == scope)
        .map(|l| l.channel())
        .collect()
}

async fn notify_one(
    state: &AppState,
    alarm: &UnnotifiedAlarm,
    targets: &[AlarmTarget],
) -> anyhow::Result<Option<String>> {
    state.store.notify_account_alarm(alarm, targets).await
}

/// A POST task that panicked (a bug) leaves its alarm under lease: it is POSTed again when the lease
/// runs out. Said loudly, as a stopped background task is.
fn post_ended(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        if e.is_panic() {
            tracing::error!(why = %e, "an alarm webhook POST panicked; its alarm is POSTed again when its lease runs out");
        }
    }
}

/// What POSTs the alarms: one per process, shared by its POST tasks.
#[derive(Clone)]
struct WebhookSender {
    http: reqwest::Client,
    /// Holds the leases of this process's alarms being POSTed.
    owner: String,
    retry: RetryPolicy,
}

impl WebhookSender {
    /// Claims as many due alarms as there are free slots beside the POSTs in flight (`posts`), and
    /// starts a POST for each; how many were started.
    async fn start_due(&self, state: &AppState, posts: &mut JoinSet<()>) -> anyhow::Result<usize> {
        if state.settings.alarms.webhook_url.trim().is_empty() {
            return Ok(0);
        }
        let free = WEBHOOK_CONCURRENCY.saturating_sub(posts.len());
        if free == 0 {
            return Ok(0);
        }
        let due = state
            .store
            .claim_due_alarms(&self.owner, LEASE_MS, free)
            .await?;
        let started = due.len();
        for alarm in due {
            let (sender, state) = (self.clone(), state.clone());
            posts.spawn(async move { sender.post_one(&state, alarm).await });
        }
        Ok(started)
    }

    /// POSTs one alarm and records what came of it: sent, due again later, or given up on. The task
    /// ends only once the outcome is written, so the slot it frees is never taken while its alarm still
    /// looks in flight.
    async fn post_one(&self, state: &AppState, alarm: DueAlarm) {
        let url = state.settings.alarms.webhook_url.trim();
        let written = match post(&self.http, url, &alarm).await {
            Ok(()) => {
                tracing::info!(alarm_id = %alarm.id, kind = %alarm.kind, "alarm webhook took the alarm");
                state.store.alarm_sent(&alarm.id, &self.owner).await
            }
            Err((error, again, retry_after)) => {
                let age =
                    Duration::from_millis((state.store.now_ms() - alarm.raised_at).max(0) as u64);
                let due_at = again
                    .then(|| {
                        self.retry
                            .next_wait(alarm.attempts as u32, age, retry_after)
                    })
                    .flatten()
                    .map(|w| state.store.now_ms() + w.as_millis() as i64);
                tracing::warn!(
                    alarm_id = %alarm.id,
                    attempt = alarm.attempts,
                    error = %error,
                    retry = due_at.is_some(),
                    "alarm webhook did not take the alarm"
                );
                state
                    .store
                    .alarm_failed(&alarm.id, &self.owner, &error, due_at)
                    .await
            }
        };
        // Its lease runs out and the alarm is POSTed again: a duplicate is better than a lost alarm.
        if let Err(e) = written {
            tracing::warn!(
                alarm_id = %alarm.id,
                error = format!("{e:#}"),
                "could not record the alarm webhook's answer; the alarm is POSTed again when its lease runs out"
            );
        }
    }
}

/// One POST: `Ok` on 2xx; else the reason, whether another try may help (timeouts, 408, 425, 429,
/// 5xx; any other 4xx will be refused the same way) and the receiver's `Retry-After`.
async fn post(
    http: &reqwest::Client,
    url: &str,
    alarm: &DueAlarm,
) -> Result<(), (String, bool, Option<Duration>)> {
    let res = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(alarm.body.clone())
        .send()
        .await
        // The error's text holds the URL, which may hold the receiver's secret: keep only its kind.
        .map_err(|e| {
            let what = if e.is_timeout() {
                "no answer in time"
            } else if e.is_connect() {
                "connection failed"
            } else {
                "request failed"
            };
            (what.to_owned(), true, None)
        })?;
    let status = res.status().as_u16();
    if res.status().is_success() {
        return Ok(());
    }
    let retry_after = res
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::providers::parse_retry_after);
    let again = matches!(status, 408 | 425 | 429 | 500..=599);
    Err((format!("HTTP {status}"), again, retry_after))
}

/// What this process watches outside the dispatcher: wrong webhook tokens seen lately on Exotel's
/// webhooks (a burst from Exotel raises an account alarm; strangers' are counted and reported).
#[derive(Debug, Default)]
pub struct AlarmWatch {
    failures: Mutex<VecDeque<i64>>,
    token_raised: AtomicBool,
    /// Set by the first good token of this process, which clears a token alarm left open by an
    /// earlier run.
    token_seen_good: AtomicBool,
    /// Our numbers (`exotel.inbound_numbers` and `exotel.caller_id`), E.164: a request with a wrong
    /// token that names none of them is a stranger's.
    ours: Vec<crate::domain::Phone>,
    strangers: Mutex<Strangers>,
    /// Wakes this process's alarm sender when an alarm is raised, rather than at its next second.
    pub wake: tokio::sync::Notify,
}

/// Requests of strangers refused in this process.
#[derive(Debug, Default)]
struct Strangers {
    refused: u64,
    last_at: Option<i64>,
    logged_at: Option<i64>,
    unlogged: u64,
    /// Those with a token within [`TOKEN_BURST_WINDOW_MS`], while no report is due.
    burst: VecDeque<i64>,
    reported_at: Option<i64>,
}

/// What to do about one refused request of a stranger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrangerNote {
    /// Log now, with how many were refused since the last line.
    pub log: Option<u64>,
    /// Report the burst this one completes.
    pub report: bool,
}

/// Strangers' refused requests as `/readyz` shows them.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StrangersView {
    /// Requests to `/exotel/*` refused for their token since this process started, that did not
    /// look like Exotel's for this account.
    pub refused: u64,
    /// When the last one came (ms since the epoch).
    pub last_at: Option<i64>,
}

impl AlarmWatch {
    /// A watch that knows our numbers (`exotel.inbound_numbers` and `exotel.caller_id`).
    pub fn with_numbers(ours: Vec<crate::domain::Phone>) -> Self {
        AlarmWatch {
            ours,
            ..AlarmWatch::default()
        }
    }

    /// Whether any number of ours is known: without one, every wrong token is a stranger's.
    pub fn knows_numbers(&self) -> bool {
        !self.ours.is_empty()
    }

    /// Whether `phone` is one of our numbers.
    pub fn is_ours(&self, phone: &crate::domain::Phone) -> bool {
        self.ours.contains(phone)
    }

    /// Notes a stranger's refused request at `now` (`with_token`: it carried one, a wrong one).
    pub fn stranger(&self, now: i64, with_token: bool) -> StrangerNote {
        let mut note = StrangerNote {
            log: None,
            report: false,
        };
        let Ok(mut s) = self.strangers.lock() else {
            return note;
        };
        s.refused += 1;
        s.unlogged += 1;
        s.last_at = Some(now);
        if s.logged_at
            .is_none_or(|at| now - at >= STRANGER_LOG_EVERY_MS)
        {
            note.log = Some(s.unlogged);
            s.unlogged = 0;
            s.logged_at = Some(now);
        }
        let cooled = s
            .reported_at
            .is_none_or(|at| now - at >= crate::store::alarms::ACCOUNT_COOLDOWN_MS);
        if with_token && cooled {
            s.burst.push_back(now);
            while s
                .burst
                .front()
                .is_some_and(|&t| t <= now - TOKEN_BURST_WINDOW_MS)
            {
                s.burst.pop_front();
            }
            if s.burst.len() >= TOKEN_BURST {
                s.burst.clear();
                s.reported_at = Some(now);
                note.report = true;
            }
        }
        note
    }

    /// Strangers' refused requests so far.
    pub fn strangers(&self) -> StrangersView {
        match self.strangers.lock() {
            Ok(s) => StrangersView {
                refused: s.refused,
                last_at: s.last_at,
            },
            Err(_) => StrangersView {
                refused: 0,
                last_at: None,
            },
        }
    }

    /// Notes a bad token at `now`: true when this one completes a burst not alarmed yet.
    pub fn failed(&self, now: i64) -> bool {
        let Ok(mut f) = self.failures.lock() else {
            return false;
        };
        f.push_back(now);
        while f.front().is_some_and(|&t| t <= now - TOKEN_BURST_WINDOW_MS) {
            f.pop_front();
        }
        f.len() >= TOKEN_BURST && !self.token_raised.swap(true, Ordering::Relaxed)
    }

    /// Notes a good token: true when a burst had been alarmed (the caller clears the alarm).
    pub fn succeeded(&self) -> bool {
        let first = !self.token_seen_good.swap(true, Ordering::Relaxed);
        if !self.token_raised.load(Ordering::Relaxed) {
            return first;
        }
        if let Ok(mut f) = self.failures.lock() {
            f.clear();
        }
        self.token_raised.swap(false, Ordering::Relaxed)
    }
}

/// Raises the account alarm of `problem` seen on `lane` of provider `account` (once per key, across
/// replicas; see [`crate::dispatch::account::account_alarm`]), beside the caller: the write never
/// holds up a webhook's answer.
pub fn raise_account(
    state: &AppState,
    lane: &str,
    account: &str,
    problem: AccountProblem,
    template: Option<String>,
) {
    let alarm = crate::dispatch::account::account_alarm(
        lane,
        account,
        &problem,
        template.as_deref(),
        state.settings.public_base(),
        state.store.now_ms(),
    );
    let webhook = !state.settings.alarms.webhook_url.trim().is_empty();
    let state = state.clone();
    tokio::spawn(async move {
        match state.store.raise_account_alarm(&alarm, webhook).await {
            Ok(raised @ (Raised::Paged | Raised::CooledDown)) => {
                state.metrics.account_alarm(&alarm.lane, problem.reason);
                if raised == Raised::Paged {
                    state.alarm_watch.wake.notify_one();
                }
                tracing::error!(
                    scope = %alarm.lane,
                    reason = problem.reason,
                    paged = raised == Raised::Paged,
                    detail = %crate::domain::mask_numbers(&problem.detail),
                    "ACCOUNT ALARM: every later alert through it will fail too"
                );
            }
            Ok(Raised::AlreadyOpen) => {}
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                scope = %alarm.lane,
                reason = problem.reason,
                "could not record the account alarm"
            ),
        }
    });
}

/// Clears the account alarm of `key` (after `account:`) beside the caller.
fn clear_key(state: &AppState, key: String) {
    let store = state.store.clone();
    tokio::spawn(async move {
        match store.clear_account_alarm_key(&key).await {
            Ok(0) => {}
            Ok(_) => tracing::warn!(alarm = %key, "account alarm cleared: it works again"),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                alarm = %key,
                "could not clear the account alarm"
            ),
        }
    });
}

/// The DLT template id the SMS `sms_sid` was sent with, from its purpose and its incident's source
/// (which pick its message kind); `None` when it is not ours or cannot be read. A report can come
/// before the SMS's provider id is committed (outcomes are committed in batches): it is given three
/// seconds, as the report itself is.
async fn sms_template(state: &AppState, sms_sid: &str) -> Option<String> {
    let mut found = None;
    for _ in 0..30 {
        match state.store.sms_kind(sms_sid).await {
            Ok(Some(kind)) => {
                found = Some(kind);
                break;
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot read which SMS this report is about"
                );
                return None;
            }
        }
    }
    let (purpose, source) = found?;
    let kind = MessageKind::for_delivery(purpose, source);
    Some(state.settings.message_kind(kind).dlt_template_id)
}

/// Called with each SMS status report of `lane` (provider `account`), beside the request: a DLT block
/// of the sender raises the `dlt_sender` alarm, of the template the `dlt_template` alarm of that
/// template id. A delivered SMS clears the sender alarm, and the template alarm of its own template
/// only: an SMS of another kind (another template) delivered says nothing of a blocked one. The usual
/// delivered report costs one read (no DLT alarm open) and no write.
pub fn sms_reported(state: &AppState, lane: &str, account: &str, report: &Report) {
    let problem = report.account_problem.clone();
    let delivered = report.outcome == ReportOutcome::Delivered;
    if !delivered && problem.is_none() {
        return;
    }
    let state = state.clone();
    let (lane, account, sms_sid) = (
        lane.to_owned(),
        account.to_owned(),
        report.provider_id.clone(),
    );
    tokio::spawn(async move {
        if let Some(problem) = problem {
            let template = if problem.reason == "dlt_template" {
                sms_template(&state, &sms_sid).await
            } else {
                None
            };
            raise_account(&state, &lane, &account, problem, template);
            return;
        }
        let open = match state.store.open_dlt_alarms(&lane).await {
            Ok(open) => open,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "cannot read the open DLT alarms");
                return;
            }
        };
        if open.is_empty() {
            return;
        }
        let mut template = None;
        for (key, reason) in open {
            if reason == "dlt_template" {
                if template.is_none() {
                    template = Some(sms_template(&state, &sms_sid).await);
                }
                let Some(Some(t)) = &template else { continue };
                let t = if t.trim().is_empty() { "-" } else { t.trim() };
                if key != format!("{lane}:dlt_template:{t}") {
                    continue;
                }
            }
            clear_key(&state, key);
        }
    });
}

/// Called with each token check of an Exotel webhook (`/exotel/*`): a burst of requests from
/// [`Sender::Exotel`] carrying a token that does not match raises the `webhook_token` account alarm
/// once; the next good one clears it. A request without a token is a scanner, not a changed token:
/// refused, never counted toward it. A [`Sender::Stranger`]'s refusal is counted and logged here, at
/// most once a minute, and a burst of them with a token is reported, not paged (see
/// [`report_scanners`]). Other webhooks (GupShup's) neither raise nor clear it. The writes run beside
/// the request.
pub fn token_checked(state: &AppState, given: Option<&str>, ok: bool, sender: Sender) {
    let watch = &state.alarm_watch;
    if ok {
        if watch.succeeded() {
            clear_key(state, format!("{WEBHOOK_LANE}:webhook_token"));
        }
        return;
    }
    let tokenless = given.is_none_or(|t| t.trim().is_empty());
    let now = state.store.now_ms();
    if sender == Sender::Stranger {
        let note = watch.stranger(now, !tokenless);
        if let Some(refused) = note.log {
            tracing::warn!(
                refused,
                "requests to Exotel's webhooks with a missing or wrong token that do not look like \
                 Exotel's for this account (a CallSid of its form, to exotel.inbound_numbers or \
                 exotel.caller_id): refused, nobody paged; logged at most once a minute"
            );
        }
        if note.report {
            report_scanners(state);
        }
        return;
    }
    // A request that looks like Exotel's for this account without any token counts too: a flow URL
    // saved without `?token=` refuses every emergency exactly as an old token does.
    if !watch.failed(now) {
        return;
    }
    raise_account(
        state,
        WEBHOOK_LANE,
        WEBHOOK_LANE,
        AccountProblem {
            reason: "webhook_token",
            detail: format!(
                "{TOKEN_BURST} or more requests to Exotel's webhooks with a wrong or missing token within \
                 {}s: was server.webhook_token changed without updating the Exotel flow's URLs, or a URL \
                 saved without its ?token=?",
                TOKEN_BURST_WINDOW_MS / 1000
            ),
        },
        None,
    );
}

/// Reports a burst of wrong tokens from strangers to the alarm webhook and the alarm list, beside
/// the request: recorded with nobody to page, and at most once an hour across replicas. Before the
/// requests were told apart, this burst paged the `[unreached]` teams; the report keeps it visible
/// (a scanner, or an Exotel flow calling in on a number missing from `exotel.inbound_numbers`).
fn report_scanners(state: &AppState) {
    let base = state.settings.public_base();
    let now = state.store.now_ms();
    let summary = format!(
        "{TOKEN_BURST} or more requests to Exotel's webhooks with a wrong token within {}s that do not \
         look like Exotel's for this account (a CallSid of its form, to exotel.inbound_numbers or \
         exotel.caller_id): refused, nobody paged. A scanner, most likely; if Exotel's flow calls in on \
         another number, add it to exotel.inbound_numbers.",
        TOKEN_BURST_WINDOW_MS / 1000
    );
    let alarm = AccountAlarm {
        lane: WEBHOOK_LANE.to_owned(),
        key: format!("{WEBHOOK_LANE}:{SCANNER_REASON}"),
        reason: SCANNER_REASON.to_owned(),
        body: serde_json::json!({
            "type": "account",
            "kind": "account",
            "lane": WEBHOOK_LANE,
            "seen_on": WEBHOOK_LANE,
            "reason": SCANNER_REASON,
            "paged": false,
            "dlt_template_id": null,
            "summary": summary,
            "detail": summary,
            "raised_at": now,
            "readyz": format!("{base}/readyz"),
            "api": format!("{base}/api/v1/alarms"),
        }),
        summary,
    };
    let webhook = !state.settings.alarms.webhook_url.trim().is_empty();
    let state = state.clone();
    tokio::spawn(async move {
        match state.store.report_account_alarm(&alarm, webhook).await {
            Ok(true) => {
                if webhook {
                    state.alarm_watch.wake.notify_one();
                }
                tracing::warn!(
                    scope = WEBHOOK_LANE,
                    reason = SCANNER_REASON,
                    webhook,
                    "wrong webhook tokens from strangers reported; nobody paged"
                );
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "could not record the report of wrong webhook tokens from strangers"
            ),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_are_logged_once_a_minute_and_a_burst_with_a_token_reported_once_an_hour() {
        let w = AlarmWatch::default();
        let first = w.stranger(0, true);
        assert_eq!(first.log, Some(1), "the first at once");
        for i in 1..4 {
            let n = w.stranger(i * 1000, true);
            assert_eq!(n.log, None, "then nothing within the minute");
            assert!(!n.report);
        }
        assert!(
            w.stranger(4_000, true).report,
            "the fifth with a token within a minute"
        );
        assert!(!w.stranger(5_000, true).report, "once");
        assert_eq!(w.stranger(59_999, false).log, None);
        assert_eq!(
            w.stranger(60_000, false).log,
            Some(7),
            "a minute on: how many since the last line"
        );
        assert_eq!(w.strangers().refused, 8);
        assert_eq!(w.strangers().last_at, Some(60_000));
        // Tokenless ones never make a burst to report.
        let w = AlarmWatch::default();
        for i in 0..10 {
            assert!(!w.stranger(i, false).report);
        }
        // Another burst an hour after the report is reported again.
        let w = AlarmWatch::default();
        for i in 0..5 {
            w.stranger(i, true);
        }
        for i in 0..5 {
            assert!(!w.stranger(120_000 + i, true).report, "within the hour");
        }
        let later = crate::store::alarms::ACCOUNT_COOLDOWN_MS + 10;
        let reported = (0..5).any(|i| w.stranger(later + i, true).report);
        assert!(reported);
    }

    #[test]
    fn a_burst_of_bad_tokens_alarms_once_until_a_good_one() {
        let w = AlarmWatch::default();
        for i in 0..4 {
            assert!(!w.failed(i * 1000));
        }
        assert!(w.failed(4_000), "the fifth within a minute");
        assert!(!w.failed(5_000), "once");
        assert!(w.succeeded());
        assert!(!w.succeeded());
        // The first good token of a process clears what an earlier run left open.
        let w = AlarmWatch::default();
        assert!(w.succeeded());
        assert!(!w.succeeded());
        // Spread over more than a minute: no burst.
        let w = AlarmWatch::default();
        for i in 0..10 {
            assert!(!w.failed(i * 20_000));
        }
    }
}
