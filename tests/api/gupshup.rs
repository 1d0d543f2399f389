//! GupShup's WhatsApp delivery reports at `/gupshup/dlr`, the report deadline that leaves a WhatsApp
//! message `unconfirmed`, and opt-in (`exotel-sos optin` and on stakeholder file loads).

use std::time::Duration;

use serde_json::json;

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    a_batch_with_a_report_still_waiting_for_its_record_is_asked_for_again,
    reports_arrive_as_an_array_an_object_or_a_form,
    read_is_kept_and_nothing_moves_back,
    a_failure_keeps_the_error_code_and_cause_as_given,
    unknown_ids_answer_404_alone_and_200_in_a_batch_with_a_known_one,
    a_report_before_our_record_waits_for_it,
    a_wrong_token_is_refused,
    without_a_report_whatsapp_becomes_unconfirmed_and_a_late_report_wins,
    optin_sends_once_per_number_and_records_it,
    optin_reports_a_refused_number_masked_and_exits_non_zero,
    the_server_opts_in_a_whatsapp_contact_added_by_a_reload,
    a_dry_run_server_opts_nobody_in,
);

const SID: &str = "9a9a0000000000000000000000000001";
/// Asha and the lab get WhatsApp for a Heart alert.
const ASHA: &str = "919800000001";
const LAB: &str = "919800000005";

