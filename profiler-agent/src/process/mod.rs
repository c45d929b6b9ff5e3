//! Process metadata cache: what is needed to symbolize a process, captured
//! at first sight so processes that exit before the drain still get names.
//!
//! For each process we keep its executable mappings (from `/proc/PID/maps`)
//! and an open handle to every mapped binary. The handle is opened through
//! `/proc/PID/map_files/` (or `/proc/PID/root/PATH`), so binaries in other
//! mount namespaces and deleted binaries resolve too. Binaries are shared by
//! device and inode, so `libc` is opened once however many processes map it.
//!
//! A process that exits before its maps can be read is built from the
//! kernel's record of its mappings instead ([`events`]).
//!
//! Memory is bounded: at most `max_processes` processes and `max_binaries`
//! open binaries; what does not fit is counted and its frames are shown as
//! `module+0xOFFSET`.
pub mod events;
pub mod goinfo;
pub mod perfmap;

use crate::{
    cgroup::{parse_proc_cgroup, CgroupInfo},
    loss::ProcessLoss,
};
use events::{LoggedMapping, ProcessEvents};
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

/// Identity of a binary on disk: (device, inode) as `/proc/PID/maps` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BinaryKey {
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
}

/// An open binary, kept open for as long as a cached process maps it.
#[derive(Debug)]
pub struct Binary {
    pub key: BinaryKey,
    /// The path the process saw (may be in another mount namespace).
    pub path: PathBuf,
    /// A path that reaches the open file from this process: `/proc/self/fd/N`.
    pub symbol_path: PathBuf,
    _file: File,
    /// The Go build info, read at the first question.
    go: OnceLock<Option<goinfo::GoBuild>>,
}

impl Binary {
    /// Short name for `module+0xOFFSET` frames: the file name.
    pub fn module_name(&self) -> String {
        module_name(&self.path)
    }

    /// The Go build info, if this is a Go binary.
    pub fn go_build(&self) -> Option<&goinfo::GoBuild> {
        self.go
            .get_or_init(|| goinfo::go_build(&self._file))
            .as_ref()
    }
}

/// Whether a mapping's name is that of anonymous memory (`[anon]`, or a
/// name given with `PR_SET_VMA_ANON_NAME`).
pub fn is_anonymous(name: &str) -> bool {
    name == "[anon]" || name.starts_with("[anon:")
}

fn module_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string_lossy().into_owned())
}

/// One executable mapping of a process.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// The mapped file, if it is a file we could open.
    pub binary: Option<Arc<Binary>>,
    /// Path or pseudo name (`[vdso]`, `[anon]`) of the mapping.
    pub name: String,
}

/// Where an address of a process lives.
#[derive(Clone, Debug)]
pub enum Location {
    /// In an open binary, at this file offset.
    Binary {
        binary: Arc<Binary>,
        file_offset: u64,
    },
    /// In a mapping we cannot read symbols from.
    Module { name: String, offset: u64 },
    /// In anonymous executable memory: code a JIT compiler wrote.
    Jit,
    /// Outside every known mapping.
    Unknown,
}

/// A parsed line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsLine {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// Path or pseudo name; empty for anonymous mappings.
    pub pathname: String,
}

/// Parses one line of `/proc/PID/maps`; `None` if it is malformed.
pub fn parse_maps_line(line: &str) -> Option<MapsLine> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode = fields.next()?;
    let pathname = fields.next().unwrap_or("").trim_start().to_string();
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    Some(MapsLine {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev_major: u32::from_str_radix(major, 16).ok()?,
        dev_minor: u32::from_str_radix(minor, 16).ok()?,
        inode: inode.parse().ok()?,
        pathname,
    })
}

/// The mapping of a sorted list that contains `addr`.
fn find_mapping(mappings: &[Mapping], addr: u64) -> Option<&Mapping> {
    let idx = mappings.partition_point(|m| m.start <= addr);
    let mapping = mappings.get(idx.checked_sub(1)?)?;
    (addr < mapping.end).then_some(mapping)
}

/// Field 22 of `/proc/PID/stat`: start time in clock ticks after boot.
fn read_start_time(pid_dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(pid_dir.join("stat")).ok()?;
    parse_start_time(&stat)
}

