//! The KV cache's index in the metadata store (docs/kv-cache.md): the cache
//! record, the index entries, slot states, free lists, access order and
//! reservations, each operation one KV transaction.
//!
//! It lives in the namespace's store, beside the namespace and not in it,
//! so that every metadata instance serves it, every client sees every
//! other's blocks and a restart finds them, without an inode per block. It
//! shares the namespace's transaction runner and inode id allocator (slot
//! files take their ids from it, so a slot file's chunks never collide with
//! a file's) and nothing else.
//!
//! The rules that make concurrent writers safe are in the commit: a block is
//! indexed only if its slot is still reserved by its writer's generation and
//! no entry for its key exists (the first committed writer wins); every
//! decision reads what it depends on serializably, so two racing
//! transactions conflict and one retries.

use flyfs_kv::{Kv, RangeOptions, Transaction};
use flyfs_proto::ids::{ChainTableId, InodeId};
use flyfs_proto::wire::meta::{
    self as wire, KV_BATCH_MAX, KvCommitItem, KvCommitted, KvEntry, KvSlotGrant,
};

use super::{LayoutError, Namespace, NsError};
use crate::ns::txn::MetaTx;
use crate::schema::{
    KV_CLASSES_MAX, KV_KEY_BYTES_MAX, Key, KvCacheValue, KvClassValue, KvEntryValue, KvSlotState,
    KvSlotValue, decode_kv_cache, decode_kv_entry, decode_kv_fresh, decode_kv_slot,
    encode_kv_cache, encode_kv_entry, encode_kv_fresh, encode_kv_mark, encode_kv_slot,
    kv_access_key, kv_cache_key, kv_class_prefix, kv_entry_key, kv_free_key, kv_fresh_key,
    kv_reserved_key, kv_slot_key, parse_key, tag,
};

/// A lookup rewrites an entry's access time when it is older than this:
/// one index write per hot block every 10 s, not one per read.
pub const KV_ACCESS_BUCKET_MS_DEFAULT: u64 = 10_000;
/// How long a reserved slot stays its writer's: far beyond the storage
/// client's 60 s operation deadline, so a live writer never loses its slot.
pub const KV_RESERVATION_MS_DEFAULT: u64 = 10 * 60 * 1000;
/// Entries a full class evicts beyond what the reservation needs (at most a
/// sixteenth of the class): they go to the free list, where they wait
/// behind older free slots, giving readers of the evicted blocks time before
/// their slots are rewritten.
pub const KV_EVICT_AHEAD_MAX: usize = 64;
/// The smallest and largest slot (the chunk sizes the storage layer knows).
pub const KV_SLOT_BYTES_MIN: u32 = 64 << 10;
pub const KV_SLOT_BYTES_MAX: u32 = 64 << 20;

const _: () = assert!(KV_KEY_BYTES_MAX == wire::KV_KEY_BYTES_MAX);

/// Checks a key's length: 1 to [`KV_KEY_BYTES_MAX`] bytes.
pub fn check_kv_key(key: &[u8]) -> Result<(), NsError> {
    if key.is_empty() || key.len() > KV_KEY_BYTES_MAX {
        return Err(NsError::Invalid(format!(
            "a KV cache key of {} bytes (1..={KV_KEY_BYTES_MAX})",
            key.len()
        )));
    }
    Ok(())
}

fn check_batch(len: usize, what: &str) -> Result<(), NsError> {
    if len > KV_BATCH_MAX {
        return Err(NsError::Invalid(format!(
            "{len} {what} in one KV cache request (at most {KV_BATCH_MAX})"
        )));
    }
    Ok(())
}

fn check_spec(req: &wire::KvOpenReq) -> Result<(), NsError> {
    if req.classes.is_empty() || req.classes.len() > KV_CLASSES_MAX {
        return Err(NsError::Invalid(format!(
            "a KV cache of {} size classes (1..={KV_CLASSES_MAX})",
            req.classes.len()
        )));
    }
    let mut previous = 0;
    for (i, class) in req.classes.iter().enumerate() {
        if !class.slot_bytes.is_power_of_two()
            || !(KV_SLOT_BYTES_MIN..=KV_SLOT_BYTES_MAX).contains(&class.slot_bytes)
        {
            return Err(NsError::Invalid(format!(
                "KV cache class {i}: slots of {} bytes (a power of two from 64 KiB to 64 MiB)",
                class.slot_bytes
            )));
        }
        if class.slot_bytes <= previous {
            return Err(NsError::Invalid(format!(
                "KV cache class {i}: slots of {} bytes after {previous}: classes go from the \
                 smallest slot to the largest",
                class.slot_bytes
            )));
        }
        if class.slots == 0 || class.slots == u32::MAX {
            return Err(NsError::Invalid(format!(
                "KV cache class {i}: {} slots (1..{})",
                class.slots,
                u32::MAX
            )));
        }
        previous = class.slot_bytes;
    }
    Ok(())
}

