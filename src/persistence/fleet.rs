//! Units, hospitals and dispatch offers.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::Serialize;

use super::ids::UuidText;
use super::schema::{hospitals, offers, units};
use super::statement::{Bind, Statement};
use super::{Backend, DbConn, StoreError, from_db_time, to_db_time};
use crate::db_run;
use crate::domain::geo::LatLng;
use crate::domain::ids::{HospitalId, IncidentId, OfferId, UnitId};

/// A stored unit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnitRecord {
    /// Its stable identifier.
    pub id: UnitId,
    /// Radio call sign.
    pub call_sign: String,
    /// `als` or `bls`.
    pub capability: String,
    /// Current status.
    pub status: String,
    /// Last position.
    pub location: LatLng,
    /// When the position was fixed.
    pub fix_at: DateTime<Utc>,
    /// Home station.
    pub base: Option<LatLng>,
    /// Incident the unit is committed to.
    pub current_incident_id: Option<IncidentId>,
}

#[derive(Insertable, AsChangeset, Queryable, Selectable)]
#[diesel(table_name = units, treat_none_as_default_value = false, treat_none_as_null = true)]
struct UnitRow {
    id: UnitId,
    call_sign: String,
    capability: String,
    status: String,
    lat: f64,
    lng: f64,
    fix_at: chrono::NaiveDateTime,
    base_lat: Option<f64>,
    base_lng: Option<f64>,
    /// Text on purpose: read leniently (see [`UnitRow::into_record`]).
    current_incident_id: Option<String>,
    created_at: chrono::NaiveDateTime,
    updated_at: chrono::NaiveDateTime,
}

impl UnitRow {
    fn from_record(u: &UnitRecord, now: DateTime<Utc>) -> Self {
        Self {
            id: u.id.clone(),
            call_sign: u.call_sign.clone(),
            capability: u.capability.clone(),
            status: u.status.clone(),
            lat: u.location.lat,
            lng: u.location.lng,
            fix_at: to_db_time(u.fix_at),
            base_lat: u.base.map(|b| b.lat),
            base_lng: u.base.map(|b| b.lng),
            current_incident_id: u.current_incident_id.map(|i| i.to_string()),
            created_at: to_db_time(now),
            updated_at: to_db_time(now),
        }
    }

    fn into_record(self) -> UnitRecord {
        UnitRecord {
            id: self.id,
            call_sign: self.call_sign,
            capability: self.capability,
            status: self.status,
            location: LatLng {
                lat: self.lat,
                lng: self.lng,
            },
            fix_at: from_db_time(self.fix_at),
            base: self
                .base_lat
                .zip(self.base_lng)
                .map(|(lat, lng)| LatLng { lat, lng }),
            // A value that is not an incident id (never written by SHERS) reads as none rather
            // than failing the load of every unit at start-up, hence text, not `IncidentId`.
            current_incident_id: self.current_incident_id.and_then(|i| i.parse().ok()),
        }
    }
}

/// Registers a unit (`Conflict` when the id exists).
pub async fn insert_unit(
    conn: &mut DbConn,
    unit: &UnitRecord,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let row = UnitRow::from_record(unit, now);
    db_run!(conn, |c| {
        diesel::insert_into(units::table)
            .values(&row)
            .execute(c)
            .await?
    });
    Ok(())
}

/// Saves a unit's live state (status, position, commitment).
pub async fn save_unit(
    conn: &mut DbConn,
    unit: &UnitRecord,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let row = UnitRow::from_record(unit, now);
    db_run!(conn, |c| {
        diesel::update(units::table.find(&row.id))
            .set((
                units::status.eq(&row.status),
                units::lat.eq(row.lat),
                units::lng.eq(row.lng),
                units::fix_at.eq(row.fix_at),
                units::current_incident_id.eq(&row.current_incident_id),
                units::updated_at.eq(row.updated_at),
            ))
            .execute(c)
            .await?
    });
    Ok(())
}

