//! The flusher's side of Redis: reading the dirty sets oldest first, reading the counters they
//! name, and taking members off only when their counter did not change meanwhile.

use std::collections::HashMap;

use deadpool_redis::redis;

use super::{keys, scripts, CounterHash, Owner, OwnerKeys, RedisStore, StoreError, BUCKETS};
use crate::period::Period;

/// One dirty counter, as listed in its bucket's dirty set.
#[derive(Debug, Clone)]
pub struct DirtyMember {
    /// The bucket (and so the slot) it lives in.
    pub bucket: u16,
    /// The member text, `<user>:<period>` or `a:<account>:<period>`.
    pub member: String,
    /// Whose counter.
    pub owner: Owner,
    /// The period.
    pub period: Period,
    /// Redis server time (ms) of its first unflushed change.
    pub since_ms: i64,
}

/// What a scan of some buckets' dirty sets found.
#[derive(Debug, Default)]
pub struct DirtyScan {
    /// Up to the asked number of members per bucket, oldest first.
    pub members: Vec<DirtyMember>,
    /// How many members the scanned dirty sets hold in all.
    pub backlog: u64,
    /// Members that could not be parsed (not written by quotad); removed so they cannot block.
    pub garbage: Vec<(u16, String)>,
    /// Buckets whose dirty set holds more than was taken (a large account's bucket, say).
    pub hot: Vec<u16>,
}

impl RedisStore {
    /// The dirty set of bucket `b`.
    pub fn dirty_key_of(&self, bucket: u16) -> String {
        keys::dirty_of(&self.prefix, bucket)
    }

    /// The counter hash a dirty member names (in the bucket it was listed in).
    fn counter_of(&self, m: &DirtyMember) -> String {
        keys::counter_in(&self.prefix, m.bucket, m.owner, m.period)
    }

    /// The oldest `per_bucket` members of each dirty set in `buckets`, and the sets' sizes: one
    /// pipeline of `ZRANGE`s, then `ZCARD` only for the sets that filled their range (a shorter
    /// range is the whole set), so an idle pass costs Redis one command a bucket.
    pub async fn scan_dirty(
        &self,
        buckets: impl IntoIterator<Item = u16>,
        per_bucket: usize,
    ) -> Result<DirtyScan, StoreError> {
        let buckets: Vec<u16> = buckets.into_iter().filter(|b| *b < BUCKETS).collect();
        let mut prelude = redis::pipe();
        // Every batch names the connection again: a reconnected one has lost its name.
        self.set_name(&mut prelude);
        let mut batch = self.batch(prelude);
        for b in &buckets {
            batch
                .to(*b)
                .zrange_withscores(self.dirty_key_of(*b), 0, per_bucket as isize - 1);
        }
        let listed: Vec<Vec<(String, f64)>> = self.run_batch_as(batch).await?;
        let full: Vec<u16> = buckets
            .iter()
            .zip(&listed)
            .filter(|(_, l)| l.len() >= per_bucket)
            .map(|(b, _)| *b)
            .collect();
        let mut cards: HashMap<u16, u64> = HashMap::new();
        if !full.is_empty() {
            let mut batch = self.batch(redis::pipe());
            for b in &full {
                batch.to(*b).zcard(self.dirty_key_of(*b));
            }
            let counted: Vec<u64> = self.run_batch_as(batch).await?;
            cards.extend(full.iter().copied().zip(counted));
        }
        let mut scan = DirtyScan::default();
        for (b, listed) in buckets.iter().zip(listed) {
            let card = cards.get(b).copied().unwrap_or(0).max(listed.len() as u64);
            scan.backlog += card;
            if card > listed.len() as u64 {
                scan.hot.push(*b);
            }
            for (member, score) in listed {
                match keys::parse_member(&member) {
                    Some((owner, period)) => scan.members.push(DirtyMember {
                        bucket: *b,
                        member,
                        owner,
                        period,
                        since_ms: score as i64,
                    }),
                    None => scan.garbage.push((*b, member)),
                }
            }
        }
        Ok(scan)
    }

    /// How many counters wait in all dirty sets.
    pub async fn backlog(&self) -> Result<u64, StoreError> {
        let mut batch = self.batch(redis::pipe());
        for b in 0..BUCKETS {
            batch.to(b).zcard(self.dirty_key_of(b));
        }
        let cards: Vec<u64> = self.run_batch_as(batch).await?;
        Ok(cards.into_iter().sum())
    }

    /// The counter hashes of `members`, in one pipeline (not loaded for hashes that are gone).
    pub async fn read_dirty(
        &self,
        members: &[DirtyMember],
    ) -> Result<Vec<CounterHash>, StoreError> {
        let mut batch = self.batch(redis::pipe());
        for m in members {
            batch.to(m.bucket).hgetall(self.counter_of(m));
        }
        let maps: Vec<HashMap<String, String>> = self.run_batch_as(batch).await?;
        Ok(maps.iter().map(CounterHash::parse).collect())
    }

