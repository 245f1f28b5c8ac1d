//! Opening the medium with `O_DIRECT`, finding its geometry, and the two
//! synchronous control-path calls that do not go through the ring: sizing a
//! regular file and discarding a range of a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::{DeviceError, Geometry, SECTOR_SIZE_MAX, SECTOR_SIZE_MIN};

/// Sector size reported for a regular file. `O_DIRECT` on a file needs
/// offsets, lengths and addresses aligned to the logical block size of the
/// device under the file system, which is 512 or 4096 on every device Linux
/// supports; 4096 is a multiple of both, so aligning to it is always enough
/// (and it is the file systems' usual block size, so writes never need a
/// read-modify-write of a partial block).
pub(super) const FILE_SECTOR_SIZE: u32 = 4096;

// Block-layer ioctls that libc does not define on every target. The encoding
// of `_IO`/`_IOR` differs on the architectures whose ioctl direction bits sit
// at bit 29 (mips, powerpc, sparc).
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
))]
mod ioctl {
    /// `_IOR(0x12, 114, size_t)`: the device size in bytes.
    pub(super) const BLKGETSIZE64: libc::Ioctl = 0x4008_1272;
    /// `_IO(0x12, 119)`: discard a `[start, len]` byte range.
    pub(super) const BLKDISCARD: libc::Ioctl = 0x2000_1277;
}
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
)))]
mod ioctl {
    /// `_IOR(0x12, 114, size_t)`: the device size in bytes.
    pub(super) const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;
    /// `_IO(0x12, 119)`: discard a `[start, len]` byte range.
    pub(super) const BLKDISCARD: libc::Ioctl = 0x1277;
}

/// An open medium and its shape.
#[derive(Debug)]
pub(super) struct Opened {
    pub(super) file: File,
    pub(super) geometry: Geometry,
    pub(super) block_device: bool,
}

fn open_error(path: &Path, reason: impl Into<String>, source: Option<io::Error>) -> DeviceError {
    DeviceError::Open {
        path: path.display().to_string(),
        reason: reason.into(),
        source,
    }
}

/// Opens a regular file or block device for `O_DIRECT` reads and writes and
/// works out its geometry.
pub(super) fn open_direct(path: &Path) -> Result<Opened, DeviceError> {
    let metadata = std::fs::metadata(path).map_err(|error| {
        let reason = match error.kind() {
            io::ErrorKind::NotFound => "no such file or device",
            io::ErrorKind::PermissionDenied => "permission denied",
            _ => "cannot read its metadata",
        };
        open_error(path, reason, Some(error))
    })?;
    let file_type = metadata.file_type();
    let block_device = file_type.is_block_device();
    if file_type.is_dir() {
        return Err(open_error(
            path,
            "it is a directory, not a regular file or block device",
            None,
        ));
    }
    if !block_device && !file_type.is_file() {
        return Err(open_error(
            path,
            "it is neither a regular file nor a block device",
            None,
        ));
    }
    let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
    if block_device {
        // O_EXCL without O_CREAT claims a block device exclusively: the open
        // fails if the device is mounted or claimed by another process, the
        // way SPDK takes a device away from the kernel.
        flags |= libc::O_EXCL;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|error| {
            let reason = match error.raw_os_error() {
                Some(libc::EINVAL) => "the file system does not support O_DIRECT",
                Some(libc::EBUSY) => {
                    "the block device is busy (mounted, or claimed by another process)"
                }
                Some(libc::EACCES | libc::EPERM) => {
                    "permission denied (read and write access is needed)"
                }
                Some(libc::EROFS) => "it is on a read-only file system",
                _ => "open with O_DIRECT failed",
            };
            open_error(path, reason, Some(error))
        })?;
    let geometry = if block_device {
        block_geometry(path, &file)?
    } else {
        file_geometry(path, &file)?
    };
    Ok(Opened {
        file,
        geometry,
        block_device,
    })
}

fn file_geometry(path: &Path, file: &File) -> Result<Geometry, DeviceError> {
    let len = file
        .metadata()
        .map_err(|error| open_error(path, "cannot read its length", Some(error)))?
        .len();
    let sector = u64::from(FILE_SECTOR_SIZE);
    if len == 0 {
        return Err(open_error(
            path,
            format!("the file is empty: a device needs at least one {sector}-byte sector"),
            None,
        ));
    }
    if len < sector {
        return Err(open_error(
            path,
            format!("the file is only {len} bytes, less than one {sector}-byte sector"),
            None,
        ));
    }
    // A tail shorter than a sector cannot be reached with O_DIRECT I/O, so it
    // is left out of the capacity.
    Ok(Geometry {
        sector_size: FILE_SECTOR_SIZE,
        capacity_bytes: len - len % sector,
    })
}

