//! Group commit of incidents: incidents stored at the same time share a transaction, yet each is
//! answered for itself. Repeats of a CallSid or dedup key inside one batch store one incident, and one
//! incident the database refuses fails alone.

use exotel_sos::domain::{Channel, Source};
use exotel_sos::store::{NewDelivery, NewIncident, Store};

use crate::both_engines;
use crate::helpers::*;

fn incident(call_sid: Option<&str>, dedup_key: Option<&str>, emergency_type: &str) -> NewIncident {
    NewIncident {
        source: if call_sid.is_some() {
            Source::Exotel
        } else {
            Source::Api
        },
        call_sid: call_sid.map(str::to_owned),
        dedup_key: dedup_key.map(str::to_owned),
        emergency_type: emergency_type.to_owned(),
        route: "default".to_owned(),
        caller: None,
        recording_url: None,
        message: None,
        raw_params: "[]".to_owned(),
        occurred_at: None,
        recording_fetch: None,
        escalation: None,
        unreached_after_ms: None,
    }
}

fn deliveries(n: usize) -> Vec<NewDelivery> {
    (0..n)
        .map(|i| NewDelivery {
            contact_name: format!("Contact {i}"),
            phone: format!("+9198000{i:05}"),
            channel: Channel::ALL[i % 3],
            provider: match Channel::ALL[i % 3] {
                Channel::Whatsapp => "gupshup:whatsapp".to_owned(),
                c => format!("exotel:{c}"),
            },
            tier: 0,
            run: 0,
            delay_ms: 0,
        })
        .collect()
}

