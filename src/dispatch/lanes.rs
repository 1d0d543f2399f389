//! The lanes the dispatcher sends through: each registered provider lane with whether it is live and
//! its limits. Limits come from the channel's settings; lanes of one account share a pause, and on
//! PostgreSQL each lane's rate is an account-wide bucket named after the lane.

use std::collections::HashMap;
use std::sync::Arc;

use super::limits::{Limits, Pause, SharedRate};
use crate::domain::Channel;
use crate::providers::{Client, Registered, Registry};
use crate::settings::Settings;
use crate::store::Store;

/// One provider lane: its client, whether it is live, and its limits.
pub struct Lane {
    pub provider: Registered,
    pub live: bool,
    pub limits: Limits,
}

impl Lane {
    pub fn channel(&self) -> Channel {
        self.provider.channel()
    }

    /// The lane's name, as stored on each delivery it sends.
    pub fn name(&self) -> &str {
        &self.provider.name
    }

    pub fn client(&self) -> &dyn Client {
        self.provider.client.as_ref()
    }

    /// Whether an accepted request gets a report to wait for.
    pub fn reports_outcome(&self) -> bool {
        self.provider.client.reports_outcome()
    }
}

/// One lane per registered provider, in registration order (calls first among the built-in ones).
/// With `shared` (PostgreSQL), each lane's rate is an account-wide bucket in that database.
pub fn lanes(settings: &Settings, registry: &Registry, shared: Option<&Store>) -> Vec<Lane> {
    let mut pauses: HashMap<&str, Arc<Pause>> = HashMap::new();
    registry
        .lanes()
        .iter()
        .map(|provider| {
            let (concurrency, per_minute) = settings.dispatch.limits(provider.channel());
            let pause = pauses.entry(provider.account.as_str()).or_default().clone();
            let shared = shared.map(|store| SharedRate {
                store: store.clone(),
                name: provider.name.clone(),
            });
            Lane {
                live: provider.client.is_live(),
                limits: Limits::new(concurrency, per_minute, pause, shared),
                provider: provider.clone(),
            }
        })
        .collect()
}
