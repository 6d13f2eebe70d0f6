//! `Billing`: runs one billing saga per incident that reached the hospital.
//!
//! Each step is decided by the pure saga (`domain::billing`), executed against the insurance
//! service (always over HTTP) or the payment provider, and its outcome persisted on the
//! invoice before the next step; every outbound call carries an idempotency key derived from
//! the incident and the step, so a saga resumed after a crash never charges twice (the
//! provider replays the first answer). Failures run the compensations in reverse order. When
//! the saga ends the incident closes and its unit is released.

use std::collections::HashSet;
use std::sync::Arc;

use actix::prelude::*;
use chrono::Utc;
use serde::Serialize;
use serde_json::Value;

use crate::actors::incident::{IncidentDirectory, Route};
use crate::actors::unit::{Fleet, HospitalLocation, IncidentOver, UnitAddr, ViewUnit};
use crate::domain::billing::{
    self, Coverage, InsuranceDecision, Saga, Step, StepResult, Tariff, apply, backoff, is_done,
    next_step,
};
use crate::domain::dispatch::Capability;
use crate::domain::events::{BillingEvent, BillingOutcome, ExpectedVersion};
use crate::domain::ids::IncidentId;
use crate::domain::incident::{Command, IncidentStatus};
use crate::integrations::payments::{ChargeRequest, PaymentError, PaymentProvider};
use crate::persistence::cluster::confirm_lease;
use crate::persistence::incidents as incident_store;
use crate::persistence::invoices;
use crate::persistence::{Db, StoreError, events, patients};

/// How billing reaches its dependencies.
#[derive(Clone)]
pub struct BillingDeps {
    /// The database pool (saga state and invoices).
    pub db: Db,
    /// Insurance service base URL (`…` without `/insurance/v1`).
    pub insurance_base: String,
    /// Token for the insurance service (role admin).
    pub insurance_token: String,
    /// Payment provider.
    pub payments: Arc<dyn PaymentProvider>,
    /// What a transport costs.
    pub tariff: Tariff,
    /// HTTP client.
    pub http: reqwest::Client,
    /// Fleet (hospital location, unit capability, releasing the unit).
    pub fleet: Addr<Fleet>,
    /// Incidents (closing).
    pub incidents: Addr<IncidentDirectory>,
}

/// The billing hub.
pub struct Billing {
    deps: BillingDeps,
    running: HashSet<IncidentId>,
}

impl Billing {
    /// A hub; send [`ResumeBilling`] at start-up.
    pub fn new(deps: BillingDeps) -> Self {
        Self {
            deps,
            running: HashSet::new(),
        }
    }

    fn run(&mut self, incident: IncidentId, ctx: &mut Context<Self>) {
        if !self.running.insert(incident) {
            return;
        }
        let deps = self.deps.clone();
        ctx.spawn(async move { drive(deps, incident).await }.into_actor(self).map(move |res, act, _| {
            act.running.remove(&incident);
            if let Err(e) = res {
                tracing::warn!(incident.id = %incident, error = %e, "billing saga interrupted; it resumes at the next start");
            }
        }));
    }
}

impl Actor for Billing {
    type Context = Context<Self>;
}

/// Start (or resume) billing an incident.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StartBilling(pub IncidentId);

impl Handler<StartBilling> for Billing {
    type Result = ();

    fn handle(&mut self, msg: StartBilling, ctx: &mut Self::Context) {
        self.run(msg.0, ctx);
    }
}

/// Resume every saga that may not have ended (start-up, dispatch takeover): each unfinished
/// invoice, and each incident still at the hospital or in billing, whatever its invoice says.
/// An incident can be in billing with no invoice (the process died before it was created) or
/// with a finished one (it died before the outcome or the close was stored); both are driven
/// to the end from where they stand.
#[derive(Message, Debug)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct ResumeBilling;

impl Handler<ResumeBilling> for Billing {
    type Result = ResponseActFuture<Self, Result<usize, StoreError>>;

