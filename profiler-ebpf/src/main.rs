//! The profiler's eBPF program.
//!
//! `profile` runs on every tick of the software `cpu-clock` perf event of each
//! CPU. It records the kernel stack of the interrupted task with
//! `bpf_get_stackid`, then hands over to `unwind_user` (tail calls, see
//! [`unwind`]), which walks the user stack from the task's user registers
//! with the unwind tables the agent loaded, stores it in the user-stack map
//! of the set (keyed by a hash of its frames), and counts (tgid, user stack,
//! kernel stack, comm) in a per-CPU hash map.
//!
//! Maps come in two sets, A and B. `CONFIG.active_set` says which one new
//! samples go to; userspace flips it, waits a grace period, then drains and
//! clears the idle set, so nothing is deleted while the program writes to it.
//! Every way a sample can be lost or degraded bumps a per-CPU counter.
//!
//! `on_exec` forgets a process at exec so its new image is announced again
//! (at its next new count-map key: after exec the comm and stacks differ).
//!
//! Cost per sample: see docs/kernel-cost.md.
//!
//! Minimum kernel: 5.15 (`bpf_task_pt_regs` for the user registers of a
//! sample taken in kernel mode; kernel BTF).
#![no_std]
#![no_main]

mod python;
mod unwind;

use core::{mem::MaybeUninit, ptr::addr_of_mut};

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated},
    macros::{btf_tracepoint, fexit, map, perf_event, raw_tracepoint},
    maps::{
        Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf, StackTrace,
    },
    programs::{
        tracing::StackIdContext, BtfTracePointContext, FExitContext, PerfEventContext,
        RawTracePointContext,
    },
    EbpfContext,
};
use aya_log_ebpf::debug;
use profiler_common::{
    announce as announce_reason,
    python::{PyProc, MAX_PYTHON_PROCESSES},
    thread_state,
    unwind::{
        ExecMapping, ProcInfo, RowCacheEntry, StackEnd, TableInfo, UnwindRow, UserStack,
        DEFAULT_USER_STACK_ENTRIES, EXEC_MAPPINGS_ENTRIES, MAX_TABLES, MAX_UNWIND_PROCESSES,
        ROW_CACHE_ENTRIES,
    },
    unwind_mode, Config, Counter, NewPid, OffCpuKey, OffCpuStart, StackKey, COMM_LEN,
    COUNTER_COUNT, DEFAULT_COUNT_MAP_ENTRIES, DEFAULT_OFF_CPU_MAP_ENTRIES,
    DEFAULT_STACK_MAP_ENTRIES, KNOWN_PIDS_ENTRIES, MAX_FILTER_PIDS, NEW_PID_RING_BYTES, NO_STACK,
    NO_USER_STACK, OFF_CPU_KEEP_ALL, OFF_CPU_KERNEL_FRAMES, OFF_CPU_KERNEL_STACK_ENTRIES,
    OFF_CPU_THREADS, OVERFLOW_STACK_BIT,
};
use unwind::{
    finish_hash, purpose, set_process, step, Step, UnwindState, CHECK_SEED, FLAG_ALL_REGS,
    FLAG_EXACT_PC, FRAMES_PER_CALL, MAX_UNWIND_CALLS, REG_RIP, REG_RSP,
};

// Helpers return negated errno values.
const EEXIST: i32 = -17;
const ENOMEM: i32 = -12;
const EFAULT: i32 = -14;
const E2BIG: i32 = -7;
const BPF_NOEXIST: u64 = 1;
/// Added to a user-stack key whose slot holds another stack (second chance).
const SECOND_SLOT: u64 = 0x5bd1_e995_5bd1_e995;

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map]
static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_PIDS, 0);

#[map]
static STACKS_A: StackTrace = StackTrace::with_max_entries(DEFAULT_STACK_MAP_ENTRIES, 0);
#[map]
static STACKS_B: StackTrace = StackTrace::with_max_entries(DEFAULT_STACK_MAP_ENTRIES, 0);

/// Second chance for a stack whose bucket in the main map holds another
/// stack (`-EEXIST`). Ids from here carry [`OVERFLOW_STACK_BIT`]. Both maps
/// hash alike, so each overflow bucket serves four main buckets: a stack is
/// lost only when its overflow bucket is taken too, by another stack that
/// also overflowed (rare while main-map collisions are few).
#[map]
static STACKS_A_OVERFLOW: StackTrace =
    StackTrace::with_max_entries(DEFAULT_STACK_MAP_ENTRIES / 4, 0);
#[map]
static STACKS_B_OVERFLOW: StackTrace =
    StackTrace::with_max_entries(DEFAULT_STACK_MAP_ENTRIES / 4, 0);

#[map]
static COUNTS_A: PerCpuHashMap<StackKey, u64> =
    PerCpuHashMap::with_max_entries(DEFAULT_COUNT_MAP_ENTRIES, 0);
#[map]
static COUNTS_B: PerCpuHashMap<StackKey, u64> =
    PerCpuHashMap::with_max_entries(DEFAULT_COUNT_MAP_ENTRIES, 0);

/// User stacks the program unwound, keyed by a hash of their frames (with
/// a second hash in the value to tell collisions apart).
#[map]
static USER_STACKS_A: HashMap<u64, UserStack> =
    HashMap::with_max_entries(DEFAULT_USER_STACK_ENTRIES, 0);
#[map]
static USER_STACKS_B: HashMap<u64, UserStack> =
    HashMap::with_max_entries(DEFAULT_USER_STACK_ENTRIES, 0);

