//! `exotel-sos trigger` against a running server, and the server's JSON logs when run as the real binary.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    trigger_reports_each_outcome_with_its_exit_code,
    trigger_reads_the_generated_token_from_the_database,
    resolve_closes_an_incident_by_id,
);

const BIN: &str = env!("CARGO_BIN_EXE_exotel-sos");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary with only the given `SOS_*` variables (none inherited) and these arguments.
async fn run(env: &[(&str, String)], args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(BIN);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOS_") || k == "RUST_LOG") {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.args(args).output())
        .await
        .expect("the command finishes")
        .expect("the command runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn env_for(app: &TestApp) -> Vec<(&'static str, String)> {
    vec![
        ("SOS_DATABASE__URL", app.db.url.clone()),
        ("SOS_SERVER__PUBLIC_URL", app.base.clone()),
    ]
}

async fn resolve_closes_an_incident_by_id(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let env = env_for(&app);
    assert_eq!(
        app.passthru("CallSid=CA-resolve-1&EmergencyType=Heart")
            .await
            .status(),
        200
    );
    let id = app
        .store
        .incident_by_call_sid("CA-resolve-1")
        .await
        .unwrap()
        .unwrap()
        .id;
    let r = run(&env, &["resolve", &id, "--token", ADMIN_TOKEN]).await;
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("resolved") && r.stdout.contains(&id),
        "{}",
        r.stdout
    );
    let row = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(row.status.as_str(), "resolved");
    let trail = app.store.incident_timeline(&id).await.unwrap();
    assert!(
        trail
            .iter()
            .any(|e| e.detail == "resolved with the resolve command"),
        "{trail:?}"
    );
    // Nothing had gone out: every queued delivery was cancelled.
    assert!(app
        .store
        .deliveries(&id)
        .await
        .unwrap()
        .iter()
        .all(|d| d.status.as_str() == "cancelled"));

    let again = run(&env, &["resolve", &id, "--token", ADMIN_TOKEN]).await;
    assert_eq!(again.code, 0);
    assert!(
        again.stdout.contains("already resolved"),
        "{}",
        again.stdout
    );
    let missing = run(
        &env,
        &[
            "resolve",
            "00000000-0000-0000-0000-000000000000",
            "--token",
            ADMIN_TOKEN,
        ],
    )
    .await;
    assert_eq!(missing.code, 7, "{}", missing.stderr);
    let refused = run(&env, &["resolve", &id, "--token", "wrong"]).await;
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    app.stop().await;
}

async fn trigger_reports_each_outcome_with_its_exit_code(db: Db) {
    let app = spawn_app(db).await;
    let env = env_for(&app);
    let ok = [
        "trigger",
        "--type",
        "Heart",
        "--message",
        "db1 is down",
        "--token",
        ADMIN_TOKEN,
    ];
    let r = run(&env, &ok).await;
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("created"), "{}", r.stdout);
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);
    let (_, list) = crate::op::get(&app, "/api/v1/incidents").await;
    assert_eq!(list["incidents"][0]["source"], "cli");
    assert_eq!(list["incidents"][0]["message"], "db1 is down");
    let id = list["incidents"][0]["id"].as_str().unwrap();
    assert!(r.stdout.contains(id), "the id is printed: {}", r.stdout);

    // A dedup key: the second run finds the open incident.
    let dedup = [
        "trigger",
        "--type",
        "Brain",
        "--message",
        "m",
        "--dedup-key",
        "k1",
        "--audio-url",
        "https://example.com/a.mp3",
        "--server",
        &app.base,
        "--token",
        ADMIN_TOKEN,
    ];
    assert_eq!(run(&env, &dedup).await.code, 0);
    let r = run(&env, &dedup).await;
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("already open"), "{}", r.stdout);
    assert_eq!(app.store.count_incidents().await.unwrap(), 2);

    let r = run(
        &env,
        &[
            "trigger",
            "--type",
            "Heart",
            "--message",
            "m",
            "--token",
            "wrong",
        ],
    )
    .await;
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("401"), "{}", r.stderr);
    assert!(!r.stderr.contains(ADMIN_TOKEN));

    let r = run(
        &env,
        &[
            "trigger",
            "--type",
            "Heart",
            "--message",
            "m",
            "--audio-url",
            "ftp://x",
            "--token",
            ADMIN_TOKEN,
        ],
    )
    .await;
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(r.stderr.contains("audio_url"), "{}", r.stderr);

    let r = run(
        &env,
        &[
            "trigger",
            "--type",
            "Heart",
            "--message",
            "",
            "--token",
            ADMIN_TOKEN,
        ],
    )
    .await;
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(r.stderr.contains("message"), "{}", r.stderr);

    // Nothing listens on a port just freed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let r = run(
        &env,
        &[
            "trigger",
            "--type",
            "Heart",
            "--message",
            "m",
            "--token",
            ADMIN_TOKEN,
            "--server",
            &format!("http://{closed}"),
        ],
    )
    .await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("cannot reach"), "{}", r.stderr);
    assert_eq!(app.store.count_incidents().await.unwrap(), 2);
    app.stop().await;
}

