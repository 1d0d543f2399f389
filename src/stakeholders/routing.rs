//! The validated routing table and the questions asked of it: which route and tiers an emergency
//! type gets, who is alarmed when nobody acknowledged, whom a drill reaches.

use std::collections::{BTreeSet, HashMap};

use super::Escalation;
use crate::domain::{Channel, Phone};

/// A validated contact.
#[derive(Debug, Clone)]
pub struct Contact {
    pub name: String,
    pub phone: Phone,
    pub channels: Vec<Channel>,
    pub teams: Vec<String>,
}

/// One delivery to create: this contact, on this channel, when this tier is alerted.
#[derive(Debug, Clone)]
pub struct Target {
    pub contact_name: String,
    pub phone: Phone,
    pub channel: Channel,
    /// The escalation tier (0: the first, alerted at once). A contact in several tiers has a call in
    /// each, and its messages only in the first.
    pub tier: u32,
}

/// The route chosen for an incident and the deliveries it fans out to.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The emergency type as the routes spell it, or as received when no route matched.
    pub emergency_type: String,
    /// The route key used (`default` when the type was unknown or missing).
    pub route: String,
    pub targets: Vec<Target>,
    /// The route's escalation policy; `None`: one tier, everyone at once.
    pub escalation: Option<Escalation>,
}

/// The routing table: validated, immutable, swapped whole on reload.
#[derive(Debug, Clone)]
pub struct Routing {
    pub(super) contacts: Vec<Contact>,
    /// lower-cased emergency type -> (spelling in the file, teams)
    pub(super) routes: HashMap<String, (String, Vec<String>)>,
    pub(super) ivr: HashMap<String, String>,
    /// The teams of `[unreached]`, when the file has that table.
    pub(super) unreached: Option<Vec<String>>,
    /// lower-cased emergency type (or `default`) -> its escalation policy
    pub(super) escalations: HashMap<String, Escalation>,
    /// Where it was read from, to name in later checks.
    pub(super) file: String,
    pub warnings: Vec<String>,
}

/// The route of an unknown or missing emergency type; the file must have it, as a route or a policy.
pub const DEFAULT_ROUTE: &str = "default";

impl Routing {
    /// The emergency type for IVR digits, if the `[ivr]` table knows them.
    pub fn type_for_digits(&self, digits: &str) -> Option<&str> {
        self.ivr.get(digits.trim()).map(String::as_str)
    }

    /// Chooses the route for `emergency_type` (case-insensitive; the default route when unknown or
    /// missing) and its escalation policy, if any: a type's policy replaces its route (and is its route
    /// when `[routes]` has no entry for it); the `default` policy covers the default route only. Each
    /// routed contact is listed once per message channel, in its first tier, and once per tier it is
    /// in for calls, even when several of its teams are routed.
    pub fn plan(&self, emergency_type: Option<&str>) -> Plan {
        let wanted = emergency_type.map(str::trim).filter(|s| !s.is_empty());
        let known = wanted.map(str::to_lowercase).and_then(|key| {
            let spelling = match (self.routes.get(&key), self.escalations.get(&key)) {
                (Some((spelling, _)), _) => spelling.clone(),
                (None, Some(policy)) => policy.emergency_type.clone(),
                (None, None) => return None,
            };
            Some((key, spelling))
        });
        let (route, emergency_type) = match known {
            Some(found) => found,
            None => (
                DEFAULT_ROUTE.to_owned(),
                wanted.unwrap_or("Unspecified").to_owned(),
            ),
        };
        let escalation = self.escalations.get(&route).cloned();
        let tiers: Vec<Vec<String>> = match &escalation {
            Some(policy) => policy.tiers.clone(),
            // Validation guarantees the default route exists when no default policy does.
            None => vec![self
                .routes
                .get(&route)
                .map(|(_, teams)| teams.clone())
                .unwrap_or_default()],
        };
        Plan {
            emergency_type,
            route,
            targets: self.targets(&tiers),
            escalation,
        }
    }

    /// Whether the file has an `[unreached]` table.
    pub fn has_unreached(&self) -> bool {
        self.unreached.is_some()
    }

    /// Who is alarmed when nobody acknowledged an incident in time (and when a provider account
    /// fails): every contact of the `[unreached]` teams, each on every channel they have, once.
    /// `None` without an `[unreached]` table.
    pub fn unreached_plan(&self) -> Option<Plan> {
        let teams = self.unreached.as_ref()?;
        // One tier: each contact once per channel, as any route.
        let targets = self.targets(std::slice::from_ref(teams));
        Some(Plan {
            emergency_type: "Unreached".to_owned(),
            route: "unreached".to_owned(),
            targets,
            escalation: None,
        })
    }

