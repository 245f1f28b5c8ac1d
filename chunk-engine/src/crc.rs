//! CRC32C arithmetic the engine does without the bytes: the CRC of two
//! messages one after the other from theirs ([`combine`]), and of a message
//! followed by zeros ([`shift`]); and with them, a write's block CRCs and
//! its whole CRC from one pass over its bytes ([`blocks_and_whole`]).
//!
//! Both come down to multiplying a CRC by x^(8 n) modulo the CRC32C
//! polynomial. The `crc32c` crate's `crc32c_combine` builds that operator by
//! squaring 32x32 bit matrices once per bit of `n` (about twenty squarings of
//! a thousand steps each for a 1 MiB chunk); a patch needs one per write, and
//! profiles of 4 KiB random writes showed it taking a third of the reactor's
//! time. Here x^(8 n) is assembled from a table of x^(2^k) made at compile
//! time: one polynomial product (32 shift-and-xor steps) per set bit of `n`.
//!
//! Polynomials are in the reflected order CRC32C uses: bit 31 is the
//! coefficient of x^0 and bit 0 that of x^31.

use crate::format::BLOCK;

/// The CRC32C (Castagnoli) polynomial, reflected.
const POLY: u32 = 0x82F6_3B78;

/// The polynomial 1.
const ONE: u32 = 1 << 31;

/// `a * b` modulo the polynomial.
const fn multiply(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut term = ONE;
    // For each power of x in `a`, lowest first, add `b` times that power;
    // `b` is multiplied by x each step, reduced at once.
    while term != 0 {
        if a & term != 0 {
            product ^= b;
        }
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        term >>= 1;
    }
    product
}

/// `X_2K[k]` is x^(2^k) modulo the polynomial: x, x^2, x^4, ..., far
/// enough for x^(8 n) with any 64-bit `n`.
const X_2K: [u32; 67] = {
    let mut table = [0u32; 67];
    table[0] = ONE >> 1;
    let mut k = 1;
    while k < table.len() {
        table[k] = multiply(table[k - 1], table[k - 1]);
        k += 1;
    }
    table
};

/// x^(8 n) modulo the polynomial: the operator that appends `n` zero bytes.
const fn zeros_operator(n: u64) -> u32 {
    let mut operator = ONE;
    let mut bits = n;
    // x^(8 n) = product of x^(2^(k + 3)) over the set bits k of n.
    let mut k = 3;
    while bits != 0 {
        if bits & 1 != 0 {
            operator = multiply(X_2K[k], operator);
        }
        bits >>= 1;
        k += 1;
    }
    operator
}

/// The pure (zero-initialised, not inverted) CRC `crc` followed by `n` zero
/// bytes.
pub(crate) fn shift(crc: u32, n: usize) -> u32 {
    if n == 0 {
        return crc;
    }
    multiply(zeros_operator(n as u64), crc)
}

/// The CRC32C of message A then message B, from A's CRC, B's CRC and B's
/// length (the standard CRC's initial and final inversions cancel out).
pub(crate) fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    shift(crc_a, len_b) ^ crc_b
}

/// [`shift`] by one block, by table: multiplying by a constant is linear
/// in the CRC, so it is the sum of the products of its four bytes, each
/// looked up (`SHIFT_BLOCK[k][b]` is x^(8 BLOCK) times byte `b` at byte
/// position `k`). Four lookups instead of two 32-step products: cheap
/// enough to run once per 4 KiB block beside the hardware CRC.
const SHIFT_BLOCK: [[u32; 256]; 4] = {
    let operator = zeros_operator(BLOCK);
    let mut table = [[0u32; 256]; 4];
    let mut k = 0;
    while k < 4 {
        let mut b = 0;
        while b < 256 {
            table[k][b] = multiply(operator, (b as u32) << (8 * k));
            b += 1;
        }
        k += 1;
    }
    table
};

fn shift_block(crc: u32) -> u32 {
    SHIFT_BLOCK[0][(crc & 0xff) as usize]
        ^ SHIFT_BLOCK[1][((crc >> 8) & 0xff) as usize]
        ^ SHIFT_BLOCK[2][((crc >> 16) & 0xff) as usize]
        ^ SHIFT_BLOCK[3][(crc >> 24) as usize]
}

