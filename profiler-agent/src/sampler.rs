//! The eBPF sampler: loads the program, attaches it to `cpu-clock` on every
//! online CPU, and drains the A/B map sets without losing samples.
//!
//! Draining: flip `CONFIG.active_set`, wait a grace period so programs that
//! read the old value finish, then read and clear the now idle set. Nothing
//! is deleted from a map the program may be writing to, and
//! `BPF_F_REUSE_STACKID` is never used (a collision is counted instead).
//!
//! A background thread ("announcer") reads the `NEW_PIDS` ring buffer and
//! snapshots each new process into the [`ProcessCache`] at its first sample,
//! and forwards the program's aya-log records to the agent's log.
//!
//! Minimum kernel: 5.8 (`CAP_BPF`/`CAP_PERFMON`, ring buffer).
use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::{
    maps::{
        Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf, StackTraceMap,
    },
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        PerfEvent, RawTracePoint,
    },
    Ebpf, EbpfLoader,
};
use profiler_common::{Config, Counter, NewPid, StackKey, OVERFLOW_STACK_BIT};

use crate::{
    config::SamplerOptions,
    drain::{decode_key, Counters, RawWindow, SampleSource, MAX_STACK_DEPTH},
    privileges,
    process::ProcessCache,
    Error, Result,
};

/// The eBPF object built by `build.rs`.
#[cfg(not(fuzzing))]
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));
/// Fuzz builds (`fuzz/`) test parsers only and never load the program.
#[cfg(fuzzing)]
static EBPF_OBJECT: &[u8] = &[];

/// (count map, main stack map, overflow stack map) of the A and B sets.
const MAP_SETS: [(&str, &str, &str); 2] = [
    ("COUNTS_A", "STACKS_A", "STACKS_A_OVERFLOW"),
    ("COUNTS_B", "STACKS_B", "STACKS_B_OVERFLOW"),
];

/// The maps of one set, owned by the sampler.
struct MapSet {
    counts: PerCpuHashMap<MapData, StackKey, u64>,
    stacks: StackTraceMap<MapData>,
    overflow: StackTraceMap<MapData>,
}

impl MapSet {
    fn take(ebpf: &mut Ebpf, (counts, stacks, overflow): (&str, &str, &str)) -> Result<Self> {
        Ok(Self {
            counts: take_map(ebpf, counts)?,
            stacks: take_map(ebpf, stacks)?,
            overflow: take_map(ebpf, overflow)?,
        })
    }

    /// Frames of a stack id, leaf first; ids tagged with
    /// [`OVERFLOW_STACK_BIT`] live in the overflow map.
    fn frames(&self, id: u32) -> Option<Vec<u64>> {
        let (map, id) = if id & OVERFLOW_STACK_BIT as u32 != 0 {
            (&self.overflow, id & !(OVERFLOW_STACK_BIT as u32))
        } else {
            (&self.stacks, id)
        };
        let trace = map.get(&id, 0).ok()?;
        Some(trace.frames().iter().map(|f| f.ip).collect())
    }

    /// Reads every entry, then empties the set. Only called on the idle set.
    fn read_and_clear(&mut self) -> Result<RawWindow> {
        let mut entries: Vec<(StackKey, u64)> = Vec::new();
        for item in self.counts.iter() {
            let (key, values) = item.map_err(|e| ebpf_error("reading a count map", e))?;
            entries.push((key, values.iter().sum()));
        }
        let mut window = RawWindow::default();
        let mut cache: HashMap<u32, Option<Vec<u64>>> = HashMap::new();
        for (key, count) in &entries {
            let (sample, missing) = decode_key(key, *count, |id| {
                cache.entry(id).or_insert_with(|| self.frames(id)).clone()
            });
            if missing {
                window.missing_stacks += count;
            }
            if sample.user.len() >= MAX_STACK_DEPTH || sample.kernel.len() >= MAX_STACK_DEPTH {
                window.truncated_stacks += count;
            }
            window.samples.push(sample);
        }
        for map in [&mut self.stacks, &mut self.overflow] {
            let ids: Vec<u32> = map.stack_ids().filter_map(|id| id.ok()).collect();
            for id in ids {
                // An id already gone is fine: the goal is an empty map.
                let _ = map.remove(&id);
            }
        }
        for (key, _) in &entries {
            let _ = self.counts.remove(key);
        }
        Ok(window)
    }
}

/// A running sampler. Dropping it detaches the program.
pub struct Sampler {
    ebpf: Ebpf,
    sets: [MapSet; 2],
    config_map: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
    known_pids: BpfHashMap<MapData, u32, u8>,
    config: Config,
    grace: Duration,
    started: Instant,
    attached_cpus: usize,
    links: Vec<aya::programs::perf_event::PerfEventLinkId>,
    stop: Arc<AtomicBool>,
    announcer: Option<JoinHandle<()>>,
}

