//! Every Redis key quotad uses, built in one place (the layout is in the `store` module's docs).
//!
//! All of a user's keys live in one bucket, `crc16(user) % 1024`, written as a Redis Cluster hash
//! tag. [`UserKeys`] computes it once per request, however many of the user's keys the request
//! sends (a keyed consume sends five).

use uuid::Uuid;

use super::{BUCKETS, SCHEMA};
use crate::period::Period;

/// The bucket of `user`: `crc16(user) % 1024`.
pub fn bucket(user: &Uuid) -> u16 {
    let mut buf = Uuid::encode_buffer();
    crc16(user.hyphenated().encode_lower(&mut buf).as_bytes()) % BUCKETS
}

/// The dirty set of `bucket`.
pub fn dirty_of(prefix: &str, bucket: u16) -> String {
    format!("{prefix}:{SCHEMA}:{{{bucket}}}:dirty")
}

/// A counter hash, for a caller that already knows the user's bucket (the flusher reads it off
/// the dirty set it found the counter in).
pub fn counter_in(prefix: &str, bucket: u16, user: &Uuid, period: Period) -> String {
    format!("{prefix}:{SCHEMA}:{{{bucket}}}:c:{user}:{}", period.id())
}

/// The dirty-set member of a counter: `<user>:<period>`.
pub fn member(user: &Uuid, period: Period) -> String {
    format!("{user}:{}", period.id())
}

/// `<user>:<period>` → its parts; `None` for a member quotad did not write.
pub fn parse_member(member: &str) -> Option<(Uuid, Period)> {
    let (user, period) = member.split_once(':')?;
    Some((Uuid::parse_str(user).ok()?, Period::parse_id(period)?))
}

/// A `SCAN` pattern matching every counter hash of `period`, in every bucket.
pub fn counters_pattern(prefix: &str, period: Period) -> String {
    format!("{prefix}:{SCHEMA}:{{*}}:c:*:{}", period.id())
}

/// The user of a counter key `<prefix>:1:{b}:c:<user>:<period>`.
pub fn user_of_counter(key: &str) -> Option<Uuid> {
    let rest = &key[key.find("}:c:")? + 4..];
    Uuid::parse_str(rest.rsplit_once(':')?.0).ok()
}

/// The pub/sub channel on which scripts announce users whose counts went down or whose plan
/// changed (see [`crate::refusals`]).
pub fn changes_channel(prefix: &str) -> String {
    format!("{prefix}:{SCHEMA}:changes")
}

/// The keys of one user, from one bucket computation.
#[derive(Debug, Clone)]
pub struct UserKeys {
    user: Uuid,
    /// `<prefix>:1:{<bucket>}`, which every key of the user starts with.
    base: String,
}

impl UserKeys {
    /// The keys of `user` under `prefix`.
    pub fn new(prefix: &str, user: Uuid) -> UserKeys {
        UserKeys {
            user,
            base: format!("{prefix}:{SCHEMA}:{{{}}}", bucket(&user)),
        }
    }

    /// The user.
    pub fn user(&self) -> Uuid {
        self.user
    }

    /// The counter hash of `period`.
    pub fn counter(&self, period: Period) -> String {
        format!("{}:c:{}:{}", self.base, self.user, period.id())
    }

    /// The dirty set of the user's bucket.
    pub fn dirty(&self) -> String {
        format!("{}:dirty", self.base)
    }

    /// The marker of the user's bucket: the time (ms) since which the bucket has held its data
    /// without a gap (see `start_fresh` in `lua/common.lua`).
    pub fn since(&self) -> String {
        format!("{}:since", self.base)
    }

    /// The idempotency record of the user's call with `key`.
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:i:{}:{key}", self.base, self.user)
    }

    /// The dirty-set member of the user's counter of `period`.
    pub fn member(&self, period: Period) -> String {
        member(&self.user, period)
    }
}

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster uses for key slots.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_redis_cluster_reference_value() {
        // The Redis Cluster specification gives crc16("123456789") = 0x31C3.
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn keys_carry_prefix_schema_and_bucket_tag() {
        let user: Uuid = "7c9e6679-7425-40de-944b-e07fc1f90ae7".parse().unwrap();
        // 495 was computed outside quotad, with Python's CRC-16/XMODEM (the Redis Cluster CRC):
        //   python3 -c "import binascii; \
        //     print(binascii.crc_hqx(b'7c9e6679-7425-40de-944b-e07fc1f90ae7', 0) % 1024)"
        assert_eq!(bucket(&user), 495);
        let keys = UserKeys::new("q", user);
        let month = Period::Month {
            year: 2026,
            month: 11,
        };
        assert_eq!(
            keys.counter(month),
            "q:1:{495}:c:7c9e6679-7425-40de-944b-e07fc1f90ae7:2026-11"
        );
        assert_eq!(
            keys.counter(Period::Lifetime),
            "q:1:{495}:c:7c9e6679-7425-40de-944b-e07fc1f90ae7:life"
        );
        assert_eq!(
            counter_in("q", 495, &user, month),
            "q:1:{495}:c:7c9e6679-7425-40de-944b-e07fc1f90ae7:2026-11"
        );
        assert_eq!(keys.dirty(), "q:1:{495}:dirty");
        assert_eq!(dirty_of("q", 495), "q:1:{495}:dirty");
        assert_eq!(keys.since(), "q:1:{495}:since");
        assert_eq!(
            keys.idempotency("req-1"),
            "q:1:{495}:i:7c9e6679-7425-40de-944b-e07fc1f90ae7:req-1"
        );
        assert_eq!(changes_channel("q"), "q:1:changes");
        assert_eq!(counters_pattern("q", month), "q:1:{*}:c:*:2026-11");
        assert_eq!(user_of_counter(&keys.counter(month)), Some(user));
        assert_eq!(parse_member(&keys.member(month)), Some((user, month)));
        assert_eq!(parse_member("not-a-user:2026-11"), None);
        assert_eq!(
            keys.member(month),
            "7c9e6679-7425-40de-944b-e07fc1f90ae7:2026-11"
        );
    }
}
