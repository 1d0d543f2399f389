//! The caller's recording in proxy mode: fetched with the Exotel credentials from a stand-in that answers
//! 404 until the recording is "processed", kept in the database, served at `/r/<ref>` with ranges, and
//! played by the greeting once it is in (text before, and a follow-up call after).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::both_engines;
use crate::helpers::*;

const AUTH: &str = "Basic a2V5MTIzOnRvazQ1Ng=="; // key123:tok456
const REC_PATH: &str = "/exotelrecordings/acme/CA1.mp3";

/// An MP3-looking body of `len` bytes (an ID3 tag, then a pattern), so ranges can be checked.
fn audio(len: usize) -> Vec<u8> {
    let mut body = b"ID3\x04\x00".to_vec();
    body.extend((0..len.saturating_sub(5)).map(|i| (i % 251) as u8));
    body
}

/// Exotel's recording server as it behaves: Basic auth required (401 without), 404 until the recording
/// is processed, then the audio.
struct RecordingServer {
    ready_at: Instant,
    /// Closed: "not found" whatever the time, until the test opens it.
    gate: Arc<std::sync::atomic::AtomicBool>,
    body: Vec<u8>,
    content_type: &'static str,
    hits: Arc<AtomicUsize>,
}

impl Respond for RecordingServer {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        self.hits.fetch_add(1, Ordering::SeqCst);
        let authorised = req
            .headers
            .get("authorization")
            .is_some_and(|v| v.to_str().unwrap_or("") == AUTH);
        if !authorised {
            return ResponseTemplate::new(401);
        }
        if Instant::now() < self.ready_at || !self.gate.load(Ordering::SeqCst) {
            return ResponseTemplate::new(404).set_body_string("Recording not found");
        }
        ResponseTemplate::new(200)
            .insert_header("content-type", self.content_type)
            .set_body_bytes(self.body.clone())
    }
}

struct Stand {
    server: MockServer,
    hits: Arc<AtomicUsize>,
    gate: Arc<std::sync::atomic::AtomicBool>,
}

impl Stand {
    async fn start(ready_in: Duration, body: Vec<u8>, content_type: &'static str) -> Self {
        Self::serve(ready_in, true, body, content_type).await
    }

    /// A stand-in whose recording is not ready until [`Stand::release`]: what the test checks "before
    /// the recording is in" cannot be overtaken by a fetch on a slow machine.
    async fn gated(body: Vec<u8>, content_type: &'static str) -> Self {
        Self::serve(Duration::ZERO, false, body, content_type).await
    }

    async fn serve(
        ready_in: Duration,
        open: bool,
        body: Vec<u8>,
        content_type: &'static str,
    ) -> Self {
        let server = MockServer::start().await;
        let hits = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(std::sync::atomic::AtomicBool::new(open));
        Mock::given(method("GET"))
            .and(path(REC_PATH))
            .respond_with(RecordingServer {
                ready_at: Instant::now() + ready_in,
                gate: gate.clone(),
                body,
                content_type,
                hits: hits.clone(),
            })
            .mount(&server)
            .await;
        Stand { server, hits, gate }
    }

