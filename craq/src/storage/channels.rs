//! Exactly-once bookkeeping of client channels.
//!
//! A client sends at most one write per channel at a time, numbering them
//! with a growing sequence. Every replica remembers, per channel, the last
//! sequence number it finished and the result, so a retried write (after a
//! timeout, or to a new head after the old one died) is answered from memory
//! instead of being applied twice. Failures are not remembered: a write that
//! failed changed nothing, so its retry runs again.
//!
//! The memory is bounded, because every client (a new id per mount) and
//! every channel it opens would otherwise stay forever. A client's channels
//! are forgotten together once the client has been idle for
//! [`ChannelLimits::idle_expiry`] (far longer than any client retries a
//! write), a client may hold at most [`ChannelLimits::channels_per_client_max`]
//! channels (a write opening one more is refused), and past
//! [`ChannelLimits::slots_max`] channels in all the clients idle the longest
//! are forgotten first. Forgetting a client that later retries an old write
//! would apply that write again; the limits are set so that only a client
//! gone for an hour, or a table under attack, loses its memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flyfs_proto::ids::ClientId;
use flyfs_proto::wire::storage::{Channel, StorageError, WriteRsp};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Bounds of one target's channel table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelLimits {
    /// A client silent this long is forgotten with all its channels.
    pub idle_expiry: Duration,
    /// Channels one client may hold; a write opening one more is refused.
    pub channels_per_client_max: usize,
    /// Channels of all clients together; past it, the clients idle the
    /// longest are forgotten.
    pub slots_max: usize,
}

impl Default for ChannelLimits {
    fn default() -> Self {
        ChannelLimits {
            idle_expiry: Duration::from_secs(3600),
            channels_per_client_max: 4096,
            // About 100 bytes each: some 25 MiB per target at most.
            slots_max: 1 << 18,
        }
    }
}

#[derive(Debug)]
enum Slot {
    Running { seq: u64, done: Arc<Notify> },
    Finished { seq: u64, result: WriteRsp },
}

/// What to do with an incoming write.
#[derive(Debug)]
pub(crate) enum Begin {
    /// Run it; call `finish` or `fail` afterwards.
    Run,
    /// Already applied: answer with this.
    Done(WriteRsp),
    /// Refuse it.
    Refuse(StorageError),
    /// The first attempt still runs: wait and ask again.
    Wait(Arc<Notify>),
}

#[derive(Debug)]
struct Client {
    last_used: Instant,
    slots: BTreeMap<u32, Slot>,
}

#[derive(Debug, Default)]
struct Table {
    clients: BTreeMap<ClientId, Client>,
    /// Channels of all clients.
    slots: usize,
    /// When idle clients were last looked for.
    swept: Option<Instant>,
}

/// `id`'s entry (made if it has none), marked used at `now`: every request
/// and every result learned keeps a client from expiring.
fn used_client(
    clients: &mut BTreeMap<ClientId, Client>,
    id: ClientId,
    now: Instant,
) -> &mut Client {
    let client = clients.entry(id).or_insert_with(|| Client {
        last_used: now,
        slots: BTreeMap::new(),
    });
    client.last_used = now;
    client
}

#[derive(Debug, Default)]
pub(crate) struct Channels {
    table: Mutex<Table>,
    limits: ChannelLimits,
}

impl Channels {
    pub fn new(limits: ChannelLimits) -> Channels {
        Channels {
            table: Mutex::default(),
            limits,
        }
    }

    pub fn begin(&self, channel: Channel) -> Begin {
        self.begin_at(channel, Instant::now())
    }