    fn handle(&mut self, _: ResumeBilling, _: &mut Self::Context) -> Self::Result {
        let db = self.deps.db.clone();
        Box::pin(
            async move {
                db.run(|mut conn| async move {
                    let mut ids: Vec<IncidentId> = invoices::unfinished(&mut conn)
                        .await?
                        .iter()
                        .filter_map(|inv| inv.saga.incident_id.parse().ok())
                        .collect();
                    ids.extend(
                        incident_store::ids_in_status(
                            &mut conn,
                            &[IncidentStatus::AtHospital, IncidentStatus::Billing],
                        )
                        .await?,
                    );
                    ids.sort_unstable();
                    ids.dedup();
                    Ok::<_, StoreError>(ids)
                })
                .await
            }
            .into_actor(self)
            .map(|res, act, ctx| {
                let ids = res?;
                for id in &ids {
                    act.run(*id, ctx);
                }
                Ok(ids.len())
            }),
        )
    }
}

async fn record(db: &Db, saga: &Saga, event: Option<BillingEvent>) -> Result<(), StoreError> {
    let (saga, event) = (saga.clone(), event.map(|e| e.to_new()));
    let done = is_done(&saga);
    db.run(move |mut conn| async move {
        conn.write_transaction(async |tx| {
            invoices::save(tx, &saga, done, Utc::now()).await?;
            if let Some(e) = event {
                events::append(
                    tx,
                    &format!("billing-{}", saga.incident_id),
                    ExpectedVersion::Any,
                    &[e],
                    Utc::now(),
                )
                .await?;
            }
            Ok::<_, StoreError>(())
        })
        .await
    })
    .await
}

/// Loads or creates the invoice: tariff from the scene→hospital distance and the unit's level.
async fn load_or_create(
    deps: &BillingDeps,
    incident: IncidentId,
) -> Result<(Saga, String), StoreError> {
    let db = deps.db.clone();
    if let Some(inv) = db
        .run(move |mut conn| async move { invoices::for_incident(&mut conn, incident).await })
        .await?
    {
        return Ok((inv.saga, inv.id));
    }
    let found = db
        .run(move |mut conn| async move { incident_store::find(&mut conn, incident).await })
        .await?
        .ok_or(StoreError::NotFound)?;
    let (state, _) = found;
    let mut distance_m = 0.0;
    if let Some(h) = &state.hospital_id
        && let Ok(Some(location)) = deps.fleet.send(HospitalLocation(h.clone())).await
    {
        distance_m = state.location.distance_m(&location);
    }
    let mut als = false;
    if let Some(u) = &state.assigned_unit_id
        && let Ok(Some(addr)) = deps.fleet.send(UnitAddr(u.clone())).await
        && let Ok(view) = addr.send(ViewUnit).await
    {
        als = view.capability == Capability::Als;
    }
    let amount = billing::amount_cents(&deps.tariff, distance_m, als);
    let saga = billing::start(incident.to_string(), amount, deps.tariff.currency.clone());
    let invoice_id = format!("inv_{}", uuid::Uuid::now_v7().simple());
    let started = BillingEvent::Started {
        incident_id: incident,
        invoice_id: invoice_id.clone(),
        amount_cents: amount,
        currency: saga.currency.clone(),
        distance_m: distance_m.round(),
        als,
    };
    let (stored, id2, provider) = (saga.clone(), invoice_id.clone(), deps.payments.name());
    // The invoice and its `billing.started` are one transaction: recovery never finds one
    // without the other.
    let inserted = db
        .run(move |mut conn| async move {
            conn.write_transaction(async |tx| {
                let now = Utc::now();
                invoices::insert(tx, &id2, &stored, provider, now).await?;
                let event = started.to_new();
                let stream = format!("billing-{}", stored.incident_id);
                events::append(tx, &stream, ExpectedVersion::Any, &[event], now).await?;
                Ok::<_, StoreError>(())
            })
            .await
        })
        .await;
    match inserted {
        Ok(()) => {
            crate::fault::crash_point("billing.stored_invoice");
            Ok((saga, invoice_id))
        }
        // Another run created it first: use that one (one invoice per incident).
        Err(StoreError::Conflict(_)) => {
            let inv = db
                .run(move |mut conn| async move { invoices::for_incident(&mut conn, incident).await })
                .await?
                .ok_or(StoreError::NotFound)?;
            Ok((inv.saga, inv.id))
        }
        Err(e) => Err(e),
    }
}

/// The body of the insurer's coverage check. The fields are declared in the order the insurer
/// has always received them (alphabetical, as `serde_json::Value` wrote them).
#[derive(Serialize)]
struct CoverageRequest<'a> {
    amount_cents: i64,
    incident_id: &'a str,
    patient_id: &'a str,
}

