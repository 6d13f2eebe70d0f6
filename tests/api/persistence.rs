//! Persistence on both backends: migrations, the event store, tokens.

use chrono::Utc;
use serde_json::json;
use shers::domain::auth::Role;
use shers::domain::events::{ExpectedVersion, NewEvent};
use shers::domain::ids::IncidentId;
use shers::persistence::events::{self, AppendError};
use shers::persistence::{Backend, StoreError, migrations, tokens};

use crate::both_backends;
use crate::helpers::TestDb;

both_backends!(
    migrations_go_up_down_up,
    append_and_read_back,
    typed_ids_are_stored_as_the_text_they_always_were,
    append_conflicts_are_typed,
    a_conflict_inside_a_committed_transaction_leaves_no_gap,
    concurrent_appenders_exactly_one_wins,
    sequence_is_gap_free_under_concurrency,
    tokens_store_only_hashes,
    group_commit_shares_commits_and_isolates_a_failed_write,
    group_commit_appends_many_streams_with_their_projections,
    group_commit_saves_each_unit_once_with_its_latest_state,
    group_commit_positions_wait_for_company_and_keep_each_units_order,
    group_commit_never_acknowledges_a_write_it_lost,
    pipelined_statements_answer_together_and_refuse_write_transactions,
    group_commit_runs_a_lone_atomic_write_without_a_transaction,
    a_new_incident_is_one_statement_and_all_or_nothing,
);

/// The incident the events of [`event`] concern.
const INCIDENT_1: &str = "0190a1b2-0000-7000-8000-000000000001";

fn event(kind: &str, n: i64) -> NewEvent {
    let mut e = NewEvent::new(kind, json!({"n": n}));
    e.incident_id = INCIDENT_1.parse().ok();
    e
}

async fn migrations_go_up_down_up(backend: Backend) {
    let tdb = TestDb::new(backend).await;
    let db = tdb.connect().await;
    let mut conn = db.conn().await.unwrap();
    assert_eq!(
        migrations::missing(&mut conn).await.unwrap(),
        migrations::embedded_versions(&db)
    );
    let up = migrations::run_pending(&db, &tdb.url).await.unwrap();
    assert_eq!(up, migrations::embedded_versions(&db).len());
    assert!(migrations::missing(&mut conn).await.unwrap().is_empty());
    events::append(
        &mut conn,
        "s",
        ExpectedVersion::NoStream,
        &[event("a", 1)],
        Utc::now(),
    )
    .await
    .unwrap();

    let down = migrations::revert_all(&db, &tdb.url).await.unwrap();
    assert_eq!(down, up);
    assert!(
        events::read_stream(&mut conn, "s").await.is_err(),
        "tables are gone"
    );
    assert!(!migrations::missing(&mut conn).await.unwrap().is_empty());

    assert_eq!(migrations::run_pending(&db, &tdb.url).await.unwrap(), up);
    assert!(
        events::read_stream(&mut conn, "s")
            .await
            .unwrap()
            .is_empty()
    );
    // Running again is a no-op.
    assert_eq!(migrations::run_pending(&db, &tdb.url).await.unwrap(), 0);
}

/// The id columns of an event, as stored.
#[derive(diesel::QueryableByName, Debug, PartialEq)]
struct StoredIds {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    incident_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    unit_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    device_id: Option<String>,
}

/// Ids are typed in Rust and plain text in the database, as before they were typed: a UUID id
/// as its hyphenated lower-case form, a string id as itself. A stored value that is not the
/// kind of id its column holds (never written by SHERS) is reported as corrupt data.
async fn typed_ids_are_stored_as_the_text_they_always_were(backend: Backend) {
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let mut conn = db.conn().await.unwrap();
    let incident: IncidentId = "0190A1B2-0000-7000-8000-00000000000F".parse().unwrap();
    let mut e = NewEvent::new("dispatch.offer_accepted", json!({}));
    e.incident_id = Some(incident);
    e.unit_id = Some("M-1".into());
    e.device_id = Some("watch-1".into());
    let appended = events::append(&mut conn, "s", ExpectedVersion::Any, &[e], Utc::now())
        .await
        .unwrap();
    let query = "SELECT incident_id, unit_id, device_id FROM events WHERE stream_id = 's'";
    let stored: Vec<StoredIds> = shers::db_run!(&mut conn, |c| {
        diesel_async::RunQueryDsl::load(diesel::sql_query(query), c)
            .await
            .unwrap()
    });
    assert_eq!(
        stored,
        [StoredIds {
            incident_id: Some("0190a1b2-0000-7000-8000-00000000000f".into()),
            unit_id: Some("M-1".into()),
            device_id: Some("watch-1".into()),
        }]
    );
    let read = events::read_stream(&mut conn, "s").await.unwrap();
    assert_eq!(read, appended);
    assert_eq!(read[0].incident_id, Some(incident));

    let corrupt = "INSERT INTO events \
        (seq, stream_id, version, kind, incident_id, payload, recorded_at) \
        VALUES (1000, 'bad', 1, 'x', 'inc-1', '{}', '2026-12-05 08:00:00')";
    shers::db_run!(&mut conn, |c| {
        diesel_async::RunQueryDsl::execute(diesel::sql_query(corrupt), c)
            .await
            .unwrap()
    });
    let err = events::read_stream(&mut conn, "bad").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(m) if m.contains("incident id \"inc-1\"")),
        "{err:?}"
    );
}

