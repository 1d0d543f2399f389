//! Escalation policies: tiers of teams alerted one after another until someone acknowledges. Each
//! `[[escalation]]` entry of the file is validated here, and every policy is checked against what the
//! settings allow (ring time, `ack.deadline`).

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::describe::human_secs;
use super::Routing;

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

/// An escalation policy: tiers of teams alerted one after another until someone acknowledges.
/// Stored with each incident (as JSON) when it is raised, so a later edit of the file never changes
/// an incident already under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escalation {
    /// The emergency type it covers, as the file spells it (`default` for the default route).
    #[serde(rename = "type")]
    pub emergency_type: String,
    /// Teams per tier, in order; never empty, and no tier is empty.
    pub tiers: Vec<Vec<String>>,
    /// Time to acknowledge before the next tier is alerted, seconds (above zero).
    pub wait_secs: u64,
    /// Passes through the whole policy after the first.
    pub repeat: u32,
}

impl Escalation {
    /// How long from the incident until the last tier's wait in the last pass has run out, seconds.
    pub fn total_secs(&self) -> u64 {
        (self.tiers.len() as u64)
            .saturating_mul(self.wait_secs)
            .saturating_mul(u64::from(self.repeat) + 1)
    }

    /// When, after the incident arrived, tier `tier` of pass `run` is alerted, milliseconds.
    pub fn offset_ms(&self, run: u32, tier: u32) -> i64 {
        let steps = u64::from(run)
            .saturating_mul(self.tiers.len() as u64)
            .saturating_add(u64::from(tier));
        i64::try_from(steps.saturating_mul(self.wait_secs).saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// When nobody having acknowledged makes the incident unreached, seconds after it arrived: the
    /// end of the policy, or `ack_deadline_secs` when that comes first.
    pub fn unreached_after_secs(&self, ack_deadline_secs: u64) -> u64 {
        self.total_secs().min(ack_deadline_secs)
    }
}

/// Passes through a policy at most: each pass stores a call per contact of every tier, so a typo such
/// as `repeat = 100` would otherwise store thousands of calls with one incident.
pub const MAX_REPEAT: i64 = 20;
/// The longest `wait` accepted: a tier left waiting longer is no longer an escalation.
pub const MAX_WAIT_SECS: u64 = 86_400;
/// What a call needs beyond its ring time before the next tier may be alerted: Exotel places it (the
/// request is synchronous, and can take tens of seconds), the greeting plays, the keypress is
/// gathered and reported.
pub const CALL_MARGIN_SECS: u64 = 30;

/// What the settings say that a policy must fit in: checked at start, on reload and by `check-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EscalationBounds {
    /// `exotel.ring_timeout_secs`.
    pub ring_timeout_secs: u64,
    /// `ack.deadline`, seconds.
    pub ack_deadline_secs: u64,
}

impl EscalationBounds {
    /// The bounds the settings set.
    pub fn of(settings: &crate::settings::Settings) -> Self {
        EscalationBounds {
            ring_timeout_secs: settings.exotel.ring_timeout_secs,
            ack_deadline_secs: settings.ack.deadline_secs(),
        }
    }

    /// How long a call may take from its request to its keypress: its ring time and the margin to
    /// place it and hear the keypress. Another call to the same phone waits at most this long.
    pub fn call_window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.ring_timeout_secs.saturating_add(CALL_MARGIN_SECS))
    }
}

impl Routing {
    /// The checks that need the settings: each policy's `wait` must leave a call time to ring and be
    /// answered before the next tier is alerted or the incident is called unreached (an error: the
    /// next tier would be woken while the first one's phones still ring), and a policy longer than
    /// `ack.deadline` is a warning (allowed: the incident is marked unreached at the deadline and the
    /// escalation goes on to its end, but the alarm then sounds before the last tiers were tried).
    /// Returns (errors, warnings), each naming the file and the policy.
    pub fn check_escalation(&self, bounds: &EscalationBounds) -> (Vec<String>, Vec<String>) {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let shortest = bounds.ring_timeout_secs.saturating_add(CALL_MARGIN_SECS);
        for policy in self.policies() {
            let entry = format!("{}: escalation {:?}", self.file, policy.emergency_type);
            if policy.wait_secs < shortest {
                errors.push(format!(
                    "{entry}: wait {} is shorter than a call needs to ring and be answered ({}: \
                     exotel.ring_timeout_secs {} + {CALL_MARGIN_SECS}s to place it and hear the keypress)",
                    human_secs(policy.wait_secs),
                    human_secs(shortest),
                    bounds.ring_timeout_secs
                ));
            }
            if policy.total_secs() > bounds.ack_deadline_secs {
                warnings.push(format!(
                    "{entry}: lasts {} (tiers × wait × passes), longer than ack.deadline {}: the \
                     incident is marked unreached at {} while the later tiers are still to be alerted",
                    human_secs(policy.total_secs()),
                    human_secs(bounds.ack_deadline_secs),
                    human_secs(bounds.ack_deadline_secs)
                ));
            }
        }
        (errors, warnings)
    }