/// Parses the start time out of a `/proc/PID/stat` text. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after
/// its closing parenthesis.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[derive(Debug)]
struct ProcessInfo {
    /// The process's name (`/proc/PID/comm` of its main thread).
    name: Option<String>,
    /// Path of its executable, as the process sees it.
    exe: Option<String>,
    /// Container, pod and systemd unit, from `/proc/PID/cgroup`.
    cgroup: CgroupInfo,
    /// Start time (clock ticks after boot), to tell a reused pid apart.
    start_time: Option<u64>,
    /// Executable mappings, sorted by start address.
    mappings: Vec<Mapping>,
    /// Mappings before the last exec or refresh, kept until the next sweep
    /// for samples taken before it that are still being drained.
    previous: Vec<Mapping>,
    /// Set at the drain that first found the process gone; the entry is
    /// removed one drain later, once samples taken before its exit are read.
    gone: bool,
    /// Maps were re-read during the current drain (after an exec).
    refreshed: bool,
}

/// Counts of what the cache could not do (each a reason frames stay unnamed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessStats {
    /// Processes snapshotted.
    pub snapshots: u64,
    /// Processes or binaries whose frames stay unnamed, by reason; read
    /// with `stats[reason]`.
    pub failures: [u64; ProcessLoss::COUNT],
    /// Binaries opened (each once, however many processes map it).
    pub binaries_opened: u64,
    /// Processes built from the kernel's process events, gone before their
    /// maps could be read (counted in `snapshots` too).
    pub from_events: u64,
}

impl std::ops::Index<ProcessLoss> for ProcessStats {
    type Output = u64;
    fn index(&self, reason: ProcessLoss) -> &u64 {
        &self.failures[reason.index()]
    }
}

impl std::ops::IndexMut<ProcessLoss> for ProcessStats {
    fn index_mut(&mut self, reason: ProcessLoss) -> &mut u64 {
        &mut self.failures[reason.index()]
    }
}

/// What a [`ProcessCache::sweep`] let go of.
#[derive(Debug, Default)]
pub struct Swept {
    /// Processes forgotten (gone since the previous drain).
    pub pids: Vec<u32>,
    /// Binaries closed, with the path their symbols were read through: a
    /// symbolizer must forget what it cached for them, since the fd number
    /// (and so the path) will be reused for another file.
    pub binaries: Vec<(BinaryKey, PathBuf)>,
}

/// Sweeps a binary stays open (with what the symbolizer parsed from it)
/// after the last process mapping it is forgotten: executables run again
/// and again by short-lived processes (a shell loop, a cron job, a build's
/// compiler) are then not opened, decompressed and parsed anew each drain.
pub const BINARY_IDLE_SWEEPS: u32 = 3;

/// The cache of process mappings and open binaries.
#[derive(Debug)]
pub struct ProcessCache {
    proc_root: PathBuf,
    max_processes: usize,
    max_binaries: usize,
    processes: HashMap<u32, ProcessInfo>,
    /// Open binaries, with the number of sweeps each has gone unmapped.
    binaries: HashMap<BinaryKey, (Arc<Binary>, u32)>,
    /// Pids whose snapshot failed during the current drain: not retried
    /// frame by frame.
    unavailable: HashSet<u32>,
    stats: ProcessStats,
    /// The kernel's process events, where the agent reads them.
    events: Option<Arc<ProcessEvents>>,
    /// Processes running a CPython whose frames the program walks.
    python: HashMap<u32, crate::python::PythonProcess>,
}

impl Default for ProcessCache {
    fn default() -> Self {
        Self::new("/proc", 16_384, 4_096)
    }
}

impl ProcessCache {
    /// The `/proc` the cache reads.
    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    /// Records what CPython process `pid` runs (`None`: none the agent reads).
    pub fn set_python(&mut self, pid: u32, python: Option<crate::python::PythonProcess>) {
        match python {
            Some(p) => self.python.insert(pid, p),
            None => self.python.remove(&pid),
        };
    }

    /// The CPython process `pid` runs, if the agent reads its frames.
    pub fn python(&self, pid: u32) -> Option<&crate::python::PythonProcess> {
        self.python.get(&pid)
    }

