//! Generates the VFIO bindings from the kernel's UAPI header
//! (`linux/vfio.h`, Debian's linux-libc-dev) and the RDMA verbs bindings from
//! rdma-core's `infiniband/verbs.h` (Debian's libibverbs-dev) with bindgen,
//! which needs libclang (Debian's libclang-dev); scripts/test installs them.

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
    verbs(&out);
}

/// The verbs bindings: every `ibv_*` type, and the exported functions the
/// RDMA transport calls as members of a struct that loads libibverbs at run
/// time (bindgen's dynamic loading over libloading). Linking libibverbs
/// instead would make every flyfs binary, TCP-only ones included, fail to
/// start where rdma-core is not installed. The data-path verbs
/// (`ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`, `ibv_req_notify_cq`) are
/// static inline functions in the header that call through
/// `context->ops`; they are not exported and so not listed here.
fn verbs(out: &std::path::Path) {
    println!("cargo:rerun-if-changed=verbs.h");
    let bindings = bindgen::Builder::default()
        .header("verbs.h")
        .allowlist_type("ibv_.*")
        .allowlist_var("IBV_.*")
        .allowlist_function(
            "ibv_(get_device_list|free_device_list|get_device_name|open_device|close_device\
             |alloc_pd|dealloc_pd|reg_mr|dereg_mr|create_comp_channel|destroy_comp_channel\
             |create_cq|destroy_cq|get_cq_event|ack_cq_events|create_qp|modify_qp|destroy_qp\
             |query_port|query_gid|wc_status_str)",
        )
        .dynamic_library_name("IbVerbs")
        .dynamic_link_require_all(true)
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(true)
        .generate()
        .expect("bindgen failed on verbs.h: is libibverbs-dev (infiniband/verbs.h) installed?");
    bindings
        .write_to_file(out.join("verbs.rs"))
        .expect("writing the verbs bindings into OUT_DIR");
}
