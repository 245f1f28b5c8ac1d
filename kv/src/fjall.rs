//! `FjallKv`: the embedded, durable default backend, on fjall's
//! `OptimisticTxDatabase` (an LSM tree with a write-ahead journal and
//! serializable optimistic transactions).
//!
//! How the [`Transaction`] operations map onto fjall:
//! * Each transaction opens a fjall write transaction (whose snapshot and
//!   conflict tracking decide the commit) and then a fjall `Snapshot`
//!   (which serves every read). fjall's write transaction registers a read
//!   conflict for every read made through it, over the whole range asked
//!   for before a single key is returned, and offers no untracked read; so
//!   all reads go to the plain snapshot, with this transaction's buffered
//!   writes laid over it (`overlay.rs`), and only the conflicts our contract
//!   asks for are registered, at commit, by opening (and dropping) range
//!   iterators on the write transaction: serializable point reads, the part
//!   of a range actually read, explicit conflict ranges. Snapshot reads
//!   register nothing.
//! * The two snapshots are not taken atomically (fjall exposes no way to),
//!   so a commit may land between them. The write transaction's is taken
//!   first, so it is never newer than the one reads see: conflicts are then
//!   checked from an earlier version than was read, which can only add a
//!   spurious conflict in that window, never miss one.
//! * `clear_range` is buffered; at commit the keys the snapshot holds in the
//!   range are removed one by one, and the range is registered as read:
//!   a key another transaction inserts into it after our snapshot would
//!   otherwise survive the clear, so such an insert makes this commit
//!   conflict and retry. (FoundationDB clears the range blindly; this is
//!   stricter, never weaker.)
//! * Commit runs on tokio's blocking pool: fjall's commit takes locks,
//!   writes the journal and may stall for write backpressure, and the
//!   fsync takes milliseconds. fjall holds its journal's writer lock while
//!   writing a commit's batch and also through its own fsync (`persist`),
//!   so with fjall's fsyncs every commit would wait out the previous one's.
//!   Instead each commit writes its batch to the OS (`PersistMode::Buffer`)
//!   and then waits in a group-commit gate (`SyncGate`), which fsyncs the
//!   active journal file through a descriptor of its own: one fsync covers
//!   every commit written before it started, and commits go on writing
//!   while it runs, so concurrent commits share fsyncs. A commit is visible to
//!   other transactions a moment before it is durable. A read-write
//!   transaction that read it commits later in the same journal, so cannot
//!   become durable without it; but a read-only transaction may see a
//!   commit that a crash in that moment then loses (its writer was never
//!   told it succeeded).
//! * A transaction may relax its durability
//!   ([`Transaction::relax_durability`]): its commit returns once written
//!   to the OS, without waiting in the gate. It is made durable by the next
//!   fsync, a durable commit's or, if none comes within
//!   [`FjallOptions::relaxed_within`], one the syncer thread makes. Those
//!   fsyncs cover the whole journal, so what survives a crash is always a
//!   prefix of the commits in journal order: a durable commit never
//!   survives without the relaxed ones before it.
//! * Reads run inline on the async task: they are memtable or block-cache
//!   lookups (an SST block read through the page cache at worst), taking
//!   microseconds, less than a hop to the blocking pool would cost.
//!
//! On disk: one fjall database directory holding one keyspace named
//! [`KEYSPACE`]. A flyfs key `k` is stored as the byte 0x01 followed by `k`
//! (fjall refuses empty keys, which FoundationDB and our contract allow;
//! the tag byte keeps bytewise order). Keys tagged 0x00 belong to the store
//! itself: `0x00 "format"` holds the format version, [`FORMAT_VERSION`].
//! Values are stored as they are. See docs/metadata-kv.md.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ::fjall::{
    Guard, KeyspaceCreateOptions, OptimisticTxDatabase, OptimisticTxKeyspace, OptimisticWriteTx,
    PersistMode, Readable, Snapshot,
};
use bytes::Bytes;
use tokio::time::Instant;

use crate::overlay::{self, Lookup, RangeSet, WriteSet};
use crate::{Kv, KvError, Limits, RangeOptions, RangeResult, Transaction, key_after};

/// The fjall keyspace holding every flyfs metadata key.
pub const KEYSPACE: &str = "meta";

/// The on-disk format this code reads and writes, stored under
/// `FORMAT_KEY` when a store is created.
pub const FORMAT_VERSION: &[u8] = b"1";

/// Where the format version lives (outside the flyfs key space).
const FORMAT_KEY: &[u8] = b"\x00format";

