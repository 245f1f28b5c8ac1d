//! The journal: group commit of metadata records, and checkpoints.
//!
//! Committers queue records and wait ([`submit`]); the writer takes everything queued (up
//! to `batch_bytes_max`), writes it as one checksummed batch, issues one
//! flush, applies the records to the engine's state and publishes how many
//! records are durable. While one batch is on its way to the device the next
//! one fills up, which is what makes commits cheap under load.
//!
//! The holder of `Journal::writer` (an async mutex around the [`Writer`]
//! state) is the only one that writes batches or checkpoints. It publishes
//! batches in log order, each once its own flush returned and every batch
//! before it is published.
//!
//! On a device of format version 5, the journal thread keeps up to
//! `EngineConfig::journal_depth` batches in flight ([`pipeline`]): batch N+1
//! is written and flushed while batch N's flush has not returned, so a commit
//! that arrives during a flush waits for one flush rather than for the rest
//! of that one and then its own. Any batch in flight may then reach the
//! medium before an older one, so each batch's header says how many older
//! ones were in flight, recovery checks the data of the last batch and of
//! those, not just the last, and restarts the log one lap past its end (see
//! recovery.rs). A checkpoint is planned at the published head and
//! written beside the batches, so commits do not wait for it
//! (docs/chunk-engine-format.md, "Checkpoints beside batches"). Inline mode
//! and older devices write batches strictly
//! one after another (batch N+1 only after batch N's flush returned), so only
//! the last batch in their log can be one whose flush never completed.
//!
//! Two drivers hold that role ([`crate::JournalMode`]):
//!
//! * `Thread`: a plain OS thread with a tiny executor ([`run`]) holds it for
//!   the engine's life, so a cancelled committer can never abandon a
//!   half-written batch, and the engine works under any async runtime.
//! * `Inline`: no thread. A committer that finds the role free takes it and
//!   writes batches itself until the queue is empty ([`write_inline`]); the
//!   others wait for durability or for the role. A deterministic simulator
//!   needs this: a thread completing commits concurrently would make when a
//!   commit completes depend on real thread timing.
//!
//! Both drivers call the same [`write_next`], so the batch logic exists once.
//!
//! # Cancellation (inline mode)
//!
//! An inline writer is an ordinary future and may be dropped at any await.
//! Three rules keep the engine consistent whatever the drop point:
//!
//! 1. Records leave the queue only after their batch's flush returned. A
//!    writer reads the batch from the front of the queue without taking it,
//!    and only the role holder ever removes records, so a dropped writer's
//!    records are still queued, in order, for the next one.
//! 2. Everything after a flush returns (advancing the cursor, applying the
//!    records, dequeuing them, publishing durability) happens without an
//!    await, so a writer is dropped either before all of it or after. The
//!    cursor and the durable view (the committed map with prepared versions,
//!    `ChunkTable::durable_view`) therefore always describe the log up to the
//!    last batch whose flush returned.
//! 3. Before starting a batch or checkpoint, the writer notes it in
//!    [`Writer::abandoned`], and clears the note once it is done. The next
//!    writer first repeats what the note names, byte for byte: the same
//!    number of records from the front of the queue at the same log position
//!    (both derived from the unchanged cursor), or the same checkpoint (the
//!    durable view and the cursor are unchanged since it began). This
//!    matters because a dropped I/O still runs to completion (the
//!    `BlockDevice` contract): the abandoned write may land at any time,
//!    even after the repeat, and since the repeat writes identical bytes to
//!    the same place, any order or mixture of the two leaves the same
//!    contents. To recovery the pair looks like one batch (or checkpoint)
//!    whose flush had not yet returned, which it handles already; the repeat
//!    flushes it before anything else is written, so batches stay serial.
//!
//! Dropping the role wakes the waiting committers (see `WriterRole`), so the
//! records of a dropped writer are never stranded while a committer waits.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use flyfs_bypass::{BlockDevice, block_on};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use parking_lot::{Condvar, Mutex};
use tokio::sync::{MutexGuard, Notify, watch};

use crate::EngineError;
use crate::config::JournalMode;
use crate::engine::OpenEngine;
use crate::format::{
    BATCH_HEADER_BYTES, CHECKPOINT_HEADER_BYTES, CheckpointHeader, META_BYTES, Record, batch_bytes,
    encode_batch, encode_checkpoint_payload,
};
use crate::request::EngineStats;
use crate::table::CheckpointPlan;

