//! Records outcomes in groups: one durable commit for whatever finished meanwhile. A failed group is
//! tried once more, then item by item, then as a plain version of the item, so one bad outcome (an
//! unstorable byte in a provider's answer, say) can never make the others be sent again.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::domain::{mask_numbers, DeliveryState};
use crate::store::{Finish, Store};

/// One finished attempt waiting to be recorded: delivery id, claim token, outcome, and where to say
/// what was recorded (the status, or `None` when the claim had lost the lease).
pub(super) type PendingOutcome = (
    String,
    String,
    Finish,
    oneshot::Sender<anyhow::Result<Option<DeliveryState>>>,
);

/// Largest group committed at once.
const MAX_BATCH: usize = 256;
/// Pause before the group is tried again: long enough for a momentary lock or network blip.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

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
            .map(|(id, token, finish, _)| (id.clone(), token.clone(), finish.clone()))
            .collect();
        let results = record_batch(&store, &items).await;
        for ((_, _, _, reply), result) in batch.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

/// Records `items`, one result per item in order: as one group (tried twice), else one by one, and an
/// item that still fails as a plain version of its outcome (ASCII text only, provider id kept).
pub(super) async fn record_batch(
    store: &Store,
    items: &[(String, String, Finish)],
) -> Vec<anyhow::Result<Option<DeliveryState>>> {
    let mut last_error = String::new();
    for round in 0..2 {
        match store.finish_attempts(items).await {
            Ok(results) => return results.into_iter().map(Ok).collect(),
            Err(e) => {
                // A refused outcome's text (a provider's error page) may carry phone numbers.
                last_error = mask_numbers(&format!("{e:#}"));
                tracing::warn!(error = %last_error, items = items.len(), round, "recording a group of outcomes failed");
                if round == 0 {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
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
