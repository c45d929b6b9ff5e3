//! Storage behind one trait, so the query and ingest code do not care which
//! database holds the data. The embedded default is [`sqlite::SqliteStore`];
//! [`clickhouse::ClickHouseStore`] lets several collectors share one
//! ClickHouse. What they share (time buckets, the retention cutoff) is in
//! [`common`]. The conformance suite (`conformance`, built for tests and
//! with the `conformance` feature) checks that both answer alike.
pub mod clickhouse;
pub mod common;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod sqlite;

use std::sync::{Arc, Mutex};

pub use common::Retention;

use crate::{
    clock::now_ns,
    model::{Profile, SampleType, Selector, Stored, ValidBatch},
};

/// The store as the writer, the queries and retention share it.
pub type SharedStore = Arc<Mutex<Box<dyn Store>>>;

/// Why a store could not do what it was asked. The backend's own errors
/// say what failed (opening, migrating, a query, the server's answer);
/// the other variants are the same for every backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sqlite(#[from] sqlite::SqliteError),
    #[error(transparent)]
    ClickHouse(#[from] clickhouse::ClickHouseError),
    /// The batch's window ended before the retention cutoff: not stored.
    #[error("window ended before the retention period: not stored")]
    TooOld,
    /// The batch's type is stored with another unit (one unit per type).
    #[error("sample type {sample_type:?} is stored in unit {stored:?}, not {got:?}")]
    UnitMismatch {
        sample_type: String,
        stored: String,
        got: String,
    },
    /// The write of a whole group failed: each batch of it gets this, with
    /// the one error that failed the group.
    #[error("store write failed: {0}")]
    GroupFailed(Arc<StoreError>),
    /// A store answered a group with fewer outcomes than batches.
    #[error("the store gave no outcome for a batch")]
    NoOutcome,
    /// The store's writer thread has stopped (the collector is shutting down).
    #[error("the store writer has stopped")]
    WriterStopped,
}

/// Size and content of a store, for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub batches: u64,
    pub sample_rows: u64,
    pub stacks: u64,
    pub bytes: u64,
}

/// `name=value` lines: one text per distinct label set.
pub(crate) fn canonical(labels: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in labels {
        out.push_str(name);
        out.push('=');
        // Escape so that distinct sets never share a text.
        out.push_str(&value.replace('\\', "\\\\").replace('\n', "\\n"));
        out.push('\n');
    }
    out
}

/// What every store does.
pub trait Store: Send {
    /// Writes batches whose windows end at or after the retention cutoff,
    /// one outcome each, in order. When it returns, every batch reported
    /// stored is durable; a failing batch must not fail the others, and
    /// the same (agent, sequence) twice in `batches` is stored once. A
    /// store commits the group at once where it can (one transaction, one
    /// sync): the writer thread gathers the groups.
    fn write_many(&mut self, batches: &[&ValidBatch]) -> Vec<Result<Stored, StoreError>>;
    /// The store's retention cutoff (see [`Retention`]); [`Store::retain`]
    /// moves it.
    fn retention(&self) -> &Retention;
    /// Stores several batches, one outcome each, in order: those whose
    /// window ended before the retention cutoff get
    /// [`StoreError::TooOld`], the rest are written by
    /// [`Store::write_many`].
    fn insert_many(&mut self, batches: &[ValidBatch]) -> Vec<Result<Stored, StoreError>> {
        let cutoff = self.retention().cutoff(now_ns());
        let recent: Vec<&ValidBatch> = batches
            .iter()
            .filter(|b| b.window_end_ns >= cutoff)
            .collect();
        let mut written = self.write_many(&recent).into_iter();
        batches
            .iter()
            .map(|b| {
                if b.window_end_ns < cutoff {
                    Err(StoreError::TooOld)
                } else {
                    written.next().unwrap_or(Err(StoreError::NoOutcome))
                }
            })
            .collect()
    }
    /// Stores a validated batch atomically, once per (agent, sequence): a
    /// group of one.
    fn insert(&mut self, batch: &ValidBatch) -> Result<Stored, StoreError> {
        self.insert_many(std::slice::from_ref(batch))
            .pop()
            .unwrap_or(Err(StoreError::NoOutcome))
    }
    /// Label names of samples whose window ends in `(start_ns, end_ns]`
    /// (every window belongs to exactly one of two adjacent ranges), of
    /// type `sample_type` (`None`: of every type).
    fn label_names(
        &self,
        sample_type: Option<&str>,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Values of label `name` in windows ending in `(start_ns, end_ns]`, of
    /// type `sample_type` (`None`: of every type).
    fn label_values(
        &self,
        name: &str,
        sample_type: Option<&str>,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// The sample types (with their units) of the windows ending in
    /// `(start_ns, end_ns]`, sorted by name.
    fn sample_types(&self, start_ns: i64, end_ns: i64) -> Result<Vec<SampleType>, StoreError>;
    /// The unit a sample type is stored with; `None` for a type never
    /// stored.
    fn unit(&self, sample_type: &str) -> Result<Option<String>, StoreError>;
    /// The distinct sampling frequencies of the `cpu` windows ending in
    /// `(start_ns, end_ns]`, sorted.
    fn cpu_frequencies(&self, start_ns: i64, end_ns: i64) -> Result<Vec<u32>, StoreError>;
    /// Folded stacks and summed values of the samples a selector picks (an
    /// unknown type picks none).
    fn profile(&self, selector: &Selector) -> Result<Profile, StoreError>;
    fn stats(&self) -> Result<StoreStats, StoreError>;
    /// Deletes data whose window ended before `cutoff_ns` and moves the
    /// retention cutoff there; returns rows deleted.
    fn retain(&mut self, cutoff_ns: i64) -> Result<u64, StoreError>;
    /// A second handle that answers queries beside this one, so a long
    /// query does not hold up writes (ClickHouse); `None` when queries
    /// must share this handle (SQLite: one connection).
    fn reader(&self) -> Option<Box<dyn Store>> {
        None
    }
    /// Least time between the starts of two group writes: while a write
    /// is this recent, batches keep joining the next group (ClickHouse
    /// makes a part per insert and wants few, large ones). Zero: write as
    /// soon as the last write is done.
    fn min_write_interval(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// Batches a collector takes in at once by default
    /// (`--max-concurrent-batches`): they are what a group write can hold.
    fn default_in_flight(&self) -> usize {
        8
    }
}
