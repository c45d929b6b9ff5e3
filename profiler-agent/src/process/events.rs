//! The host's process events, as the kernel reports them to perf: every
//! executable mapping (`PERF_RECORD_MMAP2`: address, length, file offset,
//! device, inode, path), every exec (`COMM` with the exec flag), fork and
//! exit. They are read from one "dummy" software event per CPU, which
//! samples nothing and only carries these records, the way `perf record`
//! tracks mappings.
//!
//! A process that lives a few milliseconds has exited before the agent can
//! read `/proc/PID/maps`; its mappings are still in this log, so the
//! [`ProcessCache`](super::ProcessCache) names its frames all the same.
//!
//! Memory is bounded: at most `max_processes` processes are logged (exited
//! ones are kept [`EXITED_RETENTION`] and the oldest are evicted first), each
//! with at most [`MAX_LOGGED_MAPPINGS`] mappings; paths are interned. What
//! the kernel could not write (a full ring) is counted.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use perf_event::{events::Software, Builder, Record, SampleFlag, Sampler};

/// How long an exited process stays in the log: the announcer snapshots a
/// sampled process within its 100 ms poll, so this leaves a wide margin.
pub const EXITED_RETENTION: Duration = Duration::from_secs(10);
/// Most mappings logged per process (a process with more keeps its first).
pub const MAX_LOGGED_MAPPINGS: usize = 1024;
/// Most distinct paths kept interned at once.
const MAX_INTERNED_PATHS: usize = 8_192;
/// Default bound on logged processes.
pub const DEFAULT_MAX_LOGGED_PROCESSES: usize = 16_384;
/// Size of each CPU's ring (records are 100-200 bytes: thousands of
/// mappings between two reads).
const RING_BYTES: usize = 256 << 10;
/// How often the reader thread drains the rings when they stay quiet.
const POLL_INTERVAL_MS: i32 = 100;
/// Ancestors followed for a forked child that did not exec.
const MAX_ANCESTORS: usize = 8;

/// One executable mapping, as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedMapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// Path as the mapping process saw it, or a pseudo name (`[vdso]`,
    /// `//anon`).
    pub path: Arc<str>,
}

/// One record, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Process `pid` was forked from `ppid` (threads are not reported).
    Fork { pid: u32, ppid: u32 },
    /// Process `pid` exec'd a new image named `comm`.
    Exec { pid: u32, comm: String },
    /// Process `pid` renamed itself.
    Comm { pid: u32, comm: String },
    /// Process `pid` mapped executable code.
    Mmap { pid: u32, mapping: LoggedMapping },
    /// Process `pid` exited (its last thread).
    Exit { pid: u32 },
}

/// What the log knows of a process, for the cache to build it from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoggedProcess {
    pub name: Option<String>,
    /// Path of the executable (the first file mapped after its exec).
    pub exe: Option<String>,
    /// Its executable mappings, sorted by start; a forked child that did
    /// not exec has its ancestors' too.
    pub mappings: Vec<LoggedMapping>,
    /// The nearest ancestor not in the log (started before the agent): its
    /// mappings (from `/proc`) complete this process's, where they do not
    /// overlap.
    pub inherits_from: Option<u32>,
    /// The image before its last exec (for samples taken between the fork
    /// and the exec, or inside the exec), completed the same way.
    pub previous: Vec<LoggedMapping>,
    pub previous_inherits_from: Option<u32>,
}

/// Counts of the log's work and losses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records applied.
    pub records: u64,
    /// Records the kernel could not write (a ring was full).
    pub lost: u64,
    /// Processes not logged because the log was full of live ones.
    pub full: u64,
    /// Exited processes dropped to make room before their retention ended.
    pub evicted: u64,
}

#[derive(Debug, Default)]
struct Logged {
    name: Option<String>,
    exe: Option<Arc<str>>,
    /// The parent, for a child forked under the log's watch.
    parent: Option<u32>,
    /// An exec was seen: the mappings are the whole image.
    execd: bool,
    mappings: Vec<LoggedMapping>,
    /// The image before the last exec, and its ancestor outside the log.
    previous: Vec<LoggedMapping>,
    previous_inherits_from: Option<u32>,
    exited: Option<Instant>,
}

