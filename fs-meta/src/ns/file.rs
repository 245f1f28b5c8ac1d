//! File operations: create, open and close with write sessions, length
//! updates, setattr (chmod, chown, truncate, times), hard links and unlink.
//!
//! Write sessions (`INOS` keys) are how the namespace knows a file is being
//! written: a file with one is never garbage-collected, even once unlinked,
//! because a client may still be writing chunks. A session id is chosen
//! before the transaction runs, so a retried attempt (including one whose
//! first commit had an unknown outcome) writes the same key rather than
//! leaking a second session that would pin the file forever.
//!
//! A file's length is a hint while sessions write it ([`Namespace::set_length`]
//! only grows it), fixed exactly on close or by an explicit truncate.

use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::User;

use super::{
    NameKind, Namespace, check_can_add, check_can_remove, check_name, searchable_dir, show,
};
use crate::ns::NsError;
use crate::ns::dir::new_inode;
use crate::ns::layout::StoredLayout;
use crate::ns::perm;
use crate::ns::txn::MetaTx;
use crate::schema::{
    Dentry, FileData, GcKind, Inode, InodeData, InodeKind, Key, SessionId, SessionValue,
    decode_session, parse_key, session_key, session_prefix,
};
use flyfs_kv::{Kv, RangeOptions, Transaction};

/// How `create` opens the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreateFlags {
    /// `O_EXCL`: EEXIST if the name exists.
    pub exclusive: bool,
    /// `O_TRUNC`: an existing file is cut to length 0.
    pub truncate: bool,
    /// Opened for reading: an existing file needs read permission.
    pub read: bool,
    /// Opened for writing by this client (a `ClientId`): a write session is
    /// created, and an existing file needs write permission.
    pub write_session: Option<u64>,
    /// The write session's id, chosen by the caller so that a request
    /// retried after a lost reply names the same session: the retry then
    /// finds its own session instead of leaving a second one behind (or
    /// EEXIST, for an exclusive create that had in fact succeeded). A fresh
    /// id when `None`.
    pub session: Option<SessionId>,
}

/// How `open` opens an existing inode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenFlags {
    pub read: bool,
    /// `O_TRUNC` (needs write permission).
    pub truncate: bool,
    /// Opened for writing by this client: a write session is created.
    pub write_session: Option<u64>,
    /// As [`CreateFlags::session`].
    pub session: Option<SessionId>,
}

/// What the caller must have storage do after a truncate: drop every byte
/// of `ino` at or after `length`, on the chains of `layout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    pub ino: InodeId,
    pub length: u64,
    /// The file's truncate version after the truncate.
    pub truncate_version: u64,
    pub layout: StoredLayout,
}

/// What `create` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    pub inode: Inode,
    /// False when an existing file was opened.
    pub created: bool,
    pub session: Option<SessionId>,
    /// Set when `O_TRUNC` cut an existing file.
    pub truncate: Option<Truncate>,
    /// The parent directory as this transaction left it (times raised by
    /// the new entry): what a stat of it right after the create returns.
    pub parent: Inode,
    /// See [`Opened::inline_max`].
    pub inline_max: u32,
}

/// What `open` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub inode: Inode,
    pub session: Option<SessionId>,
    pub truncate: Option<Truncate>,
    /// Non-zero when the new write session may have the file's data held
    /// inline, up to this many bytes ([`Namespace::store_inline`]): it is
    /// the file's only session and the file is empty or inline.
    pub inline_max: u32,
}

/// What `close` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    /// The inode afterwards; `None` if it no longer exists.
    pub inode: Option<Inode>,
    /// False when the session was already gone (a retried or repeated
    /// close), in which case nothing changed.
    pub session_found: bool,
}

/// What a writer knows of its file's length when it syncs or closes: every
/// byte it wrote lies before `length`, and `truncate_version` is the truncate
/// version it last learned (from its open, or a truncate it made itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterLength {
    pub length: u64,
    pub truncate_version: u64,
}

/// What [`Namespace::fix_writer_length`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriterLengthFixed {
    /// The caller's session was the file's only one, so no chunk past the
    /// recorded length can be anyone else's: the length is fixed (and the
    /// session ended, when closing) without asking storage.
    Fixed(Inode),
    /// Storage must say where the data ends, asking only the chains that
    /// hold chunk indices in `chunks` (every chain when `None`), and the
    /// session is still open.
    AskStorage { chunks: Option<(u64, u64)> },
    /// The caller's session is gone (ended by a repeated close, or reaped
    /// as expired): nothing changed; storage must be asked on every chain,
    /// since the caller may have written after the reaper fixed the length.
    SessionGone,
}

/// A sync that carries a file's whole content to hold inline
/// ([`Namespace::store_inline`]).
#[derive(Clone, Copy, Debug)]
pub struct StoreInline<'a> {
    /// Whose deferred `changes` they are.
    pub user: &'a User,
    pub ino: InodeId,
    pub session: SessionId,
    /// The truncate version the writer knows.
    pub truncate_version: u64,
    pub bytes: &'a [u8],
    pub changes: &'a [SetAttr],
    pub relaxed: bool,
}

/// A time to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// The operation's time: allowed to anyone who may write the file.
    Now,
    /// An explicit time (ns since the epoch): owner or root only.
    At(i64),
}

/// The attributes `setattr` changes; `None` leaves one alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// A new length (truncate or extend); files only.
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// What `setattr` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetAttrResult {
    pub inode: Inode,
    /// Set when the size changed: storage must drop data past the new
    /// length (even when it grew, data a writer had not yet reported may
    /// lie past it).
    pub truncate: Option<Truncate>,
}

/// A fresh session id, never 0.
fn new_session_id() -> SessionId {
    SessionId(rand::random::<u64>() | 1)
}

/// EFBIG unless `length` fits `layout`.
fn check_length(inode: &Inode, layout: &StoredLayout, length: u64) -> Result<(), NsError> {
    if length > layout.length_max() {
        return Err(NsError::FileTooBig(format!(
            "{:?}: length {length} over {}",
            inode.ino,
            layout.length_max()
        )));
    }
    Ok(())
}

/// The file part of an inode already known to be a file.
fn file_mut(inode: &mut Inode) -> Result<&mut FileData, NsError> {
    let ino = inode.ino;
    match &mut inode.data {
        InodeData::File(f) => Ok(f),
        _ => Err(NsError::Invalid(format!("{ino:?} is not a regular file"))),
    }
}

