//! The cluster manager (mgmtd): storage-node membership, targets, chains and
//! chain tables, and the public target states that drive CRAQ recovery.
//!
//! Split as "decide" and "do": [`transition`] (the 3FS state table and the
//! chain update, pure) and [`cluster`] (the state machine over the whole
//! cluster, pure, time passed in) decide; [`service`] drives them (RPC
//! dispatch, periodic ticks, the lease that makes one manager the primary)
//! and persists through a [`store::ClusterStore`] before it publishes any
//! change. [`managers`] is the callers' side: several manager addresses,
//! calls that find the primary.

pub mod cluster;
pub mod managers;
pub mod service;
pub mod store;
pub mod transition;

pub use cluster::{Cluster, ClusterRecord, NodeRecord, TargetRecord};
pub use managers::{ManagerError, Managers};
pub use service::{LeaseClock, LeaseOptions, MgmtConfig, MgmtService, TokioClock, WallClock};
pub use store::{
    ClusterStore, FileStore, LeaseFence, LeaseRecord, LeaseState, MemStore, StoreError,
    decode_record, encode_record, record_checksum,
};
pub use transition::{Predecessor, next_state, update_chain};

/// Asks the primary manager for the routing information, if it is newer
/// than `known` (`RoutingVersion(0)` asks for it whatever it is). Storage
/// nodes and clients both keep their routing fresh with this.
pub async fn fetch_routing<N: flyfs_rpc::Network>(
    rpc: &flyfs_rpc::Client<N>,
    managers: &Managers,
    known: flyfs_rpc::ids::RoutingVersion,
    options: &flyfs_rpc::CallOptions,
) -> Result<Option<flyfs_rpc::wire::mgmt::RoutingInfo>, ManagerError> {
    let req = flyfs_rpc::wire::mgmt::GetRoutingReq {
        known_version: known,
    };
    let rsp = managers
        .call::<flyfs_rpc::wire::mgmt::GetRouting, N>(rpc, &req, options)
        .await?;
    Ok(rsp.routing)
}