/// Both CRCs a block-aligned write of `data` needs, from one pass over it:
/// the CRC32C of each block of `data` padded with zeros to whole blocks
/// (the block-CRC region's entries for the blocks written) and the CRC32C
/// of `data` itself (the payload's check and the chunk's CRC), combined
/// from the blocks' instead of read a second time.
pub(crate) fn blocks_and_whole(data: &[u8]) -> (Vec<u32>, u32) {
    static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
    let block = BLOCK as usize;
    let mut blocks = Vec::with_capacity(data.len().div_ceil(block));
    let mut whole = 0;
    for piece in data.chunks(block) {
        let crc = crc32c::crc32c(piece);
        if piece.len() == block {
            whole = shift_block(whole) ^ crc;
            blocks.push(crc);
        } else {
            let pad = block - piece.len();
            whole = combine(whole, crc, piece.len());
            blocks.push(combine(crc, crc32c::crc32c(&ZEROS[..pad]), pad));
        }
    }
    (blocks, whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn combine_is_the_crc_of_the_concatenation() {
        for (a_len, b_len) in [
            (0, 0),
            (0, 1),
            (1, 0),
            (3, 5),
            (4096, 4096),
            (100, 65_537),
            (1 << 20, 4096),
            (7, 1 << 20),
        ] {
            let a = message(a_len, a_len as u32);
            let b = message(b_len, b_len as u32 + 1);
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            let (crc_a, crc_b) = (crc32c::crc32c(&a), crc32c::crc32c(&b));
            assert_eq!(
                combine(crc_a, crc_b, b_len),
                crc32c::crc32c(&whole),
                "{a_len} then {b_len}"
            );
        }
    }

    #[test]
    fn agrees_with_the_crates_combine_on_any_length() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 7;
            x ^= x >> 9;
            // Not 0: the crate then returns A's CRC whatever B's (only 0 is
            // the CRC of an empty B, and with it both give A's).
            let len = ((x % (1 << 30)) as usize >> (x % 30)).max(1);
            let (a, b) = ((x >> 32) as u32, x as u32);
            assert_eq!(
                combine(a, b, len),
                crc32c::crc32c_combine(a, b, len),
                "len {len}"
            );
        }
        // Lengths past 2^32 bytes use the upper half of the table.
        let huge = (1usize << 40) + 12_345;
        assert_eq!(combine(1, 2, huge), crc32c::crc32c_combine(1, 2, huge));
    }

    #[test]
    fn one_pass_gives_the_block_crcs_of_the_padded_bytes_and_the_whole_crc() {
        let block = BLOCK as usize;
        for len in [
            0,
            1,
            100,
            block - 1,
            block,
            block + 1,
            3 * block + 7,
            1 << 20,
            (1 << 20) - 512,
        ] {
            let data = message(len, len as u32 + 7);
            let mut padded = data.clone();
            padded.resize(len.next_multiple_of(block), 0);
            let expected: Vec<u32> = padded.chunks(block).map(crc32c::crc32c).collect();
            assert_eq!(
                blocks_and_whole(&data),
                (expected, crc32c::crc32c(&data)),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn shift_by_table_is_shift_by_a_block() {
        let mut x: u32 = 0x1234_5678;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            assert_eq!(shift_block(x), shift(x, BLOCK as usize));
        }
    }

    #[test]
    fn shift_appends_zero_bytes_to_a_pure_crc() {
        // The pure CRC of a message is linear in it: shifting the pure CRC of
        // A by n equals the pure CRC of A followed by n zeros. Pure CRCs of a
        // message M are crc32c(M) ^ crc32c(zeros of M's length).
        let pure = |m: &[u8]| crc32c::crc32c(m) ^ crc32c::crc32c(&vec![0; m.len()]);
        let a = message(1000, 9);
        for n in [0, 1, 4095, 4096, 70_000] {
            let mut padded = a.clone();
            padded.resize(a.len() + n, 0);
            assert_eq!(shift(pure(&a), n), pure(&padded), "{n} zeros");
        }
    }
}
