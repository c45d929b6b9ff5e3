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

/// A collector on any free loopback ports storing into `store` (SQLite or
/// ClickHouse).
pub fn start_collector_on(rt: &tokio::runtime::Runtime, store: StoreLocation) -> RunningCollector {
    let config = CollectorConfig {
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        store,
        ..CollectorConfig::default()
    };
    rt.block_on(server::start(config))
        .expect("the collector starts")
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
        protocol: Default::default(),
        headers: Vec::new(),
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

/// Samples of `node` the collector serving HTTP on `addr` has for the last
/// hour.
pub fn node_total(addr: std::net::SocketAddr, node: &str) -> u64 {
    folded(addr, &format!("%7Bnode%3D%22{node}%22%7D")).total()
}

/// `profiler_batches_stored_total` on the `/metrics` of the collector
/// serving HTTP on `http`, or `None` while it does not answer.
pub fn batches_stored(http: std::net::SocketAddr) -> Option<u64> {
    let text = super::scrape(&format!("http://{http}/metrics"))?;
    Some(super::metric(&text, "profiler_batches_stored_total"))
}

/// Waits until the collector serving HTTP on `http` has stored more than
/// `more_than` batches; returns how many it has.
pub fn wait_for_batches_stored(http: std::net::SocketAddr, more_than: u64) -> u64 {
    super::wait_for(
        Duration::from_secs(20),
        &format!("the collector on {http} stored more than {more_than} batches"),
        || batches_stored(http).filter(|&n| n > more_than),
    )
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

/// What a synthetic agent saw.
#[derive(Debug, Default)]
pub struct Pushed {
    /// Samples of the batches acknowledged (each batch once).
    pub acked: u64,
    /// Batches acknowledged as stored before (re-sends).
    pub duplicates: u64,
    /// Every error answer or transport failure, by gRPC code.
    pub errors: Vec<tonic::Code>,
}

/// A synthetic agent: pushes `batches` batches of `count` samples for node
/// `node`, each retried until acknowledged (as new or as already stored);
/// returns the samples of the acknowledged batches.
pub fn synthetic_agent(grpc: u16, node: &str, batches: u64, count: i64) -> u64 {
    push_batches(&[grpc], node, batches, count, |_| vec![0]).acked
}

/// Like [`synthetic_agent`], but batch `seq` is sent to each collector of
/// `grpc` that `route(seq)` names, in order (each retried until
/// acknowledged): a batch sent to two collectors is an agent replaying to
/// another replica what the first stored.
pub fn push_batches(
    grpc: &[u16],
    node: &str,
    batches: u64,
    count: i64,
    route: impl Fn(u64) -> Vec<usize>,
) -> Pushed {
    use profiler_proto::v1::ingest_client::IngestClient;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut clients: Vec<_> = grpc
            .iter()
            .map(|port| {
                let endpoint =
                    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                        .unwrap()
                        .connect_timeout(Duration::from_secs(1))
                        .timeout(Duration::from_secs(30));
                IngestClient::new(endpoint.connect_lazy())
            })
            .collect();
        let mut pushed = Pushed::default();
        for seq in 1..=batches {
            let batch = synthetic_batch(node, seq, count);
            let mut acked = false;
            for target in route(seq) {
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                loop {
                    match clients[target].push_batch(batch.clone()).await {
                        // A re-send of a batch stored before is acknowledged
                        // as already stored: it still counts once.
                        Ok(ack) => {
                            if !ack.get_ref().newly_stored {
                                pushed.duplicates += 1;
                            }
                            acked = true;
                            break;
                        }
                        Err(e) if std::time::Instant::now() < deadline => {
                            pushed.errors.push(e.code());
                            // The pause between retries, as an agent backs off.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("batch {seq} never acknowledged: {e}"),
                    }
                }
            }
            if acked {
                pushed.acked += count as u64;
            }
            // The workload's pace: batches keep coming over the faults.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pushed
    })
}

/// Batch `seq` of a synthetic agent on `node`: one stack, `count` samples,
/// its window ending now.
pub fn synthetic_batch(node: &str, seq: u64, count: i64) -> profiler_proto::v1::Batch {
    use profiler_proto::v1::{Batch, Label, LabelSet, Sample, Stack};
    let now = profiler_collector::ingest::now_ns();
    let strings = ["", "node", node, "process", "synthetic", "main", "work"];
    Batch {
        agent_id: format!("synthetic-{node}"),
        sequence: seq,
        node: node.into(),
        agent_version: "test".into(),
        window_start_unix_nanos: now - 100_000_000,
        window_end_unix_nanos: now,
        frequency_hz: 99,
        strings: strings.iter().map(|s| s.as_bytes().to_vec()).collect(),
        stacks: vec![Stack {
            frames: vec![4, 5, 6],
        }],
        label_sets: vec![LabelSet {
            labels: vec![Label { name: 1, value: 2 }, Label { name: 3, value: 4 }],
        }],
        samples: vec![Sample {
            label_set: 0,
            stack: 0,
            value: count,
        }],
        sample_type: None,
    }
}

/// The collector binary as its own process (plain text on loopback), its
/// log in a file; killed with SIGKILL on drop.
pub struct CollectorProcess {
    child: std::process::Child,
    pub grpc: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    log: std::path::PathBuf,
}

impl CollectorProcess {
    /// Starts the collector on the SQLite store `db`, on `grpc` and `http`
    /// (`0`: ports it chooses), and returns once it serves, with the
    /// addresses it bound (read from its `collector serving` log line).
    pub fn start(db: &Path, grpc: u16, http: u16, log: &Path) -> Self {
        let child = std::process::Command::new(super::collector_binary())
            .arg("--plaintext")
            .arg("--store")
            .arg(format!("sqlite:{}", db.display()))
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .env("RUST_LOG", "warn,profiler_collector=info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start the collector");
        let unbound = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let mut process = Self {
            child,
            grpc: unbound,
            http: unbound,
            log: log.to_path_buf(),
        };
        // Killed on drop if it never serves.
        let (grpc, http) = super::within(Duration::from_secs(10), || {
            process
                .log()
                .lines()
                .find_map(profiler_testkit::net::serving_addrs)
        })
        .unwrap_or_else(|| panic!("the collector did not come up:\n{}", process.log()));
        process.grpc = grpc;
        process.http = http;
        process
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its `/metrics` text.
    pub fn metrics(&self) -> String {
        String::from_utf8(http_get(self.http, "/metrics")).unwrap()
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
