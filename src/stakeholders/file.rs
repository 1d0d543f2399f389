//! The stakeholder file as ops write it, read and validated as a whole into a [`Routing`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::Deserialize;

use super::escalation::escalations;
use super::{Escalation, EscalationBounds};
use crate::domain::{Channel, Phone};

/// The file as written by ops, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    contact: Vec<RawContact>,
    #[serde(default)]
    routes: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    ivr: BTreeMap<String, String>,
    #[serde(default)]
    escalation: Vec<RawEscalation>,
    /// Who is alarmed when nobody acknowledged an incident in time, or a provider account fails.
    unreached: Option<RawUnreached>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnreached {
    #[serde(default)]
    teams: Vec<String>,
}

/// One `[[escalation]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEscalation {
    #[serde(rename = "type")]
    pub(super) ty: String,
    #[serde(default)]
    pub(super) tiers: Vec<Vec<String>>,
    pub(super) wait: String,
    /// Signed, so that a negative value is reported as such rather than as a TOML type error.
    #[serde(default)]
    pub(super) repeat: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContact {
    name: String,
    phone: String,
    channels: Option<Vec<String>>,
    #[serde(default)]
    teams: Vec<String>,
}

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

/// Seconds as the file would write them: `2m`, `1h`, `90s`.
pub fn human_secs(secs: u64) -> String {
    if secs > 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs > 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
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

pub const DEFAULT_ROUTE: &str = "default";

/// The warning `check-config` and the start banner give when channels are live and the file names
/// nobody to alarm when an incident goes unacknowledged.
pub fn unreached_warning(routing: &Routing, live: bool) -> Option<String> {
    (live && !routing.has_unreached()).then(|| {
        "the stakeholder file has no [unreached] table: when nobody acknowledges an incident, or a \
         provider refuses the account, no person is alarmed (add [unreached] teams = [\"...\"])"
            .to_owned()
    })
}

/// Whether an E.164 number is one of the example file's placeholders (`+91 98000 000xx`).
pub fn is_sample_number(e164: &str) -> bool {
    e164.strip_prefix("+9198000000")
        .is_some_and(|rest| rest.len() == 2 && rest.bytes().all(|b| b.is_ascii_digit()))
}

impl Routing {
    /// Reads and validates the file, reporting every problem at once, each naming the file and entry.
    pub fn load(
        path: &Path,
        default_region: phonenumber::country::Id,
    ) -> Result<Self, Vec<String>> {
        let where_ = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("{where_}: cannot read the stakeholder file: {e}")])?;
        Self::parse(&text, &where_, default_region)
    }

    /// [`Routing::load`], then the checks that need the settings ([`Routing::check_escalation`]):
    /// their errors refuse the file like any other, their warnings join the file's.
    pub fn load_checked(
        path: &Path,
        default_region: phonenumber::country::Id,
        bounds: Option<&EscalationBounds>,
    ) -> Result<Self, Vec<String>> {
        let mut routing = Self::load(path, default_region)?;
        if let Some(bounds) = bounds {
            let (errors, warnings) = routing.check_escalation(bounds);
            if !errors.is_empty() {
                return Err(errors);
            }
            routing.warnings.extend(warnings);
        }
        Ok(routing)
    }

    pub fn parse(
        text: &str,
        where_: &str,
        default_region: phonenumber::country::Id,
    ) -> Result<Self, Vec<String>> {
        let file: File = toml::from_str(text).map_err(|e| {
            // The error's own Display quotes the offending line, which may hold a phone number: say
            // where, and the reason with numbers masked.
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            vec![format!(
                "{where_}: not valid TOML{at}: {}",
                crate::domain::mask_numbers(e.message())
            )]
        })?;
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let mut contacts = Vec::new();
        let mut teams: BTreeSet<String> = BTreeSet::new();
        let mut seen_phones: HashMap<String, String> = HashMap::new();
        // Names are identities: an acknowledgement is told to everyone alerted but the contact who
        // gave it, a drill and a schedule name their contact, each by name. Two entries of one name
        // (compared as a drill looks them up: trimmed, case-insensitive) would be one contact to all
        // of these, so the file is refused. Lower-cased name -> the first entry of that name.
        let mut seen_names: HashMap<String, String> = HashMap::new();

        for (i, raw) in file.contact.iter().enumerate() {
            let entry = format!("{where_}: contact[{i}] {:?}", raw.name);
            if raw.name.trim().is_empty() {
                errors.push(format!("{entry}: name is empty"));
            }
            let phone = match Phone::parse(&raw.phone, default_region) {
                Ok(p) => Some(p),
                Err(e) => {
                    errors.push(format!("{entry}: bad phone number: {e}"));
                    None
                }
            };
            let mut channels = Vec::new();
            match &raw.channels {
                None => channels.extend(Channel::ALL),
                Some(list) if list.is_empty() => errors.push(format!(
                    "{entry}: channels is empty (leave it out for all three)"
                )),
                Some(list) => {
                    for c in list {
                        match Channel::parse(c) {
                            Some(ch) if !channels.contains(&ch) => channels.push(ch),
                            Some(_) => {}
                            None => errors.push(format!(
                                "{entry}: unknown channel {c:?} (use call, sms or whatsapp)"
                            )),
                        }
                    }
                }
            }
            if raw.teams.is_empty() {
                errors.push(format!("{entry}: is in no team, so no route can reach it"));
            }
            let named = match &phone {
                Some(p) => format!("contact[{i}] {:?} ({})", raw.name, p.masked()),
                None => format!("contact[{i}] {:?}", raw.name),
            };
            let key = raw.name.trim().to_lowercase();
            if !key.is_empty() {
                match seen_names.get(&key) {
                    Some(first) => errors.push(format!(
                        "{where_}: {named}: has the same name as {first}; give each contact a name \
                         of its own (acknowledgements and drills tell contacts apart by name)"
                    )),
                    None => {
                        seen_names.insert(key, named);
                    }
                }
            }
            let member_of: Vec<String> = raw.teams.iter().map(|t| t.trim().to_owned()).collect();
            teams.extend(member_of.iter().cloned());
            if let Some(phone) = phone {
                if let Some(other) = seen_phones.insert(phone.e164().to_owned(), raw.name.clone()) {
                    warnings.push(format!(
                        "{entry}: same phone number {} as {other:?}; each is notified once",
                        phone.masked()
                    ));
                }
                contacts.push(Contact {
                    name: raw.name.trim().to_owned(),
                    phone,
                    channels,
                    teams: member_of,
                });
            }
        }

        let mut routes = HashMap::new();
        for (ty, route_teams) in &file.routes {
            let entry = format!("{where_}: routes.{ty}");
            if route_teams.is_empty() {
                errors.push(format!("{entry}: route has no teams"));
            }
            for t in route_teams {
                if !teams.contains(t.trim()) {
                    errors.push(format!("{entry}: team {t:?} has no contacts"));
                }
            }
            let key = ty.trim().to_lowercase();
            if routes
                .insert(key, (ty.trim().to_owned(), route_teams.clone()))
                .is_some()
            {
                errors.push(format!(
                    "{entry}: defined twice (types match case-insensitively)"
                ));
            }
        }
        let escalations = escalations(&file.escalation, &teams, where_, &mut errors);
        if !routes.contains_key(DEFAULT_ROUTE) && !escalations.contains_key(DEFAULT_ROUTE) {
            errors.push(format!(
                "{where_}: routes.default is missing; unknown or missing emergency types need it"
            ));
        }
        let unreached = file.unreached.as_ref().map(|u| {
            let entry = format!("{where_}: unreached.teams");
            if u.teams.is_empty() {
                errors.push(format!(
                    "{entry}: is empty; name the teams alarmed when nobody acknowledged"
                ));
            }
            for t in &u.teams {
                if !teams.contains(t.trim()) {
                    errors.push(format!("{entry}: team {t:?} has no contacts"));
                }
            }
            u.teams
                .iter()
                .map(|t| t.trim().to_owned())
                .collect::<Vec<_>>()
        });
        // A policy replaces its type's route: a team routed but in none of its tiers is not alerted.
        for (ty, route_teams) in &file.routes {
            let Some(policy) = escalations.get(&ty.trim().to_lowercase()) else {
                continue;
            };
            for t in route_teams {
                if !policy.tiers.iter().flatten().any(|p| p == t.trim()) {
                    warnings.push(format!(
                        "{where_}: routes.{ty}: team {t:?} is in no tier of the {:?} escalation \
                         policy, which replaces this route: it is not alerted",
                        policy.emergency_type
                    ));
                }
            }
        }
        for team in &teams {
            // A team that is only alarmed (a duty manager) is on no route on purpose.
            let alarmed = unreached.as_ref().is_some_and(|u| u.contains(team));
            let routed = file.routes.values().flatten().any(|t| t.trim() == team)
                || escalations
                    .values()
                    .any(|p| p.tiers.iter().flatten().any(|t| t == team));
            if !routed && !alarmed {
                warnings.push(format!("{where_}: team {team:?} is on no route"));
            }
        }

        let mut ivr = HashMap::new();
        for (digit, ty) in &file.ivr {
            let entry = format!("{where_}: ivr.{digit}");
            let digit = digit.trim();
            if digit.is_empty()
                || !digit
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '*' || c == '#')
            {
                errors.push(format!("{entry}: key must be the digits pressed"));
            }
            let key = ty.trim().to_lowercase();
            if !routes.contains_key(&key) && !escalations.contains_key(&key) {
                warnings.push(format!(
                    "{entry}: {ty:?} has no route; it will use routes.default"
                ));
            }
            ivr.insert(digit.to_owned(), ty.trim().to_owned());
        }

        if errors.is_empty() {
            Ok(Routing {
                contacts,
                routes,
                ivr,
                unreached,
                escalations,
                file: where_.to_owned(),
                warnings,
            })
        } else {
            Err(errors)
        }
    }

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

    /// The escalation policies as `check-config` prints them, one a line:
    /// `Heart: cardiology → emergency-desk → lab, every 2m, repeat 1 (unreached after 12m)`.
    pub fn describe_escalation(&self, ack_deadline_secs: u64) -> String {
        let mut out = String::new();
        for policy in self.policies() {
            out.push_str(&format!(
                "{}: {} (unreached after {})\n",
                policy.emergency_type,
                policy.summary(),
                human_secs(policy.unreached_after_secs(ack_deadline_secs))
            ));
        }
        out
    }

    /// The routing table as `check-config` prints it, numbers masked.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let mut keys: BTreeSet<&String> = self.routes.keys().collect();
        keys.extend(self.escalations.keys());
        for key in keys {
            let plan = self.plan(Some(key));
            let teams = match (&plan.escalation, self.routes.get(key)) {
                (Some(policy), _) => policy
                    .tiers
                    .iter()
                    .map(|t| t.join(" + "))
                    .collect::<Vec<_>>()
                    .join(" → "),
                (None, Some((_, teams))) => teams.join(", "),
                (None, None) => String::new(),
            };
            let spelling = match (self.routes.get(key), &plan.escalation) {
                (Some((spelling, _)), _) => spelling.clone(),
                (None, Some(policy)) => policy.emergency_type.clone(),
                (None, None) => key.clone(),
            };
            out.push_str(&format!("{spelling} -> {teams}\n"));
            // With a policy, each tier's contacts under its number (a contact in two tiers is listed
            // in each: called in both, messaged in the first).
            let mut by_contact: BTreeMap<(u32, String, String), Vec<&str>> = BTreeMap::new();
            for t in &plan.targets {
                by_contact
                    .entry((t.tier, t.contact_name.clone(), t.phone.masked()))
                    .or_default()
                    .push(t.channel.as_str());
            }
            for ((tier, name, phone), channels) in by_contact {
                let tier = match plan.escalation {
                    Some(_) => format!("tier {} ", tier + 1),
                    None => String::new(),
                };
                out.push_str(&format!(
                    "    {tier}{name:<28} {phone:<16} {}\n",
                    channels.join(", ")
                ));
            }
        }
        if let (Some(teams), Some(plan)) = (&self.unreached, self.unreached_plan()) {
            out.push_str(&format!(
                "Unreached alarm (nobody acknowledged in time) -> {}\n",
                teams.join(", ")
            ));
            let mut by_contact: BTreeMap<(String, String), Vec<&str>> = BTreeMap::new();
            for t in &plan.targets {
                by_contact
                    .entry((t.contact_name.clone(), t.phone.masked()))
                    .or_default()
                    .push(t.channel.as_str());
            }
            for ((name, phone), channels) in by_contact {
                out.push_str(&format!(
                    "    {name:<28} {phone:<16} {}\n",
                    channels.join(", ")
                ));
            }
        }
        if !self.ivr.is_empty() {
            out.push_str("IVR digits:\n");
            let mut digits: Vec<(&String, &String)> = self.ivr.iter().collect();
            digits.sort();
            for (d, t) in digits {
                out.push_str(&format!("    {d} -> {t}\n"));
            }
        }
        out
    }

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
    fn syntax_errors_name_the_line_without_the_number() {
        let errs = Routing::parse(
            "[[contact]]\nname = \"A\"\nphone = 919800000001\nteams = [\"x\"]\n",
            "s.toml",
            india(),
        )
        .unwrap_err();
        let all = errs.join("\n");
        assert!(all.contains("s.toml: not valid TOML (line 3)"), "{all}");
        assert!(!all.contains("9800000001"), "{all}");
    }

    #[test]
    fn every_problem_is_reported_with_file_and_entry() {
        let bad = r#"
[[contact]]
name = "A"
phone = "12"
teams = ["x"]

[[contact]]
name = "Lonely"
phone = "+919800000003"
channels = ["pager"]

[routes]
Heart = ["nobody"]
Brain = []
"#;
        let errs = Routing::parse(bad, "s.toml", india()).unwrap_err();
        let all = errs.join("\n");
        for needle in [
            "contact[0] \"A\": bad phone number",
            "contact[1] \"Lonely\": unknown channel \"pager\"",
            "contact[1] \"Lonely\": is in no team",
            "routes.Heart: team \"nobody\" has no contacts",
            "routes.Brain: route has no teams",
            "routes.default is missing",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(errs.iter().all(|e| e.starts_with("s.toml: ")));
    }

    #[test]
    fn a_name_given_twice_is_refused_naming_both_entries() {
        let twice = r#"
[[contact]]
name = "Dr. Asha Rao"
phone = "+91 98000 00001"
teams = ["cardiology"]

[[contact]]
name = "Desk"
phone = "09800000002"
teams = ["cardiology"]

[[contact]]
name = " dr. asha RAO"
phone = "+919800000003"
teams = ["cardiology"]

[routes]
default = ["cardiology"]
"#;
        let errs = Routing::parse(twice, "s.toml", india()).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        let e = &errs[0];
        for needle in [
            "s.toml: contact[2] \" dr. asha RAO\" (+91******0003)",
            "contact[0] \"Dr. Asha Rao\" (+91******0001)",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in {e}");
        }
        assert!(
            !e.contains("9800000001") && !e.contains("9800000003"),
            "{e}"
        );
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
    fn a_default_policy_stands_in_for_a_missing_default_route() {
        let text = r#"
[[contact]]
name = "Desk"
phone = "+919800000002"
teams = ["desk"]

[[escalation]]
type = "DEFAULT"
tiers = [["desk"]]
wait = "5m"
"#;
        let r = Routing::parse(text, "s.toml", india()).unwrap();
        let plan = r.plan(None);
        assert_eq!(plan.route, "default");
        assert_eq!(plan.targets.len(), 3);
        assert_eq!(plan.escalation.unwrap().wait_secs, 300);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let no_default = text.replace("DEFAULT", "Heart");
        let errs = Routing::parse(&no_default, "s.toml", india()).unwrap_err();
        assert!(errs[0].contains("routes.default is missing"), "{errs:?}");
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