    pub fn new(proc_root: impl Into<PathBuf>, max_processes: usize, max_binaries: usize) -> Self {
        Self {
            proc_root: proc_root.into(),
            max_processes,
            max_binaries,
            processes: HashMap::new(),
            binaries: HashMap::new(),
            unavailable: HashSet::new(),
            stats: ProcessStats::default(),
            events: None,
            python: HashMap::new(),
        }
    }

    /// Builds processes gone before their snapshot from `events`.
    pub fn set_events(&mut self, events: Arc<ProcessEvents>) {
        self.events = Some(events);
    }

    /// The process events' counts, if they are read.
    pub fn event_stats(&self) -> Option<events::LogStats> {
        self.events.as_ref().map(|e| e.stats())
    }

    /// The cache's counts, with the process events' losses.
    pub fn stats(&self) -> ProcessStats {
        let mut stats = self.stats.clone();
        if let Some(events) = self.event_stats() {
            stats[ProcessLoss::ProcessEventsLost] = events.lost + events.full;
        }
        stats
    }

    pub fn process_count(&self) -> usize {
        self.processes.len()
    }

    pub fn binary_count(&self) -> usize {
        self.binaries.len()
    }

    pub fn contains(&self, pid: u32) -> bool {
        self.processes.contains_key(&pid)
    }

    /// A process just exec'd: snapshot it as [`Self::observe`] does, but one
    /// gone already is not counted as a loss (it may never be sampled; if
    /// it was, its first sample's announcement counts it).
    pub fn observe_at_exec(&mut self, pid: u32) -> bool {
        let before = self.stats[ProcessLoss::ProcessGoneBeforeSnapshot];
        let seen = self.observe(pid);
        if !seen {
            self.stats[ProcessLoss::ProcessGoneBeforeSnapshot] = before;
            self.unavailable.remove(&pid);
        }
        seen
    }

    /// First sight of a process (or a fresh look after an exec): snapshot its
    /// executable mappings and open its binaries. Returns whether it worked.
    pub fn observe(&mut self, pid: u32) -> bool {
        if !self.processes.contains_key(&pid) && self.processes.len() >= self.max_processes {
            self.stats[ProcessLoss::ProcessCacheFull] += 1;
            return false;
        }
        match self.read_mappings(pid) {
            Some(mappings) => {
                self.stats.snapshots += 1;
                self.unavailable.remove(&pid);
                let pid_dir = self.proc_root.join(pid.to_string());
                let name = std::fs::read_to_string(pid_dir.join("comm"))
                    .ok()
                    .map(|n| n.trim_end_matches('\n').to_string())
                    .filter(|n| !n.is_empty());
                let start_time = read_start_time(&pid_dir);
                let cgroup = std::fs::read_to_string(pid_dir.join("cgroup"))
                    .map(|t| parse_proc_cgroup(&t))
                    .unwrap_or_default();
                let exe = std::fs::read_link(pid_dir.join("exe")).ok().map(|p| {
                    p.to_string_lossy()
                        .trim_end_matches(" (deleted)")
                        .to_string()
                });
                // Same process (exec or new libraries): keep the old mappings
                // for samples taken before; a reused pid starts afresh.
                let mut previous = match self.processes.remove(&pid) {
                    Some(old) if old.start_time == start_time => old.mappings,
                    _ => Vec::new(),
                };
                // First seen after an exec: its image before (samples taken
                // between its fork and exec) is in the process events.
                if previous.is_empty() {
                    if let Some(logged) = self.events.as_ref().and_then(|e| e.snapshot(pid)) {
                        previous = self
                            .mappings_from_events(&logged.previous, logged.previous_inherits_from)
                            .0;
                    }
                }
                self.processes.insert(
                    pid,
                    ProcessInfo {
                        name,
                        exe,
                        cgroup,
                        start_time,
                        mappings,
                        previous,
                        gone: false,
                        refreshed: false,
                    },
                );
                true
            }
            None if self.observe_from_events(pid) => true,
            None => {
                self.stats[ProcessLoss::ProcessGoneBeforeSnapshot] += 1;
                self.unavailable.insert(pid);
                false
            }
        }
    }

