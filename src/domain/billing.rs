//! Billing: the tariff, the insurance split, and the billing saga as a pure state machine.
//!
//! - [`amount_cents`] prices a transport with a [`Tariff`] (integer minor units throughout).
//! - [`decide_coverage`] splits an amount between the insurer and the patient
//!   ([`InsuranceDecision`], invariant: `covered + patient_due == amount`, both ≥ 0). The
//!   insurance verification service uses it.
//! - [`Saga`] is one incident's invoice and how far its saga got. The driver (the incident's
//!   actor) loops: `step = next_step(&saga)`; run the step's outbound call with
//!   [`idempotency_key`]`(incident, step)`; `saga = apply(&saga, step, result, now)?`; persist;
//!   on a [`StepResult::Transient`] wait [`backoff`]`(saga.attempts)` first; stop at
//!   [`Step::Done`].
//!
//! ```text
//! forward:      verify_insurance ─► charge (only if the patient owes something) ─► complete ─► done (paid)
//! on failure:   refund_payment (captured) | cancel_payment (not captured) ─► release_claim ─► void_invoice ─► done (failed)
//! ```
//!
//! Compensations undo what was done, newest first, and only what was done: no refund without a
//! captured payment, no release without a claim. A payment that is `processing` keeps the
//! saga at [`Step::Charge`]; the driver then re-reads the intent (`retrieve`) instead of
//! creating a new one, and the idempotency key makes even a re-sent create replay the first
//! answer, so a crash or a retry never charges twice.
//!
//! Transient failures are retried without limit (with capped backoff): giving up on a charge
//! or a claim whose outcome is unknown could leave money taken or a claim open with nothing
//! left to undo it. The driver should alert on a large [`Saga::attempts`] instead.
//!
//! Pure: no I/O, no clock reads (time is passed in). Failure reasons are stored and shown in
//! the invoice's steps: callers must not put card or patient data in them.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

// ---- tariff --------------------------------------------------------------------------------

/// What a transport costs, in minor units of [`Tariff::currency`]. Missing fields take the
/// defaults (base 50000, 1200 per km, ALS surcharge 15000, `usd`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tariff {
    /// Flat fee per transport.
    pub base_cents: i64,
    /// Fee per kilometre from the scene to the hospital.
    pub per_km_cents: i64,
    /// Added when the unit is an advanced life support (ALS) unit.
    pub als_surcharge_cents: i64,
    /// ISO 4217 currency code, lower case as Stripe expects.
    pub currency: String,
}

impl Default for Tariff {
    fn default() -> Self {
        Self {
            base_cents: 50_000,
            per_km_cents: 1_200,
            als_surcharge_cents: 15_000,
            currency: "usd".to_owned(),
        }
    }
}

/// Slack when rounding a distance up to a tenth of a kilometre, in tenths: a distance computed
/// as `12.3 * 1000.0` (`12300.000000000002`) is 12.3 km, not 12.4.
const TENTHS_TOLERANCE: f64 = 1e-6;

/// The distance in whole tenths of a kilometre, rounded up; 0 for a negative or non-finite
/// distance.
fn distance_tenths_km(distance_m: f64) -> i64 {
    if !distance_m.is_finite() || distance_m <= 0.0 {
        return 0;
    }
    // `as` saturates, so an absurd distance gives a huge (clamped) amount, not a wrap.
    (distance_m / 100.0 - TENTHS_TOLERANCE).ceil().max(0.0) as i64
}

/// The amount for one transport: `base + per_km × km (+ ALS surcharge)`.
///
/// `distance_m` is the scene→hospital distance in metres, rounded up to the next 0.1 km; a
/// negative or non-finite distance counts as 0. The distance part is rounded half up to whole
/// cents. The result is never negative (and saturates at `i64::MAX`).
pub fn amount_cents(tariff: &Tariff, distance_m: f64, als: bool) -> i64 {
    let tenths = i128::from(distance_tenths_km(distance_m));
    // Half up, also for a (misconfigured) negative rate: floor(x / 10 + 0.5).
    let distance_part = (i128::from(tariff.per_km_cents) * tenths + 5).div_euclid(10);
    let surcharge = if als {
        i128::from(tariff.als_surcharge_cents)
    } else {
        0
    };
    let total = i128::from(tariff.base_cents) + distance_part + surcharge;
    i64::try_from(total.clamp(0, i128::from(i64::MAX))).unwrap_or(i64::MAX)
}

// ---- insurance -----------------------------------------------------------------------------

/// How much of an invoice the patient's insurance pays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Coverage {
    /// The insurer pays everything; the patient owes nothing.
    FullyCovered,
    /// The insurer pays part; the patient pays the rest.
    PartiallyCovered,
    /// No policy (or nothing left on it): the patient pays everything.
    NotCovered,
}

impl Coverage {
    /// The wire name (`fully_covered`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Coverage::FullyCovered => "fully_covered",
            Coverage::PartiallyCovered => "partially_covered",
            Coverage::NotCovered => "not_covered",
        }
    }
}

/// The insurer's answer for one invoice.
///
/// Invariant (checked by [`InsuranceDecision::new`] and by [`apply`]): both shares are ≥ 0,
/// they add up to the invoice amount, and the [`Coverage`] agrees with them (fully covered:
/// nothing due; partially: both shares > 0; not covered: nothing covered).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InsuranceDecision {
    /// The kind of coverage.
    pub coverage: Coverage,
    /// Paid by the insurer, in minor units.
    pub covered_cents: i64,
    /// Owed by the patient, in minor units (charged to their payment method).
    pub patient_due_cents: i64,
    /// The claim the insurer opened, to release if the saga fails.
    pub claim_id: Option<String>,
}

impl InsuranceDecision {
    /// A decision whose shares and coverage agree (see the type's invariant).
    pub fn new(
        coverage: Coverage,
        covered_cents: i64,
        patient_due_cents: i64,
        claim_id: Option<String>,
    ) -> Result<Self, SagaError> {
        let decision = Self {
            coverage,
            covered_cents,
            patient_due_cents,
            claim_id,
        };
        decision.validate()?;
        Ok(decision)
    }

    /// The same decision with the insurer's claim id.
    pub fn with_claim_id(mut self, claim_id: impl Into<String>) -> Self {
        self.claim_id = Some(claim_id.into());
        self
    }

    /// The invoice amount this decision splits (`covered + patient_due`), `None` on overflow.
    pub fn total_cents(&self) -> Option<i64> {
        self.covered_cents.checked_add(self.patient_due_cents)
    }

    /// Checks the invariant, without the amount.
    pub fn validate(&self) -> Result<(), SagaError> {
        let invalid = |why: &str| Err(SagaError::InvalidDecision(why.to_owned()));
        if self.covered_cents < 0 || self.patient_due_cents < 0 {
            return invalid("negative share");
        }
        if self.total_cents().is_none() {
            return invalid("shares overflow");
        }
        match self.coverage {
            Coverage::FullyCovered if self.patient_due_cents != 0 => {
                invalid("fully covered but the patient owes something")
            }
            Coverage::PartiallyCovered
                if self.covered_cents == 0 || self.patient_due_cents == 0 =>
            {
                invalid("partially covered needs both shares above zero")
            }
            Coverage::NotCovered if self.covered_cents != 0 => {
                invalid("not covered but the insurer pays something")
            }
            _ => Ok(()),
        }
    }