fn to_wire(cache: &KvCacheValue, created: bool) -> wire::KvOpenRsp {
    wire::KvOpenRsp {
        classes: cache
            .classes
            .iter()
            .map(|c| wire::KvClass {
                slot_bytes: c.slot_bytes,
                slots: c.slots,
                ino: InodeId(c.ino),
                chain_table: ChainTableId(c.chain_table),
                chains: c
                    .chains
                    .iter()
                    .map(|&c| flyfs_proto::ids::ChainId(c))
                    .collect(),
            })
            .collect(),
        max_age_ms: cache.max_age_ms,
        access_bucket_ms: cache.access_bucket_ms,
        reservation_ms: cache.reservation_ms,
        created,
    }
}

fn entry_to_wire(entry: &KvEntryValue) -> KvEntry {
    KvEntry {
        class: entry.class,
        slot: entry.slot,
        generation: entry.generation,
        length: entry.length,
        crc: entry.crc,
    }
}

/// The cache record (immutable once written, so read as a snapshot).
async fn cache_record<T: Transaction>(tx: &MetaTx<T>) -> Result<KvCacheValue, NsError> {
    let key = kv_cache_key();
    match tx.tx.get(&key, true).await? {
        Some(value) => Ok(decode_kv_cache(&key, &value)?),
        None => Err(NsError::NotFound(
            "the KV cache does not exist: open it with its spec first".into(),
        )),
    }
}

fn class_of(cache: &KvCacheValue, class: u8) -> Result<&KvClassValue, NsError> {
    cache.classes.get(usize::from(class)).ok_or_else(|| {
        NsError::Invalid(format!(
            "KV cache class {class}: the cache has {} classes",
            cache.classes.len()
        ))
    })
}

async fn slot_state<T: Transaction>(
    tx: &MetaTx<T>,
    class: u8,
    slot: u32,
) -> Result<Option<KvSlotValue>, NsError> {
    let key = kv_slot_key(class, slot);
    match tx.tx.get(&key, false).await? {
        Some(value) => Ok(Some(decode_kv_slot(&key, &value)?)),
        None => Ok(None),
    }
}

async fn entry_of<T: Transaction>(
    tx: &MetaTx<T>,
    key: &[u8],
    snapshot: bool,
) -> Result<Option<KvEntryValue>, NsError> {
    let index_key = kv_entry_key(key);
    match tx.tx.get(&index_key, snapshot).await? {
        Some(value) => Ok(Some(decode_kv_entry(&index_key, &value)?)),
        None => Ok(None),
    }
}

/// Puts `slot` (of generation `generation`) on the free list, freed now.
fn free_slot<T: Transaction>(
    tx: &MetaTx<T>,
    class: u8,
    slot: u32,
    generation: u64,
) -> Result<(), NsError> {
    tx.tx.set(
        &kv_slot_key(class, slot),
        &encode_kv_slot(&KvSlotValue {
            state: KvSlotState::Free,
            generation,
            until_ms: 0,
            key: Vec::new(),
        })?,
    )?;
    tx.tx
        .set(&kv_free_key(class, tx.now_ms(), slot), &encode_kv_mark()?)?;
    Ok(())
}

/// Removes `key`'s entry (already read as `entry`) and gives its slot's
/// generation if the slot still held it.
async fn unindex<T: Transaction>(
    tx: &MetaTx<T>,
    key: &[u8],
    entry: &KvEntryValue,
) -> Result<Option<u64>, NsError> {
    tx.tx.clear(&kv_entry_key(key))?;
    tx.tx
        .clear(&kv_access_key(entry.class, entry.access_ms, key))?;
    Ok(match slot_state(tx, entry.class, entry.slot).await? {
        Some(state) if state.state == KvSlotState::Used && state.generation == entry.generation => {
            Some(state.generation)
        }
        _ => None,
    })
}

/// Up to `limit` keys of one class's ordered keyspace (`tag`), oldest
/// first, below `end_ms` when given.
async fn oldest<T: Transaction>(
    tx: &MetaTx<T>,
    tag: &[u8],
    class: u8,
    end_ms: Option<u64>,
    limit: usize,
) -> Result<(Vec<Key>, bool), NsError> {
    let prefix = kv_class_prefix(tag, class);
    let end = match end_ms {
        Some(ms) => {
            let mut end = prefix.clone();
            end.extend_from_slice(&ms.to_be_bytes());
            bytes::Bytes::from(end)
        }
        None => flyfs_kv::prefix_end(&prefix),
    };
    let range = RangeOptions::new(bytes::Bytes::from(prefix), end).limit(limit);
    let result = tx.tx.get_range(&range).await?;
    let mut keys = Vec::with_capacity(result.kvs.len());
    for kv in &result.kvs {
        keys.push(parse_key(&kv.key)?);
    }
    Ok((keys, result.more))
}

