//! Field-level validation problems, reported with a JSON pointer into the request body.

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
    fn pointer_tokens_are_escaped() {
        let mut p = String::new();
        push_pointer_token(&mut p, "readings");
        push_pointer_token(&mut p, "3");
        push_pointer_token(&mut p, "a/b~c");
        assert_eq!(p, "/readings/3/a~1b~0c");
    }
}
