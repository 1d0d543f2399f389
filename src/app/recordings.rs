//! The caller's recording in proxy mode: the task that fetches it (durable jobs, retried with backoff
//! until it arrives or its deadline passes), the follow-up calls for contacts whose call came before it,
//! and its deletion after `recordings.keep_days`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::AppState;
use crate::domain::{mask, Channel, Purpose};
use crate::providers::exotel::call_details;
use crate::recordings::fetch::{self, ChunkSink, Credentials, FetchConfig, FetchError};
use crate::settings::RecordingMode;
use crate::store::{AttemptFailed, RecordingFetch, RecordingRow, Store};

/// How often the task looks for due fetches and follow-ups. Each look is one read; a claim (a write)
/// happens only when a job is due.
const TICK: Duration = Duration::from_millis(500);
/// How often stored recordings are checked against `recordings.keep_days`.
const EXPIRY_EVERY: Duration = Duration::from_secs(600);
/// Consecutive 401/403 answers after which Exotel's Call Details API is asked for the URL (it may
/// return a pre-signed one).
const AUTH_REFUSALS_BEFORE_DETAILS: i64 = 2;
/// Waits between tries: 2 s, doubling, at most 30 s (a recording takes 1 to 15 minutes).
const FIRST_WAIT_MS: i64 = 2_000;
const LONGEST_WAIT_MS: i64 = 30_000;

/// Whether a new incident's recording at `url` is to be fetched and served by us, and with which
/// deadline; `Err(why)` when proxy mode is on but this URL may not be requested (it is then used as it
/// is, and the reason recorded).
pub fn fetch_for(
    state: &AppState,
    url: &str,
    available_by: Option<i64>,
) -> Result<Option<RecordingFetch>, String> {
    let settings = &state.settings;
    if settings.recording_mode() != RecordingMode::Proxy {
        return Ok(None);
    }
    let config = FetchConfig::from_settings(&settings.recordings)?;
    config.check(url)?;
    Ok(Some(RecordingFetch {
        available_by,
        grace_ms: settings.recordings.fetch_grace_ms()?,
    }))
}

/// Fetches due recordings, queues follow-up calls and deletes expired recordings until `shutdown`
/// turns true. Errors are logged and retried on the next round.
///
/// Up to `recordings.concurrency` fetches run at once, each a task of its own beside this loop: one
/// recording on a slow line holds its own slot, never the others' fetches nor the follow-ups.
pub async fn run(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let settings = state.settings.clone();
    let config = match FetchConfig::from_settings(&settings.recordings) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::error!(error = %e, "recordings: invalid settings; nothing will be fetched");
            return;
        }
    };
    let client = match fetch::client(&config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "recordings: cannot build the HTTP client"
            );
            return;
        }
    };
    let fetcher = Fetcher {
        client,
        config,
        process: uuid::Uuid::new_v4().simple().to_string(),
        slots: settings.recordings.concurrency.max(1),
    };
    let mut fetches: JoinSet<()> = JoinSet::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_expiry: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            // A fetch ended: its slot takes the next due job at once.
            Some(ended) = fetches.join_next(), if !fetches.is_empty() => fetch_ended(ended),
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            // A stop cuts the fetches short and hands their jobs back at once, so the next process (or
            // another replica) fetches them without waiting out the leases.
            fetches.shutdown().await;
            if let Err(e) = state.store.release_recordings(&fetcher.process).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "recordings: could not hand back a fetch on stopping"
                );
            }
            return;
        }
        while let Some(ended) = fetches.try_join_next() {
            fetch_ended(ended);
        }
        if let Err(e) = fetcher.start_due(&state, &mut fetches).await {
            tracing::warn!(error = format!("{e:#}"), "recordings: fetch round failed");
        }
        if settings.recordings.followup_call {
            if let Err(e) = queue_followups(&state).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "recordings: follow-up round failed"
                );
            }
        }
        if last_expiry.is_none_or(|t| t.elapsed() >= EXPIRY_EVERY) {
            last_expiry = Some(tokio::time::Instant::now());
            if let Some(keep_ms) = settings.recordings.keep_ms() {
                match state
                    .store
                    .delete_recordings_stored_before(state.store.now_ms() - keep_ms, 100)
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(recordings = n, "recordings past keep_days deleted"),
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "recordings: deletion failed")
                    }
                }
            }
        }
    }
}

