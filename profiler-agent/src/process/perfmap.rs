//! Names that JIT compilers publish for their code in perf map files:
//! `/tmp/perf-PID.map`, one `START SIZE NAME` line per piece of code (hex
//! numbers, `0x` optional), written by CPython's `-X perf`, Node's
//! `--perf-basic-prof`, the JVM's `Compiler.perfmap` and others.
//!
//! The file is the one the process sees: its `/tmp` under
//! `/proc/PID/root`, named with the pid of the process's own pid namespace
//! (the last `NSpid` of `/proc/PID/status`), so processes in containers are
//! named too. The file is opened inside that root (a symlink in it cannot
//! point the agent at a host file), must be a regular file owned by the
//! process's user or root, and is untrusted: a line that does not parse is
//! counted and skipped.
//!
//! Files only grow while a JIT runs: each is read once when a process's
//! anonymous code is first named and then from where the previous read
//! stopped, at most once a window and [`PerfMapLimits::max_read_bytes`] at
//! a time. A later entry replaces the entries it overlaps (code freed and
//! compiled again at the same place). Memory is bounded by
//! [`PerfMapLimits::max_bytes`] over all processes; entries past it are
//! dropped and counted.
use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    fs::File,
    io::{Read, Seek, SeekFrom},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

/// Bounds on reading perf maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PerfMapLimits {
    /// Memory the entries of all processes may take (names plus a fixed
    /// overhead per entry, [`ENTRY_OVERHEAD`]).
    pub max_bytes: usize,
    /// Bytes of one file read in one window; the rest is read in the next.
    pub max_read_bytes: u64,
}

impl Default for PerfMapLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 20,
            max_read_bytes: 8 << 20,
        }
    }
}

/// Bytes counted for an entry besides its name: its key, its value and the
/// tree's share of a node.
pub const ENTRY_OVERHEAD: usize = 64;
/// Longest name kept; longer ones are cut (a JVM signature can run long).
const MAX_NAME: usize = 512;
/// Processes whose maps are kept at once; the one named longest ago goes.
const MAX_PROCESSES: usize = 4096;

/// What reading perf maps did, for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PerfMapStats {
    /// Entries held now, over all processes.
    pub entries: u64,
    /// Lines that were not `START SIZE NAME`, skipped.
    pub malformed_lines: u64,
    /// Entries not kept because the memory bound was reached.
    pub dropped_entries: u64,
    /// Files refused: not a regular file, or owned by another user.
    pub refused_files: u64,
}

struct Entry {
    end: u64,
    name: Box<str>,
}

/// One process's perf map.
struct PerfMap {
    /// Device and inode of the file read (a new file starts over).
    identity: (u64, u64),
    /// Bytes of the file consumed (up to the last whole line).
    read_to: u64,
    entries: BTreeMap<u64, Entry>,
    bytes: usize,
    /// Window of the last refresh.
    checked: u64,
    /// Window of the last lookup (for eviction).
    used: u64,
}

/// The perf maps of the processes being named.
pub struct PerfMaps {
    proc_root: PathBuf,
    limits: PerfMapLimits,
    maps: HashMap<u32, PerfMap>,
    /// Processes with no readable map, by the window they were checked in.
    absent: HashMap<u32, u64>,
    bytes: usize,
    window: u64,
    stats: PerfMapStats,
}

/// One parsed line.
fn parse_line(line: &str) -> Option<(u64, u64, &str)> {
    let line = line.trim_end_matches(['\r', '\n']);
    let (start, rest) = line.split_once(' ')?;
    let (size, name) = rest.split_once(' ')?;
    let hex = |s: &str| {
        let s = s.strip_prefix("0x").unwrap_or(s);
        u64::from_str_radix(s, 16).ok()
    };
    let (start, size) = (hex(start)?, hex(size)?);
    let name = name.trim();
    if size == 0 || name.is_empty() {
        return None;
    }
    start.checked_add(size)?;
    Some((start, size, name))
}

/// The pid of process `pid` in its own pid namespace: the last `NSpid`
/// field of its status (`pid` itself on kernels without the line).
fn namespace_pid(status: &str, pid: u32) -> u32 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|ids| ids.split_whitespace().last())
        .and_then(|id| id.parse().ok())
        .unwrap_or(pid)
}

/// The real user id of a process from its status.
fn process_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|id| id.parse().ok())
}

