//! Storage: PostgreSQL or embedded SQLite behind one [`Store`], with per-engine migrations.
//!
//! Both engines run the same SQL through sqlx's `Any` driver. It stays, rather than typed per-engine
//! pools, because every statement but a handful is the same on both: one code path is tested twice
//! instead of two paths once each, and the embedded SQLite default and PostgreSQL for replicas cannot
//! drift apart. The few statements that differ (the database's clock, row locking when claiming work)
//! are in [`sql`], the one file that knows two engines exist. Every statement is a constant, put
//! together at compile time; rows are decoded with `sqlx::FromRow`. Statuses are the typed states of
//! [`crate::domain::state`]; their vocabulary and allowed moves are filled into lookup tables at each
//! migration, and the database refuses anything else. Times are milliseconds since the Unix epoch.

pub mod console;
mod incidents;
mod optins;
mod queue;
pub mod recordings;
pub mod retention;
mod rows;
mod sql;

pub use crate::domain::RedialPolicy;
pub use queue::{CallbackEffect, Finish, Moved};

pub use incidents::{IncidentFilter, QueueStats, Resolved};
pub use recordings::{AttemptFailed, IncidentEventRow, LinkView, RecordingFetch, RecordingRow};
pub use rows::{DeliveryRow, EventRow, GreetingView, IncidentRow, FOLLOWUP};

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::AnyPool;

use self::rows::{delivery_columns, incident_columns};
use crate::domain::{now_ms, random_token, Channel, DeliveryState, IncidentState, Source};

/// The PostgreSQL NOTIFY channel that wakes every replica's dispatcher when work is committed.
pub const WAKE_CHANNEL: &str = sql::WAKE_CHANNEL;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    Sqlite,
}

impl Engine {
    pub fn of_url(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Engine::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Engine::Sqlite)
        } else {
            anyhow::bail!("database.url must start with sqlite:// or postgres://")
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Sqlite => "sqlite",
        }
    }
}

/// The one handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    engine: Engine,
}

/// What the caller wants stored for a new incident.
#[derive(Debug, Clone)]
pub struct NewIncident {
    pub source: Source,
    pub call_sid: Option<String>,
    pub dedup_key: Option<String>,
    pub emergency_type: String,
    pub route: String,
    pub caller: Option<String>,
    pub recording_url: Option<String>,
    pub message: Option<String>,
    /// Every parameter as received (secrets removed), JSON, for audit.
    pub raw_params: String,
    pub occurred_at: Option<i64>,
    /// Set when the recording is to be fetched and served by us (proxy mode, an allowed host).
    pub recording_fetch: Option<RecordingFetch>,
}

/// One delivery to queue with a new incident: a contact on one channel, sent by one provider lane.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub contact_name: String,
    /// E.164.
    pub phone: String,
    pub channel: Channel,
    /// The provider lane that will send it (`exotel:call`, …).
    pub provider: String,
}

/// The result of [`Store::create_incident`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub incident_id: String,
    /// False when the CallSid or open dedup key was already stored: nothing new was written.
    pub is_new: bool,
    pub deliveries: usize,
}

impl Store {
    /// Connects and configures the engine. SQLite runs in WAL mode with `synchronous=FULL`, so a commit
    /// (and so a 200 to Exotel) survives a power cut, not only a crash.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let engine = Engine::of_url(url)?;
        let options =
            AnyConnectOptions::from_str(url).context("database.url is not a valid URL")?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    for statement in engine.on_connect() {
                        sqlx::query(statement).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .with_context(|| format!("cannot open the {} database", engine.as_str()))?;
        Ok(Store { pool, engine })
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Applies the embedded migrations of this engine.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        self.engine
            .migrations()
            .run(&self.pool)
            .await
            .context("applying migrations")?;
        self.write_lifecycle().await
    }

