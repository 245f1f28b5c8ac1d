//! One open file's data path in a client: the write-back buffer, the
//! writes in flight, read-ahead, and the length as this client knows it.
//!
//! Every handle of a file in one client shares one [`FileState`], so a
//! write through one handle is seen by reads and stats through another.
//!
//! **Writes.** Writes collect in a buffer of extents (merged where they
//! touch or overlap, a later write's bytes winning), up to
//! `write_buffer_bytes` in all. A sequential writer's buffer is one extent:
//! when it is full, everything up to its last chunk boundary goes to storage
//! in the background (one write per chunk, all chunks at once), so storage
//! sees whole-chunk writes and the writer keeps going; at most
//! `write_flushes_in_flight` such buffers are in flight, then the writer
//! waits. A write that does not continue where the last one ended first
//! waits for the background writes: two writes in flight never overlap, so
//! their order cannot matter. Random writes thus gather in the buffer and go
//! out together (every extent at once) when it is full, or at the next
//! flush, fsync, close or read, as a local file system's page cache holds
//! them until writeback. A background failure is kept and reported by the
//! next write, flush or release (as Linux reports a failed writeback to the
//! next `fsync`).
//!
//! **Reads.** A read first writes out anything buffered (a client reads
//! its own writes). A reader that continues where it stopped, or near it
//! twice in a row, is sequential: whole chunks ahead of it are fetched in
//! the background into its handle's cache of chunk futures, the window
//! doubling on each sequential read up to `readahead_bytes_max`. Each
//! handle is a stream of its own, so readers of one file at different
//! places keep their chunks.
//! Other reads fetch exactly what they ask for, every chunk of the range at
//! once. Any write, truncate or open of the file empties every handle's
//! cache (an epoch each handle checks).
//!
//! **Inline data.** When its open says so (`OpenRsp::inline_max`), a
//! client writing a file from empty through the file's only write session
//! keeps the file's bytes with the metadata service instead of storage:
//! at a sync its whole buffer, laid over the content the service holds,
//! goes with the sync's request, and nothing goes to storage
//! ([`FileState::take_inline`]). The first write past the limit, or any
//! write to storage, first has the service move what it holds to storage
//! (`FsClient`'s `leave_inline`); from then on the file is written as any
//! other. Reads of a file held inline are served from the bytes its open or
//! sync brought (docs/metadata-schema.md, "Inline data").

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::cache::BlockCache;
use crate::storage::{ClientError, ReadInto, ReadSpec, StorageClient};
use bytes::{Bytes, BytesMut};
use flyfs_proto::access::kill_suid_sgid;
use flyfs_proto::ids::{ChunkId, InodeId};
use flyfs_proto::wire::meta::{Attr, Layout, SetAttrReq, SetTime, WriterLength};
use flyfs_proto::wire::storage::{BatchRead, StorageError};
use flyfs_rpc::Network;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::FsError;
use crate::fs::{FileHandle, FsConfig};

/// A chunk being read ahead: its bytes from offset 0 (shorter than the
/// chunk when the chunk is).
type ChunkFetch = Shared<BoxFuture<'static, Result<Bytes, FsError>>>;

/// Writes not yet sent to storage.
#[derive(Debug, Default)]
struct Buffer {
    /// Extents by file offset; they never overlap nor touch.
    extents: BTreeMap<u64, BytesMut>,
    /// Bytes in all extents.
    bytes: usize,
    /// Where the last accepted write ended: a write starting here is
    /// sequential even when the buffer was just sent off.
    next: Option<u64>,
}

/// An extent a sequential writer appends to grows to the buffer's limit in
/// one step once it holds this much: before, it doubles (small files never
/// take the limit's worth of memory).
const EXTENT_GROWS_TO_LIMIT: usize = 64 << 10;

impl Buffer {
    /// Adds `data` at `offset`, merging it with every extent it touches or
    /// overlaps; its bytes replace theirs where they overlap. Owned bytes
    /// that touch no extent become one without a copy. `limit` is the
    /// buffer's size, which a sequential writer's extent grows to in one
    /// step rather than by copies at every doubling.
    fn insert(&mut self, offset: u64, data: Cow<'_, [u8]>, limit: usize) {
        let end = offset + data.len() as u64;
        // The common case, a sequential writer: append to the extent that
        // ends here when nothing else lies in the way.
        let ends_here = self
            .extents
            .range(..offset)
            .next_back()
            .filter(|(start, extent)| **start + extent.len() as u64 == offset)
            .map(|(start, _)| *start);
        if let Some(start) = ends_here
            && self.extents.range(offset..=end).next().is_none()
            && let Some(extent) = self.extents.get_mut(&start)
        {
            let grown = extent.len() + data.len();
            if grown > extent.capacity() && grown >= EXTENT_GROWS_TO_LIMIT {
                extent.reserve(data.len().max(limit.saturating_sub(self.bytes)));
            }
            extent.extend_from_slice(&data);
            self.bytes += data.len();
            return;
        }
        let touching: Vec<u64> = self
            .extents
            .range(..=end)
            .rev()
            .take_while(|(start, extent)| **start + extent.len() as u64 >= offset)
            .map(|(start, _)| *start)
            .collect();
        if touching.is_empty() {
            self.bytes += data.len();
            let extent = match data {
                // Unique, so the conversions keep the vector's memory.
                Cow::Owned(vec) => BytesMut::from(Bytes::from(vec)),
                Cow::Borrowed(slice) => BytesMut::from(slice),
            };
            self.extents.insert(offset, extent);
            return;
        }
        let mut start = offset;
        let mut stop = end;
        let mut old = Vec::with_capacity(touching.len());
        for at in touching {
            let extent = self
                .extents
                .remove(&at)
                .expect("the extent was just listed");
            self.bytes -= extent.len();
            start = start.min(at);
            stop = stop.max(at + extent.len() as u64);
            old.push((at, extent));
        }
        let mut merged = BytesMut::zeroed((stop - start) as usize);
        for (at, extent) in old {
            let from = (at - start) as usize;
            merged[from..from + extent.len()].copy_from_slice(&extent);
        }
        let from = (offset - start) as usize;
        merged[from..from + data.len()].copy_from_slice(&data);
        self.bytes += merged.len();
        self.extents.insert(start, merged);
    }

