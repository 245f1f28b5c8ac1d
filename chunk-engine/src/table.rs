//! The in-memory chunk table: each chunk's committed version and its pending
//! version, the slots readers hold, each chain's usage, and the slot
//! allocator. Nothing here does I/O, so every transition can be followed (and
//! tested) without a device. The journal writer applies durable records to it
//! ([`ChunkTable::apply`]), and recovery rebuilds it by applying the
//! checkpoint and the journal the same way, with prepared versions read as
//! committed.
//!
//! The operations (engine.rs) decide here, under the table's mutex, what a
//! request does: how a write lays out its version ([`WritePlan`]), what a
//! commit, abort or remove must make durable, which slot a read pins. They
//! do the I/O elsewhere (device_io.rs), without the mutex, and come back
//! here to record its result.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use flyfs_proto::ids::{ChainId, ChainVersion, ChunkVersion, ClientId, RequestId};
use parking_lot::Mutex;
// Keys are engine-chosen ids, not attacker-controlled strings, so a fast
// non-cryptographic hash is safe here; SipHash showed in read profiles.
use rustc_hash::{FxHashMap, FxHashSet};

use crate::alloc::Allocator;
use crate::format::{ChunkMeta, PatchExtent, Record, SlotId};
use crate::request::{ReadVersion, WriteExtent, WriteOp, WriteRequest};

/// The extents one Patch record wrote, with the version it made.
#[derive(Clone, Debug)]
pub(crate) struct Layer {
    pub version: ChunkVersion,
    pub extents: Arc<Vec<PatchExtent>>,
}

/// Bytes of a version that are not (or not known to be) in its slot yet:
/// Patch layers in the order they were written. A version's bytes are its
/// slot's bytes with every layer written over them in turn.
pub(crate) type Overlay = Arc<Vec<Layer>>;

/// Writes `overlay`'s bytes that fall in chunk bytes `start..start +
/// buf.len()` into `buf`, which holds those chunk bytes as the slot has them.
pub(crate) fn overlay_onto(overlay: &[Layer], start: u64, buf: &mut [u8]) {
    let end = start + buf.len() as u64;
    for extent in overlay.iter().flat_map(|layer| layer.extents.iter()) {
        let (from, to) = (u64::from(extent.offset), u64::from(extent.end()));
        let (lo, hi) = (from.max(start), to.min(end));
        if lo < hi {
            buf[(lo - start) as usize..(hi - start) as usize]
                .copy_from_slice(&extent.data[(lo - from) as usize..(hi - from) as usize]);
        }
    }
}

/// Whether any extent of `overlay` touches chunk bytes `start..end`.
pub(crate) fn overlay_touches(overlay: &[Layer], start: u64, end: u64) -> bool {
    overlay
        .iter()
        .flat_map(|layer| layer.extents.iter())
        .any(|e| u64::from(e.offset) < end && u64::from(e.end()) > start)
}

/// When a write may be a patch (see [`WritePlan::Patch`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PatchLimits {
    /// The device's format has Patch records (version 4) and the engine is
    /// configured to use them.
    pub enabled: bool,
    /// Most payload bytes of one patch.
    pub bytes_max: u64,
    /// Most journal bytes of every pending patch together.
    pub pending_bytes_max: u64,
}

/// Journal bytes the Patch record of an update would take (0 for other ops).
fn patch_record_bytes_of(op: &WriteOp) -> u64 {
    match op {
        WriteOp::Update { data, .. } => 8 + data.len() as u64 + 67,
        WriteOp::Extents(extents) => {
            extents.iter().map(|e| 8 + e.data.len() as u64).sum::<u64>() + 67
        }
        _ => 0,
    }
}

/// Bytes a pending Patch record takes in the journal (and in a checkpoint
/// that carries it): what the bound on pending patches counts.
fn patch_record_bytes(extents: &[PatchExtent]) -> u64 {
    extents.iter().map(|e| 8 + e.data.len() as u64).sum::<u64>() + 67
}
use crate::{ChunkKey, EngineError};

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

