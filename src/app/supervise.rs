//! Keeps the background loops running. The auditor, the unreached sweep, the alarm sender, the channel
//! fallback and the rest each loop until shutdown (or return at once when there is nothing for them to do);
//! a panic in one (a bug, an unexpected row) would
//! otherwise end it silently while the server goes on answering webhooks, and the stall it exists to
//! catch would go unseen. Each is restarted after a pause that doubles up to a minute, with an error in
//! the log and a count in `sos_task_restarts_total`. The intake is never stopped for it: a lost webhook is
//! worse than a late sweep. (The dispatcher is the exception: without it nothing is sent, so its end stops
//! the process for a supervisor to restart.)

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// The first pause before a restart; it doubles after each one, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// A run this long resets the pause: the loop had been working.
const HEALTHY_RUN: Duration = Duration::from_secs(300);

/// Runs `start()` until shutdown, starting it again whenever it panics before shutdown. A task that
/// returns is done (it has nothing to do on this configuration). `restarted` is told the task's name
/// each time it is started again.
pub async fn keep_running<F, Fut>(
    task: &'static str,
    mut shutdown: watch::Receiver<bool>,
    restarted: impl Fn(&'static str),
    start: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    keep_running_with(task, &mut shutdown, restarted, start, FIRST_PAUSE).await;
}

async fn keep_running_with<F, Fut>(
    task: &'static str,
    shutdown: &mut watch::Receiver<bool>,
    restarted: impl Fn(&'static str),
    start: F,
    first_pause: Duration,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut pause = first_pause;
    loop {
        let began = tokio::time::Instant::now();
        let ended = tokio::spawn(start()).await;
        if *shutdown.borrow() {
            return;
        }
        let why = match ended {
            Err(e) if e.is_panic() => format!("it panicked: {e}"),
            Err(e) => format!("it was cancelled: {e}"),
            // A task returns when it has nothing to do on this configuration (no retention set, no
            // GupShup account): it said so itself.
            Ok(()) => return,
        };
        if began.elapsed() >= HEALTHY_RUN {
            pause = first_pause;
        }
        tracing::error!(
            task,
            why = %why,
            restart_in_secs = pause.as_secs_f64(),
            "BACKGROUND TASK STOPPED: restarting it"
        );
        restarted(task);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_is_started_again_and_shutdown_ends_it() {
        let (stop_tx, stop_rx) = watch::channel(false);
        let runs = Arc::new(AtomicUsize::new(0));
        let restarts = Arc::new(Mutex::new(Vec::new()));
        let supervised = {
            let runs = runs.clone();
            let restarts = restarts.clone();
            let mut shutdown = stop_rx.clone();
            tokio::spawn(async move {
                keep_running_with(
                    "auditor",
                    &mut shutdown,
                    move |task| restarts.lock().unwrap().push(task),
                    move || {
                        let n = runs.fetch_add(1, Ordering::SeqCst);
                        let mut stop = stop_rx.clone();
                        async move {
                            if n < 2 {
                                panic!("a bug in run {n}");
                            }
                            // The third run works until shutdown.
                            let _ = stop.changed().await;
                        }
                    },
                    Duration::from_millis(5),
                )
                .await;
            })
        };
        // Two panics, two restarts, then the third run lives.
        for _ in 0..400 {
            if runs.load(Ordering::SeqCst) >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(*restarts.lock().unwrap(), vec!["auditor", "auditor"]);
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), supervised)
            .await
            .expect("shutdown ends the supervisor")
            .unwrap();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "not started again after shutdown"
        );
        assert_eq!(
            restarts.lock().unwrap().len(),
            2,
            "an end at shutdown is no restart"
        );
    }
}
