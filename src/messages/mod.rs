//! Message text from the operator's templates: SMS, WhatsApp and the spoken greeting; the kinds of
//! message the system sends; and the rules India's DLT scrubbing puts on SMS templates.
//!
//! `delivery` composes the text of each SMS and WhatsApp message the dispatcher sends, `alarm` the
//! news an alarm tells, `dlt` checks templates against DLT's rules and `gsm` counts SMS segments.

pub mod alarm;
pub mod delivery;
pub mod dlt;
pub mod gsm;

use crate::settings::MessageSettings;

pub use crate::domain::message_kind::{KindTexts, MessageKind};

/// The word an empty placeholder renders as in SMS and WhatsApp text. DLT refuses a message whose
/// variable is empty on some portals, and an empty value would leave two spaces where the registered
/// template has one or none: so a fixed, short, readable word stands in ("not available").
pub const EMPTY_VALUE: &str = "NA";

/// The most characters one DLT variable holds, and the most for a link.
pub const DLT_VAR_MAX: usize = 30;
pub const DLT_URL_MAX: usize = 50;

/// The placeholders a template may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    Type,
    Source,
    Caller,
    /// The recipient's name from the stakeholder file.
    Name,
    Time,
    Recording,
    Message,
    Incident,
    /// The delivery's short reference alone, so a template can write the link's fixed part
    /// (`https://sos.example.org/r/`) as static text.
    Ref,
    /// `messages.brand`: configuration, static text to DLT.
    Brand,
    /// `server.public_url` without a trailing slash: static text to DLT.
    PublicUrl,
    /// This recipient's acknowledge link, `<public_url>/a/<ack_ref>`.
    Ack,
    /// The acknowledge link's reference alone, so a template can write the fixed part as static text.
    AckRef,
    /// Who acknowledged (an acknowledgement notice).
    By,
    /// When it was acknowledged (an acknowledgement notice).
    AckTime,
}

/// What kind of value a placeholder holds, for DLT's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Free text: cut to [`DLT_VAR_MAX`] characters.
    Text,
    /// A link: never cut (a cut link leads nowhere); at most [`DLT_URL_MAX`] to pass.
    Url,
    /// An identifier: never cut (a cut one names nothing); at most [`DLT_VAR_MAX`] to pass.
    Id,
    /// Settings, the same in every message: part of the registered static text.
    Static,
}

impl Placeholder {
    pub const ALL: [Placeholder; 15] = [
        Placeholder::Type,
        Placeholder::Source,
        Placeholder::Caller,
        Placeholder::Name,
        Placeholder::Time,
        Placeholder::Recording,
        Placeholder::Message,
        Placeholder::Incident,
        Placeholder::Ref,
        Placeholder::Brand,
        Placeholder::PublicUrl,
        Placeholder::AckRef,
        Placeholder::AckTime,
        Placeholder::Ack,
        Placeholder::By,
    ];

    /// As written in a template, braces included.
    pub fn token(self) -> &'static str {
        match self {
            Placeholder::Type => "{type}",
            Placeholder::Source => "{source}",
            Placeholder::Caller => "{caller}",
            Placeholder::Name => "{name}",
            Placeholder::Time => "{time}",
            Placeholder::Recording => "{recording}",
            Placeholder::Message => "{message}",
            Placeholder::Incident => "{incident}",
            Placeholder::Ref => "{ref}",
            Placeholder::Brand => "{brand}",
            Placeholder::PublicUrl => "{public_url}",
            Placeholder::Ack => "{ack}",
            Placeholder::AckRef => "{ack_ref}",
            Placeholder::By => "{by}",
            Placeholder::AckTime => "{ack_time}",
        }
    }

    pub fn value_kind(self) -> ValueKind {
        match self {
            Placeholder::Recording | Placeholder::Ack => ValueKind::Url,
            Placeholder::Incident | Placeholder::Ref | Placeholder::AckRef => ValueKind::Id,
            Placeholder::Brand | Placeholder::PublicUrl => ValueKind::Static,
            _ => ValueKind::Text,
        }
    }
}

