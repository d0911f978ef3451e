//! Accounts: a user's membership, an account's plan and usage, and limit overrides for users and
//! accounts. The decisions themselves (every level in one script) are in [`crate::quota`].
//!
//! # Moving a user between accounts
//!
//! A member's counters live in their account's bucket, so joining, leaving or changing account
//! moves the user's live counters (lifetime, and the months around the current one) to the new
//! bucket, in three single-slot steps (`lua/move_out.lua`, `move_in.lua`, `move_done.lua`; one,
//! `reroute.lua`, when both places share a bucket). While they run, the old place answers every
//! call "moving" and callers wait (up to [`crate::routes::MOVE_WAIT`]); nothing is counted twice
//! or lost, because no script counts anywhere but where the route key says the counters are. The
//! user's membership row in Postgres is locked for the whole move and written at its end, so
//! moves of one user run one at a time.
//!
//! What a move does to the counts: the user's own counts go with them, unchanged. A pool keeps
//! what was counted in it while the user was a member: leaving gives nothing back to the old
//! account, and joining brings nothing of the past into the new one (it counts the user's calls
//! from the move on). The user's idempotency records go with them (listed in their index), so a
//! retry after the move of a call made before it replays; its refund gives back at the user's
//! level only (its pool is in another slot).
//!
//! A move a crash interrupted leaves the old place "moving" (the user's calls then fail as an
//! outage, under their types' fail policy): repeating the same `PUT` finishes it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::db::{self, Membership, StoredOverrides};
use crate::period::{Period, PeriodKind};
use crate::quota::{current_periods, known_plan, level_usage, Quota, QuotaError, TypeUsage};
use crate::routes::Hops;
use crate::store::{Change, Hydrated, Owner, StoreError};

/// Most members an account usage read lists.
pub const MAX_MEMBERS_LISTED: usize = 1000;

/// An account's plan as stored.
#[derive(Debug, Clone)]
pub struct AccountPlan {
    /// The account.
    pub account: Uuid,
    /// The plan in force.
    pub plan: String,
    /// True when no plan is stored and the default applies.
    pub is_default: bool,
    /// When it was last set.
    pub updated_at: Option<DateTime<Utc>>,
}

/// An account's pool and its members' use of it.
#[derive(Debug, Clone)]
pub struct AccountUsage {
    /// The account.
    pub account: Uuid,
    /// The account's plan in force.
    pub plan: String,
    /// The pool, by type.
    pub counters: BTreeMap<String, TypeUsage>,
    /// How many members the account has.
    pub member_count: usize,
    /// Members by what they used this period (all types summed), most first, at most the asked
    /// number: each with their count per type.
    pub members: Vec<(Uuid, BTreeMap<String, u64>)>,
}

/// A customer's overrides, and where every configured type's limit comes from.
#[derive(Debug, Clone)]
pub struct Overrides {
    /// Whose.
    pub owner: Owner,
    /// As stored.
    pub stored: StoredOverrides,
}

impl Quota {
    /// The account `user` is a member of, as Postgres holds it.
    pub async fn get_account(&self, user: Uuid) -> Result<Membership, QuotaError> {
        Ok(db::within(self.db_timeout, db::get_membership(&self.db, user)).await?)
    }

    /// Makes `user` a member of `account` (`None`: of none), moving their live counters (see the
    /// module's documentation). Repeating it is harmless, and finishes a move a crash interrupted.
    #[tracing::instrument(skip_all, fields(user = %user, account = ?account))]
    pub async fn set_account(
        &self,
        user: Uuid,
        account: Option<Uuid>,
    ) -> Result<Membership, QuotaError> {
        let mut tx = db::within(self.db_timeout, self.db.begin()).await?;
        let current = db::within(self.db_timeout, db::lock_membership(&mut tx, user)).await?;
        let to = self.store.keys_in(user, account);
        let periods = move_periods(self.clock.now());
        let mut from = current.account;
        let mut hops = Hops::default();
        loop {
            let keys = self.store.keys_in(user, from);
            match self.store.move_user(&keys, &to, &periods).await? {
                Ok(()) => break,
                // The counters are not where Postgres says (a move a crash interrupted after
                // its Redis steps): Redis' route says where they are.
                Err(route) => {
                    let next = hops
                        .next(&route)
                        .map_err(|e| QuotaError::Redis(StoreError::Unavailable(e)))?;
                    if next == account && route.starts_with('>') {
                        break;
                    }
                    from = next;
                }
            }
        }
        let stored =
            db::within(self.db_timeout, db::put_membership(&mut tx, user, account)).await?;
        db::within(self.db_timeout, tx.commit()).await?;
        self.routes.set(user, account);
        self.refusals.forget(&user);
        Ok(stored)
    }

    /// Stores `plan` for `account` in Postgres, then puts it into the pool's live Redis counters.
    #[tracing::instrument(skip_all, fields(account = %account, plan = %plan))]
    pub async fn set_account_plan(
        &self,
        account: Uuid,
        plan: &str,
    ) -> Result<AccountPlan, QuotaError> {
        let plans = self.plans.current();
        known_plan(&plans, plan)?;
        let owner = Owner::Account(account);
        let stored = db::within(self.db_timeout, db::put_plan(&self.db, owner, plan)).await?;
        let written = self
            .put_in_force(owner, Change::Plan(&stored.plan, stored.version))
            .await;
        self.refusals.forget(&account);
        if let Err(e) = written {
            tracing::warn!(error.message = %e, "account plan stored in postgres but not in redis");
            return Err(QuotaError::PlanNotInForce(e));
        }
        Ok(AccountPlan {
            account,
            plan: stored.plan,
            is_default: false,
            updated_at: Some(stored.updated_at),
        })
    }

