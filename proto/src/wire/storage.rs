//! Messages of the storage service: client writes and reads, the CRAQ
//! forwarding between replicas of a chain, apportioned version queries, and
//! resync.
//!
//! Bulk data never travels inside these messages: a write's bytes are the
//! request's payload and a read's bytes the reply's payload, so a transport can
//! move them without copies (or, over RDMA, with one-sided operations).
//!
//! Every struct defaults its missing fields (`#[serde(default)]`), so a message
//! can gain fields without breaking older peers (docs/rpc-wire-format.md).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Method;
use crate::auth::Roles;
use crate::ids::{
    ChainId, ChainVersion, ChunkId, ChunkVersion, ClientId, InodeId, RequestId, TargetId,
};

/// Why a storage request failed. Clients branch on it: some errors mean
/// "refresh routing and retry", others are final.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StorageError {
    /// The sender's chain version differs from the receiver's.
    #[error("stale chain version for {chain}: request has {request:?}, target has {current:?}")]
    StaleChainVersion {
        chain: ChainId,
        request: ChainVersion,
        current: ChainVersion,
    },
    /// This node hosts no target of the chain.
    #[error("no target of {chain} on this node")]
    NoSuchChain { chain: ChainId },
    /// The target exists but may not serve this request in its state (or has
    /// fenced itself off, or its lease with the manager lapsed).
    #[error("{target} of {chain} cannot serve this request: {reason}")]
    NotServing {
        chain: ChainId,
        target: TargetId,
        reason: String,
    },
    /// A client write reached a target that is not the chain's head.
    #[error("{target} is not the head of {chain}")]
    NotHead { chain: ChainId, target: TargetId },
    /// The payload's CRC32C differs from the one the sender computed.
    #[error("payload checksum mismatch: sender said {expected:#010x}, data has {actual:#010x}")]
    PayloadChecksum { expected: u32, actual: u32 },
    /// A successor's whole-chunk checksum differs from the head's after a
    /// forwarded update: the replicas diverged.
    #[error(
        "replicas of {chunk:?} diverged at {version:?}: this target has {local:#010x}, successor has {successor:#010x}"
    )]
    ReplicaMismatch {
        chunk: ChunkId,
        version: ChunkVersion,
        local: u32,
        successor: u32,
    },
    /// A forwarded update does not apply on top of the successor's committed
    /// version; the predecessor must send the whole chunk instead.
    #[error("{chunk:?}: successor has {have:?}, cannot apply an update to {want:?}")]
    NeedWholeChunk {
        chunk: ChunkId,
        have: ChunkVersion,
        want: ChunkVersion,
    },
    /// The request cannot be forwarded down the chain right now.
    #[error("forwarding {chunk:?} down {chain} failed: {reason}")]
    ForwardFailed {
        chain: ChainId,
        chunk: ChunkId,
        reason: String,
    },
    /// A retry of a request whose first attempt is still running.
    #[error("request {seq} of channel {channel} is still in progress")]
    InProgress { channel: u32, seq: u64 },
    /// A retry of a request older than the last one the channel finished.
    #[error("request {seq} of channel {channel} is older than the last finished one ({last})")]
    StaleSequence { channel: u32, seq: u64, last: u64 },
    /// The request is malformed (bad range, oversize chunk, ...).
    #[error("invalid request: {reason}")]
    Invalid { reason: String },
    /// The chunk engine refused or failed.
    #[error("chunk engine: {message}")]
    Engine { message: String },
    #[error("no space left on the target's device")]
    NoSpace,
}

impl StorageError {
    /// Whether a client should refresh its routing information and retry.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StorageError::StaleChainVersion { .. }
                | StorageError::NoSuchChain { .. }
                | StorageError::NotServing { .. }
                | StorageError::NotHead { .. }
                | StorageError::ForwardFailed { .. }
                | StorageError::InProgress { .. }
                | StorageError::ReplicaMismatch { .. }
        )
    }
}

