//! `flyfs bench meta`: metadata operations per second through the metadata
//! service.
//!
//! It starts what it needs in this process: the embedded store (fjall, with
//! a sync per commit, as in production) in a temporary directory and a
//! metadata service on a loopback TCP port, then drives it over real RPC
//! from `--clients` clients, each with its own connections. Phases, each
//! timed on its own:
//!
//! 1. create: every client creates `--files` files in a directory of its own
//!    (as mdtest's unique-directory mode; a shared directory measures
//!    conflicts on one directory instead);
//! 2. stat: every client stats its files by inode (getattr);
//! 3. readdir: one client lists a directory of `--readdir-entries` entries
//!    (10,000 by default), in pages of 1,000, with attributes; the time for
//!    the whole listing;
//! 4. rename: every client renames each of its files within its directory;
//! 5. unlink: every client unlinks its files.
//!
//! No storage daemon is started: none of these operations reads or writes
//! file data (unlinked files wait in the GC queue, whose delay outlasts the
//! run). Chains come from a fixed chain table, as a manager would publish.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_fs_meta::gc::GcStats;
use flyfs_fs_meta::ns::{LayoutSpec, Namespace, NsConfig, StaticChainTables};
use flyfs_fs_meta::service::{CallerPolicy, MetaService};
use flyfs_kv::fjall::{FjallKv, FjallOptions};
use flyfs_proto::auth::Principal;
use flyfs_proto::ids::{ChainTableId, ClientId, InodeId};
use flyfs_proto::wire::meta::{self as wire, User};
use flyfs_rpc::{ClusterCa, Network, Server, ServerConfig, Tcp};

const ROOT: InodeId = InodeId(1);

#[derive(Debug, clap::Args)]
pub struct MetaArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Files each client creates, stats, renames and unlinks.
    #[arg(long, default_value_t = 2000)]
    files: usize,
    /// Entries of the directory the readdir phase lists.
    #[arg(long, default_value_t = 10_000)]
    readdir_entries: usize,
    /// Directory for the store (a fresh temporary one by default).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Results {
    create_per_s: f64,
    stat_per_s: f64,
    rename_per_s: f64,
    unlink_per_s: f64,
    readdir_10k_ms: f64,
    readdir_entries: usize,
    clients: usize,
    files_per_client: usize,
    store: &'static str,
}

pub fn run(args: &MetaArgs) -> anyhow::Result<()> {
    ensure!(args.clients >= 1, "--clients must be at least 1");
    ensure!(args.files >= 1, "--files must be at least 1");
    ensure!(
        args.readdir_entries >= 1,
        "--readdir-entries must be at least 1"
    );
    let temp;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("flyfs-bench-meta-")
                .tempdir_in("/var/tmp")
                .context("creating a directory for the store")?;
            temp.path().to_path_buf()
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let results = runtime.block_on(measure(args, &dir))?;
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        println!(
            "metadata service, {} client(s), embedded store (fjall, sync per commit):",
            results.clients
        );
        println!("  create  {:>10.0} ops/s", results.create_per_s);
        println!("  stat    {:>10.0} ops/s", results.stat_per_s);
        println!("  rename  {:>10.0} ops/s", results.rename_per_s);
        println!("  unlink  {:>10.0} ops/s", results.unlink_per_s);
        println!(
            "  readdir of {} entries: {:.1} ms",
            results.readdir_entries, results.readdir_10k_ms
        );
    }
    Ok(())
}

