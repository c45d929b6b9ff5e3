//! The unwind tables in the kernel's maps: which binary's rows are where,
//! and which executable mappings each process has.
//!
//! - `UNWIND_ROWS`, one large array of [`UnwindRow`]s sized by
//!   `--unwind-table-mib`: each loaded binary owns a contiguous slice. One
//!   plain array (rather than a map of maps) keeps the program's lookups
//!   inlined array accesses: an inner map loses them (every step of the
//!   binary search would be a helper call).
//! - `UNWIND_TABLES`: per table id, where its slice is ([`TableInfo`]).
//! - `EXEC_MAPPINGS` + `PROC_INFO`: per process, a sorted slice of its
//!   executable mappings (start, end, load bias, table id).
//!
//! Tables are built from the binary's CFI ([`crate::unwind::build_table`])
//! when a process mapping it is first announced, keyed by build id (else
//! device and inode), and shared by every process that maps the binary.
//! A table no process uses any more is kept for reuse and evicted, least
//! recently used first, when rows are needed. Rows, mapping slices and table
//! ids are reused only a grace period after nothing points at them, so a
//! program walking a stack never reads rows being rewritten.
use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use profiler_common::python::PyProc;
use profiler_common::unwind::{
    mapping_kind, ExecMapping, ProcInfo, TableInfo, UnwindRow, EXEC_MAPPINGS_ENTRIES, MAX_MAPPINGS,
    MAX_TABLES, NO_TABLE,
};

use super::array::BatchArray;
use crate::{
    process::{BinaryKey, Mapping},
    unwind::{build_table, TableError, UnwindStats, UnwindTable},
};

/// The failure reason counted for a binary without a table.
fn failure_name(e: &TableError) -> &'static str {
    match e {
        TableError::NotElf => "not_elf",
        TableError::BadElf(_) => "bad_elf",
        TableError::NotX86_64(_) => "not_x86_64",
        TableError::NoCfi => "no_cfi",
        TableError::BadCfi { .. } => "bad_cfi",
        TableError::BadCompressed { .. } => "bad_compressed",
        TableError::TooManyRows { .. } => "too_many_rows",
        TableError::SpanTooLarge { .. } => "span_too_large",
    }
}

/// How long a released slice waits before reuse: far longer than one walk.
const GRACE: Duration = Duration::from_millis(200);

/// What identifies a table: the same build id is the same code wherever it
/// is; without one, the file.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TableKey {
    BuildId(Vec<u8>),
    File(BinaryKey),
}

/// A first-fit allocator of ranges of array slots.
#[derive(Debug)]
struct Ranges {
    /// Free ranges (start, len), sorted by start, never adjacent.
    free: Vec<(u32, u32)>,
    /// Released ranges and when; free after [`GRACE`].
    pending: Vec<(Instant, u32, u32)>,
}

impl Ranges {
    fn new(capacity: u32) -> Self {
        Self {
            free: if capacity > 0 {
                vec![(0, capacity)]
            } else {
                Vec::new()
            },
            pending: Vec::new(),
        }
    }

    fn alloc(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            return Some(0);
        }
        let i = self.free.iter().position(|&(_, l)| l >= len)?;
        let (start, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (start + len, l - len);
        }
        Some(start)
    }

    fn release(&mut self, start: u32, len: u32, now: Instant) {
        if len > 0 {
            self.pending.push((now, start, len));
        }
    }

    /// Frees the released ranges whose grace period is over.
    fn settle(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.pending.len() {
            let (at, start, len) = self.pending[i];
            if now.duration_since(at) >= GRACE {
                self.pending.swap_remove(i);
                self.insert_free(start, len);
            } else {
                i += 1;
            }
        }
    }

    fn insert_free(&mut self, start: u32, len: u32) {
        let i = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(i, (start, len));
        // Merge with the next, then with the previous.
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }

    fn free_total(&self) -> u64 {
        self.free.iter().map(|&(_, l)| l as u64).sum()
    }
}

/// A table in the maps.
#[derive(Debug)]
struct Loaded {
    id: u32,
    first_row: u32,
    rows: u32,
    /// Executable segments: (file offset, virtual address, size).
    segments: Vec<(u64, u64, u64)>,
    /// Processes using it now.
    users: u32,
    /// When `users` last dropped to 0.
    idle_since: Option<Instant>,
    /// For LRU eviction: the loader's clock when last used.
    last_used: u64,
}

/// A process in the maps.
#[derive(Debug)]
struct LoadedProcess {
    first: u32,
    count: u32,
    tables: Vec<TableKey>,
}

