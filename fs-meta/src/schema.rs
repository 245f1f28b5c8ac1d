//! The metadata schema: every key the namespace writes into the KV store and
//! the bytes of every value, with decoders that never panic.
//!
//! The key layout follows 3FS's FoundationDB schema (docs/metadata-schema.md
//! has the byte diagrams, invariants and version log): a four-byte tag, then
//! ids. Inode ids are little endian inside keys so that sequentially
//! allocated ids land far apart in key order and spread over FoundationDB
//! shards; the GC queue's due time is big endian so that the queue is sorted
//! by time and "what is due" is one range read.
//!
//! Every value is one version byte ([`VALUE_VERSION`]) followed by a
//! MessagePack map with named fields, decoded by `flyfs_proto::codec` (depth
//! capped, no unbounded allocation). Every field has a default and unknown
//! fields are ignored, so a field can be added without a format change.
//! Decoding checks what the namespace relies on (a file has a valid layout, a
//! mode has no type bits) and names the key in its error.

use flyfs_proto::codec;
use flyfs_proto::ids::InodeId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ns::NsError;
use crate::ns::layout::{LayoutSpec, StoredLayout};

/// The first byte of every value.
pub const VALUE_VERSION: u8 = 1;
/// The namespace format recorded under the format key.
pub const FORMAT_VERSION: u32 = 1;
/// The root directory. Id 0 is never used; ids below [`FIRST_ALLOCATED_ID`]
/// are reserved.
pub const ROOT: InodeId = InodeId(1);
/// The first id the allocator hands out (see `ns::alloc`).
pub const FIRST_ALLOCATED_ID: u64 = 4096;
/// Longest name of a directory entry (NAME_MAX).
pub const NAME_BYTES_MAX: usize = 255;
/// Longest path `resolve` accepts (PATH_MAX, counting the NUL a C caller
/// would need).
pub const PATH_BYTES_MAX: usize = 4096;
/// Longest symlink target (PATH_MAX without the NUL).
pub const SYMLINK_TARGET_BYTES_MAX: usize = 4095;
/// Longest extended attribute name (XATTR_NAME_MAX).
pub const XATTR_NAME_BYTES_MAX: usize = 255;
/// Largest extended attribute value (XATTR_SIZE_MAX).
pub const XATTR_VALUE_BYTES_MAX: usize = 65536;
/// Permission bits, setuid, setgid and sticky; the file type is not stored
/// in the mode (it is the inode's kind).
pub const MODE_MASK: u32 = 0o7777;

// Every key and value fits FoundationDB's limits (10,000-byte keys,
// 100,000-byte values) with room to spare.
const _: () = assert!(4 + 8 + NAME_BYTES_MAX < 10_000);
const _: () = assert!(XATTR_VALUE_BYTES_MAX + 64 < 100_000);

/// Key tags. Each is four bytes except the GC queue's, and none is a prefix
/// of another, so every tag's keys form one contiguous range.
pub mod tag {
    pub const INODE: &[u8] = b"INOD";
    pub const DENTRY: &[u8] = b"DENT";
    pub const SESSION: &[u8] = b"INOS";
    pub const XATTR: &[u8] = b"XATR";
    pub const GC: &[u8] = b"GCQ";
    pub const DIR_TIMES: &[u8] = b"DTIM";
    pub const ALLOC: &[u8] = b"IDAL";
    pub const LEASE: &[u8] = b"CLNT";
    pub const META: &[u8] = b"META";
    /// The KV cache's keys (docs/kv-cache.md): its record, the counters of
    /// never-used slots, the index entries, the slot states, the free
    /// lists, the access order and the reservations.
    pub const KV_CACHE: &[u8] = b"KVCF";
    pub const KV_FRESH: &[u8] = b"KVFS";
    pub const KV_ENTRY: &[u8] = b"KVIX";
    pub const KV_SLOT: &[u8] = b"KVSL";
    pub const KV_FREE: &[u8] = b"KVFR";
    pub const KV_ACCESS: &[u8] = b"KVAG";
    pub const KV_RESERVED: &[u8] = b"KVRS";
}

/// The KV cache record key's suffix after [`tag::KV_CACHE`].
const KV_CACHE_SUFFIX: &[u8] = b"cache";

/// The longest KV cache key: a hash of a token prefix with whatever a
/// framework adds (model, rank), far below FoundationDB's key limit even
/// inside the access-order key.
pub const KV_KEY_BYTES_MAX: usize = 512;
const _: () = assert!(4 + 1 + 8 + KV_KEY_BYTES_MAX < 10_000);

/// The format key's suffix after [`tag::META`].
const FORMAT_SUFFIX: &[u8] = b"format";

fn key_of(tag: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let len = tag.len() + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut key = Vec::with_capacity(len);
    key.extend_from_slice(tag);
    for part in parts {
        key.extend_from_slice(part);
    }
    key
}

/// `INOD` + inode (8 bytes LE).
pub fn inode_key(ino: InodeId) -> Vec<u8> {
    key_of(tag::INODE, &[&ino.0.to_le_bytes()])
}

/// `DTIM` + directory (8 bytes LE): when an entry of the directory last
/// changed. Written blindly by every entry change instead of the
/// directory's inode, so entry changes in one directory never conflict over
/// its modification time.
pub fn dir_times_key(dir: InodeId) -> Vec<u8> {
    key_of(tag::DIR_TIMES, &[&dir.0.to_le_bytes()])
}

/// `DENT` + parent (8 bytes LE) + name.
pub fn dentry_key(parent: InodeId, name: &[u8]) -> Vec<u8> {
    key_of(tag::DENTRY, &[&parent.0.to_le_bytes(), name])
}

/// The prefix of every entry of directory `parent`.
pub fn dentry_prefix(parent: InodeId) -> Vec<u8> {
    key_of(tag::DENTRY, &[&parent.0.to_le_bytes()])
}

/// `INOS` + inode (8 bytes LE) + session (8 bytes BE).
pub fn session_key(ino: InodeId, session: SessionId) -> Vec<u8> {
    key_of(
        tag::SESSION,
        &[&ino.0.to_le_bytes(), &session.0.to_be_bytes()],
    )
}

/// The prefix of every write session of `ino`.
pub fn session_prefix(ino: InodeId) -> Vec<u8> {
    key_of(tag::SESSION, &[&ino.0.to_le_bytes()])
}

/// `XATR` + inode (8 bytes LE) + name.
pub fn xattr_key(ino: InodeId, name: &[u8]) -> Vec<u8> {
    key_of(tag::XATTR, &[&ino.0.to_le_bytes(), name])
}

/// The prefix of every extended attribute of `ino`.
pub fn xattr_prefix(ino: InodeId) -> Vec<u8> {
    key_of(tag::XATTR, &[&ino.0.to_le_bytes()])
}

