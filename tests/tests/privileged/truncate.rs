//! A binary truncated while the agent reads it never takes the agent down.
//!
//! blazesym sizes a binary, maps it and then reads the mapping; a binary
//! truncated in between raises `SIGBUS` at the first read past its new end.
//! The test makes that race happen every time: a fanotify pre-content watch
//! (Linux 6.14) on a library holds the agent's `mmap` of it, the test
//! truncates the library to the end of its loaded segments (its process
//! keeps running), then lets the `mmap` go on. The agent faults reading the
//! section headers, counts the fault and the binary, and names the
//! library's frames `module+0xOFFSET`; the recording goes on, and other
//! binaries and processes are named.

use std::{
    collections::HashMap,
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::support::*;
use profiler_agent::loss::SymbolizerDegrade;
use profiler_testkit::elf::Layout;

const LIBRARY: &str = "libdlopen_lib.so";
const SECONDS: f64 = 4.0;
const FREQUENCY: u64 = 199;

/// `FAN_PRE_ACCESS` (`<linux/fanotify.h>`, Linux 6.14): a permission event
/// before a file's content is read, by `read(2)` or, for a whole mapping,
/// by `mmap(2)`; the reader waits for the answer.
const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// How long the agent's `mmap` is held for its unwind-table read to come.
const READ_WAIT: Duration = Duration::from_secs(5);

/// The function symbols of `file` (`nm`): (address, size, name).
fn functions(file: &Path) -> Vec<(u64, u64, String)> {
    let out = Command::new("nm")
        .args(["--defined-only", "-S"])
        .arg(file)
        .output()
        .expect("nm (binutils) runs");
    assert!(out.status.success(), "nm {}: {out:?}", file.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = u64::from_str_radix(fields.next()?, 16).ok()?;
            let size = u64::from_str_radix(fields.next()?, 16).ok()?;
            let kind = fields.next()?;
            let name = fields.next()?;
            matches!(kind, "T" | "t").then(|| (address, size, name.to_string()))
        })
        .collect()
}

/// What the watch saw and did.
#[derive(Debug, Default)]
struct Held {
    /// Pre-content events answered.
    events: u64,
    /// This process read the file with `read(2)` (the unwind loader) before
    /// the truncation.
    read_first: bool,
    /// Whether this process's `mmap` of the file was held while the file
    /// was truncated, and the truncation's outcome.
    truncated: Option<Result<(), String>>,
}

/// A fanotify pre-content watch on one file that holds the first `mmap` of
/// it by this process (the agent runs in the test process), truncates the
/// file to `len` and then lets the `mmap` go on. Every other access is let
/// through at once.
struct TruncateOnMap {
    stop: Arc<AtomicBool>,
    listener: Option<JoinHandle<Held>>,
}

