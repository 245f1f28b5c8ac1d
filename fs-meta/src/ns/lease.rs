//! Client leases: how the namespace tells the write sessions of a live
//! client from those of a client that died.
//!
//! A write session pins its file: GC does not collect an unlinked file while
//! a session remains, because its writer may still be putting chunks on
//! storage. A client that crashes never closes its sessions, so without
//! leases its unlinked files would be kept forever. Each client therefore
//! holds one lease (`CLNT` key) for all of its sessions, renewed by
//! [`Namespace::renew_lease`] (one small blind write per client every third
//! of the lease, however many files it has open). The session reaper
//! (`crate::reaper`) lists the sessions whose lease has run out
//! ([`Namespace::expired_sessions`]), fixes each file's length from storage,
//! and ends the session with [`Namespace::reap_session`], which checks the
//! lease again in its own transaction: a renewal that commits first keeps
//! the session, one that commits after finds it gone.
//!
//! A session is held until the later of its client's lease expiry and its
//! own opening time plus one lease length. The second term covers a session
//! opened before its client's first renewal reached the store (and clients
//! older than leases, which never renew: their sessions now end one lease
//! after they were opened). Expiry compares times of two instances' wall
//! clocks (the renewing one's and the reaping one's), so the lease must be
//! much longer than the clock skew between metadata instances; the default
//! (a minute) is.
//!
//! A client cut off from every metadata instance for longer than its lease
//! loses its sessions while it may still be writing: its file's length was
//! fixed without its last writes, and an unlinked file of it may be
//! collected while it writes (those chunks are then orphaned on storage).
//! That is the price of any lease; the client logs its failed renewals.

use std::collections::HashMap;

use bytes::Bytes;
use flyfs_proto::ids::InodeId;

use super::Namespace;
use super::txn::MetaTx;
use crate::ns::NsError;
use crate::schema::{
    Inode, Key, LeaseValue, SessionId, SessionValue, decode_lease, decode_session, describe_key,
    encode_lease, lease_key, parse_key, session_key, tag,
};
use flyfs_kv::{KeyValue, Kv, RangeOptions, Transaction, key_after, prefix_end};

/// A write session whose client's lease has run out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpiredSession {
    pub ino: InodeId,
    pub session: SessionId,
    /// The client that opened it.
    pub client: u64,
}

/// One page of [`Namespace::expired_sessions`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpiredPage {
    pub expired: Vec<ExpiredSession>,
    /// Where the next page starts; `None` after the last session.
    pub next: Option<Bytes>,
}

/// What [`Namespace::reap_session`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reaped {
    /// The session is gone; the file as it is now (`None` if the inode is
    /// gone too, which a session should never outlive).
    Ended(Option<Inode>),
    /// The client renewed its lease meanwhile: the session stays.
    Alive,
    /// Nothing to do: the session was already closed.
    AlreadyGone,
}

/// Whether `session` is past its lease at `now_ms`: past both its client's
/// lease expiry (none if the client has no lease record) and one lease
/// length after it was opened.
fn is_expired(
    now_ms: u64,
    lease_ms: u64,
    lease: Option<&LeaseValue>,
    session: &SessionValue,
) -> bool {
    let opened_ms = u64::try_from(session.opened_ns / 1_000_000).unwrap_or(0);
    let held_ms = lease
        .map_or(0, |l| l.expires_ms)
        .max(opened_ms.saturating_add(lease_ms));
    now_ms > held_ms
}

