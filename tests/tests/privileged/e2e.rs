//! End-to-end: the real agent profiles real workloads, and we check what a
//! user would check in the flame graph. Needs root (see `crate::support::privileged`).

use std::{path::Path, process::Command, time::Duration};

use crate::support::*;

/// C built with frame pointers: the hot path main -> outer -> inner_hot
/// appears in that order under the process name.
#[test]
fn c_call_chain_in_order() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rec = profile_workload("chain", 3.0, 99);
    let (matching, total) = count_where(&rec.profile, "chain", |f| {
        has_chain(f, &["main", "outer", "inner_hot"]) && f.last() == Some(&"inner_hot")
    });
    assert!(
        total >= 200,
        "too few samples of chain: {total}\n{}",
        dump(&rec.profile, "chain")
    );
    assert!(
        matching * 100 >= total * 90,
        "main;outer;inner_hot in {matching} of {total} samples\n{}",
        dump(&rec.profile, "chain")
    );
    // Only the filtered process is in the profile.
    assert!(rec.profile.iter().all(|(s, _)| s.starts_with("chain;")));
}

/// Time split 3:1 between work_a and work_b: the measured share is within
/// 5 percentage points of 75 %.
#[test]
fn ratio_of_two_functions_within_five_points() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rec = profile_workload("ratio", 4.0, 499);
    let (a, _) = count_where(&rec.profile, "ratio", |f| f.contains(&"work_a"));
    let (b, _) = count_where(&rec.profile, "ratio", |f| f.contains(&"work_b"));
    assert!(
        a + b >= 1000,
        "too few samples: a={a} b={b}\n{}",
        dump(&rec.profile, "ratio")
    );
    let share = 100.0 * a as f64 / (a + b) as f64;
    assert!(
        (share - 75.0).abs() <= 5.0,
        "work_a share {share:.1}% (a={a}, b={b}), expected 75 ± 5\n{}",
        dump(&rec.profile, "ratio")
    );
}

/// Rust with frame pointers: function names appear demangled.
#[test]
fn rust_names_are_demangled() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rec = profile_workload("rustwork", 3.0, 99);
    // Inlined callees of the hot loop may sit above it as `_[i]` frames.
    let (hot, total) = count_where(&rec.profile, "rustwork", |f| {
        has_chain(f, &["rustwork::main", "rustwork::crunch::hot_rust_loop"])
            && f.iter()
                .skip_while(|x| **x != "rustwork::crunch::hot_rust_loop")
                .skip(1)
                .all(|x| x.ends_with("_[i]"))
    });
    assert!(
        total > 100 && hot * 100 >= total * 80,
        "rustwork::main -> rustwork::crunch::hot_rust_loop in {hot} of {total} samples\n{}",
        dump(&rec.profile, "rustwork")
    );
    assert!(
        rec.profile.iter().all(|(s, _)| !s.contains("_ZN")),
        "mangled names left:\n{}",
        dump(&rec.profile, "rustwork")
    );
}

/// Go (Debian's golang-go): main.hotGoLoop under main.main.
#[test]
fn go_hot_function_under_main_main() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rec = profile_workload("gowork", 3.0, 99);
    let (hot, total) = count_where(&rec.profile, "gowork", |f| {
        has_chain(f, &["main.main", "main.hotGoLoop"])
    });
    assert!(
        total > 100 && hot * 100 >= total * 80,
        "main.main;main.hotGoLoop in {hot} of {total} samples\n{}",
        dump(&rec.profile, "gowork")
    );
}