    /// The recording is ready from now on.
    fn release(&self) {
        self.gate.store(true, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        format!("{}{REC_PATH}", self.server.uri())
    }

    fn host(&self) -> String {
        self.server.uri().trim_start_matches("http://").to_owned()
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn encoded(url: &str) -> String {
    serde_urlencoded::to_string([("u", url)]).unwrap()[2..].to_owned()
}

/// A live app (every channel against the stand-ins) in proxy mode, fetching from `stand`.
async fn proxy_app(db: Db, p: &Providers, stand: &Stand, extra: &[(&str, String)]) -> TestApp {
    let mut env: Vec<(&str, String)> = p.env();
    env.push(("SOS_RECORDINGS__MODE", "proxy".into()));
    env.push(("SOS_RECORDINGS__ALLOWED_HOSTS", stand.host()));
    env.push(("SOS_RECORDINGS__ALLOW_HTTP", "true".into()));
    env.extend(extra.iter().cloned());
    mount_happy(p).await;
    spawn_app_with(db, &env).await
}

async fn recording_status(app: &TestApp, incident_id: &str) -> Option<String> {
    app.store
        .recording(incident_id)
        .await
        .unwrap()
        .map(|r| r.status)
}

async fn wait_for_status(app: &TestApp, incident_id: &str, status: &str, within: Duration) {
    let ok = eventually(within, || async {
        recording_status(app, incident_id).await.as_deref() == Some(status)
    })
    .await;
    assert!(
        ok,
        "recording of {incident_id} did not become {status}: {:?}",
        app.store.recording(incident_id).await.unwrap()
    );
}

async fn timeline(app: &TestApp, incident_id: &str) -> Vec<(String, String)> {
    app.store
        .incident_timeline(incident_id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.detail))
        .collect()
}

async fn get(app: &TestApp, reference: &str, range: Option<&str>) -> reqwest::Response {
    let mut req = app
        .client
        .get(format!("{}/r/{reference}", app.base))
        .header("user-agent", "TestPlayer/1.0");
    if let Some(r) = range {
        req = req.header("range", r);
    }
    req.send().await.unwrap()
}

async fn greeting_text(app: &TestApp, greeting_ref: &str) -> String {
    let res = app.greeting(reqwest::Method::GET, greeting_ref).await;
    assert_eq!(res.status(), 200);
    res.text().await.unwrap()
}

/// The whole story: a call answered before the recording is processed hears text and is promised the
/// recording; links answer 503 meanwhile; once the stand-in has it, it is fetched with Basic auth,
/// stored, served whole, by range and to HEAD; later greetings play our link; the contact whose call
/// heard only text gets exactly one follow-up call; SMS and WhatsApp carry our link, never Exotel's.
async fn the_recording_is_fetched_served_and_followed_up(db: Db) {
    const SID: &str = "recstory1";
    let p = Providers::start().await;
    let body = audio(600 * 1024);
    let stand = Stand::gated(body.clone(), "audio/mpeg").await;
    // Acknowledgement by keypress off: Asha's answer reaches her, and nobody's acknowledgement stops
    // the desk's redial (the follow-up after an acknowledgement is tested in `ack`).
    let app = proxy_app(db, &p, &stand, &[("SOS_ACK__DIGIT", String::new())]).await;
    let res = app
        .passthru(&format!(
            "CallSid={SID}&EmergencyType=Heart&RecordingUrl={}&RecordingAvailableBy=2024-07-31%2016%3A48%3A02",
            encoded(&stand.url())
        ))
        .await;
    assert_eq!(res.status(), 200);
    let incident = app.store.incident_by_call_sid(SID).await.unwrap().unwrap();
    assert_eq!(
        recording_status(&app, &incident.id).await.as_deref(),
        Some("pending"),
        "the fetch job is stored with the incident"
    );
    // Calls go out at once; messages too, with our link.
    assert!(
        app.deliveries_until(SID, Duration::from_secs(20), |ds| ds
            .iter()
            .all(|d| d.status != "queued" && d.status != "sending"))
            .await
    );
    let ds = app.deliveries_of(SID).await;
    let asha_call = ds
        .iter()
        .find(|d| d.channel == "call" && d.phone == "+919800000001")
        .unwrap()
        .clone();
    let link_ref = asha_call.link_ref.clone().unwrap();
    assert_eq!(link_ref.len(), 22);
    assert_ne!(link_ref, asha_call.greeting_ref, "never the CustomField");

    // Before the recording is in: text, and the promise of the recording; the link answers 503.
    let spoken = greeting_text(&app, &asha_call.greeting_ref).await;
    assert!(
        !spoken.contains("http"),
        "no URL that cannot play: {spoken}"
    );
    assert!(spoken.contains("will follow"), "{spoken}");
    let res = get(&app, &link_ref, None).await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    assert!(res.text().await.unwrap().contains("not ready yet"));

    for (form, _) in p.requests(SMS_PATH).await {
        let text = field(&form, "Body").unwrap();
        assert!(!text.contains("exotelrecordings"), "{text}");
        assert!(text.contains("http://127.0.0.1:8080/r/"), "{text}");
    }
    for (form, _) in p.requests(GUPSHUP_PATH).await {
        let text = field(&form, "msg").unwrap();
        assert!(!text.contains("exotelrecordings"), "{text}");
        assert!(text.contains("http://127.0.0.1:8080/r/"), "{text}");
    }

    // Asha answered (her greeting spoke text); the desk did not.
    let desk_call = ds
        .iter()
        .find(|d| d.channel == "call" && d.phone == "+919800000004")
        .unwrap();
    for (d, status) in [(&asha_call, "completed"), (desk_call, "no-answer")] {
        let res = app
            .post_form(
                "/exotel/call-status",
                &[
                    ("CallSid", d.provider_id.as_deref().unwrap()),
                    ("Status", status),
                ],
            )
            .await;
        assert_eq!(res.status(), 200);
    }

    // Exotel has the recording now (it was asked at least once before: "not found").
    assert!(eventually(Duration::from_secs(20), || async { stand.hits() >= 1 }).await);
    stand.release();
    wait_for_status(&app, &incident.id, "stored", Duration::from_secs(20)).await;
    let requests = stand.server.received_requests().await.unwrap();
    assert!(requests.len() >= 2, "404 first, then the audio");
    assert!(requests
        .iter()
        .all(|r| r.headers["authorization"].to_str().unwrap() == AUTH));
    let events = timeline(&app, &incident.id).await;
    let fetched = events
        .iter()
        .find(|(k, _)| k == "recording_fetched")
        .expect("recording_fetched");
    assert!(
        fetched
            .1
            .contains(&format!("{} bytes of audio/mpeg", body.len())),
        "{events:?}"
    );

    // Served whole, by range (across a chunk boundary), and to HEAD.
    let res = get(&app, &link_ref, None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "audio/mpeg");
    assert_eq!(
        res.headers()["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!(res.headers()["accept-ranges"], "bytes");
    assert_eq!(res.bytes().await.unwrap().as_ref(), body.as_slice());
    let (a, b) = (262_140usize, 262_150usize);
    let res = get(&app, &link_ref, Some(&format!("bytes={a}-{b}"))).await;
    assert_eq!(res.status(), 206);
    assert_eq!(
        res.headers()["content-range"],
        format!("bytes {a}-{b}/{}", body.len()).as_str()
    );
    assert_eq!(res.bytes().await.unwrap().as_ref(), &body[a..=b]);
    let res = get(&app, &link_ref, Some("bytes=-100")).await;
    assert_eq!(res.status(), 206);
    assert_eq!(
        res.bytes().await.unwrap().as_ref(),
        &body[body.len() - 100..]
    );
    let res = get(&app, &link_ref, Some(&format!("bytes={}-", body.len()))).await;
    assert_eq!(res.status(), 416);
    let res = app
        .client
        .head(format!("{}/r/{link_ref}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-length"],
        body.len().to_string().as_str()
    );
    assert!(res.bytes().await.unwrap().is_empty());

    // One open event for this player in ten minutes, however many ranges it asked for; the client
    // address is masked.
    let opened = eventually(Duration::from_secs(5), || async {
        app.store
            .events(&asha_call.id)
            .await
            .unwrap()
            .iter()
            .any(|e| e.kind == "recording_opened")
    })
    .await;
    assert!(opened);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let opens: Vec<_> = app
        .store
        .events(&asha_call.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "recording_opened")
        .collect();
    assert_eq!(opens.len(), 1, "{opens:?}");
    assert!(
        opens[0].detail.contains("127.0.0.0/24"),
        "{}",
        opens[0].detail
    );
    assert!(
        opens[0].detail.contains("TestPlayer/1.0"),
        "{}",
        opens[0].detail
    );

    // Now the greeting plays our link, as many times as configured.
    let played = greeting_text(&app, &desk_call.greeting_ref).await;
    let link = format!(
        "http://127.0.0.1:8080/r/{}",
        desk_call.link_ref.as_deref().unwrap()
    );
    assert_eq!(played, format!("{link}\n{link}"));

    // Asha heard only text: one follow-up call, placed once, never redialled. The desk's call never
    // reached a greeting: its redial plays the recording itself.
    let followed = app
        .deliveries_until(SID, Duration::from_secs(20), |ds| {
            ds.iter()
                .any(|d| d.purpose == "followup" && d.status != "queued" && d.status != "sending")
        })
        .await;
    assert!(followed, "a follow-up call is placed");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let followups: Vec<_> = app
        .deliveries_of(SID)
        .await
        .into_iter()
        .filter(|d| d.purpose == "followup")
        .collect();
    assert_eq!(followups.len(), 1, "{followups:?}");
    assert_eq!(followups[0].phone, "+919800000001");
    assert_eq!(followups[0].channel, "call");
    let calls_to_asha = p
        .requests(CALLS_PATH)
        .await
        .into_iter()
        .filter(|(f, _)| field(f, "From") == Some("+919800000001"))
        .count();
    assert_eq!(calls_to_asha, 2, "the alert call and the one follow-up");
    // Not answered: not redialled (one attempt).
    let res = app
        .post_form(
            "/exotel/call-status",
            &[
                ("CallSid", followups[0].provider_id.as_deref().unwrap()),
                ("Status", "no-answer"),
            ],
        )
        .await;
    assert_eq!(res.status(), 200);
    let failed = app
        .deliveries_until(SID, Duration::from_secs(5), |ds| {
            ds.iter()
                .any(|d| d.purpose == "followup" && d.status == "failed")
        })
        .await;
    assert!(failed, "a follow-up call is one attempt");
    assert!(timeline(&app, &incident.id)
        .await
        .iter()
        .any(|(k, _)| k == "recording_followup_call"));
    app.stop().await;
}

/// A recording that never comes: tries stop at the deadline, the incident says so, the greeting speaks
/// text without a promise, and links answer 410. A link past `recordings.link_ttl` answers 410 too.
async fn a_recording_that_never_comes_and_an_expired_link_answer_410(db: Db) {
    let p = Providers::start().await;
    let never = Stand::start(Duration::from_secs(3600), audio(1000), "audio/mpeg").await;
    let app = proxy_app(
        db,
        &p,
        &never,
        &[
            ("SOS_RECORDINGS__FETCH_GRACE", "2s".into()),
            ("SOS_DISPATCH__ENABLED", "false".into()),
        ],
    )
    .await;
    app.passthru(&format!(
        "CallSid=recnever1&EmergencyType=Heart&RecordingUrl={}",
        encoded(&never.url())
    ))
    .await;
    let incident = app
        .store
        .incident_by_call_sid("recnever1")
        .await
        .unwrap()
        .unwrap();
    wait_for_status(&app, &incident.id, "unavailable", Duration::from_secs(15)).await;
    let events = timeline(&app, &incident.id).await;
    assert!(
        events.iter().any(|(k, _)| k == "recording_unavailable"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(k, d)| k == "recording_fetch_failed" && d.contains("404")),
        "{events:?}"
    );
    let call = app.delivery_of("recnever1", "call").await;
    let spoken = greeting_text(&app, &call.greeting_ref).await;
    assert!(
        !spoken.contains("http") && !spoken.contains("will follow"),
        "{spoken}"
    );
    let res = get(&app, call.link_ref.as_deref().unwrap(), None).await;
    assert_eq!(res.status(), 410);
    assert!(res.text().await.unwrap().contains("never became available"));

    // RecordingAvailableBy (Exotel's local time) later than arrival moves the deadline with it; one
    // absurdly far away is held to an hour.
    let ist = chrono::FixedOffset::east_opt(330 * 60).unwrap();
    for (sid, ahead_min, expected_min) in [("recby1", 30, 30), ("recby2", 60 * 24 * 10, 60)] {
        let at = (chrono::Utc::now() + chrono::Duration::minutes(ahead_min)).with_timezone(&ist);
        let stamp = at.format("%Y-%m-%d %H:%M:%S").to_string();
        app.passthru(&format!(
            "CallSid={sid}&EmergencyType=Heart&RecordingUrl={}&RecordingAvailableBy={}",
            encoded(&never.url()),
            encoded(&stamp)
        ))
        .await;
        let incident = app.store.incident_by_call_sid(sid).await.unwrap().unwrap();
        let job = app.store.recording(&incident.id).await.unwrap().unwrap();
        let expected = incident.received_at + expected_min * 60_000 + 2_000;
        assert!(
            (job.deadline_at - expected).abs() < 5_000,
            "{sid}: deadline {} expected about {expected}",
            job.deadline_at
        );
    }
    app.stop().await;

    let ready = Stand::start(Duration::ZERO, audio(1000), "audio/mpeg").await;
    let p = Providers::start().await;
    let app = proxy_app(
        db,
        &p,
        &ready,
        &[
            ("SOS_RECORDINGS__LINK_TTL", "2s".into()),
            ("SOS_DISPATCH__ENABLED", "false".into()),
        ],
    )
    .await;
    app.passthru(&format!(
        "CallSid=recttl1&EmergencyType=Heart&RecordingUrl={}",
        encoded(&ready.url())
    ))
    .await;
    let incident = app
        .store
        .incident_by_call_sid("recttl1")
        .await
        .unwrap()
        .unwrap();
    wait_for_status(&app, &incident.id, "stored", Duration::from_secs(10)).await;
    let call = app.delivery_of("recttl1", "call").await;
    let link_ref = call.link_ref.clone().unwrap();
    assert_eq!(get(&app, &link_ref, None).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let res = get(&app, &link_ref, None).await;
    assert_eq!(res.status(), 410);
    assert!(res.text().await.unwrap().contains("expired"));
    app.stop().await;
}

/// Only hosts on `recordings.allowed_hosts` are ever requested (they get the credentials): another
/// host's recording is kept for audit and used as it is. In direct mode nothing is fetched at all.
async fn hosts_off_the_list_and_direct_mode_are_never_requested(db: Db) {
    let p = Providers::start().await;
    let stand = Stand::start(Duration::ZERO, audio(1000), "audio/mpeg").await;
    let mut env = p.env();
    env.push(("SOS_RECORDINGS__MODE", "".into()));
    env.push(("SOS_RECORDINGS__ALLOW_HTTP", "true".into()));
    env.push(("SOS_DISPATCH__ENABLED", "false".into()));
    // The default mode with credentials set (proxy), and the default list: Exotel's recording host only.
    let app = spawn_app_with(db, &env).await;
    app.passthru(&format!(
        "CallSid=recoff1&EmergencyType=Heart&RecordingUrl={}",
        encoded(&stand.url())
    ))
    .await;
    let incident = app
        .store
        .incident_by_call_sid("recoff1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        incident.recording_url.as_deref(),
        Some(stand.url().as_str()),
        "kept for audit"
    );
    assert_eq!(recording_status(&app, &incident.id).await, None);
    let events = timeline(&app, &incident.id).await;
    assert!(
        events
            .iter()
            .any(|(k, d)| k == "recording_not_fetched" && d.contains("allowed_hosts")),
        "{events:?}"
    );
    let call = app.delivery_of("recoff1", "call").await;
    let res = get(&app, call.link_ref.as_deref().unwrap(), None).await;
    assert_eq!(res.status(), 302, "used as it is");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stand.hits(), 0, "a host off the list is never requested");
    app.stop().await;

    // Direct mode, with the host on the list: still nothing fetched; the greeting plays Exotel's URL.
    let mut env = p.env();
    env.push(("SOS_RECORDINGS__MODE", "direct".into()));
    env.push(("SOS_RECORDINGS__ALLOWED_HOSTS", stand.host()));
    env.push(("SOS_RECORDINGS__ALLOW_HTTP", "true".into()));
    env.push(("SOS_DISPATCH__ENABLED", "false".into()));
    let app = spawn_app_with(db, &env).await;
    app.passthru(&format!(
        "CallSid=recdirect1&EmergencyType=Heart&RecordingUrl={}",
        encoded(&stand.url())
    ))
    .await;
    let incident = app
        .store
        .incident_by_call_sid("recdirect1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recording_status(&app, &incident.id).await, None);
    let call = app.delivery_of("recdirect1", "call").await;
    let played = greeting_text(&app, &call.greeting_ref).await;
    assert_eq!(played, format!("{}\n{}", stand.url(), stand.url()));
    let res = get(&app, call.link_ref.as_deref().unwrap(), None).await;
    assert_eq!(res.status(), 302);
    assert_eq!(res.headers()["location"], stand.url().as_str());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stand.hits(), 0, "nothing is fetched in direct mode");
    app.stop().await;
}

/// Too large, or not audio: never kept. Too large ends the tries at once (it cannot shrink); an HTML
/// page is tried again until the deadline (Exotel may serve an error page with 200).
async fn oversize_and_non_audio_answers_are_not_kept(db: Db) {
    let p = Providers::start().await;
    let big = Stand::start(Duration::ZERO, audio(5000), "audio/mpeg").await;
    let app = proxy_app(
        db,
        &p,
        &big,
        &[
            ("SOS_RECORDINGS__MAX_BYTES", "1000".into()),
            ("SOS_DISPATCH__ENABLED", "false".into()),
        ],
    )
    .await;
    app.passthru(&format!(
        "CallSid=recbig1&EmergencyType=Heart&RecordingUrl={}",
        encoded(&big.url())
    ))
    .await;
    let incident = app
        .store
        .incident_by_call_sid("recbig1")
        .await
        .unwrap()
        .unwrap();
    wait_for_status(&app, &incident.id, "unavailable", Duration::from_secs(10)).await;
    let job = app.store.recording(&incident.id).await.unwrap().unwrap();
    assert_eq!(job.attempts, 1, "too large is not tried again");
    assert!(job.last_error.unwrap().contains("max_bytes"));
    app.stop().await;

    let p = Providers::start().await;
    let html = Stand::start(Duration::ZERO, b"<html>Login</html>".to_vec(), "text/html").await;
    let app = proxy_app(
        db,
        &p,
        &html,
        &[
            ("SOS_RECORDINGS__FETCH_GRACE", "3s".into()),
            ("SOS_DISPATCH__ENABLED", "false".into()),
        ],
    )
    .await;
    app.passthru(&format!(
        "CallSid=rechtml1&EmergencyType=Heart&RecordingUrl={}",
        encoded(&html.url())
    ))
    .await;
    let incident = app
        .store
        .incident_by_call_sid("rechtml1")
        .await
        .unwrap()
        .unwrap();
    wait_for_status(&app, &incident.id, "unavailable", Duration::from_secs(15)).await;
    let job = app.store.recording(&incident.id).await.unwrap().unwrap();
    assert!(job.attempts >= 2, "tried again until the deadline: {job:?}");
    assert!(job.last_error.unwrap().to_lowercase().contains("audio"));
    app.stop().await;
}

/// The fetch job is durable: a server stopped while the recording is still being processed fetches it
/// after the restart.
async fn a_restart_while_waiting_still_fetches_the_recording(db: Db) {
    let p = Providers::start().await;
    let stand = Stand::start(Duration::from_secs(3), audio(2000), "audio/mpeg").await;
    let extra = [("SOS_DISPATCH__ENABLED", "false".to_owned())];
    let app = proxy_app(db, &p, &stand, &extra).await;
    app.passthru(&format!(
        "CallSid=recrestart1&EmergencyType=Heart&RecordingUrl={}",
        encoded(&stand.url())
    ))
    .await;
    let incident = app
        .store
        .incident_by_call_sid("recrestart1")
        .await
        .unwrap()
        .unwrap();
    let stakeholders = app.stakeholders.clone();
    let test_db = app.stop().await;
    assert_eq!(
        recording_status_in(&test_db, &incident.id).await.as_deref(),
        Some("pending")
    );
    let mut env = p.env();
    env.push(("SOS_RECORDINGS__MODE", "proxy".into()));
    env.push(("SOS_RECORDINGS__ALLOWED_HOSTS", stand.host()));
    env.push(("SOS_RECORDINGS__ALLOW_HTTP", "true".into()));
    env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    let settings = test_settings(&test_db, &stakeholders, &env);
    let app = start(test_db, stakeholders, settings).await;
    wait_for_status(&app, &incident.id, "stored", Duration::from_secs(20)).await;
    app.stop().await;
}

async fn recording_status_in(db: &TestDb, incident_id: &str) -> Option<String> {
    let store = exotel_sos::store::Store::connect(&db.url, 1).await.unwrap();
    let status = store
        .recording(incident_id)
        .await
        .unwrap()
        .map(|r| r.status);
    store.close().await;
    status
}

/// Exotel refuses the credentials again and again (an account on pre-signed URLs): the Call Details
/// API's pre-signed URL is fetched instead, without the credentials. An API trigger's `audio_url` on an
/// allowed host is fetched and served like a Passthru's.
async fn refused_credentials_fall_back_to_the_call_details_url(db: Db) {
    let p = Providers::start().await;
    let stand = Stand::start(Duration::ZERO, audio(1000), "audio/mpeg").await;
    // The plain URL refuses everyone; the pre-signed one needs no credentials.
    Mock::given(method("GET"))
        .and(path("/refused/CA9.mp3"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&stand.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/signed/CA9.mp3"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "audio/mpeg")
                .set_body_bytes(audio(1500)),
        )
        .mount(&stand.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/Accounts/acme/Calls/recsigned1.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "Call": {"Sid": "recsigned1", "Status": "completed",
                     "RecordingUrl": format!("{}/refused/CA9.mp3", stand.server.uri()),
                     "PreSignedRecordingUrl": format!("{}/signed/CA9.mp3?sig=abc", stand.server.uri())}
        })))
        .mount(&p.exotel)
        .await;
    let app = proxy_app(db, &p, &stand, &[("SOS_DISPATCH__ENABLED", "false".into())]).await;
    app.passthru(&format!(
        "CallSid=recsigned1&EmergencyType=Heart&RecordingUrl={}",
        encoded(&format!("{}/refused/CA9.mp3", stand.server.uri()))
    ))
    .await;
    let incident = app
        .store
        .incident_by_call_sid("recsigned1")
        .await
        .unwrap()
        .unwrap();
    wait_for_status(&app, &incident.id, "stored", Duration::from_secs(20)).await;
    assert_eq!(
        app.store
            .recording(&incident.id)
            .await
            .unwrap()
            .unwrap()
            .bytes,
        Some(1500)
    );
    let requests = stand.server.received_requests().await.unwrap();
    let signed = requests
        .iter()
        .find(|r| r.url.path() == "/signed/CA9.mp3")
        .expect("the pre-signed URL was fetched");
    assert!(
        !signed.headers.contains_key("authorization"),
        "a pre-signed URL carries its own authorisation"
    );

    // An API trigger's audio on an allowed host is fetched too.
    let res = app
        .client
        .post(format!("{}/api/v1/incidents", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({
            "emergency_type": "Heart", "message": "Crash sensor 7", "audio_url": stand.url()
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let id = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_status(&app, &id, "stored", Duration::from_secs(10)).await;
    let detail: serde_json::Value = app
        .client
        .get(format!("{}/api/v1/incidents/{id}", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(detail["recording"]["status"], "stored");
    assert_eq!(detail["events"][0]["kind"], "recording_fetched");

    // Past recordings.keep_days: the audio is deleted, with an event, and the links answer 410.
    let later = exotel_sos::domain::now_ms() + 1000;
    assert_eq!(
        app.store
            .delete_recordings_stored_before(later, 10)
            .await
            .unwrap(),
        2
    );
    let link_ref = app.store.deliveries(&id).await.unwrap()[0]
        .link_ref
        .clone()
        .unwrap();
    let res = get(&app, &link_ref, None).await;
    assert_eq!(res.status(), 410);
    assert!(res.text().await.unwrap().contains("deleted"));
    assert!(timeline(&app, &id)
        .await
        .iter()
        .any(|(k, _)| k == "recording_deleted"));
    let chunks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM recording_chunks")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(chunks, 0);
    app.stop().await;
}

/// With `recordings.followup_call = false` the greeting promises nothing and no follow-up is placed;
/// with it on, none is placed for a resolved incident.
async fn no_followup_when_turned_off_or_resolved(db: Db) {
    for (followup, resolve) in [(false, false), (true, true)] {
        let p = Providers::start().await;
        let stand = Stand::start(Duration::from_millis(1500), audio(1000), "audio/mpeg").await;
        let app = proxy_app(
            db,
            &p,
            &stand,
            &[("SOS_RECORDINGS__FOLLOWUP_CALL", followup.to_string())],
        )
        .await;
        let sid = format!("recnofollow{followup}");
        app.passthru(&format!(
            "CallSid={sid}&EmergencyType=Heart&RecordingUrl={}",
            encoded(&stand.url())
        ))
        .await;
        let incident = app.store.incident_by_call_sid(&sid).await.unwrap().unwrap();
        assert!(
            app.deliveries_until(&sid, Duration::from_secs(20), |ds| ds
                .iter()
                .all(|d| d.status != "queued" && d.status != "sending"))
                .await
        );
        let call = app
            .deliveries_of(&sid)
            .await
            .into_iter()
            .find(|d| d.channel == "call" && d.phone == "+919800000001")
            .unwrap();
        let spoken = greeting_text(&app, &call.greeting_ref).await;
        assert_eq!(spoken.contains("will follow"), followup, "{spoken}");
        let res = app
            .post_form(
                "/exotel/call-status",
                &[
                    ("CallSid", call.provider_id.as_deref().unwrap()),
                    ("Status", "completed"),
                ],
            )
            .await;
        assert_eq!(res.status(), 200);
        if resolve {
            let res = app
                .client
                .post(format!(
                    "{}/api/v1/incidents/{}/resolve",
                    app.base, incident.id
                ))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            assert!(res.status().is_success(), "{}", res.status());
        }
        wait_for_status(&app, &incident.id, "stored", Duration::from_secs(20)).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let followups = app
            .deliveries_of(&sid)
            .await
            .into_iter()
            .filter(|d| d.purpose == "followup")
            .count();
        assert_eq!(followups, 0, "followup_call {followup}, resolved {resolve}");
        app.stop().await;
    }
}

both_engines!(
    no_followup_when_turned_off_or_resolved,
    the_recording_is_fetched_served_and_followed_up,
    a_recording_that_never_comes_and_an_expired_link_answer_410,
    hosts_off_the_list_and_direct_mode_are_never_requested,
    oversize_and_non_audio_answers_are_not_kept,
    a_restart_while_waiting_still_fetches_the_recording,
    refused_credentials_fall_back_to_the_call_details_url,
    a_slow_recording_host_holds_no_other_fetch,
    parallel_claims_take_each_recording_once_and_keep_to_its_lease,
);

/// A recording host on a bad line: it answers at once with the headers of a 100 kB MP3, then sends the
/// body at ten bytes a second for as long as the client stays. It notes each request's path and how
/// many downloads are still running.
struct Trickle {
    addr: std::net::SocketAddr,
    paths: Arc<Mutex<Vec<String>>>,
    running: Arc<AtomicUsize>,
}

impl Trickle {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let running = Arc::new(AtomicUsize::new(0));
        let (p, r) = (paths.clone(), running.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(Self::serve(sock, p.clone(), r.clone()));
            }
        });
        Trickle {
            addr,
            paths,
            running,
        }
    }

    async fn serve(
        mut sock: tokio::net::TcpStream,
        paths: Arc<Mutex<Vec<String>>>,
        running: Arc<AtomicUsize>,
    ) {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        paths
            .lock()
            .unwrap()
            .push(line.split(' ').nth(1).unwrap_or("").to_owned());
        running.fetch_add(1, Ordering::SeqCst);
        let body = audio(100_000);
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        if sock.write_all(answer.as_bytes()).await.is_ok() {
            for piece in body.chunks(10) {
                if sock.write_all(piece).await.is_err() || sock.flush().await.is_err() {
                    break;
                }
                // The line's speed, not a wait for anything.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        running.fetch_sub(1, Ordering::SeqCst);
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn paths(&self) -> Vec<String> {
        let mut paths = self.paths.lock().unwrap().clone();
        paths.sort();
        paths
    }

    fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

/// Passthrus of `recordings` (CallSid, recording URL), in order; their incidents' ids.
async fn incidents_with_recordings(app: &TestApp, recordings: &[(&str, String)]) -> Vec<String> {
    let mut ids = Vec::new();
    for (sid, url) in recordings {
        let res = app
            .passthru(&format!(
                "CallSid={sid}&EmergencyType=Heart&RecordingUrl={}",
                encoded(url)
            ))
            .await;
        assert_eq!(res.status(), 200);
        ids.push(
            app.store
                .incident_by_call_sid(sid)
                .await
                .unwrap()
                .unwrap()
                .id,
        );
    }
    ids
}

/// Two recordings that come at ten bytes a second from one host, then a normal one from another: the
/// normal one is stored while both slow downloads are still running (neither has ended nor been
/// given up), and no recording is requested twice.
async fn a_slow_recording_host_holds_no_other_fetch(db: Db) {
    let p = Providers::start().await;
    let slow = Trickle::start().await;
    let stand = Stand::start(Duration::ZERO, audio(2000), "audio/mpeg").await;
    let hosts = format!("{},{}", stand.host(), slow.host());
    let app = proxy_app(
        db,
        &p,
        &stand,
        &[
            ("SOS_RECORDINGS__ALLOWED_HOSTS", hosts),
            ("SOS_DISPATCH__ENABLED", "false".into()),
        ],
    )
    .await;
    // The slow ones first: they are due first.
    let ids = incidents_with_recordings(
        &app,
        &[
            ("recslow1", slow.url("/slow1.mp3")),
            ("recslow2", slow.url("/slow2.mp3")),
            ("recnormal1", stand.url()),
        ],
    )
    .await;
    // The slow downloads run for a minute (the fetch's own time limit) before they end.
    let stored = eventually(Duration::from_secs(50), || async {
        recording_status(&app, &ids[2]).await.as_deref() == Some("stored")
    })
    .await;
    assert!(
        stored,
        "the normal recording waited: {:?}",
        app.store.recording(&ids[2]).await.unwrap()
    );
    for id in &ids[..2] {
        let job = app.store.recording(id).await.unwrap().unwrap();
        assert_eq!(job.status, "pending", "{job:?}");
        assert_eq!(
            (job.attempts, job.last_error.as_deref()),
            (1, None),
            "its first download still runs: {job:?}"
        );
        assert!(job.lease_token.is_some(), "{job:?}");
    }
    assert_eq!(slow.running(), 2, "both slow downloads still run");
    assert_eq!(
        slow.paths(),
        ["/slow1.mp3", "/slow2.mp3"],
        "each asked for once"
    );
    assert_eq!(stand.hits(), 1);
    app.stop().await;
}

/// Claims from many tasks at once (as a process fetching several recordings, or several replicas, make
/// them) take each due recording once; one under lease is claimed again only once its lease has run
/// out in the database's clock, and then the earlier holder can no longer write to it.
async fn parallel_claims_take_each_recording_once_and_keep_to_its_lease(db: Db) {
    let p = Providers::start().await;
    // Never ready: the jobs stay pending.
    let stand = Stand::start(Duration::from_secs(3600), audio(2000), "audio/mpeg").await;
    let app = proxy_app(db, &p, &stand, &[("SOS_DISPATCH__ENABLED", "false".into())]).await;
    let recordings: Vec<(String, String)> = (0..6)
        .map(|i| (format!("recclaim{i}"), stand.url()))
        .collect();
    let recordings: Vec<(&str, String)> = recordings
        .iter()
        .map(|(s, u)| (s.as_str(), u.clone()))
        .collect();
    let ids = incidents_with_recordings(&app, &recordings).await;
    let test_db = app.stop().await;
    let store = exotel_sos::store::Store::connect(&test_db.url, 8)
        .await
        .unwrap();
    // Every job due, whatever the stopped server's tries left as its next time.
    store.clock().advance(Duration::from_secs(60));

    let claims = (0..8).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut taken = Vec::new();
            while let Some(job) = store
                .claim_recording(&format!("claimer-{i}-{}", taken.len()))
                .await
                .unwrap()
            {
                taken.push((job.incident_id, job.lease_token.unwrap()));
            }
            taken
        })
    });
    let mut taken: Vec<(String, String)> = Vec::new();
    for c in claims {
        taken.extend(c.await.unwrap());
    }
    let mut claimed: Vec<String> = taken.iter().map(|(id, _)| id.clone()).collect();
    claimed.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(claimed, expected, "each recording claimed exactly once");
    assert!(
        store.claim_recording("late").await.unwrap().is_none(),
        "all under lease"
    );

    // One holder's lease runs out (its process stalled): the job is claimed again, and the stalled
    // holder's writes are refused.
    let (stale_id, stale_token) = taken[0].clone();
    sqlx::query("UPDATE recordings SET lease_until = 0 WHERE incident_id = $1")
        .bind(&stale_id)
        .execute(store.pool())
        .await
        .unwrap();
    let again = store
        .claim_recording("second-holder")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.incident_id, stale_id);
    assert!(store.claim_recording("third").await.unwrap().is_none());
    assert!(store
        .put_recording_chunk(&stale_id, &stale_token, 0, vec![1, 2, 3])
        .await
        .is_err());
    let stale_job = store.recording(&stale_id).await.unwrap().unwrap();
    assert!(!store
        .recording_stored(&stale_job, &stale_token, "audio/mpeg", 3, 1)
        .await
        .unwrap());
    assert!(store
        .put_recording_chunk(&stale_id, "second-holder", 0, audio(10))
        .await
        .is_ok());
    assert!(store
        .recording_stored(&again, "second-holder", "audio/mpeg", 10, 1)
        .await
        .unwrap());
    store.close().await;
}