fn block_geometry(path: &Path, file: &File) -> Result<Geometry, DeviceError> {
    let fd = file.as_raw_fd();
    let mut capacity_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to a live local.
    if unsafe { libc::ioctl(fd, ioctl::BLKGETSIZE64, &raw mut capacity_bytes) } != 0 {
        return Err(open_error(
            path,
            "BLKGETSIZE64 failed",
            Some(io::Error::last_os_error()),
        ));
    }
    let mut sector_size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to
    // a live local.
    if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &raw mut sector_size) } != 0 {
        return Err(open_error(
            path,
            "BLKSSZGET failed",
            Some(io::Error::last_os_error()),
        ));
    }
    let sector_ok = u32::try_from(sector_size).is_ok_and(|size| {
        size.is_power_of_two() && (SECTOR_SIZE_MIN..=SECTOR_SIZE_MAX).contains(&(size as usize))
    });
    if !sector_ok {
        return Err(open_error(
            path,
            format!(
                "logical sector size {sector_size} is not a power of two in {SECTOR_SIZE_MIN}..={SECTOR_SIZE_MAX}"
            ),
            None,
        ));
    }
    let sector_size = sector_size as u32;
    if capacity_bytes == 0 {
        return Err(open_error(
            path,
            "the block device has a size of zero",
            None,
        ));
    }
    if !capacity_bytes.is_multiple_of(u64::from(sector_size)) {
        return Err(open_error(
            path,
            format!(
                "the device size {capacity_bytes} is not a multiple of its sector size {sector_size}"
            ),
            None,
        ));
    }
    Ok(Geometry {
        sector_size,
        capacity_bytes,
    })
}

/// Creates `path` if needed and makes it exactly `size_bytes` long, with the
/// space allocated up front where the file system allows it.
pub(super) fn create_sized(path: &Path, size_bytes: u64) -> Result<(), DeviceError> {
    let sector = u64::from(FILE_SECTOR_SIZE);
    if size_bytes == 0 || !size_bytes.is_multiple_of(sector) {
        return Err(open_error(
            path,
            format!("size {size_bytes} is not a positive multiple of {sector} bytes"),
            None,
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|error| open_error(path, "cannot create the file", Some(error)))?;
    let metadata = file
        .metadata()
        .map_err(|error| open_error(path, "cannot read its metadata", Some(error)))?;
    if !metadata.file_type().is_file() {
        return Err(open_error(
            path,
            "it exists and is not a regular file",
            None,
        ));
    }
    let current = metadata.len();
    if current > size_bytes {
        file.set_len(size_bytes)
            .map_err(|error| open_error(path, "cannot shrink the file", Some(error)))?;
    } else if current < size_bytes {
        let len = libc::off_t::try_from(size_bytes)
            .map_err(|_| open_error(path, "size overflows off_t", None))?;
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
        if rc != 0 {
            // Allocation up front is an optimisation (no allocation on the
            // write path, no ENOSPC surprises later); a sparse file works too.
            tracing::debug!(error = %io::Error::last_os_error(), "fallocate failed; extending the file sparsely");
            file.set_len(size_bytes)
                .map_err(|error| open_error(path, "cannot extend the file", Some(error)))?;
        }
    }
    Ok(())
}

/// `BLKDISCARD` on a block device. This is a rare control-path operation, so
/// it runs synchronously on the caller's thread instead of taking a ring
/// slot; the ring's own discard opcode needs a newer kernel than the rest.
pub(super) fn block_discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads two u64s through the pointer, which points to
    // a live local.
    if unsafe { libc::ioctl(file.as_raw_fd(), ioctl::BLKDISCARD, &raw const range) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on a regular file, for kernels whose
/// io_uring lacks the fallocate opcode.
pub(super) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The first offset of `file` that holds written data, rounded down to
/// `sector_size`, or `None` if the file is all holes and unwritten extents.
///
/// The IOPOLL probe needs it: a read of a hole or of a preallocated,
/// never-written extent is answered by the file system with zeros without
/// reaching the device, so it would "succeed" on a device that cannot poll.
pub(super) fn first_data_offset(file: &File, sector_size: u32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a file descriptor we own; no memory is passed.
    let offset = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    if offset < 0 {
        let error = io::Error::last_os_error();
        return if error.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(error)
        };
    }
    let offset = offset as u64;
    Ok(Some(offset - offset % u64::from(sector_size)))
}

/// Errors that mean "this device cannot discard", which the advisory
/// contract of discard turns into success.
pub(super) fn discard_unsupported(errno: i32) -> bool {
    matches!(errno, libc::EOPNOTSUPP | libc::ENOTTY | libc::ENOSYS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_discard_errors_are_recognised() {
        assert!(discard_unsupported(libc::EOPNOTSUPP));
        assert!(discard_unsupported(libc::ENOTTY));
        assert!(!discard_unsupported(libc::EIO));
    }

    #[test]
    fn file_sector_size_is_a_valid_sector_size() {
        let size = FILE_SECTOR_SIZE as usize;
        assert!(size.is_power_of_two());
        assert_eq!(size % SECTOR_SIZE_MIN, 0);
        assert!(size <= SECTOR_SIZE_MAX);
    }
}
