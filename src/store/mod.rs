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

mod ack;
pub mod alarms;
mod audit;
mod cap;
pub mod console;
mod escalation;
mod fallback;
mod health;
mod incidents;
mod intake;
mod optins;
mod queue;
pub mod recordings;
pub mod retention;
mod rows;
mod sql;

pub use crate::domain::RedialPolicy;
pub use ack::{event as ack_event, AckRequest, Acknowledged};
pub use audit::{Overdue, SilentLane};
pub use cap::{Claimed, HeldCall};
pub use queue::{CallbackEffect, Finish, Moved};

pub use health::Writable;
pub use incidents::{IncidentFilter, QueueStats, Resolved};
pub use recordings::{AttemptFailed, IncidentEventRow, LinkView, RecordingFetch, RecordingRow};
pub use rows::{DeliveryRow, EventRow, GreetingView, IncidentRow};

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::AnyPool;

use self::rows::{delivery_columns, incident_columns};
use crate::domain::{random_token, Channel, Clock, DeliveryState, IncidentState, Source};

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
///
/// Writes and reads go through separate pools. On SQLite, which allows one writer at a time, the
/// writer pool has exactly one connection: writers queue for it in order (a fair, async wait) instead
/// of each taking a connection and sleeping in SQLite's busy handler, which backs off for up to
/// hundreds of milliseconds while an emergency waits. The read pool's connections are `query_only`,
/// so a write sent down the wrong path fails loudly instead of competing for the lock. On PostgreSQL
/// both are the same pool.
#[derive(Clone)]
pub struct Store {
    /// Reads.
    reader: AnyPool,
    /// Writes, and every transaction.
    writer: AnyPool,
    /// New incidents, group-committed through `intake_pool`.
    intake: intake::Intake,
    /// The connections new incidents are written on: on PostgreSQL their own
    /// ([`INTAKE_CONNECTIONS`]), on SQLite the one writer.
    intake_pool: AnyPool,
    engine: Engine,
    /// What every due time and deadline is judged by (see [`Clock`]).
    clock: Clock,
    /// Whether writes commit (see [`health`]).
    health: std::sync::Arc<health::WriteHealth>,
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
    /// The escalation policy it follows, fixed now (JSON); `None`: one tier, everyone at once.
    pub escalation: Option<String>,
    /// Nobody having acknowledged this long after it is stored makes it unreached, milliseconds;
    /// `None` (a drill): never.
    pub unreached_after_ms: Option<i64>,
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
    /// The escalation tier it alerts (0: the first).
    pub tier: u32,
    /// The pass through the escalation policy (0: the first).
    pub run: u32,
    /// Due this long after the incident is stored, milliseconds (0: at once).
    pub delay_ms: i64,
}

/// The result of [`Store::create_incident`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub incident_id: String,
    /// False when the CallSid or open dedup key was already stored: nothing new was written.
    pub is_new: bool,
    pub deliveries: usize,
}

/// PostgreSQL connections kept for writing new incidents, beside `database.max_connections`: one batch
/// is written at a time, and a second lets a batch that failed be retried alone without waiting.
pub const INTAKE_CONNECTIONS: u32 = 2;

