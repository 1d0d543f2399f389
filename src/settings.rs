//! Typed, layered settings: built-in defaults, then a file, then `SOS_<SECTION>__<KEY>` variables.

use std::path::{Path, PathBuf};

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The built-in defaults, compiled in so the binary runs from any directory.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub exotel: ExotelSettings,
    pub gupshup: GupshupSettings,
    pub stakeholders: StakeholderSettings,
    pub messages: MessageSettings,
    pub incidents: IncidentSettings,
    pub dispatch: DispatchSettings,
    pub log: LogSettings,
    pub alertmanager: AlertmanagerSettings,
    pub readyz: ReadyzSettings,
    pub housekeeping: HousekeepingSettings,
    pub retention: RetentionSettings,
    pub recordings: RecordingsSettings,
    pub ack: AckSettings,
    pub alarms: AlarmSettings,
    pub auditor: AuditorSettings,
}

/// Where alarms go besides the `[unreached]` teams of the stakeholder file.
#[derive(Debug, Clone, Deserialize)]
pub struct AlarmSettings {
    /// Each alarm (nobody reached, an account problem) is POSTed here as JSON, retried until taken;
    /// empty: none.
    pub webhook_url: String,
}

/// The auditor: checks that every open incident is moving.
#[derive(Debug, Clone, Deserialize)]
pub struct AuditorSettings {
    /// How often (`30s`).
    pub every: String,
    /// Called (GET) after each clean pass, for an outside dead-man's switch; empty: none.
    pub heartbeat_url: String,
}

impl AuditorSettings {
    /// `every`, validated at start-up.
    pub fn every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(parse_duration_secs(&self.every).unwrap_or(30).max(1))
    }
}

/// Acknowledgement: how a person says they have the emergency.
#[derive(Debug, Clone, Deserialize)]
pub struct AckSettings {
    /// The key pressed in the call's Gather to acknowledge (`1`); empty turns acknowledgement by
    /// keypress off: an answered call then counts as reached.
    pub digit: String,
    /// Nobody acknowledged by then: the incident is unreached (`15m`).
    pub deadline: String,
}

impl AckSettings {
    /// `deadline` in seconds (validated at start-up; 15 minutes stands in for a value that cannot occur).
    pub fn deadline_secs(&self) -> u64 {
        parse_duration_secs(&self.deadline).unwrap_or(900)
    }

