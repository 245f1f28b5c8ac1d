//! Formatting a device, and opening one: superblock selection and repair,
//! checkpoint selection, journal replay up to a torn or corrupt tail, the
//! check of the data of the batches whose flush may not have returned, and
//! rebuilding the allocator.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use flyfs_bypass::{BlockDevice, BufferPool};

use crate::alloc::Allocator;
use crate::config::{EngineConfig, FormatOptions, JournalMode};
use crate::engine::OpenEngine;
use crate::format::{
    BLOCK, CHECKPOINT_HEADER_BYTES, CheckpointHeader, FORMAT_VERSION, FormatError, HEADER_BYTES,
    Record, SUPERBLOCK_OFFSETS, Superblock, checkpoint_carried_bytes,
    checkpoint_payload_head_bytes, decode_batch, decode_batch_header, decode_checkpoint,
};
use crate::journal::{self, Cursor};
use crate::table::ChunkTable;
use crate::{Engine, EngineError};

fn name<D: BlockDevice>(dev: &D) -> Arc<str> {
    Arc::from(dev.name())
}

async fn read_raw<D: BlockDevice>(
    dev: &D,
    pool: &BufferPool,
    offset: u64,
    len: usize,
    what: &str,
) -> Result<flyfs_bypass::DmaBuf, EngineError> {
    dev.read(offset, pool.alloc(len))
        .await
        .into_result()
        .map_err(|source| EngineError::Device {
            device: name(dev),
            context: format!("reading {what}"),
            source,
        })
}

async fn write_raw<D: BlockDevice>(
    dev: &D,
    offset: u64,
    data: &[u8],
    what: &str,
) -> Result<(), EngineError> {
    let buf = flyfs_bypass::DmaBuf::copy_from(data);
    dev.write(offset, buf)
        .await
        .result
        .map_err(|source| EngineError::Device {
            device: name(dev),
            context: format!("writing {what}"),
            source,
        })
}

async fn flush_raw<D: BlockDevice>(dev: &D, what: &str) -> Result<(), EngineError> {
    dev.flush().await.map_err(|source| EngineError::Device {
        device: name(dev),
        context: format!("flushing {what}"),
        source,
    })
}

/// Both superblock copies, decoded (or why not), if the device is big enough
/// to hold them.
async fn read_superblocks<D: BlockDevice>(
    dev: &D,
    pool: &BufferPool,
) -> Result<Option<[Result<Superblock, FormatError>; 2]>, EngineError> {
    if dev.geometry().capacity_bytes < HEADER_BYTES {
        return Ok(None);
    }
    let mut copies = [
        Err(FormatError::NoMagic { what: "superblock" }),
        Err(FormatError::NoMagic { what: "superblock" }),
    ];
    for (copy, offset) in copies.iter_mut().zip(SUPERBLOCK_OFFSETS) {
        let buf = read_raw(dev, pool, offset, BLOCK as usize, "superblock").await?;
        *copy = Superblock::decode(&buf);
    }
    Ok(Some(copies))
}

fn random_u64() -> u64 {
    // RandomState is seeded from the OS: enough to tell formats apart.
    std::collections::hash_map::RandomState::new().hash_one(SystemTime::now())
}

impl<D: BlockDevice> Engine<D> {
    /// Formats `dev`. Refuses a device holding a flyfs superblock (even a
    /// damaged one) unless `options.force` is set.
    pub async fn format(dev: &D, options: &FormatOptions) -> Result<Superblock, EngineError> {
        Self::format_as(dev, options, FORMAT_VERSION).await
    }

    /// Test hook: formats `dev` as an older format version would have (to
    /// check that this build still opens and serves such devices).
    #[cfg(feature = "testing")]
    pub async fn format_version(
        dev: &D,
        options: &FormatOptions,
        format_version: u32,
    ) -> Result<Superblock, EngineError> {
        Self::format_as(dev, options, format_version).await
    }

