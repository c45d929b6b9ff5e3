//! `cargo xtask bench`: what the profiler costs, measured side by side with
//! what operators would use instead, and every performance target of issue 6.
//!
//! - `overhead`: a fixed amount of CPU-bound work on every CPU, timed with no
//!   profiler, the agent at 19 and 99 Hz and `perf record -F 99 -a -g`
//!   (`overhead.rs`).
//! - `kernel-cost`: the kernel's own run_time_ns / run_cnt of the agent's
//!   perf_event program at about 5, 30 and 120 frames (`overhead.rs`).
//! - `off-cpu`: what `--off-cpu` adds (agent CPU, kernel time of all the
//!   agent's programs) at about 10 k and 50 k context switches a second
//!   (`offcpu.rs`).
//! - `footprint`: the always-on agent's CPU and peak RSS on a busy host with
//!   ~200 processes, some spawned continuously (`footprint.rs`).
//! - `startup`: exec of the agent to its program attached on every CPU
//!   (`footprint.rs`).
//! - `criterion`: the Criterion micro-benchmarks of the hot paths, shortened
//!   (`suites.rs`).
//! - `collector`, `symbolize`: the programs `collector-bench` (a binary of
//!   this crate, `collector/`) and `symbolize_bench` (an example of
//!   profiler-agent), each of which writes a markdown section that the report
//!   includes verbatim (`suites.rs`).
//! - `formats`: OTLP vs native bytes, OTLP and pprof ingest rate, scraping
//!   100 Go services; the program `formats-bench` (`formats.rs`), run as
//!   `collector` is.
//!
//! The full run writes `docs/benchmarks.md`; `--quick` and `--only` write
//! `target/bench/report.md` instead, so a smoke run never replaces the report.
//! `cargo xtask test` ends with [`smoke`]: `--quick` on the debug binaries.
mod footprint;
mod offcpu;
mod overhead;
mod python;
mod suites;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use profiler_testkit::median;

use super::{apt_install, cargo, output, setup, step, succeeds, workspace_root, Needs};

/// The benchmarks, in the order they run; `--only` names one.
const BENCHMARKS: [&str; 10] = [
    "overhead",
    "kernel-cost",
    "off-cpu",
    "python",
    "footprint",
    "startup",
    "criterion",
    "collector",
    "symbolize",
    "formats",
];

/// How `cargo xtask bench` was asked to run.
pub struct Options {
    /// A short run of every case (smoke); report in target/bench/report.md.
    pub quick: bool,
    /// One benchmark only.
    pub only: Option<String>,
    /// Use the debug binaries (already built by `cargo xtask test`): the
    /// figures mean nothing, only that every benchmark still runs.
    pub debug_build: bool,
    /// Another agent binary whose kernel cost `kernel-cost` measures side
    /// by side (e.g. a release build of an earlier commit).
    pub baseline_agent: Option<PathBuf>,
}

/// Sizes of one run: full, or the `--quick` smoke variant.
pub(crate) struct Plan {
    quick: bool,
    /// Rounds of the interleaved overhead cases.
    rounds: usize,
    /// Work per overhead process, as a fraction of the full size (~3 s on
    /// this class of machine).
    scale: f64,
    /// How long each stack depth is sampled for the kernel cost, per round.
    cost_seconds: u64,
    /// Rounds of the kernel cost cases (run in turn; the median is kept).
    cost_rounds: usize,
    /// How long the agent runs at each frequency in the footprint benchmark.
    footprint_seconds: u64,
    /// Long-lived processes of the footprint benchmark's busy host.
    fleet_size: usize,
    /// Agent start-ups timed.
    startup_runs: usize,
    /// Whether to try (and maybe install) bcc's `profile`.
    try_bcc: bool,
}

impl Plan {
    fn new(quick: bool, debug_build: bool) -> Self {
        if quick {
            Plan {
                quick,
                rounds: 1,
                scale: 0.1,
                cost_seconds: 1,
                cost_rounds: 1,
                footprint_seconds: 3,
                fleet_size: 50,
                startup_runs: 2,
                try_bcc: !debug_build,
            }
        } else {
            // About 20 minutes on 2 cores, builds included. Measured on a
            // busy machine: overhead 107 s, kernel cost 27, footprint 124,
            // start-up 2, Criterion 39, collector-bench ~450 (SQLite 170,
            // ClickHouse 280), symbolize_bench 25 (~13 min), plus ~4-4.5 min
            // for a fresh release build.
            Plan {
                quick,
                rounds: 3,
                scale: 0.6,
                cost_seconds: 5,
                cost_rounds: 3,
                footprint_seconds: 60,
                fleet_size: 200,
                startup_runs: 5,
                try_bcc: true,
            }
        }
    }
}

