//! CPython's frames without any flag in the interpreter (3.10 to 3.13).
//!
//! - Detection: a process maps `libpython3.N.so` or runs a `python3.N`
//!   executable; the binary's `_PyRuntime` symbol locates the interpreter's
//!   state. The offsets the eBPF walk and the naming need come from the
//!   interpreter itself where it publishes them (`_Py_DebugOffsets` at the
//!   start of `_PyRuntime`, 3.13) and from a table for 3.10-3.12 (read from
//!   the debug information of release builds of each version). Any other
//!   version is named once in the log and counted, never guessed.
//! - Naming: the program records (code object, instruction index) per
//!   Python frame; the agent reads the code object from the process's
//!   memory (its type must be the interpreter's `PyCode_Type`) and names the
//!   frame `qualname (file.py:line)_[py]`, the line from the code object's
//!   line table.
//! - Placement: each `_PyEval_EvalFrameDefault` native frame is replaced by
//!   the Python frames its call ran (native frames of C extensions stay).
use std::{
    collections::HashMap,
    fs::File,
    path::Path,
    sync::{Mutex, OnceLock},
};

use object::{Object, ObjectSegment, ObjectSymbol};
use profiler_common::python::{layout, PyProc, PythonFrame};

/// Suffix of Python frames.
pub const PYTHON_SUFFIX: &str = "_[py]";
/// The native frame Python frames replace.
pub const EVAL_FRAME: &str = "_PyEval_EvalFrameDefault";

/// Where the fields the agent reads live in one CPython version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub minor: u8,
    /// What the eBPF walk reads (without the process's addresses).
    pub walk: PyProc,
    pub co_filename: u16,
    pub co_name: u16,
    /// `u16::MAX` before 3.11 (the name is used).
    pub co_qualname: u16,
    pub co_firstlineno: u16,
    pub co_linetable: u16,
    /// `sizeof(PyASCIIObject)`: where an ASCII string's characters start.
    pub ascii_data: u16,
    /// `sizeof(PyCompactUnicodeObject)`: the same for other strings.
    pub compact_data: u16,
}

const NONE: u16 = u16::MAX;
/// `ob_type` of every object.
const OB_TYPE: u64 = 8;
/// `PyVarObject.ob_size`, `PyBytesObject.ob_sval`.
const OB_SIZE: u64 = 16;
const BYTES_DATA: u64 = 32;
/// `PyASCIIObject.length` and `.state`.
const UNICODE_LENGTH: u64 = 16;
const UNICODE_STATE: u64 = 32;

fn walk(layout: u32, fields: [u16; 10]) -> PyProc {
    let [threads_head, next, thread_id, frame, current, previous, code, instr, owner, adaptive] =
        fields;
    PyProc {
        interpreters_head: 0,
        layout,
        interp_threads_head: threads_head,
        tstate_next: next,
        tstate_thread_id: thread_id,
        tstate_frame: frame,
        cframe_current_frame: current,
        frame_previous: previous,
        frame_code: code,
        frame_instr: instr,
        frame_owner: owner,
        code_adaptive: adaptive,
        _pad: 0,
    }
}

/// Offsets of `_PyRuntime.interpreters.head` by minor version (3.10-3.12).
fn runtime_interpreters_head(minor: u8) -> u64 {
    if minor == 10 {
        32
    } else {
        40
    }
}

/// The table for versions that do not publish their offsets (x86-64
/// release builds, read from each version's debug information).
pub fn table(minor: u8) -> Option<Offsets> {
    Some(match minor {
        10 => Offsets {
            minor,
            walk: walk(
                layout::FRAME_OBJECTS,
                [8, 8, 176, 24, NONE, 24, 32, 96, NONE, 0],
            ),
            co_filename: 104,
            co_name: 112,
            co_qualname: NONE,
            co_firstlineno: 40,
            co_linetable: 120,
            ascii_data: 48,
            compact_data: 72,
        },
        11 => Offsets {
            minor,
            walk: walk(layout::IS_ENTRY, [16, 8, 152, 56, 8, 48, 32, 56, 68, 184]),
            co_filename: 112,
            co_name: 120,
            co_qualname: 128,
            co_firstlineno: 72,
            co_linetable: 136,
            ascii_data: 48,
            compact_data: 72,
        },
        12 => Offsets {
            minor,
            walk: walk(layout::SHIM_FRAMES, [72, 8, 136, 56, 0, 8, 0, 56, 70, 192]),
            co_filename: 112,
            co_name: 120,
            co_qualname: 128,
            co_firstlineno: 68,
            co_linetable: 136,
            ascii_data: 40,
            compact_data: 56,
        },
        _ => return None,
    })
}

