//! Which namespace changes wait for the embedded store's fsync before they
//! are answered (docs/metadata-schema.md, "Durability"): entries added,
//! removed or renamed do not, unless configured to, and neither does the end
//! of a write session that records no length; `Namespace::sync` makes every
//! one answered before it durable, and the GC waits for that before it acts
//! on what a remove released.

mod ns_common;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_fs_meta::gc::{GcConfig, GcStats, GcWorker};
use flyfs_fs_meta::ns::{CreateFlags, Namespace};
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
async fn configured_durable_every_entry_is_fsynced_before_it_is_answered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kv = store(&dir);
    let clock = Arc::new(ManualClock::new(ns_common::START_NS));
    let mut config = ns_common::config(clock);
    config.durable_namespace_changes = true;
    let ns = Namespace::open(kv.clone(), config).await.expect("open");
    create(&ns, "a").await;
    let syncs = kv.journal_stats().syncs;
    create(&ns, "b").await;
    assert_eq!(kv.journal_stats().syncs, syncs + 1);
    ns.unlink(&ns_common::root(), ROOT, b"a")
        .await
        .expect("unlink");
    assert_eq!(kv.journal_stats().syncs, syncs + 2);
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