    fn begin_at(&self, channel: Channel, now: Instant) -> Begin {
        let mut table = self.table.lock();
        table.expire(now, &self.limits);
        let Table { clients, slots, .. } = &mut *table;
        let client = used_client(clients, channel.client, now);
        match client.slots.get(&channel.id) {
            Some(Slot::Finished { seq, result }) if *seq == channel.seq => {
                return Begin::Done(*result);
            }
            Some(Slot::Finished { seq, .. }) | Some(Slot::Running { seq, .. })
                if *seq > channel.seq =>
            {
                return Begin::Refuse(StorageError::StaleSequence {
                    channel: channel.id,
                    seq: channel.seq,
                    last: *seq,
                });
            }
            Some(Slot::Running { seq, done }) if *seq == channel.seq => {
                return Begin::Wait(done.clone());
            }
            Some(_) => {}
            None if client.slots.len() >= self.limits.channels_per_client_max => {
                let refused = Begin::Refuse(StorageError::Invalid {
                    reason: format!(
                        "client {:?} holds {} channels, over the limit channels_per_client_max = {}",
                        channel.client,
                        client.slots.len(),
                        self.limits.channels_per_client_max
                    ),
                });
                if client.slots.is_empty() {
                    clients.remove(&channel.client);
                }
                return refused;
            }
            None => *slots += 1,
        }
        client.slots.insert(
            channel.id,
            Slot::Running {
                seq: channel.seq,
                done: Arc::new(Notify::new()),
            },
        );
        table.shrink(&self.limits);
        Begin::Run
    }

    /// Records a finished write (also called by replicas that applied a
    /// forwarded one, so that any of them can answer a retry as head, and by
    /// a resync handing its memory on).
    pub fn finish(&self, channel: Channel, result: WriteRsp) {
        self.finish_at(channel, result, Instant::now());
    }

    fn finish_at(&self, channel: Channel, result: WriteRsp, now: Instant) {
        let mut table = self.table.lock();
        table.expire(now, &self.limits);
        let Table { clients, slots, .. } = &mut *table;
        let client = used_client(clients, channel.client, now);
        let newer = match client.slots.get(&channel.id) {
            Some(Slot::Finished { seq, .. }) => *seq <= channel.seq,
            Some(Slot::Running { seq, done }) => {
                done.notify_waiters();
                *seq <= channel.seq
            }
            // A replica learns what its predecessor applied whatever the
            // count: refusing here would lose exactly-once memory. The table
            // as a whole stays bounded by `slots_max`.
            None => {
                *slots += 1;
                true
            }
        };
        if newer {
            client.slots.insert(
                channel.id,
                Slot::Finished {
                    seq: channel.seq,
                    result,
                },
            );
        }
        table.shrink(&self.limits);
    }

    /// The result of `channel`'s request if this table holds it as
    /// finished: a write that began here may have been finished meanwhile by
    /// another copy of it (the same write forwarded to this replica by a
    /// head it replaced), which the head path looks for once it holds the
    /// chunk lock.
    pub fn answer(&self, channel: Channel) -> Option<WriteRsp> {
        let table = self.table.lock();
        match table.clients.get(&channel.client)?.slots.get(&channel.id)? {
            Slot::Finished { seq, result } if *seq == channel.seq => Some(*result),
            _ => None,
        }
    }

    /// Every finished request, for a resync to hand on.
    pub fn finished(&self) -> Vec<(Channel, WriteRsp)> {
        let table = self.table.lock();
        let mut finished = Vec::with_capacity(table.slots);
        for (client, channels) in &table.clients {
            for (id, slot) in &channels.slots {
                if let Slot::Finished { seq, result } = slot {
                    let channel = Channel {
                        client: *client,
                        id: *id,
                        seq: *seq,
                    };
                    finished.push((channel, *result));
                }
            }
        }
        finished
    }

    /// Forgets the finished write `channel` names, if this table holds it:
    /// what it made is gone (a resync undid it), so its retry must run again
    /// rather than be answered as done.
    pub fn forget_finished(&self, channel: Channel) {
        self.table.lock().remove_slot_if(
            channel,
            |slot| matches!(slot, Slot::Finished { seq, .. } if *seq == channel.seq),
        );
    }

    /// Forgets a running write that failed, so that its retry runs again.
    pub fn fail(&self, channel: Channel) {
        self.table
            .lock()
            .remove_slot_if(channel, |slot| match slot {
                Slot::Running { seq, done } if *seq == channel.seq => {
                    done.notify_waiters();
                    true
                }
                _ => false,
            });
    }

    /// Clients and channels held, for tests and metrics.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let table = self.table.lock();
        (table.clients.len(), table.slots)
    }
}

