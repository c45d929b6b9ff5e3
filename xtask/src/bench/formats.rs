//! `formats-bench`: what the formats other than the native batch cost,
//! measured with the release agent and collector binaries (as processes, on
//! loopback). Three parts:
//!
//! - `wire`: the agent (`run`, whole host, 19 and 99 Hz) sends every window
//!   both as a native batch (`--collector`) and as an OTLP request
//!   (`--otlp-endpoint`) to one collector; its /metrics give the encoded
//!   (uncompressed) bytes of each, and two byte-counting TCP relays in this
//!   program the bytes each put on the wire (zstd for the collector, gzip
//!   for OTLP, HTTP/2 and gRPC framing included). The host is kept busy by
//!   a few copies of this program building and encoding profiles.
//! - `ingest`: samples stored per CPU-second of the collector (utime +
//!   stime of /proc/PID/stat over the run) for OTLP requests over gRPC, the
//!   same windows as native batches (the baseline) and gzipped pprof
//!   uploads over HTTP, generated here: ~2,000 distinct
//!   stacks 20-40 frames deep and ~5,000 samples each, every one with its own
//!   time range (none is a duplicate).
//! - `scrape`: 100 fake Go services (`net/http/pprof`: `profile?seconds=N`
//!   answers after N seconds, the others at once) served by this program,
//!   scraped by the collector every 15 s (`[[scrape]]` entries of its
//!   configuration file) for 72 s: its CPU, its RSS, and the scrapes it
//!   stored.
//!
//! ```text
//! cargo build --release -p profiler-agent -p profiler-collector
//! cargo build --release -p xtask --features collector-bench --bin formats-bench
//! sudo target/release/formats-bench --report target/bench/formats-bench.md
//! sudo target/release/formats-bench --quick              # smoke: a few seconds a part
//! ```
//!
//! `cargo xtask bench --only formats` does the same (and builds first).
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use flate2::{write::GzEncoder, Compression};
use profiler_collector::import::{otlp::to_batches, OtlpLimits, Source};
use profiler_proto::v1::{
    ingest_client::IngestClient, Batch, Label, LabelSet, Stack as NativeStack,
};
use profiler_proto::{
    otlp::{
        collector::{profiles_service_client::ProfilesServiceClient, ExportProfilesServiceRequest},
        common::{any_value, AnyValue, InstrumentationScope, KeyValue},
        profiles::{
            Function, KeyValueAndUnit, Line, Link, Location, Mapping, Profile, ProfilesDictionary,
            ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
        },
        resource::Resource,
    },
    pprof,
};
use profiler_testkit::rng::{zipf_cumulative, Rng};
use prost::Message;
use tonic::{codec::CompressionEncoding, transport::Channel, Code};

#[derive(Parser, Debug)]
#[command(
    about = "OTLP vs native bytes, OTLP and pprof ingest rate, the cost of scraping Go services"
)]
struct Args {
    /// Write the report section (markdown) to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// A few seconds a part: only shows that everything still runs.
    #[arg(long)]
    quick: bool,
    /// Directory of profiler-agent and profiler-collector (default: this
    /// program's, i.e. target/release or target/debug).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The parts to run, comma-separated: wire, ingest, scrape (default: all).
    #[arg(long, value_delimiter = ',')]
    parts: Vec<String>,
    /// Internal: be one of the busy host's processes for this many seconds.
    #[arg(long, hide = true)]
    busy: Option<u64>,
    #[arg(long, hide = true, default_value_t = 0)]
    seed: u64,
}

/// Sizes of a run: full, or `--quick`.
struct Plan {
    quick: bool,
    /// How long the agent is measured at each frequency.
    agent_secs: u64,
    drain_secs: u64,
    frequencies: Vec<u32>,
    /// Processes keeping the host busy during `wire`.
    busy_procs: usize,
    /// Requests (or uploads) sent at most, and for how long at most.
    ingest_max: usize,
    ingest_secs: f64,
    /// Concurrent senders.
    clients: usize,
    /// Distinct stacks and samples of one request or upload.
    stacks: usize,
    samples: u64,
    /// Processes (OTLP resources) of one OTLP request.
    processes: usize,
    targets: usize,
    scrape_interval: u64,
    scrape_seconds: u64,
    scrape_run: u64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                quick,
                agent_secs: 2,
                drain_secs: 1,
                frequencies: vec![19],
                busy_procs: 1,
                ingest_max: 3,
                ingest_secs: 5.0,
                clients: 1,
                stacks: 200,
                samples: 500,
                processes: 4,
                targets: 4,
                scrape_interval: 3,
                scrape_seconds: 1,
                scrape_run: 5,
            }
        } else {
            Plan {
                quick,
                agent_secs: 30,
                drain_secs: 10,
                frequencies: vec![19, 99],
                busy_procs: 6,
                ingest_max: 400,
                ingest_secs: 15.0,
                clients: 2,
                stacks: 2000,
                samples: 5000,
                processes: 20,
                targets: 100,
                scrape_interval: 15,
                scrape_seconds: 10,
                // Five ticks (0 to 60 s), the last CPU profile ending at
                // 70 s: no scrape ends at the edge.
                scrape_run: 72,
            }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(secs) = args.busy {
        busy(secs, args.seed);
        return Ok(());
    }
    let plan = Plan::new(args.quick);
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program has no directory")?
            .to_path_buf(),
    };
    let bins = Bins {
        agent: bin_dir.join("profiler-agent"),
        collector: bin_dir.join("profiler-collector"),
    };
    for b in [&bins.agent, &bins.collector] {
        ensure!(
            b.is_file(),
            "{} is missing: cargo build --release -p profiler-agent -p profiler-collector",
            b.display()
        );
    }
    let dir = std::env::current_dir()?.join("target/bench");
    fs::create_dir_all(&dir)?;
    let wants = |p: &str| args.parts.is_empty() || args.parts.iter().any(|a| a == p);
    for p in &args.parts {
        ensure!(
            ["wire", "ingest", "scrape"].contains(&p.as_str()),
            "no part {p:?}: wire, ingest, scrape"
        );
    }
    let started = Instant::now();
    let mut out = String::from("\n## Formats (OTLP, pprof, scrapes)\n");
    if plan.quick {
        out += "\n**Quick run: a few seconds a part, the figures mean nothing.**\n";
    }
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let _ = writeln!(
        out,
        "\n`formats-bench` (xtask/src/bench/formats.rs) with the {} agent and collector \
         binaries; {} CPUs, load average {} (1, 5, 15 min) when it started.",
        if bin_dir.ends_with("release") {
            "release"
        } else {
            "debug"
        },
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load.join(" ")
    );
    let mut keys: Vec<(String, f64)> = Vec::new();
    if wants("wire") {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the `wire` part runs the agent, which loads eBPF programs: run as root");
        }
        let runs = plan
            .frequencies
            .iter()
            .map(|&hz| wire(&plan, &bins, &dir, hz))
            .collect::<Result<Vec<_>>>()?;
        out += &wire_section(&plan, &runs, &mut keys);
    }
    if wants("ingest") {
        let otlp = ingest_grpc(&plan, &bins, &dir, false)?;
        let native = ingest_grpc(&plan, &bins, &dir, true)?;
        let pprof = ingest_pprof(&plan, &bins, &dir)?;
        out += &ingest_section(&plan, &[otlp, native, pprof], &mut keys);
    }
    if wants("scrape") {
        let run = scrape(&plan, &bins, &dir)?;
        out += &scrape_section(&plan, &run, &mut keys);
    }
    let _ = write!(out, "\n<!-- BENCH");
    for (k, v) in &keys {
        let _ = write!(out, " {k}={v:.4}");
    }
    let _ = writeln!(
        out,
        " -->\n\nRe-run: `cargo xtask bench --only formats` (as root; about {:.0} s here), or \
         `formats-bench --parts wire,ingest,scrape` (xtask/src/bench/formats.rs).",
        started.elapsed().as_secs_f64()
    );
    println!("{out}");
    if let Some(path) = &args.report {
        fs::write(path, &out).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

struct Bins {
    agent: PathBuf,
    collector: PathBuf,
}

fn step(what: &str) {
    eprintln!("==> formats: {what}");
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

// --- processes ----------------------------------------------------------------

/// User + system CPU seconds of a process (all its threads).
fn proc_cpu(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of proc(5); `after` starts at 3.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11) + ticks(12)) / hz)
}