fn ebpf_error(
    what: impl Into<String>,
    err: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    let what = what.into();
    // Name the privilege or kernel feature when the kernel said so.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    return Error::MissingPrivilege {
                        what: "loading and attaching the eBPF profiler",
                        capability: "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)",
                    };
                }
                Some(libc::ENOSYS) => {
                    return Error::KernelFeature {
                        feature: "the bpf() system call",
                        detail: format!("{what}: {io}"),
                    };
                }
                Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) | Some(libc::ENOTSUP)
                    if what.contains("perf") =>
                {
                    return Error::KernelFeature {
                        feature: "the software cpu-clock perf event",
                        detail: format!("{what}: {io}"),
                    };
                }
                _ => {}
            }
        }
        source = e.source();
    }
    Error::Ebpf {
        what,
        source: Box::new(err),
    }
}

impl Sampler {
    /// Loads and attaches the profiler. `processes` receives a snapshot of
    /// every process at its first sample.
    pub fn start(options: &SamplerOptions, processes: Arc<Mutex<ProcessCache>>) -> Result<Self> {
        options.validate()?;
        privileges::check()?;
        if !std::path::Path::new("/proc/sys/kernel/perf_event_paranoid").exists() {
            return Err(Error::KernelFeature {
                feature: "perf events",
                detail: "/proc/sys/kernel/perf_event_paranoid is missing (CONFIG_PERF_EVENTS=n)"
                    .into(),
            });
        }
        check_sample_rate(options.frequency)?;
        raise_limits();

        let mut loader = EbpfLoader::new();
        for (counts, stacks, overflow) in MAP_SETS {
            loader.map_max_entries(counts, options.count_map_entries);
            loader.map_max_entries(stacks, options.stack_map_entries);
            loader.map_max_entries(overflow, (options.stack_map_entries / 4).max(64));
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| ebpf_error("loading the eBPF object", e))?;

        let config = Config {
            active_set: 0,
            filter_pids: u32::from(!options.pids.is_empty()),
            include_idle: u32::from(options.include_idle),
            reserved: 0,
        };
        let mut filter: BpfHashMap<MapData, u32, u8> = take_map(&mut ebpf, "FILTER_PIDS")?;
        for pid in &options.pids {
            filter
                .insert(pid, 1, 0)
                .map_err(|e| ebpf_error("filling the pid filter", e))?;
        }
        let mut config_map: Array<MapData, Config> = take_map(&mut ebpf, "CONFIG")?;
        write_config(&mut config_map, config)?;
        let sets = [
            MapSet::take(&mut ebpf, MAP_SETS[0])?,
            MapSet::take(&mut ebpf, MAP_SETS[1])?,
        ];
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let known_pids = take_map(&mut ebpf, "KNOWN_PIDS")?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::debug!("eBPF log not available: {e}");
                None
            }
        };
        let ring: RingBuf<MapData> = ebpf
            .take_map("NEW_PIDS")
            .ok_or_else(|| missing_map("NEW_PIDS"))?
            .try_into()
            .map_err(|e| ebpf_error("opening the NEW_PIDS ring buffer", e))?;

        let exec: &mut RawTracePoint = program(&mut ebpf, "on_exec")?;
        exec.load()
            .map_err(|e| ebpf_error("loading the on_exec program", e))?;
        exec.attach("sched_process_exec")
            .map_err(|e| ebpf_error("attaching to the sched_process_exec raw tracepoint", e))?;

        let cpus = aya::util::online_cpus().map_err(|(what, e)| Error::io(what, e))?;
        let prog: &mut PerfEvent = program(&mut ebpf, "profile")?;
        prog.load()
            .map_err(|e| ebpf_error("loading the profile program (verifier)", e))?;
        let mut links = Vec::with_capacity(cpus.len());
        for cpu in &cpus {
            let link = prog
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu: *cpu },
                    SamplePolicy::Frequency(options.frequency),
                    false,
                )
                .map_err(|e| {
                    ebpf_error(
                        format!("attaching to the cpu-clock perf event of CPU {cpu}"),
                        e,
                    )
                })?;
            links.push(link);
        }

        let stop = Arc::new(AtomicBool::new(false));
        let announcer = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pid-announcer".into())
                .spawn(move || announce_loop(ring, logger, processes, stop))
                .map_err(|e| Error::io("starting the pid announcer thread", e))?
        };
        let sampler = Self {
            ebpf,
            sets,
            config_map,
            counters,
            known_pids,
            config,
            grace: options.grace_period,
            started: Instant::now(),
            attached_cpus: cpus.len(),
            links,
            stop,
            announcer: Some(announcer),
        };
        let (verified, size) = sampler.program_info().unwrap_or_default();
        tracing::info!(
            cpus = sampler.attached_cpus,
            frequency = options.frequency,
            verified_instructions = verified,
            program_instructions = size,
            "profiler attached to cpu-clock on every online CPU"
        );
        Ok(sampler)
    }

    /// Number of CPUs the program is attached to.
    pub fn attached_cpus(&self) -> usize {
        self.attached_cpus
    }

    /// Detaches the sampling program from every CPU; the maps stay readable
    /// so a final [`Sampler::drain_all`] leaves nothing behind.
    pub fn stop_sampling(&mut self) -> Result<()> {
        let links = std::mem::take(&mut self.links);
        let prog: &mut PerfEvent = program(&mut self.ebpf, "profile")?;
        for link in links {
            prog.detach(link)
                .map_err(|e| ebpf_error("detaching the profile program", e))?;
        }
        Ok(())
    }

    /// Drains both map sets (after [`Sampler::stop_sampling`]).
    pub fn drain_all(&mut self) -> Result<RawWindow> {
        let mut window = self.drain()?;
        window.merge(self.drain()?);
        Ok(window)
    }

    /// Time since the program was attached.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Verifier statistics of the `profile` program: instructions processed
    /// and program size in instructions, if the kernel reports them.
    pub fn program_info(&self) -> Option<(u64, u64)> {
        let prog: &PerfEvent = self.ebpf.program("profile")?.try_into().ok()?;
        let info = prog.info().ok()?;
        let size = info.size_translated().unwrap_or(0) as u64 / 8;
        Some((info.verified_instruction_count().unwrap_or(0) as u64, size))
    }
}

