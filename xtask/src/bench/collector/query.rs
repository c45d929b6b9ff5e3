//! Queries over the HTTP API and the data they read: the loaded hours
//! replicated back in time, the selectors, median latencies.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[allow(unused_imports)]
use super::*;

/// Start of the hour bucket after `t`'s (the next hour boundary at or after `t`).
pub(crate) fn ceil_hour(t: i64) -> i64 {
    t.div_euclid(HOUR_NS) * HOUR_NS
        + if t.rem_euclid(HOUR_NS) == 0 {
            0
        } else {
            HOUR_NS
        }
}

/// What `materialize` wrote.
pub(crate) struct Materialized {
    pub(crate) copies: u32,
    pub(crate) rollup_rows: [i64; 3],
    pub(crate) raw_rows: i64,
    pub(crate) raw_ranges: Vec<(i64, i64)>,
    pub(crate) secs: f64,
}

/// Replicates the loaded `hours` (windows ending in `(now - hours, now]`)
/// `copies - 1` times, copy `c` shifted back by `c * hours` hours: every
/// rollup row (the shift is whole hours, so buckets map onto buckets), and
/// raw rows only for windows ending in `raw_ranges` (the ragged starts of
/// the measured queries).
pub(crate) fn materialize(
    db: &Path,
    now: i64,
    hours: u32,
    copies: u32,
    raw_ranges: &[(i64, i64)],
) -> anyhow::Result<Materialized> {
    let t = Instant::now();
    let mut conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let tx = conn.transaction()?;
    // Snapshots of the loaded data's rollups, so copies do not copy copies.
    tx.execute_batch(
        "CREATE TEMP TABLE src_h AS SELECT * FROM rollup_h;
         CREATE TEMP TABLE src_stack_h AS SELECT * FROM rollup_stack_h;
         CREATE TEMP TABLE src_stack_m AS SELECT * FROM rollup_stack_m;",
    )?;
    let mut rollup_rows = [0i64; 3];
    let mut raw_rows = 0i64;
    let loaded_from = now - i64::from(hours) * HOUR_NS;
    for c in 1..copies {
        let shift_h = i64::from(c * hours);
        // A copy's last (partial) hour is the next copy's first: upsert.
        rollup_rows[0] += tx.execute(
            "INSERT INTO rollup_h SELECT hour - ?1, type_id, label_set_id, stack_id, value FROM src_h
             WHERE true ON CONFLICT (hour, type_id, label_set_id, stack_id)
             DO UPDATE SET value = value + excluded.value",
            [shift_h],
        )? as i64;
        rollup_rows[1] += tx.execute(
            "INSERT INTO rollup_stack_h SELECT hour - ?1, type_id, stack_id, value FROM src_stack_h
             WHERE true ON CONFLICT (hour, type_id, stack_id) DO UPDATE SET value = value + excluded.value",
            [shift_h],
        )? as i64;
        rollup_rows[2] += tx.execute(
            "INSERT INTO rollup_stack_m SELECT minute - ?1, type_id, stack_id, value FROM src_stack_m
             WHERE true ON CONFLICT (minute, type_id, stack_id) DO UPDATE SET value = value + excluded.value",
            [shift_h * 60],
        )? as i64;
        let shift = shift_h * HOUR_NS;
        for &(a, b) in raw_ranges {
            raw_rows += tx.execute(
                "INSERT INTO samples (window_start, window_end, type_id, label_set_id, stack_id, value)
                 SELECT window_start - ?1, window_end - ?1, type_id, label_set_id, stack_id, value
                 FROM samples
                 WHERE window_end > ?2 AND window_end - ?1 > ?3 AND window_end - ?1 <= ?4",
                [shift, loaded_from, a, b],
            )? as i64;
        }
    }
    tx.execute_batch("DROP TABLE src_h; DROP TABLE src_stack_h; DROP TABLE src_stack_m;")?;
    tx.commit()?;
    Ok(Materialized {
        copies,
        rollup_rows,
        raw_rows,
        raw_ranges: raw_ranges.to_vec(),
        secs: t.elapsed().as_secs_f64(),
    })
}

/// One query's figures.
pub(crate) struct QueryFigures {
    pub(crate) hours: f64,
    pub(crate) label: String,
    pub(crate) svg: Duration,
    pub(crate) folded: Duration,
    pub(crate) store: Duration,
    pub(crate) samples: u64,
    pub(crate) stacks: usize,
    /// Raw rows in the ragged parts the store read, and the plan.
    pub(crate) raw_rows_read: i64,
    pub(crate) plan: String,
}

pub(crate) fn plan_text(parts: &[Part], now: i64) -> String {
    let rel = |t: i64| format!("now{:+.3}h", (t - now) as f64 / HOUR_NS as f64);
    parts
        .iter()
        .map(|p| match p {
            Part::Raw { start, end } => format!("raw samples ({}, {}]", rel(*start), rel(*end)),
            Part::Rollup { rollup, lo, hi } => format!(
                "{} {} buckets ({}, {}]",
                rollup.table,
                hi - lo,
                rel(lo * rollup.grain),
                rel(hi * rollup.grain)
            ),
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

pub(crate) fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(crate) async fn http_median(url: String, runs: usize) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let u = url.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
            let mut r = ureq::get(&u).call()?;
            Ok(r.body_mut()
                .with_config()
                .limit(1 << 30)
                .read_to_vec()?
                .len())
        })
        .await??;
        times.push(t.elapsed());
    }
    Ok(median_duration(&times))
}

pub(crate) fn remove_db(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// The measured selectors: all data, one process name, one pod.
pub(crate) fn selectors(nodes: &[Node], apps: &[App]) -> [(String, String); 3] {
    let pod = nodes[0]
        .procs
        .iter()
        .enumerate()
        .find(|(_, p)| p.containerized)
        .map(|(i, p)| format!("{}-{}-{i}", apps[p.app].name, nodes[0].name))
        .unwrap_or_else(|| "postgres".into());
    [
        ("all".to_string(), String::new()),
        (
            "{process=\"java\"}".to_string(),
            "{process=\"java\"}".to_string(),
        ),
        (format!("{{pod=\"{pod}\"}}"), format!("{{pod=\"{pod}\"}}")),
    ]
}
