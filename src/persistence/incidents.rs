//! Incident projections (the `incidents` row, evidence), references, the notification outbox
//! and the idempotency-key store. Written in the same transaction as the events they follow.

use chrono::{DateTime, Datelike, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::fleet::{OfferRecord, OfferRows};
use super::ids::UuidText;
use super::schema::{idempotency_keys, incident_evidence, incidents, notifications};
use super::statement::{Bind, Statement};
use super::{DbConn, StoreError, from_db_time, to_db_time};
use crate::db_run;
use crate::domain::events::NewEvent;
use crate::domain::geo::LatLng;
use crate::domain::ids::{HospitalId, IncidentId, PatientId, UnitId};
use crate::domain::incident::{Incident, IncidentStatus, Priority, Source, Times};

#[derive(Insertable, AsChangeset, Queryable, Selectable, Clone, Debug)]
#[diesel(table_name = incidents, treat_none_as_default_value = false, treat_none_as_null = true)]
struct IncidentRow {
    id: IncidentId,
    reference: String,
    status: String,
    priority: String,
    source: String,
    patient_id: Option<PatientId>,
    open_patient_id: Option<PatientId>,
    lat: f64,
    lng: f64,
    description: Option<String>,
    escalated: bool,
    assigned_unit_id: Option<UnitId>,
    hospital_id: Option<HospitalId>,
    dispatch_round: i32,
    evidence_count: i32,
    cancel_reason: Option<String>,
    call_received: Option<chrono::NaiveDateTime>,
    unit_notified: Option<chrono::NaiveDateTime>,
    unit_enroute: Option<chrono::NaiveDateTime>,
    unit_on_scene: Option<chrono::NaiveDateTime>,
    unit_left_scene: Option<chrono::NaiveDateTime>,
    at_destination: Option<chrono::NaiveDateTime>,
    closed_at: Option<chrono::NaiveDateTime>,
    created_at: chrono::NaiveDateTime,
    updated_at: chrono::NaiveDateTime,
    version: i64,
}

fn enum_str<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn enum_parse<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|e| StoreError::Corrupt(format!("incident {what} {s:?}: {e}")))
}

impl IncidentRow {
    fn from_domain(i: &Incident, version: i64, now: DateTime<Utc>) -> Self {
        let t = |x: Option<DateTime<Utc>>| x.map(to_db_time);
        Self {
            id: i.id,
            reference: i.reference.clone(),
            status: i.status.as_str().to_owned(),
            priority: enum_str(&i.priority),
            source: enum_str(&i.source),
            patient_id: i.patient_id.clone(),
            open_patient_id: i.patient_id.clone().filter(|_| i.status.is_open()),
            lat: i.location.lat,
            lng: i.location.lng,
            description: i.description.clone(),
            escalated: i.escalated,
            assigned_unit_id: i.assigned_unit_id.clone(),
            hospital_id: i.hospital_id.clone(),
            dispatch_round: i32::try_from(i.dispatch_round).unwrap_or(i32::MAX),
            evidence_count: i32::try_from(i.evidence_count).unwrap_or(i32::MAX),
            cancel_reason: i.cancel_reason.clone(),
            call_received: t(i.times.call_received),
            unit_notified: t(i.times.unit_notified),
            unit_enroute: t(i.times.unit_enroute),
            unit_on_scene: t(i.times.unit_on_scene),
            unit_left_scene: t(i.times.unit_left_scene),
            at_destination: t(i.times.at_destination),
            closed_at: t(i.times.closed),
            created_at: to_db_time(i.created_at),
            updated_at: to_db_time(now),
            version,
        }
    }

