//! The ops console: sign-in, sessions and their cookie, CSRF on every state-changing form, the sign-in
//! rate limit, no token ever shown; and one run in a real browser (`browser.rs` beside this file).

use std::time::Duration;

use reqwest::StatusCode;

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    without_a_session_pages_redirect_and_streams_are_refused,
    a_form_without_the_csrf_token_is_forbidden,
    the_session_cookie_has_its_flags_and_only_its_hash_is_stored,
    the_console_never_shows_a_token,
    the_console_token_can_resolve,
    the_console_token_can_acknowledge,
    wrong_tokens_are_rate_limited_and_the_right_one_always_signs_in,
    the_incident_list_summarises_each_contacts_channels,
    the_start_banner_names_the_console_and_a_first_passthru,
    event_streams_are_capped_and_end_when_the_server_stops,
    changing_a_token_ends_the_sessions_it_opened,
);

/// A token changed in the settings (revoked) ends the sessions it opened, on every replica; sessions
/// of the other token stay.
async fn changing_a_token_ends_the_sessions_it_opened(db: Db) {
    let first = [("SOS_SERVER__CONSOLE_TOKEN", CONSOLE_TOKEN.to_owned())];
    let app = spawn_app_with(db, &first).await;
    let desk = sign_in(&app, CONSOLE_TOKEN, "Front desk").await;
    let admin = sign_in(&app, ADMIN_TOKEN, "Asha").await;
    assert_eq!(
        get(&app, "/console", Some(&desk)).await.status(),
        StatusCode::OK
    );
    let stakeholders = app.stakeholders.clone();
    let test_db = app.stop().await;
    let changed = [(
        "SOS_SERVER__CONSOLE_TOKEN",
        "another-console-token-98765".to_owned(),
    )];
    let settings = test_settings(&test_db, &stakeholders, &changed);
    let app = start(test_db, stakeholders, settings).await;
    assert_eq!(
        get(&app, "/console", Some(&desk)).await.status(),
        StatusCode::SEE_OTHER,
        "the old console token's session has ended"
    );
    assert_eq!(
        get(&app, "/console/events", Some(&desk)).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&app, "/console", Some(&admin)).await.status(),
        StatusCode::OK,
        "the admin token did not change"
    );
    app.stop().await;
}

pub const CONSOLE_TOKEN: &str = "test-console-token-0123456789";

