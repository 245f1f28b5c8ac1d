//! The FUSE daemon against a whole cluster in one process (real TCP, real
//! kernel mount): files written and read back through the mount, a
//! directory listed across metadata pages and kernel buffers, renames,
//! links, symlinks, permissions (setuid and setgid dropped as Linux drops
//! them), truncates and errno, then a clean unmount.
//!
//! Mounting needs root and `/dev/fuse`: without them the test says so and
//! passes without running.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_client::{FsClient, FsConfig};
use flyfs_fs_meta::testing::{ClusterOptions, TestCluster};
use flyfs_fuse::{FuseOptions, mount};
use flyfs_proto::ids::{ClientId, InodeId};
use flyfs_proto::wire::meta::User;
use flyfs_rpc::Tcp;
use tokio::runtime::Runtime;

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

    a_chown_after_a_write_fetches_no_attributes(mnt);
    setuid_and_setgid_are_dropped_as_linux_drops_them(mnt);

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

/// The mount's FUSE requests so far, by op (`flyfs_fuse_requests_total`):
/// this test binary's metrics recorder.
fn requests(op: &str) -> u64 {
    REQUESTS
        .get()
        .and_then(|counts| counts.lock().get(op).cloned())
        .map_or(0, |count| count.load(Ordering::Relaxed))
}

type Counts = parking_lot::Mutex<HashMap<String, Arc<AtomicU64>>>;

static REQUESTS: OnceLock<Arc<Counts>> = OnceLock::new();

/// Where [`requests`] counts the GETATTRs answered with a create's
/// directory attributes (`flyfs_fuse_dir_attrs_kept_total`).
const KEPT: &str = "(kept directory attributes)";

/// Counts `flyfs_fuse_requests_total` by its `op` label, and
/// `flyfs_fuse_dir_attrs_kept_total`; ignores the rest.
struct CountRequests(Arc<Counts>);

impl metrics::Recorder for CountRequests {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() == "flyfs_fuse_dir_attrs_kept_total" {
            let count = self.0.lock().entry(KEPT.into()).or_default().clone();
            return metrics::Counter::from_arc(count);
        }
        if key.name() != "flyfs_fuse_requests_total" {
            return metrics::Counter::noop();
        }
        let op = key
            .labels()
            .find(|label| label.key() == "op")
            .map_or_else(String::new, |label| label.value().to_owned());
        metrics::Counter::from_arc(self.0.lock().entry(op).or_default().clone())
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// A name looked up and not found is remembered by the kernel for the
/// negative TTL (1 s by default): asked again within it, the mount hears
/// nothing; created here, it exists at once; created by another client
/// (the service directly), it shows here once the TTL has passed.
fn missing_names_are_remembered_for_the_negative_ttl(
    mnt: &Path,
    fs: &FsClient<Tcp>,
    runtime: &Runtime,
) {
    let ttl = FuseOptions::default().negative_ttl;
    let here = mnt.join("created-here");
    let lookups = requests("lookup");
    let first = std::time::Instant::now();
    assert_eq!(errno_of(std::fs::metadata(&here)), Some(libc::ENOENT));
    assert_eq!(requests("lookup") - lookups, 1);
    assert_eq!(errno_of(std::fs::metadata(&here)), Some(libc::ENOENT));
    // Only within the TTL of the first answer does the kernel keep it; a
    // slower machine may have let it lapse.
    if first.elapsed() < ttl {
        assert_eq!(requests("lookup") - lookups, 1, "the second stat asked");
    }
    std::fs::write(&here, b"x").expect("create over a negative entry");
    assert_eq!(std::fs::read(&here).expect("read"), b"x");
    std::fs::remove_file(&here).expect("remove");

    let elsewhere = mnt.join("created-elsewhere");
    assert_eq!(errno_of(std::fs::metadata(&elsewhere)), Some(libc::ENOENT));
    let made = std::time::Instant::now();
    runtime
        .block_on(fs.mkdir(&User::root(), InodeId(1), b"created-elsewhere", 0o755))
        .expect("mkdir by another client");
    let deadline = made + ttl + Duration::from_secs(30);
    while std::fs::metadata(&elsewhere).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "a name created by another client did not show within the negative TTL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_dir(&elsewhere).expect("rmdir");
}

/// A small file written the way `tar x` writes one: a chown after the
/// write costs no GETATTR (the kernel fetches the mode before a chown only
/// to drop setuid itself, which `HANDLE_KILLPRIV_V2` leaves to us).
fn a_chown_after_a_write_fetches_no_attributes(mnt: &Path) {
    let path = mnt.join("unpacked");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create");
    file.write_all(b"a small file").expect("write");
    file.set_times(std::fs::FileTimes::new().set_modified(std::time::UNIX_EPOCH))
        .expect("futimens");
    let before = requests("getattr");
    std::os::unix::fs::fchown(&file, Some(65534), Some(65534)).expect("fchown");
    assert_eq!(
        requests("getattr"),
        before,
        "the chown fetched the attributes"
    );
    file.set_permissions(std::fs::Permissions::from_mode(0o640))
        .expect("fchmod");
    drop(file);
    let meta = std::fs::metadata(&path).expect("stat");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (65534, 65534, 0o640)
    );
    assert_eq!((meta.len(), meta.mtime()), (12, 0));
    std::fs::remove_file(&path).expect("remove");
}

