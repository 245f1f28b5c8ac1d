//! flyfs-kvcache: the KV cache for inference engines (docs/kv-cache.md).
//!
//! Blocks of 64 KiB to a few MiB, keyed by a hash of a token prefix, are
//! stored in slots of large slot files (one per size class, slot `s` being
//! chunk `s` of that file) and indexed in the metadata store, so every
//! client sees every other client's blocks and a restart finds them. The API
//! is Mooncake Store's batched shape, with a result per key:
//! [`KvCache::batch_put_from`], [`KvCache::batch_get_into`],
//! [`KvCache::batch_exists`], [`KvCache::batch_remove`]. A batch's data moves
//! as many chunk operations in flight at once over the ordinary storage
//! client (one per block, spread over the chains).
//!
//! It is its own crate because it is a client API with its own protocol
//! (reserve, write, commit; CRC-checked reads) over two clients of
//! flyfs-client, and a language binding links it without the FUSE daemon or
//! any server code. [`blocking::BlockingKvCache`] is the same API without
//! `async`, over plain slices, for bindings.
#![deny(unsafe_code)]

pub mod blocking;

use std::collections::BTreeMap;
use std::sync::Arc;

/// The owned byte views `batch_put_bytes` sends from (a binding makes them
/// over its callers' buffers with `Bytes::from_owner`).
pub use bytes::Bytes;
use flyfs_client::meta::MetaClient;
use flyfs_client::storage::{ClientError, ReadInto, ReadSpec, StorageClient};
use flyfs_proto::ids::{ChainId, ChainTableId, ChunkId};
use flyfs_proto::wire::meta::{
    KV_BATCH_MAX, KV_KEY_BYTES_MAX, KvClassSpec, KvCommit, KvCommitItem, KvCommitReq, KvCommitted,
    KvEntry, KvEvict, KvEvictReq, KvEvictRsp, KvKeysReq, KvLookup, KvOpen, KvOpenReq, KvOpenRsp,
    KvRelease, KvReleaseReq, KvRemove, KvRemoveReq, KvReserve, KvReserveReq, KvSlotGrant,
    MetaError,
};
use flyfs_proto::wire::storage::{BatchRead, Write};
use flyfs_rpc::Network;

/// Why a whole batch failed (per-key outcomes are [`PutResult`] and
/// [`GetResult`]).
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The metadata service refused or could not be reached.
    #[error("KV cache index: {0}")]
    Meta(#[from] MetaError),
    #[error("{keys} keys but {buffers} buffers: each key needs its buffer")]
    LengthMismatch { keys: usize, buffers: usize },
    #[error("key {index} has {len} bytes: KV cache keys have 1 to {KV_KEY_BYTES_MAX}")]
    BadKey { index: usize, len: usize },
    #[error("the cache's record is not usable: {0} (was it written by a newer flyfs, or damaged?)")]
    BadRecord(String),
    /// The blocking facade could not start its runtime.
    #[error("starting the KV cache's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// What `batch_put_from` did with one block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutResult {
    /// Stored: every client finds it now.
    Stored,
    /// The key was already cached (or another writer's block of it was
    /// indexed first): the first writer's block stays.
    Exists,
    /// Its size class is full and the cache was opened with
    /// `evict_when_full` off.
    Full,
    /// Larger than the largest slot.
    TooLarge {
        block_bytes: usize,
        slot_bytes_max: u32,
    },
    /// Writing or indexing it failed; nothing was stored.
    Failed(String),
}

/// What `batch_get_into` found for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GetResult {
    /// The block, this many bytes at the start of the key's buffer.
    Found(usize),
    /// Not in the cache.
    Missing,
    /// The key's buffer is smaller than its block; nothing was copied.
    BufferTooSmall {
        block_bytes: usize,
        buffer_bytes: usize,
    },
    /// Reading it failed (storage unreachable past its deadline).
    Failed(String),
}

impl std::fmt::Display for GetResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GetResult::Found(n) => write!(f, "found, {n} bytes"),
            GetResult::Missing => f.write_str("missing"),
            GetResult::BufferTooSmall {
                block_bytes,
                buffer_bytes,
            } => write!(
                f,
                "the block has {block_bytes} bytes, its buffer only {buffer_bytes}"
            ),
            GetResult::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// How to open the cache, and the layout it is created with if the