/// Signs in with `token` as `name`; the session cookie (`name=value`).
pub async fn sign_in(app: &TestApp, token: &str, name: &str) -> String {
    let res = app
        .client
        .post(format!("{}/console/login", app.base))
        .form(&[("token", token), ("name", name)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER, "sign-in answers 303");
    let cookie = res
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_owned();
    cookie.split(';').next().unwrap().to_owned()
}

async fn get(app: &TestApp, path: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut req = app.client.get(format!("{}{path}", app.base));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    req.send().await.unwrap()
}

async fn post_form(
    app: &TestApp,
    path: &str,
    cookie: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    app.client
        .post(format!("{}{path}", app.base))
        .header("cookie", cookie)
        .form(form)
        .send()
        .await
        .unwrap()
}

/// The CSRF token in a page's forms.
fn csrf_of(html: &str) -> String {
    let at = html
        .find(r#"name="csrf" value=""#)
        .expect("a form with a csrf field")
        + 19;
    html[at..].split('"').next().unwrap().to_owned()
}

/// A stored Heart incident; its id.
async fn incident(app: &TestApp, call_sid: &str) -> String {
    let res = app
        .passthru(&format!(
            "CallSid={call_sid}&EmergencyType=Heart&From=09800000099"
        ))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    app.store
        .incident_by_call_sid(call_sid)
        .await
        .unwrap()
        .expect("stored")
        .id
}

async fn without_a_session_pages_redirect_and_streams_are_refused(db: Db) {
    let app = spawn_app(db).await;
    let id = incident(&app, "CA-console-1").await;
    for path in ["/console", &format!("/console/incidents/{id}")] {
        let res = get(&app, path, None).await;
        assert_eq!(res.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(res.headers()["location"], "/console/login", "{path}");
    }
    for path in ["/console/events", "/console/board"] {
        assert_eq!(
            get(&app, path, None).await.status(),
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    // A made-up or signed-out session is no session.
    let forged = "sos_console=00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    assert_eq!(
        get(&app, "/console/events", Some(forged)).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let cookie = sign_in(&app, ADMIN_TOKEN, "Asha").await;
    let board = get(&app, "/console", Some(&cookie)).await;
    assert_eq!(board.status(), StatusCode::OK);
    let csrf = csrf_of(&board.text().await.unwrap());
    let out = post_form(&app, "/console/logout", &cookie, &[("csrf", &csrf)]).await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert!(out.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(
        get(&app, "/console", Some(&cookie)).await.status(),
        StatusCode::SEE_OTHER,
        "signed out"
    );
    app.stop().await;
}

async fn a_form_without_the_csrf_token_is_forbidden(db: Db) {
    let app = spawn_app(db).await;
    let id = incident(&app, "CA-console-2").await;
    let cookie = sign_in(&app, ADMIN_TOKEN, "Asha").await;
    let path = format!("/console/incidents/{id}/resolve");
    for form in [
        vec![],
        vec![("csrf", "0123456789abcdef")],
        vec![("csrf", "")],
    ] {
        let res = post_form(&app, &path, &cookie, &form).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{form:?}");
    }
    let logout = post_form(&app, "/console/logout", &cookie, &[]).await;
    assert_eq!(logout.status(), StatusCode::FORBIDDEN);
    let open = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(
        open.status.as_str(),
        "open",
        "a forged form changed nothing"
    );

    let page = get(&app, &format!("/console/incidents/{id}"), Some(&cookie)).await;
    let csrf = csrf_of(&page.text().await.unwrap());
    let res = post_form(&app, &path, &cookie, &[("csrf", &csrf)]).await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let resolved = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(resolved.status.as_str(), "resolved");
    // Who resolved it stays on the incident's trail.
    let trail = app.store.incident_timeline(&id).await.unwrap();
    assert!(
        trail
            .iter()
            .any(|e| e.kind == "resolved" && e.detail == "resolved in the console by Asha (admin)"),
        "{trail:?}"
    );
    app.stop().await;
}

async fn the_session_cookie_has_its_flags_and_only_its_hash_is_stored(db: Db) {
    let app = spawn_app_with(
        db,
        &[(
            "SOS_SERVER__PUBLIC_URL",
            "https://sos.example.org".to_owned(),
        )],
    )
    .await;
    let res = app
        .client
        .post(format!("{}/console/login", app.base))
        .form(&[("token", ADMIN_TOKEN), ("name", "Asha")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    let attrs: Vec<&str> = cookie.split(';').map(str::trim).collect();
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/console"] {
        assert!(attrs.contains(&flag), "{flag} missing in {cookie}");
    }
    let max_age: u64 = attrs
        .iter()
        .find_map(|a| a.strip_prefix("Max-Age="))
        .expect("an expiring cookie")
        .parse()
        .unwrap();
    assert!((3600..=86_400).contains(&max_age), "{max_age}");
    let id = attrs[0].strip_prefix("sos_console=").unwrap();
    assert!(id.len() >= 32);
    let stored: Vec<String> = sqlx::query_scalar("SELECT id_hash FROM console_sessions")
        .fetch_all(app.store.pool())
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0], id, "the raw session id is not stored");
    assert_eq!(stored[0], exotel_sos::app::console::hash_id(id));
    app.stop().await;

    // Over plain http (a laptop trying it out) the cookie cannot be Secure, or it would never come back.
    let app = spawn_app(db).await;
    let res = app
        .client
        .post(format!("{}/console/login", app.base))
        .form(&[("token", ADMIN_TOKEN), ("name", "Asha")])
        .send()
        .await
        .unwrap();
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    assert!(!cookie.contains("Secure"), "{cookie}");
    app.stop().await;
}

async fn the_console_never_shows_a_token(db: Db) {
    let app = spawn_app_with(
        db,
        &[("SOS_SERVER__CONSOLE_TOKEN", CONSOLE_TOKEN.to_owned())],
    )
    .await;
    let id = incident(&app, "CA-console-3").await;
    // Dry-run: the simulated requests carry callback URLs with the webhook token before redaction.
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.store
                .deliveries(&id)
                .await
                .unwrap()
                .iter()
                .all(|d| d.status.as_str() == "simulated")
        })
        .await
    );
    let wrong = app
        .client
        .post(format!("{}/console/login", app.base))
        .form(&[("token", "a-wrong-token-sent-by-someone"), ("name", "Eve")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let wrong = wrong.text().await.unwrap();
    assert!(
        !wrong.contains("a-wrong-token-sent-by-someone"),
        "a sign-in page echoed the token"
    );
    let cookie = sign_in(&app, ADMIN_TOKEN, "Asha").await;
    let mut bodies = vec![wrong];
    for path in [
        "/console".to_owned(),
        "/console/board".to_owned(),
        "/console/login".to_owned(),
        format!("/console/incidents/{id}"),
        format!("/console/incidents/{id}/live"),
    ] {
        let res = get(&app, &path, Some(&cookie)).await;
        assert!(
            res.status().is_success() || res.status().is_redirection(),
            "{path}"
        );
        bodies.push(res.text().await.unwrap());
    }
    let incident_page = &bodies[4];
    assert!(
        incident_page.contains("would have been sent"),
        "the dry-run request is shown"
    );
    assert!(
        incident_page.contains("+91******0099"),
        "the caller is masked"
    );
    for body in &bodies {
        for secret in [WEBHOOK_TOKEN, ADMIN_TOKEN, CONSOLE_TOKEN] {
            assert!(!body.contains(secret), "a console page shows a token");
        }
        assert!(
            !body.contains("9800000099"),
            "a console page shows a full number"
        );
        assert!(
            !body.contains("9800000001"),
            "a console page shows a full number"
        );
    }
    app.stop().await;
}

async fn the_console_token_can_resolve(db: Db) {
    let app = spawn_app_with(
        db,
        &[("SOS_SERVER__CONSOLE_TOKEN", CONSOLE_TOKEN.to_owned())],
    )
    .await;
    let id = incident(&app, "CA-console-4").await;
    let cookie = sign_in(&app, CONSOLE_TOKEN, "Front desk").await;
    let page = get(&app, &format!("/console/incidents/{id}"), Some(&cookie)).await;
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("Front desk (console)"));
    let res = post_form(
        &app,
        &format!("/console/incidents/{id}/resolve"),
        &cookie,
        &[("csrf", &csrf_of(&html))],
    )
    .await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        app.store
            .incident(&id)
            .await
            .unwrap()
            .unwrap()
            .status
            .as_str(),
        "resolved"
    );
    let board = get(&app, "/console/board", Some(&cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(!board.contains(&id), "a resolved incident leaves the board");
    app.stop().await;
}

async fn the_console_token_can_acknowledge(db: Db) {
    let app = spawn_app_with(
        db,
        &[
            ("SOS_SERVER__CONSOLE_TOKEN", CONSOLE_TOKEN.to_owned()),
            without_dispatcher(),
        ],
    )
    .await;
    let id = incident(&app, "CA-console-ack").await;
    let cookie = sign_in(&app, CONSOLE_TOKEN, "Front desk").await;
    let page = get(&app, &format!("/console/incidents/{id}"), Some(&cookie)).await;
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"id="acknowledge""#), "{html}");
    let path = format!("/console/incidents/{id}/ack");
    let forged = post_form(&app, &path, &cookie, &[("csrf", "0123456789abcdef")]).await;
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        app.store
            .incident(&id)
            .await
            .unwrap()
            .unwrap()
            .status
            .as_str(),
        "open"
    );
    let res = post_form(&app, &path, &cookie, &[("csrf", &csrf_of(&html))]).await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    let row = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(row.status.as_str(), "acknowledged");
    assert_eq!(row.acknowledged_by.as_deref(), Some("Front desk"));
    assert_eq!(row.acknowledged_via.as_deref(), Some("console"));
    // Still on the board (unresolved), now with who acknowledged; no second Acknowledge button.
    let board = get(&app, "/console/board", Some(&cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(board.contains(&id));
    assert!(board.contains("Acknowledged by: Front desk"), "{board}");
    let html = get(&app, &format!("/console/incidents/{id}"), Some(&cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(!html.contains(r#"id="acknowledge""#));
    assert!(html.contains(r#"id="resolve""#));
    app.stop().await;
}

/// Wrong tokens from one address wait after five a minute (`429`, `Retry-After`); the right token is
/// checked first and always signs in.
async fn wrong_tokens_are_rate_limited_and_the_right_one_always_signs_in(db: Db) {
    let app = spawn_app(db).await;
    let try_token = |token: &'static str| {
        let app = &app;
        async move {
            app.client
                .post(format!("{}/console/login", app.base))
                .form(&[("token", token), ("name", "Eve")])
                .send()
                .await
                .unwrap()
        }
    };
    for _ in 0..5 {
        assert_eq!(try_token("wrong").await.status(), StatusCode::UNAUTHORIZED);
    }
    let limited = try_token("wrong").await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // Behind a reverse proxy with no trusted proxy every client shares the proxy's address: the
    // guesses must not lock the desk out. The right token signs in while wrong ones still wait.
    for _ in 0..3 {
        assert_eq!(try_token(ADMIN_TOKEN).await.status(), StatusCode::SEE_OTHER);
        assert_eq!(
            try_token("wrong").await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    app.stop().await;
}

async fn the_incident_list_summarises_each_contacts_channels(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let id = incident(&app, "CA-console-5").await;
    let list: serde_json::Value = app
        .client
        .get(format!("{}/api/v1/incidents", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first = &list["incidents"][0];
    assert_eq!(first["id"], id.as_str());
    let contacts = first["contacts"].as_array().expect("a per-contact summary");
    let cells: usize = contacts
        .iter()
        .map(|c| c["channels"].as_object().unwrap().len())
        .sum();
    assert_eq!(cells, HEART_DELIVERIES, "{contacts:?}");
    for c in contacts {
        assert!(c["phone"].as_str().unwrap().contains("******"), "masked");
        for state in c["channels"].as_object().unwrap().values() {
            assert_eq!(state, "queued");
        }
    }
    app.stop().await;
}

async fn the_start_banner_names_the_console_and_a_first_passthru(db: Db) {
    // A generated webhook token, every channel dry-run: a ready-to-paste test Passthru.
    let app = spawn_app_with(db, &[("SOS_SERVER__WEBHOOK_TOKEN", String::new())]).await;
    let built = exotel_sos::App::build((*app.state.settings).clone())
        .await
        .unwrap();
    let banner = built.banner();
    let base = app.state.settings.public_base().to_owned();
    assert!(banner.contains(&format!("{base}/console")), "{banner}");
    let curl = banner
        .lines()
        .find(|l| l.trim_start().starts_with("curl "))
        .unwrap_or_else(|| panic!("no curl line: {banner}"));
    let token = secrecy::ExposeSecret::expose_secret(&*built.state.webhook_token).to_owned();
    assert!(curl.contains(&format!("{base}/exotel/passthru?token={token}&CallSid=")));
    assert!(curl.contains("&EmergencyType=Heart"));
    assert!(!banner.contains("drill --contact"));
    built.state.store.close().await;
    app.stop().await;

    // A token given in settings is never printed: no curl line then.
    let app = spawn_app(db).await;
    let built = exotel_sos::App::build((*app.state.settings).clone())
        .await
        .unwrap();
    let banner = built.banner();
    assert!(banner.contains("/console"));
    assert!(!banner.contains("curl "), "{banner}");
    assert!(!banner.contains(WEBHOOK_TOKEN));
    built.state.store.close().await;
    app.stop().await;
}

async fn event_streams_are_capped_and_end_when_the_server_stops(db: Db) {
    // 8 connections, 4 kept for Exotel: the other routes share 4 slots, event streams at most 1 of them.
    let app = spawn_app_with(
        db,
        &[
            ("SOS_SERVER__MAX_CONNECTIONS", "8".to_owned()),
            ("SOS_SERVER__RESERVED_FOR_EXOTEL", "4".to_owned()),
        ],
    )
    .await;
    let cookie = sign_in(&app, ADMIN_TOKEN, "Asha").await;
    let mut stream = get(&app, "/console/events", Some(&cookie)).await;
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    assert_eq!(stream.headers()["x-accel-buffering"], "no");
    let first = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
        .await
        .expect("the first event at once")
        .unwrap()
        .unwrap();
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(
        first.contains("event: change") && first.contains("retry:"),
        "{first}"
    );

    let second = get(&app, "/console/events", Some(&cookie)).await;
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(second.headers().contains_key("retry-after"));
    // The pages and the API still have their share.
    assert_eq!(
        get(&app, "/console", Some(&cookie)).await.status(),
        StatusCode::OK
    );

    // A change reaches the open stream.
    incident(&app, "CA-console-6").await;
    let next = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
        .await
        .expect("a change event within the watcher's poll")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&next).contains("event: change"));

    // Stopping does not wait for the open stream.
    let started = std::time::Instant::now();
    app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the stop waited {:?} for an event stream",
        started.elapsed()
    );
}

/// Behind a reverse proxy the server was not told about (`server.trusted_proxies` empty), requests
/// carry `X-Forwarded-For` and every client shares the proxy's address: the server says so in its log,
/// once however many such requests come, and not for requests without the header; with the proxy
/// trusted it says nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_without_a_trusted_proxy_are_warned_about_once() {
    const WARNING: &str = "X-Forwarded-For but server.trusted_proxies is empty";
    let p = Providers::start().await;
    for trusted in ["", "127.0.0.1"] {
        let dir = tempfile::tempdir().unwrap();
        let stakeholders = dir.path().join("stakeholders.toml");
        std::fs::write(&stakeholders, STAKEHOLDERS).unwrap();
        let log = dir.path().join("server.log");
        let db_url = format!("sqlite://{}?mode=rwc", dir.path().join("sos.db").display());
        let mut server = spawn_server_logging(
            &db_url,
            &stakeholders,
            &p,
            free_port(),
            &[("SOS_SERVER__TRUSTED_PROXIES", trusted.to_owned())],
            Some(&log),
        );
        server.wait_healthy().await;
        let client = reqwest::Client::new();
        let login = |forwarded: bool| {
            let mut req = client
                .post(format!("{}/console/login", server.base()))
                .form(&[("token", "wrong"), ("name", "Eve")]);
            if forwarded {
                req = req.header("x-forwarded-for", "203.0.113.7");
            }
            req.send()
        };
        // Each answer is sent after its request's log lines are written.
        assert_eq!(
            login(false).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        let warnings = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches(WARNING)
                .count()
        };
        assert_eq!(warnings(), 0, "no header, no warning");
        for _ in 0..3 {
            assert_ne!(login(true).await.unwrap().status(), StatusCode::OK);
        }
        let expected = usize::from(trusted.is_empty());
        assert_eq!(
            warnings(),
            expected,
            "trusted_proxies {trusted:?}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        server.kill();
    }
}
