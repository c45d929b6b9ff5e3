//! Processes that live a few milliseconds are named: a whole-host record
//! while two launchers run `short_lived work` hundreds of times a second,
//! each process gone long before the agent could read its maps. Their
//! frames come from the kernel's process events (exec, mmap), so the
//! samples of these processes are named like any other's.

use crate::support::*;
use profiler_agent::{loss::ProcessLoss, symbolize::UNKNOWN_FRAME};

const SECONDS: f64 = 4.0;
const FREQUENCY: u64 = 999;
/// About 5 ms of work per process.
const ITERATIONS: &str = "3000000";

/// Whether a frame is an address of a process the agent knew nothing of:
/// `[unknown]` or `[unknown]+0xADDR`. A `module+0xOFFSET` frame is not: its
/// process and binary were known, the address has no symbol (a PLT stub).
fn unnamed(frame: &str) -> bool {
    frame == UNKNOWN_FRAME || frame.starts_with(&format!("{UNKNOWN_FRAME}+0x"))
}

#[test]
fn processes_that_live_milliseconds_are_named() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let bin = workload("short_lived");
    let mut opts = options(Vec::new(), SECONDS, FREQUENCY);
    // Whatever else runs on the host, every frame is looked up.
    opts.symbolize.budget = std::time::Duration::from_secs(60);
    let (rec, runs) = record_with(&opts, || {
        let seconds = format!("{}", SECONDS - 0.5);
        let launchers: Vec<_> = (0..2)
            .map(|_| {
                std::process::Command::new(&bin)
                    .args(["spawn", &seconds, ITERATIONS])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        launchers
            .into_iter()
            .map(|l| l.wait_with_output().unwrap())
            .collect::<Vec<_>>()
    });
    let runs: u64 = runs
        .iter()
        .map(|out| {
            assert!(out.status.success(), "launcher failed: {out:?}");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum();

    let stacks = stacks_of(&rec.profile, "short_lived");
    let total: u64 = stacks.iter().map(|(_, c)| c).sum();
    // The user leaf (the last frame before the kernel's) of each sample.
    let user_leaf = |frames: &[&str]| -> Option<String> {
        frames
            .iter()
            .rev()
            .find(|f| !f.ends_with("_[k]"))
            .map(|f| f.to_string())
    };
    let unnamed_samples: u64 = stacks
        .iter()
        .filter(|(frames, _)| user_leaf(frames).is_some_and(|f| unnamed(&f)))
        .map(|(_, c)| c)
        .sum();
    let unnamed_stacks: Vec<String> = stacks
        .iter()
        .filter(|(frames, _)| user_leaf(frames).is_some_and(|f| unnamed(&f)))
        .take(10)
        .map(|(frames, count)| format!("  {count:>5} {}", frames.join(";")))
        .collect();
    let in_chain: u64 = stacks
        .iter()
        .filter(|(frames, _)| has_chain(frames, &["main", "work", "mid", "leaf"]))
        .map(|(_, c)| c)
        .sum();
    let gone = rec.process_stats[ProcessLoss::ProcessGoneBeforeSnapshot];
    eprintln!(
        "{runs} processes, {total} samples of them, {unnamed_samples} with an unnamed leaf, \
         {in_chain} in main;work;mid;leaf; processes named from events: {}, gone before \
         snapshot: {gone}, events lost: {}\n{}\nunnamed:\n{}",
        rec.process_stats.from_events,
        rec.process_stats[ProcessLoss::ProcessEventsLost],
        dump(&rec.profile, "short_lived"),
        unnamed_stacks.join("\n"),
    );
    // Two launchers, each a process every ~6 ms.
    assert!(runs >= 200, "only {runs} processes ran");
    let expected = SECONDS * FREQUENCY as f64;
    assert!(
        total as f64 >= 0.3 * expected,
        "too few samples of the short-lived processes ({total}, expected ~{expected:.0})"
    );
    assert!(
        rec.process_stats.from_events > 0,
        "no process was named from the process events"
    );
    assert_eq!(rec.process_stats[ProcessLoss::ProcessEventsLost], 0);
    // Under 0.1 % of their samples unnamed.
    assert!(
        unnamed_samples * 1000 <= total,
        "{unnamed_samples} of {total} samples have an unnamed leaf"
    );
    // Most of the work is in leaf(), reached from main.
    assert!(
        in_chain * 2 >= total,
        "{in_chain} of {total} samples in main;work;mid;leaf"
    );
}
