//! exotel-sos: one emergency in, the right people called, texted and messaged, with proof of who was reached.
#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod dispatch;
pub mod domain;
pub mod error;
pub mod http;
pub mod messages;
pub mod metrics;
pub mod providers;
pub mod recordings;
pub mod settings;
pub mod stakeholders;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;

use crate::app::AppState;
use crate::settings::{non_empty, Settings};
use crate::stakeholders::reload::RoutingHandle;
use crate::stakeholders::Routing;
use crate::store::Store;

/// A configured, migrated application, ready to serve.
pub struct App {
    pub state: AppState,
    /// Tokens generated and stored by the server (not given in settings): these, and only these, are
    /// printed at start inside the ready-to-paste URLs.
    pub generated_webhook_token: bool,
    pub generated_admin_token: bool,
}

/// Loads the stakeholder file with the settings' region, joining every problem into one error.
pub fn load_routing(settings: &Settings) -> anyhow::Result<Routing> {
    let region = domain::phone::region(&settings.stakeholders.default_country)
        .context("stakeholders.default_country is not a region code")?;
    let bounds = stakeholders::EscalationBounds::of(settings);
    Routing::load_checked(&settings.stakeholders.file, region, Some(&bounds)).map_err(|errors| {
        anyhow::anyhow!(
            "the stakeholder file has {} problem(s):\n  - {}",
            errors.len(),
            errors.join("\n  - ")
        )
    })
}

impl App {
    /// Connects to the database, applies migrations, loads the stakeholder file and the tokens.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let routing = load_routing(&settings)?;
        for w in &routing.warnings {
            tracing::warn!(warning = %w, "stakeholder file");
        }
        // The same template checks as check-config; logged rather than refused, so that a template
        // problem never keeps the calls from going out.
        let dlt = messages::dlt::check(&settings);
        for problem in dlt.errors() {
            tracing::error!(problem = %problem, "SMS template: operators will refuse these messages; run check-config");
        }
        for w in dlt.all_warnings() {
            tracing::warn!(warning = %w, "SMS template");
        }
        let store =
            Store::connect(&settings.database.url, settings.database.max_connections).await?;
        store.migrate().await?;

        let (webhook_token, generated_webhook_token) =
            token(&store, &settings.server.webhook_token, "webhook_token").await?;
        let (admin_token, generated_admin_token) =
            token(&store, &settings.server.admin_token, "admin_token").await?;
        // The settings' own check cannot see a generated admin token; it is printed at every start,
        // and pasted as the console token it would make every console sign-in an admin one.
        if generated_admin_token
            && non_empty(&settings.server.console_token) == Some(admin_token.expose_secret())
        {
            anyhow::bail!(
                "server.console_token is the admin token this server generated and stored (the one \
                 printed at start): a console sign-in with it would carry the admin's rights; choose \
                 another console token"
            );
        }

