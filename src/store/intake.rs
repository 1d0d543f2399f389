//! Group commit of new incidents: Passthrus and triggers that arrive together share one transaction and
//! one durable commit.
//!
//! A burst (a power cut trips every sensor, an Alertmanager storm, two wards calling at once) is where a
//! commit per request hurts: each waits for its own fsync, and on SQLite for the one write lock too. Here
//! one task takes every incident waiting, writes them in one transaction, commits once, and only then
//! answers each caller, so nobody is told "stored" before their rows are durable. If any incident's
//! statements fail, or the commit does, the batch is rolled back and each incident is stored alone: the
//! failing one is answered with its error, the others are stored.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot, Notify};

use super::health::{storage_failure, WriteHealth};
use super::{recordings, stored_repeat, Created, Engine, NewDelivery, NewIncident};
use crate::domain::{storable, Clock, DeliveryState, IncidentState};

/// Incidents in one transaction at most: a batch holds SQLite's writer for its whole length.
const MAX_BATCH: usize = 64;
/// Deliveries per multi-row insert (12 placeholders each, well under both engines' limits).
const ROWS_PER_INSERT: usize = 200;
/// Incidents waiting for the writer at most; beyond that callers wait to queue (back-pressure).
const QUEUE: usize = 1024;

/// One incident to store, and where to send what came of it.
struct Job {
    incident: NewIncident,
    deliveries: Vec<NewDelivery>,
    reply: oneshot::Sender<anyhow::Result<Created>>,
}

/// The handle callers submit incidents through; cheap to clone.
#[derive(Clone)]
pub(super) struct Intake {
    jobs: mpsc::Sender<Job>,
    /// Incidents of the batch being written now (0: none).
    writing: Arc<AtomicUsize>,
    /// Told after every batch.
    written: Arc<Notify>,
}

/// The longest background work (the dispatcher's claims and outcomes) waits for waiting incidents
/// before taking SQLite's writer anyway, so it is never starved by a long burst.
const LONGEST_YIELD: Duration = Duration::from_millis(25);

impl Intake {
    /// Starts the task that writes incidents through `writer`. It ends when every handle is dropped.
    pub(super) fn start(
        writer: AnyPool,
        engine: Engine,
        clock: Clock,
        health: Arc<WriteHealth>,
    ) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE);
        let writing = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(Notify::new());
        tokio::spawn(run(
            Writer {
                pool: writer,
                engine,
                clock,
                health,
            },
            rx,
            writing.clone(),
            written.clone(),
        ));
        Intake {
            jobs,
            writing,
            written,
        }
    }

    /// Whether incidents are waiting or being written.
    fn busy(&self) -> bool {
        self.writing.load(Ordering::Acquire) > 0 || self.jobs.capacity() < self.jobs.max_capacity()
    }

    /// Waits, up to [`LONGEST_YIELD`], until no incident is waiting or being written: on SQLite,
    /// whose one writer everything queues for, an emergency goes before the dispatcher's bookkeeping.
    pub(super) async fn yield_to(&self) {
        let deadline = tokio::time::Instant::now() + LONGEST_YIELD;
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if !self.busy() {
                return;
            }
            if tokio::time::timeout_at(deadline, written).await.is_err() {
                return;
            }
        }
    }

    /// Stores one incident with its deliveries; answers once they are durable.
    pub(super) async fn submit(
        &self,
        incident: NewIncident,
        deliveries: Vec<NewDelivery>,
    ) -> anyhow::Result<Created> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                incident,
                deliveries,
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the incident writer has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the incident writer stopped before answering"))?
    }
}

/// Where and how batches are written.
#[derive(Clone)]
struct Writer {
    pool: AnyPool,
    engine: Engine,
    clock: Clock,
    health: Arc<WriteHealth>,
}

