//! `KvClusterStore`: the cluster manager's durable record and lease on the
//! transactional KV layer, so a multi-machine deployment keeps all cluster
//! state in FoundationDB (as 3FS does) and a standby manager on another
//! machine can take over from the primary.
//!
//! craq owns the [`ClusterStore`] trait (the manager must not know about the
//! KV layer: fs-meta depends on craq, not the other way round); this file
//! implements it on any [`Kv`].
//!
//! Keys, under the `MGMT` tag (no namespace tag is a prefix of it):
//! * `MGMT/lease`: the [`LeaseRecord`] (holder, address, epoch,
//!   `expires_at_ms`), framed like the record (`FLYLEAS1`).
//! * `MGMT/record/head`: [`RecordHead`]: total length, chunk count and
//!   CRC32C of the record's bytes.
//! * `MGMT/record/chunk/` + chunk index (u32, big endian, so chunks sort in
//!   order): the record's bytes (craq's `encode_record`, the same bytes as
//!   `cluster.rec`), cut into values of at most
//!   [`Limits::value_bytes_max`]: a cluster with thousands of targets
//!   outgrows FoundationDB's 100 KB value limit.
//!
//! A save is one transaction: read the lease and check that the saver holds
//! it (holder, epoch, not expired), clear the old chunks, write the new
//! chunks and the head. Reading the lease in the same serializable
//! transaction is the fence: a manager that took the lease over has written
//! the lease key, so a deposed primary's save either sees the new holder or
//! conflicts and, retried, sees it then. The whole record must fit in one
//! transaction ([`Limits::transaction_bytes_max`], 10 MB with FoundationDB);
//! a larger one is refused with [`StoreError::TooLarge`] before anything is
//! written.
//!
//! Time: lease times are wall-clock milliseconds passed in by the manager
//! (tests pass their own). Lease safety assumes bounded clock skew between
//! managers (a holder stops serving a quarter of the ttl before its lease
//! expires) plus the fencing of saves above, which holds whatever the
//! clocks say.

use std::fmt;
use std::time::Duration;

use super::store::BoxFuture;
use super::{
    ClusterRecord, ClusterStore, LeaseFence, LeaseRecord, LeaseState, StoreError, decode_record,
    encode_record, record_checksum,
};

use flyfs_kv::{Kv, KvError, Limits, RangeOptions, RetryOptions, Transaction, TxError};
use flyfs_time::Backoff;

/// The lease key.
pub const LEASE_KEY: &[u8] = b"MGMT/lease";
/// The record's head key.
pub const RECORD_HEAD_KEY: &[u8] = b"MGMT/record/head";
/// The prefix of the record's chunk keys.
pub const RECORD_CHUNK_PREFIX: &[u8] = b"MGMT/record/chunk/";

/// The head of a chunked record: what a load checks the chunks against.
///
/// ```text
/// 0          8         12             20            24
/// | magic    | version | total length | chunk count | CRC32C of all chunks' bytes |
/// | FLYMGMTH | u32 = 1 | u64          | u32         | u32                         |
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHead {
    pub length: u64,
    pub chunks: u32,
    pub crc: u32,
}

const HEAD_MAGIC: [u8; 8] = *b"FLYMGMTH";
const HEAD_VERSION: u32 = 1;
const HEAD_BYTES: usize = 28;

impl RecordHead {
    pub fn encode(&self) -> [u8; HEAD_BYTES] {
        let mut bytes = [0u8; HEAD_BYTES];
        bytes[0..8].copy_from_slice(&HEAD_MAGIC);
        bytes[8..12].copy_from_slice(&HEAD_VERSION.to_le_bytes());
        bytes[12..20].copy_from_slice(&self.length.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.chunks.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.crc.to_le_bytes());
        bytes
    }

