//! The `BlockDevice` contract as test functions that take any device, so
//! the same checks run unchanged against the memory and io_uring devices on
//! the host (tests/contract.rs) and the NVMe driver in the guest
//! (tests/guest_nvme.rs). Each function assumes nothing about the device
//! beyond the contract in flyfs-bypass's crate documentation, and uses only
//! the first 8 MiB of it.

#![allow(dead_code)]

use std::future::Future;
use std::task::{Context, Waker};

use flyfs_bypass::{BlockDevice, BufferPool, DeviceError, DmaBuf, IoOp};

pub const MIB: u64 = 1 << 20;

/// `len` bytes that depend on `seed` and on the position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn filled(pool: Option<&BufferPool>, data: &[u8]) -> DmaBuf {
    let mut buf = match pool {
        Some(pool) => pool.alloc(data.len()),
        None => DmaBuf::alloc_zeroed(data.len()),
    };
    buf.copy_from_slice(data);
    buf
}

fn blank(pool: Option<&BufferPool>, len: usize) -> DmaBuf {
    let mut buf = match pool {
        Some(pool) => pool.alloc(len),
        None => DmaBuf::alloc_zeroed(len),
    };
    buf.fill(0xee);
    buf
}

pub async fn write_at<D: BlockDevice>(
    device: &D,
    pool: Option<&BufferPool>,
    offset: u64,
    data: &[u8],
) {
    device
        .write(offset, filled(pool, data))
        .await
        .into_result()
        .unwrap_or_else(|error| panic!("write of {} bytes at {offset}: {error}", data.len()));
}

pub async fn read_at<D: BlockDevice>(
    device: &D,
    pool: Option<&BufferPool>,
    offset: u64,
    len: usize,
) -> Vec<u8> {
    let buf = device
        .read(offset, blank(pool, len))
        .await
        .into_result()
        .unwrap_or_else(|error| panic!("read of {len} bytes at {offset}: {error}"));
    buf.to_vec()
}

/// Writes then reads back transfers of many sizes, from pooled and heap
/// buffers, including ones larger than any single NVMe command and ones
/// whose window starts at a sector (not page) boundary.
pub async fn round_trips<D: BlockDevice>(device: &D, pool: &BufferPool) {
    let sector = device.geometry().sector_size as usize;
    let sizes = [
        sector,
        4096,
        8192,
        12288,
        65536,
        MIB as usize,
        2 * MIB as usize + 4096 * 3,
    ];
    let mut offset = 0u64;
    for (index, &len) in sizes.iter().enumerate() {
        for (which, pool) in [Some(pool), None].into_iter().enumerate() {
            let data = pattern(index as u64 * 2 + which as u64 + 1, len);
            write_at(device, pool, offset, &data).await;
            assert!(
                read_at(device, pool, offset, len).await == data,
                "{len} bytes at {offset} (pooled: {}) read back different",
                pool.is_some()
            );
            offset += len.next_multiple_of(4096) as u64;
        }
    }
    // A window that starts one sector into its buffer (address aligned to
    // the sector, not to the page) spanning several pages.
    let len = 3 * 4096;
    let data = pattern(99, len);
    let mut buf = DmaBuf::alloc_zeroed(len + 4096);
    buf.set_window(sector, len);
    buf.copy_from_slice(&data);
    device
        .write(offset, buf)
        .await
        .into_result()
        .expect("unaligned-window write");
    let mut buf = DmaBuf::alloc_zeroed(len + 4096);
    buf.set_window(sector, len);
    let buf = device
        .read(offset, buf)
        .await
        .into_result()
        .expect("unaligned-window read");
    assert!(
        buf[..] == data[..],
        "a sector-offset window read back different"
    );
}

