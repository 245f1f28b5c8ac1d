//! `infiniband/verbs.h` (rdma-core's libibverbs), as bindgen generates it at
//! build time: the `ibv_*` types and constants, and [`IbVerbs`], the exported
//! functions flyfs calls, loaded from `libibverbs.so.1` at run time rather
//! than linked, so that a flyfs binary starts on machines without rdma-core
//! (sys/build.rs says why). The data-path verbs are static inline functions in
//! the header, dispatching through the provider's `ibv_context_ops`; the safe
//! layer (flyfs-rdma) calls those function pointers itself.

#![allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    unsafe_op_in_unsafe_fn
)]

include!(concat!(env!("OUT_DIR"), "/verbs.rs"));

/// The soname the run-time loader looks for (Debian's libibverbs1; the
/// unversioned `libibverbs.so` comes only with the development package).
pub const LIBIBVERBS_SONAME: &str = "libibverbs.so.1";

#[cfg(test)]
mod tests {
    use super::*;

    /// The structs the data path hands to the provider have rdma-core's
    /// sizes on x86-64 (bindgen's layout tests check every field offset).
    #[test]
    fn structs_have_rdma_cores_sizes() {
        assert_eq!(core::mem::size_of::<ibv_sge>(), 16);
        assert_eq!(core::mem::size_of::<ibv_wc>(), 48);
        assert_eq!(core::mem::size_of::<ibv_recv_wr>(), 32);
        assert_eq!(core::mem::size_of::<ibv_send_wr>(), 128);
        assert_eq!(core::mem::size_of::<ibv_gid>(), 16);
    }

    /// The enum values the transport depends on are the header's.
    #[test]
    fn constants_are_the_headers() {
        assert_eq!(IBV_QPT_RC, 2);
        assert_eq!(IBV_QPS_RTS, 3);
        assert_eq!(IBV_WR_RDMA_READ, 4);
        assert_eq!(IBV_WC_SUCCESS, 0);
        assert_eq!(IBV_ACCESS_REMOTE_READ, 4);
    }
}
