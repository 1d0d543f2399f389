//! The caller's recording: its durable fetch job, its audio in chunks, the links that serve it, the
//! follow-up calls it calls for, and the incident-level events that record what became of it.
//!
//! A recording belongs to one incident (`recordings.incident_id`). Its job is claimed like a delivery
//! (a lease in the database's clock, so one replica fetches it at a time), its audio is written one
//! chunk per statement (a 20 MB recording never holds SQLite's only write lock for long) and read back
//! one chunk at a time.

use serde::Serialize;

use super::sql::{per_engine, Dialect};
use super::Store;
use crate::domain::{storable, Channel, DeliveryState, Purpose};

/// A recording's status.
pub mod status {
    /// Being fetched (or waiting for the next try).
    pub const PENDING: &str = "pending";
    /// Fetched and kept: served at `/r/<ref>`.
    pub const STORED: &str = "stored";
    /// Never became available before its deadline, or refused (too large, not audio…).
    pub const UNAVAILABLE: &str = "unavailable";
    /// Deleted after `recordings.keep_days`.
    pub const DELETED: &str = "deleted";
}

/// Incident event kinds written here.
pub mod event {
    pub const FETCHED: &str = "recording_fetched";
    pub const FETCH_FAILED: &str = "recording_fetch_failed";
    pub const UNAVAILABLE: &str = "recording_unavailable";
    pub const DELETED: &str = "recording_deleted";
    pub const NOT_FETCHED: &str = "recording_not_fetched";
    pub const FOLLOWUP: &str = "recording_followup_call";
}

/// What an incident stores to have its recording fetched (with the incident, in one transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordingFetch {
    /// The Passthru's `RecordingAvailableBy`, when it could be read.
    pub available_by: Option<i64>,
    /// `recordings.fetch_grace`: tries stop this long after the later of `available_by` and arrival.
    pub grace_ms: i64,
}

/// A recording's fetch job and what it came to.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RecordingRow {
    pub incident_id: String,
    /// Exotel's URL (kept for audit; never shown to recipients in proxy mode).
    #[serde(skip)]
    pub source_url: String,
    #[serde(skip)]
    pub call_sid: Option<String>,
    pub status: String,
    pub received_at: i64,
    pub available_by: Option<i64>,
    pub deadline_at: i64,
    pub due_at: i64,
    pub attempts: i64,
    pub auth_refusals: i64,
    #[serde(skip)]
    pub lease_token: Option<String>,
    pub content_type: Option<String>,
    pub bytes: Option<i64>,
    pub chunks: Option<i64>,
    pub last_error: Option<String>,
    pub stored_at: Option<i64>,
    pub finished_at: Option<i64>,
}

macro_rules! recording_columns {
    () => {
        "incident_id, source_url, call_sid, status, received_at, available_by, deadline_at, due_at, \
         attempts, auth_refusals, lease_token, content_type, bytes, chunks, last_error, stored_at, \
         finished_at"
    };
}

/// What `/r/<ref>` needs: the delivery the link was sent with and its incident's recording.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LinkView {
    pub delivery_id: String,
    pub incident_id: String,
    /// When the link was issued (the delivery was queued).
    pub issued_at: i64,
    /// Exotel's URL, for direct mode and for recordings never fetched.
    pub recording_url: Option<String>,
    /// The fetched recording's status, when there is a fetch job.
    pub status: Option<String>,
    pub content_type: Option<String>,
    pub bytes: Option<i64>,
    pub chunks: Option<i64>,
    pub deadline_at: Option<i64>,
    pub due_at: Option<i64>,
}

/// One event in an incident's own audit trail.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct IncidentEventRow {
    pub id: i64,
    pub at: i64,
    pub kind: String,
    pub detail: String,
}

/// A call that may call for a follow-up: its contact, whether its greeting spoke text or played the
/// recording, and whether it is finished.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FollowupCandidate {
    pub incident_id: String,
    pub contact_name: String,
    pub phone: String,
    #[sqlx(try_from = "String")]
    pub purpose: Purpose,
    #[sqlx(try_from = "String")]
    pub status: DeliveryState,
    pub spoke_text_at: Option<i64>,
    pub played_recording_at: Option<i64>,
}

