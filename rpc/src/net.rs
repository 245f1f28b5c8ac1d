//! The network seam: the same server and client run over real TCP and over
//! turmoil's simulated TCP, picked at the composition root.
//!
//! Addresses are `"host:port"` strings everywhere, because both networks
//! resolve names (the OS for [`Tcp`], turmoil's DNS for `SimNet`) and logs
//! read better with names.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// A stream network: connect to and listen on `"host:port"` addresses.
pub trait Network: Clone + Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Listener: Listener<Stream = Self::Stream>;

    fn connect(&self, addr: &str) -> impl Future<Output = io::Result<Self::Stream>> + Send;
    fn bind(&self, addr: &str) -> impl Future<Output = io::Result<Self::Listener>> + Send;
}

/// A bound listening socket.
pub trait Listener: Send + 'static {
    type Stream;

    /// The next connection and the peer's address.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, String)>> + Send;
    fn local_addr(&self) -> io::Result<String>;
}

/// Real TCP through tokio. Every stream has `TCP_NODELAY` set: frames are
/// written whole, and Nagle would hold a small reply back for an ACK. Every
/// stream also has TCP keepalive on ([`KEEPALIVE_IDLE`], probes every
/// [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_PROBES`] of them), so a peer that
/// vanished (power loss, a cut cable) is noticed and its connection freed
/// within about a minute and a half, not after the kernel's two hours.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tcp;

/// Silence on a connection before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel drops the connection.
pub const KEEPALIVE_PROBES: u32 = 3;

/// `TCP_NODELAY` and keepalive, on every stream of [`Tcp`].
fn tune(stream: &tokio::net::TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

impl Network for Tcp {
    type Stream = tokio::net::TcpStream;
    type Listener = tokio::net::TcpListener;

    async fn connect(&self, addr: &str) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        tune(&stream)?;
        Ok(stream)
    }

    async fn bind(&self, addr: &str) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::bind(addr).await
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        tune(&stream)?;
        Ok((stream, peer.to_string()))
    }

    fn local_addr(&self) -> io::Result<String> {
        tokio::net::TcpListener::local_addr(self).map(|addr| addr.to_string())
    }
}

/// turmoil's simulated TCP, for deterministic cluster simulations. Only
/// usable inside a turmoil host or client; `"name:port"` resolves through the
/// simulation's DNS.
#[cfg(feature = "sim")]
#[derive(Clone, Copy, Debug, Default)]
pub struct SimNet;

#[cfg(feature = "sim")]
impl Network for SimNet {
    type Stream = turmoil::net::TcpStream;
    type Listener = turmoil::net::TcpListener;

    async fn connect(&self, addr: &str) -> io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect(addr).await
    }

    async fn bind(&self, addr: &str) -> io::Result<Self::Listener> {
        turmoil::net::TcpListener::bind(addr).await
    }
}

#[cfg(feature = "sim")]
impl Listener for turmoil::net::TcpListener {
    type Stream = turmoil::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = turmoil::net::TcpListener::accept(self).await?;
        Ok((stream, peer.to_string()))
    }

    fn local_addr(&self) -> io::Result<String> {
        turmoil::net::TcpListener::local_addr(self).map(|addr| addr.to_string())
    }
}
