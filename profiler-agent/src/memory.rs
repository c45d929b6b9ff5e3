//! The agent's memory ceiling: a watchdog reads the agent's anonymous
//! resident memory (heap, stacks: `/proc/self/statm` resident minus shared)
//! every drain window and, once it passes 90 % of the ceiling, sheds memory
//! in a fixed order until it is back under. File pages (the agent's own
//! code, the binaries it maps to name frames) are left out: the kernel
//! drops and reads them again as it needs, and they grow with the size of
//! the host's binaries, not with anything the agent keeps. The order:
//!
//! 1. the export queue goes to the spill directory (without one, its oldest
//!    half is dropped and counted), then the allocator is trimmed;
//! 2. the symbolizer's caches are evicted, then the allocator is trimmed.
//!
//! Every action is counted (see [`MemoryStats`]) and logged on state changes.
//! The RSS reading is a closure, so the decisions are unit-tested without
//! growing a real process.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

/// Default ceiling of `run`, in MiB.
pub const DEFAULT_LIMIT_MIB: u64 = 64;
/// Shedding starts at this share of the ceiling, in percent.
pub const THRESHOLD_PERCENT: u64 = 90;

/// One reading of the process's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReading {
    /// Resident set size now.
    pub rss_bytes: u64,
    /// The anonymous part of it (resident minus file and shared pages):
    /// what the ceiling applies to.
    pub anon_bytes: u64,
    /// Highest resident set size since start (`VmHWM`, kept by the kernel).
    pub peak_bytes: u64,
}

/// Resident pages (the second field of `/proc/PID/statm`) and the
/// anonymous ones among them (resident minus shared, the third), in bytes.
pub fn parse_statm(statm: &str, page_size: u64) -> Option<(u64, u64)> {
    let mut fields = statm.split_whitespace().skip(1);
    let resident: u64 = fields.next()?.parse().ok()?;
    let shared: u64 = fields.next()?.parse().ok()?;
    Some((
        resident.saturating_mul(page_size),
        resident.saturating_sub(shared).saturating_mul(page_size),
    ))
}

/// `VmHWM` of `/proc/PID/status`, in bytes.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Reads this process's RSS and peak RSS; `None` without procfs.
pub fn read_self() -> Option<MemoryReading> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = if page > 0 { page as u64 } else { 4096 };
    let (rss_bytes, anon_bytes) =
        parse_statm(&std::fs::read_to_string("/proc/self/statm").ok()?, page)?;
    let peak_bytes = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_vm_hwm(&s))
        .unwrap_or(0)
        .max(rss_bytes);
    Some(MemoryReading {
        rss_bytes,
        anon_bytes,
        peak_bytes,
    })
}

/// Whether a `/proc/self/maps` line is a read-only shared mapping of a
/// file: how blazesym maps the binaries it reads (memmap2's `map`). Code
/// and data the loader maps are private (`p`), never matched.
fn is_shared_read_only_file(line: &str) -> Option<(usize, usize)> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let perms = fields.next()?;
    let path = fields.nth(3)?;
    if perms != "r--s" || !path.starts_with('/') {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    (end > start).then_some((start, end - start))
}

/// Drops the pages of read-only shared file mappings (the binaries and
/// debug files blazesym has mapped) from the resident set; they are read
/// back from the page cache on the next access (a minor fault). Files
/// blazesym reads count in the agent's RSS as long as their pages stay
/// mapped: for a toolchain's 100+ MiB libraries, tens of MiB. Returns the
/// number of mappings advised.
pub fn release_mapped_files() -> usize {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return 0;
    };
    let mut released = 0;
    for (start, len) in maps.lines().filter_map(is_shared_read_only_file) {
        // SAFETY: the range is a whole read-only shared file mapping of this
        // process; MADV_DONTNEED on it only drops page-table entries, and
        // every later read sees the file's contents again.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) } == 0 {
            released += 1;
        }
    }
    released
}

