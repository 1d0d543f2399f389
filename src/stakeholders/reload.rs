//! Live reload of the stakeholder file on SIGHUP and on change; a broken edit keeps the previous routing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use notify::Watcher;
use tokio::sync::mpsc;

use super::{EscalationBounds, Routing};

/// The current routing, shared by every request; replaced whole so a request never sees half an edit.
pub struct RoutingHandle {
    current: RwLock<Arc<Routing>>,
    path: PathBuf,
    region: phonenumber::country::Id,
    /// Edits rejected since start: proof, for operators and tests, that a broken edit was seen.
    rejected: AtomicU64,
    /// Counts accepted reloads; tasks that follow the file (WhatsApp opt-in) watch it.
    loaded: tokio::sync::watch::Sender<u64>,
    /// What escalation policies must fit in (from the settings); `None`: the file alone is checked.
    bounds: Option<EscalationBounds>,
}

impl RoutingHandle {
    /// Holds `routing`, read from `path` with numbers in `region`; reloads read the same file.
    pub fn new(routing: Routing, path: PathBuf, region: phonenumber::country::Id) -> Self {
        RoutingHandle {
            current: RwLock::new(Arc::new(routing)),
            path,
            region,
            rejected: AtomicU64::new(0),
            loaded: tokio::sync::watch::Sender::new(0),
            bounds: None,
        }
    }

    /// Reloads check escalation policies against these settings, as start-up does.
    pub fn with_bounds(mut self, bounds: EscalationBounds) -> Self {
        self.bounds = Some(bounds);
        self
    }

    /// Changes each time a reload is accepted (the routing at start counts as seen already).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.loaded.subscribe()
    }

    /// How many edits of the file were rejected since start.
    pub fn rejected_edits(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// The routing in force now; a request keeps the one it got, even across a reload.
    pub fn current(&self) -> Arc<Routing> {
        // A poisoned lock only means a panic elsewhere while swapping; the Arc inside is still whole.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the file. On errors every one is logged and the previous routing stays in force.
    pub fn reload(&self) -> Result<(), Vec<String>> {
        match Routing::load_checked(&self.path, self.region, self.bounds.as_ref()) {
            Ok(routing) => {
                for w in &routing.warnings {
                    tracing::warn!(warning = %w, "stakeholder file");
                }
                tracing::info!(
                    file = %self.path.display(),
                    contacts = routing.contact_count(),
                    "stakeholder file reloaded"
                );
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routing);
                self.loaded.send_modify(|n| *n += 1);
                Ok(())
            }
            Err(errors) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                for e in &errors {
                    tracing::error!(error = %e, "stakeholder file rejected; previous routing kept");
                }
                Err(errors)
            }
        }
    }

    /// Reloads on SIGHUP and whenever the file changes on disk, until `shutdown` fires.
    pub fn spawn_watchers(self: &Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let watcher = self.watch_file(tx.clone());
        #[cfg(unix)]
        forward_sighup(tx, shutdown.clone());

        let handle = Arc::clone(self);
        tokio::spawn(async move {
            let _watcher = watcher; // dropped, and so stopped, with this task
            loop {
                tokio::select! {
                    got = rx.recv() => {
                        if got.is_none() { break; }
                        // An editor's save is several events; settle, then read once.
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        while rx.try_recv().is_ok() {}
                        let _ = handle.reload();
                    }
                    _ = shutdown.changed() => break,
                }
            }
        });
    }

    /// Sends on `tx` whenever the file changes on disk, for as long as the returned watcher lives;
    /// `None` (with a warning) when it cannot be watched, and SIGHUP is then the only way to reload.
    fn watch_file(&self, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
        // The directory is watched, not the file: editors save by writing a new file and renaming it.
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        let file_name = self.path.file_name().map(|n| n.to_owned());
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                let ours = event
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_owned()) == file_name);
                if ours && !event.kind.is_access() {
                    let _ = tx.send(());
                }
            }
        });
        match watcher {
            Ok(mut w) => match w.watch(&dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the stakeholder file; SIGHUP still reloads it");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "no file watcher; SIGHUP still reloads the stakeholder file");
                None
            }
        }
    }
}

/// Sends on `tx` at each SIGHUP, until `shutdown` fires.
#[cfg(unix)]
fn forward_sighup(tx: mpsc::UnboundedSender<()>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        got = hup.recv() => {
                            if got.is_none() { break; }
                            tracing::info!("SIGHUP: reloading the stakeholder file");
                            let _ = tx.send(());
                        }
                        _ = shutdown.changed() => break,
                    }
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
    }
}