/// The journal's part of an open engine: the queue committers add records
/// to, the writer role, and what the writer has made durable.
pub(crate) struct Journal {
    pub queue: Mutex<JournalQueue>,
    /// Wakes the journal thread when it is idle (thread mode only).
    pub queue_cv: Condvar,
    /// Wakes the journal thread while it has batches in flight, so that
    /// records queued meanwhile go out at once (thread mode only).
    pub more: Notify,
    pub durable: watch::Sender<Durability>,
    /// The journal writer role: its holder alone writes batches and
    /// checkpoints. An async mutex, so that inline committers can wait for
    /// it on a single-threaded runtime.
    pub writer: tokio::sync::Mutex<Writer>,
    pub counters: Counters,
    /// Held while a checkpoint writes Patch layers into their slots, so that
    /// the test hook comparing a chunk's blocks with their block CRCs does
    /// not meet a block between its data write and its CRC's.
    #[cfg(feature = "testing")]
    pub applying: tokio::sync::Mutex<()>,
    /// Test hook: the journal thread panics before its next batch.
    #[cfg(feature = "testing")]
    pub panic_on_next_batch: std::sync::atomic::AtomicBool,
    /// Test hook: the next batch is followed by a checkpoint, however short
    /// the live log.
    #[cfg(feature = "testing")]
    pub checkpoint_after_next_batch: std::sync::atomic::AtomicBool,
}

impl Journal {
    /// An empty queue in front of a log that stands at `cursor`.
    pub fn new(cursor: Cursor) -> Journal {
        Journal {
            queue: Mutex::new(JournalQueue {
                records: VecDeque::new(),
                submitted: 0,
                taken: 0,
                shutdown: false,
            }),
            queue_cv: Condvar::new(),
            more: Notify::new(),
            durable: watch::Sender::new(Durability::default()),
            writer: tokio::sync::Mutex::new(Writer::new(cursor)),
            counters: Counters::default(),
            #[cfg(feature = "testing")]
            applying: tokio::sync::Mutex::new(()),
            #[cfg(feature = "testing")]
            panic_on_next_batch: std::sync::atomic::AtomicBool::new(false),
            #[cfg(feature = "testing")]
            checkpoint_after_next_batch: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// Records waiting for the journal writer. A record stays here until its
/// batch is durable; only the journal writer removes records.
pub(crate) struct JournalQueue {
    pub records: VecDeque<Record>,
    pub submitted: u64,
    /// Records removed from the queue: durable, or failed with the journal.
    pub taken: u64,
    pub shutdown: bool,
}

/// What the journal has made durable, published to waiting committers.
#[derive(Clone, Debug, Default)]
pub(crate) struct Durability {
    /// Records (counted in submission order) that are durable.
    pub records: u64,
    /// Set when the journal failed; later records will never be durable.
    pub error: Option<Arc<str>>,
}

/// The journal's work since the engine opened; [`EngineStats`] is a copy.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub records: AtomicU64,
    pub batches: AtomicU64,
    pub checkpoints: AtomicU64,
    pub patches: AtomicU64,
    pub patch_layers_applied: AtomicU64,
    pub overlapped_batches: AtomicU64,
    pub batches_beside_checkpoints: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> EngineStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        EngineStats {
            records: load(&self.records),
            batches: load(&self.batches),
            checkpoints: load(&self.checkpoints),
            patches: load(&self.patches),
            patch_layers_applied: load(&self.patch_layers_applied),
            overlapped_batches: load(&self.overlapped_batches),
            batches_beside_checkpoints: load(&self.batches_beside_checkpoints),
        }
    }
}

/// Where the log stands. Owned by the journal writer.
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

/// The journal writer's state; whoever holds it (behind `Journal::writer`) is
/// the one writer of batches and checkpoints.
#[derive(Debug)]
pub(crate) struct Writer {
    pub cursor: Cursor,
    /// Work a cancelled inline writer left unfinished, which the next writer
    /// repeats exactly before anything else (rule 3 in the module docs).
    /// Always `None` in thread mode.
    abandoned: Option<Abandoned>,
    /// The plan of the checkpoint in progress, kept until it is done, so
    /// that a repeat of a cancelled one writes the same bytes.
    pub checkpoint_plan: Option<Arc<CheckpointPlan>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Abandoned {
    /// A batch of this many records from the front of the queue.
    Batch { records: usize },
    /// The checkpoint that follows a batch when the live log is long.
    Checkpoint,
}

impl Writer {
    pub fn new(cursor: Cursor) -> Writer {
        Writer {
            cursor,
            abandoned: None,
            checkpoint_plan: None,
        }
    }
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

/// Queues a record for the journal and waits until it is durable; in
/// inline mode, writing batches itself while no one else does.
pub(crate) async fn submit<D: BlockDevice>(
    engine: &OpenEngine<D>,
    record: Record,
) -> Result<(), EngineError> {
    let mut durable = engine.journal.durable.subscribe();
    let seq = {
        let mut queue = engine.journal.queue.lock();
        queue.records.push_back(record);
        queue.submitted += 1;
        queue.submitted
    };
    match engine.config.journal {
        JournalMode::Thread => {
            engine.journal.queue_cv.notify_one();
            engine.journal.more.notify_one();
        }
        JournalMode::Inline => write_inline(engine, &mut durable, seq).await,
    }
    let outcome = durable
        .wait_for(|d| d.records >= seq || d.error.is_some())
        .await;
    match outcome {
        Ok(d) if d.records >= seq => Ok(()),
        Ok(d) => Err(EngineError::Poisoned {
            device: engine.device.name.clone(),
            reason: d
                .error
                .clone()
                .unwrap_or_else(|| Arc::from("journal failed")),
        }),
        Err(_) => Err(EngineError::Poisoned {
            device: engine.device.name.clone(),
            reason: Arc::from("engine closed"),
        }),
    }
}

/// The journal thread (thread mode): holds the writer role for the engine's
/// life and writes whatever is queued until the engine shuts down.
///
/// A panic on this thread (a bug: a broken invariant) must not leave
/// committers waiting forever for a durability that will never come, so it
/// is caught here and faults the engine: every queued record fails with the
/// panic's message, and the engine refuses every later operation (reads too,
/// since the panic may have left the chunk table half-updated) until it is
/// reopened from the device. The storage service sees the engine poisoned
/// and reports its target offline.
pub(crate) fn run<D: BlockDevice>(engine: Arc<OpenEngine<D>>) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write_until_shutdown(&engine)
    }));
    if let Err(payload) = outcome {
        let reason: Arc<str> = format!(
            "the journal thread panicked: {}",
            flyfs_bypass::panic_message(&*payload)
        )
        .into();
        engine.device.fault(&reason);
        fail_queued(&engine, reason);
    }
}