async fn run(
    writer: Writer,
    mut rx: mpsc::Receiver<Job>,
    writing: Arc<AtomicUsize>,
    written: Arc<Notify>,
) {
    while let Some(first) = rx.recv().await {
        // Whatever arrived while the last batch was being committed goes in this one.
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        writing.store(batch.len(), Ordering::Release);
        // In a task of its own: should a batch ever panic, its callers are answered with an error
        // (their reply channels close) and the intake goes on with the next one.
        if let Err(e) = tokio::spawn(commit(writer.clone(), batch)).await {
            tracing::error!(error = %e, "a batch of incidents failed unexpectedly; its callers were answered with an error");
        }
        writing.store(0, Ordering::Release);
        written.notify_waiters();
    }
}

/// Why a batch was not stored.
enum Failed {
    /// A statement of the batch failed: some incident may be at fault, so each is tried alone.
    Statement(anyhow::Error),
    /// The transaction could not be begun or committed (the database is unreachable, or a commit's
    /// outcome is unknown): trying again one by one would keep every later emergency waiting behind
    /// timeouts, and could store a batch twice whose commit did land. Every caller gets the error and
    /// the Exotel flow its fallback branch.
    Transaction(anyhow::Error),
}

/// Writes and commits `batch`, answering every caller.
async fn commit(writer: Writer, batch: Vec<Job>) {
    let results = match write(&writer, &batch).await {
        Ok(results) => results,
        Err(Failed::Statement(e)) if batch.len() > 1 => {
            tracing::info!(
                error = format!("{e:#}"),
                incidents = batch.len(),
                "a batch of incidents was refused; storing each alone"
            );
            let mut results = Vec::with_capacity(batch.len());
            let mut down: Option<String> = None;
            for job in &batch {
                if let Some(why) = &down {
                    results.push(Err(anyhow::anyhow!("{why}")));
                    continue;
                }
                results.push(match write(&writer, std::slice::from_ref(job)).await {
                    Ok(mut r) => r
                        .pop()
                        .unwrap_or_else(|| Err(anyhow::anyhow!("nothing written"))),
                    Err(Failed::Statement(e)) => Err(e),
                    Err(Failed::Transaction(e)) => {
                        let why = format!("{e:#}");
                        down = Some(why.clone());
                        Err(anyhow::anyhow!("{why}"))
                    }
                });
            }
            results
        }
        Err(Failed::Statement(e) | Failed::Transaction(e)) => {
            let why = format!("{e:#}");
            batch
                .iter()
                .map(|_| Err(anyhow::anyhow!("{why}")))
                .collect()
        }
    };
    for (job, result) in batch.into_iter().zip(results) {
        // A caller that stopped waiting (its request timed out) is told nothing; its rows stay.
        let _ = job.reply.send(result);
    }
}

/// One transaction for the whole batch, and few statements: every incident of the batch in one
/// multi-row insert, every delivery of the new ones in another (SQLite runs each statement on its own
/// thread, so a round trip per row would cost more than the rows). `Err` when the transaction could not
/// be committed, or when a statement of a batch of several failed: then nothing is stored and the caller
/// stores each incident alone.
///
/// A connection whose `COMMIT` or `ROLLBACK` failed is closed rather than handed back: after a failed
/// commit (a full disk) the database may have ended the transaction while the driver still counts
/// itself inside it, and every later batch on that connection would then be written into a
/// transaction that never commits, and answered "stored".
async fn write(writer: &Writer, batch: &[Job]) -> Result<Vec<anyhow::Result<Created>>, Failed> {
    let transaction = |e: sqlx::Error, what: &str| {
        Failed::Transaction(anyhow::Error::new(e).context(what.to_owned()))
    };
    let mut conn = writer
        .pool
        .acquire()
        .await
        .map_err(|e| transaction(e, "taking the connection that writes incidents"))?;
    let (result, clean) = write_on(&mut conn, writer, batch).await;
    if !clean {
        tracing::warn!(
            "closing the connection whose commit or rollback failed; a fresh one replaces it"
        );
        conn.close_on_drop();
    }
    match &result {
        Ok(_) => writer.health.committed(),
        Err(Failed::Transaction(e)) => writer.health.failed(e),
        Err(Failed::Statement(e)) if storage_failure(writer.engine, e) => writer.health.failed(e),
        Err(Failed::Statement(_)) => {}
    }
    result
}

