//! The ClickHouse store: several stateless collectors in front of one
//! ClickHouse (docs/clickhouse.md).
//!
//! Tables (database from the URL, created or migrated on start-up):
//! * `samples`: one row per (batch, label set, stack) with its value
//!   (column `count`, in the unit of the row's `sample_type`), plus one
//!   *registry row* per batch (`label_set_id = 0`, count 0) naming the
//!   batch: agent, sequence, node, sample type and unit, and the random
//!   `write_id` shared by every row of that write. Rows written before
//!   sample types existed read as `cpu`/`samples` (the columns' defaults).
//!   Partitioned by day, ordered by
//!   `(hour, label_set_id, window_end, stack_id)`: a selector reads the
//!   ranges of its label sets in each hour, the registry rows of an hour are
//!   one range.
//! * `sample_types`: each type with its unit, the first registered unit of
//!   a type wins (a batch of that type with another unit is refused).
//! * `stacks`, `label_sets`: the text behind the ids, once per day partition
//!   (so retention drops them with their samples). Ids are SipHash-1-3 of
//!   the text under a key created once in ClickHouse, shared by every
//!   collector, and secret from agents, so no agent can aim at a collision.
//!
//! Exactly once: a batch's rows and its registry row go in one `INSERT`
//! block, in one partition (they share the batch's window), so ClickHouse
//! writes them all or nothing. A collector first looks the batch up and
//! answers `Duplicate` if it is there; two collectors racing on the same
//! batch may both write it, so every query counts, per (agent, sequence),
//! only the write with the smallest `write_id` (the others are excluded by a
//! sub-query over the registry rows of the range, empty unless there was a
//! race).
//!
//! Retention: every query starts at the retention cutoff; whole days before
//! it are dropped (`ALTER … DROP PARTITION`); on ClickHouse 19.6 and later
//! the tables also get a TTL.
mod client;

use std::{
    collections::{hash_map::Entry, HashMap, HashSet},
    hash::Hasher,
    sync::Arc,
    time::{Duration, Instant},
};

use client::{quote, random_u64, Client, External, RowBinary, Rows};
pub use client::{ClickHouseUrl, ClientError, PASSWORD_ENV};
use siphasher::sip::SipHasher13;

use super::{
    canonical,
    common::{bucket, touched_buckets, whole_buckets, DAY_NS, HOUR_NS},
    Retention, Store, StoreError, StoreStats,
};
use crate::model::{Labels, Profile, SampleType, Selector, Stored, ValidBatch};

/// Most rows per `INSERT` into `samples`: under ClickHouse's
/// `max_insert_block_size` (1,048,576, set on each insert), so each insert
/// is one block, written as one part per day partition it touches: all or
/// nothing for each batch, whose rows share one partition.
const MAX_INSERT_ROWS: usize = 500_000;
/// Writes give up after this: well before agents give up on a batch (30 s),
/// so a stalled ClickHouse is reported as unavailable, not as a timeout
/// that makes agents resend what may be stored.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many group writes per second per collector (three
/// `INSERT`s each, one part per day touched): under load, batches wait up
/// to this long and go in larger groups, so ClickHouse merges few parts.
const MIN_WRITE_INTERVAL: Duration = Duration::from_millis(200);
/// Batches taken in at once by default: up to this many join each group
/// write, so one collector writes up to IN_FLIGHT / MIN_WRITE_INTERVAL
/// (320) batches a second.
const IN_FLIGHT: usize = 64;
/// Queries give up after this.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Most (day, id) pairs remembered as written, per kind.
const WRITTEN_CAP: usize = 1 << 18;

/// One step of a schema migration; every step is idempotent (several
/// collectors may run them at once).
enum Step {
    /// A statement: `{db}` is the database, `{ttl_samples}` / `{ttl_days}`
    /// the TTL clauses (empty where the server has no TTL).
    Sql(&'static str),
    /// `ALTER TABLE {db}.table ADD COLUMN column definition` where the
    /// column is missing (ClickHouse 18.16 has no `ADD COLUMN IF NOT
    /// EXISTS`).
    AddColumn {
        table: &'static str,
        column: &'static str,
        definition: &'static str,
    },
}

/// Schema migrations; entry N brings the schema from version N to N + 1.
const MIGRATIONS: &[&[Step]] = &[
    &[
        Step::Sql(
            "CREATE TABLE IF NOT EXISTS {db}.samples (
        hour Int64,
        label_set_id UInt64,
        window_end Int64,
        stack_id UInt64,
        count UInt64,
        write_id UInt64,
        window_start Int64,
        agent_id String,
        sequence UInt64,
        node String,
        agent_version String,
        frequency_hz UInt32
    ) ENGINE = MergeTree
    PARTITION BY intDiv(hour, 24)
    ORDER BY (hour, label_set_id, window_end, stack_id)
    {ttl_samples}",
        ),
        Step::Sql(
            "CREATE TABLE IF NOT EXISTS {db}.stacks (
        day Int64,
        stack_id UInt64,
        folded String
    ) ENGINE = ReplacingMergeTree
    PARTITION BY day
    ORDER BY stack_id
    {ttl_days}",
        ),
        Step::Sql(
            "CREATE TABLE IF NOT EXISTS {db}.label_sets (
        day Int64,
        label_set_id UInt64,
        names Array(String),
        values Array(String)
    ) ENGINE = ReplacingMergeTree
    PARTITION BY day
    ORDER BY label_set_id
    {ttl_days}",
        ),
    ],
    // Sample types: rows stored before are cpu/samples.
    &[
        Step::AddColumn {
            table: "samples",
            column: "sample_type",
            definition: "String DEFAULT 'cpu'",
        },
        Step::AddColumn {
            table: "samples",
            column: "unit",
            definition: "String DEFAULT 'samples'",
        },
        Step::Sql(
            "CREATE TABLE IF NOT EXISTS {db}.sample_types (
        sample_type String,
        unit String,
        registered_ns Int64
    ) ENGINE = MergeTree
    ORDER BY (sample_type, registered_ns)",
        ),
        // Registered at time 0: before any other unit of `cpu`.
        Step::Sql("INSERT INTO {db}.sample_types VALUES ('cpu', 'samples', 0)"),
    ],
];