fn write_until_shutdown<D: BlockDevice>(engine: &OpenEngine<D>) {
    // Uncontended: inline writers exist only in inline mode.
    let mut writer = block_on(engine.journal.writer.lock());
    let depth = engine
        .config
        .journal_depth
        .clamp(1, engine.device.sb.journal_depth_max());
    loop {
        {
            let mut queue = engine.journal.queue.lock();
            while queue.records.is_empty() {
                if queue.shutdown {
                    return;
                }
                engine.journal.queue_cv.wait(&mut queue);
            }
        }
        panic_if_asked(engine);
        if depth > 1 {
            if let Err(error) = block_on(pipeline(engine, &mut writer, depth)) {
                fail(engine, &mut writer, Arc::from(error.to_string()));
            }
        } else {
            block_on(write_next(engine, &mut writer));
        }
    }
}

/// Test hook (`Engine::inject_journal_panic`): the journal thread panics
/// before its next batch.
fn panic_if_asked<D: BlockDevice>(engine: &OpenEngine<D>) {
    #[cfg(feature = "testing")]
    if engine
        .journal
        .panic_on_next_batch
        .swap(false, Ordering::SeqCst)
    {
        panic!("injected journal panic (test hook)");
    }
    #[cfg(not(feature = "testing"))]
    let _ = engine;
}

/// A batch on its way to the device.
struct InFlight<'a> {
    records: Vec<Record>,
    /// Log position after the batch.
    end: u64,
    /// Its write and flush; `done` once they finished.
    io: Pin<Box<dyn Future<Output = Result<(), EngineError>> + 'a>>,
    done: Option<Result<(), EngineError>>,
}

