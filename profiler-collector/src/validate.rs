//! Validation of incoming batches: a well-formed sample type with the unit
//! its type requires, every index in range, every string UTF-8, every value
//! positive and the total without overflow, a sane window. A batch is
//! accepted whole or rejected whole, with a reason.
use profiler_proto::v1::Batch;

use crate::{
    metrics::Reject,
    model::{BatchSample, Labels, SampleType, ValidBatch, CPU},
};

/// Limits applied to batches.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most frames in one stack.
    pub max_frames: usize,
    /// How far in the future a window may end (clock skew), in nanoseconds.
    pub max_future_ns: i64,
    /// Most samples in one batch.
    pub max_samples: usize,
    /// Longest string (frame name, label name or value), in bytes.
    pub max_string_bytes: usize,
    /// Longest folded stack, in bytes.
    pub max_stack_bytes: usize,
    /// Most bytes of resolved stacks and labels per batch: a small message
    /// cannot make the collector build a huge one.
    pub max_resolved_bytes: usize,
    /// Largest sum of the counts of a `cpu` batch (all samples together).
    /// Keeps sums over many batches far from overflowing.
    pub max_batch_count: u64,
    /// Largest sum of the values of a batch of any other type (nanoseconds,
    /// bytes, ...): 2^50 ns is 13 days of off-CPU time in one window.
    pub max_batch_value: u64,
    /// Longest window.
    pub max_window_ns: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frames: 1024,
            max_future_ns: 10 * 60 * 1_000_000_000,
            max_samples: 1_000_000,
            max_string_bytes: 4096,
            max_stack_bytes: 64 * 1024,
            max_resolved_bytes: 64 << 20,
            max_batch_count: 1 << 40,
            max_batch_value: 1 << 50,
            max_window_ns: 24 * 3600 * 1_000_000_000,
        }
    }
}

/// Why a batch was rejected. The reason names go to `/metrics`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("missing agent_id")]
    MissingAgentId,
    #[error("window: {0}")]
    Window(String),
    #[error("frequency_hz must be {expected}, got {got}")]
    Frequency { got: u32, expected: &'static str },
    #[error("sample_type.{field} {value:?} must be 1-64 lower-case ASCII letters, digits or `_`")]
    SampleTypeName { field: &'static str, value: String },
    #[error("sample type {0:?} is reserved: it names a view of the collector (cpu and off_cpu on one axis)")]
    ReservedType(String),
    #[error("sample type {sample_type:?} has unit {expected:?}, not {got:?}")]
    UnitMismatch {
        sample_type: String,
        expected: String,
        got: String,
    },
    #[error("strings[{0}] is not valid UTF-8")]
    InvalidUtf8(usize),
    #[error("{what} index {index} out of range (table has {len} entries)")]
    IndexOutOfRange {
        what: &'static str,
        index: u32,
        len: usize,
    },
    #[error("stacks[{0}] is empty")]
    EmptyStack(usize),
    #[error("stacks[{index}] has {frames} frames, more than the limit of {limit}")]
    StackTooDeep {
        index: usize,
        frames: usize,
        limit: usize,
    },
    #[error("samples[{index}] value {value} is not positive")]
    NonPositiveValue { index: usize, value: i64 },
    #[error("sample values overflow: their sum exceeds {limit}")]
    ValueOverflow { limit: u64 },
    #[error("label: {0}")]
    Label(String),
    #[error("{0} samples, more than the limit of {1}")]
    TooManySamples(usize, usize),
    #[error("{0}")]
    TooBig(String),
}

impl Rejection {
    /// The reason it is counted under.
    pub fn kind(&self) -> Reject {
        match self {
            Rejection::MissingAgentId => Reject::MissingAgentId,
            Rejection::Window(_) => Reject::BadWindow,
            Rejection::Frequency { .. } => Reject::BadFrequency,
            Rejection::SampleTypeName { .. } | Rejection::ReservedType(_) => Reject::BadSampleType,
            Rejection::UnitMismatch { .. } => Reject::UnitMismatch,
            Rejection::InvalidUtf8(_) => Reject::InvalidUtf8,
            Rejection::IndexOutOfRange { .. } => Reject::IndexOutOfRange,
            Rejection::EmptyStack(_) => Reject::EmptyStack,
            Rejection::StackTooDeep { .. } => Reject::StackTooDeep,
            Rejection::NonPositiveValue { .. } => Reject::BadCount,
            Rejection::ValueOverflow { .. } => Reject::CountOverflow,
            Rejection::Label(_) => Reject::BadLabel,
            Rejection::TooManySamples(..) => Reject::TooManySamples,
            Rejection::TooBig(_) => Reject::TooBig,
        }
    }

    /// Short reason for metrics and logs.
    pub fn reason(&self) -> &'static str {
        self.kind().name()
    }
}