/// Unwind rows of every loaded binary; each binary owns a slice
/// (`UNWIND_TABLES`). Sized by the agent (`--unwind-table-mib`).
#[map]
pub(crate) static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, 0);
#[map]
pub(crate) static UNWIND_TABLES: Array<TableInfo> = Array::with_max_entries(MAX_TABLES, 0);
/// Rows found lately on this CPU (see [`RowCacheEntry`]), by CPU samples.
#[map]
static ROW_CACHE: PerCpuArray<RowCacheEntry> = PerCpuArray::with_max_entries(ROW_CACHE_ENTRIES, 0);
/// The same for off-CPU walks: a CPU sample can interrupt one (trampoline
/// programs do not hold off perf event programs), so they share nothing
/// that is written.
#[map]
static OFF_CPU_ROW_CACHE: PerCpuArray<RowCacheEntry> =
    PerCpuArray::with_max_entries(ROW_CACHE_ENTRIES, 0);
/// Executable mappings of the processes with tables; each process owns a
/// slice (`PROC_INFO`).
#[map]
pub(crate) static EXEC_MAPPINGS: Array<ExecMapping> =
    Array::with_max_entries(EXEC_MAPPINGS_ENTRIES, 0);
#[map]
static PROC_INFO: HashMap<u32, ProcInfo> = HashMap::with_max_entries(MAX_UNWIND_PROCESSES, 0);

/// The walk in progress on this CPU.
#[map]
static UNWIND_STATE: PerCpuArray<UnwindState> = PerCpuArray::with_max_entries(1, 0);
/// The off-CPU walk in progress on this CPU (see [`OFF_CPU_ROW_CACHE`]).
#[map]
static OFF_CPU_STATE: PerCpuArray<UnwindState> = PerCpuArray::with_max_entries(1, 0);
/// Index 0: `unwind_user`, set by the agent.
#[map]
static UNWIND_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// Index 0: `walk_python`, tail-called after the native walk of a CPU
/// sample of a process in `PY_PROCS`.
#[map]
static PYTHON_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// Python processes whose frames are walked, by tgid (the agent fills it).
#[map]
static PY_PROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(MAX_PYTHON_PROCESSES, 0);

/// Off-CPU time, nanoseconds per (process, thread state, stacks, comm), in
/// the same A/B sets as the counts (stacks in the set's stack maps).
#[map]
static OFF_CPU_A: PerCpuHashMap<OffCpuKey, u64> =
    PerCpuHashMap::with_max_entries(DEFAULT_OFF_CPU_MAP_ENTRIES, 0);
#[map]
static OFF_CPU_B: PerCpuHashMap<OffCpuKey, u64> =
    PerCpuHashMap::with_max_entries(DEFAULT_OFF_CPU_MAP_ENTRIES, 0);
/// Threads off the CPU, by thread id: since when, in which state.
#[map]
static OFF_CPU_START: LruHashMap<u64, OffCpuStart> =
    LruHashMap::with_max_entries(OFF_CPU_THREADS, 0);
/// Kernel stacks of off-CPU waits, keyed by a hash of their frames (a
/// second hash in the value tells collisions apart); read, not cleared, by
/// the drains.
#[map]
static OFF_CPU_KERNEL_STACKS: LruHashMap<u64, UserStack> =
    LruHashMap::with_max_entries(OFF_CPU_KERNEL_STACK_ENTRIES, 0);
/// Scratch space for a kernel stack being read.
#[map]
static OFF_CPU_KERNEL_SCRATCH: PerCpuArray<UserStack> = PerCpuArray::with_max_entries(1, 0);
/// User stacks of off-CPU waits, like `OFF_CPU_KERNEL_STACKS`: a wait can
/// outlast a drain window, so its stacks must outlast the A/B sets.
#[map]
static OFF_CPU_USER_STACKS: LruHashMap<u64, UserStack> =
    LruHashMap::with_max_entries(OFF_CPU_KERNEL_STACK_ENTRIES, 0);
/// Index 0: `unwind_user_off_cpu` (the unwinder as a program of the same
/// kind as `off_cpu_switch`, which tail-calls it), set by the agent.
#[map]
static OFF_CPU_UNWIND_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// Index 0: `unwind_user_waker`, the same for `off_cpu_waking`.
#[map]
static OFF_CPU_WAKER_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Processes already announced through `NEW_PIDS`; userspace removes a pid
/// when the process is gone so a reused pid is announced again.
#[map]
static KNOWN_PIDS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(KNOWN_PIDS_ENTRIES, 0);

#[map]
static NEW_PIDS: RingBuf = RingBuf::with_byte_size(NEW_PID_RING_BYTES, 0);

#[perf_event]
pub fn profile(ctx: PerfEventContext) -> u32 {
    match try_profile(&ctx) {
        Ok(()) => 0,
        Err(err) => {
            bump(Counter::CountOtherError);
            debug!(&ctx, "profile: sample lost, error {}", err);
            0
        }
    }
}

#[inline(always)]
fn bump(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *value += 1 };
    }
}

/// Whether the interrupted context was in kernel mode.
#[inline(always)]
fn sampled_in_kernel(ctx: &PerfEventContext) -> bool {
    // Kernel addresses have the top bit set on the 64-bit targets we support.
    #[cfg(bpf_target_arch = "x86_64")]
    let ip = unsafe { (*ctx.ctx).regs.rip };
    #[cfg(bpf_target_arch = "aarch64")]
    let ip = unsafe { (*ctx.ctx).regs.pc };
    (ip as i64) < 0
}

