//! Invoices: one per incident (unique constraint), holding the billing saga's state so a
//! restarted process resumes it exactly where it stopped.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::invoices;
use super::{DbConn, StoreError, to_db_time};
use crate::db_run;
use crate::domain::billing::Saga;
use crate::domain::ids::IncidentId;

/// A stored invoice.
#[derive(Clone, Debug)]
pub struct Invoice {
    /// Its stable identifier.
    pub id: String,
    /// The saga (status, amounts, steps).
    pub saga: Saga,
    /// Payment provider name (`stripe`, `sandbox`).
    pub provider: String,
    /// Whether the saga has finished.
    pub done: bool,
}

fn covered(saga: &Saga) -> (i64, i64) {
    saga.insurance.as_ref().map_or((0, saga.amount_cents), |d| {
        (d.covered_cents, d.patient_due_cents)
    })
}

fn status_str(saga: &Saga) -> String {
    serde_json::to_value(saga.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Creates the invoice of an incident; `Conflict` when it already has one.
pub async fn insert(
    conn: &mut DbConn,
    id: &str,
    saga: &Saga,
    provider: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let body = serde_json::to_string(saga).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let (covered, due) = covered(saga);
    db_run!(conn, |c| {
        diesel::insert_into(invoices::table)
            .values((
                invoices::id.eq(id),
                invoices::incident_id.eq(&saga.incident_id),
                invoices::status.eq(status_str(saga)),
                invoices::amount_cents.eq(saga.amount_cents),
                invoices::covered_cents.eq(covered),
                invoices::patient_due_cents.eq(due),
                invoices::currency.eq(&saga.currency),
                invoices::provider.eq(provider),
                invoices::saga.eq(&body),
                invoices::done.eq(false),
                invoices::created_at.eq(to_db_time(now)),
                invoices::updated_at.eq(to_db_time(now)),
            ))
            .execute(c)
            .await?
    });
    Ok(())
}

/// Saves the saga's new state.
pub async fn save(
    conn: &mut DbConn,
    saga: &Saga,
    done: bool,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let body = serde_json::to_string(saga).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let (covered, due) = covered(saga);
    db_run!(conn, |c| {
        diesel::update(invoices::table.filter(invoices::incident_id.eq(&saga.incident_id)))
            .set((
                invoices::status.eq(status_str(saga)),
                invoices::covered_cents.eq(covered),
                invoices::patient_due_cents.eq(due),
                invoices::saga.eq(&body),
                invoices::done.eq(done),
                invoices::updated_at.eq(to_db_time(now)),
            ))
            .execute(c)
            .await?
    });
    Ok(())
}

fn decode(row: (String, String, String, bool)) -> Result<Invoice, StoreError> {
    let (id, body, provider, done) = row;
    Ok(Invoice {
        id,
        saga: serde_json::from_str(&body)
            .map_err(|e| StoreError::Corrupt(format!("invoice saga: {e}")))?,
        provider,
        done,
    })
}

/// The invoice of an incident.
pub async fn for_incident(
    conn: &mut DbConn,
    incident_id: IncidentId,
) -> Result<Option<Invoice>, StoreError> {
    let row: Option<(String, String, String, bool)> = db_run!(conn, |c| {
        invoices::table
            .filter(invoices::incident_id.eq(incident_id))
            .select((
                invoices::id,
                invoices::saga,
                invoices::provider,
                invoices::done,
            ))
            .first(c)
            .await
            .optional()?
    });
    row.map(decode).transpose()
}

/// Invoices whose saga has not finished (resumed at start-up).
pub async fn unfinished(conn: &mut DbConn) -> Result<Vec<Invoice>, StoreError> {
    let rows: Vec<(String, String, String, bool)> = db_run!(conn, |c| {
        invoices::table
            .filter(invoices::done.eq(false))
            .select((
                invoices::id,
                invoices::saga,
                invoices::provider,
                invoices::done,
            ))
            .load(c)
            .await?
    });
    rows.into_iter().map(decode).collect()
}

/// How many invoices there are in each status (`(status, count)`, one row per status present).
pub async fn count_by_status(conn: &mut DbConn) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(db_run!(conn, |c| {
        invoices::table
            .group_by(invoices::status)
            .select((invoices::status, diesel::dsl::count_star()))
            .order_by(invoices::status)
            .load::<(String, i64)>(c)
            .await?
    }))
}
