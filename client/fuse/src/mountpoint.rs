//! What is mounted at a path, and detaching it: what the `flyfs` binary
//! needs around a mount (clearing a flyfs mount whose daemon died, making
//! sure `flyfs down` leaves nothing mounted, a shutdown that finds the
//! mount busy) and the end-to-end tests need to clean up after themselves.
//!
//! The mount table is `/proc/self/mountinfo` (proc(5)): the fifth field of
//! a line is the mount point, and after the lone `-` come the file system
//! type and the source, all with spaces, tabs, newlines and backslashes
//! escaped in octal (`\040` for a space).
//!
//! Detaching is `umount2(MNT_DETACH)`, what `umount -l` does: the mount
//! leaves the namespace at once and the kernel lets go of it when the last
//! file open there is closed.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use nix::errno::Errno;
use nix::mount::{MntFlags, umount2};

use crate::session::FS_NAME;

/// The calling process's mount table.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// A mount-table look-up or an unmount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountPointError {
    #[error("reading {MOUNTINFO}: {0}")]
    Mountinfo(#[source] io::Error),
    #[error("detaching the mount at {}: {source}", point.display())]
    Detach {
        point: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("running umount -l {}: {source}", point.display())]
    UmountCommand {
        point: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("umount -l {} failed ({status})", point.display())]
    UmountFailed { point: PathBuf, status: ExitStatus },
}

/// A file system mounted at some point, as the mount table shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mounted {
    /// The type, `fuse.<subtype>` for FUSE mounts that name one.
    pub fstype: String,
    /// What was mounted: a device, or the name a FUSE daemon gave.
    pub source: String,
}

impl Mounted {
    /// Whether this is flyfs's FUSE mount: type `fuse.flyfs` (the subtype
    /// [`crate::mount`] sets), or a FUSE type without the subtype and
    /// source `flyfs` (a mount fuser makes as root shows plain `fuse`).
    pub fn is_flyfs(&self) -> bool {
        self.fstype.strip_prefix("fuse.") == Some(FS_NAME)
            || (self.fstype.starts_with("fuse") && self.source == FS_NAME)
    }
}

/// The topmost mount at `point`, if anything is mounted there.
pub fn mounted_at(point: &Path) -> Result<Option<Mounted>, MountPointError> {
    let info = std::fs::read_to_string(MOUNTINFO).map_err(MountPointError::Mountinfo)?;
    Ok(find_mount(&info, point))
}

/// Detaches the mount at `point` now; the kernel lets go of it when the
/// last file open there is closed.
///
/// Without the privilege to unmount (EPERM: the daemon runs as a user),
/// `umount -l` is asked instead: util-linux's setuid `umount` lets a user
/// detach a FUSE mount that user made.
pub fn lazy_unmount(point: &Path) -> Result<(), MountPointError> {
    match umount2(point, MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(Errno::EPERM) => {
            let status = Command::new("umount")
                .arg("-l")
                .arg(point)
                .status()
                .map_err(|source| MountPointError::UmountCommand {
                    point: point.to_path_buf(),
                    source,
                })?;
            if status.success() {
                Ok(())
            } else {
                Err(MountPointError::UmountFailed {
                    point: point.to_path_buf(),
                    status,
                })
            }
        }
        Err(errno) => Err(MountPointError::Detach {
            point: point.to_path_buf(),
            source: io::Error::from(errno),
        }),
    }
}

/// The last (topmost) mount at `point` in mountinfo text.
fn find_mount(info: &str, point: &Path) -> Option<Mounted> {
    let point = point.to_string_lossy();
    let point = point.trim_end_matches('/');
    let point = if point.is_empty() { "/" } else { point };
    info.lines()
        .rev()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let at = fields.get(4)?;
            let dash = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(dash + 1)?;
            let source = fields.get(dash + 2).copied().unwrap_or("");
            (unescape(at) == point).then(|| Mounted {
                fstype: unescape(fstype),
                source: unescape(source),
            })
        })
        .next()
}

/// mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && let Some(value) = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_finds_the_topmost_mount_with_escapes() {
        let info = "\
36 25 0:32 / /mnt/fly\\040fs rw,relatime shared:1 - ext4 /dev/vda rw
37 36 0:33 / /mnt/fly\\040fs rw,nosuid,nodev,relatime shared:2 - fuse.flyfs flyfs rw,user_id=0
38 25 0:34 / /var rw - tmpfs tmpfs rw
";
        let found = find_mount(info, Path::new("/mnt/fly fs/")).expect("found");
        assert_eq!(
            found,
            Mounted {
                fstype: "fuse.flyfs".to_string(),
                source: "flyfs".to_string()
            }
        );
        assert!(found.is_flyfs());
        assert_eq!(find_mount(info, Path::new("/mnt")), None);
        let var = find_mount(info, Path::new("/var")).expect("var");
        assert!(!var.is_flyfs());
    }

    #[test]
    fn flyfs_mounts_by_subtype_or_source() {
        let mounted = |fstype: &str, source: &str| Mounted {
            fstype: fstype.into(),
            source: source.into(),
        };
        assert!(mounted("fuse.flyfs", "anything").is_flyfs());
        assert!(mounted("fuse", "flyfs").is_flyfs());
        assert!(mounted("fuseblk", "flyfs").is_flyfs());
        assert!(!mounted("fuse.sshfs", "host:/dir").is_flyfs());
        assert!(!mounted("tmpfs", "flyfs").is_flyfs());
    }

    /// Detaches the tmpfs it mounted if the test fails half-way.
    struct Cleanup<'a>(&'a Path);

    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            while matches!(mounted_at(self.0), Ok(Some(_))) {
                if lazy_unmount(self.0).is_err() {
                    break;
                }
            }
        }
    }

    /// A real mount, found and detached. Mounting needs root (or
    /// CAP_SYS_ADMIN): without it the test says so and passes without
    /// running.
    #[test]
    fn a_mount_is_found_and_detached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let point = dir.path();
        assert_eq!(mounted_at(point).expect("mountinfo"), None);
        // Nothing mounted there: refused, whoever asks.
        assert!(lazy_unmount(point).is_err());
        let made = nix::mount::mount(
            Some("flyfs-mountpoint-test"),
            point,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
        if let Err(errno) = made {
            eprintln!("skipping the mount half of the test: mounting a tmpfs failed ({errno})");
            return;
        }
        let _cleanup = Cleanup(point);
        let found = mounted_at(point).expect("mountinfo").expect("mounted");
        assert_eq!(
            found,
            Mounted {
                fstype: "tmpfs".into(),
                source: "flyfs-mountpoint-test".into()
            }
        );
        assert!(!found.is_flyfs());
        lazy_unmount(point).expect("detach");
        assert_eq!(mounted_at(point).expect("mountinfo"), None);
    }
}