/// Saves many units' live state in one statement on PostgreSQL (the group-commit writer's
/// batch of unit changes); one per unit on SQLite. Each unit should appear once.
pub async fn save_units(
    conn: &mut DbConn,
    units: &[&UnitRecord],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    const SAVE_UNITS_PG: &[&str] = &[
        "UPDATE units AS u SET status = t.status, lat = t.lat, lng = t.lng, \
         fix_at = t.fix_at, current_incident_id = t.current_incident_id, updated_at = ",
        " FROM unnest(",
        "::text[], ",
        "::text[], ",
        "::float8[], ",
        "::float8[], ",
        "::timestamp[], ",
        "::text[]) AS t(id, status, lat, lng, fix_at, current_incident_id) WHERE u.id = t.id",
    ];
    struct SaveUnitsPg;
    match conn.backend() {
        Backend::Sqlite => {
            for unit in units {
                save_unit(conn, unit, now).await?;
            }
        }
        Backend::Postgres => {
            let statement = Statement::<SaveUnitsPg>::new(
                SAVE_UNITS_PG,
                vec![
                    Bind::Timestamp(to_db_time(now)),
                    Bind::Texts(units.iter().map(|u| u.id.0.as_str()).collect()),
                    Bind::Texts(units.iter().map(|u| u.status.as_str()).collect()),
                    Bind::Floats(units.iter().map(|u| u.location.lat).collect()),
                    Bind::Floats(units.iter().map(|u| u.location.lng).collect()),
                    Bind::Timestamps(units.iter().map(|u| to_db_time(u.fix_at)).collect()),
                    Bind::OptUuids(
                        units
                            .iter()
                            .map(|u| u.current_incident_id.map(UuidText::from))
                            .collect(),
                    ),
                ],
            );
            db_run!(conn, |c| statement.execute(c).await)?;
        }
    }
    Ok(())
}

/// Every unit.
pub async fn all_units(conn: &mut DbConn) -> Result<Vec<UnitRecord>, StoreError> {
    let rows: Vec<UnitRow> = db_run!(conn, |c| {
        units::table
            .order(units::id.asc())
            .select(UnitRow::as_select())
            .load(c)
            .await?
    });
    Ok(rows.into_iter().map(UnitRow::into_record).collect())
}

/// One unit, as last stored.
pub async fn find_unit(conn: &mut DbConn, id: &UnitId) -> Result<Option<UnitRecord>, StoreError> {
    let rows: Vec<UnitRow> = db_run!(conn, |c| {
        units::table
            .filter(units::id.eq(id))
            .select(UnitRow::as_select())
            .load(c)
            .await?
    });
    Ok(rows.into_iter().next().map(UnitRow::into_record))
}

/// A stored hospital.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HospitalRecord {
    /// Its stable identifier.
    pub id: HospitalId,
    /// Its name, for people.
    pub name: String,
    /// Its position (WGS 84).
    pub location: LatLng,
    /// What it can treat (e.g. `stroke`, `trauma`, `cardiac`).
    pub capabilities: Vec<String>,
    /// Beds for ambulance arrivals.
    pub capacity: u32,
    /// Taken by patients in transport or not yet handed over.
    pub occupied: u32,
}

/// Registers a hospital.
pub async fn insert_hospital(
    conn: &mut DbConn,
    h: &HospitalRecord,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let caps =
        serde_json::to_string(&h.capabilities).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    db_run!(conn, |c| {
        diesel::insert_into(hospitals::table)
            .values((
                hospitals::id.eq(&h.id),
                hospitals::name.eq(&h.name),
                hospitals::lat.eq(h.location.lat),
                hospitals::lng.eq(h.location.lng),
                hospitals::capabilities.eq(&caps),
                hospitals::capacity.eq(i32::try_from(h.capacity).unwrap_or(i32::MAX)),
                hospitals::occupied.eq(i32::try_from(h.occupied).unwrap_or(i32::MAX)),
                hospitals::created_at.eq(to_db_time(now)),
            ))
            .execute(c)
            .await?
    });
    Ok(())
}

/// Sets how many beds of a hospital are taken.
pub async fn set_occupied(
    conn: &mut DbConn,
    id: &HospitalId,
    occupied: u32,
) -> Result<(), StoreError> {
    db_run!(conn, |c| {
        diesel::update(hospitals::table.find(id))
            .set(hospitals::occupied.eq(i32::try_from(occupied).unwrap_or(i32::MAX)))
            .execute(c)
            .await?
    });
    Ok(())
}

/// Every hospital.
pub async fn all_hospitals(conn: &mut DbConn) -> Result<Vec<HospitalRecord>, StoreError> {
    let rows: Vec<(HospitalId, String, f64, f64, String, i32, i32)> = db_run!(conn, |c| {
        hospitals::table
            .order(hospitals::id.asc())
            .select((
                hospitals::id,
                hospitals::name,
                hospitals::lat,
                hospitals::lng,
                hospitals::capabilities,
                hospitals::capacity,
                hospitals::occupied,
            ))
            .load(c)
            .await?
    });
    rows.into_iter()
        .map(|(id, name, lat, lng, caps, capacity, occupied)| {
            Ok(HospitalRecord {
                id,
                name,
                location: LatLng { lat, lng },
                capabilities: serde_json::from_str(&caps)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                capacity: u32::try_from(capacity).unwrap_or(0),
                occupied: u32::try_from(occupied).unwrap_or(0),
            })
        })
        .collect()
}

