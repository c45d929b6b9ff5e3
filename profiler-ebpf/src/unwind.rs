//! The user-stack unwinder: walks a user stack from the sampled registers
//! with the unwind tables the agent loaded (see `profiler_common::unwind`),
//! and with checked frame-pointer steps where no table covers the code.
//!
//! A walk is split over tail calls of `unwind_user` (at most
//! [`FRAMES_PER_CALL`] frames per call): every program stays small enough
//! for the verifier of Linux 5.15 (no `bpf_loop` there), and the chain of
//! calls stays under the kernel's limit of 32 tail calls. The walk's state
//! lives in the per-CPU `UNWIND_STATE`, so a call continues where the
//! previous one stopped.
use aya_ebpf::helpers::generated;
use profiler_common::unwind::{
    cfa, mapping_kind, rbp, row_cache_slot, ExecMapping, ProcInfo, StackEnd, TableInfo, UnwindRow,
    UserStack, EXACT_PC_BIT, MAPPING_CACHE, MAPPING_SEARCH_STEPS, MAX_USER_FRAMES, NO_TABLE,
    ROW_SEARCH_STEPS,
};

use aya_ebpf::maps::PerCpuArray;
use profiler_common::unwind::RowCacheEntry;

use crate::{EXEC_MAPPINGS, UNWIND_ROWS, UNWIND_TABLES};

/// Frames one call of `unwind_user` walks before it tail-calls itself.
pub const FRAMES_PER_CALL: u32 = 16;
/// Calls of `unwind_user` per sample: enough for [`MAX_USER_FRAMES`].
pub const MAX_UNWIND_CALLS: u32 = (MAX_USER_FRAMES as u32).div_ceil(FRAMES_PER_CALL);

/// DWARF register numbers on x86-64.
pub const REG_RBP: usize = 6;
pub const REG_RSP: usize = 7;
pub const REG_RIP: usize = 16;
/// Registers the walk tracks: DWARF 0..=16.
pub const REGS: usize = 17;

/// Every register is known (the leaf frame, or the context a signal
/// frame saved): register-based CFA rules apply.
pub const FLAG_ALL_REGS: u32 = 1;
/// The instruction pointer is exact (the leaf, or the interrupted
/// instruction of a signal frame), not a return address: look it up as is
/// rather than minus one.
pub const FLAG_EXACT_PC: u32 = 2;
/// RBP could not be recovered in an earlier frame.
pub const FLAG_RBP_UNKNOWN: u32 = 4;

/// The walk of one sample, in the per-CPU `UNWIND_STATE`.
#[repr(C)]
pub struct UnwindState {
    /// The frames so far; inserted as is into the user-stack map.
    pub stack: UserStack,
    /// Registers of the frame being unwound (DWARF numbering).
    pub regs: [u64; REGS],
    /// Scratch space for a signal frame's saved registers.
    pub saved: [u64; REGS],
    /// Running hash of the frames (the map key).
    pub hash: u64,
    /// What the walk is for: one of [`purpose`].
    pub purpose: u32,
    /// How the native walk ended (a `StackEnd`), kept across the tail call
    /// to the Python walk.
    pub native_end: u32,
    /// Off-CPU: when the thread left the CPU (`bpf_ktime_get_ns`).
    pub off_cpu_ns: u64,
    /// Off-CPU: key of the wait's kernel stack in `OFF_CPU_KERNEL_STACKS`.
    pub off_cpu_kernel_stack: u64,
    /// A waker's walk: the `task_struct` address of the thread it wakes.
    pub wakee: u64,
    pub tgid: u32,
    pub kernel_stack_id: i32,
    /// The map set the sample goes to (read once, in `profile`).
    pub set: u32,
    /// Calls of `unwind_user` so far.
    pub calls: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// The process's mappings in `EXEC_MAPPINGS` (`count` 0: none loaded,
    /// frame pointers only).
    pub proc_first: u32,
    pub proc_count: u32,
    /// Whether the walk asked for the process's mappings to be read again.
    pub refresh: u32,
    /// [`ProcInfo::generation`] of the process's slice.
    pub proc_generation: u32,
    /// Mappings found in this walk and, while the same process with the
    /// same slice is sampled on this CPU, in earlier ones (`end` 0: empty):
    /// most frames skip the mapping search.
    pub mappings: [ExecMapping; MAPPING_CACHE],
    /// The process and slice `mappings` belong to.
    pub cached_tgid: u32,
    pub cached_generation: u32,
    /// The entry of `mappings` replaced next.
    pub next_mapping: u32,
    /// Off-CPU: how the thread left the CPU (`thread_state`).
    pub thread_state: u32,
    /// Steps found lately on this CPU, by address: the frames of the hot
    /// code repeat sample after sample, and a hit skips the mapping, the
    /// table and the row cache (lines that are cold by the next sample).
    pub frames: [FrameCacheEntry; FRAME_CACHE],
    /// User memory copied in one read: `window_len` bytes from
    /// `window_start` (0: empty; emptied at the start of each walk).
    pub window_start: u64,
    pub window_len: u64,
    pub window: [u64; WINDOW_WORDS],
}

