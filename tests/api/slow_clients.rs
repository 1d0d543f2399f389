//! Slow and idle clients cannot starve the Passthru: a header-read time limit, a connection limit, and
//! capacity kept back for `/exotel/*`.

use std::time::Duration;

use crate::helpers::*;
use crate::raw;

const SID: &str = "e12eb6e6fcd920019d7174b60099187v";

/// Long enough for a loaded machine, short enough for a test: nothing here asserts a duration.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stuck_in_its_headers_is_cut_off_while_passthrus_keep_working() {
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            without_dispatcher(),
            ("SOS_SERVER__HEADER_READ_TIMEOUT_SECS", "1".into()),
        ],
    )
    .await;
    let mut stuck = raw::connect(&app).await;
    raw::send(
        &mut stuck,
        format!(
            "GET /exotel/passthru?token={WEBHOOK_TOKEN}&CallSid=x HTTP/1.1\r\nHost: x\r\nX-Slow:"
        )
        .as_bytes(),
    )
    .await;
    // An idle connection that never says anything is cut off the same way.
    let mut idle = raw::connect(&app).await;
    for i in 0..3 {
        let sid = format!("{SID}{i}");
        let res = app
            .passthru(&format!("CallSid={sid}&EmergencyType=Heart"))
            .await;
        assert_eq!(res.status(), 200);
        assert!(app
            .store
            .incident_by_call_sid(&sid)
            .await
            .unwrap()
            .is_some());
    }
    assert!(
        raw::read_to_close(&mut stuck, PATIENCE).await.is_some(),
        "the half-sent header was cut off"
    );
    assert!(
        raw::read_to_close(&mut idle, PATIENCE).await.is_some(),
        "the idle connection was cut off"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_limit_do_not_stop_a_passthru() {
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            without_dispatcher(),
            ("SOS_SERVER__HEADER_READ_TIMEOUT_SECS", "1".into()),
            ("SOS_SERVER__MAX_CONNECTIONS", "4".into()),
            ("SOS_SERVER__RESERVED_FOR_EXOTEL", "2".into()),
        ],
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(raw::connect(&app).await);
    }
    let res = app
        .passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert_eq!(res.status(), 200);
    assert!(app.store.incident_by_call_sid(SID).await.unwrap().is_some());
    drop(idle);
    app.stop().await;
}

/// Requests on other routes that never finish (a trickled body here; a console stream or a recording
/// download later) hold at most `max_connections - reserved_for_exotel` slots; the rest are refused
/// at once with 503, and a Passthru still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthru_is_served_while_the_other_routes_are_saturated() {
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            without_dispatcher(),
            ("SOS_SERVER__REQUEST_TIMEOUT_SECS", "120".into()),
            ("SOS_SERVER__MAX_CONNECTIONS", "8".into()),
            ("SOS_SERVER__RESERVED_FOR_EXOTEL", "4".into()),
        ],
    )
    .await;
    let body = r#"{"emergency_type": "Heart", "message": "slow upload"}"#;
    let mut holders = Vec::new();
    for _ in 0..8 {
        let mut s = raw::connect(&app).await;
        raw::send(
            &mut s,
            format!(
                "POST /api/v1/incidents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
                body.len(),
                &body[..5]
            )
            .as_bytes(),
        )
        .await;
        holders.push(s);
    }
    // Four hold the other routes' budget; the other four are refused.
    let metrics = app.state.metrics.clone();
    let refused = eventually(PATIENCE, || {
        let text = metrics.encode_classic().unwrap_or_default();
        async move {
            text.lines().any(|l| {
                l.starts_with("sos_webhook_requests_total")
                    && l.contains("status=\"503\"")
                    && l.ends_with(" 4")
            })
        }
    })
    .await;
    assert!(refused, "{}", app.state.metrics.encode_classic().unwrap());

    let res = app
        .passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert_eq!(res.status(), 200);
    assert!(app.store.incident_by_call_sid(SID).await.unwrap().is_some());
    assert_eq!(
        app.store.count_incidents().await.unwrap(),
        1,
        "the held uploads are still waiting"
    );
    // Liveness is never refused for capacity: a busy server is not a dead one.
    let res = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // The held ones finish normally once their bodies arrive.
    let mut created = 0;
    for mut s in holders {
        use tokio::io::AsyncWriteExt;
        let _ = s.write_all(&body.as_bytes()[5..]).await;
        if let Some((201, _)) = raw::read_response(&mut s, PATIENCE).await {
            created += 1;
        }
    }
    assert_eq!(created, 4);
    app.stop().await;
}

