//! Crash points: named places where a drill can make the process die as kill -9 would.
//!
//! Recovery has to hold wherever the process dies, not only where a random kill happened to
//! land. Every boundary where a crash changes what recovery sees (a stored step, a provider
//! call before and after it, an offer accepted or committed, a unit's status stored, a lease
//! taken over) carries a [`crash_point`] with a name from [`POINTS`]. `shers serve
//! --enable-fault-injection` with `[fault] crash_at = "<name>"` (`SHERS_FAULT__CRASH_AT`) arms
//! one of them: the first time the process reaches it, it aborts at once, with no clean-up,
//! no drain and no flush. Without the flag the setting is accepted and ignored, so one
//! configuration serves every subcommand. The crash-point test crashes at each point in turn,
//! restarts and checks that the emergency still ends correctly.
//!
//! The armed point is process-wide state on purpose: an abort ends the whole process, and the
//! points sit deep in actors, persistence and the cluster, where threading a handle through
//! every constructor would touch every signature for a drill. It is set once, at start-up,
//! before any point can be reached, and never changes; an unarmed check is one atomic load.
//!
//! This module imports nothing from the crate, so every layer may call it.

use std::sync::OnceLock;

/// Every crash point with what a crash there leaves behind. First the points a plain
/// emergency reaches, in the order it reaches them (reading → offer → accept → unit statuses
/// → billing → close), then the rest. Names are `<area>.<step>`.
pub const POINTS: &[(&str, &str)] = &[
    // A plain emergency, in order.
    (
        "incident.before_create",
        "an emergency reading was accepted; its incident is not stored yet",
    ),
    (
        "incident.after_create",
        "the incident, its first offers and its next-of-kin outbox are stored; no crew has the offer yet",
    ),
    (
        "dispatch.after_offer",
        "the offer frames were pushed to the crews; nobody has answered",
    ),
    (
        "notify.before_send",
        "a due notification is about to go to the provider",
    ),
    (
        "notify.after_send",
        "the provider took the notification; the attempt is not stored (it is sent again)",
    ),
    ("notify.after_mark", "the delivery is stored as sent"),
    (
        "dispatch.after_unit_commit",
        "the unit committed itself to the offer in memory; the accept is not stored",
    ),
    (
        "dispatch.after_accept",
        "the accept is stored on the incident; the crew has no answer yet",
    ),
    ("unit.stored_assigned", "the unit's assignment is stored"),
    (
        "incident.stored_report_enroute",
        "the crew's en route report is stored on the incident, not yet on the unit",
    ),
    (
        "unit.stored_enroute",
        "the unit's en route status is stored",
    ),
    (
        "incident.stored_report_on_scene",
        "the on scene report is stored on the incident, not yet on the unit",
    ),
    (
        "unit.stored_on_scene",
        "the unit's on scene status is stored",
    ),
    (
        "incident.stored_report_transporting",
        "transporting is stored on the incident (a bed taken), not yet on the unit",
    ),
    (
        "unit.stored_transporting",
        "the unit's transporting status is stored",
    ),
    (
        "incident.stored_report_at_hospital",
        "the handover is stored; billing has not started",
    ),
    (
        "incident.stored_start_billing",
        "the incident is in billing; no invoice exists yet",
    ),
    (
        "billing.stored_invoice",
        "the invoice and billing.started are stored; the insurer has not been asked",
    ),
    (
        "billing.before_verify_insurance",
        "the insurer is about to be asked for the split",
    ),
    (
        "billing.after_verify_insurance",
        "the insurer answered (a claim may be open); the answer is not stored",
    ),
    (
        "billing.stored_verify_insurance",
        "the insurer's split is stored",
    ),
    (
        "billing.before_charge",
        "the patient's share is about to be charged",
    ),
    (
        "billing.after_charge",
        "the provider charged (or answered); the payment is not stored",
    ),
    ("billing.stored_charge", "the payment is stored"),
    (
        "billing.stored_complete",
        "the invoice is paid and the saga done; billing.completed is not stored",
    ),
    (
        "unit.stored_at_hospital",
        "the unit's at hospital status is stored",
    ),
    (
        "billing.stored_outcome",
        "billing.completed or billing.failed is stored; the incident is not closed",
    ),
    (
        "incident.stored_close",
        "the incident is closed; its unit is not released yet",
    ),
    (
        "unit.stored_available",
        "the unit is stored available again",
    ),
    // Paths a plain emergency does not take.
    (
        "dispatch.after_round_stored",
        "an expired or declined round's next offers are stored; no crew has them yet",
    ),
    (
        "incident.stored_cancel",
        "the cancellation is stored; the unit is not released yet",
    ),
    (
        "billing.before_cancel_payment",
        "an uncaptured payment is about to be cancelled",
    ),
    (
        "billing.after_cancel_payment",
        "the provider cancelled the payment; that is not stored",
    ),
    (
        "billing.stored_cancel_payment",
        "the payment's cancellation is stored",
    ),
    (
        "billing.before_refund_payment",
        "a captured payment is about to be refunded",
    ),
    (
        "billing.after_refund_payment",
        "the provider refunded the payment; that is not stored",
    ),
    ("billing.stored_refund_payment", "the refund is stored"),
    (
        "billing.before_release_claim",
        "the insurer's claim is about to be released",
    ),
    (
        "billing.after_release_claim",
        "the insurer released the claim; that is not stored",
    ),
    (
        "billing.stored_release_claim",
        "the claim's release is stored",
    ),
    (
        "billing.stored_void_invoice",
        "the invoice is void; billing.failed is not stored",
    ),
    (
        "bus.after_publish",
        "the broker confirmed a batch of the event store; the relay's cursor is not stored (it is published again)",
    ),
    (
        "lease.after_takeover",
        "this node took a dispatch lease (epoch bumped); it has recovered nothing yet",
    ),
    (
        "lease.after_recover",
        "this node recovered the dispatch shard it took and is about to serve it",
    ),
];

