//! Shared helpers of the end-to-end tests: privilege checks, workload
//! builds, running the agent and reading its profile like a user would.
#![allow(dead_code)]

pub mod clickhouse;
pub mod collector;
pub mod perf;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use profiler_agent::{
    config::{RecordOptions, SamplerOptions},
    fold::FoldedProfile,
    record::{Recorder, Recording},
};
// Not every test file uses each of them.
#[allow(unused_imports)]
pub use profiler_testkit::{wait_for, wait_until, within};

/// Whether the privileged tests can run here. Without root they are skipped
/// with a printed reason, except in CI (`CI` set), where that is a failure.
/// Root on a kernel with BPF and perf events always runs them: a load or
/// attach failure then fails the test.
pub fn privileged() -> bool {
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root (the tests load eBPF programs)")
    } else if !Path::new("/sys/fs/bpf").exists()
        && !Path::new("/proc/sys/kernel/bpf_stats_enabled").exists()
    {
        Some("the kernel has no BPF support (CONFIG_BPF_SYSCALL)")
    } else if !Path::new("/proc/sys/kernel/perf_event_paranoid").exists() {
        Some("the kernel has no perf events (CONFIG_PERF_EVENTS)")
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) if std::env::var_os("CI").is_some() => {
            panic!("privileged test cannot run in CI: {reason}")
        }
        Some(reason) => {
            eprintln!("SKIPPED: {reason}");
            false
        }
    }
}

/// Profiling tests run one at a time: they share two CPUs.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn workloads_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads")
}

fn build_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("workloads");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_build(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the build of {what}: {e}"));
    assert!(
        out.status.success(),
        "building {what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds (once per test run) the workload `name` and returns its path.
/// The first workloads (`workloads/*`) are built with frame pointers (Go
/// keeps them by default); the unwinding ones (`workloads/unwind/`) without,
/// as distributions and `cargo build --release` build software.
pub fn workload(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(n, _)| n == name) {
        return path.clone();
    }
    let src = workloads_src();
    let unwind = src.join("unwind");
    let out = build_dir().join(name);
    let compile = |compiler: &str, flags: &[&str], source: &str, out: &Path| {
        run_build(
            Command::new(compiler)
                .args(flags)
                .arg("-o")
                .arg(out)
                .arg(unwind.join(source)),
            name,
        )
    };
    match name {
        "chain" | "ratio" | "syscalls" => run_build(
            Command::new("gcc")
                .args(["-O0", "-g", "-fno-omit-frame-pointer", "-o"])
                .arg(&out)
                .arg(src.join(format!("{name}.c"))),
            name,
        ),
        "rustwork" => run_build(
            Command::new("rustc")
                .args([
                    "--edition=2021",
                    "-C",
                    "opt-level=1",
                    "-C",
                    "force-frame-pointers=yes",
                    "-g",
                    "-o",
                ])
                .arg(&out)
                .arg(src.join("rustwork.rs")),
            name,
        ),
        "gowork" | "gcalloc" | "gopprof" => {
            let cache = build_dir().join("go-cache");
            run_build(
                Command::new("go")
                    .args(["build", "-o"])
                    .arg(&out)
                    .arg(src.join(format!("{name}.go")))
                    .env("GOCACHE", &cache)
                    .env("GOPATH", build_dir().join("go-path"))
                    .env("GO111MODULE", "off"),
                name,
            )
        }
        "nofp" => compile(
            "gcc",
            &["-O2", "-fomit-frame-pointer", "-g"],
            "nofp.c",
            &out,
        ),
        "nofp_nopie" => compile(
            "gcc",
            &["-O2", "-fomit-frame-pointer", "-g", "-no-pie"],
            "nofp.c",
            &out,
        ),
        "qsort_cb" | "signal" | "recurse" | "bigframe" => {
            compile("gcc", &["-O2", "-g"], &format!("{name}.c"), &out)
        }
        // The frame-pointer `syscalls` keeps its name.
        "unwind_syscalls" => compile("gcc", &["-O2", "-g"], "syscalls.c", &out),
        "threads" => compile("gcc", &["-O2", "-g", "-pthread"], "threads.c", &out),
        // The benchmarks' context-switch load.
        "switch" => run_build(
            Command::new("gcc")
                .args(["-O2", "-g", "-pthread", "-o"])
                .arg(&out)
                .arg(src.join("../../xtask/workloads/switch.c")),
            name,
        ),
        "offcpu" => run_build(
            Command::new("gcc")
                .args(["-O2", "-g", "-pthread", "-o"])
                .arg(&out)
                .arg(src.join("offcpu/offcpu.c")),
            name,
        ),
        "cxx" => compile("g++", &["-O2", "-g"], "cxx.cpp", &out),
        "short_lived" => compile(
            "gcc",
            &["-O2", "-g", "-fno-omit-frame-pointer"],
            "short_lived.c",
            &out,
        ),
        "rust_release" => compile(
            "rustc",
            &[
                "--edition=2021",
                "-C",
                "opt-level=3",
                "-C",
                "strip=debuginfo",
            ],
            "rust_release.rs",
            &out,
        ),
        // dlopen_main loads the library from its own directory.
        "dlopen_main" => {
            compile(
                "gcc",
                &["-O2", "-g", "-fPIC", "-shared"],
                "dlopen_lib.c",
                &build_dir().join("libdlopen_lib.so"),
            );
            compile("gcc", &["-O2", "-g"], "dlopen_main.c", &out);
        }
        other => panic!("unknown workload {other}"),
    }
    built.push((name.to_string(), out.clone()));
    out
}

/// Waits until process `pid` runs the binary named `name` (its exec is
/// done: the image is mapped, and a shell that ran first is gone).
pub fn wait_for_exec(pid: u32, name: &str) {
    let exe = format!("/proc/{pid}/exe");
    wait_until(
        Duration::from_secs(10),
        &format!("process {pid} runs {name}"),
        || std::fs::read_link(&exe).is_ok_and(|p| p.file_name().is_some_and(|f| f == name)),
    );
}

/// A `kB` field of /proc/PID/status (`VmHWM`, `RssAnon`), in bytes; 0
/// when the process or the field is gone.
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(field))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib << 10)
}

