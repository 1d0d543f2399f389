//! Tolerant reading of webhook fields, as Exotel really sends them: unknown keys ignored, empty values
//! absent, values wrapped in literal quotes, repeated and bracketed keys, query string or form or JSON.

use std::borrow::Cow;

use axum::body::Bytes;
use axum::http::{header, HeaderMap};

use crate::domain::without_controls;

/// The largest value kept for one field; longer ones are cut, never the reason to drop an emergency.
pub const MAX_VALUE_CHARS: usize = 4096;

/// The fields of one webhook request, in the order received.
#[derive(Debug, Clone, Default)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Reads the query string (percent-decoding never fails: bad escapes are kept as written).
    pub fn from_query(query: Option<&str>) -> Self {
        let mut p = Params::default();
        p.extend_form(query.unwrap_or("").as_bytes());
        p
    }

    fn extend_form(&mut self, bytes: &[u8]) {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(bytes).unwrap_or_default();
        for (k, v) in pairs {
            self.push(k, v);
        }
    }

    /// Every field enters here, without control characters: PostgreSQL refuses NUL in text, and no
    /// Exotel field holds a control character on purpose (all are single-line), so a stray `%00` is
    /// dropped instead of turning the store into a 302 for a real emergency.
    fn push(&mut self, key: String, value: String) {
        self.pairs
            .push((strip_all_controls(key), strip_all_controls(value)));
    }

    /// Adds the fields of a POST body: a form, a JSON object (nested objects flattened to
    /// `Legs[0][Status]`-style keys, as forms spell them) or multipart form data.
    pub async fn extend_body(&mut self, headers: &HeaderMap, body: Bytes) -> Result<(), String> {
        if body.is_empty() {
            return Ok(());
        }
        let original = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // Media types match case-insensitively; the boundary does not, so it is read from `original`.
        let content_type = original.trim_start().to_ascii_lowercase();
        if content_type.starts_with("application/json") {
            let value: serde_json::Value = serde_json::from_slice(&strip_raw_controls(&body))
                .map_err(|e| format!("the body is not valid JSON: {e}"))?;
            let mut flat = Vec::new();
            flatten_json("", &value, &mut flat);
            for (k, v) in flat {
                self.push(k, v);
            }
            Ok(())
        } else if content_type.starts_with("multipart/form-data") {
            let boundary = multer::parse_boundary(original.trim())
                .map_err(|e| format!("bad multipart body: {e}"))?;
            let stream =
                futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
            let mut multipart = multer::Multipart::new(stream, boundary);
            while let Some(field) = multipart
                .next_field()
                .await
                .map_err(|e| format!("bad multipart body: {e}"))?
            {
                let name = field.name().unwrap_or("").to_owned();
                let text = field
                    .text()
                    .await
                    .map_err(|e| format!("bad multipart body: {e}"))?;
                self.push(name, text);
            }
            Ok(())
        } else {
            // Exotel's forms, and anything sent without a content type.
            self.extend_form(&body);
            Ok(())
        }
    }

    /// The first non-empty value of `key` (matched case-insensitively), cleaned: surrounding
    /// whitespace and one layer of literal quotes removed (`digits="215250"`), cut to a sane length.
    pub fn get(&self, key: &str) -> Option<String> {
        self.pairs
            .iter()
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(key))
            .find_map(|(_, v)| clean(v))
    }

    /// The first of several accepted names that has a value.
    pub fn get_any(&self, keys: &[&str]) -> Option<String> {
        keys.iter().find_map(|k| self.get(k))
    }

    /// Every field except the ones named, as a JSON list of `[key, value]` pairs for the audit record.
    /// A list, not an object, so repeated keys and their order survive.
    pub fn audit_json(&self, without: &[&str]) -> String {
        let kept: Vec<(&str, &str)> = self
            .pairs
            .iter()
            // Matched as `get` matches keys (trimmed), so `token%20=…`, which `get` accepts as the
            // token, is never kept for audit either.
            .filter(|(k, _)| !without.iter().any(|w| k.trim().eq_ignore_ascii_case(w)))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        serde_json::to_string(&kept).unwrap_or_else(|_| "[]".to_owned())
    }
}

/// `raw` without control characters (NUL, escape, DEL, C1), keeping tab, newline and carriage return,
/// which are harmless in stored text and meaningful in a message.
pub fn strip_controls(raw: &str) -> Cow<'_, str> {
    without_controls(raw, &['\t', '\n', '\r'])
}

/// `raw` without any control character: for single-line fields such as Exotel's.
pub fn strip_all_controls(raw: String) -> String {
    match without_controls(&raw, &[]) {
        Cow::Borrowed(_) => raw,
        Cow::Owned(clean) => clean,
    }
}

/// A JSON body without raw control bytes other than tab, newline and carriage return. JSON allows
/// none of them, neither between tokens nor unescaped inside strings, so removing them changes no valid
/// document and lets an otherwise valid one through. Escaped ones (`\u0000`) are removed after parsing.
pub fn strip_raw_controls(body: &[u8]) -> Cow<'_, [u8]> {
    let bad = |b: &u8| (*b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || *b == 0x7f;
    if body.iter().any(bad) {
        Cow::Owned(body.iter().copied().filter(|b| !bad(b)).collect())
    } else {
        Cow::Borrowed(body)
    }
}

