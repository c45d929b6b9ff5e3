//! The Python frame walk (see `profiler_common::python`): after the native
//! walk of a sample of a Python process, the thread state whose
//! `thread_id` (its `pthread_t`, the thread's FS base on x86-64) is the
//! sampled thread's is found in the interpreter's list, and its frames are
//! appended to the user stack, innermost first.
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};
use profiler_common::{
    python::{
        layout, python_frame, PyProc, FRAME_OWNED_BY_CSTACK, MAX_PYTHON_FRAMES, MAX_PYTHON_THREADS,
        PYTHON_ENTRY_BIT,
    },
    Counter,
};

use crate::{
    bump,
    unwind::{push_frame, read_user_word, UnwindState},
};

/// Why a Python walk recorded nothing, or less than the whole chain.
pub enum Outcome {
    /// Frames were appended (possibly none: the thread runs no Python).
    Walked,
    /// No thread state of the interpreter is the sampled thread's (a thread
    /// Python did not start, or one that never ran Python).
    NoThreadState,
    /// A read failed or the frames did not fit: the chain is cut.
    Cut,
}

#[inline(always)]
fn at(base: u64, offset: u16) -> u64 {
    base.wrapping_add(offset as u64)
}

/// The sampled thread's FS base: `task_struct.thread.fsbase`, at
/// `fsbase_offset` (from the kernel's BTF).
#[inline(always)]
fn current_fsbase(fsbase_offset: u32) -> Option<u64> {
    // SAFETY: the current task, read with a checked helper.
    unsafe {
        let task = bpf_get_current_task();
        bpf_probe_read_kernel((task + fsbase_offset as u64) as *const u64).ok()
    }
}

/// Appends the sampled thread's Python frames to `state.stack`.
#[inline(always)]
pub fn walk(state: &mut UnwindState, proc: &PyProc, fsbase_offset: u32) -> Outcome {
    let Some(fsbase) = current_fsbase(fsbase_offset) else {
        return Outcome::NoThreadState;
    };
    let Some(interp) = read_user_word(proc.interpreters_head) else {
        return Outcome::Cut;
    };
    let Some(mut tstate) = read_user_word(at(interp, proc.interp_threads_head)) else {
        return Outcome::Cut;
    };
    let mut found = 0;
    for _ in 0..MAX_PYTHON_THREADS {
        if tstate == 0 {
            break;
        }
        if read_user_word(at(tstate, proc.tstate_thread_id)) == Some(fsbase) {
            found = tstate;
            break;
        }
        tstate = match read_user_word(at(tstate, proc.tstate_next)) {
            Some(next) => next,
            None => return Outcome::Cut,
        };
    }
    if found == 0 {
        return Outcome::NoThreadState;
    }
    let Some(mut frame) = read_user_word(at(found, proc.tstate_frame)) else {
        return Outcome::Cut;
    };
    if proc.cframe_current_frame != u16::MAX && frame != 0 {
        frame = match read_user_word(at(frame, proc.cframe_current_frame)) {
            Some(frame) => frame,
            None => return Outcome::Cut,
        };
    }
    // 3.12+: a frame is pushed once the next one shows whether it was the
    // first of its eval call (the next is a shim).
    let mut pending: u64 = 0;
    for _ in 0..MAX_PYTHON_FRAMES {
        if frame == 0 {
            break;
        }
        let Some(code) = read_user_word(at(frame, proc.frame_code)) else {
            return Outcome::Cut;
        };
        let Some(previous) = read_user_word(at(frame, proc.frame_previous)) else {
            return Outcome::Cut;
        };
        let Some(instr) = read_user_word(at(frame, proc.frame_instr)) else {
            return Outcome::Cut;
        };
        let owner = if proc.layout == layout::FRAME_OBJECTS {
            0
        } else {
            match read_user_word(at(frame, proc.frame_owner)) {
                Some(word) => word as u8,
                None => return Outcome::Cut,
            }
        };
        frame = previous;
        if proc.layout == layout::SHIM_FRAMES && owner == FRAME_OWNED_BY_CSTACK {
            if pending != 0 && !push_frame(state, pending | PYTHON_ENTRY_BIT) {
                return Outcome::Cut;
            }
            pending = 0;
            continue;
        }
        let index = if proc.layout == layout::FRAME_OBJECTS {
            // `f_lasti`: an `int`, -1 before the first instruction.
            let lasti = instr as u32 as i32;
            if lasti < 0 {
                0
            } else {
                lasti as u64
            }
        } else {
            instr.wrapping_sub(at(code, proc.code_adaptive)) / 2
        };
        let entry = match proc.layout {
            layout::FRAME_OBJECTS => true,
            layout::IS_ENTRY => owner != 0,
            _ => false,
        };
        let word = python_frame(code, index, entry);
        if proc.layout == layout::SHIM_FRAMES {
            if pending != 0 && !push_frame(state, pending) {
                return Outcome::Cut;
            }
            pending = word;
        } else if !push_frame(state, word) {
            return Outcome::Cut;
        }
    }
    if pending != 0 && !push_frame(state, pending) {
        return Outcome::Cut;
    }
    if frame != 0 {
        return Outcome::Cut;
    }
    Outcome::Walked
}

/// Counts what a walk did.
#[inline(always)]
pub fn count_outcome(outcome: Outcome) {
    match outcome {
        Outcome::Walked => bump(Counter::PythonStacks),
        Outcome::NoThreadState => bump(Counter::PythonNoThreadState),
        Outcome::Cut => {
            bump(Counter::PythonStacks);
            bump(Counter::PythonCut);
        }
    }
}
