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
//! "Nothing else": every request of this mount that may change a
//! directory's attributes is a [`Change`] from before it is sent to before
//! it is answered: of the directory it names when that is the only one it
//! can change (a name made or unlinked there, a setattr or xattr change of
//! it), of every directory otherwise (rename, rmdir). A create keeps its
//! directory's attributes only if no change of that directory, nor any of
//! every directory, started or ended while it ran, and they serve only until
//! the next such change starts. So the kernel never gets from here
//! attributes older than a change this mount answered, and other clients'
//! changes show up within the attribute timeout, as with the kernel's own
//! cache. Creates in different directories (four `mdtest` processes, each
//! in its own) keep their own directories' attributes side by side.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flyfs_proto::wire::meta::Attr;
use parking_lot::Mutex;

/// Directories whose changes are tracked at once; beyond this the record is
/// dropped whole, which only makes creates in flight keep nothing.
const DIRS_MAX: usize = 1024;

#[derive(Debug, Default)]
pub(crate) struct DirAttrs {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Hands out every epoch, so a value is never reused, even for a
    /// directory whose record was dropped.
    clock: u64,
    /// Set from `clock` when a change of every directory starts or ends.
    everywhere: u64,
    /// Per directory (inode number): set from `clock` when a change of it
    /// starts or ends; absent means no value a create could have seen.
    dirs: HashMap<u64, Dir>,
}

#[derive(Debug, Default)]
struct Dir {
    epoch: u64,
    kept: Option<Kept>,
}

#[derive(Debug)]
struct Kept {
    attr: Attr,
    /// When the create was sent: the attributes are at least this new.
    sent: Instant,
    /// The directory's and every directory's epochs when they were kept.
    epoch: u64,
    everywhere: u64,
}

/// What a change may touch.
#[derive(Clone, Copy, Debug)]
enum Scope {
    Dir(u64),
    Everywhere,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Marks a change of `scope` (its start or its end); the directory's
    /// epoch after it, for a directory.
    fn bump(&mut self, scope: Scope) -> u64 {
        let now = self.tick();
        match scope {
            Scope::Dir(ino) => {
                if self.dirs.len() >= DIRS_MAX && !self.dirs.contains_key(&ino) {
                    self.dirs.clear();
                }
                self.dirs.entry(ino).or_default().epoch = now;
            }
            Scope::Everywhere => self.everywhere = now,
        }
        now
    }
}

impl DirAttrs {
    /// A request that may change directory `ino`'s attributes (and no
    /// other directory's) starts here; it ends when the returned guard is
    /// dropped (before it is answered).
    pub(crate) fn change_of(self: &Arc<Self>, ino: u64) -> Change {
        self.start(Scope::Dir(ino))
    }

    /// A request that may change any directory's attributes starts here.
    pub(crate) fn change_everywhere(self: &Arc<Self>) -> Change {
        self.start(Scope::Everywhere)
    }

    fn start(self: &Arc<Self>, scope: Scope) -> Change {
        let mut state = self.state.lock();
        let epoch = state.bump(scope);
        Change {
            dirs: self.clone(),
            scope,
            epoch,
            everywhere: state.everywhere,
            sent: Instant::now(),
            ended: false,
        }
    }