/// `_Py_DebugOffsets` (3.13): the cookie, then the offsets as u64 words.
const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";
pub const DEBUG_OFFSETS_BYTES: usize = 352;

/// The offsets a 3.13 interpreter publishes at the start of `_PyRuntime`.
pub fn from_debug_offsets(bytes: &[u8]) -> Result<Offsets, String> {
    if bytes.len() < DEBUG_OFFSETS_BYTES || &bytes[..8] != DEBUG_COOKIE {
        return Err("no _Py_DebugOffsets at _PyRuntime".into());
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    let version = word(8);
    let (major, minor) = ((version >> 24) & 0xff, (version >> 16) & 0xff);
    if major != 3 || minor != 13 {
        return Err(format!("_Py_DebugOffsets of version {major}.{minor}"));
    }
    if word(16) != 0 {
        return Err("a free-threaded build".into());
    }
    let field = |at: usize| -> Result<u16, String> {
        u16::try_from(word(at)).map_err(|_| format!("offset {} out of range", word(at)))
    };
    let walk = walk(
        layout::SHIM_FRAMES,
        [
            field(72)?,  // interpreter_state.threads_head
            field(168)?, // thread_state.next
            field(192)?, // thread_state.thread_id
            field(184)?, // thread_state.current_frame
            NONE,
            field(232)?, // interpreter_frame.previous
            field(240)?, // interpreter_frame.executable
            field(248)?, // interpreter_frame.instr_ptr
            field(264)?, // interpreter_frame.owner
            field(344)?, // code_object.co_code_adaptive
        ],
    );
    Ok(Offsets {
        minor: 13,
        walk: PyProc {
            // runtime_state.interpreters_head, relative to _PyRuntime.
            interpreters_head: word(40),
            ..walk
        },
        co_filename: field(280)?,
        co_name: field(288)?,
        co_qualname: field(296)?,
        co_firstlineno: field(312)?,
        co_linetable: field(304)?,
        ascii_data: 40,
        compact_data: 56,
    })
}

/// The minor version and ABI flags (`d` debug, `t` free-threaded, `m`) of
/// a CPython binary from its file name (`libpython3.12.so.1.0`,
/// `python3.12`, `libpython3.13td.so`).
pub fn version_of(file_name: &str) -> Option<(u8, &str)> {
    let rest = file_name
        .strip_prefix("libpython3.")
        .or_else(|| file_name.strip_prefix("python3."))?;
    let digits = rest.chars().take_while(char::is_ascii_digit).count();
    let after = &rest[digits..];
    let flags_len = after
        .chars()
        .take_while(|c| matches!(c, 'd' | 't' | 'm'))
        .count();
    let (flags, tail) = after.split_at(flags_len);
    if digits == 0 || !(tail.is_empty() || tail.starts_with(".so")) {
        return None;
    }
    Some((rest[..digits].parse().ok()?, flags))
}

/// What a CPython binary says of itself.
#[derive(Clone, Debug)]
pub struct PythonBinary {
    pub minor: u8,
    /// Addresses in the file's own address space.
    pub runtime_vaddr: u64,
    pub code_type_vaddr: u64,
    /// Loadable segments: (file offset, virtual address, size).
    pub segments: Vec<(u64, u64, u64)>,
}

/// Reads `_PyRuntime` and `PyCode_Type` from a CPython binary.
pub fn read_binary(file: &File, minor: u8) -> Option<PythonBinary> {
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let find = |name: &str| {
        elf.dynamic_symbols()
            .chain(elf.symbols())
            .find(|s| s.is_definition() && s.name() == Ok(name))
            .map(|s| s.address())
    };
    let segments = elf
        .segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (offset, s.address(), size)
        })
        .collect();
    Some(PythonBinary {
        minor,
        runtime_vaddr: find("_PyRuntime")?,
        code_type_vaddr: find("PyCode_Type")?,
        segments,
    })
}

