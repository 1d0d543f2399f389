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
