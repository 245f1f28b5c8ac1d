//! DMA-able buffers and the pool that hands them out without allocating.
//!
//! A [`DmaBuf`] is a block of memory aligned to [`BUF_ALIGN`] with a movable
//! window (`start..start + len`) that marks the bytes an I/O reads or writes.
//! Buffers come from a [`BufferPool`], which maps one arena up front (backed by
//! 2 MiB hugepages when enough are reserved, by ordinary pages otherwise), cuts
//! it into power-of-two size classes and recycles buffers through lock-free
//! free lists, so the hot path never calls the allocator. When a class is
//! exhausted, or a request is larger than every class, the pool falls back to
//! an aligned heap allocation and counts it, so a mis-sized pool shows up in
//! [`PoolStats`] rather than as a stall.
//!
//! The arena is also what the uring backend registers with the kernel
//! (`IORING_REGISTER_BUFFERS`), and what an SPDK backend would take from
//! `spdk_dma_malloc`; [`DmaBuf::registration`] tells a backend which
//! registered region a buffer lies in.

use std::alloc::Layout;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_queue::ArrayQueue;

/// Alignment of every buffer: the largest sector size any device reports, and
/// the page size, so buffers suit `O_DIRECT` on every device.
pub const BUF_ALIGN: usize = 4096;
/// The kernel refuses to register a single buffer region over 1 GiB.
pub const REGION_BYTES_MAX: usize = 1 << 30;
const HUGEPAGE_BYTES: usize = 2 << 20;

/// Where a buffer's memory came from, and so where it returns on drop.
enum Origin {
    Pool {
        pool: Arc<PoolShared>,
        class: u16,
        index: u32,
    },
    Heap {
        layout: Layout,
    },
    /// A read-only view of memory someone else owns (a received network
    /// payload): see [`DmaBuf::from_bytes`].
    Shared {
        _owner: bytes::Bytes,
    },
}

/// An aligned, DMA-able buffer with a window of valid bytes.
///
/// Dereferences to the window. A fresh buffer's window covers `len` bytes from
/// the start; [`DmaBuf::set_window`] moves it. Contents of a pooled buffer are
/// whatever its last user left: zero it if that matters.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    start: usize,
    len: usize,
    origin: Origin,
}