/// A `kB` field of /proc/PID/status (VmRSS, VmHWM), in MiB.
fn proc_status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// SIGINT, then SIGKILL if it has not exited within `grace`.
fn interrupt(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A collector on free loopback ports, its store in target/bench; stopped
/// (and its store removed) when dropped.
struct Collector {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    store_dir: PathBuf,
    http_client: ureq::Agent,
}

impl Collector {
    fn start(bins: &Bins, dir: &Path, name: &str, extra: &[String]) -> Result<Self> {
        let store_dir = dir.join(format!("{name}-store"));
        let _ = fs::remove_dir_all(&store_dir);
        fs::create_dir_all(&store_dir)?;
        let err_path = dir.join(format!("{name}-collector.err"));
        let child = Command::new(&bins.collector)
            .arg("--store")
            .arg(format!(
                "sqlite:{}",
                store_dir.join("profiles.db").display()
            ))
            .args([
                "--plaintext",
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RUST_LOG", "warn,profiler_collector=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err_path)?)
            .spawn()
            .with_context(|| format!("cannot start {}", bins.collector.display()))?;
        let mut c = Collector {
            child,
            grpc: ([127, 0, 0, 1], 0).into(),
            http: ([127, 0, 0, 1], 0).into(),
            store_dir,
            http_client: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .build()
                .into(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = fs::read_to_string(&err_path).unwrap_or_default();
            if let Some((grpc, http)) = log.lines().find_map(profiler_testkit::net::serving_addrs) {
                (c.grpc, c.http) = (grpc, http);
                return Ok(c);
            }
            if let Some(st) = c.child.try_wait()? {
                bail!("the collector exited ({st}): see {}", err_path.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "the collector did not announce its addresses within 30 s: see {}",
                    err_path.display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn metrics(&self) -> Result<Metrics> {
        let url = format!("http://{}/metrics", self.http);
        let mut r = self.http_client.get(&url).call()?;
        ensure!(r.status() == 200, "GET {url}: HTTP {}", r.status());
        Ok(Metrics(r.body_mut().read_to_string()?))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        interrupt(&mut self.child, Duration::from_secs(10));
        let _ = fs::remove_dir_all(&self.store_dir);
    }
}

/// Prometheus text.
struct Metrics(String);

impl Metrics {
    /// The sum of `name`'s samples whose labels include every `k="v"` of
    /// `filter`; `None` if it has none.
    fn sum(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (metric, labels) = key.split_once('{').unwrap_or((key, ""));
            if metric != name
                || !filter
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
            {
                continue;
            }
            if let Ok(v) = value.parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }

    fn get(&self, name: &str) -> f64 {
        self.sum(name, &[]).unwrap_or(0.0)
    }

    /// Every value of label `label` of `name`, with the sum of its samples
    /// matching `filter`.
    fn by_label(&self, name: &str, label: &str, filter: &[(&str, &str)]) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Some((metric, labels)) = key.split_once('{') else {
                continue;
            };
            if metric != name
                || !filter
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
            {
                continue;
            }
            let Some(rest) = labels.split(&format!("{label}=\"")).nth(1) else {
                continue;
            };
            let v = rest.split('"').next().unwrap_or_default().to_string();
            *out.entry(v).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
        out
    }
}

// --- synthetic profiles ---------------------------------------------------------

const GO_PACKAGES: [&str; 16] = [
    "net/http",
    "encoding/json",
    "database/sql",
    "crypto/tls",
    "compress/gzip",
    "bufio",
    "sync",
    "google.golang.org/grpc",
    "google.golang.org/protobuf/proto",
    "github.com/jackc/pgx/v5/pgconn",
    "go.opentelemetry.io/otel/sdk/trace",
    "github.com/acme/shop/internal/cart",
    "github.com/acme/shop/internal/checkout",
    "github.com/acme/shop/internal/catalog",
    "github.com/acme/shop/pkg/cache",
    "github.com/acme/shop/pkg/httpx",
];
const GO_TYPES: [&str; 12] = [
    "Server", "conn", "Decoder", "Encoder", "Client", "Pool", "Tx", "Reader", "Writer", "Handler",
    "Cache", "Queue",
];
const GO_METHODS: [&str; 20] = [
    "serve",
    "readRequest",
    "ServeHTTP",
    "Decode",
    "Encode",
    "Exec",
    "Query",
    "Get",
    "Put",
    "flush",
    "Write",
    "Read",
    "process",
    "handle",
    "marshal",
    "unmarshal",
    "Lock",
    "roundTrip",
    "run",
    "loop",
];
const RUNTIME: [&str; 16] = [
    "runtime.mallocgc",
    "runtime.memmove",
    "runtime.mapaccess2_faststr",
    "runtime.mapassign_faststr",
    "runtime.growslice",
    "runtime.gcBgMarkWorker",
    "runtime.scanobject",
    "runtime.findObject",
    "runtime.futex",
    "runtime.usleep",
    "runtime.netpoll",
    "runtime.schedule",
    "runtime.park_m",
    "runtime.selectgo",
    "runtime.chanrecv",
    "runtime.memclrNoHeapPointers",
];
const KERNEL: [&str; 12] = [
    "entry_SYSCALL_64_after_hwframe",
    "do_syscall_64",
    "__x64_sys_read",
    "ksys_read",
    "vfs_read",
    "sock_read_iter",
    "tcp_recvmsg",
    "__x64_sys_write",
    "tcp_sendmsg",
    "__x64_sys_epoll_wait",
    "do_epoll_wait",
    "schedule",
];
const PROCESSES: [&str; 20] = [
    "checkout",
    "cart",
    "payments",
    "nginx",
    "postgres",
    "envoy",
    "redis-server",
    "node",
    "python3",
    "kubelet",
    "containerd",
    "java",
    "search",
    "gateway",
    "auth",
    "orders",
    "inventory",
    "mysqld",
    "prometheus",
    "fluent-bit",
];

/// `n` function names of a Go program (packages, receiver types, methods;
/// a few closures), the runtime's functions first.
fn go_functions(rng: &mut Rng, n: usize) -> Vec<String> {
    let mut names: Vec<String> = RUNTIME.iter().map(|s| s.to_string()).collect();
    let mut seen: HashSet<String> = names.iter().cloned().collect();
    while names.len() < n {
        let pkg = GO_PACKAGES[rng.below(GO_PACKAGES.len())];
        let method = GO_METHODS[rng.below(GO_METHODS.len())];
        let name = match rng.below(4) {
            0 => format!("{pkg}.{method}"),
            1 => format!("{pkg}.{method}.func{}", 1 + rng.below(4)),
            _ => format!("{pkg}.(*{}).{method}", GO_TYPES[rng.below(GO_TYPES.len())]),
        };
        if seen.insert(name.clone()) {
            names.push(name);
        }
    }
    names
}

/// `n` distinct stacks, root first, of `depth` frames drawn from `pool`
/// below the `roots`: most share a prefix with an earlier one (the tree of
/// a real program), the frames picked with Zipf weights. Indices into
/// `pool`; `roots` are indices too.
fn gen_stacks(
    rng: &mut Rng,
    pool_len: usize,
    roots: &[u32],
    n: usize,
    depth: (usize, usize),
) -> Vec<Vec<u32>> {
    let cum = zipf_cumulative(pool_len, 0.8);
    let mut stacks: Vec<Vec<u32>> = Vec::with_capacity(n);
    let mut seen: HashSet<Vec<u32>> = HashSet::with_capacity(n);
    while stacks.len() < n {
        let want = depth.0 + rng.below(depth.1 - depth.0 + 1);
        let mut s: Vec<u32> = roots.to_vec();
        if !stacks.is_empty() && rng.unit() < 0.85 {
            // A prefix of another stack, shorter than this one.
            let other = &stacks[rng.below(stacks.len())];
            let span = other.len().min(want).saturating_sub(roots.len());
            if span > 0 {
                s = other[..roots.len() + rng.below(span)].to_vec();
            }
        }
        while s.len() < want {
            s.push(rng.pick(&cum) as u32);
        }
        if seen.insert(s.clone()) {
            stacks.push(s);
        }
    }
    stacks
}

/// `total` spread over `entries` values: at least 1 each, the rest with
/// Zipf weights (a few hot stacks, a long tail).
fn spread(rng: &mut Rng, entries: usize, total: u64) -> Vec<i64> {
    let mut values = vec![1i64; entries];
    let cum = zipf_cumulative(entries, 1.0);
    for _ in 0..total.saturating_sub(entries as u64) {
        values[rng.pick(&cum)] += 1;
    }
    values
}

/// An OTLP request as the agent sends one (one resource a process, a
/// dictionary for the request, kernel frames typed), the template of every
/// request of the `ingest` part: `stacks` distinct stacks over `processes`
/// processes, `samples` samples in all.
struct OtlpTemplate {
    request: ExportProfilesServiceRequest,
}

#[derive(Default)]
struct Dict {
    d: ProfilesDictionary,
    strings: HashMap<String, i32>,
    functions: HashMap<i32, i32>,
    locations: HashMap<(i32, bool), i32>,
    attributes: HashMap<(i32, String), i32>,
    stacks: HashMap<Vec<i32>, i32>,
}

impl Dict {
    fn new() -> Self {
        let mut d = Dict::default();
        d.d.string_table.push(String::new());
        d.strings.insert(String::new(), 0);
        d.d.mapping_table.push(Mapping::default());
        d.d.location_table.push(Location::default());
        d.d.function_table.push(Function::default());
        d.d.link_table.push(Link::default());
        d.d.attribute_table.push(KeyValueAndUnit::default());
        d.d.stack_table.push(Stack::default());
        d
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(i) = self.strings.get(s) {
            return *i;
        }
        let i = self.d.string_table.len() as i32;
        self.d.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn attribute(&mut self, key: &str, value: &str) -> i32 {
        let k = self.string(key);
        if let Some(i) = self.attributes.get(&(k, value.to_string())) {
            return *i;
        }
        let i = self.d.attribute_table.len() as i32;
        self.d.attribute_table.push(KeyValueAndUnit {
            key_strindex: k,
            value: Some(string_value(value)),
            unit_strindex: 0,
        });
        self.attributes.insert((k, value.to_string()), i);
        i
    }

    fn location(&mut self, name: &str, kernel: bool) -> i32 {
        let n = self.string(name);
        let f = match self.functions.get(&n) {
            Some(f) => *f,
            None => {
                let f = self.d.function_table.len() as i32;
                self.d.function_table.push(Function {
                    name_strindex: n,
                    ..Function::default()
                });
                self.functions.insert(n, f);
                f
            }
        };
        if let Some(l) = self.locations.get(&(f, kernel)) {
            return *l;
        }
        let kind = self.attribute(
            "profile.frame.type",
            if kernel { "kernel" } else { "native" },
        );
        let l = self.d.location_table.len() as i32;
        self.d.location_table.push(Location {
            mapping_index: 0,
            address: 0,
            lines: vec![Line {
                function_index: f,
                line: 0,
                column: 0,
            }],
            attribute_indices: vec![kind],
        });
        self.locations.insert((f, kernel), l);
        l
    }

    fn stack(&mut self, leaf_first: Vec<i32>) -> i32 {
        if let Some(s) = self.stacks.get(&leaf_first) {
            return *s;
        }
        let s = self.d.stack_table.len() as i32;
        self.d.stack_table.push(Stack {
            location_indices: leaf_first.clone(),
        });
        self.stacks.insert(leaf_first, s);
        s
    }
}

fn string_value(v: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(v.to_string())),
    }
}

fn key_value(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

impl OtlpTemplate {
    fn new(seed: u64, processes: usize, stacks: usize, samples: u64, hz: u32) -> Self {
        let mut rng = Rng::new(seed);
        let mut dict = Dict::new();
        // Native frames of the processes, then the kernel's.
        let mut pool = go_functions(&mut rng, 1500);
        let roots = ["_start", "__libc_start_main", "main"];
        let root_ids: Vec<u32> = roots
            .iter()
            .map(|r| {
                pool.push(r.to_string());
                (pool.len() - 1) as u32
            })
            .collect();
        let per_process = stacks.div_ceil(processes);
        // (process, stack root first, kernel frames at the leaf, thread)
        let mut entries: Vec<(usize, Vec<u32>, usize, usize)> = Vec::new();
        for p in 0..processes {
            // Each process its own part of the pool: programs differ.
            let base = (p * 61) % 1000;
            let local: Vec<u32> = (0..500).map(|i| ((base + i) % 1500) as u32).collect();
            let mut local_pool = local.clone();
            local_pool.extend(&root_ids);
            let local_roots: Vec<u32> = (500..503).map(|i| i as u32).collect();
            for s in gen_stacks(&mut rng, 500, &local_roots, per_process, (20, 40)) {
                let s: Vec<u32> = s.iter().map(|&i| local_pool[i as usize]).collect();
                let kernel = if rng.unit() < 0.2 {
                    3 + rng.below(4)
                } else {
                    0
                };
                let threads = if rng.unit() < 0.3 { 2 } else { 1 };
                for t in 0..threads {
                    entries.push((p, s.clone(), kernel, t + rng.below(3)));
                }
            }
        }
        let values = spread(&mut rng, entries.len(), samples);
        let mut resources: Vec<ResourceProfiles> = (0..processes)
            .map(|p| {
                let name = PROCESSES[p % PROCESSES.len()];
                ResourceProfiles {
                    resource: Some(Resource {
                        attributes: vec![
                            key_value("host.name", any_value::Value::StringValue("node-0".into())),
                            key_value("service.name", any_value::Value::StringValue(name.into())),
                            key_value(
                                "process.executable.name",
                                any_value::Value::StringValue(name.into()),
                            ),
                            key_value(
                                "process.pid",
                                any_value::Value::IntValue(1000 + 37 * p as i64),
                            ),
                        ],
                        dropped_attributes_count: 0,
                        entity_refs: Vec::new(),
                    }),
                    scope_profiles: vec![ScopeProfiles {
                        scope: Some(InstrumentationScope {
                            name: "formats-bench".into(),
                            version: "0.1.0".into(),
                            attributes: Vec::new(),
                            dropped_attributes_count: 0,
                        }),
                        profiles: Vec::new(),
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }
            })
            .collect();
        let sample_type = ValueType {
            type_strindex: dict.string("cpu"),
            unit_strindex: dict.string("samples"),
        };
        let period_type = ValueType {
            type_strindex: dict.string("cpu"),
            unit_strindex: dict.string("nanoseconds"),
        };
        let mut samples_of: Vec<Vec<Sample>> = vec![Vec::new(); processes];
        for ((p, stack, kernel, thread), value) in entries.into_iter().zip(values) {
            let mut leaf_first: Vec<i32> = Vec::with_capacity(stack.len() + kernel);
            for k in (0..kernel).rev() {
                leaf_first.push(dict.location(KERNEL[(k * 3 + stack.len()) % KERNEL.len()], true));
            }
            for &f in stack.iter().rev() {
                let name = pool[f as usize].clone();
                leaf_first.push(dict.location(&name, false));
            }
            let stack_index = dict.stack(leaf_first);
            let name = PROCESSES[p % PROCESSES.len()];
            let thread = if thread == 0 {
                name.to_string()
            } else {
                format!("worker-{thread}")
            };
            let attribute = dict.attribute("thread.name", &thread);
            samples_of[p].push(Sample {
                stack_index,
                attribute_indices: vec![attribute],
                link_index: 0,
                values: vec![value],
                timestamps_unix_nano: Vec::new(),
            });
        }
        for (r, samples) in resources.iter_mut().zip(samples_of) {
            r.scope_profiles[0].profiles.push(Profile {
                sample_type: Some(sample_type),
                samples,
                time_unix_nano: 0,
                duration_nano: 10_000_000_000,
                period_type: Some(period_type),
                period: (1_000_000_000 + i64::from(hz) / 2) / i64::from(hz),
                profile_id: vec![0; 16],
                ..Profile::default()
            });
        }
        OtlpTemplate {
            request: ExportProfilesServiceRequest {
                resource_profiles: resources,
                dictionary: Some(dict.d),
            },
        }
    }

    /// Request `i`: the template from node `node`, window starting at
    /// `start_ns`, the values of each profile rotated (same sum).
    fn request(&self, i: usize, node: &str, start_ns: i64) -> ExportProfilesServiceRequest {
        let mut r = self.request.clone();
        for (p, rp) in r.resource_profiles.iter_mut().enumerate() {
            if let Some(res) = &mut rp.resource {
                res.attributes[0] =
                    key_value("host.name", any_value::Value::StringValue(node.to_string()));
            }
            for profile in &mut rp.scope_profiles[0].profiles {
                profile.time_unix_nano = start_ns as u64;
                let id = (i as u64) << 16 | p as u64;
                profile.profile_id = [id.to_le_bytes(), (start_ns as u64).to_le_bytes()].concat();
                let mut values: Vec<Vec<i64>> =
                    profile.samples.iter().map(|s| s.values.clone()).collect();
                if !values.is_empty() {
                    let k = i % values.len();
                    values.rotate_left(k);
                }
                for (s, v) in profile.samples.iter_mut().zip(values) {
                    s.values = v;
                }
            }
        }
        r
    }

    fn samples(&self) -> u64 {
        self.request
            .resource_profiles
            .iter()
            .flat_map(|r| &r.scope_profiles)
            .flat_map(|s| &s.profiles)
            .flat_map(|p| &p.samples)
            .map(|s| s.values.iter().sum::<i64>() as u64)
            .sum()
    }
}

/// Builds a pprof profile the way Go's runtime/pprof writes one.
struct GoProfile {
    p: pprof::Profile,
    strings: HashMap<String, i64>,
    locations: HashMap<String, u64>,
    file: i64,
}

impl GoProfile {
    fn new(exe: &str, types: &[(&str, &str)], period: (&str, &str, i64)) -> Self {
        let mut g = GoProfile {
            p: pprof::Profile::default(),
            strings: HashMap::new(),
            locations: HashMap::new(),
            file: 0,
        };
        g.s("");
        let filename = g.s(exe);
        g.p.mapping.push(pprof::Mapping {
            id: 1,
            memory_start: 0x400000,
            memory_limit: 0x2400000,
            filename,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
            ..Default::default()
        });
        g.p.sample_type = types.iter().map(|(t, u)| g.value_type(t, u)).collect();
        g.p.period_type = Some(g.value_type(period.0, period.1));
        g.p.period = period.2;
        g.file = g.s("/src/app/main.go");
        g
    }

    fn s(&mut self, s: &str) -> i64 {
        if let Some(i) = self.strings.get(s) {
            return *i;
        }
        let i = self.p.string_table.len() as i64;
        self.p.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn value_type(&mut self, t: &str, u: &str) -> pprof::ValueType {
        pprof::ValueType {
            r#type: self.s(t),
            unit: self.s(u),
        }
    }

    /// The location of function `name` (one line, its own function).
    fn location(&mut self, name: &str) -> u64 {
        if let Some(id) = self.locations.get(name) {
            return *id;
        }
        let id = self.p.location.len() as u64 + 1;
        let n = self.s(name);
        self.p.function.push(pprof::Function {
            id,
            name: n,
            system_name: n,
            filename: self.file,
            start_line: 10 * id as i64,
        });
        self.p.location.push(pprof::Location {
            id,
            mapping_id: 1,
            address: 0x401000 + id * 0x40,
            line: vec![pprof::Line {
                function_id: id,
                line: 10 * id as i64 + 3,
            }],
            is_folded: false,
        });
        self.locations.insert(name.to_string(), id);
        id
    }

    /// A sample of `stack` (root first).
    fn sample(&mut self, stack: &[&str], value: Vec<i64>) {
        let location_id = stack.iter().rev().map(|f| self.location(f)).collect();
        self.p.sample.push(pprof::Sample {
            location_id,
            value,
            label: Vec::new(),
        });
    }
}

/// The kinds of profile a Go service serves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Cpu,
    Mutex,
    Block,
    Allocs,
    Heap,
    Goroutine,
}

/// A Go profile of `kind`: `stacks` distinct stacks of `depth` frames and
/// `total` events (samples, contentions, allocations, goroutines) spread
/// over them, values per Go's sample types.
fn go_profile(
    seed: u64,
    exe: &str,
    kind: Kind,
    stacks: usize,
    total: u64,
    depth: (usize, usize),
) -> pprof::Profile {
    let mut rng = Rng::new(seed);
    let mut pool = go_functions(&mut rng, 800);
    pool.push("runtime.goexit".into());
    pool.push("main.main".into());
    let roots = [800u32];
    let mut g = match kind {
        Kind::Cpu => GoProfile::new(
            exe,
            &[("samples", "count"), ("cpu", "nanoseconds")],
            ("cpu", "nanoseconds", 10_000_000),
        ),
        Kind::Mutex | Kind::Block => GoProfile::new(
            exe,
            &[("contentions", "count"), ("delay", "nanoseconds")],
            ("contentions", "count", 1),
        ),
        Kind::Allocs | Kind::Heap => GoProfile::new(
            exe,
            &[
                ("alloc_objects", "count"),
                ("alloc_space", "bytes"),
                ("inuse_objects", "count"),
                ("inuse_space", "bytes"),
            ],
            ("space", "bytes", 512 * 1024),
        ),
        Kind::Goroutine => {
            GoProfile::new(exe, &[("goroutine", "count")], ("goroutine", "count", 1))
        }
    };
    let all = gen_stacks(&mut rng, 800, &roots, stacks, depth);
    let counts = spread(&mut rng, all.len(), total);
    for (s, n) in all.iter().zip(counts) {
        let names: Vec<&str> = s.iter().map(|&i| pool[i as usize].as_str()).collect();
        let size = 16 << rng.below(8);
        let value = match kind {
            Kind::Cpu => vec![n, n * 10_000_000],
            Kind::Mutex | Kind::Block => vec![n, n * (20_000 + rng.below(2_000_000) as i64)],
            Kind::Allocs | Kind::Heap => vec![n * 8, n * 8 * size, n, n * size],
            Kind::Goroutine => vec![n],
        };
        g.sample(&names, value);
    }
    g.p
}

/// `p` gzipped, as Go serves and writes profiles.
fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::with_capacity(bytes.len() / 4), Compression::default());
    e.write_all(bytes).expect("writing to memory");
    e.finish().expect("writing to memory")
}

// --- part 1: wire -----------------------------------------------------------------

/// A TCP relay to `to` that counts the bytes clients send through it.
struct Relay {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
}

impl Relay {
    fn start(to: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        // Lives as long as this program: a few idle threads at most.
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(to) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                let counter = counter.clone();
                thread::spawn(move || pipe(client, server, Some(counter)));
                thread::spawn(move || pipe(s2, c2, None));
            }
        });
        Ok(Relay { addr, sent })
    }
}

/// Copies `from` to `to` until either end closes, counting into `count`.
fn pipe(mut from: TcpStream, mut to: TcpStream, count: Option<Arc<AtomicU64>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                if let Some(c) = &count {
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// What the agent sent one way (native or OTLP) in one run.
#[derive(Debug, Default)]
struct Way {
    batches: f64,
    samples: f64,
    bytes: f64,
    largest: f64,
    /// The largest batch compressed, when the agent says.
    largest_wire: Option<f64>,
    /// Bytes the agent put on the TCP connection (relay).
    wire: f64,
    acked: f64,
    pushed_back: f64,
    dropped: f64,
}

struct WireRun {
    hz: u32,
    windows: f64,
    native: Way,
    otlp: Way,
    host_busy: f64,
    processes_seen: Option<u64>,
    /// Why the collector rejected batches, as the agent logged it.
    rejections: Vec<String>,
}

/// Busy and total CPU ticks of the host (/proc/stat).
fn host_ticks() -> (u64, u64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// One of the busy host's processes: builds, encodes and compresses
/// profiles, a quarter of the time.
fn busy(secs: u64, seed: u64) {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut rng = Rng::new(seed);
    let mut sink = 0usize;
    while Instant::now() < end {
        let t = Instant::now();
        let r = OtlpTemplate::new(rng.next_u64(), 2, 60 + rng.below(60), 300, 19);
        let bytes = r.request.encode_to_vec();
        if let Ok(back) = ExportProfilesServiceRequest::decode(bytes.as_slice()) {
            sink += back.resource_profiles.len();
        }
        let p = go_profile(
            rng.next_u64(),
            "/usr/bin/busy",
            Kind::Cpu,
            80,
            300,
            (10, 30),
        );
        sink += gzip(&p.encode_to_vec()).len();
        thread::sleep(t.elapsed() * 3);
    }
    std::hint::black_box(sink);
}

/// Kills the busy processes when dropped.
struct Busy(Vec<Child>);

impl Drop for Busy {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const ATTACHED: &str = "profiler attached to cpu-clock on every online CPU";

fn wire(plan: &Plan, bins: &Bins, dir: &Path, hz: u32) -> Result<WireRun> {
    step(&format!(
        "wire: agent `run -F {hz}` to the collector and an OTLP endpoint for {} s",
        plan.agent_secs
    ));
    let collector = Collector::start(bins, dir, "formats-wire", &[])?;
    let native_relay = Relay::start(collector.grpc)?;
    let otlp_relay = Relay::start(collector.grpc)?;
    let me = std::env::current_exe()?;
    let busy = Busy(
        (0..plan.busy_procs)
            .map(|i| {
                Command::new(&me)
                    .args(["--busy", &(plan.agent_secs + 60).to_string()])
                    .args(["--seed", &i.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting a busy process")
            })
            .collect::<Result<_>>()?,
    );
    let metrics_port = profiler_testkit::net::Reserved::new();
    let metrics_addr = metrics_port.addr();
    let args: Vec<String> = vec![
        "run".into(),
        "--no-progress".into(),
        "--no-kube".into(),
        "--plaintext".into(),
        "-F".into(),
        hz.to_string(),
        "--collector".into(),
        format!("http://{}", native_relay.addr),
        "--otlp-endpoint".into(),
        format!("http://{}", otlp_relay.addr),
        "--drain-interval".into(),
        format!("{}s", plan.drain_secs),
        // A bound in case this program dies; it is stopped long before.
        "-d".into(),
        format!("{}s", plan.agent_secs + 60),
        "--metrics-listen".into(),
        metrics_addr.to_string(),
    ];
    let name = format!("formats-agent-{hz}hz");
    let out_path = dir.join(format!("{name}.out"));
    let err_path = dir.join(format!("{name}.err"));
    metrics_port.release();
    let mut agent = Command::new(&bins.agent)
        .args(&args)
        .env("RUST_LOG", "warn,profiler_agent=info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bins.agent.display()))?;
    let stderr = agent.stderr.take().expect("piped");
    let mut err_file = fs::File::create(&err_path)?;
    let (tx, rx) = mpsc::channel();
    let log = thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains(ATTACHED) {
                let _ = tx.send(());
            }
            let _ = writeln!(err_file, "{line}");
        }
    });
    let attached = rx.recv_timeout(Duration::from_secs(60));
    if attached.is_err() {
        interrupt(&mut agent, Duration::from_secs(5));
        bail!(
            "the agent did not attach within 60 s: see {}",
            err_path.display()
        );
    }
    let (busy0, total0) = host_ticks();
    let t0 = Instant::now();
    // Windows end every drain interval from about the attach: a second and
    // a half more, and the last one has been sent.
    thread::sleep(Duration::from_secs(plan.agent_secs) + Duration::from_millis(1500));
    let windows = (t0.elapsed().as_secs_f64() / plan.drain_secs as f64).floor();
    let (busy1, total1) = host_ticks();
    let url = format!("http://{metrics_addr}/metrics");
    let text = ureq::get(&url)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .with_context(|| format!("reading the agent's {url}"))?;
    let native_wire = native_relay.sent.load(Ordering::Relaxed) as f64;
    let otlp_wire = otlp_relay.sent.load(Ordering::Relaxed) as f64;
    let st = interrupt(&mut agent, Duration::from_secs(60));
    let _ = log.join();
    drop(busy);
    ensure!(
        st.is_some_and(|s| s.success()),
        "the agent did not exit cleanly ({st:?}): see {}",
        err_path.display()
    );
    let m = Metrics(text);
    let way = |prefix: &str, wire: f64| Way {
        batches: m.get(&format!("profiler_agent_{prefix}export_batches_total")),
        samples: m.get(&format!("profiler_agent_{prefix}export_samples_total")),
        bytes: m.get(&format!("profiler_agent_{prefix}export_bytes_total")),
        largest: m.get(&format!(
            "profiler_agent_{prefix}export_largest_batch_bytes"
        )),
        largest_wire: m.sum(
            &format!("profiler_agent_{prefix}export_largest_batch_wire_bytes"),
            &[],
        ),
        wire,
        acked: m.get(&format!(
            "profiler_agent_{prefix}export_batches_acked_total"
        )),
        pushed_back: m.get(&format!("profiler_agent_{prefix}export_pushed_back_total")),
        dropped: m.get(&format!(
            "profiler_agent_{prefix}export_batches_dropped_total"
        )),
    };
    let mut native = way("", native_wire);
    let otlp = way("otlp_", otlp_wire);
    let summary = fs::read_to_string(&out_path).unwrap_or_default();
    // "... largest batch N bytes (M with zstd)."
    if native.largest_wire.is_none() {
        native.largest_wire = summary
            .split(" with zstd")
            .next()
            .and_then(|s| s.rsplit('(').next())
            .and_then(|n| n.trim().parse().ok());
    }
    let mut rejections: Vec<String> = Vec::new();
    for line in fs::read_to_string(&err_path).unwrap_or_default().lines() {
        if let Some((_, why)) = line.split_once("collector rejected a batch: ") {
            let why = why.split(" samples=").next().unwrap_or(why).to_string();
            if !rejections.contains(&why) {
                rejections.push(why);
            }
        }
    }
    let processes_seen = summary
        .split(" processes seen")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok());
    ensure!(
        native.batches > 0.0 && otlp.batches > 0.0,
        "the agent sent no batch ({} native, {} OTLP): see {}",
        native.batches,
        otlp.batches,
        err_path.display()
    );
    let run = WireRun {
        hz,
        windows,
        native,
        otlp,
        host_busy: (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64,
        processes_seen,
        rejections,
    };
    eprintln!(
        "    {hz} Hz: native {} batches {} B ({} B on the wire); OTLP {} batches {} B ({} B on the wire)",
        run.native.batches, run.native.bytes, run.native.wire, run.otlp.batches, run.otlp.bytes,
        run.otlp.wire
    );
    drop(collector);
    Ok(run)
}

fn kib(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn wire_section(plan: &Plan, runs: &[WireRun], keys: &mut Vec<(String, f64)>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### OTLP requests and native batches, bytes per window\n\n\
         The agent, `profiler-agent run --no-kube -F HZ --drain-interval {d}s --collector \
         http://A --otlp-endpoint http://B --metrics-listen ...`, profiles the whole host and \
         sends every window both ways to one collector (release build, SQLite, default \
         settings); A and B are byte-counting TCP relays of this program in front of the \
         collector's gRPC port. The host is kept busy by {busy} processes that build, encode \
         and gzip profiles a quarter of the time each. After {secs} s ({windows} windows) the \
         agent's /metrics give, for each way, the batches queued (one a window and sample \
         type: `cpu` and `off_cpu`), their encoded size before compression \
         (`profiler_agent_[otlp_]export_bytes_total`) and the largest; *wire* is what the \
         agent wrote to each connection (compressed: zstd to the collector, gzip to OTLP; \
         HTTP/2 and gRPC framing included); the largest batch compressed is from the agent's \
         summary (native) or its /metrics when exposed.\n",
        d = plan.drain_secs,
        busy = plan.busy_procs,
        secs = plan.agent_secs,
        windows = plan.agent_secs / plan.drain_secs,
    );
    let _ = writeln!(
        out,
        "| | {} |\n|---|{}",
        runs.iter()
            .map(|r| format!("{} Hz native | {} Hz OTLP", r.hz, r.hz))
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(runs.len() * 2)
    );
    let row = |out: &mut String, what: &str, f: &dyn Fn(&Way, &WireRun) -> String| {
        let cells: Vec<String> = runs
            .iter()
            .flat_map(|r| [f(&r.native, r), f(&r.otlp, r)])
            .collect();
        let _ = writeln!(out, "| {what} | {} |", cells.join(" | "));
    };
    row(&mut out, "batches (windows × sample types)", &|w, _| {
        format!("{:.0}", w.batches)
    });
    row(&mut out, "samples", &|w, _| format!("{:.0}", w.samples));
    row(&mut out, "encoded bytes, all", &|w, _| kib(w.bytes));
    row(
        &mut out,
        "**encoded bytes per batch** (a window of one sample type)",
        &|w, _| format!("**{}**", kib(w.bytes / w.batches.max(1.0))),
    );
    row(&mut out, "encoded bytes per window (all types)", &|w, r| {
        kib(w.bytes / r.windows.max(1.0))
    });
    row(&mut out, "encoded bytes per sample", &|w, _| {
        format!("{:.0} B", w.bytes / w.samples.max(1.0))
    });
    row(&mut out, "largest batch, encoded", &|w, _| kib(w.largest));
    row(&mut out, "largest batch, compressed", &|w, _| {
        w.largest_wire.map_or("not exposed".into(), kib)
    });
    row(&mut out, "**on the wire per window** (relay)", &|w, r| {
        format!("**{}**", kib(w.wire / r.windows.max(1.0)))
    });
    row(&mut out, "batches acknowledged", &|w, _| {
        format!("{:.0}", w.acked)
    });
    row(&mut out, "pushed back / dropped", &|w, _| {
        format!("{:.0} / {:.0}", w.pushed_back, w.dropped)
    });
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| OTLP ÷ native | {} |\n|---|{}",
        runs.iter()
            .map(|r| format!("{} Hz", r.hz))
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(runs.len())
    );
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let cells = |f: &dyn Fn(&WireRun) -> String| runs.iter().map(f).collect::<Vec<_>>().join(" | ");
    let _ = writeln!(
        out,
        "| **encoded bytes** | {} |",
        cells(&|r| format!(
            "**{:.2}×**",
            ratio(
                r.otlp.bytes / r.otlp.batches.max(1.0),
                r.native.bytes / r.native.batches.max(1.0)
            )
        ))
    );
    let _ = writeln!(
        out,
        "| **bytes on the wire** | {} |",
        cells(&|r| format!("**{:.2}×**", ratio(r.otlp.wire, r.native.wire)))
    );
    if runs
        .iter()
        .all(|r| r.otlp.largest_wire.is_some() && r.native.largest_wire.is_some())
    {
        let _ = writeln!(
            out,
            "| largest batch, compressed | {} |",
            cells(&|r| format!(
                "{:.2}×",
                ratio(
                    r.otlp.largest_wire.unwrap_or(0.0),
                    r.native.largest_wire.unwrap_or(0.0)
                )
            ))
        );
    }
    let _ = writeln!(
        out,
        "| host CPU busy / processes the agent saw | {} |",
        cells(&|r| format!(
            "{:.0} % / {}",
            r.host_busy * 100.0,
            r.processes_seen.map_or("?".into(), |n| n.to_string())
        ))
    );
    for r in runs.iter().filter(|r| !r.rejections.is_empty()) {
        let _ = writeln!(
            out,
            "\nAt {} Hz the collector rejected batches (native and OTLP alike; the agent's \
             log): {}.",
            r.hz,
            r.rejections
                .iter()
                .map(|w| format!("\"{w}\""))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    for r in runs {
        keys.push((
            format!("formats_otlp_bytes_ratio_{}hz", r.hz),
            ratio(
                r.otlp.bytes / r.otlp.batches.max(1.0),
                r.native.bytes / r.native.batches.max(1.0),
            ),
        ));
        keys.push((
            format!("formats_otlp_wire_ratio_{}hz", r.hz),
            ratio(r.otlp.wire, r.native.wire),
        ));
        keys.push((
            format!("formats_native_bytes_per_batch_{}hz", r.hz),
            r.native.bytes / r.native.batches.max(1.0),
        ));
        keys.push((
            format!("formats_otlp_bytes_per_batch_{}hz", r.hz),
            r.otlp.bytes / r.otlp.batches.max(1.0),
        ));
    }
    out
}

// --- part 2: ingest -------------------------------------------------------------

struct Ingest {
    format: &'static str,
    how: String,
    sent: usize,
    samples_sent: u64,
    /// Samples the collector counted (`profiler_samples_stored_total`, OTLP).
    samples_counted: Option<f64>,
    retries: usize,
    cpu: f64,
    wall: f64,
    /// Encoded size of one request (OTLP) or profile (pprof), and gzipped.
    size: usize,
    size_gz: usize,
    rss_mib: f64,
}

/// Window start of request `i`: 10 s windows back from a minute ago, so
/// none is in the future and none repeats.
fn window_start(i: usize, base: i64) -> i64 {
    base - (i as i64 + 1) * 10_000_000_000
}

/// Merges one-process batches into one batch of every process, as the
/// agent sends a window natively (strings, stacks and label sets once).
fn merge(parts: &[Batch]) -> Batch {
    let mut out = Batch {
        sample_type: parts.first().and_then(|b| b.sample_type.clone()),
        frequency_hz: parts.first().map_or(0, |b| b.frequency_hz),
        ..Batch::default()
    };
    let mut strings: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut stacks: HashMap<Vec<u32>, u32> = HashMap::new();
    let mut sets: HashMap<Vec<(u32, u32)>, u32> = HashMap::new();
    for b in parts {
        let smap: Vec<u32> = b
            .strings
            .iter()
            .map(|st| {
                *strings.entry(st.clone()).or_insert_with(|| {
                    out.strings.push(st.clone());
                    out.strings.len() as u32 - 1
                })
            })
            .collect();
        let stmap: Vec<u32> = b
            .stacks
            .iter()
            .map(|st| {
                let frames: Vec<u32> = st.frames.iter().map(|f| smap[*f as usize]).collect();
                *stacks.entry(frames.clone()).or_insert_with(|| {
                    out.stacks.push(NativeStack { frames });
                    out.stacks.len() as u32 - 1
                })
            })
            .collect();
        let lmap: Vec<u32> = b
            .label_sets
            .iter()
            .map(|set| {
                let labels: Vec<(u32, u32)> = set
                    .labels
                    .iter()
                    .map(|l| (smap[l.name as usize], smap[l.value as usize]))
                    .collect();
                *sets.entry(labels.clone()).or_insert_with(|| {
                    out.label_sets.push(LabelSet {
                        labels: labels
                            .iter()
                            .map(|&(name, value)| Label { name, value })
                            .collect(),
                    });
                    out.label_sets.len() as u32 - 1
                })
            })
            .collect();
        for sample in &b.samples {
            out.samples.push(profiler_proto::v1::Sample {
                label_set: lmap[sample.label_set as usize],
                stack: stmap[sample.stack as usize],
                value: sample.value,
            });
        }
    }
    out
}

/// Native batch `i`: `template` (a merged window) from node `node`, window
/// starting at `start_ns`, its values rotated (same sum).
fn native_batch(template: &Batch, i: usize, node: &str, start_ns: i64) -> Batch {
    let mut b = template.clone();
    b.agent_id = format!("native/{node}");
    b.node = node.to_string();
    b.sequence = i as u64 + 1;
    b.window_start_unix_nanos = start_ns;
    b.window_end_unix_nanos = start_ns + 10_000_000_000;
    let mut values: Vec<i64> = b.samples.iter().map(|s| s.value).collect();
    if !values.is_empty() {
        let k = i % values.len();
        values.rotate_left(k);
    }
    for (s, v) in b.samples.iter_mut().zip(values) {
        s.value = v;
    }
    b
}

/// OTLP requests over gRPC (`native`: the same windows as native batches,
/// what the OTLP receiver stores, merged into one batch a window as the
/// agent sends them).
fn ingest_grpc(plan: &Plan, bins: &Bins, dir: &Path, native: bool) -> Result<Ingest> {
    step(&format!(
        "ingest: {} over gRPC, {} stacks / {} samples a request",
        if native { "native batches" } else { "OTLP" },
        plan.stacks,
        plan.samples
    ));
    let template = Arc::new(OtlpTemplate::new(
        1,
        plan.processes,
        plan.stacks,
        plan.samples,
        19,
    ));
    let samples_each = template.samples();
    let first = template.request(0, "node-0", now_ns() - 60_000_000_000);
    let parts = to_batches(
        &first,
        &OtlpLimits::default(),
        &Source {
            agent_id: "native/node-0".into(),
            node: "node-0".into(),
        },
    )
    .map_err(|e| anyhow::anyhow!("the generated OTLP request does not convert: {e}"))?;
    let batch_template = Arc::new(merge(&parts));
    let one = if native {
        batch_template.encode_to_vec()
    } else {
        first.encode_to_vec()
    };
    // Each node's windows come faster than real time: no rate limit.
    let name = if native {
        "formats-ingest-native"
    } else {
        "formats-ingest-otlp"
    };
    let collector = Collector::start(bins, dir, name, &["--agent-rate-limit".into(), "0".into()])?;
    let url = format!("http://{}", collector.grpc);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(plan.clients.max(1))
        .enable_all()
        .build()?;
    let channel = rt.block_on(Channel::from_shared(url)?.connect())?;
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let base = now_ns() - 60_000_000_000;
    let m0 = collector.metrics()?;
    let cpu0 = proc_cpu(collector.pid())?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(plan.ingest_secs);
    let max = plan.ingest_max;
    let sent: usize = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..plan.clients {
            let mut otlp = ProfilesServiceClient::new(channel.clone())
                .send_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_encoding_message_size(64 << 20);
            let mut batches = IngestClient::new(channel.clone())
                .send_compressed(CompressionEncoding::Zstd)
                .accept_compressed(CompressionEncoding::Zstd)
                .max_encoding_message_size(64 << 20);
            let (next, retries, template, batch_template) = (
                next.clone(),
                retries.clone(),
                template.clone(),
                batch_template.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut sent = 0usize;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= max || Instant::now() > deadline {
                        return Ok::<usize, anyhow::Error>(sent);
                    }
                    let node = format!("node-{}", i % 20);
                    let start = window_start(i, base);
                    let request = (!native).then(|| template.request(i, &node, start));
                    let batch = native.then(|| native_batch(&batch_template, i, &node, start));
                    loop {
                        let answer = match (&request, &batch) {
                            (Some(r), _) => otlp.export(r.clone()).await.map(drop),
                            (_, Some(b)) => batches.push_batch(b.clone()).await.map(drop),
                            _ => unreachable!("one of the two"),
                        };
                        match answer {
                            Ok(()) => break,
                            Err(s)
                                if matches!(
                                    s.code(),
                                    Code::ResourceExhausted | Code::Unavailable
                                ) =>
                            {
                                retries.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(s) => bail!("request {i} refused: {s}"),
                        }
                    }
                    sent += 1;
                }
            }));
        }
        let mut sent = 0;
        for t in tasks {
            sent += t.await??;
        }
        Ok::<usize, anyhow::Error>(sent)
    })?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu(collector.pid())? - cpu0;
    let m1 = collector.metrics()?;
    let rss_mib = proc_status_mib(collector.pid(), "VmHWM")?;
    let counted = m1.get("profiler_samples_stored_total") - m0.get("profiler_samples_stored_total");
    if !native {
        let stored = m1
            .sum(
                "profiler_imports_total",
                &[("format", "otlp"), ("outcome", "stored")],
            )
            .unwrap_or(0.0);
        let other = m1.by_label("profiler_imports_total", "outcome", &[("format", "otlp")]);
        ensure!(
            stored as usize == sent,
            "the collector stored {stored} OTLP requests of the {sent} sent: {other:?}"
        );
    }
    ensure!(
        counted as u64 == sent as u64 * samples_each,
        "the collector counted {counted} samples stored, not the {} sent",
        sent as u64 * samples_each
    );
    drop(rt);
    Ok(Ingest {
        format: if native { "native" } else { "OTLP" },
        how: if native {
            format!(
                "gRPC `Ingest/PushBatch`, zstd, the same windows as one batch each (what the \
                 OTLP receiver stores, {} processes merged); clients: {}",
                plan.processes, plan.clients
            )
        } else {
            format!(
                "gRPC `ProfilesService/Export`, gzip, a profile per process; clients: {}",
                plan.clients
            )
        },
        sent,
        samples_sent: sent as u64 * samples_each,
        samples_counted: Some(counted),
        retries: retries.load(Ordering::Relaxed),
        cpu,
        wall,
        size: one.len(),
        size_gz: gzip(&one).len(),
        rss_mib,
    })
}

fn ingest_pprof(plan: &Plan, bins: &Bins, dir: &Path) -> Result<Ingest> {
    step(&format!(
        "ingest: pprof uploads over HTTP, {} stacks / {} samples a profile",
        plan.stacks, plan.samples
    ));
    let template = Arc::new(go_profile(
        2,
        "/usr/local/bin/checkout",
        Kind::Cpu,
        plan.stacks,
        plan.samples,
        (20, 40),
    ));
    let samples_each: u64 = template.sample.iter().map(|s| s.value[0] as u64).sum();
    let one = template.encode_to_vec();
    let collector = Collector::start(
        bins,
        dir,
        "formats-ingest-pprof",
        &["--agent-rate-limit".into(), "0".into()],
    )?;
    let url = format!("http://{}/api/v1/ingest/pprof", collector.http);
    let base = now_ns() - 60_000_000_000;
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let m0 = collector.metrics()?;
    let cpu0 = proc_cpu(collector.pid())?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(plan.ingest_secs);
    let max = plan.ingest_max;
    let clients: Vec<thread::JoinHandle<Result<usize>>> = (0..plan.clients)
        .map(|_| {
            let (next, retries, template, url) =
                (next.clone(), retries.clone(), template.clone(), url.clone());
            thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(60)))
                    .build()
                    .into();
                let mut sent = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= max || Instant::now() > deadline {
                        return Ok(sent);
                    }
                    let mut p = (*template).clone();
                    p.time_nanos = window_start(i, base);
                    p.duration_nanos = 10_000_000_000;
                    let body = gzip(&p.encode_to_vec());
                    let target = format!("{url}?service=svc-{}", i % 20);
                    loop {
                        let mut r = agent
                            .post(&target)
                            .header("Content-Type", "application/octet-stream")
                            .send(&body[..])?;
                        let status = r.status().as_u16();
                        let text = r.body_mut().read_to_string().unwrap_or_default();
                        match status {
                            200 => break,
                            429 | 503 => {
                                retries.fetch_add(1, Ordering::Relaxed);
                                thread::sleep(Duration::from_millis(20));
                            }
                            _ => bail!("pprof upload {i}: HTTP {status}: {text}"),
                        }
                    }
                    sent += 1;
                }
            })
        })
        .collect();
    let mut sent = 0;
    for c in clients {
        sent += c
            .join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu(collector.pid())? - cpu0;
    let m1 = collector.metrics()?;
    let rss_mib = proc_status_mib(collector.pid(), "VmHWM")?;
    let stored = m1
        .sum(
            "profiler_imports_total",
            &[("format", "pprof"), ("outcome", "stored")],
        )
        .unwrap_or(0.0)
        - m0.sum(
            "profiler_imports_total",
            &[("format", "pprof"), ("outcome", "stored")],
        )
        .unwrap_or(0.0);
    let other = m1.by_label("profiler_imports_total", "outcome", &[("format", "pprof")]);
    ensure!(
        stored as usize == sent,
        "the collector stored {stored} pprof uploads of the {sent} sent: {other:?}"
    );
    Ok(Ingest {
        format: "pprof",
        how: format!(
            "HTTP `POST /api/v1/ingest/pprof?service=…`, gzipped Go CPU profile; clients: {}",
            plan.clients
        ),
        sent,
        samples_sent: sent as u64 * samples_each,
        samples_counted: None,
        retries: retries.load(Ordering::Relaxed),
        cpu,
        wall,
        size: one.len(),
        size_gz: gzip(&one).len(),
        rss_mib,
    })
}

