//! Which namespace changes wait for the embedded store's fsync before they
//! are answered (docs/metadata-schema.md, "Durability"): entries added,
//! removed or renamed do not, unless configured to, and neither do the end
//! of a write session that records no length and a relaxed length fix (the
//! flush of `close(2)`); `Namespace::sync` makes every one answered before
//! it durable, and the GC waits for that before it acts on what a remove
//! released.

mod ns_common;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_fs_meta::gc::{GcConfig, GcStats, GcWorker};
use flyfs_fs_meta::ns::{CreateFlags, Namespace, StoreInline, WriterLength, WriterLengthFixed};
use flyfs_fs_meta::schema::SessionId;
use flyfs_kv::fjall::{FjallKv, FjallOptions};
use flyfs_kv::{Kv, KvError, Limits};
use flyfs_proto::ids::{ClientId, InodeId};
use flyfs_rpc::{Tcp, testing};
use flyfs_time::ManualClock;

const ROOT: InodeId = InodeId(1);

/// A store whose syncer waits an hour: every fsync counted below is a
/// commit's or a `sync`'s.
fn store(dir: &tempfile::TempDir) -> FjallKv {
    let options = FjallOptions {
        relaxed_within: Duration::from_secs(3600),
        ..FjallOptions::default()
    };
    FjallKv::open(dir.path(), options).expect("open fjall")
}

async fn create(ns: &Namespace<impl Kv>, name: &str) -> (InodeId, SessionId) {
    let flags = CreateFlags {
        write_session: Some(7),
        ..CreateFlags::default()
    };
    let created = ns
        .create(&ns_common::root(), ROOT, name.as_bytes(), 0o644, flags)
        .await
        .expect("create");
    (created.inode.ino, created.session.expect("a write session"))
}

#[tokio::test]
async fn entries_and_a_close_without_a_length_wait_for_no_fsync_until_synced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kv = store(&dir);
    let (ns, _clock) = ns_common::open(kv.clone()).await;
    let root = ns_common::root();
    // The first create takes a batch of inode ids, durably.
    let (a, session_a) = create(&ns, "a").await;
    let syncs = kv.journal_stats().syncs;

    let (b, session_b) = create(&ns, "b").await;
    ns.mkdir(&root, ROOT, b"d", 0o755).await.expect("mkdir");
    ns.symlink(&root, ROOT, b"s", b"a").await.expect("symlink");
    ns.link(&root, a, ROOT, b"a2").await.expect("link");
    ns.rename(&root, ROOT, b"a2", ROOT, b"a3")
        .await
        .expect("rename");
    ns.unlink(&root, ROOT, b"a3").await.expect("unlink");
    ns.rmdir(&root, ROOT, b"d").await.expect("rmdir");
    let closed = ns.close(a, session_a, None).await.expect("close");
    assert!(closed.session_found);
    assert_eq!(
        kv.journal_stats().syncs,
        syncs,
        "an entry's change or a close with no length made an fsync"
    );
    assert_eq!(ns.stat(a).await.expect("stat").nlink, 1, "visible at once");
    assert!(ns.sessions(a).await.expect("sessions").is_empty());

    ns.sync().await.expect("sync");
    assert_eq!(kv.journal_stats().syncs, syncs + 1, "sync made no fsync");

    let closed = ns.close(b, session_b, Some(10)).await.expect("close");
    assert!(closed.session_found);
    assert_eq!(
        kv.journal_stats().syncs,
        syncs + 2,
        "a close recording a length is durable when answered"
    );
    ns_common::assert_clean(&ns).await;
}