/// A dispatch offer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OfferRecord {
    /// Its stable identifier.
    pub id: OfferId,
    /// The incident this concerns.
    pub incident_id: IncidentId,
    /// Unit offered.
    pub unit_id: UnitId,
    /// Round (1-based).
    pub round: u32,
    /// `pending`, `accepted`, `declined`, `expired` or `withdrawn`.
    pub status: String,
    /// ETA to the scene when offered.
    pub eta_s: u32,
    /// Why this unit (`closest_by_eta`, `closest_by_distance`, `manual`).
    pub reason: String,
    /// Which provider gave `eta_s` (`google`, `osrm`, `straight_line`).
    pub eta_source: String,
    /// When offered (NEMSIS eTimes.03 for the first).
    pub offered_at: DateTime<Utc>,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
    /// When the crew answered (or it lapsed / was withdrawn).
    pub responded_at: Option<DateTime<Utc>>,
    /// A crew's reason for declining.
    pub decline_reason: Option<String>,
}

#[derive(Insertable, Queryable, Selectable)]
#[diesel(table_name = offers, treat_none_as_default_value = false)]
struct OfferRow {
    id: OfferId,
    incident_id: IncidentId,
    unit_id: UnitId,
    round: i32,
    status: String,
    eta_s: i32,
    reason: String,
    offered_at: chrono::NaiveDateTime,
    expires_at: chrono::NaiveDateTime,
    responded_at: Option<chrono::NaiveDateTime>,
    decline_reason: Option<String>,
    eta_source: String,
}

/// Offers as stored, ready to insert or bind.
pub(crate) struct OfferRows(Vec<OfferRow>);

impl OfferRows {
    pub(crate) fn new(batch: &[OfferRecord]) -> Self {
        Self(
            batch
                .iter()
                .map(|o| OfferRow {
                    id: o.id,
                    incident_id: o.incident_id,
                    unit_id: o.unit_id.clone(),
                    round: i32::try_from(o.round).unwrap_or(i32::MAX),
                    status: o.status.clone(),
                    eta_s: i32::try_from(o.eta_s).unwrap_or(i32::MAX),
                    reason: o.reason.clone(),
                    offered_at: to_db_time(o.offered_at),
                    expires_at: to_db_time(o.expires_at),
                    responded_at: o.responded_at.map(to_db_time),
                    decline_reason: o.decline_reason.clone(),
                    eta_source: o.eta_source.clone(),
                })
                .collect(),
        )
    }

    /// The columns as PostgreSQL arrays, in table order: id, incident id, unit id, round,
    /// status, ETA, reason, offered, expires, responded, decline reason, ETA source (`text[]`,
    /// `text[]`, `text[]`, `int4[]`, `text[]`, `int4[]`, `text[]`, then `timestamp[]` three
    /// times and `text[]` twice).
    pub(crate) fn columns(&self) -> Vec<Bind<'_>> {
        let rows = &self.0;
        vec![
            Bind::Uuids(rows.iter().map(|r| r.id.into()).collect()),
            Bind::Uuids(rows.iter().map(|r| r.incident_id.into()).collect()),
            Bind::Texts(rows.iter().map(|r| r.unit_id.as_str()).collect()),
            Bind::Ints(rows.iter().map(|r| r.round).collect()),
            Bind::Texts(rows.iter().map(|r| r.status.as_str()).collect()),
            Bind::Ints(rows.iter().map(|r| r.eta_s).collect()),
            Bind::Texts(rows.iter().map(|r| r.reason.as_str()).collect()),
            Bind::Timestamps(rows.iter().map(|r| r.offered_at).collect()),
            Bind::Timestamps(rows.iter().map(|r| r.expires_at).collect()),
            Bind::OptTimestamps(rows.iter().map(|r| r.responded_at).collect()),
            Bind::OptTexts(rows.iter().map(|r| r.decline_reason.as_deref()).collect()),
            Bind::Texts(rows.iter().map(|r| r.eta_source.as_str()).collect()),
        ]
    }
}

