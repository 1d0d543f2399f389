//! The stakeholder file as ops write it, read and validated as a whole into a [`Routing`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::Deserialize;

use super::escalation::{escalations, RawEscalation};
use super::{Contact, Escalation, EscalationBounds, Routing, DEFAULT_ROUTE};
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

/// The `[unreached]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnreached {
    #[serde(default)]
    teams: Vec<String>,
}

/// One `[[contact]]` entry as written.
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

    /// Validates the text of a stakeholder file, reporting every problem at once, each naming the
    /// file (`where_`) and the entry: any error refuses the file, warnings go with the routing. Each
    /// step checks one table, or one way the tables fit together; messages come in step order.
    pub fn parse(
        text: &str,
        where_: &str,
        default_region: phonenumber::country::Id,
    ) -> Result<Self, Vec<String>> {
        let file = read_toml(text, where_)?;
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let (contacts, teams) = check_contacts(
            &file.contact,
            where_,
            default_region,
            &mut errors,
            &mut warnings,
        );
        let routes = check_routes(&file.routes, &teams, where_, &mut errors);
        let escalations = escalations(&file.escalation, &teams, where_, &mut errors);
        check_default_route(&routes, &escalations, where_, &mut errors);
        let unreached = file
            .unreached
            .as_ref()
            .map(|u| check_unreached(u, &teams, where_, &mut errors));
        warn_routed_teams_outside_their_policy(&file.routes, &escalations, where_, &mut warnings);
        warn_unrouted_teams(
            &teams,
            &file.routes,
            &escalations,
            unreached.as_deref(),
            where_,
            &mut warnings,
        );
        let ivr = check_ivr(
            &file.ivr,
            &routes,
            &escalations,
            where_,
            &mut errors,
            &mut warnings,
        );

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Routing {
            contacts,
            routes,
            ivr,
            unreached,
            escalations,
            file: where_.to_owned(),
            warnings,
        })
    }
}

/// The text as TOML of the file's shape. A syntax error says where (the line) and why, with numbers
/// masked: the parser's own message quotes the offending line, which may hold a phone number.
fn read_toml(text: &str, where_: &str) -> Result<File, Vec<String>> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        vec![format!(
            "{where_}: not valid TOML{at}: {}",
            crate::domain::mask_numbers(e.message())
        )]
    })
}

