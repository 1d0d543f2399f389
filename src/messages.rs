//! Message text from the operator's templates: SMS, WhatsApp and the spoken greeting.

use crate::settings::MessageSettings;

/// The values a template may name as `{type}`, `{source}`, `{caller}`, `{time}`, `{recording}`,
/// `{message}` and `{incident}`.
#[derive(Debug, Clone, Default)]
pub struct Vars<'a> {
    pub emergency_type: &'a str,
    pub source: &'a str,
    pub caller: Option<&'a str>,
    pub time_ms: i64,
    pub recording: Option<&'a str>,
    pub message: Option<&'a str>,
    pub incident: &'a str,
}

/// Fills the placeholders; an absent value becomes empty and the spaces around it collapse, so a
/// template reads well with or without a recording or message. Unknown placeholders stay as written.
pub fn render(template: &str, vars: &Vars<'_>, utc_offset_minutes: i32) -> String {
    let time = format_time(vars.time_ms, utc_offset_minutes);
    let caller = vars.caller.unwrap_or(vars.source);
    let mut out = template.to_owned();
    for (key, value) in [
        ("{type}", vars.emergency_type),
        ("{source}", vars.source),
        ("{caller}", caller),
        ("{time}", time.as_str()),
        ("{recording}", vars.recording.unwrap_or("")),
        ("{message}", vars.message.unwrap_or("")),
        ("{incident}", vars.incident),
    ] {
        out = out.replace(key, value);
    }
    collapse_spaces(&out)
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

fn collapse_spaces(s: &str) -> String {
    let lines: Vec<String> = s
        .lines()
        .map(|line| {
            line.split(' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    lines.join("\n").trim().to_owned()
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
        )),
    }
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

    #[test]
    fn renders_and_collapses_missing_values() {
        let vars = Vars {
            emergency_type: "Heart",
            source: "exotel",
            caller: Some("+919800000001"),
            time_ms: 1_722_424_376_000,
            recording: None,
            message: None,
            incident: "abc",
        };
        let s = render(
            "SOS {type} from {caller} at {time}. {message} {recording}",
            &vars,
            330,
        );
        assert_eq!(s, "SOS Heart from +919800000001 at 2024-07-31 16:42.");
        assert_eq!(render("{nope} {type}", &vars, 0), "{nope} Heart");
    }
}
