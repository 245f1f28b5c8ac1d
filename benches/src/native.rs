//! `flyfs bench native`: reads of one file through native I/O
//! (docs/native-io.md), the application's side of the comparison that
//! `benches/native-vs-fuse` runs against FUSE and against fio on a plain
//! file.
//!
//! Each of `--threads` threads has its own ring and its own part of one
//! shared iov, registers the file once, and keeps `--depth` requests of
//! `--block` bytes in flight for `--seconds`: each completion is checked
//! (the full block, or what is left before the end of the file) and at
//! once replaced by the next request, so depth is concurrency, as fio's
//! `iodepth`. Offsets are sequential per thread (each thread reads its own
//! stretch of the file, wrapping around) or uniformly random, aligned to the
//! block. A failed request is an error, never a number.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use flyfs_usrbio::{Client, Completion, Iov, RegisteredFile};

use crate::size;

#[derive(Debug, clap::Args)]
pub struct NativeArgs {
    /// The mount daemon's native I/O socket (its config's `native_socket`).
    #[arg(long)]
    socket: PathBuf,
    /// The file to read, on the mount.
    #[arg(long)]
    file: PathBuf,
    /// Bytes per request (e.g. 4KiB, 1MiB).
    #[arg(long, default_value = "1MiB", value_parser = size::parse)]
    block: u64,
    /// Requests in flight per thread.
    #[arg(long, default_value_t = 1)]
    depth: u32,
    /// Threads, each with its own ring.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// `seq` or `rand`.
    #[arg(long, default_value = "seq")]
    pattern: String,
    /// How long to read.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    block_bytes: u64,
    depth: u32,
    threads: usize,
    pattern: String,
    seconds: f64,
    bytes: u64,
    requests: u64,
    gib_s: f64,
    iops: f64,
}

pub fn run(args: &NativeArgs) -> anyhow::Result<()> {
    ensure!(
        args.depth >= 1 && args.depth <= 4096,
        "--depth must be 1 to 4096"
    );
    ensure!(args.threads >= 1, "--threads must be at least 1");
    ensure!(
        args.block >= 512 && args.block <= 64 << 20,
        "--block must be 512 B to 64 MiB"
    );
    let random = match args.pattern.as_str() {
        "seq" => false,
        "rand" => true,
        other => bail!("--pattern {other}: `seq` or `rand`"),
    };
    let client = Client::connect(&args.socket)?;
    let length = std::fs::metadata(&args.file)
        .with_context(|| format!("--file {}", args.file.display()))?
        .len();
    ensure!(length >= args.block, "--file is shorter than one block");
    let per_thread = args.block * args.depth as u64;
    let iov = Arc::new(client.register_iov(per_thread * args.threads as u64)?);
    let duration = Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let results: Vec<anyhow::Result<(u64, u64)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..args.threads)
            .map(|thread| {
                let (client, iov) = (client.clone(), iov.clone());
                scope.spawn(move || {
                    let file = std::fs::File::open(&args.file)
                        .with_context(|| format!("opening {}", args.file.display()))?;
                    let registered = client.register_file(file.as_fd())?;
                    drop(file);
                    let worker = Worker {
                        registered: &registered,
                        iov: &iov,
                        iov_base: thread as u64 * per_thread,
                        block: args.block,
                        length,
                        random,
                        // Sequential threads read their own stretch.
                        next: (length / args.threads as u64) * thread as u64 / args.block
                            * args.block,
                        rng: 0x9e37_79b9_7f4a_7c15 ^ (thread as u64 + 1),
                    };
                    let result = worker.run(&client, args.depth, duration);
                    registered.close()?;
                    result
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (mut bytes, mut requests) = (0, 0);
    for result in results {
        let (b, r) = result?;
        bytes += b;
        requests += r;
    }
    let report = Report {
        block_bytes: args.block,
        depth: args.depth,
        threads: args.threads,
        pattern: args.pattern.clone(),
        seconds: elapsed,
        bytes,
        requests,
        gib_s: bytes as f64 / elapsed / (1u64 << 30) as f64,
        iops: requests as f64 / elapsed,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "native {} {} B depth {} threads {}: {:.3} GiB/s, {:.0} IOPS",
            report.pattern,
            report.block_bytes,
            report.depth,
            report.threads,
            report.gib_s,
            report.iops
        );
    }
    Ok(())
}

struct Worker<'a> {
    registered: &'a RegisteredFile,
    iov: &'a Iov,
    iov_base: u64,
    block: u64,
    length: u64,
    random: bool,
    next: u64,
    rng: u64,
}

impl Worker<'_> {
    fn offset(&mut self) -> u64 {
        let blocks = self.length / self.block;
        if self.random {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            (self.rng % blocks) * self.block
        } else {
            let at = self.next;
            self.next = if at + self.block >= blocks * self.block {
                0
            } else {
                at + self.block
            };
            at
        }
    }

    /// Keeps `depth` requests in flight until `duration` has passed; the
    /// bytes and requests completed.
    fn run(
        mut self,
        client: &Client,
        depth: u32,
        duration: Duration,
    ) -> anyhow::Result<(u64, u64)> {
        let mut ior = client.create_ior(depth.next_power_of_two())?;
        let mut offsets = vec![0u64; depth as usize];
        for slot in 0..depth {
            let offset = self.offset();
            offsets[slot as usize] = offset;
            ior.prepare_read(
                self.registered,
                self.iov,
                self.iov_base + slot as u64 * self.block,
                self.block as u32,
                offset,
                slot as u64,
            )?;
        }
        ior.submit()?;
        let started = Instant::now();
        let (mut bytes, mut requests) = (0u64, 0u64);
        let mut done: Vec<Completion> = Vec::with_capacity(depth as usize);
        let mut in_flight = depth as usize;
        while in_flight > 0 {
            done.clear();
            ior.wait(&mut done, 1, Some(Duration::from_secs(60)))?;
            let more = started.elapsed() < duration;
            for completion in &done {
                let slot = completion.user_data as usize;
                let want = (self.length - offsets[slot]).min(self.block);
                let got = completion
                    .bytes()
                    .with_context(|| format!("read at {}: {}", offsets[slot], ior.last_error()))?;
                ensure!(
                    got == want,
                    "read at {}: {got} bytes of {want}",
                    offsets[slot]
                );
                bytes += got;
                requests += 1;
                if more {
                    let offset = self.offset();
                    offsets[slot] = offset;
                    ior.prepare_read(
                        self.registered,
                        self.iov,
                        self.iov_base + slot as u64 * self.block,
                        self.block as u32,
                        offset,
                        slot as u64,
                    )?;
                } else {
                    in_flight -= 1;
                }
            }
            ior.submit()?;
        }
        Ok((bytes, requests))
    }
}
