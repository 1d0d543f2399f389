//! `exotel-sos trigger` and `exotel-sos drill`: raise an incident through the running server's API, as
//! an operator would; `exotel-sos resolve` and `exotel-sos ack`: close or acknowledge one the same way; `exotel-sos optin`: opts the stakeholder file's WhatsApp contacts in with GupShup.
//!
//! Exit codes tell scripts what went wrong without parsing text: see the `EXIT_*` constants.

use std::time::Duration;

use crate::domain::SOURCE_HEADER;
use crate::settings::{non_empty, Settings};
use crate::store::Store;

/// The incident was stored (or an open one with the same dedup key exists).
pub const EXIT_OK: u8 = 0;
/// Anything else: an unexpected answer from the server.
pub const EXIT_OTHER: u8 = 1;
/// Settings are invalid or no admin token can be found.
pub const EXIT_CONFIG: u8 = 2;
/// The server cannot be reached (down, wrong URL) or did not answer in time.
pub const EXIT_UNREACHABLE: u8 = 3;
/// The server refused the admin token (401).
pub const EXIT_UNAUTHORIZED: u8 = 4;
/// The server refused the input (422): the message names the field.
pub const EXIT_INVALID: u8 = 5;
/// A drill ran, but some channel did not reach its contact in time.
pub const EXIT_NOT_REACHED: u8 = 6;
/// `resolve` named an incident the server does not have (404).
pub const EXIT_NOT_FOUND: u8 = 7;

/// How long to wait for the server: it answers as soon as the incident is committed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to try the database for a stored token before giving up on it.
const DB_TIMEOUT: Duration = Duration::from_secs(3);
/// Pauses before the second and third attempt, when an answer is lost or the server is busy or away.
/// Safe because every attempt carries the same dedup key: a repeat finds the stored incident.
const RETRY_PAUSES: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(3)];

#[derive(Debug, Clone)]
pub struct TriggerArgs {
    pub emergency_type: String,
    pub message: String,
    pub audio_url: Option<String>,
    /// Generated (a UUID) when absent, so that a retry of this run never alerts twice.
    pub dedup_key: Option<String>,
    /// Base URL of the server; `server.public_url` when absent.
    pub server: Option<String>,
    /// Admin token; `server.admin_token`, else the token stored in the database, when absent.
    pub token: Option<String>,
}

/// Runs the command, printing the outcome; returns the exit code.
pub async fn trigger(settings: &Settings, args: TriggerArgs) -> u8 {
    let Server {
        base,
        token,
        client,
    } = match Server::of(settings, args.server.as_deref(), args.token.as_deref()).await {
        Ok(server) => server,
        Err(code) => return code,
    };
    // A lost answer (a cut connection, a time limit) leaves it unknown whether the incident was
    // stored; with a key of its own, this run can ask again without alerting everyone twice.
    let dedup_key = args
        .dedup_key
        .clone()
        .filter(|k| !k.trim().is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let body = serde_json::json!({
        "emergency_type": args.emergency_type,
        "message": args.message,
        "audio_url": args.audio_url,
        "dedup_key": dedup_key,
    });
    let url = format!("{base}/api/v1/incidents");
    let (res, attempt) = match post_incident(&client, &url, &token, &body).await {
        Ok(sent) => sent,
        Err(e) => return unreachable(&base, &e),
    };
    let status = res.status().as_u16();
    let json: serde_json::Value = res.json().await.unwrap_or(serde_json::Value::Null);
    let text = |key: &str| json.get(key).and_then(|v| v.as_str()).unwrap_or("?");
    match status {
        201 => {
            let deliveries = json
                .get("deliveries")
                .and_then(|d| d.as_array())
                .map_or(0, Vec::len);
            println!(
                "incident {} created: {} {} alert(s) queued (route {})",
                text("id"),
                deliveries,
                text("emergency_type"),
                text("route"),
            );
            EXIT_OK
        }
        200 if attempt > 0 => {
            println!(
                "incident {} is open with this dedup key (stored by an attempt whose answer was lost, \
                 or earlier); nothing was sent twice",
                text("id")
            );
            EXIT_OK
        }
        200 => {
            println!(
                "incident {} with this dedup key is already open; nothing new was sent",
                text("id")
            );
            EXIT_OK
        }
        401 => {
            eprintln!("error: the server refused the admin token (401); check --token or server.admin_token");
            EXIT_UNAUTHORIZED
        }
        422 => {
            eprintln!("error: invalid {}: {}", text("field"), text("error"));
            EXIT_INVALID
        }
        other => {
            eprintln!(
                "error: the server answered {other}: {}",
                json.get("error")
                    .and_then(|v| v.as_str())
                    .unwrap_or("(no details)")
            );
            EXIT_OTHER
        }
    }
}

/// Reads `--server`: an http(s) URL with a host. Anything else is a usage error (clap's exit code 2)
/// naming what to write, rather than a request that fails as "cannot reach the server" (exit code 3),
/// which sends the operator looking for a server that is running fine.
pub fn server_url(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    match reqwest::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            return Ok(raw.to_owned())
        }
        _ => {}
    }
    let example = match raw.split_once("://") {
        Some((_, rest)) if !rest.is_empty() => format!("http://{rest}"),
        Some(_) => "http://127.0.0.1:8080".to_owned(),
        None if raw.is_empty() => "http://127.0.0.1:8080".to_owned(),
        None => format!("http://{raw}"),
    };
    Err(format!(
        "not an http(s) URL; give the scheme and host, like {example}"
    ))
}

