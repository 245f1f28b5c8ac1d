//! The garbage-collection worker: reclaims the data of removed files and
//! trees in the background, after the configured delay.
//!
//! It drives the namespace's GC queue protocol (see `ns/gc.rs`): expand
//! detached directories into their entries, skip files that still have a
//! write session (postponing them), delete a ready file's chunks on storage,
//! then delete its inode. Before it acts on the entries of a scan it waits
//! until the removes that queued them are durable. Every step is idempotent
//! and committed on its own, so a worker killed at any point leaves work the
//! next one finishes, and several metadata instances may run workers at once
//! (they may repeat a chunk removal, which is harmless).
//!
//! [`KvEvictor`] is the KV cache's collector beside it: on the same
//! schedule it evicts blocks past the cache's age limit and takes back the
//! slots of writers that never committed, so a cache ages out even when no
//! client is running (clients may ask too: `KvEvict`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use flyfs_client::storage::StorageClient;
use flyfs_proto::wire::meta::{KV_BATCH_MAX, KvEvictRsp};
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
    /// How often a scan starts at the queue's head rather than where the
    /// last one left off (see [`GcWorker`]).
    pub full_scan: Duration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            interval: Duration::from_secs(1),
            batch: 256,
            busy_retry: Duration::from_secs(30),
            full_scan: Duration::from_secs(60),
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
///
/// A scan starts where the last one left off (the due time of the first
/// entry it failed, of the last one it took from a full batch, or the time
/// of a scan that saw every entry due, and at most the store's transaction
/// age limit before that scan's time), not at the queue's head:
/// the entries already finished lie at the head as deletions until the
/// store compacts them away, and a scan from there walks all of them, so a
/// burst of a million removals made every scan of an idle worker, once a
/// second, read a million dead keys. A remove reads the clock for its
/// entry's due time inside its transaction, which commits within the age
/// limit or not at all, so with one clock (and any delay, zero included) no
/// entry lands behind that point. One can only when one metadata service's
/// clock is behind another's by more than the delay and the limit, or
/// steps back; every `full_scan` the worker starts at the head again and
/// finds those too, so they are at most that late.
pub struct GcWorker<K: Kv, N: Network> {
    ns: Namespace<K>,
    storage: Arc<StorageClient<N>>,
    config: GcConfig,
    stats: Arc<GcStats>,
    resume: Mutex<Resume>,
}

/// Where the next scan starts, and when the last one from the head ran.
#[derive(Debug, Default)]
struct Resume {
    from_ms: u64,
    full_scan_ms: Option<u64>,
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
            resume: Mutex::new(Resume::default()),
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
        let now_ms = self.now_ms();
        let from_ms = {
            let mut resume = self.resume.lock();
            let full_scan_ms = u64::try_from(self.config.full_scan.as_millis()).unwrap_or(u64::MAX);
            match resume.full_scan_ms {
                Some(at) if now_ms.saturating_sub(at) < full_scan_ms => resume.from_ms,
                _ => {
                    resume.full_scan_ms = Some(now_ms);
                    0
                }
            }
        };
        let due = self
            .ns
            .gc_due_from(from_ms, now_ms, self.config.batch)
            .await?;
        let taken = due.len();
        // The next scan starts at the first entry left behind; else, after
        // a full batch, at the last one taken (its millisecond may hold
        // more); else at now, since every entry due by now was seen. But
        // never later than now less the store's transaction age limit: a
        // remove that committed after this scan's snapshot read its clock
        // (due = clock + delay) within that limit of committing, so nothing
        // it queued lies further back, even with a delay of zero.
        let slack_ms = u64::try_from(self.ns.kv().limits().transaction_age_max.as_millis())
            .unwrap_or(u64::MAX);
        let mut next_ms = match due.last() {
            Some(last) if taken >= self.config.batch => last.due_ms,
            _ => now_ms,
        }
        .min(now_ms.saturating_sub(slack_ms));
        // The removes that queued these entries may not be durable yet
        // (`Namespace::relax`): a crash losing one after its chunks were
        // deleted would bring back a file without its data.
        if taken > 0 {
            self.ns.sync().await?;
        }
        for item in due {
            if let Err(e) = self.collect(&item).await {
                tracing::warn!(ino = ?item.ino, "GC of the entry failed, retrying later: {e}");
                next_ms = next_ms.min(item.due_ms);
            }
        }
        self.resume.lock().from_ms = next_ms;
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
                        queries: None,
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

/// What the KV evictor has done, for tests and metrics.
#[derive(Debug, Default)]
pub struct KvEvictStats {
    scans: AtomicU64,
    evicted: AtomicU64,
    reclaimed: AtomicU64,
}

impl KvEvictStats {
    /// Scans finished (with or without work).
    pub fn scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }

