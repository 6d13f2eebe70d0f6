//! Patients, their next of kin, and registered wearables: shapes and validation.
//!
//! Names, phone numbers, emails and home locations are patient data: they are stored and shown
//! to authorised callers, and never logged.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::geo::LatLng;
use super::ids::{DeviceId, PatientId};
use super::validation::{FieldError, TextKind, check_id, check_text};

/// Most next-of-kin contacts per patient.
pub const MAX_NEXT_OF_KIN: usize = 10;

/// A patient's insurance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Insurance {
    /// The insurer, by name.
    pub provider: String,
    /// Member / policy number.
    pub member_id: String,
}

/// A person to tell when the patient has an emergency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NextOfKin {
    /// Their name.
    pub name: String,
    /// How they relate to the patient (e.g. `daughter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
    /// Mobile number in E.164 (`+447700900123`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// Email address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// `POST /api/v1/patients` body.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPatient {
    /// Caller-chosen id; a UUID is assigned when absent.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub id: Option<PatientId>,
    /// Full name.
    pub name: String,
    /// `YYYY-MM-DD`.
    #[serde(default)]
    pub date_of_birth: Option<NaiveDate>,
    /// Where the patient lives (the incident location when a reading has none).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub home_location: Option<LatLng>,
    /// Insurance, for billing.
    #[serde(default)]
    pub insurance: Option<Insurance>,
    /// People to notify.
    #[serde(default)]
    pub next_of_kin: Vec<NextOfKin>,
}

/// A stored patient.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Patient {
    /// Its stable identifier.
    #[schema(value_type = String)]
    pub id: PatientId,
    /// Full name.
    pub name: String,
    /// Date of birth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub date_of_birth: Option<NaiveDate>,
    /// Home address position, used when an alarm carries no location.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub home_location: Option<LatLng>,
    /// Their insurance policy, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insurance: Option<Insurance>,
    /// People to notify.
    pub next_of_kin: Vec<NextOfKin>,
    /// When registered.
    pub created_at: DateTime<Utc>,
}

