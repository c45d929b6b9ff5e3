//! Developer entry points: `cargo xtask setup | build | run | test | fuzz | bench`.
//!
//! - `setup` installs what a fresh machine lacks, in two tiers: what building
//!   and running need (LLVM 22, rust-src, bpf-linker, gcc), which `build` and
//!   `run` install, and what testing and benchmarking add (Go, Chromium,
//!   ClickHouse, chdb-core, kubernetes-validate, cargo-fuzz), which `setup`,
//!   `test`, `fuzz` and `bench` install; idempotent and fast when everything
//!   is there.
//! - `run` starts the collector and the agent: live flame graphs in the browser,
//!   and a flame graph of the whole run under `target/profiles/` at the end.
//! - `test` is what CI runs: set-up, fmt, clippy, unit tests, a short
//!   fuzzing run, privileged tests and a smoke run of the benchmarks.
//! - `fuzz` runs the fuzz targets of `fuzz/` for longer (cargo-fuzz, libFuzzer).
//! - `bench` measures what the profiler costs (overhead against perf, kernel
//!   cost per sample, agent footprint and start-up) and runs the
//!   micro-benchmarks and the collector and symbolization benchmarks, for the
//!   targets of issue 6 (see `bench/mod.rs`).
mod bench;
#[cfg(test)]
mod modules;

