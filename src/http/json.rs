//! Request body extraction with our error contract: 413 over the limit, 415 when not JSON,
//! 400 for malformed JSON, 422 for valid JSON of the wrong shape, each with a JSON pointer.
//!
//! [`parse_json`] is the one way a handler reads JSON a client sent (bodies through
//! [`JsonBody`], WebSocket frames directly): it reads through [`crate::domain::strict_json`],
//! so no handler can forget to refuse a duplicated name or a control character. Vitals ingest
//! keeps its own, faster parser (`domain::vitals`), which refuses both too.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::web::{Bytes, BytesMut};
use actix_web::{FromRequest, HttpRequest, web};
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::domain::strict_json::{self, StrictError};
use crate::domain::validation::{FieldError, push_pointer_token};

/// The JSON body size limit, registered as app data.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// A JSON request body deserialised into `T`, with problem+json errors.
pub struct JsonBody<T>(pub T);

fn is_json(req: &HttpRequest) -> bool {
    let Some(ct) = req.headers().get(header::CONTENT_TYPE) else {
        // Absent content type: accept (curl -d without -H is common); the parser decides.
        return true;
    };
    let Ok(ct) = ct.to_str() else { return false };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// Reads the whole body, refusing it with 413 once it exceeds the configured limit.
pub async fn read_body<E: std::fmt::Display>(
    req: &HttpRequest,
    payload: &mut (impl futures_util::Stream<Item = Result<Bytes, E>> + Unpin),
) -> Result<Bytes, ApiError> {
    let limit = req
        .app_data::<BodyLimit>()
        .or_else(|| req.app_data::<web::Data<BodyLimit>>().map(|d| d.get_ref()))
        .map_or(256 * 1024, |l| l.0);
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::Malformed {
            detail: format!("could not read the request body: {e}"),
            errors: Vec::new(),
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Converts a serde path into a JSON pointer.
pub fn pointer_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut pointer = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => push_pointer_token(&mut pointer, &index.to_string()),
            Segment::Map { key } => push_pointer_token(&mut pointer, key),
            Segment::Enum { variant } => push_pointer_token(&mut pointer, variant),
            Segment::Unknown => {}
        }
    }
    pointer
}

/// Deserialises `bytes` into `T`: a body that is not JSON is a 400 with its position; JSON
/// SHERS refuses (a duplicated name, a control character: see
/// [`crate::domain::strict_json`]) or of the wrong shape is a 422 with a pointer to the field.
/// (Reading a `Value` first keeps the two apart: serde_json reports some type errors, e.g. a
/// number where an enum is expected, as syntax errors when deserialising straight from bytes.
/// Hot paths have their own parsers.)
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value = strict_json::from_slice(bytes).map_err(|e| match e {
        StrictError::Syntax(e) => classify(String::new(), e),
        StrictError::Refused(refused) => ApiError::fields(vec![refused]),
    })?;
    serde_path_to_error::deserialize(value).map_err(|err| {
        let mut pointer = pointer_of(err.path());
        let message = err.into_inner().to_string();
        // serde names a missing field in its message, at the path of the object that lacks
        // it: the pointer names the field itself.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.strip_suffix('`'))
        {
            push_pointer_token(&mut pointer, field);
        }
        ApiError::Validation {
            detail: format!("{pointer}: {message}"),
            errors: vec![FieldError::new(pointer, message)],
        }
    })
}

fn classify(pointer: String, err: serde_json::Error) -> ApiError {
    let message = err.to_string();
    match err.classify() {
        serde_json::error::Category::Data => ApiError::Validation {
            detail: format!("{pointer}: {message}"),
            errors: vec![FieldError::new(pointer, message)],
        },
        _ => ApiError::Malformed {
            detail: format!("the body is not valid JSON: {message}"),
            errors: vec![FieldError::new(pointer, message)],
        },
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            if !is_json(&req) {
                return Err(ApiError::UnsupportedMediaType);
            }
            let bytes = read_body(&req, &mut payload).await?;
            parse_json(&bytes).map(JsonBody)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use actix_web::ResponseError;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Batch {
        readings: Vec<Item>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Item {
        heart_rate_bpm: f64,
    }

    #[test]
    fn shape_errors_are_422_with_a_pointer() {
        let err = parse_json::<Batch>(
            br#"{"readings":[{"heart_rate_bpm":1},{"heart_rate_bpm":"fast"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.status_code().as_u16(), 422);
        let problem = err.problem();
        assert_eq!(problem.errors[0].pointer, "/readings/1/heart_rate_bpm");
    }

    #[test]
    fn a_missing_field_is_named_by_its_pointer() {
        for (body, pointer) in [
            (&br#"{}"#[..], "/readings"),
            (
                br#"{"readings":[{"heart_rate_bpm":1},{}]}"#,
                "/readings/1/heart_rate_bpm",
            ),
        ] {
            let problem = parse_json::<Batch>(body).unwrap_err().problem();
            assert_eq!(problem.errors[0].pointer, pointer);
            assert_eq!(
                problem.errors[0].message,
                format!("missing field `{}`", pointer.rsplit('/').next().unwrap())
            );
        }
    }

    #[test]
    fn duplicate_names_and_control_characters_are_422_with_a_pointer() {
        for (body, pointer) in [
            (
                &br#"{"readings":[{"heart_rate_bpm":1,"heart_rate_bpm":2}]}"#[..],
                "/readings/0/heart_rate_bpm",
            ),
            (br#"{"readings":[],"readings":[]}"#, "/readings"),
            (
                br#"{"readings":[{"heart_rate_bpm":1,"note":"\u0000"}]}"#,
                "/readings/0/note",
            ),
        ] {
            let err = parse_json::<Batch>(body).unwrap_err();
            assert_eq!(err.status_code().as_u16(), 422);
            assert_eq!(err.problem().errors[0].pointer, pointer);
        }
    }

    #[test]
    fn syntax_errors_are_400() {
        for bad in [&b"{"[..], b"{\"readings\": [}", b"", b"{} trailing"] {
            let err = parse_json::<serde_json::Value>(bad).unwrap_err();
            assert_eq!(err.status_code().as_u16(), 400, "{bad:?}");
        }
    }
}