/// `GCQ` + due time (ms since the epoch, 8 bytes BE) + inode (8 bytes LE).
pub fn gc_key(due_ms: u64, ino: InodeId) -> Vec<u8> {
    key_of(tag::GC, &[&due_ms.to_be_bytes(), &ino.0.to_le_bytes()])
}

/// `CLNT` + client (8 bytes BE): the lease of a client's write sessions.
/// Big endian, unlike inode ids: client ids are random, so they spread over
/// the key space anyway, and the reaper reads them all in order.
pub fn lease_key(client: u64) -> Vec<u8> {
    key_of(tag::LEASE, &[&client.to_be_bytes()])
}

/// `IDAL` + shard (1 byte).
pub fn alloc_key(shard: u8) -> Vec<u8> {
    key_of(tag::ALLOC, &[&[shard]])
}

/// `META` + `format`.
pub fn format_key() -> Vec<u8> {
    key_of(tag::META, &[FORMAT_SUFFIX])
}

/// `KVCF` + `cache`: the KV cache's record (its classes and slot files).
pub fn kv_cache_key() -> Vec<u8> {
    key_of(tag::KV_CACHE, &[KV_CACHE_SUFFIX])
}

/// `KVFS` + class (1 byte): how many of the class's slots were ever used.
pub fn kv_fresh_key(class: u8) -> Vec<u8> {
    key_of(tag::KV_FRESH, &[&[class]])
}

/// `KVIX` + key (1..=512 bytes): a block's index entry.
pub fn kv_entry_key(key: &[u8]) -> Vec<u8> {
    key_of(tag::KV_ENTRY, &[key])
}

/// `KVSL` + class (1 byte) + slot (4 bytes BE): a used slot's state.
pub fn kv_slot_key(class: u8, slot: u32) -> Vec<u8> {
    key_of(tag::KV_SLOT, &[&[class], &slot.to_be_bytes()])
}

/// `KVFR` + class + freed at (ms, 8 bytes BE) + slot (4 bytes BE): the free
/// list, oldest freed first.
pub fn kv_free_key(class: u8, freed_ms: u64, slot: u32) -> Vec<u8> {
    key_of(
        tag::KV_FREE,
        &[&[class], &freed_ms.to_be_bytes(), &slot.to_be_bytes()],
    )
}

/// `KVAG` + class + accessed at (ms, 8 bytes BE) + key: the eviction order,
/// least recently accessed first.
pub fn kv_access_key(class: u8, access_ms: u64, key: &[u8]) -> Vec<u8> {
    key_of(tag::KV_ACCESS, &[&[class], &access_ms.to_be_bytes(), key])
}

/// `KVRS` + class + expires at (ms, 8 bytes BE) + slot (4 bytes BE): the
/// reservations, soonest expiring first.
pub fn kv_reserved_key(class: u8, until_ms: u64, slot: u32) -> Vec<u8> {
    key_of(
        tag::KV_RESERVED,
        &[&[class], &until_ms.to_be_bytes(), &slot.to_be_bytes()],
    )
}

/// The prefix of one class's keys under `tag` (free list, access order,
/// reservations).
pub fn kv_class_prefix(tag: &[u8], class: u8) -> Vec<u8> {
    key_of(tag, &[&[class]])
}

/// A write session of one file, chosen by the namespace when a file is
/// opened for writing.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u64);

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "session {:#x}", self.0)
    }
}

/// A key, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Inode(InodeId),
    Dentry {
        parent: InodeId,
        name: Vec<u8>,
    },
    Session {
        ino: InodeId,
        session: SessionId,
    },
    Xattr {
        ino: InodeId,
        name: Vec<u8>,
    },
    Gc {
        due_ms: u64,
        ino: InodeId,
    },
    DirTimes(InodeId),
    Alloc {
        shard: u8,
    },
    Lease {
        client: u64,
    },
    Format,
    KvCache,
    KvFresh {
        class: u8,
    },
    KvEntry {
        key: Vec<u8>,
    },
    KvSlot {
        class: u8,
        slot: u32,
    },
    KvFree {
        class: u8,
        freed_ms: u64,
        slot: u32,
    },
    KvAccess {
        class: u8,
        access_ms: u64,
        key: Vec<u8>,
    },
    KvReserved {
        class: u8,
        until_ms: u64,
        slot: u32,
    },
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Inode(ino) => write!(f, "INOD {ino:?}"),
            Key::Dentry { parent, name } => {
                write!(f, "DENT {parent:?} {:?}", String::from_utf8_lossy(name))
            }
            Key::Session { ino, session } => write!(f, "INOS {ino:?} {session:?}"),
            Key::Xattr { ino, name } => {
                write!(f, "XATR {ino:?} {:?}", String::from_utf8_lossy(name))
            }
            Key::Gc { due_ms, ino } => write!(f, "GCQ due {due_ms} ms {ino:?}"),
            Key::DirTimes(ino) => write!(f, "DTIM {ino:?}"),
            Key::Alloc { shard } => write!(f, "IDAL shard {shard}"),
            Key::Lease { client } => write!(f, "CLNT client {client:#x}"),
            Key::Format => write!(f, "META format"),
            Key::KvCache => write!(f, "KVCF cache"),
            Key::KvFresh { class } => write!(f, "KVFS class {class}"),
            Key::KvEntry { key } => write!(f, "KVIX key {}", hex(key)),
            Key::KvSlot { class, slot } => write!(f, "KVSL class {class} slot {slot}"),
            Key::KvFree {
                class,
                freed_ms,
                slot,
            } => write!(f, "KVFR class {class} freed {freed_ms} ms slot {slot}"),
            Key::KvAccess {
                class,
                access_ms,
                key,
            } => write!(f, "KVAG class {class} at {access_ms} ms key {}", hex(key)),
            Key::KvReserved {
                class,
                until_ms,
                slot,
            } => write!(f, "KVRS class {class} until {until_ms} ms slot {slot}"),
        }
    }
}

