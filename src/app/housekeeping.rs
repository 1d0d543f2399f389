//! The tasks that run beside the requests: resolving incidents past their age, and deleting resolved
//! ones past the retention period.

use std::time::Duration;

use super::incidents::resolve;
use super::AppState;

/// Resolves unresolved incidents older than `incidents.auto_resolve_after`, every
/// `housekeeping.auto_resolve_every_ms`, until `shutdown` turns true. Errors are logged and retried on
/// the next round: a database blip must not end the task.
pub async fn auto_resolve(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let every = Duration::from_millis(state.settings.housekeeping.auto_resolve_every_ms);
    // Validated at start-up; the default (a day) only stands in for a value that cannot occur.
    let after_secs = state
        .settings
        .incidents
        .auto_resolve_after_secs()
        .unwrap_or(86_400);
    let after_ms = i64::try_from(after_secs)
        .unwrap_or(i64::MAX / 2_000)
        .saturating_mul(1000);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while next_round(&mut ticker, &mut shutdown).await {
        let cutoff = state.store.now_ms().saturating_sub(after_ms);
        let ids = match state.store.open_incidents_received_before(cutoff).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "auto-resolve: cannot list incidents"
                );
                continue;
            }
        };
        let reason = format!(
            "auto-resolved: open longer than {}",
            state.settings.incidents.auto_resolve_after
        );
        for id in ids {
            if let Err(e) = resolve(&state, &id, &reason).await {
                tracing::warn!(incident_id = %id, error = format!("{e:#}"), "auto-resolve failed");
            }
        }
    }
}

/// Sends a contact's SMS and WhatsApp once more, with the fallback text, when every call to them
/// ended unanswered or failed: looked for every second (one read), until `shutdown` turns true.
pub async fn channel_fallback(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while next_round(&mut ticker, &mut shutdown).await {
        match state.store.queue_fallbacks().await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(
                    messages = n,
                    "no call reached a contact: their SMS and WhatsApp go again with the fallback text"
                );
                state.wake.notify_one();
            }
            Err(e) => tracing::warn!(error = format!("{e:#}"), "channel fallback round failed"),
        }
    }
}

/// Deletes resolved incidents older than `retention.keep_days`, every `retention.every_ms`, until
/// `shutdown` turns true. Does nothing while `keep_days` is 0 (keep forever). Errors are logged and
/// retried on the next round.
pub async fn prune_old_incidents(
    state: AppState,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let retention = &state.settings.retention;
    let Some(keep_ms) = retention.keep_ms() else {
        return;
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(retention.every_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while next_round(&mut ticker, &mut shutdown).await {
        let cutoff = state.store.now_ms().saturating_sub(keep_ms);
        match state
            .store
            .prune_resolved_before(cutoff, retention.batch)
            .await
        {
            Ok(p) if p.incidents > 0 || p.alarms > 0 => tracing::info!(
                incidents = p.incidents,
                deliveries = p.deliveries,
                events = p.events,
                alarms = p.alarms,
                keep_days = retention.keep_days,
                "retention: deleted resolved incidents past keep_days"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = format!("{e:#}"), "retention: pruning failed"),
        }
    }
}

/// Waits for the next tick of a housekeeping task; false once `shutdown` turns true.
async fn next_round(
    ticker: &mut tokio::time::Interval,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = ticker.tick() => {}
        _ = shutdown.changed() => return false,
    }
    !*shutdown.borrow()
}
