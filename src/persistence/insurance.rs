//! The insurance service's store: policies and claim holds. Verification takes a hold on the
//! policy's remaining coverage; releasing the claim gives it back. One claim per incident, so
//! a repeated verification returns the first decision.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::Serialize;

use super::schema::{insurance_claims, insurance_policies};
use super::{DbConn, StoreError, to_db_time};
use crate::db_run;
use crate::domain::billing::{Coverage, InsuranceDecision, decide_coverage};
use crate::domain::ids::PatientId;

/// A stored policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Its stable identifier.
    pub id: String,
    /// Insured patient.
    pub patient_id: PatientId,
    /// The insurer, by name.
    pub provider: String,
    /// Member number.
    pub member_id: String,
    /// Coverage left, minor units.
    pub remaining_cents: i64,
}

/// Creates (or replaces the terms of) a patient's policy.
pub async fn upsert_policy(
    conn: &mut DbConn,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    db_run!(conn, |c| {
        diesel::insert_into(insurance_policies::table)
            .values((
                insurance_policies::id.eq(&policy.id),
                insurance_policies::patient_id.eq(policy.patient_id.as_str()),
                insurance_policies::provider.eq(&policy.provider),
                insurance_policies::member_id.eq(&policy.member_id),
                insurance_policies::remaining_cents.eq(policy.remaining_cents),
                insurance_policies::created_at.eq(to_db_time(now)),
            ))
            .on_conflict(insurance_policies::patient_id)
            .do_update()
            .set((
                insurance_policies::provider.eq(&policy.provider),
                insurance_policies::member_id.eq(&policy.member_id),
                insurance_policies::remaining_cents.eq(policy.remaining_cents),
            ))
            .execute(c)
            .await?
    });
    Ok(())
}

fn coverage_of(amount: i64, covered: i64) -> Coverage {
    if covered <= 0 {
        Coverage::NotCovered
    } else if covered >= amount {
        Coverage::FullyCovered
    } else {
        Coverage::PartiallyCovered
    }
}

/// Verifies coverage for an incident's bill and holds the covered part, in one write
/// transaction. `Conflict` when the incident was already verified with another amount.
pub async fn verify(
    conn: &mut DbConn,
    patient_id: &PatientId,
    incident_id: &str,
    amount_cents: i64,
    now: DateTime<Utc>,
) -> Result<InsuranceDecision, StoreError> {
    conn.write_transaction(async |tx| {
        verify_in(tx, patient_id, incident_id, amount_cents, now).await
    })
    .await
}

async fn verify_in(
    conn: &mut DbConn,
    patient_id: &PatientId,
    incident_id: &str,
    amount_cents: i64,
    now: DateTime<Utc>,
) -> Result<InsuranceDecision, StoreError> {
    type ClaimRow = (String, i64, i64);
    let existing: Option<ClaimRow> = db_run!(conn, |c| {
        insurance_claims::table
            .filter(insurance_claims::incident_id.eq(incident_id))
            .select((
                insurance_claims::id,
                insurance_claims::amount_cents,
                insurance_claims::covered_cents,
            ))
            .first(c)
            .await
            .optional()?
    });
    if let Some((id, amount, covered)) = existing {
        if amount != amount_cents {
            return Err(StoreError::Conflict(format!(
                "incident already verified for {amount} (asked {amount_cents})"
            )));
        }
        return Ok(InsuranceDecision {
            coverage: coverage_of(amount, covered),
            covered_cents: covered,
            patient_due_cents: amount - covered,
            claim_id: Some(id),
        });
    }
    let policy: Option<(String, i64)> = db_run!(conn, |c| {
        insurance_policies::table
            .filter(insurance_policies::patient_id.eq(patient_id.as_str()))
            .select((insurance_policies::id, insurance_policies::remaining_cents))
            .first(c)
            .await
            .optional()?
    });
    let mut decision = decide_coverage(amount_cents, policy.as_ref().map(|(_, r)| *r));
    let claim_id = format!("clm_{}", uuid::Uuid::now_v7().simple());
    let covered = decision.covered_cents;
    let policy_id = policy.map(|(id, _)| id);
    db_run!(conn, |c| {
        if let Some(pid) = &policy_id {
            diesel::update(insurance_policies::table.find(pid))
                .set(
                    insurance_policies::remaining_cents
                        .eq(insurance_policies::remaining_cents - covered),
                )
                .execute(c)
                .await?;
        }
        diesel::insert_into(insurance_claims::table)
            .values((
                insurance_claims::id.eq(&claim_id),
                insurance_claims::policy_id.eq(&policy_id),
                insurance_claims::patient_id.eq(patient_id.as_str()),
                insurance_claims::incident_id.eq(incident_id),
                insurance_claims::amount_cents.eq(amount_cents),
                insurance_claims::covered_cents.eq(covered),
                insurance_claims::status.eq("held"),
                insurance_claims::created_at.eq(to_db_time(now)),
            ))
            .execute(c)
            .await?;
    });
    decision.claim_id = Some(claim_id);
    Ok(decision)
}

/// Releases a held claim, returning its covered amount to the policy, in one write
/// transaction (idempotent; `NotFound` for an unknown claim).
pub async fn release(
    conn: &mut DbConn,
    claim_id: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    conn.write_transaction(async |tx| release_in(tx, claim_id, now).await)
        .await
}

async fn release_in(
    conn: &mut DbConn,
    claim_id: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let claim: Option<(Option<String>, i64, String)> = db_run!(conn, |c| {
        insurance_claims::table
            .find(claim_id)
            .select((
                insurance_claims::policy_id,
                insurance_claims::covered_cents,
                insurance_claims::status,
            ))
            .first(c)
            .await
            .optional()?
    });
    let Some((policy_id, covered, status)) = claim else {
        return Err(StoreError::NotFound);
    };
    if status == "released" {
        return Ok(());
    }
    db_run!(conn, |c| {
        diesel::update(insurance_claims::table.find(claim_id))
            .set((
                insurance_claims::status.eq("released"),
                insurance_claims::released_at.eq(Some(to_db_time(now))),
            ))
            .execute(c)
            .await?;
        if let Some(pid) = &policy_id {
            diesel::update(insurance_policies::table.find(pid))
                .set(
                    insurance_policies::remaining_cents
                        .eq(insurance_policies::remaining_cents + covered),
                )
                .execute(c)
                .await?;
        }
    });
    Ok(())
}
