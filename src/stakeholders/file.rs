//! The stakeholder file as ops write it, read and validated as a whole into a [`Routing`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::Deserialize;

use super::escalation::escalations;
use super::{Contact, EscalationBounds, Routing, DEFAULT_ROUTE};
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stakeholders::fixtures::india;

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
}