/// The body of `GET url`, or `None` if the server did not answer 2xx (not
/// up yet, or down).
pub fn scrape(url: &str) -> Option<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut resp = agent.get(url).call().ok()?;
    resp.body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .ok()
}

/// In Prometheus text `text`: the sum of a family's samples (`name` or
/// `name{...}` lines), or of one series when `name` has labels.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            *series == name || (!name.contains('{') && series.starts_with(&format!("{name}{{")))
        })
        .map(|(_, v)| v.parse::<u64>().unwrap())
        .sum()
}

/// A child process killed when dropped.
pub struct Workload(pub Child);

impl Workload {
    pub fn spawn(path: &Path, args: &[&str]) -> Self {
        Self::spawn_command(Command::new(path).args(args))
    }

    pub fn spawn_command(cmd: &mut Command) -> Self {
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start workload {cmd:?}: {e}"));
        Workload(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn wait(mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Record options for a test: short drain interval so several drains happen.
pub fn options(pids: Vec<u32>, seconds: f64, frequency: u64) -> RecordOptions {
    RecordOptions {
        sampler: SamplerOptions {
            frequency,
            pids,
            ..SamplerOptions::default()
        },
        duration: Some(Duration::from_secs_f64(seconds)),
        drain_interval: Duration::from_secs(1),
        ..RecordOptions::default()
    }
}

/// Records with `options`; `during` runs once the sampler is attached.
pub fn record_with<T>(options: &RecordOptions, during: impl FnOnce() -> T) -> (Recording, T) {
    let recorder = Recorder::start(options).expect("the profiler must load and attach as root");
    let value = during();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let recording = recorder.run(&stop).expect("recording failed");
    (recording, value)
}

/// Runs workload `name` for longer than the recording and records only its
/// process for `seconds` at `frequency` Hz.
pub fn profile_workload(name: &str, seconds: f64, frequency: u64) -> Recording {
    let bin = workload(name);
    let runtime = format!("{}", seconds * 2.0);
    let w = Workload::spawn(&bin, &[&runtime]);
    let (recording, _) = record_with(&options(vec![w.pid()], seconds, frequency), || ());
    recording
}

/// Stacks of one process as (frames root first, count); the process name
/// (first frame) is left out.
pub fn stacks_of<'a>(profile: &'a FoldedProfile, process: &str) -> Vec<(Vec<&'a str>, u64)> {
    profile
        .iter()
        .filter_map(|(stack, count)| {
            let mut frames = stack.split(';');
            (frames.next() == Some(process)).then(|| (frames.collect(), count))
        })
        .collect()
}

/// Samples of a process whose stack satisfies `pred`, and all its samples.
pub fn count_where(
    profile: &FoldedProfile,
    process: &str,
    pred: impl Fn(&[&str]) -> bool,
) -> (u64, u64) {
    let stacks = stacks_of(profile, process);
    let total = stacks.iter().map(|(_, c)| c).sum();
    let matching = stacks.iter().filter(|(f, _)| pred(f)).map(|(_, c)| c).sum();
    (matching, total)
}

/// Whether `chain` appears as consecutive frames in `frames`.
pub fn has_chain(frames: &[&str], chain: &[&str]) -> bool {
    frames.windows(chain.len()).any(|w| w == chain)
}

/// A readable dump of a process's stacks for assertion messages.
pub fn dump(profile: &FoldedProfile, process: &str) -> String {
    let mut stacks = stacks_of(profile, process);
    stacks.sort_by_key(|s| std::cmp::Reverse(s.1));
    stacks
        .iter()
        .take(15)
        .map(|(f, c)| format!("  {c:>6} {}", f.join(";")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The agent binary built next to this test (by `cargo xtask test`).
pub fn agent_binary() -> PathBuf {
    built_binary("profiler-agent")
}

/// The collector binary built next to this test (by `cargo xtask test`).
pub fn collector_binary() -> PathBuf {
    built_binary("profiler-collector")
}

/// The agent's release build (`cargo build --release -p profiler-agent`,
/// done by `cargo xtask test`), for what is measured as deployed.
pub fn release_agent_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/release/profiler-agent
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("release/profiler-agent");
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build --release -p profiler-agent`, done by \
         `cargo xtask test`)",
        path.display()
    );
    path
}

fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p {name}`, done by `cargo xtask test`)",
        path.display()
    );
    path
}

/// Runs headless Chromium (Debian's, no network, a fresh profile) on `url`
/// with `args` (e.g. `--dump-dom`); returns what it printed.
pub fn chromium(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=8000",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("Debian's chromium (installed by `cargo xtask setup`) must be on PATH");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Outermost frames of a complete user stack: the main thread's (`_start`
/// and glibc's start-up functions) and other threads' (glibc's `clone3` and
/// what it calls).
pub const ROOTS: &[&str] = &[
    "_start",
    "__libc_start_main",
    "__libc_start_main_impl",
    "__libc_start_call_main",
    "clone",
    "clone3",
    "start_thread",
];

/// pyenv's CPython 3.`minor`; the set-up's machines have 3.10 to 3.13.
pub fn pyenv_python(minor: u32) -> PathBuf {
    profiler_testkit::pyenv_python(minor)
        .unwrap_or_else(|| panic!("no CPython 3.{minor} installed with pyenv"))
}

/// The heaviest stacks of a profile, one a line, for assertion messages.
pub fn heaviest(profile: &FoldedProfile, n: usize) -> String {
    let mut stacks: Vec<(&str, u64)> = profile.iter().collect();
    stacks.sort_by_key(|(_, c)| std::cmp::Reverse(*c));
    stacks
        .iter()
        .take(n)
        .map(|(s, c)| format!("  {c:>6} {s}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The Python workload of the Python and JIT tests.
pub fn pywork() -> PathBuf {
    workloads_src().join("python/pywork.py")
}
