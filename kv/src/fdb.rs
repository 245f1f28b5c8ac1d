//! `FdbKv`: the FoundationDB backend (cargo feature `fdb`), a thin adapter:
//! FoundationDB already has the semantics of our contract (the contract
//! was written from it), so each [`Transaction`] operation is one
//! FoundationDB call, plus a key prefix, local limit checks and error
//! mapping. Building it needs libclang (the bindings are generated at build
//! time from the bundled 7.3 headers); linking and running need libfdb_c
//! 7.3 or newer.
//!
//! The network thread: FoundationDB's client runs one network thread per
//! process, which may be started once and, once stopped, never again.
//! [`FdbKv::open`] starts it on first use (under a process-wide lock, so
//! concurrent opens are safe) and later opens share it. Call
//! [`stop_network`] once, before the process exits and after the last
//! transaction; FoundationDB requires the network to be stopped before exit
//! (a process that exits without stopping it risks a crash during exit, not
//! before). Nothing else in the process may select a FoundationDB API
//! version or start the network, or the foundationdb crate panics.
//!
//! Keys: an `FdbKv` may live under a prefix ([`FdbKv::with_prefix`]); every
//! key it reads or writes is the prefix followed by the flyfs key, so
//! several stores (or test runs) can share one cluster. Range ends past the
//! user key space are clamped to `\xff`, where FoundationDB's system keys
//! begin.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use foundationdb::api::{FdbApiBuilder, NetworkAutoStop};
use foundationdb::options::{ConflictRangeType, StreamingMode};
use foundationdb::{Database, FdbError, KeySelector, RangeOption};

use crate::overlay;
use crate::{KeyValue, Kv, KvError, Limits, RangeOptions, RangeResult, Transaction};

const BACKEND: &str = "foundationdb";

/// The first key of FoundationDB's system key space; user keys sort before.
const SYSTEM_KEYS: &[u8] = b"\xff";

enum Network {
    NotStarted,
    Running(NetworkAutoStop),
    Stopped,
}

static NETWORK: Mutex<Network> = Mutex::new(Network::NotStarted);

fn network() -> MutexGuard<'static, Network> {
    // The state is a plain enum that every critical section leaves valid.
    NETWORK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn backend_error(message: String) -> KvError {
    KvError::Backend {
        backend: BACKEND,
        message,
        retryable: false,
        source: None,
    }
}

/// Starts the network thread unless it runs already.
fn start_network() -> Result<(), KvError> {
    let mut network = network();
    match *network {
        Network::Running(_) => Ok(()),
        Network::Stopped => Err(backend_error(
            "the FoundationDB network was stopped, and it cannot be restarted in the same process"
                .to_string(),
        )),
        Network::NotStarted => {
            let builder = FdbApiBuilder::default()
                .build()
                .map_err(|error| untranslated(error, "selecting the API version"))?;
            // SAFETY: `boot` is unsafe because the network must be stopped
            // before the process exits. The guard is kept in `NETWORK`, and
            // `stop_network` (the documented shutdown step) drops it, which
            // stops the network and joins its thread; the static lock makes
            // this the only start in the process.
            #[allow(unsafe_code)]
            let guard = unsafe { builder.boot() }
                .map_err(|error| untranslated(error, "starting the network thread"))?;
            *network = Network::Running(guard);
            Ok(())
        }
    }
}

/// Stops FoundationDB's network thread and waits for it; call once before
/// the process exits, after the last transaction. Every `FdbKv` stops
/// working, and none can be opened again in this process.
pub fn stop_network() {
    let mut network = network();
    if let Network::Running(guard) = std::mem::replace(&mut *network, Network::Stopped) {
        drop(guard);
    }
}

/// A FoundationDB error that is not one of ours.
fn untranslated(error: FdbError, doing: &str) -> KvError {
    KvError::Backend {
        backend: BACKEND,
        message: format!("{doing}: {} (error {})", error.message(), error.code()),
        retryable: error.is_retryable(),
        source: Some(Box::new(error)),
    }
}

/// A store in a FoundationDB cluster, optionally under a key prefix.
/// Clones share the connection.
#[derive(Clone)]
pub struct FdbKv {
    db: Arc<Database>,
    prefix: Bytes,
    /// Transactions begun through this handle and its clones: the next
    /// one's serial number.
    begun: Arc<AtomicU64>,
}