/// A Python process the agent reads frames of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PythonProcess {
    pub offsets: Offsets,
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// Address of `PyCode_Type` in the process.
    pub code_type: u64,
}

impl PythonProcess {
    /// What the eBPF program gets.
    pub fn kernel_view(&self) -> PyProc {
        let head = if self.offsets.minor == 13 {
            self.offsets.walk.interpreters_head
        } else {
            runtime_interpreters_head(self.offsets.minor)
        };
        PyProc {
            interpreters_head: self.runtime + head,
            ..self.offsets.walk
        }
    }
}

/// What detection found in one process.
#[derive(Debug, PartialEq, Eq)]
pub enum Detected {
    Python(PythonProcess),
    /// A CPython the agent does not read (the version, and why).
    Unsupported(String),
}

/// Reads `buf.len()` bytes of process `pid` at `addr`.
pub fn read_memory(pid: u32, addr: u64, buf: &mut [u8]) -> bool {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one local buffer we own, of the length given.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    n == buf.len() as isize
}

fn read_u64(pid: u32, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    read_memory(pid, addr, &mut b).then(|| u64::from_le_bytes(b))
}

fn read_u32(pid: u32, addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    read_memory(pid, addr, &mut b).then(|| u32::from_le_bytes(b))
}

/// Longest string read (code points).
const MAX_STRING: u64 = 1024;
/// Longest line table read (bytes).
const MAX_LINETABLE: u64 = 1 << 16;

/// A `str` object's text.
fn read_str(pid: u32, offsets: &Offsets, addr: u64) -> Option<String> {
    let length = read_u64(pid, addr + UNICODE_LENGTH)?.min(MAX_STRING);
    let state = read_u32(pid, addr + UNICODE_STATE)?;
    let kind = (state >> 2) & 7;
    let compact = state & (1 << 5) != 0;
    let ascii = state & (1 << 6) != 0;
    if !compact {
        return None;
    }
    let (data, width) = if ascii {
        (addr + offsets.ascii_data as u64, 1)
    } else {
        (addr + offsets.compact_data as u64, kind as u64)
    };
    if !matches!(width, 1 | 2 | 4) {
        return None;
    }
    let mut bytes = vec![0u8; (length * width) as usize];
    if !read_memory(pid, data, &mut bytes) {
        return None;
    }
    Some(match width {
        1 if ascii => String::from_utf8_lossy(&bytes).into_owned(),
        1 => bytes.iter().map(|b| char::from(*b)).collect(),
        2 => bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .map(|c| char::from_u32(c).unwrap_or('\u{fffd}'))
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .map(|c| char::from_u32(c).unwrap_or('\u{fffd}'))
            .collect(),
    })
}

/// A `bytes` object's contents.
fn read_bytes(pid: u32, addr: u64) -> Option<Vec<u8>> {
    let len = read_u64(pid, addr + OB_SIZE)?.min(MAX_LINETABLE);
    let mut bytes = vec![0u8; len as usize];
    read_memory(pid, addr + BYTES_DATA, &mut bytes).then_some(bytes)
}

/// What naming needs of one code object.
#[derive(Clone, Debug)]
pub struct CodeInfo {
    pub name: String,
    pub file: String,
    pub first_line: u32,
    pub linetable: Vec<u8>,
}

/// Reads the code object at `code`; `None` if it is not one.
pub fn read_code(pid: u32, process: &PythonProcess, code: u64) -> Option<CodeInfo> {
    let o = &process.offsets;
    if read_u64(pid, code + OB_TYPE)? != process.code_type {
        return None;
    }
    let at = |field: u16| read_u64(pid, code + field as u64);
    let name_field = if o.co_qualname != NONE {
        o.co_qualname
    } else {
        o.co_name
    };
    let name = read_str(pid, o, at(name_field)?)?;
    let path = read_str(pid, o, at(o.co_filename)?)?;
    let file = Path::new(&path)
        .file_name()
        .map_or(path.clone(), |f| f.to_string_lossy().into_owned());
    let first_line = read_u32(pid, code + o.co_firstlineno as u64)?;
    let linetable = read_bytes(pid, at(o.co_linetable)?)?;
    Some(CodeInfo {
        name,
        file,
        first_line,
        linetable,
    })
}

