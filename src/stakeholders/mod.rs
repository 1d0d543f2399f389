//! The ops-edited stakeholder file: contacts, teams, routes and IVR digits, validated as a whole into a
//! [`Routing`] that answers "who gets what for this emergency type", and in which escalation tier.

mod describe;
mod escalation;
mod file;
#[cfg(test)]
mod fixtures;
pub mod reload;
mod routing;

pub use describe::{human_secs, is_sample_number, unreached_warning};
pub use escalation::{Escalation, EscalationBounds, CALL_MARGIN_SECS, MAX_REPEAT, MAX_WAIT_SECS};
pub use routing::{Contact, Plan, Routing, Target, DEFAULT_ROUTE};
