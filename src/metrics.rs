//! The Prometheus metrics endpoint every daemon serves when its config says
//! `metrics_listen = "host:port"`: `GET /metrics` answers the text
//! exposition format of everything recorded through the `metrics` facade in
//! this process (the RPC counters and latency histograms of `flyfs_rpc`, the
//! manager's cluster gauges, a storage node's disk usage, and so on).
//!
//! The recorder is `metrics-exporter-prometheus`'s; the HTTP side is a few
//! lines on a thread of its own (a scrape every few seconds needs no HTTP
//! stack, and a daemon's async runtime is not slowed by rendering).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Histogram buckets for every histogram, in seconds: 50 µs to 10 s (RPC
/// latencies on loopback start in the tens of microseconds).
const BUCKETS_SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// How often the recorder drains its histogram samples into buckets, so
/// that a process nobody scrapes does not grow.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How long one scrape may take to send its request or read the answer.
const SCRAPE_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts serving `/metrics` on `listen` (`host:port`) for this process:
/// installs the process's metrics recorder, enables the RPC metrics and
/// serves from a background thread. Fails if the address cannot be bound
/// or a recorder is already installed (call it once per process).
pub(crate) fn serve(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .with_context(|| format!("metrics endpoint: cannot listen on {listen}"))?;
    let bound = listener
        .local_addr()
        .map_or_else(|_| listen.to_string(), |a| a.to_string());
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS_SECONDS)
        .context("metrics endpoint: histogram buckets")?
        .install_recorder()
        .context("metrics endpoint: installing the recorder")?;
    flyfs_rpc::metrics::enable();
    metrics::gauge!("flyfs_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("flyfs-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        })
        .context("metrics endpoint: starting the upkeep thread")?;
    std::thread::Builder::new()
        .name("flyfs-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(error) = answer(stream, &handle) {
                            tracing::debug!(%error, "metrics scrape failed");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "metrics endpoint: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .context("metrics endpoint: starting its thread")?;
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(())
}

/// Reads one HTTP request and answers it, then closes the connection.
fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    stream.set_read_timeout(Some(SCRAPE_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_IO_TIMEOUT))?;
    let request = read_head(&mut stream)?;
    let (status, content_type, body) = respond(&request, || handle.render());
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !request.starts_with("HEAD ") {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

/// The request line and headers, up to the blank line (at most 8 KiB).
fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 8192 {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Status line, content type and body for a request head.
fn respond(request: &str, render: impl FnOnce() -> String) -> (&'static str, &'static str, String) {
    let line = request.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    // Prometheus may append query parameters; they change nothing here.
    let path = target.split('?').next().unwrap_or("");
    const TEXT: &str = "text/plain; charset=utf-8";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        ("GET" | "HEAD", "/") => ("200 OK", TEXT, "flyfs: metrics at /metrics\n".into()),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            TEXT,
            format!("no such page: {path}; metrics are at /metrics\n"),
        ),
        _ => ("405 Method Not Allowed", TEXT, "only GET /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_renders() {
        let render = || "flyfs_x 1\n".to_string();
        let (status, kind, body) = respond("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", render);
        assert_eq!((status, body.as_str()), ("200 OK", "flyfs_x 1\n"));
        assert!(kind.contains("version=0.0.4"));
        let (status, _, _) = respond("GET /metrics?x=1 HTTP/1.1\r\n\r\n", render);
        assert_eq!(status, "200 OK");
        let (status, _, body) = respond("GET /other HTTP/1.1\r\n\r\n", render);
        assert_eq!(status, "404 Not Found");
        assert!(body.contains("/metrics"));
        let (status, _, _) = respond("POST /metrics HTTP/1.1\r\n\r\n", render);
        assert!(status.starts_with("405"));
        let (status, _, _) = respond("", render);
        assert!(status.starts_with("405"));
    }
}
