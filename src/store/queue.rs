//! The deliveries table as a queue: claiming due work under a lease, recording each attempt's outcome,
//! and applying the providers' status callbacks without ever moving a delivery backwards.
//!
//! Statuses: `queued` (waiting until `due_at`) → `sending` (leased; a provider request may be in flight)
//! → `accepted` (the provider took it; a call or SMS waits for its callback) → one final state:
//! `delivered`, `failed`, `simulated` (dry-run) or `cancelled` (incident resolved first).
//! A call not reached goes from `accepted` back to `queued` for a redial: a new try, not a step back.

use std::time::Duration;

use super::{insert_event, DeliveryRow, Engine, Store};
use crate::domain::{now_ms, Channel};

/// How an attempt ended, as the store records it.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Provider accepted: a call or SMS now waits for its callback, a WhatsApp message is sent.
    Accepted {
        provider_id: Option<String>,
        detail: String,
    },
    /// Dry-run: the exact request that would have gone out.
    Simulated { request: String },
    /// Transient failure: try again at `due_at`.
    Retry { due_at: i64, reason: String },
    /// Permanent failure, or out of attempts.
    Failed { reason: String },
    /// Not sent: the incident was resolved first.
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

const RETRY_STATUS: &str =
    "CASE WHEN EXISTS (SELECT 1 FROM incidents i WHERE i.id = deliveries.incident_id \
                            AND i.status = 'open') THEN 'queued' ELSE 'cancelled' END";

impl Store {
    /// Leases up to `limit` due deliveries of one channel, oldest first (calls come first because the
    /// dispatcher claims their channel first). Reads only the claim index: cheap however deep the queue.
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
        // PostgreSQL: replicas skip each other's locked rows instead of queueing behind them.
        // SQLite: one writer at a time, so the statement alone is atomic.
        let lock = match self.engine {
            Engine::Postgres => "FOR UPDATE SKIP LOCKED",
            Engine::Sqlite => "",
        };
        let sql = format!(
            "UPDATE deliveries SET status = 'sending', lease_owner = $1, lease_until = $2, \
             attempts = attempts + 1, updated_at = $3 \
             WHERE id IN (SELECT id FROM deliveries WHERE channel = $4 AND status = 'queued' \
               AND due_at <= $3 ORDER BY due_at LIMIT $5 {lock}) \
             RETURNING {}",
            DeliveryRow::COLUMNS
        );
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(now + lease.as_millis() as i64)
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