    /// Never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<RecordHead, StoreError> {
        let corrupt = |problem: String| StoreError::Corrupt {
            location: location(RECORD_HEAD_KEY),
            problem,
        };
        let Ok(bytes) = <&[u8; HEAD_BYTES]>::try_from(bytes) else {
            return Err(corrupt(format!(
                "head is {} bytes, expected {HEAD_BYTES}",
                bytes.len()
            )));
        };
        if bytes[0..8] != HEAD_MAGIC {
            return Err(corrupt(format!("bad magic {:02x?}", &bytes[0..8])));
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let version = u32_at(8);
        if version != HEAD_VERSION {
            return Err(corrupt(format!(
                "unsupported head version {version} (this build reads {HEAD_VERSION})"
            )));
        }
        let mut length = [0u8; 8];
        length.copy_from_slice(&bytes[12..20]);
        Ok(RecordHead {
            length: u64::from_le_bytes(length),
            chunks: u32_at(20),
            crc: u32_at(24),
        })
    }
}

/// A key as error messages show it.
fn location(key: &[u8]) -> String {
    format!("KV key {}", key.escape_ascii())
}

/// The key of chunk `index`.
pub fn chunk_key(index: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(RECORD_CHUNK_PREFIX.len() + 4);
    key.extend_from_slice(RECORD_CHUNK_PREFIX);
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// What a transaction body fails with: the KV layer (retried when the
/// error is retryable) or the store's own refusal (never retried).
#[derive(Debug)]
enum TxFail {
    Kv(KvError),
    Store(StoreError),
}

impl From<KvError> for TxFail {
    fn from(error: KvError) -> Self {
        TxFail::Kv(error)
    }
}

impl From<StoreError> for TxFail {
    fn from(error: StoreError) -> Self {
        TxFail::Store(error)
    }
}

impl TxError for TxFail {
    fn kv_error(&self) -> Option<&KvError> {
        match self {
            TxFail::Kv(error) => Some(error),
            TxFail::Store(_) => None,
        }
    }
}

impl TxFail {
    fn into_store(self, op: &'static str) -> StoreError {
        match self {
            TxFail::Kv(error) => StoreError::Backend {
                op,
                source: Box::new(error),
            },
            TxFail::Store(error) => error,
        }
    }
}

/// The cluster manager's record and lease in a transactional KV store.
/// Clones share the store.
#[derive(Clone)]
pub struct KvClusterStore<K: Kv> {
    kv: K,
    retry: RetryOptions,
    chunk_bytes: usize,
}

impl<K: Kv> fmt::Debug for KvClusterStore<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvClusterStore")
            .field("chunk_bytes", &self.chunk_bytes)
            .finish_non_exhaustive()
    }
}

