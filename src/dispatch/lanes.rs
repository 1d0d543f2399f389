//! The channels the dispatcher sends through: each provider client with its limits, built from
//! settings, and the redial policy shared by callbacks and look-ups.

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;

use super::limits::{Limits, Pause, SharedRate};
use crate::domain::Channel;
use crate::providers::exotel::Account;
use crate::providers::exotel_call::ExotelCall;
use crate::providers::exotel_sms::ExotelSms;
use crate::providers::gupshup::Gupshup;
use crate::providers::Client;
use crate::settings::Settings;
use crate::store::{RedialPolicy, Store};

/// What to do with a call that was not reached, from settings; shared by callbacks and look-ups.
pub fn redial_policy(settings: &Settings) -> RedialPolicy {
    RedialPolicy {
        delay: Duration::from_secs_f64(settings.dispatch.redial_delay_secs),
        max_redials: settings.dispatch.max_redials,
    }
}

/// One channel: its client, whether it is live, and its limits.
pub struct Lane {
    pub client: Box<dyn Client>,
    pub live: bool,
    pub limits: Limits,
}

impl Lane {
    pub fn channel(&self) -> Channel {
        self.client.channel()
    }
}

/// Builds the three lanes from settings. Exotel's calls and SMS share one pause (one account). With
/// `shared` (PostgreSQL), each lane's rate is an account-wide bucket in that database.
pub fn lanes(settings: &Settings, webhook_token: &str, shared: Option<&Store>) -> Vec<Lane> {
    let d = &settings.dispatch;
    clients(settings, webhook_token)
        .into_iter()
        .map(|(client, pause, bucket)| {
            let (concurrency, per_minute) = d.limits(client.channel());
            let shared = shared.map(|store| SharedRate {
                store: store.clone(),
                name: bucket.to_owned(),
            });
            Lane {
                live: client.is_live(),
                limits: Limits::new(concurrency, per_minute, pause, shared),
                client,
            }
        })
        .collect()
}

/// One client per channel, calls first, each with the pause it obeys and the name of its shared rate
/// bucket.
fn clients(
    settings: &Settings,
    webhook_token: &str,
) -> Vec<(Box<dyn Client>, Arc<Pause>, &'static str)> {
    let ex = &settings.exotel;
    let account = Account {
        base_url: ex.base_url.clone(),
        account_sid: ex.account_sid.clone(),
        api_key: ex.api_key.expose_secret().to_owned(),
        api_token: ex.api_token.clone(),
    };
    let base = settings.public_base();
    let exotel_pause = Arc::new(Pause::default());
    vec![
        (
            Box::new(ExotelCall {
                account: account.clone(),
                caller_id: ex.caller_id.clone(),
                flow_url: ex.flow_url.clone(),
                status_callback: format!("{base}/exotel/call-status?token={webhook_token}"),
                ring_timeout_secs: ex.ring_timeout_secs,
                request_timeout: Duration::from_secs(ex.call_timeout_secs),
            }),
            exotel_pause.clone(),
            "exotel:call",
        ),
        (
            Box::new(ExotelSms {
                account,
                from: ex.sms_from.clone(),
                dlt_entity_id: ex.dlt_entity_id.clone(),
                dlt_template_id: ex.dlt_template_id.clone(),
                status_callback: format!("{base}/exotel/sms-status?token={webhook_token}"),
                request_timeout: Duration::from_secs(ex.sms_timeout_secs),
            }),
            exotel_pause,
            "exotel:sms",
        ),
        (
            Box::new(Gupshup {
                base_url: settings.gupshup.base_url.clone(),
                userid: settings.gupshup.userid.clone(),
                password: settings.gupshup.password.clone(),
                msg_type: settings.gupshup.msg_type.clone(),
                is_template: settings.gupshup.template,
                request_timeout: Duration::from_secs(settings.gupshup.timeout_secs),
            }),
            Arc::new(Pause::default()),
            "gupshup:whatsapp",
        ),
    ]
}