fn u64_le(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

fn u64_be(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn u32_be(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

impl Key {
    /// The key's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Key::Inode(ino) => inode_key(*ino),
            Key::Dentry { parent, name } => dentry_key(*parent, name),
            Key::Session { ino, session } => session_key(*ino, *session),
            Key::Xattr { ino, name } => xattr_key(*ino, name),
            Key::Gc { due_ms, ino } => gc_key(*due_ms, *ino),
            Key::DirTimes(ino) => dir_times_key(*ino),
            Key::Alloc { shard } => alloc_key(*shard),
            Key::Lease { client } => lease_key(*client),
            Key::Format => format_key(),
            Key::KvCache => kv_cache_key(),
            Key::KvFresh { class } => kv_fresh_key(*class),
            Key::KvEntry { key } => kv_entry_key(key),
            Key::KvSlot { class, slot } => kv_slot_key(*class, *slot),
            Key::KvFree {
                class,
                freed_ms,
                slot,
            } => kv_free_key(*class, *freed_ms, *slot),
            Key::KvAccess {
                class,
                access_ms,
                key,
            } => kv_access_key(*class, *access_ms, key),
            Key::KvReserved {
                class,
                until_ms,
                slot,
            } => kv_reserved_key(*class, *until_ms, *slot),
        }
    }
}

/// Decodes a key; an error says what was wrong with it.
pub fn parse_key(key: &[u8]) -> Result<Key, DecodeError> {
    let bad = |reason: &str| DecodeError {
        key: hex(key),
        reason: reason.to_string(),
    };
    let (tag, rest) = if key.starts_with(tag::GC) {
        key.split_at(tag::GC.len())
    } else if key.len() >= 4 {
        key.split_at(4)
    } else {
        return Err(bad("shorter than a tag"));
    };
    let id = |bytes: &[u8]| u64_le(bytes).map(InodeId);
    let parsed = match tag {
        t if t == tag::INODE => id(rest).map(Key::Inode),
        t if t == tag::DIR_TIMES => id(rest).map(Key::DirTimes),
        t if t == tag::DENTRY && rest.len() > 8 => Some(Key::Dentry {
            parent: id(&rest[..8]).ok_or_else(|| bad("bad parent id"))?,
            name: rest[8..].to_vec(),
        }),
        t if t == tag::SESSION && rest.len() == 16 => Some(Key::Session {
            ino: id(&rest[..8]).ok_or_else(|| bad("bad inode id"))?,
            session: SessionId(u64_be(&rest[8..]).ok_or_else(|| bad("bad session id"))?),
        }),
        t if t == tag::XATTR && rest.len() > 8 => Some(Key::Xattr {
            ino: id(&rest[..8]).ok_or_else(|| bad("bad inode id"))?,
            name: rest[8..].to_vec(),
        }),
        t if t == tag::GC && rest.len() == 16 => Some(Key::Gc {
            due_ms: u64_be(&rest[..8]).ok_or_else(|| bad("bad due time"))?,
            ino: id(&rest[8..]).ok_or_else(|| bad("bad inode id"))?,
        }),
        t if t == tag::ALLOC && rest.len() == 1 => Some(Key::Alloc { shard: rest[0] }),
        t if t == tag::LEASE && rest.len() == 8 => Some(Key::Lease {
            client: u64_be(rest).ok_or_else(|| bad("bad client id"))?,
        }),
        t if t == tag::META && rest == FORMAT_SUFFIX => Some(Key::Format),
        t if t == tag::KV_CACHE && rest == KV_CACHE_SUFFIX => Some(Key::KvCache),
        t if t == tag::KV_FRESH && rest.len() == 1 => Some(Key::KvFresh { class: rest[0] }),
        t if t == tag::KV_ENTRY && (1..=KV_KEY_BYTES_MAX).contains(&rest.len()) => {
            Some(Key::KvEntry { key: rest.to_vec() })
        }
        t if t == tag::KV_SLOT && rest.len() == 5 => Some(Key::KvSlot {
            class: rest[0],
            slot: u32_be(&rest[1..]).ok_or_else(|| bad("bad slot"))?,
        }),
        t if t == tag::KV_FREE && rest.len() == 13 => Some(Key::KvFree {
            class: rest[0],
            freed_ms: u64_be(&rest[1..9]).ok_or_else(|| bad("bad time"))?,
            slot: u32_be(&rest[9..]).ok_or_else(|| bad("bad slot"))?,
        }),
        t if t == tag::KV_ACCESS && (10..=9 + KV_KEY_BYTES_MAX).contains(&rest.len()) => {
            Some(Key::KvAccess {
                class: rest[0],
                access_ms: u64_be(&rest[1..9]).ok_or_else(|| bad("bad time"))?,
                key: rest[9..].to_vec(),
            })
        }
        t if t == tag::KV_RESERVED && rest.len() == 13 => Some(Key::KvReserved {
            class: rest[0],
            until_ms: u64_be(&rest[1..9]).ok_or_else(|| bad("bad time"))?,
            slot: u32_be(&rest[9..]).ok_or_else(|| bad("bad slot"))?,
        }),
        _ => None,
    };
    parsed.ok_or_else(|| bad("unknown tag or wrong length"))
}

/// A key for error messages: decoded when it parses, hex otherwise.
pub fn describe_key(key: &[u8]) -> String {
    match parse_key(key) {
        Ok(k) => k.to_string(),
        Err(_) => hex(key),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Stored bytes did not decode. `key` is the key they were stored under,
/// decoded for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct DecodeError {
    pub key: String,
    pub reason: String,
}

/// Encodes a value: the version byte, then MessagePack with named fields.
fn encode_value<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, NsError> {
    let body = codec::try_encode(value).map_err(|source| NsError::Encode { what, source })?;
    let mut bytes = Vec::with_capacity(1 + body.len());
    bytes.push(VALUE_VERSION);
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Decodes a value stored under `key`.
fn decode_value<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, DecodeError> {
    let bad = |reason: String| DecodeError {
        key: describe_key(key),
        reason,
    };
    match value.split_first() {
        None => Err(bad("empty value".into())),
        Some((&VALUE_VERSION, body)) => codec::decode(body).map_err(|e| bad(e.to_string())),
        Some((version, _)) => Err(bad(format!(
            "value version {version}, this build reads {VALUE_VERSION}"
        ))),
    }
}

/// Serde for byte strings as MessagePack `bin` (serde would otherwise write
/// `Vec<u8>` as an array of integers). Reading also accepts an array, which
/// is what a generic encoder would have written.
mod bytes_field {
    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct BytesVisitor;
        impl<'de> Visitor<'de> for BytesVisitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_str<E>(self, v: &str) -> Result<Vec<u8>, E> {
                Ok(v.as_bytes().to_vec())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                // Cap the pre-allocation: the declared length is untrusted.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_bytes(BytesVisitor)
    }
}

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InodeKind {
    File,
    Directory,
    Symlink,
    /// Special files: only their inode lives here; the kernel of the
    /// machine that opens one provides the pipe, socket or device.
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl InodeKind {
    fn code(self) -> u8 {
        match self {
            InodeKind::File => 1,
            InodeKind::Directory => 2,
            InodeKind::Symlink => 3,
            InodeKind::Fifo => 4,
            InodeKind::Socket => 5,
            InodeKind::CharDevice => 6,
            InodeKind::BlockDevice => 7,
        }
    }

    fn from_code(code: u8) -> Option<InodeKind> {
        match code {
            1 => Some(InodeKind::File),
            2 => Some(InodeKind::Directory),
            3 => Some(InodeKind::Symlink),
            4 => Some(InodeKind::Fifo),
            5 => Some(InodeKind::Socket),
            6 => Some(InodeKind::CharDevice),
            7 => Some(InodeKind::BlockDevice),
            _ => None,
        }
    }

    /// The `S_IFMT` bits of this kind, for `st_mode`.
    pub fn type_bits(self) -> u32 {
        match self {
            InodeKind::File => libc::S_IFREG,
            InodeKind::Directory => libc::S_IFDIR,
            InodeKind::Symlink => libc::S_IFLNK,
            InodeKind::Fifo => libc::S_IFIFO,
            InodeKind::Socket => libc::S_IFSOCK,
            InodeKind::CharDevice => libc::S_IFCHR,
            InodeKind::BlockDevice => libc::S_IFBLK,
        }
    }

    /// FIFOs, sockets and devices.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            InodeKind::Fifo | InodeKind::Socket | InodeKind::CharDevice | InodeKind::BlockDevice
        )
    }
}

/// A file's own attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileData {
    /// Bytes; while the file is written this is a hint that only grows,
    /// fixed exactly on close (see `Namespace::set_length`).
    pub length: u64,
    /// Bumped by every truncate, so storage and clients can tell a chunk
    /// written before a truncate from one written after.
    pub truncate_version: u64,
    pub layout: StoredLayout,
    /// The file's bytes, held here instead of on storage (a small file
    /// written by its only writer; see docs/metadata-schema.md, "Inline
    /// data"): then `length` is their length, never 0, and storage holds
    /// no chunk of the file that a read may return.
    pub inline: Option<Vec<u8>>,
}

impl FileData {
    /// Whether the data is held here ([`FileData::inline`]).
    pub fn is_inline(&self) -> bool {
        self.inline.is_some()
    }
}

/// A directory's own attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirData {
    /// The directory holding this one's entry (the root's parent is itself;
    /// a directory detached by `remove_all` has parent 0). Walking parents
    /// up is how rename refuses to move a directory into its own subtree.
    pub parent: InodeId,
    /// The layout new files and subdirectories inherit.
    pub default_layout: Option<LayoutSpec>,
}

