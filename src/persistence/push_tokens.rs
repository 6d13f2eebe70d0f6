//! Crews' push tokens (`push_tokens`): the phones an offer is pushed to when no crew
//! WebSocket of the unit is open. A token belongs to one unit; registered for another, it
//! moves there.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::push_tokens;
use super::{DbConn, StoreError, from_db_time, to_db_time};
use crate::db_run;
use crate::domain::ids::UnitId;
use crate::domain::push::Platform;

/// One stored token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushToken {
    /// The provider's registration token.
    pub token: String,
    /// The unit whose crew's phone it is.
    pub unit_id: UnitId,
    /// Its platform.
    pub platform: Platform,
    /// When it was registered (last).
    pub created_at: DateTime<Utc>,
}

#[derive(Queryable)]
struct Row {
    token: String,
    unit_id: String,
    platform: String,
    created_at: chrono::NaiveDateTime,
}

impl Row {
    fn into_token(self) -> Option<PushToken> {
        Some(PushToken {
            platform: Platform::parse(&self.platform)?,
            token: self.token,
            unit_id: UnitId(self.unit_id),
            created_at: from_db_time(self.created_at),
        })
    }
}

/// Registers `token` for `unit` (moving it from any other unit, refreshing its platform and
/// time), then drops the unit's oldest tokens beyond `keep`.
pub async fn register(
    conn: &mut DbConn,
    unit: &UnitId,
    token: &str,
    platform: Platform,
    now: DateTime<Utc>,
    keep: usize,
) -> Result<(), StoreError> {
    let at = to_db_time(now);
    let unit_id = unit.as_str();
    db_run!(conn, |c| {
        diesel::insert_into(push_tokens::table)
            .values((
                push_tokens::token.eq(token),
                push_tokens::unit_id.eq(unit_id),
                push_tokens::platform.eq(platform.as_str()),
                push_tokens::created_at.eq(at),
            ))
            .on_conflict(push_tokens::token)
            .do_update()
            .set((
                push_tokens::unit_id.eq(unit_id),
                push_tokens::platform.eq(platform.as_str()),
                push_tokens::created_at.eq(at),
            ))
            .execute(c)
            .await?
    });
    let extra: Vec<String> = db_run!(conn, |c| {
        push_tokens::table
            .filter(push_tokens::unit_id.eq(unit_id))
            .order((push_tokens::created_at.desc(), push_tokens::token.desc()))
            .offset(i64::try_from(keep).unwrap_or(i64::MAX))
            .select(push_tokens::token)
            .load(c)
            .await?
    });
    if !extra.is_empty() {
        db_run!(conn, |c| {
            diesel::delete(push_tokens::table.filter(push_tokens::token.eq_any(&extra)))
                .execute(c)
                .await?
        });
    }
    Ok(())
}

/// Removes `token` of `unit`; whether it was there.
pub async fn remove(conn: &mut DbConn, unit: &UnitId, token: &str) -> Result<bool, StoreError> {
    let unit_id = unit.as_str();
    let n = db_run!(conn, |c| {
        diesel::delete(
            push_tokens::table
                .filter(push_tokens::token.eq(token))
                .filter(push_tokens::unit_id.eq(unit_id)),
        )
        .execute(c)
        .await?
    });
    Ok(n > 0)
}

/// Removes `token` whichever unit holds it (the provider said it is no longer registered).
pub async fn forget(conn: &mut DbConn, token: &str) -> Result<bool, StoreError> {
    let n = db_run!(conn, |c| {
        diesel::delete(push_tokens::table.filter(push_tokens::token.eq(token)))
            .execute(c)
            .await?
    });
    Ok(n > 0)
}

/// The tokens of `unit`, newest first.
pub async fn for_unit(conn: &mut DbConn, unit: &UnitId) -> Result<Vec<PushToken>, StoreError> {
    let unit_id = unit.as_str();
    let rows: Vec<Row> = db_run!(conn, |c| {
        push_tokens::table
            .filter(push_tokens::unit_id.eq(unit_id))
            .order((push_tokens::created_at.desc(), push_tokens::token.desc()))
            .select((
                push_tokens::token,
                push_tokens::unit_id,
                push_tokens::platform,
                push_tokens::created_at,
            ))
            .load(c)
            .await?
    });
    Ok(rows.into_iter().filter_map(Row::into_token).collect())
}
