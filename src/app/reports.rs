//! Provider reports (Exotel's status callbacks, GupShup's delivery reports), each applied to the
//! delivery it names.

use std::time::Duration;

use super::AppState;
use crate::domain::Report;
use crate::store::CallbackEffect;

/// Tries of a report whose delivery is still being recorded, [`PAUSE`] apart: three seconds in all.
const TRIES: usize = 30;
const PAUSE: Duration = Duration::from_millis(100);

/// Applies `report`. It can arrive before our own record of the request it reports on is committed
/// (outcomes are committed in batches): with `wait`, that record is given a moment instead of the
/// report being dropped. `Pending` when the record is still not there.
pub async fn apply(
    state: &AppState,
    report: &Report,
    wait: bool,
) -> anyhow::Result<CallbackEffect> {
    let policy = state.settings.redial_policy();
    if !wait {
        return state.store.apply_report(report, policy).await;
    }
    for _ in 0..TRIES {
        let effect = state.store.apply_report(report, policy).await?;
        if effect != CallbackEffect::Pending {
            return Ok(effect);
        }
        tokio::time::sleep(PAUSE).await;
    }
    Ok(CallbackEffect::Pending)
}