use std::{
    ffi::OsString,
    io::IsTerminal,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The embedded ClickHouse (engine 26.9) behind testkit/chdb_shim.py.
const CHDB_CORE_VERSION: &str = "26.9.0";
/// OpenTelemetry's Python protobuf bindings (OTLP profiles
/// `v1development`), which the OTLP tests decode and build requests with.
const OTEL_PROTO_VERSION: &str = "1.45.2";

#[derive(Parser)]
#[command(about = "Developer tasks for the profiler")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks to build, run, test and benchmark the
    /// profiler.
    Setup,
    /// Build the agent (release) with its eBPF program.
    Build,
    /// Start the collector and the agent: live flame graphs in the browser, and a
    /// flame graph file at the end (needs root; runs the agent with sudo -E).
    Run {
        /// Stop after this long (e.g. 10s); default: until Ctrl-C.
        #[arg(short = 'd', long)]
        duration: Option<String>,
        /// Arguments for `profiler-agent run`, after `--` (e.g. -- -p 1234 -F 999).
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
    /// Set-up, fmt check, clippy, unit tests, privileged end-to-end tests and
    /// a smoke run of the benchmarks.
    Test,
    /// Build the fuzz targets (fuzz/) and run each, or one, for a while.
    Fuzz {
        /// How long to run each target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// One target (default: all of them).
        target: Option<String>,
    },
    /// Every benchmark of issue 6; the report goes to docs/benchmarks.md
    /// (needs root; about 20 minutes from a fresh clone).
    Bench {
        /// A short run of every case (about 3-4 minutes); report in
        /// target/bench/report.md.
        #[arg(long)]
        quick: bool,
        /// One benchmark only: overhead, kernel-cost, off-cpu, footprint, startup,
        /// criterion, collector or symbolize (report in target/bench/report.md).
        #[arg(long, value_name = "NAME")]
        only: Option<String>,
        /// Run the debug binaries instead of release ones, as the smoke run of
        /// `cargo xtask test` does: the figures mean nothing.
        #[arg(long)]
        debug_build: bool,
        /// Another agent binary (e.g. a release build of an earlier commit)
        /// whose kernel cost per sample is measured side by side with this
        /// one's, in the same rounds.
        #[arg(long, value_name = "PATH")]
        baseline_agent: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    STARTED.get_or_init(Instant::now);
    let cli = Cli::parse();
    std::env::set_current_dir(workspace_root())?;
    forget_cargo_run_env();
    match cli.command {
        Task::Setup => setup(Needs::Test),
        Task::Build => {
            setup(Needs::Run)?;
            cargo(&["build", "--release", "-p", "profiler-agent"])
        }
        Task::Run {
            duration,
            agent_args,
        } => run(duration, agent_args),
        Task::Test => test(),
        Task::Fuzz { seconds, target } => {
            setup(Needs::Test)?;
            fuzz(seconds, target.as_deref())
        }
        Task::Bench {
            quick,
            only,
            debug_build,
            baseline_agent,
        } => bench::bench(bench::Options {
            quick,
            only,
            debug_build,
            baseline_agent,
        }),
    }
}

/// The pinned toolchain: the `channel` of rust-toolchain.toml, the one place
/// that states it.
fn toolchain() -> Result<String> {
    let path = workspace_root().join("rust-toolchain.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    toolchain_channel(&text)
        .with_context(|| format!("{} has no `channel = \"...\"` line", path.display()))
}

/// The value of the `channel = "..."` line of a rust-toolchain.toml.
fn toolchain_channel(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "channel").then(|| value.trim().trim_matches('"').to_string())
    })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else `target/` of the
/// workspace.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Removes the variables `cargo xtask` (`cargo run`) sets for this package
/// (`CARGO_MANIFEST_*`, `CARGO_PKG_*`) from this process, so the cargo
/// commands it runs see the environment of a cargo run by hand: build
/// scripts that read them (ring's) would otherwise rebuild, with everything
/// above them, at each switch between the two.
fn forget_cargo_run_env() {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_MANIFEST_") || key.starts_with("CARGO_PKG_") {
            std::env::remove_var(key);
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// When this xtask started: each step says how far in it begins and how
/// long the one before took, so a CI log shows where the time goes.
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// The steps so far: what, and when each began (seconds after [`STARTED`]).
static STEPS: std::sync::Mutex<Vec<(String, f64)>> = std::sync::Mutex::new(Vec::new());

fn step(what: &str) {
    let at = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    let mut steps = STEPS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((previous, began)) = steps.last() {
        eprintln!("<== {:.0} s: {previous}", at - began);
    }
    eprintln!("==> [{at:>4.0} s] {what}");
    steps.push((what.to_string(), at));
}

/// Every step so far with its duration (the last one up to now), longest
/// first.
fn step_times() -> String {
    let now = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    let steps = STEPS.lock().unwrap_or_else(|e| e.into_inner());
    let mut times: Vec<(f64, &str)> = steps
        .iter()
        .enumerate()
        .map(|(i, (what, began))| {
            let end = steps.get(i + 1).map_or(now, |(_, next)| *next);
            (end - began, what.as_str())
        })
        .collect();
    times.sort_by(|a, b| b.0.total_cmp(&a.0));
    times
        .iter()
        .map(|(secs, what)| format!("{secs:>6.0} s  {what}\n"))
        .collect()
}

fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !st.success() {
        bail!("{shown} failed with {st}");
    }
    Ok(())
}

/// The cargo that runs this xtask (`CARGO`), else `cargo` from PATH.
fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn cargo(args: &[&str]) -> Result<()> {
    status(Command::new(cargo_bin()).args(args))
}

/// Builds with `RUSTC_BOOTSTRAP=1` (the eBPF crate's clippy, cargo-fuzz) use
/// this target directory of their own: the build scripts of proc-macro2,
/// anyhow and thiserror rerun when `RUSTC_BOOTSTRAP` changes, and in a
/// shared directory every crate above them would be rebuilt at each switch
/// (about a minute on 2 cores).
fn bootstrap_target_dir() -> PathBuf {
    target_dir().join("rustc-bootstrap")
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command as root: directly, or through `sudo -E`.
fn as_root(program: &str, args: &[&str]) -> Command {
    if is_root() {
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg("-E").arg(program).args(args);
        cmd
    }
}

fn apt_install(packages: &[&str]) -> Result<()> {
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "missing {}: install them with your package manager (this set-up knows apt only)",
            packages.join(", ")
        );
    }
    step(&format!("installing {} with apt-get", packages.join(" ")));
    // The package lists of a fresh machine may be empty or stale.
    status(&mut as_root("apt-get", &["update", "-q"]))
        .context("apt-get update failed: are Debian's package mirrors reachable?")?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    status(as_root("apt-get", &args).env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("apt-get install {} failed", packages.join(" ")))
}

/// What a task needs installed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// Building and running the agent and the collector: LLVM 22, rust-src,
    /// bpf-linker and gcc (the C parts of the dependencies, the linker).
    Run,
    /// Testing and benchmarking add the workloads' Go, Chromium for the UI
    /// test, ClickHouse and chdb-core for the store tests,
    /// kubernetes-validate for the manifests test and cargo-fuzz.
    Test,
}

