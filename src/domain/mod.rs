//! Pure domain logic: no actix, no diesel, no I/O, no clock reads (time is passed in).
//!
//! This is where the rules live (validation, triage, the incident state machine, dispatch
//! ranking, billing transitions) and where most unit and property tests run without a runtime.

pub mod analytics;
pub mod auth;
pub mod billing;
pub mod dispatch;
pub mod events;
pub mod geo;
pub mod ids;
pub mod incident;
pub mod news2;
pub mod notify;
pub mod patients;
pub mod push;
pub mod shards;
pub mod strict_json;
pub mod triage;
pub mod validation;
pub mod vitals;
