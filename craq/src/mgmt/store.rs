//! Where the cluster manager keeps its durable record (nodes, targets,
//! chains with their public states, chain tables, routing version), behind
//! one narrow trait so the manager runs on a file, in memory (simulation,
//! tests) or later on the metadata service's transactional KV.
//!
//! File format (`cluster.rec` in the store's directory), little endian:
//!
//! ```text
//! 0        8         12            20         24
//! | magic  | version | body length | CRC32C   | body (MessagePack, named fields) ...
//! | FLYMGMT1 | u32 = 1 | u64       | of body  |
//! ```
//!
//! A save writes `cluster.rec.tmp`, fsyncs it, renames it over `cluster.rec`
//! and fsyncs the directory, so a crash leaves either the old or the new
//! record, never a mix. Anything else found on disk (short header, wrong
//! magic or version, short body, checksum or decode failure) is an error that
//! names the file and the problem.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::cluster::ClusterRecord;

/// Durable storage of the manager's [`ClusterRecord`].
///
/// Object safe: the service holds a `Box<dyn ClusterStore>` chosen at the
/// composition root. The metadata issue will implement it on its
/// transactional KV (so any manager can load what the previous primary
/// saved) and add a lease there, so that only the primary among standby
/// managers may save.
///
/// Contract: `save` returns only once the record is durable; after `save`
/// fails, the previous record or the new one may be what `load` returns, and
/// the caller must not publish the new one.
pub trait ClusterStore: Send + Sync + 'static {
    /// The last saved record, or `None` if nothing was ever saved.
    fn load(&self) -> Result<Option<ClusterRecord>, StoreError>;
    /// Replaces the record durably.
    fn save(&self, record: &ClusterRecord) -> Result<(), StoreError>;
}

/// Why the record could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {problem}", path.display())]
    Corrupt { path: PathBuf, problem: String },
    #[error("{}: cannot decode the cluster record: {source}", path.display())]
    Decode {
        path: PathBuf,
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
    /// A store that injects failures (tests) or a backend without a more
    /// specific error.
    #[error("cluster store unavailable: {reason}")]
    Unavailable { reason: String },
}

const MAGIC: [u8; 8] = *b"FLYMGMT1";
const FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: usize = 24;
const FILE_NAME: &str = "cluster.rec";
const TMP_NAME: &str = "cluster.rec.tmp";

/// The record in one file of a directory (see the module docs for the format).
#[derive(Debug)]
pub struct FileStore {
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
            dir,
            save_lock: Mutex::new(()),
        })
    }

    /// The file holding the record.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }
}

/// Encodes a record with its header.
fn encode(record: &ClusterRecord) -> Result<Vec<u8>, StoreError> {
    let body = rmp_serde::to_vec_named(record).map_err(|source| StoreError::Encode { source })?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Decodes a file's bytes; never panics on any input.
fn decode(path: &Path, bytes: &[u8]) -> Result<ClusterRecord, StoreError> {
    let corrupt = |problem: String| StoreError::Corrupt {
        path: path.to_path_buf(),
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
    if field(0, 8) != MAGIC {
        return Err(corrupt(format!("bad magic {:02x?}", field(0, 8))));
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
            "body is {} bytes, header says {length} (truncated or extended file)",
            body.len()
        )));
    }
    let actual = crc32c::crc32c(body);
    if actual != crc {
        return Err(corrupt(format!(
            "body checksum {actual:#010x} differs from header's {crc:#010x}"
        )));
    }
    rmp_serde::from_slice(body).map_err(|source| StoreError::Decode {
        path: path.to_path_buf(),
        source,
    })
}

impl ClusterStore for FileStore {
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
        decode(&path, &bytes).map(Some)
    }

    fn save(&self, record: &ClusterRecord) -> Result<(), StoreError> {
        let bytes = encode(record)?;
        let _serial = self.save_lock.lock();
        let tmp = self.dir.join(TMP_NAME);
        let io_err = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { op, path, source }
        };
        let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(&bytes).map_err(io_err("write", &tmp))?;
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

/// The record in memory, shared by its clones: a simulated manager "restarts"
/// by building a new service on a clone of the same store.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    record: Arc<Mutex<Option<ClusterRecord>>>,
    fail_saves: Arc<AtomicBool>,
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
        self.record.lock().clone()
    }
}

impl ClusterStore for MemStore {
    fn load(&self) -> Result<Option<ClusterRecord>, StoreError> {
        Ok(self.record.lock().clone())
    }

    fn save(&self, record: &ClusterRecord) -> Result<(), StoreError> {
        if self.fail_saves.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                reason: "MemStore set to fail saves".into(),
            });
        }
        *self.record.lock() = Some(record.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use flyfs_rpc::ids::{ChainId, ChainVersion, NodeId, RoutingVersion, TargetId};
    use flyfs_rpc::wire::mgmt::{ChainInfo, ChainTarget, PublicState};

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

    #[test]
    fn file_round_trip_and_missing_file_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path().join("mgmt")).expect("open");
        assert!(store.load().expect("load").is_none(), "missing file = None");
        store.save(&sample()).expect("save");
        assert_eq!(store.load().expect("load"), Some(sample()));
        // A second save replaces the first.
        let mut next = sample();
        next.routing_version = RoutingVersion(10);
        store.save(&next).expect("save");
        let reopened = FileStore::open(dir.path().join("mgmt")).expect("reopen");
        assert_eq!(reopened.load().expect("load"), Some(next));
        assert!(!dir.path().join("mgmt").join(TMP_NAME).exists());
    }

    #[test]
    fn corrupt_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("open");
        store.save(&sample()).expect("save");
        let mut bytes = fs::read(store.path()).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(store.path(), &bytes).expect("write");
        let err = store.load().expect_err("a flipped bit must be detected");
        let message = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{message}");
        assert!(
            message.contains("cluster.rec") && message.contains("checksum"),
            "{message}"
        );

        bytes[last] ^= 0x40;
        bytes[0] = b'X';
        fs::write(store.path(), &bytes).expect("write");
        let message = store.load().expect_err("bad magic").to_string();
        assert!(message.contains("magic"), "{message}");
    }

    #[test]
    fn truncated_file_is_an_error_at_every_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("open");
        store.save(&sample()).expect("save");
        let bytes = fs::read(store.path()).expect("read");
        for len in 0..bytes.len() {
            fs::write(store.path(), &bytes[..len]).expect("write");
            let err = store.load().expect_err("truncated file must not load");
            assert!(
                matches!(err, StoreError::Corrupt { .. }),
                "len {len}: {err}"
            );
            assert!(err.to_string().contains("cluster.rec"), "len {len}: {err}");
        }
    }

    #[test]
    fn garbage_with_a_valid_header_is_a_decode_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("open");
        let body = [0xc1u8, 0xff, 0x00];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        fs::write(store.path(), &bytes).expect("write");
        let err = store.load().expect_err("garbage body");
        assert!(matches!(err, StoreError::Decode { .. }), "{err}");
    }

    #[test]
    fn mem_store_is_shared_by_clones_and_can_fail_saves() {
        let store = MemStore::new();
        assert!(store.load().expect("load").is_none());
        let clone = store.clone();
        clone.save(&sample()).expect("save");
        assert_eq!(store.load().expect("load"), Some(sample()));
        store.set_fail_saves(true);
        assert!(clone.save(&ClusterRecord::default()).is_err());
        assert_eq!(
            store.snapshot(),
            Some(sample()),
            "a failed save changes nothing"
        );
    }
}
