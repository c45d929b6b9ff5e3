//! CPython 3.10-3.13 without any flag: the eBPF program walks the
//! interpreter's frames and the agent names them `qualname (file:line)`,
//! in place of the `_PyEval_EvalFrameDefault` frames that ran them. Each
//! version runs the same workload (pyenv's interpreters): Python chains at
//! a known 3:1 split; a C extension (zlib) keeps its native frames under
//! the Python frame that called it; threads, a generator and a coroutine.

use std::{process::Command, time::Duration};

use crate::support::*;
use profiler_agent::{fold::FoldedProfile, python::PYTHON_SUFFIX};

const SECONDS: f64 = 3.0;
const FREQUENCY: u64 = 499;
const RUN_SECONDS: &str = "120";
const SPLIT_TOLERANCE: f64 = 5.0;

/// CPU time of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
    field(11) + field(12)
}

/// Runs `pywork.py MODE` under CPython 3.`minor` and records it once it
/// has run half a second of CPU.
fn record_python(minor: u32, mode: &str) -> FoldedProfile {
    record_python_with(minor, &[], mode)
}

/// [`record_python`] with interpreter flags.
fn record_python_with(minor: u32, flags: &[&str], mode: &str) -> FoldedProfile {
    let w = Workload::spawn_command(
        Command::new(pyenv_python(minor))
            .args(flags)
            .arg(pywork())
            .arg(mode)
            .arg(RUN_SECONDS),
    );
    wait_until(Duration::from_secs(20), "the workload runs", || {
        cpu_ticks(w.pid()) >= 50
    });
    let opts = options(vec![w.pid()], SECONDS, FREQUENCY);
    let (rec, ()) = record_with(&opts, || ());
    // `-X perf` leaves its map behind.
    let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", w.pid()));
    rec.profile
}

/// A stack's frames after the thread name.
fn frames_of(stack: &str) -> Vec<&str> {
    stack.split(';').skip(1).collect()
}

fn python_frames<'a>(frames: &[&'a str]) -> Vec<&'a str> {
    frames
        .iter()
        .copied()
        .filter(|f| f.ends_with(PYTHON_SUFFIX))
        .collect()
}

/// Whether a Python frame is of function `name` (`name (file.py:line)_[py]`;
/// a method's qualified name ends with `.name`).
fn is_function(frame: &str, name: &str) -> bool {
    frame
        .split_once(" (")
        .is_some_and(|(f, _)| f == name || f.ends_with(&format!(".{name}")))
}

fn percent(n: u64, of: u64) -> f64 {
    100.0 * n as f64 / of.max(1) as f64
}

fn split(minor: u32) {
    check_split(minor, &record_python(minor, "split"));
}

fn check_split(minor: u32, profile: &FoldedProfile) {
    let (mut total, mut a, mut b, mut complete) = (0, 0, 0, 0);
    for (stack, n) in profile.iter() {
        let frames = frames_of(stack);
        total += n;
        let py = python_frames(&frames);
        let [.., outer, work, leaf] = py[..] else {
            continue;
        };
        if !is_function(work, "work") {
            continue;
        }
        if is_function(leaf, "leaf_a") {
            a += n;
        } else if is_function(leaf, "leaf_b") {
            b += n;
        } else {
            continue;
        }
        let whole = frames.first().is_some_and(|f| ROOTS.contains(f))
            && is_function(outer, "<module>")
            && !frames
                .iter()
                .any(|f| *f == "[unknown]" || f.starts_with("[stack cut"));
        if whole {
            complete += n;
        }
    }
    let share = percent(a, a + b);
    let summary = format!(
        "CPython 3.{minor}: {total} samples, {:.1} % in <module> → work → leaf chains, split \
         {share:.1} : {:.1} (stated 75 : 25), {:.1} % of the chains complete\n{}",
        percent(a + b, total),
        100.0 - share,
        percent(complete, a + b),
        heaviest(profile, 10)
    );
    eprintln!("{summary}");
    assert!(
        total as f64 >= 0.3 * SECONDS * FREQUENCY as f64,
        "too few samples\n{summary}"
    );
    assert!(percent(a + b, total) >= 80.0, "chains missing\n{summary}");
    assert!(
        (share - 75.0).abs() <= SPLIT_TOLERANCE,
        "split off\n{summary}"
    );
    assert!(
        percent(complete, a + b) >= 95.0,
        "chains not whole\n{summary}"
    );
}

