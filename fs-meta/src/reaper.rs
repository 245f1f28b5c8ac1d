//! The session reaper: ends the write sessions of clients whose lease ran
//! out (they crashed, or have been cut off for a whole lease), so that their
//! files get an exact length and GC can reclaim the unlinked ones.
//!
//! It runs beside the GC worker in every metadata daemon, in the same style:
//! no leader, every step idempotent and committed on its own, so several
//! instances may run reapers at once (two reaping one session both fix its
//! length, which is harmless, and only one transaction ends it). A pass
//! walks every write session in pages ([`Namespace::expired_sessions`]);
//! for each expired one it fixes the file's length from storage exactly as
//! `Close` does when the client cannot say it (the end of the highest chunk
//! on storage, folded into the recorded length), then ends the session with
//! [`Namespace::reap_session`], which checks the lease again so that a
//! client renewing meanwhile keeps its session. Last, it deletes expired
//! lease records, so the records of clients long gone do not pile up.
//!
//! Before its first pass it fixes the length of every file that has a write
//! session from storage ([`SessionReaper::fix_written_lengths`]): a sync
//! that the flush of `close(2)` made without waiting for the journal's fsync
//! may have been lost in a crash of this service that its writer outlived.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flyfs_client::storage::StorageClient;
use flyfs_proto::ids::InodeId;
use flyfs_rpc::Network;

use crate::data::FileChunks;
use crate::ns::{ExpiredSession, Namespace, NsError, Reaped};
use flyfs_kv::Kv;

/// How the reaper paces itself.
#[derive(Clone, Debug)]
pub struct ReaperConfig {
    /// Between passes. A crashed client's sessions end between one lease
    /// and one lease plus this after its last renewal.
    pub interval: Duration,
    /// Sessions read per page, and lease records deleted per pass.
    pub batch: usize,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        ReaperConfig {
            interval: Duration::from_secs(10),
            batch: 1024,
        }
    }
}

/// What the reaper has done, for tests and metrics.
#[derive(Debug, Default)]
pub struct ReaperStats {
    sessions_reaped: AtomicU64,
    leases_removed: AtomicU64,
}

impl ReaperStats {
    pub fn sessions_reaped(&self) -> u64 {
        self.sessions_reaped.load(Ordering::Relaxed)
    }