impl fmt::Debug for FdbKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FdbKv")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl FdbKv {
    /// Connects to the cluster named by `cluster_file` (FoundationDB's
    /// default cluster file when `None`), starting the network thread on
    /// first use. Keys are not prefixed.
    pub fn open(cluster_file: Option<&Path>) -> Result<FdbKv, KvError> {
        let path = match cluster_file {
            Some(path) => Some(path.to_str().ok_or_else(|| {
                backend_error(format!("cluster file path {} is not UTF-8", path.display()))
            })?),
            None => None,
        };
        start_network()?;
        let db =
            Database::new(path).map_err(|error| untranslated(error, "opening the cluster file"))?;
        Ok(FdbKv {
            db: Arc::new(db),
            prefix: Bytes::new(),
            begun: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The same cluster, with every key under `prefix` (appended to this
    /// store's own prefix). Its key limit shrinks by the prefix's length.
    pub fn with_prefix(&self, prefix: &[u8]) -> FdbKv {
        let mut full = self.prefix.to_vec();
        full.extend_from_slice(prefix);
        FdbKv {
            db: self.db.clone(),
            prefix: Bytes::from(full),
            begun: self.begun.clone(),
        }
    }

    fn full_key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    /// A range end: prefixed, and kept out of the system key space.
    fn full_end(&self, key: &[u8]) -> Vec<u8> {
        let full = self.full_key(key);
        if full.as_slice() > SYSTEM_KEYS {
            SYSTEM_KEYS.to_vec()
        } else {
            full
        }
    }

    fn user_key(&self, full: &[u8]) -> Result<Bytes, KvError> {
        full.strip_prefix(&self.prefix[..])
            .map(Bytes::copy_from_slice)
            .ok_or_else(|| {
                backend_error(format!(
                    "FoundationDB returned key {full:?} outside prefix {:?}",
                    self.prefix
                ))
            })
    }

    fn begin_tx(&self, read_only: bool) -> Result<FdbTx, KvError> {
        let tx = self
            .db
            .create_trx()
            .map_err(|error| untranslated(error, "creating a transaction"))?;
        Ok(FdbTx {
            inner: Arc::new(TxInner {
                state: Mutex::new(TxState {
                    tx: Some(tx),
                    finished: None,
                    sticky: None,
                    bytes_written: 0,
                    key_len_max: 0,
                    value_len_max: 0,
                }),
                kv: self.clone(),
                serial: self.begun.fetch_add(1, Ordering::Relaxed),
                read_only,
                started: Instant::now(),
            }),
        })
    }
}

impl Kv for FdbKv {
    type Tx = FdbTx;

    fn begin(&self) -> Result<FdbTx, KvError> {
        self.begin_tx(false)
    }

    fn begin_read_only(&self) -> Result<FdbTx, KvError> {
        self.begin_tx(true)
    }

    /// FoundationDB's own limits (the cluster enforces them; they cannot be
    /// changed here), with the key limit shrunk by the prefix.
    fn limits(&self) -> Limits {
        let limits = Limits::default();
        Limits {
            key_bytes_max: limits.key_bytes_max.saturating_sub(self.prefix.len()),
            ..limits
        }
    }
}

/// An [`FdbKv`] transaction handle; clones share the transaction.
#[derive(Clone)]
pub struct FdbTx {
    inner: Arc<TxInner>,
}

impl fmt::Debug for FdbTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FdbTx")
            .field("prefix", &self.inner.kv.prefix)
            .field("read_only", &self.inner.read_only)
            .field("started", &self.inner.started)
            .finish_non_exhaustive()
    }
}

struct TxInner {
    // Declared before `kv`, so the transaction is destroyed before the
    // database handle, as the C client wants.
    state: Mutex<TxState>,
    kv: FdbKv,
    serial: u64,
    read_only: bool,
    /// Std's clock, not tokio's: FoundationDB enforces its five-second limit
    /// on real time in its own processes, which no simulation or paused
    /// test clock moves, so the age reported must be real time too.
    started: Instant,
}

struct TxState {
    /// `None` once committed.
    tx: Option<foundationdb::Transaction>,
    finished: Option<&'static str>,
    sticky: Option<KvError>,
    /// What the size errors FoundationDB reports at commit are about.
    bytes_written: usize,
    key_len_max: usize,
    value_len_max: usize,
}

impl FdbTx {
    fn state(&self) -> MutexGuard<'_, TxState> {
        // Nothing panics while holding it.
        self.inner
            .state
            .lock()
            .expect("FdbTx state lock poisoned by a panic")
    }

    /// Runs `op` on the open FoundationDB transaction.
    fn with_tx<T>(&self, op: impl FnOnce(&foundationdb::Transaction) -> T) -> Result<T, KvError> {
        let state = self.state();
        match (&state.tx, state.finished) {
            (Some(tx), None) => Ok(op(tx)),
            (_, state) => Err(KvError::Finished {
                state: state.unwrap_or("committed"),
            }),
        }
    }

    /// Checks a mutation's key and value sizes (when it has them) and
    /// counts its `bytes`, then runs it; a size error is remembered for
    /// commit, as FoundationDB itself would fail the commit.
    fn mutate(
        &self,
        key_len: Option<usize>,
        value_len: Option<usize>,
        bytes: usize,
        op: impl FnOnce(&foundationdb::Transaction),
    ) -> Result<(), KvError> {
        let mut state = self.state();
        if let Some(state) = state.finished {
            return Err(KvError::Finished { state });
        }
        if self.inner.read_only {
            return Err(KvError::ReadOnly);
        }
        let limits = self.inner.kv.limits();
        let key_len = key_len.unwrap_or(0);
        let value_len = value_len.unwrap_or(0);
        let bytes = state.bytes_written.saturating_add(bytes);
        let checked = if key_len > limits.key_bytes_max {
            Err(KvError::KeyTooLarge {
                len: key_len,
                max: limits.key_bytes_max,
            })
        } else if value_len > limits.value_bytes_max {
            Err(KvError::ValueTooLarge {
                len: value_len,
                max: limits.value_bytes_max,
            })
        } else if bytes > limits.transaction_bytes_max {
            Err(KvError::TransactionTooLarge {
                bytes,
                max: limits.transaction_bytes_max,
            })
        } else {
            Ok(())
        };
        if let Err(error) = checked {
            if state.sticky.is_none() {
                state.sticky = overlay::sticky_copy(&error);
            }
            return Err(error);
        }
        state.bytes_written = bytes;
        state.key_len_max = state.key_len_max.max(key_len);
        state.value_len_max = state.value_len_max.max(value_len);
        match &state.tx {
            Some(tx) => {
                op(tx);
                Ok(())
            }
            None => Err(KvError::Finished { state: "committed" }),
        }
    }

    /// Our error for a FoundationDB one.
    fn translate(&self, error: FdbError, doing: &str) -> KvError {
        let limits = self.inner.kv.limits();
        let state = self.state();
        match error.code() {
            1020 => KvError::Conflict, // not_committed
            1007 => KvError::TooOld {
                // transaction_too_old
                age_ms: self.inner.started.elapsed().as_millis() as u64,
                max_ms: limits.transaction_age_max.as_millis() as u64,
            },
            1021 => KvError::CommitUnknown, // commit_unknown_result
            2101 => KvError::TransactionTooLarge {
                bytes: state.bytes_written,
                max: limits.transaction_bytes_max,
            },
            2102 => KvError::KeyTooLarge {
                len: state.key_len_max,
                max: limits.key_bytes_max,
            },
            2103 => KvError::ValueTooLarge {
                len: state.value_len_max,
                max: limits.value_bytes_max,
            },
            _ => untranslated(error, doing),
        }
    }

    /// One `get_range` call's worth of pairs, and whether FoundationDB has
    /// more in the range.
    async fn range_batch(
        &self,
        option: &RangeOption<'static>,
        iteration: usize,
        snapshot: bool,
    ) -> Result<foundationdb::future::FdbValues, KvError> {
        let batch = self.with_tx(|tx| tx.get_range(option, iteration, snapshot))?;
        batch
            .await
            .map_err(|error| self.translate(error, "reading a range"))
    }
}

