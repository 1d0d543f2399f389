//! Why a delivery exists: the alert itself, or one of the messages and calls that follow it. The name
//! is stored in `deliveries.purpose` and shown by the API.

/// What a delivery is for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// The alert to a contact of the incident's route (any tier and run of its escalation).
    Alert,
    /// A message telling a contact that someone else acknowledged.
    AckNotice,
    /// A message sent again because no call reached its contact.
    Fallback,
    /// The one call that plays a recording that came late: never redialled.
    Followup,
    /// A delivery that alarms the `[unreached]` teams.
    Alarm,
}

impl Purpose {
    pub const ALL: [Purpose; 5] = [
        Purpose::Alert,
        Purpose::AckNotice,
        Purpose::Fallback,
        Purpose::Followup,
        Purpose::Alarm,
    ];

    /// The name stored in the database and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Alert => "alert",
            Purpose::AckNotice => "ack_notice",
            Purpose::Fallback => "fallback",
            Purpose::Followup => "followup",
            Purpose::Alarm => "alarm",
        }
    }
}

super::state::named_states!(Purpose);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purposes_store_and_serialise_under_the_same_names() {
        for p in Purpose::ALL {
            assert_eq!(p.as_str().parse::<Purpose>(), Ok(p));
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
        assert!("ack-notice".parse::<Purpose>().is_err());
    }
}
