//! The ops-edited stakeholder file: contacts, teams, routes and IVR digits, validated as a whole into a
//! [`Routing`] that answers "who gets what for this emergency type".

pub mod reload;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::Deserialize;

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
    /// Who is alarmed when nobody acknowledged an incident in time, or a provider account fails.
    unreached: Option<RawUnreached>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnreached {
    #[serde(default)]
    teams: Vec<String>,
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

/// One delivery to create: this contact, on this channel.
#[derive(Debug, Clone)]
pub struct Target {
    pub contact_name: String,
    pub phone: Phone,
    pub channel: Channel,
}

/// The route chosen for an incident and the deliveries it fans out to.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The emergency type as the routes spell it, or as received when no route matched.
    pub emergency_type: String,
    /// The route key used (`default` when the type was unknown or missing).
    pub route: String,
    pub targets: Vec<Target>,
}

/// The routing table: validated, immutable, swapped whole on reload.
#[derive(Debug, Clone)]
pub struct Routing {
    contacts: Vec<Contact>,
    /// lower-cased emergency type -> (spelling in the file, teams)
    routes: HashMap<String, (String, Vec<String>)>,
    ivr: HashMap<String, String>,
    /// The teams of `[unreached]`, when the file has that table.
    unreached: Option<Vec<String>>,
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
        if !routes.contains_key(DEFAULT_ROUTE) {
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
        for team in &teams {
            // A team that is only alarmed (a duty manager) is on no route on purpose.
            let alarmed = unreached.as_ref().is_some_and(|u| u.contains(team));
            if !alarmed && !file.routes.values().flatten().any(|t| t.trim() == team) {
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
            if !routes.contains_key(&ty.trim().to_lowercase()) {
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
    /// missing) and lists each routed contact once per channel, even when several of its teams are routed.
    pub fn plan(&self, emergency_type: Option<&str>) -> Plan {
        let wanted = emergency_type.map(str::trim).filter(|s| !s.is_empty());
        let (route, emergency_type, teams) =
            match wanted.and_then(|t| self.routes.get(&t.to_lowercase()).map(|r| (t, r))) {
                Some((_, (spelling, teams))) => (spelling.to_lowercase(), spelling.clone(), teams),
                None => {
                    let (_, teams) = &self.routes[DEFAULT_ROUTE];
                    let label = wanted.unwrap_or("Unspecified").to_owned();
                    (DEFAULT_ROUTE.to_owned(), label, teams)
                }
            };
        let mut seen: BTreeSet<(String, Channel)> = BTreeSet::new();
        let mut targets = Vec::new();
        for contact in &self.contacts {
            if !contact
                .teams
                .iter()
                .any(|t| teams.iter().any(|r| r.trim() == t))
            {
                continue;
            }
            for &channel in &contact.channels {
                if seen.insert((contact.phone.e164().to_owned(), channel)) {
                    targets.push(Target {
                        contact_name: contact.name.clone(),
                        phone: contact.phone.clone(),
                        channel,
                    });
                }
            }
        }
        Plan {
            emergency_type,
            route,
            targets,
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
        let mut seen: BTreeSet<(String, Channel)> = BTreeSet::new();
        let mut targets = Vec::new();
        for contact in &self.contacts {
            if !contact.teams.iter().any(|t| teams.contains(t)) {
                continue;
            }
            for &channel in &contact.channels {
                if seen.insert((contact.phone.e164().to_owned(), channel)) {
                    targets.push(Target {
                        contact_name: contact.name.clone(),
                        phone: contact.phone.clone(),
                        channel,
                    });
                }
            }
        }
        Some(Plan {
            emergency_type: "Unreached".to_owned(),
            route: "unreached".to_owned(),
            targets,
        })
    }

    /// The routing table as `check-config` prints it, numbers masked.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let mut keys: Vec<&String> = self.routes.keys().collect();
        keys.sort();
        for key in keys {
            let (spelling, teams) = &self.routes[key];
            out.push_str(&format!("{spelling} -> {}\n", teams.join(", ")));
            let plan = self.plan(Some(spelling));
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
                })
                .collect(),
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

    fn india() -> phonenumber::country::Id {
        crate::domain::phone::region("IN").unwrap()
    }

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
