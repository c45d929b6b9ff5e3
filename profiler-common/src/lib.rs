//! Plain-data types shared by the eBPF program (`profiler-ebpf`) and the
//! userspace agent (`profiler-agent`).
//!
//! Everything here is `#[repr(C)]` with explicit widths and no implicit
//! padding, because the kernel and userspace read the same bytes. The `user`
//! feature adds `aya::Pod` impls so the agent can read the maps.
#![no_std]

pub mod python;
pub mod unwind;

/// Length of `task_struct::comm` (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Value stored in a [`StackKey`] stack id when that stack is absent
/// (a user-mode sample has no kernel stack, a kernel thread no user stack).
pub const NO_STACK: i32 = -1;

/// Set in a stack id that refers to the overflow stack-trace map of its set
/// (used when the main map's bucket for that stack held another stack).
pub const OVERFLOW_STACK_BIT: i32 = 1 << 30;

/// Number of map sets the program alternates between (A/B double buffering).
pub const MAP_SETS: u32 = 2;

/// Default capacity of each main stack-trace map (distinct stacks per
/// window). Each entry preallocates about 1 KiB of kernel memory; the
/// overflow map of each set has a quarter of the entries.
pub const DEFAULT_STACK_MAP_ENTRIES: u32 = 16_384;
/// Default capacity of each count map (distinct keys per window).
pub const DEFAULT_COUNT_MAP_ENTRIES: u32 = 16_384;
/// Capacity of the pid filter map (`record -p`).
pub const MAX_FILTER_PIDS: u32 = 1_024;
/// Capacity of the map of processes already announced to userspace.
pub const KNOWN_PIDS_ENTRIES: u32 = 32_768;
/// Size in bytes of the ring buffer that announces new processes.
pub const NEW_PID_RING_BYTES: u32 = 64 * 1024;

/// Value of [`StackKey::user_stack`] when there is no user stack (a
/// kernel thread, or a stack lost and counted).
pub const NO_USER_STACK: u64 = 0;

/// Key of the count maps: one entry per distinct (process, stacks, comm).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    /// Thread group id, i.e. the process id as userspace sees it.
    pub tgid: u32,
    /// Id in the stack-trace map of the kernel stack, or [`NO_STACK`].
    pub kernel_stack_id: i32,
    /// Key of the user stack in the user-stack map of the set (a hash of
    /// its frames, never 0), or [`NO_USER_STACK`].
    pub user_stack: u64,
    /// `comm` of the sampled thread, NUL padded.
    pub comm: [u8; COMM_LEN],
}

/// Default capacity of each off-CPU map (distinct keys per window).
pub const DEFAULT_OFF_CPU_MAP_ENTRIES: u32 = 8_192;
/// Threads that can be off the CPU, waiting to be timed, at once
/// (`OFF_CPU_START`, least recently used evicted).
pub const OFF_CPU_THREADS: u32 = 32_768;
/// Distinct kernel stacks, and user stacks, of off-CPU waits kept
/// (`OFF_CPU_KERNEL_STACKS`, `OFF_CPU_USER_STACKS`; least recently used
/// evicted; not cleared by drains: a wait can span windows).
pub const OFF_CPU_KERNEL_STACK_ENTRIES: u32 = 4_096;
/// Frames of an off-CPU kernel stack (`PERF_MAX_STACK_DEPTH`).
pub const OFF_CPU_KERNEL_FRAMES: usize = 127;
/// [`Config::off_cpu_keep`] that keeps every switch.
pub const OFF_CPU_KEEP_ALL: u32 = 1 << 16;

/// Key of the off-CPU maps: one entry per distinct (process, thread state,
/// stacks, comm); the value is nanoseconds off the CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OffCpuKey {
    pub tgid: u32,
    /// One of [`thread_state`]: how the thread left the CPU.
    pub state: u32,
    /// Key of the user stack in `OFF_CPU_USER_STACKS`, or
    /// [`NO_USER_STACK`].
    pub user_stack: u64,
    /// Key of the kernel stack in `OFF_CPU_KERNEL_STACKS`, or 0.
    pub kernel_stack: u64,
    /// Key in `OFF_CPU_USER_STACKS` of the user stack of the thread of the
    /// same process that woke this one in a system call (where it released
    /// a lock, signalled, wrote), or [`NO_USER_STACK`].
    pub waker_stack: u64,
    pub comm: [u8; COMM_LEN],
}