/// cluster has none yet (the first opener's layout wins).
#[derive(Clone, Debug)]
pub struct KvCacheConfig {
    /// Size classes, smallest slot first: (slot bytes, slots). Slot bytes
    /// are powers of two from 64 KiB to 64 MiB, within the storage
    /// devices' largest chunk.
    pub classes: Vec<(u32, u32)>,
    pub chain_table: ChainTableId,
    /// Evict entries not read for this long (`evict_aged`); 0: never.
    pub max_age_ms: u64,
    /// Evict the least recently used blocks when a class is full, rather
    /// than answering [`PutResult::Full`].
    pub evict_when_full: bool,
}

impl Default for KvCacheConfig {
    /// 64 KiB, 256 KiB, 1 MiB and 4 MiB slots, 4096 of each (about 21 GiB),
    /// on chain table 1, no age limit, evicting when full.
    fn default() -> KvCacheConfig {
        KvCacheConfig {
            classes: vec![
                (64 << 10, 4096),
                (256 << 10, 4096),
                (1 << 20, 4096),
                (4 << 20, 4096),
            ],
            chain_table: ChainTableId(1),
            max_age_ms: 0,
            evict_when_full: true,
        }
    }
}

/// The KV cache of a cluster, through a metadata and a storage client.
#[derive(Debug)]
pub struct KvCache<N: Network> {
    meta: Arc<MetaClient<N>>,
    storage: Arc<StorageClient<N>>,
    layout: KvOpenRsp,
    evict_when_full: bool,
}

/// A block to write: its position in the caller's batch and its slot.
struct Planned {
    index: usize,
    class: u8,
    grant: KvSlotGrant,
}

fn check_keys(keys: &[&[u8]]) -> Result<(), KvError> {
    for (index, key) in keys.iter().enumerate() {
        if key.is_empty() || key.len() > KV_KEY_BYTES_MAX {
            return Err(KvError::BadKey {
                index,
                len: key.len(),
            });
        }
    }
    Ok(())
}

/// The preamble of every batch with buffers: one buffer per key, every key
/// within bounds; nothing is sent otherwise.
fn check_pairs(keys: &[&[u8]], buffers: usize) -> Result<(), KvError> {
    if keys.len() != buffers {
        return Err(KvError::LengthMismatch {
            keys: keys.len(),
            buffers,
        });
    }
    check_keys(keys)
}

fn key_bufs(keys: &[&[u8]]) -> Vec<serde_bytes::ByteBuf> {
    keys.iter()
        .map(|k| serde_bytes::ByteBuf::from(k.to_vec()))
        .collect()
}

impl<N: Network> KvCache<N> {
    /// Opens the cluster's cache (creating it with `config`'s layout if it
    /// has none) through these clients: a mount's, a program's.
    pub async fn open(
        meta: Arc<MetaClient<N>>,
        storage: Arc<StorageClient<N>>,
        config: &KvCacheConfig,
    ) -> Result<KvCache<N>, KvError> {
        let req = KvOpenReq {
            classes: config
                .classes
                .iter()
                .map(|&(slot_bytes, slots)| KvClassSpec { slot_bytes, slots })
                .collect(),
            chain_table: config.chain_table,
            max_age_ms: config.max_age_ms,
            access_bucket_ms: 0,
            reservation_ms: 0,
        };
        let layout = meta.call::<KvOpen, _>(&req).await?;
        if layout.classes.is_empty()
            || layout
                .classes
                .iter()
                .any(|c| c.chains.is_empty() || c.slot_bytes == 0)
        {
            return Err(KvError::BadRecord(format!(
                "{} classes, some without chains or slots",
                layout.classes.len()
            )));
        }
        Ok(KvCache {
            meta,
            storage,
            layout,
            evict_when_full: config.evict_when_full,
        })
    }

    /// The storage client the blocks move through: on the RDMA transport,
    /// memory registered with it ([`StorageClient::register_arena`]) moves
    /// one-sided both ways (a put's block pulled by the chain's head, a
    /// get's written by the replica into the caller's buffer).
    pub fn storage(&self) -> &Arc<StorageClient<N>> {
        &self.storage
    }

    /// The cache's layout as stored (the first opener's).
    pub fn layout(&self) -> &KvOpenRsp {
        &self.layout
    }

    /// The largest block the cache takes.
    pub fn block_bytes_max(&self) -> u32 {
        self.layout
            .classes
            .iter()
            .map(|c| c.slot_bytes)
            .max()
            .unwrap_or(0)
    }