fn try_profile(ctx: &PerfEventContext) -> Result<(), i64> {
    bump(Counter::Samples);
    let config = match CONFIG.get(0) {
        Some(config) => *config,
        None => return Err(0),
    };

    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let pid = pid_tgid as u32;
    if pid == 0 && config.include_idle == 0 {
        bump(Counter::IdleSkipped);
        return Ok(());
    }
    if config.filter_pids != 0 && FILTER_PIDS.get_ptr(tgid).is_none() {
        bump(Counter::Filtered);
        return Ok(());
    }

    let in_kernel = sampled_in_kernel(ctx);
    // One call site per set, so that every map helper call sees a single
    // map: the verifier then calls the map's own lookup directly (or inlines
    // it) instead of going through the generic helper.
    let kernel_stack_id = if !in_kernel {
        // A user-mode sample has no kernel stack: don't ask for one.
        NO_STACK
    } else if config.active_set == 0 {
        kernel_stack(ctx, &STACKS_A, &STACKS_A_OVERFLOW)
    } else {
        kernel_stack(ctx, &STACKS_B, &STACKS_B_OVERFLOW)
    };

    // Kernel threads have no user stack.
    let Some(state) = UNWIND_STATE.get_ptr_mut(0) else {
        return Err(0);
    };
    // SAFETY: per-CPU value; this program and the unwinder it tail-calls are
    // its only users on this CPU, one at a time.
    let state = unsafe { &mut *state };
    state.tgid = tgid;
    state.kernel_stack_id = kernel_stack_id;
    state.set = config.active_set;
    state.purpose = purpose::CPU_SAMPLE;
    let regs = if in_kernel {
        saved_user_registers(state)
    } else {
        sampled_user_registers(ctx, state)
    };
    if tgid == 0 || !regs {
        if tgid != 0 && in_kernel {
            bump(Counter::KernelOnly);
        }
        return count(state, NO_USER_STACK);
    }
    start_walk(state, &config);
    // SAFETY: `ctx` is this program's context; on success the call does not
    // return.
    unsafe { UNWIND_PROGS.tail_call(ctx, 0) };
    bump(Counter::UnwinderUnreachable);
    count(state, NO_USER_STACK)
}

/// Prepares `state` for a walk of the user stack from its registers.
#[inline(always)]
fn start_walk(state: &mut UnwindState, config: &Config) {
    let tgid = state.tgid;
    state.stack.len = 0;
    state.stack.end = StackEnd::DepthLimit as u32;
    state.stack.check = CHECK_SEED;
    state.hash = 0;
    state.calls = 0;
    state.refresh = 0;
    state.flags = FLAG_ALL_REGS | FLAG_EXACT_PC;
    state.window_len = 0;
    let info = if config.unwind_mode == unwind_mode::CFI {
        // SAFETY: a map value; the agent replaces it whole.
        PROC_INFO.get_ptr(tgid).map(|info| unsafe { *info })
    } else {
        None
    };
    set_process(state, tgid, info);
}

/// The kernel stack's id in one set's stack maps, or [`NO_STACK`] (counted).
#[inline(always)]
fn kernel_stack<C: StackIdContext>(ctx: &C, stacks: &StackTrace, overflow: &StackTrace) -> i32 {
    match stack_id(ctx, stacks, overflow, 0) {
        Ok(id) => id,
        Err(err) => {
            bump(match err {
                EEXIST => Counter::KernelStackCollision,
                ENOMEM => Counter::StackMapFull,
                EFAULT => Counter::KernelStackFault,
                _ => {
                    debug!(ctx, "kernel bpf_get_stackid failed: {}", err);
                    Counter::StackOtherError
                }
            });
            NO_STACK
        }
    }
}

/// Fills `state.regs` with the registers of a user-mode sample. False when
/// they are not user registers.
#[inline(always)]
fn sampled_user_registers(ctx: &PerfEventContext, state: &mut UnwindState) -> bool {
    // SAFETY: the perf context holds the sampled registers.
    let regs = unsafe { (*ctx.ctx).regs };
    set_registers(state, &regs);
    user_registers_valid(state)
}

/// Fills `state.regs` with the current task's user registers saved at
/// kernel entry. False when there are none (a kernel thread, a task
/// exiting).
#[inline(always)]
fn saved_user_registers(state: &mut UnwindState) -> bool {
    let Some(regs) = saved_registers() else {
        bump(Counter::UserStackFault);
        return false;
    };
    set_registers(state, &regs);
    user_registers_valid(state)
}

/// The current task's registers saved at kernel entry (its user context,
/// and on x86-64 the system call it is in).
#[inline(always)]
fn saved_registers() -> Option<pt_regs> {
    // SAFETY: BTF-typed task pointer, passed as the helper expects; the
    // registers are copied out with a checked read.
    unsafe {
        let task = generated::bpf_get_current_task_btf();
        let saved = generated::bpf_task_pt_regs(task) as *const pt_regs;
        aya_ebpf::helpers::bpf_probe_read_kernel(saved).ok()
    }
}

#[inline(always)]
fn user_registers_valid(state: &UnwindState) -> bool {
    state.regs[REG_RIP] != 0 && state.regs[REG_RSP] != 0 && (state.regs[REG_RIP] as i64) > 0
}

#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
fn set_registers(state: &mut UnwindState, r: &pt_regs) {
    // DWARF numbering: rax, rdx, rcx, rbx, rsi, rdi, rbp, rsp, r8..r15, rip.
    state.regs = [
        r.rax, r.rdx, r.rcx, r.rbx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip,
    ];
}

