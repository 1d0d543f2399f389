//! India's DLT rules for SMS templates, as `check-config` applies them: each kind's SMS text as it must
//! be registered (`{#var#}` for each variable), its brand, variables, length in SMS segments and
//! encoding, and the link to whitelist. Operators scrub every SMS against its registered template, so
//! a problem here fails every message of that kind: with SMS live these are errors.

use super::gsm::{self, Encoding};
use super::{parts, MessageKind, Part, Placeholder, ValueKind, DLT_URL_MAX, DLT_VAR_MAX};
use crate::domain::Channel;
use crate::settings::{RecordingLink, Settings};

/// DLT's marker for one variable.
pub const VAR: &str = "{#var#}";

/// The length of a delivery reference ([`super::new_reference`]).
pub const REF_CHARS: usize = 22;
/// The length of an incident id (a UUID).
const INCIDENT_CHARS: usize = 36;
/// `2024-07-31 16:42`.
const TIME_CHARS: usize = 16;
/// Exotel's limit on one SMS body.
const MAX_BODY_CHARS: usize = 2000;
/// Beyond this many segments a message is worth a warning: slower, dearer, and more to read.
const MANY_SEGMENTS: usize = 3;

/// The outcome of checking every kind's SMS template.
#[derive(Debug, Default)]
pub struct Report {
    /// What to register and whitelist, kind by kind, for printing.
    pub text: String,
    /// Problems that make operators refuse the messages (errors while SMS is live).
    pub refusals: Vec<String>,
    /// Worth fixing, but messages still go through.
    pub warnings: Vec<String>,
    /// Whether SMS is live: then the refusals are errors.
    pub sms_live: bool,
}

impl Report {
    /// The refusals when SMS is live: `check-config` then exits non-zero.
    pub fn errors(&self) -> &[String] {
        if self.sms_live {
            &self.refusals
        } else {
            &[]
        }
    }

    /// The warnings, with the refusals among them while SMS runs dry-run.
    pub fn all_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.sms_live {
            out.extend(self.refusals.iter().cloned());
        }
        out.extend(self.warnings.iter().cloned());
        out
    }
}

/// The registered form of a template: static text as it is sent (with `{brand}` and `{public_url}`
/// filled in), `{#var#}` for each variable.
pub fn registered_text(template: &str, brand: &str, public_url: &str) -> String {
    parts(template)
        .into_iter()
        .map(|p| match p {
            Part::Static(s) => s.to_owned(),
            Part::Var(Placeholder::Brand) => brand.to_owned(),
            Part::Var(Placeholder::PublicUrl) => public_url.to_owned(),
            Part::Var(_) => VAR.to_owned(),
        })
        .collect()
}

/// The most characters a placeholder's value can hold in an SMS.
fn longest_value(p: Placeholder, settings: &Settings) -> usize {
    match p.value_kind() {
        ValueKind::Text if matches!(p, Placeholder::Time | Placeholder::AckTime) => TIME_CHARS,
        ValueKind::Url if p == Placeholder::Ack => {
            settings.public_base().chars().count() + "/a/".len() + REF_CHARS
        }
        ValueKind::Text => DLT_VAR_MAX,
        ValueKind::Url => match settings.messages.recording_link {
            RecordingLink::Short => short_link_chars(settings),
            // Direct URLs longer than a link variable give way to the short link.
            RecordingLink::Direct => DLT_URL_MAX.max(short_link_chars(settings)),
        },
        ValueKind::Id if p == Placeholder::Incident => INCIDENT_CHARS,
        ValueKind::Id => REF_CHARS,
        ValueKind::Static => 0,
    }
}

/// `<public_url>/r/<ref>`.
fn short_link_chars(settings: &Settings) -> usize {
    settings.public_base().chars().count() + "/r/".len() + REF_CHARS
}

