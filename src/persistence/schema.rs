//! The portable diesel schema shared by both backends (see the migrations in
//! `migrations/sqlite` and `migrations/postgres`, which must stay in step with this file).
#![allow(missing_docs)]

diesel::table! {
    events (seq) {
        seq -> BigInt,
        stream_id -> Text,
        version -> BigInt,
        kind -> Text,
        incident_id -> Nullable<Text>,
        unit_id -> Nullable<Text>,
        device_id -> Nullable<Text>,
        payload -> Text,
        recorded_at -> Timestamp,
    }
}

diesel::table! {
    event_sequence (id) {
        id -> Integer,
        last_seq -> BigInt,
    }
}

diesel::table! {
    api_tokens (id) {
        id -> Text,
        token_hash -> Text,
        role -> Text,
        unit_id -> Nullable<Text>,
        patient_id -> Nullable<Text>,
        name -> Text,
        created_at -> Timestamp,
        revoked_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    patients (id) {
        id -> Text,
        name -> Text,
        date_of_birth -> Nullable<Text>,
        home_lat -> Nullable<Double>,
        home_lng -> Nullable<Double>,
        insurance_provider -> Nullable<Text>,
        insurance_member_id -> Nullable<Text>,
        created_at -> Timestamp,
    }
}

diesel::table! {
    next_of_kin (id) {
        id -> Text,
        patient_id -> Text,
        position -> Integer,
        name -> Text,
        relation -> Nullable<Text>,
        phone -> Nullable<Text>,
        email -> Nullable<Text>,
    }
}

diesel::table! {
    devices (id) {
        id -> Text,
        patient_id -> Text,
        model -> Nullable<Text>,
        registered_at -> Timestamp,
        last_status -> Nullable<Text>,
        last_seen_at -> Nullable<Timestamp>,
        fall_at -> Nullable<Timestamp>,
        fall_deadline -> Nullable<Timestamp>,
        heard_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    readings (id) {
        id -> BigInt,
        device_id -> Text,
        patient_id -> Text,
        measured_at -> Timestamp,
        received_at -> Timestamp,
        status -> Text,
        news2_score -> Nullable<Integer>,
        reading -> Text,
    }
}

diesel::joinable!(next_of_kin -> patients (patient_id));
diesel::joinable!(devices -> patients (patient_id));
diesel::allow_tables_to_appear_in_same_query!(
    events,
    event_sequence,
    api_tokens,
    patients,
    next_of_kin,
    devices,
    readings
);

diesel::table! {
    incidents (id) {
        id -> Text,
        reference -> Text,
        status -> Text,
        priority -> Text,
        source -> Text,
        patient_id -> Nullable<Text>,
        open_patient_id -> Nullable<Text>,
        lat -> Double,
        lng -> Double,
        description -> Nullable<Text>,
        escalated -> Bool,
        assigned_unit_id -> Nullable<Text>,
        hospital_id -> Nullable<Text>,
        dispatch_round -> Integer,
        evidence_count -> Integer,
        cancel_reason -> Nullable<Text>,
        call_received -> Nullable<Timestamp>,
        unit_notified -> Nullable<Timestamp>,
        unit_enroute -> Nullable<Timestamp>,
        unit_on_scene -> Nullable<Timestamp>,
        unit_left_scene -> Nullable<Timestamp>,
        at_destination -> Nullable<Timestamp>,
        closed_at -> Nullable<Timestamp>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        version -> BigInt,
    }
}

diesel::table! {
    incident_evidence (id) {
        id -> Text,
        incident_id -> Text,
        added_at -> Timestamp,
        evidence -> Text,
    }
}

diesel::table! {
    incident_references (year) {
        year -> Integer,
        last_number -> BigInt,
    }
}

diesel::table! {
    idempotency_keys (principal, idem_key) {
        principal -> Text,
        idem_key -> Text,
        route -> Text,
        status -> Nullable<Integer>,
        body -> Nullable<Text>,
        created_at -> Timestamp,
    }
}

diesel::table! {
    notifications (id) {
        id -> Text,
        incident_id -> Text,
        recipient_name -> Text,
        channel -> Text,
        address -> Text,
        template -> Text,
        idempotency_key -> Text,
        status -> Text,
        attempts -> Integer,
        next_attempt_at -> Timestamp,
        last_error -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::allow_tables_to_appear_in_same_query!(incidents, incident_evidence, notifications);

diesel::table! {
    units (id) {
        id -> Text,
        call_sign -> Text,
        capability -> Text,
        status -> Text,
        lat -> Double,
        lng -> Double,
        fix_at -> Timestamp,
        base_lat -> Nullable<Double>,
        base_lng -> Nullable<Double>,
        current_incident_id -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    hospitals (id) {
        id -> Text,
        name -> Text,
        lat -> Double,
        lng -> Double,
        capabilities -> Text,
        capacity -> Integer,
        occupied -> Integer,
        created_at -> Timestamp,
    }
}

diesel::table! {
    offers (id) {
        id -> Text,
        incident_id -> Text,
        unit_id -> Text,
        round -> Integer,
        status -> Text,
        eta_s -> Integer,
        reason -> Text,
        offered_at -> Timestamp,
        expires_at -> Timestamp,
        responded_at -> Nullable<Timestamp>,
        decline_reason -> Nullable<Text>,
        eta_source -> Text,
    }
}

diesel::table! {
    insurance_policies (id) {
        id -> Text,
        patient_id -> Text,
        provider -> Text,
        member_id -> Text,
        remaining_cents -> BigInt,
        created_at -> Timestamp,
    }
}

diesel::table! {
    insurance_claims (id) {
        id -> Text,
        policy_id -> Nullable<Text>,
        patient_id -> Text,
        incident_id -> Text,
        amount_cents -> BigInt,
        covered_cents -> BigInt,
        status -> Text,
        created_at -> Timestamp,
        released_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    invoices (id) {
        id -> Text,
        incident_id -> Text,
        status -> Text,
        amount_cents -> BigInt,
        covered_cents -> BigInt,
        patient_due_cents -> BigInt,
        currency -> Text,
        provider -> Text,
        saga -> Text,
        done -> Bool,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    bus_cursors (name) {
        name -> Text,
        seq -> BigInt,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    push_tokens (token) {
        token -> Text,
        unit_id -> Text,
        platform -> Text,
        created_at -> Timestamp,
    }
}