/// The tables retention drops days of.
const DAY_TABLES: [&str; 3] = ["samples", "stacks", "label_sets"];

/// A ClickHouse server version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32);

impl Version {
    /// Table TTL (`TTL expr`) came with 19.6.
    pub fn has_ttl(self) -> bool {
        self >= Version(19, 6)
    }
}

/// The hour bucket of a window: windows ending in `(k h, (k + 1) h]` are in
/// hour `k`, as in the SQLite store's rollups.
fn hour_of(window_end_ns: i64) -> i64 {
    bucket(window_end_ns, HOUR_NS)
}

/// Ids of text already written in a day partition (so it is not sent
/// again). Bounded: emptied when full, which costs only re-sending.
struct Written {
    ids: HashSet<(i64, u64)>,
}

impl Written {
    fn new() -> Self {
        Self {
            ids: HashSet::new(),
        }
    }
    fn contains(&self, day: i64, id: u64) -> bool {
        self.ids.contains(&(day, id))
    }
    fn extend(&mut self, new: impl IntoIterator<Item = (i64, u64)>) {
        for key in new {
            if self.ids.len() >= WRITTEN_CAP {
                self.ids.clear();
            }
            self.ids.insert(key);
        }
    }
}

pub struct ClickHouseStore {
    /// Queries give up after QUERY_TIMEOUT; the requests of a group write
    /// share one WRITE_TIMEOUT deadline.
    client: Client,
    db: String,
    version: Version,
    key: (u64, u64),
    stacks_written: Written,
    sets_written: Written,
    /// The unit of each sample type registered in `sample_types`.
    units: HashMap<String, String>,
    /// Windows ending before its `retained_from` were removed by retention:
    /// refused, and queries start there. Shared with the store's readers.
    retention: Retention,
    /// Settings of every `INSERT` into `samples`.
    insert_settings: Vec<(&'static str, String)>,
}

/// What a group's insert sends, built before anything is sent.
#[derive(Default)]
struct GroupRows {
    stacks: RowBinary,
    stack_keys: Vec<(i64, u64)>,
    sets: RowBinary,
    set_keys: Vec<(i64, u64)>,
    /// Sample rows (with registry rows), and where each batch's rows end.
    samples: RowBinary,
    chunks: Vec<(usize, Vec<usize>)>,
}

impl ClickHouseStore {
    /// Connects, creates the database and tables or migrates them, and sets
    /// the TTL to `retention` where the server supports it.
    pub fn open(url: &ClickHouseUrl, retention: Duration) -> Result<Self, StoreError> {
        let client = Client::new(url, QUERY_TIMEOUT);
        let version = server_version(&client)?;
        let db = url.database.clone();
        client.execute(&format!("CREATE DATABASE IF NOT EXISTS {db}"), &[], &[])?;
        let mut store = Self {
            key: (0, 0),
            client,
            db,
            version,
            stacks_written: Written::new(),
            sets_written: Written::new(),
            units: HashMap::new(),
            retention: Retention::default(),
            insert_settings: Vec::new(),
        };
        store.migrate(retention)?;
        store.insert_settings = store.insert_settings()?;
        store.key = store.hash_key()?;
        if version.has_ttl() {
            store.set_ttl(retention)?;
        } else {
            tracing::info!(
                server = %format!("{}.{}", version.0, version.1),
                "ClickHouse before 19.6 has no table TTL: retention drops whole days of old partitions"
            );
        }
        Ok(store)
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Settings that keep each `INSERT` into `samples` one block (all or
    /// nothing: a batch's registry row never lands without its samples),
    /// whatever the user's profile says: the default block size, and no
    /// asynchronous inserts (acknowledged before written) where the server
    /// has them (21.11 and later).
    fn insert_settings(&self) -> Result<Vec<(&'static str, String)>, StoreError> {
        let mut settings = vec![("max_insert_block_size", "1048576".to_string())];
        let out =
            self.query_text("SELECT name FROM system.settings WHERE name IN ('async_insert')")?;
        if out.lines().any(|l| l.trim() == "async_insert") {
            settings.push(("async_insert", "0".to_string()));
        }
        Ok(settings)
    }

    fn retained_from(&self) -> i64 {
        self.retention.retained_from()
    }

    fn sql(&self, template: &str, retention: Duration) -> String {
        let (ttl_samples, ttl_days) = if self.version.has_ttl() {
            let [samples, days] = ttl_exprs(retention);
            (format!("TTL {samples}"), format!("TTL {days}"))
        } else {
            (String::new(), String::new())
        };
        template
            .replace("{db}", &self.db)
            .replace("{ttl_samples}", &ttl_samples)
            .replace("{ttl_days}", &ttl_days)
    }

    /// The schema version recorded in the database (0: none yet).
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        let out = self.query_text(&format!(
            "SELECT max(version) FROM {}.schema_version",
            self.db
        ))?;
        out.trim()
            .parse()
            .map_err(|_| ClickHouseError::BadSchemaVersion(out.clone()).into())
    }

    fn migrate(&mut self, retention: Duration) -> Result<(), StoreError> {
        self.client.execute(
            &format!(
                "CREATE TABLE IF NOT EXISTS {}.schema_version (version UInt32, applied_ns Int64)
                 ENGINE = MergeTree ORDER BY version",
                self.db
            ),
            &[],
            &[],
        )?;
        let version = self.schema_version()? as usize;
        if version > MIGRATIONS.len() {
            return Err(ClickHouseError::NewerSchema {
                found: version,
                known: MIGRATIONS.len(),
            }
            .into());
        }
        for (i, steps) in MIGRATIONS.iter().enumerate().skip(version) {
            self.migrate_to(i + 1, steps, retention).map_err(|source| {
                ClickHouseError::Migrate {
                    version: i + 1,
                    source: Box::new(source),
                }
            })?;
            tracing::info!(version = i + 1, "migrated the ClickHouse schema");
        }
        Ok(())
    }

    /// Runs the steps of one migration and records its version.
    fn migrate_to(
        &self,
        version: usize,
        steps: &[Step],
        retention: Duration,
    ) -> Result<(), StoreError> {
        for step in steps {
            match step {
                Step::Sql(template) => {
                    self.client
                        .execute(&self.sql(template, retention), &[], &[])?;
                }
                Step::AddColumn {
                    table,
                    column,
                    definition,
                } => self.add_column(table, column, definition)?,
            }
        }
        self.client.execute(
            &format!(
                "INSERT INTO {}.schema_version VALUES ({version}, {})",
                self.db,
                crate::clock::now_ns()
            ),
            &[],
            &[],
        )?;
        Ok(())
    }

    fn add_column(&self, table: &str, column: &str, definition: &str) -> Result<(), StoreError> {
        let exists = |store: &Self| -> Result<bool, StoreError> {
            Ok(store
                .query_text(&format!(
                    "SELECT count() FROM system.columns
                     WHERE database = {} AND table = {} AND name = {}",
                    quote(&store.db),
                    quote(table),
                    quote(column)
                ))?
                .trim()
                != "0")
        };
        if exists(self)? {
            return Ok(());
        }
        let added = self.client.execute(
            &format!(
                "ALTER TABLE {}.{table} ADD COLUMN {column} {definition}",
                self.db
            ),
            &[],
            &[],
        );
        match added {
            Ok(_) => Ok(()),
            // Another collector added it at the same moment.
            Err(_) if exists(self)? => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks each batch's unit against the unit its type is registered
    /// with, registering the types not seen before (a group's first batch
    /// of a new type decides its unit; between collectors, the earliest
    /// registration).
    fn check_units(
        &mut self,
        batches: &[&ValidBatch],
        deadline: Instant,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let mut new: Vec<&SampleType> = Vec::new();
        for b in batches {
            let t = &b.sample_type;
            if !self.units.contains_key(&t.name) && !new.iter().any(|n| n.name == t.name) {
                new.push(t);
            }
        }
        if !new.is_empty() {
            self.read_units(deadline)?;
            let unregistered: Vec<String> = new
                .iter()
                .filter(|t| !self.units.contains_key(&t.name))
                .map(|t| {
                    format!(
                        "({}, {}, {})",
                        quote(&t.name),
                        quote(&t.unit),
                        crate::clock::now_ns()
                    )
                })
                .collect();
            if !unregistered.is_empty() {
                self.client.execute_by(
                    &format!(
                        "INSERT INTO {}.sample_types VALUES {}",
                        self.db,
                        unregistered.join(", ")
                    ),
                    &[],
                    &[],
                    Some(deadline),
                )?;
                self.read_units(deadline)?;
            }
        }
        Ok(batches
            .iter()
            .map(|b| {
                let t = &b.sample_type;
                match self.units.get(&t.name) {
                    Some(unit) if *unit == t.unit => Ok(()),
                    Some(unit) => Err(StoreError::UnitMismatch {
                        sample_type: t.name.clone(),
                        stored: unit.clone(),
                        got: t.unit.clone(),
                    }),
                    None => Err(ClickHouseError::UnregisteredType(t.name.clone()).into()),
                }
            })
            .collect())
    }

    /// Reads the registered units: the first registration of each type.
    fn read_units(&mut self, deadline: Instant) -> Result<(), StoreError> {
        let out = self.client.execute_by(
            &format!(
                "SELECT sample_type, unit FROM {}.sample_types
                 ORDER BY sample_type, registered_ns, unit FORMAT RowBinary",
                self.db
            ),
            &[],
            &[],
            Some(deadline),
        )?;
        let mut rows = Rows::new(&out);
        while !rows.is_empty() {
            let (name, unit) = (rows.string()?, rows.string()?);
            self.units.entry(name).or_insert(unit);
        }
        Ok(())
    }

    /// The SipHash key of ids, created once: the first collector's
    /// `CREATE TABLE` defines it as the columns' defaults (atomic in
    /// ClickHouse), every other collector reads it back.
    fn hash_key(&self) -> Result<(u64, u64), StoreError> {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {}.hash_key (k0 UInt64 DEFAULT {}, k1 UInt64 DEFAULT {})
             ENGINE = Null",
            self.db,
            random_u64(),
            random_u64()
        );
        if let Err(e) = self.client.execute(&create, &[], &[]) {
            // Another collector may have created it at the same moment.
            tracing::debug!("creating the hash key table: {e}");
        }
        let out = self.query_text(&format!(
            "SELECT default_expression FROM system.columns
             WHERE database = {} AND table = 'hash_key' ORDER BY name",
            quote(&self.db)
        ))?;
        let keys: Vec<u64> = out
            .lines()
            .filter_map(|line| {
                let digits: String = line
                    .chars()
                    .skip_while(|c| !c.is_ascii_digit())
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                digits.parse().ok()
            })
            .collect();
        match keys[..] {
            [k0, k1] => Ok((k0, k1)),
            _ => Err(ClickHouseError::DamagedHashKey {
                database: self.db.clone(),
                found: out,
            }
            .into()),
        }
    }

    /// Sets the tables' TTL to `retention` (every collector does, with the
    /// same retention: docs/clickhouse.md).
    fn set_ttl(&self, retention: Duration) -> Result<(), StoreError> {
        let [samples, days] = ttl_exprs(retention);
        for (table, expr) in [
            ("samples", &samples),
            ("stacks", &days),
            ("label_sets", &days),
        ] {
            self.client.execute(
                &format!("ALTER TABLE {}.{table} MODIFY TTL {expr}", self.db),
                &[],
                &[],
            )?;
        }
        Ok(())
    }

    fn query_text(&self, sql: &str) -> Result<String, StoreError> {
        let out = self.client.execute(sql, &[], &[])?;
        String::from_utf8(out)
            .map_err(|_| StoreError::from(ClientError::Decode("an answer is not UTF-8".into())))
    }

    fn query_rows(&self, sql: &str) -> Result<Vec<u8>, StoreError> {
        Ok(self
            .client
            .execute(&format!("{sql} FORMAT RowBinary"), &[], &[])?)
    }

    fn id(&self, text: &[u8]) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.key.0, self.key.1);
        h.write(text);
        // 0 marks registry rows.
        h.finish().max(1)
    }