impl<K: Kv> Namespace<K> {
    /// `open(O_CREAT)`: creates file `name` in `parent` with `mode` (the
    /// caller has applied its umask), or opens the existing file: EEXIST with
    /// `exclusive`, EISDIR on a directory, ELOOP on a symlink. `O_TRUNC` on
    /// an existing file sets its length to 0 and bumps its truncate version.
    /// A new file takes its parent's default layout, on chains chosen here.
    pub async fn create(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        mode: u32,
        flags: CreateFlags,
    ) -> Result<Created, NsError> {
        if check_name(name)? != NameKind::Normal {
            return Err(NsError::IsDir(format!("create of {}", show(name))));
        }
        let session = flags
            .write_session
            .map(|client| (client, flags.session.unwrap_or_else(new_session_id)));
        self.write(|tx| async move {
            let dir = searchable_dir(&tx, user, parent).await?;
            if let Some(dentry) = tx.dentry(parent, name).await? {
                let inode = tx.target(parent, name, dentry).await?;
                if flags.exclusive {
                    // Our own earlier attempt, whose reply was lost: it
                    // created the file with this very session.
                    if let Some((_, id)) = session
                        && tx.has_session(inode.ino, id).await?
                    {
                        let inline_max = self.inline_max_for(&tx, &inode, id).await?;
                        return Ok(Created {
                            inode,
                            created: true,
                            session: Some(id),
                            truncate: None,
                            parent: dir,
                            inline_max,
                        });
                    }
                    return Err(NsError::Exists(show(name)));
                }
                match inode.kind() {
                    InodeKind::Directory => return Err(NsError::IsDir(show(name))),
                    InodeKind::Symlink => return Err(NsError::Loop(show(name))),
                    kind if kind.is_special() => {
                        return Err(NsError::NoDevice(format!(
                            "{} is a special file: its opener's kernel provides it",
                            show(name)
                        )));
                    }
                    _ => {}
                }
                let opened = self
                    .open_linked(&tx, user, inode, flags.read, flags.truncate, session)
                    .await?;
                return Ok(Created {
                    inode: opened.inode,
                    created: false,
                    session: opened.session,
                    truncate: opened.truncate,
                    parent: dir,
                    inline_max: opened.inline_max,
                });
            }
            check_can_add(&dir, user)?;
            // A new file only: opening an existing one may truncate it,
            // which storage follows at once.
            self.relax(&tx);
            let spec = dir
                .dir()
                .and_then(|d| d.default_layout)
                .unwrap_or(self.inner.config.root_layout);
            let layout = self
                .inner
                .placement
                .choose(spec, self.inner.config.chain_tables.as_ref())?;
            let ino = self.allocate().await?;
            let data = InodeData::File(FileData {
                length: 0,
                truncate_version: 0,
                layout,
                inline: None,
            });
            let inode = new_inode(ino, user, &dir, mode, data, tx.now_ns);
            tx.put_inode(&inode)?;
            tx.put_dentry(
                parent,
                name,
                Dentry {
                    ino,
                    kind: InodeKind::File,
                },
            )?;
            if let Some((client, id)) = session {
                tx.put_session(
                    ino,
                    id,
                    &SessionValue {
                        client,
                        opened_ns: tx.now_ns,
                    },
                )?;
            }
            // `put_dentry` recorded the entry change at `now_ns`, which a
            // read of the directory lays over its inode's times.
            let mut parent = dir;
            parent.mtime_ns = parent.mtime_ns.max(tx.now_ns);
            parent.ctime_ns = parent.ctime_ns.max(tx.now_ns);
            Ok(Created {
                inode,
                created: true,
                session: session.map(|(_, id)| id),
                truncate: None,
                parent,
                inline_max: if session.is_some() {
                    self.inner.config.inline_bytes_max
                } else {
                    0
                },
            })
        })
        .await
    }

    /// `open` of inode `ino` (named so because [`Namespace::open`] opens the
    /// namespace): read permission for `read`, write permission for
    /// a write session or `truncate`. Directories open for reading only
    /// (EISDIR), symlinks not at all (ELOOP); an unlinked file is ENOENT.
    pub async fn open_file(
        &self,
        user: &User,
        ino: InodeId,
        flags: OpenFlags,
    ) -> Result<Opened, NsError> {
        let session = flags
            .write_session
            .map(|client| (client, flags.session.unwrap_or_else(new_session_id)));
        self.write(|tx| async move {
            let inode = tx.existing(ino).await?;
            match inode.kind() {
                InodeKind::Directory => {
                    if flags.truncate || flags.write_session.is_some() {
                        return Err(NsError::IsDir(format!("{ino:?} opened for writing")));
                    }
                    if flags.read {
                        perm::check(&inode, user, perm::MAY_READ, "open")?;
                    }
                    Ok(Opened {
                        inode,
                        session: None,
                        truncate: None,
                        inline_max: 0,
                    })
                }
                InodeKind::Symlink => Err(NsError::Loop(format!("{ino:?} is a symlink"))),
                InodeKind::File if inode.nlink == 0 => {
                    Err(NsError::NotFound(format!("{ino:?} has been unlinked")))
                }
                InodeKind::File => {
                    self.open_linked(&tx, user, inode, flags.read, flags.truncate, session)
                        .await
                }
                _ => Err(NsError::NoDevice(format!(
                    "{ino:?} is a special file: its opener's kernel provides it"
                ))),
            }
        })
        .await
    }

    /// Ends write session `session` of `ino`. `length`, when the session
    /// wrote, is the exact length the caller found on storage: it is
    /// recorded and the modification time set. Closing a session that is
    /// already gone changes nothing (so a retried close is harmless).
    ///
    /// Without a length (the session wrote nothing, or a sync already fixed
    /// the length of all it wrote) the close only ends the session, and its
    /// commit does not wait to be durable ([`Transaction::relax_durability`]):
    /// `close(2)` promises no durability, and losing the end in a power cut
    /// leaves a session as a client that died before closing leaves one.
    /// It pins the file against GC and makes other writers' closes ask
    /// storage for the length, until its client's lease runs out and the
    /// reaper ends it, and the startup pass fixes its file's length from
    /// storage in case the sync before it was lost too. This spares a
    /// create-and-close the second of its two fsyncs.
    pub async fn close(
        &self,
        ino: InodeId,
        session: SessionId,
        length: Option<u64>,
    ) -> Result<Closed, NsError> {
        self.close_with(ino, session, length, None).await
    }

    /// A close without a length (as [`close`](Self::close)) by a writer
    /// that knows its length was fixed by a sync: `known` is what that sync
    /// said. The sync may have been relaxed and lost with a crash of this
    /// service that the writer outlived; then the recorded length is below
    /// `known` at the truncate version the writer knows (lengths only grow
    /// between truncates, and a sync fixed at least `known`), and the close
    /// restores it, durably, as the sync would have (modification time
    /// included). Otherwise it only ends the session.
    pub async fn close_known(
        &self,
        ino: InodeId,
        session: SessionId,
        known: WriterLength,
    ) -> Result<Closed, NsError> {
        self.close_with(ino, session, None, Some(known)).await
    }