/// Stores new offers (one multi-row insert).
pub async fn insert_offers(conn: &mut DbConn, batch: &[OfferRecord]) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let rows = OfferRows::new(batch);
    db_run!(conn, |c| {
        // SQLite (in-process): a row per statement.
        for row in &rows.0 {
            diesel::insert_into(offers::table)
                .values(row)
                .execute(c)
                .await?;
        }
    } else |c| {
        // Arrays unnested: one prepared statement whatever the row count (a multi-row
        // `values(&rows)` is parsed anew each time, a round trip that stalls a pipelined batch).
        const INSERT_OFFERS_PG: &[&str] = &[
            "INSERT INTO offers (id, incident_id, unit_id, round, status, eta_s, reason, \
             offered_at, expires_at, responded_at, decline_reason, eta_source) \
             SELECT * FROM unnest(",
            "::text[], ",
            "::text[], ",
            "::text[], ",
            "::int4[], ",
            "::text[], ",
            "::int4[], ",
            "::text[], ",
            "::timestamp[], ",
            "::timestamp[], ",
            "::timestamp[], ",
            "::text[], ",
            "::text[])",
        ];
        struct InsertOffersPg;
        Statement::<InsertOffersPg>::new(INSERT_OFFERS_PG, rows.columns())
            .execute(c)
            .await?;
    });
    Ok(())
}

/// Moves each of `ids` that is still pending to `status`; returns those it moved (one
/// statement on PostgreSQL).
pub async fn close_offers(
    conn: &mut DbConn,
    ids: &[OfferId],
    status: &str,
    at: DateTime<Utc>,
    decline_reason: Option<&str>,
) -> Result<Vec<OfferId>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let changes = (
        offers::status.eq(status),
        offers::responded_at.eq(Some(to_db_time(at))),
        offers::decline_reason.eq(decline_reason),
    );
    let moved: Vec<OfferId> = db_run!(conn, |c| {
        // SQLite (in-process): a statement per offer, since diesel has no RETURNING there.
        let mut moved = Vec::with_capacity(ids.len());
        for id in ids {
            let pending = offers::table
                .filter(offers::id.eq(id))
                .filter(offers::status.eq("pending"));
            if diesel::update(pending).set(changes).execute(c).await? == 1 {
                moved.push(*id);
            }
        }
        moved
    } else |c| {
        let pending = offers::table
            .filter(offers::id.eq_any(ids))
            .filter(offers::status.eq("pending"));
        diesel::update(pending)
            .set(changes)
            .returning(offers::id)
            .get_results(c)
            .await?
    });
    Ok(ids
        .iter()
        .filter(|id| moved.contains(id))
        .copied()
        .collect())
}

fn offer_from_row(r: OfferRow) -> OfferRecord {
    OfferRecord {
        id: r.id,
        incident_id: r.incident_id,
        unit_id: r.unit_id,
        round: u32::try_from(r.round).unwrap_or(0),
        status: r.status,
        eta_s: u32::try_from(r.eta_s).unwrap_or(0),
        reason: r.reason,
        offered_at: from_db_time(r.offered_at),
        expires_at: from_db_time(r.expires_at),
        responded_at: r.responded_at.map(from_db_time),
        decline_reason: r.decline_reason,
        eta_source: r.eta_source,
    }
}

/// The offers of an incident, oldest first.
pub async fn offers_for(
    conn: &mut DbConn,
    incident: IncidentId,
) -> Result<Vec<OfferRecord>, StoreError> {
    let rows: Vec<OfferRow> = db_run!(conn, |c| {
        offers::table
            .filter(offers::incident_id.eq(incident))
            .order((offers::offered_at.asc(), offers::id.asc()))
            .select(OfferRow::as_select())
            .load(c)
            .await?
    });
    Ok(rows.into_iter().map(offer_from_row).collect())
}

/// The offers of each of `incidents` (bulk form of [`offers_for`], for start-up).
pub async fn offers_for_many(
    conn: &mut DbConn,
    incidents: &[IncidentId],
) -> Result<std::collections::HashMap<IncidentId, Vec<OfferRecord>>, StoreError> {
    let mut by_incident: std::collections::HashMap<IncidentId, Vec<OfferRecord>> =
        std::collections::HashMap::new();
    for chunk in incidents.chunks(500) {
        let rows: Vec<OfferRow> = db_run!(conn, |c| {
            offers::table
                .filter(offers::incident_id.eq_any(chunk))
                .order((offers::offered_at.asc(), offers::id.asc()))
                .select(OfferRow::as_select())
                .load(c)
                .await?
        });
        for row in rows {
            let offer = offer_from_row(row);
            by_incident
                .entry(offer.incident_id)
                .or_default()
                .push(offer);
        }
    }
    Ok(by_incident)
}

/// One offer.
pub async fn find_offer(conn: &mut DbConn, id: OfferId) -> Result<Option<OfferRecord>, StoreError> {
    let row: Option<OfferRow> = db_run!(conn, |c| {
        offers::table
            .find(id)
            .select(OfferRow::as_select())
            .first(c)
            .await
            .optional()?
    });
    Ok(row.map(offer_from_row))
}