    fn into_domain(self) -> Result<(Incident, i64), StoreError> {
        let t = |x: Option<chrono::NaiveDateTime>| x.map(from_db_time);
        let incident = Incident {
            id: self.id,
            reference: self.reference,
            status: IncidentStatus::parse(&self.status)
                .ok_or_else(|| StoreError::Corrupt(format!("incident status {}", self.status)))?,
            priority: enum_parse::<Priority>(&self.priority, "priority")?,
            source: enum_parse::<Source>(&self.source, "source")?,
            patient_id: self.patient_id,
            location: LatLng {
                lat: self.lat,
                lng: self.lng,
            },
            description: self.description,
            created_at: from_db_time(self.created_at),
            escalated: self.escalated,
            assigned_unit_id: self.assigned_unit_id,
            hospital_id: self.hospital_id,
            dispatch_round: u32::try_from(self.dispatch_round).unwrap_or(0),
            times: Times {
                call_received: t(self.call_received),
                unit_notified: t(self.unit_notified),
                unit_enroute: t(self.unit_enroute),
                unit_on_scene: t(self.unit_on_scene),
                unit_left_scene: t(self.unit_left_scene),
                at_destination: t(self.at_destination),
                closed: t(self.closed_at),
            },
            evidence_count: u32::try_from(self.evidence_count).unwrap_or(0),
            cancel_reason: self.cancel_reason,
        };
        Ok((incident, self.version))
    }
}

/// The number an upsert on `incident_references` returned.
#[derive(diesel::QueryableByName)]
struct ReferenceNumber {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    last_number: i64,
}

/// Allocates the next human-readable reference for `year` (`INC-2026-000042`): one upsert
/// statement, which locks the year's row until the transaction ends, so numbers are unique and
/// gap-free per year.
pub async fn next_reference(conn: &mut DbConn, now: DateTime<Utc>) -> Result<String, StoreError> {
    const NEXT: &[&str] = &[
        "INSERT INTO incident_references (year, last_number) VALUES (",
        ", 1) ON CONFLICT (year) DO UPDATE \
         SET last_number = incident_references.last_number + 1 RETURNING last_number",
    ];
    struct Next;
    let year = now.year();
    let number: ReferenceNumber = db_run!(conn, |c| {
        Statement::<Next>::new(NEXT, vec![Bind::Int(year)])
            .get_result(c)
            .await?
    });
    Ok(format_reference(year, number.last_number))
}

/// The reference of number `number` in `year`: `INC-2026-000042`.
pub fn format_reference(year: i32, number: i64) -> String {
    format!("INC-{year}-{number:06}")
}

/// Reserves `count` consecutive reference numbers of `year` at once, committed on their own
/// (the caller hands them out; numbers it never uses leave a gap). Returns the first and the
/// last.
pub async fn reserve_references(
    conn: &mut DbConn,
    year: i32,
    count: i64,
) -> Result<(i64, i64), StoreError> {
    const RESERVE: &[&str] = &[
        "INSERT INTO incident_references (year, last_number) VALUES (",
        ", ",
        ") ON CONFLICT (year) DO UPDATE \
         SET last_number = incident_references.last_number + ",
        " RETURNING last_number",
    ];
    struct Reserve;
    let count = count.max(1);
    let number: ReferenceNumber = db_run!(conn, |c| {
        Statement::<Reserve>::new(
            RESERVE,
            vec![Bind::Int(year), Bind::BigInt(count), Bind::BigInt(count)],
        )
        .get_result(c)
        .await?
    });
    Ok((number.last_number - count + 1, number.last_number))
}

/// Inserts the projection of a new incident. A second open incident for the same patient
/// violates `open_patient_id`'s uniqueness: `StoreError::Conflict`.
pub async fn insert(
    conn: &mut DbConn,
    incident: &Incident,
    version: i64,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let row = IncidentRow::from_domain(incident, version, now);
    db_run!(conn, |c| {
        diesel::insert_into(incidents::table)
            .values(&row)
            .execute(c)
            .await?
    });
    Ok(())
}

/// Rewrites the projection of an incident after new events.
pub async fn update(
    conn: &mut DbConn,
    incident: &Incident,
    version: i64,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let row = IncidentRow::from_domain(incident, version, now);
    db_run!(conn, |c| {
        diesel::update(incidents::table.find(&row.id))
            .set(&row)
            .execute(c)
            .await?
    });
    Ok(())
}

