//! Simulators and load tools that drive SHERS from the outside, through its public
//! HTTP/WebSocket API only: the living demo city ([`demo`]) and the load generator
//! ([`loadgen`]). Nothing here reaches into actors or the database.

pub mod city;
pub mod client;
pub mod clock;
pub mod crews;
pub mod demo;
pub mod fake_routing;
pub mod loadgen;
pub mod rng;
pub mod wearables;
