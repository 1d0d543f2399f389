//! Account alarms seen by the dispatcher: a provider answer that means every later request will fail
//! too raises one alarm per provider account (credentials, balance: Exotel's calls and SMS share
//! them) or per lane (a DLT block of the SMS lane) and reason; the next accepted request of the
//! account clears what it disproves.

use std::collections::HashSet;
use std::sync::Mutex;

use super::{Dispatcher, Lane};
use crate::providers::{AccountProblem, Answer, Prepared};
use crate::store::alarms::{AccountAlarm, Raised};

/// The scopes (lanes and provider accounts) that may have an account alarm open. Every one starts in
/// it, so the first success of each lane after a start clears whatever an earlier run (or another
/// replica) left open; after that a success costs no write.
#[derive(Debug)]
pub struct AccountWatch {
    suspect: Mutex<HashSet<String>>,
    /// (scope, alarm key) raised (or found raised) by this process since the scope last succeeded: a
    /// storm of refused requests then costs no write each. DLT blocks are not kept here: they are
    /// cleared by status reports, which this set never hears of.
    raised: Mutex<HashSet<(String, String)>>,
}

impl AccountWatch {
    /// Every scope given (lane names and provider accounts) starts suspect.
    pub fn new<'a>(scopes: impl Iterator<Item = &'a str>) -> Self {
        AccountWatch {
            suspect: Mutex::new(scopes.map(str::to_owned).collect()),
            raised: Mutex::default(),
        }
    }

    /// True the first time `key` is seen since its scope last succeeded.
    fn first(&self, scope: &str, key: &str) -> bool {
        self.raised
            .lock()
            .map_or(true, |mut r| r.insert((scope.to_owned(), key.to_owned())))
    }

    fn forget(&self, scope: &str) {
        if let Ok(mut r) = self.raised.lock() {
            r.retain(|(s, _)| s != scope);
        }
    }

    fn forget_key(&self, key: &str) {
        if let Ok(mut r) = self.raised.lock() {
            r.retain(|(_, k)| k != key);
        }
    }

    fn suspect(&self, scope: &str) {
        if let Ok(mut s) = self.suspect.lock() {
            s.insert(scope.to_owned());
        }
    }

    /// True once per scope in the set: the caller clears its alarms.
    fn take(&self, scope: &str) -> bool {
        self.suspect.lock().is_ok_and(|mut s| s.remove(scope))
    }
}

/// Whether the reason is shared by every lane of a provider account (its credentials, its balance),
/// rather than one lane's own (a DLT block concerns the SMS lane only).
pub fn account_wide(reason: &str) -> bool {
    matches!(reason, "auth" | "payment" | "credit" | "pack_expired")
}

/// Whether the reason is a DLT block, which only a delivered SMS disproves.
pub fn is_dlt(reason: &str) -> bool {
    reason.starts_with("dlt_")
}

impl Dispatcher {
    /// Reads one provider answer for account trouble: raises the alarm (once per key, across
    /// replicas: the alarm's dedup key is unique), even on an accepted answer that carries a DLT block
    /// code, or, on success, clears the alarms the success disproves. Never fails the delivery: a
    /// failure to record the alarm is logged.
    pub(super) async fn watch_account(
        &self,
        lane: &Lane,
        prepared: &Prepared,
        answer: &Answer,
        accepted: bool,
    ) {
        let account = lane.provider.account.as_str();
        let Some(problem) = lane.client().account_problem(answer) else {
            if accepted {
                self.clear_disproved(lane.name(), account).await;
            }
            return;
        };
        let template = prepared
            .form
            .iter()
            .find(|(k, _)| k == "DltTemplateId")
            .map(|(_, v)| v.as_str());
        let alarm = account_alarm(
            lane.name(),
            account,
            &problem,
            template,
            self.settings.public_base(),
            self.store.now_ms(),
        );
        self.account.suspect(&alarm.lane);
        if !is_dlt(problem.reason) && !self.account.first(&alarm.lane, &alarm.key) {
            return;
        }
        let webhook = !self.settings.alarms.webhook_url.trim().is_empty();
        match self.store.raise_account_alarm(&alarm, webhook).await {
            Ok(raised @ (Raised::Paged | Raised::CooledDown)) => {
                self.metrics.account_alarm(&alarm.lane, problem.reason);
                tracing::error!(
                    scope = %alarm.lane,
                    lane = lane.name(),
                    reason = problem.reason,
                    paged = raised == Raised::Paged,
                    detail = %crate::domain::mask_numbers(&problem.detail),
                    "ACCOUNT ALARM: the provider refuses this account; every later alert through it will fail too"
                );
            }
            Ok(Raised::AlreadyOpen) => {}
            Err(e) => {
                // Not recorded: the next refused request tries again.
                self.account.forget_key(&alarm.key);
                tracing::error!(
                    error = format!("{e:#}"),
                    lane = lane.name(),
                    reason = problem.reason,
                    "could not record the account alarm"
                );
            }
        }
    }