    /// Takes every extent out.
    fn take(&mut self) -> Vec<(u64, Bytes)> {
        self.bytes = 0;
        std::mem::take(&mut self.extents)
            .into_iter()
            .map(|(start, data)| (start, data.freeze()))
            .collect()
    }
}

/// One handle's read-ahead: each handle is its own stream, so readers of
/// one file at different places (a data loader's workers) do not throw
/// away each other's chunks.
#[derive(Default)]
pub(crate) struct ReadAhead {
    /// Bytes fetched ahead of a sequential reader; 0 when not sequential.
    window: u64,
    /// Reads in a row that began near where the one before ended.
    near: u32,
    chunks: BTreeMap<u32, ChunkFetch>,
    /// The file's read-ahead epoch `chunks` were fetched in: chunks of an
    /// older one may predate a write or truncate, and are dropped.
    epoch: u64,
    /// Whole chunks this handle has fetched ahead, in all.
    fetched: u64,
}

impl ReadAhead {
    pub(crate) fn fetched(&self) -> u64 {
        self.fetched
    }
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("window", &self.window)
            .field("chunks", &self.chunks.keys().collect::<Vec<_>>())
            .field("epoch", &self.epoch)
            .finish()
    }
}

#[derive(Debug)]
struct Hint {
    length: u64,
    at: Instant,
}

/// Root's setattrs of a file this client writes through its only write
/// session, not yet made: they go to the metadata service at the file's
/// next sync point, in order, after the writes before them
/// (`Client::setattr`).
#[derive(Debug, Default)]
pub(crate) struct Deferred {
    /// The attributes the metadata service last gave for the file, without
    /// the deferred changes: what a deferred setattr answers from.
    pub(crate) known: Option<Attr>,
    /// The write session the changes go with.
    pub(crate) session: u64,
    /// The changes, each with the time it was made (its ctime here).
    pub(crate) sets: Vec<(SetAttrReq, i64)>,
}

impl Deferred {
    /// `attr` with the deferred changes made, as the metadata service will
    /// make them for root: a chown drops setuid and setgid (group
    /// executable) from the file, an explicit mode given after it wins.
    pub(crate) fn apply(&self, attr: &mut Attr) {
        for (set, at) in &self.sets {
            if set.uid.is_some() || set.gid.is_some() {
                attr.uid = set.uid.unwrap_or(attr.uid);
                attr.gid = set.gid.unwrap_or(attr.gid);
                attr.mode = kill_suid_sgid(attr.mode);
            }
            if let Some(mode) = set.mode {
                attr.mode = (attr.mode & !0o7777) | (mode & 0o7777);
            }
            if let Some(SetTime::At(ns)) = set.atime {
                attr.atime_ns = ns;
            }
            if let Some(SetTime::At(ns)) = set.mtime {
                attr.mtime_ns = ns;
            }
            attr.ctime_ns = *at;
        }
    }
}

/// What a client knows of a file's data held by the metadata service.
#[derive(Debug, Default)]
struct Inline {
    /// Non-zero while this client may sync the file's content inline, up
    /// to this many bytes: its write session's open allowed it, and
    /// nothing of the file has gone to storage from here since.
    max: u32,
    /// The content the service holds, when it holds the file's data, as
    /// of this client's last open or sync of the file.
    bytes: Option<Bytes>,
    /// The service holds bytes other than `bytes` (attributes said so).
    stale: bool,
}

/// A sync carrying the file's whole content inline
/// ([`FileState::take_inline`]): holds the write buffer until the service
/// answers, so no read or write of this client slips between.
pub(crate) struct InlineSync<'a> {
    state: &'a FileState,
    buffer: tokio::sync::MutexGuard<'a, Buffer>,
    extents: Vec<(u64, Bytes)>,
    /// The content to send.
    pub(crate) bytes: Bytes,
}

impl InlineSync<'_> {
    /// The service holds `bytes` now (unless this client has stopped
    /// syncing inline meanwhile, whose move to storage then takes them).
    pub(crate) fn stored(self) {
        let mut inline = self.state.inline.lock();
        if inline.max > 0 {
            inline.bytes = (!self.bytes.is_empty()).then_some(self.bytes);
        }
        self.state.forget_read_ahead();
    }

    /// The sync failed: the writes wait in the buffer again.
    pub(crate) fn put_back(mut self) {
        for (start, data) in std::mem::take(&mut self.extents) {
            self.buffer
                .insert(start, Cow::Borrowed(&data), self.state.buffer_bytes);
        }
    }

    /// The service refused, and holds nothing of the file now: the buffered
    /// writes go to storage, as they would have without inline data.
    pub(crate) async fn refused<N: Network>(
        self,
        storage: &Arc<StorageClient<N>>,
    ) -> Result<(), FsError> {
        *self.state.inline.lock() = Inline::default();
        let written = self.state.write_extents(storage, self.extents).await;
        drop(self.buffer);
        self.state.forget_read_ahead();
        written
    }
}