    /// The smallest class whose slots hold `len` bytes.
    fn class_for(&self, len: usize) -> Option<u8> {
        self.layout
            .classes
            .iter()
            .position(|c| len <= c.slot_bytes as usize)
            .map(|i| i as u8)
    }

    /// Where a slot's block lives.
    fn place(&self, class: u8, slot: u32) -> Option<(ChainId, ChunkId, u32)> {
        let c = self.layout.classes.get(usize::from(class))?;
        let chain = *c.chains.get(slot as usize % c.chains.len())?;
        Some((chain, ChunkId::new(c.ino.0, slot), c.slot_bytes))
    }

    /// Runs `call` over `keys` in requests of at most [`KV_BATCH_MAX`],
    /// each answering one result per key (checked: a short answer would
    /// shift every later key's result onto the wrong key).
    async fn per_request<T, F, Fut>(
        &self,
        keys: &[&[u8]],
        what: &str,
        call: F,
    ) -> Result<Vec<T>, KvError>
    where
        F: Fn(Vec<serde_bytes::ByteBuf>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<T>, MetaError>>,
    {
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(KV_BATCH_MAX) {
            let answered = call(key_bufs(batch)).await?;
            if answered.len() != batch.len() {
                return Err(KvError::Meta(MetaError {
                    errno: libc::EIO,
                    message: format!(
                        "a {what} of {} keys answered {}",
                        batch.len(),
                        answered.len()
                    ),
                    retryable: false,
                }));
            }
            out.extend(answered);
        }
        Ok(out)
    }

    async fn lookup(&self, keys: &[&[u8]]) -> Result<Vec<Option<KvEntry>>, KvError> {
        self.per_request(keys, "lookup", |keys| async move {
            let rsp = self.meta.call::<KvLookup, _>(&KvKeysReq { keys }).await?;
            Ok(rsp.entries)
        })
        .await
    }

    /// Whether each key is cached.
    pub async fn batch_exists(&self, keys: &[&[u8]]) -> Result<Vec<bool>, KvError> {
        check_keys(keys)?;
        Ok(self
            .lookup(keys)
            .await?
            .iter()
            .map(Option::is_some)
            .collect())
    }

    /// Removes each key; one flag per key: whether it was cached.
    pub async fn batch_remove(&self, keys: &[&[u8]]) -> Result<Vec<bool>, KvError> {
        check_keys(keys)?;
        self.per_request(keys, "removal", |keys| async move {
            let rsp = self
                .meta
                .call::<KvRemove, _>(&KvRemoveReq {
                    keys,
                    expect: Vec::new(),
                })
                .await?;
            Ok(rsp.removed)
        })
        .await
    }

    /// Evicts blocks past the cache's age limit and takes back the slots of
    /// writers that never committed, until none is due.
    pub async fn evict_aged(&self) -> Result<KvEvictRsp, KvError> {
        let mut total = KvEvictRsp::default();
        loop {
            let rsp = self
                .meta
                .call::<KvEvict, _>(&KvEvictReq {
                    limit: KV_BATCH_MAX as u32,
                })
                .await?;
            total.evicted += rsp.evicted;
            total.reclaimed += rsp.reclaimed;
            if !rsp.more {
                return Ok(total);
            }
        }
    }

    /// [`batch_put_bytes`](Self::batch_put_bytes) from borrowed memory:
    /// each block is copied once into memory of its own first (counted as
    /// copied), because a borrowed block cannot outlive this call while a
    /// send of it might. Callers that can lend owned memory (a `Bytes`
    /// over their buffer) use `batch_put_bytes`, which copies nothing.
    pub async fn batch_put_from(
        &self,
        keys: &[&[u8]],
        buffers: &[&[u8]],
    ) -> Result<Vec<PutResult>, KvError> {
        // `batch_put_bytes` checks the keys and buffers.
        let owned: Vec<Bytes> = buffers
            .iter()
            .map(|buffer| {
                flyfs_rpc::metrics::payload_copied::<Write>(buffer.len());
                Bytes::copy_from_slice(buffer)
            })
            .collect();
        self.batch_put_bytes(keys, &owned).await
    }

    /// Stores `buffers[i]` under `keys[i]`, all at once: keys already
    /// cached are answered `Exists` without sending their bytes; the others
    /// get a slot each, are written in parallel, and are indexed in one
    /// transaction per batch (of at most 256), where the first writer of a
    /// key wins. Each block is sent from the memory its `Bytes` views
    /// (`Bytes::from_owner` over the caller's buffer), with no copy; that
    /// memory must not change until this returns (a block changed under a
    /// send fails its CRC at the storage node and is not stored), and a
    /// send still queued when a write gave up keeps its `Bytes` alive
    /// until it is written or its connection closes.
    pub async fn batch_put_bytes(
        &self,
        keys: &[&[u8]],
        buffers: &[Bytes],
    ) -> Result<Vec<PutResult>, KvError> {
        check_pairs(keys, buffers.len())?;
        let mut results = Vec::with_capacity(keys.len());
        for (keys, buffers) in keys.chunks(KV_BATCH_MAX).zip(buffers.chunks(KV_BATCH_MAX)) {
            results.extend(self.put_batch(keys, buffers).await?);
        }
        Ok(results)
    }

    async fn put_batch(
        &self,
        keys: &[&[u8]],
        buffers: &[Bytes],
    ) -> Result<Vec<PutResult>, KvError> {
        let mut results: Vec<Option<PutResult>> = vec![None; keys.len()];
        let present = self.lookup(keys).await?;
        // Blocks to store, by class.
        let mut by_class: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
        for (i, buffer) in buffers.iter().enumerate() {
            if present[i].is_some() {
                results[i] = Some(PutResult::Exists);
                continue;
            }
            match self.class_for(buffer.len()) {
                Some(class) => by_class.entry(class).or_default().push(i),
                None => {
                    results[i] = Some(PutResult::TooLarge {
                        block_bytes: buffer.len(),
                        slot_bytes_max: self.block_bytes_max(),
                    })
                }
            }
        }
        let mut planned = Vec::new();
        for (class, indices) in &by_class {
            let rsp = self
                .meta
                .call::<KvReserve, _>(&KvReserveReq {
                    class: *class,
                    count: indices.len() as u32,
                    evict: self.evict_when_full,
                })
                .await?;
            let mut grants = rsp.slots.into_iter();
            for &index in indices {
                match grants.next() {
                    Some(grant) => planned.push(Planned {
                        index,
                        class: *class,
                        grant,
                    }),
                    None => results[index] = Some(PutResult::Full),
                }
            }
        }
        // Every block's write in flight at once, each to its chain's head.
        let writes = planned.iter().map(|p| async move {
            let Some((chain, chunk, slot_bytes)) = self.place(p.class, p.grant.slot) else {
                return Err(format!(
                    "slot {} of class {} is outside the layout",
                    p.grant.slot, p.class
                ));
            };
            if buffers[p.index].is_empty() {
                // An empty block has no bytes to write (storage refuses an
                // empty write); its entry alone is the block.
                return Ok(());
            }
            // A view of the caller's block, not a copy: the send writes
            // the connection straight from it.
            let data = buffers[p.index].clone();
            self.storage
                .write(chain, chunk, 0, data, slot_bytes)
                .await
                .map(drop)
                .map_err(|e: ClientError| e.to_string())
        });
        let written = futures::future::join_all(writes).await;
        let mut commit = Vec::new();
        let mut committed_from = Vec::new();
        let mut release: BTreeMap<u8, Vec<KvSlotGrant>> = BTreeMap::new();
        for (p, outcome) in planned.iter().zip(written) {
            match outcome {
                Ok(()) => {
                    let buffer = &buffers[p.index];
                    commit.push(KvCommitItem {
                        key: keys[p.index].to_vec(),
                        entry: KvEntry {
                            class: p.class,
                            slot: p.grant.slot,
                            generation: p.grant.generation,
                            length: buffer.len() as u32,
                            crc: crc32c::crc32c(buffer),
                        },
                    });
                    committed_from.push(p.index);
                }
                Err(why) => {
                    results[p.index] = Some(PutResult::Failed(why));
                    release.entry(p.class).or_default().push(p.grant);
                }
            }
        }
        if !commit.is_empty() {
            match self
                .meta
                .call::<KvCommit, _>(&KvCommitReq { items: commit })
                .await
            {
                Ok(rsp) => {
                    for (j, &index) in committed_from.iter().enumerate() {
                        results[index] = Some(match rsp.results.get(j) {
                            Some(KvCommitted::Stored) => PutResult::Stored,
                            Some(KvCommitted::Exists) => PutResult::Exists,
                            Some(KvCommitted::Lost) => PutResult::Failed(
                                "the slot's reservation expired before the commit".into(),
                            ),
                            None => PutResult::Failed("the commit answered no result".into()),
                        });
                    }
                }
                Err(e) => {
                    // Not indexed (or not known to be): the reservations
                    // expire and are taken back; nothing was exposed.
                    for &index in &committed_from {
                        results[index] = Some(PutResult::Failed(e.to_string()));
                    }
                }
            }
        }
        for (class, slots) in release {
            if let Err(e) = self
                .meta
                .call::<KvRelease, _>(&KvReleaseReq { class, slots })
                .await
            {
                // The reservations expire and are taken back anyway.
                tracing::debug!(class, "releasing unwritten KV cache slots: {e}");
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| PutResult::Failed("not attempted".into())))
            .collect())
    }

