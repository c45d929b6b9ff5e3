//! The kernel side of the agent: the eBPF program loaded and attached to
//! `cpu-clock` on every online CPU (and, for off-CPU time, to
//! `sched_switch` and `sched_waking`), drained through its A/B map
//! sets without losing samples. [`KernelSource`] is the pipeline's real
//! [`SampleSource`].
//!
//! - [`load`]: checks, loading the object, attaching and detaching programs,
//!   and the errors that name a missing privilege or kernel feature;
//! - [`maps`]: flipping and reading the A/B map sets, and the counters;
//! - [`announce`]: the thread that snapshots each new process at its first
//!   sample;
//! - [`guard`]: pauses off-CPU recording while the host switches context
//!   too often for its cost;
//! - [`unwind`]: the unwind tables and process mappings in the program's
//!   maps, written a slice at a time ([`array`]).
//!
//! Minimum kernel: 5.15 (`bpf_task_pt_regs`), with BTF.
mod announce;
mod array;
pub mod guard;
mod load;
mod maps;
mod python;
pub mod unwind;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, MapData, PerCpuArray, ProgramArray},
    programs::perf_event::PerfEventLinkId,
    Ebpf,
};
use profiler_common::Config;

use self::{
    announce::Announcer,
    guard::{Change, OffCpuGuard},
    maps::MapSet,
    unwind::UnwindMaps,
};
use crate::{
    config::{OffCpuOptions, SamplerOptions},
    drain::{Counters, OffCpuPauses, RawWindow},
    pipeline::{SampleSource, SourceInfo},
    process::{
        events::{ProcessEvents, DEFAULT_MAX_LOGGED_PROCESSES},
        ProcessCache,
    },
    Result,
};

/// A running eBPF sampler. Dropping it detaches the programs.
pub struct KernelSource {
    ebpf: Ebpf,
    sets: [MapSet; 2],
    config_map: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
    unwind: Arc<Mutex<UnwindMaps>>,
    _programs: ProgramArray<MapData>,
    _python_programs: ProgramArray<MapData>,
    config: Config,
    grace: Duration,
    started: Instant,
    attached_cpus: usize,
    links: Vec<PerfEventLinkId>,
    /// Off-CPU recording, when on: its settings, kernel stacks and links.
    off_cpu: Option<(OffCpuOptions, maps::OffCpuStacks)>,
    off_cpu_link: Option<load::OffCpuLinks>,
    off_cpu_programs: Option<load::OffCpuPrograms>,
    /// Pauses off-CPU recording on a host that switches too often.
    off_cpu_guard: Option<OffCpuGuard>,
    announcer: Announcer,
}

impl KernelSource {
    /// Loads and attaches the profiler. `processes` receives a snapshot of
    /// every process at its first sample.
    pub fn start(options: &SamplerOptions, processes: Arc<Mutex<ProcessCache>>) -> Result<Self> {
        let mut loaded = load::load(options)?;
        // The kernel's record of every exec and executable mapping, from
        // before the first sample: processes gone before their maps are
        // read are still named.
        start_process_events(&processes);
        let unwind = Arc::new(Mutex::new(loaded.unwind));
        // Processes named on the command line are loaded before the first
        // sample; the others at their first sample (walked with frame
        // pointers until then).
        for pid in &options.pids {
            announce::load_process(*pid, &processes, &unwind);
        }
        let links = load::attach_sampling(&mut loaded.ebpf, options.frequency)?;
        // Off-CPU programs after the CPU sampler: the verifier takes
        // seconds over them on a busy host, and CPU samples need not wait.
        let (off_cpu, off_cpu_programs, off_cpu_link) = match options.off_cpu {
            Some(off_cpu) => {
                let programs = load::load_off_cpu(&mut loaded.ebpf)?;
                let stacks = maps::OffCpuStacks {
                    user: load::take_map(&mut loaded.ebpf, "OFF_CPU_USER_STACKS")?,
                    kernel: load::take_map(&mut loaded.ebpf, "OFF_CPU_KERNEL_STACKS")?,
                };
                let link = load::attach_off_cpu(&mut loaded.ebpf, &programs)?;
                (Some((off_cpu, stacks)), Some(programs), Some(link))
            }
            None => (None, None, None),
        };
        // Every program that refers to the pid filter is loaded.
        drop(loaded.filter);
        let announcer = Announcer::spawn(loaded.ring, loaded.logger, processes, unwind.clone())?;
        let source = Self {
            ebpf: loaded.ebpf,
            sets: loaded.sets,
            config_map: loaded.config_map,
            counters: loaded.counters,
            unwind,
            _programs: loaded.programs,
            _python_programs: loaded.python_programs,
            config: loaded.config,
            grace: options.grace_period,
            started: Instant::now(),
            attached_cpus: links.len(),
            links,
            off_cpu_guard: off_cpu
                .as_ref()
                .and_then(|(o, _)| o.max_switches_per_sec)
                .map(OffCpuGuard::new),
            off_cpu,
            off_cpu_link,
            off_cpu_programs,
            announcer,
        };
        let (verified, size) = source.program_info().unwrap_or_default();
        tracing::info!(
            cpus = source.attached_cpus,
            frequency = options.frequency,
            verified_instructions = verified,
            program_instructions = size,
            off_cpu = source.off_cpu.is_some(),
            "profiler attached to cpu-clock on every online CPU"
        );
        Ok(source)
    }