/// One open file's shared state in a client.
#[derive(Debug)]
pub(crate) struct FileState {
    pub(crate) ino: InodeId,
    layout: Layout,
    chunk_bytes: u64,
    /// The length as this client knows it: what the metadata service said,
    /// grown by this client's writes.
    length: AtomicU64,
    /// The file's truncate version that `length` belongs to: the one the
    /// metadata service answered with when it last set `length` wholesale,
    /// or of this client's own last truncate. A sync or close sends both
    /// (see [`writer_length`](Self::writer_length)).
    truncate_version: AtomicU64,
    /// The write sessions of this client's handles of the file.
    sessions: Mutex<Vec<u64>>,
    /// Setattrs waiting for the next sync point.
    pub(crate) deferred: Mutex<Deferred>,
    /// Held while deferred setattrs are being made: whoever must come
    /// after them waits until they are.
    pub(crate) deferred_flush: tokio::sync::Mutex<()>,
    buffer: tokio::sync::Mutex<Buffer>,
    buffer_bytes: usize,
    /// One permit per buffer in flight to storage.
    flushes: Arc<Semaphore>,
    flushes_max: u32,
    /// The first failure of a background write, until reported.
    error: Mutex<Option<FsError>>,
    /// Writes accepted so far, and how many of them the metadata service
    /// had heard of when it last fixed the length: more accepted than
    /// synced means its length may be behind this client's. Counters, not
    /// a flag, because a sync of one handle must not clear what another
    /// handle wrote meanwhile.
    writes: AtomicU64,
    synced: AtomicU64,
    hint: Mutex<Hint>,
    /// Bumped by every change that makes chunks read ahead before it
    /// stale (a write, a truncate, an open); see [`ReadAhead::epoch`].
    readahead_epoch: AtomicU64,
    readahead_bytes_max: u64,
    inline: Mutex<Inline>,
}

fn io_error(message: String) -> FsError {
    FsError {
        errno: libc::EIO,
        message,
        retryable: false,
    }
}

/// Chunk indices are 32 bits: a file ends before chunk 2^32.
fn max_file_bytes(chunk_bytes: u64) -> u64 {
    chunk_bytes << 32
}

impl FileState {
    pub(crate) fn new(ino: InodeId, layout: Layout, config: &FsConfig) -> FileState {
        let chunk_bytes = u64::from(layout.chunk_size.max(1));
        let flushes_max = config.write_flushes_in_flight.max(1) as u32;
        FileState {
            ino,
            layout,
            chunk_bytes,
            length: AtomicU64::new(0),
            truncate_version: AtomicU64::new(0),
            sessions: Mutex::new(Vec::new()),
            deferred: Mutex::default(),
            deferred_flush: tokio::sync::Mutex::new(()),
            buffer: tokio::sync::Mutex::new(Buffer::default()),
            buffer_bytes: config.write_buffer_bytes.max(1),
            flushes: Arc::new(Semaphore::new(flushes_max as usize)),
            flushes_max,
            error: Mutex::new(None),
            writes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            hint: Mutex::new(Hint {
                length: 0,
                at: Instant::now(),
            }),
            readahead_epoch: AtomicU64::new(0),
            readahead_bytes_max: config.readahead_bytes_max,
            inline: Mutex::default(),
        }
    }

    /// Writes of this client that the metadata service may not know of.
    fn pending(&self) -> bool {
        self.writes.load(Ordering::Acquire) > self.synced.load(Ordering::Acquire)
            || self.in_flight()
    }

    fn in_flight(&self) -> bool {
        self.flushes.available_permits() < self.flushes_max as usize
    }

    /// A new handle: `length` is what the metadata service just said.
    /// A new handle: `length` and `truncate_version` are what the metadata
    /// service just said.
    pub(crate) fn opened(&self, length: u64, truncate_version: u64, truncated: bool) {
        if truncated || !self.pending() {
            self.length.store(length, Ordering::Release);
            self.truncate_version
                .store(truncate_version, Ordering::Release);
        } else {
            // The version stays the one our writes were counted under: if a
            // truncate came since, the service sees the mismatch and asks
            // storage rather than trust a length the truncate may have cut.
            self.length.fetch_max(length, Ordering::AcqRel);
        }
        self.forget_read_ahead();
    }

    /// What an open said of the file's inline data: its bytes when the
    /// service holds them, and, for an open with a write session, how much
    /// this client may sync inline (`None` for an open without one, which
    /// leaves that as it was).
    pub(crate) fn opened_inline(&self, bytes: Option<Vec<u8>>, max: Option<u32>) {
        let mut inline = self.inline.lock();
        inline.stale = false;
        if let Some(max) = max {
            inline.max = max;
        }
        // What the service holds now is what writes not yet synced lay
        // over (a sync refused for a file held elsewhere sends them to
        // storage instead).
        inline.bytes = bytes.map(Bytes::from);
    }

