//! Symbolization of hostile binaries: corrupt, truncated and huge ELF files,
//! a binary deleted while its process runs, processes that exit before or
//! after their first sight. None may panic or hang; every frame comes out,
//! named or as `module+0xOFFSET` / `[unknown]`, and the reason is counted.
//!
//! Files are made at test time in a temporary directory and reached through
//! a fake `/proc` (a `maps` file naming them), as the agent reaches real
//! binaries; the process tests run a copy of this test binary. No root and
//! no BPF needed.
use std::{
    io::Write,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use profiler_agent::{
    loss::{ProcessLoss, SymbolizerDegrade},
    process::{parse_maps_line, Location, ProcessCache},
    symbolize::{BlazeSymbolizer, Symbolize, SymbolizeLimits, SymbolizerStats},
};
use profiler_testkit::elf::Layout;

/// Where the fake process maps every file: one mapping from file offset 0.
const MAP_START: u64 = 0x1_0000_0000;
const MAP_LEN: u64 = 0x4000_0000;
const FAKE_PID: u32 = 100;

#[inline(never)]
fn a_function_in_the_victim(x: u64) -> u64 {
    std::hint::black_box(x.wrapping_mul(13).rotate_left(5))
}

/// Path of this test binary and the file offset of `addr` in it.
fn own_file_offset(addr: u64) -> (PathBuf, u64) {
    let mut cache = ProcessCache::default();
    let pid = std::process::id();
    assert!(cache.observe(pid));
    match cache.locate(pid, addr) {
        Location::Binary {
            binary,
            file_offset,
        } => (binary.path.clone(), file_offset),
        other => panic!("expected a binary, got {other:?}"),
    }
}

#[inline(never)]
fn another_function_in_the_victim(x: u64) -> u64 {
    std::hint::black_box(x.wrapping_add(11).rotate_right(3))
}

fn victim_offset() -> (PathBuf, u64) {
    std::hint::black_box(a_function_in_the_victim(1));
    own_file_offset(a_function_in_the_victim as *const () as u64)
}

/// A fake `/proc` whose process 100 maps `file` at [`MAP_START`] from
/// offset 0, observed as the agent would (the process cache opens `file`).
fn fake_process(file: &Path) -> (tempfile::TempDir, Arc<Mutex<ProcessCache>>) {
    let root = tempfile::tempdir().unwrap();
    let pid_dir = root.path().join(FAKE_PID.to_string());
    std::fs::create_dir_all(&pid_dir).unwrap();
    let ino = std::fs::metadata(file).unwrap().ino();
    std::fs::write(
        pid_dir.join("maps"),
        format!(
            "{MAP_START:x}-{:x} r-xp 00000000 fd:00 {ino} {}\n",
            MAP_START + MAP_LEN,
            file.display()
        ),
    )
    .unwrap();
    std::os::unix::fs::symlink("/", pid_dir.join("root")).unwrap();
    let processes = Arc::new(Mutex::new(ProcessCache::new(root.path(), 16, 16)));
    assert!(processes.lock().unwrap().observe(FAKE_PID));
    (root, processes)
}

/// Names file offset `offset` of `file` as the agent would: through a fake
/// `/proc/100/maps` that maps the file.
fn name_in(file: &Path, offset: u64, limits: SymbolizeLimits) -> (Vec<String>, SymbolizerStats) {
    let (_root, processes) = fake_process(file);
    let mut sym = BlazeSymbolizer::with_limits(processes, limits);
    sym.start_window();
    let frames = sym.user_stack(FAKE_PID, &[MAP_START + offset]);
    (frames, sym.stats())
}

/// Like [`name_in`] with default limits, and the time it took.
fn timed_name_in(file: &Path, offset: u64) -> (Vec<String>, SymbolizerStats) {
    let started = Instant::now();
    let named = name_in(file, offset, SymbolizeLimits::default());
    eprintln!(
        "{}: {:?} in {:?}",
        file.file_name().unwrap().to_string_lossy(),
        named.0,
        started.elapsed()
    );
    named
}

fn fallback(file: &Path, offset: u64) -> Vec<String> {
    let name = file.file_name().unwrap().to_string_lossy();
    vec![format!("{name}+{offset:#x}")]
}

/// A small valid ELF64 shared object: one `.text` section at file offset
/// 0x200 (= its address) with one function, `hot` (0x200..0x280).
fn tiny_elf() -> Vec<u8> {
    let mut f = vec![0u8; 0x4c0];
    let put =
        |f: &mut Vec<u8>, at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
    let u16s = |v: u16| v.to_le_bytes();
    let u32s = |v: u32| v.to_le_bytes();
    let u64s = |v: u64| v.to_le_bytes();
    // ELF header.
    put(&mut f, 0, &[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    put(&mut f, 0x10, &u16s(3)); // ET_DYN
    put(&mut f, 0x12, &u16s(0x3e)); // x86-64
    put(&mut f, 0x14, &u32s(1));
    put(&mut f, 0x18, &u64s(0x200)); // entry
    put(&mut f, 0x20, &u64s(0x40)); // phoff
    put(&mut f, 0x28, &u64s(0x380)); // shoff
    put(&mut f, 0x34, &u16s(64)); // ehsize
    put(&mut f, 0x36, &u16s(56)); // phentsize
    put(&mut f, 0x38, &u16s(1)); // phnum
    put(&mut f, 0x3a, &u16s(64)); // shentsize
    put(&mut f, 0x3c, &u16s(5)); // shnum
    put(&mut f, 0x3e, &u16s(4)); // shstrndx
                                 // PT_LOAD R+X covering the file.
    put(&mut f, 0x40, &u32s(1));
    put(&mut f, 0x44, &u32s(5));
    put(&mut f, 0x60, &u64s(0x4c0)); // filesz
    put(&mut f, 0x68, &u64s(0x4c0)); // memsz
    put(&mut f, 0x70, &u64s(0x1000)); // align
                                      // .text
    f[0x200..0x300].fill(0x90);
    // .symtab: null symbol, then `hot`, a global function.
    put(&mut f, 0x318, &u32s(1));
    f[0x31c] = 0x12;
    put(&mut f, 0x31e, &u16s(1));
    put(&mut f, 0x320, &u64s(0x200));
    put(&mut f, 0x328, &u64s(0x80));
    // .strtab and .shstrtab
    put(&mut f, 0x330, b"\0hot\0");
    put(&mut f, 0x340, b"\0.text\0.symtab\0.strtab\0.shstrtab\0");
    // Section headers: null, .text, .symtab, .strtab, .shstrtab.
    #[allow(clippy::type_complexity)]
    let sections: [(u32, u32, u64, u64, u64, u64, u32, u32, u64, u64); 4] = [
        (1, 1, 6, 0x200, 0x200, 0x100, 0, 0, 16, 0),
        (7, 2, 0, 0, 0x300, 48, 3, 1, 8, 24),
        (15, 3, 0, 0, 0x330, 5, 0, 0, 1, 0),
        (23, 3, 0, 0, 0x340, 33, 0, 0, 1, 0),
    ];
    for (i, (name, kind, flags, addr, offset, size, link, info, align, entsize)) in
        sections.into_iter().enumerate()
    {
        let at = 0x380 + 64 * (i + 1);
        put(&mut f, at, &u32s(name));
        put(&mut f, at + 4, &u32s(kind));
        put(&mut f, at + 8, &u64s(flags));
        put(&mut f, at + 0x10, &u64s(addr));
        put(&mut f, at + 0x18, &u64s(offset));
        put(&mut f, at + 0x20, &u64s(size));
        put(&mut f, at + 0x28, &u32s(link));
        put(&mut f, at + 0x2c, &u32s(info));
        put(&mut f, at + 0x30, &u64s(align));
        put(&mut f, at + 0x38, &u64s(entsize));
    }
    f
}

#[test]
fn tiny_elf_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.so");
    std::fs::write(&path, tiny_elf()).unwrap();
    let (frames, stats) = name_in(&path, 0x210, SymbolizeLimits::default());
    assert_eq!(frames, vec!["hot"]);
    assert_eq!(stats[SymbolizerDegrade::BinariesUnreadable], 0);
}

#[test]
fn garbage_after_elf_magic_gives_module_offset_and_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.so");
    let mut bytes = b"\x7fELF".to_vec();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    bytes.extend((0..4096).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    std::fs::write(&path, bytes).unwrap();
    let (frames, stats) = timed_name_in(&path, 0x200);
    assert_eq!(frames, fallback(&path, 0x200));
    assert_eq!(stats[SymbolizerDegrade::BinariesUnreadable], 1);
    assert_eq!(stats[SymbolizerDegrade::Panics], 0);
}

#[test]
fn unreadable_binary_is_asked_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.so");
    std::fs::write(&path, b"\x7fELF\x02\x01\x01junk").unwrap();
    let root = tempfile::tempdir().unwrap();
    let pid_dir = root.path().join(FAKE_PID.to_string());
    std::fs::create_dir_all(&pid_dir).unwrap();
    let ino = std::fs::metadata(&path).unwrap().ino();
    std::fs::write(
        pid_dir.join("maps"),
        format!("1000-9000 r-xp 00000000 fd:00 {ino} {}\n", path.display()),
    )
    .unwrap();
    std::os::unix::fs::symlink("/", pid_dir.join("root")).unwrap();
    let processes = Arc::new(Mutex::new(ProcessCache::new(root.path(), 16, 16)));
    let mut sym = BlazeSymbolizer::new(processes);
    assert_eq!(sym.user_stack(FAKE_PID, &[0x1010]), vec!["junk.so+0x10"]);
    assert_eq!(sym.user_stack(FAKE_PID, &[0x1020]), vec!["junk.so+0x20"]);
    let stats = sym.stats();
    assert_eq!(
        stats.lookups, 1,
        "a binary blazesym refused is not asked again"
    );
    assert_eq!(stats[SymbolizerDegrade::BinariesUnreadable], 1);
}

#[test]
fn section_headers_beyond_the_file_give_module_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-shoff.so");
    let mut bytes = tiny_elf();
    bytes[0x28..0x30].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let (frames, stats) = timed_name_in(&path, 0x210);
    assert_eq!(frames, fallback(&path, 0x210));
    assert_eq!(stats[SymbolizerDegrade::BinariesUnreadable], 1);
}

