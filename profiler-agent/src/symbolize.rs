//! Names for stack addresses: user frames through the process cache and
//! blazesym (ELF symbols and DWARF, inlined frames), kernel frames from
//! kallsyms.
//!
//! Naming rules (FlameGraph/inferno conventions):
//! - kernel frames end in `_[k]`, inlined frames in `_[i]`;
//! - a frame that cannot be named is `module+0xOFFSET` (file offset in that
//!   module), or `[unknown]` when the address is in no executable mapping
//!   (a stale frame pointer); never a bare address and never dropped;
//! - every frame but the leaf is a return address: it is looked up minus one
//!   so it lands in the calling instruction (and the right inlined scope);
//! - code in anonymous executable memory (JIT compilers) is named from the
//!   process's perf map ([`crate::process::perfmap`]) with `_[j]`, or shown
//!   as one `[jit]` frame per run of frames the map does not name.
//!
//! Hostile binaries (corrupt, truncated, huge, deleted, changed on disk) and
//! slow ones never stop a drain for long: each window has a time budget
//! ([`SymbolizeLimits::budget`]) checked between blazesym calls, which are
//! cut into chunks of [`CHUNK`] addresses; once it is spent the remaining
//! frames keep their `module+0xOFFSET` name for this window (they are looked
//! up again in the next one). DWARF of binaries over
//! [`SymbolizeLimits::max_dwarf_bytes`] is not read (names then come from
//! the ELF symbol table), a binary blazesym cannot read is not retried, and
//! a panic inside blazesym is caught. Each of these is counted in
//! [`SymbolizerCounters`].
use std::{
    collections::{hash_map::RandomState, HashMap, HashSet},
    hash::{BuildHasher, Hasher},
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use blazesym::symbolize::{
    evict,
    source::{Elf, Kernel, Source},
    Input, Symbolized, Symbolizer,
};

use crate::{
    loss::SymbolizerDegrade,
    process::{
        perfmap::{PerfMapLimits, PerfMapStats, PerfMaps},
        BinaryKey, Location, ProcessCache,
    },
    python::{eval_calls, splice, PythonNamer},
};
use profiler_common::python::PythonFrame;

pub use crate::names::sanitize;

/// Suffix of kernel frames.
pub const KERNEL_SUFFIX: &str = "_[k]";
/// A frame outside every known mapping (user) or symbol (kernel).
pub const UNKNOWN_FRAME: &str = "[unknown]";
/// Suffix of inlined frames.
pub const INLINED_SUFFIX: &str = "_[i]";
pub use crate::names::JIT_SUFFIX;
/// A run of frames of JIT-compiled code that no perf map names.
pub const JIT_FRAME: &str = "[jit]";

/// Turns stacks into frame names: the pipeline's symbolize stage
/// ([`BlazeSymbolizer`] for real, a table of names in tests).
pub trait Symbolize {
    /// Called before the stacks of each drain window: starts its time budget.
    fn start_window(&mut self) {}
    /// Names of a user stack of process `pid`, given leaf first as sampled;
    /// returned root first, inlined frames expanded.
    fn user_stack(&mut self, pid: u32, ips: &[u64]) -> Vec<String>;
    /// Names of a kernel stack given leaf first; returned root first.
    fn kernel_stack(&mut self, ips: &[u64]) -> Vec<String>;
    /// Binaries were closed: forget what was cached for them.
    fn forget_binaries(&mut self, _closed: &[(BinaryKey, std::path::PathBuf)]) {}
    /// Frees what can be looked up again (the memory watchdog's step).
    fn evict_caches(&mut self) {}
    /// The counters so far.
    fn stats(&self) -> SymbolizerStats {
        SymbolizerStats::default()
    }
}

/// The address to look up for the `index`-th frame of a leaf-first stack.
pub fn lookup_address(index: usize, ip: u64) -> u64 {
    if index == 0 {
        ip
    } else {
        ip.saturating_sub(1)
    }
}

/// Names for one symbolized address: the function, then each inlined call
/// inside it (outermost first) with `_[i]`.
pub fn symbol_frames(function: &str, inlined: &[&str]) -> Vec<String> {
    let mut frames = Vec::with_capacity(1 + inlined.len());
    frames.push(sanitize(function));
    frames.extend(
        inlined
            .iter()
            .map(|name| format!("{}{INLINED_SUFFIX}", sanitize(name))),
    );
    frames
}

/// Name of a frame that could not be symbolized.
pub fn unknown_frame(module: &str, offset: u64) -> String {
    format!("{}+{offset:#x}", sanitize(module))
}

/// Name of a frame of JIT-compiled code.
pub fn jit_frame(name: &str) -> String {
    format!("{}{JIT_SUFFIX}", sanitize(name))
}

/// Name of a kernel frame.
pub fn kernel_frame(name: &str) -> String {
    format!("{}{KERNEL_SUFFIX}", sanitize(name))
}

fn names_of(result: &Symbolized<'_>) -> Option<Vec<String>> {
    match result {
        Symbolized::Sym(sym) => {
            let inlined: Vec<&str> = sym.inlined.iter().map(|f| f.name.as_ref()).collect();
            Some(symbol_frames(&sym.name, &inlined))
        }
        Symbolized::Unknown(_) => None,
    }
}

/// Default time one drain window may spend naming frames: a fifth of the
/// default 10 s drain interval, so a slow window still leaves the drain
/// loop most of its interval (and the next drain starts on time).
pub const DEFAULT_SYMBOLIZE_BUDGET: Duration = Duration::from_secs(2);
/// Default size above which a binary's DWARF is not read.
pub const DEFAULT_MAX_DWARF_BYTES: u64 = 512 << 20;
/// Windows after which the names of Python code objects are read again.
const PYTHON_NAMES_WINDOWS: u32 = 60;
/// Addresses per blazesym call; the window's budget is checked between calls.
pub const CHUNK: usize = 256;
/// After naming addresses in a binary larger than this, the file pages
/// blazesym touched are dropped from the resident set at once (see
/// [`crate::memory::release_mapped_files`]), not at the end of the window:
/// a compiler's 150-200 MiB libraries would otherwise add up. Each call
/// reads `/proc/self/maps`, and the pages dropped are faulted in again by
/// the next lookup; a 64 MiB threshold measured no less CPU and a 10 MiB
/// higher peak on a host running builds.
pub const RELEASE_PAGES_BYTES: u64 = 4 << 20;

/// Bounds on the time and work spent naming frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolizeLimits {
    /// Time each window may spend in symbolization. Once spent, frames not
    /// yet named keep their `module+0xOFFSET` name for that window. Zero:
    /// no user frame is looked up.
    pub budget: Duration,
    /// Binaries larger than this (bytes) are named from ELF symbols only:
    /// no DWARF, so no inlined frames.
    pub max_dwarf_bytes: u64,
}

