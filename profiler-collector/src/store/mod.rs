//! Storage behind one trait, so the query and ingest code do not care which
//! database holds the data. The embedded default is [`sqlite::SqliteStore`];
//! [`clickhouse::ClickHouseStore`] lets several collectors share one
//! ClickHouse. [`conformance`] checks that both answer alike.
pub mod clickhouse;
pub mod conformance;
pub mod sqlite;

use std::sync::{Arc, Mutex};

use crate::model::{Profile, SampleType, Selector, Stored, ValidBatch};

/// The store as the writer, the queries and retention share it.
pub type SharedStore = Arc<Mutex<Box<dyn Store>>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{0}")]
    Schema(String),
    #[error("{0}")]
    ClickHouse(String),
    #[error("batch window ends before the retention cutoff")]
    TooOld,
    /// The batch's type is stored with another unit (one unit per type).
    #[error("sample type {sample_type:?} is stored in unit {stored:?}, not {got:?}")]
    UnitMismatch {
        sample_type: String,
        stored: String,
        got: String,
    },
    /// The write of a whole group failed (each batch of it gets this).
    #[error("store write failed: {0}")]
    Write(String),
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
    /// Stores a validated batch atomically, once per (agent, sequence).
    fn insert(&mut self, batch: &ValidBatch) -> Result<Stored, StoreError>;
    /// Stores several batches, one outcome each, in order. When it returns,
    /// every batch reported stored is durable; a failing batch must not
    /// fail the others, and the same (agent, sequence) twice in `batches`
    /// is stored once. A store that can commit a group at once (one
    /// transaction, one sync) overrides this loop: see
    /// [`crate::writer::StoreWriter`], which gathers the groups.
    fn insert_many(&mut self, batches: &[ValidBatch]) -> Vec<Result<Stored, StoreError>> {
        batches.iter().map(|b| self.insert(b)).collect()
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
    /// Folded stacks and summed values of the samples a selector picks (an
    /// unknown type picks none).
    fn profile(&self, selector: &Selector) -> Result<Profile, StoreError>;
    fn stats(&self) -> Result<StoreStats, StoreError>;
    /// Deletes data whose window ended before `cutoff_ns`; returns rows deleted.
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
