//! Frames of JIT-compiled code: CPython 3.12 with `-X perf`, Node with
//! `--perf-basic-prof` and a JVM with `-XX:+PreserveFramePointer` and a
//! map written by `jcmd PID Compiler.perfmap` publish perf maps; the agent
//! walks their code by frame pointers, names it from the map (`_[j]`) and
//! finds each workload's `work` → leaf chains at their 3:1 split, also for
//! a process in its own pid namespace with its own `/tmp`. Without a map,
//! JIT code is one `[jit]` frame per run, in an otherwise whole stack.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::support::*;
use profiler_agent::{
    fold::FoldedProfile,
    symbolize::{JIT_FRAME, JIT_SUFFIX},
};

const SECONDS: f64 = 3.0;
const FREQUENCY: u64 = 499;
/// How long the workloads run: past any recording.
const RUN_SECONDS: &str = "120";
/// Points the measured split may be off the stated 75:25.
const SPLIT_TOLERANCE: f64 = 5.0;

fn source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("workloads/jit")
        .join(name)
}

/// Whether `frame` names `function`: the name stands on its own (not part
/// of a longer identifier), as in `py::leaf_a:/x.py`, `JS:*leafA /x.js:6`
/// or `long JitWork.leafA(long)`.
fn names(frame: &str, function: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    frame.match_indices(function).any(|(at, _)| {
        !frame[..at].chars().next_back().is_some_and(ident)
            && !frame[at + function.len()..]
                .chars()
                .next()
                .is_some_and(ident)
    })
}

/// What a profile says of a workload whose `work` calls `leaf_a` and
/// `leaf_b`.
#[derive(Debug, Default)]
struct Chains {
    total: u64,
    /// Samples whose last two named JIT frames are `work` then the leaf.
    a: u64,
    b: u64,
    /// Of `a + b`, samples whose stack starts at a root and holds no
    /// `[unknown]` or cut frame.
    complete: u64,
    /// Samples with an `[unknown]` frame or a cut stack.
    broken: u64,
}

impl Chains {
    fn of(profile: &FoldedProfile, work: &str, leaf_a: &str, leaf_b: &str) -> Self {
        let mut c = Chains::default();
        for (stack, count) in profile.iter() {
            // The first frame is the thread's name.
            let frames: Vec<&str> = stack.split(';').skip(1).collect();
            c.total += count;
            let broken = frames
                .iter()
                .any(|f| *f == "[unknown]" || f.starts_with("[stack cut"));
            if broken {
                c.broken += count;
            }
            let jit: Vec<&str> = frames
                .iter()
                .copied()
                .filter(|f| f.ends_with(JIT_SUFFIX))
                .collect();
            let [.., caller, leaf] = jit[..] else {
                continue;
            };
            if !names(caller, work) {
                continue;
            }
            if names(leaf, leaf_a) {
                c.a += count;
            } else if names(leaf, leaf_b) {
                c.b += count;
            } else {
                continue;
            }
            if !broken && frames.first().is_some_and(|f| ROOTS.contains(f)) {
                c.complete += count;
            }
        }
        c
    }

    fn percent(n: u64, of: u64) -> f64 {
        100.0 * n as f64 / of.max(1) as f64
    }

    fn check(&self, runtime: &str, profile: &FoldedProfile) {
        let chains = self.a + self.b;
        let split = Self::percent(self.a, chains);
        let summary = format!(
            "{runtime}: {} samples, {:.1} % in work → leaf chains, split {split:.1} : {:.1} \
             (stated 75 : 25), {:.1} % of the chains complete, {:.1} % broken\n{}",
            self.total,
            Self::percent(chains, self.total),
            100.0 - split,
            Self::percent(self.complete, chains),
            Self::percent(self.broken, self.total),
            heaviest(profile, 12),
        );
        eprintln!("{summary}");
        assert!(
            self.total as f64 >= 0.3 * SECONDS * FREQUENCY as f64,
            "too few samples\n{summary}"
        );
        assert!(
            Self::percent(chains, self.total) >= 80.0,
            "the work → leaf chains are missing\n{summary}"
        );
        assert!(
            (split - 75.0).abs() <= SPLIT_TOLERANCE,
            "the split is off\n{summary}"
        );
        assert!(
            Self::percent(self.complete, chains) >= 95.0,
            "the chains' stacks are not whole\n{summary}"
        );
        assert!(
            Self::percent(self.broken, self.total) <= 2.0,
            "garbage frames\n{summary}"
        );
    }
}

