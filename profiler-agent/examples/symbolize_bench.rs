//! Symbolization benchmark (issue 6): frames per second of the agent's
//! symbolizer on a large binary with full DWARF, cold (first sight of the
//! binary: ELF and DWARF parsed) and warm (names cached). Target: warm
//! symbolization of at least 2 M frames/s.
//!
//! The binary is generated C: thousands of functions, each with helpers
//! inlined up to three deep, built with `gcc -g -O2` once into the target
//! directory (reused while the generated source is unchanged). It runs as a
//! child process, so the agent's own path is measured end to end:
//! `ProcessCache` reads its `/proc` maps and opens the binary, and
//! `fold::symbolize_window` names a drained window through `BlazeSymbolizer`.
//!
//! ```sh
//! cargo run --release -p profiler-agent --example symbolize_bench -- [--quick] [--report FILE]
//! ```
//!
//! Figures: docs/microbenchmarks.md.
use std::{
    collections::HashSet,
    fmt::Write as _,
    io::Write as _,
    ops::ControlFlow,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use blazesym::{
    inspect::{source::Elf, source::Source, Inspector},
    SymType,
};
use profiler_agent::{
    drain::{RawSample, RawWindow},
    fold::symbolize_window,
    loss::SymbolizerDegrade,
    process::{parse_maps_line, ProcessCache},
    symbolize::{BlazeSymbolizer, Symbolize, SymbolizeLimits, INLINED_SUFFIX},
};
use profiler_testkit::{median, Rng};

/// Translation units of the generated program (one DWARF compile unit each).
const UNITS: usize = 32;
/// Units in a `--quick` run: the smoke run's time goes to the build of the
/// program otherwise.
const QUICK_UNITS: usize = 8;
/// Functions per unit.
const FUNCTIONS_PER_UNIT: usize = 200;
/// `static inline` helpers shared by every unit, inlined into the functions.
const HELPERS: usize = 96;
/// Distinct addresses the stacks are drawn from.
const DISTINCT: usize = 4_000;
/// Stacks in the window (each a sample with a count).
const STACKS: usize = 2_000;
/// Frames shared by every stack at its root (`main`, a runtime, ...).
const ROOT_FRAMES: usize = 4;
const TARGET_WARM: f64 = 2_000_000.0;

struct Args {
    quick: bool,
    report: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        report: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--report" => args.report = Some(it.next().context("--report needs a file")?.into()),
            // `cargo bench`-style harness flags are ignored.
            "--bench" => {}
            other => bail!("unknown argument {other:?} (use --quick, --report FILE)"),
        }
    }
    Ok(args)
}

fn function_name(unit: usize, f: usize) -> String {
    format!("svc{unit}_handler{f}_process")
}

fn header_source() -> String {
    let mut s = String::from("#include <stdint.h>\n\n");
    s.push_str(
        "struct request { uint64_t id, flags; uint32_t shard[4]; const char *path; \
         struct request *next; };\n\
         struct stats { uint64_t hits, misses, bytes; double ratio; };\n\n",
    );
    for h in 0..HELPERS {
        // Every helper but each third calls the previous one: inlined chains
        // up to three deep, as in Rust or C++ code.
        let inner = if h % 3 != 0 {
            format!("  x = helper_{}(r, x ^ {}u);\n", h - 1, h * 7 + 1)
        } else {
            String::new()
        };
        let _ = write!(
            s,
            "static inline __attribute__((always_inline)) uint64_t helper_{h}(struct request *r, uint64_t x) {{\n\
             {inner}  uint64_t t = x * {mul}u + r->flags;\n\
             \x20 if (t & {bit}u) r->shard[{idx}] += (uint32_t)t;\n\
             \x20 return (t >> {sh}) ^ r->id;\n}}\n\n",
            mul = 2 * h + 3,
            bit = 1u64 << (h % 13),
            idx = h % 4,
            sh = 1 + h % 17,
        );
    }
    s
}

