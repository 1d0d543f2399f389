//! The kinds of message the system sends. They are named here, below the settings that configure them
//! and the renderer that fills them, so neither has to import the other.

use super::{Purpose, Source};

/// Every text the system sends is one of these kinds. Each kind has its own SMS text, DLT template id
/// and WhatsApp template (settings `messages.kinds.<key>`; the alert's come from `messages.sms`,
/// `messages.whatsapp`, `messages.whatsapp_template` and `exotel.dlt_template_id`), so each can be
/// registered on its own. A kind left unset uses the alert's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// An emergency reported through the Exotel Passthru (a recorded voicemail).
    Alert,
    /// An emergency raised through the API, Alertmanager or the command line.
    ApiAlert,
    /// Tells the others that someone acknowledged the incident.
    AckNotice,
    /// Sent on another channel when a contact's first channel failed.
    Fallback,
    /// Raised when nobody acknowledged an incident in time.
    UnreachedAlarm,
    /// A fire drill's test message.
    Drill,
}

impl MessageKind {
    pub const ALL: [MessageKind; 6] = [
        MessageKind::Alert,
        MessageKind::ApiAlert,
        MessageKind::AckNotice,
        MessageKind::Fallback,
        MessageKind::UnreachedAlarm,
        MessageKind::Drill,
    ];

    /// The kind's name under `messages.kinds`.
    pub fn key(self) -> &'static str {
        match self {
            MessageKind::Alert => "alert",
            MessageKind::ApiAlert => "api_alert",
            MessageKind::AckNotice => "ack_notice",
            MessageKind::Fallback => "fallback",
            MessageKind::UnreachedAlarm => "unreached_alarm",
            MessageKind::Drill => "drill",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.key() == key)
    }

    /// The alert kind for an incident's source: a Passthru voicemail (`exotel`) is an [`Alert`],
    /// a drill a [`Drill`], anything else (`api`, `alertmanager`, `cli`) an [`ApiAlert`].
    ///
    /// [`Alert`]: MessageKind::Alert
    /// [`Drill`]: MessageKind::Drill
    /// [`ApiAlert`]: MessageKind::ApiAlert
    pub fn for_source(source: Source) -> Self {
        match source {
            Source::Exotel => MessageKind::Alert,
            Source::Drill => MessageKind::Drill,
            Source::Api | Source::Alertmanager | Source::Cli | Source::Alarm => {
                MessageKind::ApiAlert
            }
        }
    }

    /// The kind a delivery of `purpose` (`alert`, `ack_notice`, `fallback`, `alarm`) of an incident of
    /// `source` is sent as: what picks its text and its DLT template.
    pub fn for_delivery(purpose: Purpose, source: Source) -> Self {
        match purpose {
            Purpose::AckNotice => MessageKind::AckNotice,
            Purpose::Alarm => MessageKind::UnreachedAlarm,
            Purpose::Fallback => MessageKind::Fallback,
            Purpose::Alert | Purpose::Followup => Self::for_source(source),
        }
    }
}

/// One kind's texts and registered template ids, with the alert's filled in where the kind has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindTexts {
    pub sms: String,
    /// Sent as `DltTemplateId`; empty leaves the field out.
    pub dlt_template_id: String,
    pub whatsapp: String,
    /// The name the WhatsApp text is registered under with GupShup.
    pub whatsapp_template: String,
}