    /// [`batch_get_landing`](Self::batch_get_landing) into borrowed
    /// memory: each block lands in memory of this call's own and is then
    /// copied into its buffer (counted as copied), because a borrowed
    /// buffer cannot be lent to a connection that might still write into it
    /// after a call that gave up. Callers that can lend owned memory use
    /// `batch_get_landing`, which copies nothing.
    pub async fn batch_get_into(
        &self,
        keys: &[&[u8]],
        buffers: &mut [&mut [u8]],
    ) -> Result<Vec<GetResult>, KvError> {
        // `batch_get_landing` checks the keys and buffers.
        let owned: Vec<Vec<u8>> = buffers.iter().map(|b| vec![0u8; b.len()]).collect();
        let (owned, results) = self.batch_get_landing(keys, owned).await;
        let results = results?;
        for ((buffer, landed), result) in buffers.iter_mut().zip(&owned).zip(&results) {
            if let GetResult::Found(n) = *result {
                flyfs_rpc::metrics::payload_copied::<BatchRead>(n);
                buffer[..n].copy_from_slice(&landed[..n]);
            }
        }
        Ok(results)
    }

    /// Reads each key's block into the start of its buffer, straight from
    /// the connection (no copy on the way: flyfs-rpc's landing), and checks
    /// its CRC there; a block whose slot was reused under the reader is
    /// looked up again (gone: `Missing`). The buffers come back in their
    /// order with the results, and nothing writes into them once this
    /// returned; a buffer whose result is not `Found` may hold any bytes.
    pub async fn batch_get_landing<B>(
        &self,
        keys: &[&[u8]],
        buffers: Vec<B>,
    ) -> (Vec<B>, Result<Vec<GetResult>, KvError>)
    where
        B: AsMut<[u8]> + Send + 'static,
    {
        if let Err(e) = check_pairs(keys, buffers.len()) {
            return (buffers, Err(e));
        }
        let mut results = Vec::with_capacity(keys.len());
        let mut done = Vec::with_capacity(buffers.len());
        let mut rest = buffers.into_iter();
        for keys in keys.chunks(KV_BATCH_MAX) {
            let batch: Vec<B> = rest.by_ref().take(keys.len()).collect();
            let (back, outcome) = self.get_batch(keys, batch).await;
            done.extend(back);
            match outcome {
                Ok(batch) => results.extend(batch),
                Err(e) => {
                    done.extend(rest);
                    return (done, Err(e));
                }
            }
        }
        (done, Ok(results))
    }