/// A symlink's own attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymlinkData {
    pub target: Vec<u8>,
}

/// A special file's own attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialData {
    /// One of the special kinds ([`InodeKind::is_special`]).
    pub kind: InodeKind,
    /// Devices: the device number (`st_rdev`); 0 otherwise.
    pub rdev: u64,
}

/// Attributes by kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InodeData {
    File(FileData),
    Directory(DirData),
    Symlink(SymlinkData),
    Special(SpecialData),
}

/// An inode as the namespace uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: InodeId,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits with setuid, setgid and sticky ([`MODE_MASK`]); no
    /// file type bits (see [`Inode::st_mode`]).
    pub mode: u32,
    /// Files and symlinks: how many entries name this inode. Directories:
    /// while linked 2 plus their subdirectories (their entry, `.` and each
    /// subdirectory's `..`, as Linux reports), 0 once detached.
    pub nlink: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// Set while the inode sits in the GC queue: no entry names it and it
    /// is deleted once due (and, for files, once no write session is left).
    pub gc_due_ms: Option<u64>,
    pub data: InodeData,
}

impl Inode {
    pub fn kind(&self) -> InodeKind {
        match self.data {
            InodeData::File(_) => InodeKind::File,
            InodeData::Directory(_) => InodeKind::Directory,
            InodeData::Symlink(_) => InodeKind::Symlink,
            InodeData::Special(s) => s.kind,
        }
    }

    /// `st_rdev`.
    pub fn rdev(&self) -> u64 {
        match self.data {
            InodeData::Special(s) => s.rdev,
            _ => 0,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.data, InodeData::Directory(_))
    }

    /// `st_mode`: the type bits and the permission bits.
    pub fn st_mode(&self) -> u32 {
        self.kind().type_bits() | self.mode
    }

    pub fn file(&self) -> Option<&FileData> {
        match &self.data {
            InodeData::File(f) => Some(f),
            _ => None,
        }
    }

    pub fn dir(&self) -> Option<&DirData> {
        match &self.data {
            InodeData::Directory(d) => Some(d),
            _ => None,
        }
    }

    /// `st_size`: a file's length, a symlink's target length, 0 for a
    /// directory.
    pub fn size(&self) -> u64 {
        match &self.data {
            InodeData::File(f) => f.length,
            InodeData::Directory(_) | InodeData::Special(_) => 0,
            InodeData::Symlink(s) => s.target.len() as u64,
        }
    }
}

