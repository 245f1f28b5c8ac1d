//! Model-based test of the namespace: random operation sequences by several
//! users run against the real `Namespace` (on `MemKv`) and against a
//! reference model made of BTreeMaps, written from POSIX's rules as
//! documented on the operations (not from the implementation). After every
//! step the results and errno must agree and every inode ever created must
//! have the same attributes in both; every few steps and at the end `check()`
//! must find the store consistent, and at the end directory listings,
//! attributes and sessions are compared too.

mod ns_common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use flyfs_fs_meta::ns::{
    CreateFlags, InodeKind, Namespace, NsError, OpenFlags, SessionId, SetAttr, SetTime, XattrMode,
};
use flyfs_fs_meta::schema::{Inode, InodeData};
use flyfs_kv::mem::MemKv;
use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::User;
use ns_common::GC_DELAY_MS;
use proptest::prelude::*;

const ROOT: u64 = 1;
const R: u32 = 4;
const W: u32 = 2;
const X: u32 = 1;
/// A 1 MiB chunk and 32-bit chunk indexes.
const LENGTH_MAX: u64 = 1 << 52;

const NAMES: &[&[u8]] = &[
    b"a", b"b", b"c", b"d", b"s", b".", b"..", b"", b"x/y", b"n\0ul",
];
const PATH_NAMES: &[&[u8]] = &[b"a", b"b", b"c", b"d", b"s", b".", b".."];
const TARGETS: &[&[u8]] = &[
    b"a", b"b/c", b"/a", b"..", b"s", b"a/", b"/", b"../../d", b"s/a",
];
const MODES: &[u32] = &[
    0o755, 0o777, 0o700, 0o1777, 0o2775, 0o644, 0o600, 0o000, 0o4755, 0o070, 0o555, 0o6711,
];
const UIDS: &[u32] = &[0, 1000, 1001, 1002];
const GIDS: &[u32] = &[0, 100, 1000, 1001, 555];
const SIZES: &[u64] = &[0, 5, 1 << 20, LENGTH_MAX, LENGTH_MAX + 1];
const XATTR_NAMES: &[&[u8]] = &[b"user.a", b"user.b", b"trusted.c", b""];
const XATTR_VALUES: &[&[u8]] = &[b"", b"1", b"\xff\x00value"];
const XATTR_MODES: &[XattrMode] = &[XattrMode::Upsert, XattrMode::Create, XattrMode::Replace];

fn long_name() -> Vec<u8> {
    vec![b'l'; 256]
}

fn name(index: usize) -> Vec<u8> {
    NAMES.get(index).map_or_else(long_name, |n| n.to_vec())
}

/// Picks an inode: usually a live one (of the wanted kind), sometimes any
/// inode ever seen, dead or alive, to reach ENOENT / ENOTDIR paths.
#[derive(Clone, Copy, Debug)]
struct Pick {
    any: bool,
    index: usize,
}

fn pick() -> impl Strategy<Value = Pick> {
    (prop::bool::weighted(0.15), any::<usize>()).prop_map(|(any, index)| Pick { any, index })
}

/// Picks an existing entry most of the time (so that unlink, rename and
/// friends mostly act on something), else a directory and a name.
#[derive(Clone, Copy, Debug)]
struct EntryPick {
    existing: bool,
    index: usize,
    dir: Pick,
    name: usize,
}

fn entry_pick() -> impl Strategy<Value = EntryPick> {
    (
        prop::bool::weighted(0.6),
        any::<usize>(),
        pick(),
        name_index(),
    )
        .prop_map(|(existing, index, dir, name)| EntryPick {
            existing,
            index,
            dir,
            name,
        })
}

fn name_index() -> impl Strategy<Value = usize> {
    prop_oneof![12 => 0usize..5, 1 => 5usize..=NAMES.len()]
}

#[derive(Clone, Debug)]
struct Attr {
    mode: Option<usize>,
    uid: Option<usize>,
    gid: Option<usize>,
    size: Option<usize>,
    atime: Option<bool>,
    mtime: Option<bool>,
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        user: usize,
        dir: Pick,
        name: usize,
        mode: usize,
        exclusive: bool,
        truncate: bool,
        read: bool,
        write: bool,
    },
    Mkdir {
        user: usize,
        dir: Pick,
        name: usize,
        mode: usize,
    },
    MkdirAll {
        user: usize,
        path: Vec<usize>,
        mode: usize,
    },
    Symlink {
        user: usize,
        dir: Pick,
        name: usize,
        target: usize,
    },
    Link {
        user: usize,
        ino: Pick,
        dir: Pick,
        name: usize,
    },
    Unlink {
        user: usize,
        entry: EntryPick,
    },
    Rmdir {
        user: usize,
        entry: EntryPick,
    },
    Rename {
        user: usize,
        old: EntryPick,
        new: EntryPick,
    },
    RemoveAll {
        user: usize,
        entry: EntryPick,
    },
    Open {
        user: usize,
        ino: Pick,
        read: bool,
        truncate: bool,
        write: bool,
    },
    Close {
        session: usize,
        length: Option<u64>,
    },
    SetLength {
        ino: Pick,
        length: usize,
        exact: bool,
    },
    Setattr {
        user: usize,
        ino: Pick,
        attr: Attr,
    },
    SetXattr {
        user: usize,
        ino: Pick,
        name: usize,
        value: usize,
        mode: usize,
    },
    GetXattr {
        user: usize,
        ino: Pick,
        name: usize,
    },
    RemoveXattr {
        user: usize,
        ino: Pick,
        name: usize,
    },
    ListXattr {
        ino: Pick,
    },
    Readdir {
        user: usize,
        dir: Pick,
        after: Option<usize>,
        limit: usize,
    },
    Lookup {
        user: usize,
        dir: Pick,
        name: usize,
    },
    Resolve {
        user: usize,
        path: Vec<usize>,
        trailing_slash: bool,
        follow: bool,
    },
    Gc,
}

/// Root a third of the time, else one of three users.
fn user() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 2 => 1usize..4]
}

/// Mostly valid attribute names (the last two indexes are empty and too
/// long).
fn xattr_name_index() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0..XATTR_NAMES.len() - 1, 1 => XATTR_NAMES.len() - 1..=XATTR_NAMES.len()]
}

/// Mostly small values (the last index is one byte over the limit).
fn xattr_value_index() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0..XATTR_VALUES.len(), 1 => Just(XATTR_VALUES.len())]
}

fn mode() -> impl Strategy<Value = usize> {
    0..MODES.len()
}

