//! The ops console's use cases below HTTP: who may sign in with which token, sessions kept in the
//! database (by the hash of their id, so every replica knows them and a copy of the table signs nobody
//! in), the sign-in rate limit, and the one change watcher per process that tells every open board
//! when to fetch itself again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, Semaphore};

use super::{token_matches, AppState};
use crate::domain::{now_ms, random_token};
use crate::settings::non_empty;

/// How long a console session lasts: a shift, not a week.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Wrong tokens allowed from one client address within [`FAILURE_WINDOW`] before further wrong ones
/// are answered 429.
pub const MAX_FAILURES: usize = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How often the change watcher reads the fingerprint: the board is live within a second.
const POLL: Duration = Duration::from_millis(500);

/// What a signed-in person may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Signed in with the admin token.
    Admin,
    /// Signed in with `server.console_token`: view, acknowledge and resolve only.
    Console,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Console => "console",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "console" => Some(Role::Console),
            _ => None,
        }
    }
}

/// A signed-in person.
#[derive(Debug, Clone)]
pub struct Session {
    pub name: String,
    pub role: Role,
    /// Carried by every state-changing form of this session.
    pub csrf: String,
}

/// The role `token` signs in with, compared in constant time against each token; `None` for a wrong
/// or missing one.
pub fn role_of(state: &AppState, token: &str) -> Option<Role> {
    // Both comparisons always run, so timing does not tell which token was nearly right.
    let admin = token_matches(&state.admin_token, Some(token));
    let console = non_empty(&state.settings.server.console_token).is_some()
        && token_matches(&state.settings.server.console_token, Some(token));
    if admin {
        Some(Role::Admin)
    } else if console {
        Some(Role::Console)
    } else {
        None
    }
}

/// The stored form of a session id: its SHA-256, hex.
pub fn hash_id(id: &str) -> String {
    crate::domain::digest(id)
}

/// Starts a session for `name`; returns the raw session id (for the cookie only: the database keeps
/// its hash) and the session.
pub async fn sign_in(
    state: &AppState,
    name: &str,
    role: Role,
) -> anyhow::Result<(String, Session)> {
    let id = random_token(32);
    let csrf = random_token(24);
    let now = now_ms();
    let ttl = i64::try_from(SESSION_TTL.as_millis()).unwrap_or(i64::MAX);
    state
        .store
        .create_console_session(
            &crate::store::console::NewConsoleSession {
                id_hash: &hash_id(&id),
                name,
                role: role.as_str(),
                csrf: &csrf,
                token_digest: &token_digest(state, role),
                expires_at: now.saturating_add(ttl),
            },
            now,
        )
        .await?;
    tracing::info!(role = role.as_str(), "console sign-in");
    Ok((
        id,
        Session {
            name: name.to_owned(),
            role,
            csrf,
        },
    ))
}

/// SHA-256 of the token `role` signs in with now. Stored with a session, so that changing the token
/// in the settings (a revocation) ends every session it opened.
fn token_digest(state: &AppState, role: Role) -> String {
    use secrecy::ExposeSecret;
    let token = match role {
        Role::Admin => state.admin_token.expose_secret(),
        Role::Console => state.settings.server.console_token.expose_secret(),
    };
    crate::domain::digest(token)
}

/// The unexpired session with this raw id, signed in with a token that is still the one in force.
pub async fn session(state: &AppState, id: &str) -> anyhow::Result<Option<Session>> {
    let row = state.store.console_session(&hash_id(id), now_ms()).await?;
    Ok(row.and_then(|r| {
        let role = Role::parse(&r.role)?;
        if r.token_digest != token_digest(state, role) {
            return None;
        }
        Some(Session {
            role,
            name: r.name,
            csrf: r.csrf,
        })
    }))
}

pub async fn sign_out(state: &AppState, id: &str) -> anyhow::Result<()> {
    state.store.delete_console_session(&hash_id(id)).await
}