/// Identifies one sender of exactly-once requests: a client keeps a few
/// channels, each with one request in flight at a time and a sequence number
/// that grows by one per request. The head remembers the last sequence number
/// and result per channel, so a retried write is applied at most once.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(default)]
pub struct Channel {
    pub client: ClientId,
    pub id: u32,
    pub seq: u64,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} channel {} seq {}", self.client, self.id, self.seq)
    }
}

/// What a client write does to a chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOp {
    /// Write the payload at `offset`; `crc` is the payload's CRC32C.
    Write { offset: u32, crc: u32 },
    /// Cut the chunk to `len` bytes or extend it with zeros.
    Truncate { len: u32 },
    /// Remove the chunk.
    #[default]
    Remove,
}

/// A client's update of one chunk, sent to the chain's head.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WriteReq {
    pub chain: ChainId,
    pub chain_version: ChainVersion,
    pub chunk: ChunkId,
    pub op: WriteOp,
    /// The file's chunk size: no write may make the chunk longer.
    pub chunk_size: u32,
    pub channel: Channel,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WriteRsp {
    /// The committed version the write produced (0 after a remove).
    pub version: ChunkVersion,
    pub chunk_len: u32,
    pub chunk_crc: u32,
}

/// How an update travels from a replica to its successor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardOp {
    /// The client's update (payload = the written bytes).
    Write {
        offset: u32,
        crc: u32,
    },
    Truncate {
        len: u32,
    },
    /// The whole chunk (payload), for a syncing successor, a resync transfer,
    /// or a successor that answered `NeedWholeChunk`.
    Replace {
        crc: u32,
    },
    #[default]
    Remove,
}

/// An update forwarded down the chain, with the version every replica must
/// create.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ForwardReq {
    pub chain: ChainId,
    pub chain_version: ChainVersion,
    pub chunk: ChunkId,
    pub version: ChunkVersion,
    pub op: ForwardOp,
    pub chunk_size: u32,
    /// The client's channel, so every replica learns the sequence number and
    /// a new head after a failure still applies a retry at most once.
    pub channel: Channel,
    /// A resync transfer: the receiver commits it at once (it is the tail of
    /// the resync) and does not forward it.
    pub sync: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ForwardRsp {
    /// The successor's whole committed chunk after the update.
    pub chunk_len: u32,
    pub chunk_crc: u32,
}

/// One range of one chunk to read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReadItem {
    pub chain: ChainId,
    pub chain_version: ChainVersion,
    pub chunk: ChunkId,
    pub offset: u32,
    pub len: u32,
    /// Check the whole chunk's CRC32C before answering.
    pub verify: bool,
    /// The caller holds these bytes of the version this stamp names (a
    /// client's block cache): when that version is still the committed one,
    /// the replica answers [`ReadResult::unchanged`] with no bytes, and does
    /// not read its device.
    pub if_changed_from: Option<ChunkStamp>,
}

/// What names one committed version of a chunk on every replica of its
/// chain: the version with the length, CRC32C and update that made it
/// (client and request id). A version number alone repeats once a chunk is
/// removed (a file shrunk) and written again; the update that made a
/// version never does, as a channel's request ids are used once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChunkStamp {
    pub version: ChunkVersion,
    pub len: u32,
    pub crc: u32,
    pub client: ClientId,
    pub request: RequestId,
}

/// Several reads served by one replica in one round trip.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchReadReq {
    pub items: Vec<ReadItem>,
}

impl BatchReadReq {
    /// Items one batch may hold. A replica serves a batch's items a few at
    /// a time, in one task, so this bounds the work one request can queue
    /// on it.
    pub const ITEMS_MAX: usize = 4096;
    /// Bytes one batch may ask for (its items' lengths added up): the reply
    /// carries them as one payload, which must fit the default frame limit.
    pub const BYTES_MAX: u64 = 64 << 20;

    /// The bytes the batch asks for.
    pub fn bytes_requested(&self) -> u64 {
        self.items.iter().map(|item| u64::from(item.len)).sum()
    }