/// Other architectures: frame pointers only (the agent loads no tables):
/// the pc, stack pointer and frame pointer in the x86-64 slots.
#[cfg(not(bpf_target_arch = "x86_64"))]
#[inline(always)]
fn set_registers(state: &mut UnwindState, r: &pt_regs) {
    state.regs = [0; unwind::REGS];
    state.regs[REG_RIP] = r.pc;
    state.regs[REG_RSP] = r.sp;
    state.regs[unwind::REG_RBP] = r.regs[29];
}

/// Tail-called from `profile`: walks up to [`FRAMES_PER_CALL`] frames, then
/// calls itself again, until the stack ends; then stores it and counts the
/// sample.
#[perf_event]
pub fn unwind_user(ctx: PerfEventContext) -> u32 {
    unwind_calls(
        &ctx,
        &UNWIND_PROGS,
        &UNWIND_STATE,
        &ROW_CACHE,
        Some(&PYTHON_PROGS),
    )
}

/// Tail-called by `unwind_user` once the native walk of a Python process's
/// sample is done: appends its Python frames, then stores the stack.
#[perf_event]
pub fn walk_python(_ctx: PerfEventContext) -> u32 {
    let Some(state) = UNWIND_STATE.get_ptr_mut(0) else {
        bump(Counter::CountOtherError);
        return 0;
    };
    // SAFETY: per-CPU value, see `try_profile`.
    let state = unsafe { &mut *state };
    let fsbase_offset = CONFIG.get(0).map_or(0, |c| c.task_fsbase_offset);
    // SAFETY: a map value; the agent replaces it whole.
    if let Some(proc) = PY_PROCS.get_ptr(state.tgid).map(|p| unsafe { *p }) {
        python::count_outcome(python::walk(state, &proc, fsbase_offset));
    }
    let end = StackEnd::from_u32(state.native_end).unwrap_or(StackEnd::DepthLimit);
    let user = store_user_stack(state, end);
    let _ = count(state, user);
    0
}

/// [`unwind_user`] for `off_cpu_switch`, which can only tail-call a
/// program of its own kind (loaded, never attached): remembers the thread
/// with its stacks at the end.
#[btf_tracepoint(function = "sched_switch")]
pub fn unwind_user_off_cpu(ctx: BtfTracePointContext) -> i32 {
    unwind_calls(
        &ctx,
        &OFF_CPU_UNWIND_PROGS,
        &OFF_CPU_STATE,
        &OFF_CPU_ROW_CACHE,
        None,
    ) as i32
}

/// [`unwind_user`] for `off_cpu_waking`: keeps the waker's stack with the
/// woken thread's wait at the end.
#[btf_tracepoint(function = "sched_waking")]
pub fn unwind_user_waker(ctx: BtfTracePointContext) -> i32 {
    unwind_calls(
        &ctx,
        &OFF_CPU_WAKER_PROGS,
        &OFF_CPU_STATE,
        &OFF_CPU_ROW_CACHE,
        None,
    ) as i32
}

/// [`unwind_user_off_cpu`] for [`off_cpu_switch_raw`].
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn unwind_user_off_cpu_raw(ctx: RawTracePointContext) -> i32 {
    unwind_calls(
        &ctx,
        &OFF_CPU_UNWIND_PROGS,
        &OFF_CPU_STATE,
        &OFF_CPU_ROW_CACHE,
        None,
    ) as i32
}

/// One call of an unwinder program: `progs` holds the program itself,
/// `states` and `cache` its walk and row cache.
#[inline(always)]
fn unwind_calls<C: EbpfContext>(
    ctx: &C,
    progs: &ProgramArray,
    states: &PerCpuArray<UnwindState>,
    cache: &PerCpuArray<RowCacheEntry>,
    python: Option<&ProgramArray>,
) -> u32 {
    let Some(state) = states.get_ptr_mut(0) else {
        bump(Counter::CountOtherError);
        return 0;
    };
    // SAFETY: per-CPU value, see `try_profile`.
    let state = unsafe { &mut *state };
    let mut end = None;
    for _ in 0..FRAMES_PER_CALL {
        if let Step::End(why) = step(state, cache) {
            end = Some(why);
            break;
        }
    }
    let end = match end {
        Some(end) => end,
        None => {
            state.calls += 1;
            if state.calls < MAX_UNWIND_CALLS {
                // SAFETY: as in `try_profile`.
                unsafe { progs.tail_call(ctx, 0) };
            }
            StackEnd::DepthLimit
        }
    };
    if end == StackEnd::NoMapping {
        request_refresh(state.tgid);
    }
    if let Some(python) = python {
        let fsbase_known = CONFIG.get(0).is_some_and(|c| c.task_fsbase_offset != 0);
        if fsbase_known && PY_PROCS.get_ptr(state.tgid).is_some() {
            state.native_end = end as u32;
            // SAFETY: as in `try_profile`; on failure the stack is stored
            // without Python frames.
            unsafe { python.tail_call(ctx, 0) };
        }
    }
    let user = store_user_stack(state, end);
    let _ = count(state, user);
    0
}

