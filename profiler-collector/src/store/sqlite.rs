//! The embedded store: SQLite (bundled), WAL journal, schema versioned with
//! `PRAGMA user_version` and migrated on start-up.
//!
//! Stacks and label sets are stored once and samples reference them; a batch
//! is stored in one transaction together with its (agent, sequence) id, so a
//! batch is either fully stored once or not at all, even across a crash.
//!
//! Group commit: [`Store::insert_many`] writes many batches in one
//! transaction (one sync), each inside a savepoint so a failing batch leaves
//! the others stored. Stack and label-set ids are cached in memory (bounded)
//! so a known stack is not looked up by its text.
//!
//! Sample types: every sample row and rollup row carries the id of its type
//! (`sample_types`: name and unit, one unit per type); queries read one
//! type. Data stored before types existed is `cpu`/`samples` (id 1).
//!
//! Rollups: the values are also summed per hour (per type, label set and
//! stack, and per type and stack) and per minute (per type and stack), in
//! the same transaction as the raw rows, so they always agree with them. A query reads the
//! coarsest rollup for the whole buckets inside its range and finer ones,
//! then raw rows, only for the ragged ends (see [`plan`]). Bucket `k` of a
//! grain `g` holds the windows ending in `(k g, (k + 1) g]`, the same
//! `(start, end]` rule as queries.
use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    path::{Path, PathBuf},
    sync::Arc,
};

use rusqlite::{params, types::Value, Connection, OptionalExtension};

use super::{
    canonical,
    common::{bucket, whole_buckets, HOUR_NS, MINUTE_NS},
    Retention, Store, StoreError, StoreStats,
};
use crate::model::{Labels, Profile, SampleType, Selector, Stored, ValidBatch};

/// Schema migrations; entry N brings the schema from version N to N + 1.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE batches (
        agent_id TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        node TEXT NOT NULL,
        agent_version TEXT NOT NULL,
        window_start INTEGER NOT NULL,
        window_end INTEGER NOT NULL,
        frequency_hz INTEGER NOT NULL,
        samples INTEGER NOT NULL,
        PRIMARY KEY (agent_id, sequence)
    ) WITHOUT ROWID;
    CREATE INDEX batches_by_end ON batches (window_end);
    CREATE TABLE stacks (
        id INTEGER PRIMARY KEY,
        folded TEXT NOT NULL UNIQUE
    );
    CREATE TABLE label_sets (
        id INTEGER PRIMARY KEY,
        canonical TEXT NOT NULL UNIQUE
    );
    CREATE TABLE labels (
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        label_set_id INTEGER NOT NULL,
        PRIMARY KEY (name, value, label_set_id)
    ) WITHOUT ROWID;
    CREATE TABLE samples (
        window_start INTEGER NOT NULL,
        window_end INTEGER NOT NULL,
        label_set_id INTEGER NOT NULL,
        stack_id INTEGER NOT NULL,
        count INTEGER NOT NULL
    );
    CREATE INDEX samples_by_time ON samples (window_end, label_set_id);
"#,
    // Rollups, built from the samples already stored (window_end >= 1, so
    // the integer division is the floor).
    r#"
    CREATE TABLE rollup_h (
        hour INTEGER NOT NULL,
        label_set_id INTEGER NOT NULL,
        stack_id INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (hour, label_set_id, stack_id)
    ) WITHOUT ROWID;
    CREATE TABLE rollup_stack_h (
        hour INTEGER NOT NULL,
        stack_id INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (hour, stack_id)
    ) WITHOUT ROWID;
    CREATE TABLE rollup_stack_m (
        minute INTEGER NOT NULL,
        stack_id INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (minute, stack_id)
    ) WITHOUT ROWID;
    INSERT INTO rollup_h
        SELECT (window_end - 1) / 3600000000000, label_set_id, stack_id, SUM(count)
        FROM samples GROUP BY 1, 2, 3;
    INSERT INTO rollup_stack_h
        SELECT hour, stack_id, SUM(count) FROM rollup_h GROUP BY 1, 2;
    INSERT INTO rollup_stack_m
        SELECT (window_end - 1) / 60000000000, stack_id, SUM(count)
        FROM samples GROUP BY 1, 2;
"#,
    // Sample types: what existed before is cpu/samples (id 1). The
    // rollups get the type in their keys (rebuilt: SQLite cannot change a
    // primary key in place); `count` columns become `value`.
    r#"
    CREATE TABLE sample_types (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        unit TEXT NOT NULL
    );
    INSERT INTO sample_types (id, name, unit) VALUES (1, 'cpu', 'samples');
    ALTER TABLE batches ADD COLUMN type_id INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE samples ADD COLUMN type_id INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE samples RENAME COLUMN count TO value;
    CREATE TABLE rollup_h_typed (
        hour INTEGER NOT NULL,
        type_id INTEGER NOT NULL,
        label_set_id INTEGER NOT NULL,
        stack_id INTEGER NOT NULL,
        value INTEGER NOT NULL,
        PRIMARY KEY (hour, type_id, label_set_id, stack_id)
    ) WITHOUT ROWID;
    INSERT INTO rollup_h_typed SELECT hour, 1, label_set_id, stack_id, count FROM rollup_h;
    DROP TABLE rollup_h;
    ALTER TABLE rollup_h_typed RENAME TO rollup_h;
    CREATE TABLE rollup_stack_h_typed (
        hour INTEGER NOT NULL,
        type_id INTEGER NOT NULL,
        stack_id INTEGER NOT NULL,
        value INTEGER NOT NULL,
        PRIMARY KEY (hour, type_id, stack_id)
    ) WITHOUT ROWID;
    INSERT INTO rollup_stack_h_typed SELECT hour, 1, stack_id, count FROM rollup_stack_h;
    DROP TABLE rollup_stack_h;
    ALTER TABLE rollup_stack_h_typed RENAME TO rollup_stack_h;
    CREATE TABLE rollup_stack_m_typed (
        minute INTEGER NOT NULL,
        type_id INTEGER NOT NULL,
        stack_id INTEGER NOT NULL,
        value INTEGER NOT NULL,
        PRIMARY KEY (minute, type_id, stack_id)
    ) WITHOUT ROWID;
    INSERT INTO rollup_stack_m_typed SELECT minute, 1, stack_id, count FROM rollup_stack_m;
    DROP TABLE rollup_stack_m;
    ALTER TABLE rollup_stack_m_typed RENAME TO rollup_stack_m;
"#,
];