    /// Builds a process that is gone from what the process events logged:
    /// its mappings, name and executable; a forked child that did not exec
    /// takes the rest of its image (and its cgroup) from its parent.
    fn observe_from_events(&mut self, pid: u32) -> bool {
        let Some(logged) = self.events.as_ref().and_then(|e| e.snapshot(pid)) else {
            return false;
        };
        let (mappings, cgroup) = self.mappings_from_events(&logged.mappings, logged.inherits_from);
        let (previous, _) =
            self.mappings_from_events(&logged.previous, logged.previous_inherits_from);
        self.stats.snapshots += 1;
        self.stats.from_events += 1;
        self.processes.insert(
            pid,
            ProcessInfo {
                name: logged.name,
                exe: logged.exe,
                cgroup,
                start_time: None,
                mappings,
                previous,
                gone: false,
                refreshed: false,
            },
        );
        true
    }

    /// Mappings from process events, sorted, with the binaries they name;
    /// completed by those of `inherits_from` (a live ancestor the log did
    /// not see start), whose cgroup is returned too.
    fn mappings_from_events(
        &mut self,
        logged: &[LoggedMapping],
        inherits_from: Option<u32>,
    ) -> (Vec<Mapping>, CgroupInfo) {
        let mut mappings = Vec::with_capacity(logged.len());
        for m in logged {
            let binary = if m.inode != 0 && m.path.starts_with('/') {
                self.binary_from_event(m, inherits_from)
            } else if &*m.path == "[vdso]" {
                // One image per kernel, opened from any live process.
                self.binaries
                    .get(&BinaryKey {
                        dev_major: 0,
                        dev_minor: 0,
                        inode: m.end - m.start,
                    })
                    .map(|(b, _)| b.clone())
            } else {
                None
            };
            let name = if m.path.starts_with("//anon") || m.path.is_empty() {
                "[anon]".to_string()
            } else {
                m.path.trim_end_matches(" (deleted)").to_string()
            };
            mappings.push(Mapping {
                start: m.start,
                end: m.end,
                offset: m.offset,
                binary,
                name,
            });
        }
        let mut cgroup = CgroupInfo::default();
        if let Some(parent) = inherits_from {
            if !self.processes.contains_key(&parent) {
                self.observe(parent);
            }
            if let Some(info) = self.processes.get(&parent) {
                for m in &info.mappings {
                    if !mappings.iter().any(|o| o.start < m.end && m.start < o.end) {
                        mappings.push(m.clone());
                    }
                }
                cgroup = info.cgroup.clone();
            }
        }
        mappings.sort_by_key(|m| m.start);
        (mappings, cgroup)
    }

    /// The binary a process event names: already open (same device and
    /// inode), or opened by its path through the parent's root (the same
    /// mount namespace, most likely) or the host's, if the file there is
    /// still the one that was mapped.
    fn binary_from_event(&mut self, m: &LoggedMapping, parent: Option<u32>) -> Option<Arc<Binary>> {
        let key = BinaryKey {
            dev_major: m.dev_major,
            dev_minor: m.dev_minor,
            inode: m.inode,
        };
        if let Some((binary, _)) = self.binaries.get(&key) {
            return Some(binary.clone());
        }
        if self.binaries.len() >= self.max_binaries {
            self.stats[ProcessLoss::BinaryCacheFull] += 1;
            return None;
        }
        let path = PathBuf::from(m.path.trim_end_matches(" (deleted)"));
        let relative = path.strip_prefix("/").ok()?;
        let roots = parent
            .into_iter()
            .map(|p| p.to_string())
            .chain(["1".to_string()]);
        let file = roots
            .filter_map(|root| {
                File::open(self.proc_root.join(root).join("root").join(relative)).ok()
            })
            .find(|file| {
                file.metadata().is_ok_and(|meta| {
                    meta.ino() == m.inode
                        && libc::major(meta.dev()) == m.dev_major
                        && libc::minor(meta.dev()) == m.dev_minor
                })
            });
        let Some(file) = file else {
            self.stats[ProcessLoss::BinaryOpenFailed] += 1;
            return None;
        };
        let symbol_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let binary = Arc::new(Binary {
            key,
            path,
            symbol_path,
            _file: file,
            go: OnceLock::new(),
        });
        self.stats.binaries_opened += 1;
        self.binaries.insert(key, (binary.clone(), 0));
        Some(binary)
    }

    /// Container, pod and systemd unit of a cached process.
    pub fn cgroup(&self, pid: u32) -> Option<&CgroupInfo> {
        self.processes.get(&pid).map(|p| &p.cgroup)
    }