/// Thread mode on a version 5 device: writes what is queued with up to
/// `depth` batches in flight, each written and flushed on its own, and
/// publishes them in log order as their flushes return (a batch is durable
/// once its own flush returned, and published once every batch before it
/// is). A checkpoint runs beside the batches: it is planned at the published
/// head, so the batches in flight and every later one lie beyond its lsn,
/// and only a batch that would overrun the old tail waits for it. Returns
/// once nothing is queued or in flight and no checkpoint runs; on an error
/// the caller fails the journal, and the batches and checkpoint still in
/// flight are abandoned (their I/O completes on its own: the `BlockDevice`
/// contract).
async fn pipeline<D: BlockDevice>(
    engine: &OpenEngine<D>,
    writer: &mut Writer,
    depth: usize,
) -> Result<(), EngineError> {
    let journal_bytes = engine.device.sb.journal_bytes;
    let mut flight: VecDeque<InFlight<'_>> = VecDeque::new();
    // Records at the front of the queue that are in flight, and where the
    // next batch goes.
    let mut issued = 0;
    let mut head = writer.cursor.head;
    // A checkpoint is wanted and starts as soon as none runs.
    let mut checkpoint_due = false;
    let mut checkpointing: Option<Checkpointing<'_>> = None;
    loop {
        if checkpoint_due && checkpointing.is_none() {
            checkpointing = Some(Checkpointing::start(engine, writer));
            checkpoint_due = false;
        }
        // The next batch would overrun the tail: wait for the checkpoint.
        let mut blocked = false;
        while flight.len() < depth {
            let records = next_batch(engine, issued, None);
            if records.is_empty() {
                break;
            }
            panic_if_asked(engine);
            if let Some(reason) = engine.device.poisoned() {
                return Err(EngineError::Poisoned {
                    device: engine.device.name.clone(),
                    reason,
                });
            }
            let bytes = batch_bytes(records.iter().map(Record::encoded_len).sum()) as u64;
            let lsn = place(head, bytes, journal_bytes);
            if lsn + bytes - writer.cursor.tail > journal_bytes {
                blocked = true;
                break;
            }
            let counters = &engine.journal.counters;
            if !flight.is_empty() {
                counters.overlapped_batches.fetch_add(1, Ordering::Relaxed);
            }
            if checkpointing.is_some() {
                counters
                    .batches_beside_checkpoints
                    .fetch_add(1, Ordering::Relaxed);
            }
            issued += records.len();
            head = lsn + bytes;
            let io = Box::pin(write_and_flush_batch(
                engine,
                lsn,
                bytes,
                flight.len() as u16,
                &records,
            ));
            flight.push_back(InFlight {
                records,
                end: head,
                io,
                done: None,
            });
        }
        if blocked && checkpointing.is_none() {
            if flight.is_empty() {
                // Only a checkpoint at the head makes room; one planned
                // while batches are in flight might not (their records are
                // not in it), so wait for them first.
                checkpoint_due = true;
                continue;
            }
        } else if flight.is_empty() && checkpointing.is_none() {
            return Ok(());
        }
        // Wait for the oldest batch or the checkpoint, or for more records
        // while there is room for another batch. `notified` is created
        // before the queue is read again, so a record queued after this
        // point wakes us.
        let room = !blocked && flight.len() < depth;
        let mut notified = std::pin::pin!(engine.journal.more.notified());
        std::future::poll_fn(|cx| {
            for batch in flight.iter_mut().filter(|batch| batch.done.is_none()) {
                if let Poll::Ready(result) = batch.io.as_mut().poll(cx) {
                    batch.done = Some(result);
                }
            }
            let mut checkpoint_done = false;
            if let Some(running) = checkpointing.as_mut() {
                if running.done.is_none()
                    && let Poll::Ready(result) = running.io.as_mut().poll(cx)
                {
                    running.done = Some(result);
                }
                checkpoint_done = running.done.is_some();
            }
            let oldest_done = flight.front().is_some_and(|batch| batch.done.is_some());
            if oldest_done || checkpoint_done || (room && notified.as_mut().poll(cx).is_ready()) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        if checkpointing
            .as_ref()
            .is_some_and(|running| running.done.is_some())
        {
            let running = checkpointing.take().expect("checked above");
            running.done.expect("checked above")?;
            running.at.finish(engine, &mut writer.cursor, &running.plan);
            checkpoint_due = checkpoint_wanted(engine, writer);
        }
        while flight.front().is_some_and(|batch| batch.done.is_some()) {
            let batch = flight.pop_front().expect("checked above");
            batch.done.expect("checked above")?;
            issued -= batch.records.len();
            publish_batch(engine, writer, &batch.records, batch.end);
            // While one runs, the live log still counts from the old tail;
            // whether another is wanted is asked once it is done.
            if checkpointing.is_none() && checkpoint_wanted(engine, writer) {
                checkpoint_due = true;
            }
        }
    }
}

/// A checkpoint the pipeline runs beside its batches.
struct Checkpointing<'a> {
    plan: Arc<CheckpointPlan>,
    at: NextCheckpoint,
    io: Pin<Box<dyn Future<Output = Result<(), EngineError>> + 'a>>,
    done: Option<Result<(), EngineError>>,
}

impl<'a> Checkpointing<'a> {
    /// Plans a checkpoint of the durable view at the published head and
    /// starts writing it.
    /// (Thread mode is never cancelled, so unlike [`checkpoint`] it keeps no
    /// note of the plan for a repeat.)
    fn start<D: BlockDevice>(engine: &'a OpenEngine<D>, writer: &Writer) -> Checkpointing<'a> {
        let plan = Arc::new(engine.table.lock().checkpoint_plan());
        let at = NextCheckpoint::after(&writer.cursor);
        Checkpointing {
            io: Box::pin(write_checkpoint(engine, plan.clone(), at)),
            plan,
            at,
            done: None,
        }
    }
}

/// Inline mode: makes record number `seq` durable (or the journal failed)
/// before returning, writing batches itself whenever the writer role is free.
///
/// Waiting is on the durability channel only: each published batch and each
/// release of the role notifies it. A committer marks the channel seen
/// *before* it tries the role, so a release between its failed attempt and
/// its wait still wakes it, and it then takes the role.
pub(crate) async fn write_inline<D: BlockDevice>(
    engine: &OpenEngine<D>,
    durable: &mut watch::Receiver<Durability>,
    seq: u64,
) {
    loop {
        {
            let state = durable.borrow_and_update();
            if state.records >= seq || state.error.is_some() {
                return;
            }
        }
        match engine.journal.writer.try_lock() {
            Ok(guard) => {
                let mut role = WriterRole {
                    engine,
                    guard: Some(guard),
                };
                // Drain the queue, not just up to our own record, so that
                // records whose committers were dropped are not stranded
                // until the next commit, and so that everything queued
                // while a batch was in flight goes out as the next batch.
                while write_next(engine, role.writer()).await {}
            }
            Err(_) => {
                if durable.changed().await.is_err() {
                    // The sender lives in `engine`, which outlives us.
                    return;
                }
            }
        }
    }
}

/// The writer role held by an inline committer. Releasing it, however the
/// committer ends (done, failed or dropped mid-batch), wakes the waiting
/// committers: one of them must take over what is still queued.
struct WriterRole<'a, D> {
    engine: &'a OpenEngine<D>,
    guard: Option<MutexGuard<'a, Writer>>,
}

impl<D> WriterRole<'_, D> {
    fn writer(&mut self) -> &mut Writer {
        self.guard
            .as_mut()
            .expect("the guard is held until the role is dropped")
    }
}