/// What the benchmarks share: sizes, paths and the binaries under test.
pub(crate) struct Ctx {
    plan: Plan,
    root: PathBuf,
    /// target/bench: logs, outputs, temporary files.
    dir: PathBuf,
    /// `--release`, or the debug binaries.
    release: bool,
    agent: PathBuf,
    collector: PathBuf,
    /// See [`Options::baseline_agent`].
    baseline_agent: Option<PathBuf>,
    bins: Option<Workloads>,
}

impl Ctx {
    /// target/release or target/debug.
    fn target_dir(&self) -> PathBuf {
        super::target_dir().join(if self.release { "release" } else { "debug" })
    }

    fn bins(&self) -> &Workloads {
        self.bins.as_ref().expect("workloads are built first")
    }
}

/// Mean ns per sample at ~30 frames at one frequency.
#[derive(Default)]
pub(crate) struct KernelCost30 {
    /// CFI walk (the default).
    pub cfi: Option<f64>,
    /// `--unwind frame-pointers`.
    pub fp: Option<f64>,
    /// The baseline agent (`--baseline-agent`), with its defaults.
    pub baseline: Option<f64>,
}

/// What the benchmarks measured, for the table of targets.
#[derive(Default)]
pub(crate) struct Figures {
    overhead: Option<overhead::Verdict>,
    /// Mean ns per sample at ~30 frames, by sampling frequency.
    kernel_30: BTreeMap<u32, KernelCost30>,
    /// Agent CPU at 19 Hz, % of one core.
    agent_cpu_19: Option<f64>,
    /// Highest VmHWM of the footprint runs, MiB, and the processes then.
    peak_rss_mib: Option<(f64, usize)>,
    /// Median exec-to-attached time, ms.
    startup_ms: Option<f64>,
    /// `BENCH key=value` figures of the collector and symbolization programs.
    keys: BTreeMap<String, f64>,
}

