//! Folded stacks: `process;root;...;leaf VALUE`, the FlameGraph/inferno
//! input format, aggregated over a whole recording (one profile per sample
//! type); and the symbolize step that names a drained window's frames and
//! marks the stacks whose user stack stopped early
//! (`process;[stack cut: REASON];...`).
use std::{collections::HashMap, io::Write};

use profiler_common::unwind::StackEnd;

use crate::{
    drain::RawWindow,
    sample_type::SampleType,
    symbolize::{sanitize, Symbolize},
};

/// Frame used when a sample has neither a user nor a kernel stack, so its
/// count is kept.
pub const NO_STACK_FRAME: &str = "[no stack]";

/// The root-side frame of a sample whose user stack stopped early, e.g.
/// `[stack cut: no_table]` (the reason is [`StackEnd::name`]); `None` for a
/// complete user stack or none.
pub fn stack_cut_frame(end: Option<StackEnd>) -> Option<String> {
    end.filter(|end| !end.is_complete())
        .map(|end| profiler_proto::frames::stack_cut(end.name()))
}

/// The reason a [`stack_cut_frame`] names; `None` for any other frame.
pub fn parse_stack_cut_frame(frame: &str) -> Option<StackEnd> {
    profiler_proto::frames::parse_stack_cut(frame).and_then(StackEnd::from_name)
}

/// A sample with its frames named, root first (a [`stack_cut_frame`] when
/// the user stack stopped early, user, then kernel frames).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolizedSample {
    pub tgid: u32,
    /// Process name (the sample's `comm` unless the caller renamed it).
    pub process: String,
    pub frames: Vec<String>,
    /// What `value` measures.
    pub sample_type: SampleType,
    /// In the unit of `sample_type`.
    pub value: u64,
    /// Off-CPU: how the thread left the CPU.
    pub thread_state: Option<&'static str>,
}

/// Names the frames of every sample of a window, once; a sample whose user
/// stack stopped early gets its [`stack_cut_frame`] at the root.
pub fn symbolize_window(
    window: &RawWindow,
    symbolizer: &mut dyn Symbolize,
) -> Vec<SymbolizedSample> {
    symbolizer.start_window();
    window
        .samples
        .iter()
        .map(|sample| {
            let mut frames: Vec<String> = stack_cut_frame(sample.user_end).into_iter().collect();
            frames.extend(symbolizer.user_stack(sample.tgid, &sample.user));
            frames.extend(symbolizer.kernel_stack(&sample.kernel));
            if !sample.waker.is_empty() {
                frames.push(profiler_proto::frames::WOKEN_BY.to_string());
                let mut waker = symbolizer.user_stack(sample.tgid, &sample.waker);
                waker.reverse();
                frames.extend(waker);
            }
            SymbolizedSample {
                tgid: sample.tgid,
                process: sample.comm.clone(),
                frames,
                sample_type: sample.sample_type,
                value: sample.value,
                thread_state: sample.thread_state,
            }
        })
        .collect()
}

/// Folded stacks with their values, all of one sample type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FoldedProfile {
    stacks: HashMap<String, u64>,
    total: u64,
}

impl FoldedProfile {
    /// Adds `count` (samples, or the type's unit) to a stack given root first (user frames, then
    /// kernel frames above them, as in `perf script | stackcollapse-perf.pl`).
    pub fn add(&mut self, process: &str, frames: &[String], count: u64) {
        if count == 0 {
            return;
        }
        let mut line = sanitize(process);
        if frames.is_empty() {
            line.push(';');
            line.push_str(NO_STACK_FRAME);
        }
        for frame in frames {
            line.push(';');
            line.push_str(frame);
        }
        *self.stacks.entry(line).or_default() += count;
        self.total += count;
    }

    /// Total samples.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Number of distinct stacks.
    pub fn len(&self) -> usize {
        self.stacks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stacks.is_empty()
    }

    /// Lines `stack COUNT`, sorted by stack (stable output, what inferno wants).
    pub fn lines(&self) -> Vec<String> {
        let mut entries: Vec<(&String, &u64)> = self.stacks.iter().collect();
        entries.sort();
        entries
            .into_iter()
            .map(|(stack, count)| format!("{stack} {count}"))
            .collect()
    }

