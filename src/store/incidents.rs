//! Operator queries on incidents: listing, resolving (with cancellation of what has not gone out), the
//! queue figures `/metrics` shows, and a read-only look at stored secrets for the `trigger` command.

use std::collections::HashMap;

use anyhow::Context;
use sqlx::Row;

use super::rows::incident_columns;
use super::{insert_event, EventRow, IncidentRow, Moved, Store};
use crate::domain::IncidentState;

/// Which incidents to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct IncidentFilter {
    pub status: Option<IncidentState>,
    pub emergency_type: Option<String>,
    /// Only incidents older than this one (keyset pagination: stable while new incidents arrive).
    pub before: Option<String>,
    pub offset: i64,
    pub limit: i64,
}

/// The outcome of [`Store::resolve_incident`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// False when the incident was already resolved: nothing changed.
    pub changed: bool,
    /// Each delivery moved from `queued` (or `held`) to `cancelled`.
    pub cancelled: Vec<Moved>,
}

/// Deliveries waiting to go out, for the queue gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Queued and due: work the dispatchers should be doing now.
    pub depth: i64,
    /// Queued for later: a later tier, a redial, a retry waiting its turn.
    pub scheduled: i64,
    pub oldest_due_at: Option<i64>,
    /// Calls and messages accepted by the provider whose report deadline has passed without a report.
    pub unconfirmed: i64,
}

impl Store {
    /// Incidents matching `filter`, newest first. `None` when `before` names no incident.
    pub async fn list_incidents(
        &self,
        filter: &IncidentFilter,
    ) -> anyhow::Result<Option<Vec<IncidentRow>>> {
        let cursor = match &filter.before {
            Some(id) => match self.incident(id).await? {
                Some(row) => Some((row.received_at, row.id)),
                None => return Ok(None),
            },
            None => None,
        };
        // One statement for every filter: an absent filter is a NULL that matches everything.
        let rows = sqlx::query_as(concat!(
            "SELECT ",
            incident_columns!(),
            " FROM incidents \
             WHERE ($1 IS NULL OR status = $1) \
               AND ($2 IS NULL OR LOWER(emergency_type) = $2) \
               AND ($3 IS NULL OR received_at < $3 OR (received_at = $3 AND id < $4)) \
             ORDER BY received_at DESC, id DESC LIMIT $5 OFFSET $6"
        ))
        .bind(filter.status.map(IncidentState::as_str))
        .bind(filter.emergency_type.as_deref().map(str::to_lowercase))
        .bind(cursor.as_ref().map(|(at, _)| *at))
        .bind(cursor.as_ref().map(|(_, id)| id.as_str()))
        .bind(filter.limit)
        .bind(filter.offset)
        .fetch_all(&self.reader)
        .await?;
        Ok(Some(rows))
    }

