//! Cluster membership and shard leases (PostgreSQL only; see `docs/architecture.md`,
//! "Running as a cluster").
//!
//! Every time here is the database's clock (`clock_timestamp()`), so nodes with skewed clocks
//! still agree on who holds a lease. The fencing itself is in the database: a connection opened
//! for a shard's owner carries `shers.fence = '<shard>@<epoch>'` ([`fenced_url`]) and the
//! `shers_fence` trigger on every table refuses its writes once the lease moved on.

use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use diesel_async::RunQueryDsl;

use super::{DbConn, StoreError};
use crate::db_run;

pub use crate::domain::shards::{DISPATCH_SHARD, Epoch, Shard};

/// The prefix of `application_name` on fenced connections, so a new owner can find and end the
/// old owner's sessions.
const FENCED_APP: &str = "shers-fence:";

/// The join condition of a lease (`l`) and the member (`n`) serving it: the incarnation that
/// took the lease is still the one running under its node id. (A lease with no incarnation
/// recorded was taken by an older build, which did not record one.)
const HOLDING_INCARNATION: &str = "(l.holder_instance IS NULL OR n.instance = l.holder_instance)";

/// A lease this node just took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    /// The new fencing epoch.
    pub epoch: Epoch,
    /// The previous holder, if any.
    pub from: Option<String>,
    /// `first`, `released` or `expired`.
    pub reason: &'static str,
}

/// Who holds a shard now: a node's incarnation (the process that took the lease), never
/// merely its id, so a node restarted under its id is not sent what its previous process held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The holder's node id.
    pub node_id: String,
    /// The holder's incarnation (the process, fresh at every start).
    pub instance: String,
    /// Its internal base URL.
    pub address: String,
    /// The lease's epoch.
    pub epoch: Epoch,
}

/// A member as listed by `/admin/cluster`.
#[derive(Debug, Clone, serde::Serialize, diesel::QueryableByName)]
pub struct NodeRow {
    /// Node id.
    #[diesel(sql_type = Text)]
    pub node_id: String,
    /// The incarnation now running under this id (the process, fresh at every start).
    #[diesel(sql_type = Text)]
    pub instance: String,
    /// Internal base URL.
    #[diesel(sql_type = Text)]
    pub address: String,
    /// Build version.
    #[diesel(sql_type = Text)]
    pub version: String,
    /// When it joined.
    #[diesel(sql_type = Timestamptz)]
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    #[diesel(sql_type = Timestamptz)]
    pub heartbeat_at: DateTime<Utc>,
    /// When it left gracefully, if it did.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub left_at: Option<DateTime<Utc>>,
}

/// A shard lease as listed by `/admin/cluster`.
#[derive(Debug, Clone, serde::Serialize, diesel::QueryableByName)]
pub struct LeaseRow {
    /// Shard name.
    #[diesel(sql_type = Text)]
    pub shard: String,
    /// Holder (also kept after a release or expiry, for the record).
    #[diesel(sql_type = Nullable<Text>)]
    pub holder: Option<String>,
    /// The holder's incarnation (the process that took it).
    #[diesel(sql_type = Nullable<Text>)]
    pub holder_instance: Option<String>,
    /// Fencing epoch.
    #[diesel(sql_type = BigInt)]
    pub epoch: i64,
    /// When the lease runs out unless renewed.
    #[diesel(sql_type = Timestamptz)]
    pub expires_at: DateTime<Utc>,
    /// When the holder took it.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub acquired_at: Option<DateTime<Utc>>,
    /// When the holder gave it up, if it did.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub released_at: Option<DateTime<Utc>>,
    /// Whether it is held right now (not released, not expired).
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub live: bool,
}

/// A change of shard holder.
#[derive(Debug, Clone, serde::Serialize, diesel::QueryableByName)]
pub struct HandoverRow {
    /// Shard name.
    #[diesel(sql_type = Text)]
    pub shard: String,
    /// Previous holder.
    #[diesel(sql_type = Nullable<Text>)]
    pub from_node: Option<String>,
    /// New holder.
    #[diesel(sql_type = Text)]
    pub to_node: String,
    /// The new epoch.
    #[diesel(sql_type = BigInt)]
    pub epoch: i64,
    /// `first`, `released` or `expired`.
    #[diesel(sql_type = Text)]
    pub reason: String,
    /// When.
    #[diesel(sql_type = Timestamptz)]
    pub at: DateTime<Utc>,
}

