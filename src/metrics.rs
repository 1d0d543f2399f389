//! Prometheus metrics: counters bumped where things happen, queue gauges computed from the store at scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

use crate::domain::{Channel, DeliveryState, Source};
use crate::stakeholders::DEFAULT_ROUTE;
use crate::store::QueueStats;

/// The content type of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus prefers).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`Metrics::encode_classic`]'s output (the classic Prometheus text format, for
/// scrapers and tools such as `promtool` that do not ask for OpenMetrics).
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IncidentLabels {
    source: String,
    emergency_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    endpoint: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    channel: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    channel: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountAlarmLabels {
    lane: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FindingLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: String,
}

fn provider_histogram() -> Histogram {
    // 50 ms .. ~25 s: provider APIs answer in tens of milliseconds, a stuck one hits the client timeout.
    Histogram::new(exponential_buckets(0.05, 2.0, 10))
}

/// Every metric the service exports; one per process, shared through `AppState`.
pub struct Metrics {
    registry: Registry,
    incidents: Family<IncidentLabels, Counter>,
    webhook_requests: Family<WebhookLabels, Counter>,
    provider_requests: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    deliveries: Family<DeliveryLabels, Counter>,
    queue_depth: Gauge,
    queue_scheduled: Gauge,
    unconfirmed: Gauge,
    queue_oldest_age: Gauge<f64, AtomicU64>,
    unreached: Counter,
    account_alarms: Family<AccountAlarmLabels, Counter>,
    calls_held: Counter,
    auditor_findings: Family<FindingLabels, Counter>,
    task_restarts: Family<TaskLabels, Counter>,
    auditor_passes: Counter,
    auditor_stalls: Gauge,
    auditor_last_clean_pass: Gauge<f64, AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let incidents = Family::<IncidentLabels, Counter>::default();
        registry.register(
            "sos_incidents",
            "Incidents created, by source and emergency type (routed types only; others count as default)",
            incidents.clone(),
        );
        let webhook_requests = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "sos_webhook_requests",
            "HTTP requests answered, by matched route and status code (not_exotel: a scanner refused)",
            webhook_requests.clone(),
        );
        let provider_requests =
            Family::<ProviderLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                provider_histogram,
            );
        registry.register_with_unit(
            "sos_provider_request_duration",
            "Time taken by provider API requests, by channel and outcome",
            Unit::Seconds,
            provider_requests.clone(),
        );
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "sos_deliveries",
            "Deliveries that reached a final state, by channel and state",
            deliveries.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "sos_queue_depth",
            "Deliveries due to go out now (status queued, due)",
            queue_depth.clone(),
        );
        let queue_scheduled = Gauge::default();
        registry.register(
            "sos_queue_scheduled",
            "Deliveries queued for later: escalation tiers to come, redials and retries waiting their time",
            queue_scheduled.clone(),
        );
        let queue_oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "sos_queue_oldest_due_age_seconds",
            "How long the oldest queued delivery has been due (0 when none is overdue)",
            queue_oldest_age.clone(),
        );
        let unconfirmed = Gauge::default();
        registry.register(
            "sos_deliveries_unconfirmed",
            "Calls and messages accepted by the provider whose status report is overdue (past dispatch.report_wait_secs)",
            unconfirmed.clone(),
        );
        let unreached = Counter::default();
        registry.register(
            "sos_incidents_unreached",
            "Incidents marked unreached: nobody acknowledged by the end of their escalation or ack.deadline",
            unreached.clone(),
        );
        let account_alarms = Family::<AccountAlarmLabels, Counter>::default();
        registry.register(
            "sos_account_alarms",
            "Account alarms raised by this process: a provider refusing the account (auth, credit, DLT block) or a burst of bad webhook tokens, by lane and reason",
            account_alarms.clone(),
        );
        let calls_held = Counter::default();
        registry.register(
            "sos_calls_held",
            "Calls held back by the carrier-safe cap (dispatch.max_calls_per_number_per_hour); each goes once the hour allows it",
            calls_held.clone(),
        );
        let auditor_findings = Family::<FindingLabels, Counter>::default();
        registry.register(
            "sos_auditor_findings",
            "Stalls the auditor found, by kind (queued_overdue, sending_expired, report_stalled, held_overdue, unreached_overdue, provider_silent, check_failed)",
            auditor_findings.clone(),
        );
        let task_restarts = Family::<TaskLabels, Counter>::default();
        registry.register(
            "sos_task_restarts",
            "Background tasks (the auditor, the unreached sweep, the alarm sender...) that stopped and were started again, by task",
            task_restarts.clone(),
        );
        let auditor_passes = Counter::default();
        registry.register(
            "sos_auditor_passes",
            "Auditor passes run by this replica",
            auditor_passes.clone(),
        );
        let auditor_stalls = Gauge::default();
        registry.register(
            "sos_auditor_stalls",
            "Stalls the auditor's last pass on this replica found (0: every open incident is moving)",
            auditor_stalls.clone(),
        );
        let auditor_last_clean_pass = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "sos_auditor_last_clean_pass_timestamp_seconds",
            "When this replica's auditor last found nothing stalled (Unix time; 0: never)",
            auditor_last_clean_pass.clone(),
        );
        Metrics {
            unreached,
            account_alarms,
            calls_held,
            auditor_findings,
            task_restarts,
            auditor_passes,
            auditor_stalls,
            auditor_last_clean_pass,
            unconfirmed,
            registry,
            incidents,
            webhook_requests,
            provider_requests,
            deliveries,
            queue_depth,
            queue_scheduled,
            queue_oldest_age,
        }
    }

    /// A new incident was stored. Unrouted types count under `default`, so a caller cannot grow the
    /// label set without bound by sending made-up types.
    pub fn incident_created(&self, source: Source, emergency_type: &str, route: &str) {
        let emergency_type = if route == DEFAULT_ROUTE {
            DEFAULT_ROUTE
        } else {
            emergency_type
        };
        self.incidents
            .get_or_create(&IncidentLabels {
                source: source.as_str().to_owned(),
                emergency_type: emergency_type.to_owned(),
            })
            .inc();
    }

    /// An HTTP request was answered; `endpoint` is the matched route pattern, never the raw URI;
    /// `status` its status code, or `not_exotel` for a stranger's request to Exotel's webhooks refused
    /// for its token.
    pub fn webhook_request(&self, endpoint: &str, status: &str) {
        self.webhook_requests
            .get_or_create(&WebhookLabels {
                endpoint: endpoint.to_owned(),
                status: status.to_owned(),
            })
            .inc();
    }

    /// One provider API request took `seconds` and ended in `outcome` (e.g. `accepted`, `transient`,
    /// `permanent`, `timeout`).
    pub fn provider_request(&self, channel: &str, outcome: &str, seconds: f64) {
        self.provider_requests
            .get_or_create(&ProviderLabels {
                channel: channel.to_owned(),
                outcome: outcome.to_owned(),
            })
            .observe(seconds);
    }

    /// A delivery moved to `state`: counted as finished if that ends it ([`DeliveryState::ends_delivery`],
    /// where a provider without reports ends at acceptance). The one place that decides what
    /// "finished" means for the metric.
    /// A delivery already finished that moves on (a late report correcting a guess) is not counted
    /// again.
    pub fn delivery_moved(
        &self,
        channel: Channel,
        from: DeliveryState,
        to: DeliveryState,
        provider_reports: bool,
    ) {
        if to.ends_delivery(provider_reports) && !from.ends_delivery(provider_reports) {
            self.delivery_finished(channel.as_str(), to.as_str());
        }
    }

    /// An incident was marked unreached.
    pub fn incident_unreached(&self) {
        self.unreached.inc();
    }

    /// An account alarm was raised (lane and reason come from a fixed vocabulary, never from input).
    pub fn account_alarm(&self, lane: &str, reason: &str) {
        self.account_alarms
            .get_or_create(&AccountAlarmLabels {
                lane: lane.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one finished delivery (`delivered`, `failed`, `simulated`, `cancelled`, ...).
    pub fn delivery_finished(&self, channel: &str, state: &str) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                channel: channel.to_owned(),
                state: state.to_owned(),
            })
            .inc();
    }

    /// `n` calls were held back by the carrier-safe cap.
    pub fn calls_held(&self, n: usize) {
        self.calls_held.inc_by(n as u64);
    }

    /// One auditor pass ended with these findings (kind, how many); `now_ms` is when, by the wall clock.
    pub fn auditor_pass(&self, findings: &[(&str, usize)], now_ms: i64) {
        self.auditor_passes.inc();
        for (kind, n) in findings {
            self.auditor_findings
                .get_or_create(&FindingLabels {
                    kind: (*kind).to_owned(),
                })
                .inc_by(*n as u64);
        }
        self.auditor_stalls.set(findings.len() as i64);
        if findings.is_empty() {
            self.auditor_last_clean_pass.set(now_ms as f64 / 1000.0);
        }
    }

    /// A background task stopped and is started again.
    pub fn task_restarted(&self, task: &str) {
        self.task_restarts
            .get_or_create(&TaskLabels {
                task: task.to_owned(),
            })
            .inc();
    }

    /// Sets the queue gauges from the store's figures at `now_ms`.
    pub fn set_queue(&self, stats: QueueStats, now_ms: i64) {
        self.queue_depth.set(stats.depth);
        self.queue_scheduled.set(stats.scheduled);
        self.unconfirmed.set(stats.unconfirmed);
        let age = stats
            .oldest_due_at
            .map(|due| (now_ms - due).max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        self.queue_oldest_age.set(age);
    }

    /// The OpenMetrics exposition ([`OPENMETRICS_CONTENT_TYPE`]).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The classic Prometheus text exposition ([`CLASSIC_CONTENT_TYPE`]).
    pub fn encode_classic(&self) -> Result<String, std::fmt::Error> {
        Ok(openmetrics_to_classic(&self.encode()?))
    }
}

/// Rewrites OpenMetrics text as the classic format: counter families take their samples' `_total` name
/// (OpenMetrics names the family without it), and the `# UNIT` and `# EOF` lines, unknown there, go.
fn openmetrics_to_classic(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut help: Option<(&str, &str)> = None;
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ');
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let family = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some((help_name, doc)) = help.take() {
                if help_name == name {
                    out.push_str(&format!("# HELP {family} {doc}\n"));
                }
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_with_total_and_drops_openmetrics_lines() {
        let m = Metrics::new();
        m.delivery_finished("sms", "delivered");
        m.provider_request("call", "accepted", 0.1);
        let classic = m.encode_classic().unwrap();
        assert!(
            classic.contains("# HELP sos_deliveries_total "),
            "{classic}"
        );
        assert!(classic.contains("# TYPE sos_deliveries_total counter"));
        assert!(classic.contains("sos_deliveries_total{channel=\"sms\",state=\"delivered\"} 1"));
        assert!(classic.contains("# TYPE sos_provider_request_duration_seconds histogram"));
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"));
    }
}
