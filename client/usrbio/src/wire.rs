//! The registration messages on the mount daemon's socket
//! (docs/native-io.md, "The socket"): fixed little-endian requests and
//! replies, encoded and decoded here for both sides, and the per-connection
//! limits both sides know.
//!
//! Decoding never panics: a datagram of the wrong length, magic or version,
//! an unknown op, nonzero flags or reserved bytes is a [`WireError`] naming
//! the field.

use thiserror::Error;

/// `FNIO` in memory (little-endian).
pub const MAGIC: u32 = u32::from_le_bytes(*b"FNIO");
/// The protocol version this crate speaks (docs/native-io.md, version log).
pub const VERSION: u16 = 1;
pub const REQUEST_BYTES: usize = 32;
pub const REPLY_HEADER_BYTES: usize = 32;
/// The longest reply message; longer ones are cut at a character boundary.
pub const MESSAGE_BYTES_MAX: usize = 1024;

/// Per-connection limits (docs/native-io.md, "Limits").
pub const IOV_BYTES_MAX: u64 = 64 << 30;
pub const IOVS_MAX: usize = 64;
pub const RINGS_MAX: usize = 256;
pub const FILES_MAX: usize = 16384;
/// The smallest iov or ring region accepted.
pub const REGION_BYTES_MIN: u64 = 4096;
/// The most bytes one request may move.
pub const IO_BYTES_MAX: u32 = 64 << 20;
/// Bytes of requests in flight per connection before further ones wait.
pub const IN_FLIGHT_BYTES_MAX: u64 = 1 << 30;
/// Connections the daemon serves at once.
pub const CONNECTIONS_MAX: usize = 1024;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    RegisterIov = 1,
    RegisterRing = 2,
    RegisterFile = 3,
    DeregisterIov = 4,
    DeregisterRing = 5,
    DeregisterFile = 6,
}

impl Op {
    pub fn from_u16(value: u16) -> Option<Op> {
        Some(match value {
            1 => Op::RegisterIov,
            2 => Op::RegisterRing,
            3 => Op::RegisterFile,
            4 => Op::DeregisterIov,
            5 => Op::DeregisterRing,
            6 => Op::DeregisterFile,
            _ => return None,
        })
    }

    /// How many descriptors a request of this op carries.
    pub fn fds(self) -> usize {
        match self {
            Op::RegisterIov | Op::RegisterFile => 1,
            Op::RegisterRing => 3,
            Op::DeregisterIov | Op::DeregisterRing | Op::DeregisterFile => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::RegisterIov => "register_iov",
            Op::RegisterRing => "register_ring",
            Op::RegisterFile => "register_file",
            Op::DeregisterIov => "deregister_iov",
            Op::DeregisterRing => "deregister_ring",
            Op::DeregisterFile => "deregister_file",
        }
    }
}

/// A malformed message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("a {what} is {expected} bytes, this datagram has {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("bad magic {0:#010x} (expected {MAGIC:#010x}: not a flyfs native I/O message)")]
    Magic(u32),
    #[error("protocol version {0}; this side speaks version {VERSION}")]
    Version(u16),
    #[error("unknown op {0}")]
    Op(u16),
    #[error("field `{0}` must be 0")]
    Reserved(&'static str),
}

/// One request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// The registration a deregistration names; 0 otherwise.
    pub id: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut out = [0u8; REQUEST_BYTES];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&(self.op as u16).to_le_bytes());
        out[8..12].copy_from_slice(&self.id.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Request, WireError> {
        if bytes.len() != REQUEST_BYTES {
            return Err(WireError::Length {
                what: "request",
                expected: REQUEST_BYTES,
                got: bytes.len(),
            });
        }
        check_header(bytes)?;
        let op = u16_at(bytes, 6);
        let op = Op::from_u16(op).ok_or(WireError::Op(op))?;
        if u32_at(bytes, 12) != 0 {
            return Err(WireError::Reserved("flags"));
        }
        if bytes[16..32].iter().any(|&b| b != 0) {
            return Err(WireError::Reserved("reserved"));
        }
        Ok(Request {
            op,
            id: u32_at(bytes, 8),
        })
    }
}

