//! Golden files for rendered output: the folded text and the SVG of a fixed
//! profile must not change unnoticed. Re-bless with `BLESS=1 cargo test`.
use std::path::Path;

use profiler_agent::{
    fold::{parse_folded, FoldedProfile},
    render::{write_svg, RenderInfo},
};

fn profile() -> FoldedProfile {
    let mut p = FoldedProfile::default();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    p.add(
        "chain",
        &s(&["__libc_start_call_main", "main", "outer", "inner_hot"]),
        297,
    );
    p.add(
        "gowork",
        &s(&[
            "runtime.goexit",
            "runtime.main",
            "main.main",
            "main.hotGoLoop",
        ]),
        301,
    );
    p.add(
        "syscalls",
        &s(&[
            "main",
            "__GI___libc_read",
            "entry_SYSCALL_64_after_hwframe_[k]",
            "do_syscall_64_[k]",
            "read_zero_[k]",
        ]),
        200,
    );
    p.add(
        "rustwork",
        &s(&[
            "rustwork::main",
            "rustwork::crunch::hot_rust_loop",
            "<u64>::wrapping_mul_[i]",
        ]),
        40,
    );
    p.add(
        "kworker/0:1",
        &s(&["worker_thread_[k]", "process_one_work_[k]"]),
        3,
    );
    p.add("stripped", &s(&["libfoo.so+0x1a2b", "[unknown]"]), 2);
    p
}

fn check(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with BLESS=1 to create it)", path.display()));
    assert!(
        expected == actual,
        "{} differs from the rendered output; if the change is intended, re-bless with BLESS=1",
        path.display()
    );
}

#[test]
fn folded_output_matches_golden_file() {
    let mut out = Vec::new();
    profile().write_to(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    check("profile.folded", &text);
    let (back, bad) = parse_folded(&text);
    assert_eq!((back, bad), (profile(), 0));
}

#[test]
fn svg_output_matches_golden_file() {
    let info = RenderInfo {
        host: "golden-host".into(),
        duration_secs: 10.0,
        frequency: 99,
        sample_type: profiler_agent::sample_type::SampleType::Cpu,
    };
    let mut out = Vec::new();
    write_svg(&profile(), &info, &mut out).unwrap();
    let svg = String::from_utf8(out).unwrap();
    assert!(svg.contains("CPU profile of golden-host — 10.0 s at 99 Hz, 843 samples"));
    check("profile.svg", &svg);
}