impl<D> Drop for WriterRole<'_, D> {
    fn drop(&mut self) {
        // Unlock before notifying: a woken committer must find the role free.
        drop(self.guard.take());
        self.engine.journal.durable.send_modify(|_| {});
    }
}

/// One round of journal work, the same for both drivers: finish what a
/// cancelled writer abandoned, write the next batch if any record is queued,
/// and checkpoint if the live log has grown too long. Returns whether a
/// record was queued; on failure the engine is poisoned and every waiter
/// learns why.
pub(crate) async fn write_next<D: BlockDevice>(
    engine: &OpenEngine<D>,
    writer: &mut Writer,
) -> bool {
    let result: Result<bool, EngineError> = async {
        if writer.abandoned == Some(Abandoned::Checkpoint) {
            checkpoint_noted(engine, writer).await?;
        }
        if !write_batch(engine, writer).await? {
            return Ok(false);
        }
        // The batch is durable and acknowledged already, so a failing
        // checkpoint never fails a commit that is already safe.
        if checkpoint_wanted(engine, writer) {
            checkpoint_noted(engine, writer).await?;
        }
        Ok(true)
    }
    .await;
    match result {
        Ok(wrote) => wrote,
        Err(error) => {
            fail(engine, writer, Arc::from(error.to_string()));
            true
        }
    }
}

/// Whether a checkpoint should follow the batch just published: the live
/// log has grown past `checkpoint_percent` of the journal (or a test asked).
fn checkpoint_wanted<D: BlockDevice>(engine: &OpenEngine<D>, writer: &Writer) -> bool {
    let live = writer.cursor.head - writer.cursor.tail;
    #[cfg(feature = "testing")]
    let forced = engine
        .journal
        .checkpoint_after_next_batch
        .swap(false, Ordering::SeqCst);
    #[cfg(not(feature = "testing"))]
    let forced = false;
    forced
        || live * 100 > engine.device.sb.journal_bytes * u64::from(engine.config.checkpoint_percent)
}

/// Poisons the engine and fails every queued record: after a failed write
/// or flush nothing more will be made durable until the engine is reopened.
fn fail<D: BlockDevice>(engine: &OpenEngine<D>, writer: &mut Writer, reason: Arc<str>) {
    engine.device.poison(&reason);
    writer.abandoned = None;
    writer.checkpoint_plan = None;
    fail_queued(engine, reason);
}

/// Fails every queued record, and every record queued later, with `reason`.
fn fail_queued<D: BlockDevice>(engine: &OpenEngine<D>, reason: Arc<str>) {
    {
        let mut queue = engine.journal.queue.lock();
        queue.taken += queue.records.len() as u64;
        queue.records.clear();
    }
    engine
        .journal
        .durable
        .send_modify(|d| d.error = Some(reason));
}