    /// Directory `ino`'s attributes, if a create kept them and they are
    /// newer than `ttl`: with how much longer the kernel may cache them.
    pub(crate) fn get(&self, ino: u64, ttl: Duration) -> Option<(Attr, Duration)> {
        let state = self.state.lock();
        let dir = state.dirs.get(&ino)?;
        let kept = dir.kept.as_ref()?;
        if kept.epoch != dir.epoch || kept.everywhere != state.everywhere {
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
    scope: Scope,
    /// The epoch this change's start gave its scope.
    epoch: u64,
    everywhere: u64,
    sent: Instant,
    ended: bool,
}

impl Change {
    /// Ends a create in the directory this change is of, keeping the
    /// directory's attributes `parent` if no other change of it (or of
    /// every directory) started or ended while it ran.
    pub(crate) fn end_keeping(mut self, parent: Option<Attr>) {
        let mut state = self.dirs.state.lock();
        let Scope::Dir(ino) = self.scope else {
            unreachable!("a create is a change of its directory")
        };
        let alone = state.everywhere == self.everywhere
            && state
                .dirs
                .get(&ino)
                .is_some_and(|dir| dir.epoch == self.epoch);
        let epoch = state.bump(self.scope);
        let everywhere = state.everywhere;
        if let Some(dir) = state.dirs.get_mut(&ino) {
            dir.kept = match parent {
                Some(attr) if alone && attr.ino.0 == ino => Some(Kept {
                    attr,
                    sent: self.sent,
                    epoch,
                    everywhere,
                }),
                _ => None,
            };
        }
        self.ended = true;
    }
}

impl Drop for Change {
    fn drop(&mut self) {
        if !self.ended {
            self.dirs.state.lock().bump(self.scope);
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
    fn a_create_alone_keeps_its_directory_until_the_next_change_of_it() {
        let dirs = Arc::new(DirAttrs::default());
        dirs.change_of(5).end_keeping(Some(dir(5, 1)));
        let (attr, left) = dirs.get(5, TTL).expect("kept");
        assert_eq!(attr, dir(5, 1));
        assert!(left <= TTL);
        assert!(dirs.get(6, TTL).is_none(), "another directory");
        // A change of another directory leaves them; one of this
        // directory, or of every directory, ends them.
        drop(dirs.change_of(6));
        assert!(dirs.get(5, TTL).is_some());
        let change = dirs.change_of(5);
        assert!(dirs.get(5, TTL).is_none(), "a change of it started");
        drop(change);
        assert!(dirs.get(5, TTL).is_none());
        dirs.change_of(5).end_keeping(Some(dir(5, 2)));
        drop(dirs.change_everywhere());
        assert!(dirs.get(5, TTL).is_none(), "a change of every directory");
    }

    #[test]
    fn a_create_that_overlapped_another_change_keeps_nothing() {
        let dirs = Arc::new(DirAttrs::default());
        for other in [
            (|d: &Arc<DirAttrs>| d.change_of(5)) as fn(&Arc<DirAttrs>) -> Change,
            |d| d.change_everywhere(),
        ] {
            // Another change started after the create and is still running.
            let create = dirs.change_of(5);
            let running = other(&dirs);
            create.end_keeping(Some(dir(5, 1)));
            assert!(dirs.get(5, TTL).is_none());
            drop(running);
            // Another change started before the create and ended during it.
            let running = other(&dirs);
            let create = dirs.change_of(5);
            drop(running);
            create.end_keeping(Some(dir(5, 2)));
            assert!(dirs.get(5, TTL).is_none());
            // Another started before and ends after: the create keeps its
            // attributes only until that change ends.
            let running = other(&dirs);
            let create = dirs.change_of(5);
            create.end_keeping(Some(dir(5, 3)));
            assert!(dirs.get(5, TTL).is_some());
            drop(running);
            assert!(dirs.get(5, TTL).is_none());
        }
        // Creates in two directories at once keep both.
        let (a, b) = (dirs.change_of(5), dirs.change_of(6));
        a.end_keeping(Some(dir(5, 4)));
        b.end_keeping(Some(dir(6, 4)));
        assert!(dirs.get(5, TTL).is_some() && dirs.get(6, TTL).is_some());
    }

    #[test]
    fn kept_attributes_expire_and_the_record_stays_bounded() {
        let dirs = Arc::new(DirAttrs::default());
        dirs.change_of(5).end_keeping(Some(dir(5, 1)));
        assert!(dirs.get(5, Duration::ZERO).is_none());
        // A create whose service sent no attributes keeps none.
        dirs.change_of(5).end_keeping(None);
        assert!(dirs.get(5, TTL).is_none());
        // A create in flight while the record is dropped keeps nothing.
        let create = dirs.change_of(5);
        for ino in 100..100 + DIRS_MAX as u64 {
            drop(dirs.change_of(ino));
        }
        assert!(dirs.state.lock().dirs.len() <= DIRS_MAX);
        create.end_keeping(Some(dir(5, 2)));
        assert!(dirs.get(5, TTL).is_none());
    }
}