#[tokio::test]
async fn a_relaxed_length_fix_waits_for_no_fsync_and_a_close_restores_a_lost_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kv = store(&dir);
    let (ns, clock) = ns_common::open(kv.clone()).await;
    let (a, session) = create(&ns, "a").await;
    let known = |length| WriterLength {
        length,
        truncate_version: 0,
    };
    let length_of = |ino| {
        let ns = ns.clone();
        async move {
            ns.stat(ino)
                .await
                .expect("stat")
                .file()
                .expect("a file")
                .length
        }
    };

    let syncs = kv.journal_stats().syncs;
    let fixed = ns
        .fix_writer_length(a, session, known(100), false, true)
        .await
        .expect("relaxed sync");
    assert!(matches!(fixed, WriterLengthFixed::Fixed(_)), "{fixed:?}");
    assert_eq!(
        kv.journal_stats().syncs,
        syncs,
        "a relaxed sync made an fsync"
    );
    ns.fix_writer_length(a, session, known(200), false, false)
        .await
        .expect("durable sync");
    assert_eq!(kv.journal_stats().syncs, syncs + 1);
    assert_eq!(length_of(a).await, 200);

    // A close that knows its sync fixed 200 changes nothing, waits for no
    // fsync, and leaves the times alone.
    let before = ns.stat(a).await.expect("stat");
    clock.advance_ms(1000);
    let closed = ns.close_known(a, session, known(200)).await.expect("close");
    assert!(closed.session_found);
    assert_eq!(kv.journal_stats().syncs, syncs + 1);
    let after = ns.stat(a).await.expect("stat");
    assert_eq!((after.mtime_ns, length_of(a).await), (before.mtime_ns, 200));

    // A sync the service lost (the recorded length is behind what the
    // writer was told, at the same truncate version): the close restores
    // it, durably.
    let (b, session) = create(&ns, "b").await;
    ns.fix_writer_length(b, session, known(300), false, true)
        .await
        .expect("relaxed sync");
    ns.set_length(b, 0, true).await.expect("lose the sync");
    let syncs = kv.journal_stats().syncs;
    ns.close_known(b, session, known(300)).await.expect("close");
    assert_eq!(length_of(b).await, 300);
    assert_eq!(kv.journal_stats().syncs, syncs + 1, "the repair is durable");
    // Not past a truncate the writer has not seen.
    let (c, session) = create(&ns, "c").await;
    let stale = WriterLength {
        length: 300,
        truncate_version: 7,
    };
    ns.close_known(c, session, stale).await.expect("close");
    assert_eq!(length_of(c).await, 0);
}

#[tokio::test]
async fn configured_durable_every_entry_and_length_is_fsynced_before_it_is_answered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kv = store(&dir);
    let clock = Arc::new(ManualClock::new(ns_common::START_NS));
    let mut config = ns_common::config(clock);
    config.durable_namespace_changes = true;
    let ns = Namespace::open(kv.clone(), config).await.expect("open");
    create(&ns, "a").await;
    let syncs = kv.journal_stats().syncs;
    let (b, session) = create(&ns, "b").await;
    assert_eq!(kv.journal_stats().syncs, syncs + 1);
    ns.unlink(&ns_common::root(), ROOT, b"a")
        .await
        .expect("unlink");
    assert_eq!(kv.journal_stats().syncs, syncs + 2);
    let known = WriterLength {
        length: 10,
        truncate_version: 0,
    };
    ns.fix_writer_length(b, session, known, false, true)
        .await
        .expect("a sync asking to be relaxed");
    assert_eq!(kv.journal_stats().syncs, syncs + 3);
}

/// The embedded store, noting how many commits it had made at each
/// [`Kv::sync`].
#[derive(Clone)]
struct Watched {
    kv: FjallKv,
    commits_at_sync: Arc<Mutex<Vec<u64>>>,
}

impl Kv for Watched {
    type Tx = <FjallKv as Kv>::Tx;

    fn begin(&self) -> Result<Self::Tx, KvError> {
        self.kv.begin()
    }

    fn begin_read_only(&self) -> Result<Self::Tx, KvError> {
        self.kv.begin_read_only()
    }

    fn limits(&self) -> Limits {
        self.kv.limits()
    }

