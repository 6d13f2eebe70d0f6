//! What a batch of readings does to a device: the compact reading window, triage and the
//! application of in-order readings ([`take_readings`]), and storing the resulting changes in
//! line ([`persist_changes`], [`in_line`]).

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

use super::{Accepted, Change, DeviceActor, Live, ReadingOutcome, Scored, TriageRuntime};
use crate::actors::incident::EmergencyDetected;
pub use crate::config::Retention;
use crate::domain::events::{DeviceEvent, NewEvent};
use crate::domain::ids::{DeviceId, PatientId};
use crate::domain::triage::{TriageStatus, in_arrival_order};
use crate::domain::vitals::Reading;
use crate::persistence::group::{GroupCommit, Projection};
use crate::persistence::patients::FallWatchState;
use crate::persistence::readings::{self, RetainedReading};
use crate::persistence::{StoreError, patients};

/// A reading as the window keeps it: 100,000 live devices hold ten each, so the entry is
/// compact. The device id is the actor's own (not repeated), and absent vitals are NaN rather
/// than `Option<f64>` (8 bytes instead of 16; validated vitals are always finite).
#[derive(Clone, Debug)]
pub(super) struct WindowEntry {
    patient_id: Option<PatientId>,
    timestamp: DateTime<Utc>,
    vitals: [f64; 6],
    pub(super) location: Option<crate::domain::vitals::GeoPoint>,
    steps: Option<u32>,
    fall_detected: bool,
    moving: Option<bool>,
    on_oxygen: Option<bool>,
    consciousness: Option<crate::domain::vitals::Consciousness>,
}

impl WindowEntry {
    pub(super) fn new(r: &Reading) -> Self {
        let v = |x: Option<f64>| x.unwrap_or(f64::NAN);
        Self {
            patient_id: r.patient_id.clone(),
            timestamp: r.timestamp,
            vitals: [
                v(r.heart_rate_bpm),
                v(r.spo2_pct),
                v(r.respiration_rate_bpm),
                v(r.body_temp_c),
                v(r.systolic_bp_mmhg),
                v(r.diastolic_bp_mmhg),
            ],
            location: r.location,
            steps: r.steps,
            fall_detected: r.fall_detected,
            moving: r.moving,
            on_oxygen: r.on_oxygen,
            consciousness: r.consciousness,
        }
    }

    /// The reading as it arrived from `device`.
    fn reading(&self, device: &DeviceId) -> Reading {
        let v = |i: usize| Some(self.vitals[i]).filter(|x| !x.is_nan());
        Reading {
            device_id: device.clone(),
            patient_id: self.patient_id.clone(),
            timestamp: self.timestamp,
            heart_rate_bpm: v(0),
            spo2_pct: v(1),
            respiration_rate_bpm: v(2),
            body_temp_c: v(3),
            systolic_bp_mmhg: v(4),
            diastolic_bp_mmhg: v(5),
            fall_detected: self.fall_detected,
            moving: self.moving,
            on_oxygen: self.on_oxygen,
            consciousness: self.consciousness,
            location: self.location,
            steps: self.steps,
        }
    }
}

pub(super) fn evidence(window: &VecDeque<WindowEntry>, device: &DeviceId) -> Vec<Reading> {
    window.iter().map(|e| e.reading(device)).collect()
}

/// What a batch of readings did to a device: the answer for each, the status changes to
/// store, the emergencies to hand off (with their slot in the answers), the readings to
/// retain, and whether any was in order (the fall timer is re-armed then).
pub(super) struct Batch {
    pub(super) outcomes: Vec<(usize, ReadingOutcome)>,
    /// Each applied reading's fingerprint and answer, remembered once the batch is stored.
    pub(super) applied: Vec<(u64, TriageStatus)>,
    pub(super) changes: Vec<Change>,
    pub(super) handoffs: Vec<(usize, EmergencyDetected)>,
    pub(super) evidence_rows: Vec<RetainedReading>,
    pub(super) any_in_order: bool,
    /// Whether the fall watch started, stood down or escalated (it is stored then).
    pub(super) fall_changed: bool,
}

