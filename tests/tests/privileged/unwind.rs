//! User stacks without frame pointers: workloads built the way real
//! software is built (`workloads/unwind/`), profiled by the agent and by
//! perf `--call-graph dwarf`, the reference. Needs root (see
//! `crate::support::privileged`).
//!
//! Each workload states its call chains and their shares of its samples.
//! One test per workload, `*_agent_vs_perf`: the agent and perf record the
//! same run; at least 99 % of the agent's stacks are complete (they start at
//! a [`ROOTS`] frame), each chain's share is within [`SHARE_TOLERANCE`]
//! points of the stated one, and the agent has complete stacks at least as
//! often as perf.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::Duration,
};

use crate::support::*;
use profiler_agent::{
    fold::FoldedProfile,
    symbolize::{INLINED_SUFFIX, KERNEL_SUFFIX},
};

/// Points a part's share may be off the stated one.
const SHARE_TOLERANCE: f64 = 2.0;
/// Least share of the agent's samples with a complete user stack, in %.
const COMPLETE_MIN: f64 = 99.0;

const AGENT_SECONDS: f64 = 3.0;
const AGENT_FREQUENCY: u64 = 499;
const PERF_SECONDS: f64 = 4.0;
/// The workloads run longer than any recording; they are killed once done.
const RUN_SECONDS: &str = "60";

/// Stands for any number of frames (none too) in a [`Part`]'s chain.
const ANY: &str = "*";

/// A call chain of a workload and its share of the workload's samples.
struct Part {
    /// Frame names root first, ending at the leaf (or at [`ANY`]); the
    /// chain may start anywhere in the stack.
    chain: Vec<&'static str>,
    /// In % of the process's samples.
    share: f64,
}