/// Stores one evidence item.
pub async fn add_evidence(
    conn: &mut DbConn,
    incident: IncidentId,
    at: DateTime<Utc>,
    evidence: &serde_json::Value,
) -> Result<(), StoreError> {
    let body = serde_json::to_string(evidence)
        .map_err(|e| StoreError::Corrupt(format!("evidence: {e}")))?;
    db_run!(conn, |c| {
        diesel::insert_into(incident_evidence::table)
            .values((
                incident_evidence::id.eq(uuid::Uuid::now_v7().to_string()),
                incident_evidence::incident_id.eq(incident),
                incident_evidence::added_at.eq(to_db_time(at)),
                incident_evidence::evidence.eq(body),
            ))
            .execute(c)
            .await?
    });
    Ok(())
}

/// The evidence of an incident, oldest first.
pub async fn evidence_for(
    conn: &mut DbConn,
    incident: IncidentId,
) -> Result<Vec<(DateTime<Utc>, serde_json::Value)>, StoreError> {
    let rows: Vec<(chrono::NaiveDateTime, String)> = db_run!(conn, |c| {
        incident_evidence::table
            .filter(incident_evidence::incident_id.eq(incident))
            .order((
                incident_evidence::added_at.asc(),
                incident_evidence::id.asc(),
            ))
            .select((incident_evidence::added_at, incident_evidence::evidence))
            .load(c)
            .await?
    });
    rows.into_iter()
        .map(|(at, body)| {
            serde_json::from_str(&body)
                .map(|v| (from_db_time(at), v))
                .map_err(|e| StoreError::Corrupt(format!("evidence: {e}")))
        })
        .collect()
}

/// One incident's projection and version.
pub async fn find(
    conn: &mut DbConn,
    id: IncidentId,
) -> Result<Option<(Incident, i64)>, StoreError> {
    let row: Option<IncidentRow> = db_run!(conn, |c| {
        incidents::table
            .find(id)
            .select(IncidentRow::as_select())
            .first(c)
            .await
            .optional()?
    });
    row.map(IncidentRow::into_domain).transpose()
}

/// The open incident of a patient, if any.
pub async fn open_for_patient(
    conn: &mut DbConn,
    patient: &PatientId,
) -> Result<Option<IncidentId>, StoreError> {
    Ok(db_run!(conn, |c| {
        incidents::table
            .filter(incidents::open_patient_id.eq(patient))
            .select(incidents::id)
            .first(c)
            .await
            .optional()?
    }))
}

/// Ids of every open incident (recovery at start-up).
pub async fn open_ids(conn: &mut DbConn) -> Result<Vec<IncidentId>, StoreError> {
    Ok(db_run!(conn, |c| {
        incidents::table
            .filter(incidents::status.ne_all(["closed", "cancelled"]))
            .select(incidents::id)
            .load(c)
            .await?
    }))
}

/// Ids of the incidents in any of `statuses` (billing's recovery: those at the hospital or in
/// billing, whatever their invoice says).
pub async fn ids_in_status(
    conn: &mut DbConn,
    statuses: &[IncidentStatus],
) -> Result<Vec<IncidentId>, StoreError> {
    let names: Vec<&'static str> = statuses.iter().map(|s| s.as_str()).collect();
    Ok(db_run!(conn, |c| {
        incidents::table
            .filter(incidents::status.eq_any(&names))
            .select(incidents::id)
            .load(c)
            .await?
    }))
}

/// How many incidents there are in each status (`(status, count)`, one row per status present).
pub async fn count_by_status(conn: &mut DbConn) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(db_run!(conn, |c| {
        incidents::table
            .group_by(incidents::status)
            .select((incidents::status, diesel::dsl::count_star()))
            .order_by(incidents::status)
            .load::<(String, i64)>(c)
            .await?
    }))
}

/// Which incidents a list shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StatusFilter {
    /// Not closed or cancelled.
    #[default]
    Open,
    /// Closed or cancelled.
    Closed,
    /// Open and closed incidents alike.
    All,
}

