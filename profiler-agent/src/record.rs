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
    time::{Duration, Instant},
};

use crate::{
    config::RecordOptions,
    drain::{Counters, RawWindow, SampleSource},
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
    started: Instant,
}

/// Records until `options.duration` passes or `stop` is set (Ctrl-C), then
/// writes the outputs named in `options`.
pub fn record(options: &RecordOptions, stop: &AtomicBool) -> Result<Recording> {
    Recorder::start(options)?.run(stop)
}

/// Symbolizes a drained window into `profile`, naming each sample after its
/// process (`/proc/PID/comm` at first sight; the thread's comm otherwise).
fn fold_window(
    mut window: RawWindow,
    processes: &Mutex<ProcessCache>,
    symbolizer: &mut BlazeSymbolizer,
    profile: &mut FoldedProfile,
) {
    {
        let cache = processes.lock().unwrap_or_else(|e| e.into_inner());
        for sample in &mut window.samples {
            if let Some(name) = cache.name(sample.tgid) {
                if name != sample.comm {
                    sample.comm = name.to_string();
                }
            }
        }
    }
    profile.add_window(&window, symbolizer);
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
        let sampler = match Sampler::start(&options.sampler, processes.clone()) {
            Ok(sampler) => sampler,
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
            started: Instant::now(),
        })
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
            started,
        } = self;
        let mut symbolizer = BlazeSymbolizer::new(processes.clone());
        let mut profile = FoldedProfile::default();
        let (mut missing_stacks, mut truncated_stacks) = (0, 0);

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
                truncated_stacks += window.truncated_stacks;
                tracing::debug!(samples = window.total(), "drained a window");
                fold_window(window, &processes, &mut symbolizer, &mut profile);
                let swept = processes.lock().unwrap_or_else(|e| e.into_inner()).sweep();
                symbolizer.forget_binaries(&swept.binaries);
                sampler.forget_pids(&swept.pids);
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
        truncated_stacks += window.truncated_stacks;
        fold_window(window, &processes, &mut symbolizer, &mut profile);
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
            truncated_stacks,
            duration,
            frequency: options.sampler.frequency,
            cpus,
            program_info,
            host: hostname(),
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