/// The tag byte in front of every flyfs key.
const USER_TAG: u8 = 0x01;

/// The stored form of flyfs key `key`.
fn stored(key: &[u8]) -> Vec<u8> {
    let mut tagged = Vec::with_capacity(key.len() + 1);
    tagged.push(USER_TAG);
    tagged.extend_from_slice(key);
    tagged
}

/// The flyfs key a stored key holds, refusing (rather than panicking on)
/// a key without the tag, which only a corrupt store could return here.
fn user_key(stored: &[u8]) -> Result<Bytes, KvError> {
    match stored.split_first() {
        Some((&USER_TAG, key)) => Ok(Bytes::copy_from_slice(key)),
        _ => Err(KvError::Backend {
            backend: "fjall",
            message: format!("stored key {stored:?} lacks the flyfs key tag: corrupt store?"),
            retryable: false,
            source: None,
        }),
    }
}

/// How to open a [`FjallKv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FjallOptions {
    /// fsync the journal before a commit returns (default). Without it a
    /// commit survives a process crash but not a power cut.
    pub sync_on_commit: bool,
    /// With `sync_on_commit`: how soon a commit whose durability was
    /// relaxed ([`Transaction::relax_durability`]) is made durable when no
    /// durable commit's fsync has covered it by then.
    pub relaxed_within: Duration,
    pub limits: Limits,
}

impl Default for FjallOptions {
    fn default() -> Self {
        FjallOptions {
            sync_on_commit: true,
            relaxed_within: Duration::from_millis(10),
            limits: Limits::default(),
        }
    }
}

/// Counts since a [`FjallKv`] was opened, with `sync_on_commit`: commits
/// that wrote (each takes a ticket in the group commit), how many of them
/// relaxed their durability, the journal fsyncs that made them durable,
/// and those fsyncs' time in all. Commits per fsync say how well commits
/// share them; time per fsync is the disk's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub commits: u64,
    pub relaxed_commits: u64,
    pub syncs: u64,
    pub sync_time: Duration,
    /// A relaxed commit is not durable yet.
    pub relaxed_pending: bool,
}

/// A durable transactional store in one directory. Clones share it.
#[derive(Clone)]
pub struct FjallKv {
    shared: Arc<Shared>,
}

struct Shared {
    db: OptimisticTxDatabase,
    keyspace: OptimisticTxKeyspace,
    options: FjallOptions,
    sync_gate: Arc<SyncGate>,
    /// The thread making relaxed commits durable (with `sync_on_commit`).
    syncer: Option<JoinHandle<()>>,
    path: PathBuf,
    /// Transactions begun: the next one's serial number.
    begun: AtomicU64,
}

/// fjall holds a committer back (in the commit, on its thread) from 20
/// level-0 runs on (a spin of up to 90,000 steps, then 10 ms sleeps from 30)
/// and while 4 sealed memtables wait to be flushed (100 ms sleeps). A commit
/// that may meet either goes to the blocking pool; these margins keep the
/// commits racing past the check short of them.
const INLINE_L0_RUNS_MAX: usize = 16;
const INLINE_SEALED_MEMTABLES_MAX: usize = 2;

impl Shared {
    /// Whether a commit now might be held back by fjall's write stalls.
    fn holding_back(&self) -> bool {
        use ::fjall::AbstractTree;
        let keyspace = self.keyspace.inner();
        keyspace.tree.l0_run_count() > INLINE_L0_RUNS_MAX
            || keyspace.sealed_memtable_count() > INLINE_SEALED_MEMTABLES_MAX
    }
}

impl Drop for Shared {
    /// Stops the syncer, then makes the relaxed commits it left durable.
    fn drop(&mut self) {
        let Some(syncer) = self.syncer.take() else {
            return;
        };
        self.sync_gate.lock().closing = true;
        self.sync_gate.relaxed_commit.notify_all();
        if syncer.join().is_err() {
            tracing::error!(path = %self.path.display(), "the metadata store's syncer panicked");
        }
        let pending = self.sync_gate.lock().relaxed;
        if let Err(error) = self.sync_gate.sync_through(pending) {
            tracing::error!(path = %self.path.display(), "closing the metadata store: {error}");
        }
    }
}

impl fmt::Debug for FjallKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallKv")
            .field("path", &self.shared.path)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

