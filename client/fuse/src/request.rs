//! How one kernel request is served: as a task on the tokio runtime that
//! answers the kernel when it is done, so the FUSE threads never wait on
//! the network.
//!
//! Every request ends in exactly one answer: the reply its operation
//! builds, its error's errno, or EIO when the task panicked (a bug in one
//! request fails that request, not the mount). Requests are counted, timed
//! and, when they fail, logged; [`InFlight`] lets a shutdown wait for the
//! ones still running.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use flyfs_client::FsError;
use flyfs_rpc::Network;
use fuser::{
    Errno, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
};
use futures::FutureExt;
use tokio::sync::Notify;

use crate::fs::FuseFs;

/// An errno with a message, for errors found here rather than by the
/// metadata service.
pub(crate) fn fail(errno: i32, message: impl Into<String>) -> FsError {
    FsError {
        errno,
        message: message.into(),
        retryable: false,
    }
}

/// Counts the request tasks running, so a shutdown can wait for them.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    fn begin(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    fn end(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The errno of a failed request, logged: quietly for what callers get
/// every day (ENOENT, EEXIST, EACCES...), loudly for what means trouble.
fn log_failure(op: &'static str, error: &FsError) {
    match error.errno {
        libc::EIO | libc::ETIMEDOUT | libc::ENOTCONN | libc::ECONNREFUSED | libc::ENOSPC => {
            tracing::warn!(
                op,
                errno = error.errno,
                "FUSE request failed: {}",
                error.message
            );
        }
        _ => tracing::debug!(
            op,
            errno = error.errno,
            "FUSE request failed: {}",
            error.message
        ),
    }
}

/// A reply that can carry an error (every fuser reply type).
pub(crate) trait ErrorReply: Send + 'static {
    fn fail(self, errno: Errno);
}

macro_rules! error_reply {
    ($($t:ty),* $(,)?) => {
        $(impl ErrorReply for $t {
            fn fail(self, errno: Errno) {
                self.error(errno);
            }
        })*
    };
}

error_reply!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyLseek,
    ReplyOpen,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr,
);

impl ErrorReply for () {
    /// For requests that answer the kernel themselves.
    fn fail(self, _errno: Errno) {}
}

impl<N: Network> FuseFs<N> {
    /// Runs `work` as a task and answers the kernel with its outcome:
    /// `done` turns a success into the reply, an error becomes its errno,
    /// a panic EIO. Counts and times the request.
    pub(crate) fn spawn<R, T, F, D>(&self, op: &'static str, reply: R, work: F, done: D)
    where
        R: ErrorReply,
        T: Send + 'static,
        F: Future<Output = Result<T, FsError>> + Send + 'static,
        D: FnOnce(R, T) + Send + 'static,
    {
        metrics::counter!("flyfs_fuse_requests_total", "op" => op).increment(1);
        let shared = self.shared.clone();
        shared.in_flight.begin();
        let start = Instant::now();
        self.runtime.spawn(async move {
            match AssertUnwindSafe(work).catch_unwind().await {
                Ok(Ok(value)) => {
                    // A panic while answering drops the reply, which
                    // answers EIO itself.
                    if std::panic::catch_unwind(AssertUnwindSafe(|| done(reply, value))).is_err() {
                        metrics::counter!("flyfs_fuse_errors_total", "op" => op).increment(1);
                        tracing::error!(op, "FUSE request panicked while replying; answered EIO");
                    }
                }
                Ok(Err(error)) => {
                    metrics::counter!("flyfs_fuse_errors_total", "op" => op).increment(1);
                    log_failure(op, &error);
                    reply.fail(Errno::from_i32(error.errno));
                }
                Err(panic) => {
                    metrics::counter!("flyfs_fuse_errors_total", "op" => op).increment(1);
                    let what = flyfs_rpc::server::panic_message(&*panic);
                    tracing::error!(op, "FUSE request panicked: {what}; answered EIO");
                    reply.fail(Errno::EIO);
                }
            }
            metrics::histogram!("flyfs_fuse_request_seconds", "op" => op)
                .record(start.elapsed().as_secs_f64());
            shared.in_flight.end();
        });
    }

    /// Answers a request that failed before any task was needed.
    pub(crate) fn refuse<R: ErrorReply>(&self, op: &'static str, reply: R, error: &FsError) {
        metrics::counter!("flyfs_fuse_requests_total", "op" => op).increment(1);
        metrics::counter!("flyfs_fuse_errors_total", "op" => op).increment(1);
        log_failure(op, error);
        reply.fail(Errno::from_i32(error.errno));
    }
}
