//! `off-cpu`: what off-CPU recording adds, on a host doing about 10 k and
//! 50 k context switches a second (`switch` workload: threads that each
//! wait 1 ms in a loop), side by side with CPU profiling alone: the agent's
//! CPU time and the time the kernel spends in all of its programs
//! (`bpf_stats`).
use std::{fmt::Write as _, process::Command, time::Duration};

use anyhow::{Context, Result};

use super::{
    bpf_progs_all,
    footprint::proc_cpu,
    overhead::{BpfStats, Workers},
    step, AgentRun, Ctx,
};

/// Threads of the `switch` workload and the wait of each (µs), for a load:
/// waits below the threshold (timed, not recorded), and waits above it
/// (every one recorded: the worst case).
const LOADS: [(&str, u32, u32); 3] = [
    ("~50 k/s, 100 µs waits", 5, 100),
    ("~10 k/s, 1 ms waits", 10, 1000),
    ("~50 k/s, 1 ms waits", 50, 1000),
];

/// The agent's settings compared: flags after `record -F 19`.
const MODES: [(&str, &[&str]); 4] = [
    ("CPU only", &[]),
    (
        "+ off-CPU, every switch (`record --off-cpu`)",
        &["--off-cpu"],
    ),
    (
        "+ off-CPU, 5 % of switches",
        &["--off-cpu", "--off-cpu-sample", "0.05"],
    ),
    (
        "+ off-CPU, 1 % of switches (`run`'s default)",
        &["--off-cpu", "--off-cpu-sample", "0.01"],
    ),
];

/// Context switches since boot, from /proc/stat.
fn context_switches() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    stat.lines()
        .find_map(|l| l.strip_prefix("ctxt ")?.trim().parse().ok())
        .context("/proc/stat has no ctxt line")
}

/// One measurement.
struct Measured {
    switches_per_sec: f64,
    /// % of one core.
    agent: f64,
    kernel: f64,
    /// Per program: (name, runs a second, mean ns a run).
    programs: Vec<(String, f64, f64)>,
}

fn measure(ctx: &Ctx, flags: &[&str]) -> Result<Measured> {
    let dir = &ctx.dir;
    let before: Vec<u64> = bpf_progs_all()?.iter().map(|p| p.id).collect();
    let mut args = vec![
        "record".to_string(),
        "--no-progress".into(),
        "-F".into(),
        "19".into(),
        "-o".into(),
        dir.join("offcpu.svg").display().to_string(),
    ];
    args.extend(flags.iter().map(|f| f.to_string()));
    let agent = AgentRun::start(&ctx.agent, &args, dir, "offcpu-agent")?;
    let ours: Vec<u64> = bpf_progs_all()?
        .iter()
        .map(|p| p.id)
        .filter(|id| !before.contains(id))
        .collect();
    let progs = || -> Result<Vec<super::ProgStats>> {
        Ok(bpf_progs_all()?
            .into_iter()
            .filter(|p| ours.contains(&p.id))
            .collect())
    };
    std::thread::sleep(Duration::from_millis(500));
    let (cpu0, p0, s0) = (proc_cpu(agent.pid())?, progs()?, context_switches()?);
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(ctx.plan.cost_seconds * 2));
    let secs = started.elapsed().as_secs_f64();
    let (cpu1, p1, s1) = (proc_cpu(agent.pid())?, progs()?, context_switches()?);
    agent.stop()?;
    let mut programs = Vec::new();
    let mut kernel_ns = 0;
    for b in &p1 {
        let Some(a) = p0.iter().find(|a| a.id == b.id) else {
            continue;
        };
        let (ns, runs) = (b.run_time_ns - a.run_time_ns, b.run_cnt - a.run_cnt);
        kernel_ns += ns;
        if runs > 0 {
            programs.push((b.name.clone(), runs as f64 / secs, ns as f64 / runs as f64));
        }
    }
    Ok(Measured {
        switches_per_sec: (s1 - s0) as f64 / secs,
        agent: (cpu1 - cpu0) / secs * 100.0,
        kernel: kernel_ns as f64 / 1e9 / secs * 100.0,
        programs,
    })
}

pub(crate) fn off_cpu(ctx: &Ctx) -> Result<String> {
    let stats = BpfStats::enable()?;
    let mut out = String::new();
    writeln!(
        out,
        "\n## Off-CPU recording\n\n\
         What off-CPU recording adds to `record -F 19` of the whole host, while threads that \
         each wait in a loop (`switch`) make the host switch context: waits of 100 µs (below \
         the 500 µs threshold: not recorded) and of 1 ms (each one recorded). Stacks are \
         taken when a thread leaves the CPU, so every timed switch costs a kernel stack read \
         and a user stack walk, however long the wait. *Agent* is its CPU time, *kernel* \
         the run time of all its eBPF programs (`bpf_stats`), both in % of one core, over {} s \
         after start-up.\n\n\
         *Programs* gives each program that ran: runs a second and mean ns a run \
         (`off_cpu_switch` runs at every context switch, a timed one costs a stack walk; `off_cpu_waking` at every wake-up, and walks the waker of a timed wait).\n\n\
         | load | recording | switches/s measured | agent % | kernel % | total % | programs |\n\
         |---|---|---:|---:|---:|---:|---|",
        ctx.plan.cost_seconds * 2
    )?;
    // A quick run measures one load, with and without off-CPU recording.
    let (loads, modes) = if ctx.plan.quick {
        (&LOADS[1..2], &MODES[..2])
    } else {
        (&LOADS[..], &MODES[..])
    };
    for &(label, threads, wait_us) in loads {
        let workers = Workers(vec![Command::new(&ctx.bins().switch)
            .args([threads.to_string(), wait_us.to_string()])
            .spawn()
            .context("starting the switch workload")?]);
        std::thread::sleep(Duration::from_millis(300));
        for &(mode, flags) in modes {
            step(&format!("off-cpu: {label}, {mode}"));
            let m = measure(ctx, flags)?;
            let programs: Vec<String> = m
                .programs
                .iter()
                .map(|(name, per_sec, ns)| format!("`{name}` {per_sec:.0}/s × {ns:.0} ns"))
                .collect();
            eprintln!(
                "    {:.0} switches/s, agent {:.3} %, kernel {:.3} %; {}",
                m.switches_per_sec,
                m.agent,
                m.kernel,
                programs.join(", ")
            );
            writeln!(
                out,
                "| {label} | {mode} | {:.0} | {:.3} | {:.3} | {:.3} | {} |",
                m.switches_per_sec,
                m.agent,
                m.kernel,
                m.agent + m.kernel,
                programs.join("; ")
            )?;
        }
        drop(workers);
    }
    drop(stats);
    Ok(out)
}