fn fjall_error(error: ::fjall::Error) -> KvError {
    KvError::Backend {
        backend: "fjall",
        message: error.to_string(),
        // fjall's errors are I/O failures, corruption, a locked or poisoned
        // database: rerunning the transaction does not help.
        retryable: false,
        source: Some(Box::new(error)),
    }
}

/// The id of the newest journal (`<id>.jnl`) in `dir`: the active one.
fn newest_journal(dir: &Path) -> std::io::Result<u64> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let id = name
            .to_str()
            .and_then(|name| name.strip_suffix(".jnl"))
            .and_then(|id| id.parse::<u64>().ok());
        newest = newest.max(id);
    }
    newest.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no journal (<id>.jnl) in {}", dir.display()),
        )
    })
}

impl FjallKv {
    /// Opens (creating if needed) the store in directory `path`. Blocks
    /// while fjall recovers its journal.
    pub fn open(path: impl AsRef<Path>, options: FjallOptions) -> Result<FjallKv, KvError> {
        let path = path.as_ref().to_path_buf();
        let db = OptimisticTxDatabase::builder(&path)
            .open()
            .map_err(fjall_error)?;
        let keyspace = db
            .keyspace(KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(fjall_error)?;
        match keyspace.get(FORMAT_KEY).map_err(fjall_error)? {
            Some(version) if &version[..] == FORMAT_VERSION => {}
            Some(version) => {
                return Err(KvError::Backend {
                    backend: "fjall",
                    message: format!(
                        "{}: unknown metadata format version {:?} (this build knows {:?})",
                        path.display(),
                        String::from_utf8_lossy(&version),
                        String::from_utf8_lossy(FORMAT_VERSION),
                    ),
                    retryable: false,
                    source: None,
                });
            }
            None => {
                keyspace
                    .insert(FORMAT_KEY, FORMAT_VERSION)
                    .map_err(fjall_error)?;
                db.persist(PersistMode::SyncAll).map_err(fjall_error)?;
            }
        }
        let sync_gate = Arc::new(SyncGate::new(&path));
        let syncer = if options.sync_on_commit {
            let gate = sync_gate.clone();
            let within = options.relaxed_within;
            let spawned = std::thread::Builder::new()
                .name("flyfs-kv-sync".into())
                .spawn(move || gate.sync_relaxed(within));
            Some(spawned.map_err(|error| KvError::Backend {
                backend: "fjall",
                message: format!("{}: starting the syncer thread: {error}", path.display()),
                retryable: false,
                source: Some(Box::new(error)),
            })?)
        } else {
            None
        };
        Ok(FjallKv {
            shared: Arc::new(Shared {
                db,
                keyspace,
                options,
                sync_gate,
                syncer,
                path,
                begun: AtomicU64::new(0),
            }),
        })
    }

    /// How the journal has been made durable so far.
    pub fn journal_stats(&self) -> JournalStats {
        let gate = &self.shared.sync_gate;
        JournalStats {
            commits: gate
                .written
                .load(Ordering::Relaxed)
                .saturating_sub(gate.barriers.load(Ordering::Relaxed)),
            relaxed_commits: gate.relaxed_commits.load(Ordering::Relaxed),
            syncs: gate.syncs.load(Ordering::Relaxed),
            sync_time: Duration::from_nanos(gate.sync_nanos.load(Ordering::Relaxed)),
            relaxed_pending: {
                let state = gate.lock();
                state.relaxed > state.durable
            },
        }
    }

    fn begin_tx(&self, read_only: bool) -> Result<FjallTx, KvError> {
        // The write transaction's snapshot first, then the read snapshot:
        // see the module doc for why this order is the safe one.
        let write = if read_only {
            None
        } else {
            Some(
                self.shared
                    .db
                    .write_tx()
                    .map_err(fjall_error)?
                    .durability(Some(PersistMode::Buffer)),
            )
        };
        let snapshot = self.shared.db.read_tx();
        Ok(FjallTx {
            inner: Arc::new(TxInner {
                serial: self.shared.begun.fetch_add(1, Ordering::Relaxed),
                shared: self.shared.clone(),
                snapshot,
                read_only,
                started: Instant::now(),
                state: Mutex::new(TxState {
                    write,
                    buf: overlay::Buffered::default(),
                    relaxed: false,
                }),
            }),
        })
    }
}

impl Kv for FjallKv {
    type Tx = FjallTx;

    fn begin(&self) -> Result<FjallTx, KvError> {
        self.begin_tx(false)
    }

    fn begin_read_only(&self) -> Result<FjallTx, KvError> {
        self.begin_tx(true)
    }

