//! Collector benchmark: ingest rate through the real gRPC server into the
//! embedded SQLite store and into ClickHouse, flame graph query latency over
//! the HTTP API, and store size per million samples, for a realistic mix of
//! batches. `--store sqlite|clickhouse|both` (default both); ClickHouse is a
//! private `clickhouse-server` started for the run (profiler-testkit), whose
//! CPU is counted too, since it does the store's work.
//!
//! Each simulated agent profiles an 8-CPU node at 19 Hz and sends one batch
//! per 10 s window: ~30 processes (a few short-lived ones whose pid changes
//! every minute), each running one of 40 applications with 12 stacks of
//! 15-40 frames, samples spread over processes and stacks by Zipf weights,
//! labels node/process/pid/exe and, for containers, container/pod/namespace.
//!
//! The hours loaded through gRPC give the ingest figures; to query 24 h
//! of 100 agents without loading 788 M samples, the loaded hour is then
//! replicated inside the store, shifted back hour by hour: every rollup row,
//! and the raw rows only where a measured query's range has a ragged end
//! (the only raw rows such a query reads; the report shows its plan). In
//! ClickHouse every row of the loaded hour is copied (`INSERT … SELECT`),
//! each copy as distinct batches, and the span query's time is broken down
//! into the statements the store sends.
//!
//! ```text
//! cargo build --release -p profiler-collector --example ingest_bench
//! target/release/examples/ingest_bench --report target/bench/ingest_bench.md   # full, both stores
//! target/release/examples/ingest_bench --quick                                 # smoke, < 2 min
//! ```
//! Results and their analysis: `docs/collector-benchmarks.md` (the full
//! suite is `cargo xtask bench`).
use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use clap::Parser;
use profiler_collector::{
    ingest::now_ns,
    model::{Selector, Stored, ValidBatch},
    server::{self, CollectorConfig, RunningCollector, StoreLocation},
    store::{
        clickhouse::{ClickHouseStore, ClickHouseUrl},
        sqlite::{plan, Part, SqliteStore, ROLLUP_H, ROLLUP_STACK_H, ROLLUP_STACK_M},
        Store,
    },
    validate::{validate, Limits},
};
use profiler_proto::v1::{ingest_client::IngestClient, Batch, Label, LabelSet, Sample, Stack};
use profiler_testkit::{clickhouse::ClickHouse, Server};
use tokio::sync::{mpsc, Mutex};
use tonic::{codec::CompressionEncoding, transport::Channel, Code};

const WINDOW_NS: i64 = 10_000_000_000;
const HOUR_NS: i64 = 3600 * 1_000_000_000;
const APPS: usize = 40;
const STACKS_PER_APP: usize = 12;

