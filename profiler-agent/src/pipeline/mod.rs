//! The agent as one pipeline of stages, each behind a trait:
//!
//! ```text
//! source ──▶ symbolize ──▶ label ──▶ sinks
//! (kernel    (blazesym,    (process,   local profile (folded, SVG)
//!  maps)      kallsyms)     pod, ...)  collector (queue, spill, upload)
//! ```
//!
//! - [`source`]: [`SampleSource`], drained every interval and once more,
//!   entirely, after sampling stops;
//! - symbolize: [`crate::symbolize::Symbolize`], one window at a time
//!   ([`crate::fold::symbolize_window`]);
//! - [`label`]: [`label::labels`], a pure function of the sample, its
//!   process's facts ([`ProcessTable`]) and the pod watch's answer
//!   ([`PodDirectory`]);
//! - [`sink`]: [`Sink`], one labelled window per drain and sample type,
//!   then one `finish` at exit: [`LocalSink`] and [`CollectorSink`].
//!
//! `record` runs it with the local sink; `run` with the collector sink (and
//! the local sink when `-o`/`--folded` is given). [`testing`] has in-memory
//! stages to run it without root.
pub mod collector;
pub mod label;
pub mod local;
mod monitor;
pub mod sink;
pub mod source;
pub mod testing;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{IsTerminal, Write},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

pub use self::{
    collector::CollectorSink,
    label::{PodDirectory, ProcessTable},
    local::LocalSink,
    sink::{LabelledSample, LabelledWindow, RunEnd, Sink},
    source::{SampleSource, SourceInfo},
};
use self::{label::WindowLabeller, monitor::Monitor};
use crate::{
    drain::{Counters, RawWindow},
    fold::symbolize_window,
    memory::SelfWatchdog,
    metrics::{AgentMetrics, LogSummary},
    process::ProcessStats,
    sample_type::SampleType,
    symbolize::{Symbolize, SymbolizerStats},
    Result,
};

/// How the pipeline runs.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// The `node` label.
    pub node: String,
    /// Sampling frequency per CPU, in Hz (the `cpu` windows' frequency).
    pub frequency: u64,
    /// Time between two drains.
    pub drain_interval: Duration,
    /// Stop after this long; `None`: until the stop flag is set.
    pub duration: Option<Duration>,
    /// Show a progress line on a terminal.
    pub progress: bool,
    /// RSS ceiling: near it the memory watchdog sheds memory.
    pub memory_limit_bytes: Option<u64>,
}

/// The stages of one run (the sinks may outlive the other borrows).
pub struct Stages<'a, 's> {
    pub source: &'a mut dyn SampleSource,
    pub symbolizer: &'a mut dyn Symbolize,
    pub processes: &'a dyn ProcessTable,
    /// The pod watch, when one runs.
    pub pods: Option<&'a dyn PodDirectory>,
    /// Every window goes to each, in this order; so does `finish`.
    pub sinks: Vec<&'s mut dyn Sink>,
}

/// What a run did, for the summary.
#[derive(Clone, Debug, Default)]
pub struct RunReport {
    /// From the start of sampling to its stop.
    pub duration: Duration,
    /// The source's counters at the end.
    pub counters: Counters,
    /// Drains, the final one included.
    pub windows: u64,
    /// Values drained, by type (for `cpu`, samples).
    pub drained: BTreeMap<SampleType, u64>,
    /// Values handed to the sinks, by type.
    pub delivered: BTreeMap<SampleType, u64>,
    /// Samples whose stack id had vanished from the stack map.
    pub missing_stacks: u64,
    /// Samples whose stack was cut at the depth limit.
    pub truncated_stacks: u64,
    /// Samples with a user stack, by how the program's walk ended.
    pub user_stack_ends: BTreeMap<profiler_common::unwind::StackEnd, u64>,
    /// The unwind tables at the end, for a source that has them.
    pub unwind: Option<crate::unwind::UnwindStats>,
    /// Most distinct `cpu` stacks (process and frames) in one window.
    pub max_window_stacks: u64,
    pub symbolizer_stats: SymbolizerStats,
    pub process_stats: ProcessStats,
    pub source: SourceInfo,
}

/// One run of the stages, from the first drain to the outputs.
pub struct Pipeline {
    pub options: PipelineOptions,
    pub metrics: Arc<AgentMetrics>,
    /// When sampling started: the duration and drain times count from it.
    pub started: Instant,
    /// Start of the first window.
    pub window_start: SystemTime,
}

impl Pipeline {
    /// A pipeline whose sampling starts now.
    pub fn new(options: PipelineOptions, metrics: Arc<AgentMetrics>) -> Self {
        Self {
            options,
            metrics,
            started: Instant::now(),
            window_start: SystemTime::now(),
        }
    }

