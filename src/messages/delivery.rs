//! The SMS or WhatsApp text of one delivery: the template of its message kind filled with the
//! incident's facts, its recipient's links and, for an acknowledgement notice, a fallback or an
//! alarm, the news it carries in `{message}`. The settings it needs are read once, at start, into
//! [`Texts`]; the facts come as plain values, so this module knows nothing of the store's rows.

use super::{alarm, format_time, render, sms_link, KindTexts, MessageKind, Style, Vars};
use crate::domain::{Channel, Source};
use crate::settings::{RecordingLink, RecordingMode, Settings};

/// The settings every delivery's text is made from, read once at start: each kind's texts and DLT
/// template id (with the alert's filled in), the brand, the public URL, how recordings are linked.
#[derive(Debug, Clone)]
pub struct Texts {
    /// Indexed by `MessageKind as usize`, in [`MessageKind::ALL`]'s order.
    kinds: [KindTexts; MessageKind::ALL.len()],
    brand: String,
    public_base: String,
    recording_link: RecordingLink,
    proxy: bool,
    utc_offset_minutes: i32,
}

/// Where the recording of a message's incident stands, as the message's link needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// We fetch none: the recording URL, if any, is used as it is.
    NotFetched,
    /// Being fetched, or fetched and kept: our link works (or will once it is in).
    Usable,
    /// Known never to come (unavailable, deleted): no link.
    Gone,
}

/// The facts one delivery's text is made of.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub kind: MessageKind,
    /// The recipient's name.
    pub name: &'a str,
    /// The delivery's link reference; links sent before per-link references existed use
    /// `greeting_ref`.
    pub link_ref: Option<&'a str>,
    pub greeting_ref: &'a str,
    pub ack_ref: Option<&'a str>,
    pub incident: &'a str,
    pub source: Source,
    pub emergency_type: &'a str,
    pub caller: Option<&'a str>,
    /// What the incident says about itself.
    pub message: Option<&'a str>,
    pub recording_url: Option<&'a str>,
    pub recording: Fetch,
    pub occurred_at: Option<i64>,
    pub received_at: i64,
    pub acknowledged_by: Option<&'a str>,
    pub acknowledged_at: Option<i64>,
    /// The time a notice names when the acknowledgement's own time is unknown.
    pub now_ms: i64,
}

impl Texts {
    pub fn from_settings(settings: &Settings) -> Self {
        let m = &settings.messages;
        Texts {
            kinds: MessageKind::ALL.map(|kind| settings.message_kind(kind)),
            brand: m.brand.trim().to_owned(),
            public_base: settings.public_base().to_owned(),
            recording_link: m.recording_link,
            proxy: settings.recording_mode() == RecordingMode::Proxy,
            utc_offset_minutes: m.utc_offset_minutes,
        }
    }

    /// Whether we fetch recordings and link our own copy (`recordings.mode` proxy).
    pub fn proxies_recordings(&self) -> bool {
        self.proxy
    }

    /// The text for `channel` and the DLT template id it is registered under (SMS only; empty
    /// otherwise). A call has no text here: its greeting is spoken from the webhook.
    pub fn compose(&self, channel: Channel, facts: &Facts<'_>) -> (String, String) {
        let kind = &self.kinds[facts.kind as usize];
        let (template, style, dlt_template_id) = match channel {
            Channel::Call => return (String::new(), String::new()),
            Channel::Sms => (&kind.sms, Style::Dlt, kind.dlt_template_id.clone()),
            Channel::Whatsapp => (&kind.whatsapp, Style::Exact, String::new()),
        };
        let base = self.public_base.as_str();
        let reference = facts.link_ref.unwrap_or(facts.greeting_ref);
        let short = format!("{base}/r/{reference}");
        let link = self.recording_link(channel, facts, short);
        let ack_link = facts.ack_ref.map(|r| format!("{base}/a/{r}"));
        let news = self.news(channel, facts);
        let vars = Vars {
            emergency_type: facts.emergency_type,
            source: facts.source.as_str(),
            caller: facts.caller,
            name: facts.name,
            time_ms: facts.occurred_at.unwrap_or(facts.received_at),
            recording: link.as_deref(),
            message: news.as_deref().or(facts.message),
            incident: facts.incident,
            reference,
            brand: &self.brand,
            public_url: base,
            ack: ack_link.as_deref(),
            ack_ref: facts.ack_ref,
            by: facts.acknowledged_by,
            ack_time_ms: facts.acknowledged_at,
        };
        let text = render(template, &vars, self.utc_offset_minutes, style);
        (text, dlt_template_id)
    }

    /// The recording link, `short` being our own (`<public_url>/r/<ref>`).
    fn recording_link(&self, channel: Channel, facts: &Facts<'_>, short: String) -> Option<String> {
        let url = facts.recording_url?;
        match facts.recording {
            // Proxy mode: our own link, which a phone can open (Exotel's needs the account's
            // credentials); none once the recording is known never to come.
            Fetch::Usable => Some(short),
            Fetch::Gone => None,
            // Proxy mode, a recording we may not fetch: still our link (it redirects), never
            // Exotel's URL in a message.
            Fetch::NotFetched if self.proxy => Some(short),
            Fetch::NotFetched => Some(match (self.recording_link, channel) {
                (RecordingLink::Short, _) => short,
                // A URL too long for a DLT link variable would be refused: the short link leads to
                // the same recording.
                (RecordingLink::Direct, Channel::Sms) => sms_link(url, &short),
                (RecordingLink::Direct, _) => url.to_owned(),
            }),
        }
    }

    /// The news a notice, an alarm or a fallback tells in `{message}` in place of the incident's
    /// own message; `None` for an alert, which carries the incident's.
    fn news(&self, channel: Channel, facts: &Facts<'_>) -> Option<String> {
        match facts.kind {
            MessageKind::AckNotice => Some(self.acknowledged(channel, facts)),
            MessageKind::UnreachedAlarm => Some(alarm::news(
                &alarm::AlarmFacts {
                    source: facts.source,
                    emergency_type: facts.emergency_type,
                    received_at: facts.received_at,
                    message: facts.message,
                },
                channel == Channel::Sms,
                self.utc_offset_minutes,
            )),
            MessageKind::Fallback => Some(not_reached(channel, facts.message)),
            MessageKind::Alert | MessageKind::ApiAlert | MessageKind::Drill => None,
        }
    }

    /// An acknowledgement notice's news, for a notice without a text of its own (it uses the
    /// alert's). In SMS a DLT variable holds 30 characters, so there it is the short form.
    fn acknowledged(&self, channel: Channel, facts: &Facts<'_>) -> String {
        let by = facts.acknowledged_by.unwrap_or("someone");
        match channel {
            Channel::Sms => format!("Acknowledged by {by}"),
            _ => format!(
                "{by} acknowledged the {} emergency at {}",
                facts.emergency_type,
                format_time(
                    facts.acknowledged_at.unwrap_or(facts.now_ms),
                    self.utc_offset_minutes
                )
            ),
        }
    }
}

/// A fallback message's news: the call did not get through. In SMS a DLT variable holds 30
/// characters, so there it is the short form.
fn not_reached(channel: Channel, said: Option<&str>) -> String {
    match channel {
        Channel::Sms => "Could not reach you by phone".to_owned(),
        _ => match said {
            Some(said) => format!("We could not reach you by phone: {said}"),
            None => "We could not reach you by phone.".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_indexes_its_own_texts() {
        for (i, kind) in MessageKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i, "{kind:?}");
        }
    }
}