    async fn format_as(
        dev: &D,
        options: &FormatOptions,
        format_version: u32,
    ) -> Result<Superblock, EngineError> {
        let geometry = dev.geometry();
        let pool = BufferPool::new(&flyfs_bypass::PoolConfig {
            classes: vec![(BLOCK as usize, 4)],
            hugepages: flyfs_bypass::HugePages::Never,
        })
        .map_err(|e| EngineError::Config(e.to_string()))?;
        if geometry.sector_size as u64 > BLOCK {
            return Err(EngineError::Config(format!(
                "sector size {} exceeds {BLOCK}",
                geometry.sector_size
            )));
        }
        if let Some(copies) = read_superblocks(dev, &pool).await?
            && !options.force
        {
            let any_valid = copies.iter().any(Result::is_ok);
            let any_flyfs = copies.iter().any(|c| {
                !matches!(
                    c,
                    Err(FormatError::NoMagic { .. } | FormatError::Short { .. })
                )
            });
            if any_flyfs {
                return Err(EngineError::AlreadyFormatted {
                    device: name(dev),
                    damaged: !any_valid,
                });
            }
        }
        let check = |bytes: u64, what: &str| {
            if bytes.is_power_of_two() {
                Ok(bytes.trailing_zeros() as u8)
            } else {
                Err(EngineError::Config(format!(
                    "{what} {bytes} is not a power of two"
                )))
            }
        };
        let class_min = check(options.chunk_size_min, "smallest chunk size")?;
        let class_max = check(options.chunk_size_max, "largest chunk size")?;
        let capacity = geometry.capacity_bytes;
        let journal_bytes = options
            .journal_bytes
            .unwrap_or_else(|| (capacity / 100).clamp(1 << 20, 256 << 20))
            .next_multiple_of(BLOCK);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let sb = Superblock::plan(
            capacity,
            geometry.sector_size,
            class_min,
            class_max,
            journal_bytes,
            random_u64(),
            created,
        )
        .and_then(|sb| {
            if format_version == FORMAT_VERSION {
                Ok(sb)
            } else {
                sb.for_format_version(format_version)
            }
        })
        .map_err(|reason| {
            if reason.contains("needs at least") {
                EngineError::TooSmall {
                    device: name(dev),
                    reason: format!("{capacity} bytes; the format {reason}"),
                }
            } else {
                EngineError::Config(reason)
            }
        })?;
        // An empty checkpoint in slot 0, slot 1 invalidated, then the
        // superblocks last: a format torn before them leaves a device that
        // still reads as unformatted rather than half-formatted.
        let mut block = vec![0u8; 2 * BLOCK as usize];
        let payload_len =
            crate::format::encode_checkpoint_payload(&[], &[], &sb, &mut block[BLOCK as usize..]);
        CheckpointHeader {
            sequence: 1,
            journal_lsn: 0,
            entry_count: 0,
            payload_crc: crc32c::crc32c(&block[BLOCK as usize..BLOCK as usize + payload_len]),
        }
        .encode(sb.format_id, &mut block);
        write_raw(dev, sb.checkpoint_offset, &block, "checkpoint").await?;
        write_raw(
            dev,
            sb.checkpoint_offset + sb.checkpoint_slot_bytes,
            &[0u8; BLOCK as usize],
            "checkpoint",
        )
        .await?;
        write_raw(dev, sb.journal_offset, &[0u8; BLOCK as usize], "journal").await?;
        flush_raw(dev, "format").await?;
        for offset in SUPERBLOCK_OFFSETS {
            write_raw(dev, offset, &sb.encode(), "superblock").await?;
        }
        flush_raw(dev, "superblock").await?;
        tracing::info!(device = %dev.name(), ?sb, "formatted");
        Ok(sb)
    }

