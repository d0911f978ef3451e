//! Every Redis key quotad uses, built in one place (the layout is in the `store` module's docs).
//!
//! A counter belongs to an [`Owner`]: a user or an account. Every key of an owner lives in one
//! bucket, `crc16(id) % 1024`, written as a Redis Cluster hash tag: the bucket of the account's id
//! for an account and for each of its members, of the user's id for a user without an account. So
//! a member's counters and their account's pool share a slot, and one script checks and counts
//! both. [`UserKeys`] computes the bucket once per request, however many keys the request sends.

use uuid::Uuid;

use super::{BUCKETS, SCHEMA};
use crate::period::Period;

/// The bucket of an id: `crc16(id) % 1024`.
pub fn bucket(id: &Uuid) -> u16 {
    let mut buf = Uuid::encode_buffer();
    crc16(id.hyphenated().encode_lower(&mut buf).as_bytes()) % BUCKETS
}

/// Whose counter: a user's own, or an account's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// A user.
    User(Uuid),
    /// An account (an organisation or team).
    Account(Uuid),
}

impl Owner {
    /// The owner's id.
    pub fn id(self) -> Uuid {
        match self {
            Owner::User(id) | Owner::Account(id) => id,
        }
    }

    /// `user` or `account`, as Postgres' limit_overrides and the logs name it.
    pub fn kind(self) -> &'static str {
        match self {
            Owner::User(_) => "user",
            Owner::Account(_) => "account",
        }
    }

    /// The part of a counter key before the id: `c` for a user, `a` for an account.
    fn tag(self) -> &'static str {
        match self {
            Owner::User(_) => "c",
            Owner::Account(_) => "a",
        }
    }
}

/// The dirty set of `bucket`.
pub fn dirty_of(prefix: &str, bucket: u16) -> String {
    format!("{prefix}:{SCHEMA}:{{{bucket}}}:dirty")
}

/// A counter hash, for a caller that already knows its bucket (the flusher reads it off the
/// dirty set it found the counter in).
pub fn counter_in(prefix: &str, bucket: u16, owner: Owner, period: Period) -> String {
    format!(
        "{prefix}:{SCHEMA}:{{{bucket}}}:{}:{}:{}",
        owner.tag(),
        owner.id(),
        period.id()
    )
}

/// The dirty-set member of a counter: `<user>:<period>`, or `a:<account>:<period>`.
pub fn member(owner: Owner, period: Period) -> String {
    match owner {
        Owner::User(user) => format!("{user}:{}", period.id()),
        Owner::Account(account) => format!("a:{account}:{}", period.id()),
    }
}

/// What [`member`] writes → its parts; `None` for a member quotad did not write.
pub fn parse_member(member: &str) -> Option<(Owner, Period)> {
    let (account, rest) = match member.strip_prefix("a:") {
        Some(rest) => (true, rest),
        None => (false, member),
    };
    let (id, period) = rest.split_once(':')?;
    let id = Uuid::parse_str(id).ok()?;
    let owner = if account {
        Owner::Account(id)
    } else {
        Owner::User(id)
    };
    Some((owner, Period::parse_id(period)?))
}

/// A `SCAN` pattern matching every counter hash of `period`, users' and accounts', in every
/// bucket.
pub fn counters_pattern(prefix: &str, period: Period) -> String {
    format!("{prefix}:{SCHEMA}:{{*}}:[ca]:*:{}", period.id())
}

/// The bucket and owner of a counter key `<prefix>:1:{b}:c:<user>:<period>` (or `…:a:<account>:…`).
pub fn owner_of_counter(key: &str) -> Option<(u16, Owner)> {
    let open = key.find(":{")?;
    let close = open + key[open..].find("}:")?;
    let bucket: u16 = key[open + 2..close].parse().ok()?;
    let rest = &key[close + 2..];
    let (tag, rest) = rest.split_once(':')?;
    let id = Uuid::parse_str(rest.rsplit_once(':')?.0).ok()?;
    let owner = match tag {
        "c" => Owner::User(id),
        "a" => Owner::Account(id),
        _ => return None,
    };
    Some((bucket, owner))
}

/// The pub/sub channel on which scripts announce owners whose counts went down or whose plan
/// changed (see [`crate::refusals`]).
pub fn changes_channel(prefix: &str) -> String {
    format!("{prefix}:{SCHEMA}:changes")
}