/// Evicts the entry an access-order key names (if it still does) and
/// gives its slot and generation, when the slot held it.
async fn evict_access<T: Transaction>(
    tx: &MetaTx<T>,
    access: &Key,
) -> Result<Option<(u32, u64)>, NsError> {
    let Key::KvAccess {
        class,
        access_ms,
        key,
    } = access
    else {
        return Ok(None);
    };
    match entry_of(tx, key, false).await? {
        Some(entry) if entry.class == *class && entry.access_ms == *access_ms => {
            Ok(unindex(tx, key, &entry)
                .await?
                .map(|generation| (entry.slot, generation)))
        }
        _ => {
            // An access key without its entry: drop it.
            tx.tx.clear(&access.encode())?;
            Ok(None)
        }
    }
}

/// Takes back an expired reservation a reservation-order key names, giving
/// the slot and its generation.
async fn reclaim<T: Transaction>(
    tx: &MetaTx<T>,
    reserved: &Key,
) -> Result<Option<(u32, u64)>, NsError> {
    let Key::KvReserved {
        class,
        until_ms,
        slot,
    } = reserved
    else {
        return Ok(None);
    };
    tx.tx.clear(&reserved.encode())?;
    match slot_state(tx, *class, *slot).await? {
        Some(state)
            if state.state == KvSlotState::Reserved
                && state.until_ms == *until_ms
                && state.until_ms <= tx.now_ms() =>
        {
            Ok(Some((*slot, state.generation)))
        }
        _ => Ok(None),
    }
}

impl<K: Kv> Namespace<K> {
    /// Opens the KV cache, creating it from `req` if the store has none.
    pub async fn kv_open(&self, req: &wire::KvOpenReq) -> Result<wire::KvOpenRsp, NsError> {
        self.write(|tx| async move {
            let key = kv_cache_key();
            if let Some(value) = tx.tx.get(&key, false).await? {
                return Ok(to_wire(&decode_kv_cache(&key, &value)?, false));
            }
            check_spec(req)?;
            let chains = self
                .inner
                .config
                .chain_tables
                .chains(req.chain_table)
                .filter(|chains| !chains.is_empty())
                .ok_or(NsError::Layout(LayoutError::UnknownTable(req.chain_table)))?;
            let mut classes = Vec::with_capacity(req.classes.len());
            for class in &req.classes {
                classes.push(KvClassValue {
                    slot_bytes: class.slot_bytes,
                    slots: class.slots,
                    ino: self.allocate().await?.0,
                    chain_table: req.chain_table.0,
                    chains: chains.iter().map(|c| c.0).collect(),
                });
            }
            let cache = KvCacheValue {
                classes,
                max_age_ms: req.max_age_ms,
                access_bucket_ms: if req.access_bucket_ms == 0 {
                    KV_ACCESS_BUCKET_MS_DEFAULT
                } else {
                    req.access_bucket_ms
                },
                reservation_ms: if req.reservation_ms == 0 {
                    KV_RESERVATION_MS_DEFAULT
                } else {
                    req.reservation_ms
                },
                created_ns: tx.now_ns,
            };
            tx.tx.set(&key, &encode_kv_cache(&cache)?)?;
            Ok(to_wire(&cache, true))
        })
        .await
    }

