//! Alarms: an incident nobody acknowledged in time is marked unreached (a flag on the still-open
//! incident) and alarmed to the `[unreached]` teams; a provider account that refuses every request
//! raises an account alarm. Each alarm is raised once (its dedup key is unique) and is also the outbox
//! of the JSON POST to `alarms.webhook_url`, claimed under a lease judged by the database's clock.

use serde::Serialize;

use super::recordings::insert_incident_event;
use super::sql::{per_engine, Dialect};
use super::{insert_event, Store};
use crate::domain::{mask, storable, Channel};

/// The incident event written when an incident is marked unreached.
pub const UNREACHED_EVENT: &str = "unreached";
/// Purpose of a delivery that alarms the `[unreached]` teams.
pub const ALARM: &str = "alarm";
/// Source of the incident that carries an account alarm to the `[unreached]` teams.
pub const ALARM_SOURCE: &str = "alarm";

/// Alarm kinds.
pub mod kind {
    /// Nobody acknowledged an incident in time.
    pub const UNREACHED: &str = "unreached";
    /// A provider answer that means every later request of its lane will fail too.
    pub const ACCOUNT: &str = "account";
}

/// Open incidents nobody acknowledged whose deadline has passed. Drills never alarm, nor do the
/// incidents that carry an account alarm (they would alarm the same people about themselves).
/// `COALESCE` covers incidents stored before their deadline was stored with them.
const DUE_UNREACHED: &str = "SELECT id FROM incidents WHERE status = 'open' \
     AND unreached_at IS NULL AND source NOT IN ('drill', 'alarm') \
     AND COALESCE(unreached_due_at, received_at + $1) <= $2 ORDER BY received_at LIMIT 100";

/// Guards the marking: only one replica (or round) moves it, and only while still open.
const MARK_UNREACHED: &str = "UPDATE incidents SET unreached_at = $1 \
     WHERE id = $2 AND status = 'open' AND unreached_at IS NULL";

const INSERT_ALARM_DELIVERY: &str =
    "INSERT INTO deliveries (id, incident_id, contact_name, phone, channel, provider, \
     priority, greeting_ref, link_ref, purpose, status, due_at, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'alarm', 'queued', $10, $10, $10) \
     ON CONFLICT DO NOTHING RETURNING id";

const INSERT_ALARM: &str = "INSERT INTO alarms (id, kind, dedup_key, incident_id, lane, reason, \
     summary, body, status, due_at, raised_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) \
     ON CONFLICT DO NOTHING RETURNING id";

/// Who the incident tried, for the webhook's JSON (numbers masked).
const TRIED: &str =
    "SELECT contact_name, phone, channel, status, attempts, purpose FROM deliveries \
     WHERE incident_id = $1 AND purpose <> 'alarm' ORDER BY priority, contact_name, channel";

const CLAIM_DUE: Dialect = per_engine!(
    "UPDATE alarms SET lease_owner = $1, lease_until = " NOW " + $2, attempts = attempts + 1 \
     WHERE id IN (SELECT id FROM alarms WHERE status = 'queued' AND due_at <= $3 \
       AND (lease_until IS NULL OR lease_until < " NOW ") ORDER BY due_at LIMIT 10 " SKIP_LOCKED ") \
     RETURNING id, kind, body, attempts, raised_at"
);

/// Whether any alarm waits for its POST: read first, so an idle second costs a read, not a write
/// (on SQLite the one writer belongs to the emergencies).
const ANY_DUE: &str = "SELECT id FROM alarms WHERE status = 'queued' AND due_at <= $1 LIMIT 1";

const SENT: &str = "UPDATE alarms SET status = 'sent', sent_at = $1, last_error = NULL, \
     lease_owner = NULL, lease_until = NULL WHERE id = $2 AND lease_owner = $3";

const RETRY: &str = "UPDATE alarms SET due_at = $1, last_error = $2, lease_owner = NULL, \
     lease_until = NULL WHERE id = $3 AND lease_owner = $4";

const GAVE_UP: &str = "UPDATE alarms SET status = 'failed', last_error = $1, lease_owner = NULL, \
     lease_until = NULL WHERE id = $2 AND lease_owner = $3";

/// Clears a lane's account alarms and frees their dedup keys, so a later failure alarms again.
const CLEAR_ACCOUNT: &str =
    "UPDATE alarms SET cleared_at = $1, dedup_key = dedup_key || ':cleared:' || id \
     WHERE kind = 'account' AND lane = $2 AND cleared_at IS NULL";