/// A template split into static text and placeholders. Text in braces that names no placeholder
/// (`{nope}`) is static text, sent as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part<'a> {
    Static(&'a str),
    Var(Placeholder),
}

/// Splits a template at its placeholders, in one pass: a value is never read as a template.
pub fn parts(template: &str) -> Vec<Part<'_>> {
    let mut out = Vec::new();
    let mut rest = template;
    let mut static_start = 0;
    let mut pos = 0;
    while let Some(i) = rest.find('{') {
        let at = pos + i;
        let tail = &template[at..];
        match Placeholder::ALL
            .iter()
            .find(|p| tail.starts_with(p.token()))
        {
            Some(p) => {
                if static_start < at {
                    out.push(Part::Static(&template[static_start..at]));
                }
                out.push(Part::Var(*p));
                pos = at + p.token().len();
                static_start = pos;
            }
            None => pos = at + 1,
        }
        rest = &template[pos..];
    }
    if static_start < template.len() {
        out.push(Part::Static(&template[static_start..]));
    }
    out
}

/// The values a template may name; see [`Placeholder`].
#[derive(Debug, Clone, Default)]
pub struct Vars<'a> {
    pub emergency_type: &'a str,
    pub source: &'a str,
    pub caller: Option<&'a str>,
    /// The recipient's name.
    pub name: &'a str,
    pub time_ms: i64,
    pub recording: Option<&'a str>,
    pub message: Option<&'a str>,
    pub incident: &'a str,
    pub reference: &'a str,
    pub brand: &'a str,
    pub public_url: &'a str,
    /// This recipient's acknowledge link and its reference.
    pub ack: Option<&'a str>,
    pub ack_ref: Option<&'a str>,
    /// Who acknowledged, and when (acknowledgement notices).
    pub by: Option<&'a str>,
    pub ack_time_ms: Option<i64>,
}

/// How a template is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// For speech: an absent value is empty (the text to speech collapses the spaces).
    Spoken,
    /// For WhatsApp: byte-exact around the values; an absent value is [`EMPTY_VALUE`].
    Exact,
    /// For SMS under DLT: as `Exact`, and each text value cut to [`DLT_VAR_MAX`] characters.
    Dlt,
}

/// Fills the placeholders. The template's own text is kept byte for byte: DLT matches the static
/// text exactly, so nothing is trimmed or collapsed.
pub fn render(template: &str, vars: &Vars<'_>, utc_offset_minutes: i32, style: Style) -> String {
    let time = format_time(vars.time_ms, utc_offset_minutes);
    let ack_time = vars
        .ack_time_ms
        .map(|ms| format_time(ms, utc_offset_minutes))
        .unwrap_or_default();
    let mut out = String::with_capacity(template.len() + 64);
    for part in parts(template) {
        match part {
            Part::Static(s) => out.push_str(s),
            Part::Var(p) => {
                let value = match p {
                    Placeholder::Type => vars.emergency_type,
                    Placeholder::Source => vars.source,
                    Placeholder::Caller => vars.caller.unwrap_or(vars.source),
                    Placeholder::Name => vars.name,
                    Placeholder::Time => time.as_str(),
                    Placeholder::Recording => vars.recording.unwrap_or(""),
                    Placeholder::Message => vars.message.unwrap_or(""),
                    Placeholder::Incident => vars.incident,
                    Placeholder::Ref => vars.reference,
                    Placeholder::Brand => vars.brand,
                    Placeholder::PublicUrl => vars.public_url,
                    Placeholder::Ack => vars.ack.unwrap_or(""),
                    Placeholder::AckRef => vars.ack_ref.unwrap_or(""),
                    Placeholder::By => vars.by.unwrap_or(""),
                    Placeholder::AckTime => ack_time.as_str(),
                };
                let blank = value.trim().is_empty();
                match style {
                    Style::Spoken => out.push_str(value),
                    _ if blank && p.value_kind() != ValueKind::Static => out.push_str(EMPTY_VALUE),
                    Style::Dlt if p.value_kind() == ValueKind::Text => {
                        out.push_str(&cut(value, DLT_VAR_MAX))
                    }
                    _ => out.push_str(value),
                }
            }
        }
    }
    out
}

