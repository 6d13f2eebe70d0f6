//! The outbound relays' stored cursors (`bus_cursors`): the last event sequence a relay has
//! delivered. A cursor only ever moves forwards; a relay reads it at start and after every
//! reconnection, and carries on after it.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::bus_cursors;
use super::{DbConn, StoreError, to_db_time};
use crate::db_run;

/// The cursor called `name`: the last sequence delivered, 0 when the relay never delivered
/// anything (it then starts at the first event).
pub async fn read(conn: &mut DbConn, name: &str) -> Result<i64, StoreError> {
    let seq: Option<i64> = db_run!(conn, |c| {
        bus_cursors::table
            .find(name)
            .select(bus_cursors::seq)
            .first(c)
            .await
            .optional()?
    });
    Ok(seq.unwrap_or(0))
}

/// Moves the cursor called `name` forwards to `seq` (created at `seq` when missing); a `seq`
/// at or behind the stored one changes nothing. Whether it moved.
pub async fn advance(
    conn: &mut DbConn,
    name: &str,
    seq: i64,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let at = to_db_time(now);
    let moved = db_run!(conn, |c| {
        diesel::update(
            bus_cursors::table
                .filter(bus_cursors::name.eq(name))
                .filter(bus_cursors::seq.lt(seq)),
        )
        .set((bus_cursors::seq.eq(seq), bus_cursors::updated_at.eq(at)))
        .execute(c)
        .await?
    });
    if moved > 0 {
        return Ok(true);
    }
    // No row ahead of `seq` was updated: either it is already there or further (nothing to
    // do), or there is no row yet.
    let created = db_run!(conn, |c| {
        diesel::insert_into(bus_cursors::table)
            .values((
                bus_cursors::name.eq(name),
                bus_cursors::seq.eq(seq),
                bus_cursors::updated_at.eq(at),
            ))
            .on_conflict_do_nothing()
            .execute(c)
            .await?
    });
    Ok(created > 0)
}
