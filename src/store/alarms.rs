//! Alarms: an incident nobody acknowledged in time is marked unreached (a flag on the still-open
//! incident) and alarmed to the `[unreached]` teams; a provider account that refuses every request
//! raises an account alarm. Each alarm is raised once (its dedup key is unique) and is also the outbox
//! of the JSON POST to `alarms.webhook_url`, claimed under a lease judged by the database's clock.

use serde::Serialize;

use super::recordings::insert_incident_event;
use super::sql::{per_engine, Dialect};
use super::{insert_event, Store};
use crate::domain::{mask, storable, Channel, Purpose, Source};

/// The incident event written when an incident is marked unreached.
pub const UNREACHED_EVENT: &str = "unreached";

/// Alarm kinds.
pub mod kind {
    /// Nobody acknowledged an incident in time.
    pub const UNREACHED: &str = "unreached";
    /// A provider answer that means every later request of its lane will fail too.
    pub const ACCOUNT: &str = "account";
}

/// Open incidents nobody acknowledged whose deadline has passed. Drills never alarm, nor do the
/// incidents that carry an account alarm (they would alarm the same people about themselves). Only
/// incidents stored with their deadline: intake sets it on every other incident, so the ones without
/// it were stored before the upgrade that brought alarms, and alarming all of them at the first start
/// after upgrading would page everyone about old news.
const DUE_UNREACHED: &str = "SELECT id FROM incidents WHERE status = 'open' \
     AND unreached_at IS NULL AND source NOT IN ('drill', 'alarm') \
     AND unreached_due_at IS NOT NULL AND unreached_due_at <= $1 ORDER BY received_at LIMIT 100";

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
     WHERE id " PICK "SELECT id FROM alarms WHERE status = 'queued' AND due_at <= $3 \
       AND (lease_until IS NULL OR lease_until < " NOW ") ORDER BY due_at LIMIT $4" PICKED " \
       AND status = 'queued' AND (lease_until IS NULL OR lease_until < " NOW ") \
     RETURNING id, kind, body, attempts, raised_at"
);

/// Hands back the alarms a stopping process was POSTing: due again at once, for the next process or
/// another replica.
const RELEASE: &str = "UPDATE alarms SET lease_owner = NULL, lease_until = NULL \
     WHERE lease_owner = $1 AND status = 'queued'";

/// Whether any alarm waits for its POST: read first, so an idle second costs a read, not a write
/// (on SQLite the one writer belongs to the emergencies). Alarms under lease are being POSTed: a
/// webhook that hangs on them costs no write either.
const ANY_DUE: Dialect = per_engine!(
    "SELECT id FROM alarms WHERE status = 'queued' AND due_at <= $1 \
     AND (lease_until IS NULL OR lease_until < " NOW ") LIMIT 1"
);

const SENT: &str = "UPDATE alarms SET status = 'sent', sent_at = $1, last_error = NULL, \
     lease_owner = NULL, lease_until = NULL WHERE id = $2 AND lease_owner = $3";

const RETRY: &str = "UPDATE alarms SET due_at = $1, last_error = $2, lease_owner = NULL, \
     lease_until = NULL WHERE id = $3 AND lease_owner = $4";

const GAVE_UP: &str = "UPDATE alarms SET status = 'failed', last_error = $1, lease_owner = NULL, \
     lease_until = NULL WHERE id = $2 AND lease_owner = $3";

/// Clears the account alarms of a lane or provider account (`$2`, `$3`) that an accepted request
/// disproves, and frees their dedup keys, so a later failure raises a new one. DLT blocks are left
/// open: the provider accepts a request before the operators scrub it, so only a delivered SMS
/// disproves them (see [`CLEAR_KEY`]).
const CLEAR_ACCOUNT: &str =
    "UPDATE alarms SET cleared_at = $1, dedup_key = dedup_key || ':cleared:' || id \
     WHERE kind = 'account' AND lane IN ($2, $3) AND cleared_at IS NULL \
       AND reason NOT IN ('dlt_sender', 'dlt_template')";

/// Clears the open account alarm of one dedup key.
const CLEAR_KEY: &str =
    "UPDATE alarms SET cleared_at = $1, dedup_key = dedup_key || ':cleared:' || id \
     WHERE kind = 'account' AND dedup_key = $2 AND cleared_at IS NULL";

/// The open DLT alarms of a lane: read before a delivered SMS clears one, so that the usual delivered
/// report costs one read and no write.
const OPEN_DLT: &str = "SELECT dedup_key, reason FROM alarms WHERE kind = 'account' \
     AND cleared_at IS NULL AND lane = $1 AND reason IN ('dlt_sender', 'dlt_template')";