/// The line of the instruction at `index` (code units): 3.10's table of
/// (bytes, line delta) pairs.
pub fn line_310(linetable: &[u8], first_line: u32, index: u32) -> Option<u32> {
    let target = index as i64 * 2;
    let (mut start, mut line) = (0i64, first_line as i64);
    for pair in linetable.chunks_exact(2) {
        let end = start + pair[0] as i64;
        let delta = pair[1] as i8;
        let this = if delta == -128 {
            None
        } else {
            line += delta as i64;
            Some(line)
        };
        if target >= start && target < end {
            return this.and_then(|l| u32::try_from(l).ok());
        }
        start = end;
    }
    None
}

/// The line of the instruction at `index` (code units): the location table
/// of 3.11 and later.
pub fn line_311(linetable: &[u8], first_line: u32, index: u32) -> Option<u32> {
    let mut bytes = linetable.iter().copied().peekable();
    let varint = |bytes: &mut std::iter::Peekable<std::iter::Copied<std::slice::Iter<u8>>>| {
        let (mut value, mut shift) = (0u32, 0);
        loop {
            let b = bytes.next()? as u32;
            value |= (b & 63) << shift;
            shift += 6;
            if b & 64 == 0 || shift > 30 {
                return Some(value);
            }
        }
    };
    let (mut addr, mut line) = (0u32, first_line as i64);
    while let Some(first) = bytes.next() {
        if first & 0x80 == 0 {
            return None;
        }
        let code = (first >> 3) & 15;
        let length = (first & 7) as u32 + 1;
        let this = match code {
            15 => None,
            // Long form (line delta, then end line and columns), or no
            // columns: a signed varint line delta first.
            13 | 14 => {
                let v = varint(&mut bytes)?;
                line += if v & 1 != 0 {
                    -((v >> 1) as i64)
                } else {
                    (v >> 1) as i64
                };
                if code == 14 {
                    for _ in 0..3 {
                        varint(&mut bytes)?;
                    }
                }
                Some(line)
            }
            10..=12 => {
                line += (code - 10) as i64;
                bytes.next()?;
                bytes.next()?;
                Some(line)
            }
            _ => {
                bytes.next()?;
                Some(line)
            }
        };
        if index >= addr && index < addr + length {
            return this.and_then(|l| u32::try_from(l).ok());
        }
        addr += length;
    }
    None
}

/// The frame name of a Python frame.
pub fn frame_name(minor: u8, code: &CodeInfo, index: u32) -> String {
    let line = if minor == 10 {
        line_310(&code.linetable, code.first_line, index)
    } else {
        line_311(&code.linetable, code.first_line, index)
    };
    let name = crate::names::sanitize(&code.name);
    let file = crate::names::sanitize(&code.file);
    match line {
        Some(line) => format!("{name} ({file}:{line}){PYTHON_SUFFIX}"),
        None => format!("{name} ({file}){PYTHON_SUFFIX}"),
    }
}

/// Whether a frame is one of CPython's `-X perf` trampolines, named from
/// its perf map (`py::work:/srv/app.py_[j]`).
pub fn is_perf_trampoline(frame: &str) -> bool {
    frame.starts_with("py::") && frame.ends_with(crate::names::JIT_SUFFIX)
}

