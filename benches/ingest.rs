//! Ingest hot path: request bytes → parsed, validated and triaged readings.
//!
//! `cargo bench --bench ingest`; divide the batch figure by its size for the per-reading cost.
#![allow(missing_docs)] // `criterion_group!` generates an undocumented function

use chrono::{DateTime, Utc};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};
use shers::domain::triage::{TriageRules, assess};
use shers::domain::vitals::{IngestLimits, parse_body};
use std::hint::black_box;

fn now() -> DateTime<Utc> {
    "2026-11-23T08:05:00Z".parse().unwrap_or_default()
}

/// A realistic native reading; every fifth one abnormal, every tenth in the legacy shape.
fn reading(i: usize) -> Value {
    let hr = if i.is_multiple_of(5) {
        128.5
    } else {
        72.0 + (i % 7) as f64
    };
    if i % 10 == 3 {
        return json!({
            "patient_id": format!("patient-{i}"),
            "device": {"id": format!("watch-{i:06}"), "model": "W-2"},
            "location": {"lat": 51.5 + i as f64 * 1e-4, "lng": -0.12},
            "timestamp": 1_795_420_800_000_i64 + i as i64,
            "metrics": {"heartRateBpm": hr, "spO2Percentage": 97, "respirationRateBpm": 16,
                        "bodyTemperatureCelsius": 36.8, "stepsSinceLastReading": 12},
        });
    }
    json!({
        "device_id": format!("watch-{i:06}"),
        "patient_id": format!("patient-{i}"),
        "timestamp": "2026-11-23T08:00:00.250Z",
        "heart_rate_bpm": hr,
        "spo2_pct": 96.5,
        "respiration_rate_bpm": 16,
        "body_temp_c": 36.9,
        "fall_detected": false,
        "moving": true,
        "location": {"lat": 51.5 + i as f64 * 1e-4, "lng": -0.12, "accuracy_m": 8.0},
    })
}

fn fhir_bundle(n: usize) -> Value {
    let entry: Vec<Value> = (0..n)
        .map(|i| {
            json!({"resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": format!("Patient/p-{i}")},
                "device": {"identifier": {"value": format!("watch-{i:06}")}},
                "effectiveDateTime": "2026-11-23T08:00:00Z",
                "valueQuantity": {"value": 72, "unit": "/min",
                                  "system": "http://unitsofmeasure.org", "code": "/min"},
            }})
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "collection", "entry": entry})
}

/// What the ingest handler does per body: parse, validate, triage every accepted reading.
fn ingest(body: &[u8], rules: &TriageRules, limits: &IngestLimits) -> usize {
    let Ok(parsed) = parse_body(body, now(), limits) else {
        return 0;
    };
    let mut assessed = 0;
    for reading in parsed
        .items
        .iter()
        .filter_map(|item| item.outcome.as_ref().ok())
    {
        black_box(assess(rules, reading));
        assessed += 1;
    }
    assessed
}

fn bench(c: &mut Criterion) {
    let rules = TriageRules::default();
    let limits = IngestLimits::default();
    let mut group = c.benchmark_group("ingest");

    let one = reading(1).to_string().into_bytes();
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_reading", |b| {
        b.iter(|| ingest(black_box(&one), &rules, &limits))
    });

    let batch = json!({"readings": (0..500).map(reading).collect::<Vec<_>>()})
        .to_string()
        .into_bytes();
    assert_eq!(ingest(&batch, &rules, &limits), 500, "every reading valid");
    group.throughput(Throughput::Elements(500));
    group.bench_function("batch_500", |b| {
        b.iter(|| ingest(black_box(&batch), &rules, &limits))
    });

    let bundle = fhir_bundle(100).to_string().into_bytes();
    assert_eq!(
        ingest(&bundle, &rules, &limits),
        100,
        "every observation valid"
    );
    group.throughput(Throughput::Elements(100));
    group.bench_function("fhir_bundle_100", |b| {
        b.iter(|| ingest(black_box(&bundle), &rules, &limits))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