impl SampleSource for Sampler {
    fn drain(&mut self) -> Result<RawWindow> {
        let idle = self.config.active_set as usize;
        self.config.active_set ^= 1;
        write_config(&mut self.config_map, self.config)?;
        // Programs that read the old active set run for microseconds.
        std::thread::sleep(self.grace);
        self.sets[idle].read_and_clear()
    }

    fn counters(&self) -> Result<Counters> {
        let counters = &self.counters;
        let mut out = Counters::default();
        for counter in Counter::ALL {
            let values = counters
                .get(&(counter as u32), 0)
                .map_err(|e| ebpf_error("reading COUNTERS", e))?;
            out.0.insert(counter, values.iter().sum());
        }
        Ok(out)
    }

    fn forget_pids(&mut self, pids: &[u32]) {
        for pid in pids {
            let _ = self.known_pids.remove(pid);
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.announcer.take() {
            let _ = handle.join();
        }
    }
}

fn missing_map(name: &str) -> Error {
    Error::Ebpf {
        what: format!("the eBPF object has no map {name}"),
        source: "built object does not match the agent".into(),
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| missing_map(name))?;
    T::try_from(map).map_err(|e| ebpf_error(format!("opening map {name}"), e))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| Error::Ebpf {
        what: format!("the eBPF object has no program {name}"),
        source: "built object does not match the agent".into(),
    })?;
    prog.try_into()
        .map_err(|e| ebpf_error(format!("program {name}"), e))
}

fn write_config(map: &mut Array<MapData, Config>, config: Config) -> Result<()> {
    map.set(0, config, 0)
        .map_err(|e| ebpf_error("writing CONFIG", e))
}

/// The kernel refuses perf events above `kernel.perf_event_max_sample_rate`
/// with a bare `EINVAL`: say so before trying.
fn check_sample_rate(frequency: u64) -> Result<()> {
    let path = "/proc/sys/kernel/perf_event_max_sample_rate";
    let max = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match max {
        Some(max) if frequency > max => Err(Error::InvalidArgument(format!(
            "frequency {frequency} Hz is above the kernel's limit of {max} Hz \
             (sysctl kernel.perf_event_max_sample_rate)"
        ))),
        _ => Ok(()),
    }
}

/// Binaries stay open while their processes are cached: allow many files.
/// Kernels before 5.11 charge BPF maps to `RLIMIT_MEMLOCK`: lift it.
fn raise_limits() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscalls on local structs.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) != 0 {
            tracing::debug!("could not lift RLIMIT_MEMLOCK (only matters before Linux 5.11)");
        }
    }
}

type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

fn announce_loop(
    mut ring: RingBuf<MapData>,
    mut logger: Option<Logger>,
    processes: Arc<Mutex<ProcessCache>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut fds = vec![libc::pollfd {
            fd: ring.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(logger) = &logger {
            fds.push(libc::pollfd {
                fd: logger.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<NewPid>() {
                // SAFETY: the program writes a NewPid; read unaligned.
                let event: NewPid = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                processes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .observe(event.tgid);
            }
        }
        if let Some(logger) = &mut logger {
            logger.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] io::Error);

    #[test]
    fn kernel_answers_become_named_errors() {
        let eperm = ebpf_error(
            "loading",
            Wrapper(io::Error::from_raw_os_error(libc::EPERM)),
        );
        assert!(matches!(eperm, Error::MissingPrivilege { .. }), "{eperm}");
        assert!(eperm.to_string().contains("CAP_BPF"));
        let enosys = ebpf_error("loading", io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(matches!(enosys, Error::KernelFeature { .. }), "{enosys}");
        let enoent = ebpf_error(
            "attaching to the cpu-clock perf event of CPU 0",
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert!(
            enoent.to_string().contains("cpu-clock perf event"),
            "{enoent}"
        );
        let other = ebpf_error("reading", io::Error::from_raw_os_error(libc::EBADF));
        assert!(matches!(other, Error::Ebpf { .. }));
    }
}