/// A page of incidents, newest first, after the keyset cursor `(created_at, id)`.
pub async fn page(
    conn: &mut DbConn,
    filter: StatusFilter,
    after: Option<(DateTime<Utc>, String)>,
    limit: i64,
) -> Result<Vec<Incident>, StoreError> {
    let rows: Vec<IncidentRow> = db_run!(conn, |c| {
        let mut q = incidents::table.into_boxed();
        q = match filter {
            StatusFilter::Open => q.filter(incidents::status.ne_all(["closed", "cancelled"])),
            StatusFilter::Closed => q.filter(incidents::status.eq_any(["closed", "cancelled"])),
            StatusFilter::All => q,
        };
        if let Some((at, id)) = &after {
            let at = to_db_time(*at);
            q = q.filter(
                incidents::created_at.lt(at).or(incidents::created_at
                    .eq(at)
                    .and(incidents::id.lt(id.clone()))),
            );
        }
        q.order((incidents::created_at.desc(), incidents::id.desc()))
            .limit(limit)
            .select(IncidentRow::as_select())
            .load(c)
            .await?
    });
    rows.into_iter()
        .map(|r| r.into_domain().map(|(i, _)| i))
        .collect()
}

/// Everything a new incident stores when it is created: its first events, its projection, the
/// evidence behind it, its next-of-kin outbox rows and its first offers.
pub struct NewIncident<'a> {
    /// The incident as its events leave it.
    pub incident: &'a Incident,
    /// Its events, in order (the stream's versions 1 to n).
    pub events: &'a [NewEvent],
    /// The evidence attached at creation.
    pub evidence: Vec<&'a serde_json::Value>,
    /// Next-of-kin notifications to queue.
    pub outbox: &'a [NewNotification],
    /// The first offer round.
    pub offers: &'a [OfferRecord],
}

