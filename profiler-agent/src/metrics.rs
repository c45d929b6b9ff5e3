//! The agent's own metrics: a Prometheus text endpoint (`run
//! --metrics-listen`) and a periodic log summary of drops, retries and
//! spilling, so a long outage shows up in the logs as a few lines, not one
//! line per retry.
//!
//! Every drop is counted with a `reason` label. Names and meanings are listed
//! in `docs/agent.md`.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use profiler_common::Counter;

use crate::{
    drain::Counters,
    export::ExportStats,
    memory::{MemoryReading, MemoryStats},
    process::ProcessStats,
    Error, Result,
};

/// One counter of the symbolizer: metric name suffix, help, value.
pub type SymbolizerCounter = (&'static str, &'static str, u64);

/// Process cache figures, copied each window.
#[derive(Clone, Debug, Default)]
pub struct ProcessGauges {
    pub stats: ProcessStats,
    pub processes: u64,
    pub binaries: u64,
}

/// Everything `/metrics` shows. The drain loop updates it once a window;
/// the exporter's and watchdog's counters are read live.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    pub windows: AtomicU64,
    /// Samples read from the kernel maps (the sum of every window).
    pub samples_drained: AtomicU64,
    pub missing_stacks: AtomicU64,
    pub truncated_stacks: AtomicU64,
    /// Pods in the pod cache (when watching Kubernetes).
    pub pods: AtomicU64,
    kernel: Mutex<Counters>,
    processes: Mutex<ProcessGauges>,
    symbolizer: Mutex<Vec<SymbolizerCounter>>,
    pub memory: Arc<MemoryStats>,
    export: Option<Arc<ExportStats>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AgentMetrics {
    pub fn new(export: Option<Arc<ExportStats>>, memory: Arc<MemoryStats>) -> Self {
        Self {
            export,
            memory,
            ..Self::default()
        }
    }

    /// A drained window: its samples and stack losses.
    pub fn add_window(&self, samples: u64, missing_stacks: u64, truncated_stacks: u64) {
        self.windows.fetch_add(1, Ordering::Relaxed);
        self.samples_drained.fetch_add(samples, Ordering::Relaxed);
        self.missing_stacks
            .fetch_add(missing_stacks, Ordering::Relaxed);
        self.truncated_stacks
            .fetch_add(truncated_stacks, Ordering::Relaxed);
    }

    pub fn set_kernel(&self, counters: Counters) {
        *lock(&self.kernel) = counters;
    }

    pub fn set_processes(&self, gauges: ProcessGauges) {
        *lock(&self.processes) = gauges;
    }

    pub fn set_symbolizer(&self, counters: Vec<SymbolizerCounter>) {
        *lock(&self.symbolizer) = counters;
    }

    pub fn export(&self) -> Option<&ExportStats> {
        self.export.as_deref()
    }

    /// Named totals whose growth the log summary reports: every drop by
    /// reason, send failures, spill writes and replays, memory shedding.
    pub fn activity(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = lock(&self.kernel)
            .nonzero_drops()
            .into_iter()
            .map(|(n, v)| (format!("kernel_{n}"), v))
            .collect();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.push(("stack_missing_at_drain".into(), load(&self.missing_stacks)));
        if let Some(e) = self.export() {
            out.push(("send_failures".into(), load(&e.send_failures)));
            out.push(("sends_pushed_back".into(), load(&e.pushed_back)));
            out.push(("spill_writes".into(), load(&e.spill.spilled)));
            out.push(("spill_replays".into(), load(&e.spill.replayed)));
            out.push(("batches_parked".into(), load(&e.parked_memory_limit)));
            for d in e.drops() {
                out.push((format!("batches_dropped_{}", d.reason), d.batches));
                out.push((format!("samples_dropped_{}", d.reason), d.samples));
            }
        }
        let m = &self.memory;
        out.push(("memory_shed_park_queue".into(), load(&m.shed_queue)));
        out.push((
            "memory_shed_evict_symbolizer".into(),
            load(&m.shed_symbolizer),
        ));
        out
    }
}

