//! Where the cluster manager keeps its durable record (nodes, targets,
//! chains with their public states, chain tables, routing version) and its
//! lease, behind one narrow trait so the manager runs on a file, in memory
//! (simulation, tests) or on the transactional KV store
//! (`kv_store::KvClusterStore` on flyfs-kv, FoundationDB across
//! machines), where several managers share one record and the lease decides
//! which of them is the primary.
//!
//! Record encoding (the whole `cluster.rec` file; in the KV store, the bytes
//! split over chunk values), little endian:
//!
//! ```text
//! 0        8         12            20         24
//! | magic  | version | body length | CRC32C   | body (MessagePack, named fields) ...
//! | FLYMGMT1 | u32 = 1 | u64       | of body  |
//! ```
//!
//! The lease record uses the same frame with magic `FLYLEAS1`; its body is a
//! [`LeaseRecord`]. docs/cluster-record-format.md has both layouts, the KV
//! keys and the lease rules.
//!
//! A [`FileStore`] save writes `cluster.rec.tmp`, fsyncs it, renames it over
//! `cluster.rec` and fsyncs the directory, so a crash leaves either the old
//! or the new record, never a mix. Anything else found on disk (short
//! header, wrong magic or version, short body, checksum or decode failure) is
//! an error that names the file and the problem.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The future every [`ClusterStore`] method returns: boxed, so that the
/// trait stays object safe for `Box<dyn ClusterStore>`.
pub use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::cluster::ClusterRecord;

/// Durable storage of the manager's [`ClusterRecord`] and of the lease that
/// makes one manager among several the primary.
///
/// Object safe: the service holds a `Box<dyn ClusterStore>` chosen at the
/// composition root. Async, because the KV backends are.
///
/// Contract:
/// * `save` returns only once the record is durable; after `save` fails, the
///   previous record or the new one may be what `load` returns, and the
///   caller must not publish the new one.
/// * `save` is fenced by the lease: a store shared by several managers
///   refuses ([`StoreError::NotLeaseHolder`]) a save whose `fence` is not
///   the current holder and epoch of an unexpired lease, and checks that in
///   the same atomic step as the write, so a deposed primary can never
///   overwrite what its successor loaded.
/// * `acquire_or_renew` follows [`LeaseRecord::acquire`]: a holder renews its
///   own unexpired lease in the same epoch; anyone takes an expired lease in
///   a new epoch; a live lease of another holder is reported, not taken.
/// * Times are milliseconds on a clock every manager shares up to a bounded
///   skew (the wall clock in production), passed in so tests control them.
pub trait ClusterStore: Send + Sync + 'static {
    /// The last saved record, or `None` if nothing was ever saved.
    fn load(&self) -> BoxFuture<'_, Result<Option<ClusterRecord>, StoreError>>;

    /// Replaces the record durably, if `fence` holds the lease at `now_ms`.
    fn save<'a>(
        &'a self,
        record: &'a ClusterRecord,
        fence: &'a LeaseFence,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Takes or renews the lease for `holder` (reachable at `address`) for
    /// `ttl` from `now_ms`, or says who holds it.
    fn acquire_or_renew<'a>(
        &'a self,
        holder: &'a str,
        address: &'a str,
        ttl: Duration,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<LeaseState, StoreError>>;

    /// Gives the lease up, if `fence` still holds it, so that a standby takes
    /// over at once rather than after the lease expires (graceful shutdown).
    fn release<'a>(&'a self, fence: &'a LeaseFence) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// Why the record or the lease could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Bytes found in the store are not a valid record; `location` names the
    /// file or KV key.
    #[error("{location}: {problem}")]
    Corrupt { location: String, problem: String },
    #[error("{location}: cannot decode the stored value: {source}")]
    Decode {
        location: String,
        #[source]
        source: rmp_serde::decode::Error,
    },
    #[error("cannot encode the cluster record: {source}")]
    Encode {
        #[source]
        source: rmp_serde::encode::Error,
    },
    /// The record decoded but contradicts itself (e.g. a chain naming a
    /// target that does not exist).
    #[error("inconsistent cluster record: {problem}")]
    Inconsistent { problem: String },
    /// The encoded record does not fit in one transaction of the store.
    #[error(
        "the cluster record is {bytes} bytes; the store takes at most {max} in one transaction"
    )]
    TooLarge { bytes: usize, max: usize },
    /// A save (or release) by a manager that no longer holds the lease: a
    /// deposed primary must not overwrite its successor's record.
    #[error(
        "manager {holder} does not hold the cluster manager lease (its epoch {epoch}): {reason}; \
         the cluster record is left as it is"
    )]
    NotLeaseHolder {
        holder: String,
        epoch: u64,
        reason: String,
    },
    /// The backend (the transactional KV store) failed.
    #[error("cluster store backend cannot {op}: {source}")]
    Backend {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A store that injects failures (tests) or a backend without a more
    /// specific error.
    #[error("cluster store unavailable: {reason}")]
    Unavailable { reason: String },
}