    /// The file's bytes, when the service holds them (as of this client's
    /// last open or sync).
    pub(crate) fn inline_bytes(&self) -> Option<Bytes> {
        self.inline.lock().bytes.clone()
    }

    /// Attributes from the service say whether it holds the file's data
    /// (`held`) and its `length`. With no writes of this client pending,
    /// bytes known here that no longer match are dropped: when the service
    /// holds other bytes, the next read fetches them
    /// ([`inline_stale`](Self::inline_stale)); when it moved them to
    /// storage, reads go there.
    pub(crate) fn observe_inline(&self, held: bool, length: u64) {
        if self.pending() {
            return;
        }
        let mut inline = self.inline.lock();
        let matches = inline
            .bytes
            .as_ref()
            .is_some_and(|b| b.len() as u64 == length);
        if held && !matches {
            inline.bytes = None;
            inline.stale = true;
        } else if !held && inline.bytes.is_some() {
            inline.bytes = None;
            inline.max = 0;
        }
    }

    /// The service holds bytes of the file that this client has not got:
    /// a read fetches them first.
    pub(crate) fn inline_stale(&self) -> bool {
        self.inline.lock().stale
    }

    /// How much this client may sync inline (0: nothing).
    pub(crate) fn inline_max(&self) -> u32 {
        self.inline.lock().max
    }

    /// Stops syncing inline; answers whether the service holds the file's
    /// data, which must then move to storage before anything is written
    /// there.
    pub(crate) fn leave_inline(&self) -> Option<Bytes> {
        let mut inline = self.inline.lock();
        inline.max = 0;
        inline.bytes.take()
    }

    /// Undoes [`leave_inline`](Self::leave_inline) whose move failed: the
    /// service still holds `bytes`.
    pub(crate) fn still_inline(&self, bytes: Bytes) {
        self.inline.lock().bytes.get_or_insert(bytes);
    }

    /// One of this client's write sessions of the file.
    pub(crate) fn any_session(&self) -> Option<u64> {
        self.sessions.lock().first().copied()
    }

    /// Whether writes wait in the buffer.
    pub(crate) async fn buffered(&self) -> bool {
        self.buffer.lock().await.bytes > 0
    }