/// Where a fetch job stands after an attempt that did not store the recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptFailed {
    /// Tried again at `due_at`.
    Retry { due_at: i64, auth_refused: bool },
    /// Given up on: the recording is unavailable.
    GiveUp,
}

/// The latest a `RecordingAvailableBy` is believed: an hour after the alert arrived.
const MAX_READY_WAIT_MS: i64 = 3_600_000;

/// A lease on a fetch job: long enough for the slowest download (the fetch's own time limit is 60 s)
/// plus writing it.
const LEASE_MS: i64 = 180_000;

const CLAIM: Dialect = per_engine!(
    "UPDATE recordings SET lease_token = $1, lease_until = " NOW " + $2, attempts = attempts + 1 \
     WHERE incident_id " PICK "SELECT incident_id FROM recordings WHERE status = 'pending' \
       AND due_at <= $3 AND (lease_until IS NULL OR lease_until < " NOW ") ORDER BY due_at LIMIT 1" PICKED " \
       AND status = 'pending' AND (lease_until IS NULL OR lease_until < " NOW ") \
     RETURNING " {recording_columns!()}
);

/// The earliest due time of the jobs free to claim (pending, under no live lease).
const DUE: Dialect = per_engine!(
    "SELECT MIN(due_at) FROM recordings WHERE status = 'pending' \
     AND (lease_until IS NULL OR lease_until < " NOW ")"
);

const PUT_CHUNK: &str = "INSERT INTO recording_chunks (incident_id, seq, data) \
     SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM recordings WHERE incident_id = $1 \
       AND lease_token = $4 AND status = 'pending') \
     ON CONFLICT (incident_id, seq) DO UPDATE SET data = excluded.data";

const STORED: &str = "UPDATE recordings SET status = 'stored', content_type = $3, bytes = $4, \
     chunks = $5, stored_at = $6, finished_at = $6, last_error = NULL, lease_token = NULL, \
     lease_until = NULL WHERE incident_id = $1 AND lease_token = $2 AND status = 'pending' \
     RETURNING received_at";

const RETRY: &str = "UPDATE recordings SET due_at = $3, last_error = $4, \
     auth_refusals = CASE WHEN $5 = 1 THEN auth_refusals + 1 ELSE 0 END, \
     lease_token = NULL, lease_until = NULL \
     WHERE incident_id = $1 AND lease_token = $2 AND status = 'pending' RETURNING attempts";

const GIVE_UP: &str =
    "UPDATE recordings SET status = 'unavailable', finished_at = $3, last_error = $4, \
     lease_token = NULL, lease_until = NULL \
     WHERE incident_id = $1 AND lease_token = $2 AND status = 'pending' RETURNING attempts";

const LINK: &str = "SELECT d.id AS delivery_id, d.incident_id, d.created_at AS issued_at, \
     i.recording_url, r.status, r.content_type, r.bytes, r.chunks, r.deadline_at, r.due_at \
     FROM deliveries d JOIN incidents i ON i.id = d.incident_id \
     LEFT JOIN recordings r ON r.incident_id = d.incident_id WHERE d.link_ref = $1";

/// Whether incident `i` may still have a follow-up call to `$phone`: while it is open, to anyone; once
/// acknowledged, only to the person who acknowledged through a delivery of theirs (the others were
/// told someone has it, and are not called again).
macro_rules! followup_allowed {
    ($phone:literal) => {
        concat!(
            "(i.status = 'open' OR (i.status = 'acknowledged' AND EXISTS (SELECT 1 FROM deliveries a \
             WHERE a.id = i.acknowledged_delivery AND a.phone = ",
            $phone,
            ")))"
        )
    };
}

/// Calls of incidents whose recording is stored, of contacts who may still get a follow-up.
const FOLLOWUP_CANDIDATES: &str = concat!(
    "SELECT d.incident_id, d.contact_name, d.phone, d.purpose, d.status, \
     d.spoke_text_at, d.played_recording_at FROM deliveries d \
     JOIN recordings r ON r.incident_id = d.incident_id JOIN incidents i ON i.id = d.incident_id \
     WHERE r.status = 'stored' AND ",
    followup_allowed!("d.phone"),
    " AND d.channel = 'call' \
       AND EXISTS (SELECT 1 FROM deliveries s WHERE s.incident_id = d.incident_id \
         AND s.phone = d.phone AND s.channel = 'call' AND s.spoke_text_at IS NOT NULL) \
     ORDER BY d.incident_id, d.phone"
);