/// The keys of one owner's counters in one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerKeys {
    owner: Owner,
    bucket: u16,
    /// `<prefix>:1:{<bucket>}`, which every key in the bucket starts with.
    base: String,
}

impl OwnerKeys {
    /// The keys of `owner` in `bucket`.
    pub fn new(prefix: &str, owner: Owner, bucket: u16) -> OwnerKeys {
        OwnerKeys {
            owner,
            bucket,
            base: format!("{prefix}:{SCHEMA}:{{{bucket}}}"),
        }
    }

    /// The bucket (and so the cluster slot) the keys are in.
    pub fn bucket(&self) -> u16 {
        self.bucket
    }

    /// The owner.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// The counter hash of `period`.
    pub fn counter(&self, period: Period) -> String {
        format!(
            "{}:{}:{}:{}",
            self.base,
            self.owner.tag(),
            self.owner.id(),
            period.id()
        )
    }

    /// The dirty set of the bucket.
    pub fn dirty(&self) -> String {
        format!("{}:dirty", self.base)
    }

    /// The marker of the bucket: the time (ms) since which the bucket has held its data without a
    /// gap (see `start_fresh` in `lua/common.lua`).
    pub fn since(&self) -> String {
        format!("{}:since", self.base)
    }

    /// The route key of the owner in this bucket: where a user's counters live (see `misrouted`
    /// in `lua/common.lua`). An account's (`…:au:<account>`, apart from any user's, even one
    /// with the same id) is never set, so it always reads "here".
    pub fn route(&self) -> String {
        match self.owner {
            Owner::User(id) => format!("{}:u:{id}", self.base),
            Owner::Account(id) => format!("{}:au:{id}", self.base),
        }
    }

    /// The dirty-set member of the counter of `period`.
    pub fn member(&self, period: Period) -> String {
        member(self.owner, period)
    }

    /// The user's reservation `rid` (its random part, 32 hex digits) in this bucket: a hash (see
    /// `lua/holds.lua`).
    pub fn reservation(&self, rid: &str) -> String {
        format!("{}:r:{}:{rid}", self.base, self.owner.id())
    }

    /// The bucket's open reservations: a sorted set of [`Self::reservation_member`]s scored by
    /// their expiry (ms, Redis' clock), which the sweeper reads.
    pub fn open_reservations(&self) -> String {
        format!("{}:rz", self.base)
    }

    /// The member of the open set that names the user's reservation `rid`: `<user>:<rid>`.
    pub fn reservation_member(&self, rid: &str) -> String {
        format!("{}:{rid}", self.owner.id())
    }
}

/// The keys of one user, placed where their counters live: in their account's bucket when they
/// have one (beside the account's pool), in their own bucket otherwise.
#[derive(Debug, Clone)]
pub struct UserKeys {
    user: OwnerKeys,
    /// The account's pool, in the same bucket, when the user is a member.
    account: Option<OwnerKeys>,
}

impl UserKeys {
    /// The keys of `user`, a user without an account.
    pub fn new(prefix: &str, user: Uuid) -> UserKeys {
        UserKeys::placed(prefix, user, None)
    }

    /// The keys of `user`, a member of `account` (or of none).
    pub fn placed(prefix: &str, user: Uuid, account: Option<Uuid>) -> UserKeys {
        let b = bucket(&account.unwrap_or(user));
        UserKeys {
            user: OwnerKeys::new(prefix, Owner::User(user), b),
            account: account.map(|a| OwnerKeys::new(prefix, Owner::Account(a), b)),
        }
    }

    /// The user.
    pub fn user(&self) -> Uuid {
        self.user.owner.id()
    }

    /// The account the keys are placed for.
    pub fn account(&self) -> Option<Uuid> {
        self.account.as_ref().map(|a| a.owner.id())
    }

    /// The keys of the user's own counters.
    pub fn own(&self) -> &OwnerKeys {
        &self.user
    }

    /// The keys of the account's pool, for a member.
    pub fn pool(&self) -> Option<&OwnerKeys> {
        self.account.as_ref()
    }

    /// What the route key holds where these keys are right: the account id, or "" (missing).
    pub fn route_value(&self) -> String {
        self.account().map(|a| a.to_string()).unwrap_or_default()
    }

    /// The user's counter hash of `period`.
    pub fn counter(&self, period: Period) -> String {
        self.user.counter(period)
    }

    /// The dirty set of the bucket.
    pub fn dirty(&self) -> String {
        self.user.dirty()
    }

