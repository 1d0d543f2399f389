//! Exotel's Call Details API, asked where a call's recording is when its own URL keeps refusing the
//! credentials, and Exotel's `RecordingAvailableBy` time in the formats it may come in.
//!
//! <https://developer.exotel.com/api/call-details>

use std::time::Duration;

use secrecy::ExposeSecret;

use super::{path_segment, rest_exception, Account};
use crate::recordings::fetch::describe;

/// The Call Details answer is a small JSON document; anything bigger is not it.
const MAX_DETAILS_BYTES: usize = 1024 * 1024;

/// Where Exotel's Call Details API says the recording is: GET
/// `{api_base}/v1/Accounts/{sid}/Calls/{call_sid}.json?RecordingUrlValidity=60` with Basic auth.
/// `Call.PreSignedRecordingUrl` first (`Some((url, true))`), else `Call.RecordingUrl`
/// (`Some((url, false))`); `None` when neither is a non-empty string or the body is not that JSON.
/// `Err(why)` on transport errors or a non-2xx answer.
///
/// <https://developer.exotel.com/api/call-details>
pub async fn recording_url(
    client: &reqwest::Client,
    account: &Account,
    call_sid: &str,
) -> Result<Option<(String, bool)>, String> {
    let url = account.url(&format!("Calls/{}.json", path_segment(call_sid)));
    let mut response = client
        .get(&url)
        .query(&[("RecordingUrlValidity", "60")])
        .basic_auth(&account.api_key, Some(account.api_token.expose_secret()))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .map_err(|e| format!("Call Details API: {}", describe(e)))?;
    let code = response.status().as_u16();
    // The body is read with a cap: a wrong `exotel.base_url` could answer with anything.
    let mut body = Vec::new();
    while let Some(piece) = response
        .chunk()
        .await
        .map_err(|e| format!("Call Details API: {}", describe(e)))?
    {
        if body.len() + piece.len() > MAX_DETAILS_BYTES {
            return Err(format!(
                "Call Details API answered HTTP {code} with more than {MAX_DETAILS_BYTES} bytes"
            ));
        }
        body.extend_from_slice(&piece);
    }
    let body = String::from_utf8_lossy(&body);
    if !(200..300).contains(&code) {
        let detail = match (code, rest_exception(&body)) {
            (401 | 403, _) | (_, None) => String::new(),
            (_, Some(message)) => format!(": {}", message.chars().take(200).collect::<String>()),
        };
        return Err(format!("Call Details API answered HTTP {code}{detail}"));
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        return Ok(None);
    };
    let field = |name: &str| {
        v["Call"][name]
            .as_str()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    Ok(field("PreSignedRecordingUrl")
        .map(|u| (u, true))
        .or_else(|| field("RecordingUrl").map(|u| (u, false))))
}

/// Exotel's `RecordingAvailableBy` (format unconfirmed), as epoch milliseconds: `YYYY-MM-DD HH:mm:ss`
/// (local time at `utc_offset_minutes`), RFC 3339 / ISO 8601 with a zone, `YYYY-MM-DDTHH:mm:ss`
/// without one (local), an RFC 2822 date, or epoch seconds (10 digits) / milliseconds (13 digits).
/// Surrounding quotes and whitespace are ignored.
pub fn parse_available_by(raw: &str, utc_offset_minutes: i32) -> Option<i64> {
    let s = raw.trim().trim_matches(['"', '\'']).trim();
    if s.is_empty() {
        return None;
    }
    let millis = if s.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 = s.parse().ok()?;
        match s.len() {
            10 => n.checked_mul(1000)?,
            13 => n,
            _ => return None,
        }
    } else if let Some(t) = crate::domain::exotel_time(s, utc_offset_minutes) {
        t
    } else if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        t.timestamp_millis()
    } else if let Ok(t) = chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z") {
        // ISO 8601 offsets without a colon (`+0530`), which RFC 3339 does not allow.
        t.timestamp_millis()
    } else if let Ok(t) = chrono::DateTime::parse_from_rfc2822(s) {
        t.timestamp_millis()
    } else {
        // `2024-07-31T16:48:02[.123]` without a zone: local, like Exotel's own format.
        let (date, time) = s.split_once(['T', 't'])?;
        let time = time.split_once('.').map_or(time, |(whole, _)| whole);
        crate::domain::exotel_time(&format!("{date} {time}"), utc_offset_minutes)?
    };
    // Exotel writes the epoch (1970-01-01) for "unknown", as `exotel_time` knows.
    (millis >= 86_400_000).then_some(millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use secrecy::SecretString;
    use wiremock::matchers::{header, method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const USER: &str = "key-ab12";
    const PASSWORD: &str = "token-s3cret-9z";

    fn auth_header() -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        )
    }

    fn account(server: &MockServer) -> Account {
        Account {
            base_url: server.uri(),
            account_sid: "acme".into(),
            api_key: USER.into(),
            api_token: SecretString::from(PASSWORD.to_owned()),
        }
    }

    async fn details_answer(
        call_sid: &str,
        answer: ResponseTemplate,
    ) -> Result<Option<(String, bool)>, String> {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(format!(
                "/v1/Accounts/acme/Calls/{}.json",
                path_segment(call_sid)
            )))
            .and(query_param("RecordingUrlValidity", "60"))
            .and(header("authorization", auth_header().as_str()))
            .respond_with(answer)
            .expect(1)
            .mount(&server)
            .await;
        recording_url(&reqwest::Client::new(), &account(&server), call_sid).await
    }

    #[tokio::test]
    async fn the_call_details_api_names_the_recording() {
        let both = serde_json::json!({"Call": {
            "Sid": "abc",
            "RecordingUrl": "https://recordings.exotel.com/exotelrecordings/acme/abc.mp3",
            "PreSignedRecordingUrl": "https://s3.ap-south-1.amazonaws.com/r/abc.mp3?X-Amz-Signature=s",
        }});
        assert_eq!(
            details_answer("abc", ResponseTemplate::new(200).set_body_json(both)).await,
            Ok(Some((
                "https://s3.ap-south-1.amazonaws.com/r/abc.mp3?X-Amz-Signature=s".into(),
                true
            )))
        );
        let plain = serde_json::json!({"Call": {
            "Sid": "abc",
            "RecordingUrl": "https://recordings.exotel.com/exotelrecordings/acme/abc.mp3",
            "PreSignedRecordingUrl": "",
        }});
        // A call sid is one path segment, whatever it holds.
        assert_eq!(
            details_answer("../a b?c", ResponseTemplate::new(200).set_body_json(plain)).await,
            Ok(Some((
                "https://recordings.exotel.com/exotelrecordings/acme/abc.mp3".into(),
                false
            )))
        );
        let neither = serde_json::json!({"Call": {"Sid": "abc", "RecordingUrl": null}});
        assert_eq!(
            details_answer("abc", ResponseTemplate::new(200).set_body_json(neither)).await,
            Ok(None)
        );
        assert_eq!(
            details_answer(
                "abc",
                ResponseTemplate::new(200).set_body_raw("<html>maintenance</html>", "text/html")
            )
            .await,
            Ok(None)
        );
        let refused = details_answer(
            "abc",
            ResponseTemplate::new(401).set_body_string(format!("bad token {PASSWORD}")),
        )
        .await
        .unwrap_err();
        assert!(
            refused.contains("HTTP 401") && !refused.contains(PASSWORD),
            "{refused}"
        );
        let missing = details_answer(
            "abc",
            ResponseTemplate::new(404).set_body_json(serde_json::json!({
                "RestException": {"Status": 404, "Message": "Call not found"}
            })),
        )
        .await
        .unwrap_err();
        assert_eq!(
            missing,
            "Call Details API answered HTTP 404: Call not found"
        );
    }

    #[tokio::test]
    async fn the_call_details_api_unreachable_is_an_error() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let account = Account {
            base_url: format!("http://{addr}"),
            account_sid: "acme".into(),
            api_key: USER.into(),
            api_token: SecretString::from(PASSWORD.to_owned()),
        };
        let e = recording_url(&reqwest::Client::new(), &account, "abc")
            .await
            .unwrap_err();
        assert!(e.starts_with("Call Details API: could not connect"), "{e}");
        assert!(!e.contains(PASSWORD) && !e.contains("acme"), "{e}");
    }

    #[test]
    fn available_by_is_read_in_every_likely_format() {
        // 2024-07-31 16:48:02 in India is 11:18:02 UTC.
        let want = chrono::DateTime::parse_from_rfc3339("2024-07-31T11:18:02Z")
            .unwrap()
            .timestamp_millis();
        let ist = 330;
        for raw in [
            "2024-07-31 16:48:02",
            " \"2024-07-31 16:48:02\" ",
            "'2024-07-31 16:48:02'",
            "2024-07-31T16:48:02+05:30",
            "2024-07-31T11:18:02Z",
            "2024-07-31T11:18:02.000Z",
            "2024-07-31T16:48:02+0530",
            "2024-07-31T16:48:02",
            "Wed, 31 Jul 2024 16:48:02 +0530",
            "Wed, 31 Jul 2024 11:18:02 GMT",
            "Wed, 31 Jul 2024 16:48:02",
            "1722424682",
            "1722424682000",
        ] {
            assert_eq!(parse_available_by(raw, ist), Some(want), "{raw:?}");
        }
        assert_eq!(
            parse_available_by("2024-07-31T16:48:02.250", ist),
            Some(want),
            "a fraction of a second is dropped"
        );
        assert_eq!(
            parse_available_by("2024-07-31 11:18:02", 0),
            Some(want),
            "local time follows the offset"
        );
        for junk in [
            "",
            "  ",
            "\"\"",
            "soon",
            "172242468",
            "17224246820",
            "2024-13-45 99:00:00",
            "1970-01-01 05:30:00",
            "0000000000",
            "2024-07-31",
            "31/07/2024 16:48",
        ] {
            assert_eq!(parse_available_by(junk, ist), None, "{junk:?}");
        }
    }
}