    /// The executable path of a cached process, if known.
    pub fn exe(&self, pid: u32) -> Option<&str> {
        self.processes.get(&pid)?.exe.as_deref()
    }

    /// The Go build info of a cached process's executable, if it is a Go
    /// binary (its first executable mapping of the file `exe` names, else
    /// its first executable mapping of a file).
    pub fn go_build(&self, pid: u32) -> Option<&goinfo::GoBuild> {
        let info = self.processes.get(&pid)?;
        let files = info.mappings.iter().filter(|m| m.binary.is_some());
        let main = match info.exe.as_deref() {
            Some(exe) => info
                .mappings
                .iter()
                .find(|m| m.binary.is_some() && m.name == exe),
            None => None,
        };
        main.or_else(|| files.clone().next())?
            .binary
            .as_ref()?
            .go_build()
    }

    /// The name of a cached process, if known.
    pub fn name(&self, pid: u32) -> Option<&str> {
        self.processes.get(&pid)?.name.as_deref()
    }

    /// The executable mappings of a cached process, sorted by start.
    pub fn mappings(&self, pid: u32) -> Option<&[Mapping]> {
        Some(&self.processes.get(&pid)?.mappings)
    }

    /// The process directory under the cache's proc root.
    pub fn pid_dir(&self, pid: u32) -> PathBuf {
        self.proc_root.join(pid.to_string())
    }

    fn read_mappings(&mut self, pid: u32) -> Option<Vec<Mapping>> {
        let maps_path = self.proc_root.join(pid.to_string()).join("maps");
        let text = std::fs::read_to_string(&maps_path).ok()?;
        let mut mappings = Vec::new();
        for line in text.lines() {
            let Some(line) = parse_maps_line(line) else {
                continue;
            };
            if !line.executable {
                continue;
            }
            let binary = if line.inode != 0 && line.pathname.starts_with('/') {
                self.binary_for(pid, &line)
            } else if line.pathname == "[vdso]" {
                self.vdso_for(pid, &line)
            } else {
                None
            };
            let name = if line.pathname.is_empty() {
                "[anon]".to_string()
            } else {
                line.pathname.trim_end_matches(" (deleted)").to_string()
            };
            mappings.push(Mapping {
                start: line.start,
                end: line.end,
                offset: line.offset,
                binary,
                name,
            });
        }
        mappings.sort_by_key(|m| m.start);
        Some(mappings)
    }

    /// The vDSO as a binary: its image, read from the process's memory into
    /// an anonymous in-memory file, so its frames are named like any ELF
    /// file's (`__vdso_clock_gettime`). One image per kernel: the key has
    /// no device and the image's size as inode.
    fn vdso_for(&mut self, pid: u32, line: &MapsLine) -> Option<Arc<Binary>> {
        use std::{io::Write, os::unix::fs::FileExt};
        let len = line.end.checked_sub(line.start)?;
        if len == 0 || len > 1 << 20 {
            return None;
        }
        let key = BinaryKey {
            dev_major: 0,
            dev_minor: 0,
            inode: len,
        };
        if let Some((binary, _)) = self.binaries.get(&key) {
            return Some(binary.clone());
        }
        let mem = File::open(self.proc_root.join(pid.to_string()).join("mem")).ok()?;
        let mut image = vec![0u8; len as usize];
        mem.read_exact_at(&mut image, line.start).ok()?;
        if !image.starts_with(b"\x7fELF") {
            return None;
        }
        // SAFETY: a valid NUL-terminated name; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"vdso".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.write_all(&image).ok()?;
        let binary = Arc::new(Binary {
            key,
            path: PathBuf::from("[vdso]"),
            symbol_path: PathBuf::from(format!("/proc/self/fd/{fd}")),
            _file: file,
            go: OnceLock::new(),
        });
        self.stats.binaries_opened += 1;
        self.binaries.insert(key, (binary.clone(), 0));
        Some(binary)
    }