/// Checks every kind's SMS template. A kind that uses the alert's text and id is listed as such.
pub fn check(settings: &Settings) -> Report {
    let sms_live = settings.channel_live(Channel::Sms);
    let brand = settings.messages.brand.trim();
    let base = settings.public_base();
    let mut report = Report {
        sms_live,
        ..Report::default()
    };
    report.text.push_str(&format!(
        "SMS templates to register on the DLT portal ({}):\n",
        if sms_live {
            "SMS is live: problems are errors"
        } else {
            "SMS runs dry-run: problems are warnings"
        }
    ));
    if brand.is_empty() {
        report.refusals.push(
            "messages.brand is empty: DLT requires the sender's brand name in every SMS; set it and \
             write {brand} (or the name itself) into each SMS template"
                .to_owned(),
        );
    }
    let alert = settings.message_kind(MessageKind::Alert);
    for kind in MessageKind::ALL {
        let texts = settings.message_kind(kind);
        let key = kind.key();
        let id = if texts.dlt_template_id.trim().is_empty() {
            "none".to_owned()
        } else {
            texts.dlt_template_id.clone()
        };
        let wa = if texts.whatsapp_template.trim().is_empty() {
            "none".to_owned()
        } else {
            texts.whatsapp_template.clone()
        };
        if kind != MessageKind::Alert && texts.sms == alert.sms {
            report.text.push_str(&format!(
                "\n  {key}: the alert's SMS text; DLT template id {id}; WhatsApp template {wa}\n"
            ));
            continue;
        }
        report.text.push_str(&format!(
            "\n  {key}: DLT template id {id}; WhatsApp template {wa}\n    register: {}\n",
            registered_text(&texts.sms, brand, base)
        ));
        let found = check_template(&texts.sms, settings);
        report.text.push_str(&format!("    {}\n", found.summary));
        if found.links {
            report
                .text
                .push_str(&format!("    whitelist the URL: {base}/r/\n"));
        }
        if parts(&texts.sms)
            .iter()
            .any(|p| matches!(p, Part::Var(Placeholder::Ack | Placeholder::AckRef)))
        {
            report
                .text
                .push_str(&format!("    whitelist the URL: {base}/a/\n"));
        }
        if texts.dlt_template_id.trim().is_empty() {
            report.warnings.push(format!(
                "messages kind {key}: no DLT template id (exotel.dlt_template_id for the alert, \
                 messages.kinds.{key}.dlt_template_id for the others); Indian operators need it"
            ));
        }
        let name = |p: String| format!("messages kind {key}: {p}");
        report.refusals.extend(found.refusals.into_iter().map(name));
        report.warnings.extend(found.warnings.into_iter().map(name));
    }
    report
}

/// What one template came to.
struct TemplateFindings {
    summary: String,
    links: bool,
    refusals: Vec<String>,
    warnings: Vec<String>,
}

