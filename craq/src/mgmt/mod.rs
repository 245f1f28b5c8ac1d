//! The cluster manager (mgmtd): storage-node membership, targets, chains and
//! chain tables, and the public target states that drive CRAQ recovery.
//!
//! Split as "decide" and "do": [`transition`] (the 3FS state table and the
//! chain update, pure) and [`cluster`] (the state machine over the whole
//! cluster, pure, time passed in) decide; [`service`] drives them (RPC
//! dispatch, periodic ticks, the lease that makes one manager the primary)
//! and persists through a [`store::ClusterStore`] before it publishes any
//! change. The callers' side (several manager addresses, calls
//! that find the primary) is flyfs-client's `mgmt`.

pub mod cluster;
mod kv_store;
pub mod service;
pub mod store;
pub mod transition;

pub use cluster::{Cluster, ClusterRecord, Leave, NodeRecord, TargetRecord};
pub use kv_store::KvClusterStore;
pub use service::{LeaseOptions, MgmtConfig, MgmtService};
pub use store::{
    ClusterStore, FileStore, LeaseFence, LeaseRecord, LeaseState, MemStore, StoreError,
    decode_record, encode_record, record_checksum,
};
pub use transition::{Predecessor, next_state, update_chain, update_chain_holding};