impl TruncateOnMap {
    /// The watch, or why the kernel cannot place it.
    fn start(path: &Path, len: u64) -> Result<Self, String> {
        // SAFETY: fanotify_init has no memory preconditions.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_PRE_CONTENT
                    | libc::FAN_CLOEXEC
                    | libc::FAN_NONBLOCK
                    | libc::FAN_REPORT_TID,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32,
            )
        };
        if fd < 0 {
            return Err(format!("fanotify_init: {}", io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fan = unsafe { OwnedFd::from_raw_fd(fd) };
        let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid fanotify descriptor and a NUL-terminated path.
        let marked = unsafe {
            libc::fanotify_mark(
                fan.as_raw_fd(),
                libc::FAN_MARK_ADD,
                FAN_PRE_ACCESS,
                libc::AT_FDCWD,
                c_path.as_ptr(),
            )
        };
        if marked != 0 {
            return Err(format!(
                "fanotify_mark FAN_PRE_ACCESS: {}",
                io::Error::last_os_error()
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let listener = {
            let (stop, path) = (stop.clone(), path.to_path_buf());
            std::thread::spawn(move || listen(fan, path, len, stop))
        };
        Ok(Self {
            stop,
            listener: Some(listener),
        })
    }

    /// Stops watching; what the watch saw.
    fn finish(mut self) -> Held {
        self.stop.store(true, Ordering::SeqCst);
        self.listener.take().unwrap().join().unwrap()
    }
}

impl Drop for TruncateOnMap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(listener) = self.listener.take() {
            let _ = listener.join();
        }
    }
}

/// The system call thread `tid` of this process is in, if it is ours and
/// blocked in one.
fn our_thread_syscall(tid: i32) -> Option<i64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn allow(fan: &OwnedFd, event_fd: OwnedFd) {
    let response = libc::fanotify_response {
        fd: event_fd.as_raw_fd(),
        response: libc::FAN_ALLOW,
    };
    // SAFETY: writes one response struct to the fanotify descriptor.
    let written = unsafe {
        libc::write(
            fan.as_raw_fd(),
            (&response as *const libc::fanotify_response).cast(),
            std::mem::size_of_val(&response),
        )
    };
    assert_eq!(written, std::mem::size_of_val(&response) as isize);
}

/// The pending events: (thread id, event file).
fn read_events(fan: &OwnedFd) -> Vec<(i32, OwnedFd)> {
    let mut buf = [0u8; 4096];
    // SAFETY: reads into a buffer of the given length.
    let n = unsafe { libc::read(fan.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    let mut events = Vec::new();
    let mut at = 0;
    while n > 0 && at + std::mem::size_of::<libc::fanotify_event_metadata>() <= n as usize {
        // SAFETY: within the bytes read; the kernel writes whole events.
        let event: libc::fanotify_event_metadata =
            unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
        if event.event_len == 0 {
            break;
        }
        if event.fd >= 0 {
            // SAFETY: the kernel opened this descriptor for us.
            events.push((event.pid, unsafe { OwnedFd::from_raw_fd(event.fd) }));
        }
        at += event.event_len as usize;
    }
    events
}

fn listen(fan: OwnedFd, path: PathBuf, len: u64, stop: Arc<AtomicBool>) -> Held {
    let mut held = Held::default();
    let mut mmap: Option<(OwnedFd, Instant)> = None;
    let mut truncation: Option<JoinHandle<Result<(), String>>> = None;
    while !stop.load(Ordering::SeqCst) || mmap.is_some() {
        let mut pollfd = libc::pollfd {
            fd: fan.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pollfd, 1, 20) };
        for (tid, event_fd) in read_events(&fan) {
            held.events += 1;
            match our_thread_syscall(tid) {
                Some(libc::SYS_mmap) if mmap.is_none() && held.truncated.is_none() => {
                    mmap = Some((event_fd, Instant::now()));
                    continue;
                }
                Some(libc::SYS_read | libc::SYS_pread64) if held.truncated.is_none() => {
                    held.read_first = true
                }
                _ => {}
            }
            allow(&fan, event_fd);
        }
        // Cut once the unwind loader has read the whole library (its table
        // is built and its frames are walked as usual: what changes is
        // their names), from another thread: the truncation is itself a
        // pre-content event, answered by this loop meanwhile.
        if let Some((_, since)) = &mmap {
            if truncation.is_none() && (held.read_first || since.elapsed() > READ_WAIT) {
                let path = path.clone();
                truncation = Some(std::thread::spawn(move || {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|file| file.set_len(len))
                        .map_err(|e| format!("truncating {}: {e}", path.display()))
                }));
            }
        }
        if truncation.as_ref().is_some_and(|t| t.is_finished()) {
            held.truncated = Some(truncation.take().unwrap().join().unwrap());
            allow(&fan, mmap.take().unwrap().0);
        }
    }
    held
}

/// The process `pid` maps `library`.
fn wait_for_library(pid: u32, library: &Path) {
    let maps = format!("/proc/{pid}/maps");
    let library = library.to_string_lossy().into_owned();
    wait_until(
        Duration::from_secs(10),
        &format!("process {pid} maps {library}"),
        || std::fs::read_to_string(&maps).is_ok_and(|m| m.contains(&library)),
    );
}

/// The library is truncated between the agent mapping it and reading it:
/// the agent faults, counts it, keeps recording, and names the library's
/// frames `libdlopen_lib.so+0xOFFSET` with the right offsets; the
/// workload's own frames and another process's are still named.
#[test]
fn library_truncated_while_the_agent_maps_it_is_counted_and_skipped() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let built = workload("dlopen_main");
    let built_library = built.with_file_name(LIBRARY);
    // dlopen_main loads the library from its own directory: both copied,
    // so the copy of the library can be cut.
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("dlopen_main");
    let library = dir.path().join(LIBRARY);
    std::fs::copy(&built, &exe).unwrap();
    std::fs::copy(&built_library, &library).unwrap();
    let original = std::fs::read(&library).unwrap();
    let elf = Layout::of(&original).expect("the library is an x86-64 ELF");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    assert!(
        elf.section_headers >= elf.loaded_end.next_multiple_of(page),
        "the section headers must lie in a page past the cut for the read to fault: \
         headers at {:#x}, loaded part ends at {:#x}",
        elf.section_headers,
        elf.loaded_end
    );

    let chain = Workload::spawn(&workload("chain"), &["10"]);
    let w = Workload::spawn_command(
        Command::new(&exe)
            .arg(format!("{}", SECONDS * 3.0))
            .stdin(Stdio::null()),
    );
    wait_for_library(w.pid(), &library);
    let watch = match TruncateOnMap::start(&library, elf.loaded_end) {
        Ok(watch) => watch,
        Err(reason) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: the kernel cannot hold a mapping of a file: {reason}");
            return;
        }
        Err(reason) => panic!("the kernel cannot hold a mapping of a file: {reason}"),
    };
    let faults = profiler_agent::sigbus::faults();
    let (rec, _) = record_with(
        &options(vec![w.pid(), chain.pid()], SECONDS, FREQUENCY),
        || (),
    );
    let faults = profiler_agent::sigbus::faults() - faults;
    let held = watch.finish();
    let cut_to = std::fs::metadata(&library).unwrap().len();

    let s = &rec.symbolizer_stats;
    let unwind_failures = rec.unwind.as_ref().map(|u| u.build_failures.clone());
    eprintln!(
        "library {} bytes cut to {cut_to}; {held:?}; SIGBUS faults absorbed: {faults}; \
         binaries unreadable: {}; panics: {}; unwind table failures: {unwind_failures:?}",
        original.len(),
        s[SymbolizerDegrade::BinariesUnreadable],
        s[SymbolizerDegrade::Panics],
    );
    assert_eq!(
        held.truncated,
        Some(Ok(())),
        "the agent's mmap of the library was not held while it was cut ({held:?})"
    );
    assert!(
        held.read_first,
        "the agent did not read the library's unwind table before the cut ({held:?})"
    );
    assert_eq!(cut_to, elf.loaded_end);
    assert!(faults >= 1, "no SIGBUS absorbed");
    assert_eq!(
        s[SymbolizerDegrade::BinariesUnreadable],
        1,
        "only the cut library is unreadable: {s:?}"
    );
    assert_eq!(s[SymbolizerDegrade::Panics], 0);
    assert_eq!(rec.profile.total(), rec.samples, "no sample dropped");

    // The library's frames: `libdlopen_lib.so+0xOFFSET`, each offset in its
    // code and naming, in the uncut library, lib_entry then the hot function.
    let (text_offset, text_address, text_size) = elf.text;
    let symbols = functions(&built_library);
    let address_of = |frame: &str| -> Option<u64> {
        let hex = frame.strip_prefix(&format!("{LIBRARY}+0x"))?;
        let offset = u64::from_str_radix(hex, 16).ok()?;
        assert!(
            (text_offset..text_offset + text_size).contains(&offset),
            "{frame} is outside the library's code"
        );
        Some(offset - text_offset + text_address)
    };
    let function_at = |address: u64| {
        symbols
            .iter()
            .find(|(start, size, _)| (*start..start + size).contains(&address))
            .map(|(_, _, name)| name.as_str())
    };
    let stacks = stacks_of(&rec.profile, "dlopen_main");
    let total: u64 = stacks.iter().map(|(_, c)| c).sum();
    assert!(total >= 100, "too few samples: {total}");
    let mut seen: HashMap<Vec<&str>, u64> = HashMap::new();
    let mut expected = 0;
    for (frames, count) in &stacks {
        for frame in frames {
            assert!(
                !frame.starts_with("lib_") && *frame != "[unnamed]",
                "a frame named from the cut library: {frame}\n{}",
                dump(&rec.profile, "dlopen_main")
            );
        }
        let Some(at) = frames.windows(2).position(|w| w == ["main", "run_library"]) else {
            continue;
        };
        let in_library: Vec<&str> = frames[at + 2..]
            .iter()
            .take_while(|f| f.starts_with(LIBRARY))
            .map(|f| address_of(f).and_then(function_at).unwrap_or("?"))
            .collect();
        if matches!(
            in_library.as_slice(),
            ["lib_entry"] | ["lib_entry", "lib_hot_a" | "lib_hot_b"]
        ) {
            expected += count;
        }
        *seen.entry(in_library).or_default() += count;
    }
    eprintln!(
        "dlopen_main: {total} samples; library frames named through the uncut copy: {seen:?}"
    );
    assert!(
        expected * 100 >= total * 90,
        "main;run_library;{LIBRARY}+0x.. (lib_entry[;lib_hot_a|b]) in {expected} of {total} samples\n{}",
        dump(&rec.profile, "dlopen_main")
    );

    let (matching, total) = count_where(&rec.profile, "chain", |f| {
        has_chain(f, &["main", "outer", "inner_hot"])
    });
    eprintln!("chain: main;outer;inner_hot in {matching} of {total} samples");
    assert!(total >= 100, "too few chain samples: {total}");
    assert!(
        matching * 100 >= total * 90,
        "main;outer;inner_hot in {matching} of {total} samples\n{}",
        dump(&rec.profile, "chain")
    );
}