    fn limits(&self) -> Limits {
        self.shared.options.limits
    }

    /// An fsync that starts after the call (or one running that a later
    /// ticket shows started after it): a commit is visible a moment before
    /// it takes its ticket, so the tickets handed out so far may not cover
    /// every commit the caller has seen, but the journal file does. Without
    /// `sync_on_commit` nothing is ever made durable on purpose, and neither
    /// is this.
    async fn sync(&self) -> Result<(), KvError> {
        if !self.shared.options.sync_on_commit {
            return Ok(());
        }
        let gate = self.shared.sync_gate.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(refused) = gate.refusal() {
                return Err(refused);
            }
            gate.barriers.fetch_add(1, Ordering::Relaxed);
            gate.sync_through(gate.ticket())
        })
        .await
        .map_err(|error| KvError::Backend {
            backend: "fjall",
            message: "the sync task died".to_string(),
            retryable: true,
            source: Some(Box::new(error)),
        })?
    }
}

/// A [`FjallKv`] transaction handle; clones share the transaction.
#[derive(Clone)]
pub struct FjallTx {
    inner: Arc<TxInner>,
}

impl fmt::Debug for FjallTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallTx")
            .field("read_only", &self.inner.read_only)
            .field("snapshot_seqno", &self.inner.snapshot.seqno())
            .field("started", &self.inner.started)
            .finish_non_exhaustive()
    }
}

struct TxInner {
    shared: Arc<Shared>,
    serial: u64,
    snapshot: Snapshot,
    read_only: bool,
    started: Instant,
    state: Mutex<TxState>,
}

struct TxState {
    /// fjall's transaction; `None` for a read-only one and after commit.
    write: Option<OptimisticWriteTx>,
    /// Writes, read conflicts to register at commit, and whether it ended.
    buf: overlay::Buffered,
    /// [`Transaction::relax_durability`] was called.
    relaxed: bool,
}

impl FjallTx {
    fn state(&self) -> MutexGuard<'_, TxState> {
        // Nothing panics while holding this lock; a poisoned lock means a
        // bug already reported by that panic.
        self.inner
            .state
            .lock()
            .expect("FjallTx state lock poisoned by a panic")
    }

    fn readable(&self) -> Result<MutexGuard<'_, TxState>, KvError> {
        let state = self.state();
        state.buf.check_open()?;
        overlay::check_age(self.inner.started, &self.inner.shared.options.limits)?;
        Ok(state)
    }

    fn write(
        &self,
        apply: impl FnOnce(&mut WriteSet, &Limits) -> Result<(), KvError>,
    ) -> Result<(), KvError> {
        let read_only = self.inner.read_only;
        self.state()
            .buf
            .write(read_only, &self.inner.shared.options.limits, apply)
    }
}

impl TxInner {
    /// Registers the read conflicts, stages the writes in fjall's
    /// transaction and commits it, then waits until the commit is durable
    /// (unless `relaxed`). Blocking: runs on the blocking pool when it
    /// fsyncs or fjall may hold it back, on the caller's thread otherwise.
    fn commit_blocking(
        &self,
        mut write: OptimisticWriteTx,
        reads: RangeSet,
        writes: WriteSet,
        relaxed: bool,
    ) -> Result<(), KvError> {
        if self.shared.options.sync_on_commit
            && let Some(refused) = self.shared.sync_gate.refusal()
        {
            return Err(refused);
        }
        let keyspace = &self.shared.keyspace;
        // Opening an iterator over a range is how fjall's transaction
        // records a range read; it is lazy, so dropping it unread costs
        // little.
        for (begin, end) in reads.iter() {
            drop(write.range(keyspace, stored(begin)..stored(end)));
        }
        for (begin, end) in writes.cleared().iter() {
            let range = stored(begin)..stored(end);
            drop(write.range(keyspace, range.clone()));
            for guard in self.snapshot.range(keyspace, range) {
                let key = Guard::key(guard).map_err(fjall_error)?;
                if !writes.points().contains_key(&user_key(&key)?) {
                    write.remove(keyspace, key);
                }
            }
        }
        for (key, value) in writes.points() {
            match value {
                Some(value) => write.insert(keyspace, stored(key), &value[..]),
                None => write.remove(keyspace, stored(key)),
            }
        }
        match write.commit().map_err(fjall_error)? {
            Ok(()) => {}
            Err(::fjall::Conflict) => return Err(KvError::Conflict),
        }
        if !self.shared.options.sync_on_commit {
            return Ok(());
        }
        let gate = &self.shared.sync_gate;
        if relaxed {
            gate.relaxed(gate.ticket());
            Ok(())
        } else {
            gate.sync_through(gate.ticket())
        }
    }
}

