//! Phone numbers in E.164, parsed with libphonenumber's rules, and masked for logs.

use std::fmt;

use phonenumber::country;

/// A valid phone number, held in E.164 form (`+919800000001`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Phone(String);

/// The region for a code such as `IN`.
pub fn region(code: &str) -> Option<country::Id> {
    code.trim().to_ascii_uppercase().parse().ok()
}

impl Phone {
    /// Parses `+91 98000 00001`, `09800000001` (national, with `default_region`) or `919800000001`.
    pub fn parse(raw: &str, default_region: country::Id) -> Result<Self, String> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err("phone number is empty".to_owned());
        }
        // Exotel writes international numbers as 00<country code>…; libphonenumber wants the plus.
        let normalized = match trimmed.strip_prefix("00") {
            Some(rest) => format!("+{rest}"),
            None => trimmed.to_owned(),
        };
        let parsed = phonenumber::parse(Some(default_region), &normalized)
            .map_err(|e| format!("{:?} is not a phone number ({e})", mask(trimmed)))?;
        if !phonenumber::is_valid(&parsed) {
            return Err(format!(
                "{} is not a valid number for its region",
                mask(trimmed)
            ));
        }
        Ok(Phone(
            parsed.format().mode(phonenumber::Mode::E164).to_string(),
        ))
    }

    pub fn e164(&self) -> &str {
        &self.0
    }

    /// Digits only, without the plus: GupShup's `send_to` form (`919800000001`).
    pub fn digits(&self) -> &str {
        self.0.trim_start_matches('+')
    }

    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

/// Debug and Display both mask, so a phone number cannot reach a log line whole by accident.
impl fmt::Debug for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Phone({})", self.masked())
    }
}

impl fmt::Display for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// `+919800000001` → `+91******0001`: the country code and last four stay, enough to tell contacts apart.
pub fn mask(number: &str) -> String {
    let chars: Vec<char> = number.trim().chars().collect();
    let n = chars.len();
    if n <= 4 {
        return "*".repeat(n);
    }
    let head = if n >= 10 { 3 } else { 0 };
    let tail = 4;
    let mut out: String = chars[..head].iter().collect();
    out.push_str(&"*".repeat(n - head - tail));
    out.extend(&chars[n - tail..]);
    out
}

/// Masks every phone-number-like run (7 or more digits, an optional leading `+`) inside free text, such
/// as a provider's error message (`Call to [09800000001] cannot be made…`), before it is logged.
pub fn mask_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let digits = run.chars().filter(char::is_ascii_digit).count();
        if digits >= 7 {
            out.push_str(&mask(run));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() || (c == '+' && run.is_empty()) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn india() -> country::Id {
        region("IN").unwrap()
    }

    #[test]
    fn parses_e164_spaced_national_and_double_zero_forms() {
        for raw in [
            "+91 98000 00001",
            "+919800000001",
            "09800000001",
            "9800000001",
            "00919800000001",
        ] {
            assert_eq!(
                Phone::parse(raw, india()).unwrap().e164(),
                "+919800000001",
                "{raw}"
            );
        }
        assert_eq!(
            Phone::parse("+91 98000 00001", india()).unwrap().digits(),
            "919800000001"
        );
    }

    #[test]
    fn rejects_garbage_without_echoing_it_whole() {
        assert!(Phone::parse("", india()).is_err());
        assert!(Phone::parse("12", india()).is_err());
        let err = Phone::parse("+91 12345 67890 12345", india()).unwrap_err();
        assert!(!err.contains("1234567890"), "{err}");
    }

    #[test]
    fn masks_numbers_inside_provider_messages() {
        assert_eq!(
            mask_numbers(
                "Call to [09800000001] cannot be made because of TRAI NDNC regulations (code 403)"
            ),
            "Call to [098****0001] cannot be made because of TRAI NDNC regulations (code 403)"
        );
        assert_eq!(
            mask_numbers("success | 919800000001 | 123"),
            "success | 919*****0001 | 123"
        );
        assert_eq!(mask_numbers("HTTP 502 after 45s"), "HTTP 502 after 45s");
    }

    #[test]
    fn masks_like_the_design_says() {
        assert_eq!(mask("+919800000001"), "+91******0001");
        assert_eq!(
            format!("{}", Phone::parse("09800000001", india()).unwrap()),
            "+91******0001"
        );
        assert_eq!(
            format!("{:?}", Phone::parse("09800000001", india()).unwrap()),
            "Phone(+91******0001)"
        );
        assert_eq!(mask("123"), "***");
        assert_eq!(mask("1234567"), "***4567");
    }
}