        let region = domain::phone::region(&settings.stakeholders.default_country)
            .context("stakeholders.default_country is not a region code")?;
        let routing = Arc::new(
            RoutingHandle::new(routing, settings.stakeholders.file.clone(), region)
                .with_bounds(stakeholders::EscalationBounds::of(&settings)),
        );
        let providers = Arc::new(providers::registry::built_in(
            &settings,
            secrecy::ExposeSecret::expose_secret(&webhook_token),
        ));
        let console = Arc::new(app::console::Hub::new(app::console::Hub::max_streams(
            settings.server.max_connections,
            settings.server.reserved_for_exotel,
        )));
        // Validated with the settings; a caller id that is not a number is left out.
        let alarm_watch = Arc::new(app::alarms::AlarmWatch::with_numbers(
            settings.exotel.our_numbers(region).unwrap_or_default(),
        ));
        Ok(App {
            state: AppState {
                settings: Arc::new(settings),
                store,
                routing,
                providers,
                webhook_token: Arc::new(webhook_token),
                admin_token: Arc::new(admin_token),
                wake: Arc::new(tokio::sync::Notify::new()),
                dispatcher_heartbeat: Arc::new(std::sync::atomic::AtomicI64::new(0)),
                dispatcher_dead: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                metrics: Arc::new(metrics::Metrics::new()),
                recording_opens: Arc::default(),
                console,
                alarm_watch,
                auditor: Arc::default(),
            },
            generated_webhook_token,
            generated_admin_token,
        })
    }

    /// Registers one more provider lane (a second provider of a channel, or one for a new channel):
    /// from now on new deliveries of its channel go to it.
    pub fn with_provider(mut self, account: &str, client: Arc<dyn providers::Client>) -> Self {
        Arc::make_mut(&mut self.state.providers).register(account, client);
        self
    }

    /// The dispatcher for this app's settings, store and wake-ups.
    pub fn dispatcher(&self) -> anyhow::Result<dispatch::Dispatcher> {
        let s = &self.state;
        dispatch::Dispatcher::new(
            s.store.clone(),
            s.settings.clone(),
            dispatch::Given {
                texts: messages::delivery::Texts::from_settings(&s.settings),
                call_window: stakeholders::EscalationBounds::of(&s.settings).call_window(),
            },
            dispatch::lanes(
                &s.settings,
                &s.providers,
                // Account-wide rate limits live where all replicas meet: a PostgreSQL database.
                (s.store.engine() == store::Engine::Postgres).then_some(&s.store),
            ),
            s.wake.clone(),
            s.dispatcher_heartbeat.clone(),
            s.metrics.clone(),
        )
    }

    /// The lines printed at start: where to point Exotel. Settings-given tokens are never printed.
    pub fn banner(&self) -> String {
        use secrecy::ExposeSecret;
        let base = self.state.settings.public_base();
        let token = if self.generated_webhook_token {
            self.state.webhook_token.expose_secret().to_owned()
        } else {
            "<server.webhook_token>".to_owned()
        };
        let mut out = format!(
            "Passthru applet URL (inbound flow, after the recording):\n    {base}/exotel/passthru?token={token}\n\
             Greeting applet URL (outbound flow, \"read text from URL\"):\n    {base}/exotel/greeting?token={token}\n"
        );
        if let Some(digit) = self.state.settings.ack.digit() {
            out.push_str(&format!(
                "Acknowledge Passthru URL (outbound flow, after the Gather \"press {digit} to acknowledge\"):\n    {base}/exotel/ack?token={token}\n"
            ));
        }
        for channel in domain::Channel::ALL {
            if !self.state.settings.channel_live(channel) {
                out.push_str(&format!(
                    "WARNING: {channel} is DRY-RUN (credentials not set): deliveries are recorded as simulated, nothing is sent\n"
                ));
            }
        }
        out.push_str(&match self.state.settings.recording_mode() {
            settings::RecordingMode::Proxy => format!(
                "Recordings: proxy mode: fetched from {} with the Exotel credentials, kept in the database, served at {base}/r/<ref>\n",
                self.state.settings.recordings.allowed_hosts
            ),
            settings::RecordingMode::Direct => {
                "Recordings: direct mode: Exotel's recording URLs are passed on as they are\n".to_owned()
            }
        });
        for warning in self.warnings() {
            out.push_str(&format!("WARNING: {warning}\n"));
        }
        if self.generated_admin_token {
            out.push_str(&format!(
                "Admin API bearer token (for /api/*, and to sign in to the console):\n    {}\n",
                self.state.admin_token.expose_secret()
            ));
        }
        out.push_str(&format!(
            "Ops console (live incident board):\n    {base}/console\n"
        ));
        let all_dry_run = domain::Channel::ALL
            .into_iter()
            .all(|c| !self.state.settings.channel_live(c));
        if all_dry_run && self.generated_webhook_token {
            // A first incident on the board within a minute of the first start, nothing sent.
            out.push_str(&format!(
                "Try it: send a test Passthru (every channel is dry-run, nothing is sent), then watch the console:\n    \
                 curl '{base}/exotel/passthru?token={token}&CallSid=test-{}&EmergencyType=Heart'\n",
                domain::random_token(4)
            ));
        } else if !all_dry_run {
            out.push_str(
                "Try it: `exotel-sos drill --contact NAME` reaches one contact on each of their channels (a marked test incident)\n",
            );
        }
        out
    }

    /// Set-up mistakes that would make live alerts fail where nobody looks: printed at start and
    /// logged.
    pub fn warnings(&self) -> Vec<String> {
        let settings = &self.state.settings;
        let mut out = Vec::new();
        let live = domain::Channel::ALL
            .into_iter()
            .any(|c| settings.channel_live(c));
        if live {
            if let Some(why) = unreachable_public_url(&settings.server.public_url) {
                out.push(format!(
                    "server.public_url {:?} {why}: Exotel's status callbacks, the greeting and the links \
                     in messages would never reach this server",
                    settings.server.public_url
                ));
            }
        }
        if live && !self.state.alarm_watch.knows_numbers() {
            out.push(
                "neither exotel.inbound_numbers nor exotel.caller_id holds a phone number: a request \
                 with a wrong webhook token cannot be told from a scanner's, so Exotel calling with an \
                 old token would page nobody; set exotel.inbound_numbers to the ExoPhone(s) emergencies \
                 are called in on"
                    .to_owned(),
            );
        }
        let routing = self.state.routing.current();
        if let Some(w) = stakeholders::unreached_warning(&routing, live) {
            out.push(w);
        }
        let samples = routing
            .phones()
            .filter(|p| stakeholders::is_sample_number(p))
            .count();
        if samples > 0 {
            out.push(format!(
                "the stakeholder file still holds {samples} sample number(s) (+91 98000 000xx) from the \
                 example file: replace them with the real contacts"
            ));
        }
        out
    }

    /// Serves on `listener` until `shutdown` resolves, with the stakeholder file watched.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        self.state.routing.spawn_watchers(stop_rx.clone());
        let dispatcher = if self.state.settings.dispatch.enabled {
            let d = Arc::new(self.dispatcher()?);
            if self.state.store.engine() == store::Engine::Postgres {
                tokio::spawn(dispatch::listen_for_wakeups(
                    self.state.settings.database.url.clone(),
                    self.state.wake.clone(),
                    stop_rx.clone(),
                ));
            }
            let handle = tokio::spawn(d.run(stop_rx.clone()));
            Some(tokio::spawn(supervise_dispatcher(
                handle,
                stop_rx.clone(),
                self.state.dispatcher_dead.clone(),
                stop_tx.clone(),
            )))
        } else {
            None
        };
        // Each background loop runs until shutdown; one that stops (a panic) is started again.
        macro_rules! keep_running {
            ($name:literal, $task:path) => {{
                let state = self.state.clone();
                let stop = stop_rx.clone();
                let metrics = self.state.metrics.clone();
                tokio::spawn(app::supervise::keep_running(
                    $name,
                    stop_rx.clone(),
                    move |task| metrics.task_restarted(task),
                    move || $task(state.clone(), stop.clone()),
                ));
            }};
        }
        keep_running!("auto_resolve", app::housekeeping::auto_resolve);
        keep_running!("optin", app::optin::follow_stakeholder_file);
        keep_running!("recordings", app::recordings::run);
        keep_running!("channel_fallback", app::housekeeping::channel_fallback);
        keep_running!("unreached_sweep", app::alarms::unreached_sweep);
        keep_running!("alarm_sender", app::alarms::alarm_sender);
        keep_running!("console_watch", app::console::watch_changes);
        keep_running!("retention", app::housekeeping::prune_old_incidents);
        keep_running!("auditor", app::auditor::run);
        let router = http::router(self.state.clone());
        let server = &self.state.settings.server;
        let limits = http::serve::ServeLimits {
            max_connections: server.max_connections,
            header_read_timeout: std::time::Duration::from_secs(server.header_read_timeout_secs),
            // Answers in flight finish within the request time limit; slow headers within theirs.
            drain: std::time::Duration::from_secs(
                server
                    .request_timeout_secs
                    .saturating_add(server.header_read_timeout_secs),
            ),
        };
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        http::serve::serve(listener, router, limits, stop_rx.clone()).await;
        // The dispatcher finishes or releases its in-flight work before the database closes.
        let died = match dispatcher {
            Some(d) => d.await.unwrap_or(true),
            None => false,
        };
        self.state.store.close().await;
        if died {
            anyhow::bail!("the dispatcher stopped unexpectedly; exiting so a supervisor restarts this process");
        }
        Ok(())
    }
}