fn ingest_section(plan: &Plan, runs: &[Ingest], keys: &mut Vec<(String, f64)>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### Ingest rate of OTLP requests and pprof uploads\n\n\
         Generated here, each with ~{stacks} distinct stacks 20-40 frames deep (most sharing a \
         prefix with another, frames drawn with Zipf weights from ~1,500 Go-style function \
         names) and {samples} samples: an OTLP request as the agent builds one ({procs} \
         processes, one resource and profile each, `cpu`/`samples` at 19 Hz, a thread \
         attribute per sample, a fifth of the stacks ending in kernel frames; one dictionary), \
         the same windows as native batches (the OTLP receiver's conversion of that request, \
         its {procs} batches merged into one, as the agent sends a window), and a Go CPU \
         profile (`samples`/`count` and `cpu`/`nanoseconds`, 10 ms period, one mapping and a \
         function and location per frame), gzipped. Each request, batch or upload has its own \
         10 s window (none is a duplicate) and comes from one of 20 nodes or services. Each \
         kind is sent for up to {secs:.0} s (at most {max}) to a fresh collector (release, \
         SQLite, `--agent-rate-limit 0`: each node's windows come faster than real time); \
         *collector CPU* is utime + stime of its /proc/PID/stat over \
         the sending. Samples stored: OTLP and native from `profiler_samples_stored_total` \
         (which counts `cpu` samples), checked to be all that was sent; pprof the \
         `samples`/`count` values sent, with every upload counted in \
         `profiler_imports_total{{format=\"pprof\",outcome=\"stored\"}}`.\n\n\
         | format | how | size (encoded / gzip) | sent | samples stored | collector CPU | wall | **samples per collector CPU-second** | collector peak RSS | pushed back |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        stacks = plan.stacks,
        samples = plan.samples,
        procs = plan.processes,
        secs = plan.ingest_secs,
        max = plan.ingest_max,
    );
    for r in runs {
        let rate = r.samples_sent as f64 / r.cpu.max(1e-9);
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} | {} | {} | {:.2} s | {:.1} s | **{:.0} k** | {:.0} MiB | {} |",
            r.format,
            r.how,
            kib(r.size as f64),
            kib(r.size_gz as f64),
            r.sent,
            r.samples_counted.map_or(r.samples_sent as f64, |c| c) as u64,
            r.cpu,
            r.wall,
            rate / 1e3,
            r.rss_mib,
            r.retries
        );
        keys.push((
            format!(
                "formats_{}_ingest_samples_per_cpu_s",
                r.format.to_lowercase()
            ),
            rate,
        ));
    }
    let per = |r: &Ingest| r.cpu / r.sent.max(1) as f64 * 1e3;
    let _ = writeln!(
        out,
        "\nCollector CPU per request: {}. The native row is the baseline: the same stacks, \
         labels and samples, sent as the agent sends a window (`profiler_samples_stored_total` \
         checked for it too); the collector benchmark above measures native batches with far \
         fewer distinct stacks per sample.",
        runs.iter()
            .map(|r| format!("{} {:.1} ms", r.format, per(r)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    out
}

// --- part 3: scrape ---------------------------------------------------------------

/// The profiles one fake Go service serves (templates; the time is set
/// at each answer).
struct GoService {
    cpu: pprof::Profile,
    mutex: pprof::Profile,
    block: pprof::Profile,
    allocs: pprof::Profile,
    heap: pprof::Profile,
    goroutine: pprof::Profile,
}

impl GoService {
    fn new(seed: u64, quick: bool) -> Self {
        let exe = format!("/usr/local/bin/svc{seed}");
        let scale = if quick { 4 } else { 1 };
        let p = |k: Kind, stacks: usize, total: u64, depth: (usize, usize), n: u64| {
            go_profile(
                seed * 10 + n,
                &exe,
                k,
                stacks / scale,
                total / scale as u64,
                depth,
            )
        };
        GoService {
            // A service using about one core: 1,000 samples in 10 s at 100 Hz.
            cpu: p(Kind::Cpu, 400, 1000, (15, 45), 0),
            mutex: p(Kind::Mutex, 40, 300, (10, 25), 1),
            block: p(Kind::Block, 40, 300, (10, 25), 2),
            allocs: p(Kind::Allocs, 200, 2000, (12, 35), 3),
            heap: p(Kind::Heap, 200, 2000, (12, 35), 4),
            goroutine: p(Kind::Goroutine, 60, 400, (6, 20), 5),
        }
    }

    /// The answer to `path` (`/debug/pprof/NAME?seconds=N`), after the
    /// wait a Go service takes; `None` for another path.
    fn answer(&self, path: &str) -> Option<Vec<u8>> {
        let (name, query) = path.split_once('?').unwrap_or((path, ""));
        let name = name.strip_prefix("/debug/pprof/")?;
        let seconds: i64 = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("seconds="))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let (template, wait) = match name {
            "profile" => (&self.cpu, seconds.max(1)),
            "mutex" => (&self.mutex, 0),
            "block" => (&self.block, 0),
            "allocs" => (&self.allocs, 0),
            "heap" => (&self.heap, 0),
            "goroutine" => (&self.goroutine, 0),
            _ => return None,
        };
        if wait > 0 {
            thread::sleep(Duration::from_secs(wait as u64));
        }
        let mut p = template.clone();
        let span = if name == "heap" || name == "goroutine" {
            0
        } else {
            seconds.max(1) * 1_000_000_000
        };
        p.time_nanos = now_ns() - span;
        p.duration_nanos = span;
        Some(gzip(&p.encode_to_vec()))
    }
}

/// Serves one HTTP/1.1 connection (keep-alive) of a fake Go service.
fn serve_conn(conn: TcpStream, service: Arc<GoService>, served: Arc<AtomicU64>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        // The headers, up to the blank line (GET: no body).
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(0) | Err(_) => return,
                Ok(_) if h.trim().is_empty() => break,
                Ok(_) => {}
            }
        }
        let reply = match service.answer(&path) {
            Some(body) => {
                served.fetch_add(1, Ordering::Relaxed);
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Disposition: attachment; filename=\"profile\"\r\n\
                     Content-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend(body);
                r
            }
            None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
        };
        if writer.write_all(&reply).is_err() {
            return;
        }
    }
}