fn attr() -> impl Strategy<Value = Attr> {
    (
        prop::option::weighted(0.4, 0..MODES.len()),
        prop::option::weighted(0.2, 0..UIDS.len()),
        prop::option::weighted(0.2, 0..GIDS.len()),
        prop::option::weighted(0.3, 0..SIZES.len()),
        prop::option::weighted(0.15, any::<bool>()),
        prop::option::weighted(0.15, any::<bool>()),
    )
        .prop_map(|(mode, uid, gid, size, atime, mtime)| Attr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (user(), pick(), name_index(), mode(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(user, dir, name, mode, exclusive, truncate, read, write)| Op::Create {
                user, dir, name, mode, exclusive, truncate, read, write
            }),
        6 => (user(), pick(), name_index(), mode())
            .prop_map(|(user, dir, name, mode)| Op::Mkdir { user, dir, name, mode }),
        1 => (user(), prop::collection::vec(0..PATH_NAMES.len(), 1..4), mode())
            .prop_map(|(user, path, mode)| Op::MkdirAll { user, path, mode }),
        2 => (user(), pick(), name_index(), 0..TARGETS.len())
            .prop_map(|(user, dir, name, target)| Op::Symlink { user, dir, name, target }),
        4 => (user(), pick(), pick(), name_index())
            .prop_map(|(user, ino, dir, name)| Op::Link { user, ino, dir, name }),
        4 => (user(), entry_pick()).prop_map(|(user, entry)| Op::Unlink { user, entry }),
        3 => (user(), entry_pick()).prop_map(|(user, entry)| Op::Rmdir { user, entry }),
        8 => (user(), entry_pick(), entry_pick())
            .prop_map(|(user, old, new)| Op::Rename { user, old, new }),
        2 => (user(), entry_pick()).prop_map(|(user, entry)| Op::RemoveAll { user, entry }),
        3 => (user(), pick(), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(user, ino, read, truncate, write)| Op::Open { user, ino, read, truncate, write }),
        3 => (any::<usize>(), prop::option::of(0u64..10))
            .prop_map(|(session, length)| Op::Close { session, length }),
        1 => (pick(), 0..SIZES.len(), any::<bool>())
            .prop_map(|(ino, length, exact)| Op::SetLength { ino, length, exact }),
        4 => (user(), pick(), attr()).prop_map(|(user, ino, attr)| Op::Setattr { user, ino, attr }),
        3 => (user(), pick(), xattr_name_index(), xattr_value_index(), 0..XATTR_MODES.len())
            .prop_map(|(user, ino, name, value, mode)| Op::SetXattr { user, ino, name, value, mode }),
        2 => (user(), pick(), xattr_name_index())
            .prop_map(|(user, ino, name)| Op::GetXattr { user, ino, name }),
        1 => (user(), pick(), xattr_name_index())
            .prop_map(|(user, ino, name)| Op::RemoveXattr { user, ino, name }),
        1 => pick().prop_map(|ino| Op::ListXattr { ino }),
        2 => (user(), pick(), prop::option::of(0usize..5), 1usize..4)
            .prop_map(|(user, dir, after, limit)| Op::Readdir { user, dir, after, limit }),
        2 => (user(), pick(), name_index())
            .prop_map(|(user, dir, name)| Op::Lookup { user, dir, name }),
        3 => (user(), prop::collection::vec(0..PATH_NAMES.len(), 1..5), any::<bool>(), any::<bool>())
            .prop_map(|(user, path, trailing_slash, follow)| Op::Resolve { user, path, trailing_slash, follow }),
        2 => Just(Op::Gc),
    ]
}

// ---------------------------------------------------------------------------
// The reference model.

#[derive(Clone, Debug, PartialEq, Eq)]
enum MData {
    File { length: u64, truncate_version: u64 },
    Dir { parent: u64 },
    Symlink { target: Vec<u8> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MInode {
    data: MData,
    uid: u32,
    gid: u32,
    mode: u32,
    nlink: u32,
    queued: bool,
}

impl MInode {
    fn is_dir(&self) -> bool {
        matches!(self.data, MData::Dir { .. })
    }

    fn kind(&self) -> InodeKind {
        match self.data {
            MData::File { .. } => InodeKind::File,
            MData::Dir { .. } => InodeKind::Directory,
            MData::Symlink { .. } => InodeKind::Symlink,
        }
    }

    /// The same inode as the real one says.
    fn from_real(inode: &Inode) -> MInode {
        MInode {
            data: match &inode.data {
                InodeData::File(f) => MData::File {
                    length: f.length,
                    truncate_version: f.truncate_version,
                },
                InodeData::Directory(d) => MData::Dir { parent: d.parent.0 },
                InodeData::Symlink(s) => MData::Symlink {
                    target: s.target.clone(),
                },
                InodeData::Special(_) => panic!("the model makes no special files"),
            },
            uid: inode.uid,
            gid: inode.gid,
            mode: inode.mode,
            nlink: inode.nlink,
            queued: inode.gc_due_ms.is_some(),
        }
    }
}

type Res<T> = Result<T, i32>;
/// A directory listing: (name, inode) by name.
type Listing = Vec<(Vec<u8>, u64)>;
/// `mkdir -p` in the model: the mode, and where to learn the id the real
/// namespace gave the directory it created as `(parent, name)`.
type CreateDirs<'a> = (u32, &'a mut dyn FnMut(u64, &[u8]) -> u64);

fn in_group(user: &User, gid: u32) -> bool {
    user.gid == gid || user.groups.contains(&gid)
}

/// POSIX access: the owner's, else the group's, else others' bits; root may
/// read and write anything and search any directory, but runs only files
/// with some x bit.
fn allowed(inode: &MInode, user: &User, mask: u32) -> bool {
    if user.uid == 0 {
        return mask & X == 0 || inode.is_dir() || inode.mode & 0o111 != 0;
    }
    let bits = if user.uid == inode.uid {
        (inode.mode >> 6) & 7
    } else if in_group(user, inode.gid) {
        (inode.mode >> 3) & 7
    } else {
        inode.mode & 7
    };
    bits & mask == mask
}

fn owner_or_root(inode: &MInode, user: &User) -> bool {
    user.uid == 0 || user.uid == inode.uid
}

/// Writing or truncating drops setuid, and setgid when group-executable.
fn kill_suid(mode: u32) -> u32 {
    let mode = mode & !0o4000;
    if mode & 0o010 != 0 {
        mode & !0o2000
    } else {
        mode
    }
}

#[derive(PartialEq, Eq, Debug)]
enum NameKind {
    Normal,
    Dot,
    DotDot,
}

fn name_kind(name: &[u8]) -> Res<NameKind> {
    if name.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(libc::EINVAL);
    }
    Ok(match name {
        b"." => NameKind::Dot,
        b".." => NameKind::DotDot,
        _ => NameKind::Normal,
    })
}

fn xattr_name(name: &[u8]) -> Res<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(libc::ERANGE);
    }
    if name.contains(&0) {
        return Err(libc::EINVAL);
    }
    Ok(())
}

#[derive(Clone, Default)]
struct Model {
    inodes: BTreeMap<u64, MInode>,
    entries: BTreeMap<(u64, Vec<u8>), u64>,
    sessions: BTreeSet<(u64, u64)>,
    xattrs: BTreeMap<(u64, Vec<u8>), Vec<u8>>,
}

impl Model {
    fn new() -> Model {
        let mut model = Model::default();
        model.inodes.insert(
            ROOT,
            MInode {
                data: MData::Dir { parent: ROOT },
                uid: 0,
                gid: 0,
                mode: 0o755,
                nlink: 1,
                queued: false,
            },
        );
        model
    }

    /// A directory's link count as Linux reports it: 2 (its entry and
    /// its `.`) plus one per subdirectory (their `..`); 0 once detached.
    fn with_dir_nlink(&self, ino: u64, mut inode: MInode) -> MInode {
        if inode.is_dir() {
            inode.nlink = if inode.queued {
                0
            } else {
                2 + self
                    .entries
                    .iter()
                    .filter(|((dir, _), child)| {
                        *dir == ino && self.inodes.get(child).is_some_and(MInode::is_dir)
                    })
                    .count() as u32
            };
        }
        inode
    }

    fn get(&self, ino: u64) -> Res<MInode> {
        self.inodes.get(&ino).cloned().ok_or(libc::ENOENT)
    }

    fn search_dir(&self, user: &User, ino: u64) -> Res<MInode> {
        let dir = self.get(ino)?;
        if !dir.is_dir() {
            return Err(libc::ENOTDIR);
        }
        if !allowed(&dir, user, X) {
            return Err(libc::EACCES);
        }
        Ok(dir)
    }

    fn can_add(dir: &MInode, user: &User) -> Res<()> {
        if dir.queued {
            return Err(libc::ENOENT);
        }
        if !allowed(dir, user, W | X) {
            return Err(libc::EACCES);
        }
        Ok(())
    }

    fn can_remove(dir: &MInode, victim: &MInode, user: &User) -> Res<()> {
        if !allowed(dir, user, W | X) {
            return Err(libc::EACCES);
        }
        if dir.mode & 0o1000 != 0 && user.uid != 0 && user.uid != dir.uid && user.uid != victim.uid
        {
            return Err(libc::EPERM);
        }
        Ok(())
    }

    fn entry(&self, dir: u64, name: &[u8]) -> Option<u64> {
        self.entries.get(&(dir, name.to_vec())).copied()
    }

    fn children(&self, dir: u64) -> Vec<(Vec<u8>, u64)> {
        self.entries
            .range((dir, Vec::new())..)
            .take_while(|((parent, _), _)| *parent == dir)
            .map(|((_, name), ino)| (name.clone(), *ino))
            .collect()
    }

    /// A new inode's owner: the caller, with the parent's group (and, for
    /// a directory, its setgid bit) when the parent is setgid.
    fn new_inode(parent: &MInode, user: &User, mode: u32, data: MData) -> MInode {
        let mut mode = mode & 0o7777;
        let is_dir = matches!(data, MData::Dir { .. });
        let gid = if parent.mode & 0o2000 != 0 {
            if is_dir {
                mode |= 0o2000;
            } else if mode & 0o2010 == 0o2010 && user.uid != 0 && !in_group(user, parent.gid) {
                mode &= !0o2000;
            }
            parent.gid
        } else {
            user.gid
        };
        MInode {
            data,
            uid: user.uid,
            gid,
            mode,
            nlink: 1,
            queued: false,
        }
    }

    fn delete(&mut self, ino: u64) {
        self.inodes.remove(&ino);
        self.xattrs.retain(|(i, _), _| *i != ino);
        self.sessions.retain(|(i, _)| *i != ino);
    }

    /// One link fewer (the entry is already gone): a file without links
    /// waits in the GC queue, a symlink without links is deleted.
    fn drop_link(&mut self, ino: u64) {
        let inode = self.inodes.get_mut(&ino).expect("linked inode exists");
        inode.nlink -= 1;
        if inode.nlink == 0 {
            if matches!(inode.data, MData::File { .. }) {
                inode.queued = true;
            } else {
                self.delete(ino);
            }
        }
    }