pub fn bench(opts: Options) -> Result<()> {
    let only = opts.only.as_deref();
    if let Some(name) = only {
        if !BENCHMARKS.contains(&name) {
            bail!("no benchmark {name:?}; there are {}", BENCHMARKS.join(", "));
        }
    }
    if !super::is_root() {
        bail!("the benchmarks load eBPF programs and run perf -a: run `cargo xtask bench` as root");
    }
    let started = Instant::now();
    let selected: Vec<&str> = BENCHMARKS
        .iter()
        .copied()
        .filter(|b| only.is_none_or(|o| o == *b))
        .collect();
    let wants = |name: &str| selected.contains(&name);
    let root = workspace_root();
    // Say at once, not after ten minutes, that a program is missing.
    for program in &suites::PROGRAMS {
        if wants(program.bench) && !suites::program_exists(&root, program) {
            bail!(
                "benchmark `{}` runs `{}` ({}), which this checkout does not have; \
                 run the others one by one with --only NAME",
                program.bench,
                program.name,
                program.source
            );
        }
    }
    setup(Needs::Test)?;
    if wants("overhead") && !succeeds("sh", &["-c", "command -v perf && perf --version"]) {
        apt_install(&["linux-perf"])?;
    }
    let reads_bpf_stats = ["overhead", "kernel-cost", "off-cpu", "python", "footprint"]
        .iter()
        .any(|b| wants(b));
    if reads_bpf_stats && !succeeds("sh", &["-c", "command -v bpftool"]) {
        apt_install(&["bpftool"])?;
    }
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir)?;
    let profile = if opts.debug_build { "debug" } else { "release" };
    let mut ctx = Ctx {
        plan: Plan::new(opts.quick, opts.debug_build),
        agent: super::target_dir().join(profile).join("profiler-agent"),
        collector: super::target_dir().join(profile).join("profiler-collector"),
        baseline_agent: opts.baseline_agent.clone(),
        root,
        dir,
        release: !opts.debug_build,
        bins: None,
    };

    let mut timings: Vec<(String, f64)> = Vec::new();
    let t = Instant::now();
    build(&mut ctx, &wants)?;
    timings.push((
        format!("build ({profile} binaries, workloads)"),
        t.elapsed().as_secs_f64(),
    ));

    let mut figures = Figures::default();
    let mut sections = String::new();
    for name in &selected {
        let t = Instant::now();
        let section = match *name {
            "overhead" => overhead::overhead(&ctx, &mut figures)?,
            "kernel-cost" => overhead::kernel_cost(&ctx, &mut figures)?,
            "off-cpu" => offcpu::off_cpu(&ctx)?,
            "python" => python::python_frames(&ctx)?,
            "footprint" => footprint::footprint(&ctx, &mut figures)?,
            "startup" => footprint::startup(&ctx, &mut figures)?,
            "criterion" => suites::criterion(&ctx)?,
            "collector" | "symbolize" | "formats" => {
                suites::program_report(&ctx, name, &mut figures)?
            }
            _ => unreachable!("checked above"),
        };
        let secs = t.elapsed().as_secs_f64();
        eprintln!("    {name} took {secs:.0} s");
        sections += &section;
        timings.push(((*name).to_string(), secs));
    }

    let mut command = String::from("cargo xtask bench");
    if opts.quick {
        command += " --quick";
    }
    if opts.debug_build {
        command += " --debug-build";
    }
    if let Some(o) = only {
        command += &format!(" --only {o}");
    }
    if let Some(b) = &opts.baseline_agent {
        command += &format!(" --baseline-agent {}", b.display());
    }
    let total = started.elapsed().as_secs_f64();
    let mut doc = header(&command, opts.quick, opts.debug_build);
    doc += &targets_table(&figures, &selected);
    doc += &timing_table(&timings, total);
    doc += &sections;
    let path = if opts.quick || only.is_some() || opts.debug_build {
        ctx.dir.join("report.md")
    } else {
        ctx.root.join("docs/benchmarks.md")
    };
    fs::write(&path, doc).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "benchmarks done in {total:.0} s: report in {}",
        path.display()
    );
    Ok(())
}

/// The smoke run at the end of `cargo xtask test`: every benchmark, briefly,
/// on the debug binaries that the tests built. Fails if one breaks.
pub fn smoke() -> Result<()> {
    bench(Options {
        quick: true,
        only: None,
        debug_build: true,
        baseline_agent: None,
    })
}

/// How every cargo command of the benchmarks selects packages.
pub(crate) const WORKSPACE: [&str; 3] = ["--workspace", "--exclude", "profiler-ebpf"];

/// Builds what the selected benchmarks run, all before the first
/// measurement, so no compiler competes with them.
fn build(ctx: &mut Ctx, wants: &dyn Fn(&str) -> bool) -> Result<()> {
    let mut args: Vec<&str> = vec!["build"];
    if ctx.release {
        args.push("--release");
    }
    // The whole workspace with the targets picked by name, the examples
    // among them: cargo then resolves features as for the `cargo test` of
    // `cargo xtask test` (an example brings in the dev-dependencies), so the
    // debug build reuses what the tests built. Without an example the
    // features of about 20 dependencies differ.
    args.extend(WORKSPACE);
    args.push("--examples");
    if [
        "overhead",
        "kernel-cost",
        "off-cpu",
        "footprint",
        "startup",
        "formats",
    ]
    .iter()
    .any(|b| wants(b))
    {
        args.extend(["--bin", "profiler-agent"]);
    }
    if wants("footprint") || wants("formats") {
        args.extend(["--bin", "profiler-collector"]);
    }
    // One build: the collector benchmark's feature adds only xtask's own
    // optional dependencies, with features the workspace already enables,
    // so it changes how nothing else is built.
    let program_args: Vec<String> = suites::PROGRAMS
        .iter()
        .filter(|p| wants(p.bench))
        .flat_map(|p| p.build_args())
        .collect();
    args.extend(program_args.iter().map(String::as_str));
    step(&format!(
        "building what the benchmarks run ({})",
        if ctx.release { "release" } else { "debug" }
    ));
    cargo(&args)?;
    if wants("criterion") {
        suites::build_criterion(ctx)?;
    }
    if ["overhead", "kernel-cost", "off-cpu", "footprint"]
        .iter()
        .any(|b| wants(b))
    {
        ctx.bins = Some(build_workloads(&ctx.root, &ctx.dir)?);
    }
    Ok(())
}

