//! `GET`/`HEAD /r/{reference}`: the caller's recording, behind one unguessable link per recipient.
//!
//! In proxy mode the stored recording is served from the database, range by range (phone players and
//! Exotel ask for pieces), and each open is recorded: proof of who listened. In direct mode, and for a
//! recording that was never ours to fetch, the link redirects to Exotel's URL. No token: phones open
//! these links from a message.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::edge::{public_read, PublicDb};
use super::AppState;
use crate::domain::truncate;
use crate::recordings::fetch::CHUNK_BYTES;
use crate::recordings::range::{self, Slice};
use crate::settings::RecordingMode;
use crate::store::recordings::status;
use crate::store::LinkView;

/// The look-up of a link waits this long for a share of the database.
const LOOKUP_WAIT: Duration = Duration::from_secs(2);
/// Each chunk of a recording being sent waits this long.
const CHUNK_WAIT: Duration = Duration::from_secs(10);
/// Longest user agent kept in an open event.
const MAX_AGENT_CHARS: usize = 200;

pub async fn recording(
    State(state): State<AppState>,
    limits: PublicDb,
    method: Method,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(reference): Path<String>,
) -> Response {
    // References are generated ids: a long one or one with control characters (which PostgreSQL would
    // refuse as text) names nothing.
    if reference.len() > 128 || reference.chars().any(char::is_control) {
        return text(StatusCode::NOT_FOUND, "No such recording.");
    }
    // Anyone can ask: the look-up runs within the unauthenticated share of the database, so a flood of
    // guesses cannot take the Passthru's connections.
    let store = state.store.clone();
    let wanted = reference.clone();
    let found = public_read(&limits, LOOKUP_WAIT, async move {
        store.recording_link(&wanted).await
    })
    .await;
    let view = match found {
        Some(Ok(Some(view))) => view,
        Some(Ok(None)) => return text(StatusCode::NOT_FOUND, "No such recording."),
        None => return busy(),
        Some(Err(e)) => {
            tracing::error!(error = format!("{e:#}"), "recording link look-up failed");
            return busy();
        }
    };
    let settings = &state.settings;
    let proxied = settings.recording_mode() == RecordingMode::Proxy && view.status.is_some();
    if !proxied {
        return match view.recording_url.as_deref().filter(|u| !has_userinfo(u)) {
            Some(url) => match HeaderValue::from_str(url) {
                Ok(location) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
                Err(_) => text(
                    StatusCode::NOT_FOUND,
                    "This alert has no playable recording.",
                ),
            },
            None => text(StatusCode::NOT_FOUND, "This alert has no recording."),
        };
    }
    let ttl = settings.recordings.link_ttl_ms().unwrap_or(7 * 86_400_000);
    let now = state.store.now_ms();
    if now > view.issued_at.saturating_add(ttl) {
        return text(
            StatusCode::GONE,
            "This recording link has expired. Ask the emergency desk for the recording.",
        );
    }
    match view.status.as_deref() {
        Some(status::STORED) => {}
        Some(status::PENDING) => {
            let wait = view
                .due_at
                .map_or(30, |due| (due - now) / 1000)
                .clamp(5, 60);
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, wait.to_string())],
                "The recording is not ready yet: the phone system is still processing it. Try again in a minute.\n",
            )
                .into_response();
        }
        Some(status::DELETED) => {
            return text(
                StatusCode::GONE,
                "This recording was deleted after the retention period.",
            )
        }
        _ => {
            return text(
                StatusCode::GONE,
                "This recording never became available. The alert's text has the details.",
            )
        }
    }
    if method == Method::GET {
        record_open(&state, &view, &reference, &headers, peer.map(|p| p.0 .0));
    }
    serve_stored(&state, limits, &method, &headers, &view)
}

/// The stored recording, whole or the asked-for range, streamed chunk by chunk.
fn serve_stored(
    state: &AppState,
    limits: PublicDb,
    method: &Method,
    headers: &HeaderMap,
    view: &LinkView,
) -> Response {
    let len = view.bytes.unwrap_or(0).max(0) as u64;
    let content_type = view
        .content_type
        .clone()
        .unwrap_or_else(|| "audio/mpeg".to_owned());
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range::slice(range_header, len) {
        Slice::Unsatisfiable => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response();
        }
        Slice::Whole if len == 0 => (StatusCode::OK, 0, 0),
        Slice::Whole => (StatusCode::OK, 0, len - 1),
        Slice::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end),
    };
    let length = if len == 0 { 0 } else { end - start + 1 };
    let body = if *method == Method::HEAD || length == 0 {
        Body::empty()
    } else {
        Body::from_stream(chunks(
            state.store.clone(),
            limits,
            view.incident_id.clone(),
            start,
            end,
        ))
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=300"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    response
}