impl Logged {
    /// Whether the log knows every mapping (it saw the process start).
    fn complete(&self) -> bool {
        self.execd || self.parent.is_some()
    }
}

/// The log of process events: a pure state machine, fed by
/// [`ProcessEvents`] (and by tests).
#[derive(Debug)]
pub struct ProcessLog {
    procs: HashMap<u32, Logged>,
    /// Exited processes, oldest first: (pid, time of exit).
    exited: VecDeque<(u32, Instant)>,
    paths: HashSet<Arc<str>>,
    max_processes: usize,
    stats: LogStats,
}

impl ProcessLog {
    pub fn new(max_processes: usize) -> Self {
        Self {
            procs: HashMap::new(),
            exited: VecDeque::new(),
            paths: HashSet::new(),
            max_processes,
            stats: LogStats::default(),
        }
    }

    pub fn stats(&self) -> LogStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// The interned copy of `path`.
    pub fn intern(&mut self, path: &str) -> Arc<str> {
        if let Some(path) = self.paths.get(path) {
            return path.clone();
        }
        // Bounded: paths in use stay valid, the set only forgets them.
        if self.paths.len() >= MAX_INTERNED_PATHS {
            self.paths.clear();
        }
        let path: Arc<str> = Arc::from(path);
        self.paths.insert(path.clone());
        path
    }

    /// Counts records the kernel dropped.
    pub fn lost(&mut self, records: u64) {
        self.stats.lost += records;
    }

    /// Applies one event seen at `now`.
    pub fn apply(&mut self, event: Event, now: Instant) {
        self.stats.records += 1;
        match event {
            Event::Fork { pid, ppid } => {
                // A new process, or a reused pid: start afresh.
                if let Some(entry) = self.fresh_entry(pid, now) {
                    if !entry.execd {
                        entry.parent = Some(ppid);
                    }
                }
            }
            Event::Exec { pid, comm } => {
                let reused = self.procs.get(&pid).is_some_and(|p| p.exited.is_some());
                let (previous, previous_inherits_from) = match self.image(pid) {
                    Some(image) if !reused => image,
                    _ => (Vec::new(), None),
                };
                let entry = if reused {
                    self.fresh_entry(pid, now)
                } else {
                    self.entry(pid, now)
                };
                if let Some(entry) = entry {
                    entry.execd = true;
                    entry.parent = None;
                    entry.mappings.clear();
                    entry.previous = previous;
                    entry.previous_inherits_from = previous_inherits_from;
                    entry.exe = None;
                    entry.name = Some(comm);
                }
            }
            Event::Comm { pid, comm } => {
                if let Some(entry) = self.procs.get_mut(&pid) {
                    entry.name = Some(comm);
                }
            }
            Event::Mmap { pid, mapping } => {
                if mapping.end <= mapping.start {
                    return;
                }
                let Some(entry) = self.entry(pid, now) else {
                    return;
                };
                if entry.execd && entry.exe.is_none() && mapping.path.starts_with('/') {
                    entry.exe = Some(mapping.path.clone());
                }
                insert_mapping(&mut entry.mappings, mapping);
            }
            Event::Exit { pid } => {
                if let Some(entry) = self.procs.get_mut(&pid) {
                    if entry.exited.is_none() {
                        entry.exited = Some(now);
                        self.exited.push_back((pid, now));
                    }
                }
            }
        }
    }

    /// The entry of `pid`, created if missing and there is room.
    fn entry(&mut self, pid: u32, now: Instant) -> Option<&mut Logged> {
        if !self.procs.contains_key(&pid) && !self.make_room(now) {
            self.stats.full += 1;
            return None;
        }
        Some(self.procs.entry(pid).or_default())
    }

    /// A new, empty entry for `pid` (replacing an old one).
    fn fresh_entry(&mut self, pid: u32, now: Instant) -> Option<&mut Logged> {
        self.procs.remove(&pid);
        self.entry(pid, now)
    }

    /// Drops exited processes past their retention, and if the log is still
    /// full, the one that exited first. Returns whether there is room.
    fn make_room(&mut self, now: Instant) -> bool {
        self.expire(now);
        while self.procs.len() >= self.max_processes {
            let Some((pid, at)) = self.exited.pop_front() else {
                return false;
            };
            if self.remove_exited(pid, at) {
                self.stats.evicted += 1;
            }
        }
        true
    }

