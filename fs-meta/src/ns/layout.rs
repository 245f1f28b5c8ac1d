//! File layouts: which chains hold a file's chunks, and how the namespace
//! picks them when a file is created.
//!
//! A layout is fixed for the life of a file and stored in its inode, so a
//! client computes every chunk's chain locally after `open` (chunk `i` lives
//! on `chains[i % stripe]`) and the GC worker knows where to delete without
//! asking anyone. Directories carry a [`LayoutSpec`] (table, chunk size,
//! stripe) that new files and subdirectories inherit; the concrete chains are
//! chosen per file from the chain table through [`ChainTables`], a trait the
//! metadata service implements from the cluster manager's routing table.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use flyfs_proto::ids::{ChainId, ChainTableId};
use serde::{Deserialize, Serialize};

/// Smallest chunk size (3FS supports 64 KiB .. 64 MiB, powers of two).
pub const CHUNK_SIZE_MIN: u32 = 64 * 1024;
/// Largest chunk size.
pub const CHUNK_SIZE_MAX: u32 = 64 * 1024 * 1024;
/// Most chains one file may stripe over. 3FS runs 200 in production; the cap
/// keeps an inode value (4-5 bytes per chain) far below the KV value limit.
pub const STRIPE_MAX: u32 = 4096;

const _: () = assert!(CHUNK_SIZE_MIN.is_power_of_two() && CHUNK_SIZE_MAX.is_power_of_two());
// 4096 chains of at most 5 MessagePack bytes each stay well under the
// 100,000-byte FoundationDB value limit, with room for the rest of an inode.
const _: () = assert!(STRIPE_MAX as usize * 5 < 50_000);

/// A layout is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("chunk size {0} is not a power of two between 64 KiB and 64 MiB")]
    ChunkSize(u32),
    #[error("stripe {0} is not between 1 and {STRIPE_MAX}")]
    Stripe(u32),
    #[error("stripe {stripe} needs as many chains, the layout lists {chains}")]
    ChainCount { stripe: u32, chains: usize },
    #[error("{0:?} is unknown to the cluster")]
    UnknownTable(ChainTableId),
    #[error("{table:?} has {chains} chains, fewer than the stripe {stripe}")]
    TableTooSmall {
        table: ChainTableId,
        chains: usize,
        stripe: u32,
    },
}

/// What a directory says about the files created in it: which chain table,
/// what chunk size, how many chains per file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LayoutSpec {
    pub chain_table: ChainTableId,
    pub chunk_size: u32,
    pub stripe: u32,
}

impl LayoutSpec {
    /// Checks the chunk size and stripe (not the table, which only the
    /// cluster knows).
    pub fn validate(&self) -> Result<(), LayoutError> {
        if !(CHUNK_SIZE_MIN..=CHUNK_SIZE_MAX).contains(&self.chunk_size)
            || !self.chunk_size.is_power_of_two()
        {
            return Err(LayoutError::ChunkSize(self.chunk_size));
        }
        if !(1..=STRIPE_MAX).contains(&self.stripe) {
            return Err(LayoutError::Stripe(self.stripe));
        }
        Ok(())
    }
}

/// A file's layout as its inode stores it: chunk `i` lives on
/// `chains[i % stripe]`.
///
/// Fields are private so that every `StoredLayout` in memory satisfies the
/// invariants [`StoredLayout::new`] checks (valid spec, exactly `stripe`
/// chains); decoding goes through the same check. Clients get a plain copy
/// of it, [`flyfs_proto::wire::meta::Layout`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LayoutRecord", into = "LayoutRecord")]
pub struct StoredLayout {
    spec: LayoutSpec,
    chains: Vec<ChainId>,
}

/// The stored shape of a [`StoredLayout`]: named fields, all defaulted, so fields
/// can be added later (see docs/metadata-schema.md).
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct LayoutRecord {
    chain_table: ChainTableId,
    chunk_size: u32,
    stripe: u32,
    chains: Vec<ChainId>,
}

impl TryFrom<LayoutRecord> for StoredLayout {
    type Error = LayoutError;

    fn try_from(record: LayoutRecord) -> Result<StoredLayout, LayoutError> {
        StoredLayout::new(
            LayoutSpec {
                chain_table: record.chain_table,
                chunk_size: record.chunk_size,
                stripe: record.stripe,
            },
            record.chains,
        )
    }
}

