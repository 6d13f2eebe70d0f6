//! Which shard an entity belongs to when SHERS runs as a cluster (see `docs/architecture.md`,
//! "Running as a cluster"). Pure and stable: every node, whatever its build or process,
//! computes the same shard for the same id.
//!
//! Inside the process a shard is a [`Shard`] and a lease's fencing epoch an [`Epoch`]; they
//! leave it as today's text and number (`dispatch/default`, `devices/<n>`; the epoch a plain
//! integer) in lease rows, `/admin/cluster`, fenced connections and metric labels.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ids::DeviceId;

/// The name of the shard that owns a region's dispatch (one region for now).
pub const DISPATCH_SHARD: &str = "dispatch/default";

/// The prefix of the wearables' shard names (`devices/0` … `devices/<n-1>`).
pub const DEVICE_SHARD_PREFIX: &str = "devices/";

/// The most device shards a cluster may be configured with.
pub const MAX_DEVICE_SHARDS: u16 = 1024;

/// A unit of ownership in a cluster: held by one node at a time, under a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shard {
    /// The region's dispatch: incidents, units, billing (one region for now). Ordered first,
    /// so it is renewed before any device shard.
    Dispatch,
    /// Device shard `n`: the wearables whose [`device_shard`] is `n`.
    Devices(u16),
}

impl Shard {
    /// Whether this is the dispatch shard.
    pub fn is_dispatch(self) -> bool {
        self == Shard::Dispatch
    }

    /// The metric label of its kind: `dispatch/default` or `devices` (one series for all the
    /// device shards).
    pub fn kind(self) -> &'static str {
        match self {
            Shard::Dispatch => DISPATCH_SHARD,
            Shard::Devices(_) => "devices",
        }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shard::Dispatch => f.write_str(DISPATCH_SHARD),
            Shard::Devices(n) => write!(f, "{DEVICE_SHARD_PREFIX}{n}"),
        }
    }
}

/// A text that names no shard.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownShard;

impl fmt::Display for UnknownShard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a shard name (dispatch/default or devices/<n>)")
    }
}

impl FromStr for Shard {
    type Err = UnknownShard;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name == DISPATCH_SHARD {
            return Ok(Shard::Dispatch);
        }
        let index = name.strip_prefix(DEVICE_SHARD_PREFIX).ok_or(UnknownShard)?;
        // Digits only: `+7` or ` 7` would name the same shard twice.
        if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
            return Err(UnknownShard);
        }
        index.parse().map(Shard::Devices).map_err(|_| UnknownShard)
    }
}

impl Serialize for Shard {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Shard {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// A lease's fencing epoch: it grows with every takeover of its shard, and a write fenced at
/// an older one is refused.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub i64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The device shard of `device` among `shards` (at least 1): FNV-1a over the id's bytes, so
/// it never depends on a process's random hashing seed.
pub fn device_shard(device: &DeviceId, shards: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in device.as_str().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    u16::try_from(hash % u64::from(shards.max(1))).unwrap_or(0)
}

/// How many device shards a node should hold when `live_nodes` share `shards`: the ceiling
/// of the even share, so the shards are always covered.
pub fn fair_share(shards: u16, live_nodes: u32) -> usize {
    usize::from(shards).div_ceil(usize::try_from(live_nodes.max(1)).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_always_lands_on_the_same_shard() {
        let id = DeviceId::from("wearable-42");
        assert_eq!(device_shard(&id, 16), device_shard(&id, 16));
        // Pinned: a change here moves every wearable of a running cluster.
        assert_eq!(
            u64::from(device_shard(&DeviceId::from(""), 16)),
            0xcbf2_9ce4_8422_2325_u64 % 16
        );
        assert_eq!(device_shard(&id, 1), 0);
        assert_eq!(device_shard(&id, 0), 0);
    }

    #[test]
    fn devices_spread_over_every_shard() {
        let mut counts = [0_u32; 16];
        for i in 0..16_000 {
            let id = DeviceId::from(format!("dev-{i}").as_str());
            counts[usize::from(device_shard(&id, 16))] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn shard_names_round_trip() {
        assert_eq!(Shard::Devices(7).to_string(), "devices/7");
        assert_eq!(Shard::Dispatch.to_string(), DISPATCH_SHARD);
        assert_eq!("devices/7".parse(), Ok(Shard::Devices(7)));
        assert_eq!(DISPATCH_SHARD.parse(), Ok(Shard::Dispatch));
        for bad in [
            "devices/x",
            "devices/",
            "devices/+7",
            "devices/70000",
            "dispatch",
            "",
        ] {
            assert_eq!(bad.parse::<Shard>(), Err(UnknownShard), "{bad}");
        }
        let json = serde_json::to_string(&Shard::Devices(3)).unwrap_or_default();
        assert_eq!(json, r#""devices/3""#);
        assert_eq!(
            serde_json::from_str::<Shard>(&json).ok(),
            Some(Shard::Devices(3))
        );
        assert_eq!(serde_json::to_string(&Epoch(12)).unwrap_or_default(), "12");
        assert!(
            Shard::Dispatch < Shard::Devices(0),
            "dispatch is renewed first"
        );
    }

    #[test]
    fn fair_shares_cover_every_shard() {
        assert_eq!(fair_share(16, 3), 6);
        assert_eq!(fair_share(16, 1), 16);
        assert_eq!(fair_share(16, 0), 16);
        assert_eq!(fair_share(2, 3), 1);
        for nodes in 1..10 {
            assert!(fair_share(16, nodes) * nodes as usize >= 16);
        }
    }
}
