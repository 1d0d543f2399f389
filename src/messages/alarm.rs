//! What an alarm says: nobody acknowledged an incident in time, or a provider refuses the account.
//! The text fills the `{message}` of the `unreached_alarm` kind's SMS and WhatsApp texts, and is
//! spoken by an alarm call's greeting.

use crate::domain::Source;

/// What the incident behind an alarm says about itself.
#[derive(Debug, Clone, Copy)]
pub struct AlarmFacts<'a> {
    /// `alarm` for an account alarm's own incident; the alarmed incident's source otherwise.
    pub source: Source,
    pub emergency_type: &'a str,
    pub received_at: i64,
    pub message: Option<&'a str>,
}

/// The alarm's news. `short` for an SMS, where a DLT variable holds 30 characters.
pub fn news(facts: &AlarmFacts<'_>, short: bool, utc_offset_minutes: i32) -> String {
    let account = facts.source == Source::Alarm;
    match (account, short) {
        (true, true) => "Account alarm: check now".to_owned(),
        (true, false) => format!(
            "Account alarm: {}",
            facts.message.unwrap_or("a provider refuses the account")
        ),
        (false, true) => "NOT ACKNOWLEDGED: act now".to_owned(),
        (false, false) => {
            let mut out = format!(
                "Nobody has acknowledged the {} emergency received at {}.",
                facts.emergency_type,
                super::format_time(facts.received_at, utc_offset_minutes)
            );
            if let Some(said) = facts.message.map(str::trim).filter(|m| !m.is_empty()) {
                out.push(' ');
                out.push_str(said);
            }
            out
        }
    }
}

/// What an alarm call's greeting speaks, with the acknowledging key when there is one.
pub fn spoken(facts: &AlarmFacts<'_>, ack_digit: Option<&str>, utc_offset_minutes: i32) -> String {
    let mut out = format!("Alarm. {}", news(facts, false, utc_offset_minutes));
    if let Some(digit) = ack_digit {
        out.push_str(&format!(" Press {digit} to acknowledge."));
    }
    super::speakable(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreached_alarm_names_the_emergency_and_fits_a_dlt_variable_in_sms() {
        let facts = AlarmFacts {
            source: Source::Exotel,
            emergency_type: "Heart",
            received_at: 1_722_424_376_000,
            message: None,
        };
        let said = spoken(&facts, Some("1"), 330);
        assert!(
            said.starts_with("Alarm. Nobody has acknowledged the Heart emergency received at"),
            "{said}"
        );
        assert!(said.ends_with("Press 1 to acknowledge."), "{said}");
        assert!(news(&facts, true, 0).chars().count() <= 30);
        let account = AlarmFacts {
            source: Source::Alarm,
            message: Some("exotel:call refuses this account (auth)"),
            ..facts
        };
        assert!(news(&account, false, 0).contains("exotel:call refuses"));
        assert!(news(&account, true, 0).chars().count() <= 30);
    }
}
