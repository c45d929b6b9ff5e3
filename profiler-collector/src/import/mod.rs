//! Conversion of foreign profiles into the collector's native batches:
//! pprof files ([`pprof`]) and OTLP profiles ([`otlp`]), as specified in
//! the shared mapping (stacks root first, inlined frames `_[i]`, kernel
//! `_[k]`, JIT `_[j]`, OTLP attributes to labels).
//!
//! A conversion is all or nothing: any bad index, value or attribute
//! refuses the whole input with an [`ImportError`] naming the element. The
//! batches it gives pass [`crate::validate::validate`], and each batch's
//! `sequence` is a hash of its content, so the same profile sent twice is
//! stored once.
use std::collections::HashMap;
use std::hash::Hasher;

use profiler_proto::v1::{Batch, Label, LabelSet, Sample, SampleType, Stack};
use prost::Message;
use siphasher::sip::SipHasher13;

use crate::{
    model::{CPU, KNOWN_TYPES},
    validate::Limits,
    wall::WALL,
};

pub mod otlp;
pub mod pprof;

pub use otlp::OtlpLimits;

/// Why an import was refused. [`ImportError::reason`] names the kind for
/// metrics; the text names the element at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("the body is empty")]
    Empty,
    #[error("the profile is larger than the limit of {limit} bytes (inflated)")]
    TooLarge { limit: usize },
    #[error("bad gzip: {0}")]
    BadGzip(String),
    #[error("undecodable profile: {0}")]
    Undecodable(String),
    /// A request of another version of the format.
    #[error("{0}")]
    Version(String),
    #[error("{path} {index} out of range ({table} has {len} entries)")]
    IndexOutOfRange {
        path: String,
        index: i64,
        table: &'static str,
        len: usize,
    },
    #[error("{path} {id} is not the id of any {table} entry")]
    UnknownId {
        path: String,
        id: u64,
        table: &'static str,
    },
    #[error("{path} {message}")]
    BadId { path: String, message: String },
    #[error("{path} must be the zero value {expected}")]
    ZeroValue {
        path: String,
        expected: &'static str,
    },
    #[error("{path} has {len} entries, more than the limit of {limit}")]
    TableTooLarge {
        path: String,
        len: usize,
        limit: usize,
    },
    #[error("{path} has more than {limit} frames")]
    StackTooDeep { path: String, limit: usize },
    #[error("{path}: its stacks and labels resolve to more than {limit} bytes")]
    ResolvesTooLarge { path: String, limit: usize },
    #[error("{path} {message}")]
    BadValue { path: String, message: String },
    #[error("{path} {message}")]
    BadAttribute { path: String, message: String },
}