impl Store {
    /// Connects and configures the engine. SQLite runs in WAL mode with `synchronous=FULL`, so a commit
    /// (and so a 200 to Exotel) survives a power cut, not only a crash.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let engine = Engine::of_url(url)?;
        let options =
            AnyConnectOptions::from_str(url).context("database.url is not a valid URL")?;
        let open = |max: u32, read_only: bool| {
            let options = options.clone();
            async move {
                AnyPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(Duration::from_secs(5))
                    // A connection whose COMMIT or ROLLBACK failed (a full disk, an I/O error) may
                    // still count itself inside a transaction that the database has already ended:
                    // every later `begin` on it would become a savepoint of a transaction that never
                    // commits, and every write on it would seem to succeed while nothing is stored.
                    // Such a connection is closed here, before anyone can use it, and replaced.
                    .before_acquire(|conn, _meta| {
                        Box::pin(async move {
                            let clean = !sqlx::Connection::is_in_transaction(conn);
                            if !clean {
                                tracing::warn!(
                                    "closing a database connection left inside a failed transaction"
                                );
                            }
                            Ok(clean)
                        })
                    })
                    .after_connect(move |conn, _meta| {
                        Box::pin(async move {
                            for statement in engine.on_connect(read_only) {
                                sqlx::query(statement).execute(&mut *conn).await?;
                            }
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await
                    .with_context(|| format!("cannot open the {} database", engine.as_str()))
            }
        };
        let (reader, writer, intake) = match engine {
            // New emergencies are written on connections of their own: however busy the shared pool
            // (a burst of sends recording outcomes, console streams, slow reads), a Passthru never waits
            // for one of its connections and times out into the fallback branch.
            Engine::Postgres => {
                let pool = open(max_connections, false).await?;
                let intake = open(INTAKE_CONNECTIONS, false).await?;
                (pool.clone(), pool, intake)
            }
            // The writer first: it creates the file and switches it to WAL before readers open it.
            // One writer: the intake shares it, and background writers yield to it (`yield_to_intake`).
            Engine::Sqlite => {
                let writer = open(1, false).await?;
                let readers = open(max_connections.saturating_sub(1).max(1), true).await?;
                (readers, writer.clone(), writer)
            }
        };
        let clock = Clock::system();
        let health = health::WriteHealth::new();
        Ok(Store {
            reader,
            intake: intake::Intake::start(intake.clone(), engine, clock.clone(), health.clone()),
            health,
            intake_pool: intake,
            clock,
            writer,
            engine,
        })
    }

    /// The clock every due time and deadline is judged by; tests move it forward.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Now, by [`Store::clock`].
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Background writers (the dispatcher) call this first: on SQLite they let waiting incidents take
    /// the one writer before them, for a moment at most.
    async fn yield_to_intake(&self) {
        if self.engine == Engine::Sqlite {
            self.intake.yield_to().await;
        }
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The pool that writes (on SQLite its one connection).
    pub fn pool(&self) -> &AnyPool {
        &self.writer
    }

    /// Applies the embedded migrations of this engine.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        self.engine
            .migrations()
            .run(&self.writer)
            .await
            .context("applying migrations")?;
        self.write_lifecycle().await
    }

    /// Fills the lifecycle's lookup tables (states and moves) from [`DeliveryState`] and
    /// [`IncidentState`]: the code's table is the one written down, the database enforces it. Only
    /// adds: a replica still running an older build keeps the moves it knows, so a move taken out of
    /// the code stays allowed in existing databases until a migration removes it.
    async fn write_lifecycle(&self) -> anyhow::Result<()> {
        let mut tx = self.writer.begin().await?;
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
                .fetch_one(&self.reader)
                .await?;
        Ok(applied.unwrap_or(0) >= latest)
    }

    /// Whether the database takes writes: what the last write found, probed again when that is old
    /// (see [`health`]).
    pub async fn writable(&self) -> Writable {
        self.health.check(&self.writer).await
    }

    /// Whether the database refused what `e` tried to store (trying it again cannot help), rather than
    /// being out of reach (it can, once the database is back).
    pub fn refused(&self, e: &anyhow::Error) -> bool {
        health::refused(self.engine, e)
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
        self.intake_pool.close().await;
    }

    /// The stored secret `name`, creating it with a fresh random value the first time. Safe when several
    /// replicas start at once: the first insert wins and everyone reads it back.
    pub async fn secret(&self, name: &str) -> anyhow::Result<String> {
        sqlx::query(
            "INSERT INTO app_secrets (name, value, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(random_token(24))
        .bind(self.now_ms())
        .execute(&self.writer)
        .await?;
        let value: String = sqlx::query_scalar("SELECT value FROM app_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.writer)
            .await?;
        Ok(value)
    }

    /// Stores the incident and one queued delivery per target in ONE transaction, which it may share
    /// with incidents arriving at the same time (one durable commit for all: see [`intake`]). Answers
    /// once its rows are durable. A repeat of a stored CallSid, or of the dedup key of an incident
    /// still open, writes nothing and returns the first one.
    pub async fn create_incident(
        &self,
        incident: &NewIncident,
        deliveries: &[NewDelivery],
    ) -> anyhow::Result<Created> {
        self.intake
            .submit(incident.clone(), deliveries.to_vec())
            .await
    }

    /// What the greeting of the delivery with this reference should play or say.
    pub async fn greeting(&self, greeting_ref: &str) -> anyhow::Result<Option<GreetingView>> {
        let view = sqlx::query_as(
            "SELECT d.id AS delivery_id, i.id AS incident_id, i.source, i.emergency_type, \
             i.recording_url, i.message, i.caller, i.occurred_at, i.received_at, d.link_ref, \
             d.created_at AS issued_at, r.status AS recording_status, d.purpose, d.tier, d.run, \
             d.redials, i.acknowledged_by, i.acknowledged_at \
             FROM deliveries d JOIN incidents i ON i.id = d.incident_id \
             LEFT JOIN recordings r ON r.incident_id = i.id WHERE d.greeting_ref = $1",
        )
        .bind(greeting_ref)
        .fetch_optional(&self.reader)
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
        .fetch_optional(&self.reader)
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
        .fetch_optional(&self.reader)
        .await?;
        Ok(row)
    }

    pub async fn count_incidents(&self) -> anyhow::Result<i64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM incidents")
            .fetch_one(&self.reader)
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
        .fetch_all(&self.reader)
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
        .fetch_optional(&self.reader)
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
        .fetch_all(&self.reader)
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
        insert_event(
            &self.writer,
            delivery_id,
            kind,
            provider_id,
            detail,
            self.now_ms(),
        )
        .await
    }
}

/// The incident a repeat (a stored CallSid, or the dedup key of an unresolved incident) names. A later
/// Passthru of the same call may be the first to carry the recording (one placed after the Voicemail
/// applet): it is kept rather than lost. Nothing else changes.
async fn stored_repeat(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    incident: &NewIncident,
    now: i64,
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
                now,
            )
            .await?;
        }
    }
    Ok(incident_id)
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