const RECORD_MAGIC: [u8; 8] = *b"FLYMGMT1";
const LEASE_MAGIC: [u8; 8] = *b"FLYLEAS1";
const FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: usize = 24;
const FILE_NAME: &str = "cluster.rec";
const TMP_NAME: &str = "cluster.rec.tmp";

/// Frames `body` with `magic`, the format version, its length and CRC.
fn frame(magic: [u8; 8], body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len());
    bytes.extend_from_slice(&magic);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// The body inside a frame; never panics on any input.
fn unframe<'a>(location: &str, magic: [u8; 8], bytes: &'a [u8]) -> Result<&'a [u8], StoreError> {
    let corrupt = |problem: String| StoreError::Corrupt {
        location: location.to_string(),
        problem,
    };
    let Some((header, body)) = bytes.split_at_checked(HEADER_BYTES) else {
        return Err(corrupt(format!(
            "truncated header: {} bytes, need {HEADER_BYTES}",
            bytes.len()
        )));
    };
    // The header is exactly HEADER_BYTES long, so these fixed slices exist.
    let field = |from: usize, to: usize| &header[from..to];
    if field(0, 8) != magic {
        return Err(corrupt(format!(
            "bad magic {:02x?} (expected {:?})",
            field(0, 8),
            String::from_utf8_lossy(&magic)
        )));
    }
    let version = u32::from_le_bytes(field(8, 12).try_into().expect("4-byte slice"));
    if version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "unsupported format version {version} (this build reads {FORMAT_VERSION})"
        )));
    }
    let length = u64::from_le_bytes(field(12, 20).try_into().expect("8-byte slice"));
    let crc = u32::from_le_bytes(field(20, 24).try_into().expect("4-byte slice"));
    if length != body.len() as u64 {
        return Err(corrupt(format!(
            "body is {} bytes, header says {length} (truncated or extended)",
            body.len()
        )));
    }
    let actual = crc32c::crc32c(body);
    if actual != crc {
        return Err(corrupt(format!(
            "body checksum {actual:#010x} differs from header's {crc:#010x}"
        )));
    }
    Ok(body)
}

/// The checksum every record check uses (CRC32C), for stores that keep a
/// record's bytes in pieces and check the pieces' concatenation.
pub fn record_checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Encodes a record with its header: the bytes of `cluster.rec`, and what a
/// KV store splits over its chunk values.
pub fn encode_record(record: &ClusterRecord) -> Result<Vec<u8>, StoreError> {
    let body = rmp_serde::to_vec_named(record).map_err(|source| StoreError::Encode { source })?;
    Ok(frame(RECORD_MAGIC, &body))
}

