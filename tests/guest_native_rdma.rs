//! Native (zero-copy) reads over RDMA, end to end, in the QEMU guest
//! (Soft-RoCE): `flyfs up --transport rdma` (a manager, three storage
//! daemons, the metadata service and the FUSE mount, whose storage client
//! is on the guest's rxe device), a file written through FUSE with a hole
//! in it, then reads through flyfs-usrbio's rings into a registered iov:
//!
//! * the mount daemon registers the iov with the RDMA device when the
//!   application registers it, and lends each read's slices to the
//!   replicas, which RDMA WRITE every chunk's bytes straight into the
//!   application's memory: the mount's metrics count the bytes of these
//!   reads as moved one-sided and none as copied;
//! * 4 KiB reads at depth 64 and 1 MiB reads, one of them across the hole
//!   (chunks the replicas do not have: empty parts, zeros in the iov), every
//!   byte compared with what was written; in the first round, which also
//!   sets the RDMA connections up, a read that outlasts the mount's RPC
//!   deadline is retried through a copy, so only the second round requires
//!   every byte one-sided;
//! * an iov deregistered while nothing uses it is deregistered from the
//!   device too (the next iov registers and reads the same way).
//!
//! A guest-only test: it reads `FLYFS_RXE_DEV`, `FLYFS_RXE_GID_INDEX` and
//! `FLYFS_TEST_DIR` (a directory on ext4, which the daemons' O_DIRECT device
//! files need) and fails (does not skip) without them. scripts/test-guest
//! runs it.

mod support;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;

use flyfs_usrbio::Client;
use support::{UpCluster, free_port_base, guest_dir, pattern, scrape, wait_all};

const MIB: u64 = 1 << 20;