    async fn close_with(
        &self,
        ino: InodeId,
        session: SessionId,
        length: Option<u64>,
        floor: Option<WriterLength>,
    ) -> Result<Closed, NsError> {
        self.write(|tx| async move {
            if !tx.has_session(ino, session).await? {
                return Ok(Closed {
                    inode: tx.inode(ino).await?,
                    session_found: false,
                });
            }
            tx.tx.clear(&session_key(ino, session))?;
            let mut inode = tx.inode(ino).await?.ok_or_else(|| NsError::Corrupt {
                key: format!("INOS {ino:?} {session:?}"),
                reason: "a session of an inode that does not exist".into(),
            })?;
            let lost_sync = floor.and_then(|known| {
                let file = inode.file()?;
                // Inline data is its own length: a sync that stored it and
                // was lost took the bytes with it, which no length restores.
                (!file.is_inline()
                    && file.truncate_version == known.truncate_version
                    && file.length < known.length)
                    .then_some(known.length)
            });
            if let Some(length) = length.or(lost_sync) {
                let now = tx.now_ns;
                let layout = file_mut(&mut inode)?.layout.clone();
                check_length(&inode, &layout, length)?;
                file_mut(&mut inode)?.length = length;
                inode.mtime_ns = now;
                inode.ctime_ns = now;
                tx.put_inode(&inode)?;
            } else {
                tx.tx.relax_durability();
            }
            Ok(Closed {
                inode: Some(inode),
                session_found: true,
            })
        })
        .await
    }

    /// Fixes the length of `ino` on a sync or close of write session
    /// `session` from what the writer knows (`known`), when that is safe,
    /// ending the session too when `end_session`. Everything is decided in
    /// this one transaction, on serializable reads of the file's sessions
    /// and inode, so a session opened or a truncate committed concurrently
    /// makes one of the two retry (and this one then sees it):
    ///
    /// * The caller's session is the only one: every other writer's chunks
    ///   are covered by the recorded length (a closed session's close fixed
    ///   it, an expired session's reaper fixed it from storage before
    ///   clearing the session, a truncate set it), and the caller's own lie
    ///   before `known.length`. If the truncate version is still the one the
    ///   writer knows, no truncate cut what it counted, so the length is the
    ///   larger of the two. If a truncate by someone else intervened, the
    ///   recorded length alone is right when the writer wrote nothing past
    ///   it; otherwise storage is asked, but only for the chunks between the
    ///   recorded length and the writer's (nobody else can have written
    ///   past the recorded length).
    /// * Another session exists: its writer may have written any chunk, so
    ///   storage is asked on every chain.
    ///
    /// A fixed length sets the modification time (the writer wrote). With
    /// `relaxed` (the flush of `close(2)`, which needs the length visible,
    /// not durable) a length fixed here does not wait for the journal's
    /// fsync: a crash of this service may lose it while the writer lives
    /// on, which the writer's close ([`close_known`](Self::close_known))
    /// and the reaper's startup pass repair (docs/metadata-schema.md,
    /// "Durability").
    pub async fn fix_writer_length(
        &self,
        ino: InodeId,
        session: SessionId,
        known: WriterLength,
        end_session: bool,
        relaxed: bool,
    ) -> Result<WriterLengthFixed, NsError> {
        self.write(|tx| async move {
            let decided = fix_writer_length_in(&tx, ino, session, known, end_session).await?;
            if relaxed && matches!(decided, WriterLengthFixed::Fixed(_)) {
                self.relax(&tx);
            }
            Ok(decided)
        })
        .await
    }

    /// A writer's sync followed by its deferred setattrs
    /// ([`setattrs`](Self::setattrs)), in one transaction when the length
    /// is fixed without storage (the sole writer's common case): one commit
    /// instead of two. Any other decision changes nothing here and is
    /// answered as is, with no result: the caller asks storage, then makes
    /// the changes on their own. A change that fails undoes the sync too
    /// (the writer syncs again with its next request). `relaxed`: as for
    /// [`fix_writer_length`](Self::fix_writer_length).
    pub async fn fix_writer_length_and_setattrs(
        &self,
        ino: InodeId,
        session: SessionId,
        known: WriterLength,
        user: &User,
        changes: &[SetAttr],
        relaxed: bool,
    ) -> Result<(WriterLengthFixed, Option<SetAttrResult>), NsError> {
        self.write(|tx| async move {
            let decided = fix_writer_length_in(&tx, ino, session, known, false).await?;
            if !matches!(decided, WriterLengthFixed::Fixed(_)) {
                return Ok((decided, None));
            }
            let done = set_attrs_in(&tx, user, ino, changes, self.inline_max()).await?;
            if relaxed {
                self.relax(&tx);
            }
            Ok((decided, Some(done)))
        })
        .await
    }

    /// Records a file length reported by a writer: a hint (`exact` false)
    /// only grows the length, as writes may be reported out of order; an
    /// exact length (from storage) replaces it. Not a truncate: the truncate
    /// version stays. EISDIR / EINVAL for a directory / symlink, EFBIG past
    /// what the layout can address.
    pub async fn set_length(
        &self,
        ino: InodeId,
        length: u64,
        exact: bool,
    ) -> Result<Inode, NsError> {
        self.write(|tx| async move {
            let mut inode = tx.existing(ino).await?;
            if inode.is_dir() {
                return Err(NsError::IsDir(format!("{ino:?}")));
            }
            let now = tx.now_ns;
            let file = file_mut(&mut inode)?;
            if file.is_inline() {
                // The length of inline data is exact; storage holds none.
                return Ok(inode);
            }
            let layout = file.layout.clone();
            let changed = if exact {
                file.length != length
            } else {
                length > file.length
            };
            if changed {
                check_length(&inode, &layout, length)?;
                file_mut(&mut inode)?.length = length;
                inode.mtime_ns = now;
                inode.ctime_ns = now;
                tx.put_inode(&inode)?;
            }
            Ok(inode)
        })
        .await
    }

    /// [`NsConfig::inline_bytes_max`](crate::ns::NsConfig::inline_bytes_max).
    pub fn inline_max(&self) -> u32 {
        self.inner.config.inline_bytes_max
    }

    /// A sync of write session `session` that carries the file's whole
    /// content, `bytes`, for the namespace to hold inline ([`StoreInline`]);
    /// with it, the
    /// writer's deferred `changes` (possibly none), all in one transaction.
    /// Taken only when the session is still the file's only one, the file
    /// is inline or empty, its truncate version is `truncate_version` (the
    /// writer's; a truncate since by anyone else must not be undone by
    /// content from before it), and `bytes` is at most
    /// [`inline_max`](Self::inline_max). Then the content replaces the
    /// file's, its length is theirs, the modification time is now, and the
    /// commit is relaxed as a flush's length is (`relaxed`). Otherwise
    /// nothing changes and the answer is `None`: the writer's data must go
    /// to storage, once the service has moved any held there.
    pub async fn store_inline(&self, store: &StoreInline<'_>) -> Result<Option<Inode>, NsError> {
        let StoreInline {
            user,
            ino,
            session,
            truncate_version,
            bytes,
            changes,
            relaxed,
        } = *store;
        if bytes.len() > self.inline_max() as usize {
            return Ok(None);
        }
        self.write(|tx| async move {
            let own = session_key(ino, session);
            let sessions = tx
                .tx
                .get_range(&RangeOptions::prefix(&session_prefix(ino)).limit(2))
                .await?;
            if sessions.kvs.len() != 1 || sessions.kvs[0].key != own {
                return Ok(None);
            }
            let mut inode = tx.existing(ino).await?;
            let file = file_mut(&mut inode)?;
            if file.truncate_version != truncate_version || !(file.is_inline() || file.length == 0)
            {
                return Ok(None);
            }
            file.length = bytes.len() as u64;
            file.inline = (!bytes.is_empty()).then(|| bytes.to_vec());
            inode.mtime_ns = tx.now_ns;
            inode.ctime_ns = tx.now_ns;
            tx.put_inode(&inode)?;
            if !changes.is_empty() {
                inode = set_attrs_in(&tx, user, ino, changes, self.inline_max())
                    .await?
                    .inode;
            }
            if relaxed {
                self.relax(&tx);
            }
            Ok(Some(inode))
        })
        .await
    }