/// A rollup table: values per type and bucket of `grain` nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rollup {
    pub table: &'static str,
    /// The bucket column.
    pub column: &'static str,
    pub grain: i64,
    /// Keyed by label set too (selector queries can use it).
    pub per_label_set: bool,
}

pub const ROLLUP_H: Rollup = Rollup {
    table: "rollup_h",
    column: "hour",
    grain: HOUR_NS,
    per_label_set: true,
};
pub const ROLLUP_STACK_H: Rollup = Rollup {
    table: "rollup_stack_h",
    column: "hour",
    grain: HOUR_NS,
    per_label_set: false,
};
pub const ROLLUP_STACK_M: Rollup = Rollup {
    table: "rollup_stack_m",
    column: "minute",
    grain: MINUTE_NS,
    per_label_set: false,
};
pub const ROLLUPS: [Rollup; 3] = [ROLLUP_H, ROLLUP_STACK_H, ROLLUP_STACK_M];

/// One piece of a query's range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Buckets `[lo, hi)` of a rollup.
    Rollup { rollup: Rollup, lo: i64, hi: i64 },
    /// Raw samples whose window ends in `(start, end]`.
    Raw { start: i64, end: i64 },
}

impl Part {
    /// The table the part reads and the condition picking its rows, whose
    /// two bounds are the statement's arguments `?n` and `?n+1`.
    fn range(&self, n: usize) -> (&'static str, String, [i64; 2]) {
        match *self {
            Part::Raw { start, end } => (
                "samples",
                format!("window_end > ?{n} AND window_end <= ?{}", n + 1),
                [start, end],
            ),
            Part::Rollup { rollup, lo, hi } => (
                rollup.table,
                format!("{c} >= ?{n} AND {c} < ?{}", n + 1, c = rollup.column),
                [lo, hi],
            ),
        }
    }
}

/// Splits `(start, end]` into the whole buckets of the first (coarsest)
/// rollup, then of the next ones for what is left at the ends, and raw
/// ranges for the rest. The parts are disjoint and cover the range.
pub fn plan(start: i64, end: i64, rollups: &[Rollup]) -> Vec<Part> {
    fn split(start: i64, end: i64, rollups: &[Rollup], out: &mut Vec<Part>) {
        if start >= end {
            return;
        }
        let Some((first, rest)) = rollups.split_first() else {
            out.push(Part::Raw { start, end });
            return;
        };
        match whole_buckets(start, end, first.grain) {
            None => split(start, end, rest, out),
            Some((lo, hi)) => {
                split(start, lo * first.grain, rest, out);
                out.push(Part::Rollup {
                    rollup: *first,
                    lo,
                    hi,
                });
                split(hi * first.grain, end, rest, out);
            }
        }
    }
    let mut out = Vec::new();
    split(start, end, rollups, &mut out);
    out
}

/// Ids of known stacks and label sets, by a 128-bit hash of their text (two
/// SipHash keys drawn at random, so a client cannot aim at a collision).
/// Bounded: emptied when full. Entries added by a write that is rolled back
/// are forgotten with it.
struct IdCache {
    ids: HashMap<u128, i64>,
    cap: usize,
}

impl IdCache {
    fn new(cap: usize) -> Self {
        Self {
            ids: HashMap::new(),
            cap,
        }
    }
    fn insert(&mut self, key: u128, id: i64) {
        if self.ids.len() >= self.cap {
            self.ids.clear();
        }
        self.ids.insert(key, id);
    }
}

/// Most ids cached per kind (~32 bytes each).
const ID_CACHE_CAP: usize = 1 << 18;

struct Caches {
    keys: (RandomState, RandomState),
    stacks: IdCache,
    sets: IdCache,
    /// Sample types by name: id and unit (few; never deleted).
    types: HashMap<String, (i64, String)>,
}

/// A cache entry made by the batch being written.
enum Fresh {
    Stack(u128),
    Set(u128),
    Type(String),
}

impl Caches {
    fn key<T: std::hash::Hash + ?Sized>(&self, value: &T) -> u128 {
        (u128::from(self.keys.0.hash_one(value)) << 64) | u128::from(self.keys.1.hash_one(value))
    }

    fn clear(&mut self) {
        self.stacks.ids.clear();
        self.sets.ids.clear();
        self.types.clear();
    }

    fn forget(&mut self, fresh: &[Fresh]) {
        for f in fresh {
            match f {
                Fresh::Stack(k) => {
                    self.stacks.ids.remove(k);
                }
                Fresh::Set(k) => {
                    self.sets.ids.remove(k);
                }
                Fresh::Type(name) => {
                    self.types.remove(name);
                }
            }
        }
    }