impl Default for SymbolizeLimits {
    fn default() -> Self {
        Self {
            budget: DEFAULT_SYMBOLIZE_BUDGET,
            max_dwarf_bytes: DEFAULT_MAX_DWARF_BYTES,
        }
    }
}

/// The symbolizer's counters, readable while it runs (e.g. by `/metrics`)
/// through [`BlazeSymbolizer::counters`].
#[derive(Debug, Default)]
pub struct SymbolizerCounters {
    /// Addresses answered from the cache.
    pub cache_hits: AtomicU64,
    /// Addresses looked up with blazesym.
    pub lookups: AtomicU64,
    /// Frames shown as `module+0xOFFSET` or `[unknown]`, for any reason.
    pub unnamed_frames: AtomicU64,
    /// Times the cache was emptied to stay within its bound.
    pub cache_resets: AtomicU64,
    /// Frames of JIT-compiled code named from a perf map.
    pub jit_frames_named: AtomicU64,
    /// Frames of JIT-compiled code no perf map names (shown as `[jit]`).
    pub jit_frames_unnamed: AtomicU64,
    /// Perf map entries held now.
    pub perf_map_entries: AtomicU64,
    /// Perf map lines that did not parse, skipped.
    pub perf_map_malformed_lines: AtomicU64,
    /// Perf map entries not kept (memory bound reached).
    pub perf_map_dropped_entries: AtomicU64,
    /// Perf map files refused (not regular, or owned by another user).
    pub perf_map_refused_files: AtomicU64,
    /// Work cut or degraded, by reason: windows over their time budget,
    /// frames left as `module+0xOFFSET` because the budget was spent,
    /// binaries named without DWARF (over `max_dwarf_bytes`), binaries
    /// blazesym could not read (corrupt or truncated ELF, changed on disk;
    /// not retried), panics inside blazesym (caught; the binary is then
    /// treated as unreadable).
    degraded: [AtomicU64; SymbolizerDegrade::COUNT],
}

impl SymbolizerCounters {
    fn bump(counter: &AtomicU64, by: u64) {
        if by != 0 {
            counter.fetch_add(by, Ordering::Relaxed);
        }
    }

    fn degrade(&self, reason: SymbolizerDegrade, by: u64) {
        Self::bump(&self.degraded[reason.index()], by);
    }

    /// A plain copy of the counters.
    pub fn snapshot(&self) -> SymbolizerStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SymbolizerStats {
            cache_hits: load(&self.cache_hits),
            lookups: load(&self.lookups),
            unnamed_frames: load(&self.unnamed_frames),
            cache_resets: load(&self.cache_resets),
            jit_frames_named: load(&self.jit_frames_named),
            jit_frames_unnamed: load(&self.jit_frames_unnamed),
            perf_map: PerfMapStats {
                entries: load(&self.perf_map_entries),
                malformed_lines: load(&self.perf_map_malformed_lines),
                dropped_entries: load(&self.perf_map_dropped_entries),
                refused_files: load(&self.perf_map_refused_files),
            },
            degraded: std::array::from_fn(|i| load(&self.degraded[i])),
        }
    }
}

/// Counters of the symbolizer's work (a copy of [`SymbolizerCounters`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SymbolizerStats {
    pub cache_hits: u64,
    pub lookups: u64,
    pub unnamed_frames: u64,
    pub cache_resets: u64,
    pub jit_frames_named: u64,
    pub jit_frames_unnamed: u64,
    pub perf_map: PerfMapStats,
    /// By reason; read with `stats[reason]`.
    pub degraded: [u64; SymbolizerDegrade::COUNT],
}

impl std::ops::Index<SymbolizerDegrade> for SymbolizerStats {
    type Output = u64;
    fn index(&self, reason: SymbolizerDegrade) -> &u64 {
        &self.degraded[reason.index()]
    }
}