    /// Opens a formatted device: recovers the committed state, writes a fresh
    /// checkpoint and starts the journal thread. `pool` supplies every I/O
    /// buffer (register it with the device for zero-copy I/O).
    pub async fn open(
        dev: D,
        pool: BufferPool,
        config: EngineConfig,
    ) -> Result<Engine<D>, EngineError> {
        let device = name(&dev);
        let geometry = dev.geometry();
        if u64::from(geometry.sector_size) > BLOCK {
            return Err(EngineError::Config(format!(
                "sector size {} exceeds {BLOCK}",
                geometry.sector_size
            )));
        }
        let Some(copies) = read_superblocks(&dev, &pool).await? else {
            return Err(EngineError::TooSmall {
                device,
                reason: format!(
                    "{} bytes cannot hold a flyfs superblock",
                    geometry.capacity_bytes
                ),
            });
        };
        let [a, b] = copies;
        let (sb, repair) = match (a, b) {
            (Ok(a), Ok(b)) if a == b => (a, None),
            (Ok(a), Ok(b)) => {
                return Err(EngineError::Corrupt {
                    device,
                    what: format!("the two superblock copies disagree ({a:?} vs {b:?})"),
                    source: None,
                });
            }
            (Ok(sb), Err(bad)) => (sb, Some((SUPERBLOCK_OFFSETS[1], bad))),
            (Err(bad), Ok(sb)) => (sb, Some((SUPERBLOCK_OFFSETS[0], bad))),
            (Err(FormatError::NoMagic { .. }), Err(source @ FormatError::NoMagic { .. })) => {
                return Err(EngineError::NotFormatted { device, source });
            }
            (Err(a), Err(b)) => {
                let source = if matches!(a, FormatError::NoMagic { .. }) {
                    b
                } else {
                    a
                };
                return Err(EngineError::Corrupt {
                    device,
                    what: "both superblock copies are unreadable".into(),
                    source: Some(source),
                });
            }
        };
        if geometry.capacity_bytes < sb.capacity_bytes {
            return Err(EngineError::TooSmall {
                device,
                reason: format!(
                    "it has {} bytes but was formatted with {}",
                    geometry.capacity_bytes, sb.capacity_bytes
                ),
            });
        }
        if geometry.sector_size > sb.sector_size.max(BLOCK as u32) {
            return Err(EngineError::Config(format!(
                "sector size {} is larger than at format time",
                geometry.sector_size
            )));
        }

        let loaded = load_checkpoint(&dev, &pool, &sb).await?;
        let (mut table, replay) = replay_from(&dev, &pool, &sb, &loaded).await?;
        if let Some(needed) = loaded.needed_lsn
            && replay.end < needed
        {
            return Err(EngineError::Corrupt {
                device,
                what: format!(
                    "the newest checkpoint is damaged and the journal from the older one ends at {} before {needed}",
                    replay.end
                ),
                source: None,
            });
        }
        table.replay_done();
        let slots: Vec<_> = table
            .committed
            .iter()
            .map(|(key, c)| (*key, c.meta.slot))
            .collect();
        for (key, slot) in slots {
            table
                .alloc
                .mark_used(slot)
                .map_err(|conflict| EngineError::Corrupt {
                    device: device.clone(),
                    what: format!("metadata of {key:?} is inconsistent: {conflict}"),
                    source: None,
                })?;
        }
        if !sb.has_block_crcs() {
            tracing::warn!(
                device = %device,
                format_version = sb.format_version,
                "device formatted before block CRCs: a checked partial read reads and checks \
                 the whole chunk (reformat to get block CRCs)"
            );
        }
        tracing::info!(
            device = %device,
            format_version = sb.format_version,
            chunks = table.committed.len(),
            batches = replay.batches,
            discarded_batches = replay.discarded,
            "chunk engine recovered"
        );

        if let Some((offset, bad)) = repair {
            tracing::warn!(device = %device, offset, error = %bad, "repairing damaged superblock copy");
            write_raw(&dev, offset, &sb.encode(), "superblock").await?;
            flush_raw(&dev, "superblock").await?;
        }

        // Checkpoint at once, one lap past the end of the replay: from here
        // on the log restarts at a position no stale batch can claim. Batches
        // the replay discarded, and on a version 5 device batches that were
        // in flight behind one that never landed, end within a lap of the
        // checkpointed tail (a batch never overruns it), which is before the
        // end of the replay, so they carry log positions below the restart.
        let cursor = Cursor {
            head: restart_lsn(replay.end, sb.journal_bytes),
            tail: loaded.header.journal_lsn,
            checkpoint_sequence: loaded.sequence_max,
            checkpoint_slot: loaded.slot,
        };
        let engine = Arc::new(OpenEngine::new(dev, sb, pool, config, table, cursor));
        // Made durable by the checkpoint's flush below. The checkpoint
        // also redoes every Patch layer the journal holds (writes it into
        // its slot, flushed before the checkpoint is written): the records
        // are about to be reused.
        for (offset, crcs) in &replay.block_crcs {
            engine.device.store_block_crcs(*offset, crcs).await?;
        }
        {
            // Awaited rather than blocked on, so that opening works on a
            // single-threaded runtime whose device needs the runtime to
            // progress (a simulated device with simulated latency).
            let mut writer = engine.journal.writer.lock().await;
            let writer = &mut *writer;
            journal::checkpoint(&engine, &mut writer.cursor, &mut writer.checkpoint_plan).await?;
        }
        let thread = match engine.config.journal {
            JournalMode::Thread => {
                let thread_engine = engine.clone();
                let thread = std::thread::Builder::new()
                    .name("flyfs-journal".into())
                    .spawn(move || journal::run(thread_engine))
                    .map_err(|e| {
                        EngineError::Config(format!("cannot start the journal thread: {e}"))
                    })?;
                Some(thread)
            }
            JournalMode::Inline => None,
        };
        Ok(Engine::new(engine, thread))
    }
}