    /// The index entries of `keys`, in order (`None`: not cached). Entries
    /// whose access time is older than one access bucket get it rewritten
    /// afterwards, in a transaction of its own that re-reads each one; its
    /// failure costs only eviction accuracy, so it is logged, not returned.
    pub async fn kv_lookup(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<KvEntry>>, NsError> {
        check_batch(keys.len(), "keys")?;
        for key in keys {
            check_kv_key(key)?;
        }
        let (entries, bucket_ms, now_ms) = self
            .read(|tx| async move {
                let cache = cache_record(&tx).await?;
                let mut entries = Vec::with_capacity(keys.len());
                for key in keys {
                    entries.push(entry_of(&tx, key, true).await?);
                }
                Ok((entries, cache.access_bucket_ms, tx.now_ms()))
            })
            .await?;
        let stale: Vec<(&Vec<u8>, KvEntryValue)> = keys
            .iter()
            .zip(&entries)
            .filter_map(|(key, entry)| {
                entry
                    .filter(|e| e.access_ms.saturating_add(bucket_ms) <= now_ms)
                    .map(|e| (key, e))
            })
            .collect();
        if !stale.is_empty() {
            let touched = self
                .write(|tx| {
                    let stale = &stale;
                    async move {
                        for (key, seen) in stale {
                            let Some(mut entry) = entry_of(&tx, key, false).await? else {
                                continue;
                            };
                            if entry.slot != seen.slot || entry.generation != seen.generation {
                                continue;
                            }
                            tx.tx
                                .clear(&kv_access_key(entry.class, entry.access_ms, key))?;
                            entry.access_ms = tx.now_ms();
                            tx.tx.set(
                                &kv_access_key(entry.class, entry.access_ms, key),
                                &encode_kv_mark()?,
                            )?;
                            tx.tx.set(&kv_entry_key(key), &encode_kv_entry(&entry)?)?;
                        }
                        Ok(())
                    }
                })
                .await;
            if let Err(e) = touched {
                tracing::debug!("KV cache access times not updated: {e}");
            }
        }
        Ok(entries
            .iter()
            .map(|e| e.as_ref().map(entry_to_wire))
            .collect())
    }

    /// Reserves up to `count` slots of `class`: free slots (oldest freed
    /// first), then never-used ones, then expired reservations, then, with
    /// `evict`, slots of the least recently accessed entries. Fewer than
    /// `count` means the class is full (and `evict` was off).
    pub async fn kv_reserve(
        &self,
        class: u8,
        count: u32,
        evict: bool,
    ) -> Result<wire::KvReserveRsp, NsError> {
        check_batch(count as usize, "slots")?;
        let count = count as usize;
        self.write(|tx| async move {
            let cache = cache_record(&tx).await?;
            let slots = class_of(&cache, class)?.slots;
            let mut grants: Vec<(u32, u64)> = Vec::with_capacity(count);
            let mut evicted = 0u32;
            // 1. The free list, oldest freed first.
            let (free, _) = oldest(&tx, tag::KV_FREE, class, None, count).await?;
            for key in &free {
                tx.tx.clear(&key.encode())?;
                if let Key::KvFree { slot, .. } = key {
                    let generation = slot_state(&tx, class, *slot)
                        .await?
                        .filter(|s| s.state == KvSlotState::Free)
                        .map(|s| s.generation);
                    if let Some(generation) = generation {
                        grants.push((*slot, generation));
                    }
                }
            }
            // 2. Slots never used.
            if grants.len() < count {
                let fresh_key = kv_fresh_key(class);
                let used = match tx.tx.get(&fresh_key, false).await? {
                    Some(value) => decode_kv_fresh(&fresh_key, &value)?,
                    None => 0,
                };
                let take = (count - grants.len()).min(slots.saturating_sub(used) as usize) as u32;
                if take > 0 {
                    for slot in used..used + take {
                        let generation = slot_state(&tx, class, slot)
                            .await?
                            .map_or(0, |s| s.generation);
                        grants.push((slot, generation));
                    }
                    tx.tx.set(&fresh_key, &encode_kv_fresh(used + take)?)?;
                }
            }
            // 3. Reservations whose writers never committed.
            if grants.len() < count {
                let due = tx.now_ms().saturating_add(1);
                let (expired, _) = oldest(
                    &tx,
                    tag::KV_RESERVED,
                    class,
                    Some(due),
                    count - grants.len(),
                )
                .await?;
                for key in &expired {
                    if let Some(grant) = reclaim(&tx, key).await? {
                        grants.push(grant);
                    }
                }
            }
            // 4. The least recently accessed entries.
            if grants.len() < count && evict {
                let ahead = KV_EVICT_AHEAD_MAX.min(slots as usize / 16);
                let want = count - grants.len() + ahead;
                let (victims, _) = oldest(&tx, tag::KV_ACCESS, class, None, want).await?;
                for key in &victims {
                    if let Some((slot, generation)) = evict_access(&tx, key).await? {
                        evicted += 1;
                        if grants.len() < count {
                            grants.push((slot, generation));
                        } else {
                            free_slot(&tx, class, slot, generation)?;
                        }
                    }
                }
            }
            let until_ms = tx.now_ms().saturating_add(cache.reservation_ms);
            let mut granted = Vec::with_capacity(grants.len());
            for (slot, generation) in grants {
                let generation = generation + 1;
                tx.tx.set(
                    &kv_slot_key(class, slot),
                    &encode_kv_slot(&KvSlotValue {
                        state: KvSlotState::Reserved,
                        generation,
                        until_ms,
                        key: Vec::new(),
                    })?,
                )?;
                tx.tx
                    .set(&kv_reserved_key(class, until_ms, slot), &encode_kv_mark()?)?;
                granted.push(KvSlotGrant { slot, generation });
            }
            Ok(wire::KvReserveRsp {
                slots: granted,
                evicted,
            })
        })
        .await
    }

    /// Indexes written blocks; see the module documentation for the rule.
    pub async fn kv_commit(&self, items: &[KvCommitItem]) -> Result<Vec<KvCommitted>, NsError> {
        check_batch(items.len(), "blocks")?;
        for item in items {
            check_kv_key(&item.key)?;
        }
        self.write(|tx| async move {
            let cache = cache_record(&tx).await?;
            let mut results = Vec::with_capacity(items.len());
            for item in items {
                let e = item.entry;
                let slot_bytes = class_of(&cache, e.class)?.slot_bytes;
                if e.length > slot_bytes {
                    return Err(NsError::Invalid(format!(
                        "a block of {} bytes in class {} of {slot_bytes}-byte slots",
                        e.length, e.class
                    )));
                }
                let state = slot_state(&tx, e.class, e.slot).await?;
                let result = match state {
                    Some(s) if s.state == KvSlotState::Reserved && s.generation == e.generation => {
                        tx.tx.clear(&kv_reserved_key(e.class, s.until_ms, e.slot))?;
                        if entry_of(&tx, &item.key, false).await?.is_some() {
                            free_slot(&tx, e.class, e.slot, e.generation)?;
                            KvCommitted::Exists
                        } else {
                            let now_ms = tx.now_ms();
                            let entry = KvEntryValue {
                                class: e.class,
                                slot: e.slot,
                                generation: e.generation,
                                length: e.length,
                                crc: e.crc,
                                stored_ms: now_ms,
                                access_ms: now_ms,
                            };
                            tx.tx
                                .set(&kv_entry_key(&item.key), &encode_kv_entry(&entry)?)?;
                            tx.tx.set(
                                &kv_access_key(e.class, now_ms, &item.key),
                                &encode_kv_mark()?,
                            )?;
                            tx.tx.set(
                                &kv_slot_key(e.class, e.slot),
                                &encode_kv_slot(&KvSlotValue {
                                    state: KvSlotState::Used,
                                    generation: e.generation,
                                    until_ms: 0,
                                    key: item.key.clone(),
                                })?,
                            )?;
                            KvCommitted::Stored
                        }
                    }
                    // A retried commit whose first attempt committed.
                    Some(s)
                        if s.state == KvSlotState::Used
                            && s.generation == e.generation
                            && s.key == item.key =>
                    {
                        KvCommitted::Stored
                    }
                    _ => KvCommitted::Lost,
                };
                results.push(result);
            }
            Ok(results)
        })
        .await
    }

    /// Gives back reserved slots that were not written.
    pub async fn kv_release(&self, class: u8, slots: &[KvSlotGrant]) -> Result<(), NsError> {
        check_batch(slots.len(), "slots")?;
        self.write(|tx| async move {
            let cache = cache_record(&tx).await?;
            class_of(&cache, class)?;
            for grant in slots {
                if let Some(s) = slot_state(&tx, class, grant.slot).await?
                    && s.state == KvSlotState::Reserved
                    && s.generation == grant.generation
                {
                    tx.tx
                        .clear(&kv_reserved_key(class, s.until_ms, grant.slot))?;
                    free_slot(&tx, class, grant.slot, s.generation)?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Removes `keys` (with `expect`, one per key, only entries still naming
    /// that block); one flag per key: whether an entry was removed.
    pub async fn kv_remove(
        &self,
        keys: &[Vec<u8>],
        expect: &[KvEntry],
    ) -> Result<Vec<bool>, NsError> {
        check_batch(keys.len(), "keys")?;
        for key in keys {
            check_kv_key(key)?;
        }
        if !expect.is_empty() && expect.len() != keys.len() {
            return Err(NsError::Invalid(format!(
                "{} expected entries for {} keys",
                expect.len(),
                keys.len()
            )));
        }
        self.write(|tx| async move {
            let mut removed = Vec::with_capacity(keys.len());
            for (i, key) in keys.iter().enumerate() {
                let Some(entry) = entry_of(&tx, key, false).await? else {
                    removed.push(false);
                    continue;
                };
                if let Some(want) = expect.get(i)
                    && (want.class, want.slot, want.generation)
                        != (entry.class, entry.slot, entry.generation)
                {
                    removed.push(false);
                    continue;
                }
                if let Some(generation) = unindex(&tx, key, &entry).await? {
                    free_slot(&tx, entry.class, entry.slot, generation)?;
                }
                removed.push(true);
            }
            Ok(removed)
        })
        .await
    }

    /// Evicts entries past the cache's age limit and takes back expired
    /// reservations, at most `limit` of each per class.
    pub async fn kv_evict(&self, limit: u32) -> Result<wire::KvEvictRsp, NsError> {
        check_batch(limit as usize, "entries")?;
        let limit = (limit as usize).max(1);
        let classes = self
            .read(|tx| async move { Ok(cache_record(&tx).await?.classes.len()) })
            .await?;
        let mut total = wire::KvEvictRsp::default();
        for class in 0..classes as u8 {
            let done = self
                .write(|tx| async move {
                    let cache = cache_record(&tx).await?;
                    let mut rsp = wire::KvEvictRsp::default();
                    if cache.max_age_ms > 0 {
                        let before = tx.now_ms().saturating_sub(cache.max_age_ms);
                        let (aged, more) =
                            oldest(&tx, tag::KV_ACCESS, class, Some(before), limit).await?;
                        for key in &aged {
                            if let Some((slot, generation)) = evict_access(&tx, key).await? {
                                free_slot(&tx, class, slot, generation)?;
                                rsp.evicted += 1;
                            }
                        }
                        rsp.more |= more;
                    }
                    let due = tx.now_ms().saturating_add(1);
                    let (expired, more) =
                        oldest(&tx, tag::KV_RESERVED, class, Some(due), limit).await?;
                    for key in &expired {
                        if let Some((slot, generation)) = reclaim(&tx, key).await? {
                            free_slot(&tx, class, slot, generation)?;
                            rsp.reclaimed += 1;
                        }
                    }
                    rsp.more |= more;
                    Ok(rsp)
                })
                .await?;
            total.evicted += done.evicted;
            total.reclaimed += done.reclaimed;
            total.more |= done.more;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use flyfs_proto::wire::meta::{KvClassSpec, KvOpenReq};

    use super::*;
    use crate::ns::tests::namespace_on_clock;

    const START_NS: i64 = 1_700_000_000_000_000_000;

    fn spec(slots: u32) -> KvOpenReq {
        KvOpenReq {
            classes: vec![
                KvClassSpec {
                    slot_bytes: 64 << 10,
                    slots,
                },
                KvClassSpec {
                    slot_bytes: 1 << 20,
                    slots,
                },
            ],
            chain_table: ChainTableId(1),
            max_age_ms: 60_000,
            access_bucket_ms: 1_000,
            reservation_ms: 30_000,
        }
    }

    fn item(key: &[u8], grant: KvSlotGrant, length: u32, crc: u32) -> KvCommitItem {
        KvCommitItem {
            key: key.to_vec(),
            entry: KvEntry {
                class: 0,
                slot: grant.slot,
                generation: grant.generation,
                length,
                crc,
            },
        }
    }

    async fn check_clean<K: Kv>(ns: &Namespace<K>) {
        let report = ns.check().await.expect("check");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }

    #[tokio::test]
    async fn the_first_opener_creates_the_cache_and_later_ones_find_it() {
        let (ns, _clock) = namespace_on_clock(START_NS, |_| {}).await;
        let created = ns.kv_open(&spec(4)).await.expect("open");
        assert!(created.created);
        assert_eq!(created.classes.len(), 2);
        assert_eq!(created.classes[0].chains.len(), 4, "every chain of table 1");
        assert_ne!(created.classes[0].ino, created.classes[1].ino);
        let mut other = spec(99);
        other.classes.pop();
        let found = ns.kv_open(&other).await.expect("reopen");
        assert!(!found.created);
        assert_eq!(found.classes, created.classes, "the first spec wins");
        check_clean(&ns).await;
    }

    #[tokio::test]
    async fn bad_specs_and_requests_are_refused_with_what_was_wrong() {
        let (ns, _clock) = namespace_on_clock(START_NS, |_| {}).await;
        let mut bad = spec(4);
        bad.classes[0].slot_bytes = 100_000;
        let e = ns.kv_open(&bad).await.expect_err("not a power of two");
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("100000"), "{e}");
        let mut unordered = spec(4);
        unordered.classes.reverse();
        assert!(ns.kv_open(&unordered).await.is_err());
        let mut table = spec(4);
        table.chain_table = ChainTableId(9);
        assert!(ns.kv_open(&table).await.is_err());
        // Before the cache exists.
        let e = ns.kv_lookup(&[b"k".to_vec()]).await.expect_err("no cache");
        assert_eq!(e.errno(), libc::ENOENT);
        ns.kv_open(&spec(4)).await.expect("open");
        let e = ns
            .kv_lookup(&[vec![7; KV_KEY_BYTES_MAX + 1]])
            .await
            .expect_err("long key");
        assert!(e.to_string().contains("513 bytes"), "{e}");
        assert!(ns.kv_lookup(&[Vec::new()]).await.is_err(), "empty key");
        let many = vec![b"k".to_vec(); KV_BATCH_MAX + 1];
        let e = ns.kv_lookup(&many).await.expect_err("batch");
        assert!(e.to_string().contains("257 keys"), "{e}");
        let e = ns.kv_reserve(5, 1, true).await.expect_err("class");
        assert!(e.to_string().contains("class 5"), "{e}");
        let grant = ns.kv_reserve(0, 1, true).await.expect("reserve").slots[0];
        let e = ns
            .kv_commit(&[item(b"k", grant, (64 << 10) + 1, 0)])
            .await
            .expect_err("longer than its slot");
        assert!(e.to_string().contains("65537"), "{e}");
    }

    #[tokio::test]
    async fn the_first_committed_writer_of_a_key_wins_and_the_loser_frees_its_slot() {
        let (ns, _clock) = namespace_on_clock(START_NS, |_| {}).await;
        ns.kv_open(&spec(4)).await.expect("open");
        let a = ns.kv_reserve(0, 1, true).await.expect("a").slots[0];
        let b = ns.kv_reserve(0, 1, true).await.expect("b").slots[0];
        assert_ne!(a.slot, b.slot);
        assert_eq!(
            ns.kv_commit(&[item(b"key", b, 10, 2)]).await.expect("b"),
            vec![KvCommitted::Stored]
        );
        assert_eq!(
            ns.kv_commit(&[item(b"key", a, 10, 1)]).await.expect("a"),
            vec![KvCommitted::Exists]
        );
        let found = ns.kv_lookup(&[b"key".to_vec()]).await.expect("lookup");
        assert_eq!(found[0].map(|e| (e.slot, e.crc)), Some((b.slot, 2)));
        // A retried commit of the winner (its first reply lost) is Stored.
        assert_eq!(
            ns.kv_commit(&[item(b"key", b, 10, 2)])
                .await
                .expect("retry"),
            vec![KvCommitted::Stored]
        );
        // The loser's slot is free again: the next reservation takes it,
        // with a new generation.
        let next = ns.kv_reserve(0, 1, false).await.expect("next").slots[0];
        assert_eq!(next.slot, a.slot);
        assert_eq!(next.generation, a.generation + 1);
        check_clean(&ns).await;
    }

    #[tokio::test]
    async fn a_full_class_evicts_the_least_recently_used_or_answers_full() {
        let (ns, clock) = namespace_on_clock(START_NS, |_| {}).await;
        ns.kv_open(&spec(4)).await.expect("open");
        for k in 0..4u8 {
            let g = ns.kv_reserve(0, 1, true).await.expect("reserve").slots[0];
            ns.kv_commit(&[item(&[k], g, 1, 0)]).await.expect("commit");
            clock.advance_ms(2_000);
        }
        // Key 0 is read again (after an access bucket): key 1 is now the
        // least recently used.
        ns.kv_lookup(&[vec![0]]).await.expect("touch");
        let none = ns.kv_reserve(0, 1, false).await.expect("no evict");
        assert!(none.slots.is_empty(), "{none:?}");
        let evicting = ns.kv_reserve(0, 1, true).await.expect("evict");
        assert_eq!(evicting.slots.len(), 1);
        // A class of 4 slots evicts no more than it needs.
        assert_eq!(evicting.evicted, 1);
        let present = ns
            .kv_lookup(&[vec![0], vec![1], vec![2], vec![3]])
            .await
            .expect("lookup");
        let kept: Vec<bool> = present.iter().map(Option::is_some).collect();
        assert_eq!(kept, vec![true, false, true, true]);
        check_clean(&ns).await;
    }

    #[tokio::test]
    async fn eviction_takes_the_oldest_access_first() {
        let (ns, clock) = namespace_on_clock(START_NS, |_| {}).await;
        let n = 32usize;
        let mut big = spec(n as u32);
        big.max_age_ms = 0;
        ns.kv_open(&big).await.expect("open");
        let grants = ns.kv_reserve(0, n as u32, true).await.expect("reserve");
        let items: Vec<_> = grants
            .slots
            .iter()
            .enumerate()
            .map(|(i, g)| item(&(i as u32).to_be_bytes(), *g, 1, 0))
            .collect();
        ns.kv_commit(&items).await.expect("commit");
        clock.advance_ms(5_000);
        // Touch the first two: the others are older now.
        ns.kv_lookup(&[0u32.to_be_bytes().to_vec(), 1u32.to_be_bytes().to_vec()])
            .await
            .expect("touch");
        let evicted = ns.kv_reserve(0, 1, true).await.expect("evict");
        // One needed, two more ahead (a sixteenth of 32 slots).
        assert_eq!(evicted.evicted, 3);
        let survivors = ns
            .kv_lookup(
                &(0..n as u32)
                    .map(|i| i.to_be_bytes().to_vec())
                    .collect::<Vec<_>>(),
            )
            .await
            .expect("lookup");
        let gone: Vec<usize> = (0..n).filter(|&i| survivors[i].is_none()).collect();
        assert_eq!(gone, vec![2, 3, 4], "the least recently read go first");
        check_clean(&ns).await;
    }

    #[tokio::test]
    async fn expired_reservations_are_taken_back_and_their_commits_lost() {
        let (ns, clock) = namespace_on_clock(START_NS, |_| {}).await;
        ns.kv_open(&spec(1)).await.expect("open");
        let stale = ns.kv_reserve(0, 1, false).await.expect("reserve").slots[0];
        assert!(
            ns.kv_reserve(0, 1, false)
                .await
                .expect("full")
                .slots
                .is_empty()
        );
        clock.advance_ms(30_001);
        let again = ns.kv_reserve(0, 1, false).await.expect("reclaimed").slots[0];
        assert_eq!(again.slot, stale.slot);
        assert_eq!(again.generation, stale.generation + 1);
        assert_eq!(
            ns.kv_commit(&[item(b"late", stale, 1, 0)])
                .await
                .expect("late"),
            vec![KvCommitted::Lost]
        );
        assert_eq!(
            ns.kv_commit(&[item(b"new", again, 1, 0)])
                .await
                .expect("new"),
            vec![KvCommitted::Stored]
        );
        check_clean(&ns).await;
    }

    #[tokio::test]
    async fn removal_frees_slots_and_age_eviction_collects_old_entries() {
        let (ns, clock) = namespace_on_clock(START_NS, |_| {}).await;
        ns.kv_open(&spec(8)).await.expect("open");
        let grants = ns.kv_reserve(0, 8, false).await.expect("reserve");
        let items: Vec<_> = grants
            .slots
            .iter()
            .enumerate()
            .map(|(i, g)| item(&[i as u8], *g, 1, 0))
            .collect();
        ns.kv_commit(&items).await.expect("commit");
        let keys: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i]).collect();
        assert_eq!(
            ns.kv_remove(&keys, &[]).await.expect("remove"),
            vec![true; 4]
        );
        assert_eq!(
            ns.kv_remove(&keys, &[]).await.expect("again"),
            vec![false; 4]
        );
        // A checked remove leaves an entry that names another block.
        let wrong = KvEntry {
            generation: 99,
            ..KvEntry::default()
        };
        assert_eq!(
            ns.kv_remove(&[vec![4]], &[wrong]).await.expect("checked"),
            vec![false]
        );
        assert_eq!(
            ns.kv_reserve(0, 8, false).await.expect("freed").slots.len(),
            4
        );
        clock.advance_ms(60_001);
        let evicted = ns.kv_evict(256).await.expect("evict");
        assert_eq!(evicted.evicted, 4, "{evicted:?}");
        // The four reserved above expired too (30 s).
        assert_eq!(evicted.reclaimed, 4, "{evicted:?}");
        assert_eq!(
            ns.kv_reserve(0, 8, false).await.expect("all").slots.len(),
            8
        );
        check_clean(&ns).await;
    }

    /// Reads a key's entry and writes raw index records behind the
    /// namespace's back, as damage would.
    async fn entry_and_tamper<K: Kv>(
        ns: &Namespace<K>,
        read: &[u8],
        writes: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> KvEntryValue {
        let read = read.to_vec();
        flyfs_kv::run(ns.kv(), &flyfs_kv::RetryOptions::default(), |tx| {
            let (read, writes) = (read.clone(), writes.clone());
            async move {
                let key = kv_entry_key(&read);
                let value = tx.get(&key, false).await?.expect("the entry exists");
                for (key, value) in writes {
                    tx.set(&key, &value)?;
                }
                Ok::<_, NsError>(decode_kv_entry(&key, &value)?)
            }
        })
        .await
        .expect("tamper")
    }

    #[tokio::test]
    async fn check_cross_checks_the_index_against_the_slots() {
        let (ns, _clock) = namespace_on_clock(START_NS, |_| {}).await;
        ns.kv_open(&spec(8)).await.expect("open");
        let grants = ns.kv_reserve(0, 3, false).await.expect("reserve");
        let items: Vec<_> = [b"a", b"b"]
            .iter()
            .zip(&grants.slots)
            .map(|(k, g)| item(&k[..], *g, 1, 0))
            .collect();
        ns.kv_commit(&items).await.expect("commit");
        ns.kv_release(0, &grants.slots[2..]).await.expect("release");
        check_clean(&ns).await;
        let b = entry_and_tamper(&ns, b"b", Vec::new()).await;
        // Key `c` names `b`'s slot (a slot owned by two keys); key `d`
        // names the released, free slot.
        let c = encode_kv_entry(&b).expect("encode");
        let d = encode_kv_entry(&KvEntryValue {
            slot: grants.slots[2].slot,
            ..b
        })
        .expect("encode");
        entry_and_tamper(
            &ns,
            b"b",
            vec![(kv_entry_key(b"c"), c), (kv_entry_key(b"d"), d)],
        )
        .await;
        let report = ns.check().await.expect("check");
        let found: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        let has = |needle: &str| found.iter().any(|p| p.contains(needle));
        assert!(has("named by 2 entries"), "{found:?}");
        assert!(has("which holds the block of key"), "{found:?}");
        assert!(
            has(&format!(
                "names slot {} of class 0, which is free",
                grants.slots[2].slot
            )),
            "{found:?}"
        );
        // A used slot on the free list.
        let a = entry_and_tamper(&ns, b"a", Vec::new()).await;
        entry_and_tamper(
            &ns,
            b"a",
            vec![(kv_free_key(0, 1, a.slot), encode_kv_mark().expect("encode"))],
        )
        .await;
        let report = ns.check().await.expect("check");
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.what.contains("on the free list but Used")),
            "{:?}",
            report.problems
        );
    }
}