async fn append_and_read_back(backend: Backend) {
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let mut conn = db.conn().await.unwrap();
    let now = Utc::now();
    let first = events::append(
        &mut conn,
        "incident-1",
        ExpectedVersion::NoStream,
        &[
            event("incident.created", 1),
            event("incident.status_changed", 2),
        ],
        now,
    )
    .await
    .unwrap();
    assert_eq!(
        first.iter().map(|e| (e.seq, e.version)).collect::<Vec<_>>(),
        [(1, 1), (2, 2)]
    );
    let other = events::append(
        &mut conn,
        "unit-7",
        ExpectedVersion::Any,
        &[event("unit.location", 3)],
        now,
    )
    .await
    .unwrap();
    assert_eq!((other[0].seq, other[0].version), (3, 1));
    let more = events::append(
        &mut conn,
        "incident-1",
        ExpectedVersion::Exact(2),
        &[event("incident.closed", 4)],
        now,
    )
    .await
    .unwrap();
    assert_eq!((more[0].seq, more[0].version), (4, 3));

    let stream = events::read_stream(&mut conn, "incident-1").await.unwrap();
    assert_eq!(stream.len(), 3);
    assert_eq!(stream[0].kind, "incident.created");
    assert_eq!(stream[0].data, json!({"n": 1}));
    assert_eq!(stream[0].incident_id, INCIDENT_1.parse().ok());
    assert_eq!(stream[0], first[0], "what append returns is what is stored");
    assert_eq!(
        stream.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2, 3]
    );

    let page = events::read_since(&mut conn, 1, 2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
    assert!(
        events::read_since(&mut conn, 4, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(events::last_seq(&mut conn).await.unwrap(), 4);
    // The console frame shape.
    let frame = serde_json::to_value(&stream[0]).unwrap();
    assert_eq!(frame["seq"], 1);
    assert_eq!(frame["kind"], "incident.created");
    assert!(frame.get("stream_id").is_none());
}

async fn append_conflicts_are_typed(backend: Backend) {
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let mut conn = db.conn().await.unwrap();
    let now = Utc::now();
    events::append(
        &mut conn,
        "s",
        ExpectedVersion::NoStream,
        &[event("a", 1)],
        now,
    )
    .await
    .unwrap();
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(0),
        ExpectedVersion::Exact(2),
    ] {
        match events::append(&mut conn, "s", expected, &[event("b", 2)], now).await {
            Err(AppendError::Conflict { stream, actual, .. }) => {
                assert_eq!(stream, "s");
                assert_eq!(actual, 1);
            }
            other => panic!("expected a conflict for {expected:?}, got {other:?}"),
        }
    }
    // A failed append leaves no trace and no gap in the sequence.
    let ok = events::append(
        &mut conn,
        "s",
        ExpectedVersion::Exact(1),
        &[event("c", 3)],
        now,
    )
    .await
    .unwrap();
    assert_eq!((ok[0].seq, ok[0].version), (2, 2));
}

/// An append that loses its version check inside a caller's transaction inserts nothing and
/// gives its sequence numbers back, so a caller that handles the conflict and commits other
/// work leaves the sequence gap-free (multi-event batches, where PostgreSQL inserts with one
/// statement).
async fn a_conflict_inside_a_committed_transaction_leaves_no_gap(backend: Backend) {
    use shers::persistence::StoreError;
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let mut conn = db.conn().await.unwrap();
    let now = Utc::now();
    let batch = [event("a", 1), event("a", 2), event("a", 3)];
    events::append(&mut conn, "s", ExpectedVersion::NoStream, &batch, now)
        .await
        .unwrap();
    let (lost, won) = conn
        .write_transaction(async |tx| {
            let lost = events::append(tx, "s", ExpectedVersion::Exact(1), &batch, now).await;
            let won = events::append(tx, "t", ExpectedVersion::NoStream, &batch, now).await;
            Ok::<_, StoreError>((lost, won))
        })
        .await
        .unwrap();
    match lost {
        Err(AppendError::Conflict { actual, .. }) => assert_eq!(actual, 3),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let won = won.unwrap();
    assert_eq!(
        won.iter().map(|e| (e.seq, e.version)).collect::<Vec<_>>(),
        [(4, 1), (5, 2), (6, 3)]
    );
    let all = events::read_since(&mut conn, 0, 100).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|e| (e.seq, e.stream_id.as_str(), e.version))
            .collect::<Vec<_>>(),
        [
            (1, "s", 1),
            (2, "s", 2),
            (3, "s", 3),
            (4, "t", 1),
            (5, "t", 2),
            (6, "t", 3)
        ]
    );
    assert_eq!(events::last_seq(&mut conn).await.unwrap(), 6);
}

