//! Go's GC tax, end to end: a Go program that allocates heavily and writes
//! a CPU profile of itself; the agent (recognising Go from the binary's
//! build info) streams its samples to a collector, whose `/api/v1/go/gc`
//! shares must match those `go tool pprof` computes from the program's own
//! profile.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use crate::support::{collector::*, *};

/// `cum%` of each function of `go tool pprof -top -cum` output, as a share.
fn pprof_cum_shares(top: &str) -> std::collections::HashMap<String, f64> {
    top.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // flat flat% sum% cum cum% name [(inline)]
            let cum = fields.get(4)?.strip_suffix('%')?.parse::<f64>().ok()?;
            Some((fields.get(5)?.to_string(), cum / 100.0))
        })
        .collect()
}

#[test]
fn go_gc_shares_match_the_programs_own_profile() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let c = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    let own_profile = dir.path().join("own.prof");
    let bin = workload("gcalloc");
    let mut child = Command::new(&bin)
        .arg("8")
        .arg(&own_profile)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for_exec(pid, "gcalloc");
    let mut opts = options(vec![pid], 9.5, 999);
    opts.export = Some(export_to(&c));
    let (_rec, ()) = record_with(&opts, || {
        // The program starts its work (and its own profile) once the agent
        // is attached.
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
    });
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "workload failed: {out:?}");

    // Go is told from the build info: the labels say so.
    let runtimes: Vec<String> = serde_json::from_slice(&http_get(
        c.http_addr,
        "/api/v1/labels/runtime/values?start=now-1h",
    ))
    .unwrap();
    assert_eq!(runtimes, ["go"]);
    let versions: Vec<String> = serde_json::from_slice(&http_get(
        c.http_addr,
        "/api/v1/labels/go_version/values?start=now-1h",
    ))
    .unwrap();
    assert!(
        versions.len() == 1 && versions[0].starts_with("go1."),
        "{versions:?}"
    );

    let gc: serde_json::Value =
        serde_json::from_slice(&http_get(c.http_addr, "/api/v1/go/gc?start=now-1h&n=5")).unwrap();
    let processes = gc["processes"].as_array().unwrap();
    assert_eq!(processes.len(), 1, "{gc:#}");
    let p = &processes[0];
    assert_eq!(p["process"], "gcalloc");
    let samples = p["samples"].as_u64().unwrap();
    assert!(samples > 3000, "{samples} samples");

    let top = Command::new("go")
        .args(["tool", "pprof", "-top", "-cum", "-nodecount=500"])
        .arg(&bin)
        .arg(&own_profile)
        .env("HOME", dir.path())
        .output()
        .expect("go on PATH");
    let top_text = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "{top_text}");
    let truth = pprof_cum_shares(&top_text);
    let folded = folded(c.http_addr, "%7Bprocess%3D%22gcalloc%22%7D");
    for (figure, function) in [
        ("alloc", "runtime.mallocgc"),
        ("assist", "runtime.gcAssistAlloc"),
        ("mark_background", "runtime.gcBgMarkWorker"),
    ] {
        let ours = p[figure]["share"].as_f64().unwrap();
        let theirs = truth.get(function).copied().unwrap_or(0.0);
        eprintln!(
            "{figure}: agent {:.1} %, go tool pprof {:.1} %",
            ours * 100.0,
            theirs * 100.0
        );
        assert!(
            (ours - theirs).abs() <= 0.03,
            "{figure}: the agent says {:.1} %, pprof's cum% of {function} {:.1} %\n\
             pprof:\n{top_text}\nagent:\n{}",
            ours * 100.0,
            theirs * 100.0,
            dump(&folded, "gcalloc")
        );
    }
    // Stacks are whole (Go's compressed .debug_frame is read) and hold no
    // made-up frames past the system stack (the walk ends at
    // runtime.systemstack). What is cut is rare: the exit's unmapping, and
    // Go's own signal handler (its return trampoline is not a signal frame
    // the walk knows).
    let (unknown, all) = count_where(&folded, "gcalloc", |frames| {
        frames
            .iter()
            .any(|f| *f == "[unknown]" || f.starts_with("[stack cut"))
    });
    assert!(
        unknown * 50 <= all,
        "{unknown} of {all} samples cut or unknown:\n{}",
        stacks_of(&folded, "gcalloc")
            .iter()
            .filter(|(f, _)| f
                .iter()
                .any(|f| *f == "[unknown]" || f.starts_with("[stack cut")))
            .map(|(f, n)| format!("{n} {}", f.join(";")))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The workload is built to be flagged, and its allocation comes from
    // main.churn.
    assert!(
        theirs_over(&truth, "runtime.mallocgc", 0.15),
        "the workload must allocate heavily: {top_text}"
    );
    let flags: Vec<&str> = p["flags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["figure"].as_str())
        .collect();
    assert!(flags.contains(&"alloc"), "{gc:#}");
    assert_eq!(p["alloc_sites"][0]["function"], "main.churn", "{gc:#}");
    rt.block_on(c.shutdown()).unwrap();
}

fn theirs_over(truth: &std::collections::HashMap<String, f64>, f: &str, share: f64) -> bool {
    truth.get(f).is_some_and(|s| *s > share)
}