    /// Puts deliveries whose lease expired (their process died mid-send) back in the queue, due now:
    /// at-least-once (cancelled instead if their incident was resolved meanwhile). Each gets an event.
    pub async fn requeue_expired_leases(&self) -> anyhow::Result<usize> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(&format!(
            "UPDATE deliveries SET status = {RETRY_STATUS}, due_at = $1, updated_at = $1, \
                 lease_owner = NULL, lease_until = NULL \
                 WHERE status = 'sending' AND lease_until < $1 RETURNING id"
        ))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for id in &ids {
            insert_event(
                &mut *tx,
                id,
                "lease_expired",
                None,
                "the dispatcher sending it stopped answering (outcome unknown); queued again, or cancelled if its incident was resolved",
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(ids.len())
    }

    /// Records how an attempt ended, if `owner` still holds the lease. Returns false when the lease
    /// was lost (it expired and another dispatcher took the delivery); the event is recorded anyway.
    pub async fn finish_attempt(
        &self,
        delivery_id: &str,
        owner: &str,
        finish: &Finish,
    ) -> anyhow::Result<bool> {
        let done = self
            .finish_attempts(owner, &[(delivery_id.to_owned(), finish.clone())])
            .await?;
        Ok(done.first().copied().unwrap_or(false))
    }

    /// [`Store::finish_attempt`] for a batch, in ONE transaction: one durable commit for many outcomes
    /// (group commit). All or none are recorded; on failure the leases expire and the work is sent again.
    pub async fn finish_attempts(
        &self,
        owner: &str,
        batch: &[(String, Finish)],
    ) -> anyhow::Result<Vec<bool>> {
        let mut tx = self.pool.begin().await?;
        let mut results = Vec::with_capacity(batch.len());
        for (delivery_id, finish) in batch {
            results.push(finish_in(&mut tx, delivery_id, owner, finish).await?);
        }
        tx.commit().await?;
        Ok(results)
    }

    /// Accepted calls or SMS whose final report is overdue (last change before `before_ms`), oldest
    /// first. Each is touched so the next sweep waits another full period before asking again.
    pub async fn overdue_reports(
        &self,
        channel: Channel,
        before_ms: i64,
        limit: i64,
    ) -> anyhow::Result<Vec<DeliveryRow>> {
        let sql = format!(
            "SELECT {} FROM deliveries WHERE channel = $1 AND status = 'accepted' \
             AND provider_id IS NOT NULL AND updated_at < $2 ORDER BY updated_at LIMIT $3",
            DeliveryRow::COLUMNS
        );
        let rows = sqlx::query(&sql)
            .bind(channel.as_str())
            .bind(before_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let overdue: Vec<DeliveryRow> = rows
            .iter()
            .map(DeliveryRow::from_row)
            .collect::<Result<_, _>>()?;
        let now = now_ms();
        for d in &overdue {
            sqlx::query(
                "UPDATE deliveries SET updated_at = $2 WHERE id = $1 AND status = 'accepted'",
            )
            .bind(&d.id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        }
        Ok(overdue)
    }

    /// Hands back every lease `owner` holds (graceful shutdown): those deliveries are due again at once,
    /// or cancelled if their incident was resolved meanwhile. Each gets an event.
    pub async fn release(&self, owner: &str) -> anyhow::Result<u64> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(&format!(
            "UPDATE deliveries SET status = {RETRY_STATUS}, lease_owner = NULL, lease_until = NULL, \
             due_at = $2, updated_at = $2 WHERE lease_owner = $1 AND status = 'sending' RETURNING id"
        ))
        .bind(owner)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for id in &ids {
            insert_event(
                &mut *tx,
                id,
                "released",
                None,
                "the dispatcher stopped before this attempt finished (outcome unknown); queued again",
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(ids.len() as u64)
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
                "SELECT {} FROM deliveries WHERE channel = $1 AND greeting_ref = $2 AND provider_id IS NULL",
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
        // the delivery elsewhere and changes nothing.
        let guard =
            "WHERE id = $1 AND status = 'accepted' AND (provider_id = $2 OR provider_id IS NULL)";
        let (sql, args, effect) = match status.as_str() {
            "completed" => (
                format!(
                    "UPDATE deliveries SET status = 'delivered', provider_id = $2, provider_status = $3, \
                     finished_at = $4, updated_at = $4, last_error = NULL {guard}"
                ),
                vec![id, sid, st, Arg::I(now)],
                "delivered",
            ),
            "busy" | "no-answer" | "failed" | "canceled" if (d.redials as u32) < policy.max_redials => (
                format!(
                    "UPDATE deliveries SET status = {RETRY_STATUS}, provider_id = $2, provider_status = $3, \
                     redials = redials + 1, due_at = $5, updated_at = $4, last_error = $6 {guard} AND redials = $7"
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
                "queued",
            ),
            "busy" | "no-answer" | "failed" | "canceled" => (
                format!(
                    "UPDATE deliveries SET status = 'failed', provider_id = $2, provider_status = $3, \
                     finished_at = $4, updated_at = $4, last_error = $5 {guard} AND redials = $6"
                ),
                vec![id, sid, st, Arg::I(now), Arg::S(reason), Arg::I(d.redials)],
                "failed",
            ),
            // queued, ringing, in-progress: progress only.
            _ => (
                format!("UPDATE deliveries SET provider_status = $3, updated_at = $4 {guard}"),
                vec![id, sid, st, Arg::I(now)],
                "accepted",
            ),
        };
        self.apply_report(Transition {
            delivery: &d,
            sql: &sql,
            args,
            effect,
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
        let (sql, args, effect) = match status.as_str() {
            "sent" | "delivered" => (
                format!(
                    "UPDATE deliveries SET status = 'delivered', provider_id = $2, provider_status = $3, \
                     finished_at = $4, updated_at = $4, last_error = NULL {guard}"
                ),
                base,
                "delivered",
            ),
            s if s.starts_with("failed") || s == "undelivered" || s == "rejected" => (
                format!(
                    "UPDATE deliveries SET status = 'failed', provider_id = $2, provider_status = $3, \
                     finished_at = $4, updated_at = $4, last_error = $5 {guard}"
                ),
                [base, vec![Arg::S(reason.to_owned())]].concat(),
                "failed",
            ),
            _ => (
                format!("UPDATE deliveries SET provider_status = $3, updated_at = $4 {guard}"),
                base,
                "accepted",
            ),
        };
        self.apply_report(Transition {
            delivery: &d,
            sql: &sql,
            args,
            effect,
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
        let applied = bind_all(sqlx::query(t.sql), t.args)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        let (result, note) = if applied {
            (
                CallbackEffect::Applied(t.effect.to_owned()),
                format!("{}; now {}", t.detail, t.effect),
            )
        } else {
            let why = format!("delivery is {}; report changes nothing", t.delivery.status);
            let note = format!("{}; ignored: {why}", t.detail);
            (CallbackEffect::Ignored(why), note)
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

/// Records one attempt's end inside `tx`, if `owner` still holds the lease.
async fn finish_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    delivery_id: &str,
    owner: &str,
    finish: &Finish,
) -> anyhow::Result<bool> {
    let now = now_ms();
    let (status, provider_id, last_error, last_request, due_at, finished_at, kind, detail) =
        match finish {
            Finish::Accepted {
                provider_id,
                detail,
            } => {
                // WhatsApp has no callback here: accepted by GupShup is as far as we can see.
                (
                    "accepted",
                    provider_id.clone(),
                    None,
                    None,
                    None,
                    None,
                    "accepted",
                    detail.clone(),
                )
            }
            Finish::Simulated { request } => (
                "simulated",
                None,
                None,
                Some(request.clone()),
                None,
                Some(now),
                "simulated",
                "dry-run: request stored, nothing sent".to_owned(),
            ),
            Finish::Retry { due_at, reason } => (
                "queued",
                None,
                Some(reason.clone()),
                None,
                Some(*due_at),
                None,
                "transient_failure",
                format!("{reason}; next try in {} ms", (due_at - now).max(0)),
            ),
            Finish::Failed { reason } => (
                "failed",
                None,
                Some(reason.clone()),
                None,
                None,
                Some(now),
                "failed",
                reason.clone(),
            ),
            Finish::Cancelled { reason } => (
                "cancelled",
                None,
                Some(reason.clone()),
                None,
                None,
                Some(now),
                "cancelled",
                reason.clone(),
            ),
        };
    let sql = format!(
        "UPDATE deliveries SET \
               status = CASE WHEN $3 = 'queued' THEN {RETRY_STATUS} ELSE $3 END, \
               provider_id = COALESCE($4, provider_id), last_error = $5, \
               last_request = COALESCE($6, last_request), due_at = COALESCE($7, due_at), \
               finished_at = $8, lease_owner = NULL, lease_until = NULL, updated_at = $9 \
             WHERE id = $1 AND lease_owner = $2 AND status = 'sending'"
    );
    let updated = sqlx::query(&sql)
        .bind(delivery_id)
        .bind(owner)
        .bind(status)
        .bind(provider_id.as_deref())
        .bind(last_error.as_deref())
        .bind(last_request.as_deref())
        .bind(due_at)
        .bind(finished_at)
        .bind(now)
        .execute(&mut **tx)
        .await?
        .rows_affected()
        == 1;
    let detail = if updated {
        detail
    } else {
        format!("{detail} (lease lost: another dispatcher owns this delivery now)")
    };
    insert_event(
        &mut **tx,
        delivery_id,
        kind,
        provider_id.as_deref(),
        &detail,
        now,
    )
    .await?;
    Ok(updated)
}

/// One callback's guarded update and what to record about it.
struct Transition<'a> {
    delivery: &'a DeliveryRow,
    sql: &'a str,
    args: Vec<Arg>,
    effect: &'static str,
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

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    args: Vec<Arg>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for a in args {
        q = match a {
            Arg::S(s) => q.bind(s),
            Arg::I(i) => q.bind(i),
        };
    }
    q
}