    /// Checks the invariant and that the shares add up to `amount_cents`.
    pub fn validate_for(&self, amount_cents: i64) -> Result<(), SagaError> {
        self.validate()?;
        if self.total_cents() != Some(amount_cents) {
            return Err(SagaError::InvalidDecision(format!(
                "shares add up to {} instead of {amount_cents}",
                self.total_cents().unwrap_or(i64::MAX)
            )));
        }
        Ok(())
    }
}

/// Splits `amount_cents` given what is left on the patient's policy.
///
/// No policy (`None`) or nothing left (≤ 0) → not covered, the patient pays all;
/// remaining ≥ amount → fully covered; otherwise partially covered, the patient paying the
/// difference. A negative amount counts as 0. The claim id is left for the insurer to fill in
/// ([`InsuranceDecision::with_claim_id`]).
pub fn decide_coverage(
    amount_cents: i64,
    policy_remaining_cents: Option<i64>,
) -> InsuranceDecision {
    let amount = amount_cents.max(0);
    let (coverage, covered) = match policy_remaining_cents {
        Some(remaining) if remaining >= amount => (Coverage::FullyCovered, amount),
        Some(remaining) if remaining > 0 => (Coverage::PartiallyCovered, remaining),
        _ => (Coverage::NotCovered, 0),
    };
    InsuranceDecision {
        coverage,
        covered_cents: covered,
        patient_due_cents: amount - covered,
        claim_id: None,
    }
}

// ---- the saga ------------------------------------------------------------------------------

/// The invoice status, as the API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceStatus {
    /// Created; insurance not yet verified.
    Pending,
    /// The insurer answered; the patient's share (if any) is being charged.
    InsuranceVerified,
    /// Finished: the insurer's and the patient's shares are settled.
    Paid,
    /// The saga failed; compensations run (while [`Saga::compensating`] and not done) or ran.
    Failed,
    /// Voided by an operator outside the saga (the saga itself ends `paid` or `failed`).
    Voided,
}

/// One step of the saga: the forward steps, the compensations, and the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Ask the insurance service for the split (it opens a claim for the covered share).
    VerifyInsurance,
    /// Charge the patient's share (create and confirm a payment intent, or re-read one that
    /// is `processing`).
    Charge,
    /// Mark the invoice paid.
    Complete,
    /// Compensation: refund a captured payment.
    RefundPayment,
    /// Compensation: cancel a payment that was not captured.
    CancelPayment,
    /// Compensation: release the insurance claim.
    ReleaseClaim,
    /// Compensation: void the invoice.
    VoidInvoice,
    /// Nothing left to do.
    Done,
}

impl Step {
    /// The wire name (`verify_insurance`, …), also used in idempotency keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::VerifyInsurance => "verify_insurance",
            Step::Charge => "charge",
            Step::Complete => "complete",
            Step::RefundPayment => "refund_payment",
            Step::CancelPayment => "cancel_payment",
            Step::ReleaseClaim => "release_claim",
            Step::VoidInvoice => "void_invoice",
            Step::Done => "done",
        }
    }

    /// Whether this step undoes an earlier one.
    pub fn is_compensation(self) -> bool {
        matches!(
            self,
            Step::RefundPayment | Step::CancelPayment | Step::ReleaseClaim | Step::VoidInvoice
        )
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The patient's payment as far as the saga knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PaymentRef {
    /// The provider's payment intent id.
    pub intent_id: String,
    /// The intent's status (Stripe's names: `succeeded`, `processing`, …), or `refunded`
    /// once [`Step::RefundPayment`] is done (Stripe keeps such an intent `succeeded`).
    pub status: String,
}

/// One applied step result, for the invoice's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepRecord {
    /// The step.
    pub step: Step,
    /// What happened: `insurance_verified: partially_covered`, `transient: timeout`,
    /// `charged: succeeded`, `charge_failed: card_declined`, `refunded`, `released`, …
    pub outcome: String,
    /// When the result was applied.
    pub at: DateTime<Utc>,
}

/// One incident's invoice and its saga.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Saga {
    /// The incident billed (one invoice per incident).
    pub incident_id: String,
    /// The invoice amount, in minor units (≥ 0).
    pub amount_cents: i64,
    /// ISO 4217 code, lower case.
    pub currency: String,
    /// The invoice status.
    pub status: InvoiceStatus,
    /// The insurer's split, once verified.
    pub insurance: Option<InsuranceDecision>,
    /// The patient's payment, once one exists.
    pub payment: Option<PaymentRef>,
    /// Every applied result, oldest first.
    pub steps: Vec<StepRecord>,
    /// Why the saga failed.
    pub failure: Option<String>,
    /// Set when the saga failed: the compensations run instead of the forward steps.
    pub compensating: bool,
    /// Consecutive retries of the current step (transient failures, or a payment still
    /// `processing`); back to 0 when a step completes. The input of [`backoff`].
    pub attempts: u32,
}

/// What running a step produced. Which results a step accepts is listed on [`apply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepResult {
    /// The insurer answered with a split.
    InsuranceVerified(InsuranceDecision),
    /// The insurer refused the request for good (a 4xx): the saga fails.
    InsuranceRejected(String),
    /// The call failed in a way worth retrying later (timeout, 5xx, 429): the same step runs
    /// again after [`backoff`].
    Transient(String),
    /// The provider answered with a payment intent in some status.
    Charged {
        /// The payment intent id.
        intent_id: String,
        /// Its status, Stripe's name (`succeeded`, `processing`, `requires_action`, …).
        status: String,
    },
    /// The charge failed for good (declined card, or the provider refused the request).
    ChargeFailed {
        /// The intent the failed attempt left behind, if the provider made one.
        intent_id: Option<String>,
        /// Why (the decline code or the provider's message; no card data).
        reason: String,
    },
    /// The payment was refunded.
    Refunded,
    /// The payment intent was cancelled.
    Cancelled,
    /// The insurance claim was released.
    Released,
    /// The invoice was voided.
    Voided,
    /// The invoice was marked paid.
    Completed,
}

impl StepResult {
    /// The variant's snake_case name.
    pub fn name(&self) -> &'static str {
        match self {
            StepResult::InsuranceVerified(_) => "insurance_verified",
            StepResult::InsuranceRejected(_) => "insurance_rejected",
            StepResult::Transient(_) => "transient",
            StepResult::Charged { .. } => "charged",
            StepResult::ChargeFailed { .. } => "charge_failed",
            StepResult::Refunded => "refunded",
            StepResult::Cancelled => "cancelled",
            StepResult::Released => "released",
            StepResult::Voided => "voided",
            StepResult::Completed => "completed",
        }
    }
}