/// PostgreSQL: a new incident in one statement (data-modifying CTEs), so it is atomic without
/// a transaction and costs one round trip: the sequence bump and the events (versions 1 to n:
/// if the stream exists, the unique `(stream_id, version)` constraint refuses them, as the
/// incident's primary key refuses its projection), the projection, evidence, outbox rows
/// (an already queued key is left alone) and offers. The foreign key from the evidence to the
/// incident is checked at the end of the statement, when the incident row exists.
/// Binds: count, count, stream, recorded_at, [`super::events::columns`], the 26 incident
/// columns, incident id, evidence time, evidence ids, evidence bodies, incident id, now ×3,
/// outbox ids, names, channels, addresses, templates, keys, then [`OfferRows::columns`].
const CREATE_PG: &[&str] = &[
    "WITH bumped AS (UPDATE event_sequence SET last_seq = last_seq + ",
    " WHERE id = 1 RETURNING last_seq), \
     ev AS (INSERT INTO events \
     (seq, stream_id, version, kind, incident_id, unit_id, device_id, payload, recorded_at) \
     SELECT bumped.last_seq - ",
    " + t.ord, ",
    ", t.ord, t.kind, t.incident_id, t.unit_id, t.device_id, t.payload, ",
    " FROM bumped, unnest(",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[]) WITH ORDINALITY AS t(kind, incident_id, unit_id, device_id, payload, ord) \
     RETURNING seq), \
     inc AS (INSERT INTO incidents (id, reference, status, priority, source, patient_id, \
     open_patient_id, lat, lng, description, escalated, assigned_unit_id, hospital_id, \
     dispatch_round, evidence_count, cancel_reason, call_received, unit_notified, unit_enroute, \
     unit_on_scene, unit_left_scene, at_destination, closed_at, created_at, updated_at, version) \
     VALUES (",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ", ",
    ")), \
     evi AS (INSERT INTO incident_evidence (id, incident_id, added_at, evidence) \
     SELECT t.id, ",
    ", ",
    ", t.evidence FROM unnest(",
    "::text[], ",
    "::text[]) AS t(id, evidence)), \
     nt AS (INSERT INTO notifications (id, incident_id, recipient_name, channel, address, \
     template, idempotency_key, status, attempts, next_attempt_at, created_at, updated_at) \
     SELECT t.id, ",
    ", t.recipient_name, t.channel, t.address, t.template, t.idempotency_key, 'queued', 0, ",
    ", ",
    ", ",
    " FROM unnest(",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[], ",
    "::text[]) AS t(id, recipient_name, channel, address, template, idempotency_key) \
     ON CONFLICT (idempotency_key) DO NOTHING), \
     off AS (INSERT INTO offers (id, incident_id, unit_id, round, status, eta_s, reason, \
     offered_at, expires_at, responded_at, decline_reason, eta_source) SELECT * FROM unnest(",
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
    "::text[])) \
     SELECT count(*) AS stored FROM ev",
];
struct CreatePg;

/// What [`CREATE_PG`] returns: how many events it stored.
#[derive(diesel::QueryableByName)]
struct Created {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    stored: i64,
}

/// Stores a new incident in one statement (a data-modifying `WITH` query): PostgreSQL only,
/// atomic on its own. Returns the stream's version. A stream or incident that already exists is a
/// `Conflict`, and so is the patient's other open incident.
// Long on purpose: one SQL statement (a data-modifying WITH) and its binds, which only
// read well together.
pub async fn create_pg(
    conn: &mut DbConn,
    new: &NewIncident<'_>,
    now: DateTime<Utc>,
) -> Result<i64, StoreError> {
    let count = i64::try_from(new.events.len())
        .map_err(|_| StoreError::Conflict("too many events".into()))?;
    let payloads = super::events::payloads(new.events)?;
    let recorded_at = to_db_time(super::events::recorded_at(now));
    let row = IncidentRow::from_domain(new.incident, count, now);
    let stream = format!("incident-{}", row.id);
    let id = UuidText::from(row.id);
    let now = to_db_time(now);
    let evidence = new
        .evidence
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Corrupt(format!("evidence: {e}")))?;
    let evidence_ids: Vec<String> = evidence
        .iter()
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let outbox = new.outbox;
    let offers = OfferRows::new(new.offers);
    let mut binds = vec![
        Bind::BigInt(count),
        Bind::BigInt(count),
        Bind::Text(&stream),
        Bind::Timestamp(recorded_at),
    ];
    binds.extend(super::events::columns(new.events, &payloads));
    binds.extend([
        Bind::Uuid(id),
        Bind::Text(&row.reference),
        Bind::Text(&row.status),
        Bind::Text(&row.priority),
        Bind::Text(&row.source),
        Bind::OptText(row.patient_id.as_ref().map(PatientId::as_str)),
        Bind::OptText(row.open_patient_id.as_ref().map(PatientId::as_str)),
        Bind::Double(row.lat),
        Bind::Double(row.lng),
        Bind::OptText(row.description.as_deref()),
        Bind::Bool(row.escalated),
        Bind::OptText(row.assigned_unit_id.as_ref().map(UnitId::as_str)),
        Bind::OptText(row.hospital_id.as_ref().map(HospitalId::as_str)),
        Bind::Int(row.dispatch_round),
        Bind::Int(row.evidence_count),
        Bind::OptText(row.cancel_reason.as_deref()),
        Bind::OptTimestamp(row.call_received),
        Bind::OptTimestamp(row.unit_notified),
        Bind::OptTimestamp(row.unit_enroute),
        Bind::OptTimestamp(row.unit_on_scene),
        Bind::OptTimestamp(row.unit_left_scene),
        Bind::OptTimestamp(row.at_destination),
        Bind::OptTimestamp(row.closed_at),
        Bind::Timestamp(row.created_at),
        Bind::Timestamp(row.updated_at),
        Bind::BigInt(row.version),
        Bind::Uuid(id),
        Bind::Timestamp(now),
        Bind::Texts(evidence_ids.iter().map(String::as_str).collect()),
        Bind::Texts(evidence.iter().map(String::as_str).collect()),
        Bind::Uuid(id),
        Bind::Timestamp(now),
        Bind::Timestamp(now),
        Bind::Timestamp(now),
        Bind::Texts(outbox.iter().map(|n| n.id.as_str()).collect()),
        Bind::Texts(outbox.iter().map(|n| n.recipient_name.as_str()).collect()),
        Bind::Texts(outbox.iter().map(|n| n.channel).collect()),
        Bind::Texts(outbox.iter().map(|n| n.address.as_str()).collect()),
        Bind::Texts(outbox.iter().map(|n| n.template).collect()),
        Bind::Texts(outbox.iter().map(|n| n.idempotency_key.as_str()).collect()),
    ]);
    binds.extend(offers.columns());
    let created: Created = db_run!(conn, |_sqlite| {
        return Err(StoreError::Unavailable(
            "a one-statement create is PostgreSQL-only".into(),
        ));
    } else |c| {
        Statement::<CreatePg>::new(CREATE_PG, binds)
            .get_result(c)
            .await?
    });
    if created.stored != count {
        return Err(StoreError::Corrupt(format!(
            "a new incident stored {} of its {count} events",
            created.stored
        )));
    }
    Ok(count)
}

