//! Reading every counter of a period, for reconcile, and the two repair writes.

use std::collections::HashMap;

use deadpool_redis::redis;

use super::{keys, scripts, CounterHash, Owner, OwnerKeys, RedisStore, StoreError};
use crate::period::Period;

/// One counter hash as reconcile sees it.
#[derive(Debug, Clone)]
pub struct LiveCounter {
    /// Whose.
    pub owner: Owner,
    /// The bucket it lives in.
    pub bucket: u16,
    /// The hash.
    pub hash: CounterHash,
    /// Whether it waits in a dirty set (changed since its last flush).
    pub dirty: bool,
}

impl RedisStore {
    /// Every loaded counter hash of `period`, users' and accounts' (one SCAN, so it does not
    /// block Redis; on a cluster, one SCAN of each master).
    pub async fn scan_period(&self, period: Period) -> Result<Vec<LiveCounter>, StoreError> {
        let pattern = keys::counters_pattern(&self.prefix, period);
        self.found(tokio::time::Instant::now() + self.timeout)
            .await?;
        // Each master of a cluster, or the one Redis.
        let nodes: Vec<Option<(String, u16)>> = match self.is_cluster() {
            true => self.masters().await?.into_iter().map(Some).collect(),
            false => vec![None],
        };
        let mut keys: Vec<String> = Vec::new();
        for node in &nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, found): (u64, Vec<String>) = self.on_node(node.as_ref(), &scan).await?;
                keys.extend(found);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        self.read_live(keys, period).await
    }

    /// The counters `keys` name, with whether each waits in its dirty set, 1,000 per batch.
    async fn read_live(
        &self,
        keys: Vec<String>,
        period: Period,
    ) -> Result<Vec<LiveCounter>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(1000) {
            let owners: Vec<(u16, Owner)> = chunk
                .iter()
                .filter_map(|k| keys::owner_of_counter(k))
                .collect();
            let mut prelude = redis::pipe();
            self.set_name(&mut prelude);
            let mut batch = self.batch(prelude);
            for (bucket, owner) in &owners {
                let keys = self.keys_of(*owner, *bucket);
                batch.to(*bucket).hgetall(keys.counter(period));
                batch.to(*bucket).zscore(keys.dirty(), keys.member(period));
            }
            let replies: Vec<redis::Value> = self.run_batch_as(batch).await?;
            for ((bucket, owner), pair) in owners.into_iter().zip(replies.chunks(2)) {
                let fields: HashMap<String, String> = redis::from_redis_value_ref(&pair[0])
                    .map_err(|e| StoreError::Redis(e.into()))?;
                let score: Option<f64> = redis::from_redis_value_ref(&pair[1])
                    .map_err(|e| StoreError::Redis(e.into()))?;
                let hash = CounterHash::parse(&fields);
                if hash.is_loaded() {
                    out.push(LiveCounter {
                        owner,
                        bucket,
                        hash,
                        dirty: score.is_some(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Bumps a loaded counter's version and marks it dirty, so the next flush overwrites Postgres.
    pub async fn touch(&self, keys: &OwnerKeys, period: Period) -> Result<bool, StoreError> {
        let mut inv = scripts::TOUCH.prepare_invoke();
        inv.key(keys.counter(period))
            .key(keys.dirty())
            .arg(keys.member(period));
        let v: i64 = self.run_script(&mut inv).await?;
        Ok(v > 0)
    }

    /// Replaces a loaded counter with `fields` at `version` if Redis' version is older.
    pub async fn overwrite(
        &self,
        keys: &OwnerKeys,
        period: Period,
        version: i64,
        fields: &[(String, String)],
    ) -> Result<bool, StoreError> {
        let mut inv = scripts::OVERWRITE.prepare_invoke();
        inv.key(keys.counter(period))
            .arg(version)
            .arg(self.changes_channel())
            .arg(keys.owner().id().to_string());
        for (f, v) in fields {
            inv.arg(f).arg(v);
        }
        let done: i64 = self.run_script(&mut inv).await?;
        Ok(done == 1)
    }
}