/// Stores the walked stack in the set's user-stack map; returns its key, or
/// [`NO_USER_STACK`] when it was lost (counted).
#[inline(always)]
fn store_user_stack(state: &mut UnwindState, end: StackEnd) -> u64 {
    if state.stack.len == 0 {
        return NO_USER_STACK;
    }
    state.stack.end = end as u32;
    let tail = ((end as u64) << 32) | state.stack.len as u64;
    let key = finish_hash(state.hash ^ tail) | 1;
    state.stack.check = finish_hash(state.stack.check ^ tail);
    if state.purpose != purpose::CPU_SAMPLE {
        return keep_stack(&OFF_CPU_USER_STACKS, key, &state.stack);
    }
    let stacks = if state.set == 0 {
        &USER_STACKS_A
    } else {
        &USER_STACKS_B
    };
    for slot in [key, key ^ SECOND_SLOT] {
        let slot = slot | 1;
        match stacks.get_ptr(slot) {
            // SAFETY: a map value; `check` is written with the stack.
            Some(stored) if unsafe { (*stored).check } == state.stack.check => return slot,
            Some(_) => continue,
            // By reference: the value (1.5 KiB) must not be copied to the
            // 512-byte program stack.
            #[allow(clippy::needless_borrows_for_generic_args)]
            None => match stacks.insert(slot, &state.stack, BPF_NOEXIST) {
                Ok(()) => return slot,
                // Another CPU stored a stack there just now: the same one,
                // most likely.
                Err(EEXIST) => match stacks.get_ptr(slot) {
                    Some(stored) if unsafe { (*stored).check } == state.stack.check => return slot,
                    _ => continue,
                },
                Err(_) => {
                    bump(Counter::StackMapFull);
                    return NO_USER_STACK;
                }
            },
        }
    }
    bump(Counter::UserStackCollision);
    NO_USER_STACK
}

/// Ends a walk: counts one sample of `state.tgid` in the set `state.set`;
/// or remembers a thread leaving the CPU with its stacks until it comes
/// back; or keeps a waker's stack with the wait of the thread it wakes.
#[inline(always)]
fn count(state: &UnwindState, user_stack: u64) -> Result<(), i64> {
    if state.purpose == purpose::OFF_CPU {
        remember_off_cpu(state, user_stack);
        Ok(())
    } else if state.purpose == purpose::WAKER {
        remember_waker(state, user_stack);
        Ok(())
    } else if state.set == 0 {
        record(state, user_stack, &COUNTS_A)
    } else {
        record(state, user_stack, &COUNTS_B)
    }
}

/// Remembers the thread that is leaving the CPU (the current one), with
/// its stacks, until it comes back (`switch_in`).
#[inline(always)]
fn remember_off_cpu(state: &UnwindState, user_stack: u64) {
    let mut start = MaybeUninit::<OffCpuStart>::uninit();
    // SAFETY: every field is written; `comm` by the helper (all 16 bytes).
    let start = unsafe {
        let s = start.as_mut_ptr();
        (*s).since_ns = state.off_cpu_ns;
        (*s).tgid = state.tgid;
        (*s).state = state.thread_state;
        (*s).user_stack = user_stack;
        (*s).kernel_stack = state.off_cpu_kernel_stack;
        (*s).waker_stack = NO_USER_STACK;
        generated::bpf_get_current_comm(addr_of_mut!((*s).comm).cast(), COMM_LEN as u32);
        start.assume_init()
    };
    // SAFETY: no arguments.
    let task = unsafe { generated::bpf_get_current_task() };
    // After a pause of the recording, a thread that left before it and
    // came back unseen: its old wait is replaced, and counted as cut.
    let valid_from = CONFIG.get(0).map_or(0, |c| c.off_cpu_valid_from_ns);
    if valid_from != 0 {
        if let Some(old) = OFF_CPU_START.get_ptr(task) {
            // SAFETY: a map value, read once.
            if unsafe { (*old).since_ns } < valid_from {
                bump(Counter::OffCpuPaused);
            }
        }
    }
    if OFF_CPU_START.insert(task, start, 0).is_err() {
        bump(Counter::OffCpuStartLost);
    }
}

/// Keeps a waker's user stack with the wait of the thread it wakes
/// (`state.wakee`), whose time is added with it when it runs again.
#[inline(always)]
fn remember_waker(state: &UnwindState, user_stack: u64) {
    if user_stack == NO_USER_STACK {
        return;
    }
    if let Some(start) = OFF_CPU_START.get_ptr_mut(state.wakee) {
        // SAFETY: a map value; the woken thread cannot run (and add its
        // time) before the wake-up this program runs in is done.
        unsafe { (*start).waker_stack = user_stack };
        bump(Counter::OffCpuWakerStacks);
    }
}

/// Adds an off-CPU time to one set's off-CPU map.
#[inline(always)]
fn record_off_cpu(start: &OffCpuStart, ns: u64, times: &PerCpuHashMap<OffCpuKey, u64>) {
    let key = OffCpuKey {
        tgid: start.tgid,
        state: start.state,
        user_stack: start.user_stack,
        kernel_stack: start.kernel_stack,
        waker_stack: start.waker_stack,
        comm: start.comm,
    };
    match times.get_ptr_mut(key) {
        // Per-CPU value: this CPU is its only writer.
        Some(total) => unsafe { *total += ns },
        None => match times.insert(key, ns, BPF_NOEXIST) {
            Ok(()) => {
                if start.user_stack != NO_USER_STACK && KNOWN_PIDS.get_ptr(start.tgid).is_none() {
                    announce(start.tgid, announce_reason::NEW);
                }
            }
            Err(EEXIST) => match times.get_ptr_mut(key) {
                Some(total) => unsafe { *total += ns },
                None => return,
            },
            Err(_) => {
                bump(Counter::OffCpuMapFull);
                return;
            }
        },
    }
    bump(Counter::OffCpuRecorded);
}

