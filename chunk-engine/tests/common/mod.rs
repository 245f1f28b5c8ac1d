//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use flyfs_bypass::{BlockDevice, BufferPool, DmaBuf, HugePages, PoolConfig};
use flyfs_chunk_engine::{
    ChunkKey, Engine, EngineConfig, FormatOptions, WriteOp, WriteOutcome, WriteRequest,
};
use flyfs_rpc::ids::{ChainId, ChainVersion, ChunkId, ChunkVersion, ClientId, RequestId};

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

pub fn pool() -> BufferPool {
    BufferPool::new(&PoolConfig {
        classes: vec![(4096, 64), (65536, 16)],
        hugepages: HugePages::Never,
    })
    .expect("pool")
}

/// Small chunk classes (4 KiB to 64 KiB) so tests cross classes cheaply.
pub fn small_format() -> FormatOptions {
    FormatOptions {
        chunk_size_min: 4096,
        chunk_size_max: 65536,
        journal_bytes: None,
        force: false,
    }
}

pub async fn format_and_open<D: BlockDevice + Clone>(
    dev: &D,
    options: &FormatOptions,
) -> Engine<D> {
    Engine::format(dev, options).await.expect("format");
    Engine::open(dev.clone(), pool(), EngineConfig::default())
        .await
        .expect("open")
}

pub fn key(chain: u32, inode: u64, index: u32) -> ChunkKey {
    ChunkKey::new(ChainId(chain), ChunkId::new(inode, index))
}

/// Deterministic test bytes.
pub fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub fn update(key: ChunkKey, version: u32, offset: u32, data: &[u8]) -> WriteRequest {
    request(
        key,
        version,
        WriteOp::Update {
            offset,
            data: DmaBuf::copy_from(data),
            crc: crc32c::crc32c(data),
        },
    )
}

pub fn request(key: ChunkKey, version: u32, op: WriteOp) -> WriteRequest {
    WriteRequest {
        key,
        version: ChunkVersion(version),
        chain_version: ChainVersion(1),
        op,
        client: ClientId(1),
        request: RequestId(u64::from(version)),
    }
}

/// Writes and commits `data` at `offset` as version `version`.
pub async fn put<D: BlockDevice>(
    engine: &Engine<D>,
    key: ChunkKey,
    version: u32,
    offset: u32,
    data: &[u8],
) -> WriteOutcome {
    let outcome = engine
        .write(update(key, version, offset, data))
        .await
        .expect("write");
    engine
        .commit(key, ChunkVersion(version))
        .await
        .expect("commit");
    outcome
}

/// The whole committed contents of a chunk, verified against its CRC.
pub async fn contents<D: BlockDevice>(engine: &Engine<D>, key: ChunkKey) -> Vec<u8> {
    let read = engine
        .read(key, flyfs_chunk_engine::ReadRequest::whole_verified())
        .await
        .expect("read");
    read.data.to_vec()
}

/// Compares byte strings, reporting lengths and the first difference rather
/// than dumping both.
#[track_caller]
pub fn assert_same(actual: &[u8], expected: &[u8]) {
    if actual != expected {
        let first = actual.iter().zip(expected).position(|(a, b)| a != b);
        panic!(
            "bytes differ: lengths {} vs {} (expected), first difference at {first:?}",
            actual.len(),
            expected.len()
        );
    }
}
