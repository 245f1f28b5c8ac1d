//! Credentials for the `flyfs` binary: loading a daemon's or a mount's
//! `[tls]` credentials (refusing to start without them), and the `flyfs
//! certs` commands that make a cluster CA and issue credentials from it
//! (docs/security.md; the deployment guide says how to use them across
//! machines).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use flyfs_deploy::config::TlsConfig;
use flyfs_proto::auth::Principal;
use flyfs_proto::ids::NodeId;
use flyfs_rpc::{ClusterCa, Credentials};

/// How to get credentials, for the errors of a process that has none.
const HOW_TO_GET_CREDENTIALS: &str = "every flyfs connection is mutual TLS with the cluster CA. \
    `flyfs up --data DIR` makes credentials for a local cluster under DIR/tls/; for other \
    machines, issue them with `flyfs certs issue --ca CA_DIR --role ROLE --name NAME --out DIR` \
    (docs/deployment.md, \"Credentials\") and name them in the config's [tls] table \
    (ca, cert, key)";

/// The credentials of a daemon or mount config's `[tls]` table; `what`
/// names the process in errors ("the storage node").
pub(crate) fn from_config(tls: Option<&TlsConfig>, what: &str) -> anyhow::Result<Credentials> {
    let Some(tls) = tls else {
        anyhow::bail!("{what} has no [tls] table in its config: {HOW_TO_GET_CREDENTIALS}");
    };
    Credentials::load(&tls.ca, &tls.cert, &tls.key)
        .with_context(|| format!("loading the credentials of {what} ([tls] of its config)"))
}

/// The admin credentials `flyfs admin` uses: `--credentials DIR`
/// (`DIR/admin.pem`), else `--data DIR` of `flyfs up` (`DIR/tls/admin.pem`).
pub(crate) fn admin(
    credentials: Option<&Path>,
    data: Option<&Path>,
) -> anyhow::Result<Credentials> {
    let dir = match (credentials, data) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(data)) => data.join("tls"),
        (None, None) => anyhow::bail!(
            "flyfs admin needs admin credentials: --data DIR (a `flyfs up` data directory, \
             using DIR/tls/admin.pem and admin.key) or --credentials DIR (a directory with \
             ca.pem, admin.pem and admin.key, as `flyfs certs issue --role admin` writes)"
        ),
    };
    Credentials::load_dir(&dir, "admin")
        .with_context(|| format!("loading the admin credentials in {}", dir.display()))
}

/// `flyfs certs`.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum CertsCommand {
    /// Make a cluster CA: DIR/ca.pem and DIR/ca.key (mode 0600). Keep the
    /// key on the machine that issues credentials.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The cluster's name, in every identity the CA issues.
        #[arg(long, default_value = "flyfs")]
        cluster: String,
    },
    /// Issue credentials from the CA in --ca: OUT/ca.pem, OUT/<stem>.pem and
    /// OUT/<stem>.key (0600), where the stem is `admin`, `mount`, `mgmtd`,
    /// `meta` or `storage<N>` as the example configs name them.
    Issue {
        /// The CA's directory (ca.pem, ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// storage, meta, mgmt, client or admin.
        #[arg(long)]
        role: String,
        /// The principal's name: a storage node's id for `storage`.
        #[arg(long)]
        name: String,
        /// The uid an admin acts as.
        #[arg(long)]
        uid: Option<u32>,
        /// The gid an admin acts as.
        #[arg(long)]
        gid: Option<u32>,
        /// Where to write the credentials.
        #[arg(long)]
        out: PathBuf,
        /// The file stem (default: as described above).
        #[arg(long)]
        stem: Option<String>,
    },
}

pub(crate) fn run(command: &CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init { dir, cluster } => {
            if dir.join(flyfs_rpc::tls::CA_KEY_FILE).exists() {
                anyhow::bail!(
                    "{} already holds a CA key: refusing to replace it (every credential it \
                     issued would stop working)",
                    dir.display()
                );
            }
            let ca = ClusterCa::generate(cluster)?;
            ca.save(dir)?;
            println!("cluster CA for {cluster:?} written to {}", dir.display());
            Ok(())
        }
        CertsCommand::Issue {
            ca,
            role,
            name,
            uid,
            gid,
            out,
            stem,
        } => {
            let ca = ClusterCa::load(ca)?;
            let (principal, default_stem) = principal(role, name, *uid, *gid)?;
            let stem = stem.clone().unwrap_or(default_stem);
            let paths = ca.write_credentials(principal, out, &stem)?;
            println!(
                "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}",
                paths.ca.display().to_string(),
                paths.cert.display().to_string(),
                paths.key.display().to_string()
            );
            Ok(())
        }
    }
}

/// The principal `--role` and `--name` (and `--uid`/`--gid`) describe, and
/// the file stem the example configs use for it.
fn principal(
    role: &str,
    name: &str,
    uid: Option<u32>,
    gid: Option<u32>,
) -> anyhow::Result<(Principal, String)> {
    if role != "admin" && (uid.is_some() || gid.is_some()) {
        anyhow::bail!("--uid and --gid are for --role admin only");
    }
    Ok(match role {
        "storage" => {
            let node: u32 = name
                .parse()
                .with_context(|| format!("--name {name:?}: a storage node is named by its id"))?;
            (Principal::Storage(NodeId(node)), format!("storage{node}"))
        }
        "meta" => (Principal::Meta(name.to_owned()), String::from("meta")),
        "mgmt" => (Principal::Mgmt(name.to_owned()), String::from("mgmtd")),
        "client" => (Principal::Client(name.to_owned()), String::from("mount")),
        "admin" => {
            let (Some(uid), Some(gid)) = (uid, gid) else {
                anyhow::bail!("--role admin needs --uid and --gid: the user the admin acts as");
            };
            (
                Principal::Admin {
                    name: name.to_owned(),
                    uid,
                    gid,
                },
                String::from("admin"),
            )
        }
        other => anyhow::bail!("--role {other:?}: expected storage, meta, mgmt, client or admin"),
    })
}