/// The maps the program unwinds with, and what is in them; also the map
/// of announced processes (`KNOWN_PIDS`).
pub struct UnwindMaps {
    known_pids: BpfHashMap<MapData, u32, u8>,
    rows: BatchArray<UnwindRow>,
    tables: Array<MapData, TableInfo>,
    mappings: BatchArray<ExecMapping>,
    procs: BpfHashMap<MapData, u32, ProcInfo>,
    /// Python processes whose frames the program walks (`PY_PROCS`).
    python: BpfHashMap<MapData, u32, PyProc>,
    row_space: Ranges,
    mapping_space: Ranges,
    /// Free table ids.
    free_ids: Vec<u32>,
    loaded: HashMap<TableKey, Loaded>,
    /// Files already resolved to a table key (or to a failure, `None`).
    files: HashMap<BinaryKey, Option<TableKey>>,
    processes: HashMap<u32, LoadedProcess>,
    clock: u64,
    /// The last [`TableInfo::generation`] or [`ProcInfo::generation`]
    /// given out.
    generation: u32,
    stats: UnwindStats,
}

/// What the agent needs of an ELF file beyond its CFI.
struct ElfLayout {
    build_id: Option<Vec<u8>>,
    /// Executable PT_LOAD segments: (file offset, virtual address, size).
    segments: Vec<(u64, u64, u64)>,
}

fn elf_layout(data: &[u8]) -> Option<ElfLayout> {
    use object::{Object, ObjectSegment};
    let file = object::File::parse(data).ok()?;
    let build_id = file.build_id().ok().flatten().map(<[u8]>::to_vec);
    let segments = file
        .segments()
        .filter(|s| match s.flags() {
            object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
            _ => false,
        })
        .map(|s| {
            let (offset, size) = s.file_range();
            (offset, s.address(), size)
        })
        .collect();
    Some(ElfLayout { build_id, segments })
}

/// The bias of a mapping: `address - bias` is the binary's own address.
/// The mapping starts at file offset `offset`, inside one of `segments`.
pub(super) fn mapping_bias(start: u64, offset: u64, segments: &[(u64, u64, u64)]) -> Option<u64> {
    let &(seg_offset, seg_vaddr, _) = segments
        .iter()
        .find(|&&(o, _, size)| offset >= o && offset < o + size.max(1))
        .or_else(|| segments.first())?;
    let vaddr = seg_vaddr.wrapping_add(offset.wrapping_sub(seg_offset));
    Some(start.wrapping_sub(vaddr))
}

impl UnwindMaps {
    pub(super) fn new(
        known_pids: BpfHashMap<MapData, u32, u8>,
        rows: BatchArray<UnwindRow>,
        tables: Array<MapData, TableInfo>,
        mappings: BatchArray<ExecMapping>,
        procs: BpfHashMap<MapData, u32, ProcInfo>,
        python: BpfHashMap<MapData, u32, PyProc>,
    ) -> Self {
        let capacity = rows.len();
        Self {
            known_pids,
            rows,
            tables,
            mappings,
            procs,
            python,
            row_space: Ranges::new(capacity),
            mapping_space: Ranges::new(EXEC_MAPPINGS_ENTRIES),
            free_ids: (0..MAX_TABLES).rev().collect(),
            loaded: HashMap::new(),
            files: HashMap::new(),
            processes: HashMap::new(),
            clock: 0,
            generation: 0,
            stats: UnwindStats {
                rows_capacity: capacity as u64,
                ..UnwindStats::default()
            },
        }
    }

    pub fn stats(&self) -> UnwindStats {
        let mut stats = self.stats.clone();
        stats.rows_used = stats.rows_capacity
            - self.row_space.free_total()
            - self
                .row_space
                .pending
                .iter()
                .map(|p| p.2 as u64)
                .sum::<u64>();
        stats.tables_loaded = self.loaded.len() as u64;
        stats
    }

