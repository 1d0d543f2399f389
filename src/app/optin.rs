//! WhatsApp opt-in: GupShup delivers business-initiated messages only to numbers opted in with its
//! `OPT_IN` method. Every WhatsApp contact of the stakeholder file is opted in once (recorded in the
//! store), by `exotel-sos optin` and by the server whenever the file is loaded or reloaded.

use std::sync::Arc;

use tokio::sync::watch;

use super::AppState;
use crate::domain::Phone;
use crate::providers::{self, gupshup::Gupshup, Client};
use crate::stakeholders::Routing;
use crate::store::Store;

/// What became of one contact's opt-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptIn {
    /// GupShup confirmed it now; recorded.
    Done,
    /// Recorded before: nothing sent.
    Already,
    /// Not opted in; why (numbers masked).
    Failed(String),
}

/// One contact's line of the opt-in run; the number is masked.
#[derive(Debug, Clone)]
pub struct OptInLine {
    pub name: String,
    pub masked: String,
    pub outcome: OptIn,
}

/// Opts in every WhatsApp contact of `routing` not recorded yet, one request each, in file order.
pub async fn opt_in_all(
    store: &Store,
    client: &Gupshup,
    http: &reqwest::Client,
    routing: &Routing,
) -> Vec<OptInLine> {
    let mut lines = Vec::new();
    for (name, phone) in routing.whatsapp_contacts() {
        let outcome = opt_in_one(store, client, http, &phone).await;
        lines.push(OptInLine {
            name,
            masked: phone.masked(),
            outcome,
        });
    }
    lines
}

async fn opt_in_one(
    store: &Store,
    client: &Gupshup,
    http: &reqwest::Client,
    phone: &Phone,
) -> OptIn {
    match store.opted_in(phone.e164()).await {
        Ok(true) => return OptIn::Already,
        Ok(false) => {}
        Err(e) => return OptIn::Failed(format!("the database could not be read: {e:#}")),
    }
    // <https://docs.gupshup.io/docs/api-reference>: `method=OPT_IN`, `phone_number`, `channel`.
    let answer = match providers::execute(http, &client.opt_in(phone.e164())).await {
        Ok(answer) => answer,
        Err(
            providers::Outcome::Transient { reason, .. } | providers::Outcome::Permanent { reason },
        ) => return OptIn::Failed(reason),
        Err(providers::Outcome::Accepted { .. }) => {
            return OptIn::Failed("unexpected answer".to_owned())
        }
    };
    if let Err(why) = client.read_opt_in(&answer) {
        // GupShup's error text can quote the number: it is logged and printed, so masked here.
        return OptIn::Failed(crate::domain::mask_numbers(&why));
    }
    match store.record_opt_in(phone.e164()).await {
        Ok(()) => OptIn::Done,
        Err(e) => OptIn::Failed(format!("opted in, but not recorded: {e:#}")),
    }
}

/// Opts in the stakeholder file's WhatsApp contacts at start and after each accepted reload, in the
/// background (a request never waits for it). Without GupShup credentials (dry-run) nothing is sent
/// or recorded: the contacts are only logged.
pub async fn follow_stakeholder_file(state: AppState, mut shutdown: watch::Receiver<bool>) {
    let client = crate::providers::registry::gupshup(&state.settings);
    let http = reqwest::Client::new();
    let mut loaded = state.routing.subscribe();
    loop {
        let routing: Arc<Routing> = state.routing.current();
        if client.is_live() {
            for line in opt_in_all(&state.store, &client, &http, &routing).await {
                match line.outcome {
                    OptIn::Done => {
                        tracing::info!(contact = %line.name, phone = %line.masked, "WhatsApp opt-in done")
                    }
                    OptIn::Already => {}
                    OptIn::Failed(why) => {
                        tracing::warn!(contact = %line.name, phone = %line.masked, why = %why, "WhatsApp opt-in failed")
                    }
                }
            }
        } else {
            for (name, phone) in routing.whatsapp_contacts() {
                tracing::info!(contact = %name, phone = %phone.masked(), "dry-run: WhatsApp opt-in not sent (GupShup credentials not set)");
            }
        }
        tokio::select! {
            changed = loaded.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}