/// The compiled workloads (xtask/workloads/).
pub(crate) struct Workloads {
    /// `work DEPTH MILLIONS`: recursion to DEPTH, then an LCG loop (0: forever).
    work: PathBuf,
    /// `sys THOUSANDS`: 4 KiB read + write pairs.
    sys: PathBuf,
    /// `gowork -calls N` (tests/workloads/gowork.go, shared with the end-to-end tests).
    gowork: PathBuf,
    /// `tick PERIOD_MS WORK_US`: wakes, works a little, sleeps; forever.
    tick: PathBuf,
    /// `switch THREADS WAIT_US`: threads that each wait in a loop; forever.
    switch: PathBuf,
}

fn build_workloads(root: &Path, dir: &Path) -> Result<Workloads> {
    step("building the benchmark workloads (xtask/workloads/)");
    let src = root.join("xtask/workloads");
    let bins = Workloads {
        work: dir.join("work"),
        sys: dir.join("sys"),
        gowork: dir.join("gowork"),
        tick: dir.join("tick"),
        switch: dir.join("switch"),
    };
    for (c, bin) in [
        ("work.c", &bins.work),
        ("sys.c", &bins.sys),
        ("tick.c", &bins.tick),
        ("switch.c", &bins.switch),
    ] {
        super::status(
            Command::new("gcc")
                .args(["-O0", "-fno-omit-frame-pointer", "-pthread", "-o"])
                .arg(bin)
                .arg(src.join(c)),
        )?;
    }
    super::status(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&bins.gowork)
            .arg(root.join("tests/workloads/gowork.go")),
    )?;
    Ok(bins)
}

/// Describes the machine and how to reproduce the figures.
fn header(command: &str, quick: bool, debug_build: bool) -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let distro = fs::read_to_string("/etc/debian_version")
        .map(|v| format!("Debian {}", v.trim()))
        .unwrap_or_else(|_| "unknown distribution".into());
    let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let commit = output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    let perf = output("perf", &["--version"]).unwrap_or_default();
    let rustc = output("rustc", &["--version"]).unwrap_or_default();
    // Other work on the machine skews wall times: say how busy it was.
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let mut s = String::from("# Benchmarks\n\n");
    if debug_build {
        s += "**Smoke run on debug binaries: the figures below mean nothing.** It only shows \
              that every benchmark still runs (`cargo xtask test` ends with it). The real \
              report is docs/benchmarks.md, from `cargo xtask bench`.\n\n";
    } else if quick {
        s += "**Quick run: a few seconds per case, the figures are rough.** The real report \
              is docs/benchmarks.md, from `cargo xtask bench`.\n\n";
    }
    let _ = write!(
        s,
        "What the profiler costs the machine it profiles, next to the tools an operator \
         would otherwise use, and every performance target of issue 6. Produced by \
         `{command}` (as root; about 20 minutes on 2 cores from a fresh clone, builds \
         included; needs the machine otherwise idle) from commit {commit}.\n\n\
         To reproduce: clone this repository and run `cargo xtask bench` as root; it installs \
         what it lacks (as `cargo xtask setup`, plus perf and bpftool), builds everything \
         first, then runs {names} one after the other and writes this file. `--only NAME` runs \
         one of them and `--quick` all of them briefly; both write target/bench/report.md \
         instead. `cargo xtask test` (CI) ends with `cargo xtask bench --quick --debug-build`, \
         a smoke run on the debug binaries whose figures mean nothing. Logs and outputs of \
         the last run are in target/bench/.\n\n\
         | machine | |\n|---|---|\n\
         | CPU | {cpu} |\n| cores | {cores} |\n| RAM | {mem_gib:.1} GiB |\n\
         | kernel | {kernel} |\n| system | {distro} |\n| compiler | {rustc} |\n| perf | {perf} |\n\
         | date | {date} |\n| load average at the end (1, 5, 15 min) | {load} |\n\n\
         Perf events here are software only (`cpu-clock`): the VM has no PMU.\n",
        names = BENCHMARKS.join(", "),
        kernel = kernel.trim(),
        perf = perf.trim(),
        rustc = rustc.trim(),
        date = date.trim(),
        commit = commit.trim(),
        cores = cores(),
        load = load.join(" "),
    );
    s
}

