//! The GSM 03.38 7-bit alphabet (3GPP TS 23.038): which texts an SMS can carry in 7-bit encoding, and
//! how many SMS segments a text takes.

/// The basic character set (one septet each), in the standard's table order.
const BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\u{1b}ÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The extension table, reached through the escape septet: two septets each.
const EXTENSION: &str = "\u{c}^{}\\[~]|€";

/// Septets one character takes in GSM-7: 1 (basic), 2 (extension), or `None` when the character is
/// not in the alphabet (the text must then go as Unicode).
pub fn septets(c: char) -> Option<usize> {
    // The escape character itself is not text.
    if c == '\u{1b}' {
        None
    } else if BASIC.contains(c) {
        Some(1)
    } else if EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Whether every character of `text` is in the GSM-7 basic or extension table.
pub fn is_gsm7(text: &str) -> bool {
    text.chars().all(|c| septets(c).is_some())
}

/// How a text is encoded on the air, and its length in that encoding's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GSM-7: 160 septets in one SMS, 153 per part of a longer one.
    Gsm7,
    /// UCS-2: 70 characters in one SMS, 67 per part.
    Unicode,
}

impl Encoding {
    pub fn of(text: &str) -> Self {
        if is_gsm7(text) {
            Encoding::Gsm7
        } else {
            Encoding::Unicode
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "GSM-7",
            Encoding::Unicode => "Unicode",
        }
    }

    /// (units in a single SMS, units per part of a concatenated one).
    fn limits(self) -> (usize, usize) {
        match self {
            Encoding::Gsm7 => (160, 153),
            Encoding::Unicode => (70, 67),
        }
    }
}

/// The length of `text` in the units of `encoding`: septets for GSM-7 (extension characters count
/// two), UTF-16 code units for Unicode (a character outside the BMP, such as most emoji, counts two).
pub fn units(text: &str, encoding: Encoding) -> usize {
    match encoding {
        Encoding::Gsm7 => text.chars().map(|c| septets(c).unwrap_or(1)).sum(),
        Encoding::Unicode => text.encode_utf16().count(),
    }
}

/// The number of SMS a text of `units` takes: 0 for an empty text, 1 up to 160/70, then parts of
/// 153/67.
pub fn segments_for(units: usize, encoding: Encoding) -> usize {
    let (single, part) = encoding.limits();
    match units {
        0 => 0,
        n if n <= single => 1,
        n => n.div_ceil(part),
    }
}

/// The number of SMS `text` takes in the encoding it needs.
pub fn segments(text: &str) -> usize {
    let encoding = Encoding::of(text);
    segments_for(units(text, encoding), encoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_hold_the_standard_number_of_characters() {
        // 128 basic positions, one of them the escape; ten extension characters (form feed included).
        assert_eq!(BASIC.chars().count(), 128);
        assert_eq!(EXTENSION.chars().count(), 10);
    }

    #[test]
    fn ascii_letters_digits_and_common_punctuation_are_gsm7() {
        assert!(is_gsm7(
            "SOS Heart alert from +919800000001 at 2024-07-31 16:42. Call: 'desk' (x2)!?"
        ));
        assert!(is_gsm7("Ärzte: Ñoño, ÉCOLE, £5 & 10€ [a] {b} ~c^ |d\\"));
        assert!(is_gsm7("line one\nline two\r"));
        assert!(is_gsm7(""));
    }

    #[test]
    fn hindi_degree_emoji_and_lookalikes_are_not() {
        for text in [
            "डॉ. आशा राव",
            "Temp 39°C",
            "🚑 help",
            "tab\there",
            "`backtick`",
            "curly ‘quote’",
            "ç lower cedilla",
            "ú acute",
            "\u{1b}",
        ] {
            assert!(!is_gsm7(text), "{text:?}");
        }
    }

    #[test]
    fn extension_characters_count_two_septets() {
        assert_eq!(units("abc", Encoding::Gsm7), 3);
        assert_eq!(units("€[]", Encoding::Gsm7), 6);
        assert_eq!(units("🚑a", Encoding::Unicode), 3);
        assert_eq!(units("राव", Encoding::Unicode), 3);
    }

    #[test]
    fn segments_follow_the_single_and_concatenated_limits() {
        assert_eq!(segments(""), 0);
        assert_eq!(segments(&"a".repeat(160)), 1);
        assert_eq!(segments(&"a".repeat(161)), 2);
        assert_eq!(segments(&"a".repeat(306)), 2);
        assert_eq!(segments(&"a".repeat(307)), 3);
        // 80 extension characters are 160 septets: one SMS; one more character makes two.
        assert_eq!(segments(&"€".repeat(80)), 1);
        assert_eq!(segments(&format!("{}a", "€".repeat(80))), 2);
        assert_eq!(segments(&"र".repeat(70)), 1);
        assert_eq!(segments(&"र".repeat(71)), 2);
        assert_eq!(segments(&"र".repeat(134)), 2);
        assert_eq!(segments(&"र".repeat(135)), 3);
        // One non-GSM character turns the whole text into Unicode.
        assert_eq!(segments(&format!("{}°", "a".repeat(70))), 2);
    }
}