async fn concurrent_appenders_exactly_one_wins(backend: Backend) {
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    for round in 0..10_i64 {
        let stream = format!("race-{round}");
        let mut a = db.conn().await.unwrap();
        let mut b = db.conn().await.unwrap();
        let now = Utc::now();
        let ea = [event("offer.accepted", 1)];
        let eb = [event("offer.accepted", 2)];
        let (ra, rb) = futures_util::join!(
            events::append(&mut a, &stream, ExpectedVersion::NoStream, &ea, now),
            events::append(&mut b, &stream, ExpectedVersion::NoStream, &eb, now),
        );
        let wins = [ra.is_ok(), rb.is_ok()].iter().filter(|w| **w).count();
        assert_eq!(wins, 1, "round {round}: {ra:?} / {rb:?}");
        let loser = if ra.is_ok() { rb } else { ra };
        assert!(
            matches!(loser, Err(AppendError::Conflict { .. })),
            "{loser:?}"
        );
        let stored = events::read_stream(&mut a, &stream).await.unwrap();
        assert_eq!(stored.len(), 1);
    }
}

async fn sequence_is_gap_free_under_concurrency(backend: Backend) {
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let tasks: Vec<_> = (0..24_i64)
        .map(|i| {
            let db = db.clone();
            actix_web::rt::spawn(async move {
                let mut conn = db.conn().await.unwrap();
                // Half of them collide on one stream and some lose; losers must leave no gap.
                let stream = if i % 2 == 0 {
                    format!("s-{i}")
                } else {
                    "shared".to_owned()
                };
                let expected = if i % 2 == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Any
                };
                events::append(
                    &mut conn,
                    &stream,
                    expected,
                    &[event("k", i), event("k", i)],
                    Utc::now(),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut conn = db.conn().await.unwrap();
    let all = events::read_since(&mut conn, 0, 1_000).await.unwrap();
    assert_eq!(all.len(), 48);
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=48).collect::<Vec<_>>()
    );
    let shared = events::read_stream(&mut conn, "shared").await.unwrap();
    assert_eq!(
        shared.iter().map(|e| e.version).collect::<Vec<_>>(),
        (1..=24).collect::<Vec<_>>()
    );
}

async fn tokens_store_only_hashes(backend: Backend) {
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let mut conn = db.conn().await.unwrap();
    let now = Utc::now();
    let created = tokens::create(&mut conn, Role::Console, None, None, "desk 1", now)
        .await
        .unwrap();
    assert!(created.token.starts_with("shers_"));
    let hash = shers::domain::auth::hash_token(&created.token);
    let found = tokens::find_active_by_hash(&mut conn, &hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, created.record.id);
    assert_eq!(found.role, Role::Console);
    assert!(
        tokens::find_active_by_hash(&mut conn, &created.token)
            .await
            .unwrap()
            .is_none(),
        "the raw token is not stored"
    );
    let crew = tokens::create(&mut conn, Role::Crew, Some(&"A7".into()), None, "A7", now)
        .await
        .unwrap();
    assert_eq!(crew.record.unit_id.as_ref().map(|u| u.as_str()), Some("A7"));
    assert_eq!(tokens::list(&mut conn).await.unwrap().len(), 2);
    tokens::revoke(&mut conn, created.record.id, now)
        .await
        .unwrap();
    assert!(
        tokens::find_active_by_hash(&mut conn, &hash)
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        tokens::revoke(&mut conn, created.record.id, now).await,
        Err(shers::persistence::StoreError::NotFound)
    ));
    // The database refuses a crew token without a unit even if a caller skips validation.
    let mut record = crew.record.clone();
    record.id = shers::domain::ids::TokenId::new_v7();
    record.unit_id = None;
    let bad = tokens::insert(&mut conn, "another-hash", &record).await;
    assert!(bad.is_err());
}

#[test]
fn migration_trees_have_the_same_folders() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let names = |backend: &str| {
        let mut v: Vec<String> = std::fs::read_dir(root.join(backend))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let sqlite = names("sqlite");
    assert!(!sqlite.is_empty());
    assert_eq!(sqlite, names("postgres"));
    for dir in &sqlite {
        for backend in ["sqlite", "postgres"] {
            for file in ["up.sql", "down.sql"] {
                assert!(
                    root.join(backend).join(dir).join(file).is_file(),
                    "{backend}/{dir}/{file}"
                );
            }
        }
    }
}

#[actix_web::test]
async fn unknown_database_scheme_is_refused_clearly() {
    let mut s = shers::config::DatabaseSettings::default();
    s.url = shers::config::Secret::new("mysql://root@localhost/shers".into());
    let err = shers::persistence::Db::connect(&s)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unsupported database URL scheme \"mysql\""),
        "{err}"
    );
}

