//! The ClickHouse store's run against a private `clickhouse-server`
//! (profiler-testkit), whose CPU counts too, and its report section.
use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

#[allow(unused_imports)]
use super::*;

// ClickHouse

/// What the private server is (Debian's package, `cargo xtask setup`).
pub(crate) const CLICKHOUSE_VERSION_TEXT: &str = "(Debian's 18.16.1)";
/// The database the ClickHouse run writes.
pub(crate) const CH_DB: &str = "collector_bench";
/// Timeout of the bench's own statements (copies take long on 2 vCPUs).
pub(crate) const CH_STATEMENT_TIMEOUT: Duration = Duration::from_secs(900);

/// Runs one statement over ClickHouse's HTTP interface with `settings` as
/// URL parameters; returns the body.
pub(crate) fn ch(port: u16, sql: &str, settings: &[(&str, &str)]) -> anyhow::Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(CH_STATEMENT_TIMEOUT))
        .build()
        .into();
    let mut url = format!("http://127.0.0.1:{port}/?");
    for (k, v) in settings {
        url.push_str(&format!("{k}={}&", enc(v)));
    }
    let mut resp = agent.post(&url).send(sql)?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_string()?;
    anyhow::ensure!(status == 200, "ClickHouse: {sql}: HTTP {status}: {body}");
    Ok(body)
}

/// Median wall time of `runs` runs of `sql` (answer discarded).
pub(crate) fn ch_time(port: u16, sql: &str, runs: usize) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        ch(port, sql, &[])?;
        times.push(t.elapsed());
    }
    Ok(median_duration(&times))
}

/// The `hour`/`window_end` condition the store puts on a range
/// `(start, end]` (as `ClickHouseStore::range`).
pub(crate) fn ch_range(start: i64, end: i64) -> String {
    format!(
        "hour >= {} AND hour <= {} AND window_end > {start} AND window_end <= {end}",
        start.div_euclid(HOUR_NS),
        (end - 1).div_euclid(HOUR_NS)
    )
}

/// The day partitions of `stacks`/`label_sets` for `(start, end]` (as
/// `ClickHouseStore::days`).
pub(crate) fn ch_days(start: i64, end: i64) -> String {
    format!(
        "day >= {} AND day <= {}",
        start.div_euclid(24 * HOUR_NS),
        (end - 1).div_euclid(HOUR_NS).div_euclid(24)
    )
}

/// Waits (at most `cap`) until the database has no merge running, so the
/// figures that follow do not share the CPUs with merges of the rows just
/// written; returns the wait and the active parts of `samples` then.
pub(crate) fn ch_settle(port: u16, cap: Duration) -> anyhow::Result<(Duration, u64)> {
    let t = Instant::now();
    let n = |sql: &str| -> anyhow::Result<u64> { Ok(ch(port, sql, &[])?.trim().parse()?) };
    while n(&format!(
        "SELECT count() FROM system.merges WHERE database = '{CH_DB}'"
    ))? > 0
        && t.elapsed() < cap
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let parts = n(&format!(
        "SELECT count() FROM system.parts WHERE active AND database = '{CH_DB}' AND table = 'samples'"
    ))?;
    Ok((t.elapsed(), parts))
}

/// The server's counters shown for the load.
pub(crate) const CH_EVENTS: [&str; 9] = [
    "Query",
    "SelectQuery",
    "InsertQuery",
    "InsertedRows",
    "Merge",
    "MergedRows",
    "MergesTimeMilliseconds",
    "CompressedReadBufferBytes",
    "WriteBufferFromFileDescriptorWriteBytes",
];

/// The server's `system.events` counters.
pub(crate) fn ch_events(port: u16) -> anyhow::Result<HashMap<String, i64>> {
    Ok(ch(
        port,
        "SELECT event, value FROM system.events FORMAT TSV",
        &[],
    )?
    .lines()
    .filter_map(|l| {
        let (k, v) = l.split_once('\t')?;
        Some((k.to_string(), v.trim().parse().ok()?))
    })
    .collect())
}