fn setup(needs: Needs) -> Result<()> {
    let started = Instant::now();
    let test = needs == Needs::Test;
    let toolchain = toolchain()?;
    let mut packages = Vec::new();
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        packages.push("llvm-22-dev");
    }
    let mut tools = vec![("gcc", "gcc")];
    if test {
        tools.extend([
            ("go", "golang-go"),
            ("unshare", "util-linux"),
            ("chromium", "chromium"),
            // The unwinding tests: C++ workloads, perf's DWARF call graphs as
            // the reference, readelf's CFI dump for the table builder.
            ("g++", "g++"),
            ("perf", "linux-perf"),
            ("readelf", "binutils"),
            // The JIT-frame tests: runtimes that write perf maps (CPython
            // comes from pyenv on these machines).
            ("node", "nodejs"),
            ("java", "openjdk-17-jdk-headless"),
            ("jcmd", "openjdk-17-jdk-headless"),
        ]);
    }
    for (tool, package) in tools {
        if !succeeds("sh", &["-c", &format!("command -v {tool}")]) && !packages.contains(&package) {
            packages.push(package);
        }
    }
    // glibc's symbol tables (Debian ships them apart): without them
    // `clone3`, `__restore_rt` and other libc frames have no names, for perf
    // and for the agent alike.
    if test && !succeeds("dpkg", &["-s", "libc6-dbg"]) {
        packages.push("libc6-dbg");
    }
    if !is_root() && !succeeds("sh", &["-c", "command -v sudo"]) {
        bail!("not root and no sudo: run `cargo xtask setup` as root");
    }
    // ClickHouse for the store tests, which run private servers on free
    // ports (testkit's clickhouse module). /usr/sbin may not be on PATH.
    let install_clickhouse = test
        && !succeeds(
            "sh",
            &[
                "-c",
                "command -v clickhouse-server || test -x /usr/sbin/clickhouse-server",
            ],
        );
    if install_clickhouse {
        packages.extend(["clickhouse-server", "clickhouse-client"]);
    }
    if !packages.is_empty() {
        apt_install(&packages)?;
    }
    if install_clickhouse {
        stop_system_clickhouse()?;
    }

    // rust-src: -Z build-std=core compiles `core` for the BPF target.
    let sysroot = output(
        "rustup",
        &["run", &toolchain, "rustc", "--print", "sysroot"],
    )
    .with_context(|| {
        format!(
            "the pinned toolchain {toolchain} is missing: `rustup toolchain install {toolchain}`"
        )
    })?;
    let core_src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if !core_src.exists() {
        step("adding rust-src to the pinned toolchain");
        // A linked toolchain (1.95.0 -> stable) takes components through its target.
        let target = std::fs::canonicalize(sysroot.trim())
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| toolchain.clone());
        let toolchain = target
            .trim_end_matches("-x86_64-unknown-linux-gnu")
            .to_string();
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &toolchain,
        ]))
        .context("rustup could not add rust-src")?;
    }

    let linker_ok =
        output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        step(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22), about 90 s"
        ));
        status(
            Command::new("cargo")
                .args([
                    "install",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )
        .context("installing bpf-linker failed")?;
    }
    if !test {
        eprintln!(
            "set-up for building and running complete in {:.1} s (LLVM 22, rust-src, bpf-linker {BPF_LINKER_VERSION}, gcc)",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }

    // The offline Kubernetes schema validator for the deploy/ manifests test.
    if !succeeds("kubernetes-validate", &["--version"]) {
        step("installing kubernetes-validate (PyPI) for the manifest tests");
        pip_install(&["kubernetes-validate"])?;
    }
    // A current ClickHouse engine for the store tests (testkit/chdb_shim.py
    // imports `chdb`). Without its dependencies (pandas, pyarrow): the shim
    // needs only the engine.
    if !succeeds("python3", &["-c", "import chdb"]) {
        step(&format!(
            "installing chdb-core {CHDB_CORE_VERSION} (PyPI, ClickHouse 26.9 embedded) for the \
             store tests on a current ClickHouse: a 182 MB download, 533 MB installed, 5 s on a fast link"
        ));
        pip_install(&["--no-deps", &format!("chdb-core=={CHDB_CORE_VERSION}")])?;
    }
    // OpenTelemetry's own OTLP bindings (with protobuf), for the OTLP tests
    // (tests/workloads/otlp/): they decode what the agent sends and build
    // what the collector receives independently of our Rust code.
    if !succeeds(
        "python3",
        &[
            "-c",
            "import opentelemetry.proto.profiles.v1development.profiles_pb2",
        ],
    ) {
        step(&format!(
            "installing opentelemetry-proto {OTEL_PROTO_VERSION} (PyPI, with protobuf) for the OTLP tests"
        ));
        pip_install(&[&format!("opentelemetry-proto=={OTEL_PROTO_VERSION}")])?;
    }
    let fuzz_ok =
        output("cargo", &["fuzz", "--version"]).is_some_and(|v| v.contains(CARGO_FUZZ_VERSION));
    if !fuzz_ok {
        step(&format!(
            "installing cargo-fuzz {CARGO_FUZZ_VERSION}, about 30 s"
        ));
        status(Command::new("cargo").args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ]))
        .context("installing cargo-fuzz failed")?;
    }
    eprintln!(
        "set-up complete in {:.1} s (LLVM 22, rust-src, bpf-linker {BPF_LINKER_VERSION}, gcc, g++, perf, binutils, libc6-dbg, go, node, a JDK, chromium, clickhouse-server, chdb-core, opentelemetry-proto, kubernetes-validate, cargo-fuzz)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `python3 -m pip install` of `args` (packages and options).
fn pip_install(args: &[&str]) -> Result<()> {
    status(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(args),
    )
    .with_context(|| format!("pip could not install {}", args.join(" ")))
}

/// The user Debian's clickhouse-server service runs as.
const CLICKHOUSE_USER: &str = "clickhouse";

/// Stops and disables the system ClickHouse that the package's postinst may
/// have started (with systemd, or through its init script where no
/// policy-rc.d forbids it): the tests need none, and it would hold ports 8123,
/// 9000 and 9009. The tests' own servers run as the invoking user, never as
/// `clickhouse`, so they are left alone.
fn stop_system_clickhouse() -> Result<()> {
    if Path::new("/run/systemd/system").exists() {
        step("stopping and disabling the clickhouse-server service (the tests run their own)");
        status(&mut as_root(
            "systemctl",
            &["disable", "--now", "clickhouse-server.service"],
        ))
        .context("systemctl could not stop clickhouse-server")?;
    } else if !system_clickhouse_pids().is_empty() {
        step("stopping the clickhouse-server service (the tests run their own)");
        // The init script directly: invoke-rc.d would ask policy-rc.d.
        status(&mut as_root("/etc/init.d/clickhouse-server", &["stop"]))
            .context("/etc/init.d/clickhouse-server stop failed")?;
    }
    if Path::new("/etc/init.d/clickhouse-server").exists() {
        // Not started at boot either (sysvinit); harmless elsewhere.
        status(&mut as_root(
            "update-rc.d",
            &["clickhouse-server", "disable"],
        ))
        .context("update-rc.d clickhouse-server disable failed")?;
    }
    let left = system_clickhouse_pids();
    if !left.is_empty() {
        bail!("the clickhouse-server service still runs after stopping it (pids {left:?})");
    }
    Ok(())
}

/// Processes of clickhouse-server running as the service's user.
fn system_clickhouse_pids() -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Some(uid) = output("id", &["-u", CLICKHOUSE_USER]).and_then(|u| u.trim().parse().ok())
    else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            // comm is cut to 15 bytes: "clickhouse-serv".
            let ours =
                comm.trim_end().starts_with("clickhouse-serv") && e.metadata().ok()?.uid() == uid;
            ours.then_some(pid)
        })
        .collect()
}

