//! perf as the reference for user stacks without frame pointers:
//! `perf record --call-graph dwarf` copies the top of each sampled stack and
//! `perf script` unwinds it afterwards with the binaries' call-frame
//! information. [`record_host`] records the whole host (`-a`: `-p PID` gets
//! no samples with this kernel and Debian's perf 6.1) while a closure runs;
//! [`PerfRecording::profile`] reads one process back in the agent's folded
//! shape (`process;root;...;leaf`, kernel frames suffixed `_[k]`), so one
//! checker serves both.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use profiler_agent::{fold::FoldedProfile, symbolize::KERNEL_SUFFIX};

use super::wait_until;

/// Sampling frequency of the reference recordings.
pub const FREQUENCY: u64 = 199;
/// perf's default stack dump per sample (bytes from the stack pointer up).
pub const DEFAULT_STACK_DUMP: u32 = 8192;
/// perf's largest stack dump: reaches past a 40 KiB frame.
pub const MAX_STACK_DUMP: u32 = 65528;

/// Addresses from here up are the kernel's (x86-64).
const KERNEL_START: u64 = 0xffff_8000_0000_0000;

/// A finished `perf record` of the whole host.
pub struct PerfRecording {
    dir: tempfile::TempDir,
    /// What `perf record` printed (sizes, lost chunks).
    pub log: String,
}

/// Records every CPU at [`FREQUENCY`] Hz with `--call-graph dwarf,STACK_DUMP`
/// for `seconds`; `during` runs once perf samples.
pub fn record_host<T>(
    seconds: f64,
    stack_dump: u32,
    during: impl FnOnce() -> T,
) -> (PerfRecording, T) {
    let dir = tempfile::tempdir().unwrap();
    let perf = Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", &FREQUENCY.to_string()])
        .args(["--call-graph", &format!("dwarf,{stack_dump}")])
        // No build-id cache in ~/.debug: the binaries stay where they are.
        .args(["-a", "-N", "-o"])
        .arg(data_path(dir.path()))
        .args(["--", "sleep", &seconds.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("perf (Debian's linux-perf) must be on PATH");
    // perf enables its events before it lets its workload exec: once the
    // child runs `sleep`, perf samples.
    let children = format!("/proc/{0}/task/{0}/children", perf.id());
    wait_until(Duration::from_secs(20), "perf record runs `sleep`", || {
        std::fs::read_to_string(&children).is_ok_and(|c| {
            c.split_whitespace().any(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe"))
                    .is_ok_and(|exe| exe.file_name().is_some_and(|f| f == "sleep"))
            })
        })
    });
    let value = during();
    let out = perf.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "perf record failed:\n{log}");
    (PerfRecording { dir, log }, value)
}

fn data_path(dir: &Path) -> PathBuf {
    dir.join("perf.data")
}

impl PerfRecording {
    /// The samples of process `pid`, unwound by `perf script`, as folded
    /// stacks: the thread's name, user frames root first, then kernel frames.
    pub fn profile(&self, pid: u32) -> FoldedProfile {
        let out = Command::new("perf")
            .args(["script", "-F", "comm,pid,tid,ip,sym,dso"])
            // Inlined frames need addr2line (slow) and are not stack frames.
            .args([
                "--no-inline",
                "--max-stack",
                "1024",
                "--pid",
                &pid.to_string(),
                "-i",
            ])
            .arg(data_path(self.dir.path()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "perf script failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_script(&String::from_utf8_lossy(&out.stdout))
    }
}

/// Folds `perf script -F comm,pid,tid,ip,sym,dso` output: a sample is a
/// header line (`comm pid/tid`) and its frames, one per indented line
/// (`address symbol (dso)`, leaf first), ended by a blank line.
pub fn parse_script(text: &str) -> FoldedProfile {
    let mut stacks: HashMap<(String, Vec<String>), u64> = HashMap::new();
    let mut sample: Option<(String, Vec<String>)> = None;
    let mut finish = |sample: &mut Option<(String, Vec<String>)>| {
        if let Some((comm, mut frames)) = sample.take() {
            frames.reverse();
            *stacks.entry((comm, frames)).or_default() += 1;
        }
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            finish(&mut sample);
        } else if line.starts_with(char::is_whitespace) {
            if let Some((_, frames)) = sample.as_mut() {
                frames.push(frame_name(line.trim()));
            }
        } else {
            finish(&mut sample);
            // The thread's name may hold spaces; `pid/tid` is the last word.
            let comm = line.trim_end().rsplit_once(' ').map_or(line, |(c, _)| c);
            sample = Some((comm.trim().to_string(), Vec::new()));
        }
    }
    finish(&mut sample);
    let mut profile = FoldedProfile::default();
    for ((comm, frames), count) in stacks {
        profile.add(&comm, &frames, count);
    }
    profile
}

/// `55d0c7e4a139 leaf_a (/path/nofp)` -> `leaf_a`; kernel addresses get
/// `_[k]`; Rust's hash suffix (`::h0123456789abcdef`) and symbol versions
/// (`@@GLIBC_2.34`) are dropped, as the agent's symbolizer does.
fn frame_name(line: &str) -> String {
    let (address, rest) = line.split_once(' ').unwrap_or((line, ""));
    let (symbol, dso) = rest.rsplit_once(" (").unwrap_or((rest, ""));
    let symbol = symbol.trim();
    // perf ends a stack it could not unwind further with `ffffffffffffffff
    // [unknown] ([unknown])`: a user frame it cannot name.
    let kernel = u64::from_str_radix(address, 16).is_ok_and(|a| a >= KERNEL_START)
        && !matches!(dso.trim_end_matches(')'), "[unknown]" | "[vsyscall]");
    let symbol = strip_rust_hash(if symbol.is_empty() {
        "[unknown]"
    } else {
        symbol
    });
    // `__libc_start_main@@GLIBC_2.34` -> `__libc_start_main`; `write@plt` stays.
    let symbol = match symbol.split_once('@') {
        Some((name, version)) if version != "plt" => name,
        _ => symbol,
    };
    if kernel {
        format!("{symbol}{KERNEL_SUFFIX}")
    } else {
        symbol.to_string()
    }
}

fn strip_rust_hash(symbol: &str) -> &str {
    match symbol.rsplit_once("::h") {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name
        }
        _ => symbol,
    }
}
