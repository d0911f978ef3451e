//! The Lua scripts, compiled in from `lua/`. Each script that counts gets `lua/common.lua`
//! prepended, so shared helpers stay in one place while every call stays one EVALSHA.
//! `Script::invoke_async` sends EVALSHA and, on NOSCRIPT (a restarted Redis), loads and retries.

use std::sync::LazyLock;

use deadpool_redis::redis::Script;

macro_rules! with_common {
    ($file:literal) => {
        concat!(
            include_str!("../../lua/common.lua"),
            "\n",
            include_str!(concat!("../../lua/", $file))
        )
    };
}

/// consume and track: check, count, version bump, dirty mark and idempotency record in one step.
pub static CONSUME: LazyLock<Script> = LazyLock::new(|| Script::new(with_common!("consume.lua")));
/// consume_many: consume, check or track several types in one call, all or nothing.
pub static CONSUME_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_common!("consume_many.lua")));
/// check: consume's decision without counting.
pub static CHECK: LazyLock<Script> = LazyLock::new(|| Script::new(with_common!("check.lua")));
/// refund: give back one idempotent consume, once.
pub static REFUND: LazyLock<Script> = LazyLock::new(|| Script::new(with_common!("refund.lua")));
/// refund_many: give back every item of one call with items, once.
pub static REFUND_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_common!("refund_many.lua")));
/// release: lower a lifetime counter.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(with_common!("release.lua")));
/// hydrate: fill a missing counter hash from Postgres' totals.
pub static HYDRATE: LazyLock<Script> = LazyLock::new(|| Script::new(with_common!("hydrate.lua")));
/// set_plan: write a user's new plan into their live counter hashes.
pub static SET_PLAN: LazyLock<Script> = LazyLock::new(|| Script::new(with_common!("set_plan.lua")));
/// unmark: take flushed counters off the dirty set unless they changed meanwhile.
pub static UNMARK: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/unmark.lua")));
/// touch: bump a counter's version and mark it dirty (reconcile repair).
pub static TOUCH: LazyLock<Script> = LazyLock::new(|| Script::new(with_common!("touch.lua")));
/// overwrite: replace an older Redis counter with Postgres' counts (reconcile repair).
pub static OVERWRITE: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_common!("overwrite.lua")));
/// catch_up: raise a counter that is older than Postgres' row to it (flusher, when Postgres
/// holds a higher version than Redis: a Redis restored from an older dump).
pub static CATCH_UP: LazyLock<Script> = LazyLock::new(|| Script::new(with_common!("catch_up.lua")));
/// set_limits: write an owner's limit overrides into their live counter hashes.
pub static SET_LIMITS: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_common!("set_limits.lua")));
/// move_out: stop using a user's counters in one bucket and hand them over (a membership change).
pub static MOVE_OUT: LazyLock<Script> = LazyLock::new(|| Script::new(with_common!("move_out.lua")));
/// move_in: fill a user's counters in their new bucket and route the user there.
pub static MOVE_IN: LazyLock<Script> = LazyLock::new(|| Script::new(with_common!("move_in.lua")));
/// move_done: forward the old bucket to the new one and remove what was left there.
pub static MOVE_DONE: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_common!("move_done.lua")));
/// reroute: a membership change within one bucket: only the route changes.
pub static REROUTE: LazyLock<Script> = LazyLock::new(|| Script::new(with_common!("reroute.lua")));

/// The reservation scripts: `lua/common.lua`, then `lua/holds.lua` (their shared helpers), then
/// the script.
macro_rules! with_holds {
    ($file:literal) => {
        concat!(
            include_str!("../../lua/common.lua"),
            "\n",
            include_str!("../../lua/holds.lua"),
            "\n",
            include_str!(concat!("../../lua/", $file))
        )
    };
}

/// reserve: hold an amount against every level's limit, counting nothing yet.
pub static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(with_holds!("reserve.lua")));
/// commit: count a reservation's actual amount and free its hold.
pub static COMMIT: LazyLock<Script> = LazyLock::new(|| Script::new(with_holds!("commit.lua")));
/// cancel: free all a reservation holds.
pub static CANCEL: LazyLock<Script> = LazyLock::new(|| Script::new(with_holds!("cancel.lua")));
/// expire: the sweeper's step: free a reservation whose expiry has passed.
pub static EXPIRE: LazyLock<Script> = LazyLock::new(|| Script::new(with_holds!("expire.lua")));
