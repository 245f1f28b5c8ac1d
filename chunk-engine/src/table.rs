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
use crate::format::{ChunkMeta, Record, SlotId};
use crate::request::{ReadVersion, WriteExtent, WriteOp, WriteRequest};
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

    fn pin(&mut self, slot: SlotId) {
        *self.pins.entry(slot).or_default() += 1;
    }

    fn unpin(&mut self, slot: SlotId) {
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

/// How a write will lay out its new pending version.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WritePlan {
    /// Append past the committed length into the same slot.
    InPlace { slot: SlotId, base: ChunkMeta },
    /// Build the new contents in a fresh slot.
    Cow {
        slot: SlotId,
        base: Option<ChunkMeta>,
    },
    /// Shrink: same slot, shorter length.
    Shrink { base: ChunkMeta },
}

impl WritePlan {
    /// The slot the new version lives in, and whether that is the committed
    /// version's slot (written in place) rather than a fresh one.
    pub fn target(&self) -> (SlotId, bool) {
        match *self {
            WritePlan::InPlace { slot, .. } => (slot, true),
            WritePlan::Shrink { base } => (base.slot, true),
            WritePlan::Cow { slot, .. } => (slot, false),
        }
    }
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
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReadTarget {
    pub slot: SlotId,
    pub len: u32,
    pub crc: u32,
    pub version: ChunkVersion,
}

/// Unpins a slot when a read ends, however it ends.
pub(crate) struct SlotPin<'a> {
    table: &'a Mutex<ChunkTable>,
    slot: SlotId,
}

impl<'a> SlotPin<'a> {
    /// Takes over the pin [`ChunkTable::pin_for_read`] put on `slot`.
    pub fn new(table: &'a Mutex<ChunkTable>, slot: SlotId) -> SlotPin<'a> {
        SlotPin { table, slot }
    }
}

impl Drop for SlotPin<'_> {
    fn drop(&mut self) {
        self.table.lock().unpin(self.slot);
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
            WriteOp::Replace { .. } => (data_len, false),
            WriteOp::Truncate { len } => (u64::from(*len), u64::from(*len) >= base_len),
        };
        Ok(match base {
            Some(b) if matches!(req.op, WriteOp::Truncate { .. }) && new_len <= base_len => {
                WritePlan::Shrink { base: b.meta }
            }
            Some(b)
                if appends
                    && base_len >= u64::from(b.slot_written)
                    && new_len <= b.meta.slot.bytes() =>
            {
                WritePlan::InPlace {
                    slot: b.meta.slot,
                    base: b.meta,
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
                let base = if matches!(req.op, WriteOp::Replace { .. }) {
                    None
                } else {
                    base.map(|b| b.meta)
                };
                WritePlan::Cow { slot, base }
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
    /// laid it out.
    pub fn install_pending(&mut self, key: ChunkKey, plan: &WritePlan, pending: PendingInfo) {
        if let WritePlan::InPlace { .. } = plan
            && let Some(committed) = self.committed.get_mut(&key)
        {
            committed.slot_written = committed.slot_written.max(pending.len);
        }
        // The replaced pending version (if any) goes only now, so that a
        // failed write changes nothing.
        let replaced = self.pending.insert(key, pending);
        if let Some(old) = replaced
            && !old.in_place
        {
            self.release(old.slot);
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
            self.pending.remove(&key);
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
                self.apply(&Record::Put(meta), true);
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
                self.pending.remove(&key);
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
            .pending
            .remove(&key)
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
        };
        let from_pending = |p: PendingInfo| ReadTarget {
            slot: p.slot,
            len: p.len,
            crc: p.crc,
            version: p.version,
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
        self.pin(found.slot);
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

    /// A write's decision, and its result recorded as if its I/O produced a
    /// chunk of `len` bytes.
    fn write(
        table: &mut ChunkTable,
        req: &WriteRequest,
        len: u32,
    ) -> Result<(WritePlan, PendingInfo), EngineError> {
        let extent = req.extent(CHUNK_SIZE_MAX)?;
        let plan = table.plan_write(req, extent, CLASS_LOG2_MIN, &Arc::from("test"))?;
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
        table.install_pending(req.key, &plan, pending);
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
        let pin = SlotPin::new(&table, target.slot);
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
            drop(SlotPin::new(&table, target.slot));
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