    /// Fills the lifecycle's lookup tables (states and moves) from [`DeliveryState`] and
    /// [`IncidentState`]: the code's table is the one written down, the database enforces it. Only
    /// adds: a replica still running an older build keeps the moves it knows, so a move taken out of
    /// the code stays allowed in existing databases until a migration removes it.
    async fn write_lifecycle(&self) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for state in DeliveryState::ALL {
            sqlx::query("INSERT INTO delivery_states (name) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(state.as_str())
                .execute(&mut *tx)
                .await?;
        }
        for state in IncidentState::ALL {
            sqlx::query("INSERT INTO incident_states (name) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(state.as_str())
                .execute(&mut *tx)
                .await?;
        }
        for (from, to) in DeliveryState::transitions() {
            sqlx::query(
                "INSERT INTO delivery_transitions (from_state, to_state) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(from.as_str())
            .bind(to.as_str())
            .execute(&mut *tx)
            .await?;
        }
        for (from, to) in IncidentState::transitions() {
            sqlx::query(
                "INSERT INTO incident_transitions (from_state, to_state) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(from.as_str())
            .bind(to.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await.context("writing the lifecycle tables")?;
        Ok(())
    }

    /// True when every embedded migration has been applied.
    pub async fn is_migrated(&self) -> anyhow::Result<bool> {
        let latest = self
            .engine
            .migrations()
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0);
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_one(&self.pool)
                .await?;
        Ok(applied.unwrap_or(0) >= latest)
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The stored secret `name`, creating it with a fresh random value the first time. Safe when several
    /// replicas start at once: the first insert wins and everyone reads it back.
    pub async fn secret(&self, name: &str) -> anyhow::Result<String> {
        sqlx::query(
            "INSERT INTO app_secrets (name, value, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(random_token(24))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let value: String = sqlx::query_scalar("SELECT value FROM app_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(value)
    }

    /// Stores the incident and one queued delivery per target in ONE transaction. A repeat of a stored
    /// CallSid, or of the dedup key of an incident still open, writes nothing and returns the first one.
    pub async fn create_incident(
        &self,
        incident: &NewIncident,
        deliveries: &[NewDelivery],
    ) -> anyhow::Result<Created> {
        let now = now_ms();
        let id = uuid::Uuid::new_v4().to_string();
        let mut tx = self.pool.begin().await?;
        // The insert comes first so that SQLite takes its write lock at once (no upgrade deadlock), and a
        // concurrent repeat waits on the unique index instead of racing a read.
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
        // Names come from the operators' file and the request: stored without control characters, so
        // a stray NUL in either can never make an emergency unstorable.
        .bind(crate::domain::storable(&incident.emergency_type).into_owned())
        .bind(crate::domain::storable(&incident.route).into_owned())
        .bind(incident.caller.as_deref())
        .bind(incident.recording_url.as_deref())
        .bind(incident.message.as_deref())
        .bind(&incident.raw_params)
        .bind(incident.occurred_at)
        .bind(now)
        .bind(IncidentState::Open.as_str())
        .fetch_optional(&mut *tx)
        .await
        .context("inserting the incident")?;

        if inserted.is_none() {
            let incident_id = stored_repeat(&mut tx, incident).await?;
            tx.commit().await?;
            return Ok(Created {
                incident_id,
                is_new: false,
                deliveries: 0,
            });
        }
        for d in deliveries {
            insert_delivery(&mut tx, &id, d, now).await?;
        }
        if let (Some(url), Some(fetch)) = (&incident.recording_url, incident.recording_fetch) {
            recordings::insert_recording(
                &mut tx,
                &id,
                url,
                incident.call_sid.as_deref(),
                fetch,
                now,
            )
            .await?;
        }
        if let Some(wake) = self.engine.wake_on_commit() {
            sqlx::query(wake).execute(&mut *tx).await?;
        }
        tx.commit().await.context("committing the incident")?;
        Ok(Created {
            incident_id: id,
            is_new: true,
            deliveries: deliveries.len(),
        })
    }

    /// What the greeting of the delivery with this reference should play or say.
    pub async fn greeting(&self, greeting_ref: &str) -> anyhow::Result<Option<GreetingView>> {
        let view = sqlx::query_as(
            "SELECT d.id AS delivery_id, i.id AS incident_id, i.source, i.emergency_type, \
             i.recording_url, i.message, i.caller, i.occurred_at, i.received_at, d.link_ref, \
             d.created_at AS issued_at, r.status AS recording_status \
             FROM deliveries d JOIN incidents i ON i.id = d.incident_id \
             LEFT JOIN recordings r ON r.incident_id = i.id WHERE d.greeting_ref = $1",
        )
        .bind(greeting_ref)
        .fetch_optional(&self.pool)
        .await?;
        Ok(view)
    }

    pub async fn incident(&self, id: &str) -> anyhow::Result<Option<IncidentRow>> {
        let row = sqlx::query_as(concat!(
            "SELECT ",
            incident_columns!(),
            " FROM incidents WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    pub async fn incident_by_call_sid(
        &self,
        call_sid: &str,
    ) -> anyhow::Result<Option<IncidentRow>> {
        let row = sqlx::query_as(concat!(
            "SELECT ",
            incident_columns!(),
            " FROM incidents WHERE call_sid = $1"
        ))
        .bind(call_sid)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    pub async fn count_incidents(&self) -> anyhow::Result<i64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM incidents")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    /// The incident's deliveries, calls first.
    pub async fn deliveries(&self, incident_id: &str) -> anyhow::Result<Vec<DeliveryRow>> {
        let rows = sqlx::query_as(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE incident_id = $1 ORDER BY priority, contact_name, id"
        ))
        .bind(incident_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub async fn delivery(&self, id: &str) -> anyhow::Result<Option<DeliveryRow>> {
        let row = sqlx::query_as(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM deliveries WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// The audit trail of one delivery, oldest first.
    pub async fn events(&self, delivery_id: &str) -> anyhow::Result<Vec<EventRow>> {
        let rows = sqlx::query_as(
            "SELECT id, delivery_id, at, kind, provider_id, detail FROM delivery_events \
             WHERE delivery_id = $1 ORDER BY id",
        )
        .bind(delivery_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Appends one event to a delivery's audit trail.
    pub async fn record_event(
        &self,
        delivery_id: &str,
        kind: &str,
        provider_id: Option<&str>,
        detail: &str,
    ) -> anyhow::Result<()> {
        insert_event(&self.pool, delivery_id, kind, provider_id, detail, now_ms()).await
    }
}

/// The incident a repeat (a stored CallSid, or the dedup key of an unresolved incident) names. A later
/// Passthru of the same call may be the first to carry the recording (one placed after the Voicemail
/// applet): it is kept rather than lost. Nothing else changes.
async fn stored_repeat(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    incident: &NewIncident,
) -> anyhow::Result<String> {
    let existing: Option<String> = sqlx::query_scalar(
        "SELECT id FROM incidents WHERE call_sid = $1 \
         OR (dedup_key = $2 AND status <> 'resolved') ORDER BY received_at LIMIT 1",
    )
    .bind(incident.call_sid.as_deref())
    .bind(incident.dedup_key.as_deref())
    .fetch_optional(&mut **tx)
    .await?;
    let incident_id =
        existing.context("the incident conflicted with one that can no longer be found")?;
    if let Some(url) = &incident.recording_url {
        let kept = sqlx::query(
            "UPDATE incidents SET recording_url = $1 WHERE id = $2 AND recording_url IS NULL",
        )
        .bind(url)
        .bind(&incident_id)
        .execute(&mut **tx)
        .await?;
        if let (1, Some(fetch)) = (kept.rows_affected(), incident.recording_fetch) {
            recordings::insert_recording(
                tx,
                &incident_id,
                url,
                incident.call_sid.as_deref(),
                fetch,
                now_ms(),
            )
            .await?;
        }
    }
    Ok(incident_id)
}

/// One queued delivery of a new incident.
async fn insert_delivery(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    incident_id: &str,
    d: &NewDelivery,
    now: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO deliveries (id, incident_id, contact_name, phone, channel, provider, \
         priority, greeting_ref, link_ref, status, due_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $11)",
    )
    .bind(uuid::Uuid::new_v4().to_string())
    .bind(incident_id)
    .bind(crate::domain::storable(&d.contact_name).into_owned())
    .bind(&d.phone)
    .bind(d.channel.as_str())
    .bind(&d.provider)
    .bind(d.channel.priority())
    .bind(crate::messages::new_reference())
    .bind(crate::messages::new_link_ref())
    .bind(DeliveryState::Queued.as_str())
    .bind(now)
    .execute(&mut **tx)
    .await
    .context("inserting a delivery")?;
    Ok(())
}

/// Shared by plain and transactional callers.
async fn insert_event<'e, E>(
    executor: E,
    delivery_id: &str,
    kind: &str,
    provider_id: Option<&str>,
    detail: &str,
    at: i64,
) -> anyhow::Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO delivery_events (delivery_id, at, kind, provider_id, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(delivery_id)
    .bind(at)
    .bind(kind)
    .bind(provider_id.map(|p| crate::domain::storable(p).into_owned()))
    .bind(crate::domain::storable(detail).into_owned())
    .execute(executor)
    .await?;
    Ok(())
}