    /// Takes the buffer for a sync that carries the file's content inline,
    /// when it may: this client may sync inline, nothing is in flight to
    /// storage, writes wait in the buffer, and the file with them laid over
    /// what the service holds fits.
    pub(crate) async fn take_inline(&self) -> Option<InlineSync<'_>> {
        let max = u64::from(self.inline_max());
        if max == 0 || self.in_flight() {
            return None;
        }
        let mut buffer = self.buffer.lock().await;
        let length = self.length.load(Ordering::Acquire);
        let end = buffer
            .extents
            .last_key_value()
            .map_or(0, |(start, data)| start + data.len() as u64);
        if buffer.bytes == 0 || length > max || end > length {
            return None;
        }
        let mut bytes = BytesMut::zeroed(length as usize);
        if let Some(held) = self.inline_bytes() {
            let n = held.len().min(bytes.len());
            bytes[..n].copy_from_slice(&held[..n]);
        }
        let extents = buffer.take();
        for (start, data) in &extents {
            let at = *start as usize;
            bytes[at..at + data.len()].copy_from_slice(data);
        }
        Some(InlineSync {
            state: self,
            buffer,
            extents,
            bytes: bytes.freeze(),
        })
    }

    /// The metadata service says the file is `length` long (at
    /// `truncate_version`); answers the length as this client knows it.
    pub(crate) fn observe_length(&self, length: u64, truncate_version: u64) -> u64 {
        if self.pending() {
            self.length.fetch_max(length, Ordering::AcqRel).max(length)
        } else {
            self.length.store(length, Ordering::Release);
            self.truncate_version
                .store(truncate_version, Ordering::Release);
            length
        }
    }

    /// The file was truncated (or extended) to `size` by this client, which
    /// made its truncate version `truncate_version`.
    /// `inline`: the service still holds the file's data after it.
    pub(crate) fn truncated(&self, size: u64, truncate_version: u64, inline: bool) {
        {
            let mut state = self.inline.lock();
            match state.bytes.take() {
                Some(bytes) if inline => {
                    // The service cut or zero-extended what it holds alike.
                    let mut resized = BytesMut::zeroed(size as usize);
                    let n = bytes.len().min(resized.len());
                    resized[..n].copy_from_slice(&bytes[..n]);
                    state.bytes = (size > 0).then(|| resized.freeze());
                }
                // Held, but not known here: the next read fetches it, and
                // this client syncs no content over bytes it has not seen.
                _ if inline => {
                    state.stale = true;
                    state.max = 0;
                }
                // Not empty and not held (a truncate past what may be
                // held moved it to storage): nothing to sync inline.
                _ if size > 0 => state.max = 0,
                _ => {}
            }
        }
        self.length.store(size, Ordering::Release);
        self.truncate_version
            .store(truncate_version, Ordering::Release);
        self.forget_read_ahead();
    }

    /// Every handle's chunks read ahead so far may be stale.
    fn forget_read_ahead(&self) {
        self.readahead_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// A handle of this client holds write session `session`.
    pub(crate) fn session_opened(&self, session: u64) {
        self.sessions.lock().push(session);
    }

    /// The handle of write session `session` has been released.
    pub(crate) fn session_closed(&self, session: u64) {
        self.sessions.lock().retain(|&s| s != session);
    }

    /// The write session, when exactly one handle of this client holds one.
    pub(crate) fn sole_session(&self) -> Option<u64> {
        match self.sessions.lock().as_slice() {
            [session] => Some(*session),
            _ => None,
        }
    }

    /// What this client knows of the length, for a sync or close once its
    /// writes have all reached storage: every byte it wrote lies before
    /// `length` (writes only grow it; a truncate sets it and the version).
    pub(crate) fn writer_length(&self) -> WriterLength {
        WriterLength {
            length: self.length.load(Ordering::Acquire),
            truncate_version: self.truncate_version.load(Ordering::Acquire),
        }
    }

    /// The writes accepted so far: a sync started after reading this
    /// covers them (see [`synced`](Self::synced)).
    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// The metadata service has fixed the length after the first `writes`
    /// writes reached storage.
    pub(crate) fn synced(&self, writes: u64) {
        self.synced.fetch_max(writes, Ordering::AcqRel);
    }

    /// Whether writes since the last sync are waiting for one.
    pub(crate) fn unsynced(&self) -> bool {
        self.writes.load(Ordering::Acquire) > self.synced.load(Ordering::Acquire)
    }

    /// The length to report as a hint, if it grew and the last hint is
    /// older than `interval`.
    pub(crate) fn hint_due(&self, interval: Duration) -> Option<u64> {
        let length = self.length.load(Ordering::Acquire);
        let mut hint = self.hint.lock();
        if length <= hint.length || hint.at.elapsed() < interval {
            return None;
        }
        hint.length = length;
        hint.at = Instant::now();
        Some(length)
    }

    fn take_error(&self) -> Result<(), FsError> {
        match self.error.lock().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn record_error(&self, e: FsError) {
        tracing::error!(ino = ?self.ino, "background write failed: {}", e.message);
        self.error.lock().get_or_insert(e);
    }

    pub(crate) async fn write<N: Network>(
        self: &Arc<Self>,
        storage: &Arc<StorageClient<N>>,
        offset: u64,
        data: Cow<'_, [u8]>,
    ) -> Result<(), FsError> {
        self.take_error()?;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= max_file_bytes(self.chunk_bytes))
            .ok_or_else(|| FsError {
                errno: libc::EFBIG,
                message: format!(
                    "a write of {} bytes at {offset} ends past the largest file ({} bytes with {}-byte chunks)",
                    data.len(),
                    max_file_bytes(self.chunk_bytes),
                    self.chunk_bytes
                ),
                retryable: false,
            })?;
        if data.is_empty() {
            return Ok(());
        }
        let mut buffer = self.buffer.lock().await;
        if buffer.next.is_some_and(|next| next != offset) {
            // Not sequential: what is in flight may overlap it.
            self.wait_flushes().await?;
        }
        buffer.insert(offset, data, self.buffer_bytes);
        buffer.next = Some(end);
        self.length.fetch_max(end, Ordering::AcqRel);
        self.writes.fetch_add(1, Ordering::AcqRel);
        self.forget_read_ahead();
        if buffer.bytes < self.buffer_bytes {
            return Ok(());
        }
        {
            // Storage must not be written while the service holds the
            // data (`FsClient::write` moves it before a write past what may
            // be held, so a full buffer should not find it held).
            let mut inline = self.inline.lock();
            if inline.bytes.is_some() {
                return Ok(());
            }
            inline.max = 0;
        }
        if buffer.extents.len() > 1 {
            // Scattered writes: all of them at once, and the writer waits.
            let extents = buffer.take();
            return self.write_extents(storage, extents).await;
        }
        // One sequential extent: up to its last chunk boundary in the
        // background, the rest stays (the next write continues it).
        let (start, mut extent) = buffer
            .extents
            .pop_first()
            .expect("a full buffer holds an extent");
        let buffered_end = start + extent.len() as u64;
        let boundary = buffered_end / self.chunk_bytes * self.chunk_bytes;
        let take = if boundary > start {
            boundary - start
        } else {
            buffered_end - start
        };
        let piece = extent.split_to(take as usize).freeze();
        buffer.bytes -= piece.len();
        if !extent.is_empty() {
            buffer.extents.insert(start + take, extent);
        }
        let permit = self
            .flushes
            .clone()
            .acquire_owned()
            .await
            .expect("the flush semaphore is never closed");
        let state = self.clone();
        let storage = storage.clone();
        tokio::spawn(async move {
            if let Err(e) = state.write_out(&storage, start, piece).await {
                state.record_error(e);
            }
            drop(permit);
        });
        Ok(())
    }

    /// Writes everything buffered and waits for every write in flight;
    /// reports the first failure since the last report. Unless the metadata
    /// service holds the file's data ([`leave_inline`](Self::leave_inline)
    /// must move it first) and writes wait: then nothing is written and the
    /// answer is false. Writing to storage ends this client syncing inline.
    pub(crate) async fn drain_unless_held<N: Network>(
        &self,
        storage: &Arc<StorageClient<N>>,
    ) -> Result<bool, FsError> {
        let mut buffer = self.buffer.lock().await;
        if buffer.bytes > 0 {
            let mut inline = self.inline.lock();
            if inline.bytes.is_some() {
                return Ok(false);
            }
            inline.max = 0;
        }
        let rest = buffer.take();
        let wrote = !rest.is_empty() || self.in_flight();
        let written = self.write_extents(storage, rest).await;
        let waited = self.wait_flushes().await;
        drop(buffer);
        if wrote {
            // Anything read ahead while the writes were in flight may
            // predate them.
            self.forget_read_ahead();
        }
        written.and(waited).map(|()| true)
    }

    async fn wait_flushes(&self) -> Result<(), FsError> {
        let all = self
            .flushes
            .acquire_many(self.flushes_max)
            .await
            .expect("the flush semaphore is never closed");
        drop(all);
        self.take_error()
    }

    /// Every extent to storage at once.
    async fn write_extents<N: Network>(
        &self,
        storage: &Arc<StorageClient<N>>,
        extents: Vec<(u64, Bytes)>,
    ) -> Result<(), FsError> {
        let writes = extents
            .into_iter()
            .map(|(start, data)| self.write_out(storage, start, data));
        futures::future::try_join_all(writes).await.map(drop)
    }

    /// `data` at file offset `start` to storage: one write per chunk it
    /// touches, all at once.
    async fn write_out<N: Network>(
        &self,
        storage: &Arc<StorageClient<N>>,
        start: u64,
        data: Bytes,
    ) -> Result<(), FsError> {
        let chunk_size = self.layout.chunk_size;
        let writes = self
            .pieces(start, data.len() as u64)
            .map(|(index, from, at, len)| {
                let piece = data.slice(at..at + len as usize);
                async move {
                    let chain = self.chain_of(index)?;
                    storage
                        .write(
                            chain,
                            ChunkId::new(self.ino.0, index),
                            from,
                            piece,
                            chunk_size,
                        )
                        .await
                        .map_err(|e| self.storage_error("write", index, e))
                }
            });
        futures::future::try_join_all(writes).await.map(drop)
    }

    /// Splits `len` bytes at `start` into per-chunk pieces: (chunk index,
    /// offset in the chunk, offset in the range, length).
    fn pieces(&self, start: u64, len: u64) -> impl Iterator<Item = (u32, u32, usize, u32)> + '_ {
        let mut at = 0u64;
        std::iter::from_fn(move || {
            if at >= len {
                return None;
            }
            let pos = start + at;
            let index = (pos / self.chunk_bytes) as u32;
            let from = pos % self.chunk_bytes;
            let n = (self.chunk_bytes - from).min(len - at);
            let piece = (index, from as u32, at as usize, n as u32);
            at += n;
            Some(piece)
        })
    }

    fn chain_of(&self, index: u32) -> Result<flyfs_proto::ids::ChainId, FsError> {
        self.layout
            .chain_of(index)
            .ok_or_else(|| io_error(format!("{:?} has a layout without chains", self.ino)))
    }

    fn storage_error(&self, what: &str, index: u32, e: ClientError) -> FsError {
        let errno = match e {
            ClientError::Storage(StorageError::NoSpace) => libc::ENOSPC,
            _ => libc::EIO,
        };
        FsError {
            errno,
            message: format!("{what} of chunk {index} of {:?}: {e}", self.ino),
            retryable: false,
        }
    }

    pub(crate) async fn read<N: Network>(
        self: &Arc<Self>,
        storage: &Arc<StorageClient<N>>,
        cache: &BlockCache,
        fh: &FileHandle,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, FsError> {
        if self.in_flight() || self.buffer.lock().await.bytes > 0 {
            // Held inline, the caller moved the data first; a write that
            // came since is not this read's to see.
            self.drain_unless_held(storage).await?;
        }
        if let Some(bytes) = self.inline_bytes() {
            let start = (offset as usize).min(bytes.len());
            let end = (offset.saturating_add(u64::from(len)) as usize).min(bytes.len());
            return Ok(bytes.slice(start..end));
        }
        let length = self.length.load(Ordering::Acquire);
        if offset >= length || len == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + u64::from(len)).min(length);
        let previous_end = fh.read_end.swap(end, Ordering::AcqRel);
        let sequential = {
            let mut ahead = fh.readahead.lock();
            let near = previous_end != u64::MAX
                && offset.abs_diff(previous_end) <= self.chunk_bytes.max(ahead.window);
            ahead.near = if near {
                ahead.near.saturating_add(1)
            } else {
                0
            };
            // One random read that lands within a chunk of the last one is
            // no stream: a read-ahead would fetch three chunks for it (a 4
            // KiB random reader of a 64 MiB file read 85 KiB from the disks
            // a read). A read that starts where the last one ended, two
            // near reads in a row (the kernel's requests of one stream
            // arrive out of order), or a running read-ahead are a stream.
            let sequential =
                near && (offset == previous_end || ahead.window > 0 || ahead.near >= 2);
            if !sequential {
                ahead.window = 0;
            }
            sequential
        };
        let pieces: Vec<_> = self.pieces(offset, end - offset).collect();
        let parts: Vec<Bytes> = if sequential && self.readahead_bytes_max > 0 {
            self.read_ahead(storage, fh, &pieces, end, length).await?
        } else {
            self.read_exact(storage, cache, &pieces).await?
        };
        // Holes and chunks shorter than the file read as zeros.
        if let [part] = parts.as_slice()
            && part.len() as u64 == end - offset
        {
            return Ok(part.clone());
        }
        let mut out = BytesMut::zeroed((end - offset) as usize);
        for (part, &(_, _, at, want)) in parts.iter().zip(&pieces) {
            let n = part.len().min(want as usize);
            out[at..at + n].copy_from_slice(&part[..n]);
        }
        Ok(out.freeze())
    }

    /// Reads `offset..offset + len` (up to the file's length) into the
    /// buffers `slice` makes, one per chunk the range touches (see
    /// `FsClient::read_into`).
    pub(crate) async fn read_into<N: Network, B, F>(
        self: &Arc<Self>,
        storage: &Arc<StorageClient<N>>,
        offset: u64,
        len: u32,
        mut slice: F,
    ) -> Result<u64, FsError>
    where
        B: AsMut<[u8]> + Send + 'static,
        F: FnMut(usize, usize) -> B,
    {
        if self.in_flight() || self.buffer.lock().await.bytes > 0 {
            self.drain_unless_held(storage).await?;
        }
        if let Some(bytes) = self.inline_bytes() {
            let start = (offset as usize).min(bytes.len());
            let end = (offset.saturating_add(u64::from(len)) as usize).min(bytes.len());
            if start < end {
                let mut dst = slice(0, end - start);
                dst.as_mut()[..end - start].copy_from_slice(&bytes[start..end]);
            }
            return Ok((end - start) as u64);
        }
        let length = self.length.load(Ordering::Acquire);
        if offset >= length || len == 0 {
            return Ok(0);
        }
        let end = (offset + u64::from(len)).min(length);
        let pieces: Vec<_> = self.pieces(offset, end - offset).collect();
        let mut specs = Vec::with_capacity(pieces.len());
        let mut buffers = Vec::with_capacity(pieces.len());
        for &(index, from, at, want) in &pieces {
            specs.push(ReadSpec {
                chain: self.chain_of(index)?,
                chunk: ChunkId::new(self.ino.0, index),
                offset: from,
                len: want,
                if_changed_from: None,
            });
            buffers.push(slice(at, want as usize));
        }
        let (buffers, results) = storage.read_batch_into(&specs, buffers).await;
        for ((mut buffer, result), &(index, ..)) in buffers.into_iter().zip(results).zip(&pieces) {
            let dst = buffer.as_mut();
            let filled = match result.map_err(|e| self.storage_error("read", index, e))? {
                ReadInto::Landed(result) => (result.len as usize).min(dst.len()),
                ReadInto::Data(chunk) => {
                    // It came another way (a failover): one copy, counted.
                    let n = chunk.data.len().min(dst.len());
                    flyfs_rpc::metrics::payload_copied::<BatchRead>(n);
                    dst[..n].copy_from_slice(&chunk.data[..n]);
                    n
                }
            };
            // A hole, or a chunk shorter than the file: zeros.
            dst[filled..].fill(0);
        }
        Ok(end - offset)
    }

    /// Reads `pieces` as they are, each checked against the block cache
    /// first: a piece the cache holds is asked for only if its version
    /// changed (`crate::cache`).
    async fn read_exact<N: Network>(
        &self,
        storage: &Arc<StorageClient<N>>,
        cache: &BlockCache,
        pieces: &[(u32, u32, usize, u32)],
    ) -> Result<Vec<Bytes>, FsError> {
        let mut specs = Vec::with_capacity(pieces.len());
        let mut held = Vec::with_capacity(pieces.len());
        for &(index, from, _, len) in pieces {
            let chunk = ChunkId::new(self.ino.0, index);
            let cached = cache.lookup(chunk, from, len);
            specs.push(ReadSpec {
                chain: self.chain_of(index)?,
                chunk,
                offset: from,
                len,
                if_changed_from: cached.as_ref().map(|(stamp, _)| *stamp),
            });
            held.push(cached.map(|(_, bytes)| bytes));
        }
        let results = storage.read_batch(&specs).await;
        results
            .into_iter()
            .zip(held)
            .zip(&specs)
            .map(|((result, held), spec)| {
                let read = result.map_err(|e| self.storage_error("read", spec.chunk.index, e))?;
                match (read.result.unchanged, held) {
                    (true, Some(bytes)) => {
                        cache.confirmed();
                        Ok(bytes)
                    }
                    (true, None) => Err(io_error(format!(
                        "read of chunk {} of {:?}: the replica answered `unchanged` to a read that held nothing",
                        spec.chunk.index, self.ino
                    ))),
                    (false, held) => {
                        if held.is_some() {
                            cache.changed();
                        }
                        if let Some(stamp) = read.result.stamp {
                            cache.insert(spec.chunk, spec.offset, &read.data, stamp);
                        }
                        Ok(read.data)
                    }
                }
            })
            .collect()
    }

    /// Serves `pieces` from whole-chunk fetches, and starts fetching the
    /// chunks of the window after `end` (up to the file's `length`).
    async fn read_ahead<N: Network>(
        &self,
        storage: &Arc<StorageClient<N>>,
        fh: &FileHandle,
        pieces: &[(u32, u32, usize, u32)],
        end: u64,
        length: u64,
    ) -> Result<Vec<Bytes>, FsError> {
        let first = pieces.first().map_or(0, |p| p.0);
        let fetches: Vec<ChunkFetch> = {
            let mut ahead = fh.readahead.lock();
            let epoch = self.readahead_epoch.load(Ordering::Acquire);
            if ahead.epoch != epoch {
                ahead.chunks.clear();
                ahead.epoch = epoch;
            }
            ahead.window = (ahead.window * 2)
                .max(2 * self.chunk_bytes)
                .min(self.readahead_bytes_max.max(self.chunk_bytes));
            // Chunks well behind the reader are done with. The kernel sends
            // a sequential reader's requests several at a time and they are
            // served in any order, so a window's worth behind is kept: an
            // earlier request served late must find its chunk, not fetch it
            // again (which made buffered reads pull 1.25x their bytes).
            let window_chunks = (ahead.window / self.chunk_bytes) as u32 + 1;
            ahead.chunks = ahead.chunks.split_off(&first.saturating_sub(window_chunks));
            let ahead_end = end.saturating_add(ahead.window).min(length);
            let last = (ahead_end.max(end) - 1) / self.chunk_bytes;
            for index in first..=last as u32 {
                if let std::collections::btree_map::Entry::Vacant(slot) = ahead.chunks.entry(index)
                {
                    slot.insert(self.fetch_chunk(storage, index)?);
                    ahead.fetched += 1;
                }
            }
            pieces.iter().map(|p| ahead.chunks[&p.0].clone()).collect()
        };
        let chunks = futures::future::try_join_all(fetches).await?;
        Ok(chunks
            .into_iter()
            .zip(pieces)
            .map(|(chunk, &(_, from, _, len))| {
                let from = (from as usize).min(chunk.len());
                let to = (from + len as usize).min(chunk.len());
                chunk.slice(from..to)
            })
            .collect())
    }

    /// Starts reading a whole chunk in the background.
    fn fetch_chunk<N: Network>(
        &self,
        storage: &Arc<StorageClient<N>>,
        index: u32,
    ) -> Result<ChunkFetch, FsError> {
        let chain = self.chain_of(index)?;
        let chunk = ChunkId::new(self.ino.0, index);
        let chunk_size = self.layout.chunk_size;
        let storage = storage.clone();
        let ino = self.ino;
        let task = tokio::spawn(async move {
            storage
                .read(chain, chunk, 0, chunk_size)
                .await
                .map(|c| c.data)
                .map_err(|e| io_error(format!("read of chunk {index} of {ino:?}: {e}")))
        });
        Ok(async move {
            task.await
                .map_err(|e| io_error(format!("read of chunk {index} of {ino:?}: {e}")))?
        }
        .boxed()
        .shared())
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use proptest::prelude::*;

    use super::Buffer;

    proptest! {
        /// Extents hold exactly the bytes last written at each offset,
        /// never overlap nor touch, and `bytes` counts them.
        #[test]
        fn buffer_extents_match_a_byte_model(
            writes in prop::collection::vec((0u64..256, 1usize..48, any::<u8>(), any::<bool>()), 1..40)
        ) {
            let mut buffer = Buffer::default();
            let mut model: Vec<Option<u8>> = vec![None; 512];
            for (offset, len, fill, owned) in writes {
                let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                let written = if owned {
                    Cow::Owned(data.clone())
                } else {
                    Cow::Borrowed(&data[..])
                };
                buffer.insert(offset, written, 512);
                for (i, byte) in data.iter().enumerate() {
                    model[offset as usize + i] = Some(*byte);
                }
            }
            let mut seen = vec![None; 512];
            let mut previous_end = None;
            let mut bytes = 0;
            for (&start, extent) in &buffer.extents {
                prop_assert!(!extent.is_empty());
                if let Some(end) = previous_end {
                    prop_assert!(start > end, "extents at {start} and ending at {end} touch");
                }
                previous_end = Some(start + extent.len() as u64);
                bytes += extent.len();
                for (i, byte) in extent.iter().enumerate() {
                    seen[start as usize + i] = Some(*byte);
                }
            }
            prop_assert_eq!(bytes, buffer.bytes);
            prop_assert_eq!(seen, model);
        }
    }

    /// A sequential writer's owned bytes start an extent without a copy,
    /// and the extent grows to the buffer's limit in one step.
    #[test]
    fn a_sequential_writers_extent_is_copied_at_most_once() {
        const MIB: usize = 1 << 20;
        let mut buffer = Buffer::default();
        let first = vec![1u8; MIB];
        let at = first.as_ptr();
        buffer.insert(0, Cow::Owned(first), 8 * MIB);
        assert_eq!(buffer.extents[&0].as_ptr(), at, "owned bytes were copied");
        buffer.insert(MIB as u64, Cow::Owned(vec![2u8; MIB]), 8 * MIB);
        let grown = buffer.extents[&0].as_ptr();
        for i in 2..8u8 {
            buffer.insert(u64::from(i) * MIB as u64, Cow::Borrowed(&[i; MIB]), 8 * MIB);
        }
        let extent = &buffer.extents[&0];
        assert_eq!(
            extent.as_ptr(),
            grown,
            "the extent moved while filling the buffer"
        );
        assert_eq!(extent.len(), 8 * MIB);
        assert_eq!(buffer.bytes, 8 * MIB);
        for i in 0..8 {
            let expected = match i {
                0 => 1,
                1 => 2,
                i => i as u8,
            };
            assert!(
                extent[i * MIB..(i + 1) * MIB]
                    .iter()
                    .all(|&b| b == expected)
            );
        }
    }
}