/// `met`, or `missed by ...`, for a figure against a limit.
fn verdict(value: f64, limit: f64, at_most: bool, unit: &dyn Fn(f64) -> String) -> String {
    let met = if at_most {
        value <= limit
    } else {
        value >= limit
    };
    if met {
        "**met**".into()
    } else {
        format!(
            "**missed** by {} ({:.0} %)",
            unit((value - limit).abs()),
            ((value - limit).abs() / limit) * 100.0
        )
    }
}

/// The summary of every target of issue 6: what was measured and whether it
/// is met.
fn targets_table(f: &Figures, selected: &[&str]) -> String {
    let mut rows: Vec<[String; 4]> = Vec::new();
    let not = |bench: &str| {
        if selected.contains(&bench) {
            "not measured (see its section)".to_string()
        } else {
            format!("not measured (run without `--only`, or `--only {bench}`)")
        }
    };
    let na = || "—".to_string();
    let mut push = |what: &str, target: &str, measured: String, verdict: String| {
        rows.push([what.into(), target.into(), measured, verdict]);
    };

    match &f.overhead {
        Some(o) => {
            let mut verdict = if o.agent <= 0.005 && o.agent < o.perf {
                "**met**".to_string()
            } else if o.agent > 0.005 {
                format!("**missed** by {:.2} points", (o.agent - 0.005) * 100.0)
            } else {
                "**missed**: within 0.5 % but not below perf".to_string()
            };
            if o.busy_share < 0.9 {
                verdict += &format!(
                    " (machine busy: the workloads got {:.0} % of the CPUs, so this is noise)",
                    o.busy_share * 100.0
                );
            }
            push(
                "workload slowdown, agent at 99 Hz",
                "≤ 0.5 % and lower than `perf record -g` at 99 Hz",
                format!(
                    "worst {:+.2} % ({}); perf worst {:+.2} %; median over workloads {:+.2} % vs perf {:+.2} %",
                    o.agent * 100.0,
                    o.agent_workload,
                    o.perf * 100.0,
                    o.agent_median * 100.0,
                    o.perf_median * 100.0
                ),
                verdict,
            );
        }
        None => push(
            "workload slowdown, agent at 99 Hz",
            "≤ 0.5 % and lower than `perf record -g` at 99 Hz",
            not("overhead"),
            na(),
        ),
    }
    if f.kernel_30.is_empty() {
        for what in ["", ", frame pointers"] {
            push(
                &format!("kernel cost per sample, 30 frames{what}"),
                "see kernel-cost",
                not("kernel-cost"),
                na(),
            );
        }
    }
    for (hz, at) in &f.kernel_30 {
        if let Some(ns) = at.cfi {
            push(
                &format!("kernel cost per sample, 30 frames, {hz} Hz"),
                "≤ 5 µs mean (CFI)",
                format!("{:.2} µs", ns / 1000.0),
                verdict(ns / 1000.0, 5.0, true, &|d| format!("{d:.2} µs")),
            );
        }
        if let Some(ns) = at.fp {
            let (target, limit) = match at.baseline {
                Some(b) => (
                    format!("≤ the baseline agent's {:.2} µs (same run)", b / 1000.0),
                    b / 1000.0,
                ),
                None => ("≤ 3.0 µs mean (the kernel's own walk)".to_string(), 3.0),
            };
            push(
                &format!("kernel cost per sample, 30 frames, frame pointers, {hz} Hz"),
                &target,
                format!("{:.2} µs", ns / 1000.0),
                verdict(ns / 1000.0, limit, true, &|d| format!("{d:.2} µs")),
            );
        }
    }
    match f.agent_cpu_19 {
        Some(pct) => push(
            "agent CPU at 19 Hz, 2 busy CPUs",
            "≤ 0.2 % of one core",
            format!("{pct:.3} % of one core"),
            verdict(pct, 0.2, true, &|d| format!("{d:.3} points")),
        ),
        None => push(
            "agent CPU at 19 Hz, 2 busy CPUs",
            "≤ 0.2 % of one core",
            not("footprint"),
            na(),
        ),
    }
    match f.peak_rss_mib {
        Some((mib, procs)) => push(
            "agent peak RSS, 200 processes",
            "≤ 48 MiB",
            format!("{mib:.1} MiB ({procs} processes on the host)"),
            verdict(mib, 48.0, true, &|d| format!("{d:.1} MiB")),
        ),
        None => push(
            "agent peak RSS, 200 processes",
            "≤ 48 MiB",
            not("footprint"),
            na(),
        ),
    }
    match f.startup_ms {
        Some(ms) => push(
            "start-up (load + attach)",
            "≤ 300 ms",
            format!("{ms:.0} ms (median)"),
            verdict(ms, 300.0, true, &|d| format!("{d:.0} ms")),
        ),
        None => push("start-up (load + attach)", "≤ 300 ms", not("startup"), na()),
    }
    let key = |k: &str| f.keys.get(k).copied();
    match key("warm_frames_per_s") {
        Some(v) => {
            let cold = key("cold_frames_per_s")
                .map(|c| format!(" (cold: {})", si(c, "frames/s")))
                .unwrap_or_default();
            push(
                "warm symbolization",
                "≥ 2 M frames/s",
                format!("{}{cold}", si(v, "frames/s")),
                verdict(v, 2e6, false, &|d| si(d, "frames/s")),
            )
        }
        None => push(
            "warm symbolization",
            "≥ 2 M frames/s",
            not("symbolize"),
            na(),
        ),
    }
    match key("ingest_samples_per_s") {
        Some(v) => push(
            "collector ingest, SQLite store",
            "≥ 500 k samples/s on one core",
            format!("{} per CPU-second of the collector", si(v, "samples")),
            verdict(v, 5e5, false, &|d| si(d, "samples/s")),
        ),
        None => push(
            "collector ingest, SQLite store",
            "≥ 500 k samples/s on one core",
            not("collector"),
            na(),
        ),
    }
    // ClickHouse does the store's work in its own process: its CPU counts.
    match key("clickhouse_ingest_total_cpu_samples_per_s") {
        Some(v) => push(
            "collector ingest, ClickHouse store",
            "≥ 500 k samples/s on one core",
            format!(
                "{} per CPU-second of the collector and ClickHouse together{}",
                si(v, "samples"),
                key("clickhouse_ingest_samples_per_s")
                    .map(|c| format!(
                        " ({} per CPU-second of the collector alone)",
                        si(c, "samples")
                    ))
                    .unwrap_or_default()
            ),
            verdict(v, 5e5, false, &|d| si(d, "samples/s")),
        ),
        None => push(
            "collector ingest, ClickHouse store",
            "≥ 500 k samples/s on one core",
            not("collector"),
            na(),
        ),
    }
    for (store, prefix) in [("SQLite", ""), ("ClickHouse", "clickhouse_")] {
        let what = format!("flame graph query, 24 h × 100 agents, {store} store");
        match key(&format!("{prefix}query_24h_100_s")) {
            Some(v) => push(
                &what,
                "≤ 1 s",
                format!("{v:.3} s"),
                verdict(v, 1.0, true, &|d| format!("{d:.3} s")),
            ),
            None => push(&what, "≤ 1 s", not("collector"), na()),
        }
    }
    let mut s = String::from(
        "\n## Targets (issue 6)\n\n| what | target | measured | verdict |\n|---|---|---|---|\n",
    );
    let mut rows_missed = Vec::new();
    for [a, b, c, d] in rows {
        let _ = writeln!(s, "| {a} | {b} | {c} | {d} |");
        if d.contains("**missed**") {
            rows_missed.push(a);
        }
    }
    s += "\nEach figure comes from the section of its benchmark below, which says how it \
          was measured; \"missed\" says by how much.\n";
    let mut missed: Vec<(&str, &str)> = Vec::new();
    for cause in rows_missed.iter().filter_map(|w| miss_cause(w)) {
        if !missed.contains(&cause) {
            missed.push(cause);
        }
    }
    if !missed.is_empty() {
        s += "\n### Why the missed targets are missed\n\n";
        for (title, anchor) in missed {
            let _ = writeln!(s, "- [{title}](benchmark-findings.md#{anchor})");
        }
    }
    s
}

