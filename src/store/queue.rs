//! The deliveries table as a queue: claiming due work under a lease, recording each attempt's outcome,
//! and applying the providers' status callbacks without ever moving a delivery backwards.
//!
//! Statuses: `queued` (waiting until `due_at`) → `sending` (leased; a provider request may be in flight)
//! → `accepted` (the provider took it; a call or SMS waits for its report until `report_due_at`) → one
//! final state: `delivered`, `failed`, `simulated` (dry-run) or `cancelled` (incident resolved first).
//! A call not reached goes from `accepted` back to `queued` for a redial: a new try, not a step back.
//!
//! Leases are judged by the database's clock (the one clock every replica shares), and each claim has
//! its own token: an outcome is recorded only by the claim that still holds the delivery.

use std::time::Duration;

use super::{insert_event, DeliveryRow, Engine, Store};
use crate::domain::{now_ms, storable, Channel};

/// How an attempt ended, as the store records it.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Provider accepted: a call or SMS now waits for its report until `report_due_at`; a WhatsApp
    /// message (no report) has none.
    Accepted {
        provider_id: Option<String>,
        detail: String,
        report_due_at: Option<i64>,
    },
    /// Dry-run: the exact request that would have gone out.
    Simulated { request: String },
    /// Transient failure: try again at `due_at`.
    Retry { due_at: i64, reason: String },
    /// Not sent at all (held by a pause past its lease, or its incident could not be read): due again
    /// at `due_at`, and the claim does not count as an attempt.
    Requeue { due_at: i64, reason: String },
    /// Permanent failure, or out of attempts.
    Failed { reason: String },
    /// Not sent: the incident was resolved first. Not counted as an attempt.
    Cancelled { reason: String },
}

/// What a status callback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackEffect {
    /// The delivery moved to this status (or, for a progress report, stayed and noted it).
    Applied(String),
    /// Known, but nothing changed: a repeat, a late report, or one for an earlier attempt.
    Ignored(String),
    /// No delivery has this provider id.
    Unknown,
    /// The report beat our own record of the request that it reports on (the delivery is still
    /// `sending`): nothing applied yet; ask again in a moment.
    Pending,
}

/// A call's terminal report, read from Exotel's callback.
#[derive(Debug, Clone)]
pub struct CallReport {
    pub call_sid: String,
    pub custom_field: Option<String>,
    pub status: String,
    pub detail: String,
}

/// What to do with a call that was not reached.
#[derive(Debug, Clone, Copy)]
pub struct RedialPolicy {
    pub delay: Duration,
    pub max_redials: u32,
}

/// A delivery that changed state outside a provider request (lease expiry, release, deadline), for
/// the caller's logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub delivery_id: String,
    pub channel: String,
    pub status: String,
}

impl From<(String, String, String)> for Moved {
    fn from((delivery_id, channel, status): (String, String, String)) -> Self {
        Moved {
            delivery_id,
            channel,
            status,
        }
    }
}

/// Whether the delivery's incident is still open, inside an `UPDATE deliveries` statement.
macro_rules! incident_open {
    () => {
        "EXISTS (SELECT 1 FROM incidents i WHERE i.id = deliveries.incident_id AND i.status = 'open')"
    };
}

/// Due again, unless its incident was resolved meanwhile: then cancelled.
const RETRY_STATUS: &str = concat!(
    "CASE WHEN ",
    incident_open!(),
    " THEN 'queued' ELSE 'cancelled' END"
);

/// `finished_at` for a row set to [`RETRY_STATUS`]: set (to the `$n` given) when it became cancelled.
macro_rules! finished_if_cancelled {
    ($param:literal) => {
        concat!(
            "CASE WHEN ",
            incident_open!(),
            " THEN NULL ELSE ",
            $param,
            " END"
        )
    };
}