    /// Writes the folded text.
    pub fn write_to(&self, mut out: impl Write) -> std::io::Result<()> {
        for line in self.lines() {
            writeln!(out, "{line}")?;
        }
        out.flush()
    }

    /// Iterates (stack, count).
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.stacks.iter().map(|(s, c)| (s.as_str(), *c))
    }

    /// Functions by self samples (the leaf frame), most first, at most `n`.
    pub fn top_self(&self, n: usize) -> Vec<(String, u64)> {
        let mut by_leaf: HashMap<&str, u64> = HashMap::new();
        for (stack, count) in &self.stacks {
            let leaf = stack.rsplit(';').next().unwrap_or(stack);
            let entry = by_leaf.entry(leaf).or_default();
            *entry = entry.saturating_add(*count);
        }
        let mut top: Vec<(String, u64)> = by_leaf
            .into_iter()
            .map(|(name, count)| (name.to_string(), count))
            .collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(n);
        top
    }
}

/// Parses folded text back (`stack COUNT` per line). Malformed lines are
/// counted, not fatal.
pub fn parse_folded(text: &str) -> (FoldedProfile, usize) {
    let mut profile = FoldedProfile::default();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match line
            .rsplit_once(' ')
            .and_then(|(s, c)| Some((s, c.parse::<u64>().ok()?)))
        {
            Some((stack, count)) if !stack.is_empty() => {
                // Counts come from the file: huge ones saturate, not overflow.
                let entry = profile.stacks.entry(stack.to_string()).or_default();
                *entry = entry.saturating_add(count);
                profile.total = profile.total.saturating_add(count);
            }
            _ => bad += 1,
        }
    }
    (profile, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::RawSample;

    /// Names addresses `0xN` as `fN`, kernel ones as `kN_[k]`.
    struct FakeSymbolizer;
    impl Symbolize for FakeSymbolizer {
        fn user_stack(&mut self, _pid: u32, ips: &[u64]) -> Vec<String> {
            ips.iter().rev().map(|ip| format!("f{ip}")).collect()
        }
        fn kernel_stack(&mut self, ips: &[u64]) -> Vec<String> {
            ips.iter().rev().map(|ip| format!("k{ip}_[k]")).collect()
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn folds_user_then_kernel_root_first() {
        let window = RawWindow {
            samples: vec![
                RawSample {
                    thread_state: None,
                    waker: Vec::new(),
                    tgid: 7,
                    comm: "app".into(),
                    user: vec![3, 2, 1],
                    user_end: Some(StackEnd::Root),
                    kernel: vec![20, 10],
                    sample_type: SampleType::Cpu,
                    value: 4,
                },
                RawSample {
                    thread_state: None,
                    waker: Vec::new(),
                    tgid: 7,
                    comm: "app".into(),
                    user: vec![3, 2, 1],
                    user_end: Some(StackEnd::Root),
                    kernel: vec![20, 10],
                    sample_type: SampleType::Cpu,
                    value: 1,
                },
                RawSample {
                    thread_state: None,
                    waker: Vec::new(),
                    tgid: 8,
                    comm: "kworker/1:0".into(),
                    user: vec![],
                    user_end: None,
                    kernel: vec![5],
                    sample_type: SampleType::Cpu,
                    value: 2,
                },
            ],
            ..RawWindow::default()
        };
        let mut profile = FoldedProfile::default();
        for sample in symbolize_window(&window, &mut FakeSymbolizer) {
            profile.add(&sample.process, &sample.frames, sample.value);
        }
        assert_eq!(
            profile.lines(),
            vec!["app;f1;f2;f3;k10_[k];k20_[k] 5", "kworker/1:0;k5_[k] 2"]
        );
        assert_eq!(profile.total(), 7);
    }

    #[test]
    fn stack_cut_frame_round_trips() {
        for end in StackEnd::ALL {
            match stack_cut_frame(Some(end)) {
                Some(frame) => {
                    assert!(!end.is_complete());
                    assert_eq!(frame, format!("[stack cut: {}]", end.name()));
                    assert_eq!(parse_stack_cut_frame(&frame), Some(end));
                }
                None => assert!(end.is_complete(), "{end:?}"),
            }
        }
        assert_eq!(stack_cut_frame(None), None);
        assert_eq!(
            stack_cut_frame(Some(StackEnd::NoTable)).as_deref(),
            Some("[stack cut: no_table]")
        );
        assert_eq!(parse_stack_cut_frame("[stack cut: root_of_all_evil]"), None);
        assert_eq!(parse_stack_cut_frame("main"), None);
    }

    #[test]
    fn cut_stacks_fold_under_their_marker_and_complete_ones_do_not() {
        let sample = |user: Vec<u64>, user_end, kernel: Vec<u64>, value| RawSample {
            thread_state: None,
            waker: Vec::new(),
            tgid: 7,
            comm: "app".into(),
            user,
            user_end,
            kernel,
            sample_type: SampleType::Cpu,
            value,
        };
        let window = RawWindow {
            samples: vec![
                sample(vec![3, 2, 1], Some(StackEnd::Root), vec![], 90),
                sample(vec![3, 2, 1], Some(StackEnd::FramePointerEnd), vec![], 2),
                sample(vec![3, 2], Some(StackEnd::NoTable), vec![10], 5),
                sample(vec![3], Some(StackEnd::BadRead), vec![], 2),
                sample(vec![3], Some(StackEnd::BadRead), vec![], 1),
                sample(vec![], None, vec![10], 4),
            ],
            ..RawWindow::default()
        };
        let mut profile = FoldedProfile::default();
        for sample in symbolize_window(&window, &mut FakeSymbolizer) {
            profile.add(&sample.process, &sample.frames, sample.value);
        }
        assert_eq!(
            profile.lines(),
            vec![
                "app;[stack cut: bad_read];f3 3",
                "app;[stack cut: no_table];f2;f3;k10_[k] 5",
                "app;f1;f2;f3 92",
                "app;k10_[k] 4",
            ]
        );
        let cut: u64 = profile
            .iter()
            .filter(|(stack, _)| {
                stack
                    .split(';')
                    .nth(1)
                    .and_then(parse_stack_cut_frame)
                    .is_some()
            })
            .map(|(_, n)| n)
            .sum();
        assert_eq!((cut, profile.total()), (8, 104));
    }

    #[test]
    fn separators_in_names_are_replaced_and_empty_stacks_kept() {
        let mut profile = FoldedProfile::default();
        profile.add("we;ird", &strings(&["a;b"]), 1);
        profile.add("empty", &[], 3);
        profile.add("zero", &strings(&["x"]), 0);
        // Frame names are sanitized by the symbolizer; process names here.
        assert_eq!(profile.lines(), vec!["empty;[no stack] 3", "we:ird;a;b 1"]);
    }

    #[test]
    fn top_self_counts_leaves() {
        let mut profile = FoldedProfile::default();
        profile.add("p", &strings(&["main", "hot"]), 30);
        profile.add("p", &strings(&["main", "other", "hot"]), 10);
        profile.add("p", &strings(&["main", "cold"]), 5);
        assert_eq!(
            profile.top_self(2),
            vec![("hot".to_string(), 40), ("cold".to_string(), 5)]
        );
    }

    #[test]
    fn folded_text_round_trips_and_counts_bad_lines() {
        let mut profile = FoldedProfile::default();
        profile.add("p", &strings(&["main", "with space"]), 3);
        let mut buf = Vec::new();
        profile.write_to(&mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text, "p;main;with space 3\n");
        let (back, bad) = parse_folded(&format!("{text}garbage\n 4\nx y\n"));
        assert_eq!(back, profile);
        assert_eq!(bad, 3);
    }

    /// Found by the `parse_folded` fuzz target: counts whose sum overflows.
    #[test]
    fn huge_counts_saturate() {
        let (profile, bad) = parse_folded(
            "a 18446744073709551615
b 1
a 2
",
        );
        assert_eq!(bad, 0);
        assert_eq!(profile.total(), u64::MAX);
        assert_eq!(profile.lines(), vec!["a 18446744073709551615", "b 1"]);
        // Two stacks with the same leaf.
        let (profile, _) = parse_folded("p;a;x 18446744073709551615\np;b;x 1\n");
        assert_eq!(profile.top_self(1), vec![("x".to_string(), u64::MAX)]);
    }
}