/// Why `public_url` cannot be reached by Exotel, or `None`: it must be https, on a public host.
fn unreachable_public_url(public_url: &str) -> Option<&'static str> {
    let url = reqwest::Url::parse(public_url).ok()?;
    let host = url.host_str().unwrap_or("").trim_matches(['[', ']']);
    let local = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_loopback() || ip.is_private() || ip.is_unspecified(),
        Ok(std::net::IpAddr::V6(ip)) => ip.is_loopback() || ip.is_unspecified(),
        Err(_) => host.is_empty() || host.eq_ignore_ascii_case("localhost"),
    };
    if local {
        Some("points at this machine or a private network")
    } else if url.scheme() != "https" {
        Some("is not https")
    } else {
        None
    }
}

/// Waits for the dispatcher task. If it ends while no shutdown was asked for (a panic, or an early
/// return), nothing would be sent any more: marks the app dead (so `/healthz` fails) and shuts the
/// server down. Returns whether it died.
pub async fn supervise_dispatcher(
    handle: tokio::task::JoinHandle<()>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    dead: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
) -> bool {
    let ended = handle.await;
    if *shutdown.borrow() {
        return false;
    }
    let why = match ended {
        Err(e) if e.is_panic() => format!("it panicked: {e}"),
        Err(e) => format!("it was cancelled: {e}"),
        Ok(()) => "it returned".to_owned(),
    };
    tracing::error!(why = %why, "DISPATCHER STOPPED: nothing is being sent; shutting down so a supervisor restarts this process");
    dead.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = stop.send(true);
    true
}

