//! Field-level validation problems, reported with a JSON pointer into the request body, and
//! the rules every input shares: what text SHERS accepts ([`TextKind`], [`check_text`]), what a
//! caller-chosen id looks like ([`valid_external_id`]) and which instants can be stored.
//!
//! The text rule is decided here once. No text a client sends may carry a control character
//! (Unicode category Cc: U+0000–U+001F, U+007F–U+009F): they are invisible to the people who
//! read names and reasons, they break logs and CSV exports, and PostgreSQL cannot store U+0000
//! at all. Free text written over several lines (descriptions, reasons) may keep tab, line feed
//! and carriage return; everything else (names, labels, phone numbers, ids) is one line.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// One problem with one field of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// JSON pointer (RFC 6901) into the request, e.g. `/readings/3/heart_rate_bpm`; empty for
    /// the whole document.
    pub pointer: String,
    /// What is wrong, for people.
    pub message: String,
}

impl FieldError {
    /// A problem at `pointer`.
    pub fn new(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            pointer: pointer.into(),
            message: message.into(),
        }
    }
}

/// Appends one reference token to a JSON pointer, escaping `~` and `/` (RFC 6901).
pub fn push_pointer_token(pointer: &mut String, token: &str) {
    pointer.push('/');
    for ch in token.chars() {
        match ch {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            c => pointer.push(c),
        }
    }
}

/// What kind of text a field holds, and so which characters it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextKind {
    /// One line (a name, a label, a phone number, an id): no control character at all.
    Line,
    /// Free text over several lines (a description, a reason): tab, line feed and carriage
    /// return, and no other control character. Every string in a JSON document a client sends
    /// is held to at least this (`domain::strict_json`).
    Lines,
}

impl TextKind {
    /// The first character of `text` this kind refuses, if any.
    pub fn forbidden(self, text: &str) -> Option<char> {
        // Most text is ASCII without control bytes: one pass over the bytes decides it.
        if text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return None;
        }
        text.chars().find(|&c| {
            c.is_control() && !(self == TextKind::Lines && matches!(c, '\t' | '\n' | '\r'))
        })
    }

    /// What is wrong with text holding `found`, for people.
    pub fn message(self, found: char) -> String {
        let code = u32::from(found);
        match self {
            TextKind::Line => {
                format!("must be one line without control characters (found U+{code:04X})")
            }
            TextKind::Lines => format!(
                "must not contain control characters other than tab and line breaks \
                 (found U+{code:04X})"
            ),
        }
    }

    /// The problem with `text` at `pointer`, if it holds a character this kind refuses.
    pub fn check(self, pointer: &str, text: &str) -> Result<(), FieldError> {
        match self.forbidden(text) {
            Some(found) => Err(FieldError::new(pointer, self.message(found))),
            None => Ok(()),
        }
    }
}

/// Checks a free-text field: text of `kind`, and 1 to `max_chars` characters once trimmed
/// (`required`), or at most `max_chars` (not `required`: the empty string is accepted). Adds at
/// most one problem for the field to `errors`.
pub fn check_text(
    errors: &mut Vec<FieldError>,
    pointer: &str,
    text: &str,
    kind: TextKind,
    required: bool,
    max_chars: usize,
) {
    if let Err(e) = kind.check(pointer, text) {
        errors.push(e);
        return;
    }
    let trimmed = text.trim();
    let len = trimmed.chars().count();
    if required && len == 0 {
        errors.push(FieldError::new(
            pointer,
            format!("must be 1 to {max_chars} characters"),
        ));
    } else if len > max_chars {
        let message = if required {
            format!("must be 1 to {max_chars} characters")
        } else {
            format!("at most {max_chars} characters")
        };
        errors.push(FieldError::new(pointer, message));
    }
}

/// What [`valid_external_id`] asks of an id, for people.
pub const ID_RULE: &str = "must be 1 to 128 printable characters without spaces, '/', '?' or '#'";

/// Whether `id` is an acceptable caller-chosen identifier (patient, device, unit, hospital):
/// 1–128 printable ASCII characters without spaces, `/`, `?` or `#`. Ids travel in paths and
/// logs, so they are held to more than [`TextKind::Line`].
pub fn valid_external_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'?' && b != b'#')
}

/// Adds the problem with the caller-chosen id at `pointer` to `errors`, if it breaks
/// [`valid_external_id`].
pub fn check_id(errors: &mut Vec<FieldError>, pointer: &str, id: &str) {
    if !valid_external_id(id) {
        errors.push(FieldError::new(pointer, ID_RULE));
    }
}

