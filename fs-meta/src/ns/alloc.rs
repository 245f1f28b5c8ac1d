//! The inode id allocator: 32 counter shards in the KV store, each handing
//! out batches of 4096 ids, as 3FS does.
//!
//! A single counter key would make every create in the cluster conflict
//! with every other. Instead an instance takes a whole batch in its own small
//! transaction (from the shards in turn) and hands ids out of memory; two
//! instances only conflict when they take a batch from the same shard at the
//! same moment, and that transaction is tiny to retry. Ids taken but never
//! used (a failed create, an instance that stops) are simply lost: 64 bits
//! are plenty.
//!
//! Batch `b` of shard `s` is global batch `g = b * 32 + s + 1` and holds ids
//! `g * 4096 .. (g + 1) * 4096`. Global batch 0 (ids below 4096) is never
//! handed out: 0 means "no inode", 1 is the root, the rest are reserved.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use flyfs_proto::ids::InodeId;

use crate::ns::NsError;
use crate::schema::{FIRST_ALLOCATED_ID, alloc_key, decode_alloc, encode_alloc};
use flyfs_kv::{Kv, RetryOptions, Transaction};

/// Counter shards.
pub const ALLOC_SHARDS: u8 = 32;
/// Ids per batch.
pub const ALLOC_BATCH: u64 = 4096;

const _: () = assert!(FIRST_ALLOCATED_ID == ALLOC_BATCH);

/// Which shard handed out `ino`, and as which of its batches: `None` for the
/// reserved ids below [`FIRST_ALLOCATED_ID`]. `check` uses it to prove that
/// every inode's id came out of a batch its shard has recorded.
pub fn batch_of(ino: InodeId) -> Option<(u8, u64)> {
    let global = (ino.0 / ALLOC_BATCH).checked_sub(1)?;
    let shard = (global % u64::from(ALLOC_SHARDS)) as u8;
    Some((shard, global / u64::from(ALLOC_SHARDS)))
}

/// The first id of batch `batch` of `shard`, or `None` past the id space.
fn batch_start(shard: u8, batch: u64) -> Option<u64> {
    batch
        .checked_mul(u64::from(ALLOC_SHARDS))?
        .checked_add(u64::from(shard) + 1)?
        .checked_mul(ALLOC_BATCH)
        // The whole batch must fit, not only its first id.
        .filter(|start| start.checked_add(ALLOC_BATCH).is_some())
}

/// One instance's allocator: the ids of the batches it holds.
#[derive(Debug)]
pub(crate) struct InodeAllocator {
    pool: Mutex<Vec<Range<u64>>>,
    next_shard: AtomicU32,
}

impl InodeAllocator {
    /// `seed` picks the first shard, so that instances started together do
    /// not all go for shard 0.
    pub(crate) fn new(seed: u32) -> InodeAllocator {
        InodeAllocator {
            pool: Mutex::new(Vec::new()),
            next_shard: AtomicU32::new(seed),
        }
    }

    fn take(&self) -> Option<InodeId> {
        // A poisoned pool only means a panic elsewhere between two Vec
        // operations; the ranges in it are still valid and unused.
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let range = pool.last_mut()?;
            match range.next() {
                Some(id) => return Some(InodeId(id)),
                None => {
                    pool.pop();
                }
            }
        }
    }

    /// A fresh inode id, taking a new batch from the store when the ones in
    /// memory are used up.
    pub(crate) async fn allocate<K: Kv>(
        &self,
        store: &K,
        retry: &RetryOptions,
    ) -> Result<InodeId, NsError> {
        if let Some(id) = self.take() {
            return Ok(id);
        }
        let shard =
            (self.next_shard.fetch_add(1, Ordering::Relaxed) % u32::from(ALLOC_SHARDS)) as u8;
        let start = flyfs_kv::run(store, retry, |tx| async move {
            let key = alloc_key(shard);
            let next = match tx.get(&key, false).await? {
                Some(value) => decode_alloc(&key, &value)?,
                None => 0,
            };
            let start = batch_start(shard, next)
                .ok_or_else(|| NsError::NoSpace(format!("inode id shard {shard} is exhausted")))?;
            tx.set(&key, &encode_alloc(next + 1)?)?;
            Ok::<u64, NsError>(start)
        })
        .await?;
        debug_assert!(start >= FIRST_ALLOCATED_ID && start % ALLOC_BATCH == 0);
        // Hand out the first id now and keep the rest. Another task may have
        // refilled the pool meanwhile; both batches are kept.
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(start + 1..start + ALLOC_BATCH);
        Ok(InodeId(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_tile_the_id_space_without_overlap() {
        assert_eq!(batch_start(0, 0), Some(4096));
        assert_eq!(batch_start(31, 0), Some(32 * 4096));
        assert_eq!(batch_start(0, 1), Some(33 * 4096));
        for shard in [0u8, 5, 31] {
            for batch in [0u64, 1, 1000] {
                let start = batch_start(shard, batch).expect("in range");
                assert_eq!(batch_of(InodeId(start)), Some((shard, batch)));
                assert_eq!(
                    batch_of(InodeId(start + ALLOC_BATCH - 1)),
                    Some((shard, batch))
                );
            }
        }
        assert_eq!(batch_of(InodeId(1)), None);
        assert_eq!(batch_of(InodeId(4095)), None);
        assert_eq!(batch_start(0, u64::MAX / 32), None);
    }
}