impl Transaction for FjallTx {
    fn serial(&self) -> u64 {
        self.inner.serial
    }

    async fn get(&self, key: &[u8], snapshot: bool) -> Result<Option<Bytes>, KvError> {
        let mut state = self.readable()?;
        match state.buf.writes.lookup(key) {
            // Decided by this transaction's own writes: no conflict.
            Lookup::Set(value) => Ok(Some(value)),
            Lookup::Cleared => Ok(None),
            Lookup::Untouched => {
                let value = self
                    .inner
                    .snapshot
                    .get(&self.inner.shared.keyspace, stored(key))
                    .map_err(fjall_error)?;
                if !snapshot {
                    state
                        .buf
                        .reads
                        .insert(Bytes::copy_from_slice(key), key_after(key));
                }
                Ok(value.map(|value| Bytes::copy_from_slice(&value)))
            }
        }
    }

    async fn get_range(&self, options: &RangeOptions) -> Result<RangeResult, KvError> {
        overlay::check_range(&options.begin, &options.end)?;
        let mut state = self.readable()?;
        if options.begin == options.end {
            return Ok(RangeResult::default());
        }
        let pairs = self.inner.snapshot.range(
            &self.inner.shared.keyspace,
            stored(&options.begin)..stored(&options.end),
        );
        let to_bytes = |guard: Guard| {
            let (key, value) = guard.into_inner().map_err(fjall_error)?;
            Ok((user_key(&key)?, Bytes::copy_from_slice(&value)))
        };
        let merged = if options.reverse {
            overlay::merge_range(&state.buf.writes, options, pairs.rev().map(to_bytes))?
        } else {
            overlay::merge_range(&state.buf.writes, options, pairs.map(to_bytes))?
        };
        if !options.snapshot {
            state.buf.reads.insert(merged.read_begin, merged.read_end);
        }
        Ok(merged.result)
    }

    fn set(&self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.write(|writes, limits| writes.set(key, value, limits))
    }

    fn clear(&self, key: &[u8]) -> Result<(), KvError> {
        self.write(|writes, limits| writes.clear(key, limits))
    }

    fn clear_range(&self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.write(|writes, limits| writes.clear_range(begin, end, limits))
    }

    fn add_read_conflict_range(&self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.state().buf.add_read_conflict_range(begin, end)
    }

    fn relax_durability(&self) {
        self.state().relaxed = true;
    }

    async fn commit(&self) -> Result<(), KvError> {
        let (write, writes, reads, relaxed) = {
            let mut state = self.state();
            state.buf.check_open()?;
            state.buf.finished = Some("aborted");
            if let Some(error) = state.buf.sticky.take() {
                return Err(error);
            }
            let write = state.write.take();
            let writes = std::mem::take(&mut state.buf.writes);
            let reads = std::mem::take(&mut state.buf.reads);
            match write {
                Some(write) if !writes.is_empty() => (write, writes, reads, state.relaxed),
                // Read-only, or nothing written: nothing to apply, so
                // nothing can conflict (as in FoundationDB).
                _ => {
                    state.buf.finished = Some("committed");
                    return Ok(());
                }
            }
        };
        overlay::check_age(self.inner.started, &self.inner.shared.options.limits)?;
        let shared = &self.inner.shared;
        let outcome = if (relaxed || !shared.options.sync_on_commit) && !shared.holding_back() {
            // No fsync to wait for: a journal write into the page cache and
            // a memtable insert, as short as the reads that already run on
            // the caller's thread. Handing it to the blocking pool and back
            // cost more than the commit (docs/metadata-kv.md).
            self.inner.commit_blocking(write, reads, writes, relaxed)
        } else {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || {
                inner.commit_blocking(write, reads, writes, relaxed)
            })
            .await
            .map_err(|error| KvError::Backend {
                backend: "fjall",
                message: "the commit task died; the commit may or may not have been applied"
                    .to_string(),
                retryable: false,
                source: Some(Box::new(error)),
            })?
        };
        if outcome.is_ok() {
            self.state().buf.finished = Some("committed");
        }
        outcome
    }
}