    fn binary_for(&mut self, pid: u32, line: &MapsLine) -> Option<Arc<Binary>> {
        let key = BinaryKey {
            dev_major: line.dev_major,
            dev_minor: line.dev_minor,
            inode: line.inode,
        };
        if let Some((binary, _)) = self.binaries.get(&key) {
            return Some(binary.clone());
        }
        if self.binaries.len() >= self.max_binaries {
            self.stats[ProcessLoss::BinaryCacheFull] += 1;
            return None;
        }
        let path = PathBuf::from(line.pathname.trim_end_matches(" (deleted)"));
        let pid_dir = self.proc_root.join(pid.to_string());
        // map_files reaches the very file that is mapped, whatever mount
        // namespace it is in and even if it was deleted; it needs
        // CAP_SYS_ADMIN. The root link is the fallback.
        let by_map_files = pid_dir
            .join("map_files")
            .join(format!("{:x}-{:x}", line.start, line.end));
        let file = File::open(&by_map_files).ok().or_else(|| {
            let relative = path.strip_prefix("/").ok()?;
            let file = File::open(pid_dir.join("root").join(relative)).ok()?;
            // A file replaced since it was mapped is not the mapped binary.
            let same = file.metadata().ok()?.ino() == line.inode;
            same.then_some(file)
        });
        let Some(file) = file else {
            self.stats[ProcessLoss::BinaryOpenFailed] += 1;
            return None;
        };
        let symbol_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let binary = Arc::new(Binary {
            key,
            path,
            symbol_path,
            _file: file,
            go: OnceLock::new(),
        });
        self.stats.binaries_opened += 1;
        self.binaries.insert(key, (binary.clone(), 0));
        Some(binary)
    }

    /// Where `addr` of process `pid` lives. An address outside every known
    /// mapping of a live process triggers one re-read of its maps per drain
    /// (the process may have exec'd or loaded a library since first sight).
    pub fn locate(&mut self, pid: u32, addr: u64) -> Location {
        if let Some(location) = self.lookup(pid, addr) {
            return location;
        }
        let refresh = match self.processes.get(&pid) {
            Some(info) => !info.refreshed && !info.gone,
            None => !self.unavailable.contains(&pid),
        };
        if refresh {
            // Once per drain, whether or not the process is still there.
            if let Some(info) = self.processes.get_mut(&pid) {
                info.refreshed = true;
            }
            if self.observe(pid) {
                if let Some(info) = self.processes.get_mut(&pid) {
                    info.refreshed = true;
                }
                if let Some(location) = self.lookup(pid, addr) {
                    return location;
                }
            }
        }
        Location::Unknown
    }

    fn lookup(&self, pid: u32, addr: u64) -> Option<Location> {
        let info = self.processes.get(&pid)?;
        let mapping =
            find_mapping(&info.mappings, addr).or_else(|| find_mapping(&info.previous, addr))?;
        let file_offset = addr - mapping.start + mapping.offset;
        Some(match &mapping.binary {
            Some(binary) => Location::Binary {
                binary: binary.clone(),
                file_offset,
            },
            None if is_anonymous(&mapping.name) => Location::Jit,
            None => Location::Module {
                name: module_name(Path::new(&mapping.name)),
                offset: file_offset,
            },
        })
    }