/// Counts one sample in one set's count map.
#[inline(always)]
fn record(
    state: &UnwindState,
    user_stack: u64,
    counts: &PerCpuHashMap<StackKey, u64>,
) -> Result<(), i64> {
    let tgid = state.tgid;
    // `comm` goes straight into the key: the helper writes all 16 bytes
    // (NUL padded, or zeroes on failure), so neither a zeroing pass nor a
    // copy of a returned array is needed.
    let mut key = MaybeUninit::<StackKey>::uninit();
    let key = unsafe {
        let k = key.as_mut_ptr();
        (*k).tgid = tgid;
        (*k).kernel_stack_id = state.kernel_stack_id;
        (*k).user_stack = user_stack;
        generated::bpf_get_current_comm(addr_of_mut!((*k).comm).cast(), COMM_LEN as u32);
        key.assume_init()
    };

    match counts.get_ptr_mut(key) {
        // Per-CPU value: this CPU is its only writer.
        Some(count) => unsafe { *count += 1 },
        None => match counts.insert(key, 1, BPF_NOEXIST) {
            Ok(()) => {
                // A process's first sample in a window always makes a new
                // key (the tgid is part of it), so checking only here still
                // announces every process, without a lookup per sample.
                if user_stack != NO_USER_STACK && KNOWN_PIDS.get_ptr(tgid).is_none() {
                    announce(tgid, announce_reason::NEW);
                }
            }
            // Another CPU inserted the key between our lookup and insert
            // (and checked the announcement).
            Err(EEXIST) => match counts.get_ptr_mut(key) {
                Some(count) => unsafe { *count += 1 },
                None => return Err(EEXIST as i64),
            },
            Err(E2BIG) | Err(ENOMEM) => {
                bump(Counter::CountMapFull);
                return Ok(());
            }
            Err(err) => return Err(err as i64),
        },
    }
    bump(Counter::Recorded);
    Ok(())
}

/// Stack id in the main map, or in the overflow map (tagged) when the main
/// map's bucket holds another stack.
#[inline(always)]
fn stack_id<C: StackIdContext>(
    ctx: &C,
    main: &StackTrace,
    overflow: &StackTrace,
    flags: u64,
) -> Result<i32, i32> {
    match ctx.get_stackid(main, flags) {
        Ok(id) => Ok(id as i32),
        Err(EEXIST) => ctx
            .get_stackid(overflow, flags)
            .map(|id| id as i32 | OVERFLOW_STACK_BIT),
        Err(err) => Err(err),
    }
}

/// Raw tracepoint `sched_process_exec` (no tracefs needed): the process got
/// a new image. The previous image's mappings do not apply to it (walks use frame pointers
/// until the agent has loaded the new ones), and it is announced now, so
/// the agent snapshots it and loads its tables before it has run for long:
/// processes that live milliseconds get whole, named stacks too.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn on_exec(_ctx: RawTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let _ = PROC_INFO.remove(tgid);
    let _ = KNOWN_PIDS.remove(tgid);
    let wanted = match CONFIG.get(0) {
        Some(config) => config.filter_pids == 0 || FILTER_PIDS.get_ptr(tgid).is_some(),
        None => false,
    };
    if wanted {
        announce(tgid, announce_reason::EXEC);
    }
    0
}

/// `PROT_EXEC` of `mmap(2)`.
const PROT_EXEC: u64 = 4;

/// After `do_mmap(file, addr, len, prot, ...)`: a process mapped a file
/// executable (a library loaded by the dynamic linker or `dlopen`), so its
/// mappings are read again before its code runs much, rather than after a
/// walk first stops in the new code.
#[fexit(function = "do_mmap")]
pub fn on_mmap(ctx: FExitContext) -> i32 {
    let file: u64 = ctx.arg(0);
    let prot: u64 = ctx.arg(3);
    if file != 0 && prot & PROT_EXEC != 0 {
        request_refresh((bpf_get_current_pid_tgid() >> 32) as u32);
    }
    0
}

/// Tells userspace about a process: at exec, and at its first sample in a
/// window when it is not known yet (see `record`).
#[inline(always)]
fn announce(tgid: u32, reason: u32) {
    if KNOWN_PIDS
        .insert(tgid, announce_reason::NEW as u8, BPF_NOEXIST)
        .is_err()
    {
        // Another CPU announced it first.
        return;
    }
    let event = NewPid { tgid, reason };
    if NEW_PIDS.output::<NewPid>(&event, 0).is_err() {
        bump(Counter::NewPidLost);
        // Forget it so the process's next new key tries again.
        let _ = KNOWN_PIDS.remove(tgid);
    }
}

/// Asks userspace to read the mappings of an announced process again (a
/// user stack left them); at most one request is outstanding per process:
/// userspace marks it announced again when it has reloaded them.
#[inline(always)]
fn request_refresh(tgid: u32) {
    let Some(known) = KNOWN_PIDS.get_ptr_mut(tgid) else {
        return;
    };
    // SAFETY: a map value; a race with another CPU sends two requests at most.
    unsafe {
        if *known != announce_reason::NEW as u8 {
            return;
        }
        *known = announce_reason::REFRESH as u8;
    }
    let event = NewPid {
        tgid,
        reason: announce_reason::REFRESH,
    };
    if NEW_PIDS.output::<NewPid>(&event, 0).is_err() {
        bump(Counter::NewPidLost);
        // SAFETY: as above.
        unsafe { *known = announce_reason::NEW as u8 };
    }
}