/// A process that runs ~300 ms and exits before the drain still gets named
/// frames: its mappings were captured at its first sample. A second one,
/// started after the first was forgotten (its binary closed, its fd number
/// free for reuse), must get its own names, not the first one's.
#[test]
fn short_lived_processes_are_still_named() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    // Distinct names, so we find them among everything on the host.
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("shortlived");
    let second = dir.path().join("shortlived2");
    std::fs::copy(workload("chain"), &first).unwrap();
    std::fs::copy(workload("ratio"), &second).unwrap();
    // Drains at 1, 2, 3 s: the first process exits at ~0.5 s, is marked gone
    // at the 1 s drain and forgotten at the 2 s drain; the second runs after.
    let opts = options(vec![], 4.0, 999);
    let (rec, statuses) = record_with(&opts, || {
        // The schedule: the first process runs from 0.2 s to ~0.5 s.
        std::thread::sleep(Duration::from_millis(200));
        let a = Workload::spawn(&first, &["0.3"]).wait();
        // The schedule: the second starts once the 2 s drain forgot the first.
        std::thread::sleep(Duration::from_millis(2_000));
        let b = Workload::spawn(&second, &["0.5"]).wait();
        (a, b)
    });
    assert!(statuses.0.success() && statuses.1.success());
    let (named, total) = count_where(&rec.profile, "shortlived", |f| {
        has_chain(f, &["main", "outer", "inner_hot"])
    });
    assert!(
        total >= 50 && named * 100 >= total * 80,
        "first process named in {named} of {total} samples\n{}",
        dump(&rec.profile, "shortlived")
    );
    let (named, total) = count_where(&rec.profile, "shortlived2", |f| {
        f.contains(&"main") && (f.contains(&"work_a") || f.contains(&"work_b"))
    });
    let (wrong, _) = count_where(&rec.profile, "shortlived2", |f| {
        f.iter().any(|x| *x == "inner_hot" || *x == "outer")
    });
    assert!(
        total >= 50 && named * 100 >= total * 80 && wrong == 0,
        "second process named in {named} of {total} samples, {wrong} with the first one's names\n{}",
        dump(&rec.profile, "shortlived2")
    );
}

/// A binary that only exists in another mount namespace (a private tmpfs)
/// is still read, through /proc/PID/map_files.
#[test]
fn binary_in_other_mount_namespace_is_named() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let bin = workload("chain");
    let mnt = tempfile::tempdir().unwrap();
    let script = format!(
        "mount -t tmpfs tmpfs {mnt} && cp {bin} {mnt}/nsworkload && exec {mnt}/nsworkload 6",
        mnt = mnt.path().display(),
        bin = bin.display()
    );
    let w = Workload::spawn_command(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(&script),
    );
    // Wait until the workload runs from its private tmpfs.
    wait_for_exec(w.pid(), "nsworkload");
    assert!(
        !mnt.path().join("nsworkload").exists(),
        "the binary must not be visible from the host's mount namespace"
    );
    let (rec, _) = record_with(&options(vec![w.pid()], 3.0, 99), || ());
    let (named, total) = count_where(&rec.profile, "nsworkload", |f| {
        has_chain(f, &["main", "outer", "inner_hot"])
    });
    assert!(
        total > 100 && named * 100 >= total * 80,
        "named in {named} of {total} samples\n{}",
        dump(&rec.profile, "nsworkload")
    );
}

/// A syscall-heavy workload shows kernel frames, suffixed `_[k]`, above its
/// user frames. (libc's syscall wrappers set up no frame, so the walk skips
/// their caller `copy_chunk`: the documented frame-pointer leaf caveat.)
#[test]
fn kernel_frames_for_syscalls() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rec = profile_workload("syscalls", 3.0, 99);
    let (in_kernel, total) = count_where(&rec.profile, "syscalls", |f| {
        let Some(first_k) = f.iter().position(|x| x.ends_with("_[k]")) else {
            return false;
        };
        // User frames below, kernel frames above, never mixed.
        f[..first_k].contains(&"main") && f[first_k..].iter().all(|x| x.ends_with("_[k]"))
    });
    let (read_path, _) = count_where(&rec.profile, "syscalls", |f| {
        has_chain(f, &["vfs_read_[k]", "read_zero_[k]"])
    });
    assert!(
        total > 100 && in_kernel * 100 >= total * 50 && read_path > 0,
        "copy_chunk -> kernel frames in {in_kernel} of {total} samples, read path in {read_path}\n{}",
        dump(&rec.profile, "syscalls")
    );
}

/// A normal whole-host run: every drop counter reads zero, and every sample
/// the kernel recorded is in the profile (the A/B drain loses nothing).
#[test]
fn normal_run_has_no_drops_and_loses_nothing() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let bin = workload("chain");
    let _w = Workload::spawn(&bin, &["6"]);
    let (rec, _) = record_with(&options(vec![], 3.0, 99), || ());
    let drops = profiler_agent::summary::nonzero_drops(&rec);
    assert!(drops.is_empty(), "drops in a normal run: {drops:?}");
    let recorded = rec.counters.get(profiler_common::Counter::Recorded);
    assert!(recorded > 250, "recorded only {recorded} samples");
    assert_eq!(
        rec.profile.total(),
        recorded,
        "samples recorded by the kernel vs samples in the profile"
    );
    // ~99 Hz on the busy CPU for 3 s, plus whatever else ran.
    let (chain, _) = count_where(&rec.profile, "chain", |_| true);
    assert!(
        (230..=310).contains(&chain),
        "chain got {chain} samples in 3 s at 99 Hz"
    );
}

