//! The controller itself: DMA memory the driver owns, queue pairs in it,
//! the specification's initialisation sequence (disable, admin queue,
//! enable, Identify, I/O queue creation), and the orderly shutdown.
//!
//! Everything here runs on one thread at a time: the opening thread until
//! the reactor starts, the reactor thread afterwards.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use flyfs_sys::nvme::{
    CompletionEntry, IdentifyController, IdentifyNamespace, SubmissionEntry, admin, cap, cc, csts,
    reg,
};

use super::layout::{CompletionRing, PAGE_BYTES, RangeAllocator, SubmissionRing};
use super::status::NvmeStatus;
use super::vfio::{OpenFailure, Vfio};
use crate::BufferPool;

/// The IOVA window the driver allocates from when the kernel does not say
/// which ranges the IOMMU can map (no iova-range capability, before Linux
/// 5.4). It starts above 4 GiB, clear of the x86 interrupt range
/// (0xfee00000) that the IOMMU reserves, and stays under 2^39, the
/// narrowest address width Intel IOMMUs (and QEMU's emulated one) implement.
const IOVA_FALLBACK: (u64, u64) = (1 << 32, 1 << 39);
/// IOVAs below this are never handed out, even where the IOMMU allows
/// them, so that a zero (or tiny) PRP entry can only be a driver bug.
const IOVA_FLOOR: u64 = 2 << 20;
/// Alignment of large IOVA ranges, so the IOMMU can use 2 MiB pages.
const IOVA_ALIGN_LARGE: u64 = 2 << 20;

/// Memory the driver owns and has mapped for the controller: queues, PRP
/// lists, Identify data, the bounce region. Zeroed at allocation.
pub(crate) struct DmaMemory {
    ptr: NonNull<u8>,
    len: usize,
    pub(crate) iova: u64,
}

// SAFETY: the memory is owned by this value alone; the controller reaches
// it by DMA, which the driver orders with fences around doorbells.
unsafe impl Send for DmaMemory {}

impl DmaMemory {
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Reads a plain-data value (integers and byte arrays only, so any bit
    /// pattern is valid) at `offset`.
    pub(crate) fn read<T: Copy>(&self, offset: usize) -> T {
        assert!(
            offset + size_of::<T>() <= self.len,
            "read outside DMA memory"
        );
        // SAFETY: in bounds (checked above); volatile because the device
        // writes this memory behind the compiler's back; callers only use
        // types for which every bit pattern is a valid value.
        unsafe { self.ptr.as_ptr().add(offset).cast::<T>().read_volatile() }
    }

    pub(crate) fn write<T: Copy>(&self, offset: usize, value: T) {
        assert!(
            offset + size_of::<T>() <= self.len,
            "write outside DMA memory"
        );
        // SAFETY: in bounds (checked above); volatile because the device
        // reads this memory behind the compiler's back.
        unsafe {
            self.ptr
                .as_ptr()
                .add(offset)
                .cast::<T>()
                .write_volatile(value)
        }
    }

    /// The bytes at `offset..offset + len`, for copying out of the bounce region.
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.len, "slice outside DMA memory");
        // SAFETY: in bounds (checked above); the caller reads only memory
        // whose DMA has completed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) }
    }

    #[allow(clippy::mut_from_ref)]
    pub(crate) fn bytes_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.len, "slice outside DMA memory");
        // SAFETY: in bounds (checked above); the reactor is the only thread
        // touching the region and writes only ranges no command uses.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) }
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe our own anonymous mapping. If the IOMMU
        // mapping still exists, the kernel keeps the pages pinned for it, so
        // unmapping here cannot hand the device someone else's memory.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// What Identify told us about the controller and namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeIdentity {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Maximum Data Transfer Size as reported (0 is no limit).
    pub mdts: u8,
    pub volatile_write_cache: bool,
    pub dataset_management: bool,
    pub namespace_id: u32,
    pub sector_size: u32,
    pub sectors: u64,
}

/// A submission and completion queue pair in driver-owned memory.
pub(crate) struct QueuePair {
    sq_memory: DmaMemory,
    cq_memory: DmaMemory,
    sq: SubmissionRing,
    cq: CompletionRing,
    sq_doorbell: usize,
    cq_doorbell: usize,
}