    /// Called after each drain: forgets processes found gone at the previous
    /// drain, marks those gone now, closes binaries no process has mapped
    /// for more than [`BINARY_IDLE_SWEEPS`] sweeps.
    pub fn sweep(&mut self) -> Swept {
        let mut forgotten = Vec::new();
        self.unavailable.clear();
        let proc_root = self.proc_root.clone();
        self.processes.retain(|pid, info| {
            info.refreshed = false;
            info.previous.clear();
            if info.gone {
                forgotten.push(*pid);
                return false;
            }
            // Gone, or its pid now belongs to another process.
            let pid_dir = proc_root.join(pid.to_string());
            if !pid_dir.exists() || read_start_time(&pid_dir) != info.start_time {
                info.gone = true;
            }
            true
        });
        let mut closed = Vec::new();
        self.binaries.retain(|key, (binary, idle)| {
            if Arc::strong_count(binary) > 1 {
                *idle = 0;
                return true;
            }
            *idle += 1;
            if *idle <= BINARY_IDLE_SWEEPS {
                return true;
            }
            closed.push((*key, binary.symbol_path.clone()));
            false
        });
        for pid in &forgotten {
            self.python.remove(pid);
        }
        Swept {
            pids: forgotten,
            binaries: closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let l = parse_maps_line(
            "55d0c0a00000-55d0c0a21000 r-xp 00002000 08:01 1234567                    /usr/bin/my prog",
        )
        .unwrap();
        assert_eq!(l.start, 0x55d0c0a00000);
        assert_eq!(l.end, 0x55d0c0a21000);
        assert!(l.executable);
        assert_eq!(l.offset, 0x2000);
        assert_eq!((l.dev_major, l.dev_minor, l.inode), (8, 1, 1234567));
        assert_eq!(l.pathname, "/usr/bin/my prog");

        let anon = parse_maps_line("7ffd1000-7ffd3000 r-xp 00000000 00:00 0 ").unwrap();
        assert_eq!(anon.pathname, "");
        let vdso = parse_maps_line("7ffd1000-7ffd3000 r-xp 00000000 00:00 0  [vdso]").unwrap();
        assert_eq!(vdso.pathname, "[vdso]");
        assert!(
            !parse_maps_line("7ffd1000-7ffd3000 rw-p 0 00:00 0")
                .unwrap()
                .executable
        );
        assert!(parse_maps_line("garbage").is_none());
        assert!(parse_maps_line("zz-10 r-xp 0 00:00 0").is_none());
    }

    /// A fake /proc with one process whose mapping points at a real file.
    fn fake_proc(dir: &Path, pid: u32, binary: &Path, deleted: bool) {
        let pid_dir = dir.join(pid.to_string());
        std::fs::create_dir_all(pid_dir.join("root")).unwrap();
        let ino = std::fs::metadata(binary).unwrap().ino();
        let suffix = if deleted { " (deleted)" } else { "" };
        std::fs::write(
            pid_dir.join("maps"),
            format!(
                "1000-2000 r-xp 00003000 fd:00 {ino} {}{suffix}\n\
                 3000-4000 rw-p 00000000 00:00 0\n\
                 5000-6000 r-xp 00000000 00:00 0  [vdso]\n",
                binary.display()
            ),
        )
        .unwrap();
        // /proc/PID/root -> / (so the root fallback finds the binary)
        std::fs::remove_dir(pid_dir.join("root")).unwrap();
        std::os::unix::fs::symlink("/", pid_dir.join("root")).unwrap();
    }

    #[test]
    fn locates_addresses_and_shares_binaries() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        fake_proc(dir.path(), 10, &exe, false);
        fake_proc(dir.path(), 11, &exe, false);
        let mut cache = ProcessCache::new(dir.path(), 16, 16);
        assert!(cache.observe(10));
        assert!(cache.observe(11));
        assert_eq!(
            cache.binary_count(),
            1,
            "one binary opened for two processes"
        );
        assert_eq!(cache.stats().binaries_opened, 1);

        match cache.locate(10, 0x1010) {
            Location::Binary {
                binary,
                file_offset,
            } => {
                assert_eq!(file_offset, 0x3010);
                assert_eq!(binary.path, exe);
                assert!(binary.symbol_path.starts_with("/proc/self/fd"));
            }
            other => panic!("expected a binary, got {other:?}"),
        }
        match cache.locate(10, 0x5004) {
            Location::Module { name, offset } => assert_eq!((name.as_str(), offset), ("[vdso]", 4)),
            other => panic!("expected the vdso, got {other:?}"),
        }
        assert!(matches!(cache.locate(10, 0x3004), Location::Unknown));
        assert!(matches!(cache.locate(10, 0x2000), Location::Unknown));
    }

