//! Which providers send which channel. A channel has providers: each registered provider client is
//! one *lane*, named `provider:channel` (`exotel:call`). The name is stored on every delivery the lane
//! sends, so work is claimed per lane with that lane's limits, and it names the lane's account-wide
//! rate bucket. New deliveries of a channel go to the lane registered last for it; a lane that is no
//! longer chosen still drains what was queued for it.
//!
//! Adding a provider is one module in `providers/` (a [`Client`]) and one `register` call in
//! [`built_in`], or, from outside the crate, in `App::with_provider`.

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;

use super::exotel::call::ExotelCall;
use super::exotel::sms::ExotelSms;
use super::exotel::Account;
use super::gupshup::Gupshup;
use super::Client;
use crate::domain::Channel;
use crate::settings::Settings;

/// One provider's client for one channel.
#[derive(Clone)]
pub struct Registered {
    /// `provider:channel`, stored on each delivery.
    pub name: String,
    /// Lanes of one account share a pause when the provider asks to slow down (Exotel's calls and
    /// SMS are one account).
    pub account: String,
    pub client: Arc<dyn Client>,
}

impl Registered {
    pub fn channel(&self) -> Channel {
        self.client.channel()
    }
}

/// Every lane, in registration order.
#[derive(Clone, Default)]
pub struct Registry {
    lanes: Vec<Registered>,
}

impl Registry {
    /// Adds the lane `account:channel`; from now on new deliveries of its channel go to it. A lane
    /// registered again under the same name replaces the earlier one.
    pub fn register(&mut self, account: &str, client: Arc<dyn Client>) -> &Registered {
        let name = format!("{account}:{}", client.channel());
        self.lanes.retain(|l| l.name != name);
        self.lanes.push(Registered {
            name,
            account: account.to_owned(),
            client,
        });
        let last = self.lanes.len() - 1;
        &self.lanes[last]
    }

    pub fn lanes(&self) -> &[Registered] {
        &self.lanes
    }

    /// The lane new deliveries of `channel` go to.
    pub fn for_channel(&self, channel: Channel) -> Option<&Registered> {
        self.lanes.iter().rev().find(|l| l.channel() == channel)
    }

    pub fn lane(&self, name: &str) -> Option<&Registered> {
        self.lanes.iter().find(|l| l.name == name)
    }

    /// Whether the lane that sent a delivery gets a report after accepting (unknown lanes: assume so,
    /// the cautious answer for the "finished" count).
    pub fn reports_outcome(&self, name: &str) -> bool {
        self.lane(name).is_none_or(|l| l.client.reports_outcome())
    }
}

/// The built-in lanes from settings: Exotel calls and SMS, GupShup WhatsApp. Calls are registered
/// first: when limits force an order, a ringing phone matters most.
pub fn built_in(settings: &Settings, webhook_token: &str) -> Registry {
    let ex = &settings.exotel;
    let account = Account {
        base_url: ex.base_url.clone(),
        account_sid: ex.account_sid.clone(),
        api_key: ex.api_key.expose_secret().to_owned(),
        api_token: ex.api_token.clone(),
    };
    let base = settings.public_base();
    let mut registry = Registry::default();
    registry.register(
        "exotel",
        Arc::new(ExotelCall {
            account: account.clone(),
            caller_id: ex.caller_id.clone(),
            flow_url: ex.flow_url.clone(),
            status_callback: format!("{base}/exotel/call-status?token={webhook_token}"),
            ring_timeout_secs: ex.ring_timeout_secs,
            request_timeout: Duration::from_secs(ex.call_timeout_secs),
        }),
    );
    registry.register(
        "exotel",
        Arc::new(ExotelSms {
            account,
            from: ex.sms_from.clone(),
            dlt_entity_id: ex.dlt_entity_id.clone(),
            sms_type: ex.sms_type.trim().to_owned(),
            priority: ex.sms_priority.trim().to_owned(),
            status_callback: format!("{base}/exotel/sms-status?token={webhook_token}"),
            request_timeout: Duration::from_secs(ex.sms_timeout_secs),
        }),
    );
    registry.register("gupshup", Arc::new(gupshup(settings)));
    registry
}

/// The GupShup client the settings describe (also used for opt-ins).
pub fn gupshup(settings: &Settings) -> Gupshup {
    let g = &settings.gupshup;
    Gupshup {
        base_url: g.base_url.clone(),
        userid: g.userid.clone(),
        password: g.password.clone(),
        msg_type: g.msg_type.clone(),
        is_template: g.template,
        request_timeout: Duration::from_secs(g.timeout_secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_lanes_keep_the_names_stored_before_lanes_existed() {
        let settings = Settings::load_with_env(None, Vec::new()).unwrap();
        let registry = built_in(&settings, "t");
        let names: Vec<&str> = registry.lanes().iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["exotel:call", "exotel:sms", "gupshup:whatsapp"]);
        assert_eq!(
            registry.for_channel(Channel::Sms).map(|l| l.name.as_str()),
            Some("exotel:sms")
        );
        assert!(registry.reports_outcome("exotel:call"));
        assert!(registry.reports_outcome("gupshup:whatsapp"));
    }
}