/// A thread off the CPU (value of `OFF_CPU_START`, keyed by the address of
/// its `task_struct`), with what its time is added to when it comes back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuStart {
    /// `bpf_ktime_get_ns` when it left the CPU.
    pub since_ns: u64,
    pub tgid: u32,
    /// One of [`thread_state`].
    pub state: u32,
    /// Key in `OFF_CPU_USER_STACKS`, or [`NO_USER_STACK`].
    pub user_stack: u64,
    /// Key in `OFF_CPU_KERNEL_STACKS`, or 0.
    pub kernel_stack: u64,
    /// Key in `OFF_CPU_USER_STACKS` of its waker's user stack, or
    /// [`NO_USER_STACK`] (set by the first wake-up that took one).
    pub waker_stack: u64,
    pub comm: [u8; COMM_LEN],
}

/// How a thread left the CPU ([`OffCpuKey::state`]).
pub mod thread_state {
    /// Preempted or yielding while runnable: waiting for a CPU.
    pub const RUNNABLE: u32 = 0;
    /// Sleeping, interruptibly (`S`): a lock, a sleep, I/O readiness.
    pub const SLEEPING: u32 = 1;
    /// Uninterruptible sleep (`D`): mostly disk I/O, page faults.
    pub const UNINTERRUPTIBLE: u32 = 2;
    /// Anything else (stopped, traced, parked).
    pub const OTHER: u32 = 3;
    /// Number of states.
    pub const COUNT: u32 = 4;

    /// The state's label value.
    pub const fn name(state: u32) -> &'static str {
        match state {
            RUNNABLE => "runnable",
            SLEEPING => "sleeping",
            UNINTERRUPTIBLE => "uninterruptible",
            _ => "other",
        }
    }

    /// The state of a thread switched out: `preempt` and `prev_state` as
    /// the `sched_switch` tracepoint passes them (`TASK_*` bits).
    pub const fn from_switch(preempt: bool, prev_state: u32) -> u32 {
        // TASK_INTERRUPTIBLE 0x1, TASK_UNINTERRUPTIBLE 0x2, TASK_NOLOAD
        // 0x400 (TASK_IDLE: uninterruptible without counting as load).
        if preempt || prev_state == 0 {
            RUNNABLE
        } else if prev_state & 0x2 != 0 && prev_state & 0x400 == 0 {
            UNINTERRUPTIBLE
        } else if prev_state & 0x3 != 0 {
            SLEEPING
        } else {
            OTHER
        }
    }
}

/// Run-time settings the program reads on every sample (index 0 of `CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Which map set (0 = A, 1 = B) new samples go to. Userspace flips it
    /// before draining the other set.
    pub active_set: u32,
    /// Non-zero: only count processes whose tgid is in `FILTER_PIDS`.
    pub filter_pids: u32,
    /// Non-zero: keep samples of the idle task (pid 0).
    pub include_idle: u32,
    /// One of [`unwind_mode`].
    pub unwind_mode: u32,
    /// Off-CPU: a switch-out is timed when a random 16-bit number is below
    /// this ([`OFF_CPU_KEEP_ALL`]: every one); its time then stands for
    /// `OFF_CPU_KEEP_ALL / off_cpu_keep` of the same.
    pub off_cpu_keep: u32,
    /// Offset of `thread.fsbase` in `task_struct` (from the kernel's BTF),
    /// by which a Python thread state is matched to the sampled thread; 0:
    /// unknown, Python frames are not walked.
    pub task_fsbase_offset: u32,
    /// Off-CPU: times shorter than this are not recorded (counted).
    pub off_cpu_min_ns: u64,
    /// Off-CPU: a thread that left the CPU before this time
    /// (`bpf_ktime_get_ns`) left while recording was paused or before: its
    /// wait is not timed (counted as [`Counter::OffCpuPaused`]). 0 until
    /// the agent first resumes recording after a pause.
    pub off_cpu_valid_from_ns: u64,
}

