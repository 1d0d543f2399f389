//! The stakeholder files the module's tests share.

use super::Routing;

/// The region the test files' national numbers (`098…`) are read in.
pub fn india() -> phonenumber::country::Id {
    crate::domain::phone::region("IN").unwrap()
}

/// Three policies over four contacts: `Heart` (three tiers, a repeat) replacing its route, `Trauma`
/// with no route of its own, and `default`; Dr. Asha Rao is in two of Heart's tiers.
pub const ESCALATING: &str = r#"
[[contact]]
name = "Dr. Asha Rao"
phone = "+91 98000 00001"
teams = ["cardiology", "emergency-desk"]

[[contact]]
name = "Desk"
phone = "09800000002"
channels = ["call", "sms"]
teams = ["emergency-desk"]

[[contact]]
name = "Lab"
phone = "+919800000003"
channels = ["sms", "whatsapp"]
teams = ["lab"]

[[contact]]
name = "Surgeon"
phone = "+919800000004"
channels = ["call"]
teams = ["surgery"]

[routes]
Heart = ["cardiology"]
default = ["emergency-desk"]

[[escalation]]
type = "Heart"
tiers = [["cardiology"], ["emergency-desk"], ["lab"]]
wait = "2m"
repeat = 1

[[escalation]]
type = "Trauma"
tiers = [["surgery"], ["emergency-desk"]]
wait = "90s"

[[escalation]]
type = "default"
tiers = [["emergency-desk"], ["surgery"]]
wait = "1m"
"#;

/// [`ESCALATING`], validated.
pub fn escalating() -> Routing {
    Routing::parse(ESCALATING, "s.toml", india()).unwrap()
}