/// Why [`apply`] (or [`abort`], or [`InsuranceDecision::new`]) refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SagaError {
    /// The saga already reached [`Step::Done`].
    #[error("the billing saga is finished")]
    Finished,
    /// The result is for another step than the one due.
    #[error("a result for step {got} arrived, but the next step is {expected}")]
    UnexpectedStep {
        /// What [`next_step`] says.
        expected: Step,
        /// What the caller passed.
        got: Step,
    },
    /// The result cannot come from this step (e.g. `refunded` for `verify_insurance`).
    #[error("result {result} does not belong to step {step}")]
    Mismatch {
        /// The step.
        step: Step,
        /// The result's name.
        result: &'static str,
    },
    /// The insurer's split breaks the invariant or does not add up to the amount.
    #[error("invalid insurance decision: {0}")]
    InvalidDecision(String),
    /// A payment status that is not one of Stripe's.
    #[error("unknown payment intent status {0:?}")]
    UnknownPaymentStatus(String),
    /// A payment result names an intent other than the saga's (or an empty id).
    #[error("payment intent {got:?} is not this invoice's payment")]
    IntentMismatch {
        /// The intent id received.
        got: String,
    },
}

/// What a payment intent status means for the saga.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PaymentState {
    /// `succeeded`: money taken; undo by refund.
    Captured,
    /// `processing`: wait and re-read.
    InFlight,
    /// Not captured and still open (`requires_*`): undo by cancel; a failure going forward.
    Open,
    /// `canceled`: nothing to undo.
    Canceled,
    /// `refunded` (the saga's own marker): nothing left to undo.
    Refunded,
}

/// Parses one of Stripe's seven payment intent statuses.
fn stripe_state(status: &str) -> Option<PaymentState> {
    Some(match status {
        "succeeded" => PaymentState::Captured,
        "processing" => PaymentState::InFlight,
        "requires_payment_method"
        | "requires_confirmation"
        | "requires_action"
        | "requires_capture" => PaymentState::Open,
        "canceled" => PaymentState::Canceled,
        _ => return None,
    })
}

/// The state of a stored payment (Stripe's statuses plus `refunded`).
fn stored_state(payment: &PaymentRef) -> Option<PaymentState> {
    match payment.status.as_str() {
        "refunded" => Some(PaymentState::Refunded),
        other => stripe_state(other),
    }
}

const OUTCOME_RELEASED: &str = "released";
const OUTCOME_VOIDED: &str = "voided";

/// A new invoice for `incident_id`, `pending`, nothing done yet. A negative amount counts
/// as 0; the currency is lower-cased.
pub fn start(
    incident_id: impl Into<String>,
    amount_cents: i64,
    currency: impl Into<String>,
) -> Saga {
    Saga {
        incident_id: incident_id.into(),
        amount_cents: amount_cents.max(0),
        currency: currency.into().to_ascii_lowercase(),
        status: InvoiceStatus::Pending,
        insurance: None,
        payment: None,
        steps: Vec::new(),
        failure: None,
        compensating: false,
        attempts: 0,
    }
}

/// Whether a step was completed (compensations run at most once, so one record says it).
fn has_outcome(saga: &Saga, step: Step, outcome: &str) -> bool {
    saga.steps
        .iter()
        .any(|r| r.step == step && r.outcome == outcome)
}

/// The step to run now.
///
/// Forward: [`Step::VerifyInsurance`], then [`Step::Charge`] while the patient owes something
/// and no payment has succeeded (a `processing` payment keeps the saga here), then
/// [`Step::Complete`], then [`Step::Done`] (status `paid`).
///
/// After a failure the compensations run, newest effect first: [`Step::RefundPayment`] if a
/// payment was captured (`succeeded`), or [`Step::CancelPayment`] if one exists but was not
/// captured (`requires_*`, `processing`); then [`Step::ReleaseClaim`] if the insurer opened a
/// claim; then [`Step::VoidInvoice`]; then [`Step::Done`] (status `failed`).
pub fn next_step(saga: &Saga) -> Step {
    if saga.compensating {
        if let Some(payment) = &saga.payment {
            match stored_state(payment) {
                Some(PaymentState::Captured) => return Step::RefundPayment,
                Some(PaymentState::Open | PaymentState::InFlight) => return Step::CancelPayment,
                Some(PaymentState::Canceled | PaymentState::Refunded) | None => {}
            }
        }
        let claim = saga.insurance.as_ref().and_then(|d| d.claim_id.as_ref());
        if claim.is_some() && !has_outcome(saga, Step::ReleaseClaim, OUTCOME_RELEASED) {
            return Step::ReleaseClaim;
        }
        if !has_outcome(saga, Step::VoidInvoice, OUTCOME_VOIDED) {
            return Step::VoidInvoice;
        }
        return Step::Done;
    }
    let Some(decision) = &saga.insurance else {
        return Step::VerifyInsurance;
    };
    let captured = saga
        .payment
        .as_ref()
        .is_some_and(|p| stored_state(p) == Some(PaymentState::Captured));
    if decision.patient_due_cents > 0 && !captured {
        return Step::Charge;
    }
    if saga.status != InvoiceStatus::Paid {
        return Step::Complete;
    }
    Step::Done
}

/// Whether the saga reached [`Step::Done`].
pub fn is_done(saga: &Saga) -> bool {
    next_step(saga) == Step::Done
}

/// Switches to compensation.
fn fail(saga: &mut Saga, reason: String) {
    saga.compensating = true;
    saga.status = InvoiceStatus::Failed;
    saga.failure = Some(reason);
    saga.attempts = 0;
}

/// Records a payment intent, refusing one that is not the saga's.
fn set_payment(saga: &mut Saga, intent_id: &str, status: &str) -> Result<(), SagaError> {
    if intent_id.is_empty() {
        return Err(SagaError::IntentMismatch {
            got: intent_id.to_owned(),
        });
    }
    match &mut saga.payment {
        Some(p) if p.intent_id != intent_id => Err(SagaError::IntentMismatch {
            got: intent_id.to_owned(),
        }),
        Some(p) => {
            status.clone_into(&mut p.status);
            Ok(())
        }
        None => {
            saga.payment = Some(PaymentRef {
                intent_id: intent_id.to_owned(),
                status: status.to_owned(),
            });
            Ok(())
        }
    }
}

