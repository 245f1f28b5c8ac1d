//! The metadata service's attributes as the kernel wants them: `stat`
//! fields, file types and times, and the times the kernel sends back in a
//! `setattr`.
//!
//! Times are nanoseconds since the epoch on the wire and `SystemTime` in
//! fuser, on both sides of the epoch; fuser 0.18 decodes times before the
//! epoch wrongly, which [`kernel_time_ns`] undoes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flyfs_proto::wire::meta::{Attr, FileType, SetTime};
use fuser::{FileAttr, INodeNo, TimeOrNow};

use crate::session::MAX_WRITE;

/// A time from the wire (nanoseconds since the epoch, negative before
/// it) as fuser wants it.
fn system_time(ns: i64) -> SystemTime {
    let magnitude = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    }
}

/// The inverse of [`system_time`], saturating at the ends of `i64`.
fn nanos(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// A time a `setattr` asks for, as the wire carries it.
pub(crate) fn set_time(time: TimeOrNow) -> SetTime {
    match time {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(kernel_time_ns(t)),
    }
}

/// A time fuser 0.18 decoded from the kernel, in nanoseconds. Its decoder
/// gets times before the epoch with a fraction wrong: the kernel's
/// (seconds -2, nanoseconds 0.5e9), which is -1.5 s, becomes the epoch minus
/// 2.5 s. Whole seconds and the fraction are recovered from what it made.
fn kernel_time_ns(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(_) => nanos(time),
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            secs.saturating_mul(-1_000_000_000)
                .saturating_add(i64::from(d.subsec_nanos()))
        }
    }
}

/// A file type as the kernel knows it.
pub(crate) fn kind_of(kind: FileType) -> fuser::FileType {
    match kind {
        FileType::File => fuser::FileType::RegularFile,
        FileType::Directory => fuser::FileType::Directory,
        FileType::Symlink => fuser::FileType::Symlink,
        FileType::Fifo => fuser::FileType::NamedPipe,
        FileType::Socket => fuser::FileType::Socket,
        FileType::CharDevice => fuser::FileType::CharDevice,
        FileType::BlockDevice => fuser::FileType::BlockDevice,
    }
}

/// `stat` as the kernel wants it.
pub(crate) fn file_attr(attr: &Attr) -> FileAttr {
    // The block size tells `cp` and friends how much to move per call: a
    // chunk (up to what one FUSE write carries) for files.
    let blksize = match &attr.layout {
        Some(layout) if layout.chunk_size >= 4096 => layout.chunk_size.min(MAX_WRITE),
        _ => 4096,
    };
    let ctime = system_time(attr.ctime_ns);
    FileAttr {
        ino: INodeNo(attr.ino.0),
        size: attr.length,
        blocks: attr.length.div_ceil(512),
        atime: system_time(attr.atime_ns),
        mtime: system_time(attr.mtime_ns),
        ctime,
        crtime: ctime,
        kind: kind_of(attr.kind),
        perm: (attr.mode & 0o7777) as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        // The kernel's own encoding, as mknod sent it.
        rdev: attr.rdev as u32,
        blksize,
        flags: 0,
    }
}

/// What a lookup of a name that does not exist answers when the kernel
/// may remember that (node 0: a negative entry, kept for the negative TTL).
pub(crate) fn no_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: fuser::FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The largest size a file of this layout can have (the client refuses
/// I/O beyond it with EFBIG).
pub(crate) fn max_file_size(attr: &Attr) -> u64 {
    attr.layout
        .as_ref()
        .map_or(u64::MAX, |layout| u64::from(layout.chunk_size) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_both_sides_of_the_epoch() {
        for ns in [0, 1, 1_700_000_000_123_456_789, -1, -1_500_000_000] {
            assert_eq!(nanos(system_time(ns)), ns);
        }
    }

    #[test]
    fn kernel_times_before_the_epoch_keep_their_fraction() {
        // What fuser 0.18 makes of the kernel's (-2 s, 0.5e9 ns) = -1.5 s.
        let decoded = UNIX_EPOCH - Duration::new(2, 500_000_000);
        assert_eq!(kernel_time_ns(decoded), -1_500_000_000);
        assert_eq!(
            kernel_time_ns(UNIX_EPOCH - Duration::from_secs(3)),
            -3_000_000_000
        );
        let after = UNIX_EPOCH + Duration::new(5, 7);
        assert_eq!(kernel_time_ns(after), 5_000_000_007);
    }
}
