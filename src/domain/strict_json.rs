//! Strict JSON: how SHERS reads a JSON document a client sends (request bodies, WebSocket
//! frames, FHIR resources), into a [`serde_json::Value`] that typed inputs are then read from.
//!
//! Two things plain `serde_json` lets through are refused here, each with a JSON pointer:
//!
//! - a name given twice in one object (`{"role": "console", "role": "admin"}`): JSON leaves
//!   its meaning open and `serde_json::Value` keeps the last, so a filter that read the first
//!   would see another document than the handler;
//! - text with a control character ([`TextKind::Lines`] for values, [`TextKind::Line`] for
//!   names), so no string with U+0000 or an escape sequence reaches a handler, a log or a
//!   database, whatever field it arrives in.
//!
//! Pure: no I/O. The hot vitals path does not come through here: its typed parser refuses
//! duplicate fields itself (`serde`'s derived structs do) and checks the only strings it keeps.

use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::validation::{FieldError, TextKind, push_pointer_token};

/// Why a document was not read.
#[derive(Debug)]
pub enum StrictError {
    /// It is not JSON: serde_json's own error, with the line and column.
    Syntax(serde_json::Error),
    /// It is JSON SHERS does not accept: a duplicated name or forbidden text, at its pointer.
    Refused(FieldError),
}

/// Reads `bytes` as one JSON document (see the module docs for what is refused).
pub fn from_slice(bytes: &[u8]) -> Result<Value, StrictError> {
    let mut state = State::default();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let read = Strict { state: &mut state }
        .deserialize(&mut de)
        .and_then(|value| de.end().map(|()| value));
    match (read, state.refused) {
        (Ok(value), _) => Ok(value),
        (Err(e), None) => Err(StrictError::Syntax(e)),
        // Reading stopped at the refusal; the rest may not even be JSON, which comes first.
        (Err(_), Some(refused)) => match serde_json::from_slice::<IgnoredAny>(bytes) {
            Err(syntax) => Err(StrictError::Syntax(syntax)),
            Ok(_) => Err(StrictError::Refused(refused)),
        },
    }
}

/// Reads `text` as one JSON document, as [`from_slice`].
pub fn from_str(text: &str) -> Result<Value, StrictError> {
    from_slice(text.as_bytes())
}

/// Where the reader is (a JSON pointer, grown and cut back as it descends, so the path costs
/// nothing unless something is refused) and what it refused.
#[derive(Default)]
struct State {
    pointer: String,
    refused: Option<FieldError>,
}

impl State {
    fn refuse<E: de::Error>(&mut self, message: String) -> E {
        self.refused = Some(FieldError::new(self.pointer.clone(), message.clone()));
        E::custom(message)
    }
}

/// Reads one value at the state's pointer.
struct Strict<'s> {
    state: &'s mut State,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        match TextKind::Lines.forbidden(s) {
            Some(found) => Err(self.state.refuse(TextKind::Lines.message(found))),
            None => Ok(Value::String(s.to_owned())),
        }
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        match TextKind::Lines.forbidden(&s) {
            Some(found) => Err(self.state.refuse(TextKind::Lines.message(found))),
            None => Ok(Value::String(s)),
        }
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let state = self.state;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        loop {
            let at = state.pointer.len();
            // Writing to a String cannot fail.
            let _ = write!(state.pointer, "/{}", items.len());
            let item = seq.next_element_seed(Strict { state: &mut *state })?;
            state.pointer.truncate(at);
            match item {
                Some(value) => items.push(value),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let state = self.state;
        let mut object = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            let at = state.pointer.len();
            push_pointer_token(&mut state.pointer, &name);
            if let Some(found) = TextKind::Line.forbidden(&name) {
                let message = format!("a member name {}", TextKind::Line.message(found));
                return Err(state.refuse(message));
            }
            if object.contains_key(&name) {
                return Err(state.refuse(format!("duplicate field `{name}`")));
            }
            let value = map.next_value_seed(Strict { state: &mut *state })?;
            state.pointer.truncate(at);
            object.insert(name, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(text: &str) -> FieldError {
        match from_str(text) {
            Err(StrictError::Refused(e)) => e,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn reads_what_serde_json_reads() {
        let text = r#"{"a": [1, -2, 3.5, true, null, "x\ty\nz"], "b": {"c": {}}, "d": []}"#;
        assert_eq!(
            from_str(text).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
        assert_eq!(from_str("\"é救\"").unwrap(), json!("é救"));
        assert_eq!(from_str("18446744073709551615").unwrap(), json!(u64::MAX));
    }

    #[test]
    fn duplicate_names_are_refused_where_they_are() {
        let e = refused(r#"{"role": "console", "role": "admin"}"#);
        assert_eq!(e.pointer, "/role");
        assert_eq!(e.message, "duplicate field `role`");
        let e = refused(r#"{"next_of_kin": [{"name": "a"}, {"name": "b", "name": "c"}]}"#);
        assert_eq!(e.pointer, "/next_of_kin/1/name");
        // Spelled differently, the same name.
        let e = refused(r#"{"a/b": 1, "a\/b": 2}"#);
        assert_eq!(e.pointer, "/a~1b");
        // The same name in different objects is fine.
        assert!(from_str(r#"{"a": {"x": 1}, "b": {"x": 1}}"#).is_ok());
    }

    #[test]
    fn control_characters_are_refused_with_their_pointer() {
        let e = refused(r#"{"name": "a\u0000b"}"#);
        assert_eq!(e.pointer, "/name");
        assert!(e.message.contains("U+0000"), "{}", e.message);
        let e = refused(r#"{"items": ["ok", "\u0085"]}"#);
        assert_eq!(e.pointer, "/items/1");
        let e = refused("[\"raw \u{85}\"]");
        assert_eq!(e.pointer, "/0");
        let e = refused(r#"{"na\u0000me": 1}"#);
        assert_eq!(e.pointer, "/na\u{0}me");
        let e = refused(r#"{"two\nlines": 1}"#);
        assert!(e.message.starts_with("a member name"), "{}", e.message);
        // Line breaks and tabs are text over several lines.
        assert!(from_str(r#"{"description": "one\r\ntwo\tthree"}"#).is_ok());
    }

    #[test]
    fn broken_json_is_a_syntax_error_even_after_a_refusal() {
        // (A raw control character inside a string is not JSON at all.)
        for text in [
            "{",
            "{\"a\": 1,}",
            "",
            "{} trailing",
            "{\"a\": \"\\u0000\", ",
            "[\"\u{1}\"]",
        ] {
            assert!(
                matches!(from_str(text), Err(StrictError::Syntax(_))),
                "{text}"
            );
        }
    }
}
