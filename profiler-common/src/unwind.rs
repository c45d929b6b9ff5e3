//! User-stack unwinding: the tables the agent builds from each binary's
//! call-frame information (`.eh_frame`, `.debug_frame`) and pushes into
//! maps, the per-process map of executable mappings, and the stacks the
//! program records.
//!
//! The program walks a user stack frame by frame. For the frame's
//! instruction pointer it finds the executable mapping (binary search in the
//! process's mappings ([`ProcInfo`], [`ExecMapping`]), turns the address into the binary's own
//! virtual address (`pc - bias`), finds the last [`UnwindRow`] at or below it
//! (binary search in the binary's slice of the row array, [`TableInfo`]), and
//! applies the row: the canonical frame address (CFA) from a register plus
//! an offset, the return address at `CFA - 8`, the caller's `RSP` = CFA, and
//! its `RBP` unchanged or saved at an offset from the CFA.
//!
//! x86-64 only: the rules name `RSP`, `RBP` and `RIP`.

/// Most user frames the program records; deeper stacks are cut and
/// counted ([`StackEnd::DepthLimit`]). Deeper than perf's default (127),
/// so recursive code and deep runtimes keep their roots.
pub const MAX_USER_FRAMES: usize = 192;

/// Default capacity of each user-stack map (distinct user stacks per
/// window and set); each entry preallocates a [`UserStack`] (1.5 KiB).
pub const DEFAULT_USER_STACK_ENTRIES: u32 = 8_192;

/// Most executable mappings of one process the program searches; the
/// agent counts processes with more (the rest unwind with frame pointers).
pub const MAX_MAPPINGS: usize = 256;
/// Capacity of the mapping array shared by all processes (`EXEC_MAPPINGS`).
pub const EXEC_MAPPINGS_ENTRIES: u32 = 65_536;
/// Steps of the binary search over a process's mappings: `log2(MAX_MAPPINGS) + 1`.
pub const MAPPING_SEARCH_STEPS: u32 = 9;

/// Most rows in one binary's table; larger tables are refused and counted.
pub const MAX_TABLE_ROWS: u32 = 1 << 22;
/// Steps of the binary search over one table: `log2(MAX_TABLE_ROWS) + 1`.
pub const ROW_SEARCH_STEPS: u32 = 23;

/// Capacity of the table index (binaries with a table loaded at once).
pub const MAX_TABLES: u32 = 4_096;

/// Default size of the row array in MiB (`--unwind-table-mib`).
pub const DEFAULT_UNWIND_TABLE_MIB: u32 = 64;

/// Capacity of the per-process map (`PROC_INFO`: processes the program
/// unwinds with tables at once; the others unwind with frame pointers).
pub const MAX_UNWIND_PROCESSES: u32 = 8_192;

/// Set on a recorded user frame whose address is an instruction itself, not
/// a return address: a signal trampoline (`__restore_rt`, reached by a
/// "return" to its first byte) and the code the signal interrupted. The
/// leaf frame is always exact and not marked. Userspace strips the bit.
pub const EXACT_PC_BIT: u64 = 1 << 63;

/// Marks a mapping without a table: the program steps it with checked
/// frame pointers (JIT code, Go binaries, a table not loaded yet).
pub const NO_TABLE: u32 = u32::MAX;

