//! The RDMA seam: bulk data travels beside the message, never inside it.
//!
//! A request or reply carries its bulk bytes (chunk data) as a frame payload,
//! never in the encoded message: encoding would copy it, and an RDMA transport
//! must be able to move it without the CPU. Services see only [`Payload`] and
//! its four methods, so they never learn which transport is underneath.
//!
//! # The RDMA transport's remote payloads
//!
//! [`Payload::Remote`] describes memory the *sender* registered with its
//! NIC (a buffer pool arena, registered once at start): address, rkey,
//! length, and the connection they belong to. An RDMA sender puts that
//! descriptor in the request instead of the bytes when the bytes lie in a
//! registered arena (crate::rdma). For a write, the server's
//! `fetch_into(dst)` issues a one-sided RDMA READ from the sender's buffer
//! into `dst` (a registered `DmaBuf` the chunk engine will write to the
//! device) and resolves when the READ completes: no sender CPU is involved,
//! and `dst` is filled exactly as the TCP path fills it by copying from the
//! inline bytes. The same holds between storage nodes: a forwarded write's
//! payload lies in the forwarder's registered engine buffer, which the
//! successor pulls.
//!
//! `into_bytes` returns `None` for a remote payload: code that needs the bytes
//! in memory must use `fetch_into`.

use std::sync::Arc;

use bytes::Bytes;
use flyfs_rdma::RemoteBuffer;

use crate::error::RpcError;
use crate::rdma::Link;

/// A payload still in the peer's registered memory (RDMA transport).
#[derive(Clone, Debug)]
pub struct RemotePayload {
    pub(crate) link: Arc<Link>,
    pub(crate) remote: RemoteBuffer,
    /// The request's method, for the one-sided byte counts.
    pub(crate) method: u16,
}

impl PartialEq for RemotePayload {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.link, &other.link) && self.remote == other.remote
    }
}

impl Eq for RemotePayload {}

/// Bulk bytes that came with a request or a reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Payload {
    #[default]
    Empty,
    /// The bytes arrived in the frame (TCP): a zero-copy slice of the buffer
    /// the frame was read into.
    Inline(Bytes),
    /// The bytes are in the peer's registered buffer (RDMA): `fetch_into`
    /// pulls them with a one-sided RDMA READ. See the file comment.
    Remote(RemotePayload),
}

impl Payload {
    /// `Empty` for no bytes, `Inline` otherwise.
    pub fn from_bytes(bytes: Bytes) -> Payload {
        if bytes.is_empty() {
            Payload::Empty
        } else {
            Payload::Inline(bytes)
        }
    }

    /// Bytes the payload holds, wherever they are.
    pub fn len(&self) -> usize {
        match self {
            Payload::Empty => 0,
            Payload::Inline(bytes) => bytes.len(),
            Payload::Remote(remote) => remote.remote.len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `dst` with the payload; `dst` must be exactly `len()` bytes, so a
    /// service that sized its buffer from a length in the request learns when
    /// the client sent something else. Inline bytes are copied; a remote
    /// payload is pulled by one RDMA READ into `dst`, which must then lie
    /// in a registered buffer pool arena.
    pub async fn fetch_into(&self, dst: &mut [u8]) -> Result<(), RpcError> {
        if dst.len() != self.len() {
            return Err(RpcError::PayloadLength {
                expected: dst.len(),
                got: self.len(),
            });
        }
        match self {
            Payload::Empty => Ok(()),
            Payload::Inline(bytes) => {
                dst.copy_from_slice(bytes);
                Ok(())
            }
            Payload::Remote(remote) => {
                remote
                    .link
                    .read_into(remote.remote, dst)
                    .await
                    .map_err(|source| RpcError::OneSided { source })?;
                crate::metrics::payload_moved(remote.method).one_sided(dst.len());
                Ok(())
            }
        }
    }

    /// Whether the bytes are still on the peer (moved one-sided when
    /// fetched).
    pub fn is_remote(&self) -> bool {
        matches!(self, Payload::Remote(_))
    }

    /// The bytes, when they are in local memory already (`Empty` gives an
    /// empty `Bytes`); `None` for a payload still on the peer (RDMA).
    pub fn into_bytes(self) -> Option<Bytes> {
        match self {
            Payload::Empty => Some(Bytes::new()),
            Payload::Inline(bytes) => Some(bytes),
            Payload::Remote(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fetch_into_copies_exactly_or_fails() {
        let payload = Payload::from_bytes(Bytes::from_static(b"abcdef"));
        assert_eq!(payload.len(), 6);
        let mut dst = [0u8; 6];
        payload.fetch_into(&mut dst).await.expect("same length");
        assert_eq!(&dst, b"abcdef");
        let mut short = [0u8; 5];
        assert!(matches!(
            payload.fetch_into(&mut short).await,
            Err(RpcError::PayloadLength {
                expected: 5,
                got: 6
            })
        ));
        assert_eq!(payload.into_bytes().as_deref(), Some(&b"abcdef"[..]));
    }

    #[tokio::test]
    async fn empty_payload() {
        let payload = Payload::from_bytes(Bytes::new());
        assert_eq!(payload, Payload::Empty);
        assert!(payload.is_empty());
        payload.fetch_into(&mut []).await.expect("nothing to fetch");
        assert_eq!(payload.into_bytes(), Some(Bytes::new()));
    }
}
