//! Safe owners of the verbs objects: the loaded library, a device context,
//! protection domain, completion queue with its completion channel, RC queue
//! pair and memory region. Each owner frees its object on drop, and holds an
//! `Arc` to what its object depends on (a queue pair its CQ and PD, a PD its
//! device), so the verbs' destruction order (QP before CQ, MR before PD, PD
//! before the device) follows from Rust's. Every live object is counted
//! ([`live_counts`]) so tests can prove that failures leak nothing.
//!
//! libibverbs is thread-safe: every verb may be called from any thread on
//! objects created by another, which is what the `Send`/`Sync` impls below
//! rely on.

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use flyfs_sys::verbs as ffi;

use crate::error::{RdmaError, Result};

/// The loaded libibverbs, shared by the whole process. It is never unloaded:
/// the providers it loads keep pointers into it.
fn library() -> Result<&'static ffi::IbVerbs> {
    static LIBRARY: OnceLock<Result<&'static ffi::IbVerbs, Arc<libloading::Error>>> =
        OnceLock::new();
    let loaded = LIBRARY.get_or_init(|| load(ffi::LIBIBVERBS_SONAME).map(|lib| &*Box::leak(lib)));
    match loaded {
        Ok(library) => Ok(library),
        Err(error) => Err(RdmaError::Library {
            soname: ffi::LIBIBVERBS_SONAME,
            source: error.clone(),
        }),
    }
}

fn load(soname: &str) -> Result<Box<ffi::IbVerbs>, Arc<libloading::Error>> {
    // SAFETY: loading libibverbs runs its constructors, which only set up its
    // own state (provider lists; fork protection stays off); every symbol
    // bindgen resolves is declared with the header's signature.
    unsafe { ffi::IbVerbs::new(soname) }
        .map(Box::new)
        .map_err(Arc::new)
}

/// Whether libibverbs can be loaded here; the error says why not.
pub fn check_library() -> Result<()> {
    library().map(|_| ())
}

static LIVE_CONTEXTS: AtomicI64 = AtomicI64::new(0);
static LIVE_PDS: AtomicI64 = AtomicI64::new(0);
static LIVE_CQS: AtomicI64 = AtomicI64::new(0);
static LIVE_QPS: AtomicI64 = AtomicI64::new(0);
static LIVE_MRS: AtomicI64 = AtomicI64::new(0);

/// How many verbs objects this process holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LiveCounts {
    pub contexts: i64,
    pub protection_domains: i64,
    pub completion_queues: i64,
    pub queue_pairs: i64,
    pub memory_regions: i64,
}

/// The verbs objects alive in this process (for leak tests and metrics).
pub fn live_counts() -> LiveCounts {
    LiveCounts {
        contexts: LIVE_CONTEXTS.load(Ordering::Relaxed),
        protection_domains: LIVE_PDS.load(Ordering::Relaxed),
        completion_queues: LIVE_CQS.load(Ordering::Relaxed),
        queue_pairs: LIVE_QPS.load(Ordering::Relaxed),
        memory_regions: LIVE_MRS.load(Ordering::Relaxed),
    }
}