#[derive(diesel::QueryableByName)]
struct Previous {
    #[diesel(sql_type = Nullable<Text>)]
    holder: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    released: bool,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    free: bool,
}

#[derive(diesel::QueryableByName)]
struct EpochRow {
    #[diesel(sql_type = BigInt)]
    epoch: i64,
}

fn postgres_only() -> StoreError {
    StoreError::Unavailable("running as a cluster needs PostgreSQL".into())
}

/// A node's incarnation as it joins: who it is and how the other nodes know its calls.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// The node id (configured, so the same across restarts).
    pub node_id: &'a str,
    /// This process's incarnation id.
    pub instance: &'a str,
    /// Its internal base URL.
    pub address: &'a str,
    /// Build version.
    pub version: &'a str,
    /// The SHA-256 hex of the credential it presents to the other nodes.
    pub credential_hash: &'a str,
}

/// Records this incarnation as the member under its node id (again, after a restart under the
/// same id: the previous incarnation's address and credential are replaced, and the leases it
/// still holds are nobody's to route to until they expire).
pub async fn join(conn: &mut DbConn, member: Member<'_>) -> Result<(), StoreError> {
    let q = diesel::sql_query(
        "INSERT INTO cluster_nodes \
           (node_id, instance, address, version, credential_hash, started_at, heartbeat_at) \
         VALUES ($1, $2, $3, $4, $5, clock_timestamp(), clock_timestamp()) \
         ON CONFLICT (node_id) DO UPDATE SET instance = EXCLUDED.instance, \
           address = EXCLUDED.address, version = EXCLUDED.version, \
           credential_hash = EXCLUDED.credential_hash, started_at = EXCLUDED.started_at, \
           heartbeat_at = EXCLUDED.heartbeat_at, left_at = NULL",
    )
    .bind::<Text, _>(member.node_id)
    .bind::<Text, _>(member.instance)
    .bind::<Text, _>(member.address)
    .bind::<Text, _>(member.version)
    .bind::<Text, _>(member.credential_hash);
    db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
        q.execute(c).await?;
        Ok(())
    })
}

/// Refreshes this incarnation's heartbeat (a former incarnation under the same id, paused
/// and woken, refreshes nothing).
pub async fn heartbeat(conn: &mut DbConn, node_id: &str, instance: &str) -> Result<(), StoreError> {
    let q = diesel::sql_query(
        "UPDATE cluster_nodes SET heartbeat_at = clock_timestamp(), left_at = NULL \
         WHERE node_id = $1 AND instance = $2",
    )
    .bind::<Text, _>(node_id)
    .bind::<Text, _>(instance);
    db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
        q.execute(c).await?;
        Ok(())
    })
}

/// Marks this incarnation as gone (graceful stop); its credential stops working at once.
pub async fn leave(conn: &mut DbConn, node_id: &str, instance: &str) -> Result<(), StoreError> {
    let q = diesel::sql_query(
        "UPDATE cluster_nodes SET left_at = clock_timestamp() \
         WHERE node_id = $1 AND instance = $2",
    )
    .bind::<Text, _>(node_id)
    .bind::<Text, _>(instance);
    db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
        q.execute(c).await?;
        Ok(())
    })
}