/// Group commit: makes commits durable with as few fsyncs as possible.
///
/// A committer takes a ticket after its journal write reached the OS. If no
/// fsync is running it starts one, covering every ticket handed out so far;
/// otherwise it waits for the running one to finish and checks again. So
/// at most one fsync runs at a time, and each covers every commit written
/// before it began. A relaxed commit takes a ticket and leaves it to the
/// syncer thread ([`SyncGate::sync_relaxed`]).
///
/// The fsync goes through a descriptor of our own on the active journal
/// file, not fjall's `persist`: that holds the journal's writer lock
/// through the fsync, so every commit waiting to write its batch waited out
/// the fsync too, and commits never shared one (measured: 20,024 durable
/// commits from four creating processes took 19,950 fsyncs). fjall writes
/// each commit's batch to the OS before it returns (`PersistMode::Buffer`),
/// so an fsync of the file covers it. A commit whose batch went to a journal
/// that fjall has since sealed is durable already: fjall fsyncs a journal
/// before it starts the next (and the directory after).
#[derive(Debug)]
struct SyncGate {
    /// The store's directory, where the journals (`<id>.jnl`) are.
    dir: PathBuf,
    /// The active journal as last found (id, descriptor); the syncing
    /// committer alone uses it.
    journal: Mutex<Option<(u64, std::fs::File)>>,
    /// Tickets handed out: commits whose journal write is in the OS.
    written: AtomicU64,
    state: Mutex<SyncState>,
    synced: Condvar,
    /// Wakes the syncer: a relaxed commit, or closing.
    relaxed_commit: Condvar,
    /// fsyncs of the journal that succeeded, and their time in all.
    syncs: AtomicU64,
    sync_nanos: AtomicU64,
    /// Commits that relaxed their durability.
    relaxed_commits: AtomicU64,
    /// Tickets taken by [`Kv::sync`], which commit nothing.
    barriers: AtomicU64,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Every ticket up to this one is durable.
    durable: u64,
    syncing: bool,
    /// An fsync failed: what Linux did with the dirty pages is unknown, so
    /// nothing more is written until the store is reopened.
    failed: Option<String>,
    /// The last relaxed commit's ticket.
    relaxed: u64,
    /// The store is being dropped: the syncer stops.
    closing: bool,
}

impl SyncGate {
    fn new(dir: &Path) -> SyncGate {
        SyncGate {
            dir: dir.to_path_buf(),
            journal: Mutex::new(None),
            written: AtomicU64::new(0),
            state: Mutex::new(SyncState::default()),
            synced: Condvar::new(),
            relaxed_commit: Condvar::new(),
            syncs: AtomicU64::new(0),
            sync_nanos: AtomicU64::new(0),
            relaxed_commits: AtomicU64::new(0),
            barriers: AtomicU64::new(0),
        }
    }

    /// fsyncs the active journal file.
    fn fsync_journal(&self) -> std::io::Result<()> {
        let mut journal = self
            .journal
            .lock()
            .expect("journal lock poisoned by a panic");
        // fjall numbers journals one after another: while the next one does
        // not exist, the one found last is still the active one.
        let current = match &*journal {
            Some((id, file)) if !self.dir.join(format!("{}.jnl", id + 1)).exists() => file,
            _ => {
                let id = newest_journal(&self.dir)?;
                let file = std::fs::File::open(self.dir.join(format!("{id}.jnl")))?;
                &journal.insert((id, file)).1
            }
        };
        current.sync_all()
    }

    /// The error a commit gets once an fsync has failed.
    fn refusal(&self) -> Option<KvError> {
        let failed = self.lock().failed.clone()?;
        Some(KvError::Backend {
            backend: "fjall",
            message: format!(
                "an fsync of the journal failed earlier ({failed}); the store refuses writes \
                 until reopened"
            ),
            retryable: false,
            source: None,
        })
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        // Nothing panics while holding it (persist runs unlocked).
        self.state
            .lock()
            .expect("sync gate lock poisoned by a panic")
    }