#[actix_web::test]
async fn sqlite_directory_is_created_and_wal_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = shers::config::DatabaseSettings::default();
    s.url = shers::config::Secret::new(format!(
        "sqlite://{}/nested/deeper/shers.db",
        dir.path().display()
    ));
    let db = shers::persistence::Db::connect(&s).await.unwrap();
    assert!(dir.path().join("nested/deeper/shers.db").exists());
    #[derive(diesel::QueryableByName)]
    struct Mode {
        #[diesel(sql_type = diesel::sql_types::Text)]
        journal_mode: String,
    }
    let mut conn = db.conn().await.unwrap();
    let mode: Vec<Mode> = shers::db_run!(&mut conn, |c| {
        diesel_async::RunQueryDsl::load(diesel::sql_query("PRAGMA journal_mode"), c)
            .await
            .unwrap()
    });
    assert_eq!(mode[0].journal_mode, "wal");
}

async fn group_commit_shares_commits_and_isolates_a_failed_write(backend: Backend) {
    use shers::persistence::group::GroupCommit;
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let writer = GroupCommit::start(db.clone(), 64);
    // Stream "taken" exists, so a write expecting no stream there must fail on its own.
    let mut conn = db.conn().await.unwrap();
    events::append(
        &mut conn,
        "taken",
        ExpectedVersion::NoStream,
        &[event("a", 0)],
        Utc::now(),
    )
    .await
    .unwrap();
    let writes = (0..40_i64).map(|i| {
        let writer = writer.clone();
        async move {
            let (stream, expected) = if i == 17 {
                ("taken".to_owned(), ExpectedVersion::NoStream)
            } else {
                (format!("g-{i}"), ExpectedVersion::NoStream)
            };
            writer
                .write(move |tx| {
                    let stream = stream.clone();
                    Box::pin(async move {
                        events::append(
                            tx,
                            &stream,
                            expected,
                            &[event("k", i), event("k", i)],
                            Utc::now(),
                        )
                        .await
                    })
                })
                .await
        }
    });
    let results = futures_util::future::join_all(writes).await;
    for (i, r) in results.iter().enumerate() {
        if i == 17 {
            assert!(matches!(r, Err(AppendError::Conflict { .. })), "{r:?}");
        } else {
            assert_eq!(r.as_ref().unwrap().len(), 2, "write {i}");
        }
    }
    let (attempted, commits) = writer.counts();
    assert_eq!(attempted, 40);
    assert!(commits < 10, "40 concurrent writes took {commits} commits");
    // Everything acknowledged is stored, the failed write left nothing, the sequence has no gap.
    let all = events::read_since(&mut conn, 0, 1_000).await.unwrap();
    assert_eq!(all.len(), 1 + 39 * 2);
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=79).collect::<Vec<_>>()
    );
    assert_eq!(
        events::read_stream(&mut conn, "taken").await.unwrap().len(),
        1
    );
}

/// The projection the appends test writes: `incident_references(year = slot)` set to `value`.
fn projection(slot: i32, value: i64) -> shers::persistence::group::Projection {
    Box::new(move |tx| {
        Box::pin(async move {
            shers::db_run!(tx, |c| {
                diesel_async::RunQueryDsl::execute(
                    diesel::sql_query(
                        "INSERT INTO incident_references (year, last_number) VALUES ($1, $2) \
                         ON CONFLICT (year) DO UPDATE SET last_number = excluded.last_number",
                    )
                    .bind::<diesel::sql_types::Integer, _>(slot)
                    .bind::<diesel::sql_types::BigInt, _>(value),
                    c,
                )
                .await?;
            });
            Ok(())
        })
    })
}

