//! Downloads one call recording, safely: only from listed hosts, within a size and time limit,
//! streamed in fixed-size chunks, and kept only when the answer is audio.
//!
//! The URL and the credentials come from the provider's module under `providers/`. This module
//! makes one attempt and says what kind of failure it met; the worker that calls it owns the retries
//! and the storage.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

/// Bytes per chunk handed to a [`ChunkSink`]: every chunk but the last is exactly this long.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Most redirects followed for one recording.
const MAX_REDIRECTS: usize = 5;

/// Settings the fetch obeys (built by the caller from `recordings.*` settings).
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Lower-case hosts or host:port allowed (the same list is trusted with the provider's
    /// credentials).
    pub allowed_hosts: Vec<String>,
    pub allow_http: bool,
    pub max_bytes: u64,
    /// Whole-request time limit.
    pub timeout: Duration,
}

impl FetchConfig {
    /// Parses `recordings.allowed_hosts` (see [`crate::settings::parse_hosts`]).
    pub fn parse_hosts(raw: &str) -> Result<Vec<String>, String> {
        crate::settings::parse_hosts(raw)
    }

    /// What `recordings.*` allows.
    pub fn from_settings(settings: &crate::settings::RecordingsSettings) -> Result<Self, String> {
        Ok(FetchConfig {
            allowed_hosts: Self::parse_hosts(&settings.allowed_hosts)?,
            allow_http: settings.allow_http,
            max_bytes: settings.max_bytes,
            timeout: std::time::Duration::from_secs(60),
        })
    }

    /// `Ok(parsed URL)` when the URL may be requested: scheme https (or http when `allow_http`), no
    /// userinfo in the URL, and its host — or host:port when a port is given explicitly — is on the
    /// list (an entry `host` matches only the default port of the scheme; `host:port` matches that
    /// exact port). `Err(why)` otherwise, a sentence a person understands.
    pub fn check(&self, url: &str) -> Result<reqwest::Url, String> {
        // The parser's own message never quotes the input, which may carry a signature.
        let parsed = reqwest::Url::parse(url.trim())
            .map_err(|e| format!("the recording URL is not a valid URL ({e})"))?;
        match parsed.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(format!(
                    "{} is plain http, which recordings.allow_http does not allow",
                    redacted(&parsed)
                ))
            }
            other => {
                return Err(format!(
                    "the recording URL has scheme {other:?}; only https is fetched"
                ))
            }
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // Not printed: the user name and password are exactly what must stay out of the text.
            return Err(
                "the recording URL carries a user name or password in it; it is not fetched"
                    .to_owned(),
            );
        }
        let host = match parsed.host_str() {
            Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
            _ => return Err("the recording URL has no host".to_owned()),
        };
        let explicit = parsed.port();
        let effective = parsed.port_or_known_default();
        let allowed =
            self.allowed_hosts
                .iter()
                .any(|entry| match crate::settings::split_host_entry(entry) {
                    Some((h, None)) => h.eq_ignore_ascii_case(&host) && explicit.is_none(),
                    Some((h, Some(p))) => h.eq_ignore_ascii_case(&host) && effective == Some(p),
                    None => false,
                });
        if allowed {
            Ok(parsed)
        } else {
            Err(format!(
                "host {} is not in recordings.allowed_hosts",
                host_port(&parsed)
            ))
        }
    }
}

/// `host` or `host:port` of a URL, the port only when given explicitly.
fn host_port(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    }
}

/// `scheme://host/path` of a URL, for messages and logs: a pre-signed URL carries its signature in
/// the query, and a user name or password would sit before the host, so neither is ever printed.
fn redacted(url: &reqwest::Url) -> String {
    let path: String = url.path().chars().take(200).collect();
    format!("{}://{}{path}", url.scheme(), host_port(url))
}

/// A reqwest client for recordings: redirects followed (at most 5) only while each next URL passes
/// `check`; otherwise the redirect is not followed and [`fetch`] fails with `Refused`, naming the
/// host. Built once by the worker.
///
/// reqwest drops the `Authorization` header when a redirect changes host, port or scheme, so the
/// provider's credentials only ever go to the host first asked, which is on the list.
pub fn client(cfg: &FetchConfig) -> anyhow::Result<reqwest::Client> {
    let policy_cfg = cfg.clone();
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        // `previous` holds every URL already requested, the first one included.
        if attempt.previous().len() > MAX_REDIRECTS {
            attempt.stop()
        } else if policy_cfg.check(attempt.url().as_str()).is_ok() {
            attempt.follow()
        } else {
            // The 3xx is handed back; `fetch` turns it into a refusal naming the host.
            attempt.stop()
        }
    });
    let client = reqwest::Client::builder()
        .redirect(policy)
        // A Referer would hand the signed URL of one host to the next.
        .referer(false)
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("exotel-sos/", env!("CARGO_PKG_VERSION")))
        .build()?;
    Ok(client)
}