    async fn get_batch<B>(
        &self,
        keys: &[&[u8]],
        buffers: Vec<B>,
    ) -> (Vec<B>, Result<Vec<GetResult>, KvError>)
    where
        B: AsMut<[u8]> + Send + 'static,
    {
        let entries = match self.lookup(keys).await {
            Ok(entries) => entries,
            Err(e) => return (buffers, Err(e)),
        };
        let mut buffers: Vec<Option<B>> = buffers.into_iter().map(Some).collect();
        let mut results: Vec<GetResult> = vec![GetResult::Missing; keys.len()];
        let mut reads = Vec::new();
        let mut read_for = Vec::new();
        let mut read_into = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let Some(entry) = entry else { continue };
            let Some(buffer) = buffers[i].as_mut() else {
                continue;
            };
            let block_bytes = entry.length as usize;
            let buffer_bytes = buffer.as_mut().len();
            if block_bytes > buffer_bytes {
                results[i] = GetResult::BufferTooSmall {
                    block_bytes,
                    buffer_bytes,
                };
                continue;
            }
            if block_bytes == 0 {
                results[i] = GetResult::Found(0);
                continue;
            }
            let Some((chain, chunk, _)) = self.place(entry.class, entry.slot) else {
                results[i] = GetResult::Failed(format!(
                    "its entry names slot {} of class {}, outside the layout",
                    entry.slot, entry.class
                ));
                continue;
            };
            reads.push(ReadSpec {
                chain,
                chunk,
                offset: 0,
                len: entry.length,
                if_changed_from: None,
            });
            read_for.push((i, *entry));
            read_into.push(buffers[i].take().expect("checked above"));
        }
        let (back, data) = self.storage.read_batch_into(&reads, read_into).await;
        let mut recheck = Vec::new();
        for (((i, entry), mut buffer), read) in read_for.into_iter().zip(back).zip(data) {
            let block_bytes = entry.length as usize;
            let dst = &mut buffer.as_mut()[..block_bytes];
            match read {
                Ok(ReadInto::Landed(result)) if result.len as usize == block_bytes => {
                    if crc32c::crc32c(dst) == entry.crc {
                        results[i] = GetResult::Found(block_bytes);
                    } else {
                        recheck.push((i, entry));
                    }
                }
                Ok(ReadInto::Data(chunk)) if chunk.data.len() == block_bytes => {
                    if crc32c::crc32c(&chunk.data) == entry.crc {
                        // It came another way (a retry, an RDMA reply
                        // buffer): one copy, counted.
                        flyfs_rpc::metrics::payload_copied::<BatchRead>(block_bytes);
                        dst.copy_from_slice(&chunk.data);
                        results[i] = GetResult::Found(block_bytes);
                    } else {
                        recheck.push((i, entry));
                    }
                }
                // Shorter than committed: the slot was reused by a smaller
                // block (or truncated) since the lookup.
                Ok(_) => recheck.push((i, entry)),
                Err(e) => results[i] = GetResult::Failed(e.to_string()),
            }
            buffers[i] = Some(buffer);
        }
        let mut buffers: Vec<B> = buffers
            .into_iter()
            .map(|b| b.expect("every buffer read came back"))
            .collect();
        for (i, seen) in recheck {
            match self.reread(keys[i], seen, buffers[i].as_mut()).await {
                Ok(result) => results[i] = result,
                Err(e) => return (buffers, Err(e)),
            }
        }
        (buffers, Ok(results))
    }

    /// A block whose bytes did not match its entry: its slot was reused
    /// since the lookup (the entry changed or is gone), or a writer whose
    /// reservation had expired overwrote it (the entry is unchanged: it is
    /// dropped, never served).
    async fn reread(
        &self,
        key: &[u8],
        seen: KvEntry,
        buffer: &mut [u8],
    ) -> Result<GetResult, KvError> {
        let now = self.lookup(&[key]).await?.pop().flatten();
        let Some(entry) = now else {
            return Ok(GetResult::Missing);
        };
        if entry == seen {
            let dropped = self
                .meta
                .call::<KvRemove, _>(&KvRemoveReq {
                    keys: key_bufs(&[key]),
                    expect: vec![seen],
                })
                .await?;
            tracing::warn!(
                class = seen.class,
                slot = seen.slot,
                removed = ?dropped.removed,
                "a KV cache block failed its CRC under an unchanged entry: dropped"
            );
            return Ok(GetResult::Missing);
        }
        let block_bytes = entry.length as usize;
        if block_bytes > buffer.len() {
            return Ok(GetResult::BufferTooSmall {
                block_bytes,
                buffer_bytes: buffer.len(),
            });
        }
        let Some((chain, chunk, _)) = self.place(entry.class, entry.slot) else {
            return Ok(GetResult::Failed("its entry is outside the layout".into()));
        };
        match self.storage.read(chain, chunk, 0, entry.length).await {
            Ok(read)
                if read.data.len() == block_bytes && crc32c::crc32c(&read.data) == entry.crc =>
            {
                // A slot reused under the reader: rare, copied (counted).
                flyfs_rpc::metrics::payload_copied::<BatchRead>(block_bytes);
                buffer[..block_bytes].copy_from_slice(&read.data);
                Ok(GetResult::Found(block_bytes))
            }
            // Reused again under us: as good as gone.
            Ok(_) => Ok(GetResult::Missing),
            Err(e) => Ok(GetResult::Failed(e.to_string())),
        }
    }
}
