//! Per-chunk locks of one target.
//!
//! CRAQ serialises the updates of one chunk at every replica: a write holds
//! its chunk's lock from the local pending write until its commit, and a
//! resync transfer holds it while it reads and sends the chunk. Writes to
//! other chunks go on meanwhile. Entries exist only while somebody holds or
//! waits for the lock, so the map stays as small as the number of chunks in
//! flight.

use std::collections::BTreeMap;
use std::sync::Arc;

use flyfs_proto::ids::ChunkId;
use parking_lot::Mutex;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Debug, Default)]
pub(crate) struct ChunkLocks {
    map: Arc<Mutex<BTreeMap<ChunkId, Arc<AsyncMutex<()>>>>>,
}

/// Holds one chunk's lock; dropping it releases the lock and forgets the
/// entry when nobody else waits for it.
#[derive(Debug)]
pub(crate) struct ChunkGuard {
    chunk: ChunkId,
    guard: Option<OwnedMutexGuard<()>>,
    map: Arc<Mutex<BTreeMap<ChunkId, Arc<AsyncMutex<()>>>>>,
}

impl ChunkLocks {
    pub async fn lock(&self, chunk: ChunkId) -> ChunkGuard {
        let lock = self.map.lock().entry(chunk).or_default().clone();
        let guard = lock.lock_owned().await;
        ChunkGuard {
            chunk,
            guard: Some(guard),
            map: self.map.clone(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().len()
    }
}

impl Drop for ChunkGuard {
    fn drop(&mut self) {
        let mut map = self.map.lock();
        drop(self.guard.take());
        // The map's own reference plus none other: nobody holds or waits.
        if map
            .get(&self.chunk)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            map.remove(&self.chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_holder_per_chunk_and_entries_are_forgotten() {
        let locks = Arc::new(ChunkLocks::default());
        let a = ChunkId::new(1, 0);
        let guard = locks.lock(a).await;
        // Another chunk is independent.
        drop(locks.lock(ChunkId::new(1, 1)).await);
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { drop(locks.lock(a).await) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "a second holder got the lock");
        drop(guard);
        waiter.await.expect("waiter panicked");
        assert_eq!(locks.len(), 0);
    }
}
