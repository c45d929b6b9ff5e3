//! `cargo xtask bench`: what the profiler costs, measured side by side with
//! what operators would use instead (issue 6).
//!
//! - `overhead`: a fixed amount of CPU-bound work on every CPU (C with shallow
//!   and deep stacks, Go, a syscall-heavy C loop), timed with no profiler, the
//!   agent at 19 and 99 Hz, `perf record -F 99 -a -g` and bcc's `profile` (when
//!   it works here). The cases run interleaved (A B C A B C ...) so a drift of
//!   the machine hits every case alike; medians and ratios to the unprofiled
//!   run are reported.
//! - `kernel-cost`: with `kernel.bpf_stats_enabled=1`, the kernel's own
//!   run_time_ns / run_cnt of the agent's perf_event program while workloads
//!   with about 5, 30 and 120 frames run on every CPU.
//!
//! The full run writes `docs/benchmarks.md`; `--quick` and `--only` write
//! `target/bench/report.md` instead, so a smoke run never replaces the report.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{apt_install, cargo, output, setup, step, succeeds, workspace_root};

/// The benchmarks `--only` can name.
const BENCHMARKS: [&str; 2] = ["overhead", "kernel-cost"];

/// Sizes of one run: full, or the `--quick` smoke variant.
struct Plan {
    /// Rounds of the interleaved cases.
    rounds: usize,
    /// Work per process, as a fraction of the full size (~3 s on this class
    /// of machine).
    scale: f64,
    /// How long each stack depth is sampled for the kernel cost.
    cost_seconds: u64,
}

pub fn bench(quick: bool, only: Option<&str>) -> Result<()> {
    if let Some(name) = only {
        if !BENCHMARKS.contains(&name) {
            bail!("no benchmark {name:?}; there are {}", BENCHMARKS.join(", "));
        }
    }
    if !super::is_root() {
        bail!("the benchmarks load eBPF programs and run perf -a: run `cargo xtask bench` as root");
    }
    let started = Instant::now();
    let plan = if quick {
        Plan {
            rounds: 1,
            scale: 0.1,
            cost_seconds: 2,
        }
    } else {
        Plan {
            rounds: 5,
            scale: 1.0,
            cost_seconds: 10,
        }
    };
    setup()?;
    if !succeeds("sh", &["-c", "command -v perf && perf --version"]) {
        apt_install(&["linux-perf"])?;
    }
    if !succeeds("sh", &["-c", "command -v bpftool"]) {
        apt_install(&["bpftool"])?;
    }
    step("building the agent (release)");
    cargo(&["build", "--release", "-p", "profiler-agent"])?;
    let root = workspace_root();
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir)?;
    let bins = build_workloads(&root, &dir)?;
    let agent = root.join("target/release/profiler-agent");

    let mut report = String::new();
    let run = |name: &str| only.is_none_or(|o| o == name);
    if run("overhead") {
        report += &overhead(&plan, &agent, &bins, &dir)?;
    }
    if run("kernel-cost") {
        report += &kernel_cost(&plan, &agent, &bins, &dir)?;
    }

    let mut command = String::from("cargo xtask bench");
    if quick {
        command += " --quick";
    }
    if let Some(o) = only {
        command += &format!(" --only {o}");
    }
    report += "\n## Not measured yet\n\n\
        Agent footprint (CPU and peak RSS with ~200 processes, start-up time), \
        symbolization rate, collector ingest and query latency: issue 6, parts 3-5. \
        Their targets are neither met nor missed until then.\n";
    let doc = format!(
        "{}{report}\nThe whole run took {:.0} s.\n",
        header(&command),
        started.elapsed().as_secs_f64()
    );
    let path = if quick || only.is_some() {
        dir.join("report.md")
    } else {
        root.join("docs/benchmarks.md")
    };
    fs::write(&path, doc).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "benchmarks done in {:.0} s: report in {}",
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

