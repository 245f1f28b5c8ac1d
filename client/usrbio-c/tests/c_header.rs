//! The C header against the built static library: `tests/smoke.c` is
//! compiled with the system's C compiler (`cc`, from build-essential, which
//! scripts/test installs), linked with `libflyfs_usrbio_c.a`, and run; its
//! error paths need no mount. tests/native_e2e.rs of the flyfs package runs
//! the same program against a real mount.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/<profile>`, where cargo put this package's static library.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// Compiles `tests/smoke.c` into `out`; returns the program's path.
pub fn build_smoke(out: &Path) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let program = out.join("smoke");
    // `cargo test` leaves it in deps/, `cargo build` also in the profile's
    // directory.
    let profile = profile_dir();
    let library = [profile.join("deps"), profile]
        .into_iter()
        .map(|dir| dir.join("libflyfs_usrbio_c.a"))
        .find(|path| path.exists())
        .expect("libflyfs_usrbio_c.a beside the test binary");
    let status = Command::new("cc")
        .arg("-std=c11")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(manifest.join("include"))
        .arg(manifest.join("tests/smoke.c"))
        .arg(&library)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&program)
        .status()
        .expect("run cc (build-essential)");
    assert!(status.success(), "cc failed on tests/smoke.c");
    program
}

#[test]
fn the_header_compiles_links_and_reports_errors() {
    let dir = tempfile_dir();
    let program = build_smoke(&dir);
    let out = Command::new(&program).output().expect("run smoke");
    assert!(
        out.status.success(),
        "smoke: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flyfs-c-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}
