//! The VFIO side of the NVMe driver: finding the controller's IOMMU group,
//! opening the container, group and device, mapping BAR0, turning on bus
//! mastering, and mapping memory into the IOMMU for the controller's DMA.
//!
//! Each step that can fail for a reason the operator can fix (the device is
//! still bound to the kernel's nvme driver, its group is not viable, the
//! address names something that is not an NVMe controller, VFIO is not
//! loaded) fails with a sentence that says so and what to do; the kernel's
//! error is kept as the source.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use flyfs_sys::vfio;

/// PCI class code of an NVM Express I/O controller: mass storage (01h),
/// non-volatile memory (08h), NVMe programming interface (02h).
const PCI_CLASS_NVME: u32 = 0x01_08_02;
/// PCI command register: memory space enable and bus master enable.
const PCI_COMMAND_OFFSET: u64 = 4;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Bus master enable alone: cleared at close so the function stops DMA.
const PCI_COMMAND_MASTER_ONLY: u16 = PCI_COMMAND_MASTER;

/// Why opening a controller through VFIO failed: a sentence for the
/// operator, and the OS error where there is one.
#[derive(Debug)]
pub(crate) struct OpenFailure {
    pub(crate) reason: String,
    pub(crate) source: Option<io::Error>,
}

impl OpenFailure {
    fn new(reason: impl Into<String>) -> OpenFailure {
        OpenFailure {
            reason: reason.into(),
            source: None,
        }
    }

    fn os(reason: impl Into<String>, source: io::Error) -> OpenFailure {
        OpenFailure {
            reason: reason.into(),
            source: Some(source),
        }
    }
}

/// Checks a PCI address's shape and gives it in the full
/// `domain:bus:device.function` form sysfs uses (`00:04.0` gains `0000:`).
pub(crate) fn normalize_pci_address(address: &str) -> Result<String, OpenFailure> {
    let full = if address.matches(':').count() == 1 {
        format!("0000:{address}")
    } else {
        address.to_owned()
    };
    let bad = || {
        OpenFailure::new(format!(
            "'{address}' is not a PCI address (expected domain:bus:device.function in hex, e.g. 0000:00:04.0)"
        ))
    };
    let (domain_bus_device, function) = full.split_once('.').ok_or_else(bad)?;
    let parts: Vec<&str> = domain_bus_device.split(':').collect();
    let hex = |text: &str, digits: usize| {
        text.len() == digits && text.chars().all(|c| c.is_ascii_hexdigit())
    };
    if parts.len() != 3
        || !hex(parts[0], 4)
        || !hex(parts[1], 2)
        || !hex(parts[2], 2)
        || !hex(function, 1)
    {
        return Err(bad());
    }
    Ok(full.to_ascii_lowercase())
}

/// BAR0 of the controller, mapped into our address space.
pub(crate) struct Bar {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is device memory reached only through volatile reads
// and writes of aligned 32-bit registers, which the controller serialises;
// sharing the pointer between threads is as safe as sharing the registers.
unsafe impl Send for Bar {}
// SAFETY: as for Send.
unsafe impl Sync for Bar {}

impl Bar {
    /// Reads the 32-bit register at `offset`.
    pub(crate) fn read32(&self, offset: usize) -> u32 {
        assert!(
            offset + 4 <= self.len && offset.is_multiple_of(4),
            "register {offset:#x} outside BAR0"
        );
        // SAFETY: the offset is inside the mapping and aligned (checked
        // above); device registers must be read with a volatile access.
        unsafe { self.ptr.as_ptr().add(offset).cast::<u32>().read_volatile() }
    }

    /// Writes the 32-bit register at `offset`.
    pub(crate) fn write32(&self, offset: usize, value: u32) {
        assert!(
            offset + 4 <= self.len && offset.is_multiple_of(4),
            "register {offset:#x} outside BAR0"
        );
        // SAFETY: as in `read32`.
        unsafe {
            self.ptr
                .as_ptr()
                .add(offset)
                .cast::<u32>()
                .write_volatile(value)
        }
    }