    async fn sync(&self) -> Result<(), KvError> {
        let commits = self.kv.journal_stats().commits;
        self.commits_at_sync.lock().push(commits);
        self.kv.sync().await
    }
}

#[tokio::test]
async fn the_gc_waits_for_the_removes_it_collects_to_be_durable_before_acting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kv = Watched {
        kv: store(&dir),
        commits_at_sync: Arc::default(),
    };
    let (ns, clock) = ns_common::open(kv.clone()).await;
    let root = ns_common::root();
    ns.mkdir(&root, ROOT, b"d", 0o755).await.expect("mkdir");
    ns.remove_all(&root, ROOT, b"d").await.expect("remove_all");
    let removed_at = kv.kv.journal_stats();
    assert_eq!(
        removed_at.relaxed_commits, 2,
        "the mkdir and the remove are relaxed"
    );
    // A directory has no chunks: collecting it never reaches storage.
    let storage = StorageClient::new(
        ClientConfig::new(["127.0.0.1:1".to_string()], ClientId(9)),
        Tcp,
        testing::meta(),
    );
    let gc = GcWorker::new(
        ns.clone(),
        storage,
        GcConfig::default(),
        Arc::new(GcStats::default()),
    );
    assert_eq!(gc.scan_once().await.expect("scan"), 0, "not due yet");
    assert!(kv.commits_at_sync.lock().is_empty(), "nothing to wait for");
    clock.advance_ms(ns_common::GC_DELAY_MS as i64);
    assert_eq!(gc.scan_once().await.expect("scan"), 1);
    assert_eq!(
        *kv.commits_at_sync.lock(),
        [removed_at.commits],
        "the scan synced once, before any commit of its own"
    );
    assert!(kv.kv.journal_stats().syncs > removed_at.syncs);
}

/// Bytes held inline are committed like the length they come with: a
/// relaxed store (the flush of `close(2)`) waits for no fsync, a durable one
/// (`fsync`) does, and `sync` makes a relaxed one durable; either survives
/// the store's reopening. The move to storage's last step is durable.
#[tokio::test]
async fn inline_bytes_are_as_durable_as_the_sync_that_brought_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kv = store(&dir);
    let (ns, _clock) = ns_common::open(kv.clone()).await;
    let root = ns_common::root();
    let (a, session_a) = create(&ns, "a").await;
    let (b, session_b) = create(&ns, "b").await;
    let store_inline = |ino, session, bytes: &'static [u8], relaxed| {
        let (ns, root) = (ns.clone(), root.clone());
        async move {
            ns.store_inline(&StoreInline {
                user: &root,
                ino,
                session,
                truncate_version: 0,
                bytes,
                changes: &[],
                relaxed,
            })
            .await
            .expect("store")
            .expect("taken")
        }
    };
    let syncs = kv.journal_stats().syncs;
    store_inline(a, session_a, b"relaxed", true).await;
    assert_eq!(kv.journal_stats().syncs, syncs, "a relaxed store fsynced");
    assert!(kv.journal_stats().relaxed_pending);
    store_inline(b, session_b, b"durable", false).await;
    assert_eq!(kv.journal_stats().syncs, syncs + 1);
    ns.sync().await.expect("sync");
    assert!(!kv.journal_stats().relaxed_pending);
    let syncs = kv.journal_stats().syncs;
    assert!(ns.finish_uninline(b, 0, b"durable").await.expect("finish"));
    assert_eq!(
        kv.journal_stats().syncs,
        syncs + 1,
        "the move's end is durable"
    );
    drop(ns);
    drop(kv);

    let kv = store(&dir);
    let (ns, _clock) = ns_common::open(kv.clone()).await;
    let held = |ino| {
        let ns = ns.clone();
        async move {
            let inode = ns.stat(ino).await.expect("stat");
            let file = inode.file().expect("a file");
            (file.length, file.inline.clone())
        }
    };
    assert_eq!(held(a).await, (7, Some(b"relaxed".to_vec())));
    assert_eq!(held(b).await, (7, None));
}