/// How the program walks user stacks; [`Config::unwind_mode`].
pub mod unwind_mode {
    /// Call-frame information where the agent loaded a table, checked
    /// frame pointers elsewhere (the default).
    pub const CFI: u32 = 0;
    /// Checked frame pointers only (for diagnosis).
    pub const FRAME_POINTERS: u32 = 1;
}

/// A process announced through the `NEW_PIDS` ring buffer at its first
/// sample (so userspace can snapshot its mappings before it exits), or
/// again when its mappings changed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewPid {
    pub tgid: u32,
    /// One of [`announce`].
    pub reason: u32,
}

/// Why a process is announced ([`NewPid::reason`]); also the values of
/// `KNOWN_PIDS`.
pub mod announce {
    /// Its first sample: snapshot it and load its unwind tables.
    pub const NEW: u32 = 1;
    /// A user stack reached an address outside its known mappings (a
    /// library loaded later, JIT code): read its mappings again. At most
    /// one such request is outstanding per process.
    pub const REFRESH: u32 = 2;
    /// It exec'd: snapshot it early (it may never be sampled; a process
    /// gone before this snapshot is not a loss). Not a `KNOWN_PIDS` value.
    pub const EXEC: u32 = 3;
}

/// Indexes into the per-CPU `COUNTERS` array.
///
/// Drops (a sample lost or degraded) and informational counts live side by
/// side; [`Counter::is_drop`] tells them apart.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    /// Every time the program ran.
    Samples = 0,
    /// Samples recorded in a count map.
    Recorded = 1,
    /// Samples of the idle task, skipped (not a drop).
    IdleSkipped = 2,
    /// Samples of processes outside the pid filter (not a drop).
    Filtered = 3,
    /// User stack lost: both of its slots in the user-stack map held other
    /// stacks (hash collisions).
    UserStackCollision = 4,
    /// Kernel stack lost: its bucket held another stack in both maps (`-EEXIST`).
    KernelStackCollision = 5,
    /// A stack lost because its stack map was full.
    StackMapFull = 6,
    /// A sample whose user registers could not be read.
    UserStackFault = 7,
    /// A kernel-mode sample whose kernel stack could not be read (`-EFAULT`).
    KernelStackFault = 8,
    /// Any other `bpf_get_stackid` error.
    StackOtherError = 9,
    /// Sample lost because the count map was full.
    CountMapFull = 10,
    /// A new process could not be announced (ring buffer full); its frames
    /// may stay unnamed if it exits before the drain.
    NewPidLost = 11,
    /// A kernel-mode sample without a user stack: kernel threads, or a
    /// user stack the kernel could not walk (informational).
    KernelOnly = 12,
    /// Sample lost: any other error while counting it (logged at debug level).
    CountOtherError = 13,
    /// The user-stack unwinder could not be reached (tail call failed): the
    /// sample is recorded without its user stack.
    UnwinderUnreachable = 14,
    /// Off-CPU: threads switched out (informational).
    OffCpuSwitches = 15,
    /// Off-CPU: switch-outs of processes outside the pid filter (not a drop).
    OffCpuFiltered = 16,
    /// Off-CPU: switch-outs of kernel threads, not timed (not a drop).
    OffCpuKernelThreads = 17,
    /// Off-CPU: switch-outs left out by sampling (`--off-cpu-sample`); the
    /// times kept are scaled up for them (not a drop).
    OffCpuNotSampled = 18,
    /// Off-CPU: a switch-out that could not be remembered (map update
    /// failed): its time is lost.
    OffCpuStartLost = 19,
    /// Off-CPU: times below the threshold (`--off-cpu-min`), not recorded
    /// (not a drop).
    OffCpuShort = 20,
    /// Off-CPU: times recorded in an off-CPU map.
    OffCpuRecorded = 21,
    /// Off-CPU: a time lost because the off-CPU map was full.
    OffCpuMapFull = 22,
    /// Off-CPU: a wait recorded without its kernel stack (it could not be
    /// read or stored).
    OffCpuKernelStackLost = 23,
    /// Off-CPU: user stacks taken of threads waking a timed thread of their
    /// own process in a system call (informational).
    OffCpuWakerStacks = 24,
    /// Off-CPU: a wait cut by a pause of off-CPU recording (the host
    /// switched context faster than `--off-cpu-max-switches`): its time is
    /// lost.
    OffCpuPaused = 25,
    /// Samples of Python processes whose Python frames were walked
    /// (informational).
    PythonStacks = 26,
    /// Samples of a Python process's thread that has no Python thread state
    /// (a thread Python did not start): native frames only (informational).
    PythonNoThreadState = 27,
    /// Python frame walks cut short (a read failed, or the frames did not
    /// fit): the outer Python frames are missing.
    PythonCut = 28,
}