/// `GroupCommit::append`: many streams' events in one insert with per-stream versions that
/// continue from what is stored, keyed projections where the last one wins, and a failed
/// projection that takes its own events with it and leaves no gap.
async fn group_commit_appends_many_streams_with_their_projections(backend: Backend) {
    use shers::persistence::group::GroupCommit;
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let writer = GroupCommit::start(db.clone(), 64);
    let mut conn = db.conn().await.unwrap();
    // unit-0 already has two events: its batched ones continue at version 3.
    events::append(
        &mut conn,
        "unit-0",
        ExpectedVersion::NoStream,
        &[event("a", 0), event("a", 0)],
        Utc::now(),
    )
    .await
    .unwrap();
    let appends = (0..30_i64).map(|i| {
        let writer = writer.clone();
        async move {
            let stream = format!("unit-{}", i % 3);
            let slot = i32::try_from(i % 3).unwrap();
            writer
                .append(
                    &stream,
                    vec![event("unit.location", i)],
                    Some(stream.clone()),
                    Some(projection(slot, i)),
                )
                .await
        }
    });
    for r in futures_util::future::join_all(appends).await {
        r.unwrap();
    }
    for n in 0..3 {
        let stream = events::read_stream(&mut conn, &format!("unit-{n}"))
            .await
            .unwrap();
        let offset = if n == 0 { 2 } else { 0 };
        assert_eq!(stream.len(), 10 + offset);
        assert_eq!(
            stream.iter().map(|e| e.version).collect::<Vec<_>>(),
            (1..=10 + offset as i64).collect::<Vec<_>>()
        );
        // Within a stream the events keep the order they were sent in.
        let sent: Vec<i64> = stream[offset..]
            .iter()
            .map(|e| e.data["n"].as_i64().unwrap())
            .collect();
        assert!(sent.windows(2).all(|w| w[0] < w[1]), "{sent:?}");
    }
    // Each slot holds the last value sent for it, whatever the batching was.
    #[derive(diesel::QueryableByName)]
    struct Slot {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        year: i32,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        last_number: i64,
    }
    let slots: Vec<Slot> = shers::db_run!(&mut conn, |c| {
        diesel_async::RunQueryDsl::load(
            diesel::sql_query(
                "SELECT year, last_number FROM incident_references WHERE year < 3 ORDER BY year",
            ),
            c,
        )
        .await
        .unwrap()
    });
    assert_eq!(
        slots
            .iter()
            .map(|s| (s.year, s.last_number))
            .collect::<Vec<_>>(),
        [(0, 27), (1, 28), (2, 29)]
    );
    // A projection that fails: its events are not stored, and the sequence stays gap-free.
    let failing: shers::persistence::group::Projection = Box::new(|tx| {
        Box::pin(async move {
            shers::db_run!(tx, |c| {
                diesel_async::RunQueryDsl::execute(
                    diesel::sql_query("SELECT * FROM no_such_table"),
                    c,
                )
                .await?;
            });
            Ok(())
        })
    });
    let failed = writer
        .append(
            "unit-9",
            vec![event("unit.location", 99)],
            None,
            Some(failing),
        )
        .await;
    assert!(failed.is_err());
    writer
        .append("unit-8", vec![event("unit.location", 98)], None, None)
        .await
        .unwrap();
    assert!(
        events::read_stream(&mut conn, "unit-9")
            .await
            .unwrap()
            .is_empty()
    );
    // A write alone in its batch runs without a savepoint: when it fails after appending,
    // the whole transaction is rolled back, so its append is gone too.
    let lone: Result<(), AppendError> = writer
        .write(|tx| {
            Box::pin(async move {
                events::append(
                    tx,
                    "unit-7",
                    ExpectedVersion::Any,
                    &[event("k", 7)],
                    Utc::now(),
                )
                .await?;
                events::append(
                    tx,
                    "unit-0",
                    ExpectedVersion::NoStream,
                    &[event("k", 7)],
                    Utc::now(),
                )
                .await?;
                Ok(())
            })
        })
        .await;
    assert!(
        matches!(lone, Err(AppendError::Conflict { .. })),
        "{lone:?}"
    );
    assert!(
        events::read_stream(&mut conn, "unit-7")
            .await
            .unwrap()
            .is_empty()
    );
    let all = events::read_since(&mut conn, 0, 1_000).await.unwrap();
    assert_eq!(all.len(), 2 + 30 + 1);
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=33).collect::<Vec<_>>()
    );
}

/// `GroupCommit::append_unit`: every unit's events are kept, and each unit's row ends with the
/// state of its last change (one multi-row statement per batch on PostgreSQL).
async fn group_commit_saves_each_unit_once_with_its_latest_state(backend: Backend) {
    use shers::domain::geo::LatLng;
    use shers::persistence::fleet::{self, UnitRecord};
    use shers::persistence::group::GroupCommit;
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let writer = GroupCommit::start(db.clone(), 64);
    let mut conn = db.conn().await.unwrap();
    let now = Utc::now();
    let unit = |n: u32, step: u32| UnitRecord {
        id: shers::domain::ids::UnitId(format!("u-{n}")),
        call_sign: format!("U{n}"),
        capability: "als".into(),
        status: if step.is_multiple_of(2) {
            "available"
        } else {
            "reserved"
        }
        .into(),
        location: LatLng {
            lat: 55.9 + f64::from(step) / 1000.0,
            lng: -3.2 - f64::from(n) / 1000.0,
        },
        fix_at: now,
        base: None,
        current_incident_id: (!step.is_multiple_of(2))
            .then(|| IncidentId(uuid::Uuid::from_u128(u128::from(step)))),
    };
    for n in 0..3 {
        fleet::insert_unit(&mut conn, &unit(n, 0), now)
            .await
            .unwrap();
    }
    let changes = (1..=7_u32).flat_map(|step| (0..3_u32).map(move |n| (n, step)));
    let writes = changes.map(|(n, step)| {
        let writer = writer.clone();
        let record = unit(n, step);
        async move {
            let e = NewEvent::new("unit.location", json!({"n": n, "step": step}));
            writer
                .append_unit(&format!("unit-u-{n}"), vec![e], record)
                .await
        }
    });
    for r in futures_util::future::join_all(writes).await {
        r.unwrap();
    }
    let stored = fleet::all_units(&mut conn).await.unwrap();
    for n in 0..3 {
        let got = stored.iter().find(|u| u.id.0 == format!("u-{n}")).unwrap();
        let want = unit(n, 7);
        assert_eq!(got.status, want.status);
        assert_eq!(got.current_incident_id, want.current_incident_id);
        assert!(
            (got.location.lat - want.location.lat).abs() < 1e-9,
            "{got:?}"
        );
        assert!(
            (got.location.lng - want.location.lng).abs() < 1e-9,
            "{got:?}"
        );
        let stream = events::read_stream(&mut conn, &format!("unit-u-{n}"))
            .await
            .unwrap();
        assert_eq!(
            stream
                .iter()
                .map(|e| e.data["step"].as_i64().unwrap())
                .collect::<Vec<_>>(),
            (1..=7).collect::<Vec<_>>()
        );
    }
}