/// The compiled workloads.
struct Workloads {
    /// `work DEPTH MILLIONS`: recursion to DEPTH, then an LCG loop.
    work: PathBuf,
    /// `sys THOUSANDS`: 4 KiB read + write pairs.
    sys: PathBuf,
    /// `gowork MILLIONS`.
    gowork: PathBuf,
}

fn build_workloads(root: &Path, dir: &Path) -> Result<Workloads> {
    step("building the benchmark workloads (xtask/workloads/)");
    let src = root.join("xtask/workloads");
    let bins = Workloads {
        work: dir.join("work"),
        sys: dir.join("sys"),
        gowork: dir.join("gowork"),
    };
    for (c, bin) in [("work.c", &bins.work), ("sys.c", &bins.sys)] {
        super::status(
            Command::new("gcc")
                .args(["-O0", "-fno-omit-frame-pointer", "-o"])
                .arg(bin)
                .arg(src.join(c)),
        )?;
    }
    super::status(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&bins.gowork)
            .arg(src.join("gowork.go")),
    )?;
    Ok(bins)
}

/// Describes the machine and how to reproduce the figures.
fn header(command: &str) -> String {
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
    // Other work on the machine skews wall times: say how busy it was.
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "# Benchmarks\n\n\
         What the profiler costs the machine it profiles, next to the tools an operator \
         would otherwise use. Produced by `{command}` (as root; about 10-15 minutes on \
         2 cores; needs the machine otherwise idle) from commit {commit}.\n\n\
         | machine | |\n|---|---|\n\
         | CPU | {cpu} |\n| cores | {cores} |\n| RAM | {mem_gib:.1} GiB |\n\
         | kernel | {kernel} |\n| system | {distro} |\n| perf | {perf} |\n| date | {date} |\n\
         | load average at the end (1, 5, 15 min) | {load} |\n\n\
         Perf events here are software only (`cpu-clock`): the VM has no PMU.\n",
        kernel = kernel.trim(),
        perf = perf.trim(),
        date = date.trim(),
        commit = commit.trim(),
        cores = cores(),
        load = load.join(" "),
    )
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Waits for `pid` and returns its CPU time (user + system) in seconds, from
/// wait4's rusage: the child's own figure, not the parent's running total.
fn wait_cpu(child: Child) -> Result<(std::process::ExitStatus, f64)> {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `child` is not waited on again.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4({pid}): {}", std::io::Error::last_os_error());
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        std::process::ExitStatus::from_raw(status),
        secs(usage.ru_utime) + secs(usage.ru_stime),
    ))
}

/// A profiler running in the background during a run.
struct Running {
    child: Child,
}

impl Running {
    /// Stops it with SIGINT (so it writes its output, outside the timed
    /// window) and returns its CPU seconds.
    fn stop(self) -> Result<f64> {
        use std::os::unix::process::ExitStatusExt;
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let (st, cpu) = wait_cpu(self.child)?;
        // perf re-raises SIGINT on itself once its file is written.
        if !st.success() && st.signal() != Some(libc::SIGINT) {
            bail!("the profiler exited with {st}");
        }
        Ok(cpu)
    }
}

/// One way to run a workload: with no profiler, or under one.
#[derive(Clone)]
enum Case {
    None,
    Agent(u64),
    Perf,
    Bcc(PathBuf),
}

impl Case {
    fn name(&self) -> String {
        match self {
            Case::None => "no profiler".into(),
            Case::Agent(hz) => format!("agent `record` {hz} Hz"),
            Case::Perf => "`perf record -F 99 -a -g`".into(),
            Case::Bcc(_) => "bcc `profile -F 99 -a`".into(),
        }
    }