/// Whether an alarm of this key (`$1`, escaped for `LIKE`, with the `:cleared:` suffix and `%`) that
/// paged someone was raised since `$2`. Paged: its webhook POST was queued (status other than
/// `recorded`), its people were alarmed through an incident, or they are still to be. A cooled-down
/// alarm is `recorded` with `notified_at` set and no incident, so it never starts a cooldown itself.
const PAGED_SINCE: &str = "SELECT id FROM alarms WHERE kind = 'account' \
     AND dedup_key LIKE $1 ESCAPE '!' AND raised_at > $2 \
     AND (status <> 'recorded' OR incident_id IS NOT NULL OR notified_at IS NULL) LIMIT 1";

/// A new account alarm within the cooldown: recorded (listed, `/readyz` degraded), its people taken
/// as notified and its webhook POST not queued, so it pages nobody.
const INSERT_COOLED: &str = "INSERT INTO alarms (id, kind, dedup_key, incident_id, lane, reason, \
     summary, body, status, due_at, raised_at, notified_at, last_error) \
     VALUES ($1, 'account', $2, NULL, $3, $4, $5, $6, 'recorded', $7, $7, $7, $8) \
     ON CONFLICT DO NOTHING RETURNING id";

/// Whether a report of this key (`$1`, escaped for `LIKE`, with the `:cleared:` suffix and `%`) was
/// recorded since `$2`: one an hour, across replicas.
const REPORTED_SINCE: &str = "SELECT id FROM alarms WHERE kind = 'account' \
     AND dedup_key LIKE $1 ESCAPE '!' AND raised_at > $2 LIMIT 1";

/// A report: an account alarm that tells of something seen rather than a condition that stays. Its
/// people are taken as notified (nobody is paged) and it is cleared as it is raised (it never degrades
/// `/readyz`, and nothing has to clear it); its dedup key is the cleared form, unique by its id. The
/// webhook POST is queued (`$7`) when a webhook is set.
const INSERT_REPORT: &str = "INSERT INTO alarms (id, kind, dedup_key, incident_id, lane, reason, \
     summary, body, status, due_at, raised_at, notified_at, cleared_at) \
     VALUES ($1, 'account', $2, NULL, $3, $4, $5, $6, $7, $8, $8, $8, $8) \
     ON CONFLICT DO NOTHING RETURNING id";

/// What a delivered SMS was sent as: its purpose and its incident's source (which pick its message
/// kind, and so its DLT template).
const SMS_KIND: &str = "SELECT d.purpose, i.source FROM deliveries d \
     JOIN incidents i ON i.id = d.incident_id \
     WHERE d.provider_id = $1 AND d.channel = 'sms' LIMIT 1";

const OPEN_ACCOUNT: &str = "SELECT lane, reason, raised_at FROM alarms \
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

/// How long after an account alarm that paged someone another of the same key pages nobody: a cause
/// that comes and goes (a flapping account, a token changed back and forth) pages at most once an
/// hour. The later ones are still recorded, listed and counted, and degrade `/readyz`.
pub const ACCOUNT_COOLDOWN_MS: i64 = 3_600_000;

/// An account alarm still degrading `/readyz`. Only its lane (or provider account) and reason: anyone
/// may read `/readyz`, and the summary holds the provider's own words.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct OpenAccountAlarm {
    pub lane: Option<String>,
    pub reason: Option<String>,
    pub raised_at: i64,
}

/// What raising an account alarm did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raised {
    /// A new alarm, to page its people and its webhook.
    Paged,
    /// A new alarm within [`ACCOUNT_COOLDOWN_MS`] of one of the same key that paged: recorded only.
    CooledDown,
    /// One of this key is open already (raised by this or another replica): nothing written.
    AlreadyOpen,
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
    /// What it is about: a provider account (`exotel`, `gupshup`) for what all its lanes share
    /// (credentials, balance), a lane (`exotel:sms`) for what only it has (DLT), or `webhook`.
    pub lane: String,
    /// Its dedup key after `account:`: `<lane>:<reason>`, and for a DLT template block
    /// `:<template id>` after that (one template blocked says nothing of another).
    pub key: String,
    pub reason: String,
    pub summary: String,
    /// The webhook's JSON.
    pub body: serde_json::Value,
}

/// `s` with `LIKE`'s wildcards (and the escape character `!`) escaped.
fn like_escaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if matches!(c, '%' | '_' | '!') {
            out.push('!');
        }
        out.push(c);
    }
    out
}