impl PendingInfo {
    /// The metadata this version is committed (or prepared) with.
    pub(crate) fn meta(&self, key: ChunkKey, timestamp_us: u64) -> ChunkMeta {
        ChunkMeta {
            chain: key.chain,
            chunk: key.chunk,
            slot: self.slot,
            len: self.len,
            version: self.version,
            chain_version: self.chain_version,
            crc: self.crc,
            timestamp_us,
            client: self.client,
            request: self.request,
        }
    }
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

/// Recovery only: the layers of a committed version whose chunk a prepared
/// version moved to another slot, kept in case the prepared version is
/// aborted (see `ChunkTable::replay_stash`).
struct ReplayStash {
    slot: SlotId,
    version: ChunkVersion,
    overlay: Overlay,
}

impl ReplayStash {
    /// Whether a version `version` in `slot` is the stashed one restored by
    /// an abort. The slot alone does not say so: the slot the chunk left is
    /// free once the prepared version is committed (in memory, without a
    /// record), so the chunk's next version may be written into that same
    /// slot anew, whole, and the stashed layers are not part of its bytes;
    /// laying them over it would corrupt it. Only the abort's Put restates
    /// the old committed version itself.
    fn restored_by(&self, slot: SlotId, version: ChunkVersion) -> bool {
        self.slot == slot && self.version == version
    }
}

/// Every chunk the engine holds, by key, and the slots they occupy. Behind
/// one mutex in the open engine, never held across an await.
pub(crate) struct ChunkTable {
    pub committed: BTreeMap<ChunkKey, Committed>,
    pub pending: FxHashMap<ChunkKey, PendingInfo>,
    /// The Patch layers of committed versions not yet written into their
    /// slots (a checkpoint writes them, and recovery redoes them).
    pub overlays: FxHashMap<ChunkKey, Overlay>,
    /// The extents of pending versions made by a patch (in the committed
    /// version's slot, `in_place`); the pending version's bytes are the
    /// committed version's with these written over them.
    pub pending_layers: FxHashMap<ChunkKey, Arc<Vec<PatchExtent>>>,
    /// Journal bytes the Patch records of `pending_layers` take: bounded
    /// (`plan_write` falls back to copy-on-write), because a prepared one is
    /// carried by every checkpoint until it ends, and every one is memory a
    /// peer's writes make the engine hold.
    pub pending_patch_bytes: u64,
    /// Recovery only: the layers of the slot a chunk left for a prepared
    /// version in another slot (recovery reads a Prepare as a Put), with the
    /// committed version they belonged to. An abort of that version (a Put
    /// back to that very version in the old slot) restores them; any other
    /// record of the chunk drops them.
    replay_stash: FxHashMap<ChunkKey, ReplayStash>,
    pub alloc: Allocator,
    /// Readers holding a slot, and the checkpoint writing layers into it.
    pins: FxHashMap<SlotId, u32>,
    /// The read epoch: readers pin with the current one, and a checkpoint
    /// that is about to write Patch layers into their slots starts a new one
    /// and waits until no reader of an older epoch is left (a reader from
    /// before may be reading a version without those layers from the very
    /// bytes the checkpoint rewrites; later readers have them in memory).
    pub read_epoch: u64,
    /// Readers per epoch.
    epoch_pins: BTreeMap<u64, u32>,
    /// Signalled when the last reader of an epoch older than the current
    /// one lets go.
    pub epoch_drained: tokio::sync::watch::Sender<()>,
    /// Slots released while pinned; freed when the last reader lets go.
    deferred: FxHashSet<SlotId>,
    pub usage: FxHashMap<ChainId, ChainUsage>,
}

impl ChunkTable {
    pub fn new(alloc: Allocator) -> ChunkTable {
        ChunkTable {
            committed: BTreeMap::new(),
            pending: FxHashMap::default(),
            overlays: FxHashMap::default(),
            pending_layers: FxHashMap::default(),
            pending_patch_bytes: 0,
            replay_stash: FxHashMap::default(),
            alloc,
            pins: FxHashMap::default(),
            read_epoch: 0,
            epoch_pins: BTreeMap::new(),
            epoch_drained: tokio::sync::watch::Sender::new(()),
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

    fn pin(&mut self, slot: SlotId) -> u64 {
        *self.pins.entry(slot).or_default() += 1;
        *self.epoch_pins.entry(self.read_epoch).or_default() += 1;
        self.read_epoch
    }

    /// Whether a reader that pinned before epoch `epoch` still holds its pin.
    pub fn readers_before(&self, epoch: u64) -> bool {
        self.epoch_pins.range(..epoch).next().is_some()
    }

    fn unpin(&mut self, slot: SlotId, epoch: u64) {
        let readers = self
            .epoch_pins
            .get_mut(&epoch)
            .expect("unpin of an epoch that is not pinned");
        *readers -= 1;
        if *readers == 0 {
            self.epoch_pins.remove(&epoch);
            if epoch < self.read_epoch {
                self.epoch_drained.send_replace(());
            }
        }
        self.unhold(slot);
    }

    /// Keeps `slot` from being reused until `unhold`, as a reader's pin does
    /// (a release meanwhile is deferred), without taking part in read epochs.
    fn hold(&mut self, slot: SlotId) {
        *self.pins.entry(slot).or_default() += 1;
    }

    fn unhold(&mut self, slot: SlotId) {
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

    /// Removes a chunk's pending version, with its patch extents if it has them.
    fn take_pending(&mut self, key: ChunkKey) -> Option<PendingInfo> {
        let pending = self.pending.remove(&key)?;
        if let Some(layer) = self.pending_layers.remove(&key) {
            self.pending_patch_bytes -= patch_record_bytes(&layer);
        }
        Some(pending)
    }

    /// Recovery: the layers a version of `key` in `slot` numbered `version`
    /// would have over its slot's bytes, as the records replayed so far
    /// leave them.
    pub fn replay_layers(&self, key: ChunkKey, slot: SlotId, version: ChunkVersion) -> Vec<Layer> {
        let overlay = match self.committed.get(&key) {
            Some(c) if c.meta.slot == slot => self.overlay(key),
            _ => self
                .replay_stash
                .get(&key)
                .filter(|stash| stash.restored_by(slot, version))
                .map(|stash| stash.overlay.clone()),
        };
        overlay
            .map(|o| o.iter().filter(|l| l.version <= version).cloned().collect())
            .unwrap_or_default()
    }

    /// Ends recovery's replay: what it stashed is of no use to a running engine.
    pub fn replay_done(&mut self) {
        self.replay_stash = FxHashMap::default();
    }

    /// The Patch layers of `key`'s committed version, if any are unapplied.
    pub fn overlay(&self, key: ChunkKey) -> Option<Overlay> {
        self.overlays.get(&key).cloned()
    }

    /// The layers a pending version's bytes need over its slot's: the
    /// committed version's when it shares the slot (an in-place append, a
    /// shrink or a patch builds on them), and its own extents if a patch.
    pub fn pending_overlay(&self, key: ChunkKey, pending: &PendingInfo) -> Option<Overlay> {
        let shares_slot = self
            .committed
            .get(&key)
            .is_some_and(|c| c.meta.slot == pending.slot);
        let base = if shares_slot { self.overlay(key) } else { None };
        match self.pending_layers.get(&key) {
            None => base,
            Some(extents) => {
                let mut layers = base.map(|b| (*b).clone()).unwrap_or_default();
                layers.push(Layer {
                    version: pending.version,
                    extents: extents.clone(),
                });
                Some(Arc::new(layers))
            }
        }
    }

    /// The record that commits or prepares `pending` with `meta`: a Patch
    /// record carrying its extents if it is a patch.
    pub fn record_for(&self, key: ChunkKey, meta: ChunkMeta, prepare: bool) -> Record {
        match self.pending_layers.get(&key) {
            Some(extents) => Record::Patch {
                meta,
                prepare,
                extents: extents.clone(),
            },
            None if prepare => Record::Prepare(meta),
            None => Record::Put(meta),
        }
    }

    /// Applies a durable journal record. `live` is false during recovery,
    /// when the allocator is rebuilt afterwards instead of kept in step, and
    /// a prepared version counts as committed.
    pub fn apply(&mut self, record: &Record, live: bool) {
        match record {
            Record::Prepare(meta)
            | Record::Patch {
                meta,
                prepare: true,
                ..
            } if live => {
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
            Record::Put(meta) | Record::Prepare(meta) | Record::Patch { meta, .. } => {
                let key = ChunkKey::new(meta.chain, meta.chunk);
                let old = self.committed.get(&key).copied();
                // The layers of the new committed version: the old one's
                // in the same slot, less those of versions above this one
                // (a prepared patch this record aborts), and its own.
                let old_overlay = self.overlays.remove(&key);
                let stashed = if live {
                    None
                } else {
                    self.replay_stash.remove(&key)
                };
                let own = match record {
                    Record::Patch { extents, .. } => Some(extents.clone()),
                    _ => None,
                };
                let base_overlay = match old {
                    Some(old) if old.meta.slot == meta.slot => old_overlay,
                    _ => {
                        if !live
                            && matches!(record, Record::Prepare(_))
                            && let (Some(old), Some(overlay)) = (old, old_overlay)
                        {
                            self.replay_stash.insert(
                                key,
                                ReplayStash {
                                    slot: old.meta.slot,
                                    version: old.meta.version,
                                    overlay,
                                },
                            );
                        }
                        stashed
                            .filter(|stash| stash.restored_by(meta.slot, meta.version))
                            .map(|stash| stash.overlay)
                    }
                };
                let mut layers: Vec<Layer> = match base_overlay {
                    Some(overlay) => overlay
                        .iter()
                        .filter(|l| {
                            l.version < meta.version || (own.is_none() && l.version == meta.version)
                        })
                        .cloned()
                        .collect(),
                    _ => Vec::new(),
                };
                if let Some(extents) = own {
                    layers.push(Layer {
                        version: meta.version,
                        extents,
                    });
                }
                if !layers.is_empty() {
                    self.overlays.insert(key, Arc::new(layers));
                }
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
                        self.take_pending(key);
                    }
                    // A prepared version aborted: the record restores the
                    // state before it.
                    Some(p) if p.prepared.is_some() => {
                        self.take_pending(key);
                        if live && !p.in_place {
                            self.release(p.slot);
                        }
                    }
                    _ => {}
                }
            }
            Record::Remove { chain, chunk } => {
                let key = ChunkKey::new(*chain, *chunk);
                self.overlays.remove(&key);
                self.replay_stash.remove(&key);
                if let Some(old) = self.committed.remove(&key) {
                    self.account(&old.meta, -1);
                    if live {
                        self.release(old.meta.slot);
                    }
                }
                if let Some(pending) = self.take_pending(key)
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

/// How a write will lay out its new pending version. `overlay` is the
/// committed version's unapplied Patch layers: its bytes are its slot's with
/// those written over them.
#[derive(Clone, Debug)]
pub(crate) enum WritePlan {
    /// Append past the committed length into the same slot.
    InPlace {
        slot: SlotId,
        base: ChunkMeta,
        overlay: Option<Overlay>,
    },
    /// Build the new contents in a fresh slot.
    Cow {
        slot: SlotId,
        base: Option<ChunkMeta>,
        overlay: Option<Overlay>,
    },
    /// Shrink: same slot, shorter length.
    Shrink {
        base: ChunkMeta,
        overlay: Option<Overlay>,
    },
    /// Overwrite bytes inside the committed length without copying the
    /// chunk: the new bytes go into the journal (a Patch record) and into
    /// memory, and a checkpoint writes them into the slot later.
    Patch {
        base: ChunkMeta,
        overlay: Option<Overlay>,
    },
}

impl WritePlan {
    /// The slot the new version lives in, and whether that is the committed
    /// version's slot (written in place) rather than a fresh one.
    pub fn target(&self) -> (SlotId, bool) {
        match self {
            WritePlan::InPlace { slot, .. } => (*slot, true),
            WritePlan::Shrink { base, .. } | WritePlan::Patch { base, .. } => (base.slot, true),
            WritePlan::Cow { slot, .. } => (*slot, false),
        }
    }
}

/// What a checkpoint writes, taken from the table at one instant: the
/// committed Patch layers it writes into their slots, the durable view, and
/// the prepared patches it carries (their layers cannot be written in place
/// while their chunk's committed version is read from the same slot).
#[derive(Debug)]
pub(crate) struct CheckpointPlan {
    /// Readers pinned before this epoch must be gone before the layers are
    /// written.
    pub epoch: u64,
    pub apply: Vec<(ChunkKey, ChunkMeta, Overlay)>,
    pub view: Vec<ChunkMeta>,
    pub carried: Vec<Record>,
}

/// The smallest slot class (log2 of its size) that holds `len` bytes.
fn slot_class(len: u64, class_log2_min: u8) -> u8 {
    (len.max(1).next_power_of_two().trailing_zeros() as u8).max(class_log2_min)
}

/// What a commit takes, as the table finds it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum CommitStep {
    /// Nothing more: the version was committed already (a retry), or was
    /// prepared and is now committed in memory.
    Done(ChunkMeta),
    /// A durable `Put` record of this pending version.
    Record(PendingInfo),
}

/// What a remove finds of a chunk.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Presence {
    pub committed: bool,
    pub pending: bool,
    /// Whether the pending version is prepared, i.e. durable.
    pub prepared: bool,
}

/// The version a read has pinned: where it lives and what it holds.
#[derive(Clone, Debug)]
pub(crate) struct ReadTarget {
    pub slot: SlotId,
    pub len: u32,
    pub crc: u32,
    pub version: ChunkVersion,
    /// Patch layers to write over the slot's bytes.
    pub overlay: Option<Overlay>,
    /// The read epoch of the pin.
    pub epoch: u64,
}

/// Unpins a slot when a read ends, however it ends.
pub(crate) struct SlotPin<'a> {
    table: &'a Mutex<ChunkTable>,
    slot: SlotId,
    epoch: u64,
}

impl<'a> SlotPin<'a> {
    /// Takes over the pin [`ChunkTable::pin_for_read`] put on `target`'s slot.
    pub fn new(table: &'a Mutex<ChunkTable>, target: &ReadTarget) -> SlotPin<'a> {
        SlotPin {
            table,
            slot: target.slot,
            epoch: target.epoch,
        }
    }
}

impl Drop for SlotPin<'_> {
    fn drop(&mut self) {
        self.table.lock().unpin(self.slot, self.epoch);
    }
}

/// The operations' decisions. Each runs under the table's mutex, with the
/// operation holding its chunk's lock, and does no I/O.
impl ChunkTable {
    /// Decides how a write lays out its new pending version, allocating a
    /// fresh slot when it needs one. Refuses a version not above the
    /// committed one, and any write over a prepared version.
    pub fn plan_write(
        &mut self,
        req: &WriteRequest,
        extent: WriteExtent,
        class_log2_min: u8,
        patches: PatchLimits,
        device: &Arc<str>,
    ) -> Result<WritePlan, EngineError> {
        let key = req.key;
        let WriteExtent {
            offset,
            data_len,
            end: new_end,
        } = extent;
        let base = self.committed.get(&key).copied();
        // A prepared version is durable: only its commit or abort may
        // end it, never a write that would silently replace it.
        if let Some(p) = self.pending.get(&key)
            && p.prepared.is_some()
        {
            return Err(EngineError::VersionConflict {
                key,
                requested: req.version,
                committed: base.map(|b| b.meta.version),
                pending: Some(p.version),
            });
        }
        if let Some(base) = base
            && req.version <= base.meta.version
        {
            return Err(EngineError::VersionConflict {
                key,
                requested: req.version,
                committed: Some(base.meta.version),
                pending: self.pending.get(&key).map(|p| p.version),
            });
        }
        let base_len = base.map_or(0, |b| u64::from(b.meta.len));
        let (new_len, appends) = match &req.op {
            WriteOp::Update { .. } => (base_len.max(new_end), u64::from(offset) >= base_len),
            WriteOp::Extents(extents) => (
                base_len.max(new_end),
                extents.len() == 1 && u64::from(offset) >= base_len,
            ),
            WriteOp::Replace { .. } => (data_len, false),
            WriteOp::Truncate { len } => (u64::from(*len), u64::from(*len) >= base_len),
        };
        let overlay = self.overlay(key);
        // An in-place append rewrites the committed tail block from the
        // slot: not while a layer not yet in the slot changes that block, or
        // a reader of an older version would see the layer's bytes appear.
        let tail_block_patched = |b: &Committed| {
            let aligned = u64::from(b.meta.len) & !(crate::format::BLOCK - 1);
            overlay
                .as_deref()
                .is_some_and(|o| overlay_touches(o, aligned, u64::from(b.meta.len)))
        };
        let is_update = matches!(req.op, WriteOp::Update { .. } | WriteOp::Extents(_));
        let patch_bytes = patch_record_bytes_of(&req.op);
        Ok(match base {
            Some(b) if matches!(req.op, WriteOp::Truncate { .. }) && new_len <= base_len => {
                WritePlan::Shrink {
                    base: b.meta,
                    overlay,
                }
            }
            Some(b)
                if appends
                    && base_len >= u64::from(b.slot_written)
                    && new_len <= b.meta.slot.bytes()
                    && !tail_block_patched(&b) =>
            {
                WritePlan::InPlace {
                    slot: b.meta.slot,
                    base: b.meta,
                    overlay,
                }
            }
            // A patch replaces any pending version, whose bytes it frees.
            Some(b)
                if is_update
                    && patches.enabled
                    && data_len > 0
                    && new_end <= base_len
                    && data_len <= patches.bytes_max
                    && self.pending_patch_bytes
                        - self
                            .pending_layers
                            .get(&key)
                            .map_or(0, |l| patch_record_bytes(l))
                        + patch_bytes
                        <= patches.pending_bytes_max =>
            {
                WritePlan::Patch {
                    base: b.meta,
                    overlay,
                }
            }
            _ => {
                let class = slot_class(new_len, class_log2_min);
                let slot = self
                    .alloc
                    .allocate(class)
                    .ok_or_else(|| EngineError::NoSpace {
                        device: device.clone(),
                        slot_bytes: 1 << class,
                    })?;
                // A replace keeps nothing of the old contents.
                let (base, overlay) = if matches!(req.op, WriteOp::Replace { .. }) {
                    (None, None)
                } else {
                    (base.map(|b| b.meta), overlay)
                };
                WritePlan::Cow {
                    slot,
                    base,
                    overlay,
                }
            }
        })
    }

    /// Gives back the fresh slot of a write whose I/O failed: the write then
    /// changed nothing.
    pub fn abandon_write(&mut self, plan: &WritePlan) {
        if let WritePlan::Cow { slot, .. } = *plan {
            self.release(slot);
        }
    }

    /// Installs the pending version that a write's I/O produced as `plan`
    /// laid it out; `layer` holds a patch's extents.
    pub fn install_pending(
        &mut self,
        key: ChunkKey,
        plan: &WritePlan,
        pending: PendingInfo,
        layer: Option<Arc<Vec<PatchExtent>>>,
    ) {
        if let WritePlan::InPlace { .. } = plan
            && let Some(committed) = self.committed.get_mut(&key)
        {
            committed.slot_written = committed.slot_written.max(pending.len);
        }
        // The replaced pending version (if any) goes only now, so that a
        // failed write changes nothing.
        let replaced = self.take_pending(key);
        self.pending.insert(key, pending);
        if let Some(layer) = layer {
            self.pending_patch_bytes += patch_record_bytes(&layer);
            self.pending_layers.insert(key, layer);
        }
        if let Some(old) = replaced
            && !old.in_place
        {
            self.release(old.slot);
        }
    }

    /// Takes what a checkpoint writes, and starts a new read epoch (see
    /// [`CheckpointPlan`]).
    pub fn checkpoint_plan(&mut self) -> CheckpointPlan {
        self.read_epoch += 1;
        let apply: Vec<(ChunkKey, ChunkMeta, Overlay)> = self
            .overlays
            .iter()
            .filter_map(|(key, overlay)| {
                let meta = self.committed.get(key)?.meta;
                Some((*key, meta, overlay.clone()))
            })
            .collect();
        // The checkpoint writes these layers into these slots while commits
        // go on in memory: a prepared version committed meanwhile moves its
        // chunk out of the slot, and the slot must not be given to another
        // chunk whose bytes the layers would then overwrite. Held until
        // `checkpoint_applied`.
        for (_, meta, _) in &apply {
            self.hold(meta.slot);
        }
        let mut carried: Vec<(ChunkKey, Record)> = self
            .pending
            .iter()
            .filter_map(|(key, p)| {
                let meta = p.prepared?;
                let extents = self.pending_layers.get(key)?.clone();
                Some((
                    *key,
                    Record::Patch {
                        meta,
                        prepare: true,
                        extents,
                    },
                ))
            })
            .collect();
        carried.sort_by_key(|(key, _)| *key);
        CheckpointPlan {
            epoch: self.read_epoch,
            apply,
            view: self.durable_view(),
            carried: carried.into_iter().map(|(_, r)| r).collect(),
        }
    }

    /// Lets go of the slots a checkpoint held, and drops the layers it wrote
    /// into them and made durable: the leading layers of each chunk's overlay that are the very
    /// ones it wrote (a prepared patch committed in memory since may have
    /// added one after them).
    pub fn checkpoint_applied(&mut self, plan: &CheckpointPlan) {
        for (key, meta, applied) in &plan.apply {
            self.unhold(meta.slot);
            let Some(current) = self.overlays.get(key) else {
                continue;
            };
            if self.committed.get(key).map(|c| c.meta.slot) != Some(meta.slot) {
                continue;
            }
            let done = current
                .iter()
                .zip(applied.iter())
                .take_while(|(a, b)| Arc::ptr_eq(&a.extents, &b.extents))
                .count();
            if done == current.len() {
                self.overlays.remove(key);
            } else if done > 0 {
                let rest = Arc::new(current[done..].to_vec());
                self.overlays.insert(*key, rest);
            }
        }
    }

    /// Drops the pending version `installed` whose `Prepare` record failed,
    /// if it is still there.
    pub fn drop_unprepared(&mut self, key: ChunkKey, installed: &PendingInfo) {
        if self
            .pending
            .get(&key)
            .is_some_and(|p| p.version == installed.version && p.slot == installed.slot)
        {
            self.take_pending(key);
            if !installed.in_place {
                self.release(installed.slot);
            }
        }
    }

    /// Decides what committing `version` takes: nothing (a retry, or a
    /// prepared version, which this commits in memory) or a `Put` record.
    pub fn commit_step(
        &mut self,
        key: ChunkKey,
        version: ChunkVersion,
    ) -> Result<CommitStep, EngineError> {
        let committed = self.committed.get(&key).map(|c| c.meta);
        match self.pending.get(&key) {
            Some(&PendingInfo {
                version: v,
                prepared: Some(meta),
                ..
            }) if v == version => {
                // Exactly what recovery makes of the Prepare record.
                let record = self.record_for(key, meta, false);
                self.apply(&record, true);
                Ok(CommitStep::Done(meta))
            }
            Some(p) if p.version == version => Ok(CommitStep::Record(*p)),
            pending => match committed {
                Some(meta) if meta.version == version => Ok(CommitStep::Done(meta)),
                None if pending.is_none() => Err(EngineError::NotFound { key }),
                _ => Err(EngineError::VersionConflict {
                    key,
                    requested: version,
                    committed: committed.map(|m| m.version),
                    pending: pending.map(|p| p.version),
                }),
            },
        }
    }

    /// The durable record that aborts pending version `version` if it is
    /// prepared: a `Put` of the committed state, or a `Remove` when there is
    /// none. `None` when that version is not pending or not prepared.
    pub fn abort_record(&self, key: ChunkKey, version: ChunkVersion) -> Option<Record> {
        match self.pending.get(&key) {
            Some(p) if p.version == version && p.prepared.is_some() => {
                Some(self.committed.get(&key).map_or(
                    Record::Remove {
                        chain: key.chain,
                        chunk: key.chunk,
                    },
                    |c| Record::Put(c.meta),
                ))
            }
            _ => None,
        }
    }

    /// Drops pending version `version` in memory. Succeeds if there is no
    /// pending version.
    pub fn abort_pending(
        &mut self,
        key: ChunkKey,
        version: ChunkVersion,
    ) -> Result<(), EngineError> {
        match self.pending.get(&key).copied() {
            None => Ok(()),
            Some(p) if p.version == version => {
                self.take_pending(key);
                if !p.in_place {
                    self.release(p.slot);
                }
                Ok(())
            }
            Some(p) => Err(EngineError::VersionConflict {
                key,
                requested: version,
                committed: self.committed.get(&key).map(|c| c.meta.version),
                pending: Some(p.version),
            }),
        }
    }

    /// What there is of a chunk to remove.
    pub fn presence(&self, key: ChunkKey) -> Presence {
        let pending = self.pending.get(&key);
        Presence {
            pending: pending.is_some(),
            prepared: pending.is_some_and(|p| p.prepared.is_some()),
            committed: self.committed.contains_key(&key),
        }
    }

    /// Removes a chunk's pending version when nothing of the chunk is
    /// durable, so that removing it needs no record.
    pub fn remove_pending(&mut self, key: ChunkKey) {
        let p = self
            .take_pending(key)
            .expect("pending version checked under the chunk lock");
        self.release(p.slot);
    }

    /// Finds the version a read asks for and pins its slot, so that the slot
    /// is not reused while the read runs; a [`SlotPin`] unpins it.
    pub fn pin_for_read(
        &mut self,
        key: ChunkKey,
        version: ReadVersion,
    ) -> Result<ReadTarget, EngineError> {
        let committed = self.committed.get(&key).map(|c| c.meta);
        let pending = self.pending.get(&key).copied();
        let from_committed = |m: ChunkMeta| ReadTarget {
            slot: m.slot,
            len: m.len,
            crc: m.crc,
            version: m.version,
            overlay: self.overlay(key),
            epoch: 0,
        };
        let from_pending = |p: PendingInfo| ReadTarget {
            slot: p.slot,
            len: p.len,
            crc: p.crc,
            version: p.version,
            overlay: self.pending_overlay(key, &p),
            epoch: 0,
        };
        let found = match version {
            ReadVersion::Committed => committed.map(from_committed),
            ReadVersion::Pending => pending.map(from_pending),
            ReadVersion::Exact(v) => pending
                .filter(|p| p.version == v)
                .map(from_pending)
                .or(committed.filter(|m| m.version == v).map(from_committed)),
        };
        let Some(found) = found else {
            return Err(match version {
                _ if committed.is_none() && pending.is_none() => EngineError::NotFound { key },
                ReadVersion::Committed => EngineError::NotFound { key },
                ReadVersion::Pending | ReadVersion::Exact(_) => EngineError::VersionConflict {
                    key,
                    requested: match version {
                        ReadVersion::Exact(v) => v,
                        _ => ChunkVersion(0),
                    },
                    committed: committed.map(|m| m.version),
                    pending: pending.map(|p| p.version),
                },
            });
        };
        let mut found = found;
        found.epoch = self.pin(found.slot);
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    //! The decisions on their own, without a device: the layout a write
    //! chooses, what a prepared version allows, and when a slot is reused.
    //! The engine tests (tests/) check the same rules end to end.

    use flyfs_bypass::DmaBuf;
    use flyfs_proto::ids::{ChunkId, RequestId};

    use super::*;

    /// 4 KiB slots at the smallest, 64 KiB groups.
    const CLASS_LOG2_MIN: u8 = 12;
    const CHUNK_SIZE_MAX: u64 = 1 << 16;

    fn table() -> ChunkTable {
        ChunkTable::new(Allocator::new(4, CLASS_LOG2_MIN, 16))
    }

    fn key(index: u32) -> ChunkKey {
        ChunkKey::new(ChainId(1), ChunkId::new(7, index))
    }

    fn request(key: ChunkKey, version: u32, op: WriteOp) -> WriteRequest {
        WriteRequest {
            key,
            version: ChunkVersion(version),
            chain_version: ChainVersion(1),
            op,
            client: ClientId(9),
            request: RequestId(u64::from(version)),
            prepare: false,
        }
    }

    fn update(key: ChunkKey, version: u32, offset: u32, len: usize) -> WriteRequest {
        let data = DmaBuf::copy_from(&vec![0xab; len]);
        let crc = crc32c::crc32c(&data);
        request(key, version, WriteOp::Update { offset, data, crc })
    }

    /// The layouts these tests check predate patches (tests/ cover those).
    const NO_PATCHES: PatchLimits = PatchLimits {
        enabled: false,
        bytes_max: 0,
        pending_bytes_max: 0,
    };

    /// A write's decision, and its result recorded as if its I/O produced a
    /// chunk of `len` bytes.
    fn write(
        table: &mut ChunkTable,
        req: &WriteRequest,
        len: u32,
    ) -> Result<(WritePlan, PendingInfo), EngineError> {
        let extent = req.extent(CHUNK_SIZE_MAX)?;
        let plan = table.plan_write(req, extent, CLASS_LOG2_MIN, NO_PATCHES, &Arc::from("test"))?;
        let (slot, in_place) = plan.target();
        let pending = PendingInfo {
            version: req.version,
            chain_version: req.chain_version,
            slot,
            len,
            crc: 0,
            in_place,
            client: req.client,
            request: req.request,
            prepared: None,
        };
        table.install_pending(req.key, &plan, pending, None);
        Ok((plan, pending))
    }

    /// A commit that needs a record, and the record applied as the journal
    /// writer applies it once durable.
    fn commit(table: &mut ChunkTable, key: ChunkKey, version: u32) -> ChunkMeta {
        match table.commit_step(key, ChunkVersion(version)) {
            Ok(CommitStep::Record(pending)) => {
                let meta = pending.meta(key, 0);
                table.apply(&Record::Put(meta), true);
                meta
            }
            other => panic!("commit of v{version} needs a Put record, got {other:?}"),
        }
    }

    #[test]
    fn write_requests_are_checked_before_any_state() {
        let mut bad_crc = update(key(0), 1, 0, 100);
        if let WriteOp::Update { crc, .. } = &mut bad_crc.op {
            *crc ^= 1;
        }
        assert!(matches!(
            bad_crc.extent(CHUNK_SIZE_MAX),
            Err(EngineError::Checksum { .. })
        ));
        assert!(matches!(
            update(key(0), 1, (CHUNK_SIZE_MAX - 10) as u32, 11).extent(CHUNK_SIZE_MAX),
            Err(EngineError::InvalidRequest { .. })
        ));
        assert!(matches!(
            update(key(0), 0, 0, 1).extent(CHUNK_SIZE_MAX),
            Err(EngineError::InvalidRequest { .. })
        ));
        let extent = update(key(0), 1, 100, 50)
            .extent(CHUNK_SIZE_MAX)
            .expect("a valid update");
        assert_eq!((extent.offset, extent.data_len, extent.end), (100, 50, 150));
    }

    #[test]
    fn appends_go_in_place_only_past_the_written_mark() {
        let mut table = table();
        let k = key(0);
        let (plan, first) = write(&mut table, &update(k, 1, 0, 4000), 4000).expect("write");
        assert!(matches!(plan, WritePlan::Cow { base: None, .. }));
        assert_eq!(first.slot.class_log2, CLASS_LOG2_MIN);
        commit(&mut table, k, 1);

        // Appending into the rest of the committed slot writes in place.
        let (plan, second) = write(&mut table, &update(k, 2, 4000, 96), 4096).expect("write");
        assert!(matches!(plan, WritePlan::InPlace { slot, .. } if slot == first.slot));
        assert!(second.in_place);
        assert_eq!(table.committed[&k].slot_written, 4096);
        table.check_consistency().expect("consistent");

        // The aborted append's bytes may still be read: the next append must
        // not overwrite them, so it copies to a fresh slot.
        table.abort_pending(k, ChunkVersion(2)).expect("abort");
        assert!(
            table.alloc.is_used(first.slot),
            "in-place abort keeps the slot"
        );
        let (plan, third) = write(&mut table, &update(k, 3, 4000, 96), 4096).expect("write");
        assert!(
            matches!(plan, WritePlan::Cow { base: Some(base), .. } if base.version == ChunkVersion(1))
        );
        assert_ne!(third.slot, first.slot);
        table.check_consistency().expect("consistent");

        // A truncate below the committed length keeps the slot.
        let (plan, _) = write(
            &mut table,
            &request(k, 4, WriteOp::Truncate { len: 10 }),
            10,
        )
        .expect("write");
        assert!(matches!(plan, WritePlan::Shrink { .. }));
        assert!(
            !table.alloc.is_used(third.slot),
            "the replaced pending slot is freed"
        );
        table.check_consistency().expect("consistent");
    }

    #[test]
    fn versions_must_rise_and_prepared_versions_end_only_by_commit_or_abort() {
        let mut table = table();
        let k = key(0);
        write(&mut table, &update(k, 1, 0, 100), 100).expect("write");
        let first = commit(&mut table, k, 1);
        assert!(matches!(
            write(&mut table, &update(k, 1, 0, 100), 100),
            Err(EngineError::VersionConflict { .. })
        ));

        let (_, pending) = write(&mut table, &update(k, 2, 0, 5000), 5000).expect("write");
        let prepared = pending.meta(k, 0);
        table.apply(&Record::Prepare(prepared), true);
        assert_eq!(table.pending[&k].prepared, Some(prepared));
        assert_eq!(
            table.durable_view(),
            vec![prepared],
            "a checkpoint holds the prepared version"
        );
        assert!(matches!(
            write(&mut table, &update(k, 3, 0, 100), 100),
            Err(EngineError::VersionConflict { .. })
        ));
        assert_eq!(
            table.abort_record(k, ChunkVersion(2)),
            Some(Record::Put(first)),
            "aborting a prepared version restores the committed one durably"
        );

        // Committing a prepared version needs no record, and releases the
        // old slot at once: the Prepare record is the durable release.
        match table.commit_step(k, ChunkVersion(2)) {
            Ok(CommitStep::Done(meta)) => assert_eq!(meta, prepared),
            other => panic!("a prepared commit needs no record, got {other:?}"),
        }
        assert!(table.pending.is_empty());
        assert_eq!(table.committed[&k].meta, prepared);
        assert!(!table.alloc.is_used(first.slot));
        table.check_consistency().expect("consistent");
        assert!(matches!(
            table.commit_step(k, ChunkVersion(2)),
            Ok(CommitStep::Done(meta)) if meta == prepared
        ));
        assert!(matches!(
            table.commit_step(key(1), ChunkVersion(1)),
            Err(EngineError::NotFound { .. })
        ));
    }

    #[test]
    fn a_slot_released_while_read_is_freed_when_the_read_ends() {
        let table = Mutex::new(table());
        let k = key(0);
        let slot = {
            let mut table = table.lock();
            write(&mut table, &update(k, 1, 0, 100), 100).expect("write");
            commit(&mut table, k, 1).slot
        };
        let target = table
            .lock()
            .pin_for_read(k, ReadVersion::Committed)
            .expect("committed");
        assert_eq!((target.slot, target.len), (slot, 100));
        let pin = SlotPin::new(&table, &target);
        table.lock().apply(
            &Record::Remove {
                chain: k.chain,
                chunk: k.chunk,
            },
            true,
        );
        assert!(table.lock().alloc.is_used(slot), "still read");
        table.lock().check_consistency().expect("consistent");
        drop(pin);
        assert!(!table.lock().alloc.is_used(slot));
        table.lock().check_consistency().expect("consistent");
    }

    #[test]
    fn reads_find_the_version_they_name() {
        let table = Mutex::new(table());
        let k = key(0);
        {
            let mut table = table.lock();
            write(&mut table, &update(k, 1, 0, 100), 100).expect("write");
            commit(&mut table, k, 1);
            write(&mut table, &update(k, 2, 0, 200), 200).expect("write");
        }
        let read = |version| {
            let target = table.lock().pin_for_read(k, version)?;
            drop(SlotPin::new(&table, &target));
            Ok::<_, EngineError>((target.version, target.len))
        };
        assert_eq!(
            read(ReadVersion::Committed).ok(),
            Some((ChunkVersion(1), 100))
        );
        assert_eq!(
            read(ReadVersion::Pending).ok(),
            Some((ChunkVersion(2), 200))
        );
        assert_eq!(
            read(ReadVersion::Exact(ChunkVersion(1))).ok(),
            Some((ChunkVersion(1), 100))
        );
        assert!(matches!(
            read(ReadVersion::Exact(ChunkVersion(3))),
            Err(EngineError::VersionConflict { .. })
        ));
        assert!(matches!(
            table.lock().pin_for_read(key(1), ReadVersion::Pending),
            Err(EngineError::NotFound { .. })
        ));
        assert!(table.lock().pins.is_empty(), "every pin was released");
    }

    #[test]
    fn durable_view_is_in_key_order_with_prepared_versions() {
        let mut table = table();
        for index in [0, 2] {
            write(&mut table, &update(key(index), 1, 0, 100), 100).expect("write");
            commit(&mut table, key(index), 1);
        }
        let (_, new_chunk) = write(&mut table, &update(key(1), 1, 0, 10), 10).expect("write");
        let (_, over_committed) = write(&mut table, &update(key(2), 2, 0, 20), 20).expect("write");
        let (_, unprepared) = write(&mut table, &update(key(3), 1, 0, 30), 30).expect("write");
        table.apply(&Record::Prepare(new_chunk.meta(key(1), 0)), true);
        table.apply(&Record::Prepare(over_committed.meta(key(2), 0)), true);
        let view: Vec<(u32, ChunkVersion, u32)> = table
            .durable_view()
            .iter()
            .map(|m| (m.chunk.index, m.version, m.len))
            .collect();
        assert_eq!(
            view,
            vec![
                (0, ChunkVersion(1), 100),
                (1, ChunkVersion(1), 10),
                (2, ChunkVersion(2), 20),
            ],
            "unprepared pending versions ({unprepared:?}) are not durable"
        );
    }
}