impl<K: Kv> KvClusterStore<K> {
    /// A store on `kv`, cutting the record into chunks as large as the
    /// store's values may be.
    pub fn new(kv: K) -> KvClusterStore<K> {
        let chunk_bytes = kv.limits().value_bytes_max.max(1);
        KvClusterStore {
            kv,
            // Few attempts with short waits: the lease is renewed every
            // third of its ttl, and a renewal that is retried for long is
            // worth less than the next one.
            retry: RetryOptions {
                attempts_max: 10,
                backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(50)),
            },
            chunk_bytes,
        }
    }

    /// Smaller chunks than the value limit (tests, to cut small records).
    pub fn with_chunk_bytes(mut self, chunk_bytes: usize) -> KvClusterStore<K> {
        self.chunk_bytes = chunk_bytes.clamp(1, self.kv.limits().value_bytes_max.max(1));
        self
    }

    pub fn kv(&self) -> &K {
        &self.kv
    }

    async fn read_lease(tx: &K::Tx) -> Result<Option<LeaseRecord>, TxFail> {
        match tx.get(LEASE_KEY, false).await? {
            Some(bytes) => Ok(Some(LeaseRecord::decode(&location(LEASE_KEY), &bytes)?)),
            None => Ok(None),
        }
    }

    /// What a save writes, checked against the transaction limit.
    fn check_size(
        &self,
        record_bytes: usize,
        chunks: usize,
        limits: &Limits,
    ) -> Result<(), StoreError> {
        let prefix_end = flyfs_kv::prefix_end(RECORD_CHUNK_PREFIX);
        let written = record_bytes
            + chunks * (RECORD_CHUNK_PREFIX.len() + 4)
            + RECORD_CHUNK_PREFIX.len()
            + prefix_end.len()
            + RECORD_HEAD_KEY.len()
            + HEAD_BYTES;
        if written > limits.transaction_bytes_max {
            return Err(StoreError::TooLarge {
                bytes: written,
                max: limits.transaction_bytes_max,
            });
        }
        Ok(())
    }

    async fn load_record(&self) -> Result<Option<ClusterRecord>, StoreError> {
        let bytes = flyfs_kv::run_read_only(&self.kv, &self.retry, |tx| async move {
            let Some(head) = tx.get(RECORD_HEAD_KEY, false).await? else {
                return Ok(None);
            };
            let head = RecordHead::decode(&head)?;
            let chunks = tx
                .get_range(&RangeOptions::prefix(RECORD_CHUNK_PREFIX))
                .await?;
            Ok::<_, TxFail>(Some((head, chunks.kvs)))
        })
        .await
        .map_err(|e| e.into_store("load the cluster record"))?;
        let Some((head, chunks)) = bytes else {
            return Ok(None);
        };
        let corrupt = |problem: String| StoreError::Corrupt {
            location: location(RECORD_CHUNK_PREFIX),
            problem,
        };
        if chunks.len() != head.chunks as usize {
            return Err(corrupt(format!(
                "{} chunks stored, the head says {}",
                chunks.len(),
                head.chunks
            )));
        }
        let mut record =
            Vec::with_capacity(usize::try_from(head.length).unwrap_or(0).min(64 << 20));
        for (index, chunk) in chunks.iter().enumerate() {
            let expected = chunk_key(index as u32);
            if chunk.key[..] != expected[..] {
                return Err(corrupt(format!(
                    "chunk {index} is missing (found {} in its place)",
                    chunk.key.escape_ascii()
                )));
            }
            record.extend_from_slice(&chunk.value);
        }
        if record.len() as u64 != head.length {
            return Err(corrupt(format!(
                "chunks hold {} bytes, the head says {}",
                record.len(),
                head.length
            )));
        }
        let crc = record_checksum(&record);
        if crc != head.crc {
            return Err(corrupt(format!(
                "chunks' checksum {crc:#010x} differs from the head's {:#010x}",
                head.crc
            )));
        }
        decode_record(&location(RECORD_CHUNK_PREFIX), &record).map(Some)
    }

    async fn save_record(
        &self,
        record: &ClusterRecord,
        fence: &LeaseFence,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let bytes = encode_record(record)?;
        let chunk_bytes = self.chunk_bytes;
        let chunks = bytes.len().div_ceil(chunk_bytes);
        self.check_size(bytes.len(), chunks, &self.kv.limits())?;
        let head = RecordHead {
            length: bytes.len() as u64,
            chunks: u32::try_from(chunks).map_err(|_| StoreError::TooLarge {
                bytes: bytes.len(),
                max: chunk_bytes.saturating_mul(u32::MAX as usize),
            })?,
            crc: record_checksum(&bytes),
        }
        .encode();
        let bytes: &[u8] = &bytes;
        let head: &[u8] = &head;
        flyfs_kv::run(&self.kv, &self.retry, move |tx| async move {
            // The fence, in the same transaction as the write.
            let lease = Self::read_lease(&tx).await?;
            LeaseRecord::admit(lease.as_ref(), fence, now_ms)?;
            tx.clear_range(
                RECORD_CHUNK_PREFIX,
                &flyfs_kv::prefix_end(RECORD_CHUNK_PREFIX),
            )?;
            for (index, chunk) in bytes.chunks(chunk_bytes).enumerate() {
                tx.set(&chunk_key(index as u32), chunk)?;
            }
            tx.set(RECORD_HEAD_KEY, head)?;
            Ok::<_, TxFail>(())
        })
        .await
        .map_err(|e| e.into_store("save the cluster record"))
    }

    async fn acquire(
        &self,
        holder: &str,
        address: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<LeaseState, StoreError> {
        flyfs_kv::run(&self.kv, &self.retry, move |tx| async move {
            let current = Self::read_lease(&tx).await?;
            let (state, next) =
                LeaseRecord::acquire(current.as_ref(), holder, address, ttl, now_ms);
            if let Some(next) = next {
                tx.set(LEASE_KEY, &next.encode()?)?;
            }
            Ok::<_, TxFail>(state)
        })
        .await
        .map_err(|e| e.into_store("take or renew the manager lease"))
    }

    async fn release_lease(&self, fence: &LeaseFence) -> Result<(), StoreError> {
        flyfs_kv::run(&self.kv, &self.retry, move |tx| async move {
            let current = Self::read_lease(&tx).await?;
            if let Some(next) = LeaseRecord::release(current.as_ref(), fence) {
                tx.set(LEASE_KEY, &next.encode()?)?;
            }
            Ok::<_, TxFail>(())
        })
        .await
        .map_err(|e| e.into_store("release the manager lease"))
    }

    /// The lease as stored (for tools and tests).
    pub async fn lease(&self) -> Result<Option<LeaseRecord>, StoreError> {
        flyfs_kv::run_read_only(&self.kv, &self.retry, |tx| async move {
            Self::read_lease(&tx).await
        })
        .await
        .map_err(|e| e.into_store("read the manager lease"))
    }
}