/// Validates the `[[contact]]` entries: each has a name of its own, a number that parses, known
/// channels and a team; two entries sharing a number are a warning (each is notified once). Returns
/// the contacts whose number parsed, and every team an entry names, those of an entry with a bad
/// number included, so that a mistyped number is one error rather than one more per route that
/// names its teams.
fn check_contacts(
    raw: &[RawContact],
    where_: &str,
    default_region: phonenumber::country::Id,
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> (Vec<Contact>, BTreeSet<String>) {
    let mut contacts = Vec::new();
    let mut teams: BTreeSet<String> = BTreeSet::new();
    let mut seen_phones: HashMap<String, String> = HashMap::new();
    let mut seen_names: HashMap<String, String> = HashMap::new();
    for (i, raw) in raw.iter().enumerate() {
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
        let channels = contact_channels(raw.channels.as_deref(), &entry, errors);
        if raw.teams.is_empty() {
            errors.push(format!("{entry}: is in no team, so no route can reach it"));
        }
        check_name_is_new(&mut seen_names, i, raw, phone.as_ref(), where_, errors);
        let member_of: Vec<String> = raw.teams.iter().map(|t| t.trim().to_owned()).collect();
        teams.extend(member_of.iter().cloned());
        let Some(phone) = phone else {
            continue;
        };
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
    (contacts, teams)
}

/// The channels a contact is reached on: all three when the entry leaves `channels` out, else those
/// it lists, each once, in its order. An empty list or an unknown channel is an error.
fn contact_channels(
    listed: Option<&[String]>,
    entry: &str,
    errors: &mut Vec<String>,
) -> Vec<Channel> {
    let mut channels = Vec::new();
    match listed {
        None => channels.extend(Channel::ALL),
        Some([]) => errors.push(format!(
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
    channels
}

/// Refuses contact `i` when an earlier entry has its name. Names are identities: an acknowledgement
/// is told to everyone alerted but the contact who gave it, a drill and a schedule name their
/// contact, each by name. Two entries of one name (compared as a drill looks them up: trimmed,
/// case-insensitive) would be one contact to all of these. `seen` maps each lower-cased name to the
/// first entry of that name, as the error names it.
fn check_name_is_new(
    seen: &mut HashMap<String, String>,
    i: usize,
    raw: &RawContact,
    phone: Option<&Phone>,
    where_: &str,
    errors: &mut Vec<String>,
) {
    let named = match phone {
        Some(p) => format!("contact[{i}] {:?} ({})", raw.name, p.masked()),
        None => format!("contact[{i}] {:?}", raw.name),
    };
    let key = raw.name.trim().to_lowercase();
    if key.is_empty() {
        return;
    }
    match seen.get(&key) {
        Some(first) => errors.push(format!(
            "{where_}: {named}: has the same name as {first}; give each contact a name \
             of its own (acknowledgements and drills tell contacts apart by name)"
        )),
        None => {
            seen.insert(key, named);
        }
    }
}

/// Validates `[routes]`: each route names a team, every team it names has contacts, and no type is
/// given twice (types match case-insensitively). Returns the routes by lower-cased type, each with
/// the type as the file spells it.
fn check_routes(
    raw: &BTreeMap<String, Vec<String>>,
    teams: &BTreeSet<String>,
    where_: &str,
    errors: &mut Vec<String>,
) -> HashMap<String, (String, Vec<String>)> {
    let mut routes = HashMap::new();
    for (ty, route_teams) in raw {
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
    routes
}

/// Unknown and missing emergency types take the default route, so the file must have one: a
/// `routes.default` entry, or a `default` escalation policy standing in for it.
fn check_default_route(
    routes: &HashMap<String, (String, Vec<String>)>,
    escalations: &HashMap<String, Escalation>,
    where_: &str,
    errors: &mut Vec<String>,
) {
    if !routes.contains_key(DEFAULT_ROUTE) && !escalations.contains_key(DEFAULT_ROUTE) {
        errors.push(format!(
            "{where_}: routes.default is missing; unknown or missing emergency types need it"
        ));
    }
}

/// Validates `[unreached]`: it names a team, and every team it names has contacts. Returns its
/// teams, trimmed.
fn check_unreached(
    raw: &RawUnreached,
    teams: &BTreeSet<String>,
    where_: &str,
    errors: &mut Vec<String>,
) -> Vec<String> {
    let entry = format!("{where_}: unreached.teams");
    if raw.teams.is_empty() {
        errors.push(format!(
            "{entry}: is empty; name the teams alarmed when nobody acknowledged"
        ));
    }
    for t in &raw.teams {
        if !teams.contains(t.trim()) {
            errors.push(format!("{entry}: team {t:?} has no contacts"));
        }
    }
    raw.teams.iter().map(|t| t.trim().to_owned()).collect()
}

/// A policy replaces its type's route: a team routed but in none of its tiers is not alerted, which
/// whoever added it to the route did not mean. Each such team is a warning.
fn warn_routed_teams_outside_their_policy(
    routes: &BTreeMap<String, Vec<String>>,
    escalations: &HashMap<String, Escalation>,
    where_: &str,
    warnings: &mut Vec<String>,
) {
    for (ty, route_teams) in routes {
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
}

/// A team on no route and in no tier is never alerted: a warning, unless `[unreached]` names it (a
/// team that is only alarmed, a duty manager, is on no route on purpose).
fn warn_unrouted_teams(
    teams: &BTreeSet<String>,
    routes: &BTreeMap<String, Vec<String>>,
    escalations: &HashMap<String, Escalation>,
    unreached: Option<&[String]>,
    where_: &str,
    warnings: &mut Vec<String>,
) {
    for team in teams {
        let alarmed = unreached.is_some_and(|u| u.contains(team));
        let routed = routes.values().flatten().any(|t| t.trim() == team)
            || escalations
                .values()
                .any(|p| p.tiers.iter().flatten().any(|t| t == team));
        if !routed && !alarmed {
            warnings.push(format!("{where_}: team {team:?} is on no route"));
        }
    }
}

/// Validates `[ivr]`: each key is the digits pressed (`0`-`9`, `*`, `#`); a type with no route or
/// policy of its own is a warning, as its callers get the default route. Returns the emergency type
/// by digits, both trimmed.
fn check_ivr(
    raw: &BTreeMap<String, String>,
    routes: &HashMap<String, (String, Vec<String>)>,
    escalations: &HashMap<String, Escalation>,
    where_: &str,
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> HashMap<String, String> {
    let mut ivr = HashMap::new();
    for (digit, ty) in raw {
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
    ivr
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