/// The checkpoint recovery starts from.
struct LoadedCheckpoint {
    slot: u64,
    header: CheckpointHeader,
    entries: Vec<crate::format::ChunkMeta>,
    /// The prepared Patch records it carries (format version 4).
    carried: Vec<Record>,
    /// When the newest checkpoint's payload was damaged and an older one is
    /// used: the log position the journal must reach for nothing to be lost.
    needed_lsn: Option<u64>,
    /// Highest sequence number seen in a valid header.
    sequence_max: u64,
}

async fn load_checkpoint<D: BlockDevice>(
    dev: &D,
    pool: &BufferPool,
    sb: &Superblock,
) -> Result<LoadedCheckpoint, EngineError> {
    let mut headers = Vec::new();
    let mut last_error = None;
    for slot in 0..2u64 {
        let offset = sb.checkpoint_offset + slot * sb.checkpoint_slot_bytes;
        let buf = read_raw(dev, pool, offset, BLOCK as usize, "checkpoint header").await?;
        match CheckpointHeader::decode(&buf, sb) {
            Ok(header) => headers.push((slot, header)),
            Err(error) => {
                tracing::debug!(device = %dev.name(), slot, %error, "checkpoint slot not usable");
                last_error = Some(error);
            }
        }
    }
    headers.sort_by_key(|(_, header)| std::cmp::Reverse(header.sequence));
    let sequence_max = headers.first().map_or(0, |(_, header)| header.sequence);
    let mut needed_lsn = None;
    for (slot, header) in headers {
        let offset =
            sb.checkpoint_offset + slot * sb.checkpoint_slot_bytes + CHECKPOINT_HEADER_BYTES;
        let decoded = read_checkpoint_payload(dev, pool, sb, offset, &header).await?;
        match decoded {
            Ok((entries, carried)) => {
                return Ok(LoadedCheckpoint {
                    slot,
                    header,
                    entries,
                    carried,
                    needed_lsn,
                    sequence_max,
                });
            }
            Err(error) => {
                tracing::warn!(device = %dev.name(), slot, %error, "checkpoint damaged; trying the older one");
                needed_lsn.get_or_insert(header.journal_lsn);
                last_error = Some(error);
            }
        }
    }
    Err(EngineError::Corrupt {
        device: name(dev),
        what: "no valid checkpoint".into(),
        source: last_error,
    })
}

