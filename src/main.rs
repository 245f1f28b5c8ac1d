//! The `flyfs` binary: the composition root where devices, engines and (later)
//! daemons are chosen and wired together. Today: `format` and `bench engine`;
//! the storage, metadata and FUSE daemons, `up`/`down` and `admin` arrive with
//! the later issues.
#![deny(unsafe_code)]

mod bench;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use flyfs_bypass::uring::{UringConfig, UringDevice};
use flyfs_bypass::{BufferPool, PoolConfig};
use flyfs_chunk_engine::{Engine, FormatOptions};

#[derive(Parser, Debug)]
#[command(
    name = "flyfs",
    version,
    about = "flyfs: a distributed file system for AI training and inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Format a block device or file for the chunk engine.
    Format {
        /// Block device or regular file.
        #[arg(long)]
        device: PathBuf,
        /// Create (or resize) a regular file of this many bytes first.
        #[arg(long, value_parser = bench::parse_size)]
        size: Option<u64>,
        /// Smallest chunk slot in bytes (power of two, >= 4 KiB).
        #[arg(long, default_value = "64KiB", value_parser = bench::parse_size)]
        chunk_size_min: u64,
        /// Largest chunk slot in bytes (power of two, <= 64 MiB).
        #[arg(long, default_value = "64MiB", value_parser = bench::parse_size)]
        chunk_size_max: u64,
        /// Journal size in bytes (default: 1% of the device, 1 to 256 MiB).
        #[arg(long, value_parser = bench::parse_size)]
        journal_size: Option<u64>,
        /// Format even if the device holds a flyfs chunk engine (destroys it).
        #[arg(long)]
        force: bool,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Chunk engine on io_uring: 1 MiB chunk writes and reads, 4 KiB random reads.
    Engine(bench::EngineArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLYFS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Format {
            device,
            size,
            chunk_size_min,
            chunk_size_max,
            journal_size,
            force,
        } => {
            let options = FormatOptions {
                chunk_size_min,
                chunk_size_max,
                journal_bytes: journal_size,
                force,
            };
            format(device, size, &options)
        }
        Command::Bench {
            what: BenchCommand::Engine(args),
        } => bench::engine(&args),
    }
}

fn format(device: PathBuf, size: Option<u64>, options: &FormatOptions) -> anyhow::Result<()> {
    let pool = BufferPool::new(&PoolConfig::default()).context("allocating I/O buffers")?;
    let dev = match size {
        Some(size) => {
            if size % 4096 != 0 {
                bail!("--size {size} is not a multiple of 4096");
            }
            UringDevice::create_file(&device, size, &UringConfig::default(), Some(&pool))
        }
        None => UringDevice::open(&device, &UringConfig::default(), Some(&pool)),
    }
    .with_context(|| format!("opening {}", device.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let sb = runtime.block_on(Engine::format(&dev, options))?;
    println!(
        "formatted {}: {} groups of {} bytes, chunk sizes {}..{} bytes, journal {} bytes",
        device.display(),
        sb.group_count,
        sb.group_bytes(),
        1u64 << sb.class_log2_min,
        1u64 << sb.class_log2_max,
        sb.journal_bytes
    );
    Ok(())
}