/// Writes the next batch from the front of the queue, flushes it, applies it
/// and publishes it durable. Returns false if nothing was queued.
async fn write_batch<D: BlockDevice>(
    engine: &OpenEngine<D>,
    writer: &mut Writer,
) -> Result<bool, EngineError> {
    let abandoned = match writer.abandoned {
        Some(Abandoned::Batch { records }) => Some(records),
        _ => None,
    };
    let records = next_batch(engine, 0, abandoned);
    if records.is_empty() {
        return Ok(false);
    }
    if let Some(reason) = engine.device.poisoned() {
        return Err(EngineError::Poisoned {
            device: engine.device.name.clone(),
            reason,
        });
    }
    writer.abandoned = Some(Abandoned::Batch {
        records: records.len(),
    });
    let end = commit_batch(engine, writer, &records).await?;
    // The flush returned. No await from here to the end, so a cancelled
    // writer never leaves the batch durable but unapplied or still queued.
    writer.abandoned = None;
    publish_batch(engine, writer, &records, end);
    Ok(true)
}

/// The records of the next batch, read (not taken: they stay queued until
/// they are durable) from the queue after its first `skip` records: as many
/// as fit in a batch, or exactly `count` (the repeat of an abandoned batch).
fn next_batch<D: BlockDevice>(
    engine: &OpenEngine<D>,
    skip: usize,
    count: Option<usize>,
) -> Vec<Record> {
    let max_payload = engine
        .config
        .batch_bytes_max
        .min(engine.device.sb.journal_bytes as usize / 4)
        - BATCH_HEADER_BYTES;
    let queue = engine.journal.queue.lock();
    let count = match count {
        Some(count) => {
            assert!(
                skip + count <= queue.records.len(),
                "records of an abandoned batch left the queue"
            );
            count
        }
        None => {
            let mut payload = 0;
            let mut count = 0;
            for record in queue.records.iter().skip(skip) {
                if count > 0 && payload + record.encoded_len() > max_payload {
                    break;
                }
                payload += record.encoded_len();
                count += 1;
            }
            count
        }
    };
    queue
        .records
        .iter()
        .skip(skip)
        .take(count)
        .cloned()
        .collect()
}

/// Publishes a batch whose flush returned, every batch before it published
/// already: the log head moves past it, its records are applied to the
/// engine's state and leave the front of the queue, and their committers
/// learn they are durable. No await, so a cancelled writer never leaves a
/// durable batch unapplied or still queued.
fn publish_batch<D: BlockDevice>(
    engine: &OpenEngine<D>,
    writer: &mut Writer,
    records: &[Record],
    end: u64,
) {
    writer.cursor.head = end;
    engine
        .journal
        .counters
        .batches
        .fetch_add(1, Ordering::Relaxed);
    engine
        .journal
        .counters
        .records
        .fetch_add(records.len() as u64, Ordering::Relaxed);
    {
        let mut table = engine.table.lock();
        for record in records {
            table.apply(record, true);
        }
    }
    let durable_through = {
        let mut queue = engine.journal.queue.lock();
        for record in records {
            let queued = queue.records.pop_front();
            debug_assert_eq!(queued.as_ref(), Some(record), "only the writer dequeues");
        }
        queue.taken += records.len() as u64;
        queue.taken
    };
    engine
        .journal
        .durable
        .send_modify(|d| d.records = durable_through);
}

/// Writes `records` as one batch at the log head (checkpointing first if the
/// log would overrun its tail) and flushes it. Returns the log position after
/// the batch; the caller advances the cursor to it.
async fn commit_batch<D: BlockDevice>(
    engine: &OpenEngine<D>,
    writer: &mut Writer,
    records: &[Record],
) -> Result<u64, EngineError> {
    let journal_bytes = engine.device.sb.journal_bytes;
    let bytes = batch_bytes(records.iter().map(Record::encoded_len).sum()) as u64;
    let mut lsn = place(writer.cursor.head, bytes, journal_bytes);
    if lsn + bytes - writer.cursor.tail > journal_bytes {
        checkpoint(engine, &mut writer.cursor, &mut writer.checkpoint_plan).await?;
        lsn = place(writer.cursor.head, bytes, journal_bytes);
    }
    let cursor = &writer.cursor;
    assert!(
        lsn + bytes - cursor.tail <= journal_bytes,
        "journal batch overruns the checkpointed tail"
    );
    write_and_flush_batch(engine, lsn, bytes, 0, records).await?;
    Ok(lsn + bytes)
}

