//! Wearables: one [`DeviceActor`] per wearable and the [`DeviceDirectory`] that routes
//! triaged readings to them.

mod actor;
mod directory;

pub use actor::*;
pub use directory::*;
