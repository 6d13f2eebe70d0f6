//! API tokens: only the SHA-256 of a token is stored, with its role, binding and lifetime.

use chrono::{DateTime, SubsecRound as _, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::Serialize;

use super::schema::api_tokens;
use super::{DbConn, StoreError, from_db_time, to_db_time};
use crate::db_run;
use crate::domain::auth::{Principal, Role};
use crate::domain::ids::{PatientId, TokenId, UnitId};

/// A stored token, without its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    /// Row id.
    pub id: TokenId,
    /// Role granted.
    pub role: Role,
    /// Unit binding (crew).
    pub unit_id: Option<UnitId>,
    /// Patient binding (patient).
    pub patient_id: Option<PatientId>,
    /// A label for people (which token is which); never the secret.
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl TokenRecord {
    /// The principal this token authenticates as.
    pub fn principal(&self) -> Principal {
        Principal {
            token_id: self.id,
            role: self.role,
            unit_id: self.unit_id.clone(),
            patient_id: self.patient_id.clone(),
            name: self.name.clone(),
        }
    }
}

/// The insert form of a token.
#[derive(Insertable)]
#[diesel(table_name = api_tokens, treat_none_as_default_value = false)]
pub struct NewToken<'a> {
    /// Row id.
    pub id: TokenId,
    /// SHA-256 hex of the secret.
    pub token_hash: &'a str,
    /// Role name.
    pub role: &'a str,
    /// Unit binding.
    pub unit_id: Option<&'a UnitId>,
    /// Patient binding.
    pub patient_id: Option<&'a PatientId>,
    /// A label for people (which token is which); never the secret.
    pub name: &'a str,
    /// Creation time.
    pub created_at: chrono::NaiveDateTime,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = api_tokens)]
struct TokenRow {
    id: TokenId,
    role: String,
    unit_id: Option<UnitId>,
    patient_id: Option<PatientId>,
    name: String,
    created_at: chrono::NaiveDateTime,
    revoked_at: Option<chrono::NaiveDateTime>,
}

impl TryFrom<TokenRow> for TokenRecord {
    type Error = StoreError;
    fn try_from(row: TokenRow) -> Result<Self, StoreError> {
        Ok(TokenRecord {
            id: row.id,
            role: row
                .role
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("token role: {e}")))?,
            unit_id: row.unit_id,
            patient_id: row.patient_id,
            name: row.name,
            created_at: from_db_time(row.created_at),
            revoked_at: row.revoked_at.map(from_db_time),
        })
    }
}

/// Stores `record` under `token_hash`.
pub async fn insert(
    conn: &mut DbConn,
    token_hash: &str,
    record: &TokenRecord,
) -> Result<(), StoreError> {
    let row = NewToken {
        id: record.id,
        token_hash,
        role: record.role.as_str(),
        unit_id: record.unit_id.as_ref(),
        patient_id: record.patient_id.as_ref(),
        name: &record.name,
        created_at: to_db_time(record.created_at),
    };
    db_run!(conn, |c| {
        diesel::insert_into(api_tokens::table)
            .values(&row)
            .execute(c)
            .await?
    });
    Ok(())
}

/// The live (not revoked) token whose hash is `token_hash`.
pub async fn find_active_by_hash(
    conn: &mut DbConn,
    token_hash: &str,
) -> Result<Option<TokenRecord>, StoreError> {
    let row: Option<TokenRow> = db_run!(conn, |c| {
        api_tokens::table
            .filter(api_tokens::token_hash.eq(token_hash))
            .filter(api_tokens::revoked_at.is_null())
            .select(TokenRow::as_select())
            .first(c)
            .await
            .optional()?
    });
    row.map(TokenRecord::try_from).transpose()
}

/// Every token, newest first.
pub async fn list(conn: &mut DbConn) -> Result<Vec<TokenRecord>, StoreError> {
    let rows: Vec<TokenRow> = db_run!(conn, |c| {
        api_tokens::table
            .order(api_tokens::created_at.desc())
            .select(TokenRow::as_select())
            .load(c)
            .await?
    });
    rows.into_iter().map(TokenRecord::try_from).collect()
}

/// Revokes a token; `NotFound` when no live token has that id.
pub async fn revoke(conn: &mut DbConn, id: TokenId, now: DateTime<Utc>) -> Result<(), StoreError> {
    let updated = db_run!(conn, |c| {
        diesel::update(
            api_tokens::table
                .filter(api_tokens::id.eq(id))
                .filter(api_tokens::revoked_at.is_null()),
        )
        .set(api_tokens::revoked_at.eq(Some(to_db_time(now))))
        .execute(c)
        .await?
    });
    if updated == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

/// A freshly created token: the secret (shown once) and its record.
pub struct CreatedToken {
    /// The bearer token. Only its hash is stored; it cannot be shown again.
    pub token: String,
    /// The stored record.
    pub record: TokenRecord,
}

/// Generates a random token, stores its hash and returns both.
pub async fn create(
    conn: &mut DbConn,
    role: Role,
    unit_id: Option<&UnitId>,
    patient_id: Option<&PatientId>,
    name: &str,
    now: DateTime<Utc>,
) -> Result<CreatedToken, StoreError> {
    let mut random = [0_u8; 32];
    getrandom::fill(&mut random)
        .map_err(|e| StoreError::Unavailable(format!("no randomness: {e}")))?;
    let token = crate::domain::auth::format_token(&random);
    let hash = crate::domain::auth::hash_token(&token);
    let record = TokenRecord {
        id: TokenId::new_v7(),
        role,
        unit_id: unit_id.cloned(),
        patient_id: patient_id.cloned(),
        name: name.to_owned(),
        // Stored with microsecond precision on both backends.
        created_at: now.trunc_subsecs(6),
        revoked_at: None,
    };
    insert(conn, &hash, &record).await?;
    Ok(CreatedToken { token, record })
}

/// Revokes the admin tokens older builds minted for their own use and could leave live when
/// they crashed: `node <id> (internal)` (a cluster node's calls to the others) and
/// `billing (internal)` (billing's calls to the insurance service). Nothing mints them any
/// more; run at every start, so whatever a crashed older process left is swept. Returns how
/// many were revoked.
pub async fn revoke_legacy_internal(
    conn: &mut DbConn,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let revoked = db_run!(conn, |c| {
        diesel::update(
            api_tokens::table
                .filter(api_tokens::revoked_at.is_null())
                .filter(api_tokens::role.eq(Role::Admin.as_str()))
                .filter(
                    api_tokens::name
                        .eq(LEGACY_BILLING)
                        .or(api_tokens::name.like(LEGACY_NODE)),
                ),
        )
        .set(api_tokens::revoked_at.eq(Some(to_db_time(now))))
        .execute(c)
        .await?
    });
    Ok(revoked)
}

/// The name older builds gave billing's own admin token.
const LEGACY_BILLING: &str = "billing (internal)";
/// The names older builds gave a cluster node's own admin token (a `LIKE` pattern).
const LEGACY_NODE: &str = "node % (internal)";