async fn verify_insurance(
    deps: &BillingDeps,
    saga: &Saga,
    patient_id: Option<String>,
) -> StepResult {
    let Some(patient_id) = patient_id else {
        // No patient on file: nobody to insure; the bill is the caller's (not covered).
        return match InsuranceDecision::new(Coverage::NotCovered, 0, saga.amount_cents, None) {
            Ok(d) => StepResult::InsuranceVerified(d),
            Err(e) => StepResult::InsuranceRejected(e.to_string()),
        };
    };
    let url = format!(
        "{}/insurance/v1/verify",
        deps.insurance_base.trim_end_matches('/')
    );
    let resp = deps
        .http
        .post(url)
        .bearer_auth(&deps.insurance_token)
        .header(
            "Idempotency-Key",
            billing::idempotency_key(&saga.incident_id, Step::VerifyInsurance),
        )
        .json(&CoverageRequest {
            amount_cents: saga.amount_cents,
            incident_id: &saga.incident_id,
            patient_id: &patient_id,
        })
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            return StepResult::Transient(format!("insurance unreachable: {}", e.without_url()));
        }
    };
    let status = resp.status();
    if status.is_server_error() || status.as_u16() == 429 {
        return StepResult::Transient(format!("insurance answered {status}"));
    }
    if !status.is_success() {
        return StepResult::InsuranceRejected(format!("insurance answered {status}"));
    }
    let body: Value = match resp.json().await {
        Ok(v) => v,
        Err(_) => return StepResult::Transient("insurance answer unreadable".into()),
    };
    let coverage = match body["coverage_status"].as_str() {
        Some("fully_covered") => Coverage::FullyCovered,
        Some("partially_covered") => Coverage::PartiallyCovered,
        _ => Coverage::NotCovered,
    };
    match InsuranceDecision::new(
        coverage,
        body["covered_cents"].as_i64().unwrap_or(0),
        body["patient_due_cents"]
            .as_i64()
            .unwrap_or(saga.amount_cents),
        body["claim_id"].as_str().map(str::to_owned),
    ) {
        Ok(d) => StepResult::InsuranceVerified(d),
        Err(e) => StepResult::InsuranceRejected(e.to_string()),
    }
}

async fn release_claim(deps: &BillingDeps, claim: &str) -> StepResult {
    let url = format!(
        "{}/insurance/v1/claims/{claim}/release",
        deps.insurance_base.trim_end_matches('/')
    );
    match deps
        .http
        .post(url)
        .bearer_auth(&deps.insurance_token)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() || r.status().as_u16() == 404 => StepResult::Released,
        Ok(r) => StepResult::Transient(format!("claim release answered {}", r.status())),
        Err(e) => StepResult::Transient(format!("insurance unreachable: {}", e.without_url())),
    }
}

fn payment_result(
    r: Result<crate::integrations::payments::PaymentIntent, PaymentError>,
) -> StepResult {
    match r {
        Ok(intent) => StepResult::Charged {
            intent_id: intent.id,
            status: intent.status.as_str().to_owned(),
        },
        Err(PaymentError::Declined {
            code, intent_id, ..
        }) => StepResult::ChargeFailed {
            intent_id,
            reason: code,
        },
        Err(PaymentError::Transient { reason, .. }) => StepResult::Transient(reason),
        Err(e) => StepResult::ChargeFailed {
            intent_id: None,
            reason: e.to_string(),
        },
    }
}

/// The event a step's result records, if any (transient failures record none).
fn step_event(incident: IncidentId, step: Step, result: &StepResult) -> Option<BillingEvent> {
    match (step, result) {
        (Step::VerifyInsurance, StepResult::InsuranceVerified(d)) => {
            Some(BillingEvent::InsuranceVerified {
                incident_id: incident,
                coverage_status: d.coverage,
                covered_cents: d.covered_cents,
                patient_due_cents: d.patient_due_cents,
            })
        }
        (Step::Charge, StepResult::Charged { status, .. }) if status == "succeeded" => {
            Some(BillingEvent::PaymentSucceeded {
                incident_id: incident,
                status: status.clone(),
            })
        }
        (Step::Charge, StepResult::Charged { status, .. }) => Some(BillingEvent::PaymentFailed {
            incident_id: incident,
            status: Some(status.clone()),
            reason: None,
        }),
        (Step::Charge, StepResult::ChargeFailed { reason, .. }) => {
            Some(BillingEvent::PaymentFailed {
                incident_id: incident,
                status: None,
                reason: Some(reason.clone()),
            })
        }
        (Step::RefundPayment | Step::CancelPayment | Step::ReleaseClaim | Step::VoidInvoice, r)
            if !matches!(r, StepResult::Transient(_)) =>
        {
            Some(BillingEvent::Compensated {
                incident_id: incident,
                step,
            })
        }
        _ => None,
    }
}