/// `GroupCommit::append_unit_position`: fixes wait in the writer for company, but a unit's
/// next other change takes its waiting fixes along, ahead of itself; every fix is stored, in
/// order, and the unit's row ends with its latest state.
async fn group_commit_positions_wait_for_company_and_keep_each_units_order(backend: Backend) {
    use shers::domain::geo::LatLng;
    use shers::persistence::fleet::{self, UnitRecord};
    use shers::persistence::group::GroupCommit;
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let writer = GroupCommit::start(db.clone(), 64);
    let mut conn = db.conn().await.unwrap();
    let now = Utc::now();
    let unit = |n: u32, step: u32, status: &str| UnitRecord {
        id: shers::domain::ids::UnitId(format!("u-{n}")),
        call_sign: format!("U{n}"),
        capability: "als".into(),
        status: status.into(),
        location: LatLng {
            lat: 55.9 + f64::from(step) / 1000.0,
            lng: -3.2 - f64::from(n) / 1000.0,
        },
        fix_at: now,
        base: None,
        current_incident_id: None,
    };
    for n in 0..2 {
        fleet::insert_unit(&mut conn, &unit(n, 0, "available"), now)
            .await
            .unwrap();
    }
    let change = |n: u32, step: u32, status: &'static str, position: bool| {
        let writer = writer.clone();
        async move {
            let e = NewEvent::new("unit.location", json!({"n": n, "step": step}));
            let stream = format!("unit-u-{n}");
            let record = unit(n, step, status);
            if position {
                writer.append_unit_position(&stream, vec![e], record).await
            } else {
                writer.append_unit(&stream, vec![e], record).await
            }
        }
    };
    // Sent in this order (each is queued on its first poll).
    let results = futures_util::future::join_all([
        Box::pin(change(0, 1, "available", true))
            as std::pin::Pin<Box<dyn std::future::Future<Output = _>>>,
        Box::pin(change(1, 1, "available", true)),
        Box::pin(change(0, 2, "available", true)),
        Box::pin(change(0, 3, "enroute", false)),
        Box::pin(change(1, 2, "available", true)),
    ])
    .await;
    for r in results {
        r.unwrap();
    }
    let stored = fleet::all_units(&mut conn).await.unwrap();
    for (n, last, status) in [(0, 3, "enroute"), (1, 2, "available")] {
        let got = stored.iter().find(|u| u.id.0 == format!("u-{n}")).unwrap();
        assert_eq!(got.status, status);
        assert!(
            (got.location.lat - unit(n, last, status).location.lat).abs() < 1e-9,
            "{got:?}"
        );
        let stream = events::read_stream(&mut conn, &format!("unit-u-{n}"))
            .await
            .unwrap();
        let steps: Vec<i64> = stream
            .iter()
            .map(|e| e.data["step"].as_i64().unwrap())
            .collect();
        assert_eq!(steps, (1..=i64::from(last)).collect::<Vec<_>>());
        assert!(stream.windows(2).all(|w| w[0].seq < w[1].seq));
    }
}

/// A write that swallows a failed statement's error: on PostgreSQL that aborts the shared
/// transaction (whose `COMMIT` would then silently roll back). Whatever the writer answers,
/// every write it acknowledged is stored, the sequence has no gap, and the writer goes on.
async fn group_commit_never_acknowledges_a_write_it_lost(backend: Backend) {
    use shers::persistence::group::GroupCommit;
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let writer = GroupCommit::start(db.clone(), 64);
    let writes = (0..12_i64).map(|i| {
        let writer = writer.clone();
        async move {
            writer
                .write(move |tx| {
                    Box::pin(async move {
                        if i == 5 {
                            let swallowed: Result<usize, diesel::result::Error> =
                                shers::db_run!(tx, |c| {
                                    diesel_async::RunQueryDsl::execute(
                                        diesel::sql_query("UPDATE no_such_table SET x = 1"),
                                        c,
                                    )
                                    .await
                                });
                            assert!(swallowed.is_err());
                            return Ok(Vec::new());
                        }
                        events::append(
                            tx,
                            &format!("s-{i}"),
                            ExpectedVersion::NoStream,
                            &[event("k", i)],
                            Utc::now(),
                        )
                        .await
                    })
                })
                .await
        }
    });
    let results: Vec<Result<Vec<_>, AppendError>> = futures_util::future::join_all(writes).await;
    let mut conn = db.conn().await.unwrap();
    for (i, r) in results.iter().enumerate() {
        let stored = events::read_stream(&mut conn, &format!("s-{i}"))
            .await
            .unwrap();
        if i != 5 && r.is_ok() {
            assert_eq!(stored.len(), 1, "write {i} was acknowledged but not stored");
        }
    }
    if backend == Backend::Sqlite {
        // SQLite keeps the transaction usable after a failed statement.
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
    let all = events::read_since(&mut conn, 0, 1_000).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=all.len() as i64).collect::<Vec<_>>()
    );
    // The writer carries on.
    let after = writer
        .write(|tx| {
            Box::pin(async move {
                events::append(
                    tx,
                    "after",
                    ExpectedVersion::NoStream,
                    &[event("k", 99)],
                    Utc::now(),
                )
                .await
            })
        })
        .await;
    assert_eq!(after.unwrap().len(), 1);
}

