//! What the bus scenarios share: message bodies built once with timestamp slots, the paced
//! schedule, and the server's `/metrics` counters, read with the admin token, which tell when
//! the server has applied what the brokers took (a broker's acknowledgement to a publisher
//! says only that the broker has the message).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use reqwest::header::AUTHORIZATION;
use serde_json::json;

use super::fixtures::Wearer;
use crate::sim::client::Api;
use crate::sim::rng::SimRng;

/// How long the server may go without applying anything more before a drain gives up.
const STALL: Duration = Duration::from_secs(20);
/// Between two reads of `/metrics` while waiting for a drain.
const POLL: Duration = Duration::from_millis(100);

/// How a timestamp slot is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stamp {
    /// Epoch milliseconds, 13 digits (SHERS's wearable `timestamp`).
    EpochMs,
    /// RFC 3339 with milliseconds and `Z`, quoted by the template (native readings).
    Rfc3339,
}

impl Stamp {
    fn width(self) -> usize {
        match self {
            Self::EpochMs => 13,
            Self::Rfc3339 => 24,
        }
    }

    fn write(self, at: DateTime<Utc>) -> String {
        match self {
            Self::EpochMs => format!("{:013}", at.timestamp_millis()),
            Self::Rfc3339 => at.to_rfc3339_opts(SecondsFormat::Millis, true),
        }
    }
}

/// One serialised message body with timestamp slots, each written at send time as the send
/// time minus the slot's offset (so several readings of one device get distinct times).
#[derive(Clone, Debug)]
pub struct Stamped {
    bytes: Vec<u8>,
    /// (byte offset, milliseconds before the send time).
    slots: Vec<(usize, i64)>,
    stamp: Stamp,
    readings: usize,
    /// Where the message goes (an MQTT topic); empty when the scenario decides.
    pub topic: String,
}

impl Stamped {
    /// Readings in the message.
    pub fn readings(&self) -> usize {
        self.readings
    }

    /// The body with every slot written for a send at `at`.
    pub fn render(&self, at: DateTime<Utc>) -> Vec<u8> {
        let mut body = self.bytes.clone();
        let width = self.stamp.width();
        for &(offset, before_ms) in &self.slots {
            let text = self.stamp.write(at - TimeDelta::milliseconds(before_ms));
            if text.len() == width
                && let Some(slot) = body.get_mut(offset..offset + width)
            {
                slot.copy_from_slice(text.as_bytes());
            }
        }
        body
    }
}

/// Builds a [`Stamped`] piece by piece.
struct Builder {
    out: Stamped,
}

impl Builder {
    fn new(stamp: Stamp) -> Self {
        Self {
            out: Stamped {
                bytes: Vec::with_capacity(256),
                slots: Vec::new(),
                stamp,
                readings: 0,
                topic: String::new(),
            },
        }
    }

    fn text(&mut self, s: &str) {
        self.out.bytes.extend_from_slice(s.as_bytes());
    }

    fn slot(&mut self, before_ms: i64) {
        self.out.slots.push((self.out.bytes.len(), before_ms));
        let width = self.out.stamp.width();
        self.out.bytes.extend(std::iter::repeat_n(b'0', width));
    }

    /// One SHERS wearable message (interop.md §1), normal vitals.
    fn shers(&mut self, w: &Wearer, rng: &mut SimRng) {
        self.text(&format!(
            "{{\"patient_id\":{},\"device\":{{\"id\":{},\"model\":\"HealthTracker v1\"}},\
             \"location\":{{\"lat\":51.5003,\"lng\":-0.1201}},\"schemaVersion\":\"1.0\",\"timestamp\":",
            json!(w.patient_id),
            json!(w.device_id)
        ));
        self.slot(0);
        self.text(&format!(
            ",\"metrics\":{{\"heartRateBpm\":{},\"spO2Percentage\":{}.{},\"respirationRateBpm\":{},\
             \"bodyTemperatureCelsius\":36.{},\"stepsSinceLastReading\":{}}}}}",
            62 + rng.index(27),
            96 + rng.index(4),
            rng.index(10),
            12 + rng.index(7),
            4 + rng.index(9),
            rng.index(40)
        ));
        self.out.readings += 1;
    }

