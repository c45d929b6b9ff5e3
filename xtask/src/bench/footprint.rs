//! `footprint` and `startup`: what the always-on agent itself costs.
//!
//! - `footprint`: a busy host — both CPUs taken by C and Go workloads — with
//!   about 200 long-lived processes of a dozen executables (spinning C and
//!   Go copies, C daemons that wake periodically, shell loops, python3) and
//!   short-lived C, Go and `sh -c` processes spawned continuously. The agent
//!   (`run`, sending to a local collector) profiles it at 19 Hz, then at
//!   99 Hz; its CPU time comes from /proc/PID/stat, its peak RSS from VmHWM
//!   read just before it is stopped, and what it saw from its /metrics and
//!   from the pids and process names the collector received.
//! - `startup`: fork + exec of the agent to the line it logs once its
//!   program is attached on every CPU, on an otherwise idle host.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};

use super::{
    bpf_progs_all, http_get, median, output, overhead::BpfStats, step, AgentRun, Ctx, Figures,
};

/// Processes started for the benchmark, each in its own process group (with
/// whatever it spawns); all killed when dropped.
struct Fleet {
    children: Vec<Child>,
    /// Executable names the agent should report.
    names: Vec<String>,
    /// What runs, for the report: (count, what).
    composition: Vec<(usize, String)>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &self.children {
            // SAFETY: plain kill(2) of the process group our child leads.
            unsafe { libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL) };
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

/// The name of a run's agent output files in target/bench.
fn run_name(hz: u64, off_cpu: bool) -> String {
    let mode = if off_cpu { "" } else { "-no-off-cpu" };
    format!("footprint-{hz}hz{mode}")
}

impl Fleet {
    fn spawn(&mut self, program: &Path, args: &[&str]) -> Result<()> {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        self.children.push(child);
        Ok(())
    }