/// Decodes [`encode_record`]'s bytes; never panics on any input. `location`
/// (a file or KV key) goes into the error.
pub fn decode_record(location: &str, bytes: &[u8]) -> Result<ClusterRecord, StoreError> {
    let body = unframe(location, RECORD_MAGIC, bytes)?;
    rmp_serde::from_slice(body).map_err(|source| StoreError::Decode {
        location: location.to_string(),
        source,
    })
}

/// The lease as a store keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LeaseRecord {
    /// Who holds it: unique per manager process.
    pub holder: String,
    /// Where the holder serves (`host:port`): what standbys name to callers.
    pub address: String,
    /// Bumped whenever the lease changes hands or is taken again after it
    /// expired, so a save carrying an older epoch is refused even when its
    /// holder has since re-acquired the lease (it must reload first).
    pub epoch: u64,
    /// The holder's clock reading at its last acquire or renew, plus the ttl.
    pub expires_at_ms: u64,
}

/// What [`ClusterStore::acquire_or_renew`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// The caller holds the lease until `expires_at_ms`, in `epoch`.
    Held { epoch: u64, expires_at_ms: u64 },
    /// Another manager holds an unexpired lease.
    HeldBy {
        holder: String,
        address: String,
        expires_at_ms: u64,
    },
}

/// What a save carries to prove it comes from the lease holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseFence {
    pub holder: String,
    pub epoch: u64,
}

impl LeaseRecord {
    /// The lease rules, shared by every store with a real lease: given the
    /// stored lease (if any), what `holder` gets and the record to write
    /// (`None`: leave it as it is).
    ///
    /// Safety needs two things this function cannot see: the caller applies
    /// the write in the same transaction as the read of `current`, and the
    /// managers' clocks differ by less than the margin the holder keeps
    /// (it stops serving before `expires_at_ms`; see `LeaseOptions`).
    pub fn acquire(
        current: Option<&LeaseRecord>,
        holder: &str,
        address: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> (LeaseState, Option<LeaseRecord>) {
        let expires_at_ms = now_ms.saturating_add(ttl.as_millis() as u64);
        let epoch = match current {
            None => 1,
            // A renewal: same epoch, the holder keeps what it loaded.
            Some(lease) if lease.holder == holder && now_ms < lease.expires_at_ms => lease.epoch,
            // Expired (whoever held it): taken in a new epoch. Saturating:
            // a stored epoch is read from disk and must not overflow.
            Some(lease) if lease.expires_at_ms <= now_ms => lease.epoch.saturating_add(1),
            Some(lease) => {
                return (
                    LeaseState::HeldBy {
                        holder: lease.holder.clone(),
                        address: lease.address.clone(),
                        expires_at_ms: lease.expires_at_ms,
                    },
                    None,
                );
            }
        };
        let next = LeaseRecord {
            holder: holder.to_string(),
            address: address.to_string(),
            epoch,
            expires_at_ms,
        };
        (
            LeaseState::Held {
                epoch,
                expires_at_ms,
            },
            Some(next),
        )
    }

    /// Whether a save by `fence` at `now_ms` may write: only the holder of
    /// the current epoch, before expiry.
    pub fn admit(
        current: Option<&LeaseRecord>,
        fence: &LeaseFence,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let refuse = |reason: String| StoreError::NotLeaseHolder {
            holder: fence.holder.clone(),
            epoch: fence.epoch,
            reason,
        };
        match current {
            None => Err(refuse("no lease was ever taken".into())),
            Some(lease) if lease.holder != fence.holder || lease.epoch != fence.epoch => {
                Err(refuse(format!(
                    "the lease is {}'s (at {}), epoch {}",
                    lease.holder, lease.address, lease.epoch
                )))
            }
            Some(lease) if lease.expires_at_ms <= now_ms => Err(refuse(format!(
                "the lease expired at {} ms, now is {now_ms} ms",
                lease.expires_at_ms
            ))),
            Some(_) => Ok(()),
        }
    }

    /// The record after `fence` gives the lease up: expired at once, holder
    /// and epoch kept so the next taker moves to a new epoch.
    pub fn release(current: Option<&LeaseRecord>, fence: &LeaseFence) -> Option<LeaseRecord> {
        current
            .filter(|lease| lease.holder == fence.holder && lease.epoch == fence.epoch)
            .map(|lease| LeaseRecord {
                expires_at_ms: 0,
                ..lease.clone()
            })
    }

    /// The stored bytes.
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let body = rmp_serde::to_vec_named(self).map_err(|source| StoreError::Encode { source })?;
        Ok(frame(LEASE_MAGIC, &body))
    }

