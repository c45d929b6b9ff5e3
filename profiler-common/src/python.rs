//! CPython's frames, read by the eBPF program without any flag in the
//! interpreter: the agent tells the program, per Python process, where the
//! interpreter's state lives and the offsets of the few fields the walk
//! reads ([`PyProc`], map `PY_PROCS`); the program finds the sampled
//! thread's thread state, walks its frames and appends one word per Python
//! frame to the user stack, after the native frames ([`python_frame`]).
//! The agent names them from the code objects.

/// How the interpreter lays out frames: [`PyProc::layout`].
pub mod layout {
    /// 3.10: `PyFrameObject`s linked by `f_back`; `f_lasti` counts code
    /// units; each frame runs in its own `_PyEval_EvalFrameDefault` call.
    pub const FRAME_OBJECTS: u32 = 1;
    /// 3.11: `_PyInterpreterFrame`s reached through the thread's C frame;
    /// `is_entry` marks the first frame of a `_PyEval_EvalFrameDefault`
    /// call.
    pub const IS_ENTRY: u32 = 2;
    /// 3.12 and 3.13: `_PyInterpreterFrame`s; a frame owned by the C stack
    /// (`owner` 3) is the shim below the first frame of each
    /// `_PyEval_EvalFrameDefault` call, not a Python frame.
    pub const SHIM_FRAMES: u32 = 3;
}

/// `owner` of a `_PyInterpreterFrame` that belongs to the C stack (3.12+).
pub const FRAME_OWNED_BY_CSTACK: u8 = 3;

/// What the program needs to walk one Python process's frames. Offsets in
/// bytes; `u16::MAX`: the field does not exist in this version.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProc {
    /// Address of `_PyRuntime.interpreters.head` in the process.
    pub interpreters_head: u64,
    /// One of [`layout`].
    pub layout: u32,
    /// `PyInterpreterState.threads.head`.
    pub interp_threads_head: u16,
    /// `PyThreadState.next`.
    pub tstate_next: u16,
    /// `PyThreadState.thread_id` (the thread's `pthread_t`).
    pub tstate_thread_id: u16,
    /// `PyThreadState.frame` (3.10), `.cframe` (3.11, 3.12) or
    /// `.current_frame` (3.13).
    pub tstate_frame: u16,
    /// `_PyCFrame.current_frame` (3.11, 3.12); `u16::MAX` when
    /// `tstate_frame` points at the frame itself.
    pub cframe_current_frame: u16,
    /// `f_back` / `previous`.
    pub frame_previous: u16,
    /// `f_code` / `f_executable`.
    pub frame_code: u16,
    /// `f_lasti` (3.10, an `int` of code units), `prev_instr` (3.11, 3.12)
    /// or `instr_ptr` (3.13).
    pub frame_instr: u16,
    /// `is_entry` (3.11) or `owner` (3.12+), one byte.
    pub frame_owner: u16,
    /// `PyCodeObject.co_code_adaptive` (3.11+): the bytecode.
    pub code_adaptive: u16,
    pub _pad: u16,
}

/// Entries of the `PY_PROCS` map.
pub const MAX_PYTHON_PROCESSES: u32 = 1024;
/// Threads of one interpreter searched for the sampled one.
pub const MAX_PYTHON_THREADS: u32 = 32;
/// Python frames recorded per sample (within the user stack's room).
pub const MAX_PYTHON_FRAMES: u32 = 48;

/// Marks a user-stack word as a Python frame.
pub const PYTHON_FRAME_BIT: u64 = 1 << 62;
/// The frame is the first one its `_PyEval_EvalFrameDefault` call ran: the
/// frames from the previous entry up to this one replace that native frame.
pub const PYTHON_ENTRY_BIT: u64 = 1 << 61;
const INSTR_SHIFT: u32 = 47;
/// Largest instruction index kept; larger ones are clamped.
pub const MAX_INSTR_INDEX: u64 = (1 << (61 - INSTR_SHIFT)) - 1;
const CODE_MASK: u64 = (1 << INSTR_SHIFT) - 1;

/// One Python frame as a user-stack word: the code object's address, the
/// index of the instruction being run (in code units) and whether the frame
/// is the first of its native eval call.
#[inline(always)]
pub fn python_frame(code: u64, instr_index: u64, entry: bool) -> u64 {
    let instr = if instr_index > MAX_INSTR_INDEX {
        MAX_INSTR_INDEX
    } else {
        instr_index
    };
    PYTHON_FRAME_BIT
        | if entry { PYTHON_ENTRY_BIT } else { 0 }
        | (instr << INSTR_SHIFT)
        | (code & CODE_MASK)
}

/// A decoded Python frame word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PythonFrame {
    pub code: u64,
    pub instr_index: u32,
    pub entry: bool,
}

impl PythonFrame {
    /// The Python frame a user-stack word holds, if it holds one.
    pub fn decode(word: u64) -> Option<Self> {
        (word & PYTHON_FRAME_BIT != 0).then_some(PythonFrame {
            code: word & CODE_MASK,
            instr_index: ((word >> INSTR_SHIFT) & MAX_INSTR_INDEX) as u32,
            entry: word & PYTHON_ENTRY_BIT != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let w = python_frame(0x7f12_3456_7890, 321, true);
        assert_eq!(
            PythonFrame::decode(w),
            Some(PythonFrame {
                code: 0x7f12_3456_7890,
                instr_index: 321,
                entry: true
            })
        );
        let clamped = PythonFrame::decode(python_frame(0x1000, 1 << 20, false)).unwrap();
        assert_eq!(clamped.instr_index as u64, MAX_INSTR_INDEX);
        assert!(!clamped.entry);
        assert_eq!(PythonFrame::decode(0x7f12_3456_7890), None);
    }
}
