//! Wake-ups across replicas: PostgreSQL LISTEN on the store's wake channel, so a Passthru stored by
//! another replica is dispatched here at once instead of at the next poll.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::{watch, Notify};

/// First pause before reconnecting; it doubles on each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Listens for PostgreSQL NOTIFY so a Passthru stored by another replica wakes this one at once;
/// reconnects on loss. Polling still covers any gap.
pub async fn listen_for_wakeups(
    url: String,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match connect(&url).await {
            Ok(listener) => {
                backoff = FIRST_BACKOFF;
                if relay(listener, &wake, &mut shutdown).await.is_break() {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot LISTEN for wake-ups; polling meanwhile"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A connection listening on the store's wake channel.
async fn connect(url: &str) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect(url).await?;
    l.listen(crate::store::WAKE_CHANNEL).await?;
    Ok(l)
}

/// Turns each notification into a wake-up until the connection is lost (`Continue`: reconnect) or
/// shutdown begins (`Break`).
async fn relay(
    mut l: PgListener,
    wake: &Notify,
    shutdown: &mut watch::Receiver<bool>,
) -> ControlFlow<()> {
    loop {
        tokio::select! {
            n = l.recv() => match n {
                Ok(_) => wake.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection lost; polling until it is back");
                    return ControlFlow::Continue(());
                }
            },
            _ = shutdown.changed() => return ControlFlow::Break(()),
        }
    }
}