    /// Drops exited processes whose retention ended.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(pid, at)) = self.exited.front() {
            if now.saturating_duration_since(at) < EXITED_RETENTION {
                break;
            }
            self.exited.pop_front();
            self.remove_exited(pid, at);
        }
    }

    /// Removes `pid` if it is still the process that exited at `at` (not a
    /// new process that reused the pid).
    fn remove_exited(&mut self, pid: u32, at: Instant) -> bool {
        if self.procs.get(&pid).and_then(|p| p.exited) == Some(at) {
            self.procs.remove(&pid);
            true
        } else {
            false
        }
    }

    /// What the log knows of `pid`, if it saw the process start (an exec,
    /// or a fork from a process it knows or that started before the agent).
    pub fn snapshot(&self, pid: u32) -> Option<LoggedProcess> {
        let entry = self.procs.get(&pid)?;
        let (mappings, inherits_from) = self.image(pid)?;
        let mut process = LoggedProcess {
            name: entry.name.clone(),
            exe: entry.exe.as_deref().map(str::to_string),
            mappings,
            inherits_from,
            previous: entry.previous.clone(),
            previous_inherits_from: entry.previous_inherits_from,
        };
        // A child that did not exec runs its parent's image, under its name.
        let mut current = entry;
        for _ in 0..MAX_ANCESTORS {
            if current.execd || process.name.is_some() && process.exe.is_some() {
                break;
            }
            let Some(parent) = current.parent.and_then(|p| self.procs.get(&p)) else {
                break;
            };
            if process.name.is_none() {
                process.name = parent.name.clone();
            }
            if process.exe.is_none() {
                process.exe = parent.exe.as_deref().map(str::to_string);
            }
            current = parent;
        }
        Some(process)
    }

    /// The mappings of `pid`'s current image, if the log saw it start: its
    /// own, and for a child that did not exec, its ancestors' where they do
    /// not overlap; with the nearest ancestor outside the log, whose
    /// mappings complete them.
    fn image(&self, pid: u32) -> Option<(Vec<LoggedMapping>, Option<u32>)> {
        let entry = self.procs.get(&pid).filter(|p| p.complete())?;
        let mut mappings = entry.mappings.clone();
        let mut current = entry;
        for _ in 0..MAX_ANCESTORS {
            if current.execd {
                break;
            }
            let Some(parent) = current.parent else {
                break;
            };
            let Some(logged) = self.procs.get(&parent).filter(|p| p.complete()) else {
                return Some((mappings, Some(parent)));
            };
            for mapping in &logged.mappings {
                if !overlaps_any(&mappings, mapping) {
                    insert_mapping(&mut mappings, mapping.clone());
                }
            }
            current = logged;
        }
        Some((mappings, None))
    }
}

fn overlaps_any(mappings: &[LoggedMapping], m: &LoggedMapping) -> bool {
    mappings.iter().any(|o| o.start < m.end && m.start < o.end)
}

/// Inserts `new`, sorted by start; what it covers of older mappings is cut
/// away (a new mapping over an old range replaces it).
fn insert_mapping(mappings: &mut Vec<LoggedMapping>, new: LoggedMapping) {
    if overlaps_any(mappings, &new) {
        let mut kept = Vec::with_capacity(mappings.len() + 1);
        for old in mappings.drain(..) {
            if old.end <= new.start || new.end <= old.start {
                kept.push(old);
                continue;
            }
            if old.start < new.start {
                kept.push(LoggedMapping {
                    end: new.start,
                    ..old.clone()
                });
            }
            if new.end < old.end {
                kept.push(LoggedMapping {
                    start: new.end,
                    offset: old.offset + (new.end - old.start),
                    ..old
                });
            }
        }
        *mappings = kept;
    }
    if mappings.len() >= MAX_LOGGED_MAPPINGS {
        return;
    }
    let at = mappings.partition_point(|m| m.start < new.start);
    mappings.insert(at, new);
}

/// `misc` bit of a COMM record caused by an exec.
const MISC_COMM_EXEC: u16 = 1 << 13;

