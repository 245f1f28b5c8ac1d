//! Framing: how one request or response travels on a byte stream.
//!
//! A frame is a fixed 36-byte little-endian header, then `body` (one message
//! encoded by `codec.rs`), then `payload` (bulk bytes, never encoded). The
//! layout is drawn in docs/rpc-wire-format.md. The header says how long the
//! other two parts are, so a reader reads exactly one frame and never more; it
//! carries two CRC32C: one over the header itself (so lengths and ids are
//! trusted before they are acted on) and one over body then payload.
//!
//! Writes are one vectored write of header, body and payload, so a 64 MiB
//! payload is never copied into a new buffer; reads put body and payload in
//! one allocation of exact size and hand out zero-copy `Bytes` slices of it.
//!
//! Every decoder here returns a `Result`; none panics on any input, which
//! [`fuzz_decode`] (run by a fuzz target and a stable proptest) checks.

use std::fmt;

use bytes::Bytes;

/// `b"FLYF"` read as a little-endian u32: the first four bytes on the wire
/// spell "FLYF".
pub const MAGIC: u32 = u32::from_le_bytes(*b"FLYF");
/// The only header layout this build speaks.
pub const VERSION: u8 = 1;
/// Bytes in a version-1 header.
pub const HEADER_LEN: usize = 36;

// Field offsets, in wire order.
const OFFSET_MAGIC: usize = 0;
const OFFSET_VERSION: usize = 4;
const OFFSET_KIND: usize = 5;
const OFFSET_FLAGS: usize = 6;
const OFFSET_METHOD: usize = 8;
const OFFSET_STATUS: usize = 10;
const OFFSET_REQUEST_ID: usize = 12;
const OFFSET_BODY_LEN: usize = 20;
const OFFSET_PAYLOAD_LEN: usize = 24;
const OFFSET_BODY_CRC: usize = 28;
const OFFSET_HEADER_CRC: usize = 32;
const _: () = assert!(OFFSET_HEADER_CRC + 4 == HEADER_LEN);

/// Whether a frame asks or answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Request = 0,
    Response = 1,
}

/// The outcome of a request, carried in a response header. Non-`Ok` responses
/// carry a UTF-8 message in the body instead of a response message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Ok,
    /// No handler for the method id.
    UnknownMethod,
    /// The request body failed to decode as the method's request type.
    BadRequest,
    /// The body/payload CRC did not match.
    ChecksumMismatch,
    /// The body or payload was over the receiver's limit.
    TooLarge,
    /// The handler failed (or panicked).
    Internal,
    /// The server is shutting down or overloaded; try again later.
    Unavailable,
    /// The connection is not authenticated (a plaintext client, or no valid
    /// certificate): the server accepts only mutual TLS with the cluster CA.
    Unauthenticated,
    /// The caller's role may not call this method.
    Forbidden,
    /// A code this build does not know (a newer peer sent it).
    Unknown(u16),
}

impl Status {
    pub const fn from_u16(code: u16) -> Status {
        match code {
            0 => Status::Ok,
            1 => Status::UnknownMethod,
            2 => Status::BadRequest,
            3 => Status::ChecksumMismatch,
            4 => Status::TooLarge,
            5 => Status::Internal,
            6 => Status::Unavailable,
            7 => Status::Unauthenticated,
            8 => Status::Forbidden,
            other => Status::Unknown(other),
        }
    }

    pub const fn to_u16(self) -> u16 {
        match self {
            Status::Ok => 0,
            Status::UnknownMethod => 1,
            Status::BadRequest => 2,
            Status::ChecksumMismatch => 3,
            Status::TooLarge => 4,
            Status::Internal => 5,
            Status::Unavailable => 6,
            Status::Unauthenticated => 7,
            Status::Forbidden => 8,
            Status::Unknown(code) => code,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Unknown(code) => write!(f, "unknown status {code}"),
            known => write!(f, "{known:?}"),
        }
    }
}