/// Bytes `start..=end` of the stored recording, read one chunk at a time within the unauthenticated
/// share of the database. A chunk that cannot be read ends the body with an error (the client sees a
/// cut-off answer, never wrong bytes).
fn chunks(
    store: crate::store::Store,
    limits: PublicDb,
    incident_id: String,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let size = CHUNK_BYTES as u64;
    let first = start / size;
    let last = end / size;
    futures_util::stream::unfold(Some(first), move |next| {
        let store = store.clone();
        let limits = limits.clone();
        let incident_id = incident_id.clone();
        async move {
            let seq = next.filter(|s| *s <= last)?;
            let read = public_read(&limits, CHUNK_WAIT, async move {
                store.recording_chunk(&incident_id, seq).await
            })
            .await;
            let data = match read {
                Some(Ok(Some(data))) => data,
                other => {
                    let why = match other {
                        Some(Err(e)) => format!("{e:#}"),
                        Some(Ok(None)) => format!("chunk {seq} is missing"),
                        _ => "the database was busy".to_owned(),
                    };
                    tracing::error!(error = %why, "recording body cut off");
                    return Some((Err(std::io::Error::other(why)), None));
                }
            };
            let chunk_start = seq * size;
            let from = start.saturating_sub(chunk_start) as usize;
            let to = ((end - chunk_start + 1) as usize).min(data.len());
            let piece = if from < to {
                Bytes::from(data).slice(from..to)
            } else {
                Bytes::new()
            };
            Some((Ok(piece), Some(seq + 1)))
        }
    })
}

/// Records who opened the link (time, user agent, client address masked), once per client and link
/// in ten minutes, beside the answer rather than before it.
fn record_open(
    state: &AppState,
    view: &LinkView,
    reference: &str,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) {
    let trusted = state.settings.server.trusted_proxies().unwrap_or_default();
    let client = peer
        .map(|p| client_address(p.ip(), headers, &trusted))
        .map(masked)
        .unwrap_or_else(|| "unknown".to_owned());
    if !state.recording_opens.first(reference, &client) {
        return;
    }
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|a| truncate(a, MAX_AGENT_CHARS))
        .unwrap_or_else(|| "none".to_owned());
    let detail = format!("recording link opened from {client}, user agent: {agent}");
    let store = state.store.clone();
    let delivery_id = view.delivery_id.clone();
    tokio::spawn(async move {
        if let Err(e) = store
            .record_event(&delivery_id, "recording_opened", None, &detail)
            .await
        {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not record a recording open"
            );
        }
    });
}

/// The client's address: the peer's, or, when the peer is a trusted proxy, the last address in
/// `X-Forwarded-For` that is not itself a trusted proxy (the earlier ones are the client's to write).
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|a| !trusted.contains(a))
        .unwrap_or(peer)
}

/// An address masked to its network: IPv4 to /24, IPv6 to /48.
pub fn masked(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => masked(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
            }
        },
    }
}

/// A URL carrying a user name or password is never handed to a phone.
fn has_userinfo(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
}

fn text(status: StatusCode, message: &'static str) -> Response {
    (status, format!("{message}\n")).into_response()
}

fn busy() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5")],
        "Busy; try again in a few seconds.\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_masked_to_their_network() {
        assert_eq!(masked("203.0.113.77".parse().unwrap()), "203.0.113.0/24");
        assert_eq!(
            masked("2001:db8:1234:5678::1".parse().unwrap()),
            "2001:db8:1234::/48"
        );
        assert_eq!(masked("::ffff:10.1.2.3".parse().unwrap()), "10.1.2.0/24");
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 198.51.100.9, 10.0.0.2"),
        );
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let stranger: IpAddr = "192.0.2.5".parse().unwrap();
        assert_eq!(client_address(stranger, &headers, &[proxy]), stranger);
        // From the proxy: the nearest address that is not a trusted proxy.
        assert_eq!(
            client_address(proxy, &headers, &[proxy]),
            "198.51.100.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_address(proxy, &HeaderMap::new(), &[proxy]), proxy);
    }
}