fn part(chain: &[&'static str], share: f64) -> Part {
    Part {
        chain: chain.to_vec(),
        share,
    }
}

/// How the test starts a workload and brings it to its hot phase.
enum Start {
    /// It works from its start.
    Runs,
    /// It works from its start in `n` threads besides the main thread.
    Threads(usize),
    /// It blocks on its standard input; once that is closed it loads the
    /// library named and works in it.
    Loads(&'static str),
}

struct Spec {
    /// The workload (see `crate::support::workload`), also its process name.
    name: &'static str,
    parts: Vec<Part>,
    /// CPUs the workload keeps busy.
    cpus: f64,
    /// perf's stack dump in bytes: the default, or more for a deep stack.
    stack_dump: u32,
    /// Least share of samples taken in kernel mode, in %.
    kernel_share: Option<f64>,
    start: Start,
}

impl Spec {
    fn new(name: &'static str, parts: Vec<Part>) -> Self {
        Spec {
            name,
            parts,
            cpus: 1.0,
            stack_dump: perf::DEFAULT_STACK_DUMP,
            kernel_share: None,
            start: Start::Runs,
        }
    }
}

fn nofp(name: &'static str) -> Spec {
    Spec::new(
        name,
        vec![
            part(&["main", "run", "top", "mid", "leaf_a"], 75.0),
            part(&["main", "run", "top", "mid", "leaf_b"], 25.0),
        ],
    )
}

fn qsort_cb() -> Spec {
    Spec::new(
        "qsort_cb",
        vec![
            part(&["main", "run", "sort_phase", ANY, "by_key"], 75.0),
            part(&["main", "run", "search_phase", ANY, "by_key"], 25.0),
        ],
    )
}

fn cxx() -> Spec {
    Spec::new(
        "cxx",
        vec![
            part(&["main", "run", "sort_round", ANY, "by_weight"], 75.0),
            part(
                &["main", "run", "shade_round", "Outer::shade", "Inner::shade"],
                25.0,
            ),
        ],
    )
}

fn rust_release() -> Spec {
    let chain = |leaf| {
        vec![
            "rust_release::main",
            "rust_release::run",
            "rust_release::top",
            "rust_release::mid",
            leaf,
        ]
    };
    Spec::new(
        "rust_release",
        vec![
            Part {
                chain: chain("rust_release::leaf_a"),
                share: 75.0,
            },
            Part {
                chain: chain("rust_release::leaf_b"),
                share: 25.0,
            },
        ],
    )
}

fn dlopen_main() -> Spec {
    Spec {
        start: Start::Loads("libdlopen_lib.so"),
        ..Spec::new(
            "dlopen_main",
            vec![
                part(&["main", "run_library", "lib_entry", "lib_hot_a"], 75.0),
                part(&["main", "run_library", "lib_entry", "lib_hot_b"], 25.0),
            ],
        )
    }
}

fn threads() -> Spec {
    Spec {
        cpus: 1.5,
        start: Start::Threads(3),
        ..Spec::new(
            "threads",
            vec![
                part(&["start_thread", "thread_a", "stage_a", "leaf_a"], 50.0),
                part(&["start_thread", "thread_b", "stage_b", "leaf_b"], 30.0),
                part(&["start_thread", "thread_c", "stage_c", "leaf_c"], 20.0),
            ],
        )
    }
}

fn signal() -> Spec {
    Spec::new(
        "signal",
        vec![
            part(&["main", "run", "compute", "main_leaf"], 75.0),
            part(
                // ANY: the interrupted function, then glibc's __restore_rt (a
                // symbol of size 0, which perf names [unknown]).
                &["main", "run", "compute", ANY, "on_sigprof", "handler_leaf"],
                25.0,
            ),
        ],
    )
}

fn recurse() -> Spec {
    // descend recurses from depth 150 to 0; half_leaf is called at depth 75.
    let chain = |descends: usize, leaf| {
        let mut chain = vec!["main", "run"];
        chain.extend(std::iter::repeat_n("descend", descends));
        chain.push(leaf);
        chain
    };
    Spec::new(
        "recurse",
        vec![
            Part {
                chain: chain(151, "deep_leaf"),
                share: 75.0,
            },
            Part {
                chain: chain(76, "half_leaf"),
                share: 25.0,
            },
        ],
    )
}

fn bigframe() -> Spec {
    Spec {
        stack_dump: perf::MAX_STACK_DUMP,
        ..Spec::new(
            "bigframe",
            vec![
                part(&["main", "run", "big_frame", "scan_leaf"], 75.0),
                part(&["main", "run", "big_frame"], 25.0),
            ],
        )
    }
}

fn unwind_syscalls() -> Spec {
    Spec {
        kernel_share: Some(50.0),
        ..Spec::new(
            "unwind_syscalls",
            vec![
                part(&["main", "run", "pump", "emit_a", ANY], 75.0),
                part(&["main", "run", "pump", "emit_b", ANY], 25.0),
            ],
        )
    }
}

/// Starts the workload of `spec` and waits until it runs (its threads too).
fn start(spec: &Spec) -> Workload {
    let bin = workload(spec.name);
    let w = match spec.start {
        Start::Loads(_) => {
            Workload::spawn_command(Command::new(&bin).arg(RUN_SECONDS).stdin(Stdio::piped()))
        }
        _ => Workload::spawn(&bin, &[RUN_SECONDS]),
    };
    wait_for_exec(w.pid(), spec.name);
    if let Start::Threads(n) = spec.start {
        let tasks = format!("/proc/{}/task", w.pid());
        wait_until(
            Duration::from_secs(10),
            &format!("{} runs {n} threads", spec.name),
            || std::fs::read_dir(&tasks).is_ok_and(|d| d.count() == n + 1),
        );
    }
    w
}

/// Called once the profilers sample: lets a waiting workload go on.
fn go(spec: &Spec, w: &mut Workload) {
    if let Start::Loads(library) = spec.start {
        drop(w.0.stdin.take());
        let maps = format!("/proc/{}/maps", w.pid());
        wait_until(
            Duration::from_secs(10),
            &format!("{} maps {library}", spec.name),
            || std::fs::read_to_string(&maps).is_ok_and(|m| m.contains(library)),
        );
    }
}

/// Whether frame name `frame` is `name` (C++ frames may carry parameters).
fn is_named(frame: &str, name: &str) -> bool {
    frame
        .strip_prefix(name)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('('))
}

/// Whether `chain` (with [`ANY`]) matches the end of `frames`, both root
/// first.
fn ends_with_chain(frames: &[&str], chain: &[&str]) -> bool {
    match chain.split_last() {
        None => true,
        Some((&ANY, rest)) => (0..=frames.len()).any(|n| ends_with_chain(&frames[..n], rest)),
        Some((name, rest)) => frames
            .split_last()
            .is_some_and(|(leaf, below)| is_named(leaf, name) && ends_with_chain(below, rest)),
    }
}

/// The user frames of a stack: kernel frames and inlined frames (not
/// stack frames) left out.
fn user_frames<'a>(frames: &[&'a str]) -> Vec<&'a str> {
    frames
        .iter()
        .filter(|f| !f.ends_with(KERNEL_SUFFIX) && !f.ends_with(INLINED_SUFFIX))
        .copied()
        .collect()
}

/// What one profile says about one workload.
struct Measured {
    total: u64,
    /// Samples whose stack starts at a [`ROOTS`] frame.
    complete: u64,
    /// Samples with kernel frames.
    kernel: u64,
    /// Samples of each part of the spec.
    parts: Vec<u64>,
    /// Samples by their root frame.
    roots: BTreeMap<String, u64>,
    /// Frames still mangled (C++ or Rust).
    mangled: Vec<String>,
}