/// `n` fake Go services on loopback ports: their addresses.
fn go_services(n: usize, quick: bool, served: Arc<AtomicU64>) -> Result<Vec<SocketAddr>> {
    // Ten programs, each served by a tenth of the targets.
    let kinds: Vec<Arc<GoService>> = (0..n.min(10))
        .map(|i| Arc::new(GoService::new(i as u64 + 1, quick)))
        .collect();
    let mut addrs = Vec::with_capacity(n);
    for i in 0..n {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        addrs.push(listener.local_addr()?);
        let service = kinds[i % kinds.len()].clone();
        let served = served.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (service, served) = (service.clone(), served.clone());
                thread::spawn(move || serve_conn(conn, service, served));
            }
        });
    }
    Ok(addrs)
}

struct ScrapeRun {
    targets: usize,
    secs: f64,
    cpu: f64,
    rss_mib: f64,
    hwm_mib: f64,
    /// By outcome, then profile.
    outcomes: BTreeMap<String, BTreeMap<String, f64>>,
    served: u64,
    cpu_profile_kib: f64,
}

fn scrape(plan: &Plan, bins: &Bins, dir: &Path) -> Result<ScrapeRun> {
    step(&format!(
        "scrape: {} fake Go services, every {} s for {} s",
        plan.targets, plan.scrape_interval, plan.scrape_run
    ));
    let served = Arc::new(AtomicU64::new(0));
    let addrs = go_services(plan.targets, plan.quick, served.clone())?;
    let cpu_profile_kib =
        gzip(&GoService::new(1, plan.quick).cpu.encode_to_vec()).len() as f64 / 1024.0;
    let mut config = format!(
        "scrape_interval = \"{}s\"\nscrape_seconds = {}\n",
        plan.scrape_interval, plan.scrape_seconds
    );
    for (i, a) in addrs.iter().enumerate() {
        let _ = write!(
            config,
            "\n[[scrape]]\nurl = \"http://{a}/debug/pprof\"\nlabels = {{ service = \"svc{i}\" }}\n"
        );
    }
    let config_path = dir.join("formats-scrape.toml");
    fs::write(&config_path, config)?;
    let collector = Collector::start(
        bins,
        dir,
        "formats-scrape",
        &["--config".into(), config_path.display().to_string()],
    )?;
    let cpu0 = proc_cpu(collector.pid())?;
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(plan.scrape_run));
    let secs = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu(collector.pid())? - cpu0;
    let rss_mib = proc_status_mib(collector.pid(), "VmRSS")?;
    let hwm_mib = proc_status_mib(collector.pid(), "VmHWM")?;
    let m = collector.metrics()?;
    let mut outcomes: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for outcome in ["stored", "duplicate", "failed", "oversize", "rejected"] {
        let by = m.by_label("profiler_scrapes_total", "profile", &[("outcome", outcome)]);
        if !by.is_empty() {
            outcomes.insert(outcome.to_string(), by);
        }
    }
    let stored: f64 = outcomes.get("stored").map_or(0.0, |b| b.values().sum());
    ensure!(
        stored > 0.0,
        "the collector stored no scrape: {outcomes:?} (see target/bench/formats-scrape-collector.err)"
    );
    drop(collector);
    Ok(ScrapeRun {
        targets: plan.targets,
        secs,
        cpu,
        rss_mib,
        hwm_mib,
        outcomes,
        served: served.load(Ordering::Relaxed),
        cpu_profile_kib,
    })
}

