//! The integration test binary: one binary, many modules, each test on its own fresh database
//! (SQLite file or PostgreSQL database) so the suite runs in parallel.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default,
    missing_docs
)]

mod helpers;

mod amqp;
mod amqp_relay;
mod auth;
mod billing;
mod browser;
mod bus_restart;
mod bus_tls;
mod cluster;
mod crash;
mod demo;
mod deploy;
mod dispatch;
mod errors;
mod events;
mod extremes;
mod incidents;
mod input;
mod insurance;
mod layering;
mod loadgen;
mod mqtt;
mod notifications;
mod ops;
mod persistence;
mod push;
mod sns;
mod vitals;