// SAFETY: a DmaBuf owns its memory exclusively (the pool hands each slot to one
// buffer at a time, heap buffers are owned outright), so moving it between
// threads or sharing `&DmaBuf` is as safe as for a `Vec<u8>`. A read-only view
// shares immutable memory kept alive by a `Bytes` (itself Send and Sync) and
// refuses every mutable access.
unsafe impl Send for DmaBuf {}
// SAFETY: see `Send`: `&DmaBuf` only permits reads.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// Allocates a zeroed heap buffer of at least `len` bytes (rounded up to
    /// [`BUF_ALIGN`]), with its window covering `len` bytes.
    pub fn alloc_zeroed(len: usize) -> DmaBuf {
        let capacity = len.max(1).next_multiple_of(BUF_ALIGN);
        let layout = Layout::from_size_align(capacity, BUF_ALIGN).expect("buffer size overflows");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        DmaBuf {
            ptr,
            capacity,
            start: 0,
            len,
            origin: Origin::Heap { layout },
        }
    }

    /// A read-only buffer over `bytes`, without copying, when its memory is
    /// aligned to [`BUF_ALIGN`] (network payloads received into aligned
    /// buffers are, see flyfs-rpc's receive pool); `Err(bytes)` otherwise.
    ///
    /// The buffer may only be *written to a device*: it shares its memory
    /// with every clone of `bytes`, so anything that would hand out mutable
    /// access (`deref_mut`, `full_mut`, `window_mut_ptr`, reading a device
    /// into it) panics. [`DmaBuf::is_read_only`] tells callers that would
    /// otherwise modify it in place to copy instead.
    pub fn from_bytes(bytes: bytes::Bytes) -> Result<DmaBuf, bytes::Bytes> {
        if bytes.is_empty() || !(bytes.as_ptr() as usize).is_multiple_of(BUF_ALIGN) {
            return Err(bytes);
        }
        let len = bytes.len();
        // Never written through: every mutable access checks `is_read_only`.
        let ptr = NonNull::from(&bytes[..]).cast::<u8>();
        Ok(DmaBuf {
            ptr,
            capacity: len,
            start: 0,
            len,
            origin: Origin::Shared { _owner: bytes },
        })
    }

    /// Whether the buffer is a read-only view ([`DmaBuf::from_bytes`]).
    pub fn is_read_only(&self) -> bool {
        matches!(self.origin, Origin::Shared { .. })
    }

    fn assert_writable(&self) {
        assert!(
            !self.is_read_only(),
            "a read-only DmaBuf (shared network payload) must not be modified"
        );
    }

    /// Copies `data` into a fresh heap buffer whose window is `data`.
    pub fn copy_from(data: &[u8]) -> DmaBuf {
        let mut buf = DmaBuf::alloc_zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Bytes of memory behind the buffer.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Start of the window within the buffer.
    pub fn window_start(&self) -> usize {
        self.start
    }

    /// Moves the window to `start..start + len`.
    ///
    /// # Panics
    /// If the window would extend past the capacity: that is a caller bug.
    pub fn set_window(&mut self, start: usize, len: usize) {
        assert!(
            start
                .checked_add(len)
                .is_some_and(|end| end <= self.capacity),
            "window {start}+{len} exceeds buffer capacity {}",
            self.capacity
        );
        self.start = start;
        self.len = len;
    }

    /// Sets the window to `0..len`.
    pub fn set_len(&mut self, len: usize) {
        self.set_window(0, len);
    }

    /// The whole buffer, ignoring the window.
    pub fn full_mut(&mut self) -> &mut [u8] {
        self.assert_writable();
        // SAFETY: ptr is valid for `capacity` bytes and exclusively ours.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }

    /// The whole buffer, ignoring the window.
    pub fn full(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.capacity) }
    }

    /// Address of the window's first byte, for handing to a device.
    pub fn window_ptr(&self) -> *const u8 {
        // SAFETY: start <= capacity, so the result stays within (or one past) the allocation.
        unsafe { self.ptr.as_ptr().add(self.start) }
    }

    /// Mutable address of the window's first byte, for handing to a device.
    pub fn window_mut_ptr(&mut self) -> *mut u8 {
        self.assert_writable();
        // SAFETY: as in `window_ptr`.
        unsafe { self.ptr.as_ptr().add(self.start) }
    }

    /// If the buffer lies in a pool's arena: the pool's id and the index of
    /// the registration region (of at most [`REGION_BYTES_MAX`]) holding it.
    pub fn registration(&self) -> Option<(u64, u16)> {
        match &self.origin {
            Origin::Pool { pool, .. } => {
                let offset = self.ptr.as_ptr() as usize - pool.arena.ptr.as_ptr() as usize;
                Some((pool.id, (offset / REGION_BYTES_MAX) as u16))
            }
            Origin::Heap { .. } | Origin::Shared { .. } => None,
        }
    }
}

impl std::ops::Deref for DmaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the window lies inside the allocation (checked by set_window).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(self.start), self.len) }
    }
}

/// Lets a buffer become the owner of a `bytes::Bytes` (`Bytes::from_owner`),
/// so data read from a device reaches a socket without a copy.
impl AsRef<[u8]> for DmaBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::ops::DerefMut for DmaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.assert_writable();
        // SAFETY: as in Deref, and we hold the buffer exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.start), self.len) }
    }
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("capacity", &self.capacity)
            .field("window", &(self.start..self.start + self.len))
            .field("pooled", &matches!(self.origin, Origin::Pool { .. }))
            .field("read_only", &self.is_read_only())
            .finish()
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        match &self.origin {
            Origin::Pool { pool, class, index } => {
                // The free list has room for every buffer of its class, so this cannot fail.
                let pushed = pool.classes[*class as usize].free.push(*index);
                debug_assert!(pushed.is_ok(), "buffer returned twice to its pool");
            }
            Origin::Heap { layout } => {
                // SAFETY: allocated in alloc_zeroed with exactly this layout.
                unsafe { std::alloc::dealloc(self.ptr.as_ptr(), *layout) }
            }
            // The owner goes with the origin.
            Origin::Shared { .. } => {}
        }
    }
}

/// Whether the pool's arena should use reserved 2 MiB hugepages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugePages {
    /// Use hugepages when enough are reserved, ordinary pages otherwise.
    #[default]
    Auto,
    /// Never use hugepages.
    Never,
    /// Fail if the arena cannot be backed by hugepages.
    Require,
}

