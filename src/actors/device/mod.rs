//! Wearables: one [`DeviceActor`] per wearable and the [`DeviceDirectory`] that routes
//! triaged readings to them.

mod actor;
mod directory;
mod readings;

pub use actor::*;
pub use directory::*;