/// Takes `shard` for incarnation `instance` of `node_id` if nobody holds it (never held,
/// released or expired), bumping its epoch and recording the handover, all in one
/// transaction. `None` when it is held.
pub async fn try_acquire(
    conn: &mut DbConn,
    shard: Shard,
    node_id: &str,
    instance: &str,
    lease_ms: i64,
) -> Result<Option<Acquired>, StoreError> {
    let shard = shard.to_string();
    let node_id = node_id.to_owned();
    let instance = instance.to_owned();
    conn.write_transaction(async |conn| {
        let ensure = diesel::sql_query(
            "INSERT INTO shard_leases (shard, holder, epoch, expires_at) \
             VALUES ($1, NULL, 0, '-infinity') ON CONFLICT (shard) DO NOTHING",
        )
        .bind::<Text, _>(&shard);
        let prev_q = diesel::sql_query(
            "SELECT holder, released_at IS NOT NULL AS released, \
               (holder IS NULL OR released_at IS NOT NULL OR expires_at <= clock_timestamp()) AS free \
             FROM shard_leases WHERE shard = $1 FOR UPDATE",
        )
        .bind::<Text, _>(&shard);
        let take = diesel::sql_query(
            "UPDATE shard_leases SET holder = $2, holder_instance = $4, epoch = epoch + 1, \
               expires_at = clock_timestamp() + $3 * interval '1 millisecond', \
               acquired_at = clock_timestamp(), released_at = NULL \
             WHERE shard = $1 RETURNING epoch",
        )
        .bind::<Text, _>(&shard)
        .bind::<Text, _>(&node_id)
        .bind::<BigInt, _>(lease_ms)
        .bind::<Text, _>(&instance);
        let (prev, epoch): (Previous, Option<i64>) =
            db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
                ensure.execute(c).await?;
                let prev: Previous = prev_q.get_result(c).await?;
                if !prev.free {
                    return Ok(None);
                }
                let e: EpochRow = take.get_result(c).await?;
                Ok::<_, StoreError>((prev, Some(e.epoch)))
            })?;
        let Some(epoch) = epoch else {
            return Ok(None);
        };
        let reason = match (&prev.holder, prev.released) {
            (None, _) => "first",
            (Some(_), true) => "released",
            (Some(_), false) => "expired",
        };
        let record = diesel::sql_query(
            "INSERT INTO shard_handovers (shard, from_node, to_node, epoch, reason, at) \
             VALUES ($1, $2, $3, $4, $5, clock_timestamp())",
        )
        .bind::<Text, _>(&shard)
        .bind::<Nullable<Text>, _>(prev.holder.as_deref())
        .bind::<Text, _>(&node_id)
        .bind::<BigInt, _>(epoch)
        .bind::<Text, _>(reason);
        db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
            record.execute(c).await?;
            Ok::<_, StoreError>(())
        })?;
        Ok(Some(Acquired {
            epoch: Epoch(epoch),
            from: prev.holder,
            reason,
        }))
    })
    .await
}

/// Extends the lease `node_id` holds at `epoch`; `false` when it no longer holds it (taken over
/// or released), whatever the expiry.
pub async fn renew(
    conn: &mut DbConn,
    shard: Shard,
    node_id: &str,
    epoch: Epoch,
    lease_ms: i64,
) -> Result<bool, StoreError> {
    let q = diesel::sql_query(
        "UPDATE shard_leases SET expires_at = clock_timestamp() + $4 * interval '1 millisecond' \
         WHERE shard = $1 AND holder = $2 AND epoch = $3 AND released_at IS NULL",
    )
    .bind::<Text, _>(shard.to_string())
    .bind::<Text, _>(node_id)
    .bind::<BigInt, _>(epoch.0)
    .bind::<BigInt, _>(lease_ms);
    db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
        Ok(q.execute(c).await? == 1)
    })
}

/// Gives the lease up at once (graceful stop), so another node takes it without waiting for
/// expiry. From here on the fence refuses writes made at `epoch`.
pub async fn release(
    conn: &mut DbConn,
    shard: Shard,
    node_id: &str,
    epoch: Epoch,
) -> Result<bool, StoreError> {
    let q = diesel::sql_query(
        "UPDATE shard_leases SET released_at = clock_timestamp(), expires_at = clock_timestamp() \
         WHERE shard = $1 AND holder = $2 AND epoch = $3 AND released_at IS NULL",
    )
    .bind::<Text, _>(shard.to_string())
    .bind::<Text, _>(node_id)
    .bind::<BigInt, _>(epoch.0);
    db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
        Ok(q.execute(c).await? == 1)
    })
}