    /// The plan stored for `account`, or the default.
    pub async fn get_account_plan(&self, account: Uuid) -> Result<AccountPlan, QuotaError> {
        let plans = self.plans.current();
        let stored = db::within(
            self.db_timeout,
            db::get_plan(&self.db, Owner::Account(account)),
        )
        .await?;
        Ok(match stored {
            Some(p) => AccountPlan {
                account,
                plan: p.plan,
                is_default: false,
                updated_at: Some(p.updated_at),
            },
            None => AccountPlan {
                account,
                plan: plans.default_plan.clone(),
                is_default: true,
                updated_at: None,
            },
        })
    }

    /// Changes `owner`'s limit overrides (each of `set` set, -1 = unlimited; each of `clear` back
    /// to the plan) in Postgres, then puts the whole set into their live Redis counters, so the
    /// next request on any replica decides under it.
    #[tracing::instrument(skip_all, fields(owner = ?owner))]
    pub async fn set_limits(
        &self,
        owner: Owner,
        set: &BTreeMap<String, i64>,
        clear: &[String],
    ) -> Result<Overrides, QuotaError> {
        let plans = self.plans.current();
        for ty in set.keys().chain(clear) {
            crate::quota::known_type(&plans, ty)?;
        }
        let stored = db::within(
            self.db_timeout,
            db::put_overrides(&self.db, owner, set, clear),
        )
        .await?;
        let limits: Vec<(String, i64)> =
            stored.limits.iter().map(|(t, l)| (t.clone(), *l)).collect();
        let written = self
            .put_in_force(owner, Change::Limits(&limits, stored.version))
            .await;
        self.refusals.forget(&owner.id());
        if let Err(e) = written {
            tracing::warn!(error.message = %e, "limit overrides stored in postgres but not in redis");
            return Err(QuotaError::PlanNotInForce(e));
        }
        Ok(Overrides { owner, stored })
    }

    /// `owner`'s limit overrides as stored.
    pub async fn get_limits(&self, owner: Owner) -> Result<Overrides, QuotaError> {
        let stored = db::within(self.db_timeout, db::get_overrides(&self.db, owner)).await?;
        Ok(Overrides { owner, stored })
    }

    /// The pool of `account` by type, and its members by what they used this period (at most
    /// `top`, most first).
    #[tracing::instrument(skip_all, fields(account = %account))]
    pub async fn account_usage(
        &self,
        account: Uuid,
        top: usize,
    ) -> Result<AccountUsage, QuotaError> {
        let plans = self.plans.current();
        let now = self.clock.now();
        let periods = current_periods(&plans, now);
        let pool = self.store.account_keys(account);
        let maps = self.pool_counters(&pool, &periods).await?;
        let (plan, counters) = level_usage(&plans, &periods, &maps, now, false);

        let members = db::within(self.db_timeout, db::members(&self.db, account)).await?;
        let keys: Vec<_> = members
            .iter()
            .map(|m| self.store.keys_in(*m, Some(account)).own().clone())
            .collect();
        let mut used: Vec<(Uuid, BTreeMap<String, u64>)> =
            members.iter().map(|m| (*m, BTreeMap::new())).collect();
        let believed = account.to_string();
        for period in &periods {
            let mut hashes = self.store.read_many(&keys, *period).await?;
            let missing: Vec<usize> = (0..hashes.len()).filter(|i| hashes[*i].is_none()).collect();
            for chunk in missing.chunks(crate::hydrate::MAX_BATCH) {
                let loads = chunk
                    .iter()
                    .map(|i| self.hydrator.load(&keys[*i], &believed, *period));
                let filled = futures_util::future::try_join_all(loads).await?;
                // A member whose counters are not here (a move under way) is read as not here.
                let here: Vec<usize> = chunk
                    .iter()
                    .zip(filled)
                    .filter(|(_, f)| !matches!(f, Hydrated::Moved(_)))
                    .map(|(i, _)| *i)
                    .collect();
                let again: Vec<_> = here.iter().map(|i| keys[*i].clone()).collect();
                for (i, h) in here
                    .iter()
                    .zip(self.store.read_many(&again, *period).await?)
                {
                    hashes[*i] = h;
                }
            }
            for ty in plans.types.values() {
                if Period::current(ty.period, now) != *period {
                    continue;
                }
                for ((_, by_type), hash) in used.iter_mut().zip(&hashes) {
                    let n = hash.as_ref().map_or(0, |h| h.count(&ty.name).max(0) as u64);
                    by_type.insert(ty.name.clone(), n);
                }
            }
        }
        let member_count = used.len();
        used.sort_by(|a, b| {
            let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
            total(&b.1).cmp(&total(&a.1)).then(a.0.cmp(&b.0))
        });
        used.truncate(top);
        Ok(AccountUsage {
            account,
            plan,
            counters,
            member_count,
            members: used,
        })
    }
}

/// The periods a move carries: lifetime, and the months either side of the current one (the
/// next may exist already on a replica past midnight; the previous holds calls a refund may
/// name, and the plan a fresh start takes).
fn move_periods(now: DateTime<Utc>) -> Vec<Period> {
    let month = Period::current(PeriodKind::Month, now);
    let mut periods = vec![Period::Lifetime];
    periods.extend(month.previous());
    periods.push(month);
    if let Some(end) = month.end() {
        periods.push(Period::current(PeriodKind::Month, end));
    }
    periods
}
