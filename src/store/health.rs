//! Whether the database takes writes: what `/readyz` reports as `database: "unwritable"`.
//!
//! A database can answer reads and still refuse every commit (a full disk, a read-only remount, a
//! PostgreSQL tablespace out of space). Reads alone would call it healthy while every Passthru turns
//! into a 302, so writes are watched: the intake reports each batch's outcome, and a probe (one tiny
//! committed write) checks again, at most once every [`PROBE_EVERY`] while all is well and at most once
//! every [`REPROBE_EVERY`] while writes are failing, so a flood of `/readyz` cannot turn into a flood
//! of writes competing with emergencies for SQLite's one writer.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::AnyPool;

use crate::domain::now_ms;

/// A healthy database is probed this often at most, milliseconds.
const PROBE_EVERY: i64 = 5_000;
/// A failing one is probed again this often at most, milliseconds.
const REPROBE_EVERY: i64 = 1_000;

/// The writes' record, shared by every clone of the store.
#[derive(Debug, Default)]
pub(super) struct WriteHealth {
    /// When writes started failing, with none committed since (ms by the system clock; 0: writable).
    failing_since: AtomicI64,
    /// When the last probe started (ms; 0: never).
    probed_at: AtomicI64,
    /// Why the last failed write failed (no values, only the database's words).
    last_error: Mutex<Option<String>>,
}

/// What `/readyz` is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writable {
    Yes,
    /// Writes fail since this moment (ms), for this reason.
    No {
        since_ms: i64,
        error: String,
    },
}

impl WriteHealth {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A write committed.
    pub(super) fn committed(&self) {
        self.failing_since.store(0, Ordering::Release);
    }

    /// A write could not be committed.
    pub(super) fn failed(&self, error: &anyhow::Error) {
        let _ = self.failing_since.compare_exchange(
            0,
            now_ms().max(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(format!("{error:#}"));
        }
    }

    fn state(&self) -> Writable {
        match self.failing_since.load(Ordering::Acquire) {
            0 => Writable::Yes,
            since_ms => Writable::No {
                since_ms,
                error: self
                    .last_error
                    .lock()
                    .ok()
                    .and_then(|l| l.clone())
                    .unwrap_or_default(),
            },
        }
    }

    /// The current state, probing first when the last probe is old enough.
    pub(super) async fn check(&self, writer: &AnyPool) -> Writable {
        let now = now_ms();
        let every = match self.state() {
            Writable::Yes => PROBE_EVERY,
            Writable::No { .. } => REPROBE_EVERY,
        };
        let last = self.probed_at.load(Ordering::Acquire);
        // One probe at a time: whoever moves `probed_at` runs it, the others read the last state.
        if now - last >= every
            && self
                .probed_at
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            match probe(writer, now).await {
                Ok(()) => self.committed(),
                Err(e) => self.failed(&e),
            }
        }
        self.state()
    }
}

/// One committed write of one small row, as any emergency's would be: through the writer, in a
/// transaction, with a durable commit.
async fn probe(writer: &AnyPool, now: i64) -> anyhow::Result<()> {
    let mut tx = writer.begin().await?;
    sqlx::query(
        "INSERT INTO job_leases (name, owner, until) VALUES ('write-probe', 'readyz', $1) \
         ON CONFLICT (name) DO UPDATE SET until = excluded.until",
    )
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Whether a statement failed for want of storage (a full disk, an I/O error, a read-only file), not
/// for anything in the incident: the database is unwritable, whichever incident tried.
pub(super) fn storage_failure(engine: super::Engine, e: &anyhow::Error) -> bool {
    e.chain()
        .any(|cause| match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => {
                db.code().is_some_and(|code| storage_code(engine, &code))
            }
            Some(sqlx::Error::Io(_)) => true,
            _ => false,
        })
}

/// SQLite's result codes (the primary code is the low byte of an extended one) for a full disk (13),
/// an I/O error (10), a read-only database (8) or a file that cannot be opened (14); PostgreSQL's
/// class 53 (insufficient resources: a full disk, out of memory) and 58 (system error: I/O).
fn storage_code(engine: super::Engine, code: &str) -> bool {
    match engine {
        super::Engine::Sqlite => code
            .parse::<i64>()
            .is_ok_and(|n| matches!(n & 0xff, 8 | 10 | 13 | 14)),
        super::Engine::Postgres => code.starts_with("53") || code.starts_with("58"),
    }
}

/// Whether the database answered `e` by refusing what it was given (a value it cannot store, a
/// constraint, an illegal state move, a statement it does not understand): trying the same again cannot
/// help. Anything else (a connection refused or ended, a pool timeout, a busy or full database, an I/O
/// error) is the database being away, and the same statement can succeed once it is back.
pub(super) fn refused(engine: super::Engine, e: &anyhow::Error) -> bool {
    let Some(error) = e.chain().find_map(|c| c.downcast_ref::<sqlx::Error>()) else {
        // Not the database's answer at all: nothing says waiting would help.
        return true;
    };
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match engine {
                // The primary result code is the low byte of an extended one: CONSTRAINT (19, which
                // includes a trigger's RAISE), MISMATCH (20), TOOBIG (18), RANGE (25), and ERROR (1:
                // bad SQL, or a value the statement refuses).
                super::Engine::Sqlite => code
                    .parse::<i64>()
                    .is_ok_and(|n| matches!(n & 0xff, 1 | 18 | 19 | 20 | 25)),
                // Data exception (22: e.g. a NUL byte in text), integrity (23), syntax or access
                // (42), and a PL/pgSQL RAISE (P0: the state machine's triggers).
                super::Engine::Postgres => {
                    ["22", "23", "42", "P0"].iter().any(|c| code.starts_with(c))
                }
            }
        }
        sqlx::Error::Encode(_)
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::InvalidArgument(_)
        | sqlx::Error::Configuration(_) => true,
        _ => false,
    }
}

/// Whether PostgreSQL ended the transaction to break a deadlock or a serialization conflict with another
/// one (`40P01`, `40001`): the same transaction, run again, normally goes through.
pub(super) fn is_conflict(e: &anyhow::Error) -> bool {
    e.chain().any(|c| match c.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40P01") | Some("40001"))
        }
        _ => false,
    })
}
