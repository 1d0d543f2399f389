//! What the auditor reads to tell whether every open incident is moving, and the lease that lets one
//! replica at a time run it. Times are the store's clock, except leases (the database's clock, the one
//! clock replicas share).

use std::time::Duration;

use super::rows::delivery_columns;
use super::sql::{per_engine, Dialect};
use super::{insert_event, DeliveryRow, Store};

/// Takes or renews the job lease `$1` for owner `$2` until the database's clock passes `$3` ms from
/// now: granted when nobody holds it, it lapsed, or `$2` already holds it.
const TAKE_JOB_LEASE: Dialect = per_engine!(
    "INSERT INTO job_leases (name, owner, until) VALUES ($1, $2, " NOW " + $3) \
     ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until = excluded.until \
     WHERE job_leases.until < " NOW " OR job_leases.owner = excluded.owner \
     RETURNING owner"
);

/// Leased deliveries whose lease ran out more than `$1` ms ago by the database's clock.
const EXPIRED_SENDING: Dialect = per_engine!(
    "SELECT id FROM deliveries WHERE status = 'sending' AND lease_until < " NOW " - $1 \
     ORDER BY lease_until LIMIT $2"
);

/// A queued delivery of an unresolved incident, due before the auditor's cutoff.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Overdue {
    pub id: String,
    pub incident_id: String,
    pub provider: String,
    pub due_at: i64,
}

/// A provider lane with calls or messages waiting for a report past their deadline.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SilentLane {
    pub provider: String,
    pub waiting: i64,
    /// When the oldest of them was last updated (ms, the store's clock).
    pub since: i64,
}

impl Store {
    /// Takes (or keeps) the job lease `name` for `owner` for `lease` by the database's clock; false
    /// while another owner holds it.
    pub async fn take_job_lease(
        &self,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> anyhow::Result<bool> {
        let granted: Option<String> = sqlx::query_scalar(TAKE_JOB_LEASE.of(self.engine))
            .bind(name)
            .bind(owner)
            .bind(lease.as_millis() as i64)
            .fetch_optional(&self.writer)
            .await?;
        Ok(granted.is_some())
    }

    /// Queued deliveries of unresolved incidents due before `before`, oldest first, at most `limit`.
    pub async fn overdue_queued(&self, before: i64, limit: i64) -> anyhow::Result<Vec<Overdue>> {
        let rows = sqlx::query_as(
            "SELECT d.id, d.incident_id, d.provider, d.due_at FROM deliveries d \
             JOIN incidents i ON i.id = d.incident_id \
             WHERE d.status = 'queued' AND d.due_at < $1 AND i.status <> 'resolved' \
             ORDER BY d.due_at LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows)
    }

    /// Ids of deliveries still `sending` although their lease ran out more than `slack` ago by the
    /// database's clock: the dispatchers' reaper has not run.
    pub async fn expired_sending(
        &self,
        slack: Duration,
        limit: i64,
    ) -> anyhow::Result<Vec<String>> {
        let ids = sqlx::query_scalar(EXPIRED_SENDING.of(self.engine))
            .bind(slack.as_millis() as i64)
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        Ok(ids)
    }

    /// Accepted calls and messages whose report deadline passed before `before` and that no look-up
    /// has touched since (each look-up moves the deadline on): the report reconciler has stalled.
    pub async fn stalled_reports(
        &self,
        before: i64,
        limit: i64,
    ) -> anyhow::Result<Vec<DeliveryRow>> {
        let rows = sqlx::query_as(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE status = 'accepted' AND report_due_at < $1 \
             ORDER BY report_due_at LIMIT $2"
        ))
        .bind(before)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows)
    }

    /// Open incidents the unreached sweep should have marked (the same ones it looks for: not
    /// acknowledged, not drills nor account-alarm incidents, stored with their deadline) whose deadline
    /// is before `before`: the sweep has stalled. Oldest first, at most `limit`.
    pub async fn overdue_unreached(&self, before: i64, limit: i64) -> anyhow::Result<Vec<String>> {
        let ids = sqlx::query_scalar(
            "SELECT id FROM incidents WHERE status = 'open' AND unreached_at IS NULL \
             AND source NOT IN ('drill', 'alarm') AND unreached_due_at IS NOT NULL \
             AND unreached_due_at < $1 ORDER BY received_at LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        Ok(ids)
    }

    /// Provider lanes with at least `min` calls or messages accepted and still without a report past
    /// their deadline (`now`): the provider has stopped reporting, or stopped answering look-ups.
    pub async fn silent_lanes(&self, now: i64, min: i64) -> anyhow::Result<Vec<SilentLane>> {
        let rows = sqlx::query_as(
            "SELECT provider, COUNT(*) AS waiting, MIN(updated_at) AS since FROM deliveries \
             WHERE status = 'accepted' AND (report_checks > 0 OR report_due_at < $1) \
             GROUP BY provider HAVING COUNT(*) >= $2 ORDER BY provider",
        )
        .bind(now)
        .bind(min)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows)
    }

    /// Appends the same event to several deliveries' trails, in one transaction.
    pub async fn record_events(
        &self,
        delivery_ids: &[String],
        kind: &str,
        detail: &str,
    ) -> anyhow::Result<()> {
        if delivery_ids.is_empty() {
            return Ok(());
        }
        let now = self.now_ms();
        let mut tx = self.writer.begin().await?;
        for id in delivery_ids {
            insert_event(&mut *tx, id, kind, None, detail, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