/// Sizes and counts of the pool's buffers.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// `(buffer size in bytes, number of buffers)` per class. Sizes are
    /// rounded up to powers of two no smaller than [`BUF_ALIGN`].
    pub classes: Vec<(usize, usize)>,
    pub hugepages: HugePages,
}

impl Default for PoolConfig {
    /// Enough for a device at queue depth 128 of 4 KiB I/Os and a few dozen
    /// 1 MiB chunk I/Os: 64 MiB in all.
    fn default() -> Self {
        PoolConfig {
            classes: vec![(4 << 10, 512), (64 << 10, 128), (1 << 20, 48), (4 << 20, 2)],
            hugepages: HugePages::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("buffer pool class {size} bytes x {count} is invalid: {reason}")]
    BadClass {
        size: usize,
        count: usize,
        reason: &'static str,
    },
    #[error("cannot map a {bytes}-byte buffer arena{}: {source}", if *.hugepages { " on hugepages" } else { "" })]
    Map {
        bytes: usize,
        hugepages: bool,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "hugepages required but only {free_bytes} bytes of hugepages are free, {needed_bytes} needed"
    )]
    NoHugePages {
        free_bytes: usize,
        needed_bytes: usize,
    },
}

/// Counters of a pool's use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub arena_bytes: usize,
    pub hugepages: bool,
    /// Buffers handed out from the arena.
    pub pooled_allocs: u64,
    /// Buffers that fell back to the heap (class empty or request too large).
    pub fallback_allocs: u64,
}

struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    hugepages: bool,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping created by mmap in `map_arena`,
        // and every DmaBuf holding part of it also holds the Arc that owns us.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

struct Class {
    size: usize,
    offset: usize,
    free: ArrayQueue<u32>,
}

struct PoolShared {
    id: u64,
    arena: Mapping,
    classes: Vec<Class>,
    pooled_allocs: AtomicU64,
    fallback_allocs: AtomicU64,
}

// SAFETY: the arena is only reached through DmaBufs, each owning a disjoint slot.
unsafe impl Send for PoolShared {}
// SAFETY: as for Send; the free lists and counters are themselves thread-safe.
unsafe impl Sync for PoolShared {}

/// A pool of aligned buffers allocated up front. Cloning shares the pool.
#[derive(Clone)]
pub struct BufferPool(Arc<PoolShared>);

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("id", &self.0.id)
            .field("stats", &self.stats())
            .finish()
    }
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

impl BufferPool {
    /// Maps the arena and fills the free lists.
    pub fn new(config: &PoolConfig) -> Result<BufferPool, PoolError> {
        let mut classes: Vec<(usize, usize)> = Vec::new();
        for &(size, count) in &config.classes {
            if size == 0 || size > REGION_BYTES_MAX {
                return Err(PoolError::BadClass {
                    size,
                    count,
                    reason: "size must be 1 byte to 1 GiB",
                });
            }
            if count == 0 || count > u32::MAX as usize {
                return Err(PoolError::BadClass {
                    size,
                    count,
                    reason: "count must be 1 to 2^32-1",
                });
            }
            classes.push((size.next_power_of_two().max(BUF_ALIGN), count));
        }
        // Largest first, so every buffer is aligned to its own (power-of-two)
        // size and never straddles a registration region boundary.
        classes.sort_by_key(|class| std::cmp::Reverse(class.0));
        let mut offset = 0usize;
        let mut layout = Vec::with_capacity(classes.len());
        for (size, count) in classes {
            offset = offset.next_multiple_of(size);
            layout.push(Class {
                size,
                offset,
                free: ArrayQueue::new(count),
            });
            offset = size
                .checked_mul(count)
                .and_then(|bytes| bytes.checked_add(offset))
                .ok_or(PoolError::BadClass {
                    size,
                    count,
                    reason: "pool size overflows",
                })?;
        }
        let arena = map_arena(offset.max(BUF_ALIGN), config.hugepages)?;
        for class in &layout {
            for index in 0..class.free.capacity() as u32 {
                let _ = class.free.push(index);
            }
        }
        tracing::debug!(
            bytes = arena.len,
            hugepages = arena.hugepages,
            "buffer pool mapped"
        );
        Ok(BufferPool(Arc::new(PoolShared {
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            arena,
            classes: layout,
            pooled_allocs: AtomicU64::new(0),
            fallback_allocs: AtomicU64::new(0),
        })))
    }

