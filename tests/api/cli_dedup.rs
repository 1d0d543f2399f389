//! `exotel-sos trigger` retries safely: every run carries a dedup key (generated unless given), so a
//! retry after a lost answer finds the stored incident instead of alerting everyone again.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_exotel-sos");

async fn run(args: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOS_") || k == "RUST_LOG") {
        cmd.env_remove(k);
    }
    cmd.stdin(Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.args(args).output())
        .await
        .expect("the command finishes")
        .expect("the command runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A proxy to `upstream` that delivers the first request but loses its answer (the connection is cut
/// once the server has answered), and passes everything after that through.
async fn lossy_proxy(upstream: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            let Ok(mut server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            if first {
                first = false;
                tokio::spawn(async move {
                    {
                        let (mut from_server, mut to_server) = server.split();
                        let (mut from_client, _) = client.split();
                        let forward = tokio::io::copy(&mut from_client, &mut to_server);
                        let mut answer = [0u8; 1];
                        // The server has answered once a byte comes back; the answer is dropped and
                        // the client sees its connection close.
                        tokio::select! {
                            _ = forward => {}
                            _ = from_server.read(&mut answer) => {}
                        }
                    }
                    let _ = client.shutdown().await;
                });
            } else {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_retry_after_a_lost_answer_alerts_once() {
    let app = spawn_app_with(Db::Sqlite, &[without_dispatcher()]).await;
    let proxy = lossy_proxy(app.base.trim_start_matches("http://").to_owned()).await;
    let (code, out, err) = run(&[
        "trigger",
        "--type",
        "Heart",
        "--message",
        "db1 is down",
        "--token",
        ADMIN_TOKEN,
        "--server",
        &proxy,
    ])
    .await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(
        app.store.count_incidents().await.unwrap(),
        1,
        "the retry found the stored incident: {out} {err}"
    );
    let (_, list) = crate::op::get(&app, "/api/v1/incidents").await;
    let key = list["incidents"][0]["dedup_key"]
        .as_str()
        .expect("a generated dedup key");
    assert!(uuid::Uuid::parse_str(key).is_ok(), "{key}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_dedup_key_flag_overrides_the_generated_one() {
    let app = spawn_app_with(Db::Sqlite, &[without_dispatcher()]).await;
    for _ in 0..2 {
        let (code, out, err) = run(&[
            "trigger",
            "--type",
            "Heart",
            "--message",
            "m",
            "--dedup-key",
            "ops-key-1",
            "--token",
            ADMIN_TOKEN,
            "--server",
            &app.base,
        ])
        .await;
        assert_eq!(code, 0, "{out} {err}");
    }
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);
    let (_, list) = crate::op::get(&app, "/api/v1/incidents").await;
    assert_eq!(list["incidents"][0]["dedup_key"], "ops-key-1");
    // Two runs without a key are two incidents: each run is its own trigger.
    for _ in 0..2 {
        let (code, ..) = run(&[
            "trigger",
            "--type",
            "Brain",
            "--message",
            "m",
            "--token",
            ADMIN_TOKEN,
            "--server",
            &app.base,
        ])
        .await;
        assert_eq!(code, 0);
    }
    assert_eq!(app.store.count_incidents().await.unwrap(), 3);
    app.stop().await;
}