fn scrape_section(plan: &Plan, r: &ScrapeRun, keys: &mut Vec<(String, f64)>) -> String {
    let mut out = String::new();
    let ticks = (plan.scrape_run - plan.scrape_seconds).div_ceil(plan.scrape_interval);
    let _ = writeln!(
        out,
        "\n### Scraping {targets} Go services\n\n\
         {targets} fake Go services in this program, each on its own loopback port, serve \
         `net/http/pprof` as Go does (HTTP/1.1, keep-alive, gzipped profiles): \
         `profile?seconds=N` answers after N seconds with a CPU profile of ~{cpu_stacks} stacks \
         and ~{cpu_samples} samples ({cpu_kib:.0} KiB gzipped: a service using one core), \
         `mutex`, `block`, `allocs`, `heap` and `goroutine` at once with smaller profiles \
         (40-200 stacks); ten different programs, each served by a tenth of the targets. The \
         collector (release, SQLite) reads a configuration file with `scrape_interval = \
         \"{interval}s\"`, `scrape_seconds = {seconds}` and one `[[scrape]]` entry per service \
         (`url = \"http://127.0.0.1:PORT/debug/pprof\"`, `labels = {{ service = \"svcN\" }}`, \
         every profile) and runs for {run} s from its start. *CPU* is utime + stime of its \
         /proc/PID/stat over that time; *scrapes* are `profiler_scrapes_total` by outcome.\n\n\
         | targets | interval | collector CPU, % of one core | RSS at the end | peak RSS (VmHWM) | scrapes stored | answers served |\n\
         |---:|---:|---:|---:|---:|---:|---:|",
        targets = r.targets,
        cpu_stacks = if plan.quick { 100 } else { 400 },
        cpu_samples = if plan.quick { 250 } else { 1000 },
        cpu_kib = r.cpu_profile_kib,
        interval = plan.scrape_interval,
        seconds = plan.scrape_seconds,
        run = plan.scrape_run,
    );
    let stored: f64 = r.outcomes.get("stored").map_or(0.0, |b| b.values().sum());
    let pct = r.cpu / r.secs * 100.0;
    let _ = writeln!(
        out,
        "| {} | {} s | **{pct:.1} %** ({:.1} s in {:.0} s) | {:.0} MiB | {:.0} MiB | {stored:.0} | {} |",
        r.targets, plan.scrape_interval, r.cpu, r.secs, r.rss_mib, r.hwm_mib, r.served
    );
    let _ = writeln!(
        out,
        "\n| profile | {} | on time |\n|---|{}---:|",
        r.outcomes.keys().cloned().collect::<Vec<_>>().join(" | "),
        "---:|".repeat(r.outcomes.len())
    );
    for profile in ["cpu", "mutex", "block", "allocs", "heap", "goroutine"] {
        let cells: Vec<String> = r
            .outcomes
            .values()
            .map(|by| format!("{:.0}", by.get(profile).copied().unwrap_or(0.0)))
            .collect();
        let _ = writeln!(
            out,
            "| {profile} | {} | {} |",
            cells.join(" | "),
            ticks * r.targets as u64
        );
    }
    let cpu_stored = r
        .outcomes
        .get("stored")
        .and_then(|b| b.get("cpu"))
        .copied()
        .unwrap_or(0.0);
    let _ = writeln!(
        out,
        "\n*On time* counts the scrapes that would have ended within the {run} s had every \
         target been scraped at each of the {ticks} ticks (at 0, {interval}, … s; a CPU \
         profile ends {seconds} s after its tick). The collector fetches at most 448 profiles at once over \
         all targets (`MAX_IN_FLIGHT` in profiler-collector/src/scrape.rs), and a CPU profile \
         holds its slot for {seconds} s: {cpu_stored:.0} CPU profiles stored of {on_time} on \
         time.",
        run = plan.scrape_run,
        interval = plan.scrape_interval,
        seconds = plan.scrape_seconds,
        on_time = ticks * r.targets as u64,
    );
    keys.push(("formats_scrape_100_cpu_pct".into(), pct));
    keys.push(("formats_scrape_100_rss_mib".into(), r.rss_mib));
    keys.push(("formats_scrapes_stored".into(), stored));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_otlp_request_converts_and_merges_into_one_native_batch() {
        let t = OtlpTemplate::new(7, 4, 200, 500, 19);
        assert_eq!(t.samples(), 500);
        let stacks = t.request.dictionary.as_ref().unwrap().stack_table.len() - 1;
        assert_eq!(stacks, 200, "distinct stacks");
        let r = t.request(3, "node-3", 1_700_000_000_000_000_000);
        let profiles: Vec<&Profile> = r
            .resource_profiles
            .iter()
            .flat_map(|r| &r.scope_profiles)
            .flat_map(|s| &s.profiles)
            .collect();
        assert_eq!(profiles.len(), 4);
        assert!(profiles
            .iter()
            .all(|p| p.time_unix_nano == 1_700_000_000_000_000_000));
        let sum: i64 = profiles
            .iter()
            .flat_map(|p| &p.samples)
            .map(|s| s.values[0])
            .sum();
        assert_eq!(sum, 500, "rotating the values keeps their sum");

        // The collector takes it: a batch a process, merged into one.
        let source = Source {
            agent_id: "native/node-3".into(),
            node: "node-3".into(),
        };
        let parts = to_batches(&r, &OtlpLimits::default(), &source).unwrap();
        assert_eq!(parts.len(), 4);
        let merged = merge(&parts);
        assert_eq!(merged.samples.iter().map(|s| s.value).sum::<i64>(), 500);
        let stacks: usize = parts.iter().map(|b| b.stacks.len()).sum();
        assert_eq!(merged.stacks.len(), stacks, "each process its own stacks");
        let b = native_batch(&merged, 2, "node-2", 1_700_000_000_000_000_000);
        assert_eq!(b.samples.iter().map(|s| s.value).sum::<i64>(), 500);
        assert_eq!(b.agent_id, "native/node-2");
    }

    #[test]
    fn go_profiles_have_distinct_stacks_and_their_totals() {
        let p = go_profile(3, "/usr/bin/x", Kind::Cpu, 300, 1000, (20, 40));
        assert_eq!(p.sample.len(), 300);
        let total: i64 = p.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 1000);
        let distinct: HashSet<&Vec<u64>> = p.sample.iter().map(|s| &s.location_id).collect();
        assert_eq!(distinct.len(), 300);
        assert!(p
            .sample
            .iter()
            .all(|s| (20..=40).contains(&s.location_id.len())));
        let service = GoService::new(1, true);
        assert!(service.answer("/debug/pprof/heap").is_some());
        assert!(service.answer("/debug/pprof/threadcreate").is_none());
    }

    #[test]
    fn reads_prometheus_text() {
        let m = Metrics(
            "# HELP x\nprofiler_scrapes_total{target=\"a\",profile=\"cpu\",outcome=\"stored\"} 3\n\
             profiler_scrapes_total{target=\"b\",profile=\"cpu\",outcome=\"stored\"} 2\n\
             profiler_scrapes_total{target=\"b\",profile=\"heap\",outcome=\"failed\"} 1\n\
             profiler_samples_stored_total 40\n"
                .into(),
        );
        assert_eq!(m.get("profiler_samples_stored_total"), 40.0);
        assert_eq!(
            m.sum("profiler_scrapes_total", &[("outcome", "stored")]),
            Some(5.0)
        );
        let by = m.by_label(
            "profiler_scrapes_total",
            "profile",
            &[("outcome", "stored")],
        );
        assert_eq!(by.get("cpu"), Some(&5.0));
        assert_eq!(by.get("heap"), None);
    }
}