    /// An accepted request: clears the alarms of its lane and provider account it disproves, once
    /// per scope that may have one open.
    async fn clear_disproved(&self, lane: &str, account: &str) {
        let lane_suspect = self.account.take(lane);
        let account_suspect = self.account.take(account);
        if !lane_suspect && !account_suspect {
            return;
        }
        self.account.forget(lane);
        self.account.forget(account);
        match self.store.clear_account_alarms(lane, account).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                lane,
                account,
                alarms = n,
                "the provider accepts requests again: account alarm cleared"
            ),
            Err(e) => {
                // Tried again at the next success.
                if lane_suspect {
                    self.account.suspect(lane);
                }
                if account_suspect {
                    self.account.suspect(account);
                }
                tracing::warn!(
                    error = format!("{e:#}"),
                    "could not clear the account alarm"
                );
            }
        }
    }
}

/// The alarm for `problem` seen on `lane` of provider `account`, with the webhook's JSON: about the
/// whole account for what its lanes share, about the lane otherwise; a DLT template block names the
/// template (`template`, the `DltTemplateId` sent; `-` when none was).
pub fn account_alarm(
    lane: &str,
    account: &str,
    problem: &AccountProblem,
    template: Option<&str>,
    base: &str,
    now: i64,
) -> AccountAlarm {
    let scope = if account_wide(problem.reason) {
        account
    } else {
        lane
    };
    let template = template.map(str::trim).filter(|t| !t.is_empty());
    let key = match problem.reason {
        "dlt_template" => format!("{scope}:{}:{}", problem.reason, template.unwrap_or("-")),
        reason => format!("{scope}:{reason}"),
    };
    let detail = crate::domain::mask_numbers(&problem.detail);
    let detail = match (problem.reason, template) {
        ("dlt_template", Some(t)) => format!("{detail} (DLT template {t})"),
        _ => detail,
    };
    let summary = format!(
        "{scope} refuses this account ({}): every later alert through it will fail too. {detail}",
        problem.reason
    );
    let body = serde_json::json!({
        "type": "account",
        "kind": "account",
        "lane": scope,
        "seen_on": lane,
        "reason": problem.reason,
        "dlt_template_id": template.filter(|_| problem.reason == "dlt_template"),
        "summary": summary,
        "detail": detail,
        "raised_at": now,
        "readyz": format!("{base}/readyz"),
        "api": format!("{base}/api/v1/alarms"),
    });
    AccountAlarm {
        lane: scope.to_owned(),
        key,
        reason: problem.reason.to_owned(),
        summary,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(reason: &'static str) -> AccountProblem {
        AccountProblem {
            reason,
            detail: "x".to_owned(),
        }
    }

    #[test]
    fn credentials_alarm_the_account_a_dlt_block_the_lane_and_template() {
        let a = account_alarm("exotel:call", "exotel", &problem("auth"), None, "", 0);
        assert_eq!((a.lane.as_str(), a.key.as_str()), ("exotel", "exotel:auth"));
        let b = account_alarm("exotel:sms", "exotel", &problem("auth"), Some("77"), "", 0);
        assert_eq!(a.key, b.key, "calls and SMS share the credentials");
        let t = account_alarm(
            "exotel:sms",
            "exotel",
            &problem("dlt_template"),
            Some("77"),
            "",
            0,
        );
        assert_eq!(
            (t.lane.as_str(), t.key.as_str()),
            ("exotel:sms", "exotel:sms:dlt_template:77")
        );
        let s = account_alarm(
            "exotel:sms",
            "exotel",
            &problem("dlt_sender"),
            Some("77"),
            "",
            0,
        );
        assert_eq!(s.key, "exotel:sms:dlt_sender");
        let g = account_alarm(
            "gupshup:whatsapp",
            "gupshup",
            &problem("credit"),
            None,
            "",
            0,
        );
        assert_eq!(g.key, "gupshup:credit");
    }
}