/// Reads and decodes a checkpoint's payload: its entries and the records it
/// carries. The entries (and the length of the carried records) are read
/// first, the carried records then if they go past that. A payload that
/// does not decode is `Ok(Err(..))`: the caller falls back to the other
/// checkpoint.
async fn read_checkpoint_payload<D: BlockDevice>(
    dev: &D,
    pool: &BufferPool,
    sb: &Superblock,
    offset: u64,
    header: &CheckpointHeader,
) -> Result<Result<(Vec<crate::format::ChunkMeta>, Vec<Record>), FormatError>, EngineError> {
    let head = checkpoint_payload_head_bytes(header, sb) as u64;
    if head == 0 {
        return Ok(decode_checkpoint(&[], header, sb));
    }
    let first_len = head.next_multiple_of(BLOCK);
    let first = read_raw(dev, pool, offset, first_len as usize, "checkpoint").await?;
    let carried = match checkpoint_carried_bytes(&first, header, sb) {
        Ok(carried) => carried as u64,
        Err(error) => return Ok(Err(error)),
    };
    let total = (head + carried).next_multiple_of(BLOCK);
    if total <= first_len {
        return Ok(decode_checkpoint(&first, header, sb));
    }
    let all = read_raw(dev, pool, offset, total as usize, "checkpoint").await?;
    Ok(decode_checkpoint(&all, header, sb))
}

/// Where the log restarts after a replay that ended at `end`: one lap later.
/// Every stale batch (one ending before `end + journal_bytes`) carries a
/// lower log position, so none can pass for the next batch; and the next
/// batches go to the same place in the region as they would have without
/// the restart, so the journal an older checkpoint needs is reused no sooner.
pub(crate) fn restart_lsn(end: u64, journal_bytes: u64) -> u64 {
    end + journal_bytes
}

/// How the journal replay ended.
struct Replay {
    /// Log position after the last batch applied.
    end: u64,
    /// Batches applied.
    batches: u64,
    /// Valid batches found (applied, or checked and not).
    found: u64,
    /// Batches found but dropped because their data (or an older batch's)
    /// never became durable.
    discarded: u64,
    /// The block CRCs of the data the checked batches point at, by device
    /// offset: rewritten at open (see `version_reads_back`).
    block_crcs: Vec<(u64, Vec<u32>)>,
    /// The log position of the first checked batch whose data did not read
    /// back: the replay must be redone, ending before it.
    failed_at: Option<u64>,
}

/// The chunk table a checkpoint describes, with the journal after it
/// replayed. A replay that finds a batch whose data never became durable is
/// redone from the checkpoint, ending before that batch: dropping it can
/// make older records the current ones, which must then be checked in
/// turn. Each redo ends earlier, so there are at most as many as batches
/// checked.
async fn replay_from<D: BlockDevice>(
    dev: &D,
    pool: &BufferPool,
    sb: &Superblock,
    loaded: &LoadedCheckpoint,
) -> Result<(ChunkTable, Replay), EngineError> {
    let mut stop = None;
    let mut found = None;
    loop {
        let mut table = ChunkTable::new(Allocator::new(
            sb.group_count,
            sb.class_log2_min,
            sb.class_log2_max,
        ));
        for meta in &loaded.entries {
            table.apply(&Record::Put(*meta), false);
        }
        // The prepared patches the checkpoint carries, over their entries.
        for record in &loaded.carried {
            table.apply(record, false);
        }
        let mut replay =
            replay_journal(dev, pool, sb, loaded.header.journal_lsn, &mut table, stop).await?;
        if let Some(needed) = loaded.needed_lsn
            && replay.failed_at.is_none()
            && replay.end < needed
            && needed == restart_lsn(replay.end, sb.journal_bytes)
        {
            // The damaged newest checkpoint is the one an open wrote where it
            // restarted the log, one lap past this replay's end: the log goes
            // on from there.
            let more = replay_journal(dev, pool, sb, needed, &mut table, stop).await?;
            replay.batches += more.batches;
            replay.found += more.found;
            replay.block_crcs.extend(more.block_crcs);
            replay.failed_at = more.failed_at;
            replay.end = more.end;
        }
        let found = *found.get_or_insert(replay.found);
        match replay.failed_at {
            Some(at) => {
                tracing::warn!(device = %dev.name(), lsn = at, "discarding journal batches from this one on: data they point at did not reach the medium");
                stop = Some(at);
            }
            None => {
                replay.discarded = found.saturating_sub(replay.batches);
                return Ok((table, replay));
            }
        }
    }
}