    /// Loads (or reloads) the executable mappings of process `pid`, building
    /// the tables of binaries seen for the first time. `mappings` comes from
    /// the process cache; `pid_dir` is `/proc/PID` (for the vDSO).
    pub fn load_process(&mut self, pid: u32, mappings: &[Mapping], pid_dir: &Path) {
        let now = Instant::now();
        self.settle(now);
        self.clock += 1;
        let mut entries: Vec<ExecMapping> = Vec::with_capacity(mappings.len());
        let mut used: Vec<TableKey> = Vec::new();
        for m in mappings {
            let mut entry = ExecMapping {
                start: m.start,
                end: m.end,
                bias: 0,
                table: NO_TABLE,
                kind: mapping_kind::FILE,
            };
            let table = if let Some(binary) = &m.binary {
                self.table_for_file(binary.key, &binary.symbol_path)
            } else if m.name == "[vdso]" {
                entry.kind = mapping_kind::VDSO;
                self.table_for_vdso(pid_dir, m.start, m.end)
            } else {
                if crate::process::is_anonymous(&m.name) {
                    entry.kind = mapping_kind::ANONYMOUS;
                }
                None
            };
            if let Some(key) = table {
                if let Some(loaded) = self.loaded.get_mut(&key) {
                    let offset = if entry.kind == mapping_kind::VDSO {
                        0
                    } else {
                        m.offset
                    };
                    if let Some(bias) = mapping_bias(m.start, offset, &loaded.segments) {
                        entry.bias = bias;
                        entry.table = loaded.id;
                        loaded.last_used = self.clock;
                        if !used.contains(&key) {
                            used.push(key);
                        }
                    }
                }
            }
            entries.push(entry);
        }
        if entries.len() > MAX_MAPPINGS {
            self.stats.processes_truncated += 1;
            entries.truncate(MAX_MAPPINGS);
        }
        self.stats.processes_loaded += 1;
        // The new slice first, then the pointer to it, then release the old.
        let Some(first) = self.mapping_space.alloc(entries.len() as u32) else {
            self.stats.processes_not_fitting += 1;
            return;
        };
        if self.mappings.write(first, &entries).is_err() {
            self.mapping_space.release(first, entries.len() as u32, now);
            self.stats.processes_not_fitting += 1;
            return;
        }
        self.generation = self.generation.checked_add(1).unwrap_or(1);
        let info = ProcInfo {
            first,
            count: entries.len() as u32,
            generation: self.generation,
        };
        if self.procs.insert(pid, info, 0).is_err() {
            self.mapping_space.release(first, info.count, now);
            self.stats.processes_not_fitting += 1;
            return;
        }
        for key in &used {
            if let Some(loaded) = self.loaded.get_mut(key) {
                loaded.users += 1;
                loaded.idle_since = None;
            }
        }
        let new = LoadedProcess {
            first,
            count: info.count,
            tables: used,
        };
        if let Some(old) = self.processes.insert(pid, new) {
            self.release_process(old, now);
        }
    }

    /// Marks a process announced again after a refresh, so its next walk
    /// that leaves its mappings asks again.
    pub fn refreshed(&mut self, pid: u32) {
        let _ = self
            .known_pids
            .insert(pid, profiler_common::announce::NEW as u8, 0);
    }

    /// Tells the program how to walk the Python frames of process `pid`
    /// (`None`: it runs no Python the agent reads). Returns false when the
    /// map is full.
    pub fn set_python(&mut self, pid: u32, walk: Option<PyProc>) -> bool {
        match walk {
            Some(walk) => self.python.insert(pid, walk, 0).is_ok(),
            None => {
                let _ = self.python.remove(&pid);
                true
            }
        }
    }

    /// Forgets a process that is gone: a reused pid is announced anew.
    pub fn forget_process(&mut self, pid: u32) {
        let _ = self.known_pids.remove(&pid);
        let _ = self.python.remove(&pid);
        let now = Instant::now();
        if let Some(old) = self.processes.remove(&pid) {
            let _ = self.procs.remove(&pid);
            self.release_process(old, now);
        }
        self.settle(now);
    }

    fn release_process(&mut self, old: LoadedProcess, now: Instant) {
        self.mapping_space.release(old.first, old.count, now);
        for key in old.tables {
            if let Some(loaded) = self.loaded.get_mut(&key) {
                loaded.users = loaded.users.saturating_sub(1);
                loaded.last_used = self.clock;
                if loaded.users == 0 {
                    loaded.idle_since = Some(now);
                }
            }
        }
    }

    fn settle(&mut self, now: Instant) {
        self.row_space.settle(now);
        self.mapping_space.settle(now);
    }

    /// The table of a file-backed mapping, built and loaded at first sight.
    fn table_for_file(&mut self, file: BinaryKey, path: &Path) -> Option<TableKey> {
        if let Some(known) = self.files.get(&file) {
            if let Some(key) = known {
                if self.loaded.contains_key(key) {
                    return Some(key.clone());
                }
            } else {
                return None;
            }
        }
        // Read, never map: a file truncated while read is an error here,
        // not a SIGBUS.
        let data = match std::fs::read(path) {
            Ok(data) => data,
            Err(_) => {
                *self.stats.build_failures.entry("unreadable").or_default() += 1;
                self.files.insert(file, None);
                return None;
            }
        };
        let key = self.load_image(&data, Some(file));
        self.files.insert(file, key.clone());
        key
    }

    /// The vDSO's table, from the process's `[vdso]` image (the same kernel
    /// image for every process: shared by build id).
    fn table_for_vdso(&mut self, pid_dir: &Path, start: u64, end: u64) -> Option<TableKey> {
        use std::os::unix::fs::FileExt;
        let len = end.checked_sub(start)? as usize;
        if len > 1 << 20 {
            return None;
        }
        let mut data = vec![0u8; len];
        let file = std::fs::File::open(pid_dir.join("mem")).ok()?;
        file.read_exact_at(&mut data, start).ok()?;
        self.load_image(&data, None)
    }

