//! Exotel's call identifier, treated as opaque: real ones end in non-hex letters.

use std::fmt;

/// A CallSid as Exotel sends it: 32 lower-case alphanumerics in practice, accepted more loosely because
/// rejecting a real emergency over an unexpected format would be worse than storing an odd id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallSid(String);

pub const MAX_LEN: usize = 128;

impl CallSid {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let s = raw.trim();
        if s.is_empty() {
            return Err("CallSid is required".to_owned());
        }
        if s.len() > MAX_LEN {
            return Err(format!("CallSid is longer than {MAX_LEN} characters"));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err("CallSid may hold only letters, digits, '-', '_' and '.'".to_owned());
        }
        Ok(CallSid(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it has the form of every CallSid Exotel sends: exactly 32 lower-case letters and
    /// digits. Not a reason to refuse a request (see [`CallSid::parse`]); it tells a request that may
    /// be Exotel's from one that cannot be, where a wrong token decides whether anyone is paged.
    pub fn is_exotel_form(&self) -> bool {
        self.0.len() == 32
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    }
}

impl fmt::Display for CallSid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_real_non_hex_sids_and_rejects_junk() {
        assert!(CallSid::parse("e12eb6e6fcd920019d7174b60099187v").is_ok());
        assert!(CallSid::parse("40ccc7656e1a3eb66c6cb2be57d1142k").is_ok());
        assert!(CallSid::parse("").is_err());
        assert!(CallSid::parse("   ").is_err());
        assert!(CallSid::parse("a b").is_err());
        assert!(CallSid::parse("<script>").is_err());
        assert!(CallSid::parse(&"a".repeat(MAX_LEN + 1)).is_err());
    }

    #[test]
    fn exotel_form_is_32_lower_case_letters_and_digits() {
        let form = |s: &str| CallSid::parse(s).unwrap().is_exotel_form();
        assert!(form("e12eb6e6fcd920019d7174b60099187v"));
        assert!(form("40ccc7656e1a3eb66c6cb2be57d1142k"));
        assert!(!form("CAevil1"));
        assert!(!form("40CCC7656E1A3EB66C6CB2BE57D1142K"), "upper case");
        assert!(!form("40ccc7656e1a3eb66c6cb2be57d1142"), "31 characters");
        assert!(!form("40ccc7656e1a3eb66c6cb2be57d1142kk"), "33 characters");
        assert!(!form("40ccc7656e1a3eb66c6cb2be57d114-k"));
    }
}
