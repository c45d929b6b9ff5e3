//! The collector's data model: validated batches, label selectors and
//! aggregated profiles.
use std::collections::BTreeMap;

/// Labels of a sample, sorted by name (names unique).
pub type Labels = Vec<(String, String)>;

/// One sample line of a batch after validation: indexes into the batch's
/// (resolved, de-duplicated) label sets and stacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSample {
    pub label_set: usize,
    pub stack: usize,
    pub count: u64,
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
    pub frequency_hz: u32,
    /// Label sets, each sorted by name.
    pub label_sets: Vec<Labels>,
    /// Folded stacks, root first, frames joined by `;`.
    pub stacks: Vec<String>,
    pub samples: Vec<BatchSample>,
}

impl ValidBatch {
    pub fn total(&self) -> u64 {
        self.samples
            .iter()
            .fold(0u64, |t, s| t.saturating_add(s.count))
    }
}

/// Which samples a query wants: every `name = value` pair must match, and the
/// sample's window must end in `(start_ns, end_ns]`, so adjacent ranges never
/// count a window twice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub matchers: Vec<(String, String)>,
    pub start_ns: i64,
    pub end_ns: i64,
}

/// Folded stacks with counts: the answer to a query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub stacks: BTreeMap<String, u64>,
}

impl Profile {
    pub fn total(&self) -> u64 {
        self.stacks.values().fold(0u64, |t, c| t.saturating_add(*c))
    }

    pub fn add(&mut self, stack: &str, count: u64) {
        let entry = self.stacks.entry(stack.to_string()).or_default();
        *entry = entry.saturating_add(count);
    }

    /// `stack COUNT` lines, sorted.
    pub fn folded(&self) -> String {
        let mut out = String::new();
        for (stack, count) in &self.stacks {
            out.push_str(stack);
            out.push(' ');
            out.push_str(&count.to_string());
            out.push('\n');
        }
        out
    }
}

/// Outcome of storing a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Stored now, with this many samples.
    New { samples: u64 },
    /// Had been stored before: nothing changed.
    Duplicate,
}
