//! Integration tests: the real server over real HTTP, on SQLite and on PostgreSQL.

mod helpers;

mod check_config;
mod dispatch;
mod greeting;
mod passthru;
mod reload;
mod resilience;