    /// One native reading of `device`, normal vitals, `before_ms` before the send time.
    fn native(&mut self, device: &Wearer, before_ms: i64, rng: &mut SimRng) {
        self.text(&format!(
            "{{\"device_id\":{},\"timestamp\":\"",
            json!(device.device_id)
        ));
        self.slot(before_ms);
        self.text(&format!(
            "\",\"heart_rate_bpm\":{},\"spo2_pct\":{},\"respiration_rate_bpm\":{},\"body_temp_c\":36.{},\"moving\":true}}",
            62 + rng.index(27),
            96 + rng.index(4),
            12 + rng.index(7),
            4 + rng.index(9)
        ));
        self.out.readings += 1;
    }

    fn done(self) -> Stamped {
        self.out
    }
}

/// AMQP bodies: with `batch` 1 one SHERS wearable message per wearer, exactly as SHERS's
/// wearable service publishes it; otherwise `{"readings":[…]}` of `batch` wearers' messages
/// (a gateway's batch).
pub fn shers_messages(wearers: &[Wearer], batch: usize, rng: &mut SimRng) -> Vec<Stamped> {
    if batch <= 1 {
        return wearers
            .iter()
            .map(|w| {
                let mut b = Builder::new(Stamp::EpochMs);
                b.shers(w, rng);
                b.done()
            })
            .collect();
    }
    wearers
        .chunks(batch)
        .map(|chunk| {
            let mut b = Builder::new(Stamp::EpochMs);
            b.text("{\"readings\":[");
            for (i, w) in chunk.iter().enumerate() {
                if i > 0 {
                    b.text(",");
                }
                b.shers(w, rng);
            }
            b.text("]}");
            b.done()
        })
        .collect()
}

/// MQTT messages, one per wearer on `<prefix>/<device>/vitals`: with `batch` 1 a single native
/// reading; otherwise `{"readings":[…]}` of `batch` readings of that device 10 ms apart (a
/// device uploading what it buffered: the topic's device is the identity, so a message never
/// carries another device's readings).
pub fn mqtt_messages(
    wearers: &[Wearer],
    prefix: &str,
    batch: usize,
    rng: &mut SimRng,
) -> Vec<Stamped> {
    wearers
        .iter()
        .map(|w| {
            let mut b = Builder::new(Stamp::Rfc3339);
            if batch <= 1 {
                b.native(w, 0, rng);
            } else {
                b.text("{\"readings\":[");
                for i in 0..batch {
                    if i > 0 {
                        b.text(",");
                    }
                    let before = i64::try_from((batch - 1 - i) * 10).unwrap_or(0);
                    b.native(w, before, rng);
                }
                b.text("]}");
            }
            let mut m = b.done();
            m.topic = format!("{prefix}/{}/vitals", w.device_id);
            m
        })
        .collect()
}

/// The send schedule: message `n` is due at `start + n × interval`; flat out, all are due.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// When message 0 is due.
    pub start: Instant,
    /// Between two messages; `None` sends flat out.
    pub interval: Option<Duration>,
}

impl Schedule {
    /// `readings_per_s` offered in messages of `readings_per_message` (flat out when the rate
    /// is 0 or less).
    pub fn new(readings_per_s: f64, readings_per_message: f64) -> Self {
        let interval = (readings_per_s > 0.0 && readings_per_message > 0.0)
            .then(|| Duration::from_secs_f64(readings_per_message / readings_per_s));
        Self {
            start: Instant::now(),
            interval,
        }
    }

    /// When message `n` is due.
    pub fn due(&self, n: u64) -> Instant {
        match self.interval {
            Some(i) => self.start + i.mul_f64(n as f64),
            None => self.start,
        }
    }
}

/// The sum of every series of the counter `name` in a Prometheus text exposition (all label
/// sets), 0 when absent.
pub fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            // `name` exactly: followed by labels or the value, not a longer name.
            let rest = if let Some(labelled) = rest.strip_prefix('{') {
                labelled.split_once('}')?.1
            } else {
                rest
            };
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// The server's `/metrics` text (admin token).
pub async fn scrape(admin: &Api) -> anyhow::Result<String> {
    let resp = admin
        .http()
        .get(format!("{}/metrics", admin.base_url()))
        .header(AUTHORIZATION, format!("Bearer {}", admin.token()))
        .send()
        .await
        .context("GET /metrics")?;
    if !resp.status().is_success() {
        anyhow::bail!("GET /metrics answered {}", resp.status());
    }
    resp.text().await.context("reading /metrics")
}

