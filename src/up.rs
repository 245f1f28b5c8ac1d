//! `flyfs up` and `flyfs down`: a whole single-machine cluster.

#[derive(clap::Args, Debug)]
pub(crate) struct UpArgs {}

#[derive(clap::Args, Debug)]
pub(crate) struct DownArgs {}

pub(crate) fn up(_args: &UpArgs) -> anyhow::Result<()> {
    anyhow::bail!("flyfs up is not built yet")
}

pub(crate) fn down(_args: &DownArgs) -> anyhow::Result<()> {
    anyhow::bail!("flyfs down is not built yet")
}
