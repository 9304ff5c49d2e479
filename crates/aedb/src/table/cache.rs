//! The block cache: decrypted data blocks of every open table, bounded in bytes.
//!
//! `quick_cache` (S3-FIFO, sharded) does the eviction; its weighter counts each
//! block's in-memory size, and each shard holds at most capacity / shards, so the
//! total never exceeds the configured bytes. Blocks are handed out as `Arc`: one an
//! iterator still holds after eviction is outside the bound (at most one per
//! iterator or `get` in flight).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::sync::Cache;
use quick_cache::{OptionsBuilder, Weighter};

use super::block::DataBlock;

/// (table id, data block number).
pub(crate) type BlockKey = (u64, u64);

#[derive(Clone, Debug)]
struct BlockWeighter;

impl Weighter<BlockKey, Arc<DataBlock>> for BlockWeighter {
    fn weight(&self, _key: &BlockKey, block: &Arc<DataBlock>) -> u64 {
        // The key and the cache's own slot are a few dozen bytes; counting them keeps
        // many tiny blocks from overshooting the bound. Never zero.
        block.weight() + 64
    }
}

/// A shard should hold many blocks, or blocks larger than a shard could never be
/// cached: this many default-size blocks at least per shard.
const MIN_SHARD_BYTES: u64 = 64 * 16 * 1024;
const MAX_SHARDS: u64 = 16;

pub(crate) struct BlockCache {
    /// `None` when the capacity is zero: every read goes to the file.
    cache: Option<Cache<BlockKey, Arc<DataBlock>, BlockWeighter>>,
    capacity_bytes: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("capacity_bytes", &self.capacity_bytes)
            .field("weight", &self.weight())
            .field("hits", &self.hits())
            .field("misses", &self.misses())
            .finish()
    }
}

impl BlockCache {
    /// A cache of at most `capacity_bytes` (0: no caching).
    pub(crate) fn new(capacity_bytes: u64) -> Self {
        let cache = (capacity_bytes > 0).then(|| {
            let shards = (capacity_bytes / MIN_SHARD_BYTES).clamp(1, MAX_SHARDS);
            // A power of two at most `shards`: the builder rounds up, and rounding
            // up would only make shards smaller.
            let shards = 1u64 << (63 - shards.leading_zeros());
            let options = OptionsBuilder::new()
                .weight_capacity(capacity_bytes)
                .estimated_items_capacity((capacity_bytes / (16 * 1024)).max(16) as usize)
                .shards(shards as usize)
                .build();
            match options {
                Ok(o) => {
                    Cache::with_options(o, BlockWeighter, Default::default(), Default::default())
                }
                // Only a missing capacity fails the builder, and it is set above.
                Err(_) => unreachable!("quick_cache options with a capacity build"),
            }
        });
        Self {
            cache,
            capacity_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub(crate) fn get(&self, key: BlockKey) -> Option<Arc<DataBlock>> {
        let found = self.cache.as_ref().and_then(|c| c.get(&key));
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Caches `block` unless it alone is larger than a shard.
    pub(crate) fn insert(&self, key: BlockKey, block: Arc<DataBlock>) {
        if let Some(c) = &self.cache {
            c.insert(key, block);
            debug_assert!(
                c.weight() <= self.capacity_bytes,
                "cache over its byte bound"
            );
        }
    }

    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Bytes held now (at most `capacity_bytes`).
    pub(crate) fn weight(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.weight())
    }

    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub(crate) fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
}