/// The section of docs/benchmark-findings.md that explains why a target
/// is missed: (title, anchor).
fn miss_cause(what: &str) -> Option<(&'static str, &'static str)> {
    Some(match what {
        "workload slowdown, agent at 99 Hz" => ("Workload slowdown", "workload-slowdown"),
        w if w.starts_with("kernel cost per sample") => {
            ("Kernel cost per sample", "kernel-cost-per-sample")
        }
        "agent CPU at 19 Hz, 2 busy CPUs" => ("Agent CPU at 19 Hz", "agent-cpu-at-19-hz"),
        "agent peak RSS, 200 processes" => ("Agent peak RSS", "agent-peak-rss"),
        "start-up (load + attach)" => ("Start-up", "start-up"),
        "warm symbolization" => ("Warm symbolization", "warm-symbolization"),
        "collector ingest, SQLite store" => ("Collector (SQLite)", "collector-sqlite"),
        "flame graph query, 24 h × 100 agents, SQLite store" => {
            ("Collector (SQLite)", "collector-sqlite")
        }
        "collector ingest, ClickHouse store" => (
            "Collector ingest (ClickHouse)",
            "collector-ingest-clickhouse",
        ),
        "flame graph query, 24 h × 100 agents, ClickHouse store" => (
            "Flame graph query (ClickHouse)",
            "flame-graph-query-clickhouse",
        ),
        _ => return None,
    })
}

