//! Exactly-once bookkeeping of client channels.
//!
//! A client sends at most one write per channel at a time, numbering them
//! with a growing sequence. Every replica remembers, per channel, the last
//! sequence number it finished and the result, so a retried write (after a
//! timeout, or to a new head after the old one died) is answered from memory
//! instead of being applied twice. Failures are not remembered: a write that
//! failed changed nothing, so its retry runs again.

use std::collections::BTreeMap;
use std::sync::Arc;

use flyfs_proto::ids::ClientId;
use flyfs_proto::wire::storage::{Channel, StorageError, WriteRsp};
use parking_lot::Mutex;
use tokio::sync::Notify;

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

#[derive(Debug, Default)]
pub(crate) struct Channels {
    slots: Mutex<BTreeMap<(ClientId, u32), Slot>>,
}

impl Channels {
    pub fn begin(&self, channel: Channel) -> Begin {
        let mut slots = self.slots.lock();
        let key = (channel.client, channel.id);
        match slots.get(&key) {
            Some(Slot::Finished { seq, result }) if *seq == channel.seq => Begin::Done(*result),
            Some(Slot::Finished { seq, .. }) | Some(Slot::Running { seq, .. })
                if *seq > channel.seq =>
            {
                Begin::Refuse(StorageError::StaleSequence {
                    channel: channel.id,
                    seq: channel.seq,
                    last: *seq,
                })
            }
            Some(Slot::Running { seq, done }) if *seq == channel.seq => Begin::Wait(done.clone()),
            _ => {
                slots.insert(
                    key,
                    Slot::Running {
                        seq: channel.seq,
                        done: Arc::new(Notify::new()),
                    },
                );
                Begin::Run
            }
        }
    }

    /// Records a finished write (also called by replicas that applied a
    /// forwarded one, so that any of them can answer a retry as head).
    pub fn finish(&self, channel: Channel, result: WriteRsp) {
        let mut slots = self.slots.lock();
        let key = (channel.client, channel.id);
        let newer = match slots.get(&key) {
            Some(Slot::Finished { seq, .. }) => *seq <= channel.seq,
            Some(Slot::Running { seq, done }) => {
                done.notify_waiters();
                *seq <= channel.seq
            }
            None => true,
        };
        if newer {
            slots.insert(
                key,
                Slot::Finished {
                    seq: channel.seq,
                    result,
                },
            );
        }
    }

    /// Every finished request, for a resync to hand on.
    pub fn finished(&self) -> Vec<(Channel, WriteRsp)> {
        self.slots
            .lock()
            .iter()
            .filter_map(|((client, id), slot)| match slot {
                Slot::Finished { seq, result } => Some((
                    Channel {
                        client: *client,
                        id: *id,
                        seq: *seq,
                    },
                    *result,
                )),
                Slot::Running { .. } => None,
            })
            .collect()
    }

    /// Forgets a running write that failed, so that its retry runs again.
    pub fn fail(&self, channel: Channel) {
        let mut slots = self.slots.lock();
        let key = (channel.client, channel.id);
        if let Some(Slot::Running { seq, done }) = slots.get(&key)
            && *seq == channel.seq
        {
            done.notify_waiters();
            slots.remove(&key);
        }
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