async fn trigger_reads_the_generated_token_from_the_database(db: Db) {
    // No admin token in settings: the server generates one and stores it.
    let app = spawn_app_with(db, &[("SOS_SERVER__ADMIN_TOKEN", String::new())]).await;
    let r = run(
        &env_for(&app),
        &[
            "trigger",
            "--type",
            "Heart",
            "--message",
            "from the db token",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);

    // Neither flag, setting nor reachable database: a clear message.
    let r = run(
        &[
            (
                "SOS_DATABASE__URL",
                "sqlite:///nonexistent/dir/x.db?mode=rwc".into(),
            ),
            ("SOS_SERVER__PUBLIC_URL", app.base.clone()),
        ],
        &["trigger", "--type", "Heart", "--message", "m"],
    )
    .await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no admin token"), "{}", r.stderr);
    app.stop().await;
}

/// The real binary, JSON logs: API work carries the incident id; no token or full number is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_incident_id_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let stakeholders = dir.path().join("stakeholders.toml");
    std::fs::write(&stakeholders, STAKEHOLDERS).unwrap();
    let env = [
        (
            "SOS_DATABASE__URL",
            format!("sqlite://{}?mode=rwc", dir.path().join("sos.db").display()),
        ),
        ("SOS_SERVER__LISTEN", "127.0.0.1:0".to_owned()),
        ("SOS_SERVER__ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("SOS_SERVER__WEBHOOK_TOKEN", WEBHOOK_TOKEN.to_owned()),
        ("SOS_STAKEHOLDERS__FILE", stakeholders.display().to_string()),
        ("SOS_LOG__FORMAT", "json".to_owned()),
        ("SOS_LOG__LEVEL", "info".to_owned()),
    ];
    let mut cmd = tokio::process::Command::new(BIN);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOS_") || k == "RUST_LOG") {
        cmd.env_remove(k);
    }
    let mut server = cmd
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let base = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(addr) = line.strip_prefix("exotel-sos listening on ") {
                return addr.trim().to_owned();
            }
        }
        panic!("the server exited before listening");
    })
    .await
    .expect("the server starts");
    let collected = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = collected.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });

    let r = run(
        &[("SOS_SERVER__PUBLIC_URL", base.clone())],
        &[
            "trigger",
            "--type",
            "Heart",
            "--message",
            "log me",
            "--token",
            ADMIN_TOKEN,
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let client = reqwest::Client::new();
    let res = client
        .get(format!(
            "{base}/exotel/passthru?token={WEBHOOK_TOKEN}&CallSid=logsid0001&CallFrom=09901320691"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = client
        .get(format!("{base}/api/v1/incidents"))
        .bearer_auth("a-wrong-token-that-must-not-be-logged")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let stored_lines = || {
        collected
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("incident stored"))
            .count()
    };
    let logged = eventually(Duration::from_secs(10), || async { stored_lines() == 2 }).await;
    let _ = server.kill().await;
    let lines = collected.lock().unwrap().clone();
    assert!(logged, "two 'incident stored' lines: {lines:#?}");
    for line in &lines {
        // The start banner is plain text; every log line is JSON.
        if line.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if line.contains("incident stored") {
                let text = v.to_string();
                assert!(text.contains("\"incident_id\""), "{text}");
            }
        }
        for secret in [
            ADMIN_TOKEN,
            WEBHOOK_TOKEN,
            "a-wrong-token-that-must-not-be-logged",
            "9901320691",
            "9800000001",
        ] {
            assert!(!line.contains(secret), "{secret} logged: {line}");
        }
    }
}

/// `--server` without a scheme (or with another than http and https) is a usage error, exit code 2,
/// naming the flag and what to write: before, it was sent and reported as "cannot reach the server".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_url_without_a_scheme_is_a_usage_error() {
    for (args, hint) in [
        (
            vec!["ack", "an-id", "--server", "127.0.0.1:8080", "--token", "t"],
            "http://127.0.0.1:8080",
        ),
        (
            vec![
                "trigger",
                "--type",
                "Heart",
                "--message",
                "m",
                "--server",
                "localhost:8080",
                "--token",
                "t",
            ],
            "http://localhost:8080",
        ),
        (
            vec![
                "resolve",
                "an-id",
                "--server",
                "ftp://sos.example",
                "--token",
                "t",
            ],
            "http://",
        ),
        (
            vec!["drill", "--contact", "Desk", "--server", "sos.example"],
            "http://sos.example",
        ),
    ] {
        let r = run(&[], &args).await;
        assert_eq!(r.code, 2, "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("--server") && r.stderr.contains(hint),
            "{args:?}: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("cannot reach"), "{}", r.stderr);
    }
}