    fn stack_id(&self, folded: &str) -> u64 {
        self.id(folded.as_bytes())
    }

    fn set_id(&self, labels: &Labels) -> u64 {
        self.id(canonical(labels).as_bytes())
    }

    /// Which of `batches` (agent, sequence) are stored already.
    fn stored_already(
        &self,
        batches: &[&ValidBatch],
        deadline: Instant,
    ) -> Result<HashSet<(String, u64)>, StoreError> {
        let mut found = HashSet::new();
        if batches.is_empty() {
            return Ok(found);
        }
        let hours: HashSet<i64> = batches.iter().map(|b| hour_of(b.window_end_ns)).collect();
        let hours: Vec<String> = hours.iter().map(i64::to_string).collect();
        let ids: Vec<String> = batches
            .iter()
            .map(|b| format!("({}, {})", quote(&b.agent_id), b.sequence))
            .collect();
        let sql = format!(
            "SELECT agent_id, sequence FROM {}.samples
             WHERE hour IN ({}) AND label_set_id = 0 AND (agent_id, sequence) IN ({})
             FORMAT RowBinary",
            self.db,
            hours.join(", "),
            ids.join(", ")
        );
        let out = self.client.execute_by(
            &sql,
            &[],
            &[("max_query_size", (sql.len() + 1024).to_string())],
            Some(deadline),
        )?;
        let mut rows = Rows::new(&out);
        while !rows.is_empty() {
            let agent = rows.string()?;
            let sequence = rows.u64()?;
            found.insert((agent, sequence));
        }
        Ok(found)
    }

