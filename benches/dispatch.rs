//! Candidate search among 10,000 units: R-tree nearest-k plus the straight-line shortlist.
//!
//! `cargo bench --bench dispatch`
#![allow(missing_docs)] // `criterion_group!` generates an undocumented function

use std::collections::HashSet;
use std::hint::black_box;

use chrono::{DateTime, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use shers::domain::dispatch::{
    CandidateQuery, Capability, FleetIndex, UnitSnapshot, UnitStatus, shortlist,
};
use shers::domain::geo::LatLng;
use shers::domain::ids::UnitId;
use shers::domain::incident::Priority;

fn now() -> DateTime<Utc> {
    "2026-11-23T08:00:00Z".parse().unwrap_or_default()
}

/// 10,000 units spread over a 60 km square around London; a third busy.
fn fleet() -> Vec<UnitSnapshot> {
    let mut seed: u64 = 42;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..10_000)
        .map(|i| UnitSnapshot {
            id: UnitId(format!("U{i:05}")),
            capability: if i % 3 == 0 {
                Capability::Als
            } else {
                Capability::Bls
            },
            status: if i % 3 == 1 {
                UnitStatus::Assigned
            } else {
                UnitStatus::Available
            },
            position: LatLng {
                lat: 51.2 + next() * 0.6,
                lng: -0.6 + next() * 1.0,
            },
            fix_at: now(),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let units = fleet();
    let by_id: std::collections::HashMap<UnitId, &UnitSnapshot> =
        units.iter().map(|u| (u.id.clone(), u)).collect();
    let index = FleetIndex::from_positions(units.iter().map(|u| (&u.id, u.position)));
    let exclude = HashSet::new();
    let scene = LatLng {
        lat: 51.5,
        lng: -0.12,
    };
    c.bench_function("nearest-5 available of 10k (R-tree + shortlist)", |b| {
        b.iter(|| {
            let q = CandidateQuery::new(black_box(scene), now(), &exclude, Priority::Emergency);
            let near = index.nearest(&q.scene, q.shortlist, |id| {
                by_id.get(id).is_some_and(|u| q.accepts(u))
            });
            let snaps: Vec<&UnitSnapshot> = near
                .iter()
                .filter_map(|id| by_id.get(id).copied())
                .collect();
            black_box(shortlist(snaps, &q))
        })
    });
    c.bench_function("linear scan shortlist of 10k (baseline)", |b| {
        b.iter(|| {
            let q = CandidateQuery::new(black_box(scene), now(), &exclude, Priority::Emergency);
            black_box(shortlist(units.iter(), &q))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
