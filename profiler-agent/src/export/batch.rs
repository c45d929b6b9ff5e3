//! One window's batch: [`BatchBuilder`] interns strings, stacks and label
//! sets so each is sent once, and [`BatchBuilder::finish`] adds the header
//! (agent id, sequence, window, frequency, sample type).
use std::{
    collections::HashMap,
    time::{SystemTime, UNIX_EPOCH},
};

use profiler_proto::v1::{Batch, Label, LabelSet, Sample, Stack};

use crate::sample_type::SampleType;

/// The CPU samples in a batch: the sum of its values for a `cpu` batch, 0
/// for other types, whose values are not counts of samples (nanoseconds for
/// `off_cpu`); their batches are counted as batches.
pub fn batch_samples(batch: &Batch) -> u64 {
    if !is_cpu_batch(batch) {
        return 0;
    }
    batch.samples.iter().map(|s| s.value.max(0) as u64).sum()
}

/// Whether a batch holds CPU samples (a batch without a type does).
pub fn is_cpu_batch(batch: &Batch) -> bool {
    batch
        .sample_type
        .as_ref()
        .is_none_or(|t| t.r#type == SampleType::Cpu.name())
}

/// Builds one batch of one sample type, interning strings, stacks and label
/// sets.
#[derive(Default)]
pub struct BatchBuilder {
    sample_type: SampleType,
    strings: Vec<Vec<u8>>,
    string_ids: HashMap<String, u32>,
    stacks: Vec<Stack>,
    stack_ids: HashMap<Vec<u32>, u32>,
    label_sets: Vec<LabelSet>,
    label_set_ids: HashMap<Vec<(u32, u32)>, u32>,
    samples: Vec<Sample>,
}

/// Longest string the collector takes (a frame name, label name or value).
pub const MAX_STRING_BYTES: usize = 4096;
/// Longest frame name a batch carries: a flame graph shows less.
pub const MAX_FRAME_BYTES: usize = 1024;
/// Longest folded stack the collector takes, `;` included.
pub const MAX_STACK_BYTES: usize = 64 * 1024;

/// The longest name each of `frames` frames may have for their folded
/// stack to fit [`MAX_STACK_BYTES`].
fn frame_cap(frames: usize) -> usize {
    MAX_FRAME_BYTES.min(MAX_STACK_BYTES / frames.max(1) - 1)
}

/// `name`, cut to at most `cap` bytes (on a character boundary) and ended
/// with `…` when longer.
pub fn shortened(name: &str, cap: usize) -> std::borrow::Cow<'_, str> {
    if name.len() <= cap {
        return std::borrow::Cow::Borrowed(name);
    }
    let mut end = cap.saturating_sub('…'.len_utf8());
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…", &name[..end]))
}

impl BatchBuilder {
    /// A batch of CPU samples.
    pub fn new() -> Self {
        Self::for_type(SampleType::Cpu)
    }

    /// A batch whose values are of `sample_type`.
    pub fn for_type(sample_type: SampleType) -> Self {
        let mut b = Self {
            sample_type,
            ..Self::default()
        };
        b.intern("");
        b
    }

