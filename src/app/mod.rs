//! The application layer: the state every entry point shares, and the use cases they all go through
//! ([`incidents::raise`], [`incidents::resolve`]) and the housekeeping tasks. It sits between the doors
//! (`http`, the CLI) and the machinery (`store`, `dispatch`, `providers`): imports point down only.

pub mod ack;
pub mod alarms;
pub mod auditor;
pub mod console;
pub mod durable;
pub mod housekeeping;
pub mod incidents;
pub mod optin;
pub mod recordings;
pub mod reports;
pub mod supervise;

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::providers::Registry;
use crate::settings::Settings;
use crate::stakeholders::reload::RoutingHandle;
use crate::store::Store;

/// Everything a handler or task needs; cloned per request (every field is shared).
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub routing: Arc<RoutingHandle>,
    /// The provider lanes: which provider sends which channel.
    pub providers: Arc<Registry>,
    pub webhook_token: Arc<SecretString>,
    pub admin_token: Arc<SecretString>,
    /// Wakes the dispatcher as soon as new work is committed.
    pub wake: Arc<tokio::sync::Notify>,
    /// When the dispatcher loop last went round (ms since the epoch; 0 = not started): `/readyz` reads it.
    pub dispatcher_heartbeat: Arc<std::sync::atomic::AtomicI64>,
    /// Set when an enabled dispatcher stopped on its own (a panic or an early return): `/healthz` then
    /// fails and the process exits non-zero, so a supervisor restarts it.
    pub dispatcher_dead: Arc<std::sync::atomic::AtomicBool>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Recording links opened lately, so a player's range requests are recorded as one open.
    pub recording_opens: Arc<crate::recordings::opens::OpenThrottle>,
    /// The ops console's change signal, event-stream cap and sign-in limiter.
    pub console: Arc<console::Hub>,
    /// Bad webhook tokens seen lately, and account alarms raised from status reports.
    pub alarm_watch: Arc<alarms::AlarmWatch>,
    /// What this replica's auditor last found, for `/readyz`.
    pub auditor: Arc<auditor::Status>,
}

impl AppState {
    /// The webhook token of a request to one of Exotel's webhooks (`/exotel/*`): also watched for a
    /// burst of wrong tokens (see [`alarms::token_checked`]). `sender` says who a refused request
    /// looks like it came from; it is asked only then, so a good request costs no look at its numbers.
    pub fn exotel_token_ok(
        &self,
        given: Option<&str>,
        sender: impl FnOnce() -> alarms::Sender,
    ) -> bool {
        let ok = token_matches(&self.webhook_token, given);
        let sender = if ok { alarms::Sender::Exotel } else { sender() };
        alarms::token_checked(self, given, ok, sender);
        ok
    }

    /// The webhook token of a request to another provider's webhook (GupShup's): not watched, since
    /// the token alarm is about Exotel's flow URLs.
    pub fn webhook_token_ok(&self, given: Option<&str>) -> bool {
        token_matches(&self.webhook_token, given)
    }

    pub fn admin_token_ok(&self, given: Option<&str>) -> bool {
        token_matches(&self.admin_token, given)
    }

    pub fn region(&self) -> phonenumber::country::Id {
        crate::domain::phone::region(&self.settings.stakeholders.default_country)
            .unwrap_or(phonenumber::country::Id::IN)
    }
}

/// Constant-time comparison, so response timing does not reveal how much of a guess was right.
pub fn token_matches(expected: &SecretString, given: Option<&str>) -> bool {
    let expected = expected.expose_secret().as_bytes();
    match given {
        Some(g) if !expected.is_empty() => g.as_bytes().ct_eq(expected).into(),
        _ => false,
    }
}
