//! Loading the eBPF object and attaching its programs: the checks that come
//! first (privileges, perf events, the kernel's sample-rate limit), the map
//! sizes, the `on_exec` raw tracepoint, the `profile` program on the
//! `cpu-clock` perf event of every online CPU, and the off-CPU programs on
//! `sched_switch`.
//!
//! Every kernel refusal becomes an [`Error`] that names what the user must
//! change: a missing capability ([`Error::MissingPrivilege`]) or a missing
//! kernel feature ([`Error::KernelFeature`]).
//!
//! Minimum kernel: 5.8 (`CAP_BPF`/`CAP_PERFMON`, ring buffer).
use std::io;

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, ProgramArray, RingBuf},
    programs::{
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        BtfTracePoint, PerfEvent, RawTracePoint,
    },
    Ebpf, EbpfLoader,
};
use profiler_common::{unwind::UnwindRow, Config, OFF_CPU_KEEP_ALL};

use super::{
    array::BatchArray,
    maps::{write_config, MapSet, MAP_SETS},
    unwind::UnwindMaps,
};
use crate::{config::SamplerOptions, privileges, Error, Result};

/// The eBPF object built by `build.rs`.
#[cfg(not(fuzzing))]
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));
/// Fuzz builds (`fuzz/`) test parsers only and never load the program.
#[cfg(fuzzing)]
static EBPF_OBJECT: &[u8] = &[];

/// The sampling program's name in the object.
pub(super) const PROFILE_PROGRAM: &str = "profile";
/// The user-stack unwinder, tail-called by `profile` and by itself.
const UNWIND_PROGRAM: &str = "unwind_user";
/// Threads leaving and coming back on a CPU (`sched_switch`), as a BTF
/// tracepoint and, without BTF, a raw one; and the unwinder each
/// tail-calls (a program of its own kind).
const OFF_CPU_SWITCH: &str = "off_cpu_switch";
const OFF_CPU_UNWIND_PROGRAM: &str = "unwind_user_off_cpu";
const OFF_CPU_SWITCH_RAW: &str = "off_cpu_switch_raw";
const OFF_CPU_UNWIND_PROGRAM_RAW: &str = "unwind_user_off_cpu_raw";
/// Wake-ups (`sched_waking`, BTF only) and the waker's unwinder.
const OFF_CPU_WAKING: &str = "off_cpu_waking";
const OFF_CPU_WAKER_UNWIND_PROGRAM: &str = "unwind_user_waker";

/// The loaded object with the maps the agent reads and writes, before the
/// sampling program is attached.
pub(super) struct Loaded {
    pub ebpf: Ebpf,
    pub sets: [MapSet; 2],
    pub config_map: Array<MapData, Config>,
    pub config: Config,
    pub counters: aya::maps::PerCpuArray<MapData, u64>,
    pub unwind: UnwindMaps,
    /// Holds the unwinder in the program array for as long as it lives.
    pub programs: ProgramArray<MapData>,
    /// Holds the Python frame walk in its program array.
    pub python_programs: ProgramArray<MapData>,
    /// The pid filter: held until the `profile` program is loaded (the
    /// program refers to its fd), then not needed.
    pub filter: BpfHashMap<MapData, u32, u8>,
    pub ring: RingBuf<MapData>,
    pub logger: Option<super::announce::Logger>,
}

