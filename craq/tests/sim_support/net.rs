//! A simulated network whose connections the chaos can reset.
//!
//! TCP neither loses nor reorders bytes within a connection, so the faults a
//! real transport shows flyfs are connections that break: a reset drops
//! every request and reply still in flight on the connection, the caller
//! sees an error or a timeout and retries (on a new connection, so a write
//! whose reply was lost reaches its target twice), and requests on
//! different connections overtake each other. `ResetNet` is turmoil's TCP
//! with a registry of every live connection, each end under the host that
//! opened or accepted it, so that the chaos can cut any one of them at any
//! time.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use flyfs_rpc::{Listener, Network};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One end of a connection, as the chaos sees it.
#[derive(Debug, Default)]
struct Cut {
    reset: AtomicBool,
    /// The tasks waiting on this end, woken by a reset so that they see it
    /// at once rather than at their next timeout.
    wakers: Mutex<Wakers>,
}

#[derive(Debug, Default)]
struct Wakers {
    read: Option<Waker>,
    write: Option<Waker>,
}

/// Every connection end opened in the simulation, in the order they were
/// opened (deterministic under turmoil), with its host's name.
#[derive(Clone, Debug, Default)]
pub struct Connections {
    ends: Arc<Mutex<Vec<End>>>,
}

/// A connection end's host, and the end while it is open.
type End = (Arc<str>, Weak<Cut>);

impl Connections {
    fn register(&self, host: &Arc<str>) -> Arc<Cut> {
        let cut = Arc::new(Cut::default());
        let mut ends = self.ends.lock().expect("one thread: never poisoned");
        ends.retain(|(_, end)| end.strong_count() > 0);
        ends.push((host.clone(), Arc::downgrade(&cut)));
        cut
    }

    /// How many connection ends are open now.
    pub fn open(&self) -> usize {
        self.live().len()
    }

    fn live(&self) -> Vec<(Arc<str>, Arc<Cut>)> {
        self.ends
            .lock()
            .expect("one thread: never poisoned")
            .iter()
            .filter_map(|(host, end)| Some((host.clone(), end.upgrade()?)))
            .filter(|(_, cut)| !cut.reset.load(Ordering::SeqCst))
            .collect()
    }

    /// Resets the open connection end numbered `pick` (modulo how many are
    /// open) and returns its host, or `None` if none is open. Its reads and
    /// writes fail from now on; its owner drops it, and the peer sees the
    /// connection close.
    pub fn reset(&self, pick: usize) -> Option<String> {
        let live = self.live();
        let (host, cut) = live.get(pick % live.len().max(1))?;
        cut.reset.store(true, Ordering::SeqCst);
        let mut wakers = cut.wakers.lock().expect("one thread: never poisoned");
        for waker in [wakers.read.take(), wakers.write.take()]
            .into_iter()
            .flatten()
        {
            waker.wake();
        }
        Some(host.to_string())
    }
}

/// turmoil's TCP, with every connection registered in [`Connections`].
#[derive(Clone, Debug)]
pub struct ResetNet {
    host: Arc<str>,
    connections: Connections,
}

impl ResetNet {
    pub fn new(host: &str, connections: &Connections) -> ResetNet {
        ResetNet {
            host: Arc::from(host),
            connections: connections.clone(),
        }
    }
}

impl Network for ResetNet {
    type Stream = ResetStream;
    type Listener = ResetListener;

    async fn connect(&self, addr: &str) -> io::Result<ResetStream> {
        let inner = turmoil::net::TcpStream::connect(addr).await?;
        Ok(ResetStream {
            inner,
            cut: self.connections.register(&self.host),
        })
    }

    async fn bind(&self, addr: &str) -> io::Result<ResetListener> {
        Ok(ResetListener {
            inner: turmoil::net::TcpListener::bind(addr).await?,
            net: self.clone(),
        })
    }
}

pub struct ResetListener {
    inner: turmoil::net::TcpListener,
    net: ResetNet,
}

impl Listener for ResetListener {
    type Stream = ResetStream;

    async fn accept(&mut self) -> io::Result<(ResetStream, String)> {
        let (inner, peer) = self.inner.accept().await?;
        let stream = ResetStream {
            inner,
            cut: self.net.connections.register(&self.net.host),
        };
        Ok((stream, peer.to_string()))
    }

    fn local_addr(&self) -> io::Result<String> {
        self.inner.local_addr().map(|addr| addr.to_string())
    }
}

/// One end of a connection that fails every read and write once reset.
pub struct ResetStream {
    inner: turmoil::net::TcpStream,
    cut: Arc<Cut>,
}

impl ResetStream {
    /// The reset error, or `None` after registering the waiting task so a
    /// later reset wakes it.
    fn check(&self, cx: &Context<'_>, read: bool) -> Option<io::Error> {
        if self.cut.reset.load(Ordering::SeqCst) {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset by the simulation's chaos",
            ));
        }
        let mut wakers = self.cut.wakers.lock().expect("one thread: never poisoned");
        let slot = if read {
            &mut wakers.read
        } else {
            &mut wakers.write
        };
        *slot = Some(cx.waker().clone());
        None
    }
}

impl AsyncRead for ResetStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.check(cx, true) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResetStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.check(cx, false) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.check(cx, false) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cut.reset.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
