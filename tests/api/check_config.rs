//! `exotel-sos check-config` on good and broken stakeholder files, through the real binary.

use std::process::Command;

use crate::helpers::STAKEHOLDERS;

fn check(stakeholders: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stakeholders.toml");
    std::fs::write(&file, stakeholders).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_exotel-sos"))
        .arg("check-config")
        .env("SOS_STAKEHOLDERS__FILE", &file)
        .env(
            "SOS_DATABASE__URL",
            format!("sqlite://{}/x.db?mode=rwc", dir.path().display()),
        )
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn good_file_prints_the_routing_table_with_masked_numbers() {
    let (ok, text) = check(STAKEHOLDERS);
    assert!(ok, "{text}");
    assert!(
        text.contains("Heart -> cardiology, emergency-desk, lab"),
        "{text}"
    );
    assert!(text.contains("+91******0001"), "{text}");
    assert!(!text.contains("9800000001"), "no full number: {text}");
    assert!(text.contains("1 -> Heart"), "{text}");
}

#[test]
fn broken_file_reports_every_problem_with_file_and_entry() {
    let broken = r#"
[[contact]]
name = "Typo"
phone = "+91 98000"
teams = ["cardiology"]

[[contact]]
name = "Floating"
phone = "+919800000009"

[routes]
Heart = ["cardiology", "nobody"]
Lungs = []
default = ["cardiology"]
"#;
    let (ok, text) = check(broken);
    assert!(!ok);
    for needle in [
        "contact[0] \"Typo\": bad phone number",
        "contact[1] \"Floating\": is in no team",
        "routes.Heart: team \"nobody\" has no contacts",
        "routes.Lungs: route has no teams",
        "stakeholders.toml",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(
        !text.contains("9800000009"),
        "numbers masked even in errors: {text}"
    );
}

/// Two contacts of one name: acknowledgements, notices and drills tell contacts apart by name, so the
/// file is refused, naming both entries (numbers masked).
#[test]
fn a_contact_name_given_twice_fails_naming_both_entries() {
    let twice = STAKEHOLDERS.replace("name = \"Central lab\"", "name = \"Emergency Desk\"");
    let (ok, text) = check(&twice);
    assert!(!ok, "{text}");
    for needle in [
        "contact[3] \"Emergency Desk\" (+91******0005)",
        "contact[2] \"Emergency desk\" (+91******0004)",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(!text.contains("9800000005"), "numbers masked: {text}");
}

#[test]
fn unparseable_file_and_bad_settings_fail_clearly() {
    let (ok, text) = check("[[contact]\nname=");
    assert!(!ok);
    assert!(text.contains("not valid TOML"), "{text}");

    let out = Command::new(env!("CARGO_BIN_EXE_exotel-sos"))
        .arg("check-config")
        .env("SOS_SERVER__LISTEN", "everywhere")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen"));
}

/// `serve` with no tokens in settings prints ready-to-paste URLs with a generated token, and the same
/// token after a restart (it is stored in the database).
#[test]
fn serve_prints_the_webhook_urls_with_a_stored_token() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stakeholders.toml");
    std::fs::write(&file, STAKEHOLDERS).unwrap();
    let run = || {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_exotel-sos"))
            .env("SOS_STAKEHOLDERS__FILE", &file)
            .env(
                "SOS_DATABASE__URL",
                format!("sqlite://{}/sos.db?mode=rwc", dir.path().display()),
            )
            .env("SOS_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("SOS_SERVER__PUBLIC_URL", "https://sos.example.org")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut out = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            out.push_str(&line);
            out.push('\n');
            if line.contains("Admin API bearer token") {
                break;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        out
    };
    let first = run();
    let token_line = first
        .lines()
        .find(|l| l.contains("https://sos.example.org/exotel/passthru?token="))
        .unwrap_or_else(|| panic!("no passthru URL in:\n{first}"))
        .trim()
        .to_owned();
    assert!(
        first.contains("https://sos.example.org/exotel/greeting?token="),
        "{first}"
    );
    assert!(first.contains("DRY-RUN"), "dry-run is announced: {first}");
    let second = run();
    assert!(
        second.contains(&token_line),
        "the token survived the restart:\n{second}"
    );
}
