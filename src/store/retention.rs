//! Retention and backup: pruning resolved incidents past `retention.keep_days` with everything recorded
//! under them, and a consistent copy of an SQLite database.

use std::path::Path;

use anyhow::Context;

use super::sql::{per_engine, Dialect};
use super::{Engine, Store};

/// What one pruning pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub incidents: u64,
    pub deliveries: u64,
    pub events: u64,
    /// Alarms: those of the pruned incidents, and account alarms cleared before the cutoff.
    pub alarms: u64,
}

impl Pruned {
    fn add(&mut self, other: Pruned) {
        self.incidents += other.incidents;
        self.deliveries += other.deliveries;
        self.events += other.events;
        self.alarms += other.alarms;
    }
}

/// Incidents deleted per statement: the placeholders of [`PRUNE`].
const CHUNK: usize = 50;

/// The ids of up to [`CHUNK`] incidents, as placeholders.
macro_rules! chunk_ids {
    () => {
        "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, $34, $35, $36, $37, $38, $39, $40, $41, $42, $43, $44, $45, $46, $47, $48, $49, $50"
    };
}

/// Resolved incidents before `$1` (the store's clock), none with a delivery whose lease still runs by
/// the database's clock (the clock leases are taken on, shared by every replica).
const PRUNABLE: Dialect = per_engine!(
    "SELECT id FROM incidents i WHERE i.status = 'resolved' AND i.resolved_at < $1 \
     AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.incident_id = i.id \
                     AND d.lease_until IS NOT NULL AND d.lease_until > " NOW ") \
     ORDER BY i.resolved_at, i.id LIMIT $2"
);

/// Children first: events, deliveries, the recording, the incident's alarm and events, then the
/// incidents themselves.
const PRUNE: [&str; 7] = [
    concat!(
        "DELETE FROM delivery_events WHERE delivery_id IN \
         (SELECT id FROM deliveries WHERE incident_id IN (",
        chunk_ids!(),
        "))"
    ),
    concat!(
        "DELETE FROM deliveries WHERE incident_id IN (",
        chunk_ids!(),
        ")"
    ),
    concat!(
        "DELETE FROM recording_chunks WHERE incident_id IN (",
        chunk_ids!(),
        ")"
    ),
    concat!(
        "DELETE FROM recordings WHERE incident_id IN (",
        chunk_ids!(),
        ")"
    ),
    concat!(
        "DELETE FROM alarms WHERE incident_id IN (",
        chunk_ids!(),
        ")"
    ),
    concat!(
        "DELETE FROM incident_events WHERE incident_id IN (",
        chunk_ids!(),
        ")"
    ),
    concat!(
        "DELETE FROM incidents WHERE status = 'resolved' AND id IN (",
        chunk_ids!(),
        ")"
    ),
];

impl Store {
    /// Deletes resolved incidents whose `resolved_at` is before `cutoff_ms`, their deliveries and their
    /// delivery events, `batch` incidents per transaction, until none is left. Open incidents are never
    /// touched, nor a resolved one with a delivery still leased (a send in flight records its outcome).
    ///
    /// Short transactions, child rows first: the Passthru shares this database, and on SQLite one long
    /// delete would hold the only write lock while an emergency waits.
    pub async fn prune_resolved_before(
        &self,
        cutoff_ms: i64,
        batch: u32,
    ) -> anyhow::Result<Pruned> {
        let mut total = Pruned::default();
        loop {
            let pruned = self.prune_batch(cutoff_ms, batch.max(1)).await?;
            total.add(pruned);
            if pruned.incidents < u64::from(batch.max(1)) {
                total.alarms += self.prune_cleared_account_alarms(cutoff_ms).await?;
                return Ok(total);
            }
            // Let waiting writers in between batches.
            tokio::task::yield_now().await;
        }
    }

