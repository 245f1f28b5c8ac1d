//! The `flyfs` binary: the composition root where devices, engines, stores
//! and daemons are chosen and wired together, and the command line: `format`,
//! the cluster manager (`mgmtd`) and storage (`storage`) daemons, the
//! metadata service (`meta`), the FUSE daemon (`mount`), a whole
//! single-machine cluster (`up`/`down`), `admin`, and `bench
//! engine|storage|meta|kv|native|chaos`, which run flyfs-benches.
#![deny(unsafe_code)]

mod admin;
mod certs;
mod daemon;
mod membership;
mod meta_daemon;
mod metrics;
mod mount;
mod up;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use flyfs_benches::size::parse as parse_size;
use flyfs_bypass::uring::{UringConfig, UringDevice};
use flyfs_bypass::{AnyDevice, DeviceConfig, open_device};
use flyfs_bypass::{BufferPool, PoolConfig};
use flyfs_chunk_engine::{Engine, FormatOptions};
use flyfs_deploy::config::{ConfigFile, MetaDaemonConfig, MgmtdConfig, StorageDaemonConfig};

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
        /// Block device, regular file, or `vfio:<PCI address>` (an NVMe
        /// controller bound to vfio-pci, driven from userspace).
        #[arg(long)]
        device: PathBuf,
        /// Create (or resize) a regular file of this many bytes first.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Smallest chunk slot in bytes (power of two, >= 4 KiB).
        #[arg(long, default_value = "64KiB", value_parser = parse_size)]
        chunk_size_min: u64,
        /// Largest chunk slot in bytes (power of two, <= 64 MiB).
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        chunk_size_max: u64,
        /// Journal size in bytes (default: 1% of the device, 1 to 256 MiB).
        #[arg(long, value_parser = parse_size)]
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
    /// Run the cluster manager until SIGTERM or SIGINT.
    Mgmtd {
        /// TOML config (see deploy/mgmtd.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a storage node until SIGTERM or SIGINT.
    Storage {
        /// TOML config (see deploy/storage.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a metadata service until SIGTERM or SIGINT.
    Meta {
        /// TOML config (see deploy/meta.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Mount flyfs through FUSE until SIGTERM or SIGINT (then unmount).
    Mount {
        /// TOML config (see deploy/mount.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Bring up a whole cluster on this machine and mount it.
    Up(up::UpArgs),
    /// Stop what `flyfs up` started (the data stays).
    Down(up::DownArgs),
    /// Inspect and change the cluster through its manager.
    Admin(admin::AdminArgs),
    /// Make a cluster CA and issue credentials (docs/security.md).
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Chunk engine on io_uring: 1 MiB chunk writes and reads, 4 KiB random reads.
    Engine(flyfs_benches::engine::EngineArgs),
    /// A cluster of real processes (manager and three storage daemons) on
    /// loopback: 1 MiB chunk writes and reads over chains, 4 KiB write latency.
    Storage(flyfs_benches::storage::StorageArgs),
    /// The metadata service over loopback TCP on the embedded store:
    /// creates, stats, renames and unlinks per second, and a 10k-entry readdir.
    Meta(flyfs_benches::meta::MetaArgs),
    /// The KV cache for inference on a cluster of real processes (storage
    /// and metadata daemons) with four client processes: put and get
    /// throughput and latency, removal rate.
    Kv(flyfs_benches::kv::KvArgs),
    /// Native (zero-copy) I/O reads of a file on a mount, through its
    /// daemon's socket: GiB/s and IOPS at a block size, depth and thread count.
    Native(flyfs_benches::native::NativeArgs),
    /// A soak of a cluster of real daemons (docs/chaos.md): a verifying
    /// workload while storage nodes, the metadata service and the manager
    /// are killed, restarted, partitioned and replaced; one JSON summary.
    Chaos(flyfs_benches::chaos::ChaosArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Daemons say where they listen and what they host; tools stay quiet
    // unless something is wrong. FLYFS_LOG overrides both.
    let default_filter = match cli.command {
        Command::Mgmtd { .. }
        | Command::Storage { .. }
        | Command::Meta { .. }
        | Command::Mount { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLYFS_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        // Daemons usually log to files: colour codes only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
        } => flyfs_benches::engine::run(&args),
        Command::Bench {
            what: BenchCommand::Storage(args),
        } => flyfs_benches::storage::run(&args),
        Command::Bench {
            what: BenchCommand::Meta(args),
        } => flyfs_benches::meta::run(&args),
        Command::Bench {
            what: BenchCommand::Kv(args),
        } => flyfs_benches::kv::run(&args),
        Command::Bench {
            what: BenchCommand::Native(args),
        } => flyfs_benches::native::run(&args),
        Command::Bench {
            what: BenchCommand::Chaos(args),
        } => flyfs_benches::chaos::run(&args),
        Command::Mgmtd { config } => {
            let config = MgmtdConfig::load(&config)?;
            let ended =
                daemon_runtime(config.runtime_threads)?.block_on(daemon::run_mgmtd(&config));
            daemon::stop_store_clients();
            ended
        }
        Command::Storage { config } => {
            let config = StorageDaemonConfig::load(&config)?;
            daemon_runtime(config.runtime_threads)?.block_on(daemon::run_storage(&config))
        }
        Command::Meta { config } => {
            let config = MetaDaemonConfig::load(&config)?;
            let ended =
                daemon_runtime(config.runtime_threads)?.block_on(meta_daemon::run_meta(&config));
            daemon::stop_store_clients();
            ended
        }
        Command::Mount { config } => mount::run(&config),
        Command::Up(args) => up::up(&args),
        Command::Down(args) => up::down(&args),
        Command::Certs { command } => certs::run(&command),
        Command::Admin(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(admin::run(&args)),
    }
}

/// The daemons' runtime: RPC connections and handlers spread over the cores
/// (device I/O runs on each device's reactor thread, journal commits on the
/// engine's journal thread), `threads` workers or, for 0, one per core.
fn daemon_runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .thread_name("flyfs-worker")
        .build()
        .context("starting the tokio runtime")
}

fn format(device: PathBuf, size: Option<u64>, options: &FormatOptions) -> anyhow::Result<()> {
    let pool = BufferPool::new(&PoolConfig::default()).context("allocating I/O buffers")?;
    let dev = match size {
        Some(size) => {
            if size % 4096 != 0 {
                bail!("--size {size} is not a multiple of 4096");
            }
            if device
                .to_str()
                .and_then(flyfs_bypass::any::vfio_address)
                .is_some()
            {
                bail!(
                    "--size creates a file; {} names an NVMe controller",
                    device.display()
                );
            }
            UringDevice::create_file(&device, size, &UringConfig::default(), Some(&pool))
                .map(AnyDevice::Uring)
        }
        None => open_device(&device, &DeviceConfig::default(), Some(&pool)),
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
