//! Which shard an entity belongs to when SHERS runs as a cluster (see `docs/architecture.md`,
//! "Running as a cluster"). Pure and stable: every node, whatever its build or process,
//! computes the same shard for the same id.

use super::ids::DeviceId;

/// The shard that owns a region's dispatch (one region for now).
pub const DISPATCH_SHARD: &str = "dispatch/default";

/// The prefix of the wearables' shard names (`devices/0` … `devices/<n-1>`).
pub const DEVICE_SHARD_PREFIX: &str = "devices/";

/// The most device shards a cluster may be configured with.
pub const MAX_DEVICE_SHARDS: u32 = 1024;

/// The device shard of `device` among `shards` (at least 1): FNV-1a over the id's bytes, so
/// it never depends on a process's random hashing seed.
pub fn device_shard(device: &DeviceId, shards: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in device.as_str().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    u32::try_from(hash % u64::from(shards.max(1))).unwrap_or(0)
}

/// The name of device shard `index` (`devices/<index>`).
pub fn device_shard_name(index: u32) -> String {
    format!("{DEVICE_SHARD_PREFIX}{index}")
}

/// The index of a device shard's name; `None` for any other shard.
pub fn parse_device_shard(name: &str) -> Option<u32> {
    name.strip_prefix(DEVICE_SHARD_PREFIX)?.parse().ok()
}

/// How many device shards a node should hold when `live_nodes` share `shards`: the ceiling
/// of the even share, so the shards are always covered.
pub fn fair_share(shards: u32, live_nodes: u32) -> u32 {
    shards.div_ceil(live_nodes.max(1))
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
            counts[device_shard(&id, 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn shard_names_round_trip() {
        assert_eq!(device_shard_name(7), "devices/7");
        assert_eq!(parse_device_shard("devices/7"), Some(7));
        assert_eq!(parse_device_shard(DISPATCH_SHARD), None);
        assert_eq!(parse_device_shard("devices/x"), None);
    }

    #[test]
    fn fair_shares_cover_every_shard() {
        assert_eq!(fair_share(16, 3), 6);
        assert_eq!(fair_share(16, 1), 16);
        assert_eq!(fair_share(16, 0), 16);
        assert_eq!(fair_share(2, 3), 1);
        for nodes in 1..10 {
            assert!(fair_share(16, nodes) * nodes >= 16);
        }
    }
}