impl Transaction for FdbTx {
    fn serial(&self) -> u64 {
        self.inner.serial
    }

    async fn get(&self, key: &[u8], snapshot: bool) -> Result<Option<Bytes>, KvError> {
        let full = self.inner.kv.full_key(key);
        let value = self.with_tx(|tx| tx.get(&full, snapshot))?;
        let value = value
            .await
            .map_err(|error| self.translate(error, "reading a key"))?;
        Ok(value.map(|value| Bytes::copy_from_slice(&value)))
    }

    async fn get_range(&self, options: &RangeOptions) -> Result<RangeResult, KvError> {
        overlay::check_range(&options.begin, &options.end)?;
        let kv = &self.inner.kv;
        let begin = kv.full_key(&options.begin);
        let end = kv.full_end(&options.end);
        if begin >= end {
            return Ok(RangeResult::default());
        }
        let mut option = RangeOption {
            limit: (options.limit > 0).then_some(options.limit),
            mode: if options.limit > 0 {
                StreamingMode::Exact
            } else {
                StreamingMode::WantAll
            },
            reverse: options.reverse,
            ..RangeOption::from((begin.clone(), end.clone()))
        };
        let mut kvs = Vec::new();
        let mut iteration = 1;
        let fdb_more = loop {
            let batch = self
                .range_batch(&option, iteration, options.snapshot)
                .await?;
            for pair in batch.iter() {
                kvs.push(KeyValue {
                    key: kv.user_key(pair.key())?,
                    value: Bytes::copy_from_slice(pair.value()),
                });
            }
            let fdb_more = batch.more();
            iteration += 1;
            match option.next_range(&batch) {
                Some(next) => option = next,
                None => break fdb_more,
            }
        };

        // FoundationDB's `more` may be set when the limit was reached
        // exactly at the end of the range; ours is exact. Look for one more
        // key with the same isolation, which also (for a serializable read)
        // extends the read conflict through it, as on the other backends.
        let more = match kvs.last() {
            Some(last) if fdb_more && kvs.len() == options.limit => {
                let last = kv.full_key(&last.key);
                let probe = if options.reverse {
                    RangeOption {
                        begin: KeySelector::first_greater_or_equal(begin),
                        end: KeySelector::first_greater_or_equal(last),
                        limit: Some(1),
                        reverse: true,
                        ..RangeOption::default()
                    }
                } else {
                    RangeOption {
                        begin: KeySelector::first_greater_than(last),
                        end: KeySelector::first_greater_or_equal(end),
                        limit: Some(1),
                        ..RangeOption::default()
                    }
                };
                !self
                    .range_batch(&probe, 1, options.snapshot)
                    .await?
                    .is_empty()
            }
            _ => false,
        };
        Ok(RangeResult { kvs, more })
    }