impl<K: Kv> ClusterStore for KvClusterStore<K> {
    fn load(&self) -> BoxFuture<'_, Result<Option<ClusterRecord>, StoreError>> {
        Box::pin(self.load_record())
    }

    fn save<'a>(
        &'a self,
        record: &'a ClusterRecord,
        fence: &'a LeaseFence,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.save_record(record, fence, now_ms))
    }

    fn acquire_or_renew<'a>(
        &'a self,
        holder: &'a str,
        address: &'a str,
        ttl: Duration,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<LeaseState, StoreError>> {
        Box::pin(self.acquire(holder, address, ttl, now_ms))
    }

    fn release<'a>(&'a self, fence: &'a LeaseFence) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.release_lease(fence))
    }
}

#[cfg(test)]
mod tests {
    use crate::mgmt::{NodeRecord, TargetRecord};
    use flyfs_proto::ids::{ChainId, ChainVersion, NodeId, RoutingVersion, TargetId};
    use flyfs_proto::wire::mgmt::{ChainInfo, ChainTarget, PublicState};

    use super::*;
    use bytes::Bytes;
    use flyfs_kv::mem::MemKv;

    const TTL: Duration = Duration::from_secs(2);

    /// A cluster of `nodes` nodes with three targets each and a chain of
    /// three over every third target: big enough, with long addresses, to
    /// outgrow one 100 KB value when `nodes` is in the hundreds.
    fn cluster(nodes: u32) -> ClusterRecord {
        let mut record = ClusterRecord {
            routing_version: RoutingVersion(u64::from(nodes) + 1),
            ..ClusterRecord::default()
        };
        for n in 0..nodes {
            record.nodes.insert(
                NodeId(n),
                NodeRecord {
                    addr: format!(
                        "storage-node-{n:05}.rack-{:03}.example.invalid:7100",
                        n / 40
                    ),
                },
            );
        }
        let mut target = 0u64;
        for c in 0..nodes {
            let mut members = Vec::new();
            for r in 0..3 {
                let node = NodeId((c + r) % nodes);
                target += 1;
                record.targets.insert(
                    TargetId(target),
                    TargetRecord {
                        node,
                        disk: r,
                        chain: Some(ChainId(c)),
                        replaces: None,
                        leaving: None,
                    },
                );
                members.push(ChainTarget {
                    target: TargetId(target),
                    state: PublicState::Serving,
                });
            }
            record.chains.insert(
                ChainId(c),
                ChainInfo {
                    id: ChainId(c),
                    version: ChainVersion(u32::from(c % 7 == 0) + 1),
                    targets: members,
                },
            );
        }
        record
    }

    async fn lease(store: &KvClusterStore<MemKv>, holder: &str, now_ms: u64) -> LeaseState {
        store
            .acquire_or_renew(holder, &format!("{holder}:7000"), TTL, now_ms)
            .await
            .expect("lease")
    }

    fn fence(holder: &str, epoch: u64) -> LeaseFence {
        LeaseFence {
            holder: holder.into(),
            epoch,
        }
    }

