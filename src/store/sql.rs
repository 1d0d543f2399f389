//! Everything that differs between PostgreSQL and SQLite, in one place: migrations, connection set-up,
//! wake-ups at commit, the database's clock, row locking when claiming work, and the two-argument
//! minimum. Each engine-specific statement is written
//! once with named gaps and put together at compile time for both engines; nothing here is assembled
//! at run time.

use sqlx::migrate::Migrator;

use super::Engine;

/// The PostgreSQL NOTIFY channel that wakes every replica's dispatcher when work is committed.
macro_rules! wake_channel {
    () => {
        "sos_wake"
    };
}
pub(super) const WAKE_CHANNEL: &str = wake_channel!();

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");

impl Engine {
    /// This engine's migrations, embedded at build time.
    pub(super) fn migrations(self) -> &'static Migrator {
        match self {
            Engine::Postgres => &POSTGRES_MIGRATIONS,
            Engine::Sqlite => &SQLITE_MIGRATIONS,
        }
    }

    /// Run on every new connection. SQLite runs in WAL mode with `synchronous=FULL`, so a commit (and
    /// so a 200 to Exotel) survives a power cut, not only a crash.
    /// `read_only` connections (SQLite's read pool) refuse writes.
    pub(super) fn on_connect(self, read_only: bool) -> &'static [&'static str] {
        match (self, read_only) {
            (Engine::Postgres, _) => &[],
            (Engine::Sqlite, false) => &[
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = FULL",
                "PRAGMA foreign_keys = ON",
                "PRAGMA busy_timeout = 10000",
            ],
            // The busy timeout stays: a checkpoint can briefly hold readers too.
            (Engine::Sqlite, true) => &[
                "PRAGMA foreign_keys = ON",
                "PRAGMA busy_timeout = 10000",
                "PRAGMA query_only = ON",
            ],
        }
    }

    /// Run inside a transaction that queued work: on PostgreSQL a NOTIFY, delivered at commit to
    /// every replica's dispatcher. SQLite has one process, woken in memory.
    pub(super) fn wake_on_commit(self) -> Option<&'static str> {
        match self {
            Engine::Postgres => Some(concat!("NOTIFY ", wake_channel!())),
            Engine::Sqlite => None,
        }
    }
}

/// One statement, as each engine spells it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dialect {
    pub postgres: &'static str,
    pub sqlite: &'static str,
}

impl Dialect {
    pub fn of(&self, engine: Engine) -> &'static str {
        match engine {
            Engine::Postgres => self.postgres,
            Engine::Sqlite => self.sqlite,
        }
    }
}

/// Builds a [`Dialect`] from string literals and these gaps:
/// - `NOW`: the database's clock in milliseconds since the epoch (the one clock replicas share);
/// - `SKIP_LOCKED`: PostgreSQL replicas skip each other's locked rows instead of queueing behind them;
///   SQLite has one writer at a time, so the statement alone is atomic;
/// - `PICK` … `PICKED`: around the subquery that picks the rows a claim takes (`WHERE id PICK SELECT id
///   … LIMIT n PICKED`), locked and skipped by other replicas on PostgreSQL. There it is
///   `= ANY(ARRAY(… FOR UPDATE SKIP LOCKED))`, evaluated once for the statement: written as
///   `IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)` the planner may make it the inner side of a nested
///   loop, run again for every outer row, and each run skips the rows the statement itself has just
///   updated and picks the next ones, so a claim of one takes every due row. SQLite: `IN (…)`;
/// - `LEAST`: the two-argument minimum (SQLite's `MIN`);
/// - `DELIVERY_COLUMNS`: the columns of a delivery row, the same on both;
/// - `{ some_macro!() }`: a piece shared by both engines, from a macro that expands to a literal.
macro_rules! per_engine {
    (@$engine:ident { $($shared:tt)* }) => { $($shared)* };
    (@$engine:ident DELIVERY_COLUMNS) => { $crate::store::rows::delivery_columns!() };
    (@postgres NOW) => { "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT" };
    (@sqlite NOW) => { "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)" };
    (@postgres SKIP_LOCKED) => { "FOR UPDATE SKIP LOCKED" };
    (@sqlite SKIP_LOCKED) => { "" };
    (@postgres PICK) => { "= ANY(ARRAY(" };
    (@sqlite PICK) => { "IN (" };
    (@postgres PICKED) => { " FOR UPDATE SKIP LOCKED))" };
    (@sqlite PICKED) => { ")" };
    (@postgres LEAST) => { "LEAST" };
    (@sqlite LEAST) => { "MIN" };
    (@$engine:ident $literal:literal) => { $literal };
    (@$engine:ident $other:tt) => {
        compile_error!(concat!(
            "per_engine!: unknown gap `", stringify!($other),
            "` (NOW, SKIP_LOCKED, PICK, PICKED, LEAST, DELIVERY_COLUMNS, a string literal or { macro!() })"
        ))
    };
    ($($part:tt)+) => {
        $crate::store::sql::Dialect {
            postgres: concat!($(per_engine!(@postgres $part)),+),
            sqlite: concat!($(per_engine!(@sqlite $part)),+),
        }
    };
}
pub(super) use per_engine;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_filled_per_engine() {
        const S: Dialect = per_engine!("SELECT " NOW " FROM t " SKIP_LOCKED);
        assert!(S.of(Engine::Postgres).contains("clock_timestamp()"));
        assert!(S.of(Engine::Postgres).ends_with("FOR UPDATE SKIP LOCKED"));
        assert!(S.of(Engine::Sqlite).contains("julianday('now')"));
        assert!(!S.of(Engine::Sqlite).contains("FOR UPDATE"));
    }

    #[test]
    fn a_pick_is_evaluated_once_on_postgres() {
        const S: Dialect = per_engine!("UPDATE t SET a = 1 WHERE id " PICK "SELECT id FROM t LIMIT 2" PICKED " AND b = 2");
        assert_eq!(
            S.of(Engine::Postgres),
            "UPDATE t SET a = 1 WHERE id = ANY(ARRAY(SELECT id FROM t LIMIT 2 FOR UPDATE SKIP LOCKED)) AND b = 2"
        );
        assert_eq!(
            S.of(Engine::Sqlite),
            "UPDATE t SET a = 1 WHERE id IN (SELECT id FROM t LIMIT 2) AND b = 2"
        );
    }
}