/// Misaligned and out-of-range I/O fail before reaching the medium.
pub async fn bad_arguments_are_refused<D: BlockDevice>(device: &D) {
    let geometry = device.geometry();
    let sector = u64::from(geometry.sector_size);
    let completion = device
        .read(sector / 2, DmaBuf::alloc_zeroed(sector as usize))
        .await;
    assert!(
        matches!(
            completion.result,
            Err(DeviceError::Misaligned { op: IoOp::Read, .. })
        ),
        "{:?}",
        completion.result
    );
    let completion = device
        .write(0, DmaBuf::alloc_zeroed(sector as usize / 2))
        .await;
    assert!(
        matches!(
            completion.result,
            Err(DeviceError::Misaligned {
                op: IoOp::Write,
                ..
            })
        ),
        "{:?}",
        completion.result
    );
    let completion = device
        .read(
            geometry.capacity_bytes,
            DmaBuf::alloc_zeroed(sector as usize),
        )
        .await;
    assert!(
        matches!(completion.result, Err(DeviceError::OutOfRange { .. })),
        "{:?}",
        completion.result
    );
    let error = device
        .discard(geometry.capacity_bytes - sector, 2 * sector)
        .await
        .expect_err("past the end");
    assert!(
        matches!(
            error,
            DeviceError::OutOfRange {
                op: IoOp::Discard,
                ..
            }
        ),
        "{error}"
    );
    assert!(geometry.capacity_bytes.is_multiple_of(sector));
    assert!((512..=4096).contains(&geometry.sector_size) && geometry.sector_size.is_power_of_two());
}

/// Many I/Os in flight at once from separate tasks all land.
pub async fn concurrent_writes_all_land<D: BlockDevice + Clone>(device: &D, pool: &BufferPool) {
    let base = 16 * MIB;
    let count = 64u64;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..count {
        let device = device.clone();
        let pool = pool.clone();
        tasks.spawn(async move {
            let data = pattern(1000 + index, 4096);
            write_at(&device, Some(&pool), base + index * 4096, &data).await;
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("writer task");
    }
    let all = read_at(device, Some(pool), base, (count * 4096) as usize).await;
    for index in 0..count as usize {
        assert!(
            all[index * 4096..(index + 1) * 4096] == pattern(1000 + index as u64, 4096)[..],
            "write {index} did not land"
        );
    }
}

/// Flush succeeds; discard succeeds and leaves zeros or the old data.
pub async fn flush_and_discard<D: BlockDevice>(device: &D, pool: &BufferPool) {
    let offset = 24 * MIB;
    let data = pattern(7, 64 * 1024);
    write_at(device, Some(pool), offset, &data).await;
    device.flush().await.expect("flush");
    device.discard(offset, 64 * 1024).await.expect("discard");
    device.discard(offset, 0).await.expect("empty discard");
    let after = read_at(device, Some(pool), offset, 64 * 1024).await;
    for (sector, (new, old)) in after.chunks(512).zip(data.chunks(512)).enumerate() {
        assert!(
            new == old || new.iter().all(|&byte| byte == 0),
            "sector {sector} after discard is neither the old data nor zeros"
        );
    }
    device.flush().await.expect("flush after discard");
}

/// A future dropped mid-flight does not stop the I/O or free its buffer
/// early, and the device keeps serving.
pub async fn abandoned_io_still_completes<D: BlockDevice>(device: &D, pool: &BufferPool) {
    let offset = 28 * MIB;
    let old = pattern(11, 65536);
    write_at(device, Some(pool), offset, &old).await;
    let new = pattern(12, 65536);
    {
        let future = device.write(offset, filled(Some(pool), &new));
        let mut future = std::pin::pin!(future);
        let _ = future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()));
    }
    // The abandoned write and this read may land in either order; wait for
    // the device to settle by writing elsewhere and flushing, then the
    // range holds the new data (the abandoned write ran) or the old.
    write_at(device, Some(pool), offset + MIB, &old).await;
    device.flush().await.expect("flush");
    let mut settled = read_at(device, Some(pool), offset, 65536).await;
    // The abandoned write may still be in flight: it must finish, so poll
    // again until the contents are the new data.
    for _ in 0..10_000 {
        if settled == new {
            break;
        }
        assert!(
            settled == old,
            "the range holds neither the old nor the new data"
        );
        tokio::task::yield_now().await;
        settled = read_at(device, Some(pool), offset, 65536).await;
    }
    assert!(settled == new, "the abandoned write never landed");
}

/// Every contract check in turn.
pub async fn all<D: BlockDevice + Clone>(device: &D, pool: &BufferPool) {
    round_trips(device, pool).await;
    bad_arguments_are_refused(device).await;
    concurrent_writes_all_land(device, pool).await;
    flush_and_discard(device, pool).await;
    abandoned_io_still_completes(device, pool).await;
}