/// Hasher of the name caches, whose keys are a few integers: one folded
/// multiply per word instead of SipHash's rounds (hashing was a tenth of a
/// warm window). Seeded at random per symbolizer, so a process cannot pick
/// addresses that all land in one bucket without seeing the hashes.
#[derive(Clone, Copy)]
struct FrameHasher(u64);

impl FrameHasher {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

    fn mix(&mut self, word: u64) {
        let product = u128::from(self.0 ^ word) * u128::from(Self::MULTIPLIER);
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Hasher for FrameHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Builds [`FrameHasher`]s from one random seed.
#[derive(Clone, Copy)]
struct FrameHashSeed(u64);

impl Default for FrameHashSeed {
    fn default() -> Self {
        Self(RandomState::new().hash_one(0x5eed_u64))
    }
}

impl BuildHasher for FrameHashSeed {
    type Hasher = FrameHasher;

    fn build_hasher(&self) -> FrameHasher {
        FrameHasher(self.0)
    }
}

type NameMap<K> = HashMap<K, CachedNames, FrameHashSeed>;

/// The frames one address is named with, as cached.
struct CachedNames {
    frames: Box<[String]>,
    /// The address could not be named (`module+0xOFFSET` / `[unknown]`).
    unnamed: bool,
}

impl CachedNames {
    fn named(frames: Vec<String>) -> Self {
        Self {
            frames: frames.into_boxed_slice(),
            unnamed: false,
        }
    }

    fn unnamed(frame: String) -> Self {
        Self {
            frames: Box::new([frame]),
            unnamed: true,
        }
    }
}

/// Runs `f`, turning a panic into `None`.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

fn new_blazesym() -> Symbolizer {
    Symbolizer::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .enable_demangling(true)
        // blazesym caches parsed files by path; our paths are fd numbers,
        // reused once a binary is closed. Reloading checks the file's
        // identity (a stat, on our cache misses only); a file changed on
        // disk is parsed again rather than read through a stale mapping.
        .enable_auto_reload(true)
        .build()
}

/// The real symbolizer: blazesym over the process cache's open binaries.
///
/// Results are cached per (binary, file offset) and per kernel address, so
/// steady-state symbolization reuses both blazesym's parsed files and our
/// names. The caches are bounded by `max_cached`.
pub struct BlazeSymbolizer {
    symbolizer: Symbolizer,
    /// kallsyms only: kept across [`Self::evict_caches`], since reading and
    /// sorting kallsyms again (100k+ lines) costs more CPU than it frees.
    kernel_symbolizer: Symbolizer,
    processes: Arc<Mutex<ProcessCache>>,
    /// Names of JIT-compiled code, from the processes' perf maps.
    perf_maps: PerfMaps,
    /// Names of Python frames, from the processes' code objects.
    python: PythonNamer,
    /// Windows since the Python names were last dropped (code objects can be
    /// freed and their memory reused).
    python_age: u32,
    user_cache: NameMap<(BinaryKey, u64)>,
    kernel_cache: NameMap<u64>,
    /// Binaries blazesym failed on: not looked up again while open.
    unreadable: HashSet<BinaryKey>,
    /// Binaries over `max_dwarf_bytes`: named from ELF symbols only.
    no_dwarf: HashSet<BinaryKey>,
    max_cached: usize,
    limits: SymbolizeLimits,
    counters: Arc<SymbolizerCounters>,
    clock: Box<dyn Fn() -> Instant + Send>,
    /// Start of the current window; `None` before the first window (no budget).
    window_start: Option<Instant>,
    /// The current window already ran out of budget (counted once).
    window_over: bool,
}

impl BlazeSymbolizer {
    /// A symbolizer with the default limits.
    pub fn new(processes: Arc<Mutex<ProcessCache>>) -> Self {
        Self::with_limits(processes, SymbolizeLimits::default())
    }

    pub fn with_limits(processes: Arc<Mutex<ProcessCache>>, limits: SymbolizeLimits) -> Self {
        // A binary truncated while blazesym has it mapped must not stop us.
        crate::sigbus::install();
        let proc_root = processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .proc_root()
            .to_path_buf();
        Self {
            symbolizer: new_blazesym(),
            kernel_symbolizer: new_blazesym(),
            processes,
            perf_maps: PerfMaps::new(proc_root, PerfMapLimits::default()),
            python: PythonNamer::default(),
            python_age: 0,
            user_cache: NameMap::default(),
            kernel_cache: NameMap::default(),
            unreadable: HashSet::new(),
            no_dwarf: HashSet::new(),
            max_cached: 1 << 18,
            limits,
            counters: Arc::default(),
            clock: Box::new(Instant::now),
            window_start: None,
            window_over: false,
        }
    }

    /// Replaces the clock the budget is measured with (for tests).
    pub fn with_clock(mut self, clock: impl Fn() -> Instant + Send + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    /// Counts into `counters` (e.g. created up front for `/metrics`).
    pub fn with_counters(mut self, counters: Arc<SymbolizerCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// A copy of the counters.
    pub fn stats(&self) -> SymbolizerStats {
        self.counters.snapshot()
    }

    /// The live counters, shared (for `/metrics`).
    pub fn counters(&self) -> Arc<SymbolizerCounters> {
        self.counters.clone()
    }

    /// Empties every cache, ours and blazesym's parsed files (the memory
    /// watchdog's second step); names are looked up again when needed. The
    /// parsed kallsyms stays: it has a fixed size, and the next window would
    /// read it again at once.
    pub fn evict_caches(&mut self) {
        self.user_cache = NameMap::default();
        self.kernel_cache = NameMap::default();
        self.symbolizer = new_blazesym();
        self.perf_maps.clear();
        self.python.clear();
    }

    /// Publishes the perf maps' counters in the shared counters.
    fn publish_perf_map_stats(&self) {
        let stats = self.perf_maps.stats();
        let c = &self.counters;
        c.perf_map_entries.store(stats.entries, Ordering::Relaxed);
        c.perf_map_malformed_lines
            .store(stats.malformed_lines, Ordering::Relaxed);
        c.perf_map_dropped_entries
            .store(stats.dropped_entries, Ordering::Relaxed);
        c.perf_map_refused_files
            .store(stats.refused_files, Ordering::Relaxed);
    }

    /// Whether the current window's budget is spent (counting the window the
    /// first time). Outside a window there is no budget.
    fn over_budget(&mut self) -> bool {
        let Some(start) = self.window_start else {
            return false;
        };
        let over = (self.clock)().saturating_duration_since(start) >= self.limits.budget;
        if over && !self.window_over {
            self.window_over = true;
            self.counters
                .degrade(SymbolizerDegrade::WindowsOverBudget, 1);
        }
        over
    }

    /// Forgets closed binaries: blazesym's parsed file (its path, an fd
    /// number, will name another file next) and our names for them.
    pub fn forget_binaries(&mut self, closed: &[(BinaryKey, std::path::PathBuf)]) {
        if closed.is_empty() {
            return;
        }
        for (_, path) in closed {
            let _ = self
                .symbolizer
                .evict(&evict::Evict::Elf(evict::Elf::new(path)));
        }
        let keys: HashSet<BinaryKey> = closed.iter().map(|(k, _)| *k).collect();
        self.user_cache.retain(|(key, _), _| !keys.contains(key));
        self.unreadable.retain(|key| !keys.contains(key));
        self.no_dwarf.retain(|key| !keys.contains(key));
    }

    fn keep_bounded(&mut self) {
        if self.user_cache.len() + self.kernel_cache.len() > self.max_cached {
            self.user_cache.clear();
            self.kernel_cache.clear();
            SymbolizerCounters::bump(&self.counters.cache_resets, 1);
        }
    }

    /// Symbolizes file offsets of one binary, filling the cache, a chunk at
    /// a time until the window's budget is spent: offsets left out are not
    /// cached, so the caller names them `module+0xOFFSET` for this window.
    fn symbolize_binary(
        &mut self,
        key: BinaryKey,
        path: &std::path::Path,
        module: &str,
        offsets: &[u64],
    ) {
        let mut elf = Elf::new(path);
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        if !self.no_dwarf.contains(&key)
            && !self.unreadable.contains(&key)
            && size > self.limits.max_dwarf_bytes
        {
            self.no_dwarf.insert(key);
            self.counters
                .degrade(SymbolizerDegrade::DwarfSkippedLarge, 1);
        }
        elf.debug_syms = !self.no_dwarf.contains(&key);
        let src = Source::Elf(elf);
        self.lookup_chunks(key, &src, module, offsets);
        // The pages of a large binary that blazesym read (symbol tables,
        // DWARF) leave the resident set as soon as its addresses are named:
        // the window's peak then holds one large binary's pages, not all of
        // them. Its parsed tables stay; a page read again is a minor fault.
        if size > RELEASE_PAGES_BYTES {
            crate::memory::release_mapped_files();
        }
    }

    /// Names `offsets` of one binary a chunk at a time (see
    /// [`Self::symbolize_binary`]).
    fn lookup_chunks(&mut self, key: BinaryKey, src: &Source<'_>, module: &str, offsets: &[u64]) {
        for chunk in offsets.chunks(CHUNK) {
            if self.unreadable.contains(&key) {
                // Named `module+0xOFFSET` without asking blazesym again.
                for offset in chunk {
                    let names = CachedNames::unnamed(unknown_frame(module, *offset));
                    self.user_cache.insert((key, *offset), names);
                }
                continue;
            }
            if self.over_budget() {
                return;
            }
            SymbolizerCounters::bump(&self.counters.lookups, chunk.len() as u64);
            let symbolizer = &self.symbolizer;
            // Names borrow from the mapped file: they are copied out inside
            // `checked`, so a fault while reading them is seen too.
            let outcome = crate::sigbus::checked(|| {
                guarded(|| {
                    symbolizer
                        .symbolize(src, Input::FileOffset(chunk))
                        .map(|results| results.iter().map(names_of).collect::<Vec<_>>())
                })
            });
            let mut results = match outcome {
                Err(crate::sigbus::MappedFileFault) => {
                    // The file shrank under blazesym's mapping: what it read
                    // may be zeros. Drop its mappings and never ask again.
                    tracing::warn!(
                        module,
                        "binary truncated while read; its frames stay unnamed"
                    );
                    self.symbolizer = new_blazesym();
                    self.unreadable.insert(key);
                    self.counters
                        .degrade(SymbolizerDegrade::BinariesUnreadable, 1);
                    Vec::new()
                }
                Ok(Some(Ok(results))) => results,
                Ok(Some(Err(error))) => {
                    tracing::debug!(%error, module, "binary not symbolizable");
                    self.unreadable.insert(key);
                    self.counters
                        .degrade(SymbolizerDegrade::BinariesUnreadable, 1);
                    Vec::new()
                }
                Ok(None) => {
                    tracing::warn!(
                        module,
                        "blazesym panicked; the binary's frames stay unnamed"
                    );
                    // Its caches may be half-updated: start from a fresh one.
                    self.symbolizer = new_blazesym();
                    self.unreadable.insert(key);
                    self.counters.degrade(SymbolizerDegrade::Panics, 1);
                    self.counters
                        .degrade(SymbolizerDegrade::BinariesUnreadable, 1);
                    Vec::new()
                }
            };
            for (i, offset) in chunk.iter().enumerate() {
                let names = match results.get_mut(i).and_then(Option::take) {
                    Some(frames) => CachedNames::named(frames),
                    None => CachedNames::unnamed(unknown_frame(module, *offset)),
                };
                self.user_cache.insert((key, *offset), names);
            }
        }
    }
}

impl Symbolize for BlazeSymbolizer {
    fn forget_binaries(&mut self, closed: &[(BinaryKey, std::path::PathBuf)]) {
        BlazeSymbolizer::forget_binaries(self, closed)
    }

    fn evict_caches(&mut self) {
        BlazeSymbolizer::evict_caches(self)
    }

    fn stats(&self) -> SymbolizerStats {
        BlazeSymbolizer::stats(self)
    }

    fn user_stack(&mut self, pid: u32, ips: &[u64]) -> Vec<String> {
        self.keep_bounded();
        // Python frames follow the native ones.
        let native_len = ips
            .iter()
            .position(|ip| PythonFrame::decode(*ip).is_some())
            .unwrap_or(ips.len());
        let (ips, python) = ips.split_at(native_len);
        let (locations, python_process): (Vec<Location>, _) = {
            let mut processes = self.processes.lock().unwrap_or_else(|e| e.into_inner());
            let python_process = if python.is_empty() {
                None
            } else {
                processes.python(pid).cloned()
            };
            let locations = ips
                .iter()
                .enumerate()
                .map(|(i, ip)| processes.locate(pid, lookup_address(i, *ip)))
                .collect();
            (locations, python_process)
        };
        let frames = self.native_names(pid, ips, locations);
        match python_process {
            Some(process) => {
                let python: Vec<PythonFrame> = python
                    .iter()
                    .filter_map(|w| PythonFrame::decode(*w))
                    .collect();
                let named = self.python.name(pid, &process, &python);
                // `-X perf`'s trampolines say again what the Python frames say.
                let frames = frames
                    .into_iter()
                    .filter(|f| !crate::python::is_perf_trampoline(f))
                    .collect();
                splice(frames, eval_calls(&named))
            }
            None => frames,
        }
    }

    fn kernel_stack(&mut self, ips: &[u64]) -> Vec<String> {
        self.kernel_names(ips)
    }

    fn start_window(&mut self) {
        self.window_start = Some((self.clock)());
        self.window_over = false;
        self.perf_maps.start_window();
        self.publish_perf_map_stats();
        self.python_age += 1;
        if self.python_age >= PYTHON_NAMES_WINDOWS {
            self.python_age = 0;
            self.python.clear();
        }
    }
}

impl BlazeSymbolizer {
    /// Names of native frames (root first), from their locations.
    fn native_names(&mut self, pid: u32, ips: &[u64], locations: Vec<Location>) -> Vec<String> {
        // Batch the cache misses per binary (none once the names are cached).
        let mut misses: HashMap<BinaryKey, (Arc<crate::process::Binary>, Vec<u64>)> =
            HashMap::new();
        let mut hits = 0;
        for location in &locations {
            if let Location::Binary {
                binary,
                file_offset,
            } = location
            {
                if self.user_cache.contains_key(&(binary.key, *file_offset)) {
                    hits += 1;
                } else {
                    let entry = misses
                        .entry(binary.key)
                        .or_insert_with(|| (binary.clone(), Vec::new()));
                    if !entry.1.contains(file_offset) {
                        entry.1.push(*file_offset);
                    }
                }
            }
        }
        SymbolizerCounters::bump(&self.counters.cache_hits, hits);
        for (key, (binary, offsets)) in misses {
            self.symbolize_binary(key, &binary.symbol_path, &binary.module_name(), &offsets);
        }

        // One cache lookup per frame, and the output allocated once.
        let cached: Vec<Option<&CachedNames>> = locations
            .iter()
            .map(|location| match location {
                Location::Binary {
                    binary,
                    file_offset,
                } => self.user_cache.get(&(binary.key, *file_offset)),
                _ => None,
            })
            .collect();
        let len = cached
            .iter()
            .map(|names| names.map_or(1, |n| n.frames.len()))
            .sum();
        let (mut unnamed, mut over_budget) = (0, 0);
        let (mut jit_named, mut jit_unnamed) = (0, 0);
        let mut frames: Vec<String> = Vec::with_capacity(len);
        let perf_maps = &mut self.perf_maps;
        for (i, (location, names)) in locations.iter().zip(&cached).enumerate().rev() {
            match (location, names) {
                (Location::Jit, _) => match perf_maps.lookup(pid, lookup_address(i, ips[i])) {
                    Some(name) => {
                        jit_named += 1;
                        frames.push(jit_frame(name));
                    }
                    None => {
                        jit_unnamed += 1;
                        // One frame for a run of unnamed JIT frames.
                        if frames.last().map(String::as_str) != Some(JIT_FRAME) {
                            frames.push(JIT_FRAME.to_string());
                        }
                    }
                },
                // Code mapped since the mappings were read may be a JIT's.
                (Location::Unknown, None) => {
                    match perf_maps.lookup(pid, lookup_address(i, ips[i])) {
                        Some(name) => {
                            jit_named += 1;
                            frames.push(jit_frame(name));
                        }
                        None => {
                            unnamed += 1;
                            frames.push(UNKNOWN_FRAME.to_string());
                        }
                    }
                }
                (_, Some(names)) => {
                    unnamed += u64::from(names.unnamed);
                    frames.extend(names.frames.iter().cloned());
                }
                // Not looked up: the window's budget was spent.
                (
                    Location::Binary {
                        binary,
                        file_offset,
                    },
                    None,
                ) => {
                    unnamed += 1;
                    over_budget += 1;
                    frames.push(unknown_frame(&binary.module_name(), *file_offset));
                }
                (Location::Module { name, offset }, None) => {
                    unnamed += 1;
                    frames.push(unknown_frame(name, *offset));
                }
            }
        }
        SymbolizerCounters::bump(&self.counters.unnamed_frames, unnamed);
        SymbolizerCounters::bump(&self.counters.jit_frames_named, jit_named);
        SymbolizerCounters::bump(&self.counters.jit_frames_unnamed, jit_unnamed);
        if jit_named + jit_unnamed > 0 {
            self.publish_perf_map_stats();
        }
        self.counters
            .degrade(SymbolizerDegrade::FramesOverBudget, over_budget);
        frames
    }

    /// Names of a kernel stack (root first).
    fn kernel_names(&mut self, ips: &[u64]) -> Vec<String> {
        self.keep_bounded();
        let addrs: Vec<u64> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| lookup_address(i, *ip))
            .collect();
        let mut misses: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|a| !self.kernel_cache.contains_key(a))
            .collect();
        SymbolizerCounters::bump(
            &self.counters.cache_hits,
            (addrs.len() - misses.len()) as u64,
        );
        misses.sort_unstable();
        misses.dedup();
        // Not cut by the budget: kallsyms is parsed once per run and then
        // searched in memory, so these calls stay short (their time still
        // counts against the window's budget).
        if !misses.is_empty() {
            SymbolizerCounters::bump(&self.counters.lookups, misses.len() as u64);
            let src = Source::Kernel(Kernel {
                // kallsyms is always there; a vmlinux search costs time and
                // rarely finds anything on production hosts.
                vmlinux: blazesym::MaybeDefault::None,
                ..Kernel::default()
            });
            let symbolizer = &self.kernel_symbolizer;
            let results = match guarded(|| symbolizer.symbolize(&src, Input::AbsAddr(&misses))) {
                Some(results) => results.unwrap_or_default(),
                None => {
                    tracing::warn!("blazesym panicked on kernel addresses");
                    self.kernel_symbolizer = new_blazesym();
                    self.counters.degrade(SymbolizerDegrade::Panics, 1);
                    Vec::new()
                }
            };
            for (i, addr) in misses.iter().enumerate() {
                let name = match results.get(i) {
                    Some(Symbolized::Sym(sym)) => kernel_frame(&sym.name),
                    _ => kernel_frame(UNKNOWN_FRAME),
                };
                self.kernel_cache
                    .insert(*addr, CachedNames::named(vec![name]));
            }
        }
        addrs
            .iter()
            .rev()
            .flat_map(|a| self.kernel_cache[a].frames.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naming_rules() {
        assert_eq!(sanitize("a;b\nc"), "a:b c");
        assert_eq!(sanitize("  "), "[unnamed]");
        assert_eq!(
            symbol_frames("outer", &["mid", "inner"]),
            vec!["outer", "mid_[i]", "inner_[i]"]
        );
        assert_eq!(unknown_frame("libfoo.so", 0x1a2b), "libfoo.so+0x1a2b");
        assert_eq!(kernel_frame("do_syscall_64"), "do_syscall_64_[k]");
    }

    #[test]
    fn return_addresses_are_adjusted_except_the_leaf() {
        assert_eq!(lookup_address(0, 0x1000), 0x1000);
        assert_eq!(lookup_address(1, 0x1000), 0xfff);
        assert_eq!(lookup_address(5, 0), 0);
    }

    #[inline(never)]
    fn a_function_to_find(x: u64) -> u64 {
        std::hint::black_box(x.wrapping_mul(31).rotate_left(7))
    }

    /// Symbolizes an address of this very test binary through /proc/self
    /// (no root needed) and checks the caches do their job.
    #[test]
    fn symbolizes_own_function_and_caches_it() {
        std::hint::black_box(a_function_to_find(3));
        let addr = a_function_to_find as *const () as u64 + 1;
        let processes = Arc::new(Mutex::new(ProcessCache::default()));
        let pid = std::process::id();
        assert!(processes.lock().unwrap().observe(pid));
        let mut sym = BlazeSymbolizer::new(processes.clone());

        // The function, possibly followed by what the compiler inlined
        // into its first instruction (e.g. `wrapping_mul_[i]`).
        let frames = sym.user_stack(pid, &[addr]);
        assert_eq!(frames[0], "a_function_to_find", "got {frames:?}");
        assert_eq!(sym.stats().lookups, 1);

        let again = sym.user_stack(pid, &[addr]);
        assert_eq!(again, frames);
        assert_eq!(
            sym.stats().lookups,
            1,
            "second lookup must come from the cache"
        );
        assert_eq!(sym.stats().cache_hits, 1);
        let processes = processes.lock().unwrap();
        assert_eq!(
            processes.binary_count() as u64,
            processes.stats().binaries_opened
        );
    }

    #[test]
    fn forgetting_a_binary_drops_its_cached_names() {
        let addr = a_function_to_find as *const () as u64 + 1;
        let processes = Arc::new(Mutex::new(ProcessCache::default()));
        let pid = std::process::id();
        assert!(processes.lock().unwrap().observe(pid));
        let mut sym = BlazeSymbolizer::new(processes.clone());
        sym.user_stack(pid, &[addr]);
        let key = match processes.lock().unwrap().locate(pid, addr) {
            Location::Binary { binary, .. } => (binary.key, binary.symbol_path.clone()),
            other => panic!("expected a binary, got {other:?}"),
        };
        sym.forget_binaries(&[key]);
        let frames = sym.user_stack(pid, &[addr]);
        assert_eq!(frames[0], "a_function_to_find", "got {frames:?}");
        assert_eq!(
            sym.stats().lookups,
            2,
            "names of a forgotten binary are looked up again"
        );
    }

    #[test]
    fn unmapped_address_gets_a_module_offset_name() {
        let processes = Arc::new(Mutex::new(ProcessCache::default()));
        let pid = std::process::id();
        processes.lock().unwrap().observe(pid);
        let mut sym = BlazeSymbolizer::new(processes);
        let frames = sym.user_stack(pid, &[0x10]);
        assert_eq!(frames, vec!["[unknown]"]);
        assert_eq!(sym.stats().unnamed_frames, 1);
    }

    #[inline(never)]
    fn another_function_to_find(x: u64) -> u64 {
        std::hint::black_box(x.wrapping_add(17).rotate_right(3))
    }

    /// This process, observed, and the module name and file offset of `addr`.
    fn own_process(addr: u64) -> (Arc<Mutex<ProcessCache>>, u32, String) {
        let processes = Arc::new(Mutex::new(ProcessCache::default()));
        let pid = std::process::id();
        assert!(processes.lock().unwrap().observe(pid));
        let fallback = match processes.lock().unwrap().locate(pid, addr) {
            Location::Binary {
                binary,
                file_offset,
            } => unknown_frame(&binary.module_name(), file_offset),
            other => panic!("expected a binary, got {other:?}"),
        };
        (processes, pid, fallback)
    }

    /// A clock the test moves by hand.
    fn manual_clock() -> (Arc<Mutex<Instant>>, impl Fn() -> Instant + Send + 'static) {
        let now = Arc::new(Mutex::new(Instant::now()));
        let read = now.clone();
        (now, move || *read.lock().unwrap())
    }

    #[test]
    fn zero_budget_keeps_every_frame_as_module_offset_and_counts_it() {
        let addr = a_function_to_find as *const () as u64;
        std::hint::black_box(a_function_to_find(1));
        let (processes, pid, fallback) = own_process(addr);
        let limits = SymbolizeLimits {
            budget: Duration::ZERO,
            ..SymbolizeLimits::default()
        };
        let mut sym = BlazeSymbolizer::with_limits(processes, limits);
        let window = crate::drain::RawWindow {
            samples: vec![
                crate::drain::RawSample {
                    thread_state: None,
                    waker: Vec::new(),
                    tgid: pid,
                    comm: "me".into(),
                    user: vec![addr, addr],
                    user_end: None,
                    kernel: vec![],
                    sample_type: crate::sample_type::SampleType::Cpu,
                    value: 3,
                },
                crate::drain::RawSample {
                    thread_state: None,
                    waker: Vec::new(),
                    tgid: pid,
                    comm: "me".into(),
                    user: vec![addr],
                    user_end: None,
                    kernel: vec![],
                    sample_type: crate::sample_type::SampleType::Cpu,
                    value: 2,
                },
            ],
            ..Default::default()
        };
        let samples = crate::fold::symbolize_window(&window, &mut sym);
        // The window is produced, every frame kept, none named.
        assert_eq!(samples.len(), 2);
        assert_eq!(samples.iter().map(|s| s.value).sum::<u64>(), 5);
        assert_eq!(samples[1].frames, vec![fallback.clone()]);
        assert_eq!(samples[0].frames.len(), 2);
        assert!(samples[0].frames.iter().all(|f| f.contains("+0x")));
        let stats = sym.stats();
        assert_eq!(stats.lookups, 0, "nothing looked up with a zero budget");
        assert_eq!(stats[SymbolizerDegrade::WindowsOverBudget], 1);
        assert_eq!(stats[SymbolizerDegrade::FramesOverBudget], 3);
        assert_eq!(stats.unnamed_frames, 3);

        crate::fold::symbolize_window(&window, &mut sym);
        assert_eq!(
            sym.stats()[SymbolizerDegrade::WindowsOverBudget],
            2,
            "counted once per window"
        );
        assert_eq!(sym.stats()[SymbolizerDegrade::FramesOverBudget], 6);
    }

    #[test]
    fn spent_budget_cuts_the_rest_of_the_window_only() {
        let first = a_function_to_find as *const () as u64;
        let second = another_function_to_find as *const () as u64;
        std::hint::black_box((a_function_to_find(1), another_function_to_find(2)));
        let (processes, pid, _) = own_process(first);
        let second_fallback = own_process(second).2;
        let (now, clock) = manual_clock();
        let limits = SymbolizeLimits {
            budget: Duration::from_secs(2),
            ..SymbolizeLimits::default()
        };
        let mut sym = BlazeSymbolizer::with_limits(processes, limits).with_clock(clock);
        let advance = |secs| *now.lock().unwrap() += Duration::from_secs(secs);

        sym.start_window();
        let named = sym.user_stack(pid, &[first]);
        assert!(named[0].contains("a_function_to_find"), "{named:?}");
        advance(3);
        // Budget spent: a new address stays unnamed, a cached one is still named.
        assert_eq!(
            sym.user_stack(pid, &[second]),
            vec![second_fallback.clone()]
        );
        assert_eq!(sym.user_stack(pid, &[first]), named);
        let stats = sym.stats();
        assert_eq!(
            (
                stats[SymbolizerDegrade::WindowsOverBudget],
                stats[SymbolizerDegrade::FramesOverBudget]
            ),
            (1, 1)
        );

        // The next window has a fresh budget, and the frame cut before is named.
        sym.start_window();
        advance(1);
        let frames = sym.user_stack(pid, &[second]);
        assert!(frames[0].contains("another_function_to_find"), "{frames:?}");
        let stats = sym.stats();
        assert_eq!(
            (
                stats[SymbolizerDegrade::WindowsOverBudget],
                stats[SymbolizerDegrade::FramesOverBudget]
            ),
            (1, 1)
        );
    }

    #[test]
    fn no_budget_outside_a_window() {
        let addr = a_function_to_find as *const () as u64;
        let (processes, pid, _) = own_process(addr);
        let limits = SymbolizeLimits {
            budget: Duration::ZERO,
            ..SymbolizeLimits::default()
        };
        let mut sym = BlazeSymbolizer::with_limits(processes, limits);
        let frames = sym.user_stack(pid, &[addr]);
        assert!(frames[0].contains("a_function_to_find"), "{frames:?}");
        assert_eq!(sym.stats()[SymbolizerDegrade::WindowsOverBudget], 0);
    }

    #[test]
    fn a_cached_unnamed_frame_is_counted_every_time() {
        let addr = a_function_to_find as *const () as u64;
        let (processes, pid, fallback) = own_process(addr);
        let mut sym = BlazeSymbolizer::new(processes.clone());
        let location = processes.lock().unwrap().locate(pid, addr);
        let Location::Binary {
            binary,
            file_offset,
        } = location
        else {
            panic!("expected a binary, got {location:?}");
        };
        // As a binary blazesym cannot read leaves it.
        sym.user_cache.insert(
            (binary.key, file_offset),
            CachedNames::unnamed(fallback.clone()),
        );
        for round in 1..=2 {
            assert_eq!(sym.user_stack(pid, &[addr]), vec![fallback.clone()]);
            assert_eq!(sym.stats().unnamed_frames, round);
        }
        assert_eq!((sym.stats().lookups, sym.stats().cache_hits), (0, 2));
    }

    #[test]
    fn frame_hasher_spreads_nearby_offsets() {
        let seed = FrameHashSeed::default();
        let key = BinaryKey {
            dev_major: 8,
            dev_minor: 1,
            inode: 42,
        };
        let hashes: Vec<u64> = (0..4096u64)
            .map(|o| seed.hash_one((key, 0x1000 + o)))
            .collect();
        // Low bits pick the bucket, the top seven are hashbrown's tag;
        // random hashes would give about 2,590 and 128 distinct values.
        let low: HashSet<u64> = hashes.iter().map(|h| h & 4095).collect();
        let top: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(low.len() > 2_300, "{} distinct low bits", low.len());
        assert_eq!(top.len(), 128);
    }

    #[test]
    fn a_panic_is_caught() {
        assert_eq!(guarded(|| 7), Some(7));
        assert_eq!(guarded(|| -> u32 { panic!("boom") }), None);
    }

    #[test]
    fn shared_counters_are_live() {
        let counters = Arc::new(SymbolizerCounters::default());
        let addr = a_function_to_find as *const () as u64;
        let (processes, pid, _) = own_process(addr);
        let mut sym = BlazeSymbolizer::new(processes).with_counters(counters.clone());
        sym.user_stack(pid, &[addr, 0x10]);
        assert_eq!(counters.lookups.load(Ordering::Relaxed), 1);
        assert_eq!(counters.unnamed_frames.load(Ordering::Relaxed), 1);
        assert_eq!(sym.stats(), counters.snapshot());
    }
}