    /// A buffer of at least `len` bytes with its window set to `0..len`:
    /// from the smallest class that fits and has a free buffer, else the heap.
    pub fn alloc(&self, len: usize) -> DmaBuf {
        let shared = &self.0;
        for (class_index, class) in shared.classes.iter().enumerate().rev() {
            if class.size < len {
                continue;
            }
            if let Some(index) = class.free.pop() {
                shared.pooled_allocs.fetch_add(1, Ordering::Relaxed);
                let offset = class.offset + index as usize * class.size;
                // SAFETY: offset + size lies inside the arena by construction.
                let ptr = unsafe { NonNull::new_unchecked(shared.arena.ptr.as_ptr().add(offset)) };
                return DmaBuf {
                    ptr,
                    capacity: class.size,
                    start: 0,
                    len,
                    origin: Origin::Pool {
                        pool: Arc::clone(shared),
                        class: class_index as u16,
                        index,
                    },
                };
            }
        }
        shared.fallback_allocs.fetch_add(1, Ordering::Relaxed);
        DmaBuf::alloc_zeroed(len)
    }

    /// A stable id, matched against [`DmaBuf::registration`].
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// The arena as regions of at most [`REGION_BYTES_MAX`], for registering
    /// with a device (`IORING_REGISTER_BUFFERS`, an IOMMU mapping).
    pub fn regions(&self) -> Vec<(*mut u8, usize)> {
        let arena = &self.0.arena;
        (0..arena.len)
            .step_by(REGION_BYTES_MAX)
            .map(|start| {
                // SAFETY: every region start lies inside the arena.
                let ptr = unsafe { arena.ptr.as_ptr().add(start) };
                (ptr, (arena.len - start).min(REGION_BYTES_MAX))
            })
            .collect()
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            arena_bytes: self.0.arena.len,
            hugepages: self.0.arena.hugepages,
            pooled_allocs: self.0.pooled_allocs.load(Ordering::Relaxed),
            fallback_allocs: self.0.fallback_allocs.load(Ordering::Relaxed),
        }
    }
}

fn free_hugepage_bytes() -> usize {
    let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("HugePages_Free:"))
        .and_then(|rest| rest.trim().parse::<usize>().ok())
        .map_or(0, |pages| pages * HUGEPAGE_BYTES)
}

fn mmap_anonymous(len: usize, extra_flags: libc::c_int) -> Result<NonNull<u8>, std::io::Error> {
    // SAFETY: an anonymous private mapping with no address hint has no
    // preconditions; the result is checked against MAP_FAILED.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | extra_flags,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(NonNull::new(ptr.cast()).expect("mmap never returns null on success"))
}

fn map_arena(bytes: usize, hugepages: HugePages) -> Result<Mapping, PoolError> {
    let huge_len = bytes.next_multiple_of(HUGEPAGE_BYTES);
    let free = free_hugepage_bytes();
    let want_huge = match hugepages {
        HugePages::Never => false,
        HugePages::Auto => free >= huge_len,
        HugePages::Require if free >= huge_len => true,
        HugePages::Require => {
            return Err(PoolError::NoHugePages {
                free_bytes: free,
                needed_bytes: huge_len,
            });
        }
    };
    if want_huge {
        match mmap_anonymous(huge_len, libc::MAP_HUGETLB) {
            Ok(ptr) => {
                return Ok(Mapping {
                    ptr,
                    len: huge_len,
                    hugepages: true,
                });
            }
            Err(source) if hugepages == HugePages::Require => {
                return Err(PoolError::Map {
                    bytes: huge_len,
                    hugepages: true,
                    source,
                });
            }
            Err(error) => tracing::info!(%error, "hugepage arena failed; using ordinary pages"),
        }
    }
    let len = bytes.next_multiple_of(BUF_ALIGN);
    let ptr = mmap_anonymous(len, 0).map_err(|source| PoolError::Map {
        bytes: len,
        hugepages: false,
        source,
    })?;
    // Transparent hugepages still cut TLB misses when the kernel allows them.
    // SAFETY: advice on a mapping we own; failure is harmless and ignored.
    unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    Ok(Mapping {
        ptr,
        len,
        hugepages: false,
    })
}