/// The names of the RDMA devices present.
pub fn device_names() -> Result<Vec<String>> {
    let lib = library()?;
    let mut count = 0;
    // SAFETY: `count` is a valid out-pointer; the list is freed below.
    let list = unsafe { (lib.ibv_get_device_list)(&mut count) };
    if list.is_null() {
        return Err(RdmaError::verb_errno("ibv_get_device_list"));
    }
    let names = (0..count.max(0) as usize)
        .map(|index| {
            // SAFETY: the list holds `count` valid device pointers.
            let device = unsafe { *list.add(index) };
            // SAFETY: a listed device has a NUL-terminated name.
            unsafe { CStr::from_ptr((lib.ibv_get_device_name)(device)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // SAFETY: the list came from ibv_get_device_list and is freed once.
    unsafe { (lib.ibv_free_device_list)(list) };
    Ok(names)
}

/// An open RDMA device, and the port flyfs uses on it.
pub struct Context {
    lib: &'static ffi::IbVerbs,
    raw: NonNull<ffi::ibv_context>,
    name: String,
    port: u8,
}

// SAFETY: libibverbs contexts may be used from any thread (module doc).
unsafe impl Send for Context {}
// SAFETY: as for Send: every verb on a context is thread-safe.
unsafe impl Sync for Context {}

/// What a peer needs of a port to reach it: its GID, LID and MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortInfo {
    pub gid: [u8; 16],
    pub lid: u16,
    /// `IBV_MTU_*`: 1 = 256 bytes ... 5 = 4096 bytes.
    pub active_mtu: u32,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.name)
            .field("port", &self.port)
            .finish()
    }
}

impl Context {
    /// Opens the device called `name` (`rxe0`, `mlx5_0`), using port 1. A
    /// wrong name is an error listing the devices present.
    pub fn open(name: &str) -> Result<Arc<Context>> {
        let lib = library()?;
        let mut count = 0;
        // SAFETY: `count` is a valid out-pointer; the list is freed below.
        let list = unsafe { (lib.ibv_get_device_list)(&mut count) };
        if list.is_null() {
            return Err(RdmaError::verb_errno("ibv_get_device_list"));
        }
        let mut present = Vec::new();
        let mut opened = None;
        for index in 0..count.max(0) as usize {
            // SAFETY: the list holds `count` valid device pointers.
            let device = unsafe { *list.add(index) };
            // SAFETY: a listed device has a NUL-terminated name.
            let device_name = unsafe { CStr::from_ptr((lib.ibv_get_device_name)(device)) }
                .to_string_lossy()
                .into_owned();
            if device_name == name {
                // SAFETY: `device` is a listed device; the list stays valid
                // until freed below, and the context outlives it by design.
                opened = Some(NonNull::new(unsafe { (lib.ibv_open_device)(device) }));
            }
            present.push(device_name);
        }
        // SAFETY: the list came from ibv_get_device_list and is freed once;
        // an opened context keeps its own reference to the device.
        unsafe { (lib.ibv_free_device_list)(list) };
        let raw = match opened {
            None => {
                return Err(RdmaError::NoDevice {
                    name: name.to_string(),
                    present,
                });
            }
            Some(None) => return Err(RdmaError::verb_errno("ibv_open_device")),
            Some(Some(raw)) => raw,
        };
        LIVE_CONTEXTS.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Context {
            lib,
            raw,
            name: name.to_string(),
            port: 1,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port's state, LID and MTU, and the GID at `gid_index` (for RoCE
    /// v2 over IPv4, the index of the GID that maps the interface's address).
    pub fn port_info(&self, gid_index: u8) -> Result<PortInfo> {
        let mut attr = ffi::ibv_port_attr::default();
        // SAFETY: the exported ibv_query_port fills the leading, compatible
        // part of `ibv_port_attr` (what the header's inline wrapper does too),
        // and `attr` is zeroed and large enough.
        let rc = unsafe {
            (self.lib.ibv_query_port)(
                self.raw.as_ptr(),
                self.port,
                (&raw mut attr).cast::<ffi::_compat_ibv_port_attr>(),
            )
        };
        if rc != 0 {
            return Err(RdmaError::verb_rc("ibv_query_port", rc));
        }
        if attr.state != ffi::IBV_PORT_ACTIVE {
            return Err(RdmaError::PortDown {
                device: self.name.clone(),
                port: self.port,
                state: attr.state,
            });
        }
        let mut gid = ffi::ibv_gid::default();
        // SAFETY: `gid` is a valid out-pointer for one GID.
        let rc = unsafe {
            (self.lib.ibv_query_gid)(self.raw.as_ptr(), self.port, i32::from(gid_index), &mut gid)
        };
        if rc != 0 {
            return Err(RdmaError::verb_rc("ibv_query_gid", rc));
        }
        Ok(PortInfo {
            // SAFETY: every bit pattern of the union is a valid byte array.
            gid: unsafe { gid.raw },
            lid: attr.lid,
            active_mtu: attr.active_mtu,
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every object made from this context holds an Arc to it, so
        // none is alive now; the context is closed once.
        unsafe { (self.lib.ibv_close_device)(self.raw.as_ptr()) };
        LIVE_CONTEXTS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A protection domain: memory regions and queue pairs in one PD may be
/// used together.
#[derive(Debug)]
pub struct ProtectionDomain {
    context: Arc<Context>,
    raw: NonNull<ffi::ibv_pd>,
}

// SAFETY: libibverbs objects may be used from any thread (module doc).
unsafe impl Send for ProtectionDomain {}
// SAFETY: as for Send.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    pub fn new(context: &Arc<Context>) -> Result<Arc<ProtectionDomain>> {
        // SAFETY: the context is open for as long as `context` lives.
        let raw = unsafe { (context.lib.ibv_alloc_pd)(context.raw.as_ptr()) };
        let raw = NonNull::new(raw).ok_or_else(|| RdmaError::verb_errno("ibv_alloc_pd"))?;
        LIVE_PDS.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(ProtectionDomain {
            context: context.clone(),
            raw,
        }))
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.context
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: MRs and QPs hold an Arc to their PD, so none is alive now.
        unsafe { (self.context.lib.ibv_dealloc_pd)(self.raw.as_ptr()) };
        LIVE_PDS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Who may touch a memory region besides the local CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Local work requests only (receive rings, send slots): no peer can
    /// read or write it, whatever keys it learns.
    Local,
    /// Peers holding the region's rkey may RDMA READ and WRITE it (the
    /// buffer pool arenas that chunk payloads move between).
    Remote,
}

/// Memory registered with the device. It either owns its memory (allocated
/// page-aligned and zeroed here) or covers memory someone else owns and has
/// promised to keep alive (the buffer pool arenas).
#[derive(Debug)]
pub struct MemoryRegion {
    pd: Arc<ProtectionDomain>,
    raw: NonNull<ffi::ibv_mr>,
    addr: NonNull<u8>,
    len: usize,
    owned: Option<std::alloc::Layout>,
    /// The owner of registered memory owned elsewhere, when the region
    /// keeps it: dropped after the memory is deregistered (`Drop` runs
    /// before the fields go), so the memory outlives the registration
    /// however long a work request keeps the region.
    owner: Option<Arc<dyn crate::conn::Arena>>,
}

// SAFETY: the registration is thread-safe (module doc); the memory's bytes are
// only reached through `read`/`write`, which copy with raw pointers.
unsafe impl Send for MemoryRegion {}
// SAFETY: as for Send.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Allocates `len` zeroed, page-aligned bytes and registers them.
    pub fn alloc(pd: &Arc<ProtectionDomain>, len: usize, access: Access) -> Result<MemoryRegion> {
        let layout = std::alloc::Layout::from_size_align(len.max(1).next_multiple_of(4096), 4096)
            .map_err(|_| RdmaError::OutOfRegion {
            offset: 0,
            len,
            region_len: isize::MAX as usize,
        })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(addr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: `addr` points to `layout.size()` bytes that this region owns
        // and frees only after deregistering.
        match unsafe { Self::register_raw(pd, addr, layout.size(), access) } {
            Ok(raw) => Ok(MemoryRegion {
                pd: pd.clone(),
                raw,
                addr,
                len: layout.size(),
                owned: Some(layout),
                owner: None,
            }),
            Err(error) => {
                // SAFETY: allocated above with this layout, never registered.
                unsafe { std::alloc::dealloc(ptr, layout) };
                Err(error)
            }
        }
    }

    /// Registers memory owned elsewhere (a buffer pool arena), once, at start.
    ///
    /// # Safety
    /// `addr..addr + len` must stay allocated, and not be handed to anyone
    /// who assumes nobody else writes it, for as long as the returned region
    /// and any work request on it live.
    pub unsafe fn register_external(
        pd: &Arc<ProtectionDomain>,
        addr: NonNull<u8>,
        len: usize,
        access: Access,
    ) -> Result<MemoryRegion> {
        // SAFETY: the caller keeps the memory alive for the region's life.
        let raw = unsafe { Self::register_raw(pd, addr, len, access) }?;
        Ok(MemoryRegion {
            pd: pd.clone(),
            raw,
            addr,
            len,
            owned: None,
            owner: None,
        })
    }

    /// Registers one range of an arena `owner` hands out, and keeps
    /// `owner` (so the range) alive until the registration is gone.
    /// `addr..addr + len` must be one of the ranges `owner.arenas()`
    /// returned, which `Arena`'s contract keeps allocated while `owner`
    /// lives.
    pub(crate) fn register_arena_range(
        pd: &Arc<ProtectionDomain>,
        addr: NonNull<u8>,
        len: usize,
        access: Access,
        owner: Arc<dyn crate::conn::Arena>,
    ) -> Result<MemoryRegion> {
        // SAFETY: `Arena`'s contract keeps the range allocated while
        // `owner` lives, and the region holds `owner`, released only after
        // deregistering (`Drop`).
        let mut region = unsafe { Self::register_external(pd, addr, len, access) }?;
        region.owner = Some(owner);
        Ok(region)
    }

    /// # Safety
    /// `addr..addr + len` stays allocated until the registration is dropped.
    unsafe fn register_raw(
        pd: &Arc<ProtectionDomain>,
        addr: NonNull<u8>,
        len: usize,
        access: Access,
    ) -> Result<NonNull<ffi::ibv_mr>> {
        let flags = match access {
            Access::Local => ffi::IBV_ACCESS_LOCAL_WRITE,
            Access::Remote => {
                ffi::IBV_ACCESS_LOCAL_WRITE
                    | ffi::IBV_ACCESS_REMOTE_READ
                    | ffi::IBV_ACCESS_REMOTE_WRITE
            }
        };
        // SAFETY: the PD is alive; the caller guarantees the memory's life.
        let raw = unsafe {
            (pd.context.lib.ibv_reg_mr)(pd.raw.as_ptr(), addr.as_ptr().cast(), len, flags as i32)
        };
        let raw = NonNull::new(raw).ok_or_else(|| RdmaError::verb_errno("ibv_reg_mr"))?;
        LIVE_MRS.fetch_add(1, Ordering::Relaxed);
        Ok(raw)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address peers name in one-sided operations.
    pub fn addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: `raw` is a live registration.
        unsafe { self.raw.as_ref().lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: `raw` is a live registration.
        unsafe { self.raw.as_ref().rkey }
    }

    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    pub(crate) fn check(&self, offset: usize, len: usize) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(RdmaError::OutOfRegion {
                offset,
                len,
                region_len: self.len,
            });
        }
        Ok(())
    }

    /// The address of `offset` inside the region (after [`Self::check`]).
    pub(crate) fn ptr_at(&self, offset: usize) -> *mut u8 {
        self.addr.as_ptr().wrapping_add(offset)
    }

    /// Copies `data` into the region at `offset`. Bytes that a work request
    /// in flight also touches end up as one of the two wrote them.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: the range is inside the region (checked); raw copies do not
        // assert exclusive access, which the device may share.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr_at(offset), data.len()) };
        Ok(())
    }

    /// Copies bytes of the region at `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check(offset, out.len())?;
        // SAFETY: the range is inside the region (checked); see `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr_at(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: work requests on this region hold an Arc to it (conn.rs), so
        // none is in flight; it is deregistered once.
        unsafe { (self.pd.context.lib.ibv_dereg_mr)(self.raw.as_ptr()) };
        LIVE_MRS.fetch_sub(1, Ordering::Relaxed);
        if let Some(layout) = self.owned {
            // SAFETY: allocated in `alloc` with this layout, deregistered above.
            unsafe { std::alloc::dealloc(self.addr.as_ptr(), layout) };
        }
    }
}

/// A completion queue with its own completion channel, whose file
/// descriptor becomes readable when an armed CQ gets a completion.
#[derive(Debug)]
pub struct CompletionQueue {
    context: Arc<Context>,
    raw: NonNull<ffi::ibv_cq>,
    channel: NonNull<ffi::ibv_comp_channel>,
}

// SAFETY: libibverbs objects may be used from any thread (module doc); polling
// one CQ from two threads at once is serialised by the provider's CQ lock.
unsafe impl Send for CompletionQueue {}
// SAFETY: as for Send.
unsafe impl Sync for CompletionQueue {}

/// One work completion, reduced to what flyfs reads of it.
#[derive(Debug, Clone, Copy)]
pub struct WorkCompletion {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub byte_len: u32,
}

impl WorkCompletion {
    pub fn is_success(&self) -> bool {
        self.status == ffi::IBV_WC_SUCCESS
    }
}

/// The text libibverbs gives a completion status.
pub fn status_text(status: u32) -> String {
    match library() {
        Ok(lib) => {
            // SAFETY: ibv_wc_status_str returns a static string for any value.
            unsafe { CStr::from_ptr((lib.ibv_wc_status_str)(status)) }
                .to_string_lossy()
                .into_owned()
        }
        Err(_) => format!("status {status}"),
    }
}

impl CompletionQueue {
    /// A CQ of at least `entries` entries, with a non-blocking channel.
    pub fn new(context: &Arc<Context>, entries: u32) -> Result<Arc<CompletionQueue>> {
        let lib = context.lib;
        // SAFETY: the context is open.
        let channel = unsafe { (lib.ibv_create_comp_channel)(context.raw.as_ptr()) };
        let channel = NonNull::new(channel)
            .ok_or_else(|| RdmaError::verb_errno("ibv_create_comp_channel"))?;
        // SAFETY: the channel was just created; its fd is ours to configure.
        let fd = unsafe { channel.as_ref().fd };
        let set_nonblocking = || -> std::io::Result<()> {
            // SAFETY: fcntl on an open descriptor with integer arguments.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            // SAFETY: as above.
            if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        let made = set_nonblocking()
            .map_err(|error| RdmaError::verb("fcntl(O_NONBLOCK) on the completion channel", error))
            .and_then(|()| {
                // SAFETY: the context and the channel are alive; no CQ context.
                let raw = unsafe {
                    (lib.ibv_create_cq)(
                        context.raw.as_ptr(),
                        entries as i32,
                        std::ptr::null_mut(),
                        channel.as_ptr(),
                        0,
                    )
                };
                NonNull::new(raw).ok_or_else(|| RdmaError::verb_errno("ibv_create_cq"))
            });
        let raw = match made {
            Ok(raw) => raw,
            Err(error) => {
                // SAFETY: the channel has no CQ; destroyed once.
                unsafe { (lib.ibv_destroy_comp_channel)(channel.as_ptr()) };
                return Err(error);
            }
        };
        LIVE_CQS.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(CompletionQueue {
            context: context.clone(),
            raw,
            channel,
        }))
    }

    /// The completion channel's descriptor, for an event loop to wait on.
    pub fn channel_fd(&self) -> RawFd {
        // SAFETY: the channel lives as long as `self`.
        unsafe { self.channel.as_ref().fd }
    }

    /// Takes up to `out.capacity()` completions off the queue (never blocks).
    pub fn poll(&self, out: &mut Vec<WorkCompletion>, max: usize) -> Result<usize> {
        let mut raw = [ffi::ibv_wc::default(); 16];
        let want = max.min(raw.len());
        // SAFETY: the CQ is alive; poll_cq is the provider's data-path entry
        // (what the header's inline ibv_poll_cq calls), given room for `want`.
        let polled = unsafe {
            let ops = &(*self.context.raw.as_ptr()).ops;
            let poll_cq = ops.poll_cq.ok_or_else(|| {
                RdmaError::verb_rc("ibv_poll_cq (missing in the provider)", libc::ENOSYS)
            })?;
            poll_cq(self.raw.as_ptr(), want as i32, raw.as_mut_ptr())
        };
        if polled < 0 {
            return Err(RdmaError::verb_rc("ibv_poll_cq", polled));
        }
        for wc in &raw[..polled as usize] {
            out.push(WorkCompletion {
                wr_id: wc.wr_id,
                status: wc.status,
                opcode: wc.opcode,
                byte_len: wc.byte_len,
            });
        }
        Ok(polled as usize)
    }

    /// Asks for an event on the channel at the next completion.
    pub fn arm(&self) -> Result<()> {
        // SAFETY: the CQ is alive; req_notify_cq is the provider's entry
        // behind the header's inline ibv_req_notify_cq.
        let rc = unsafe {
            let ops = &(*self.context.raw.as_ptr()).ops;
            let req_notify = ops.req_notify_cq.ok_or_else(|| {
                RdmaError::verb_rc("ibv_req_notify_cq (missing in the provider)", libc::ENOSYS)
            })?;
            req_notify(self.raw.as_ptr(), 0)
        };
        if rc != 0 {
            return Err(RdmaError::verb_rc("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    /// Consumes the events waiting on the channel (non-blocking) and
    /// acknowledges them, so that destroying the CQ does not wait for them.
    pub fn take_events(&self) -> Result<u32> {
        let mut taken = 0;
        loop {
            let mut cq = std::ptr::null_mut();
            let mut cq_context = std::ptr::null_mut();
            // SAFETY: the channel is alive and non-blocking; out-pointers valid.
            let rc = unsafe {
                (self.context.lib.ibv_get_cq_event)(self.channel.as_ptr(), &mut cq, &mut cq_context)
            };
            if rc != 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(RdmaError::verb("ibv_get_cq_event", error));
            }
            taken += 1;
        }
        if taken > 0 {
            // SAFETY: acknowledges exactly the events taken above.
            unsafe { (self.context.lib.ibv_ack_cq_events)(self.raw.as_ptr(), taken) };
        }
        Ok(taken)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // Events not yet taken would make ibv_destroy_cq wait for their
        // acknowledgement forever.
        let _ = self.take_events();
        // SAFETY: QPs hold an Arc to their CQ, so none uses it now; every
        // event is acknowledged; each object is destroyed once, CQ first.
        unsafe {
            (self.context.lib.ibv_destroy_cq)(self.raw.as_ptr());
            (self.context.lib.ibv_destroy_comp_channel)(self.channel.as_ptr());
        }
        LIVE_CQS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the remote side of a reliable connection needs to address it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpAddress {
    pub qp_num: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    pub lid: u16,
    pub mtu: u32,
}

/// How deep the queues of a queue pair are.
#[derive(Debug, Clone, Copy)]
pub struct QpCaps {
    pub send_wr_max: u32,
    pub recv_wr_max: u32,
}

/// A reliable-connected queue pair.
#[derive(Debug)]
pub struct QueuePair {
    pd: Arc<ProtectionDomain>,
    _cq: Arc<CompletionQueue>,
    raw: NonNull<ffi::ibv_qp>,
}

// SAFETY: libibverbs objects may be used from any thread (module doc); posting
// to one QP from two threads is serialised by the provider's queue locks.
unsafe impl Send for QueuePair {}
// SAFETY: as for Send.
unsafe impl Sync for QueuePair {}

/// A scatter/gather entry: `len` bytes at `addr` of the region with `lkey`.
pub(crate) type Sge = ffi::ibv_sge;

/// What a send-queue work request does.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SendOp {
    Send,
    RdmaRead { remote_addr: u64, rkey: u32 },
    RdmaWrite { remote_addr: u64, rkey: u32 },
}

impl QueuePair {
    /// A new RC QP in the RESET state, both queues on `cq`.
    pub fn new(
        pd: &Arc<ProtectionDomain>,
        cq: &Arc<CompletionQueue>,
        caps: QpCaps,
    ) -> Result<QueuePair> {
        let mut init = ffi::ibv_qp_init_attr {
            send_cq: cq.raw.as_ptr(),
            recv_cq: cq.raw.as_ptr(),
            cap: ffi::ibv_qp_cap {
                max_send_wr: caps.send_wr_max,
                max_recv_wr: caps.recv_wr_max,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        // SAFETY: the PD and CQ are alive; `init` is fully initialised.
        let raw = unsafe { (pd.context.lib.ibv_create_qp)(pd.raw.as_ptr(), &mut init) };
        let raw = NonNull::new(raw).ok_or_else(|| RdmaError::verb_errno("ibv_create_qp"))?;
        LIVE_QPS.fetch_add(1, Ordering::Relaxed);
        Ok(QueuePair {
            pd: pd.clone(),
            _cq: cq.clone(),
            raw,
        })
    }

    pub fn qp_num(&self) -> u32 {
        // SAFETY: the QP is alive; qp_num never changes.
        unsafe { self.raw.as_ref().qp_num }
    }

    fn modify(&self, attr: &mut ffi::ibv_qp_attr, mask: u32, step: &'static str) -> Result<()> {
        // SAFETY: the QP is alive; `attr` holds every field `mask` names.
        let rc =
            unsafe { (self.pd.context.lib.ibv_modify_qp)(self.raw.as_ptr(), attr, mask as i32) };
        if rc != 0 {
            return Err(RdmaError::verb_rc(step, rc));
        }
        Ok(())
    }

    /// RESET -> INIT: the port, and whether peers may read and write our
    /// remote-access regions through this QP.
    pub fn to_init(&self) -> Result<()> {
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: self.pd.context.port,
            qp_access_flags: ffi::IBV_ACCESS_REMOTE_READ | ffi::IBV_ACCESS_REMOTE_WRITE,
            ..Default::default()
        };
        self.modify(
            &mut attr,
            ffi::IBV_QP_STATE
                | ffi::IBV_QP_PKEY_INDEX
                | ffi::IBV_QP_PORT
                | ffi::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )
    }

    /// INIT -> RTR -> RTS, connected to `remote`, reaching it through the
    /// GID at `gid_index` (RoCE needs a global route; InfiniBand the LID).
    pub fn connect(&self, local_psn: u32, remote: &QpAddress, gid_index: u8) -> Result<()> {
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::IBV_QPS_RTR,
            path_mtu: remote.mtu,
            dest_qp_num: remote.qp_num,
            rq_psn: remote.psn,
            max_dest_rd_atomic: 16,
            // 12: 0.64 ms before a receiver-not-ready NAK is retried.
            min_rnr_timer: 12,
            ..Default::default()
        };
        attr.ah_attr.dlid = remote.lid;
        attr.ah_attr.port_num = self.pd.context.port;
        if remote.gid != [0; 16] {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid.raw = remote.gid;
            attr.ah_attr.grh.sgid_index = gid_index;
            attr.ah_attr.grh.hop_limit = 64;
        }
        self.modify(
            &mut attr,
            ffi::IBV_QP_STATE
                | ffi::IBV_QP_AV
                | ffi::IBV_QP_PATH_MTU
                | ffi::IBV_QP_DEST_QPN
                | ffi::IBV_QP_RQ_PSN
                | ffi::IBV_QP_MAX_DEST_RD_ATOMIC
                | ffi::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::IBV_QPS_RTS,
            sq_psn: local_psn,
            // 14: 4.096 us * 2^14 = 67 ms per transport retry; 7 retries.
            timeout: 14,
            retry_cnt: 7,
            // 7: retry receiver-not-ready forever; credits make it rare.
            rnr_retry: 7,
            max_rd_atomic: 16,
            ..Default::default()
        };
        self.modify(
            &mut attr,
            ffi::IBV_QP_STATE
                | ffi::IBV_QP_SQ_PSN
                | ffi::IBV_QP_TIMEOUT
                | ffi::IBV_QP_RETRY_CNT
                | ffi::IBV_QP_RNR_RETRY
                | ffi::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )
    }

    /// Moves the QP to the error state: every posted work request completes
    /// with a flush error, which is how a broken connection gives back its
    /// buffers.
    pub fn to_error(&self) -> Result<()> {
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::IBV_QPS_ERR,
            ..Default::default()
        };
        self.modify(&mut attr, ffi::IBV_QP_STATE, "ibv_modify_qp(ERR)")
    }

    /// Posts one receive of `sge`.
    ///
    /// # Safety
    /// The memory `sge` names must stay registered and unused by anyone else
    /// until the receive completes (successfully or flushed).
    pub(crate) unsafe fn post_recv(&self, wr_id: u64, mut sge: Sge) -> Result<()> {
        let mut wr = ffi::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is alive; `wr` and `sge` are valid for the call (the
        // provider copies them); the caller keeps the memory valid.
        let rc = unsafe {
            let ops = &(*self.pd.context.raw.as_ptr()).ops;
            let post_recv = ops.post_recv.ok_or_else(|| {
                RdmaError::verb_rc("ibv_post_recv (missing in the provider)", libc::ENOSYS)
            })?;
            post_recv(self.raw.as_ptr(), &mut wr, &mut bad)
        };
        if rc != 0 {
            return Err(RdmaError::verb_rc("ibv_post_recv", rc));
        }
        Ok(())
    }

    /// Posts a chain of signalled send-queue work requests, one per entry.
    ///
    /// # Safety
    /// The local memory each entry names must stay registered, and, for
    /// RDMA READs, unused by anyone else, until its completion arrives.
    pub(crate) unsafe fn post_send(&self, requests: &[(u64, SendOp, Sge)]) -> Result<()> {
        if requests.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<Sge> = requests.iter().map(|(_, _, sge)| *sge).collect();
        let mut wrs: Vec<ffi::ibv_send_wr> = requests
            .iter()
            .map(|(wr_id, op, _)| {
                let mut wr = ffi::ibv_send_wr {
                    wr_id: *wr_id,
                    num_sge: 1,
                    send_flags: ffi::IBV_SEND_SIGNALED,
                    ..Default::default()
                };
                match *op {
                    SendOp::Send => wr.opcode = ffi::IBV_WR_SEND,
                    SendOp::RdmaRead { remote_addr, rkey } => {
                        wr.opcode = ffi::IBV_WR_RDMA_READ;
                        wr.wr.rdma =
                            ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
                    }
                    SendOp::RdmaWrite { remote_addr, rkey } => {
                        wr.opcode = ffi::IBV_WR_RDMA_WRITE;
                        wr.wr.rdma =
                            ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
                    }
                }
                wr
            })
            .collect();
        // Link the chain only now: the vectors no longer move.
        let count = wrs.len();
        let wr_base = wrs.as_mut_ptr();
        let sge_base = sges.as_mut_ptr();
        for index in 0..count {
            // SAFETY: `index` and `index + 1` are in bounds of the two
            // vectors, which are neither moved nor resized until the call.
            unsafe {
                (*wr_base.add(index)).sg_list = sge_base.add(index);
                if index + 1 < count {
                    (*wr_base.add(index)).next = wr_base.add(index + 1);
                }
            }
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is alive; the chain and its SGEs are valid for the
        // call (the provider copies them); the caller keeps the memory valid.
        let rc = unsafe {
            let ops = &(*self.pd.context.raw.as_ptr()).ops;
            let post_send = ops.post_send.ok_or_else(|| {
                RdmaError::verb_rc("ibv_post_send (missing in the provider)", libc::ENOSYS)
            })?;
            post_send(self.raw.as_ptr(), wr_base, &mut bad)
        };
        if rc != 0 {
            return Err(RdmaError::verb_rc("ibv_post_send", rc));
        }
        Ok(())
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: the QP is destroyed once; its buffers are owned by whoever
        // owns the QP and outlive it (conn.rs drops the QP first).
        unsafe { (self.pd.context.lib.ibv_destroy_qp)(self.raw.as_ptr()) };
        LIVE_QPS.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where rdma-core is missing, choosing the RDMA transport fails with an
    /// error naming the library and the packages that provide it.
    #[test]
    fn a_missing_library_is_named() {
        let Err(source) = load("libibverbs-missing.so.1") else {
            panic!("loaded a library that does not exist");
        };
        let error = RdmaError::Library {
            soname: ffi::LIBIBVERBS_SONAME,
            source,
        };
        let text = error.to_string();
        assert!(
            text.contains("libibverbs.so.1") && text.contains("libibverbs1"),
            "{text}"
        );
        let cause = std::error::Error::source(&error)
            .expect("keeps the loader's error")
            .to_string();
        assert!(cause.contains("libibverbs-missing.so.1"), "{cause}");
    }
}