/// The follow-up, only while its incident still allows it (an acknowledgement may have come since the
/// candidates were read).
const INSERT_FOLLOWUP: &str = concat!(
    "INSERT INTO deliveries (id, incident_id, contact_name, phone, channel, \
     provider, priority, greeting_ref, link_ref, purpose, status, due_at, created_at, updated_at) \
     SELECT $1, $2, $3, $4, 'call', $5, $6, $7, $8, 'followup', 'queued', $9, $9, $9 \
     FROM incidents i WHERE i.id = $2 AND ",
    followup_allowed!("$4"),
    " ON CONFLICT DO NOTHING RETURNING id"
);

/// Stored recordings past their keep time, oldest first.
const EXPIRED: &str =
    "SELECT incident_id FROM recordings WHERE status = 'stored' AND stored_at < $1 \
     ORDER BY stored_at LIMIT $2";

impl Store {
    /// Whether a fetch job is due and free to claim: a read, so that looking often costs no write,
    /// also while other jobs are being fetched (they are under lease).
    pub async fn recording_due(&self, now: i64) -> anyhow::Result<bool> {
        let due: Option<i64> = sqlx::query_scalar(DUE.of(self.engine))
            .fetch_one(&self.reader)
            .await?;
        Ok(due.is_some_and(|d| d <= now))
    }

    /// Claims the next due fetch job, if any, for `LEASE_MS` under `token`, which the caller makes
    /// unique to this claim: every later write of the fetch is guarded by it. A job whose lease ran out
    /// (its replica died or stalled mid-fetch) is claimed again, and the earlier holder's writes are
    /// refused from then on.
    pub async fn claim_recording(&self, token: &str) -> anyhow::Result<Option<RecordingRow>> {
        let row = sqlx::query_as(CLAIM.of(self.engine))
            .bind(token)
            .bind(LEASE_MS)
            .bind(self.now_ms())
            .fetch_optional(&self.writer)
            .await?;
        Ok(row)
    }