/// A notification to queue.
#[derive(Clone, Debug)]
pub struct NewNotification {
    /// Row id.
    pub id: String,
    /// The incident this concerns.
    pub incident_id: IncidentId,
    /// Who (a name: patient data, never logged).
    pub recipient_name: String,
    /// `sms`, `email`, `webhook` or `sns` (the SNS topic).
    pub channel: &'static str,
    /// Phone, email or URL (patient data, never logged).
    pub address: String,
    /// Template name.
    pub template: &'static str,
    /// `(incident, recipient, template)` key that makes delivery at-least-once but not twice.
    pub idempotency_key: String,
}

/// Queues notifications (outbox rows); an already queued key is left alone.
pub async fn queue_notifications(
    conn: &mut DbConn,
    batch: &[NewNotification],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let now = to_db_time(now);
    // One insert per row (each prepared once), sent together when pipelined.
    conn.try_each(batch, async |conn, n| {
        let values = (
            notifications::id.eq(&n.id),
            notifications::incident_id.eq(n.incident_id),
            notifications::recipient_name.eq(&n.recipient_name),
            notifications::channel.eq(n.channel),
            notifications::address.eq(&n.address),
            notifications::template.eq(n.template),
            notifications::idempotency_key.eq(&n.idempotency_key),
            notifications::status.eq("queued"),
            notifications::attempts.eq(0),
            notifications::next_attempt_at.eq(now),
            notifications::created_at.eq(now),
            notifications::updated_at.eq(now),
        );
        db_run!(conn, |c| {
            diesel::insert_into(notifications::table)
                .values(values)
                .on_conflict(notifications::idempotency_key)
                .do_nothing()
                .execute(c)
                .await?
        });
        Ok::<_, StoreError>(())
    })
    .await?;
    Ok(())
}

/// A notification as shown on an incident (no address: patient data stays in the outbox).
#[derive(Clone, Debug, serde::Serialize, Queryable)]
pub struct NotificationView {
    /// Row id.
    pub id: String,
    /// Recipient's name.
    pub recipient_name: String,
    /// How it is delivered: `sms`, `email`, `webhook` or `sns` (the SNS topic).
    pub channel: String,
    /// Which message it is (`incident_created`, `unit_assigned`, ...).
    pub template: String,
    /// `queued`, `sent` or `failed`.
    pub status: String,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// Last error, if any.
    pub last_error: Option<String>,
}

/// The notifications of an incident.
pub async fn notifications_for(
    conn: &mut DbConn,
    incident: IncidentId,
) -> Result<Vec<NotificationView>, StoreError> {
    Ok(db_run!(conn, |c| {
        notifications::table
            .filter(notifications::incident_id.eq(incident))
            .order(notifications::created_at.asc())
            .select((
                notifications::id,
                notifications::recipient_name,
                notifications::channel,
                notifications::template,
                notifications::status,
                notifications::attempts,
                notifications::last_error,
            ))
            .load(c)
            .await?
    }))
}

/// What the idempotency store says about a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdempotencyState {
    /// First use: the caller goes ahead and records the response.
    New,
    /// A request with this key is still running.
    InProgress,
    /// The first response, to replay.
    Done {
        /// HTTP status.
        status: u16,
        /// The message text.
        body: String,
    },
}

/// Claims `key` for `principal` on `route`, or reports what an earlier request left.
pub async fn idempotency_claim(
    conn: &mut DbConn,
    principal: &str,
    key: &str,
    route: &str,
    now: DateTime<Utc>,
) -> Result<IdempotencyState, StoreError> {
    let inserted = db_run!(conn, |c| {
        diesel::insert_into(idempotency_keys::table)
            .values((
                idempotency_keys::principal.eq(principal),
                idempotency_keys::idem_key.eq(key),
                idempotency_keys::route.eq(route),
                idempotency_keys::created_at.eq(to_db_time(now)),
            ))
            .on_conflict_do_nothing()
            .execute(c)
            .await?
    });
    if inserted == 1 {
        return Ok(IdempotencyState::New);
    }
    let (status, body): (Option<i32>, Option<String>) = db_run!(conn, |c| {
        idempotency_keys::table
            .find((principal, key))
            .select((idempotency_keys::status, idempotency_keys::body))
            .first(c)
            .await?
    });
    Ok(match (status, body) {
        (Some(status), Some(body)) => IdempotencyState::Done {
            status: u16::try_from(status).unwrap_or(500),
            body,
        },
        _ => IdempotencyState::InProgress,
    })
}

