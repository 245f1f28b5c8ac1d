//! Helpers shared by the namespace tests: a namespace on a given store with a
//! hand-driven clock, the test users, and a GC worker that runs the queue
//! protocol to completion.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;

use bytes::Bytes;
use flyfs_fs_meta::ns::{
    GcFinish, GcKind, LayoutSpec, Namespace, NsConfig, NsError, StaticChainTables,
};
use flyfs_kv::{Kv, KvError, Limits, RangeOptions, RangeResult, Transaction};
use flyfs_proto::ids::ChainTableId;
use flyfs_proto::wire::meta::User;
use flyfs_time::ManualClock;

pub const GC_DELAY_MS: u64 = 1000;
/// 2023-11-14, in ns: any fixed time will do.
pub const START_NS: i64 = 1_700_000_000_000_000_000;

pub fn root_layout() -> LayoutSpec {
    LayoutSpec {
        chain_table: ChainTableId(1),
        chunk_size: 1 << 20,
        stripe: 2,
    }
}

/// A config with 8 chains in table 1, a manual clock, a 1 s GC delay and a
/// small GC batch (so that expansion takes several transactions).
pub fn config(clock: Arc<ManualClock>) -> NsConfig {
    let mut config = NsConfig::new(
        root_layout(),
        Arc::new(StaticChainTables::single(ChainTableId(1), 8)),
    );
    config.clock = clock;
    config.gc_delay_ms = GC_DELAY_MS;
    config.gc_batch = 3;
    config
}

pub async fn open<K: Kv>(kv: K) -> (Namespace<K>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(START_NS));
    let ns = Namespace::open(kv, config(clock.clone()))
        .await
        .expect("open the namespace");
    (ns, clock)
}

pub fn root() -> User {
    User::root()
}

/// alice and bob share group 100; carol's primary group is 100.
pub fn users() -> Vec<User> {
    vec![
        User::root(),
        User::new(1000, 1000, vec![100]),
        User::new(1001, 1001, vec![100]),
        User::new(1002, 100, vec![]),
    ]
}

/// Runs the GC worker's loop until nothing more can be collected: expands
/// every due directory, finishes every due file without write sessions.
/// Returns how many files it deleted.
pub async fn run_gc<K: Kv>(ns: &Namespace<K>, now_ms: u64) -> Result<usize, NsError> {
    let mut deleted = 0;
    loop {
        let mut progress = false;
        for item in ns.gc_due(now_ms, 10_000).await? {
            match item.kind {
                GcKind::Directory => {
                    let expanded = ns.gc_expand(&item).await?;
                    assert!(expanded.finished);
                    progress = true;
                }
                GcKind::File => {
                    if ns.gc_file_ready(item.ino).await? {
                        // (Here the real worker deletes the chunks.)
                        match ns.gc_finish(item.ino).await? {
                            GcFinish::Deleted => {
                                deleted += 1;
                                progress = true;
                            }
                            GcFinish::AlreadyGone => progress = true,
                            GcFinish::Busy => {}
                        }
                    }
                }
            }
        }
        if !progress {
            return Ok(deleted);
        }
    }
}

/// `check()` must come back clean; panics with the report otherwise.
pub async fn assert_clean<K: Kv>(ns: &Namespace<K>) -> flyfs_fs_meta::ns::CheckReport {
    let report = ns.check().await.expect("check runs");
    assert!(report.is_clean(), "check found problems: {report}");
    report
}

/// A store wrapper that yields to the scheduler before every read and
/// commit. `MemKv`'s futures are ready at once, so without it a transaction
/// runs start to finish without letting another task in, and races between
/// transactions happen only across threads; with it, every read is a point
/// where others interleave, as with a real store across the network.
#[derive(Clone, Debug)]
pub struct Yielding<K>(pub K);

#[derive(Clone, Debug)]
pub struct YieldingTx<T>(T);

impl<K: Kv> Kv for Yielding<K> {
    type Tx = YieldingTx<K::Tx>;

    fn begin(&self) -> Result<Self::Tx, KvError> {
        Ok(YieldingTx(self.0.begin()?))
    }

    fn begin_read_only(&self) -> Result<Self::Tx, KvError> {
        Ok(YieldingTx(self.0.begin_read_only()?))
    }

    fn limits(&self) -> Limits {
        self.0.limits()
    }

    async fn sync(&self) -> Result<(), KvError> {
        self.0.sync().await
    }
}

impl<T: Transaction> Transaction for YieldingTx<T> {
    fn serial(&self) -> u64 {
        self.0.serial()
    }

    async fn get(&self, key: &[u8], snapshot: bool) -> Result<Option<Bytes>, KvError> {
        tokio::task::yield_now().await;
        self.0.get(key, snapshot).await
    }

    async fn get_range(&self, options: &RangeOptions) -> Result<RangeResult, KvError> {
        tokio::task::yield_now().await;
        self.0.get_range(options).await
    }

    fn set(&self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.0.set(key, value)
    }

    fn clear(&self, key: &[u8]) -> Result<(), KvError> {
        self.0.clear(key)
    }

    fn clear_range(&self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.0.clear_range(begin, end)
    }

    fn add_read_conflict_range(&self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.0.add_read_conflict_range(begin, end)
    }

    fn relax_durability(&self) {
        self.0.relax_durability()
    }

    async fn commit(&self) -> Result<(), KvError> {
        tokio::task::yield_now().await;
        self.0.commit().await
    }
}