    /// The id of a batch's sample type, added on first use; refused when
    /// the type is stored with another unit.
    fn type_id(
        &mut self,
        conn: &Connection,
        sample_type: &SampleType,
        fresh: &mut Vec<Fresh>,
    ) -> Result<i64, StoreError> {
        let known = match self.types.get(&sample_type.name) {
            Some(known) => Some(known.clone()),
            None => conn
                .prepare_cached("SELECT id, unit FROM sample_types WHERE name = ?1")?
                .query_row([&sample_type.name], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?,
        };
        let (id, unit) = match known {
            Some(known) => known,
            None => {
                conn.prepare_cached("INSERT INTO sample_types (name, unit) VALUES (?1, ?2)")?
                    .execute([&sample_type.name, &sample_type.unit])?;
                fresh.push(Fresh::Type(sample_type.name.clone()));
                (conn.last_insert_rowid(), sample_type.unit.clone())
            }
        };
        if unit != sample_type.unit {
            return Err(StoreError::UnitMismatch {
                sample_type: sample_type.name.clone(),
                stored: unit,
                got: sample_type.unit.clone(),
            });
        }
        self.types.insert(sample_type.name.clone(), (id, unit));
        Ok(id)
    }

    fn stack_id(
        &mut self,
        conn: &Connection,
        folded: &str,
        fresh: &mut Vec<Fresh>,
    ) -> Result<i64, StoreError> {
        let key = self.key(folded);
        if let Some(&id) = self.stacks.ids.get(&key) {
            return Ok(id);
        }
        let found = conn
            .prepare_cached("SELECT id FROM stacks WHERE folded = ?1")?
            .query_row([folded], |r| r.get(0))
            .optional()?;
        let id = match found {
            Some(id) => id,
            None => {
                conn.prepare_cached("INSERT INTO stacks (folded) VALUES (?1)")?
                    .execute([folded])?;
                fresh.push(Fresh::Stack(key));
                conn.last_insert_rowid()
            }
        };
        self.stacks.insert(key, id);
        Ok(id)
    }

    fn set_id(
        &mut self,
        conn: &Connection,
        labels: &Labels,
        fresh: &mut Vec<Fresh>,
    ) -> Result<i64, StoreError> {
        let key = self.key(labels);
        if let Some(&id) = self.sets.ids.get(&key) {
            return Ok(id);
        }
        let text = canonical(labels);
        let found = conn
            .prepare_cached("SELECT id FROM label_sets WHERE canonical = ?1")?
            .query_row([&text], |r| r.get(0))
            .optional()?;
        let id = match found {
            Some(id) => id,
            None => {
                conn.prepare_cached("INSERT INTO label_sets (canonical) VALUES (?1)")?
                    .execute([&text])?;
                let id = conn.last_insert_rowid();
                let mut label = conn.prepare_cached(
                    "INSERT OR IGNORE INTO labels (name, value, label_set_id) VALUES (?1, ?2, ?3)",
                )?;
                for (name, value) in labels {
                    label.execute(params![name, value, id])?;
                }
                fresh.push(Fresh::Set(key));
                id
            }
        };
        self.sets.insert(key, id);
        Ok(id)
    }
}

/// The rollup rows of a commit group, summed in memory before they are
/// upserted (one upsert per distinct key instead of one per sample row).
#[derive(Default)]
struct GroupRollups {
    per_set: HashMap<(i64, i64, i64, i64), i64>,
    stack_h: HashMap<(i64, i64, i64), i64>,
    stack_m: HashMap<(i64, i64, i64), i64>,
}

impl GroupRollups {
    /// Adds a stored batch's rows: (label set id, stack id, value).
    fn add(&mut self, window_end_ns: i64, type_id: i64, rows: &[(i64, i64, i64)]) {
        let h = bucket(window_end_ns, HOUR_NS);
        let m = bucket(window_end_ns, MINUTE_NS);
        for &(set, stack, n) in rows {
            *self.per_set.entry((h, type_id, set, stack)).or_default() += n;
            *self.stack_h.entry((h, type_id, stack)).or_default() += n;
            *self.stack_m.entry((m, type_id, stack)).or_default() += n;
        }
    }

