//! The console in a real browser: Debian's Chromium driven over WebDriver (chromedriver), with a
//! few plain W3C WebDriver requests sent by reqwest. Outside CI, without chromium and chromedriver,
//! the test says so and passes; with `CI` set it fails instead (.ci/run installs them).

use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt as _;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::helpers::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C key under which an element reference is returned.
const ELEMENT: &str = "element-6066-11e4-a52f-4a5cb0c0a8d";

/// One WebDriver session on a chromedriver this test started.
struct Browser {
    http: reqwest::Client,
    session: String,
    driver: std::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        // A process group of its own, so that the browser it starts can be stopped with it.
        let driver = std::process::Command::new(CHROMEDRIVER)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let ready = eventually(Duration::from_secs(20), || async {
            http.get(format!("{base}/status"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(ready, "chromedriver did not come up");
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--window-size=1200,900".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args}
        }}});
        let res: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = res["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {res}"))
            .to_owned();
        Browser {
            http,
            session: format!("{base}/session/{session}"),
            driver,
            _profile: profile,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.session));
        if method != reqwest::Method::GET {
            req = req.json(&body);
        }
        let res: Value = req.send().await.unwrap().json().await.unwrap();
        if res["value"].get("error").is_some() {
            panic!("WebDriver {path}: {res}");
        }
        res["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        // The W3C key, or the only value of the reference object.
        v[ELEMENT]
            .as_str()
            .or_else(|| v.as_object()?.values().next()?.as_str())
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/click"),
            json!({}),
        )
        .await;
    }

    async fn js(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Waits (generously) until `script` returns true.
    async fn until(&self, script: &str, timeout: Duration) -> bool {
        eventually(timeout, || async { self.js(script).await == json!(true) }).await
    }

    async fn screenshot(&self, name: &str) {
        let png = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), &bytes).unwrap();
        // `SOS_UPDATE_SCREENSHOTS=1` refreshes the pictures in the README and docs/operations.md.
        if std::env::var_os("SOS_UPDATE_SCREENSHOTS").is_some() {
            std::fs::write(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("docs")
                    .join(name),
                &bytes,
            )
            .unwrap();
        }
        println!("screenshot: {}", dir.join(name).display());
    }

    async fn window(&self, handle: &str) {
        self.call(
            reqwest::Method::POST,
            "/window",
            json!({ "handle": handle }),
        )
        .await;
    }
}

impl Browser {
    /// Ends the session (the driver closes Chromium).
    async fn quit(&self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Whatever happened (a failed assertion included), the driver's whole group goes: the driver
        // and the browser it started, and nothing else.
        let group = format!("-{}", self.driver.id());
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &group])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Signs in, sees a Passthru appear on the board live, opens it, resolves it in a second tab and sees
/// it leave the board in the first: no reload anywhere (a marker set in the page survives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_updates_live_in_a_browser() {
    let present =
        std::path::Path::new(CHROMIUM).exists() && std::path::Path::new(CHROMEDRIVER).exists();
    if !present {
        // .ci/run installs them: in CI a missing browser is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but chromium or chromedriver is not installed"
        );
        println!("SKIPPED the_board_updates_live_in_a_browser: chromium or chromedriver is not installed");
        return;
    }
    let app = spawn_app(Db::Sqlite).await;
    let b = Browser::start().await;
    let wait = Duration::from_secs(30);

    b.goto(&format!("{}/console", app.base)).await;
    assert!(
        b.until("return !!document.getElementById('token')", wait)
            .await,
        "the sign-in page"
    );
    b.type_into("#name", "Dr. Asha Rao").await;
    b.type_into("#token", ADMIN_TOKEN).await;
    b.click("#sign-in").await;
    assert!(
        b.until("return !!document.getElementById('no-incidents')", wait)
            .await,
        "the empty board"
    );
    // Give the event stream a moment to open, then mark the page: a reload would lose the mark.
    assert!(
        b.until("return !document.body.classList.contains('offline')", wait)
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.js("window.sosMark = 42; return true").await;

    let sent = Instant::now();
    let res = app
        .passthru("CallSid=CA-browser-1&EmergencyType=Heart&From=09800000099")
        .await;
    assert_eq!(res.status(), 200);
    let id = app
        .store
        .incident_by_call_sid("CA-browser-1")
        .await
        .unwrap()
        .unwrap()
        .id;
    let shown = format!("return !!document.getElementById('incident-{id}')");
    assert!(
        b.until(&shown, wait).await,
        "the Passthru did not appear on the board"
    );
    let appeared = sent.elapsed();
    println!(
        "console live update: the Passthru appeared on the board {} ms after it was sent",
        appeared.as_millis()
    );
    assert_eq!(
        b.js("return window.sosMark").await,
        json!(42),
        "the board was reloaded"
    );
    // Dry-run: every delivery ends simulated; the board shows it without a reload too.
    assert!(
        b.until(
            "return document.querySelectorAll('td[data-state=\"simulated\"]').length === 7",
            wait
        )
        .await,
        "the deliveries' states did not reach the board"
    );
    b.screenshot("console-board.png").await;

    // Open it in a second tab and resolve it there; the board tab stays as it is.
    let board_tab = b.call(reqwest::Method::GET, "/window", Value::Null).await;
    let board_tab = board_tab.as_str().unwrap().to_owned();
    let new = b
        .call(reqwest::Method::POST, "/window/new", json!({"type": "tab"}))
        .await;
    b.window(new["handle"].as_str().unwrap()).await;
    b.goto(&format!("{}/console/incidents/{id}", app.base))
        .await;
    assert!(
        b.until("return !!document.getElementById('resolve')", wait)
            .await,
        "the incident page"
    );
    assert!(
        b.until(
            "return document.body.innerText.includes('would have been sent')",
            wait
        )
        .await
    );
    b.screenshot("console-incident.png").await;
    b.click("#resolve").await;
    assert!(
        b.until(
            "var s = document.getElementById('incident-status'); return !!s && s.textContent === 'resolved'",
            wait
        )
        .await,
        "the incident page does not show it resolved"
    );
    let resolved = Instant::now();
    b.window(&board_tab).await;
    let gone = format!("return !document.getElementById('incident-{id}')");
    assert!(
        b.until(&gone, wait).await,
        "the resolved incident stayed on the board"
    );
    println!(
        "console live update: the resolved incident left the board {} ms after the resolve",
        resolved.elapsed().as_millis()
    );
    assert_eq!(
        b.js("return window.sosMark").await,
        json!(42),
        "the board was reloaded"
    );
    b.quit().await;
    drop(b);
    app.stop().await;
}