/// One reply: success with an id and a value, or an errno with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// 0, or an errno.
    pub status: u16,
    pub id: u32,
    pub value: u64,
    pub message: String,
}

impl Reply {
    pub fn ok(id: u32, value: u64) -> Reply {
        Reply {
            status: 0,
            id,
            value,
            message: String::new(),
        }
    }

    pub fn error(errno: i32, message: impl Into<String>) -> Reply {
        let mut message = message.into();
        if message.len() > MESSAGE_BYTES_MAX {
            let mut end = MESSAGE_BYTES_MAX;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Reply {
            status: errno.clamp(1, u16::MAX as i32) as u16,
            id: 0,
            value: 0,
            message,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; REPLY_HEADER_BYTES];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&self.status.to_le_bytes());
        out[8..12].copy_from_slice(&self.id.to_le_bytes());
        out[16..24].copy_from_slice(&self.value.to_le_bytes());
        let message = self.message.as_bytes();
        out.extend_from_slice(&message[..message.len().min(MESSAGE_BYTES_MAX)]);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Reply, WireError> {
        if bytes.len() < REPLY_HEADER_BYTES || bytes.len() > REPLY_HEADER_BYTES + MESSAGE_BYTES_MAX
        {
            return Err(WireError::Length {
                what: "reply",
                expected: REPLY_HEADER_BYTES,
                got: bytes.len(),
            });
        }
        check_header(bytes)?;
        if u32_at(bytes, 12) != 0 || bytes[24..32].iter().any(|&b| b != 0) {
            return Err(WireError::Reserved("reserved"));
        }
        Ok(Reply {
            status: u16_at(bytes, 6),
            id: u32_at(bytes, 8),
            value: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
            message: String::from_utf8_lossy(&bytes[REPLY_HEADER_BYTES..]).into_owned(),
        })
    }
}

fn check_header(bytes: &[u8]) -> Result<(), WireError> {
    let magic = u32_at(bytes, 0);
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let version = u16_at(bytes, 4);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    Ok(())
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        for op in 1..=6 {
            let request = Request {
                op: Op::from_u16(op).expect("known"),
                id: 77,
            };
            assert_eq!(Request::decode(&request.encode()), Ok(request));
        }
        let reply = Reply::error(libc::EINVAL, "é".repeat(1000));
        let back = Reply::decode(&reply.encode()).expect("decodes");
        assert_eq!(back, reply);
        assert!(back.message.len() <= MESSAGE_BYTES_MAX);
        let ok = Reply::ok(3, 1 << 40);
        assert_eq!(Reply::decode(&ok.encode()), Ok(ok));
    }

    #[test]
    fn bad_requests_name_what_is_wrong() {
        let good = Request {
            op: Op::RegisterIov,
            id: 0,
        }
        .encode();
        assert!(matches!(
            Request::decode(&good[..31]),
            Err(WireError::Length { got: 31, .. })
        ));
        let mut bad = good;
        bad[0] = 0;
        assert!(matches!(Request::decode(&bad), Err(WireError::Magic(_))));
        let mut bad = good;
        bad[4] = 9;
        assert_eq!(Request::decode(&bad), Err(WireError::Version(9)));
        let mut bad = good;
        bad[6] = 42;
        assert_eq!(Request::decode(&bad), Err(WireError::Op(42)));
        let mut bad = good;
        bad[13] = 1;
        assert_eq!(Request::decode(&bad), Err(WireError::Reserved("flags")));
        let mut bad = good;
        bad[31] = 1;
        assert_eq!(Request::decode(&bad), Err(WireError::Reserved("reserved")));
        // Any bytes at all: an error or a request, never a panic.
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            let _ = Request::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }
    }
}
