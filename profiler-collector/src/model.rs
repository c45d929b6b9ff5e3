//! The collector's data model: sample types, validated batches, label
//! selectors and aggregated profiles.
use std::collections::BTreeMap;

/// What a profile's values measure: a type and its unit (pprof's
/// `ValueType`), e.g. `cpu`/`samples` or `off_cpu`/`nanoseconds`. Both are
/// lower-case ASCII letters, digits and `_` (checked by the `validate`
/// module).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SampleType {
    #[serde(rename = "type")]
    pub name: String,
    pub unit: String,
}

/// The type queries pick when none is named, and batches that name none.
pub const CPU: &str = "cpu";
/// Time a thread spent off CPU (blocked), in nanoseconds.
pub const OFF_CPU: &str = "off_cpu";

/// Types whose unit is fixed: a batch of such a type must carry this unit.
/// Other types (imported from pprof: `contentions`/`count`,
/// `delay`/`nanoseconds`, `alloc_space`/`bytes`, ...) keep the unit they
/// come with, one unit per type in a store.
pub const KNOWN_TYPES: [(&str, &str); 2] = [(CPU, "samples"), (OFF_CPU, "nanoseconds")];

impl SampleType {
    pub fn new(name: &str, unit: &str) -> Self {
        Self {
            name: name.to_string(),
            unit: unit.to_string(),
        }
    }

    /// `cpu`/`samples`: counts of samples taken at a frequency.
    pub fn cpu() -> Self {
        Self::new(CPU, "samples")
    }

    /// `off_cpu`/`nanoseconds`.
    pub fn off_cpu() -> Self {
        Self::new(OFF_CPU, "nanoseconds")
    }

    /// The unit a known type must have; `None` for other types.
    pub fn known_unit(name: &str) -> Option<&'static str> {
        KNOWN_TYPES
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, unit)| *unit)
    }
}

impl Default for SampleType {
    fn default() -> Self {
        Self::cpu()
    }
}

/// Labels of a sample, sorted by name (names unique).
pub type Labels = Vec<(String, String)>;

/// One sample line of a batch after validation: indexes into the batch's
/// (resolved, de-duplicated) label sets and stacks, and the value in the
/// batch's unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSample {
    pub label_set: usize,
    pub stack: usize,
    pub value: u64,
}

/// A batch that passed validation, ready to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidBatch {
    pub agent_id: String,
    pub sequence: u64,
    pub node: String,
    pub agent_version: String,
    pub window_start_ns: i64,
    pub window_end_ns: i64,
    /// Sampling frequency of a sampled type (`cpu`); 0 for measured types.
    pub frequency_hz: u32,
    /// What every sample's value measures.
    pub sample_type: SampleType,
    /// Label sets, each sorted by name.
    pub label_sets: Vec<Labels>,
    /// Folded stacks, root first, frames joined by `;`.
    pub stacks: Vec<String>,
    pub samples: Vec<BatchSample>,
}

impl ValidBatch {
    /// The sum of the values, in the batch's unit.
    pub fn total(&self) -> u64 {
        self.samples
            .iter()
            .fold(0u64, |t, s| t.saturating_add(s.value))
    }
}

/// Which samples a query wants: those of type `sample_type` where every
/// `name = value` pair matches, and whose window ends in
/// `(start_ns, end_ns]`, so adjacent ranges never count a window twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub sample_type: String,
    pub matchers: Vec<(String, String)>,
    pub start_ns: i64,
    pub end_ns: i64,
}

impl Selector {
    /// Samples of type `cpu` in `(start_ns, end_ns]` matching `matchers`.
    pub fn cpu(matchers: Vec<(String, String)>, start_ns: i64, end_ns: i64) -> Self {
        Self {
            sample_type: CPU.to_string(),
            matchers,
            start_ns,
            end_ns,
        }
    }
}

/// Folded stacks with their summed values (in the unit of the type
/// queried): the answer to a query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub stacks: BTreeMap<String, u64>,
}

impl Profile {
    pub fn total(&self) -> u64 {
        self.stacks.values().fold(0u64, |t, c| t.saturating_add(*c))
    }

    pub fn add(&mut self, stack: &str, value: u64) {
        let entry = self.stacks.entry(stack.to_string()).or_default();
        *entry = entry.saturating_add(value);
    }

    /// A profile of (stack, value) pairs, values of equal stacks summed.
    pub fn of<'a>(stacks: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let mut p = Profile::default();
        for (stack, value) in stacks {
            p.add(stack, value);
        }
        p
    }

    /// `stack VALUE` lines, sorted.
    pub fn folded(&self) -> String {
        let mut out = String::new();
        for (stack, value) in &self.stacks {
            out.push_str(stack);
            out.push(' ');
            out.push_str(&value.to_string());
            out.push('\n');
        }
        out
    }
}

/// Outcome of storing a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Stored now; `samples` is the sum of its values (a number of
    /// samples for `cpu`, in the type's unit for others).
    New { samples: u64 },
    /// Had been stored before: nothing changed.
    Duplicate,
}