/// `DbConn::pipelined`: independent statements answered together (pipelined on PostgreSQL),
/// and a write transaction on such a connection is refused rather than run without one.
async fn pipelined_statements_answer_together_and_refuse_write_transactions(backend: Backend) {
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let mut conn = db.conn().await.unwrap();
    for stream in ["r-1", "r-2"] {
        events::append(
            &mut conn,
            stream,
            ExpectedVersion::NoStream,
            &[event("k", 1)],
            Utc::now(),
        )
        .await
        .unwrap();
    }
    let mut reads = db.conn().await.unwrap().pipelined();
    let (one, two) = reads
        .try_both(
            async |c| events::read_stream(c, "r-1").await,
            async |c| events::read_stream(c, "r-2").await,
        )
        .await
        .unwrap();
    assert_eq!((one.len(), two.len()), (1, 1));
    let all = reads
        .try_each(["r-1", "r-2", "none"], async |c, s| {
            events::read_stream(c, s).await
        })
        .await
        .unwrap();
    assert_eq!(all.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 0]);
    let write = events::append(
        &mut reads,
        "r-3",
        ExpectedVersion::NoStream,
        &[event("k", 1)],
        Utc::now(),
    )
    .await;
    match backend {
        // A SQLite connection is unchanged by `pipelined`.
        Backend::Sqlite => assert!(write.is_ok(), "{write:?}"),
        Backend::Postgres => assert!(
            write.is_err(),
            "a write ran on a read-only shared connection"
        ),
    }
}

/// Runs `sql` through the writer as an atomic write (`write_as(true, …)`).
async fn atomic_statement(
    writer: &shers::persistence::group::GroupCommit,
    sql: &'static str,
) -> Result<(), shers::persistence::StoreError> {
    writer
        .write_as(true, move |tx| {
            Box::pin(async move {
                shers::db_run!(tx, |c| {
                    diesel_async::RunQueryDsl::execute(diesel::sql_query(sql), c).await?
                });
                Ok(())
            })
        })
        .await
}