/// Who pays: the patient's id and, when insured, their member number (the charge's customer).
struct Payer {
    patient_id: Option<String>,
    member_ref: Option<String>,
}

impl Payer {
    /// The incident's patient and their insurance membership, if any.
    async fn of(db: &Db, incident: IncidentId) -> Result<Self, StoreError> {
        let (patient_id, member_ref) = db
            .run(move |mut conn| async move {
                let Some((i, _)) = incident_store::find(&mut conn, incident).await? else {
                    return Ok::<_, StoreError>((None, None));
                };
                let member = match &i.patient_id {
                    Some(p) => patients::find_patient(&mut conn, p)
                        .await?
                        .and_then(|p| p.insurance.map(|ins| ins.member_id)),
                    None => None,
                };
                Ok((i.patient_id.map(|p| p.0), member))
            })
            .await?;
        Ok(Self {
            patient_id,
            member_ref,
        })
    }
}

/// Drives one saga to its end.
async fn drive(deps: BillingDeps, incident: IncidentId) -> Result<(), StoreError> {
    if !enter_billing(&deps, incident).await? {
        return Ok(());
    }
    let (mut saga, _) = load_or_create(&deps, incident).await?;
    let db = deps.db.clone();
    let payer = Payer::of(&db, incident).await?;
    loop {
        let step = next_step(&saga);
        if step != Step::Done {
            // A node that lost dispatch calls no provider: the new holder resumes the saga.
            db.run(|mut conn| async move { confirm_lease(&mut conn).await })
                .await?;
        }
        let points = crash_points(step);
        crate::fault::crash_point_opt(points.before);
        let Some(result) = run_step(&deps, &saga, step, &payer).await else {
            break;
        };
        crate::fault::crash_point_opt(points.after);
        let transient = matches!(result, StepResult::Transient(_));
        let event = step_event(incident, step, &result);
        saga = match apply(&saga, step, result, Utc::now()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(incident.id = %incident, error = %e, "billing saga refused a step result");
                return Err(StoreError::Corrupt(e.to_string()));
            }
        };
        record(&db, &saga, event).await?;
        crate::fault::crash_point_opt(points.stored);
        if transient {
            actix_web::rt::time::sleep(backoff(saga.attempts)).await;
        }
    }
    finish(&deps, &saga, incident).await
}

/// The crash points around one step: before its call, after the call (not stored), stored.
struct StepPoints {
    before: Option<&'static str>,
    after: Option<&'static str>,
    stored: Option<&'static str>,
}

/// The crash points of `step` (steps without a provider call have only `stored`).
fn crash_points(step: Step) -> StepPoints {
    let (before, after, stored) = match step {
        Step::VerifyInsurance => (
            "billing.before_verify_insurance",
            "billing.after_verify_insurance",
            "billing.stored_verify_insurance",
        ),
        Step::Charge => (
            "billing.before_charge",
            "billing.after_charge",
            "billing.stored_charge",
        ),
        Step::CancelPayment => (
            "billing.before_cancel_payment",
            "billing.after_cancel_payment",
            "billing.stored_cancel_payment",
        ),
        Step::RefundPayment => (
            "billing.before_refund_payment",
            "billing.after_refund_payment",
            "billing.stored_refund_payment",
        ),
        Step::ReleaseClaim => (
            "billing.before_release_claim",
            "billing.after_release_claim",
            "billing.stored_release_claim",
        ),
        Step::Complete => {
            return StepPoints {
                before: None,
                after: None,
                stored: Some("billing.stored_complete"),
            };
        }
        Step::VoidInvoice => {
            return StepPoints {
                before: None,
                after: None,
                stored: Some("billing.stored_void_invoice"),
            };
        }
        Step::Done => {
            return StepPoints {
                before: None,
                after: None,
                stored: None,
            };
        }
    };
    StepPoints {
        before: Some(before),
        after: Some(after),
        stored: Some(stored),
    }
}

