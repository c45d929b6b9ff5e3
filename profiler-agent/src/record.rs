//! One-shot recording: sample the host (or some processes) for a while,
//! drain on an interval, and write folded stacks and a flame graph.
use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, IsTerminal, Seek, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use crate::{
    config::RecordOptions,
    drain::{Counters, RawWindow, SampleSource},
    export::{BatchBuilder, ExportStats, Exporter},
    fold::{symbolize_window, FoldedProfile},
    kube::{PodCache, Watcher},
    memory::{SelfWatchdog, Shedder},
    metrics::{AgentMetrics, LogSummary, MetricsServer, ProcessGauges},
    process::{ProcessCache, ProcessStats},
    render::{write_svg, RenderInfo},
    sampler::Sampler,
    symbolize::{BlazeSymbolizer, SymbolizerStats},
    Error, Result,
};

/// What a recording produced.
#[derive(Clone, Debug)]
pub struct Recording {
    /// The whole run's folded stacks (empty in `run` mode without `-o` or
    /// `--folded`: an always-on agent keeps no history).
    pub profile: FoldedProfile,
    /// Samples drained, in all windows.
    pub samples: u64,
    /// Kernel counters at the end.
    pub counters: Counters,
    pub process_stats: ProcessStats,
    pub symbolizer_stats: SymbolizerStats,
    /// Samples whose stack id had vanished from the stack map.
    pub missing_stacks: u64,
    /// Samples whose stack was cut at the kernel's depth limit.
    pub truncated_stacks: u64,
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
}

/// The host name, for titles and labels.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// An output file opened (not truncated) at start, so an unwritable path
/// fails before profiling and a failed start leaves an old file intact.
struct Output {
    path: PathBuf,
    file: File,
    created: bool,
}

