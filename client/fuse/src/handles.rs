//! The numbers the kernel holds for open files and open directories
//! (`fh` in every FUSE request on them), and what each stands for: a
//! client [`FileHandle`] or a [`DirHandle`] with its listing so far.
//!
//! Numbers come from one counter for both kinds, start at 1 and are never
//! reused, so a stale number from the kernel finds nothing (EBADF) rather
//! than someone else's file.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flyfs_client::FsError;
use flyfs_client::fs::FileHandle;
use parking_lot::Mutex;

use crate::listing::DirHandle;
use crate::request::fail;

/// Open files and directories by handle number.
#[derive(Debug)]
pub(crate) struct OpenHandles {
    files: Mutex<HashMap<u64, Arc<FileHandle>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    /// File and directory handle numbers (never 0, never reused).
    next_fh: AtomicU64,
}

impl Default for OpenHandles {
    fn default() -> OpenHandles {
        OpenHandles {
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }
}

impl OpenHandles {
    fn next(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers an open file; its number is what the kernel gets.
    pub(crate) fn add_file(&self, handle: Arc<FileHandle>) -> u64 {
        let fh = self.next();
        self.files.lock().insert(fh, handle);
        fh
    }

    /// Registers an open directory; its number is what the kernel gets.
    pub(crate) fn add_dir(&self, dir: Arc<DirHandle>) -> u64 {
        let fh = self.next();
        self.dirs.lock().insert(fh, dir);
        fh
    }

    pub(crate) fn file(&self, fh: fuser::FileHandle) -> Result<Arc<FileHandle>, FsError> {
        self.files
            .lock()
            .get(&fh.0)
            .cloned()
            .ok_or_else(|| fail(libc::EBADF, format!("no open file {}", fh.0)))
    }

    pub(crate) fn dir(&self, fh: fuser::FileHandle) -> Result<Arc<DirHandle>, FsError> {
        self.dirs
            .lock()
            .get(&fh.0)
            .cloned()
            .ok_or_else(|| fail(libc::EBADF, format!("no open directory {}", fh.0)))
    }

    /// Forgets an open file (`release`), handing it back to be closed.
    pub(crate) fn remove_file(&self, fh: fuser::FileHandle) -> Result<Arc<FileHandle>, FsError> {
        self.files
            .lock()
            .remove(&fh.0)
            .ok_or_else(|| fail(libc::EBADF, format!("no open file {}", fh.0)))
    }

    /// Forgets an open directory (`releasedir`); an unknown number is
    /// ignored, as there is nothing to close.
    pub(crate) fn remove_dir(&self, fh: fuser::FileHandle) {
        self.dirs.lock().remove(&fh.0);
    }
}
