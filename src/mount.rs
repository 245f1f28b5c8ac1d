//! `flyfs mount --config F`: the FUSE daemon and its config.

use std::path::Path;

pub(crate) fn run(config: &Path) -> anyhow::Result<()> {
    anyhow::bail!("{}: flyfs mount is not built yet", config.display())
}
