//! The SQLite store's run: ingest, size, materialized span, queries, and
//! its report section.
use std::{
    collections::HashMap,
    fmt::Write as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

#[allow(unused_imports)]
use super::*;

/// The SQLite store's run: ingest, size, materialized 24 h, queries.
pub(crate) async fn run_sqlite(
    args: Arc<Args>,
    collector_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Outcome> {
    let run_started = Instant::now();
    let default_db = args.db.is_none();
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench/collector-bench/bench.db"));
    if default_db {
        remove_db(&db);
    }
    let config = CollectorConfig {
        grpc_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        store: StoreLocation::Sqlite(db.clone()),
        agent_rate_limit: 0.0,
        ..CollectorConfig::default()
    };
    // The store's default (`--max-concurrent-batches`).
    let permits = 8;
    let c = collector_rt.spawn(server::start(config)).await??;
    let apps = Arc::new(apps(args.seed));
    let nodes: Arc<Vec<Node>> = Arc::new((0..args.agents).map(|a| node(a, &args)).collect());
    let windows = u64::from(args.hours.max(1)) * 360;
    let now = now_ns();
    let data_set = format!(
        "{} agents x {} windows of 10 s ({} h) = {} batches; {} processes per node, {:.0} samples per batch",
        args.agents,
        windows,
        args.hours,
        args.agents as u64 * windows,
        args.processes,
        8.0 * 19.0 * 10.0 * args.cpu_util
    );
    println!("data set: {data_set}");

    // (1) Ingest: one client, then several, over the loaded hours.
    let (one, many, next) = grpc_ingest(&c, &args, &nodes, &apps, now, windows, None).await?;
    let direct_load = if next.1 < windows {
        let path = db.clone();
        let d = load_direct(
            Box::new(move || Ok(Box::new(SqliteStore::open(&path)?) as Box<dyn Store>)),
            None,
            next,
            windows,
            args.clone(),
            nodes.clone(),
            apps.clone(),
            now,
        )?;
        println!(
            "store alone (insert_many, groups of up to {DIRECT_GROUP}): {} batches, {} samples in {:.1} s: {:.0} samples/s; \
             writer thread CPU {:.1} s = {:.0} samples per CPU-second; {} commits",
            d.batches,
            d.samples,
            d.secs,
            d.samples as f64 / d.secs.max(1e-9),
            d.cpu,
            d.samples as f64 / d.cpu.max(1e-9),
            d.commits
        );
        Some(d)
    } else {
        None
    };
    let samples =
        one.sent.samples + many.sent.samples + direct_load.as_ref().map(|d| d.samples).unwrap_or(0);
    let load_secs = run_started.elapsed().as_secs_f64();
    println!("load: {samples} samples in {load_secs:.1} s");

    // (3) Store size of the loaded data, after a checkpoint.
    let conn = rusqlite::Connection::open(&db)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    let size = std::fs::metadata(&db)?.len();
    let count = |t: &str| -> anyhow::Result<i64> {
        Ok(conn.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))?)
    };
    let sample_rows = count("samples")?;
    let rollup_rows = [
        count("rollup_h")?,
        count("rollup_stack_h")?,
        count("rollup_stack_m")?,
    ];
    let mib_per_m = size as f64 / (1 << 20) as f64 / (samples as f64 / 1e6);
    let by_table: Vec<(String, i64)> = conn
        .prepare("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_default();
    println!(
        "store: {:.1} MiB for {samples} samples: {mib_per_m:.1} MiB per million samples; {sample_rows} sample rows, rollup rows {rollup_rows:?}; by table {by_table:?}",
        size as f64 / (1 << 20) as f64,
    );

    // (2) The span the queries see: the loaded hours replicated back in time.
    let copies = (args.span_hours / args.hours.max(1)).max(1);
    let span_h = copies * args.hours.max(1);
    // Range ends mid-window and off the hour, as "now" is in practice.
    let end = now + WINDOW_NS / 2;
    let mut ranges: Vec<f64> = args
        .ranges
        .iter()
        .copied()
        .filter(|&r| r <= f64::from(span_h) + 1e-9)
        .collect();
    if ranges.is_empty() {
        ranges.push(f64::from(span_h));
    }
    let raw_needed: Vec<(i64, i64)> = ranges
        .iter()
        .map(|h| end - (h * HOUR_NS as f64) as i64)
        .filter(|&start| start < now - i64::from(args.hours) * HOUR_NS)
        .map(|start| (start, ceil_hour(start)))
        .collect();
    let mat = materialize(&db, now, args.hours.max(1), copies, &raw_needed)?;
    println!(
        "materialized {} copies of the loaded {} h in {:.1} s: rollup rows {:?}, {} raw rows for the ragged starts {:?}",
        mat.copies - 1,
        args.hours,
        mat.secs,
        mat.rollup_rows,
        mat.raw_rows,
        mat.raw_ranges
    );

    let selectors = selectors(&nodes, &apps);
    let direct = SqliteStore::open(&db)?;
    let mut figures: Vec<QueryFigures> = Vec::new();
    let mut checks: Vec<String> = Vec::new();
    let mut one_hour_totals: HashMap<String, u64> = HashMap::new();
    let mut raw_only_1h: Option<(Duration, Duration)> = None;
    for &hours in &ranges {
        let start = end - (hours * HOUR_NS as f64) as i64;
        for (label, sel) in &selectors {
            let (selector, profile, store_time, svg, folded) =
                time_query(&direct, c.http_addr, sel, start, end, args.runs).await?;
            let tiers: &[_] = if sel.is_empty() {
                &[ROLLUP_STACK_H, ROLLUP_STACK_M]
            } else {
                &[ROLLUP_H]
            };
            let parts = plan(start, end, tiers);
            let mut raw_rows_read = 0;
            for p in &parts {
                if let Part::Raw { start, end } = p {
                    raw_rows_read += direct.connection().query_row(
                        "SELECT COUNT(*) FROM samples WHERE window_end > ?1 AND window_end <= ?2",
                        [start, end],
                        |r| r.get::<_, i64>(0),
                    )?;
                }
            }
            // Checks: within the loaded hours rollups agree with raw rows;
            // the whole span holds `copies` times the loaded hours.
            if hours <= f64::from(args.hours) {
                let t = Instant::now();
                let raw = direct.profile_raw(&selector)?;
                let raw_time = t.elapsed();
                anyhow::ensure!(
                    raw == profile,
                    "{hours} h {label}: rollups differ from raw rows"
                );
                checks.push(format!(
                    "{hours} h {label}: the answer equals the raw-rows-only answer (raw only: {:.3} s)",
                    raw_time.as_secs_f64()
                ));
                if label == "all" && hours == 1.0 {
                    raw_only_1h = Some((raw_time, store_time));
                }
                one_hour_totals.insert(label.clone(), profile.total());
            } else if let Some(&loaded) = one_hour_totals.get(label) {
                let expected = loaded * u64::from(copies);
                anyhow::ensure!(
                    profile.total() == expected,
                    "{hours} h {label}: {} samples, expected {copies} x {loaded}",
                    profile.total()
                );
                checks.push(format!(
                    "{hours} h {label}: {} samples = {copies} copies x {loaded} loaded",
                    profile.total()
                ));
            }
            println!(
                "query {hours} h, {label}: svg {:.3} s, folded {:.3} s, store alone {:.3} s (medians of {}); {} samples, {} stacks; raw rows read {raw_rows_read}; plan: {}",
                svg.as_secs_f64(),
                folded.as_secs_f64(),
                store_time.as_secs_f64(),
                args.runs,
                profile.total(),
                profile.stacks.len(),
                plan_text(&parts, now)
            );
            figures.push(QueryFigures {
                hours,
                label: label.clone(),
                svg,
                folded,
                store: store_time,
                samples: profile.total(),
                stacks: profile.stacks.len(),
                raw_rows_read,
                plan: plan_text(&parts, now),
            });
        }
    }
    // How a selector reads the hourly rollup: one seek per (hour, label set).
    let mut explain = direct.connection().prepare(
        "EXPLAIN QUERY PLAN WITH RECURSIVE h(b) AS (SELECT ?1 UNION ALL SELECT b + 1 FROM h WHERE b + 1 < ?2),
         m(id) AS MATERIALIZED (SELECT label_set_id FROM labels WHERE name = 'process' AND value = 'java')
         SELECT r.stack_id, SUM(r.value) FROM h CROSS JOIN m CROSS JOIN rollup_h r
         WHERE r.hour = h.b AND r.type_id = 1 AND r.label_set_id = m.id GROUP BY r.stack_id",
    )?;
    let selector_plan: Vec<String> = explain
        .query_map([0i64, 1], |r| r.get::<_, String>(3))?
        .collect::<Result<_, _>>()?;
    drop(explain);
    println!("plan of a selector over the hourly rollup: {selector_plan:?}");
    for c in &checks {
        println!("check: {c}");
    }
    drop(direct);
    drop(conn);
    let collector_shutdown = c.shutdown();
    collector_rt.spawn(collector_shutdown).await??;
    let total_secs = run_started.elapsed().as_secs_f64();

    // Headline figures, for `cargo xtask bench`.
    let q24 = figures
        .iter()
        .filter(|f| f.hours == f64::from(span_h) && f.label == "all")
        .map(|f| f.svg.max(f.folded))
        .next();
    let per_cpu = (one.sent.samples + many.sent.samples) as f64
        / (one.collector_cpu + many.collector_cpu).max(1e-9);
    let bench_line = format!(
        "BENCH ingest_samples_per_s={per_cpu:.0} ingest_wall_samples_per_s={:.0} ingest_1client_samples_per_s={:.0} store_mib_per_m_samples={mib_per_m:.2}{}",
        many.rate(),
        one.rate(),
        q24.map(|d| format!(" query_{span_h}h_{}_s={:.4}", args.agents, d.as_secs_f64()))
            .unwrap_or_default()
    );
    println!("{bench_line}");

    let section = report(ReportData {
        direct: direct_load.as_ref(),
        args: &args,
        now,
        data_set: &data_set,
        one: &one,
        many: &many,
        per_cpu,
        permits,
        size,
        samples,
        sample_rows,
        rollup_rows,
        by_table: &by_table,
        mib_per_m,
        mat: &mat,
        span_h,
        figures: &figures,
        checks: &checks,
        selector_plan: &selector_plan,
        raw_only_1h,
        load_secs,
        total_secs,
    });
    if default_db {
        remove_db(&db);
        let _ = db.parent().map(std::fs::remove_dir);
    }
    Ok(Outcome {
        summary: Summary {
            store: "SQLite",
            per_cpu,
            per_cpu_with_server: None,
            one,
            many,
            direct: direct_load,
            mib_per_m,
            span_h,
            figures,
            total_secs,
        },
        section,
        bench_line,
    })
}

pub(crate) struct ReportData<'a> {
    pub(crate) direct: Option<&'a Direct>,
    pub(crate) args: &'a Args,
    pub(crate) now: i64,
    pub(crate) data_set: &'a str,
    pub(crate) one: &'a Load,
    pub(crate) many: &'a Load,
    pub(crate) per_cpu: f64,
    pub(crate) permits: usize,
    pub(crate) size: u64,
    pub(crate) samples: u64,
    pub(crate) sample_rows: i64,
    pub(crate) rollup_rows: [i64; 3],
    pub(crate) by_table: &'a [(String, i64)],
    pub(crate) mib_per_m: f64,
    pub(crate) mat: &'a Materialized,
    pub(crate) span_h: u32,
    pub(crate) figures: &'a [QueryFigures],
    pub(crate) checks: &'a [String],
    pub(crate) selector_plan: &'a [String],
    pub(crate) raw_only_1h: Option<(Duration, Duration)>,
    pub(crate) load_secs: f64,
    pub(crate) total_secs: f64,
}