fn unit_source(unit: usize, units: usize) -> String {
    let mut rng = Rng::new(unit as u64 + 1);
    let mut callees = Vec::new();
    let mut bodies = String::new();
    for f in 0..FUNCTIONS_PER_UNIT {
        let (cu, cf) = (rng.below(units), rng.below(FUNCTIONS_PER_UNIT));
        callees.push(function_name(cu, cf));
        let (a, b) = (rng.below(HELPERS), rng.below(HELPERS));
        let _ = write!(
            bodies,
            "__attribute__((noinline)) uint64_t {name}(struct request *r, uint64_t x) {{\n\
             \x20 struct stats st = {{ .hits = x & 1 }};\n\
             \x20 uint64_t acc = helper_{a}(r, x ^ {c1}u);\n\
             \x20 if (acc & 2) {{ acc = helper_{b}(r, acc); st.misses++; }}\n\
             \x20 if ((acc & 15) == {k}) acc += {callee}(r->next, acc);\n\
             \x20 r->flags ^= st.hits + st.misses * 3;\n\
             \x20 return acc ^ r->id;\n}}\n\n",
            name = function_name(unit, f),
            c1 = rng.next_u64() >> 16,
            k = rng.below(16),
            callee = callees[f],
        );
    }
    let mut s = String::from("#include \"common.h\"\n\n");
    let declared: HashSet<&String> = callees.iter().collect();
    let mut declared: Vec<&String> = declared.into_iter().collect();
    declared.sort();
    for callee in declared {
        let _ = writeln!(s, "uint64_t {callee}(struct request *r, uint64_t x);");
    }
    s.push('\n');
    s.push_str(&bodies);
    s
}

const MAIN_SOURCE: &str = "#include <unistd.h>\n\
    /* Stays mapped until the benchmark closes stdin. */\n\
    int main(void) { char b[64]; while (read(0, b, sizeof b) > 0) {} return 0; }\n";

