//! The Prometheus metrics endpoint every daemon serves.

/// Starts serving `/metrics` on `listen` (`host:port`) for this process.
pub(crate) fn serve(listen: &str) -> anyhow::Result<()> {
    anyhow::bail!("metrics endpoint {listen}: not built yet")
}