/// The sum of `names` (counters) on the server now.
pub async fn counters(admin: &Api, names: &[&str]) -> anyhow::Result<f64> {
    let text = scrape(admin).await?;
    Ok(names.iter().map(|n| counter(&text, n)).sum())
}

/// Waits until the counters `names` have grown by `expected` from `baseline`, or stop
/// growing for [`STALL`]. Returns how far they grew and when they last grew.
pub async fn drain(
    admin: &Api,
    names: &[&str],
    baseline: f64,
    expected: f64,
) -> anyhow::Result<(f64, Instant)> {
    let mut last = counters(admin, names).await? - baseline;
    let mut last_at = Instant::now();
    while last < expected && last_at.elapsed() < STALL {
        tokio::time::sleep(POLL).await;
        let now = counters(admin, names).await? - baseline;
        if now > last {
            last = now;
            last_at = Instant::now();
        }
    }
    Ok((last, last_at))
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

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T08:00:00.123Z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn shers_messages_are_the_wearable_shape_stamped_in_epoch_ms() {
        let mut rng = SimRng::new(1);
        let single = shers_messages(&wearers(2), 1, &mut rng);
        assert_eq!(single.len(), 2);
        let v: serde_json::Value =
            serde_json::from_slice(&single[1].render(at())).unwrap_or_default();
        assert_eq!(v["patient_id"], "p1");
        assert_eq!(v["device"]["id"], "d1");
        assert_eq!(v["schemaVersion"], "1.0");
        assert_eq!(v["timestamp"], at().timestamp_millis());
        assert!(v["metrics"]["heartRateBpm"].is_u64(), "{v}");

        let batches = shers_messages(&wearers(5), 2, &mut rng);
        assert_eq!(
            batches.iter().map(Stamped::readings).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        let v: serde_json::Value =
            serde_json::from_slice(&batches[0].render(at())).unwrap_or_default();
        assert_eq!(v["readings"][1]["device"]["id"], "d1");
        assert_eq!(v["readings"][1]["timestamp"], at().timestamp_millis());
    }

    #[test]
    fn mqtt_batches_hold_one_device_at_distinct_times() {
        let mut rng = SimRng::new(2);
        let ms = mqtt_messages(&wearers(2), "pre/fix", 3, &mut rng);
        assert_eq!(ms[1].topic, "pre/fix/d1/vitals");
        assert_eq!(ms[1].readings(), 3);
        let v: serde_json::Value = serde_json::from_slice(&ms[1].render(at())).unwrap_or_default();
        let stamps: Vec<&str> = v["readings"]
            .as_array()
            .map(|r| r.iter().filter_map(|r| r["timestamp"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            stamps,
            [
                "2026-11-23T08:00:00.103Z",
                "2026-11-23T08:00:00.113Z",
                "2026-11-23T08:00:00.123Z"
            ]
        );
        assert!(
            v["readings"]
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["device_id"] == "d1"))
        );
        let single = mqtt_messages(&wearers(1), "p", 1, &mut rng);
        let v: serde_json::Value =
            serde_json::from_slice(&single[0].render(at())).unwrap_or_default();
        assert_eq!(v["timestamp"], "2026-11-23T08:00:00.123Z");
    }

    #[test]
    fn counters_sum_label_sets_and_ignore_longer_names() {
        let text = "# TYPE shers_amqp_consumed_total counter\n\
                    shers_amqp_consumed_total 42\n\
                    shers_amqp_consumed_total_extra 7\n\
                    shers_mqtt_consumed_total{kind=\"vitals\"} 10\n\
                    shers_mqtt_consumed_total{kind=\"status\"} 2\n";
        assert_eq!(counter(text, "shers_amqp_consumed_total"), 42.0);
        assert_eq!(counter(text, "shers_mqtt_consumed_total"), 12.0);
        assert_eq!(counter(text, "shers_nothing"), 0.0);
    }

    #[test]
    fn schedules_pace_or_go_flat_out() {
        let s = Schedule::new(1000.0, 10.0);
        assert_eq!(s.due(5) - s.start, Duration::from_millis(50));
        let flat = Schedule::new(0.0, 10.0);
        assert_eq!(flat.due(1_000), flat.start);
    }
}
