//! Where each member of an account counts, as this replica believes it.
//!
//! A member's counters live in their account's bucket (see `store::keys`), so a call must know the
//! account before it is sent. A replica starts out believing every user has none (their own
//! bucket, where users without an account are), and learns otherwise from the scripts: every
//! script that touches a user's counters checks the user's route key in the bucket it runs in and
//! answers "moved", with what the key holds, when the belief was wrong (see `misrouted` in
//! `lua/common.lua`). [`Hops`] turns that answer into the next place to try; [`Routes`] remembers
//! it for the user's next call. A wrong belief costs a round trip, never a count in the wrong
//! place.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use uuid::Uuid;

/// Independent locks, so concurrent calls rarely wait for each other.
const SHARDS: usize = 64;
/// Most members remembered per shard; past it the shard starts again (a forgotten member costs
/// one extra round trip on their next call).
const PER_SHARD: usize = 16_384;
/// Most routes one call follows before it gives up (a route loop cannot happen unless a move a
/// crash interrupted left one: then the user's calls fail as an outage until the move is finished
/// by repeating it).
const MAX_HOPS: u32 = 6;
/// Longest a call waits for a move under way (a route ">moving") before it fails as an outage.
pub const MOVE_WAIT: Duration = Duration::from_millis(500);

/// The accounts this replica believes members count under. Cheap to clone: clones share it.
#[derive(Clone)]
pub struct Routes {
    shards: std::sync::Arc<Vec<Mutex<HashMap<Uuid, Uuid>>>>,
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            shards: std::sync::Arc::new((0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect()),
        }
    }
}

impl Routes {
    fn shard(&self, user: &Uuid) -> std::sync::MutexGuard<'_, HashMap<Uuid, Uuid>> {
        let i = (user.as_u128() % SHARDS as u128) as usize;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The account `user` is believed to count under (`None`: their own bucket).
    pub fn get(&self, user: &Uuid) -> Option<Uuid> {
        self.shard(user).get(user).copied()
    }

    /// Believes `user` counts under `account` from now on.
    pub fn set(&self, user: Uuid, account: Option<Uuid>) {
        let mut shard = self.shard(&user);
        match account {
            Some(a) => {
                if shard.len() >= PER_SHARD && !shard.contains_key(&user) {
                    shard.clear();
                }
                shard.insert(user, a);
            }
            None => {
                shard.remove(&user);
            }
        }
    }
}

/// The routes one call has followed.
#[derive(Debug, Default)]
pub struct Hops {
    hops: u32,
    /// Pauses made for a move under way, and their total.
    waits: u32,
    waited: Duration,
}

impl Hops {
    /// Waits before asking again about a move under way (a route ">moving"): 2, 4, 8 … 64 ms (a
    /// move takes a few milliseconds; a stuck one is asked about a dozen times). `Err` with a
    /// sentence once [`MOVE_WAIT`] has passed: the call then fails as an outage.
    pub async fn pause(&mut self) -> Result<(), String> {
        if self.waited >= MOVE_WAIT {
            return Err(format!(
                "the user's counters are being moved between accounts (waited {} ms); if this lasts, a membership change was interrupted: repeat it",
                self.waited.as_millis()
            ));
        }
        let pause = Duration::from_millis(2u64 << self.waits.min(5)).min(MOVE_WAIT - self.waited);
        tokio::time::sleep(pause).await;
        self.waits += 1;
        self.waited += pause;
        Ok(())
    }

    /// Where to send the call next, from what a script found in the route key (`route`) of the
    /// place it was sent to: the account to count under (`None`: the user's own bucket). `Err`
    /// with a sentence when the call should give up (too many hops, or a route quotad did not
    /// write). A move under way is [`Self::pause`]'s.
    pub fn next(&mut self, route: &str) -> Result<Option<Uuid>, String> {
        self.hops += 1;
        if self.hops > MAX_HOPS {
            return Err(format!(
                "the user's counters could not be found after {MAX_HOPS} routes (last {route:?}); a membership change may have been interrupted: repeat it"
            ));
        }
        let target = route.strip_prefix('>').unwrap_or(route);
        match target {
            "" | "home" => Ok(None),
            id => Uuid::parse_str(id).map(Some).map_err(|_| {
                format!("the user's route key holds {route:?}, which quotad did not write")
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_followed_to_the_account_or_home_and_loops_end() {
        let a = Uuid::new_v4();
        let mut hops = Hops::default();
        assert_eq!(hops.next(&format!(">{a}")), Ok(Some(a)));
        assert_eq!(hops.next(&a.to_string()), Ok(Some(a)));
        assert_eq!(hops.next(">home"), Ok(None));
        assert_eq!(hops.next(""), Ok(None));
        assert!(hops.next(">nonsense").is_err());
        assert!(hops.next(">home").is_ok());
        assert!(hops.next(">home").is_err(), "too many hops");
    }

    #[tokio::test(start_paused = true)]
    async fn a_move_under_way_is_waited_out_then_given_up() {
        let mut hops = Hops::default();
        let mut waits = 0;
        while hops.pause().await.is_ok() {
            waits += 1;
        }
        assert!((5..=20).contains(&waits), "waited {waits} times");
        assert!(hops.waited >= MOVE_WAIT);
    }

    #[test]
    fn the_cache_remembers_members_only() {
        let routes = Routes::default();
        let (u, a) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(routes.get(&u), None);
        routes.set(u, Some(a));
        assert_eq!(routes.get(&u), Some(a));
        routes.set(u, None);
        assert_eq!(routes.get(&u), None);
    }
}