pub(crate) fn met(value: f64, target: f64, higher_is_better: bool) -> String {
    let ratio = if higher_is_better {
        value / target
    } else {
        target / value.max(1e-9)
    };
    if ratio >= 1.0 {
        format!("**met** ({ratio:.1}× the target)")
    } else {
        format!("**missed** ({:.1}× short)", 1.0 / ratio.max(1e-9))
    }
}

pub(crate) fn report(d: ReportData) -> String {
    let a = d.args;
    let k = |x: f64| format!("{:.0} k", x / 1e3);
    let mut o = String::new();
    let _ = writeln!(o, "### SQLite store\n");
    let _ = writeln!(
        o,
        "What is measured: simulated agents (an 8-CPU node at 19 Hz, one batch per 10 s window, \
         ~30 processes with Zipf-weighted stacks of 15–40 frames, labels node/process/pid/exe and \
         container/pod/namespace) send zstd-compressed batches through the real gRPC server into \
         the embedded SQLite store (WAL, `synchronous=FULL`, group commit), default configuration \
         (`--max-concurrent-batches {}`) except the per-agent rate limit (off). \
         Collector CPU is that of the collector's own threads (its runtime and the store writer), \
         not of the clients and the batch generator in the same process.\n",
        d.permits
    );
    let _ = writeln!(
        o,
        "Data set: {}{}: {} samples, loaded in {:.0} s, {} batches of them through gRPC (the \
         ingest figures), the rest straight into the store with `Store::insert_many` (same \
         store code, no network: the machine's 2 vCPUs cannot generate, compress and send \
         36,000 batches in the time budget). \
         For the queries the loaded {} h were replicated inside the store to {} h \
         ({} copies shifted back by whole hours): **every rollup row** ({} `rollup_h`, {} `rollup_stack_h`, \
         {} `rollup_stack_m` rows added) but **raw sample rows only for the windows a measured \
         range's ragged start falls in** ({} rows, windows ending in {}), because 24 h of raw rows \
         (~{:.1} GiB) would not fit the time and disk budget. A query reads raw rows only for the \
         parts of its range that are not whole rollup buckets (the plans below list the parts and \
         the raw rows read), so the answer is the one a fully loaded store would give: the check \
         below compares its total with {} × the loaded hour's. Materializing took {:.1} s.\n",
        d.data_set,
        if a.quick { " (`--quick`)" } else { "" },
        d.samples,
        d.load_secs,
        d.one.sent.batches + d.many.sent.batches,
        a.hours,
        d.span_h,
        d.mat.copies - 1,
        d.mat.rollup_rows[0],
        d.mat.rollup_rows[1],
        d.mat.rollup_rows[2],
        d.mat.raw_rows,
        d.mat
            .raw_ranges
            .iter()
            .map(|(s, e)| format!(
                "(now{:+.3} h, now{:+.3} h]",
                (s - d.now) as f64 / HOUR_NS as f64,
                (e - d.now) as f64 / HOUR_NS as f64
            ))
            .collect::<Vec<_>>()
            .join(", "),
        d.size as f64 / (1u64 << 30) as f64 * f64::from(d.span_h / a.hours.max(1)),
        d.mat.copies,
        d.mat.secs
    );
    let q = |hours: f64, label: &str| {
        d.figures
            .iter()
            .find(|f| f.hours == hours && f.label == label)
    };
    let span = f64::from(d.span_h);
    let _ = writeln!(o, "| figure | measured | target |\n|---|---|---|");
    let _ = writeln!(
        o,
        "| ingest per CPU-second of the collector (all batches) | **{} samples/s** | ≥ 500 k samples/s on one core: {} |",
        k(d.per_cpu),
        met(d.per_cpu, 500e3, true)
    );
    let _ = writeln!(
        o,
        "| ingest, {} clients (wall clock, 2-vCPU machine shared with the clients) | {} samples/s, {:.0} batches/s, collector CPU {:.0} % of a core | |",
        a.clients,
        k(d.many.rate()),
        d.many.sent.batches as f64 / d.many.secs.max(1e-9),
        100.0 * d.many.collector_cpu / d.many.secs.max(1e-9)
    );
    if let Some(dl) = d.direct {
        let _ = writeln!(
            o,
            "| store alone: `insert_many` in groups of up to {DIRECT_GROUP} ({} batches, no gRPC) | {} samples/s, {} samples per CPU-second of the writing thread, {:.1} batches per commit | |",
            dl.batches,
            k(dl.samples as f64 / dl.secs.max(1e-9)),
            k(dl.samples as f64 / dl.cpu.max(1e-9)),
            dl.batches as f64 / dl.commits.max(1) as f64
        );
    }
    let _ = writeln!(
        o,
        "| ingest, 1 client (one batch in flight: one commit each) | {} samples/s, {:.0} batches/s | |",
        k(d.one.rate()),
        d.one.sent.batches as f64 / d.one.secs.max(1e-9)
    );
    let _ = writeln!(
        o,
        "| store size (loaded data, after a checkpoint) | {:.1} MiB per million samples ({:.1} MiB, {} sample rows, rollup rows {} / {} / {}) | |",
        d.mib_per_m,
        d.size as f64 / (1 << 20) as f64,
        d.sample_rows,
        d.rollup_rows[0],
        d.rollup_rows[1],
        d.rollup_rows[2]
    );
    if let Some(f) = q(span, "all") {
        let worst = f.svg.max(f.folded).as_secs_f64();
        let _ = writeln!(
            o,
            "| flame graph query, {} h × {} agents, all data (SVG / folded) | **{:.3} s** / {:.3} s | ≤ 1 s: {} |",
            d.span_h,
            a.agents,
            f.svg.as_secs_f64(),
            f.folded.as_secs_f64(),
            met(worst, 1.0, false)
        );
    }
    let _ = writeln!(o, "\nQuery latency (HTTP, median of {} runs; \"store\" = `SqliteStore::profile` alone; ranges end mid-window, off the hour):\n", a.runs);
    let _ = writeln!(
        o,
        "| range | selector | SVG | folded | store | samples | stacks | raw rows read | parts read |\n|---|---|---|---|---|---|---|---|---|"
    );
    for f in d.figures {
        let _ = writeln!(
            o,
            "| {} h | `{}` | {:.3} s | {:.3} s | {:.3} s | {} | {} | {} | {} |",
            f.hours,
            f.label,
            f.svg.as_secs_f64(),
            f.folded.as_secs_f64(),
            f.store.as_secs_f64(),
            f.samples,
            f.stacks,
            f.raw_rows_read,
            f.plan
        );
    }
    if let Some((raw, rolled)) = d.raw_only_1h {
        let _ = writeln!(
            o,
            "\nThe same 1 h all-data profile from raw rows only: {:.3} s (with rollups: {:.3} s).",
            raw.as_secs_f64(),
            rolled.as_secs_f64()
        );
    }
    let _ = writeln!(o, "\nChecks:\n");
    for c in d.checks {
        let _ = writeln!(o, "- {c}");
    }
    let _ = writeln!(
        o,
        "\nPlan of a selector over the hourly rollup (`EXPLAIN QUERY PLAN`): `{}`.\n",
        d.selector_plan.join("; ")
    );
    if !d.by_table.is_empty() {
        let _ = writeln!(
            o,
            "Store size by table and index (loaded data): {}.\n",
            d.by_table
                .iter()
                .take(8)
                .map(|(n, b)| format!("{n} {:.1} MiB", *b as f64 / (1 << 20) as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(o, "SQLite run: {:.0} s.", d.total_secs);
    o
}
