//! A provider's report on one request, in words of our own. Each provider module turns its status
//! callbacks and look-up answers into a [`Report`]; the store applies any report through one function,
//! so no provider's vocabulary ever reaches the store.

use super::Channel;

/// What a report says happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Still under way (queued, ringing, in progress, submitted to the operator): proof that the
    /// request is alive, nothing settled.
    Progress,
    /// A call was picked up.
    Answered,
    /// A call rang out, was busy, refused or failed to connect: not reached; redialled while redials
    /// remain.
    Unanswered { reason: String },
    /// A message reached the handset.
    Delivered,
    /// A message was read.
    Read,
    /// A message cannot be delivered (DND, bad number, template refused…).
    Failed {
        code: Option<String>,
        reason: String,
    },
}

/// One report, provider-neutral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub channel: Channel,
    /// The provider's id of the request reported on.
    pub provider_id: String,
    /// Our own reference, when the provider echoes it back (Exotel's CustomField): finds a delivery
    /// whose provider id was never recorded.
    pub reference: Option<String>,
    pub outcome: ReportOutcome,
    /// The provider's own status word, kept as it was said, for the audit trail.
    pub provider_status: String,
    /// The fields worth keeping in the audit trail.
    pub detail: String,
    /// What the report says of the account rather than the one request (a DLT block of the sender or
    /// the template), read by the provider module so an edge only passes it on to the alarms.
    pub account_problem: Option<AccountProblem>,
}

/// A provider answer that means the account, not the one request, is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountProblem {
    /// Short and stable (`auth`, `payment`, `credit`, `pack_expired`, `dlt_sender`, `dlt_template`):
    /// an alarm is raised once per lane and reason.
    pub reason: &'static str,
    /// What the provider said, for the alarm's summary.
    pub detail: String,
}

impl Report {
    /// The outcome's reason, for a failure or an unanswered call.
    pub fn reason(&self) -> Option<&str> {
        match &self.outcome {
            ReportOutcome::Unanswered { reason } | ReportOutcome::Failed { reason, .. } => {
                Some(reason)
            }
            _ => None,
        }
    }
}