    /// Account alarms (no incident of their own) cleared before `cutoff_ms` and no longer being
    /// sent. An open one stays however old: it still degrades `/readyz`, and it is the proof.
    async fn prune_cleared_account_alarms(&self, cutoff_ms: i64) -> anyhow::Result<u64> {
        let n = sqlx::query(
            "DELETE FROM alarms WHERE incident_id IS NULL AND cleared_at IS NOT NULL \
             AND cleared_at < $1 AND status <> 'queued'",
        )
        .bind(cutoff_ms)
        .execute(&self.writer)
        .await
        .context("pruning cleared account alarms")?
        .rows_affected();
        Ok(n)
    }

    async fn prune_batch(&self, cutoff_ms: i64, batch: u32) -> anyhow::Result<Pruned> {
        let ids: Vec<String> = sqlx::query_scalar(PRUNABLE.of(self.engine))
            .bind(cutoff_ms)
            .bind(i64::from(batch))
            .fetch_all(&self.writer)
            .await
            .context("listing incidents to prune")?;
        if ids.is_empty() {
            return Ok(Pruned::default());
        }
        // Recordings first, one statement each, outside the batch: up to 20 MB of audio per incident
        // must not be deleted while the batch holds SQLite's only writer.
        for id in &ids {
            sqlx::query("DELETE FROM recording_chunks WHERE incident_id = $1")
                .bind(id)
                .execute(&self.writer)
                .await
                .context("deleting a pruned incident's recording")?;
        }
        // Every table that references deliveries or incidents must be emptied here, children first.
        // Up to CHUNK incidents per statement (a short chunk repeats its last id), all in one
        // transaction: few round trips while SQLite's one writer is held, one commit per batch.
        let mut tx = self.writer.begin().await?;
        let mut counts = [0u64; PRUNE.len()];
        for chunk in ids.chunks(CHUNK) {
            for (sql, count) in PRUNE.iter().zip(counts.iter_mut()) {
                let mut query = sqlx::query(sql);
                for i in 0..CHUNK {
                    query = query.bind(&chunk[i.min(chunk.len() - 1)]);
                }
                *count += query
                    .execute(&mut *tx)
                    .await
                    .context("pruning old incidents")?
                    .rows_affected();
            }
        }
        tx.commit().await.context("committing a pruning batch")?;
        Ok(Pruned {
            events: counts[0],
            deliveries: counts[1],
            alarms: counts[4],
            incidents: counts[PRUNE.len() - 1],
        })
    }

    /// Writes a consistent copy of this SQLite database to `file` with `VACUUM INTO`, which reads one
    /// snapshot while the server keeps writing. Refuses an existing file (a backup never overwrites)
    /// and PostgreSQL (whose own tools do this better: pg_dump, pg_basebackup).
    pub async fn backup_sqlite(&self, file: &Path) -> anyhow::Result<()> {
        if self.engine != Engine::Sqlite {
            anyhow::bail!(
                "backup copies SQLite databases only; back up PostgreSQL with pg_dump (a logical copy) \
                 or pg_basebackup with WAL archiving (point-in-time recovery)"
            );
        }
        if file.exists() {
            anyhow::bail!(
                "{} already exists; a backup never overwrites a file",
                file.display()
            );
        }
        let target = file
            .to_str()
            .context("the backup file name is not valid UTF-8")?;
        // On a read connection, so the copy never holds the one writer while emergencies wait. `VACUUM
        // INTO` writes only the new file, but `query_only` refuses it: the connection is let out of
        // read-only for this and then closed, never handed back to the pool.
        let mut conn = self.reader.acquire().await?.detach();
        sqlx::query("PRAGMA query_only = OFF")
            .execute(&mut conn)
            .await?;
        let copied = sqlx::query("VACUUM INTO $1")
            .bind(target)
            .execute(&mut conn)
            .await;
        let _ = sqlx::Connection::close(conn).await;
        copied.with_context(|| format!("writing the backup to {}", file.display()))?;
        Ok(())
    }
}