/// Ends every database session opened for `shard` at an epoch other than `epoch`: their open
/// transactions roll back, so nothing the previous holder started commits after the new owner
/// began recovering. Returns how many sessions were ended.
pub async fn end_stale_sessions(
    conn: &mut DbConn,
    shard: Shard,
    epoch: Epoch,
) -> Result<usize, StoreError> {
    let q = diesel::sql_query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name LIKE $1 \
           AND application_name <> $2",
    )
    .bind::<Text, _>(format!("{FENCED_APP}{shard}@%"))
    .bind::<Text, _>(application_name(shard, epoch));
    db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
        Ok(q.execute(c).await?)
    })
}

/// Confirms, just before a call the outside world sees (an SMS, a charge), that the shard lease
/// this connection is fenced at is still held: an error once it moved on, so a former holder
/// that was paused and woke up acts no more than it writes. A statement-level trigger fires
/// even when no row matches, so this is the fence check alone. Nothing to check on an
/// unfenced connection (a single node) or on SQLite.
pub async fn confirm_lease(conn: &mut DbConn) -> Result<(), StoreError> {
    let q = diesel::sql_query("UPDATE notifications SET id = id WHERE false");
    db_run!(conn, |_c| { Ok(()) } else |c| {
        q.execute(c).await?;
        Ok(())
    })
}

/// The live holder of `shard` and where to reach it, if any: only while the incarnation that
/// took the lease is still the member under its node id.
pub async fn owner(conn: &mut DbConn, shard: Shard) -> Result<Option<Owner>, StoreError> {
    let q = diesel::sql_query(format!(
        "SELECT l.holder AS node_id, n.instance, n.address, l.epoch FROM shard_leases l \
         JOIN cluster_nodes n ON n.node_id = l.holder AND {HOLDING_INCARNATION} \
         WHERE l.shard = $1 AND l.released_at IS NULL AND l.expires_at > clock_timestamp()"
    ))
    .bind::<Text, _>(shard.to_string());
    db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
        use diesel::OptionalExtension as _;
        Ok(q.get_result::<OwnerRow>(c).await.optional()?.map(OwnerRow::into_owner))
    })
}

#[derive(diesel::QueryableByName)]
struct OwnerRow {
    #[diesel(sql_type = Text)]
    node_id: String,
    #[diesel(sql_type = Text)]
    instance: String,
    #[diesel(sql_type = Text)]
    address: String,
    #[diesel(sql_type = BigInt)]
    epoch: i64,
}

impl OwnerRow {
    fn into_owner(self) -> Owner {
        Owner {
            node_id: self.node_id,
            instance: self.instance,
            address: self.address,
            epoch: Epoch(self.epoch),
        }
    }
}

/// A live lease and where its holder is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The shard.
    pub shard: Shard,
    /// Its holder and epoch.
    pub owner: Owner,
}

#[derive(diesel::QueryableByName)]
struct HeldRow {
    #[diesel(sql_type = Text)]
    shard: String,
    #[diesel(embed)]
    owner: OwnerRow,
}

/// Every live lease (not released, not expired) whose holding incarnation is still the member
/// under its node id, with its address. A lease taken by a former incarnation (the node was
/// restarted under its id before the lease ran out) is left out: nobody serves it.
pub async fn owners(conn: &mut DbConn) -> Result<Vec<Held>, StoreError> {
    let q = diesel::sql_query(format!(
        "SELECT l.shard, l.holder AS node_id, n.instance, n.address, l.epoch \
         FROM shard_leases l \
         JOIN cluster_nodes n ON n.node_id = l.holder AND {HOLDING_INCARNATION} \
         WHERE l.released_at IS NULL AND l.expires_at > clock_timestamp()"
    ));
    db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
        let rows: Vec<HeldRow> = q.load(c).await?;
        // A lease of a shard this build does not know (a newer build's) is not ours to serve.
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                Some(Held {
                    shard: r.shard.parse().ok()?,
                    owner: r.owner.into_owner(),
                })
            })
            .collect())
    })
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// How many members are live: not left, and heard from within `within_ms`.
pub async fn live_nodes(conn: &mut DbConn, within_ms: i64) -> Result<u32, StoreError> {
    let q = diesel::sql_query(
        "SELECT count(*) AS n FROM cluster_nodes WHERE left_at IS NULL \
           AND heartbeat_at > clock_timestamp() - $1 * interval '1 millisecond'",
    )
    .bind::<BigInt, _>(within_ms);
    db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
        let count: Count = q.get_result(c).await?;
        Ok(u32::try_from(count.n).unwrap_or(u32::MAX))
    })
}

