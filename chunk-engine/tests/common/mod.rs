//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use flyfs_bypass::mem::MemDevice;
use flyfs_bypass::{
    BlockDevice, BufferPool, DeviceError, DmaBuf, Geometry, HugePages, IoCompletion, PoolConfig,
};
use flyfs_chunk_engine::{
    ChunkKey, Engine, EngineConfig, FormatOptions, JournalMode, WriteOp, WriteOutcome, WriteRequest,
};
use flyfs_proto::ids::{ChainId, ChainVersion, ChunkId, ChunkVersion, ClientId, RequestId};

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

/// The default configuration with journal mode `journal`.
pub fn config(journal: JournalMode) -> EngineConfig {
    EngineConfig {
        journal,
        ..EngineConfig::default()
    }
}

/// The default configuration with patches off: small updates copy the
/// chunk, as on a device formatted before version 4 (for tests of that path).
pub fn config_without_patches(journal: JournalMode) -> EngineConfig {
    EngineConfig {
        journal,
        patch_bytes_max: 0,
        ..EngineConfig::default()
    }
}

pub async fn format_and_open<D: BlockDevice + Clone>(
    dev: &D,
    options: &FormatOptions,
    journal: JournalMode,
) -> Engine<D> {
    Engine::format(dev, options).await.expect("format");
    Engine::open(dev.clone(), pool(), config(journal))
        .await
        .expect("open")
}

/// Runs a test body, `fn name(journal: JournalMode)`, once per journal mode:
/// `name::thread` and `name::inline`.
#[macro_export]
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn thread() {
                    super::$name(flyfs_chunk_engine::JournalMode::Thread);
                }

                #[test]
                fn inline() {
                    super::$name(flyfs_chunk_engine::JournalMode::Inline);
                }
            }
        )*
    };
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

/// An update of several extents, `(offset, bytes)` each, with their CRCs.
pub fn extents(extents: &[(u32, Vec<u8>)]) -> WriteOp {
    WriteOp::Extents(
        extents
            .iter()
            .map(|(offset, data)| flyfs_chunk_engine::UpdateExtent {
                offset: *offset,
                data: DmaBuf::copy_from(data),
                crc: crc32c::crc32c(data),
            })
            .collect(),
    )
}

/// Replaces the whole chunk with `data`, as version `version`.
pub fn replace(key: ChunkKey, version: u32, data: &[u8]) -> WriteRequest {
    request(
        key,
        version,
        WriteOp::Replace {
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
        prepare: false,
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

/// A `MemDevice` whose flushes take time: each yields once to the runtime
/// (as a real device's would while the I/O is in flight), and all of them
/// wait while the gate is closed. Writes starting in `held_writes` wait at
/// `write_gate` while it is closed, likewise, and every read at `read_gate`.
#[derive(Clone, Debug)]
pub struct SlowDevice {
    inner: MemDevice,
    pub gate: Arc<Gate>,
    pub write_gate: Arc<Gate>,
    pub read_gate: Arc<Gate>,
    pub held_writes: Arc<Mutex<std::ops::Range<u64>>>,
}

#[derive(Debug, Default)]
pub struct Gate {
    closed: AtomicBool,
    /// Flushes waiting at the closed gate.
    pub waiting: AtomicU64,
    wakers: Mutex<Vec<Waker>>,
}

impl Gate {
    /// Whether anything waits at the gate.
    pub fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        for waker in self.wakers.lock().expect("gate lock").drain(..) {
            waker.wake();
        }
    }

    /// Returns at once while the gate is open; otherwise waits, counted in
    /// `waiting`, until it opens.
    async fn pass(&self) {
        if self.closed.load(Ordering::SeqCst) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            GateOpen(self).await;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Pending once, then ready: one trip through the scheduler.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Ready once the gate is open.
struct GateOpen<'a>(&'a Gate);

impl Future for GateOpen<'_> {
    type Output = ();
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.0.closed.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        self.0
            .wakers
            .lock()
            .expect("gate lock")
            .push(cx.waker().clone());
        // Re-check: the gate may have opened before the waker was stored.
        if self.0.closed.load(Ordering::SeqCst) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

impl SlowDevice {
    pub fn new(inner: MemDevice) -> SlowDevice {
        SlowDevice {
            inner,
            gate: Arc::default(),
            write_gate: Arc::default(),
            read_gate: Arc::default(),
            held_writes: Arc::new(Mutex::new(0..0)),
        }
    }

    pub fn mem(&self) -> &MemDevice {
        &self.inner
    }
}

impl BlockDevice for SlowDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn read(&self, offset: u64, buf: DmaBuf) -> IoCompletion {
        self.read_gate.pass().await;
        self.inner.read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: DmaBuf) -> IoCompletion {
        let held = self
            .held_writes
            .lock()
            .expect("held writes lock")
            .contains(&offset);
        if held {
            self.write_gate.pass().await;
        }
        self.inner.write(offset, buf).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        YieldOnce(false).await;
        self.gate.pass().await;
        self.inner.flush().await
    }

    fn discard(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send {
        self.inner.discard(offset, len)
    }
}