    /// The deliveries for these tiers of teams: calls once per contact and tier, messages once per
    /// contact and channel (in the contact's first tier). A contact is matched by number, so two
    /// entries sharing a phone are notified once.
    fn targets(&self, tiers: &[Vec<String>]) -> Vec<Target> {
        let mut messaged: BTreeSet<(String, Channel)> = BTreeSet::new();
        let mut called: BTreeSet<(String, u32)> = BTreeSet::new();
        let mut targets = Vec::new();
        for (tier, teams) in (0u32..).zip(tiers) {
            for contact in &self.contacts {
                if !contact
                    .teams
                    .iter()
                    .any(|t| teams.iter().any(|r| r.trim() == t))
                {
                    continue;
                }
                let phone = contact.phone.e164().to_owned();
                for &channel in &contact.channels {
                    let fresh = if channel == Channel::Call {
                        called.insert((phone.clone(), tier))
                    } else {
                        messaged.insert((phone.clone(), channel))
                    };
                    if fresh {
                        targets.push(Target {
                            contact_name: contact.name.clone(),
                            phone: contact.phone.clone(),
                            channel,
                            tier,
                        });
                    }
                }
            }
        }
        targets
    }

    /// The policy for an emergency type as the file spells it (case-insensitive), or `default`.
    pub fn escalation(&self, emergency_type: &str) -> Option<&Escalation> {
        self.escalations.get(&emergency_type.trim().to_lowercase())
    }

    /// How many contacts the file has, as start-up and each reload report it.
    pub fn contact_count(&self) -> usize {
        self.contacts.len()
    }

    /// A fire drill's plan: the contact named `name` (case-insensitive, surrounding spaces ignored) on
    /// every channel they have, whatever their teams. `None` when no contact has that name.
    pub fn drill(&self, name: &str) -> Option<Plan> {
        let wanted = name.trim().to_lowercase();
        let contact = self
            .contacts
            .iter()
            .find(|c| c.name.trim().to_lowercase() == wanted)?;
        Some(Plan {
            emergency_type: "Drill".to_owned(),
            route: "drill".to_owned(),
            targets: contact
                .channels
                .iter()
                .map(|&channel| Target {
                    contact_name: contact.name.clone(),
                    phone: contact.phone.clone(),
                    channel,
                    tier: 0,
                })
                .collect(),
            // A drill tests one contact's channels: it never escalates.
            escalation: None,
        })
    }

    /// Every contact's number, E.164.
    pub fn phones(&self) -> impl Iterator<Item = &str> {
        self.contacts.iter().map(|c| c.phone.e164())
    }