    #[test]
    fn exited_processes_are_kept_one_drain_then_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        fake_proc(dir.path(), 20, &exe, false);
        let mut cache = ProcessCache::new(dir.path(), 16, 16);
        assert!(cache.observe(20));
        std::fs::remove_dir_all(dir.path().join("20")).unwrap();
        // Still symbolizable right after its exit...
        assert!(cache.sweep().pids.is_empty());
        assert!(matches!(cache.locate(20, 0x1000), Location::Binary { .. }));
        // ...and forgotten one drain later; its binary stays open a few
        // drains more, for the next process that runs it.
        let swept = cache.sweep();
        assert_eq!(swept.pids, vec![20]);
        assert!(swept.binaries.is_empty());
        assert!(!cache.contains(20));
        for _ in 1..BINARY_IDLE_SWEEPS {
            assert!(cache.sweep().binaries.is_empty());
        }
        assert_eq!(cache.binary_count(), 1);
        let swept = cache.sweep();
        assert_eq!(swept.binaries.len(), 1);
        assert!(swept.binaries[0].1.starts_with("/proc/self/fd"));
        assert!(!cache.contains(20));
        assert_eq!(cache.binary_count(), 0);
    }

    #[test]
    fn replaced_file_is_not_trusted_through_root() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        fake_proc(dir.path(), 30, &exe, false);
        // Point the mapping's inode at something else.
        let maps = dir.path().join("30/maps");
        let text = std::fs::read_to_string(&maps).unwrap();
        let ino = std::fs::metadata(&exe).unwrap().ino();
        std::fs::write(&maps, text.replace(&ino.to_string(), "1")).unwrap();
        let mut cache = ProcessCache::new(dir.path(), 16, 16);
        assert!(cache.observe(30));
        assert_eq!(cache.stats()[ProcessLoss::BinaryOpenFailed], 1);
        assert!(matches!(cache.locate(30, 0x1000), Location::Module { .. }));
    }

    #[test]
    fn bounded_by_process_and_binary_limits() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        for pid in [40, 41] {
            fake_proc(dir.path(), pid, &exe, false);
        }
        let mut cache = ProcessCache::new(dir.path(), 1, 0);
        assert!(cache.observe(40));
        assert!(!cache.observe(41));
        assert_eq!(cache.stats()[ProcessLoss::ProcessCacheFull], 1);
        assert_eq!(cache.stats()[ProcessLoss::BinaryCacheFull], 1);
        assert!(!cache.observe(99));
        assert_eq!(cache.stats()[ProcessLoss::ProcessCacheFull], 2);
    }

    #[test]
    fn missing_process_counts_one_failed_snapshot_per_drain() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = ProcessCache::new(dir.path(), 4, 4);
        for addr in [0x1000, 0x2000, 0x3000] {
            assert!(matches!(cache.locate(77, addr), Location::Unknown));
        }
        assert_eq!(cache.stats()[ProcessLoss::ProcessGoneBeforeSnapshot], 1);
        cache.sweep();
        cache.locate(77, 0x1000);
        assert_eq!(cache.stats()[ProcessLoss::ProcessGoneBeforeSnapshot], 2);
    }

    #[test]
    fn parses_start_time_after_odd_comm() {
        let stat = "1234 (we ird) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 987654 1000 200";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn exec_keeps_old_mappings_until_the_next_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        fake_proc(dir.path(), 60, &exe, false);
        let mut cache = ProcessCache::new(dir.path(), 4, 4);
        assert!(cache.observe(60));
        // The process execs: new mappings elsewhere.
        let maps = dir.path().join("60/maps");
        let text = std::fs::read_to_string(&maps).unwrap();
        std::fs::write(&maps, text.replace("1000-2000", "8000-9000")).unwrap();
        assert!(cache.observe(60));
        assert!(matches!(cache.locate(60, 0x8010), Location::Binary { .. }));
        assert!(
            matches!(cache.locate(60, 0x1010), Location::Binary { .. }),
            "pre-exec samples"
        );
        cache.sweep();
        assert!(matches!(cache.locate(60, 0x1010), Location::Unknown));
    }

    #[test]
    fn reused_pid_is_treated_as_gone() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        fake_proc(dir.path(), 70, &exe, false);
        let stat = |start: u64| format!("70 (x) S {} {start} 0", "0 ".repeat(18));
        std::fs::write(dir.path().join("70/stat"), stat(100)).unwrap();
        let mut cache = ProcessCache::new(dir.path(), 4, 4);
        assert!(cache.observe(70));
        std::fs::write(dir.path().join("70/stat"), stat(200)).unwrap();
        assert!(cache.sweep().pids.is_empty());
        assert_eq!(cache.sweep().pids, vec![70]);
    }

    #[test]
    fn process_name_comes_from_comm() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        fake_proc(dir.path(), 50, &exe, false);
        std::fs::write(dir.path().join("50/comm"), "my-server\n").unwrap();
        let mut cache = ProcessCache::new(dir.path(), 4, 4);
        assert!(cache.observe(50));
        assert_eq!(cache.name(50), Some("my-server"));
        assert_eq!(cache.name(51), None);
    }
}