/// The stored shape of an inode: flat, every field defaulted and the
/// kind-specific ones left out when they do not apply.
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct InodeRecord {
    kind: u8,
    uid: u32,
    gid: u32,
    mode: u32,
    nlink: u32,
    atime_ns: i64,
    mtime_ns: i64,
    ctime_ns: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    gc_due_ms: Option<u64>,
    #[serde(skip_serializing_if = "is_zero")]
    length: u64,
    #[serde(skip_serializing_if = "is_zero")]
    truncate_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    layout: Option<StoredLayout>,
    #[serde(skip_serializing_if = "is_zero")]
    parent: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    default_layout: Option<LayoutSpec>,
    #[serde(with = "bytes_field", skip_serializing_if = "Vec::is_empty")]
    target: Vec<u8>,
    #[serde(skip_serializing_if = "is_zero")]
    rdev: u64,
    #[serde(with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    inline: Option<Vec<u8>>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Encodes an inode value.
pub fn encode_inode(inode: &Inode) -> Result<Vec<u8>, NsError> {
    let mut record = InodeRecord {
        kind: inode.kind().code(),
        uid: inode.uid,
        gid: inode.gid,
        mode: inode.mode,
        nlink: inode.nlink,
        atime_ns: inode.atime_ns,
        mtime_ns: inode.mtime_ns,
        ctime_ns: inode.ctime_ns,
        gc_due_ms: inode.gc_due_ms,
        ..InodeRecord::default()
    };
    match &inode.data {
        InodeData::File(f) => {
            record.length = f.length;
            record.truncate_version = f.truncate_version;
            record.layout = Some(f.layout.clone());
            record.inline = f.inline.clone();
        }
        InodeData::Directory(d) => {
            record.parent = d.parent.0;
            record.default_layout = d.default_layout;
        }
        InodeData::Symlink(s) => record.target = s.target.clone(),
        InodeData::Special(s) => record.rdev = s.rdev,
    }
    encode_value("inode", &record)
}

/// Decodes the inode value stored for `ino`.
pub fn decode_inode(ino: InodeId, value: &[u8]) -> Result<Inode, DecodeError> {
    let key = inode_key(ino);
    let record: InodeRecord = decode_value(&key, value)?;
    let bad = |reason: String| DecodeError {
        key: describe_key(&key),
        reason,
    };
    if record.mode & !MODE_MASK != 0 {
        return Err(bad(format!(
            "mode {:#o} has bits outside {MODE_MASK:#o}",
            record.mode
        )));
    }
    let data = match InodeKind::from_code(record.kind) {
        None => return Err(bad(format!("unknown inode kind {}", record.kind))),
        Some(InodeKind::File) => {
            if let Some(inline) = &record.inline
                && (inline.is_empty() || inline.len() as u64 != record.length)
            {
                return Err(bad(format!(
                    "{} inline bytes for a file of length {}",
                    inline.len(),
                    record.length
                )));
            }
            InodeData::File(FileData {
                length: record.length,
                truncate_version: record.truncate_version,
                layout: record
                    .layout
                    .ok_or_else(|| bad("a file without a layout".into()))?,
                inline: record.inline,
            })
        }
        Some(InodeKind::Directory) => {
            if record.parent == 0 && record.gc_due_ms.is_none() {
                return Err(bad("a linked directory without a parent".into()));
            }
            if let Some(spec) = &record.default_layout {
                spec.validate()
                    .map_err(|e| bad(format!("default layout: {e}")))?;
            }
            InodeData::Directory(DirData {
                parent: InodeId(record.parent),
                default_layout: record.default_layout,
            })
        }
        Some(InodeKind::Symlink) => {
            if record.target.is_empty() || record.target.len() > SYMLINK_TARGET_BYTES_MAX {
                return Err(bad(format!(
                    "symlink target of {} bytes",
                    record.target.len()
                )));
            }
            InodeData::Symlink(SymlinkData {
                target: record.target,
            })
        }
        Some(kind) => {
            debug_assert!(kind.is_special());
            InodeData::Special(SpecialData {
                kind,
                rdev: record.rdev,
            })
        }
    };
    Ok(Inode {
        ino,
        uid: record.uid,
        gid: record.gid,
        mode: record.mode,
        nlink: record.nlink,
        atime_ns: record.atime_ns,
        mtime_ns: record.mtime_ns,
        ctime_ns: record.ctime_ns,
        gc_due_ms: record.gc_due_ms,
        data,
    })
}

/// A directory entry's value: the inode it names and that inode's kind (so
/// `readdir` need not read every inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dentry {
    pub ino: InodeId,
    pub kind: InodeKind,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct DentryRecord {
    ino: u64,
    kind: u8,
}

pub fn encode_dentry(dentry: &Dentry) -> Result<Vec<u8>, NsError> {
    encode_value(
        "directory entry",
        &DentryRecord {
            ino: dentry.ino.0,
            kind: dentry.kind.code(),
        },
    )
}

/// Decodes the entry stored under `key` (a `DENT` key).
pub fn decode_dentry(key: &[u8], value: &[u8]) -> Result<Dentry, DecodeError> {
    let record: DentryRecord = decode_value(key, value)?;
    let bad = |reason: String| DecodeError {
        key: describe_key(key),
        reason,
    };
    if record.ino == 0 {
        return Err(bad("entry names inode 0".into()));
    }
    let kind = InodeKind::from_code(record.kind)
        .ok_or_else(|| bad(format!("unknown inode kind {}", record.kind)))?;
    Ok(Dentry {
        ino: InodeId(record.ino),
        kind,
    })
}

/// A write session's value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionValue {
    /// The client that opened the file (a `ClientId`), so that the sessions
    /// of a client that died can be found and closed.
    pub client: u64,
    pub opened_ns: i64,
}

pub fn encode_session(session: &SessionValue) -> Result<Vec<u8>, NsError> {
    encode_value("write session", session)
}

pub fn decode_session(key: &[u8], value: &[u8]) -> Result<SessionValue, DecodeError> {
    decode_value(key, value)
}

/// A client's lease (`CLNT` value): its write sessions stay while the lease
/// holds, and once it has expired the session reaper ends them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LeaseValue {
    /// Until when (ms since the epoch, the renewing instance's clock) the
    /// client's sessions are kept.
    pub expires_ms: u64,
    /// When it was last renewed.
    pub renewed_ns: i64,
    /// The identity (its URI) that holds the lease: only it may renew it.
    /// Empty in records written before leases were bound to identities;
    /// the next renewal binds those.
    pub owner: String,
}

pub fn encode_lease(lease: &LeaseValue) -> Result<Vec<u8>, NsError> {
    encode_value("client lease", lease)
}