/// Reads the batch that claims log position `lsn`, if a valid one is there.
async fn read_batch<D: BlockDevice>(
    dev: &D,
    pool: &BufferPool,
    sb: &Superblock,
    lsn: u64,
) -> Result<Option<(Vec<Record>, u64, u16)>, EngineError> {
    let journal = sb.journal_bytes;
    let position = lsn % journal;
    let offset = sb.journal_offset + position;
    let first = read_raw(dev, pool, offset, BLOCK as usize, "journal").await?;
    let Some(header) = decode_batch_header(&first, lsn, journal as usize) else {
        return Ok(None);
    };
    let total = header.total_bytes() as u64;
    if position + total > journal {
        return Ok(None);
    }
    let full = if total > BLOCK {
        read_raw(dev, pool, offset, total as usize, "journal").await?
    } else {
        first
    };
    match decode_batch(&full, &header, sb) {
        Ok(Some(records)) => Ok(Some((records, total, header.in_flight))),
        Ok(None) => Ok(None),
        Err(source) => Err(EngineError::Corrupt {
            device: name(dev),
            what: format!(
                "journal batch at log position {lsn} has a valid checksum but invalid records"
            ),
            source: Some(source),
        }),
    }
}

/// Replays the journal from `start` into `table`, up to the first position
/// holding no valid batch (a torn or never-written tail) or up to `stop`.
///
/// The batches at the end of the log whose flush may not have returned are
/// the last one and the `in_flight` older ones its header names (format
/// version 5; always just the last before): every batch before those was
/// durable when the last was written. They were never acknowledged, and may
/// point at data that did not reach the medium, or (pipelined) have landed
/// while an older one did not. So once they are applied, the current
/// version of every chunk they put data down for (a Put or Prepare) must
/// read back with its checksum; the
/// oldest of them holding the last record of a chunk that does not is
/// reported in `failed_at`, and the caller replays again, stopping before it.
///
/// A batch that was durable never fails this: its records' data was written
/// before it, so its flush made that durable, and a slot is reused only once
/// a durable record released it, which would be a later record of the same
/// chunk. A checkpoint that was cut short may have written Patch layers into
/// a slot already; the check lays every layer up to the version over the
/// slot's bytes, which gives the same bytes whichever of them are there.
async fn replay_journal<D: BlockDevice>(
    dev: &D,
    pool: &BufferPool,
    sb: &Superblock,
    start: u64,
    table: &mut ChunkTable,
    stop: Option<u64>,
) -> Result<Replay, EngineError> {
    let journal = sb.journal_bytes;
    let depth = sb.journal_depth_max();
    let mut lsn = start;
    let mut batches = 0;
    let mut seen = 0;
    // The last `depth` batches found: (lsn, records, in flight before it).
    let mut last: VecDeque<(u64, Vec<Record>, u16)> = VecDeque::new();
    loop {
        let mut found = read_batch(dev, pool, sb, lsn).await?.map(|b| (lsn, b));
        if found.is_none() && !lsn.is_multiple_of(journal) {
            // The writer skips to the next lap when a batch does not fit.
            let lap = lsn.next_multiple_of(journal);
            found = read_batch(dev, pool, sb, lap).await?.map(|b| (lap, b));
        }
        let Some((at, (records, bytes, in_flight))) = found else {
            break;
        };
        if stop == Some(at) {
            break;
        }
        seen += 1;
        last.push_back((at, records, in_flight));
        if last.len() > depth {
            let (_, records, _) = last.pop_front().expect("longer than the window");
            for record in &records {
                table.apply(record, false);
            }
            batches += 1;
        }
        lsn = at + bytes;
    }
    let unsure = last.back().map_or(0, |(_, _, in_flight)| {
        usize::from(*in_flight).min(depth - 1) + 1
    });
    while last.len() > unsure {
        let (_, records, _) = last.pop_front().expect("longer than the unsure batches");
        for record in &records {
            table.apply(record, false);
        }
        batches += 1;
    }
    // The unsure batches, applied; then the chunks they put data down for,
    // each with the index of the batch holding its last record. A chunk they
    // only patch or remove is not checked: a Patch record carries its bytes,
    // over a version whose data was durable before these batches.
    let mut touched: rustc_hash::FxHashMap<crate::ChunkKey, (usize, bool)> = Default::default();
    for (k, (_, records, _)) in last.iter().enumerate() {
        for record in records {
            table.apply(record, false);
            let (key, puts_data) = match record {
                Record::Put(meta) | Record::Prepare(meta) => {
                    (crate::ChunkKey::new(meta.chain, meta.chunk), true)
                }
                Record::Patch { meta, .. } => (crate::ChunkKey::new(meta.chain, meta.chunk), false),
                Record::Remove { chain, chunk } => (crate::ChunkKey::new(*chain, *chunk), false),
            };
            let entry = touched.entry(key).or_insert((k, false));
            *entry = (k, entry.1 || puts_data);
        }
    }
    let mut touched: Vec<_> = touched
        .into_iter()
        .filter(|(_, (_, puts_data))| *puts_data)
        .map(|(key, (k, _))| (key, k))
        .collect();
    touched.sort_by_key(|(key, k)| (*k, *key));
    let mut block_crcs = Vec::new();
    for (key, k) in touched {
        let Some(meta) = table.committed.get(&key).map(|c| c.meta) else {
            continue;
        };
        let Some(crcs) = version_reads_back(dev, pool, sb, table, key, &meta).await? else {
            let at = last[k].0;
            return Ok(Replay {
                end: at,
                batches,
                found: seen,
                discarded: 0,
                block_crcs: Vec::new(),
                failed_at: Some(at),
            });
        };
        block_crcs.extend(crcs);
    }
    batches += last.len() as u64;
    Ok(Replay {
        end: lsn,
        batches,
        found: seen,
        discarded: 0,
        block_crcs,
        failed_at: None,
    })
}