/// Which rows a success report (`$2` = its provider id) may finish: the accepted attempt it names, and
/// also one that was waiting for this very report when its deadline passed (a redial still queued, or a
/// delivery failed as unconfirmed): a late "answered" is the truth and beats our guess.
const ANSWERED_LATE_OR_NOW: &str = "((status = 'accepted' AND (provider_id = $2 OR provider_id IS NULL)) \
     OR (status = 'queued' AND provider_id = $2) \
     OR (status = 'failed' AND provider_id = $2 AND last_error LIKE '%no status report%')) RETURNING status";

impl Engine {
    /// The database's clock in milliseconds since the epoch, as an SQL expression.
    fn now_sql(self) -> &'static str {
        match self {
            Engine::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
            Engine::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }
}

impl Store {
    /// Leases up to `limit` due deliveries of one channel, oldest first, under one fresh claim token
    /// (in each row's `lease_token`) until the database's clock passes `lease` from now. Reads only the
    /// claim index: cheap however deep the queue.
    pub async fn claim(
        &self,
        channel: Channel,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> anyhow::Result<Vec<DeliveryRow>> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let token = uuid::Uuid::new_v4().simple().to_string();
        // PostgreSQL: replicas skip each other's locked rows instead of queueing behind them.
        // SQLite: one writer at a time, so the statement alone is atomic.
        let lock = match self.engine {
            Engine::Postgres => "FOR UPDATE SKIP LOCKED",
            Engine::Sqlite => "",
        };
        let sql = format!(
            "UPDATE deliveries SET status = 'sending', lease_owner = $1, lease_token = $2, \
             lease_until = {} + $3, attempts = attempts + 1, updated_at = $4 \
             WHERE id IN (SELECT id FROM deliveries WHERE channel = $5 AND status = 'queued' \
               AND due_at <= $4 ORDER BY due_at LIMIT $6 {lock}) \
             RETURNING {}",
            self.engine.now_sql(),
            DeliveryRow::COLUMNS
        );
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(&token)
            .bind(lease.as_millis() as i64)
            .bind(now)
            .bind(channel.as_str())
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        let claimed: Vec<DeliveryRow> = rows
            .iter()
            .map(DeliveryRow::from_row)
            .collect::<Result<_, _>>()?;
        for d in &claimed {
            insert_event(
                &mut *tx,
                &d.id,
                "attempt",
                None,
                &format!("attempt {} by {owner}", d.attempts),
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(claimed)
    }

    /// Puts deliveries whose lease expired by the database's clock (their process died mid-send, or
    /// their outcome could not be recorded) back in the queue, due now: at-least-once. Cancelled
    /// instead if their incident was resolved meanwhile; failed once the lease has run out
    /// `max_losses` times, so a delivery whose outcome can never be recorded still ends. Each gets an
    /// event.
    pub async fn requeue_expired_leases(&self, max_losses: u32) -> anyhow::Result<Vec<Moved>> {
        let now = now_ms();
        let gave_up = format!(
            "gave up: its lease ran out {max_losses} times before an outcome could be recorded \
             (the process died or the database refused the outcome); it may have been sent"
        );
        let sql = format!(
            "UPDATE deliveries SET \
               status = CASE WHEN lease_losses + 1 >= $2 THEN 'failed' ELSE {RETRY_STATUS} END, \
               last_error = CASE WHEN lease_losses + 1 >= $2 THEN $3 ELSE last_error END, \
               finished_at = CASE WHEN lease_losses + 1 >= $2 THEN $1 ELSE {} END, \
               lease_losses = lease_losses + 1, due_at = $1, updated_at = $1, \
               lease_owner = NULL, lease_until = NULL, lease_token = NULL \
             WHERE status = 'sending' AND lease_until < {} RETURNING id, channel, status",
            finished_if_cancelled!("$1"),
            self.engine.now_sql()
        );
        let mut tx = self.pool.begin().await?;
        let moved: Vec<(String, String, String)> = sqlx::query_as(&sql)
            .bind(now)
            .bind(i64::from(max_losses))
            .bind(&gave_up)
            .fetch_all(&mut *tx)
            .await?;
        for (id, _, status) in &moved {
            let detail = match status.as_str() {
                "failed" => gave_up.clone(),
                "cancelled" => "the dispatcher sending it stopped answering (outcome unknown); now cancelled: its incident was resolved".to_owned(),
                _ => "the dispatcher sending it stopped answering (outcome unknown); now queued again".to_owned(),
            };
            insert_event(&mut *tx, id, "lease_expired", None, &detail, now).await?;
        }
        tx.commit().await?;
        Ok(moved.into_iter().map(Moved::from).collect())
    }

    /// Records how an attempt ended, if the claim `token` still holds the lease. Returns the status it
    /// recorded, or `None` when the lease was lost (it expired and another claim took the delivery);
    /// the event is recorded either way.
    pub async fn finish_attempt(
        &self,
        delivery_id: &str,
        token: &str,
        finish: &Finish,
    ) -> anyhow::Result<Option<String>> {
        let done = self
            .finish_attempts(&[(delivery_id.to_owned(), token.to_owned(), finish.clone())])
            .await?;
        Ok(done.into_iter().next().flatten())
    }

    /// [`Store::finish_attempt`] for a batch of (delivery id, claim token, outcome), in ONE transaction:
    /// one durable commit for many outcomes (group commit). All or none are recorded; the caller
    /// retries, then records them one by one, so one bad item cannot hold back the others.
    pub async fn finish_attempts(
        &self,
        batch: &[(String, String, Finish)],
    ) -> anyhow::Result<Vec<Option<String>>> {
        let mut tx = self.pool.begin().await?;
        let mut results = Vec::with_capacity(batch.len());
        for (delivery_id, token, finish) in batch {
            results.push(finish_in(&mut tx, delivery_id, token, finish).await?);
        }
        tx.commit().await?;
        Ok(results)
    }

    /// Extends a lease the claim `token` still holds to `lease` from now by the database's clock (after a
    /// long wait for a provider's limits). False when another claim owns the delivery now.
    pub async fn renew_lease(
        &self,
        delivery_id: &str,
        token: &str,
        lease: Duration,
    ) -> anyhow::Result<bool> {
        let renewed = sqlx::query(&format!(
            "UPDATE deliveries SET lease_until = {} + $3 \
             WHERE id = $1 AND lease_token = $2 AND status = 'sending'",
            self.engine.now_sql()
        ))
        .bind(delivery_id)
        .bind(token)
        .bind(lease.as_millis() as i64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(renewed == 1)
    }

    /// Accepted calls or SMS whose report deadline has passed, oldest first. Each is given its next
    /// deadline (`now + wait`) and one more check in the same statement, so replicas never look up the
    /// same row at once and the next sweep waits a full period.
    pub async fn overdue_reports(
        &self,
        channel: Channel,
        wait: Duration,
        limit: i64,
    ) -> anyhow::Result<Vec<DeliveryRow>> {
        let lock = match self.engine {
            Engine::Postgres => "FOR UPDATE SKIP LOCKED",
            Engine::Sqlite => "",
        };
        let sql = format!(
            "UPDATE deliveries SET report_due_at = $2 + $3, report_checks = report_checks + 1 \
             WHERE id IN (SELECT id FROM deliveries WHERE channel = $1 AND status = 'accepted' \
               AND report_due_at < $2 ORDER BY report_due_at LIMIT $4 {lock}) \
             RETURNING {}",
            DeliveryRow::COLUMNS
        );
        let rows = sqlx::query(&sql)
            .bind(channel.as_str())
            .bind(now_ms())
            .bind(wait.as_millis() as i64)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(DeliveryRow::from_row).collect()
    }

    /// An accepted call or SMS whose report never came and could not be looked up: a call counts as
    /// not reached (redialled while redials remain), an SMS as unconfirmed (failed). Guarded, so a
    /// report that arrived meanwhile wins.
    pub async fn report_deadline_passed(
        &self,
        d: &DeliveryRow,
        policy: RedialPolicy,
        why: &str,
    ) -> anyhow::Result<CallbackEffect> {
        let now = now_ms();
        let redial = d.channel == Channel::Call.as_str() && (d.redials as u32) < policy.max_redials;
        let reason = if d.channel == Channel::Call.as_str() {
            format!(
                "not reached: {why} (call {} of {})",
                d.redials + 1,
                policy.max_redials + 1
            )
        } else {
            format!("unconfirmed: {why}")
        };
        // The reasons say "no status report", which a late success report looks for.
        let mut tx = self.pool.begin().await?;
        let moved: Option<String> = if redial {
            sqlx::query_scalar(&format!(
                "UPDATE deliveries SET status = {RETRY_STATUS}, finished_at = {}, \
                 redials = redials + 1, due_at = $3, updated_at = $2, last_error = $4, report_due_at = NULL \
                 WHERE id = $1 AND status = 'accepted' AND redials = $5 RETURNING status",
                finished_if_cancelled!("$2")
            ))
            .bind(&d.id)
            .bind(now)
            .bind(now + policy.delay.as_millis() as i64)
            .bind(&reason)
            .bind(d.redials)
            .fetch_optional(&mut *tx)
            .await?
        } else {
            sqlx::query_scalar(
                "UPDATE deliveries SET status = 'failed', finished_at = $2, updated_at = $2, \
                 last_error = $3, report_due_at = NULL \
                 WHERE id = $1 AND status = 'accepted' AND redials = $4 RETURNING status",
            )
            .bind(&d.id)
            .bind(now)
            .bind(&reason)
            .bind(d.redials)
            .fetch_optional(&mut *tx)
            .await?
        };
        let effect = match &moved {
            Some(status) => {
                insert_event(
                    &mut *tx,
                    &d.id,
                    "report_overdue",
                    d.provider_id.as_deref(),
                    &format!("{reason}; now {status}"),
                    now,
                )
                .await?;
                CallbackEffect::Applied(status.clone())
            }
            None => CallbackEffect::Ignored("a report arrived meanwhile".to_owned()),
        };
        tx.commit().await?;
        Ok(effect)
    }

    /// Hands back every lease `owner` holds (graceful shutdown): those deliveries are due again at once,
    /// or cancelled if their incident was resolved meanwhile. Each gets an event.
    pub async fn release(&self, owner: &str) -> anyhow::Result<Vec<Moved>> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let moved: Vec<(String, String, String)> = sqlx::query_as(&format!(
            "UPDATE deliveries SET status = {RETRY_STATUS}, finished_at = {}, lease_owner = NULL, \
             lease_until = NULL, lease_token = NULL, due_at = $2, updated_at = $2 \
             WHERE lease_owner = $1 AND status = 'sending' RETURNING id, channel, status",
            finished_if_cancelled!("$2")
        ))
        .bind(owner)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for (id, _, status) in &moved {
            insert_event(
                &mut *tx,
                id,
                "released",
                None,
                &format!(
                    "the dispatcher stopped before this attempt finished (outcome unknown); now {status}"
                ),
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(moved.into_iter().map(Moved::from).collect())
    }

    /// Takes one request from the account-wide token bucket `name` (capacity `burst`, refilled at
    /// `per_minute`), by the database's clock, so replicas together keep a provider's account limit.
    /// `None` when granted; otherwise how long to wait before asking again.
    pub async fn take_rate_token(
        &self,
        name: &str,
        per_minute: u32,
        burst: u32,
    ) -> anyhow::Result<Option<Duration>> {
        let now = self.engine.now_sql();
        let per_ms = f64::from(per_minute.max(1)) / 60_000.0;
        let burst = f64::from(burst.max(1));
        // Two-argument MIN is SQLite's LEAST.
        let least = match self.engine {
            Engine::Postgres => "LEAST",
            Engine::Sqlite => "MIN",
        };
        let refilled = format!("{least}($2, tokens + ({now} - updated_at) * $3)");
        // The common case is one statement: take a token from a bucket that has one.
        let granted: Option<f64> = sqlx::query_scalar(&format!(
            "UPDATE rate_buckets SET tokens = {refilled} - 1, updated_at = {now} \
             WHERE name = $1 AND {refilled} >= 1 RETURNING tokens"
        ))
        .bind(name)
        .bind(burst)
        .bind(per_ms)
        .fetch_optional(&self.pool)
        .await?;
        if granted.is_some() {
            return Ok(None);
        }
        let current: Option<f64> = sqlx::query_scalar(&format!(
            "SELECT {refilled} FROM rate_buckets WHERE name = $1"
        ))
        .bind(name)
        .bind(burst)
        .bind(per_ms)
        .fetch_optional(&self.pool)
        .await?;
        let Some(current) = current else {
            // First use of this bucket: create it full, then ask again at once.
            sqlx::query(&format!(
                "INSERT INTO rate_buckets (name, tokens, updated_at) VALUES ($1, $2, {now}) \
                 ON CONFLICT (name) DO NOTHING"
            ))
            .bind(name)
            .bind(burst)
            .execute(&self.pool)
            .await?;
            return Ok(Some(Duration::ZERO));
        };
        let missing = (1.0 - current).clamp(0.0, 1.0);
        let wait_ms = (missing / per_ms).clamp(1.0, 60_000.0);
        Ok(Some(Duration::from_millis(wait_ms as u64)))
    }

    /// The delivery a callback names: by provider id, else (for an answer that carried no id) by the
    /// reference we put in CustomField.
    async fn callback_target(
        &self,
        channel: Channel,
        provider_id: &str,
        custom_field: Option<&str>,
    ) -> anyhow::Result<Option<DeliveryRow>> {
        let sql = format!(
            "SELECT {} FROM deliveries WHERE channel = $1 AND provider_id = $2",
            DeliveryRow::COLUMNS
        );
        if let Some(row) = sqlx::query(&sql)
            .bind(channel.as_str())
            .bind(provider_id)
            .fetch_optional(&self.pool)
            .await?
        {
            return Ok(Some(DeliveryRow::from_row(&row)?));
        }
        if let Some(reference) = custom_field {
            let sql = format!(
                // No id yet, or a redial still `sending` (its row holds the previous call's id until the
                // new one is recorded): the report then waits for that record instead of getting 404.
                "SELECT {} FROM deliveries WHERE channel = $1 AND greeting_ref = $2 \
                 AND (provider_id IS NULL OR status = 'sending')",
                DeliveryRow::COLUMNS
            );
            if let Some(row) = sqlx::query(&sql)
                .bind(channel.as_str())
                .bind(reference)
                .fetch_optional(&self.pool)
                .await?
            {
                return Ok(Some(DeliveryRow::from_row(&row)?));
            }
        }
        Ok(None)
    }

    /// The delivery an earlier attempt's provider id belongs to (a call since redialled).
    async fn earlier_attempt(&self, provider_id: &str) -> anyhow::Result<Option<String>> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT delivery_id FROM delivery_events WHERE provider_id = $1 ORDER BY id LIMIT 1",
        )
        .bind(provider_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id)
    }

    /// Applies Exotel's call StatusCallback. `completed` = answered; `busy`, `no-answer`, `failed`,
    /// `canceled` = not reached: redialled after `policy.delay`, up to `policy.max_redials` times.
    pub async fn apply_call_report(
        &self,
        report: &CallReport,
        policy: RedialPolicy,
    ) -> anyhow::Result<CallbackEffect> {
        let status = report.status.trim().to_ascii_lowercase();
        let Some(d) = self
            .callback_target(
                Channel::Call,
                &report.call_sid,
                report.custom_field.as_deref(),
            )
            .await?
        else {
            return self
                .unmatched_callback(&report.call_sid, &report.detail)
                .await;
        };
        if d.status == "sending" {
            return Ok(CallbackEffect::Pending);
        }
        let now = now_ms();
        let reason = format!(
            "not reached: {status} (call {} of {})",
            d.redials + 1,
            policy.max_redials + 1
        );
        let id = Arg::S(d.id.clone());
        let sid = Arg::S(report.call_sid.clone());
        let st = Arg::S(status.clone());
        // Every transition requires `accepted` and this attempt's id: a repeat or a late report finds
        // the delivery elsewhere and changes nothing. The new status is read back: a redial of a
        // resolved incident's call is cancelled, not queued.
        let guard =
            "WHERE id = $1 AND status = 'accepted' AND (provider_id = $2 OR provider_id IS NULL)";
        let (sql, args) = match status.as_str() {
            "completed" => (
                format!(
                    "UPDATE deliveries SET status = 'delivered', provider_id = $2, provider_status = $3, \
                     finished_at = $4, updated_at = $4, last_error = NULL, report_due_at = NULL \
                     WHERE id = $1 AND {ANSWERED_LATE_OR_NOW}"
                ),
                vec![id, sid, st, Arg::I(now)],
            ),
            "busy" | "no-answer" | "failed" | "canceled" if (d.redials as u32) < policy.max_redials => (
                format!(
                    "UPDATE deliveries SET status = {RETRY_STATUS}, finished_at = {}, provider_id = $2, \
                     provider_status = $3, redials = redials + 1, due_at = $5, updated_at = $4, \
                     last_error = $6, report_due_at = NULL {guard} AND redials = $7 RETURNING status",
                    finished_if_cancelled!("$4")
                ),
                vec![
                    id,
                    sid,
                    st,
                    Arg::I(now),
                    Arg::I(now + policy.delay.as_millis() as i64),
                    Arg::S(reason),
                    Arg::I(d.redials),
                ],
            ),
            "busy" | "no-answer" | "failed" | "canceled" => (
                format!(
                    "UPDATE deliveries SET status = 'failed', provider_id = $2, provider_status = $3, \
                     finished_at = $4, updated_at = $4, last_error = $5, report_due_at = NULL {guard} \
                     AND redials = $6 RETURNING status"
                ),
                vec![id, sid, st, Arg::I(now), Arg::S(reason), Arg::I(d.redials)],
            ),
            // queued, ringing, in-progress: progress only, and proof that the call is alive, so the
            // report deadline's look-ups start counting again.
            _ => (
                format!(
                    "UPDATE deliveries SET provider_status = $3, updated_at = $4, report_checks = 0 {guard} \
                     RETURNING status"
                ),
                vec![id, sid, st, Arg::I(now)],
            ),
        };
        self.apply_report(Transition {
            delivery: &d,
            sql: &sql,
            args,
            kind: "call_status",
            provider_id: &report.call_sid,
            detail: &report.detail,
            now,
        })
        .await
    }

    /// Applies Exotel's SMS StatusCallback: `sent` = delivered; `failed` and `failed_dnd` = failed with
    /// Exotel's detailed code and name; `queued`, `sending`, `submitted` = progress.
    pub async fn apply_sms_report(
        &self,
        sms_sid: &str,
        custom_field: Option<&str>,
        status: &str,
        reason: &str,
        detail: &str,
    ) -> anyhow::Result<CallbackEffect> {
        let status = status.trim().to_ascii_lowercase();
        let Some(d) = self
            .callback_target(Channel::Sms, sms_sid, custom_field)
            .await?
        else {
            return self.unmatched_callback(sms_sid, detail).await;
        };
        if d.status == "sending" {
            return Ok(CallbackEffect::Pending);
        }
        let now = now_ms();
        let base = vec![
            Arg::S(d.id.clone()),
            Arg::S(sms_sid.to_owned()),
            Arg::S(status.clone()),
            Arg::I(now),
        ];
        let guard =
            "WHERE id = $1 AND status = 'accepted' AND (provider_id = $2 OR provider_id IS NULL)";
        let (sql, args) = match status.as_str() {
            "sent" | "delivered" => (
                format!(
                    "UPDATE deliveries SET status = 'delivered', provider_id = $2, provider_status = $3, \
                     finished_at = $4, updated_at = $4, last_error = NULL, report_due_at = NULL \
                     WHERE id = $1 AND {ANSWERED_LATE_OR_NOW}"
                ),
                base,
            ),
            s if s.starts_with("failed") || s == "undelivered" || s == "rejected" => (
                format!(
                    "UPDATE deliveries SET status = 'failed', provider_id = $2, provider_status = $3, \
                     finished_at = $4, updated_at = $4, last_error = $5, report_due_at = NULL {guard} \
                     RETURNING status"
                ),
                [base, vec![Arg::S(reason.to_owned())]].concat(),
            ),
            _ => (
                format!(
                    "UPDATE deliveries SET provider_status = $3, updated_at = $4, report_checks = 0 {guard} \
                     RETURNING status"
                ),
                base,
            ),
        };
        self.apply_report(Transition {
            delivery: &d,
            sql: &sql,
            args,
            kind: "sms_status",
            provider_id: sms_sid,
            detail,
            now,
        })
        .await
    }

    /// Runs a callback's guarded transition and records the report, applied or not, in one transaction.
    async fn apply_report(&self, t: Transition<'_>) -> anyhow::Result<CallbackEffect> {
        let mut tx = self.pool.begin().await?;
        let applied: Option<String> = bind_all(sqlx::query_scalar(t.sql), t.args)
            .fetch_optional(&mut *tx)
            .await?;
        let (result, note) = match applied {
            Some(now_status) => (
                CallbackEffect::Applied(now_status.clone()),
                format!("{}; now {now_status}", t.detail),
            ),
            None => {
                let why = format!("delivery is {}; report changes nothing", t.delivery.status);
                let note = format!("{}; ignored: {why}", t.detail);
                (CallbackEffect::Ignored(why), note)
            }
        };
        insert_event(
            &mut *tx,
            &t.delivery.id,
            t.kind,
            Some(t.provider_id),
            &note,
            t.now,
        )
        .await?;
        tx.commit().await?;
        Ok(result)
    }

    /// A callback whose id is not any delivery's current one: an earlier attempt's (recorded, ignored)
    /// or unknown.
    async fn unmatched_callback(
        &self,
        provider_id: &str,
        detail: &str,
    ) -> anyhow::Result<CallbackEffect> {
        match self.earlier_attempt(provider_id).await? {
            Some(delivery_id) => {
                self.record_event(
                    &delivery_id,
                    "late_callback",
                    Some(provider_id),
                    &format!("{detail}; ignored: an earlier attempt"),
                )
                .await?;
                Ok(CallbackEffect::Ignored(
                    "report for an earlier attempt".to_owned(),
                ))
            }
            None => Ok(CallbackEffect::Unknown),
        }
    }

    /// The greeting GET: the moment the alert started playing to this contact (the first one counts).
    pub async fn record_greeting_play(&self, delivery_id: &str) -> anyhow::Result<()> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE deliveries SET played_at = COALESCE(played_at, $2), updated_at = $2 WHERE id = $1")
            .bind(delivery_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        insert_event(
            &mut *tx,
            delivery_id,
            "greeting_played",
            None,
            "greeting fetched by Exotel",
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Counts of deliveries by status, for tests and the operator.
    pub async fn delivery_status_counts(&self) -> anyhow::Result<Vec<(String, i64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, COUNT(*) FROM deliveries GROUP BY status ORDER BY status",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

/// Records one attempt's end inside `tx`, if the claim `token` still holds the lease; returns the
/// status recorded. Every text is made storable first: a provider's answer can carry anything.
async fn finish_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    delivery_id: &str,
    token: &str,
    finish: &Finish,
) -> anyhow::Result<Option<String>> {
    let now = now_ms();
    let mut row = FinishRow {
        status: "queued",
        provider_id: None,
        last_error: None,
        last_request: None,
        due_at: None,
        finished_at: None,
        refund: 0,
        report_due_at: None,
        kind: "transient_failure",
        detail: String::new(),
    };
    match finish {
        Finish::Accepted {
            provider_id,
            detail,
            report_due_at,
        } => {
            row.status = "accepted";
            row.provider_id = provider_id.clone();
            row.report_due_at = *report_due_at;
            row.kind = "accepted";
            row.detail = detail.clone();
        }
        Finish::Simulated { request } => {
            row.status = "simulated";
            row.last_request = Some(request.clone());
            row.finished_at = Some(now);
            row.kind = "simulated";
            row.detail = "dry-run: request stored, nothing sent".to_owned();
        }
        Finish::Retry { due_at, reason } => {
            row.last_error = Some(reason.clone());
            row.due_at = Some(*due_at);
            row.detail = format!("{reason}; next try in {} ms", (due_at - now).max(0));
        }
        Finish::Requeue { due_at, reason } => {
            row.last_error = Some(reason.clone());
            row.due_at = Some(*due_at);
            row.refund = 1;
            row.kind = "requeued";
            row.detail = format!("{reason}; not sent, and not counted as an attempt");
        }
        Finish::Failed { reason } | Finish::Cancelled { reason } => {
            let failed = matches!(finish, Finish::Failed { .. });
            row.status = if failed { "failed" } else { "cancelled" };
            // A cancelled claim never reached the provider.
            row.refund = i64::from(!failed);
            row.last_error = Some(reason.clone());
            row.finished_at = Some(now);
            row.kind = row.status;
            row.detail = reason.clone();
        }
    }
    let clean = |s: &Option<String>| s.as_deref().map(|v| storable(v).into_owned());
    let sql = format!(
        "UPDATE deliveries SET \
           status = CASE WHEN $3 = 'queued' THEN {RETRY_STATUS} ELSE $3 END, \
           provider_id = CASE WHEN $3 = 'accepted' THEN $4 ELSE provider_id END, \
           last_error = $5, last_request = COALESCE($6, last_request), due_at = COALESCE($7, due_at), \
           finished_at = CASE WHEN $3 = 'queued' THEN {} ELSE $8 END, \
           attempts = attempts - $10, report_due_at = $11, report_checks = 0, \
           lease_owner = NULL, lease_until = NULL, lease_token = NULL, updated_at = $9 \
         WHERE id = $1 AND lease_token = $2 AND status = 'sending' RETURNING status",
        finished_if_cancelled!("$9")
    );
    let recorded: Option<String> = sqlx::query_scalar(&sql)
        .bind(delivery_id)
        .bind(token)
        .bind(row.status)
        .bind(clean(&row.provider_id))
        .bind(clean(&row.last_error))
        .bind(clean(&row.last_request))
        .bind(row.due_at)
        .bind(row.finished_at)
        .bind(now)
        .bind(row.refund)
        .bind(row.report_due_at)
        .fetch_optional(&mut **tx)
        .await?;
    let detail = match recorded.as_deref() {
        Some("cancelled") if row.status == "queued" => {
            format!("{}; now cancelled: its incident was resolved", row.detail)
        }
        Some(_) => row.detail,
        None => format!(
            "{} (lease lost: another claim owns this delivery now)",
            row.detail
        ),
    };
    insert_event(
        &mut **tx,
        delivery_id,
        row.kind,
        row.provider_id.as_deref(),
        &detail,
        now,
    )
    .await?;
    Ok(recorded)
}

/// The columns [`finish_in`] writes for one outcome.
struct FinishRow {
    status: &'static str,
    provider_id: Option<String>,
    last_error: Option<String>,
    last_request: Option<String>,
    due_at: Option<i64>,
    finished_at: Option<i64>,
    /// 1 when the claim sent nothing and so is not an attempt.
    refund: i64,
    report_due_at: Option<i64>,
    kind: &'static str,
    detail: String,
}

/// One callback's guarded update and what to record about it.
struct Transition<'a> {
    delivery: &'a DeliveryRow,
    sql: &'a str,
    args: Vec<Arg>,
    kind: &'static str,
    provider_id: &'a str,
    detail: &'a str,
    now: i64,
}

/// A bind value for statements whose parameter list depends on the branch taken (PostgreSQL refuses
/// more binds than the statement names).
#[derive(Debug, Clone)]
enum Arg {
    S(String),
    I(i64),
}

fn bind_all<'q, O>(
    mut q: sqlx::query::QueryScalar<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>>,
    args: Vec<Arg>,
) -> sqlx::query::QueryScalar<'q, sqlx::Any, O, sqlx::any::AnyArguments<'q>> {
    for a in args {
        q = match a {
            Arg::S(s) => q.bind(storable(&s).into_owned()),
            Arg::I(i) => q.bind(i),
        };
    }
    q
}
