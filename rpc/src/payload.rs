//! The RDMA seam: bulk data travels beside the message, never inside it.
//!
//! A request or reply carries its bulk bytes (chunk data) as a frame payload,
//! never in the encoded message: encoding would copy it, and an RDMA transport
//! must be able to move it without the CPU. Services see only [`Payload`] and
//! its four methods, so they never learn which transport is underneath.
//!
//! # How an RDMA transport implements the same contract
//!
//! A future variant `Remote(RemoteBuffer)` would describe memory the *client*
//! registered with its NIC: address, rkey, length (and the queue pair to use).
//! An RDMA client puts that descriptor in the request instead of the bytes:
//! * For a write, the server's `fetch_into(dst)` issues a one-sided RDMA READ
//!   from the client's buffer into `dst` (a registered `DmaBuf` the chunk
//!   engine will write to the device) and resolves when the READ completes.
//!   No client CPU is involved, and `dst` is filled exactly as the TCP path
//!   fills it by copying from the inline bytes.
//! * For a read, the service returns its reply payload as `Bytes` built over a
//!   registered buffer (`Bytes::from_owner(dma_buf)`); the RDMA server pushes
//!   it into the client's buffer with RDMA WRITE before sending the small
//!   reply frame, and the client sees the data already in its buffer.
//!
//! `into_bytes` returns `None` for a remote payload: code that needs the bytes
//! in memory (rare, e.g. small metadata payloads) must use `fetch_into`.

use bytes::Bytes;

use crate::error::RpcError;

/// Bulk bytes that came with a request or a reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Payload {
    #[default]
    Empty,
    /// The bytes arrived in the frame (TCP): a zero-copy slice of the buffer
    /// the frame was read into.
    Inline(Bytes),
    // Future: `Remote(RemoteBuffer)`, a registered buffer on the peer
    // (address, rkey, length) that `fetch_into` reads with RDMA READ. See the
    // file comment.
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
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `dst` with the payload; `dst` must be exactly `len()` bytes, so a
    /// service that sized its buffer from a length in the request learns when
    /// the client sent something else. Over TCP this copies from the inline
    /// bytes; over RDMA it would be a one-sided READ into `dst`.
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
        }
    }

    /// The bytes, when they are in local memory already (`Empty` gives an
    /// empty `Bytes`); `None` for a payload still on the peer (RDMA).
    pub fn into_bytes(self) -> Option<Bytes> {
        match self {
            Payload::Empty => Some(Bytes::new()),
            Payload::Inline(bytes) => Some(bytes),
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
