//! The sequential model of one chunk the linearizability checker tests each
//! chunk's history against: a byte string that writes at any offset patch
//! (extending it with zeros past its end), truncates cut or extend with
//! zeros, removes empty, and reads return whole.
//!
//! A missing chunk and an empty one read the same (no bytes), so the model
//! does not tell them apart.

use std::fmt;

use bytes::Bytes;
use stateright::semantics::SequentialSpec;

/// One operation on a chunk.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum ChunkOp {
    /// `data` at `offset`; `value` names the write (unique per write) in
    /// logs.
    Write {
        offset: u32,
        data: Bytes,
        value: u64,
    },
    Truncate {
        len: u32,
    },
    Remove,
    /// Reads the whole chunk.
    Read,
}

/// What an operation returned.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum ChunkRet {
    Done,
    ReadOk(Bytes),
}

impl fmt::Debug for ChunkOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkOp::Write {
                offset,
                data,
                value,
            } => write!(f, "Write({value:#x} at {offset}+{})", data.len()),
            ChunkOp::Truncate { len } => write!(f, "Truncate({len})"),
            ChunkOp::Remove => write!(f, "Remove"),
            ChunkOp::Read => write!(f, "Read"),
        }
    }
}

impl fmt::Debug for ChunkRet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkRet::Done => write!(f, "Done"),
            // The bytes are too many to print; their length and checksum
            // tell reads apart.
            ChunkRet::ReadOk(data) => write!(
                f,
                "ReadOk({} bytes, crc {:#010x})",
                data.len(),
                crc32c::crc32c(data)
            ),
        }
    }
}

/// The model: the chunk's bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChunkModel(pub Vec<u8>);

impl SequentialSpec for ChunkModel {
    type Op = ChunkOp;
    type Ret = ChunkRet;

    fn invoke(&mut self, op: &ChunkOp) -> ChunkRet {
        match op {
            ChunkOp::Write { offset, data, .. } => {
                let start = *offset as usize;
                let end = start + data.len();
                if self.0.len() < end {
                    self.0.resize(end, 0);
                }
                self.0[start..end].copy_from_slice(data);
                ChunkRet::Done
            }
            ChunkOp::Truncate { len } => {
                self.0.resize(*len as usize, 0);
                ChunkRet::Done
            }
            ChunkOp::Remove => {
                self.0.clear();
                ChunkRet::Done
            }
            ChunkOp::Read => ChunkRet::ReadOk(Bytes::copy_from_slice(&self.0)),
        }
    }

    fn is_valid_step(&mut self, op: &ChunkOp, ret: &ChunkRet) -> bool {
        match (op, ret) {
            (ChunkOp::Read, ChunkRet::ReadOk(data)) => self.0 == data.as_ref(),
            (ChunkOp::Read, ChunkRet::Done) | (_, ChunkRet::ReadOk(_)) => false,
            (_, ChunkRet::Done) => {
                self.invoke(op);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_patch_truncates_cut_and_extend_removes_empty() {
        let mut m = ChunkModel::default();
        let write = |offset, data: &'static [u8]| ChunkOp::Write {
            offset,
            data: Bytes::from_static(data),
            value: 1,
        };
        m.invoke(&write(2, b"ab"));
        assert_eq!(m.0, b"\0\0ab");
        m.invoke(&write(1, b"xyz"));
        assert_eq!(m.0, b"\0xyz");
        m.invoke(&ChunkOp::Truncate { len: 2 });
        assert_eq!(m.0, b"\0x");
        m.invoke(&ChunkOp::Truncate { len: 3 });
        assert_eq!(m.0, b"\0x\0");
        assert!(m.is_valid_step(
            &ChunkOp::Read,
            &ChunkRet::ReadOk(Bytes::from_static(b"\0x\0"))
        ));
        m.invoke(&ChunkOp::Remove);
        assert!(m.is_valid_step(&ChunkOp::Read, &ChunkRet::ReadOk(Bytes::new())));
        assert!(!m.is_valid_step(&ChunkOp::Read, &ChunkRet::ReadOk(Bytes::from_static(b"x"))));
    }
}
