//! The client of the metadata service: typed calls with failover across
//! service instances.
//!
//! Instances are stateless and interchangeable, so a call that cannot reach
//! one (refused, timed out, disconnected) moves to the next, and a call the
//! service answers "retryable" (the store was briefly unavailable) is
//! repeated with backoff, until the deadline. Every failure reaches the
//! caller as an errno with a message: the FUSE daemon hands the errno to
//! the kernel as it is.
//!
//! A mutating call that timed out may still have been applied by the
//! instance that received it; a retry then sees its effect (EEXIST for a
//! create that had succeeded, say), as with NFS. Callers that care (the
//! file client) treat those answers accordingly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flyfs_proto::Method;
use flyfs_proto::wire::meta::MetaError;
use flyfs_rpc::client::{CallOptions, Client, ClientConfig};
use flyfs_rpc::{Credentials, Network};
use flyfs_time::{Attempt, Backoff, Retry};

/// How a [`MetaClient`] retries.
#[derive(Clone, Debug)]
pub struct MetaClientConfig {
    /// Metadata service instances, tried in turn.
    pub addrs: Vec<String>,
    /// One attempt of one call.
    pub rpc_timeout: Duration,
    /// How long a call keeps failing over and retrying.
    pub op_deadline: Duration,
    pub backoff: Backoff,
}

impl MetaClientConfig {
    pub fn new(addrs: Vec<String>) -> MetaClientConfig {
        MetaClientConfig {
            addrs,
            rpc_timeout: Duration::from_secs(10),
            op_deadline: Duration::from_secs(60),
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_secs(1)),
        }
    }
}

/// Calls the metadata service.
#[derive(Debug)]
pub struct MetaClient<N: Network> {
    rpc: Client<N>,
    config: MetaClientConfig,
    /// The instance that answered last: tried first.
    current: AtomicUsize,
    /// Calls made: seeds each call's backoff jitter, so that calls that
    /// failed together retry apart, and a simulation replays them.
    calls: AtomicU64,
}

impl<N: Network> MetaClient<N> {
    /// A client that authenticates with `credentials` (a mount's or an
    /// admin's).
    pub fn new(net: N, config: MetaClientConfig, credentials: Credentials) -> Arc<MetaClient<N>> {
        Arc::new(MetaClient {
            rpc: Client::new(net, ClientConfig::default(), credentials),
            config,
            current: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
        })
    }

    /// Calls method `M`, failing over and retrying as described above.
    pub async fn call<M, T>(&self, req: &M::Req) -> Result<T, MetaError>
    where
        M: Method<Rsp = Result<T, MetaError>>,
    {
        if self.config.addrs.is_empty() {
            return Err(MetaError {
                errno: libc::EINVAL,
                message: "no metadata service address configured".into(),
                retryable: false,
            });
        }
        let options = CallOptions {
            timeout: self.config.rpc_timeout,
            ..CallOptions::default()
        };
        let seed = self.calls.fetch_add(1, Ordering::Relaxed);
        let answer = Retry::deadline(self.config.op_deadline, self.config.backoff)
            .run(seed, |attempt| async move {
                let index = self.current.load(Ordering::Relaxed) % self.config.addrs.len();
                let addr = &self.config.addrs[index];
                let failure = match self.rpc.call::<M>(addr, req, Bytes::new(), &options).await {
                    Ok((answer, _)) => match answer {
                        Err(e) if e.retryable => e.message,
                        answer => return Attempt::Done(answer),
                    },
                    Err(e) if e.is_retryable() => {
                        // Another instance may answer.
                        let _ = self.current.compare_exchange(
                            index,
                            index + 1,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                        format!("{addr}: {e}")
                    }
                    Err(e) => {
                        return Attempt::Done(Err(MetaError {
                            errno: libc::EIO,
                            message: format!("{} to {addr}: {e}", M::NAME),
                            retryable: false,
                        }));
                    }
                };
                tracing::debug!(method = M::NAME, attempt, "metadata call failed: {failure}");
                Attempt::Retry(failure)
            })
            .await;
        answer.unwrap_or_else(|gave_up| {
            Err(MetaError {
                errno: libc::EIO,
                message: format!("{} {gave_up}", M::NAME),
                retryable: true,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use flyfs_proto::wire::meta::{Statfs, StatfsReq};
    use flyfs_rpc::Tcp;

    use super::*;

    /// The op deadline runs on tokio's clock: with time paused, a call to
    /// an address nobody serves fails over and backs off for 60 s of tokio
    /// time, and gives up within moments of real time. On std's clock (as
    /// it once was) the deadline escaped paused and simulated time, and
    /// this call spun for a real minute.
    #[tokio::test(start_paused = true)]
    async fn the_op_deadline_runs_on_tokios_clock() {
        // A port that was just free: connecting is refused.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .to_string();
        let config = MetaClientConfig::new(vec![addr]);
        let op_deadline = config.op_deadline;
        let client = MetaClient::new(Tcp, config, flyfs_rpc::testing::client());
        let started = tokio::time::Instant::now();
        let real_started = std::time::Instant::now();
        let error = client
            .call::<Statfs, _>(&StatfsReq::default())
            .await
            .expect_err("nobody serves");
        assert_eq!(error.errno, libc::EIO);
        assert!(error.retryable, "{error:?}");
        assert!(
            error.message.starts_with("meta.Statfs gave up after "),
            "{}",
            error.message
        );
        assert!(started.elapsed() >= op_deadline, "{:?}", started.elapsed());
        assert!(
            real_started.elapsed() < op_deadline / 4,
            "the deadline ran on real time: {:?}",
            real_started.elapsed()
        );
    }
}
