//! `profiler-collector`: the central store of the profiler.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use profiler_collector::{
    config::{check_concurrency, check_message_mib, check_rate, FileConfig, Transport},
    server::{self, CollectorConfig, StoreLocation},
};
use profiler_security::AllowList;

#[derive(Parser)]
#[command(
    version,
    about = "Stores profiles sent by agents and serves flame graphs",
    after_help = "Defaults: gRPC 127.0.0.1:7070, HTTP 127.0.0.1:7080, store sqlite:profiles.db, retention 7d, 16 MiB batches, 10 batches/s per agent (burst 60), 8 batches at once.\nTLS (--tls-cert, --tls-key) or --plaintext must be given."
)]
struct Cli {
    /// TOML file with any of the settings below (snake_case names, e.g. tls_cert).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// PEM certificate (chain) of both ports.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle: agents must present a client certificate it signed (mutual TLS).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Serve without TLS (a warning is logged). Needed when no certificate is set.
    #[arg(long)]
    plaintext: bool,
    /// File of bearer tokens agents must send, one per line (re-read when it changes).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// File of bearer tokens the HTTP API and UI require (browsers: any user, token as password).
    #[arg(long)]
    http_token_file: Option<PathBuf>,
    /// Only clients in this network (ADDRESS/PREFIX or an address) may connect to
    /// either port; repeat for more. Checked before TLS and tokens. Default: any.
    #[arg(long = "allow-cidr", value_name = "NETWORK")]
    allow_cidr: Vec<String>,
    /// Scrape a Go service's net/http/pprof handlers: URL[,NAME=VALUE...][,profiles=cpu+mutex]
    /// e.g. http://10.0.0.5:6060/debug/pprof,service=checkout (repeatable; default profiles:
    /// cpu, mutex, block, allocs, heap, goroutine).
    #[arg(long = "scrape", value_name = "URL", value_parser = profiler_collector::config::parse_scrape_flag)]
    scrape: Vec<profiler_collector::scrape::Target>,
    /// Also scrape the pods annotated profiler.dev/scrape=true (in-cluster API).
    #[arg(long)]
    scrape_kubernetes: bool,
    /// Time between two scrapes of a target (e.g. 15s).
    #[arg(long, value_parser = humantime::parse_duration)]
    scrape_interval: Option<Duration>,
    /// Length of the CPU, mutex, block and allocs profiles of a scrape, in seconds.
    #[arg(long)]
    scrape_seconds: Option<u64>,
    /// Batches per second one agent may send; 0: no limit.
    #[arg(long, value_parser = |s: &str| s.parse::<f64>().map_err(|e| e.to_string()).and_then(check_rate))]
    agent_rate_limit: Option<f64>,
    /// Batches one agent may send at once before its rate limit applies.
    #[arg(long)]
    agent_rate_burst: Option<u32>,
    /// Batches decoded and stored at once; more are pushed back with a retry hint
    /// (default: 8 on SQLite, 64 on ClickHouse, whose writes want large groups).
    #[arg(long, value_parser = |s: &str| s.parse::<usize>().map_err(|e| e.to_string()).and_then(check_concurrency))]
    max_concurrent_batches: Option<usize>,
    /// gRPC address agents send batches to.
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    /// HTTP address of the API and web UI.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Where to store profiles: sqlite:PATH, or clickhouse://[USER@]HOST[:PORT]/DATABASE
    /// (ClickHouse HTTP port, 8123 by default; password from PROFILER_CLICKHOUSE_PASSWORD).
    /// Collectors sharing one ClickHouse database must share --retention too.
    #[arg(long)]
    store: Option<StoreLocation>,
    /// Delete data older than this (e.g. 7d, 24h).
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<Duration>,
    /// Largest accepted batch in MiB.
    #[arg(long, value_parser = |s: &str| s.parse::<usize>().map_err(|e| e.to_string()).and_then(check_message_mib))]
    max_message_mib: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    // Scrapes hold a blocking thread each while a Go service profiles
    // itself (scrape::MAX_IN_FLIGHT); queries and the store need theirs too.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(profiler_collector::scrape::MAX_IN_FLIGHT + 512)
        .build()?;
    let served = runtime.block_on(serve());
    // A scrape still waiting on a service has nothing left to store.
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

async fn serve() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = CollectorConfig::default();
    let mut transport = Transport::default();
    if let Some(path) = &cli.config {
        let file = FileConfig::load(path).map_err(anyhow::Error::msg)?;
        file.apply(&mut config)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        transport = file.transport();
    }
    transport.merge(Transport {
        tls_cert: cli.tls_cert,
        tls_key: cli.tls_key,
        tls_client_ca: cli.tls_client_ca,
        plaintext: cli.plaintext.then_some(true),
    });
    config.tls = transport.resolve().map_err(anyhow::Error::msg)?;
    if let Some(p) = cli.token_file {
        config.token_file = Some(p);
    }
    if let Some(p) = cli.http_token_file {
        config.http_token_file = Some(p);
    }
    if !cli.allow_cidr.is_empty() {
        config.allow = AllowList::parse(&cli.allow_cidr)?;
    }
    config.scrape.targets.extend(cli.scrape);
    if cli.scrape_kubernetes {
        config.scrape.kubernetes =
            Some(profiler_collector::scrape::kubernetes::Discovery::in_cluster());
    }
    if let Some(i) = cli.scrape_interval {
        config.scrape.interval = i;
    }
    if let Some(s) = cli.scrape_seconds {
        config.scrape.seconds = s;
    }
    profiler_collector::config::check_scrape_timing(config.scrape.interval, config.scrape.seconds)
        .map_err(anyhow::Error::msg)?;
    if let Some(r) = cli.agent_rate_limit {
        config.agent_rate_limit = r;
    }
    if let Some(b) = cli.agent_rate_burst {
        config.agent_rate_burst = b.max(1);
    }
    if let Some(n) = cli.max_concurrent_batches {
        config.max_concurrent_batches = Some(n);
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
        .await?;
    Ok(())
}