impl From<StoredLayout> for LayoutRecord {
    fn from(layout: StoredLayout) -> LayoutRecord {
        LayoutRecord {
            chain_table: layout.spec.chain_table,
            chunk_size: layout.spec.chunk_size,
            stripe: layout.spec.stripe,
            chains: layout.chains,
        }
    }
}

impl StoredLayout {
    pub fn new(spec: LayoutSpec, chains: Vec<ChainId>) -> Result<StoredLayout, LayoutError> {
        spec.validate()?;
        if chains.len() != spec.stripe as usize {
            return Err(LayoutError::ChainCount {
                stripe: spec.stripe,
                chains: chains.len(),
            });
        }
        Ok(StoredLayout { spec, chains })
    }

    pub fn spec(&self) -> LayoutSpec {
        self.spec
    }

    pub fn chain_table(&self) -> ChainTableId {
        self.spec.chain_table
    }

    pub fn chunk_size(&self) -> u32 {
        self.spec.chunk_size
    }

    pub fn stripe(&self) -> u32 {
        self.spec.stripe
    }

    /// The chains, in stripe order.
    pub fn chains(&self) -> &[ChainId] {
        &self.chains
    }

    /// The chain holding chunk `chunk_index`.
    pub fn chain_of(&self, chunk_index: u32) -> ChainId {
        let position = chunk_index as usize % self.chains.len();
        *self
            .chains
            .get(position)
            .expect("a layout has exactly stripe >= 1 chains (checked by StoredLayout::new)")
    }

    /// How many chunks a file of `length` bytes spans.
    pub fn chunks(&self, length: u64) -> u64 {
        length.div_ceil(u64::from(self.spec.chunk_size))
    }

    /// The longest file this layout can address: chunk indexes are 32 bits.
    pub fn length_max(&self) -> u64 {
        u64::from(self.spec.chunk_size) << 32
    }
}

impl std::fmt::Debug for StoredLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StoredLayout({:?}, chunk {} B, stripe {}: {:?})",
            self.spec.chain_table, self.spec.chunk_size, self.spec.stripe, self.chains
        )
    }
}

/// Resolves a chain table to its chains. The metadata service implements it
/// from the cluster manager's routing information; tests use a static map.
pub trait ChainTables: Send + Sync {
    /// The chains of `table` in table order, or `None` if it does not exist.
    fn chains(&self, table: ChainTableId) -> Option<Vec<ChainId>>;
}

/// A fixed set of chain tables.
#[derive(Clone, Debug, Default)]
pub struct StaticChainTables(pub BTreeMap<ChainTableId, Vec<ChainId>>);

impl StaticChainTables {
    /// One table holding chains `1..=chains`.
    pub fn single(table: ChainTableId, chains: u32) -> StaticChainTables {
        StaticChainTables(BTreeMap::from([(
            table,
            (1..=chains).map(ChainId).collect(),
        )]))
    }
}

impl ChainTables for StaticChainTables {
    fn chains(&self, table: ChainTableId) -> Option<Vec<ChainId>> {
        self.0.get(&table).cloned()
    }
}

/// Picks the chains of new files.
///
/// Each file takes `stripe` consecutive chains of its table, starting one
/// position after the previous file's start (per table, per namespace
/// instance). A round-robin cursor spreads files exactly evenly whatever the
/// pattern of inode ids (a hash of the id would leave a few percent of
/// random imbalance, and a plain `id % chains` would put every file on even
/// chains when a workload alternates mkdir and create). Instances start
/// their cursors at random positions so that they do not move in lockstep.
#[derive(Debug)]
pub(crate) struct Placement {
    cursors: Mutex<HashMap<ChainTableId, u64>>,
    seed: u64,
}

impl Placement {
    pub(crate) fn new(seed: u64) -> Placement {
        Placement {
            cursors: Mutex::new(HashMap::new()),
            seed,
        }
    }