impl Measured {
    fn of(profile: &FoldedProfile, spec: &Spec) -> Self {
        let mut m = Measured {
            total: 0,
            complete: 0,
            kernel: 0,
            parts: vec![0; spec.parts.len()],
            roots: BTreeMap::new(),
            mangled: Vec::new(),
        };
        for (frames, count) in stacks_of(profile, spec.name) {
            m.total += count;
            let root = frames.first().copied().unwrap_or_default();
            *m.roots.entry(root.to_string()).or_default() += count;
            if ROOTS.contains(&root) {
                m.complete += count;
            }
            if frames.iter().any(|f| f.ends_with(KERNEL_SUFFIX)) {
                m.kernel += count;
            }
            let user = user_frames(&frames);
            for (n, part) in m.parts.iter_mut().zip(&spec.parts) {
                if ends_with_chain(&user, &part.chain) {
                    *n += count;
                }
            }
            m.mangled.extend(
                user.iter()
                    .filter(|f| f.starts_with("_Z") || f.starts_with("_R"))
                    .map(|f| f.to_string()),
            );
        }
        m
    }

    fn percent(&self, n: u64) -> f64 {
        100.0 * n as f64 / self.total.max(1) as f64
    }

    fn complete_share(&self) -> f64 {
        self.percent(self.complete)
    }

    /// One paragraph for logs and assertion messages.
    fn summary(&self, spec: &Spec, who: &str) -> String {
        let parts: Vec<String> = spec
            .parts
            .iter()
            .zip(&self.parts)
            .map(|(p, n)| {
                let chain = compact(&p.chain);
                format!(
                    "  {chain}: {:.1} % (stated {} %)",
                    self.percent(*n),
                    p.share
                )
            })
            .collect();
        let roots: Vec<String> = self.roots.iter().map(|(r, n)| format!("{r} {n}")).collect();
        format!(
            "{who} on {}: {} samples, {:.1} % complete, {:.1} % in the kernel\n{}\n  roots: {}",
            spec.name,
            self.total,
            self.complete_share(),
            self.percent(self.kernel),
            parts.join("\n"),
            roots.join(", "),
        )
    }
}

/// `descend` x 151 instead of 151 names.
fn compact(chain: &[&str]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < chain.len() {
        let run = chain[i..].iter().take_while(|f| **f == chain[i]).count();
        out.push(if run > 1 {
            format!("{} x {run}", chain[i])
        } else {
            chain[i].to_string()
        });
        i += run;
    }
    out.join(";")
}

/// Checks what `profile` says of `spec`'s workload: enough samples, the
/// chains at their shares, names demangled, the kernel's share, and (with
/// `complete_min`) complete stacks. Returns the measurements.
fn check(
    profile: &FoldedProfile,
    spec: &Spec,
    who: &str,
    seconds: f64,
    frequency: u64,
    complete_min: Option<f64>,
) -> Measured {
    let m = Measured::of(profile, spec);
    let summary = m.summary(spec, who);
    eprintln!("{summary}");
    let context = format!("{summary}\n{}", dump(profile, spec.name));
    // The host is shared (builds run beside the tests): the workload may get
    // much less than its CPUs.
    let expected = seconds * frequency as f64 * spec.cpus;
    assert!(
        m.total as f64 >= 0.3 * expected,
        "too few samples (expected ~{expected:.0})\n{context}"
    );
    if let Some(min) = complete_min {
        assert!(
            m.complete_share() >= min,
            "complete stacks below {min} %\n{context}"
        );
    }
    if let Some(min) = spec.kernel_share {
        assert!(
            m.percent(m.kernel) >= min,
            "samples in the kernel below {min} %\n{context}"
        );
    }
    assert!(
        m.mangled.is_empty(),
        "mangled names: {:?}\n{context}",
        m.mangled
    );
    for (part, n) in spec.parts.iter().zip(&m.parts) {
        let share = m.percent(*n);
        assert!(
            *n > 0 && (share - part.share).abs() <= SHARE_TOLERANCE,
            "{} at {share:.1} %, stated {} ± {SHARE_TOLERANCE}\n{context}",
            compact(&part.chain),
            part.share
        );
    }
    m
}

/// How long the agent may take, after a `dlopen`, to load the new
/// library's table (see `versus_perf`): a few milliseconds on a quiet host,
/// more while builds share its CPUs.
const NEW_CODE_GRACE_MS: u64 = 20;

/// The root the agent gives a stack that reached code in no known mapping.
const NO_MAPPING_ROOT: &str = "[stack cut: no_mapping]";