fn shapes(minor: u32) {
    let profile = record_python(minor, "shapes");
    let (mut total, mut zlib, mut zlib_native, mut generator, mut coroutine) = (0, 0, 0, 0, 0);
    let (mut sorting, mut sorting_native) = (0, 0);
    // Stacks that lost the C extension's frames, for the message.
    let mut without_native: Vec<String> = Vec::new();
    for (stack, n) in profile.iter() {
        let frames = frames_of(stack);
        total += n;
        let py = python_frames(&frames);
        let Some(last) = py.last() else {
            continue;
        };
        // A native walk cut short (counted by the stack-quality counters)
        // cannot keep the C frames the Python walk puts around.
        let cut = frames.iter().any(|f| f.starts_with("[stack cut"));
        if is_function(last, "squeeze") && !cut {
            zlib += n;
            // The C extension's native frames stay, leafward of the
            // Python frame that called it.
            let at = frames.iter().position(|f| f == last).unwrap();
            if frames[at + 1..]
                .iter()
                .any(|f| f.to_ascii_lowercase().contains("compress") || f.contains("deflate"))
            {
                zlib_native += n;
            } else {
                without_native.push(format!("{n} {stack}"));
            }
        }
        // Python → C (`sorted`) → Python (the key): each Python part
        // where its eval call was, the C frames between them.
        if let Some(at) = frames
            .iter()
            .position(|f| is_function(f, "order"))
            .filter(|_| !cut)
        {
            if let Some(key) = frames[at..].iter().position(|f| is_function(f, "weight")) {
                sorting += n;
                if frames[at + 1..at + key]
                    .iter()
                    .any(|f| f.contains("sort") && !f.ends_with(PYTHON_SUFFIX))
                {
                    sorting_native += n;
                } else {
                    without_native.push(format!("{n} {stack}"));
                }
            }
        }
        if py
            .windows(2)
            .any(|p| is_function(p[0], "consume") && is_function(p[1], "produce"))
        {
            generator += n;
        }
        if is_function(last, "crunch") && py.iter().any(|f| is_function(f, "run_async")) {
            coroutine += n;
        }
    }
    let summary = format!(
        "CPython 3.{minor} shapes: {total} samples; squeeze {zlib} ({zlib_native} with zlib's \
         native frames), order → weight {sorting} ({sorting_native} with sorted's native \
         frames between), consume → produce {generator}, run_async … crunch {coroutine}\n{}\n\
         without the C frames:\n{}",
        heaviest(&profile, 10),
        without_native
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("{summary}");
    for (what, n) in [
        ("squeeze", zlib),
        ("order → weight", sorting),
        ("consume → produce", generator),
        ("crunch", coroutine),
    ] {
        assert!(percent(n, total) >= 5.0, "{what} missing\n{summary}");
    }
    assert!(
        zlib_native * 10 >= zlib * 8,
        "zlib's native frames missing\n{summary}"
    );
    assert!(
        sorting_native * 10 >= sorting * 8,
        "sorted's native frames missing between order and weight\n{summary}"
    );
}

macro_rules! python_tests {
    ($($minor:literal => $split:ident, $shapes:ident;)*) => {$(
        #[test]
        fn $split() {
            if !privileged() {
                return;
            }
            let _serial = serial();
            split($minor);
        }

        #[test]
        fn $shapes() {
            if !privileged() {
                return;
            }
            let _serial = serial();
            shapes($minor);
        }
    )*};
}

python_tests! {
    10 => python_3_10_split, python_3_10_shapes;
    11 => python_3_11_split, python_3_11_shapes;
    12 => python_3_12_split, python_3_12_shapes;
    13 => python_3_13_split, python_3_13_shapes;
}

/// A version the agent does not read is counted (and logged), and its
/// stacks keep their native frames only.
#[test]
fn an_unsupported_version_is_named_not_guessed() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let before = profiler_agent::python::unsupported_processes();
    let profile = record_python(9, "split");
    assert!(
        profiler_agent::python::unsupported_processes() > before,
        "Python 3.9 not counted as unsupported"
    );
    assert!(
        !profile
            .iter()
            .any(|(s, _)| s.split(';').any(|f| f.ends_with(PYTHON_SUFFIX))),
        "Python frames for an unsupported version\n{}",
        heaviest(&profile, 10)
    );
}

/// With `-X perf` too, each Python function shows once: its trampoline
/// frames give way to the Python frames.
#[test]
fn python_3_12_with_perf_trampolines_shows_each_function_once() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let profile = record_python_with(12, &["-X", "perf"], "split");
    assert!(
        !profile
            .iter()
            .any(|(s, _)| s.split(';').any(|f| f.starts_with("py::"))),
        "trampoline frames beside the Python frames\n{}",
        heaviest(&profile, 10)
    );
    check_split(12, &profile);
}

#[test]
fn python_frames_are_matched_by_function() {
    assert!(is_function("leaf_a (pywork.py:20)_[py]", "leaf_a"));
    assert!(is_function("Worker.run (x.py:3)_[py]", "run"));
    assert!(!is_function("leaf_ab (pywork.py:20)_[py]", "leaf_a"));
}