const OPEN_ACCOUNT: &str = "SELECT lane, reason, summary, raised_at FROM alarms \
     WHERE kind = 'account' AND cleared_at IS NULL ORDER BY raised_at";

const UNNOTIFIED_ACCOUNT: &str = "SELECT id, lane, reason, summary FROM alarms \
     WHERE kind = 'account' AND notified_at IS NULL AND cleared_at IS NULL ORDER BY raised_at LIMIT 20";

const MARK_NOTIFIED: &str =
    "UPDATE alarms SET notified_at = $1, incident_id = $2 WHERE id = $3 AND notified_at IS NULL";

const INSERT_ALARM_INCIDENT: &str = "INSERT INTO incidents (id, source, emergency_type, route, \
     message, raw_params, status, received_at) VALUES ($1, 'alarm', 'Account alarm', 'unreached', \
     $2, '{}', 'open', $3)";

const LIST: &str = "SELECT id, kind, dedup_key, incident_id, lane, reason, summary, status, \
     attempts, due_at, last_error, raised_at, sent_at, cleared_at FROM alarms \
     ORDER BY raised_at DESC LIMIT $1";

/// One person to alarm: a contact of the `[unreached]` teams on one channel, and the lane that sends it.
#[derive(Debug, Clone)]
pub struct AlarmTarget {
    pub contact_name: String,
    /// E.164.
    pub phone: String,
    pub channel: Channel,
    pub provider: String,
}

/// What marking one incident unreached did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marked {
    pub incident_id: String,
    /// Alarm deliveries queued.
    pub deliveries: usize,
    /// Whether a webhook POST was queued.
    pub webhook: bool,
}

/// An alarm ready to POST.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueAlarm {
    pub id: String,
    pub kind: String,
    pub body: String,
    pub attempts: i64,
    pub raised_at: i64,
}

/// An account alarm still degrading `/readyz`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct OpenAccountAlarm {
    pub lane: Option<String>,
    pub reason: Option<String>,
    pub summary: String,
    pub raised_at: i64,
}

/// An account alarm whose people are not alarmed yet.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UnnotifiedAlarm {
    pub id: String,
    pub lane: Option<String>,
    pub reason: Option<String>,
    pub summary: String,
}

/// An alarm as `GET /api/v1/alarms` lists it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AlarmRow {
    pub id: String,
    pub kind: String,
    pub dedup_key: String,
    pub incident_id: Option<String>,
    pub lane: Option<String>,
    pub reason: Option<String>,
    pub summary: String,
    /// `queued`, `sent`, `failed` (the webhook refused it for good) or `recorded` (no webhook set).
    pub status: String,
    pub attempts: i64,
    pub due_at: i64,
    pub last_error: Option<String>,
    pub raised_at: i64,
    pub sent_at: Option<i64>,
    pub cleared_at: Option<i64>,
}

/// One delivery of an incident, as the webhook's JSON names it.
#[derive(Debug, Clone, Serialize)]
pub struct Tried {
    pub contact: String,
    /// Masked.
    pub phone: String,
    pub channel: String,
    pub status: String,
    pub attempts: i64,
    pub purpose: String,
}

/// A new account alarm.
#[derive(Debug, Clone)]
pub struct AccountAlarm {
    pub lane: String,
    pub reason: String,
    pub summary: String,
    /// The webhook's JSON.
    pub body: serde_json::Value,
}

impl Store {
    /// Open incidents past their acknowledgement deadline and not yet marked; `default_deadline_ms`
    /// stands in for incidents stored without one.
    pub async fn due_unreached(&self, default_deadline_ms: i64) -> anyhow::Result<Vec<String>> {
        let ids = sqlx::query_scalar(DUE_UNREACHED)
            .bind(default_deadline_ms)
            .bind(self.now_ms())
            .fetch_all(&self.reader)
            .await?;
        Ok(ids)
    }

