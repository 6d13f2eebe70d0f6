//! The actor layer: one actor per wearable, per ambulance and per incident, and the hubs
//! around them. Actors hold no sockets and build no JSON: WebSocket sessions live in
//! `http/` and receive typed messages; every rule is a pure function in `domain/`.

pub mod billing;
pub mod broadcaster;
pub mod device;
pub mod error;
pub mod incident;
pub mod notifier;
pub mod pusher;
pub mod unit;