/// How a recording is asked for: with the provider's user and password (HTTP Basic), or bare (a
/// pre-signed URL).
#[derive(Debug, Clone)]
pub enum Credentials {
    None,
    Basic {
        user: String,
        password: SecretString,
    },
}

/// Receives the body in order, in pieces of exactly `CHUNK_BYTES` except the last (which may be
/// shorter, never empty). When `fetch` fails, the pieces already put belong to no recording and
/// the caller discards them.
pub trait ChunkSink {
    fn put(
        &mut self,
        seq: u64,
        data: Vec<u8>,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

/// A recording as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The type to serve it with: `audio/…` without parameters.
    pub content_type: String,
    pub bytes: u64,
    pub chunks: u64,
}

/// Why a fetch failed, by what the worker should do next. The texts never hold the credentials or
/// the URL's query.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not there yet or a passing fault: 404, 408, 425, 429, 5xx, timeout, connection error, an
    /// empty 200 body, a non-audio answer (a provider may serve an HTML error page with 200). Retry
    /// later.
    #[error("{0}")]
    NotReady(String),
    /// 401 or 403: retry, and after repeats the worker asks the provider for another URL.
    #[error("{0}")]
    AuthRefused(String),
    /// Will never succeed: host not allowed, redirect off the list, body larger than max_bytes (by
    /// Content-Length before reading, or counted while streaming), other 4xx.
    #[error("{0}")]
    Refused(String),
    /// The sink failed (database): retry later.
    #[error("{0}")]
    Store(String),
}

/// What the Content-Type header says the body is.
enum Declared {
    /// `audio/*`: kept as it is, under this type.
    Audio(String),
    /// Generic binary or missing: the first bytes decide.
    Sniff,
    /// Anything else (an HTML error page, JSON, XML): not a recording.
    Other(String),
}

fn declared(content_type: Option<&str>) -> Declared {
    let Some(raw) = content_type else {
        return Declared::Sniff;
    };
    let mime = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime.is_empty() || mime == "application/octet-stream" || mime == "binary/octet-stream" {
        return Declared::Sniff;
    }
    // The type is served back later as a header: only a plain `audio/<token>` is taken as given.
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    match mime.strip_prefix("audio/") {
        Some(sub) if token(sub) => Declared::Audio(mime),
        Some(_) => Declared::Sniff,
        None => Declared::Other(mime.chars().take(100).collect()),
    }
}

/// The audio type the first bytes show: an MP3 (ID3 tag, or an MPEG frame sync) or a WAV file.
fn sniff(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"ID3") || (head.len() >= 2 && head[0] == 0xFF && head[1] & 0xE0 == 0xE0) {
        Some("audio/mpeg")
    } else if head.len() >= 12 && head.starts_with(b"RIFF") && &head[8..12] == b"WAVE" {
        Some("audio/wav")
    } else {
        None
    }
}

/// A transport error in words, without the URL reqwest would put in its text.
pub(crate) fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the connection broke while reading the answer"
    } else {
        "the request failed"
    };
    let e = e.without_url();
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    // A timeout's causes only repeat that it timed out.
    if causes.is_empty() || kind == "timed out" {
        kind.to_owned()
    } else {
        format!("{kind} ({})", causes.join(": "))
    }
}

