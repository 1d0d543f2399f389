//! The deliveries table as a queue: claiming due work under a lease, recording each attempt's outcome,
//! and applying the providers' status callbacks without ever moving a delivery backwards.
//!
//! States ([`DeliveryState`], whose table of allowed moves the database enforces): `queued` (waiting
//! until `due_at`) → `sending` (leased; a provider request may be in flight) → `accepted` (the provider
//! took it; a call or SMS waits for its report until `report_due_at`) → a final state: `delivered`,
//! `failed`, `simulated` (dry-run) or `cancelled` (incident resolved first). A call not reached goes
//! from `accepted` back to `queued` for a redial: a new try, not a step back. No provider's own
//! status words appear here: providers turn them into a [`Report`] first.
//!
//! Leases are judged by the database's clock (the one clock every replica shares), and each claim has
//! its own token: an outcome is recorded only by the claim that still holds the delivery.

use std::time::Duration;

use super::cap::{self, Claimed};
use super::rows::delivery_columns;
use super::sql::{per_engine, Dialect};
use super::{insert_event, DeliveryRow, Store};
use crate::domain::{storable, Channel, DeliveryState, RedialPolicy, Report, ReportOutcome};

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

/// What a report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackEffect {
    /// The delivery moved from one state to another (or, for a progress report, stayed and noted it).
    Applied {
        from: DeliveryState,
        to: DeliveryState,
    },
    /// Known, but nothing changed: a repeat, a late report, or one for an earlier attempt.
    Ignored(String),
    /// No delivery has this provider id.
    Unknown,
    /// The report beat our own record of the request that it reports on (the delivery is still
    /// `sending`): nothing applied yet; ask again in a moment.
    Pending,
}

/// A delivery that changed state outside a provider request (lease expiry, release, deadline), for
/// the caller's logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Moved {
    #[sqlx(rename = "id")]
    pub delivery_id: String,
    #[sqlx(try_from = "String")]
    pub channel: Channel,
    #[sqlx(try_from = "String")]
    pub status: DeliveryState,
}

/// Whether the delivery's incident may still be sent (not resolved), inside an `UPDATE deliveries`.
macro_rules! incident_sends {
    () => {
        "EXISTS (SELECT 1 FROM incidents i WHERE i.id = deliveries.incident_id AND i.status <> 'resolved')"
    };
}

/// Due again, unless its incident was resolved meanwhile: then cancelled.
macro_rules! retry_status {
    () => {
        concat!(
            "CASE WHEN ",
            incident_sends!(),
            " THEN 'queued' ELSE 'cancelled' END"
        )
    };
}

/// `finished_at` for a row set to [`retry_status!`]: set (to the `$n` given) when it became cancelled.
macro_rules! finished_if_cancelled {
    ($param:literal) => {
        concat!(
            "CASE WHEN ",
            incident_sends!(),
            " THEN NULL ELSE ",
            $param,
            " END"
        )
    };
}

/// Whether the delivery's incident is still open (nobody acknowledged it, nor resolved it), inside an
/// `UPDATE deliveries`: only then is a call redialled.
macro_rules! incident_open {
    () => {
        "EXISTS (SELECT 1 FROM incidents i WHERE i.id = deliveries.incident_id AND i.status = 'open')"
    };
}

/// A redial is due again while its incident is open; once someone acknowledged it (or it was
/// resolved) the redial is cancelled.
macro_rules! redial_status {
    () => {
        concat!(
            "CASE WHEN ",
            incident_open!(),
            " THEN 'queued' ELSE 'cancelled' END"
        )
    };
}