const UI_ADDR: &str = "127.0.0.1:7080";
const GRPC_ADDR: &str = "127.0.0.1:7070";

/// Waits until something accepts connections on `addr`.
fn wait_for_port(addr: &str, child: &mut std::process::Child) -> Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the collector exited ({status}) before serving: is {addr} already in use?");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!("the collector did not start serving on {addr} within 10 s")
}

fn run(duration: Option<String>, agent_args: Vec<String>) -> Result<()> {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };

    setup(Needs::Run)?;
    step("building the agent and the collector (release)");
    cargo(&[
        "build",
        "--release",
        "-p",
        "profiler-agent",
        "-p",
        "profiler-collector",
    ])?;
    let root = workspace_root();
    let dir = root.join("target/profiles");
    std::fs::create_dir_all(&dir)?;

    // Ctrl-C stops the agent (which writes its outputs); xtask only notes
    // it, then stops the collector, which runs in its own process group.
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;

    step(&format!(
        "starting the collector (store: {})",
        dir.join("profiles.db").display()
    ));
    let mut collector = Command::new(target_dir().join("release/profiler-collector"))
        .arg("--store")
        .arg(format!("sqlite:{}", dir.join("profiles.db").display()))
        .args(["--grpc-listen", GRPC_ADDR, "--http-listen", UI_ADDR])
        // Loopback only, for one machine: no certificates needed.
        .arg("--plaintext")
        .process_group(0)
        .spawn()
        .context("cannot start the collector")?;
    if let Err(e) = wait_for_port(UI_ADDR, &mut collector) {
        let _ = collector.kill();
        return Err(e);
    }
    eprintln!("\n    Live flame graphs: http://{UI_ADDR}/  (new data every 5 s)\n");

    let mut args: Vec<OsString> = vec![
        "run".into(),
        "--collector".into(),
        format!("http://{GRPC_ADDR}").into(),
        "--plaintext".into(),
    ];
    if let Some(d) = duration {
        args.extend(["--duration".into(), d.into()]);
    }
    let has = |flags: &[&str]| {
        agent_args.iter().any(|a| {
            flags
                .iter()
                .any(|f| a == f || a.starts_with(&format!("{f}=")))
        })
    };
    if !has(&["-o", "--output"]) {
        args.extend(["-o".into(), dir.join("flamegraph.svg").into()]);
    }
    if !has(&["--folded"]) {
        args.extend(["--folded".into(), dir.join("stacks.folded").into()]);
    }
    if !has(&["-F", "--frequency"]) {
        args.extend(["-F".into(), "99".into()]);
    }
    if !has(&["--drain-interval"]) {
        args.extend(["--drain-interval".into(), "5s".into()]);
    }
    args.extend(agent_args.into_iter().map(OsString::from));

    let agent = target_dir().join("release/profiler-agent");
    let mut cmd = if is_root() {
        Command::new(&agent)
    } else {
        eprintln!("profiling needs root: running the agent with sudo -E");
        let mut cmd = Command::new("sudo");
        cmd.arg("-E").arg(&agent);
        cmd
    };
    cmd.args(&args);
    step("profiling this host (Ctrl-C to stop)");
    let agent_status = cmd.status().context("cannot start the agent");

    if std::io::stdin().is_terminal() && !interrupted.load(Ordering::Relaxed) {
        eprintln!("\nThe collector keeps serving http://{UI_ADDR}/ — Ctrl-C to stop it.");
        while !interrupted.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(collector.id() as i32, libc::SIGINT) };
    let _ = collector.wait();
    let status = agent_status?;
    if !status.success() {
        bail!("the agent failed ({status})");
    }
    Ok(())
}

