//! The cluster manager (mgmtd): storage-node membership, targets, chains and
//! chain tables, and the public target states that drive CRAQ recovery.
//!
//! Split as "decide" and "do": [`transition`] (the 3FS state table and the
//! chain update, pure) and [`cluster`] (the state machine over the whole
//! cluster, pure, time passed in) decide; [`service`] drives them (RPC
//! dispatch, periodic ticks) and persists through a [`store::ClusterStore`]
//! before it publishes any change.

pub mod cluster;
pub mod service;
pub mod store;
pub mod transition;

pub use cluster::{Cluster, ClusterRecord, NodeRecord, TargetRecord};
pub use service::{MgmtConfig, MgmtService};
pub use store::{ClusterStore, FileStore, MemStore, StoreError};
pub use transition::{Predecessor, next_state, update_chain};