    /// Every escalation policy, by type.
    pub(super) fn policies(&self) -> Vec<&Escalation> {
        let mut all: Vec<&Escalation> = self.escalations.values().collect();
        all.sort_by_key(|p| p.emergency_type.to_lowercase());
        all
    }
}

/// Validates the `[[escalation]]` entries, every problem into `errors`, each naming the file and
/// the entry; the valid policies by lower-cased type.
pub(super) fn escalations(
    raw: &[RawEscalation],
    teams: &BTreeSet<String>,
    where_: &str,
    errors: &mut Vec<String>,
) -> HashMap<String, Escalation> {
    let mut out = HashMap::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for (i, p) in raw.iter().enumerate() {
        let entry = format!("{where_}: escalation[{i}] {:?}", p.ty);
        let before = errors.len();
        let ty = p.ty.trim();
        if ty.is_empty() {
            errors.push(format!("{entry}: type is empty"));
        }
        let tiers = check_tiers(&p.tiers, teams, &entry, errors);
        let wait_secs = check_wait(&p.wait, &entry, errors);
        let repeat = check_repeat(p.repeat, &entry, errors);
        let key = ty.to_lowercase();
        if !key.is_empty() && !seen.insert(key.clone()) {
            errors.push(format!(
                "{entry}: defined twice (types match case-insensitively)"
            ));
            continue;
        }
        if errors.len() > before {
            continue;
        }
        let (Some(wait_secs), Some(repeat)) = (wait_secs, repeat) else {
            continue;
        };
        out.insert(
            key,
            Escalation {
                emergency_type: ty.to_owned(),
                tiers,
                wait_secs,
                repeat,
            },
        );
    }
    out
}

/// Checks a policy's tiers: there is one at least, none is empty, and every team in them has
/// contacts. Returns the tiers with each team's name trimmed.
fn check_tiers(
    tiers: &[Vec<String>],
    teams: &BTreeSet<String>,
    entry: &str,
    errors: &mut Vec<String>,
) -> Vec<Vec<String>> {
    if tiers.is_empty() {
        errors.push(format!(
            "{entry}: tiers is empty (give at least one tier of teams)"
        ));
    }
    for (j, tier) in tiers.iter().enumerate() {
        if tier.is_empty() {
            errors.push(format!("{entry}: tier {} is empty", j + 1));
        }
        for t in tier {
            if !teams.contains(t.trim()) {
                errors.push(format!(
                    "{entry}: tier {}: team {t:?} has no contacts",
                    j + 1
                ));
            }
        }
    }
    tiers
        .iter()
        .map(|t| t.iter().map(|team| team.trim().to_owned()).collect())
        .collect()
}

/// Checks a policy's `wait`: a duration above zero and at most [`MAX_WAIT_SECS`]. Returns it in
/// seconds when it is both.
fn check_wait(wait: &str, entry: &str, errors: &mut Vec<String>) -> Option<u64> {
    match crate::settings::parse_duration_secs(wait) {
        None => {
            errors.push(format!(
                "{entry}: wait {wait:?} is not a duration above zero (90s, 2m, 1h)"
            ));
            None
        }
        Some(secs) if secs > MAX_WAIT_SECS => {
            errors.push(format!(
                "{entry}: wait {wait:?} is longer than {}",
                human_secs(MAX_WAIT_SECS)
            ));
            None
        }
        Some(secs) => Some(secs),
    }
}