    /// Takes flushed members off their dirty sets where the counter's version is still the one
    /// written (`None` = the hash was gone). One script per bucket, all in one pipeline.
    pub async fn unmark(&self, flushed: &[(&DirtyMember, Option<i64>)]) -> Result<u64, StoreError> {
        let mut by_bucket: HashMap<u16, Vec<&(&DirtyMember, Option<i64>)>> = HashMap::new();
        for f in flushed {
            by_bucket.entry(f.0.bucket).or_default().push(f);
        }
        if by_bucket.is_empty() {
            return Ok(0);
        }
        let buckets: Vec<&u16> = by_bucket.keys().collect();
        let batch_of = |buckets: &[&u16]| {
            let mut batch = self.batch(redis::pipe());
            for bucket in buckets {
                let items = &by_bucket[*bucket];
                let mut inv = scripts::UNMARK.prepare_invoke();
                inv.key(self.dirty_key_of(**bucket));
                for (m, _) in items.iter().map(|x| (x.0, x.1)) {
                    inv.key(self.counter_of(m));
                }
                for (m, _) in items.iter().map(|x| (x.0, x.1)) {
                    inv.arg(&m.member);
                }
                for (_, v) in items.iter().map(|x| (x.0, x.1)) {
                    inv.arg(v.map(|v| v.to_string()).unwrap_or_default());
                }
                batch.to(**bucket).invoke_script(&inv);
            }
            batch.ignore_errors();
            batch
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut replies = self.run_batch(batch_of(&buckets), deadline).await?;
        // A pipeline cannot load a script Redis lacks and run it again, as one EVALSHA does:
        // where Redis did not know it (restarted, failed over), it is loaded (on every master)
        // and those buckets' scripts are sent again, once.
        let missing: Vec<usize> = (0..replies.len())
            .filter(|i| super::is_noscript(&replies[*i]))
            .collect();
        if !missing.is_empty() {
            let load = scripts::UNMARK.prepare_invoke();
            self.with_conn(|mut c| async move { load.load_async(&mut c).await })
                .await?;
            let again: Vec<&u16> = missing.iter().map(|i| buckets[*i]).collect();
            let deadline = tokio::time::Instant::now() + self.timeout;
            for (i, r) in missing
                .into_iter()
                .zip(self.run_batch(batch_of(&again), deadline).await?)
            {
                replies[i] = r;
            }
        }
        let mut removed = 0i64;
        for r in replies {
            removed += self.reply_as::<i64>(r)?;
        }
        Ok(removed.max(0) as u64)
    }

    /// Moves `members` to the back of their dirty sets (scored `now_ms`), still dirty: a counter
    /// Postgres refused to store stays in Redis and is tried again, but after everything else,
    /// so it cannot hold back other counters. `XX`: one flushed meanwhile is not added back.
    pub async fn requeue(&self, members: &[&DirtyMember], now_ms: i64) -> Result<(), StoreError> {
        if members.is_empty() {
            return Ok(());
        }
        let mut batch = self.batch(redis::pipe());
        for m in members {
            batch
                .to(m.bucket)
                .cmd("ZADD")
                .arg(self.dirty_key_of(m.bucket))
                .arg("XX")
                .arg(now_ms)
                .arg(&m.member);
        }
        self.run_batch_as::<redis::Value>(batch).await.map(drop)
    }

    /// Brings a counter that is older than Postgres' row up to it (`lua/catch_up.lua`): every
    /// count and numeric metadata sum to the larger of the two, missing text metadata from
    /// Postgres, the version past Postgres', marked dirty and announced. `fields` are Postgres'
    /// (counts by type, `m:` and `s:` fields). Returns whether Redis was older (and so changed).
    pub async fn catch_up(
        &self,
        keys: &OwnerKeys,
        period: Period,
        version: i64,
        fields: &[(String, String)],
    ) -> Result<bool, StoreError> {
        let mut inv = scripts::CATCH_UP.prepare_invoke();
        inv.key(keys.counter(period))
            .key(keys.dirty())
            .arg(version)
            .arg(keys.member(period))
            .arg(self.changes_channel())
            .arg(keys.owner().id().to_string());
        for (field, value) in fields {
            inv.arg(field).arg(value);
        }
        let changed: i64 = self.run_script(&mut inv).await?;
        Ok(changed == 1)
    }

    /// Removes members that quotad did not write (they would otherwise sit first in line forever).
    pub async fn drop_garbage(&self, garbage: &[(u16, String)]) -> Result<(), StoreError> {
        if garbage.is_empty() {
            return Ok(());
        }
        let mut batch = self.batch(redis::pipe());
        for (b, member) in garbage {
            batch.to(*b).zrem(self.dirty_key_of(*b), member);
        }
        self.run_batch_as::<redis::Value>(batch).await.map(drop)
    }
}