/// A fetch task that panicked (a bug) leaves its job under lease: it is claimed again when the lease
/// runs out. Said loudly, as a stopped background task is.
fn fetch_ended(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        if e.is_panic() {
            tracing::error!(why = %e, "recordings: a fetch panicked; it is tried again when its lease runs out");
        }
    }
}

/// What fetches recordings: one per process, shared by its fetch tasks.
#[derive(Clone)]
struct Fetcher {
    client: reqwest::Client,
    config: Arc<FetchConfig>,
    /// This process's part of every lease token (see [`Fetcher::start_due`]).
    process: String,
    /// `recordings.concurrency`.
    slots: usize,
}

impl Fetcher {
    /// Claims as many due jobs as there are free slots beside the fetches running (`fetches`), and
    /// starts a fetch of each.
    ///
    /// Each claim gets a lease token of its own (this process's, then a fresh part): should a job's
    /// lease run out while its fetch still runs, and the job be claimed again, here or by another
    /// replica, the earlier fetch can no longer write a chunk or an outcome to it.
    async fn start_due(&self, state: &AppState, fetches: &mut JoinSet<()>) -> anyhow::Result<()> {
        let free = self.slots.saturating_sub(fetches.len());
        if free == 0 || !state.store.recording_due(state.store.now_ms()).await? {
            return Ok(());
        }
        for _ in 0..free {
            let token = format!("{}:{}", self.process, uuid::Uuid::new_v4().simple());
            let Some(job) = state.store.claim_recording(&token).await? else {
                break;
            };
            let (fetcher, state) = (self.clone(), state.clone());
            fetches.spawn(async move {
                if let Err(e) = attempt(&state, &fetcher.client, &fetcher.config, &job, &token).await
                {
                    tracing::warn!(
                        incident_id = %job.incident_id,
                        error = format!("{e:#}"),
                        "recordings: could not record a fetch's outcome; it is tried again when its lease runs out"
                    );
                }
            });
        }
        Ok(())
    }
}

/// The Exotel credentials, when set: sent only to hosts on `recordings.allowed_hosts`.
fn credentials(state: &AppState) -> Credentials {
    crate::providers::exotel::recording::credentials(&exotel_account(state))
}

/// One try at one job, and what it came to, recorded.
#[tracing::instrument(skip_all, fields(incident_id = %job.incident_id, attempt = job.attempts))]
async fn attempt(
    state: &AppState,
    client: &reqwest::Client,
    config: &FetchConfig,
    job: &RecordingRow,
    token: &str,
) -> anyhow::Result<()> {
    let store = &state.store;
    let creds = credentials(state);
    let mut sink = StoreSink {
        store,
        incident_id: &job.incident_id,
        token,
    };
    let mut result = fetch::fetch(client, config, &job.source_url, &creds, &mut sink).await;
    // Exotel refused the credentials more than once: its Call Details API may know a URL that works
    // (a pre-signed one, on accounts that have them).
    if matches!(result, Err(FetchError::AuthRefused(_)))
        && job.auth_refusals + 1 >= AUTH_REFUSALS_BEFORE_DETAILS
    {
        if let Some(sid) = job.call_sid.as_deref() {
            result = match call_details::recording_url(client, &exotel_account(state), sid).await {
                Ok(Some((url, presigned))) => {
                    // A pre-signed URL carries its own authorisation.
                    let creds = if presigned { Credentials::None } else { creds };
                    match fetch::fetch(client, config, &url, &creds, &mut sink).await {
                        // A URL from the details that we may not fetch ends nothing: the recording
                        // URL itself is tried again.
                        Err(FetchError::Refused(why)) => Err(FetchError::AuthRefused(format!(
                            "recording URL refused the credentials; the Call Details API's URL cannot be used: {why}"
                        ))),
                        other => other,
                    }
                }
                Ok(None) => Err(FetchError::AuthRefused(
                    "recording URL refused the credentials; the Call Details API names no other URL"
                        .to_owned(),
                )),
                Err(why) => Err(FetchError::AuthRefused(format!(
                    "recording URL refused the credentials; Call Details API: {why}"
                ))),
            };
        }
    }
    match result {
        Ok(fetched) => {
            if store
                .recording_stored(
                    job,
                    token,
                    &fetched.content_type,
                    fetched.bytes,
                    fetched.chunks,
                )
                .await?
            {
                tracing::info!(
                    bytes = fetched.bytes,
                    content_type = %fetched.content_type,
                    "recording fetched and stored"
                );
                if state.settings.recordings.followup_call {
                    queue_followups(state).await?;
                }
            }
        }
        Err(e) => {
            let now = state.store.now_ms();
            let why = e.to_string();
            let next = match &e {
                FetchError::Refused(_) => AttemptFailed::GiveUp,
                _ if now >= job.deadline_at => AttemptFailed::GiveUp,
                _ => AttemptFailed::Retry {
                    due_at: (now + backoff_ms(job.attempts)).min(job.deadline_at),
                    auth_refused: matches!(e, FetchError::AuthRefused(_)),
                },
            };
            if next == AttemptFailed::GiveUp {
                tracing::error!(reason = %why, "RECORDING UNAVAILABLE: alerts use text only");
            } else {
                tracing::info!(reason = %why, "recording not fetched yet; will try again");
            }
            store
                .recording_attempt_failed(job, token, &why, next)
                .await?;
        }
    }
    Ok(())
}