/// The perf map a process writes, as the host sees it.
fn perf_map(pid: u32) -> String {
    std::fs::read_to_string(format!("/tmp/perf-{pid}.map")).unwrap_or_default()
}

/// Records `w` once `ready` holds.
fn record_when_ready(w: &Workload, what: &str, ready: impl FnMut() -> bool) -> FoldedProfile {
    record_when_ready_pid(w.pid(), what, ready)
}

/// Records process `pid` once `ready` holds. CPython's frames are not
/// walked: its `-X perf` trampolines are what is tested (with the walk, they
/// give way to the Python frames).
fn record_when_ready_pid(pid: u32, what: &str, ready: impl FnMut() -> bool) -> FoldedProfile {
    wait_until(Duration::from_secs(30), what, ready);
    let mut opts = options(vec![pid], SECONDS, FREQUENCY);
    opts.sampler.python_frames = false;
    let (rec, ()) = record_with(&opts, || ());
    rec.profile
}

struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn python_perf_trampolines_are_named() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let w = Workload::spawn_command(
        Command::new(pyenv_python(12))
            .args(["-X", "perf"])
            .arg(pywork())
            .args(["split", RUN_SECONDS]),
    );
    let _map = RemoveOnDrop(format!("/tmp/perf-{}.map", w.pid()));
    let profile = record_when_ready(&w, "python writes its perf map", || {
        let map = perf_map(w.pid());
        map.contains("py::leaf_a:") && map.contains("py::leaf_b:")
    });
    Chains::of(&profile, "work", "leaf_a", "leaf_b").check("CPython 3.12 -X perf", &profile);
}

#[test]
fn node_perf_basic_prof_frames_are_named() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let w = Workload::spawn_command(
        Command::new("node")
            // Interpreted functions get their own code too, and the leaves
            // stay calls when optimized.
            .args([
                "--perf-basic-prof",
                "--interpreted-frames-native-stack",
                "--no-turbo-inlining",
            ])
            .arg(source("jit_work.js"))
            .arg(RUN_SECONDS),
    );
    let _map = RemoveOnDrop(format!("/tmp/perf-{}.map", w.pid()));
    let profile = record_when_ready(&w, "node optimizes work and the leaves", || {
        let map = perf_map(w.pid());
        map.contains("work /") && ["JS:*leafA ", "JS:*leafB "].iter().all(|f| map.contains(f))
    });
    Chains::of(&profile, "work", "leafA", "leafB").check("Node --perf-basic-prof", &profile);
}

#[test]
fn jvm_perfmap_frames_are_named() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let w = Workload::spawn_command(
        Command::new("java")
            .args([
                "-XX:+PreserveFramePointer",
                "-XX:CompileCommand=quiet",
                "-XX:CompileCommand=dontinline,JitWork::*",
            ])
            .arg(source("JitWork.java"))
            .arg(RUN_SECONDS)
            .stderr(Stdio::null()),
    );
    let _map = RemoveOnDrop(format!("/tmp/perf-{}.map", w.pid()));
    // The JVM writes its map when asked: once `work` and the leaves are
    // compiled and their code stays the same between two maps (C1's code
    // is replaced by C2's).
    let mut previous = Vec::new();
    let profile = record_when_ready(&w, "the JVM's code for work and the leaves settles", || {
        std::thread::sleep(Duration::from_millis(500));
        let out = Command::new("jcmd")
            .arg(w.pid().to_string())
            .arg("Compiler.perfmap")
            .output();
        assert!(
            out.as_ref().is_ok_and(|o| o.status.success()),
            "jcmd failed: {out:?}"
        );
        let map = perf_map(w.pid());
        let mut ours: Vec<String> = map
            .lines()
            .filter(|l| l.contains(" JitWork."))
            .map(str::to_string)
            .collect();
        ours.sort();
        let compiled = ["JitWork.work(", "JitWork.leafA(", "JitWork.leafB("]
            .iter()
            .all(|f| map.contains(f));
        let settled = compiled && ours == previous;
        previous = ours;
        settled
    });
    Chains::of(&profile, "work", "leafA", "leafB").check("OpenJDK 17 Compiler.perfmap", &profile);
}