    /// Whether the batch is within [`ITEMS_MAX`](Self::ITEMS_MAX) and
    /// [`BYTES_MAX`](Self::BYTES_MAX); the error names the limit and its value.
    pub fn check_limits(&self) -> Result<(), String> {
        if self.items.len() > Self::ITEMS_MAX {
            return Err(format!(
                "batch of {} reads is over the limit batch_read_items_max = {}",
                self.items.len(),
                Self::ITEMS_MAX
            ));
        }
        let bytes = self.bytes_requested();
        if bytes > Self::BYTES_MAX {
            return Err(format!(
                "batch asks for {bytes} bytes, over the limit batch_read_bytes_max = {}",
                Self::BYTES_MAX
            ));
        }
        Ok(())
    }

    /// Packs reads, in order, into as few batches within the limits as
    /// possible; each read travels with a tag of the caller's (its index in
    /// a larger request, say), returned beside its batch in the same order.
    /// A read larger than [`BYTES_MAX`](Self::BYTES_MAX) alone gets a batch
    /// of its own, which a replica refuses.
    pub fn pack<T>(reads: impl IntoIterator<Item = (T, ReadItem)>) -> Vec<(Vec<T>, BatchReadReq)> {
        let mut batches: Vec<(Vec<T>, BatchReadReq, u64)> = Vec::new();
        for (tag, item) in reads {
            let len = u64::from(item.len);
            let fits = batches.last().is_some_and(|(_, batch, bytes)| {
                batch.items.len() < Self::ITEMS_MAX && bytes + len <= Self::BYTES_MAX
            });
            if !fits {
                batches.push((Vec::new(), BatchReadReq::default(), 0));
            }
            if let Some((tags, batch, bytes)) = batches.last_mut() {
                tags.push(tag);
                batch.items.push(item);
                *bytes += len;
            }
        }
        batches
            .into_iter()
            .map(|(tags, batch, _)| (tags, batch))
            .collect()
    }
}

/// What one read returned: its bytes are the next `len` bytes of the reply's
/// payload. A chunk that does not exist reads as `len` 0, `version` 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReadResult {
    pub len: u32,
    pub version: ChunkVersion,
    pub chunk_len: u32,
    /// The version read, when it is the replica's committed one (not when a
    /// replica with a pending version served the version the tail named):
    /// bytes a client keeps are checked against it
    /// ([`ReadItem::if_changed_from`]). `None` from older replicas.
    pub stamp: Option<ChunkStamp>,
    /// The stamp in [`ReadItem::if_changed_from`] is still the committed
    /// version: `len` is 0 and no bytes follow; the caller's are current.
    pub unchanged: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchReadRsp {
    pub results: Vec<Result<ReadResult, StorageError>>,
}

/// CRAQ's apportioned query: a replica holding a pending version asks the
/// tail which version is committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueryVersionReq {
    pub chain: ChainId,
    pub chain_version: ChainVersion,
    pub chunk: ChunkId,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueryVersionRsp {
    /// The tail's committed version; 0 when the chunk does not exist there.
    pub committed: ChunkVersion,
}

/// Metadata of one chunk replica, as a resync compares it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChunkMetaInfo {
    pub chunk: ChunkId,
    pub version: ChunkVersion,
    pub chain_version: ChainVersion,
    pub len: u32,
    pub crc: u32,
    /// A pending version, if an update is in flight.
    pub pending: Option<ChunkVersion>,
}

/// Where a file's data ends on one chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LastChunkReq {
    pub chain: ChainId,
    pub chain_version: ChainVersion,
    pub inode: InodeId,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LastChunkRsp {
    pub last: Option<ChunkMetaInfo>,
}

/// A page of a target's chunk metadata, for a resync's diff.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DumpMetaReq {
    pub chain: ChainId,
    pub chain_version: ChainVersion,
    /// Start after this chunk (exclusive); `None` from the beginning.
    pub after: Option<ChunkId>,
    pub limit: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DumpMetaRsp {
    pub chunks: Vec<ChunkMetaInfo>,
    /// Whether more chunks follow the last one returned.
    pub more: bool,
}

