//! `check`: an fsck of the whole namespace, over one consistent snapshot of
//! the store.
//!
//! It proves the invariants docs/metadata-schema.md lists, which every
//! operation must keep and which the concurrency and model tests lean on:
//! the directory tree has no cycles and every inode is reachable from the
//! root or from the GC queue; every entry names a live inode of the kind it
//! says; nlink counts a file's entries; a linked directory has exactly one
//! entry and its parent id matches it; queue entries and the inodes' due
//! times agree; sessions and attributes belong to existing inodes; every id
//! came out of a batch the allocator recorded; and the KV cache's index
//! agrees with its slots (docs/kv-cache.md): every entry names a slot that
//! holds its block at its generation, no slot is named by two entries,
//! every used slot's key names it back, and no slot on the free list is
//! in use.
//!
//! It reads everything into memory in one read-only transaction, so it is
//! for tests, tools and small namespaces; a production scrubber would walk
//! the key space in ranges.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use flyfs_proto::ids::InodeId;

use super::Namespace;
use crate::ns::NsError;
use crate::ns::alloc::batch_of;
use crate::ns::txn::MetaTx;
use crate::schema::{
    Dentry, GcKind, Inode, InodeKind, Key, KvEntryValue, KvSlotState, KvSlotValue, ROOT,
    decode_alloc, decode_dentry, decode_dir_times, decode_format, decode_gc, decode_inode,
    decode_kv_cache, decode_kv_entry, decode_kv_fresh, decode_kv_mark, decode_kv_slot,
    decode_lease, decode_session, decode_xattr, describe_key, inode_key, kv_entry_key, kv_slot_key,
    parse_key,
};
use flyfs_kv::{Kv, RangeOptions, Transaction, key_after, prefix_end};

/// Keys read per range request.
const PAGE: usize = 10_000;

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The key involved, decoded.
    pub key: String,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.what)
    }
}

/// What `check` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub files: usize,
    pub directories: usize,
    pub symlinks: usize,
    /// FIFOs, sockets and devices.
    pub specials: usize,
    pub entries: usize,
    pub sessions: usize,
    pub xattrs: usize,
    pub queued: usize,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, key: impl Into<String>, what: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            what: what.into(),
        });
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} files, {} directories, {} symlinks, {} entries, {} sessions, {} attributes, {} queued; ",
            self.files,
            self.directories,
            self.symlinks,
            self.entries,
            self.sessions,
            self.xattrs,
            self.queued
        )?;
        if self.problems.is_empty() {
            return write!(f, "clean");
        }
        writeln!(f, "{} problems:", self.problems.len())?;
        for problem in &self.problems {
            writeln!(f, "  {problem}")?;
        }
        Ok(())
    }
}

/// Everything in the store, decoded.
#[derive(Default)]
struct Snapshot {
    inodes: BTreeMap<InodeId, Inode>,
    entries: Vec<(InodeId, Vec<u8>, Dentry)>,
    sessions: Vec<InodeId>,
    xattrs: Vec<InodeId>,
    dir_times: Vec<InodeId>,
    queue: BTreeMap<InodeId, Vec<(u64, GcKind)>>,
    alloc: BTreeMap<u8, u64>,
    formatted: bool,
    /// The KV cache's index entries, slots (by class and slot) and the
    /// slots its free list names.
    kv_entries: BTreeMap<Vec<u8>, KvEntryValue>,
    kv_slots: BTreeMap<(u8, u32), KvSlotValue>,
    kv_free: BTreeSet<(u8, u32)>,
}

