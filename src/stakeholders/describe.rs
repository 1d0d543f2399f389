//! How the routing reads to the people who run it: the table and escalation lines `check-config`
//! prints, numbers masked, and the warnings start-up and `check-config` give about the file.

use std::collections::{BTreeMap, BTreeSet};

use super::{Escalation, Routing};

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

impl Escalation {
    /// `cardiology → emergency-desk → lab, every 2m, repeat 1`.
    pub fn summary(&self) -> String {
        let tiers: Vec<String> = self.tiers.iter().map(|t| t.join(" + ")).collect();
        format!(
            "{}, every {}, repeat {}",
            tiers.join(" → "),
            human_secs(self.wait_secs),
            self.repeat
        )
    }
}

impl Routing {
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
            self.describe_route(key, &mut out);
        }
        self.describe_unreached(&mut out);
        self.describe_ivr(&mut out);
        out
    }

    /// One route (`key`, lower-cased): its type as the file spells it and its teams (tiers, with a
    /// policy), then each contact it reaches with their masked number and channels.
    fn describe_route(&self, key: &str, out: &mut String) {
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
            (None, None) => key.to_owned(),
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

    /// The `[unreached]` teams and each contact they alarm, as a route is shown; nothing without
    /// the table.
    fn describe_unreached(&self, out: &mut String) {
        let (Some(teams), Some(plan)) = (&self.unreached, self.unreached_plan()) else {
            return;
        };
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

    /// The `[ivr]` digits and their emergency types, in digit order; nothing without the table.
    fn describe_ivr(&self, out: &mut String) {
        if self.ivr.is_empty() {
            return;
        }
        out.push_str("IVR digits:\n");
        let mut digits: Vec<(&String, &String)> = self.ivr.iter().collect();
        digits.sort();
        for (d, t) in digits {
            out.push_str(&format!("    {d} -> {t}\n"));
        }
    }
}