/// A flood of unauthenticated readiness probes whose database reads hang (a lock here; a slow disk or
/// a stuck query in life) holds at most `server.public_db_concurrency` connections: the Passthru still
/// finds one and stores the emergency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_reads_cannot_take_the_passthrus_database_connections() {
    let app = spawn_app_with(
        Db::Postgres,
        &[
            without_dispatcher(),
            ("SOS_DATABASE__MAX_CONNECTIONS", "3".into()),
            ("SOS_SERVER__PUBLIC_DB_CONCURRENCY", "2".into()),
        ],
    )
    .await;
    // /readyz reads the migrations table, which the Passthru never touches.
    let url = app.db.url.clone();
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn(async move {
        let store = exotel_sos::store::Store::connect(&url, 1).await.unwrap();
        let mut tx = store.pool().begin().await.unwrap();
        sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .unwrap();
        let _ = locked_tx.send(());
        let _ = release_rx.await;
        let _ = tx.rollback().await;
        store.close().await;
    });
    locked_rx.await.unwrap();
    let mut probes = tokio::task::JoinSet::new();
    for _ in 0..3 {
        for _ in 0..10 {
            let client = app.client.clone();
            let url = format!("{}/readyz", app.base);
            probes.spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) });
        }
        // Waves of probes, each outliving the readiness budget of the one before.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let res = app
        .passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert_eq!(res.status(), 200);
    let _ = release_tx.send(());
    holder.await.unwrap();
    while let Some(probe) = probes.join_next().await {
        let status = probe.unwrap().unwrap();
        assert!(status == 200 || status == 503, "{status}");
    }
    assert!(app.store.incident_by_call_sid(SID).await.unwrap().is_some());
    app.stop().await;
}

/// A client holding more keep-alive connections than `server.max_connections` and asking `/healthz` on
/// each every second (no token needed, each request over at once) cannot keep a Passthru out: near the
/// limit, idle connections of the client holding the most are closed, oldest first, so a new one is
/// accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_held_near_the_limit_do_not_keep_a_passthru_out() {
    const LIMIT: usize = 16;
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            without_dispatcher(),
            ("SOS_SERVER__HEADER_READ_TIMEOUT_SECS", "10".into()),
            ("SOS_SERVER__MAX_CONNECTIONS", LIMIT.to_string()),
            ("SOS_SERVER__RESERVED_FOR_EXOTEL", "4".into()),
        ],
    )
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut holders = tokio::task::JoinSet::new();
    for _ in 0..LIMIT + 4 {
        let (addr, stop, answered) = (addr.clone(), stop.clone(), answered.clone());
        holders.spawn(async move {
            // Reconnects when closed, as a scanner or a misbehaving monitor would.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut conn) = tokio::net::TcpStream::connect(&addr).await else {
                    continue;
                };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    use tokio::io::AsyncWriteExt;
                    if conn
                        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await
                        .is_err()
                    {
                        break;
                    }
                    match raw::read_response(&mut conn, Duration::from_secs(30)).await {
                        Some(_) => answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                        None => break,
                    };
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
    }
    // Every slot is taken by the holders before the Passthru comes.
    let full = eventually(PATIENCE, || async {
        answered.load(std::sync::atomic::Ordering::Relaxed) >= 2 * LIMIT
    })
    .await;
    assert!(full, "the holders never got their connections");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    for i in 0..3 {
        let sid = format!("{SID}k{i}");
        let asked = std::time::Instant::now();
        let res = client
            .get(format!(
                "{}/exotel/passthru?token={WEBHOOK_TOKEN}&CallSid={sid}&EmergencyType=Heart",
                app.base
            ))
            .send()
            .await
            .expect("the Passthru is answered while the connections are held");
        assert_eq!(res.status(), 200);
        eprintln!(
            "Passthru {i} answered in {:.0} ms with {} keep-alive connections held",
            asked.elapsed().as_secs_f64() * 1000.0,
            LIMIT + 4
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    holders.abort_all();
    app.stop().await;
}