/// What CI runs; ends with the time each step took, passed or not.
fn test() -> Result<()> {
    let started = Instant::now();
    let result = checks();
    eprint!("time per step, longest first:\n{}", step_times());
    result?;
    eprintln!(
        "all checks passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn checks() -> Result<()> {
    setup(Needs::Test)?;
    step("cargo fmt --check");
    cargo(&["fmt", "--all", "--", "--check"])?;
    clippy()?;
    // Every build of the run selects the same packages (the workspace but
    // the eBPF crate), so cargo resolves features once and reuses what it
    // built: another selection (`-p profiler-agent`, or the default members)
    // unifies features differently and rebuilds the dependencies whose
    // features change (tokio, syn, ... about a minute on 2 cores).
    let (unit, privileged) = test_targets()?;
    step("unit tests (no root needed)");
    let mut args = vec!["test", "--workspace", "--exclude", "profiler-ebpf"];
    args.extend(["--lib", "--bins", "--examples", "--benches"]);
    for name in &unit {
        args.extend(["--test", name.as_str()]);
    }
    cargo(&args)?;
    fuzz(CI_FUZZ_SECONDS, None)?;
    // The storm test measures the agent as deployed (its memory ceiling
    // holds for the release build; the debug build's text alone is several
    // times larger).
    step("building the agent (release) for the tests that measure it");
    cargo(&["build", "--release", "-p", "profiler-agent"])?;
    privileged_tests(&privileged)?;
    // Every benchmark, briefly, on the debug build: breaks show in CI, the
    // figures (target/bench/report.md) mean nothing.
    step("smoke run of the benchmarks (debug build; report in target/bench/report.md)");
    if is_root() {
        bench::smoke()?;
    } else {
        status(&mut as_root(
            &cargo_bin(),
            &["xtask", "bench", "--quick", "--debug-build"],
        ))?;
    }
    Ok(())
}

/// Modules of the privileged tests that only talk to stores (no eBPF, no
/// CPU share measured), each test with its own servers on free ports and
/// temp dirs: they run two at a time. The other tests run one at a time,
/// as several measure CPU shares or run perf on two CPUs.
const STORE_TEST_MODULES: [&str; 3] = ["clickhouse::", "clickhouse_harness::", "sample_types::"];

/// The privileged tests (`targets`: the privileged crate's test targets):
/// the store modules two at a time, then every other test one at a time.
/// The agent's and collector's binaries the tests run were built with the
/// unit tests (same selection).
fn privileged_tests(targets: &[String]) -> Result<()> {
    let mut args = vec!["test", "--workspace", "--exclude", "profiler-ebpf"];
    for name in targets {
        args.extend(["--test", name.as_str()]);
    }
    args.push("--");
    let mut stores = args.clone();
    stores.push("--test-threads=2");
    stores.extend(STORE_TEST_MODULES);
    let mut others = args;
    others.push("--test-threads=1");
    for module in STORE_TEST_MODULES {
        others.extend(["--skip", module]);
    }
    for (what, args) in [
        ("privileged tests of the stores, two at a time", stores),
        (
            "privileged end-to-end tests (real eBPF, real workloads), one at a time",
            others,
        ),
    ] {
        step(what);
        if is_root() {
            cargo(&args)?;
        } else {
            status(&mut as_root(&cargo_bin(), &args))?;
        }
    }
    Ok(())
}

/// The integration test targets: those that need no root (every member's
/// `tests/*.rs` but the privileged crate's), and the privileged ones
/// (`tests/tests/`: one target, `privileged`). Names are unique across the
/// workspace, so `--test NAME` picks one target.
fn test_targets() -> Result<(Vec<String>, Vec<String>)> {
    let root = workspace_root();
    let names = |dir: &Path| -> Result<Vec<String>> {
        let mut names = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(names);
        };
        for entry in entries {
            let path = entry?.path();
            // `NAME.rs`, or `NAME/main.rs` (a target of several files).
            let name = if path.extension().is_some_and(|e| e == "rs") {
                path.file_stem()
            } else if path.join("main.rs").is_file() {
                path.file_name()
            } else {
                None
            };
            if let Some(name) = name {
                names.push(name.to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    };
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let mut unit = Vec::new();
    for member in workspace_members(&manifest) {
        if member != "tests" {
            unit.extend(names(&root.join(member).join("tests"))?);
        }
    }
    let privileged = names(&root.join("tests/tests"))?;
    if let Some(both) = unit.iter().find(|n| privileged.contains(n)) {
        bail!("integration test name {both:?} is used twice: `--test {both}` would run both");
    }
    Ok((unit, privileged))
}

/// The `members` of the workspace's Cargo.toml.
fn workspace_members(manifest: &str) -> Vec<String> {
    let Some(start) = manifest.find("members = [") else {
        return Vec::new();
    };
    let list = &manifest[start + "members = [".len()..];
    let list = &list[..list.find(']').unwrap_or(list.len())];
    list.split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

/// Clippy with `-D warnings` on every crate: the workspace's (the privileged
/// tests and the fuzz targets included) and the eBPF program for its BPF
/// target.
fn clippy() -> Result<()> {
    step("cargo clippy -D warnings (every crate of the workspace)");
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "profiler-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The collector benchmark is behind a feature of xtask.
    cargo(&[
        "clippy",
        "-p",
        "xtask",
        "--features",
        "collector-bench",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The eBPF crate builds only for the BPF target, with `core` built from
    // rust-src (RUSTC_BOOTSTRAP=1, as the agent's build.rs does) and the
    // architecture cfg aya-build passes.
    step("cargo clippy -D warnings (profiler-ebpf, bpfel-unknown-none)");
    status(
        Command::new(cargo_bin())
            .args([
                "clippy",
                "-p",
                "profiler-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--bins",
                "--",
                "-D",
                "warnings",
            ])
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", bootstrap_target_dir())
            .env(
                "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
                format!("--cfg bpf_target_arch=\"{}\"", std::env::consts::ARCH),
            ),
    )?;
    Ok(())
}

/// The targets in fuzz/fuzz_targets/ (docs/collector.md, "Fuzzing").
const FUZZ_TARGETS: [&str; 5] = [
    "batch_validate",
    "parse_folded",
    "query_params",
    "pprof_import",
    "otlp_import",
];
/// How long CI runs each fuzz target.
const CI_FUZZ_SECONDS: u64 = 3;

/// Builds the fuzz targets and runs each for `seconds`. A panic or failed
/// invariant makes libFuzzer exit non-zero (failing this step) and leaves the
/// input under fuzz/artifacts/<target>/.
fn fuzz(seconds: u64, target: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match target {
        None => FUZZ_TARGETS.to_vec(),
        Some(t) if FUZZ_TARGETS.contains(&t) => vec![t],
        Some(t) => bail!(
            "no fuzz target {t:?}; there are {}",
            FUZZ_TARGETS.join(", ")
        ),
    };
    // cargo-fuzz passes nightly-only flags (-Z sanitizer options, sancov); the
    // pinned stable compiler takes them with RUSTC_BOOTSTRAP=1.
    // No sanitizer: the code under test is safe Rust, where a bug shows as a
    // panic or a failed overflow check, which libFuzzer catches by itself;
    // AddressSanitizer would only slow the build and the runs.
    // --dev (debug assertions and overflow checks on): the ~300 instrumented
    // dependencies build in about 1.5 min on 2 cores against 4-5 min in
    // release, and the targets still run 5,000-50,000 inputs a second.
    let flags = [
        "--fuzz-dir",
        "fuzz",
        "--sanitizer",
        "none",
        "--dev",
        "--features",
        "libfuzzer",
    ];
    let cargo_fuzz = |sub: &str| {
        let mut cmd = Command::new("cargo");
        cmd.args(["fuzz", sub])
            .args(flags)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", bootstrap_target_dir());
        cmd
    };
    step("building the fuzz targets");
    status(&mut cargo_fuzz("build"))?;
    for t in targets {
        // New inputs go to the first (ignored) directory; the committed seeds
        // are read only.
        let corpus = Path::new("fuzz/corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        step(&format!("fuzzing {t} for {seconds} s"));
        status(
            cargo_fuzz("run")
                .arg(t)
                .arg(&corpus)
                .arg(Path::new("fuzz/seeds").join(t))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]),
        )
        .with_context(|| {
            format!(
                "fuzz target {t} failed: the input is in fuzz/artifacts/{t}/; make it a unit test"
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_targets_cover_every_member() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        let members = workspace_members(&manifest);
        assert!(
            members.contains(&"profiler-agent".to_string()),
            "{members:?}"
        );
        assert!(members.contains(&"fuzz".to_string()), "{members:?}");
        let (unit, privileged) = test_targets().unwrap();
        assert!(unit.contains(&"golden".to_string()), "{unit:?}");
        assert!(unit.contains(&"api".to_string()), "{unit:?}");
        assert_eq!(privileged, ["privileged"]);
    }

    #[test]
    fn store_test_modules_are_modules_of_the_privileged_tests() {
        let main = workspace_root().join("tests/tests/privileged/main.rs");
        let main = std::fs::read_to_string(main).unwrap();
        for module in STORE_TEST_MODULES {
            let name = module.trim_end_matches("::");
            assert!(
                main.lines().any(|l| l.trim() == format!("mod {name};")),
                "tests/tests/privileged/main.rs declares no `mod {name};`"
            );
        }
    }

    #[test]
    fn reads_the_pinned_toolchain() {
        let text = "# comment\n[toolchain]\nchannel = \"1.95.0\"\ncomponents = [\"rust-src\"]\n";
        assert_eq!(toolchain_channel(text).as_deref(), Some("1.95.0"));
        assert_eq!(toolchain_channel("[toolchain]\n"), None);
        // The repository's own file names a version.
        let pinned = toolchain().expect("rust-toolchain.toml has a channel");
        assert!(pinned.starts_with("1."), "{pinned}");
    }
}
