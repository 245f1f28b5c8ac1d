//! Newtype identifiers and versions shared by every flyfs layer.
//!
//! Each id is its own type so that a chain id can never be passed where a
//! target id is meant; `Debug` prints them decoded (`ino 0x2a #3`), because
//! ids show up in logs and errors far more often than in code.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident($inner:ty), $label:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($label, " {}"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

id!(
    /// A chain: an ordered list of storage targets replicating the same chunks.
    ChainId(u32), "chain"
);
id!(
    /// A storage target: one replica slot of a chain on one device.
    TargetId(u64), "target"
);
id!(
    /// Version of a chain's membership; bumped on every change.
    ChainVersion(u32), "chain-v"
);
id!(
    /// Version of a chunk's contents; each committed update adds one.
    ChunkVersion(u32), "v"
);
id!(
    /// A client instance, chosen at random when it starts.
    ClientId(u64), "client"
);
id!(
    /// A client's request number, for exactly-once retries.
    RequestId(u64), "req"
);

id!(
    /// A storage node (one storage daemon process).
    NodeId(u32), "node"
);
id!(
    /// A chain table: the list of chains a file's layout stripes over.
    ChainTableId(u32), "table"
);
id!(
    /// Version of the whole routing information; bumped on every change.
    RoutingVersion(u64), "routing-v"
);

/// A file or directory in the namespace.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InodeId(pub u64);

impl fmt::Debug for InodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ino {:#x}", self.0)
    }
}

impl fmt::Display for InodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A chunk: the `index`-th fixed-size piece of file `inode`. Because the id is
/// computed from the inode and the offset, a client finds a chunk's chain
/// after `open` without asking the metadata service per chunk. Ordered by
/// inode then index, so a file's chunks are adjacent in every sorted index.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct ChunkId {
    pub inode: InodeId,
    pub index: u32,
}

impl ChunkId {
    pub const fn new(inode: u64, index: u32) -> ChunkId {
        ChunkId {
            inode: InodeId(inode),
            index,
        }
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} #{}", self.inode, self.index)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_decodes_ids() {
        assert_eq!(format!("{:?}", ChunkId::new(42, 3)), "ino 0x2a #3");
        assert_eq!(format!("{:?}", ChainId(7)), "chain 7");
        assert_eq!(format!("{}", ChunkVersion(2)), "v 2");
    }

    #[test]
    fn chunk_ids_sort_by_inode_then_index() {
        let mut ids = vec![ChunkId::new(2, 0), ChunkId::new(1, 5), ChunkId::new(1, 1)];
        ids.sort();
        assert_eq!(
            ids,
            vec![ChunkId::new(1, 1), ChunkId::new(1, 5), ChunkId::new(2, 0)]
        );
    }
}