    /// The second half of moving inline data to storage: the caller has
    /// written `bytes`, the content it read at `truncate_version`, to the
    /// file's first chunk (and cut the chunk there). Ends the file being
    /// inline if it still holds exactly that content at that version,
    /// durably (storage now holds the only copy). Answers whether it did;
    /// when not, the caller reads the file again and starts over (or stops:
    /// a file no longer inline needs nothing).
    pub async fn finish_uninline(
        &self,
        ino: InodeId,
        truncate_version: u64,
        bytes: &[u8],
    ) -> Result<bool, NsError> {
        self.write(|tx| async move {
            let mut inode = tx.existing(ino).await?;
            let file = file_mut(&mut inode)?;
            if file.truncate_version != truncate_version || file.inline.as_deref() != Some(bytes) {
                return Ok(false);
            }
            file.inline = None;
            inode.ctime_ns = tx.now_ns;
            tx.put_inode(&inode)?;
            Ok(true)
        })
        .await
    }

    /// Changes attributes, each under its own rule, checked in this order
    /// before anything changes: mode (owner or root, EPERM; EOPNOTSUPP on a
    /// symlink), uid/gid (see [`perm::check_chown`], EPERM), size (files
    /// only: EISDIR / EINVAL; write permission, EACCES; EFBIG), times (an
    /// explicit time needs owner or root, EPERM; "now" needs that or write
    /// permission, EACCES). A chown of a non-directory drops setuid/setgid;
    /// an explicit mode given with it wins. A size change bumps the truncate
    /// version and returns what storage must truncate.
    pub async fn setattr(
        &self,
        user: &User,
        ino: InodeId,
        attr: SetAttr,
    ) -> Result<SetAttrResult, NsError> {
        self.write(|tx| async move { set_attr_in(&tx, user, ino, &attr, self.inline_max()).await })
            .await
    }

    /// Makes `changes` in order in one transaction, each as
    /// [`setattr`](Self::setattr) would (a failing one undoes those before
    /// it). A writer's deferred setattrs: one commit instead of one each.
    /// Answers the last's result; none is a `NsError::Invalid`.
    pub async fn setattrs(
        &self,
        user: &User,
        ino: InodeId,
        changes: &[SetAttr],
    ) -> Result<SetAttrResult, NsError> {
        self.write(
            |tx| async move { set_attrs_in(&tx, user, ino, changes, self.inline_max()).await },
        )
        .await
    }

    /// Hard link: a new entry `new_name` in `new_parent` for inode `ino`.
    /// EPERM for a directory; ENOENT for an unlinked file.
    pub async fn link(
        &self,
        user: &User,
        ino: InodeId,
        new_parent: InodeId,
        new_name: &[u8],
    ) -> Result<Inode, NsError> {
        if check_name(new_name)? != NameKind::Normal {
            return Err(NsError::Exists(show(new_name)));
        }
        self.change(|tx| async move {
            let mut inode = tx.existing(ino).await?;
            let dir = searchable_dir(&tx, user, new_parent).await?;
            if tx.dentry(new_parent, new_name).await?.is_some() {
                return Err(NsError::Exists(show(new_name)));
            }
            check_can_add(&dir, user)?;
            if inode.is_dir() {
                return Err(NsError::NotPermitted(format!(
                    "hard link to directory {ino:?}"
                )));
            }
            if inode.nlink == 0 {
                return Err(NsError::NotFound(format!("{ino:?} has been unlinked")));
            }
            inode.nlink = inode
                .nlink
                .checked_add(1)
                .ok_or_else(|| NsError::TooManyLinks(format!("{ino:?}")))?;
            inode.ctime_ns = tx.now_ns;
            tx.put_inode(&inode)?;
            tx.put_dentry(
                new_parent,
                new_name,
                Dentry {
                    ino,
                    kind: inode.kind(),
                },
            )?;
            Ok(inode)
        })
        .await
    }

    /// Removes entry `name` (not a directory: EISDIR) from `parent`. When
    /// the last link of a file goes, the file leaves the namespace and is
    /// queued for GC, due after the configured delay (its data stays
    /// readable through open sessions until then, and longer while write
    /// sessions remain). A symlink's last link deletes it at once. Returns
    /// the inode as it is afterwards.
    pub async fn unlink(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
    ) -> Result<Inode, NsError> {
        if check_name(name)? != NameKind::Normal {
            return Err(NsError::IsDir(format!("unlink of {}", show(name))));
        }
        self.change(|tx| async move {
            let dir = searchable_dir(&tx, user, parent).await?;
            let dentry = tx
                .dentry(parent, name)
                .await?
                .ok_or_else(|| NsError::NotFound(show(name)))?;
            let victim = tx.target(parent, name, dentry).await?;
            check_can_remove(&dir, &victim, user)?;
            if victim.is_dir() {
                return Err(NsError::IsDir(show(name)));
            }
            self.unlink_entry(&tx, parent, name, victim)
        })
        .await
    }

    /// Removes the entry of a file or symlink and drops one link (the
    /// checks are the caller's).
    pub(crate) fn unlink_entry(
        &self,
        tx: &MetaTx<K::Tx>,
        parent: InodeId,
        name: &[u8],
        victim: Inode,
    ) -> Result<Inode, NsError> {
        tx.clear_dentry(parent, name)?;
        self.drop_link(tx, victim)
    }

    /// Drops one link of a file or symlink whose entry is already gone:
    /// at zero a file is queued for GC and a symlink deleted.
    pub(crate) fn drop_link(&self, tx: &MetaTx<K::Tx>, mut inode: Inode) -> Result<Inode, NsError> {
        debug_assert!(!inode.is_dir());
        inode.nlink = inode.nlink.checked_sub(1).ok_or_else(|| NsError::Corrupt {
            key: format!("INOD {:?}", inode.ino),
            reason: "an entry names an inode with no links".into(),
        })?;
        inode.ctime_ns = tx.now_ns;
        if inode.nlink > 0 {
            tx.put_inode(&inode)?;
        } else if inode.kind() == InodeKind::File {
            let due = tx.now_ms().saturating_add(self.inner.config.gc_delay_ms);
            tx.enqueue_gc(&mut inode, due, GcKind::File)?;
        } else {
            tx.delete_inode(inode.ino)?;
        }
        Ok(inode)
    }