/// Wrong sign-in tokens per client address, in this process: after [`MAX_FAILURES`] within
/// [`FAILURE_WINDOW`], further wrong tries wait. The right token is checked before the limit and
/// always signs in, so guesses from an address (behind an untrusted proxy, everyone's) never lock
/// the desk out.
#[derive(Default)]
pub struct SignInLimiter {
    failures: Mutex<HashMap<IpAddr, Vec<Instant>>>,
}

impl SignInLimiter {
    /// `Some(wait)` while `client` must wait before trying again.
    pub fn blocked(&self, client: IpAddr) -> Option<Duration> {
        let mut map = self.failures.lock().ok()?;
        let now = Instant::now();
        let times = map.get_mut(&client)?;
        times.retain(|t| now.duration_since(*t) < FAILURE_WINDOW);
        if times.len() < MAX_FAILURES {
            return None;
        }
        let oldest = times.iter().min().copied()?;
        Some(FAILURE_WINDOW.saturating_sub(now.duration_since(oldest)))
    }

    pub fn failed(&self, client: IpAddr) {
        if let Ok(mut map) = self.failures.lock() {
            let now = Instant::now();
            // Addresses whose failures are all old are forgotten, so the map cannot grow without end.
            map.retain(|_, times| {
                times.retain(|t| now.duration_since(*t) < FAILURE_WINDOW);
                !times.is_empty()
            });
            map.entry(client).or_default().push(now);
        }
    }
}

/// What every open board listens to: a version that moves whenever the stored data changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    pub version: u64,
    /// The server is stopping: event streams end, so the stop is not held up by them.
    pub stopping: bool,
}

/// The console's shared parts in one process: the change signal, the cap on open event streams and
/// the sign-in limiter.
pub struct Hub {
    changes: watch::Sender<Change>,
    /// Something changed here (a resolve in this process): look at once instead of at the next poll.
    poke: Arc<Notify>,
    /// Open event streams at most: each holds one of the non-Exotel request slots while it is open.
    pub streams: Arc<Semaphore>,
    pub sign_in: SignInLimiter,
}

impl Hub {
    /// A hub allowing `max_streams` event streams at once.
    pub fn new(max_streams: usize) -> Self {
        Hub {
            changes: watch::channel(Change::default()).0,
            poke: Arc::new(Notify::new()),
            streams: Arc::new(Semaphore::new(max_streams.max(1))),
            sign_in: SignInLimiter::default(),
        }
    }

    /// The stream cap for these server limits: a quarter of the slots outside `/exotel/*`, so event
    /// streams can never take the API's or the console pages' share.
    pub fn max_streams(max_connections: usize, reserved_for_exotel: usize) -> usize {
        (max_connections.saturating_sub(reserved_for_exotel) / 4).max(1)
    }

    pub fn subscribe(&self) -> watch::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Asks the watcher to look now.
    pub fn poke(&self) {
        self.poke.notify_one();
    }
}

/// The one change watcher of this process: reads the store's fingerprint every [`POLL`] (which sees
/// every replica's writes) and, on PostgreSQL, also wakes on the store's NOTIFY channel, so new work
/// committed anywhere shows at once. Viewers never query for changes themselves.
pub async fn watch_changes(state: AppState, mut stop: watch::Receiver<bool>) {
    let hub = state.console.clone();
    if state.store.engine() == crate::store::Engine::Postgres {
        tokio::spawn(crate::dispatch::listen_for_wakeups(
            state.settings.database.url.clone(),
            hub.poke.clone(),
            stop.clone(),
        ));
    }
    let mut last = None;
    loop {
        match state.store.console_fingerprint().await {
            Ok(f) => {
                if last.is_some_and(|l| l != f) {
                    hub.changes
                        .send_modify(|c| c.version = c.version.wrapping_add(1));
                }
                last = Some(f);
            }
            Err(e) => tracing::debug!(error = format!("{e:#}"), "console change check failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = hub.poke.notified() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    hub.changes.send_modify(|c| c.stopping = true);
}