    /// Every event of every delivery of the incident, grouped by delivery, oldest first.
    pub async fn incident_events(
        &self,
        incident_id: &str,
    ) -> anyhow::Result<HashMap<String, Vec<EventRow>>> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT e.id, e.delivery_id, e.at, e.kind, e.provider_id, e.detail \
             FROM delivery_events e JOIN deliveries d ON d.id = e.delivery_id \
             WHERE d.incident_id = $1 ORDER BY e.id",
        )
        .bind(incident_id)
        .fetch_all(&self.reader)
        .await?;
        let mut out: HashMap<String, Vec<EventRow>> = HashMap::new();
        for e in rows {
            out.entry(e.delivery_id.clone()).or_default().push(e);
        }
        Ok(out)
    }

    /// The unresolved incident holding `dedup_key`, if any.
    pub async fn open_incident_by_dedup_key(
        &self,
        dedup_key: &str,
    ) -> anyhow::Result<Option<IncidentRow>> {
        let row = sqlx::query_as(concat!(
            "SELECT ",
            incident_columns!(),
            " FROM incidents WHERE dedup_key = $1 AND status <> 'resolved'"
        ))
        .bind(dedup_key)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row)
    }

    /// Closes the incident and cancels its deliveries that have not gone out (`queued`), with a
    /// `cancelled` event each, in one transaction. Deliveries already claimed by the dispatcher
    /// (`sending`) or finished are left alone: what is in flight is reported, not hidden.
    /// `None` when no incident has this id.
    pub async fn resolve_incident(
        &self,
        id: &str,
        reason: &str,
    ) -> anyhow::Result<Option<Resolved>> {
        // A resolve locks the incident, then its deliveries; a dispatcher's transaction can hold them
        // the other way round. PostgreSQL then ends one of the two to break the deadlock: run again,
        // the resolve goes through instead of answering the operator with an error.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.resolve_once(id, reason).await {
                Err(e) if tries < 3 && super::health::is_conflict(&e) => {
                    tracing::info!(
                        error = format!("{e:#}"),
                        "resolve ran into a concurrent transaction; trying again"
                    );
                }
                result => return result,
            }
        }
    }

    async fn resolve_once(&self, id: &str, reason: &str) -> anyhow::Result<Option<Resolved>> {
        let now = self.now_ms();
        let mut tx = self.writer.begin().await?;
        // The UPDATE comes first so that SQLite takes its write lock at once, and a concurrent resolve
        // of the same incident waits here instead of cancelling twice.
        let changed = sqlx::query(
            "UPDATE incidents SET status = $3, resolved_at = $1 WHERE id = $2 AND status <> $3",
        )
        .bind(now)
        .bind(id)
        .bind(IncidentState::Resolved.as_str())
        .execute(&mut *tx)
        .await
        .context("resolving the incident")?
        .rows_affected()
            > 0;
        if !changed {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT id FROM incidents WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            tx.commit().await?;
            return Ok(exists.map(|_| Resolved {
                changed: false,
                cancelled: Vec::new(),
            }));
        }
        // Held deliveries have not gone out either.
        let moved: Vec<Moved> = sqlx::query_as(
            "UPDATE deliveries SET status = 'cancelled', finished_at = $1, updated_at = $1, \
             lease_owner = NULL, lease_until = NULL \
             WHERE incident_id = $2 AND status IN ('queued', 'held') RETURNING id, channel, status",
        )
        .bind(now)
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .context("cancelling queued deliveries")?;
        for m in &moved {
            insert_event(&mut *tx, &m.delivery_id, "cancelled", None, reason, now).await?;
        }
        tx.commit().await.context("committing the resolution")?;
        Ok(Some(Resolved {
            changed: true,
            cancelled: moved,
        }))
    }

    /// Ids of open incidents received before `cutoff_ms`, oldest first.
    pub async fn open_incidents_received_before(
        &self,
        cutoff_ms: i64,
    ) -> anyhow::Result<Vec<String>> {
        let ids = sqlx::query_scalar(
            "SELECT id FROM incidents WHERE status <> 'resolved' AND received_at < $1 \
             ORDER BY received_at",
        )
        .bind(cutoff_ms)
        .fetch_all(&self.reader)
        .await?;
        Ok(ids)
    }

    /// Wakes every replica's dispatcher (PostgreSQL's NOTIFY; SQLite has one process, woken in memory
    /// by the caller): for work that became due without a commit that says so, such as the auditor's
    /// finding that nobody is claiming it.
    pub async fn wake_replicas(&self) -> anyhow::Result<()> {
        if let Some(wake) = self.engine.wake_on_commit() {
            sqlx::query(wake).execute(&self.writer).await?;
        }
        Ok(())
    }

    /// How many deliveries wait to go out (due now, and scheduled for later), and the oldest due time.
    pub async fn queue_stats(&self) -> anyhow::Result<QueueStats> {
        let now = self.now_ms();
        // Escalation queues every tier when the incident is stored: the tiers to come are scheduled,
        // not a backlog, and must not look like one to whoever watches the depth.
        let row = sqlx::query(
            "SELECT COALESCE(SUM(CASE WHEN due_at <= $1 THEN 1 ELSE 0 END), 0) AS depth, \
             COALESCE(SUM(CASE WHEN due_at > $1 THEN 1 ELSE 0 END), 0) AS scheduled, \
             MIN(due_at) AS oldest FROM deliveries WHERE status = 'queued'",
        )
        .bind(now)
        .fetch_one(&self.reader)
        .await?;
        let unconfirmed: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deliveries WHERE status = 'accepted' \
             AND (report_checks > 0 OR report_due_at < $1)",
        )
        .bind(now)
        .fetch_one(&self.reader)
        .await?;
        Ok(QueueStats {
            depth: row.try_get("depth")?,
            scheduled: row.try_get("scheduled")?,
            oldest_due_at: row.try_get("oldest")?,
            unconfirmed,
        })
    }

    /// The stored secret `name` without creating one (unlike [`Store::secret`]): for clients such as
    /// `trigger`, which must not invent a token the server does not know.
    pub async fn existing_secret(&self, name: &str) -> anyhow::Result<Option<String>> {
        let value = sqlx::query_scalar("SELECT value FROM app_secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.reader)
            .await?;
        Ok(value)
    }
}