/// [`write`] on one connection; the bool is false when the connection's transaction state can no
/// longer be trusted (its commit or rollback failed).
async fn write_on(
    conn: &mut sqlx::pool::PoolConnection<sqlx::Any>,
    writer: &Writer,
    batch: &[Job],
) -> (Result<Vec<anyhow::Result<Created>>, Failed>, bool) {
    let transaction = |e: sqlx::Error, what: &str| {
        Failed::Transaction(anyhow::Error::new(e).context(what.to_owned()))
    };
    let now = writer.clock.now_ms();
    let mut tx = match sqlx::Acquire::begin(&mut **conn).await {
        Ok(tx) => tx,
        Err(e) => return (Err(transaction(e, "beginning a transaction")), false),
    };
    let inserted = match insert_all(&mut tx, batch, now).await {
        Ok(results) => {
            let woken = match writer.engine.wake_on_commit() {
                Some(wake) if results.iter().any(|c| c.is_new && c.deliveries > 0) => {
                    sqlx::query(wake)
                        .execute(&mut *tx)
                        .await
                        .map(|_| ())
                        .map_err(anyhow::Error::new)
                }
                _ => Ok(()),
            };
            woken.map(|()| results)
        }
        Err(e) => Err(e),
    };
    match inserted {
        Ok(results) => match tx.commit().await {
            Ok(()) => (Ok(results.into_iter().map(Ok).collect()), true),
            Err(e) => (Err(transaction(e, "committing incidents")), false),
        },
        Err(e) => {
            // Nothing of a failed incident may commit. A rollback that fails leaves nothing
            // committed either once the connection is closed with its transaction.
            let clean = tx.rollback().await.is_ok();
            let result = if batch.len() > 1 {
                Err(Failed::Statement(
                    e.context("an incident of the batch failed"),
                ))
            } else {
                Ok(vec![Err(e)])
            };
            (result, clean)
        }
    }
}

/// The statements of a batch. The incidents are inserted first, so a repeat (a stored CallSid, or the
/// dedup key of an unresolved incident, even one earlier in the same batch) is found by the unique
/// indexes rather than by a read that could race; only repeats are then read back, one by one.
async fn insert_all(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    batch: &[Job],
    now: i64,
) -> anyhow::Result<Vec<Created>> {
    let ids: Vec<String> = batch
        .iter()
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let sql = incidents_insert(batch.len());
    let mut query = sqlx::query_scalar::<_, String>(&sql)
        .bind(now)
        .bind(IncidentState::Open.as_str());
    for (job, id) in batch.iter().zip(&ids) {
        let incident = &job.incident;
        query = query
            .bind(id.clone())
            .bind(incident.source.as_str())
            .bind(incident.call_sid.clone())
            .bind(incident.dedup_key.clone())
            // Names come from the operators' file and the request: stored without control
            // characters, so a stray NUL in either can never make an emergency unstorable.
            .bind(storable(&incident.emergency_type).into_owned())
            .bind(storable(&incident.route).into_owned())
            .bind(incident.caller.clone())
            .bind(incident.recording_url.clone())
            .bind(incident.message.clone())
            .bind(incident.raw_params.clone())
            .bind(incident.occurred_at)
            .bind(incident.escalation.clone())
            .bind(
                incident
                    .unreached_after_ms
                    .map(|after| now.saturating_add(after)),
            );
    }
    let inserted: std::collections::HashSet<String> = query
        .fetch_all(&mut **tx)
        .await
        .context("inserting the incidents")?
        .into_iter()
        .collect();

    let mut results = Vec::with_capacity(batch.len());
    let mut rows: Vec<(&str, &NewDelivery)> = Vec::new();
    for (job, id) in batch.iter().zip(&ids) {
        let incident = &job.incident;
        if !inserted.contains(id) {
            let incident_id = stored_repeat(tx, incident, now).await?;
            results.push(Created {
                incident_id,
                is_new: false,
                deliveries: 0,
            });
            continue;
        }
        rows.extend(job.deliveries.iter().map(|d| (id.as_str(), d)));
        if let (Some(url), Some(fetch)) = (&incident.recording_url, incident.recording_fetch) {
            recordings::insert_recording(tx, id, url, incident.call_sid.as_deref(), fetch, now)
                .await?;
        }
        results.push(Created {
            incident_id: id.clone(),
            is_new: true,
            deliveries: job.deliveries.len(),
        });
    }
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        insert_deliveries(tx, chunk, now).await?;
    }
    Ok(results)
}