    /// Decodes [`LeaseRecord::encode`]'s bytes; never panics.
    pub fn decode(location: &str, bytes: &[u8]) -> Result<LeaseRecord, StoreError> {
        let body = unframe(location, LEASE_MAGIC, bytes)?;
        rmp_serde::from_slice(body).map_err(|source| StoreError::Decode {
            location: location.to_string(),
            source,
        })
    }
}

/// The record in one file of a directory (see the module docs for the
/// format).
///
/// Single manager only: its lease is trivially held (every acquire succeeds,
/// always in epoch 1, and saves are not fenced), because a local file cannot
/// be shared by managers on several machines anyway. Two managers on one
/// directory would both believe they are the primary; standby managers need
/// a shared transactional store.
#[derive(Debug)]
pub struct FileStore {
    inner: Arc<FileInner>,
}

#[derive(Debug)]
struct FileInner {
    dir: PathBuf,
    // Serialises saves: two concurrent saves would share the tmp file.
    save_lock: Mutex<()>,
}

impl FileStore {
    /// A store in `dir`, which is created if missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<FileStore, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            op: "create directory",
            path: dir.clone(),
            source,
        })?;
        Ok(FileStore {
            inner: Arc::new(FileInner {
                dir,
                save_lock: Mutex::new(()),
            }),
        })
    }

    /// The file holding the record.
    pub fn path(&self) -> PathBuf {
        self.inner.path()
    }
}

impl FileInner {
    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn load(&self) -> Result<Option<ClusterRecord>, StoreError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    op: "read",
                    path,
                    source,
                });
            }
        };
        decode_record(&path.display().to_string(), &bytes).map(Some)
    }

    fn save(&self, bytes: &[u8]) -> Result<(), StoreError> {
        let _serial = self.save_lock.lock();
        let tmp = self.dir.join(TMP_NAME);
        let io_err = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { op, path, source }
        };
        let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(bytes).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(file);
        let path = self.path();
        fs::rename(&tmp, &path).map_err(io_err("rename over", &path))?;
        // The rename is durable only once the directory is.
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_err("fsync directory", &self.dir))?;
        Ok(())
    }
}

/// Runs blocking file work off the async threads (an fsync takes
/// milliseconds). A panic in it is reported as an unavailable store.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| {
            Err(StoreError::Unavailable {
                reason: format!("file store task failed: {join}"),
            })
        })
}

impl ClusterStore for FileStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<ClusterRecord>, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || inner.load()))
    }

    fn save<'a>(
        &'a self,
        record: &'a ClusterRecord,
        _fence: &'a LeaseFence,
        _now_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let bytes = encode_record(record)?;
            blocking(move || inner.save(&bytes)).await
        })
    }

    fn acquire_or_renew<'a>(
        &'a self,
        _holder: &'a str,
        _address: &'a str,
        ttl: Duration,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<LeaseState, StoreError>> {
        // Trivially held: see the type's docs.
        Box::pin(std::future::ready(Ok(LeaseState::Held {
            epoch: 1,
            expires_at_ms: now_ms.saturating_add(ttl.as_millis() as u64),
        })))
    }

    fn release<'a>(&'a self, _fence: &'a LeaseFence) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The record and a real lease in memory, shared by its clones: a simulated
