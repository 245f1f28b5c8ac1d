//! The message codec: MessagePack with named fields.
//!
//! Every request and response body is one message encoded here; bulk data never
//! is (it travels as the frame's payload, see `payload.rs`). Named fields cost a
//! few bytes per field but buy the compatibility rule below, which lets a
//! cluster be upgraded one daemon at a time.
//!
//! # Compatibility rule
//!
//! Every message struct:
//! * derives `Default` and carries `#[serde(default)]` at container level, so a
//!   field missing from the bytes (an *older* peer never sent it) takes its
//!   default value;
//! * does not use `#[serde(deny_unknown_fields)]`, so a field the receiver does
//!   not know (a *newer* peer added it) is skipped.
//!
//! Hence a field may be added at any time, provided its default means "the
//! sender did not know about this" and the receiver behaves as before in that
//! case. A field may never be renamed, have its type changed, or have its
//! meaning changed; retire it and add a new one instead. Enum variants follow
//! the same rule: adding a variant is only safe when older peers never receive
//! it (gate it on a capability the peer advertised).
//!
//! # Hostile bytes
//!
//! Decoding never panics, and never allocates more than a small multiple of the
//! input: rmp-serde borrows strings and byte strings from the input slice after
//! checking their declared length against what is left, and serde caps the
//! pre-allocation of sequences and maps it is told about (`size_hint::cautious`).
//! Nesting is the remaining hazard: skipping an unknown field recurses once per
//! nesting level, and rmp-serde's own limit (1024 levels) is deeper than we
//! want on a 2 MiB task stack, so [`decode`] caps it at [`DEPTH_MAX`].

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The deepest nesting of arrays and maps a message may have. Real messages
/// nest a handful of levels (a routing table of chains of targets); this only
/// has to stop a hostile peer from recursing the stack away.
pub const DEPTH_MAX: usize = 64;

/// A message failed to encode or decode.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A message could not be encoded. Derived `Serialize` impls over plain
    /// data never fail; a hand-written impl may.
    #[error("cannot encode {type_name}: {source}")]
    Encode {
        type_name: &'static str,
        #[source]
        source: rmp_serde::encode::Error,
    },
    /// Bytes did not decode as the expected message type.
    #[error("cannot decode {type_name} from {len} bytes: {source}")]
    Decode {
        type_name: &'static str,
        len: usize,
        #[source]
        source: rmp_serde::decode::Error,
    },
}

/// Encodes `message`, or says why it cannot be.
pub fn try_encode<M: Serialize>(message: &M) -> Result<Bytes, CodecError> {
    rmp_serde::to_vec_named(message)
        .map(Bytes::from)
        .map_err(|source| CodecError::Encode {
            type_name: std::any::type_name::<M>(),
            source,
        })
}

/// Encodes `message`.
///
/// # Panics
///
/// If `M`'s `Serialize` impl fails, which derived impls over plain data (the
/// only kind message types may use) never do. Library paths that cannot rule
/// out a hand-written impl use [`try_encode`].
pub fn encode<M: Serialize>(message: &M) -> Bytes {
    match try_encode(message) {
        Ok(bytes) => bytes,
        Err(error) => panic!("{error}"),
    }
}

/// Decodes a message of type `M` from `bytes`. Bytes after the message are
/// ignored (the frame header already delimits the body exactly).
pub fn decode<M: DeserializeOwned>(bytes: &[u8]) -> Result<M, CodecError> {
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(bytes);
    deserializer.set_max_depth(DEPTH_MAX);
    M::deserialize(&mut deserializer).map_err(|source| CodecError::Decode {
        type_name: std::any::type_name::<M>(),
        len: bytes.len(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::ids::{ChainId, ChunkId};

    /// Version 1 of a message.
    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    struct WriteV1 {
        chain: ChainId,
        chunk: ChunkId,
        offset: u32,
    }

    /// Version 2 of the same message: one field added.
    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    struct WriteV2 {
        chain: ChainId,
        chunk: ChunkId,
        offset: u32,
        checksum: Option<u32>,
        tags: Vec<String>,
    }

    #[test]
    fn newer_message_decodes_on_older_peer() {
        let v2 = WriteV2 {
            chain: ChainId(3),
            chunk: ChunkId::new(9, 2),
            offset: 4096,
            checksum: Some(0xdead_beef),
            tags: vec!["x".into(), "y".into()],
        };
        let v1: WriteV1 = decode(&encode(&v2)).expect("v2 bytes decode as v1");
        assert_eq!(
            v1,
            WriteV1 {
                chain: ChainId(3),
                chunk: ChunkId::new(9, 2),
                offset: 4096
            }
        );
    }

    #[test]
    fn older_message_decodes_on_newer_peer_with_defaults() {
        let v1 = WriteV1 {
            chain: ChainId(3),
            chunk: ChunkId::new(9, 2),
            offset: 512,
        };
        let v2: WriteV2 = decode(&encode(&v1)).expect("v1 bytes decode as v2");
        assert_eq!(v2.offset, 512);
        assert_eq!(v2.chunk, ChunkId::new(9, 2));
        assert_eq!(v2.checksum, None);
        assert!(v2.tags.is_empty());
    }

    #[test]
    fn errors_name_the_type() {
        let error = decode::<WriteV1>(&[0xc1]).expect_err("0xc1 is a reserved marker");
        let message = error.to_string();
        assert!(message.contains("WriteV1"), "{message}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // A map with one unknown key whose value is an array nested 100 000
        // levels deep: skipping it would recurse once per level.
        let mut bytes = vec![0x81, 0xa7];
        bytes.extend_from_slice(b"unknown");
        bytes.extend(std::iter::repeat_n(0x91, 100_000));
        bytes.push(0xc0);
        let error = decode::<WriteV1>(&bytes).expect_err("nesting beyond DEPTH_MAX");
        assert!(error.to_string().contains("depth"), "{error}");
    }

    #[test]
    fn nesting_within_the_cap_decodes() {
        let mut bytes = vec![0x81, 0xa7];
        bytes.extend_from_slice(b"unknown");
        bytes.extend(std::iter::repeat_n(0x91, DEPTH_MAX - 3));
        bytes.push(0xc0);
        let decoded: WriteV1 = decode(&bytes).expect("shallow unknown field is skipped");
        assert_eq!(decoded, WriteV1::default());
    }

    #[test]
    fn huge_declared_lengths_fail_without_allocating() {
        // An array32 declaring 4 billion elements, then nothing.
        let bytes = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(decode::<Vec<u64>>(&bytes).is_err());
        // A bin32 declaring 4 GiB.
        let bytes = [0xc6, 0xff, 0xff, 0xff, 0xff, 1, 2];
        assert!(decode::<serde_bytes_like::Buf>(&bytes).is_err());
    }

    mod serde_bytes_like {
        /// A byte string decoded through `visit_bytes`.
        #[derive(Debug)]
        pub struct Buf;

        impl<'de> serde::Deserialize<'de> for Buf {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = Buf;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E>(self, _: &[u8]) -> Result<Buf, E> {
                        Ok(Buf)
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    }
}