impl Table {
    /// Removes `channel`'s slot if `matches` accepts it, and its client once
    /// that holds no slot.
    fn remove_slot_if(&mut self, channel: Channel, matches: impl FnOnce(&Slot) -> bool) {
        let Some(client) = self.clients.get_mut(&channel.client) else {
            return;
        };
        if client.slots.get(&channel.id).is_some_and(matches) {
            client.slots.remove(&channel.id);
            self.slots -= 1;
            if client.slots.is_empty() {
                self.clients.remove(&channel.client);
            }
        }
    }

    /// Forgets clients idle past the expiry (looked for every eighth of it).
    /// A client with a write running is never forgotten.
    fn expire(&mut self, now: Instant, limits: &ChannelLimits) {
        let due = self
            .swept
            .is_none_or(|swept| now.saturating_duration_since(swept) >= limits.idle_expiry / 8);
        if due {
            self.swept = Some(now);
            let before = self.clients.len();
            let mut freed = 0;
            self.clients.retain(|_, client| {
                let keep = client.running()
                    || now.saturating_duration_since(client.last_used) < limits.idle_expiry;
                if !keep {
                    freed += client.slots.len();
                }
                keep
            });
            self.slots -= freed;
            if before > self.clients.len() {
                tracing::info!(
                    clients = before - self.clients.len(),
                    channels = freed,
                    "forgot the channels of idle clients"
                );
            }
        }
    }

    /// Past `slots_max`, forgets the clients idle the longest (never one
    /// with a write running).
    fn shrink(&mut self, limits: &ChannelLimits) {
        if self.slots > limits.slots_max {
            // Down to seven eighths of the limit, so a full table is not
            // sorted again on every write.
            let target = limits.slots_max - limits.slots_max / 8;
            let mut idle: Vec<(Instant, ClientId)> = self
                .clients
                .iter()
                .filter(|(_, client)| !client.running())
                .map(|(id, client)| (client.last_used, *id))
                .collect();
            idle.sort_unstable();
            let mut forgotten = 0;
            for (_, id) in idle {
                if self.slots <= target {
                    break;
                }
                if let Some(client) = self.clients.remove(&id) {
                    self.slots -= client.slots.len();
                    forgotten += 1;
                }
            }
            if forgotten > 0 {
                tracing::warn!(
                    clients = forgotten,
                    limit = limits.slots_max,
                    "channel table over slots_max: forgot the clients idle the longest"
                );
            }
        }
    }
}

impl Client {
    fn running(&self) -> bool {
        self.slots
            .values()
            .any(|slot| matches!(slot, Slot::Running { .. }))
    }
}