    /// Blocks evicted for age.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Reservations whose writers never committed, taken back.
    pub fn reclaimed(&self) -> u64 {
        self.reclaimed.load(Ordering::Relaxed)
    }
}

/// The KV cache's scheduled eviction (docs/kv-cache.md, "Eviction"). Run
/// [`KvEvictor::run`] on a task; dropping the task stops it. Several
/// metadata instances may run one each: every eviction is one transaction
/// that re-reads what it evicts.
#[derive(Debug)]
pub struct KvEvictor<K: Kv> {
    ns: Namespace<K>,
    interval: Duration,
    stats: Arc<KvEvictStats>,
}

impl<K: Kv> KvEvictor<K> {
    pub fn new(ns: Namespace<K>, interval: Duration) -> KvEvictor<K> {
        KvEvictor {
            ns,
            interval,
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<KvEvictStats> {
        self.stats.clone()
    }

    /// Scans forever, every `interval`.
    pub async fn run(self) {
        loop {
            if let Err(e) = self.evict_once().await {
                tracing::warn!("KV cache eviction failed, retrying later: {e}");
            }
            self.stats.scans.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.interval).await;
        }
    }

    /// Evicts everything due now, in batches; a cluster without a KV cache
    /// has nothing to do.
    pub async fn evict_once(&self) -> Result<KvEvictRsp, NsError> {
        let mut total = KvEvictRsp::default();
        loop {
            let rsp = match self.ns.kv_evict(KV_BATCH_MAX as u32).await {
                Ok(rsp) => rsp,
                Err(NsError::NotFound(_)) => return Ok(total),
                Err(e) => return Err(e),
            };
            total.evicted += rsp.evicted;
            total.reclaimed += rsp.reclaimed;
            self.stats
                .evicted
                .fetch_add(u64::from(rsp.evicted), Ordering::Relaxed);
            self.stats
                .reclaimed
                .fetch_add(u64::from(rsp.reclaimed), Ordering::Relaxed);
            if !rsp.more {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use flyfs_proto::ids::ChainTableId;
    use flyfs_proto::wire::meta::{KvClassSpec, KvCommitItem, KvEntry, KvOpenReq};

    use super::*;
    use crate::ns::tests::namespace_on_clock;
    use crate::schema::ROOT;
    use flyfs_client::storage::ClientConfig;
    use flyfs_proto::ids::ClientId;
    use flyfs_proto::wire::meta::User;
    use flyfs_rpc::{Tcp, testing};
    use flyfs_time::Clock;

    #[tokio::test]
    async fn scans_resume_where_the_last_left_off_and_start_over_at_the_head_every_full_scan() {
        let (ns, clock) = namespace_on_clock(1_700_000_000_000_000_000, |config| {
            config.gc_delay_ms = 1_000;
        })
        .await;
        // Directories have no chunks: collecting them never reaches
        // storage, so the storage client needs no cluster.
        let storage = StorageClient::new(
            ClientConfig::new(["127.0.0.1:1".to_string()], ClientId(9)),
            Tcp,
            testing::meta(),
        );
        let stats = Arc::new(GcStats::default());
        let gc = GcWorker::new(
            ns.clone(),
            storage,
            GcConfig {
                batch: 4,
                full_scan: Duration::from_secs(60),
                ..GcConfig::default()
            },
            stats.clone(),
        );
        let root = User::root();
        // Queues the named directories for collection by removes whose
        // clock reads `behind_ms` behind the scans'.
        let queue = |behind_ms: i64, names: std::ops::Range<u32>| {
            let ns = ns.clone();
            let root = root.clone();
            let clock = clock.clone();
            async move {
                clock.advance_ms(-behind_ms);
                for i in names {
                    let name = format!("d{i}");
                    ns.mkdir(&root, ROOT, name.as_bytes(), 0o755)
                        .await
                        .expect("mkdir");
                    ns.remove_all(&root, ROOT, name.as_bytes())
                        .await
                        .expect("remove_all");
                }
                clock.advance_ms(behind_ms);
            }
        };
        queue(0, 0..10).await;
        assert_eq!(gc.scan_once().await.expect("scan"), 0, "not due yet");
        clock.advance_ms(1_000);
        // Full batches, then the rest.
        assert_eq!(gc.scan_once().await.expect("scan"), 4);
        assert_eq!(gc.scan_once().await.expect("scan"), 4);
        // Twenty-nine seconds on, the rest: a scan that sees every entry
        // due resumes at its own time less the transaction age limit (5 s),
        // far past the last entry it took.
        clock.advance_ms(29_000);
        assert_eq!(gc.scan_once().await.expect("scan"), 2);
        assert_eq!(stats.inodes_finished(), 10);
        // A remove whose clock read 3 s behind that scan's (a transaction
        // that committed just after it) is within the age limit: taken.
        queue(3_000, 10..11).await;
        assert_eq!(
            gc.scan_once().await.expect("scan"),
            1,
            "within the age limit"
        );
        // One whose clock is 20 s behind (another metadata service's clock,
        // slow by more than the delay and the limit) queues an entry, due
        // long after the last one taken before, behind where scans now
        // start: they pass it by...
        queue(20_000, 11..12).await;
        assert_eq!(
            gc.scan_once().await.expect("scan"),
            0,
            "behind the resume point"
        );
        assert_eq!(ns.gc_due(clock.now_ms(), 100).await.expect("due").len(), 1);
        // ...until a full scan, at most `full_scan` later, starts at the head.
        clock.advance_ms(60_000);
        assert_eq!(gc.scan_once().await.expect("scan"), 1);
        assert_eq!(stats.inodes_finished(), 12);
        assert!(ns.gc_due(u64::MAX, 100).await.expect("due").is_empty());
        let report = ns.check().await.expect("check");
        assert!(report.is_clean(), "{report}");
    }

    #[tokio::test]
    async fn the_evictor_ages_blocks_out_with_no_client_asking() {
        let (ns, clock) = namespace_on_clock(1_700_000_000_000_000_000, |_| {}).await;
        let evictor = KvEvictor::new(ns.clone(), Duration::from_millis(5));
        // No cache yet: nothing to do, and no error.
        assert_eq!(evictor.evict_once().await.expect("no cache").evicted, 0);
        ns.kv_open(&KvOpenReq {
            classes: vec![KvClassSpec {
                slot_bytes: 64 << 10,
                slots: 16,
            }],
            chain_table: ChainTableId(1),
            max_age_ms: 60_000,
            access_bucket_ms: 1_000,
            reservation_ms: 30_000,
        })
        .await
        .expect("open");
        let grants = ns.kv_reserve(0, 4, false).await.expect("reserve");
        let items: Vec<KvCommitItem> = grants
            .slots
            .iter()
            .enumerate()
            .map(|(i, g)| KvCommitItem {
                key: vec![b'k', i as u8],
                entry: KvEntry {
                    class: 0,
                    slot: g.slot,
                    generation: g.generation,
                    length: 1,
                    crc: 0,
                },
            })
            .collect();
        ns.kv_commit(&items).await.expect("commit");
        let keys: Vec<Vec<u8>> = items.iter().map(|i| i.key.clone()).collect();
        let stats = evictor.stats();
        let task = tokio::spawn(evictor.run());
        let wait = |what: &'static str, done: Box<dyn Fn() -> bool + Send>| async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !done() {
                assert!(tokio::time::Instant::now() < deadline, "waiting for {what}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        // Younger than the limit: two scans later, every block stays.
        clock.advance_ms(30_000);
        let scanned = stats.scans();
        let s = stats.clone();
        wait("two scans", Box::new(move || s.scans() >= scanned + 2)).await;
        assert_eq!(stats.evicted(), 0, "blocks younger than the age limit stay");
        // Past it: the scheduled scans evict every one, nobody asking (a
        // lookup would count as a read and keep them young).
        clock.advance_ms(31_000);
        let s = stats.clone();
        wait(
            "the aged blocks evicted",
            Box::new(move || s.evicted() >= 4),
        )
        .await;
        assert_eq!(stats.evicted(), 4);
        assert!(
            ns.kv_lookup(&keys)
                .await
                .expect("lookup")
                .iter()
                .all(Option::is_none),
            "evicted blocks are gone from the index"
        );
        task.abort();
        let report = ns.check().await.expect("check");
        assert!(report.is_clean(), "{report}");
    }
}
