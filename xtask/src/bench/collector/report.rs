//! The report: a table comparing the stores, then each store's section.
use std::fmt::Write as _;

#[allow(unused_imports)]
use super::*;

/// The figures both stores report, for the table that compares them.
pub(crate) struct Summary {
    pub(crate) store: &'static str,
    /// Samples per CPU-second of the collector's threads (gRPC batches).
    pub(crate) per_cpu: f64,
    /// Samples per CPU-second of the collector and the ClickHouse server.
    pub(crate) per_cpu_with_server: Option<f64>,
    pub(crate) one: Load,
    pub(crate) many: Load,
    pub(crate) direct: Option<Direct>,
    pub(crate) mib_per_m: f64,
    pub(crate) span_h: u32,
    pub(crate) figures: Vec<QueryFigures>,
    pub(crate) total_secs: f64,
}

/// One store's run: its figures, its report section and its `BENCH` line.
pub(crate) struct Outcome {
    pub(crate) summary: Summary,
    pub(crate) section: String,
    pub(crate) bench_line: String,
}

/// The report: a table comparing the stores, then each store's section.
pub(crate) fn write_report(args: &Args, outcomes: &[Outcome], secs: f64) -> anyhow::Result<()> {
    let Some(path) = &args.report else {
        return Ok(());
    };
    let k = |x: f64| format!("{:.0} k", x / 1e3);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "## Collector ingest and flame graph queries (`collector-bench`)\n"
    );
    let names: Vec<&str> = outcomes.iter().map(|r| r.summary.store).collect();
    let _ = writeln!(
        o,
        "The same data set goes through the same collector (gRPC server, group-commit writer, \
         HTTP API) into each store ({}); only `--store` differs. ClickHouse is a private \
         `clickhouse-server` {} started for the run on this machine (profiler-testkit, \
         default settings), so it shares the 2 vCPUs with the collector and the clients; its \
         CPU comes from /proc/PID/stat of the server process. Each store's section below says \
         how its figures were made.\n",
        names.join(", "),
        CLICKHOUSE_VERSION_TEXT
    );
    let _ = writeln!(
        o,
        "| figure | {} |\n|---|{}",
        names.join(" | "),
        "---|".repeat(names.len())
    );
    let mut row = |what: &str, cell: &dyn Fn(&Summary) -> String| {
        let cells: Vec<String> = outcomes.iter().map(|r| cell(&r.summary)).collect();
        let _ = writeln!(o, "| {what} | {} |", cells.join(" | "));
    };
    row(
        "ingest per CPU-second of the collector (gRPC batches)",
        &|s| format!("**{} samples**", k(s.per_cpu)),
    );
    row(
        "ingest per CPU-second of the collector + ClickHouse server",
        &|s| match s.per_cpu_with_server {
            Some(v) => format!("**{} samples**", k(v)),
            None => "— (the store runs inside the collector)".into(),
        },
    );
    row("ClickHouse server CPU during the gRPC ingest", &|s| {
        if s.per_cpu_with_server.is_some() {
            let cpu = s.one.server_cpu + s.many.server_cpu;
            let samples = (s.one.sent.samples + s.many.sent.samples) as f64;
            format!(
                "{cpu:.1} s ({:.0} % of the collector's {:.1} s; {} samples per server CPU-second)",
                100.0 * cpu / (s.one.collector_cpu + s.many.collector_cpu).max(1e-9),
                s.one.collector_cpu + s.many.collector_cpu,
                k(samples / cpu.max(1e-9))
            )
        } else {
            "—".into()
        }
    });
    row(
        &format!("ingest wall clock, {} clients", args.clients),
        &|s| {
            format!(
                "{} samples/s, {:.0} batches/s",
                k(s.many.rate()),
                s.many.sent.batches as f64 / s.many.secs.max(1e-9)
            )
        },
    );
    row("ingest wall clock, 1 client", &|s| {
        format!(
            "{} samples/s, {:.0} batches/s",
            k(s.one.rate()),
            s.one.sent.batches as f64 / s.one.secs.max(1e-9)
        )
    });
    row(
        &format!("store alone (`insert_many`, groups of up to {DIRECT_GROUP}, no gRPC)"),
        &|s| match &s.direct {
            Some(d) => {
                let mut t = format!(
                    "{} samples/s; {} per CPU-second of the writing thread",
                    k(d.samples as f64 / d.secs.max(1e-9)),
                    k(d.samples as f64 / d.cpu.max(1e-9))
                );
                if d.server_cpu > 0.0 {
                    t += &format!(
                        ", {} with the server's",
                        k(d.samples as f64 / (d.cpu + d.server_cpu).max(1e-9))
                    );
                }
                t
            }
            None => "—".into(),
        },
    );
    row("store size per million samples", &|s| {
        format!("{:.1} MiB", s.mib_per_m)
    });
    let mut keys: Vec<(f64, String)> = Vec::new();
    for r in outcomes {
        for f in &r.summary.figures {
            if !keys.iter().any(|(h, l)| *h == f.hours && *l == f.label) {
                keys.push((f.hours, f.label.clone()));
            }
        }
    }
    for (hours, label) in &keys {
        row(
            &format!(
                "query {hours} h × {} agents, `{label}`: SVG / folded / store alone",
                args.agents
            ),
            &|s| {
                s.figures
                    .iter()
                    .find(|f| f.hours == *hours && f.label == *label)
                    .map(|f| {
                        let t = format!(
                            "{:.3} / {:.3} / {:.3} s",
                            f.svg.as_secs_f64(),
                            f.folded.as_secs_f64(),
                            f.store.as_secs_f64()
                        );
                        if f.hours == f64::from(s.span_h) && label == "all" {
                            format!("**{t}**")
                        } else {
                            t
                        }
                    })
                    .unwrap_or_else(|| "—".into())
            },
        );
    }
    row("run time (start-up, load, copies, queries)", &|s| {
        format!("{:.0} s", s.total_secs)
    });
    let _ = writeln!(o);
    for r in outcomes {
        let _ = writeln!(o, "{}", r.section.trim_end());
        let _ = writeln!(o);
    }
    let _ = writeln!(
        o,
        "Command: `collector-bench{} --store {} --report FILE`; {secs:.0} s in all.\n",
        if args.quick { " --quick" } else { "" },
        format!("{:?}", args.store).to_lowercase()
    );
    for r in outcomes {
        let _ = writeln!(o, "<!-- {} -->", r.bench_line);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, o)?;
    println!("report written to {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------
