//! Fault injection: the collector is down for a long outage (compressed:
//! 200 ms windows, a queue and a spill cap of a few KiB) while the real agent
//! binary profiles busy workloads. Its own `/metrics` is polled throughout:
//! the agent's memory stays under its ceiling, the batches past the spill cap are
//! dropped and counted with their samples, and once the collector is up
//! everything within the cap arrives: collector total = samples drained −
//! samples counted as dropped, exactly.

use std::{
    io::Read,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::support::*;
use profiler_testkit::net::Reserved;

const CEILING_MIB: u64 = 64;

/// Metric names `docs/agent.md` documents (a sample of each family).
const DOCUMENTED: &[&str] = &[
    "profiler_agent_samples_total",
    "profiler_agent_samples_recorded_total",
    "profiler_agent_samples_skipped_total",
    "profiler_agent_samples_dropped_total",
    "profiler_agent_samples_degraded_total",
    "profiler_agent_samples_drained_total",
    "profiler_agent_windows_total",
    "profiler_agent_export_batches_total",
    "profiler_agent_export_batches_acked_total",
    "profiler_agent_export_send_failures_total",
    "profiler_agent_export_batches_dropped_total",
    "profiler_agent_export_samples_dropped_total",
    "profiler_agent_export_bytes_total",
    "profiler_agent_export_queue_bytes",
    "profiler_agent_export_collector_up",
    "profiler_agent_spill_writes_total",
    "profiler_agent_spill_replays_total",
    "profiler_agent_spill_records",
    "profiler_agent_spill_bytes",
    "profiler_agent_resident_memory_bytes",
    "profiler_agent_resident_memory_peak_bytes",
    "profiler_agent_anonymous_memory_bytes",
    "profiler_agent_anonymous_memory_peak_bytes",
    "profiler_agent_memory_limit_bytes",
    "profiler_agent_memory_shed_total",
    "profiler_agent_process_cache_processes",
    "profiler_agent_symbolizer_lookups_total",
    "profiler_agent_symbolizer_windows_over_budget_total",
];

/// A child process killed (SIGKILL) when dropped, whatever happens.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_collector(db: &Path, grpc: u16, http: u16) -> Killed {
    let child = Command::new(collector_binary())
        .arg("--store")
        .arg(format!("sqlite:{}", db.display()))
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        // Loopback test: no TLS, and the replay is not slowed by the rate limit.
        .args(["--plaintext", "--agent-rate-limit", "0"])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start the collector");
    let collector = Killed(child);
    wait_until(Duration::from_secs(5), "the collector serves HTTP", || {
        std::net::TcpStream::connect(("127.0.0.1", http)).is_ok()
    });
    collector
}

const MIB: f64 = (1 << 20) as f64;