    fn open_linked(
        &mut self,
        user: &User,
        ino: u64,
        read: bool,
        truncate: bool,
        session: Option<u64>,
    ) -> Res<()> {
        let inode = self.inodes.get_mut(&ino).expect("exists");
        let write = truncate || session.is_some();
        let mask = if read { R } else { 0 } | if write { W } else { 0 };
        if mask != 0 && !allowed(inode, user, mask) {
            return Err(libc::EACCES);
        }
        if truncate {
            if user.uid != 0 {
                inode.mode = kill_suid(inode.mode);
            }
            if let MData::File {
                length,
                truncate_version,
            } = &mut inode.data
            {
                *length = 0;
                *truncate_version += 1;
            }
        }
        if let Some(session) = session {
            self.sessions.insert((ino, session));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        user: &User,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: CreateFlags,
        new_ino: u64,
        session: u64,
    ) -> Res<(u64, bool)> {
        if name_kind(name)? != NameKind::Normal {
            return Err(libc::EISDIR);
        }
        let dir = self.search_dir(user, parent)?;
        let session = flags.write_session.map(|_| session);
        if let Some(ino) = self.entry(parent, name) {
            if flags.exclusive {
                return Err(libc::EEXIST);
            }
            match self.get(ino)?.data {
                MData::Dir { .. } => return Err(libc::EISDIR),
                MData::Symlink { .. } => return Err(libc::ELOOP),
                MData::File { .. } => {}
            }
            self.open_linked(user, ino, flags.read, flags.truncate, session)?;
            return Ok((ino, false));
        }
        Model::can_add(&dir, user)?;
        let data = MData::File {
            length: 0,
            truncate_version: 0,
        };
        self.inodes
            .insert(new_ino, Model::new_inode(&dir, user, mode, data));
        self.entries.insert((parent, name.to_vec()), new_ino);
        if let Some(session) = session {
            self.sessions.insert((new_ino, session));
        }
        Ok((new_ino, true))
    }

    fn mkdir(
        &mut self,
        user: &User,
        parent: u64,
        name: &[u8],
        mode: u32,
        new_ino: u64,
    ) -> Res<u64> {
        if name_kind(name)? != NameKind::Normal {
            return Err(libc::EEXIST);
        }
        let dir = self.search_dir(user, parent)?;
        if self.entry(parent, name).is_some() {
            return Err(libc::EEXIST);
        }
        Model::can_add(&dir, user)?;
        let inode = Model::new_inode(&dir, user, mode, MData::Dir { parent });
        self.inodes.insert(new_ino, inode);
        self.entries.insert((parent, name.to_vec()), new_ino);
        Ok(new_ino)
    }

    fn symlink(
        &mut self,
        user: &User,
        parent: u64,
        name: &[u8],
        target: &[u8],
        new_ino: u64,
    ) -> Res<u64> {
        if name_kind(name)? != NameKind::Normal {
            return Err(libc::EEXIST);
        }
        let dir = self.search_dir(user, parent)?;
        if self.entry(parent, name).is_some() {
            return Err(libc::EEXIST);
        }
        Model::can_add(&dir, user)?;
        let data = MData::Symlink {
            target: target.to_vec(),
        };
        self.inodes
            .insert(new_ino, Model::new_inode(&dir, user, 0o777, data));
        self.entries.insert((parent, name.to_vec()), new_ino);
        Ok(new_ino)
    }

    fn link(&mut self, user: &User, ino: u64, parent: u64, name: &[u8]) -> Res<u64> {
        if name_kind(name)? != NameKind::Normal {
            return Err(libc::EEXIST);
        }
        let inode = self.get(ino)?;
        let dir = self.search_dir(user, parent)?;
        if self.entry(parent, name).is_some() {
            return Err(libc::EEXIST);
        }
        Model::can_add(&dir, user)?;
        if inode.is_dir() {
            return Err(libc::EPERM);
        }
        if inode.nlink == 0 {
            return Err(libc::ENOENT);
        }
        self.inodes.get_mut(&ino).expect("exists").nlink += 1;
        self.entries.insert((parent, name.to_vec()), ino);
        Ok(ino)
    }

    fn unlink(&mut self, user: &User, parent: u64, name: &[u8]) -> Res<()> {
        if name_kind(name)? != NameKind::Normal {
            return Err(libc::EISDIR);
        }
        let dir = self.search_dir(user, parent)?;
        let ino = self.entry(parent, name).ok_or(libc::ENOENT)?;
        let victim = self.get(ino)?;
        Model::can_remove(&dir, &victim, user)?;
        if victim.is_dir() {
            return Err(libc::EISDIR);
        }
        self.entries.remove(&(parent, name.to_vec()));
        self.drop_link(ino);
        Ok(())
    }

    fn rmdir(&mut self, user: &User, parent: u64, name: &[u8]) -> Res<()> {
        match name_kind(name)? {
            NameKind::Normal => {}
            NameKind::Dot => return Err(libc::EINVAL),
            NameKind::DotDot => return Err(libc::ENOTEMPTY),
        }
        let dir = self.search_dir(user, parent)?;
        let ino = self.entry(parent, name).ok_or(libc::ENOENT)?;
        let victim = self.get(ino)?;
        Model::can_remove(&dir, &victim, user)?;
        if !victim.is_dir() {
            return Err(libc::ENOTDIR);
        }
        if !self.children(ino).is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.entries.remove(&(parent, name.to_vec()));
        self.delete(ino);
        Ok(())
    }

    /// Whether `dir` is `ancestor` or below it.
    fn is_within(&self, mut dir: u64, ancestor: u64) -> bool {
        loop {
            if dir == ancestor {
                return true;
            }
            if dir == ROOT || dir == 0 {
                return false;
            }
            dir = match self.inodes[&dir].data {
                MData::Dir { parent } => parent,
                _ => unreachable!("parents are directories"),
            };
        }
    }

    fn rename(
        &mut self,
        user: &User,
        old_parent: u64,
        old_name: &[u8],
        new_parent: u64,
        new_name: &[u8],
    ) -> Res<()> {
        for name in [old_name, new_name] {
            if name_kind(name)? != NameKind::Normal {
                return Err(libc::EINVAL);
            }
        }
        let old_dir = self.search_dir(user, old_parent)?;
        let new_dir = self.search_dir(user, new_parent)?;
        let source_ino = self.entry(old_parent, old_name).ok_or(libc::ENOENT)?;
        let source = self.get(source_ino)?;
        let target_ino = self.entry(new_parent, new_name);
        if source.is_dir() && self.is_within(new_parent, source_ino) {
            return Err(libc::EINVAL);
        }
        if target_ino == Some(source_ino) {
            return Ok(());
        }
        Model::can_remove(&old_dir, &source, user)?;
        let target = match target_ino {
            None => {
                Model::can_add(&new_dir, user)?;
                None
            }
            Some(ino) => {
                let target = self.get(ino)?;
                Model::can_remove(&new_dir, &target, user)?;
                if source.is_dir() && !target.is_dir() {
                    return Err(libc::ENOTDIR);
                }
                if !source.is_dir() && target.is_dir() {
                    return Err(libc::EISDIR);
                }
                Some((ino, target))
            }
        };
        let moves_dir = source.is_dir() && old_parent != new_parent;
        if moves_dir && !allowed(&source, user, W) {
            return Err(libc::EACCES);
        }
        if let Some((ino, target)) = &target
            && target.is_dir()
            && !self.children(*ino).is_empty()
        {
            return Err(libc::ENOTEMPTY);
        }
        self.entries.remove(&(old_parent, old_name.to_vec()));
        self.entries
            .insert((new_parent, new_name.to_vec()), source_ino);
        if let Some((ino, target)) = target {
            if target.is_dir() {
                self.delete(ino);
            } else {
                self.drop_link(ino);
            }
        }
        if moves_dir {
            self.inodes.get_mut(&source_ino).expect("exists").data =
                MData::Dir { parent: new_parent };
        }
        Ok(())
    }

    /// `rm -r`'s checks on every directory of the tree under `top`, breadth
    /// first and each directory's entries in name order: write and search
    /// on the directory (EACCES), the sticky rule for each entry (EPERM).
    fn check_tree_removable(&self, user: &User, top: u64) -> Res<()> {
        let mut pending = std::collections::VecDeque::from([top]);
        while let Some(dir_ino) = pending.pop_front() {
            let dir = self.get(dir_ino)?;
            if !allowed(&dir, user, W | X) {
                return Err(libc::EACCES);
            }
            for (_, child_ino) in self.children(dir_ino) {
                let child = self.get(child_ino)?;
                Model::can_remove(&dir, &child, user)?;
                if child.is_dir() {
                    pending.push_back(child_ino);
                }
            }
        }
        Ok(())
    }

    fn remove_all(&mut self, user: &User, parent: u64, name: &[u8]) -> Res<()> {
        if name_kind(name)? != NameKind::Normal {
            return Err(libc::EINVAL);
        }
        let dir = self.search_dir(user, parent)?;
        let ino = self.entry(parent, name).ok_or(libc::ENOENT)?;
        let victim = self.get(ino)?;
        Model::can_remove(&dir, &victim, user)?;
        if !victim.is_dir() {
            self.entries.remove(&(parent, name.to_vec()));
            self.drop_link(ino);
            return Ok(());
        }
        if user.uid != 0 {
            self.check_tree_removable(user, ino)?;
        }
        self.entries.remove(&(parent, name.to_vec()));
        let victim = self.inodes.get_mut(&ino).expect("exists");
        victim.nlink = 0;
        victim.queued = true;
        victim.data = MData::Dir { parent: 0 };
        Ok(())
    }

    fn open(
        &mut self,
        user: &User,
        ino: u64,
        read: bool,
        truncate: bool,
        session: Option<u64>,
    ) -> Res<bool> {
        let inode = self.get(ino)?;
        match inode.data {
            MData::Dir { .. } => {
                if truncate || session.is_some() {
                    return Err(libc::EISDIR);
                }
                if read && !allowed(&inode, user, R) {
                    return Err(libc::EACCES);
                }
                Ok(false)
            }
            MData::Symlink { .. } => Err(libc::ELOOP),
            MData::File { .. } if inode.nlink == 0 => Err(libc::ENOENT),
            MData::File { .. } => {
                self.open_linked(user, ino, read, truncate, session)?;
                Ok(session.is_some())
            }
        }
    }

    fn close(&mut self, ino: u64, session: u64, length: Option<u64>) -> bool {
        if !self.sessions.remove(&(ino, session)) {
            return false;
        }
        if let Some(new_length) = length
            && let Some(MData::File { length, .. }) = self.inodes.get_mut(&ino).map(|i| &mut i.data)
        {
            *length = new_length;
        }
        true
    }

    fn set_length(&mut self, ino: u64, new_length: u64, exact: bool) -> Res<()> {
        let inode = self.inodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        match &mut inode.data {
            MData::Dir { .. } => Err(libc::EISDIR),
            MData::Symlink { .. } => Err(libc::EINVAL),
            MData::File { length, .. } => {
                let changed = if exact {
                    *length != new_length
                } else {
                    new_length > *length
                };
                if changed {
                    if new_length > LENGTH_MAX {
                        return Err(libc::EFBIG);
                    }
                    *length = new_length;
                }
                Ok(())
            }
        }
    }

    fn setattr(&mut self, user: &User, ino: u64, attr: &SetAttr) -> Res<()> {
        let inode = self.get(ino)?;
        let root = user.uid == 0;
        let mut new_mode = None;
        if let Some(mode) = attr.mode {
            if !owner_or_root(&inode, user) {
                return Err(libc::EPERM);
            }
            if matches!(inode.data, MData::Symlink { .. }) {
                return Err(libc::EOPNOTSUPP);
            }
            let mut mode = mode & 0o7777;
            if !root && !in_group(user, attr.gid.unwrap_or(inode.gid)) {
                mode &= !0o2000;
            }
            new_mode = Some(mode);
        }
        if !root {
            if let Some(uid) = attr.uid
                && !(user.uid == inode.uid && uid == inode.uid)
            {
                return Err(libc::EPERM);
            }
            if let Some(gid) = attr.gid
                && !(user.uid == inode.uid && (in_group(user, gid) || gid == inode.gid))
            {
                return Err(libc::EPERM);
            }
        }
        if let Some(size) = attr.size {
            match inode.data {
                MData::Dir { .. } => return Err(libc::EISDIR),
                MData::Symlink { .. } => return Err(libc::EINVAL),
                MData::File { .. } => {}
            }
            if !allowed(&inode, user, W) {
                return Err(libc::EACCES);
            }
            if size > LENGTH_MAX {
                return Err(libc::EFBIG);
            }
        }
        for time in [attr.atime, attr.mtime].into_iter().flatten() {
            match time {
                SetTime::At(_) if !owner_or_root(&inode, user) => return Err(libc::EPERM),
                SetTime::Now if !owner_or_root(&inode, user) && !allowed(&inode, user, W) => {
                    return Err(libc::EACCES);
                }
                _ => {}
            }
        }
        let inode = self.inodes.get_mut(&ino).expect("exists");
        if attr.uid.is_some() || attr.gid.is_some() {
            inode.uid = attr.uid.unwrap_or(inode.uid);
            inode.gid = attr.gid.unwrap_or(inode.gid);
            if !inode.is_dir() {
                inode.mode = kill_suid(inode.mode);
            }
        }
        if let Some(mode) = new_mode {
            inode.mode = mode;
        }
        if let Some(size) = attr.size {
            if !root {
                inode.mode = kill_suid(inode.mode);
            }
            if let MData::File {
                length,
                truncate_version,
            } = &mut inode.data
            {
                *length = size;
                *truncate_version += 1;
            }
        }
        Ok(())
    }

    fn set_xattr(
        &mut self,
        user: &User,
        ino: u64,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Res<()> {
        xattr_name(name)?;
        if value.len() > 65536 {
            return Err(libc::E2BIG);
        }
        let inode = self.get(ino)?;
        Model::xattr_writable(&inode, user)?;
        let exists = self.xattrs.contains_key(&(ino, name.to_vec()));
        match mode {
            XattrMode::Create if exists => return Err(libc::EEXIST),
            XattrMode::Replace if !exists => return Err(libc::ENODATA),
            _ => {}
        }
        self.xattrs.insert((ino, name.to_vec()), value.to_vec());
        Ok(())
    }

    fn xattr_writable(inode: &MInode, user: &User) -> Res<()> {
        if matches!(inode.data, MData::Symlink { .. }) {
            return Err(libc::EPERM);
        }
        if inode.is_dir() && inode.mode & 0o1000 != 0 && !owner_or_root(inode, user) {
            return Err(libc::EPERM);
        }
        if !allowed(inode, user, W) {
            return Err(libc::EACCES);
        }
        Ok(())
    }

    fn get_xattr(&self, user: &User, ino: u64, name: &[u8]) -> Res<Vec<u8>> {
        xattr_name(name)?;
        let inode = self.get(ino)?;
        if matches!(inode.data, MData::Symlink { .. }) {
            return Err(libc::ENODATA);
        }
        if !allowed(&inode, user, R) {
            return Err(libc::EACCES);
        }
        self.xattrs
            .get(&(ino, name.to_vec()))
            .cloned()
            .ok_or(libc::ENODATA)
    }

    fn remove_xattr(&mut self, user: &User, ino: u64, name: &[u8]) -> Res<()> {
        xattr_name(name)?;
        let inode = self.get(ino)?;
        Model::xattr_writable(&inode, user)?;
        self.xattrs
            .remove(&(ino, name.to_vec()))
            .map(|_| ())
            .ok_or(libc::ENODATA)
    }

    fn list_xattr(&self, ino: u64) -> Res<Vec<Vec<u8>>> {
        self.get(ino)?;
        Ok(self
            .xattrs
            .keys()
            .filter(|(i, _)| *i == ino)
            .map(|(_, name)| name.clone())
            .collect())
    }

    fn readdir(
        &self,
        user: &User,
        dir: u64,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Res<(Listing, bool)> {
        let inode = self.get(dir)?;
        if !inode.is_dir() {
            return Err(libc::ENOTDIR);
        }
        if !allowed(&inode, user, R) {
            return Err(libc::EACCES);
        }
        let all: Vec<_> = self
            .children(dir)
            .into_iter()
            .filter(|(name, _)| after.is_none_or(|a| name.as_slice() > a))
            .collect();
        let more = all.len() > limit;
        Ok((all.into_iter().take(limit).collect(), more))
    }

    fn parent_of(&self, dir: u64) -> Res<u64> {
        match self.inodes[&dir].data {
            MData::Dir { parent: 0 } => Err(libc::ENOENT),
            MData::Dir { parent } => Ok(parent),
            _ => unreachable!("a directory"),
        }
    }

    fn lookup(&self, user: &User, dir: u64, name: &[u8]) -> Res<u64> {
        let kind = name_kind(name)?;
        self.search_dir(user, dir)?;
        match kind {
            NameKind::Dot => Ok(dir),
            NameKind::DotDot => self.parent_of(dir),
            NameKind::Normal => self.entry(dir, name).ok_or(libc::ENOENT),
        }
    }

    /// Path resolution, with directory creation for `mkdir -p` (`create`
    /// gives the id the real namespace gave each new directory).
    fn walk(
        &mut self,
        user: &User,
        path: &[u8],
        follow_last: bool,
        create: Option<CreateDirs<'_>>,
    ) -> Res<u64> {
        fn push(stack: &mut Vec<(Vec<u8>, bool)>, path: &[u8], from_link: bool) {
            let mut parts: Vec<Vec<u8>> = path
                .split(|&b| b == b'/')
                .filter(|c| !c.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            if path.ends_with(b"/") && !parts.is_empty() {
                parts.push(b".".to_vec());
            }
            stack.extend(parts.into_iter().rev().map(|p| (p, from_link)));
        }
        if path.len() > 4096 {
            return Err(libc::ENAMETOOLONG);
        }
        if path.is_empty() {
            return Err(libc::ENOENT);
        }
        let mut create = create;
        let mut stack = Vec::new();
        push(&mut stack, path, false);
        let mut current = ROOT;
        let mut links = 0;
        while let Some((part, from_link)) = stack.pop() {
            if part.len() > 255 {
                return Err(libc::ENAMETOOLONG);
            }
            self.search_dir(user, current)?;
            if part == b"." {
                continue;
            }
            if part == b".." {
                current = self.parent_of(current)?;
                continue;
            }
            let last = stack.is_empty();
            let child = match self.entry(current, &part) {
                Some(child) => child,
                None => match &mut create {
                    Some((mode, new_id)) if !from_link => {
                        Model::can_add(&self.inodes[&current], user)?;
                        let id = new_id(current, &part);
                        let mode = if stack.iter().all(|(c, _)| c == b".") {
                            *mode
                        } else {
                            *mode | 0o300
                        };
                        self.mkdir(user, current, &part, mode, id)?
                    }
                    _ => return Err(libc::ENOENT),
                },
            };
            if let MData::Symlink { target } = &self.inodes[&child].data
                && (!last || follow_last)
            {
                links += 1;
                if links > 40 {
                    return Err(libc::ELOOP);
                }
                let target = target.clone();
                if target.starts_with(b"/") {
                    current = ROOT;
                }
                push(&mut stack, &target, true);
                continue;
            }
            current = child;
        }
        Ok(current)
    }

    /// The GC worker run to completion: queued directories are emptied
    /// (children queued or unlinked) and deleted, queued files without
    /// write sessions deleted.
    fn gc(&mut self) {
        loop {
            let dirs: Vec<u64> = self
                .inodes
                .iter()
                .filter(|(_, i)| i.queued && i.is_dir())
                .map(|(ino, _)| *ino)
                .collect();
            if dirs.is_empty() {
                break;
            }
            for dir in dirs {
                for (name, child) in self.children(dir) {
                    self.entries.remove(&(dir, name));
                    let inode = self.inodes.get_mut(&child).expect("exists");
                    if inode.is_dir() {
                        inode.nlink = 0;
                        inode.queued = true;
                        inode.data = MData::Dir { parent: 0 };
                    } else {
                        self.drop_link(child);
                    }
                }
                self.delete(dir);
            }
        }
        let files: Vec<u64> = self
            .inodes
            .iter()
            .filter(|(ino, i)| {
                i.queued
                    && !self
                        .sessions
                        .iter()
                        .any(|(session_ino, _)| session_ino == *ino)
            })
            .map(|(ino, _)| *ino)
            .collect();
        for ino in files {
            self.delete(ino);
        }
    }
}

// ---------------------------------------------------------------------------
// The harness: one step on both, compared.

struct Harness {
    rt: tokio::runtime::Runtime,
    ns: Namespace<MemKv>,
    clock: std::sync::Arc<flyfs_time::ManualClock>,
    model: Model,
    /// Every inode id ever seen, in order of appearance.
    known: Vec<u64>,
    users: Vec<User>,
}

fn errno<T>(result: &Result<T, NsError>) -> Result<(), i32> {
    match result {
        Ok(_) => Ok(()),
        Err(e @ (NsError::Kv(_) | NsError::Corrupt { .. } | NsError::Encode { .. })) => {
            panic!("unexpected internal error: {e}")
        }
        Err(e) => Err(e.errno()),
    }
}

/// Outcomes seen per operation (with NS_MODEL_DEBUG set, printed at the
/// end), to see which paths the random cases reach.
static COVERAGE: std::sync::Mutex<BTreeMap<String, usize>> = std::sync::Mutex::new(BTreeMap::new());

fn compare<T: PartialEq + Debug>(op: &Op, real: Res<T>, model: Res<T>) -> Result<(), String> {
    if std::env::var("NS_MODEL_DEBUG").is_ok() {
        let name = format!("{op:?}");
        let name = name.split([' ', '{']).next().unwrap_or_default();
        let outcome = match &real {
            Ok(_) => "ok".to_string(),
            Err(e) => std::io::Error::from_raw_os_error(*e).kind().to_string() + &format!(" ({e})"),
        };
        *COVERAGE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(format!("{name}: {outcome}"))
            .or_default() += 1;
    }
    if real == model {
        Ok(())
    } else {
        Err(format!(
            "{op:?}: the namespace returned {real:?}, the model {model:?}"
        ))
    }
}

impl Harness {
    fn new() -> Harness {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let (ns, clock) = rt.block_on(ns_common::open(MemKv::new()));
        // A root everyone may create in, so that the users' own trees grow.
        let open_root = SetAttr {
            mode: Some(0o777),
            ..SetAttr::default()
        };
        rt.block_on(ns.setattr(&User::root(), InodeId(ROOT), open_root))
            .expect("chmod /");
        let mut model = Model::new();
        model
            .setattr(&User::root(), ROOT, &open_root)
            .expect("chmod / in the model");
        Harness {
            rt,
            ns,
            clock,
            model,
            known: vec![ROOT],
            users: ns_common::users(),
        }
    }

    fn see(&mut self, ino: u64) {
        if !self.known.contains(&ino) {
            self.known.push(ino);
        }
    }

    fn pick_dir(&self, pick: Pick) -> u64 {
        let dirs: Vec<u64> = self
            .model
            .inodes
            .iter()
            .filter(|(_, i)| i.is_dir())
            .map(|(ino, _)| *ino)
            .collect();
        if pick.any || dirs.is_empty() {
            self.known[pick.index % self.known.len()]
        } else {
            dirs[pick.index % dirs.len()]
        }
    }

    fn pick_inode(&self, pick: Pick) -> u64 {
        let live: Vec<u64> = self.model.inodes.keys().copied().collect();
        if pick.any {
            self.known[pick.index % self.known.len()]
        } else {
            live[pick.index % live.len()]
        }
    }

    fn pick_entry(&self, pick: EntryPick) -> (u64, Vec<u8>) {
        if pick.existing && !self.model.entries.is_empty() {
            let entries: Vec<&(u64, Vec<u8>)> = self.model.entries.keys().collect();
            entries[pick.index % entries.len()].clone()
        } else {
            (self.pick_dir(pick.dir), name(pick.name))
        }
    }

    fn path(parts: &[usize], trailing_slash: bool) -> Vec<u8> {
        let mut path = Vec::new();
        for &part in parts {
            path.push(b'/');
            path.extend_from_slice(PATH_NAMES[part]);
        }
        if trailing_slash {
            path.push(b'/');
        }
        path
    }

    fn step(&mut self, op: &Op) -> Result<(), String> {
        let users = self.users.clone();
        let ns = self.ns.clone();
        match op.clone() {
            Op::Create {
                user,
                dir,
                name: n,
                mode,
                exclusive,
                truncate,
                read,
                write,
            } => {
                let (dir, name) = (self.pick_dir(dir), name(n));
                let flags = CreateFlags {
                    exclusive,
                    truncate,
                    read,
                    write_session: write.then_some(77),
                    session: None,
                };
                let real = self.rt.block_on(ns.create(
                    &users[user],
                    InodeId(dir),
                    &name,
                    MODES[mode],
                    flags,
                ));
                errno(&real).ok();
                let (new_ino, session) = match &real {
                    Ok(c) => (c.inode.ino.0, c.session.map_or(0, |s| s.0)),
                    Err(_) => (0, 0),
                };
                if let Ok(c) = &real {
                    assert_eq!(c.session.is_some(), write);
                    assert_eq!(c.truncate.is_some(), truncate && !c.created);
                }
                let model = self.model.create(
                    &users[user],
                    dir,
                    &name,
                    MODES[mode],
                    flags,
                    new_ino,
                    session,
                );
                let real = errno(&real).map(|()| (new_ino, real.as_ref().is_ok_and(|c| c.created)));
                if let Ok((ino, _)) = real {
                    self.see(ino);
                }
                compare(op, real, model)
            }
            Op::Mkdir {
                user,
                dir,
                name: n,
                mode,
            } => {
                let (dir, name) = (self.pick_dir(dir), name(n));
                let real =
                    self.rt
                        .block_on(ns.mkdir(&users[user], InodeId(dir), &name, MODES[mode]));
                let ino = real.as_ref().map_or(0, |i| i.ino.0);
                let model = self.model.mkdir(&users[user], dir, &name, MODES[mode], ino);
                let real = errno(&real).map(|()| ino);
                if let Ok(ino) = real {
                    self.see(ino);
                }
                compare(op, real, model)
            }
            Op::MkdirAll { user, path, mode } => {
                let path = Harness::path(&path, false);
                let real = self
                    .rt
                    .block_on(ns.mkdir_all(&users[user], &path, MODES[mode]));
                let rt = &self.rt;
                let mut created = Vec::new();
                let mut new_id = |parent: u64, name: &[u8]| {
                    let id = rt
                        .block_on(ns.lookup(&User::root(), InodeId(parent), name))
                        .map_or(0, |i| i.ino.0);
                    created.push(id);
                    id
                };
                // One transaction: on failure nothing it created remains.
                let before = self.model.clone();
                let model =
                    self.model
                        .walk(&users[user], &path, true, Some((MODES[mode], &mut new_id)));
                let model = match model {
                    Ok(ino) if !self.model.inodes[&ino].is_dir() => Err(libc::EEXIST),
                    other => other,
                };
                if model.is_err() {
                    self.model = before;
                }
                for id in created {
                    self.see(id);
                }
                let real = errno(&real).map(|()| real.as_ref().map_or(0, |i| i.ino.0));
                compare(op, real, model)
            }
            Op::Symlink {
                user,
                dir,
                name: n,
                target,
            } => {
                let (dir, name) = (self.pick_dir(dir), name(n));
                let real = self.rt.block_on(ns.symlink(
                    &users[user],
                    InodeId(dir),
                    &name,
                    TARGETS[target],
                ));
                let ino = real.as_ref().map_or(0, |i| i.ino.0);
                let model = self
                    .model
                    .symlink(&users[user], dir, &name, TARGETS[target], ino);
                let real = errno(&real).map(|()| ino);
                if let Ok(ino) = real {
                    self.see(ino);
                }
                compare(op, real, model)
            }
            Op::Link {
                user,
                ino,
                dir,
                name: n,
            } => {
                let (ino, dir, name) = (self.pick_inode(ino), self.pick_dir(dir), name(n));
                let real =
                    self.rt
                        .block_on(ns.link(&users[user], InodeId(ino), InodeId(dir), &name));
                let real = errno(&real).map(|()| real.as_ref().map_or(0, |i| i.ino.0));
                compare(op, real, self.model.link(&users[user], ino, dir, &name))
            }
            Op::Unlink { user, entry } => {
                let (dir, name) = self.pick_entry(entry);
                let real = self
                    .rt
                    .block_on(ns.unlink(&users[user], InodeId(dir), &name));
                compare(
                    op,
                    errno(&real),
                    self.model.unlink(&users[user], dir, &name),
                )
            }
            Op::Rmdir { user, entry } => {
                let (dir, name) = self.pick_entry(entry);
                let real = self
                    .rt
                    .block_on(ns.rmdir(&users[user], InodeId(dir), &name));
                compare(op, errno(&real), self.model.rmdir(&users[user], dir, &name))
            }
            Op::Rename { user, old, new } => {
                let (old_dir, old_name) = self.pick_entry(old);
                let (new_dir, new_name) = self.pick_entry(new);
                let real = self.rt.block_on(ns.rename(
                    &users[user],
                    InodeId(old_dir),
                    &old_name,
                    InodeId(new_dir),
                    &new_name,
                ));
                let model = self
                    .model
                    .rename(&users[user], old_dir, &old_name, new_dir, &new_name);
                compare(op, errno(&real), model)
            }
            Op::RemoveAll { user, entry } => {
                let (dir, name) = self.pick_entry(entry);
                let real = self
                    .rt
                    .block_on(ns.remove_all(&users[user], InodeId(dir), &name));
                compare(
                    op,
                    errno(&real),
                    self.model.remove_all(&users[user], dir, &name),
                )
            }
            Op::Open {
                user,
                ino,
                read,
                truncate,
                write,
            } => {
                let ino = self.pick_inode(ino);
                let flags = OpenFlags {
                    read,
                    truncate,
                    write_session: write.then_some(78),
                    session: None,
                };
                let real = self
                    .rt
                    .block_on(ns.open_file(&users[user], InodeId(ino), flags));
                let session = real.as_ref().ok().and_then(|o| o.session).map(|s| s.0);
                let model = self.model.open(
                    &users[user],
                    ino,
                    read,
                    truncate,
                    write.then_some(session.unwrap_or(0)),
                );
                compare(op, errno(&real).map(|()| session.is_some()), model)
            }
            Op::Close { session, length } => {
                let sessions: Vec<(u64, u64)> = self.model.sessions.iter().copied().collect();
                let (ino, session) = match sessions.get(session % (sessions.len() + 1)) {
                    Some(&s) => s,
                    // A session that does not exist.
                    None => (
                        self.pick_inode(Pick {
                            any: false,
                            index: session,
                        }),
                        12345,
                    ),
                };
                let real = self
                    .rt
                    .block_on(ns.close(InodeId(ino), SessionId(session), length));
                let real = errno(&real).map(|()| real.as_ref().is_ok_and(|c| c.session_found));
                compare(op, real, Ok(self.model.close(ino, session, length)))
            }
            Op::SetLength { ino, length, exact } => {
                let ino = self.pick_inode(ino);
                let real = self
                    .rt
                    .block_on(ns.set_length(InodeId(ino), SIZES[length], exact));
                compare(
                    op,
                    errno(&real),
                    self.model.set_length(ino, SIZES[length], exact),
                )
            }
            Op::Setattr { user, ino, attr } => {
                let ino = self.pick_inode(ino);
                let time = |now: bool| if now { SetTime::Now } else { SetTime::At(5) };
                let set = SetAttr {
                    mode: attr.mode.map(|m| MODES[m]),
                    uid: attr.uid.map(|u| UIDS[u]),
                    gid: attr.gid.map(|g| GIDS[g]),
                    size: attr.size.map(|s| SIZES[s]),
                    atime: attr.atime.map(time),
                    mtime: attr.mtime.map(time),
                };
                let real = self
                    .rt
                    .block_on(ns.setattr(&users[user], InodeId(ino), set));
                if let Ok(result) = &real {
                    assert_eq!(result.truncate.is_some(), set.size.is_some());
                }
                compare(
                    op,
                    errno(&real),
                    self.model.setattr(&users[user], ino, &set),
                )
            }
            Op::SetXattr {
                user,
                ino,
                name,
                value,
                mode,
            } => {
                let ino = self.pick_inode(ino);
                let name = XATTR_NAMES.get(name).map_or_else(long_name, |n| n.to_vec());
                let value = XATTR_VALUES
                    .get(value)
                    .map_or_else(|| vec![7; 65537], |v| v.to_vec());
                let real = self.rt.block_on(ns.set_xattr(
                    &users[user],
                    InodeId(ino),
                    &name,
                    &value,
                    XATTR_MODES[mode],
                ));
                let model =
                    self.model
                        .set_xattr(&users[user], ino, &name, &value, XATTR_MODES[mode]);
                compare(op, errno(&real), model)
            }
            Op::GetXattr { user, ino, name } => {
                let ino = self.pick_inode(ino);
                let name = XATTR_NAMES.get(name).map_or_else(long_name, |n| n.to_vec());
                let real = self
                    .rt
                    .block_on(ns.get_xattr(&users[user], InodeId(ino), &name));
                let real = errno(&real).map(|()| real.unwrap_or_default());
                compare(op, real, self.model.get_xattr(&users[user], ino, &name))
            }
            Op::RemoveXattr { user, ino, name } => {
                let ino = self.pick_inode(ino);
                let name = XATTR_NAMES.get(name).map_or_else(long_name, |n| n.to_vec());
                let real = self
                    .rt
                    .block_on(ns.remove_xattr(&users[user], InodeId(ino), &name));
                compare(
                    op,
                    errno(&real),
                    self.model.remove_xattr(&users[user], ino, &name),
                )
            }
            Op::ListXattr { ino } => {
                let ino = self.pick_inode(ino);
                let real = self.rt.block_on(ns.list_xattr(InodeId(ino)));
                let real = errno(&real).map(|()| real.unwrap_or_default());
                compare(op, real, self.model.list_xattr(ino))
            }
            Op::Readdir {
                user,
                dir,
                after,
                limit,
            } => {
                let dir = self.pick_dir(dir);
                let after = after.map(name);
                let real = self.rt.block_on(ns.readdir(
                    &users[user],
                    InodeId(dir),
                    after.as_deref(),
                    limit,
                ));
                let model = self
                    .model
                    .readdir(&users[user], dir, after.as_deref(), limit);
                if let (Ok(page), Ok((_, more))) = (&real, &model) {
                    // `more` may be conservative, but never false when more
                    // entries remain.
                    if *more && !page.more {
                        return Err(format!("{op:?}: more entries remain but more is false"));
                    }
                    for entry in &page.entries {
                        let kind = self.model.inodes.get(&entry.ino.0).map(MInode::kind);
                        if kind != Some(entry.kind) {
                            return Err(format!("{op:?}: {entry:?} but the model has {kind:?}"));
                        }
                    }
                }
                let real = errno(&real).map(|()| {
                    real.map(|page| {
                        page.entries
                            .into_iter()
                            .map(|e| (e.name, e.ino.0))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
                });
                compare(op, real, model.map(|(entries, _)| entries))
            }
            Op::Lookup { user, dir, name: n } => {
                let (dir, name) = (self.pick_dir(dir), name(n));
                let real = self
                    .rt
                    .block_on(ns.lookup(&users[user], InodeId(dir), &name));
                let real = errno(&real).map(|()| real.map_or(0, |i| i.ino.0));
                compare(op, real, self.model.lookup(&users[user], dir, &name))
            }
            Op::Resolve {
                user,
                path,
                trailing_slash,
                follow,
            } => {
                let path = Harness::path(&path, trailing_slash);
                let real = self.rt.block_on(ns.resolve(&users[user], &path, follow));
                let real = errno(&real).map(|()| real.map_or(0, |i| i.ino.0));
                compare(op, real, self.model.walk(&users[user], &path, follow, None))
            }
            Op::Gc => {
                self.clock.advance_ms(GC_DELAY_MS as i64 + 1);
                let now_ms = (self.clock_ns() / 1_000_000) as u64;
                self.rt
                    .block_on(ns_common::run_gc(&self.ns, now_ms))
                    .map_err(|e| format!("GC failed: {e}"))?;
                self.model.gc();
                Ok(())
            }
        }
    }

    fn clock_ns(&self) -> i64 {
        use flyfs_time::Clock;
        self.clock.now_ns()
    }

    /// Every inode ever seen has the same attributes in both (or is gone
    /// from both).
    fn compare_inodes(&self, after: &Op) -> Result<(), String> {
        for &ino in &self.known {
            let real = match self.rt.block_on(self.ns.stat(InodeId(ino))) {
                Ok(inode) => Some(MInode::from_real(&inode)),
                Err(e) if e.errno() == libc::ENOENT => None,
                Err(e) => return Err(format!("stat {ino:#x}: {e}")),
            };
            let model = self
                .model
                .inodes
                .get(&ino)
                .cloned()
                .map(|m| self.model.with_dir_nlink(ino, m));
            if real != model {
                return Err(format!(
                    "after {after:?}: inode {ino:#x} is {real:?} but the model has {model:?}"
                ));
            }
        }
        Ok(())
    }

    /// Listings, attributes and sessions of everything, and `check()`.
    fn compare_everything(&self) -> Result<(), String> {
        let root = User::root();
        for (&ino, inode) in &self.model.inodes {
            if inode.is_dir() {
                let page = self
                    .rt
                    .block_on(self.ns.readdirplus(&root, InodeId(ino), None, 1000))
                    .map_err(|e| format!("readdirplus {ino:#x}: {e}"))?;
                let real: Vec<(Vec<u8>, u64)> = page
                    .entries
                    .iter()
                    .map(|(e, _)| (e.name.clone(), e.ino.0))
                    .collect();
                if real != self.model.children(ino) || page.more {
                    return Err(format!(
                        "directory {ino:#x} lists {real:?}, the model {:?}",
                        self.model.children(ino)
                    ));
                }
            }
            let xattrs = self
                .rt
                .block_on(self.ns.list_xattr(InodeId(ino)))
                .map_err(|e| e.to_string())?;
            if Ok(xattrs.clone()) != self.model.list_xattr(ino) {
                return Err(format!("attributes of {ino:#x}: {xattrs:?}"));
            }
            let sessions: BTreeSet<(u64, u64)> = self
                .rt
                .block_on(self.ns.sessions(InodeId(ino)))
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|(s, _)| (ino, s.0))
                .collect();
            let model: BTreeSet<(u64, u64)> = self
                .model
                .sessions
                .iter()
                .filter(|(i, _)| *i == ino)
                .copied()
                .collect();
            if sessions != model {
                return Err(format!(
                    "sessions of {ino:#x}: {sessions:?}, the model {model:?}"
                ));
            }
        }
        self.check()
    }

    fn check(&self) -> Result<(), String> {
        let report = self
            .rt
            .block_on(self.ns.check())
            .map_err(|e| e.to_string())?;
        if report.is_clean() {
            Ok(())
        } else {
            Err(format!("check: {report}"))
        }
    }
}

fn run(ops: &[Op]) -> Result<(), String> {
    if std::env::var("NS_MODEL_DEBUG").is_ok() {
        eprintln!("case of {} ops", ops.len());
    }
    let mut harness = Harness::new();
    for (i, op) in ops.iter().enumerate() {
        harness.step(op).map_err(|e| format!("step {i}: {e}"))?;
        harness
            .compare_inodes(op)
            .map_err(|e| format!("step {i}: {e}"))?;
        if i % 10 == 9 {
            harness.check().map_err(|e| format!("step {i}: {e}"))?;
        }
    }
    harness.compare_everything()?;
    // Collecting everything afterwards must also leave a consistent store
    // that still agrees with the model.
    harness.step(&Op::Gc)?;
    harness.compare_inodes(&Op::Gc)?;
    harness.compare_everything()
}

proptest! {
    // PROPTEST_CASES overrides the count, for longer hunts.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(192),
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    #[test]
    fn namespace_agrees_with_the_model(ops in prop::collection::vec(op(), 1..60)) {
        if let Err(e) = run(&ops) {
            prop_assert!(false, "{}", e);
        }
        if std::env::var("NS_MODEL_DEBUG").is_ok() {
            for (outcome, count) in COVERAGE.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                eprintln!("{count:6} {outcome}");
            }
        }
    }
}

/// A hand-written sequence through the trickiest paths, so they are covered
/// whatever the random cases draw.
#[test]
fn scripted_sequence_agrees_with_the_model() {
    let p = |index| Pick { any: false, index };
    // An entry named by directory pick `dir` and name index `name`.
    let e = |dir, name| EntryPick {
        existing: false,
        index: 0,
        dir: p(dir),
        name,
    };
    let ops = vec![
        Op::Mkdir {
            user: 1,
            dir: p(0),
            name: 0,
            mode: 1,
        },
        Op::Mkdir {
            user: 0,
            dir: p(0),
            name: 1,
            mode: 3,
        },
        Op::Mkdir {
            user: 1,
            dir: p(1),
            name: 1,
            mode: 0,
        },
        Op::Create {
            user: 2,
            dir: p(1),
            name: 2,
            mode: 5,
            exclusive: true,
            truncate: false,
            read: true,
            write: true,
        },
        Op::Link {
            user: 2,
            ino: p(4),
            dir: p(2),
            name: 3,
        },
        Op::Rename {
            user: 1,
            old: e(0, 0),
            new: e(3, 0),
        },
        Op::Rename {
            user: 2,
            old: e(1, 2),
            new: e(2, 3),
        },
        Op::Unlink {
            user: 2,
            entry: e(2, 3),
        },
        Op::Gc,
        Op::Close {
            session: 0,
            length: Some(3),
        },
        Op::Gc,
        Op::Symlink {
            user: 1,
            dir: p(0),
            name: 4,
            target: 4,
        },
        Op::Resolve {
            user: 1,
            path: vec![4],
            trailing_slash: false,
            follow: true,
        },
        Op::RemoveAll {
            user: 1,
            entry: e(0, 0),
        },
        Op::Gc,
    ];
    run(&ops).expect("agrees");
}

// ---------------------------------------------------------------------------
// Bad input: errno, never a panic.

fn errno_of<T: Debug>(result: Result<T, NsError>) -> i32 {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => e.errno(),
    }
}

#[test]
fn bad_names_are_refused_with_errno() {
    let h = Harness::new();
    let (ns, root, dir) = (&h.ns, User::root(), InodeId(ROOT));
    let long = long_name();
    let at_limit = vec![b'm'; 255];
    h.rt.block_on(async {
        for (name, expected) in [
            (&b"a/b"[..], libc::EINVAL),
            (b"a\0b", libc::EINVAL),
            (b"", libc::EINVAL),
            (&long, libc::ENAMETOOLONG),
        ] {
            let flags = CreateFlags::default();
            assert_eq!(
                errno_of(ns.create(&root, dir, name, 0o644, flags).await),
                expected
            );
            assert_eq!(errno_of(ns.mkdir(&root, dir, name, 0o755).await), expected);
            assert_eq!(errno_of(ns.symlink(&root, dir, name, b"t").await), expected);
            assert_eq!(errno_of(ns.unlink(&root, dir, name).await), expected);
            assert_eq!(errno_of(ns.rmdir(&root, dir, name).await), expected);
            assert_eq!(errno_of(ns.lookup(&root, dir, name).await), expected);
            assert_eq!(
                errno_of(ns.rename(&root, dir, name, dir, b"x").await),
                expected
            );
            assert_eq!(
                errno_of(ns.rename(&root, dir, b"x", dir, name).await),
                expected
            );
            assert_eq!(errno_of(ns.remove_all(&root, dir, name).await), expected);
            assert_eq!(errno_of(ns.link(&root, dir, dir, name).await), expected);
        }
        // 255 bytes is fine.
        ns.mkdir(&root, dir, &at_limit, 0o755)
            .await
            .expect("NAME_MAX");
        // The documented choices for "." and "..".
        let flags = CreateFlags::default();
        assert_eq!(
            errno_of(ns.create(&root, dir, b".", 0o644, flags).await),
            libc::EISDIR
        );
        assert_eq!(
            errno_of(ns.mkdir(&root, dir, b"..", 0o755).await),
            libc::EEXIST
        );
        assert_eq!(
            errno_of(ns.symlink(&root, dir, b".", b"t").await),
            libc::EEXIST
        );
        assert_eq!(
            errno_of(ns.link(&root, dir, dir, b"..").await),
            libc::EEXIST
        );
        assert_eq!(errno_of(ns.unlink(&root, dir, b".").await), libc::EISDIR);
        assert_eq!(errno_of(ns.rmdir(&root, dir, b".").await), libc::EINVAL);
        assert_eq!(errno_of(ns.rmdir(&root, dir, b"..").await), libc::ENOTEMPTY);
        assert_eq!(
            errno_of(ns.rename(&root, dir, b"..", dir, b"x").await),
            libc::EINVAL
        );
        assert_eq!(
            errno_of(ns.rename(&root, dir, b"x", dir, b".").await),
            libc::EINVAL
        );
        assert_eq!(
            errno_of(ns.remove_all(&root, dir, b"..").await),
            libc::EINVAL
        );
        assert_eq!(ns.lookup(&root, dir, b".").await.expect(".").ino, dir);
        assert_eq!(ns.lookup(&root, dir, b"..").await.expect("..").ino, dir);
        // Symlink targets and attribute names and values.
        assert_eq!(
            errno_of(ns.symlink(&root, dir, b"s", b"").await),
            libc::ENOENT
        );
        assert_eq!(
            errno_of(ns.symlink(&root, dir, b"s", &[b'x'; 4096]).await),
            libc::ENAMETOOLONG
        );
        assert_eq!(
            errno_of(ns.symlink(&root, dir, b"s", b"a\0").await),
            libc::EINVAL
        );
        assert_eq!(errno_of(ns.get_xattr(&root, dir, b"").await), libc::ERANGE);
        assert_eq!(
            errno_of(ns.get_xattr(&root, dir, &long).await),
            libc::ERANGE
        );
        let big = vec![0; 65537];
        assert_eq!(
            errno_of(
                ns.set_xattr(&root, dir, b"user.x", &big, XattrMode::Upsert)
                    .await
            ),
            libc::E2BIG
        );
        ns.set_xattr(&root, dir, b"user.x", &big[..65536], XattrMode::Upsert)
            .await
            .expect("XATTR_SIZE_MAX fits");
        // Ids that do not exist.
        assert_eq!(errno_of(ns.stat(InodeId(0)).await), libc::ENOENT);
        assert_eq!(errno_of(ns.stat(InodeId(u64::MAX)).await), libc::ENOENT);
        assert_eq!(errno_of(ns.readlink(dir).await), libc::EINVAL);
        assert_eq!(
            errno_of(ns.mkdir(&root, InodeId(77), b"a", 0o755).await),
            libc::ENOENT
        );
    });
    h.check().expect("consistent");
}

#[test]
fn bad_paths_and_symlink_loops_are_refused_with_errno() {
    let h = Harness::new();
    let (ns, root, dir) = (&h.ns, User::root(), InodeId(ROOT));
    h.rt.block_on(async {
        // Too long, empty, NUL, a component too long.
        let long_path = b"/a".repeat(2049);
        assert_eq!(
            errno_of(ns.resolve(&root, &long_path, true).await),
            libc::ENAMETOOLONG
        );
        assert_eq!(
            errno_of(ns.mkdir_all(&root, &long_path, 0o755).await),
            libc::ENAMETOOLONG
        );
        assert_eq!(errno_of(ns.resolve(&root, b"", true).await), libc::ENOENT);
        assert_eq!(
            errno_of(ns.resolve(&root, b"/a\0", true).await),
            libc::EINVAL
        );
        let mut component = b"/".to_vec();
        component.extend(long_name());
        assert_eq!(
            errno_of(ns.resolve(&root, &component, true).await),
            libc::ENAMETOOLONG
        );
        // A path that is deep but within the limit works: mkdir -p of 1000
        // levels, then resolve it.
        let deep = b"/d".repeat(1000);
        let made = ns
            .mkdir_all(&root, &deep, 0o755)
            .await
            .expect("deep mkdir -p");
        assert_eq!(
            ns.resolve(&root, &deep, true).await.expect("deep").ino,
            made.ino
        );
        // "..", "." and slashes.
        assert_eq!(
            ns.resolve(&root, b"/../..//./d/..", true)
                .await
                .expect("..")
                .ino,
            dir
        );
        // Symlink loops: a -> b -> a, and s -> s/x.
        ns.symlink(&root, dir, b"la", b"lb").await.expect("la");
        ns.symlink(&root, dir, b"lb", b"/la").await.expect("lb");
        ns.symlink(&root, dir, b"s", b"s/x").await.expect("s");
        assert_eq!(errno_of(ns.resolve(&root, b"/la", true).await), libc::ELOOP);
        assert_eq!(errno_of(ns.resolve(&root, b"/s", true).await), libc::ELOOP);
        assert_eq!(
            errno_of(ns.resolve(&root, b"/la/x", false).await),
            libc::ELOOP
        );
        assert_eq!(
            errno_of(ns.mkdir_all(&root, b"/la/x", 0o755).await),
            libc::ELOOP
        );
        // Not following the last link returns the link itself.
        let link = ns.resolve(&root, b"/la", false).await.expect("lstat");
        assert!(matches!(link.data, InodeData::Symlink(_)));
        // A chain of 40 links resolves, 41 do not.
        ns.mkdir(&root, dir, b"t", 0o755).await.expect("t");
        let mut previous = b"/t".to_vec();
        for i in 0..41 {
            let name = format!("c{i}");
            ns.symlink(&root, dir, name.as_bytes(), &previous)
                .await
                .expect("chain");
            previous = format!("/{name}").into_bytes();
        }
        ns.resolve(&root, b"/c39", true).await.expect("40 links");
        assert_eq!(
            errno_of(ns.resolve(&root, b"/c40", true).await),
            libc::ELOOP
        );
        // A file in the middle of a path, and "file/".
        ns.create(&root, dir, b"f", 0o644, CreateFlags::default())
            .await
            .expect("f");
        assert_eq!(
            errno_of(ns.resolve(&root, b"/f/x", true).await),
            libc::ENOTDIR
        );
        assert_eq!(
            errno_of(ns.resolve(&root, b"/f/", true).await),
            libc::ENOTDIR
        );
        assert_eq!(
            errno_of(ns.mkdir_all(&root, b"/f", 0o755).await),
            libc::EEXIST
        );
        assert_eq!(
            errno_of(ns.mkdir_all(&root, b"/f/g", 0o755).await),
            libc::ENOTDIR
        );
    });
    h.check().expect("consistent");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes as names, paths, targets and attribute names: an
    /// errno or success, never a panic, never an internal error.
    #[test]
    fn arbitrary_bytes_never_panic(
        name in prop::collection::vec(any::<u8>(), 0..300),
        path in prop::collection::vec(prop_oneof![Just(b'/'), Just(b'.'), Just(b'a'), any::<u8>()], 0..5000),
    ) {
        let h = Harness::new();
        let (ns, root, dir) = (&h.ns, User::root(), InodeId(ROOT));
        h.rt.block_on(async {
            let flags = CreateFlags::default();
            let _ = errno(&ns.create(&root, dir, &name, 0o644, flags).await);
            let _ = errno(&ns.mkdir(&root, dir, &name, 0o755).await);
            let _ = errno(&ns.symlink(&root, dir, &name, &path).await);
            let _ = errno(&ns.lookup(&root, dir, &name).await);
            let _ = errno(&ns.rename(&root, dir, &name, dir, &path).await);
            let _ = errno(&ns.resolve(&root, &path, true).await);
            let _ = errno(&ns.mkdir_all(&root, &path, 0o755).await);
            let _ = errno(&ns.set_xattr(&root, dir, &name, &path, XattrMode::Create).await);
            let _ = errno(&ns.get_xattr(&root, dir, &name).await);
            let _ = errno(&ns.readdir(&root, dir, Some(&name), 10).await);
            let _ = errno(&ns.unlink(&root, dir, &name).await);
            let _ = errno(&ns.remove_all(&root, dir, &name).await);
        });
        prop_assert!(h.check().is_ok());
    }
}