/// Whether `key`'s version `meta` reads back with its CRC: the slot's bytes
/// with the version's Patch layers over them. If so, the block CRCs of the
/// slot's bytes (on a device that has them), to rewrite at open: the
/// version's batch was written after them, but its flush may not have
/// returned, so they may have been lost while the data and the batch were
/// not, and rewriting them from the checked data spares every later partial
/// read of the chunk the fall back to a whole-chunk check. The block CRCs
/// are of the slot's bytes, which is what they describe.
async fn version_reads_back<D: BlockDevice>(
    dev: &D,
    pool: &BufferPool,
    sb: &Superblock,
    table: &ChunkTable,
    key: crate::ChunkKey,
    meta: &crate::format::ChunkMeta,
) -> Result<Option<Vec<(u64, Vec<u32>)>>, EngineError> {
    if meta.len == 0 {
        return Ok(Some(Vec::new()));
    }
    let layers = table.replay_layers(key, meta.slot, meta.version);
    let offset = sb.slot_offset(meta.slot);
    let len = u64::from(meta.len).next_multiple_of(BLOCK) as usize;
    let data = read_raw(dev, pool, offset, len, "chunk data during recovery").await?;
    let crc = if layers.is_empty() {
        crc32c::crc32c(&data[..meta.len as usize])
    } else {
        let mut version = data[..meta.len as usize].to_vec();
        crate::table::overlay_onto(&layers, 0, &mut version);
        crc32c::crc32c(&version)
    };
    if crc != meta.crc {
        return Ok(None);
    }
    Ok(Some(if sb.has_block_crcs() {
        vec![(offset, crate::block_crc::crcs_of(&data))]
    } else {
        Vec::new()
    }))
}
