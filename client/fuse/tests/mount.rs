//! The FUSE daemon against a whole cluster in one process (real TCP, real
//! kernel mount): files written and read back through the mount, a
//! directory listed across metadata pages and kernel buffers, renames,
//! links, symlinks, permissions, truncates and errno, then a clean unmount.
//!
//! Mounting needs root and `/dev/fuse`: without them the test says so and
//! passes without running.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_client::{FsClient, FsConfig};
use flyfs_fs_meta::testing::{ClusterOptions, TestCluster};
use flyfs_fuse::{FuseOptions, mount};
use flyfs_proto::ids::ClientId;
use flyfs_rpc::Tcp;

/// Why this machine cannot mount, if it cannot.
fn cannot_mount() -> Option<String> {
    // /proc/self belongs to the process's effective user.
    match std::fs::metadata("/proc/self") {
        Ok(meta) if meta.uid() == 0 => {}
        Ok(_) => return Some("not root".into()),
        Err(e) => return Some(format!("cannot tell the user: {e}")),
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Some(format!("/dev/fuse: {e}"));
    }
    None
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

fn errno_of(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

/// What a user does on the mount; runs on a plain thread, since every call
/// blocks until the daemon (on the runtime) answers.
fn exercise(mnt: &Path) {
    // A file over several chunks and chains, read back whole and in part.
    let data = pattern(7, 3 << 20 | 12345);
    let big = mnt.join("big.bin");
    std::fs::write(&big, &data).expect("write big.bin");
    assert_eq!(
        std::fs::metadata(&big).expect("stat").len(),
        data.len() as u64
    );
    assert!(std::fs::read(&big).expect("read big.bin") == data);
    let mut file = std::fs::File::open(&big).expect("open");
    file.seek(SeekFrom::Start(1 << 20)).expect("seek");
    let mut part = vec![0; 100_000];
    file.read_exact(&mut part).expect("read part");
    assert!(part[..] == data[1 << 20..(1 << 20) + 100_000]);
    drop(file);

    // Writes at offsets, growing the file with a hole; stat while open
    // shows the buffered length.
    let sparse = mnt.join("sparse");
    let mut file = std::fs::File::create(&sparse).expect("create");
    file.write_all(b"head").expect("write");
    file.seek(SeekFrom::Start(200_000)).expect("seek");
    file.write_all(b"tail").expect("write");
    assert_eq!(file.metadata().expect("fstat").len(), 200_004);
    drop(file);
    let back = std::fs::read(&sparse).expect("read sparse");
    assert_eq!(back.len(), 200_004);
    assert!(back[4..200_000].iter().all(|&b| b == 0));
    assert_eq!(&back[200_000..], b"tail");

    // Truncate down and up.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&sparse)
        .expect("open for truncate");
    file.set_len(2).expect("truncate down");
    file.set_len(10).expect("truncate up");
    drop(file);
    assert_eq!(std::fs::read(&sparse).expect("read"), b"he\0\0\0\0\0\0\0\0");

    // A directory bigger than one metadata page and one kernel buffer.
    let dir = mnt.join("many");
    std::fs::create_dir(&dir).expect("mkdir");
    for i in 0..700 {
        std::fs::File::create(dir.join(format!("entry-{i:04}"))).expect("create entry");
    }
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    let expected: Vec<String> = (0..700).map(|i| format!("entry-{i:04}")).collect();
    assert_eq!(names, expected);

    // Renames, hard links, symlinks.
    std::fs::rename(dir.join("entry-0000"), mnt.join("moved")).expect("rename");
    assert!(!dir.join("entry-0000").exists());
    std::fs::hard_link(mnt.join("moved"), mnt.join("linked")).expect("link");
    assert_eq!(
        std::fs::metadata(mnt.join("moved")).expect("stat").nlink(),
        2
    );
    std::os::unix::fs::symlink("big.bin", mnt.join("sym")).expect("symlink");
    assert_eq!(
        std::fs::read_link(mnt.join("sym")).expect("readlink"),
        Path::new("big.bin")
    );
    assert_eq!(
        std::fs::metadata(mnt.join("sym")).expect("follow").len(),
        data.len() as u64
    );

    // Permissions.
    std::fs::set_permissions(mnt.join("moved"), std::fs::Permissions::from_mode(0o640))
        .expect("chmod");
    assert_eq!(
        std::fs::metadata(mnt.join("moved")).expect("stat").mode() & 0o7777,
        0o640
    );

    // Errors come back as the service's errno.
    assert_eq!(
        errno_of(std::fs::metadata(mnt.join("absent"))),
        Some(libc::ENOENT)
    );
    assert_eq!(errno_of(std::fs::create_dir(&dir)), Some(libc::EEXIST));
    assert_eq!(errno_of(std::fs::remove_dir(&dir)), Some(libc::ENOTEMPTY));
    assert_eq!(
        errno_of(std::fs::File::create(mnt.join("n".repeat(256)))),
        Some(libc::ENAMETOOLONG)
    );

    // Removal of a whole tree.
    std::fs::remove_dir_all(&dir).expect("rm -r");
    assert!(!dir.exists());
}

#[test]
fn a_mounted_cluster_behaves_like_a_file_system() {
    if let Some(why) = cannot_mount() {
        eprintln!("skipping the FUSE mount test: {why}");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = runtime.block_on(TestCluster::start(ClusterOptions {
        chains: 3,
        stripe: 3,
        ..ClusterOptions::default()
    }));
    let fs: Arc<FsClient<Tcp>> = runtime.block_on(async {
        let mut storage = ClientConfig::new([cluster.mgmt_addr.clone()], ClientId(41));
        storage.op_deadline = Duration::from_secs(30);
        let storage = StorageClient::new(storage, Tcp, flyfs_rpc::testing::client());
        storage.refresh_routing().await.expect("routing");
        FsClient::new(
            cluster.meta[0].clone(),
            storage,
            ClientId(41),
            FsConfig {
                write_buffer_bytes: 256 << 10,
                ..FsConfig::default()
            },
        )
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mount point");
    let mut mounted = mount(
        fs.clone(),
        runtime.handle().clone(),
        &mnt,
        &FuseOptions {
            threads: 2,
            ..FuseOptions::default()
        },
    )
    .expect("mount");

    // A failing check must not leave the mount behind: unmount first,
    // then report.
    let outcome = std::panic::catch_unwind(|| exercise(&mnt));
    runtime.block_on(fs.flush_all()).expect("flush_all");
    let mut unmounted = mounted.unmount();
    if unmounted.is_err() {
        // The kernel releases the last files in the background: once more.
        std::thread::sleep(Duration::from_millis(500));
        unmounted = mounted.unmount();
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
    unmounted.expect("unmount");
    runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), mounted.ended()).await })
        .expect("the session ends after the unmount")
        .expect("the session ends cleanly");
    runtime.block_on(cluster.shutdown());
}