async fn read_all<T: Transaction>(
    tx: &MetaTx<T>,
    report: &mut CheckReport,
) -> Result<Snapshot, NsError> {
    let mut snapshot = Snapshot::default();
    let mut begin = Bytes::new();
    let end = prefix_end(&[0xff]);
    loop {
        let range = RangeOptions::new(begin.clone(), end.clone())
            .limit(PAGE)
            .snapshot(true);
        let result = tx.tx.get_range(&range).await?;
        for kv in &result.kvs {
            let (key, value) = (&kv.key[..], &kv.value[..]);
            let decoded = match parse_key(key) {
                Err(e) => Err(e),
                Ok(Key::Inode(ino)) => decode_inode(ino, value).map(|inode| {
                    snapshot.inodes.insert(ino, inode);
                }),
                Ok(Key::Dentry { parent, name }) => decode_dentry(key, value).map(|dentry| {
                    snapshot.entries.push((parent, name, dentry));
                }),
                Ok(Key::Session { ino, .. }) => decode_session(key, value).map(|_| {
                    snapshot.sessions.push(ino);
                }),
                Ok(Key::Xattr { ino, .. }) => decode_xattr(key, value).map(|_| {
                    snapshot.xattrs.push(ino);
                }),
                Ok(Key::Gc { due_ms, ino }) => decode_gc(key, value).map(|kind| {
                    snapshot.queue.entry(ino).or_default().push((due_ms, kind));
                }),
                Ok(Key::DirTimes(ino)) => decode_dir_times(key, value).map(|_| {
                    snapshot.dir_times.push(ino);
                }),
                Ok(Key::Alloc { shard }) => decode_alloc(key, value).map(|next| {
                    snapshot.alloc.insert(shard, next);
                }),
                // A lease stands on its own: it may outlive its client's
                // sessions (the reaper deletes it once expired) and a
                // session may be opened before its client's first lease.
                Ok(Key::Lease { .. }) => decode_lease(key, value).map(drop),
                Ok(Key::Format) => decode_format(key, value).map(|_| {
                    snapshot.formatted = true;
                }),
                // The KV cache's index (docs/kv-cache.md) is a keyspace of
                // its own, beside the namespace: its values must decode,
                // and its entries and slots must agree (`check_kv`). Its
                // access and reservation marks may be stale by design
                // (eviction and reclaim skip those).
                Ok(Key::KvCache) => decode_kv_cache(key, value).map(drop),
                Ok(Key::KvFresh { .. }) => decode_kv_fresh(key, value).map(drop),
                Ok(Key::KvEntry { key: index }) => decode_kv_entry(key, value).map(|entry| {
                    snapshot.kv_entries.insert(index, entry);
                }),
                Ok(Key::KvSlot { class, slot }) => decode_kv_slot(key, value).map(|state| {
                    snapshot.kv_slots.insert((class, slot), state);
                }),
                Ok(Key::KvFree { class, slot, .. }) => decode_kv_mark(key, value).map(|()| {
                    snapshot.kv_free.insert((class, slot));
                }),
                Ok(Key::KvAccess { .. } | Key::KvReserved { .. }) => decode_kv_mark(key, value),
            };
            if let Err(e) = decoded {
                report.problem(e.key, e.reason);
            }
        }
        match result.kvs.last() {
            Some(last) if result.more => begin = key_after(&last.key),
            _ => return Ok(snapshot),
        }
    }
}

impl<K: Kv> Namespace<K> {
    /// Checks every invariant of the namespace; see the module docs. Errors
    /// only when the store cannot be read; what is wrong with its contents
    /// is in [`CheckReport::problems`].
    pub async fn check(&self) -> Result<CheckReport, NsError> {
        self.read(|tx| async move {
            let mut report = CheckReport::default();
            let snapshot = read_all(&tx, &mut report).await?;
            check_snapshot(&snapshot, &mut report);
            Ok(report)
        })
        .await
    }
}

fn ino_key(ino: InodeId) -> String {
    describe_key(&inode_key(ino))
}

/// The KV cache's index against its slots: a block is served from the slot
/// its entry names only while that slot holds it (`Used`, by this key, at
/// the entry's generation), so any other state is a key pointing at a free,
/// reserved or reused slot; two entries on one slot would serve one block
/// as two keys'; a used slot its key does not name back is leaked; a used
/// slot on the free list would be handed to a writer while it is read.
fn check_kv(s: &Snapshot, report: &mut CheckReport) {
    let mut named: BTreeMap<(u8, u32), Vec<&[u8]>> = BTreeMap::new();
    for (key, entry) in &s.kv_entries {
        let at = (entry.class, entry.slot);
        named.entry(at).or_default().push(key);
        let slot = format!("slot {} of class {}", entry.slot, entry.class);
        let wrong = match s.kv_slots.get(&at) {
            None => Some(format!("names {slot}, which has no record")),
            Some(state) => match state.state {
                KvSlotState::Free => Some(format!("names {slot}, which is free")),
                KvSlotState::Reserved => {
                    Some(format!("names {slot}, which is reserved by a writer"))
                }
                KvSlotState::Used if state.key != *key => Some(format!(
                    "names {slot}, which holds the block of key {}",
                    describe_key(&kv_entry_key(&state.key))
                )),
                KvSlotState::Used if state.generation != entry.generation => Some(format!(
                    "names {slot} at generation {}, the slot is at {}",
                    entry.generation, state.generation
                )),
                KvSlotState::Used => None,
            },
        };
        if let Some(what) = wrong {
            report.problem(describe_key(&kv_entry_key(key)), what);
        }
    }
    for (&(class, slot), keys) in &named {
        if keys.len() > 1 {
            let keys: Vec<String> = keys
                .iter()
                .map(|k| describe_key(&kv_entry_key(k)))
                .collect();
            report.problem(
                describe_key(&kv_slot_key(class, slot)),
                format!("named by {} entries: {}", keys.len(), keys.join(", ")),
            );
        }
    }
    for (&(class, slot), state) in &s.kv_slots {
        let key = describe_key(&kv_slot_key(class, slot));
        if state.state == KvSlotState::Used {
            let back = s
                .kv_entries
                .get(&state.key)
                .is_some_and(|e| (e.class, e.slot) == (class, slot));
            if !back {
                report.problem(
                    &key,
                    format!(
                        "used by key {}, whose entry does not name it",
                        describe_key(&kv_entry_key(&state.key))
                    ),
                );
            }
        }
        if state.state != KvSlotState::Free && s.kv_free.contains(&(class, slot)) {
            report.problem(&key, format!("on the free list but {:?}", state.state));
        }
    }
}