#[test]
fn long_outage_with_small_spill_cap_stays_under_the_ceiling_and_counts_every_drop() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // The agent knows the collector's address before the collector runs:
    // the ports are held (connections refused, as by a collector that is
    // down) until the collector and the agent bind them.
    let (grpc_port, http_port, metrics_reserved) =
        (Reserved::new(), Reserved::new(), Reserved::new());
    let (grpc, http, metrics_port) = (grpc_port.port(), http_port.port(), metrics_reserved.port());
    let chain = workload("chain");
    let workloads: Vec<Workload> = (0..2).map(|_| Workload::spawn(&chain, &["16"])).collect();

    let mut args: Vec<String> = [
        "run",
        "--collector",
        &format!("http://127.0.0.1:{grpc}"),
        "--plaintext",
        "--node",
        "outage-node",
        "--no-kube",
        "--no-progress",
        "--drain-interval",
        "200ms",
        "-F",
        "999",
        // A few windows fill the queue (4 KiB), a few more the spill cap (16 KiB).
        "--queue-mib",
        "0.004",
        "--spill-mib",
        "0.016",
        "--memory-limit-mib",
        &CEILING_MIB.to_string(),
        "--metrics-listen",
        &format!("127.0.0.1:{metrics_port}"),
        "--spill-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(dir.path().join("spill").display().to_string());
    for w in &workloads {
        args.extend(["-p".to_string(), w.pid().to_string()]);
    }
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    metrics_reserved.release();
    let mut agent = Killed(
        Command::new(agent_binary())
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start the agent"),
    );
    let agent_pid = agent.0.id();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let scrape = || crate::support::scrape(&metrics_url);
    let log_path = dir.path().join("agent.log");
    let agent_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // The outage: the collector is not running until the spill cap has
    // dropped a few batches. RSS is polled all along.
    let mut peak_polled = 0u64;
    let mut watch = |text: &str| {
        peak_polled = peak_polled
            .max(metric(text, "profiler_agent_anonymous_memory_bytes"))
            .max(status_bytes(agent_pid, "RssAnon:"));
    };
    let outage_start = Instant::now();
    let during = within(Duration::from_secs(30), || {
        let text = scrape()?;
        watch(&text);
        (metric(
            &text,
            "profiler_agent_export_batches_dropped_total{reason=\"spill_cap\"}",
        ) >= 5)
            .then_some(text)
    })
    .unwrap_or_else(|| {
        panic!(
            "the spill cap never overflowed: {}\n{}",
            scrape().unwrap_or_default(),
            agent_log()
        )
    });
    let outage = outage_start.elapsed();
    let outage_windows = metric(&during, "profiler_agent_windows_total");
    assert_eq!(
        metric(&during, "profiler_agent_export_batches_acked_total"),
        0
    );
    assert_eq!(metric(&during, "profiler_agent_export_collector_up"), 0);
    assert!(metric(&during, "profiler_agent_export_send_failures_total") > 0);

    // The collector comes up; the agent replays what is within the cap.
    grpc_port.release();
    http_port.release();
    let _collector = start_collector(&dir.path().join("p.db"), grpc, http);
    let settled = within(Duration::from_secs(40), || {
        let text = scrape()?;
        watch(&text);
        let m = |n| metric(&text, n);
        let workloads_done = workloads
            .iter()
            .all(|w| !Path::new(&format!("/proc/{}", w.pid())).exists() || is_zombie(w.pid()));
        (workloads_done
            && m("profiler_agent_export_queue_batches") == 0
            && m("profiler_agent_spill_records") == 0
            && m("profiler_agent_samples_drained_total")
                == m("profiler_agent_samples_recorded_total")
            && m("profiler_agent_export_batches_acked_total")
                + m("profiler_agent_export_batches_dropped_total")
                == m("profiler_agent_export_batches_total"))
        .then_some(text)
    })
    .unwrap_or_else(|| {
        panic!(
            "the agent did not deliver everything: {}\n{}",
            scrape().unwrap_or_default(),
            agent_log()
        )
    });
    let m = |n| metric(&settled, n);
    for name in DOCUMENTED {
        assert!(
            settled.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics:\n{settled}"
        );
    }

    // Stop the agent; its summary must agree with /metrics.
    unsafe { libc::kill(agent_pid as i32, libc::SIGTERM) };
    let status = wait_for(
        Duration::from_secs(20),
        "the agent exits on SIGTERM",
        || agent.0.try_wait().unwrap(),
    );
    let mut summary = String::new();
    agent
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut summary)
        .unwrap();
    let log = agent_log();
    assert!(status.success(), "{summary}\n{log}");

    let drained = m("profiler_agent_samples_drained_total");
    let dropped_samples = m("profiler_agent_export_samples_dropped_total");
    let dropped_cap = m("profiler_agent_export_samples_dropped_total{reason=\"spill_cap\"}");
    let batches_cap = m("profiler_agent_export_batches_dropped_total{reason=\"spill_cap\"}");
    let peak_metric = m("profiler_agent_anonymous_memory_peak_bytes");
    let rss_peak = m("profiler_agent_resident_memory_peak_bytes");
    let (spilled, replayed) = (
        m("profiler_agent_spill_writes_total"),
        m("profiler_agent_spill_replays_total"),
    );
    let url = format!(
        "http://127.0.0.1:{http}/api/v1/folded?start=now-1h&query=%7Bnode%3D%22outage-node%22%7D"
    );
    let (stored, bad) =
        profiler_agent::fold::parse_folded(&crate::support::scrape(&url).expect("folded"));
    assert_eq!(bad, 0);
    let stored = stored.total();
    eprintln!(
        "outage: {:.1} s, {outage_windows} windows of 200 ms; peak anonymous memory {:.1} MiB \
         (metric) / {:.1} MiB (polled) of {CEILING_MIB} MiB, peak RSS {:.1} MiB; spilled {spilled}, replayed {replayed}, dropped at the spill \
         cap {batches_cap} batches ({dropped_cap} samples); drained {drained}, stored {stored}; \
         test took {:.1} s",
        outage.as_secs_f64(),
        peak_metric as f64 / MIB,
        peak_polled as f64 / MIB,
        rss_peak as f64 / MIB,
        started.elapsed().as_secs_f64(),
    );

    // Memory: the agent's own (anonymous) memory under the ceiling all along.
    let ceiling = CEILING_MIB << 20;
    assert!(
        peak_metric > 0 && peak_metric < ceiling,
        "peak {peak_metric}"
    );
    assert!(peak_polled < ceiling, "peak polled {peak_polled}");
    assert_eq!(m("profiler_agent_memory_limit_bytes"), ceiling);

    // Drops: only at the spill cap, counted in batches and samples.
    assert!(batches_cap >= 5 && dropped_cap > 0, "{settled}");
    assert_eq!(dropped_samples, dropped_cap, "no other reason: {settled}");
    assert_eq!(
        m("profiler_agent_export_batches_dropped_total"),
        batches_cap,
        "{settled}"
    );
    assert_eq!(
        spilled,
        replayed + batches_cap,
        "every spilled batch was replayed or dropped at the cap"
    );
    assert!(replayed > 0);
    assert_eq!(m("profiler_agent_export_collector_up"), 1);

    // Everything within the cap arrived, exactly once.
    assert!(drained > 1000, "busy workloads: {drained}");
    assert_eq!(
        stored,
        drained - dropped_samples,
        "collector total = drained − counted drops"
    );

    // The exit summary agrees, and the log told the story without flooding.
    assert!(
        summary.contains(&format!("Recorded {drained} samples")),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("samples_dropped_spill_cap: {dropped_cap}")),
        "{summary}"
    );
    for needle in [
        "sending to the collector failed",
        "export queue full: the oldest batches go to the spill directory",
        "spill directory full",
        "collector reachable again",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(warnings <= 10, "{warnings} warnings for one outage:\n{log}");
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}