/// Opens `relative` (no leading `/`) inside the directory `root` as if it
/// were `/`: symlinks resolve within it. Falls back to refusing every
/// symlink where `openat2` is missing (Linux before 5.6).
fn open_in_root(root: &Path, relative: &str) -> std::io::Result<File> {
    let root_c = CString::new(root.as_os_str().as_encoded_bytes())?;
    let rel_c = CString::new(relative)?;
    // SAFETY: plain syscalls on NUL-terminated strings; each returned fd is
    // owned exactly once.
    unsafe {
        let dir = libc::open(
            root_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if dir < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let dir = OwnedFd::from_raw_fd(dir);
        let mut how: libc::open_how = std::mem::zeroed();
        how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        let fd = libc::syscall(
            libc::SYS_openat2,
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            rel_c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        );
        if fd >= 0 {
            return Ok(File::from_raw_fd(fd as i32));
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ENOSYS) {
            return Err(error);
        }
        // No openat2: refuse a symlink anywhere on the path.
        let mut current = dir;
        let parts: Vec<&str> = relative.split('/').filter(|p| !p.is_empty()).collect();
        for (i, part) in parts.iter().enumerate() {
            let part_c = CString::new(*part)?;
            let last = i + 1 == parts.len();
            let flags = libc::O_NOFOLLOW
                | libc::O_CLOEXEC
                | if last {
                    libc::O_RDONLY
                } else {
                    libc::O_PATH | libc::O_DIRECTORY
                };
            let fd = libc::openat(
                std::os::fd::AsRawFd::as_raw_fd(&current),
                part_c.as_ptr(),
                flags,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            current = OwnedFd::from_raw_fd(fd);
        }
        Ok(File::from(current))
    }
}

impl PerfMaps {
    pub fn new(proc_root: impl Into<PathBuf>, limits: PerfMapLimits) -> Self {
        Self {
            proc_root: proc_root.into(),
            limits,
            maps: HashMap::new(),
            absent: HashMap::new(),
            bytes: 0,
            window: 1,
            stats: PerfMapStats::default(),
        }
    }

    /// A new drain window: maps may be read again, and those of processes
    /// not named for a while are forgotten.
    pub fn start_window(&mut self) {
        self.window += 1;
        let window = self.window;
        // Ten windows (100 s at the default interval) without a lookup.
        let stale: Vec<u32> = self
            .maps
            .iter()
            .filter(|(_, m)| m.used + 10 < window)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in stale {
            self.forget(pid);
        }
        self.absent.retain(|_, checked| *checked + 1 >= window);
    }

    /// Drops everything (the memory watchdog's step): maps are read again
    /// from the start when needed.
    pub fn clear(&mut self) {
        self.maps.clear();
        self.absent.clear();
        self.bytes = 0;
        self.stats.entries = 0;
    }

    fn forget(&mut self, pid: u32) {
        if let Some(map) = self.maps.remove(&pid) {
            self.bytes -= map.bytes;
            self.stats.entries -= map.entries.len() as u64;
        }
    }

    pub fn stats(&self) -> PerfMapStats {
        self.stats.clone()
    }

    /// The name the process's perf map gives `addr`, reading the map first
    /// if it has not been read (or grown) this window.
    pub fn lookup(&mut self, pid: u32, addr: u64) -> Option<&str> {
        let window = self.window;
        let stale = match self.maps.get(&pid) {
            Some(map) => map.checked != window,
            None => self.absent.get(&pid) != Some(&window),
        };
        let found = self.maps.get(&pid).and_then(|m| find(m, addr)).is_some();
        if !found && stale {
            self.refresh(pid);
        }
        let map = self.maps.get_mut(&pid)?;
        map.used = window;
        find(map, addr)
    }

    /// Reads what was appended to the process's map since the last read.
    fn refresh(&mut self, pid: u32) {
        let window = self.window;
        if let Some(map) = self.maps.get_mut(&pid) {
            map.checked = window;
        }
        let Some((mut file, identity)) = self.open(pid) else {
            self.forget(pid);
            self.absent.insert(pid, window);
            return;
        };
        if self.maps.get(&pid).is_some_and(|m| m.identity != identity) {
            // Another file (the pid was reused, or the JIT started over).
            self.forget(pid);
        }
        if !self.maps.contains_key(&pid) && self.maps.len() >= MAX_PROCESSES {
            if let Some(oldest) = self
                .maps
                .iter()
                .min_by_key(|(_, m)| m.used)
                .map(|(p, _)| *p)
            {
                self.forget(oldest);
            }
        }
        let map = self.maps.entry(pid).or_insert_with(|| PerfMap {
            identity,
            read_to: 0,
            entries: BTreeMap::new(),
            bytes: 0,
            checked: window,
            used: window,
        });
        let len = file.metadata().map_or(0, |m| m.len());
        if len <= map.read_to {
            return;
        }
        let want = (len - map.read_to).min(self.limits.max_read_bytes);
        let mut text = Vec::with_capacity(want as usize);
        if file.seek(SeekFrom::Start(map.read_to)).is_err()
            || file.take(want).read_to_end(&mut text).is_err()
        {
            return;
        }
        // Whole lines only: a line being written is read next time, unless
        // it alone is longer than a read.
        let consumed = match text.iter().rposition(|b| *b == b'\n') {
            Some(at) => at + 1,
            None if want == self.limits.max_read_bytes => text.len(),
            None => return,
        };
        map.read_to += consumed as u64;
        let before = (map.bytes, map.entries.len());
        for line in text[..consumed].split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let parsed = std::str::from_utf8(line).ok().and_then(parse_line);
            let Some((start, size, name)) = parsed else {
                self.stats.malformed_lines += 1;
                continue;
            };
            let name: Box<str> = match name.char_indices().nth(MAX_NAME) {
                Some((at, _)) => name[..at].into(),
                None => name.into(),
            };
            let cost = ENTRY_OVERHEAD + name.len();
            if self.bytes - before.0 + map.bytes + cost > self.limits.max_bytes {
                self.stats.dropped_entries += 1;
                continue;
            }
            let end = start + size;
            // Entries this one overlaps are gone: the code there was replaced.
            let overlapped: Vec<u64> = map
                .entries
                .range(..end)
                .rev()
                .take_while(|(s, e)| e.end > start || **s >= start)
                .filter(|(_, e)| e.end > start)
                .map(|(s, _)| *s)
                .collect();
            for s in overlapped {
                if let Some(old) = map.entries.remove(&s) {
                    map.bytes -= ENTRY_OVERHEAD + old.name.len();
                }
            }
            map.entries.insert(start, Entry { end, name });
            map.bytes += cost;
        }
        self.bytes = self.bytes - before.0 + map.bytes;
        self.stats.entries = self.stats.entries - before.1 as u64 + map.entries.len() as u64;
    }

    /// The process's perf map file, checked, with its identity.
    fn open(&mut self, pid: u32) -> Option<(File, (u64, u64))> {
        let proc_dir = self.proc_root.join(pid.to_string());
        let status = std::fs::read_to_string(proc_dir.join("status")).ok()?;
        let ns_pid = namespace_pid(&status, pid);
        let file = open_in_root(&proc_dir.join("root"), &format!("tmp/perf-{ns_pid}.map")).ok()?;
        let meta = file.metadata().ok()?;
        let owner_ok = meta.uid() == 0 || Some(meta.uid()) == process_uid(&status);
        if !meta.is_file() || !owner_ok {
            self.stats.refused_files += 1;
            return None;
        }
        Some((file, (meta.dev(), meta.ino())))
    }
}

fn find(map: &PerfMap, addr: u64) -> Option<&str> {
    let (_, entry) = map.entries.range(..=addr).next_back()?;
    (addr < entry.end).then_some(&*entry.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lines_of_every_writer_parse() {
        // CPython -X perf, Node --perf-basic-prof, the JVM's Compiler.perfmap.
        assert_eq!(
            parse_line("7f590c7ed000 b py::fib:/tmp/x.py"),
            Some((0x7f59_0c7e_d000, 0xb, "py::fib:/tmp/x.py"))
        );
        assert_eq!(
            parse_line("3ef0a4c0 1c LazyCompile:*fib /srv/app.js:1\n"),
            Some((0x3ef0_a4c0, 0x1c, "LazyCompile:*fib /srv/app.js:1"))
        );
        assert_eq!(
            parse_line("0x00007f2a3c012340 0x0000000000000120 java.lang.String::hashCode"),
            Some((0x7f2a_3c01_2340, 0x120, "java.lang.String::hashCode"))
        );
        for bad in [
            "",
            "zz 10 name",
            "1000 10",
            "1000 0 empty",
            "1000 10  ",
            "ffffffffffffffff 10 wraps",
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn namespace_pid_is_the_innermost() {
        let status = "Name:\tpython3\nUid:\t1000\t1000\t1000\t1000\nNSpid:\t4242\t17\n";
        assert_eq!(namespace_pid(status, 4242), 17);
        assert_eq!(process_uid(status), Some(1000));
        assert_eq!(namespace_pid("Name:\tx\n", 9), 9);
    }

    /// A fake `/proc/PID` whose root holds `tmp/perf-NSPID.map`.
    fn fake_process(proc: &Path, pid: u32, ns_pid: u32) -> PathBuf {
        let dir = proc.join(pid.to_string());
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let uid = unsafe { libc::getuid() };
        std::fs::write(
            dir.join("status"),
            format!("Name:\tjit\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nNSpid:\t{pid}\t{ns_pid}\n"),
        )
        .unwrap();
        root.join(format!("tmp/perf-{ns_pid}.map"))
    }

    #[test]
    fn reads_through_the_process_root_and_follows_growth() {
        let proc = tempfile::tempdir().unwrap();
        let file = fake_process(proc.path(), 100, 7);
        std::fs::write(
            &file,
            "1000 100 first\nnot a line\n2000 80 second\n3000 10 part",
        )
        .unwrap();
        let mut maps = PerfMaps::new(proc.path(), PerfMapLimits::default());
        assert_eq!(maps.lookup(100, 0x1050), Some("first"));
        assert_eq!(maps.lookup(100, 0x207f), Some("second"));
        assert_eq!(maps.lookup(100, 0x2080), None);
        // The unfinished last line is not read yet.
        assert_eq!(maps.lookup(100, 0x3000), None);
        assert_eq!(maps.stats().malformed_lines, 1);
        assert_eq!(maps.stats().entries, 2);

        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        f.write_all(b"ial\n1040 20 replaced\n").unwrap();
        // Not read again within the window...
        assert_eq!(maps.lookup(100, 0x3000), None);
        maps.start_window();
        // ...but in the next one: the line is whole, and the overlapping
        // later entry replaces the first.
        assert_eq!(maps.lookup(100, 0x3000), Some("partial"));
        assert_eq!(maps.lookup(100, 0x1050), Some("replaced"));
        assert_eq!(maps.lookup(100, 0x1010), None);
        assert_eq!(maps.stats().entries, 3);
    }

    #[test]
    fn a_symlink_cannot_leave_the_process_root() {
        let proc = tempfile::tempdir().unwrap();
        let outside = proc.path().join("host-secret");
        std::fs::write(&outside, "1000 100 secret\n").unwrap();
        let file = fake_process(proc.path(), 200, 200);
        std::os::unix::fs::symlink(&outside, &file).unwrap();
        let mut maps = PerfMaps::new(proc.path(), PerfMapLimits::default());
        assert_eq!(maps.lookup(200, 0x1000), None);
    }

    #[test]
    fn memory_is_bounded_and_drops_are_counted() {
        let proc = tempfile::tempdir().unwrap();
        let file = fake_process(proc.path(), 300, 300);
        let text: String = (0..100)
            .map(|i| format!("{:x} 10 fn{i:03}\n", 0x1000 + i * 0x10))
            .collect();
        std::fs::write(&file, text).unwrap();
        let limits = PerfMapLimits {
            max_bytes: 10 * (ENTRY_OVERHEAD + 5),
            ..PerfMapLimits::default()
        };
        let mut maps = PerfMaps::new(proc.path(), limits);
        assert_eq!(maps.lookup(300, 0x1000), Some("fn000"));
        assert_eq!(maps.lookup(300, 0x1090), Some("fn009"));
        assert_eq!(maps.lookup(300, 0x10a0), None);
        assert_eq!(maps.stats().entries, 10);
        assert_eq!(maps.stats().dropped_entries, 90);
        maps.clear();
        assert_eq!(maps.stats().entries, 0);
    }

    #[test]
    fn a_process_without_a_map_is_checked_once_a_window() {
        let proc = tempfile::tempdir().unwrap();
        let file = fake_process(proc.path(), 400, 400);
        let mut maps = PerfMaps::new(proc.path(), PerfMapLimits::default());
        assert_eq!(maps.lookup(400, 0x1000), None);
        std::fs::write(&file, "1000 10 late\n").unwrap();
        assert_eq!(maps.lookup(400, 0x1000), None);
        maps.start_window();
        assert_eq!(maps.lookup(400, 0x1000), Some("late"));
    }
}
