//! End-to-end always-on mode: the real agent profiles real workloads and
//! streams them to a real collector on loopback (SQLite); the HTTP API, `go
//! tool pprof` and the web UI in headless Chromium show what a user checks.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::Ordering,
    time::Duration,
};

use crate::support::{collector::*, *};
use profiler_agent::export::ExportOptions;
use profiler_collector::server;

const CHAIN: &str = "%7Bprocess%3D%22chain%22%7D";
const RATIO: &str = "%7Bprocess%3D%22ratio%22%7D";

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two workloads → agent (run mode) → collector → HTTP: the call chain, the
/// 3:1 share, totals equal to what the kernel recorded, pprof that `go tool
/// pprof` reads, and the web UI in Chromium.
#[test]
fn agent_streams_windows_that_the_collector_serves() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let c = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    let chain = Workload::spawn(&workload("chain"), &["8"]);
    let ratio = Workload::spawn(&workload("ratio"), &["8"]);
    let mut opts = options(vec![chain.pid(), ratio.pid()], 4.0, 499);
    opts.export = Some(export_to(&c));
    let (rec, _) = record_with(&opts, || ());

    let stats = rec.export.as_ref().unwrap();
    let queued = stats.batches_queued.load(Ordering::Relaxed);
    assert!(queued >= 4, "one batch per 1 s window: {queued}");
    assert_eq!(stats.batches_acked.load(Ordering::Relaxed), queued);
    assert!(
        stats.nonzero_drops().is_empty(),
        "{:?}",
        stats.nonzero_drops()
    );
    let recorded = rec.counters.get(profiler_common::Counter::Recorded);
    let all = folded(c.http_addr, "%7B%7D");
    assert_eq!(
        all.total(),
        recorded,
        "collector total vs samples the kernel recorded"
    );
    assert_eq!(all.total(), rec.samples);

    let chain_profile = folded(c.http_addr, CHAIN);
    let (hot, total) = count_where(&chain_profile, "chain", |f| {
        has_chain(f, &["main", "outer", "inner_hot"])
    });
    assert!(
        total > 500 && hot * 100 >= total * 90,
        "{hot} of {total}\n{}",
        dump(&chain_profile, "chain")
    );

    let ratio_profile = folded(c.http_addr, RATIO);
    let (a, _) = count_where(&ratio_profile, "ratio", |f| f.contains(&"work_a"));
    let (b, _) = count_where(&ratio_profile, "ratio", |f| f.contains(&"work_b"));
    let share = 100.0 * a as f64 / (a + b).max(1) as f64;
    assert!(
        a + b > 1000 && (share - 75.0).abs() <= 5.0,
        "work_a {share:.1}% (a={a}, b={b})"
    );

    // Labels: node, process, pid, exe.
    let labels: Vec<String> =
        serde_json::from_slice(&http_get(c.http_addr, "/api/v1/labels")).unwrap();
    for name in ["exe", "node", "pid", "process"] {
        assert!(labels.iter().any(|l| l == name), "{labels:?}");
    }
    let pids: Vec<String> =
        serde_json::from_slice(&http_get(c.http_addr, "/api/v1/labels/pid/values")).unwrap();
    assert!(pids.contains(&chain.pid().to_string()));

    // pprof, read by Go's own tool.
    let pprof = dir.path().join("chain.pb.gz");
    std::fs::write(
        &pprof,
        http_get(c.http_addr, &format!("/api/v1/pprof?query={CHAIN}")),
    )
    .unwrap();
    let out = Command::new("go")
        .args(["tool", "pprof", "-top"])
        .arg(&pprof)
        .env("HOME", dir.path())
        .output()
        .expect("go on PATH");
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && top.contains("inner_hot"),
        "{top}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The web UI: the page loads the profile, and searching the flame graph
    // embedded in it finds the hot function (the page reads the graph's own
    // search result).
    let ui = format!(
        "http://{}/?process=chain&start=now-10m&search=inner_hot",
        c.http_addr
    );
    let dom = chromium(&["--dump-dom"], &ui);
    assert!(dom.contains("samples for {process=\"chain\"}"), "{dom}");
    assert!(dom.contains("<td>inner_hot</td>"), "top table: {dom}");
    let matched = dom
        .split("<div id=\"matched\">")
        .nth(1)
        .and_then(|rest| rest.split("</div>").next())
        .unwrap_or_default();
    assert!(
        matched.starts_with("search \"inner_hot\": ") && matched.contains("widest: inner_hot ("),
        "the flame graph in the page must show inner_hot: {matched:?}\n{dom}"
    );
    let share: f64 = matched
        .rsplit(", ")
        .next()
        .and_then(|s| s.split('%').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    assert!(
        share > 90.0,
        "inner_hot holds {share}% of chain's samples: {matched}"
    );
    let shot = artifacts().join("ui-flamegraph.png");
    chromium(&[&format!("--screenshot={}", shot.display())], &ui);
    assert!(std::fs::metadata(&shot)
        .map(|m| m.len() > 10_000)
        .unwrap_or(false));
    eprintln!("UI screenshot: {}", shot.display());
    rt.block_on(c.shutdown()).unwrap();
}

