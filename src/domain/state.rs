//! The lifecycle of a delivery and of an incident: every state either can be in, and the moves allowed
//! between them, written down once. The database holds the same vocabulary in lookup tables
//! (`delivery_states`, `incident_states`, `delivery_transitions`), filled from these tables when the
//! store migrates, and refuses any status or status change they do not list: a bug that would move a
//! delivery backwards fails loudly instead of paging someone twice or never.

use std::fmt;

/// Where one delivery (one contact, one channel) stands.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting until its due time.
    Queued,
    /// Held back by a cap (a contact's or a route's limit) until released.
    Held,
    /// Leased by a dispatcher; a provider request may be in flight.
    Sending,
    /// The provider took the request; a call or SMS now waits for its report.
    Accepted,
    /// A call was picked up, but nobody pressed the acknowledge key (voicemail answers calls too).
    Answered,
    /// The contact acknowledged the alert (keypress, link or operator).
    Acknowledged,
    /// Reached: the provider reports delivery (for a call: answered, while acknowledgement is off).
    Delivered,
    /// Read receipt (WhatsApp).
    Read,
    /// No report came in time and none could be looked up; a late report can still settle it.
    Unconfirmed,
    /// Will not be sent again: refused, undeliverable, or out of attempts.
    Failed,
    /// Dry-run: the request that would have gone out is stored, nothing was sent.
    Simulated,
    /// Not sent: its incident was resolved (or acknowledged) first.
    Cancelled,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 12] = [
        DeliveryState::Queued,
        DeliveryState::Held,
        DeliveryState::Sending,
        DeliveryState::Accepted,
        DeliveryState::Answered,
        DeliveryState::Acknowledged,
        DeliveryState::Delivered,
        DeliveryState::Read,
        DeliveryState::Unconfirmed,
        DeliveryState::Failed,
        DeliveryState::Simulated,
        DeliveryState::Cancelled,
    ];

    /// The name stored in the database and shown by the API. A call answered while acknowledgement is
    /// off keeps the name `delivered`, as before the lifecycle had an `answered` state.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Queued => "queued",
            DeliveryState::Held => "held",
            DeliveryState::Sending => "sending",
            DeliveryState::Accepted => "accepted",
            DeliveryState::Answered => "answered",
            DeliveryState::Acknowledged => "acknowledged",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Read => "read",
            DeliveryState::Unconfirmed => "unconfirmed",
            DeliveryState::Failed => "failed",
            DeliveryState::Simulated => "simulated",
            DeliveryState::Cancelled => "cancelled",
        }
    }

    /// No further attempt will be made: the "delivery finished" metric counts a delivery when it first
    /// reaches one of these. A late provider report may still correct a final state (a call given up as
    /// unreached that turns out answered), but nothing is sent again because of it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeliveryState::Acknowledged
                | DeliveryState::Delivered
                | DeliveryState::Read
                | DeliveryState::Unconfirmed
                | DeliveryState::Failed
                | DeliveryState::Simulated
                | DeliveryState::Cancelled
        )
    }

    /// Will not change by itself: final, or a call picked up without the keypress (which changes only
    /// if someone acts). What a fire drill waits for.
    pub fn is_settled(self) -> bool {
        self.is_final() || self == DeliveryState::Answered
    }

    /// The contact's phone got it: delivered, read, picked up or acknowledged.
    pub fn reached_phone(self) -> bool {
        matches!(
            self,
            DeliveryState::Delivered
                | DeliveryState::Read
                | DeliveryState::Acknowledged
                | DeliveryState::Answered
        )
    }

    /// Final for a provider that sends no report after accepting (so acceptance is as far as can be
    /// seen), or final in itself.
    pub fn ends_delivery(self, provider_reports: bool) -> bool {
        self.is_final() || (self == DeliveryState::Accepted && !provider_reports)
    }

    /// The states this one may move to. A move to the same state (a progress report) is not a move.
    pub fn next(self) -> &'static [DeliveryState] {
        use DeliveryState::*;
        match self {
            // A redial waiting in the queue can still be settled by the previous call's late report.
            Queued => &[Sending, Held, Cancelled, Delivered, Answered, Acknowledged],
            // A held redial, like a queued one, is settled by the previous call's late keypress.
            Held => &[Queued, Cancelled, Acknowledged],
            // Retry, requeue, lease expiry and release all go back to `queued`. `held`: the claim
            // found the number at the carrier-safe cap, so the call is not placed (yet).
            Sending => &[Queued, Held, Accepted, Simulated, Failed, Cancelled],
            // `queued` again is a redial: a new try, not a step back.
            Accepted => &[
                Queued,
                Answered,
                Acknowledged,
                Delivered,
                Read,
                Unconfirmed,
                Failed,
                Cancelled,
            ],
            Answered => &[Acknowledged, Queued, Failed, Cancelled],
            Delivered => &[Read, Acknowledged],
            Read => &[Acknowledged],
            // A late report is the truth and beats the guess made when none came.
            Unconfirmed => &[Delivered, Read, Answered, Acknowledged, Failed],
            Failed => &[Delivered, Read, Answered, Acknowledged],
            Acknowledged | Simulated | Cancelled => &[],
        }
    }

    /// Whether moving from `self` to `to` is allowed (staying put always is).
    pub fn may_become(self, to: DeliveryState) -> bool {
        self == to || self.next().contains(&to)
    }

    /// Every allowed move, for the database's transition table.
    pub fn transitions() -> impl Iterator<Item = (DeliveryState, DeliveryState)> {
        Self::ALL
            .into_iter()
            .flat_map(|from| from.next().iter().map(move |to| (from, *to)))
    }
}