/// A whole committed chunk, asked of a healthy replica by one whose copy
/// has rotted (the scrubber's repair). The reply's payload is the chunk's
/// bytes; the receiver checks them against `len` and `crc` before it
/// installs them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FetchChunkReq {
    pub chain: ChainId,
    pub chain_version: ChainVersion,
    pub chunk: ChunkId,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FetchChunkRsp {
    /// The committed version sent; 0 when the chunk does not exist there
    /// (and the payload is empty).
    pub version: ChunkVersion,
    pub chain_version: ChainVersion,
    /// Length and CRC32C of the whole chunk, as the sender's engine recorded
    /// them when the version was written (and checked when it read them).
    pub len: u32,
    pub crc: u32,
}

/// Sent by a predecessor when a resync has transferred everything: the
/// receiver reports itself up to date from now on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncDoneReq {
    pub chain: ChainId,
    pub chain_version: ChainVersion,
    /// The predecessor's exactly-once memory of this chain: the last
    /// finished request of every client channel and its result. A target that
    /// lost its memory (it restarted) must learn it before it may become a
    /// head, or it would apply a client's retry a second time.
    /// Sent in pages of at most [`CHANNELS_PER_PAGE`](Self::CHANNELS_PER_PAGE)
    /// entries: every page but the last says `more`, and the receiver counts
    /// itself up to date only at the last.
    pub channels: Vec<(Channel, WriteRsp)>,
    /// More pages of `channels` follow; this one ends nothing.
    pub more: bool,
}

