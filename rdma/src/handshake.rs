//! The connection parameters two peers exchange before their queue pairs
//! can talk: QP number, starting packet sequence number, GID, LID, MTU, and
//! the receive ring's shape (how many messages of how many bytes the peer
//! may send before it must wait for credits). They travel over a channel
//! that is already authenticated (the rpc layer's mutual-TLS connection), so
//! nothing here is trusted for identity; it is only checked for shape.
//!
//! Encoding (docs/rdma-transport.md): 48 bytes, little-endian integers.
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `FLYRDMA\0` |
//! | 8..10 | version (4) |
//! | 10..12 | LID |
//! | 12..16 | QP number (24 bits used) |
//! | 16..20 | PSN (24 bits used) |
//! | 20..24 | MTU (`IBV_MTU_*`, 1..=5) |
//! | 24..40 | GID |
//! | 40..44 | credits: receive slots the peer may fill |
//! | 44..48 | message bytes max: the largest payload one slot takes |

use crate::error::{RdmaError, Result};
use crate::verbs::QpAddress;

pub const MAGIC: [u8; 8] = *b"FLYRDMA\0";
/// 2: frames may carry remote payload descriptors (`FLAG_PAYLOAD_REMOTE`,
/// docs/rdma-transport.md), which a version-1 peer would take for bytes.
/// 3: requests may name a buffer for the reply (`FLAG_REPLY_SINK`), which
/// a version-2 server would take for payload bytes.
/// 4: a side that closes sends a drained notice on the lifeline (the TLS
/// session), which a version-3 peer would take for a protocol violation.
/// 5: requests may name one reply buffer per part (`FLAG_REPLY_SCATTER`),
/// which a version-4 server would take for one buffer's descriptor.
pub const VERSION: u16 = 5;
pub const ENCODED_BYTES: usize = 48;

/// The largest receive ring a peer may announce: the credits bound what we
/// may send, not what we hold, but an absurd value is a malformed peer.
pub const CREDITS_MAX: u32 = 1 << 16;
/// The largest message slot a peer may announce (16 MiB).
pub const MESSAGE_BYTES_MAX: u32 = 16 << 20;

/// One side's connection parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub address: QpAddress,
    pub credits: u32,
    pub message_bytes_max: u32,
}

impl Endpoint {
    pub fn encode(&self) -> [u8; ENCODED_BYTES] {
        let mut out = [0; ENCODED_BYTES];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&VERSION.to_le_bytes());
        out[10..12].copy_from_slice(&self.address.lid.to_le_bytes());
        out[12..16].copy_from_slice(&self.address.qp_num.to_le_bytes());
        out[16..20].copy_from_slice(&self.address.psn.to_le_bytes());
        out[20..24].copy_from_slice(&self.address.mtu.to_le_bytes());
        out[24..40].copy_from_slice(&self.address.gid);
        out[40..44].copy_from_slice(&self.credits.to_le_bytes());
        out[44..48].copy_from_slice(&self.message_bytes_max.to_le_bytes());
        out
    }

    /// Decodes and checks a peer's parameters; every refusal names the
    /// field that was wrong.
    pub fn decode(bytes: &[u8]) -> Result<Endpoint> {
        if bytes.len() != ENCODED_BYTES {
            return Err(RdmaError::Handshake(format!(
                "parameters are {} bytes, expected {ENCODED_BYTES}",
                bytes.len()
            )));
        }
        if bytes[0..8] != MAGIC {
            return Err(RdmaError::Handshake(
                "the peer did not send RDMA parameters (is it on the TCP transport?)".into(),
            ));
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let version = u16_at(8);
        if version != VERSION {
            return Err(RdmaError::Handshake(format!(
                "peer speaks version {version}, this build version {VERSION}"
            )));
        }
        let mut gid = [0; 16];
        gid.copy_from_slice(&bytes[24..40]);
        let endpoint = Endpoint {
            address: QpAddress {
                lid: u16_at(10),
                qp_num: u32_at(12),
                psn: u32_at(16),
                mtu: u32_at(20),
                gid,
            },
            credits: u32_at(40),
            message_bytes_max: u32_at(44),
        };
        let check = |ok: bool, what: String| {
            if ok {
                Ok(())
            } else {
                Err(RdmaError::Handshake(what))
            }
        };
        check(
            endpoint.address.qp_num < 1 << 24,
            format!("QP number {:#x} exceeds 24 bits", endpoint.address.qp_num),
        )?;
        check(
            endpoint.address.psn < 1 << 24,
            format!("PSN {:#x} exceeds 24 bits", endpoint.address.psn),
        )?;
        check(
            (1..=5).contains(&endpoint.address.mtu),
            format!("MTU code {} is not 1..=5", endpoint.address.mtu),
        )?;
        check(
            (1..=CREDITS_MAX).contains(&endpoint.credits),
            format!("credits {} not in 1..={CREDITS_MAX}", endpoint.credits),
        )?;
        check(
            (1..=MESSAGE_BYTES_MAX).contains(&endpoint.message_bytes_max),
            format!(
                "message bytes max {} not in 1..={MESSAGE_BYTES_MAX}",
                endpoint.message_bytes_max
            ),
        )?;
        Ok(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Endpoint {
        Endpoint {
            address: QpAddress {
                qp_num: 0x11,
                psn: 0xabcdef,
                gid: [7; 16],
                lid: 0,
                mtu: 3,
            },
            credits: 32,
            message_bytes_max: 64 << 10,
        }
    }

    #[test]
    fn round_trips() {
        let endpoint = sample();
        assert_eq!(
            Endpoint::decode(&endpoint.encode()).expect("valid"),
            endpoint
        );
    }

    #[test]
    fn refuses_malformed_parameters_naming_the_field() {
        let error = |bytes: &[u8]| Endpoint::decode(bytes).expect_err("malformed").to_string();
        assert!(error(&[0; 10]).contains("10 bytes"));
        let mut tls_frame = sample().encode();
        tls_frame[0..8].copy_from_slice(b"\x00\x00\x00\x10flyf");
        assert!(error(&tls_frame).contains("TCP transport"));
        let mut bad = sample();
        bad.address.mtu = 9;
        assert!(error(&bad.encode()).contains("MTU code 9"));
        bad = sample();
        bad.credits = 0;
        assert!(error(&bad.encode()).contains("credits 0"));
        bad = sample();
        bad.message_bytes_max = MESSAGE_BYTES_MAX + 1;
        assert!(error(&bad.encode()).contains("message bytes max"));
        bad = sample();
        bad.address.qp_num = 1 << 24;
        assert!(error(&bad.encode()).contains("QP number"));
        for old in [1u8, 2, 3] {
            let mut version = sample().encode();
            version[8] = old;
            assert!(error(&version).contains(&format!("version {old}")));
        }
    }
}