/// The web UI's type picker lists the types present in the range (cpu by
/// default) and shows the picked type's values in its unit. No root
/// needed: the batches come from synthetic agents.
#[test]
fn the_ui_picks_among_the_sample_types_present() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let c = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    let mut off = synthetic_batch("n1", 2, 0);
    off.sample_type = Some(profiler_proto::v1::SampleType {
        r#type: "off_cpu".into(),
        unit: "nanoseconds".into(),
    });
    off.frequency_hz = 0;
    off.samples[0].value = 2_500_000_001;
    rt.block_on(async {
        let mut cl = profiler_proto::v1::ingest_client::IngestClient::connect(format!(
            "http://{}",
            c.grpc_addr
        ))
        .await
        .unwrap();
        cl.push_batch(synthetic_batch("n1", 1, 7)).await.unwrap();
        cl.push_batch(off).await.unwrap();
    });

    let dom = chromium(
        &["--dump-dom"],
        &format!("http://{}/?start=now-10m", c.http_addr),
    );
    assert!(dom.contains(">cpu (samples)</option>"), "{dom}");
    assert!(dom.contains(">off_cpu (nanoseconds)</option>"), "{dom}");
    assert!(dom.contains("7 samples for {}"), "cpu by default: {dom}");

    let ui = format!(
        "http://{}/?type=off_cpu&start=now-10m&search=work",
        c.http_addr
    );
    let dom = chromium(&["--dump-dom"], &ui);
    assert!(
        dom.contains("2500000001 nanoseconds of off_cpu for {}"),
        "{dom}"
    );
    assert!(dom.contains("<td>2500000001</td>"), "top table: {dom}");
    assert!(
        dom.contains("widest: work (2,500,000,001 ns, 100.00%)"),
        "the flame graph counts nanoseconds: {dom}"
    );
    // Nothing in an earlier range: the picker offers cpu alone.
    let dom = chromium(
        &["--dump-dom"],
        &format!("http://{}/?start=now-3h&end=now-2h", c.http_addr),
    );
    assert!(!dom.contains("off_cpu (nanoseconds)"), "{dom}");
    assert!(dom.contains("0 samples for {}"), "{dom}");
    let shot = artifacts().join("ui-off-cpu.png");
    chromium(&[&format!("--screenshot={}", shot.display())], &ui);
    eprintln!("UI screenshot: {}", shot.display());
    rt.block_on(c.shutdown()).unwrap();
}

/// The collector stops in the middle of a run for several drain intervals
/// and comes back on the same store: the agent spills what overflows its
/// (tiny) memory queue, retries, replays, and in the end every sample is
/// stored exactly once (collector total = the kernel's recorded count).
#[test]
fn collector_restart_mid_run_loses_and_doubles_nothing() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    let c = start_collector(&rt, &db, "127.0.0.1:0", "127.0.0.1:0");
    let (grpc, http) = (c.grpc_addr.to_string(), c.http_addr.to_string());
    let chain = Workload::spawn(&workload("chain"), &["14"]);
    let mut opts = options(vec![chain.pid()], 7.0, 99);
    // A memory queue that holds only the newest batch: during the outage
    // the others go to the spill directory and are replayed from it.
    let spill = dir.path().join("spill");
    opts.export = Some(ExportOptions {
        queue_bytes: 1,
        spill_dir: Some(spill.clone()),
        spill_bytes: 16 << 20,
        security: Default::default(),
        protocol: Default::default(),
        headers: Vec::new(),
        ..export_to(&c)
    });

    let recorder = profiler_agent::record::Recorder::start(&opts).expect("profiler attaches");
    let handle = rt.handle().clone();
    let restarter = std::thread::spawn(move || {
        // The collector stops mid-run: once it has stored the agent's first
        // batch.
        wait_for_batches_stored(c.http_addr, 0);
        handle.block_on(c.shutdown()).unwrap();
        // The outage itself, which must last several drain intervals.
        std::thread::sleep(Duration::from_millis(3500));
        let rt_db = db.clone();
        handle
            .block_on(server::start(collector_config(&rt_db, &grpc, &http)))
            .expect("collector restarts on the same ports and store")
    });
    let rec = recorder
        .run(&std::sync::atomic::AtomicBool::new(false))
        .unwrap();
    let c = restarter.join().unwrap();

    let stats = rec.export.as_ref().unwrap();
    assert!(
        stats.send_failures.load(Ordering::Relaxed) > 0,
        "the outage was seen"
    );
    assert_all_delivered(stats);
    let spilled = stats.spill.spilled.load(Ordering::Relaxed);
    assert!(spilled > 0, "batches overflowed to the spill directory");
    assert_eq!(stats.spill.replayed.load(Ordering::Relaxed), spilled);
    assert_eq!(
        std::fs::read_dir(&spill).unwrap().count(),
        0,
        "all replayed"
    );
    let recorded = rec.counters.get(profiler_common::Counter::Recorded);
    let stored = folded(c.http_addr, "%7B%7D").total();
    assert_eq!(
        stored, recorded,
        "stored vs recorded samples after the restart"
    );
    rt.block_on(c.shutdown()).unwrap();
}