    /// The write sessions of `ino`, for a service pruning the sessions of
    /// clients that died.
    pub async fn sessions(&self, ino: InodeId) -> Result<Vec<(SessionId, SessionValue)>, NsError> {
        self.read(|tx| async move {
            let result = tx
                .tx
                .get_range(&RangeOptions::prefix(&session_prefix(ino)))
                .await?;
            let mut sessions = Vec::with_capacity(result.kvs.len());
            for kv in &result.kvs {
                match parse_key(&kv.key)? {
                    Key::Session { session, .. } => {
                        sessions.push((session, decode_session(&kv.key, &kv.value)?));
                    }
                    other => {
                        return Err(NsError::Corrupt {
                            key: other.to_string(),
                            reason: "not a session key under the session prefix".into(),
                        });
                    }
                }
            }
            Ok(sessions)
        })
        .await
    }
}

/// [`Namespace::fix_writer_length`]'s decision and change, in `tx`.
async fn fix_writer_length_in<T: Transaction>(
    tx: &MetaTx<T>,
    ino: InodeId,
    session: SessionId,
    known: WriterLength,
    end_session: bool,
) -> Result<WriterLengthFixed, NsError> {
    let sessions = tx
        .tx
        .get_range(&RangeOptions::prefix(&session_prefix(ino)).limit(2))
        .await?;
    let own = session_key(ino, session);
    if !sessions.kvs.iter().any(|kv| kv.key == own) {
        if sessions.kvs.len() < 2 {
            return Ok(WriterLengthFixed::SessionGone);
        }
        // Two others listed first; ours may still follow.
        if !tx.has_session(ino, session).await? {
            return Ok(WriterLengthFixed::SessionGone);
        }
    }
    if sessions.kvs.len() > 1 {
        return Ok(WriterLengthFixed::AskStorage { chunks: None });
    }
    let mut inode = tx.inode(ino).await?.ok_or_else(|| NsError::Corrupt {
        key: format!("INOS {ino:?} {session:?}"),
        reason: "a session of an inode that does not exist".into(),
    })?;
    let file = file_mut(&mut inode)?;
    if file.is_inline() {
        // Held inline, the length is exact: nothing written to storage
        // counts (a writer moves inline data to storage before it writes
        // there, which ends it being inline).
        if end_session {
            tx.tx.clear(&own)?;
        }
        return Ok(WriterLengthFixed::Fixed(inode));
    }
    let layout = file.layout.clone();
    let recorded = file.length;
    if file.truncate_version != known.truncate_version && known.length > recorded {
        let chunk_size = u64::from(layout.chunk_size());
        return Ok(WriterLengthFixed::AskStorage {
            chunks: Some((recorded / chunk_size, (known.length - 1) / chunk_size)),
        });
    }
    let length = recorded.max(known.length);
    check_length(&inode, &layout, length)?;
    file_mut(&mut inode)?.length = length;
    inode.mtime_ns = tx.now_ns;
    inode.ctime_ns = tx.now_ns;
    tx.put_inode(&inode)?;
    if end_session {
        tx.tx.clear(&own)?;
    }
    Ok(WriterLengthFixed::Fixed(inode))
}

/// [`Namespace::setattrs`]'s changes, in order, in `tx`.
async fn set_attrs_in<T: Transaction>(
    tx: &MetaTx<T>,
    user: &User,
    ino: InodeId,
    changes: &[SetAttr],
    inline_bytes_max: u32,
) -> Result<SetAttrResult, NsError> {
    let mut last = None;
    for attr in changes {
        last = Some(set_attr_in(tx, user, ino, attr, inline_bytes_max).await?);
    }
    last.ok_or_else(|| NsError::Invalid(format!("no changes of {ino:?} to make")))
}

/// [`Namespace::setattr`]'s checks and changes, in `tx`.
async fn set_attr_in<T: Transaction>(
    tx: &MetaTx<T>,
    user: &User,
    ino: InodeId,
    attr: &SetAttr,
    inline_bytes_max: u32,
) -> Result<SetAttrResult, NsError> {
    let original = tx.existing(ino).await?;
    let new_mode = match attr.mode {
        Some(mode) => {
            // The setgid rule looks at the group the file will have.
            let mut after_chgrp = original.clone();
            after_chgrp.gid = attr.gid.unwrap_or(original.gid);
            Some(perm::chmod(&after_chgrp, user, mode)?)
        }
        None => None,
    };
    if attr.uid.is_some() || attr.gid.is_some() {
        perm::check_chown(&original, user, attr.uid, attr.gid)?;
    }
    if let Some(size) = attr.size {
        match &original.data {
            InodeData::Directory(_) => {
                return Err(NsError::IsDir(format!("truncate of {ino:?}")));
            }
            InodeData::Symlink(_) | InodeData::Special(_) => {
                return Err(NsError::Invalid(format!(
                    "truncate of {ino:?}, which is not a regular file"
                )));
            }
            InodeData::File(f) => {
                perm::check(&original, user, perm::MAY_WRITE, "truncate")?;
                check_length(&original, &f.layout, size)?;
            }
        }
    }
    for time in [attr.atime, attr.mtime].into_iter().flatten() {
        match time {
            SetTime::At(_) if !perm::owns_or_root(user, &original) => {
                return Err(NsError::NotPermitted(format!(
                    "set times of {ino:?}: uid {} is not the owner",
                    user.uid
                )));
            }
            SetTime::Now
                if !perm::owns_or_root(user, &original)
                    && !perm::allowed(&original, user, perm::MAY_WRITE) =>
            {
                return Err(NsError::Access(format!(
                    "touch {ino:?}: uid {} may not write it",
                    user.uid
                )));
            }
            _ => {}
        }
    }

    let now = tx.now_ns;
    let mut inode = original;
    if attr.uid.is_some() || attr.gid.is_some() {
        inode.uid = attr.uid.unwrap_or(inode.uid);
        inode.gid = attr.gid.unwrap_or(inode.gid);
        inode.mode = perm::mode_after_chown(&inode);
    }
    if let Some(mode) = new_mode {
        inode.mode = mode;
    }
    let mut truncate = None;
    if let Some(size) = attr.size {
        inode.mode = perm::mode_after_truncate(&inode, user);
        let file = file_mut(&mut inode)?;
        if let Some(bytes) = &mut file.inline {
            if size > u64::from(inline_bytes_max) {
                return Err(NsError::Inline(ino));
            }
            bytes.resize(size as usize, 0);
            if bytes.is_empty() {
                file.inline = None;
            }
        }
        file.length = size;
        file.truncate_version += 1;
        truncate = Some(Truncate {
            ino,
            length: size,
            truncate_version: file.truncate_version,
            layout: file.layout.clone(),
        });
        inode.mtime_ns = now;
    }
    let at = |time| match time {
        SetTime::Now => now,
        SetTime::At(ns) => ns,
    };
    if let Some(time) = attr.atime {
        inode.atime_ns = at(time);
    }
    if let Some(time) = attr.mtime {
        inode.mtime_ns = at(time);
    }
    if *attr != SetAttr::default() {
        inode.ctime_ns = now;
        tx.put_inode(&inode)?;
        if inode.is_dir() {
            // The inode now holds the directory's times, which
            // may be set into the past.
            tx.clear_dir_times(ino)?;
        }
    }
    Ok(SetAttrResult { inode, truncate })
}