    /// Encodes the rows of the batches to store.
    fn encode(&self, batches: &[&ValidBatch]) -> GroupRows {
        let mut g = GroupRows::default();
        let mut seen_stacks = HashSet::new();
        let mut seen_sets = HashSet::new();
        let (mut rows_in_chunk, mut chunk_batches) = (0usize, Vec::new());
        for (i, batch) in batches.iter().enumerate() {
            let hour = hour_of(batch.window_end_ns);
            let day = bucket(batch.window_end_ns, DAY_NS);
            let set_ids: Vec<u64> = batch.label_sets.iter().map(|l| self.set_id(l)).collect();
            let stack_ids: Vec<u64> = batch.stacks.iter().map(|s| self.stack_id(s)).collect();
            for (labels, &id) in batch.label_sets.iter().zip(&set_ids) {
                if !self.sets_written.contains(day, id) && seen_sets.insert((day, id)) {
                    g.sets.i64(day);
                    g.sets.u64(id);
                    g.sets.len(labels.len());
                    for (name, _) in labels {
                        g.sets.str(name);
                    }
                    g.sets.len(labels.len());
                    for (_, value) in labels {
                        g.sets.str(value);
                    }
                    g.set_keys.push((day, id));
                }
            }
            for (folded, &id) in batch.stacks.iter().zip(&stack_ids) {
                if !self.stacks_written.contains(day, id) && seen_stacks.insert((day, id)) {
                    g.stacks.i64(day);
                    g.stacks.u64(id);
                    g.stacks.str(folded);
                    g.stack_keys.push((day, id));
                }
            }
            let write_id = random_u64();
            let rows = batch.samples.len() + 1;
            if rows_in_chunk > 0 && rows_in_chunk + rows > MAX_INSERT_ROWS {
                g.chunks
                    .push((g.samples.buf.len(), std::mem::take(&mut chunk_batches)));
                rows_in_chunk = 0;
            }
            let s = &mut g.samples;
            let mut row = |set: u64, stack: u64, value: u64, registry: bool| {
                s.i64(hour);
                s.u64(set);
                s.i64(batch.window_end_ns);
                s.u64(stack);
                s.u64(value);
                s.u64(write_id);
                s.i64(batch.window_start_ns);
                s.str(if registry { &batch.agent_id } else { "" });
                s.u64(if registry { batch.sequence } else { 0 });
                s.str(if registry { &batch.node } else { "" });
                s.str(if registry { &batch.agent_version } else { "" });
                s.u32(batch.frequency_hz);
                s.str(&batch.sample_type.name);
                s.str(&batch.sample_type.unit);
            };
            row(0, 0, 0, true);
            for sample in &batch.samples {
                row(
                    set_ids[sample.label_set],
                    stack_ids[sample.stack],
                    sample.value,
                    false,
                );
            }
            rows_in_chunk += rows;
            chunk_batches.push(i);
        }
        if !chunk_batches.is_empty() {
            g.chunks.push((g.samples.buf.len(), chunk_batches));
        }
        g
    }