#[test]
fn real_binary_cut_in_half_gives_module_offset() {
    let (exe, offset) = victim_offset();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated");
    std::fs::copy(&exe, &path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (frames, stats) = timed_name_in(&path, offset);
    assert_eq!(frames, fallback(&path, offset));
    assert_eq!(stats[SymbolizerDegrade::BinariesUnreadable], 1);
    assert_eq!(stats[SymbolizerDegrade::Panics], 0);
}

/// Named once, then cut to its loaded part between two lookups (a package
/// upgrade truncating it in place): blazesym sees the file changed and reads
/// it again instead of its stale mapping, so nothing faults; the new
/// address is `module+0xOFFSET`, the binary is counted unreadable, and the
/// name read before the cut stays.
#[test]
fn binary_cut_between_two_lookups_is_read_again_and_counted() {
    let (exe, first) = victim_offset();
    std::hint::black_box(another_function_in_the_victim(1));
    let (_, second) = own_file_offset(another_function_in_the_victim as *const () as u64);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut-later");
    std::fs::copy(&exe, &path).unwrap();
    let loaded_end = Layout::of(&std::fs::read(&path).unwrap())
        .unwrap()
        .loaded_end;
    let (_root, processes) = fake_process(&path);
    let mut sym = BlazeSymbolizer::new(processes);
    sym.start_window();
    let named = sym.user_stack(FAKE_PID, &[MAP_START + first]);
    assert!(named[0].contains("a_function_in_the_victim"), "{named:?}");

    let faults = profiler_agent::sigbus::faults();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(loaded_end)
        .unwrap();
    assert_eq!(
        sym.user_stack(FAKE_PID, &[MAP_START + second]),
        fallback(&path, second)
    );
    assert_eq!(sym.user_stack(FAKE_PID, &[MAP_START + first]), named);
    let stats = sym.stats();
    assert_eq!(stats[SymbolizerDegrade::BinariesUnreadable], 1);
    assert_eq!(stats[SymbolizerDegrade::Panics], 0);
    // No other test here truncates a mapped file.
    assert_eq!(
        profiler_agent::sigbus::faults(),
        faults,
        "read through the stale mapping"
    );
}

/// A real binary grown to 8 GiB (sparse): over the DWARF limit, so it is
/// named from its ELF symbol table, without reading the rest.
#[test]
fn huge_binary_is_named_from_elf_symbols_without_dwarf() {
    let (exe, offset) = victim_offset();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge");
    std::fs::copy(&exe, &path).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let (frames, stats) = timed_name_in(&path, offset);
    assert_eq!(
        frames.len(),
        1,
        "no inlined frames without DWARF: {frames:?}"
    );
    assert!(frames[0].contains("a_function_in_the_victim"), "{frames:?}");
    assert_eq!(stats[SymbolizerDegrade::DwarfSkippedLarge], 1);
    assert_eq!(stats[SymbolizerDegrade::BinariesUnreadable], 0);

    // With a DWARF limit above its size the same file is read with DWARF.
    let limits = SymbolizeLimits {
        max_dwarf_bytes: 16 << 30,
        ..SymbolizeLimits::default()
    };
    let (frames, stats) = name_in(&path, offset, limits);
    assert!(frames[0].contains("a_function_in_the_victim"), "{frames:?}");
    assert_eq!(stats[SymbolizerDegrade::DwarfSkippedLarge], 0);
}

/// A valid header naming 65535 section headers 6 GiB into a sparse 8 GiB file.
#[test]
fn huge_sparse_file_with_far_section_table_gives_module_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.so");
    let mut header = tiny_elf()[..0x78].to_vec();
    header[0x28..0x30].copy_from_slice(&(6u64 << 30).to_le_bytes());
    header[0x3c..0x3e].copy_from_slice(&0xffffu16.to_le_bytes());
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&header).unwrap();
    file.set_len(8 << 30).unwrap();
    drop(file);
    let (frames, stats) = timed_name_in(&path, 0x210);
    assert_eq!(frames, fallback(&path, 0x210));
    assert_eq!(stats[SymbolizerDegrade::Panics], 0);
}