/// Encodes `records` as the batch of `bytes` at log position `lsn`, written
/// while `in_flight` older batches wait for their flush, writes it and
/// flushes: the batch is durable when this returns. The bytes are encoded
/// before the first await, so the future holds no borrow of `records`.
fn write_and_flush_batch<'a, D: BlockDevice>(
    engine: &'a OpenEngine<D>,
    lsn: u64,
    bytes: u64,
    in_flight: u16,
    records: &[Record],
) -> impl Future<Output = Result<(), EngineError>> + 'a {
    let mut buf = engine.device.pool.alloc(bytes as usize);
    let written = encode_batch(
        engine.device.sb.format_id,
        lsn,
        in_flight,
        records,
        &mut buf,
    );
    debug_assert_eq!(written as u64, bytes);
    async move {
        let journal_bytes = engine.device.sb.journal_bytes;
        engine
            .device
            .write_at(
                engine.device.sb.journal_offset + lsn % journal_bytes,
                buf,
                || "journal batch".into(),
            )
            .await?;
        engine.device.flush("journal batch").await
    }
}

/// Chunks (and block-CRC region blocks) a checkpoint writes at once: deep
/// enough to keep an NVMe queue or io_uring busy with scattered 4 KiB writes,
/// small enough that the buffers in flight stay a few MiB.
const CHECKPOINT_IO_DEPTH: usize = 64;

/// A checkpoint noted in `abandoned` while it runs, so that a cancelled one
/// is repeated by the next writer before any batch changes the map.
async fn checkpoint_noted<D: BlockDevice>(
    engine: &OpenEngine<D>,
    writer: &mut Writer,
) -> Result<(), EngineError> {
    writer.abandoned = Some(Abandoned::Checkpoint);
    checkpoint(engine, &mut writer.cursor, &mut writer.checkpoint_plan).await?;
    writer.abandoned = None;
    Ok(())
}

/// Writes the durable view (the committed map with prepared versions, what
/// recovery would find) as a checkpoint at the journal head into the slot
/// not holding the current checkpoint, then lets the journal reuse its space.
/// Nothing else is written meanwhile (inline mode, serial batches, recovery);
/// the pipeline runs [`write_checkpoint`] beside its batches instead.
///
/// The cursor changes only after the flush returned, and the bytes depend
/// only on the cursor and the plan (`noted`, kept until the checkpoint is
/// done), which a cancelled writer leaves for the next one: a repeat is
/// identical.
pub(crate) async fn checkpoint<D: BlockDevice>(
    engine: &OpenEngine<D>,
    cursor: &mut Cursor,
    noted: &mut Option<Arc<CheckpointPlan>>,
) -> Result<(), EngineError> {
    let plan = match noted {
        Some(plan) => plan.clone(),
        None => noted
            .insert(Arc::new(engine.table.lock().checkpoint_plan()))
            .clone(),
    };
    let next = NextCheckpoint::after(cursor);
    write_checkpoint(engine, plan.clone(), next).await?;
    next.finish(engine, cursor, &plan);
    *noted = None;
    Ok(())
}

/// Where the next checkpoint goes and what it says: the log position its
/// plan was taken at (the published head then), its sequence number, and
/// the checkpoint slot not holding the current one.
#[derive(Clone, Copy, Debug)]
struct NextCheckpoint {
    lsn: u64,
    sequence: u64,
    slot: u64,
}

impl NextCheckpoint {
    /// The checkpoint of the durable view as the cursor's published head
    /// leaves it.
    fn after(cursor: &Cursor) -> NextCheckpoint {
        NextCheckpoint {
            lsn: cursor.head,
            sequence: cursor.checkpoint_sequence + 1,
            slot: 1 - cursor.checkpoint_slot,
        }
    }

    /// Once its flush returned: the journal before its lsn may be reused,
    /// and the slots and layers of its plan are let go. No await.
    fn finish<D: BlockDevice>(
        self,
        engine: &OpenEngine<D>,
        cursor: &mut Cursor,
        plan: &CheckpointPlan,
    ) {
        cursor.tail = self.lsn;
        cursor.checkpoint_sequence = self.sequence;
        cursor.checkpoint_slot = self.slot;
        engine.table.lock().checkpoint_applied(plan);
    }
}