/// The running server a command talks to.
struct Server {
    /// Base URL, without a trailing slash.
    base: String,
    token: String,
    client: reqwest::Client,
}

impl Server {
    /// The flag, else the settings; the exit code when no admin token can be found.
    async fn of(
        settings: &Settings,
        server: Option<&str>,
        token: Option<&str>,
    ) -> Result<Self, u8> {
        let base = server
            .map(str::to_owned)
            .unwrap_or_else(|| settings.public_base().to_owned())
            .trim_end_matches('/')
            .to_owned();
        let Some(token) = admin_token(settings, token).await else {
            eprintln!(
                "error: no admin token: pass --token, or set server.admin_token \
                 (SOS_SERVER__ADMIN_TOKEN), or run where the server's database is reachable"
            );
            return Err(EXIT_CONFIG);
        };
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| {
                eprintln!("error: cannot build an HTTP client: {e}");
                EXIT_OTHER
            })?;
        Ok(Server {
            base,
            token,
            client,
        })
    }
}

/// POSTs an incident, asking again (up to [`RETRY_PAUSES`]) when the answer is lost or the server is
/// busy or away: safe, because every attempt carries the same dedup key. The answer and how many
/// attempts were repeats.
async fn post_incident(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &serde_json::Value,
) -> Result<(reqwest::Response, usize), reqwest::Error> {
    post_again(
        client,
        url,
        token,
        Some(body),
        Some("same dedup key, nothing is sent twice"),
    )
    .await
}

/// POSTs `body` (or nothing) with the admin token, asking again (up to [`RETRY_PAUSES`]) when the
/// answer is lost or the server is busy, timed out or behind a proxy whose upstream is away. Only for
/// requests that are safe to repeat. With `warn`, each repeat is announced on stderr with that reason
/// it is safe. The answer and how many attempts were repeats.
async fn post_again(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: Option<&serde_json::Value>,
    warn: Option<&str>,
) -> Result<(reqwest::Response, usize), reqwest::Error> {
    let mut attempt = 0;
    loop {
        let mut request = client
            .post(url)
            .bearer_auth(token)
            .header(SOURCE_HEADER, "cli");
        if let Some(body) = body {
            request = request.json(body);
        }
        let sent = request.send().await;
        let retry = match &sent {
            Err(_) => true,
            Ok(r) => matches!(r.status().as_u16(), 408 | 429 | 502 | 503 | 504),
        };
        match RETRY_PAUSES.get(attempt) {
            Some(pause) if retry => {
                if let Some(safe) = warn {
                    let why = match &sent {
                        Ok(r) => format!("the server answered {}", r.status().as_u16()),
                        Err(e) => describe(e),
                    };
                    eprintln!("warning: {why}; trying again ({safe})");
                }
                attempt += 1;
                tokio::time::sleep(*pause).await;
            }
            _ => return sent.map(|r| (r, attempt)),
        }
    }
}