#[test]
fn jit_code_without_a_map_is_one_jit_frame_per_run() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let w = Workload::spawn_command(
        Command::new("node")
            .arg("--no-turbo-inlining")
            .arg(source("jit_work.js"))
            .arg(RUN_SECONDS),
    );
    // Optimized code appears in an anonymous executable mapping.
    let maps = format!("/proc/{}/maps", w.pid());
    let profile = record_when_ready(&w, "node runs JIT code", || {
        std::fs::read_to_string(&maps).is_ok_and(|m| {
            m.lines().any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.len() == 5 && fields[1].contains('x')
            })
        })
    });
    let (mut jit, mut whole, mut total, mut twice, mut broken) = (0, 0, 0, 0, 0);
    for (stack, count) in profile.iter() {
        let frames: Vec<&str> = stack.split(';').skip(1).collect();
        total += count;
        if frames
            .iter()
            .any(|f| *f == "[unknown]" || f.starts_with("[stack cut"))
        {
            broken += count;
        }
        if frames.windows(2).any(|p| p == [JIT_FRAME, JIT_FRAME]) {
            twice += count;
        }
        if frames.contains(&JIT_FRAME) {
            jit += count;
            if frames.first().is_some_and(|f| ROOTS.contains(f)) {
                whole += count;
            }
        }
        assert!(
            !frames.iter().any(|f| f.ends_with(JIT_SUFFIX)),
            "a frame named from a map that node did not write: {stack}"
        );
    }
    let summary = format!(
        "node without a perf map: {total} samples, {jit} with [jit], {whole} of them whole, \
         {broken} broken\n{}",
        heaviest(&profile, 12)
    );
    eprintln!("{summary}");
    assert!(
        jit * 10 >= total * 8,
        "JIT code not shown as [jit]\n{summary}"
    );
    assert_eq!(twice, 0, "[jit] twice in a row\n{summary}");
    assert!(
        whole * 100 >= jit * 95,
        "stacks through JIT code are cut\n{summary}"
    );
    assert!(broken * 50 <= total, "garbage frames\n{summary}");
}

/// The frame matcher.
#[test]
fn frames_name_functions_as_whole_words() {
    assert!(names("py::leaf_a:/tmp/jit_work.py_[j]", "leaf_a"));
    assert!(names("JS:*leafA /w/jit_work.js:6:15_[j]", "leafA"));
    assert!(names("long JitWork.leafA(long)_[j]", "leafA"));
    assert!(names("long JitWork.work(long)_[j]", "work"));
    assert!(!names("py::leaf_ab:/x.py_[j]", "leaf_a"));
    assert!(!names("JS:*work2 /x.js_[j]", "work"));
}

/// The child of `parent` whose executable is named `name`.
fn child_named(parent: u32, name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        (ppid == parent.to_string() && exe.file_name()? == name).then_some(pid)
    })
}

/// A JIT in a container: its own pid namespace (it is pid 1 there) and its
/// own `/tmp`. Its map, `/tmp/perf-1.map` inside, is not on the host's
/// `/tmp`: the agent reads it through `/proc/PID/root` with the pid the
/// process has in its namespace.
#[test]
fn perf_maps_of_processes_in_containers_are_read() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let python = pyenv_python(12);
    let w = Workload::spawn_command(
        Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "sh",
                "-c",
            ])
            .arg(r#"mount -t tmpfs tmpfs /tmp && exec "$0" -X perf "$1" split "$2""#)
            .arg(&python)
            .arg(pywork())
            .arg(RUN_SECONDS),
    );
    let name = python.file_name().unwrap().to_str().unwrap().to_string();
    let pid = wait_for(
        Duration::from_secs(20),
        "python starts in its namespace",
        || child_named(w.pid(), &name),
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")),
        "python is not pid 1 of its namespace:\n{status}"
    );
    let inside = format!("/proc/{pid}/root/tmp/perf-1.map");
    let profile = record_when_ready_pid(pid, "python writes its map in the container", || {
        std::fs::read_to_string(&inside).is_ok_and(|m| m.contains("py::leaf_b:"))
    });
    assert!(
        !Path::new(&format!("/tmp/perf-{pid}.map")).exists()
            && !Path::new("/tmp/perf-1.map").exists(),
        "the map must be visible inside the container only"
    );
    Chains::of(&profile, "work", "leaf_a", "leaf_b")
        .check("CPython 3.12 -X perf in a container", &profile);
}