/// The mount's count of `storage.BatchRead` payload bytes moved `how`
/// (`one_sided`, `copied`, `in_place`).
fn batch_read_bytes(metrics: &str, how: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("flyfs_rpc_payload_moved_bytes_total{")
                && line.contains("method=\"storage.BatchRead\"")
                && line.contains(&format!("how=\"{how}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
}

#[test]
fn native_reads_are_written_into_the_application_memory_by_rdma() {
    let base = guest_dir("gnr-");
    let data = base.path().join("d");
    let mount = PathBuf::from("/tmp/flyfs-guest-native-mount");
    std::fs::create_dir_all(&mount).expect("a mount point");
    let cluster = UpCluster::new(
        "guest_native_rdma",
        data.clone(),
        Some(mount.clone()),
        "mount.log",
    );
    let port = free_port_base(7_129, 97, 3);
    cluster.start_on_rdma(port, "128MiB");
    let metrics_addr = format!("127.0.0.1:{}", port + 15);
    let socket = data.join("run").join("native.sock");

    // 6 MiB with a hole: 0..2 MiB and 4..6 MiB written, through FUSE.
    let contents = {
        let mut contents = pattern(3, 6 * MIB as usize);
        contents[2 * MIB as usize..4 * MIB as usize].fill(0);
        contents
    };
    let path = mount.join("holey");
    {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .expect("create through FUSE");
        file.write_all(&contents[..2 * MIB as usize])
            .expect("write");
        file.seek(SeekFrom::Start(4 * MIB)).expect("seek");
        file.write_all(&contents[4 * MIB as usize..])
            .expect("write");
        file.sync_all().expect("fsync");
    }

    let client = Client::connect(&socket).expect("connect to the native socket");
    let file = File::open(&path).expect("open through the mount");
    let registered = client.register_file(file.as_fd()).expect("register");
    drop(file);
    assert_eq!(registered.length_at_open(), contents.len() as u64);
    for round in 0..2u64 {
        let before = scrape(&metrics_addr);
        let iov = client.register_iov(64 * MIB).expect("iov");
        let mut ior = client.create_ior(64).expect("ring");
        // 64 random 4 KiB reads in flight at once, some in the hole.
        let offsets: Vec<u64> = (0..64u64)
            .map(|i| ((i + round) * 7_919 * 4096) % (contents.len() as u64 - 4096))
            .collect();
        for (i, &offset) in offsets.iter().enumerate() {
            ior.prepare_read(&registered, &iov, i as u64 * 4096, 4096, offset, i as u64)
                .expect("prepare");
        }
        assert_eq!(ior.submit().expect("submit"), 64);
        for completion in wait_all(&mut ior, 64) {
            assert_eq!(completion.bytes().expect("read"), 4096, "{completion:?}");
            let i = completion.user_data;
            let offset = offsets[i as usize] as usize;
            let mut got = vec![0u8; 4096];
            iov.read_at(i * 4096, &mut got).expect("iov");
            assert!(
                got == contents[offset..offset + 4096],
                "round {round}: 4 KiB read {i} at {offset} differs"
            );
        }
        // 1 MiB reads: written chunks, the hole, across its edges, the end.
        let big = [0, MIB / 2, 2 * MIB, 3 * MIB + MIB / 2, 5 * MIB];
        for (i, &offset) in big.iter().enumerate() {
            // Stale bytes where the hole's zeros must land.
            iov.write_at(8 * MIB + i as u64 * MIB, &vec![0xee; MIB as usize])
                .expect("iov");
            ior.prepare_read(
                &registered,
                &iov,
                8 * MIB + i as u64 * MIB,
                MIB as u32,
                offset,
                1000 + i as u64,
            )
            .expect("prepare");
        }
        ior.submit().expect("submit");
        for completion in wait_all(&mut ior, big.len()) {
            let i = (completion.user_data - 1000) as usize;
            assert_eq!(completion.bytes().expect("read"), MIB, "{completion:?}");
            let mut got = vec![0u8; MIB as usize];
            iov.read_at(8 * MIB + i as u64 * MIB, &mut got)
                .expect("iov");
            let offset = big[i] as usize;
            assert!(
                got == contents[offset..offset + MIB as usize],
                "round {round}: 1 MiB read at {offset} differs"
            );
        }
        let after = scrape(&metrics_addr);
        let one_sided =
            batch_read_bytes(&after, "one_sided") - batch_read_bytes(&before, "one_sided");
        let copied = batch_read_bytes(&after, "copied") - batch_read_bytes(&before, "copied");
        let in_place = batch_read_bytes(&after, "in_place") - batch_read_bytes(&before, "in_place");
        // Every byte outside the hole was written by a replica into the iov.
        let data_bytes: u64 = offsets
            .iter()
            .map(|&offset| (offset, 4096))
            .chain(big.iter().map(|&offset| (offset, MIB)))
            .map(|(offset, len)| {
                let hole = (2 * MIB)..(4 * MIB);
                let overlap = offset.max(hole.start)..(offset + len).min(hole.end);
                len - overlap.end.saturating_sub(overlap.start)
            })
            .sum();
        eprintln!(
            "round {round}: {data_bytes} bytes of data read; the mount's BatchRead bytes: \
             {one_sided} one-sided, {copied} copied, {in_place} landed by its reader"
        );
        // No reply to these reads came inline into the iov: the replicas
        // wrote every one they answered.
        assert_eq!(
            in_place, 0,
            "round {round}: no read byte read from a message by the mount"
        );
        if round == 0 {
            // The first reads also set the RDMA connections up (TLS, then a
            // queue pair per replica) under emulation: a read that outlasts
            // the mount's RPC deadline is retried alone, through a copy,
            // and its late reply still lands one-sided. Every byte came,
            // most of them one-sided.
            assert!(
                one_sided + copied >= data_bytes && one_sided >= data_bytes / 2,
                "round {round}: {one_sided} bytes one-sided and {copied} copied for \
                 {data_bytes} bytes read"
            );
        } else {
            // Connections up: every byte written one-sided, none copied.
            assert_eq!(
                copied, 0,
                "round {round}: no read byte copied through the mount"
            );
            assert_eq!(
                one_sided, data_bytes,
                "round {round}: every byte written one-sided into the iov"
            );
        }
        drop(ior);
        // Deregistered with nothing in flight: the next round's iov is
        // registered afresh.
        drop(iov);
    }
    registered.close().expect("deregister the file");
    drop(client);
    drop(cluster);
}
