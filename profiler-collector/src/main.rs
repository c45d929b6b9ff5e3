//! `profiler-collector`: the central store of the profiler.
use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use profiler_collector::server::{self, CollectorConfig, StoreLocation};

#[derive(Parser)]
#[command(
    version,
    about = "Stores profiles sent by agents and serves flame graphs"
)]
struct Cli {
    /// gRPC address agents send batches to.
    #[arg(long, default_value = server::DEFAULT_GRPC_LISTEN)]
    grpc_listen: SocketAddr,
    /// HTTP address of the API and web UI.
    #[arg(long, default_value = server::DEFAULT_HTTP_LISTEN)]
    http_listen: SocketAddr,
    /// Where to store profiles: sqlite:PATH.
    #[arg(long, default_value = "sqlite:profiles.db")]
    store: StoreLocation,
    /// Delete data older than this (e.g. 7d, 24h).
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Largest accepted batch in MiB.
    #[arg(long, default_value_t = 16)]
    max_message_mib: usize,
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
    if !(1..=1024).contains(&cli.max_message_mib) {
        anyhow::bail!("--max-message-mib must be 1-1024");
    }
    let config = CollectorConfig {
        grpc_listen: cli.grpc_listen,
        http_listen: cli.http_listen,
        store: cli.store,
        retention: cli.retention,
        max_message_bytes: cli.max_message_mib << 20,
        ..CollectorConfig::default()
    };
    let running = server::start(config).await?;
    eprintln!(
        "collector: gRPC ingest on {}, UI and API on http://{}/",
        running.grpc_addr, running.http_addr
    );
    running
        .run_until(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
