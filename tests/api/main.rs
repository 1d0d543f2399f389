//! Integration tests: the real server over real HTTP, on SQLite and on PostgreSQL.

mod helpers;
mod op;

mod alertmanager;
mod api;
mod check_config;
mod cli;
mod corpus;
mod dispatch;
mod faultproof;
mod greeting;
mod hardening;
mod health;
mod metrics;
mod passthru;
mod properties;
mod reload;
mod resilience;