/// A live app whose Heart alert has gone out; its two WhatsApp deliveries, Asha's first.
async fn sent_heart(
    db: Db,
    p: &Providers,
    extra: &[(&'static str, String)],
) -> (
    TestApp,
    exotel_sos::store::DeliveryRow,
    exotel_sos::store::DeliveryRow,
) {
    mount_happy(p).await;
    let mut env = p.env();
    env.extend(extra.iter().cloned());
    let app = spawn_app_with(db, &env).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.settled(SID).await;
    let wa: Vec<_> = ds.into_iter().filter(|d| d.channel == "whatsapp").collect();
    assert_eq!(wa.len(), 2);
    let sent_to = |d: &exotel_sos::store::DeliveryRow| d.phone.trim_start_matches('+').to_owned();
    let (asha, lab) = if sent_to(&wa[0]) == ASHA {
        (wa[0].clone(), wa[1].clone())
    } else {
        (wa[1].clone(), wa[0].clone())
    };
    assert_eq!(sent_to(&lab), LAB);
    for d in [&asha, &lab] {
        assert_eq!(d.status, "accepted", "{d:?}");
        assert!(d.provider_id.is_some(), "{d:?}");
    }
    (app, asha, lab)
}

fn dlr(
    d: &exotel_sos::store::DeliveryRow,
    event: &str,
    code: &str,
    cause: &str,
) -> serde_json::Value {
    json!({
        "srcAddr": "TESTSM", "channel": "WHATSAPP",
        "externalId": d.provider_id.as_deref().unwrap(),
        "eventType": event, "cause": cause, "errorCode": code,
        "destAddr": d.phone.trim_start_matches('+'), "eventTs": 1625655219000_i64,
    })
}

async fn status_of(
    app: &TestApp,
    d: &exotel_sos::store::DeliveryRow,
) -> exotel_sos::store::DeliveryRow {
    app.store.delivery(&d.id).await.unwrap().unwrap()
}

async fn reports_arrive_as_an_array_an_object_or_a_form(db: Db) {
    let p = Providers::start().await;
    let (app, asha, lab) = sent_heart(db, &p, &[]).await;
    // The array GupShup posts: SENT is progress only.
    let res = app
        .post_json("/gupshup/dlr", json!([dlr(&asha, "SENT", "025", "SENT")]))
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(status_of(&app, &asha).await.status, "accepted");
    // One object.
    let res = app
        .post_json("/gupshup/dlr", dlr(&asha, "DELIVERED", "000", "SUCCESS"))
        .await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    assert_eq!(status_of(&app, &asha).await.status, "delivered");
    // A form.
    let id = lab.provider_id.clone().unwrap();
    let res = app
        .post_form(
            "/gupshup/dlr",
            &[
                ("externalId", id.as_str()),
                ("eventType", "DELIVERED"),
                ("cause", "SUCCESS"),
                ("errorCode", "000"),
                ("destAddr", LAB),
            ],
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(status_of(&app, &lab).await.status, "delivered");
    // The audit trail keeps the report without the whole number.
    let events = app.store.events(&asha.id).await.unwrap();
    let report = events
        .iter()
        .find(|e| e.kind == "whatsapp_status" && e.detail.contains("DELIVERED"))
        .expect("the report is in the audit trail");
    assert!(!report.detail.contains(ASHA), "{}", report.detail);
    app.stop().await;
}

async fn read_is_kept_and_nothing_moves_back(db: Db) {
    let p = Providers::start().await;
    let (app, asha, lab) = sent_heart(db, &p, &[]).await;
    // DELIVERED then READ: forward.
    let both = json!([
        dlr(&asha, "DELIVERED", "000", "SUCCESS"),
        dlr(&asha, "READ", "026", "READ")
    ]);
    assert_eq!(
        app.post_json("/gupshup/dlr", both.clone()).await.status(),
        200
    );
    assert_eq!(status_of(&app, &asha).await.status, "read");
    // The same batch again: a repeat changes nothing.
    let before = status_of(&app, &asha).await;
    assert_eq!(app.post_json("/gupshup/dlr", both).await.status(), 200);
    let after = status_of(&app, &asha).await;
    assert_eq!(after.status, "read");
    assert_eq!(before.finished_at, after.finished_at);
    // READ then DELIVERED: the read stays.
    let res = app
        .post_json("/gupshup/dlr", json!([dlr(&lab, "READ", "026", "READ")]))
        .await;
    assert_eq!(res.status(), 200);
    let res = app
        .post_json(
            "/gupshup/dlr",
            json!([dlr(&lab, "DELIVERED", "000", "SUCCESS")]),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(status_of(&app, &lab).await.status, "read");
    // A failure after the read moves nothing back either.
    let res = app
        .post_json(
            "/gupshup/dlr",
            json!([dlr(&lab, "FAILED", "1002", "UNKNOWN")]),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(status_of(&app, &lab).await.status, "read");
    app.stop().await;
}

async fn a_failure_keeps_the_error_code_and_cause_as_given(db: Db) {
    let p = Providers::start().await;
    let (app, asha, _) = sent_heart(db, &p, &[]).await;
    let res = app
        .post_json(
            "/gupshup/dlr",
            json!([dlr(
                &asha,
                "FAILED",
                "1002",
                "Number does not exist on WhatsApp"
            )]),
        )
        .await;
    assert_eq!(res.status(), 200);
    let d = status_of(&app, &asha).await;
    assert_eq!(d.status, "failed");
    let error = d.last_error.unwrap_or_default();
    assert!(
        error.contains("1002") && error.contains("Number does not exist on WhatsApp"),
        "{error}"
    );
    // Repeated: the same.
    let res = app
        .post_json(
            "/gupshup/dlr",
            json!([dlr(
                &asha,
                "FAILED",
                "1002",
                "Number does not exist on WhatsApp"
            )]),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(status_of(&app, &asha).await.status, "failed");
    app.stop().await;
}

async fn unknown_ids_answer_404_alone_and_200_in_a_batch_with_a_known_one(db: Db) {
    let p = Providers::start().await;
    let (app, asha, _) = sent_heart(db, &p, &[]).await;
    let stranger = json!({"externalId": "1111111111111111111-222222222222222222",
        "eventType": "DELIVERED", "cause": "SUCCESS", "errorCode": "000", "destAddr": "919811111111"});
    let res = app
        .post_json("/gupshup/dlr", json!([stranger.clone()]))
        .await;
    assert_eq!(res.status(), 404);
    let res = app
        .post_json(
            "/gupshup/dlr",
            json!([stranger, dlr(&asha, "DELIVERED", "000", "SUCCESS")]),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(status_of(&app, &asha).await.status, "delivered");
    // Nothing that names a message at all is a bad request.
    let res = app
        .post_json("/gupshup/dlr", json!([{"eventType": "READ"}]))
        .await;
    assert_eq!(res.status(), 400);
    app.stop().await;
}

async fn a_report_before_our_record_waits_for_it(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let wa = app.delivery_of(SID, "whatsapp").await;
    sqlx::query("UPDATE deliveries SET status = 'sending' WHERE id = $1")
        .bind(&wa.id)
        .execute(app.store.pool())
        .await
        .unwrap();
    let pool = app.store.pool().clone();
    let id = wa.id.clone();
    let recorder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        sqlx::query(
            "UPDATE deliveries SET status = 'accepted', provider_id = 'wa-1-2' WHERE id = $1",
        )
        .bind(&id)
        .execute(&pool)
        .await
        .unwrap();
    });
    // GupShup echoes the `extra` we sent (our reference) in its reports.
    let res = app
        .post_json(
            "/gupshup/dlr",
            json!([{"externalId": "wa-1-2", "eventType": "DELIVERED", "cause": "SUCCESS",
                "errorCode": "000", "extra": wa.greeting_ref}]),
        )
        .await;
    recorder.await.unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    assert_eq!(status_of(&app, &wa).await.status, "delivered");
    app.stop().await;
}

/// A batch holding a report whose message is still being recorded (and stays so) is answered 503, so
/// GupShup sends it again and that report is not lost; the items that could be applied are applied, and
/// applying them again changes nothing.
async fn a_batch_with_a_report_still_waiting_for_its_record_is_asked_for_again(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let ds = app.deliveries_of(SID).await;
    let wa: Vec<_> = ds.iter().filter(|d| d.channel == "whatsapp").collect();
    assert_eq!(wa.len(), 2);
    let (done, waiting) = (wa[0], wa[1]);
    for (d, status, id) in [
        (done, "accepted", "wa-done"),
        (waiting, "sending", "wa-wait"),
    ] {
        sqlx::query("UPDATE deliveries SET status = 'sending' WHERE id = $1")
            .bind(&d.id)
            .execute(app.store.pool())
            .await
            .unwrap();
        sqlx::query("UPDATE deliveries SET status = $1, provider_id = $2 WHERE id = $3")
            .bind(status)
            .bind(if status == "accepted" { Some(id) } else { None })
            .bind(&d.id)
            .execute(app.store.pool())
            .await
            .unwrap();
    }
    let batch = json!([
        {"externalId": "wa-wait", "eventType": "DELIVERED", "cause": "SUCCESS", "errorCode": "000",
         "extra": waiting.greeting_ref},
        {"externalId": "wa-done", "eventType": "DELIVERED", "cause": "SUCCESS", "errorCode": "000"},
    ]);
    let started = std::time::Instant::now();
    let res = app.post_json("/gupshup/dlr", batch).await;
    assert_eq!(res.status(), 503, "{}", res.text().await.unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "one wait per batch"
    );
    assert_eq!(status_of(&app, done).await.status, "delivered");
    assert_eq!(status_of(&app, waiting).await.status, "sending");
    app.stop().await;
}

async fn a_wrong_token_is_refused(db: Db) {
    let app = spawn_app(db).await;
    let body = json!([{"externalId": "x", "eventType": "READ"}]);
    for url in [
        format!("{}/gupshup/dlr?token=wrong", app.base),
        format!("{}/gupshup/dlr", app.base),
    ] {
        let res = app.client.post(url).json(&body).send().await.unwrap();
        assert_eq!(res.status(), 401);
    }
    app.stop().await;
}

async fn without_a_report_whatsapp_becomes_unconfirmed_and_a_late_report_wins(db: Db) {
    let p = Providers::start().await;
    let (app, asha, lab) =
        sent_heart(db, &p, &[("SOS_DISPATCH__REPORT_WAIT_SECS", "0.3".into())]).await;
    let unconfirmed = app
        .deliveries_until(SID, Duration::from_secs(10), |ds| {
            ds.iter()
                .filter(|d| d.channel == "whatsapp")
                .all(|d| d.status == "unconfirmed")
        })
        .await;
    assert!(unconfirmed, "{:?}", app.deliveries_of(SID).await);
    let res = app
        .post_json(
            "/gupshup/dlr",
            json!([dlr(&asha, "DELIVERED", "000", "SUCCESS")]),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(status_of(&app, &asha).await.status, "delivered");
    let res = app
        .post_json("/gupshup/dlr", json!([dlr(&lab, "READ", "026", "READ")]))
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(status_of(&app, &lab).await.status, "read");
    // The sweep leaves settled rows alone.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(status_of(&app, &asha).await.status, "delivered");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------------
// Opt-in

const BIN: &str = env!("CARGO_BIN_EXE_exotel-sos");

/// Runs `exotel-sos optin` against `db` with the stand-ins' credentials; (exit code, stdout).
async fn optin(p: &Providers, db: &TestDb, stakeholders: &std::path::Path) -> (i32, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOS_") || k == "RUST_LOG") {
        cmd.env_remove(k);
    }
    cmd.envs(p.env())
        .env("SOS_DATABASE__URL", &db.url)
        .env("SOS_STAKEHOLDERS__FILE", stakeholders)
        .arg("optin");
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("optin finishes")
        .expect("optin runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

async fn recorded(db: &TestDb) -> Vec<String> {
    let store = exotel_sos::store::Store::connect(&db.url, 1).await.unwrap();
    let phones: Vec<String> =
        sqlx::query_scalar("SELECT phone FROM whatsapp_optins ORDER BY phone")
            .fetch_all(store.pool())
            .await
            .unwrap();
    store.close().await;
    phones
}

async fn optin_sends_once_per_number_and_records_it(db: Db) {
    let p = Providers::start().await;
    let db = TestDb::new(db).await;
    let file = db.dir().join("stakeholders.toml");
    std::fs::write(&file, STAKEHOLDERS).unwrap();
    let (code, out) = optin(&p, &db, &file).await;
    assert_eq!(code, 0, "{out}");
    let mut sent = p.opt_ins().await;
    sent.sort();
    assert_eq!(sent, [ASHA, "919800000002", LAB], "{out}");
    assert_eq!(
        recorded(&db).await,
        ["+919800000001", "+919800000002", "+919800000005"]
    );
    assert!(!out.contains("9800000001"), "numbers are masked: {out}");
    // Again: nothing sent.
    let (code, out) = optin(&p, &db, &file).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(p.opt_ins().await.len(), 3, "{out}");
    assert!(out.contains("already opted in"), "{out}");
}

async fn optin_reports_a_refused_number_masked_and_exits_non_zero(db: Db) {
    let p = Providers::start().await;
    p.refuse_opt_in.lock().unwrap().push(LAB.to_owned());
    let db = TestDb::new(db).await;
    let file = db.dir().join("stakeholders.toml");
    std::fs::write(&file, STAKEHOLDERS).unwrap();
    let (code, out) = optin(&p, &db, &file).await;
    assert_eq!(code, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("Central lab"))
        .unwrap_or_default();
    assert!(line.contains("FAILED") && line.contains("105"), "{out}");
    assert!(!out.contains("9800000005"), "numbers are masked: {out}");
    assert_eq!(recorded(&db).await, ["+919800000001", "+919800000002"]);
    // Once GupShup takes it, only the lab is sent again.
    p.refuse_opt_in.lock().unwrap().clear();
    let (code, out) = optin(&p, &db, &file).await;
    assert_eq!(code, 0, "{out}");
    let sent = p.opt_ins().await;
    assert_eq!(sent.iter().filter(|n| *n == LAB).count(), 2, "{sent:?}");
    assert_eq!(sent.len(), 4, "{sent:?}");
}

async fn the_server_opts_in_a_whatsapp_contact_added_by_a_reload(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let app = spawn_app_with(db, &p.env()).await;
    let opted = |n: usize| {
        let p = &p;
        async move {
            eventually(Duration::from_secs(10), || async move {
                p.opt_ins().await.len() >= n
            })
            .await
        }
    };
    assert!(opted(3).await, "{:?}", p.opt_ins().await);
    // The new contact goes before the tables, as TOML needs.
    let added = STAKEHOLDERS.replacen(
        "[routes]",
        "[[contact]]\nname = \"Night nurse\"\nphone = \"+919800000088\"\n\
         channels = [\"whatsapp\"]\nteams = [\"lab\"]\n\n[routes]",
        1,
    );
    std::fs::write(&app.stakeholders, added).unwrap();
    assert!(opted(4).await, "{:?}", p.opt_ins().await);
    let sent = p.opt_ins().await;
    assert_eq!(sent.iter().filter(|n| *n == "919800000088").count(), 1);
    assert_eq!(sent.iter().filter(|n| *n == ASHA).count(), 1, "{sent:?}");
    // Recorded once GupShup's answer is read.
    let store = app.store.clone();
    let recorded = eventually(Duration::from_secs(10), || {
        let store = store.clone();
        async move { store.opted_in("+919800000088").await.unwrap_or(false) }
    })
    .await;
    assert!(recorded);
    app.stop().await;
}

async fn a_dry_run_server_opts_nobody_in(db: Db) {
    let app = spawn_app(db).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM whatsapp_optins")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
    app.stop().await;
}