/// Mutated headers, section tables and symbols of a valid ELF, and cuts at
/// random lengths: every one gives one frame, named or `module+0xOFFSET`.
#[test]
fn mutated_elf_files_never_panic_out_or_lose_the_frame() {
    const EXTREMES: [u64; 8] = [
        0,
        1,
        0x4c0,
        0x7fff_ffff,
        1 << 40,
        1 << 63,
        u64::MAX - 7,
        u64::MAX,
    ];
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_elf();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut named, mut unnamed, mut panics) = (0, 0, 0);
    let started = Instant::now();
    for i in 0..1500 {
        let mut bytes = base.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % bytes.len() as u64) as usize;
            match next() % 3 {
                0 => bytes[at] = next() as u8,
                1 => {
                    let at = at & !7;
                    let value = EXTREMES[(next() % EXTREMES.len() as u64) as usize];
                    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
                }
                _ => {
                    let at = at & !3;
                    let value = EXTREMES[(next() % EXTREMES.len() as u64) as usize] as u32;
                    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
                }
            }
        }
        if next() % 8 == 0 {
            bytes.truncate((next() % bytes.len() as u64) as usize);
        }
        let path = dir.path().join(format!("m{i}.so"));
        std::fs::write(&path, &bytes).unwrap();
        let (frames, stats) = name_in(&path, 0x210, SymbolizeLimits::default());
        assert_eq!(frames.len(), 1, "input {i}: {frames:?}");
        if frames == fallback(&path, 0x210) {
            unnamed += 1;
        } else {
            named += 1;
        }
        panics += stats[SymbolizerDegrade::Panics];
        std::fs::remove_file(&path).unwrap();
    }
    eprintln!(
        "1500 mutated ELF files in {:?}: {named} named, {unnamed} as module+offset, {panics} blazesym panics caught",
        started.elapsed()
    );
    assert!(named > 0 && unnamed > 0);
}