/// The marker a cut value ends with.
pub const CUT_MARK: &str = "..";

/// `value` in at most `max` characters: whole when it fits, else cut after the last whole word that
/// leaves room for [`CUT_MARK`] (or mid-word when the first word alone is too long), never inside a
/// character. Surrounding whitespace is dropped first, and line breaks become spaces.
pub fn cut(value: &str, max: usize) -> String {
    let value: String = value
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if value.chars().count() <= max {
        return value;
    }
    let room = max.saturating_sub(CUT_MARK.len());
    let head: String = value.chars().take(room).collect();
    // Cut at a word boundary when one lies in the second half of the room, so the last word shown
    // is whole; a single long word is cut where the room ends.
    let next_is_space = value.chars().nth(room).is_some_and(char::is_whitespace);
    let kept = if next_is_space {
        head.as_str()
    } else {
        match head.rfind(char::is_whitespace) {
            Some(i) if head[..i].chars().count() >= room / 2 => &head[..i],
            _ => head.as_str(),
        }
    };
    let kept = kept.trim_end_matches(|c: char| c.is_whitespace() || ",;:-".contains(c));
    format!("{kept}{CUT_MARK}")
}

/// The recording link for an SMS: the direct URL while it fits a DLT link variable, else the short
/// link under `public_url`, which leads to the same recording (a cut URL would lead nowhere).
pub fn sms_link(direct: &str, short: &str) -> String {
    if direct.chars().count() <= DLT_URL_MAX {
        direct.to_owned()
    } else {
        short.to_owned()
    }
}

/// A new delivery reference (the call's `CustomField`): 128 random bits as 26 lower-case base-32
/// characters, free of characters a phone might change.
pub fn new_reference() -> String {
    random_chars(b"abcdefghijklmnopqrstuvwxyz234567", 5)
}

/// A new recording link reference (`/r/<ref>`): 128 random bits as 22 base64url characters, so a whole
/// link fits one DLT link variable. Its own value, never the call's `CustomField`, which Exotel sees.
pub fn new_link_ref() -> String {
    random_chars(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        6,
    )
}

/// 128 random bits written `bits` at a time in `alphabet` (of `2^bits` characters), the last partial
/// group padded with zero bits.
fn random_chars(alphabet: &[u8], bits_per_char: u32) -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mask = (1u32 << bits_per_char) - 1;
    let mut out = String::with_capacity(26);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= bits_per_char {
            bits -= bits_per_char;
            out.push(char::from(alphabet[((acc >> bits) & mask) as usize]));
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(
            alphabet[((acc << (bits_per_char - bits)) & mask) as usize],
        ));
    }
    out
}

/// `2024-07-31 16:42` in the configured zone: short enough for an SMS, unambiguous for a doctor.
pub fn format_time(ms: i64, utc_offset_minutes: i32) -> String {
    let offset = chrono::FixedOffset::east_opt(utc_offset_minutes * 60)
        .unwrap_or_else(|| chrono::FixedOffset::east_opt(0).expect("zero offset is valid"));
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t
            .with_timezone(&offset)
            .format("%Y-%m-%d %H:%M")
            .to_string(),
        None => String::new(),
    }
}

/// The greeting body for an incident: its recording, `repeat` times, one URL per line (Exotel plays
/// each line in turn), or the spoken text when there is no recording.
pub fn greeting_body(
    settings: &MessageSettings,
    recording: Option<&str>,
    vars: &Vars<'_>,
) -> String {
    match recording {
        Some(url) => {
            let n = settings.greeting_repeat.max(1) as usize;
            vec![url; n].join("\n")
        }
        None => speakable(&render(
            &settings.greeting_text,
            vars,
            settings.utc_offset_minutes,
            Style::Spoken,
        )),
    }
}

