//! Which namespace changes wait for the embedded store's fsync before they
//! are answered: every one, except the end of a write session that records
//! no length (`Namespace::close` without one), whose commit is left for the
//! next fsync (docs/metadata-schema.md, "Open for write / close").

mod ns_common;

use std::time::Duration;

use flyfs_fs_meta::ns::CreateFlags;
use flyfs_kv::fjall::{FjallKv, FjallOptions};
use flyfs_proto::ids::InodeId;

#[tokio::test]
async fn only_a_close_that_records_no_length_skips_the_fsync() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The syncer waits an hour: every fsync counted below is a commit's.
    let options = FjallOptions {
        relaxed_within: Duration::from_secs(3600),
        ..FjallOptions::default()
    };
    let kv = FjallKv::open(dir.path(), options).expect("open fjall");
    let (ns, _clock) = ns_common::open(kv.clone()).await;
    let root = ns_common::root();
    let create = |name: &'static str| {
        let ns = ns.clone();
        let root = root.clone();
        async move {
            let flags = CreateFlags {
                write_session: Some(7),
                ..CreateFlags::default()
            };
            let created = ns
                .create(&root, InodeId(1), name.as_bytes(), 0o644, flags)
                .await
                .expect("create");
            (created.inode.ino, created.session.expect("a write session"))
        }
    };
    let (a, session_a) = create("a").await;
    let (b, session_b) = create("b").await;

    let syncs = kv.journal_stats().syncs;
    let closed = ns.close(a, session_a, None).await.expect("close");
    assert!(closed.session_found);
    assert_eq!(
        kv.journal_stats().syncs,
        syncs,
        "a close with no length made an fsync"
    );
    assert!(
        ns.sessions(a).await.expect("sessions").is_empty(),
        "the close is visible at once"
    );

    let closed = ns.close(b, session_b, Some(10)).await.expect("close");
    assert!(closed.session_found);
    assert_eq!(
        kv.journal_stats().syncs,
        syncs + 1,
        "a close recording a length is durable when answered"
    );

    let (c, _) = create("c").await;
    assert!(
        kv.journal_stats().syncs > syncs + 1,
        "a create is durable when answered"
    );
    assert_eq!(ns.stat(c).await.expect("stat").ino, c);
    ns_common::assert_clean(&ns).await;
}
