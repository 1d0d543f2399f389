//! The caller's recording: fetched from the provider, kept in the database, served at `/r/<ref>`.

pub mod fetch;
pub mod opens;
pub mod range;
