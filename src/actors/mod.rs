//! Actors own live state and time: one per wearable, per ambulance and per incident, plus a few
//! hubs (incident directory, fleet, broadcaster, notifier). Handlers never panic: faults become
//! `ctx.stop()` after logging so supervisors can restart them.

pub mod billing;
pub mod broadcaster;
pub mod crew;
pub mod device;
pub mod devices;
pub mod fleet;
pub mod handoff;
pub mod incidents;
pub mod notifier;