    fn write(&mut self, conn: &Connection) -> Result<(), StoreError> {
        // In key order, so the upserts walk each B-tree once.
        let mut per_set: Vec<_> = self.per_set.drain().collect();
        per_set.sort_unstable();
        let mut up = conn.prepare_cached(
            "INSERT INTO rollup_h (hour, type_id, label_set_id, stack_id, value)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (hour, type_id, label_set_id, stack_id)
             DO UPDATE SET value = value + excluded.value",
        )?;
        for ((h, t, set, stack), n) in per_set {
            up.execute(params![h, t, set, stack, n])?;
        }
        for (rollup, rows) in [
            (ROLLUP_STACK_H, &mut self.stack_h),
            (ROLLUP_STACK_M, &mut self.stack_m),
        ] {
            let mut rows: Vec<_> = rows.drain().collect();
            rows.sort_unstable();
            let mut up = conn.prepare_cached(&format!(
                "INSERT INTO {t} ({c}, type_id, stack_id, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT ({c}, type_id, stack_id) DO UPDATE SET value = value + excluded.value",
                t = rollup.table,
                c = rollup.column
            ))?;
            for ((b, ty, stack), n) in rows {
                up.execute(params![b, ty, stack, n])?;
            }
        }
        Ok(())
    }
}

pub struct SqliteStore {
    conn: Connection,
    caches: Caches,
    rollups: GroupRollups,
    /// Resolved (label set, stack, value) of the batch being written.
    rows: Vec<(i64, i64, i64)>,
    retention: Retention,
}

/// What failed in the SQLite store.
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("cannot create the store's folder {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database schema version {found} is newer than this collector supports ({known})")]
    NewerSchema { found: usize, known: usize },
    #[error("migrating the database to schema version {version}: {source}")]
    Migrate {
        version: usize,
        source: rusqlite::Error,
    },
    /// A statement of a write or a query failed.
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(SqliteError::Sql(e))
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SqliteError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| SqliteError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::with_connection(conn)
    }

    /// An in-memory store, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::with_connection(Connection::open_in_memory()?)
    }

    fn with_connection(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Durable at commit: an acknowledged batch survives a crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // 64 MiB of page cache (the default is 2 MiB): the current hour's
        // rollup rows and the recent index pages stay in memory.
        conn.pragma_update(None, "cache_size", -65536)?;
        conn.set_prepared_statement_cache_capacity(64);
        // Checkpoint every 64 MiB of WAL (default 4 MiB): pages written by
        // many commits (index and rollup pages) reach the main file once,
        // and the file is synced less often.
        conn.pragma_update(None, "wal_autocheckpoint", 16384)?;
        conn.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Self {
            conn,
            caches: Caches {
                keys: (RandomState::new(), RandomState::new()),
                stacks: IdCache::new(ID_CACHE_CAP),
                sets: IdCache::new(ID_CACHE_CAP),
                types: HashMap::new(),
            },
            retention: Retention::default(),
            rollups: GroupRollups::default(),
            rows: Vec::new(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Schema version of the open database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version = self.schema_version()? as usize;
        if version > MIGRATIONS.len() {
            return Err(SqliteError::NewerSchema {
                found: version,
                known: MIGRATIONS.len(),
            }
            .into());
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let step = |conn: &mut Connection| -> rusqlite::Result<()> {
                let tx = conn.transaction()?;
                tx.execute_batch(sql)?;
                tx.pragma_update(None, "user_version", (i + 1) as u32)?;
                tx.commit()
            };
            step(&mut self.conn).map_err(|source| SqliteError::Migrate {
                version: i + 1,
                source,
            })?;
            tracing::info!(version = i + 1, "migrated the store's schema");
        }
        Ok(())
    }

    /// The connection, for benchmarks and diagnostics (not for writing
    /// samples: the rollups must stay in step with them).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Writes a group in one transaction; `Err` when the whole group failed.
    fn write_group(
        &mut self,
        batches: &[&ValidBatch],
    ) -> Result<Vec<Result<Stored, StoreError>>, StoreError> {
        let Self {
            conn,
            caches,
            rollups,
            rows,
            ..
        } = self;
        let tx = conn.transaction()?;
        let mut results = Vec::with_capacity(batches.len());
        let mut fresh = Vec::new();
        for batch in batches {
            fresh.clear();
            tx.prepare_cached("SAVEPOINT batch")?.execute([])?;
            match insert_batch(&tx, caches, batch, rows, &mut fresh) {
                Ok((stored, type_id)) => {
                    tx.prepare_cached("RELEASE batch")?.execute([])?;
                    if let Stored::New { .. } = stored {
                        rollups.add(batch.window_end_ns, type_id, rows);
                    }
                    results.push(Ok(stored));
                }
                Err(e) => {
                    tx.execute_batch("ROLLBACK TO batch; RELEASE batch")?;
                    caches.forget(&fresh);
                    results.push(Err(e));
                }
            }
        }
        rollups.write(&tx)?;
        tx.commit()?;
        Ok(results)
    }

    /// The id of a sample type; `None` when no batch of it was stored.
    fn stored_type_id(&self, name: &str) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT id FROM sample_types WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?)
    }

    /// Sums per stack id of the samples a selector picks, from the parts of
    /// `plan` (rollups) or from raw rows only.
    fn stack_totals(
        &self,
        selector: &Selector,
        use_rollups: bool,
    ) -> Result<HashMap<i64, i64>, StoreError> {
        let Some(type_id) = self.stored_type_id(&selector.sample_type)? else {
            return Ok(HashMap::new());
        };
        let selected = !selector.matchers.is_empty();
        let rollups: &[Rollup] = match (use_rollups, selected) {
            (false, _) => &[],
            (true, true) => &[ROLLUP_H],
            (true, false) => &[ROLLUP_STACK_H, ROLLUP_STACK_M],
        };
        // Label sets matching every matcher; values are bound, never spliced.
        // Arguments ?1 and ?2 are the part's bounds, ?3 the type, the
        // matchers follow.
        let mut sets = String::new();
        let mut matcher_args: Vec<Value> = Vec::new();
        for (i, (name, value)) in selector.matchers.iter().enumerate() {
            if i > 0 {
                sets.push_str(" INTERSECT ");
            }
            let n = 4 + 2 * i;
            sets.push_str(&format!(
                "SELECT label_set_id FROM labels WHERE name = ?{n} AND value = ?{}",
                n + 1
            ));
            matcher_args.push(name.clone().into());
            matcher_args.push(value.clone().into());
        }
        let mut totals: HashMap<i64, i64> = HashMap::new();
        for part in plan(selector.start_ns, selector.end_ns, rollups) {
            let (sql, a, b) = match part {
                Part::Raw { start, end } if selected => (
                    format!(
                        "SELECT stack_id, SUM(value) FROM samples
                         WHERE window_end > ?1 AND window_end <= ?2 AND type_id = ?3
                           AND label_set_id IN ({sets})
                         GROUP BY stack_id"
                    ),
                    start,
                    end,
                ),
                Part::Raw { start, end } => (
                    "SELECT stack_id, SUM(value) FROM samples
                     WHERE window_end > ?1 AND window_end <= ?2 AND type_id = ?3
                     GROUP BY stack_id"
                        .to_string(),
                    start,
                    end,
                ),
                // One seek per (hour, matching label set): the hours are
                // listed so that both key columns are equalities, and the
                // join order is forced (CROSS JOIN) so SQLite does not scan
                // each hour testing every row's label set instead.
                Part::Rollup { rollup, lo, hi } if selected => (
                    format!(
                        "WITH RECURSIVE h(b) AS (SELECT ?1 UNION ALL SELECT b + 1 FROM h WHERE b + 1 < ?2),
                         m(id) AS MATERIALIZED ({sets})
                         SELECT r.stack_id, SUM(r.value) FROM h CROSS JOIN m CROSS JOIN {t} r
                         WHERE r.{c} = h.b AND r.type_id = ?3 AND r.label_set_id = m.id
                         GROUP BY r.stack_id",
                        t = rollup.table,
                        c = rollup.column
                    ),
                    lo,
                    hi,
                ),
                Part::Rollup { rollup, lo, hi } => (
                    format!(
                        "SELECT stack_id, SUM(value) FROM {t}
                         WHERE {c} >= ?1 AND {c} < ?2 AND type_id = ?3
                         GROUP BY stack_id",
                        t = rollup.table,
                        c = rollup.column
                    ),
                    lo,
                    hi,
                ),
            };
            let mut stmt = self.conn.prepare_cached(&sql)?;
            let args = [Value::from(a), Value::from(b), Value::from(type_id)]
                .into_iter()
                .chain(matcher_args.iter().cloned());
            let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
            while let Some(row) = rows.next()? {
                *totals.entry(row.get(0)?).or_default() += row.get::<_, i64>(1)?;
            }
        }
        Ok(totals)
    }

    fn profile_from(&self, totals: HashMap<i64, i64>) -> Result<Profile, StoreError> {
        let mut text = self
            .conn
            .prepare_cached("SELECT folded FROM stacks WHERE id = ?1")?;
        let mut profile = Profile::default();
        for (id, value) in totals {
            let stack: String = text.query_row([id], |r| r.get(0))?;
            profile.add(&stack, value as u64);
        }
        Ok(profile)
    }

    /// The profile from raw samples alone (what the rollups must agree
    /// with; for tests and benchmarks).
    pub fn profile_raw(&self, selector: &Selector) -> Result<Profile, StoreError> {
        self.profile_from(self.stack_totals(selector, false)?)
    }

    /// SQL selecting the ids of label sets with samples in `(start, end]`,
    /// of one type (`Some(id)`) or of every type; its arguments.
    fn sets_in_range(start: i64, end: i64, type_id: Option<i64>) -> (String, Vec<Value>) {
        let mut sql = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        for part in plan(start, end, &[ROLLUP_H]) {
            let n = args.len() + 1;
            let of_type = match type_id {
                Some(_) => format!(" AND type_id = ?{}", n + 2),
                None => String::new(),
            };
            let (table, range, bounds) = part.range(n);
            sql.push(format!(
                "SELECT label_set_id FROM {table} WHERE {range}{of_type}"
            ));
            args.extend(bounds.map(Value::from));
            args.extend(type_id.map(Value::from));
        }
        if sql.is_empty() {
            sql.push("SELECT NULL WHERE 0".into());
        }
        (sql.join(" UNION "), args)
    }
}

/// Sample rows per multi-row `INSERT`.
const INSERT_ROWS: usize = 32;