/// Writes the checkpoint of `plan` (the durable view at log position
/// `at.lsn`) and flushes it; the caller then finishes it
/// ([`NextCheckpoint::finish`]).
///
/// Patch records before the checkpoint's lsn are about to be reused, so
/// first the committed versions' Patch layers are written into their slots
/// (once every reader that might read those slots without the layers is
/// gone) and flushed, and the prepared patches, which cannot be written in
/// place while their chunk's committed version is read from the same slot,
/// are carried in the checkpoint itself (format version 4).
///
/// Batches after `at.lsn` may be written, published and applied while this
/// runs (the pipeline): the plan holds its slots and snapshot, and those
/// batches lie in the log beyond the checkpoint, where recovery replays them
/// from either checkpoint (see "Checkpoints beside batches" in
/// docs/chunk-engine-format.md).
async fn write_checkpoint<D: BlockDevice>(
    engine: &OpenEngine<D>,
    plan: Arc<CheckpointPlan>,
    at: NextCheckpoint,
) -> Result<(), EngineError> {
    if !plan.apply.is_empty() {
        wait_for_readers(engine, plan.epoch).await;
        #[cfg(feature = "testing")]
        let _applying = engine.journal.applying.lock().await;
        // Chunks have slots of their own, so their layers go to the device
        // side by side: a checkpoint after many random writes is thousands
        // of scattered block writes, which one at a time would hold up every
        // commit behind it for as many device round trips.
        // (A loop rather than a stream combinator: a closure returning a
        // borrowing future defeats the `Send` proof of the callers' futures.)
        let mut crcs = Vec::new();
        let mut applying = FuturesUnordered::new();
        for (key, meta, overlay) in &plan.apply {
            if applying.len() >= CHECKPOINT_IO_DEPTH
                && let Some(done) = applying.next().await
            {
                crcs.extend(done?);
            }
            applying.push(engine.device.apply_overlay(*key, meta, overlay));
        }
        while let Some(done) = applying.next().await {
            crcs.extend(done?);
        }
        engine
            .device
            .store_block_crc_runs(&crcs, CHECKPOINT_IO_DEPTH)
            .await?;
        // Durable before the checkpoint that drops their records is even
        // written: a flush covers only the writes that completed before it,
        // and the checkpoint's own flush may not return.
        engine.device.flush("patches before a checkpoint").await?;
        let layers: usize = plan.apply.iter().map(|(_, _, overlay)| overlay.len()).sum();
        engine
            .journal
            .counters
            .patch_layers_applied
            .fetch_add(layers as u64, Ordering::Relaxed);
    }
    let buf = {
        let header_len = CHECKPOINT_HEADER_BYTES as usize;
        let count = plan.view.len();
        let carried: usize = plan.carried.iter().map(Record::encoded_len).sum();
        let total =
            (header_len + checkpoint_payload_head_bytes_for(count, &engine.device.sb) + carried)
                .next_multiple_of(crate::format::BLOCK as usize);
        assert!(
            total as u64 <= engine.device.sb.checkpoint_slot_bytes,
            "checkpoint exceeds its slot"
        );
        let mut buf = engine.device.pool.alloc(total);
        let payload_end = header_len
            + encode_checkpoint_payload(
                &plan.view,
                &plan.carried,
                &engine.device.sb,
                &mut buf[header_len..],
            );
        buf[payload_end..].fill(0);
        let header = CheckpointHeader {
            sequence: at.sequence,
            journal_lsn: at.lsn,
            entry_count: count as u64,
            payload_crc: crc32c::crc32c(&buf[header_len..payload_end]),
        };
        header.encode(engine.device.sb.format_id, &mut buf);
        buf
    };
    let offset =
        engine.device.sb.checkpoint_offset + at.slot * engine.device.sb.checkpoint_slot_bytes;
    engine
        .device
        .write_at(offset, buf, || "checkpoint".into())
        .await?;
    engine.device.flush("checkpoint").await?;
    tracing::debug!(device = %engine.device.name, sequence = at.sequence, lsn = at.lsn, "checkpoint written");
    engine
        .journal
        .counters
        .checkpoints
        .fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The payload bytes before the carried records of a checkpoint of `count`
/// entries.
fn checkpoint_payload_head_bytes_for(count: usize, sb: &crate::format::Superblock) -> usize {
    count * META_BYTES
        + if sb.has_patches() {
            crate::format::CHECKPOINT_CARRIED_PREFIX_BYTES
        } else {
            0
        }
}

/// Waits until no reader that pinned a slot before read epoch `epoch` is
/// left (see `ChunkTable::read_epoch`).
async fn wait_for_readers<D: BlockDevice>(engine: &OpenEngine<D>, epoch: u64) {
    let mut drained = engine.table.lock().epoch_drained.subscribe();
    while engine.table.lock().readers_before(epoch) {
        if drained.changed().await.is_err() {
            // The sender lives in the table, which outlives us.
            return;
        }
    }
}
