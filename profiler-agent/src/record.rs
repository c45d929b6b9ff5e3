//! One-shot recording: sample the host (or some processes) for a while,
//! drain on an interval, and write folded stacks and a flame graph.
use std::{
    fs::File,
    io::{BufWriter, IsTerminal, Write},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::{
    config::RecordOptions,
    drain::{Counters, SampleSource},
    fold::FoldedProfile,
    process::{ProcessCache, ProcessStats},
    render::{write_svg, RenderInfo},
    sampler::Sampler,
    symbolize::{BlazeSymbolizer, SymbolizerStats},
    Error, Result,
};

/// What a recording produced.
#[derive(Clone, Debug)]
pub struct Recording {
    pub profile: FoldedProfile,
    /// Kernel counters at the end.
    pub counters: Counters,
    pub process_stats: ProcessStats,
    pub symbolizer_stats: SymbolizerStats,
    /// Samples whose stack id had vanished from the stack map.
    pub missing_stacks: u64,
    pub duration: Duration,
    pub frequency: u64,
    pub cpus: usize,
    /// Distinct processes snapshotted.
    pub processes_seen: u64,
    /// Verifier's processed instruction count and program size, if known.
    pub program_info: Option<(u64, u64)>,
    pub host: String,
}

/// The host name, for titles and labels.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn create_output(path: &Path) -> Result<BufWriter<File>> {
    File::create(path)
        .map(BufWriter::new)
        .map_err(|source| Error::Output {
            path: path.to_path_buf(),
            source,
        })
}

/// A recording in progress: the sampler is attached from
/// [`Recorder::start`] on, so callers can start workloads before [`Recorder::run`].
pub struct Recorder {
    options: RecordOptions,
    svg_out: Option<BufWriter<File>>,
    folded_out: Option<BufWriter<File>>,
    processes: Arc<Mutex<ProcessCache>>,
    sampler: Sampler,
    started: Instant,
}

/// Records until `options.duration` passes or `stop` is set (Ctrl-C), then
/// writes the outputs named in `options`.
pub fn record(options: &RecordOptions, stop: &AtomicBool) -> Result<Recording> {
    Recorder::start(options)?.run(stop)
}

impl Recorder {
    /// Checks the outputs are writable, then loads and attaches the sampler.
    pub fn start(options: &RecordOptions) -> Result<Self> {
        // Fail on an unwritable output before profiling, not after.
        let svg_out = options.svg.as_deref().map(create_output).transpose()?;
        let folded_out = options.folded.as_deref().map(create_output).transpose()?;
        let processes = Arc::new(Mutex::new(ProcessCache::default()));
        let sampler = Sampler::start(&options.sampler, processes.clone())?;
        Ok(Self {
            options: options.clone(),
            svg_out,
            folded_out,
            processes,
            sampler,
            started: Instant::now(),
        })
    }

    /// Samples until the duration passes or `stop` is set, drains on the
    /// interval, then stops sampling, drains everything and writes outputs.
    pub fn run(self, stop: &AtomicBool) -> Result<Recording> {
        let Recorder {
            options,
            mut svg_out,
            mut folded_out,
            processes,
            mut sampler,
            started,
        } = self;
        let options = &options;
        let mut symbolizer = BlazeSymbolizer::new(processes.clone());
        let mut profile = FoldedProfile::default();
        let mut missing_stacks = 0;

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
                missing_stacks += window.missing_stacks;
                profile.add_window(&window, &mut symbolizer);
                let gone = processes.lock().unwrap_or_else(|e| e.into_inner()).sweep();
                sampler.forget_pids(&gone);
                tracing::debug!(samples = window.total(), "drained a window");
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
        missing_stacks += window.missing_stacks;
        profile.add_window(&window, &mut symbolizer);
        let counters = sampler.counters()?;
        let program_info = sampler.program_info();
        let cpus = sampler.attached_cpus();
        drop(sampler);

        let process_stats = processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats()
            .clone();
        let recording = Recording {
            profile,
            counters,
            processes_seen: process_stats.snapshots,
            process_stats,
            symbolizer_stats: symbolizer.stats().clone(),
            missing_stacks,
            duration,
            frequency: options.sampler.frequency,
            cpus,
            program_info,
            host: hostname(),
        };

        if let (Some(out), Some(path)) = (folded_out.as_mut(), options.folded.as_deref()) {
            recording
                .profile
                .write_to(out)
                .map_err(|source| Error::Output {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        if let (Some(out), Some(path)) = (svg_out.as_mut(), options.svg.as_deref()) {
            let info = RenderInfo {
                host: recording.host.clone(),
                duration_secs: duration.as_secs_f64(),
                frequency: recording.frequency,
            };
            write_svg(&recording.profile, &info, &mut *out)?;
            out.flush().map_err(|source| Error::Output {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(recording)
    }
}