/// `INSERT` of `n` sample rows of one window: ?1 and ?2 are the window's
/// start and end, ?3 the type, then (label set, stack, value) per row.
fn insert_samples_sql(n: usize) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "(?1, ?2, ?3, ?{}, ?{}, ?{})",
                3 * i + 4,
                3 * i + 5,
                3 * i + 6
            )
        })
        .collect();
    format!(
        "INSERT INTO samples (window_start, window_end, type_id, label_set_id, stack_id, value)
         VALUES {}",
        rows.join(", ")
    )
}

/// Stores one batch's id and raw rows (not its rollups), leaving its
/// resolved rows in `rows`; returns the outcome and the type's id.
fn insert_batch(
    conn: &Connection,
    caches: &mut Caches,
    batch: &ValidBatch,
    rows: &mut Vec<(i64, i64, i64)>,
    fresh: &mut Vec<Fresh>,
) -> Result<(Stored, i64), StoreError> {
    rows.clear();
    let type_id = caches.type_id(conn, &batch.sample_type, fresh)?;
    let inserted = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO batches
             (agent_id, sequence, node, agent_version, window_start, window_end, frequency_hz,
              samples, type_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            batch.agent_id,
            batch.sequence as i64,
            batch.node,
            batch.agent_version,
            batch.window_start_ns,
            batch.window_end_ns,
            batch.frequency_hz,
            batch.total() as i64,
            type_id,
        ])?;
    if inserted == 0 {
        return Ok((Stored::Duplicate, type_id));
    }
    // Database ids of the batch's label sets and stacks, resolved once each
    // on first use.
    let mut set_ids: Vec<Option<i64>> = vec![None; batch.label_sets.len()];
    let mut stack_ids: Vec<Option<i64>> = vec![None; batch.stacks.len()];
    for sample in &batch.samples {
        let set = match set_ids[sample.label_set] {
            Some(id) => id,
            None => {
                let id = caches.set_id(conn, &batch.label_sets[sample.label_set], fresh)?;
                set_ids[sample.label_set] = Some(id);
                id
            }
        };
        let stack = match stack_ids[sample.stack] {
            Some(id) => id,
            None => {
                let id = caches.stack_id(conn, &batch.stacks[sample.stack], fresh)?;
                stack_ids[sample.stack] = Some(id);
                id
            }
        };
        rows.push((set, stack, sample.value as i64));
    }
    // Several rows per statement: fewer statement runs per row.
    let mut chunks = rows.chunks_exact(INSERT_ROWS);
    let mut many = conn.prepare_cached(&insert_samples_sql(INSERT_ROWS))?;
    for chunk in &mut chunks {
        for (i, &(set, stack, value)) in chunk.iter().enumerate() {
            many.raw_bind_parameter(3 * i + 4, set)?;
            many.raw_bind_parameter(3 * i + 5, stack)?;
            many.raw_bind_parameter(3 * i + 6, value)?;
        }
        many.raw_bind_parameter(1, batch.window_start_ns)?;
        many.raw_bind_parameter(2, batch.window_end_ns)?;
        many.raw_bind_parameter(3, type_id)?;
        many.raw_execute()?;
    }
    let mut one = conn.prepare_cached(&insert_samples_sql(1))?;
    for &(set, stack, value) in chunks.remainder() {
        one.execute(params![
            batch.window_start_ns,
            batch.window_end_ns,
            type_id,
            set,
            stack,
            value
        ])?;
    }
    Ok((
        Stored::New {
            samples: batch.total(),
        },
        type_id,
    ))
}

impl Store for SqliteStore {
    fn retention(&self) -> &Retention {
        &self.retention
    }

    fn write_many(&mut self, batches: &[&ValidBatch]) -> Vec<Result<Stored, StoreError>> {
        match self.write_group(batches) {
            Ok(results) => results,
            Err(e) => {
                // Rolled back: ids cached by this group may not exist.
                self.caches.clear();
                self.rollups = GroupRollups::default();
                let e = Arc::new(e);
                batches
                    .iter()
                    .map(|_| Err(StoreError::GroupFailed(e.clone())))
                    .collect()
            }
        }
    }