/// Removes control characters from every string (and key) of a JSON document, in place.
pub fn strip_json_controls(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::String(s) => {
            if let Cow::Owned(clean) = strip_controls(s) {
                *s = clean;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_json_controls),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (k, mut v) in entries {
                strip_json_controls(&mut v);
                map.insert(strip_controls(&k).into_owned(), v);
            }
        }
        _ => {}
    }
}

/// Trims, strips one layer of matching quotes, treats empty as absent, cuts overlong values.
pub fn clean(raw: &str) -> Option<String> {
    let mut s = raw.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            s = s[1..s.len() - 1].trim();
            break;
        }
    }
    if s.is_empty() || s.eq_ignore_ascii_case("null") {
        return None;
    }
    Some(s.chars().take(MAX_VALUE_CHARS).collect())
}

fn flatten_json(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value;
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}[{k}]")
        }
    };
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                flatten_json(&key(k), v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten_json(&key(&i.to_string()), v, out);
            }
        }
        Value::Null => out.push((prefix.to_owned(), String::new())),
        Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

/// An http(s) URL with a host, or nothing: only such URLs are ever forwarded or played.
pub fn http_url(raw: &str) -> Option<String> {
    if raw.len() > 2048 {
        return None;
    }
    let url = reqwest::Url::parse(raw).ok()?;
    (matches!(url.scheme(), "http" | "https") && url.host_str().is_some_and(|h| !h.is_empty()))
        .then(|| url.to_string())
}

pub use crate::domain::exotel_time;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_quotes_empties_and_repeats() {
        let p = Params::from_query(Some(
            "digits=%22215250%22&DialWhomNumber=&CallSid=&CallSid=abc&callsid=def&Legs[1][Insights][Status]=x&EmergencyType=%27Heart%27",
        ));
        assert_eq!(p.get("digits").as_deref(), Some("215250"));
        assert_eq!(p.get("DialWhomNumber"), None);
        assert_eq!(p.get("CallSid").as_deref(), Some("abc"));
        assert_eq!(p.get("Legs[1][Insights][Status]").as_deref(), Some("x"));
        assert_eq!(p.get("EmergencyType").as_deref(), Some("Heart"));
        assert_eq!(p.get("missing"), None);
    }

    #[test]
    fn control_characters_never_reach_a_field() {
        let p = Params::from_query(Some("Call%00Sid=ab%00c%0A&x=%1B%7F%C2%85y"));
        assert_eq!(p.get("CallSid").as_deref(), Some("abc"));
        assert_eq!(p.get("x").as_deref(), Some("y"));
        assert_eq!(strip_controls("a\0b\n\tc\u{7}"), "ab\n\tc");
        assert_eq!(&*strip_raw_controls(b"{\0\"a\":\n1}"), b"{\"a\":\n1}");
        let mut v = serde_json::json!({"k\u{0}": ["x\u{0}y", {"z": "\u{1b}w"}]});
        strip_json_controls(&mut v);
        assert_eq!(v, serde_json::json!({"k": ["xy", {"z": "w"}]}));
    }

    #[tokio::test]
    async fn multipart_boundary_keeps_its_case() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "Multipart/Form-Data; boundary=XyZ".parse().unwrap(),
        );
        let body =
            "--XyZ\r\nContent-Disposition: form-data; name=\"CallSid\"\r\n\r\nabc\r\n--XyZ--\r\n";
        let mut p = Params::default();
        p.extend_body(&headers, Bytes::from(body)).await.unwrap();
        assert_eq!(p.get("CallSid").as_deref(), Some("abc"));
    }

    #[test]
    fn bad_percent_escapes_do_not_fail() {
        let p = Params::from_query(Some("CallSid=a%ZZb&x=%"));
        assert_eq!(p.get("CallSid").as_deref(), Some("a%ZZb"));
    }

    #[test]
    fn audit_keeps_repeats_and_drops_the_token() {
        let p = Params::from_query(Some("a=1&a=2&token=secret"));
        assert_eq!(p.audit_json(&["token"]), r#"[["a","1"],["a","2"]]"#);
        // A padded key is still the token.
        let p = Params::from_query(Some("a=1&token%20=secret&%20TOKEN=s2"));
        assert_eq!(p.get("token").as_deref(), Some("secret"));
        assert_eq!(p.audit_json(&["token"]), r#"[["a","1"]]"#);
    }

    #[test]
    fn reads_both_exotel_date_formats_and_ignores_the_epoch_placeholder() {
        let a = exotel_time("2024-07-31 16:42:56", 330).unwrap();
        let b = exotel_time("Wed, 31 Jul 2024 16:42:56", 330).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, 1_722_424_376_000);
        assert_eq!(exotel_time("1970-01-01 05:30:00", 330), None);
        assert_eq!(exotel_time("yesterday", 330), None);
    }

    #[test]
    fn only_http_urls_pass() {
        assert!(http_url("https://recordings.exotel.com/exotelrecordings/acme/abc.mp3").is_some());
        assert!(http_url("ftp://x/y").is_none());
        assert!(http_url("javascript:alert(1)").is_none());
        assert!(http_url("not a url").is_none());
    }
}
