//! Group commit of new incidents: Passthrus and triggers that arrive together share one transaction and
//! one durable commit.
//!
//! A burst (a power cut trips every sensor, an Alertmanager storm, two wards calling at once) is where a
//! commit per request hurts: each waits for its own fsync, and on SQLite for the one write lock too. Here
//! one task takes every incident waiting, writes them in one transaction, commits once, and only then
//! answers each caller, so nobody is told "stored" before their rows are durable. If any incident's
//! statements fail, or the commit does, the batch is rolled back and each incident is stored alone: the
//! failing one is answered with its error, the others are stored.

use anyhow::Context;
use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};

use super::{recordings, stored_repeat, Created, Engine, NewDelivery, NewIncident};
use crate::domain::{now_ms, storable, DeliveryState, IncidentState};

/// Incidents in one transaction at most: a batch holds SQLite's writer for its whole length.
const MAX_BATCH: usize = 64;
/// Deliveries per multi-row insert (8 placeholders each, well under both engines' limits).
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
}

impl Intake {
    /// Starts the task that writes incidents through `writer`. It ends when every handle is dropped.
    pub(super) fn start(writer: AnyPool, engine: Engine) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(writer, engine, rx));
        Intake { jobs }
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

async fn run(writer: AnyPool, engine: Engine, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        // Whatever arrived while the last batch was being committed goes in this one.
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit(&writer, engine, batch).await;
    }
}

/// Writes and commits `batch`, answering every caller.
async fn commit(writer: &AnyPool, engine: Engine, batch: Vec<Job>) {
    let results = match write(writer, engine, &batch).await {
        Ok(results) => results,
        Err(e) if batch.len() == 1 => vec![Err(e)],
        Err(e) => {
            tracing::info!(
                error = format!("{e:#}"),
                incidents = batch.len(),
                "a batch of incidents could not be committed; storing each alone"
            );
            let mut results = Vec::with_capacity(batch.len());
            for job in &batch {
                let one = write(writer, engine, std::slice::from_ref(job))
                    .await
                    .and_then(|mut r| r.pop().context("nothing written"))
                    .and_then(|r| r);
                results.push(one);
            }
            results
        }
    };
    for (job, result) in batch.into_iter().zip(results) {
        // A caller that stopped waiting (its request timed out) is told nothing; its rows stay.
        let _ = job.reply.send(result);
    }
}

/// One transaction for the whole batch. `Err` when the transaction could not be committed, or when an
/// incident of a batch of several failed: then nothing is stored and the caller stores each alone. A
/// failure is rare, so the common path pays for no savepoints (two more round trips per incident).
async fn write(
    writer: &AnyPool,
    engine: Engine,
    batch: &[Job],
) -> anyhow::Result<Vec<anyhow::Result<Created>>> {
    let now = now_ms();
    let mut tx = writer.begin().await?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        match insert(&mut tx, job, now).await {
            Ok(created) => results.push(Ok(created)),
            Err(e) if batch.len() > 1 => {
                tx.rollback().await?;
                return Err(e.context("an incident of the batch failed"));
            }
            Err(e) => {
                // Nothing of a failed incident may commit.
                tx.rollback().await?;
                return Ok(vec![Err(e)]);
            }
        }
    }
    let queued = results
        .iter()
        .any(|r| r.as_ref().is_ok_and(|c| c.is_new && c.deliveries > 0));
    if queued {
        if let Some(wake) = engine.wake_on_commit() {
            sqlx::query(wake).execute(&mut *tx).await?;
        }
    }
    tx.commit().await.context("committing incidents")?;
    Ok(results)
}

/// The statements of one incident. The insert comes first, so a repeat (a stored CallSid, or the dedup
/// key of an unresolved incident, even one earlier in the same batch) is found by the unique index
/// rather than by a read that could race.
async fn insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job: &Job,
    now: i64,
) -> anyhow::Result<Created> {
    let incident = &job.incident;
    let id = uuid::Uuid::new_v4().to_string();
    let inserted: Option<String> = sqlx::query_scalar(
        "INSERT INTO incidents (id, source, call_sid, dedup_key, emergency_type, route, caller, \
         recording_url, message, raw_params, status, occurred_at, received_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $13, $11, $12) \
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind(&id)
    .bind(incident.source.as_str())
    .bind(incident.call_sid.as_deref())
    .bind(incident.dedup_key.as_deref())
    // Names come from the operators' file and the request: stored without control characters, so a
    // stray NUL in either can never make an emergency unstorable.
    .bind(storable(&incident.emergency_type).into_owned())
    .bind(storable(&incident.route).into_owned())
    .bind(incident.caller.as_deref())
    .bind(incident.recording_url.as_deref())
    .bind(incident.message.as_deref())
    .bind(&incident.raw_params)
    .bind(incident.occurred_at)
    .bind(now)
    .bind(IncidentState::Open.as_str())
    .fetch_optional(&mut **tx)
    .await
    .context("inserting the incident")?;

    if inserted.is_none() {
        let incident_id = stored_repeat(tx, incident).await?;
        return Ok(Created {
            incident_id,
            is_new: false,
            deliveries: 0,
        });
    }
    for rows in job.deliveries.chunks(ROWS_PER_INSERT) {
        insert_deliveries(tx, &id, rows, now).await?;
    }
    if let (Some(url), Some(fetch)) = (&incident.recording_url, incident.recording_fetch) {
        recordings::insert_recording(tx, &id, url, incident.call_sid.as_deref(), fetch, now)
            .await?;
    }
    Ok(Created {
        incident_id: id,
        is_new: true,
        deliveries: job.deliveries.len(),
    })
}

/// The queued deliveries of one incident in one statement.
async fn insert_deliveries(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    incident_id: &str,
    rows: &[NewDelivery],
    now: i64,
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = deliveries_insert(rows.len());
    let mut query = sqlx::query(&sql)
        .bind(incident_id)
        .bind(now)
        .bind(DeliveryState::Queued.as_str());
    for d in rows {
        query = query
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(storable(&d.contact_name).into_owned())
            .bind(d.phone.clone())
            .bind(d.channel.as_str())
            .bind(d.provider.clone())
            .bind(d.channel.priority())
            .bind(crate::messages::new_reference())
            .bind(crate::messages::new_link_ref());
    }
    query
        .execute(&mut **tx)
        .await
        .context("inserting the deliveries")?;
    Ok(())
}

/// Placeholders per delivery row after the three shared ones (incident, time, status).
const PER_ROW: usize = 8;

/// `INSERT INTO deliveries … VALUES (…), (…), …` for `rows` rows. Only the number of placeholders
/// varies with the row count; no value is ever written into the text.
fn deliveries_insert(rows: usize) -> String {
    const HEAD: &str =
        "INSERT INTO deliveries (id, incident_id, contact_name, phone, channel, provider, \
         priority, greeting_ref, link_ref, status, due_at, created_at, updated_at) VALUES ";
    let mut sql = String::with_capacity(HEAD.len() + rows * 64);
    sql.push_str(HEAD);
    for row in 0..rows {
        let p = 4 + row * PER_ROW;
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "(${}, $1, ${}, ${}, ${}, ${}, ${}, ${}, ${}, $3, $2, $2, $2)",
            p,
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5,
            p + 6,
            p + 7
        ));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_row_insert_numbers_its_placeholders_in_order() {
        let sql = deliveries_insert(2);
        assert!(sql.ends_with(
            "($4, $1, $5, $6, $7, $8, $9, $10, $11, $3, $2, $2, $2), \
             ($12, $1, $13, $14, $15, $16, $17, $18, $19, $3, $2, $2, $2)"
        ));
    }
}
