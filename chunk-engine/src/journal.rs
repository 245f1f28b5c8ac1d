//! The journal thread: group commit of metadata records, and checkpoints.
//!
//! Committers queue records and wait; this thread takes everything queued
//! (up to `batch_bytes_max`), writes it as one checksummed batch, issues one
//! flush, applies the records to the committed map and publishes how many
//! records are durable. While one batch is on its way to the device the next
//! one fills up, which is what makes commits cheap under load.
//!
//! Batches are strictly serial: batch N+1 is written only after batch N's
//! flush returned. Recovery relies on this: only the last batch in the log can
//! be one whose flush never completed, so only its data needs checking.
//!
//! It is a plain OS thread with a tiny executor rather than a task, so that a
//! cancelled committer can never abandon a half-written batch, and so that the
//! engine works under any async runtime.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use flyfs_bypass::{BlockDevice, block_on};

use crate::EngineError;
use crate::engine::Core;
use crate::format::{
    CHECKPOINT_HEADER_BYTES, CheckpointHeader, META_BYTES, Record, batch_bytes, encode_batch,
};

/// Where the log stands. Owned by the journal thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cursor {
    /// Log position (a byte offset in the unwrapped log) of the next batch.
    pub head: u64,
    /// Oldest position recovery may need: the current checkpoint's.
    pub tail: u64,
    pub checkpoint_sequence: u64,
    /// Which of the two checkpoint slots holds the current checkpoint.
    pub checkpoint_slot: u64,
}

/// Where a batch of `bytes` goes: at `head`, or at the start of the next lap
/// when it would not fit before the region's end. Recovery looks in the same
/// two places.
pub(crate) fn place(head: u64, bytes: u64, journal_bytes: u64) -> u64 {
    if head % journal_bytes + bytes > journal_bytes {
        head.next_multiple_of(journal_bytes)
    } else {
        head
    }
}

pub(crate) fn run<D: BlockDevice>(core: Arc<Core<D>>, mut cursor: Cursor) {
    let max_payload = core
        .config
        .batch_bytes_max
        .min(core.sb.journal_bytes as usize / 4)
        - crate::format::BATCH_HEADER_BYTES;
    loop {
        let (records, durable_through) = {
            let mut queue = core.queue.lock();
            while queue.records.is_empty() {
                if queue.shutdown {
                    return;
                }
                core.queue_cv.wait(&mut queue);
            }
            let mut payload = 0;
            let mut records = Vec::new();
            while let Some(record) = queue.records.front() {
                if !records.is_empty() && payload + record.encoded_len() > max_payload {
                    break;
                }
                payload += record.encoded_len();
                records.push(queue.records.pop_front().expect("front exists"));
            }
            queue.taken += records.len() as u64;
            (records, queue.taken)
        };
        let result = match core.poisoned() {
            Some(reason) => Err(reason),
            None => block_on(commit_batch(&core, &mut cursor, &records))
                .map_err(|e| Arc::from(e.to_string())),
        };
        let result = result.and_then(|()| {
            // The batch is durable: acknowledge it before any checkpoint, so
            // a failing checkpoint never fails a commit that is already safe.
            core.durable.send_modify(|d| d.records = durable_through);
            let live = cursor.head - cursor.tail;
            if live * 100 > core.sb.journal_bytes * u64::from(core.config.checkpoint_percent) {
                block_on(checkpoint(&core, &mut cursor)).map_err(|e| Arc::from(e.to_string()))
            } else {
                Ok(())
            }
        });
        if let Err(reason) = result {
            core.poison(&reason);
            core.durable.send_modify(|d| d.error = Some(reason));
        }
    }
}

async fn commit_batch<D: BlockDevice>(
    core: &Core<D>,
    cursor: &mut Cursor,
    records: &[Record],
) -> Result<(), EngineError> {
    let journal_bytes = core.sb.journal_bytes;
    let bytes = batch_bytes(records.iter().map(Record::encoded_len).sum()) as u64;
    let mut lsn = place(cursor.head, bytes, journal_bytes);
    if lsn + bytes - cursor.tail > journal_bytes {
        checkpoint(core, cursor).await?;
        lsn = place(cursor.head, bytes, journal_bytes);
    }
    assert!(
        lsn + bytes - cursor.tail <= journal_bytes,
        "journal batch overruns the checkpointed tail"
    );
    let mut buf = core.pool.alloc(bytes as usize);
    let written = encode_batch(core.sb.format_id, lsn, records, &mut buf);
    debug_assert_eq!(written as u64, bytes);
    core.write_at(core.sb.journal_offset + lsn % journal_bytes, buf, || {
        "journal batch".into()
    })
    .await?;
    core.flush("journal batch").await?;
    cursor.head = lsn + bytes;
    core.counters.batches.fetch_add(1, Ordering::Relaxed);
    core.counters
        .records
        .fetch_add(records.len() as u64, Ordering::Relaxed);
    {
        let mut state = core.state.lock();
        for record in records {
            state.apply(record, true);
        }
    }
    Ok(())
}

/// Writes the committed map as a checkpoint at the journal head into the slot
/// not holding the current checkpoint, then lets the journal reuse its space.
pub(crate) async fn checkpoint<D: BlockDevice>(
    core: &Core<D>,
    cursor: &mut Cursor,
) -> Result<(), EngineError> {
    let sequence = cursor.checkpoint_sequence + 1;
    let slot = 1 - cursor.checkpoint_slot;
    let buf = {
        let state = core.state.lock();
        let count = state.committed.len();
        let total = (CHECKPOINT_HEADER_BYTES as usize + count * META_BYTES)
            .next_multiple_of(crate::format::BLOCK as usize);
        assert!(
            total as u64 <= core.sb.checkpoint_slot_bytes,
            "checkpoint exceeds its slot"
        );
        let mut buf = core.pool.alloc(total);
        let header_len = CHECKPOINT_HEADER_BYTES as usize;
        for (i, committed) in state.committed.values().enumerate() {
            committed
                .meta
                .encode(&mut buf[header_len + i * META_BYTES..]);
        }
        let payload_end = header_len + count * META_BYTES;
        buf[payload_end..].fill(0);
        let header = CheckpointHeader {
            sequence,
            journal_lsn: cursor.head,
            entry_count: count as u64,
            payload_crc: crc32c::crc32c(&buf[header_len..payload_end]),
        };
        header.encode(core.sb.format_id, &mut buf);
        buf
    };
    let offset = core.sb.checkpoint_offset + slot * core.sb.checkpoint_slot_bytes;
    core.write_at(offset, buf, || "checkpoint".into()).await?;
    core.flush("checkpoint").await?;
    tracing::debug!(device = %core.device, sequence, lsn = cursor.head, "checkpoint written");
    core.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
    cursor.tail = cursor.head;
    cursor.checkpoint_sequence = sequence;
    cursor.checkpoint_slot = slot;
    Ok(())
}