/// The incident id given on the command line, or `None` when it cannot be one.
fn incident_id(raw: &str) -> Option<&str> {
    let id = raw.trim();
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')).then_some(id)
}

/// Says the server cannot be reached; the exit code for it.
fn unreachable(base: &str, e: &reqwest::Error) -> u8 {
    eprintln!(
        "error: cannot reach the exotel-sos server at {base}: {}",
        describe(e)
    );
    eprintln!("       is it running? (set the URL with --server or server.public_url)");
    EXIT_UNREACHABLE
}

/// Why a request got no answer, with the causes (reqwest's Display omits "connection refused", which
/// is the useful part).
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "no answer in time".to_owned();
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// The flag, else the setting, else the token the server generated and stored in its database.
async fn admin_token(settings: &Settings, flag: Option<&str>) -> Option<String> {
    if let Some(t) = flag.map(str::trim).filter(|t| !t.is_empty()) {
        return Some(t.to_owned());
    }
    if let Some(t) = non_empty(&settings.server.admin_token) {
        return Some(t.to_owned());
    }
    // Never create a SQLite file or a token here: read only what the server stored.
    let url = settings.database.url.replace("mode=rwc", "mode=rw");
    let stored = tokio::time::timeout(DB_TIMEOUT, async {
        let store = Store::connect(&url, 1).await.ok()?;
        let token = store.existing_secret("admin_token").await.ok().flatten();
        store.close().await;
        token
    })
    .await;
    stored.ok().flatten()
}

/// `exotel-sos resolve`'s arguments.
#[derive(Debug, Clone)]
pub struct ResolveArgs {
    pub incident_id: String,
    /// Base URL of the server; `server.public_url` when absent.
    pub server: Option<String>,
    /// Admin token; `server.admin_token`, else the token stored in the database, when absent.
    pub token: Option<String>,
}

/// Resolves an incident through the running server's API (deliveries that have not gone out are
/// cancelled), printing the outcome; returns the exit code. Resolving is idempotent, so a lost answer
/// is simply asked again.
pub async fn resolve(settings: &Settings, args: ResolveArgs) -> u8 {
    let Server {
        base,
        token,
        client,
    } = match Server::of(settings, args.server.as_deref(), args.token.as_deref()).await {
        Ok(server) => server,
        Err(code) => return code,
    };
    let Some(id) = incident_id(&args.incident_id) else {
        eprintln!("error: {:?} is not an incident id", args.incident_id.trim());
        return EXIT_INVALID;
    };
    let url = format!("{base}/api/v1/incidents/{id}/resolve");
    let res = match post_again(&client, &url, &token, None, None).await {
        Ok((r, _)) => r,
        Err(e) => return unreachable(&base, &e),
    };
    match res.status().as_u16() {
        200 => {
            let body: serde_json::Value = res.json().await.unwrap_or_default();
            if body["already_resolved"] == true {
                println!("incident {id} was already resolved; nothing changed");
            } else {
                println!(
                    "incident {id} resolved; {} delivery(ies) that had not gone out cancelled",
                    body["cancelled"].as_u64().unwrap_or(0)
                );
            }
            EXIT_OK
        }
        401 => {
            eprintln!("error: the server refused the admin token");
            EXIT_UNAUTHORIZED
        }
        404 => {
            eprintln!("error: the server has no incident {id}");
            EXIT_NOT_FOUND
        }
        other => {
            eprintln!("error: the server answered {other}");
            EXIT_OTHER
        }
    }
}

/// `exotel-sos ack`'s arguments.
#[derive(Debug, Clone)]
pub struct AckArgs {
    pub incident_id: String,
    /// Who acknowledges; `user@host` when absent.
    pub by: Option<String>,
    /// Base URL of the server; `server.public_url` when absent.
    pub server: Option<String>,
    /// Admin token; `server.admin_token`, else the token stored in the database, when absent.
    pub token: Option<String>,
}

/// `user@host` of whoever runs the command, for an acknowledgement that names nobody.
pub fn default_acknowledger() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "operator".to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{}@{host}", user.trim())
}