impl SyncDoneReq {
    /// Entries of the channel table per page: a page of the largest entries
    /// encodes to under a quarter of the default 1 MiB body limit (a test
    /// checks it), so a table of any size crosses in bounded messages.
    pub const CHANNELS_PER_PAGE: usize = 2048;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpaceReq {}

/// Space of one device of a storage node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskSpace {
    pub disk: u32,
    pub data_bytes: u64,
    pub allocated_bytes: u64,
    pub committed_chunks: u64,
    /// Whether the device's engine refuses writes after a failed write or
    /// flush.
    pub poisoned: bool,
    /// Chunks (and the sum of their lengths) of replicas the node no longer
    /// hosts on this device, moved or drained away, that it is freeing
    /// (included in the figures above). 0 from an older node, which never
    /// frees them.
    pub freeing_chunks: u64,
    pub freeing_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpaceRsp {
    pub disks: Vec<DiskSpace>,
}

macro_rules! method {
    ($(#[$doc:meta])* $name:ident = $id:literal, $req:ty => $rsp:ty, roles $roles:expr $(, payload checked $checked:literal)?) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name;

        impl Method for $name {
            const ID: u16 = $id;
            const NAME: &'static str = concat!("storage.", stringify!($name));
            type Req = $req;
            type Rsp = $rsp;
            const ROLES: Roles = $roles;
            $(const PAYLOAD_CHECKED_BY_SERVICE: bool = $checked;)?
        }
    };
}

method!(
    /// A client's update of a chunk, at the chain's head. The engine checks
    /// the data against the client's CRC32C at every replica.
    Write = 400, WriteReq => Result<WriteRsp, StorageError>,
    roles Roles::CLIENT.or(Roles::META), payload checked true
);
method!(
    /// An update forwarded from a replica to its successor (data checked
    /// by the successor's engine, as for `Write`).
    Forward = 401, ForwardReq => Result<ForwardRsp, StorageError>,
    roles Roles::STORAGE, payload checked true
);
method!(
    /// Reads of many chunks from one replica.
    BatchRead = 402, BatchReadReq => BatchReadRsp,
    roles Roles::CLIENT
);
method!(
    /// The committed version of a chunk, asked of the tail.
    QueryVersion = 403, QueryVersionReq => Result<QueryVersionRsp, StorageError>,
    roles Roles::STORAGE
);
method!(
    /// The last chunk of a file on one chain.
    LastChunk = 404, LastChunkReq => Result<LastChunkRsp, StorageError>,
    roles Roles::CLIENT.or(Roles::META).or(Roles::ADMIN)
);
method!(
    /// A page of a target's chunk metadata (resync; operators inspecting a
    /// replica).
    DumpMeta = 405, DumpMetaReq => Result<DumpMetaRsp, StorageError>,
    roles Roles::STORAGE.or(Roles::ADMIN)
);
method!(
    /// The end of a resync.
    SyncDone = 406, SyncDoneReq => Result<(), StorageError>,
    roles Roles::STORAGE
);
method!(
    /// A whole committed chunk from a healthy replica, to repair a rotten
    /// copy (the scrubber).
    FetchChunk = 408, FetchChunkReq => Result<FetchChunkRsp, StorageError>,
    roles Roles::STORAGE
);
method!(
    /// Space of every device of a node.
    Space = 407, SpaceReq => SpaceRsp,
    roles Roles::META.or(Roles::ADMIN)
);

#[cfg(test)]
mod tests {
    use super::*;

    fn read(len: u32) -> ReadItem {
        ReadItem {
            len,
            ..ReadItem::default()
        }
    }

    #[test]
    fn a_sync_done_page_fits_well_inside_the_body_limit() {
        let largest = (
            Channel {
                client: ClientId(u64::MAX),
                id: u32::MAX,
                seq: u64::MAX,
            },
            WriteRsp {
                version: ChunkVersion(u32::MAX),
                chunk_len: u32::MAX,
                chunk_crc: u32::MAX,
            },
        );
        let page = SyncDoneReq {
            chain: ChainId(u32::MAX),
            chain_version: ChainVersion(u32::MAX),
            channels: vec![largest; SyncDoneReq::CHANNELS_PER_PAGE],
            more: true,
        };
        let bytes = crate::codec::encode(&page).len();
        let limit = crate::frame::FrameLimits::default().body_bytes_max as usize;
        assert!(bytes < limit / 4, "{bytes} bytes");
    }

    #[test]
    fn batch_reads_pack_within_the_limits() {
        let many = BatchReadReq::pack((0..BatchReadReq::ITEMS_MAX * 2 + 1).map(|i| (i, read(1))));
        assert_eq!(many.len(), 3);
        assert!(many.iter().all(|(_, batch)| batch.check_limits().is_ok()));
        let tags: Vec<usize> = many.iter().flat_map(|(tags, _)| tags.clone()).collect();
        assert_eq!(
            tags,
            (0..BatchReadReq::ITEMS_MAX * 2 + 1).collect::<Vec<_>>()
        );

        let mib = 1 << 20;
        let big = BatchReadReq::pack((0..130).map(|i| (i, read(mib))));
        assert_eq!(
            big.iter().map(|(tags, _)| tags.len()).collect::<Vec<_>>(),
            vec![64, 64, 2]
        );
        assert!(big.iter().all(|(_, batch)| batch.check_limits().is_ok()));

        let over = BatchReadReq {
            items: vec![read(u32::MAX), read(1)],
        };
        let error = over.check_limits().expect_err("over the byte limit");
        assert!(error.contains("batch_read_bytes_max = 67108864"), "{error}");
        let too_many = BatchReadReq {
            items: vec![read(0); BatchReadReq::ITEMS_MAX + 1],
        };
        let error = too_many.check_limits().expect_err("over the item limit");
        assert!(error.contains("batch_read_items_max = 4096"), "{error}");
        assert!(BatchReadReq::pack(Vec::<(usize, ReadItem)>::new()).is_empty());
    }

    #[test]
    fn retryable_errors_are_the_routing_ones() {
        let stale = StorageError::StaleChainVersion {
            chain: ChainId(1),
            request: ChainVersion(1),
            current: ChainVersion(2),
        };
        assert!(stale.is_retryable());
        assert!(!StorageError::NoSpace.is_retryable());
        assert!(
            !StorageError::PayloadChecksum {
                expected: 1,
                actual: 2
            }
            .is_retryable()
        );
    }

    #[test]
    fn errors_name_what_was_wrong() {
        let e = StorageError::NeedWholeChunk {
            chunk: ChunkId::new(5, 1),
            have: ChunkVersion(2),
            want: ChunkVersion(4),
        };
        assert_eq!(
            e.to_string(),
            "ino 0x5 #1: successor has v 2, cannot apply an update to v 4"
        );
    }
}