    /// The acknowledging digits, when acknowledgement by keypress is on.
    pub fn digit(&self) -> Option<&str> {
        Some(self.digit.trim()).filter(|d| !d.is_empty())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub listen: String,
    pub public_url: String,
    pub webhook_token: SecretString,
    pub admin_token: SecretString,
    /// Console sign-in that can only view, acknowledge and resolve (the front desk); empty: none.
    pub console_token: SecretString,
    pub request_timeout_secs: u64,
    pub max_body_bytes: usize,
    pub max_uri_bytes: usize,
    /// Time a client has to send a request's headers (also the idle limit between kept-alive requests).
    pub header_read_timeout_secs: u64,
    /// Open connections at most.
    pub max_connections: usize,
    /// Of `max_connections`, the share that only `/exotel/*` requests may use.
    pub reserved_for_exotel: usize,
    /// Concurrent database reads by unauthenticated routes (`/r/…`, `/readyz`, `/metrics`).
    pub public_db_concurrency: usize,
    /// Peers (IP addresses, comma-separated) whose `X-Forwarded-For` is believed.
    #[serde(default)]
    pub trusted_proxies: String,
}

impl ServerSettings {
    /// `trusted_proxies` parsed; an entry that is not an IP address is an error naming it.
    pub fn trusted_proxies(&self) -> Result<Vec<std::net::IpAddr>, String> {
        self.trusted_proxies
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse().map_err(|_| {
                    format!("server.trusted_proxies: {s:?} is not an IP address like 10.0.0.2")
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ExotelSettings {
    pub base_url: String,
    pub account_sid: String,
    pub api_key: SecretString,
    pub api_token: SecretString,
    pub caller_id: String,
    /// The ExoPhones emergencies are called in on, comma-separated; with `caller_id` the numbers a
    /// request with a wrong token must name to count toward the token alarm. Empty: `caller_id` alone.
    #[serde(default)]
    pub inbound_numbers: String,
    pub flow_url: String,
    pub sms_from: String,
    pub dlt_entity_id: String,
    /// The alert's DLT template id; other kinds have `messages.kinds.<kind>.dlt_template_id`.
    pub dlt_template_id: String,
    /// Sent as `SmsType`; empty leaves the field out.
    pub sms_type: String,
    /// Sent as `Priority`; empty leaves the field out.
    pub sms_priority: String,
    pub call_timeout_secs: u64,
    pub ring_timeout_secs: u64,
    pub sms_timeout_secs: u64,
}

impl ExotelSettings {
    /// The numbers of this account that Exotel's requests name (`CallTo`, `To`): `inbound_numbers`
    /// and `caller_id`, parsed with `region`. An entry of `inbound_numbers` that is not a phone number
    /// is an error naming it (masked); a `caller_id` that is not one is left out (calls would fail
    /// anyway, and the start warns when no number is left).
    pub fn our_numbers(
        &self,
        region: phonenumber::country::Id,
    ) -> Result<Vec<crate::domain::Phone>, String> {
        let mut numbers = Vec::new();
        for entry in self
            .inbound_numbers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let phone = crate::domain::Phone::parse(entry, region)
                .map_err(|e| format!("exotel.inbound_numbers: {e}"))?;
            numbers.push(phone);
        }
        if let Ok(phone) = crate::domain::Phone::parse(&self.caller_id, region) {
            numbers.push(phone);
        }
        numbers.sort();
        numbers.dedup();
        Ok(numbers)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct GupshupSettings {
    pub base_url: String,
    pub userid: String,
    pub password: SecretString,
    pub msg_type: String,
    pub template: bool,
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StakeholderSettings {
    pub file: PathBuf,
    pub default_country: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MessageSettings {
    /// The alert's SMS text (the `alert` kind).
    pub sms: String,
    /// The alert's WhatsApp text.
    pub whatsapp: String,
    /// The name the alert's WhatsApp text is registered under.
    pub whatsapp_template: String,
    /// The sender's brand name, which DLT requires in every SMS (`{brand}` in a template).
    pub brand: String,
    /// The other kinds' texts and ids, by [`MessageKind::key`]; a kind or field left empty uses the
    /// alert's.
    ///
    /// [`MessageKind::key`]: crate::domain::message_kind::MessageKind::key
    #[serde(default)]
    pub kinds: std::collections::BTreeMap<String, KindSettings>,
    pub recording_link: RecordingLink,
    pub greeting_text: String,
    pub greeting_fallback: String,
    pub greeting_repeat: u32,
    /// Said after the text alert while the caller's recording is still being fetched.
    pub greeting_recording_pending: String,
    /// Spoken instead of the alert by a later tier's call or a redial answered after someone
    /// acknowledged (its last look at the incident came a moment before the acknowledgement).
    pub greeting_acknowledged: String,
    pub utc_offset_minutes: i32,
}

/// One message kind's texts and registered ids (`messages.kinds.<kind>`); empty uses the alert's.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct KindSettings {
    #[serde(default)]
    pub sms: String,
    #[serde(default)]
    pub dlt_template_id: String,
    #[serde(default)]
    pub whatsapp: String,
    #[serde(default)]
    pub whatsapp_template: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IncidentSettings {
    /// DESIGN's `incidents.auto_resolve_after`: `24h`, `90m`, `45s`, `2d` or plain seconds.
    pub auto_resolve_after: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordingLink {
    Direct,
    Short,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DispatchSettings {
    pub enabled: bool,
    pub poll_interval_ms: u64,
    pub lease_secs: f64,
    pub retry_schedule_secs: String,
    pub max_attempts: u32,
    pub retry_after_max_secs: f64,
    pub redial_delay_secs: f64,
    pub max_redials: u32,
    pub shutdown_grace_secs: f64,
    pub report_wait_secs: f64,
    /// Transient failures are retried for at least this long (`30m`), whatever `max_attempts` says:
    /// a provider outage must not use up an emergency's attempts.
    pub retry_for: String,
    pub call_concurrency: u32,
    pub call_per_minute: u32,
    pub sms_concurrency: u32,
    pub sms_per_minute: u32,
    pub whatsapp_concurrency: u32,
    pub whatsapp_per_minute: u32,
    /// Calls to one number in any hour, across incidents, counting redials, repeats and follow-ups;
    /// the first call of an incident to a contact is never held back by it.
    pub max_calls_per_number_per_hour: u32,
}

/// The longest retry wait accepted in `dispatch.retry_schedule_secs`: a day.
pub const MAX_RETRY_WAIT_SECS: f64 = 86_400.0;

/// The shortest `dispatch.poll_interval_ms` accepted. The dispatcher is woken whenever work is stored;
/// the poll only finds work that falls due by time (a retry, a later tier, a redial). Each poll is a
/// query per channel, so an idle server pays for it: at 10 ms (what 0 became) about 8% of a core, at
/// 50 ms about a third of that, at the default 1000 ms next to nothing.
pub const MIN_POLL_INTERVAL_MS: u64 = 50;

/// Exotel's and the world's time zones lie within UTC-14h..UTC+14h.
pub const MAX_UTC_OFFSET_MINUTES: i32 = 14 * 60;

impl DispatchSettings {
    /// The retry waits, parsed from `"2, 5, 15"`.
    pub fn retry_schedule(&self) -> Result<Vec<std::time::Duration>, String> {
        let waits: Result<Vec<_>, _> = self
            .retry_schedule_secs
            .split(',')
            .map(|s| s.trim().parse::<f64>())
            .collect();
        // Checked before converting: `Duration::from_secs_f64` panics on values too large for a
        // Duration (1e300), and a wait of more than a day is a typo, not a retry policy.
        match waits {
            Ok(w) if !w.is_empty() && w.iter().all(|s| (0.0..=MAX_RETRY_WAIT_SECS).contains(s)) => {
                Ok(w.into_iter()
                    .map(std::time::Duration::from_secs_f64)
                    .collect())
            }
            _ => Err(format!(
                "dispatch.retry_schedule_secs {:?} is not a list of seconds like \"2, 5, 15\", each at \
                 most {MAX_RETRY_WAIT_SECS} (a day)",
                self.retry_schedule_secs
            )),
        }
    }

    /// `retry_for` in seconds.
    pub fn retry_for_secs(&self) -> Result<u64, String> {
        // Zero is allowed here: then `max_attempts` alone bounds the retries.
        let zero = self.retry_for.trim().trim_end_matches(['s', 'm', 'h', 'd']) == "0";
        let secs = if zero {
            Some(0)
        } else {
            parse_duration_secs(&self.retry_for)
        };
        secs.ok_or_else(|| {
            format!(
                "dispatch.retry_for {:?} is not a duration like 30m, 1h or 90s",
                self.retry_for
            )
        })
    }

    /// Time kept back after a provider request for recording its outcome (a quarter of the lease,
    /// 1 to 10 s): a request is started only while its time limit plus this margin fits in the lease.
    /// What to do with a call that was not reached; shared by callbacks and look-ups.
    pub fn redial_policy(&self) -> crate::domain::RedialPolicy {
        crate::domain::RedialPolicy {
            delay: std::time::Duration::from_secs_f64(self.redial_delay_secs),
            max_redials: self.max_redials,
            keypress: false,
        }
    }

    pub fn lease_margin(&self) -> std::time::Duration {
        let quarter = self.lease_secs / 4.0;
        if quarter.is_finite() {
            std::time::Duration::from_secs_f64(quarter.clamp(1.0, 10.0))
        } else {
            std::time::Duration::ZERO
        }
    }

    /// (concurrency, requests a minute) for a channel.
    pub fn limits(&self, channel: crate::domain::Channel) -> (u32, u32) {
        use crate::domain::Channel;
        match channel {
            Channel::Call => (self.call_concurrency, self.call_per_minute),
            Channel::Sms => (self.sms_concurrency, self.sms_per_minute),
            Channel::Whatsapp => (self.whatsapp_concurrency, self.whatsapp_per_minute),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AlertmanagerSettings {
    /// The alert label whose value is the emergency type.
    pub type_label: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReadyzSettings {
    /// The dispatcher counts as alive while its last heartbeat is younger than this.
    pub heartbeat_stale_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HousekeepingSettings {
    /// How often open incidents past `incidents.auto_resolve_after` are looked for.
    pub auto_resolve_every_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RetentionSettings {
    /// Resolved incidents older than this many days (by `resolved_at`) are deleted with their deliveries
    /// and events. `0` keeps everything: the records are the proof of who was reached.
    pub keep_days: u32,
    /// How often to look for incidents past `keep_days`, milliseconds.
    pub every_ms: u64,
    /// Incidents deleted per transaction.
    pub batch: u32,
}

impl RetentionSettings {
    /// How long a resolved incident is kept, in milliseconds; `None` for "forever".
    pub fn keep_ms(&self) -> Option<i64> {
        (self.keep_days > 0).then(|| i64::from(self.keep_days).saturating_mul(86_400_000))
    }
}

/// The most `recordings.concurrency` may be: each fetch holds a database connection while it writes a
/// chunk, and the emergencies need theirs.
pub const MAX_RECORDING_FETCHES: usize = 32;

/// `recordings.*`: what becomes of the caller's recording.
#[derive(Debug, Clone, Deserialize)]
pub struct RecordingsSettings {
    /// `proxy`, `direct`, or empty: `proxy` when the Exotel credentials are set, else `direct`.
    pub mode: String,
    pub allowed_hosts: String,
    pub allow_http: bool,
    pub fetch_grace: String,
    pub max_bytes: u64,
    pub link_ttl: String,
    pub keep_days: u32,
    pub followup_call: bool,
    /// Recordings fetched at once by one process.
    pub concurrency: usize,
}

/// How the caller's recording reaches the people alerted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordingMode {
    /// Fetched with the Exotel credentials, kept, and served at `/r/<ref>`.
    Proxy,
    /// Exotel's URL as it is.
    Direct,
}

impl RecordingsSettings {
    pub fn fetch_grace_ms(&self) -> Result<i64, String> {
        duration_ms("recordings.fetch_grace", &self.fetch_grace)
    }

    pub fn link_ttl_ms(&self) -> Result<i64, String> {
        duration_ms("recordings.link_ttl", &self.link_ttl)
    }

    pub fn keep_ms(&self) -> Option<i64> {
        (self.keep_days > 0).then(|| i64::from(self.keep_days).saturating_mul(86_400_000))
    }
}

/// Parses `recordings.allowed_hosts`, a comma-separated string: trims, lower-cases, drops empties;
/// an entry with a scheme or path is an `Err` naming it.
pub fn parse_hosts(raw: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for entry in raw.split(',') {
        let entry = entry.trim().to_ascii_lowercase();
        if entry.is_empty() {
            continue;
        }
        if entry.contains("://") {
            return Err(format!(
                "recordings.allowed_hosts entry {entry:?} has a scheme: give the host only, e.g. recordings.exotel.com"
            ));
        }
        if entry.contains(['/', '\\', '?', '#']) {
            return Err(format!(
                "recordings.allowed_hosts entry {entry:?} has a path: give the host only, e.g. recordings.exotel.com"
            ));
        }
        if entry.contains('@') || entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "recordings.allowed_hosts entry {entry:?} is not a host or host:port"
            ));
        }
        let (host, _) = split_host_entry(&entry).ok_or_else(|| {
            format!("recordings.allowed_hosts entry {entry:?} has a port that is not a number from 1 to 65535")
        })?;
        // The URL parser is the judge of what a host is, so the list and `check` agree.
        let valid = reqwest::Url::parse(&format!("http://{host}/"))
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .is_some_and(|h| !h.is_empty());
        if !valid {
            return Err(format!(
                "recordings.allowed_hosts entry {entry:?} is not a valid host name"
            ));
        }
        if !hosts.contains(&entry) {
            hosts.push(entry);
        }
    }
    Ok(hosts)
}

/// `host` or `host:port` (IPv6 as `[::1]:8080`) into its parts; `None` when the port is not a port.
pub fn split_host_entry(entry: &str) -> Option<(&str, Option<u16>)> {
    let port_at = if entry.starts_with('[') {
        // `[::1]` or `[::1]:8080`: only a colon after the bracket separates a port.
        let close = entry.find(']')?;
        match &entry[close + 1..] {
            "" => return Some((entry, None)),
            rest if rest.starts_with(':') => close + 1,
            _ => return None,
        }
    } else {
        match entry.rfind(':') {
            Some(i) => i,
            None => return Some((entry, None)),
        }
    };
    let port = entry[port_at + 1..]
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)?;
    Some((&entry[..port_at], Some(port)))
}

fn duration_ms(key: &str, raw: &str) -> Result<i64, String> {
    parse_duration_secs(raw)
        .and_then(|s| i64::try_from(s).ok())
        .and_then(|s| s.checked_mul(1000))
        .ok_or_else(|| format!("{key} {raw:?} is not a duration like 15m, 7d or 90s"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

impl IncidentSettings {
    /// `auto_resolve_after` in seconds.
    pub fn auto_resolve_after_secs(&self) -> Result<u64, String> {
        parse_duration_secs(&self.auto_resolve_after).ok_or_else(|| {
            format!(
                "incidents.auto_resolve_after {:?} is not a duration like 24h, 90m, 45s or 2d",
                self.auto_resolve_after
            )
        })
    }
}

/// `24h`, `90m`, `45s`, `2d` or plain seconds.
pub(crate) fn parse_duration_secs(raw: &str) -> Option<u64> {
    let raw = raw.trim();
    let (number, unit) = match raw.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => raw.split_at(i),
        None => (raw, "s"),
    };
    let n: u64 = number.parse().ok()?;
    let scale = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(scale).filter(|&secs| secs > 0)
}

/// `Some(secret)` when the value is set, `None` for an empty string.
pub fn non_empty(secret: &SecretString) -> Option<&str> {
    let s = secret.expose_secret();
    (!s.trim().is_empty()).then_some(s)
}

impl Settings {
    /// Loads the layers. `file` comes from `--config`, else `SOS_CONFIG`.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Same as [`Settings::load`] with an explicit environment, so tests do not touch the process's.
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SOS_"))
            .collect();
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env.get("SOS_CONFIG").map(PathBuf::from));
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = &file {
            anyhow::ensure!(
                path.exists(),
                "settings file {} does not exist",
                path.display()
            );
            builder = builder.add_source(config::File::from(path.as_path()).required(true));
        }
        let env_source = config::Environment::with_prefix("SOS")
            .prefix_separator("_")
            .separator("__")
            .source(Some(
                env.into_iter().filter(|(k, _)| k != "SOS_CONFIG").collect(),
            ));
        let settings: Settings = builder
            .add_source(env_source)
            .build()
            .context("reading settings")?
            .try_deserialize()
            .context("settings have a wrong or missing value")?;
        settings.validate()?;
        Ok(settings)
    }

    /// The checks startup runs; `check-config` runs exactly these too.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "server.listen {:?} is not an address like 127.0.0.1:8080",
                self.server.listen
            ));
        }
        match reqwest::Url::parse(&self.server.public_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => problems.push(format!(
                "server.public_url {:?} is not an http(s) URL",
                self.server.public_url
            )),
        }
        for (key, url) in [
            ("exotel.base_url", &self.exotel.base_url),
            ("gupshup.base_url", &self.gupshup.base_url),
        ] {
            if !matches!(
                reqwest::Url::parse(url)
                    .map(|u| u.scheme().to_owned())
                    .as_deref(),
                Ok("http" | "https")
            ) {
                problems.push(format!("{key} {url:?} is not an http(s) URL"));
            }
        }
        if !(self.database.url.starts_with("sqlite:") || self.database.url.starts_with("postgres"))
        {
            problems.push("database.url must start with sqlite:// or postgres://".to_owned());
        }
        // A console token is typed on phones at the front desk, but it still guards the board: a short
        // one would fall to guessing despite the sign-in rate limit.
        if let Some(t) = non_empty(&self.server.console_token) {
            if t.chars().count() < 16 {
                problems.push("server.console_token must be at least 16 characters".to_owned());
            }
            // A sign-in is checked against the admin token first: the front desk would be admins.
            if non_empty(&self.server.admin_token) == Some(t) {
                problems.push(
                    "server.console_token must differ from server.admin_token: a console sign-in \
                     with it would carry the admin's rights"
                        .to_owned(),
                );
            }
        }
        // The webhook token sits in the flow URLs pasted into Exotel's dashboard and in every
        // callback URL Exotel logs: whoever sees one must not hold the admin's or the console's rights.
        if let Some(w) = non_empty(&self.server.webhook_token) {
            for (key, other) in [
                ("server.admin_token", &self.server.admin_token),
                ("server.console_token", &self.server.console_token),
            ] {
                if non_empty(other) == Some(w) {
                    problems.push(format!(
                        "server.webhook_token must differ from {key}: it travels in the URLs Exotel \
                         calls and logs"
                    ));
                }
            }
        }
        if self.database.max_connections == 0 {
            problems.push("database.max_connections must be at least 1".to_owned());
        }
        // The Passthru waits up to 5 s for the database before answering 302 (the flow's fallback
        // branch); a shorter request limit would answer 408 first.
        if self.server.request_timeout_secs <= 5 {
            problems.push("server.request_timeout_secs must be more than 5".to_owned());
        }
        let server = &self.server;
        // Slow clients: at most 10 s to send headers, so idle connections free their slots quickly.
        if !(1..=10).contains(&server.header_read_timeout_secs) {
            problems.push("server.header_read_timeout_secs must be 1..=10".to_owned());
        }
        if server.max_connections < 2 {
            problems.push("server.max_connections must be at least 2".to_owned());
        }
        if server.reserved_for_exotel == 0 || server.reserved_for_exotel >= server.max_connections {
            problems.push(
                "server.reserved_for_exotel must be at least 1 and less than server.max_connections"
                    .to_owned(),
            );
        }
        // Unauthenticated reads must leave the Passthru a database connection.
        if server.public_db_concurrency == 0
            || (self.database.max_connections > 1
                && server.public_db_concurrency >= self.database.max_connections as usize)
        {
            problems.push(
                "server.public_db_concurrency must be at least 1 and less than database.max_connections"
                    .to_owned(),
            );
        }
        match crate::domain::phone::region(&self.stakeholders.default_country) {
            Some(region) => {
                if let Err(e) = self.exotel.our_numbers(region) {
                    problems.push(e);
                }
            }
            None => problems.push(format!(
                "stakeholders.default_country {:?} is not a known region code such as IN",
                self.stakeholders.default_country
            )),
        }
        if self.alertmanager.type_label.trim().is_empty() {
            problems.push("alertmanager.type_label must name a label".to_owned());
        }
        if self.readyz.heartbeat_stale_secs == 0 {
            problems.push("readyz.heartbeat_stale_secs must be at least 1".to_owned());
        }
        // Each round asks the database something: below the dispatcher's floor an idle server would
        // keep a core busy for nothing, as a 0 poll interval did.
        if self.housekeeping.auto_resolve_every_ms < MIN_POLL_INTERVAL_MS {
            problems.push(format!(
                "housekeeping.auto_resolve_every_ms must be at least {MIN_POLL_INTERVAL_MS}"
            ));
        }
        // Multiplied by 60 into a chrono offset: out of range it would overflow or be silently ignored.
        if !(-MAX_UTC_OFFSET_MINUTES..=MAX_UTC_OFFSET_MINUTES)
            .contains(&self.messages.utc_offset_minutes)
        {
            problems.push(format!(
                "messages.utc_offset_minutes must be within -{MAX_UTC_OFFSET_MINUTES}..={MAX_UTC_OFFSET_MINUTES} \
                 (UTC-14h to UTC+14h), not {}",
                self.messages.utc_offset_minutes
            ));
        }
        if self.retention.every_ms < MIN_POLL_INTERVAL_MS {
            problems.push(format!(
                "retention.every_ms must be at least {MIN_POLL_INTERVAL_MS}"
            ));
        }
        if !(1..=10_000).contains(&self.retention.batch) {
            problems.push("retention.batch must be 1 to 10000".to_owned());
        }
        problems.extend(self.message_problems());
        if self.messages.greeting_repeat == 0 {
            problems.push("messages.greeting_repeat must be at least 1".to_owned());
        }
        if let Err(e) = self.incidents.auto_resolve_after_secs() {
            problems.push(e);
        }
        let d = &self.dispatch;
        if d.poll_interval_ms < MIN_POLL_INTERVAL_MS {
            problems.push(format!(
                "dispatch.poll_interval_ms must be at least {MIN_POLL_INTERVAL_MS} (milliseconds), not {}: \
                 stored work wakes the dispatcher at once, the poll only finds retries and later tiers \
                 falling due, and a shorter one keeps an idle server busy",
                d.poll_interval_ms
            ));
        }
        if let Err(e) = d.retry_schedule() {
            problems.push(e);
        }
        if let Err(e) = d.retry_for_secs() {
            problems.push(e);
        }
        for c in crate::domain::Channel::ALL {
            let (concurrency, per_minute) = d.limits(c);
            if concurrency == 0 || per_minute == 0 {
                problems.push(format!(
                    "dispatch.{c}_concurrency and dispatch.{c}_per_minute must be at least 1"
                ));
            }
        }
        const DAY: f64 = 86_400.0;
        for (key, value, max) in [
            ("dispatch.lease_secs", d.lease_secs, DAY),
            ("dispatch.retry_after_max_secs", d.retry_after_max_secs, DAY),
            ("dispatch.redial_delay_secs", d.redial_delay_secs, DAY),
            ("dispatch.shutdown_grace_secs", d.shutdown_grace_secs, DAY),
            // Exotel keeps call details for far longer, but a report a week late helps nobody.
            ("dispatch.report_wait_secs", d.report_wait_secs, 7.0 * DAY),
        ] {
            // Durations are built from these on request and dispatch paths (`from_secs_f64` panics on
            // huge values, and deadlines are added to clocks): a bad one must stop start-up instead.
            if !(0.0..=max).contains(&value) {
                problems.push(format!(
                    "{key} must be a number of seconds from 0 to {max}, not {value}"
                ));
            }
        }
        if d.max_attempts == 0 {
            problems.push("dispatch.max_attempts must be at least 1".to_owned());
        }
        let longest = self
            .exotel
            .call_timeout_secs
            .max(self.exotel.sms_timeout_secs)
            .max(self.gupshup.timeout_secs);
        if d.lease_secs.is_nan() || d.lease_secs <= longest as f64 + d.lease_margin().as_secs_f64()
        {
            problems.push(format!(
                "dispatch.lease_secs ({}) must exceed the longest provider time limit ({longest} s) plus a margin (a \
                 quarter of the lease, 1 to 10 s) to record the outcome, or a slow request would be sent twice",
                d.lease_secs
            ));
        }
        if !(self.exotel.ring_timeout_secs > 0 && self.exotel.ring_timeout_secs <= 60) {
            problems.push("exotel.ring_timeout_secs must be 1 to 60".to_owned());
        }
        problems.extend(self.recording_problems());
        let digit = self.ack.digit.trim();
        if digit.len() > 8
            || !digit
                .chars()
                .all(|c| c.is_ascii_digit() || c == '*' || c == '#')
        {
            problems.push("ack.digit must be empty or up to 8 keys of 0-9, * and #".to_owned());
        }
        if parse_duration_secs(&self.ack.deadline).is_none() {
            problems.push(format!(
                "ack.deadline: {:?} is not a duration (15m, 90s, 1h)",
                self.ack.deadline
            ));
        }
        if parse_duration_secs(&self.auditor.every).is_none_or(|s| s == 0) {
            problems.push(format!(
                "auditor.every: {:?} is not a duration (30s, 1m)",
                self.auditor.every
            ));
        }
        for (key, url) in [
            ("alarms.webhook_url", &self.alarms.webhook_url),
            ("auditor.heartbeat_url", &self.auditor.heartbeat_url),
        ] {
            let url = url.trim();
            if !url.is_empty()
                && !reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
            {
                problems.push(format!("{key} must be empty or an http(s) URL"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("invalid settings:\n  - {}", problems.join("\n  - "))
        }
    }

    /// The redial policy of calls, with acknowledgement by keypress as `ack.digit` sets it.
    pub fn redial_policy(&self) -> crate::domain::RedialPolicy {
        crate::domain::RedialPolicy {
            keypress: self.ack.digit().is_some(),
            ..self.dispatch.redial_policy()
        }
    }

    /// One kind's texts and ids; a field the kind leaves empty is the alert's.
    pub fn message_kind(
        &self,
        kind: crate::domain::message_kind::MessageKind,
    ) -> crate::domain::message_kind::KindTexts {
        let m = &self.messages;
        let alert = crate::domain::message_kind::KindTexts {
            sms: m.sms.clone(),
            dlt_template_id: self.exotel.dlt_template_id.trim().to_owned(),
            whatsapp: m.whatsapp.clone(),
            whatsapp_template: m.whatsapp_template.trim().to_owned(),
        };
        let Some(own) = m.kinds.get(kind.key()) else {
            return alert;
        };
        let or = |own: &str, alert: String| {
            if own.trim().is_empty() {
                alert
            } else {
                own.to_owned()
            }
        };
        crate::domain::message_kind::KindTexts {
            sms: or(&own.sms, alert.sms),
            dlt_template_id: or(own.dlt_template_id.trim(), alert.dlt_template_id),
            whatsapp: or(&own.whatsapp, alert.whatsapp),
            whatsapp_template: or(own.whatsapp_template.trim(), alert.whatsapp_template),
        }
    }

    /// Unknown message kinds and SMS request values Exotel does not know.
    fn message_problems(&self) -> Vec<String> {
        use crate::domain::message_kind::MessageKind;
        let mut problems = Vec::new();
        for key in self.messages.kinds.keys() {
            match MessageKind::from_key(key) {
                Some(MessageKind::Alert) => problems.push(
                    "messages.kinds.alert: the alert's texts are messages.sms, messages.whatsapp, \
                     messages.whatsapp_template and exotel.dlt_template_id"
                        .to_owned(),
                ),
                Some(_) => {}
                None => problems.push(format!(
                    "messages.kinds.{key} is not a message kind (kinds: {})",
                    MessageKind::ALL
                        .iter()
                        .filter(|k| **k != MessageKind::Alert)
                        .map(|k| k.key())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }
        }
        let sms_type = self.exotel.sms_type.trim();
        if !matches!(
            sms_type,
            "" | "transactional" | "transactional_opt_in" | "promotional"
        ) {
            problems.push(format!(
                "exotel.sms_type {sms_type:?} is not transactional, transactional_opt_in, promotional or empty"
            ));
        }
        let priority = self.exotel.sms_priority.trim();
        if !matches!(priority, "" | "normal" | "high") {
            problems.push(format!(
                "exotel.sms_priority {priority:?} is not normal, high or empty"
            ));
        }
        problems
    }

    /// Whether each channel has its credentials (live) or runs dry-run.
    /// `recordings.mode`, with the empty default resolved: `proxy` when the Exotel credentials are set.
    pub fn recording_mode(&self) -> RecordingMode {
        match self.recordings.mode.trim() {
            "proxy" => RecordingMode::Proxy,
            "direct" => RecordingMode::Direct,
            _ => {
                if self.exotel_credentials() {
                    RecordingMode::Proxy
                } else {
                    RecordingMode::Direct
                }
            }
        }
    }

    fn exotel_credentials(&self) -> bool {
        !self.exotel.account_sid.trim().is_empty()
            && non_empty(&self.exotel.api_key).is_some()
            && non_empty(&self.exotel.api_token).is_some()
    }

    fn recording_problems(&self) -> Vec<String> {
        let r = &self.recordings;
        let mut problems = Vec::new();
        if !matches!(r.mode.trim(), "" | "proxy" | "direct") {
            problems.push(format!(
                "recordings.mode {:?} is not proxy, direct or empty (proxy when the Exotel credentials are set)",
                r.mode
            ));
        }
        for e in [r.fetch_grace_ms().err(), r.link_ttl_ms().err()]
            .into_iter()
            .flatten()
        {
            problems.push(e);
        }
        if let Err(e) = parse_hosts(&r.allowed_hosts) {
            problems.push(e);
        }
        if r.max_bytes == 0 {
            problems.push("recordings.max_bytes must be at least 1".to_owned());
        }
        if !(1..=MAX_RECORDING_FETCHES).contains(&r.concurrency) {
            problems.push(format!(
                "recordings.concurrency must be from 1 to {MAX_RECORDING_FETCHES}"
            ));
        }
        if let Err(e) = self.server.trusted_proxies() {
            problems.push(e);
        }
        problems
    }

    pub fn channel_live(&self, channel: crate::domain::Channel) -> bool {
        use crate::domain::Channel;
        let exotel = !self.exotel.account_sid.trim().is_empty()
            && non_empty(&self.exotel.api_key).is_some()
            && non_empty(&self.exotel.api_token).is_some();
        match channel {
            Channel::Call => {
                exotel
                    && !self.exotel.caller_id.trim().is_empty()
                    && !self.exotel.flow_url.trim().is_empty()
            }
            Channel::Sms => exotel && !self.exotel.sms_from.trim().is_empty(),
            Channel::Whatsapp => {
                !self.gupshup.userid.trim().is_empty()
                    && non_empty(&self.gupshup.password).is_some()
            }
        }
    }

    /// The public base URL without a trailing slash.
    pub fn public_base(&self) -> &str {
        self.server.public_url.trim_end_matches('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_env_overrides_win() {
        let s = Settings::load_with_env(
            None,
            [
                (
                    "SOS_DATABASE__URL".to_owned(),
                    "postgres://x@y/z".to_owned(),
                ),
                ("SOS_SERVER__WEBHOOK_TOKEN".to_owned(), "12345".to_owned()),
                ("OTHER".to_owned(), "ignored".to_owned()),
            ],
        )
        .unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:8080");
        assert_eq!(s.database.url, "postgres://x@y/z");
        assert_eq!(non_empty(&s.server.webhook_token), Some("12345"));
        assert_eq!(non_empty(&s.server.admin_token), None);
        // Secrets never show in Debug output.
        assert!(!format!("{s:?}").contains("12345"));
    }

    #[test]
    fn invalid_values_are_all_reported() {
        let err = Settings::load_with_env(
            None,
            [
                ("SOS_SERVER__LISTEN".to_owned(), "nowhere".to_owned()),
                (
                    "SOS_STAKEHOLDERS__DEFAULT_COUNTRY".to_owned(),
                    "XX".to_owned(),
                ),
            ],
        )
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("server.listen"), "{text}");
        assert!(text.contains("default_country"), "{text}");
    }

    fn with(entries: &[(&str, &str)]) -> anyhow::Result<Settings> {
        Settings::load_with_env(
            None,
            entries.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn a_huge_retry_wait_is_refused_not_a_panic() {
        for schedule in ["1e300", "2, 5, 1e20", "86401"] {
            let err = with(&[("SOS_DISPATCH__RETRY_SCHEDULE_SECS", schedule)]).unwrap_err();
            assert!(
                format!("{err:#}").contains("dispatch.retry_schedule_secs"),
                "{schedule}: {err:#}"
            );
        }
        assert!(with(&[("SOS_DISPATCH__RETRY_SCHEDULE_SECS", "0, 0.5, 86400")]).is_ok());
    }

    #[test]
    fn recording_fetches_at_once_are_bounded() {
        assert_eq!(with(&[]).unwrap().recordings.concurrency, 4);
        for value in ["0", "33"] {
            let err = with(&[("SOS_RECORDINGS__CONCURRENCY", value)]).unwrap_err();
            assert!(
                format!("{err:#}").contains("recordings.concurrency"),
                "{value}: {err:#}"
            );
        }
        assert!(with(&[("SOS_RECORDINGS__CONCURRENCY", "1")]).is_ok());
        assert!(with(&[("SOS_RECORDINGS__CONCURRENCY", "32")]).is_ok());
    }

    #[test]
    fn durations_in_seconds_are_bounded() {
        for (key, value) in [
            ("SOS_DISPATCH__LEASE_SECS", "1e8"),
            ("SOS_DISPATCH__RETRY_AFTER_MAX_SECS", "1e300"),
            ("SOS_DISPATCH__REDIAL_DELAY_SECS", "86401"),
            ("SOS_DISPATCH__SHUTDOWN_GRACE_SECS", "86401"),
            ("SOS_DISPATCH__REPORT_WAIT_SECS", "604801"),
            ("SOS_DISPATCH__REPORT_WAIT_SECS", "NaN"),
            ("SOS_DISPATCH__REDIAL_DELAY_SECS", "-1"),
        ] {
            let err = with(&[(key, value)]).unwrap_err();
            let name = key
                .trim_start_matches("SOS_DISPATCH__")
                .to_ascii_lowercase();
            assert!(format!("{err:#}").contains(&name), "{key}={value}: {err:#}");
        }
        assert!(with(&[("SOS_DISPATCH__REPORT_WAIT_SECS", "604800")]).is_ok());
    }

    #[test]
    fn our_numbers_are_the_inbound_numbers_and_the_caller_id_normalised() {
        let s = with(&[
            ("SOS_EXOTEL__CALLER_ID", "08069891522"),
            (
                "SOS_EXOTEL__INBOUND_NUMBERS",
                "+91 80 4000 0001, 0091 80 6989 1522",
            ),
        ])
        .unwrap();
        let numbers: Vec<String> = s
            .exotel
            .our_numbers(phonenumber::country::Id::IN)
            .unwrap()
            .iter()
            .map(|p| p.e164().to_owned())
            .collect();
        assert_eq!(numbers, ["+918040000001", "+918069891522"]);
        let s = with(&[("SOS_EXOTEL__CALLER_ID", "08069891522")]).unwrap();
        assert_eq!(
            s.exotel
                .our_numbers(phonenumber::country::Id::IN)
                .unwrap()
                .len(),
            1,
            "empty: the caller id alone"
        );
        let err =
            with(&[("SOS_EXOTEL__INBOUND_NUMBERS", "+91 80 4000 0001, reception")]).unwrap_err();
        assert!(
            format!("{err:#}").contains("exotel.inbound_numbers"),
            "{err:#}"
        );
    }

    #[test]
    fn the_utc_offset_is_a_real_zone_offset() {
        for offset in ["841", "-841", "2147483647"] {
            let err = with(&[("SOS_MESSAGES__UTC_OFFSET_MINUTES", offset)]).unwrap_err();
            assert!(
                format!("{err:#}").contains("messages.utc_offset_minutes"),
                "{offset}: {err:#}"
            );
        }
        for offset in ["840", "-840", "0", "-210"] {
            assert!(
                with(&[("SOS_MESSAGES__UTC_OFFSET_MINUTES", offset)]).is_ok(),
                "{offset}"
            );
        }
    }
}