/// Not a test of its own: the body of the child process the tests below
/// start (a copy of this test binary), which waits to be killed.
#[test]
fn child_waits_when_asked() {
    if std::env::var_os("PROFILER_TEST_CHILD_WAIT").is_some() {
        std::hint::black_box(a_function_in_the_victim(2));
        std::thread::sleep(Duration::from_secs(120));
    }
}

/// A copy of this test binary, running `child_waits_when_asked`.
struct Victim {
    child: std::process::Child,
    path: PathBuf,
    /// The address of `a_function_in_the_victim` in the child.
    addr: u64,
    _dir: tempfile::TempDir,
}

impl Victim {
    fn start() -> Self {
        let (exe, offset) = victim_offset();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("victim");
        std::fs::copy(&exe, &path).unwrap();
        let spawn = || {
            std::process::Command::new(&path)
                .args(["--exact", "child_waits_when_asked", "--test-threads=1"])
                .env("PROFILER_TEST_CHILD_WAIT", "1")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
        };
        // Another test thread forking while the copy was open for writing
        // makes exec fail with ETXTBSY for a moment.
        let mut child = spawn();
        for _ in 0..50 {
            match &child {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(Duration::from_millis(20));
                    child = spawn();
                }
                _ => break,
            }
        }
        let child = child.expect("the copy of the test binary starts");
        // spawn returns while exec is still mapping the image: wait for it.
        let find = || {
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.id())).ok()?;
            maps.lines()
                .filter_map(parse_maps_line)
                .find(|m| {
                    m.executable
                        && Path::new(&m.pathname) == path
                        && (m.offset..m.offset + (m.end - m.start)).contains(&offset)
                })
                .map(|m| m.start + offset - m.offset)
        };
        let waited = Instant::now();
        let addr = loop {
            match find() {
                Some(addr) => break addr,
                None if waited.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                None => panic!("the victim never mapped its own code at {offset:#x}"),
            }
        };
        Self {
            child,
            path,
            addr,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exit(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seen running, then its binary deleted and the process gone before the
/// drain: its frames are still named, through the binary kept open.
#[test]
fn deleted_binary_of_an_exited_process_is_still_named() {
    let mut victim = Victim::start();
    let pid = victim.pid();
    let processes = Arc::new(Mutex::new(ProcessCache::default()));
    assert!(processes.lock().unwrap().observe(pid));
    std::fs::remove_file(&victim.path).unwrap();
    victim.exit();

    let mut sym = BlazeSymbolizer::new(processes.clone());
    sym.start_window();
    let frames = sym.user_stack(pid, &[victim.addr]);
    assert!(frames[0].contains("a_function_in_the_victim"), "{frames:?}");

    // Kept one more drain, then forgotten: its frames become `[unknown]`.
    let swept = processes.lock().unwrap().sweep();
    sym.forget_binaries(&swept.binaries);
    let frames = sym.user_stack(pid, &[victim.addr]);
    assert!(frames[0].contains("a_function_in_the_victim"), "{frames:?}");
    let swept = processes.lock().unwrap().sweep();
    assert_eq!(swept.pids, vec![pid]);
    sym.forget_binaries(&swept.binaries);
    assert_eq!(sym.user_stack(pid, &[victim.addr]), vec!["[unknown]"]);
    assert_eq!(sym.stats()[SymbolizerDegrade::Panics], 0);
}

/// A binary deleted before the process was first seen: reached through
/// `/proc/PID/map_files` (root); without that privilege it cannot be
/// opened and the frame is `victim+0xOFFSET`.
#[test]
fn binary_deleted_before_first_sight() {
    let victim = Victim::start();
    let pid = victim.pid();
    std::fs::remove_file(&victim.path).unwrap();
    let processes = Arc::new(Mutex::new(ProcessCache::default()));
    assert!(processes.lock().unwrap().observe(pid));
    let mut sym = BlazeSymbolizer::new(processes.clone());
    sym.start_window();
    let frames = sym.user_stack(pid, &[victim.addr]);
    let map_files_readable = std::fs::read_dir(format!("/proc/{pid}/map_files"))
        .and_then(|mut d| d.next().transpose())
        .is_ok_and(|e| e.is_some_and(|e| std::fs::File::open(e.path()).is_ok()));
    if map_files_readable {
        assert!(frames[0].contains("a_function_in_the_victim"), "{frames:?}");
    } else {
        let (_, offset) = victim_offset();
        assert_eq!(frames, fallback(&victim.path, offset));
        assert_eq!(
            processes.lock().unwrap().stats()[ProcessLoss::BinaryOpenFailed],
            1
        );
    }
}

/// A process that exited before it was ever seen (its announcement came
/// too late): the window is still produced, its frames `[unknown]`, and the
/// failed snapshot is counted.
#[test]
fn process_gone_before_first_sight_gives_unknown_frames() {
    let mut victim = Victim::start();
    let pid = victim.pid();
    let addr = victim.addr;
    victim.exit();
    let processes = Arc::new(Mutex::new(ProcessCache::default()));
    let mut sym = BlazeSymbolizer::new(processes.clone());
    let window = profiler_agent::drain::RawWindow {
        samples: vec![profiler_agent::drain::RawSample {
            thread_state: None,
            waker: Vec::new(),
            tgid: pid,
            comm: "victim".into(),
            user: vec![addr, addr + 0x40],
            user_end: None,
            kernel: vec![],
            sample_type: profiler_agent::sample_type::SampleType::Cpu,
            value: 4,
        }],
        ..Default::default()
    };
    let samples = profiler_agent::fold::symbolize_window(&window, &mut sym);
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0].value, 4);
    assert_eq!(samples[0].frames, vec!["[unknown]", "[unknown]"]);
    assert_eq!(
        processes.lock().unwrap().stats()[ProcessLoss::ProcessGoneBeforeSnapshot],
        1
    );
}
