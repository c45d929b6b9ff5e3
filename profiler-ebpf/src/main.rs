//! The profiler's eBPF program.
//!
//! `profile` runs on every tick of the software `cpu-clock` perf event of each
//! CPU. It records the kernel and user stacks of the interrupted task with
//! `bpf_get_stackid` and counts (tgid, user stack, kernel stack, comm) in a
//! per-CPU hash map.
//!
//! Maps come in two sets, A and B. `CONFIG.active_set` says which one new
//! samples go to; userspace flips it, waits a grace period, then drains and
//! clears the idle set, so nothing is deleted while the program writes to it.
//! Every way a sample can be lost or degraded bumps a per-CPU counter.
//!
//! `on_exec` forgets a process at exec so its new image is announced again
//! (at its next new count-map key: after exec the comm and stacks differ).
//!
//! Cost per sample: see docs/kernel-cost.md. Most of it is the kernel's
//! user-stack walk; the program itself keeps to one hash-map lookup on the
//! common path.
//!
//! Minimum kernel: 5.8 (ring buffer); BTF is not required.
#![no_std]
#![no_main]

use core::{mem::MaybeUninit, ptr::addr_of_mut};

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_current_pid_tgid, generated},
    macros::{map, perf_event, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
    programs::{tracing::StackIdContext, PerfEventContext, RawTracePointContext},
};
use aya_log_ebpf::debug;
use profiler_common::{
    Config, Counter, NewPid, StackKey, COMM_LEN, COUNTER_COUNT, DEFAULT_COUNT_MAP_ENTRIES,
    DEFAULT_STACK_MAP_ENTRIES, KNOWN_PIDS_ENTRIES, MAX_FILTER_PIDS, NEW_PID_RING_BYTES, NO_STACK,
    OVERFLOW_STACK_BIT,
};

// Helpers return negated errno values.
const EEXIST: i32 = -17;
const ENOMEM: i32 = -12;
const EFAULT: i32 = -14;
const E2BIG: i32 = -7;
const BPF_NOEXIST: u64 = 1;

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

    // One call site per set, so that every map helper call sees a single
    // map: the verifier then calls the map's own lookup directly (or inlines
    // it) instead of going through the generic helper.
    if config.active_set == 0 {
        record(ctx, tgid, &STACKS_A, &STACKS_A_OVERFLOW, &COUNTS_A)
    } else {
        record(ctx, tgid, &STACKS_B, &STACKS_B_OVERFLOW, &COUNTS_B)
    }
}

/// Counts one sample of `tgid` in one map set.
#[inline(always)]
fn record(
    ctx: &PerfEventContext,
    tgid: u32,
    stacks: &StackTrace,
    overflow: &StackTrace,
    counts: &PerCpuHashMap<StackKey, u64>,
) -> Result<(), i64> {
    let in_kernel = sampled_in_kernel(ctx);

    // A user-mode sample has no kernel stack: don't ask for one.
    let kernel_stack_id = if in_kernel {
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
    } else {
        NO_STACK
    };

    // Kernel threads (tgid != 0, but no user memory) only have a kernel
    // stack: a user-stack fault in kernel mode is counted as informational
    // `KernelOnly`, since telling kthreads apart needs task_struct offsets.
    let user_stack_id = if tgid == 0 {
        NO_STACK
    } else {
        match stack_id(ctx, stacks, overflow, BPF_F_USER_STACK as u64) {
            Ok(id) => id,
            Err(err) => {
                bump(match err {
                    EEXIST => Counter::UserStackCollision,
                    ENOMEM => Counter::StackMapFull,
                    EFAULT if in_kernel => Counter::KernelOnly,
                    EFAULT => Counter::UserStackFault,
                    _ => {
                        debug!(ctx, "user bpf_get_stackid failed: {}", err);
                        Counter::StackOtherError
                    }
                });
                NO_STACK
            }
        }
    };

    // `comm` goes straight into the key: the helper writes all 16 bytes
    // (NUL padded, or zeroes on failure), so neither a zeroing pass nor a
    // copy of a returned array is needed.
    let mut key = MaybeUninit::<StackKey>::uninit();
    let key = unsafe {
        let k = key.as_mut_ptr();
        (*k).tgid = tgid;
        (*k).user_stack_id = user_stack_id;
        (*k).kernel_stack_id = kernel_stack_id;
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
                if user_stack_id != NO_STACK && KNOWN_PIDS.get_ptr(tgid).is_none() {
                    announce(tgid);
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
fn stack_id(
    ctx: &PerfEventContext,
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
/// a new image, so its next sample announces it again and userspace re-reads
/// its mappings.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn on_exec(_ctx: RawTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let _ = KNOWN_PIDS.remove(tgid);
    0
}

/// Tells userspace about a process at its first sample (checked when a
/// sample makes a new count-map key, see `record`).
#[inline(always)]
fn announce(tgid: u32) {
    if KNOWN_PIDS.insert(tgid, 1u8, BPF_NOEXIST).is_err() {
        // Another CPU announced it first.
        return;
    }
    if NEW_PIDS.output::<NewPid>(&NewPid { tgid }, 0).is_err() {
        bump(Counter::NewPidLost);
        // Forget it so the process's next new key tries again.
        let _ = KNOWN_PIDS.remove(tgid);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