/// Builds the generated program into `dir` unless a build of the same
/// source is there. Returns the binary's path.
fn build_binary(dir: &Path, units: usize) -> Result<PathBuf> {
    let header = header_source();
    let units: Vec<String> = (0..units).map(|u| unit_source(u, units)).collect();
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&(&header, &units, MAIN_SOURCE), &mut hasher);
    let hash = std::hash::Hasher::finish(&hasher);
    let binary = dir.join(format!("bigprog-{hash:016x}"));
    if binary.exists() {
        return Ok(binary);
    }
    let src = dir.join("src");
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    std::fs::write(src.join("common.h"), &header)?;
    std::fs::write(src.join("main.c"), MAIN_SOURCE)?;
    let mut sources = vec![src.join("main.c")];
    for (i, text) in units.iter().enumerate() {
        let path = src.join(format!("unit{i}.c"));
        std::fs::write(&path, text)?;
        sources.push(path);
    }
    let started = Instant::now();
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut objects = Vec::new();
    let mut running: Vec<(Child, PathBuf)> = Vec::new();
    let mut pending = sources.iter();
    loop {
        while running.len() < jobs {
            let Some(source) = pending.next() else { break };
            let object = source.with_extension("o");
            let child = Command::new("gcc")
                .args(["-g", "-O2", "-c"])
                .arg(source)
                .arg("-o")
                .arg(&object)
                .spawn()
                .context("running gcc (needed to build the benchmark's binary)")?;
            running.push((child, object));
        }
        if running.is_empty() {
            break;
        }
        let mut i = 0;
        while i < running.len() {
            if let Some(status) = running[i].0.try_wait()? {
                let (_, object) = running.swap_remove(i);
                ensure!(status.success(), "gcc failed on {}", object.display());
                objects.push(object);
            } else {
                i += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    objects.sort();
    let partial = binary.with_extension("tmp");
    let status = Command::new("gcc")
        .args(&objects)
        .arg("-o")
        .arg(&partial)
        .status()
        .context("linking with gcc")?;
    ensure!(status.success(), "linking the benchmark's binary failed");
    std::fs::rename(&partial, &binary)?;
    std::fs::remove_dir_all(&src)?;
    // Builds of an earlier generator are not used any more.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("bigprog-") && entry.path() != binary {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    eprintln!(
        "built {} in {:.1} s",
        binary.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(binary)
}

/// Sum of the sizes of the `.debug_*` sections of an ELF64 little-endian file.
fn dwarf_bytes(path: &Path) -> Result<u64> {
    let data = std::fs::read(path)?;
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap());
    ensure!(
        data.len() > 64 && &data[..5] == b"\x7fELF\x02",
        "not an ELF64 file"
    );
    let (shoff, shentsize, shnum, shstrndx) = (
        u64_at(0x28) as usize,
        u16_at(0x3a),
        u16_at(0x3c),
        u16_at(0x3e),
    );
    let section = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(section(shstrndx) + 24) as usize;
    let mut total = 0;
    for i in 0..shnum {
        let name_at = strtab + u32_at(section(i));
        let end = data[name_at..].iter().position(|&b| b == 0).unwrap_or(0);
        if data[name_at..name_at + end].starts_with(b".debug_") {
            total += u64_at(section(i) + 32);
        }
    }
    Ok(total)
}

/// A function of the binary: name, file offset and size (ELF symbol table).
struct Function {
    name: String,
    file_offset: u64,
    size: u64,
}

fn functions_of(binary: &Path) -> Result<Vec<Function>> {
    let mut functions = Vec::new();
    let src = Source::Elf(Elf {
        debug_syms: false,
        ..Elf::new(binary)
    });
    Inspector::new()
        .for_each(&src, |sym| {
            if sym.sym_type == SymType::Function
                && sym.name.starts_with("svc")
                && !sym.name.contains('.')
                && sym.size.unwrap_or(0) > 1
            {
                if let Some(file_offset) = sym.file_offset {
                    functions.push(Function {
                        name: sym.name.to_string(),
                        file_offset,
                        size: sym.size.unwrap_or(0) as u64,
                    });
                }
            }
            ControlFlow::Continue(())
        })
        .context("listing the binary's functions")?;
    functions.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(functions)
}

/// The child running the binary; stdin closed (and waited for) on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// Executable mappings of `pid` backed by `binary`: (start, end, file offset).
fn text_mappings(pid: u32, binary: &Path) -> Result<Vec<(u64, u64, u64)>> {
    let canonical = binary.canonicalize()?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mappings: Vec<_> = maps
        .lines()
        .filter_map(parse_maps_line)
        .filter(|l| l.executable && Path::new(&l.pathname) == canonical)
        .map(|l| (l.start, l.end, l.offset))
        .collect();
    ensure!(!mappings.is_empty(), "no executable mapping of the binary");
    Ok(mappings)
}

/// An address picked for the stacks: runtime address and its function.
struct Pick {
    addr: u64,
    function: usize,
}

/// The drained window: `STACKS` samples of `pid`, leaf first, with the
/// function expected at each frame (root first).
fn make_window(
    pid: u32,
    functions: &[Function],
    mappings: &[(u64, u64, u64)],
) -> Result<(RawWindow, Vec<Vec<usize>>, usize)> {
    let mut rng = Rng::new(42);
    let to_addr = |offset: u64| -> Option<u64> {
        mappings
            .iter()
            .find(|(start, end, file)| offset >= *file && offset < file + (end - start))
            .map(|(start, _, file)| start + (offset - file))
    };
    let mut picks = Vec::with_capacity(DISTINCT);
    let mut seen = HashSet::new();
    while picks.len() < DISTINCT {
        let function = rng.below(functions.len());
        let f = &functions[function];
        // Inside the function, past its first byte: a return address is
        // looked up minus one.
        let offset = f.file_offset + 1 + rng.next_u64() % (f.size - 1);
        if !seen.insert(offset) {
            continue;
        }
        let addr = to_addr(offset).context("function outside the text mapping")?;
        picks.push(Pick { addr, function });
    }
    let mut samples = Vec::with_capacity(STACKS);
    let mut expected = Vec::with_capacity(STACKS);
    let mut used = HashSet::new();
    for s in 0..STACKS {
        let depth = 20 + (s * 11) % 21;
        // Root first: shared roots, then frames drawn from the picks.
        let chosen: Vec<usize> = (0..depth)
            .map(|d| {
                if d < ROOT_FRAMES {
                    d
                } else {
                    ROOT_FRAMES + rng.below(DISTINCT - ROOT_FRAMES)
                }
            })
            .collect();
        used.extend(chosen.iter().copied());
        expected.push(chosen.iter().map(|&p| picks[p].function).collect());
        samples.push(RawSample {
            thread_state: None,
            waker: Vec::new(),
            tgid: pid,
            comm: "bigprog".into(),
            user: chosen.iter().rev().map(|&p| picks[p].addr).collect(),
            user_end: None,
            kernel: Vec::new(),
            sample_type: profiler_agent::sample_type::SampleType::Cpu,
            value: 1 + (s % 5) as u64,
        });
    }
    Ok((
        RawWindow {
            samples,
            ..Default::default()
        },
        expected,
        used.len(),
    ))
}

fn frames_in(window: &RawWindow) -> usize {
    window.samples.iter().map(|s| s.user.len()).sum()
}

fn new_symbolizer(pid: u32) -> Result<BlazeSymbolizer> {
    let processes = Arc::new(Mutex::new(ProcessCache::default()));
    ensure!(
        processes.lock().unwrap().observe(pid),
        "could not read the mappings of the benchmark's child {pid}"
    );
    // No budget cut: every frame of the cold window is named and timed.
    let limits = SymbolizeLimits {
        budget: Duration::from_secs(3600),
        ..SymbolizeLimits::default()
    };
    Ok(BlazeSymbolizer::with_limits(processes, limits))
}

/// Checks every stack names the functions it was built from (outermost
/// frames, inlined ones aside). Returns (output frames, inlined frames).
fn check_names(
    samples: &[profiler_agent::fold::SymbolizedSample],
    expected: &[Vec<usize>],
    functions: &[Function],
) -> Result<(usize, usize)> {
    let (mut output, mut inlined) = (0, 0);
    for (sample, expected) in samples.iter().zip(expected) {
        output += sample.frames.len();
        let outer: Vec<&str> = sample
            .frames
            .iter()
            .filter(|f| {
                let is_inlined = f.ends_with(INLINED_SUFFIX);
                inlined += is_inlined as usize;
                !is_inlined
            })
            .map(String::as_str)
            .collect();
        let want: Vec<&str> = expected
            .iter()
            .map(|&f| functions[f].name.as_str())
            .collect();
        ensure!(outer == want, "wrong names: got {outer:?}, want {want:?}");
    }
    Ok((output, inlined))
}

struct Figures {
    cold: Vec<f64>,
    cold_seconds: Vec<f64>,
    first_result: Vec<f64>,
    warm: Vec<f64>,
    /// Warm frames per second of this thread's CPU time (less sensitive to
    /// other load on the machine than the wall-clock figure).
    warm_cpu: Vec<f64>,
    output_frames: usize,
    inlined_frames: usize,
}

fn measure(
    pid: u32,
    window: &RawWindow,
    expected: &[Vec<usize>],
    functions: &[Function],
    cold_reps: usize,
    warm_reps: usize,
) -> Result<Figures> {
    let frames = frames_in(window) as f64;
    let first = RawWindow {
        samples: window.samples[..1].to_vec(),
        ..Default::default()
    };
    let mut figures = Figures {
        cold: Vec::new(),
        cold_seconds: Vec::new(),
        first_result: Vec::new(),
        warm: Vec::new(),
        warm_cpu: Vec::new(),
        output_frames: 0,
        inlined_frames: 0,
    };
    let mut warmed = None;
    for _ in 0..cold_reps {
        // Time to the first named stack of a binary never seen before.
        let mut sym = new_symbolizer(pid)?;
        let started = Instant::now();
        let named = symbolize_window(&first, &mut sym);
        figures.first_result.push(started.elapsed().as_secs_f64());
        check_names(&named, &expected[..1], functions)?;

        // A whole window through a fresh symbolizer.
        let mut sym = new_symbolizer(pid)?;
        let started = Instant::now();
        let named = symbolize_window(window, &mut sym);
        let seconds = started.elapsed().as_secs_f64();
        figures.cold.push(frames / seconds);
        figures.cold_seconds.push(seconds);
        (figures.output_frames, figures.inlined_frames) = check_names(&named, expected, functions)?;
        let stats = sym.stats();
        ensure!(
            stats.unnamed_frames == 0 && stats[SymbolizerDegrade::FramesOverBudget] == 0,
            "frames left unnamed: {stats:?}"
        );
        warmed = Some(sym);
    }
    let mut sym = warmed.context("no cold repetition")?;
    let lookups = sym.stats().lookups;
    for _ in 0..warm_reps {
        let (started, cpu) = (Instant::now(), thread_cpu_seconds());
        let named = symbolize_window(window, &mut sym);
        figures.warm.push(frames / started.elapsed().as_secs_f64());
        figures.warm_cpu.push(frames / (thread_cpu_seconds() - cpu));
        std::hint::black_box(named);
    }
    ensure!(
        sym.stats().lookups == lookups,
        "warm windows went to blazesym"
    );
    // Kernel stacks are empty here; keep the trait's other half linked.
    std::hint::black_box(sym.kernel_stack(&[]));
    Ok(figures)
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn millions(v: f64) -> String {
    format!("{:.2} M", v / 1e6)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    let dir = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("no target directory")?
        .join("symbolize-bench");
    std::fs::create_dir_all(&dir)?;
    let units = if args.quick { QUICK_UNITS } else { UNITS };
    let binary = build_binary(&dir, units)?;
    let file_bytes = std::fs::metadata(&binary)?.len();
    let debug_bytes = dwarf_bytes(&binary)?;
    let functions = functions_of(&binary)?;
    ensure!(functions.len() > 1000, "too few functions found");

    let child = Command::new(&binary)
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id();
    let running = Running(child);
    let mut mappings = Vec::new();
    // The child maps its binary as soon as exec returns; wait for it.
    for _ in 0..200 {
        match text_mappings(pid, &binary) {
            Ok(m) => {
                mappings = m;
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    ensure!(!mappings.is_empty(), "the child never mapped its binary");
    let (window, expected, distinct) = make_window(pid, &functions, &mappings)?;
    let frames = frames_in(&window);

    let (cold_reps, warm_reps) = if args.quick { (3, 7) } else { (11, 31) };
    let figures = measure(pid, &window, &expected, &functions, cold_reps, warm_reps);
    drop(running);
    let figures = figures?;

    let cold = median(&figures.cold);
    let cold_seconds = median(&figures.cold_seconds);
    let first_ms = median(&figures.first_result) * 1e3;
    let warm = median(&figures.warm);
    let warm_cpu = median(&figures.warm_cpu);
    let verdict = if warm >= TARGET_WARM {
        format!("**met** ({:.1}× the target)", warm / TARGET_WARM)
    } else {
        format!(
            "**missed** by {} frames/s ({:.0} % short)",
            millions(TARGET_WARM - warm),
            (1.0 - warm / TARGET_WARM) * 100.0
        )
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut md = String::new();
    let _ = writeln!(md, "## Symbolization (`symbolize_bench`)\n");
    let _ = writeln!(
        md,
        "Binary: generated C, {} functions in {units} compile units with helpers inlined up to \
         three deep, `gcc -g -O2`: {:.1} MiB file, {:.1} MiB of DWARF (`.debug_*`). \
         It runs as a child process; the agent's `ProcessCache` and `BlazeSymbolizer` name it \
         through `fold::symbolize_window`.\n",
        functions.len(),
        mib(file_bytes),
        mib(debug_bytes),
    );
    let _ = writeln!(
        md,
        "Window: {STACKS} stacks of 20–40 user frames, {frames} frames from {distinct} distinct \
         addresses in {} functions; named into {} frames ({} inlined, `_[i]`). Every stack's \
         names are checked. Medians of {cold_reps} cold and {warm_reps} warm windows{}.\n",
        expected.iter().flatten().collect::<HashSet<_>>().len(),
        figures.output_frames,
        figures.inlined_frames,
        if args.quick { " (`--quick`)" } else { "" },
    );
    let _ = writeln!(md, "| | frames/s | time |\n|---|---|---|");
    let _ = writeln!(
        md,
        "| cold (fresh symbolizer, first sight of the binary) | {} | {:.0} ms a window; first stack named after {first_ms:.1} ms |",
        millions(cold),
        cold_seconds * 1e3
    );
    let _ = writeln!(
        md,
        "| warm (same addresses again, cached) | {} | {:.2} ms a window ({} frames per CPU second) |\n",
        millions(warm),
        frames as f64 / warm * 1e3,
        millions(warm_cpu),
    );
    let _ = writeln!(md, "Target warm ≥ 2 M frames/s: {verdict}.\n");
    let _ = writeln!(md, "```\nBENCH cold_frames_per_s={cold:.0}");
    let _ = writeln!(md, "BENCH warm_frames_per_s={warm:.0}\n```");
    let _ = writeln!(
        md,
        "\nRun time {:.1} s (binary build included when it was not cached).",
        started.elapsed().as_secs_f64()
    );
    print!("{md}");
    std::io::stdout().flush()?;
    if let Some(path) = args.report {
        std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
