//! Plain-data types shared by the eBPF program (`profiler-ebpf`) and the
//! userspace agent (`profiler-agent`).
//!
//! Everything here is `#[repr(C)]` with explicit widths and no implicit
//! padding, because the kernel and userspace read the same bytes. The `user`
//! feature adds `aya::Pod` impls so the agent can read the maps.
#![no_std]

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
}

/// Number of entries of the `COUNTERS` array.
pub const COUNTER_COUNT: u32 = 15;

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
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data without padding or pointers.
    unsafe impl aya::Pod for super::StackKey {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::NewPid {}
    unsafe impl aya::Pod for super::unwind::UnwindRow {}
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
        assert_eq!(core::mem::size_of::<Config>(), 16);
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
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