    /// Starts about `size` long-lived processes and the spawners of
    /// short-lived ones.
    fn start(ctx: &Ctx, size: usize) -> Result<Fleet> {
        let bins = ctx.bins();
        let fleet_dir = ctx.dir.join("fleet");
        let _ = fs::remove_dir_all(&fleet_dir);
        fs::create_dir_all(&fleet_dir)?;
        // Copies under other names: other executables to the agent (each one
        // opened and symbolized on its own), other process names.
        let copy = |from: &Path, name: &str| -> Result<PathBuf> {
            let to = fleet_dir.join(name);
            fs::copy(from, &to).with_context(|| format!("cannot copy {}", from.display()))?;
            Ok(to)
        };
        let busy_c = copy(&bins.work, "busy-c")?;
        let busy_go = copy(&bins.gowork, "busy-go")?;
        let short_c = copy(&bins.work, "short-c")?;
        let short_go = copy(&bins.gowork, "short-go")?;
        let ticks = (0..8)
            .map(|i| copy(&bins.tick, &format!("tick-{i}")))
            .collect::<Result<Vec<_>>>()?;
        // python3 is often a wrapper (pyenv): run the interpreter itself.
        let python = output("python3", &["-c", "import sys; print(sys.executable)"])
            .map(|p| PathBuf::from(p.trim()))
            .filter(|p| p.is_file());

        let mut fleet = Fleet {
            children: Vec::new(),
            names: vec![
                "busy-c".into(),
                "busy-go".into(),
                "short-c".into(),
                "short-go".into(),
                "sh".into(),
            ],
            composition: Vec::new(),
        };
        fleet
            .names
            .extend((0..ticks.len()).map(|i| format!("tick-{i}")));
        // Both CPUs busy: two C processes (6 and 30 frames) and two Go ones.
        fleet.spawn(&busy_c, &["6", "0"])?;
        fleet.spawn(&busy_c, &["30", "0"])?;
        fleet.spawn(&busy_go, &["-calls", "500000000"])?;
        fleet.spawn(&busy_go, &["-calls", "500000000"])?;
        fleet.composition.push((
            4,
            "spinning: `busy-c` 6 and 30 frames deep, `busy-go` twice".into(),
        ));
        let sh = Path::new("/bin/sh");
        // Spawners: a short C run, a short Go run, `sh -c`, a sleep, about 15
        // new processes a second each.
        let spawners = if size >= 100 { 2 } else { 1 };
        let script = format!(
            "while :; do {c} 3 2; {go} -calls 1; sh -c ':'; sleep 0.25; done",
            c = short_c.display(),
            go = short_go.display()
        );
        for _ in 0..spawners {
            fleet.spawn(sh, &["-c", &script])?;
        }
        fleet.composition.push((
            spawners,
            "`sh` spawners, each looping over `short-c 3 2` (~2 ms of C), `short-go 2` \
             (~1 ms of Go), `sh -c ':'` and `sleep 0.25`"
                .into(),
        ));
        // Shell loops: some arithmetic, then `sleep 2` (a new process too).
        let loops = size / 12;
        for _ in 0..loops {
            fleet.spawn(
                sh,
                &[
                    "-c",
                    "while :; do i=0; while [ $i -lt 300 ]; do i=$((i+1)); done; sleep 2; done",
                ],
            )?;
        }
        fleet.composition.push((
            loops,
            "`sh` loops: 300 rounds of shell arithmetic, then `sleep 2`".into(),
        ));
        let pythons = if python.is_some() { size / 25 } else { 0 };
        if let Some(py) = &python {
            fleet.names.push("python".into());
            for _ in 0..pythons {
                fleet.spawn(
                    py,
                    &[
                        "-c",
                        "import time\nwhile True:\n    sum(i * i for i in range(20000))\n    time.sleep(0.5)",
                    ],
                )?;
            }
            fleet.composition.push((
                pythons,
                "python3 loops: a sum over 20,000 squares, then `time.sleep(0.5)`".into(),
            ));
        }
        // The rest: C daemons waking every 200-1000 ms for ~2 ms of work.
        let rest = size.saturating_sub(fleet.children.len());
        for i in 0..rest {
            let period = (200 + (i * 97) % 800).to_string();
            fleet.spawn(&ticks[i % ticks.len()], &[&period, "2000"])?;
        }
        fleet.composition.push((
            rest,
            "C daemons of 8 executables (`tick-0`..`tick-7`, copies of \
             `xtask/workloads/tick.c`) waking every 200-1000 ms for ~2 ms of work, 3 frames deep"
                .into(),
        ));
        Ok(fleet)
    }
}

/// The collector the agent sends to, on free loopback ports; stopped when
/// dropped.
struct Collector {
    child: Child,
    http: String,
    grpc: String,
    db_dir: PathBuf,
}

impl Collector {
    fn start(ctx: &Ctx) -> Result<Collector> {
        let db_dir = ctx.dir.join("footprint-store");
        let _ = fs::remove_dir_all(&db_dir);
        fs::create_dir_all(&db_dir)?;
        // Port 0: the collector binds its ports itself and announces them in
        // its log, which is read back below.
        let err_path = ctx.dir.join("footprint-collector.err");
        let child = Command::new(&ctx.collector)
            .arg("--store")
            .arg(format!("sqlite:{}", db_dir.join("profiles.db").display()))
            .args([
                "--plaintext",
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "warn,profiler_collector=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(fs::File::create(ctx.dir.join("footprint-collector.log"))?)
            .stderr(fs::File::create(&err_path)?)
            .spawn()
            .with_context(|| format!("cannot start {}", ctx.collector.display()))?;
        let mut c = Collector {
            child,
            http: String::new(),
            grpc: String::new(),
            db_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let (grpc, http) = loop {
            let log = fs::read_to_string(&err_path).unwrap_or_default();
            if let Some(addrs) = log.lines().find_map(profiler_testkit::net::serving_addrs) {
                break addrs;
            }
            if let Some(st) = c.child.try_wait()? {
                bail!("the collector exited ({st}): see {}", err_path.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "the collector did not announce its addresses within 20 s: see {}",
                    err_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        c.grpc = grpc.to_string();
        c.http = http.to_string();
        Ok(c)
    }

    /// Distinct values of a label in windows ending in (start, end].
    fn label_values(&self, label: &str, start: u64, end: u64) -> Result<Vec<String>> {
        let body = http_get(
            &self.http,
            &format!("/api/v1/labels/{label}/values?start={start}&end={end}"),
        )?;
        Ok(json_strings(&body))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.db_dir);
    }
}

/// The strings of a JSON array of strings (escapes kept as they are: only
/// counted and compared).
fn json_strings(json: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = json.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut s = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    s.push(c);
                    if let Some(n) = chars.next() {
                        s.push(n);
                    }
                }
                '"' => break,
                _ => s.push(c),
            }
        }
        out.push(s);
    }
    out
}

/// A metric of the agent's /metrics, summed over its label sets.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (key, value) = line.rsplit_once(' ')?;
        let key = key.split('{').next().unwrap_or(key);
        if key == name {
            let v: f64 = value.parse().ok()?;
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// User + system CPU seconds of a process (all its threads).
pub(crate) fn proc_cpu(pid: libc::pid_t) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `after` starts at field 3.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11) + ticks(12)) / hz)
}