    fn label_names(
        &self,
        sample_type: Option<&str>,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<String>, StoreError> {
        let type_id = match sample_type {
            None => None,
            Some(name) => match self.stored_type_id(name)? {
                None => return Ok(Vec::new()),
                id => id,
            },
        };
        let (sets, args) = Self::sets_in_range(start_ns, end_ns, type_id);
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT DISTINCT name FROM labels WHERE label_set_id IN ({sets}) ORDER BY name"
        ))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn label_values(
        &self,
        name: &str,
        sample_type: Option<&str>,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<String>, StoreError> {
        let type_id = match sample_type {
            None => None,
            Some(name) => match self.stored_type_id(name)? {
                None => return Ok(Vec::new()),
                id => id,
            },
        };
        let (sets, mut args) = Self::sets_in_range(start_ns, end_ns, type_id);
        let n = args.len() + 1;
        args.push(name.to_string().into());
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT DISTINCT value FROM labels WHERE name = ?{n} AND label_set_id IN ({sets})
             ORDER BY value"
        ))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn sample_types(&self, start_ns: i64, end_ns: i64) -> Result<Vec<SampleType>, StoreError> {
        // Per type, whether any part of the range has a row of it: the
        // per-stack rollups for whole minutes and hours, raw rows for the
        // rest. `EXISTS` stops at the first row of a type present.
        let mut exists = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        for part in plan(start_ns, end_ns, &[ROLLUP_STACK_H, ROLLUP_STACK_M]) {
            let (table, range, bounds) = part.range(args.len() + 1);
            exists.push(format!(
                "EXISTS (SELECT 1 FROM {table} WHERE {range} AND type_id = t.id)"
            ));
            args.extend(bounds.map(Value::from));
        }
        if exists.is_empty() {
            return Ok(Vec::new());
        }
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT name, unit FROM sample_types AS t WHERE {} ORDER BY name",
            exists.join(" OR ")
        ))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| {
            Ok(SampleType {
                name: r.get(0)?,
                unit: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn cpu_frequencies(&self, start_ns: i64, end_ns: i64) -> Result<Vec<u32>, StoreError> {
        // A batch is one type; only `cpu` batches have a frequency.
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT frequency_hz FROM batches
             WHERE window_end > ?1 AND window_end <= ?2 AND frequency_hz > 0
             ORDER BY frequency_hz",
        )?;
        let rows = stmt.query_map([start_ns, end_ns], |r| r.get::<_, u32>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn unit(&self, sample_type: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT unit FROM sample_types WHERE name = ?1")?
            .query_row([sample_type], |r| r.get(0))
            .optional()?)
    }

    fn profile(&self, selector: &Selector) -> Result<Profile, StoreError> {
        // Sum per stack id first, then join the stack text once per stack
        // (docs/collector-benchmarks.md).
        self.profile_from(self.stack_totals(selector, true)?)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let count = |table: &str| -> Result<u64, StoreError> {
            Ok(self
                .conn
                .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| {
                    r.get::<_, i64>(0)
                })? as u64)
        };
        let pages: i64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))?;
        let page_size: i64 = self
            .conn
            .pragma_query_value(None, "page_size", |r| r.get(0))?;
        Ok(StoreStats {
            batches: count("batches")?,
            sample_rows: count("samples")?,
            stacks: count("stacks")?,
            bytes: (pages * page_size) as u64,
        })
    }

    fn retain(&mut self, cutoff_ns: i64) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        // Rollups first, from the raw rows about to go: buckets wholly
        // before the cutoff are deleted, the one the cutoff splits loses
        // the values of its deleted windows.
        for rollup in ROLLUPS {
            let (t, c, g) = (rollup.table, rollup.column, rollup.grain);
            let split = bucket(cutoff_ns.saturating_sub(1), g);
            tx.execute(&format!("DELETE FROM {t} WHERE {c} < ?1"), [split])?;
            let key = if rollup.per_label_set {
                "type_id, label_set_id, stack_id"
            } else {
                "type_id, stack_id"
            };
            let on = if rollup.per_label_set {
                "r.type_id = d.type_id AND r.label_set_id = d.label_set_id AND r.stack_id = d.stack_id"
            } else {
                "r.type_id = d.type_id AND r.stack_id = d.stack_id"
            };
            tx.execute(
                &format!(
                    "UPDATE {t} AS r SET value = r.value - d.n
                     FROM (SELECT {key}, SUM(value) AS n FROM samples
                           WHERE window_end > ?1 AND window_end < ?2 GROUP BY {key}) AS d
                     WHERE r.{c} = ?3 AND {on}"
                ),
                params![split.saturating_mul(g), cutoff_ns, split],
            )?;
            tx.execute(
                &format!("DELETE FROM {t} WHERE {c} = ?1 AND value <= 0"),
                [split],
            )?;
        }
        let samples = tx.execute("DELETE FROM samples WHERE window_end < ?1", [cutoff_ns])?;
        tx.execute("DELETE FROM batches WHERE window_end < ?1", [cutoff_ns])?;
        if samples > 0 {
            // The rollups name exactly the stacks and label sets that
            // samples do, and are far smaller to search.
            tx.execute(
                "DELETE FROM stacks WHERE id NOT IN (SELECT stack_id FROM rollup_stack_h)",
                [],
            )?;
            tx.execute(
                "DELETE FROM labels WHERE label_set_id NOT IN (SELECT label_set_id FROM rollup_h)",
                [],
            )?;
            tx.execute(
                "DELETE FROM label_sets WHERE id NOT IN (SELECT label_set_id FROM rollup_h)",
                [],
            )?;
        }
        tx.commit()?;
        // Deleted stacks and label sets must not be found in the caches.
        if samples > 0 {
            self.caches.clear();
        }
        self.retention.deleted_before(cutoff_ns);
        Ok(samples as u64)
    }
}

impl SqliteStore {
    /// Whether a batch id is stored (for tests and diagnostics).
    pub fn has_batch(&self, agent_id: &str, sequence: u64) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM batches WHERE agent_id = ?1 AND sequence = ?2",
                params![agent_id, sequence as i64],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Rows where a rollup differs from the sums of the raw samples (0 when
    /// consistent); for tests and after bulk changes.
    pub fn rollup_mismatches(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for rollup in ROLLUPS {
            let (t, c, g) = (rollup.table, rollup.column, rollup.grain);
            let key = if rollup.per_label_set {
                "type_id, label_set_id, stack_id"
            } else {
                "type_id, stack_id"
            };
            let raw = format!(
                "SELECT (window_end - 1) / {g} AS {c}, {key}, SUM(value) AS value FROM samples
                 GROUP BY 1, {key}"
            );
            let stored = format!("SELECT {c}, {key}, value FROM {t}");
            let n: i64 = self.conn.query_row(
                &format!(
                    "SELECT (SELECT COUNT(*) FROM ({raw} EXCEPT {stored}))
                          + (SELECT COUNT(*) FROM ({stored} EXCEPT {raw}))"
                ),
                [],
                |r| r.get(0),
            )?;
            total += n as u64;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{self, all, batch};

    /// The conformance suite every store passes (ClickHouse runs it in
    /// profiler-tests against a real server).
    #[test]
    fn passes_the_conformance_suite() {
        conformance::check_all(&mut || Box::new(SqliteStore::in_memory().unwrap()));
    }

    #[test]
    fn fresh_store_has_the_latest_schema() {
        let store = SqliteStore::in_memory().unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as u32);
    }

    #[test]
    fn retention_deletes_old_windows_and_orphans() {
        let mut store = SqliteStore::in_memory().unwrap();
        store.insert(&batch(1, 100, "app", "old;stack", 1)).unwrap();
        store.insert(&batch(2, 200, "app", "new;stack", 1)).unwrap();
        assert_eq!(store.retain(conformance::at(150)).unwrap(), 1);
        let stats = store.stats().unwrap();
        assert_eq!((stats.batches, stats.sample_rows, stats.stacks), (1, 1, 1));
        assert_eq!(
            store.profile(&all(0, 300, &[])).unwrap().folded(),
            "new;stack 1\n"
        );
    }

    #[test]
    fn reopening_keeps_data_and_refuses_newer_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/store.db");
        {
            let mut store = SqliteStore::open(&path).unwrap();
            store.insert(&batch(1, 100, "app", "main", 7)).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.has_batch("a1", 1).unwrap());
        assert_eq!(store.profile(&all(0, 300, &[])).unwrap().total(), 7);
        store
            .conn
            .pragma_update(None, "user_version", 99u32)
            .unwrap();
        drop(store);
        let err = SqliteStore::open(&path).err().unwrap().to_string();
        assert!(err.contains("newer than this collector supports"), "{err}");
    }
}

/// Group commit and rollups against the raw rows.
#[cfg(test)]
mod rollup_tests {
    use super::*;
    use crate::model::BatchSample;
    use crate::store::conformance::{random_batch, random_time, selectors, Rng, S, T0};

