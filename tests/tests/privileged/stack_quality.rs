//! Stack quality end to end: the real agent walking the user stacks of C
//! built without frame pointers (`nofp`) with frame pointers only marks
//! them `[stack cut: REASON]` right after the process name, and with CFI
//! (the default) marks none; a real collector's `/api/v1/quality` gives the
//! same shares as the agent's own profile, and its web UI shows them next
//! to the flame graph.

use std::{collections::BTreeMap, path::Path};

use crate::support::{collector::*, *};
use profiler_agent::{
    config::UnwindMode,
    fold::{parse_stack_cut_frame, FoldedProfile},
    record::Recording,
};
use profiler_collector::server::RunningCollector;
use serde_json::json;

const SECONDS: f64 = 3.0;
const FREQUENCY: u64 = 499;
/// `{process="nofp"}`, URL-encoded.
const NOFP: &str = "%7Bprocess%3D%22nofp%22%7D";

/// A process's samples, and those whose stack is marked cut, by reason.
#[derive(Debug)]
struct Cut {
    total: u64,
    by_reason: BTreeMap<&'static str, u64>,
}

impl Cut {
    fn of(profile: &FoldedProfile, process: &str) -> Self {
        let mut cut = Cut {
            total: 0,
            by_reason: BTreeMap::new(),
        };
        for (frames, count) in stacks_of(profile, process) {
            cut.total += count;
            if let Some(end) = frames.first().and_then(|f| parse_stack_cut_frame(f)) {
                *cut.by_reason.entry(end.name()).or_default() += count;
            }
            assert!(
                frames
                    .iter()
                    .skip(1)
                    .all(|f| parse_stack_cut_frame(f).is_none()),
                "a marker is only ever the first frame under the process: {frames:?}"
            );
        }
        cut
    }

    fn cut(&self) -> u64 {
        self.by_reason.values().sum()
    }

    /// What `/api/v1/quality` must answer for these samples.
    fn expected_answer(&self) -> serde_json::Value {
        let share = |n: u64| n as f64 / self.total as f64;
        let mut reasons: Vec<(&str, u64)> = self.by_reason.iter().map(|(r, n)| (*r, *n)).collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        json!({
            "type": "cpu",
            "unit": "samples",
            "total": self.total,
            "complete": self.total - self.cut(),
            "complete_share": share(self.total - self.cut()),
            "cut": self.cut(),
            "cut_share": share(self.cut()),
            "cut_by_reason": reasons
                .iter()
                .map(|(reason, n)| json!({"reason": reason, "value": n, "share": share(*n)}))
                .collect::<Vec<_>>(),
        })
    }
}

/// Records `nofp` alone for [`SECONDS`], walking user stacks with
/// `unwind`; every window goes to `collector`, and the whole run's profile
/// is kept too (`folded`).
fn record_nofp(unwind: UnwindMode, collector: &RunningCollector, folded: &Path) -> Recording {
    let w = Workload::spawn(&workload("nofp"), &["60"]);
    wait_for_exec(w.pid(), "nofp");
    let mut opts = options(vec![w.pid()], SECONDS, FREQUENCY);
    opts.sampler.unwind = unwind;
    opts.export = Some(export_to(collector));
    opts.folded = Some(folded.to_path_buf());
    let (rec, ()) = record_with(&opts, || ());
    assert_all_delivered(rec.export.as_ref().unwrap());
    assert!(rec.profile_kept);
    rec
}

/// The agent's own count of stacks that stopped early, by reason.
fn cut_ends(rec: &Recording) -> BTreeMap<&'static str, u64> {
    rec.user_stack_ends
        .iter()
        .filter(|(end, n)| !end.is_complete() && **n > 0)
        .map(|(end, n)| (end.name(), *n))
        .collect()
}

fn quality(c: &RunningCollector) -> serde_json::Value {
    let path = format!("/api/v1/quality?start=now-1h&query={NOFP}");
    serde_json::from_slice(&http_get(c.http_addr, &path)).unwrap()
}