    /// Reads a 64-bit register as two 32-bit halves, low first: every
    /// controller accepts 32-bit accesses, not all accept 64-bit ones.
    pub(crate) fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | u64::from(self.read32(offset + 4)) << 32
    }

    pub(crate) fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping made in `Vfio::open`, and
        // every user of it borrows the Vfio that owns us.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// An open VFIO container with the controller's group attached and its
/// device open. Dropping it closes the device, the group and the container,
/// which also removes every IOMMU mapping the container still holds.
pub(crate) struct Vfio {
    pub(crate) address: String,
    /// Shared with the reactors, which ring their doorbells through it
    /// without taking the controller's lock. The mapping holds its own
    /// reference to the device file, so it may outlive the fields below.
    pub(crate) bar: Arc<Bar>,
    // Fields drop in order: the BAR mapping before the device fd, the device
    // before the group, the group before the container.
    device: File,
    config_offset: u64,
    /// Signalled by vfio-pci when the kernel wants the device back (someone
    /// unbinds it): the driver must let go, or the unbind waits forever.
    request: Option<OwnedFd>,
    _group: OwnedFd,
    container: OwnedFd,
}

impl Vfio {
    /// Opens the controller at `address` (already normalised).
    pub(crate) fn open(address: &str) -> Result<Vfio, OpenFailure> {
        let sysfs = Path::new("/sys/bus/pci/devices").join(address);
        if !sysfs.exists() {
            return Err(OpenFailure::new(format!(
                "no PCI device at {address} (see `ls /sys/bus/pci/devices`)"
            )));
        }
        let class_text = std::fs::read_to_string(sysfs.join("class")).map_err(|error| {
            OpenFailure::os(format!("cannot read the PCI class of {address}"), error)
        })?;
        let class =
            u32::from_str_radix(class_text.trim().trim_start_matches("0x"), 16).map_err(|_| {
                OpenFailure::new(format!(
                    "PCI class '{}' of {address} is not hex",
                    class_text.trim()
                ))
            })?;
        if class != PCI_CLASS_NVME {
            return Err(OpenFailure::new(format!(
                "{address} is not an NVMe controller (PCI class {class:#08x}, an NVMe controller is {PCI_CLASS_NVME:#08x})"
            )));
        }
        match std::fs::read_link(sysfs.join("driver")) {
            Ok(driver) => {
                let name = driver
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if name != "vfio-pci" {
                    return Err(OpenFailure::new(format!(
                        "{address} is bound to the '{name}' driver, not vfio-pci: unbind it and bind \
                         vfio-pci (echo vfio-pci > {0}/driver_override; echo {address} > {0}/driver/unbind; \
                         echo {address} > /sys/bus/pci/drivers_probe)",
                        sysfs.display()
                    )));
                }
            }
            Err(_) => {
                return Err(OpenFailure::new(format!(
                    "{address} is bound to no driver: bind it to vfio-pci (echo vfio-pci > {0}/driver_override; \
                     echo {address} > /sys/bus/pci/drivers_probe)",
                    sysfs.display()
                )));
            }
        }
        let group_link = std::fs::read_link(sysfs.join("iommu_group")).map_err(|error| {
            OpenFailure::os(
                format!("{address} has no IOMMU group (is the IOMMU enabled? intel_iommu=on on the kernel command line)"),
                error,
            )
        })?;
        let group_number = group_link
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();

        if !Path::new("/dev/vfio/vfio").exists() {
            return Err(OpenFailure::new(
                "/dev/vfio/vfio is missing: load the vfio-pci and vfio_iommu_type1 modules",
            ));
        }
        let container = open_rw(Path::new("/dev/vfio/vfio")).map_err(|error| {
            OpenFailure::os("cannot open the VFIO container /dev/vfio/vfio", error)
        })?;
        let container = OwnedFd::from(container);
        // SAFETY: the ioctl takes no argument.
        let api = unsafe { libc::ioctl(container.as_raw_fd(), vfio::FLYFS_VFIO_GET_API_VERSION) };
        if api != vfio::VFIO_API_VERSION as i32 {
            return Err(OpenFailure::new(format!(
                "the kernel's VFIO API version is {api}, this driver speaks {}",
                vfio::VFIO_API_VERSION
            )));
        }
        // SAFETY: the ioctl takes an integer argument.
        let type1v2 = unsafe {
            libc::ioctl(
                container.as_raw_fd(),
                vfio::FLYFS_VFIO_CHECK_EXTENSION,
                vfio::VFIO_TYPE1v2_IOMMU as libc::c_ulong,
            )
        } > 0;
        if !type1v2 {
            return Err(OpenFailure::new(
                "the kernel's VFIO has no type1v2 IOMMU (load vfio_iommu_type1)",
            ));
        }

        let group_path = Path::new("/dev/vfio").join(&group_number);
        let group = open_rw(&group_path).map_err(|error| {
            let hint = if error.raw_os_error() == Some(libc::EBUSY) {
                " (another process has it open)"
            } else {
                ""
            };
            OpenFailure::os(
                format!(
                    "cannot open the VFIO group {} of {address}{hint}",
                    group_path.display()
                ),
                error,
            )
        })?;
        let group = OwnedFd::from(group);
        let mut status = vfio::vfio_group_status {
            argsz: size_of::<vfio::vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: the argument is a live vfio_group_status with argsz set.
        let result = unsafe {
            libc::ioctl(
                group.as_raw_fd(),
                vfio::FLYFS_VFIO_GROUP_GET_STATUS,
                &raw mut status,
            )
        };
        if result < 0 {
            return Err(OpenFailure::os(
                "VFIO_GROUP_GET_STATUS failed",
                io::Error::last_os_error(),
            ));
        }
        if status.flags & vfio::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(OpenFailure::new(format!(
                "IOMMU group {group_number} of {address} is not viable: every device in \
                 /sys/kernel/iommu_groups/{group_number}/devices must be bound to vfio-pci (or no driver)"
            )));
        }
        let container_fd: libc::c_int = container.as_raw_fd();
        // SAFETY: the argument points at a live int holding the container fd.
        let result = unsafe {
            libc::ioctl(
                group.as_raw_fd(),
                vfio::FLYFS_VFIO_GROUP_SET_CONTAINER,
                &raw const container_fd,
            )
        };
        if result < 0 {
            return Err(OpenFailure::os(
                format!("cannot attach IOMMU group {group_number} to the VFIO container"),
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: the ioctl takes an integer argument.
        let result = unsafe {
            libc::ioctl(
                container.as_raw_fd(),
                vfio::FLYFS_VFIO_SET_IOMMU,
                vfio::VFIO_TYPE1v2_IOMMU as libc::c_ulong,
            )
        };
        if result < 0 {
            return Err(OpenFailure::os(
                "cannot select the type1v2 IOMMU",
                io::Error::last_os_error(),
            ));
        }
        let name =
            CString::new(address).map_err(|_| OpenFailure::new("PCI address holds a NUL byte"))?;
        // SAFETY: the argument is a NUL-terminated string that outlives the call.
        let device_fd = unsafe {
            libc::ioctl(
                group.as_raw_fd(),
                vfio::FLYFS_VFIO_GROUP_GET_DEVICE_FD,
                name.as_ptr(),
            )
        };
        if device_fd < 0 {
            return Err(OpenFailure::os(
                format!("cannot get the VFIO device {address} from its group"),
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: a fresh descriptor the kernel just gave us and nothing else owns.
        let device = unsafe { File::from_raw_fd(device_fd) };

        let bar0 = region_info(&device, vfio::VFIO_PCI_BAR0_REGION_INDEX)
            .map_err(|error| OpenFailure::os("cannot query BAR0", error))?;
        if bar0.flags & vfio::VFIO_REGION_INFO_FLAG_MMAP == 0 || bar0.size < 0x2000 {
            return Err(OpenFailure::new(format!(
                "BAR0 of {address} cannot be mapped (flags {:#x}, {} bytes)",
                bar0.flags, bar0.size
            )));
        }
        let len = bar0.size as usize;
        // SAFETY: maps the BAR0 region of the device fd at a fresh address;
        // the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                bar0.offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(OpenFailure::os(
                "cannot mmap BAR0",
                io::Error::last_os_error(),
            ));
        }
        let bar = Arc::new(Bar {
            ptr: NonNull::new(ptr.cast())
                .ok_or_else(|| OpenFailure::new("mmap of BAR0 returned null"))?,
            len,
        });
        let config = region_info(&device, vfio::VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(|error| OpenFailure::os("cannot query the PCI configuration region", error))?;
        let mut vfio = Vfio {
            address: address.to_owned(),
            bar,
            device,
            config_offset: config.offset,
            request: None,
            _group: group,
            container,
        };
        vfio.set_command_bits(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, true)
            .map_err(|error| OpenFailure::os("cannot enable bus mastering", error))?;
        match vfio.request_eventfd() {
            Ok(request) => vfio.request = Some(request),
            // Without it an unbind waits until the device is closed, which
            // is what kernels without the request interrupt always do.
            Err(error) => {
                tracing::warn!(device = %address, "no VFIO device request notification: {error}")
            }
        }
        Ok(vfio)
    }

    /// Sets or clears bits of the PCI command register.
    fn set_command_bits(&self, bits: u16, on: bool) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut command = [0u8; 2];
        self.device
            .read_exact_at(&mut command, self.config_offset + PCI_COMMAND_OFFSET)?;
        let mut value = u16::from_le_bytes(command);
        if on {
            value |= bits;
        } else {
            value &= !bits;
        }
        self.device.write_all_at(
            &value.to_le_bytes(),
            self.config_offset + PCI_COMMAND_OFFSET,
        )
    }

    /// An eventfd that vfio-pci signals when it wants the device back.
    fn request_eventfd(&self) -> io::Result<OwnedFd> {
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        // vfio_irq_set followed by its data: one eventfd (an int).
        #[repr(C)]
        struct IrqSet {
            header: vfio::vfio_irq_set,
            fd: i32,
        }
        let mut set = IrqSet {
            header: vfio::vfio_irq_set {
                argsz: size_of::<IrqSet>() as u32,
                flags: vfio::VFIO_IRQ_SET_DATA_EVENTFD | vfio::VFIO_IRQ_SET_ACTION_TRIGGER,
                index: vfio::VFIO_PCI_REQ_IRQ_INDEX,
                start: 0,
                count: 1,
                data: vfio::__IncompleteArrayField::new(),
            },
            fd: eventfd.as_raw_fd(),
        };
        // SAFETY: the argument is a live vfio_irq_set whose argsz covers the
        // one eventfd that follows it.
        let result = unsafe {
            libc::ioctl(
                self.device.as_raw_fd(),
                vfio::FLYFS_VFIO_DEVICE_SET_IRQS,
                &raw mut set,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(eventfd)
    }

    /// Whether vfio-pci has asked for the device back since the last call.
    pub(crate) fn device_requested(&self) -> bool {
        let Some(request) = &self.request else {
            return false;
        };
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a live local from a non-blocking eventfd.
        let read = unsafe { libc::read(request.as_raw_fd(), (&raw mut count).cast(), 8) };
        read == 8 && count > 0
    }

    /// Turns bus mastering off: the function can no longer start DMA.
    pub(crate) fn disable_bus_master(&self) -> io::Result<()> {
        self.set_command_bits(PCI_COMMAND_MASTER_ONLY, false)
    }

    /// Maps `len` bytes at `vaddr` for the device's reads and writes at `iova`.
    pub(crate) fn map_dma(&self, vaddr: *mut u8, len: usize, iova: u64) -> io::Result<()> {
        let mut map = vfio::vfio_iommu_type1_dma_map {
            argsz: size_of::<vfio::vfio_iommu_type1_dma_map>() as u32,
            flags: vfio::VFIO_DMA_MAP_FLAG_READ | vfio::VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: len as u64,
        };
        // SAFETY: the argument is a live dma_map struct; the kernel pins the
        // pages behind vaddr, which the caller keeps mapped until unmap_dma.
        let result = unsafe {
            libc::ioctl(
                self.container.as_raw_fd(),
                vfio::FLYFS_VFIO_IOMMU_MAP_DMA,
                &raw mut map,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The IOVA ranges the IOMMU lets us map (`VFIO_IOMMU_GET_INFO`'s
    /// iova-range capability), as inclusive `(first, last)` pairs, or `None`
    /// if the kernel does not report them (before Linux 5.4).
    pub(crate) fn iova_ranges(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        let header_len = size_of::<vfio::vfio_iommu_type1_info>();
        // First with the bare struct: the kernel raises argsz to the size
        // the capability chain needs; then again with room for it. u64
        // words keep the buffer aligned for the struct.
        let mut words = vec![0u64; header_len.div_ceil(8)];
        for _ in 0..2 {
            let len = words.len() * 8;
            let argsz = u32::try_from(len).map_err(|_| io::Error::other("IOMMU info too large"))?;
            words.fill(0);
            words[0] = u64::from(argsz);
            // SAFETY: `words` is a live, aligned buffer of `argsz` bytes
            // starting with a vfio_iommu_type1_info; the kernel writes at
            // most argsz bytes.
            let result = unsafe {
                libc::ioctl(
                    self.container.as_raw_fd(),
                    vfio::FLYFS_VFIO_IOMMU_GET_INFO,
                    words.as_mut_ptr(),
                )
            };
            if result < 0 {
                return Err(io::Error::last_os_error());
            }
            let needed = (words[0] & 0xffff_ffff) as usize;
            if needed <= len {
                let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_ne_bytes()).collect();
                return parse_iova_ranges(&bytes[..needed.max(header_len)])
                    .map_err(|reason| io::Error::other(format!("VFIO_IOMMU_GET_INFO: {reason}")));
            }
            words = vec![0u64; needed.div_ceil(8)];
        }
        Err(io::Error::other(
            "VFIO_IOMMU_GET_INFO kept asking for a larger buffer",
        ))
    }

    /// Removes the mapping at `iova`: the device can no longer reach the memory.
    pub(crate) fn unmap_dma(&self, iova: u64, len: usize) -> io::Result<()> {
        let mut unmap = vfio::vfio_iommu_type1_dma_unmap {
            argsz: size_of::<vfio::vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size: len as u64,
            data: vfio::__IncompleteArrayField::new(),
        };
        // SAFETY: the argument is a live dma_unmap struct with argsz set.
        let result = unsafe {
            libc::ioctl(
                self.container.as_raw_fd(),
                vfio::FLYFS_VFIO_IOMMU_UNMAP_DMA,
                &raw mut unmap,
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Finds the iova-range capability in the bytes `VFIO_IOMMU_GET_INFO`
/// returned (a `vfio_iommu_type1_info` and its capability chain) and reads
/// its ranges, inclusive `(first, last)`, sorted. `Ok(None)`: the chain
/// holds no such capability. Every offset and count is checked against the
/// buffer, since a malformed chain must be an error, not a wild read.
pub(crate) fn parse_iova_ranges(bytes: &[u8]) -> Result<Option<Vec<(u64, u64)>>, String> {
    let u16_at = |offset: usize| -> Result<u16, String> {
        bytes
            .get(offset..offset + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("offset {offset} is past the {} bytes returned", bytes.len()))
    };
    let u32_at = |offset: usize| -> Result<u32, String> {
        bytes
            .get(offset..offset + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("offset {offset} is past the {} bytes returned", bytes.len()))
    };
    let u64_at = |offset: usize| -> Result<u64, String> {
        Ok(u64::from(u32_at(offset)?) | u64::from(u32_at(offset + 4)?) << 32)
    };
    // struct vfio_iommu_type1_info: argsz, flags, iova_pgsizes, cap_offset, pad.
    let flags = u32_at(4)?;
    if flags & vfio::VFIO_IOMMU_INFO_CAPS == 0 {
        return Ok(None);
    }
    let mut offset = u32_at(16)? as usize;
    let mut seen = 0;
    while offset != 0 {
        seen += 1;
        if seen > 64 {
            return Err("the capability chain does not end (more than 64 entries)".into());
        }
        if offset < size_of::<vfio::vfio_iommu_type1_info>() || !offset.is_multiple_of(4) {
            return Err(format!(
                "capability at offset {offset} overlaps the header or is misaligned"
            ));
        }
        // struct vfio_info_cap_header: id (u16), version (u16), next (u32).
        let id = u16_at(offset)?;
        let next = u32_at(offset + 4)? as usize;
        if u32::from(id) == vfio::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            // Then nr_iovas (u32), reserved (u32), and the ranges.
            let count = u32_at(offset + 8)? as usize;
            let first = offset + 16;
            if count == 0 {
                return Err("the iova-range capability lists no ranges".into());
            }
            let end = count
                .checked_mul(16)
                .and_then(|len| len.checked_add(first))
                .filter(|&end| end <= bytes.len())
                .ok_or_else(|| {
                    format!(
                        "the iova-range capability claims {count} ranges, more than the {} bytes returned hold",
                        bytes.len()
                    )
                })?;
            let mut ranges = Vec::with_capacity(count);
            for at in (first..end).step_by(16) {
                let (start, last) = (u64_at(at)?, u64_at(at + 8)?);
                if last < start {
                    return Err(format!("IOVA range {start:#x}..={last:#x} is empty"));
                }
                ranges.push((start, last));
            }
            ranges.sort_unstable();
            if ranges.windows(2).any(|pair| pair[1].0 <= pair[0].1) {
                return Err(format!("IOVA ranges overlap: {ranges:x?}"));
            }
            return Ok(Some(ranges));
        }
        if next != 0 && next <= offset {
            return Err(format!(
                "capability at offset {offset} points back to {next}"
            ));
        }
        offset = next;
    }
    Ok(None)
}

fn open_rw(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

fn region_info(device: &File, index: u32) -> io::Result<vfio::vfio_region_info> {
    let mut info = vfio::vfio_region_info {
        argsz: size_of::<vfio::vfio_region_info>() as u32,
        flags: 0,
        index,
        cap_offset: 0,
        size: 0,
        offset: 0,
    };
    // SAFETY: the argument is a live region_info struct with argsz set.
    let result = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            vfio::FLYFS_VFIO_DEVICE_GET_REGION_INFO,
            &raw mut info,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of a `vfio_iommu_type1_info` with its capability chain, as
    /// the kernel lays them out: `caps` are `(id, body)` appended in order.
    fn info_bytes(caps: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut bytes = vec![0u8; 24];
        let flags = if caps.is_empty() {
            vfio::VFIO_IOMMU_INFO_PGSIZES
        } else {
            vfio::VFIO_IOMMU_INFO_PGSIZES | vfio::VFIO_IOMMU_INFO_CAPS
        };
        bytes[4..8].copy_from_slice(&flags.to_ne_bytes());
        bytes[8..16].copy_from_slice(&0x4000_1000u64.to_ne_bytes());
        if !caps.is_empty() {
            bytes[16..20].copy_from_slice(&24u32.to_ne_bytes());
        }
        for (index, (id, body)) in caps.iter().enumerate() {
            let start = bytes.len();
            let next = if index + 1 < caps.len() {
                (start + 8 + body.len()) as u32
            } else {
                0
            };
            bytes.extend_from_slice(&id.to_ne_bytes());
            bytes.extend_from_slice(&1u16.to_ne_bytes());
            bytes.extend_from_slice(&next.to_ne_bytes());
            bytes.extend_from_slice(body);
        }
        let argsz = bytes.len() as u32;
        bytes[0..4].copy_from_slice(&argsz.to_ne_bytes());
        bytes
    }

    fn range_body(ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(ranges.len() as u32).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        for (start, last) in ranges {
            body.extend_from_slice(&start.to_ne_bytes());
            body.extend_from_slice(&last.to_ne_bytes());
        }
        body
    }

    #[test]
    fn iova_ranges_are_found_in_the_capability_chain() {
        // What an Intel IOMMU with a 39-bit address width reports: all of
        // it but the interrupt window, behind another capability.
        let ranges = [(0xfef0_0000, (1u64 << 39) - 1), (0, 0xfedf_ffff)];
        let bytes = info_bytes(&[
            (2, vec![0u8; 8]),
            (
                vfio::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16,
                range_body(&ranges),
            ),
        ]);
        assert_eq!(
            parse_iova_ranges(&bytes).expect("well formed"),
            Some(vec![(0, 0xfedf_ffff), (0xfef0_0000, (1u64 << 39) - 1)])
        );
        // No capabilities at all, or none of that id: nothing reported.
        assert_eq!(parse_iova_ranges(&info_bytes(&[])).expect("plain"), None);
        assert_eq!(
            parse_iova_ranges(&info_bytes(&[(3, vec![0u8; 8])])).expect("other cap"),
            None
        );
    }

    #[test]
    fn malformed_capability_chains_are_errors() {
        let id = vfio::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16;
        // A range count larger than the bytes returned.
        let mut bytes = info_bytes(&[(id, range_body(&[(0, 0xffff)]))]);
        bytes[32..36].copy_from_slice(&1000u32.to_ne_bytes());
        let error = parse_iova_ranges(&bytes).expect_err("count too large");
        assert!(error.contains("1000 ranges"), "{error}");
        // A chain that loops back on itself.
        let mut bytes = info_bytes(&[(5, vec![0u8; 8])]);
        bytes[28..32].copy_from_slice(&24u32.to_ne_bytes());
        let error = parse_iova_ranges(&bytes).expect_err("loop");
        assert!(error.contains("points back"), "{error}");
        // A capability offset past the end.
        let mut bytes = info_bytes(&[(id, range_body(&[(0, 0xffff)]))]);
        bytes[16..20].copy_from_slice(&4096u32.to_ne_bytes());
        let error = parse_iova_ranges(&bytes).expect_err("offset past the end");
        assert!(error.contains("past the"), "{error}");
        // Inverted and overlapping ranges.
        let bytes = info_bytes(&[(id, range_body(&[(0x2000, 0x1000)]))]);
        assert!(
            parse_iova_ranges(&bytes)
                .expect_err("inverted")
                .contains("empty")
        );
        let bytes = info_bytes(&[(id, range_body(&[(0, 0x2000), (0x1000, 0x3000)]))]);
        assert!(
            parse_iova_ranges(&bytes)
                .expect_err("overlap")
                .contains("overlap")
        );
        // Truncated input.
        assert!(parse_iova_ranges(&[0u8; 3]).is_err());
    }

    #[test]
    fn pci_addresses_are_checked_and_completed() {
        assert_eq!(
            normalize_pci_address("0000:00:04.0").expect("full"),
            "0000:00:04.0"
        );
        assert_eq!(
            normalize_pci_address("00:04.0").expect("short"),
            "0000:00:04.0"
        );
        assert_eq!(
            normalize_pci_address("0000:3B:00.1").expect("upper"),
            "0000:3b:00.1"
        );
        for bad in [
            "",
            "04.0",
            "0000:00:04",
            "0000:00:4.0",
            "0000:00:04.8x",
            "zz00:00:04.0",
            "a:b:c:d.0",
        ] {
            let error = normalize_pci_address(bad).expect_err(bad);
            assert!(
                error.reason.contains("is not a PCI address"),
                "{bad}: {}",
                error.reason
            );
        }
    }

    #[test]
    fn a_missing_device_is_named() {
        let error = Vfio::open("ffff:ff:1f.7").err().expect("no such device");
        assert!(
            error.reason.contains("no PCI device at ffff:ff:1f.7"),
            "{}",
            error.reason
        );
    }
}