impl QueuePair {
    /// Writes a command into the next submission slot, without ringing
    /// the doorbell (the caller rings once per batch). `false` if the ring is full.
    pub(crate) fn push(&mut self, entry: SubmissionEntry) -> bool {
        let Some(slot) = self.sq.push() else {
            return false;
        };
        self.sq_memory.write(usize::from(slot) * 64, entry);
        true
    }

    pub(crate) fn is_full(&self) -> bool {
        self.sq.is_full()
    }

    /// Tells the controller about every command pushed so far.
    pub(crate) fn ring_submission_doorbell(&self, bar: &super::vfio::Bar) {
        // The commands must be in memory before the controller sees the
        // new tail and fetches them.
        fence(Ordering::SeqCst);
        bar.write32(self.sq_doorbell, u32::from(self.sq.tail()));
    }

    /// The next completion, if the controller has posted one.
    pub(crate) fn next_completion(&mut self) -> Option<CompletionEntry> {
        let offset = usize::from(self.cq.head()) * 16;
        let status: u16 = self.cq_memory.read(offset + 14);
        if (status & 1 == 1) != self.cq.phase() {
            return None;
        }
        // Read the rest of the entry only after seeing its phase tag.
        fence(Ordering::Acquire);
        let entry: CompletionEntry = self.cq_memory.read(offset);
        self.cq.advance();
        self.sq.set_head(entry.sq_head);
        Some(entry)
    }

    /// Tells the controller the completions consumed so far may be reused.
    pub(crate) fn ring_completion_doorbell(&self, bar: &super::vfio::Bar) {
        fence(Ordering::SeqCst);
        bar.write32(self.cq_doorbell, u32::from(self.cq.head()));
    }
}

/// The opened controller: VFIO handles, the IOVA space and its mappings.
pub(crate) struct Controller {
    pub(crate) vfio: Vfio,
    iovas: RangeAllocator,
    /// The usable IOVA space, `[start, end)` ranges, for error messages.
    iova_ranges: Vec<(u64, u64)>,
    /// Every IOMMU mapping made, `(iova, len)`, removed at drop.
    mappings: Vec<(u64, usize)>,
    /// The buffer pool arenas mapped for direct DMA: `(address, len, iova)`.
    pub(crate) arenas: Vec<(usize, usize, u64)>,
    /// Keeps the arenas alive while the IOMMU maps them.
    _pool: Option<BufferPool>,
    pub(crate) cap: u64,
    doorbell_stride: usize,
    /// CAP.TO: how long CSTS.RDY may take to follow CC.EN.
    pub(crate) ready_timeout: Duration,
}

impl Controller {
    pub(crate) fn new(vfio: Vfio) -> Result<Controller, OpenFailure> {
        let cap = vfio.bar.read64(reg::CAP);
        let version = vfio.bar.read32(reg::VS);
        if cap == u64::MAX || version == u32::MAX {
            return Err(failure(format!(
                "{}: the controller's registers read as all ones (the device is gone or in a bad state)",
                vfio.address
            )));
        }
        if cap::css(cap) & 1 == 0 {
            return Err(failure(format!(
                "{}: the controller does not support the NVM command set (CAP {cap:#018x})",
                vfio.address
            )));
        }
        if cap::mpsmin(cap) != 0 {
            return Err(failure(format!(
                "{}: the controller's smallest memory page is {} bytes; this driver uses 4096",
                vfio.address,
                4096u64 << cap::mpsmin(cap)
            )));
        }
        let iova_ranges = match vfio.iova_ranges() {
            Ok(Some(ranges)) => usable_iova_ranges(&ranges),
            Ok(None) => {
                tracing::warn!(
                    device = %vfio.address,
                    "the kernel does not report the IOMMU's IOVA ranges; using {:#x}..{:#x}",
                    IOVA_FALLBACK.0,
                    IOVA_FALLBACK.1
                );
                vec![IOVA_FALLBACK]
            }
            Err(error) => {
                return Err(OpenFailure {
                    reason: format!(
                        "{}: cannot read the IOMMU's usable IOVA ranges",
                        vfio.address
                    ),
                    source: Some(error),
                });
            }
        };
        if iova_ranges.is_empty() {
            return Err(failure(format!(
                "{}: the IOMMU leaves no usable IOVA range above {IOVA_FLOOR:#x}",
                vfio.address
            )));
        }
        let doorbell_stride = 4usize << cap::dstrd(cap);
        let ready_timeout = Duration::from_millis(u64::from(cap::to(cap).max(1)) * 500);
        Ok(Controller {
            vfio,
            iovas: RangeAllocator::from_ranges(&iova_ranges),
            iova_ranges,
            mappings: Vec::new(),
            arenas: Vec::new(),
            _pool: None,
            cap,
            doorbell_stride,
            ready_timeout,
        })
    }