/// Checks a policy's `repeat`: from 0 to [`MAX_REPEAT`]. Returns it when it is.
fn check_repeat(repeat: i64, entry: &str, errors: &mut Vec<String>) -> Option<u32> {
    if repeat < 0 {
        errors.push(format!(
            "{entry}: repeat {repeat} is negative (0: no repeat)"
        ));
        None
    } else if repeat > MAX_REPEAT {
        errors.push(format!(
            "{entry}: repeat {repeat} is more than {MAX_REPEAT}"
        ));
        None
    } else {
        u32::try_from(repeat).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stakeholders::fixtures::{escalating, india, ESCALATING};

    #[test]
    fn every_policy_problem_is_reported_with_file_and_entry() {
        let bad = r#"
[[contact]]
name = "A"
phone = "+919800000001"
teams = ["desk"]

[routes]
default = ["desk"]

[[escalation]]
type = "Heart"
tiers = [["desk"], [], ["nobody"]]
wait = "0s"
repeat = -1

[[escalation]]
type = "heart"
tiers = [["desk"]]
wait = "2m"

[[escalation]]
type = "Brain"
tiers = []
wait = "soon"

[[escalation]]
type = "Lungs"
tiers = [["desk"]]
wait = "2m"
repeat = 500
"#;
        let errs = Routing::parse(bad, "s.toml", india()).unwrap_err();
        let all = errs.join("\n");
        for needle in [
            "escalation[0] \"Heart\": tier 2 is empty",
            "escalation[0] \"Heart\": tier 3: team \"nobody\" has no contacts",
            "escalation[0] \"Heart\": wait \"0s\" is not a duration above zero",
            "escalation[0] \"Heart\": repeat -1 is negative",
            "escalation[1] \"heart\": defined twice",
            "escalation[2] \"Brain\": tiers is empty",
            "escalation[2] \"Brain\": wait \"soon\" is not a duration",
            "escalation[3] \"Lungs\": repeat 500 is more than 20",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(errs.iter().all(|e| e.starts_with("s.toml: ")));
        let unknown_key = "[[contact]]\nname = \"A\"\nphone = \"+919800000001\"\nteams = [\"d\"]\n\
            [routes]\ndefault = [\"d\"]\n[[escalation]]\ntype = \"X\"\ntiers = [[\"d\"]]\nwait = \"2m\"\nwiat = 1\n";
        assert!(Routing::parse(unknown_key, "s.toml", india()).is_err());
    }

    #[test]
    fn settings_checks_refuse_a_short_wait_and_warn_of_a_policy_past_the_deadline() {
        let r = escalating();
        let bounds = EscalationBounds {
            ring_timeout_secs: 30,
            ack_deadline_secs: 600,
        };
        let (errors, warnings) = r.check_escalation(&bounds);
        // default's 1m wait is exactly the 30 s ring time and the 30 s margin: allowed.
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("escalation \"Heart\": lasts 12m")
                && warnings[0].contains("ack.deadline 10m"),
            "{warnings:?}"
        );
        let slow_ring = EscalationBounds {
            ring_timeout_secs: 45,
            ack_deadline_secs: 900,
        };
        let (errors, _) = r.check_escalation(&slow_ring);
        let all = errors.join("\n");
        assert_eq!(errors.len(), 1, "{all}");
        assert!(
            all.starts_with("s.toml: escalation \"default\": wait 1m is shorter than"),
            "{all}"
        );
        assert_eq!(
            r.describe_escalation(900),
            "default: emergency-desk → surgery, every 1m, repeat 0 (unreached after 2m)\n\
             Heart: cardiology → emergency-desk → lab, every 2m, repeat 1 (unreached after 12m)\n\
             Trauma: surgery → emergency-desk, every 90s, repeat 0 (unreached after 3m)\n"
        );
        assert!(r
            .describe()
            .contains("Heart -> cardiology → emergency-desk → lab"));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let narrower = ESCALATING.replace(
            "Heart = [\"cardiology\"]",
            "Heart = [\"cardiology\", \"surgery\"]",
        );
        let r = Routing::parse(&narrower, "s.toml", india()).unwrap();
        assert!(
            r.warnings
                .iter()
                .any(|w| w.starts_with("s.toml: routes.Heart: team \"surgery\" is in no tier")),
            "{:?}",
            r.warnings
        );
    }
}