/// What `ch_materialize` wrote.
pub(crate) struct ChMaterialized {
    pub(crate) copies: u32,
    pub(crate) sample_rows: u64,
    pub(crate) text_days: Vec<i64>,
    pub(crate) secs: f64,
}

/// Replicates the loaded hours `copies - 1` times inside ClickHouse, copy
/// `k` shifted back `k * hours` hours: every row (sample and registry rows)
/// with its hour and window moved, the registry rows' `sequence` made
/// unique per copy (+ k * 1e9) and every row's `write_id` changed per copy
/// (xor k), so the queries' duplicate-write guard sees distinct batches;
/// then the texts of stacks and label sets are copied into the day
/// partitions the copies landed in.
pub(crate) fn ch_materialize(
    port: u16,
    now: i64,
    hours: u32,
    copies: u32,
) -> anyhow::Result<ChMaterialized> {
    let t = Instant::now();
    let loaded_from = now - i64::from(hours) * HOUR_NS;
    let count = |sql: &str| -> anyhow::Result<u64> { Ok(ch(port, sql, &[])?.trim().parse()?) };
    let before = count(&format!("SELECT count() FROM {CH_DB}.samples"))?;
    // Large insert blocks: a few parts per copy, not one per million rows
    // (ClickHouse refuses inserts past 300 parts in a partition).
    let settings = [
        ("min_insert_block_size_rows", "16777216"),
        ("min_insert_block_size_bytes", "4294967296"),
    ];
    for k in 1..copies {
        let shift_h = i64::from(k * hours);
        let shift = shift_h * HOUR_NS;
        ch(
            port,
            &format!(
                "INSERT INTO {CH_DB}.samples
                 SELECT hour - {shift_h}, label_set_id, window_end - {shift}, stack_id, count,
                        bitXor(write_id, {k}), window_start - {shift}, agent_id,
                        if(label_set_id = 0, sequence + {k} * 1000000000, sequence),
                        node, agent_version, frequency_hz, sample_type, unit
                 FROM {CH_DB}.samples WHERE window_end > {loaded_from}"
            ),
            &settings,
        )?;
    }
    let days = |sql: &str| -> anyhow::Result<Vec<i64>> {
        ch(port, sql, &[])?
            .lines()
            .map(|l| Ok(l.trim().parse()?))
            .collect()
    };
    let loaded_days = days(&format!("SELECT DISTINCT day FROM {CH_DB}.stacks"))?;
    let text_days: Vec<i64> = days(&format!(
        "SELECT DISTINCT intDiv(hour, 24) AS d FROM {CH_DB}.samples ORDER BY d"
    ))?
    .into_iter()
    .filter(|d| !loaded_days.contains(d))
    .collect();
    let loaded = loaded_days
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    for d in &text_days {
        ch(
            port,
            &format!(
                "INSERT INTO {CH_DB}.stacks SELECT {d}, stack_id, any(folded)
                 FROM {CH_DB}.stacks WHERE day IN ({loaded}) GROUP BY stack_id"
            ),
            &[],
        )?;
        ch(
            port,
            &format!(
                "INSERT INTO {CH_DB}.label_sets SELECT {d}, label_set_id, any(names), any(values)
                 FROM {CH_DB}.label_sets WHERE day IN ({loaded}) GROUP BY label_set_id"
            ),
            &[],
        )?;
    }
    let after = count(&format!("SELECT count() FROM {CH_DB}.samples"))?;
    Ok(ChMaterialized {
        copies,
        sample_rows: after - before,
        text_days,
        secs: t.elapsed().as_secs_f64(),
    })
}