    fn set(&self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        let full = self.inner.kv.full_key(key);
        let bytes = key.len() + value.len();
        self.mutate(Some(key.len()), Some(value.len()), bytes, |tx| {
            tx.set(&full, value)
        })
    }

    fn clear(&self, key: &[u8]) -> Result<(), KvError> {
        let full = self.inner.kv.full_key(key);
        self.mutate(Some(key.len()), None, key.len(), |tx| tx.clear(&full))
    }

    fn clear_range(&self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        overlay::check_range(begin, end)?;
        let full_begin = self.inner.kv.full_key(begin);
        let full_end = self.inner.kv.full_end(end);
        self.mutate(None, None, begin.len() + end.len(), |tx| {
            if full_begin < full_end {
                tx.clear_range(&full_begin, &full_end);
            }
        })
    }

    fn add_read_conflict_range(&self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        overlay::check_range(begin, end)?;
        let full_begin = self.inner.kv.full_key(begin);
        let full_end = self.inner.kv.full_end(end);
        if full_begin >= full_end {
            return self.with_tx(|_| ());
        }
        self.with_tx(|tx| tx.add_conflict_range(&full_begin, &full_end, ConflictRangeType::Read))?
            .map_err(|error| self.translate(error, "adding a read conflict range"))
    }

    async fn commit(&self) -> Result<(), KvError> {
        let tx = {
            let mut state = self.state();
            if let Some(state) = state.finished {
                return Err(KvError::Finished { state });
            }
            state.finished = Some("aborted");
            if let Some(error) = state.sticky.take() {
                return Err(error);
            }
            let Some(tx) = state.tx.take() else {
                return Err(KvError::Finished { state: "aborted" });
            };
            if self.inner.read_only {
                // Nothing to commit: dropping the transaction ends it.
                state.finished = Some("committed");
                return Ok(());
            }
            tx
        };
        match tx.commit().await {
            Ok(_) => {
                self.state().finished = Some("committed");
                Ok(())
            }
            Err(error) => Err(self.translate(FdbError::from(error), "committing")),
        }
    }
}