fn check_template(template: &str, settings: &Settings) -> TemplateFindings {
    let brand = settings.messages.brand.trim();
    let base = settings.public_base();
    let mut refusals = Vec::new();
    let mut warnings = Vec::new();
    let pieces = parts(template);
    let static_text: String = pieces
        .iter()
        .filter_map(|p| match p {
            Part::Static(s) => Some((*s).to_owned()),
            Part::Var(Placeholder::Brand) => Some(brand.to_owned()),
            Part::Var(Placeholder::PublicUrl) => Some(base.to_owned()),
            Part::Var(_) => None,
        })
        .collect();
    if !brand.is_empty() && !static_text.contains(brand) {
        refusals.push(format!(
            "the static text does not name the brand {brand:?}; write {{brand}} or the name into it"
        ));
    }
    let vars: Vec<Placeholder> = pieces
        .iter()
        .filter_map(|p| match p {
            Part::Var(v) if v.value_kind() != ValueKind::Static => Some(*v),
            _ => None,
        })
        .collect();
    // Two variables with nothing static between them cannot be told apart by the scrubber; DLT
    // portals refuse such templates.
    let mut previous_var = false;
    for p in &pieces {
        match p {
            Part::Var(v) if v.value_kind() != ValueKind::Static => {
                if previous_var {
                    refusals.push(
                        "two placeholders stand side by side with no static text between them; \
                         DLT portals do not register that"
                            .to_owned(),
                    );
                }
                previous_var = true;
            }
            _ => previous_var = false,
        }
    }
    for p in &vars {
        let longest = longest_value(*p, settings);
        match p.value_kind() {
            ValueKind::Url if longest > DLT_URL_MAX => {
                let (path, reference) = if *p == Placeholder::Ack {
                    ("a", "{ack_ref}")
                } else {
                    ("r", "{ref}")
                };
                refusals.push(format!(
                    "{} can hold {longest} characters ({base}/{path}/ and a reference), over the \
                     {DLT_URL_MAX} a DLT link variable holds; write the fixed part as static text: \
                     {{public_url}}/{path}/{reference}",
                    p.token()
                ))
            }
            ValueKind::Id if longest > DLT_VAR_MAX => refusals.push(format!(
                "{} holds {longest} characters, over the {DLT_VAR_MAX} a DLT variable holds, and an id \
                 is never cut; leave it out of SMS templates",
                p.token()
            )),
            _ => {}
        }
    }
    for unknown in unknown_placeholders(&pieces) {
        warnings.push(format!(
            "{unknown} is no placeholder and is sent as written (placeholders: {})",
            Placeholder::ALL.map(Placeholder::token).join(" ")
        ));
    }
    if static_text.trim().is_empty() {
        refusals.push("the template has no static text; DLT registers none such".to_owned());
    }
    let static_chars = static_text.chars().count();
    let longest_total: usize = static_chars
        + vars
            .iter()
            .map(|p| longest_value(*p, settings))
            .sum::<usize>();
    if longest_total > MAX_BODY_CHARS {
        refusals.push(format!(
            "the message can reach {longest_total} characters, over Exotel's {MAX_BODY_CHARS}"
        ));
    }
    let static_encoding = Encoding::of(&static_text);
    let gsm_units = gsm::units(&static_text, Encoding::Gsm7) + (longest_total - static_chars);
    let unicode_units =
        gsm::units(&static_text, Encoding::Unicode) + (longest_total - static_chars);
    let unicode_segments = gsm::segments_for(unicode_units, Encoding::Unicode);
    let segments = match static_encoding {
        Encoding::Gsm7 => format!(
            "up to {} SMS in GSM-7, {unicode_segments} when a value needs Unicode (a Hindi name, °)",
            gsm::segments_for(gsm_units, Encoding::Gsm7)
        ),
        Encoding::Unicode => format!(
            "up to {unicode_segments} SMS; the static text needs Unicode (70/67 characters per SMS)"
        ),
    };
    if unicode_segments > MANY_SEGMENTS {
        warnings.push(format!(
            "a message can take {unicode_segments} SMS; shorter is faster and cheaper"
        ));
    }
    let summary = format!(
        "{} variable(s); static text {static_chars} characters ({}); longest message {longest_total} \
         characters, {segments}",
        vars.len(),
        static_encoding.as_str()
    );
    TemplateFindings {
        summary,
        links: vars.iter().any(|p| {
            matches!(
                p,
                Placeholder::Recording | Placeholder::Ref | Placeholder::Ack | Placeholder::AckRef
            )
        }) || pieces
            .iter()
            .any(|p| matches!(p, Part::Var(Placeholder::PublicUrl))),
        refusals,
        warnings,
    }
}