impl Output {
    fn open(path: &Path) -> Result<Self> {
        let created = !path.exists();
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map(|file| Output {
                path: path.to_path_buf(),
                file,
                created,
            })
            .map_err(|source| Error::Output {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Replaces the file's content with what `write` produces.
    fn write_with(
        mut self,
        write: impl FnOnce(&mut BufWriter<&mut File>) -> Result<()>,
    ) -> Result<()> {
        let err = |source| Error::Output {
            path: self.path.clone(),
            source,
        };
        self.file.set_len(0).map_err(err)?;
        self.file.rewind().map_err(err)?;
        let mut out = BufWriter::new(&mut self.file);
        write(&mut out)?;
        out.flush().map_err(err)
    }

    /// Removes the file if this run created it (start failed).
    fn abandon(self) {
        if self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A recording in progress: the sampler is attached from
/// [`Recorder::start`] on, so callers can start workloads before [`Recorder::run`].
pub struct Recorder {
    options: RecordOptions,
    svg_out: Option<Output>,
    folded_out: Option<Output>,
    processes: Arc<Mutex<ProcessCache>>,
    sampler: Sampler,
    exporter: Option<Exporter>,
    pods: Option<PodCache>,
    metrics: Arc<AgentMetrics>,
    metrics_server: Option<MetricsServer>,
    started: Instant,
    window_start: SystemTime,
}

/// What the memory watchdog acts on.
struct AgentShedder<'a> {
    exporter: Option<&'a Exporter>,
    symbolizer: &'a mut BlazeSymbolizer,
}

impl Shedder for AgentShedder<'_> {
    fn park_queue(&mut self) {
        if let Some(exporter) = self.exporter {
            exporter.park_queue(Duration::from_secs(2));
        }
    }

    fn evict_symbolizer(&mut self) {
        self.symbolizer.evict_caches();
    }
}

/// Once a window: publishes the figures `/metrics` shows and runs the
/// memory watchdog.
struct Monitor {
    metrics: Arc<AgentMetrics>,
    watchdog: Option<SelfWatchdog>,
    summary: LogSummary,
}

impl Monitor {
    fn window(
        &mut self,
        sampler: &Sampler,
        processes: &Mutex<ProcessCache>,
        symbolizer: &mut BlazeSymbolizer,
        pods: Option<&PodCache>,
        exporter: Option<&Exporter>,
    ) {
        match sampler.counters() {
            Ok(counters) => self.metrics.set_kernel(counters),
            Err(e) => tracing::debug!("reading the kernel counters: {e}"),
        }
        {
            let cache = processes.lock().unwrap_or_else(|e| e.into_inner());
            self.metrics.set_processes(ProcessGauges {
                stats: cache.stats().clone(),
                processes: cache.process_count() as u64,
                binaries: cache.binary_count() as u64,
            });
        }
        if let Some(pods) = pods {
            self.metrics
                .pods
                .store(pods.len() as u64, Ordering::Relaxed);
        }
        if let Some(watchdog) = &mut self.watchdog {
            watchdog.check(&mut AgentShedder {
                exporter,
                symbolizer: &mut *symbolizer,
            });
        }
        self.metrics.set_symbolizer(symbolizer.stats());
        self.summary.tick(&self.metrics);
    }
}

/// Records until `options.duration` passes or `stop` is set (Ctrl-C), then
/// writes the outputs named in `options`.
pub fn record(options: &RecordOptions, stop: &AtomicBool) -> Result<Recording> {
    Recorder::start(options)?.run(stop)
}

/// Where a drained window goes: the local profile, and the collector.
struct Sinks<'a> {
    processes: &'a Mutex<ProcessCache>,
    symbolizer: &'a mut BlazeSymbolizer,
    /// The whole run's profile; `None` in `run` mode without local outputs,
    /// so an always-on agent does not grow with every distinct stack.
    profile: Option<&'a mut FoldedProfile>,
    exporter: Option<&'a mut Exporter>,
    pods: Option<&'a PodCache>,
    frequency: u32,
}

impl Sinks<'_> {
    /// Symbolizes a window once, names each sample after its process
    /// (`/proc/PID/comm` at first sight; the thread's comm otherwise), adds it
    /// to the local profile and ships it as one batch.
    fn take(&mut self, window: RawWindow, start: SystemTime, end: SystemTime) {
        let mut samples = symbolize_window(&window, self.symbolizer);
        let cache = self.processes.lock().unwrap_or_else(|e| e.into_inner());
        for sample in &mut samples {
            if let Some(name) = cache.name(sample.tgid) {
                if name != sample.process {
                    sample.process = name.to_string();
                }
            }
            if let Some(profile) = self.profile.as_deref_mut() {
                profile.add(&sample.process, &sample.frames, sample.count);
            }
        }
        let Some(exporter) = self.exporter.as_deref_mut() else {
            return;
        };
        let mut batch = BatchBuilder::new();
        let node = exporter.node().to_string();
        let mut frames = Vec::new();
        for sample in &samples {
            let pid = sample.tgid.to_string();
            let mut labels = vec![
                ("node", node.as_str()),
                ("process", sample.process.as_str()),
                ("pid", pid.as_str()),
            ];
            let exe = cache.exe(sample.tgid);
            if let Some(exe) = exe {
                labels.push(("exe", exe));
            }
            let cgroup = cache.cgroup(sample.tgid);
            let container_id = cgroup.and_then(|c| c.container_id.as_deref());
            if let Some(id) = container_id {
                labels.push(("container_id", id));
            }
            // Pod labels only when the watch knows the pod: never guessed.
            let pod = cgroup
                .and_then(|c| c.pod_uid.as_deref())
                .zip(self.pods)
                .and_then(|(uid, pods)| pods.lookup(uid, container_id));
            if let Some(pod) = &pod {
                labels.push(("pod", pod.pod.as_str()));
                labels.push(("namespace", pod.namespace.as_str()));
                if let Some(container) = &pod.container {
                    labels.push(("container", container.as_str()));
                }
            }
            // A pod the watch does not know yet gets no service rather than
            // a made-up one; host processes get their unit or executable.
            let in_unknown_pod =
                pod.is_none() && self.pods.is_some() && cgroup.is_some_and(|c| c.pod_uid.is_some());
            let fallback = cgroup
                .filter(|_| !in_unknown_pod)
                .and_then(|c| crate::cgroup::fallback_service(c, exe));
            let service = pod
                .as_ref()
                .map(|p| p.service.as_str())
                .or(fallback.as_deref());
            if let Some(service) = service {
                labels.push(("service", service));
            }
            // The process is the root frame, as in the local folded output.
            frames.clear();
            frames.push(sample.process.clone());
            if sample.frames.is_empty() {
                frames.push(crate::fold::NO_STACK_FRAME.to_string());
            }
            frames.extend(sample.frames.iter().cloned());
            batch.add(&labels, &frames, sample.count);
        }
        drop(cache);
        let size = exporter.send(batch, start, end, self.frequency);
        tracing::debug!(
            bytes = size,
            samples = window.total(),
            "window queued for the collector"
        );
    }
}

impl Recorder {
    /// Checks the outputs are writable, then loads and attaches the sampler.
    pub fn start(options: &RecordOptions) -> Result<Self> {
        let svg_out = options.svg.as_deref().map(Output::open).transpose()?;
        let folded_out = match options.folded.as_deref().map(Output::open).transpose() {
            Ok(out) => out,
            Err(e) => {
                svg_out.into_iter().for_each(Output::abandon);
                return Err(e);
            }
        };
        let processes = Arc::new(Mutex::new(ProcessCache::default()));
        let started = (|| {
            let exporter = options.export.clone().map(Exporter::start).transpose()?;
            let pods = match &options.kube {
                Some(kube) => {
                    let pods = PodCache::default();
                    Watcher::new(kube.clone(), pods.clone())?.spawn()?;
                    tracing::info!(api = %kube.api_url, node = %kube.node, "watching this node's pods");
                    Some(pods)
                }
                None => None,
            };
            let sampler = Sampler::start(&options.sampler, processes.clone())?;
            if options.drop_capabilities {
                let kept = crate::privileges::drop_unneeded()?;
                tracing::info!(kept = %kept.join(","), "loaded and attached: dropped every other capability");
            }
            let metrics = Arc::new(AgentMetrics::new(
                exporter.as_ref().map(|e| e.stats().clone()),
                Arc::default(),
            ));
            let metrics_server = options
                .metrics_listen
                .map(|addr| MetricsServer::start(addr, metrics.clone()))
                .transpose()?;
            Ok((sampler, exporter, pods, metrics, metrics_server))
        })();
        let (sampler, exporter, pods, metrics, metrics_server) = match started {
            Ok(s) => s,
            Err(e) => {
                svg_out
                    .into_iter()
                    .chain(folded_out)
                    .for_each(Output::abandon);
                return Err(e);
            }
        };
        Ok(Self {
            options: options.clone(),
            svg_out,
            folded_out,
            processes,
            sampler,
            exporter,
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
            svg_out,
            folded_out,
            processes,
            mut sampler,
            mut exporter,
            pods,
            metrics,
            metrics_server,
            started,
            mut window_start,
        } = self;
        // Serves until the end of the run, final counters included.
        let _metrics_server = metrics_server;
        let mut monitor = Monitor {
            watchdog: options
                .memory_limit_bytes
                .map(|limit| SelfWatchdog::for_self(limit, metrics.memory.clone())),
            summary: LogSummary::new(crate::metrics::SUMMARY_INTERVAL, &metrics),
            metrics: metrics.clone(),
        };
        let mut symbolizer =
            BlazeSymbolizer::with_limits(processes.clone(), options.symbolize.clone());
        let mut profile = FoldedProfile::default();
        let export_stats = exporter.as_ref().map(|e| e.stats().clone());
        let keep_profile = exporter.is_none() || options.svg.is_some() || options.folded.is_some();
        let frequency = options.sampler.frequency as u32;

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
                let window = sampler.drain()?;
                tracing::debug!(samples = window.total(), "drained a window");
                let window_end = SystemTime::now();
                metrics.add_window(
                    window.total(),
                    window.missing_stacks,
                    window.truncated_stacks,
                );
                Sinks {
                    processes: &processes,
                    symbolizer: &mut symbolizer,
                    profile: keep_profile.then_some(&mut profile),
                    exporter: exporter.as_mut(),
                    pods: pods.as_ref(),
                    frequency,
                }
                .take(window, window_start, window_end);
                // Pages of the binaries read for this window's names leave
                // the resident set until a later window reads them again.
                crate::memory::release_mapped_files();
                // And the heap the window freed (its samples, batch, parse
                // buffers) goes back to the kernel.
                crate::memory::trim_allocator();
                window_start = window_end;
                let swept = processes.lock().unwrap_or_else(|e| e.into_inner()).sweep();
                symbolizer.forget_binaries(&swept.binaries);
                sampler.forget_pids(&swept.pids);
                monitor.window(
                    &sampler,
                    &processes,
                    &mut symbolizer,
                    pods.as_ref(),
                    exporter.as_ref(),
                );
                next_drain += options.drain_interval;
            }
            if progress && now >= next_progress {
                let samples = sampler.counters()?.get(profiler_common::Counter::Recorded);
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
        let duration = started.elapsed();

        // Stop sampling, then empty both map sets: nothing is left behind.
        sampler.stop_sampling()?;
        let window = sampler.drain_all()?;
        metrics.add_window(
            window.total(),
            window.missing_stacks,
            window.truncated_stacks,
        );
        Sinks {
            processes: &processes,
            symbolizer: &mut symbolizer,
            profile: keep_profile.then_some(&mut profile),
            exporter: exporter.as_mut(),
            pods: pods.as_ref(),
            frequency,
        }
        .take(window, window_start, SystemTime::now());
        if let Some(exporter) = exporter.take() {
            exporter.finish();
        }
        let counters = sampler.counters()?;
        metrics.set_kernel(counters.clone());
        let program_info = sampler.program_info();
        let cpus = sampler.attached_cpus();
        drop(sampler);

        let process_stats = processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats()
            .clone();
        // Totals of every window, as `/metrics` shows them.
        let total = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let recording = Recording {
            profile,
            samples: total(&metrics.samples_drained),
            counters,
            processes_seen: process_stats.snapshots,
            process_stats,
            symbolizer_stats: symbolizer.stats().clone(),
            missing_stacks: total(&metrics.missing_stacks),
            truncated_stacks: total(&metrics.truncated_stacks),
            duration,
            frequency: options.sampler.frequency,
            cpus,
            program_info,
            host: hostname(),
            export: export_stats,
        };

        if let Some(out) = folded_out {
            let path = out.path.clone();
            out.write_with(|w| {
                recording
                    .profile
                    .write_to(w)
                    .map_err(|source| Error::Output { path, source })
            })?;
        }
        if let Some(out) = svg_out {
            let info = RenderInfo {
                host: recording.host.clone(),
                duration_secs: duration.as_secs_f64(),
                frequency: recording.frequency,
            };
            out.write_with(|w| write_svg(&recording.profile, &info, w))?;
        }
        Ok(recording)
    }
}