impl<K: Kv> Namespace<K> {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.now_ns() / 1_000_000).unwrap_or(0)
    }

    /// Renews `client`'s lease for `owner` (the caller's identity): its
    /// sessions are kept for the configured lease length from now. Refused
    /// (`NotPermitted`) if another identity holds the lease. It reads and
    /// writes only the lease key, so renewals never conflict with opens; a
    /// reaper deciding on this client's sessions read the key, so exactly
    /// one of the two wins.
    pub async fn renew_lease(&self, client: u64, owner: &str) -> Result<LeaseValue, NsError> {
        let lease_ms = self.inner.config.client_lease_ms;
        self.write(|tx| async move {
            let key = lease_key(client);
            // Bound to the identity that first took it, so that one client
            // cannot keep another's dead sessions (and their unlinked files)
            // alive by renewing its lease, nor end them by racing its
            // renewals with ids of its own making.
            if let Some(value) = tx.tx.get(&key, false).await? {
                let held = decode_lease(&key, &value)?;
                if !held.owner.is_empty() && held.owner != owner {
                    return Err(NsError::NotPermitted(format!(
                        "the lease of client {client:#x} is held by {}; {owner} may not renew it",
                        held.owner
                    )));
                }
            }
            let lease = LeaseValue {
                expires_ms: tx.now_ms().saturating_add(lease_ms),
                renewed_ns: tx.now_ns,
                owner: owner.to_owned(),
            };
            tx.tx.set(&key, &encode_lease(&lease)?)?;
            Ok(lease)
        })
        .await
    }

    /// `client`'s lease record, if it has one.
    pub async fn lease(&self, client: u64) -> Result<Option<LeaseValue>, NsError> {
        self.read(|tx| async move {
            let key = lease_key(client);
            match tx.tx.get(&key, true).await? {
                Some(value) => Ok(Some(decode_lease(&key, &value)?)),
                None => Ok(None),
            }
        })
        .await
    }

    /// The files of up to `limit` write sessions from `from` (the previous
    /// page's second item; `None` to start), each once per page, and where
    /// the next page starts (`None` after the last session): the files the
    /// reaper's startup pass fixes the length of.
    pub async fn written_files(
        &self,
        from: Option<Bytes>,
        limit: usize,
    ) -> Result<(Vec<InodeId>, Option<Bytes>), NsError> {
        self.read(|tx| {
            let from = from.clone();
            async move {
                let (sessions, next) = session_page(&tx, from, limit).await?;
                let mut files: Vec<InodeId> = Vec::new();
                for (ino, _, _) in sessions {
                    // Keys sort by inode first: its sessions are adjacent.
                    if files.last() != Some(&ino) {
                        files.push(ino);
                    }
                }
                Ok((files, next))
            }
        })
        .await
    }

    /// The expired sessions among up to `limit` write sessions from `from`
    /// (the previous page's `next`; `None` to start), read as a snapshot:
    /// this only finds candidates, and [`Namespace::reap_session`] decides
    /// each one again in a transaction that conflicts with a renewal.
    pub async fn expired_sessions(
        &self,
        from: Option<Bytes>,
        limit: usize,
    ) -> Result<ExpiredPage, NsError> {
        let lease_ms = self.inner.config.client_lease_ms;
        let now_ms = self.now_ms();
        self.read(|tx| {
            let from = from.clone();
            async move {
                let (sessions, next) = session_page(&tx, from, limit).await?;
                let mut leases: HashMap<u64, Option<LeaseValue>> = HashMap::new();
                let mut expired = Vec::new();
                for (ino, session, kv) in &sessions {
                    let (ino, session) = (*ino, *session);
                    let value = decode_session(&kv.key, &kv.value)?;
                    let lease = match leases.get(&value.client) {
                        Some(lease) => lease.clone(),
                        None => {
                            let key = lease_key(value.client);
                            let lease = match tx.tx.get(&key, true).await? {
                                Some(bytes) => Some(decode_lease(&key, &bytes)?),
                                None => None,
                            };
                            leases.insert(value.client, lease.clone());
                            lease
                        }
                    };
                    if is_expired(now_ms, lease_ms, lease.as_ref(), &value) {
                        expired.push(ExpiredSession {
                            ino,
                            session,
                            client: value.client,
                        });
                    }
                }
                Ok(ExpiredPage { expired, next })
            }
        })
        .await
    }

    /// Ends session `session` of `ino` if its client's lease has run out,
    /// deciding on serializable reads of the session and the lease. The
    /// caller fixes the file's length from storage first, as a close does
    /// when the client cannot say it.
    pub async fn reap_session(&self, ino: InodeId, session: SessionId) -> Result<Reaped, NsError> {
        let lease_ms = self.inner.config.client_lease_ms;
        self.write(|tx| async move {
            let key = session_key(ino, session);
            let Some(bytes) = tx.tx.get(&key, false).await? else {
                return Ok(Reaped::AlreadyGone);
            };
            let value = decode_session(&key, &bytes)?;
            let lease_key = lease_key(value.client);
            let lease = match tx.tx.get(&lease_key, false).await? {
                Some(bytes) => Some(decode_lease(&lease_key, &bytes)?),
                None => None,
            };
            if !is_expired(tx.now_ms(), lease_ms, lease.as_ref(), &value) {
                return Ok(Reaped::Alive);
            }
            tx.tx.clear(&key)?;
            Ok(Reaped::Ended(tx.inode(ino).await?))
        })
        .await
    }

    /// Deletes up to `limit` lease records that have expired, so that the
    /// records of clients that went away (a new client id per mount) do not
    /// pile up. Safe whatever sessions the client still has: an expired
    /// record holds nothing that its absence would not (see
    /// [`is_expired`]), and each deletion re-reads the record, so a renewal
    /// racing with it wins. Returns how many it deleted.
    pub async fn remove_expired_leases(&self, limit: usize) -> Result<usize, NsError> {
        let now_ms = self.now_ms();
        let expired: Vec<u64> = self
            .read(|tx| async move {
                let range = RangeOptions::prefix(tag::LEASE)
                    .limit(limit.max(1))
                    .snapshot(true);
                let result = tx.tx.get_range(&range).await?;
                let mut expired = Vec::new();
                for kv in &result.kvs {
                    let Key::Lease { client } = parse_key(&kv.key)? else {
                        return Err(NsError::Corrupt {
                            key: describe_key(&kv.key),
                            reason: "not a lease key under the lease prefix".into(),
                        });
                    };
                    if decode_lease(&kv.key, &kv.value)?.expires_ms < now_ms {
                        expired.push(client);
                    }
                }
                Ok(expired)
            })
            .await?;
        let mut removed = 0;
        for client in expired {
            let gone = self
                .write(|tx| async move {
                    let key = lease_key(client);
                    match tx.tx.get(&key, false).await? {
                        Some(bytes) if decode_lease(&key, &bytes)?.expires_ms < tx.now_ms() => {
                            tx.tx.clear(&key)?;
                            Ok(true)
                        }
                        _ => Ok(false),
                    }
                })
                .await?;
            removed += usize::from(gone);
        }
        Ok(removed)
    }
}