    fn intern(&mut self, s: &str) -> u32 {
        if let Some(id) = self.string_ids.get(s) {
            return *id;
        }
        let id = self.strings.len() as u32;
        self.strings.push(s.as_bytes().to_vec());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    /// Adds `value` (in the batch type's unit) to `frames` (root first)
    /// with `labels`. Names too long for the collector are shortened
    /// ([`shortened`]), so one C++ template name cannot make it refuse a
    /// whole window.
    pub fn add(&mut self, labels: &[(&str, &str)], frames: &[String], value: u64) {
        if frames.is_empty() || value == 0 {
            return;
        }
        let cap = frame_cap(frames.len());
        let frame_ids: Vec<u32> = frames
            .iter()
            .map(|f| self.intern(&shortened(f, cap)))
            .collect();
        let stack = match self.stack_ids.get(&frame_ids) {
            Some(id) => *id,
            None => {
                let id = self.stacks.len() as u32;
                self.stacks.push(Stack {
                    frames: frame_ids.clone(),
                });
                self.stack_ids.insert(frame_ids, id);
                id
            }
        };
        let mut pairs: Vec<(u32, u32)> = labels
            .iter()
            .map(|(n, v)| {
                (
                    self.intern(&shortened(n, MAX_STRING_BYTES)),
                    self.intern(&shortened(v, MAX_STRING_BYTES)),
                )
            })
            .collect();
        pairs.sort_unstable();
        let label_set = match self.label_set_ids.get(&pairs) {
            Some(id) => *id,
            None => {
                let id = self.label_sets.len() as u32;
                self.label_sets.push(LabelSet {
                    labels: pairs
                        .iter()
                        .map(|(name, value)| Label {
                            name: *name,
                            value: *value,
                        })
                        .collect(),
                });
                self.label_set_ids.insert(pairs, id);
                id
            }
        };
        self.samples.push(Sample {
            label_set,
            stack,
            value: value.min(i64::MAX as u64) as i64,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The batch, with its header.
    pub fn finish(self, header: BatchHeader) -> Batch {
        Batch {
            agent_id: header.agent_id,
            sequence: header.sequence,
            node: header.node,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            window_start_unix_nanos: unix_nanos(header.window_start),
            window_end_unix_nanos: unix_nanos(header.window_end),
            frequency_hz: header.frequency_hz,
            strings: self.strings,
            stacks: self.stacks,
            label_sets: self.label_sets,
            samples: self.samples,
            sample_type: Some(self.sample_type.to_proto()),
        }
    }
}

/// What a batch says about itself.
pub struct BatchHeader {
    pub agent_id: String,
    pub sequence: u64,
    pub node: String,
    pub window_start: SystemTime,
    pub window_end: SystemTime,
    pub frequency_hz: u32,
}

pub(super) fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_names_are_shortened_to_what_the_collector_takes() {
        let mut b = BatchBuilder::new();
        let huge = "std::vector<".repeat(1000);
        let deep: Vec<String> = (0..200)
            .map(|i| format!("f{i}_{}", "x".repeat(600)))
            .collect();
        b.add(&[("process", "app")], &["app".into(), huge.clone()], 1);
        b.add(&[("exe", &"/".repeat(5000))], &deep, 1);
        let batch = b.finish(BatchHeader {
            agent_id: "a".into(),
            sequence: 1,
            node: "n".into(),
            window_start: std::time::SystemTime::now(),
            window_end: std::time::SystemTime::now(),
            frequency_hz: 99,
        });
        assert!(batch.strings.iter().all(|s| s.len() <= MAX_STRING_BYTES));
        let name = |i: u32| std::str::from_utf8(&batch.strings[i as usize]).unwrap();
        let first = name(batch.stacks[0].frames[1]);
        assert!(
            first.len() <= MAX_FRAME_BYTES && first.ends_with('…'),
            "{first}"
        );
        assert!(first.starts_with("std::vector<std::vector<"));
        for stack in &batch.stacks {
            let folded: usize = stack
                .frames
                .iter()
                .map(|&f| name(f).len() + 1)
                .sum::<usize>()
                - 1;
            assert!(folded <= MAX_STACK_BYTES, "{folded} bytes");
        }
        // Names that fit are kept whole, and cutting never splits a character.
        assert_eq!(shortened("short", 10), "short");
        assert_eq!(shortened("ééééé", 6), "é…");
    }

    use std::time::Duration;

    use super::*;

    #[test]
    fn builder_interns_strings_stacks_and_label_sets() {
        let mut b = BatchBuilder::new();
        let frames = vec!["main".to_string(), "hot".to_string()];
        let labels = [("node", "n1"), ("process", "app")];
        b.add(&labels, &frames, 3);
        b.add(&labels, &frames, 2);
        b.add(
            &[("node", "n1"), ("process", "db")],
            &["main".to_string()],
            1,
        );
        b.add(&labels, &[], 5);
        let batch = b.finish(BatchHeader {
            agent_id: "a".into(),
            sequence: 7,
            node: "n1".into(),
            window_start: UNIX_EPOCH + Duration::from_secs(10),
            window_end: UNIX_EPOCH + Duration::from_secs(20),
            frequency_hz: 99,
        });
        assert_eq!(batch.sequence, 7);
        assert_eq!(batch.window_end_unix_nanos, 20_000_000_000);
        assert_eq!(batch.stacks.len(), 2);
        assert_eq!(batch.label_sets.len(), 2);
        assert_eq!(batch.samples.len(), 3);
        let strings: Vec<&str> = batch
            .strings
            .iter()
            .map(|s| std::str::from_utf8(s).unwrap())
            .collect();
        assert_eq!(
            strings,
            ["", "main", "hot", "node", "n1", "process", "app", "db"]
        );
    }

    #[test]
    fn batch_samples_counts_cpu_samples_and_the_header_names_the_type() {
        let batch = |sample_type| {
            let mut b = BatchBuilder::for_type(sample_type);
            b.add(&[("node", "n")], &["main".to_string()], 1_500);
            b.add(&[("node", "n")], &["idle".to_string()], 2_500);
            b.finish(BatchHeader {
                agent_id: "a".into(),
                sequence: 1,
                node: "n".into(),
                window_start: UNIX_EPOCH,
                window_end: UNIX_EPOCH + Duration::from_secs(1),
                frequency_hz: 0,
            })
        };
        let cpu = batch(SampleType::Cpu);
        assert_eq!(batch_samples(&cpu), 4_000);
        let off = batch(SampleType::OffCpu);
        assert_eq!(off.sample_type, Some(SampleType::OffCpu.to_proto()));
        assert_eq!(batch_samples(&off), 0, "nanoseconds are not samples");
    }
}