    /// Every contact reached on WhatsApp, one per number (the first name given to it), in file order.
    pub fn whatsapp_contacts(&self) -> Vec<(String, Phone)> {
        let mut out: Vec<(String, Phone)> = Vec::new();
        for c in self
            .contacts
            .iter()
            .filter(|c| c.channels.contains(&Channel::Whatsapp))
        {
            if !out.iter().any(|(_, p)| p.e164() == c.phone.e164()) {
                out.push((c.name.clone(), c.phone.clone()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stakeholders::fixtures::{escalating, india};

    const GOOD: &str = r#"
[[contact]]
name = "Dr. Asha Rao"
phone = "+91 98000 00001"
teams = ["cardiology", "emergency-desk"]

[[contact]]
name = "Desk"
phone = "09800000002"
channels = ["call"]
teams = ["emergency-desk"]

[routes]
Heart = ["cardiology", "emergency-desk"]
default = ["emergency-desk"]

[ivr]
1 = "Heart"
"#;

    #[test]
    fn contact_in_two_routed_teams_is_notified_once_per_channel() {
        let r = Routing::parse(GOOD, "s.toml", india()).unwrap();
        let plan = r.plan(Some("hEaRt"));
        assert_eq!(plan.route, "heart");
        assert_eq!(plan.emergency_type, "Heart");
        // Asha: call, sms, whatsapp once each; Desk: call.
        assert_eq!(plan.targets.len(), 4);
        let unknown = r.plan(Some("Volcano"));
        assert_eq!(unknown.route, "default");
        assert_eq!(unknown.emergency_type, "Volcano");
        assert_eq!(r.plan(None).emergency_type, "Unspecified");
        assert_eq!(r.type_for_digits("1"), Some("Heart"));
    }

    #[test]
    fn a_policy_replaces_its_route_and_puts_each_target_in_its_tier() {
        let r = escalating();
        let plan = r.plan(Some("heart"));
        assert_eq!(plan.route, "heart");
        let policy = plan.escalation.clone().unwrap();
        assert_eq!(policy.tiers.len(), 3);
        assert_eq!((policy.wait_secs, policy.repeat), (120, 1));
        let got: Vec<(String, &str, u32)> = plan
            .targets
            .iter()
            .map(|t| (t.contact_name.clone(), t.channel.as_str(), t.tier))
            .collect();
        // Asha is in tiers 0 (cardiology) and 1 (desk): a call in each, her messages once, in tier 0.
        assert_eq!(
            got,
            vec![
                ("Dr. Asha Rao".into(), "call", 0),
                ("Dr. Asha Rao".into(), "sms", 0),
                ("Dr. Asha Rao".into(), "whatsapp", 0),
                ("Dr. Asha Rao".into(), "call", 1),
                ("Desk".into(), "call", 1),
                ("Desk".into(), "sms", 1),
                ("Lab".into(), "sms", 2),
                ("Lab".into(), "whatsapp", 2),
            ]
        );
        assert_eq!(policy.offset_ms(0, 0), 0);
        assert_eq!(policy.offset_ms(0, 2), 240_000);
        assert_eq!(policy.offset_ms(1, 0), 360_000);
        assert_eq!(policy.total_secs(), 720);
        assert_eq!(policy.unreached_after_secs(900), 720);
        assert_eq!(policy.unreached_after_secs(600), 600);
    }

    #[test]
    fn a_policy_without_a_route_is_its_route_and_default_covers_only_unknown_types() {
        let r = escalating();
        let trauma = r.plan(Some("TRAUMA"));
        assert_eq!(
            (trauma.route.as_str(), trauma.emergency_type.as_str()),
            ("trauma", "Trauma")
        );
        assert_eq!(trauma.escalation.unwrap().wait_secs, 90);
        assert_eq!(trauma.targets[0].contact_name, "Surgeon");
        let unknown = r.plan(Some("Volcano"));
        assert_eq!(unknown.route, "default");
        assert_eq!(unknown.escalation.unwrap().emergency_type, "default");
        // A type with its own route and no policy keeps one tier, everyone at once.
        let plain = Routing::parse(GOOD, "s.toml", india()).unwrap();
        let heart = plain.plan(Some("Heart"));
        assert!(heart.escalation.is_none());
        assert!(heart.targets.iter().all(|t| t.tier == 0));
        // A drill never escalates.
        let drill = r.drill("desk").unwrap();
        assert!(drill.escalation.is_none());
        assert!(drill.targets.iter().all(|t| t.tier == 0));
    }

    #[test]
    fn unreached_teams_are_validated_and_planned_once_per_channel() {
        let text = r#"
[[contact]]
name = "Duty manager"
phone = "+919800000009"
channels = ["call", "sms"]
teams = ["duty-manager", "night"]

[[contact]]
name = "Desk"
phone = "+919800000004"
teams = ["desk"]

[routes]
default = ["desk"]

[unreached]
teams = ["duty-manager", "night"]
"#;
        let r = Routing::parse(text, "s.toml", india()).unwrap();
        assert!(r.has_unreached());
        assert!(
            !r.warnings.iter().any(|w| w.contains("duty-manager")),
            "an alarmed team needs no route: {:?}",
            r.warnings
        );
        let plan = r.unreached_plan().unwrap();
        let got: Vec<(&str, Channel)> = plan
            .targets
            .iter()
            .map(|t| (t.contact_name.as_str(), t.channel))
            .collect();
        assert_eq!(
            got,
            vec![
                ("Duty manager", Channel::Call),
                ("Duty manager", Channel::Sms)
            ]
        );
        assert!(r.describe().contains("Unreached alarm"), "{}", r.describe());

        let table = "[unreached]\nteams = [\"duty-manager\", \"night\"]";
        assert!(text.contains(table));
        let unknown = text.replace(table, "[unreached]\nteams = [\"nobody\"]");
        let errs = Routing::parse(&unknown, "s.toml", india()).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("unreached.teams: team \"nobody\" has no contacts")),
            "{errs:?}"
        );
        let without = Routing::parse(&text.replace(table, ""), "s.toml", india()).unwrap();
        assert!(without.unreached_plan().is_none());
    }
}
