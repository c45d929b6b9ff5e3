//! Collector benchmark: ingest rate through the real gRPC server into the
//! embedded SQLite store, flame graph query latency over the HTTP API, and
//! store size per million samples, for a realistic mix of batches.
//!
//! Each simulated agent profiles an 8-CPU node at 19 Hz and sends one batch
//! per 10 s window: ~30 processes (a few short-lived ones whose pid changes
//! every minute), each running one of 40 applications with 12 stacks of
//! 15-40 frames, samples spread over processes and stacks by Zipf weights,
//! labels node/process/pid/exe and, for containers, container/pod/namespace.
//!
//! ```text
//! cargo run --release -p profiler-collector --example ingest_bench -- \
//!     --agents 100 --hours 1 --clients 4
//! ```
//! Results and their analysis: `docs/collector-benchmarks.md` (the full
//! suite is `cargo xtask bench`).
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use profiler_collector::{
    ingest::now_ns,
    model::Selector,
    server::{self, CollectorConfig, StoreLocation},
    store::{sqlite::SqliteStore, Store},
};
use profiler_proto::v1::{ingest_client::IngestClient, Batch, Label, LabelSet, Sample, Stack};
use tokio::sync::{mpsc, Mutex};
use tonic::{codec::CompressionEncoding, transport::Channel, Code};

const WINDOW_NS: i64 = 10_000_000_000;
const HOUR_NS: i64 = 3600 * 1_000_000_000;
const APPS: usize = 40;
const STACKS_PER_APP: usize = 12;

#[derive(Parser, Debug)]
#[command(about = "Collector ingest, query and store-size benchmark")]
struct Args {
    /// Simulated agents (nodes).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Hours of data to load (10 s windows), ending now.
    #[arg(long, default_value_t = 1.0)]
    hours: f64,
    /// Batches sent by a single client first, for the one-client rate.
    #[arg(long, default_value_t = 3000)]
    single_client_batches: usize,
    /// Concurrent clients for the rest of the load.
    #[arg(long, default_value_t = 4)]
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
    /// Query ranges in hours (those longer than the data set are skipped).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1.0, 6.0, 24.0])]
    ranges: Vec<f64>,
    /// Most runs of each query (fewer when one run takes over 10 s).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Database file (kept); default: a temporary directory.
    #[arg(long)]
    db: Option<PathBuf>,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
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
                        node = node * 7 + 1 + rng.below(fan);
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
            count,
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

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15; 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
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
) -> anyhow::Result<(Sent, f64, f64, (usize, u64))> {
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
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let mut total = Sent::default();
    for t in tasks {
        let s = t.await??;
        total.batches += s.batches;
        total.samples += s.samples;
        total.rows += s.rows;
        total.retries += s.retries;
    }
    let next = producer.await?;
    Ok((total, t0.elapsed().as_secs_f64(), cpu_seconds() - c0, next))
}