pub fn decode_lease(key: &[u8], value: &[u8]) -> Result<LeaseValue, DecodeError> {
    decode_value(key, value)
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct XattrRecord {
    #[serde(with = "bytes_field")]
    value: Vec<u8>,
}

pub fn encode_xattr(value: &[u8]) -> Result<Vec<u8>, NsError> {
    encode_value(
        "extended attribute",
        &XattrRecord {
            value: value.to_vec(),
        },
    )
}

pub fn decode_xattr(key: &[u8], value: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let record: XattrRecord = decode_value(key, value)?;
    if record.value.len() > XATTR_VALUE_BYTES_MAX {
        return Err(DecodeError {
            key: describe_key(key),
            reason: format!("attribute value of {} bytes", record.value.len()),
        });
    }
    Ok(record.value)
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct DirTimesRecord {
    changed_ns: i64,
}

/// A `DTIM` value: when the directory's entries last changed (its mtime
/// and ctime are at least this).
pub fn encode_dir_times(changed_ns: i64) -> Result<Vec<u8>, NsError> {
    encode_value("directory times", &DirTimesRecord { changed_ns })
}

pub fn decode_dir_times(key: &[u8], value: &[u8]) -> Result<i64, DecodeError> {
    decode_value::<DirTimesRecord>(key, value).map(|r| r.changed_ns)
}

/// What a GC queue entry collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GcKind {
    /// A file whose last link is gone: its chunks, then its inode.
    File,
    /// A detached directory subtree (`remove_all`, or a directory met while
    /// expanding one): its entries go onto the queue, then its inode goes.
    Directory,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct GcRecord {
    kind: u8,
}

pub fn encode_gc(kind: GcKind) -> Result<Vec<u8>, NsError> {
    let kind = match kind {
        GcKind::File => 1,
        GcKind::Directory => 2,
    };
    encode_value("GC queue entry", &GcRecord { kind })
}

pub fn decode_gc(key: &[u8], value: &[u8]) -> Result<GcKind, DecodeError> {
    let record: GcRecord = decode_value(key, value)?;
    match record.kind {
        1 => Ok(GcKind::File),
        2 => Ok(GcKind::Directory),
        other => Err(DecodeError {
            key: describe_key(key),
            reason: format!("unknown GC kind {other}"),
        }),
    }
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct AllocRecord {
    next_batch: u64,
}

/// An allocator shard's value: how many batches it has handed out.
pub fn encode_alloc(next_batch: u64) -> Result<Vec<u8>, NsError> {
    encode_value("inode allocator shard", &AllocRecord { next_batch })
}

pub fn decode_alloc(key: &[u8], value: &[u8]) -> Result<u64, DecodeError> {
    Ok(decode_value::<AllocRecord>(key, value)?.next_batch)
}

/// The format key's value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FormatValue {
    pub version: u32,
    pub created_ns: i64,
}

pub fn encode_format(format: &FormatValue) -> Result<Vec<u8>, NsError> {
    encode_value("format record", format)
}

pub fn decode_format(key: &[u8], value: &[u8]) -> Result<FormatValue, DecodeError> {
    let format: FormatValue = decode_value(key, value)?;
    if format.version == 0 || format.version > FORMAT_VERSION {
        return Err(DecodeError {
            key: describe_key(key),
            reason: format!(
                "namespace format {}, this build reads 1..={FORMAT_VERSION}",
                format.version
            ),
        });
    }
    Ok(format)
}

/// One size class of the KV cache (docs/kv-cache.md): its slots are the
/// chunks of one slot file, slot `s` on `chains[s % chains.len()]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvClassValue {
    /// Bytes of each slot: the slot file's chunk size, a power of two from
    /// 64 KiB to 64 MiB.
    pub slot_bytes: u32,
    pub slots: u32,
    /// The slot file's id, from the inode id allocator.
    pub ino: u64,
    pub chain_table: u32,
    pub chains: Vec<u32>,
}

/// The KV cache's record (`KVCF cache`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvCacheValue {
    /// Smallest slot first.
    pub classes: Vec<KvClassValue>,
    /// Entries not accessed for this long are evicted by `kv_evict`; 0: no
    /// age limit.
    pub max_age_ms: u64,
    /// A lookup rewrites an entry's access time when it is older than this.
    pub access_bucket_ms: u64,
    /// How long a reserved slot stays its writer's.
    pub reservation_ms: u64,
    pub created_ns: i64,
}

/// The most size classes a cache has.
pub const KV_CLASSES_MAX: usize = 16;

pub fn encode_kv_cache(value: &KvCacheValue) -> Result<Vec<u8>, NsError> {
    encode_value("KV cache record", value)
}

pub fn decode_kv_cache(key: &[u8], value: &[u8]) -> Result<KvCacheValue, DecodeError> {
    let record: KvCacheValue = decode_value(key, value)?;
    let bad = |reason: String| DecodeError {
        key: describe_key(key),
        reason,
    };
    if record.classes.is_empty() || record.classes.len() > KV_CLASSES_MAX {
        return Err(bad(format!("{} size classes", record.classes.len())));
    }
    for (i, class) in record.classes.iter().enumerate() {
        if !class.slot_bytes.is_power_of_two() || !(64 << 10..=64 << 20).contains(&class.slot_bytes)
        {
            return Err(bad(format!(
                "class {i}: slots of {} bytes",
                class.slot_bytes
            )));
        }
        if class.slots == 0 || class.chains.is_empty() || class.ino == 0 {
            return Err(bad(format!(
                "class {i}: {} slots, {} chains, slot file {:#x}",
                class.slots,
                class.chains.len(),
                class.ino
            )));
        }
    }
    Ok(record)
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct KvFreshRecord {
    used: u32,
}

/// A `KVFS` value: slots `0..used` of the class were handed out at least once.
pub fn encode_kv_fresh(used: u32) -> Result<Vec<u8>, NsError> {
    encode_value("KV fresh-slot counter", &KvFreshRecord { used })
}

pub fn decode_kv_fresh(key: &[u8], value: &[u8]) -> Result<u32, DecodeError> {
    Ok(decode_value::<KvFreshRecord>(key, value)?.used)
}

/// A block's index entry (`KVIX` value).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvEntryValue {
    pub class: u8,
    pub slot: u32,
    /// The slot's generation when the block was written.
    pub generation: u64,
    pub length: u32,
    /// CRC32C of the block's bytes.
    pub crc: u32,
    pub stored_ms: u64,
    /// When it was last looked up, to the access bucket; its `KVAG` key
    /// carries the same time.
    pub access_ms: u64,
}

pub fn encode_kv_entry(value: &KvEntryValue) -> Result<Vec<u8>, NsError> {
    encode_value("KV index entry", value)
}

pub fn decode_kv_entry(key: &[u8], value: &[u8]) -> Result<KvEntryValue, DecodeError> {
    decode_value(key, value)
}

/// What a slot holds (`KVSL` value `state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvSlotState {
    /// On the free list.
    #[default]
    Free,
    /// A writer's until `until_ms`.
    Reserved,
    /// The block of `key`.
    Used,
}

/// A slot's state (`KVSL` value).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvSlotValue {
    pub state: KvSlotState,
    /// Bumped each time the slot is reserved.
    pub generation: u64,
    /// Reserved: until when.
    pub until_ms: u64,
    /// Used: the key whose block it holds.
    pub key: Vec<u8>,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct KvSlotRecord {
    state: u8,
    generation: u64,
    until_ms: u64,
    #[serde(with = "bytes_field")]
    key: Vec<u8>,
}

pub fn encode_kv_slot(value: &KvSlotValue) -> Result<Vec<u8>, NsError> {
    let state = match value.state {
        KvSlotState::Free => 1,
        KvSlotState::Reserved => 2,
        KvSlotState::Used => 3,
    };
    encode_value(
        "KV slot state",
        &KvSlotRecord {
            state,
            generation: value.generation,
            until_ms: value.until_ms,
            key: value.key.clone(),
        },
    )
}

