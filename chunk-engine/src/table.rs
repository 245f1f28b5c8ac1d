//! The in-memory chunk table: each chunk's committed version and its pending
//! version, the slots readers hold, each chain's usage, and the slot
//! allocator. Nothing here does I/O, so every transition can be followed (and
//! tested) without a device. The journal writer applies durable records to it
//! ([`ChunkTable::apply`]), and recovery rebuilds it by applying the
//! checkpoint and the journal the same way, with prepared versions read as
//! committed.

use std::collections::{BTreeMap, HashMap};

use flyfs_proto::ids::{ChainId, ChainVersion, ChunkVersion, ClientId, RequestId};
// Keys are engine-chosen ids, not attacker-controlled strings, so a fast
// non-cryptographic hash is safe here; SipHash showed in read profiles.
use rustc_hash::{FxHashMap, FxHashSet};

use crate::ChunkKey;
use crate::alloc::Allocator;
use crate::format::{ChunkMeta, Record, SlotId};

/// A chunk's pending version: written to its slot, not yet committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingInfo {
    pub version: ChunkVersion,
    pub chain_version: ChainVersion,
    pub slot: SlotId,
    pub len: u32,
    pub crc: u32,
    pub in_place: bool,
    pub client: ClientId,
    pub request: RequestId,
    /// The durable `Prepare` record of this version, once the journal has
    /// made it durable: committing is then only a change in memory, and
    /// aborting must record the previous state durably.
    pub prepared: Option<ChunkMeta>,
}

/// Everything the engine knows of one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    pub key: ChunkKey,
    pub committed: Option<ChunkMeta>,
    pub pending: Option<PendingInfo>,
}

/// Space a chain's committed chunks take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainUsage {
    pub chunks: u64,
    /// Sum of chunk lengths.
    pub used_bytes: u64,
    /// Sum of slot sizes.
    pub allocated_bytes: u64,
}

/// A chunk's committed version, as the table holds it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Committed {
    pub meta: ChunkMeta,
    /// Bytes of the slot ever written while this chunk owned it. An in-place
    /// append is allowed only past this mark, so it never overwrites bytes a
    /// concurrent reader of an older or aborted version may be reading.
    pub slot_written: u32,
}

/// Every chunk the engine holds, by key, and the slots they occupy. Behind
/// one mutex in the open engine, never held across an await.
pub(crate) struct ChunkTable {
    pub committed: BTreeMap<ChunkKey, Committed>,
    pub pending: FxHashMap<ChunkKey, PendingInfo>,
    pub alloc: Allocator,
    /// Readers holding a slot.
    pins: FxHashMap<SlotId, u32>,
    /// Slots released while pinned; freed when the last reader lets go.
    deferred: FxHashSet<SlotId>,
    pub usage: FxHashMap<ChainId, ChainUsage>,
}

impl ChunkTable {
    pub fn new(alloc: Allocator) -> ChunkTable {
        ChunkTable {
            committed: BTreeMap::new(),
            pending: FxHashMap::default(),
            alloc,
            pins: FxHashMap::default(),
            deferred: FxHashSet::default(),
            usage: FxHashMap::default(),
        }
    }

    /// Gives a slot back to the allocator, or defers that while it is read.
    pub fn release(&mut self, slot: SlotId) {
        if self.pins.contains_key(&slot) {
            self.deferred.insert(slot);
        } else {
            self.alloc.free(slot);
        }
    }

    pub fn pin(&mut self, slot: SlotId) {
        *self.pins.entry(slot).or_default() += 1;
    }

    pub fn unpin(&mut self, slot: SlotId) {
        let count = self
            .pins
            .get_mut(&slot)
            .expect("unpin of a slot that is not pinned");
        *count -= 1;
        if *count == 0 {
            self.pins.remove(&slot);
            if self.deferred.remove(&slot) {
                self.alloc.free(slot);
            }
        }
    }

    fn account(&mut self, meta: &ChunkMeta, sign: i64) {
        let usage = self.usage.entry(meta.chain).or_default();
        let apply = |value: &mut u64, delta: u64| {
            *value = if sign > 0 {
                *value + delta
            } else {
                *value - delta
            };
        };
        apply(&mut usage.chunks, 1);
        apply(&mut usage.used_bytes, u64::from(meta.len));
        apply(&mut usage.allocated_bytes, meta.slot.bytes());
    }

