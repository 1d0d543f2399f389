//! Integration tests: the real server over real HTTP, on SQLite and on PostgreSQL.

mod helpers;
mod op;

mod alertmanager;
mod api;
mod check_config;
mod cli;
mod dispatch;
mod faults;
mod greeting;
mod health;
mod metrics;
mod passthru;
mod reload;
mod resilience;
