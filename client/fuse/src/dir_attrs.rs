//! The attributes of the directory the mount's last create went into, as
//! that create left them, to answer the kernel's next stat of it.
//!
//! The kernel drops a directory's cached attributes after every entry
//! created in it, and checks the caller's permission on the directory
//! before the next lookup or create in it: one GETATTR per file, a round
//! trip to the metadata service, when a program (`tar x`, `git checkout`)
//! makes file after file in one directory. The create's reply carries the
//! directory's attributes from the create's own transaction
//! (`OpenRsp::parent`), exactly what that GETATTR would have fetched right
//! then; this keeps them for the attribute timeout, as the kernel keeps any
//! attributes it fetched, while nothing else has changed here since.
//!
//! "Nothing else": every request of this mount that may change any
//! directory's attributes (a name made, removed or renamed anywhere, a
//! setattr or xattr change that is not of a file it has open) is a
//! [`Change`] from before it is sent to before it is answered. The kept
//! attributes are those of a create during which no other change started
//! or ended, and serve only until the next change starts. So the kernel
//! never gets from here attributes older than a change this mount
//! answered, and other clients' changes show up within the attribute
//! timeout, as with the kernel's own cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flyfs_proto::wire::meta::Attr;
use parking_lot::Mutex;

#[derive(Debug, Default)]
pub(crate) struct DirAttrs {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Bumped when a change starts and when it ends.
    epoch: u64,
    /// The last create's directory, valid while `epoch` is its own.
    kept: Option<Kept>,
}

#[derive(Debug)]
struct Kept {
    attr: Attr,
    /// When the create was sent: the attributes are at least this new.
    sent: Instant,
    epoch: u64,
}

impl DirAttrs {
    /// A request that may change a directory's attributes starts here; it
    /// ends when the returned guard is dropped (before it is answered).
    pub(crate) fn change(self: &Arc<Self>) -> Change {
        let mut state = self.state.lock();
        state.epoch += 1;
        Change {
            dirs: self.clone(),
            started: state.epoch,
            sent: Instant::now(),
            ended: false,
        }
    }

    /// Directory `ino`'s attributes, if a create kept them and they are
    /// newer than `ttl`: with how much longer the kernel may cache them.
    pub(crate) fn get(&self, ino: u64, ttl: Duration) -> Option<(Attr, Duration)> {
        let state = self.state.lock();
        let kept = state.kept.as_ref()?;
        if kept.epoch != state.epoch || kept.attr.ino.0 != ino {
            return None;
        }
        let left = ttl.checked_sub(kept.sent.elapsed())?;
        (!left.is_zero()).then(|| (kept.attr.clone(), left))
    }
}

/// A request that may change directory attributes, from before it is sent
/// to before it is answered.
#[derive(Debug)]
pub(crate) struct Change {
    dirs: Arc<DirAttrs>,
    started: u64,
    sent: Instant,
    ended: bool,
}

impl Change {
    /// Ends a create, keeping its directory's attributes if no other change
    /// started or ended while it ran.
    pub(crate) fn end_keeping(mut self, parent: Option<Attr>) {
        let mut state = self.dirs.state.lock();
        let alone = state.epoch == self.started;
        state.epoch += 1;
        state.kept = match parent {
            Some(attr) if alone => Some(Kept {
                attr,
                sent: self.sent,
                epoch: state.epoch,
            }),
            _ => None,
        };
        self.ended = true;
    }
}

impl Drop for Change {
    fn drop(&mut self) {
        if !self.ended {
            self.dirs.state.lock().epoch += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use flyfs_proto::ids::InodeId;
    use flyfs_proto::wire::meta::FileType;

    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn dir(ino: u64, mtime_ns: i64) -> Attr {
        Attr {
            ino: InodeId(ino),
            kind: FileType::Directory,
            mtime_ns,
            ..Attr::default()
        }
    }

    #[test]
    fn a_create_alone_keeps_its_directory_until_the_next_change() {
        let dirs = Arc::new(DirAttrs::default());
        dirs.change().end_keeping(Some(dir(5, 1)));
        let (attr, left) = dirs.get(5, TTL).expect("kept");
        assert_eq!(attr, dir(5, 1));
        assert!(left <= TTL);
        assert!(dirs.get(6, TTL).is_none(), "another directory");
        // Reads and changes that end keep nothing newer than them.
        let change = dirs.change();
        assert!(dirs.get(5, TTL).is_none(), "a change started");
        drop(change);
        assert!(dirs.get(5, TTL).is_none());
    }

    #[test]
    fn a_create_that_overlapped_another_change_keeps_nothing() {
        let dirs = Arc::new(DirAttrs::default());
        // Another change started after the create and is still running.
        let create = dirs.change();
        let other = dirs.change();
        create.end_keeping(Some(dir(5, 1)));
        assert!(dirs.get(5, TTL).is_none());
        drop(other);
        // Another change started before the create and ended during it.
        let other = dirs.change();
        let create = dirs.change();
        drop(other);
        create.end_keeping(Some(dir(5, 2)));
        assert!(dirs.get(5, TTL).is_none());
        // Another started before and ends after: the create keeps its
        // attributes only until that change ends.
        let other = dirs.change();
        let create = dirs.change();
        create.end_keeping(Some(dir(5, 3)));
        assert!(dirs.get(5, TTL).is_some());
        drop(other);
        assert!(dirs.get(5, TTL).is_none());
    }

    #[test]
    fn kept_attributes_expire_with_the_attribute_timeout() {
        let dirs = Arc::new(DirAttrs::default());
        dirs.change().end_keeping(Some(dir(5, 1)));
        assert!(dirs.get(5, Duration::ZERO).is_none());
        // A create whose service sent no attributes keeps none.
        dirs.change().end_keeping(None);
        assert!(dirs.get(5, TTL).is_none());
    }
}
