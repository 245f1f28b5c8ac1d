//! The garbage-collection worker: reclaims the data of removed files and
//! trees in the background, after the configured delay.
//!
//! It drives the namespace's GC queue protocol (see `ns/gc.rs`): expand
//! detached directories into their entries, skip files that still have a
//! write session (postponing them), delete a ready file's chunks on storage,
//! then delete its inode. Every step is idempotent and committed on its own,
//! so a worker killed at any point leaves work the next one finishes, and
//! several metadata instances may run workers at once (they may repeat a
//! chunk removal, which is harmless).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flyfs_client::storage::StorageClient;
use flyfs_rpc::Network;

use crate::data::FileChunks;
use crate::ns::{GcFinish, GcItem, GcKind, Namespace, NsError};
use flyfs_kv::Kv;

/// How the worker paces itself.
#[derive(Clone, Debug)]
pub struct GcConfig {
    /// Between scans of the queue when it had nothing due.
    pub interval: Duration,
    /// Queue entries taken per scan.
    pub batch: usize,
    /// How far a file with a live write session is postponed.
    pub busy_retry: Duration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            interval: Duration::from_secs(1),
            batch: 256,
            busy_retry: Duration::from_secs(30),
        }
    }
}

/// What the worker has done, for `flyfs admin gc` and metrics.
#[derive(Debug, Default)]
pub struct GcStats {
    chunks_removed: AtomicU64,
    inodes_finished: AtomicU64,
}

impl GcStats {
    pub fn chunks_removed(&self) -> u64 {
        self.chunks_removed.load(Ordering::Relaxed)
    }

    pub fn inodes_finished(&self) -> u64 {
        self.inodes_finished.load(Ordering::Relaxed)
    }
}

/// Why one GC step failed; the worker logs it and tries again later.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Namespace(#[from] NsError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

/// The worker. Run [`GcWorker::run`] on a task; dropping the task stops it.
pub struct GcWorker<K: Kv, N: Network> {
    ns: Namespace<K>,
    storage: Arc<StorageClient<N>>,
    config: GcConfig,
    stats: Arc<GcStats>,
}

impl<K: Kv, N: Network> std::fmt::Debug for GcWorker<K, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcWorker")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<K: Kv, N: Network> GcWorker<K, N> {
    pub fn new(
        ns: Namespace<K>,
        storage: Arc<StorageClient<N>>,
        config: GcConfig,
        stats: Arc<GcStats>,
    ) -> GcWorker<K, N> {
        GcWorker {
            ns,
            storage,
            config,
            stats,
        }
    }

    fn now_ms(&self) -> u64 {
        self.ns.config().clock.now_ms()
    }

    /// Scans forever.
    pub async fn run(self) {
        loop {
            match self.scan_once().await {
                // A full batch: more may be due right away.
                Ok(done) if done >= self.config.batch => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!("GC scan failed, retrying later: {e}"),
            }
            tokio::time::sleep(self.config.interval).await;
        }
    }

    /// Handles every entry due now (up to a batch); returns how many it took.
    pub async fn scan_once(&self) -> Result<usize, GcError> {
        let due = self.ns.gc_due(self.now_ms(), self.config.batch).await?;
        let taken = due.len();
        for item in due {
            if let Err(e) = self.collect(&item).await {
                tracing::warn!(ino = ?item.ino, "GC of the entry failed, retrying later: {e}");
            }
        }
        Ok(taken)
    }

    async fn collect(&self, item: &GcItem) -> Result<(), GcError> {
        match item.kind {
            GcKind::Directory => loop {
                let expanded = self.ns.gc_expand(item).await?;
                if expanded.finished {
                    self.stats.inodes_finished.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            },
            GcKind::File => {
                if !self.ns.gc_file_ready(item.ino).await? {
                    let later = self.now_ms() + self.config.busy_retry.as_millis() as u64;
                    tracing::debug!(ino = ?item.ino, "file still has a writer; GC postponed");
                    self.ns.gc_postpone(item.ino, later).await?;
                    return Ok(());
                }
                if let Some(layout) = &item.layout {
                    let removed = FileChunks {
                        storage: &self.storage,
                        ino: item.ino,
                        layout,
                    }
                    .delete()
                    .await?;
                    self.stats
                        .chunks_removed
                        .fetch_add(removed, Ordering::Relaxed);
                }
                match self.ns.gc_finish(item.ino).await? {
                    GcFinish::Deleted => {
                        self.stats.inodes_finished.fetch_add(1, Ordering::Relaxed);
                    }
                    GcFinish::AlreadyGone => {}
                    // Cannot follow a ready check (a queued file takes no
                    // new sessions); if it ever did, the entry stays queued.
                    GcFinish::Busy => {
                        tracing::warn!(ino = ?item.ino, "queued file gained a write session");
                    }
                }
                Ok(())
            }
        }
    }
}