    #[tokio::test]
    async fn small_and_large_records_round_trip() {
        let store = KvClusterStore::new(MemKv::new());
        assert_eq!(store.load().await.expect("load"), None);
        assert!(matches!(
            lease(&store, "m1", 0).await,
            LeaseState::Held { epoch: 1, .. }
        ));

        let small = cluster(3);
        store.save(&small, &fence("m1", 1), 1).await.expect("save");
        assert_eq!(store.load().await.expect("load"), Some(small));

        let large = cluster(1500);
        let encoded = encode_record(&large).expect("encode").len();
        assert!(
            encoded > 2 * 100_000,
            "the test record must span chunks: {encoded}"
        );
        store.save(&large, &fence("m1", 1), 2).await.expect("save");
        assert_eq!(store.load().await.expect("load"), Some(large.clone()));
        let head =
            RecordHead::decode(&get(&store, RECORD_HEAD_KEY).await.expect("head")).expect("head");
        assert_eq!(head.chunks as usize, encoded.div_ceil(100_000));

        // A smaller record replaces every chunk of the larger one.
        let small = cluster(2);
        store.save(&small, &fence("m1", 1), 3).await.expect("save");
        assert_eq!(store.load().await.expect("load"), Some(small));
        assert!(
            get(&store, &chunk_key(1)).await.is_none(),
            "stale chunk left"
        );
    }

    #[tokio::test]
    async fn a_record_over_the_transaction_limit_is_refused_whole() {
        let limits = Limits {
            transaction_bytes_max: 50_000,
            value_bytes_max: 10_000,
            ..Limits::default()
        };
        let store = KvClusterStore::new(MemKv::with_limits(limits));
        lease(&store, "m1", 0).await;
        let fits = cluster(20);
        store.save(&fits, &fence("m1", 1), 1).await.expect("save");
        let err = store
            .save(&cluster(500), &fence("m1", 1), 2)
            .await
            .expect_err("too large");
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
        assert_eq!(store.load().await.expect("load"), Some(fits));
    }

    async fn get(store: &KvClusterStore<MemKv>, key: &[u8]) -> Option<Bytes> {
        let tx = store.kv().begin_read_only().expect("begin");
        tx.get(key, false).await.expect("get")
    }

    async fn set(store: &KvClusterStore<MemKv>, key: &[u8], value: &[u8]) {
        let tx = store.kv().begin().expect("begin");
        tx.set(key, value).expect("set");
        tx.commit().await.expect("commit");
    }

    #[tokio::test]
    async fn damaged_chunks_are_errors_naming_the_key() {
        let store = KvClusterStore::new(MemKv::new()).with_chunk_bytes(64);
        lease(&store, "m1", 0).await;
        store
            .save(&cluster(4), &fence("m1", 1), 1)
            .await
            .expect("save");
        let original = get(&store, &chunk_key(1)).await.expect("chunk 1");

        let mut flipped = original.to_vec();
        flipped[0] ^= 1;
        set(&store, &chunk_key(1), &flipped).await;
        let err = store.load().await.expect_err("flipped bit");
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(err.to_string().contains("MGMT/record/chunk/"), "{err}");

        let tx = store.kv().begin().expect("begin");
        tx.clear(&chunk_key(1)).expect("clear");
        tx.commit().await.expect("commit");
        let err = store.load().await.expect_err("missing chunk");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");

        set(&store, &chunk_key(1), &original).await;
        assert!(store.load().await.is_ok());
        set(&store, RECORD_HEAD_KEY, b"short").await;
        let err = store.load().await.expect_err("bad head");
        assert!(err.to_string().contains("MGMT/record/head"), "{err}");
    }