/// The command line: `record -p PID` writes the SVG and folded files and
/// prints the summary; bad arguments give clear errors.
#[test]
fn cli_record_and_errors() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let agent = agent_binary();
    let bin = workload("chain");
    let w = Workload::spawn(&bin, &["5"]);
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("flame.svg");
    let folded = dir.path().join("out.folded");
    let out = Command::new(&agent)
        .args([
            "record",
            "-d",
            "2s",
            "-F",
            "199",
            "-p",
            &w.pid().to_string(),
            "-o",
        ])
        .arg(&svg)
        .arg("--folded")
        .arg(&folded)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("inner_hot"),
        "summary lacks the top function:\n{stdout}"
    );
    assert!(stdout.contains("Drops: none."), "{stdout}");
    assert!(stdout.contains(&svg.display().to_string()));
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.contains("inner_hot"));
    assert!(svg_text.contains("at 199 Hz"));
    let folded_text = std::fs::read_to_string(&folded).unwrap();
    assert!(folded_text
        .lines()
        .any(|l| l.starts_with("chain;") && l.contains("main;outer;inner_hot")));

    let fail = |args: &[&str]| {
        let out = Command::new(&agent).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = fail(&["record", "-F", "0", "-d", "1s"]);
    assert!(err.contains("between 1 and 10000"), "{err}");
    let err = fail(&["record", "-F", "20000", "-d", "1s"]);
    assert!(err.contains("between 1 and 10000"), "{err}");
    let err = fail(&[
        "record",
        "-p",
        "999999999",
        "-d",
        "1s",
        "-o",
        &dir.path().join("x.svg").display().to_string(),
    ]);
    assert!(err.contains("no process with pid 999999999"), "{err}");
    let err = fail(&["record", "-d", "1s", "-o", "/nonexistent-dir/x.svg"]);
    assert!(err.contains("cannot write /nonexistent-dir/x.svg"), "{err}");
    assert!(!Path::new("/nonexistent-dir").exists());

    // Without privileges the error names the capability.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&agent)
        .args(["record", "-d", "1s", "-o", "/dev/null"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("missing privileges") && err.contains("CAP_BPF"),
        "{err}"
    );
}

/// Once loaded and attached, the agent keeps only the capabilities it still
/// uses, says which in its log, and still profiles correctly.
#[test]
fn agent_drops_capabilities_after_attach() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let w = Workload::spawn(&workload("chain"), &["8"]);
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("out.folded");
    let log_path = dir.path().join("agent.log");
    let mut agent = Command::new(agent_binary())
        .args([
            "record",
            "-d",
            "3s",
            "--drain-interval",
            "1s",
            "--no-progress",
            "-p",
            &w.pid().to_string(),
            "-o",
        ])
        .arg(dir.path().join("out.svg"))
        .arg("--folded")
        .arg(&folded)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the agent logs that it dropped its capabilities",
        || {
            std::fs::read_to_string(&log_path)
                .is_ok_and(|log| log.contains("dropped every other capability"))
        },
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.id())).unwrap();
    let effective = profiler_agent::privileges::parse_cap_eff(&status).unwrap();
    let exit = agent.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(exit.success(), "{log}");
    use profiler_agent::privileges::{CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE};
    assert_eq!(
        effective & (1 << CAP_PERFMON),
        0,
        "PERFMON dropped: {effective:x}"
    );
    assert_eq!(
        effective & (1 << CAP_SYS_ADMIN),
        0,
        "SYS_ADMIN dropped: {effective:x}"
    );
    assert_ne!(
        effective & (1 << CAP_BPF),
        0,
        "BPF kept for the maps: {effective:x}"
    );
    assert_ne!(
        effective & (1 << CAP_SYS_PTRACE),
        0,
        "SYS_PTRACE kept: {effective:x}"
    );
    assert!(
        log.contains("dropped every other capability") && log.contains("CAP_SYS_PTRACE"),
        "{log}"
    );
    let text = std::fs::read_to_string(&folded).unwrap();
    assert!(
        text.lines().any(|l| l.contains("main;outer;inner_hot")),
        "{text}"
    );
}
