//! Offers pushed to crews' phones: the platforms a push token may belong to and when a failed
//! push is tried again. Pure: no I/O, no clock reads.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The platform of a crew's push token, which decides the platform block of the message
/// (Android's priority and TTL always; APNs headers and an alert for `ios`; Web Push headers
/// for `web`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    /// An Android app.
    Android,
    /// An iOS app (through APNs).
    Ios,
    /// A web app (through Web Push).
    Web,
}

impl Platform {
    /// The stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Android => "android",
            Platform::Ios => "ios",
            Platform::Web => "web",
        }
    }

    /// The platform named `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "android" => Some(Platform::Android),
            "ios" => Some(Platform::Ios),
            "web" => Some(Platform::Web),
            _ => None,
        }
    }
}

/// The longest a push token may be (FCM's are about 160 characters; generous for others).
pub const MAX_TOKEN_LEN: usize = 4096;

/// The most push tokens one unit keeps; registering another drops the oldest (a crew's phones
/// are replaced, and nothing else ever removes a token FCM still accepts).
pub const MAX_TOKENS_PER_UNIT: usize = 16;

/// The first wait after a failed push; it doubles with each attempt.
pub const FIRST_RETRY: Duration = Duration::from_millis(500);
/// The longest wait between two tries of one push (a longer `Retry-After` is honoured up to
/// the offer's expiry, which ends the tries anyway).
pub const MAX_RETRY: Duration = Duration::from_secs(8);

/// How long to wait before trying a push again after `failures` failed tries (1 for the
/// first), honouring the provider's `Retry-After` when it gave one; `None` when the try would
/// come at or after `expires_at`, when the offer has lapsed and a push is pointless.
pub fn retry_wait(
    failures: u32,
    retry_after: Option<Duration>,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Option<Duration> {
    let doubled = FIRST_RETRY
        .checked_mul(
            1_u32
                .checked_shl(failures.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .unwrap_or(MAX_RETRY)
        .min(MAX_RETRY);
    let wait = retry_after.unwrap_or(doubled);
    let left = (expires_at - now).to_std().ok()?;
    (wait < left).then_some(wait)
}

/// Seconds from `now` until `expires_at`, at least 1 (FCM's `ttl`, APNs' and Web Push's
/// lifetimes): a message must not outlive the offer it carries.
pub fn seconds_left(now: DateTime<Utc>, expires_at: DateTime<Utc>) -> u64 {
    u64::try_from((expires_at - now).num_seconds())
        .unwrap_or(0)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
    }

    #[test]
    fn platforms_round_trip_and_unknown_ones_are_refused() {
        for p in [Platform::Android, Platform::Ios, Platform::Web] {
            assert_eq!(Platform::parse(p.as_str()), Some(p));
        }
        assert_eq!(Platform::parse("Android"), None);
        assert_eq!(Platform::parse(""), None);
    }

    #[test]
    fn retries_double_up_to_the_cap() {
        let waits: Vec<_> = (1..=7)
            .map(|n| retry_wait(n, None, at(0), at(600)).unwrap_or_default())
            .collect();
        assert_eq!(
            waits,
            [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0].map(Duration::from_secs_f64)
        );
        assert_eq!(retry_wait(u32::MAX, None, at(0), at(600)), Some(MAX_RETRY));
    }

    #[test]
    fn retry_after_is_honoured() {
        let asked = Some(Duration::from_secs(3));
        assert_eq!(
            retry_wait(1, asked, at(0), at(60)),
            Some(Duration::from_secs(3))
        );
        // A shorter Retry-After than the back-off is still what the provider asked for.
        let asked = Some(Duration::from_millis(100));
        assert_eq!(
            retry_wait(4, asked, at(0), at(60)),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn never_past_the_offers_expiry() {
        assert_eq!(
            retry_wait(1, Some(Duration::from_secs(30)), at(0), at(30)),
            None
        );
        assert_eq!(retry_wait(1, None, at(0), at(0)), None);
        assert_eq!(retry_wait(1, None, at(10), at(0)), None);
        assert!(retry_wait(1, Some(Duration::from_secs(29)), at(0), at(30)).is_some());
    }

    #[test]
    fn a_message_lives_as_long_as_its_offer() {
        assert_eq!(seconds_left(at(0), at(45)), 45);
        assert_eq!(seconds_left(at(0), at(0)), 1);
        assert_eq!(seconds_left(at(50), at(0)), 1);
    }
}