/// Applies the result of running `step` at `now`, returning the new saga (the input is left
/// as it was, also on error).
///
/// `step` must be [`next_step`]`(saga)`, and the result must belong to it:
///
/// | step | results |
/// |---|---|
/// | `verify_insurance` | `InsuranceVerified` (split checked against the amount), `InsuranceRejected` (→ failure) |
/// | `charge` | `Charged` (`succeeded` → on to complete; `processing` → re-read later; `requires_*` or `canceled` → failure), `ChargeFailed` (→ failure) |
/// | `complete` | `Completed` (→ paid) |
/// | `refund_payment` | `Refunded` |
/// | `cancel_payment` | `Cancelled`, or `Charged` with the intent's re-read status when it could not be cancelled (a `succeeded` one is then refunded) |
/// | `release_claim` | `Released` |
/// | `void_invoice` | `Voided` |
///
/// Every step also accepts `Transient`: it is recorded, [`Saga::attempts`] goes up and the
/// same step is due again. A `ChargeFailed` carrying an intent id records that intent as
/// `requires_payment_method` (what Stripe leaves after a decline), so it gets cancelled.
///
/// Long on purpose: the saga's whole transition table as one match over (state, outcome).
pub fn apply(
    saga: &Saga,
    step: Step,
    result: StepResult,
    now: DateTime<Utc>,
) -> Result<Saga, SagaError> {
    let expected = next_step(saga);
    if expected == Step::Done {
        return Err(SagaError::Finished);
    }
    if step != expected {
        return Err(SagaError::UnexpectedStep {
            expected,
            got: step,
        });
    }
    let mut next = saga.clone();
    let mismatch = |result: &StepResult| SagaError::Mismatch {
        step,
        result: result.name(),
    };
    let outcome = match (step, result) {
        (_, StepResult::Transient(reason)) => {
            next.attempts = next.attempts.saturating_add(1);
            format!("transient: {reason}")
        }
        (Step::VerifyInsurance, StepResult::InsuranceVerified(decision)) => {
            decision.validate_for(saga.amount_cents)?;
            let outcome = format!("insurance_verified: {}", decision.coverage.as_str());
            next.insurance = Some(decision);
            next.status = InvoiceStatus::InsuranceVerified;
            next.attempts = 0;
            outcome
        }
        (Step::VerifyInsurance, StepResult::InsuranceRejected(reason)) => {
            let outcome = format!("insurance_rejected: {reason}");
            fail(&mut next, format!("insurance rejected: {reason}"));
            outcome
        }
        (Step::Charge, StepResult::Charged { intent_id, status }) => {
            let state = stripe_state(&status)
                .ok_or_else(|| SagaError::UnknownPaymentStatus(status.clone()))?;
            set_payment(&mut next, &intent_id, &status)?;
            match state {
                PaymentState::Captured => next.attempts = 0,
                PaymentState::InFlight => next.attempts = next.attempts.saturating_add(1),
                PaymentState::Open | PaymentState::Canceled | PaymentState::Refunded => {
                    fail(&mut next, format!("payment {status}"));
                }
            }
            format!("charged: {status}")
        }
        (Step::Charge, StepResult::ChargeFailed { intent_id, reason }) => {
            if let Some(id) = &intent_id {
                set_payment(&mut next, id, "requires_payment_method")?;
            }
            let outcome = format!("charge_failed: {reason}");
            fail(&mut next, format!("payment failed: {reason}"));
            outcome
        }
        (Step::Complete, StepResult::Completed) => {
            next.status = InvoiceStatus::Paid;
            next.attempts = 0;
            "completed".to_owned()
        }
        (Step::RefundPayment, StepResult::Refunded) => {
            set_payment_status(&mut next, "refunded");
            next.attempts = 0;
            "refunded".to_owned()
        }
        (Step::CancelPayment, StepResult::Cancelled) => {
            set_payment_status(&mut next, "canceled");
            next.attempts = 0;
            "cancelled".to_owned()
        }
        (Step::CancelPayment, StepResult::Charged { intent_id, status }) => {
            let state = stripe_state(&status)
                .ok_or_else(|| SagaError::UnknownPaymentStatus(status.clone()))?;
            set_payment(&mut next, &intent_id, &status)?;
            if matches!(state, PaymentState::Open | PaymentState::InFlight) {
                // Still cancellable: this was a retry in disguise.
                next.attempts = next.attempts.saturating_add(1);
            } else {
                next.attempts = 0;
            }
            format!("payment_status: {status}")
        }
        (Step::ReleaseClaim, StepResult::Released) => {
            next.attempts = 0;
            OUTCOME_RELEASED.to_owned()
        }
        (Step::VoidInvoice, StepResult::Voided) => {
            next.attempts = 0;
            OUTCOME_VOIDED.to_owned()
        }
        (_, result) => return Err(mismatch(&result)),
    };
    next.steps.push(StepRecord {
        step,
        outcome,
        at: now,
    });
    Ok(next)
}

/// Sets the status of the saga's payment (present whenever a payment compensation is due).
fn set_payment_status(saga: &mut Saga, status: &str) {
    if let Some(p) = &mut saga.payment {
        status.clone_into(&mut p.status);
    }
}

/// Fails a saga from outside (an operator cancels the invoice, or the driver gives up on a
/// forward step), so the compensations run. A saga already compensating is returned as it
/// is; a finished one is refused.
pub fn abort(saga: &Saga, reason: &str, now: DateTime<Utc>) -> Result<Saga, SagaError> {
    let step = next_step(saga);
    if step == Step::Done {
        return Err(SagaError::Finished);
    }
    if saga.compensating {
        return Ok(saga.clone());
    }
    let mut next = saga.clone();
    fail(&mut next, format!("aborted: {reason}"));
    next.steps.push(StepRecord {
        step,
        outcome: format!("aborted: {reason}"),
        at: now,
    });
    Ok(next)
}

/// The longest wait between retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How long to wait before retrying after `attempts` consecutive failures: nothing before the
/// first try, then 1 s, 2 s, 4 s, … capped at [`MAX_BACKOFF`].
pub fn backoff(attempts: u32) -> Duration {
    match attempts {
        0 => Duration::ZERO,
        // 2^6 = 64 s is already past the cap.
        n if n > 6 => MAX_BACKOFF,
        n => Duration::from_secs(1 << (n - 1)).min(MAX_BACKOFF),
    }
}