/// `finished_at` for a row set to [`redial_status!`].
macro_rules! finished_if_not_redialled {
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
/// also one that was waiting for this very report when its deadline passed (a redial still queued, a
/// delivery failed or left unconfirmed for want of a report): a late "answered" or "delivered" is the
/// truth and beats our guess.
macro_rules! answered_late_or_now {
    () => {
        "((status = 'accepted' AND (provider_id = $2 OR provider_id IS NULL)) \
         OR (status = 'queued' AND provider_id = $2) \
         OR (status = 'unconfirmed' AND provider_id = $2) \
         OR (status = 'failed' AND provider_id = $2 AND last_error LIKE '%no status report%'))"
    };
}

/// A report may change only the accepted attempt it names (a repeat or a late report finds the
/// delivery elsewhere and changes nothing).
macro_rules! this_attempt {
    () => {
        "WHERE id = $1 AND status = 'accepted' AND (provider_id = $2 OR provider_id IS NULL)"
    };
}

const GREETING_FETCHED: &str =
    "UPDATE deliveries SET played_at = COALESCE(played_at, $2), updated_at = $2 WHERE id = $1";
const GREETING_PLAYED_RECORDING: &str =
    "UPDATE deliveries SET played_at = COALESCE(played_at, $2), \
     played_recording_at = COALESCE(played_recording_at, $2), updated_at = $2 WHERE id = $1";
const GREETING_SPOKE_TEXT: &str = "UPDATE deliveries SET played_at = COALESCE(played_at, $2), \
     spoke_text_at = COALESCE(spoke_text_at, $2), updated_at = $2 WHERE id = $1";

const CLAIM: Dialect = per_engine!(
    "UPDATE deliveries SET status = 'sending', lease_owner = $1, lease_token = $2, \
     lease_until = " NOW " + $3, attempts = attempts + 1, updated_at = $4 \
     WHERE id " PICK "SELECT id FROM deliveries WHERE provider = $5 AND status = 'queued' \
       AND due_at <= $4 ORDER BY due_at LIMIT $6" PICKED " \
     RETURNING " DELIVERY_COLUMNS
);

const REQUEUE_EXPIRED: Dialect = per_engine!(
    "UPDATE deliveries SET \
       status = CASE WHEN lease_losses + 1 >= $2 THEN 'failed' ELSE " {retry_status!()} " END, \
       last_error = CASE WHEN lease_losses + 1 >= $2 THEN $3 ELSE last_error END, \
       finished_at = CASE WHEN lease_losses + 1 >= $2 THEN $1 ELSE " {finished_if_cancelled!("$1")} " END, \
       lease_losses = lease_losses + 1, due_at = $1, updated_at = $1, \
       lease_owner = NULL, lease_until = NULL, lease_token = NULL \
     WHERE status = 'sending' AND lease_until < " NOW " RETURNING id, channel, status"
);

const RENEW_LEASE: Dialect = per_engine!(
    "UPDATE deliveries SET lease_until = " NOW " + $3 \
     WHERE id = $1 AND lease_token = $2 AND status = 'sending'"
);

const OVERDUE_REPORTS: Dialect = per_engine!(
    "UPDATE deliveries SET report_due_at = $2 + $3, report_checks = report_checks + 1 \
     WHERE id " PICK "SELECT id FROM deliveries WHERE provider = $1 AND status = 'accepted' \
       AND report_due_at < $2 ORDER BY report_due_at LIMIT $4" PICKED " \
     RETURNING " DELIVERY_COLUMNS
);

const TAKE_RATE_TOKEN: Dialect = per_engine!(
    "UPDATE rate_buckets SET tokens = " LEAST "($2, tokens + (" NOW " - updated_at) * $3) - 1, \
       updated_at = " NOW " \
     WHERE name = $1 AND " LEAST "($2, tokens + (" NOW " - updated_at) * $3) >= 1 RETURNING tokens"
);

const RATE_TOKENS_NOW: Dialect = per_engine!(
    "SELECT " LEAST "($2, tokens + (" NOW " - updated_at) * $3) FROM rate_buckets WHERE name = $1"
);

const NEW_RATE_BUCKET: Dialect = per_engine!(
    "INSERT INTO rate_buckets (name, tokens, updated_at) VALUES ($1, $2, " NOW ") \
     ON CONFLICT (name) DO NOTHING"
);

/// A redial: due again after the policy's delay, one redial more; only from this very attempt.
const REDIAL: &str = concat!(
    "UPDATE deliveries SET status = ",
    redial_status!(),
    ", finished_at = ",
    finished_if_not_redialled!("$4"),
    ", provider_id = $2, provider_status = $3, redials = redials + 1, due_at = $5, updated_at = $4, \
     last_error = $6, report_due_at = NULL ",
    this_attempt!(),
    " AND redials = $7 RETURNING status"
);

/// Not reached and out of redials, or refused: failed, with the reason. A late failure report also
/// settles a delivery left unconfirmed for want of it.
const REPORTED_FAILED: &str = "UPDATE deliveries SET status = 'failed', provider_id = $2, \
     provider_status = $3, finished_at = $4, updated_at = $4, last_error = $5, report_due_at = NULL \
     WHERE id = $1 AND ((status = 'accepted' AND (provider_id = $2 OR provider_id IS NULL)) \
       OR (status = 'unconfirmed' AND provider_id = $2)) \
     AND redials = $6 RETURNING status";

/// Reached (answered, delivered): `$5` is the state it reaches.
const REPORTED_REACHED: &str = concat!(
    "UPDATE deliveries SET status = $5, provider_id = $2, provider_status = $3, \
     finished_at = $4, updated_at = $4, last_error = NULL, report_due_at = NULL \
     WHERE id = $1 AND ",
    answered_late_or_now!(),
    " RETURNING status"
);

/// Answered without the acknowledging keypress (acknowledgement by keypress on): `answered`, with why
/// in `last_error` (`$5`). From the attempt the report names, or from a guess made for want of it.
const REPORTED_ANSWERED: &str = "UPDATE deliveries SET status = 'answered', provider_id = $2, \
     provider_status = $3, finished_at = $4, updated_at = $4, last_error = $5, report_due_at = NULL \
     WHERE id = $1 AND ((status = 'accepted' AND (provider_id = $2 OR provider_id IS NULL)) \
       OR (status = 'unconfirmed' AND provider_id = $2) \
       OR (status = 'failed' AND provider_id = $2 AND last_error LIKE '%no status report%')) \
     RETURNING status";

/// An answered call without the keypress counts as not reached: redialled while redials are left and
/// its incident is open. Once someone acknowledged it stays `answered`: that is what it was.
const REDIAL_ANSWERED: &str = concat!(
    "UPDATE deliveries SET status = 'queued', finished_at = NULL, redials = redials + 1, \
     due_at = $3, updated_at = $2, last_error = $4 \
     WHERE id = $1 AND status = 'answered' AND redials = $5 AND ",
    incident_open!(),
    " RETURNING status"
);

/// Read: a delivered (or still unsettled) message of this provider id was read.
const REPORTED_READ: &str = "UPDATE deliveries SET status = 'read', provider_id = $2, \
     provider_status = $3, finished_at = COALESCE(finished_at, $4), updated_at = $4, last_error = NULL, \
     report_due_at = NULL WHERE id = $1 AND provider_id = $2 \
     AND status IN ('accepted', 'delivered', 'unconfirmed', 'failed') RETURNING status";

/// Progress only, and proof that the request is alive, so the report deadline's look-ups start
/// counting again.
const REPORTED_PROGRESS: &str = concat!(
    "UPDATE deliveries SET provider_status = $3, updated_at = $4, report_checks = 0 ",
    this_attempt!(),
    " RETURNING status"
);

const DEADLINE_REDIAL: &str = concat!(
    "UPDATE deliveries SET status = ",
    redial_status!(),
    ", finished_at = ",
    finished_if_not_redialled!("$2"),
    ", redials = redials + 1, due_at = $3, updated_at = $2, last_error = $4, report_due_at = NULL \
     WHERE id = $1 AND status = 'accepted' AND redials = $5 RETURNING status"
);

const DEADLINE_FAILED: &str = "UPDATE deliveries SET status = 'failed', finished_at = $2, \
     updated_at = $2, last_error = $3, report_due_at = NULL \
     WHERE id = $1 AND status = 'accepted' AND redials = $4 RETURNING status";

/// A message without a report and without a look-up: unconfirmed, until a late report settles it.
const DEADLINE_UNCONFIRMED: &str =
    "UPDATE deliveries SET status = 'unconfirmed', finished_at = $2, \
     updated_at = $2, last_error = $3, report_due_at = NULL \
     WHERE id = $1 AND status = 'accepted' AND redials = $4 RETURNING status";

const RELEASE: &str = concat!(
    "UPDATE deliveries SET status = ",
    retry_status!(),
    ", finished_at = ",
    finished_if_cancelled!("$2"),
    ", lease_owner = NULL, lease_until = NULL, lease_token = NULL, due_at = $2, updated_at = $2 \
     WHERE lease_owner = $1 AND status = 'sending' RETURNING id, channel, status"
);

/// One attempt's end, if the claim (`$2`) still holds the lease. `$3 = 'queued'` means "due again".
const FINISH: &str = concat!(
    "UPDATE deliveries SET \
       status = CASE WHEN $3 = 'queued' THEN ",
    retry_status!(),
    " ELSE $3 END, \
       provider_id = CASE WHEN $3 = 'accepted' THEN $4 ELSE provider_id END, \
       last_error = $5, last_request = COALESCE($6, last_request), due_at = COALESCE($7, due_at), \
       finished_at = CASE WHEN $3 = 'queued' THEN ",
    finished_if_cancelled!("$9"),
    " ELSE $8 END, \
       attempts = attempts - $10, report_due_at = $11, report_checks = 0, \
       lease_owner = NULL, lease_until = NULL, lease_token = NULL, updated_at = $9 \
     WHERE id = $1 AND lease_token = $2 AND status = 'sending' RETURNING status"
);

const BY_PROVIDER_ID: &str = concat!(
    "SELECT ",
    delivery_columns!(),
    " FROM deliveries WHERE channel = $1 AND provider_id = $2"
);

/// No id yet, or a redial still `sending` (its row holds the previous call's id until the new one is
/// recorded): the report then waits for that record instead of getting 404.
const BY_REFERENCE: &str = concat!(
    "SELECT ",
    delivery_columns!(),
    " FROM deliveries WHERE channel = $1 AND greeting_ref = $2 \
     AND (provider_id IS NULL OR status = 'sending')"
);

impl Store {
    /// Leases up to `limit` due deliveries of one provider lane, oldest first, under one fresh claim
    /// token (in each row's `lease_token`) until the database's clock passes `lease` from now. Reads
    /// only the claim index: cheap however deep the queue.
    pub async fn claim(
        &self,
        provider: &str,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> anyhow::Result<Vec<DeliveryRow>> {
        Ok(self
            .claim_capped(provider, owner, lease, limit, 0)
            .await?
            .rows)
    }

    /// [`Store::claim`] with the carrier-safe cap: a claimed call whose number had `cap` calls in the
    /// last hour, and is not its incident's first call there, is moved to `held` in the same
    /// transaction instead of being leased (see [`super::cap`]). `cap` 0 turns it off.
    pub async fn claim_capped(
        &self,
        provider: &str,
        owner: &str,
        lease: Duration,
        limit: i64,
        cap: u32,
    ) -> anyhow::Result<Claimed> {
        self.yield_to_intake().await;
        if limit <= 0 {
            return Ok(Claimed::default());
        }
        let now = self.now_ms();
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut tx = self.writer.begin().await?;
        let claimed: Vec<DeliveryRow> = sqlx::query_as(CLAIM.of(self.engine))
            .bind(owner)
            .bind(&token)
            .bind(lease.as_millis() as i64)
            .bind(now)
            .bind(provider)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        let (mut claimed, held) =
            cap::place_calls(&mut tx, self.engine, claimed, &token, cap, now).await?;
        for d in &mut claimed {
            let detail = format!("attempt {} by {owner}", d.attempts);
            insert_event(&mut *tx, &d.id, "attempt", None, &detail, now).await?;
            Store::issue_ack_ref(&mut tx, d).await?;
        }
        tx.commit().await?;
        Ok(Claimed {
            rows: claimed,
            held,
        })
    }

    /// Puts deliveries whose lease expired by the database's clock (their process died mid-send, or
    /// their outcome could not be recorded) back in the queue, due now: at-least-once. Cancelled
    /// instead if their incident was resolved meanwhile; failed once the lease has run out
    /// `max_losses` times, so a delivery whose outcome can never be recorded still ends. Each gets an
    /// event.
    pub async fn requeue_expired_leases(&self, max_losses: u32) -> anyhow::Result<Vec<Moved>> {
        self.yield_to_intake().await;
        let now = self.now_ms();
        let gave_up = format!(
            "gave up: its lease ran out {max_losses} times before an outcome could be recorded \
             (the process died or the database refused the outcome); it may have been sent"
        );
        let mut tx = self.writer.begin().await?;
        let moved: Vec<Moved> = sqlx::query_as(REQUEUE_EXPIRED.of(self.engine))
            .bind(now)
            .bind(i64::from(max_losses))
            .bind(&gave_up)
            .fetch_all(&mut *tx)
            .await?;
        for m in &moved {
            let detail = match m.status {
                DeliveryState::Failed => gave_up.clone(),
                DeliveryState::Cancelled => "its lease ran out before an outcome was recorded (the process sending it stopped, or the database was out of its reach for the whole lease); outcome unknown; now cancelled: its incident was resolved".to_owned(),
                _ => "its lease ran out before an outcome was recorded (the process sending it stopped, or the database was out of its reach for the whole lease); outcome unknown; now queued again".to_owned(),
            };
            insert_event(
                &mut *tx,
                &m.delivery_id,
                "lease_expired",
                None,
                &detail,
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// Records how an attempt ended, if the claim `token` still holds the lease. Returns the state it
    /// recorded, or `None` when the lease was lost (it expired and another claim took the delivery);
    /// the event is recorded either way.
    pub async fn finish_attempt(
        &self,
        delivery_id: &str,
        token: &str,
        finish: &Finish,
    ) -> anyhow::Result<Option<DeliveryState>> {
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
    ) -> anyhow::Result<Vec<Option<DeliveryState>>> {
        self.yield_to_intake().await;
        let mut tx = self.writer.begin().await?;
        let mut results = Vec::with_capacity(batch.len());
        for (delivery_id, token, finish) in batch {
            results.push(finish_in(&mut tx, delivery_id, token, finish, self.now_ms()).await?);
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
        let renewed = sqlx::query(RENEW_LEASE.of(self.engine))
            .bind(delivery_id)
            .bind(token)
            .bind(lease.as_millis() as i64)
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(renewed == 1)
    }

    /// Accepted deliveries of one provider lane whose report deadline has passed, oldest first. Each
    /// is given its next deadline (`now + wait`) and one more check in the same statement, so replicas
    /// never look up the same row at once and the next sweep waits a full period.
    pub async fn overdue_reports(
        &self,
        provider: &str,
        wait: Duration,
        limit: i64,
    ) -> anyhow::Result<Vec<DeliveryRow>> {
        self.yield_to_intake().await;
        let rows = sqlx::query_as(OVERDUE_REPORTS.of(self.engine))
            .bind(provider)
            .bind(self.now_ms())
            .bind(wait.as_millis() as i64)
            .bind(limit)
            .fetch_all(&self.writer)
            .await?;
        Ok(rows)
    }

    /// An accepted call or message whose report never came and could not be looked up: a call counts
    /// as not reached (redialled while redials remain), an SMS as unconfirmed (failed), a WhatsApp
    /// message as `unconfirmed` (its gateway has no look-up; a late report still settles it).
    /// Guarded, so a report that arrived meanwhile wins.
    pub async fn report_deadline_passed(
        &self,
        d: &DeliveryRow,
        policy: RedialPolicy,
        why: &str,
    ) -> anyhow::Result<CallbackEffect> {
        let now = self.now_ms();
        let policy = d.redial_policy(policy);
        let is_call = d.channel == Channel::Call;
        let redial = is_call && (d.redials as u32) < policy.max_redials;
        // The reasons say "no status report", which a late success report looks for.
        let reason = if is_call {
            not_reached(why, d, policy)
        } else {
            format!("unconfirmed: {why}")
        };
        let mut tx = self.writer.begin().await?;
        let moved: Option<String> = if redial {
            sqlx::query_scalar(DEADLINE_REDIAL)
                .bind(&d.id)
                .bind(now)
                .bind(now + policy.delay.as_millis() as i64)
                .bind(&reason)
                .bind(d.redials)
                .fetch_optional(&mut *tx)
                .await?
        } else {
            let sql = if d.channel == Channel::Whatsapp {
                DEADLINE_UNCONFIRMED
            } else {
                DEADLINE_FAILED
            };
            sqlx::query_scalar(sql)
                .bind(&d.id)
                .bind(now)
                .bind(&reason)
                .bind(d.redials)
                .fetch_optional(&mut *tx)
                .await?
        };
        let effect = match moved.map(DeliveryState::try_from).transpose()? {
            Some(state) => {
                let detail = format!("{reason}; now {state}");
                let provider_id = d.provider_id.as_deref();
                insert_event(&mut *tx, &d.id, "report_overdue", provider_id, &detail, now).await?;
                CallbackEffect::Applied {
                    from: d.status,
                    to: state,
                }
            }
            None => CallbackEffect::Ignored("a report arrived meanwhile".to_owned()),
        };
        tx.commit().await?;
        Ok(effect)
    }

    /// Hands back every lease `owner` holds (graceful shutdown): those deliveries are due again at once,
    /// or cancelled if their incident was resolved meanwhile. Each gets an event.
    pub async fn release(&self, owner: &str) -> anyhow::Result<Vec<Moved>> {
        let now = self.now_ms();
        let mut tx = self.writer.begin().await?;
        let moved: Vec<Moved> = sqlx::query_as(RELEASE)
            .bind(owner)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        for m in &moved {
            let detail = format!(
                "the dispatcher stopped before this attempt finished (outcome unknown); now {}",
                m.status
            );
            insert_event(&mut *tx, &m.delivery_id, "released", None, &detail, now).await?;
        }
        tx.commit().await?;
        Ok(moved)
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
        let per_ms = f64::from(per_minute.max(1)) / 60_000.0;
        let burst = f64::from(burst.max(1));
        // The common case is one statement: take a token from a bucket that has one.
        let granted: Option<f64> = sqlx::query_scalar(TAKE_RATE_TOKEN.of(self.engine))
            .bind(name)
            .bind(burst)
            .bind(per_ms)
            .fetch_optional(&self.writer)
            .await?;
        if granted.is_some() {
            return Ok(None);
        }
        let current: Option<f64> = sqlx::query_scalar(RATE_TOKENS_NOW.of(self.engine))
            .bind(name)
            .bind(burst)
            .bind(per_ms)
            .fetch_optional(&self.writer)
            .await?;
        let Some(current) = current else {
            // First use of this bucket: create it full, then ask again at once.
            sqlx::query(NEW_RATE_BUCKET.of(self.engine))
                .bind(name)
                .bind(burst)
                .execute(&self.writer)
                .await?;
            return Ok(Some(Duration::ZERO));
        };
        let missing = (1.0 - current).clamp(0.0, 1.0);
        let wait_ms = (missing / per_ms).clamp(1.0, 60_000.0);
        Ok(Some(Duration::from_millis(wait_ms as u64)))
    }

    /// The delivery a report names: by provider id, else (for an answer that carried no id) by the
    /// reference we gave the provider.
    async fn report_target(&self, report: &Report) -> anyhow::Result<Option<DeliveryRow>> {
        let channel = report.channel.as_str();
        let found: Option<DeliveryRow> = sqlx::query_as(BY_PROVIDER_ID)
            .bind(channel)
            .bind(&report.provider_id)
            .fetch_optional(&self.reader)
            .await?;
        if found.is_some() {
            return Ok(found);
        }
        let Some(reference) = &report.reference else {
            return Ok(None);
        };
        let found = sqlx::query_as(BY_REFERENCE)
            .bind(channel)
            .bind(reference)
            .fetch_optional(&self.reader)
            .await?;
        Ok(found)
    }

    /// The delivery an earlier attempt's provider id belongs to (a call since redialled).
    async fn earlier_attempt(&self, provider_id: &str) -> anyhow::Result<Option<String>> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT delivery_id FROM delivery_events WHERE provider_id = $1 ORDER BY id LIMIT 1",
        )
        .bind(provider_id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(id)
    }

    /// Applies any provider's report, whatever its channel, through one guarded transition: reached
    /// (answered, delivered, read), not reached (redialled after `policy.delay`, up to
    /// `policy.max_redials` times, then failed), failed, or progress. Every transition requires the
    /// attempt the report names: a repeat or a late report changes nothing. The new state is read
    /// back: a redial of a resolved incident's call is cancelled, not queued.
    pub async fn apply_report(
        &self,
        report: &Report,
        policy: RedialPolicy,
    ) -> anyhow::Result<CallbackEffect> {
        let Some(d) = self.report_target(report).await? else {
            return self
                .unmatched_report(&report.provider_id, &report.detail)
                .await;
        };
        if d.status == DeliveryState::Sending {
            return Ok(CallbackEffect::Pending);
        }
        let now = self.now_ms();
        let policy = d.redial_policy(policy);
        let mut tx = self.writer.begin().await?;
        let applied = report_transition(&mut tx, &d, report, policy, now).await?;
        let (result, note) = match applied {
            Some(state) => {
                // Why an answered call is not reached, on the trail (its last_error is cleared by
                // the redial's next attempt).
                let why = match report.outcome {
                    ReportOutcome::Answered
                        if policy.keypress && state != DeliveryState::Acknowledged =>
                    {
                        format!(
                            "; {}",
                            not_reached("answered, not acknowledged", &d, policy)
                        )
                    }
                    _ => String::new(),
                };
                (
                    CallbackEffect::Applied {
                        from: d.status,
                        to: state,
                    },
                    format!("{}{why}; now {state}", report.detail),
                )
            }
            None => {
                let why = format!("delivery is {}; report changes nothing", d.status);
                let note = format!("{}; ignored: {why}", report.detail);
                (CallbackEffect::Ignored(why), note)
            }
        };
        let kind = report_kind(report.channel);
        insert_event(&mut *tx, &d.id, kind, Some(&report.provider_id), &note, now).await?;
        tx.commit().await?;
        Ok(result)
    }

    /// A report whose id is not any delivery's current one: an earlier attempt's (recorded, ignored)
    /// or unknown.
    async fn unmatched_report(
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
    /// Records that Exotel fetched the call's greeting, and whether it played the caller's recording
    /// (`Some(true)`) or could only speak text because the recording was not in yet (`Some(false)`):
    /// the follow-up call is decided from that.
    pub async fn record_greeting_play(
        &self,
        delivery_id: &str,
        recording: Option<bool>,
    ) -> anyhow::Result<()> {
        let now = self.now_ms();
        let (sql, what) = match recording {
            None => (GREETING_FETCHED, "greeting fetched by Exotel"),
            Some(true) => (
                GREETING_PLAYED_RECORDING,
                "greeting fetched by Exotel: plays the caller's recording",
            ),
            Some(false) => (
                GREETING_SPOKE_TEXT,
                "greeting fetched by Exotel: spoke the text alert; the recording was not in yet",
            ),
        };
        let mut tx = self.writer.begin().await?;
        sqlx::query(sql)
            .bind(delivery_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        insert_event(&mut *tx, delivery_id, "greeting_played", None, what, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Gives queued or held deliveries of `channel` whose lane is not among `known` (comma-separated
    /// lane names) to `lane`; how many moved. Lane names hold no commas (`provider:channel`).
    pub async fn adopt_orphans(
        &self,
        channel: Channel,
        lane: &str,
        known: &str,
    ) -> anyhow::Result<u64> {
        let moved = sqlx::query(
            "UPDATE deliveries SET provider = $1 WHERE channel = $2 AND status IN ('queued', 'held') \
             AND (',' || $3 || ',') NOT LIKE ('%,' || provider || ',%')",
        )
        .bind(lane)
        .bind(channel.as_str())
        .bind(known)
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(moved)
    }

    /// Counts of deliveries by status, for tests and the operator.
    pub async fn delivery_status_counts(&self) -> anyhow::Result<Vec<(String, i64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, COUNT(*) FROM deliveries GROUP BY status ORDER BY status",
        )
        .fetch_all(&self.reader)
        .await?;
        Ok(rows)
    }
}

/// The audit trail's name for a report on this channel.
fn report_kind(channel: Channel) -> &'static str {
    match channel {
        Channel::Call => "call_status",
        Channel::Sms => "sms_status",
        Channel::Whatsapp => "whatsapp_status",
    }
}

/// "not reached: busy (call 1 of 3)".
fn not_reached(why: &str, d: &DeliveryRow, policy: RedialPolicy) -> String {
    format!(
        "not reached: {why} (call {} of {})",
        d.redials + 1,
        policy.max_redials + 1
    )
}

/// Runs the one guarded update a report calls for, inside `tx`; the state it left the delivery in,
/// or `None` when the guard held (nothing changed).
async fn report_transition(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    d: &DeliveryRow,
    report: &Report,
    policy: RedialPolicy,
    now: i64,
) -> anyhow::Result<Option<DeliveryState>> {
    let id = d.id.as_str();
    let sid = report.provider_id.as_str();
    let word = storable(&report.provider_status).into_owned();
    let reason = report.reason().map(|r| storable(r).into_owned());
    let q = |sql| {
        sqlx::query_scalar::<_, String>(sql)
            .bind(id)
            .bind(sid)
            .bind(word.clone())
    };
    let moved = match &report.outcome {
        // With acknowledgement by keypress on, a call picked up is only answered: a person is reached
        // when they press the key (which moves the delivery to `acknowledged` before the call ends,
        // so this report then finds it settled and changes nothing).
        ReportOutcome::Answered if policy.keypress && d.channel == Channel::Call => {
            let why = not_reached("answered, not acknowledged", d, policy);
            let answered: Option<String> = q(REPORTED_ANSWERED)
                .bind(now)
                .bind(storable(&why).into_owned())
                .fetch_optional(&mut **tx)
                .await?;
            if answered.is_some() && (d.redials as u32) < policy.max_redials {
                sqlx::query_scalar(REDIAL_ANSWERED)
                    .bind(id)
                    .bind(now)
                    .bind(now + policy.delay.as_millis() as i64)
                    .bind(storable(&why).into_owned())
                    .bind(d.redials)
                    .fetch_optional(&mut **tx)
                    .await?
                    .or(answered)
            } else {
                answered
            }
        }
        // A call picked up counts as reached while acknowledgement by keypress is off.
        ReportOutcome::Answered | ReportOutcome::Delivered => {
            q(REPORTED_REACHED)
                .bind(now)
                .bind(DeliveryState::Delivered.as_str())
                .fetch_optional(&mut **tx)
                .await?
        }
        ReportOutcome::Read => q(REPORTED_READ).bind(now).fetch_optional(&mut **tx).await?,
        ReportOutcome::Unanswered { reason: why } if (d.redials as u32) < policy.max_redials => {
            let reason = not_reached(why, d, policy);
            q(REDIAL)
                .bind(now)
                .bind(now + policy.delay.as_millis() as i64)
                .bind(storable(&reason).into_owned())
                .bind(d.redials)
                .fetch_optional(&mut **tx)
                .await?
        }
        ReportOutcome::Unanswered { reason: why } => {
            let reason = not_reached(why, d, policy);
            q(REPORTED_FAILED)
                .bind(now)
                .bind(storable(&reason).into_owned())
                .bind(d.redials)
                .fetch_optional(&mut **tx)
                .await?
        }
        ReportOutcome::Failed { .. } => {
            q(REPORTED_FAILED)
                .bind(now)
                .bind(reason)
                .bind(d.redials)
                .fetch_optional(&mut **tx)
                .await?
        }
        ReportOutcome::Progress => {
            q(REPORTED_PROGRESS)
                .bind(now)
                .fetch_optional(&mut **tx)
                .await?
        }
    };
    Ok(moved.map(DeliveryState::try_from).transpose()?)
}

/// Records one attempt's end inside `tx`, if the claim `token` still holds the lease; returns the
/// status recorded. Every text is made storable first: a provider's answer can carry anything.
async fn finish_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    delivery_id: &str,
    token: &str,
    finish: &Finish,
    now: i64,
) -> anyhow::Result<Option<DeliveryState>> {
    let row = FinishRow::of(finish, now);
    let clean = |s: &Option<String>| s.as_deref().map(|v| storable(v).into_owned());
    let recorded: Option<String> = sqlx::query_scalar(FINISH)
        .bind(delivery_id)
        .bind(token)
        .bind(row.status.as_str())
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
    let recorded = recorded.map(DeliveryState::try_from).transpose()?;
    // The carrier-safe cap counts calls placed: an accepted call reached the number; a claim that sent
    // nothing takes its placement back. Whether or not this claim still holds the lease, that is what
    // it did. (No row matches for messages.)
    let placement = match finish {
        Finish::Accepted { .. } => Some(cap::PLACEMENT_ACCEPTED),
        Finish::Requeue { .. } | Finish::Cancelled { .. } | Finish::Simulated { .. } => {
            Some(cap::PLACEMENT_TAKEN_BACK)
        }
        Finish::Retry { .. } | Finish::Failed { .. } => None,
    };
    if let Some(sql) = placement {
        sqlx::query(sql)
            .bind(delivery_id)
            .bind(token)
            .execute(&mut **tx)
            .await?;
    }
    let detail = match recorded {
        Some(DeliveryState::Cancelled) if row.status == DeliveryState::Queued => {
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

impl FinishRow {
    /// What `finish` writes, at `now`. `Queued` stands for "due again" (cancelled instead if the
    /// incident was resolved meanwhile).
    fn of(finish: &Finish, now: i64) -> Self {
        let mut row = FinishRow {
            status: DeliveryState::Queued,
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
                row.status = DeliveryState::Accepted;
                row.provider_id = provider_id.clone();
                row.report_due_at = *report_due_at;
                row.kind = "accepted";
                row.detail = detail.clone();
            }
            Finish::Simulated { request } => {
                row.status = DeliveryState::Simulated;
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
                row.status = if failed {
                    DeliveryState::Failed
                } else {
                    DeliveryState::Cancelled
                };
                // A cancelled claim never reached the provider.
                row.refund = i64::from(!failed);
                row.last_error = Some(reason.clone());
                row.finished_at = Some(now);
                row.kind = row.status.as_str();
                row.detail = reason.clone();
            }
        }
        row
    }
}

/// The columns [`finish_in`] writes for one outcome.
struct FinishRow {
    status: DeliveryState,
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