/// Decodes one record; `None` for records the log does not use.
fn decode(record: &Record, log: &mut ProcessLog) -> Option<Event> {
    use perf_event::data::Record as Data;
    let data = record.parse_record().ok()?;
    Some(match data {
        Data::Mmap2(m) => {
            let path = String::from_utf8_lossy(&m.filename);
            Event::Mmap {
                pid: m.pid,
                mapping: LoggedMapping {
                    start: m.addr,
                    end: m.addr.saturating_add(m.len),
                    offset: m.pgoff,
                    dev_major: m.maj().unwrap_or(0),
                    dev_minor: m.min().unwrap_or(0),
                    inode: m.ino().unwrap_or(0),
                    path: log.intern(&path),
                },
            }
        }
        Data::Comm(c) => {
            let comm = String::from_utf8_lossy(&c.comm).into_owned();
            if record.misc() & MISC_COMM_EXEC != 0 {
                Event::Exec { pid: c.pid, comm }
            } else if c.pid == c.tid {
                Event::Comm { pid: c.pid, comm }
            } else {
                return None;
            }
        }
        // A new thread has the pid of its process; a new process its own.
        Data::Fork(f) if f.pid != f.ppid && f.pid == f.tid => Event::Fork {
            pid: f.pid,
            ppid: f.ppid,
        },
        Data::Exit(e) if e.pid == e.tid => Event::Exit { pid: e.pid },
        Data::Lost(l) => {
            log.lost(l.lost);
            return None;
        }
        _ => return None,
    })
}

/// The kernel's time of a record: the last 8 bytes, since every record but
/// samples ends with `sample_id` and its only field here is the time.
fn record_time(record: &Record) -> u64 {
    let bytes = record.to_contiguous();
    bytes
        .len()
        .checked_sub(8)
        .and_then(|at| bytes.get(at..))
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
        .unwrap_or(0)
}

struct State {
    rings: Vec<Sampler>,
    log: ProcessLog,
    /// Records of one catch-up, put in time order across CPUs (a process
    /// can exec on one CPU and map its libraries on another).
    batch: Vec<(u64, Event)>,
}

impl State {
    fn catch_up(&mut self) {
        let State { rings, log, batch } = self;
        for ring in rings.iter_mut() {
            while let Some(record) = ring.next_record() {
                let time = record_time(&record);
                if let Some(event) = decode(&record, log) {
                    batch.push((time, event));
                }
            }
        }
        batch.sort_by_key(|(time, _)| *time);
        let now = Instant::now();
        for (_, event) in batch.drain(..) {
            log.apply(event, now);
        }
        log.expire(now);
    }
}

