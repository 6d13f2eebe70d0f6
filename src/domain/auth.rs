//! Roles and principals: who is calling, and what each role may do.
//!
//! Pure: token hashing and role rules only. Token storage is in `persistence::tokens`, the
//! HTTP extractor in `http::auth`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ids::{PatientId, TokenId, UnitId};
use super::validation::{FieldError, TextKind, check_id, check_text};

/// An API role (`docs/api.md` "Conventions").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Operators: everything a console may do, plus reference data and `/admin`.
    Admin,
    /// Dispatchers at a dispatch-centre console.
    Console,
    /// An ambulance crew, bound to one unit.
    Crew,
    /// A wearable gateway pushing vitals.
    Gateway,
    /// A patient app, bound to one patient.
    Patient,
}

impl Role {
    /// Every role, in a stable order.
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Console,
        Role::Crew,
        Role::Gateway,
        Role::Patient,
    ];

    /// The role's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Console => "console",
            Role::Crew => "crew",
            Role::Gateway => "gateway",
            Role::Patient => "patient",
        }
    }

    /// Whether a holder of `self` may use an endpoint open to `required`. `admin` may do
    /// everything a `console` may; every other role is only itself.
    pub fn satisfies(self, required: Role) -> bool {
        self == required || (self == Role::Admin && required == Role::Console)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown role name.
#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?} (expected admin, console, crew, gateway or patient)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// The authenticated caller of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Principal {
    /// The token's row id.
    pub token_id: TokenId,
    /// The role granted.
    pub role: Role,
    /// The unit a crew token is bound to.
    pub unit_id: Option<UnitId>,
    /// The patient a patient token is bound to.
    pub patient_id: Option<PatientId>,
    /// A label for people (not secret, not patient data).
    pub name: String,
}

impl Principal {
    /// Whether this caller may use an endpoint open to any of `allowed`.
    pub fn is_allowed(&self, allowed: &[Role]) -> bool {
        allowed.iter().any(|r| self.role.satisfies(*r))
    }
}

/// Prefix of every SHERS token, so leaked tokens are easy to recognise and scan for.
pub const TOKEN_PREFIX: &str = "shers_";

/// The stored form of a token: lowercase hex SHA-256. Tokens carry 256 random bits, so a fast
/// hash is enough (no password stretching needed) and lookups stay one index probe.
pub fn hash_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(64);
    for byte in digest {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

/// Prefix of a cluster node's credential for the other nodes' `/internal/v1` endpoints. It is
/// not an API token: no route of the public API accepts it.
pub const NODE_CREDENTIAL_PREFIX: &str = "shers_node_";

/// Prefix of the credential a server's billing presents to that same server's
/// `/insurance/v1`. It is not an API token: no other route accepts it.
pub const BILLING_CREDENTIAL_PREFIX: &str = "shers_billing_";

/// Whether `credential` is one of the processes' own credentials (a node's, billing's) rather
/// than an API token, by its prefix.
pub fn is_service_credential(credential: &str) -> bool {
    credential.starts_with(NODE_CREDENTIAL_PREFIX)
        || credential.starts_with(BILLING_CREDENTIAL_PREFIX)
}

/// Formats 32 random bytes as a token.
pub fn format_token(random: &[u8; 32]) -> String {
    format_credential(TOKEN_PREFIX, random)
}

/// Formats 32 random bytes as a secret starting with `prefix`.
pub fn format_credential(prefix: &str, random: &[u8; 32]) -> String {
    let mut out = String::with_capacity(prefix.len() + 64);
    out.push_str(prefix);
    for byte in random {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_satisfies_console_only() {
        assert!(Role::Admin.satisfies(Role::Console));
        assert!(Role::Admin.satisfies(Role::Admin));
        assert!(!Role::Admin.satisfies(Role::Crew));
        assert!(!Role::Console.satisfies(Role::Admin));
        assert!(!Role::Gateway.satisfies(Role::Console));
    }

    #[test]
    fn roles_round_trip() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().ok(), Some(role));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let token = format_token(&[0xab; 32]);
        assert!(token.starts_with("shers_abab"));
        assert_eq!(token.len(), 6 + 64);
    }

    #[test]
    fn service_credentials_are_told_from_api_tokens_by_prefix() {
        let node = format_credential(NODE_CREDENTIAL_PREFIX, &[0xab; 32]);
        let billing = format_credential(BILLING_CREDENTIAL_PREFIX, &[0xab; 32]);
        assert!(is_service_credential(&node) && is_service_credential(&billing));
        // An API token's hex never spells either prefix.
        assert!(!is_service_credential(&format_token(&[0xab; 32])));
        assert!(!is_service_credential(&format_token(&[0x00; 32])));
    }
}

