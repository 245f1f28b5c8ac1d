//! The chunk engine's error type. Callers branch on the variants (a version
//! conflict is routine in CRAQ, a poisoned engine takes a target offline), so
//! each says precisely what failed, on which device and for which chunk.

use std::sync::Arc;

use flyfs_bypass::DeviceError;
use flyfs_proto::ids::ChunkVersion;

use crate::ChunkKey;
use crate::format::FormatError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("device {device}: {context}: {source}")]
    Device {
        device: Arc<str>,
        context: String,
        #[source]
        source: DeviceError,
    },
    #[error("device {device} holds no flyfs chunk engine ({source}); format it first")]
    NotFormatted {
        device: Arc<str>,
        #[source]
        source: FormatError,
    },
    #[error(
        "device {device} already holds a flyfs chunk engine{}; formatting again destroys it, so it needs --force",
        if *.damaged { " (with a damaged superblock)" } else { "" }
    )]
    AlreadyFormatted { device: Arc<str>, damaged: bool },
    #[error("device {device} is too small: {reason}")]
    TooSmall { device: Arc<str>, reason: String },
    #[error("device {device}: {what}{}", source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
    Corrupt {
        device: Arc<str>,
        what: String,
        #[source]
        source: Option<FormatError>,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The engine stopped: after a failed write or flush it refuses writes;
    /// after an internal fault (its journal thread panicked, or its device
    /// failed for good) it refuses reads too.
    #[error("engine on {device} is poisoned ({reason}); reopen it to recover")]
    Poisoned { device: Arc<str>, reason: Arc<str> },
    #[error("{key:?} does not exist")]
    NotFound { key: ChunkKey },
    #[error(
        "{key:?}: version {requested:?} conflicts (committed {committed:?}, pending {pending:?})"
    )]
    VersionConflict {
        key: ChunkKey,
        requested: ChunkVersion,
        committed: Option<ChunkVersion>,
        pending: Option<ChunkVersion>,
    },
    #[error("invalid request for {key:?}: {reason}")]
    InvalidRequest { key: ChunkKey, reason: String },
    #[error(
        "{key:?}: checksum mismatch in {what}: expected {expected:#010x}, computed {computed:#010x}"
    )]
    Checksum {
        key: ChunkKey,
        what: &'static str,
        expected: u32,
        computed: u32,
    },
    /// The bytes of a committed or pending version on the device do not
    /// match the CRC recorded when they were written: bit rot, a misdirected
    /// write, or a bug. Never served; another replica has a good copy.
    #[error(
        "{key:?} version {version:?} on {device} is corrupt: bytes {offset}..{end} of the chunk \
         (read for bytes {read_offset}..{read_end}) fail their CRC32C: expected {expected:#010x}, \
         computed {computed:#010x}"
    )]
    ChunkCorrupt {
        device: Arc<str>,
        key: ChunkKey,
        version: ChunkVersion,
        /// The range of the chunk the CRC covers.
        offset: u32,
        end: u32,
        /// The range the caller asked for (to read, or to write over a copy
        /// of the chunk).
        read_offset: u32,
        read_end: u32,
        expected: u32,
        computed: u32,
    },
    #[error("device {device} has no free {slot_bytes}-byte chunk slot")]
    NoSpace { device: Arc<str>, slot_bytes: u64 },
}

impl EngineError {
    /// True for errors that mean the device, not the request, is at fault.
    pub fn is_device_failure(&self) -> bool {
        matches!(
            self,
            EngineError::Device { .. } | EngineError::Poisoned { .. } | EngineError::Corrupt { .. }
        )
    }
}
