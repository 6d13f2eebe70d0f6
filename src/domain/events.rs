//! Event envelopes: what the event store records and what consoles receive.
//!
//! An event is `{seq, at, kind, incident_id?, unit_id?, device_id?, data}` (`docs/api.md` "Event
//! stream"). `seq` is global and gap-free; `version` orders events within one stream (one
//! incident, one unit, one device) and is the optimistic-concurrency check on append.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// An event to append (no sequence or time yet).
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Stable kind name, e.g. `incident.created`.
    pub kind: String,
    /// The incident this event concerns, if any.
    pub incident_id: Option<String>,
    /// The unit this event concerns, if any.
    pub unit_id: Option<String>,
    /// The device this event concerns, if any.
    pub device_id: Option<String>,
    /// Event-specific data.
    pub data: serde_json::Value,
}

impl NewEvent {
    /// An event of `kind` with `data` and no correlation ids.
    pub fn new(kind: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            incident_id: None,
            unit_id: None,
            device_id: None,
            data,
        }
    }
}

/// An event as stored: with its global sequence, stream version and time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecordedEvent {
    /// Global, gap-free, increasing sequence.
    pub seq: i64,
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// Stable kind name.
    pub kind: String,
    /// The incident this event concerns, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<String>,
    /// The unit this event concerns, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_id: Option<String>,
    /// The device this event concerns, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Event-specific data.
    pub data: serde_json::Value,
    /// The stream this event belongs to (not part of the console frame).
    #[serde(skip)]
    pub stream_id: String,
    /// Position within the stream, starting at 1 (not part of the console frame).
    #[serde(skip)]
    pub version: i64,
}

/// What the appender believes the stream's current version is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append regardless of the current version (for streams with a single writer by design).
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last version must be exactly this.
    Exact(i64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `actual` (0 = empty) satisfies the expectation.
    pub fn matches(self, actual: i64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(v) => v == actual,
        }
    }
}
