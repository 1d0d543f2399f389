//! The operator API: triggers, dedup, validation, auth, views, resolve, auto-resolve, OpenAPI.

use std::time::Duration;

use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::*;
use crate::op::*;

both_engines!(
    api_trigger_stores_incident_and_answers_201,
    dedup_key_returns_the_open_incident_until_resolved,
    concurrent_identical_triggers_make_one_incident,
    invalid_input_is_422_naming_the_field,
    missing_or_wrong_token_is_401,
    resolve_cancels_only_what_has_not_gone_out,
    list_is_newest_first_filtered_and_paginated,
    detail_shows_history_with_numbers_masked,
    old_incidents_are_auto_resolved,
);

async fn api_trigger_stores_incident_and_answers_201(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let (status, body) = post_incident(
        &app,
        &json!({
            "emergency_type": "heart",
            "message": "Patient collapsed in ward 3",
            "audio_url": "https://example.com/a.mp3",
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The dispatcher is woken at once (a stored permit: nobody waits in this test).
    tokio::time::timeout(Duration::from_secs(1), app.state.wake.notified())
        .await
        .expect("the dispatcher was woken");
    let id = id_of(&body);
    assert_eq!(body["source"], "api");
    assert_eq!(body["emergency_type"], "Heart", "spelled as the route");
    assert_eq!(body["route"], "heart");
    assert_eq!(body["status"], "open");
    assert_eq!(body["message"], "Patient collapsed in ward 3");
    assert_eq!(body["recording_url"], "https://example.com/a.mp3");
    let deliveries = body["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), HEART_DELIVERIES);
    assert!(deliveries.iter().all(|d| d["status"] == "queued"));
    assert!(deliveries
        .iter()
        .all(|d| d["phone"].as_str().unwrap().contains("******")));
    let text = body.to_string();
    assert!(!text.contains("greeting_ref"), "{text}");
    assert!(!text.contains("9800000001"), "full numbers never leave");

    let stored = app.store.incident(&id).await.unwrap().expect("stored");
    assert_eq!(stored.source, "api");
    assert_eq!(
        stored.recording_url.as_deref(),
        Some("https://example.com/a.mp3")
    );
    // An unknown type still alerts, through the default route.
    let (status, body) = post_incident(
        &app,
        &json!({"emergency_type": "Flood", "message": "Basement flooding"}),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(body["route"], "default");
    assert_eq!(body["emergency_type"], "Flood");
    assert_eq!(
        body["deliveries"].as_array().unwrap().len(),
        DEFAULT_DELIVERIES
    );
    app.stop().await;
}

async fn dedup_key_returns_the_open_incident_until_resolved(db: Db) {
    let app = spawn_app(db).await;
    let body = json!({"emergency_type": "Brain", "message": "m", "dedup_key": "sensor-7"});
    let (s1, first) = post_incident(&app, &body).await;
    assert_eq!(s1, 201);
    let (s2, second) = post_incident(&app, &body).await;
    assert_eq!(s2, 200, "a repeat returns the open incident");
    assert_eq!(id_of(&first), id_of(&second));
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);
    assert_eq!(
        app.store.deliveries(&id_of(&first)).await.unwrap().len(),
        BRAIN_DELIVERIES,
        "no new deliveries"
    );
    // Once resolved, the key is free again.
    let (s, _) = post_raw(
        &app,
        &format!("/api/v1/incidents/{}/resolve", id_of(&first)),
        String::new(),
    )
    .await;
    assert_eq!(s, 200);
    let (s3, third) = post_incident(&app, &body).await;
    assert_eq!(s3, 201);
    assert_ne!(id_of(&third), id_of(&first));
    app.stop().await;
}

async fn concurrent_identical_triggers_make_one_incident(db: Db) {
    let app = spawn_app(db).await;
    let body = json!({"emergency_type": "Heart", "message": "crash", "dedup_key": "iot-crash-42"});
    let calls = (0..20).map(|_| post_incident(&app, &body));
    let results = futures_util::future::join_all(calls).await;
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let repeats = results.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!((created, repeats), (1, 19), "{results:?}");
    let ids: std::collections::HashSet<String> = results.iter().map(|(_, b)| id_of(b)).collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(app.store.count_incidents().await.unwrap(), 1);
    let id = ids.into_iter().next().unwrap();
    assert_eq!(
        app.store.deliveries(&id).await.unwrap().len(),
        HEART_DELIVERIES
    );
    app.stop().await;
}

async fn invalid_input_is_422_naming_the_field(db: Db) {
    let app = spawn_app(db).await;
    let long_message = "x".repeat(1001);
    let long_type = "T".repeat(65);
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "body"),
        ("[1, 2]".into(), "body"),
        ("".into(), "body"),
        (json!({"message": "m"}).to_string(), "emergency_type"),
        (json!({"emergency_type": "Heart"}).to_string(), "message"),
        (
            json!({"emergency_type": 5, "message": "m"}).to_string(),
            "emergency_type",
        ),
        (
            json!({"emergency_type": "Heart", "message": ["m"]}).to_string(),
            "message",
        ),
        (
            json!({"emergency_type": "Heart", "message": "m", "severity": 1}).to_string(),
            "severity",
        ),
        (
            json!({"emergency_type": "Heart", "message": "m", "audio_url": "ftp://x/a.mp3"})
                .to_string(),
            "audio_url",
        ),
        (
            json!({"emergency_type": "Heart", "message": "m", "audio_url": "javascript:alert(1)"})
                .to_string(),
            "audio_url",
        ),
        (
            json!({"emergency_type": "Heart", "message": "m", "audio_url": 3}).to_string(),
            "audio_url",
        ),
        (
            json!({"emergency_type": "Heart", "message": ""}).to_string(),
            "message",
        ),
        (
            json!({"emergency_type": "Heart", "message": "   "}).to_string(),
            "message",
        ),
        (
            json!({"emergency_type": "Heart", "message": long_message}).to_string(),
            "message",
        ),
        (
            json!({"emergency_type": long_type, "message": "m"}).to_string(),
            "emergency_type",
        ),
        (
            json!({"emergency_type": "", "message": "m"}).to_string(),
            "emergency_type",
        ),
        (
            json!({"emergency_type": "Heart", "message": "m", "dedup_key": 7}).to_string(),
            "dedup_key",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = post_raw(&app, "/api/v1/incidents", body.clone()).await;
        assert_eq!(status, 422, "{body} -> {answer}");
        assert_eq!(answer["field"], field, "{body} -> {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(
        app.store.count_incidents().await.unwrap(),
        0,
        "nothing stored"
    );
    // The limit counts characters, not bytes: 1000 Devanagari letters are fine.
    let (status, _) = post_incident(&app, &heart(&"ह".repeat(1000))).await;
    assert_eq!(status, 201);
    app.stop().await;
}

async fn missing_or_wrong_token_is_401(db: Db) {
    let app = spawn_app(db).await;
    let url = format!("{}/api/v1/incidents", app.base);
    let body = heart("m").to_string();
    let attempts = [
        None,
        Some("Bearer wrong-token".to_owned()),
        Some(format!("Basic {ADMIN_TOKEN}")),
        Some(format!("Bearer {WEBHOOK_TOKEN}")),
        Some("Bearer ".to_owned()),
    ];
    for auth in attempts {
        let mut req = app.client.post(&url).body(body.clone());
        if let Some(a) = &auth {
            req = req.header("authorization", a);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "{auth:?}");
        let json: Value = res.json().await.unwrap();
        assert!(json["error"].is_string());
    }
    for path in [
        "/api/v1/incidents",
        "/api/v1/incidents/x",
        "/api/v1/alertmanager",
    ] {
        let res = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert!(
            [401, 405].contains(&res.status().as_u16()),
            "{path}: {}",
            res.status()
        );
    }
    let res = app
        .client
        .post(format!("{}/api/v1/incidents/x/resolve", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(app.store.count_incidents().await.unwrap(), 0);
    app.stop().await;
}

async fn resolve_cancels_only_what_has_not_gone_out(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let (_, body) = post_incident(&app, &heart("resolve me")).await;
    let id = id_of(&body);
    let deliveries = app.store.deliveries(&id).await.unwrap();
    // What the dispatcher would have done meanwhile: one call in flight, one SMS delivered.
    let in_flight = &deliveries[0].id;
    let done = &deliveries[1].id;
    for (delivery, status) in [(in_flight, "sending"), (done, "delivered")] {
        sqlx::query("UPDATE deliveries SET status = $1 WHERE id = $2")
            .bind(status)
            .bind(delivery)
            .execute(app.store.pool())
            .await
            .unwrap();
    }
    let (status, outcome) = post_raw(
        &app,
        &format!("/api/v1/incidents/{id}/resolve"),
        String::new(),
    )
    .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["already_resolved"], false);
    assert_eq!(outcome["cancelled"], HEART_DELIVERIES - 2);
    assert_eq!(outcome["incident"]["status"], "resolved");
    assert!(outcome["incident"]["resolved_at"].is_string());

    let stored = app.store.incident(&id).await.unwrap().unwrap();
    assert_eq!(stored.status, "resolved");
    assert!(stored.resolved_at.is_some());
    for d in app.store.deliveries(&id).await.unwrap() {
        let events = app.store.events(&d.id).await.unwrap();
        if &d.id == in_flight {
            assert_eq!(d.status, "sending", "in flight is left alone");
            assert!(events.is_empty());
        } else if &d.id == done {
            assert_eq!(d.status, "delivered");
        } else {
            assert_eq!(d.status, "cancelled");
            assert!(d.finished_at.is_some());
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].kind, "cancelled");
        }
    }
    // The detail view shows the cancellation in each history.
    let cancelled_views = outcome["incident"]["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["status"] == "cancelled" && d["events"][0]["kind"] == "cancelled")
        .count();
    assert_eq!(cancelled_views, HEART_DELIVERIES - 2);

    // Again: nothing changes.
    let (status, again) = post_raw(
        &app,
        &format!("/api/v1/incidents/{id}/resolve"),
        String::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(again["already_resolved"], true);
    assert_eq!(again["cancelled"], 0);
    let (status, _) = post_raw(&app, "/api/v1/incidents/nope/resolve", String::new()).await;
    assert_eq!(status, 404);
    app.stop().await;
}

async fn list_is_newest_first_filtered_and_paginated(db: Db) {
    let app = spawn_app(db).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let kind = if i % 2 == 0 { "Heart" } else { "Brain" };
        let (s, body) = post_incident(
            &app,
            &json!({"emergency_type": kind, "message": format!("n{i}")}),
        )
        .await;
        assert_eq!(s, 201);
        ids.push(id_of(&body));
        // Distinct received times make "newest first" exact.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    let page_ids = |v: &Value| -> Vec<String> {
        v["incidents"]
            .as_array()
            .unwrap()
            .iter()
            .map(id_of)
            .collect()
    };

    let (s, all) = get(&app, "/api/v1/incidents").await;
    assert_eq!(s, 200);
    assert_eq!(page_ids(&all), newest_first);
    assert!(
        all["incidents"][0]["deliveries"].is_null(),
        "list is a summary"
    );

    // Keyset pages.
    let mut seen = Vec::new();
    let mut path = "/api/v1/incidents?limit=2".to_owned();
    loop {
        let (s, page) = get(&app, &path).await;
        assert_eq!(s, 200, "{page}");
        seen.extend(page_ids(&page));
        match page["next_before"].as_str() {
            Some(next) => path = format!("/api/v1/incidents?limit=2&before={next}"),
            None => break,
        }
        assert!(seen.len() <= 6, "pagination must end");
    }
    assert_eq!(seen, newest_first);

    // Numbered pages.
    let (_, p2) = get(&app, "/api/v1/incidents?limit=2&page=2").await;
    assert_eq!(page_ids(&p2), newest_first[2..4].to_vec());

    // Filters.
    let (_, hearts) = get(&app, "/api/v1/incidents?emergency_type=heart").await;
    assert_eq!(
        page_ids(&hearts),
        vec![ids[4].clone(), ids[2].clone(), ids[0].clone()]
    );
    post_raw(
        &app,
        &format!("/api/v1/incidents/{}/resolve", ids[1]),
        String::new(),
    )
    .await;
    let (_, resolved) = get(&app, "/api/v1/incidents?status=resolved").await;
    assert_eq!(page_ids(&resolved), vec![ids[1].clone()]);
    let (_, open_brain) = get(&app, "/api/v1/incidents?status=open&emergency_type=Brain").await;
    assert_eq!(page_ids(&open_brain), vec![ids[3].clone()]);

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("limit=201", "limit"),
        ("page=0", "page"),
        ("status=closed", "status"),
        ("before=unknown-id", "before"),
        ("sort=asc", "sort"),
    ] {
        let (s, body) = get(&app, &format!("/api/v1/incidents?{query}")).await;
        assert_eq!(s, 422, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
    }
    let (s, body) = get(&app, &format!("/api/v1/incidents?page=2&before={}", ids[0])).await;
    assert_eq!(s, 422, "{body}");
    app.stop().await;
}

async fn detail_shows_history_with_numbers_masked(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let res = app
        .passthru("CallSid=detailsid0001&CallFrom=09901320691&EmergencyType=Brain")
        .await;
    assert_eq!(res.status(), 200);
    let incident = app
        .store
        .incident_by_call_sid("detailsid0001")
        .await
        .unwrap()
        .unwrap();
    let deliveries = app.store.deliveries(&incident.id).await.unwrap();
    let asha_call = deliveries
        .iter()
        .find(|d| d.phone == "+919800000001" && d.channel == "call")
        .unwrap();
    // What the dispatcher records: attempts, a provider id, an error quoting the number. The database
    // allows only the lifecycle's moves, so the row goes through `sending` as a claim would.
    sqlx::query("UPDATE deliveries SET status = 'sending' WHERE id = $1")
        .bind(&asha_call.id)
        .execute(app.store.pool())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE deliveries SET status = 'failed', attempts = 2, provider_id = 'prov-1', \
         last_error = 'Exotel: +919800000001 is DND (919800000001)' WHERE id = $1",
    )
    .bind(&asha_call.id)
    .execute(app.store.pool())
    .await
    .unwrap();
    app.store
        .record_event(
            &asha_call.id,
            "sent",
            Some("prov-1"),
            "call to 09800000001 accepted",
        )
        .await
        .unwrap();
    app.store
        .record_event(&asha_call.id, "failed", Some("prov-1"), "busy")
        .await
        .unwrap();

    let text = detail_text(&app, &incident.id).await;
    for secret in [
        "9800000001",
        "9901320691",
        "greeting_ref",
        &asha_call.greeting_ref,
    ] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["id"], incident.id.as_str());
    assert_eq!(body["source"], "exotel");
    assert_eq!(body["emergency_type"], "Brain");
    assert_eq!(body["caller"], "+91******0691");
    assert_eq!(body["call_sid"], "detailsid0001");
    assert!(body["received_at"].as_str().unwrap().ends_with('Z'));
    let views = body["deliveries"].as_array().unwrap();
    assert_eq!(views.len(), BRAIN_DELIVERIES);
    let view = views
        .iter()
        .find(|d| d["id"] == asha_call.id.as_str())
        .unwrap();
    assert_eq!(view["contact_name"], "Dr. Asha Rao");
    assert_eq!(view["phone"], "+91******0001");
    assert_eq!(view["channel"], "call");
    assert_eq!(view["status"], "failed");
    assert_eq!(view["attempts"], 2);
    assert_eq!(view["provider_id"], "prov-1");
    assert!(view["last_error"]
        .as_str()
        .unwrap()
        .contains("+91******0001"));
    let kinds: Vec<&str> = view["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["sent", "failed"]);

    let (s, _) = get(&app, "/api/v1/incidents/no-such-id").await;
    assert_eq!(s, 404);
    app.stop().await;
}

async fn old_incidents_are_auto_resolved(db: Db) {
    let app = spawn_app_with(
        db,
        &[
            without_dispatcher(),
            ("SOS_INCIDENTS__AUTO_RESOLVE_AFTER", "1s".into()),
            ("SOS_HOUSEKEEPING__AUTO_RESOLVE_EVERY_MS", "100".into()),
        ],
    )
    .await;
    let (_, body) = post_incident(&app, &heart("left open")).await;
    let id = id_of(&body);
    let closed = eventually(Duration::from_secs(5), || async {
        app.store
            .incident(&id)
            .await
            .unwrap()
            .is_some_and(|i| i.status == "resolved")
    })
    .await;
    assert!(closed, "auto-resolved after about a second");
    assert!(statuses(&app, &id).await.iter().all(|s| s == "cancelled"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_valid_and_covers_every_route() {
    let app = spawn_app(Db::Sqlite).await;
    let res = app
        .client
        .get(format!("{}/api/v1/openapi.json", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let doc = oas3::from_json(&text).expect("a valid OpenAPI 3.1 document");
    doc.validate_version().expect("a supported OpenAPI version");
    assert!(doc
        .components
        .as_ref()
        .is_some_and(|c| c.security_schemes.contains_key("bearer")));
    // Every route the router serves under /api/v1, with its methods.
    let expected = [
        ("/api/v1/incidents", "post"),
        ("/api/v1/incidents", "get"),
        ("/api/v1/incidents/{id}", "get"),
        ("/api/v1/incidents/{id}/resolve", "post"),
        ("/api/v1/incidents/{id}/ack", "post"),
        ("/api/v1/alertmanager", "post"),
        ("/api/v1/alarms", "get"),
        ("/api/v1/openapi.json", "get"),
    ];
    let mut documented = Vec::new();
    for (path, item) in doc.paths.as_ref().expect("paths") {
        for (method, op) in item.methods() {
            // Every reference resolves: parameters, request body, and each response's schemas.
            op.parameters(&doc).expect("parameters resolve");
            if let Some(body) = op.request_body(&doc).expect("request body resolves") {
                for media in body.content.values() {
                    media.schema(&doc).expect("request schema resolves");
                }
            }
            let responses = op.responses(&doc);
            assert!(!responses.is_empty(), "{method} {path} has responses");
            for response in responses.values() {
                for media in response.content.values() {
                    media.schema(&doc).expect("response schema resolves");
                }
            }
            documented.push((path.clone(), method.as_str().to_lowercase()));
        }
    }
    documented.sort();
    let mut wanted: Vec<(String, String)> = expected
        .iter()
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect();
    wanted.sort();
    assert_eq!(documented, wanted);
    // And each documented operation is really routed (401 or 200, never 404/405).
    for (path, method) in &documented {
        let url = format!("{}{}", app.base, path.replace("{id}", "x"));
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let status = app
            .client
            .request(method.clone(), &url)
            .send()
            .await
            .unwrap()
            .status();
        assert!(
            status == 200 || status == 401,
            "{method} {path} answered {status}"
        );
    }
    app.stop().await;
}