    /// Once a window: pauses or resumes off-CPU recording by the host's
    /// context switch rate ([`guard`]).
    fn guard_off_cpu(&mut self) -> Result<()> {
        let Some(guard) = &mut self.off_cpu_guard else {
            return Ok(());
        };
        let Some(switches) = guard::host_context_switches() else {
            return Ok(());
        };
        let max = guard.max_per_sec();
        match guard.observe(Instant::now(), switches) {
            Some(Change::Pause { rate }) => {
                if let Some(link) = self.off_cpu_link.take() {
                    load::detach_off_cpu(&mut self.ebpf, link)?;
                }
                tracing::warn!(
                    switches_per_sec = rate as u64,
                    max = max,
                    "off-CPU recording paused: the host switches context more often than \
                     --off-cpu-max-switches allows (resumes below 80 % of it)"
                );
            }
            Some(Change::Resume { rate }) => {
                // Threads that left before now were not followed: their
                // waits are not timed.
                self.config.off_cpu_valid_from_ns = guard::monotonic_ns();
                maps::write_config(&mut self.config_map, self.config)?;
                if let Some(programs) = &self.off_cpu_programs {
                    self.off_cpu_link = Some(load::attach_off_cpu(&mut self.ebpf, programs)?);
                }
                tracing::info!(
                    switches_per_sec = rate as u64,
                    max = max,
                    "off-CPU recording resumed"
                );
            }
            None => {}
        }
        Ok(())
    }

    /// Number of CPUs the program is attached to.
    pub fn attached_cpus(&self) -> usize {
        self.attached_cpus
    }

    /// Time since the program was attached.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Verifier statistics of the `profile` program: instructions processed
    /// and program size in instructions, if the kernel reports them.
    pub fn program_info(&self) -> Option<(u64, u64)> {
        load::program_info(&self.ebpf)
    }
}

/// Starts reading the kernel's process events into `processes`; without
/// them (no perf events for every process), short-lived processes may stay
/// unnamed, which is logged.
fn start_process_events(processes: &Mutex<ProcessCache>) {
    let started = aya::util::online_cpus()
        .map_err(|(_, e)| e)
        .and_then(|cpus| ProcessEvents::start(&cpus, DEFAULT_MAX_LOGGED_PROCESSES));
    match started {
        Ok(events) => processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_events(Arc::new(events)),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot read process events: processes that exit within milliseconds may stay unnamed"
        ),
    }
}

impl SampleSource for KernelSource {
    fn drain(&mut self) -> Result<RawWindow> {
        self.guard_off_cpu()?;
        let idle = self.config.active_set as usize;
        self.config.active_set ^= 1;
        maps::write_config(&mut self.config_map, self.config)?;
        // Programs that read the old active set run for microseconds.
        std::thread::sleep(self.grace);
        self.sets[idle].read_and_clear(self.off_cpu.as_ref().map(|(o, s)| (o, s)))
    }

    fn counters(&self) -> Result<Counters> {
        maps::read_counters(&self.counters)
    }

    fn off_cpu_pauses(&self) -> Option<OffCpuPauses> {
        self.off_cpu_guard.as_ref().map(|g| OffCpuPauses {
            paused: g.paused(),
            pauses: g.pauses,
        })
    }

    fn forget_pids(&mut self, pids: &[u32]) {
        let mut unwind = self.unwind.lock().unwrap_or_else(|e| e.into_inner());
        for pid in pids {
            unwind.forget_process(*pid);
        }
    }

    /// Detaches the sampling (and off-CPU) programs; the maps stay
    /// readable so the final [`SampleSource::drain_all`] leaves nothing
    /// behind.
    fn stop(&mut self) -> Result<()> {
        if let Some(link) = self.off_cpu_link.take() {
            load::detach_off_cpu(&mut self.ebpf, link)?;
        }
        let links = std::mem::take(&mut self.links);
        load::detach_sampling(&mut self.ebpf, links)
    }

    fn unwind_stats(&self) -> Option<crate::unwind::UnwindStats> {
        Some(
            self.unwind
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stats(),
        )
    }

    fn info(&self) -> SourceInfo {
        SourceInfo {
            cpus: self.attached_cpus,
            program_info: self.program_info(),
        }
    }
}

impl Drop for KernelSource {
    fn drop(&mut self) {
        self.announcer.stop();
    }
}