/// The earliest instant SHERS accepts from a client (1970-01-01T00:00:00Z).
pub const EARLIEST_INSTANT_S: i64 = 0;
/// The latest instant SHERS accepts from a client (9999-12-31T23:59:59Z): both databases store
/// everything in between, and RFC 3339's four-digit years keep SQLite's text order right.
pub const LATEST_INSTANT_S: i64 = 253_402_300_799;

/// Checks that a client-supplied instant lies between [`EARLIEST_INSTANT_S`] and
/// [`LATEST_INSTANT_S`]; chrono accepts years ±262,143, which neither database stores and
/// whose arithmetic overflows.
pub fn storable_instant(pointer: &str, at: DateTime<Utc>) -> Result<DateTime<Utc>, FieldError> {
    if (EARLIEST_INSTANT_S..=LATEST_INSTANT_S).contains(&at.timestamp()) {
        Ok(at)
    } else {
        Err(FieldError::new(
            pointer,
            "must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_instants_both_databases_store_are_accepted() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert!(storable_instant("/at", at("1970-01-01T00:00:00Z")).is_ok());
        assert!(storable_instant("/at", at("9999-12-31T23:59:59.999Z")).is_ok());
        let early = storable_instant("/at", at("1969-12-31T23:59:59Z")).unwrap_err();
        assert_eq!(early.pointer, "/at");
        assert!(storable_instant("/at", DateTime::<Utc>::MIN_UTC).is_err());
        assert!(storable_instant("/at", DateTime::<Utc>::MAX_UTC).is_err());
    }

    #[test]
    fn control_characters_are_refused_and_line_breaks_only_in_lines() {
        for (text, line, lines) in [
            ("Ada Lovelace", true, true),
            ("Zoë Ñandú 救急", true, true),
            ("", true, true),
            ("a\u{0}b", false, false),
            ("a\u{1}b", false, false),
            ("a\u{1b}[31m", false, false),
            ("a\u{7f}", false, false),
            ("a\u{85}b", false, false),
            ("a\u{9f}", false, false),
            ("two\nlines", false, true),
            ("tab\there", false, true),
            ("crlf\r\n", false, true),
            // Not control characters: non-breaking space, line separator, a zero-width joiner.
            ("a\u{a0}b\u{2028}c\u{200d}", true, true),
        ] {
            assert_eq!(TextKind::Line.forbidden(text).is_none(), line, "{text:?}");
            assert_eq!(TextKind::Lines.forbidden(text).is_none(), lines, "{text:?}");
        }
        let e = TextKind::Line.check("/name", "a\u{0}").unwrap_err();
        assert_eq!(e.pointer, "/name");
        assert!(e.message.contains("U+0000"), "{}", e.message);
    }

    #[test]
    fn text_fields_report_one_problem_each() {
        let mut errors = Vec::new();
        check_text(&mut errors, "/a", "  ", TextKind::Line, true, 5);
        check_text(&mut errors, "/b", "", TextKind::Line, false, 5);
        check_text(&mut errors, "/c", "abcdef", TextKind::Lines, false, 5);
        check_text(&mut errors, "/d", "a\u{0}bcdefgh", TextKind::Lines, true, 5);
        check_text(&mut errors, "/e", " ab\ncd ", TextKind::Lines, true, 5);
        let pointers: Vec<&str> = errors.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(pointers, ["/a", "/c", "/d"]);
        assert!(errors[2].message.contains("control"));
    }

    #[test]
    fn ids_are_printable_ascii_without_separators() {
        for ok in ["p-1", "UNIT_7", "a:b@c.d", "x".repeat(128).as_str()] {
            assert!(valid_external_id(ok), "{ok}");
        }
        for bad in [
            "",
            "has space",
            "a/b",
            "a?b",
            "a#b",
            "a\u{0}",
            "é",
            "x".repeat(129).as_str(),
        ] {
            assert!(!valid_external_id(bad), "{bad:?}");
        }
        let mut errors = Vec::new();
        check_id(&mut errors, "/id", "a\tb");
        assert_eq!(errors, [FieldError::new("/id", ID_RULE)]);
    }

    #[test]
    fn pointer_tokens_are_escaped() {
        let mut p = String::new();
        push_pointer_token(&mut p, "readings");
        push_pointer_token(&mut p, "3");
        push_pointer_token(&mut p, "a/b~c");
        assert_eq!(p, "/readings/3/a~1b~0c");
    }
}