/// Python frames (innermost first, as recorded) grouped by the native eval
/// call that ran them; each group outermost first, groups innermost first.
pub fn eval_calls(frames: &[(PythonFrame, String)]) -> Vec<Vec<String>> {
    let mut calls = Vec::new();
    let mut current = Vec::new();
    for (frame, name) in frames {
        current.push(name.clone());
        if frame.entry {
            current.reverse();
            calls.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        current.reverse();
        calls.push(current);
    }
    calls
}

/// Puts Python frames into a native stack (root first): the innermost
/// call's frames replace the innermost `_PyEval_EvalFrameDefault`, and so
/// on outwards; calls left over (the native walk stopped early) go at the
/// root.
pub fn splice(native: Vec<String>, calls: Vec<Vec<String>>) -> Vec<String> {
    if calls.is_empty() {
        return native;
    }
    let evals: Vec<usize> = native
        .iter()
        .enumerate()
        .filter(|(_, f)| f.as_str() == EVAL_FRAME)
        .map(|(i, _)| i)
        .collect();
    // Innermost eval frame (nearest the leaf) first.
    let mut by_position: HashMap<usize, Vec<String>> = HashMap::new();
    let mut calls = calls.into_iter();
    for &at in evals.iter().rev() {
        match calls.next() {
            Some(call) => {
                by_position.insert(at, call);
            }
            None => break,
        }
    }
    let mut leftover: Vec<Vec<String>> = calls.collect();
    leftover.reverse();
    let mut out: Vec<String> = leftover.into_iter().flatten().collect();
    for (i, frame) in native.into_iter().enumerate() {
        match by_position.remove(&i) {
            Some(call) => out.extend(call),
            None => out.push(frame),
        }
    }
    out
}

/// Code objects read per process, bounded.
#[derive(Default)]
pub struct PythonNamer {
    codes: HashMap<(u32, u64), Option<CodeInfo>>,
}

/// Code objects cached before the cache is emptied.
const MAX_CODES: usize = 1 << 16;

impl PythonNamer {
    /// Names the Python frames of a sample of `pid`.
    pub fn name(
        &mut self,
        pid: u32,
        process: &PythonProcess,
        frames: &[PythonFrame],
    ) -> Vec<(PythonFrame, String)> {
        if self.codes.len() > MAX_CODES {
            self.codes.clear();
        }
        frames
            .iter()
            .map(|f| {
                let code = self
                    .codes
                    .entry((pid, f.code))
                    .or_insert_with(|| read_code(pid, process, f.code));
                let name = match code {
                    Some(code) => frame_name(process.offsets.minor, code, f.instr_index),
                    None => format!("[python: unreadable code object]{PYTHON_SUFFIX}"),
                };
                (*f, name)
            })
            .collect()
    }

    /// Forgets what was read of processes that are gone.
    pub fn forget(&mut self, gone: &[u32]) {
        if !gone.is_empty() {
            self.codes.retain(|(pid, _), _| !gone.contains(pid));
        }
    }

    pub fn clear(&mut self) {
        self.codes.clear();
    }
}

/// Processes found running a CPython the agent does not read.
static UNSUPPORTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Processes found so far running a CPython the agent does not read.
pub fn unsupported_processes() -> u64 {
    UNSUPPORTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts a process running a CPython the agent does not read, and logs
/// each version (binary) once.
pub fn log_unsupported_once(what: &str) -> bool {
    UNSUPPORTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    static SEEN: OnceLock<Mutex<std::collections::HashSet<String>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    if seen.len() < 64 && seen.insert(what.to_string()) {
        tracing::warn!("{what}: its Python frames are not read");
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_trampolines_are_told_apart() {
        assert!(is_perf_trampoline("py::work:/srv/app.py_[j]"));
        assert!(!is_perf_trampoline("JS:*work /srv/app.js:3_[j]"));
        assert!(!is_perf_trampoline("work (app.py:3)_[py]"));
    }

    #[test]
    fn versions_from_file_names() {
        assert_eq!(version_of("libpython3.12.so.1.0"), Some((12, "")));
        assert_eq!(version_of("python3.10"), Some((10, "")));
        assert_eq!(version_of("libpython3.13d.so.1.0"), Some((13, "d")));
        assert_eq!(version_of("python3.13t"), Some((13, "t")));
        assert_eq!(version_of("python3.11-config"), None);
        assert_eq!(version_of("python3"), None);
        assert_eq!(version_of("libpython3.so"), None);
    }

    #[test]
    fn lines_of_the_310_table() {
        // Bytes 0-5 at line 10 (first+0), 6-9 at 12, 10-11 no line, 12-13 at 11.
        let table = [6u8, 0, 4, 2, 2, 0x80, 2, (-1i8) as u8];
        assert_eq!(line_310(&table, 10, 0), Some(10));
        assert_eq!(line_310(&table, 10, 2), Some(10));
        assert_eq!(line_310(&table, 10, 3), Some(12));
        assert_eq!(line_310(&table, 10, 5), None);
        assert_eq!(line_310(&table, 10, 6), Some(11));
        assert_eq!(line_310(&table, 10, 9), None);
    }

    #[test]
    fn lines_of_the_311_location_table() {
        let entry = |code: u8, len: u8| 0x80 | (code << 3) | (len - 1);
        let table = [
            // 2 units, no column info, line +1 (svarint 2).
            entry(13, 2),
            2,
            // 3 units, one-line form, line +2, two column bytes.
            entry(12, 3),
            5,
            9,
            // 1 unit, short form (same line), one byte.
            entry(3, 1),
            0x11,
            // 2 units, long form: line -3 (svarint 7), three more varints.
            entry(14, 2),
            7,
            0,
            1,
            2,
            // 1 unit without location.
            entry(15, 1),
        ];
        assert_eq!(line_311(&table, 20, 0), Some(21));
        assert_eq!(line_311(&table, 20, 1), Some(21));
        assert_eq!(line_311(&table, 20, 2), Some(23));
        assert_eq!(line_311(&table, 20, 4), Some(23));
        assert_eq!(line_311(&table, 20, 5), Some(23));
        assert_eq!(line_311(&table, 20, 6), Some(20));
        assert_eq!(line_311(&table, 20, 8), None);
        assert_eq!(line_311(&table, 20, 9), None);
    }

    fn frame(entry: bool) -> PythonFrame {
        PythonFrame {
            code: 0x1000,
            instr_index: 0,
            entry,
        }
    }

    #[test]
    fn python_frames_replace_their_eval_calls() {
        // Innermost first: leaf (entry), mid, outer (entry).
        let frames = vec![
            (frame(true), "leaf".to_string()),
            (frame(false), "mid".to_string()),
            (frame(true), "outer".to_string()),
        ];
        let calls = eval_calls(&frames);
        assert_eq!(calls, vec![vec!["leaf"], vec!["outer", "mid"]]);
        let native: Vec<String> = ["main", EVAL_FRAME, "call_c", EVAL_FRAME, "compress"]
            .map(String::from)
            .into();
        assert_eq!(
            splice(native, calls.clone()),
            ["main", "outer", "mid", "call_c", "leaf", "compress"]
        );
        // A native walk that stopped early: the outer call goes at the root.
        let cut: Vec<String> = ["[stack cut]", EVAL_FRAME, "leaf_c"]
            .map(String::from)
            .into();
        assert_eq!(
            splice(cut, calls),
            ["outer", "mid", "[stack cut]", "leaf", "leaf_c"]
        );
    }

    #[test]
    fn debug_offsets_of_313_are_read_and_checked() {
        let mut bytes = vec![0u8; DEBUG_OFFSETS_BYTES];
        bytes[..8].copy_from_slice(DEBUG_COOKIE);
        let put =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(&mut bytes, 8, 0x030d_00f0);
        for (at, v) in [
            (40, 632),
            (72, 7344),
            (168, 8),
            (192, 152),
            (184, 72),
            (232, 8),
            (240, 0),
            (248, 56),
            (264, 70),
            (344, 200),
            (280, 112),
            (288, 120),
            (296, 128),
            (312, 68),
            (304, 136),
        ] {
            put(&mut bytes, at, v);
        }
        let o = from_debug_offsets(&bytes).unwrap();
        assert_eq!(o.walk.interp_threads_head, 7344);
        assert_eq!(o.walk.frame_owner, 70);
        assert_eq!(o.walk.cframe_current_frame, NONE);
        let p = PythonProcess {
            offsets: o,
            runtime: 0x10_0000,
            code_type: 0,
        };
        assert_eq!(p.kernel_view().interpreters_head, 0x10_0000 + 632);
        put(&mut bytes, 8, 0x030e_0000);
        assert!(from_debug_offsets(&bytes).is_err());
        bytes[0] = b'y';
        assert!(from_debug_offsets(&bytes).is_err());
    }
}