/// Records the response to a claimed key (or releases the claim when `response` is `None`, so
/// a failed request can be retried with the same key).
pub async fn idempotency_finish(
    conn: &mut DbConn,
    principal: &str,
    key: &str,
    response: Option<(u16, &str)>,
) -> Result<(), StoreError> {
    let target = idempotency_keys::table.find((principal, key));
    db_run!(conn, |c| {
        match response {
            Some((status, body)) => {
                diesel::update(target)
                    .set((
                        idempotency_keys::status.eq(Some(i32::from(status))),
                        idempotency_keys::body.eq(Some(body)),
                    ))
                    .execute(c)
                    .await?
            }
            None => diesel::delete(target).execute(c).await?,
        }
    });
    Ok(())
}

/// A due notification, with what the worker needs to deliver it.
#[derive(Clone, Debug, Queryable)]
pub struct DueNotification {
    /// Row id.
    pub id: String,
    /// The incident this concerns.
    pub incident_id: IncidentId,
    /// Recipient's name (patient data: never logged).
    pub recipient_name: String,
    /// `sms`, `email`, `webhook`, `sns`.
    pub channel: String,
    /// Phone, email or URL (patient data: never logged).
    pub address: String,
    /// Template name.
    pub template: String,
    /// Delivery idempotency key.
    pub idempotency_key: String,
    /// Attempts so far.
    pub attempts: i32,
}

/// Queued notifications whose next attempt is due, oldest first.
pub async fn due_notifications(
    conn: &mut DbConn,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<DueNotification>, StoreError> {
    Ok(db_run!(conn, |c| {
        notifications::table
            .filter(notifications::status.eq("queued"))
            .filter(notifications::next_attempt_at.le(to_db_time(now)))
            .order(notifications::next_attempt_at.asc())
            .limit(limit)
            .select((
                notifications::id,
                notifications::incident_id,
                notifications::recipient_name,
                notifications::channel,
                notifications::address,
                notifications::template,
                notifications::idempotency_key,
                notifications::attempts,
            ))
            .load(c)
            .await?
    }))
}

/// Records a delivery attempt's outcome: `sent`, `failed`, or still `queued` for a retry at
/// `next_attempt_at`.
pub async fn record_attempt(
    conn: &mut DbConn,
    id: &str,
    status: &str,
    attempts: i32,
    next_attempt_at: DateTime<Utc>,
    last_error: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    db_run!(conn, |c| {
        diesel::update(notifications::table.find(id))
            .set((
                notifications::status.eq(status),
                notifications::attempts.eq(attempts),
                notifications::next_attempt_at.eq(to_db_time(next_attempt_at)),
                notifications::last_error.eq(last_error),
                notifications::updated_at.eq(to_db_time(now)),
            ))
            .execute(c)
            .await?
    });
    Ok(())
}

/// The NEMSIS times of incidents created in `[from, to)`, optionally of one priority.
pub async fn times_in_range(
    conn: &mut DbConn,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    priority: Option<Priority>,
) -> Result<Vec<Times>, StoreError> {
    let priority = priority.map(|p| enum_str(&p));
    let rows: Vec<IncidentRow> = db_run!(conn, |c| {
        let mut q = incidents::table
            .filter(incidents::created_at.ge(to_db_time(from)))
            .filter(incidents::created_at.lt(to_db_time(to)))
            .into_boxed();
        if let Some(p) = &priority {
            q = q.filter(incidents::priority.eq(p.clone()));
        }
        q.select(IncidentRow::as_select()).load(c).await?
    });
    rows.into_iter()
        .map(|r| r.into_domain().map(|(i, _)| i.times))
        .collect()
}
