//! Unwind-table benchmark: for libc, libstdc++ and the largest ELF file
//! under /usr/lib, /usr/bin and /usr/libexec with call-frame information,
//! the size of the table `build_table` makes, its rules, and the time it
//! takes (median of 5, the file already in memory). Target: libc well under
//! 50 ms in a release build. Further files can be named on the command line.
//!
//! ```sh
//! cargo run --release -p profiler-agent --example unwind_table_bench -- [FILE...]
//! ```
use std::{
    io::Read as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use profiler_agent::unwind::{build_table, TableError, UnwindRow, UnwindTable};
use profiler_testkit::median_duration;

const RUNS: usize = 5;
const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
const LIBSTDCXX: &str = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";
const SEARCHED: [&str; 3] = ["/usr/lib", "/usr/bin", "/usr/libexec"];
const LIBC_TARGET: Duration = Duration::from_millis(50);

fn main() -> Result<()> {
    let mut files = vec![PathBuf::from(LIBC), PathBuf::from(LIBSTDCXX)];
    files.push(largest_with_cfi()?);
    files.extend(std::env::args_os().skip(1).map(PathBuf::from));
    for path in &files {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (table, time) = measure(&bytes).with_context(|| path.display().to_string())?;
        report(path, bytes.len(), &table, time);
        if path == Path::new(LIBC) && time >= LIBC_TARGET {
            println!("  SLOW: libc's table took {time:?} (target < {LIBC_TARGET:?})");
        }
    }
    Ok(())
}

/// Builds the table `RUNS` times; the last table and the median time.
fn measure(bytes: &[u8]) -> Result<(UnwindTable, Duration), TableError> {
    let mut times = Vec::with_capacity(RUNS);
    let mut table = None;
    for _ in 0..RUNS {
        let started = Instant::now();
        let built = build_table(bytes)?;
        times.push(started.elapsed());
        table = Some(built);
    }
    Ok((table.expect("RUNS > 0"), median_duration(&times)))
}

fn report(path: &Path, size: usize, table: &UnwindTable, time: Duration) {
    let stats = &table.stats;
    let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
    let table_bytes = table.rows.len() * size_of::<UnwindRow>();
    println!("{}", path.display());
    println!(
        "  file {:.1} MiB; {} FDEs (.eh_frame {}, .debug_frame {}{}); {} CFI rows -> {} rows, \
         {:.2} MiB table",
        mib(size),
        stats.fdes,
        stats.eh_frame.fdes,
        stats.debug_frame.fdes,
        if stats.debug_frame.compressed {
            ", compressed .debug_frame not read"
        } else {
            ""
        },
        stats.cfi_rows,
        stats.rows,
        mib(table_bytes),
    );
    println!(
        "  unsupported rows {} (CFI rows by reason: {}); rbp unknown in {} rows",
        stats.unsupported_rows,
        join(stats.unsupported.iter().map(|(why, n)| (why.name(), *n))),
        stats.rbp_unknown_rows,
    );
    println!(
        "  rows by rule: {}",
        join(stats.rows_by_rule.iter().map(|(rule, n)| (*rule, *n)))
    );
    println!(
        "  build_table: {:.2} ms (median of {RUNS})",
        time.as_secs_f64() * 1e3
    );
}

fn join<'a>(counts: impl Iterator<Item = (&'a str, usize)>) -> String {
    let parts: Vec<String> = counts.map(|(name, n)| format!("{name} {n}")).collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

/// The largest ELF file (by size on disk) under [`SEARCHED`] whose table
/// builds; files without CFI or for another architecture are passed over.
fn largest_with_cfi() -> Result<PathBuf> {
    let mut files = Vec::new();
    for dir in SEARCHED {
        walk(Path::new(dir), &mut files);
    }
    files.sort_unstable_by_key(|&(size, _)| std::cmp::Reverse(size));
    for (_, path) in files {
        if !is_elf(&path) {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        match build_table(&bytes) {
            Ok(_) => return Ok(path),
            Err(TableError::NotElf | TableError::NoCfi | TableError::NotX86_64(_)) => {}
            Err(e) => println!("passed over {}: {e}", path.display()),
        }
    }
    anyhow::bail!("no ELF file with CFI under {SEARCHED:?}")
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"\x7fELF")
}

/// Regular files under `dir` (symbolic links not followed) with their
/// sizes; unreadable directories are skipped.
fn walk(dir: &Path, out: &mut Vec<(u64, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            walk(&entry.path(), out);
        } else if kind.is_file() {
            if let Ok(meta) = entry.metadata() {
                out.push((meta.len(), entry.path()));
            }
        }
    }
}