/// Number of entries of the `COUNTERS` array.
pub const COUNTER_COUNT: u32 = 29;

impl Counter {
    /// All counters, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Samples,
        Counter::Recorded,
        Counter::IdleSkipped,
        Counter::Filtered,
        Counter::UserStackCollision,
        Counter::KernelStackCollision,
        Counter::StackMapFull,
        Counter::UserStackFault,
        Counter::KernelStackFault,
        Counter::StackOtherError,
        Counter::CountMapFull,
        Counter::NewPidLost,
        Counter::KernelOnly,
        Counter::CountOtherError,
        Counter::UnwinderUnreachable,
        Counter::OffCpuSwitches,
        Counter::OffCpuFiltered,
        Counter::OffCpuKernelThreads,
        Counter::OffCpuNotSampled,
        Counter::OffCpuStartLost,
        Counter::OffCpuShort,
        Counter::OffCpuRecorded,
        Counter::OffCpuMapFull,
        Counter::OffCpuKernelStackLost,
        Counter::OffCpuWakerStacks,
        Counter::OffCpuPaused,
        Counter::PythonStacks,
        Counter::PythonNoThreadState,
        Counter::PythonCut,
    ];

    /// Whether this counter counts samples lost or degraded.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Counter::UserStackCollision
                | Counter::KernelStackCollision
                | Counter::StackMapFull
                | Counter::UserStackFault
                | Counter::KernelStackFault
                | Counter::StackOtherError
                | Counter::CountMapFull
                | Counter::NewPidLost
                | Counter::CountOtherError
                | Counter::UnwinderUnreachable
                | Counter::OffCpuStartLost
                | Counter::OffCpuMapFull
                | Counter::OffCpuKernelStackLost
                | Counter::OffCpuPaused
                | Counter::PythonCut
        )
    }

    /// Stable snake_case name used in logs, summaries and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Samples => "samples",
            Counter::Recorded => "recorded",
            Counter::IdleSkipped => "idle_skipped",
            Counter::Filtered => "filtered_out",
            Counter::UserStackCollision => "user_stack_collision",
            Counter::KernelStackCollision => "kernel_stack_collision",
            Counter::StackMapFull => "stack_map_full",
            Counter::UserStackFault => "user_stack_fault",
            Counter::KernelStackFault => "kernel_stack_fault",
            Counter::StackOtherError => "stack_other_error",
            Counter::CountMapFull => "count_map_full",
            Counter::NewPidLost => "new_pid_lost",
            Counter::KernelOnly => "kernel_only",
            Counter::CountOtherError => "count_other_error",
            Counter::UnwinderUnreachable => "unwinder_unreachable",
            Counter::OffCpuSwitches => "off_cpu_switches",
            Counter::OffCpuFiltered => "off_cpu_filtered_out",
            Counter::OffCpuKernelThreads => "off_cpu_kernel_threads",
            Counter::OffCpuNotSampled => "off_cpu_not_sampled",
            Counter::OffCpuStartLost => "off_cpu_start_lost",
            Counter::OffCpuShort => "off_cpu_short",
            Counter::OffCpuRecorded => "off_cpu_recorded",
            Counter::OffCpuMapFull => "off_cpu_map_full",
            Counter::OffCpuKernelStackLost => "off_cpu_kernel_stack_lost",
            Counter::OffCpuWakerStacks => "off_cpu_waker_stacks",
            Counter::OffCpuPaused => "off_cpu_paused",
            Counter::PythonStacks => "python_stacks",
            Counter::PythonNoThreadState => "python_no_thread_state",
            Counter::PythonCut => "python_cut",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data without padding or pointers.
    unsafe impl aya::Pod for super::StackKey {}
    unsafe impl aya::Pod for super::OffCpuKey {}
    unsafe impl aya::Pod for super::OffCpuStart {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::NewPid {}
    unsafe impl aya::Pod for super::unwind::UnwindRow {}
    unsafe impl aya::Pod for super::python::PyProc {}
    unsafe impl aya::Pod for super::unwind::TableInfo {}
    unsafe impl aya::Pod for super::unwind::RowCacheEntry {}
    unsafe impl aya::Pod for super::unwind::ExecMapping {}
    unsafe impl aya::Pod for super::unwind::ProcInfo {}
    unsafe impl aya::Pod for super::unwind::UserStack {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_cache_slots_spread_over_the_cache() {
        let mut used = [0u32; unwind::ROW_CACHE_ENTRIES as usize];
        for pc in (0..4096u32).map(|i| i * 7) {
            let slot = unwind::row_cache_slot(3, pc);
            assert!(slot < unwind::ROW_CACHE_ENTRIES);
            used[slot as usize] += 1;
        }
        // 4096 addresses over 512 slots: none far above the mean of 8.
        assert!(used.iter().all(|&n| n <= 32), "{used:?}");
    }

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<StackKey>(), 4 + 4 + 8 + COMM_LEN);
        assert_eq!(core::mem::size_of::<Config>(), 40);
        assert_eq!(core::mem::size_of::<OffCpuKey>(), 48);
        assert_eq!(core::mem::size_of::<OffCpuStart>(), 56);
        assert_eq!(core::mem::size_of::<unwind::UnwindRow>(), 12);
        assert_eq!(core::mem::size_of::<unwind::TableInfo>(), 24);
        assert_eq!(core::mem::size_of::<unwind::RowCacheEntry>(), 20);
        assert_eq!(core::mem::size_of::<unwind::ExecMapping>(), 32);
        assert_eq!(core::mem::size_of::<unwind::ProcInfo>(), 12);
        assert_eq!(
            core::mem::size_of::<unwind::UserStack>(),
            16 + 8 * unwind::MAX_USER_FRAMES
        );
    }

    #[test]
    fn stack_ends_are_indexed_and_named_once() {
        use unwind::StackEnd;
        for (i, end) in StackEnd::ALL.iter().enumerate() {
            assert_eq!(StackEnd::from_u32(i as u32), Some(*end));
            assert_eq!(StackEnd::from_name(end.name()), Some(*end));
        }
        assert_eq!(StackEnd::from_u32(unwind::STACK_END_COUNT as u32), None);
        assert_eq!(StackEnd::from_name("Root"), None);
        let complete: usize = StackEnd::ALL.iter().filter(|e| e.is_complete()).count();
        assert_eq!(complete, 2, "root and frame_pointer_end");
    }

    #[test]
    fn thread_states_from_switches() {
        use thread_state::*;
        assert_eq!(from_switch(true, 1), RUNNABLE);
        assert_eq!(from_switch(false, 0), RUNNABLE);
        assert_eq!(from_switch(false, 1), SLEEPING);
        assert_eq!(from_switch(false, 2), UNINTERRUPTIBLE);
        // TASK_KILLABLE (WAKEKILL | UNINTERRUPTIBLE) is a D state too.
        assert_eq!(from_switch(false, 0x102), UNINTERRUPTIBLE);
        // TASK_IDLE does not count as load: a sleep.
        assert_eq!(from_switch(false, 0x402), SLEEPING);
        assert_eq!(from_switch(false, 0x4), OTHER);
        assert_eq!(name(UNINTERRUPTIBLE), "uninterruptible");
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