/// Makes sure the incident is in billing before its saga runs, and says whether there is a
/// saga to run. An incident still `at_hospital` (the process died between the handover and
/// the start of billing) is moved to billing here, as the crew's report would have; one that
/// is already closed or cancelled has nothing to bill.
async fn enter_billing(deps: &BillingDeps, incident: IncidentId) -> Result<bool, StoreError> {
    let found = deps
        .db
        .run(move |mut conn| async move { incident_store::find(&mut conn, incident).await })
        .await?;
    let Some((state, _)) = found else {
        return Ok(false);
    };
    match state.status {
        IncidentStatus::Billing => Ok(true),
        IncidentStatus::AtHospital => {
            match deps
                .incidents
                .send(Route {
                    id: incident,
                    command: Command::StartBilling,
                })
                .await
            {
                Ok(Ok(_)) => Ok(true),
                Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                    "moving the incident to billing: {e}"
                ))),
                Err(e) => Err(StoreError::Unavailable(format!(
                    "incident directory unreachable: {e}"
                ))),
            }
        }
        // Ended already: only an invoice left unfinished can still need its saga finished (its
        // compensations, say); never open a new one.
        IncidentStatus::Closed | IncidentStatus::Cancelled => Ok(deps
            .db
            .run(move |mut conn| async move { invoices::for_incident(&mut conn, incident).await })
            .await?
            .is_some_and(|inv| !inv.done)),
        // Not at the hospital yet: there is nothing to bill.
        _ => Ok(false),
    }
}

/// Executes one step against the insurer or the payment provider; `None` when the saga is
/// done.
async fn run_step(
    deps: &BillingDeps,
    saga: &Saga,
    step: Step,
    payer: &Payer,
) -> Option<StepResult> {
    if step == Step::Done {
        return None;
    }
    let key = billing::idempotency_key(&saga.incident_id, step);
    let due = saga
        .insurance
        .as_ref()
        .map_or(saga.amount_cents, |d| d.patient_due_cents);
    let result = match step {
        Step::Done => return None,
        Step::VerifyInsurance => verify_insurance(deps, saga, payer.patient_id.clone()).await,
        // A payment the provider still processes is read again, never created again (a
        // provider replaying the first answer to the same key would say `processing` forever).
        Step::Charge if saga.payment.is_some() => match &saga.payment {
            Some(p) => payment_result(deps.payments.retrieve(&p.intent_id).await),
            None => StepResult::Transient("no payment to read".into()),
        },
        Step::Charge => payment_result(
            deps.payments
                .create_and_confirm(ChargeRequest {
                    amount_cents: due,
                    currency: saga.currency.clone(),
                    customer_ref: payer
                        .member_ref
                        .clone()
                        .or_else(|| payer.patient_id.clone())
                        .unwrap_or_default(),
                    description: format!("Ambulance service, incident {}", saga.incident_id),
                    idempotency_key: key,
                })
                .await,
        ),
        Step::Complete => StepResult::Completed,
        Step::RefundPayment => match &saga.payment {
            Some(p) => match deps.payments.refund(&p.intent_id, due, &key).await {
                Ok(_) => StepResult::Refunded,
                Err(PaymentError::Transient { reason, .. }) => StepResult::Transient(reason),
                Err(e) => StepResult::Transient(format!("refund failed: {e}")),
            },
            None => StepResult::Refunded,
        },
        Step::CancelPayment => match &saga.payment {
            Some(p) => match deps.payments.cancel(&p.intent_id, &key).await {
                Ok(intent) if intent.status.as_str() == "canceled" => StepResult::Cancelled,
                Err(PaymentError::Transient { reason, .. }) => StepResult::Transient(reason),
                // Refused: the intent moved on since it was stored (Stripe answers 400
                // `payment_intent_unexpected_state` when the cardholder completed it in the
                // meantime). What it is now decides the compensation: a captured one is
                // refunded, one still open is cancelled again.
                Err(refused) => match deps.payments.retrieve(&p.intent_id).await {
                    Ok(intent) => StepResult::Charged {
                        intent_id: intent.id,
                        status: intent.status.as_str().to_owned(),
                    },
                    Err(e) => StepResult::Transient(format!(
                        "cancel refused ({}), and the intent could not be read: {e}",
                        refused.kind()
                    )),
                },
                other => payment_result(other),
            },
            None => StepResult::Cancelled,
        },
        Step::ReleaseClaim => match saga.insurance.as_ref().and_then(|d| d.claim_id.clone()) {
            Some(claim) => release_claim(deps, &claim).await,
            None => StepResult::Released,
        },
        Step::VoidInvoice => StepResult::Voided,
    };
    Some(result)
}