/// How the canonical frame address (CFA) of a frame is found; the value of
/// [`UnwindRow::cfa_rule`].
pub mod cfa {
    /// No call-frame information covers this address (a gap between
    /// functions, or code without CFI): the program tries a frame-pointer
    /// step.
    pub const NONE: u8 = 0;
    /// `CFA = RSP + offset`.
    pub const RSP: u8 = 1;
    /// `CFA = RBP + offset`.
    pub const RBP: u8 = 2;
    /// The PLT's expression: `CFA = RSP + 8 + ((RIP & 15) >= 11 ? 8 : 0)`.
    pub const PLT_11: u8 = 3;
    /// The same with `>= 10` (the other PLT layout).
    pub const PLT_10: u8 = 4;
    /// `CFA = *(RSP + offset)` (a realigned stack, e.g. glibc, OpenSSL).
    pub const DEREF_RSP: u8 = 5;
    /// `CFA = *(RBP + offset)`.
    pub const DEREF_RBP: u8 = 6;
    /// A signal frame (`__restore_rt`): the interrupted context's RIP, RSP
    /// and RBP are in the kernel's `rt_sigframe` at RSP.
    pub const SIGNAL: u8 = 7;
    /// The return address is undefined: the outermost frame (`_start`,
    /// `clone`, `start_thread`).
    pub const END: u8 = 8;
    /// A rule the program does not implement; counted, never guessed.
    pub const UNSUPPORTED: u8 = 9;
    /// `CFA = *(RSP + offset) + 8` (OpenSSL-style assembly: BoringSSL,
    /// ring, crypto in Node and Chromium).
    pub const DEREF_RSP_8: u8 = 10;
    /// `CFA = *(RBP + offset) + 8`.
    pub const DEREF_RBP_8: u8 = 11;
    /// `CFA = register + offset` for DWARF register `cfa_rule - REG_BASE`
    /// (0..=16); only known in the leaf frame, where every register was
    /// sampled.
    pub const REG_BASE: u8 = 16;
}

/// Where the caller's RBP is; the value of [`UnwindRow::rbp_rule`].
pub mod rbp {
    /// Unchanged by this frame.
    pub const SAME: u8 = 0;
    /// Saved at `CFA + rbp_offset`.
    pub const AT_CFA: u8 = 1;
    /// Not recoverable by the program (saved in another register or by an
    /// expression): RBP is unknown from here on, and a later frame whose
    /// CFA needs it stops the walk as unsupported.
    pub const UNKNOWN: u8 = 2;
}

/// One row of a binary's unwind table: from `pc` (relative to the table's
/// [`TableInfo::base`]) up to the next row's `pc`, how to find the caller.
/// Rows are sorted by `pc`; equal neighbours are merged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    /// First address the row covers, minus the table's base.
    pub pc: u32,
    /// Offset of the CFA rule (`RSP`/`RBP`/register plus this, or the
    /// address dereferenced for `DEREF_*`).
    pub cfa_offset: i32,
    /// Offset from the CFA where RBP is saved ([`rbp::AT_CFA`]).
    pub rbp_offset: i16,
    /// One of [`cfa`].
    pub cfa_rule: u8,
    /// One of [`rbp`].
    pub rbp_rule: u8,
}

/// Where one binary's rows are in the row array (`UNWIND_ROWS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableInfo {
    /// The binary's virtual address the rows' `pc` count from.
    pub base: u64,
    /// Index of the first row in the row array.
    pub first_row: u32,
    /// Number of rows (at most [`MAX_TABLE_ROWS`]).
    pub rows: u32,
    /// Nonzero, different for every table the agent loads (table ids are
    /// reused): what the program's row cache is keyed by.
    pub generation: u32,
    pub _pad: u32,
}

/// Entries of the per-CPU row cache (`ROW_CACHE`): a power of two.
pub const ROW_CACHE_ENTRIES: u32 = 512;

/// One entry of the per-CPU row cache: the row found for an address of a
/// table. Profiles repeat the stacks of the hot code sample after sample,
/// so most frames find their row here instead of searching the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowCacheEntry {
    /// [`TableInfo::generation`] of the table (0: empty).
    pub generation: u32,
    /// The address looked up, relative to the table's base.
    pub pc: u32,
    pub row: UnwindRow,
}

/// The slot of the row cache for `pc` of the table `generation`.
#[inline(always)]
pub fn row_cache_slot(generation: u32, pc: u32) -> u32 {
    let h = (pc ^ generation.rotate_left(16)).wrapping_mul(0x9e37_79b1);
    h >> (32 - ROW_CACHE_ENTRIES.trailing_zeros())
}

/// One executable mapping of a process, as the program sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecMapping {
    /// First address of the mapping.
    pub start: u64,
    /// One past its last address.
    pub end: u64,
    /// `address - bias` is the binary's own virtual address.
    pub bias: u64,
    /// Index into the table index, or [`NO_TABLE`].
    pub table: u32,
    /// One of [`mapping_kind`].
    pub kind: u32,
}