fn timing_table(timings: &[(String, f64)], total: f64) -> String {
    let mut s = String::from("\n## Time taken\n\n| step | seconds |\n|---|---:|\n");
    for (name, secs) in timings {
        let _ = writeln!(s, "| {name} | {secs:.0} |");
    }
    let _ = writeln!(
        s,
        "| **whole run** (set-up checks included) | **{total:.0}** |"
    );
    s
}

/// `1.23 M unit`, `456 k unit`.
fn si(v: f64, unit: &str) -> String {
    if v >= 1e6 {
        format!("{:.2} M {unit}", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0} k {unit}", v / 1e3)
    } else {
        format!("{v:.1} {unit}")
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Waits for a child and returns its CPU time (user + system) in seconds,
/// from wait4's rusage: the child's own figure, not the parent's running
/// total. Past `timeout` the child is killed and this fails.
fn wait_cpu(child: Child, timeout: Duration) -> Result<(ExitStatus, f64)> {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + timeout;
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child; `child` is not waited on again.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if r != 0 {
            bail!("wait4({pid}): {}", std::io::Error::last_os_error());
        }
        if Instant::now() > deadline {
            // SAFETY: plain kill(2) and a blocking wait on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::wait4(pid, &mut status, 0, &mut usage);
            }
            bail!("process {pid} did not exit within {timeout:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        ExitStatus::from_raw(status),
        secs(usage.ru_utime) + secs(usage.ru_stime),
    ))
}

/// What the agent logs (at info) once its program is attached on every CPU.
const ATTACHED: &str = "profiler attached to cpu-clock on every online CPU";

/// The agent, started and attached; killed if dropped without [`AgentRun::stop`].
pub(crate) struct AgentRun {
    child: Option<Child>,
    /// Spawn (fork + exec) to the attached line on stderr.
    attach: Duration,
    log: Option<JoinHandle<()>>,
    err_path: PathBuf,
}

impl AgentRun {
    /// Starts `agent ARGS` with its stdout in `dir/NAME.out` and its log in
    /// `dir/NAME.err`, and waits until it has attached on every CPU.
    fn start(agent: &Path, args: &[String], dir: &Path, name: &str) -> Result<Self> {
        let out = fs::File::create(dir.join(format!("{name}.out")))?;
        let err_path = dir.join(format!("{name}.err"));
        let mut err_file = fs::File::create(&err_path)?;
        let spawned = Instant::now();
        let mut child = Command::new(agent)
            .args(args)
            .env("RUST_LOG", "warn,profiler_agent=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", agent.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let log = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains(ATTACHED) {
                    let _ = tx.send(Instant::now());
                }
                let _ = writeln!(err_file, "{line}");
            }
        });
        let mut run = AgentRun {
            child: Some(child),
            attach: Duration::ZERO,
            log: Some(log),
            err_path,
        };
        let deadline = spawned + Duration::from_secs(30);
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(at) => {
                    run.attach = at - spawned;
                    return Ok(run);
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    let child = run.child.as_mut().expect("running");
                    if let Some(st) = child.try_wait()? {
                        bail!(
                            "the agent exited ({st}) before attaching: see {}",
                            run.err_path.display()
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "the agent did not attach within 30 s: see {}",
                        run.err_path.display()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let child = run.child.as_mut().expect("running");
                    let st = child.wait()?;
                    bail!(
                        "the agent closed its log ({st}) without attaching: see {}",
                        run.err_path.display()
                    );
                }
            }
        }
    }

    fn pid(&self) -> libc::pid_t {
        self.child.as_ref().map_or(0, |c| c.id() as libc::pid_t)
    }

    /// Stops it with SIGINT (it drains and writes its outputs) and returns
    /// its CPU seconds, start-up and shutdown included.
    fn stop(mut self) -> Result<f64> {
        let child = self.child.take().expect("running");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let (st, cpu) = wait_cpu(child, Duration::from_secs(60))?;
        if let Some(log) = self.log.take() {
            let _ = log.join();
        }
        if !st.success() {
            bail!(
                "the agent exited with {st}: see {}",
                self.err_path.display()
            );
        }
        Ok(cpu)
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A perf_event program loaded in the kernel: id, run time and count (the
/// last two only with kernel.bpf_stats_enabled=1).
#[derive(Debug, Clone, PartialEq)]
struct ProgStats {
    id: u64,
    /// The program's name as the kernel keeps it (15 characters at most).
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
}

/// Every program `bpftool prog show` lists, with its `bpf_stats` figures.
fn bpf_progs_all() -> Result<Vec<ProgStats>> {
    let text = output("bpftool", &["prog", "show"]).context("bpftool prog show failed")?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let field = |name: &str| {
                words
                    .iter()
                    .position(|w| *w == name)
                    .and_then(|i| words.get(i + 1)?.parse::<u64>().ok())
            };
            let name = words
                .iter()
                .position(|w| *w == "name")
                .and_then(|i| words.get(i + 1))
                .map_or(String::new(), |n| n.to_string());
            Some(ProgStats {
                id: words.first()?.trim_end_matches(':').parse().ok()?,
                name,
                run_time_ns: field("run_time_ns").unwrap_or(0),
                run_cnt: field("run_cnt").unwrap_or(0),
            })
        })
        .collect())
}