/// Acknowledges an incident through the running server's API (calls not yet placed are cancelled,
/// everyone already alerted is told), printing the outcome; returns the exit code. A repeat is only
/// recorded, so a lost answer is simply asked again.
pub async fn ack(settings: &Settings, args: AckArgs) -> u8 {
    let Server {
        base,
        token,
        client,
    } = match Server::of(settings, args.server.as_deref(), args.token.as_deref()).await {
        Ok(server) => server,
        Err(code) => return code,
    };
    let Some(id) = incident_id(&args.incident_id) else {
        eprintln!("error: {:?} is not an incident id", args.incident_id.trim());
        return EXIT_INVALID;
    };
    let by = args.by.unwrap_or_else(default_acknowledger);
    let url = format!("{base}/api/v1/incidents/{id}/ack");
    let body = serde_json::json!({ "by": by });
    let res = match post_again(&client, &url, &token, Some(&body), None).await {
        Ok((r, _)) => r,
        Err(e) => return unreachable(&base, &e),
    };
    match res.status().as_u16() {
        200 => {
            let body: serde_json::Value = res.json().await.unwrap_or_default();
            if body["already_acknowledged"] == true {
                println!(
                    "incident {id} was already acknowledged by {}; yours is recorded",
                    body["incident"]["acknowledged_by"]
                        .as_str()
                        .unwrap_or("someone")
                );
            } else {
                println!(
                    "incident {id} acknowledged by {by}; {} call(s) not yet placed cancelled, {} notice(s) queued",
                    body["cancelled"].as_u64().unwrap_or(0),
                    body["notices"].as_u64().unwrap_or(0)
                );
            }
            EXIT_OK
        }
        401 => {
            eprintln!("error: the server refused the admin token");
            EXIT_UNAUTHORIZED
        }
        404 => {
            eprintln!("error: the server has no incident {id}");
            EXIT_NOT_FOUND
        }
        422 => {
            let body: serde_json::Value = res.json().await.unwrap_or_default();
            eprintln!(
                "error: {}",
                body["error"]
                    .as_str()
                    .unwrap_or("the server refused the input")
            );
            EXIT_INVALID
        }
        other => {
            eprintln!("error: the server answered {other}");
            EXIT_OTHER
        }
    }
}

/// A fire drill's arguments.
#[derive(Debug, Clone)]
pub struct DrillArgs {
    /// The contact to reach, by name as in the stakeholder file.
    pub contact: String,
    /// How long to wait for every channel's outcome.
    pub wait: Duration,
    pub server: Option<String>,
    pub token: Option<String>,
}

/// The state of a delivery as the API reports it; `None` for a name this build does not know (a newer
/// server), which counts as neither settled nor reached.
fn state_of(status: &str) -> Option<crate::domain::DeliveryState> {
    status.parse().ok()
}

/// How often a drill asks the server how its deliveries stand.
const DRILL_POLL: Duration = Duration::from_secs(2);

/// Runs a fire drill: raises a marked test incident for one contact through the running server, waits
/// (at most `args.wait`) for each channel's outcome and prints it. Exit 0 when every channel reached the
/// contact's phone, [`EXIT_NOT_REACHED`] otherwise (a dry-run channel too: nothing was sent), or the
/// codes of `trigger`.
pub async fn drill(settings: &Settings, args: DrillArgs) -> u8 {
    let server = match Server::of(settings, args.server.as_deref(), args.token.as_deref()).await {
        Ok(server) => server,
        Err(code) => return code,
    };
    let body = serde_json::json!({
        "emergency_type": "Drill",
        "message": "DRILL: a test of the emergency alert system. No action is needed.",
        "dedup_key": format!("drill-{}", uuid::Uuid::new_v4()),
        "drill_contact": args.contact,
    });
    let url = format!("{}/api/v1/incidents", server.base);
    let (res, _) = match post_incident(&server.client, &url, &server.token, &body).await {
        Ok(sent) => sent,
        Err(e) => return unreachable(&server.base, &e),
    };
    let status = res.status().as_u16();
    let json: serde_json::Value = res.json().await.unwrap_or(serde_json::Value::Null);
    let field = |key: &str| json.get(key).and_then(|v| v.as_str()).unwrap_or("?");
    match status {
        200 | 201 => {}
        401 => {
            eprintln!("error: the server refused the admin token (401); check --token or server.admin_token");
            return EXIT_UNAUTHORIZED;
        }
        422 => {
            eprintln!("error: invalid {}: {}", field("field"), field("error"));
            return EXIT_INVALID;
        }
        other => {
            eprintln!("error: the server answered {other}: {}", field("error"));
            return EXIT_OTHER;
        }
    }
    let id = field("id").to_owned();
    println!(
        "drill incident {id} raised for {:?}; waiting up to {}s for each channel",
        args.contact,
        args.wait.as_secs()
    );
    let deliveries = wait_for_outcomes(&server, &id, args.wait).await;
    report_drill(&deliveries)
}

