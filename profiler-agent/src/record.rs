//! `record` and `run`: options turned into the [`crate::pipeline`] with
//! the kernel source, the blazesym symbolizer, the process cache, the pod
//! watch, and the sinks (the local profile; the collector in `run` mode).
use std::{
    collections::BTreeMap,
    sync::{atomic::AtomicBool, Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    config::RecordOptions,
    drain::Counters,
    export::{ExportStats, Exporter},
    fold::FoldedProfile,
    kernel::KernelSource,
    kube::{PodCache, Watcher},
    metrics::{AgentMetrics, MetricsServer},
    pipeline::{CollectorSink, LocalSink, Pipeline, PipelineOptions, PodDirectory, Sink, Stages},
    process::{ProcessCache, ProcessStats},
    sample_type::SampleType,
    symbolize::{BlazeSymbolizer, SymbolizerStats},
    Result,
};

/// What a recording produced.
#[derive(Clone, Debug)]
pub struct Recording {
    /// The whole run's `cpu` folded stacks (empty in `run` mode without
    /// `-o` or `--folded`: an always-on agent keeps no history).
    pub profile: FoldedProfile,
    /// The whole run's profiles of the other sample types, if any.
    pub other_profiles: BTreeMap<SampleType, FoldedProfile>,
    /// Whether the whole run's profiles were kept (see `profile`).
    pub profile_kept: bool,
    /// Samples drained, in all windows.
    pub samples: u64,
    /// Kernel counters at the end.
    pub counters: Counters,
    pub process_stats: ProcessStats,
    pub symbolizer_stats: SymbolizerStats,
    /// Samples whose stack id had vanished from the stack map.
    pub missing_stacks: u64,
    /// Samples whose stack was cut at the depth limit.
    pub truncated_stacks: u64,
    /// Samples with a user stack, by how the program's walk ended.
    pub user_stack_ends: BTreeMap<profiler_common::unwind::StackEnd, u64>,
    /// The unwind tables at the end.
    pub unwind: Option<crate::unwind::UnwindStats>,
    /// Most distinct stacks seen in one drain window.
    pub max_window_stacks: u64,
    pub duration: Duration,
    pub frequency: u64,
    pub cpus: usize,
    /// Distinct processes snapshotted.
    pub processes_seen: u64,
    /// Verifier's processed instruction count and program size, if known.
    pub program_info: Option<(u64, u64)>,
    pub host: String,
    /// What was shipped to the collector, in `run` mode.
    pub export: Option<Arc<ExportStats>>,
    /// What was shipped to the OTLP endpoint, when there is one.
    pub otlp_export: Option<Arc<ExportStats>>,
}

/// The host name, for titles and labels.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// A recording in progress: the sampler is attached from
/// [`Recorder::start`] on, so callers can start workloads before [`Recorder::run`].
pub struct Recorder {
    options: RecordOptions,
    host: String,
    local: Option<LocalSink>,
    collector: Option<CollectorSink>,
    processes: Arc<Mutex<ProcessCache>>,
    source: KernelSource,
    pods: Option<PodCache>,
    metrics: Arc<AgentMetrics>,
    metrics_server: Option<MetricsServer>,
    started: Instant,
    window_start: SystemTime,
    /// Ships windows to an OTLP endpoint (next to or instead of the
    /// collector).
    otlp: Option<CollectorSink>,
}

/// Whether the run has a local profile sink: always in `record`, in `run`
/// (which ships to a collector) only with `-o` or `--folded`, so an
/// always-on agent does not grow with every distinct stack.
pub fn keeps_local_profile(options: &RecordOptions) -> bool {
    (options.export.is_none() && options.otlp.is_none())
        || options.svg.is_some()
        || options.folded.is_some()
}

/// Records until `options.duration` passes or `stop` is set (Ctrl-C), then
/// writes the outputs named in `options`.
pub fn record(options: &RecordOptions, stop: &AtomicBool) -> Result<Recording> {
    Recorder::start(options)?.run(stop)
}

impl Recorder {
    /// Checks the outputs are writable, then loads and attaches the sampler.
    pub fn start(options: &RecordOptions) -> Result<Self> {
        let host = hostname();
        let mut local = keeps_local_profile(options)
            .then(|| LocalSink::open(options.svg.as_deref(), options.folded.as_deref(), &host))
            .transpose()?;
        if let (Some(local), Some(_)) = (local.as_mut(), options.sampler.off_cpu) {
            local.expect(SampleType::OffCpu);
        }
        let processes = Arc::new(Mutex::new(ProcessCache::default()));
        let started = (|| {
            let exporter = options.export.clone().map(Exporter::start).transpose()?;
            let otlp = options.otlp.clone().map(Exporter::start).transpose()?;
            let pods = match &options.kube {
                Some(kube) => {
                    let pods = PodCache::default();
                    Watcher::new(kube.clone(), pods.clone())?.spawn()?;
                    tracing::info!(api = %kube.api_url, node = %kube.node, "watching this node's pods");
                    Some(pods)
                }
                None => None,
            };
            let source = KernelSource::start(&options.sampler, processes.clone())?;
            if options.drop_capabilities {
                let kept = crate::privileges::drop_unneeded()?;
                tracing::info!(kept = %kept.join(","), "loaded and attached: dropped every other capability");
            }
            let metrics = Arc::new(
                AgentMetrics::new(exporter.as_ref().map(|e| e.stats().clone()), Arc::default())
                    .with_otlp(otlp.as_ref().map(|e| e.stats().clone())),
            );
            let metrics_server = options
                .metrics_listen
                .map(|addr| MetricsServer::start(addr, metrics.clone()))
                .transpose()?;
            Ok((source, exporter, otlp, pods, metrics, metrics_server))
        })();
        let (source, exporter, otlp, pods, metrics, metrics_server) = match started {
            Ok(s) => s,
            Err(e) => {
                local.into_iter().for_each(LocalSink::abandon);
                return Err(e);
            }
        };
        Ok(Self {
            options: options.clone(),
            host,
            local,
            collector: exporter.map(CollectorSink::new),
            otlp: otlp.map(CollectorSink::new),
            processes,
            source,
            pods,
            metrics,
            metrics_server,
            started: Instant::now(),
            window_start: SystemTime::now(),
        })
    }

    /// The address `/metrics` is served on, if it is.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_server.as_ref().map(MetricsServer::addr)
    }

    /// Samples until the duration passes or `stop` is set, drains on the
    /// interval, then stops sampling, drains everything and writes outputs.
    pub fn run(self, stop: &AtomicBool) -> Result<Recording> {
        let Recorder {
            options,
            host,
            mut local,
            mut collector,
            processes,
            mut source,
            pods,
            metrics,
            metrics_server,
            started,
            window_start,
            mut otlp,
        } = self;
        // Serves until the end of the run, final counters included.
        let _metrics_server = metrics_server;
        let mut symbolizer =
            BlazeSymbolizer::with_limits(processes.clone(), options.symbolize.clone());
        let export = collector.as_ref().map(|c| c.stats().clone());
        let otlp_export = otlp.as_ref().map(|c| c.stats().clone());
        let node = options
            .export
            .as_ref()
            .or(options.otlp.as_ref())
            .map_or_else(|| host.clone(), |e| e.node.clone());
        let pipeline = Pipeline {
            options: PipelineOptions {
                node,
                frequency: options.sampler.frequency,
                drain_interval: options.drain_interval,
                duration: options.duration,
                progress: options.progress,
                memory_limit_bytes: options.memory_limit_bytes,
            },
            metrics,
            started,
            window_start,
        };
        let mut sinks: Vec<&mut dyn Sink> = Vec::new();
        if let Some(collector) = collector.as_mut() {
            sinks.push(collector);
        }
        if let Some(otlp) = otlp.as_mut() {
            sinks.push(otlp);
        }
        if let Some(local) = local.as_mut() {
            sinks.push(local);
        }
        let report = pipeline.run(
            Stages {
                source: &mut source,
                symbolizer: &mut symbolizer,
                processes: &*processes,
                pods: pods.as_ref().map(|p| p as &dyn PodDirectory),
                sinks,
            },
            stop,
        )?;
        drop(source);

        let profile_kept = local.is_some();
        let mut profiles = local.map(LocalSink::into_profiles).unwrap_or_default();
        let profile = profiles.remove(&SampleType::Cpu).unwrap_or_default();
        Ok(Recording {
            profile,
            other_profiles: profiles,
            profile_kept,
            samples: report.drained.get(&SampleType::Cpu).copied().unwrap_or(0),
            counters: report.counters,
            processes_seen: report.process_stats.snapshots,
            process_stats: report.process_stats,
            symbolizer_stats: report.symbolizer_stats,
            missing_stacks: report.missing_stacks,
            truncated_stacks: report.truncated_stacks,
            user_stack_ends: report.user_stack_ends,
            unwind: report.unwind,
            max_window_stacks: report.max_window_stacks,
            duration: report.duration,
            frequency: options.sampler.frequency,
            cpus: report.source.cpus,
            program_info: report.source.program_info,
            host,
            export,
            otlp_export,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportOptions;

    #[test]
    fn record_keeps_a_local_profile_and_run_only_when_asked() {
        let record = RecordOptions::default();
        assert!(keeps_local_profile(&record));
        let run = RecordOptions {
            export: Some(ExportOptions {
                collector: "http://127.0.0.1:7070".into(),
                node: "n1".into(),
                queue_bytes: 1 << 20,
                flush_timeout: Duration::from_secs(1),
                spill_dir: None,
                spill_bytes: 0,
                security: Default::default(),
                protocol: Default::default(),
                headers: Vec::new(),
            }),
            ..RecordOptions::default()
        };
        assert!(!keeps_local_profile(&run));
        for (svg, folded) in [(Some("f.svg"), None), (None, Some("s.txt"))] {
            let with_output = RecordOptions {
                svg: svg.map(Into::into),
                folded: folded.map(Into::into),
                ..run.clone()
            };
            assert!(keeps_local_profile(&with_output));
        }
    }
}