/// Frames `bpf_get_stack` leaves out at `sched_switch`: this program's own
/// and `bpf_trace_run4`, which calls it.
const SKIP_TRACEPOINT_FRAMES: u64 = 2;

/// `TASK_DEAD`: the thread switched out for the last time.
const TASK_DEAD: u32 = 0x80;

/// BTF tracepoint `sched_switch(preempt, prev, next, prev_state)`, run by
/// `prev` at every context switch. `next` coming back: if it was timed and
/// away at least the threshold, its time is added with the stacks it left
/// with. `prev` leaving (if drawn, see `--off-cpu-sample`): its kernel stack
/// is read and its user stack walked now, in its own address space, by the
/// tail-called unwinder, which then remembers it.
#[btf_tracepoint(function = "sched_switch")]
pub fn off_cpu_switch(ctx: BtfTracePointContext) -> i32 {
    off_cpu_switch_with(&ctx, ctx.arg(0), ctx.arg(2), ctx.arg(3))
}

/// [`off_cpu_switch`] as a raw tracepoint, for kernels where the BTF one
/// cannot attach.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn off_cpu_switch_raw(ctx: RawTracePointContext) -> i32 {
    off_cpu_switch_with(&ctx, ctx.arg(0), ctx.arg(2), ctx.arg(3))
}

/// Both kinds of `sched_switch` program, from the tracepoint's arguments.
#[inline(always)]
fn off_cpu_switch_with<C: EbpfContext>(ctx: &C, preempt: u64, next: u64, prev_state: u64) -> i32 {
    switch_in(next);
    if switch_out(preempt & 0xff != 0, prev_state as u32, |frames| {
        // SAFETY: the helper writes at most `size` bytes into the frames.
        unsafe {
            generated::bpf_get_stack(
                ctx.as_ptr(),
                frames.cast(),
                (OFF_CPU_KERNEL_FRAMES * 8) as u32,
                SKIP_TRACEPOINT_FRAMES,
            )
        }
    }) {
        // SAFETY: `ctx` is this program's context; on success the call
        // does not return.
        unsafe { OFF_CPU_UNWIND_PROGS.tail_call(ctx, 0) };
        off_cpu_unwinder_unreachable();
    }
    0
}

/// BTF tracepoint `sched_waking(p)`, run by whoever wakes `p`. When `p`'s
/// wait is timed (it was drawn when it left the CPU), has lasted at least
/// the threshold, and the waker is a thread of `p`'s own process in a
/// system call (a futex wake where a lock is released, a condition
/// signalled, a pipe written), the waker's user stack is walked by the
/// tail-called unwinder and kept with the wait: the lock holder's site.
/// Only the first such wake-up of a wait is walked.
#[btf_tracepoint(function = "sched_waking")]
pub fn off_cpu_waking(ctx: BtfTracePointContext) -> i32 {
    if waking(ctx.arg(0)) {
        // SAFETY: `ctx` is this program's context; on success the call
        // does not return.
        unsafe { OFF_CPU_WAKER_PROGS.tail_call(&ctx, 0) };
        bump(Counter::UnwinderUnreachable);
    }
    0
}