impl<K: Kv> Namespace<K> {
    /// Opens an existing, linked file: permissions, `O_TRUNC`, the session.
    async fn open_linked<T: Transaction>(
        &self,
        tx: &MetaTx<T>,
        user: &User,
        mut inode: Inode,
        read: bool,
        truncate: bool,
        session: Option<(u64, SessionId)>,
    ) -> Result<Opened, NsError> {
        let write = truncate || session.is_some();
        let mask = if read { perm::MAY_READ } else { 0 } | if write { perm::MAY_WRITE } else { 0 };
        if mask != 0 {
            perm::check(&inode, user, mask, "open")?;
        }
        let mut truncated = None;
        if truncate {
            inode.mode = perm::mode_after_truncate(&inode, user);
            let ino = inode.ino;
            let file = file_mut(&mut inode)?;
            file.length = 0;
            file.inline = None;
            file.truncate_version += 1;
            // Storage truncates even after inline data: a move to storage that
            // failed halfway may have left bytes there.
            truncated = Some(Truncate {
                ino,
                length: 0,
                truncate_version: file.truncate_version,
                layout: file.layout.clone(),
            });
            inode.mtime_ns = tx.now_ns;
            inode.ctime_ns = tx.now_ns;
            tx.put_inode(&inode)?;
        }
        let mut inline_max = 0;
        if let Some((client, id)) = session {
            inline_max = self.inline_max_for(tx, &inode, id).await?;
            tx.put_session(
                inode.ino,
                id,
                &SessionValue {
                    client,
                    opened_ns: tx.now_ns,
                },
            )?;
        }
        Ok(Opened {
            inode,
            session: session.map(|(_, id)| id),
            truncate: truncated,
            inline_max,
        })
    }

    /// What write session `session`, opening now, may have held inline:
    /// [`NsConfig::inline_bytes_max`](crate::ns::NsConfig::inline_bytes_max)
    /// when no other session writes the file and it is empty or inline, else 0.
    /// Reads the sessions serializably, so a concurrent open of another
    /// session makes one of the two retry.
    async fn inline_max_for<T: Transaction>(
        &self,
        tx: &MetaTx<T>,
        inode: &Inode,
        session: SessionId,
    ) -> Result<u32, NsError> {
        let max = self.inner.config.inline_bytes_max;
        let Some(file) = inode.file() else {
            return Ok(0);
        };
        if max == 0 || !(file.is_inline() || file.length == 0) {
            return Ok(0);
        }
        let own = session_key(inode.ino, session);
        let sessions = tx
            .tx
            .get_range(&RangeOptions::prefix(&session_prefix(inode.ino)).limit(2))
            .await?;
        Ok(if sessions.kvs.iter().all(|kv| kv.key == own) {
            max
        } else {
            0
        })
    }
}

#[cfg(test)]
mod tests {
    use flyfs_proto::ids::ChainTableId;

    use super::*;
    use crate::ns::tests::namespace;
    use crate::ns::{LayoutSpec, perm::S_ISGID};
    use crate::schema::ROOT;

    fn errno<T: std::fmt::Debug>(r: Result<T, NsError>) -> i32 {
        r.expect_err("an error").errno()
    }

    #[tokio::test]
    async fn a_create_retried_with_its_session_finds_itself() {
        let ns = namespace().await;
        let root = User::root();
        let flags = CreateFlags {
            exclusive: true,
            write_session: Some(7),
            session: Some(SessionId(41)),
            ..CreateFlags::default()
        };
        let first = ns
            .create(&root, ROOT, b"f", 0o644, flags)
            .await
            .expect("create");
        assert_eq!(first.session, Some(SessionId(41)));
        // The reply was lost; the retry names the same session.
        let again = ns
            .create(&root, ROOT, b"f", 0o644, flags)
            .await
            .expect("retry");
        assert!(again.created);
        assert_eq!(again.inode.ino, first.inode.ino);
        assert_eq!(
            ns.sessions(first.inode.ino).await.expect("sessions").len(),
            1
        );
        // Somebody else's exclusive create still fails.
        let other = CreateFlags {
            session: Some(SessionId(43)),
            ..flags
        };
        assert_eq!(
            errno(ns.create(&root, ROOT, b"f", 0o644, other).await),
            libc::EEXIST
        );
        // A retried open keeps one session too.
        let open = OpenFlags {
            write_session: Some(7),
            session: Some(SessionId(45)),
            ..OpenFlags::default()
        };
        for _ in 0..2 {
            ns.open_file(&root, first.inode.ino, open)
                .await
                .expect("open");
        }
        assert_eq!(
            ns.sessions(first.inode.ino).await.expect("sessions").len(),
            2
        );
    }