    fn check_queries(store: &SqliteStore, rng: &mut Rng, hours: i64, queries: usize) {
        let mut fixed = vec![
            (T0, T0 + HOUR_NS),                               // one whole hour
            (T0, T0 + hours * HOUR_NS),                       // aligned, all
            (T0 + 10 * S, T0 + HOUR_NS - 10 * S),             // inside one hour
            (T0 - HOUR_NS, T0 + (hours + 1) * HOUR_NS),       // wider than the data
            (T0 + HOUR_NS - 1, T0 + 2 * HOUR_NS + 1),         // one ns past each end
            (T0 + 30 * MINUTE_NS, T0 + 2 * HOUR_NS + 30 * S), // ragged, minute tiers
        ];
        for _ in 0..queries {
            let (a, b) = (random_time(rng, hours), random_time(rng, hours));
            if a != b {
                fixed.push((a.min(b), a.max(b)));
            }
        }
        for (start, end) in fixed {
            for sel in selectors(rng, start, end) {
                assert_eq!(
                    store.profile(&sel).unwrap(),
                    store.profile_raw(&sel).unwrap(),
                    "rollups and raw rows differ for {sel:?}: plan {:?}",
                    plan(start, end, &[ROLLUP_STACK_H, ROLLUP_STACK_M])
                );
            }
            assert_eq!(
                store.label_values("pod", None, start, end).unwrap(),
                raw_label_values(store, "pod", start, end)
            );
        }
    }