    pub(crate) fn bar(&self) -> &super::vfio::Bar {
        &self.vfio.bar
    }

    /// The registers, for a reactor to ring its doorbells without the lock.
    pub(crate) fn shared_bar(&self) -> std::sync::Arc<super::vfio::Bar> {
        std::sync::Arc::clone(&self.vfio.bar)
    }

    fn map(&mut self, vaddr: *mut u8, len: usize) -> io::Result<u64> {
        let align = if len as u64 >= IOVA_ALIGN_LARGE {
            IOVA_ALIGN_LARGE
        } else {
            PAGE_BYTES
        };
        let iova = self
            .iovas
            .alloc((len as u64).next_multiple_of(PAGE_BYTES), align)
            .ok_or_else(|| {
                io::Error::other(format!(
                    "{len} bytes do not fit in what is left of the IOMMU's usable IOVA ranges {}",
                    describe_ranges(&self.iova_ranges)
                ))
            })?;
        if let Err(error) = self.vfio.map_dma(vaddr, len, iova) {
            self.iovas
                .free(iova, (len as u64).next_multiple_of(PAGE_BYTES));
            return Err(error);
        }
        self.mappings.push((iova, len));
        Ok(iova)
    }

    /// Maps each region of the pool's arena once, so buffers from it go to
    /// the controller without copying.
    pub(crate) fn map_pool(&mut self, pool: &BufferPool) -> io::Result<()> {
        for (ptr, len) in pool.regions() {
            let iova = self.map(ptr, len).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("the buffer pool's arena region of {len} bytes: {error}"),
                )
            })?;
            self.arenas.push((ptr as usize, len, iova));
        }
        self._pool = Some(pool.clone());
        Ok(())
    }

    /// Fresh zeroed memory of `len` bytes, mapped for the controller.
    pub(crate) fn alloc_dma(&mut self, len: usize) -> io::Result<DmaMemory> {
        let len = len.next_multiple_of(PAGE_BYTES as usize);
        // SAFETY: an anonymous private mapping at a fresh address; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut memory = DmaMemory {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
            iova: 0,
        };
        // Set in place: `DmaMemory { iova, ..memory }` would copy the
        // pointer out and then drop (unmap) `memory`.
        memory.iova = self.map(memory.as_ptr(), len)?;
        Ok(memory)
    }

    fn doorbell(&self, queue_id: u16, completion: bool) -> usize {
        reg::DOORBELLS
            + (2 * usize::from(queue_id) + usize::from(completion)) * self.doorbell_stride
    }

    /// The registers' state, if it shows the controller unusable: all ones
    /// (surprise removal or a dead link), fatal status, or not ready.
    pub(crate) fn health(&self) -> Result<(), String> {
        let status = self.bar().read32(reg::CSTS);
        if status == u32::MAX {
            return Err("the controller's registers read as all ones (surprise removal)".into());
        }
        if status & csts::CFS != 0 {
            return Err(format!("controller fatal status (CSTS {status:#x})"));
        }
        if status & csts::RDY == 0 {
            return Err(format!(
                "the controller was reset behind the driver's back (CSTS {status:#x})"
            ));
        }
        Ok(())
    }

    fn wait_ready(&self, ready: bool, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let status = self.bar().read32(reg::CSTS);
            if status == u32::MAX {
                return Err(
                    "the controller's registers read as all ones (surprise removal)".into(),
                );
            }
            if (status & csts::RDY != 0) == ready {
                return Ok(());
            }
            if ready && status & csts::CFS != 0 {
                return Err(format!(
                    "controller fatal status while enabling (CSTS {status:#x})"
                ));
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "CSTS.RDY did not become {} within CAP.TO ({} ms; CSTS {status:#x})",
                    u8::from(ready),
                    timeout.as_millis()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Clears CC.EN and waits for CSTS.RDY to clear: the controller stops
    /// processing commands and DMA, and forgets its queues.
    pub(crate) fn disable(&self) -> Result<(), String> {
        let config = self.bar().read32(reg::CC);
        if config == u32::MAX {
            return Err("the controller's registers read as all ones (surprise removal)".into());
        }
        self.bar().write32(reg::CC, config & !cc::EN);
        self.wait_ready(false, self.ready_timeout)
    }

    /// Normal shutdown (CC.SHN), so a controller with a volatile cache
    /// writes it back, then disable.
    pub(crate) fn shutdown(&self) -> Result<(), String> {
        let config = self.bar().read32(reg::CC);
        if config == u32::MAX {
            return Err("the controller's registers read as all ones (surprise removal)".into());
        }
        if config & cc::EN != 0 {
            self.bar()
                .write32(reg::CC, (config & !cc::SHN_MASK) | cc::SHN_NORMAL);
            let start = Instant::now();
            loop {
                let status = self.bar().read32(reg::CSTS);
                if status == u32::MAX {
                    return Err(
                        "the controller's registers read as all ones during shutdown".into(),
                    );
                }
                if status & csts::SHST_MASK == csts::SHST_COMPLETE {
                    break;
                }
                if start.elapsed() > self.ready_timeout {
                    return Err(format!(
                        "shutdown did not complete within CAP.TO (CSTS {status:#x})"
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.disable()
    }

    /// Resets the controller and brings it up with an admin queue of
    /// `entries`: the initialisation sequence of section 7.6.1.
    pub(crate) fn enable(&mut self, entries: u16) -> Result<QueuePair, String> {
        self.disable()
            .map_err(|error| format!("reset failed: {error}"))?;
        let admin = self
            .queue_pair(0, entries)
            .map_err(|error| format!("cannot allocate the admin queue: {error}"))?;
        let bar = self.bar();
        let size = u32::from(entries - 1);
        bar.write32(reg::AQA, size << 16 | size);
        bar.write64(reg::ASQ, admin.sq_memory.iova);
        bar.write64(reg::ACQ, admin.cq_memory.iova);
        bar.write32(
            reg::CC,
            cc::EN
                | cc::CSS_NVM
                | 0 << cc::MPS_SHIFT
                | cc::AMS_ROUND_ROBIN
                | 6 << cc::IOSQES_SHIFT
                | 4 << cc::IOCQES_SHIFT,
        );
        self.wait_ready(true, self.ready_timeout)
            .map_err(|error| format!("enable failed: {error}"))?;
        Ok(admin)
    }

    pub(crate) fn queue_pair(&mut self, id: u16, entries: u16) -> io::Result<QueuePair> {
        let sq_memory = self.alloc_dma(usize::from(entries) * 64)?;
        let cq_memory = self.alloc_dma(usize::from(entries) * 16)?;
        Ok(QueuePair {
            sq_memory,
            cq_memory,
            sq: SubmissionRing::new(entries),
            cq: CompletionRing::new(entries),
            sq_doorbell: self.doorbell(id, false),
            cq_doorbell: self.doorbell(id, true),
        })
    }

    /// Runs one admin command to completion by polling (start-up only).
    pub(crate) fn execute(
        &self,
        admin: &mut QueuePair,
        entry: SubmissionEntry,
        what: &str,
    ) -> Result<CompletionEntry, String> {
        if !admin.push(entry) {
            return Err(format!("{what}: the admin queue is full"));
        }
        admin.ring_submission_doorbell(self.bar());
        let start = Instant::now();
        loop {
            if let Some(completion) = admin.next_completion() {
                admin.ring_completion_doorbell(self.bar());
                if completion.command_id != entry.command_id() {
                    return Err(format!(
                        "{what}: completion for command {} while waiting for {}",
                        completion.command_id,
                        entry.command_id()
                    ));
                }
                return match NvmeStatus::of(&completion) {
                    None => Ok(completion),
                    Some(status) => Err(format!("{what} failed: {status}")),
                };
            }
            self.health().map_err(|error| format!("{what}: {error}"))?;
            if start.elapsed() > self.ready_timeout.max(Duration::from_secs(5)) {
                return Err(format!("{what} timed out"));
            }
            std::hint::spin_loop();
        }
    }

    /// Identify Controller and Identify Namespace `namespace_id`.
    pub(crate) fn identify(
        &mut self,
        admin: &mut QueuePair,
        namespace_id: u32,
    ) -> Result<NvmeIdentity, String> {
        let page = self
            .alloc_dma(PAGE_BYTES as usize)
            .map_err(|error| format!("cannot allocate the Identify buffer: {error}"))?;
        let mut command = SubmissionEntry::new(admin::IDENTIFY, 1);
        command.prp1 = page.iova;
        command.cdw10 = admin::CNS_CONTROLLER;
        self.execute(admin, command, "Identify Controller")?;
        let controller: IdentifyController = page.read(0);
        if controller.nn < namespace_id || namespace_id == 0 {
            return Err(format!(
                "namespace {namespace_id} does not exist (the controller has {})",
                controller.nn
            ));
        }
        let mut command = SubmissionEntry::new(admin::IDENTIFY, 2);
        command.nsid = namespace_id;
        command.prp1 = page.iova;
        command.cdw10 = admin::CNS_NAMESPACE;
        self.execute(admin, command, "Identify Namespace")?;
        let namespace: IdentifyNamespace = page.read(0);
        let format = namespace.lbaf[usize::from(namespace.flbas & 0xf)];
        if format.ms != 0 {
            return Err(format!(
                "namespace {namespace_id} is formatted with {} bytes of metadata per block; \
                 reformat it without metadata",
                format.ms
            ));
        }
        if !(9..=12).contains(&format.lbads) {
            return Err(format!(
                "namespace {namespace_id} has blocks of 2^{} bytes; flyfs needs 512 to 4096",
                format.lbads
            ));
        }
        if namespace.nsze == 0 {
            return Err(format!("namespace {namespace_id} is empty"));
        }
        let text = |bytes: &[u8]| {
            String::from_utf8_lossy(bytes)
                .trim_end_matches([' ', '\0'])
                .to_owned()
        };
        Ok(NvmeIdentity {
            serial: text(&controller.sn),
            model: text(&controller.mn),
            firmware: text(&controller.fr),
            mdts: controller.mdts,
            volatile_write_cache: controller.vwc & flyfs_sys::nvme::VWC_PRESENT != 0,
            dataset_management: controller.oncs & flyfs_sys::nvme::ONCS_DATASET_MANAGEMENT != 0,
            namespace_id,
            sector_size: 1 << format.lbads,
            sectors: namespace.nsze,
        })
    }

    /// Asks for `wanted` I/O queue pairs (Set Features, Number of Queues)
    /// and returns how many the controller granted, at most `wanted`.
    pub(crate) fn set_queue_count(
        &self,
        admin: &mut QueuePair,
        wanted: u16,
    ) -> Result<u16, String> {
        debug_assert!(wanted >= 1);
        let mut command = SubmissionEntry::new(admin::SET_FEATURES, 5);
        command.cdw10 = u32::from(admin::FEATURE_NUMBER_OF_QUEUES);
        // Both counts are 0-based: submission queues low, completion high.
        let count = u32::from(wanted - 1);
        command.cdw11 = count << 16 | count;
        let completion = self.execute(admin, command, "Set Features (Number of Queues)")?;
        Ok(granted_queue_pairs(completion.dw0, wanted))
    }

    /// Creates I/O queue pair `id` (completion queue first, as the
    /// specification requires), physically contiguous, without interrupts:
    /// the reactor polls.
    pub(crate) fn create_io_queues(
        &mut self,
        admin: &mut QueuePair,
        id: u16,
        entries: u16,
    ) -> Result<QueuePair, String> {
        let queue = self
            .queue_pair(id, entries)
            .map_err(|error| format!("cannot allocate I/O queue {id}: {error}"))?;
        let size = u32::from(entries - 1) << 16 | u32::from(id);
        let mut command = SubmissionEntry::new(admin::CREATE_IO_CQ, 3);
        command.prp1 = queue.cq_memory.iova;
        command.cdw10 = size;
        command.cdw11 = admin::QUEUE_PHYSICALLY_CONTIGUOUS;
        self.execute(admin, command, "Create I/O Completion Queue")?;
        let mut command = SubmissionEntry::new(admin::CREATE_IO_SQ, 4);
        command.prp1 = queue.sq_memory.iova;
        command.cdw10 = size;
        command.cdw11 = u32::from(id) << 16 | admin::QUEUE_PHYSICALLY_CONTIGUOUS;
        self.execute(admin, command, "Create I/O Submission Queue")?;
        Ok(queue)
    }

    /// Removes every IOMMU mapping: the controller can reach none of our
    /// memory afterwards, whatever state it is in.
    pub(crate) fn unmap_all(&mut self) -> io::Result<()> {
        let mut first_error = None;
        for (iova, len) in std::mem::take(&mut self.mappings) {
            if let Err(error) = self.vfio.unmap_dma(iova, len) {
                first_error.get_or_insert(error);
            } else {
                self.iovas
                    .free(iova, (len as u64).next_multiple_of(PAGE_BYTES));
            }
        }
        self.arenas.clear();
        first_error.map_or(Ok(()), Err)
    }
}

/// The IOMMU's usable ranges (inclusive, from the kernel) as the `[start,
/// end)` ranges the driver allocates from: at or above `IOVA_FLOOR`, whole
/// pages, adjacent ranges merged.
pub(crate) fn usable_iova_ranges(inclusive: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut usable: Vec<(u64, u64)> = Vec::new();
    for &(first, last) in inclusive {
        let start = first.max(IOVA_FLOOR).next_multiple_of(PAGE_BYTES);
        // The exclusive end, rounded down to a page; the top of a 64-bit
        // space cannot be represented and is given up.
        let end = last.saturating_add(1) / PAGE_BYTES * PAGE_BYTES;
        if start >= end {
            continue;
        }
        match usable.last_mut() {
            Some(previous) if previous.1 == start => previous.1 = end,
            _ => usable.push((start, end)),
        }
    }
    usable
}

fn describe_ranges(ranges: &[(u64, u64)]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|(start, end)| format!("{start:#x}..{end:#x}"))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// The IOVA of `len` bytes at `addr`, if they lie in one of the mapped
/// `arenas` (`(address, len, iova)`).
pub(crate) fn arena_iova(arenas: &[(usize, usize, u64)], addr: usize, len: usize) -> Option<u64> {
    arenas.iter().find_map(|&(start, arena_len, iova)| {
        (addr >= start && addr + len <= start + arena_len).then(|| iova + (addr - start) as u64)
    })
}

/// The I/O queue pairs a Set Features (Number of Queues) completion grants:
/// dword 0 holds the submission (low 16 bits) and completion (high 16 bits)
/// queues allocated, 0-based. A pair needs one of each; the controller may
/// allocate more than asked, of which we use only what we asked for.
pub(crate) fn granted_queue_pairs(dw0: u32, wanted: u16) -> u16 {
    let submission = (dw0 & 0xffff) as u16;
    let completion = (dw0 >> 16) as u16;
    submission.min(completion).saturating_add(1).min(wanted)
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Err(error) = self.unmap_all() {
            tracing::warn!(device = %self.vfio.address, "cannot remove IOMMU mappings: {error}");
        }
    }
}

fn failure(reason: String) -> OpenFailure {
    OpenFailure {
        reason,
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_ranges_skip_the_floor_and_partial_pages() {
        let ranges = usable_iova_ranges(&[
            (0, 0xfedf_ffff),
            (0xfef0_0000, (1 << 39) - 1),
            (1 << 40, (1 << 40) + 0x1fff),
        ]);
        assert_eq!(
            ranges,
            vec![
                (IOVA_FLOOR, 0xfee0_0000),
                (0xfef0_0000, 1 << 39),
                (1 << 40, (1 << 40) + 0x2000)
            ]
        );
        // Adjacent ranges merge; a range of less than a page disappears;
        // the very top of the 64-bit space is representable only up to
        // its last whole page.
        assert_eq!(
            usable_iova_ranges(&[
                (0x40_0000, 0x4f_ffff),
                (0x50_0000, 0x5f_ffff),
                (0x70_0010, 0x70_0fff)
            ]),
            vec![(0x40_0000, 0x60_0000)]
        );
        assert_eq!(
            usable_iova_ranges(&[(1 << 63, u64::MAX)]),
            vec![(1 << 63, u64::MAX / PAGE_BYTES * PAGE_BYTES)]
        );
        assert!(usable_iova_ranges(&[(0, IOVA_FLOOR - 1)]).is_empty());
    }

    #[test]
    fn granted_queue_pairs_take_the_smaller_count() {
        // 0-based counts: 3 submission and 1 completion queue allocated.
        assert_eq!(granted_queue_pairs(1 << 16 | 3, 4), 2);
        assert_eq!(granted_queue_pairs(63 << 16 | 63, 4), 4);
        assert_eq!(granted_queue_pairs(0, 8), 1);
        assert_eq!(granted_queue_pairs(u32::MAX, 64), 64);
    }
}
