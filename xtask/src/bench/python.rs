//! `python`: the kernel's time per CPU sample of a CPython process with the
//! Python frame walk on and off (`--no-python-frames`), per supported
//! version, and what the walk gives: the share of samples whose Python
//! chain is whole (from `<module>` and a stack root) and the 3:1 split of
//! the `pywork.py split` workload.
use std::{fmt::Write as _, fs, process::Command, time::Duration};

use anyhow::{bail, Context, Result};

use super::{bpf_progs_all, overhead::BpfStats, overhead::Workers, step, AgentRun, Ctx};

/// One run of the agent on the workload.
struct Measured {
    ns_per_sample: f64,
    samples: u64,
    /// % of samples in a whole `<module>` → work → leaf chain.
    whole: f64,
    /// % of the chains' samples in `leaf_a` (stated: 75).
    split: f64,
}

fn measure(ctx: &Ctx, pid: u32, walk: bool) -> Result<Measured> {
    let dir = &ctx.dir;
    let folded = dir.join("python.folded");
    let _ = fs::remove_file(&folded);
    let before: Vec<u64> = bpf_progs_all()?.iter().map(|p| p.id).collect();
    let mut args = vec![
        "record".to_string(),
        "--no-progress".into(),
        "-F".into(),
        "999".into(),
        "-p".into(),
        pid.to_string(),
        "-o".into(),
        dir.join("python.svg").display().to_string(),
        "--folded".into(),
        folded.display().to_string(),
    ];
    if !walk {
        args.push("--no-python-frames".into());
    }
    let agent = AgentRun::start(&ctx.agent, &args, dir, "python-agent")?;
    let profile = || -> Result<super::ProgStats> {
        bpf_progs_all()?
            .into_iter()
            .filter(|p| !before.contains(&p.id) && p.name == "profile")
            .max_by_key(|p| p.id)
            .context("the agent attached but bpftool shows no new `profile` program")
    };
    std::thread::sleep(Duration::from_millis(500));
    let a = profile()?;
    std::thread::sleep(Duration::from_secs(ctx.plan.cost_seconds * 2));
    let b = profile()?;
    agent.stop()?;
    let runs = b.run_cnt - a.run_cnt;
    if runs == 0 {
        bail!("the agent's program did not run");
    }
    let text = fs::read_to_string(&folded).context("reading the folded stacks")?;
    let (mut total, mut whole, mut a_leaf, mut b_leaf) = (0u64, 0u64, 0u64, 0u64);
    for line in text.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let count: u64 = count.parse().unwrap_or(0);
        total += count;
        let frames: Vec<&str> = stack.split(';').skip(1).collect();
        let py: Vec<&str> = frames
            .iter()
            .copied()
            .filter(|f| f.ends_with("_[py]"))
            .collect();
        let [outer, work, leaf] = py[..] else {
            continue;
        };
        let named = |f: &str, n: &str| f.starts_with(&format!("{n} ("));
        if !named(work, "work") {
            continue;
        }
        if named(leaf, "leaf_a") {
            a_leaf += count;
        } else if named(leaf, "leaf_b") {
            b_leaf += count;
        } else {
            continue;
        }
        let rooted = frames
            .first()
            .is_some_and(|f| ["_start", "__libc_start_main", "clone3"].contains(f));
        if rooted && named(outer, "<module>") {
            whole += count;
        }
    }
    Ok(Measured {
        ns_per_sample: (b.run_time_ns - a.run_time_ns) as f64 / runs as f64,
        samples: total,
        whole: 100.0 * whole as f64 / total.max(1) as f64,
        split: 100.0 * a_leaf as f64 / (a_leaf + b_leaf).max(1) as f64,
    })
}

pub(crate) fn python_frames(ctx: &Ctx) -> Result<String> {
    let stats = BpfStats::enable()?;
    let script = ctx.root.join("tests/workloads/python/pywork.py");
    let mut out = String::new();
    writeln!(
        out,
        "\n## Python frames\n\n\
         `record -F 999 -p PID` of `pywork.py split` (a Python chain `<module>` → `work` → \
         `leaf_a` ×3 / `leaf_b` ×1, the leaves the same loop: a 3:1 split) under pyenv's \
         CPython, without any flag in the interpreter, for {} s. *ns/sample* is the growth of \
         the `profile` program's run time over that of its runs (`bpf_stats`; it includes the \
         native unwinder and the Python walk it tail-calls), with the Python walk on and \
         off (`--no-python-frames`). *Whole* is the share of samples in a whole chain \
         (from a stack root, `<module>` first); *split* is `leaf_a`'s share of the chains.\n\n\
         | CPython | ns/sample, walk on | ns/sample, walk off | samples | whole % | split (stated 75) |\n\
         |---|---:|---:|---:|---:|---:|",
        ctx.plan.cost_seconds * 2
    )?;
    let minors: &[u32] = if ctx.plan.quick {
        &[12]
    } else {
        &[10, 11, 12, 13]
    };
    for &minor in minors {
        let Some(python) = profiler_testkit::pyenv_python(minor) else {
            writeln!(out, "| 3.{minor} | not installed | | | | |")?;
            continue;
        };
        step(&format!("python: CPython 3.{minor}"));
        let workload = Workers(vec![Command::new(&python)
            .arg(&script)
            .args(["split", "600"])
            .spawn()
            .context("starting the Python workload")?]);
        std::thread::sleep(Duration::from_millis(500));
        let pid = workload.0[0].id();
        let on = measure(ctx, pid, true)?;
        let off = measure(ctx, pid, false)?;
        drop(workload);
        eprintln!(
            "    3.{minor}: {:.0} ns/sample with the walk, {:.0} without; whole {:.1} %, split {:.1}",
            on.ns_per_sample, off.ns_per_sample, on.whole, on.split
        );
        writeln!(
            out,
            "| 3.{minor} | {:.0} | {:.0} | {} | {:.1} | {:.1} |",
            on.ns_per_sample, off.ns_per_sample, on.samples, on.whole, on.split
        )?;
    }
    drop(stats);
    Ok(out)
}