/// Bytes on disk of the database's active parts, by table: (table, bytes,
/// rows, parts).
pub(crate) fn ch_parts(port: u16) -> anyhow::Result<Vec<(String, u64, u64, u64)>> {
    ch(
        port,
        &format!(
            "SELECT table, sum(bytes_on_disk), sum(rows), count() FROM system.parts
             WHERE active AND database = '{CH_DB}' GROUP BY table ORDER BY 2 DESC FORMAT TSV"
        ),
        &[],
    )?
    .lines()
    .map(|l| {
        let f: Vec<&str> = l.split('\t').collect();
        anyhow::ensure!(f.len() == 4, "bad system.parts line {l:?}");
        Ok((
            f[0].to_string(),
            f[1].parse()?,
            f[2].parse()?,
            f[3].parse()?,
        ))
    })
    .collect()
}

/// One flame graph query timed three ways (medians of `runs`): the store
/// alone, and over the HTTP API as SVG and as folded text.
pub(crate) async fn time_query(
    store: &dyn Store,
    http: std::net::SocketAddr,
    sel: &str,
    start: i64,
    end: i64,
    runs: usize,
) -> anyhow::Result<(
    Selector,
    profiler_collector::model::Profile,
    Duration,
    Duration,
    Duration,
)> {
    let selector = Selector::cpu(
        profiler_collector::selection::parse_selector(sel).map_err(anyhow::Error::msg)?,
        start,
        end,
    );
    let mut times = Vec::new();
    let mut profile = profiler_collector::model::Profile::default();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        profile = store.profile(&selector)?;
        times.push(t.elapsed());
    }
    let url = |endpoint: &str| {
        let mut q = format!(
            "http://{http}/api/v1/{endpoint}?start={:.3}&end={:.3}",
            start as f64 / 1e9,
            end as f64 / 1e9
        );
        if !sel.is_empty() {
            q.push_str(&format!("&query={}", enc(sel)));
        }
        q
    };
    let svg = http_median(url("flamegraph.svg"), runs).await?;
    let folded = http_median(url("folded"), runs).await?;
    Ok((selector, profile, median_duration(&times), svg, folded))
}

/// One part of a query's time.
pub(crate) struct Piece {
    pub(crate) what: String,
    pub(crate) time: Duration,
    pub(crate) note: String,
}