async fn measure(args: &MetaArgs, dir: &std::path::Path) -> anyhow::Result<Results> {
    let kv = FjallKv::open(dir.join("meta"), FjallOptions::default())
        .with_context(|| format!("opening the store in {}", dir.display()))?;
    let table = ChainTableId(1);
    let spec = LayoutSpec {
        chain_table: table,
        chunk_size: 1 << 20,
        stripe: 3,
    };
    let mut config = NsConfig::new(spec, Arc::new(StaticChainTables::single(table, 6)));
    // Longer than any run: unlinked files stay queued, no storage needed.
    config.gc_delay_ms = 24 * 3600 * 1000;
    let ns = Namespace::open(kv, config)
        .await
        .context("opening the namespace")?;
    // The service asks storage only for lengths, truncates and statfs,
    // which this benchmark never calls; the client points nowhere.
    // Authenticated like a deployment: a CA of the bench's own, in memory.
    let ca = ClusterCa::generate("bench").context("making a CA")?;
    let meta_credentials = ca
        .credentials(Principal::Meta("meta".into()))
        .context("issuing the metadata service's credentials")?;
    let client_credentials = ca
        .credentials(Principal::Client("bench".into()))
        .context("issuing the clients' credentials")?;
    let storage = StorageClient::new(
        ClientConfig::new(["127.0.0.1:9"], ClientId(1)),
        Tcp,
        meta_credentials.clone(),
    );
    let listener = Tcp.bind("127.0.0.1:0").await.context("binding")?;
    let server = Server::new(
        MetaService::new(
            ns,
            storage,
            Arc::new(GcStats::default()),
            CallerPolicy::default(),
        ),
        ServerConfig::default(),
        meta_credentials,
    )
    .spawn(listener)
    .context("starting the metadata service")?;
    let addr = server.local_addr().to_string();
    let clients: Vec<_> = (0..args.clients)
        .map(|_| {
            MetaClient::new(
                Tcp,
                MetaClientConfig::new(vec![addr.clone()]),
                client_credentials.clone(),
            )
        })
        .collect();
    let root = User::root();

    // A directory per client.
    let mut dirs = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let made = client
            .call::<wire::Mkdir, _>(&wire::MkdirReq {
                user: root.clone(),
                parent: ROOT,
                name: format!("client-{i}").into_bytes(),
                mode: 0o755,
            })
            .await
            .map_err(|e| anyhow::anyhow!("mkdir: {e}"))?;
        dirs.push(made.ino);
    }
    let files = args.files;
    let ops = (files * args.clients) as f64;

    let (seconds, inodes) = phase(&clients, &dirs, |client, dir, _| async move {
        let mut inodes = Vec::with_capacity(files);
        for f in 0..files {
            let created = client
                .call::<wire::Create, _>(&wire::CreateReq {
                    user: User::root(),
                    parent: dir,
                    name: format!("f{f}").into_bytes(),
                    mode: 0o644,
                    exclusive: true,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("create: {e}"))?;
            inodes.push(created.attr.ino);
        }
        Ok(inodes)
    })
    .await?;
    let create_per_s = ops / seconds;
    let inodes = Arc::new(inodes);

    let (seconds, _) = phase(&clients, &dirs, |client, _, i| {
        let inodes = inodes.clone();
        async move {
            for &ino in &inodes[i] {
                client
                    .call::<wire::Stat, _>(&wire::StatReq {
                        user: User::root(),
                        ino,
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("stat: {e}"))?;
            }
            Ok(())
        }
    })
    .await?;
    let stat_per_s = ops / seconds;

    let readdir_10k_ms = readdir(&clients[0], args.readdir_entries).await?;

    let (seconds, _) = phase(&clients, &dirs, |client, dir, _| async move {
        for f in 0..files {
            client
                .call::<wire::Rename, _>(&wire::RenameReq {
                    user: User::root(),
                    old_parent: dir,
                    old_name: format!("f{f}").into_bytes(),
                    new_parent: dir,
                    new_name: format!("g{f}").into_bytes(),
                })
                .await
                .map_err(|e| anyhow::anyhow!("rename: {e}"))?;
        }
        Ok(())
    })
    .await?;
    let rename_per_s = ops / seconds;

    let (seconds, _) = phase(&clients, &dirs, |client, dir, _| async move {
        for f in 0..files {
            client
                .call::<wire::Unlink, _>(&wire::EntryReq {
                    user: User::root(),
                    parent: dir,
                    name: format!("g{f}").into_bytes(),
                })
                .await
                .map_err(|e| anyhow::anyhow!("unlink: {e}"))?;
        }
        Ok(())
    })
    .await?;
    let unlink_per_s = ops / seconds;
    server.shutdown().await;
    Ok(Results {
        create_per_s,
        stat_per_s,
        rename_per_s,
        unlink_per_s,
        readdir_10k_ms,
        readdir_entries: args.readdir_entries,
        clients: args.clients,
        files_per_client: files,
        store: "fjall",
    })
}

/// Runs `work` on every client at once (client, its directory, its index);
/// returns the wall time and each client's result.
async fn phase<F, Fut, T>(
    clients: &[Arc<MetaClient<Tcp>>],
    dirs: &[InodeId],
    work: F,
) -> anyhow::Result<(f64, Vec<T>)>
where
    F: Fn(Arc<MetaClient<Tcp>>, InodeId, usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .zip(dirs)
        .enumerate()
        .map(|(i, (client, dir))| tokio::spawn(work(client.clone(), *dir, i)))
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.context("a client task panicked")??);
    }
    Ok((start.elapsed().as_secs_f64(), results))
}

/// Fills a directory with `entries` files, then lists it with attributes in
/// pages of 1,000; returns the listing's time in milliseconds.
async fn readdir(client: &MetaClient<Tcp>, entries: usize) -> anyhow::Result<f64> {
    let dir = client
        .call::<wire::Mkdir, _>(&wire::MkdirReq {
            user: User::root(),
            parent: ROOT,
            name: b"listing".to_vec(),
            mode: 0o755,
        })
        .await
        .map_err(|e| anyhow::anyhow!("mkdir: {e}"))?;
    for f in 0..entries {
        client
            .call::<wire::Create, _>(&wire::CreateReq {
                user: User::root(),
                parent: dir.ino,
                name: format!("entry-{f:06}").into_bytes(),
                mode: 0o644,
                exclusive: true,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("create: {e}"))?;
    }
    let start = Instant::now();
    let mut after = Vec::new();
    let mut listed = 0;
    loop {
        let page = client
            .call::<wire::Readdir, _>(&wire::ReaddirReq {
                user: User::root(),
                dir: dir.ino,
                after: after.clone(),
                limit: 1000,
                plus: true,
            })
            .await
            .map_err(|e| anyhow::anyhow!("readdir: {e}"))?;
        listed += page.entries.len();
        match page.entries.last() {
            Some(last) if page.more => after = last.name.clone(),
            _ => break,
        }
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if listed != entries {
        bail!("readdir listed {listed} entries of {entries}");
    }
    Ok(ms)
}
