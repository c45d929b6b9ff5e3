//! The agent's own metrics: `/metrics` (`run --metrics-listen`) in the
//! Prometheus text format, and a periodic log summary of drops, retries and
//! spilling, so a long outage shows up in the logs as a few lines, not one
//! line per retry.
//!
//! Every drop is counted with a `reason` label whose values are the names of
//! the stage enums in [`crate::loss`] and the exporter's drop reasons. The
//! figures live where they are counted (the kernel maps, the exporter, the
//! watchdog, the caches); each scrape reads them into prometheus-client
//! families (HELP, TYPE, typed labels) through a [`Collector`] and renders
//! them with its text encoder. Names and meanings are listed in
//! `docs/agent.md`.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use std::collections::BTreeMap;

use profiler_common::{unwind::StackEnd, Counter};
use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use crate::{
    drain::{Counters, OffCpuPauses},
    export::ExportStats,
    loss::{DrainLoss, Effect, KernelLoss, ProcessLoss, SymbolizerDegrade},
    memory::{MemoryReading, MemoryStats},
    process::ProcessStats,
    symbolize::SymbolizerStats,
    unwind::UnwindStats,
    Error, Result,
};

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
    /// Samples with a user stack, by how its walk ended.
    user_stack_ends: Mutex<BTreeMap<StackEnd, u64>>,
    unwind: Mutex<Option<UnwindStats>>,
    /// Off-CPU recording's pauses, when it can pause.
    off_cpu_pauses: Mutex<Option<OffCpuPauses>>,
    /// Pods in the pod cache (when watching Kubernetes).
    pub pods: AtomicU64,
    kernel: Mutex<Counters>,
    processes: Mutex<ProcessGauges>,
    symbolizer: Mutex<SymbolizerStats>,
    pub memory: Arc<MemoryStats>,
    export: Option<Arc<ExportStats>>,
    otlp_export: Option<Arc<ExportStats>>,
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

    /// Adds the OTLP destination's figures (`otlp_export_*`, `otlp_spill_*`).
    pub fn with_otlp(mut self, otlp: Option<Arc<ExportStats>>) -> Self {
        self.otlp_export = otlp;
        self
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

    /// A drained window's user stacks, by how their walk ended.
    pub fn add_user_stack_ends(&self, ends: &BTreeMap<StackEnd, u64>) {
        let mut total = lock(&self.user_stack_ends);
        for (end, n) in ends {
            *total.entry(*end).or_default() += n;
        }
    }

    pub fn set_unwind(&self, stats: UnwindStats) {
        *lock(&self.unwind) = Some(stats);
    }

    pub fn set_off_cpu_pauses(&self, pauses: OffCpuPauses) {
        *lock(&self.off_cpu_pauses) = Some(pauses);
    }

    pub fn set_kernel(&self, counters: Counters) {
        *lock(&self.kernel) = counters;
    }

    pub fn set_processes(&self, gauges: ProcessGauges) {
        *lock(&self.processes) = gauges;
    }

    pub fn set_symbolizer(&self, stats: SymbolizerStats) {
        *lock(&self.symbolizer) = stats;
    }

    /// Samples degraded at the drain for `reason`, all windows.
    pub fn drain_loss(&self, reason: DrainLoss) -> u64 {
        let counter = match reason {
            DrainLoss::StackMissingAtDrain => &self.missing_stacks,
            DrainLoss::StackTruncated => &self.truncated_stacks,
        };
        counter.load(Ordering::Relaxed)
    }

    pub fn export(&self) -> Option<&ExportStats> {
        self.export.as_deref()
    }

    /// Named totals whose growth the log summary reports: every drop and
    /// degrade by its reason's summary name, send failures, spill writes and
    /// replays, memory shedding.
    pub fn activity(&self) -> Vec<(String, u64)> {
        let kernel = lock(&self.kernel).clone();
        let processes = lock(&self.processes).stats.clone();
        let symbolizer = lock(&self.symbolizer).clone();
        let mut out: Vec<(String, u64)> = KernelLoss::all()
            .map(|r| (r.name().to_string(), r.value(&kernel)))
            .collect();
        let named = DrainLoss::ALL
            .iter()
            .map(|r| (r.summary_name(), self.drain_loss(*r)))
            .chain(
                ProcessLoss::ALL
                    .iter()
                    .map(|r| (r.summary_name(), processes[*r])),
            )
            .chain(
                SymbolizerDegrade::ALL
                    .iter()
                    .map(|r| (r.summary_name(), symbolizer[*r])),
            );
        out.extend(named.map(|(n, v)| (n.to_string(), v)));
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (prefix, e) in [("", &self.export), ("otlp_", &self.otlp_export)] {
            let Some(e) = e else { continue };
            out.push((format!("{prefix}send_failures"), load(&e.send_failures)));
            out.push((format!("{prefix}sends_pushed_back"), load(&e.pushed_back)));
            out.push((format!("{prefix}spill_writes"), load(&e.spill.spilled)));
            out.push((format!("{prefix}spill_replays"), load(&e.spill.replayed)));
            out.push((
                format!("{prefix}batches_parked"),
                load(&e.parked_memory_limit),
            ));
            for d in e.drops() {
                out.push((format!("{prefix}batches_dropped_{}", d.reason), d.batches));
                out.push((format!("{prefix}samples_dropped_{}", d.reason), d.samples));
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

/// One scrape: a copy of every figure, encoded as prometheus-client families.
#[derive(Debug)]
struct Scrape {
    kernel: Counters,
    drain: [u64; DrainLoss::COUNT],
    samples_drained: u64,
    windows: u64,
    user_stack_ends: BTreeMap<StackEnd, u64>,
    unwind: Option<UnwindStats>,
    off_cpu_pauses: Option<OffCpuPauses>,
    pods: u64,
    processes: ProcessGauges,
    symbolizer: SymbolizerStats,
    export: Option<Arc<ExportStats>>,
    otlp_export: Option<Arc<ExportStats>>,
    memory: Arc<MemoryStats>,
    reading: Option<MemoryReading>,
}

/// Writes families through a [`DescriptorEncoder`].
struct Families<'a>(DescriptorEncoder<'a>);

type Encoded = std::result::Result<(), std::fmt::Error>;

impl Families<'_> {
    fn counter(&mut self, name: &str, help: &str, value: u64) -> Encoded {
        let counter = ConstCounter::new(value);
        let metric = self
            .0
            .encode_descriptor(name, help, None, counter.metric_type())?;
        counter.encode(metric)
    }

    fn gauge(&mut self, name: &str, help: &str, value: u64) -> Encoded {
        let gauge = ConstGauge::new(value);
        let metric = self
            .0
            .encode_descriptor(name, help, None, gauge.metric_type())?;
        gauge.encode(metric)
    }

    /// A counter family with one label, one series per value.
    fn labelled<'v>(
        &mut self,
        name: &str,
        help: &str,
        label: &'static str,
        values: impl IntoIterator<Item = (&'v str, u64)>,
    ) -> Encoded {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (value, count) in values {
            let labels = [(label, value)];
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Help of the symbolizer's degrade counters (`symbolizer_NAME_total`).
fn symbolizer_help(reason: SymbolizerDegrade) -> &'static str {
    match reason {
        SymbolizerDegrade::WindowsOverBudget => "Windows whose symbolization time budget ran out.",
        SymbolizerDegrade::FramesOverBudget => {
            "Frames left unnamed because the window's budget was spent."
        }
        SymbolizerDegrade::DwarfSkippedLarge => {
            "Binaries named without DWARF because of their size."
        }
        SymbolizerDegrade::BinariesUnreadable => "Binaries blazesym could not read.",
        SymbolizerDegrade::Panics => "Panics inside blazesym, caught.",
    }
}

/// The unwind tables in the program's maps.
fn unwind_families(t: &mut Families<'_>, u: &UnwindStats) -> Encoded {
    t.gauge(
        "unwind_tables",
        "Binaries with an unwind table loaded.",
        u.tables_loaded,
    )?;
    t.gauge(
        "unwind_rows",
        "Unwind rows in use in the kernel's row array.",
        u.rows_used,
    )?;
    t.gauge(
        "unwind_rows_capacity",
        "Capacity of the row array (--unwind-table-mib).",
        u.rows_capacity,
    )?;
    t.counter(
        "unwind_tables_built",
        "Unwind tables built from binaries' CFI.",
        u.tables_built,
    )?;
    t.counter(
        "unwind_tables_evicted",
        "Unused unwind tables evicted to make room.",
        u.tables_evicted,
    )?;
    t.counter(
        "unwind_tables_not_fitting",
        "Tables that did not fit even after evictions (those binaries unwind with frame pointers).",
        u.tables_not_fitting,
    )?;
    t.labelled(
        "unwind_binaries_without_table",
        "Binaries whose CFI could not be used, by reason (they unwind with frame pointers).",
        "reason",
        crate::unwind::FAILURE_REASONS
            .iter()
            .map(|why| (*why, u.build_failures.get(why).copied().unwrap_or(0))),
    )?;
    t.counter(
        "unwind_processes_loaded",
        "Processes whose mappings were loaded into the program's maps (first sight, exec, refresh).",
        u.processes_loaded,
    )?;
    t.counter(
        "unwind_processes_not_fitting",
        "Processes not loaded: mapping array or process map full.",
        u.processes_not_fitting,
    )?;
    t.counter(
        "unwind_table_build_milliseconds",
        "Time spent building unwind tables.",
        u.build_time.as_millis() as u64,
    )
}

impl Collector for Scrape {
    fn encode(&self, encoder: DescriptorEncoder) -> Encoded {
        let mut t = Families(encoder);
        let k = &self.kernel;
        t.counter(
            "samples",
            "Times the eBPF program ran (perf cpu-clock events on every CPU).",
            k.get(Counter::Samples),
        )?;
        t.counter(
            "samples_recorded",
            "Samples recorded in the kernel count maps.",
            k.get(Counter::Recorded),
        )?;
        t.labelled(
            "samples_skipped",
            "Samples skipped on purpose (not drops), by reason.",
            "reason",
            [Counter::IdleSkipped, Counter::Filtered].map(|c| (skipped_name(c), k.get(c))),
        )?;
        let kernel = |effect| {
            KernelLoss::all()
                .filter(move |r| r.effect() == effect)
                .map(|r| (r.name(), r.value(k)))
        };
        t.labelled(
            "samples_dropped",
            "Samples lost in the kernel before the drain, by reason.",
            "reason",
            kernel(Effect::Lost),
        )?;
        let drain = DrainLoss::ALL
            .iter()
            .map(|r| (r.name(), self.drain[r.index()]));
        t.labelled(
            "samples_degraded",
            "Samples kept with a stack or name missing or cut, by reason.",
            "reason",
            kernel(Effect::Degraded).chain(drain),
        )?;
        t.labelled(
            "user_stacks",
            "Samples with a user stack, by how the program's walk of it ended: `root` and \
             `frame_pointer_end` reach the outermost frame, the others stopped early.",
            "end",
            StackEnd::ALL.map(|e| (e.name(), self.user_stack_ends.get(&e).copied().unwrap_or(0))),
        )?;
        if let Some(u) = &self.unwind {
            unwind_families(&mut t, u)?;
        }
        t.labelled(
            "off_cpu_switches",
            "Context switches seen by the off-CPU programs, by what became of them: \
             `recorded` (time added), `short` (below --off-cpu-min), `not_sampled` \
             (--off-cpu-period), `filtered_out`, `kernel_thread`; `seen` counts them all. \
             Losses are in samples_dropped (off_cpu_start_lost, off_cpu_map_full, \
             off_cpu_paused).",
            "outcome",
            [
                ("seen", Counter::OffCpuSwitches),
                ("recorded", Counter::OffCpuRecorded),
                ("short", Counter::OffCpuShort),
                ("not_sampled", Counter::OffCpuNotSampled),
                ("filtered_out", Counter::OffCpuFiltered),
                ("kernel_thread", Counter::OffCpuKernelThreads),
            ]
            .map(|(name, c)| (name, k.get(c))),
        )?;
        if let Some(p) = &self.off_cpu_pauses {
            t.gauge(
                "off_cpu_paused",
                "1 while off-CPU recording is paused: the host switches context more often \
                 than --off-cpu-max-switches allows.",
                u64::from(p.paused),
            )?;
            t.counter(
                "off_cpu_pauses",
                "Times off-CPU recording was paused for the host's context switch rate.",
                p.pauses,
            )?;
        }
        t.counter(
            "off_cpu_waker_stacks",
            "Stacks taken of threads waking another thread of their process in a system \
             call (a lock released, a condition signalled): the `[woken by]` part of \
             off-CPU stacks.",
            k.get(Counter::OffCpuWakerStacks),
        )?;
        t.counter(
            "python_stacks",
            "Samples of Python processes whose Python frames were walked.",
            k.get(Counter::PythonStacks),
        )?;
        t.counter(
            "python_no_thread_state",
            "Samples of threads of Python processes without a Python thread state \
             (native frames only).",
            k.get(Counter::PythonNoThreadState),
        )?;
        t.counter(
            "python_unsupported_processes",
            "Processes found running a CPython whose frames are not read (a version \
             outside 3.10-3.13, or no interpreter symbols); each version is logged once.",
            crate::python::unsupported_processes(),
        )?;
        t.counter(
            "samples_kernel_only",
            "Kernel-mode samples without a user stack (kernel threads; informational).",
            k.get(Counter::KernelOnly),
        )?;
        t.counter(
            "samples_drained",
            "Samples read from the kernel maps, all windows.",
            self.samples_drained,
        )?;
        t.counter("windows", "Drain windows completed.", self.windows)?;
        if let Some(e) = &self.export {
            export_families(&mut t, e, "")?;
        }
        if let Some(e) = &self.otlp_export {
            export_families(&mut t, e, "otlp_")?;
        }
        memory_families(&mut t, &self.memory, self.reading)?;

        let p = &self.processes;
        t.gauge(
            "process_cache_processes",
            "Processes in the metadata cache.",
            p.processes,
        )?;
        t.gauge(
            "process_cache_binaries",
            "Open binaries in the metadata cache.",
            p.binaries,
        )?;
        t.counter(
            "process_snapshots_from_events",
            "Processes gone before their maps were read, named from the kernel's process events.",
            p.stats.from_events,
        )?;
        t.labelled(
            "process_metadata_failures",
            "Processes or binaries whose frames stay unnamed, by reason.",
            "reason",
            ProcessLoss::ALL.iter().map(|r| (r.name(), p.stats[*r])),
        )?;
        t.gauge(
            "pod_cache_pods",
            "Pods in the pod metadata cache.",
            self.pods,
        )?;
        let s = &self.symbolizer;
        t.counter(
            "symbolizer_lookups",
            "Addresses looked up with blazesym.",
            s.lookups,
        )?;
        t.counter(
            "symbolizer_cache_hits",
            "Addresses named from the cache.",
            s.cache_hits,
        )?;
        t.counter(
            "symbolizer_unnamed_frames",
            "Frames shown as module+0xOFFSET or [unknown].",
            s.unnamed_frames,
        )?;
        t.counter(
            "symbolizer_cache_resets",
            "Times the name cache was emptied to stay within its bound.",
            s.cache_resets,
        )?;
        t.counter(
            "symbolizer_jit_frames_named",
            "Frames of JIT-compiled code named from the process's perf map.",
            s.jit_frames_named,
        )?;
        t.counter(
            "symbolizer_jit_frames_unnamed",
            "Frames of JIT-compiled code no perf map names (shown as [jit]).",
            s.jit_frames_unnamed,
        )?;
        t.gauge(
            "perf_map_entries",
            "Entries of processes' perf maps held in memory.",
            s.perf_map.entries,
        )?;
        t.counter(
            "perf_map_malformed_lines",
            "Perf map lines that are not START SIZE NAME, skipped.",
            s.perf_map.malformed_lines,
        )?;
        t.counter(
            "perf_map_dropped_entries",
            "Perf map entries not kept because their memory bound was reached.",
            s.perf_map.dropped_entries,
        )?;
        t.counter(
            "perf_map_refused_files",
            "Perf map files refused: not a regular file, or owned by another user.",
            s.perf_map.refused_files,
        )?;
        for reason in SymbolizerDegrade::ALL {
            t.counter(
                &format!("symbolizer_{}", reason.name()),
                symbolizer_help(*reason),
                s[*reason],
            )?;
        }
        Ok(())
    }
}

/// The `reason` of a kernel counter of samples skipped on purpose.
fn skipped_name(c: Counter) -> &'static str {
    match c {
        Counter::IdleSkipped => "idle",
        other => other.name(),
    }
}

/// The families of one destination: `export_*` and `spill_*` for the
/// collector, `otlp_export_*` and `otlp_spill_*` (`prefix` "otlp_") for an
/// OTLP endpoint.
fn export_families(t: &mut Families<'_>, e: &ExportStats, prefix: &str) -> Encoded {
    let help = |text: &str| {
        if prefix.is_empty() {
            text.to_string()
        } else {
            format!("OTLP endpoint: {text}")
        }
    };
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    t.counter(
        &format!("{prefix}export_batches"),
        &help("Batches queued for the collector (one a window)."),
        load(&e.batches_queued),
    )?;
    t.counter(
        &format!("{prefix}export_batches_acked"),
        &help("Batches acknowledged by the collector."),
        load(&e.batches_acked),
    )?;
    t.counter(
        &format!("{prefix}export_batches_duplicate"),
        &help("Acknowledged batches the collector already had (re-sends)."),
        load(&e.batches_duplicate),
    )?;
    t.counter(
        &format!("{prefix}export_send_failures"),
        &help("Sends that failed and were retried with backoff."),
        load(&e.send_failures),
    )?;
    t.counter(
        &format!("{prefix}export_pushed_back"),
        &help("Sends the collector pushed back (overloaded, or this agent over its rate limit), sent again after the wait it asked for."),
        load(&e.pushed_back),
    )?;
    let drops = e.drops();
    t.labelled(
        &format!("{prefix}export_batches_dropped"),
        &help(
            "Batches dropped, by reason (spill_corrupt: spilled records failing their checksum).",
        ),
        "reason",
        drops.iter().map(|d| (d.reason, d.batches)),
    )?;
    t.counter(
        &format!("{prefix}export_samples"),
        &help("Samples in the batches queued."),
        load(&e.samples_queued),
    )?;
    t.counter(
        &format!("{prefix}export_samples_acked"),
        &help("Samples the collector acknowledged."),
        load(&e.samples_acked),
    )?;
    t.labelled(
        &format!("{prefix}export_samples_dropped"),
        &help("Samples in the batches dropped, by reason."),
        "reason",
        drops
            .iter()
            .filter(|d| d.samples_known)
            .map(|d| (d.reason, d.samples)),
    )?;
    t.counter(
        &format!("{prefix}export_bytes"),
        &help("Encoded bytes (before compression) of the batches queued."),
        load(&e.bytes_queued),
    )?;
    t.counter(
        &format!("{prefix}export_bytes_acked"),
        &help("Encoded bytes of the batches acknowledged."),
        load(&e.bytes_acked),
    )?;
    t.gauge(
        &format!("{prefix}export_largest_batch_bytes"),
        &help("Encoded size of the largest batch so far."),
        load(&e.largest_batch_bytes),
    )?;
    t.gauge(
        &format!("{prefix}export_queue_batches"),
        &help("Unacknowledged batches held in memory."),
        load(&e.queue_batches),
    )?;
    t.gauge(
        &format!("{prefix}export_queue_bytes"),
        &help("Encoded bytes of the unacknowledged batches held in memory."),
        load(&e.queue_bytes),
    )?;
    t.gauge(
        &format!("{prefix}export_collector_up"),
        &help("1 if the last send reached the collector, else 0."),
        load(&e.collector_up),
    )?;
    t.counter(
        &format!("{prefix}export_batches_parked"),
        &help("Batches moved from memory to the spill directory by the memory watchdog."),
        load(&e.parked_memory_limit),
    )?;
    t.counter(
        &format!("{prefix}spill_writes"),
        &help("Batches written to the spill directory."),
        load(&e.spill.spilled),
    )?;
    t.counter(
        &format!("{prefix}spill_replays"),
        &help("Spilled batches sent and acknowledged."),
        load(&e.spill.replayed),
    )?;
    t.gauge(
        &format!("{prefix}spill_records"),
        &help("Batches waiting in the spill directory."),
        load(&e.spill.records),
    )?;
    t.gauge(
        &format!("{prefix}spill_bytes"),
        &help("Bytes of the batches waiting in the spill directory."),
        load(&e.spill.bytes),
    )
}

fn memory_families(
    t: &mut Families<'_>,
    mem: &MemoryStats,
    reading: Option<MemoryReading>,
) -> Encoded {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (rss, peak, anon) = match reading {
        Some(r) => (
            r.rss_bytes,
            r.peak_bytes.max(load(&mem.peak_bytes)),
            r.anon_bytes,
        ),
        None => (
            load(&mem.rss_bytes),
            load(&mem.peak_bytes),
            load(&mem.anon_bytes),
        ),
    };
    t.gauge(
        "anonymous_memory_bytes",
        "The agent's anonymous resident memory (heap, stacks; no file pages): what \
         --memory-limit-mib applies to.",
        anon,
    )?;
    t.gauge(
        "anonymous_memory_peak_bytes",
        "The most anonymous memory the watchdog saw at a check.",
        load(&mem.anon_peak_bytes).max(anon),
    )?;
    t.gauge(
        "resident_memory_bytes",
        "Resident set size of the agent.",
        rss,
    )?;
    t.gauge(
        "resident_memory_peak_bytes",
        "Highest resident set size of the agent since start (VmHWM).",
        peak,
    )?;
    t.gauge(
        "memory_limit_bytes",
        "The agent's ceiling on its anonymous memory (0: none); shedding starts at 90 %.",
        load(&mem.limit_bytes),
    )?;
    t.counter(
        "memory_over_threshold",
        "Watchdog checks that found the RSS over 90 % of the ceiling.",
        load(&mem.over_threshold),
    )?;
    t.labelled(
        "memory_shed",
        "Memory shedding actions of the watchdog, by action.",
        "action",
        [
            ("park_queue", load(&mem.shed_queue)),
            ("evict_symbolizer", load(&mem.shed_symbolizer)),
            ("trim_allocator", load(&mem.shed_trim)),
        ],
    )?;
    t.counter(
        "memory_still_over",
        "Watchdog checks after which the RSS was still over the threshold.",
        load(&mem.still_over),
    )
}

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Renders every metric in the Prometheus text format (version 0.0.4).
/// `memory` is a fresh reading of the process (none without procfs).
pub fn render(m: &AgentMetrics, memory: Option<MemoryReading>) -> String {
    let scrape = Scrape {
        kernel: lock(&m.kernel).clone(),
        drain: std::array::from_fn(|i| m.drain_loss(DrainLoss::ALL[i])),
        samples_drained: m.samples_drained.load(Ordering::Relaxed),
        windows: m.windows.load(Ordering::Relaxed),
        user_stack_ends: lock(&m.user_stack_ends).clone(),
        unwind: lock(&m.unwind).clone(),
        off_cpu_pauses: *lock(&m.off_cpu_pauses),
        pods: m.pods.load(Ordering::Relaxed),
        processes: lock(&m.processes).clone(),
        symbolizer: lock(&m.symbolizer).clone(),
        export: m.export.clone(),
        otlp_export: m.otlp_export.clone(),
        memory: m.memory.clone(),
        reading: memory,
    };
    let mut registry = Registry::with_prefix("profiler_agent");
    registry.register_collector(Box::new(scrape));
    let mut out = String::with_capacity(8 << 10);
    // Writing to a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
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
                                    [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
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
        m.set_symbolizer(SymbolizerStats {
            lookups: 42,
            ..SymbolizerStats::default()
        });
        m
    }

    /// The exposition format: every sample line belongs to a family declared
    /// just before with HELP and TYPE, no family is declared twice, names
    /// are valid, values are numbers.
    fn check_format(text: &str) {
        let mut families = std::collections::HashSet::new();
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
                assert!(families.insert(name.to_string()), "{name} twice");
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
            anon_bytes: 12 << 20,
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

    /// The `reason` values of a family, in order.
    fn reasons<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
        let prefix = format!("{family}{{reason=\"");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|rest| rest.split('"').next().unwrap())
            .collect()
    }

    fn once(values: &[&str], name: &str, family: &str) {
        let n = values.iter().filter(|v| **v == name).count();
        assert_eq!(n, 1, "{name} in {family}: {values:?}");
    }

    #[test]
    fn every_reason_of_every_stage_appears_once() {
        let text = render(&metrics(), None);
        check_format(&text);
        let dropped = reasons(&text, "profiler_agent_samples_dropped_total");
        let degraded = reasons(&text, "profiler_agent_samples_degraded_total");
        for reason in KernelLoss::all() {
            let (family, values) = match reason.effect() {
                Effect::Lost => ("samples_dropped", &dropped),
                Effect::Degraded => ("samples_degraded", &degraded),
            };
            once(values, reason.name(), family);
        }
        for reason in DrainLoss::ALL {
            once(&degraded, reason.name(), "samples_degraded");
        }
        assert_eq!(
            dropped.len() + degraded.len(),
            KernelLoss::all().count() + DrainLoss::COUNT
        );
        let process = reasons(&text, "profiler_agent_process_metadata_failures_total");
        assert_eq!(process.len(), ProcessLoss::COUNT);
        for reason in ProcessLoss::ALL {
            once(&process, reason.name(), "process_metadata_failures");
        }
        for reason in SymbolizerDegrade::ALL {
            let series = format!("profiler_agent_symbolizer_{}_total ", reason.name());
            let n = text.lines().filter(|l| l.starts_with(&series)).count();
            assert_eq!(n, 1, "{series}");
        }
        let export = ExportStats::default();
        for family in [
            "profiler_agent_export_batches_dropped_total",
            "profiler_agent_export_samples_dropped_total",
        ] {
            let values = reasons(&text, family);
            for d in export.drops() {
                if family.contains("samples") && d.reason == "spill_corrupt" {
                    continue;
                }
                once(&values, d.reason, family);
            }
        }
    }

    #[test]
    fn the_log_summary_names_a_reason_as_the_metric_does() {
        let m = metrics();
        let mut s = LogSummary::new(Duration::ZERO, &m);
        let mut k = lock(&m.kernel).clone();
        k.0.insert(Counter::StackMapFull, 4);
        m.set_kernel(k);
        let mut processes = ProcessGauges::default();
        processes.stats[ProcessLoss::BinaryOpenFailed] = 2;
        m.set_processes(processes);
        let mut symbolizer = SymbolizerStats::default();
        symbolizer.degraded[SymbolizerDegrade::FramesOverBudget.index()] = 9;
        m.set_symbolizer(symbolizer);
        m.add_window(10, 0, 3);
        let grown = s.deltas(m.activity());
        assert_eq!(
            grown,
            vec![
                ("stack_map_full".to_string(), 4),
                ("stack_truncated".to_string(), 3),
                ("binary_open_failed".to_string(), 2),
                ("symbolizer_frames_over_budget".to_string(), 9),
            ]
        );
        let text = render(&m, None);
        for line in [
            "profiler_agent_samples_degraded_total{reason=\"stack_map_full\"} 4",
            "profiler_agent_samples_degraded_total{reason=\"stack_truncated\"} 5",
            "profiler_agent_process_metadata_failures_total{reason=\"binary_open_failed\"} 2",
            "profiler_agent_symbolizer_frames_over_budget_total 9",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
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