    #[tokio::test]
    async fn a_sole_writer_s_length_is_trusted_unless_another_could_have_written() {
        let ns = namespace().await;
        let root = User::root();
        let writer = |client, id| CreateFlags {
            write_session: Some(client),
            session: Some(SessionId(id)),
            ..CreateFlags::default()
        };
        let known = |length, truncate_version| WriterLength {
            length,
            truncate_version,
        };
        let f = ns
            .create(&root, ROOT, b"f", 0o644, writer(7, 41))
            .await
            .expect("create")
            .inode;
        // A sync keeps the session, a close ends it; the larger of the
        // recorded and the known length wins.
        let WriterLengthFixed::Fixed(synced) = ns
            .fix_writer_length(f.ino, SessionId(41), known(4096, 0), false, false)
            .await
            .expect("sync")
        else {
            panic!("a sole writer's length is trusted");
        };
        assert_eq!(synced.size(), 4096);
        assert!(synced.mtime_ns >= f.mtime_ns);
        assert_eq!(ns.sessions(f.ino).await.expect("sessions").len(), 1);
        let WriterLengthFixed::Fixed(closed) = ns
            .fix_writer_length(f.ino, SessionId(41), known(100, 0), true, false)
            .await
            .expect("close")
        else {
            panic!("a sole writer's length is trusted");
        };
        assert_eq!(closed.size(), 4096);
        assert!(ns.sessions(f.ino).await.expect("sessions").is_empty());
        // Closed again (a retry, or a session the reaper ended): storage.
        assert_eq!(
            ns.fix_writer_length(f.ino, SessionId(41), known(100, 0), true, false)
                .await
                .expect("close again"),
            WriterLengthFixed::SessionGone
        );
        // Past what the layout can address: EFBIG.
        let big = ns
            .create(&root, ROOT, b"big", 0o644, writer(7, 43))
            .await
            .expect("create")
            .inode;
        assert_eq!(
            errno(
                ns.fix_writer_length(big.ino, SessionId(43), known(u64::MAX, 0), true, false)
                    .await
            ),
            libc::EFBIG
        );

        // A second writer's session, whether listed before or after ours:
        // every chain is asked, and the sessions stay.
        for (name, ours, theirs) in [(&b"g"[..], 51, 53), (b"h", 63, 61), (b"i", 79, 73)] {
            let g = ns
                .create(&root, ROOT, name, 0o644, writer(7, ours))
                .await
                .expect("create")
                .inode;
            let open = OpenFlags {
                write_session: Some(8),
                session: Some(SessionId(theirs)),
                ..OpenFlags::default()
            };
            ns.open_file(&root, g.ino, open).await.expect("open");
            if name == b"i" {
                // A third, so that two others may be listed before ours.
                let open = OpenFlags {
                    session: Some(SessionId(75)),
                    ..open
                };
                ns.open_file(&root, g.ino, open).await.expect("open");
            }
            assert_eq!(
                ns.fix_writer_length(g.ino, SessionId(ours), known(10, 0), true, false)
                    .await
                    .expect("close"),
                WriterLengthFixed::AskStorage { chunks: None }
            );
            assert!(ns.sessions(g.ino).await.expect("sessions").len() >= 2);
            assert_eq!(ns.stat(g.ino).await.expect("stat").size(), 0);
        }

        // Someone else's truncate since the writer learned version 0.
        let t = ns
            .create(&root, ROOT, b"t", 0o644, writer(7, 81))
            .await
            .expect("create")
            .inode;
        let chunk = u64::from(t.file().expect("file").layout.chunk_size());
        ns.setattr(
            &root,
            t.ino,
            SetAttr {
                size: Some(chunk + 10),
                ..SetAttr::default()
            },
        )
        .await
        .expect("truncate");
        // Nothing known past the recorded length: that length stands.
        let WriterLengthFixed::Fixed(kept) = ns
            .fix_writer_length(t.ino, SessionId(81), known(chunk, 0), false, false)
            .await
            .expect("sync")
        else {
            panic!("nothing past the recorded length");
        };
        assert_eq!(kept.size(), chunk + 10);
        // Known past it: storage, for the chunks in between only.
        assert_eq!(
            ns.fix_writer_length(t.ino, SessionId(81), known(3 * chunk + 1, 0), true, false)
                .await
                .expect("close"),
            WriterLengthFixed::AskStorage {
                chunks: Some((1, 3))
            }
        );
        // With the current version, the writer's length is trusted.
        let WriterLengthFixed::Fixed(grown) = ns
            .fix_writer_length(t.ino, SessionId(81), known(3 * chunk + 1, 1), true, false)
            .await
            .expect("close")
        else {
            panic!("the version matches");
        };
        assert_eq!(grown.size(), 3 * chunk + 1);
    }

