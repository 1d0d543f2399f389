//! Live edits of the stakeholder file: applied on change and on SIGHUP, broken edits rejected.

use std::time::Duration;

use crate::helpers::*;

const ONLY_DESK: &str = r#"
[[contact]]
name = "New desk"
phone = "+919800000077"
channels = ["call"]
teams = ["emergency-desk"]

[routes]
default = ["emergency-desk"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_change_applies_and_broken_edit_keeps_previous_routing() {
    let app = spawn_app(Db::Sqlite).await;
    app.passthru("CallSid=dddd0000000000000000000000000001&EmergencyType=Heart")
        .await;

    // A broken edit: rejected, previous routing kept.
    std::fs::write(
        &app.stakeholders,
        "[[contact]]\nname = \"x\"\nphone = \"1\"\n",
    )
    .unwrap();
    // The watcher saw the edit and rejected it (a dead watcher would pass the checks below unseen).
    let routing = app.state.routing.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let r = routing.clone();
            async move { r.rejected_edits() >= 1 }
        })
        .await,
        "the broken edit was seen and rejected"
    );
    app.passthru("CallSid=dddd0000000000000000000000000002&EmergencyType=Heart")
        .await;
    assert_eq!(
        app.deliveries_of("dddd0000000000000000000000000002")
            .await
            .len(),
        HEART_DELIVERIES
    );

    // A good edit: applied without a restart.
    std::fs::write(&app.stakeholders, ONLY_DESK).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            let r = routing.clone();
            async move { r.current().contact_count() == 1 }
        })
        .await,
        "the edit was picked up"
    );
    app.passthru("CallSid=dddd0000000000000000000000000003&EmergencyType=Heart")
        .await;
    let d = app.deliveries_of("dddd0000000000000000000000000003").await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].phone, "+919800000077");

    // Incidents already recorded keep the contacts they were created with.
    assert_eq!(
        app.deliveries_of("dddd0000000000000000000000000001")
            .await
            .len(),
        HEART_DELIVERIES
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file() {
    // The watcher may also see the write; SIGHUP must be enough on its own, so compare before and after.
    let app = spawn_app(Db::Sqlite).await;
    // Our own handler too, so the signal can never take the default action (terminate) in this process.
    let _hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    // A served request proves the app's watchers (installed before serving) are in place.
    assert_eq!(
        app.client
            .get(format!("{}/healthz", app.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let routing = app.state.routing.clone();
    assert_eq!(routing.current().contact_count(), 4);
    std::fs::write(&app.stakeholders, ONLY_DESK).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        eventually(Duration::from_secs(10), || {
            let r = routing.clone();
            async move { r.current().contact_count() == 1 }
        })
        .await
    );
    app.stop().await;
}

/// An edit that gives two contacts one name is refused, naming both, and the file in force stays
/// (notices and drills tell contacts apart by name); a start on such a file fails the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_giving_two_contacts_one_name_is_refused_and_the_old_file_stays() {
    let app = spawn_app(Db::Sqlite).await;
    let twice = format!(
        "{ONLY_DESK}\n[[contact]]\nname = \"new desk\"\nphone = \"+919800000078\"\n\
         teams = [\"emergency-desk\"]\n"
    );
    std::fs::write(&app.stakeholders, twice).unwrap();
    let routing = app.state.routing.clone();
    let errors = routing.reload().expect_err("the edit is refused");
    let all = errors.join("\n");
    assert!(
        all.contains("contact[1] \"new desk\" (+91******0078)")
            && all.contains("contact[0] \"New desk\" (+91******0077)"),
        "{all}"
    );
    assert_eq!(routing.current().contact_count(), 4, "the old file stays");
    // A server started on that file does not start.
    let refused = match exotel_sos::App::build(test_settings(&app.db, &app.stakeholders, &[])).await
    {
        Ok(_) => panic!("a server started with two contacts of one name"),
        Err(e) => format!("{e:#}"),
    };
    assert!(refused.contains("contact[1] \"new desk\""), "{refused}");
    app.passthru("CallSid=dddd0000000000000000000000000009&EmergencyType=Heart")
        .await;
    assert_eq!(
        app.deliveries_of("dddd0000000000000000000000000009")
            .await
            .len(),
        HEART_DELIVERIES
    );
    app.stop().await;
}