/// The stack quality line of the web UI at `/?{selection}`, as Chromium
/// renders it.
fn ui_quality_line(c: &RunningCollector, selection: &str) -> String {
    let dom = chromium(
        &["--dump-dom"],
        &format!("http://{}/?{selection}", c.http_addr),
    );
    dom.split("<div id=\"quality\">")
        .nth(1)
        .and_then(|rest| rest.split("</div>").next())
        .unwrap_or_else(|| panic!("the page has no quality line:\n{dom}"))
        .to_string()
}

/// Walked with frame pointers, code without them stops early: most of
/// nofp's stacks carry a marker, exactly as many as the agent counted by
/// reason, and the collector and its UI give the same shares.
#[test]
fn frame_pointer_walks_of_code_without_them_are_marked_cut() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let c = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    let rec = record_nofp(UnwindMode::FramePointers, &c, &dir.path().join("fp.folded"));

    let cut = Cut::of(&rec.profile, "nofp");
    eprintln!("frame pointers: {cut:?}\n{}", dump(&rec.profile, "nofp"));
    let expected = SECONDS * FREQUENCY as f64;
    assert!(
        cut.total as f64 >= 0.3 * expected,
        "too few samples (expected ~{expected:.0}): {cut:?}"
    );
    assert!(
        cut.cut() * 2 > cut.total,
        "most stacks must be marked cut: {cut:?}\n{}",
        dump(&rec.profile, "nofp")
    );
    assert_eq!(
        cut.by_reason,
        cut_ends(&rec),
        "one marker per sample the agent counted as stopped early"
    );

    let answer = quality(&c);
    assert_eq!(answer, cut.expected_answer(), "the collector's shares");

    // The web UI's line next to the flame graph.
    let line = ui_quality_line(&c, "process=nofp&start=now-10m");
    eprintln!("UI: {line}");
    let shown: f64 = line
        .strip_prefix("Stacks: ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no quality line: {line:?}"));
    let complete = 100.0 * answer["complete_share"].as_f64().unwrap();
    assert!((shown - complete).abs() <= 0.051, "{line:?}: {complete}");
    let (_, reasons) = line.split_once(" complete · cut: ").unwrap_or_default();
    for reason in cut.by_reason.keys() {
        assert!(
            reasons.contains(&format!("{reason} ")),
            "{reason}: {line:?}"
        );
    }
    assert_eq!(
        ui_quality_line(&c, "process=nofp&start=now-3h&end=now-2h"),
        "",
        "nothing for an empty selection"
    );
    rt.block_on(c.shutdown()).unwrap();
}

/// Walked with CFI (the default), the same code reaches its outermost
/// frame every time: no marker, and the collector says 100 % complete.
#[test]
fn cfi_walks_of_code_without_frame_pointers_are_complete() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let c = start_collector(&rt, &dir.path().join("p.db"), "127.0.0.1:0", "127.0.0.1:0");
    let rec = record_nofp(UnwindMode::Cfi, &c, &dir.path().join("cfi.folded"));

    let cut = Cut::of(&rec.profile, "nofp");
    eprintln!("CFI: {cut:?}");
    let expected = SECONDS * FREQUENCY as f64;
    assert!(
        cut.total as f64 >= 0.3 * expected,
        "too few samples (expected ~{expected:.0}): {cut:?}"
    );
    assert_eq!(
        cut.cut(),
        0,
        "no stack of nofp may be cut: {cut:?}\n{}",
        dump(&rec.profile, "nofp")
    );
    assert!(cut_ends(&rec).is_empty(), "{:?}", rec.user_stack_ends);
    let answer = quality(&c);
    assert_eq!(answer, cut.expected_answer());
    assert_eq!(answer["complete_share"], json!(1.0));
    rt.block_on(c.shutdown()).unwrap();
}