/// The token from settings, or the stored (generated once) one; `true` when it was generated.
async fn token(
    store: &Store,
    configured: &SecretString,
    name: &str,
) -> anyhow::Result<(SecretString, bool)> {
    match non_empty(configured) {
        Some(t) => Ok((SecretString::from(t.to_owned()), false)),
        None => Ok((SecretString::from(store.secret(name).await?), true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_public_url_exotel_cannot_reach_is_named() {
        assert!(unreachable_public_url("http://127.0.0.1:8080").is_some());
        assert!(unreachable_public_url("https://localhost").is_some());
        assert!(unreachable_public_url("https://10.1.2.3/sos").is_some());
        assert!(unreachable_public_url("https://[::1]:8443").is_some());
        assert_eq!(
            unreachable_public_url("http://sos.example.org"),
            Some("is not https")
        );
        assert_eq!(unreachable_public_url("https://sos.example.org"), None);
    }

    #[test]
    fn the_example_numbers_are_recognised() {
        assert!(stakeholders::is_sample_number("+919800000001"));
        assert!(!stakeholders::is_sample_number("+919800000123"));
        assert!(!stakeholders::is_sample_number("+919845012345"));
    }

    #[tokio::test]
    async fn a_dispatcher_that_dies_marks_the_app_dead_and_stops_the_server() {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        let dead = Arc::new(AtomicBool::new(false));
        let handle = tokio::spawn(async { panic!("a bug in the dispatcher loop") });
        let died = supervise_dispatcher(handle, stop_rx.clone(), dead.clone(), stop_tx).await;
        assert!(died);
        assert!(dead.load(Ordering::Relaxed));
        assert!(*stop_rx.borrow(), "the server is asked to stop");
    }

    #[tokio::test]
    async fn a_dispatcher_that_stops_on_shutdown_is_not_dead() {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        let dead = Arc::new(AtomicBool::new(false));
        stop_tx.send(true).unwrap();
        let handle = tokio::spawn(async {});
        assert!(!supervise_dispatcher(handle, stop_rx, dead.clone(), stop_tx).await);
        assert!(!dead.load(Ordering::Relaxed));
    }
}