    /// Sends a group's rows: texts first (so every sample visible has its
    /// stack and labels), then the samples, one block per insert.
    fn send(
        &mut self,
        g: &GroupRows,
        outcomes: &mut [Option<Result<Stored, StoreError>>],
        batches: &[&ValidBatch],
        deadline: Instant,
    ) -> Result<(), StoreError> {
        if !g.set_keys.is_empty() {
            self.client.execute_by(
                &format!("INSERT INTO {}.label_sets FORMAT RowBinary", self.db),
                &g.sets.buf,
                &[],
                Some(deadline),
            )?;
            self.sets_written.extend(g.set_keys.iter().copied());
        }
        if !g.stack_keys.is_empty() {
            self.client.execute_by(
                &format!("INSERT INTO {}.stacks FORMAT RowBinary", self.db),
                &g.stacks.buf,
                &[],
                Some(deadline),
            )?;
            self.stacks_written.extend(g.stack_keys.iter().copied());
        }
        let mut from = 0;
        for (end, members) in &g.chunks {
            self.client.execute_by(
                &format!("INSERT INTO {}.samples FORMAT RowBinary", self.db),
                &g.samples.buf[from..*end],
                &self.insert_settings,
                Some(deadline),
            )?;
            from = *end;
            for &i in members {
                outcomes[i] = Some(Ok(Stored::New {
                    samples: batches[i].total(),
                }));
            }
        }
        Ok(())
    }

    /// Writes a batch without first looking it up: what two collectors
    /// racing on the same batch do (for tests of the query-side guard).
    #[doc(hidden)]
    pub fn insert_unchecked(&mut self, batch: &ValidBatch) -> Result<(), StoreError> {
        let g = self.encode(&[batch]);
        let mut outcome = [None];
        self.send(&g, &mut outcome, &[batch], Instant::now() + WRITE_TIMEOUT)
    }

    /// `hour` and `window_end` conditions for windows ending in
    /// `(start, end]`, after the retention cutoff; `None` when empty.
    fn range(&self, start: i64, end: i64) -> Option<String> {
        let start = self.clamp(start);
        (start < end).then(|| {
            let (first, last) = touched_buckets(start, end, HOUR_NS);
            format!(
                "hour >= {first} AND hour <= {last} AND window_end > {start} AND window_end <= {end}"
            )
        })
    }

    /// The start of a range, moved up to the retention cutoff.
    fn clamp(&self, start: i64) -> i64 {
        start.max(self.retained_from().saturating_sub(1))
    }

    /// Days partitions of `stacks`/`label_sets` for windows ending in
    /// `(start, end]`.
    fn days(start: i64, end: i64) -> String {
        let (first, last) = touched_buckets(start, end, DAY_NS);
        format!("day >= {first} AND day <= {last}")
    }