/// `wakee` (the address of its `task_struct`) is being woken by the
/// current thread: true when the waker's walk is set up in `OFF_CPU_STATE`
/// for the unwinder to finish (see [`off_cpu_waking`]).
#[inline(always)]
fn waking(wakee: u64) -> bool {
    // SAFETY: a map value, copied out.
    let Some(start) = OFF_CPU_START.get_ptr(wakee).map(|s| unsafe { *s }) else {
        return false;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    if start.waker_stack != NO_USER_STACK
        || (pid_tgid >> 32) as u32 != start.tgid
        || pid_tgid as u32 == 0
    {
        return false;
    }
    let Some(config) = CONFIG.get(0).copied() else {
        return false;
    };
    // SAFETY: no arguments.
    let waited = unsafe { bpf_ktime_get_ns() }.saturating_sub(start.since_ns);
    if waited < config.off_cpu_min_ns || start.since_ns < config.off_cpu_valid_from_ns {
        return false;
    }
    let Some(state) = OFF_CPU_STATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU value of the off-CPU and waker walks; both run with
    // interrupts off (the scheduler's and the wake-up's locks are held),
    // never one inside the other.
    let state = unsafe { &mut *state };
    if !waker_in_system_call(state) {
        return false;
    }
    state.purpose = purpose::WAKER;
    state.tgid = start.tgid;
    state.kernel_stack_id = NO_STACK;
    state.set = config.active_set;
    state.wakee = wakee;
    start_walk(state, &config);
    true
}

/// Reads the current thread's user registers into `state`; true when it is
/// in a system call (not an interrupt that landed on it).
#[inline(always)]
fn waker_in_system_call(state: &mut UnwindState) -> bool {
    let Some(regs) = saved_registers() else {
        return false;
    };
    #[cfg(bpf_target_arch = "x86_64")]
    let syscall = regs.orig_rax as i64;
    // Elsewhere the system call number is not in these registers: every
    // waker of the process counts.
    #[cfg(not(bpf_target_arch = "x86_64"))]
    let syscall = 0i64;
    set_registers(state, &regs);
    syscall >= 0 && user_registers_valid(state)
}

/// The off-CPU unwinder could not be tail-called: the thread is
/// remembered without its user stack.
#[inline(always)]
fn off_cpu_unwinder_unreachable() {
    bump(Counter::UnwinderUnreachable);
    if let Some(state) = OFF_CPU_STATE.get_ptr(0) {
        // SAFETY: per-CPU value, see `switch_out`.
        remember_off_cpu(unsafe { &*state }, NO_USER_STACK);
    }
}

/// `next` (the address of its `task_struct`) comes back on the CPU.
#[inline(always)]
fn switch_in(next: u64) {
    // SAFETY: a map value, copied out before its entry is removed.
    let Some(start) = OFF_CPU_START.get_ptr(next).map(|s| unsafe { *s }) else {
        return;
    };
    let _ = OFF_CPU_START.remove(next);
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    if start.since_ns < config.off_cpu_valid_from_ns {
        // It left before a pause of the recording: its time is not known.
        bump(Counter::OffCpuPaused);
        return;
    }
    // SAFETY: no arguments.
    let waited = unsafe { bpf_ktime_get_ns() }.saturating_sub(start.since_ns);
    if waited < config.off_cpu_min_ns.max(1) {
        bump(Counter::OffCpuShort);
        return;
    }
    if config.active_set == 0 {
        record_off_cpu(&start, waited, &OFF_CPU_A);
    } else {
        record_off_cpu(&start, waited, &OFF_CPU_B);
    }
}

/// `prev` (the current task) leaves the CPU: true when it was drawn and its
/// walk is set up in `OFF_CPU_STATE` (kernel stack read with `read_stack`,
/// which returns the bytes it wrote), for the unwinder to finish.
#[inline(always)]
fn switch_out(preempt: bool, prev_state: u32, read_stack: impl FnOnce(*mut u64) -> i64) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if pid == 0 || prev_state & TASK_DEAD != 0 {
        return false;
    }
    bump(Counter::OffCpuSwitches);
    let Some(config) = CONFIG.get(0).copied() else {
        return false;
    };
    if config.filter_pids != 0 && FILTER_PIDS.get_ptr(tgid).is_none() {
        bump(Counter::OffCpuFiltered);
        return false;
    }
    if config.off_cpu_keep < OFF_CPU_KEEP_ALL {
        // SAFETY: no arguments.
        let draw = unsafe { generated::bpf_get_prandom_u32() } & (OFF_CPU_KEEP_ALL - 1);
        if draw >= config.off_cpu_keep {
            bump(Counter::OffCpuNotSampled);
            return false;
        }
    }
    let Some(state) = OFF_CPU_STATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU value of the off-CPU walks only (a CPU sample cannot
    // interrupt: the scheduler runs this tracepoint with interrupts off).
    let state = unsafe { &mut *state };
    if !saved_user_registers(state) {
        // Kernel threads have no user context.
        bump(Counter::OffCpuKernelThreads);
        return false;
    }
    state.purpose = purpose::OFF_CPU;
    state.tgid = tgid;
    state.kernel_stack_id = NO_STACK;
    state.set = config.active_set;
    // SAFETY: no arguments.
    state.off_cpu_ns = unsafe { bpf_ktime_get_ns() };
    state.off_cpu_kernel_stack = store_kernel_stack(read_stack);
    state.thread_state = thread_state::from_switch(preempt, prev_state);
    start_walk(state, &config);
    true
}

/// Reads the current kernel stack with `read_stack` and keeps it in
/// `OFF_CPU_KERNEL_STACKS`; returns its key, or 0 (counted) when it could
/// not be read or kept.
#[inline(always)]
fn store_kernel_stack(read_stack: impl FnOnce(*mut u64) -> i64) -> u64 {
    let Some(scratch) = OFF_CPU_KERNEL_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch value, used by this program only.
    let scratch = unsafe { &mut *scratch };
    let bytes = read_stack(scratch.frames.as_mut_ptr());
    if bytes <= 0 {
        bump(Counter::OffCpuKernelStackLost);
        return 0;
    }
    let len = (bytes as usize / 8).min(OFF_CPU_KERNEL_FRAMES);
    let mut hash = 0x8f3a_5c1d_2b4e_6f70u64;
    let mut check = CHECK_SEED;
    for i in 0..OFF_CPU_KERNEL_FRAMES {
        if i >= len {
            break;
        }
        let ip = scratch.frames[i];
        hash = (hash.rotate_left(5) ^ ip).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        check = (check.rotate_left(7) ^ ip).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    }
    scratch.len = len as u32;
    scratch.end = StackEnd::Root as u32;
    scratch.check = finish_hash(check ^ len as u64);
    let key = keep_stack(
        &OFF_CPU_KERNEL_STACKS,
        finish_hash(hash ^ len as u64),
        scratch,
    );
    if key == 0 {
        bump(Counter::OffCpuKernelStackLost);
    }
    key
}

/// Keeps `stack` in an off-CPU stack map under `key` (or its second slot
/// when the first holds another stack); returns the key used, or 0.
#[inline(always)]
fn keep_stack(map: &LruHashMap<u64, UserStack>, key: u64, stack: &UserStack) -> u64 {
    for slot in [key, key ^ SECOND_SLOT] {
        let slot = slot | 1;
        match map.get_ptr(slot) {
            // SAFETY: a map value; `check` is written with the stack.
            Some(stored) if unsafe { (*stored).check } == stack.check => return slot,
            Some(_) => continue,
            #[allow(clippy::needless_borrows_for_generic_args)]
            None => match map.insert(slot, stack, BPF_NOEXIST) {
                Ok(()) => return slot,
                Err(_) => continue,
            },
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