/// Where the time of the store's all-data (and one selector's) profile
/// query over `(start, end]` goes: the statements `ClickHouseStore::profile`
/// sends (`profile_sql`), timed one by one, and parts of them.
pub(crate) fn ch_breakdown(
    port: u16,
    store: &ClickHouseStore,
    start: i64,
    end: i64,
    selector: Option<(&str, &str)>,
    runs: usize,
) -> anyhow::Result<Vec<Piece>> {
    let db = CH_DB;
    let range = ch_range(start, end);
    let days = ch_days(start, end);
    let sql = store
        .profile_sql(&Selector {
            sample_type: "cpu".into(),
            matchers: selector
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            start_ns: start,
            end_ns: end,
        })
        .ok_or_else(|| anyhow::anyhow!("empty range"))?;
    let sets = match selector {
        Some((name, value)) => format!(
            "AND label_set_id IN (SELECT label_set_id FROM {db}.label_sets WHERE {days} AND \
             has(names, '{name}') AND values[indexOf(names, '{name}')] = '{value}')"
        ),
        None => String::new(),
    };
    let scan = format!(
        "SELECT sum(count) FROM {db}.samples WHERE {range} AND label_set_id != 0 {sets} FORMAT Null"
    );
    let n = |sql: String| -> anyhow::Result<u64> { Ok(ch(port, &sql, &[])?.trim().parse()?) };
    let rows = n(format!(
        "SELECT count() FROM {db}.samples WHERE {range} AND label_set_id != 0 {sets}"
    ))?;
    let registry = ch(port, &sql.registry, &[])?;
    let ids = ch(
        port,
        &format!(
            "SELECT DISTINCT stack_id FROM {db}.samples WHERE {range} AND label_set_id != 0 {sets}"
        ),
        &[],
    )?;
    let ids: Vec<&str> = ids.lines().collect();
    let texts = format!(
        "SELECT stack_id, any(folded) FROM {db}.stacks WHERE {days} AND stack_id IN ({})
         GROUP BY stack_id FORMAT Null",
        ids.join(", ")
    );
    let t_registry = ch_time(port, &format!("{} FORMAT Null", sql.registry), runs)?;
    let t_sum = ch_time(port, &format!("{} FORMAT Null", sql.sum), runs)?;
    let t_guarded = ch_time(port, &format!("{} FORMAT Null", sql.sum_guarded), runs)?;
    let t_scan = ch_time(port, &scan, runs)?;
    let t_texts = ch_time(port, &texts, runs)?;
    let mut pieces = vec![
        Piece {
            what: "registry rows of the range: any batch written twice?".into(),
            time: t_registry,
            note: format!(
                "writes and batches: {}",
                registry.trim().replace('\t', " and ")
            ),
        },
        Piece {
            what: "sum per stack, as the store sends it without duplicate writes".into(),
            time: t_sum,
            note: format!("{rows} sample rows in the range"),
        },
        Piece {
            what: "— the same with the duplicate-write guard (`write_id NOT IN …`), sent only when a batch of the range was written twice".into(),
            time: t_guarded,
            note: format!(
                "the guard would cost {:+.3} s",
                t_guarded.as_secs_f64() - t_sum.as_secs_f64()
            ),
        },
        Piece {
            what: "— reading `count` of the range alone (no grouping)".into(),
            time: t_scan,
            note: String::new(),
        },
        Piece {
            what: "stack texts of the answer (`stacks`, by id)".into(),
            time: t_texts,
            note: format!("{} stacks", ids.len()),
        },
    ];
    if let Some((name, value)) = selector {
        let t_sets = ch_time(
            port,
            &format!(
                "SELECT label_set_id FROM {db}.label_sets WHERE {days} AND has(names, '{name}') \
                 AND values[indexOf(names, '{name}')] = '{value}' FORMAT Null"
            ),
            runs,
        )?;
        pieces.push(Piece {
            what: "matching label sets alone".into(),
            time: t_sets,
            note: String::new(),
        });
    }
    Ok(pieces)
}