    /// Drains on the interval until the duration passes or `stop` is set,
    /// then stops the source, drains everything and finishes every sink
    /// once. Every drained sample goes to every sink.
    pub fn run(self, mut stages: Stages<'_, '_>, stop: &AtomicBool) -> Result<RunReport> {
        let Pipeline {
            options,
            metrics,
            started,
            mut window_start,
        } = self;
        let mut monitor = Monitor {
            watchdog: options
                .memory_limit_bytes
                .map(|limit| SelfWatchdog::for_self(limit, metrics.memory.clone())),
            summary: LogSummary::new(crate::metrics::SUMMARY_INTERVAL, &metrics),
            metrics: metrics.clone(),
        };
        let mut report = RunReport::default();
        let deadline = options.duration.map(|d| started + d);
        let mut next_drain = started + options.drain_interval;
        let mut next_progress = started;
        let progress = options.progress && std::io::stderr().is_terminal();
        loop {
            let now = Instant::now();
            if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| now >= d) {
                break;
            }
            if now >= next_drain {
                let window = stages.source.drain()?;
                let window_end = SystemTime::now();
                deliver(
                    &mut stages,
                    &options,
                    &metrics,
                    &mut report,
                    window,
                    window_start,
                    window_end,
                );
                // Pages of the binaries read for this window's names leave
                // the resident set until a later window reads them again.
                crate::memory::release_mapped_files();
                // And the heap the window freed (its samples, batch, parse
                // buffers) goes back to the kernel.
                crate::memory::trim_allocator();
                window_start = window_end;
                let swept = stages.processes.sweep();
                stages.symbolizer.forget_binaries(&swept.binaries);
                stages.source.forget_pids(&swept.pids);
                monitor.window(
                    &*stages.source,
                    stages.processes,
                    &mut *stages.symbolizer,
                    stages.pods,
                    &mut stages.sinks,
                );
                next_drain += options.drain_interval;
            }
            if progress && now >= next_progress {
                let samples = stages
                    .source
                    .counters()?
                    .get(profiler_common::Counter::Recorded);
                let elapsed = started.elapsed().as_secs();
                let of = options
                    .duration
                    .map(|d| format!(" of {}s", d.as_secs()))
                    .unwrap_or_else(|| " (Ctrl-C to stop)".into());
                eprint!("\rprofiling: {samples} samples, {elapsed}s{of}   ");
                let _ = std::io::stderr().flush();
                next_progress += Duration::from_secs(1);
            }
            let mut wake = next_drain.min(next_progress.max(now + Duration::from_millis(100)));
            if let Some(d) = deadline {
                wake = wake.min(d);
            }
            std::thread::sleep(
                wake.saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(1), Duration::from_millis(100)),
            );
        }
        if progress {
            eprintln!();
        }
        report.duration = started.elapsed();

        // Stop sampling, then empty the source: nothing is left behind.
        stages.source.stop()?;
        let window = stages.source.drain_all()?;
        deliver(
            &mut stages,
            &options,
            &metrics,
            &mut report,
            window,
            window_start,
            SystemTime::now(),
        );
        let end = RunEnd {
            duration: report.duration,
            frequency: options.frequency,
        };
        let mut first_error = None;
        for sink in stages.sinks.iter_mut() {
            if let Err(e) = sink.finish(&end) {
                first_error.get_or_insert(e);
            }
        }
        report.counters = stages.source.counters()?;
        metrics.set_kernel(report.counters.clone());
        if let Some(e) = first_error {
            return Err(e);
        }
        report.source = stages.source.info();
        report.unwind = stages.source.unwind_stats();
        report.process_stats = stages.processes.gauges().stats;
        report.symbolizer_stats = stages.symbolizer.stats();
        Ok(report)
    }
}

/// Symbolizes and labels one drained window and hands it to every sink: a
/// `cpu` window always (empty or not), and one per other type present.
fn deliver(
    stages: &mut Stages<'_, '_>,
    options: &PipelineOptions,
    metrics: &AgentMetrics,
    report: &mut RunReport,
    window: RawWindow,
    start: SystemTime,
    end: SystemTime,
) {
    let cpu_total = window.total(SampleType::Cpu);
    tracing::debug!(samples = cpu_total, "drained a window");
    metrics.add_window(cpu_total, window.missing_stacks, window.truncated_stacks);
    metrics.add_user_stack_ends(&window.user_stack_ends);
    for (end, n) in &window.user_stack_ends {
        *report.user_stack_ends.entry(*end).or_default() += n;
    }
    report.windows += 1;
    report.missing_stacks += window.missing_stacks;
    report.truncated_stacks += window.truncated_stacks;
    for sample_type in window.types() {
        *report.drained.entry(sample_type).or_default() += window.total(sample_type);
    }

    let named = symbolize_window(&window, &mut *stages.symbolizer);
    drop(window);
    let mut labeller = WindowLabeller {
        node: &options.node,
        processes: stages.processes,
        pods: stages.pods,
        seen: HashMap::new(),
        seen_in_state: HashMap::new(),
    };
    let mut by_type: BTreeMap<SampleType, Vec<LabelledSample>> =
        BTreeMap::from([(SampleType::Cpu, Vec::new())]);
    for sample in named {
        let labels = labeller.labels_in_state(sample.tgid, &sample.process, sample.thread_state);
        by_type
            .entry(sample.sample_type)
            .or_default()
            .push(LabelledSample {
                labels,
                frames: sample.frames,
                value: sample.value,
            });
    }
    for (sample_type, samples) in by_type {
        let window = LabelledWindow {
            sample_type,
            start,
            end,
            frequency_hz: if sample_type == SampleType::Cpu {
                options.frequency as u32
            } else {
                0
            },
            samples,
        };
        if sample_type == SampleType::Cpu {
            let stacks: HashSet<(&str, &[String])> = window
                .samples
                .iter()
                .map(|s| (s.labels.process.as_str(), s.frames.as_slice()))
                .collect();
            report.max_window_stacks = report.max_window_stacks.max(stacks.len() as u64);
        }
        for sink in stages.sinks.iter_mut() {
            sink.window(&window);
        }
        *report.delivered.entry(sample_type).or_default() += window.total();
    }
}