impl ImportError {
    /// Short snake_case reason, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ImportError::Empty => "empty",
            ImportError::TooLarge { .. } | ImportError::ResolvesTooLarge { .. } => "too_large",
            ImportError::BadGzip(_) => "bad_gzip",
            ImportError::Undecodable(_) => "undecodable",
            ImportError::Version(_) => "unsupported_version",
            ImportError::IndexOutOfRange { .. }
            | ImportError::UnknownId { .. }
            | ImportError::BadId { .. } => "bad_index",
            ImportError::ZeroValue { .. } => "zero_value_rule",
            ImportError::TableTooLarge { .. } => "table_too_large",
            ImportError::StackTooDeep { .. } => "stack_too_deep",
            ImportError::BadValue { .. } => "bad_value",
            ImportError::BadAttribute { .. } => "bad_attribute",
        }
    }

    pub(crate) fn value(path: impl Into<String>, message: impl Into<String>) -> Self {
        ImportError::BadValue {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn attribute(path: impl Into<String>, message: impl Into<String>) -> Self {
        ImportError::BadAttribute {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A gzip body inflated, at most `max_bytes` of it (a larger one, such as
/// a zip bomb, is refused once past the limit, without inflating the rest).
pub fn inflate(body: &[u8], max_bytes: usize) -> Result<Vec<u8>, ImportError> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(body)
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ImportError::BadGzip(e.to_string()))?;
    if out.len() > max_bytes {
        return Err(ImportError::TooLarge { limit: max_bytes });
    }
    Ok(out)
}

/// Who the batches are from: the agent id and node they carry (an OTLP
/// resource with `host.name` names its own).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub agent_id: String,
    pub node: String,
}

/// A label name from a foreign key: lower-cased, every char outside
/// `[a-z0-9_]` replaced by `_`, and `_` put before a leading digit (label
/// names start with a letter or `_`). `None` for an empty key.
pub fn label_name(key: &str) -> Option<String> {
    let mut name = sanitize(key);
    if name.is_empty() {
        return None;
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    Some(name)
}

/// `text` lower-cased, every char outside `[a-z0-9_]` replaced by `_`.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect()
}

/// The sample type of a foreign `(type, unit)`: both sanitized as label
/// names are (no `_` prefix), and a type that is one of ours with another
/// unit (`cpu`, `off_cpu`), or the reserved `wall`, renamed `TYPE_UNIT`
/// (Go's `cpu`/`nanoseconds` is `cpu_nanoseconds`/`nanoseconds`).
pub fn sample_type(name: &str, unit: &str) -> Result<(String, String), String> {
    let (mut name, unit) = (sanitize(name), sanitize(unit));
    if name.is_empty() || unit.is_empty() {
        return Err(format!("type {name:?} and unit {unit:?} must not be empty"));
    }
    let conflicts = name == WALL
        || KNOWN_TYPES
            .iter()
            .any(|(known, known_unit)| *known == name && *known_unit != unit);
    if conflicts {
        name = format!("{name}_{unit}");
    }
    if name.len() > 64 || unit.len() > 64 {
        return Err(format!(
            "type {name:?} or unit {unit:?} is longer than 64 bytes"
        ));
    }
    Ok((name, unit))
}

/// The sampling frequency of a batch of type `name`: `round(1e9 / period)`
/// for `cpu` (the period in nanoseconds), 0 for any other type (the store
/// counts a non-zero frequency as a CPU sampling frequency).
pub fn frequency_hz(name: &str, period_unit: Option<&str>, period: i64) -> Result<u32, String> {
    if name != CPU {
        return Ok(0);
    }
    if period_unit != Some("nanoseconds") || period <= 0 {
        return Err(format!(
            "type cpu needs a period in nanoseconds, not {period} {}",
            period_unit.unwrap_or("(no period type)")
        ));
    }
    let hz = (1e9 / period as f64).round();
    if !(1.0..=10_000.0).contains(&hz) {
        return Err(format!(
            "period {period} ns is a frequency of {hz} Hz, not 1-10000"
        ));
    }
    Ok(hz as u32)
}

/// The window `[start, start + duration]` (at least 1 ns long, at most
/// the longest window of a batch) of a profile collected at `start` Unix
/// nanoseconds.
pub fn window(start: i64, duration: i64) -> Result<(i64, i64), String> {
    if start <= 0 {
        return Err(format!("{start} is not a collection time"));
    }
    if duration < 0 {
        return Err(format!("duration {duration} is negative"));
    }
    let longest = Limits::default().max_window_ns;
    if duration > longest {
        return Err(format!(
            "duration {duration} ns is longer than a batch's window may be ({longest} ns)"
        ));
    }
    let end = start
        .checked_add(duration.max(1))
        .ok_or_else(|| format!("start {start} + duration {duration} overflows"))?;
    Ok((start, end))
}

/// Labels merged from several sources: the first value of a name wins.
#[derive(Clone, Debug, Default)]
pub(crate) struct LabelsBuilder {
    labels: Vec<(String, String)>,
}

impl LabelsBuilder {
    /// Adds `name = value` unless `name` has a value already.
    pub fn add(&mut self, name: String, value: String) {
        if !self.labels.iter().any(|(n, _)| *n == name) {
            self.labels.push((name, value));
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The labels, sorted by name.
    pub fn sorted(mut self) -> Vec<(String, String)> {
        self.labels.sort();
        self.labels
    }
}

/// Frame names of one input, interned: stacks are lists of their ids.
#[derive(Default)]
pub(crate) struct Frames {
    names: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Frames {
    /// The id of the frame `name` + `suffix` (`_[i]`, `_[k]`, `_[j]` or "").
    pub fn id(&mut self, name: &str, suffix: &str) -> u32 {
        let frame = format!("{name}{suffix}");
        if let Some(id) = self.ids.get(&frame) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.push(frame.clone());
        self.ids.insert(frame, id);
        id
    }

    pub fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }
}

/// What a batch says besides its tables.
pub(crate) struct Header {
    pub agent_id: String,
    pub node: String,
    pub agent_version: String,
    pub window: (i64, i64),
    pub frequency_hz: u32,
    pub sample_type: (String, String),
}

/// Builds one batch: interns strings, stacks and label sets, and sums the
/// values of samples with the same stack and labels, within the limits of
/// [`crate::validate::validate`] (the default ones).
pub(crate) struct BatchBuilder {
    /// Where the batch comes from, for errors.
    path: String,
    strings: Vec<Vec<u8>>,
    string_ids: HashMap<String, u32>,
    /// Batch string id of each [`Frames`] id (`u32::MAX`: none yet).
    frame_strings: Vec<u32>,
    stacks: Vec<Stack>,
    stack_ids: HashMap<Vec<u32>, u32>,
    label_sets: Vec<LabelSet>,
    label_set_ids: HashMap<Vec<(String, String)>, u32>,
    samples: Vec<Sample>,
    sample_ids: HashMap<(u32, u32), usize>,
    /// Bytes of the folded stacks and labels, as validation counts them.
    resolved_bytes: usize,
    /// The sum of the values, and the most the batch's type may have.
    total: u64,
    max_total: u64,
    limits: Limits,
}

impl BatchBuilder {
    /// The builder of a batch of the type named `sample_type`.
    pub fn new(path: String, sample_type: &str) -> Self {
        let limits = Limits::default();
        Self {
            path,
            strings: vec![Vec::new()],
            string_ids: HashMap::from([(String::new(), 0)]),
            frame_strings: Vec::new(),
            stacks: Vec::new(),
            stack_ids: HashMap::new(),
            label_sets: Vec::new(),
            label_set_ids: HashMap::new(),
            samples: Vec::new(),
            sample_ids: HashMap::new(),
            resolved_bytes: 0,
            total: 0,
            max_total: if sample_type == CPU {
                limits.max_batch_count
            } else {
                limits.max_batch_value
            },
            limits,
        }
    }

    /// The id of string `s`, a `what` (for errors).
    fn string(&mut self, s: &str, what: &str) -> Result<u32, ImportError> {
        if let Some(id) = self.string_ids.get(s) {
            return Ok(*id);
        }
        if s.len() > self.limits.max_string_bytes {
            return Err(ImportError::value(
                self.path.clone(),
                format!(
                    "has a {what} of {} bytes, more than the limit of {}",
                    s.len(),
                    self.limits.max_string_bytes
                ),
            ));
        }
        let id = self.strings.len() as u32;
        self.strings.push(s.as_bytes().to_vec());
        self.string_ids.insert(s.to_string(), id);
        Ok(id)
    }

    fn charge(&mut self, bytes: usize) -> Result<(), ImportError> {
        self.resolved_bytes = self.resolved_bytes.saturating_add(bytes);
        if self.resolved_bytes > self.limits.max_resolved_bytes {
            return Err(ImportError::ResolvesTooLarge {
                path: self.path.clone(),
                limit: self.limits.max_resolved_bytes,
            });
        }
        Ok(())
    }

    /// The index of the stack of `frames` ([`Frames`] ids, root first).
    pub fn stack(&mut self, frames: &Frames, ids: &[u32]) -> Result<u32, ImportError> {
        if let Some(id) = self.stack_ids.get(ids) {
            return Ok(*id);
        }
        let bytes: usize = ids.iter().map(|id| frames.name(*id).len() + 1).sum();
        // At least the folded stack's length + 1, as validation counts it.
        if bytes > self.limits.max_stack_bytes {
            return Err(ImportError::value(
                self.path.clone(),
                format!(
                    "has a stack of {} bytes (folded), more than the limit of {}",
                    bytes - 1,
                    self.limits.max_stack_bytes - 1
                ),
            ));
        }
        self.charge(bytes)?;
        let mut stack = Vec::with_capacity(ids.len());
        for id in ids {
            let i = *id as usize;
            if self.frame_strings.len() <= i {
                self.frame_strings.resize(i + 1, u32::MAX);
            }
            if self.frame_strings[i] == u32::MAX {
                self.frame_strings[i] = self.string(frames.name(*id), "frame name")?;
            }
            stack.push(self.frame_strings[i]);
        }
        let id = self.stacks.len() as u32;
        self.stacks.push(Stack { frames: stack });
        self.stack_ids.insert(ids.to_vec(), id);
        Ok(id)
    }

    /// The index of the label set `labels` (sorted, names unique).
    pub fn label_set(&mut self, labels: &[(String, String)]) -> Result<u32, ImportError> {
        if let Some(id) = self.label_set_ids.get(labels) {
            return Ok(*id);
        }
        self.charge(labels.iter().map(|(n, v)| n.len() + v.len()).sum())?;
        let set = LabelSet {
            labels: labels
                .iter()
                .map(|(name, value)| {
                    Ok(Label {
                        name: self.string(name, "label name")?,
                        value: self.string(value, "label value")?,
                    })
                })
                .collect::<Result<_, ImportError>>()?,
        };
        let id = self.label_sets.len() as u32;
        self.label_sets.push(set);
        self.label_set_ids.insert(labels.to_vec(), id);
        Ok(id)
    }

    /// Adds `value` (positive) to the sample of `label_set` and `stack`;
    /// `path` names the input sample for errors.
    pub fn add(
        &mut self,
        label_set: u32,
        stack: u32,
        value: i64,
        path: impl Fn() -> String,
    ) -> Result<(), ImportError> {
        self.total = self.total.saturating_add(value.unsigned_abs());
        if self.total > self.max_total {
            return Err(ImportError::value(
                path(),
                format!(
                    "makes the values of its type sum to more than {}, the most of a batch",
                    self.max_total
                ),
            ));
        }
        match self.sample_ids.get(&(label_set, stack)) {
            Some(i) => {
                let sample = &mut self.samples[*i];
                sample.value = sample.value.checked_add(value).ok_or_else(|| {
                    ImportError::value(path(), "makes a sum of values that overflows")
                })?;
            }
            None => {
                if self.samples.len() == self.limits.max_samples {
                    return Err(ImportError::value(
                        path(),
                        format!(
                            "makes more than {} samples (distinct stacks and labels) of its type",
                            self.limits.max_samples
                        ),
                    ));
                }
                self.sample_ids
                    .insert((label_set, stack), self.samples.len());
                self.samples.push(Sample {
                    label_set,
                    stack,
                    value,
                });
            }
        }
        Ok(())
    }

    /// The batch; `None` when it has no samples.
    pub fn finish(self, header: Header) -> Option<Batch> {
        if self.samples.is_empty() {
            return None;
        }
        let mut batch = Batch {
            agent_id: String::new(),
            sequence: 0,
            node: header.node,
            agent_version: header.agent_version,
            window_start_unix_nanos: header.window.0,
            window_end_unix_nanos: header.window.1,
            frequency_hz: header.frequency_hz,
            strings: self.strings,
            stacks: self.stacks,
            label_sets: self.label_sets,
            samples: self.samples,
            sample_type: Some(SampleType {
                r#type: header.sample_type.0,
                unit: header.sample_type.1,
            }),
        };
        batch.sequence = content_hash(&batch);
        batch.agent_id = header.agent_id;
        Some(batch)
    }
}

/// A stable hash of everything in `batch` but `agent_id` and `sequence`
/// (SipHash-1-3 of its encoding with both cleared, fixed keys); never 0.
pub fn content_hash(batch: &Batch) -> u64 {
    const KEYS: (u64, u64) = (0x7072_6f66_696c_6572, 0x696d_706f_7274_7631);
    let bytes = Batch {
        agent_id: String::new(),
        sequence: 0,
        ..batch.clone()
    }
    .encode_to_vec();
    let mut hasher = SipHasher13::new_with_keys(KEYS.0, KEYS.1);
    hasher.write(&bytes);
    hasher.finish().max(1)
}

/// Readers of converted batches for tests: what a user sees of them.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;

    use profiler_proto::v1::Batch;

    use crate::validate::{validate, Limits};

    /// A time after every window of the tests.
    pub const NOW: i64 = 1_800_000_000_000_000_000;

    pub fn string(batch: &Batch, i: u32) -> String {
        String::from_utf8(batch.strings[i as usize].clone()).unwrap()
    }

    /// Folded stacks (root first, `;`-joined) with their summed values.
    pub fn folded(batch: &Batch) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for s in &batch.samples {
            let stack: Vec<String> = batch.stacks[s.stack as usize]
                .frames
                .iter()
                .map(|f| string(batch, *f))
                .collect();
            *out.entry(stack.join(";")).or_default() += s.value;
        }
        out
    }

    /// A sample as a user reads it: folded stack, labels, value.
    pub type Line = (String, Vec<(String, String)>, i64);

    /// The labels of each sample with its folded stack, sorted.
    pub fn labeled(batch: &Batch) -> Vec<Line> {
        let mut out: Vec<_> = batch
            .samples
            .iter()
            .map(|s| {
                let stack: Vec<String> = batch.stacks[s.stack as usize]
                    .frames
                    .iter()
                    .map(|f| string(batch, *f))
                    .collect();
                let labels = batch.label_sets[s.label_set as usize]
                    .labels
                    .iter()
                    .map(|l| (string(batch, l.name), string(batch, l.value)))
                    .collect();
                (stack.join(";"), labels, s.value)
            })
            .collect();
        out.sort();
        out
    }

    /// The batch's `type/unit`.
    pub fn type_of(batch: &Batch) -> String {
        let t = batch.sample_type.as_ref().unwrap();
        format!("{}/{}", t.r#type, t.unit)
    }

    /// Panics unless every batch passes the collector's validation.
    pub fn assert_valid(batches: &[Batch]) {
        for b in batches {
            if let Err(e) = validate(b, &Limits::default(), NOW) {
                panic!("{} does not validate: {e}", type_of(b));
            }
        }
    }

    /// A pair of owned strings.
    pub fn kv(name: &str, value: &str) -> (String, String) {
        (name.to_string(), value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_are_sanitized() {
        assert_eq!(label_name("k8s.pod.name").as_deref(), Some("k8s_pod_name"));
        assert_eq!(label_name("Thread-ID").as_deref(), Some("thread_id"));
        assert_eq!(label_name("1st").as_deref(), Some("_1st"));
        assert_eq!(label_name("é").as_deref(), Some("_"));
        assert_eq!(label_name(""), None);
        for key in ["k8s.pod.name", "1st", "a b", "ÄÖ"] {
            assert!(crate::validate::valid_label_name(&label_name(key).unwrap()));
        }
    }

    #[test]
    fn sample_types_follow_the_naming_rule() {
        let t = |n, u| sample_type(n, u).unwrap();
        assert_eq!(
            t("cpu", "nanoseconds"),
            ("cpu_nanoseconds".into(), "nanoseconds".into())
        );
        assert_eq!(t("cpu", "samples"), ("cpu".into(), "samples".into()));
        assert_eq!(
            t("off_cpu", "nanoseconds"),
            ("off_cpu".into(), "nanoseconds".into())
        );
        assert_eq!(
            t("off_cpu", "count"),
            ("off_cpu_count".into(), "count".into())
        );
        assert_eq!(
            t("wall", "nanoseconds"),
            ("wall_nanoseconds".into(), "nanoseconds".into())
        );
        assert_eq!(
            t("Alloc-Space", "bytes"),
            ("alloc_space".into(), "bytes".into())
        );
        assert_eq!(t("samples", "count"), ("samples".into(), "count".into()));
        assert!(sample_type("", "count").is_err());
        assert!(sample_type("delay", "").is_err());
        assert!(sample_type(&"x".repeat(65), "count").is_err());
    }

    #[test]
    fn frequency_is_for_cpu_only() {
        assert_eq!(
            frequency_hz("cpu", Some("nanoseconds"), 10_000_000),
            Ok(100)
        );
        assert_eq!(frequency_hz("cpu", Some("nanoseconds"), 10_101_010), Ok(99));
        assert_eq!(
            frequency_hz("cpu_nanoseconds", Some("nanoseconds"), 10_000_000),
            Ok(0)
        );
        assert_eq!(
            frequency_hz("samples", Some("nanoseconds"), 10_000_000),
            Ok(0)
        );
        assert!(frequency_hz("cpu", Some("count"), 1).is_err());
        assert!(frequency_hz("cpu", Some("nanoseconds"), 0).is_err());
        assert!(frequency_hz("cpu", Some("nanoseconds"), 1).is_err());
        assert!(frequency_hz("cpu", None, 10_000_000).is_err());
    }

    #[test]
    fn windows_are_at_least_a_nanosecond() {
        assert_eq!(window(100, 50), Ok((100, 150)));
        assert_eq!(window(100, 0), Ok((100, 101)));
        assert!(window(0, 50).is_err());
        assert!(window(100, -1).is_err());
        assert!(window(i64::MAX - 1, 5).is_err());
        // No longer than a batch's window may be: validation would refuse
        // the batch.
        let day = Limits::default().max_window_ns;
        assert_eq!(window(100, day), Ok((100, 100 + day)));
        assert!(window(100, day + 1).is_err());
    }

    #[test]
    fn the_first_label_value_wins() {
        let mut l = LabelsBuilder::default();
        l.add("service".into(), "from-caller".into());
        l.add("b".into(), "1".into());
        l.add("service".into(), "from-sample".into());
        assert_eq!(l.get("service"), Some("from-caller"));
        assert_eq!(
            l.sorted(),
            vec![testing::kv("b", "1"), testing::kv("service", "from-caller")]
        );
    }

    #[test]
    fn builder_sums_equal_samples_and_hashes_content() {
        let mut frames = Frames::default();
        let (a, b) = (frames.id("main", ""), frames.id("work", "_[i]"));
        let header = || Header {
            agent_id: "a".into(),
            node: "n".into(),
            agent_version: String::new(),
            window: (10, 20),
            frequency_hz: 0,
            sample_type: ("delay".into(), "nanoseconds".into()),
        };
        let build = |value: i64| {
            let mut builder = BatchBuilder::new("p".into(), "delay");
            let set = builder.label_set(&[testing::kv("x", "1")]).unwrap();
            let stack = builder.stack(&frames, &[a, b]).unwrap();
            builder.add(set, stack, 2, String::new).unwrap();
            builder.add(set, stack, value, String::new).unwrap();
            builder.finish(header()).unwrap()
        };
        let batch = build(3);
        assert_eq!(
            testing::folded(&batch),
            [("main;work_[i]".to_string(), 5)].into()
        );
        assert_eq!(batch.sequence, build(3).sequence);
        assert_ne!(batch.sequence, build(4).sequence);
        let mut other_agent = batch.clone();
        other_agent.agent_id = "b".into();
        assert_eq!(content_hash(&other_agent), batch.sequence);
        assert!(BatchBuilder::new("p".into(), "delay")
            .finish(header())
            .is_none());
    }

    /// What validation refuses is refused by name while building (found by
    /// the import fuzz targets: such batches were refused only when stored,
    /// as invalid batches).
    #[test]
    fn builder_keeps_the_limits_of_validation() {
        let limits = Limits::default();
        for (t, max) in [
            ("delay", limits.max_batch_value),
            (CPU, limits.max_batch_count),
        ] {
            let mut builder = BatchBuilder::new("p".into(), t);
            builder.add(0, 0, max as i64 - 1, String::new).unwrap();
            builder.add(0, 1, 1, String::new).unwrap();
            let e = builder.add(0, 0, 1, || "samples[2]".into()).unwrap_err();
            assert_eq!(e.reason(), "bad_value");
            assert_eq!(
                e.to_string(),
                format!("samples[2] makes the values of its type sum to more than {max}, the most of a batch")
            );
        }

        let mut frames = Frames::default();
        let long = frames.id(&"f".repeat(limits.max_string_bytes + 1), "");
        let fits = frames.id(&"g".repeat(limits.max_string_bytes), "");
        let mut builder = BatchBuilder::new("sample_type[1]".into(), "delay");
        builder.stack(&frames, &[fits]).unwrap();
        let e = builder.stack(&frames, &[fits, long]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sample_type[1] has a frame name of 4097 bytes, more than the limit of 4096"
        );
        let e = builder
            .label_set(&[testing::kv("x", &"v".repeat(5000))])
            .unwrap_err();
        assert_eq!(e.reason(), "bad_value");

        let mut builder = BatchBuilder::new("p".into(), "delay");
        for stack in 0..limits.max_samples as u32 {
            builder.add(0, stack, 1, String::new).unwrap();
        }
        builder.add(0, 0, 1, String::new).unwrap();
        let e = builder.add(0, u32::MAX, 1, || "sample[7]".into());
        assert_eq!(
            e.unwrap_err().to_string(),
            "sample[7] makes more than 1000000 samples (distinct stacks and labels) of its type"
        );

        // 16 frames of 4096 bytes: 65551 bytes folded.
        let mut builder = BatchBuilder::new("p".into(), "delay");
        builder.stack(&frames, &[fits; 15]).unwrap();
        let e = builder.stack(&frames, &[fits; 16]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p has a stack of 65551 bytes (folded), more than the limit of 65535"
        );
    }
}
