//! Field-level validation problems, reported with a JSON pointer into the request body.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_tokens_are_escaped() {
        let mut p = String::new();
        push_pointer_token(&mut p, "readings");
        push_pointer_token(&mut p, "3");
        push_pointer_token(&mut p, "a/b~c");
        assert_eq!(p, "/readings/3/a~1b~0c");
    }
}
