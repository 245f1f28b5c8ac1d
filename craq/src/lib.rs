//! The storage service (CRAQ chain replication over chunk engines) and the
//! cluster manager. Their callers' side (storage client, manager client) is
//! flyfs-client.
//!
//! * [`mgmt`]: the cluster manager: membership, heartbeats, the target state
//!   machine, chains and chain tables, durable behind [`mgmt::store::ClusterStore`].
//! * [`storage`]: the storage node: targets on chunk engines, the CRAQ write
//!   path, apportioned reads, resync, self-fencing.
//! * `testing` (feature `testing`): storage nodes on memory devices for
//!   integration tests.
//!
//! Everything runs over [`flyfs_rpc::Network`], so the same code serves real
//! TCP between processes and turmoil's simulated network in the deterministic
//! cluster simulation.
#![deny(unsafe_code)]

pub mod mgmt;
pub mod placement;
pub mod storage;

pub use storage::service::StorageService;
pub use storage::sync::SyncReport;
pub use storage::{ScrubConfig, ScrubStats, StorageConfig, StorageNode};
#[cfg(feature = "testing")]
pub mod testing;