/// A token's binding does not fit its role.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// Crew tokens act for exactly one unit.
    #[error("a crew token must be bound to a unit (--unit)")]
    CrewNeedsUnit,
    /// Patient tokens act for exactly one patient.
    #[error("a patient token must be bound to a patient (--patient)")]
    PatientNeedsPatient,
    /// Only crew tokens carry a unit.
    #[error("only crew tokens can be bound to a unit")]
    UnitNotAllowed,
    /// Only patient tokens carry a patient.
    #[error("only patient tokens can be bound to a patient")]
    PatientNotAllowed,
}

/// Checks that a token's unit/patient binding fits its role.
pub fn validate_binding(
    role: Role,
    unit: Option<&UnitId>,
    patient: Option<&PatientId>,
) -> Result<(), BindingError> {
    match (role, unit, patient) {
        (Role::Crew, None, _) => Err(BindingError::CrewNeedsUnit),
        (Role::Patient, _, None) => Err(BindingError::PatientNeedsPatient),
        (r, Some(_), _) if r != Role::Crew => Err(BindingError::UnitNotAllowed),
        (r, _, Some(_)) if r != Role::Patient => Err(BindingError::PatientNotAllowed),
        _ => Ok(()),
    }
}

/// Checks everything about a new token but the store: its binding fits its role
/// ([`validate_binding`]), a bound unit or patient is a well-formed id, and its name is one
/// line of 1 to 200 characters. Answers the trimmed name, or every problem with its pointer
/// (`/unit_id`, `/patient_id`, `/name`), for the admin API and the command line alike.
pub fn validate_new_token(
    role: Role,
    unit: Option<&UnitId>,
    patient: Option<&PatientId>,
    name: &str,
) -> Result<String, Vec<FieldError>> {
    let mut errors = Vec::new();
    check_text(&mut errors, "/name", name, TextKind::Line, true, 200);
    if let Err(e) = validate_binding(role, unit, patient) {
        let pointer = match e {
            BindingError::CrewNeedsUnit | BindingError::UnitNotAllowed => "/unit_id",
            BindingError::PatientNeedsPatient | BindingError::PatientNotAllowed => "/patient_id",
        };
        errors.push(FieldError::new(pointer, e.to_string()));
    }
    if let Some(unit) = unit {
        check_id(&mut errors, "/unit_id", unit.as_str());
    }
    if let Some(patient) = patient {
        check_id(&mut errors, "/patient_id", patient.as_str());
    }
    if errors.is_empty() {
        Ok(name.trim().to_owned())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod binding_tests {
    use super::*;

    #[test]
    fn bindings_follow_roles() {
        let unit = UnitId::from("A1");
        let patient = PatientId::from("p1");
        assert_eq!(
            validate_binding(Role::Crew, None, None),
            Err(BindingError::CrewNeedsUnit)
        );
        assert_eq!(validate_binding(Role::Crew, Some(&unit), None), Ok(()));
        assert_eq!(
            validate_binding(Role::Patient, None, None),
            Err(BindingError::PatientNeedsPatient)
        );
        assert_eq!(
            validate_binding(Role::Patient, None, Some(&patient)),
            Ok(())
        );
        assert_eq!(
            validate_binding(Role::Console, Some(&unit), None),
            Err(BindingError::UnitNotAllowed)
        );
        assert_eq!(
            validate_binding(Role::Admin, None, Some(&patient)),
            Err(BindingError::PatientNotAllowed)
        );
        assert_eq!(validate_binding(Role::Gateway, None, None), Ok(()));
    }

    #[test]
    fn new_tokens_have_a_one_line_name_and_well_formed_bindings() {
        assert_eq!(
            validate_new_token(Role::Crew, Some(&UnitId::from("M-12")), None, " Medic 12 "),
            Ok("Medic 12".to_owned())
        );
        let pointers = |errors: Vec<FieldError>| -> Vec<String> {
            errors.into_iter().map(|e| e.pointer).collect()
        };
        let errors = validate_new_token(
            Role::Crew,
            Some(&UnitId::from("M\u{0}12")),
            None,
            "night\ndesk",
        )
        .unwrap_err();
        assert_eq!(pointers(errors), ["/name", "/unit_id"]);
        let errors =
            validate_new_token(Role::Patient, None, Some(&PatientId::from("")), "").unwrap_err();
        assert_eq!(pointers(errors), ["/name", "/patient_id"]);
        let errors = validate_new_token(Role::Console, None, None, &"x".repeat(201)).unwrap_err();
        assert_eq!(pointers(errors), ["/name"]);
    }
}
