//! Generates the VFIO bindings from the kernel's UAPI header
//! (`linux/vfio.h`, Debian's linux-libc-dev) with bindgen, which needs
//! libclang (Debian's libclang-dev); scripts/test installs both.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_type("vfio_.*")
        .allowlist_var("VFIO_.*|FLYFS_VFIO_.*")
        .use_core()
        .derive_default(true)
        .layout_tests(true)
        .generate()
        .expect("bindgen failed on wrapper.h: are linux-libc-dev (linux/vfio.h) and libclang-dev installed?");
    bindings
        .write_to_file(out.join("vfio.rs"))
        .expect("writing the VFIO bindings into OUT_DIR");
}
