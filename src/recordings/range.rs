//! HTTP byte ranges (RFC 9110 §14) for serving a stored recording: phone players and the call
//! provider ask for pieces of it. One range is served; a request for several gets the whole recording
//! (allowed: a server may ignore `Range`).

/// What to send of a body of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    /// The whole body, 200.
    Whole,
    /// Bytes `start..=end`, 206.
    Part { start: u64, end: u64 },
    /// Nothing satisfiable, 416.
    Unsatisfiable,
}

/// Reads a `Range` header value against a body of `len` bytes. A header that is not a byte range, or
/// that cannot be read, is ignored (the whole body), as the RFC asks.
pub fn slice(header: Option<&str>, len: u64) -> Slice {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Slice::Whole;
    };
    if spec.contains(',') {
        return Slice::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Slice::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match number(last) {
            Some(0) => Slice::Unsatisfiable,
            Some(_) if len == 0 => Slice::Unsatisfiable,
            Some(n) => Slice::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            None => Slice::Whole,
        },
        // bytes=N- or bytes=N-M.
        (false, _) => {
            let Some(start) = number(first) else {
                return Slice::Whole;
            };
            let end = if last.is_empty() {
                u64::MAX
            } else {
                match number(last) {
                    Some(e) if e >= start => e,
                    _ => return Slice::Whole,
                }
            };
            if start >= len {
                Slice::Unsatisfiable
            } else {
                Slice::Part {
                    start,
                    end: end.min(len - 1),
                }
            }
        }
        (true, true) => Slice::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_forms_players_send() {
        assert_eq!(slice(None, 100), Slice::Whole);
        assert_eq!(
            slice(Some("bytes=0-"), 100),
            Slice::Part { start: 0, end: 99 }
        );
        assert_eq!(
            slice(Some("bytes=0-1"), 100),
            Slice::Part { start: 0, end: 1 }
        );
        assert_eq!(
            slice(Some("bytes=10-2000"), 100),
            Slice::Part { start: 10, end: 99 }
        );
        assert_eq!(
            slice(Some("bytes=-10"), 100),
            Slice::Part { start: 90, end: 99 }
        );
        assert_eq!(
            slice(Some("bytes=-1000"), 100),
            Slice::Part { start: 0, end: 99 }
        );
        assert_eq!(slice(Some("bytes=100-"), 100), Slice::Unsatisfiable);
        assert_eq!(slice(Some("bytes=-0"), 100), Slice::Unsatisfiable);
        assert_eq!(slice(Some("bytes=0-"), 0), Slice::Unsatisfiable);
        // Ignored: not bytes, several ranges, nonsense, end before start.
        for h in [
            "items=0-1",
            "bytes=0-1,5-6",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=-",
            "bytes=+1-2",
        ] {
            assert_eq!(slice(Some(h), 100), Slice::Whole, "{h}");
        }
    }
}