/// Queued deliveries, of any incidents of the batch, in one statement.
async fn insert_deliveries(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    rows: &[(&str, &NewDelivery)],
    now: i64,
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = deliveries_insert(rows.len());
    let mut query = sqlx::query(&sql)
        .bind(now)
        .bind(DeliveryState::Queued.as_str());
    for (incident_id, d) in rows {
        query = query
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(incident_id.to_string())
            .bind(storable(&d.contact_name).into_owned())
            .bind(d.phone.clone())
            .bind(d.channel.as_str())
            .bind(d.provider.clone())
            .bind(d.channel.priority())
            .bind(crate::messages::new_reference())
            .bind(crate::messages::new_link_ref())
            .bind(i64::from(d.tier))
            .bind(i64::from(d.run))
            // A later tier's delivery waits in the queue, due when its tier comes.
            .bind(now.saturating_add(d.delay_ms.max(0)));
    }
    query
        .execute(&mut **tx)
        .await
        .context("inserting the deliveries")?;
    Ok(())
}

/// Placeholders per incident row after the two shared ones (time, status).
const INCIDENT_ROW: usize = 13;
/// Placeholders per delivery row after the two shared ones (time, status).
const DELIVERY_ROW: usize = 12;

/// `$a, $a+1, …` for `n` placeholders from `first`.
fn numbered(sql: &mut String, first: usize, n: usize) {
    for i in 0..n {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push('$');
        sql.push_str(&(first + i).to_string());
    }
}

/// `INSERT INTO incidents … VALUES (…), (…) ON CONFLICT DO NOTHING RETURNING id` for `rows` rows. Only
/// the number of placeholders varies with the row count; no value is ever written into the text.
fn incidents_insert(rows: usize) -> String {
    const HEAD: &str =
        "INSERT INTO incidents (id, source, call_sid, dedup_key, emergency_type, route, \
         caller, recording_url, message, raw_params, occurred_at, escalation, unreached_due_at, \
         status, received_at) VALUES ";
    let mut sql = String::with_capacity(HEAD.len() + rows * 80 + 40);
    sql.push_str(HEAD);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        numbered(&mut sql, 3 + row * INCIDENT_ROW, INCIDENT_ROW);
        sql.push_str(", $2, $1)");
    }
    sql.push_str(" ON CONFLICT DO NOTHING RETURNING id");
    sql
}

/// `INSERT INTO deliveries … VALUES (…), (…)` for `rows` rows.
fn deliveries_insert(rows: usize) -> String {
    const HEAD: &str =
        "INSERT INTO deliveries (id, incident_id, contact_name, phone, channel, provider, \
         priority, greeting_ref, link_ref, tier, run, due_at, status, created_at, updated_at) VALUES ";
    let mut sql = String::with_capacity(HEAD.len() + rows * 64);
    sql.push_str(HEAD);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        numbered(&mut sql, 3 + row * DELIVERY_ROW, DELIVERY_ROW);
        sql.push_str(", $2, $1, $1)");
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_inserts_number_their_placeholders_in_order() {
        assert!(incidents_insert(2).ends_with(
            "($3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $2, $1), \
             ($16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $2, $1) \
             ON CONFLICT DO NOTHING RETURNING id"
        ));
        assert!(deliveries_insert(2).ends_with(
            "($3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $2, $1, $1), \
             ($15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $2, $1, $1)"
        ));
    }
}