    /// The marker of the bucket (see [`OwnerKeys::since`]).
    pub fn since(&self) -> String {
        self.user.since()
    }

    /// The user's route key in the bucket.
    pub fn route(&self) -> String {
        self.user.route()
    }

    /// The idempotency record of the user's call with `key`.
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:i:{}:{key}", self.user.base, self.user())
    }

    /// The index of the user's idempotency records in the bucket: a sorted set of their keys,
    /// scored by their expiry (ms), so a membership change can carry them along.
    pub fn idempotency_index(&self) -> String {
        format!("{}:ix:{}", self.user.base, self.user())
    }

    /// The key of the user's idempotent call whose record is `record` (a key of
    /// [`Self::idempotency`], in any bucket); `None` for another user's record.
    pub fn idempotency_key_of<'a>(&self, record: &'a str) -> Option<&'a str> {
        let marker = format!(":i:{}:", self.user());
        record.split_once(marker.as_str()).map(|(_, key)| key)
    }

    /// The dirty-set member of the user's counter of `period`.
    pub fn member(&self, period: Period) -> String {
        self.user.member(period)
    }

    /// The user's reservation `rid` in the bucket (see [`OwnerKeys::reservation`]).
    pub fn reservation(&self, rid: &str) -> String {
        self.user.reservation(rid)
    }

    /// The bucket's open reservations (see [`OwnerKeys::open_reservations`]).
    pub fn open_reservations(&self) -> String {
        self.user.open_reservations()
    }

    /// The open-set member of the user's reservation `rid` (see [`OwnerKeys::reservation_member`]).
    pub fn reservation_member(&self, rid: &str) -> String {
        self.user.reservation_member(rid)
    }
}

/// The open reservations of `bucket` (see [`OwnerKeys::open_reservations`]).
pub fn open_reservations_of(prefix: &str, bucket: u16) -> String {
    format!("{prefix}:{SCHEMA}:{{{bucket}}}:rz")
}

/// The user and random part of a reservation named by a member of an open set
/// (`<user>:<rid>`); `None` for a member quotad did not write.
pub fn parse_reservation_member(member: &str) -> Option<(Uuid, String)> {
    let (user, rid) = member.split_once(':')?;
    let user = Uuid::parse_str(user).ok()?;
    if rid.len() != 32 || !rid.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    Some((user, rid.to_owned()))
}

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster uses for key slots.
pub(super) fn crc16(bytes: &[u8]) -> u16 {
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
            counter_in("q", 495, Owner::User(user), month),
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
        assert_eq!(counters_pattern("q", month), "q:1:{*}:[ca]:*:2026-11");
        assert_eq!(
            owner_of_counter(&keys.counter(month)),
            Some((495, Owner::User(user)))
        );
        assert_eq!(
            parse_member(&keys.member(month)),
            Some((Owner::User(user), month))
        );
        assert_eq!(keys.route(), format!("q:1:{{495}}:u:{user}"));
        assert_eq!(keys.route_value(), "");
        assert_eq!(parse_member("not-a-user:2026-11"), None);
        assert_eq!(
            keys.member(month),
            "7c9e6679-7425-40de-944b-e07fc1f90ae7:2026-11"
        );
    }

    #[test]
    fn a_member_and_their_account_share_the_account_bucket() {
        let user: Uuid = "7c9e6679-7425-40de-944b-e07fc1f90ae7".parse().unwrap();
        let account: Uuid = "00000000-0000-4000-8000-00000000000a".parse().unwrap();
        let b = bucket(&account);
        assert_ne!(b, bucket(&user));
        let keys = UserKeys::placed("q", user, Some(account));
        let month = Period::Month {
            year: 2026,
            month: 11,
        };
        assert_eq!(keys.counter(month), format!("q:1:{{{b}}}:c:{user}:2026-11"));
        let pool = keys.pool().unwrap();
        assert_eq!(
            pool.counter(month),
            format!("q:1:{{{b}}}:a:{account}:2026-11")
        );
        assert_eq!(pool.member(month), format!("a:{account}:2026-11"));
        assert_eq!(
            parse_member(&pool.member(month)),
            Some((Owner::Account(account), month))
        );
        assert_eq!(
            owner_of_counter(&pool.counter(month)),
            Some((b, Owner::Account(account)))
        );
        assert_eq!(keys.route_value(), account.to_string());
        assert_eq!(keys.dirty(), pool.dirty());
        assert_eq!(parse_member("a:not-a-uuid:2026-11"), None);
    }
}
