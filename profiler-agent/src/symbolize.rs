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
//!   so it lands in the calling instruction (and the right inlined scope).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use blazesym::symbolize::{
    evict,
    source::{Elf, Kernel, Source},
    Input, Symbolized, Symbolizer,
};

use crate::process::{BinaryKey, Location, ProcessCache};

/// Suffix of kernel frames.
pub const KERNEL_SUFFIX: &str = "_[k]";
/// A frame outside every known mapping (user) or symbol (kernel).
pub const UNKNOWN_FRAME: &str = "[unknown]";
/// Suffix of inlined frames.
pub const INLINED_SUFFIX: &str = "_[i]";

/// Turns stacks into frame names.
pub trait Symbolize {
    /// Names of a user stack of process `pid`, given leaf first as sampled;
    /// returned root first, inlined frames expanded.
    fn user_stack(&mut self, pid: u32, ips: &[u64]) -> Vec<String>;
    /// Names of a kernel stack given leaf first; returned root first.
    fn kernel_stack(&mut self, ips: &[u64]) -> Vec<String>;
}

/// The address to look up for the `index`-th frame of a leaf-first stack.
pub fn lookup_address(index: usize, ip: u64) -> u64 {
    if index == 0 {
        ip
    } else {
        ip.saturating_sub(1)
    }
}

/// Replaces characters that would break a folded line (`;` separates frames,
/// a newline ends the line) and trims the name.
pub fn sanitize(name: &str) -> String {
    let name = name.trim();
    if name.is_empty() {
        return "[unnamed]".into();
    }
    name.chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect()
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

/// Counters of the symbolizer's work.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SymbolizerStats {
    /// Addresses answered from the cache.
    pub cache_hits: u64,
    /// Addresses looked up with blazesym.
    pub lookups: u64,
    /// Frames shown as `module+0xOFFSET`.
    pub unnamed_frames: u64,
    /// Times the cache was emptied to stay within its bound.
    pub cache_resets: u64,
}

/// The real symbolizer: blazesym over the process cache's open binaries.
///
/// Results are cached per (binary, file offset) and per kernel address, so
/// steady-state symbolization reuses both blazesym's parsed files and our
/// names. The caches are bounded by `max_cached`.
pub struct BlazeSymbolizer {
    symbolizer: Symbolizer,
    processes: Arc<Mutex<ProcessCache>>,
    user_cache: HashMap<(BinaryKey, u64), Arc<[String]>>,
    kernel_cache: HashMap<u64, Arc<[String]>>,
    max_cached: usize,
    stats: SymbolizerStats,
}

impl BlazeSymbolizer {
    pub fn new(processes: Arc<Mutex<ProcessCache>>) -> Self {
        Self {
            symbolizer: Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .enable_demangling(true)
                // blazesym caches parsed files by path; our paths are fd
                // numbers, reused once a binary is closed. Reloading checks
                // the file's identity (a stat, on our cache misses only).
                .enable_auto_reload(true)
                .build(),
            processes,
            user_cache: HashMap::new(),
            kernel_cache: HashMap::new(),
            max_cached: 1 << 18,
            stats: SymbolizerStats::default(),
        }
    }

    pub fn stats(&self) -> &SymbolizerStats {
        &self.stats
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
        let keys: std::collections::HashSet<BinaryKey> = closed.iter().map(|(k, _)| *k).collect();
        self.user_cache.retain(|(key, _), _| !keys.contains(key));
    }

    fn keep_bounded(&mut self) {
        if self.user_cache.len() + self.kernel_cache.len() > self.max_cached {
            self.user_cache.clear();
            self.kernel_cache.clear();
            self.stats.cache_resets += 1;
        }
    }