// SAFETY: the arena is mapped when the pool is made and unmapped only when
// the last clone of the pool (`Arc<PoolShared>`) drops, so each region
// `regions` names stays at its address while this value lives; the pool
// hands every buffer to one owner at a time (read-only views excepted, which
// nothing writes).
unsafe impl flyfs_rdma::Arena for BufferPool {
    fn arenas(&self) -> Vec<(std::ptr::NonNull<u8>, usize)> {
        self.regions()
            .into_iter()
            .filter_map(|(ptr, len)| std::ptr::NonNull::new(ptr).map(|ptr| (ptr, len)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_views_share_aligned_bytes_and_refuse_unaligned() {
        let owner = DmaBuf::copy_from(&[7u8; 8192]);
        let bytes = bytes::Bytes::from_owner(owner);
        let view = DmaBuf::from_bytes(bytes.clone()).expect("aligned");
        assert!(view.is_read_only());
        assert_eq!(view.window_ptr(), bytes.as_ptr(), "no copy");
        assert_eq!(&view[..], &bytes[..]);
        assert_eq!(view.registration(), None);
        let unaligned = bytes.slice(1..);
        assert!(DmaBuf::from_bytes(unaligned).is_err());
        assert!(DmaBuf::from_bytes(bytes::Bytes::new()).is_err());
        drop(bytes);
        // The view keeps the memory alive on its own.
        assert_eq!(view[8191], 7);
    }

    #[test]
    #[should_panic(expected = "read-only DmaBuf")]
    fn read_only_views_refuse_mutation() {
        let bytes = bytes::Bytes::from_owner(DmaBuf::copy_from(&[1u8; 4096]));
        let mut view = DmaBuf::from_bytes(bytes).expect("aligned");
        view[0] = 2;
    }

    #[test]
    fn pool_recycles_and_falls_back() {
        let pool = BufferPool::new(&PoolConfig {
            classes: vec![(4096, 2), (10_000, 1)],
            hugepages: HugePages::Never,
        })
        .expect("pool");
        let a = pool.alloc(100);
        assert_eq!(a.capacity(), 4096);
        assert_eq!(a.len(), 100);
        assert_eq!(a.window_ptr() as usize % BUF_ALIGN, 0);
        let b = pool.alloc(4096);
        // The 4 KiB class is empty now; the next smallest that fits is 16 KiB.
        let c = pool.alloc(1);
        assert_eq!(c.capacity(), 16384);
        let d = pool.alloc(1);
        assert!(
            d.registration().is_none(),
            "exhausted pool must fall back to the heap"
        );
        assert_eq!(pool.stats().fallback_allocs, 1);
        drop((a, b, c, d));
        let e = pool.alloc(4096);
        assert_eq!(e.registration(), Some((pool.id(), 0)));
        assert_eq!(pool.stats().pooled_allocs, 4);
    }

    #[test]
    fn pool_buffers_are_aligned_to_their_size() {
        let pool = BufferPool::new(&PoolConfig {
            classes: vec![(4096, 3), (1 << 20, 2), (65536, 2)],
            hugepages: HugePages::Never,
        })
        .expect("pool");
        let bufs: Vec<DmaBuf> = [4096, 1 << 20, 65536, 1 << 20]
            .iter()
            .map(|&n| pool.alloc(n))
            .collect();
        let regions = pool.regions();
        assert_eq!(regions.len(), 1);
        for buf in &bufs {
            let offset = buf.window_ptr() as usize - regions[0].0 as usize;
            assert_eq!(
                offset % buf.capacity(),
                0,
                "buffer at arena offset {offset}"
            );
        }
    }

    #[test]
    fn window_moves_and_is_checked() {
        let mut buf = DmaBuf::alloc_zeroed(8192);
        buf.set_window(4096, 10);
        buf.copy_from_slice(b"0123456789");
        assert_eq!(&buf.full()[4096..4106], b"0123456789");
        let result = std::panic::catch_unwind(move || buf.set_window(8000, 500));
        assert!(result.is_err());
    }

    #[test]
    fn invalid_classes_are_refused() {
        let err = BufferPool::new(&PoolConfig {
            classes: vec![(4096, 0)],
            hugepages: HugePages::Never,
        })
        .expect_err("zero count");
        assert!(err.to_string().contains("count"), "{err}");
    }
}