/// The per-CPU event rings and the log they feed; a background thread
/// drains them, and [`ProcessEvents::snapshot`] catches up first.
pub struct ProcessEvents {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ProcessEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessEvents").finish_non_exhaustive()
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl ProcessEvents {
    /// Opens a dummy event on each of `cpus` for every process, and starts
    /// the thread that reads them.
    pub fn start(cpus: &[u32], max_processes: usize) -> std::io::Result<Self> {
        let mut rings = Vec::with_capacity(cpus.len());
        for &cpu in cpus {
            let mut builder = Builder::new(Software::DUMMY);
            builder
                .any_pid()
                .one_cpu(cpu as usize)
                .exclude_kernel(true)
                .exclude_hv(true)
                .mmap(true)
                .mmap2(true)
                .comm(true)
                .comm_exec(true)
                .task(true)
                .sample_id_all(true)
                .sample(SampleFlag::TIME)
                .wakeup_watermark(RING_BYTES / 4);
            let mut ring = builder.build()?.sampled(RING_BYTES)?;
            ring.enable()?;
            rings.push(ring);
        }
        let state = Arc::new(Mutex::new(State {
            rings,
            log: ProcessLog::new(max_processes),
            batch: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::Builder::new()
                .name("process-events".into())
                .spawn(move || read_loop(&state, &stop))?
        };
        Ok(Self {
            state,
            stop,
            handle: Some(handle),
        })
    }

    /// What the log knows of `pid`, after reading every pending record.
    pub fn snapshot(&self, pid: u32) -> Option<LoggedProcess> {
        let mut state = lock(&self.state);
        state.catch_up();
        state.log.snapshot(pid)
    }

    pub fn stats(&self) -> LogStats {
        lock(&self.state).log.stats()
    }
}

impl Drop for ProcessEvents {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn read_loop(state: &Mutex<State>, stop: &AtomicBool) {
    use std::os::fd::AsRawFd;
    let mut fds: Vec<libc::pollfd> = lock(state)
        .rings
        .iter()
        .map(|ring| libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a valid array of pollfd for the duration of the
        // call; the fds stay open while `state` owns the rings.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                POLL_INTERVAL_MS,
            )
        };
        lock(state).catch_up();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(log: &mut ProcessLog, start: u64, end: u64, path: &str) -> LoggedMapping {
        LoggedMapping {
            start,
            end,
            offset: 0,
            dev_major: 8,
            dev_minor: 1,
            inode: start,
            path: log.intern(path),
        }
    }

    fn mmap(log: &mut ProcessLog, pid: u32, start: u64, end: u64, path: &str) -> Event {
        Event::Mmap {
            pid,
            mapping: mapping(log, start, end, path),
        }
    }

    #[test]
    fn an_exec_starts_a_new_image_named_by_its_first_file() {
        let mut log = ProcessLog::new(16);
        let now = Instant::now();
        let before = mmap(&mut log, 7, 0x1000, 0x2000, "/bin/sh");
        log.apply(Event::Fork { pid: 7, ppid: 1 }, now);
        log.apply(before, now);
        log.apply(
            Event::Exec {
                pid: 7,
                comm: "ls".into(),
            },
            now,
        );
        for event in [
            mmap(&mut log, 7, 0x5000, 0x6000, "/usr/bin/ls"),
            mmap(&mut log, 7, 0x9000, 0xa000, "/usr/lib/libc.so.6"),
            mmap(&mut log, 7, 0xb000, 0xc000, "[vdso]"),
        ] {
            log.apply(event, now);
        }
        let p = log.snapshot(7).unwrap();
        assert_eq!(p.name.as_deref(), Some("ls"));
        assert_eq!(p.exe.as_deref(), Some("/usr/bin/ls"));
        let starts: Vec<u64> = p.mappings.iter().map(|m| m.start).collect();
        assert_eq!(starts, [0x5000, 0x9000, 0xb000]);
        assert_eq!(p.inherits_from, None);
        // The image before the exec: the child's own mapping, completed by
        // its parent (started before the log) from /proc.
        let before: Vec<&str> = p.previous.iter().map(|m| &*m.path).collect();
        assert_eq!(before, ["/bin/sh"]);
        assert_eq!(p.previous_inherits_from, Some(1));
    }

    #[test]
    fn a_forked_child_runs_its_parents_image() {
        let mut log = ProcessLog::new(16);
        let now = Instant::now();
        // Parent 10 exec'd under the log's watch; child 11 did not exec;
        // grandchild 12 of a process started before the agent (5).
        log.apply(
            Event::Exec {
                pid: 10,
                comm: "server".into(),
            },
            now,
        );
        let m = mmap(&mut log, 10, 0x1000, 0x3000, "/srv/server");
        log.apply(m, now);
        log.apply(Event::Fork { pid: 11, ppid: 10 }, now);
        let m = mmap(&mut log, 11, 0x2000, 0x2800, "/usr/lib/plugin.so");
        log.apply(m, now);
        let child = log.snapshot(11).unwrap();
        assert_eq!(child.name.as_deref(), Some("server"));
        let spans: Vec<(u64, u64)> = child.mappings.iter().map(|m| (m.start, m.end)).collect();
        // The child's own mapping wins where they overlap.
        assert_eq!(spans, [(0x2000, 0x2800)]);
        assert_eq!(child.inherits_from, None);

        log.apply(Event::Fork { pid: 12, ppid: 5 }, now);
        let orphan = log.snapshot(12).unwrap();
        assert_eq!(orphan.inherits_from, Some(5));
        // A process that started before the agent is not complete.
        let m = mmap(&mut log, 5, 0x1000, 0x2000, "/usr/lib/late.so");
        log.apply(m, now);
        assert_eq!(log.snapshot(5), None);
    }

    #[test]
    fn a_new_mapping_cuts_what_it_covers() {
        let mut log = ProcessLog::new(16);
        let mut v = Vec::new();
        let a = LoggedMapping {
            offset: 0x100,
            ..mapping(&mut log, 0x1000, 0x5000, "/a")
        };
        insert_mapping(&mut v, a);
        insert_mapping(&mut v, mapping(&mut log, 0x2000, 0x3000, "/b"));
        let spans: Vec<(u64, u64, u64, &str)> = v
            .iter()
            .map(|m| (m.start, m.end, m.offset, &*m.path))
            .collect();
        assert_eq!(
            spans,
            [
                (0x1000, 0x2000, 0x100, "/a"),
                (0x2000, 0x3000, 0, "/b"),
                (0x3000, 0x5000, 0x2100, "/a")
            ]
        );
    }

    #[test]
    fn exited_processes_are_kept_then_dropped_and_evicted_first_when_full() {
        let mut log = ProcessLog::new(2);
        let t0 = Instant::now();
        for pid in [1, 2] {
            log.apply(
                Event::Exec {
                    pid,
                    comm: "x".into(),
                },
                t0,
            );
        }
        log.apply(Event::Exit { pid: 1 }, t0);
        // Full: the exited process makes room for a new one.
        log.apply(
            Event::Exec {
                pid: 3,
                comm: "y".into(),
            },
            t0,
        );
        assert_eq!(log.snapshot(1), None);
        assert!(log.snapshot(3).is_some());
        assert_eq!(log.stats().evicted, 1);
        // Full of live processes: the next is counted, not logged.
        log.apply(
            Event::Exec {
                pid: 4,
                comm: "z".into(),
            },
            t0,
        );
        assert_eq!(log.snapshot(4), None);
        assert_eq!(log.stats().full, 1);
        // Retention.
        log.apply(Event::Exit { pid: 3 }, t0);
        log.expire(t0 + EXITED_RETENTION / 2);
        assert!(log.snapshot(3).is_some());
        log.expire(t0 + EXITED_RETENTION);
        assert_eq!(log.snapshot(3), None);
        assert_eq!(log.len(), 1);
    }

    #[test]
    fn a_reused_pid_starts_afresh() {
        let mut log = ProcessLog::new(8);
        let now = Instant::now();
        log.apply(
            Event::Exec {
                pid: 9,
                comm: "old".into(),
            },
            now,
        );
        let m = mmap(&mut log, 9, 0x1000, 0x2000, "/old");
        log.apply(m, now);
        log.apply(Event::Exit { pid: 9 }, now);
        log.apply(Event::Fork { pid: 9, ppid: 1 }, now);
        let p = log.snapshot(9).unwrap();
        assert!(p.mappings.is_empty());
        assert_eq!(p.inherits_from, Some(1));
        // The old exit record no longer removes the new process.
        log.expire(now + EXITED_RETENTION);
        assert!(log.snapshot(9).is_some());
    }

    /// The real thing: a child process run by this test shows up with its
    /// executable and name. Needs perf events for every process (root, or
    /// perf_event_paranoid <= -1); skipped otherwise.
    #[test]
    fn logs_a_real_short_lived_process() {
        let cpus: Vec<u32> = (0..std::thread::available_parallelism().map_or(1, |n| n.get()))
            .map(|c| c as u32)
            .collect();
        let events = match ProcessEvents::start(&cpus, 1024) {
            Ok(events) => events,
            // CI runs as root: there, this is a failure.
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipped: no perf events for every process here ({e})");
                return;
            }
            Err(e) => panic!("perf events for every process: {e}"),
        };
        let status = std::process::Command::new("/bin/true").status().unwrap();
        assert!(status.success());
        // The child has exited; find it among what was logged.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut state = lock(&events.state);
            state.catch_up();
            let found = state.log.procs.keys().copied().find_map(|pid| {
                let p = state.log.snapshot(pid)?;
                (p.exe.as_deref().is_some_and(|e| e.ends_with("/true"))).then_some(p)
            });
            if let Some(p) = found {
                assert_eq!(p.name.as_deref(), Some("true"));
                assert!(p.mappings.iter().any(|m| m.path.ends_with("/true")));
                assert!(p.mappings.iter().any(|m| m.path.contains("libc")));
                return;
            }
            drop(state);
            assert!(Instant::now() < deadline, "the child never showed up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