    /// A layout for a new file following `spec`.
    pub(crate) fn choose(
        &self,
        spec: LayoutSpec,
        tables: &dyn ChainTables,
    ) -> Result<StoredLayout, LayoutError> {
        spec.validate()?;
        let table = tables
            .chains(spec.chain_table)
            .ok_or(LayoutError::UnknownTable(spec.chain_table))?;
        if table.len() < spec.stripe as usize {
            return Err(LayoutError::TableTooSmall {
                table: spec.chain_table,
                chains: table.len(),
                stripe: spec.stripe,
            });
        }
        let start = {
            // A poisoned lock only means another thread panicked between
            // two plain integer updates; the cursor is still a valid number.
            let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
            let cursor = cursors.entry(spec.chain_table).or_insert(self.seed);
            let start = *cursor;
            *cursor = cursor.wrapping_add(1);
            (start % table.len() as u64) as usize
        };
        let chains = (0..spec.stripe as usize)
            .map(|k| table[(start + k) % table.len()])
            .collect();
        StoredLayout::new(spec, chains)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(stripe: u32) -> LayoutSpec {
        LayoutSpec {
            chain_table: ChainTableId(1),
            chunk_size: 1 << 20,
            stripe,
        }
    }

    #[test]
    fn chunk_i_lives_on_chain_i_mod_stripe() {
        let layout =
            StoredLayout::new(spec(3), vec![ChainId(7), ChainId(8), ChainId(9)]).expect("valid");
        assert_eq!(layout.chain_of(0), ChainId(7));
        assert_eq!(layout.chain_of(4), ChainId(8));
        assert_eq!(layout.chain_of(u32::MAX), ChainId(7)); // 4294967295 % 3 == 0
        assert_eq!(layout.chunks(0), 0);
        assert_eq!(layout.chunks(1), 1);
        assert_eq!(layout.chunks(1 << 20), 1);
        assert_eq!(layout.chunks((1 << 20) + 1), 2);
        assert_eq!(layout.length_max(), 1 << 52);
    }

    #[test]
    fn invalid_layouts_are_refused() {
        assert_eq!(
            StoredLayout::new(spec(2), vec![ChainId(1)]),
            Err(LayoutError::ChainCount {
                stripe: 2,
                chains: 1
            })
        );
        let mut bad = spec(1);
        bad.chunk_size = 100_000;
        assert_eq!(bad.validate(), Err(LayoutError::ChunkSize(100_000)));
        bad.chunk_size = 1 << 27;
        assert_eq!(bad.validate(), Err(LayoutError::ChunkSize(1 << 27)));
        assert_eq!(spec(0).validate(), Err(LayoutError::Stripe(0)));
        assert_eq!(
            spec(STRIPE_MAX + 1).validate(),
            Err(LayoutError::Stripe(STRIPE_MAX + 1))
        );
    }

    #[test]
    fn placement_checks_the_table() {
        let tables = StaticChainTables::single(ChainTableId(1), 4);
        let placement = Placement::new(0);
        assert!(matches!(
            placement.choose(spec(5), &tables),
            Err(LayoutError::TableTooSmall { .. })
        ));
        let mut other = spec(1);
        other.chain_table = ChainTableId(2);
        assert_eq!(
            placement.choose(other, &tables),
            Err(LayoutError::UnknownTable(ChainTableId(2)))
        );
    }

    /// 10,000 files spread over 16 chains: with stripe 1 each chain holds
    /// the first chunk of exactly 625 files; with stripe 4 each chain is in
    /// exactly 2,500 layouts, and chunk 0 is still spread evenly.
    #[test]
    fn placement_spreads_files_evenly() {
        let tables = StaticChainTables::single(ChainTableId(1), 16);
        for stripe in [1, 4, 16] {
            let placement = Placement::new(rand::random());
            let mut first = BTreeMap::<ChainId, u32>::new();
            let mut member = BTreeMap::<ChainId, u32>::new();
            for _ in 0..10_000 {
                let layout = placement.choose(spec(stripe), &tables).expect("fits");
                *first.entry(layout.chain_of(0)).or_default() += 1;
                for &chain in layout.chains() {
                    *member.entry(chain).or_default() += 1;
                }
            }
            assert_eq!(first.len(), 16);
            for (chain, count) in &first {
                assert!(
                    (624..=626).contains(count),
                    "stripe {stripe}: {chain:?} first of {count}"
                );
            }
            for (chain, count) in &member {
                let expected = 10_000 * stripe / 16;
                assert!(
                    count.abs_diff(expected) <= stripe,
                    "stripe {stripe}: {chain:?} in {count} layouts"
                );
            }
        }
    }
}