/// Triages `readings` (in request order) and applies the in-order ones to `live`; a reading
/// from an earlier second is answered but never rolls the state back.
// Long on purpose: the per-reading triage loop of the ingest hot path; one pass, no
// extra allocations per reading.
pub(super) fn take_readings(
    live: &mut Live,
    id: &DeviceId,
    runtime: &TriageRuntime,
    readings: Vec<(usize, Reading)>,
    now: DateTime<Utc>,
) -> Batch {
    let patient_id = live.patient_id.clone();
    let retention = runtime.retention;
    let mut outcomes = Vec::with_capacity(readings.len());
    let mut changes = Vec::new();
    let mut handoffs = Vec::new();
    let mut evidence_rows = Vec::new();
    let mut any_in_order = false;
    let mut applied = Vec::with_capacity(readings.len());
    let fall_before = live.fall.active();
    let rules = &runtime.rules;
    let scored: Vec<Scored> = readings
        .into_iter()
        .map(|(index, reading)| Scored::new(rules, index, reading))
        .collect();
    for scored in &scored {
        if scored
            .reading
            .patient_id
            .as_ref()
            .is_some_and(|p| *p != patient_id)
        {
            outcomes.push((scored.index, ReadingOutcome::PatientMismatch));
            continue;
        }
        let print = scored.reading.fingerprint();
        if let Some(status) = live.recent.answered(print) {
            // Delivered again (a broker's redelivery, a client's retry): answered as before,
            // nothing applied or stored.
            metrics::counter!("shers_readings_repeated_total").increment(1);
            outcomes.push((
                scored.index,
                ReadingOutcome::Accepted(Accepted {
                    device_id: id.clone(),
                    patient_id: patient_id.clone(),
                    status,
                    reasons: scored.assessment.reasons.clone(),
                    news2: scored.assessment.news2.clone(),
                    incident_id: None,
                }),
            ));
            continue;
        }
        let in_order = in_arrival_order(live.last_measured, scored.reading.timestamp);
        let (status, reasons) = if in_order {
            any_in_order = true;
            let (status, reasons, change) = DeviceActor::apply(live, scored, now);
            let onset = change.is_some();
            if let Some(change) = change {
                changes.push(change);
            }
            if status == TriageStatus::Emergency {
                handoffs.push((
                    outcomes.len(),
                    EmergencyDetected {
                        patient_id: patient_id.clone(),
                        device_id: id.clone(),
                        location: scored.reading.location,
                        reasons: reasons.clone(),
                        evidence: evidence(&live.window, id),
                        detected_at: scored.reading.timestamp,
                        onset,
                    },
                ));
            }
            (status, reasons)
        } else {
            // Out of order: answered, never allowed to roll the state back.
            (scored.assessment.status, scored.assessment.reasons.clone())
        };
        if retention == Retention::All {
            let mut row = retained(&scored.reading, &patient_id, status, now);
            row.news2_score = Some(i32::from(scored.assessment.news2.score));
            evidence_rows.push(row);
        }
        applied.push((print, status));
        outcomes.push((
            scored.index,
            ReadingOutcome::Accepted(Accepted {
                device_id: id.clone(),
                patient_id: patient_id.clone(),
                status,
                reasons,
                news2: scored.assessment.news2.clone(),
                incident_id: None,
            }),
        ));
    }
    if retention == Retention::Evidence {
        for change in &changes {
            for r in &change.evidence {
                evidence_rows.push(retained(r, &patient_id, change.to, now));
            }
        }
    }
    Batch {
        outcomes,
        applied,
        changes,
        handoffs,
        evidence_rows,
        any_in_order,
        fall_changed: live.fall.active() != fall_before,
    }
}

/// The fingerprints of a device's last stored readings and how each was answered: a repeated
/// delivery is answered as before and applies nothing (and, with `raw_retention = "all"`, is
/// not stored again). It remembers the last [`TriageRuntime::repeat_window`] readings: at
/// least as many as a broker can redeliver after a lost connection (each delivery applied
/// whose acknowledgement was lost). Kept in memory only: a successor actor (after a restart or
/// a failed store) applies a repeat again, which changes no status it already stored.
///
/// [`TriageRuntime::repeat_window`]: super::TriageRuntime::repeat_window
#[derive(Debug, Default)]
pub(super) struct Recent {
    /// Oldest first until full, then a ring from `next`: each entry a fingerprint whose two
    /// low bits are replaced by the answer (8 bytes a reading: a device actor stays small).
    seen: Vec<u64>,
    next: usize,
}