    /// Symbolizes file offsets of one binary, filling the cache.
    fn symbolize_binary(
        &mut self,
        key: BinaryKey,
        path: &std::path::Path,
        module: &str,
        offsets: &[u64],
    ) {
        self.stats.lookups += offsets.len() as u64;
        let src = Source::Elf(Elf::new(path));
        let results = self
            .symbolizer
            .symbolize(&src, Input::FileOffset(offsets))
            .unwrap_or_default();
        for (i, offset) in offsets.iter().enumerate() {
            let names = results
                .get(i)
                .and_then(names_of)
                .unwrap_or_else(|| vec![unknown_frame(module, *offset)]);
            self.user_cache.insert((key, *offset), names.into());
        }
    }
}

impl Symbolize for BlazeSymbolizer {
    fn user_stack(&mut self, pid: u32, ips: &[u64]) -> Vec<String> {
        self.keep_bounded();
        let locations: Vec<Location> = {
            let mut processes = self.processes.lock().unwrap_or_else(|e| e.into_inner());
            ips.iter()
                .enumerate()
                .map(|(i, ip)| processes.locate(pid, lookup_address(i, *ip)))
                .collect()
        };

        // Batch the cache misses per binary.
        let mut misses: HashMap<BinaryKey, (Arc<crate::process::Binary>, Vec<u64>)> =
            HashMap::new();
        for location in &locations {
            if let Location::Binary {
                binary,
                file_offset,
            } = location
            {
                if !self.user_cache.contains_key(&(binary.key, *file_offset)) {
                    let entry = misses
                        .entry(binary.key)
                        .or_insert_with(|| (binary.clone(), Vec::new()));
                    if !entry.1.contains(file_offset) {
                        entry.1.push(*file_offset);
                    }
                } else {
                    self.stats.cache_hits += 1;
                }
            }
        }
        for (key, (binary, offsets)) in misses {
            self.symbolize_binary(key, &binary.symbol_path, &binary.module_name(), &offsets);
        }

        let mut frames = Vec::new();
        for location in locations.iter().rev() {
            match location {
                Location::Binary {
                    binary,
                    file_offset,
                } => {
                    let names = &self.user_cache[&(binary.key, *file_offset)];
                    if names.len() == 1 && names[0].contains("+0x") {
                        self.stats.unnamed_frames += 1;
                    }
                    frames.extend(names.iter().cloned());
                }
                Location::Module { name, offset } => {
                    self.stats.unnamed_frames += 1;
                    frames.push(unknown_frame(name, *offset));
                }
                Location::Unknown => {
                    self.stats.unnamed_frames += 1;
                    frames.push(UNKNOWN_FRAME.to_string());
                }
            }
        }
        frames
    }

    fn kernel_stack(&mut self, ips: &[u64]) -> Vec<String> {
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
        self.stats.cache_hits += (addrs.len() - misses.len()) as u64;
        misses.sort_unstable();
        misses.dedup();
        if !misses.is_empty() {
            self.stats.lookups += misses.len() as u64;
            let src = Source::Kernel(Kernel {
                // kallsyms is always there; a vmlinux search costs time and
                // rarely finds anything on production hosts.
                vmlinux: blazesym::MaybeDefault::None,
                ..Kernel::default()
            });
            let results = self
                .symbolizer
                .symbolize(&src, Input::AbsAddr(&misses))
                .unwrap_or_default();
            for (i, addr) in misses.iter().enumerate() {
                let names: Vec<String> = match results.get(i) {
                    Some(Symbolized::Sym(sym)) => vec![kernel_frame(&sym.name)],
                    _ => vec![kernel_frame(UNKNOWN_FRAME)],
                };
                self.kernel_cache.insert(*addr, names.into());
            }
        }
        addrs
            .iter()
            .rev()
            .flat_map(|a| self.kernel_cache[a].iter().cloned())
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

        let frames = sym.user_stack(pid, &[addr]);
        let leaf = frames.last().unwrap();
        assert!(leaf.contains("a_function_to_find"), "got {frames:?}");
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
        assert!(frames.last().unwrap().contains("a_function_to_find"));
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
}
