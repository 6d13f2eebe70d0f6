//! Ambulances: one [`AmbulanceActor`] per unit, the [`Fleet`] hub over them, and [`Crew`], the
//! path a crew's commands take across the incident and unit actors.
//!
//! The unit's actor is the single arbiter of its commitments: it holds at most one pending
//! offer and one assignment, so a unit can never be committed to two incidents. Crew sessions
//! (WebSocket) register with their unit's actor, which pushes offer frames to them.

mod actor;
mod crew;
mod fleet;
mod inspect;

pub use actor::*;
pub use crew::*;
pub use fleet::*;
pub use inspect::*;