/// `kill -9` of the collector process while a real agent and two synthetic
/// agents stream, then a restart on the same store: per node, the stored
/// totals equal what each agent sent (re-sends of batches stored but not
/// acknowledged before the kill count once).
#[test]
fn collector_killed_with_sigkill_keeps_every_acknowledged_batch_once() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    // The collector chooses its ports, and comes back on them after kill -9.
    let collector = CollectorProcess::start(&db, 0, 0, &dir.path().join("1.log"));
    let (grpc, http) = (collector.grpc.port(), collector.http.port());
    let log_restart = dir.path().join("2.log");

    let pushers: Vec<_> = ["syn-1", "syn-2"]
        .into_iter()
        .map(|node| std::thread::spawn(move || (node, synthetic_agent(grpc, node, 60, 7))))
        .collect();
    let db_restart = db.clone();
    let http_addr: std::net::SocketAddr = ([127, 0, 0, 1], http).into();
    let killer = std::thread::spawn(move || {
        // Killed mid-stream: once it has stored the real agent's first
        // batch (the synthetic agents stream from the start).
        let real_agent = format!(
            "http://{http_addr}/api/v1/folded?start=now-1h&query=%7Bnode%3D%22real-agent%22%7D"
        );
        wait_until(
            Duration::from_secs(20),
            "the collector stored the real agent's first batch",
            || {
                scrape(&real_agent)
                    .is_some_and(|text| profiler_agent::fold::parse_folded(&text).0.total() > 0)
            },
        );
        collector.kill9();
        // The outage itself, which must last: the agents retry meanwhile.
        std::thread::sleep(Duration::from_millis(1500));
        CollectorProcess::start(&db_restart, grpc, http, &log_restart)
    });

    let chain = Workload::spawn(&workload("chain"), &["10"]);
    let mut opts = options(vec![chain.pid()], 5.0, 99);
    opts.export = Some(ExportOptions {
        collector: format!("http://127.0.0.1:{grpc}"),
        node: "real-agent".into(),
        queue_bytes: 16 << 20,
        flush_timeout: Duration::from_secs(20),
        spill_dir: None,
        spill_bytes: 0,
        security: Default::default(),
        protocol: Default::default(),
        headers: Vec::new(),
    });
    let (rec, _) = record_with(&opts, || ());
    let _collector = killer.join().unwrap();
    let synthetic: Vec<(&str, u64)> = pushers.into_iter().map(|p| p.join().unwrap()).collect();

    let addr: std::net::SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let stats = rec.export.as_ref().unwrap();
    assert!(
        stats.nonzero_drops().is_empty(),
        "{:?}",
        stats.nonzero_drops()
    );
    assert!(
        stats.send_failures.load(Ordering::Relaxed) > 0,
        "the agent saw the collector die"
    );
    let real = folded(addr, "%7Bnode%3D%22real-agent%22%7D").total();
    assert_eq!(
        real,
        rec.counters.get(profiler_common::Counter::Recorded),
        "real agent"
    );
    for (node, sent) in synthetic {
        assert_eq!(sent, 60 * 7, "{node}: every batch acknowledged");
        let stored = folded(addr, &format!("%7Bnode%3D%22{node}%22%7D")).total();
        assert_eq!(stored, sent, "{node}: stored vs sent");
    }
}