#[derive(Parser, Debug, Clone)]
#[command(about = "Collector ingest, query and store-size benchmark")]
struct Args {
    /// Simulated agents (nodes).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Whole hours of data to load through gRPC (10 s windows), ending now.
    #[arg(long, default_value_t = 1)]
    hours: u32,
    /// Batches sent by a single client first, for the one-client rate.
    #[arg(long, default_value_t = 2000)]
    single_client_batches: usize,
    /// Batches sent through gRPC in all (the one-client ones included); the
    /// rest of the loaded hours is written straight into the store with
    /// `Store::insert_many` (same store code, no network), to fit the time
    /// budget. 0: everything through gRPC.
    #[arg(long, default_value_t = 10000)]
    grpc_batches: usize,
    /// Concurrent clients for the rest of the load.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Busy share of the node's 8 CPUs (samples per batch = 8 * 19 * 10 * util).
    #[arg(long, default_value_t = 0.6)]
    cpu_util: f64,
    /// Processes per node.
    #[arg(long, default_value_t = 30)]
    processes: usize,
    /// Of those, short-lived processes whose pid changes every minute.
    #[arg(long, default_value_t = 3)]
    short_lived: usize,
    /// Hours of data the queries see: the loaded hours are replicated,
    /// shifted back in time, inside the store (see `materialize`).
    #[arg(long, default_value_t = 24)]
    span_hours: u32,
    /// Query ranges in hours (those longer than the span are skipped).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1.0, 24.0])]
    ranges: Vec<f64>,
    /// Most runs of each query (fewer when one run takes over 10 s).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Database file (kept); default: target/bench/ingest_bench/bench.db,
    /// deleted at the end.
    #[arg(long)]
    db: Option<PathBuf>,
    /// Write a markdown section with the figures to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// A smoke-sized run (< 30 s): 10 agents, 15 minutes loaded.
    #[arg(long)]
    quick: bool,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stores to measure: `clickhouse` starts a private clickhouse-server
    /// (profiler-testkit) for the run.
    #[arg(long, value_enum, default_value_t = StoreChoice::Both)]
    store: StoreChoice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StoreChoice {
    Sqlite,
    Clickhouse,
    Both,
}

/// xorshift64*: fast, reproducible.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index drawn from cumulative weights.
fn pick(cum: &[f64], rng: &mut Rng) -> usize {
    let x = rng.unit() * cum[cum.len() - 1];
    cum.partition_point(|&c| c < x).min(cum.len() - 1)
}

fn zipf_cum(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    (0..n)
        .map(|i| {
            acc += 1.0 / ((i + 1) as f64).powf(s);
            acc
        })
        .collect()
}

/// An application: its binary and its stacks (frame names), shared by
/// every node that runs it.
struct App {
    name: String,
    exe: String,
    namespace: String,
    stacks: Vec<Vec<String>>,
}

fn apps(seed: u64) -> Vec<App> {
    const NAMES: [&str; 20] = [
        "nginx",
        "postgres",
        "java",
        "python3",
        "node",
        "envoy",
        "redis-server",
        "kubelet",
        "containerd",
        "etcd",
        "coredns",
        "prometheus",
        "grafana",
        "mysqld",
        "ruby",
        "php-fpm",
        "haproxy",
        "kafka",
        "elasticsearch",
        "fluent-bit",
    ];
    let mut rng = Rng::new(seed ^ 0xA11);
    (0..APPS)
        .map(|a| {
            let name = if a < NAMES.len() {
                NAMES[a].to_string()
            } else {
                format!("{}-{}", NAMES[a % NAMES.len()], a / NAMES.len())
            };
            // A call tree: stacks share a root path and diverge below it.
            let root: Vec<String> = [
                "_start".to_string(),
                "__libc_start_main".into(),
                format!("{name}::main"),
            ]
            .into();
            let stacks = (0..STACKS_PER_APP)
                .map(|_| {
                    let depth = 15 + rng.below(26);
                    let mut frames = root.clone();
                    let mut node = 0usize;
                    while frames.len() < depth {
                        // Few choices near the root, more further down.
                        let fan = 2 + frames.len() / 4;
                        node = node.wrapping_mul(7).wrapping_add(1 + rng.below(fan));
                        let module =
                            ["net", "db", "http", "alloc", "sync", "io", "codec"][node % 7];
                        frames.push(format!("{name}::{module}::fn_{}", node % 997));
                    }
                    if rng.below(3) == 0 {
                        for k in ["entry_SYSCALL_64", "do_syscall_64", "__x64_sys_read"] {
                            frames.push(format!("[k] {k}"));
                        }
                    }
                    frames
                })
                .collect();
            App {
                exe: format!("/usr/bin/{name}"),
                namespace: ["default", "prod", "monitoring", "kube-system", "payments"][a % 5]
                    .into(),
                name,
                stacks,
            }
        })
        .collect()
}

/// One process slot of a node.
struct Proc {
    app: usize,
    pid: u32,
    short_lived: bool,
    containerized: bool,
}

struct Node {
    name: String,
    procs: Vec<Proc>,
    proc_cum: Vec<f64>,
    stack_cum: Vec<f64>,
}

fn node(agent: usize, args: &Args) -> Node {
    let mut rng = Rng::new(args.seed ^ (agent as u64 + 1) << 20);
    let procs = (0..args.processes)
        .map(|p| Proc {
            app: rng.below(APPS),
            pid: 1000 + rng.below(60000) as u32,
            short_lived: p >= args.processes - args.short_lived.min(args.processes),
            containerized: p >= 4,
        })
        .collect();
    Node {
        name: format!("node-{agent:03}"),
        procs,
        proc_cum: zipf_cum(args.processes, 1.0),
        stack_cum: zipf_cum(STACKS_PER_APP, 1.1),
    }
}

/// Table of strings of one batch, each stored once.
#[derive(Default)]
struct Strings {
    table: Vec<Vec<u8>>,
    index: HashMap<String, u32>,
}
impl Strings {
    fn id(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as u32;
        self.table.push(s.as_bytes().to_vec());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// The batch of `node` for window number `w` (ending at `end_ns`).
fn batch(node: &Node, agent: usize, apps: &[App], w: u64, end_ns: i64, args: &Args) -> Batch {
    let mut rng = Rng::new(args.seed ^ (agent as u64) << 32 ^ w);
    let full = 8.0 * 19.0 * 10.0 * args.cpu_util;
    let n = (full * (0.9 + 0.2 * rng.unit())).round().max(1.0) as usize;
    let mut counts: HashMap<(usize, usize), i64> = HashMap::new();
    for _ in 0..n {
        let p = pick(&node.proc_cum, &mut rng);
        let s = pick(&node.stack_cum, &mut rng);
        *counts.entry((p, s)).or_default() += 1;
    }
    let mut strings = Strings::default();
    strings.id("");
    let mut label_sets = Vec::new();
    let mut set_of: HashMap<usize, u32> = HashMap::new();
    let mut stacks = Vec::new();
    let mut stack_of: HashMap<(usize, usize), u32> = HashMap::new();
    let mut samples = Vec::new();
    let mut keys: Vec<_> = counts.into_iter().collect();
    keys.sort_unstable();
    for ((p, s), count) in keys {
        let proc = &node.procs[p];
        let app = &apps[proc.app];
        let set = *set_of.entry(p).or_insert_with(|| {
            // Short-lived processes: a new pid every minute.
            let pid = if proc.short_lived {
                proc.pid + (w / 6) as u32 % 30000
            } else {
                proc.pid
            };
            let mut pairs = vec![
                ("node", node.name.clone()),
                ("process", app.name.clone()),
                ("pid", pid.to_string()),
                ("exe", app.exe.clone()),
            ];
            if proc.containerized {
                pairs.push(("container", app.name.clone()));
                pairs.push(("pod", format!("{}-{}-{p}", app.name, node.name)));
                pairs.push(("namespace", app.namespace.clone()));
            }
            label_sets.push(LabelSet {
                labels: pairs
                    .iter()
                    .map(|(k, v)| Label {
                        name: strings.id(k),
                        value: strings.id(v),
                    })
                    .collect(),
            });
            (label_sets.len() - 1) as u32
        });
        let stack = *stack_of.entry((proc.app, s)).or_insert_with(|| {
            stacks.push(Stack {
                frames: app.stacks[s].iter().map(|f| strings.id(f)).collect(),
            });
            (stacks.len() - 1) as u32
        });
        samples.push(Sample {
            label_set: set,
            stack,
            value: count,
        });
    }
    Batch {
        agent_id: format!("bench-{agent:03}"),
        sequence: w + 1,
        node: node.name.clone(),
        agent_version: "bench".into(),
        window_start_unix_nanos: end_ns - WINDOW_NS,
        window_end_unix_nanos: end_ns,
        frequency_hz: 19,
        strings: strings.table,
        stacks,
        label_sets,
        samples,
        sample_type: None,
    }
}

#[derive(Default, Clone, Copy)]
struct Sent {
    batches: u64,
    samples: u64,
    rows: u64,
    retries: u64,
}

/// Sends batches from `rx` until it is closed, retrying push-back.
async fn client(
    mut grpc: IngestClient<Channel>,
    rx: Arc<Mutex<mpsc::Receiver<Batch>>>,
) -> anyhow::Result<Sent> {
    let mut sent = Sent::default();
    loop {
        let Some(b) = rx.lock().await.recv().await else {
            return Ok(sent);
        };
        let rows = b.samples.len() as u64;
        loop {
            match grpc.push_batch(b.clone()).await {
                Ok(ack) => {
                    sent.samples += ack.into_inner().samples;
                    break;
                }
                Err(s) if matches!(s.code(), Code::ResourceExhausted | Code::Unavailable) => {
                    sent.retries += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(s) => anyhow::bail!("batch rejected: {s}"),
            }
        }
        sent.batches += 1;
        sent.rows += rows;
    }
}

/// CPU seconds (user + system) of process `pid` so far (the ClickHouse
/// server; its merges and inserts run in its own threads).
fn pid_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// CPU seconds (user + system) of this process so far, and of each of the
/// collector's threads (its runtime's threads are named `collector`, its
/// writer `store-writer`) by thread id: a thread that ends between two
/// readings (an idle blocking-pool thread of an earlier run) must not take
/// its earlier CPU time out of the sum, see [`collector_cpu`].
fn cpu_seconds() -> (f64, HashMap<String, f64>) {
    let ticks = |stat: &str| -> (String, f64) {
        let (head, rest) = stat.rsplit_once(')').unwrap_or(("", ""));
        let name = head
            .split_once('(')
            .map(|(_, n)| n)
            .unwrap_or("")
            .to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15; 11 and 12 after the ')'.
        let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
        (name, (t(11) + t(12)) / 100.0)
    };
    let process = ticks(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default()).1;
    let mut collector = HashMap::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let (name, secs) = ticks(&stat);
            if name.starts_with("collector") || name.starts_with("store-writer") {
                collector.insert(t.file_name().to_string_lossy().into_owned(), secs);
            }
        }
    }
    (process, collector)
}

/// CPU seconds the collector's threads used between two readings of
/// [`cpu_seconds`]: per thread, so threads that ended count nothing.
fn collector_cpu(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> f64 {
    after
        .iter()
        .map(|(tid, secs)| secs - before.get(tid).copied().unwrap_or(0.0))
        .sum()
}

struct Load {
    /// Commits (groups) and time spent writing them, in seconds.
    commits: u64,
    write_secs: f64,
    sent: Sent,
    secs: f64,
    process_cpu: f64,
    collector_cpu: f64,
    /// CPU of the ClickHouse server over the same time (0 for SQLite).
    server_cpu: f64,
}

/// Loads windows `[from, to)` of every agent with `clients` clients.
#[allow(clippy::too_many_arguments)]
async fn load(
    addr: std::net::SocketAddr,
    clients: usize,
    windows: std::ops::Range<u64>,
    first_agent_window: (usize, u64),
    limit: Option<usize>,
    args: Arc<Args>,
    nodes: Arc<Vec<Node>>,
    apps: Arc<Vec<App>>,
    now: i64,
    total_windows: u64,
    server_pid: Option<u32>,
) -> anyhow::Result<(Load, (usize, u64))> {
    let (tx, rx) = mpsc::channel::<Batch>(256);
    let rx = Arc::new(Mutex::new(rx));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let grpc = IngestClient::connect(format!("http://{addr}"))
            .await?
            .send_compressed(CompressionEncoding::Zstd);
        tasks.push(tokio::spawn(client(grpc, rx.clone())));
    }
    // Batches are generated on a thread of their own, ahead of the clients.
    let producer = tokio::task::spawn_blocking(move || {
        let (mut a0, w0) = first_agent_window;
        let mut made = 0usize;
        for w in w0.max(windows.start)..windows.end {
            let end = now - (total_windows - 1 - w) as i64 * WINDOW_NS;
            for a in a0..args.agents {
                if limit.is_some_and(|l| made >= l) {
                    return (a, w);
                }
                let b = batch(&nodes[a], a, &apps, w, end, &args);
                if tx.blocking_send(b).is_err() {
                    return (a, w);
                }
                made += 1;
            }
            a0 = 0;
        }
        (0, windows.end)
    });
    // Fill the queue before timing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (t0, (p0, c0)) = (Instant::now(), cpu_seconds());
    let s0 = server_pid.map(pid_cpu).unwrap_or(0.0);
    let mut total = Sent::default();
    for t in tasks {
        let s = t.await??;
        total.batches += s.batches;
        total.samples += s.samples;
        total.rows += s.rows;
        total.retries += s.retries;
    }
    let next = producer.await?;
    let (p1, c1) = cpu_seconds();
    let s1 = server_pid.map(pid_cpu).unwrap_or(0.0);
    Ok((
        Load {
            commits: 0,
            write_secs: 0.0,
            sent: total,
            secs: t0.elapsed().as_secs_f64(),
            process_cpu: p1 - p0,
            collector_cpu: collector_cpu(&c0, &c1),
            server_cpu: s1 - s0,
        },
        next,
    ))
}

impl Load {
    fn rate(&self) -> f64 {
        self.sent.samples as f64 / self.secs.max(1e-9)
    }
    fn per_cpu(&self) -> f64 {
        self.sent.samples as f64 / self.collector_cpu.max(1e-9)
    }
    fn print(&self, what: &str) {
        let s = self.sent;
        println!(
            "ingest, {what}: {} batches, {} samples ({} rows) in {:.1} s: {:.0} samples/s, {:.0} batches/s; \
             collector CPU {:.1} s = {:.0} samples per CPU-second (whole process {:.1} s); {} push-backs; \
             {} commits: {:.1} batches and {:.1} ms of writing each",
            s.batches,
            s.samples,
            s.rows,
            self.secs,
            self.rate(),
            s.batches as f64 / self.secs.max(1e-9),
            self.collector_cpu,
            self.per_cpu(),
            self.process_cpu,
            s.retries,
            self.commits,
            s.batches as f64 / self.commits.max(1) as f64,
            1e3 * self.write_secs / self.commits.max(1) as f64
        );
    }
}

/// Batches written straight into the store.
struct Direct {
    batches: u64,
    samples: u64,
    commits: u64,
    secs: f64,
    /// CPU of the writing thread alone.
    cpu: f64,
    /// CPU of the ClickHouse server meanwhile (0 for SQLite).
    server_cpu: f64,
}

/// Opens the store `load_direct` writes with, on its writing thread.
type OpenStore = Box<dyn FnOnce() -> anyhow::Result<Box<dyn Store>> + Send>;

const DIRECT_GROUP: usize = 64;

/// CPU seconds of the calling thread.
fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// Writes the remaining windows (from `from`) of every agent with
/// `Store::insert_many`, in groups of what is waiting (up to
/// `DIRECT_GROUP`), as the collector's writer does; batches are generated
/// and validated on another thread.
#[allow(clippy::too_many_arguments)]
fn load_direct(
    open: OpenStore,
    server_pid: Option<u32>,
    from: (usize, u64),
    windows: u64,
    args: Arc<Args>,
    nodes: Arc<Vec<Node>>,
    apps: Arc<Vec<App>>,
    now: i64,
) -> anyhow::Result<Direct> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<ValidBatch>(512);
    let generator = std::thread::spawn(move || {
        let limits = Limits::default();
        let (mut a0, w0) = from;
        for w in w0..windows {
            let end = now - (windows - 1 - w) as i64 * WINDOW_NS;
            for a in a0..args.agents {
                let b = batch(&nodes[a], a, &apps, w, end, &args);
                let valid = validate(&b, &limits, now_ns()).expect("bench batches are valid");
                if tx.send(valid).is_err() {
                    return;
                }
            }
            a0 = 0;
        }
    });
    let t0 = Instant::now();
    let s0 = server_pid.map(pid_cpu).unwrap_or(0.0);
    let writer = std::thread::Builder::new()
        .name("direct-store".into())
        .spawn(move || -> anyhow::Result<Direct> {
            let cpu0 = thread_cpu();
            let mut store = open()?;
            let mut d = Direct {
                batches: 0,
                samples: 0,
                commits: 0,
                secs: 0.0,
                cpu: 0.0,
                server_cpu: 0.0,
            };
            let mut group = Vec::with_capacity(DIRECT_GROUP);
            while let Ok(first) = rx.recv() {
                group.push(first);
                while group.len() < DIRECT_GROUP {
                    match rx.try_recv() {
                        Ok(b) => group.push(b),
                        Err(_) => break,
                    }
                }
                for r in store.insert_many(&group) {
                    if let Stored::New { samples } = r? {
                        d.samples += samples;
                        d.batches += 1;
                    }
                }
                d.commits += 1;
                group.clear();
            }
            d.cpu = thread_cpu() - cpu0;
            Ok(d)
        })?;
    generator
        .join()
        .map_err(|_| anyhow::anyhow!("generator panicked"))?;
    let mut d = writer
        .join()
        .map_err(|_| anyhow::anyhow!("direct writer panicked"))??;
    d.secs = t0.elapsed().as_secs_f64();
    d.server_cpu = server_pid.map(pid_cpu).unwrap_or(0.0) - s0;
    Ok(d)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Start of the hour bucket after `t`'s (the next hour boundary at or after `t`).
fn ceil_hour(t: i64) -> i64 {
    t.div_euclid(HOUR_NS) * HOUR_NS
        + if t.rem_euclid(HOUR_NS) == 0 {
            0
        } else {
            HOUR_NS
        }
}

/// What `materialize` wrote.
struct Materialized {
    copies: u32,
    rollup_rows: [i64; 3],
    raw_rows: i64,
    raw_ranges: Vec<(i64, i64)>,
    secs: f64,
}

/// Replicates the loaded `hours` (windows ending in `(now - hours, now]`)
/// `copies - 1` times, copy `c` shifted back by `c * hours` hours: every
/// rollup row (the shift is whole hours, so buckets map onto buckets), and
/// raw rows only for windows ending in `raw_ranges` (the ragged starts of
/// the measured queries).
fn materialize(
    db: &Path,
    now: i64,
    hours: u32,
    copies: u32,
    raw_ranges: &[(i64, i64)],
) -> anyhow::Result<Materialized> {
    let t = Instant::now();
    let mut conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let tx = conn.transaction()?;
    // Snapshots of the loaded data's rollups, so copies do not copy copies.
    tx.execute_batch(
        "CREATE TEMP TABLE src_h AS SELECT * FROM rollup_h;
         CREATE TEMP TABLE src_stack_h AS SELECT * FROM rollup_stack_h;
         CREATE TEMP TABLE src_stack_m AS SELECT * FROM rollup_stack_m;",
    )?;
    let mut rollup_rows = [0i64; 3];
    let mut raw_rows = 0i64;
    let loaded_from = now - i64::from(hours) * HOUR_NS;
    for c in 1..copies {
        let shift_h = i64::from(c * hours);
        // A copy's last (partial) hour is the next copy's first: upsert.
        rollup_rows[0] += tx.execute(
            "INSERT INTO rollup_h SELECT hour - ?1, type_id, label_set_id, stack_id, value FROM src_h
             WHERE true ON CONFLICT (hour, type_id, label_set_id, stack_id)
             DO UPDATE SET value = value + excluded.value",
            [shift_h],
        )? as i64;
        rollup_rows[1] += tx.execute(
            "INSERT INTO rollup_stack_h SELECT hour - ?1, type_id, stack_id, value FROM src_stack_h
             WHERE true ON CONFLICT (hour, type_id, stack_id) DO UPDATE SET value = value + excluded.value",
            [shift_h],
        )? as i64;
        rollup_rows[2] += tx.execute(
            "INSERT INTO rollup_stack_m SELECT minute - ?1, type_id, stack_id, value FROM src_stack_m
             WHERE true ON CONFLICT (minute, type_id, stack_id) DO UPDATE SET value = value + excluded.value",
            [shift_h * 60],
        )? as i64;
        let shift = shift_h * HOUR_NS;
        for &(a, b) in raw_ranges {
            raw_rows += tx.execute(
                "INSERT INTO samples (window_start, window_end, type_id, label_set_id, stack_id, value)
                 SELECT window_start - ?1, window_end - ?1, type_id, label_set_id, stack_id, value
                 FROM samples
                 WHERE window_end > ?2 AND window_end - ?1 > ?3 AND window_end - ?1 <= ?4",
                [shift, loaded_from, a, b],
            )? as i64;
        }
    }
    tx.execute_batch("DROP TABLE src_h; DROP TABLE src_stack_h; DROP TABLE src_stack_m;")?;
    tx.commit()?;
    Ok(Materialized {
        copies,
        rollup_rows,
        raw_rows,
        raw_ranges: raw_ranges.to_vec(),
        secs: t.elapsed().as_secs_f64(),
    })
}

/// One query's figures.
struct QueryFigures {
    hours: f64,
    label: String,
    svg: Duration,
    folded: Duration,
    store: Duration,
    samples: u64,
    stacks: usize,
    /// Raw rows in the ragged parts the store read, and the plan.
    raw_rows_read: i64,
    plan: String,
}

fn plan_text(parts: &[Part], now: i64) -> String {
    let rel = |t: i64| format!("now{:+.3}h", (t - now) as f64 / HOUR_NS as f64);
    parts
        .iter()
        .map(|p| match p {
            Part::Raw { start, end } => format!("raw samples ({}, {}]", rel(*start), rel(*end)),
            Part::Rollup { rollup, lo, hi } => format!(
                "{} {} buckets ({}, {}]",
                rollup.table,
                hi - lo,
                rel(lo * rollup.grain),
                rel(hi * rollup.grain)
            ),
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn http_median(url: String, runs: usize) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let u = url.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
            let mut r = ureq::get(&u).call()?;
            Ok(r.body_mut()
                .with_config()
                .limit(1 << 30)
                .read_to_vec()?
                .len())
        })
        .await??;
        times.push(t.elapsed());
    }
    Ok(median(times))
}

fn remove_db(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// The measured selectors: all data, one process name, one pod.
fn selectors(nodes: &[Node], apps: &[App]) -> [(String, String); 3] {
    let pod = nodes[0]
        .procs
        .iter()
        .enumerate()
        .find(|(_, p)| p.containerized)
        .map(|(i, p)| format!("{}-{}-{i}", apps[p.app].name, nodes[0].name))
        .unwrap_or_else(|| "postgres".into());
    [
        ("all".to_string(), String::new()),
        (
            "{process=\"java\"}".to_string(),
            "{process=\"java\"}".to_string(),
        ),
        (format!("{{pod=\"{pod}\"}}"), format!("{{pod=\"{pod}\"}}")),
    ]
}

/// Ingest through the collector's gRPC server: `args.single_client_batches`
/// from one client, then up to `args.grpc_batches` in all from
/// `args.clients` clients. Returns both loads and the (agent, window) the
/// rest of the loaded hours starts at.
#[allow(clippy::too_many_arguments)]
async fn grpc_ingest(
    c: &RunningCollector,
    args: &Arc<Args>,
    nodes: &Arc<Vec<Node>>,
    apps: &Arc<Vec<App>>,
    now: i64,
    windows: u64,
    server_pid: Option<u32>,
) -> anyhow::Result<(Load, Load, (usize, u64))> {
    let writes = || {
        (
            c.metrics.store_commits.load(Ordering::Relaxed),
            c.metrics.store_write_micros.load(Ordering::Relaxed) as f64 / 1e6,
        )
    };
    let w0 = writes();
    let (mut one, next) = load(
        c.grpc_addr,
        1,
        0..windows,
        (0, 0),
        Some(args.single_client_batches),
        args.clone(),
        nodes.clone(),
        apps.clone(),
        now,
        windows,
        server_pid,
    )
    .await?;
    let w1 = writes();
    (one.commits, one.write_secs) = (w1.0 - w0.0, w1.1 - w0.1);
    one.print("1 client");
    let total_batches = args.agents * windows as usize;
    let grpc_batches = if args.grpc_batches == 0 {
        total_batches
    } else {
        args.grpc_batches.min(total_batches)
    };
    let (mut many, next) = load(
        c.grpc_addr,
        args.clients,
        0..windows,
        next,
        Some(grpc_batches.saturating_sub(args.single_client_batches)),
        args.clone(),
        nodes.clone(),
        apps.clone(),
        now,
        windows,
        server_pid,
    )
    .await?;
    let w2 = writes();
    (many.commits, many.write_secs) = (w2.0 - w1.0, w2.1 - w1.1);
    many.print(&format!("{} clients", args.clients));
    Ok((one, many, next))
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.agents = 10;
        args.hours = 1;
        args.single_client_batches = 400;
        args.grpc_batches = 1600;
        args.clients = 8;
    }
    let args = Arc::new(args);
    // The collector runs on a runtime of its own, so its threads (and CPU
    // time) are told apart from the clients'.
    let collector_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("collector")
        .enable_all()
        .build()?;
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()?;
    let started = Instant::now();
    let result = clients_rt.block_on(async {
        let mut outcomes = Vec::new();
        if args.store != StoreChoice::Clickhouse {
            outcomes.push(run_sqlite(args.clone(), &collector_rt).await?);
            println!(
                "sqlite run done at {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        if args.store != StoreChoice::Sqlite {
            outcomes.push(run_clickhouse(args.clone(), &collector_rt).await?);
            println!(
                "clickhouse run done at {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        write_report(&args, &outcomes, started.elapsed().as_secs_f64())
    });
    collector_rt.shutdown_background();
    let secs = started.elapsed().as_secs_f64();
    println!("ingest_bench: {secs:.0} s in all");
    result
}

/// The SQLite store's run: ingest, size, materialized 24 h, queries.
async fn run_sqlite(
    args: Arc<Args>,
    collector_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Outcome> {
    let run_started = Instant::now();
    let default_db = args.db.is_none();
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench/ingest_bench/bench.db"));
    if default_db {
        remove_db(&db);
    }
    let config = CollectorConfig {
        grpc_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        store: StoreLocation::Sqlite(db.clone()),
        agent_rate_limit: 0.0,
        ..CollectorConfig::default()
    };
    // The store's default (`--max-concurrent-batches`).
    let permits = 8;
    let c = collector_rt.spawn(server::start(config)).await??;
    let apps = Arc::new(apps(args.seed));
    let nodes: Arc<Vec<Node>> = Arc::new((0..args.agents).map(|a| node(a, &args)).collect());
    let windows = u64::from(args.hours.max(1)) * 360;
    let now = now_ns();
    let data_set = format!(
        "{} agents x {} windows of 10 s ({} h) = {} batches; {} processes per node, {:.0} samples per batch",
        args.agents,
        windows,
        args.hours,
        args.agents as u64 * windows,
        args.processes,
        8.0 * 19.0 * 10.0 * args.cpu_util
    );
    println!("data set: {data_set}");

    // (1) Ingest: one client, then several, over the loaded hours.
    let (one, many, next) = grpc_ingest(&c, &args, &nodes, &apps, now, windows, None).await?;
    let direct_load = if next.1 < windows {
        let path = db.clone();
        let d = load_direct(
            Box::new(move || Ok(Box::new(SqliteStore::open(&path)?) as Box<dyn Store>)),
            None,
            next,
            windows,
            args.clone(),
            nodes.clone(),
            apps.clone(),
            now,
        )?;
        println!(
            "store alone (insert_many, groups of up to {DIRECT_GROUP}): {} batches, {} samples in {:.1} s: {:.0} samples/s; \
             writer thread CPU {:.1} s = {:.0} samples per CPU-second; {} commits",
            d.batches,
            d.samples,
            d.secs,
            d.samples as f64 / d.secs.max(1e-9),
            d.cpu,
            d.samples as f64 / d.cpu.max(1e-9),
            d.commits
        );
        Some(d)
    } else {
        None
    };
    let samples =
        one.sent.samples + many.sent.samples + direct_load.as_ref().map(|d| d.samples).unwrap_or(0);
    let load_secs = run_started.elapsed().as_secs_f64();
    println!("load: {samples} samples in {load_secs:.1} s");

    // (3) Store size of the loaded data, after a checkpoint.
    let conn = rusqlite::Connection::open(&db)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    let size = std::fs::metadata(&db)?.len();
    let count = |t: &str| -> anyhow::Result<i64> {
        Ok(conn.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))?)
    };
    let sample_rows = count("samples")?;
    let rollup_rows = [
        count("rollup_h")?,
        count("rollup_stack_h")?,
        count("rollup_stack_m")?,
    ];
    let mib_per_m = size as f64 / (1 << 20) as f64 / (samples as f64 / 1e6);
    let by_table: Vec<(String, i64)> = conn
        .prepare("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_default();
    println!(
        "store: {:.1} MiB for {samples} samples: {mib_per_m:.1} MiB per million samples; {sample_rows} sample rows, rollup rows {rollup_rows:?}; by table {by_table:?}",
        size as f64 / (1 << 20) as f64,
    );

    // (2) The span the queries see: the loaded hours replicated back in time.
    let copies = (args.span_hours / args.hours.max(1)).max(1);
    let span_h = copies * args.hours.max(1);
    // Range ends mid-window and off the hour, as "now" is in practice.
    let end = now + WINDOW_NS / 2;
    let mut ranges: Vec<f64> = args
        .ranges
        .iter()
        .copied()
        .filter(|&r| r <= f64::from(span_h) + 1e-9)
        .collect();
    if ranges.is_empty() {
        ranges.push(f64::from(span_h));
    }
    let raw_needed: Vec<(i64, i64)> = ranges
        .iter()
        .map(|h| end - (h * HOUR_NS as f64) as i64)
        .filter(|&start| start < now - i64::from(args.hours) * HOUR_NS)
        .map(|start| (start, ceil_hour(start)))
        .collect();
    let mat = materialize(&db, now, args.hours.max(1), copies, &raw_needed)?;
    println!(
        "materialized {} copies of the loaded {} h in {:.1} s: rollup rows {:?}, {} raw rows for the ragged starts {:?}",
        mat.copies - 1,
        args.hours,
        mat.secs,
        mat.rollup_rows,
        mat.raw_rows,
        mat.raw_ranges
    );

    let selectors = selectors(&nodes, &apps);
    let direct = SqliteStore::open(&db)?;
    let mut figures: Vec<QueryFigures> = Vec::new();
    let mut checks: Vec<String> = Vec::new();
    let mut one_hour_totals: HashMap<String, u64> = HashMap::new();
    let mut raw_only_1h: Option<(Duration, Duration)> = None;
    for &hours in &ranges {
        let start = end - (hours * HOUR_NS as f64) as i64;
        for (label, sel) in &selectors {
            let (selector, profile, store_time, svg, folded) =
                time_query(&direct, c.http_addr, sel, start, end, args.runs).await?;
            let tiers: &[_] = if sel.is_empty() {
                &[ROLLUP_STACK_H, ROLLUP_STACK_M]
            } else {
                &[ROLLUP_H]
            };
            let parts = plan(start, end, tiers);
            let mut raw_rows_read = 0;
            for p in &parts {
                if let Part::Raw { start, end } = p {
                    raw_rows_read += direct.connection().query_row(
                        "SELECT COUNT(*) FROM samples WHERE window_end > ?1 AND window_end <= ?2",
                        [start, end],
                        |r| r.get::<_, i64>(0),
                    )?;
                }
            }
            // Checks: within the loaded hours rollups agree with raw rows;
            // the whole span holds `copies` times the loaded hours.
            if hours <= f64::from(args.hours) {
                let t = Instant::now();
                let raw = direct.profile_raw(&selector)?;
                let raw_time = t.elapsed();
                anyhow::ensure!(
                    raw == profile,
                    "{hours} h {label}: rollups differ from raw rows"
                );
                checks.push(format!(
                    "{hours} h {label}: the answer equals the raw-rows-only answer (raw only: {:.3} s)",
                    raw_time.as_secs_f64()
                ));
                if label == "all" && hours == 1.0 {
                    raw_only_1h = Some((raw_time, store_time));
                }
                one_hour_totals.insert(label.clone(), profile.total());
            } else if let Some(&loaded) = one_hour_totals.get(label) {
                let expected = loaded * u64::from(copies);
                anyhow::ensure!(
                    profile.total() == expected,
                    "{hours} h {label}: {} samples, expected {copies} x {loaded}",
                    profile.total()
                );
                checks.push(format!(
                    "{hours} h {label}: {} samples = {copies} copies x {loaded} loaded",
                    profile.total()
                ));
            }
            println!(
                "query {hours} h, {label}: svg {:.3} s, folded {:.3} s, store alone {:.3} s (medians of {}); {} samples, {} stacks; raw rows read {raw_rows_read}; plan: {}",
                svg.as_secs_f64(),
                folded.as_secs_f64(),
                store_time.as_secs_f64(),
                args.runs,
                profile.total(),
                profile.stacks.len(),
                plan_text(&parts, now)
            );
            figures.push(QueryFigures {
                hours,
                label: label.clone(),
                svg,
                folded,
                store: store_time,
                samples: profile.total(),
                stacks: profile.stacks.len(),
                raw_rows_read,
                plan: plan_text(&parts, now),
            });
        }
    }
    // How a selector reads the hourly rollup: one seek per (hour, label set).
    let mut explain = direct.connection().prepare(
        "EXPLAIN QUERY PLAN WITH RECURSIVE h(b) AS (SELECT ?1 UNION ALL SELECT b + 1 FROM h WHERE b + 1 < ?2),
         m(id) AS MATERIALIZED (SELECT label_set_id FROM labels WHERE name = 'process' AND value = 'java')
         SELECT r.stack_id, SUM(r.value) FROM h CROSS JOIN m CROSS JOIN rollup_h r
         WHERE r.hour = h.b AND r.type_id = 1 AND r.label_set_id = m.id GROUP BY r.stack_id",
    )?;
    let selector_plan: Vec<String> = explain
        .query_map([0i64, 1], |r| r.get::<_, String>(3))?
        .collect::<Result<_, _>>()?;
    drop(explain);
    println!("plan of a selector over the hourly rollup: {selector_plan:?}");
    for c in &checks {
        println!("check: {c}");
    }
    drop(direct);
    drop(conn);
    let collector_shutdown = c.shutdown();
    collector_rt.spawn(collector_shutdown).await??;
    let total_secs = run_started.elapsed().as_secs_f64();

    // Headline figures, for `cargo xtask bench`.
    let q24 = figures
        .iter()
        .filter(|f| f.hours == f64::from(span_h) && f.label == "all")
        .map(|f| f.svg.max(f.folded))
        .next();
    let per_cpu = (one.sent.samples + many.sent.samples) as f64
        / (one.collector_cpu + many.collector_cpu).max(1e-9);
    let bench_line = format!(
        "BENCH ingest_samples_per_s={per_cpu:.0} ingest_wall_samples_per_s={:.0} ingest_1client_samples_per_s={:.0} store_mib_per_m_samples={mib_per_m:.2}{}",
        many.rate(),
        one.rate(),
        q24.map(|d| format!(" query_{span_h}h_{}_s={:.4}", args.agents, d.as_secs_f64()))
            .unwrap_or_default()
    );
    println!("{bench_line}");

    let section = report(ReportData {
        direct: direct_load.as_ref(),
        args: &args,
        now,
        data_set: &data_set,
        one: &one,
        many: &many,
        per_cpu,
        permits,
        size,
        samples,
        sample_rows,
        rollup_rows,
        by_table: &by_table,
        mib_per_m,
        mat: &mat,
        span_h,
        figures: &figures,
        checks: &checks,
        selector_plan: &selector_plan,
        raw_only_1h,
        load_secs,
        total_secs,
    });
    if default_db {
        remove_db(&db);
        let _ = db.parent().map(std::fs::remove_dir);
    }
    Ok(Outcome {
        summary: Summary {
            store: "SQLite",
            per_cpu,
            per_cpu_with_server: None,
            one,
            many,
            direct: direct_load,
            mib_per_m,
            span_h,
            figures,
            total_secs,
        },
        section,
        bench_line,
    })
}

struct ReportData<'a> {
    direct: Option<&'a Direct>,
    args: &'a Args,
    now: i64,
    data_set: &'a str,
    one: &'a Load,
    many: &'a Load,
    per_cpu: f64,
    permits: usize,
    size: u64,
    samples: u64,
    sample_rows: i64,
    rollup_rows: [i64; 3],
    by_table: &'a [(String, i64)],
    mib_per_m: f64,
    mat: &'a Materialized,
    span_h: u32,
    figures: &'a [QueryFigures],
    checks: &'a [String],
    selector_plan: &'a [String],
    raw_only_1h: Option<(Duration, Duration)>,
    load_secs: f64,
    total_secs: f64,
}

fn met(value: f64, target: f64, higher_is_better: bool) -> String {
    let ratio = if higher_is_better {
        value / target
    } else {
        target / value.max(1e-9)
    };
    if ratio >= 1.0 {
        format!("**met** ({ratio:.1}× the target)")
    } else {
        format!("**missed** ({:.1}× short)", 1.0 / ratio.max(1e-9))
    }
}

fn report(d: ReportData) -> String {
    let a = d.args;
    let k = |x: f64| format!("{:.0} k", x / 1e3);
    let mut o = String::new();
    let _ = writeln!(o, "### SQLite store\n");
    let _ = writeln!(
        o,
        "What is measured: simulated agents (an 8-CPU node at 19 Hz, one batch per 10 s window, \
         ~30 processes with Zipf-weighted stacks of 15–40 frames, labels node/process/pid/exe and \
         container/pod/namespace) send zstd-compressed batches through the real gRPC server into \
         the embedded SQLite store (WAL, `synchronous=FULL`, group commit), default configuration \
         (`--max-concurrent-batches {}`) except the per-agent rate limit (off). \
         Collector CPU is that of the collector's own threads (its runtime and the store writer), \
         not of the clients and the batch generator in the same process.\n",
        d.permits
    );
    let _ = writeln!(
        o,
        "Data set: {}{}: {} samples, loaded in {:.0} s, {} batches of them through gRPC (the \
         ingest figures), the rest straight into the store with `Store::insert_many` (same \
         store code, no network: the machine's 2 vCPUs cannot generate, compress and send \
         36,000 batches in the time budget). \
         For the queries the loaded {} h were replicated inside the store to {} h \
         ({} copies shifted back by whole hours): **every rollup row** ({} `rollup_h`, {} `rollup_stack_h`, \
         {} `rollup_stack_m` rows added) but **raw sample rows only for the windows a measured \
         range's ragged start falls in** ({} rows, windows ending in {}), because 24 h of raw rows \
         (~{:.1} GiB) would not fit the time and disk budget. A query reads raw rows only for the \
         parts of its range that are not whole rollup buckets (the plans below list the parts and \
         the raw rows read), so the answer is the one a fully loaded store would give: the check \
         below compares its total with {} × the loaded hour's. Materializing took {:.1} s.\n",
        d.data_set,
        if a.quick { " (`--quick`)" } else { "" },
        d.samples,
        d.load_secs,
        d.one.sent.batches + d.many.sent.batches,
        a.hours,
        d.span_h,
        d.mat.copies - 1,
        d.mat.rollup_rows[0],
        d.mat.rollup_rows[1],
        d.mat.rollup_rows[2],
        d.mat.raw_rows,
        d.mat
            .raw_ranges
            .iter()
            .map(|(s, e)| format!(
                "(now{:+.3} h, now{:+.3} h]",
                (s - d.now) as f64 / HOUR_NS as f64,
                (e - d.now) as f64 / HOUR_NS as f64
            ))
            .collect::<Vec<_>>()
            .join(", "),
        d.size as f64 / (1u64 << 30) as f64 * f64::from(d.span_h / a.hours.max(1)),
        d.mat.copies,
        d.mat.secs
    );
    let q = |hours: f64, label: &str| {
        d.figures
            .iter()
            .find(|f| f.hours == hours && f.label == label)
    };
    let span = f64::from(d.span_h);
    let _ = writeln!(o, "| figure | measured | target |\n|---|---|---|");
    let _ = writeln!(
        o,
        "| ingest per CPU-second of the collector (all batches) | **{} samples/s** | ≥ 500 k samples/s on one core: {} |",
        k(d.per_cpu),
        met(d.per_cpu, 500e3, true)
    );
    let _ = writeln!(
        o,
        "| ingest, {} clients (wall clock, 2-vCPU machine shared with the clients) | {} samples/s, {:.0} batches/s, collector CPU {:.0} % of a core | |",
        a.clients,
        k(d.many.rate()),
        d.many.sent.batches as f64 / d.many.secs.max(1e-9),
        100.0 * d.many.collector_cpu / d.many.secs.max(1e-9)
    );
    if let Some(dl) = d.direct {
        let _ = writeln!(
            o,
            "| store alone: `insert_many` in groups of up to {DIRECT_GROUP} ({} batches, no gRPC) | {} samples/s, {} samples per CPU-second of the writing thread, {:.1} batches per commit | |",
            dl.batches,
            k(dl.samples as f64 / dl.secs.max(1e-9)),
            k(dl.samples as f64 / dl.cpu.max(1e-9)),
            dl.batches as f64 / dl.commits.max(1) as f64
        );
    }
    let _ = writeln!(
        o,
        "| ingest, 1 client (one batch in flight: one commit each) | {} samples/s, {:.0} batches/s | |",
        k(d.one.rate()),
        d.one.sent.batches as f64 / d.one.secs.max(1e-9)
    );
    let _ = writeln!(
        o,
        "| store size (loaded data, after a checkpoint) | {:.1} MiB per million samples ({:.1} MiB, {} sample rows, rollup rows {} / {} / {}) | |",
        d.mib_per_m,
        d.size as f64 / (1 << 20) as f64,
        d.sample_rows,
        d.rollup_rows[0],
        d.rollup_rows[1],
        d.rollup_rows[2]
    );
    if let Some(f) = q(span, "all") {
        let worst = f.svg.max(f.folded).as_secs_f64();
        let _ = writeln!(
            o,
            "| flame graph query, {} h × {} agents, all data (SVG / folded) | **{:.3} s** / {:.3} s | ≤ 1 s: {} |",
            d.span_h,
            a.agents,
            f.svg.as_secs_f64(),
            f.folded.as_secs_f64(),
            met(worst, 1.0, false)
        );
    }
    let _ = writeln!(o, "\nQuery latency (HTTP, median of {} runs; \"store\" = `SqliteStore::profile` alone; ranges end mid-window, off the hour):\n", a.runs);
    let _ = writeln!(
        o,
        "| range | selector | SVG | folded | store | samples | stacks | raw rows read | parts read |\n|---|---|---|---|---|---|---|---|---|"
    );
    for f in d.figures {
        let _ = writeln!(
            o,
            "| {} h | `{}` | {:.3} s | {:.3} s | {:.3} s | {} | {} | {} | {} |",
            f.hours,
            f.label,
            f.svg.as_secs_f64(),
            f.folded.as_secs_f64(),
            f.store.as_secs_f64(),
            f.samples,
            f.stacks,
            f.raw_rows_read,
            f.plan
        );
    }
    if let Some((raw, rolled)) = d.raw_only_1h {
        let _ = writeln!(
            o,
            "\nThe same 1 h all-data profile from raw rows only: {:.3} s (with rollups: {:.3} s).",
            raw.as_secs_f64(),
            rolled.as_secs_f64()
        );
    }
    let _ = writeln!(o, "\nChecks:\n");
    for c in d.checks {
        let _ = writeln!(o, "- {c}");
    }
    let _ = writeln!(
        o,
        "\nPlan of a selector over the hourly rollup (`EXPLAIN QUERY PLAN`): `{}`.\n",
        d.selector_plan.join("; ")
    );
    if !d.by_table.is_empty() {
        let _ = writeln!(
            o,
            "Store size by table and index (loaded data): {}.\n",
            d.by_table
                .iter()
                .take(8)
                .map(|(n, b)| format!("{n} {:.1} MiB", *b as f64 / (1 << 20) as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(o, "SQLite run: {:.0} s.", d.total_secs);
    o
}

/// The figures both stores report, for the table that compares them.
struct Summary {
    store: &'static str,
    /// Samples per CPU-second of the collector's threads (gRPC batches).
    per_cpu: f64,
    /// Samples per CPU-second of the collector and the ClickHouse server.
    per_cpu_with_server: Option<f64>,
    one: Load,
    many: Load,
    direct: Option<Direct>,
    mib_per_m: f64,
    span_h: u32,
    figures: Vec<QueryFigures>,
    total_secs: f64,
}

/// One store's run: its figures, its report section and its `BENCH` line.
struct Outcome {
    summary: Summary,
    section: String,
    bench_line: String,
}

/// The report: a table comparing the stores, then each store's section.
fn write_report(args: &Args, outcomes: &[Outcome], secs: f64) -> anyhow::Result<()> {
    let Some(path) = &args.report else {
        return Ok(());
    };
    let k = |x: f64| format!("{:.0} k", x / 1e3);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "## Collector ingest and flame graph queries (`ingest_bench`)\n"
    );
    let names: Vec<&str> = outcomes.iter().map(|r| r.summary.store).collect();
    let _ = writeln!(
        o,
        "The same data set goes through the same collector (gRPC server, group-commit writer, \
         HTTP API) into each store ({}); only `--store` differs. ClickHouse is a private \
         `clickhouse-server` {} started for the run on this machine (profiler-testkit, \
         default settings), so it shares the 2 vCPUs with the collector and the clients; its \
         CPU comes from /proc/PID/stat of the server process. Each store's section below says \
         how its figures were made.\n",
        names.join(", "),
        CLICKHOUSE_VERSION_TEXT
    );
    let _ = writeln!(
        o,
        "| figure | {} |\n|---|{}",
        names.join(" | "),
        "---|".repeat(names.len())
    );
    let mut row = |what: &str, cell: &dyn Fn(&Summary) -> String| {
        let cells: Vec<String> = outcomes.iter().map(|r| cell(&r.summary)).collect();
        let _ = writeln!(o, "| {what} | {} |", cells.join(" | "));
    };
    row(
        "ingest per CPU-second of the collector (gRPC batches)",
        &|s| format!("**{} samples**", k(s.per_cpu)),
    );
    row(
        "ingest per CPU-second of the collector + ClickHouse server",
        &|s| match s.per_cpu_with_server {
            Some(v) => format!("**{} samples**", k(v)),
            None => "— (the store runs inside the collector)".into(),
        },
    );
    row("ClickHouse server CPU during the gRPC ingest", &|s| {
        if s.per_cpu_with_server.is_some() {
            let cpu = s.one.server_cpu + s.many.server_cpu;
            let samples = (s.one.sent.samples + s.many.sent.samples) as f64;
            format!(
                "{cpu:.1} s ({:.0} % of the collector's {:.1} s; {} samples per server CPU-second)",
                100.0 * cpu / (s.one.collector_cpu + s.many.collector_cpu).max(1e-9),
                s.one.collector_cpu + s.many.collector_cpu,
                k(samples / cpu.max(1e-9))
            )
        } else {
            "—".into()
        }
    });
    row(
        &format!("ingest wall clock, {} clients", args.clients),
        &|s| {
            format!(
                "{} samples/s, {:.0} batches/s",
                k(s.many.rate()),
                s.many.sent.batches as f64 / s.many.secs.max(1e-9)
            )
        },
    );
    row("ingest wall clock, 1 client", &|s| {
        format!(
            "{} samples/s, {:.0} batches/s",
            k(s.one.rate()),
            s.one.sent.batches as f64 / s.one.secs.max(1e-9)
        )
    });
    row(
        &format!("store alone (`insert_many`, groups of up to {DIRECT_GROUP}, no gRPC)"),
        &|s| match &s.direct {
            Some(d) => {
                let mut t = format!(
                    "{} samples/s; {} per CPU-second of the writing thread",
                    k(d.samples as f64 / d.secs.max(1e-9)),
                    k(d.samples as f64 / d.cpu.max(1e-9))
                );
                if d.server_cpu > 0.0 {
                    t += &format!(
                        ", {} with the server's",
                        k(d.samples as f64 / (d.cpu + d.server_cpu).max(1e-9))
                    );
                }
                t
            }
            None => "—".into(),
        },
    );
    row("store size per million samples", &|s| {
        format!("{:.1} MiB", s.mib_per_m)
    });
    let mut keys: Vec<(f64, String)> = Vec::new();
    for r in outcomes {
        for f in &r.summary.figures {
            if !keys.iter().any(|(h, l)| *h == f.hours && *l == f.label) {
                keys.push((f.hours, f.label.clone()));
            }
        }
    }
    for (hours, label) in &keys {
        row(
            &format!(
                "query {hours} h × {} agents, `{label}`: SVG / folded / store alone",
                args.agents
            ),
            &|s| {
                s.figures
                    .iter()
                    .find(|f| f.hours == *hours && f.label == *label)
                    .map(|f| {
                        let t = format!(
                            "{:.3} / {:.3} / {:.3} s",
                            f.svg.as_secs_f64(),
                            f.folded.as_secs_f64(),
                            f.store.as_secs_f64()
                        );
                        if f.hours == f64::from(s.span_h) && label == "all" {
                            format!("**{t}**")
                        } else {
                            t
                        }
                    })
                    .unwrap_or_else(|| "—".into())
            },
        );
    }
    row("run time (start-up, load, copies, queries)", &|s| {
        format!("{:.0} s", s.total_secs)
    });
    let _ = writeln!(o);
    for r in outcomes {
        let _ = writeln!(o, "{}", r.section.trim_end());
        let _ = writeln!(o);
    }
    let _ = writeln!(
        o,
        "Command: `ingest_bench{} --store {} --report FILE`; {secs:.0} s in all.\n",
        if args.quick { " --quick" } else { "" },
        format!("{:?}", args.store).to_lowercase()
    );
    for r in outcomes {
        let _ = writeln!(o, "<!-- {} -->", r.bench_line);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, o)?;
    println!("report written to {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------
// ClickHouse

/// What the private server is (Debian's package, `cargo xtask setup`).
const CLICKHOUSE_VERSION_TEXT: &str = "(Debian's 18.16.1)";
/// The database the ClickHouse run writes.
const CH_DB: &str = "ingest_bench";
/// Timeout of the bench's own statements (copies take long on 2 vCPUs).
const CH_STATEMENT_TIMEOUT: Duration = Duration::from_secs(900);

/// Runs one statement over ClickHouse's HTTP interface with `settings` as
/// URL parameters; returns the body.
fn ch(port: u16, sql: &str, settings: &[(&str, &str)]) -> anyhow::Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(CH_STATEMENT_TIMEOUT))
        .build()
        .into();
    let mut url = format!("http://127.0.0.1:{port}/?");
    for (k, v) in settings {
        url.push_str(&format!("{k}={}&", enc(v)));
    }
    let mut resp = agent.post(&url).send(sql)?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_string()?;
    anyhow::ensure!(status == 200, "ClickHouse: {sql}: HTTP {status}: {body}");
    Ok(body)
}

/// Median wall time of `runs` runs of `sql` (answer discarded).
fn ch_time(port: u16, sql: &str, runs: usize) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        ch(port, sql, &[])?;
        times.push(t.elapsed());
    }
    Ok(median(times))
}

/// The `hour`/`window_end` condition the store puts on a range
/// `(start, end]` (as `ClickHouseStore::range`).
fn ch_range(start: i64, end: i64) -> String {
    format!(
        "hour >= {} AND hour <= {} AND window_end > {start} AND window_end <= {end}",
        start.div_euclid(HOUR_NS),
        (end - 1).div_euclid(HOUR_NS)
    )
}

/// The day partitions of `stacks`/`label_sets` for `(start, end]` (as
/// `ClickHouseStore::days`).
fn ch_days(start: i64, end: i64) -> String {
    format!(
        "day >= {} AND day <= {}",
        start.div_euclid(24 * HOUR_NS),
        (end - 1).div_euclid(HOUR_NS).div_euclid(24)
    )
}

/// Waits (at most `cap`) until the database has no merge running, so the
/// figures that follow do not share the CPUs with merges of the rows just
/// written; returns the wait and the active parts of `samples` then.
fn ch_settle(port: u16, cap: Duration) -> anyhow::Result<(Duration, u64)> {
    let t = Instant::now();
    let n = |sql: &str| -> anyhow::Result<u64> { Ok(ch(port, sql, &[])?.trim().parse()?) };
    while n(&format!(
        "SELECT count() FROM system.merges WHERE database = '{CH_DB}'"
    ))? > 0
        && t.elapsed() < cap
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let parts = n(&format!(
        "SELECT count() FROM system.parts WHERE active AND database = '{CH_DB}' AND table = 'samples'"
    ))?;
    Ok((t.elapsed(), parts))
}

/// The server's counters shown for the load.
const CH_EVENTS: [&str; 9] = [
    "Query",
    "SelectQuery",
    "InsertQuery",
    "InsertedRows",
    "Merge",
    "MergedRows",
    "MergesTimeMilliseconds",
    "CompressedReadBufferBytes",
    "WriteBufferFromFileDescriptorWriteBytes",
];

/// The server's `system.events` counters.
fn ch_events(port: u16) -> anyhow::Result<HashMap<String, i64>> {
    Ok(ch(
        port,
        "SELECT event, value FROM system.events FORMAT TSV",
        &[],
    )?
    .lines()
    .filter_map(|l| {
        let (k, v) = l.split_once('\t')?;
        Some((k.to_string(), v.trim().parse().ok()?))
    })
    .collect())
}

/// What `ch_materialize` wrote.
struct ChMaterialized {
    copies: u32,
    sample_rows: u64,
    text_days: Vec<i64>,
    secs: f64,
}

/// Replicates the loaded hours `copies - 1` times inside ClickHouse, copy
/// `k` shifted back `k * hours` hours: every row (sample and registry rows)
/// with its hour and window moved, the registry rows' `sequence` made
/// unique per copy (+ k * 1e9) and every row's `write_id` changed per copy
/// (xor k), so the queries' duplicate-write guard sees distinct batches;
/// then the texts of stacks and label sets are copied into the day
/// partitions the copies landed in.
fn ch_materialize(port: u16, now: i64, hours: u32, copies: u32) -> anyhow::Result<ChMaterialized> {
    let t = Instant::now();
    let loaded_from = now - i64::from(hours) * HOUR_NS;
    let count = |sql: &str| -> anyhow::Result<u64> { Ok(ch(port, sql, &[])?.trim().parse()?) };
    let before = count(&format!("SELECT count() FROM {CH_DB}.samples"))?;
    // Large insert blocks: a few parts per copy, not one per million rows
    // (ClickHouse refuses inserts past 300 parts in a partition).
    let settings = [
        ("min_insert_block_size_rows", "16777216"),
        ("min_insert_block_size_bytes", "4294967296"),
    ];
    for k in 1..copies {
        let shift_h = i64::from(k * hours);
        let shift = shift_h * HOUR_NS;
        ch(
            port,
            &format!(
                "INSERT INTO {CH_DB}.samples
                 SELECT hour - {shift_h}, label_set_id, window_end - {shift}, stack_id, count,
                        bitXor(write_id, {k}), window_start - {shift}, agent_id,
                        if(label_set_id = 0, sequence + {k} * 1000000000, sequence),
                        node, agent_version, frequency_hz, sample_type, unit
                 FROM {CH_DB}.samples WHERE window_end > {loaded_from}"
            ),
            &settings,
        )?;
    }
    let days = |sql: &str| -> anyhow::Result<Vec<i64>> {
        ch(port, sql, &[])?
            .lines()
            .map(|l| Ok(l.trim().parse()?))
            .collect()
    };
    let loaded_days = days(&format!("SELECT DISTINCT day FROM {CH_DB}.stacks"))?;
    let text_days: Vec<i64> = days(&format!(
        "SELECT DISTINCT intDiv(hour, 24) AS d FROM {CH_DB}.samples ORDER BY d"
    ))?
    .into_iter()
    .filter(|d| !loaded_days.contains(d))
    .collect();
    let loaded = loaded_days
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    for d in &text_days {
        ch(
            port,
            &format!(
                "INSERT INTO {CH_DB}.stacks SELECT {d}, stack_id, any(folded)
                 FROM {CH_DB}.stacks WHERE day IN ({loaded}) GROUP BY stack_id"
            ),
            &[],
        )?;
        ch(
            port,
            &format!(
                "INSERT INTO {CH_DB}.label_sets SELECT {d}, label_set_id, any(names), any(values)
                 FROM {CH_DB}.label_sets WHERE day IN ({loaded}) GROUP BY label_set_id"
            ),
            &[],
        )?;
    }
    let after = count(&format!("SELECT count() FROM {CH_DB}.samples"))?;
    Ok(ChMaterialized {
        copies,
        sample_rows: after - before,
        text_days,
        secs: t.elapsed().as_secs_f64(),
    })
}

/// Bytes on disk of the database's active parts, by table: (table, bytes,
/// rows, parts).
fn ch_parts(port: u16) -> anyhow::Result<Vec<(String, u64, u64, u64)>> {
    ch(
        port,
        &format!(
            "SELECT table, sum(bytes_on_disk), sum(rows), count() FROM system.parts
             WHERE active AND database = '{CH_DB}' GROUP BY table ORDER BY 2 DESC FORMAT TSV"
        ),
        &[],
    )?
    .lines()
    .map(|l| {
        let f: Vec<&str> = l.split('\t').collect();
        anyhow::ensure!(f.len() == 4, "bad system.parts line {l:?}");
        Ok((
            f[0].to_string(),
            f[1].parse()?,
            f[2].parse()?,
            f[3].parse()?,
        ))
    })
    .collect()
}

/// One flame graph query timed three ways (medians of `runs`): the store
/// alone, and over the HTTP API as SVG and as folded text.
async fn time_query(
    store: &dyn Store,
    http: std::net::SocketAddr,
    sel: &str,
    start: i64,
    end: i64,
    runs: usize,
) -> anyhow::Result<(
    Selector,
    profiler_collector::model::Profile,
    Duration,
    Duration,
    Duration,
)> {
    let selector = Selector::cpu(
        profiler_collector::query::parse_selector(sel).map_err(anyhow::Error::msg)?,
        start,
        end,
    );
    let mut times = Vec::new();
    let mut profile = profiler_collector::model::Profile::default();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        profile = store.profile(&selector)?;
        times.push(t.elapsed());
    }
    let url = |endpoint: &str| {
        let mut q = format!(
            "http://{http}/api/v1/{endpoint}?start={:.3}&end={:.3}",
            start as f64 / 1e9,
            end as f64 / 1e9
        );
        if !sel.is_empty() {
            q.push_str(&format!("&query={}", enc(sel)));
        }
        q
    };
    let svg = http_median(url("flamegraph.svg"), runs).await?;
    let folded = http_median(url("folded"), runs).await?;
    Ok((selector, profile, median(times), svg, folded))
}

/// One part of a query's time.
struct Piece {
    what: String,
    time: Duration,
    note: String,
}

/// Where the time of the store's all-data (and one selector's) profile
/// query over `(start, end]` goes: the statements `ClickHouseStore::profile`
/// sends (`profile_sql`), timed one by one, and parts of them.
fn ch_breakdown(
    port: u16,
    store: &ClickHouseStore,
    start: i64,
    end: i64,
    selector: Option<(&str, &str)>,
    runs: usize,
) -> anyhow::Result<Vec<Piece>> {
    let db = CH_DB;
    let range = ch_range(start, end);
    let days = ch_days(start, end);
    let sql = store
        .profile_sql(&Selector {
            sample_type: "cpu".into(),
            matchers: selector
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            start_ns: start,
            end_ns: end,
        })
        .ok_or_else(|| anyhow::anyhow!("empty range"))?;
    let sets = match selector {
        Some((name, value)) => format!(
            "AND label_set_id IN (SELECT label_set_id FROM {db}.label_sets WHERE {days} AND \
             has(names, '{name}') AND values[indexOf(names, '{name}')] = '{value}')"
        ),
        None => String::new(),
    };
    let scan = format!(
        "SELECT sum(count) FROM {db}.samples WHERE {range} AND label_set_id != 0 {sets} FORMAT Null"
    );
    let n = |sql: String| -> anyhow::Result<u64> { Ok(ch(port, &sql, &[])?.trim().parse()?) };
    let rows = n(format!(
        "SELECT count() FROM {db}.samples WHERE {range} AND label_set_id != 0 {sets}"
    ))?;
    let registry = ch(port, &sql.registry, &[])?;
    let ids = ch(
        port,
        &format!(
            "SELECT DISTINCT stack_id FROM {db}.samples WHERE {range} AND label_set_id != 0 {sets}"
        ),
        &[],
    )?;
    let ids: Vec<&str> = ids.lines().collect();
    let texts = format!(
        "SELECT stack_id, any(folded) FROM {db}.stacks WHERE {days} AND stack_id IN ({})
         GROUP BY stack_id FORMAT Null",
        ids.join(", ")
    );
    let t_registry = ch_time(port, &format!("{} FORMAT Null", sql.registry), runs)?;
    let t_sum = ch_time(port, &format!("{} FORMAT Null", sql.sum), runs)?;
    let t_guarded = ch_time(port, &format!("{} FORMAT Null", sql.sum_guarded), runs)?;
    let t_scan = ch_time(port, &scan, runs)?;
    let t_texts = ch_time(port, &texts, runs)?;
    let mut pieces = vec![
        Piece {
            what: "registry rows of the range: any batch written twice?".into(),
            time: t_registry,
            note: format!(
                "writes and batches: {}",
                registry.trim().replace('\t', " and ")
            ),
        },
        Piece {
            what: "sum per stack, as the store sends it without duplicate writes".into(),
            time: t_sum,
            note: format!("{rows} sample rows in the range"),
        },
        Piece {
            what: "— the same with the duplicate-write guard (`write_id NOT IN …`), sent only when a batch of the range was written twice".into(),
            time: t_guarded,
            note: format!(
                "the guard would cost {:+.3} s",
                t_guarded.as_secs_f64() - t_sum.as_secs_f64()
            ),
        },
        Piece {
            what: "— reading `count` of the range alone (no grouping)".into(),
            time: t_scan,
            note: String::new(),
        },
        Piece {
            what: "stack texts of the answer (`stacks`, by id)".into(),
            time: t_texts,
            note: format!("{} stacks", ids.len()),
        },
    ];
    if let Some((name, value)) = selector {
        let t_sets = ch_time(
            port,
            &format!(
                "SELECT label_set_id FROM {db}.label_sets WHERE {days} AND has(names, '{name}') \
                 AND values[indexOf(names, '{name}')] = '{value}' FORMAT Null"
            ),
            runs,
        )?;
        pieces.push(Piece {
            what: "matching label sets alone".into(),
            time: t_sets,
            note: String::new(),
        });
    }
    Ok(pieces)
}

/// The ClickHouse store's run: a private server, ingest through the
/// collector, size, the loaded hour replicated to the span, queries and
/// where the span query's time goes.
async fn run_clickhouse(
    args: Arc<Args>,
    collector_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Outcome> {
    let run_started = Instant::now();
    let server = tokio::task::spawn_blocking(ClickHouse::start).await?;
    let port = server.http_port();
    let pid = server.pid();
    let server_version = ch(port, "SELECT version()", &[])?.trim().to_string();
    // What the server burns with nothing to do (its background threads):
    // part of its CPU during a slow ingest.
    let idle_secs = if args.quick { 2.0 } else { 5.0 };
    let idle0 = pid.map(pid_cpu).unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
    let idle_share = (pid.map(pid_cpu).unwrap_or(0.0) - idle0) / idle_secs;
    println!(
        "clickhouse: idle server CPU {:.1} % of a core",
        idle_share * 100.0
    );
    println!(
        "clickhouse: private server {server_version} on port {port} (pid {pid:?}), started in {:.1} s",
        run_started.elapsed().as_secs_f64()
    );
    let url: ClickHouseUrl = server
        .store_url(CH_DB)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let config = CollectorConfig {
        grpc_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        store: StoreLocation::ClickHouse(url.clone()),
        agent_rate_limit: 0.0,
        ..CollectorConfig::default()
    };
    let retention = config.retention;
    // The store's default (`--max-concurrent-batches`).
    let permits = ClickHouseStore::open(&url, retention)?.default_in_flight();
    // The collector's writer starts a ClickHouse write at most once per
    // `interval` (so batches join larger inserts): one client then sends
    // at most 1/interval batches a second and all clients together
    // `permits`/interval. The gRPC part is cut to ~20 s (1 client) and ~45 s
    // (the others) at those rates (5 s and 10 s in a quick run); the rest
    // of the hour goes straight into the store as for SQLite.
    let interval = ClickHouseStore::open(&url, retention)?
        .min_write_interval()
        .as_secs_f64();
    let args = if interval > 0.0 {
        let (one_s, many_s) = if args.quick {
            (5.0, 10.0)
        } else {
            (20.0, 45.0)
        };
        let mut a = (*args).clone();
        a.single_client_batches = a.single_client_batches.min((one_s / interval) as usize);
        let many = (many_s * permits as f64 / interval) as usize;
        a.grpc_batches = a.single_client_batches
            + a.grpc_batches
                .saturating_sub(a.single_client_batches)
                .min(many);
        Arc::new(a)
    } else {
        args
    };
    let c = collector_rt.spawn(server::start(config)).await??;
    let apps = Arc::new(apps(args.seed));
    let nodes: Arc<Vec<Node>> = Arc::new((0..args.agents).map(|a| node(a, &args)).collect());
    let windows = u64::from(args.hours.max(1)) * 360;
    let now = now_ns();

    // (1) Ingest through gRPC, then the rest straight into the store (not
    // in a quick run: the smoke run's time budget).
    let events0 = ch_events(port)?;
    let (one, many, next) = grpc_ingest(&c, &args, &nodes, &apps, now, windows, pid).await?;
    let direct = if next.1 < windows && !args.quick {
        let u = url.clone();
        let d = load_direct(
            Box::new(move || Ok(Box::new(ClickHouseStore::open(&u, retention)?) as Box<dyn Store>)),
            pid,
            next,
            windows,
            args.clone(),
            nodes.clone(),
            apps.clone(),
            now,
        )?;
        println!(
            "clickhouse store alone: {} batches, {} samples in {:.1} s; writer thread CPU {:.1} s, server CPU {:.1} s",
            d.batches, d.samples, d.secs, d.cpu, d.server_cpu
        );
        Some(d)
    } else {
        None
    };
    let samples =
        one.sent.samples + many.sent.samples + direct.as_ref().map(|d| d.samples).unwrap_or(0);
    let load_secs = run_started.elapsed().as_secs_f64();
    let events1 = ch_events(port)?;
    let server_work: Vec<String> = CH_EVENTS
        .iter()
        .filter_map(|e| {
            let d = events1.get(*e).copied().unwrap_or(0) - events0.get(*e).copied().unwrap_or(0);
            (d > 0).then(|| format!("{e} {d}"))
        })
        .collect();
    println!("clickhouse server work during the load: {server_work:?}");

    // (3) Size of the loaded data, once merges are done.
    let cap = Duration::from_secs(if args.quick { 10 } else { 60 });
    let (settled_load, _) = ch_settle(port, cap)?;
    let parts = ch_parts(port)?;
    let size: u64 = parts.iter().map(|p| p.1).sum();
    let mib_per_m = size as f64 / (1 << 20) as f64 / (samples as f64 / 1e6);
    let columns = ch(
        port,
        &format!(
            "SELECT name, data_compressed_bytes, data_uncompressed_bytes FROM system.columns
             WHERE database = '{CH_DB}' AND table = 'samples' ORDER BY data_compressed_bytes DESC FORMAT TSV"
        ),
        &[],
    )?;
    let columns: Vec<String> = columns
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let (c, u) = (
                f.get(1)?.parse::<f64>().ok()?,
                f.get(2)?.parse::<f64>().ok()?,
            );
            Some(format!(
                "`{}` {:.1} MiB ({:.1} MiB uncompressed)",
                f[0],
                c / (1 << 20) as f64,
                u / (1 << 20) as f64
            ))
        })
        .collect();
    println!(
        "clickhouse store: {:.1} MiB for {samples} samples: {mib_per_m:.1} MiB per million samples; parts {parts:?}",
        size as f64 / (1 << 20) as f64
    );

    // (2) The span: the loaded hours replicated back in time.
    let copies = (args.span_hours / args.hours.max(1)).max(1);
    let span_h = copies * args.hours.max(1);
    let mat = ch_materialize(port, now, args.hours.max(1), copies)?;
    println!(
        "clickhouse: materialized {} copies ({} rows) in {:.1} s; texts copied to days {:?}",
        mat.copies - 1,
        mat.sample_rows,
        mat.secs,
        mat.text_days
    );
    let cap = Duration::from_secs(if args.quick { 20 } else { 300 });
    let (settled, parts_left) = ch_settle(port, cap)?;
    println!(
        "clickhouse: merges settled in {:.1} s; {parts_left} active parts of samples",
        settled.as_secs_f64()
    );
    let parts_after = ch_parts(port)?;
    let end = now + WINDOW_NS / 2;
    let mut ranges: Vec<f64> = args
        .ranges
        .iter()
        .copied()
        .filter(|&r| r <= f64::from(span_h) + 1e-9)
        .collect();
    if ranges.is_empty() {
        ranges.push(f64::from(span_h));
    }
    let selectors = selectors(&nodes, &apps);
    let direct_store = ClickHouseStore::open(&url, retention)?;
    let mut figures = Vec::new();
    let mut checks = Vec::new();
    let mut one_hour_totals: HashMap<String, u64> = HashMap::new();
    for &hours in &ranges {
        let start = end - (hours * HOUR_NS as f64) as i64;
        for (label, sel) in &selectors {
            let (_, profile, store_time, svg, folded) =
                time_query(&direct_store, c.http_addr, sel, start, end, args.runs).await?;
            if hours <= f64::from(args.hours) {
                if label == "all" && hours == f64::from(args.hours) {
                    anyhow::ensure!(
                        profile.total() == samples,
                        "clickhouse {hours} h all: {} samples, {samples} loaded",
                        profile.total()
                    );
                    checks.push(format!(
                        "{hours} h all: {} samples = the samples loaded",
                        profile.total()
                    ));
                }
                one_hour_totals.insert(label.clone(), profile.total());
            } else if let Some(&loaded) = one_hour_totals.get(label) {
                let expected = loaded * u64::from(copies);
                anyhow::ensure!(
                    profile.total() == expected,
                    "clickhouse {hours} h {label}: {} samples, expected {copies} x {loaded}: \
                     the copies are not all counted",
                    profile.total()
                );
                checks.push(format!(
                    "{hours} h {label}: {} samples = {copies} copies x {loaded} loaded",
                    profile.total()
                ));
            }
            println!(
                "clickhouse query {hours} h, {label}: svg {:.3} s, folded {:.3} s, store alone {:.3} s (medians of {}); {} samples, {} stacks",
                svg.as_secs_f64(),
                folded.as_secs_f64(),
                store_time.as_secs_f64(),
                args.runs,
                profile.total(),
                profile.stacks.len()
            );
            figures.push(QueryFigures {
                hours,
                label: label.clone(),
                svg,
                folded,
                store: store_time,
                samples: profile.total(),
                stacks: profile.stacks.len(),
                raw_rows_read: 0,
                plan: String::new(),
            });
        }
    }
    // Where the span query's time goes.
    let span_start = end - i64::from(span_h) * HOUR_NS;
    let pieces_all = ch_breakdown(port, &direct_store, span_start, end, None, args.runs)?;
    let pieces_java = ch_breakdown(
        port,
        &direct_store,
        span_start,
        end,
        Some(("process", "java")),
        args.runs,
    )?;
    for p in pieces_all.iter().chain(&pieces_java) {
        println!(
            "clickhouse {span_h} h breakdown: {}: {:.3} s {}",
            p.what,
            p.time.as_secs_f64(),
            p.note
        );
    }
    for c in &checks {
        println!("check (clickhouse): {c}");
    }
    drop(direct_store);
    let collector_shutdown = c.shutdown();
    collector_rt.spawn(collector_shutdown).await??;
    let total_secs = run_started.elapsed().as_secs_f64();
    drop(server);

    let per_cpu = (one.sent.samples + many.sent.samples) as f64
        / (one.collector_cpu + many.collector_cpu).max(1e-9);
    let per_cpu_with_server = (one.sent.samples + many.sent.samples) as f64
        / (one.collector_cpu + many.collector_cpu + one.server_cpu + many.server_cpu).max(1e-9);
    let q_span = figures
        .iter()
        .find(|f| f.hours == f64::from(span_h) && f.label == "all")
        .map(|f| f.svg.max(f.folded));
    let bench_line = format!(
        "BENCH clickhouse_ingest_samples_per_s={per_cpu:.0} clickhouse_ingest_total_cpu_samples_per_s={per_cpu_with_server:.0} clickhouse_ingest_wall_samples_per_s={:.0} clickhouse_ingest_1client_samples_per_s={:.0} clickhouse_store_mib_per_m_samples={mib_per_m:.2}{}",
        many.rate(),
        one.rate(),
        q_span
            .map(|d| format!(
                " clickhouse_query_{span_h}h_{}_s={:.4}",
                args.agents,
                d.as_secs_f64()
            ))
            .unwrap_or_default()
    );
    println!("{bench_line}");

    // The section.
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut o = String::new();
    let _ = writeln!(o, "### ClickHouse store\n");
    let _ = writeln!(
        o,
        "Same data set and clients as the SQLite run{}, through the collector with \
         `--store clickhouse://127.0.0.1:PORT/{CH_DB}` (default configuration, \
         `--max-concurrent-batches {permits}`, per-agent rate limit off) into a private \
         ClickHouse {server_version} on this machine. {} batches went through gRPC, {}; \
         {samples} samples loaded in {load_secs:.0} s. \
         *Server CPU* is the clickhouse-server process's user + system time over the same \
         interval (its inserts and background merges; idle, before the load, it used {:.1} % \
         of a core).{}\n",
        if args.quick { " (`--quick`)" } else { "" },
        one.sent.batches + many.sent.batches,
        if direct.is_some() {
            format!(
                "the rest straight into `ClickHouseStore::insert_many` (groups of up to {DIRECT_GROUP})"
            )
        } else {
            "and no more (a quick run loads only those, to fit the smoke run's time)".into()
        },
        idle_share * 100.0,
        if interval > 0.0 {
            format!(
                " The collector starts a write to ClickHouse at most once per {:.0} ms \
                 (`Store::min_write_interval`: batches arriving meanwhile join the next insert, \
                 so ClickHouse makes few parts), so one client gets at most {:.0} batches/s and \
                 all clients together {permits} batches (the `--max-concurrent-batches` \
                 permits) per write: the gRPC part is {} + {} batches here, not SQLite's, to \
                 fit the time budget.",
                interval * 1e3,
                1.0 / interval,
                one.sent.batches,
                many.sent.batches
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        o,
        "| figure | measured |\n|---|---|\n\
         | ingest, 1 client | {:.0} k samples/s; collector {:.1} CPU-s, server {:.1} CPU-s |\n\
         | ingest, {} clients | {:.0} k samples/s, {:.0} batches/s; collector {:.1} CPU-s ({:.0} % of a core), server {:.1} CPU-s ({:.0} % of a core); {:.1} batches per insert group, {:.1} ms each |\n\
         | per CPU-second, all gRPC batches | {:.0} k samples (collector), {:.0} k (collector + server) |",
        one.rate() / 1e3,
        one.collector_cpu,
        one.server_cpu,
        args.clients,
        many.rate() / 1e3,
        many.sent.batches as f64 / many.secs.max(1e-9),
        many.collector_cpu,
        100.0 * many.collector_cpu / many.secs.max(1e-9),
        many.server_cpu,
        100.0 * many.server_cpu / many.secs.max(1e-9),
        many.sent.batches as f64 / many.commits.max(1) as f64,
        1e3 * many.write_secs / many.commits.max(1) as f64,
        per_cpu / 1e3,
        per_cpu_with_server / 1e3
    );
    if let Some(d) = &direct {
        let _ = writeln!(
            o,
            "| store alone (`insert_many`, {} batches) | {:.0} k samples/s; writing thread {:.1} CPU-s, server {:.1} CPU-s: {:.0} k samples per CPU-second of both |",
            d.batches,
            d.samples as f64 / d.secs.max(1e-9) / 1e3,
            d.cpu,
            d.server_cpu,
            d.samples as f64 / (d.cpu + d.server_cpu).max(1e-9) / 1e3
        );
    }
    let _ = writeln!(
        o,
        "| store size (loaded data, `system.parts` bytes_on_disk of active parts) | {mib_per_m:.1} MiB per million samples ({:.1} MiB: {}) |\n",
        mib(size),
        parts
            .iter()
            .map(|(t, b, r, n)| format!("{t} {:.1} MiB, {r} rows, {n} parts", mib(*b)))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        o,
        "Columns of `samples` (loaded data): {}.\n",
        columns.join(", ")
    );
    let _ = writeln!(
        o,
        "What the server did during the load (`system.events`, differences): {}.\n",
        server_work.join(", ")
    );
    let _ = writeln!(
        o,
        "For the queries the loaded {} h were replicated inside ClickHouse to {span_h} h: \
         {} copies of every row (`INSERT INTO samples SELECT … FROM samples`, shifted back \
         k h: `hour − k`, `window_start`/`window_end − k·3600 s`; registry rows' `sequence + \
         k·10⁹` and every row's `write_id` xor k, so the duplicate-write guard sees distinct \
         batches), {} rows added in {:.0} s; the texts of stacks and label sets copied into the \
         day partitions {:?}. The queries start once no merge runs (waited {:.0} s; \
         {:.0} s after the load, before its size). Store after the copies: {}.\n",
        args.hours,
        mat.copies - 1,
        mat.sample_rows,
        mat.secs,
        mat.text_days,
        settled.as_secs_f64(),
        settled_load.as_secs_f64(),
        parts_after
            .iter()
            .map(|(t, b, r, n)| format!("{t} {:.1} MiB, {r} rows, {n} parts", mib(*b)))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        o,
        "Query latency (HTTP, median of {} runs; \"store\" = `ClickHouseStore::profile` alone):\n\n\
         | range | selector | SVG | folded | store | samples | stacks |\n|---|---|---|---|---|---|---|",
        args.runs
    );
    for f in &figures {
        let _ = writeln!(
            o,
            "| {} h | `{}` | {:.3} s | {:.3} s | {:.3} s | {} | {} |",
            f.hours,
            f.label,
            f.svg.as_secs_f64(),
            f.folded.as_secs_f64(),
            f.store.as_secs_f64(),
            f.samples,
            f.stacks
        );
    }
    let _ = writeln!(
        o,
        "\nWhere the {span_h} h query's time goes: the statements `ClickHouseStore::profile` \
         sends, run alone (same SQL, `FORMAT Null`, median of {} runs):\n\n\
         | part | all data | `{{process=\"java\"}}` |\n|---|---|---|",
        args.runs
    );
    for (a, j) in pieces_all.iter().zip(&pieces_java) {
        let _ = writeln!(
            o,
            "| {} | {:.3} s{} | {:.3} s{} |",
            a.what,
            a.time.as_secs_f64(),
            if a.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", a.note)
            },
            j.time.as_secs_f64(),
            if j.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", j.note)
            }
        );
    }
    if let Some(j) = pieces_java.get(pieces_all.len()) {
        let _ = writeln!(o, "| {} | — | {:.3} s |", j.what, j.time.as_secs_f64());
    }
    let _ = writeln!(o, "\nChecks:\n");
    for c in &checks {
        let _ = writeln!(o, "- {c}");
    }
    let _ = writeln!(o, "\nClickHouse run: {total_secs:.0} s.");
    Ok(Outcome {
        summary: Summary {
            store: "ClickHouse",
            per_cpu,
            per_cpu_with_server: Some(per_cpu_with_server),
            one,
            many,
            direct,
            mib_per_m,
            span_h,
            figures,
            total_secs,
        },
        section: o,
        bench_line,
    })
}
