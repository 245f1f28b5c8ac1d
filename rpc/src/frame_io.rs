//! Frame I/O: one frame (flyfs-proto's `frame` layout) written to or read
//! from a byte stream.
//!
//! Writes are vectored writes of header, body and payload (and the
//! payload's further parts: a batched read's chunks), so a 64 MiB payload
//! is never copied into a new buffer; reads check the header against
//! the receiver's limits before anything else arrives, then put the body in
//! one allocation of exact size and the payload in a recycled aligned buffer
//! ([`crate::recv_pool`]), handing out zero-copy `Bytes`.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use flyfs_proto::frame::{
    FLAG_PAYLOAD_UNCHECKED, Frame, FrameError, FrameLimits, HEADER_LEN, Header, OutFrame,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::landing::Landing;
use crate::recv_pool::RecvBuf;

/// Writes one frame with vectored writes of header, body and payload (all
/// its parts), then flushes: a TLS stream may keep the frame's last record
/// buffered until flushed, and nothing else would flush it before the peer
/// waits for it.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: OutFrame) -> io::Result<()> {
    let mut buffers = FrameBuffers::new(frame);
    writer.write_all_buf(&mut buffers).await?;
    writer.flush().await
}

/// A frame's buffers in order as one `Buf`, so that each write takes as
/// many of them as the stream will (`chunks_vectored`), none copied.
struct FrameBuffers {
    /// Not empty, every one of them: a `Buf`'s chunk is empty only at its
    /// end.
    parts: std::collections::VecDeque<Bytes>,
    remaining: usize,
}

impl FrameBuffers {
    fn new(frame: OutFrame) -> FrameBuffers {
        let OutFrame {
            header,
            body,
            payload,
            more,
        } = frame;
        let parts: std::collections::VecDeque<Bytes> =
            [Bytes::copy_from_slice(&header), body, payload]
                .into_iter()
                .chain(more)
                .filter(|part| !part.is_empty())
                .collect();
        let remaining = parts.iter().map(Bytes::len).sum();
        FrameBuffers { parts, remaining }
    }
}

impl Buf for FrameBuffers {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |part| &part[..])
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [io::IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (slot, part) in dst.iter_mut().zip(&self.parts) {
            *slot = io::IoSlice::new(part);
            filled += 1;
        }
        filled
    }

    fn advance(&mut self, mut count: usize) {
        assert!(count <= self.remaining, "advanced past a frame's end");
        self.remaining -= count;
        while count > 0 {
            let front = self
                .parts
                .front_mut()
                .expect("bytes remain, so a part does");
            if count < front.len() {
                front.advance(count);
                return;
            }
            count -= front.len();
            self.parts.pop_front();
        }
    }
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

/// Reads the body `header` announces, then its payload into the slices
/// `landing` names for it (crate::landing): `Ok((frame, Some(checked)))`
/// with an empty payload in the frame when it landed, `checked` being the
/// frame's CRC over the body and the landed bytes (a mismatch is the
/// call's error, not the stream's: the stream is still at a frame
/// boundary, and the landing's memory is its owner's to scribble on);
/// `Ok((frame, None))` with the payload read as [`read_body`] reads it
/// when the landing declined.
pub async fn read_body_landing<R: AsyncRead + Unpin>(
    reader: &mut R,
    header: Header,
    landing: &mut dyn Landing,
) -> Result<(Frame, Option<Result<usize, FrameError>>), ReadError> {
    let body_len = header.body_len as usize;
    let payload_len = header.payload_len as usize;
    let mut body = BytesMut::zeroed(body_len);
    read_exactly(reader, &mut body, &header, 0, body_len + payload_len, None).await?;
    let body = body.freeze();
    let Some(mut segments) = landing
        .segments(&body, payload_len)
        .filter(|segments| segments.iter().map(|s| s.len()).sum::<usize>() == payload_len)
    else {
        let mut payload = RecvBuf::new(payload_len);
        read_exactly(
            reader,
            payload.as_mut_slice(),
            &header,
            body_len,
            body_len + payload_len,
            None,
        )
        .await?;
        let frame = Frame {
            header,
            body,
            payload: payload.freeze(),
        };
        return Ok((frame, None));
    };
    // The payload's CRC is folded in piece by piece as the stream hands
    // the bytes over, while they are still in the cache the copy out of
    // the stream put them in, rather than in a second pass over each
    // (megabyte-sized) segment once it is whole: that pass was a tenth of
    // the mount daemon's CPU time in 1 MiB native reads (perf).
    let checked_payload = header.flags & FLAG_PAYLOAD_UNCHECKED == 0;
    let mut crc = crc32c::crc32c(&body);
    let mut at = body_len;
    for segment in segments.iter_mut() {
        let folding = checked_payload.then_some(&mut crc);
        read_exactly(
            reader,
            segment,
            &header,
            at,
            body_len + payload_len,
            folding,
        )
        .await?;
        at += segment.len();
    }
    let computed = crc;
    let checked = if computed == header.body_crc {
        Ok(payload_len)
    } else {
        Err(FrameError::BodyChecksum {
            request_id: header.request_id,
            stored: header.body_crc,
            computed,
        })
    };
    let frame = Frame {
        header,
        body,
        payload: Bytes::new(),
    };
    Ok((frame, Some(checked)))
}