    fn raw_label_values(store: &SqliteStore, name: &str, start: i64, end: i64) -> Vec<String> {
        let mut stmt = store
            .conn
            .prepare(
                "SELECT DISTINCT value FROM labels WHERE name = ?1 AND label_set_id IN
                 (SELECT label_set_id FROM samples WHERE window_end > ?2 AND window_end <= ?3)
                 ORDER BY value",
            )
            .unwrap();
        stmt.query_map(params![name, start, end], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn the_plan_covers_the_range_once() {
        let tiers = [ROLLUP_STACK_H, ROLLUP_STACK_M];
        let mut rng = Rng::new(7);
        for _ in 0..2000 {
            let (a, b) = (random_time(&mut rng, 4), random_time(&mut rng, 4));
            let (start, end) = (a.min(b), a.max(b));
            let mut at = start;
            for part in plan(start, end, &tiers) {
                let (s, e) = match part {
                    Part::Raw { start, end } => (start, end),
                    Part::Rollup { rollup, lo, hi } => (lo * rollup.grain, hi * rollup.grain),
                };
                assert_eq!(s, at, "parts are contiguous: {start}..{end}");
                assert!(e > s);
                at = e;
            }
            assert!(at == end || start == end);
        }
        // A window ending exactly on the hour belongs to the hour before.
        assert_eq!(bucket(T0 + HOUR_NS, HOUR_NS), bucket(T0 + 1, HOUR_NS));
        assert_eq!(
            plan(T0, T0 + HOUR_NS, &tiers),
            vec![Part::Rollup {
                rollup: ROLLUP_STACK_H,
                lo: T0 / HOUR_NS,
                hi: T0 / HOUR_NS + 1
            }]
        );
    }

    #[test]
    fn rollups_answer_like_raw_rows_and_survive_retention() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut rng = Rng::new(42);
        let hours = 5;
        // Three agents, windows of 10 s (some end exactly on the hour),
        // sent in groups of random size, with duplicates.
        let mut pending = Vec::new();
        for w in 1..=hours * 360 {
            for agent in 0..3 {
                let end = T0 + w * 10 * S - if agent == 2 { 3 * S } else { 0 };
                pending.push(random_batch(&mut rng, agent, w as u64, end));
                if rng.below(5) == 0 {
                    pending.push(pending[pending.len() - 1].clone());
                }
                if rng.below(4) == 0 {
                    let results = store.insert_many(&pending);
                    assert!(results.iter().all(|r| r.is_ok()));
                    pending.clear();
                }
            }
        }
        store.insert_many(&pending);
        assert_eq!(store.rollup_mismatches().unwrap(), 0);
        check_queries(&store, &mut rng, hours, 150);

        // Retention at an unaligned time, on the hour, on a minute.
        for cutoff in [
            T0 + HOUR_NS + 17 * MINUTE_NS + 5 * S,
            T0 + 2 * HOUR_NS,
            T0 + 2 * HOUR_NS + 30 * MINUTE_NS,
        ] {
            store.retain(cutoff).unwrap();
            assert_eq!(
                store.rollup_mismatches().unwrap(),
                0,
                "after retain({cutoff})"
            );
            check_queries(&store, &mut rng, hours, 40);
        }
        // What retention deleted stays deleted, and ids stay right for new
        // batches after the cache was emptied.
        let b = random_batch(&mut rng, 1, 100_000, T0 + hours * HOUR_NS + 5 * S);
        assert!(matches!(store.insert(&b), Ok(Stored::New { .. })));
        assert_eq!(store.rollup_mismatches().unwrap(), 0);
        check_queries(&store, &mut rng, hours + 1, 40);
    }

    #[test]
    fn a_failing_batch_leaves_its_group_stored() {
        let mut store = SqliteStore::in_memory().unwrap();
        let mut rng = Rng::new(3);
        let old = random_batch(&mut rng, 0, 1, T0 + 10 * S);
        store.insert(&old).unwrap();
        store.retain(T0 + HOUR_NS).unwrap();
        let a = random_batch(&mut rng, 0, 2, T0 + 2 * HOUR_NS);
        let mut too_old = random_batch(&mut rng, 1, 3, T0 + 20 * S);
        too_old.stacks.push("only;in;the;failing;batch".into());
        too_old.samples.push(BatchSample {
            label_set: 0,
            stack: too_old.stacks.len() - 1,
            value: 1,
        });
        let b = random_batch(&mut rng, 2, 4, T0 + 2 * HOUR_NS);
        let results = store.insert_many(&[a.clone(), too_old, b.clone(), a.clone()]);
        assert!(matches!(results[0], Ok(Stored::New { .. })));
        assert!(matches!(results[1], Err(StoreError::TooOld)));
        assert!(matches!(results[2], Ok(Stored::New { .. })));
        assert!(
            matches!(results[3], Ok(Stored::Duplicate)),
            "same batch twice in a group"
        );
        let all = Selector::cpu(vec![], 0, T0 + 3 * HOUR_NS);
        assert_eq!(store.profile(&all).unwrap().total(), a.total() + b.total());
        assert_eq!(store.stats().unwrap().batches, 2);
        assert_eq!(store.rollup_mismatches().unwrap(), 0);
        // The stack of the failed batch was rolled back with it.
        let n: i64 = store
            .conn
            .query_row(
                "SELECT COUNT(*) FROM stacks WHERE folded = 'only;in;the;failing;batch'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0);
    }

    /// A database of schema `version` (1: raw rows; 2: with rollups) made
    /// by the statements of those versions, holding `batches` as
    /// collectors of that version wrote them (no types, `count` columns).
    fn old_database(path: &Path, version: usize, batches: &[ValidBatch]) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        let id = |sql: &str, text: &str| -> i64 {
            conn.execute(&format!("INSERT OR IGNORE {sql}"), [text])
                .unwrap();
            let table = sql.split_whitespace().nth(1).unwrap();
            let column = if table == "stacks" {
                "folded"
            } else {
                "canonical"
            };
            conn.query_row(
                &format!("SELECT id FROM {table} WHERE {column} = ?1"),
                [text],
                |r| r.get(0),
            )
            .unwrap()
        };
        for b in batches {
            conn.execute(
                "INSERT INTO batches (agent_id, sequence, node, agent_version, window_start,
                 window_end, frequency_hz, samples) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    b.agent_id,
                    b.sequence as i64,
                    b.node,
                    b.agent_version,
                    b.window_start_ns,
                    b.window_end_ns,
                    b.frequency_hz,
                    b.total() as i64
                ],
            )
            .unwrap();
            for sample in &b.samples {
                let stack = id("INTO stacks (folded) VALUES (?1)", &b.stacks[sample.stack]);
                let labels = &b.label_sets[sample.label_set];
                let set = id(
                    "INTO label_sets (canonical) VALUES (?1)",
                    &canonical(labels),
                );
                for (name, value) in labels {
                    conn.execute(
                        "INSERT OR IGNORE INTO labels (name, value, label_set_id) VALUES (?1, ?2, ?3)",
                        params![name, value, set],
                    )
                    .unwrap();
                }
                conn.execute(
                    "INSERT INTO samples (window_start, window_end, label_set_id, stack_id, count)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        b.window_start_ns,
                        b.window_end_ns,
                        set,
                        stack,
                        sample.value as i64
                    ],
                )
                .unwrap();
            }
        }
        if version >= 2 {
            conn.execute_batch(MIGRATIONS[1]).unwrap();
        }
        conn.pragma_update(None, "user_version", version as u32)
            .unwrap();
    }

    /// What `batches` add up to for `selector` (every batch is cpu).
    fn expected(batches: &[ValidBatch], selector: &Selector) -> Profile {
        let mut p = Profile::default();
        for b in batches {
            if b.window_end_ns <= selector.start_ns || b.window_end_ns > selector.end_ns {
                continue;
            }
            for s in &b.samples {
                let labels = &b.label_sets[s.label_set];
                if selector
                    .matchers
                    .iter()
                    .all(|m| labels.iter().any(|l| l == m))
                {
                    p.add(&b.stacks[s.stack], s.value);
                }
            }
        }
        p
    }

    #[test]
    fn the_migration_builds_rollups_for_existing_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let mut rng = Rng::new(9);
        let batches: Vec<ValidBatch> = (1..=400)
            .map(|w| random_batch(&mut rng, w % 3, w as u64, T0 + w * 10 * S))
            .collect();
        old_database(&path, 1, &batches);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as u32);
        assert_eq!(store.rollup_mismatches().unwrap(), 0);
        let n: i64 = store
            .conn
            .query_row("SELECT COUNT(*) FROM rollup_h", [], |r| r.get(0))
            .unwrap();
        assert!(n > 0);
        check_queries(&store, &mut rng, 2, 40);
        let all = Selector::cpu(vec![], T0, T0 + 2 * HOUR_NS);
        assert_eq!(store.profile(&all).unwrap(), expected(&batches, &all));
    }

    /// A store of the schema before sample types, with data: after the
    /// migration every row is `cpu`/`samples`, nothing is lost, the totals
    /// match, and batches of other types go beside them.
    #[test]
    fn the_migration_makes_existing_data_cpu_samples() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.db");
        let mut rng = Rng::new(11);
        let batches: Vec<ValidBatch> = (1..=500)
            .map(|w| random_batch(&mut rng, w % 3, w as u64, T0 + w * 10 * S))
            .collect();
        old_database(&path, 2, &batches);
        let old_rows: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM samples", [], |r| r.get(0))
            .unwrap();

        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), 3);
        assert_eq!(store.rollup_mismatches().unwrap(), 0);
        let stats = store.stats().unwrap();
        assert_eq!(
            (stats.batches, stats.sample_rows),
            (batches.len() as u64, old_rows as u64)
        );
        let (start, end) = (T0, T0 + 2 * HOUR_NS);
        assert_eq!(
            store.sample_types(start, end).unwrap(),
            vec![SampleType::cpu()]
        );
        for sel in selectors(&mut rng, start, end)
            .into_iter()
            .chain([Selector::cpu(
                vec![],
                T0 + 17 * S,
                T0 + HOUR_NS + 3 * MINUTE_NS,
            )])
        {
            let want = expected(&batches, &sel);
            assert_eq!(store.profile(&sel).unwrap(), want, "{sel:?}");
            assert_eq!(store.profile_raw(&sel).unwrap(), want, "{sel:?}");
        }
        let total: u64 = batches.iter().map(ValidBatch::total).sum();
        assert_eq!(
            store
                .profile(&Selector::cpu(vec![], start, end))
                .unwrap()
                .total(),
            total
        );
        let off_cpu = Selector {
            sample_type: "off_cpu".into(),
            ..Selector::cpu(vec![], start, end)
        };
        assert_eq!(store.profile(&off_cpu).unwrap(), Profile::default());

        // New batches of another type go beside the migrated ones.
        let mut b = random_batch(&mut rng, 0, 10_000, T0 + 30 * S);
        b.sample_type = SampleType::off_cpu();
        b.frequency_hz = 0;
        store.insert(&b).unwrap();
        assert_eq!(store.profile(&off_cpu).unwrap().total(), b.total());
        assert_eq!(
            store
                .profile(&Selector::cpu(vec![], start, end))
                .unwrap()
                .total(),
            total
        );
        assert_eq!(
            store.sample_types(start, end).unwrap(),
            vec![SampleType::cpu(), SampleType::off_cpu()]
        );
        assert_eq!(store.rollup_mismatches().unwrap(), 0);
    }
}