    proptest::proptest! {
        /// The head comes from the store: any bytes decode or fail cleanly,
        /// and an encoded head round-trips.
        #[test]
        fn heads_never_panic(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..40), length: u64, chunks: u32, crc: u32) {
            let _ = RecordHead::decode(&raw);
            let head = RecordHead { length, chunks, crc };
            proptest::prop_assert_eq!(RecordHead::decode(&head.encode()).ok(), Some(head));
        }
    }

    #[tokio::test]
    async fn lease_acquire_renew_expire_and_steal() {
        let store = KvClusterStore::new(MemKv::new());
        assert_eq!(store.lease().await.expect("lease"), None);
        assert_eq!(
            lease(&store, "m1", 1_000).await,
            LeaseState::Held {
                epoch: 1,
                expires_at_ms: 3_000
            }
        );
        // Renewed by its holder: same epoch, later expiry.
        assert_eq!(
            lease(&store, "m1", 2_000).await,
            LeaseState::Held {
                epoch: 1,
                expires_at_ms: 4_000
            }
        );
        // Another manager is told who holds it, and where.
        assert_eq!(
            lease(&store, "m2", 3_999).await,
            LeaseState::HeldBy {
                holder: "m1".into(),
                address: "m1:7000".into(),
                expires_at_ms: 4_000
            }
        );
        // Expired: stolen, in a new epoch.
        assert_eq!(
            lease(&store, "m2", 4_000).await,
            LeaseState::Held {
                epoch: 2,
                expires_at_ms: 6_000
            }
        );
        let stored = store.lease().await.expect("lease").expect("held");
        assert_eq!((stored.holder.as_str(), stored.epoch), ("m2", 2));
        // The old holder now stands by.
        assert!(matches!(
            lease(&store, "m1", 4_500).await,
            LeaseState::HeldBy { .. }
        ));

        // Released: the next taker gets it at once, in a new epoch.
        store.release(&fence("m1", 1)).await.expect("a no-op");
        assert!(matches!(
            lease(&store, "m1", 4_600).await,
            LeaseState::HeldBy { .. }
        ));
        store.release(&fence("m2", 2)).await.expect("release");
        assert!(matches!(
            lease(&store, "m1", 4_700).await,
            LeaseState::Held { epoch: 3, .. }
        ));
    }

    #[tokio::test]
    async fn a_deposed_holder_cannot_save() {
        let store = KvClusterStore::new(MemKv::new());
        lease(&store, "m1", 0).await;
        let first = cluster(3);
        store
            .save(&first, &fence("m1", 1), 100)
            .await
            .expect("save");

        // m1 stops renewing; m2 takes over and saves.
        assert!(matches!(
            lease(&store, "m2", 2_000).await,
            LeaseState::Held { epoch: 2, .. }
        ));
        let second = cluster(5);
        store
            .save(&second, &fence("m2", 2), 2_100)
            .await
            .expect("save");

        // m1 wakes up with an old view (and an old clock): refused, and
        // the record stays m2's.
        let err = store
            .save(&first, &fence("m1", 1), 1_500)
            .await
            .expect_err("deposed");
        assert!(matches!(err, StoreError::NotLeaseHolder { .. }), "{err}");
        assert!(err.to_string().contains("m2"), "{err}");
        assert_eq!(store.load().await.expect("load"), Some(second.clone()));

        // Even after it takes the lease back (m2 gone), its old epoch stays
        // refused: it must reload before it saves again.
        assert!(matches!(
            lease(&store, "m1", 10_000).await,
            LeaseState::Held { epoch: 3, .. }
        ));
        let err = store
            .save(&first, &fence("m1", 1), 10_001)
            .await
            .expect_err("old epoch");
        assert!(matches!(err, StoreError::NotLeaseHolder { .. }), "{err}");
        // An expired lease admits no save, even from its holder's epoch.
        let err = store
            .save(&first, &fence("m1", 3), 12_000)
            .await
            .expect_err("expired");
        assert!(err.to_string().contains("expired"), "{err}");
        assert_eq!(store.load().await.expect("load"), Some(second));
    }

    /// Two managers race for a free lease many times: exactly one wins each
    /// round (the serializable transaction decides), never both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_managers_never_both_hold_the_lease() {
        for round in 0..50u64 {
            let store = KvClusterStore::new(MemKv::new());
            let a = store.clone();
            let b = store.clone();
            let (ra, rb) = tokio::join!(
                tokio::spawn(async move { lease(&a, "a", round).await }),
                tokio::spawn(async move { lease(&b, "b", round).await }),
            );
            let held = [ra.expect("a"), rb.expect("b")]
                .iter()
                .filter(|s| matches!(s, LeaseState::Held { .. }))
                .count();
            assert_eq!(held, 1, "round {round}");
        }
    }
}