fn check_snapshot(s: &Snapshot, report: &mut CheckReport) {
    check_kv(s, report);
    if !s.formatted {
        report.problem("META format", "missing");
    }
    match s.inodes.get(&ROOT) {
        Some(root) if root.dir().is_some_and(|d| d.parent == ROOT) && root.gc_due_ms.is_none() => {}
        Some(_) => report.problem(
            ino_key(ROOT),
            "the root is not a linked directory of its own",
        ),
        None => report.problem(ino_key(ROOT), "the root directory is missing"),
    }

    // Entries: each names a live inode of the kind it says, in a directory.
    let mut names: BTreeMap<InodeId, usize> = BTreeMap::new();
    let mut children: BTreeMap<InodeId, Vec<InodeId>> = BTreeMap::new();
    let mut subdirs: BTreeMap<InodeId, usize> = BTreeMap::new();
    report.entries = s.entries.len();
    for (parent, name, dentry) in &s.entries {
        let key = describe_key(&crate::schema::dentry_key(*parent, name));
        if !s.inodes.get(parent).is_some_and(Inode::is_dir) {
            report.problem(&key, "in a directory that does not exist");
        }
        let Some(child) = s.inodes.get(&dentry.ino) else {
            report.problem(
                &key,
                format!("names {:?}, which does not exist", dentry.ino),
            );
            continue;
        };
        if child.kind() != dentry.kind {
            report.problem(
                &key,
                format!("says {:?}, the inode is {:?}", dentry.kind, child.kind()),
            );
        }
        if child.gc_due_ms.is_some() {
            report.problem(
                &key,
                format!("names {:?}, which is queued for GC", dentry.ino),
            );
        }
        if let Some(d) = child.dir()
            && d.parent != *parent
        {
            report.problem(
                &key,
                format!(
                    "names directory {:?} whose parent id is {:?}",
                    dentry.ino, d.parent
                ),
            );
        }
        *names.entry(dentry.ino).or_default() += 1;
        children.entry(*parent).or_default().push(dentry.ino);
        if dentry.kind == InodeKind::Directory {
            *subdirs.entry(*parent).or_default() += 1;
        }
    }

    // Link counts and queue state, inode by inode.
    for (ino, inode) in &s.inodes {
        let key = ino_key(*ino);
        let named = names.get(ino).copied().unwrap_or(0);
        match inode.kind() {
            InodeKind::File => report.files += 1,
            InodeKind::Directory => report.directories += 1,
            InodeKind::Symlink => report.symlinks += 1,
            _ => report.specials += 1,
        }
        let expected_nlink = match inode.kind() {
            InodeKind::Directory if *ino == ROOT => {
                if named != 0 {
                    report.problem(&key, format!("the root is named by {named} entries"));
                }
                2 + subdirs.get(ino).copied().unwrap_or(0)
            }
            InodeKind::Directory => {
                let queued = inode.gc_due_ms.is_some();
                let expected = if queued { 0 } else { 1 };
                if named != expected {
                    report.problem(
                        &key,
                        format!("directory named by {named} entries, expected {expected}"),
                    );
                }
                // Linked: its entry, its `.` and each subdirectory's `..`.
                if queued {
                    0
                } else {
                    2 + subdirs.get(ino).copied().unwrap_or(0)
                }
            }
            _ => named,
        };
        if inode.nlink as usize != expected_nlink {
            report.problem(
                &key,
                format!("nlink {} but {expected_nlink} expected", inode.nlink),
            );
        }
        if inode.kind() == InodeKind::Symlink && inode.gc_due_ms.is_some() {
            report.problem(&key, "a symlink in the GC queue");
        }
        if inode.kind() != InodeKind::Directory && inode.nlink == 0 && inode.gc_due_ms.is_none() {
            report.problem(&key, "no links and not queued for GC");
        }
        if inode.kind() == InodeKind::Directory
            && inode.gc_due_ms.is_some() != inode.dir().is_some_and(|d| d.parent.0 == 0)
        {
            report.problem(
                &key,
                "a directory is detached (parent 0) exactly when queued",
            );
        }
        let queued = s.queue.get(ino).map(Vec::as_slice).unwrap_or_default();
        let kind = if inode.is_dir() {
            GcKind::Directory
        } else {
            GcKind::File
        };
        match (inode.gc_due_ms, queued) {
            (None, []) => {}
            (Some(due), [(queue_due, queue_kind)]) if due == *queue_due && kind == *queue_kind => {
                report.queued += 1;
            }
            (due, queue) => report.problem(
                &key,
                format!("inode says due {due:?}, the queue has {queue:?}"),
            ),
        }
        if *ino != ROOT {
            match batch_of(*ino) {
                None => report.problem(&key, "a reserved id"),
                Some((shard, batch)) if s.alloc.get(&shard).is_none_or(|next| batch >= *next) => {
                    report.problem(
                        &key,
                        format!("id from batch {batch} of shard {shard}, never handed out"),
                    );
                }
                Some(_) => {}
            }
        }
    }
    for (ino, queue) in &s.queue {
        if !s.inodes.contains_key(ino) {
            report.problem(
                ino_key(*ino),
                format!("queued for GC ({queue:?}) but does not exist"),
            );
        }
    }
    for ino in &s.sessions {
        report.sessions += 1;
        if s.inodes.get(ino).and_then(Inode::file).is_none() {
            report.problem(ino_key(*ino), "a write session of something not a file");
        }
    }
    for ino in &s.dir_times {
        if !s.inodes.get(ino).is_some_and(Inode::is_dir) {
            report.problem(
                ino_key(*ino),
                "directory times of an inode that is not a directory",
            );
        }
    }
    for ino in &s.xattrs {
        report.xattrs += 1;
        if !s.inodes.contains_key(ino) {
            report.problem(
                ino_key(*ino),
                "an attribute of an inode that does not exist",
            );
        }
    }

    // Reachability: from the root and from every queued inode.
    let mut reached: BTreeSet<InodeId> = BTreeSet::new();
    let mut frontier: VecDeque<InodeId> = VecDeque::new();
    frontier.push_back(ROOT);
    frontier.extend(
        s.inodes
            .values()
            .filter(|i| i.gc_due_ms.is_some())
            .map(|i| i.ino),
    );
    while let Some(ino) = frontier.pop_front() {
        if !reached.insert(ino) {
            continue;
        }
        if let Some(kids) = children.get(&ino) {
            frontier.extend(kids.iter().copied());
        }
    }
    for ino in s.inodes.keys() {
        if !reached.contains(ino) {
            report.problem(
                ino_key(*ino),
                "an orphan: not reachable from the root or the GC queue",
            );
        }
    }

    // Cycles: every linked directory's parent chain ends at the root or at
    // a detached subtree root.
    for (ino, inode) in &s.inodes {
        if inode.dir().is_none() {
            continue;
        }
        let mut seen = BTreeSet::new();
        let mut at = *ino;
        loop {
            if at == ROOT || at.0 == 0 {
                break;
            }
            if !seen.insert(at) {
                report.problem(ino_key(*ino), format!("its parent chain loops at {at:?}"));
                break;
            }
            match s.inodes.get(&at).and_then(Inode::dir) {
                Some(d) => at = d.parent,
                None => {
                    report.problem(
                        ino_key(*ino),
                        format!("its parent chain reaches {at:?}, not a directory"),
                    );
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ns::CreateFlags;
    use crate::ns::tests::namespace;
    use crate::schema::{
        DirData, InodeData, dentry_key, encode_dentry, encode_inode, gc_key, session_key,
    };
    use flyfs_kv::RetryOptions;
    use flyfs_proto::wire::meta::User;

    /// Applies raw writes behind the namespace's back.
    async fn tamper<K: Kv>(ns: &Namespace<K>, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) {
        flyfs_kv::run(ns.kv(), &RetryOptions::default(), |tx| {
            let writes = writes.clone();
            async move {
                for (key, value) in writes {
                    match value {
                        Some(value) => tx.set(&key, &value)?,
                        None => tx.clear(&key)?,
                    }
                }
                Ok::<(), NsError>(())
            }
        })
        .await
        .expect("tamper");
    }

    async fn problems<K: Kv>(ns: &Namespace<K>) -> Vec<String> {
        let report = ns.check().await.expect("check runs");
        report.problems.iter().map(ToString::to_string).collect()
    }

    fn has(problems: &[String], needle: &str) -> bool {
        problems.iter().any(|p| p.contains(needle))
    }

    #[tokio::test]
    async fn check_finds_each_kind_of_damage() {
        let ns = namespace().await;
        let root = User::root();
        let file = ns
            .create(&root, ROOT, b"f", 0o644, CreateFlags::default())
            .await
            .expect("create")
            .inode;
        let a = ns.mkdir(&root, ROOT, b"a", 0o755).await.expect("mkdir");
        let b = ns.mkdir(&root, ROOT, b"b", 0o755).await.expect("mkdir");
        assert!(problems(&ns).await.is_empty());

        // A wrong link count.
        let mut wrong = file.clone();
        wrong.nlink = 2;
        tamper(
            &ns,
            vec![(
                inode_key(file.ino),
                Some(encode_inode(&wrong).expect("encode")),
            )],
        )
        .await;
        assert!(has(&problems(&ns).await, "nlink 2 but 1 expected"));
        tamper(
            &ns,
            vec![(
                inode_key(file.ino),
                Some(encode_inode(&file).expect("encode")),
            )],
        )
        .await;

        // An entry naming nothing, a session and a queue entry of nothing.
        let ghost = InodeId(999_999);
        let dentry = Dentry {
            ino: ghost,
            kind: InodeKind::File,
        };
        tamper(
            &ns,
            vec![
                (
                    dentry_key(ROOT, b"ghost"),
                    Some(encode_dentry(&dentry).expect("encode")),
                ),
                (
                    session_key(ghost, crate::schema::SessionId(1)),
                    Some(crate::schema::encode_session(&Default::default()).expect("encode")),
                ),
                (
                    gc_key(5, ghost),
                    Some(crate::schema::encode_gc(GcKind::File).expect("encode")),
                ),
            ],
        )
        .await;
        let found = problems(&ns).await;
        assert!(has(&found, "which does not exist"), "{found:?}");
        assert!(
            has(&found, "a write session of something not a file"),
            "{found:?}"
        );
        assert!(has(&found, "queued for GC"), "{found:?}");
        tamper(
            &ns,
            vec![
                (dentry_key(ROOT, b"ghost"), None),
                (session_key(ghost, crate::schema::SessionId(1)), None),
                (gc_key(5, ghost), None),
            ],
        )
        .await;
        assert!(problems(&ns).await.is_empty());

        // A cycle: a under b and b under a, cut off from the root.
        let under = |dir: &Inode, parent: InodeId| {
            let mut moved = dir.clone();
            moved.data = InodeData::Directory(DirData {
                parent,
                default_layout: None,
            });
            encode_inode(&moved).expect("encode")
        };
        let entry = |ino| {
            encode_dentry(&Dentry {
                ino,
                kind: InodeKind::Directory,
            })
            .expect("encode")
        };
        tamper(
            &ns,
            vec![
                (dentry_key(ROOT, b"a"), None),
                (dentry_key(ROOT, b"b"), None),
                (dentry_key(b.ino, b"a"), Some(entry(a.ino))),
                (dentry_key(a.ino, b"b"), Some(entry(b.ino))),
                (inode_key(a.ino), Some(under(&a, b.ino))),
                (inode_key(b.ino), Some(under(&b, a.ino))),
            ],
        )
        .await;
        let found = problems(&ns).await;
        assert!(has(&found, "an orphan"), "{found:?}");
        assert!(has(&found, "parent chain loops"), "{found:?}");

        // Bytes that do not decode: reported with their key, not a panic.
        tamper(&ns, vec![(inode_key(file.ino), Some(vec![1, 0xc1]))]).await;
        let found = problems(&ns).await;
        assert!(has(&found, &format!("INOD {:?}", file.ino)), "{found:?}");
        // An id no allocator batch covers.
        let stray = InodeId(1 << 40);
        let mut copy = file.clone();
        copy.ino = stray;
        copy.nlink = 0;
        tamper(
            &ns,
            vec![(inode_key(stray), Some(encode_inode(&copy).expect("encode")))],
        )
        .await;
        let found = problems(&ns).await;
        assert!(has(&found, "never handed out"), "{found:?}");
    }
}
