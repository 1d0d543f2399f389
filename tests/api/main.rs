//! Integration tests: the real server over real HTTP, on SQLite and on PostgreSQL.

mod helpers;
mod op;
mod raw;

mod alertmanager;
mod api;
mod browser;
mod check_config;
mod cli;
mod cli_dedup;
mod console;
mod control_chars;
mod corpus;
mod deadline;
mod dispatch;
mod dlt;
mod drill;
mod faultproof;
mod faults;
mod greeting;
mod gupshup;
mod hardening;
mod health;
mod intake;
mod lifecycle;
mod metrics;
mod multipart;
mod passthru;
mod passthru_head;
mod properties;
mod recordings;
mod reload;
mod resilience;
mod server_settings;
mod slow_clients;
mod storm;
