//! Shared memory the daemon can map without risk of a fault: memfds sealed
//! against shrinking. The application's side creates them
//! ([`create_sealed`]); the daemon's side refuses anything else
//! ([`check_sealed`]) with a message saying what was wrong.
//!
//! Why seals: a mapping of a file that another process truncates raises
//! SIGBUS on the next access past the new end (3FS #296). With
//! `F_SEAL_SHRINK` the kernel refuses the truncation instead, so the
//! daemon's mapping stays valid whatever the application does.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::NativeError;
use crate::wire::REGION_BYTES_MIN;

/// A memfd of `len` bytes, sealed against shrinking, growing and further
/// sealing. `name` shows in `/proc/PID/maps` of both processes.
pub fn create_sealed(name: &std::ffi::CStr, len: u64) -> Result<OwnedFd, NativeError> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(|e| NativeError::os("memfd_create", e))?;
    let size = i64::try_from(len)
        .map_err(|_| NativeError::Argument(format!("{len} bytes is too large")))?;
    nix::unistd::ftruncate(&fd, size).map_err(|e| NativeError::os("ftruncate of the memfd", e))?;
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(|e| NativeError::os("sealing the memfd", e))?;
    Ok(fd)
}

/// The size of `fd` if the daemon may map it: a regular file (a memfd)
/// sealed against shrinking, of at least `REGION_BYTES_MIN` bytes.
pub fn check_sealed(fd: BorrowedFd<'_>, what: &str) -> Result<u64, String> {
    let stat = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| format!("{what}: fstat: {e}"))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(format!("{what}: not a regular file (a memfd is expected)"));
    }
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(|e| {
        format!(
            "{what}: cannot read its seals ({e}): only a memfd created with MFD_ALLOW_SEALING \
             can be sealed; files under /dev/shm cannot, and could be truncated under the daemon"
        )
    })?;
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(format!(
            "{what}: not sealed against shrinking (F_SEAL_SHRINK): a truncation would fault the \
             daemon's mapping; create it with memfd_create(MFD_ALLOW_SEALING) and seal it (files \
             under /dev/shm cannot be sealed)"
        ));
    }
    let size = stat.st_size as u64;
    if size < REGION_BYTES_MIN {
        return Err(format!(
            "{what}: {size} bytes; at least {REGION_BYTES_MIN} are needed"
        ));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sealed_memfds_pass() {
        let sealed = create_sealed(c"memory-test", 8192).expect("create");
        assert_eq!(check_sealed(sealed.as_fd(), "iov"), Ok(8192));
        // The seal holds: the kernel refuses the truncation.
        assert!(nix::unistd::ftruncate(&sealed, 0).is_err());
        let plain = memfd_create(c"memory-test", MFdFlags::MFD_CLOEXEC).expect("memfd");
        nix::unistd::ftruncate(&plain, 8192).expect("ftruncate");
        let e = check_sealed(plain.as_fd(), "iov").expect_err("unsealed");
        assert!(e.contains("F_SEAL_SHRINK") || e.contains("seals"), "{e}");
        let file = tempfile_in_dev_shm();
        let e = check_sealed(file.as_fd(), "iov").expect_err("a tmpfs file");
        assert!(e.contains("/dev/shm") || e.contains("F_SEAL_SHRINK"), "{e}");
        let small = create_sealed(c"memory-test", 100).expect("create");
        let e = check_sealed(small.as_fd(), "iov").expect_err("small");
        assert!(e.contains("100 bytes"), "{e}");
    }

    fn tempfile_in_dev_shm() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("flyfs-memory-test-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temp file");
        let _ = std::fs::remove_file(&path);
        file.set_len(8192).expect("set_len");
        file
    }
}
