//! Integration tests: the real server over real HTTP, on SQLite and on PostgreSQL.

mod helpers;
mod op;

mod check_config;
mod greeting;
mod passthru;
mod reload;

// Operator surface (issue 4).
mod alertmanager;
mod api;
mod cli;
mod health;
mod metrics;