    /// Marks one incident unreached in ONE transaction: the flag and its time, an incident event,
    /// one alarm delivery per `[unreached]` target and the webhook alarm (`body` is called with the
    /// incident's tried deliveries, and gives the alarm's summary and JSON). Nothing is cancelled:
    /// escalation goes on. `None` when it was already marked, acknowledged or resolved meanwhile
    /// (another replica, a keypress): nothing is written then.
    pub async fn mark_unreached(
        &self,
        incident_id: &str,
        targets: &[AlarmTarget],
        webhook: bool,
        body: impl FnOnce(&[Tried], i64) -> (String, serde_json::Value),
    ) -> anyhow::Result<Option<Marked>> {
        let now = self.now_ms();
        let mut tx = self.writer.begin().await?;
        // The guarded UPDATE first: on SQLite it takes the write lock, on PostgreSQL the row lock, so
        // two replicas marking at once queue here and only one finds the row still unmarked.
        let moved = sqlx::query(MARK_UNREACHED)
            .bind(now)
            .bind(incident_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if moved == 0 {
            return Ok(None);
        }
        let tried: Vec<(String, String, String, String, i64, String)> = sqlx::query_as(TRIED)
            .bind(incident_id)
            .fetch_all(&mut *tx)
            .await?;
        let tried: Vec<Tried> = tried
            .into_iter()
            .map(
                |(contact, phone, channel, status, attempts, purpose)| Tried {
                    contact,
                    phone: mask(&phone),
                    channel,
                    status,
                    attempts,
                    purpose,
                },
            )
            .collect();
        let (summary, json) = body(&tried, now);
        let mut deliveries = 0;
        for t in targets {
            let id: Option<String> = sqlx::query_scalar(INSERT_ALARM_DELIVERY)
                .bind(uuid::Uuid::new_v4().to_string())
                .bind(incident_id)
                .bind(storable(&t.contact_name).into_owned())
                .bind(&t.phone)
                .bind(t.channel.as_str())
                .bind(&t.provider)
                .bind(t.channel.priority())
                .bind(crate::messages::new_reference())
                .bind(crate::messages::new_link_ref())
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(id) = id {
                let detail = format!(
                    "unreached alarm to {} ({}): nobody acknowledged in time",
                    t.contact_name,
                    mask(&t.phone)
                );
                insert_event(&mut *tx, &id, "queued", None, &detail, now).await?;
                deliveries += 1;
            }
        }
        let inserted: Option<String> = sqlx::query_scalar(INSERT_ALARM)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(kind::UNREACHED)
            .bind(format!("unreached:{incident_id}"))
            .bind(incident_id)
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(storable(&summary).into_owned())
            .bind(json.to_string())
            .bind(if webhook { "queued" } else { "recorded" })
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let detail = format!(
            "nobody acknowledged in time: marked unreached; {deliveries} alarm(s) queued to the \
             [unreached] teams{}; escalation goes on",
            match (webhook, inserted.is_some()) {
                (true, true) => ", the alarm webhook queued",
                _ => "",
            }
        );
        insert_incident_event(&mut *tx, incident_id, UNREACHED_EVENT, &detail, now).await?;
        if deliveries > 0 {
            if let Some(wake) = self.engine.wake_on_commit() {
                sqlx::query(wake).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(Some(Marked {
            incident_id: incident_id.to_owned(),
            deliveries,
            webhook: webhook && inserted.is_some(),
        }))
    }

    /// Raises an account alarm once per lane and reason (until it is cleared): true when this call
    /// raised it.
    pub async fn raise_account_alarm(
        &self,
        alarm: &AccountAlarm,
        webhook: bool,
    ) -> anyhow::Result<bool> {
        let now = self.now_ms();
        let inserted: Option<String> = sqlx::query_scalar(INSERT_ALARM)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(kind::ACCOUNT)
            .bind(format!("account:{}:{}", alarm.lane, alarm.reason))
            .bind(None::<String>)
            .bind(&alarm.lane)
            .bind(&alarm.reason)
            .bind(storable(&alarm.summary).into_owned())
            .bind(alarm.body.to_string())
            .bind(if webhook { "queued" } else { "recorded" })
            .bind(now)
            .fetch_optional(&self.writer)
            .await?;
        Ok(inserted.is_some())
    }

    /// Clears the open account alarms of `lane` (it succeeded again); how many.
    pub async fn clear_account_alarms(&self, lane: &str) -> anyhow::Result<u64> {
        let n = sqlx::query(CLEAR_ACCOUNT)
            .bind(self.now_ms())
            .bind(lane)
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(n)
    }

    /// The account alarms not cleared yet: `/readyz` reports them as degraded.
    pub async fn open_account_alarms(&self) -> anyhow::Result<Vec<OpenAccountAlarm>> {
        let rows = sqlx::query_as(OPEN_ACCOUNT).fetch_all(&self.reader).await?;
        Ok(rows)
    }

    /// Account alarms whose people are not alarmed yet.
    pub async fn unnotified_account_alarms(&self) -> anyhow::Result<Vec<UnnotifiedAlarm>> {
        let rows = sqlx::query_as(UNNOTIFIED_ACCOUNT)
            .fetch_all(&self.reader)
            .await?;
        Ok(rows)
    }

    /// Alarms the `[unreached]` teams of an account alarm, in ONE transaction: an incident of source
    /// `alarm` (so they can acknowledge it, and the console shows it) with one alarm delivery per
    /// target. Guarded, so one replica does it. With no targets only the mark is written. The
    /// incident's id when this call did it.
    pub async fn notify_account_alarm(
        &self,
        alarm: &UnnotifiedAlarm,
        targets: &[AlarmTarget],
    ) -> anyhow::Result<Option<String>> {
        let now = self.now_ms();
        let incident_id = (!targets.is_empty()).then(|| uuid::Uuid::new_v4().to_string());
        let mut tx = self.writer.begin().await?;
        let moved = sqlx::query(MARK_NOTIFIED)
            .bind(now)
            .bind(incident_id.as_deref())
            .bind(&alarm.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if moved == 0 {
            return Ok(None);
        }
        let Some(incident_id) = incident_id else {
            tx.commit().await?;
            return Ok(None);
        };
        sqlx::query(INSERT_ALARM_INCIDENT)
            .bind(&incident_id)
            .bind(storable(&alarm.summary).into_owned())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        for t in targets {
            let id: Option<String> = sqlx::query_scalar(INSERT_ALARM_DELIVERY)
                .bind(uuid::Uuid::new_v4().to_string())
                .bind(&incident_id)
                .bind(storable(&t.contact_name).into_owned())
                .bind(&t.phone)
                .bind(t.channel.as_str())
                .bind(&t.provider)
                .bind(t.channel.priority())
                .bind(crate::messages::new_reference())
                .bind(crate::messages::new_link_ref())
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(id) = id {
                let detail = format!(
                    "account alarm to {} ({}): {}",
                    t.contact_name,
                    mask(&t.phone),
                    alarm.summary
                );
                insert_event(&mut *tx, &id, "queued", None, &detail, now).await?;
            }
        }
        insert_incident_event(
            &mut *tx,
            &incident_id,
            "account_alarm",
            &format!("account alarm: {}", alarm.summary),
            now,
        )
        .await?;
        if let Some(wake) = self.engine.wake_on_commit() {
            sqlx::query(wake).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Some(incident_id))
    }

    /// Claims the alarms due for their webhook POST under a lease of `lease_ms`, judged by the
    /// database's clock: two replicas never hold one at once.
    pub async fn claim_due_alarms(
        &self,
        owner: &str,
        lease_ms: i64,
    ) -> anyhow::Result<Vec<DueAlarm>> {
        let any: Option<String> = sqlx::query_scalar(ANY_DUE)
            .bind(self.now_ms())
            .fetch_optional(&self.reader)
            .await?;
        if any.is_none() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query_as(CLAIM_DUE.of(self.engine))
            .bind(owner)
            .bind(lease_ms)
            .bind(self.now_ms())
            .fetch_all(&self.writer)
            .await?;
        Ok(rows)
    }

    /// The webhook took the alarm.
    pub async fn alarm_sent(&self, id: &str, owner: &str) -> anyhow::Result<()> {
        sqlx::query(SENT)
            .bind(self.now_ms())
            .bind(id)
            .bind(owner)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// The webhook failed; try again at `due_at`, or give up (`due_at` none).
    pub async fn alarm_failed(
        &self,
        id: &str,
        owner: &str,
        error: &str,
        due_at: Option<i64>,
    ) -> anyhow::Result<()> {
        let error = storable(error).into_owned();
        match due_at {
            Some(due) => {
                sqlx::query(RETRY)
                    .bind(due)
                    .bind(&error)
                    .bind(id)
                    .bind(owner)
                    .execute(&self.writer)
                    .await?
            }
            None => {
                sqlx::query(GAVE_UP)
                    .bind(&error)
                    .bind(id)
                    .bind(owner)
                    .execute(&self.writer)
                    .await?
            }
        };
        Ok(())
    }

    /// The newest alarms, at most `limit`.
    pub async fn alarms(&self, limit: i64) -> anyhow::Result<Vec<AlarmRow>> {
        let rows = sqlx::query_as(LIST)
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        Ok(rows)
    }
}