/// Checks what loading needs, loads the object, sizes and fills its maps,
/// and attaches the `on_exec` tracepoint. The `profile` program is attached
/// by [`attach_sampling`].
pub(super) fn load(options: &SamplerOptions) -> Result<Loaded> {
    options.validate()?;
    privileges::check()?;
    if !std::path::Path::new("/proc/sys/kernel/perf_event_paranoid").exists() {
        return Err(Error::KernelFeature {
            feature: "perf events",
            detail: "/proc/sys/kernel/perf_event_paranoid is missing (CONFIG_PERF_EVENTS=n)".into(),
        });
    }
    check_sample_rate(options.frequency)?;
    raise_limits();

    let mut loader = EbpfLoader::new();
    for set in &MAP_SETS {
        loader.map_max_entries(set.counts, options.count_map_entries);
        loader.map_max_entries(set.stacks, options.stack_map_entries);
        loader.map_max_entries(set.overflow, (options.stack_map_entries / 4).max(64));
        // A user stack (1.5 KiB) is larger than a kernel one: half as many.
        loader.map_max_entries(set.user, (options.stack_map_entries / 2).max(64));
    }
    // The kernel stores array values in 8-byte aligned slots: a 12-byte
    // row takes 16.
    let slot = std::mem::size_of::<UnwindRow>().next_multiple_of(8) as u64;
    let rows = (u64::from(options.unwind_table_mib) << 20) / slot;
    loader.map_max_entries("UNWIND_ROWS", rows.min(u32::MAX as u64) as u32);
    // Without off-CPU recording its maps take no memory.
    if let Some(off_cpu) = &options.off_cpu {
        for set in &MAP_SETS {
            loader.map_max_entries(set.off_cpu, (options.count_map_entries / 2).max(64));
        }
        loader.map_max_entries("OFF_CPU_START", off_cpu.threads_map_entries());
    } else {
        for set in &MAP_SETS {
            loader.map_max_entries(set.off_cpu, 1);
        }
        loader.map_max_entries("OFF_CPU_START", 1);
        loader.map_max_entries("OFF_CPU_KERNEL_STACKS", 1);
        loader.map_max_entries("OFF_CPU_USER_STACKS", 1);
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|e| ebpf_error("loading the eBPF object", e))?;

    let config = Config {
        active_set: 0,
        filter_pids: u32::from(!options.pids.is_empty()),
        include_idle: u32::from(options.include_idle),
        unwind_mode: options.unwind.config_value(),
        off_cpu_keep: options.off_cpu.map_or(OFF_CPU_KEEP_ALL, |o| o.keep()),
        task_fsbase_offset: if options.python_frames {
            task_fsbase_offset()
        } else {
            0
        },
        off_cpu_min_ns: options
            .off_cpu
            .map_or(0, |o| o.min_block.as_nanos().min(u64::MAX as u128) as u64),
        off_cpu_valid_from_ns: 0,
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
        MapSet::take(&mut ebpf, &MAP_SETS[0])?,
        MapSet::take(&mut ebpf, &MAP_SETS[1])?,
    ];
    let counters = take_map(&mut ebpf, "COUNTERS")?;
    let unwind = UnwindMaps::new(
        take_map(&mut ebpf, "KNOWN_PIDS")?,
        take_batch_array(&mut ebpf, "UNWIND_ROWS")?,
        take_map(&mut ebpf, "UNWIND_TABLES")?,
        take_batch_array(&mut ebpf, "EXEC_MAPPINGS")?,
        take_map(&mut ebpf, "PROC_INFO")?,
        take_map(&mut ebpf, "PY_PROCS")?,
    );

    // The unwinder goes into the program array before `profile` runs.
    let mut programs: ProgramArray<MapData> = take_map(&mut ebpf, "UNWIND_PROGS")?;
    let unwinder: &mut PerfEvent = program(&mut ebpf, UNWIND_PROGRAM)?;
    unwinder
        .load()
        .map_err(|e| ebpf_error("loading the unwind_user program (verifier)", e))?;
    let fd = unwinder
        .fd()
        .map_err(|e| ebpf_error("the unwind_user program's fd", e))?;
    programs
        .set(0, fd, 0)
        .map_err(|e| ebpf_error("filling the UNWIND_PROGS program array", e))?;
    // The Python frame walk, tail-called by the unwinder.
    let mut python_programs: ProgramArray<MapData> = take_map(&mut ebpf, "PYTHON_PROGS")?;
    let walker: &mut PerfEvent = program(&mut ebpf, "walk_python")?;
    walker
        .load()
        .map_err(|e| ebpf_error("loading the walk_python program (verifier)", e))?;
    set_unwinder(&ebpf, &mut python_programs, "walk_python")?;

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

    // Executable file mappings (libraries) announce a refresh; without BTF
    // for fexit, the first walk that leaves the known mappings asks instead.
    match aya::Btf::from_sys_fs() {
        Ok(btf) => {
            let mmap: &mut aya::programs::FExit = program(&mut ebpf, "on_mmap")?;
            let attached = mmap
                .load("do_mmap", &btf)
                .and_then(|()| mmap.attach().map(|_| ()));
            if let Err(e) = attached {
                tracing::debug!("cannot trace do_mmap ({e}): libraries loaded later are noticed at their first sample");
            }
        }
        Err(e) => tracing::debug!(
            "no kernel BTF ({e}): libraries loaded later are noticed at their first sample"
        ),
    }

    let exec: &mut RawTracePoint = program(&mut ebpf, "on_exec")?;
    exec.load()
        .map_err(|e| ebpf_error("loading the on_exec program", e))?;
    exec.attach("sched_process_exec")
        .map_err(|e| ebpf_error("attaching to the sched_process_exec raw tracepoint", e))?;

    Ok(Loaded {
        ebpf,
        sets,
        config_map,
        config,
        counters,
        unwind,
        programs,
        python_programs,
        filter,
        ring,
        logger,
    })
}

