//! Exotel does not guarantee status callbacks: calls and SMS whose report is overdue are looked up in
//! its details API and the answer applied exactly as a callback would be. When no answer comes (no id
//! to look up, three look-ups without a status, or a provider with no look-up at all, as GupShup's
//! enterprise gateway) the report deadline has passed: the delivery ends visibly instead of waiting
//! forever.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use super::{Dispatcher, Lane};
use crate::domain::mask_numbers;
use crate::providers::{self, Outcome};
use crate::store::{CallbackEffect, DeliveryRow};

/// Look-ups made for one overdue report before its deadline is taken as passed.
const MAX_LOOKUPS: i64 = 3;
/// Overdue rows handled per lane and sweep.
const SWEEP_BATCH: i64 = 50;

impl Dispatcher {
    /// Sweeps every `report_wait / 4` (between 100 ms and 30 s) until shutdown.
    pub(super) async fn reconcile(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let wait = Duration::from_secs_f64(self.settings.dispatch.report_wait_secs);
        let every = (wait / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            // Only lanes whose requests get a report (all built-in lanes do).
            for lane in self.lanes.iter().filter(|l| l.live && l.reports_outcome()) {
                let overdue = match self
                    .store
                    .overdue_reports(lane.name(), wait, SWEEP_BATCH)
                    .await
                {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "listing overdue reports failed");
                        continue;
                    }
                };
                for d in overdue {
                    let span = tracing::info_span!("report_lookup", delivery_id = %d.id, incident_id = %d.incident_id, channel = %d.channel);
                    self.check_report(lane, &d).instrument(span).await;
                }
            }
        }
    }

    /// Looks one overdue report up, or gives up on it.
    async fn check_report(&self, lane: &Lane, d: &DeliveryRow) {
        let lookup = d
            .provider_id
            .as_deref()
            .and_then(|id| lane.client().status_lookup(id));
        let can_look_up = lookup.is_some();
        let Some(lookup) = lookup.filter(|_| d.report_checks <= MAX_LOOKUPS) else {
            let why = if d.provider_id.is_none() {
                "no status report, and no provider id to look it up".to_owned()
            } else if !can_look_up {
                format!(
                    "no status report within {:.0} s, and no look-up to ask",
                    self.settings.dispatch.report_wait_secs
                )
            } else {
                format!(
                    "no status report within {:.0} s, and {MAX_LOOKUPS} look-ups found none",
                    self.settings.dispatch.report_wait_secs * (MAX_LOOKUPS + 1) as f64
                )
            };
            self.give_up(lane, d, &why).await;
            return;
        };
        let answer = providers::fetch(&self.http, &lookup).await;
        let provider_id = d.provider_id.as_deref().unwrap_or_default();
        let found = match &answer {
            Ok(a) => lane.client().read_report(provider_id, a).ok_or_else(|| {
                format!(
                    "HTTP {}: {}",
                    a.status,
                    mask_numbers(&a.body.chars().take(200).collect::<String>())
                )
            }),
            Err(Outcome::Transient { reason, .. } | Outcome::Permanent { reason }) => {
                Err(reason.clone())
            }
            Err(Outcome::Accepted { .. }) => Err("unexpected answer".to_owned()),
        };
        let report = match found {
            Ok(report) => report,
            Err(why) => {
                tracing::warn!(why = %why, checks = d.report_checks, "overdue report: the details API gave no status");
                return;
            }
        };
        let applied = self
            .store
            .apply_report(&report, self.settings.redial_policy())
            .await;
        self.count_effect(lane, &applied);
        match applied {
            Ok(effect) => tracing::info!(
                status = %report.provider_status,
                effect = ?effect,
                "overdue report looked up"
            ),
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "applying a looked-up report failed"
            ),
        }
    }

    async fn give_up(&self, lane: &Lane, d: &DeliveryRow, why: &str) {
        let applied = self
            .store
            .report_deadline_passed(d, self.settings.redial_policy(), why)
            .await;
        self.count_effect(lane, &applied);
        match applied {
            Ok(effect) => tracing::warn!(why, effect = ?effect, "report deadline passed"),
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "ending an overdue delivery failed"
            ),
        }
    }

    fn count_effect(&self, lane: &Lane, applied: &anyhow::Result<CallbackEffect>) {
        if let Ok(CallbackEffect::Applied { from, to }) = applied {
            self.metrics
                .delivery_moved(lane.channel(), *from, *to, lane.reports_outcome());
        }
    }
}