/// How large a frame a receiver accepts. Checked on the header, before any
/// memory is allocated for body or payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    pub body_bytes_max: u32,
    pub payload_bytes_max: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits {
            body_bytes_max: 1 << 20,
            // A 64 MiB chunk plus room for whatever travels with it.
            payload_bytes_max: (64 << 20) + (64 << 10),
        }
    }
}

/// A frame's bytes were wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {found:#010x} (expected {MAGIC:#010x}, b\"FLYF\")")]
    BadMagic { found: u32 },
    #[error("unsupported frame version {found} (this build speaks {VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("frame header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("bad frame kind {found} (0 = request, 1 = response)")]
    BadKind { found: u8 },
    #[error("expected a {expected:?} frame, got a {found:?} frame (request {request_id})")]
    UnexpectedKind {
        expected: Kind,
        found: Kind,
        request_id: u64,
    },
    #[error("frame body of {len} bytes is over the limit of {max} (request {request_id})")]
    BodyTooLarge { request_id: u64, len: u64, max: u32 },
    #[error("frame payload of {len} bytes is over the limit of {max} (request {request_id})")]
    PayloadTooLarge { request_id: u64, len: u64, max: u32 },
    #[error(
        "frame body checksum mismatch: stored {stored:#010x}, computed {computed:#010x} \
         (request {request_id})"
    )]
    BodyChecksum {
        request_id: u64,
        stored: u32,
        computed: u32,
    },
}

impl FrameError {
    /// The request id of the frame the error is about, when the header was
    /// trusted far enough to know it.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            FrameError::BodyTooLarge { request_id, .. }
            | FrameError::PayloadTooLarge { request_id, .. }
            | FrameError::BodyChecksum { request_id, .. }
            | FrameError::UnexpectedKind { request_id, .. } => Some(*request_id),
            _ => None,
        }
    }

    /// The status a server answers this error with.
    pub fn status(&self) -> Status {
        match self {
            FrameError::BodyTooLarge { .. } | FrameError::PayloadTooLarge { .. } => {
                Status::TooLarge
            }
            FrameError::BodyChecksum { .. } | FrameError::HeaderChecksum { .. } => {
                Status::ChecksumMismatch
            }
            _ => Status::BadRequest,
        }
    }
}

/// A decoded, checked header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// No flag is defined in version 1; senders write 0 and receivers ignore
    /// the field, so a later flag may only be a hint an old peer can ignore.
    pub flags: u16,
    pub method: u16,
    pub status: Status,
    pub request_id: u64,
    pub body_len: u32,
    pub payload_len: u32,
    pub body_crc: u32,
}