fn report_ingest(what: &str, s: Sent, secs: f64, cpu: f64) {
    println!(
        "ingest, {what}: {} batches, {} samples ({} rows) in {secs:.1} s: {:.0} samples/s, {:.0} batches/s, {:.0} rows/s; process CPU {cpu:.1} s = {:.0} samples per CPU-second; {} push-backs",
        s.batches,
        s.samples,
        s.rows,
        s.samples as f64 / secs,
        s.batches as f64 / secs,
        s.rows as f64 / secs,
        s.samples as f64 / cpu.max(1e-9),
        s.retries
    );
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let tmp = tempfile::tempdir()?;
    let db = args.db.clone().unwrap_or(tmp.path().join("bench.db"));
    let c = server::start(CollectorConfig {
        grpc_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        store: StoreLocation::Sqlite(db.clone()),
        agent_rate_limit: 0.0,
        ..CollectorConfig::default()
    })
    .await?;
    let apps = Arc::new(apps(args.seed));
    let nodes: Arc<Vec<Node>> = Arc::new((0..args.agents).map(|a| node(a, &args)).collect());
    let windows = ((args.hours * 360.0).round() as u64).max(1);
    let now = now_ns();
    println!(
        "data set: {} agents x {} windows of 10 s ({} h) = {} batches; {} processes per node, {:.0} samples per batch",
        args.agents,
        windows,
        args.hours,
        args.agents as u64 * windows,
        args.processes,
        8.0 * 19.0 * 10.0 * args.cpu_util
    );

    // (1) Ingest: one client, then several, over the whole data set.
    let started = Instant::now();
    let (one, secs, cpu, next) = load(
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
    )
    .await?;
    report_ingest("1 client", one, secs, cpu);
    let (many, secs2, cpu2, _) = load(
        c.grpc_addr,
        args.clients,
        0..windows,
        next,
        None,
        args.clone(),
        nodes.clone(),
        apps.clone(),
        now,
        windows,
    )
    .await?;
    if many.batches > 0 {
        report_ingest(&format!("{} clients", args.clients), many, secs2, cpu2);
    }
    let samples = one.samples + many.samples;
    println!(
        "load: {samples} samples in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // (3) Store size, after a checkpoint so the WAL is in the main file.
    let direct = SqliteStore::open(&db)?;
    let stats = direct.stats()?;
    let conn = rusqlite::Connection::open(&db)?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    let size = std::fs::metadata(&db)?.len();
    println!(
        "store: {:.1} MiB on disk for {samples} samples: {:.1} MiB per million samples; {} sample rows ({:.1} bytes per row), {} stacks, {} label sets",
        size as f64 / (1 << 20) as f64,
        size as f64 / (1 << 20) as f64 / (samples as f64 / 1e6),
        stats.sample_rows,
        size as f64 / stats.sample_rows as f64,
        stats.stacks,
        conn.query_row("SELECT COUNT(*) FROM label_sets", [], |r| r.get::<_, i64>(0))?
    );

    // (2) Queries over the API, and the store's part of them.
    let pod = "postgres";
    let pod = nodes[0]
        .procs
        .iter()
        .enumerate()
        .find(|(_, p)| p.containerized)
        .map(|(i, p)| format!("{}-{}-{i}", apps[p.app].name, nodes[0].name))
        .unwrap_or(pod.into());
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let selectors = [
        ("all".to_string(), String::new()),
        (
            "process=\"java\"".to_string(),
            "{process=\"java\"}".to_string(),
        ),
        (format!("pod=\"{pod}\""), format!("{{pod=\"{pod}\"}}")),
    ];
    let mut ranges: Vec<f64> = args
        .ranges
        .iter()
        .copied()
        .filter(|&r| r <= args.hours + 1e-9)
        .collect();
    if ranges.is_empty() {
        ranges.push(args.hours);
    }
    for &hours in &ranges {
        // Range bounds mid-window, so float seconds cannot move a window in or out.
        let end = now + WINDOW_NS / 2;
        let start = end - (hours * HOUR_NS as f64) as i64;
        for (label, sel) in &selectors {
            // The store alone: SQL, and fold into a profile.
            let selector = Selector {
                matchers: profiler_collector::query::parse_selector(sel)
                    .map_err(anyhow::Error::msg)?,
                start_ns: start,
                end_ns: end,
            };
            let t = Instant::now();
            let profile = direct.profile(&selector)?;
            let store_time = t.elapsed();
            for endpoint in ["flamegraph.svg", "folded"] {
                let mut q = format!(
                    "/api/v1/{endpoint}?start={:.3}&end={:.3}",
                    start as f64 / 1e9,
                    end as f64 / 1e9
                );
                if !sel.is_empty() {
                    q.push_str(&format!("&query={}", enc(sel)));
                }
                let u = format!("http://{}{q}", c.http_addr);
                let mut times = Vec::new();
                let mut bytes = 0;
                let budget = Instant::now();
                while times.len() < args.runs
                    && (times.is_empty() || budget.elapsed() < Duration::from_secs(10))
                {
                    let u = u.clone();
                    let t = Instant::now();
                    bytes = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
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
                println!(
                    "query {hours} h, {label}, {endpoint}: median {:.3} s of {} runs (min {:.3} s; store alone {:.3} s; {} samples, {} stacks; {bytes} bytes)",
                    median(times.clone()).as_secs_f64(),
                    times.len(),
                    times.iter().min().unwrap().as_secs_f64(),
                    store_time.as_secs_f64(),
                    profile.total(),
                    profile.folded().lines().count(),
                );
            }
        }
        // Where the store's time goes: the plan, and a scan without the join.
        let t = Instant::now();
        let rows: i64 = conn.query_row(
            "SELECT COUNT(*) FROM samples WHERE window_end > ?1 AND window_end <= ?2",
            [start, end],
            |r| r.get(0),
        )?;
        println!(
            "  scan {hours} h: {rows} sample rows counted in {:.3} s",
            t.elapsed().as_secs_f64()
        );
        // The same profile, summed per stack id before the stacks' texts are
        // joined (the store joins first, then sorts the texts to group).
        let t = Instant::now();
        let mut stmt = conn.prepare_cached(
            "SELECT s.folded, t.n FROM
               (SELECT stack_id, SUM(count) AS n FROM samples
                WHERE window_end > ?1 AND window_end <= ?2 GROUP BY stack_id) t
             JOIN stacks s ON s.id = t.stack_id",
        )?;
        let mut alt = profiler_collector::model::Profile::default();
        for row in stmt.query_map([start, end], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })? {
            let (stack, n) = row?;
            alt.add(&stack, n as u64);
        }
        println!(
            "  aggregate-then-join {hours} h, all: {:.3} s ({} samples)",
            t.elapsed().as_secs_f64(),
            alt.total()
        );
    }
    let mut plan = conn.prepare(
        "EXPLAIN QUERY PLAN SELECT s.folded, SUM(x.count) FROM samples x JOIN stacks s ON s.id = x.stack_id
         WHERE x.window_end > ?1 AND x.window_end <= ?2 AND x.label_set_id IN
         (SELECT label_set_id FROM labels WHERE name = 'process' AND value = 'java') GROUP BY x.stack_id",
    )?;
    let lines = plan.query_map([0i64, 1], |r| r.get::<_, String>(3))?;
    println!("plan of the selector query:");
    for l in lines {
        println!("  {}", l?);
    }
    drop(plan);
    drop(direct);
    c.shutdown().await?;
    Ok(())
}
