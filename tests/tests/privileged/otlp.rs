//! OTLP profiles end to end, checked with OpenTelemetry's own Python
//! bindings (PyPI `opentelemetry-proto`, installed by `cargo xtask setup`)
//! rather than with our Rust mapping alone:
//!
//! - what the agent sends (`--otlp-endpoint`), captured by a gRPC
//!   `ProfilesService` in this process and decoded by
//!   `workloads/otlp/otlp_decode.py`, folds back to exactly what the same
//!   agent's native batches made the collector store (`--collector`, next
//!   to it in the same run: the same windows);
//! - a request built by `workloads/otlp/otlp_build.py` and POSTed to the
//!   collector's OTLP/HTTP receiver is served back exactly;
//! - the agent with only `--otlp-endpoint`, pointed at the collector's
//!   OTLP/gRPC receiver, gets its profile stored.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use profiler_proto::otlp::collector::{
    profiles_service_server::{ProfilesService, ProfilesServiceServer},
    ExportProfilesServiceRequest, ExportProfilesServiceResponse,
};
use profiler_testkit::net::Reserved;
use prost::Message;
use serde_json::Value;
use tonic::codec::CompressionEncoding;

use crate::support::{collector::*, *};

/// How long the agent profiles, and how often it drains (a window each).
const DURATION: &str = "6s";
const DRAIN: &str = "1s";
const FREQUENCY: &str = "499";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("workloads/otlp")
        .join(name)
}

