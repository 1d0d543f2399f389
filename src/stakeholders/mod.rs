//! The ops-edited stakeholder file: contacts, teams, routes and IVR digits, validated as a whole into a
//! [`Routing`] that answers "who gets what for this emergency type", and in which escalation tier.

mod file;
pub mod reload;

pub use file::{
    human_secs, is_sample_number, unreached_warning, Contact, Escalation, EscalationBounds, Plan,
    Routing, Target, CALL_MARGIN_SECS, DEFAULT_ROUTE, MAX_REPEAT, MAX_WAIT_SECS,
};