/// The armed point, set once at start-up (see the module's doc).
static ARMED: OnceLock<&'static str> = OnceLock::new();

/// `name` is not a crash point.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown crash point `{0}` (`shers fault points` lists them)")]
pub struct UnknownPoint(pub String);

/// The point called `name`, if there is one.
pub fn lookup(name: &str) -> Option<&'static str> {
    POINTS.iter().map(|(n, _)| *n).find(|n| *n == name)
}

/// Arms `name`: the process aborts the first time it reaches that point. Called once, at
/// start-up, by `serve --enable-fault-injection`; a second call keeps the first point.
pub fn arm(name: &str) -> Result<&'static str, UnknownPoint> {
    let point = lookup(name).ok_or_else(|| UnknownPoint(name.to_owned()))?;
    Ok(ARMED.get_or_init(|| point))
}

/// The armed point, if any.
pub fn armed() -> Option<&'static str> {
    ARMED.get().copied()
}

/// A crash point: aborts the process right here if `name` is armed (as kill -9 would: no
/// destructor, no drain, no flush). Otherwise one atomic load.
#[inline]
pub fn crash_point(name: &'static str) {
    if let Some(armed) = ARMED.get()
        && *armed == name
    {
        crash(name);
    }
}

/// [`crash_point`] for a place that has a point only in some cases.
#[inline]
pub fn crash_point_opt(name: Option<&'static str>) {
    if let Some(name) = name {
        crash_point(name);
    }
}

#[cold]
fn crash(name: &str) -> ! {
    // stderr is unbuffered: the line is out before the abort.
    eprintln!("fault injection: crashing at {name}");
    std::process::abort()
}

/// The list `shers fault points` prints: each name alone on its line, `#` comments between.
pub fn listing() -> String {
    let mut out = String::from(
        "# SHERS crash points (serve --enable-fault-injection, SHERS_FAULT__CRASH_AT=<point>)\n\
         # First those a plain emergency reaches, in order; then the rest.\n",
    );
    for (name, what) in POINTS {
        out.push_str("# ");
        out.push_str(what);
        out.push('\n');
        out.push_str(name);
        out.push('\n');
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn names_are_unique_and_in_the_named_areas() {
        let mut seen = BTreeSet::new();
        for (name, what) in POINTS {
            assert!(seen.insert(*name), "{name} listed twice");
            assert!(!what.is_empty());
            let (area, step) = name.split_once('.').unwrap_or(("", ""));
            assert!(
                [
                    "billing", "dispatch", "incident", "unit", "notify", "lease", "bus"
                ]
                .contains(&area),
                "{name}: unknown area"
            );
            assert!(
                !step.is_empty() && step.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}: step must be snake_case"
            );
        }
    }

    #[test]
    fn unknown_names_are_refused() {
        assert_eq!(
            lookup("billing.after_lunch"),
            None,
            "a made-up name must not be a point"
        );
        assert!(arm("billing.after_lunch").is_err());
        assert_eq!(lookup("billing.after_charge"), Some("billing.after_charge"));
    }

    #[test]
    fn the_listing_has_each_bare_name_alone_on_its_line() {
        let listing = listing();
        let names: Vec<&str> = listing.lines().filter(|l| !l.starts_with('#')).collect();
        let expected: Vec<&str> = POINTS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, expected);
    }

    /// Every point listed is placed in the code, and every placed point is listed: a point
    /// that nothing reaches would pass the crash test without testing anything.
    #[test]
    fn every_listed_point_is_placed_and_every_placed_point_is_listed() {
        let mut placed = BTreeSet::new();
        let mut called = BTreeSet::new();
        let mut stack = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("fault.rs")
                {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for call in text.split("crash_point(\"").skip(1) {
                        called.insert(call.split('"').next().unwrap_or_default().to_owned());
                    }
                    for quoted in text.split('"').skip(1).step_by(2) {
                        if lookup(quoted).is_some() {
                            placed.insert(quoted.to_owned());
                        }
                    }
                }
            }
        }
        let listed: BTreeSet<String> = POINTS.iter().map(|(n, _)| (*n).to_owned()).collect();
        let missing: Vec<_> = listed.difference(&placed).collect();
        assert!(missing.is_empty(), "listed but not placed: {missing:?}");
        let unlisted: Vec<_> = called.iter().filter(|n| lookup(n).is_none()).collect();
        assert!(unlisted.is_empty(), "placed but not listed: {unlisted:?}");
    }
}