/// Runs `begin` until it says something other than "wait".
pub(crate) async fn begin(channels: &Channels, channel: Channel) -> Begin {
    loop {
        match channels.begin(channel) {
            Begin::Wait(done) => {
                let notified = done.notified();
                // The first attempt may have finished between `begin` and
                // `notified`; asking again after a short wait covers that.
                let _ = tokio::time::timeout(std::time::Duration::from_millis(50), notified).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flyfs_proto::ids::ChunkVersion;

    fn channel(seq: u64) -> Channel {
        Channel {
            client: ClientId(9),
            id: 1,
            seq,
        }
    }

    fn rsp(v: u32) -> WriteRsp {
        WriteRsp {
            version: ChunkVersion(v),
            chunk_len: 10,
            chunk_crc: 7,
        }
    }

    #[test]
    fn retries_are_answered_from_memory() {
        let c = Channels::default();
        assert!(matches!(c.begin(channel(1)), Begin::Run));
        assert!(matches!(c.begin(channel(1)), Begin::Wait(_)));
        c.finish(channel(1), rsp(3));
        assert!(matches!(c.begin(channel(1)), Begin::Done(r) if r == rsp(3)));
        assert!(matches!(
            c.begin(channel(0)),
            Begin::Refuse(StorageError::StaleSequence { last: 1, .. })
        ));
        assert!(matches!(c.begin(channel(2)), Begin::Run));
    }

    fn on(client: u64, id: u32, seq: u64) -> Channel {
        Channel {
            client: ClientId(client),
            id,
            seq,
        }
    }

    fn limits(
        idle_expiry_s: u64,
        channels_per_client_max: usize,
        slots_max: usize,
    ) -> ChannelLimits {
        ChannelLimits {
            idle_expiry: Duration::from_secs(idle_expiry_s),
            channels_per_client_max,
            slots_max,
        }
    }

    #[test]
    fn idle_clients_are_forgotten_but_never_while_writing() {
        let c = Channels::new(limits(80, 100, 1000));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Client 1 finishes a write; client 2 starts one and keeps it running.
        assert!(matches!(c.begin_at(on(1, 1, 1), at(0)), Begin::Run));
        c.finish_at(on(1, 1, 1), rsp(1), at(0));
        assert!(matches!(c.begin_at(on(2, 1, 1), at(0)), Begin::Run));
        // Client 3 stays busy throughout.
        for s in (0..=60).step_by(20) {
            c.finish_at(on(3, 1, s), rsp(1), at(s));
        }
        // Just before the expiry client 1's retry is still answered.
        assert!(matches!(c.begin_at(on(1, 1, 1), at(79)), Begin::Done(_)));
        assert_eq!(c.counts(), (3, 3));
        for s in (80..=140).step_by(20) {
            c.finish_at(on(3, 1, s), rsp(1), at(s));
        }
        // 80 s after its last use (the retry at 79 s counts) it is forgotten.
        c.finish_at(on(3, 1, 160), rsp(1), at(160));
        assert_eq!(
            c.counts(),
            (2, 2),
            "client 1 forgotten, 2 (running) and 3 kept"
        );
        assert!(matches!(c.begin_at(on(1, 1, 1), at(161)), Begin::Run));
    }

    #[test]
    fn a_client_may_hold_only_so_many_channels() {
        let c = Channels::new(limits(3600, 3, 1000));
        for id in 0..3 {
            assert!(matches!(c.begin(on(7, id, 1)), Begin::Run));
        }
        let refused = c.begin(on(7, 3, 1));
        assert!(
            matches!(&refused, Begin::Refuse(StorageError::Invalid { reason }) if reason.contains("channels_per_client_max = 3")),
            "{refused:?}"
        );
        // Its existing channels still work, and other clients are not limited by it.
        c.finish(on(7, 0, 1), rsp(2));
        assert!(matches!(c.begin(on(7, 0, 2)), Begin::Run));
        assert!(matches!(c.begin(on(8, 0, 1)), Begin::Run));
        // A failed write frees its channel.
        c.fail(on(7, 1, 1));
        assert!(matches!(c.begin(on(7, 3, 1)), Begin::Run));
        assert_eq!(c.counts(), (2, 4));
    }

    #[test]
    fn a_full_table_forgets_the_clients_idle_the_longest() {
        let c = Channels::new(limits(3600, 100, 16));
        let t0 = Instant::now();
        // Clients 0..8 finish two writes each, one second apart.
        for client in 0..8u64 {
            for id in 0..2 {
                c.finish_at(on(client, id, 1), rsp(1), t0 + Duration::from_secs(client));
            }
        }
        assert_eq!(c.counts(), (8, 16));
        // Client 0 comes back: now client 1 is the one idle the longest.
        assert!(matches!(
            c.begin_at(on(0, 0, 1), t0 + Duration::from_secs(10)),
            Begin::Done(_)
        ));
        // One more channel passes the limit: the table drops to 14 (7/8),
        // forgetting clients 1 and 2.
        c.finish_at(on(9, 0, 1), rsp(1), t0 + Duration::from_secs(11));
        assert_eq!(c.counts(), (7, 13));
        let clients: std::collections::BTreeSet<u64> = c
            .finished()
            .iter()
            .map(|(channel, _)| channel.client.0)
            .collect();
        assert_eq!(clients, [0, 3, 4, 5, 6, 7, 9].into_iter().collect());
    }

    #[test]
    fn failures_are_forgotten_and_replicas_learn_results() {
        let c = Channels::default();
        assert!(matches!(c.begin(channel(5)), Begin::Run));
        c.fail(channel(5));
        assert!(matches!(c.begin(channel(5)), Begin::Run));
        // A replica that applied seq 6 for this channel answers its retry.
        c.finish(channel(6), rsp(8));
        assert!(matches!(c.begin(channel(6)), Begin::Done(r) if r == rsp(8)));
        // An older result never replaces a newer one.
        c.finish(channel(4), rsp(1));
        assert!(matches!(c.begin(channel(6)), Begin::Done(r) if r == rsp(8)));
    }
}
