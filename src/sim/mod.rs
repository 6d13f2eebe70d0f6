//! Simulators and load tools that drive SHERS from the outside, through its public
//! HTTP/WebSocket API only: the living demo city ([`demo`]) and the load generator
//! ([`loadgen`]). Nothing here reaches into actors or the database.

pub mod client;
pub mod demo;
pub mod loadgen;
