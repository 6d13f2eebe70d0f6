//! Incidents: one supervised [`IncidentActor`] per incident, and the [`IncidentDirectory`], the
//! only place incidents are created.
//!
//! The directory keeps `patient → open incident` in memory (one open incident per patient; the
//! database's unique `open_patient_id` is the backstop across nodes) and serialises creation
//! per patient, so a burst of emergency readings and requests for one patient yields exactly
//! one incident; later ones attach as evidence. Every command runs through the pure state
//! machine (`domain::incident`); its events are appended to the event store, with the
//! projections, in one transaction *before* the actor's state changes or any effect runs.
//!
//! Supervision: each actor runs under an actix `Supervisor`. A fault stops the actor (handlers
//! never panic); the supervisor restarts it and it rebuilds its state from the event store. An
//! actor whose mailbox has closed anyway (a panic) is re-created by the directory.

mod actor;
mod create;
mod directory;
mod offers;
mod references;
mod store;

pub use actor::*;
pub use directory::*;
pub use offers::*;
pub use store::*;