/// perf and the agent record the same run: the agent sees complete stacks
/// and the stated chains and shares, and has complete stacks at least as
/// often as perf.
fn versus_perf(spec: Spec) {
    let mut w = start(&spec);
    let opts = options(vec![w.pid()], AGENT_SECONDS, AGENT_FREQUENCY);
    let (perf_rec, (rec, ())) = perf::record_host(PERF_SECONDS, spec.stack_dump, || {
        record_with(&opts, || go(&spec, &mut w))
    });
    let perf_profile = perf_rec.profile(w.pid());
    check(
        &rec.profile,
        &spec,
        "agent",
        AGENT_SECONDS,
        AGENT_FREQUENCY,
        Some(COMPLETE_MIN),
    );
    let by_perf = Measured::of(&perf_profile, &spec);
    let by_agent = Measured::of(&rec.profile, &spec);
    let summary = format!(
        "{}\n{}",
        by_perf.summary(&spec, "perf"),
        by_agent.summary(&spec, "agent")
    );
    eprintln!("{summary}");
    assert!(
        by_perf.total > 0 && by_agent.total > 0,
        "no samples\n{summary}"
    );
    // perf unwinds after the fact, knowing every mapping; the agent unwinds
    // in the kernel and needs a library's table before its code runs. The
    // samples in the milliseconds between a `dlopen` and the agent loading
    // the library's table stop at the unknown code and are cut as
    // `no_mapping`: up to NEW_CODE_GRACE_MS of them are allowed, and no
    // other kind of cut.
    let grace = (NEW_CODE_GRACE_MS * AGENT_FREQUENCY).div_ceil(1000);
    let new_code = by_agent.roots.get(NO_MAPPING_ROOT).copied().unwrap_or(0);
    let expected =
        by_perf.complete_share() / 100.0 * by_agent.total as f64 - new_code.min(grace) as f64;
    assert!(
        by_agent.complete as f64 >= expected,
        "the agent has fewer complete stacks than perf\n{summary}\nagent:\n{}\nperf:\n{}",
        dump(&rec.profile, spec.name),
        dump(&perf_profile, spec.name)
    );
}

macro_rules! unwind_tests {
    ($($spec:expr => $versus:ident;)*) => {$(
        #[test]
        fn $versus() {
            if !privileged() {
                return;
            }
            let _serial = serial();
            versus_perf($spec);
        }
    )*};
}

unwind_tests! {
    nofp("nofp") => nofp_agent_vs_perf;
    nofp("nofp_nopie") => nofp_nopie_agent_vs_perf;
    qsort_cb() => qsort_cb_agent_vs_perf;
    cxx() => cxx_agent_vs_perf;
    rust_release() => rust_release_agent_vs_perf;
    dlopen_main() => dlopen_agent_vs_perf;
    threads() => threads_agent_vs_perf;
    signal() => signal_agent_vs_perf;
    recurse() => recurse_agent_vs_perf;
    bigframe() => bigframe_agent_vs_perf;
    unwind_syscalls() => syscalls_agent_vs_perf;
}

/// The chain matcher: anchored at the leaf, `*` for any frames, C++
/// parameters ignored.
#[test]
fn chains_match_at_the_leaf() {
    let frames = ["_start", "main", "run", "qsort_r", "msort", "by_key(int)"];
    assert!(ends_with_chain(&frames, &["main", "run", ANY, "by_key"]));
    assert!(ends_with_chain(
        &frames,
        &["run", "qsort_r", "msort", "by_key"]
    ));
    assert!(ends_with_chain(&frames, &["main", ANY]));
    assert!(!ends_with_chain(&frames, &["main", "run"]));
    assert!(!ends_with_chain(&frames, &["main", "qsort_r", ANY]));
    assert!(!ends_with_chain(&frames, &["by_k"]));
    assert!(!ends_with_chain(&["run"], &["main", "run"]));
    assert_eq!(
        user_frames(&["main", "work_[i]", "leaf", "write_[k]"]),
        vec!["main", "leaf"]
    );
}

/// `perf script` output folded like the agent's profile.
#[test]
fn perf_script_is_folded() {
    let text = "\
nofp 100/100
\t    55d0c7e4a139 leaf_a (/tmp/nofp)
\t    55d0c7e4a1b2 main (/tmp/nofp)
\t    7f0000001000 __libc_start_main@@GLIBC_2.34 (/usr/lib/x86_64-linux-gnu/libc.so.6)

nofp 100/100
\tffffffff81000000 do_syscall_64 ([kernel.kallsyms])
\t    7f0000002000 [unknown] ([unknown])
\t    55d0c7e4a1b2 rust_release::main::h0123456789abcdef (/tmp/x)
\tffffffffffffffff [unknown] ([unknown])

my thread 100/101
\t    55d0c7e4a139 std::vector<int, std::allocator<int> >::size (/tmp/nofp)
";
    assert_eq!(
        perf::parse_script(text).lines(),
        vec![
            "my thread;std::vector<int, std::allocator<int> >::size 1",
            "nofp;[unknown];rust_release::main;[unknown];do_syscall_64_[k] 1",
            "nofp;__libc_start_main;main;leaf_a 1",
        ]
    );
}