/// `{word}` in the static text that looks meant as a placeholder.
fn unknown_placeholders(pieces: &[Part<'_>]) -> Vec<String> {
    let mut out = Vec::new();
    for p in pieces {
        let Part::Static(s) = p else { continue };
        let mut rest = *s;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            match after.find('}') {
                Some(close)
                    if close > 0
                        && after[..close]
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                {
                    out.push(format!("{{{}}}", &after[..close]));
                    rest = &after[close + 1..];
                }
                _ => rest = after,
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(env: &[(&str, &str)]) -> Settings {
        Settings::load_with_env(
            None,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap()
    }

    const LIVE_SMS: [(&str, &str); 4] = [
        ("SOS_EXOTEL__ACCOUNT_SID", "acme"),
        ("SOS_EXOTEL__API_KEY", "k"),
        ("SOS_EXOTEL__API_TOKEN", "t"),
        ("SOS_EXOTEL__SMS_FROM", "HOSPTL"),
    ];

    #[test]
    fn the_registered_text_has_a_var_per_placeholder_and_static_settings_filled_in() {
        assert_eq!(
            registered_text(
                "{brand}: SOS {type} at {time}. Listen {public_url}/r/{ref} {nope}",
                "City Hospital",
                "https://sos.example.org"
            ),
            "City Hospital: SOS {#var#} at {#var#}. Listen https://sos.example.org/r/{#var#} {nope}"
        );
    }

    #[test]
    fn a_dlt_ready_template_passes() {
        let mut env = LIVE_SMS.to_vec();
        env.extend([
            ("SOS_SERVER__PUBLIC_URL", "https://sos.example.org"),
            ("SOS_MESSAGES__BRAND", "City Hospital"),
            ("SOS_EXOTEL__DLT_TEMPLATE_ID", "1107000000000000002"),
            (
                "SOS_MESSAGES__SMS",
                "{brand} SOS: {type} from {caller} at {time}. Listen: {public_url}/r/{ref}",
            ),
        ]);
        let r = check(&settings(&env));
        assert!(r.errors().is_empty(), "{:?}\n{}", r.errors(), r.text);
        assert!(r.text.contains(
            "register: City Hospital SOS: {#var#} from {#var#} at {#var#}. Listen: https://sos.example.org/r/{#var#}"
        ), "{}", r.text);
        assert!(
            r.text
                .contains("whitelist the URL: https://sos.example.org/r/"),
            "{}",
            r.text
        );
        assert!(r.text.contains("4 variable(s)"), "{}", r.text);
    }

    #[test]
    fn the_defaults_lack_a_brand_and_refusals_are_errors_only_when_live() {
        let dry = check(&settings(&[]));
        assert!(dry.errors().is_empty());
        assert!(dry
            .all_warnings()
            .iter()
            .any(|w| w.contains("messages.brand")));
        let live = check(&settings(&LIVE_SMS));
        assert!(
            live.errors().iter().any(|e| e.contains("messages.brand")),
            "{:?}",
            live.errors()
        );
    }

    #[test]
    fn ids_adjacent_variables_missing_brands_and_long_links_are_refusals() {
        let mut env = LIVE_SMS.to_vec();
        env.extend([
            ("SOS_MESSAGES__BRAND", "City Hospital"),
            (
                "SOS_SERVER__PUBLIC_URL",
                "https://emergency-alerts.city-hospital.example.org",
            ),
            ("SOS_MESSAGES__SMS", "{brand} {type}{caller} {recording}"),
            (
                "SOS_MESSAGES__KINDS__API_ALERT__SMS",
                "Alert {incident} {nope}",
            ),
        ]);
        let r = check(&settings(&env));
        let errors = r.errors().join("\n");
        for needle in [
            "kind alert: two placeholders stand side by side",
            "kind alert: {recording} can hold",
            "kind api_alert: the static text does not name the brand",
            "kind api_alert: {incident} holds 36 characters",
        ] {
            assert!(errors.contains(needle), "missing {needle:?} in\n{errors}");
        }
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("{nope} is no placeholder")),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn segments_are_counted_for_the_longest_message() {
        let mut env = LIVE_SMS.to_vec();
        env.extend([
            ("SOS_MESSAGES__BRAND", "City Hospital"),
            ("SOS_MESSAGES__SMS", "{brand}: {message}"),
        ]);
        let r = check(&settings(&env));
        // 15 static + 30 = 45: one SMS either way.
        assert!(
            r.text
                .contains("longest message 45 characters, up to 1 SMS in GSM-7, 1 when"),
            "{}",
            r.text
        );
        env.push(("SOS_MESSAGES__SMS", "{brand} आपातकाल: {message}"));
        let r = check(&settings(&env));
        assert!(r.text.contains("static text needs Unicode"), "{}", r.text);
    }
}