/// Fills `dst` from the stream, folding every piece read into `crc`
/// (CRC32C, as `crc32c_append`) when given; `at` and `total` place it in
/// the frame's body and payload, for the error a stream that ends early
/// gets.
async fn read_exactly<R: AsyncRead + Unpin>(
    reader: &mut R,
    dst: &mut [u8],
    header: &Header,
    at: usize,
    total: usize,
    mut crc: Option<&mut u32>,
) -> Result<(), ReadError> {
    let mut filled = 0;
    while filled < dst.len() {
        let n = reader.read(&mut dst[filled..]).await?;
        if let Some(crc) = crc.as_deref_mut() {
            *crc = crc32c::crc32c_append(*crc, &dst[filled..filled + n]);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "stream ended {} bytes into the {total} bytes of body and payload \
                     of request {}",
                    at + filled,
                    header.request_id
                ),
            )
            .into());
        }
        filled += n;
    }
    Ok(())
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

    /// A payload in parts (empty ones among them) arrives as one payload,
    /// CRC-checked, through a stream that takes a few bytes per write.
    #[tokio::test]
    async fn a_payload_in_parts_arrives_whole() {
        let (mut a, mut b) = tokio::io::duplex(7);
        let parts: Vec<Bytes> = [&b"first part, "[..], b"", b"second", b"", b", third"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        let joined = parts.concat();
        let frame = OutFrame::with_parts(
            Kind::Response,
            300,
            Status::Ok,
            8,
            0,
            Bytes::from_static(b"body"),
            Bytes::new(),
            parts,
        )
        .expect("small frame");
        let writer = tokio::spawn(async move { write_frame(&mut a, frame).await });
        let read = read_frame(&mut b, &FrameLimits::default())
            .await
            .expect("read")
            .expect("a frame");
        read.check_body().expect("crc over every part");
        assert_eq!(&read.body[..], b"body");
        assert_eq!(&read.payload[..], &joined[..]);
        writer.await.expect("writer task").expect("written");
    }

    /// Lands a payload in one buffer of exactly its length.
    struct One(Vec<u8>);

    impl Landing for One {
        fn segments(&mut self, _body: &[u8], payload_len: usize) -> Option<Vec<&mut [u8]>> {
            (payload_len == self.0.len()).then(|| vec![&mut self.0[..]])
        }

        fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
            self
        }
    }

    /// A landed payload is checked against the frame's CRC; a mismatch is
    /// that frame's error only, and the next frame reads as usual.
    #[tokio::test]
    async fn a_landed_payload_is_crc_checked_and_a_mismatch_spares_the_stream() {
        let frame = |payload: Vec<u8>| {
            OutFrame::new(
                Kind::Response,
                300,
                Status::Ok,
                7,
                Bytes::from_static(b"body"),
                Bytes::from(payload),
            )
            .expect("small frame")
        };
        let good = frame(vec![5u8; 1000]);
        let mut bad = frame(vec![5u8; 1000]);
        let mut corrupted = bad.payload.to_vec();
        corrupted[999] ^= 1;
        bad.payload = Bytes::from(corrupted);
        let mut bytes = Vec::new();
        for frame in [good, bad, frame(vec![6u8; 10])] {
            bytes.extend_from_slice(&frame.header);
            bytes.extend_from_slice(&frame.body);
            bytes.extend_from_slice(&frame.payload);
        }
        let mut reader = &bytes[..];
        let limits = FrameLimits::default();
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            let header = read_header_rest(&mut reader, [0u8; HEADER_LEN], 0, &limits)
                .await
                .expect("header");
            let mut landing = One(vec![0u8; 1000]);
            let (frame, landed) = read_body_landing(&mut reader, header, &mut landing)
                .await
                .expect("the stream reads on");
            assert_eq!(&frame.body[..], b"body");
            outcomes.push((landed, landing.0));
        }
        assert!(matches!(outcomes[0].0, Some(Ok(1000))));
        assert!(outcomes[0].1.iter().all(|b| *b == 5));
        assert!(matches!(
            outcomes[1].0,
            Some(Err(FrameError::BodyChecksum { request_id: 7, .. }))
        ));
        // Ten bytes do not fill the landing: declined, read as usual.
        assert!(outcomes[2].0.is_none());
        assert!(outcomes[2].1.iter().all(|b| *b == 0));
        assert!(reader.is_empty());
    }

    /// Lands a payload in segments of the given lengths, in order.
    struct Split(Vec<Vec<u8>>);

    impl Landing for Split {
        fn segments(&mut self, _body: &[u8], payload_len: usize) -> Option<Vec<&mut [u8]>> {
            let total: usize = self.0.iter().map(Vec::len).sum();
            (payload_len == total).then(|| self.0.iter_mut().map(|s| &mut s[..]).collect())
        }

        fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
            self
        }
    }

    /// The CRC folded in as the stream hands bytes over in small pieces
    /// that straddle the segments' boundaries is the frame's: an intact
    /// payload passes and lands byte for byte, and a flip of any byte,
    /// at a boundary or not, fails that frame.
    #[tokio::test]
    async fn a_payload_landed_piece_by_piece_is_checked_whole() {
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let lengths = [1usize, 333, 0, 500, 166];
        let flips = [None, Some(0), Some(1), Some(333), Some(834), Some(999)];
        for flip in flips {
            let mut frame = OutFrame::new(
                Kind::Response,
                300,
                Status::Ok,
                9,
                Bytes::from_static(b"body"),
                Bytes::from(payload.clone()),
            )
            .expect("small frame");
            if let Some(at) = flip {
                let mut corrupted = payload.clone();
                corrupted[at] ^= 0x10;
                frame.payload = Bytes::from(corrupted);
            }
            // A 7-byte pipe: every read returns at most 7 bytes.
            let (mut a, mut b) = tokio::io::duplex(7);
            let writer = tokio::spawn(async move { write_frame(&mut a, frame).await });
            let header = read_header_rest(&mut b, [0u8; HEADER_LEN], 0, &FrameLimits::default())
                .await
                .expect("header");
            let mut landing = Split(lengths.iter().map(|&n| vec![0u8; n]).collect());
            let (_, landed) = read_body_landing(&mut b, header, &mut landing)
                .await
                .expect("the stream reads on");
            writer.await.expect("writer task").expect("write");
            let landed_bytes: Vec<u8> = landing.0.concat();
            match flip {
                None => {
                    assert!(matches!(landed, Some(Ok(1000))), "{landed:?}");
                    assert_eq!(landed_bytes, payload);
                }
                Some(at) => assert!(
                    matches!(
                        landed,
                        Some(Err(FrameError::BodyChecksum { request_id: 9, .. }))
                    ),
                    "a flip at {at} passed: {landed:?}"
                ),
            }
        }
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
