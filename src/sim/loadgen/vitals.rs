//! Ingest bodies built once and reused: each batch is serialised up front with fixed-width
//! timestamp slots that are overwritten with the send time, so sending a batch costs one copy,
//! not a serialisation. Also the single emergency and reset readings of detect-to-offer.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

use super::fixtures::{Point, Wearer};
use crate::sim::rng::SimRng;

/// `2026-11-23T08:00:00.123Z`: the width of every timestamp slot.
const STAMP_LEN: usize = 24;

/// One serialised `{readings: [..]}` body with the offsets of its timestamp slots.
#[derive(Clone, Debug)]
pub struct BatchTemplate {
    bytes: Vec<u8>,
    stamps: Vec<usize>,
    readings: usize,
}

/// The vital signs of one simulated wearer.
#[derive(Clone, Copy, Debug)]
struct Vitals {
    heart_rate: u32,
    spo2: u32,
    respiration: u32,
    temp_tenths: u32,
}

impl Vitals {
    /// Healthy adult at rest: normal by every threshold rule and NEWS2 0.
    fn normal(rng: &mut SimRng) -> Self {
        Self {
            heart_rate: 62 + rng.index(27) as u32,
            spo2: 96 + rng.index(4) as u32,
            respiration: 12 + rng.index(7) as u32,
            temp_tenths: 364 + rng.index(9) as u32,
        }
    }

    /// Resting tachycardia: `abnormal` (heart rate > 100), far from an emergency.
    fn abnormal(rng: &mut SimRng) -> Self {
        Self {
            heart_rate: 104 + rng.index(5) as u32,
            ..Self::normal(rng)
        }
    }
}

impl BatchTemplate {
    /// A batch of one reading per wearer in `wearers`; `abnormal_share` (0–1) of them abnormal.
    pub fn new(wearers: &[Wearer], rng: &mut SimRng, abnormal_share: f64) -> Self {
        let mut bytes = Vec::with_capacity(wearers.len() * 150 + 16);
        let mut stamps = Vec::with_capacity(wearers.len());
        bytes.extend_from_slice(b"{\"readings\":[");
        for (i, w) in wearers.iter().enumerate() {
            let v = if rng.range(0.0, 1.0) < abnormal_share {
                Vitals::abnormal(rng)
            } else {
                Vitals::normal(rng)
            };
            if i > 0 {
                bytes.push(b',');
            }
            bytes.extend_from_slice(b"{\"device_id\":");
            bytes.extend_from_slice(json!(w.device_id).to_string().as_bytes());
            bytes.extend_from_slice(b",\"timestamp\":\"");
            stamps.push(bytes.len());
            bytes.extend_from_slice(&[b'0'; STAMP_LEN]);
            bytes.extend_from_slice(
                format!(
                    "\",\"heart_rate_bpm\":{},\"spo2_pct\":{},\"respiration_rate_bpm\":{},\"body_temp_c\":{}.{},\"moving\":true}}",
                    v.heart_rate,
                    v.spo2,
                    v.respiration,
                    v.temp_tenths / 10,
                    v.temp_tenths % 10
                )
                .as_bytes(),
            );
        }
        bytes.extend_from_slice(b"]}");
        Self {
            bytes,
            stamps,
            readings: wearers.len(),
        }
    }

    /// Readings in the batch.
    pub fn readings(&self) -> usize {
        self.readings
    }

    /// The body with every reading stamped `at`.
    pub fn render(&self, at: DateTime<Utc>) -> Vec<u8> {
        let stamp = at.to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut body = self.bytes.clone();
        if stamp.len() == STAMP_LEN {
            for &offset in &self.stamps {
                body[offset..offset + STAMP_LEN].copy_from_slice(stamp.as_bytes());
            }
        }
        body
    }
}

/// Splits `wearers` into batch templates of at most `batch` readings.
pub fn templates(
    wearers: &[Wearer],
    batch: usize,
    rng: &mut SimRng,
    abnormal_share: f64,
) -> Vec<BatchTemplate> {
    wearers
        .chunks(batch.max(1))
        .map(|chunk| BatchTemplate::new(chunk, rng, abnormal_share))
        .collect()
}

/// The pace at which `templates` must be sent for every device to report at `hz`: the
/// interval between consecutive batches.
pub fn batch_interval(templates: &[BatchTemplate], hz: f64) -> Duration {
    let readings: usize = templates.iter().map(BatchTemplate::readings).sum();
    let batches_per_s = hz * templates.len() as f64;
    if readings == 0 || batches_per_s <= 0.0 {
        return Duration::from_secs(1);
    }
    Duration::from_secs_f64(1.0 / batches_per_s)
}

/// One reading that triage calls an emergency (heart rate 170, SpO2 85), located at `at`.
pub fn emergency(device_id: &str, at: Point) -> Vec<u8> {
    json!({"device_id": device_id, "timestamp": now_stamp(),
           "heart_rate_bpm": 170, "spo2_pct": 85, "respiration_rate_bpm": 28,
           "location": at.json()})
    .to_string()
    .into_bytes()
}

/// One normal reading (returns the wearer's status to normal after an emergency).
pub fn normal(device_id: &str) -> Vec<u8> {
    json!({"device_id": device_id, "timestamp": now_stamp(),
           "heart_rate_bpm": 72, "spo2_pct": 98, "respiration_rate_bpm": 14,
           "body_temp_c": 36.8, "moving": true})
    .to_string()
    .into_bytes()
}

fn now_stamp() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::{DeviceId, PatientId};

    fn wearers(n: usize) -> Vec<Wearer> {
        (0..n)
            .map(|i| Wearer {
                device_id: DeviceId(format!("d{i}")),
                patient_id: PatientId(format!("p{i}")),
            })
            .collect()
    }

    #[test]
    fn rendered_batches_are_valid_ingest_bodies_with_the_send_time() {
        let mut rng = SimRng::new(1);
        let t = BatchTemplate::new(&wearers(3), &mut rng, 0.0);
        let at = DateTime::parse_from_rfc3339("2026-11-23T08:00:00.123Z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&t.render(at)).unwrap_or_default();
        let readings = body["readings"].as_array().cloned().unwrap_or_default();
        assert_eq!(readings.len(), 3);
        for (i, r) in readings.iter().enumerate() {
            assert_eq!(r["device_id"], format!("d{i}").as_str());
            assert_eq!(r["timestamp"], "2026-11-23T08:00:00.123Z");
            let hr = r["heart_rate_bpm"].as_u64().unwrap_or(0);
            assert!((50..=100).contains(&hr), "normal heart rate: {hr}");
            let temp = r["body_temp_c"].as_f64().unwrap_or(0.0);
            assert!((36.0..=37.5).contains(&temp), "normal temperature: {temp}");
        }
    }

    #[test]
    fn chunks_and_pace() {
        let mut rng = SimRng::new(2);
        let ts = templates(&wearers(1200), 500, &mut rng, 0.01);
        assert_eq!(
            ts.iter().map(BatchTemplate::readings).collect::<Vec<_>>(),
            [500, 500, 200]
        );
        // Three batches per cycle, ten cycles a second.
        let interval = batch_interval(&ts, 10.0);
        assert!((interval.as_secs_f64() - 1.0 / 30.0).abs() < 1e-9);
    }
}