    fn start(&self, agent: &Path, dir: &Path) -> Result<Option<Running>> {
        let log = |name: &str| -> Result<Stdio> { Ok(fs::File::create(dir.join(name))?.into()) };
        let child = match self {
            Case::None => return Ok(None),
            Case::Agent(hz) => {
                let before = bpf_progs()?;
                let child = Command::new(agent)
                    .args(["record", "--no-progress", "-F", &hz.to_string(), "-o"])
                    .arg(dir.join("agent.svg"))
                    .stdout(log("agent.log")?)
                    .stderr(log("agent.err")?)
                    .spawn()
                    .context("cannot start the agent")?;
                let mut running = Running { child };
                wait_for_agent(&mut running.child, &before)?;
                return Ok(Some(running));
            }
            Case::Perf => Command::new("perf")
                .args(["record", "-q", "-F", "99", "-a", "-g", "-o"])
                .arg(dir.join("perf.data"))
                .stdout(log("perf.log")?)
                .stderr(log("perf.err")?)
                .spawn()
                .context("cannot start perf")?,
            Case::Bcc(tool) => Command::new(tool)
                .args(["-F", "99", "-a", "-f"])
                .stdout(log("bcc.out")?)
                .stderr(log("bcc.err")?)
                .spawn()
                .context("cannot start bcc's profile")?,
        };
        // perf opens its events within milliseconds; bcc compiles first.
        let settle = if matches!(self, Case::Bcc(_)) {
            8000
        } else {
            1000
        };
        std::thread::sleep(Duration::from_millis(settle));
        Ok(Some(Running { child }))
    }
}

/// A perf_event program loaded in the kernel: id, name, run time and count
/// (the last two only with kernel.bpf_stats_enabled=1).
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProgStats {
    id: u64,
    run_time_ns: u64,
    run_cnt: u64,
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
                run_time_ns: field("run_time_ns").unwrap_or(0),
                run_cnt: field("run_cnt").unwrap_or(0),
            });
        }
    }
    Ok(progs)
}

/// Waits until the agent's program is loaded (a new `profile` program) and
/// returns its id; attaching follows loading within milliseconds.
fn wait_for_agent(child: &mut Child, before: &[ProgStats]) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait()? {
            bail!("the agent exited ({st}) before sampling: see target/bench/agent.err");
        }
        if let Some(p) = bpf_progs()?
            .into_iter()
            .filter(|p| before.iter().all(|b| b.id != p.id))
            .max_by_key(|p| p.id)
        {
            // Loaded; give the perf events a moment to be attached on every CPU.
            std::thread::sleep(Duration::from_millis(300));
            return Ok(p.id);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the agent did not load its eBPF program within 20 s")
}

/// A workload: one process per CPU, each doing a fixed amount of work.
struct Workload {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
}