impl Store {
    /// Open incidents past their acknowledgement deadline and not yet marked; incidents stored
    /// without a deadline (before the upgrade that brought alarms) are never marked.
    pub async fn due_unreached(&self) -> anyhow::Result<Vec<String>> {
        let ids = sqlx::query_scalar(DUE_UNREACHED)
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

    /// Raises an account alarm once per key (until it is cleared), whichever replica sees it first.
    /// Within [`ACCOUNT_COOLDOWN_MS`] of an alarm of the same key that paged, the new one is recorded
    /// without paging anyone.
    pub async fn raise_account_alarm(
        &self,
        alarm: &AccountAlarm,
        webhook: bool,
    ) -> anyhow::Result<Raised> {
        let now = self.now_ms();
        let key = format!("account:{}", alarm.key);
        let pattern = format!("{}:cleared:%", like_escaped(&key));
        let paged: Option<String> = sqlx::query_scalar(PAGED_SINCE)
            .bind(&pattern)
            .bind(now - ACCOUNT_COOLDOWN_MS)
            .fetch_optional(&self.reader)
            .await?;
        let summary = storable(&alarm.summary).into_owned();
        if paged.is_some() {
            let inserted: Option<String> = sqlx::query_scalar(INSERT_COOLED)
                .bind(uuid::Uuid::new_v4().to_string())
                .bind(&key)
                .bind(&alarm.lane)
                .bind(&alarm.reason)
                .bind(&summary)
                .bind(alarm.body.to_string())
                .bind(now)
                .bind("raised again within an hour of the same alarm: recorded, nobody paged")
                .fetch_optional(&self.writer)
                .await?;
            return Ok(if inserted.is_some() {
                Raised::CooledDown
            } else {
                Raised::AlreadyOpen
            });
        }
        let inserted: Option<String> = sqlx::query_scalar(INSERT_ALARM)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(kind::ACCOUNT)
            .bind(&key)
            .bind(None::<String>)
            .bind(&alarm.lane)
            .bind(&alarm.reason)
            .bind(&summary)
            .bind(alarm.body.to_string())
            .bind(if webhook { "queued" } else { "recorded" })
            .bind(now)
            .fetch_optional(&self.writer)
            .await?;
        Ok(if inserted.is_some() {
            Raised::Paged
        } else {
            Raised::AlreadyOpen
        })
    }

    /// Records `alarm` as a report that pages nobody (see [`INSERT_REPORT`]), its webhook POST queued
    /// when `webhook`; at most one of its key an hour, whichever replica comes first. Whether this call
    /// recorded it.
    pub async fn report_account_alarm(
        &self,
        alarm: &AccountAlarm,
        webhook: bool,
    ) -> anyhow::Result<bool> {
        let now = self.now_ms();
        let key = format!("account:{}", alarm.key);
        let pattern = format!("{}:cleared:%", like_escaped(&key));
        let recent: Option<String> = sqlx::query_scalar(REPORTED_SINCE)
            .bind(&pattern)
            .bind(now - ACCOUNT_COOLDOWN_MS)
            .fetch_optional(&self.reader)
            .await?;
        if recent.is_some() {
            return Ok(false);
        }
        let id = uuid::Uuid::new_v4().to_string();
        let inserted: Option<String> = sqlx::query_scalar(INSERT_REPORT)
            .bind(&id)
            .bind(format!("{key}:cleared:{id}"))
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

    /// Clears the open account alarms of `lane` and of its provider `account` that an accepted
    /// request disproves (not DLT blocks); how many.
    pub async fn clear_account_alarms(&self, lane: &str, account: &str) -> anyhow::Result<u64> {
        let n = sqlx::query(CLEAR_ACCOUNT)
            .bind(self.now_ms())
            .bind(lane)
            .bind(account)
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(n)
    }

    /// Clears the open account alarm of one key (after `account:`); how many.
    pub async fn clear_account_alarm_key(&self, key: &str) -> anyhow::Result<u64> {
        let n = sqlx::query(CLEAR_KEY)
            .bind(self.now_ms())
            .bind(format!("account:{key}"))
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(n)
    }

    /// The open DLT alarms of `lane`: (dedup key after `account:`, reason).
    pub async fn open_dlt_alarms(&self, lane: &str) -> anyhow::Result<Vec<(String, String)>> {
        let rows: Vec<(String, String)> = sqlx::query_as(OPEN_DLT)
            .bind(lane)
            .fetch_all(&self.reader)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(k, r)| (k.trim_start_matches("account:").to_owned(), r))
            .collect())
    }

    /// The purpose of the SMS with provider id `sms_sid` and its incident's source, when it is ours.
    pub async fn sms_kind(&self, sms_sid: &str) -> anyhow::Result<Option<(Purpose, Source)>> {
        let row: Option<(String, String)> = sqlx::query_as(SMS_KIND)
            .bind(sms_sid)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|(purpose, source)| Ok((purpose.parse()?, source.parse()?)))
            .transpose()
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

    /// Claims at most `limit` of the alarms due for their webhook POST, oldest due first, under a lease
    /// of `lease_ms`, judged by the database's clock: two replicas never hold one at once.
    pub async fn claim_due_alarms(
        &self,
        owner: &str,
        lease_ms: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<DueAlarm>> {
        let any: Option<String> = sqlx::query_scalar(ANY_DUE.of(self.engine))
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
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.writer)
            .await?;
        Ok(rows)
    }

    /// Hands back the alarms leased by `owner` that are still queued (a stopping process).
    pub async fn release_alarms(&self, owner: &str) -> anyhow::Result<()> {
        sqlx::query(RELEASE)
            .bind(owner)
            .execute(&self.writer)
            .await?;
        Ok(())
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