/// What a walk is for ([`UnwindState::purpose`]).
pub mod purpose {
    /// A CPU sample: counted in the set's count map.
    pub const CPU_SAMPLE: u32 = 0;
    /// A thread leaving the CPU: remembered with its stacks until it
    /// comes back.
    pub const OFF_CPU: u32 = 1;
    /// A thread waking a remembered thread of its process: its stack is
    /// kept with the woken thread's wait.
    pub const WAKER: u32 = 2;
}

/// Words of user memory the walk copies at once ([`UnwindState::window`]):
/// a page. The frames of a stack lie close together, and one read of the
/// rest of a page costs about what one read of a word does (the helper's
/// fixed cost dominates), so most frames are read from the copy.
pub const WINDOW_WORDS: usize = 512;
const WINDOW_BYTES: u64 = (WINDOW_WORDS * 8) as u64;
const PAGE_SIZE: u64 = 4096;

/// Entries of the walk's frame cache ([`UnwindState::frames`]): a power of
/// two.
pub const FRAME_CACHE: usize = 32;

/// What a step of one address of one process's slice does: its row, or
/// `cfa::NONE` for a frame-pointer step. A slice's mappings and their
/// tables stay the same while the slice lives (the agent writes a new slice,
/// with a new generation, to change them, and keeps a table while a slice
/// points at it), so an entry holds as long as its generation matches.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FrameCacheEntry {
    /// The address looked up (`pc`, not the return address).
    pub pc: u64,
    /// [`ProcInfo::generation`] of the slice (0: empty).
    pub generation: u32,
    pub row: UnwindRow,
}

/// What one step did.
pub enum Step {
    /// The caller's registers are in `regs`: walk on.
    Next,
    /// The stack ends here.
    End(StackEnd),
}

const HASH_K1: u64 = 0x9e37_79b9_7f4a_7c15;
const HASH_K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
/// Seed of the check hash (the key hash starts from 0).
pub const CHECK_SEED: u64 = 0x1656_67b1_9e37_79f9;

#[inline(always)]
fn mix(h: u64, x: u64, k: u64, r: u32) -> u64 {
    (h.rotate_left(r) ^ x).wrapping_mul(k)
}