pub fn decode_kv_slot(key: &[u8], value: &[u8]) -> Result<KvSlotValue, DecodeError> {
    let record: KvSlotRecord = decode_value(key, value)?;
    let state = match record.state {
        1 => KvSlotState::Free,
        2 => KvSlotState::Reserved,
        3 => KvSlotState::Used,
        other => {
            return Err(DecodeError {
                key: describe_key(key),
                reason: format!("unknown slot state {other}"),
            });
        }
    };
    Ok(KvSlotValue {
        state,
        generation: record.generation,
        until_ms: record.until_ms,
        key: record.key,
    })
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct KvMarkRecord {}

/// The value of a free-list, access-order or reservation key: the key says
/// everything; the value is an empty record, versioned like every other.
pub fn encode_kv_mark() -> Result<Vec<u8>, NsError> {
    encode_value("KV order key", &KvMarkRecord {})
}

pub fn decode_kv_mark(key: &[u8], value: &[u8]) -> Result<(), DecodeError> {
    decode_value::<KvMarkRecord>(key, value).map(drop)
}

/// Runs every decoder on `data`, for fuzzers and property tests: none may
/// panic, whatever the bytes. `data` is tried both as a key and as a value.
pub fn fuzz_decode(data: &[u8]) {
    let key = parse_key(data);
    let _ = describe_key(data);
    if let Ok(k) = &key {
        // Whatever parses must print and encode back to the same bytes; a
        // mismatch is a bug the fuzzer should report, hence the assertion.
        let _ = k.to_string();
        assert_eq!(k.encode(), data, "key {k} does not round-trip");
    }
    let ino = InodeId(data.len() as u64);
    let _ = decode_inode(ino, data);
    let dentry_key = dentry_key(ino, b"fuzz");
    let _ = decode_dentry(&dentry_key, data);
    let _ = decode_session(&session_key(ino, SessionId(1)), data);
    let _ = decode_lease(&lease_key(ino.0), data);
    let _ = decode_xattr(&xattr_key(ino, b"user.fuzz"), data);
    let _ = decode_gc(&gc_key(0, ino), data);
    let _ = decode_dir_times(&dir_times_key(ino), data);
    let _ = decode_alloc(&alloc_key(0), data);
    let _ = decode_format(&format_key(), data);
    // The same bytes behind a valid version byte reach the MessagePack
    // decoders rather than stopping at the version check.
    let mut versioned = Vec::with_capacity(data.len() + 1);
    versioned.push(VALUE_VERSION);
    versioned.extend_from_slice(data);
    let _ = decode_inode(ino, &versioned);
    let _ = decode_dentry(&dentry_key, &versioned);
    let _ = decode_lease(&lease_key(ino.0), &versioned);
    let _ = decode_session(&session_key(ino, SessionId(1)), &versioned);
    let _ = decode_xattr(&xattr_key(ino, b"user.fuzz"), &versioned);
    let _ = decode_gc(&gc_key(0, ino), &versioned);
    let _ = decode_dir_times(&dir_times_key(ino), &versioned);
    let _ = decode_alloc(&alloc_key(0), &versioned);
    let _ = decode_format(&format_key(), &versioned);
    for bytes in [data, &versioned[..]] {
        let _ = decode_kv_cache(&kv_cache_key(), bytes);
        let _ = decode_kv_fresh(&kv_fresh_key(0), bytes);
        let _ = decode_kv_entry(&kv_entry_key(b"fuzz"), bytes);
        let _ = decode_kv_slot(&kv_slot_key(0, 0), bytes);
        let _ = decode_kv_mark(&kv_free_key(0, 0, 0), bytes);
    }
}

#[cfg(test)]
mod tests {
    use flyfs_proto::ids::{ChainId, ChainTableId};
    use proptest::prelude::*;

    use super::*;

    fn layout() -> StoredLayout {
        StoredLayout::new(
            LayoutSpec {
                chain_table: ChainTableId(3),
                chunk_size: 1 << 20,
                stripe: 2,
            },
            vec![ChainId(5), ChainId(6)],
        )
        .expect("valid layout")
    }

    fn inodes() -> Vec<Inode> {
        let base = |ino, data| Inode {
            ino: InodeId(ino),
            uid: 1000,
            gid: 100,
            mode: 0o4755,
            nlink: 1,
            atime_ns: -5,
            mtime_ns: 1_700_000_000_000_000_000,
            ctime_ns: 7,
            gc_due_ms: None,
            data,
        };
        vec![
            base(
                4096,
                InodeData::File(FileData {
                    length: 12345,
                    truncate_version: 3,
                    layout: layout(),
                    inline: None,
                }),
            ),
            base(
                4097,
                InodeData::File(FileData {
                    length: 5,
                    truncate_version: 1,
                    layout: layout(),
                    inline: Some(b"hello".to_vec()),
                }),
            ),
            base(
                1,
                InodeData::Directory(DirData {
                    parent: ROOT,
                    default_layout: Some(layout().spec()),
                }),
            ),
            Inode {
                gc_due_ms: Some(99),
                nlink: 0,
                ..base(
                    5000,
                    InodeData::Directory(DirData {
                        parent: InodeId(0),
                        default_layout: None,
                    }),
                )
            },
            base(
                4097,
                InodeData::Symlink(SymlinkData {
                    target: b"../a/\xffb".to_vec(),
                }),
            ),
            base(
                9,
                InodeData::Special(SpecialData {
                    kind: InodeKind::CharDevice,
                    rdev: 0x0103,
                }),
            ),
            base(
                10,
                InodeData::Special(SpecialData {
                    kind: InodeKind::Socket,
                    rdev: 0,
                }),
            ),
        ]
    }

    #[test]
    fn values_round_trip() {
        for inode in inodes() {
            let bytes = encode_inode(&inode).expect("encodes");
            assert_eq!(bytes[0], VALUE_VERSION);
            assert_eq!(decode_inode(inode.ino, &bytes).expect("decodes"), inode);
        }
        let dentry = Dentry {
            ino: InodeId(77),
            kind: InodeKind::Symlink,
        };
        let key = dentry_key(ROOT, b"x");
        assert_eq!(
            decode_dentry(&key, &encode_dentry(&dentry).expect("encodes")),
            Ok(dentry)
        );
        let value = vec![0u8, 1, 255, 7];
        let key = xattr_key(ROOT, b"user.a");
        assert_eq!(
            decode_xattr(&key, &encode_xattr(&value).expect("encodes")),
            Ok(value)
        );
        let key = gc_key(5, ROOT);
        assert_eq!(
            decode_gc(&key, &encode_gc(GcKind::Directory).expect("encodes")),
            Ok(GcKind::Directory)
        );
        assert_eq!(
            decode_alloc(&alloc_key(3), &encode_alloc(9).expect("encodes")),
            Ok(9)
        );
        let session = SessionValue {
            client: 42,
            opened_ns: 8,
        };
        let key = session_key(ROOT, SessionId(3));
        assert_eq!(
            decode_session(&key, &encode_session(&session).expect("encodes")),
            Ok(session)
        );
        let lease = LeaseValue {
            expires_ms: 1_700_000_030_000,
            renewed_ns: 1_700_000_000_000_000_000,
            owner: "flyfs://c/client/host-a".into(),
        };
        let key = lease_key(42);
        assert_eq!(
            decode_lease(&key, &encode_lease(&lease).expect("encodes")),
            Ok(lease)
        );
    }

    #[test]
    fn keys_round_trip_and_sort() {
        let keys = [
            (inode_key(InodeId(0x0102)), Key::Inode(InodeId(0x0102))),
            (
                dentry_key(ROOT, b"name"),
                Key::Dentry {
                    parent: ROOT,
                    name: b"name".to_vec(),
                },
            ),
            (
                session_key(InodeId(9), SessionId(10)),
                Key::Session {
                    ino: InodeId(9),
                    session: SessionId(10),
                },
            ),
            (
                xattr_key(InodeId(9), b"user.x"),
                Key::Xattr {
                    ino: InodeId(9),
                    name: b"user.x".to_vec(),
                },
            ),
            (
                gc_key(1234, InodeId(9)),
                Key::Gc {
                    due_ms: 1234,
                    ino: InodeId(9),
                },
            ),
            (alloc_key(31), Key::Alloc { shard: 31 }),
            (
                lease_key(0x0102_0304_0506_0708),
                Key::Lease {
                    client: 0x0102_0304_0506_0708,
                },
            ),
            (format_key(), Key::Format),
        ];
        for (bytes, key) in keys {
            assert_eq!(parse_key(&bytes), Ok(key));
        }
        // Little-endian ids: consecutive inodes are far apart in key order.
        assert_eq!(&inode_key(InodeId(1))[4..], &[1, 0, 0, 0, 0, 0, 0, 0]);
        // Big-endian due times: the queue sorts by time.
        assert!(gc_key(255, InodeId(9)) < gc_key(256, InodeId(1)));
        assert!(parse_key(b"INO").is_err());
        assert!(parse_key(b"INODxx").is_err());
        assert!(parse_key(b"DENT\x01\0\0\0\0\0\0\0").is_err()); // no name
    }

    #[test]
    fn kv_cache_keys_round_trip_sort_by_time_and_cap_their_keys() {
        let keys = [
            (kv_cache_key(), Key::KvCache),
            (kv_fresh_key(3), Key::KvFresh { class: 3 }),
            (
                kv_entry_key(b"prefix-hash"),
                Key::KvEntry {
                    key: b"prefix-hash".to_vec(),
                },
            ),
            (kv_slot_key(1, 77), Key::KvSlot { class: 1, slot: 77 }),
            (
                kv_free_key(1, 5000, 77),
                Key::KvFree {
                    class: 1,
                    freed_ms: 5000,
                    slot: 77,
                },
            ),
            (
                kv_access_key(2, 6000, b"k"),
                Key::KvAccess {
                    class: 2,
                    access_ms: 6000,
                    key: b"k".to_vec(),
                },
            ),
            (
                kv_reserved_key(0, 7000, 1),
                Key::KvReserved {
                    class: 0,
                    until_ms: 7000,
                    slot: 1,
                },
            ),
        ];
        for (bytes, key) in keys {
            assert_eq!(parse_key(&bytes), Ok(key.clone()));
            assert_eq!(key.encode(), bytes);
        }
        // Oldest first within a class, classes apart.
        assert!(kv_free_key(1, 255, 9) < kv_free_key(1, 256, 0));
        assert!(kv_access_key(0, u64::MAX, b"z") < kv_access_key(1, 0, b"a"));
        assert!(parse_key(&kv_entry_key(&[7; KV_KEY_BYTES_MAX])).is_ok());
        assert!(parse_key(&kv_entry_key(&[7; KV_KEY_BYTES_MAX + 1])).is_err());
        assert!(parse_key(b"KVIX").is_err(), "an empty key");
        assert!(parse_key(b"KVSL\x01\0\0").is_err(), "a short slot");
    }

    #[test]
    fn decode_errors_name_the_key_and_the_problem() {
        let error = decode_inode(InodeId(0x2a), &[]).expect_err("empty");
        assert_eq!(error.key, "INOD ino 0x2a");
        assert!(error.reason.contains("empty"), "{error}");
        let error = decode_inode(InodeId(0x2a), &[9, 0x80]).expect_err("version 9");
        assert!(error.reason.contains("version 9"), "{error}");
        // A file with no layout.
        let error = decode_inode(InodeId(0x2a), &[1, 0x81, 0xa4, b'k', b'i', b'n', b'd', 1])
            .expect_err("no layout");
        assert!(error.reason.contains("layout"), "{error}");
        // An unknown kind.
        let error = decode_inode(InodeId(0x2a), &[1, 0x80]).expect_err("kind 0");
        assert!(error.reason.contains("kind"), "{error}");
        // Inline bytes that are not the file's length.
        let mut held = inodes()
            .into_iter()
            .find(|i| i.file().is_some_and(FileData::is_inline))
            .expect("a held file");
        if let InodeData::File(f) = &mut held.data {
            f.length += 1;
        }
        let bytes = encode_inode(&held).expect("encodes");
        let error = decode_inode(held.ino, &bytes).expect_err("length");
        assert!(error.reason.contains("inline bytes"), "{error}");
        let key = dentry_key(ROOT, b"x");
        let error = decode_dentry(&key, &[1, 0x80]).expect_err("inode 0");
        assert!(error.to_string().contains("DENT ino 0x1 \"x\""), "{error}");
        let error = decode_format(
            &format_key(),
            &encode_format(&FormatValue {
                version: 7,
                created_ns: 0,
            })
            .expect("encodes"),
        )
        .expect_err("future format");
        assert!(error.reason.contains("format 7"), "{error}");
    }

    #[test]
    fn fields_can_be_added() {
        // A future inode with an extra field decodes; an old one without
        // `truncate_version` gets zero.
        #[derive(Serialize)]
        struct Future<'a> {
            kind: u8,
            mode: u32,
            layout: &'a StoredLayout,
            flags: u64,
        }
        let layout = layout();
        let mut bytes = vec![VALUE_VERSION];
        bytes.extend_from_slice(
            &codec::try_encode(&Future {
                kind: 1,
                mode: 0o644,
                layout: &layout,
                flags: 7,
            })
            .expect("encodes"),
        );
        let inode = decode_inode(InodeId(9), &bytes).expect("decodes");
        assert_eq!(inode.mode, 0o644);
        assert_eq!(inode.file().map(|f| f.truncate_version), Some(0));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz_decode(&data);
        }

        #[test]
        fn mutated_values_never_panic(index in 0usize..4, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let inode = &inodes()[index];
            let mut bytes = encode_inode(inode).expect("encodes");
            for (at, byte) in flips {
                let at = at % bytes.len();
                bytes[at] = byte;
            }
            let _ = decode_inode(inode.ino, &bytes);
            fuzz_decode(&bytes);
        }
    }
}
