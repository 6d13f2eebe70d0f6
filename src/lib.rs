//! SHERS, the Smart Healthcare Emergency Response System: an emergency medical dispatch
//! backend. Wearables push vitals; SHERS triages them, opens one incident per patient, tells
//! the next of kin, offers the job to the nearest ambulance crews, follows the unit to the
//! hospital and bills the incident. Dispatch consoles watch and steer it over WebSocket.
//!
//! # Layout
//!
//! - [`domain`]: pure logic (no actix, no diesel, no I/O, no clock reads).
//! - [`actors`]: live state and time; one actor per wearable, ambulance and incident.
//! - [`persistence`]: diesel + diesel-async on SQLite and PostgreSQL; the event store.
//! - [`integrations`]: outbound adapters (routing, payments, insurance, notifications).
//! - [`http`]: actix-web handlers; validate, authorise, send a message; no business rules.
//! - [`sim`]: the demo city, the load generator and a stand-in router for benchmarks, which use
//!   only the public API.
//! - [`fault`]: named crash points for recovery drills (imports nothing of the crate).
//! - [`app`]: the composition root; [`config`]: layered settings; [`cli`]: the command line.
//! - [`cluster`]: one node of several sharing PostgreSQL and Redis: the front, the lease
//!   thread, the device shards and the node-to-node endpoints. It sits above [`app`], which it
//!   builds as the dispatch shard's application; nothing below it imports it.

pub mod actors;
pub mod app;
pub mod bus;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod fault;
pub mod http;
pub mod ingest;
pub mod integrations;
pub mod persistence;
pub mod sim;