/// Runs `python3 SCRIPT ARGS` and parses the JSON it prints; panics with
/// its stderr when it fails (a rule broken, a request refused).
fn python_json(script_name: &str, args: &[String]) -> Value {
    let out = Command::new("python3")
        .arg(script(script_name))
        .args(args)
        .output()
        .expect("python3 (with opentelemetry-proto, from `cargo xtask setup`) must be on PATH");
    assert!(
        out.status.success(),
        "{script_name} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script_name} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A JSON object of stacks and values as a sorted map.
fn stacks_of_json(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object of stacks: {v}"))
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
        .collect()
}

/// The collector's folded stacks of type `sample_type` for `selector`
/// (unescaped, e.g. `{node="n"}`), as a sorted map.
fn collector_stacks(http: SocketAddr, selector: &str, sample_type: &str) -> BTreeMap<String, u64> {
    let escaped: String = selector
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    folded(http, &format!("{escaped}&type={sample_type}"))
        .iter()
        .map(|(s, n)| (s.to_string(), n))
        .collect()
}

/// The heaviest stacks starting with `prefix`, one a line, for assertion
/// messages.
fn heaviest_of(stacks: &BTreeMap<String, u64>, prefix: &str) -> String {
    let mut of: Vec<(&String, &u64)> = stacks
        .iter()
        .filter(|(s, _)| s.starts_with(prefix))
        .collect();
    of.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
    of.iter()
        .take(12)
        .map(|(s, n)| format!("  {n:>8} {s}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The lines of two stack maps that differ, for assertion messages.
fn difference(left: &BTreeMap<String, u64>, right: &BTreeMap<String, u64>) -> String {
    let mut lines = Vec::new();
    for (stack, n) in left {
        if right.get(stack) != Some(n) {
            lines.push(format!("  {n:>10} vs {:?}  {stack}", right.get(stack)));
        }
    }
    for (stack, n) in right {
        if !left.contains_key(stack) {
            lines.push(format!("  {:>10} vs {n:?}  {stack}", "-"));
        }
    }
    lines.truncate(30);
    lines.join("\n")
}

/// A `ProfilesService` that keeps each request it is sent, re-encoded, in
/// its own file, and accepts it whole.
struct Capture {
    dir: PathBuf,
    received: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl ProfilesService for Capture {
    async fn export(
        &self,
        request: tonic::Request<ExportProfilesServiceRequest>,
    ) -> Result<tonic::Response<ExportProfilesServiceResponse>, tonic::Status> {
        let bytes = request.into_inner().encode_to_vec();
        let n = self.received.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.join(format!("request-{n:04}.pb"));
        std::fs::write(&path, bytes)
            .map_err(|e| tonic::Status::internal(format!("{}: {e}", path.display())))?;
        Ok(tonic::Response::new(
            ExportProfilesServiceResponse::default(),
        ))
    }
}

/// Serves [`Capture`] on a loopback port of `rt` (gzip accepted, as the
/// agent sends it) until the runtime is dropped; returns its address and
/// its count of requests.
fn start_capture(rt: &tokio::runtime::Runtime, dir: &Path) -> (SocketAddr, Arc<AtomicUsize>) {
    let received = Arc::new(AtomicUsize::new(0));
    let service = ProfilesServiceServer::new(Capture {
        dir: dir.to_path_buf(),
        received: received.clone(),
    })
    .accept_compressed(CompressionEncoding::Gzip)
    .max_decoding_message_size(64 << 20);
    let listener = profiler_testkit::net::listener();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let incoming = {
        let _entered = rt.enter();
        tonic::transport::server::TcpIncoming::from(
            tokio::net::TcpListener::from_std(listener).unwrap(),
        )
    };
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    (addr, received)
}

/// The agent binary in `run` mode, killed if still running when dropped.
struct Agent {
    child: Child,
    log: PathBuf,
    stdout: PathBuf,
    /// Where it serves `/metrics`.
    metrics: SocketAddr,
}

/// What an agent run left.
struct AgentRun {
    /// Its exit summary.
    stdout: String,
    /// The last `/metrics` text scraped while it ran.
    metrics: String,
}

impl Agent {
    /// `profiler-agent run` with `args` (its files in `dir`), serving its
    /// metrics on a loopback port.
    fn start(dir: &Path, args: &[String]) -> Self {
        let log = dir.join("agent.log");
        let stdout = dir.join("agent.out");
        let reserved = Reserved::new();
        let metrics = reserved.addr();
        reserved.release();
        let child = Command::new(agent_binary())
            .arg("run")
            .args(args)
            .args(["--no-kube", "--no-progress", "-F", FREQUENCY])
            .args(["--drain-interval", DRAIN, "-d", DURATION])
            .args(["--metrics-listen", &metrics.to_string()])
            .env("RUST_LOG", "warn,profiler_agent=info")
            .env("NO_COLOR", "1")
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the agent");
        Agent {
            child,
            log,
            stdout,
            metrics,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for its exit (scraping its metrics meanwhile); panics if it
    /// fails or outlives its duration by far.
    fn finish(mut self) -> AgentRun {
        let url = format!("http://{}/metrics", self.metrics);
        let mut last = String::new();
        let status = wait_for(Duration::from_secs(60), "the agent exits", || {
            if let Some(text) = scrape(&url) {
                last = text;
            }
            self.child.try_wait().unwrap()
        });
        let stdout = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        assert!(status.success(), "agent failed: {status}\n{}", self.log());
        AgentRun {
            stdout,
            metrics: last,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workloads of the agent test: a frame-pointer C call chain
/// (`main;outer;inner_hot`), a syscall loop (kernel frames) and Rust at
/// `opt-level=1` (inlined frames).
fn start_workloads() -> Vec<(&'static str, Workload)> {
    ["chain", "syscalls", "rustwork"]
        .into_iter()
        .map(|name| {
            let w = Workload::spawn(&workload(name), &["60"]);
            wait_for_exec(w.pid(), name);
            (name, w)
        })
        .collect()
}

fn pid_args(workloads: &[(&str, Workload)]) -> Vec<String> {
    workloads
        .iter()
        .flat_map(|(_, w)| ["-p".to_string(), w.pid().to_string()])
        .collect()
}

/// The agent sends both ways at once: its native batches to the collector
/// and OTLP requests to a capturing `ProfilesService`. Decoded by
/// OpenTelemetry's Python bindings, the requests follow the zero-value and
/// index rules and fold back (process root, `_[k]`, `_[i]`) to exactly the
/// stacks and values the collector stores from the native batches, for
/// `cpu` and `off_cpu`; the resources carry the semantic-convention
/// attributes of each profiled process.
#[test]
fn agent_otlp_output_decoded_by_the_official_package_matches_the_collector_path() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let captured = dir.path().join("captured");
    std::fs::create_dir(&captured).unwrap();
    let rt = runtime();
    let collector = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    let (capture, received) = start_capture(&rt, &captured);
    let workloads = start_workloads();
    let node = format!("otlp-both-{}", std::process::id());
    let mut args = vec![
        "--collector".to_string(),
        format!("http://{}", collector.grpc_addr),
        "--otlp-endpoint".to_string(),
        format!("http://{capture}"),
        "--plaintext".to_string(),
        "--node".to_string(),
        node.clone(),
        // The debug build names rustwork's frames (its DWARF) slowly: past
        // the default budget the first windows keep `chain+0x…` frames.
        "--symbolize-budget".to_string(),
        "30s".to_string(),
    ];
    args.extend(pid_args(&workloads));
    let pids: Vec<(&str, u32)> = workloads.iter().map(|(n, w)| (*n, w.pid())).collect();
    let run = Agent::start(dir.path(), &args).finish();
    drop(workloads);

    let mut files: Vec<PathBuf> = std::fs::read_dir(&captured)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), received.load(Ordering::SeqCst));
    assert!(
        files.len() >= 4,
        "only {} OTLP requests captured\n{}",
        files.len(),
        run.stdout
    );
    let decoded = python_json(
        "otlp_decode.py",
        &files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>(),
    );

    // Every request was acknowledged both ways, so both hold every window.
    let stored = batches_stored(collector.http_addr).unwrap();
    assert_eq!(
        stored,
        files.len() as u64,
        "native batches stored vs OTLP requests sent\n{}",
        run.stdout
    );

    let selector = format!("{{node=\"{node}\"}}");
    let mut compared = Vec::new();
    for (otlp_type, sample_type) in [("cpu/samples", "cpu"), ("off_cpu/nanoseconds", "off_cpu")] {
        // A type without samples in any window has no profile.
        let profiles = &decoded["profiles"][otlp_type];
        let from_otlp = match &profiles["stacks"] {
            Value::Null => BTreeMap::new(),
            stacks => stacks_of_json(stacks),
        };
        let from_native = collector_stacks(collector.http_addr, &selector, sample_type);
        assert!(
            from_otlp == from_native,
            "{sample_type}: decoded OTLP vs the collector's native batches differ (left: OTLP, right: native):\n{}",
            difference(&from_otlp, &from_native)
        );
        let total: u64 = from_otlp.values().sum();
        assert_eq!(profiles["total"].as_u64().unwrap_or(0), total);
        compared.push((
            sample_type,
            from_otlp.len(),
            total,
            profiles["profiles"].clone(),
        ));
    }
    let cpu = stacks_of_json(&decoded["profiles"]["cpu/samples"]["stacks"]);
    let share = |process: &str, chain: &[&str]| {
        let of_process: Vec<(&String, &u64)> = cpu
            .iter()
            .filter(|(s, _)| s.starts_with(&format!("{process};")))
            .collect();
        let total: u64 = of_process.iter().map(|(_, n)| **n).sum();
        let matching: u64 = of_process
            .iter()
            .filter(|(s, _)| {
                chain.is_empty() || has_chain(&s.split(';').collect::<Vec<_>>(), chain)
            })
            .map(|(_, n)| **n)
            .sum();
        (matching, total)
    };
    let (chain, chain_total) = share("chain", &["main", "outer", "inner_hot"]);
    assert!(
        chain_total >= 300 && chain * 100 >= chain_total * 90,
        "chain: main;outer;inner_hot in {chain} of {chain_total} decoded samples\n{}",
        heaviest_of(&cpu, "chain;")
    );
    let kernel: u64 = cpu
        .iter()
        .filter(|(s, _)| s.starts_with("syscalls;") && s.ends_with("_[k]"))
        .map(|(_, n)| n)
        .sum();
    let (_, syscalls_total) = share("syscalls", &[]);
    assert!(
        syscalls_total >= 100 && kernel * 100 >= syscalls_total * 50,
        "kernel leaves (`_[k]`) in {kernel} of {syscalls_total} decoded samples of syscalls"
    );
    let inlined: u64 = cpu
        .iter()
        .filter(|(s, _)| s.contains("_[i]"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        inlined > 0,
        "no inlined lines (`_[i]`) decoded\n{}",
        heaviest_of(&cpu, "rustwork;")
    );

    // The resources: one per process, with the semantic conventions.
    let resources = decoded["resources"].as_array().unwrap();
    for (name, pid) in &pids {
        let resource = resources
            .iter()
            .find(|r| r["process.executable.name"] == *name)
            .unwrap_or_else(|| panic!("no resource of {name}: {resources:?}"));
        assert_eq!(resource["host.name"], node.as_str(), "{resource}");
        assert_eq!(
            resource["process.pid"].as_u64(),
            Some(u64::from(*pid)),
            "process.pid, an integer: {resource}"
        );
        assert!(resource.get("service.name").is_some(), "{resource}");
    }

    let m = |name: &str| metric(&run.metrics, name);
    let bytes: Vec<u64> = decoded["bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    let otlp_bytes: u64 = bytes.iter().sum();
    eprintln!(
        "OTLP: {} requests, {otlp_bytes} bytes ({} a request, largest {}); per type (stacks, total, profiles): {compared:?}; \
         inlined samples {inlined}; native (last scrape): {} batches, {} bytes ({} a batch, largest {}); \
         otlp_export_bytes_total {} for {} batches; {:.1} s",
        bytes.len(),
        otlp_bytes / bytes.len() as u64,
        bytes.iter().max().unwrap(),
        m("profiler_agent_export_batches_total"),
        m("profiler_agent_export_bytes_total"),
        m("profiler_agent_export_bytes_total") / m("profiler_agent_export_batches_total").max(1),
        m("profiler_agent_export_largest_batch_bytes"),
        m("profiler_agent_otlp_export_bytes_total"),
        m("profiler_agent_otlp_export_batches_total"),
        started.elapsed().as_secs_f64()
    );
    drop(collector);
}

/// A request built by OpenTelemetry's Python bindings (a resource with
/// host, service, executable and pid; a `cpu` profile with kernel frames, an
/// inlined line and one stack on two threads; an `off_cpu` profile), POSTed
/// to the collector's OTLP/HTTP receiver, is served back exactly: each
/// type's folded stacks and values, under the labels the resource
/// attributes become (the integer pid as text).
#[test]
fn otlp_request_built_by_the_official_package_is_served_back_exactly() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let collector = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    let node = format!("otlp-build-{}", std::process::id());
    let built = python_json(
        "otlp_build.py",
        &[collector.http_addr.to_string(), node.clone()],
    );
    assert_eq!(built["node"], node.as_str());
    let selector = format!(
        "{{node=\"{node}\",process=\"{}\",pid=\"{}\",service=\"otlp-build\"}}",
        built["process"].as_str().unwrap(),
        built["pid"]
    );
    let types = built["types"].as_object().unwrap();
    assert_eq!(types.len(), 2, "{built}");
    for (sample_type, expected) in types {
        let expected = stacks_of_json(expected);
        let served = collector_stacks(collector.http_addr, &selector, sample_type);
        assert!(
            served == expected,
            "{sample_type}: served vs built differ (left: served, right: built):\n{}",
            difference(&served, &expected)
        );
    }
    // Samples of one stack on two threads are one stack served, and each
    // thread's share is its own.
    for (thread, totals) in built["threads"].as_object().unwrap() {
        let selector = format!("{{node=\"{node}\",thread=\"{thread}\"}}");
        for (sample_type, total) in totals.as_object().unwrap() {
            let served: u64 = collector_stacks(collector.http_addr, &selector, sample_type)
                .values()
                .sum();
            assert_eq!(
                Some(served),
                total.as_u64(),
                "{sample_type} of thread {thread}"
            );
        }
    }
    eprintln!(
        "built request: {} bytes; {:.1} s",
        built["bytes"],
        started.elapsed().as_secs_f64()
    );
    drop(collector);
}

/// The agent with only `--otlp-endpoint`, pointed at the collector's OTLP
/// receiver on its gRPC port: the collector stores the workload's `cpu`
/// profile, its call chain under the process, exactly the stacks the agent
/// recorded itself (`--folded`).
#[test]
fn agent_with_only_an_otlp_endpoint_is_stored_by_the_collector() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    // The collector wants an agent token: the OTLP sink sends it as a
    // header (--otlp-header).
    std::fs::write(dir.path().join("tokens"), "otlp-token\n").unwrap();
    let mut config = collector_config(&dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    config.token_file = Some(dir.path().join("tokens"));
    let collector = rt
        .block_on(profiler_collector::server::start(config))
        .expect("collector starts");
    let w = Workload::spawn(&workload("chain"), &["60"]);
    wait_for_exec(w.pid(), "chain");
    let pid = w.pid();
    let node = format!("otlp-only-{}", std::process::id());
    let local = dir.path().join("agent.folded");
    let args = vec![
        "--otlp-endpoint".to_string(),
        format!("http://{}", collector.grpc_addr),
        "--otlp-header".to_string(),
        "authorization=Bearer otlp-token".to_string(),
        "--plaintext".to_string(),
        "--node".to_string(),
        node.clone(),
        "--folded".to_string(),
        local.display().to_string(),
        "-p".to_string(),
        w.pid().to_string(),
    ];
    let run = Agent::start(dir.path(), &args).finish();
    drop(w);
    assert!(
        run.stdout.contains("OTLP endpoint:") && !run.stdout.contains("Collector:"),
        "{}",
        run.stdout
    );

    let stored = collector_stacks(
        collector.http_addr,
        // The resource's integer `process.pid` is the `pid` label.
        &format!("{{node=\"{node}\",process=\"chain\",pid=\"{}\"}}", pid),
        "cpu",
    );
    let total: u64 = stored.values().sum();
    let chain: u64 = stored
        .iter()
        .filter(|(s, _)| {
            has_chain(
                &s.split(';').collect::<Vec<_>>(),
                &["main", "outer", "inner_hot"],
            )
        })
        .map(|(_, n)| n)
        .sum();
    assert!(
        total >= 500 && chain * 100 >= total * 90,
        "chain: main;outer;inner_hot in {chain} of {total} stored samples"
    );
    let (recorded, bad) =
        profiler_agent::fold::parse_folded(&std::fs::read_to_string(&local).unwrap());
    assert_eq!(bad, 0);
    let recorded: BTreeMap<String, u64> = recorded
        .iter()
        .filter(|(s, _)| s.starts_with("chain;"))
        .map(|(s, n)| (s.to_string(), n))
        .collect();
    assert!(
        stored == recorded,
        "stored via OTLP vs recorded by the agent differ (left: stored, right: recorded):\n{}",
        difference(&stored, &recorded)
    );
    let m = |name: &str| metric(&run.metrics, name);
    eprintln!(
        "OTLP only: {} stacks, {total} samples; {} OTLP batches sent (last scrape), {} bytes; {:.1} s",
        stored.len(),
        m("profiler_agent_otlp_export_batches_total"),
        m("profiler_agent_otlp_export_bytes_total"),
        started.elapsed().as_secs_f64()
    );
    drop(collector);
}
