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
}