/// Prometheus text exposition, one family at a time.
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP profiler_agent_{name} {help}");
        let _ = writeln!(self.0, "# TYPE profiler_agent_{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        let _ = write!(self.0, "profiler_agent_{name}");
        if !labels.is_empty() {
            let pairs: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", pairs.join(","));
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A family with one label, one line per value.
    fn labelled(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        values: &[(&str, u64)],
    ) {
        self.family(name, kind, help);
        for (v, n) in values {
            self.sample(name, &[(label, v)], *n);
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Kernel counters of samples lost before the drain.
const KERNEL_LOST: [Counter; 2] = [Counter::CountMapFull, Counter::CountOtherError];

/// Renders every metric in the Prometheus text format (version 0.0.4).
/// `memory` is a fresh reading of the process (none without procfs).
pub fn render(m: &AgentMetrics, memory: Option<MemoryReading>) -> String {
    let mut t = Text(String::with_capacity(8 << 10));
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let k = lock(&m.kernel).clone();

    t.one(
        "samples_total",
        "counter",
        "Times the eBPF program ran (perf cpu-clock events on every CPU).",
        k.get(Counter::Samples),
    );
    t.one(
        "samples_recorded_total",
        "counter",
        "Samples recorded in the kernel count maps.",
        k.get(Counter::Recorded),
    );
    t.labelled(
        "samples_skipped_total",
        "counter",
        "Samples skipped on purpose (not drops), by reason.",
        "reason",
        &[
            ("idle", k.get(Counter::IdleSkipped)),
            ("filtered_out", k.get(Counter::Filtered)),
        ],
    );
    let mut lost: Vec<(&str, u64)> = KERNEL_LOST.iter().map(|c| (c.name(), k.get(*c))).collect();
    lost.push(("unaccounted", k.unaccounted()));
    t.labelled(
        "samples_dropped_total",
        "counter",
        "Samples lost in the kernel before the drain, by reason.",
        "reason",
        &lost,
    );
    let mut degraded: Vec<(&str, u64)> = Counter::ALL
        .iter()
        .filter(|c| c.is_drop() && !KERNEL_LOST.contains(c))
        .map(|c| (c.name(), k.get(*c)))
        .collect();
    degraded.push(("stack_missing_at_drain", load(&m.missing_stacks)));
    degraded.push(("stack_truncated", load(&m.truncated_stacks)));
    t.labelled(
        "samples_degraded_total",
        "counter",
        "Samples kept with a stack or name missing or cut, by reason.",
        "reason",
        &degraded,
    );
    t.one(
        "samples_kernel_only_total",
        "counter",
        "Kernel-mode samples without a user stack (kernel threads; informational).",
        k.get(Counter::KernelOnly),
    );
    t.one(
        "samples_drained_total",
        "counter",
        "Samples read from the kernel maps, all windows.",
        load(&m.samples_drained),
    );
    t.one(
        "windows_total",
        "counter",
        "Drain windows completed.",
        load(&m.windows),
    );

    if let Some(e) = m.export() {
        t.one(
            "export_batches_total",
            "counter",
            "Batches queued for the collector (one a window).",
            load(&e.batches_queued),
        );
        t.one(
            "export_batches_acked_total",
            "counter",
            "Batches acknowledged by the collector.",
            load(&e.batches_acked),
        );
        t.one(
            "export_batches_duplicate_total",
            "counter",
            "Acknowledged batches the collector already had (re-sends).",
            load(&e.batches_duplicate),
        );
        t.one(
            "export_send_failures_total",
            "counter",
            "Sends that failed and were retried with backoff.",
            load(&e.send_failures),
        );
        t.one(
            "export_pushed_back_total",
            "counter",
            "Sends the collector pushed back (overloaded, or this agent over its rate limit), sent again after the wait it asked for.",
            load(&e.pushed_back),
        );
        let drops = e.drops();
        let batches: Vec<(&str, u64)> = drops.iter().map(|d| (d.reason, d.batches)).collect();
        t.labelled(
            "export_batches_dropped_total",
            "counter",
            "Batches dropped, by reason (spill_corrupt: spilled records failing their checksum).",
            "reason",
            &batches,
        );
        t.one(
            "export_samples_total",
            "counter",
            "Samples in the batches queued.",
            load(&e.samples_queued),
        );
        t.one(
            "export_samples_acked_total",
            "counter",
            "Samples the collector acknowledged.",
            load(&e.samples_acked),
        );
        let samples: Vec<(&str, u64)> = drops
            .iter()
            .filter(|d| d.samples_known)
            .map(|d| (d.reason, d.samples))
            .collect();
        t.labelled(
            "export_samples_dropped_total",
            "counter",
            "Samples in the batches dropped, by reason.",
            "reason",
            &samples,
        );
        t.one(
            "export_bytes_total",
            "counter",
            "Encoded bytes (before compression) of the batches queued.",
            load(&e.bytes_queued),
        );
        t.one(
            "export_bytes_acked_total",
            "counter",
            "Encoded bytes of the batches acknowledged.",
            load(&e.bytes_acked),
        );
        t.one(
            "export_largest_batch_bytes",
            "gauge",
            "Encoded size of the largest batch so far.",
            load(&e.largest_batch_bytes),
        );
        t.one(
            "export_queue_batches",
            "gauge",
            "Unacknowledged batches held in memory.",
            load(&e.queue_batches),
        );
        t.one(
            "export_queue_bytes",
            "gauge",
            "Encoded bytes of the unacknowledged batches held in memory.",
            load(&e.queue_bytes),
        );
        t.one(
            "export_collector_up",
            "gauge",
            "1 if the last send reached the collector, else 0.",
            load(&e.collector_up),
        );
        t.one(
            "export_batches_parked_total",
            "counter",
            "Batches moved from memory to the spill directory by the memory watchdog.",
            load(&e.parked_memory_limit),
        );
        t.one(
            "spill_writes_total",
            "counter",
            "Batches written to the spill directory.",
            load(&e.spill.spilled),
        );
        t.one(
            "spill_replays_total",
            "counter",
            "Spilled batches sent and acknowledged.",
            load(&e.spill.replayed),
        );
        t.one(
            "spill_records",
            "gauge",
            "Batches waiting in the spill directory.",
            load(&e.spill.records),
        );
        t.one(
            "spill_bytes",
            "gauge",
            "Bytes of the batches waiting in the spill directory.",
            load(&e.spill.bytes),
        );
    }

    let mem = &m.memory;
    let (rss, peak) = match memory {
        Some(r) => (r.rss_bytes, r.peak_bytes.max(load(&mem.peak_bytes))),
        None => (load(&mem.rss_bytes), load(&mem.peak_bytes)),
    };
    t.one(
        "resident_memory_bytes",
        "gauge",
        "Resident set size of the agent.",
        rss,
    );
    t.one(
        "resident_memory_peak_bytes",
        "gauge",
        "Highest resident set size of the agent since start (VmHWM).",
        peak,
    );
    t.one(
        "memory_limit_bytes",
        "gauge",
        "The agent's RSS ceiling (0: none); shedding starts at 90 %.",
        load(&mem.limit_bytes),
    );
    t.one(
        "memory_over_threshold_total",
        "counter",
        "Watchdog checks that found the RSS over 90 % of the ceiling.",
        load(&mem.over_threshold),
    );
    t.labelled(
        "memory_shed_total",
        "counter",
        "Memory shedding actions of the watchdog, by action.",
        "action",
        &[
            ("park_queue", load(&mem.shed_queue)),
            ("evict_symbolizer", load(&mem.shed_symbolizer)),
            ("trim_allocator", load(&mem.shed_trim)),
        ],
    );
    t.one(
        "memory_still_over_total",
        "counter",
        "Watchdog checks after which the RSS was still over the threshold.",
        load(&mem.still_over),
    );

    let p = lock(&m.processes).clone();
    t.one(
        "process_cache_processes",
        "gauge",
        "Processes in the metadata cache.",
        p.processes,
    );
    t.one(
        "process_cache_binaries",
        "gauge",
        "Open binaries in the metadata cache.",
        p.binaries,
    );
    t.labelled(
        "process_metadata_failures_total",
        "counter",
        "Processes or binaries whose frames stay unnamed, by reason.",
        "reason",
        &[
            ("process_gone_before_snapshot", p.stats.snapshot_failed),
            ("process_cache_full", p.stats.process_cache_full),
            ("binary_cache_full", p.stats.binary_cache_full),
            ("binary_open_failed", p.stats.binary_open_failed),
        ],
    );
    t.one(
        "pod_cache_pods",
        "gauge",
        "Pods in the pod metadata cache.",
        load(&m.pods),
    );
    for (name, help, value) in lock(&m.symbolizer).iter() {
        t.one(&format!("symbolizer_{name}"), "counter", help, *value);
    }
    t.0
}

/// Logs what grew since the last summary, at most once per interval: a
/// long outage gives one line per interval, not one per retry or batch.
pub struct LogSummary {
    interval: Duration,
    last: Instant,
    previous: Vec<(String, u64)>,
}

/// Default interval between two summaries.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

impl LogSummary {
    pub fn new(interval: Duration, metrics: &AgentMetrics) -> Self {
        Self {
            interval,
            last: Instant::now(),
            previous: metrics.activity(),
        }
    }

    /// What grew since the previous call, as `name=+delta` pairs.
    pub fn deltas(&mut self, now: Vec<(String, u64)>) -> Vec<(String, u64)> {
        let grown = now
            .iter()
            .filter_map(|(name, value)| {
                let before = self
                    .previous
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0, |(_, v)| *v);
                (*value > before).then(|| (name.clone(), value - before))
            })
            .collect();
        self.previous = now;
        grown
    }

    /// Logs the summary if the interval has passed and anything grew.
    pub fn tick(&mut self, metrics: &AgentMetrics) {
        if self.last.elapsed() < self.interval {
            return;
        }
        self.last = Instant::now();
        let grown = self.deltas(metrics.activity());
        if grown.is_empty() {
            return;
        }
        let text: Vec<String> = grown.iter().map(|(n, d)| format!("{n}=+{d}")).collect();
        let (queue, spill) = metrics.export().map_or((0, 0), |e| {
            (
                e.queue_bytes.load(Ordering::Relaxed),
                e.spill.bytes.load(Ordering::Relaxed),
            )
        });
        let only_progress = grown
            .iter()
            .all(|(n, _)| n == "spill_replays" || n == "spill_writes");
        let secs = self.interval.as_secs();
        if only_progress {
            tracing::info!(
                queue_bytes = queue,
                spill_bytes = spill,
                "last {secs}s: {}",
                text.join(" ")
            );
        } else {
            tracing::warn!(
                queue_bytes = queue,
                spill_bytes = spill,
                "last {secs}s: {}",
                text.join(" ")
            );
        }
    }
}

/// The `/metrics` HTTP server: its own thread and small runtime, stopped
/// when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` now (so a taken port fails the start) and serves
    /// `GET /metrics` from `metrics`.
    pub fn start(addr: SocketAddr, metrics: Arc<AgentMetrics>) -> Result<Self> {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| Error::io(format!("binding the metrics address {addr}"), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("configuring the metrics socket", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the metrics address", e))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime for /metrics");
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("metrics listener: {e}");
                            return;
                        }
                    };
                    let app = axum::Router::new().route(
                        "/metrics",
                        axum::routing::get(move || {
                            let metrics = metrics.clone();
                            async move {
                                (
                                    [(
                                        axum::http::header::CONTENT_TYPE,
                                        "text/plain; version=0.0.4; charset=utf-8",
                                    )],
                                    render(&metrics, crate::memory::read_self()),
                                )
                            }
                        }),
                    );
                    let served = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!("metrics server: {e}");
                    }
                });
            })
            .map_err(|e| Error::io("starting the metrics thread", e))?;
        tracing::info!(%addr, "serving /metrics");
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{DropReason, ExportStats};

    fn metrics() -> AgentMetrics {
        let export = Arc::new(ExportStats::default());
        export.batches_queued.store(12, Ordering::Relaxed);
        export.batches_acked.store(9, Ordering::Relaxed);
        export.send_failures.store(4, Ordering::Relaxed);
        export.pushed_back.store(5, Ordering::Relaxed);
        export.count_drop(DropReason::SpillCap, 2, 150);
        export.count_drop(DropReason::SpillCorrupt, 1, 0);
        export.queue_bytes.store(4096, Ordering::Relaxed);
        let memory = Arc::new(MemoryStats::default());
        memory.limit_bytes.store(64 << 20, Ordering::Relaxed);
        memory.peak_bytes.store(30 << 20, Ordering::Relaxed);
        memory.shed_trim.store(3, Ordering::Relaxed);
        let m = AgentMetrics::new(Some(export), memory);
        let mut k = Counters::default();
        k.0.insert(Counter::Samples, 1000);
        k.0.insert(Counter::Recorded, 990);
        k.0.insert(Counter::CountMapFull, 7);
        k.0.insert(Counter::UserStackFault, 5);
        m.set_kernel(k);
        m.add_window(990, 1, 2);
        m.set_symbolizer(vec![("lookups_total", "Addresses looked up.", 42)]);
        m
    }

    /// The exposition format: every sample line belongs to a family declared
    /// just before with HELP and TYPE, names are valid, values are numbers.
    fn check_format(text: &str) {
        let mut family = String::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(rest.len() > name.len() + 1, "help text: {line}");
                let ty = lines.next().unwrap();
                assert!(
                    ty == format!("# TYPE {name} counter") || ty == format!("# TYPE {name} gauge"),
                    "{ty}"
                );
                assert!(
                    !name.ends_with("_total") || ty.ends_with("counter"),
                    "{name}"
                );
                assert!(
                    name.starts_with("profiler_agent_")
                        && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                    "{name}"
                );
                family = name.to_string();
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            value.parse::<u64>().unwrap_or_else(|_| panic!("{line}"));
            let name = series.split('{').next().unwrap();
            assert_eq!(name, family, "sample outside its family: {line}");
        }
    }

    #[test]
    fn renders_every_family_in_prometheus_text_format() {
        let m = metrics();
        let reading = MemoryReading {
            rss_bytes: 20 << 20,
            peak_bytes: 25 << 20,
        };
        let text = render(&m, Some(reading));
        check_format(&text);
        for line in [
            "profiler_agent_samples_total 1000",
            "profiler_agent_samples_recorded_total 990",
            "profiler_agent_samples_dropped_total{reason=\"count_map_full\"} 7",
            "profiler_agent_samples_dropped_total{reason=\"unaccounted\"} 3",
            "profiler_agent_samples_degraded_total{reason=\"user_stack_fault\"} 5",
            "profiler_agent_samples_degraded_total{reason=\"stack_missing_at_drain\"} 1",
            "profiler_agent_samples_degraded_total{reason=\"stack_truncated\"} 2",
            "profiler_agent_samples_drained_total 990",
            "profiler_agent_windows_total 1",
            "profiler_agent_export_batches_total 12",
            "profiler_agent_export_batches_acked_total 9",
            "profiler_agent_export_send_failures_total 4",
            "profiler_agent_export_pushed_back_total 5",
            "profiler_agent_export_batches_dropped_total{reason=\"spill_cap\"} 2",
            "profiler_agent_export_batches_dropped_total{reason=\"spill_corrupt\"} 1",
            "profiler_agent_export_batches_dropped_total{reason=\"queue_full\"} 0",
            "profiler_agent_export_samples_dropped_total{reason=\"spill_cap\"} 150",
            "profiler_agent_export_queue_bytes 4096",
            "profiler_agent_resident_memory_bytes 20971520",
            // The watchdog saw a higher peak than this reading's VmHWM.
            "profiler_agent_resident_memory_peak_bytes 31457280",
            "profiler_agent_memory_limit_bytes 67108864",
            "profiler_agent_memory_shed_total{action=\"trim_allocator\"} 3",
            "profiler_agent_symbolizer_lookups_total 42",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            !text.contains("export_samples_dropped_total{reason=\"spill_corrupt\"}"),
            "samples of corrupt records are unknown"
        );
    }

    #[test]
    fn without_export_there_are_no_export_families() {
        let m = AgentMetrics::default();
        let text = render(&m, None);
        check_format(&text);
        assert!(!text.contains("export_"));
        assert!(text.contains("profiler_agent_resident_memory_bytes 0"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn summary_reports_only_what_grew() {
        let m = metrics();
        let mut s = LogSummary::new(Duration::ZERO, &m);
        assert!(s.deltas(m.activity()).is_empty());
        let e = m.export().unwrap();
        e.send_failures.fetch_add(3, Ordering::Relaxed);
        e.count_drop(DropReason::SpillCap, 1, 40);
        let grown = s.deltas(m.activity());
        assert_eq!(
            grown,
            vec![
                ("send_failures".to_string(), 3),
                ("batches_dropped_spill_cap".to_string(), 1),
                ("samples_dropped_spill_cap".to_string(), 40),
            ]
        );
        assert!(s.deltas(m.activity()).is_empty());
        s.tick(&m);
    }

    #[test]
    fn server_serves_metrics() {
        let m = Arc::new(metrics());
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), m).unwrap();
        let mut resp = ureq::get(&format!("http://{}/metrics", server.addr()))
            .call()
            .unwrap();
        let body = resp.body_mut().read_to_string().unwrap();
        assert!(body.contains("profiler_agent_export_batches_total 12"));
        assert!(body.contains("# TYPE profiler_agent_resident_memory_bytes gauge"));
        drop(server);
    }
}