/// Files made one after another in one directory, as `tar x` makes them:
/// the kernel's stat of the directory before each next name is answered
/// with the attributes the last create brought back, which are the
/// service's own; and any other change to a directory is seen at once.
fn creates_answer_the_stat_of_their_directory(mnt: &Path, fs: &FsClient<Tcp>, runtime: &Runtime) {
    let dir = mnt.join("unpacked-tree");
    std::fs::create_dir(&dir).expect("mkdir");
    let truth = |path: &Path| {
        let ino = std::fs::metadata(path).expect("stat").ino();
        runtime
            .block_on(fs.stat(&User::root(), InodeId(ino)))
            .expect("the service's stat")
    };
    let kept = requests(KEPT);
    for i in 0..20 {
        let mut file = std::fs::File::create_new(dir.join(format!("f{i}"))).expect("create");
        file.write_all(b"a small file").expect("write");
    }
    // The first file's lookup found the directory's attributes cached from
    // the mkdir; each later one found them dropped by the create before.
    assert_eq!(
        requests(KEPT) - kept,
        19,
        "GETATTRs answered from the creates"
    );
    let seen = std::fs::metadata(&dir).expect("stat after the creates");
    let service = truth(&dir);
    assert_eq!(
        (
            seen.mtime(),
            seen.mtime_nsec(),
            seen.ctime(),
            seen.ctime_nsec()
        ),
        (
            service.mtime_ns.div_euclid(1_000_000_000),
            service.mtime_ns.rem_euclid(1_000_000_000),
            service.ctime_ns.div_euclid(1_000_000_000),
            service.ctime_ns.rem_euclid(1_000_000_000),
        ),
        "the kept times are the service's"
    );
    assert_eq!((seen.nlink(), seen.mode() & 0o7777), (2, 0o755));
    // A create in another directory keeps this one's attributes.
    let other = mnt.join("unpacked-other");
    std::fs::create_dir(&other).expect("mkdir");
    std::fs::File::create_new(dir.join("x")).expect("create");
    std::fs::File::create_new(other.join("y")).expect("create in the other");
    let kept = requests(KEPT);
    let seen = std::fs::metadata(&dir).expect("stat");
    assert_eq!(requests(KEPT) - kept, 1, "answered from the create of x");
    assert_eq!(
        seen.mtime_nsec(),
        truth(&dir).mtime_ns.rem_euclid(1_000_000_000)
    );
    std::fs::remove_dir_all(&other).expect("rm -r");
    // Changes after a create are never hidden by what it kept.
    std::fs::File::create_new(dir.join("g")).expect("create");
    std::fs::create_dir(dir.join("sub")).expect("mkdir");
    assert_eq!(
        std::fs::metadata(&dir).expect("stat").nlink(),
        3,
        "mkdir counted"
    );
    std::fs::File::create_new(dir.join("h")).expect("create");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    assert_eq!(
        std::fs::metadata(&dir).expect("stat").mode() & 0o7777,
        0o750
    );
    std::fs::File::create_new(dir.join("i")).expect("create");
    std::fs::remove_file(dir.join("g")).expect("unlink");
    let seen = std::fs::metadata(&dir).expect("stat after the unlink");
    assert_eq!(
        seen.ctime_nsec(),
        truth(&dir).ctime_ns.rem_euclid(1_000_000_000)
    );
    std::fs::remove_dir_all(&dir).expect("rm -r");
}