/// manager "restarts" by building a new service on a clone of the same
/// store, and two services on clones of one store contend for its lease.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    state: Arc<Mutex<MemState>>,
    fail_saves: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct MemState {
    record: Option<ClusterRecord>,
    lease: Option<LeaseRecord>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// Makes every later `save` fail (or succeed again), to test that a
    /// change that could not be persisted is not published.
    pub fn set_fail_saves(&self, fail: bool) {
        self.fail_saves.store(fail, Ordering::SeqCst);
    }

    /// The last saved record.
    pub fn snapshot(&self) -> Option<ClusterRecord> {
        self.state.lock().record.clone()
    }

    /// The lease as stored.
    pub fn lease(&self) -> Option<LeaseRecord> {
        self.state.lock().lease.clone()
    }
}

impl ClusterStore for MemStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<ClusterRecord>, StoreError>> {
        Box::pin(std::future::ready(Ok(self.state.lock().record.clone())))
    }

    fn save<'a>(
        &'a self,
        record: &'a ClusterRecord,
        fence: &'a LeaseFence,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let result = if self.fail_saves.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable {
                reason: "MemStore set to fail saves".into(),
            })
        } else {
            // One lock for the check and the write: the same atomicity a
            // KV store gets from doing both in one transaction.
            let mut state = self.state.lock();
            LeaseRecord::admit(state.lease.as_ref(), fence, now_ms).map(|()| {
                state.record = Some(record.clone());
            })
        };
        Box::pin(std::future::ready(result))
    }

    fn acquire_or_renew<'a>(
        &'a self,
        holder: &'a str,
        address: &'a str,
        ttl: Duration,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<LeaseState, StoreError>> {
        let mut state = self.state.lock();
        let (outcome, next) =
            LeaseRecord::acquire(state.lease.as_ref(), holder, address, ttl, now_ms);
        if let Some(next) = next {
            state.lease = Some(next);
        }
        Box::pin(std::future::ready(Ok(outcome)))
    }

    fn release<'a>(&'a self, fence: &'a LeaseFence) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut state = self.state.lock();
        if let Some(next) = LeaseRecord::release(state.lease.as_ref(), fence) {
            state.lease = Some(next);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use flyfs_proto::ids::{ChainId, ChainVersion, NodeId, RoutingVersion, TargetId};
    use flyfs_proto::wire::mgmt::{ChainInfo, ChainTarget, PublicState};

    use super::*;
    use crate::mgmt::cluster::{NodeRecord, TargetRecord};

    fn sample() -> ClusterRecord {
        let mut record = ClusterRecord {
            routing_version: RoutingVersion(9),
            ..ClusterRecord::default()
        };
        record.nodes.insert(
            NodeId(1),
            NodeRecord {
                addr: "127.0.0.1:7000".into(),
            },
        );
        record.targets.insert(
            TargetId(10),
            TargetRecord {
                node: NodeId(1),
                disk: 0,
                chain: Some(ChainId(3)),
                replaces: None,
                leaving: None,
            },
        );
        record.chains.insert(
            ChainId(3),
            ChainInfo {
                id: ChainId(3),
                version: ChainVersion(4),
                targets: vec![ChainTarget {
                    target: TargetId(10),
                    state: PublicState::LastSrv,
                }],
            },
        );
        record
    }

    fn fence(holder: &str, epoch: u64) -> LeaseFence {
        LeaseFence {
            holder: holder.into(),
            epoch,
        }
    }

    #[tokio::test]
    async fn file_round_trip_and_missing_file_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path().join("mgmt")).expect("open");
        assert!(
            store.load().await.expect("load").is_none(),
            "missing file = None"
        );
        store
            .save(&sample(), &fence("a", 1), 0)
            .await
            .expect("save");
        assert_eq!(store.load().await.expect("load"), Some(sample()));
        // A second save replaces the first.
        let mut next = sample();
        next.routing_version = RoutingVersion(10);
        store.save(&next, &fence("a", 1), 0).await.expect("save");
        let reopened = FileStore::open(dir.path().join("mgmt")).expect("reopen");
        assert_eq!(reopened.load().await.expect("load"), Some(next));
        assert!(!dir.path().join("mgmt").join(TMP_NAME).exists());
    }

    #[tokio::test]
    async fn corrupt_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("open");
        store
            .save(&sample(), &fence("a", 1), 0)
            .await
            .expect("save");
        let mut bytes = fs::read(store.path()).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(store.path(), &bytes).expect("write");
        let err = store
            .load()
            .await
            .expect_err("a flipped bit must be detected");
        let message = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{message}");
        assert!(
            message.contains("cluster.rec") && message.contains("checksum"),
            "{message}"
        );

        bytes[last] ^= 0x40;
        bytes[0] = b'X';
        fs::write(store.path(), &bytes).expect("write");
        let message = store.load().await.expect_err("bad magic").to_string();
        assert!(message.contains("magic"), "{message}");
    }

    #[tokio::test]
    async fn truncated_file_is_an_error_at_every_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("open");
        store
            .save(&sample(), &fence("a", 1), 0)
            .await
            .expect("save");
        let bytes = fs::read(store.path()).expect("read");
        for len in 0..bytes.len() {
            fs::write(store.path(), &bytes[..len]).expect("write");
            let err = store
                .load()
                .await
                .expect_err("truncated file must not load");
            assert!(
                matches!(err, StoreError::Corrupt { .. }),
                "len {len}: {err}"
            );
            assert!(err.to_string().contains("cluster.rec"), "len {len}: {err}");
        }
    }

    #[tokio::test]
    async fn garbage_with_a_valid_header_is_a_decode_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("open");
        fs::write(store.path(), frame(RECORD_MAGIC, &[0xc1u8, 0xff, 0x00])).expect("write");
        let err = store.load().await.expect_err("garbage body");
        assert!(matches!(err, StoreError::Decode { .. }), "{err}");
    }

    #[test]
    fn a_lease_frame_is_not_a_record_and_round_trips() {
        let lease = LeaseRecord {
            holder: "m1".into(),
            address: "10.0.0.1:7000".into(),
            epoch: 3,
            expires_at_ms: 12_345,
        };
        let bytes = lease.encode().expect("encode");
        assert_eq!(LeaseRecord::decode("lease", &bytes).expect("decode"), lease);
        let err = decode_record("MGMT/lease", &bytes).expect_err("wrong magic");
        assert!(err.to_string().contains("MGMT/lease"), "{err}");
        assert!(err.to_string().contains("magic"), "{err}");
    }

    proptest::proptest! {
        /// Decoders see bytes from disk or the KV store: any bytes give a
        /// value or an error, never a panic, framed or not.
        #[test]
        fn decoders_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..64), raw in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode_record("x", &raw);
            let _ = LeaseRecord::decode("x", &raw);
            let _ = decode_record("x", &frame(RECORD_MAGIC, &body));
            let _ = LeaseRecord::decode("x", &frame(LEASE_MAGIC, &body));
        }
    }

    #[test]
    fn lease_rules() {
        let ttl = Duration::from_millis(1000);
        // Nobody held it: taken in epoch 1.
        let (state, next) = LeaseRecord::acquire(None, "a", "addr-a", ttl, 100);
        assert_eq!(
            state,
            LeaseState::Held {
                epoch: 1,
                expires_at_ms: 1100
            }
        );
        let lease = next.expect("written");
        // The holder renews before expiry: same epoch, later expiry.
        let (state, next) = LeaseRecord::acquire(Some(&lease), "a", "addr-a", ttl, 600);
        assert_eq!(
            state,
            LeaseState::Held {
                epoch: 1,
                expires_at_ms: 1600
            }
        );
        let lease = next.expect("written");
        // Another manager sees it held, and who holds it.
        let (state, next) = LeaseRecord::acquire(Some(&lease), "b", "addr-b", ttl, 1599);
        assert_eq!(
            state,
            LeaseState::HeldBy {
                holder: "a".into(),
                address: "addr-a".into(),
                expires_at_ms: 1600
            }
        );
        assert!(next.is_none());
        assert!(LeaseRecord::admit(Some(&lease), &fence("a", 1), 1599).is_ok());
        // Once expired, another takes it in a new epoch...
        let (state, next) = LeaseRecord::acquire(Some(&lease), "b", "addr-b", ttl, 1600);
        assert_eq!(
            state,
            LeaseState::Held {
                epoch: 2,
                expires_at_ms: 2600
            }
        );
        let lease = next.expect("written");
        // ...and the deposed holder's saves are refused, naming the new one.
        let err = LeaseRecord::admit(Some(&lease), &fence("a", 1), 1700).expect_err("deposed");
        assert!(matches!(err, StoreError::NotLeaseHolder { .. }), "{err}");
        assert!(err.to_string().contains("addr-b"), "{err}");
        // An expired lease admits no save, even from its holder.
        let err = LeaseRecord::admit(Some(&lease), &fence("b", 2), 2600).expect_err("expired");
        assert!(err.to_string().contains("expired"), "{err}");
        // The holder's lease lapsed and it takes it back: a new epoch, so
        // saves fenced with the old one stay refused.
        let (state, _) = LeaseRecord::acquire(Some(&lease), "b", "addr-b", ttl, 2700);
        assert!(
            matches!(state, LeaseState::Held { epoch: 3, .. }),
            "{state:?}"
        );
        // Release: only by the holder of the epoch; expires at once.
        assert_eq!(LeaseRecord::release(Some(&lease), &fence("a", 2)), None);
        let released = LeaseRecord::release(Some(&lease), &fence("b", 2)).expect("released");
        assert_eq!(released.expires_at_ms, 0);
        let (state, _) = LeaseRecord::acquire(Some(&released), "a", "addr-a", ttl, 1800);
        assert!(
            matches!(state, LeaseState::Held { epoch: 3, .. }),
            "{state:?}"
        );
    }

    #[tokio::test]
    async fn mem_store_is_shared_by_clones_fences_saves_and_can_fail_saves() {
        let store = MemStore::new();
        assert!(store.load().await.expect("load").is_none());
        let clone = store.clone();
        let ttl = Duration::from_secs(1);
        let held = clone
            .acquire_or_renew("a", "addr-a", ttl, 0)
            .await
            .expect("acquire");
        assert!(matches!(held, LeaseState::Held { epoch: 1, .. }));
        clone
            .save(&sample(), &fence("a", 1), 10)
            .await
            .expect("save");
        assert_eq!(store.load().await.expect("load"), Some(sample()));
        assert_eq!(store.lease().map(|l| l.holder), Some("a".to_string()));

        // Another holder waits for expiry, then takes over; the first one's
        // saves are refused from then on.
        let other = store
            .acquire_or_renew("b", "addr-b", ttl, 500)
            .await
            .expect("acquire");
        assert!(matches!(other, LeaseState::HeldBy { .. }), "{other:?}");
        let other = store
            .acquire_or_renew("b", "addr-b", ttl, 1000)
            .await
            .expect("acquire");
        assert!(
            matches!(other, LeaseState::Held { epoch: 2, .. }),
            "{other:?}"
        );
        let mut stale = sample();
        stale.routing_version = RoutingVersion(1);
        let err = clone
            .save(&stale, &fence("a", 1), 1001)
            .await
            .expect_err("deposed");
        assert!(matches!(err, StoreError::NotLeaseHolder { .. }), "{err}");
        assert_eq!(store.snapshot(), Some(sample()));

        store.set_fail_saves(true);
        assert!(store.save(&sample(), &fence("b", 2), 1001).await.is_err());
        store.set_fail_saves(false);
        store
            .save(&sample(), &fence("b", 2), 1001)
            .await
            .expect("save");
    }
}