async fn store(db: &TestDb) -> Store {
    let store = Store::connect(&db.url, 5).await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn count(store: &Store, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// Sixty incidents at once, among them twenty repeats of one CallSid and twenty of one dedup key:
/// one incident each for the repeats, every unique one stored with all its deliveries (one multi-row
/// insert each), and every caller told the id its rows are under.
async fn repeats_in_one_batch_store_one_incident(db: Db) {
    let db = TestDb::new(db).await;
    let store = store(&db).await;
    let mut calls = Vec::new();
    for i in 0..60 {
        let (sid, key) = match i % 3 {
            0 => (Some("same-call".to_owned()), None),
            1 => (None, Some("same-key".to_owned())),
            _ => (Some(format!("unique-{i}")), None),
        };
        let store = store.clone();
        calls.push(tokio::spawn(async move {
            let r = store
                .create_incident(
                    &incident(sid.as_deref(), key.as_deref(), "Heart"),
                    &deliveries(6),
                )
                .await
                .unwrap();
            (sid, key, r)
        }));
    }
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    for group in ["same-call", "same-key"] {
        let mine: Vec<_> = results
            .iter()
            .filter(|(s, k, _)| s.as_deref() == Some(group) || k.as_deref() == Some(group))
            .collect();
        assert_eq!(mine.len(), 20);
        assert_eq!(
            mine.iter().filter(|(_, _, r)| r.is_new).count(),
            1,
            "{group}"
        );
        let first = &mine[0].2.incident_id;
        assert!(
            mine.iter().all(|(_, _, r)| &r.incident_id == first),
            "{group}"
        );
    }
    assert_eq!(count(&store, "SELECT COUNT(*) FROM incidents").await, 22);
    assert_eq!(
        count(&store, "SELECT COUNT(*) FROM deliveries").await,
        22 * 6
    );
    for (_, _, r) in &results {
        let stored = store.deliveries(&r.incident_id).await.unwrap();
        assert_eq!(stored.len(), 6);
        assert!(stored
            .iter()
            .all(|d| d.status == "queued" && d.link_ref.is_some()));
    }
    store.close().await;
}

/// The database refuses one incident of a burst (a trigger stands for any fault of its rows): that
/// caller gets the error, everyone else in the same batch is stored.
async fn one_refused_incident_fails_alone(db: Db) {
    let engine = db;
    let db = TestDb::new(db).await;
    let store = store(&db).await;
    let statements: &[&str] = match engine {
        Db::Sqlite => &["CREATE TRIGGER refuse_poison BEFORE INSERT ON deliveries \
             WHEN (SELECT emergency_type FROM incidents WHERE id = NEW.incident_id) = 'Poison' \
             BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"],
        Db::Postgres => &[
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF (SELECT emergency_type FROM incidents WHERE id = NEW.incident_id) = 'Poison' THEN \
             RAISE EXCEPTION 'poisoned row'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON deliveries \
             FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
        ],
    };
    for sql in statements {
        sqlx::query(sql).execute(store.pool()).await.unwrap();
    }
    let mut calls = Vec::new();
    for i in 0..40 {
        let store = store.clone();
        let kind = if i == 17 { "Poison" } else { "Heart" };
        calls.push(tokio::spawn(async move {
            let sid = format!("burst-{i}");
            let r = store
                .create_incident(&incident(Some(&sid), None, kind), &deliveries(3))
                .await;
            (sid, r)
        }));
    }
    let mut failed = Vec::new();
    for c in calls {
        let (sid, r) = c.await.unwrap();
        match r {
            Ok(created) => {
                assert!(created.is_new);
                assert_eq!(
                    store.deliveries(&created.incident_id).await.unwrap().len(),
                    3
                );
            }
            Err(e) => failed.push((sid, format!("{e:#}"))),
        }
    }
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "burst-17");
    assert!(failed[0].1.contains("poisoned row"), "{}", failed[0].1);
    assert!(
        store
            .incident_by_call_sid("burst-17")
            .await
            .unwrap()
            .is_none(),
        "nothing of the refused incident is stored"
    );
    assert_eq!(count(&store, "SELECT COUNT(*) FROM incidents").await, 39);
    store.close().await;
}

/// The same over HTTP: a burst of Passthrus, one of which the database refuses. That one is answered
/// 302 (the Exotel flow's fallback branch); every other is answered 200 and stored with its deliveries.
async fn a_refused_passthru_in_a_burst_gets_302_and_the_rest_200(db: Db) {
    let engine = db;
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let statements: &[&str] = match engine {
        Db::Sqlite => &["CREATE TRIGGER refuse_poison BEFORE INSERT ON deliveries \
             WHEN (SELECT emergency_type FROM incidents WHERE id = NEW.incident_id) = 'Poison' \
             BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"],
        Db::Postgres => &[
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF (SELECT emergency_type FROM incidents WHERE id = NEW.incident_id) = 'Poison' THEN \
             RAISE EXCEPTION 'poisoned row'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON deliveries \
             FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
        ],
    };
    for sql in statements {
        sqlx::query(sql).execute(app.store.pool()).await.unwrap();
    }
    let mut calls = Vec::new();
    for i in 0..30 {
        let client = app.client.clone();
        let kind = if i == 11 { "Poison" } else { "Heart" };
        let url = format!(
            "{}/exotel/passthru?token={WEBHOOK_TOKEN}&CallSid=burst{i}&EmergencyType={kind}",
            app.base
        );
        calls.push(tokio::spawn(async move {
            (i, client.get(url).send().await.unwrap().status().as_u16())
        }));
    }
    for c in calls {
        let (i, status) = c.await.unwrap();
        let sid = format!("burst{i}");
        let stored = app.store.incident_by_call_sid(&sid).await.unwrap();
        if i == 11 {
            assert_eq!(
                status, 302,
                "the refused Passthru takes the fallback branch"
            );
            assert!(stored.is_none());
        } else {
            assert_eq!(status, 200, "{sid}");
            let stored = stored.expect("stored");
            assert_eq!(
                app.store.deliveries(&stored.id).await.unwrap().len(),
                HEART_DELIVERIES
            );
        }
    }
    app.stop().await;
}

both_engines!(
    repeats_in_one_batch_store_one_incident,
    one_refused_incident_fails_alone,
    a_refused_passthru_in_a_burst_gets_302_and_the_rest_200,
);
