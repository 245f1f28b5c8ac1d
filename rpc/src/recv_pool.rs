//! Recycled, page-aligned buffers that received payloads land in.
//!
//! Two costs disappear with them (measured with `perf` on the storage write
//! path, where they took about a fifth of the CPU):
//! * A fresh megabyte for every frame meant fresh pages: a page fault and a
//!   kernel page clear per 4 KiB before the socket data could be copied in.
//!   Pooled buffers stay mapped and are reused warm.
//! * Payload memory is aligned to [`PAYLOAD_ALIGN`], so a storage target can
//!   hand a written chunk straight to an `O_DIRECT` device write
//!   (`DmaBuf::from_bytes` in flyfs-bypass) instead of copying it into a
//!   device buffer first.
//!
//! Buffers come in power-of-two size classes; a payload is returned as
//! `Bytes` that owns its buffer, and the buffer goes back to its class when
//! the last clone is dropped. Each class keeps a bounded number of buffers,
//! so a burst of large frames does not pin memory forever.

use std::sync::OnceLock;

use bytes::Bytes;
use parking_lot::Mutex;

/// Alignment of every payload: the page size, and the largest sector size.
pub const PAYLOAD_ALIGN: usize = 4096;
/// The smallest class; smaller payloads still get a buffer this big.
const CLASS_MIN_SHIFT: u32 = 12;
/// Classes up to 64 MiB; larger payloads get an unpooled aligned buffer.
const CLASS_COUNT: usize = 15;
/// Memory each class may keep idle.
const IDLE_BYTES_PER_CLASS: usize = 64 << 20;
/// Buffers each class may keep idle, however small.
const IDLE_BUFFERS_MIN: usize = 16;

struct Pool {
    classes: [Mutex<Vec<Vec<u8>>>; CLASS_COUNT],
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        classes: std::array::from_fn(|_| Mutex::new(Vec::new())),
    })
}

fn class_of(len: usize) -> Option<usize> {
    let shift = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(CLASS_MIN_SHIFT);
    let class = (shift - CLASS_MIN_SHIFT) as usize;
    (class < CLASS_COUNT).then_some(class)
}

fn class_bytes(class: usize) -> usize {
    1 << (class as u32 + CLASS_MIN_SHIFT)
}

/// A payload buffer being filled: `len` bytes starting at an aligned offset
/// of a vector with room to align.
pub(crate) struct RecvBuf {
    vec: Vec<u8>,
    offset: usize,
    len: usize,
    class: Option<usize>,
}

impl RecvBuf {
    /// A buffer for `len` bytes, recycled when one is idle. Its contents are
    /// whatever a previous payload left: the caller overwrites all of it.
    pub(crate) fn new(len: usize) -> RecvBuf {
        let class = class_of(len);
        let recycled = class.and_then(|c| pool().classes[c].lock().pop());
        let vec = recycled.unwrap_or_else(|| {
            let bytes = class.map_or(len, class_bytes);
            vec![0; bytes + PAYLOAD_ALIGN]
        });
        let offset = vec.as_ptr().align_offset(PAYLOAD_ALIGN);
        debug_assert!(offset + len <= vec.len());
        RecvBuf {
            vec,
            offset,
            len,
            class,
        }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.offset..self.offset + self.len]
    }

    /// The filled buffer as `Bytes` (no copy).
    pub(crate) fn freeze(self) -> Bytes {
        if self.len == 0 {
            return Bytes::new();
        }
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for RecvBuf {
    fn as_ref(&self) -> &[u8] {
        &self.vec[self.offset..self.offset + self.len]
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        let Some(class) = self.class else { return };
        let idle_max = (IDLE_BYTES_PER_CLASS / class_bytes(class)).max(IDLE_BUFFERS_MIN);
        let mut idle = pool().classes[class].lock();
        if idle.len() < idle_max {
            idle.push(std::mem::take(&mut self.vec));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_to_powers_of_two() {
        assert_eq!(class_of(0), Some(0));
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_of(1 << 20), Some(8));
        assert_eq!(class_of(64 << 20), Some(14));
        assert_eq!(class_of((64 << 20) + 1), None);
    }

    #[test]
    fn buffers_are_aligned_recycled_and_exact() {
        let mut buf = RecvBuf::new(100_000);
        buf.as_mut_slice().fill(3);
        let bytes = buf.freeze();
        assert_eq!(bytes.len(), 100_000);
        assert_eq!(bytes.as_ptr() as usize % PAYLOAD_ALIGN, 0);
        assert!(bytes.iter().all(|&b| b == 3));
        let tail = bytes.slice(50_000..);
        drop(bytes);
        // Still referenced by `tail`: not back in the pool yet.
        assert_eq!(tail[0], 3);
        drop(tail);
        let again = RecvBuf::new(70_000).freeze();
        assert_eq!(again.as_ptr() as usize % PAYLOAD_ALIGN, 0);
        let huge = RecvBuf::new((64 << 20) + 1);
        assert_eq!(huge.as_ref().len(), (64 << 20) + 1);
        assert_eq!(huge.as_ref().as_ptr() as usize % PAYLOAD_ALIGN, 0);
    }
}