/// The incident's deliveries once all are settled, or as they stand when `wait` is over.
async fn wait_for_outcomes(server: &Server, id: &str, wait: Duration) -> Vec<serde_json::Value> {
    let url = format!("{}/api/v1/incidents/{id}", server.base);
    let until = tokio::time::Instant::now() + wait;
    let mut last = Vec::new();
    loop {
        let answer = server
            .client
            .get(&url)
            .bearer_auth(&server.token)
            .send()
            .await;
        if let Ok(res) = answer {
            if let Ok(json) = res.json::<serde_json::Value>().await {
                last = json["deliveries"].as_array().cloned().unwrap_or_default();
            }
        }
        let settled = !last.is_empty()
            && last.iter().all(|d| {
                state_of(d["status"].as_str().unwrap_or("")).is_some_and(|s| s.is_settled())
            });
        if settled || tokio::time::Instant::now() >= until {
            return last;
        }
        tokio::time::sleep(DRILL_POLL).await;
    }
}

/// Prints one line per channel; the exit code.
fn report_drill(deliveries: &[serde_json::Value]) -> u8 {
    if deliveries.is_empty() {
        eprintln!("error: the drill's deliveries could not be read");
        return EXIT_OTHER;
    }
    let mut all_reached = true;
    for d in deliveries {
        let status = d["status"].as_str().unwrap_or("?");
        // A dry-run proves the routing, not the phone: it does not pass.
        let reached = state_of(status).is_some_and(|s| s.reached_phone());
        all_reached &= reached;
        let note = d["last_error"].as_str().unwrap_or("");
        println!(
            "  {:<9} {:<12} {}{}",
            d["channel"].as_str().unwrap_or("?"),
            status,
            if status == "simulated" {
                "dry-run: nothing was sent (set the channel's credentials) "
            } else {
                ""
            },
            note
        );
    }
    if all_reached {
        println!("drill passed: every channel reached the contact");
        EXIT_OK
    } else {
        println!("drill NOT passed: some channels did not reach the contact (see above)");
        EXIT_NOT_REACHED
    }
}

/// `exotel-sos optin`: opts in every WhatsApp contact not recorded yet and prints one line per contact
/// (numbers masked). 0 when all are opted in, 1 when any failed, 2 for bad settings or no credentials.
pub async fn optin(settings: &Settings) -> u8 {
    use crate::app::optin::{opt_in_all, OptIn};
    use crate::providers::Client;
    let routing = match crate::load_routing(settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return EXIT_CONFIG;
        }
    };
    let client = crate::providers::registry::gupshup(settings);
    if !client.is_live() {
        eprintln!(
            "error: GupShup credentials are not set (gupshup.userid, gupshup.password): nothing sent"
        );
        return EXIT_CONFIG;
    }
    let store = match Store::connect(&settings.database.url, 1).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot open the database: {e:#}");
            return EXIT_CONFIG;
        }
    };
    if let Err(e) = store.migrate().await {
        eprintln!("error: cannot migrate the database: {e:#}");
        return EXIT_CONFIG;
    }
    let http = reqwest::Client::new();
    let lines = opt_in_all(&store, &client, &http, &routing).await;
    store.close().await;
    let mut failed = 0;
    for line in &lines {
        let said = match &line.outcome {
            OptIn::Done => "opted in".to_owned(),
            OptIn::Already => "already opted in".to_owned(),
            OptIn::Failed(why) => {
                failed += 1;
                format!("FAILED: {why}")
            }
        };
        println!("{:<28} {:<16} {said}", line.name, line.masked);
    }
    println!("{} WhatsApp contact(s), {failed} failed", lines.len());
    if failed > 0 {
        EXIT_OTHER
    } else {
        EXIT_OK
    }
}
