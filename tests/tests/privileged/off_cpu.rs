//! Off-CPU time: where threads wait, in nanoseconds, from `sched_switch`
//! and `finish_task_switch`, with the same unwinder as CPU samples.

use crate::support::*;
use profiler_agent::{config::OffCpuOptions, sample_type::SampleType};

/// Nanoseconds of a process's off-CPU stacks that satisfy `pred`.
fn ns_where(
    profile: &profiler_agent::fold::FoldedProfile,
    process: &str,
    pred: impl Fn(&[&str]) -> bool,
) -> u64 {
    count_where(profile, process, pred).0
}

#[test]
fn sleeps_split_by_the_function_that_waited() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let bin = workload("offcpu");
    let w = Workload::spawn(&bin, &["sleep", "30"]);
    wait_for_exec(w.pid(), "offcpu");
    let mut opts = options(vec![w.pid()], 4.0, 99);
    opts.sampler.off_cpu = Some(OffCpuOptions::default());
    let (rec, ()) = record_with(&opts, || ());
    let off = rec
        .other_profiles
        .get(&SampleType::OffCpu)
        .unwrap_or_else(|| panic!("no off-CPU profile; counters: {:?}", rec.counters));
    let long = ns_where(off, "offcpu", |f| f.contains(&"sleep_long"));
    let short = ns_where(off, "offcpu", |f| f.contains(&"sleep_short"));
    let total = count_where(off, "offcpu", |_| true).1;
    let stacks = dump(off, "offcpu");
    // Whole stacks: from main through the waiting function into the
    // kernel's sleep (the scheduler's own frames are left out).
    let whole = ns_where(off, "offcpu", |f| {
        has_chain(f, &["main", "sleeper", "sleep_long"])
            && f.iter()
                .any(|k| k.ends_with("_[k]") && k.contains("nanosleep"))
    });
    assert!(
        whole * 100 >= long * 95,
        "sleep_long's time should have whole stacks into the kernel's nanosleep \
         ({whole} of {long} ns):\n{stacks}"
    );
    let share = long as f64 / (long + short).max(1) as f64;
    assert!(
        (0.70..=0.80).contains(&share),
        "sleep_long should have 3/4 of the sleeping time, has {:.1} % \
         ({long} vs {short} ns):\n{stacks}",
        share * 100.0
    );
    // One thread, off the CPU nearly all the time: its off-CPU total is
    // the wall time of the recording.
    let wall = rec.duration.as_nanos() as f64;
    let ratio = total as f64 / wall;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "off-CPU total {:.3} s for {:.3} s of wall time ({:.1} %):\n{stacks}",
        total as f64 / 1e9,
        wall / 1e9,
        ratio * 100.0
    );
    assert!(rec.counters.get(profiler_common::Counter::OffCpuRecorded) > 0);
    assert_eq!(rec.counters.get(profiler_common::Counter::OffCpuMapFull), 0);
    assert_eq!(
        rec.counters.get(profiler_common::Counter::OffCpuStartLost),
        0
    );
}

/// The stacks of `process` in the agent's profile, as the collector holds
/// them when a selection picks that process.
fn as_stored(
    profile: &profiler_agent::fold::FoldedProfile,
    process: &str,
) -> profiler_collector::model::Profile {
    let mut stored = profiler_collector::model::Profile::default();
    for (stack, value) in profile.iter() {
        if stack.split(';').next() == Some(process) {
            stored.add(stack, value);
        }
    }
    stored
}

#[test]
fn lock_waits_are_found_at_their_lock_site() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let bin = workload("offcpu");
    // A service already running when the agent starts, recorded by pid
    // (its mappings loaded at the start); its contention begins once the
    // agent is attached (a line on its stdin).
    let mut child = std::process::Command::new(&bin)
        .args(["mutex", "3", "3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for_exec(pid, "offcpu");
    let maps = format!("/proc/{pid}/maps");
    wait_until(
        std::time::Duration::from_secs(5),
        "the workload has mapped libc",
        || std::fs::read_to_string(&maps).is_ok_and(|m| m.contains("libc")),
    );
    let mut opts = options(vec![pid], 4.5, 99);
    // Every wait, however short: the total is compared with the workload's.
    opts.sampler.off_cpu = Some(OffCpuOptions {
        min_block: std::time::Duration::ZERO,
        sample: 1.0,
    });
    let (rec, out) = record_with(&opts, || {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    });
    assert!(out.status.success(), "workload failed: {out:?}");
    let measured: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let off = rec
        .other_profiles
        .get(&SampleType::OffCpu)
        .expect("an off-CPU profile");
    let view = profiler_collector::contention::contention(&as_stored(off, "offcpu"), 5);
    let stacks = dump(off, "offcpu");
    let top = view
        .functions
        .first()
        .unwrap_or_else(|| panic!("no futex waits found:\n{stacks}"));
    assert_eq!(top.0, "take_lock", "{view:?}\n{stacks}");
    let take_lock = top.1;
    let ratio = take_lock as f64 / measured as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "futex waits at take_lock {:.3} s, the workload measured {:.3} s of waiting \
         ({:.1} %):\n{stacks}",
        take_lock as f64 / 1e9,
        measured as f64 / 1e9,
        ratio * 100.0
    );
    assert!(
        view.sites[0]
            .stack
            .starts_with(&["start_thread".to_string()])
            || view.sites[0].stack.iter().any(|f| f == "contender"),
        "the lock site's stack reaches the thread's function: {:?}",
        view.sites[0].stack
    );
}
