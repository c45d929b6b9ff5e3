//! The collector side of the end-to-end tests: a collector in this process
//! (plain text on loopback), the agent's export options for it, and reading
//! its HTTP API as a user would.
use std::{path::Path, time::Duration};

use profiler_agent::export::ExportOptions;
use profiler_collector::server::{self, CollectorConfig, RunningCollector, StoreLocation};

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A collector on `grpc` and `http` (`127.0.0.1:0`: any free port) storing
/// into the SQLite file `db`.
pub fn collector_config(db: &Path, grpc: &str, http: &str) -> CollectorConfig {
    CollectorConfig {
        grpc_listen: grpc.parse().unwrap(),
        http_listen: http.parse().unwrap(),
        store: StoreLocation::Sqlite(db.to_path_buf()),
        ..CollectorConfig::default()
    }
}

pub fn start_collector(
    rt: &tokio::runtime::Runtime,
    db: &Path,
    grpc: &str,
    http: &str,
) -> RunningCollector {
    rt.block_on(server::start(collector_config(db, grpc, http)))
        .expect("collector starts")
}

pub fn export_to(c: &RunningCollector) -> ExportOptions {
    ExportOptions {
        collector: format!("http://{}", c.grpc_addr),
        node: "test-node".into(),
        queue_bytes: 16 << 20,
        flush_timeout: Duration::from_secs(20),
        spill_dir: None,
        spill_bytes: 0,
        security: Default::default(),
    }
}

pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into();
    let mut resp = agent.get(&format!("http://{addr}{path}")).call().unwrap();
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .unwrap();
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    body
}

pub fn folded(addr: std::net::SocketAddr, query: &str) -> profiler_agent::fold::FoldedProfile {
    let text = String::from_utf8(http_get(
        addr,
        &format!("/api/v1/folded?start=now-1h&query={query}"),
    ))
    .unwrap();
    let (profile, bad) = profiler_agent::fold::parse_folded(&text);
    assert_eq!(bad, 0);
    profile
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the agent's export counters say when it recovered from every fault:
/// nothing dropped, and every batch it queued acknowledged.
pub fn assert_all_delivered(stats: &profiler_agent::export::ExportStats) {
    use std::sync::atomic::Ordering;
    assert!(
        stats.nonzero_drops().is_empty(),
        "{:?}",
        stats.nonzero_drops()
    );
    assert_eq!(
        stats.batches_acked.load(Ordering::Relaxed),
        stats.batches_queued.load(Ordering::Relaxed),
        "batches acknowledged vs queued"
    );
}
