//! Everything that differs between PostgreSQL and SQLite, in one place: the database's clock, row
//! locking when claiming work, and the two-argument minimum. Each engine-specific statement is written
//! once with named gaps and put together at compile time for both engines; nothing here is assembled
//! at run time.

use super::Engine;

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
    (@postgres LEAST) => { "LEAST" };
    (@sqlite LEAST) => { "MIN" };
    (@$engine:ident $literal:literal) => { $literal };
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
}