    /// Builds and loads the table of an ELF image unless a table with the
    /// same build id is loaded.
    fn load_image(&mut self, data: &[u8], file: Option<BinaryKey>) -> Option<TableKey> {
        let layout = elf_layout(data);
        let key = match (layout.as_ref().and_then(|l| l.build_id.clone()), file) {
            (Some(id), _) => TableKey::BuildId(id),
            (None, Some(file)) => TableKey::File(file),
            (None, None) => return None,
        };
        if self.loaded.contains_key(&key) {
            return Some(key);
        }
        let started = Instant::now();
        let built = build_table(data);
        self.stats.build_time += started.elapsed();
        let table: UnwindTable = match built {
            Ok(table) => table,
            Err(e) => {
                *self
                    .stats
                    .build_failures
                    .entry(failure_name(&e))
                    .or_default() += 1;
                return None;
            }
        };
        self.stats.tables_built += 1;
        let segments = layout.map(|l| l.segments).unwrap_or_default();
        let rows = table.rows.len() as u32;
        let first_row = self.alloc_rows(rows)?;
        let Some(id) = self.free_ids.pop() else {
            self.row_space.release(first_row, rows, Instant::now());
            self.stats.tables_not_fitting += 1;
            return None;
        };
        if self.rows.write(first_row, &table.rows).is_err() {
            self.row_space.release(first_row, rows, Instant::now());
            self.free_ids.push(id);
            *self.stats.build_failures.entry("map_write").or_default() += 1;
            return None;
        }
        self.generation = self.generation.checked_add(1).unwrap_or(1);
        let info = TableInfo {
            base: table.base,
            first_row,
            rows,
            generation: self.generation,
            _pad: 0,
        };
        if self.tables.set(id, info, 0).is_err() {
            self.row_space.release(first_row, rows, Instant::now());
            self.free_ids.push(id);
            *self.stats.build_failures.entry("map_write").or_default() += 1;
            return None;
        }
        self.loaded.insert(
            key.clone(),
            Loaded {
                id,
                first_row,
                rows,
                segments,
                users: 0,
                idle_since: Some(Instant::now()),
                last_used: self.clock,
            },
        );
        Some(key)
    }

    /// Room for `rows` rows, evicting tables unused for a grace period
    /// (least recently used first) when needed.
    fn alloc_rows(&mut self, rows: u32) -> Option<u32> {
        loop {
            if let Some(first) = self.row_space.alloc(rows) {
                return Some(first);
            }
            let now = Instant::now();
            let victim = self
                .loaded
                .iter()
                .filter(|(_, t)| {
                    t.users == 0
                        && t.idle_since
                            .is_some_and(|at| now.duration_since(at) >= GRACE)
                })
                .min_by_key(|(_, t)| t.last_used)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else {
                self.stats.tables_not_fitting += 1;
                return None;
            };
            self.evict(&victim);
        }
    }

    /// Drops a table unused for a grace period: no mapping has pointed at
    /// it for that long, so its rows and id are free at once.
    fn evict(&mut self, key: &TableKey) {
        let Some(table) = self.loaded.remove(key) else {
            return;
        };
        let _ = self.tables.set(table.id, TableInfo::default(), 0);
        self.row_space.insert_free(table.first_row, table.rows);
        self.free_ids.push(table.id);
        self.files.retain(|_, k| k.as_ref() != Some(key));
        self.stats.tables_evicted += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_allocate_release_and_merge_after_the_grace_period() {
        let mut r = Ranges::new(100);
        let a = r.alloc(40).unwrap();
        let b = r.alloc(40).unwrap();
        assert_eq!((a, b), (0, 40));
        assert!(r.alloc(30).is_none());
        let t0 = Instant::now();
        r.release(a, 40, t0);
        r.release(b, 40, t0);
        r.settle(t0);
        assert!(
            r.alloc(30).is_none(),
            "released ranges wait for the grace period"
        );
        r.settle(t0 + GRACE);
        assert_eq!(r.free, vec![(0, 100)], "neighbours merge");
        assert_eq!(r.alloc(100), Some(0));
    }

    #[test]
    fn bias_of_pie_and_fixed_mappings() {
        // PIE: text at file offset 0x1000, vaddr 0x1000, mapped at 0x5555_5555_5000.
        let segs = [(0x1000, 0x1000, 0x2000)];
        assert_eq!(
            mapping_bias(0x5555_5555_5000, 0x1000, &segs),
            Some(0x5555_5555_4000)
        );
        // Non-PIE: vaddr 0x401000 mapped at 0x401000: no bias.
        let segs = [(0x1000, 0x401000, 0x2000)];
        assert_eq!(mapping_bias(0x401000, 0x1000, &segs), Some(0));
    }
}