#[derive(diesel::QueryableByName)]
struct MemberId {
    #[diesel(sql_type = Text)]
    node_id: String,
}

/// The node whose current incarnation presents the credential hashed `credential_hash`, if it
/// is live: not left, and heard from within `within_ms`. A former incarnation's credential
/// (replaced when the node restarted under its id) matches nothing.
pub async fn member_by_credential(
    conn: &mut DbConn,
    credential_hash: &str,
    within_ms: i64,
) -> Result<Option<String>, StoreError> {
    let q = diesel::sql_query(
        "SELECT node_id FROM cluster_nodes WHERE credential_hash = $1 AND left_at IS NULL \
           AND heartbeat_at > clock_timestamp() - $2 * interval '1 millisecond'",
    )
    .bind::<Text, _>(credential_hash)
    .bind::<BigInt, _>(within_ms);
    db_run!(conn, |_c| { Ok(None) } else |c| {
        use diesel::OptionalExtension as _;
        Ok(q.get_result::<MemberId>(c).await.optional()?.map(|m| m.node_id))
    })
}

/// Members (heard from in the last `recent_s` seconds, or still not marked as left), leases
/// and the last `handovers` handovers, for `/admin/cluster`.
pub async fn overview(
    conn: &mut DbConn,
    handovers: i64,
) -> Result<(Vec<NodeRow>, Vec<LeaseRow>, Vec<HandoverRow>), StoreError> {
    let nodes = diesel::sql_query(
        "SELECT node_id, instance, address, version, started_at, heartbeat_at, left_at \
         FROM cluster_nodes \
         WHERE left_at IS NULL OR left_at > clock_timestamp() - interval '1 hour' \
         ORDER BY node_id",
    );
    let leases = diesel::sql_query(
        "SELECT shard, holder, holder_instance, epoch, expires_at, acquired_at, released_at, \
           (holder IS NOT NULL AND released_at IS NULL AND expires_at > clock_timestamp()) AS live \
         FROM shard_leases ORDER BY shard",
    );
    let recent = diesel::sql_query(
        "SELECT shard, from_node, to_node, epoch, reason, at FROM shard_handovers \
         ORDER BY id DESC LIMIT $1",
    )
    .bind::<BigInt, _>(handovers);
    db_run!(conn, |_c| { Err(postgres_only()) } else |c| {
        Ok((nodes.load(c).await?, leases.load(c).await?, recent.load(c).await?))
    })
}

/// The `application_name` of connections fenced at `shard@epoch`.
fn application_name(shard: Shard, epoch: Epoch) -> String {
    format!("{FENCED_APP}{shard}@{epoch}")
}

/// `url` with the startup options that fence every connection opened from it at
/// `shard@epoch` (and name it, so [`end_stale_sessions`] finds it).
pub fn fenced_url(url: &str, shard: Shard, epoch: Epoch) -> String {
    let options = format!("-c shers.fence={shard}@{epoch}");
    let sep = if url.contains('?') { '&' } else { '?' };
    format!(
        "{url}{sep}application_name={}&options={}",
        percent_encode(&application_name(shard, epoch)),
        percent_encode(&options)
    )
}

/// `s` percent-encoded for a URL query value or path segment (unreserved characters kept).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_urls_carry_the_fence_as_a_startup_option() {
        assert_eq!(
            fenced_url("postgres://u@h/db", Shard::Dispatch, Epoch(7)),
            "postgres://u@h/db?application_name=shers-fence%3Adispatch%2Fdefault%407\
             &options=-c%20shers.fence%3Ddispatch%2Fdefault%407"
        );
        assert!(
            fenced_url(
                "postgres://u@h/db?sslmode=disable",
                Shard::Devices(3),
                Epoch(1)
            )
            .contains("disable&application_name=")
        );
    }
}