    /// Ids of label sets with samples in the range, of one type or of all.
    fn sets_in(&self, range: &str, sample_type: Option<&str>) -> String {
        let of_type = sample_type
            .map(|t| format!(" AND sample_type = {}", quote(t)))
            .unwrap_or_default();
        format!(
            "SELECT label_set_id FROM {}.samples WHERE {range} AND label_set_id != 0{of_type}",
            self.db
        )
    }
}

/// The TTL expressions of `samples` and of the text tables for
/// `retention`, capped at 50 years (`DateTime` wraps around in 2106).
fn ttl_exprs(retention: Duration) -> [String; 2] {
    let secs = retention.as_secs().min(50 * 365 * 86_400);
    [
        format!("toDateTime(intDiv(window_end, 1000000000)) + toIntervalSecond({secs})"),
        // A day's texts are needed until its last window expires.
        format!("toDateTime((day + 1) * 86400) + toIntervalSecond({secs})"),
    ]
}

/// The statements of a flame graph query (see [`ClickHouseStore::profile_sql`]).
#[doc(hidden)]
pub struct ProfileSql {
    /// Registry rows of the range: (writes, distinct batches).
    pub registry: String,
    /// Sums per stack of the selector's type (registry rows come out as
    /// stack 0, value 0).
    pub sum: String,
    /// The same, leaving out every write of a batch but its first.
    pub sum_guarded: String,
}

impl ClickHouseStore {
    /// The statements `profile` sends for `selector` (`None`: an empty
    /// range); public for the benchmark's breakdown of a query's time.
    #[doc(hidden)]
    pub fn profile_sql(&self, selector: &Selector) -> Option<ProfileSql> {
        let (start, end) = (selector.start_ns, selector.end_ns);
        let range = self.range(start, end)?;
        let db = &self.db;
        let days = Self::days(start, end);
        let mut sets = String::new();
        if !selector.matchers.is_empty() {
            let conditions: Vec<String> = selector
                .matchers
                .iter()
                .map(|(name, value)| {
                    let (name, value) = (quote(name), quote(value));
                    format!("has(names, {name}) AND values[indexOf(names, {name})] = {value}")
                })
                .collect();
            sets = format!(
                "AND label_set_id IN (SELECT label_set_id FROM {db}.label_sets WHERE {days} AND {})",
                conditions.join(" AND ")
            );
        }
        // Applied once, outside the parts (a sub-query in each part would
        // run once per part).
        let guard = format!(
            "WHERE write_id NOT IN (
                 SELECT arrayJoin(arraySlice(arraySort(groupArray(write_id)), 2))
                 FROM {db}.samples WHERE {range} AND label_set_id = 0
                 GROUP BY agent_id, sequence HAVING count() > 1)"
        );
        // Whole hours are selected by `hour` alone; only the ragged ends
        // read `window_end`.
        let start = self.clamp(start);
        let mut ranges = Vec::new();
        if let Some((lo, hi)) = whole_buckets(start, end, HOUR_NS) {
            ranges.push(format!("hour >= {lo} AND hour < {hi}"));
            for (s, e) in [(start, lo * HOUR_NS), (hi * HOUR_NS, end)] {
                ranges.extend(self.range(s, e));
            }
        } else {
            ranges.push(range.clone());
        }
        let of_type = format!("sample_type = {}", quote(&selector.sample_type));
        let sum = |guard: &str| {
            let parts: Vec<String> = ranges
                .iter()
                .map(|r| {
                    format!(
                        "SELECT stack_id, count, write_id FROM {db}.samples
                         WHERE {r} AND {of_type} {sets}"
                    )
                })
                .collect();
            format!(
                "SELECT stack_id, sum(count) FROM ({}) {guard} GROUP BY stack_id",
                parts.join(" UNION ALL ")
            )
        };
        Some(ProfileSql {
            registry: format!(
                "SELECT toUInt64(count()), toUInt64(uniqExact(agent_id, sequence)) FROM {db}.samples
                 WHERE {range} AND label_set_id = 0"
            ),
            sum: sum(""),
            sum_guarded: sum(&guard),
        })
    }
}

fn server_version(client: &Client) -> Result<Version, StoreError> {
    let out = client.execute("SELECT version()", &[], &[])?;
    let text = String::from_utf8_lossy(&out).trim().to_string();
    let mut parts = text.split('.').map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Ok(Version(major, minor)),
        _ => Err(ClickHouseError::BadServerVersion(text).into()),
    }
}

/// What failed in the ClickHouse store.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    /// The server was not reached, did not answer in time, answered an
    /// error status (with its message), or sent what does not decode.
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("ClickHouse schema version {found} is newer than this collector supports ({known})")]
    NewerSchema { found: usize, known: usize },
    #[error("migrating the ClickHouse schema to version {version}: {source}")]
    Migrate {
        version: usize,
        source: Box<StoreError>,
    },
    #[error("bad schema version {0:?}")]
    BadSchemaVersion(String),
    #[error("cannot read the ClickHouse version from {0:?}")]
    BadServerVersion(String),
    #[error("the hash key table of {database} is damaged: {found:?}")]
    DamagedHashKey { database: String, found: String },
    #[error("sample type {0:?} was not registered")]
    UnregisteredType(String),
    /// A group write ended without an outcome for one of its batches.
    #[error("the group write gave no outcome for a batch")]
    NoOutcome,
}

impl From<ClientError> for StoreError {
    fn from(e: ClientError) -> Self {
        StoreError::ClickHouse(ClickHouseError::Client(e))
    }
}

impl Store for ClickHouseStore {
    fn retention(&self) -> &Retention {
        &self.retention
    }

    fn write_many(&mut self, batches: &[&ValidBatch]) -> Vec<Result<Stored, StoreError>> {
        // One deadline for the group's requests together.
        let deadline = Instant::now() + WRITE_TIMEOUT;
        let mut outcomes: Vec<Option<Result<Stored, StoreError>>> =
            (0..batches.len()).map(|_| None).collect();
        // Each (agent, sequence) once: a later copy in the group shares the
        // fate of the first (stored: a duplicate; failed: failed).
        let mut first = HashMap::new();
        let mut copy_of = vec![None; batches.len()];
        let mut candidates: Vec<usize> = Vec::new();
        for (i, batch) in batches.iter().enumerate() {
            match first.entry((batch.agent_id.as_str(), batch.sequence)) {
                Entry::Occupied(e) => copy_of[i] = Some(*e.get()),
                Entry::Vacant(e) => {
                    e.insert(i);
                    candidates.push(i);
                }
            }
        }
        let refs: Vec<&ValidBatch> = candidates.iter().map(|&i| batches[i]).collect();
        let result = self
            .check_units(&refs, deadline)
            .and_then(|checks| {
                let mut kept = Vec::with_capacity(candidates.len());
                for (&i, check) in candidates.iter().zip(checks) {
                    match check {
                        Ok(()) => kept.push(i),
                        Err(e) => outcomes[i] = Some(Err(e)),
                    }
                }
                candidates = kept;
                let refs: Vec<&ValidBatch> = candidates.iter().map(|&i| batches[i]).collect();
                self.stored_already(&refs, deadline)
            })
            .and_then(|stored| {
                let mut new = Vec::new();
                for &i in &candidates {
                    let b = &batches[i];
                    if stored.contains(&(b.agent_id.clone(), b.sequence)) {
                        outcomes[i] = Some(Ok(Stored::Duplicate));
                    } else {
                        new.push(i);
                    }
                }
                let refs: Vec<&ValidBatch> = new.iter().map(|&i| batches[i]).collect();
                let g = self.encode(&refs);
                let mut new_outcomes: Vec<_> = new.iter().map(|_| None).collect();
                let sent = self.send(&g, &mut new_outcomes, &refs, deadline);
                for (&i, outcome) in new.iter().zip(new_outcomes) {
                    outcomes[i] = outcome;
                }
                sent
            });
        let failed = Arc::new(match result {
            Ok(()) => ClickHouseError::NoOutcome.into(),
            Err(e) => e,
        });
        let group_failed = || Err(StoreError::GroupFailed(failed.clone()));
        let mut final_outcomes: Vec<Result<Stored, StoreError>> = Vec::with_capacity(batches.len());
        for i in 0..batches.len() {
            let outcome = match copy_of[i] {
                Some(f) => match &final_outcomes[f] {
                    Ok(_) => Ok(Stored::Duplicate),
                    Err(StoreError::UnitMismatch {
                        sample_type,
                        stored,
                        got,
                    }) => Err(StoreError::UnitMismatch {
                        sample_type: sample_type.clone(),
                        stored: stored.clone(),
                        got: got.clone(),
                    }),
                    Err(_) => group_failed(),
                },
                None => outcomes[i].take().unwrap_or_else(group_failed),
            };
            final_outcomes.push(outcome);
        }
        final_outcomes
    }

