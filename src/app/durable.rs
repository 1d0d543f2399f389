//! A write behind a request that must never be cut off half-way, waited for within a budget: the
//! Passthru's emergency, the API's trigger and acknowledgement, the keypress and a message's link.
//!
//! The write runs in a task of its own, so neither a request time limit nor a client hanging up (both
//! drop the handler, not the task) stops it between its statements. A second task hands its outcome to
//! the caller, or to the caller's `late` when the caller is no longer waiting: an outcome that comes
//! after the request was answered is never without a trace where the caller wants one.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::{JoinError, JoinHandle};
use tracing::Instrument;

/// How a write came out within its budget.
#[derive(Debug)]
pub enum Written<T> {
    /// It ended in time, done or not.
    Ended(Result<T, WriteError>),
    /// No outcome within the budget: the write goes on, and its outcome goes to `late`.
    Pending,
}

/// Why a write that ended stored nothing. Each says so as the callers have always logged it.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The write returned an error.
    #[error("{0:#}")]
    Failed(anyhow::Error),
    /// Its task panicked, or was cancelled by the runtime shutting down.
    #[error("the write failed: {0}")]
    Lost(JoinError),
    /// The task that hands the outcome over ended without one (only when the runtime shuts down).
    #[error("the write ended without an outcome")]
    Unreported,
}

/// When an outcome reached `late` instead of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Late {
    /// The caller stopped waiting at the end of its budget ([`Written::Pending`]) and answered so.
    GaveUp,
    /// The request was cut off while the caller waited: the request time limit, or the client
    /// hanging up.
    CutOff,
}

/// Runs `write` in a task of its own and waits for it up to `budget`. An outcome that comes after the
/// caller stopped waiting goes to `late`, in the caller's span (a `|_, _| {}` logs nothing). Both tasks
/// run in the current span, so what the write logs carries the request's fields.
pub async fn write<T, W, L>(budget: Duration, write: W, late: L) -> Written<T>
where
    T: Send + 'static,
    W: Future<Output = anyhow::Result<T>> + Send + 'static,
    L: FnOnce(Late, Result<T, WriteError>) + Send + 'static,
{
    let task = tokio::spawn(write.in_current_span());
    let (outcome_tx, mut outcome) = oneshot::channel();
    let gave_up = Arc::new(AtomicBool::new(false));
    tokio::spawn(hand_over(task, outcome_tx, gave_up.clone(), late).in_current_span());
    match tokio::time::timeout(budget, &mut outcome).await {
        Ok(Ok(ended)) => Written::Ended(ended),
        Ok(Err(_)) => Written::Ended(Err(WriteError::Unreported)),
        Err(_) => {
            // From here on the outcome is `late`'s. Closing the channel tells the handing-over task
            // so; an outcome sent in the same instant is still taken here, and answered as such.
            gave_up.store(true, Ordering::Release);
            outcome.close();
            match outcome.try_recv() {
                Ok(ended) => Written::Ended(ended),
                Err(_) => Written::Pending,
            }
        }
    }
}

/// Waits for the write and hands its outcome to the caller; once the caller has stopped waiting (it
/// gave up at its budget, or its request was cut off), to `late` instead.
async fn hand_over<T, L>(
    task: JoinHandle<anyhow::Result<T>>,
    to: oneshot::Sender<Result<T, WriteError>>,
    gave_up: Arc<AtomicBool>,
    late: L,
) where
    L: FnOnce(Late, Result<T, WriteError>),
{
    let ended = match task.await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(WriteError::Failed(e)),
        Err(e) => Err(WriteError::Lost(e)),
    };
    let Err(ended) = to.send(ended) else {
        return;
    };
    let when = if gave_up.load(Ordering::Acquire) {
        Late::GaveUp
    } else {
        Late::CutOff
    };
    late(when, ended);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a `late` was given, its error in words.
    type Seen = oneshot::Receiver<(Late, Result<u32, String>)>;

    /// A `late` that hands what it was given to the test.
    fn recorder() -> (
        Seen,
        impl FnOnce(Late, Result<u32, WriteError>) + Send + 'static,
    ) {
        let (tx, rx) = oneshot::channel();
        (rx, move |when, ended: Result<u32, WriteError>| {
            let _ = tx.send((when, ended.map_err(|e| e.to_string())));
        })
    }

    async fn late_outcome(rx: Seen) -> Option<(Late, Result<u32, String>)> {
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .ok()?
            .ok()
    }

    #[tokio::test]
    async fn an_outcome_in_time_is_the_callers_and_nothing_is_late() {
        let (seen, late) = recorder();
        let written = write(Duration::from_secs(5), async { Ok(7) }, late).await;
        assert!(matches!(written, Written::Ended(Ok(7))));
        // `late` was dropped unused: nothing is ever sent.
        assert_eq!(late_outcome(seen).await, None);

        let failed = write(
            Duration::from_secs(5),
            async { Err::<u32, _>(anyhow::anyhow!("disk").context("could not store")) },
            |_, _| {},
        )
        .await;
        let Written::Ended(Err(e)) = failed else {
            panic!("a failed write is an ended one")
        };
        assert_eq!(e.to_string(), "could not store: disk");
    }

    #[tokio::test]
    async fn a_panicking_write_is_lost_and_says_so() {
        let written = write(
            Duration::from_secs(5),
            async {
                if true {
                    panic!("boom");
                }
                Ok(1u32)
            },
            |_, _| {},
        )
        .await;
        let Written::Ended(Err(e @ WriteError::Lost(_))) = written else {
            panic!("a panic is a lost write")
        };
        assert!(e.to_string().starts_with("the write failed: "));
    }

    #[tokio::test]
    async fn a_slow_write_goes_on_and_its_outcome_goes_to_late() {
        let (seen, late) = recorder();
        let (go, wait) = oneshot::channel::<()>();
        let written = write(
            Duration::from_millis(20),
            async move {
                let _ = wait.await;
                Ok(3)
            },
            late,
        )
        .await;
        assert!(matches!(written, Written::Pending));
        go.send(()).unwrap();
        assert_eq!(late_outcome(seen).await, Some((Late::GaveUp, Ok(3))));
    }

    #[tokio::test]
    async fn a_caller_cut_off_leaves_the_outcome_to_late() {
        let (seen, late) = recorder();
        let (go, wait) = oneshot::channel::<()>();
        let (started_tx, started) = oneshot::channel::<()>();
        let waiting = tokio::spawn(write(
            Duration::from_secs(60),
            async move {
                let _ = started_tx.send(());
                let _ = wait.await;
                Err(anyhow::anyhow!("disk full"))
            },
            late,
        ));
        started.await.unwrap();
        waiting.abort();
        let _ = waiting.await;
        go.send(()).unwrap();
        assert_eq!(
            late_outcome(seen).await,
            Some((Late::CutOff, Err("disk full".to_owned())))
        );
    }
}
