//! The embedded store: SQLite (bundled), WAL journal, schema versioned with
//! `PRAGMA user_version` and migrated on start-up.
//!
//! Stacks and label sets are stored once and samples reference them; a batch
//! is stored in one transaction together with its (agent, sequence) id, so a
//! batch is either fully stored once or not at all, even across a crash.
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::{Store, StoreError, StoreStats};
use crate::model::{Profile, Selector, Stored, ValidBatch};

/// Schema migrations; entry N brings the schema from version N to N + 1.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Schema(format!("cannot create {}: {e}", dir.display())))?;
        }
        Self::with_connection(Connection::open(path)?)
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
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Self { conn };
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
            return Err(StoreError::Schema(format!(
                "database schema version {version} is newer than this collector supports ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as u32)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "migrated the store's schema");
        }
        Ok(())
    }
}

/// `name=value` lines: one text per distinct label set.
fn canonical(labels: &[(String, String)]) -> String {
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

impl Store for SqliteStore {
    fn insert(&mut self, batch: &ValidBatch) -> Result<Stored, StoreError> {
        let tx = self.conn.transaction()?;
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO batches
             (agent_id, sequence, node, agent_version, window_start, window_end, frequency_hz, samples)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                batch.agent_id,
                batch.sequence as i64,
                batch.node,
                batch.agent_version,
                batch.window_start_ns,
                batch.window_end_ns,
                batch.frequency_hz,
                batch.total() as i64,
            ],
        )?;
        if inserted == 0 {
            return Ok(Stored::Duplicate);
        }
        {
            let mut stack_insert =
                tx.prepare_cached("INSERT OR IGNORE INTO stacks (folded) VALUES (?1)")?;
            let mut stack_id = tx.prepare_cached("SELECT id FROM stacks WHERE folded = ?1")?;
            let mut set_insert =
                tx.prepare_cached("INSERT OR IGNORE INTO label_sets (canonical) VALUES (?1)")?;
            let mut set_id = tx.prepare_cached("SELECT id FROM label_sets WHERE canonical = ?1")?;
            let mut label_insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO labels (name, value, label_set_id) VALUES (?1, ?2, ?3)",
            )?;
            let mut sample_insert = tx.prepare_cached(
                "INSERT INTO samples (window_start, window_end, label_set_id, stack_id, count)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            // Database ids of the batch's label sets and stacks, resolved
            // once each on first use.
            let mut set_ids: Vec<Option<i64>> = vec![None; batch.label_sets.len()];
            let mut stack_ids: Vec<Option<i64>> = vec![None; batch.stacks.len()];
            for sample in &batch.samples {
                let set = match set_ids[sample.label_set] {
                    Some(id) => id,
                    None => {
                        let labels = &batch.label_sets[sample.label_set];
                        let text = canonical(labels);
                        let new = set_insert.execute([&text])? > 0;
                        let id: i64 = set_id.query_row([&text], |r| r.get(0))?;
                        if new {
                            for (name, value) in labels {
                                label_insert.execute(params![name, value, id])?;
                            }
                        }
                        set_ids[sample.label_set] = Some(id);
                        id
                    }
                };
                let stack = match stack_ids[sample.stack] {
                    Some(id) => id,
                    None => {
                        let folded = &batch.stacks[sample.stack];
                        stack_insert.execute([folded])?;
                        let id: i64 = stack_id.query_row([folded], |r| r.get(0))?;
                        stack_ids[sample.stack] = Some(id);
                        id
                    }
                };
                sample_insert.execute(params![
                    batch.window_start_ns,
                    batch.window_end_ns,
                    set,
                    stack,
                    sample.count as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(Stored::New {
            samples: batch.total(),
        })
    }

    fn label_names(&self, start_ns: i64, end_ns: i64) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT name FROM labels WHERE label_set_id IN
               (SELECT DISTINCT label_set_id FROM samples WHERE window_end > ?1 AND window_end <= ?2)
             ORDER BY name",
        )?;
        let rows = stmt.query_map(params![start_ns, end_ns], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn label_values(
        &self,
        name: &str,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT value FROM labels WHERE name = ?1 AND label_set_id IN
               (SELECT DISTINCT label_set_id FROM samples WHERE window_end > ?2 AND window_end <= ?3)
             ORDER BY value",
        )?;
        let rows = stmt.query_map(params![name, start_ns, end_ns], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn profile(&self, selector: &Selector) -> Result<Profile, StoreError> {
        // Sum per stack id first, then join the stack text once per stack:
        // joining first would carry every row's text through the grouping
        // (5-10x slower, docs/collector-benchmarks.md). Label sets must match
        // every matcher; values are bound, never spliced.
        let mut sql = String::from(
            "SELECT s.folded, t.total FROM (
               SELECT x.stack_id, SUM(x.count) AS total FROM samples x
               WHERE x.window_end > ?1 AND x.window_end <= ?2",
        );
        let mut args: Vec<rusqlite::types::Value> =
            vec![selector.start_ns.into(), selector.end_ns.into()];
        if !selector.matchers.is_empty() {
            sql.push_str(" AND x.label_set_id IN (");
            for (i, (name, value)) in selector.matchers.iter().enumerate() {
                if i > 0 {
                    sql.push_str(" INTERSECT ");
                }
                let n = args.len();
                sql.push_str(&format!(
                    "SELECT label_set_id FROM labels WHERE name = ?{} AND value = ?{}",
                    n + 1,
                    n + 2
                ));
                args.push(name.clone().into());
                args.push(value.clone().into());
            }
            sql.push(')');
        }
        sql.push_str(" GROUP BY x.stack_id) t JOIN stacks s ON s.id = t.stack_id");
        let mut stmt = self.conn.prepare(&sql)?;
        let mut profile = Profile::default();
        let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (stack, count) = row?;
            profile.add(&stack, count as u64);
        }
        Ok(profile)
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
        let samples = tx.execute("DELETE FROM samples WHERE window_end < ?1", [cutoff_ns])?;
        tx.execute("DELETE FROM batches WHERE window_end < ?1", [cutoff_ns])?;
        if samples > 0 {
            tx.execute(
                "DELETE FROM stacks WHERE id NOT IN (SELECT DISTINCT stack_id FROM samples)",
                [],
            )?;
            tx.execute(
                "DELETE FROM labels WHERE label_set_id NOT IN (SELECT DISTINCT label_set_id FROM samples)",
                [],
            )?;
            tx.execute(
                "DELETE FROM label_sets WHERE id NOT IN (SELECT DISTINCT label_set_id FROM samples)",
                [],
            )?;
        }
        tx.commit()?;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BatchSample;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut l: Vec<_> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        l.sort();
        l
    }

    fn batch(seq: u64, end_s: i64, process: &str, stack: &str, count: u64) -> ValidBatch {
        ValidBatch {
            agent_id: "a1".into(),
            sequence: seq,
            node: "n1".into(),
            agent_version: "0".into(),
            window_start_ns: (end_s - 10) * 1_000_000_000,
            window_end_ns: end_s * 1_000_000_000,
            frequency_hz: 99,
            label_sets: vec![labels(&[("node", "n1"), ("process", process)])],
            stacks: vec![stack.into()],
            samples: vec![BatchSample {
                label_set: 0,
                stack: 0,
                count,
            }],
        }
    }

    fn all(start_s: i64, end_s: i64, matchers: &[(&str, &str)]) -> Selector {
        Selector {
            matchers: matchers
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            start_ns: start_s * 1_000_000_000,
            end_ns: end_s * 1_000_000_000,
        }
    }

    #[test]
    fn stores_once_and_queries_by_label_and_time() {
        let mut store = SqliteStore::in_memory().unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as u32);
        assert_eq!(
            store.insert(&batch(1, 100, "app", "main;hot", 3)).unwrap(),
            Stored::New { samples: 3 }
        );
        assert_eq!(
            store.insert(&batch(1, 100, "app", "main;hot", 3)).unwrap(),
            Stored::Duplicate
        );
        store.insert(&batch(2, 200, "app", "main;hot", 2)).unwrap();
        store.insert(&batch(3, 200, "db", "main;io", 5)).unwrap();

        let p = store.profile(&all(0, 300, &[("process", "app")])).unwrap();
        assert_eq!(p.folded(), "main;hot 5\n");
        let p = store.profile(&all(0, 150, &[])).unwrap();
        assert_eq!(p.total(), 3, "only the first window ends in (0, 150]");
        let p = store.profile(&all(0, 300, &[])).unwrap();
        assert_eq!(p.total(), 10);
        assert_eq!(store.stats().unwrap().stacks, 2, "stacks are stored once");

        const S: i64 = 1_000_000_000;
        assert_eq!(
            store.label_names(0, 300 * S).unwrap(),
            vec!["node", "process"]
        );
        assert_eq!(
            store.label_values("process", 0, 300 * S).unwrap(),
            vec!["app", "db"]
        );
        assert_eq!(
            store.label_values("process", 195 * S, 300 * S).unwrap(),
            vec!["app", "db"]
        );
        assert_eq!(
            store.label_values("process", 0, 50 * S).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn hostile_label_values_are_just_values() {
        let mut store = SqliteStore::in_memory().unwrap();
        store.insert(&batch(1, 100, "app", "main", 1)).unwrap();
        let p = store
            .profile(&all(0, 300, &[("process", "'; DROP TABLE samples; --")]))
            .unwrap();
        assert_eq!(p.total(), 0);
        assert_eq!(store.profile(&all(0, 300, &[])).unwrap().total(), 1);
    }

    #[test]
    fn retention_deletes_old_windows_and_orphans() {
        let mut store = SqliteStore::in_memory().unwrap();
        store.insert(&batch(1, 100, "app", "old;stack", 1)).unwrap();
        store.insert(&batch(2, 200, "app", "new;stack", 1)).unwrap();
        assert_eq!(store.retain(150 * 1_000_000_000).unwrap(), 1);
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