    fn min_write_interval(&self) -> Duration {
        MIN_WRITE_INTERVAL
    }

    fn default_in_flight(&self) -> usize {
        IN_FLIGHT
    }

    fn reader(&self) -> Option<Box<dyn Store>> {
        let url = &self.client.url;
        Some(Box::new(Self {
            client: Client::new(url, QUERY_TIMEOUT),
            db: self.db.clone(),
            version: self.version,
            key: self.key,
            stacks_written: Written::new(),
            sets_written: Written::new(),
            units: HashMap::new(),
            retention: self.retention.clone(),
            insert_settings: self.insert_settings.clone(),
        }))
    }

    fn label_names(
        &self,
        sample_type: Option<&str>,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<String>, StoreError> {
        let Some(range) = self.range(start_ns, end_ns) else {
            return Ok(Vec::new());
        };
        let out = self.query_rows(&format!(
            "SELECT DISTINCT arrayJoin(names) AS n FROM {}.label_sets
             WHERE {} AND label_set_id IN ({}) ORDER BY n",
            self.db,
            Self::days(start_ns, end_ns),
            self.sets_in(&range, sample_type)
        ))?;
        read_strings(&out)
    }

    fn label_values(
        &self,
        name: &str,
        sample_type: Option<&str>,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<String>, StoreError> {
        let Some(range) = self.range(start_ns, end_ns) else {
            return Ok(Vec::new());
        };
        let name = quote(name);
        let out = self.query_rows(&format!(
            "SELECT DISTINCT values[indexOf(names, {name})] AS v FROM {}.label_sets
             WHERE {} AND has(names, {name}) AND label_set_id IN ({}) ORDER BY v",
            self.db,
            Self::days(start_ns, end_ns),
            self.sets_in(&range, sample_type)
        ))?;
        read_strings(&out)
    }

    fn unit(&self, sample_type: &str) -> Result<Option<String>, StoreError> {
        let out = self.query_rows(&format!(
            "SELECT unit FROM {}.sample_types WHERE sample_type = {}
             ORDER BY registered_ns, unit LIMIT 1",
            self.db,
            quote(sample_type)
        ))?;
        Ok(read_strings(&out)?.pop())
    }

    fn sample_types(&self, start_ns: i64, end_ns: i64) -> Result<Vec<SampleType>, StoreError> {
        let Some(range) = self.range(start_ns, end_ns) else {
            return Ok(Vec::new());
        };
        // The registry rows: one per batch, one primary-key range per hour.
        let out = self.query_rows(&format!(
            "SELECT sample_type, any(unit) FROM {}.samples
             WHERE {range} AND label_set_id = 0 GROUP BY sample_type ORDER BY sample_type",
            self.db
        ))?;
        let mut rows = Rows::new(&out);
        let mut types = Vec::new();
        while !rows.is_empty() {
            types.push(SampleType {
                name: rows.string()?,
                unit: rows.string()?,
            });
        }
        Ok(types)
    }

    fn cpu_frequencies(&self, start_ns: i64, end_ns: i64) -> Result<Vec<u32>, StoreError> {
        let Some(range) = self.range(start_ns, end_ns) else {
            return Ok(Vec::new());
        };
        // The registry rows, one per batch; only `cpu` batches have a
        // frequency.
        let out = self.query_rows(&format!(
            "SELECT DISTINCT toUInt64(frequency_hz) AS f FROM {}.samples
             WHERE {range} AND label_set_id = 0 AND frequency_hz > 0 ORDER BY f",
            self.db
        ))?;
        let mut rows = Rows::new(&out);
        let mut frequencies = Vec::new();
        while !rows.is_empty() {
            frequencies.push(rows.u64()?.min(u64::from(u32::MAX)) as u32);
        }
        Ok(frequencies)
    }

    fn profile(&self, selector: &Selector) -> Result<Profile, StoreError> {
        let Some(sql) = self.profile_sql(selector) else {
            return Ok(Profile::default());
        };
        let db = &self.db;
        let days = Self::days(selector.start_ns, selector.end_ns);
        // Each batch counts once: where a batch was written more than once
        // (two collectors raced), writes other than the first (smallest
        // write_id) of an (agent, sequence) are left out. Looking for such
        // writes first (the registry rows of the range, ~0.1 s for 24 h of
        // 100 agents) spares every query without them reading `write_id`.
        let registry = self.query_rows(&sql.registry)?;
        let mut rows = Rows::new(&registry);
        let (writes, batches) = (rows.u64()?, rows.u64()?);
        let totals = self.query_rows(if writes > batches {
            &sql.sum_guarded
        } else {
            &sql.sum
        })?;
        let mut counts = HashMap::new();
        let mut ids = Vec::new();
        let mut rows = Rows::new(&totals);
        while !rows.is_empty() {
            let (id, n) = (rows.u64()?, rows.u64()?);
            if id != 0 {
                counts.insert(id, n);
                ids.extend_from_slice(format!("{id}\n").as_bytes());
            }
        }
        let mut profile = Profile::default();
        if counts.is_empty() {
            return Ok(profile);
        }
        // The texts of those stacks, by id (sent as a table with the query).
        let texts = self.client.execute_with(
            &format!(
                "SELECT stack_id, any(folded) FROM {db}.stacks
                 WHERE {days} AND stack_id IN ids GROUP BY stack_id FORMAT RowBinary"
            ),
            &External {
                name: "ids",
                structure: "id UInt64",
                tsv: &ids,
            },
            &[],
        )?;
        let mut rows = Rows::new(&texts);
        while !rows.is_empty() {
            let id = rows.u64()?;
            let folded = rows.string()?;
            if let Some(n) = counts.remove(&id) {
                profile.add(&folded, n);
            }
        }
        if !counts.is_empty() {
            // Should not happen (texts are written before their samples);
            // the samples still count, under a name that says why.
            tracing::warn!(
                stacks = counts.len(),
                "stacks with samples but no text in {db}.stacks"
            );
            for n in counts.into_values() {
                profile.add("[stack text missing]", n);
            }
        }
        Ok(profile)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        // Scalar sub-queries are Nullable on current ClickHouse (a
        // RowBinary null flag would precede each value): hence `ifNull`.
        // Cheap enough for every `/metrics` scrape: batches from the
        // registry rows (one primary-key range per hour), the rest from the
        // parts' row counts (rows on disk: windows retention hides but has
        // not dropped yet are counted; stacks once per day partition).
        let db = &self.db;
        let parts = |table: &str| {
            format!(
                "toUInt64(ifNull((SELECT toUInt64(sum(rows)) FROM system.parts
                  WHERE active AND database = {} AND table = '{table}'), 0))",
                quote(db)
            )
        };
        let out = self.query_rows(&format!(
            "SELECT
                toUInt64(ifNull((SELECT toUInt64(uniqExact(agent_id, sequence)) FROM {db}.samples
                        WHERE label_set_id = 0 AND window_end >= {kept}), 0)),
                toUInt64(ifNull((SELECT toUInt64(count()) FROM {db}.samples
                        WHERE label_set_id = 0), 0)),
                {samples}, {stacks},
                toUInt64(ifNull((SELECT toUInt64(sum(bytes_on_disk)) FROM system.parts
                        WHERE active AND database = {quoted}), 0))",
            kept = self.retained_from(),
            samples = parts("samples"),
            stacks = parts("stacks"),
            quoted = quote(db)
        ))?;
        let mut rows = Rows::new(&out);
        let batches = rows.u64()?;
        let registry_rows = rows.u64()?;
        Ok(StoreStats {
            batches,
            sample_rows: rows.u64()?.saturating_sub(registry_rows),
            stacks: rows.u64()?,
            bytes: rows.u64()?,
        })
    }

    fn retain(&mut self, cutoff_ns: i64) -> Result<u64, StoreError> {
        // Queries start at the cutoff at once; whole days before it go.
        self.retention.deleted_before(cutoff_ns);
        let out = self.query_rows(&format!(
            "SELECT table, partition, toUInt64(sum(rows)) FROM system.parts
             WHERE active AND database = {} AND table IN ('samples', 'stacks', 'label_sets')
             GROUP BY table, partition",
            quote(&self.db)
        ))?;
        let mut rows = Rows::new(&out);
        let mut deleted = 0;
        while !rows.is_empty() {
            let table = rows.string()?;
            let partition = rows.string()?;
            let n = rows.u64()?;
            let Ok(day) = partition.parse::<i64>() else {
                continue;
            };
            // Day `d` holds windows ending in (d DAY, (d + 1) DAY].
            if day.saturating_add(1).saturating_mul(DAY_NS) < cutoff_ns
                && DAY_TABLES.contains(&table.as_str())
            {
                self.client.execute(
                    &format!("ALTER TABLE {}.{table} DROP PARTITION {day}", self.db),
                    &[],
                    &[],
                )?;
                if table == "samples" {
                    deleted += n;
                }
            }
        }
        if deleted > 0 {
            // Texts of dropped days are gone: write them again when seen.
            self.stacks_written = Written::new();
            self.sets_written = Written::new();
        }
        Ok(deleted)
    }
}

fn read_strings(out: &[u8]) -> Result<Vec<String>, StoreError> {
    let mut rows = Rows::new(out);
    let mut values = Vec::new();
    while !rows.is_empty() {
        values.push(rows.string()?);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_follow_the_end_exclusive_start_rule() {
        assert_eq!(hour_of(HOUR_NS), 0);
        assert_eq!(hour_of(HOUR_NS + 1), 1);
        assert!(Version(19, 6).has_ttl() && Version(24, 1).has_ttl());
        assert!(!Version(18, 16).has_ttl());
    }
}