    /// The ticket of a commit whose journal write just reached the OS.
    fn ticket(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Waits until every ticket up to `ticket` is durable, running the
    /// fsync itself when none is.
    fn sync_through(&self, ticket: u64) -> Result<(), KvError> {
        let mut state = self.lock();
        loop {
            if state.durable >= ticket {
                return Ok(());
            }
            if let Some(failed) = &state.failed {
                return Err(KvError::Backend {
                    backend: "fjall",
                    message: format!(
                        "an fsync of the journal failed ({failed}), so this commit, applied, \
                         may not be durable; the store refuses writes until reopened"
                    ),
                    retryable: false,
                    source: None,
                });
            }
            if state.syncing {
                state = self
                    .synced
                    .wait(state)
                    .expect("sync gate lock poisoned by a panic");
                continue;
            }
            state.syncing = true;
            let covered = self.written.load(Ordering::SeqCst);
            drop(state);
            let started = std::time::Instant::now();
            let result = self.fsync_journal();
            let took = started.elapsed();
            state = self.lock();
            state.syncing = false;
            match &result {
                Ok(()) => {
                    state.durable = state.durable.max(covered);
                    self.syncs.fetch_add(1, Ordering::Relaxed);
                    let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
                    self.sync_nanos.fetch_add(nanos, Ordering::Relaxed);
                }
                // The commits are applied (others may have read them) but
                // may not survive a crash, and no later one may be written:
                // the store must be reopened.
                Err(error) => state.failed = Some(format!("{}: {error}", self.dir.display())),
            }
            self.synced.notify_all();
        }
    }

    /// Hands relaxed commit `ticket` to the syncer.
    fn relaxed(&self, ticket: u64) {
        self.relaxed_commits.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        state.relaxed = state.relaxed.max(ticket);
        drop(state);
        self.relaxed_commit.notify_one();
    }

    /// The syncer thread's loop, until closing: makes each relaxed commit
    /// durable at most `within` after the syncer saw it, by an fsync of its
    /// own unless a durable commit's fsync covered it meanwhile.
    fn sync_relaxed(&self, within: Duration) {
        let mut state = self.lock();
        loop {
            if state.closing {
                return;
            }
            if state.relaxed <= state.durable {
                state = self
                    .relaxed_commit
                    .wait(state)
                    .expect("sync gate lock poisoned by a panic");
                continue;
            }
            let target = state.relaxed;
            let deadline = std::time::Instant::now() + within;
            while !state.closing && state.durable < target {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                state = self
                    .relaxed_commit
                    .wait_timeout(state, left)
                    .expect("sync gate lock poisoned by a panic")
                    .0;
            }
            if state.closing || state.durable >= target {
                continue;
            }
            drop(state);
            if let Err(error) = self.sync_through(target) {
                // Every later commit is refused and reports it; nothing
                // more to sync here.
                tracing::error!("the metadata store's syncer stops: {error}");
                return;
            }
            state = self.lock();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commits_survive_reopening() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let kv = FjallKv::open(dir.path(), FjallOptions::default()).expect("open");
            let tx = kv.begin().expect("begin");
            tx.set(b"a", b"1").expect("set");
            tx.set(b"b", b"2").expect("set");
            tx.commit().await.expect("commit");
            let tx = kv.begin().expect("begin");
            tx.clear_range(b"b", b"c").expect("clear");
            tx.commit().await.expect("commit");
        }
        let kv = FjallKv::open(dir.path(), FjallOptions::default()).expect("reopen");
        let tx = kv.begin_read_only().expect("begin");
        assert_eq!(
            tx.get(b"a", false).await.expect("get").as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(tx.get(b"b", false).await.expect("get"), None);
    }

    /// A new store whose syncer waits `within`, holding one relaxed commit
    /// of key `a`.
    async fn store_with_a_relaxed_commit(within: Duration) -> (tempfile::TempDir, FjallKv) {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = FjallOptions {
            relaxed_within: within,
            ..FjallOptions::default()
        };
        let kv = FjallKv::open(dir.path(), options).expect("open");
        commit_one(&kv, b"a", true).await;
        (dir, kv)
    }

    async fn commit_one(kv: &FjallKv, key: &[u8], relaxed: bool) {
        let tx = kv.begin().expect("begin");
        tx.set(key, b"v").expect("set");
        if relaxed {
            tx.relax_durability();
        }
        tx.commit().await.expect("commit");
    }

    /// Keeps the blocking pool's thread busy until the sender is used.
    async fn occupy_the_blocking_thread()
    -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (taken, busy) = tokio::sync::oneshot::channel();
        let occupant = tokio::task::spawn_blocking(move || {
            let _ = taken.send(());
            let _ = held.recv();
        });
        busy.await.expect("the blocking thread started");
        (release, occupant)
    }

    /// A commit that makes no fsync runs on the caller's thread: it
    /// completes while the only blocking-pool thread is busy, and a
    /// durable one (an fsync) still waits for that thread.
    #[test]
    fn commits_without_an_fsync_need_no_blocking_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let kv = FjallKv::open(dir.path(), FjallOptions::default()).expect("open");
            let (release, occupant) = occupy_the_blocking_thread().await;
            let relaxed =
                tokio::time::timeout(Duration::from_secs(60), commit_one(&kv, b"a", true));
            relaxed
                .await
                .expect("a relaxed commit waited for the blocking pool");
            let durable = tokio::spawn({
                let kv = kv.clone();
                async move { commit_one(&kv, b"b", false).await }
            });
            tokio::task::yield_now().await;
            assert!(
                !durable.is_finished(),
                "a durable commit finished without the blocking pool"
            );
            release.send(()).expect("release the blocking thread");
            occupant.await.expect("occupant");
            durable.await.expect("durable commit");
            let unsynced = FjallOptions {
                sync_on_commit: false,
                ..FjallOptions::default()
            };
            let other = tempfile::tempdir().expect("temp dir");
            let kv = FjallKv::open(other.path(), unsynced).expect("open");
            let (release, occupant) = occupy_the_blocking_thread().await;
            tokio::time::timeout(Duration::from_secs(60), commit_one(&kv, b"a", false))
                .await
                .expect("a commit of a store without sync_on_commit waited for the blocking pool");
            release.send(()).expect("release the blocking thread");
            occupant.await.expect("occupant");
        });
    }

    /// Whether every relaxed commit so far is durable.
    fn relaxed_durable_at(gate: &SyncGate) -> bool {
        let state = gate.lock();
        state.durable >= state.relaxed
    }

    fn relaxed_durable(kv: &FjallKv) -> bool {
        !kv.journal_stats().relaxed_pending
    }

    #[tokio::test]
    async fn a_relaxed_commit_waits_for_no_fsync_and_the_next_durable_one_covers_it() {
        let (_dir, kv) = store_with_a_relaxed_commit(Duration::from_secs(3600)).await;
        assert_eq!(
            kv.journal_stats().syncs,
            0,
            "a relaxed commit made an fsync"
        );
        assert!(!relaxed_durable(&kv));
        let tx = kv.begin_read_only().expect("begin");
        assert_eq!(
            tx.get(b"a", false).await.expect("get").as_deref(),
            Some(&b"v"[..]),
            "a relaxed commit is visible at once"
        );
        commit_one(&kv, b"b", false).await;
        let stats = kv.journal_stats();
        assert_eq!(
            (stats.commits, stats.relaxed_commits, stats.syncs),
            (2, 1, 1)
        );
        assert!(stats.sync_time > Duration::ZERO);
        assert!(
            relaxed_durable(&kv),
            "the durable commit's fsync covers the relaxed one before it"
        );
    }

    #[tokio::test]
    async fn sync_makes_the_relaxed_commits_before_it_durable() {
        let (_dir, kv) = store_with_a_relaxed_commit(Duration::from_secs(3600)).await;
        assert!(!relaxed_durable(&kv));
        kv.sync().await.expect("sync");
        assert!(relaxed_durable(&kv), "sync returned before an fsync");
        let stats = kv.journal_stats();
        assert_eq!(
            (stats.commits, stats.relaxed_commits, stats.syncs),
            (1, 1, 1),
            "a sync is no commit"
        );
        // With nothing new to cover it still fsyncs: it cannot know what a
        // commit applied a moment ago has not yet announced.
        kv.sync().await.expect("sync");
        assert_eq!(kv.journal_stats().syncs, 2);
    }

    #[tokio::test]
    async fn the_syncer_makes_a_relaxed_commit_durable_on_its_own() {
        let (_dir, kv) = store_with_a_relaxed_commit(Duration::from_millis(1)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !relaxed_durable(&kv) {
            assert!(
                std::time::Instant::now() < deadline,
                "no fsync within a minute"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(kv.journal_stats().syncs, 1);
    }

    #[tokio::test]
    async fn closing_the_store_makes_relaxed_commits_durable() {
        let (dir, kv) = store_with_a_relaxed_commit(Duration::from_secs(3600)).await;
        let gate = kv.shared.sync_gate.clone();
        drop(kv);
        assert!(relaxed_durable_at(&gate) && gate.lock().relaxed > 0);
        assert_eq!(gate.syncs.load(Ordering::Relaxed), 1);
        // The syncer is gone with its handle on the database: it reopens.
        let kv = FjallKv::open(dir.path(), FjallOptions::default()).expect("reopen");
        let tx = kv.begin_read_only().expect("begin");
        assert!(tx.get(b"a", false).await.expect("get").is_some());
    }
}