/// The ClickHouse store's run: a private server, ingest through the
/// collector, size, the loaded hour replicated to the span, queries and
/// where the span query's time goes.
pub(crate) async fn run_clickhouse(
    args: Arc<Args>,
    collector_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Outcome> {
    let run_started = Instant::now();
    let server = tokio::task::spawn_blocking(ClickHouse::start).await?;
    let port = server.http_port();
    let pid = server.pid();
    let server_version = ch(port, "SELECT version()", &[])?.trim().to_string();
    // What the server burns with nothing to do (its background threads):
    // part of its CPU during a slow ingest.
    let idle_secs = if args.quick { 1.0 } else { 5.0 };
    let idle0 = pid.map(pid_cpu).unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
    let idle_share = (pid.map(pid_cpu).unwrap_or(0.0) - idle0) / idle_secs;
    println!(
        "clickhouse: idle server CPU {:.1} % of a core",
        idle_share * 100.0
    );
    println!(
        "clickhouse: private server {server_version} on port {port} (pid {pid:?}), started in {:.1} s",
        run_started.elapsed().as_secs_f64()
    );
    let url: ClickHouseUrl = server
        .store_url(CH_DB)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let config = CollectorConfig {
        grpc_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        store: StoreLocation::ClickHouse(url.clone()),
        agent_rate_limit: 0.0,
        ..CollectorConfig::default()
    };
    let retention = config.retention;
    // The store's default (`--max-concurrent-batches`).
    let permits = ClickHouseStore::open(&url, retention)?.default_in_flight();
    // The collector's writer starts a ClickHouse write at most once per
    // `interval` (so batches join larger inserts): one client then sends
    // at most 1/interval batches a second and all clients together
    // `permits`/interval. The gRPC part is cut to ~20 s (1 client) and ~45 s
    // (the others) at those rates (2 s and 4 s in a quick run); the rest
    // of the hour goes straight into the store as for SQLite.
    let interval = ClickHouseStore::open(&url, retention)?
        .min_write_interval()
        .as_secs_f64();
    let args = if interval > 0.0 {
        let (one_s, many_s) = if args.quick { (2.0, 4.0) } else { (20.0, 45.0) };
        let mut a = (*args).clone();
        a.single_client_batches = a.single_client_batches.min((one_s / interval) as usize);
        let many = (many_s * permits as f64 / interval) as usize;
        a.grpc_batches = a.single_client_batches
            + a.grpc_batches
                .saturating_sub(a.single_client_batches)
                .min(many);
        Arc::new(a)
    } else {
        args
    };
    let c = collector_rt.spawn(server::start(config)).await??;
    let apps = Arc::new(apps(args.seed));
    let nodes: Arc<Vec<Node>> = Arc::new((0..args.agents).map(|a| node(a, &args)).collect());
    let windows = u64::from(args.hours.max(1)) * 360;
    let now = now_ns();

    // (1) Ingest through gRPC, then the rest straight into the store (not
    // in a quick run: the smoke run's time budget).
    let events0 = ch_events(port)?;
    let (one, many, next) = grpc_ingest(&c, &args, &nodes, &apps, now, windows, pid).await?;
    let direct = if next.1 < windows && !args.quick {
        let u = url.clone();
        let d = load_direct(
            Box::new(move || Ok(Box::new(ClickHouseStore::open(&u, retention)?) as Box<dyn Store>)),
            pid,
            next,
            windows,
            args.clone(),
            nodes.clone(),
            apps.clone(),
            now,
        )?;
        println!(
            "clickhouse store alone: {} batches, {} samples in {:.1} s; writer thread CPU {:.1} s, server CPU {:.1} s",
            d.batches, d.samples, d.secs, d.cpu, d.server_cpu
        );
        Some(d)
    } else {
        None
    };
    let samples =
        one.sent.samples + many.sent.samples + direct.as_ref().map(|d| d.samples).unwrap_or(0);
    let load_secs = run_started.elapsed().as_secs_f64();
    let events1 = ch_events(port)?;
    let server_work: Vec<String> = CH_EVENTS
        .iter()
        .filter_map(|e| {
            let d = events1.get(*e).copied().unwrap_or(0) - events0.get(*e).copied().unwrap_or(0);
            (d > 0).then(|| format!("{e} {d}"))
        })
        .collect();
    println!("clickhouse server work during the load: {server_work:?}");

    // (3) Size of the loaded data, once merges are done.
    let cap = Duration::from_secs(if args.quick { 10 } else { 60 });
    let (settled_load, _) = ch_settle(port, cap)?;
    let parts = ch_parts(port)?;
    let size: u64 = parts.iter().map(|p| p.1).sum();
    let mib_per_m = size as f64 / (1 << 20) as f64 / (samples as f64 / 1e6);
    let columns = ch(
        port,
        &format!(
            "SELECT name, data_compressed_bytes, data_uncompressed_bytes FROM system.columns
             WHERE database = '{CH_DB}' AND table = 'samples' ORDER BY data_compressed_bytes DESC FORMAT TSV"
        ),
        &[],
    )?;
    let columns: Vec<String> = columns
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let (c, u) = (
                f.get(1)?.parse::<f64>().ok()?,
                f.get(2)?.parse::<f64>().ok()?,
            );
            Some(format!(
                "`{}` {:.1} MiB ({:.1} MiB uncompressed)",
                f[0],
                c / (1 << 20) as f64,
                u / (1 << 20) as f64
            ))
        })
        .collect();
    println!(
        "clickhouse store: {:.1} MiB for {samples} samples: {mib_per_m:.1} MiB per million samples; parts {parts:?}",
        size as f64 / (1 << 20) as f64
    );

    // (2) The span: the loaded hours replicated back in time.
    let copies = (args.span_hours / args.hours.max(1)).max(1);
    let span_h = copies * args.hours.max(1);
    let mat = ch_materialize(port, now, args.hours.max(1), copies)?;
    println!(
        "clickhouse: materialized {} copies ({} rows) in {:.1} s; texts copied to days {:?}",
        mat.copies - 1,
        mat.sample_rows,
        mat.secs,
        mat.text_days
    );
    let cap = Duration::from_secs(if args.quick { 20 } else { 300 });
    let (settled, parts_left) = ch_settle(port, cap)?;
    println!(
        "clickhouse: merges settled in {:.1} s; {parts_left} active parts of samples",
        settled.as_secs_f64()
    );
    let parts_after = ch_parts(port)?;
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
    let selectors = selectors(&nodes, &apps);
    let direct_store = ClickHouseStore::open(&url, retention)?;
    let mut figures = Vec::new();
    let mut checks = Vec::new();
    let mut one_hour_totals: HashMap<String, u64> = HashMap::new();
    for &hours in &ranges {
        let start = end - (hours * HOUR_NS as f64) as i64;
        for (label, sel) in &selectors {
            let (_, profile, store_time, svg, folded) =
                time_query(&direct_store, c.http_addr, sel, start, end, args.runs).await?;
            if hours <= f64::from(args.hours) {
                if label == "all" && hours == f64::from(args.hours) {
                    anyhow::ensure!(
                        profile.total() == samples,
                        "clickhouse {hours} h all: {} samples, {samples} loaded",
                        profile.total()
                    );
                    checks.push(format!(
                        "{hours} h all: {} samples = the samples loaded",
                        profile.total()
                    ));
                }
                one_hour_totals.insert(label.clone(), profile.total());
            } else if let Some(&loaded) = one_hour_totals.get(label) {
                let expected = loaded * u64::from(copies);
                anyhow::ensure!(
                    profile.total() == expected,
                    "clickhouse {hours} h {label}: {} samples, expected {copies} x {loaded}: \
                     the copies are not all counted",
                    profile.total()
                );
                checks.push(format!(
                    "{hours} h {label}: {} samples = {copies} copies x {loaded} loaded",
                    profile.total()
                ));
            }
            println!(
                "clickhouse query {hours} h, {label}: svg {:.3} s, folded {:.3} s, store alone {:.3} s (medians of {}); {} samples, {} stacks",
                svg.as_secs_f64(),
                folded.as_secs_f64(),
                store_time.as_secs_f64(),
                args.runs,
                profile.total(),
                profile.stacks.len()
            );
            figures.push(QueryFigures {
                hours,
                label: label.clone(),
                svg,
                folded,
                store: store_time,
                samples: profile.total(),
                stacks: profile.stacks.len(),
                raw_rows_read: 0,
                plan: String::new(),
            });
        }
    }
    // Where the span query's time goes.
    let span_start = end - i64::from(span_h) * HOUR_NS;
    let pieces_all = ch_breakdown(port, &direct_store, span_start, end, None, args.runs)?;
    let pieces_java = ch_breakdown(
        port,
        &direct_store,
        span_start,
        end,
        Some(("process", "java")),
        args.runs,
    )?;
    for p in pieces_all.iter().chain(&pieces_java) {
        println!(
            "clickhouse {span_h} h breakdown: {}: {:.3} s {}",
            p.what,
            p.time.as_secs_f64(),
            p.note
        );
    }
    for c in &checks {
        println!("check (clickhouse): {c}");
    }
    drop(direct_store);
    let collector_shutdown = c.shutdown();
    collector_rt.spawn(collector_shutdown).await??;
    let total_secs = run_started.elapsed().as_secs_f64();
    drop(server);

    let per_cpu = (one.sent.samples + many.sent.samples) as f64
        / (one.collector_cpu + many.collector_cpu).max(1e-9);
    let per_cpu_with_server = (one.sent.samples + many.sent.samples) as f64
        / (one.collector_cpu + many.collector_cpu + one.server_cpu + many.server_cpu).max(1e-9);
    let q_span = figures
        .iter()
        .find(|f| f.hours == f64::from(span_h) && f.label == "all")
        .map(|f| f.svg.max(f.folded));
    let bench_line = format!(
        "BENCH clickhouse_ingest_samples_per_s={per_cpu:.0} clickhouse_ingest_total_cpu_samples_per_s={per_cpu_with_server:.0} clickhouse_ingest_wall_samples_per_s={:.0} clickhouse_ingest_1client_samples_per_s={:.0} clickhouse_store_mib_per_m_samples={mib_per_m:.2}{}",
        many.rate(),
        one.rate(),
        q_span
            .map(|d| format!(
                " clickhouse_query_{span_h}h_{}_s={:.4}",
                args.agents,
                d.as_secs_f64()
            ))
            .unwrap_or_default()
    );
    println!("{bench_line}");

    // The section.
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut o = String::new();
    let _ = writeln!(o, "### ClickHouse store\n");
    let _ = writeln!(
        o,
        "Same data set and clients as the SQLite run{}, through the collector with \
         `--store clickhouse://127.0.0.1:PORT/{CH_DB}` (default configuration, \
         `--max-concurrent-batches {permits}`, per-agent rate limit off) into a private \
         ClickHouse {server_version} on this machine. {} batches went through gRPC, {}; \
         {samples} samples loaded in {load_secs:.0} s. \
         *Server CPU* is the clickhouse-server process's user + system time over the same \
         interval (its inserts and background merges; idle, before the load, it used {:.1} % \
         of a core).{}\n",
        if args.quick { " (`--quick`)" } else { "" },
        one.sent.batches + many.sent.batches,
        if direct.is_some() {
            format!(
                "the rest straight into `ClickHouseStore::insert_many` (groups of up to {DIRECT_GROUP})"
            )
        } else {
            "and no more (a quick run loads only those, to fit the smoke run's time)".into()
        },
        idle_share * 100.0,
        if interval > 0.0 {
            format!(
                " The collector starts a write to ClickHouse at most once per {:.0} ms \
                 (`Store::min_write_interval`: batches arriving meanwhile join the next insert, \
                 so ClickHouse makes few parts), so one client gets at most {:.0} batches/s and \
                 all clients together {permits} batches (the `--max-concurrent-batches` \
                 permits) per write: the gRPC part is {} + {} batches here, not SQLite's, to \
                 fit the time budget.",
                interval * 1e3,
                1.0 / interval,
                one.sent.batches,
                many.sent.batches
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        o,
        "| figure | measured |\n|---|---|\n\
         | ingest, 1 client | {:.0} k samples/s; collector {:.1} CPU-s, server {:.1} CPU-s |\n\
         | ingest, {} clients | {:.0} k samples/s, {:.0} batches/s; collector {:.1} CPU-s ({:.0} % of a core), server {:.1} CPU-s ({:.0} % of a core); {:.1} batches per insert group, {:.1} ms each |\n\
         | per CPU-second, all gRPC batches | {:.0} k samples (collector), {:.0} k (collector + server) |",
        one.rate() / 1e3,
        one.collector_cpu,
        one.server_cpu,
        args.clients,
        many.rate() / 1e3,
        many.sent.batches as f64 / many.secs.max(1e-9),
        many.collector_cpu,
        100.0 * many.collector_cpu / many.secs.max(1e-9),
        many.server_cpu,
        100.0 * many.server_cpu / many.secs.max(1e-9),
        many.sent.batches as f64 / many.commits.max(1) as f64,
        1e3 * many.write_secs / many.commits.max(1) as f64,
        per_cpu / 1e3,
        per_cpu_with_server / 1e3
    );
    if let Some(d) = &direct {
        let _ = writeln!(
            o,
            "| store alone (`insert_many`, {} batches) | {:.0} k samples/s; writing thread {:.1} CPU-s, server {:.1} CPU-s: {:.0} k samples per CPU-second of both |",
            d.batches,
            d.samples as f64 / d.secs.max(1e-9) / 1e3,
            d.cpu,
            d.server_cpu,
            d.samples as f64 / (d.cpu + d.server_cpu).max(1e-9) / 1e3
        );
    }
    let _ = writeln!(
        o,
        "| store size (loaded data, `system.parts` bytes_on_disk of active parts) | {mib_per_m:.1} MiB per million samples ({:.1} MiB: {}) |\n",
        mib(size),
        parts
            .iter()
            .map(|(t, b, r, n)| format!("{t} {:.1} MiB, {r} rows, {n} parts", mib(*b)))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        o,
        "Columns of `samples` (loaded data): {}.\n",
        columns.join(", ")
    );
    let _ = writeln!(
        o,
        "What the server did during the load (`system.events`, differences): {}.\n",
        server_work.join(", ")
    );
    let _ = writeln!(
        o,
        "For the queries the loaded {} h were replicated inside ClickHouse to {span_h} h: \
         {} copies of every row (`INSERT INTO samples SELECT … FROM samples`, shifted back \
         k h: `hour − k`, `window_start`/`window_end − k·3600 s`; registry rows' `sequence + \
         k·10⁹` and every row's `write_id` xor k, so the duplicate-write guard sees distinct \
         batches), {} rows added in {:.0} s; the texts of stacks and label sets copied into the \
         day partitions {:?}. The queries start once no merge runs (waited {:.0} s; \
         {:.0} s after the load, before its size). Store after the copies: {}.\n",
        args.hours,
        mat.copies - 1,
        mat.sample_rows,
        mat.secs,
        mat.text_days,
        settled.as_secs_f64(),
        settled_load.as_secs_f64(),
        parts_after
            .iter()
            .map(|(t, b, r, n)| format!("{t} {:.1} MiB, {r} rows, {n} parts", mib(*b)))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        o,
        "Query latency (HTTP, median of {} runs; \"store\" = `ClickHouseStore::profile` alone):\n\n\
         | range | selector | SVG | folded | store | samples | stacks |\n|---|---|---|---|---|---|---|",
        args.runs
    );
    for f in &figures {
        let _ = writeln!(
            o,
            "| {} h | `{}` | {:.3} s | {:.3} s | {:.3} s | {} | {} |",
            f.hours,
            f.label,
            f.svg.as_secs_f64(),
            f.folded.as_secs_f64(),
            f.store.as_secs_f64(),
            f.samples,
            f.stacks
        );
    }
    let _ = writeln!(
        o,
        "\nWhere the {span_h} h query's time goes: the statements `ClickHouseStore::profile` \
         sends, run alone (same SQL, `FORMAT Null`, median of {} runs):\n\n\
         | part | all data | `{{process=\"java\"}}` |\n|---|---|---|",
        args.runs
    );
    for (a, j) in pieces_all.iter().zip(&pieces_java) {
        let _ = writeln!(
            o,
            "| {} | {:.3} s{} | {:.3} s{} |",
            a.what,
            a.time.as_secs_f64(),
            if a.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", a.note)
            },
            j.time.as_secs_f64(),
            if j.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", j.note)
            }
        );
    }
    if let Some(j) = pieces_java.get(pieces_all.len()) {
        let _ = writeln!(o, "| {} | — | {:.3} s |", j.what, j.time.as_secs_f64());
    }
    let _ = writeln!(o, "\nChecks:\n");
    for c in &checks {
        let _ = writeln!(o, "- {c}");
    }
    let _ = writeln!(o, "\nClickHouse run: {total_secs:.0} s.");
    Ok(Outcome {
        summary: Summary {
            store: "ClickHouse",
            per_cpu,
            per_cpu_with_server: Some(per_cpu_with_server),
            one,
            many,
            direct,
            mib_per_m,
            span_h,
            figures,
            total_secs,
        },
        section: o,
        bench_line,
    })
}
