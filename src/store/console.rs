//! What the ops console keeps and reads: signed-in sessions (by the hash of their id), the open
//! incidents of the board with their deliveries, and the cheap fingerprint its change watcher polls.

use super::rows::{delivery_columns, incident_columns};
use super::{DeliveryRow, IncidentRow, Store};

/// A signed-in console session, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConsoleSessionRow {
    /// Who is acting, as given at sign-in: recorded on each action.
    pub name: String,
    /// `admin` or `console`.
    pub role: String,
    /// The token every state-changing form of this session must carry.
    pub csrf: String,
    /// SHA-256 of the token that signed the session in.
    pub token_digest: String,
    pub expires_at: i64,
}

/// A session to store.
#[derive(Debug, Clone, Copy)]
pub struct NewConsoleSession<'a> {
    /// SHA-256 of the session id; the raw id is only ever in the browser's cookie.
    pub id_hash: &'a str,
    pub name: &'a str,
    pub role: &'a str,
    pub csrf: &'a str,
    /// SHA-256 of the token that signed it in.
    pub token_digest: &'a str,
    pub expires_at: i64,
}

/// A summary of everything the board shows: when it differs from the last one, something changed.
/// Each part is read through an index (or a primary key), so polling it twice a second stays cheap
/// however many incidents are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Fingerprint {
    /// Every delivery move leaves a delivery event.
    pub delivery_event: Option<i64>,
    /// What happened to incidents as a whole (their recording, follow-up calls).
    pub incident_event: Option<i64>,
    /// A new incident.
    pub received: Option<i64>,
    /// A resolution.
    pub resolved: Option<i64>,
}

impl Store {
    /// Stores a new session under the hash of its id, and forgets sessions that have expired.
    pub async fn create_console_session(
        &self,
        new: &NewConsoleSession<'_>,
        now: i64,
    ) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM console_sessions WHERE expires_at < $1")
            .bind(now)
            .execute(&self.writer)
            .await?;
        sqlx::query(
            "INSERT INTO console_sessions (id_hash, name, role, csrf, token_digest, created_at, \
             expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(new.id_hash)
        .bind(new.name)
        .bind(new.role)
        .bind(new.csrf)
        .bind(new.token_digest)
        .bind(now)
        .bind(new.expires_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The unexpired session whose id hashes to `id_hash`.
    pub async fn console_session(
        &self,
        id_hash: &str,
        now: i64,
    ) -> anyhow::Result<Option<ConsoleSessionRow>> {
        let row = sqlx::query_as(
            "SELECT name, role, csrf, token_digest, expires_at FROM console_sessions \
             WHERE id_hash = $1 AND expires_at > $2",
        )
        .bind(id_hash)
        .bind(now)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row)
    }

    /// Signs a session out.
    pub async fn delete_console_session(&self, id_hash: &str) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
            .bind(id_hash)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// The board's fingerprint: one round trip, four index look-ups.
    pub async fn console_fingerprint(&self) -> anyhow::Result<Fingerprint> {
        let f = sqlx::query_as(
            "SELECT CAST((SELECT MAX(id) FROM delivery_events) AS BIGINT) AS delivery_event, \
             CAST((SELECT MAX(id) FROM incident_events) AS BIGINT) AS incident_event, \
             CAST((SELECT MAX(received_at) FROM incidents) AS BIGINT) AS received, \
             CAST((SELECT MAX(resolved_at) FROM incidents) AS BIGINT) AS resolved",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(f)
    }

    /// The `limit` newest unresolved incidents, newest first.
    pub async fn open_incidents(&self, limit: i64) -> anyhow::Result<Vec<IncidentRow>> {
        let rows = sqlx::query_as(concat!(
            "SELECT ",
            incident_columns!(),
            " FROM incidents WHERE status <> 'resolved' \
             ORDER BY received_at DESC, id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows)
    }

    /// The deliveries of the `limit` newest unresolved incidents, in one query.
    pub async fn open_incident_deliveries(&self, limit: i64) -> anyhow::Result<Vec<DeliveryRow>> {
        let rows = sqlx::query_as(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE incident_id IN (SELECT id FROM incidents \
             WHERE status <> 'resolved' ORDER BY received_at DESC, id DESC LIMIT $1) \
             ORDER BY created_at, contact_name, id"
        ))
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows)
    }
}
