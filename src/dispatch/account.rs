//! Account alarms seen by the dispatcher: a provider answer that means every later request of its lane
//! will fail too raises one alarm per lane and reason; the lane's next success clears it.

use std::collections::HashSet;
use std::sync::Mutex;

use super::{Dispatcher, Lane};
use crate::providers::{AccountProblem, Answer};
use crate::store::alarms::AccountAlarm;

/// The lanes that may have an account alarm open. Every lane starts in it, so the first success of
/// each lane after a start clears whatever an earlier run (or another replica) left open; after that
/// a success costs no write.
#[derive(Debug)]
pub struct AccountWatch {
    suspect: Mutex<HashSet<String>>,
    /// (lane, reason) raised (or found raised) by this process since the lane last succeeded: a storm
    /// of refused requests then costs no write each.
    raised: Mutex<HashSet<(String, &'static str)>>,
}

impl AccountWatch {
    pub fn new<'a>(lanes: impl Iterator<Item = &'a str>) -> Self {
        AccountWatch {
            suspect: Mutex::new(lanes.map(str::to_owned).collect()),
            raised: Mutex::default(),
        }
    }

    /// True the first time (lane, reason) is seen since the lane last succeeded.
    fn first(&self, lane: &str, reason: &'static str) -> bool {
        self.raised
            .lock()
            .map_or(true, |mut r| r.insert((lane.to_owned(), reason)))
    }

    fn forget(&self, lane: &str) {
        if let Ok(mut r) = self.raised.lock() {
            r.retain(|(l, _)| l != lane);
        }
    }

    fn suspect(&self, lane: &str) {
        if let Ok(mut s) = self.suspect.lock() {
            s.insert(lane.to_owned());
        }
    }

    /// True once per lane in the set: the caller clears its alarms.
    fn take(&self, lane: &str) -> bool {
        self.suspect.lock().is_ok_and(|mut s| s.remove(lane))
    }
}

impl Dispatcher {
    /// Reads one provider answer for account trouble: raises the alarm (once per lane and reason,
    /// across replicas: the alarm's dedup key is unique), or, on success, clears the lane's alarms.
    /// Never fails the delivery: a failure to record the alarm is logged.
    pub(super) async fn watch_account(&self, lane: &Lane, answer: &Answer, accepted: bool) {
        if accepted {
            if self.account.take(lane.name()) {
                self.account.forget(lane.name());
                match self.store.clear_account_alarms(lane.name()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        lane = lane.name(),
                        alarms = n,
                        "the provider accepts requests again: account alarm cleared"
                    ),
                    Err(e) => {
                        // Tried again at the next success.
                        self.account.suspect(lane.name());
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "could not clear the account alarm"
                        );
                    }
                }
            }
            return;
        }
        let Some(problem) = lane.client().account_problem(answer) else {
            return;
        };
        self.account.suspect(lane.name());
        if !self.account.first(lane.name(), problem.reason) {
            return;
        }
        let alarm = account_alarm(
            lane.name(),
            &problem,
            self.settings.public_base(),
            self.store.now_ms(),
        );
        let webhook = !self.settings.alarms.webhook_url.trim().is_empty();
        match self.store.raise_account_alarm(&alarm, webhook).await {
            Ok(true) => {
                self.metrics.account_alarm(lane.name(), problem.reason);
                tracing::error!(
                    lane = lane.name(),
                    reason = problem.reason,
                    detail = %crate::domain::mask_numbers(&problem.detail),
                    "ACCOUNT ALARM: the provider refuses this account; every later alert on this lane will fail too"
                );
            }
            Ok(false) => {}
            Err(e) => {
                // Not recorded: the next refused request tries again.
                self.account.forget(lane.name());
                tracing::error!(
                    error = format!("{e:#}"),
                    lane = lane.name(),
                    reason = problem.reason,
                    "could not record the account alarm"
                );
            }
        }
    }
}

/// The alarm for `problem` on `lane`, with the webhook's JSON.
pub fn account_alarm(lane: &str, problem: &AccountProblem, base: &str, now: i64) -> AccountAlarm {
    let detail = crate::domain::mask_numbers(&problem.detail);
    let summary = format!(
        "{lane} refuses this account ({}): every later alert on it will fail too. {detail}",
        problem.reason
    );
    let body = serde_json::json!({
        "type": "account",
        "kind": "account",
        "lane": lane,
        "reason": problem.reason,
        "summary": summary,
        "detail": detail,
        "raised_at": now,
        "readyz": format!("{base}/readyz"),
        "api": format!("{base}/api/v1/alarms"),
    });
    AccountAlarm {
        lane: lane.to_owned(),
        reason: problem.reason.to_owned(),
        summary,
        body,
    }
}
