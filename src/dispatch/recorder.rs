//! Records outcomes in groups: one durable commit for whatever finished meanwhile. A group the database
//! refuses is tried once more, then item by item, then as a plain version of the item, so one bad
//! outcome (an unstorable byte in a provider's answer, say) can never make the others be sent again.
//!
//! A group the database could not take at all (it refused connections, went away, was busy or full)
//! is kept and tried again until shortly before the leases of its deliveries run out: each outcome is
//! known (the provider's id is in hand), and giving up on it early would let the lease lapse and the
//! delivery be sent a second time by whichever replica claims it next. Only an outage longer than
//! the lease can do that.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::domain::{mask_numbers, DeliveryState};
use crate::store::{Finish, Store};

/// One finished attempt waiting to be recorded.
pub(super) struct PendingOutcome {
    pub delivery_id: String,
    pub token: String,
    pub finish: Finish,
    /// Tries to record it start no later than this: after it, the lease may have lapsed and another
    /// claim may own the delivery.
    pub keep_until: Instant,
    /// Where to say what was recorded (the status, or `None` when the claim had lost the lease).
    pub reply: oneshot::Sender<anyhow::Result<Option<DeliveryState>>>,
}

/// Largest group committed at once.
const MAX_BATCH: usize = 256;
/// Pause before a refused group is tried again: long enough for a momentary lock.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Pauses while the database is out of reach double from [`RETRY_PAUSE`] up to this.
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// Commits outcomes in batches: whatever arrived while the previous commit ran goes into the next one,
/// so one durable commit serves many deliveries under load and a lone outcome waits for nothing.
pub(super) async fn record_outcomes(store: Store, mut rx: mpsc::UnboundedReceiver<PendingOutcome>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let items: Vec<(String, String, Finish)> = batch
            .iter()
            .map(|o| (o.delivery_id.clone(), o.token.clone(), o.finish.clone()))
            .collect();
        // The group is kept as long as its earliest lease allows.
        let keep_until = batch.iter().map(|o| o.keep_until).min();
        let keep_until = keep_until.unwrap_or_else(Instant::now);
        let results = record_batch(&store, &items, keep_until).await;
        for (outcome, result) in batch.into_iter().zip(results) {
            let _ = outcome.reply.send(result);
        }
    }
}

/// Records `items`, one result per item in order: as one group (tried twice if the database refuses
/// it, and again and again until `keep_until` while the database is out of reach), else one by one,
/// and an item that still fails as a plain version of its outcome (ASCII text only, provider id kept).
pub(super) async fn record_batch(
    store: &Store,
    items: &[(String, String, Finish)],
    keep_until: Instant,
) -> Vec<anyhow::Result<Option<DeliveryState>>> {
    let mut last_error = String::new();
    let mut refusals = 0;
    let mut pause = RETRY_PAUSE;
    for round in 0u32.. {
        match store.finish_attempts(items).await {
            Ok(results) => {
                if round > 0 {
                    tracing::info!(
                        items = items.len(),
                        round,
                        "a group of outcomes was recorded after the database came back"
                    );
                }
                return results.into_iter().map(Ok).collect();
            }
            Err(e) => {
                // A refused outcome's text (a provider's error page) may carry phone numbers.
                last_error = mask_numbers(&format!("{e:#}"));
                let refused = store.refused(&e);
                // Once, then every tenth try: an outage of a minute is a handful of lines, not sixty.
                if round < 2 || round % 10 == 0 {
                    tracing::warn!(error = %last_error, items = items.len(), round, refused, "recording a group of outcomes failed");
                }
                if refused {
                    refusals += 1;
                    if refusals >= 2 {
                        break;
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
                if Instant::now() + pause >= keep_until {
                    tracing::error!(error = %last_error, items = items.len(), round,
                        "the database stayed out of reach until the leases were about to run out; these deliveries may be sent again");
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
    if items.len() == 1 {
        let (id, token, finish) = &items[0];
        return vec![record_plain(store, id, token, finish, &last_error).await];
    }
    let mut results = Vec::with_capacity(items.len());
    for (id, token, finish) in items {
        let one = [(id.clone(), token.clone(), finish.clone())];
        let result = match store.finish_attempts(&one).await {
            Ok(mut r) => Ok(r.pop().flatten()),
            Err(e) => {
                record_plain(store, id, token, finish, &mask_numbers(&format!("{e:#}"))).await
            }
        };
        results.push(result);
    }
    results
}

/// The last resort for one outcome the store refused: the same outcome with its texts reduced to
/// plain ASCII, noting why. If even that fails the lease runs out and the delivery is tried again,
/// at most `dispatch.max_attempts` times.
async fn record_plain(
    store: &Store,
    id: &str,
    token: &str,
    finish: &Finish,
    why: &str,
) -> anyhow::Result<Option<DeliveryState>> {
    tracing::error!(delivery_id = %id, error = %why, "an outcome could not be recorded; recording a plain version");
    let plain = plain(finish);
    store
        .finish_attempts(&[(id.to_owned(), token.to_owned(), plain)])
        .await
        .map(|mut r| r.pop().flatten())
}

/// `finish` with every text cut to printable ASCII and a note that it was simplified; the provider id
/// is kept.
fn plain(finish: &Finish) -> Finish {
    fn ascii(s: &str) -> String {
        let kept: String = s
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(200)
            .collect();
        format!("{kept} [simplified: the full text could not be stored]")
    }
    match finish.clone() {
        Finish::Accepted {
            provider_id,
            detail,
            report_due_at,
        } => Finish::Accepted {
            // The id stays as it is (the store makes it storable): callbacks must still match it.
            provider_id,
            detail: ascii(&detail),
            report_due_at,
        },
        Finish::Simulated { request } => Finish::Simulated {
            request: ascii(&request),
        },
        Finish::Retry { due_at, reason } => Finish::Retry {
            due_at,
            reason: ascii(&reason),
        },
        Finish::Requeue { due_at, reason } => Finish::Requeue {
            due_at,
            reason: ascii(&reason),
        },
        Finish::Failed { reason } => Finish::Failed {
            reason: ascii(&reason),
        },
        Finish::Cancelled { reason } => Finish::Cancelled {
            reason: ascii(&reason),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_outcomes_keep_their_kind_and_id_and_lose_odd_bytes() {
        let f = plain(&Finish::Accepted {
            provider_id: Some("abc1".into()),
            detail: "caf\u{e9} \u{0} ok".into(),
            report_due_at: Some(5),
        });
        match f {
            Finish::Accepted {
                provider_id,
                detail,
                report_due_at,
            } => {
                assert_eq!(provider_id.as_deref(), Some("abc1"));
                assert!(detail.starts_with("caf  ok"), "{detail}");
                assert_eq!(report_due_at, Some(5));
            }
            other => panic!("{other:?}"),
        }
    }
}
