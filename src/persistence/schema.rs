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