/// Up to `limit` write sessions from `from` (the start of their range when
/// `None`), read as a snapshot, each with its key and value, and where the
/// next page starts (`None` after the last session).
async fn session_page<T: Transaction>(
    tx: &MetaTx<T>,
    from: Option<Bytes>,
    limit: usize,
) -> Result<(Vec<(InodeId, SessionId, KeyValue)>, Option<Bytes>), NsError> {
    let begin = from.unwrap_or_else(|| Bytes::from_static(tag::SESSION));
    let range = RangeOptions::new(begin, prefix_end(tag::SESSION))
        .limit(limit.max(1))
        .snapshot(true);
    let result = tx.tx.get_range(&range).await?;
    let next = match result.kvs.last() {
        Some(last) if result.more => Some(key_after(&last.key)),
        _ => None,
    };
    let mut sessions = Vec::with_capacity(result.kvs.len());
    for kv in result.kvs {
        let Key::Session { ino, session } = parse_key(&kv.key)? else {
            return Err(NsError::Corrupt {
                key: describe_key(&kv.key),
                reason: "not a session key under the session prefix".into(),
            });
        };
        sessions.push((ino, session, kv));
    }
    Ok((sessions, next))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use flyfs_proto::wire::meta::User;
    use flyfs_time::ManualClock;

    use super::*;
    use crate::ns::{CreateFlags, OpenFlags};
    use crate::schema::ROOT;
    use flyfs_kv::mem::MemKv;

    const START_NS: i64 = 1_700_000_000_000_000_000;
    const LEASE_MS: i64 = 10_000;
    const OWNER: &str = "flyfs://test/client/a";

    async fn namespace() -> (Namespace<MemKv>, Arc<ManualClock>) {
        crate::ns::tests::namespace_on_clock(START_NS, |config| {
            config.client_lease_ms = LEASE_MS as u64;
        })
        .await
    }

    /// Every expired session, page by page (pages of 1 to test the cursor).
    async fn all_expired(ns: &Namespace<MemKv>) -> Vec<ExpiredSession> {
        let mut all = Vec::new();
        let mut from = None;
        loop {
            let page = ns.expired_sessions(from, 1).await.expect("expired");
            all.extend(page.expired);
            match page.next {
                Some(next) => from = Some(next),
                None => return all,
            }
        }
    }

    fn writing(client: u64) -> CreateFlags {
        CreateFlags {
            write_session: Some(client),
            ..CreateFlags::default()
        }
    }

    /// A lease belongs to the identity that first renewed it: another
    /// identity can neither keep it alive nor take it over, and a record
    /// from before leases had owners is bound by its next renewal.
    #[tokio::test]
    async fn only_the_holder_renews_a_lease() {
        let (ns, clock) = namespace().await;
        let held = ns.renew_lease(7, OWNER).await.expect("renew");
        assert_eq!(held.owner, OWNER);
        clock.advance_ms(1);
        let other = "flyfs://test/client/b";
        let refused = ns.renew_lease(7, other).await.expect_err("not its lease");
        assert!(matches!(refused, NsError::NotPermitted(_)), "{refused}");
        assert!(refused.to_string().contains(OWNER), "{refused}");
        assert_eq!(ns.lease(7).await.expect("lease"), Some(held));
        ns.renew_lease(7, OWNER).await.expect("the holder renews");

        // An unowned record, as written before leases were bound.
        let unowned = LeaseValue {
            expires_ms: 1,
            renewed_ns: 1,
            owner: String::new(),
        };
        let tx = ns.kv().begin().expect("begin");
        tx.set(&lease_key(8), &encode_lease(&unowned).expect("encode"))
            .expect("set");
        tx.commit().await.expect("commit");
        assert_eq!(ns.renew_lease(8, other).await.expect("renew").owner, other);
        assert!(ns.renew_lease(8, OWNER).await.is_err());
    }

    /// A client that renews keeps its sessions however long it lives; one
    /// that stops loses them one lease after its last renewal (or after the
    /// open, for a client that never renewed), and its unlinked file
    /// becomes collectable. A renewal racing the reaper wins when it
    /// commits first.
    #[tokio::test]
    async fn sessions_last_while_their_client_renews() {
        let (ns, clock) = namespace().await;
        let root = User::root();
        let live = ns
            .create(&root, ROOT, b"live", 0o644, writing(7))
            .await
            .expect("create");
        let dead = ns
            .create(&root, ROOT, b"dead", 0o644, writing(8))
            .await
            .expect("create");
        // Client 9 never renews at all.
        let silent = ns
            .create(&root, ROOT, b"silent", 0o644, writing(9))
            .await
            .expect("create");
        ns.renew_lease(7, OWNER).await.expect("renew");
        ns.renew_lease(8, OWNER).await.expect("renew");
        ns.unlink(&root, ROOT, b"dead").await.expect("unlink");
        assert!(!ns.gc_file_ready(dead.inode.ino).await.expect("ready"));

        // Well past the lease, client 7 renewing every half lease.
        for _ in 0..6 {
            clock.advance_ms(LEASE_MS / 2);
            ns.renew_lease(7, OWNER).await.expect("renew");
            let expired = all_expired(&ns).await;
            assert!(expired.iter().all(|e| e.client != 7), "{expired:?}");
        }
        let mut expired = all_expired(&ns).await;
        expired.sort_by_key(|e| e.client);
        let session = |c: &crate::ns::Created| c.session.expect("session");
        assert_eq!(
            expired,
            vec![
                ExpiredSession {
                    ino: dead.inode.ino,
                    session: session(&dead),
                    client: 8
                },
                ExpiredSession {
                    ino: silent.inode.ino,
                    session: session(&silent),
                    client: 9
                },
            ]
        );
        for e in &expired {
            assert!(matches!(
                ns.reap_session(e.ino, e.session).await.expect("reap"),
                Reaped::Ended(Some(_))
            ));
            assert_eq!(
                ns.reap_session(e.ino, e.session).await.expect("again"),
                Reaped::AlreadyGone
            );
        }
        // The live session is refused even when asked for directly.
        assert_eq!(
            ns.reap_session(live.inode.ino, session(&live))
                .await
                .expect("reap"),
            Reaped::Alive
        );
        assert_eq!(
            ns.sessions(live.inode.ino).await.expect("sessions").len(),
            1
        );
        assert!(ns.gc_file_ready(dead.inode.ino).await.expect("ready"));

        // A client that comes back renews before the reaper decides: kept.
        let back = ns
            .open_file(
                &root,
                live.inode.ino,
                OpenFlags {
                    write_session: Some(8),
                    ..OpenFlags::default()
                },
            )
            .await
            .expect("open");
        clock.advance_ms(LEASE_MS + 1);
        ns.renew_lease(7, OWNER).await.expect("renew");
        let candidates = all_expired(&ns).await;
        assert_eq!(candidates.len(), 1, "{candidates:?}");
        ns.renew_lease(8, OWNER).await.expect("renew");
        assert_eq!(
            ns.reap_session(live.inode.ino, back.session.expect("session"))
                .await
                .expect("reap"),
            Reaped::Alive
        );

        // Expired lease records are deleted; live ones stay.
        clock.advance_ms(LEASE_MS / 2);
        ns.renew_lease(7, OWNER).await.expect("renew");
        clock.advance_ms(LEASE_MS / 2 + 1);
        assert_eq!(ns.remove_expired_leases(100).await.expect("remove"), 1);
        assert!(ns.lease(8).await.expect("lease").is_none());
        assert!(ns.lease(7).await.expect("lease").is_some());
        let report = ns.check().await.expect("check");
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.sessions, 2, "{report}");
    }
}
