//! What travels between nodes, and how a call to another node fails.
//!
//! The hot path (readings to their device shard's holder, emergencies to the dispatch holder,
//! and their answers) is MessagePack: the readings cross in the validated form the front
//! already made of the request, encoded once and decoded once, with no text parsing or
//! validation on the other side. Field names are kept (`to_vec_named`), so an optional field
//! left out decodes as absent. A JSON body (`Content-Type: application/json`) is still read, and
//! answered in JSON: curl and people can call the endpoints. The inspection endpoints
//! (`/internal/v1/actors/*`) and the fall cancel, off the hot path, speak JSON.

use actix_web::HttpRequest;
use actix_web::http::header::CONTENT_TYPE;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::actors::device::DeviceError;
use crate::http::error::ApiError;

/// The content type of node-to-node bodies on the hot path.
pub const MSGPACK: &str = "application/msgpack";

/// Why a call to another node failed. Each ingest edge sees it as a device it cannot reach
/// right now, and a device actor as a hand-off it could not make: either way the request is
/// answered 503 with `Retry-After` and its client retries.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No live node holds the shard (a failover is under way).
    #[error("no node holds the shard right now")]
    NoHolder,
    /// The node could not be reached (refused, reset, timed out).
    #[error("the node is unreachable: {0}")]
    Unreachable(String),
    /// The node answered with this status (not the holder any more, or refusing).
    #[error("the node answered {0}")]
    Refused(u16),
    /// The node's answer could not be read.
    #[error("the node's answer could not be read: {0}")]
    BadAnswer(String),
}

impl PeerError {
    /// A failed request, without its URL (which names no patient, but is noise in logs).
    pub fn from_reqwest(e: reqwest::Error) -> Self {
        PeerError::Unreachable(e.without_url().to_string())
    }
}

impl From<PeerError> for DeviceError {
    fn from(e: PeerError) -> Self {
        DeviceError::Unreachable(e.to_string())
    }
}

/// `value` as a hot-path body.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, PeerError> {
    rmp_serde::to_vec_named(value).map_err(|e| PeerError::BadAnswer(e.to_string()))
}

/// A hot-path answer.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, PeerError> {
    rmp_serde::from_slice(bytes).map_err(|e| PeerError::BadAnswer(e.to_string()))
}

/// Whether `req` sent JSON (else MessagePack).
fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// A node-to-node request body, in the codec its content type names.
pub fn read<T: DeserializeOwned>(req: &HttpRequest, body: &[u8]) -> Result<T, ApiError> {
    if is_json(req) {
        return crate::http::json::parse_json(body);
    }
    rmp_serde::from_slice(body).map_err(|e| ApiError::Malformed {
        detail: format!("not a MessagePack body of this endpoint: {e}"),
        errors: Vec::new(),
    })
}

/// The answer to `req`, in the codec it was asked in.
pub fn answer<T: Serialize>(
    req: &HttpRequest,
    value: &T,
) -> Result<actix_web::HttpResponse, ApiError> {
    if is_json(req) {
        return Ok(actix_web::HttpResponse::Ok().json(value));
    }
    let bytes = rmp_serde::to_vec_named(value).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(actix_web::HttpResponse::Ok()
        .content_type(MSGPACK)
        .body(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::vitals::{GeoPoint, Reading};

    #[test]
    fn a_reading_crosses_whole_including_its_absent_fields() {
        let reading: Reading = serde_json::from_value(serde_json::json!({
            "device_id": "w-1", "patient_id": null, "timestamp": "2026-12-07T10:00:00.123Z",
            "heart_rate_bpm": 72.5, "spo2_pct": null, "respiration_rate_bpm": null,
            "body_temp_c": 36.61, "systolic_bp_mmhg": null, "diastolic_bp_mmhg": null,
            "fall_detected": false, "moving": null, "on_oxygen": null, "consciousness": null,
            "location": {"lat": 55.95, "lng": -3.19}, "steps": null
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let batch = vec![(3_usize, reading.clone())];
        let bytes = encode(&batch).unwrap_or_default();
        let back: Vec<(usize, Reading)> = decode(&bytes).unwrap_or_default();
        assert_eq!(back, batch);
        assert_eq!(
            back[0].1.location,
            Some(GeoPoint {
                lat: 55.95,
                lng: -3.19,
                accuracy_m: None
            })
        );
        let json = serde_json::to_vec(&batch).unwrap_or_default();
        assert!(bytes.len() < json.len(), "{} ≥ {}", bytes.len(), json.len());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode::<Vec<(usize, Reading)>>(b"\xc1\xff").is_err());
        assert!(decode::<Vec<(usize, Reading)>>(b"").is_err());
    }
}