/// Offset of `thread.fsbase` in the kernel's `task_struct`, from its BTF
/// (0 when it cannot be read: Python frames are then not walked).
fn task_fsbase_offset() -> u32 {
    use btf_rs::{Btf, Type};
    let member_offset = |btf: &Btf, ty: &Type, name: &str| -> Option<(u32, Type)> {
        let Type::Struct(s) = ty else {
            return None;
        };
        s.members.iter().find_map(|m| {
            (btf.resolve_name(m).ok()? == name)
                .then(|| Some((m.bit_offset() / 8, btf.resolve_chained_type(m).ok()?)))
                .flatten()
        })
    };
    let offset = (|| {
        let btf = Btf::from_file("/sys/kernel/btf/vmlinux").ok()?;
        let task = btf.resolve_types_by_name("task_struct").ok()?;
        let task = task.iter().find(|t| matches!(t, Type::Struct(_)))?;
        let (thread, thread_ty) = member_offset(&btf, task, "thread")?;
        let (fsbase, _) = member_offset(&btf, &thread_ty, "fsbase")?;
        Some(thread + fsbase)
    })();
    // The parsed BTF (about 15 MiB) is gone: give its memory back.
    crate::memory::trim_allocator();
    if offset.is_none() {
        tracing::warn!(
            "task_struct.thread.fsbase not found in the kernel's BTF: Python frames are not read"
        );
    }
    offset.unwrap_or(0)
}

/// The off-CPU programs, loaded: the `sched_switch` program of one kind
/// (BTF or raw tracepoint), with BTF the `sched_waking` one, and their
/// unwinders in the program arrays they tail-call.
pub(super) struct OffCpuPrograms {
    /// Holds the unwinder for as long as it lives.
    _unwinder: ProgramArray<MapData>,
    btf: bool,
    /// Holds the waker's unwinder, when wakers are walked.
    waker: Option<ProgramArray<MapData>>,
}

/// Puts the loaded program `name` at index 0 of `array`.
fn set_unwinder(ebpf: &Ebpf, array: &mut ProgramArray<MapData>, name: &str) -> Result<()> {
    let fd = ebpf
        .program(name)
        .ok_or_else(|| Error::Ebpf {
            what: format!("the eBPF object has no program {name}"),
            source: "built object does not match the agent".into(),
        })?
        .fd()
        .map_err(|e| ebpf_error(format!("the {name} program's fd"), e))?;
    array
        .set(0, fd, 0)
        .map_err(|e| ebpf_error(format!("putting {name} in its program array"), e))
}

/// Loads the BTF tracepoint program `name` on `tracepoint`.
fn load_btf_tracepoint(
    ebpf: &mut Ebpf,
    name: &str,
    tracepoint: &str,
    btf: &aya::Btf,
) -> Result<()> {
    let prog: &mut BtfTracePoint = program(ebpf, name)?;
    prog.load(tracepoint, btf)
        .map_err(|e| ebpf_error(format!("loading the {name} program (verifier)"), e))
}

/// Loads the `sched_switch` programs as BTF tracepoints, the unwinder in
/// `unwinder`.
fn load_switch_btf(
    ebpf: &mut Ebpf,
    unwinder: &mut ProgramArray<MapData>,
    btf: &aya::Btf,
) -> Result<()> {
    load_btf_tracepoint(ebpf, OFF_CPU_UNWIND_PROGRAM, "sched_switch", btf)?;
    set_unwinder(ebpf, unwinder, OFF_CPU_UNWIND_PROGRAM)?;
    load_btf_tracepoint(ebpf, OFF_CPU_SWITCH, "sched_switch", btf)
}

/// Loads the `sched_switch` programs as raw tracepoints, the unwinder in
/// `unwinder`.
fn load_switch_raw(ebpf: &mut Ebpf, unwinder: &mut ProgramArray<MapData>) -> Result<()> {
    for name in [OFF_CPU_UNWIND_PROGRAM_RAW, OFF_CPU_SWITCH_RAW] {
        let prog: &mut RawTracePoint = program(ebpf, name)?;
        prog.load()
            .map_err(|e| ebpf_error(format!("loading the {name} program (verifier)"), e))?;
    }
    set_unwinder(ebpf, unwinder, OFF_CPU_UNWIND_PROGRAM_RAW)
}