/// Whether `name` is a valid label name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `name` is a valid sample type or unit name: 1-64 bytes of
/// `[a-z0-9_]`.
pub fn valid_type_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The batch's sample type (unset: `cpu`/`samples`), checked: well-formed
/// names, and the unit a known type requires.
pub fn sample_type(batch: &Batch) -> Result<SampleType, Rejection> {
    let Some(t) = &batch.sample_type else {
        return Ok(SampleType::cpu());
    };
    for (field, value) in [("type", &t.r#type), ("unit", &t.unit)] {
        if !valid_type_name(value) {
            return Err(Rejection::SampleTypeName {
                field,
                value: value.chars().take(80).collect(),
            });
        }
    }
    if t.r#type == crate::wall::WALL {
        return Err(Rejection::ReservedType(t.r#type.clone()));
    }
    if let Some(unit) = SampleType::known_unit(&t.r#type) {
        if unit != t.unit {
            return Err(Rejection::UnitMismatch {
                sample_type: t.r#type.clone(),
                expected: unit.to_string(),
                got: t.unit.clone(),
            });
        }
    }
    Ok(SampleType::new(&t.r#type, &t.unit))
}

fn index<'a, T>(table: &'a [T], index: u32, what: &'static str) -> Result<&'a T, Rejection> {
    table.get(index as usize).ok_or(Rejection::IndexOutOfRange {
        what,
        index,
        len: table.len(),
    })
}

/// Checks a batch and resolves its tables; `now_ns` bounds the window.
pub fn validate(batch: &Batch, limits: &Limits, now_ns: i64) -> Result<ValidBatch, Rejection> {
    if batch.agent_id.trim().is_empty() {
        return Err(Rejection::MissingAgentId);
    }
    let (start, end) = (batch.window_start_unix_nanos, batch.window_end_unix_nanos);
    if start <= 0 || end < start {
        return Err(Rejection::Window(format!(
            "start {start} and end {end} are not a time range"
        )));
    }
    if end > now_ns.saturating_add(limits.max_future_ns) {
        return Err(Rejection::Window(format!("end {end} is in the future")));
    }
    if end - start > limits.max_window_ns {
        return Err(Rejection::Window(format!(
            "a window of {} s is longer than a day",
            (end - start) / 1_000_000_000
        )));
    }
    let sample_type = sample_type(batch)?;
    // `cpu` is sampled at a frequency; measured types may say 0.
    let (frequencies, expected) = if sample_type.name == CPU {
        (1..=10_000, "1-10000 for type cpu")
    } else {
        (0..=10_000, "0-10000")
    };
    if !frequencies.contains(&batch.frequency_hz) {
        return Err(Rejection::Frequency {
            got: batch.frequency_hz,
            expected,
        });
    }
    let max_total = if sample_type.name == CPU {
        limits.max_batch_count
    } else {
        limits.max_batch_value
    };
    if batch.samples.len() > limits.max_samples {
        return Err(Rejection::TooManySamples(
            batch.samples.len(),
            limits.max_samples,
        ));
    }
    let strings: Vec<&str> = batch
        .strings
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if s.len() > limits.max_string_bytes {
                return Err(Rejection::TooBig(format!(
                    "strings[{i}] has {} bytes, more than the limit of {}",
                    s.len(),
                    limits.max_string_bytes
                )));
            }
            std::str::from_utf8(s).map_err(|_| Rejection::InvalidUtf8(i))
        })
        .collect::<Result<_, _>>()?;
    let mut resolved: usize = 0;
    let mut charge = |bytes: usize| {
        resolved += bytes;
        if resolved > limits.max_resolved_bytes {
            Err(Rejection::TooBig(format!(
                "stacks and labels resolve to more than {} bytes",
                limits.max_resolved_bytes
            )))
        } else {
            Ok(())
        }
    };

    let mut stacks = Vec::with_capacity(batch.stacks.len());
    for (i, stack) in batch.stacks.iter().enumerate() {
        if stack.frames.is_empty() {
            return Err(Rejection::EmptyStack(i));
        }
        if stack.frames.len() > limits.max_frames {
            return Err(Rejection::StackTooDeep {
                index: i,
                frames: stack.frames.len(),
                limit: limits.max_frames,
            });
        }
        let mut folded = String::new();
        for (n, frame) in stack.frames.iter().enumerate() {
            let name = index(&strings, *frame, "frame string")?;
            if folded.len() + name.len() + 1 > limits.max_stack_bytes {
                return Err(Rejection::TooBig(format!(
                    "stacks[{i}] is longer than {} bytes",
                    limits.max_stack_bytes
                )));
            }
            if n > 0 {
                folded.push(';');
            }
            // `;` separates frames and a newline ends a folded line. Most
            // names are plain printable ASCII: copied at once.
            if name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b';') {
                folded.push_str(name);
            } else {
                folded.extend(name.chars().map(|c| match c {
                    ';' => ':',
                    c if c.is_control() => ' ',
                    c => c,
                }));
            }
        }
        charge(folded.len())?;
        stacks.push(folded);
    }

    let mut label_sets: Vec<Labels> = Vec::with_capacity(batch.label_sets.len());
    for set in &batch.label_sets {
        let mut labels: Labels = Vec::with_capacity(set.labels.len());
        for label in &set.labels {
            let name = index(&strings, label.name, "label name string")?;
            let value = index(&strings, label.value, "label value string")?;
            if !valid_label_name(name) {
                return Err(Rejection::Label(format!("invalid label name {name:?}")));
            }
            charge(name.len() + value.len())?;
            labels.push((name.to_string(), value.to_string()));
        }
        labels.sort();
        if labels.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(Rejection::Label(
                "a label name appears twice in a set".into(),
            ));
        }
        label_sets.push(labels);
    }

    let mut total: u64 = 0;
    let mut samples = Vec::with_capacity(batch.samples.len());
    for (i, sample) in batch.samples.iter().enumerate() {
        if sample.value <= 0 {
            return Err(Rejection::NonPositiveValue {
                index: i,
                value: sample.value,
            });
        }
        let value = sample.value as u64;
        total = total.saturating_add(value);
        if total > max_total {
            return Err(Rejection::ValueOverflow { limit: max_total });
        }
        index(&label_sets, sample.label_set, "label set")?;
        index(&stacks, sample.stack, "stack")?;
        samples.push(BatchSample {
            label_set: sample.label_set as usize,
            stack: sample.stack as usize,
            value,
        });
    }
    Ok(ValidBatch {
        agent_id: batch.agent_id.clone(),
        sequence: batch.sequence,
        node: batch.node.clone(),
        agent_version: batch.agent_version.clone(),
        window_start_ns: start,
        window_end_ns: end,
        frequency_hz: batch.frequency_hz,
        sample_type,
        label_sets,
        stacks,
        samples,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use profiler_proto::v1::{Label, LabelSet, Sample, Stack};

    use super::*;

    pub const NOW: i64 = 1_800_000_000_000_000_000;

    /// A valid batch: process "app", stacks main;hot (3) and main;cold (1).
    pub fn batch() -> Batch {
        let strings = ["", "main", "hot", "cold", "process", "app", "node", "n1"];
        Batch {
            agent_id: "agent-1".into(),
            sequence: 1,
            node: "n1".into(),
            agent_version: "0.1.0".into(),
            window_start_unix_nanos: NOW - 10_000_000_000,
            window_end_unix_nanos: NOW,
            frequency_hz: 99,
            strings: strings.iter().map(|s| s.as_bytes().to_vec()).collect(),
            stacks: vec![Stack { frames: vec![1, 2] }, Stack { frames: vec![1, 3] }],
            label_sets: vec![LabelSet {
                labels: vec![Label { name: 4, value: 5 }, Label { name: 6, value: 7 }],
            }],
            samples: vec![
                Sample {
                    label_set: 0,
                    stack: 0,
                    value: 3,
                },
                Sample {
                    label_set: 0,
                    stack: 1,
                    value: 1,
                },
            ],
            sample_type: None,
        }
    }

    fn reject(batch: Batch) -> Rejection {
        validate(&batch, &Limits::default(), NOW).unwrap_err()
    }

    #[test]
    fn accepts_a_good_batch() {
        let v = validate(&batch(), &Limits::default(), NOW).unwrap();
        assert_eq!(v.total(), 4);
        assert_eq!(v.stacks[v.samples[0].stack], "main;hot");
        assert_eq!(
            v.label_sets[v.samples[0].label_set],
            vec![
                ("node".into(), "n1".into()),
                ("process".into(), "app".into())
            ]
        );
    }

    #[test]
    fn rejects_bad_batches_with_reasons() {
        let mut b = batch();
        b.samples[0].stack = 9;
        assert_eq!(reject(b).reason(), "index_out_of_range");
        let mut b = batch();
        b.stacks[0].frames.push(42);
        assert!(reject(b)
            .to_string()
            .contains("frame string index 42 out of range"));
        let mut b = batch();
        b.stacks[1].frames.clear();
        assert_eq!(reject(b), Rejection::EmptyStack(1));
        let mut b = batch();
        b.stacks[0].frames = vec![1; 10_000];
        assert_eq!(reject(b).reason(), "stack_too_deep");
        let mut b = batch();
        b.samples[1].value = -5;
        assert_eq!(reject(b).reason(), "bad_count");
        let mut b = batch();
        b.samples[0].value = i64::MAX;
        assert_eq!(reject(b).reason(), "count_overflow");
        let mut b = batch();
        b.window_end_unix_nanos = NOW + 3_600_000_000_000;
        assert!(reject(b).to_string().contains("in the future"));
        let mut b = batch();
        b.strings[2] = vec![0xff, 0xfe];
        assert_eq!(reject(b), Rejection::InvalidUtf8(2));
        let mut b = batch();
        b.agent_id.clear();
        assert_eq!(reject(b), Rejection::MissingAgentId);
        let mut b = batch();
        b.strings[4] = b"bad name".to_vec();
        assert_eq!(reject(b).reason(), "bad_label");
        let mut b = batch();
        b.frequency_hz = 0;
        assert_eq!(reject(b).reason(), "bad_frequency");
        let mut b = batch();
        b.samples[0].value = 1 << 41;
        assert_eq!(reject(b), Rejection::ValueOverflow { limit: 1 << 40 });
        let mut b = batch();
        b.window_start_unix_nanos = 1;
        assert!(reject(b).to_string().contains("longer than a day"));
    }

    #[test]
    fn small_messages_cannot_resolve_to_huge_ones() {
        // One long string referenced by every frame of a deep stack.
        let mut b = batch();
        b.strings[2] = vec![b'x'; 4000];
        b.stacks[0].frames = vec![2; 1000];
        assert!(reject(b).to_string().contains("longer than 65536 bytes"));
        let mut b = batch();
        b.strings[2] = vec![b'x'; 5000];
        assert_eq!(reject(b).reason(), "too_big");
        // Many stacks, each near the limit.
        let mut b = batch();
        b.strings[2] = vec![b'x'; 4000];
        b.stacks = (0..5000)
            .map(|_| Stack {
                frames: vec![2; 16],
            })
            .collect();
        assert!(reject(b).to_string().contains("resolve to more than"));
    }

    fn typed(name: &str, unit: &str) -> Batch {
        let mut b = batch();
        b.sample_type = Some(profiler_proto::v1::SampleType {
            r#type: name.into(),
            unit: unit.into(),
        });
        b
    }

    #[test]
    fn an_unset_sample_type_is_cpu_samples() {
        let v = validate(&batch(), &Limits::default(), NOW).unwrap();
        assert_eq!(v.sample_type, SampleType::new("cpu", "samples"));
        let v = validate(&typed("cpu", "samples"), &Limits::default(), NOW).unwrap();
        assert_eq!(v.sample_type, SampleType::cpu());
    }

    #[test]
    fn known_types_need_their_unit_and_others_keep_theirs() {
        let mut b = typed("off_cpu", "nanoseconds");
        b.frequency_hz = 0;
        b.samples[0].value = 5_000_000_000_000;
        let v = validate(&b, &Limits::default(), NOW).unwrap();
        assert_eq!(v.sample_type, SampleType::off_cpu());
        assert_eq!(v.total(), 5_000_000_000_001);
        for (name, unit) in [
            ("contentions", "count"),
            ("delay", "nanoseconds"),
            ("alloc_space", "bytes"),
        ] {
            let v = validate(&typed(name, unit), &Limits::default(), NOW).unwrap();
            assert_eq!(v.sample_type, SampleType::new(name, unit));
        }
        let r = reject(typed("cpu", "nanoseconds"));
        assert_eq!(r.reason(), "unit_mismatch");
        assert_eq!(
            r.to_string(),
            r#"sample type "cpu" has unit "samples", not "nanoseconds""#
        );
        assert_eq!(
            reject(typed("off_cpu", "samples")),
            Rejection::UnitMismatch {
                sample_type: "off_cpu".into(),
                expected: "nanoseconds".into(),
                got: "samples".into()
            }
        );
    }

    #[test]
    fn bad_type_and_unit_names_are_named_in_the_rejection() {
        for (name, unit, field) in [
            ("", "samples", "type"),
            ("CPU", "samples", "type"),
            ("off-cpu", "nanoseconds", "type"),
            ("wall", "", "unit"),
            ("wall", "Nanoseconds", "unit"),
            ("wall", "ns ", "unit"),
            (&"x".repeat(65), "count", "type"),
            ("wall", "é", "unit"),
        ] {
            let r = reject(typed(name, unit));
            assert_eq!(r.reason(), "bad_sample_type", "{name:?}/{unit:?}");
            assert!(
                r.to_string().starts_with(&format!("sample_type.{field} ")),
                "{r}"
            );
        }
        assert!(valid_type_name(&"x".repeat(64)));
        assert!(valid_type_name("alloc_space2"));
    }

    #[test]
    fn frequency_is_required_for_cpu_only() {
        let mut b = typed("off_cpu", "nanoseconds");
        b.frequency_hz = 0;
        assert!(validate(&b, &Limits::default(), NOW).is_ok());
        let mut b = typed("cpu", "samples");
        b.frequency_hz = 0;
        assert_eq!(
            reject(b).to_string(),
            "frequency_hz must be 1-10000 for type cpu, got 0"
        );
        let mut b = typed("delay", "nanoseconds");
        b.frequency_hz = 20_000;
        assert_eq!(reject(b).reason(), "bad_frequency");
    }

    #[test]
    fn label_names() {
        assert!(valid_label_name("container_id"));
        assert!(valid_label_name("_x1"));
        assert!(!valid_label_name("1x"));
        assert!(!valid_label_name("a-b"));
        assert!(!valid_label_name(""));
    }
}