/// Downloads `url` into `sink`.
///
/// The URL is checked with `cfg.check` first and no request is sent when it fails. Basic auth is
/// sent only when given. The body is streamed in [`CHUNK_BYTES`] pieces, so no more than about one
/// chunk is held in memory, and is refused past `cfg.max_bytes`. The answer is kept only if it is
/// audio: Content-Type `audio/*` (parameters ignored), or `application/octet-stream`,
/// `binary/octet-stream` or none whose first chunk starts like an MP3 or a WAV file; the first
/// chunk is sniffed before the sink sees it. The content type returned is the one to serve.
pub async fn fetch<S: ChunkSink + Send>(
    client: &reqwest::Client,
    cfg: &FetchConfig,
    url: &str,
    creds: &Credentials,
    sink: &mut S,
) -> Result<Fetched, FetchError> {
    let url = cfg.check(url).map_err(FetchError::Refused)?;
    let shown = redacted(&url);
    let mut request = client.get(url).timeout(cfg.timeout).header(
        reqwest::header::ACCEPT,
        "audio/*, application/octet-stream;q=0.9, */*;q=0.1",
    );
    if let Credentials::Basic { user, password } = creds {
        request = request.basic_auth(user, Some(password.expose_secret()));
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| FetchError::NotReady(format!("{shown}: {}", describe(e))))?;

    // After redirects, the answer comes from where the last one led.
    let from = redacted(response.url());
    let status = response.status();
    let code = status.as_u16();
    if status.is_redirection() {
        return Err(FetchError::Refused(redirect_refusal(cfg, &response, &from)));
    }
    match code {
        200..=299 => {}
        401 | 403 => {
            return Err(FetchError::AuthRefused(format!(
                "{from} answered HTTP {code}: the credentials were refused, or the URL has expired"
            )))
        }
        404 | 408 | 425 | 429 | 500..=599 => {
            let detail = if code == 404 {
                "the recording is not ready yet"
            } else {
                "a passing fault at the server"
            };
            return Err(FetchError::NotReady(format!(
                "{from} answered HTTP {code}: {detail}"
            )));
        }
        400..=499 => {
            return Err(FetchError::Refused(format!(
                "{from} answered HTTP {code}: the recording cannot be fetched from this URL"
            )));
        }
        _ => {
            return Err(FetchError::NotReady(format!(
                "{from} answered HTTP {code}, which is not a recording"
            )))
        }
    }

    if let Some(length) = response.content_length() {
        if length > cfg.max_bytes {
            return Err(FetchError::Refused(too_big(&from, length, cfg.max_bytes)));
        }
    }
    let declared = declared(
        response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("?")),
    );
    let mut content_type = match &declared {
        Declared::Audio(mime) => Some(mime.clone()),
        Declared::Sniff => None,
        Declared::Other(mime) => {
            return Err(FetchError::NotReady(format!(
                "{from} answered {mime:?} with HTTP {code}, not audio (an error page, perhaps)"
            )))
        }
    };

    let mut total: u64 = 0;
    let mut seq: u64 = 0;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK_BYTES);
    loop {
        let piece = response
            .chunk()
            .await
            .map_err(|e| FetchError::NotReady(format!("{from}: {}", describe(e))))?;
        let Some(piece) = piece else { break };
        total = total.saturating_add(piece.len() as u64);
        if total > cfg.max_bytes {
            return Err(FetchError::Refused(format!(
                "{from} sent more than recordings.max_bytes ({} bytes); the recording is not kept",
                cfg.max_bytes
            )));
        }
        let mut rest: &[u8] = &piece;
        while !rest.is_empty() {
            let take = (CHUNK_BYTES - buf.len()).min(rest.len());
            buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if buf.len() == CHUNK_BYTES {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK_BYTES));
                emit(sink, &mut seq, full, &mut content_type, &from).await?;
            }
        }
    }
    if total == 0 {
        return Err(FetchError::NotReady(format!(
            "{from} answered HTTP {code} with an empty body"
        )));
    }
    if !buf.is_empty() {
        emit(sink, &mut seq, buf, &mut content_type, &from).await?;
    }
    Ok(Fetched {
        // Every path that puts a chunk has set it: the sniff of the first chunk, or the header.
        content_type: content_type.unwrap_or_else(|| "application/octet-stream".to_owned()),
        bytes: total,
        chunks: seq,
    })
}

/// Hands one chunk to the sink; the first is sniffed first when the header did not say audio.
async fn emit<S: ChunkSink + Send>(
    sink: &mut S,
    seq: &mut u64,
    data: Vec<u8>,
    content_type: &mut Option<String>,
    from: &str,
) -> Result<(), FetchError> {
    if content_type.is_none() {
        match sniff(&data) {
            Some(mime) => *content_type = Some(mime.to_owned()),
            None => {
                return Err(FetchError::NotReady(format!(
                    "{from} answered with generic binary data that does not start like an MP3 or WAV file"
                )))
            }
        }
    }
    sink.put(*seq, data).await.map_err(|e| {
        FetchError::Store(format!("storing chunk {} of the recording: {e:#}", *seq))
    })?;
    *seq += 1;
    Ok(())
}

fn too_big(from: &str, length: u64, max: u64) -> String {
    format!(
        "{from} announces {length} bytes, more than recordings.max_bytes ({max}); the recording is not kept"
    )
}

