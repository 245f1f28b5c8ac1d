//! Frame I/O: one frame (flyfs-proto's `frame` layout) written to or read
//! from a byte stream.
//!
//! Writes are one vectored write of header, body and payload, so a 64 MiB
//! payload is never copied into a new buffer; reads check the header against
//! the receiver's limits before anything else arrives, then put the body in
//! one allocation of exact size and the payload in a recycled aligned buffer
//! ([`crate::recv_pool`]), handing out zero-copy `Bytes`.

use std::io;

use bytes::{Buf, BytesMut};
use flyfs_proto::frame::{Frame, FrameError, FrameLimits, HEADER_LEN, Header, OutFrame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::recv_pool::RecvBuf;

/// Writes one frame with vectored writes of header, body and payload, then
/// flushes: a TLS stream may keep the frame's last record buffered until
/// flushed, and nothing else would flush it before the peer waits for it.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: OutFrame) -> io::Result<()> {
    let mut chain = Buf::chain(Buf::chain(&frame.header[..], frame.body), frame.payload);
    writer.write_all_buf(&mut chain).await?;
    writer.flush().await
}

/// Reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one frame: `Ok(None)` on a clean end of stream before a header. The
/// header is checked against `limits` before body and payload are read, the
/// payload into an aligned buffer of its own. Not cancel-safe: a frame half read when
/// the future is dropped is lost, and the stream with it, so callers read
/// from a task of their own. A server reads in steps instead
/// ([`read_header_rest`], [`read_body`]), to put deadlines and budgets
/// between them.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: &FrameLimits,
) -> Result<Option<Frame>, ReadError> {
    let mut header_bytes = [0u8; HEADER_LEN];
    if reader.read(&mut header_bytes[..1]).await? == 0 {
        return Ok(None);
    }
    let header = read_header_rest(reader, header_bytes, 1, limits).await?;
    read_body(reader, header).await.map(Some)
}

/// Reads the rest of a header whose first `filled` bytes are in `bytes`, and
/// checks it against `limits`.
pub async fn read_header_rest<R: AsyncRead + Unpin>(
    reader: &mut R,
    mut bytes: [u8; HEADER_LEN],
    mut filled: usize,
    limits: &FrameLimits,
) -> Result<Header, ReadError> {
    while filled < HEADER_LEN {
        let n = reader.read(&mut bytes[filled..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream ended {filled} bytes into a {HEADER_LEN}-byte frame header"),
            )
            .into());
        }
        filled += n;
    }
    Ok(Header::decode(&bytes, limits)?)
}

/// Reads the body and payload `header` announces: the body into one
/// allocation of exact size, the payload into a recycled aligned buffer.
pub async fn read_body<R: AsyncRead + Unpin>(
    reader: &mut R,
    header: Header,
) -> Result<Frame, ReadError> {
    let body_len = header.body_len as usize;
    let payload_len = header.payload_len as usize;
    let total = body_len + payload_len;
    let mut body = BytesMut::zeroed(body_len);
    // The payload goes to an aligned, recycled buffer (see `recv_pool`).
    let mut payload = RecvBuf::new(payload_len);
    let mut filled = 0;
    while filled < total {
        let dst = if filled < body_len {
            &mut body[filled..]
        } else {
            &mut payload.as_mut_slice()[filled - body_len..]
        };
        let n = reader.read(dst).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "stream ended {filled} bytes into the {total} bytes of body and payload \
                     of request {}",
                    header.request_id
                ),
            )
            .into());
        }
        filled += n;
    }
    let body = body.freeze();
    let payload = payload.freeze();
    Ok(Frame {
        header,
        body,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use flyfs_proto::frame::{Kind, Status};

    use super::*;

    #[tokio::test]
    async fn frames_round_trip_through_a_stream() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let frame = OutFrame::new(
            Kind::Request,
            300,
            Status::Ok,
            7,
            Bytes::from_static(b"body"),
            Bytes::from(vec![9u8; 1000]),
        )
        .expect("small frame");
        let writer = tokio::spawn(async move {
            write_frame(&mut a, frame.clone()).await.expect("write 1");
            write_frame(&mut a, frame).await.expect("write 2");
        });
        for _ in 0..2 {
            let read = read_frame(&mut b, &FrameLimits::default())
                .await
                .expect("read")
                .expect("a frame");
            read.check_body().expect("crc");
            assert_eq!(&read.body[..], b"body");
            assert_eq!(read.payload.len(), 1000);
            assert_eq!(read.header.request_id, 7);
        }
        writer.await.expect("writer task");
        assert!(
            read_frame(&mut b, &FrameLimits::default())
                .await
                .expect("eof")
                .is_none()
        );
    }

    #[tokio::test]
    async fn truncated_frames_are_errors() {
        let frame = OutFrame::new(
            Kind::Request,
            300,
            Status::Ok,
            7,
            Bytes::from_static(b"body"),
            Bytes::new(),
        )
        .expect("small frame");
        let mut bytes = frame.header.to_vec();
        bytes.extend_from_slice(&frame.body[..2]);
        for cut in [10, bytes.len()] {
            let mut reader = &bytes[..cut];
            let error = read_frame(&mut reader, &FrameLimits::default())
                .await
                .expect_err("truncated");
            assert!(
                matches!(error, ReadError::Io(ref e) if e.kind() == io::ErrorKind::UnexpectedEof)
            );
        }
    }
}