    /// Applies a durable journal record. `live` is false during recovery,
    /// when the allocator is rebuilt afterwards instead of kept in step, and
    /// a prepared version counts as committed.
    pub fn apply(&mut self, record: &Record, live: bool) {
        match record {
            Record::Prepare(meta) if live => {
                let key = ChunkKey::new(meta.chain, meta.chunk);
                let pending = self.pending.get_mut(&key);
                debug_assert!(
                    pending
                        .as_ref()
                        .is_some_and(|p| p.version == meta.version && p.slot == meta.slot),
                    "a Prepare record is applied while its write, not dropped, holds the chunk lock"
                );
                if let Some(p) = pending
                    && p.version == meta.version
                    && p.slot == meta.slot
                {
                    p.prepared = Some(*meta);
                }
            }
            Record::Put(meta) | Record::Prepare(meta) => {
                let key = ChunkKey::new(meta.chain, meta.chunk);
                let old = self.committed.get(&key).copied();
                let slot_written = match old {
                    Some(old) if old.meta.slot == meta.slot => old.slot_written.max(meta.len),
                    _ => meta.len,
                };
                self.committed.insert(
                    key,
                    Committed {
                        meta: *meta,
                        slot_written,
                    },
                );
                self.account(meta, 1);
                if let Some(old) = old {
                    self.account(&old.meta, -1);
                    if live && old.meta.slot != meta.slot {
                        self.release(old.meta.slot);
                    }
                }
                match self.pending.get(&key).copied() {
                    // The commit of this pending version.
                    Some(p) if p.version == meta.version && p.slot == meta.slot => {
                        self.pending.remove(&key);
                    }
                    // A prepared version aborted: the record restores the
                    // state before it.
                    Some(p) if p.prepared.is_some() => {
                        self.pending.remove(&key);
                        if live && !p.in_place {
                            self.release(p.slot);
                        }
                    }
                    _ => {}
                }
            }
            Record::Remove { chain, chunk } => {
                let key = ChunkKey::new(*chain, *chunk);
                if let Some(old) = self.committed.remove(&key) {
                    self.account(&old.meta, -1);
                    if live {
                        self.release(old.meta.slot);
                    }
                }
                if let Some(pending) = self.pending.remove(&key)
                    && !pending.in_place
                {
                    self.release(pending.slot);
                }
            }
        }
    }

    /// The state recovery would find, in key order: every committed chunk,
    /// with its prepared version where it has one, and the prepared versions
    /// of chunks not yet committed. A checkpoint stores exactly this.
    pub fn durable_view(&self) -> Vec<ChunkMeta> {
        let mut extra: Vec<ChunkMeta> = self
            .pending
            .iter()
            .filter(|(key, _)| !self.committed.contains_key(key))
            .filter_map(|(_, p)| p.prepared)
            .collect();
        extra.sort_unstable_by_key(|m| ChunkKey::new(m.chain, m.chunk));
        let mut extra = extra.into_iter().peekable();
        let mut view = Vec::with_capacity(self.committed.len() + extra.len());
        for (key, committed) in &self.committed {
            while let Some(m) = extra.next_if(|m| ChunkKey::new(m.chain, m.chunk) < *key) {
                view.push(m);
            }
            let prepared = self.pending.get(key).and_then(|p| p.prepared);
            view.push(prepared.unwrap_or(committed.meta));
        }
        view.extend(extra);
        view
    }

    pub fn info(&self, key: ChunkKey) -> Option<ChunkInfo> {
        let committed = self.committed.get(&key).map(|c| c.meta);
        let pending = self.pending.get(&key).copied();
        (committed.is_some() || pending.is_some()).then_some(ChunkInfo {
            key,
            committed,
            pending,
        })
    }

    /// Checks that the allocator and the metadata agree: every slot in use
    /// belongs to exactly one committed or pending version, or to a reader
    /// holding a released slot. For tests and `flyfs admin`.
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut owners: HashMap<SlotId, ChunkKey> = HashMap::new();
        let mut claim = |slot: SlotId, key: ChunkKey| match owners.insert(slot, key) {
            Some(other) if other != key => {
                Err(format!("slot {slot:?} owned by {other:?} and {key:?}"))
            }
            _ => Ok(()),
        };
        for (key, c) in &self.committed {
            claim(c.meta.slot, *key)?;
        }
        for (key, p) in &self.pending {
            claim(p.slot, *key)?;
        }
        let mut expected: Vec<SlotId> = owners
            .keys()
            .copied()
            .chain(self.deferred.iter().copied())
            .collect();
        expected.sort();
        expected.dedup();
        let used = self.alloc.used_slots();
        if used != expected {
            let leaked: Vec<_> = used.iter().filter(|s| !expected.contains(s)).collect();
            let missing: Vec<_> = expected.iter().filter(|s| !used.contains(s)).collect();
            return Err(format!(
                "allocator disagrees with metadata: leaked {leaked:?}, unallocated {missing:?}"
            ));
        }
        Ok(())
    }
}
