//! Wearables: one [`DeviceActor`] per wearable, the [`DeviceDirectory`] that routes readings
//! to them, and the [`DeviceRouter`] every ingest edge calls.

mod actor;
mod directory;
mod readings;
mod router;

pub use actor::*;
pub use directory::*;
pub use router::*;