/// Runs `script` (with the file as `$1`) in `sh` as user and group nobody
/// (65534), without root's capabilities; panics naming it if it fails.
fn as_nobody(script: &str, file: &Path) {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(file)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run sh as nobody");
    assert!(
        out.status.success(),
        "`{script}` as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// setuid and setgid (with group execute) go when a user without
/// `CAP_FSETID` writes, truncates (by path, through a descriptor, by
/// `O_TRUNC`) or allocates, and on every chown; root's writes keep them, and
/// setgid without group execute (mandatory locking) stays. The mount
/// negotiates `FUSE_HANDLE_KILLPRIV_V2`, which leaves all of this to the
/// file system.
fn setuid_and_setgid_are_dropped_as_linux_drops_them(mnt: &Path) {
    let file = mnt.join("setuid");
    let mode = || std::fs::metadata(&file).expect("stat").mode() & 0o7777;
    let set = |bits| {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(bits)).expect("chmod")
    };
    std::fs::write(&file, b"x").expect("create");
    set(0o6777);
    let mut append = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .expect("open");
    append.write_all(b"r").expect("root writes");
    drop(append);
    assert_eq!(mode(), 0o6777, "root's write keeps setuid and setgid");

    for (what, script) in [
        ("a write", "printf y >> \"$1\""),
        ("ftruncate", "truncate -s 2 \"$1\""),
        (
            "truncate by path",
            "perl -e 'truncate($ARGV[0], 1) or die \"$!\"' \"$1\"",
        ),
        ("truncate by O_TRUNC", ": > \"$1\""),
        ("fallocate", "fallocate -l 8192 \"$1\""),
    ] {
        set(0o6777);
        as_nobody(script, &file);
        assert_eq!(mode(), 0o0777, "{what} by nobody drops setuid and setgid");
    }

    // Setgid without group execute marks mandatory locking: kept.
    set(0o6767);
    as_nobody("printf z >> \"$1\"", &file);
    assert_eq!(
        mode(),
        0o2767,
        "a write by nobody keeps setgid without group execute"
    );
    assert_eq!(std::fs::read(&file).expect("read").len(), 8193);

    set(0o6777);
    std::os::unix::fs::chown(&file, Some(65534), Some(65534)).expect("chown");
    assert_eq!(
        mode(),
        0o0777,
        "chown, even root's, drops setuid and setgid"
    );
    std::fs::remove_file(&file).expect("remove");
}

#[test]
fn a_mounted_cluster_behaves_like_a_file_system() {
    if let Some(why) = cannot_mount() {
        eprintln!("skipping the FUSE mount test: {why}");
        return;
    }
    let counts = REQUESTS.get_or_init(Arc::default);
    metrics::set_global_recorder(CountRequests(counts.clone())).expect("the only recorder");
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
    // Users other than root reach the mount too (setuid checks).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the temporary directory");
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
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        exercise(&mnt);
        creates_answer_the_stat_of_their_directory(&mnt, &fs, &runtime);
        missing_names_are_remembered_for_the_negative_ttl(&mnt, &fs, &runtime);
    }));
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