/// `GroupCommit::write_as(true, …)`: on PostgreSQL a lone one-statement write runs outside any
/// transaction (a statement PostgreSQL refuses inside a transaction block goes through), and
/// with company it joins the batch's transaction (the same statement is refused there, and
/// only it: its companion still commits). On SQLite it is an ordinary write.
async fn group_commit_runs_a_lone_atomic_write_without_a_transaction(backend: Backend) {
    use shers::persistence::group::GroupCommit;
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let writer = GroupCommit::start(db.clone(), 64);
    let alone = atomic_statement(&writer, "VACUUM event_sequence").await;
    match backend {
        Backend::Postgres => alone.unwrap(),
        // SQLite refuses VACUUM inside a transaction, and its writes always have one.
        Backend::Sqlite => {
            assert!(alone.is_err(), "{alone:?}");
            return;
        }
    }
    // Hold the writer on a write that waits for a gate, so that the next two writes are both
    // queued (sent on their first poll, before the gate opens) and share a batch.
    let (open, gate) = tokio::sync::watch::channel(false);
    let busy = writer.write(move |_tx| {
        let mut gate = gate.clone();
        Box::pin(async move {
            let _ = gate.wait_for(|open| *open).await;
            Ok::<(), shers::persistence::StoreError>(())
        })
    });
    let vacuum = atomic_statement(&writer, "VACUUM event_sequence");
    let companion = writer.write(move |tx| {
        Box::pin(async move {
            events::append(
                tx,
                "companion",
                ExpectedVersion::NoStream,
                &[event("c", 1)],
                Utc::now(),
            )
            .await
        })
    });
    let release = async {
        open.send_replace(true);
    };
    let (busy, (vacuum, companion, ())) = futures_util::future::join(
        busy,
        futures_util::future::join3(vacuum, companion, release),
    )
    .await;
    busy.unwrap();
    let refused = vacuum.unwrap_err().to_string();
    assert!(refused.contains("transaction block"), "{refused}");
    assert_eq!(companion.unwrap().len(), 1);
    let mut conn = db.conn().await.unwrap();
    assert_eq!(
        events::read_stream(&mut conn, "companion")
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A new incident in one statement (`incidents::create_pg`, PostgreSQL): everything it stores
/// reads back, and creating it again is a conflict that stores nothing and takes no sequence
/// number. SQLite has no data-modifying CTEs: there it is refused, never half-run.
async fn a_new_incident_is_one_statement_and_all_or_nothing(backend: Backend) {
    use shers::domain::geo::LatLng;
    use shers::domain::ids::{IncidentId, OfferId, UnitId};
    use shers::domain::incident::{Command, Priority, Source, handle};
    use shers::persistence::StoreError;
    use shers::persistence::fleet::{self, OfferRecord};
    use shers::persistence::group::GroupCommit;
    use shers::persistence::incidents::{self as store, NewIncident, NewNotification};
    let tdb = TestDb::new(backend).await;
    let db = tdb.migrated().await;
    let writer = GroupCommit::start(db.clone(), 64);
    // Microseconds, as stored.
    let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
    let id = IncidentId::new_v7();
    let open = Command::Open {
        id,
        reference: "INC-2026-900001".into(),
        priority: Priority::Emergency,
        source: Source::Wearable,
        patient_id: None,
        location: LatLng {
            lat: 51.5,
            lng: -0.12,
        },
        description: Some("SpO2 85%".into()),
        evidence: Some(json!({"kind": "vitals", "reasons": ["SpO2 85%"]})),
    };
    let (opened, mut kinds) = handle(None, &open, now).unwrap();
    let units = vec![UnitId("u-1".into()), UnitId("u-2".into())];
    let (dispatching, more) = handle(Some(&opened), &Command::StartDispatch, now).unwrap();
    kinds.extend(more);
    let (incident, more) = handle(
        Some(&dispatching),
        &Command::RecordOffers {
            unit_ids: units.clone(),
        },
        now,
    )
    .unwrap();
    kinds.extend(more);
    let new_events: Vec<NewEvent> = kinds
        .iter()
        .map(|e| {
            let mut n = NewEvent::new(e.kind(), e.data());
            n.incident_id = Some(id);
            n
        })
        .collect();
    let offers: Vec<OfferRecord> = units
        .iter()
        .map(|u| OfferRecord {
            id: OfferId::new_v7(),
            incident_id: id,
            unit_id: u.clone(),
            round: 1,
            status: "pending".into(),
            eta_s: 240,
            reason: "closest_by_distance".into(),
            eta_source: "google".into(),
            offered_at: now,
            expires_at: now + chrono::Duration::seconds(30),
            responded_at: None,
            decline_reason: None,
        })
        .collect();
    let outbox = vec![NewNotification {
        id: uuid::Uuid::now_v7().to_string(),
        incident_id: id,
        recipient_name: "Kin".into(),
        channel: "sms",
        address: "+447700900123".into(),
        template: "incident_created",
        idempotency_key: format!("key-{id}"),
    }];
    let evidence = json!({"kind": "vitals", "reasons": ["SpO2 85%"]});
    let create = || {
        let (incident, new_events, outbox, offers, evidence) = (
            incident.clone(),
            new_events.clone(),
            outbox.clone(),
            offers.clone(),
            evidence.clone(),
        );
        writer.write_as(true, move |tx| {
            let (incident, new_events, outbox, offers, evidence) = (
                incident.clone(),
                new_events.clone(),
                outbox.clone(),
                offers.clone(),
                evidence.clone(),
            );
            Box::pin(async move {
                let new = NewIncident {
                    incident: &incident,
                    events: &new_events,
                    evidence: vec![&evidence],
                    outbox: &outbox,
                    offers: &offers,
                };
                store::create_pg(tx, &new, now).await
            })
        })
    };
    let first = create().await;
    if backend == Backend::Sqlite {
        assert!(
            matches!(first, Err(StoreError::Unavailable(_))),
            "{first:?}"
        );
        let mut conn = db.conn().await.unwrap();
        assert!(store::find(&mut conn, id).await.unwrap().is_none());
        return;
    }
    let version = first.unwrap();
    assert_eq!(version, new_events.len() as i64);
    let mut conn = db.conn().await.unwrap();
    let (stored, stored_version) = store::find(&mut conn, id).await.unwrap().unwrap();
    assert_eq!(stored, incident);
    assert_eq!(stored_version, version);
    let stream = events::read_stream(&mut conn, &format!("incident-{id}"))
        .await
        .unwrap();
    assert_eq!(
        stream
            .iter()
            .map(|e| (e.version, e.kind.as_str()))
            .collect::<Vec<_>>(),
        new_events
            .iter()
            .zip(1..)
            .map(|(e, v)| (v, e.kind.as_str()))
            .collect::<Vec<_>>()
    );
    let seqs: Vec<i64> = stream.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=new_events.len() as i64).collect::<Vec<_>>());
    assert_eq!(fleet::offers_for(&mut conn, id).await.unwrap(), offers);
    assert_eq!(
        store::notifications_for(&mut conn, id).await.unwrap().len(),
        1
    );
    let stored_evidence = store::evidence_for(&mut conn, id).await.unwrap();
    assert_eq!(stored_evidence.len(), 1);
    assert_eq!(stored_evidence[0].1, evidence);

    // Again: the stream and the incident exist. Nothing more is stored, no number taken.
    let again = create().await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(
        events::last_seq(&mut conn).await.unwrap(),
        new_events.len() as i64
    );
    assert_eq!(fleet::offers_for(&mut conn, id).await.unwrap().len(), 2);
    assert_eq!(store::evidence_for(&mut conn, id).await.unwrap().len(), 1);
}