impl Recent {
    const STATUS: u64 = 0b11;

    fn code(status: TriageStatus) -> u64 {
        match status {
            TriageStatus::Normal => 0,
            TriageStatus::Abnormal => 1,
            TriageStatus::Emergency => 2,
        }
    }

    /// How `print`'s reading was answered, if it is one of the last stored.
    pub(super) fn answered(&self, print: u64) -> Option<TriageStatus> {
        let key = print & !Self::STATUS;
        self.seen
            .iter()
            .find(|&&entry| entry & !Self::STATUS == key)
            .map(|&entry| match entry & Self::STATUS {
                0 => TriageStatus::Normal,
                1 => TriageStatus::Abnormal,
                _ => TriageStatus::Emergency,
            })
    }

    /// Remembers a stored reading, forgetting the oldest beyond `window` readings.
    pub(super) fn remember(&mut self, print: u64, status: TriageStatus, window: usize) {
        let entry = (print & !Self::STATUS) | Self::code(status);
        let window = window.max(1);
        if self.seen.len() < window {
            if self.seen.capacity() == 0 {
                self.seen.reserve_exact(window);
            }
            self.seen.push(entry);
        } else {
            let at = self.next % self.seen.len();
            self.seen[at] = entry;
            self.next = (at + 1) % self.seen.len();
        }
    }
}

/// Waits for the change before this one to be stored; an error if it was not (the actor is
/// stopping, and its successor reloads the stored state).
pub(super) async fn in_line(before: Option<oneshot::Receiver<bool>>) -> Result<(), StoreError> {
    match before {
        None => Ok(()),
        Some(stored) => match stored.await {
            Ok(true) => Ok(()),
            _ => Err(StoreError::Unavailable(
                "an earlier change of this device was not stored".into(),
            )),
        },
    }
}

pub(super) fn retained(
    reading: &Reading,
    patient_id: &PatientId,
    status: TriageStatus,
    now: DateTime<Utc>,
) -> RetainedReading {
    RetainedReading {
        device_id: reading.device_id.clone(),
        patient_id: patient_id.clone(),
        measured_at: reading.timestamp,
        received_at: now,
        status: status.as_str(),
        news2_score: None,
        reading: serde_json::to_string(reading).unwrap_or_default(),
    }
}

/// The device's row after a change: what a restarted actor (or the next holder of its shard)
/// resumes from.
pub(super) struct Projected {
    pub(super) status: TriageStatus,
    pub(super) last_seen: DateTime<Utc>,
    pub(super) fall: Option<FallWatchState>,
}

/// Appends `leading` events, then the status events, and updates the device projection (and
/// evidence readings) in one transaction.
pub(super) async fn persist_changes(
    writer: &GroupCommit,
    device_id: DeviceId,
    patient_id: PatientId,
    (leading, changes): (Vec<NewEvent>, Vec<Change>),
    evidence: Vec<RetainedReading>,
    projected: Projected,
) -> Result<(), StoreError> {
    let Projected {
        status: final_status,
        last_seen,
        fall,
    } = projected;
    let stream = format!("device-{device_id}");
    let events: Vec<NewEvent> = leading
        .into_iter()
        .chain(changes.into_iter().map(|c| {
            DeviceEvent::StatusChanged {
                device_id: device_id.clone(),
                patient_id: patient_id.clone(),
                from: c.from,
                to: c.to,
                reasons: c.reasons,
                measured_at: c.measured_at,
                evidence: c.evidence,
            }
            .to_new()
        }))
        .collect();
    // Batched with the batch's other unit and device appends (see `GroupCommit::append`).
    let projection: Projection = Box::new(move |tx| {
        // It may run twice (a replayed batch): each run gets its own copies.
        let (device_id, evidence) = (device_id.clone(), evidence.clone());
        Box::pin(async move {
            patients::set_device_status(tx, &device_id, final_status.as_str(), last_seen, fall)
                .await?;
            if !evidence.is_empty() {
                readings::insert_many(tx, &evidence).await?;
            }
            Ok(())
        })
    });
    writer.append(&stream, events, None, Some(projection)).await
}