/// The spoken alert (`greeting_text`), followed by `then` when given: what a call says while the
/// recording is not in yet, or when it never came.
pub fn greeting_spoken(settings: &MessageSettings, vars: &Vars<'_>, then: Option<&str>) -> String {
    let text = render(
        &settings.greeting_text,
        vars,
        settings.utc_offset_minutes,
        Style::Spoken,
    );
    match then {
        Some(more) => speakable(&format!("{text} {more}")),
        None => speakable(&text),
    }
}

/// A spoken template of the operator's, filled in: one line for the text to speech.
pub fn greeting_template(settings: &MessageSettings, template: &str, vars: &Vars<'_>) -> String {
    speakable(&render(
        template,
        vars,
        settings.utc_offset_minutes,
        Style::Spoken,
    ))
}

/// Text for the TTS: one line, and never starting like a URL, which Exotel would try to fetch.
pub fn speakable(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.starts_with("http://") || one_line.starts_with("https://") {
        format!("Alert. {one_line}")
    } else {
        one_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Source;

    fn vars() -> Vars<'static> {
        Vars {
            emergency_type: "Heart",
            source: "exotel",
            caller: Some("+919800000001"),
            name: "Dr. Asha Rao",
            time_ms: 1_722_424_376_000,
            recording: None,
            message: None,
            incident: "abc",
            reference: "q3kx2m",
            brand: "City Hospital",
            public_url: "https://sos.example.org",
            ack: Some("https://sos.example.org/a/Zk3"),
            ack_ref: Some("Zk3"),
            by: Some("Dr. Vikram Iyer"),
            ack_time_ms: Some(1_722_424_496_000),
        }
    }

    #[test]
    fn acknowledgement_placeholders_render() {
        let s = render(
            "{by} acknowledged at {ack_time}. Yours: {ack} ({ack_ref})",
            &vars(),
            330,
            Style::Dlt,
        );
        assert_eq!(
            s,
            "Dr. Vikram Iyer acknowledged at 2024-07-31 16:44. Yours: \
             https://sos.example.org/a/Zk3 (Zk3)"
        );
        let none = Vars {
            ack: None,
            by: None,
            ack_time_ms: None,
            ..vars()
        };
        assert_eq!(render("{ack}|{by}", &none, 0, Style::Exact), "NA|NA");
    }

    #[test]
    fn renders_byte_exactly_with_a_word_for_missing_values() {
        let v = vars();
        let s = render(
            "SOS {type} from {caller} at {time}.  {message} {recording}\n",
            &v,
            330,
            Style::Dlt,
        );
        assert_eq!(
            s,
            "SOS Heart from +919800000001 at 2024-07-31 16:42.  NA NA\n"
        );
        assert_eq!(render("{nope} {type}", &v, 0, Style::Exact), "{nope} Heart");
        assert_eq!(
            render(" {brand}: listen {public_url}/r/{ref} ", &v, 0, Style::Dlt),
            " City Hospital: listen https://sos.example.org/r/q3kx2m "
        );
        // Spoken text leaves absent values empty; the text to speech collapses the spaces.
        assert_eq!(render("{type} {message}.", &v, 0, Style::Spoken), "Heart .");
    }

    #[test]
    fn a_value_is_never_read_as_a_template() {
        let v = Vars {
            message: Some("{recording} {type}"),
            ..vars()
        };
        assert_eq!(
            render("{message}|{type}", &v, 0, Style::Exact),
            "{recording} {type}|Heart"
        );
        assert_eq!(
            parts("a{type}{{b}"),
            vec![
                Part::Static("a"),
                Part::Var(Placeholder::Type),
                Part::Static("{{b}")
            ]
        );
    }

    #[test]
    fn dlt_style_cuts_text_values_but_never_links_or_ids() {
        let long_url = "https://recordings.exotel.com/exotelrecordings/acme/2024/07/31/abc.mp3";
        let v = Vars {
            message: Some("Patient collapsed in ward seven near the lifts, needs help"),
            recording: Some(long_url),
            incident: "0b1c9a4e-7f6d-4b8e-9a1e-2f3c4d5e6f70",
            ..vars()
        };
        let s = render("{message}|{recording}|{incident}", &v, 0, Style::Dlt);
        assert_eq!(
            s,
            format!("Patient collapsed in ward..|{long_url}|0b1c9a4e-7f6d-4b8e-9a1e-2f3c4d5e6f70")
        );
        let exact = render("{message}", &v, 0, Style::Exact);
        assert_eq!(exact, v.message.unwrap());
    }

    #[test]
    fn cut_keeps_whole_words_and_whole_characters() {
        assert_eq!(cut("short", 30), "short");
        assert_eq!(cut("  padded  ", 30), "padded");
        assert_eq!(cut(&"x".repeat(30), 30), "x".repeat(30));
        assert_eq!(
            cut("Patient collapsed in ward seven near the lifts", 30),
            "Patient collapsed in ward.."
        );
        // The word ends exactly where the room does: kept whole.
        assert_eq!(
            cut("abcdefghijklmnopqrstuvwxyz12 and more", 30),
            "abcdefghijklmnopqrstuvwxyz12.."
        );
        // One long word is cut where the room ends.
        assert_eq!(cut(&"y".repeat(40), 30), format!("{}..", "y".repeat(28)));
        // Devanagari and emoji are cut between characters, never inside one.
        let hindi = "डॉक्टर आशा राव कार्डियोलॉजी विभाग आपातकालीन कक्ष";
        let c = cut(hindi, 30);
        assert!(c.chars().count() <= 30, "{c}");
        assert!(c.ends_with(".."), "{c}");
        assert!(hindi.starts_with(c.trim_end_matches('.')), "{c}");
        let emoji = "🚑".repeat(40);
        assert_eq!(cut(&emoji, 30), format!("{}..", "🚑".repeat(28)));
        // Trailing punctuation before the mark goes; line breaks become spaces.
        assert_eq!(
            cut("db1 is down, replica lag, disk full", 16),
            "db1 is down.."
        );
        assert_eq!(cut("a\nb", 30), "a b");
    }

    #[test]
    fn long_recording_urls_give_way_to_the_short_link() {
        assert_eq!(
            sms_link("https://x.org/a.mp3", "https://s/r/1"),
            "https://x.org/a.mp3"
        );
        let long = format!("https://recordings.exotel.com/{}", "a".repeat(30));
        assert_eq!(sms_link(&long, "https://s/r/1"), "https://s/r/1");
    }

    #[test]
    fn references_are_26_base32_characters_and_differ() {
        let a = new_reference();
        let b = new_reference();
        assert_eq!(a.len(), 26);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c)),
            "{a}"
        );
        assert_ne!(a, b);
    }

    #[test]
    fn link_references_are_22_base64url_characters_and_differ() {
        let refs: Vec<String> = (0..200).map(|_| new_link_ref()).collect();
        for r in &refs {
            assert_eq!(r.len(), 22, "{r}");
            assert!(
                r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{r}"
            );
        }
        let distinct: std::collections::HashSet<_> = refs.iter().collect();
        assert_eq!(distinct.len(), refs.len());
    }

    #[test]
    fn kinds_have_keys_and_follow_the_source() {
        for k in MessageKind::ALL {
            assert_eq!(MessageKind::from_key(k.key()), Some(k));
        }
        assert_eq!(MessageKind::for_source(Source::Exotel), MessageKind::Alert);
        for s in [Source::Api, Source::Alertmanager, Source::Cli] {
            assert_eq!(MessageKind::for_source(s), MessageKind::ApiAlert);
        }
    }
}