/// What kind of code an [`ExecMapping`] holds.
pub mod mapping_kind {
    /// A file-backed binary (its table may be loaded or not yet).
    pub const FILE: u32 = 0;
    /// Anonymous executable memory (JIT code): frame pointers only.
    pub const ANONYMOUS: u32 = 1;
    /// The vDSO (the agent builds its table from the process's `[vdso]`).
    pub const VDSO: u32 = 2;
}

/// Where one process's executable mappings are in the mapping array
/// (`EXEC_MAPPINGS`): `count` entries from `first`, sorted by `start`
/// (`PROC_INFO`, keyed by tgid). Both maps are preallocated, as perf-event
/// programs require before Linux 6.1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcInfo {
    pub first: u32,
    pub count: u32,
    /// Nonzero, different for every slice the agent writes (slices are
    /// reused): the program keeps a process's mappings found in earlier
    /// samples while it stays the same.
    pub generation: u32,
}

/// Mappings the program keeps per CPU between samples of one process
/// (the executable, libc, ...): most frames need no mapping search.
pub const MAPPING_CACHE: usize = 4;

/// Why a recorded user stack ended; [`UserStack::end`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StackEnd {
    /// A row said the return address is undefined: the outermost frame.
    Root = 0,
    /// A frame-pointer step found RBP = 0: the end of a frame-pointer chain.
    FramePointerEnd = 1,
    /// The next address is in no executable mapping of the process.
    NoMapping = 2,
    /// The process's mappings are not loaded yet (it is being announced).
    NoTable = 3,
    /// A row the program does not implement.
    UnsupportedRow = 4,
    /// Reading the stack failed, or a step went the wrong way (the stack
    /// pointer did not grow, a zero return address).
    BadRead = 5,
    /// [`MAX_USER_FRAMES`] reached: the stack is cut.
    DepthLimit = 6,
}

/// Number of [`StackEnd`] reasons.
pub const STACK_END_COUNT: usize = 7;

impl StackEnd {
    pub const ALL: [StackEnd; STACK_END_COUNT] = [
        StackEnd::Root,
        StackEnd::FramePointerEnd,
        StackEnd::NoMapping,
        StackEnd::NoTable,
        StackEnd::UnsupportedRow,
        StackEnd::BadRead,
        StackEnd::DepthLimit,
    ];

    pub const fn from_u32(value: u32) -> Option<StackEnd> {
        match value {
            0 => Some(StackEnd::Root),
            1 => Some(StackEnd::FramePointerEnd),
            2 => Some(StackEnd::NoMapping),
            3 => Some(StackEnd::NoTable),
            4 => Some(StackEnd::UnsupportedRow),
            5 => Some(StackEnd::BadRead),
            6 => Some(StackEnd::DepthLimit),
            _ => None,
        }
    }

    /// Whether the walk reached the outermost frame ([`StackEnd::Root`],
    /// [`StackEnd::FramePointerEnd`]); the others stopped early.
    pub const fn is_complete(self) -> bool {
        matches!(self, StackEnd::Root | StackEnd::FramePointerEnd)
    }

    /// The reason named [`StackEnd::name`] `name`.
    pub fn from_name(name: &str) -> Option<StackEnd> {
        StackEnd::ALL.into_iter().find(|end| end.name() == name)
    }

    /// Stable snake_case name used in logs, summaries and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            StackEnd::Root => "root",
            StackEnd::FramePointerEnd => "frame_pointer_end",
            StackEnd::NoMapping => "no_mapping",
            StackEnd::NoTable => "no_table",
            StackEnd::UnsupportedRow => "unsupported_row",
            StackEnd::BadRead => "bad_read",
            StackEnd::DepthLimit => "depth_limit",
        }
    }
}

/// A user stack the program unwound (`USER_STACKS_A`/`_B`, keyed by a hash
/// of its frames).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UserStack {
    /// A second, independent hash of the frames: a key whose stored stack
    /// has another `check` is a collision, counted and not merged.
    pub check: u64,
    /// Frames in use.
    pub len: u32,
    /// A [`StackEnd`].
    pub end: u32,
    /// Instruction pointer, then return addresses, leaf first.
    pub frames: [u64; MAX_USER_FRAMES],
}