/// Runs one process of `w` per CPU; returns wall seconds (first start to
/// last exit) and their CPU seconds summed.
fn run_workload(w: &Workload) -> Result<(f64, f64)> {
    let started = Instant::now();
    let children = (0..cores())
        .map(|_| {
            Command::new(&w.program)
                .args(&w.args)
                .spawn()
                .with_context(|| format!("cannot start {}", w.program.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut cpu = 0.0;
    for child in children {
        let (st, c) = wait_cpu(child)?;
        if !st.success() {
            bail!("workload {} failed: {st}", w.name);
        }
        cpu += c;
    }
    Ok((started.elapsed().as_secs_f64(), cpu))
}

/// bcc's `profile`, if it is installed (or installable) and works here;
/// otherwise why not.
fn bcc_profile(dir: &Path) -> std::result::Result<PathBuf, String> {
    let tool = PathBuf::from("/usr/sbin/profile-bpfcc");
    if !tool.exists() {
        apt_install(&["bpfcc-tools"])
            .map_err(|e| format!("`bpfcc-tools` did not install: {e:#}"))?;
    }
    let probe = Command::new(&tool)
        .args(["-F", "99", "-a", "-f", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", tool.display()))?;
    if probe.status.success() {
        return Ok(tool);
    }
    let err = String::from_utf8_lossy(&probe.stderr);
    let _ = fs::write(dir.join("bcc-probe.err"), err.as_bytes());
    let why: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("No such file") || l.starts_with("Exception"))
        .collect();
    Err(format!(
        "`profile-bpfcc` (Debian bpfcc-tools) installs but does not work on this kernel: {}",
        why.join("; ")
    ))
}

fn overhead(plan: &Plan, agent: &Path, bins: &Workloads, dir: &Path) -> Result<String> {
    let size = |full: f64| ((full * plan.scale) as u64).max(1).to_string();
    let workloads = [
        Workload {
            name: "C, shallow stack (~5 frames)",
            program: bins.work.clone(),
            args: vec!["2".into(), size(3000.0)],
        },
        Workload {
            name: "C, deep stack (~100 frames)",
            program: bins.work.clone(),
            args: vec!["96".into(), size(3000.0)],
        },
        Workload {
            name: "Go",
            program: bins.gowork.clone(),
            args: vec![size(5500.0)],
        },
        Workload {
            name: "C, syscall-heavy (4 KiB read+write)",
            program: bins.sys.clone(),
            args: vec![size(9000.0)],
        },
    ];
    let mut cases = vec![Case::None, Case::Agent(19), Case::Agent(99), Case::Perf];
    let bcc_note = match bcc_profile(dir) {
        Ok(tool) => {
            cases.push(Case::Bcc(tool));
            None
        }
        Err(why) => Some(why),
    };

    let mut out = String::new();
    writeln!(
        out,
        "\n## 1. Overhead on a workload\n\n\
         One process per CPU ({cores} here), each doing a fixed amount of work (not a fixed \
         time), so whatever a profiler takes from the workload shows as longer wall time. \
         The cases run interleaved, {rounds} round(s) of every case in turn; the figures are \
         medians. *Wall* is first start to last exit of the workload processes, *CPU* their \
         user + system time (wait4), *profiler CPU* what the profiler itself used during the \
         run (its start-up and the writing of its output at exit included). The agent runs \
         `profiler-agent record -F HZ` (whole host, flame graph at exit); perf writes \
         `perf.data`. Workloads: `xtask/workloads/`, built with `-O0 -fno-omit-frame-pointer`.\n",
        cores = cores(),
        rounds = plan.rounds,
    )?;
    if let Some(why) = &bcc_note {
        writeln!(out, "bcc's `profile` is not measured: {why}.\n")?;
    }
    writeln!(
        out,
        "| workload | case | wall (s) | wall vs none | CPU (s) | CPU vs none | profiler CPU (s) |\n\
         |---|---|---:|---:|---:|---:|---:|"
    )?;
    let mut summary = Vec::new();
    // The share of the CPUs the unprofiled workloads got: well below 1, other
    // work on the machine, not the profiler, decides the wall times.
    let mut share: f64 = 1.0;
    for w in &workloads {
        // times[case] = (wall, cpu, profiler cpu) per round
        let mut times: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); cases.len()];
        for round in 0..plan.rounds {
            for (i, case) in cases.iter().enumerate() {
                step(&format!(
                    "overhead: {} / {} (round {}/{})",
                    w.name,
                    case.name(),
                    round + 1,
                    plan.rounds
                ));
                let running = case.start(agent, dir)?;
                let result = run_workload(w);
                let prof_cpu = match running {
                    Some(r) => r.stop()?,
                    None => 0.0,
                };
                let (wall, cpu) = result?;
                eprintln!("    wall {wall:.3} s, CPU {cpu:.3} s, profiler CPU {prof_cpu:.3} s");
                times[i].push((wall, cpu, prof_cpu));
            }
        }
        let med = |i: usize, f: fn(&(f64, f64, f64)) -> f64| {
            median(&times[i].iter().map(f).collect::<Vec<_>>())
        };
        let (base_wall, base_cpu) = (med(0, |t| t.0), med(0, |t| t.1));
        share = share.min(base_cpu / (cores() as f64 * base_wall));
        for (i, case) in cases.iter().enumerate() {
            let (wall, cpu, prof) = (med(i, |t| t.0), med(i, |t| t.1), med(i, |t| t.2));
            let pct = |x: f64, base: f64| format!("{:+.2} %", (x / base - 1.0) * 100.0);
            let (wr, cr) = if i == 0 {
                ("—".to_string(), "—".to_string())
            } else {
                (pct(wall, base_wall), pct(cpu, base_cpu))
            };
            let prof = if i == 0 {
                "—".to_string()
            } else {
                format!("{prof:.3}")
            };
            writeln!(
                out,
                "| {} | {} | {wall:.3} | {wr} | {cpu:.3} | {cr} | {prof} |",
                w.name,
                case.name()
            )?;
            summary.push((
                w.name,
                case.clone(),
                wall / base_wall - 1.0,
                cpu / base_cpu - 1.0,
            ));
        }
    }
    // The target: slowdown with the agent at 99 Hz <= 0.5 % and below perf's.
    let worst = |pred: &dyn Fn(&Case) -> bool| {
        summary
            .iter()
            .filter(|(_, c, _, _)| pred(c))
            .map(|(n, _, s, _)| (*n, *s))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    };
    let worst_cpu = |pred: &dyn Fn(&Case) -> bool| {
        summary
            .iter()
            .filter(|(_, c, _, _)| pred(c))
            .map(|(_, _, _, s)| *s)
            .fold(f64::NEG_INFINITY, f64::max)
    };
    if let (Some((an, a)), Some((pn, p))) = (
        worst(&|c| matches!(c, Case::Agent(99))),
        worst(&|c| matches!(c, Case::Perf)),
    ) {
        let verdict = if a <= 0.005 && a < p {
            "**met**".to_string()
        } else if a > 0.005 {
            format!("**missed** by {:.2} percentage points", (a - 0.005) * 100.0)
        } else {
            "**missed**: within 0.5 % but not below perf".to_string()
        };
        writeln!(
            out,
            "\nTarget: workload slowdown with the agent at 99 Hz ≤ 0.5 % and lower than \
             `perf record -g` at 99 Hz. Worst wall-time slowdown with the agent at 99 Hz: \
             {:+.2} % ({an}); with perf: {:+.2} % ({pn}). {verdict}. Differences below about \
             half a percent are within the run-to-run noise of a shared VM; compare the \
             rounds in the log before reading much into them.",
            a * 100.0,
            p * 100.0,
        )?;
        writeln!(
            out,
            "\nWorst workload CPU-time growth (less sensitive to other load than wall time): \
             agent at 99 Hz {:+.2} %, perf {:+.2} %.",
            worst_cpu(&|c| matches!(c, Case::Agent(99))) * 100.0,
            worst_cpu(&|c| matches!(c, Case::Perf)) * 100.0,
        )?;
    }
    if share < 0.9 {
        writeln!(
            out,
            "\n**The machine was busy during this run**: unprofiled, the workloads got only \
             {:.0} % of the CPUs, so other work, not the profilers, decided the wall times and \
             the wall-time ratios above (and the verdict drawn from them) are noise. Re-run on \
             an otherwise idle machine for a verdict.",
            share * 100.0
        )?;
    }
    Ok(out)
}

/// Restores kernel.bpf_stats_enabled when dropped.
struct BpfStats {
    old: String,
}

impl BpfStats {
    fn enable() -> Result<Self> {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let old = fs::read_to_string(path).context("cannot read kernel.bpf_stats_enabled")?;
        fs::write(path, "1").context("cannot set kernel.bpf_stats_enabled=1")?;
        Ok(BpfStats {
            old: old.trim().to_string(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.old);
    }
}

/// Frames per sample of the `work` processes in the agent's folded output:
/// the median over samples (the process name is the first field).
fn folded_depth(path: &Path) -> Option<usize> {
    let text = fs::read_to_string(path).ok()?;
    let mut depths: Vec<(usize, u64)> = text
        .lines()
        .filter_map(|l| {
            let (stack, count) = l.rsplit_once(' ')?;
            let mut frames = stack.split(';');
            (frames.next()? == "work").then(|| (frames.count(), count.parse().unwrap_or(0)))
        })
        .collect();
    depths.sort();
    let total: u64 = depths.iter().map(|d| d.1).sum();
    let mut seen = 0;
    for (d, c) in depths {
        seen += c;
        if seen * 2 >= total {
            return Some(d);
        }
    }
    None
}

fn kernel_cost(plan: &Plan, agent: &Path, bins: &Workloads, dir: &Path) -> Result<String> {
    let stats = BpfStats::enable()?;
    let mut out = String::new();
    writeln!(
        out,
        "\n## 2. Cost per sample in the kernel\n\n\
         With `kernel.bpf_stats_enabled=1` (restored afterwards) the kernel counts the time \
         spent in each eBPF program. The agent (`record -F 99`) samples while one process per \
         CPU recurses to a given depth and spins at the leaf; the figure is the growth of the \
         program's run_time_ns divided by that of run_cnt over {secs} s, read with `bpftool \
         prog show` after the workloads started. *Frames* is the median stack length of the \
         workload's samples in the agent's folded output (process name not counted).\n\n\
         | recursion depth | frames | samples | mean ns/sample |\n|---:|---:|---:|---:|",
        secs = plan.cost_seconds
    )?;
    let mut at_30 = None;
    for depth in [2u32, 27, 117] {
        step(&format!("kernel cost: stack depth {depth}"));
        let before = bpf_progs()?;
        let folded = dir.join("cost.folded");
        let _ = fs::remove_file(&folded);
        let mut child = Command::new(agent)
            .args(["record", "--no-progress", "-F", "99", "-o"])
            .arg(dir.join("cost.svg"))
            .arg("--folded")
            .arg(&folded)
            .stdout(fs::File::create(dir.join("agent.log"))?)
            .stderr(fs::File::create(dir.join("agent.err"))?)
            .spawn()
            .context("cannot start the agent")?;
        let id = wait_for_agent(&mut child, &before)?;
        let agent = Running { child };
        let workers = (0..cores())
            .map(|_| {
                Command::new(&bins.work)
                    .args([depth.to_string(), "0".into()])
                    .spawn()
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        std::thread::sleep(Duration::from_millis(500));
        let find = || -> Result<ProgStats> {
            bpf_progs()?
                .into_iter()
                .find(|p| p.id == id)
                .context("the agent's program disappeared")
        };
        let a = find()?;
        std::thread::sleep(Duration::from_secs(plan.cost_seconds));
        let b = find()?;
        for mut w in workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        agent.stop()?;
        let (ns, cnt) = (b.run_time_ns - a.run_time_ns, b.run_cnt - a.run_cnt);
        let mean = ns as f64 / cnt.max(1) as f64;
        let frames = folded_depth(&folded).map_or("?".to_string(), |d| d.to_string());
        eprintln!("    {cnt} samples, {mean:.0} ns each, {frames} frames");
        writeln!(out, "| {depth} | {frames} | {cnt} | {mean:.0} |")?;
        if depth == 27 {
            at_30 = Some(mean);
        }
    }
    drop(stats);
    if let Some(m) = at_30 {
        let verdict = if m <= 2000.0 {
            "**met**".to_string()
        } else {
            format!("**missed** by {:.0} ns", m - 2000.0)
        };
        writeln!(
            out,
            "\nTarget: ≤ 2 µs mean at 30 frames. Measured {:.2} µs: {verdict}.",
            m / 1000.0
        )?;
    }
    Ok(out)
}