/// Glibc malloc arenas the agent may use. Each thread that allocates while
/// another holds the main arena gets an arena of its own (up to 8 per CPU),
/// whose freed memory stays resident; the agent's few threads (drain,
/// pid announcer, exporter, metrics) allocate little at a time, so two are
/// enough.
pub const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`]; call before starting
/// threads. Returns whether the allocator took the setting.
pub fn limit_arenas() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's tuning parameters.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Gives freed heap memory back to the kernel (glibc's `malloc_trim`);
/// returns whether anything was released.
pub fn trim_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Counters and gauges of the watchdog (shown on `/metrics`).
#[derive(Debug, Default)]
pub struct MemoryStats {
    /// The ceiling, in bytes (0: no ceiling).
    pub limit_bytes: AtomicU64,
    /// RSS at the last check.
    pub rss_bytes: AtomicU64,
    /// Highest RSS seen (the kernel's `VmHWM`).
    pub peak_bytes: AtomicU64,
    /// Anonymous memory at the last check, and the most seen at a check.
    pub anon_bytes: AtomicU64,
    pub anon_peak_bytes: AtomicU64,
    /// Checks that found the RSS over the threshold.
    pub over_threshold: AtomicU64,
    /// Times the export queue was parked on disk (or its oldest half dropped).
    pub shed_queue: AtomicU64,
    /// Times the symbolizer's caches were evicted.
    pub shed_symbolizer: AtomicU64,
    /// Times the allocator was trimmed.
    pub shed_trim: AtomicU64,
    /// Checks after which the RSS was still over the threshold.
    pub still_over: AtomicU64,
}

impl MemoryStats {
    fn record(&self, reading: MemoryReading) {
        self.rss_bytes.store(reading.rss_bytes, Ordering::Relaxed);
        self.anon_bytes.store(reading.anon_bytes, Ordering::Relaxed);
        self.anon_peak_bytes
            .fetch_max(reading.anon_bytes, Ordering::Relaxed);
        self.peak_bytes
            .fetch_max(reading.peak_bytes.max(reading.rss_bytes), Ordering::Relaxed);
    }
}

/// One way of giving memory back, in the order the watchdog uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// Export queue to the spill directory (or oldest half dropped).
    ParkQueue,
    /// Symbolizer caches emptied.
    EvictSymbolizer,
    /// Free heap returned to the kernel.
    TrimAllocator,
}

impl Shed {
    /// Name used in logs and as the `action` label on `/metrics`.
    pub const fn name(self) -> &'static str {
        match self {
            Shed::ParkQueue => "park_queue",
            Shed::EvictSymbolizer => "evict_symbolizer",
            Shed::TrimAllocator => "trim_allocator",
        }
    }
}

/// What the watchdog acts on: the exporter, the symbolizer, the allocator.
pub trait Shedder {
    fn park_queue(&mut self);
    fn evict_symbolizer(&mut self);
    fn trim_allocator(&mut self) {
        trim_allocator();
    }
}

/// Reads the RSS each window and sheds memory near the ceiling.
pub struct Watchdog<R> {
    limit_bytes: u64,
    read: R,
    stats: Arc<MemoryStats>,
    /// Whether the last check ended over the threshold (for logging only
    /// state changes).
    over: bool,
}

const MIB: f64 = (1 << 20) as f64;

/// The watchdog of this process, reading `/proc/self`.
pub type SelfWatchdog = Watchdog<fn() -> Option<MemoryReading>>;

impl SelfWatchdog {
    pub fn for_self(limit_bytes: u64, stats: Arc<MemoryStats>) -> Self {
        Watchdog::new(
            limit_bytes,
            read_self as fn() -> Option<MemoryReading>,
            stats,
        )
    }
}

impl<R: FnMut() -> Option<MemoryReading>> Watchdog<R> {
    pub fn new(limit_bytes: u64, read: R, stats: Arc<MemoryStats>) -> Self {
        stats.limit_bytes.store(limit_bytes, Ordering::Relaxed);
        Self {
            limit_bytes,
            read,
            stats,
            over: false,
        }
    }

    /// RSS at which shedding starts.
    pub fn threshold(&self) -> u64 {
        self.limit_bytes / 100 * THRESHOLD_PERCENT
    }

    fn read(&mut self) -> Option<u64> {
        let reading = (self.read)()?;
        self.stats.record(reading);
        Some(reading.anon_bytes)
    }

    /// One check: reads the RSS and, over the threshold, sheds in order,
    /// reading again after each step and stopping once under. Returns the
    /// actions taken.
    pub fn check(&mut self, shedder: &mut dyn Shedder) -> Vec<Shed> {
        let mut done = Vec::new();
        let Some(first) = self.read() else {
            return done;
        };
        let threshold = self.threshold();
        if first < threshold {
            if self.over {
                tracing::info!(
                    rss_mib = first as f64 / MIB,
                    "memory back under the ceiling's threshold"
                );
                self.over = false;
            }
            return done;
        }
        self.stats.over_threshold.fetch_add(1, Ordering::Relaxed);
        let mut rss = first;
        let steps: [&[Shed]; 2] = [
            &[Shed::ParkQueue, Shed::TrimAllocator],
            &[Shed::EvictSymbolizer, Shed::TrimAllocator],
        ];
        for step in steps {
            for action in step {
                match action {
                    Shed::ParkQueue => {
                        shedder.park_queue();
                        self.stats.shed_queue.fetch_add(1, Ordering::Relaxed);
                    }
                    Shed::EvictSymbolizer => {
                        shedder.evict_symbolizer();
                        self.stats.shed_symbolizer.fetch_add(1, Ordering::Relaxed);
                    }
                    Shed::TrimAllocator => {
                        shedder.trim_allocator();
                        self.stats.shed_trim.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.push(*action);
            }
            rss = self.read().unwrap_or(rss);
            if rss < threshold {
                break;
            }
        }
        let names: Vec<&str> = done.iter().map(|a| a.name()).collect();
        let still_over = rss >= threshold;
        if still_over {
            self.stats.still_over.fetch_add(1, Ordering::Relaxed);
        }
        // Warn when the state changes; while it lasts, each window at debug.
        if !self.over || !still_over {
            tracing::warn!(
                rss_before_mib = first as f64 / MIB,
                rss_after_mib = rss as f64 / MIB,
                limit_mib = self.limit_bytes as f64 / MIB,
                actions = %names.join(","),
                still_over,
                "memory near the ceiling: shed"
            );
        } else {
            tracing::debug!(rss_mib = rss as f64 / MIB, actions = %names.join(","), "memory still over the threshold");
        }
        self.over = still_over;
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{cell::RefCell, rc::Rc};

    #[test]
    fn only_read_only_shared_file_mappings_are_released() {
        let m = |l| is_shared_read_only_file(l);
        assert_eq!(
            m("7f0000000000-7f0000003000 r--s 00000000 08:01 1234 /usr/lib/libx.so"),
            Some((0x7f0000000000, 0x3000))
        );
        // The loader's private mappings, writable ones, anonymous and BPF maps: kept.
        assert_eq!(
            m("7f0000000000-7f0000003000 r--p 00000000 08:01 1234 /usr/lib/libx.so"),
            None
        );
        assert_eq!(
            m("7f0000000000-7f0000003000 rw-s 00000000 08:01 1234 /dev/shm/x"),
            None
        );
        assert_eq!(
            m("7f0000000000-7f0000003000 r--s 00000000 00:0e 99 anon_inode:bpf-map"),
            None
        );
        assert_eq!(m("7f0000000000-7f0000003000 r--s 00000000 00:00 0"), None);
        // Does not fail without procfs, and leaves this process working.
        release_mapped_files();
    }

    #[test]
    fn parses_statm_and_status() {
        assert_eq!(
            parse_statm("5000 1234 300 10 0 900 0\n", 4096),
            Some((1234 * 4096, (1234 - 300) * 4096)),
            "resident, and its anonymous part"
        );
        assert_eq!(parse_statm("5000", 4096), None);
        let status =
            "Name:\tprofiler-agent\nVmPeak:\t  200000 kB\nVmHWM:\t   30000 kB\nVmRSS:\t 20000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(30000 * 1024));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
        let own = read_self().expect("procfs");
        assert!(own.rss_bytes > 0 && own.peak_bytes >= own.rss_bytes);
    }

    /// Records the actions and lowers the fake RSS as a real shed would.
    struct Fake {
        log: Rc<RefCell<Vec<&'static str>>>,
        rss: Rc<RefCell<Vec<u64>>>,
    }

    impl Shedder for Fake {
        fn park_queue(&mut self) {
            self.log.borrow_mut().push("park");
        }
        fn evict_symbolizer(&mut self) {
            self.log.borrow_mut().push("evict");
        }
        fn trim_allocator(&mut self) {
            self.log.borrow_mut().push("trim");
        }
    }

    /// A watchdog whose successive readings are `readings` (MiB).
    fn watchdog(
        readings: &[u64],
    ) -> (
        Watchdog<impl FnMut() -> Option<MemoryReading>>,
        Fake,
        Arc<MemoryStats>,
    ) {
        let rss = Rc::new(RefCell::new(
            readings.iter().rev().map(|m| m << 20).collect::<Vec<_>>(),
        ));
        let fake = Fake {
            log: Rc::default(),
            rss: rss.clone(),
        };
        let stats = Arc::new(MemoryStats::default());
        let read = move || {
            rss.borrow_mut().pop().map(|b| MemoryReading {
                rss_bytes: b,
                anon_bytes: b,
                peak_bytes: b,
            })
        };
        (Watchdog::new(64 << 20, read, stats.clone()), fake, stats)
    }

    #[test]
    fn under_the_threshold_nothing_happens() {
        let (mut w, mut fake, stats) = watchdog(&[40, 57]);
        assert_eq!(w.threshold(), (64 << 20) / 100 * 90);
        assert!(w.check(&mut fake).is_empty());
        assert!(w.check(&mut fake).is_empty(), "57 MiB < 57.6 MiB");
        assert!(fake.log.borrow().is_empty());
        assert_eq!(stats.rss_bytes.load(Ordering::Relaxed), 57 << 20);
        assert_eq!(stats.peak_bytes.load(Ordering::Relaxed), 57 << 20);
        assert_eq!(stats.over_threshold.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn parking_the_queue_is_enough_when_it_frees_the_memory() {
        let (mut w, mut fake, stats) = watchdog(&[60, 40]);
        assert_eq!(
            w.check(&mut fake),
            vec![Shed::ParkQueue, Shed::TrimAllocator]
        );
        assert_eq!(*fake.log.borrow(), ["park", "trim"]);
        assert_eq!(stats.shed_queue.load(Ordering::Relaxed), 1);
        assert_eq!(stats.shed_symbolizer.load(Ordering::Relaxed), 0);
        assert_eq!(stats.shed_trim.load(Ordering::Relaxed), 1);
        assert_eq!(stats.still_over.load(Ordering::Relaxed), 0);
        assert_eq!(stats.peak_bytes.load(Ordering::Relaxed), 60 << 20);
        assert_eq!(stats.rss_bytes.load(Ordering::Relaxed), 40 << 20);
        assert!(fake.rss.borrow().is_empty());
    }

    #[test]
    fn then_the_symbolizer_caches_go() {
        let (mut w, mut fake, stats) = watchdog(&[63, 61, 50]);
        assert_eq!(
            w.check(&mut fake),
            vec![
                Shed::ParkQueue,
                Shed::TrimAllocator,
                Shed::EvictSymbolizer,
                Shed::TrimAllocator
            ]
        );
        assert_eq!(*fake.log.borrow(), ["park", "trim", "evict", "trim"]);
        assert_eq!(stats.shed_symbolizer.load(Ordering::Relaxed), 1);
        assert_eq!(stats.shed_trim.load(Ordering::Relaxed), 2);
        assert_eq!(stats.still_over.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn still_over_after_every_step_is_counted_and_retried_next_window() {
        let (mut w, mut fake, stats) = watchdog(&[70, 70, 70, 70, 70, 70, 30]);
        assert_eq!(w.check(&mut fake).len(), 4);
        assert_eq!(stats.still_over.load(Ordering::Relaxed), 1);
        assert_eq!(w.check(&mut fake).len(), 4, "the next window sheds again");
        assert_eq!(stats.still_over.load(Ordering::Relaxed), 2);
        assert_eq!(stats.over_threshold.load(Ordering::Relaxed), 2);
        assert!(w.check(&mut fake).is_empty());
        assert_eq!(stats.peak_bytes.load(Ordering::Relaxed), 70 << 20);
    }

    #[test]
    fn no_procfs_no_action() {
        let (mut w, mut fake, _) = watchdog(&[]);
        assert!(w.check(&mut fake).is_empty());
    }
}
