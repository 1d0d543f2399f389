//! The typed lifecycle as the database enforces it, and provider lanes: a provider registered from
//! outside the crate sends its channel through the same queue, limits and outcome recording.

use std::sync::Arc;
use std::time::Duration;

use exotel_sos::domain::{Channel, DeliveryState, IncidentState};
use exotel_sos::providers::{Answer, Client, Job, Outcome, Prepared};
use exotel_sos::App;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::both_engines;
use crate::helpers::*;

both_engines!(
    the_database_refuses_an_unknown_state_and_a_step_back,
    every_move_of_the_code_is_in_the_database,
    a_registered_extra_provider_sends_its_channel,
);

const SID: &str = "b00c0e6fcd920019d7174b60099187a";

/// A status outside the vocabulary, or a move the transition table does not list, is refused by the
/// database itself, whatever statement tries it.
async fn the_database_refuses_an_unknown_state_and_a_step_back(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    let pool = app.store.pool();
    let id: String = sqlx::query_scalar("SELECT id FROM deliveries LIMIT 1")
        .fetch_one(pool)
        .await
        .unwrap();
    let set = |status: &'static str| {
        let id = id.clone();
        async move {
            sqlx::query("UPDATE deliveries SET status = $1 WHERE id = $2")
                .bind(status)
                .bind(id)
                .execute(pool)
                .await
        }
    };
    assert!(set("delivred").await.is_err(), "an unknown state");
    assert!(
        set("simulated").await.is_err(),
        "only a claim decides that a delivery is simulated"
    );
    // queued → sending → accepted → delivered is the normal path.
    for next in ["sending", "accepted", "delivered"] {
        set(next).await.unwrap_or_else(|e| panic!("→ {next}: {e}"));
    }
    assert!(
        set("queued").await.is_err(),
        "a delivered alert is never sent again"
    );
    assert!(set("sending").await.is_err());
    // Staying put is not a move.
    set("delivered").await.unwrap();

    let incident: String = sqlx::query_scalar("SELECT id FROM incidents LIMIT 1")
        .fetch_one(pool)
        .await
        .unwrap();
    let set_incident = |status: &'static str| {
        let incident = incident.clone();
        async move {
            sqlx::query("UPDATE incidents SET status = $1 WHERE id = $2")
                .bind(status)
                .bind(incident)
                .execute(pool)
                .await
        }
    };
    assert!(set_incident("closed").await.is_err());
    set_incident("resolved").await.unwrap();
    assert!(
        set_incident("open").await.is_err(),
        "a resolved incident is never reopened"
    );
    let bogus = sqlx::query(
        "INSERT INTO incidents (id, source, emergency_type, route, raw_params, status, received_at) \
         VALUES ('x', 'api', 'T', 'default', '{}', 'pending', 0)",
    )
    .execute(pool)
    .await;
    assert!(bogus.is_err(), "an incident in an unknown state");
    app.stop().await;
}

/// The transition table in the code and the one the database enforces are the same: written down
/// once, copied at each start.
async fn every_move_of_the_code_is_in_the_database(db: Db) {
    let app = spawn_app_with(db, &[without_dispatcher()]).await;
    let pool = app.store.pool();
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT from_state, to_state FROM delivery_transitions ORDER BY 1, 2")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut code: Vec<(String, String)> = DeliveryState::transitions()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    code.sort();
    assert_eq!(stored, code);
    let states: Vec<String> = sqlx::query_scalar("SELECT name FROM delivery_states ORDER BY name")
        .fetch_all(pool)
        .await
        .unwrap();
    let mut named: Vec<String> = DeliveryState::ALL.iter().map(|s| s.to_string()).collect();
    named.sort();
    assert_eq!(states, named, "the vocabulary");
    let incident_states: Vec<String> =
        sqlx::query_scalar("SELECT name FROM incident_states ORDER BY name")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut named: Vec<String> = IncidentState::ALL.iter().map(|s| s.to_string()).collect();
    named.sort();
    assert_eq!(incident_states, named);
    app.stop().await;
}

/// A second SMS provider, written outside the crate: a plain JSON API.
struct PagerSms {
    url: String,
}

impl Client for PagerSms {
    fn channel(&self) -> Channel {
        Channel::Sms
    }

    fn is_live(&self) -> bool {
        true
    }

    fn prepare(&self, job: &Job) -> Prepared {
        Prepared {
            url: self.url.clone(),
            form: vec![
                ("to".into(), job.phone.clone()),
                ("text".into(), job.text.clone()),
            ],
            basic_auth: None,
            secret_fields: &[],
            timeout: Duration::from_secs(2),
        }
    }

    fn classify(&self, answer: &Answer) -> Outcome {
        let id = serde_json::from_str::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_owned));
        match (answer.status, id) {
            (200..=299, Some(id)) => Outcome::Accepted {
                provider_id: Some(id),
                detail: "pager accepted".into(),
            },
            _ => Outcome::Transient {
                reason: format!("HTTP {}", answer.status),
                retry_after: None,
            },
        }
    }
}

/// Registered after the built-in lanes, the extra provider takes the channel's new deliveries: they
/// record its lane, go through its client, and end like any other; the other channels are untouched.
async fn a_registered_extra_provider_sends_its_channel(db: Db) {
    let p = Providers::start().await;
    mount_happy(&p).await;
    let pager = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"id": "pg-1"})))
        .mount(&pager)
        .await;
    let db = TestDb::new(db).await;
    let stakeholders = db.dir().join("stakeholders.toml");
    std::fs::write(&stakeholders, STAKEHOLDERS).unwrap();
    let settings = test_settings(&db, &stakeholders, &p.env());
    let app = App::build(settings).await.unwrap().with_provider(
        "pager",
        Arc::new(PagerSms {
            url: format!("{}/send", pager.uri()),
        }),
    );
    let app = serve(db, stakeholders, app).await;
    app.passthru(&format!("CallSid={SID}&EmergencyType=Heart"))
        .await;
    assert!(
        app.deliveries_until(SID, Duration::from_secs(20), |ds| {
            ds.iter()
                .filter(|d| d.channel == Channel::Sms)
                .all(|d| d.status == DeliveryState::Accepted)
        })
        .await,
        "the pager's SMS are accepted"
    );
    let ds = app.deliveries_of(SID).await;
    let sms: Vec<_> = ds.iter().filter(|d| d.channel == Channel::Sms).collect();
    assert!(!sms.is_empty());
    for d in &sms {
        assert_eq!(d.provider, "pager:sms");
        assert_eq!(d.provider_id.as_deref(), Some("pg-1"));
    }
    let sent = pager.received_requests().await.unwrap_or_default();
    assert_eq!(sent.len(), sms.len(), "one request per SMS delivery");
    assert!(
        p.requests(SMS_PATH).await.is_empty(),
        "Exotel's SMS lane sends nothing new"
    );
    for d in ds.iter().filter(|d| d.channel == Channel::Call) {
        assert_eq!(d.provider, "exotel:call");
    }
    app.stop().await;
}
