//! The real agent against hostile conditions for symbolization: a binary
//! deleted while its process runs, and a window with no time left to name
//! frames. Needs root (see `support::privileged`). Corrupt, truncated and
//! huge ELF files are covered without BPF in
//! `profiler-agent/tests/hostile_binaries.rs`.
mod support;

use std::time::Duration;

use support::*;

/// The workload runs from a copy that is deleted once it started: its
/// frames are still named, through the binary the agent opened.
#[test]
fn deleted_binary_is_still_named() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("chain");
    std::fs::copy(workload("chain"), &copy).unwrap();
    let w = Workload::spawn(&copy, &["6"]);
    // Let exec finish mapping the image before the file goes.
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_file(&copy).unwrap();
    let (rec, _) = record_with(&options(vec![w.pid()], 3.0, 99), || ());
    let (matching, total) = count_where(&rec.profile, "chain", |f| {
        has_chain(f, &["main", "outer", "inner_hot"])
    });
    assert!(total >= 200, "too few samples: {total}");
    assert!(
        matching * 100 >= total * 90,
        "main;outer;inner_hot in {matching} of {total} samples\n{}",
        dump(&rec.profile, "chain")
    );
    assert_eq!(
        rec.symbolizer_stats[profiler_agent::loss::SymbolizerDegrade::Panics],
        0
    );
}

/// A zero budget: no user frame is looked up, every sample is still in the
/// profile with its frames as `module+0xOFFSET`, and the cut is counted.
#[test]
fn zero_budget_keeps_every_sample_unnamed_and_counted() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let w = Workload::spawn(&workload("chain"), &["6"]);
    let mut opts = options(vec![w.pid()], 3.0, 99);
    opts.symbolize.budget = Duration::ZERO;
    let (rec, _) = record_with(&opts, || ());
    let stacks = stacks_of(&rec.profile, "chain");
    let total: u64 = stacks.iter().map(|(_, c)| c).sum();
    assert!(total >= 200, "too few samples: {total}");
    assert_eq!(rec.profile.total(), rec.samples, "no sample dropped");
    for (frames, _) in &stacks {
        for frame in frames {
            assert!(
                frame.ends_with("_[k]") || frame.contains("+0x") || *frame == "[unknown]",
                "user frame named despite a zero budget: {frame}\n{}",
                dump(&rec.profile, "chain")
            );
        }
    }
    let (leaf_in_chain, _) = count_where(&rec.profile, "chain", |f| {
        f.iter().any(|frame| frame.starts_with("chain+0x"))
    });
    assert!(
        leaf_in_chain * 100 >= total * 90,
        "chain+0x... frames in {leaf_in_chain} of {total} samples\n{}",
        dump(&rec.profile, "chain")
    );
    let s = &rec.symbolizer_stats;
    assert!(
        s[profiler_agent::loss::SymbolizerDegrade::WindowsOverBudget] >= 1,
        "{s:?}"
    );
    assert!(
        s[profiler_agent::loss::SymbolizerDegrade::FramesOverBudget] > 0,
        "{s:?}"
    );
}