    /// The rules of holding a file's data inline: who may, what a store
    /// checks, and how a truncate and the move to storage treat held bytes.
    #[tokio::test]
    async fn a_file_is_held_inline_only_by_its_sole_writer_from_empty() {
        let ns = namespace().await;
        let root = User::root();
        let max = ns.inline_max();
        let created = ns
            .create(
                &root,
                ROOT,
                b"f",
                0o644,
                CreateFlags {
                    write_session: Some(7),
                    session: Some(SessionId(41)),
                    ..CreateFlags::default()
                },
            )
            .await
            .expect("create");
        assert_eq!(created.inline_max, max, "a new file's only writer");
        let ino = created.inode.ino;
        let store = |session, truncate_version, bytes: &'static [u8]| {
            let ns = &ns;
            let root = &root;
            async move {
                ns.store_inline(&StoreInline {
                    user: root,
                    ino,
                    session: SessionId(session),
                    truncate_version,
                    bytes,
                    changes: &[],
                    relaxed: true,
                })
                .await
                .expect("store")
            }
        };
        let open_writer = |client, id| {
            let (ns, root) = (&ns, &root);
            async move {
                let flags = OpenFlags {
                    write_session: Some(client),
                    session: Some(SessionId(id)),
                    ..OpenFlags::default()
                };
                ns.open_file(root, ino, flags).await.expect("open")
            }
        };
        let held = store(41, 0, b"hello").await.expect("taken");
        let file = held.file().expect("a file");
        assert_eq!(
            (file.length, file.inline.as_deref()),
            (5, Some(&b"hello"[..]))
        );
        // Not the session's, or a truncate version from before a truncate.
        assert!(store(99, 0, b"x").await.is_none());
        assert!(store(41, 3, b"x").await.is_none());
        // Too large.
        let big: &'static [u8] = Box::leak(vec![1u8; max as usize + 1].into_boxed_slice());
        assert!(store(41, 0, big).await.is_none());
        // A second writer gets no limit, and while it writes, no store is
        // taken from the first.
        let second = open_writer(8, 43).await;
        assert_eq!(second.inline_max, 0);
        assert!(store(41, 0, b"again").await.is_none());
        ns.close(ino, SessionId(43), None).await.expect("close");
        assert!(store(41, 0, b"again").await.is_some());
        // Lengths from storage or hints leave held bytes alone.
        let hinted = ns.set_length(ino, 1 << 20, false).await.expect("hint");
        assert_eq!(hinted.size(), 5);
        // A truncate within the limit cuts or zero-extends them; past it,
        // the caller must move them first.
        let cut = ns
            .setattr(
                &root,
                ino,
                SetAttr {
                    size: Some(3),
                    ..SetAttr::default()
                },
            )
            .await
            .expect("truncate");
        let file = cut.inode.file().expect("a file");
        assert_eq!(file.inline.as_deref(), Some(&b"aga"[..]));
        assert_eq!(file.truncate_version, 1);
        let past = ns
            .setattr(
                &root,
                ino,
                SetAttr {
                    size: Some(u64::from(max) + 1),
                    ..SetAttr::default()
                },
            )
            .await;
        assert!(
            matches!(past, Err(NsError::Inline(i)) if i == ino),
            "{past:?}"
        );
        // The move: only when the bytes are still the ones written out.
        assert!(!ns.finish_uninline(ino, 1, b"agaX").await.expect("finish"));
        assert!(!ns.finish_uninline(ino, 0, b"aga").await.expect("finish"));
        assert!(ns.finish_uninline(ino, 1, b"aga").await.expect("finish"));
        let moved = ns.stat(ino).await.expect("stat");
        let file = moved.file().expect("a file");
        assert_eq!((file.length, file.is_inline()), (3, false));
        // Not empty and not held: no store, and a new session gets no limit.
        assert!(store(41, 1, b"new").await.is_none());
        ns.close(ino, SessionId(41), None).await.expect("close");
        let reopened = open_writer(7, 45).await;
        assert_eq!(reopened.inline_max, 0);
        // O_TRUNC empties it: held again by its only writer.
        let truncated = ns
            .open_file(
                &root,
                ino,
                OpenFlags {
                    truncate: true,
                    ..OpenFlags::default()
                },
            )
            .await
            .expect("open");
        assert!(truncated.truncate.is_some(), "storage is cut even so");
        assert!(store(45, 2, b"fresh").await.is_some());
    }

    #[tokio::test]
    async fn files_inherit_the_directory_layout() {
        let ns = namespace().await;
        let root = User::root();
        let dir = ns.mkdir(&root, ROOT, b"d", 0o755).await.expect("mkdir");
        let spec = LayoutSpec {
            chain_table: ChainTableId(2),
            chunk_size: 1 << 16,
            stripe: 3,
        };
        ns.set_layout(&root, dir.ino, spec)
            .await
            .expect("set_layout");
        let sub = ns
            .mkdir(&root, dir.ino, b"sub", 0o755)
            .await
            .expect("mkdir");
        assert_eq!(sub.dir().and_then(|d| d.default_layout), Some(spec));
        let file = ns
            .create(&root, sub.ino, b"f", 0o644, CreateFlags::default())
            .await
            .expect("create")
            .inode;
        let layout = &file.file().expect("a file").layout;
        assert_eq!(layout.spec(), spec);
        assert!(layout.chains().iter().all(|c| (101..=104).contains(&c.0)));
        // Elsewhere the root's layout still applies.
        let other = ns
            .create(&root, ROOT, b"g", 0o644, CreateFlags::default())
            .await
            .expect("create")
            .inode;
        assert_eq!(
            other.file().expect("file").layout.chain_table(),
            ChainTableId(1)
        );
        // Bad layouts: unknown table, table too small, bad chunk size; and
        // only the owner may set one.
        let mut bad = spec;
        bad.chain_table = ChainTableId(9);
        assert_eq!(
            errno(ns.set_layout(&root, dir.ino, bad).await),
            libc::EINVAL
        );
        bad = spec;
        bad.stripe = 5;
        assert_eq!(
            errno(ns.set_layout(&root, dir.ino, bad).await),
            libc::EINVAL
        );
        bad = spec;
        bad.chunk_size = 3000;
        assert_eq!(
            errno(ns.set_layout(&root, dir.ino, bad).await),
            libc::EINVAL
        );
        let alice = User::new(1000, 1000, vec![]);
        assert_eq!(
            errno(ns.set_layout(&alice, dir.ino, spec).await),
            libc::EPERM
        );
        assert_eq!(
            errno(ns.set_layout(&root, file.ino, spec).await),
            libc::ENOTDIR
        );
    }

    #[tokio::test]
    async fn truncates_tell_the_caller_what_storage_must_drop() {
        let ns = namespace().await;
        let root = User::root();
        let created = ns
            .create(&root, ROOT, b"f", 0o644, CreateFlags::default())
            .await
            .expect("create");
        let ino = created.inode.ino;
        assert!(created.created && created.truncate.is_none());
        // Hints only grow the length; an exact length replaces it.
        assert_eq!(
            ns.set_length(ino, 100, false).await.expect("hint").size(),
            100
        );
        assert_eq!(
            ns.set_length(ino, 50, false).await.expect("hint").size(),
            100
        );
        assert_eq!(
            ns.set_length(ino, 50, true).await.expect("exact").size(),
            50
        );
        assert_eq!(
            errno(ns.set_length(ino, u64::MAX, false).await),
            libc::EFBIG
        );
        // O_TRUNC on the existing file.
        let again = ns
            .create(
                &root,
                ROOT,
                b"f",
                0o644,
                CreateFlags {
                    truncate: true,
                    ..CreateFlags::default()
                },
            )
            .await
            .expect("O_TRUNC");
        assert!(!again.created);
        let truncate = again.truncate.expect("a truncate");
        assert_eq!((truncate.length, truncate.truncate_version), (0, 1));
        // setattr size: even growing returns a truncate (unreported data may
        // lie past the new length).
        let result = ns
            .setattr(
                &root,
                ino,
                SetAttr {
                    size: Some(4096),
                    ..SetAttr::default()
                },
            )
            .await
            .expect("truncate");
        let truncate = result.truncate.expect("a truncate");
        assert_eq!((truncate.length, truncate.truncate_version), (4096, 2));
        assert_eq!(result.inode.size(), 4096);
        // O_EXCL, a directory, a symlink.
        let excl = CreateFlags {
            exclusive: true,
            ..CreateFlags::default()
        };
        assert_eq!(
            errno(ns.create(&root, ROOT, b"f", 0o644, excl).await),
            libc::EEXIST
        );
        ns.mkdir(&root, ROOT, b"d", 0o755).await.expect("mkdir");
        let plain = CreateFlags::default();
        assert_eq!(
            errno(ns.create(&root, ROOT, b"d", 0o644, plain).await),
            libc::EISDIR
        );
        ns.symlink(&root, ROOT, b"s", b"f").await.expect("symlink");
        assert_eq!(
            errno(ns.create(&root, ROOT, b"s", 0o644, plain).await),
            libc::ELOOP
        );
    }

    #[tokio::test]
    async fn setgid_directories_pass_on_their_group() {
        let ns = namespace().await;
        let root = User::root();
        let shared = ns
            .mkdir(&root, ROOT, b"shared", 0o777)
            .await
            .expect("mkdir");
        ns.setattr(
            &root,
            shared.ino,
            SetAttr {
                mode: Some(0o2777),
                gid: Some(500),
                ..SetAttr::default()
            },
        )
        .await
        .expect("chmod g+s");
        let alice = User::new(1000, 1000, vec![]);
        let file = ns
            .create(&alice, shared.ino, b"f", 0o2755, CreateFlags::default())
            .await
            .expect("create")
            .inode;
        // The group is the directory's; alice is not in it, so a
        // group-executable file loses setgid.
        assert_eq!((file.uid, file.gid, file.mode), (1000, 500, 0o755));
        let dir = ns
            .mkdir(&alice, shared.ino, b"d", 0o755)
            .await
            .expect("mkdir");
        assert_eq!((dir.gid, dir.mode & S_ISGID), (500, S_ISGID));
        // Outside, the caller's own group.
        ns.setattr(
            &root,
            ROOT,
            SetAttr {
                mode: Some(0o777),
                ..SetAttr::default()
            },
        )
        .await
        .expect("chmod /");
        let own = ns.mkdir(&alice, ROOT, b"own", 0o755).await.expect("mkdir");
        assert_eq!((own.gid, own.mode), (1000, 0o755));
    }
}