/// The final avalanche of a 64-bit hash (MurmurHash3's `fmix64`).
#[inline(always)]
pub fn finish_hash(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Two consecutive words of user memory.
#[inline(always)]
fn read_user_pair(state: &mut UnwindState, addr: u64) -> Option<[u64; 2]> {
    Some([
        read_user(state, addr)?,
        read_user(state, addr.wrapping_add(8))?,
    ])
}

/// A word of user memory: from the walk's window, which is refilled from
/// `addr` to the end of its page when `addr` lies outside it (the window
/// never spans two pages, so a read fails only where a read of the word
/// itself would). Unaligned words are read on their own.
#[inline(always)]
fn read_user(state: &mut UnwindState, addr: u64) -> Option<u64> {
    if addr & 7 != 0 {
        return read_user_word(addr);
    }
    let mut offset = addr.wrapping_sub(state.window_start);
    if offset >= state.window_len {
        let len = PAGE_SIZE - (addr & (PAGE_SIZE - 1));
        let len = if len > WINDOW_BYTES {
            WINDOW_BYTES
        } else {
            len
        };
        // SAFETY: the helper writes at most `len` <= WINDOW_BYTES bytes into
        // the window.
        let ret = unsafe {
            generated::bpf_probe_read_user(
                state.window.as_mut_ptr().cast(),
                len as u32,
                addr as *const core::ffi::c_void,
            )
        };
        if ret != 0 {
            state.window_len = 0;
            return None;
        }
        state.window_start = addr;
        state.window_len = len;
        offset = 0;
    }
    let index = (offset >> 3) as usize;
    if index >= WINDOW_WORDS {
        return None;
    }
    Some(state.window[index])
}

#[inline(always)]
pub fn read_user_word(addr: u64) -> Option<u64> {
    let mut value: u64 = 0;
    // SAFETY: the helper writes at most 8 bytes into `value`.
    let ret = unsafe {
        generated::bpf_probe_read_user(
            (&mut value as *mut u64).cast(),
            8,
            addr as *const core::ffi::c_void,
        )
    };
    (ret == 0).then_some(value)
}

/// Appends a word (a Python frame) to the stack; false when it is full.
#[inline(always)]
pub fn push_frame(state: &mut UnwindState, word: u64) -> bool {
    let len = state.stack.len as usize;
    if len >= MAX_USER_FRAMES {
        return false;
    }
    state.stack.frames[len] = word;
    state.stack.len = len as u32 + 1;
    state.hash = mix(state.hash, word, HASH_K1, 5);
    state.stack.check = mix(state.stack.check, word, HASH_K2, 7);
    true
}

/// Records the current frame and moves `state.regs` to its caller.
#[inline(always)]
pub fn step(state: &mut UnwindState, cache: &PerCpuArray<RowCacheEntry>) -> Step {
    let len = state.stack.len as usize;
    if len >= MAX_USER_FRAMES {
        return Step::End(StackEnd::DepthLimit);
    }
    let ip = state.regs[REG_RIP];
    if ip == 0 {
        return Step::End(StackEnd::FramePointerEnd);
    }
    state.stack.frames[len] = if len > 0 && state.flags & FLAG_EXACT_PC != 0 {
        ip | EXACT_PC_BIT
    } else {
        ip
    };
    state.stack.len = len as u32 + 1;
    state.hash = mix(state.hash, ip, HASH_K1, 5);
    state.stack.check = mix(state.stack.check, ip, HASH_K2, 7);

    if state.proc_count == 0 {
        return frame_pointer_step(state);
    }
    // A return address points after the call: the call itself is one byte
    // before (it may be the last instruction of a function).
    let pc = if state.flags & FLAG_EXACT_PC != 0 {
        ip
    } else {
        ip - 1
    };
    let slot = frame_cache_slot(pc);
    let cached = state.frames[slot];
    if cached.pc == pc && cached.generation == state.proc_generation {
        return apply_row(state, &cached.row, ip);
    }
    let Some(mapping) = mapping_of(state, pc) else {
        return Step::End(StackEnd::NoMapping);
    };
    let row = if mapping.kind == mapping_kind::ANONYMOUS {
        jit_row(state, ip)
    } else if mapping.table == NO_TABLE {
        None
    } else {
        find_row(cache, mapping, pc)
    };
    // No row: a frame-pointer step.
    let row = row.unwrap_or_default();
    state.frames[slot] = FrameCacheEntry {
        pc,
        generation: state.proc_generation,
        row,
    };
    apply_row(state, &row, ip)
}

/// The bytes before a return address into CPython's perf trampoline
/// (`-X perf`, 3.12 and 3.13): `sub $8, %rsp; call *%rcx`, read as the top
/// six bytes of the word that ends at the return address.
const CPYTHON_TRAMPOLINE_CALL: u64 = 0xd1ff_08ec_8348;

/// The row of a frame in anonymous executable memory (JIT code), which has
/// no call-frame information: CPython's perf trampolines keep no frame
/// pointer, but their one shape is known (`CFA = RSP + 16`, RBP untouched);
/// everything else takes a checked frame-pointer step (V8, HotSpot with
/// `-XX:+PreserveFramePointer`).
#[inline(always)]
fn jit_row(state: &UnwindState, ip: u64) -> Option<UnwindRow> {
    if state.flags & FLAG_EXACT_PC != 0 {
        return None;
    }
    let code = read_user_word(ip.wrapping_sub(8))?;
    (code >> 16 == CPYTHON_TRAMPOLINE_CALL).then_some(UnwindRow {
        pc: 0,
        cfa_offset: 16,
        rbp_offset: 0,
        cfa_rule: cfa::RSP,
        rbp_rule: rbp::SAME,
    })
}

#[inline(always)]
fn frame_cache_slot(pc: u64) -> usize {
    let h = (pc ^ (pc >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> (64 - FRAME_CACHE.trailing_zeros())) as usize & (FRAME_CACHE - 1)
}

/// The caller by the frame-pointer convention (`[RBP]` = the caller's RBP,
/// `[RBP + 8]` = the return address), checked: the frame must lie above
/// the stack pointer and the chain must move up the stack.
#[inline(always)]
fn frame_pointer_step(state: &mut UnwindState) -> Step {
    let sp = state.regs[REG_RSP];
    let bp = state.regs[REG_RBP];
    if bp == 0 || state.flags & FLAG_RBP_UNKNOWN != 0 {
        return Step::End(StackEnd::FramePointerEnd);
    }
    if bp < sp || bp & 7 != 0 {
        return Step::End(StackEnd::BadRead);
    }
    let Some([next_bp, ra]) = read_user_pair(state, bp) else {
        return Step::End(StackEnd::BadRead);
    };
    if ra == 0 {
        return Step::End(StackEnd::FramePointerEnd);
    }
    state.regs[REG_RSP] = bp + 16;
    state.regs[REG_RBP] = next_bp;
    state.regs[REG_RIP] = ra;
    state.flags &= !(FLAG_ALL_REGS | FLAG_EXACT_PC);
    Step::Next
}

#[inline(always)]
fn apply_row(state: &mut UnwindState, row: &UnwindRow, ip: u64) -> Step {
    let sp = state.regs[REG_RSP];
    let bp = state.regs[REG_RBP];
    let offset = row.cfa_offset as i64 as u64;
    let rule = row.cfa_rule;
    let cfa = if rule == cfa::RSP {
        sp.wrapping_add(offset)
    } else if rule == cfa::RBP {
        if state.flags & FLAG_RBP_UNKNOWN != 0 {
            return Step::End(StackEnd::UnsupportedRow);
        }
        bp.wrapping_add(offset)
    } else if rule == cfa::NONE {
        return frame_pointer_step(state);
    } else if rule == cfa::END {
        return Step::End(StackEnd::Root);
    } else if rule == cfa::PLT_11 || rule == cfa::PLT_10 {
        let threshold = if rule == cfa::PLT_11 { 11 } else { 10 };
        sp + 8 + if ip & 15 >= threshold { 8 } else { 0 }
    } else if rule == cfa::DEREF_RSP
        || rule == cfa::DEREF_RBP
        || rule == cfa::DEREF_RSP_8
        || rule == cfa::DEREF_RBP_8
    {
        let base = if rule == cfa::DEREF_RSP || rule == cfa::DEREF_RSP_8 {
            sp
        } else if state.flags & FLAG_RBP_UNKNOWN != 0 {
            return Step::End(StackEnd::UnsupportedRow);
        } else {
            bp
        };
        let plus = if rule == cfa::DEREF_RSP_8 || rule == cfa::DEREF_RBP_8 {
            8
        } else {
            0
        };
        match read_user(state, base.wrapping_add(offset)) {
            Some(value) => value.wrapping_add(plus),
            None => return Step::End(StackEnd::BadRead),
        }
    } else if rule == cfa::SIGNAL {
        return signal_frame(state);
    } else if rule >= cfa::REG_BASE && ((rule - cfa::REG_BASE) as usize) < REGS {
        if state.flags & FLAG_ALL_REGS == 0 {
            return Step::End(StackEnd::UnsupportedRow);
        }
        let reg = (rule - cfa::REG_BASE) as usize;
        state.regs[reg].wrapping_add(offset)
    } else {
        return Step::End(StackEnd::UnsupportedRow);
    };
    if cfa <= sp {
        return Step::End(StackEnd::BadRead);
    }
    // The usual frame saves RBP right below the return address: one read.
    let ra = if row.rbp_rule == rbp::AT_CFA && row.rbp_offset == -16 {
        let Some([saved_bp, ra]) = read_user_pair(state, cfa - 16) else {
            return Step::End(StackEnd::BadRead);
        };
        state.regs[REG_RBP] = saved_bp;
        state.flags &= !FLAG_RBP_UNKNOWN;
        ra
    } else {
        let Some(ra) = read_user(state, cfa - 8) else {
            return Step::End(StackEnd::BadRead);
        };
        ra
    };
    if row.rbp_rule == rbp::AT_CFA && row.rbp_offset != -16 {
        match read_user(state, cfa.wrapping_add(row.rbp_offset as i64 as u64)) {
            Some(value) => {
                state.regs[REG_RBP] = value;
                state.flags &= !FLAG_RBP_UNKNOWN;
            }
            None => return Step::End(StackEnd::BadRead),
        }
    } else if row.rbp_rule == rbp::UNKNOWN {
        state.flags |= FLAG_RBP_UNKNOWN;
    }
    if ra == 0 {
        return Step::End(StackEnd::Root);
    }
    state.regs[REG_RSP] = cfa;
    state.regs[REG_RIP] = ra;
    state.flags &= !(FLAG_ALL_REGS | FLAG_EXACT_PC);
    Step::Next
}

/// `__restore_rt`: RSP points at the kernel's `ucontext` (the handler's
/// return popped `pretcode`); its `sigcontext` at +40 holds every register
/// of the interrupted code: r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx,
/// rsp, rip.
#[inline(always)]
fn signal_frame(state: &mut UnwindState) -> Step {
    let sp = state.regs[REG_RSP];
    // SAFETY: the helper writes at most size_of_val(&state.saved) bytes.
    let ret = unsafe {
        generated::bpf_probe_read_user(
            state.saved.as_mut_ptr().cast(),
            (REGS * 8) as u32,
            (sp + 40) as *const core::ffi::c_void,
        )
    };
    if ret != 0 {
        return Step::End(StackEnd::BadRead);
    }
    let s = &state.saved;
    let new_sp = s[15];
    if new_sp <= sp {
        return Step::End(StackEnd::BadRead);
    }
    // The trampoline's own frame is named by its exact address.
    let top = (state.stack.len as usize).wrapping_sub(1);
    if top < MAX_USER_FRAMES {
        state.stack.frames[top] |= EXACT_PC_BIT;
    }
    // sigcontext order -> DWARF numbering.
    state.regs = [
        s[13], s[12], s[14], s[11], s[9], s[8], s[10], s[15], s[0], s[1], s[2], s[3], s[4], s[5],
        s[6], s[7], s[16],
    ];
    state.flags = (state.flags & !FLAG_RBP_UNKNOWN) | FLAG_ALL_REGS | FLAG_EXACT_PC;
    Step::Next
}

/// The mapping of the sampled process that contains `pc`: from the walk's
/// cache, else searched (and cached).
#[inline(always)]
fn mapping_of(state: &mut UnwindState, pc: u64) -> Option<ExecMapping> {
    for i in 0..MAPPING_CACHE {
        let m = &state.mappings[i];
        if pc >= m.start && pc < m.end {
            return Some(*m);
        }
    }
    let mapping = find_mapping(state.proc_first, state.proc_count, pc)?;
    let slot = state.next_mapping as usize % MAPPING_CACHE;
    state.mappings[slot] = mapping;
    state.next_mapping = state.next_mapping.wrapping_add(1);
    Some(mapping)
}

/// Starts a walk of process `tgid` whose mappings are the slice `info`:
/// keeps the cached mappings if they are of the same slice.
#[inline(always)]
pub fn set_process(state: &mut UnwindState, tgid: u32, info: Option<ProcInfo>) {
    let info = info.unwrap_or_default();
    state.proc_first = info.first;
    state.proc_count = info.count;
    state.proc_generation = info.generation;
    if state.cached_tgid != tgid || state.cached_generation != info.generation {
        for i in 0..MAPPING_CACHE {
            state.mappings[i].end = 0;
        }
        state.cached_tgid = tgid;
        state.cached_generation = info.generation;
    }
}

/// The mapping of the process that contains `pc`: binary search over its
/// slice of `EXEC_MAPPINGS`, sorted by start.
#[inline(always)]
fn find_mapping(first: u32, count: u32, pc: u64) -> Option<ExecMapping> {
    let mut lo: u32 = 0;
    let mut hi: u32 = count;
    for _ in 0..MAPPING_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        let mapping = EXEC_MAPPINGS.get(first.wrapping_add(mid))?;
        if mapping.start <= pc {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == 0 {
        return None;
    }
    let mapping = *EXEC_MAPPINGS.get(first.wrapping_add(lo - 1))?;
    (pc < mapping.end).then_some(mapping)
}

/// The last row of the mapping's table at or below `pc`: from the per-CPU
/// row cache, else by a binary search (whose answer is cached).
#[inline(always)]
fn find_row(
    cache: &PerCpuArray<RowCacheEntry>,
    mapping: ExecMapping,
    pc: u64,
) -> Option<UnwindRow> {
    let table: TableInfo = *UNWIND_TABLES.get(mapping.table)?;
    let vaddr = pc.wrapping_sub(mapping.bias);
    if vaddr < table.base || vaddr - table.base > u32::MAX as u64 {
        return None;
    }
    let target = (vaddr - table.base) as u32;
    if table.generation == 0 {
        // Unloaded: no rows.
        return None;
    }
    let cached = cache.get_ptr_mut(row_cache_slot(table.generation, target));
    if let Some(entry) = cached {
        // SAFETY: per-CPU value; only this program touches it on this CPU.
        let entry = unsafe { &mut *entry };
        if entry.generation == table.generation && entry.pc == target {
            return Some(entry.row);
        }
        let row = search_rows(&table, target)?;
        entry.generation = table.generation;
        entry.pc = target;
        entry.row = row;
        return Some(row);
    }
    search_rows(&table, target)
}

/// Binary search of a table's rows for the last one at or below `target`.
#[inline(always)]
fn search_rows(table: &TableInfo, target: u32) -> Option<UnwindRow> {
    let mut lo: u32 = 0;
    let mut hi: u32 = table.rows;
    for _ in 0..ROW_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        let row = UNWIND_ROWS.get(table.first_row.wrapping_add(mid))?;
        if row.pc <= target {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == 0 {
        return None;
    }
    UNWIND_ROWS
        .get(table.first_row.wrapping_add(lo - 1))
        .copied()
}