/// What to do with a call that was not reached: redial after `delay`, at most `max_redials` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedialPolicy {
    pub delay: std::time::Duration,
    pub max_redials: u32,
    /// Acknowledgement by keypress is on: a call answered without the keypress is `answered`, not
    /// reached (a voicemail box answers calls too), and is redialled like an unanswered one.
    pub keypress: bool,
}

/// Where one incident stands. Whether anybody was reached is not a state but a flag with a time
/// (`unreached_at`) on an open or acknowledged incident.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum IncidentState {
    /// Alerts are going out.
    Open,
    /// A person acknowledged it; notices still go out, escalation stops.
    Acknowledged,
    /// Over: nothing more is sent; its dedup key is free again.
    Resolved,
}

impl IncidentState {
    pub const ALL: [IncidentState; 3] = [
        IncidentState::Open,
        IncidentState::Acknowledged,
        IncidentState::Resolved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IncidentState::Open => "open",
            IncidentState::Acknowledged => "acknowledged",
            IncidentState::Resolved => "resolved",
        }
    }

    /// The states this one may move to.
    pub fn next(self) -> &'static [IncidentState] {
        match self {
            IncidentState::Open => &[IncidentState::Acknowledged, IncidentState::Resolved],
            IncidentState::Acknowledged => &[IncidentState::Resolved],
            IncidentState::Resolved => &[],
        }
    }

    /// Every allowed move, for the database's transition table.
    pub fn transitions() -> impl Iterator<Item = (IncidentState, IncidentState)> {
        Self::ALL
            .into_iter()
            .flat_map(|from| from.next().iter().map(move |to| (from, *to)))
    }

    /// Deliveries of an incident in this state may still be sent.
    pub fn sends(self) -> bool {
        self != IncidentState::Resolved
    }
}

/// A state name the vocabulary does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownState(pub String);

impl fmt::Display for UnknownState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown state {:?}", self.0)
    }
}

impl std::error::Error for UnknownState {}

macro_rules! named_states {
    ($t:ty) => {
        impl ::std::str::FromStr for $t {
            type Err = $crate::domain::state::UnknownState;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <$t>::ALL
                    .into_iter()
                    .find(|state| state.as_str() == s)
                    .ok_or_else(|| $crate::domain::state::UnknownState(s.to_owned()))
            }
        }

        /// For rows decoded from the database (`#[sqlx(try_from = "String")]`).
        impl TryFrom<String> for $t {
            type Error = $crate::domain::state::UnknownState;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}
pub(crate) use named_states;

named_states!(DeliveryState);
named_states!(IncidentState);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in DeliveryState::ALL {
            assert_eq!(s.as_str().parse::<DeliveryState>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        for s in IncidentState::ALL {
            assert_eq!(s.as_str().parse::<IncidentState>(), Ok(s));
        }
        assert!("delivred".parse::<DeliveryState>().is_err());
    }

    #[test]
    fn final_states_are_never_sent_again() {
        use DeliveryState::*;
        for s in DeliveryState::ALL.into_iter().filter(|s| s.is_final()) {
            assert!(
                !s.may_become(Sending) && !s.may_become(Queued),
                "{s} is final but could be sent again"
            );
        }
        // Nothing is ever sent twice by the same lease, and a dry-run never becomes real.
        assert!(!Simulated.may_become(Delivered));
        assert!(!Cancelled.may_become(Queued));
    }

    #[test]
    fn every_state_is_reachable_from_queued() {
        let mut seen = vec![DeliveryState::Queued];
        let mut i = 0;
        while i < seen.len() {
            for next in seen[i].next() {
                if !seen.contains(next) {
                    seen.push(*next);
                }
            }
            i += 1;
        }
        for s in DeliveryState::ALL {
            assert!(seen.contains(&s), "{s} cannot be reached");
        }
    }

    #[test]
    fn whatsapp_acceptance_ends_a_delivery_only_without_reports() {
        assert!(DeliveryState::Accepted.ends_delivery(false));
        assert!(!DeliveryState::Accepted.ends_delivery(true));
        assert!(DeliveryState::Delivered.ends_delivery(true));
    }
}