/// Loads the wake-up program and its unwinder (BTF tracepoints); returns
/// the program array that holds the unwinder.
fn load_waking(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<ProgramArray<MapData>> {
    let mut unwinder: ProgramArray<MapData> = take_map(ebpf, "OFF_CPU_WAKER_PROGS")?;
    load_btf_tracepoint(ebpf, OFF_CPU_WAKER_UNWIND_PROGRAM, "sched_waking", btf)?;
    set_unwinder(ebpf, &mut unwinder, OFF_CPU_WAKER_UNWIND_PROGRAM)?;
    load_btf_tracepoint(ebpf, OFF_CPU_WAKING, "sched_waking", btf)?;
    Ok(unwinder)
}

/// Loads the off-CPU programs: `sched_switch` as a BTF tracepoint, else
/// (no BTF, or the kernel refuses it) as a raw one; with BTF, the wake-up
/// program too (without it, waits carry no waker).
pub(super) fn load_off_cpu(ebpf: &mut Ebpf) -> Result<OffCpuPrograms> {
    // The thread's state at switch-out is an argument of the tracepoint
    // since Linux 5.18.
    if let Ok(version) = aya::util::KernelVersion::current() {
        if version < aya::util::KernelVersion::new(5, 18, 0) {
            return Err(Error::KernelFeature {
                feature: "off-CPU recording",
                detail: format!(
                    "Linux {version} passes no thread state to sched_switch (5.18 does); \
                     run without --off-cpu"
                ),
            });
        }
    }
    let mut unwinder: ProgramArray<MapData> = take_map(ebpf, "OFF_CPU_UNWIND_PROGS")?;
    // The kernel's BTF, parsed once for every program that needs it.
    let btf = aya::Btf::from_sys_fs()
        .map_err(|e| ebpf_error("reading the kernel's BTF", e))
        .and_then(|btf| load_switch_btf(ebpf, &mut unwinder, &btf).map(|()| btf));
    let btf = match btf {
        Ok(btf) => btf,
        Err(e) => {
            tracing::warn!("{e}: off-CPU times through the raw sched_switch tracepoint");
            load_switch_raw(ebpf, &mut unwinder)?;
            return Ok(OffCpuPrograms {
                _unwinder: unwinder,
                btf: false,
                waker: None,
            });
        }
    };
    let waker = load_waking(ebpf, &btf)
        .inspect_err(|e| {
            tracing::warn!("{e}: off-CPU waits are recorded without the stacks of their wakers")
        })
        .ok();
    Ok(OffCpuPrograms {
        _unwinder: unwinder,
        btf: true,
        waker,
    })
}

/// The off-CPU programs' links, detached at stop.
pub(super) struct OffCpuLinks {
    switch: OffCpuLink,
    waking: Option<aya::programs::tp_btf::BtfTracePointLinkId>,
}

enum OffCpuLink {
    Btf(aya::programs::tp_btf::BtfTracePointLinkId),
    Raw(aya::programs::raw_trace_point::RawTracePointLinkId),
}

/// Attaches the loaded off-CPU programs: `sched_waking` first, so that no
/// timed wait misses its waker.
pub(super) fn attach_off_cpu(ebpf: &mut Ebpf, loaded: &OffCpuPrograms) -> Result<OffCpuLinks> {
    let waking = match loaded.waker {
        Some(_) => {
            let prog: &mut BtfTracePoint = program(ebpf, OFF_CPU_WAKING)?;
            Some(
                prog.attach()
                    .map_err(|e| ebpf_error("attaching to the sched_waking BTF tracepoint", e))?,
            )
        }
        None => None,
    };
    let switch = attach_switch(ebpf, loaded)?;
    Ok(OffCpuLinks { switch, waking })
}

/// Attaches the loaded `sched_switch` program.
fn attach_switch(ebpf: &mut Ebpf, loaded: &OffCpuPrograms) -> Result<OffCpuLink> {
    if loaded.btf {
        let prog: &mut BtfTracePoint = program(ebpf, OFF_CPU_SWITCH)?;
        prog.attach()
            .map(OffCpuLink::Btf)
            .map_err(|e| ebpf_error("attaching to the sched_switch BTF tracepoint", e))
    } else {
        let prog: &mut RawTracePoint = program(ebpf, OFF_CPU_SWITCH_RAW)?;
        prog.attach("sched_switch")
            .map(OffCpuLink::Raw)
            .map_err(|e| ebpf_error("attaching to the sched_switch raw tracepoint", e))
    }
}

/// Detaches the off-CPU programs.
pub(super) fn detach_off_cpu(ebpf: &mut Ebpf, links: OffCpuLinks) -> Result<()> {
    if let Some(link) = links.waking {
        let prog: &mut BtfTracePoint = program(ebpf, OFF_CPU_WAKING)?;
        prog.detach(link)
            .map_err(|e| ebpf_error("detaching the sched_waking program", e))?;
    }
    match links.switch {
        OffCpuLink::Btf(link) => {
            let prog: &mut BtfTracePoint = program(ebpf, OFF_CPU_SWITCH)?;
            prog.detach(link)
        }
        OffCpuLink::Raw(link) => {
            let prog: &mut RawTracePoint = program(ebpf, OFF_CPU_SWITCH_RAW)?;
            prog.detach(link)
        }
    }
    .map_err(|e| ebpf_error("detaching the sched_switch program", e))
}

/// Loads the `profile` program and attaches it to the software `cpu-clock`
/// perf event of every online CPU. Returns one link per CPU.
pub(super) fn attach_sampling(ebpf: &mut Ebpf, frequency: u64) -> Result<Vec<PerfEventLinkId>> {
    let cpus = aya::util::online_cpus().map_err(|(what, e)| Error::io(what, e))?;
    let prog: &mut PerfEvent = program(ebpf, PROFILE_PROGRAM)?;
    prog.load()
        .map_err(|e| ebpf_error("loading the profile program (verifier)", e))?;
    let mut links = Vec::with_capacity(cpus.len());
    for cpu in &cpus {
        let link = prog
            .attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu: *cpu },
                SamplePolicy::Frequency(frequency),
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
    Ok(links)
}

/// Detaches the `profile` program from every CPU.
pub(super) fn detach_sampling(ebpf: &mut Ebpf, links: Vec<PerfEventLinkId>) -> Result<()> {
    let prog: &mut PerfEvent = program(ebpf, PROFILE_PROGRAM)?;
    for link in links {
        prog.detach(link)
            .map_err(|e| ebpf_error("detaching the profile program", e))?;
    }
    Ok(())
}

/// Verifier statistics of the `profile` program: instructions processed
/// and program size in instructions, if the kernel reports them.
pub(super) fn program_info(ebpf: &Ebpf) -> Option<(u64, u64)> {
    let (mut verified, mut size) = (0, 0);
    // A sample runs both: `profile`, then `unwind_user` (tail calls).
    for name in [PROFILE_PROGRAM, UNWIND_PROGRAM] {
        let prog: &PerfEvent = ebpf.program(name)?.try_into().ok()?;
        let info = prog.info().ok()?;
        size += info.size_translated().unwrap_or(0) as u64 / 8;
        verified += info.verified_instruction_count().unwrap_or(0) as u64;
    }
    Some((verified, size))
}

/// An error of the eBPF layer, naming the privilege or kernel feature when
/// the kernel's answer says which.
pub(super) fn ebpf_error(
    what: impl Into<String>,
    err: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    let what = what.into();
    tracing::debug!(error = %err, "{what}");
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    // The verifier's refusal (EACCES) is not a missing privilege: show its log.
    while let Some(e) = source {
        if let Some(aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        }) = e.downcast_ref::<aya::programs::ProgramError>()
        {
            let log = verifier_log.to_string();
            if !log.trim().is_empty() {
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Error::Ebpf {
                    what: format!("{what}: the verifier refused it ({io_error})"),
                    source: tail.join("\n").into(),
                };
            }
        }
        source = e.source();
    }
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

fn missing_map(name: &str) -> Error {
    Error::Ebpf {
        what: format!("the eBPF object has no map {name}"),
        source: "built object does not match the agent".into(),
    }
}

pub(super) fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| missing_map(name))?;
    T::try_from(map).map_err(|e| ebpf_error(format!("opening map {name}"), e))
}

fn take_batch_array<V: aya::Pod>(ebpf: &mut Ebpf, name: &str) -> Result<BatchArray<V>> {
    let map = ebpf.take_map(name).ok_or_else(|| missing_map(name))?;
    BatchArray::new(map).map_err(|e| ebpf_error(format!("opening map {name}"), e))
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