/// The longest idempotency key providers accept.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The idempotency key for one step of one incident's saga: `shers-<incident>-<step>`, the
/// same on every retry and after a restart, so the provider replays instead of acting twice.
///
/// An incident id that is not plain (ASCII letters, digits, `-`, `_`) or longer than 200
/// characters is replaced by its SHA-256 (`shersh-<hex>-<step>`), which keeps keys short,
/// header-safe and distinct.
pub fn idempotency_key(incident_id: &str, step: Step) -> String {
    let plain = !incident_id.is_empty()
        && incident_id.len() <= 200
        && incident_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        return format!("shers-{incident_id}-{step}");
    }
    let digest = Sha256::digest(incident_id.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        use fmt::Write as _;
        let _ = write!(hex, "{byte:02x}");
    }
    format!("shersh-{hex}-{step}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    // ---- tariff ----------------------------------------------------------------------------

    #[test]
    fn tariff_examples() {
        let tariff = Tariff::default();
        assert_eq!(amount_cents(&tariff, 0.0, false), 50_000);
        // 12.34 km → 12.4 km × 1200 = 14880.
        assert_eq!(amount_cents(&tariff, 12_340.0, false), 64_880);
        assert_eq!(amount_cents(&tariff, 12_340.0, true), 79_880);
        assert_eq!(amount_cents(&tariff, 0.0, true), 65_000);
        // Exactly on a tenth stays there, also when computed in floating point.
        assert_eq!(amount_cents(&tariff, 12_300.0, false), 50_000 + 14_760);
        assert_eq!(amount_cents(&tariff, 12.3 * 1000.0, false), 50_000 + 14_760);
        // One metre rounds up to 0.1 km.
        assert_eq!(amount_cents(&tariff, 1.0, false), 50_000 + 120);
        assert_eq!(amount_cents(&tariff, 100.0, false), 50_000 + 120);
        assert_eq!(amount_cents(&tariff, 100.5, false), 50_000 + 240);
    }

    #[test]
    fn tariff_rounds_cents_half_up_and_never_goes_negative() {
        let odd = Tariff {
            per_km_cents: 1_205,
            ..Tariff::default()
        };
        // 0.1 km × 1205 = 120.5 → 121.
        assert_eq!(amount_cents(&odd, 50.0, false), 50_121);
        // 0.2 km → 241 exactly.
        assert_eq!(amount_cents(&odd, 150.0, false), 50_241);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -500.0] {
            assert_eq!(
                amount_cents(&Tariff::default(), bad, false),
                50_000,
                "{bad}"
            );
        }
        let negative = Tariff {
            base_cents: -100_000,
            ..Tariff::default()
        };
        assert_eq!(amount_cents(&negative, 1_000.0, false), 0);
        assert_eq!(amount_cents(&Tariff::default(), 1e300, true), i64::MAX);
    }

    #[test]
    fn tariff_deserializes_with_defaults() {
        let t: Tariff = serde_json::from_str(r#"{"per_km_cents": 1500}"#).unwrap();
        assert_eq!(
            t,
            Tariff {
                per_km_cents: 1_500,
                ..Tariff::default()
            }
        );
        assert_eq!(t.currency, "usd");
        assert!(serde_json::from_str::<Tariff>(r#"{"per_km": 1}"#).is_err());
    }

    // ---- coverage --------------------------------------------------------------------------

    #[test]
    fn coverage_cases() {
        let d = decide_coverage(64_880, None);
        assert_eq!(
            (d.coverage, d.covered_cents, d.patient_due_cents, d.claim_id),
            (Coverage::NotCovered, 0, 64_880, None)
        );
        let d = decide_coverage(64_880, Some(100_000));
        assert_eq!(
            (d.coverage, d.covered_cents, d.patient_due_cents),
            (Coverage::FullyCovered, 64_880, 0)
        );
        // Exactly what is left: fully covered.
        let d = decide_coverage(64_880, Some(64_880));
        assert_eq!(
            (d.coverage, d.covered_cents, d.patient_due_cents),
            (Coverage::FullyCovered, 64_880, 0)
        );
        // One cent short: partial, the patient pays the cent.
        let d = decide_coverage(64_880, Some(64_879));
        assert_eq!(
            (d.coverage, d.covered_cents, d.patient_due_cents),
            (Coverage::PartiallyCovered, 64_879, 1)
        );
        let d = decide_coverage(64_880, Some(20_000));
        assert_eq!(
            (d.coverage, d.covered_cents, d.patient_due_cents),
            (Coverage::PartiallyCovered, 20_000, 44_880)
        );
        for exhausted in [0, -5] {
            let d = decide_coverage(64_880, Some(exhausted));
            assert_eq!(
                (d.coverage, d.covered_cents, d.patient_due_cents),
                (Coverage::NotCovered, 0, 64_880)
            );
        }
        assert_eq!(
            serde_json::to_value(Coverage::PartiallyCovered).unwrap(),
            "partially_covered"
        );
    }

    #[test]
    fn coverage_invariant_holds_for_many_inputs() {
        let amounts = [0, 1, 99, 50_000, 64_880, i64::MAX];
        let remaining = [
            None,
            Some(i64::MIN),
            Some(-1),
            Some(0),
            Some(1),
            Some(64_880),
            Some(i64::MAX),
        ];
        for amount in amounts {
            for r in remaining {
                let d = decide_coverage(amount, r);
                assert!(
                    d.covered_cents >= 0 && d.patient_due_cents >= 0,
                    "{amount} {r:?}"
                );
                assert_eq!(d.covered_cents + d.patient_due_cents, amount);
                d.validate_for(amount).unwrap();
            }
        }
    }

    #[test]
    fn decisions_are_validated() {
        use Coverage::*;
        assert!(InsuranceDecision::new(PartiallyCovered, 10, 5, Some("c1".into())).is_ok());
        assert!(InsuranceDecision::new(FullyCovered, 0, 0, None).is_ok());
        for (coverage, covered, due) in [
            (FullyCovered, 10, 1),
            (PartiallyCovered, 0, 10),
            (PartiallyCovered, 10, 0),
            (NotCovered, 1, 9),
            (NotCovered, -1, 11),
            (FullyCovered, 10, -1),
            (PartiallyCovered, i64::MAX, 1),
        ] {
            assert!(
                matches!(
                    InsuranceDecision::new(coverage, covered, due, None),
                    Err(SagaError::InvalidDecision(_))
                ),
                "{coverage:?} {covered} {due}"
            );
        }
        let d = decide_coverage(100, Some(40)).with_claim_id("clm_1");
        assert!(d.validate_for(100).is_ok());
        assert!(matches!(
            d.validate_for(101),
            Err(SagaError::InvalidDecision(_))
        ));
    }

    // ---- the saga: helpers -----------------------------------------------------------------

    const INCIDENT: &str = "0190f1e2-aaaa-7bbb-8ccc-123456789abc";

    fn verified(amount: i64, remaining: Option<i64>) -> StepResult {
        let d = decide_coverage(amount, remaining);
        let d = if d.covered_cents > 0 {
            d.with_claim_id("clm_1")
        } else {
            d
        };
        StepResult::InsuranceVerified(d)
    }

    fn charged(status: &str) -> StepResult {
        StepResult::Charged {
            intent_id: "pi_1".to_owned(),
            status: status.to_owned(),
        }
    }

    /// Applies `results` one by one to whatever step is next, returning the saga and the
    /// steps run.
    fn run(saga: Saga, results: Vec<StepResult>) -> (Saga, Vec<Step>) {
        let mut saga = saga;
        let mut ran = Vec::new();
        for (i, result) in results.into_iter().enumerate() {
            let step = next_step(&saga);
            ran.push(step);
            saga = apply(&saga, step, result, t(i as i64)).unwrap();
        }
        (saga, ran)
    }

    fn outcomes(saga: &Saga) -> Vec<(Step, &str)> {
        saga.steps
            .iter()
            .map(|r| (r.step, r.outcome.as_str()))
            .collect()
    }

    // ---- happy paths -----------------------------------------------------------------------

    #[test]
    fn start_is_pending() {
        let saga = start(INCIDENT, 64_880, "USD");
        assert_eq!(saga.status, InvoiceStatus::Pending);
        assert_eq!(saga.currency, "usd");
        assert_eq!(next_step(&saga), Step::VerifyInsurance);
        assert_eq!(start(INCIDENT, -5, "usd").amount_cents, 0);
        assert!(!is_done(&saga));
    }

    #[test]
    fn fully_covered_never_charges() {
        let saga = start(INCIDENT, 64_880, "usd");
        let (saga, ran) = run(
            saga,
            vec![verified(64_880, Some(64_880)), StepResult::Completed],
        );
        assert_eq!(ran, [Step::VerifyInsurance, Step::Complete]);
        assert_eq!(next_step(&saga), Step::Done);
        assert_eq!(saga.status, InvoiceStatus::Paid);
        assert_eq!(saga.payment, None);
        assert!(!saga.compensating);
        assert_eq!(
            outcomes(&saga),
            [
                (Step::VerifyInsurance, "insurance_verified: fully_covered"),
                (Step::Complete, "completed"),
            ]
        );
        assert_eq!(saga.steps[1].at, t(1));
    }

    #[test]
    fn partial_coverage_charges_the_share() {
        let saga = start(INCIDENT, 64_880, "usd");
        let saga = apply(
            &saga,
            Step::VerifyInsurance,
            verified(64_880, Some(20_000)),
            t(0),
        )
        .unwrap();
        assert_eq!(saga.status, InvoiceStatus::InsuranceVerified);
        assert_eq!(next_step(&saga), Step::Charge);
        assert_eq!(saga.insurance.as_ref().unwrap().patient_due_cents, 44_880);
        let (saga, ran) = run(saga, vec![charged("succeeded"), StepResult::Completed]);
        assert_eq!(ran, [Step::Charge, Step::Complete]);
        assert!(is_done(&saga));
        assert_eq!(saga.status, InvoiceStatus::Paid);
        assert_eq!(
            saga.payment,
            Some(PaymentRef {
                intent_id: "pi_1".into(),
                status: "succeeded".into()
            })
        );
    }

    #[test]
    fn not_covered_charges_everything() {
        let saga = start(INCIDENT, 64_880, "usd");
        let (saga, ran) = run(
            saga,
            vec![
                verified(64_880, None),
                charged("succeeded"),
                StepResult::Completed,
            ],
        );
        assert_eq!(ran, [Step::VerifyInsurance, Step::Charge, Step::Complete]);
        assert_eq!(saga.status, InvoiceStatus::Paid);
        assert_eq!(saga.insurance.as_ref().unwrap().patient_due_cents, 64_880);
        assert_eq!(saga.insurance.as_ref().unwrap().claim_id, None);
        assert!(is_done(&saga));
    }

    #[test]
    fn processing_payment_is_reread_not_recharged() {
        let saga = start(INCIDENT, 1_000, "usd");
        let (saga, _) = run(saga, vec![verified(1_000, None), charged("processing")]);
        assert_eq!(next_step(&saga), Step::Charge);
        assert_eq!(saga.attempts, 1);
        assert_eq!(saga.status, InvoiceStatus::InsuranceVerified);
        // Another intent id for the same charge is refused.
        let other = StepResult::Charged {
            intent_id: "pi_2".into(),
            status: "succeeded".into(),
        };
        assert!(matches!(
            apply(&saga, Step::Charge, other, t(5)),
            Err(SagaError::IntentMismatch { .. })
        ));
        let (saga, _) = run(saga, vec![charged("succeeded"), StepResult::Completed]);
        assert_eq!(saga.status, InvoiceStatus::Paid);
        assert_eq!(saga.attempts, 0);
    }

    // ---- failures and compensation ---------------------------------------------------------

    #[test]
    fn declined_card_cancels_the_intent_releases_the_claim_and_voids() {
        let saga = start(INCIDENT, 64_880, "usd");
        let declined = StepResult::ChargeFailed {
            intent_id: Some("pi_1".into()),
            reason: "card_declined".into(),
        };
        let (saga, _) = run(saga, vec![verified(64_880, Some(20_000)), declined]);
        assert!(saga.compensating);
        assert_eq!(saga.status, InvoiceStatus::Failed);
        assert_eq!(
            saga.failure.as_deref(),
            Some("payment failed: card_declined")
        );
        // Nothing was captured: no refund; the open intent is cancelled first.
        let (saga, ran) = run(
            saga,
            vec![
                StepResult::Cancelled,
                StepResult::Released,
                StepResult::Voided,
            ],
        );
        assert_eq!(
            ran,
            [Step::CancelPayment, Step::ReleaseClaim, Step::VoidInvoice]
        );
        assert!(is_done(&saga));
        assert_eq!(saga.status, InvoiceStatus::Failed);
        assert_eq!(saga.payment.as_ref().unwrap().status, "canceled");
        assert!(!ran.contains(&Step::RefundPayment));
    }

    #[test]
    fn declined_without_intent_goes_straight_to_release() {
        let saga = start(INCIDENT, 64_880, "usd");
        let declined = StepResult::ChargeFailed {
            intent_id: None,
            reason: "invalid customer".into(),
        };
        let (saga, ran) = run(
            saga,
            vec![
                verified(64_880, Some(20_000)),
                declined,
                StepResult::Released,
                StepResult::Voided,
            ],
        );
        assert_eq!(
            ran,
            [
                Step::VerifyInsurance,
                Step::Charge,
                Step::ReleaseClaim,
                Step::VoidInvoice
            ]
        );
        assert!(is_done(&saga));
        assert_eq!(saga.status, InvoiceStatus::Failed);
    }

    #[test]
    fn not_covered_decline_has_no_claim_to_release() {
        let saga = start(INCIDENT, 64_880, "usd");
        let (saga, ran) = run(
            saga,
            vec![
                verified(64_880, None),
                charged("requires_payment_method"),
                StepResult::Cancelled,
                StepResult::Voided,
            ],
        );
        assert_eq!(
            ran,
            [
                Step::VerifyInsurance,
                Step::Charge,
                Step::CancelPayment,
                Step::VoidInvoice
            ]
        );
        assert!(is_done(&saga));
        assert_eq!(saga.status, InvoiceStatus::Failed);
    }

    #[test]
    fn requires_action_and_canceled_fail_the_charge() {
        for (status, first_compensation) in [
            ("requires_action", Step::CancelPayment),
            ("requires_capture", Step::CancelPayment),
            ("requires_payment_method", Step::CancelPayment),
            ("canceled", Step::ReleaseClaim),
        ] {
            let saga = start(INCIDENT, 1_000, "usd");
            let (saga, _) = run(saga, vec![verified(1_000, Some(400)), charged(status)]);
            assert!(saga.compensating, "{status}");
            assert_eq!(
                saga.failure.as_deref(),
                Some(format!("payment {status}").as_str())
            );
            assert_eq!(next_step(&saga), first_compensation, "{status}");
        }
    }

    #[test]
    fn captured_then_failure_refunds_first() {
        let saga = start(INCIDENT, 64_880, "usd");
        let (saga, _) = run(
            saga,
            vec![verified(64_880, Some(20_000)), charged("succeeded")],
        );
        assert_eq!(next_step(&saga), Step::Complete);
        let saga = abort(&saga, "invoice disputed", t(10)).unwrap();
        assert_eq!(saga.status, InvoiceStatus::Failed);
        assert_eq!(saga.failure.as_deref(), Some("aborted: invoice disputed"));
        let (saga, ran) = run(
            saga,
            vec![
                StepResult::Refunded,
                StepResult::Released,
                StepResult::Voided,
            ],
        );
        assert_eq!(
            ran,
            [Step::RefundPayment, Step::ReleaseClaim, Step::VoidInvoice]
        );
        assert!(is_done(&saga));
        assert_eq!(saga.status, InvoiceStatus::Failed);
        assert_eq!(saga.payment.as_ref().unwrap().status, "refunded");
        // Aborting again: finished.
        assert_eq!(abort(&saga, "again", t(20)), Err(SagaError::Finished));
    }

    #[test]
    fn a_cancel_that_finds_the_payment_succeeded_refunds_it() {
        let saga = start(INCIDENT, 1_000, "usd");
        let (saga, _) = run(saga, vec![verified(1_000, None), charged("processing")]);
        let saga = abort(&saga, "operator", t(3)).unwrap();
        // Aborting twice changes nothing.
        assert_eq!(abort(&saga, "operator", t(4)).unwrap(), saga);
        assert_eq!(next_step(&saga), Step::CancelPayment);
        let (saga, ran) = run(
            saga,
            vec![
                charged("succeeded"),
                StepResult::Refunded,
                StepResult::Voided,
            ],
        );
        assert_eq!(
            ran,
            [Step::CancelPayment, Step::RefundPayment, Step::VoidInvoice]
        );
        assert!(is_done(&saga));
    }

    #[test]
    fn insurance_rejection_only_voids() {
        let saga = start(INCIDENT, 1_000, "usd");
        let (saga, ran) = run(
            saga,
            vec![
                StepResult::InsuranceRejected("unknown patient".into()),
                StepResult::Voided,
            ],
        );
        assert_eq!(ran, [Step::VerifyInsurance, Step::VoidInvoice]);
        assert!(is_done(&saga));
        assert_eq!(saga.status, InvoiceStatus::Failed);
        assert_eq!(
            saga.failure.as_deref(),
            Some("insurance rejected: unknown patient")
        );
    }

    // ---- retries ---------------------------------------------------------------------------

    #[test]
    fn transient_failures_retry_the_same_step_with_backoff() {
        let mut saga = start(INCIDENT, 1_000, "usd");
        let mut waits = Vec::new();
        for i in 0..8 {
            assert_eq!(next_step(&saga), Step::VerifyInsurance);
            saga = apply(
                &saga,
                Step::VerifyInsurance,
                StepResult::Transient("timeout".into()),
                t(i),
            )
            .unwrap();
            waits.push(backoff(saga.attempts).as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(saga.attempts, 8);
        assert_eq!(saga.status, InvoiceStatus::Pending);
        assert_eq!(saga.steps.len(), 8);
        assert_eq!(saga.steps[0].outcome, "transient: timeout");
        // Success resets the counter.
        let saga = apply(&saga, Step::VerifyInsurance, verified(1_000, None), t(9)).unwrap();
        assert_eq!(saga.attempts, 0);
        let saga = apply(
            &saga,
            Step::Charge,
            StepResult::Transient("503".into()),
            t(10),
        )
        .unwrap();
        assert_eq!((next_step(&saga), saga.attempts), (Step::Charge, 1));
    }

    #[test]
    fn backoff_is_capped_exponential() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(6), Duration::from_secs(32));
        assert_eq!(backoff(7), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    // ---- refusals --------------------------------------------------------------------------

    #[test]
    fn mismatched_results_are_rejected() {
        let saga = start(INCIDENT, 1_000, "usd");
        for result in [
            StepResult::Refunded,
            StepResult::Completed,
            charged("succeeded"),
            StepResult::Voided,
        ] {
            assert!(matches!(
                apply(&saga, Step::VerifyInsurance, result, t(0)),
                Err(SagaError::Mismatch {
                    step: Step::VerifyInsurance,
                    ..
                })
            ));
        }
        // The wrong step.
        assert_eq!(
            apply(&saga, Step::Charge, charged("succeeded"), t(0)),
            Err(SagaError::UnexpectedStep {
                expected: Step::VerifyInsurance,
                got: Step::Charge
            })
        );
        // A split that does not add up.
        assert!(matches!(
            apply(&saga, Step::VerifyInsurance, verified(999, None), t(0)),
            Err(SagaError::InvalidDecision(_))
        ));
        let (charging, _) = run(saga, vec![verified(1_000, None)]);
        assert!(matches!(
            apply(&charging, Step::Charge, charged("paid"), t(1)),
            Err(SagaError::UnknownPaymentStatus(_))
        ));
        assert!(matches!(
            apply(&charging, Step::Charge, StepResult::Released, t(1)),
            Err(SagaError::Mismatch { .. })
        ));
        assert!(matches!(
            apply(
                &charging,
                Step::Charge,
                StepResult::Charged {
                    intent_id: String::new(),
                    status: "succeeded".into()
                },
                t(1)
            ),
            Err(SagaError::IntentMismatch { .. })
        ));
        // Finished sagas take nothing.
        let (done, _) = run(charging, vec![charged("succeeded"), StepResult::Completed]);
        assert_eq!(
            apply(&done, Step::Done, StepResult::Completed, t(9)),
            Err(SagaError::Finished)
        );
        assert_eq!(
            apply(&done, Step::Charge, charged("succeeded"), t(9)),
            Err(SagaError::Finished)
        );
    }

    #[test]
    fn a_succeeded_charge_is_never_charged_again() {
        let saga = start(INCIDENT, 1_000, "usd");
        let (saga, _) = run(saga, vec![verified(1_000, None), charged("succeeded")]);
        assert_eq!(
            apply(&saga, Step::Charge, charged("succeeded"), t(5)),
            Err(SagaError::UnexpectedStep {
                expected: Step::Complete,
                got: Step::Charge
            })
        );
    }

    #[test]
    fn saga_round_trips_through_json() {
        let saga = start(INCIDENT, 64_880, "usd");
        let (saga, _) = run(
            saga,
            vec![verified(64_880, Some(20_000)), charged("succeeded")],
        );
        let json = serde_json::to_value(&saga).unwrap();
        assert_eq!(json["status"], "insurance_verified");
        assert_eq!(json["steps"][1]["step"], "charge");
        assert_eq!(json["insurance"]["coverage"], "partially_covered");
        let back: Saga = serde_json::from_value(json).unwrap();
        assert_eq!(back, saga);
        let result = StepResult::ChargeFailed {
            intent_id: None,
            reason: "x".into(),
        };
        let back: StepResult =
            serde_json::from_value(serde_json::to_value(&result).unwrap()).unwrap();
        assert_eq!(back, result);
    }

    #[test]
    fn idempotency_keys_are_stable_short_and_distinct() {
        assert_eq!(
            idempotency_key(INCIDENT, Step::Charge),
            format!("shers-{INCIDENT}-charge")
        );
        assert_eq!(
            idempotency_key(INCIDENT, Step::RefundPayment),
            format!("shers-{INCIDENT}-refund_payment")
        );
        assert_ne!(
            idempotency_key(INCIDENT, Step::Charge),
            idempotency_key("other", Step::Charge)
        );
        let long = "x".repeat(1_000);
        let odd = "incident with spaces/ünïcode";
        for id in [long.as_str(), odd, ""] {
            let key = idempotency_key(id, Step::CancelPayment);
            assert!(key.len() <= MAX_IDEMPOTENCY_KEY_LEN, "{key}");
            assert!(
                key.starts_with("shersh-") && key.ends_with("-cancel_payment"),
                "{key}"
            );
            assert!(key.bytes().all(|b| b.is_ascii_graphic()));
            assert_eq!(key, idempotency_key(id, Step::CancelPayment));
        }
        assert_ne!(
            idempotency_key(&long, Step::Charge),
            idempotency_key(odd, Step::Charge)
        );
        let longest_plain = "a".repeat(200);
        assert!(
            idempotency_key(&longest_plain, Step::VerifyInsurance).len() <= MAX_IDEMPOTENCY_KEY_LEN
        );
    }

    // ---- property: random result sequences -------------------------------------------------

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// One thing that happens to a saga: a result (plausible for the step due, or any
        /// result at all), or an abort.
        #[derive(Clone, Debug)]
        enum Action {
            Plausible(u8),
            Any(StepResult),
            Abort,
        }

        fn any_result() -> impl Strategy<Value = StepResult> {
            let status = prop::sample::select(vec![
                "succeeded",
                "processing",
                "requires_action",
                "requires_payment_method",
                "requires_capture",
                "canceled",
                "bogus",
            ]);
            let intent = prop::sample::select(vec!["pi_1", "pi_2"]);
            prop_oneof![
                (
                    0..3_000_i64,
                    prop::option::of(-100..3_000_i64),
                    any::<bool>()
                )
                    .prop_map(|(amount, remaining, claim)| {
                        let d = decide_coverage(amount, remaining);
                        StepResult::InsuranceVerified(if claim { d.with_claim_id("c") } else { d })
                    }),
                Just(StepResult::InsuranceRejected("no".into())),
                Just(StepResult::Transient("t".into())),
                (intent.clone(), status).prop_map(|(i, s)| StepResult::Charged {
                    intent_id: i.into(),
                    status: s.into()
                }),
                prop::option::of(intent).prop_map(|i| StepResult::ChargeFailed {
                    intent_id: i.map(str::to_owned),
                    reason: "declined".into()
                }),
                Just(StepResult::Refunded),
                Just(StepResult::Cancelled),
                Just(StepResult::Released),
                Just(StepResult::Voided),
                Just(StepResult::Completed),
            ]
        }

        fn action() -> impl Strategy<Value = Action> {
            prop_oneof![
                6 => any::<u8>().prop_map(Action::Plausible),
                3 => any_result().prop_map(Action::Any),
                1 => Just(Action::Abort),
            ]
        }

        /// A result the step could really produce, picked by `pick`.
        fn plausible(saga: &Saga, step: Step, pick: u8) -> StepResult {
            if pick.is_multiple_of(5) {
                return StepResult::Transient("t".into());
            }
            let intent = saga
                .payment
                .as_ref()
                .map_or_else(|| "pi_1".to_owned(), |p| p.intent_id.clone());
            match step {
                Step::VerifyInsurance => match pick % 4 {
                    0 => StepResult::InsuranceRejected("no".into()),
                    1 => verified(saga.amount_cents, None),
                    2 => verified(saga.amount_cents, Some(saga.amount_cents)),
                    _ => verified(saga.amount_cents, Some(saga.amount_cents / 2)),
                },
                Step::Charge => match pick % 6 {
                    0 => StepResult::ChargeFailed {
                        intent_id: Some(intent),
                        reason: "card_declined".into(),
                    },
                    1 => StepResult::Charged {
                        intent_id: intent,
                        status: "processing".into(),
                    },
                    2 => StepResult::Charged {
                        intent_id: intent,
                        status: "requires_action".into(),
                    },
                    _ => StepResult::Charged {
                        intent_id: intent,
                        status: "succeeded".into(),
                    },
                },
                Step::Complete => StepResult::Completed,
                Step::RefundPayment => StepResult::Refunded,
                Step::CancelPayment => StepResult::Cancelled,
                Step::ReleaseClaim => StepResult::Released,
                Step::VoidInvoice => StepResult::Voided,
                Step::Done => StepResult::Completed,
            }
        }

        /// Performs `action` on `saga` at `clock`; `None` when it was refused.
        fn act(saga: &Saga, action: &Action, clock: i64) -> Result<Option<Saga>, TestCaseError> {
            let now = t(clock);
            let step = next_step(saga);
            match action {
                Action::Abort => Ok(abort(saga, "operator", now).ok()),
                Action::Plausible(_) if step == Step::Done => Ok(None),
                Action::Plausible(pick) => {
                    let result = plausible(saga, step, *pick);
                    apply(saga, step, result, now)
                        .map(Some)
                        .map_err(|e| TestCaseError::fail(format!("plausible result refused: {e}")))
                }
                Action::Any(result) => Ok(apply(saga, step, result.clone(), now).ok()),
            }
        }

        /// What must hold after every change.
        fn check_invariants(saga: &Saga) -> Result<(), TestCaseError> {
            if let Some(d) = &saga.insurance {
                prop_assert!(d.covered_cents >= 0 && d.patient_due_cents >= 0);
                prop_assert_eq!(d.covered_cents + d.patient_due_cents, saga.amount_cents);
            }
            prop_assert_eq!(saga.compensating, saga.failure.is_some());
            if saga.compensating {
                prop_assert_eq!(saga.status, InvoiceStatus::Failed);
            }
            if next_step(saga) == Step::Done {
                let captured = saga
                    .payment
                    .as_ref()
                    .is_some_and(|p| p.status == "succeeded");
                match saga.status {
                    InvoiceStatus::Paid => {
                        prop_assert!(!saga.compensating);
                        let due = saga.insurance.as_ref().map(|d| d.patient_due_cents);
                        prop_assert!(due == Some(0) || captured, "paid without money");
                    }
                    InvoiceStatus::Failed => {
                        prop_assert!(saga.compensating);
                        prop_assert!(!captured, "failed but kept the money");
                        prop_assert!(
                            saga.payment.as_ref().is_none_or(|p| matches!(
                                p.status.as_str(),
                                "canceled" | "refunded"
                            ))
                        );
                        prop_assert!(has_outcome(saga, Step::VoidInvoice, OUTCOME_VOIDED));
                        if saga
                            .insurance
                            .as_ref()
                            .is_some_and(|d| d.claim_id.is_some())
                        {
                            prop_assert!(has_outcome(saga, Step::ReleaseClaim, OUTCOME_RELEASED));
                        }
                    }
                    other => prop_assert!(false, "done with status {:?}", other),
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn random_result_sequences_keep_the_invariants(
                amount in 0..5_000_i64,
                actions in prop::collection::vec(action(), 0..40),
            ) {
                let mut saga = start(INCIDENT, amount, "usd");
                let mut captured = false;
                // The random phase, then a cooperative driver (the success result for each
                // step: `Plausible(3)`) that must reach the end.
                let finish = std::iter::repeat_n(Action::Plausible(3), 12);
                for (clock, action) in (1..).zip(actions.iter().cloned().chain(finish)) {
                    let before = saga.clone();
                    let step = next_step(&before);
                    if let Some(after) = act(&before, &action, clock)? {
                        if step.is_compensation() && after.steps.len() > before.steps.len() {
                            prop_assert!(before.compensating && before.failure.is_some(),
                                "compensation {} before a failure", step);
                        }
                        if step == Step::Charge && after.steps.len() > before.steps.len() {
                            prop_assert!(!captured, "charged twice");
                        }
                        if step == Step::Charge
                            && after.steps.last().is_some_and(|r| r.outcome == "charged: succeeded")
                        {
                            captured = true;
                        }
                        if before.insurance.as_ref().is_some_and(|d| d.patient_due_cents == 0) {
                            prop_assert_ne!(step, Step::Charge, "charged a zero share");
                        }
                        saga = after;
                    }
                    // A charge after a captured one is always refused.
                    if captured {
                        prop_assert!(apply(&saga, Step::Charge, charged("succeeded"), t(0)).is_err());
                    }
                    check_invariants(&saga)?;
                }
                prop_assert!(is_done(&saga), "not finished: {:?}", next_step(&saga));
                prop_assert!(matches!(saga.status, InvoiceStatus::Paid | InvoiceStatus::Failed));
            }
        }
    }
}