/// A `kB` field of /proc/PID/status (VmHWM, VmRSS), in MiB.
fn proc_status_mib(pid: libc::pid_t, field: &str) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Busy and total jiffies of all CPUs, and processes forked since boot.
/// Host totals from /proc/stat: busy and all CPU ticks, processes forked,
/// context switches.
fn host_counters() -> (u64, u64, u64, u64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut busy = 0;
    let mut total = 0;
    let mut forks = 0;
    let mut switches = 0;
    for line in stat.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("cpu") => {
                let v: Vec<u64> = words.filter_map(|w| w.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal (guest is in user)
                total = v.iter().take(8).sum();
                busy = total - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0);
            }
            Some("processes") => forks = words.next().and_then(|w| w.parse().ok()).unwrap_or(0),
            Some("ctxt") => switches = words.next().and_then(|w| w.parse().ok()).unwrap_or(0),
            _ => {}
        }
    }
    (busy, total, forks, switches)
}

fn count_processes() -> usize {
    fs::read_dir("/proc").map_or(0, |d| {
        d.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .count()
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One footprint run of the agent at one frequency.
struct Run {
    hz: u64,
    /// Off-CPU recording on (`run`'s default).
    off_cpu: bool,
    attach_ms: f64,
    /// CPU seconds from attached to the end of the window.
    cpu: f64,
    /// Run time of the agent's eBPF programs over the same time (`bpf_stats`), s.
    kernel: f64,
    secs: f64,
    /// CPU seconds of the whole process life (start-up and shutdown too).
    cpu_total: f64,
    hwm_mib: f64,
    rss_mib: f64,
    host_busy: f64,
    forks_per_s: f64,
    switches_per_s: f64,
    processes: usize,
    agent_pids: Option<f64>,
    agent_binaries: Option<f64>,
    samples: Option<f64>,
    batches_acked: Option<f64>,
    shed: Option<f64>,
    seen: Option<u64>,
    pids: usize,
    names: BTreeSet<String>,
}

fn footprint_run(ctx: &Ctx, collector: &Collector, hz: u64, off_cpu: bool) -> Result<Run> {
    let secs = ctx.plan.footprint_seconds;
    let mode = if off_cpu { "" } else { " --no-off-cpu" };
    step(&format!(
        "footprint: agent `run{mode}` at {hz} Hz for {secs} s on the busy host"
    ));
    // The agent binds its metrics port itself: it is held until just before.
    let metrics_port = profiler_testkit::net::Reserved::new();
    let metrics_addr = metrics_port.addr().to_string();
    let mut args: Vec<String> = [
        "run",
        "--no-progress",
        "--no-kube",
        "--plaintext",
        "-F",
        &hz.to_string(),
        "--collector",
        &format!("http://{}", collector.grpc),
        "--metrics-listen",
        &metrics_addr,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !off_cpu {
        args.push("--no-off-cpu".into());
    }
    if ctx.plan.quick {
        // A few windows even in a short run.
        args.extend(["--drain-interval".into(), "1s".into()]);
    }
    let start_unix = unix_now();
    let name = run_name(hz, off_cpu);
    metrics_port.release();
    let before: Vec<u64> = bpf_progs_all()?.iter().map(|p| p.id).collect();
    let agent = AgentRun::start(&ctx.agent, &args, &ctx.dir, &name)?;
    let pid = agent.pid();
    // The agent's programs: those loaded since it started.
    let ours: Vec<u64> = bpf_progs_all()?
        .iter()
        .map(|p| p.id)
        .filter(|id| !before.contains(id))
        .collect();
    let kernel_ns = || -> Result<u64> {
        Ok(bpf_progs_all()?
            .iter()
            .filter(|p| ours.contains(&p.id))
            .map(|p| p.run_time_ns)
            .sum())
    };
    let kernel0 = kernel_ns()?;
    let (busy0, total0, forks0, switches0) = host_counters();
    let cpu0 = proc_cpu(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let cpu1 = proc_cpu(pid)?;
    let kernel1 = kernel_ns()?;
    let elapsed = t0.elapsed().as_secs_f64();
    let (busy1, total1, forks1, switches1) = host_counters();
    let processes = count_processes();
    let hwm_mib = proc_status_mib(pid, "VmHWM")?;
    let rss_mib = proc_status_mib(pid, "VmRSS")?;
    let metrics = http_get(&metrics_addr, "/metrics")
        .map_err(|e| eprintln!("    cannot read the agent's /metrics: {e:#}"))
        .unwrap_or_default();
    let m = |n: &str| metric(&metrics, &format!("profiler_agent_{n}"));
    let attach_ms = agent.attach.as_secs_f64() * 1000.0;
    let cpu_total = agent.stop()?;
    let summary = fs::read_to_string(ctx.dir.join(format!("{name}.out"))).unwrap_or_default();
    // "... (N distinct stacks, M processes seen)."
    let seen = summary
        .split(" processes seen")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok());
    let end_unix = unix_now() + 1;
    let pids = collector.label_values("pid", start_unix, end_unix)?.len();
    let names: BTreeSet<String> = collector
        .label_values("process", start_unix, end_unix)?
        .into_iter()
        .collect();
    let run = Run {
        hz,
        off_cpu,
        attach_ms,
        cpu: cpu1 - cpu0,
        kernel: (kernel1 - kernel0) as f64 / 1e9,
        secs: elapsed,
        cpu_total,
        hwm_mib,
        rss_mib,
        host_busy: (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64,
        forks_per_s: (forks1 - forks0) as f64 / elapsed,
        switches_per_s: (switches1 - switches0) as f64 / elapsed,
        processes,
        agent_pids: m("process_cache_processes"),
        agent_binaries: m("process_cache_binaries"),
        samples: m("samples_total"),
        batches_acked: m("export_batches_acked_total"),
        shed: m("memory_shed_total"),
        seen,
        pids,
        names,
    };
    eprintln!(
        "    CPU {:.3} s in {:.0} s ({:.3} % of a core), VmHWM {:.1} MiB, {} pids and {} process names at the collector",
        run.cpu,
        run.secs,
        run.cpu / run.secs * 100.0,
        run.hwm_mib,
        run.pids,
        run.names.len()
    );
    Ok(run)
}

pub(crate) fn footprint(ctx: &Ctx, figures: &mut Figures) -> Result<String> {
    let plan = &ctx.plan;
    step(&format!(
        "footprint: starting the collector and ~{} processes",
        plan.fleet_size
    ));
    let collector = Collector::start(ctx)?;
    let fleet = Fleet::start(ctx, plan.fleet_size)?;
    let long_lived = fleet.children.len();
    let composition = fleet.composition.clone();
    // Let the fleet start and settle into its rhythm.
    std::thread::sleep(Duration::from_secs(2));
    let mut runs = Vec::new();
    let _stats = BpfStats::enable()?;
    // `run` as deployed (off-CPU recording on), the same without it (what
    // off-CPU recording adds), and at 99 Hz.
    for (hz, off_cpu) in [(19, true), (19, false), (99, true)] {
        runs.push(footprint_run(ctx, &collector, hz, off_cpu)?);
    }
    let names = fleet.names.clone();
    drop(fleet);
    drop(collector);
    let _ = fs::remove_dir_all(ctx.dir.join("fleet"));

    for r in &runs {
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !r.names.iter().any(|s| s.starts_with(n.as_str())))
            .collect();
        if r.pids == 0 || missing.iter().any(|n| n.starts_with("busy")) {
            bail!(
                "footprint at {} Hz: the collector got {} pids and lacks {missing:?}: the agent \
                 did not see the busy host (see target/bench/{}.err)",
                r.hz,
                r.pids,
                run_name(r.hz, r.off_cpu)
            );
        }
    }

    let mut out = String::new();
    writeln!(
        out,
        "\n## 3. Agent footprint on a busy host\n\n\
         {long_lived} long-lived processes keep both CPUs busy and the agent's process and \
         binary caches full; the spawners add short-lived processes continuously:\n\n{list}\n\
         The agent runs as it would always on: `profiler-agent run -F HZ --no-kube \
         --metrics-listen ...` sending every window ({window}) to a local collector \
         (`--plaintext`, SQLite in target/bench), for {secs} s at 19 Hz, {secs} s at 19 Hz \
         with `--no-off-cpu` (what off-CPU recording, on by default, adds) and {secs} s at 99 Hz. \
         *Agent CPU* is the growth of utime + stime in /proc/PID/stat from the moment it logged \
         that it was attached to the end of the period (the *whole life* column adds start-up \
         and the final flush at exit, from wait4); *peak RSS* is VmHWM from /proc/PID/status \
         read just before it was stopped; *kernel programs* the run time of its eBPF programs \
         over the same period, with `kernel.bpf_stats_enabled=1` (which itself adds a little to it). *Seen* is what the agent reported: processes in its cache \
         (/metrics `process_cache_processes`), processes it took a snapshot of (its summary), \
         and the distinct `pid` and `process` label values the collector received.\n",
        list = composition
            .iter()
            .map(|(n, what)| format!("- {n} × {what}\n"))
            .collect::<String>(),
        window = if plan.quick { "1 s" } else { "10 s" },
        secs = plan.footprint_seconds,
    )?;
    writeln!(
        out,
        "| | {} |\n|---|{}",
        runs.iter()
            .map(|r| if r.off_cpu {
                format!("{} Hz", r.hz)
            } else {
                format!("{} Hz, `--no-off-cpu`", r.hz)
            })
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(runs.len())
    )?;
    let row = |out: &mut String, what: &str, f: &dyn Fn(&Run) -> String| {
        let cells: Vec<String> = runs.iter().map(f).collect();
        let _ = writeln!(out, "| {what} | {} |", cells.join(" | "));
    };
    let opt = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.0}"));
    row(&mut out, "agent CPU (s)", &|r| {
        format!("{:.3} in {:.0} s", r.cpu, r.secs)
    });
    row(&mut out, "**agent CPU, % of one core**", &|r| {
        format!("**{:.3} %**", r.cpu / r.secs * 100.0)
    });
    row(
        &mut out,
        "**kernel programs, % of one core** (`bpf_stats`)",
        &|r| format!("**{:.3} %**", r.kernel / r.secs * 100.0),
    );
    row(&mut out, "agent CPU, whole life (s)", &|r| {
        format!("{:.3}", r.cpu_total)
    });
    row(&mut out, "**peak RSS (VmHWM)**", &|r| {
        format!("**{:.1} MiB**", r.hwm_mib)
    });
    row(&mut out, "RSS at the end", &|r| {
        format!("{:.1} MiB", r.rss_mib)
    });
    row(&mut out, "memory shedding actions", &|r| opt(r.shed));
    row(&mut out, "start-up: exec to attached", &|r| {
        format!("{:.0} ms", r.attach_ms)
    });
    row(&mut out, "host CPU busy", &|r| {
        format!("{:.0} %", r.host_busy * 100.0)
    });
    row(&mut out, "processes on the host (at the end)", &|r| {
        r.processes.to_string()
    });
    row(&mut out, "new processes per second", &|r| {
        format!("{:.0}", r.forks_per_s)
    });
    row(&mut out, "context switches per second", &|r| {
        format!("{:.0}", r.switches_per_s)
    });
    row(&mut out, "samples (kernel counter)", &|r| opt(r.samples));
    row(&mut out, "batches acknowledged", &|r| opt(r.batches_acked));
    row(&mut out, "seen: processes in the agent's cache", &|r| {
        opt(r.agent_pids)
    });
    row(&mut out, "seen: binaries in the agent's cache", &|r| {
        opt(r.agent_binaries)
    });
    row(&mut out, "seen: process snapshots (summary)", &|r| {
        r.seen.map_or("?".into(), |s| s.to_string())
    });
    row(&mut out, "seen: distinct pids at the collector", &|r| {
        r.pids.to_string()
    });
    row(&mut out, "seen: process names at the collector", &|r| {
        r.names.len().to_string()
    });
    row(&mut out, "fleet executables not seen", &|r| {
        let missing: Vec<&str> = names
            .iter()
            .filter(|n| !r.names.iter().any(|s| s.starts_with(n.as_str())))
            .map(|n| n.as_str())
            .collect();
        if missing.is_empty() {
            "none".into()
        } else {
            missing.join(", ")
        }
    });

    if let Some(r19) = runs.iter().find(|r| r.hz == 19 && r.off_cpu) {
        let pct = r19.cpu / r19.secs * 100.0;
        figures.agent_cpu_19 = Some(pct);
        writeln!(
            out,
            "\nTargets: agent CPU at 19 Hz on 2 busy CPUs ≤ 0.2 % of one core: {pct:.3} %; \
             peak RSS with 200 processes ≤ 48 MiB: {:.1} MiB (highest of the runs).",
            runs.iter().map(|r| r.hwm_mib).fold(0.0, f64::max)
        )?;
    }
    let peak = runs.iter().map(|r| r.hwm_mib).fold(0.0, f64::max);
    let procs = runs.iter().map(|r| r.processes).max().unwrap_or(0);
    figures.peak_rss_mib = Some((peak, procs));
    Ok(out)
}

pub(crate) fn startup(ctx: &Ctx, figures: &mut Figures) -> Result<String> {
    let runs = ctx.plan.startup_runs;
    let mut times = Vec::new();
    for i in 0..runs {
        step(&format!("startup: run {}/{runs}", i + 1));
        let args: Vec<String> = [
            "record",
            "--no-progress",
            "-F",
            "99",
            "-o",
            &ctx.dir.join("startup.svg").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let agent = AgentRun::start(&ctx.agent, &args, &ctx.dir, "startup")?;
        let ms = agent.attach.as_secs_f64() * 1000.0;
        agent.stop()?;
        eprintln!("    attached {ms:.0} ms after exec");
        times.push(ms);
        std::thread::sleep(Duration::from_millis(200));
    }
    let med = median(&times);
    figures.startup_ms = Some(med);
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    let mut out = String::new();
    writeln!(
        out,
        "\n## 4. Start-up time\n\n\
         From fork + exec of `profiler-agent record -F 99` to the line it logs (at info) once \
         the perf_event program is loaded (verifier included) and attached to `cpu-clock` on \
         every CPU, read from its stderr as it is written (opening the eBPF object and \
         attaching the exec tracepoint come before, so they are included). {runs} runs on an \
         otherwise idle host, one after the other. The footprint section gives the same \
         figure on the busy host.\n\n\
         | runs | median | fastest | slowest |\n|---:|---:|---:|---:|\n\
         | {runs} | {med:.0} ms | {min:.0} ms | {max:.0} ms |\n\n\
         Target: ≤ 300 ms. Every run: {}.",
        times
            .iter()
            .map(|t| format!("{t:.0} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    Ok(out)
}