    pub fn leases_removed(&self) -> u64 {
        self.leases_removed.load(Ordering::Relaxed)
    }
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReapPass {
    /// Sessions this pass ended.
    pub sessions_reaped: usize,
    /// Expired sessions it found whose client renewed before it decided.
    pub sessions_renewed: usize,
    /// Expired lease records it deleted.
    pub leases_removed: usize,
}

/// Why a pass failed; the reaper logs it and tries again at the next pass.
#[derive(Debug, thiserror::Error)]
pub enum ReapError {
    #[error(transparent)]
    Namespace(#[from] NsError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

/// The reaper. Run [`SessionReaper::run`] on a task; dropping the task
/// stops it.
pub struct SessionReaper<K: Kv, N: Network> {
    ns: Namespace<K>,
    storage: Arc<StorageClient<N>>,
    config: ReaperConfig,
    stats: Arc<ReaperStats>,
}

impl<K: Kv, N: Network> std::fmt::Debug for SessionReaper<K, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionReaper")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<K: Kv, N: Network> SessionReaper<K, N> {
    pub fn new(
        ns: Namespace<K>,
        storage: Arc<StorageClient<N>>,
        config: ReaperConfig,
        stats: Arc<ReaperStats>,
    ) -> SessionReaper<K, N> {
        SessionReaper {
            ns,
            storage,
            config,
            stats,
        }
    }

    /// Reaps forever, one pass per interval, after the startup pass
    /// ([`fix_written_lengths`](Self::fix_written_lengths)), which is
    /// tried again at each interval until it has gone through.
    pub async fn run(self) {
        let mut started = false;
        loop {
            if !started {
                match self.fix_written_lengths().await {
                    Ok(files) => {
                        started = true;
                        tracing::info!(files, "fixed the lengths of files open for writing");
                    }
                    Err(e) => tracing::warn!(
                        "fixing the lengths of files open for writing failed, retrying later: {e}"
                    ),
                }
            }
            match self.reap_once().await {
                Ok(pass) if pass.sessions_reaped > 0 || pass.leases_removed > 0 => {
                    tracing::info!(
                        sessions = pass.sessions_reaped,
                        leases = pass.leases_removed,
                        "ended the write sessions of clients whose lease expired"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("session reaper pass failed, retrying later: {e}"),
            }
            tokio::time::sleep(self.config.interval).await;
        }
    }

    /// One pass over every write session and then the lease records.
    /// A session that fails to reap (storage unreachable for its length) is
    /// logged and left for the next pass; the pass goes on.
    pub async fn reap_once(&self) -> Result<ReapPass, ReapError> {
        let mut pass = ReapPass::default();
        let mut from = None;
        loop {
            let page = self.ns.expired_sessions(from, self.config.batch).await?;
            for expired in &page.expired {
                match self.reap(expired).await {
                    Ok(Reaped::Ended(_)) => {
                        pass.sessions_reaped += 1;
                        self.stats.sessions_reaped.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Reaped::Alive) => pass.sessions_renewed += 1,
                    Ok(Reaped::AlreadyGone) => {}
                    Err(e) => tracing::warn!(
                        ino = ?expired.ino,
                        session = ?expired.session,
                        client = expired.client,
                        "reaping an expired write session failed, retrying later: {e}"
                    ),
                }
            }
            match page.next {
                Some(next) => from = Some(next),
                None => break,
            }
        }
        pass.leases_removed = self.ns.remove_expired_leases(self.config.batch).await?;
        self.stats
            .leases_removed
            .fetch_add(pass.leases_removed as u64, Ordering::Relaxed);
        Ok(pass)
    }

    /// The startup pass: fixes the length of every file with a write
    /// session from storage, as a close that cannot say its length does.
    /// A sync by the flush of `close(2)` is committed without waiting for
    /// the journal's fsync, and a crash of this service may lose it while
    /// its writer lives on and keeps its session (its close went with it:
    /// a crash keeps a prefix of the commits). Its data is on storage, so
    /// this restores the length; the writer's own close would too
    /// ([`Namespace::close_known`]), but it may already have closed. Lengths
    /// only grow here, so a writer writing meanwhile loses nothing. Returns
    /// how many files it fixed; fails (leaving the rest for another try)
    /// when any file's length cannot be had from storage.
    pub async fn fix_written_lengths(&self) -> Result<usize, ReapError> {
        let mut fixed = 0;
        let mut from = None;
        loop {
            let (files, next) = self.ns.written_files(from, self.config.batch).await?;
            for ino in files {
                self.fix_length(ino).await?;
                fixed += 1;
            }
            match next {
                Some(next) => from = Some(next),
                None => return Ok(fixed),
            }
        }
    }

    /// Folds the end of `ino`'s highest chunk on storage into its length.
    async fn fix_length(&self, ino: InodeId) -> Result<(), ReapError> {
        let inode = match self.ns.stat(ino).await {
            Ok(inode) => inode,
            // Unlinked and collected since its session was listed.
            Err(NsError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if let Some(file) = inode.file() {
            let length = FileChunks {
                storage: &self.storage,
                ino,
                layout: &file.layout,
                queries: None,
            }
            .length()
            .await?;
            self.ns.set_length(ino, length, false).await?;
        }
        Ok(())
    }

    /// Fixes the file's length from storage, then ends the session if its
    /// lease is still expired.
    async fn reap(&self, expired: &ExpiredSession) -> Result<Reaped, ReapError> {
        self.fix_length(expired.ino).await?;
        let reaped = self.ns.reap_session(expired.ino, expired.session).await?;
        if matches!(reaped, Reaped::Ended(_)) {
            tracing::debug!(
                ino = ?expired.ino,
                session = ?expired.session,
                client = expired.client,
                "ended a write session whose client's lease expired"
            );
        }
        Ok(reaped)
    }
}