/// Why a 3xx came back instead of being followed: the next host is off the list, or too many hops.
fn redirect_refusal(cfg: &FetchConfig, response: &reqwest::Response, from: &str) -> String {
    let code = response.status().as_u16();
    let next = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|loc| response.url().join(loc).ok());
    match next {
        None => format!("{from} answered HTTP {code} without a usable Location"),
        Some(next) => match cfg.check(next.as_str()) {
            Err(why) => format!("{from} redirected elsewhere and it was not followed: {why}"),
            Ok(_) => format!(
                "{from} redirected once more after {MAX_REDIRECTS} redirects; the chain is not followed"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use wiremock::matchers::{header, method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const USER: &str = "key-ab12";
    const PASSWORD: &str = "token-s3cret-9z";
    /// What a pre-signed URL carries in its query: it must never appear in an error text.
    const QUERY: &str = "?X-Amz-Signature=SIGVALUE123&X-Amz-Expires=60";

    #[derive(Default)]
    struct VecSink {
        chunks: Vec<(u64, Vec<u8>)>,
        fail: bool,
    }

    impl ChunkSink for VecSink {
        async fn put(&mut self, seq: u64, data: Vec<u8>) -> anyhow::Result<()> {
            if self.fail {
                anyhow::bail!("the database is unreachable");
            }
            self.chunks.push((seq, data));
            Ok(())
        }
    }

    impl VecSink {
        fn joined(&self) -> Vec<u8> {
            self.chunks.iter().flat_map(|(_, d)| d.clone()).collect()
        }
    }

    fn cfg(hosts: &[String]) -> FetchConfig {
        FetchConfig {
            allowed_hosts: hosts.to_vec(),
            allow_http: true,
            max_bytes: 10 * 1024 * 1024,
            timeout: Duration::from_secs(5),
        }
    }

    fn cfg_for(server: &MockServer) -> FetchConfig {
        cfg(&[server.address().to_string()])
    }

    fn basic() -> Credentials {
        Credentials::Basic {
            user: USER.into(),
            password: SecretString::from(PASSWORD.to_owned()),
        }
    }

    fn auth_header() -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        )
    }

    /// An MP3 (ID3 tag first) of `len` bytes.
    fn mp3(len: usize) -> Vec<u8> {
        let mut v = b"ID3\x04\x00".to_vec();
        v.extend((0..len - 5).map(|i| (i % 251) as u8));
        v
    }

    async fn run(
        cfg: &FetchConfig,
        url: &str,
        creds: &Credentials,
    ) -> (Result<Fetched, FetchError>, VecSink) {
        let client = client(cfg).unwrap();
        let mut sink = VecSink::default();
        let result = fetch(&client, cfg, url, creds, &mut sink).await;
        (result, sink)
    }

    /// The text of an error, checked to hold neither the credentials nor the query.
    fn clean(e: &FetchError) -> String {
        let text = e.to_string();
        for secret in [PASSWORD, USER, "SIGVALUE123", "X-Amz", "?"] {
            assert!(!text.contains(secret), "{secret:?} leaked into {text:?}");
        }
        text
    }

    #[tokio::test]
    async fn an_allowed_recording_is_fetched_with_basic_auth_in_chunks() {
        let server = MockServer::start().await;
        let body = mp3(2 * CHUNK_BYTES + 1000);
        Mock::given(method("GET"))
            .and(path("/acme/rec.mp3"))
            .and(header("authorization", auth_header().as_str()))
            .respond_with(ResponseTemplate::new(200).set_body_raw(body.clone(), "audio/mpeg"))
            .expect(1)
            .mount(&server)
            .await;
        let url = format!("{}/acme/rec.mp3{QUERY}", server.uri());
        let (result, sink) = run(&cfg_for(&server), &url, &basic()).await;
        assert_eq!(
            result.unwrap(),
            Fetched {
                content_type: "audio/mpeg".into(),
                bytes: body.len() as u64,
                chunks: 3
            }
        );
        let seqs: Vec<u64> = sink.chunks.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [0, 1, 2]);
        let sizes: Vec<usize> = sink.chunks.iter().map(|(_, d)| d.len()).collect();
        assert_eq!(sizes, [CHUNK_BYTES, CHUNK_BYTES, 1000]);
        assert_eq!(sink.joined(), body);
    }

    #[tokio::test]
    async fn an_exact_multiple_ends_with_a_full_chunk_and_parameters_are_dropped() {
        let server = MockServer::start().await;
        let body = vec![7u8; 2 * CHUNK_BYTES];
        Mock::given(path("/r.wav"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_bytes(body.clone())
                    .insert_header("content-type", "Audio/X-WAV; rate=8000"),
            )
            .mount(&server)
            .await;
        let (result, sink) = run(
            &cfg_for(&server),
            &format!("{}/r.wav", server.uri()),
            &Credentials::None,
        )
        .await;
        let fetched = result.unwrap();
        assert_eq!(fetched.content_type, "audio/x-wav");
        assert_eq!(fetched.chunks, 2);
        assert!(sink.chunks.iter().all(|(_, d)| d.len() == CHUNK_BYTES));
        assert_eq!(sink.joined(), body);
        // No credentials given, none sent.
        let requests = server.received_requests().await.unwrap();
        assert!(requests[0].headers.get("authorization").is_none());
    }

    #[tokio::test]
    async fn statuses_sort_into_not_ready_auth_refused_and_refused() {
        let server = MockServer::start().await;
        for code in [404u16, 408, 425, 429, 500, 502, 503, 401, 403, 400, 410] {
            Mock::given(path(format!("/s/{code}")))
                .respond_with(ResponseTemplate::new(code).set_body_string(format!(
                    "<html>error page quoting {PASSWORD} and SIGVALUE123</html>"
                )))
                .mount(&server)
                .await;
        }
        let cfg = cfg_for(&server);
        for code in [404u16, 408, 425, 429, 500, 502, 503] {
            let url = format!("{}/s/{code}{QUERY}", server.uri());
            let (result, sink) = run(&cfg, &url, &basic()).await;
            let e = result.unwrap_err();
            assert!(matches!(e, FetchError::NotReady(_)), "{code}: {e:?}");
            assert!(clean(&e).contains(&format!("HTTP {code}")));
            assert!(sink.chunks.is_empty());
        }
        for code in [401u16, 403] {
            let url = format!("{}/s/{code}{QUERY}", server.uri());
            let e = run(&cfg, &url, &basic()).await.0.unwrap_err();
            assert!(matches!(e, FetchError::AuthRefused(_)), "{code}: {e:?}");
            let text = clean(&e);
            assert!(
                text.contains(&format!("{}/s/{code}", server.uri())),
                "{text}"
            );
        }
        for code in [400u16, 410] {
            let url = format!("{}/s/{code}{QUERY}", server.uri());
            let e = run(&cfg, &url, &basic()).await.0.unwrap_err();
            assert!(matches!(e, FetchError::Refused(_)), "{code}: {e:?}");
            clean(&e);
        }
    }

    #[tokio::test]
    async fn a_host_off_the_list_gets_no_request() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(mp3(100), "audio/mpeg"))
            .expect(0)
            .mount(&server)
            .await;
        let url = format!("{}/rec.mp3{QUERY}", server.uri());
        let port = server.address().port();
        let other_port = if port == 65535 { 1 } else { port + 1 };
        for hosts in [
            vec![],
            vec!["127.0.0.1".to_owned()],
            vec![format!("127.0.0.1:{other_port}")],
            vec![format!("localhost:{port}")],
        ] {
            let (result, sink) = run(&cfg(&hosts), &url, &basic()).await;
            let e = result.unwrap_err();
            assert!(matches!(e, FetchError::Refused(_)), "{hosts:?}: {e:?}");
            assert_eq!(
                clean(&e),
                format!("host 127.0.0.1:{port} is not in recordings.allowed_hosts")
            );
            assert!(sink.chunks.is_empty());
        }
        assert!(server.received_requests().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn plain_http_is_refused_unless_allowed() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(mp3(100), "audio/mpeg"))
            .mount(&server)
            .await;
        let mut cfg = cfg_for(&server);
        cfg.allow_http = false;
        let url = format!("{}/rec.mp3{QUERY}", server.uri());
        let e = run(&cfg, &url, &basic()).await.0.unwrap_err();
        assert!(matches!(e, FetchError::Refused(_)), "{e:?}");
        assert!(clean(&e).contains("recordings.allow_http"));
        assert!(server.received_requests().await.unwrap().is_empty());
    }

    #[test]
    fn hosts_and_ports_match_exactly() {
        let cfg = FetchConfig {
            allowed_hosts: FetchConfig::parse_hosts(
                "recordings.example.com, s3.ap-south-1.amazonaws.com:8443, [::1]:9000",
            )
            .unwrap(),
            allow_http: false,
            max_bytes: 1,
            timeout: Duration::from_secs(1),
        };
        // A bare host: only the scheme's default port, written or not.
        assert!(cfg.check("https://recordings.example.com/a.mp3").is_ok());
        assert!(cfg
            .check("https://RECORDINGS.example.com:443/a.mp3")
            .is_ok());
        assert!(cfg
            .check("https://recordings.example.com:8443/a.mp3")
            .is_err());
        // host:port: that port only.
        assert!(cfg
            .check("https://s3.ap-south-1.amazonaws.com:8443/a?X-Amz-Signature=x")
            .is_ok());
        assert!(cfg
            .check("https://s3.ap-south-1.amazonaws.com/a.mp3")
            .is_err());
        assert!(cfg.check("https://[::1]:9000/a.mp3").is_ok());
        assert!(cfg.check("https://[::1]/a.mp3").is_err());
        // No suffix or prefix tricks.
        assert_eq!(
            cfg.check("https://recordings.example.com.evil.example/a.mp3"),
            Err(
                "host recordings.example.com.evil.example is not in recordings.allowed_hosts"
                    .into()
            )
        );
        assert!(cfg
            .check("https://evil.recordings.example.com/a.mp3")
            .is_err());
        assert!(cfg
            .check("https://evil.example/recordings.example.com")
            .is_err());
        // Scheme and userinfo.
        let http = cfg
            .check("http://recordings.example.com/a.mp3")
            .unwrap_err();
        assert!(http.contains("plain http"), "{http}");
        assert!(cfg.check("ftp://recordings.example.com/a.mp3").is_err());
        let userinfo = cfg
            .check(&format!(
                "https://{USER}:{PASSWORD}@recordings.example.com/a.mp3"
            ))
            .unwrap_err();
        assert!(
            !userinfo.contains(PASSWORD) && !userinfo.contains(USER),
            "{userinfo}"
        );
        assert!(cfg.check("https://x@recordings.example.com/a.mp3").is_err());
        assert!(cfg.check("not a url").is_err());
        assert!(cfg.check("").is_err());
    }

    #[test]
    fn allowed_hosts_are_parsed_from_the_setting() {
        assert_eq!(
            FetchConfig::parse_hosts(" Recordings.Example.com , ,127.0.0.1:8080,").unwrap(),
            ["recordings.example.com", "127.0.0.1:8080"]
        );
        assert_eq!(FetchConfig::parse_hosts("").unwrap(), Vec::<String>::new());
        assert_eq!(
            FetchConfig::parse_hosts(" , ").unwrap(),
            Vec::<String>::new()
        );
        let scheme =
            FetchConfig::parse_hosts("a.example, https://recordings.example.com").unwrap_err();
        assert!(
            scheme.contains("https://recordings.example.com"),
            "{scheme}"
        );
        let path = FetchConfig::parse_hosts("recordings.example.com/acme").unwrap_err();
        assert!(path.contains("recordings.example.com/acme"), "{path}");
        assert!(FetchConfig::parse_hosts("host:port").is_err());
        assert!(FetchConfig::parse_hosts("host:0").is_err());
        assert!(FetchConfig::parse_hosts("host:99999").is_err());
        assert!(FetchConfig::parse_hosts("user@host").is_err());
        assert!(FetchConfig::parse_hosts("two words").is_err());
        assert!(FetchConfig::parse_hosts("[::1]:9000").is_ok());
    }

    #[tokio::test]
    async fn a_redirect_off_the_list_is_not_followed() {
        let allowed = MockServer::start().await;
        let other = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(mp3(100), "audio/mpeg"))
            .expect(0)
            .mount(&other)
            .await;
        Mock::given(path("/rec.mp3"))
            .respond_with(
                ResponseTemplate::new(302)
                    .insert_header("location", format!("{}/stolen{QUERY}", other.uri())),
            )
            .mount(&allowed)
            .await;
        let url = format!("{}/rec.mp3", allowed.uri());
        let (result, sink) = run(&cfg_for(&allowed), &url, &basic()).await;
        let e = result.unwrap_err();
        assert!(matches!(e, FetchError::Refused(_)), "{e:?}");
        let text = clean(&e);
        assert!(
            text.contains(&format!(
                "host {} is not in recordings.allowed_hosts",
                other.address()
            )),
            "{text}"
        );
        assert!(sink.chunks.is_empty());
        assert!(other.received_requests().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn redirects_within_the_list_are_followed() {
        let first = MockServer::start().await;
        let second = MockServer::start().await;
        let body = mp3(5000);
        // Same host and port: the credentials go along.
        Mock::given(path("/old.mp3"))
            .respond_with(ResponseTemplate::new(301).insert_header("location", "/new.mp3"))
            .mount(&first)
            .await;
        Mock::given(path("/new.mp3"))
            .and(header("authorization", auth_header().as_str()))
            .respond_with(ResponseTemplate::new(200).set_body_raw(body.clone(), "audio/mpeg"))
            .mount(&first)
            .await;
        let hosts = [first.address().to_string(), second.address().to_string()];
        let (result, sink) = run(&cfg(&hosts), &format!("{}/old.mp3", first.uri()), &basic()).await;
        assert_eq!(result.unwrap().bytes, 5000);
        assert_eq!(sink.joined(), body);

        // Another listed host (a pre-signed store): followed, without the credentials.
        Mock::given(path("/away.mp3"))
            .respond_with(
                ResponseTemplate::new(302)
                    .insert_header("location", format!("{}/signed.mp3{QUERY}", second.uri())),
            )
            .mount(&first)
            .await;
        Mock::given(path("/signed.mp3"))
            .and(query_param("X-Amz-Signature", "SIGVALUE123"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(body.clone(), "audio/mpeg"))
            .expect(1)
            .mount(&second)
            .await;
        let (result, sink) =
            run(&cfg(&hosts), &format!("{}/away.mp3", first.uri()), &basic()).await;
        assert_eq!(result.unwrap().content_type, "audio/mpeg");
        assert_eq!(sink.joined(), body);
        let requests = second.received_requests().await.unwrap();
        assert!(requests[0].headers.get("authorization").is_none());
        assert!(requests[0].headers.get("referer").is_none());
    }

    #[tokio::test]
    async fn a_long_redirect_chain_is_cut() {
        let server = MockServer::start().await;
        for i in 0..10 {
            Mock::given(path(format!("/r{i}")))
                .respond_with(
                    ResponseTemplate::new(302).insert_header("location", format!("/r{}", i + 1)),
                )
                .mount(&server)
                .await;
        }
        let e = run(&cfg_for(&server), &format!("{}/r0", server.uri()), &basic())
            .await
            .0
            .unwrap_err();
        assert!(matches!(e, FetchError::Refused(_)), "{e:?}");
        assert_eq!(server.received_requests().await.unwrap().len(), 6);
    }

    #[tokio::test]
    async fn a_content_length_over_the_limit_is_refused_before_reading() {
        let server = MockServer::start().await;
        Mock::given(path("/big.mp3"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(mp3(1000), "audio/mpeg"))
            .mount(&server)
            .await;
        let mut cfg = cfg_for(&server);
        cfg.max_bytes = 500;
        let (result, sink) = run(&cfg, &format!("{}/big.mp3{QUERY}", server.uri()), &basic()).await;
        let e = result.unwrap_err();
        assert!(matches!(e, FetchError::Refused(_)), "{e:?}");
        assert!(clean(&e).contains("1000 bytes"));
        assert!(sink.chunks.is_empty());
        // At the limit exactly, it is kept.
        cfg.max_bytes = 1000;
        let (result, _) = run(&cfg, &format!("{}/big.mp3", server.uri()), &basic()).await;
        assert_eq!(result.unwrap().bytes, 1000);
    }

    /// A server that answers one request with `head` and then `pieces`, in HTTP/1.1 chunked encoding
    /// or, when `chunked` is false, delimited by closing the connection: neither has a Content-Length.
    async fn raw_server(head: &'static str, pieces: Vec<Vec<u8>>, chunked: bool) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                request.extend_from_slice(&buf[..n]);
            }
            let mut out = head.as_bytes().to_vec();
            for piece in pieces {
                if chunked {
                    out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                    out.extend_from_slice(&piece);
                    out.extend_from_slice(b"\r\n");
                } else {
                    out.extend_from_slice(&piece);
                }
            }
            if chunked {
                out.extend_from_slice(b"0\r\n\r\n");
            }
            // The client may hang up once it has seen enough.
            let _ = socket.write_all(&out).await;
            let _ = socket.shutdown().await;
        });
        addr
    }

    #[tokio::test]
    async fn a_streamed_body_over_the_limit_is_refused() {
        let pieces = vec![mp3(400), vec![1; 400], vec![2; 400]];
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nTransfer-Encoding: chunked\r\n\r\n",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nConnection: close\r\n\r\n",
                false,
            ),
            // A Content-Length that lies low beside chunked encoding: the counted bytes decide.
            (
                "HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n",
                true,
            ),
        ];
        for (head, chunked) in cases {
            let addr = raw_server(head, pieces.clone(), chunked).await;
            let mut cfg = cfg(&[addr.to_string()]);
            cfg.max_bytes = 1000;
            let url = format!("http://{addr}/rec.mp3{QUERY}");
            let (result, sink) = run(&cfg, &url, &basic()).await;
            let e = result.unwrap_err();
            assert!(matches!(e, FetchError::Refused(_)), "{head}: {e:?}");
            assert!(clean(&e).contains("more than recordings.max_bytes"));
            assert!(sink.chunks.is_empty());
        }
        // The same stream within the limit is kept whole.
        let addr = raw_server(cases[0].0, pieces.clone(), true).await;
        let (result, sink) = run(
            &cfg(&[addr.to_string()]),
            &format!("http://{addr}/rec.mp3"),
            &basic(),
        )
        .await;
        assert_eq!(result.unwrap().bytes, 1200);
        assert_eq!(sink.joined(), pieces.concat());
    }

    #[tokio::test]
    async fn non_audio_answers_are_not_ready() {
        let server = MockServer::start().await;
        Mock::given(path("/html"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_raw("<html>Please log in</html>", "text/html; charset=utf-8"),
            )
            .mount(&server)
            .await;
        Mock::given(path("/noise"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_raw(vec![0u8; 3000], "application/octet-stream"),
            )
            .mount(&server)
            .await;
        Mock::given(path("/empty"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(Vec::new(), "audio/mpeg"))
            .mount(&server)
            .await;
        let cfg = cfg_for(&server);
        for p in ["/html", "/noise", "/empty"] {
            let (result, sink) = run(&cfg, &format!("{}{p}{QUERY}", server.uri()), &basic()).await;
            let e = result.unwrap_err();
            assert!(matches!(e, FetchError::NotReady(_)), "{p}: {e:?}");
            clean(&e);
            assert!(sink.chunks.is_empty(), "{p}: the sink got something");
        }
    }

    #[tokio::test]
    async fn generic_binary_is_kept_when_it_starts_like_audio() {
        let server = MockServer::start().await;
        let mut frames = vec![0xFF, 0xFB, 0x90, 0x64];
        frames.extend(vec![0x55; 3000]);
        Mock::given(path("/frames"))
            .respond_with(
                ResponseTemplate::new(200).set_body_raw(frames.clone(), "application/octet-stream"),
            )
            .mount(&server)
            .await;
        let mut wav = b"RIFF\x24\x08\x00\x00WAVEfmt ".to_vec();
        wav.extend(vec![0; 2000]);
        // No Content-Type at all.
        Mock::given(path("/wav"))
            .respond_with(ResponseTemplate::new(200).set_body_bytes(wav.clone()))
            .mount(&server)
            .await;
        Mock::given(path("/id3"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_raw(mp3(CHUNK_BYTES + 10), "binary/octet-stream"),
            )
            .mount(&server)
            .await;
        let cfg = cfg_for(&server);
        let (result, sink) = run(&cfg, &format!("{}/frames", server.uri()), &basic()).await;
        assert_eq!(result.unwrap().content_type, "audio/mpeg");
        assert_eq!(sink.joined(), frames);
        let (result, sink) = run(&cfg, &format!("{}/wav", server.uri()), &basic()).await;
        assert_eq!(result.unwrap().content_type, "audio/wav");
        assert_eq!(sink.joined(), wav);
        let (result, _) = run(&cfg, &format!("{}/id3", server.uri()), &basic()).await;
        assert_eq!(
            result.unwrap(),
            Fetched {
                content_type: "audio/mpeg".into(),
                bytes: CHUNK_BYTES as u64 + 10,
                chunks: 2
            }
        );
    }

    #[test]
    fn signatures_are_recognised() {
        assert_eq!(sniff(b"ID3\x03"), Some("audio/mpeg"));
        assert_eq!(sniff(&[0xFF, 0xE0]), Some("audio/mpeg"));
        assert_eq!(
            sniff(&[0xFF, 0xD8, 0xFF]),
            None,
            "a JPEG is not a frame sync"
        );
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), Some("audio/wav"));
        assert_eq!(sniff(b"RIFF\0\0\0\0AVI LIST"), None);
        assert_eq!(sniff(b"<html>"), None);
        assert_eq!(sniff(b""), None);
    }

    #[tokio::test]
    async fn a_failing_sink_is_a_store_error() {
        let server = MockServer::start().await;
        Mock::given(path("/rec.mp3"))
            .respond_with(ResponseTemplate::new(200).set_body_raw(mp3(100), "audio/mpeg"))
            .mount(&server)
            .await;
        let cfg = cfg_for(&server);
        let client = client(&cfg).unwrap();
        let mut sink = VecSink {
            fail: true,
            ..VecSink::default()
        };
        let e = fetch(
            &client,
            &cfg,
            &format!("{}/rec.mp3", server.uri()),
            &basic(),
            &mut sink,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, FetchError::Store(_)), "{e:?}");
        assert!(e.to_string().contains("the database is unreachable"));
    }

    #[tokio::test]
    async fn timeouts_and_refused_connections_are_not_ready_and_print_no_query() {
        let server = MockServer::start().await;
        Mock::given(path("/slow.mp3"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_raw(mp3(100), "audio/mpeg")
                    .set_delay(Duration::from_secs(3)),
            )
            .mount(&server)
            .await;
        let mut slow = cfg_for(&server);
        slow.timeout = Duration::from_millis(300);
        let e = run(
            &slow,
            &format!("{}/slow.mp3{QUERY}", server.uri()),
            &basic(),
        )
        .await
        .0
        .unwrap_err();
        assert!(matches!(e, FetchError::NotReady(_)), "{e:?}");
        assert!(clean(&e).contains("timed out"));

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let e = run(
            &cfg(&[addr.to_string()]),
            &format!("http://{addr}/rec.mp3{QUERY}"),
            &basic(),
        )
        .await
        .0
        .unwrap_err();
        assert!(matches!(e, FetchError::NotReady(_)), "{e:?}");
        assert!(clean(&e).contains(&format!("http://{addr}/rec.mp3")));
    }

    #[test]
    fn the_fetch_can_run_on_a_spawned_task() {
        fn assert_send<T: Send>(_: &T) {}
        let cfg = cfg(&[]);
        let client = reqwest::Client::new();
        let mut sink = VecSink::default();
        let creds = Credentials::None;
        let future = fetch(&client, &cfg, "https://x.example/", &creds, &mut sink);
        assert_send(&future);
    }
}