/// The saga is over: record the outcome (unless it is stored already), close the incident and
/// release its unit. Each of the three is idempotent, so a saga resumed after a crash at any
/// point between them finishes them all exactly once.
async fn finish(deps: &BillingDeps, saga: &Saga, incident: IncidentId) -> Result<(), StoreError> {
    let paid = saga.status == billing::InvoiceStatus::Paid;
    let outcome = if paid { "paid" } else { "failed" };
    let stream = format!("billing-{incident}");
    let recorded = deps
        .db
        .run(move |mut conn| async move { events::read_stream(&mut conn, &stream).await })
        .await?
        .iter()
        .any(|e| e.kind == "billing.completed" || e.kind == "billing.failed");
    if !recorded {
        let ended = BillingOutcome {
            incident_id: incident,
            status: saga.status,
            reason: saga.failure.clone(),
        };
        let event = if paid {
            BillingEvent::Completed(ended)
        } else {
            BillingEvent::Failed(ended)
        };
        record(&deps.db, saga, Some(event)).await?;
        crate::fault::crash_point("billing.stored_outcome");
    }
    let closed = deps
        .incidents
        .send(Route {
            id: incident,
            command: Command::Close {
                outcome: outcome.into(),
            },
        })
        .await;
    if let Ok(Ok(state)) = closed
        && let Some(unit) = state.assigned_unit_id
        && let Ok(Some(addr)) = deps.fleet.send(UnitAddr(unit)).await
    {
        addr.do_send(IncidentOver {
            incident_id: incident,
            reason: "closed",
        });
    }
    Ok(())
}

/// The provider used when payments are not configured: every charge is refused with a clear
/// reason (the saga then compensates and the invoice ends `failed`), never faked.
pub struct PaymentsNotConfigured;

impl PaymentProvider for PaymentsNotConfigured {
    fn create_and_confirm(
        &self,
        _: ChargeRequest,
    ) -> crate::integrations::payments::PaymentFuture<
        '_,
        crate::integrations::payments::PaymentIntent,
    > {
        Box::pin(async {
            Err(PaymentError::Rejected {
                status: 0,
                message: "no payment provider configured (payments.api_key)".into(),
            })
        })
    }
    fn cancel<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> crate::integrations::payments::PaymentFuture<
        'a,
        crate::integrations::payments::PaymentIntent,
    > {
        Box::pin(async {
            Err(PaymentError::Rejected {
                status: 0,
                message: "no payment provider configured".into(),
            })
        })
    }
    fn refund<'a>(
        &'a self,
        _: &'a str,
        _: i64,
        _: &'a str,
    ) -> crate::integrations::payments::PaymentFuture<'a, String> {
        Box::pin(async {
            Err(PaymentError::Rejected {
                status: 0,
                message: "no payment provider configured".into(),
            })
        })
    }
    fn retrieve<'a>(
        &'a self,
        _: &'a str,
    ) -> crate::integrations::payments::PaymentFuture<
        'a,
        crate::integrations::payments::PaymentIntent,
    > {
        Box::pin(async {
            Err(PaymentError::Rejected {
                status: 0,
                message: "no payment provider configured".into(),
            })
        })
    }
    fn name(&self) -> &'static str {
        "none"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_request_body_is_unchanged_on_the_wire() {
        let body = CoverageRequest {
            amount_cents: 12_345,
            incident_id: "i-1",
            patient_id: "p-1",
        };
        assert_eq!(
            serde_json::to_string(&body).ok().as_deref(),
            Some(r#"{"amount_cents":12345,"incident_id":"i-1","patient_id":"p-1"}"#)
        );
    }
}