impl Header {
    /// The header's wire bytes, header CRC included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[OFFSET_MAGIC..][..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[OFFSET_VERSION] = VERSION;
        out[OFFSET_KIND] = self.kind as u8;
        out[OFFSET_FLAGS..][..2].copy_from_slice(&self.flags.to_le_bytes());
        out[OFFSET_METHOD..][..2].copy_from_slice(&self.method.to_le_bytes());
        out[OFFSET_STATUS..][..2].copy_from_slice(&self.status.to_u16().to_le_bytes());
        out[OFFSET_REQUEST_ID..][..8].copy_from_slice(&self.request_id.to_le_bytes());
        out[OFFSET_BODY_LEN..][..4].copy_from_slice(&self.body_len.to_le_bytes());
        out[OFFSET_PAYLOAD_LEN..][..4].copy_from_slice(&self.payload_len.to_le_bytes());
        out[OFFSET_BODY_CRC..][..4].copy_from_slice(&self.body_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&out[..OFFSET_HEADER_CRC]);
        out[OFFSET_HEADER_CRC..][..4].copy_from_slice(&header_crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header: magic, then version (a later version may
    /// lay the rest out differently, so nothing after it is read first), then
    /// the header CRC (so no field is trusted before it), then kind and
    /// limits. Each failure is its own [`FrameError`] with the values seen.
    pub fn decode(bytes: &[u8; HEADER_LEN], limits: &FrameLimits) -> Result<Header, FrameError> {
        let magic = read_u32(bytes, OFFSET_MAGIC);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = bytes[OFFSET_VERSION];
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        let stored = read_u32(bytes, OFFSET_HEADER_CRC);
        let computed = crc32c::crc32c(&bytes[..OFFSET_HEADER_CRC]);
        if stored != computed {
            return Err(FrameError::HeaderChecksum { stored, computed });
        }
        let kind = match bytes[OFFSET_KIND] {
            0 => Kind::Request,
            1 => Kind::Response,
            found => return Err(FrameError::BadKind { found }),
        };
        let header = Header {
            kind,
            flags: read_u16(bytes, OFFSET_FLAGS),
            method: read_u16(bytes, OFFSET_METHOD),
            status: Status::from_u16(read_u16(bytes, OFFSET_STATUS)),
            request_id: read_u64(bytes, OFFSET_REQUEST_ID),
            body_len: read_u32(bytes, OFFSET_BODY_LEN),
            payload_len: read_u32(bytes, OFFSET_PAYLOAD_LEN),
            body_crc: read_u32(bytes, OFFSET_BODY_CRC),
        };
        if header.body_len > limits.body_bytes_max {
            return Err(FrameError::BodyTooLarge {
                request_id: header.request_id,
                len: header.body_len.into(),
                max: limits.body_bytes_max,
            });
        }
        if header.payload_len > limits.payload_bytes_max {
            return Err(FrameError::PayloadTooLarge {
                request_id: header.request_id,
                len: header.payload_len.into(),
                max: limits.payload_bytes_max,
            });
        }
        Ok(header)
    }

    /// Checks the body CRC against the bytes read after this header.
    pub fn check_body(&self, body: &[u8], payload: &[u8]) -> Result<(), FrameError> {
        let computed = frame_crc(self.flags, body, payload, &[]);
        if computed == self.body_crc {
            Ok(())
        } else {
            Err(FrameError::BodyChecksum {
                request_id: self.request_id,
                stored: self.body_crc,
                computed,
            })
        }
    }
}

/// Header flag: the body CRC covers the body only, because the payload
/// carries an end-to-end checksum the service verifies itself.
pub const FLAG_PAYLOAD_UNCHECKED: u16 = 1;

/// Header flag (RDMA transport only): the payload is not the bytes but a
/// 16-byte descriptor of the sender's registered buffer holding them
/// (address u64, rkey u32, length u32, little-endian), which the receiver
/// pulls with a one-sided RDMA READ (docs/rdma-transport.md).
pub const FLAG_PAYLOAD_REMOTE: u16 = 2;

/// Bytes of one remote buffer descriptor.
pub const REMOTE_DESCRIPTOR_BYTES: usize = 16;

/// Header flag (RDMA transport only, requests): the last 16 bytes of the
/// payload describe a registered buffer of the client (a descriptor as
/// above) into which the server may RDMA WRITE the reply's payload, if it
/// fits; what comes before them is the request's own payload (empty, or a
/// descriptor under [`FLAG_PAYLOAD_REMOTE`]).
pub const FLAG_REPLY_SINK: u16 = 4;

/// Header flag (RDMA transport only, replies): the reply's payload was
/// RDMA WRITten into the buffer the request named with
/// [`FLAG_REPLY_SINK`], from its first byte; the frame's payload is the
/// 4-byte little-endian count of bytes written, not the bytes.
pub const FLAG_PAYLOAD_WRITTEN: u16 = 8;

/// Bytes of the count a [`FLAG_PAYLOAD_WRITTEN`] reply carries.
pub const WRITTEN_COUNT_BYTES: usize = 4;

/// Header flag (RDMA transport only, requests, with [`FLAG_REPLY_SINK`]):
/// the request names one buffer per part of the reply instead of one for
/// all of it. The payload ends with N descriptors (as above) and then N as
/// a 4-byte little-endian count; the server writes part `i` of its reply
/// (a batched read's item `i`, empty for an item without bytes) into
/// buffer `i` from its first byte, only when there are exactly N parts and
/// each fits its buffer, else the reply travels inline. A
/// [`FLAG_PAYLOAD_WRITTEN`] reply's count is then the parts' total.
pub const FLAG_REPLY_SCATTER: u16 = 16;

/// The most buffers a [`FLAG_REPLY_SCATTER`] request may name (a batched
/// read's most items).
pub const REPLY_BUFFERS_MAX: usize = 4096;

/// Bytes of the buffer count ending a [`FLAG_REPLY_SCATTER`] request's
/// payload.
pub const REPLY_BUFFER_COUNT_BYTES: usize = 4;

/// CRC32C over body bytes then payload bytes (body only under
/// [`FLAG_PAYLOAD_UNCHECKED`]).
pub fn body_crc(body: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(body), payload)
}

/// The header's CRC of a frame whose payload is `payload` followed by
/// `more`.
fn frame_crc(flags: u16, body: &[u8], payload: &[u8], more: &[Bytes]) -> u32 {
    if flags & FLAG_PAYLOAD_UNCHECKED != 0 {
        crc32c::crc32c(body)
    } else {
        more.iter().fold(body_crc(body, payload), |crc, part| {
            crc32c::crc32c_append(crc, part)
        })
    }
}

fn read_u16(bytes: &[u8; HEADER_LEN], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

fn read_u32(bytes: &[u8; HEADER_LEN], offset: usize) -> u32 {
    let mut out = [0u8; 4];
    out.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(out)
}

fn read_u64(bytes: &[u8; HEADER_LEN], offset: usize) -> u64 {
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(out)
}

/// A frame read from the wire. `body` and `payload` are slices of one buffer.
/// The body CRC has *not* been checked yet ([`Frame::check_body`]): a server
/// answers a mismatch for that one request and keeps the connection.
#[derive(Clone, Debug)]
pub struct Frame {
    pub header: Header,
    pub body: Bytes,
    pub payload: Bytes,
}

impl Frame {
    pub fn check_body(&self) -> Result<(), FrameError> {
        self.header.check_body(&self.body, &self.payload)
    }
}

/// A frame ready to be written: header bytes (CRCs computed) and the
/// buffers it describes, shared rather than copied.
#[derive(Clone, Debug)]
pub struct OutFrame {
    pub header: [u8; HEADER_LEN],
    pub body: Bytes,
    pub payload: Bytes,
    /// More of the payload, after `payload`, each written as it is (a
    /// batched read's chunks, never joined): the header's payload length
    /// and CRC cover them.
    pub more: Vec<Bytes>,
}

impl OutFrame {
    /// Builds a frame, computing both CRCs. Fails only when a part is over
    /// what the header's u32 length fields can say.
    pub fn new(
        kind: Kind,
        method: u16,
        status: Status,
        request_id: u64,
        body: Bytes,
        payload: Bytes,
    ) -> Result<OutFrame, FrameError> {
        OutFrame::with_flags(kind, method, status, request_id, 0, body, payload)
    }

    /// [`OutFrame::new`] with header flags ([`FLAG_PAYLOAD_UNCHECKED`]).
    pub fn with_flags(
        kind: Kind,
        method: u16,
        status: Status,
        request_id: u64,
        flags: u16,
        body: Bytes,
        payload: Bytes,
    ) -> Result<OutFrame, FrameError> {
        OutFrame::with_parts(
            kind,
            method,
            status,
            request_id,
            flags,
            body,
            payload,
            Vec::new(),
        )
    }

    /// [`OutFrame::with_flags`] whose payload is `payload` then `more`,
    /// each part kept as it is.
    #[allow(clippy::too_many_arguments)]
    pub fn with_parts(
        kind: Kind,
        method: u16,
        status: Status,
        request_id: u64,
        flags: u16,
        body: Bytes,
        payload: Bytes,
        more: Vec<Bytes>,
    ) -> Result<OutFrame, FrameError> {
        let body_len = u32::try_from(body.len()).map_err(|_| FrameError::BodyTooLarge {
            request_id,
            len: body.len() as u64,
            max: u32::MAX,
        })?;
        let total = payload.len() as u64 + more.iter().map(|part| part.len() as u64).sum::<u64>();
        let payload_len = u32::try_from(total).map_err(|_| FrameError::PayloadTooLarge {
            request_id,
            len: total,
            max: u32::MAX,
        })?;
        let header = Header {
            kind,
            flags,
            method,
            status,
            request_id,
            body_len,
            payload_len,
            body_crc: frame_crc(flags, &body, &payload, &more),
        };
        Ok(OutFrame {
            header: header.encode(),
            body,
            payload,
            more,
        })
    }

    /// An error response: `status` and a UTF-8 message as the body. The
    /// message is cut to 4 KiB (at a character boundary) so that it always
    /// fits a peer's body limit.
    pub fn error(method: u16, request_id: u64, status: Status, message: &str) -> OutFrame {
        let body = Bytes::copy_from_slice(truncate_utf8(message, 4096).as_bytes());
        OutFrame::new(
            Kind::Response,
            method,
            status,
            request_id,
            body,
            Bytes::new(),
        )
        .expect("a 4 KiB body and an empty payload fit the u32 length fields")
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Feeds arbitrary bytes through every decoder a receiver runs on them:
/// header decode, body CRC check, and codec decode of a sample message. Must
/// never panic; the `rpc_frame` fuzz target and a stable proptest run it.
pub fn fuzz_decode(data: &[u8]) {
    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default)]
    #[allow(dead_code)] // Only decoded, never read: decoding is what is tested.
    struct Sample {
        chain: crate::ids::ChainId,
        chunk: crate::ids::ChunkId,
        offset: u32,
        names: Vec<String>,
        nested: Option<Box<Sample>>,
        blob: Vec<u8>,
    }

    // The whole input as a message, too: bodies are where hostile peers have
    // the most room.
    let _ = crate::codec::decode::<Sample>(data);
    crate::wire::fuzz_decode_messages(0, data);
    let Some((header_bytes, rest)) = data.split_first_chunk::<HEADER_LEN>() else {
        return;
    };
    let limits = FrameLimits {
        body_bytes_max: 1 << 16,
        payload_bytes_max: 1 << 16,
    };
    let Ok(header) = Header::decode(header_bytes, &limits) else {
        return;
    };
    // Round trip: a header that decodes re-encodes to the same bytes, except
    // for the status code, which is canonical after decoding too.
    assert_eq!(
        &header.encode(),
        header_bytes,
        "decoded header re-encodes identically"
    );
    let body_len = (header.body_len as usize).min(rest.len());
    let (body, rest) = rest.split_at(body_len);
    let payload_len = (header.payload_len as usize).min(rest.len());
    let payload = &rest[..payload_len];
    if header.check_body(body, payload).is_ok() && header.status == Status::Ok {
        let _ = crate::codec::decode::<Sample>(body);
        crate::wire::fuzz_decode_messages(header.method, body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchecked_payload_flag_leaves_the_payload_out_of_the_crc() {
        let body = Bytes::from_static(b"body");
        let payload = Bytes::from_static(b"payload bytes");
        for (flags, payload_counted) in [(0, true), (FLAG_PAYLOAD_UNCHECKED, false)] {
            let frame = OutFrame::with_flags(
                Kind::Request,
                400,
                Status::Ok,
                9,
                flags,
                body.clone(),
                payload.clone(),
            )
            .expect("frame");
            let header = Header::decode(&frame.header, &FrameLimits::default()).expect("header");
            assert_eq!(header.flags, flags);
            assert!(header.check_body(&body, &payload).is_ok());
            let damaged = header.check_body(&body, b"payload bytez");
            assert_eq!(damaged.is_err(), payload_counted, "flags {flags}");
            assert!(
                header.check_body(b"bodz", &payload).is_err(),
                "the body is always checked"
            );
        }
    }

    #[test]
    fn a_payload_in_parts_is_framed_as_the_parts_joined() {
        let body = Bytes::from_static(b"body");
        let parts = [&b"first "[..], b"", b"second", b" third"].map(Bytes::from_static);
        let joined: Vec<u8> = parts.concat();
        for flags in [0, FLAG_PAYLOAD_UNCHECKED] {
            let whole = OutFrame::with_flags(
                Kind::Response,
                400,
                Status::Ok,
                9,
                flags,
                body.clone(),
                Bytes::from(joined.clone()),
            )
            .expect("frame");
            let split = OutFrame::with_parts(
                Kind::Response,
                400,
                Status::Ok,
                9,
                flags,
                body.clone(),
                parts[0].clone(),
                parts[1..].to_vec(),
            )
            .expect("frame");
            assert_eq!(split.header, whole.header, "flags {flags}");
            let header = Header::decode(&split.header, &FrameLimits::default()).expect("header");
            assert_eq!(header.payload_len as usize, joined.len());
            assert!(header.check_body(&body, &joined).is_ok());
        }
    }

    fn sample_header() -> Header {
        Header {
            kind: Kind::Request,
            flags: 0,
            method: 300,
            status: Status::Ok,
            request_id: 0x0102_0304_0506_0708,
            body_len: 5,
            payload_len: 7,
            body_crc: body_crc(b"hello", b"payload"),
        }
    }

    #[test]
    fn header_round_trips_and_starts_with_magic() {
        let header = sample_header();
        let bytes = header.encode();
        assert_eq!(&bytes[..4], b"FLYF");
        assert_eq!(bytes[4], VERSION);
        assert_eq!(&bytes[12..20], &0x0102_0304_0506_0708u64.to_le_bytes());
        let decoded = Header::decode(&bytes, &FrameLimits::default()).expect("valid header");
        assert_eq!(decoded, header);
        decoded
            .check_body(b"hello", b"payload")
            .expect("crc over body then payload");
        assert!(matches!(
            decoded.check_body(b"hellp", b"payload"),
            Err(FrameError::BodyChecksum {
                request_id: 0x0102_0304_0506_0708,
                ..
            })
        ));
    }

    #[test]
    fn each_header_failure_has_its_own_error() {
        let limits = FrameLimits::default();
        let good = sample_header().encode();

        let mut bytes = good;
        bytes[0] = b'X';
        assert!(matches!(
            Header::decode(&bytes, &limits),
            Err(FrameError::BadMagic { .. })
        ));

        let mut bytes = good;
        bytes[4] = 2;
        assert_eq!(
            Header::decode(&bytes, &limits),
            Err(FrameError::UnsupportedVersion { found: 2 })
        );

        let mut bytes = good;
        bytes[20] ^= 1;
        assert!(matches!(
            Header::decode(&bytes, &limits),
            Err(FrameError::HeaderChecksum { .. })
        ));

        let mut header = sample_header();
        header.body_len = 2 << 20;
        assert!(matches!(
            Header::decode(&header.encode(), &limits),
            Err(FrameError::BodyTooLarge { len: 2097152, .. })
        ));
        let mut header = sample_header();
        header.payload_len = u32::MAX;
        assert!(matches!(
            Header::decode(&header.encode(), &limits),
            Err(FrameError::PayloadTooLarge { .. })
        ));

        // A bad kind with a valid header CRC.
        let mut bytes = good;
        bytes[5] = 9;
        let crc = crc32c::crc32c(&bytes[..32]);
        bytes[32..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Header::decode(&bytes, &limits),
            Err(FrameError::BadKind { found: 9 })
        );
    }

    #[test]
    fn unknown_status_codes_survive() {
        for code in [0u16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 999, u16::MAX] {
            assert_eq!(Status::from_u16(code).to_u16(), code);
        }
        assert_eq!(Status::from_u16(999), Status::Unknown(999));
        assert_eq!(Status::from_u16(4), Status::TooLarge);
        assert_eq!(Status::from_u16(7), Status::Unauthenticated);
        assert_eq!(Status::from_u16(8), Status::Forbidden);
    }

    #[test]
    fn error_messages_are_cut_at_a_char_boundary() {
        let long = "é".repeat(5000);
        let frame = OutFrame::error(1, 2, Status::Internal, &long);
        assert!(frame.body.len() <= 4096);
        assert!(std::str::from_utf8(&frame.body).is_ok());
    }
}
