//! The `server.*` limits are validated at start (and by `check-config`), each problem named.

use exotel_sos::settings::Settings;

fn load(extra: &[(&str, &str)]) -> anyhow::Result<Settings> {
    let env = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<Vec<_>>();
    Settings::load_with_env(None, env)
}

fn problem(extra: &[(&str, &str)]) -> String {
    match load(extra) {
        Ok(_) => panic!("{extra:?} was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn defaults_are_valid_and_as_documented() {
    let s = load(&[]).expect("defaults are valid");
    assert_eq!(s.server.header_read_timeout_secs, 10);
    assert_eq!(s.server.max_connections, 512);
    assert_eq!(s.server.reserved_for_exotel, 64);
    assert_eq!(s.server.public_db_concurrency, 2);
}

#[test]
fn out_of_range_server_limits_are_refused() {
    for bad in ["0", "11"] {
        let p = problem(&[("SOS_SERVER__HEADER_READ_TIMEOUT_SECS", bad)]);
        assert!(p.contains("server.header_read_timeout_secs"), "{p}");
    }
    let p = problem(&[("SOS_SERVER__MAX_CONNECTIONS", "1")]);
    assert!(p.contains("server.max_connections"), "{p}");
    let p = problem(&[
        ("SOS_SERVER__MAX_CONNECTIONS", "8"),
        ("SOS_SERVER__RESERVED_FOR_EXOTEL", "8"),
    ]);
    assert!(p.contains("server.reserved_for_exotel"), "{p}");
    let p = problem(&[("SOS_SERVER__RESERVED_FOR_EXOTEL", "0")]);
    assert!(p.contains("server.reserved_for_exotel"), "{p}");
    let p = problem(&[
        ("SOS_DATABASE__MAX_CONNECTIONS", "4"),
        ("SOS_SERVER__PUBLIC_DB_CONCURRENCY", "4"),
    ]);
    assert!(p.contains("server.public_db_concurrency"), "{p}");
    let p = problem(&[("SOS_SERVER__PUBLIC_DB_CONCURRENCY", "0")]);
    assert!(p.contains("server.public_db_concurrency"), "{p}");
}

/// A console token equal to the admin token would sign the front desk in as an admin.
#[test]
fn a_console_token_equal_to_the_admin_token_is_refused() {
    let same = "the-same-token-0123456789";
    let p = problem(&[
        ("SOS_SERVER__ADMIN_TOKEN", same),
        ("SOS_SERVER__CONSOLE_TOKEN", same),
    ]);
    assert!(
        p.contains("server.console_token") && p.contains("server.admin_token"),
        "{p}"
    );
    assert!(!p.contains(same), "the token is not repeated: {p}");
    load(&[
        ("SOS_SERVER__ADMIN_TOKEN", same),
        ("SOS_SERVER__CONSOLE_TOKEN", "another-token-0123456789"),
    ])
    .expect("different tokens are fine");
}

/// The webhook token is in URLs Exotel shows and logs: it may not open the API or the console.
#[test]
fn a_webhook_token_equal_to_the_admin_or_console_token_is_refused() {
    let same = "the-same-token-0123456789";
    for key in ["SOS_SERVER__ADMIN_TOKEN", "SOS_SERVER__CONSOLE_TOKEN"] {
        let p = problem(&[("SOS_SERVER__WEBHOOK_TOKEN", same), (key, same)]);
        assert!(p.contains("server.webhook_token must differ"), "{p}");
        assert!(!p.contains(same), "the token is not repeated: {p}");
    }
}

/// The housekeeping and retention rounds have the dispatcher's floor for the same reason.
#[test]
fn housekeeping_and_retention_rounds_under_the_minimum_are_refused() {
    for key in [
        "SOS_HOUSEKEEPING__AUTO_RESOLVE_EVERY_MS",
        "SOS_RETENTION__EVERY_MS",
    ] {
        for bad in ["0", "10", "49"] {
            let p = problem(&[(key, bad)]);
            assert!(p.contains("must be at least 50"), "{key}={bad}: {p}");
        }
        load(&[(key, "50")]).expect("50 ms is allowed");
    }
}

/// `dispatch.poll_interval_ms = 0` made an idle server poll the database without pause.
#[test]
fn a_poll_interval_under_the_minimum_is_refused() {
    for bad in ["0", "49"] {
        let p = problem(&[("SOS_DISPATCH__POLL_INTERVAL_MS", bad)]);
        assert!(
            p.contains("dispatch.poll_interval_ms must be at least 50"),
            "{p}"
        );
    }
    load(&[("SOS_DISPATCH__POLL_INTERVAL_MS", "50")]).expect("the minimum is accepted");
}

crate::both_engines!(a_console_token_equal_to_the_stored_admin_token_stops_the_start);

/// The generated admin token is printed at each start and kept in the database: pasted into
/// `server.console_token`, it would make every console sign-in an admin one, so the server does not
/// start.
async fn a_console_token_equal_to_the_stored_admin_token_stops_the_start(db: crate::helpers::Db) {
    use crate::helpers::*;
    let generated = [("SOS_SERVER__ADMIN_TOKEN", String::new())];
    let app = spawn_app_with(db, &generated).await;
    let admin = secrecy::ExposeSecret::expose_secret(app.state.admin_token.as_ref()).to_owned();
    let stakeholders = app.stakeholders.clone();
    let test_db = app.stop().await;
    let settings = test_settings(
        &test_db,
        &stakeholders,
        &[
            ("SOS_SERVER__ADMIN_TOKEN", String::new()),
            ("SOS_SERVER__CONSOLE_TOKEN", admin.clone()),
        ],
    );
    let refused = match exotel_sos::App::build(settings).await {
        Ok(_) => panic!("the server started with the admin token as console token"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("server.console_token") && refused.contains("admin token"),
        "{refused}"
    );
    assert!(
        !refused.contains(&admin),
        "the token is not repeated: {refused}"
    );
}