    /// Hands back the fetch jobs leased by a stopping process, whose lease tokens all start with
    /// `process` and a colon (`process` holds no `%`, `_` or backslash): due again at once.
    pub async fn release_recordings(&self, process: &str) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE recordings SET lease_token = NULL, lease_until = NULL \
             WHERE lease_token LIKE $1 AND status = 'pending'",
        )
        .bind(format!("{process}:%"))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Writes one chunk of the recording being fetched under `token` (its own short statement).
    pub async fn put_recording_chunk(
        &self,
        incident_id: &str,
        token: &str,
        seq: u64,
        data: Vec<u8>,
    ) -> anyhow::Result<()> {
        let done = sqlx::query(PUT_CHUNK)
            .bind(incident_id)
            .bind(seq as i64)
            .bind(data)
            .bind(token)
            .execute(&self.writer)
            .await?;
        anyhow::ensure!(
            done.rows_affected() == 1,
            "the fetch job's lease was lost while writing the recording"
        );
        Ok(())
    }

    /// Marks the recording stored (`chunks` chunks were written) and records `recording_fetched`.
    /// False when the lease was lost meanwhile (another replica finishes it).
    pub async fn recording_stored(
        &self,
        job: &RecordingRow,
        token: &str,
        content_type: &str,
        bytes: u64,
        chunks: u64,
    ) -> anyhow::Result<bool> {
        let now = self.now_ms();
        let mut tx = self.writer.begin().await?;
        let received: Option<i64> = sqlx::query_scalar(STORED)
            .bind(&job.incident_id)
            .bind(token)
            .bind(content_type)
            .bind(bytes as i64)
            .bind(chunks as i64)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(received) = received else {
            return Ok(false);
        };
        // Chunks past the end are left from an earlier, longer try.
        sqlx::query("DELETE FROM recording_chunks WHERE incident_id = $1 AND seq >= $2")
            .bind(&job.incident_id)
            .bind(chunks as i64)
            .execute(&mut *tx)
            .await?;
        let detail = format!(
            "{bytes} bytes of {content_type}, {} after the alert arrived, attempt {}",
            crate::domain::human_duration_ms(now - received),
            job.attempts
        );
        insert_incident_event(&mut *tx, &job.incident_id, event::FETCHED, &detail, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records a failed attempt: tried again at `due_at`, or given up on when `due_at` is `None`
    /// (the recording is unavailable: `recording_unavailable`). `recording_fetch_failed` is recorded
    /// when the reason differs from the previous attempt's, so minutes of "not ready yet" are one event.
    pub async fn recording_attempt_failed(
        &self,
        job: &RecordingRow,
        token: &str,
        why: &str,
        next: AttemptFailed,
    ) -> anyhow::Result<()> {
        let now = self.now_ms();
        let why = storable(why).into_owned();
        let mut tx = self.writer.begin().await?;
        let attempts: Option<i64> = match next {
            AttemptFailed::Retry {
                due_at,
                auth_refused,
            } => {
                sqlx::query_scalar(RETRY)
                    .bind(&job.incident_id)
                    .bind(token)
                    .bind(due_at)
                    .bind(&why)
                    .bind(i64::from(auth_refused))
                    .fetch_optional(&mut *tx)
                    .await?
            }
            AttemptFailed::GiveUp => {
                sqlx::query_scalar(GIVE_UP)
                    .bind(&job.incident_id)
                    .bind(token)
                    .bind(now)
                    .bind(&why)
                    .fetch_optional(&mut *tx)
                    .await?
            }
        };
        let Some(attempts) = attempts else {
            return Ok(());
        };
        if job.last_error.as_deref() != Some(why.as_str()) {
            let detail = format!("{why} (attempt {attempts})");
            insert_incident_event(
                &mut *tx,
                &job.incident_id,
                event::FETCH_FAILED,
                &detail,
                now,
            )
            .await?;
        }
        if next == AttemptFailed::GiveUp {
            sqlx::query("DELETE FROM recording_chunks WHERE incident_id = $1")
                .bind(&job.incident_id)
                .execute(&mut *tx)
                .await?;
            let detail = format!(
                "no recording after {attempts} attempts; alerts use text only. Last: {why}"
            );
            insert_incident_event(&mut *tx, &job.incident_id, event::UNAVAILABLE, &detail, now)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The incident's recording job, if it has one.
    pub async fn recording(&self, incident_id: &str) -> anyhow::Result<Option<RecordingRow>> {
        let row = sqlx::query_as(concat!(
            "SELECT ",
            recording_columns!(),
            " FROM recordings WHERE incident_id = $1"
        ))
        .bind(incident_id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row)
    }

    /// What the recording link `link_ref` leads to.
    pub async fn recording_link(&self, link_ref: &str) -> anyhow::Result<Option<LinkView>> {
        let row = sqlx::query_as(LINK)
            .bind(link_ref)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row)
    }

    /// One chunk of a stored recording.
    pub async fn recording_chunk(
        &self,
        incident_id: &str,
        seq: u64,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        let data = sqlx::query_scalar(
            "SELECT data FROM recording_chunks WHERE incident_id = $1 AND seq = $2",
        )
        .bind(incident_id)
        .bind(seq as i64)
        .fetch_optional(&self.reader)
        .await?;
        Ok(data)
    }

    /// Appends an event to an incident's own audit trail.
    pub async fn record_incident_event(
        &self,
        incident_id: &str,
        kind: &str,
        detail: &str,
    ) -> anyhow::Result<()> {
        insert_incident_event(&self.writer, incident_id, kind, detail, self.now_ms()).await
    }

    /// The incident's own events, oldest first.
    pub async fn incident_timeline(
        &self,
        incident_id: &str,
    ) -> anyhow::Result<Vec<IncidentEventRow>> {
        let rows = sqlx::query_as(
            "SELECT id, at, kind, detail FROM incident_events WHERE incident_id = $1 ORDER BY id",
        )
        .bind(incident_id)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows)
    }

    /// Calls of open incidents whose stored recording may call for a follow-up: every call to a
    /// contact of whom at least one call's greeting spoke text.
    pub async fn followup_candidates(&self) -> anyhow::Result<Vec<FollowupCandidate>> {
        let rows = sqlx::query_as(FOLLOWUP_CANDIDATES)
            .fetch_all(&self.reader)
            .await?;
        Ok(rows)
    }

    /// Queues the one follow-up call to `phone` for `incident_id`, sent by `provider`; false when it
    /// already exists (the unique index keeps it to one, whichever replica gets there first).
    pub async fn add_followup(
        &self,
        incident_id: &str,
        contact_name: &str,
        phone: &str,
        provider: &str,
    ) -> anyhow::Result<bool> {
        let now = self.now_ms();
        let mut tx = self.writer.begin().await?;
        let id: Option<String> = sqlx::query_scalar(INSERT_FOLLOWUP)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(incident_id)
            .bind(storable(contact_name).into_owned())
            .bind(phone)
            .bind(provider)
            .bind(Channel::Call.priority())
            .bind(crate::messages::new_reference())
            .bind(crate::messages::new_link_ref())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(id) = id else {
            return Ok(false);
        };
        let detail = format!(
            "one more call to {} ({}) to play the recording their first call could not",
            storable(contact_name),
            crate::domain::mask(phone)
        );
        insert_incident_event(&mut *tx, incident_id, event::FOLLOWUP, &detail, now).await?;
        super::insert_event(
            &mut *tx,
            &id,
            "queued",
            None,
            "follow-up call: plays the recording",
            now,
        )
        .await?;
        if let Some(wake) = self.engine.wake_on_commit() {
            sqlx::query(wake).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes the audio of recordings stored before `cutoff_ms`, `batch` at a time, each in its own
    /// transaction, and records `recording_deleted`; how many were deleted.
    pub async fn delete_recordings_stored_before(
        &self,
        cutoff_ms: i64,
        batch: u32,
    ) -> anyhow::Result<u64> {
        let ids: Vec<String> = sqlx::query_scalar(EXPIRED)
            .bind(cutoff_ms)
            .bind(i64::from(batch.max(1)))
            .fetch_all(&self.writer)
            .await?;
        let mut deleted = 0;
        for id in ids {
            let now = self.now_ms();
            let mut tx = self.writer.begin().await?;
            let changed = sqlx::query(
                "UPDATE recordings SET status = 'deleted' WHERE incident_id = $1 AND status = 'stored'",
            )
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            if changed.rows_affected() == 1 {
                sqlx::query("DELETE FROM recording_chunks WHERE incident_id = $1")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                insert_incident_event(
                    &mut *tx,
                    &id,
                    event::DELETED,
                    "recording deleted after recordings.keep_days; its links answer 410",
                    now,
                )
                .await?;
                deleted += 1;
            }
            tx.commit().await?;
        }
        Ok(deleted)
    }
}

/// Inserts the fetch job of a new incident's recording, inside the incident's transaction.
pub(super) async fn insert_recording(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    incident_id: &str,
    url: &str,
    call_sid: Option<&str>,
    fetch: RecordingFetch,
    now: i64,
) -> anyhow::Result<()> {
    // A RecordingAvailableBy far in the future (misread, or a clock gone wrong) must not keep links
    // answering "not ready yet" for days: Exotel's recordings take at most about 15 minutes.
    let ready_by = fetch
        .available_by
        .unwrap_or(now)
        .clamp(now, now + MAX_READY_WAIT_MS);
    let deadline = ready_by + fetch.grace_ms;
    sqlx::query(
        "INSERT INTO recordings (incident_id, source_url, call_sid, status, received_at, available_by, \
         deadline_at, due_at) VALUES ($1, $2, $3, 'pending', $4, $5, $6, $4) ON CONFLICT DO NOTHING",
    )
    .bind(incident_id)
    .bind(url)
    .bind(call_sid)
    .bind(now)
    .bind(fetch.available_by)
    .bind(deadline)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(super) async fn insert_incident_event<'e, E>(
    executor: E,
    incident_id: &str,
    kind: &str,
    detail: &str,
    at: i64,
) -> anyhow::Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO incident_events (incident_id, at, kind, detail) VALUES ($1, $2, $3, $4)",
    )
    .bind(incident_id)
    .bind(at)
    .bind(kind)
    .bind(storable(detail).into_owned())
    .execute(executor)
    .await?;
    Ok(())
}