fn valid_phone(phone: &str) -> bool {
    let digits = phone.strip_prefix('+').unwrap_or("");
    (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

fn valid_email(email: &str) -> bool {
    match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && email.len() <= 254
                && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    }
}

impl NewPatient {
    /// Validates and completes the patient (`id` assigned by `new_id` when absent).
    pub fn validate(
        self,
        new_id: impl FnOnce() -> PatientId,
        now: DateTime<Utc>,
    ) -> Result<Patient, Vec<FieldError>> {
        let mut errors = Vec::new();
        if let Some(id) = &self.id {
            check_id(&mut errors, "/id", id.as_str());
        }
        check_text(&mut errors, "/name", &self.name, TextKind::Line, true, 200);
        if let Some(dob) = self.date_of_birth
            && dob > now.date_naive()
        {
            errors.push(FieldError::new(
                "/date_of_birth",
                "must not be in the future",
            ));
        }
        if let Some(home) = &self.home_location {
            home.validate("/home_location", &mut errors);
        }
        if let Some(ins) = &self.insurance {
            check_text(
                &mut errors,
                "/insurance/provider",
                &ins.provider,
                TextKind::Line,
                true,
                200,
            );
            check_text(
                &mut errors,
                "/insurance/member_id",
                &ins.member_id,
                TextKind::Line,
                true,
                100,
            );
        }
        if self.next_of_kin.len() > MAX_NEXT_OF_KIN {
            errors.push(FieldError::new(
                "/next_of_kin",
                format!("at most {MAX_NEXT_OF_KIN} contacts"),
            ));
        }
        for (i, kin) in self.next_of_kin.iter().enumerate() {
            let base = format!("/next_of_kin/{i}");
            check_text(
                &mut errors,
                &format!("{base}/name"),
                &kin.name,
                TextKind::Line,
                true,
                200,
            );
            if let Some(relation) = &kin.relation {
                let pointer = format!("{base}/relation");
                check_text(&mut errors, &pointer, relation, TextKind::Line, false, 100);
            }
            if let Some(phone) = &kin.phone
                && !valid_phone(phone)
            {
                errors.push(FieldError::new(
                    format!("{base}/phone"),
                    "must be an E.164 number such as +447700900123",
                ));
            }
            if let Some(email) = &kin.email
                && !valid_email(email)
            {
                errors.push(FieldError::new(
                    format!("{base}/email"),
                    "must be an email address",
                ));
            }
            if kin.phone.is_none() && kin.email.is_none() {
                errors.push(FieldError::new(
                    base,
                    "needs a phone or an email to be reachable",
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Patient {
            id: self.id.unwrap_or_else(new_id),
            name: self.name.trim().to_owned(),
            date_of_birth: self.date_of_birth,
            home_location: self.home_location,
            insurance: self.insurance,
            next_of_kin: self.next_of_kin,
            created_at: now,
        })
    }
}

/// `POST /api/v1/devices` body.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// Manufacturer/gateway-chosen id.
    #[schema(value_type = String)]
    pub id: DeviceId,
    /// The wearer.
    #[schema(value_type = String)]
    pub patient_id: PatientId,
    /// Device model.
    #[serde(default)]
    pub model: Option<String>,
}

/// A registered wearable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Device {
    /// Its stable identifier.
    #[schema(value_type = String)]
    pub id: DeviceId,
    /// The wearer.
    #[schema(value_type = String)]
    pub patient_id: PatientId,
    /// The device model, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// When registered.
    pub registered_at: DateTime<Utc>,
}

impl NewDevice {
    /// Validates the shape (the patient's existence is checked against the store).
    pub fn validate(self, now: DateTime<Utc>) -> Result<Device, Vec<FieldError>> {
        let mut errors = Vec::new();
        check_id(&mut errors, "/id", self.id.as_str());
        check_id(&mut errors, "/patient_id", self.patient_id.as_str());
        if let Some(model) = &self.model {
            check_text(&mut errors, "/model", model, TextKind::Line, true, 100);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Device {
            id: self.id,
            patient_id: self.patient_id,
            model: self.model,
            registered_at: now,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-23T08:00:00Z".parse().unwrap()
    }

    fn patient(json: serde_json::Value) -> Result<Patient, Vec<FieldError>> {
        serde_json::from_value::<NewPatient>(json)
            .unwrap()
            .validate(|| PatientId::from("generated"), now())
    }

    #[test]
    fn a_complete_patient_validates() {
        let p = patient(serde_json::json!({
            "name": " Ada Lovelace ", "date_of_birth": "1950-12-10",
            "home_location": {"lat": 51.5, "lng": -0.12},
            "insurance": {"provider": "NHS", "member_id": "943 476 5919"},
            "next_of_kin": [{"name": "Byron", "relation": "son", "phone": "+447700900123"}]
        }))
        .unwrap();
        assert_eq!(p.id.as_str(), "generated");
        assert_eq!(p.name, "Ada Lovelace");
    }

    #[test]
    fn every_problem_is_reported_with_its_pointer() {
        let errors = patient(serde_json::json!({
            "id": "has space", "name": "", "date_of_birth": "2030-01-01",
            "home_location": {"lat": 100, "lng": 0},
            "next_of_kin": [{"name": "A", "phone": "0123"}, {"name": "B", "email": "nope"}, {"name": "C"}]
        }))
        .unwrap_err();
        let pointers: Vec<&str> = errors.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(
            pointers,
            [
                "/id",
                "/name",
                "/date_of_birth",
                "/home_location/lat",
                "/next_of_kin/0/phone",
                "/next_of_kin/1/email",
                "/next_of_kin/2"
            ]
        );
    }

    #[test]
    fn names_and_contacts_are_one_line_of_text() {
        let errors = patient(serde_json::json!({
            "name": "Ada\u{0}", "insurance": {"provider": "NHS\n", "member_id": "1\u{85}"},
            "next_of_kin": [{"name": "B\tC", "relation": "son\u{7f}", "email": "a\u{0}@b.c"}]
        }))
        .unwrap_err();
        let pointers: Vec<&str> = errors.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(
            pointers,
            [
                "/name",
                "/insurance/provider",
                "/insurance/member_id",
                "/next_of_kin/0/name",
                "/next_of_kin/0/relation",
                "/next_of_kin/0/email"
            ]
        );
    }

    #[test]
    fn device_ids_are_checked() {
        let d = NewDevice {
            id: DeviceId::from("watch/1"),
            patient_id: PatientId::from("p1"),
            model: None,
        };
        assert_eq!(d.validate(now()).unwrap_err()[0].pointer, "/id");
    }
}