/// The wait after the `attempts`-th try.
fn backoff_ms(attempts: i64) -> i64 {
    let doublings = u32::try_from(attempts.clamp(1, 16) - 1).unwrap_or(0);
    FIRST_WAIT_MS
        .saturating_mul(1 << doublings)
        .min(LONGEST_WAIT_MS)
}

fn exotel_account(state: &AppState) -> crate::providers::exotel::Account {
    use secrecy::ExposeSecret;
    let e = &state.settings.exotel;
    crate::providers::exotel::Account {
        base_url: e.base_url.clone(),
        account_sid: e.account_sid.clone(),
        api_key: e.api_key.expose_secret().to_owned(),
        api_token: e.api_token.clone(),
    }
}

/// Writes each chunk of a download as it arrives, in its own statement.
struct StoreSink<'a> {
    store: &'a Store,
    incident_id: &'a str,
    token: &'a str,
}

impl ChunkSink for StoreSink<'_> {
    fn put(
        &mut self,
        seq: u64,
        data: Vec<u8>,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send {
        self.store
            .put_recording_chunk(self.incident_id, self.token, seq, data)
    }
}

/// Queues the one follow-up call for each contact whose call could only speak text (the recording was
/// not in yet), none of whose calls played the recording, and whose calls are all finished (a redial
/// still to come plays the recording itself). Open incidents; once acknowledged, only the person who
/// acknowledged.
pub async fn queue_followups(state: &AppState) -> anyhow::Result<usize> {
    let candidates = state.store.followup_candidates().await?;
    if candidates.is_empty() {
        return Ok(0);
    }
    let Some(lane) = state.providers.for_channel(Channel::Call) else {
        return Ok(0);
    };
    // (incident, phone) → (name, needs a follow-up)
    let mut contacts: BTreeMap<(&str, &str), (&str, bool)> = BTreeMap::new();
    for c in &candidates {
        let entry = contacts
            .entry((c.incident_id.as_str(), c.phone.as_str()))
            .or_insert((c.contact_name.as_str(), true));
        // A call left `answered` (picked up, no keypress) is over: its redial, if one was due, was
        // queued at once.
        let finished = c.status.is_final() || c.status == crate::domain::DeliveryState::Answered;
        if c.played_recording_at.is_some() || !finished || c.purpose == Purpose::Followup {
            entry.1 = false;
        }
    }
    let mut added = 0;
    for ((incident_id, phone), (name, needed)) in contacts {
        if !needed {
            continue;
        }
        if state
            .store
            .add_followup(incident_id, name, phone, &lane.name)
            .await?
        {
            tracing::info!(
                incident_id,
                contact = %name,
                phone = %mask(phone),
                "follow-up call queued: it plays the recording that arrived after the first call"
            );
            added += 1;
        }
    }
    if added > 0 {
        state.wake.notify_one();
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_from_two_seconds_up_to_thirty() {
        let waits: Vec<i64> = (1..=7).map(backoff_ms).collect();
        assert_eq!(waits, [2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]);
        assert_eq!(backoff_ms(0), 2_000);
        assert_eq!(backoff_ms(i64::MAX), 30_000);
    }
}
