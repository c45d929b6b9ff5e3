//! `profiler-collector`: the central store of the profiler.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use profiler_collector::{
    config::{check_message_mib, FileConfig},
    server::{self, CollectorConfig, StoreLocation},
};

#[derive(Parser)]
#[command(
    version,
    about = "Stores profiles sent by agents and serves flame graphs",
    after_help = "Defaults: gRPC 127.0.0.1:7070, HTTP 127.0.0.1:7080, store sqlite:profiles.db, retention 7d, 16 MiB batches."
)]
struct Cli {
    /// TOML file with any of: grpc_listen, http_listen, store, retention, max_message_mib.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// gRPC address agents send batches to.
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    /// HTTP address of the API and web UI.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Where to store profiles: sqlite:PATH.
    #[arg(long)]
    store: Option<StoreLocation>,
    /// Delete data older than this (e.g. 7d, 24h).
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<Duration>,
    /// Largest accepted batch in MiB.
    #[arg(long, value_parser = |s: &str| s.parse::<usize>().map_err(|e| e.to_string()).and_then(check_message_mib))]
    max_message_mib: Option<usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = CollectorConfig::default();
    if let Some(path) = &cli.config {
        FileConfig::load(path)
            .and_then(|file| file.apply(&mut config))
            .map_err(anyhow::Error::msg)?;
    }
    if let Some(a) = cli.grpc_listen {
        config.grpc_listen = a;
    }
    if let Some(a) = cli.http_listen {
        config.http_listen = a;
    }
    if let Some(s) = cli.store {
        config.store = s;
    }
    if let Some(r) = cli.retention {
        config.retention = r;
    }
    if let Some(m) = cli.max_message_mib {
        config.max_message_bytes = m << 20;
    }
    let running = server::start(config).await?;
    eprintln!(
        "collector: gRPC ingest on {}, UI and API on http://{}/",
        running.grpc_addr, running.http_addr
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    running
        .run_until(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await
}