/// The perf_event programs named `profile` (the agent's), from `bpftool prog
/// show`: one line per program, `ID: perf_event  name profile ... run_time_ns
/// N run_cnt M`.
fn bpf_progs() -> Result<Vec<ProgStats>> {
    let text = output("bpftool", &["prog", "show"]).context("bpftool prog show failed")?;
    let mut progs = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with(char::is_whitespace)) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.get(1) != Some(&"perf_event") {
            continue;
        }
        let field = |name: &str| {
            words
                .iter()
                .position(|w| *w == name)
                .and_then(|i| words.get(i + 1)?.parse::<u64>().ok())
        };
        let is_profile = words.windows(2).any(|w| w == ["name", "profile"]);
        let Some(id) = words[0].trim_end_matches(':').parse().ok() else {
            continue;
        };
        if is_profile {
            progs.push(ProgStats {
                id,
                name: "profile".into(),
                run_time_ns: field("run_time_ns").unwrap_or(0),
                run_cnt: field("run_cnt").unwrap_or(0),
            });
        }
    }
    Ok(progs)
}

/// A plain HTTP/1.0 GET (no chunked replies): the body if the status is 200.
fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .with_context(|| format!("reading http://{addr}{path}"))?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        bail!("GET http://{addr}{path}: {status}");
    }
    Ok(body.to_string())
}

/// Runs a command, echoing its stdout to stderr as it comes, and returns
/// that output.
fn run_teed(cmd: &mut Command) -> Result<(ExitStatus, String)> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let mut text = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        eprintln!("{line}");
        text += &line;
        text.push('\n');
    }
    Ok((child.wait()?, text))
}
