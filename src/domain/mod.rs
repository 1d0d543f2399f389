//! Parsed domain values: raw strings become these at the edge, nothing deeper sees a raw query string.

pub mod call_sid;
pub mod clock;
pub mod message_kind;
pub mod phone;
pub mod purpose;
pub mod report;
pub mod state;

pub use call_sid::CallSid;
pub use clock::Clock;
pub use phone::{mask, mask_numbers, Phone};
pub use purpose::Purpose;
pub use report::{AccountProblem, Report, ReportOutcome};
pub use state::{DeliveryState, IncidentState, RedialPolicy};

use std::fmt;

/// The channel a delivery goes out on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Call,
    Sms,
    Whatsapp,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Call, Channel::Sms, Channel::Whatsapp];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Call => "call",
            Channel::Sms => "sms",
            Channel::Whatsapp => "whatsapp",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "call" | "voice" => Some(Channel::Call),
            "sms" => Some(Channel::Sms),
            "whatsapp" => Some(Channel::Whatsapp),
            _ => None,
        }
    }

    /// Claim order when provider limits force one: a ringing phone first, then SMS, then WhatsApp.
    pub fn priority(self) -> i64 {
        match self {
            Channel::Call => 0,
            Channel::Sms => 1,
            Channel::Whatsapp => 2,
        }
    }
}

impl PartialEq<&str> for Channel {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// For rows decoded from the database.
impl TryFrom<String> for Channel {
    type Error = state::UnknownState;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Channel::parse(&s).ok_or(state::UnknownState(s))
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an incident came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Exotel,
    Api,
    Alertmanager,
    Cli,
    /// A fire drill (`exotel-sos drill`): a marked test that reaches one contact.
    Drill,
    /// The incident that carries an account alarm to the `[unreached]` teams.
    Alarm,
}

impl Source {
    pub const ALL: [Source; 6] = [
        Source::Exotel,
        Source::Api,
        Source::Alertmanager,
        Source::Cli,
        Source::Drill,
        Source::Alarm,
    ];

    /// The name stored in the database and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Exotel => "exotel",
            Source::Api => "api",
            Source::Alertmanager => "alertmanager",
            Source::Cli => "cli",
            Source::Drill => "drill",
            Source::Alarm => "alarm",
        }
    }
}

state::named_states!(Source);

/// Header by which the `trigger` command marks its incidents as coming from the command line.
pub const SOURCE_HEADER: &str = "x-sos-source";

/// Keeps at most `max` characters of `s`, on a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Now, in milliseconds since the Unix epoch: the one time representation stored in both engines.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A random URL-safe token of `bytes` random bytes, hex encoded.
pub fn random_token(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stable SHA-256 hex digest: fixed-length keys from arbitrarily long identities.
pub fn digest(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `s` without control characters (NUL, escape, DEL, C1), except those in `keep`. Borrowed when there
/// is nothing to remove, which is almost always.
pub fn without_controls<'a>(s: &'a str, keep: &[char]) -> std::borrow::Cow<'a, str> {
    let bad = |c: char| c.is_control() && !keep.contains(&c);
    if s.chars().any(bad) {
        std::borrow::Cow::Owned(s.chars().filter(|c| !bad(*c)).collect())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Text as it may be stored: NUL and other control characters removed (PostgreSQL refuses `\0` in
/// text, and a provider's error page can carry anything). Newlines and tabs stay.
pub fn storable(s: &str) -> std::borrow::Cow<'_, str> {
    without_controls(s, &['\n', '\t'])
}

/// A duration for people: `45s`, `3m 12s`, `2h 5m`.
pub fn human_duration_ms(ms: i64) -> String {
    let secs = ms.max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {}s", secs / 60, secs % 60),
        _ => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
    }
}

/// Exotel's timestamps: `2024-07-31 16:42:56` and `Wed, 31 Jul 2024 16:42:56`, both local time without
/// a zone; read in the configured offset.
pub fn exotel_time(raw: &str, utc_offset_minutes: i32) -> Option<i64> {
    let naive = chrono::NaiveDateTime::parse_from_str(raw.trim(), "%Y-%m-%d %H:%M:%S")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(raw.trim(), "%a, %d %b %Y %H:%M:%S"))
        .ok()?;
    // The epoch placeholder Exotel sends for EndTime (1970-01-01 05:30:00) means "unknown".
    if naive.and_utc().timestamp() < 86_400 {
        return None;
    }
    let offset = chrono::FixedOffset::east_opt(utc_offset_minutes * 60)?;
    naive
        .and_local_timezone(offset)
        .single()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_store_and_serialise_under_the_same_names() {
        for s in Source::ALL {
            assert_eq!(s.as_str().parse::<Source>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("webhook".parse::<Source>().is_err());
    }

    #[test]
    fn storable_text_has_no_nul_or_control_characters() {
        assert_eq!(storable("bad\0num\u{1b}ber\r"), "badnumber");
        assert_eq!(storable("line one\nline\ttwo"), "line one\nline\ttwo");
        assert!(matches!(storable("clean"), std::borrow::Cow::Borrowed(_)));
    }
}
