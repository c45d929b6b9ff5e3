//! The suites `cargo xtask bench` runs but does not write: the Criterion
//! micro-benchmarks, and programs that write their own report section (the
//! collector benchmark, a binary of xtask built with its `collector-bench`
//! feature, and the agent's `symbolize_bench` example).
//!
//! Such a program is run as `PROGRAM --report FILE [--quick]`; it writes
//! a markdown section to FILE, which the report includes verbatim, and states
//! its headline figures on lines of the form
//!
//! ```text
//! BENCH key=value [key=value ...]
//! ```
//!
//! in FILE or on its stdout (anywhere on the line, so `<!-- BENCH k=v -->`
//! works too). Values are plain numbers in the unit the key names. The keys
//! the table of targets reads: `warm_frames_per_s`, `cold_frames_per_s`
//! (symbolize_bench), `ingest_samples_per_s`, `query_24h_100_s`,
//! `clickhouse_ingest_total_cpu_samples_per_s`,
//! `clickhouse_ingest_samples_per_s`, `clickhouse_query_24h_100_s`
//! (collector-bench); a missing key shows as "not measured".
use std::{
    collections::BTreeMap, fmt::Write as _, fs, path::Path, process::Command, time::Instant,
};

use anyhow::{bail, Context, Result};

use super::{cargo, run_teed, si, step, Ctx, Figures};

/// A program that writes its own report section.
#[derive(Clone, Copy)]
pub(crate) struct Program {
    /// The benchmark's name (`--only`).
    pub(crate) bench: &'static str,
    pub(crate) package: &'static str,
    /// `--bin NAME` or `--example NAME`.
    pub(crate) kind: &'static str,
    pub(crate) name: &'static str,
    /// Features the build needs.
    pub(crate) features: Option<&'static str>,
    /// Its source, for the report.
    pub(crate) source: &'static str,
}

pub(crate) const PROGRAMS: [Program; 3] = [
    Program {
        bench: "collector",
        package: "xtask",
        kind: "--bin",
        name: "collector-bench",
        features: Some("collector-bench"),
        source: "xtask/src/bench/collector/",
    },
    Program {
        bench: "symbolize",
        package: "profiler-agent",
        kind: "--example",
        name: "symbolize_bench",
        features: None,
        source: "profiler-agent/examples/symbolize_bench.rs",
    },
    Program {
        bench: "formats",
        package: "xtask",
        kind: "--bin",
        name: "formats-bench",
        features: Some("collector-bench"),
        source: "xtask/src/bench/formats.rs",
    },
];

impl Program {
    /// Where cargo puts it under target/PROFILE.
    fn binary(&self, profile_dir: &Path) -> std::path::PathBuf {
        if self.kind == "--example" {
            profile_dir.join("examples").join(self.name)
        } else {
            profile_dir.join(self.name)
        }
    }

    /// The `cargo build` arguments that select it, after the workspace
    /// selection (see [`super::WORKSPACE`]): the target, and a feature named
    /// with its package.
    pub(crate) fn build_args(&self) -> Vec<String> {
        let mut args = vec![self.kind.to_string(), self.name.to_string()];
        if let Some(f) = self.features {
            args.extend(["--features".to_string(), format!("{}/{f}", self.package)]);
        }
        args
    }
}

/// The Criterion bench targets: (package, bench).
const CRITERION: [(&str, &str); 2] = [
    ("profiler-agent", "hot_paths"),
    ("profiler-collector", "store"),
];

/// Whether this checkout has the program's source.
pub(crate) fn program_exists(root: &Path, program: &Program) -> bool {
    root.join(program.source).exists()
}

/// `BENCH key=value ...` figures anywhere in `text`.
pub(crate) fn bench_keys(text: &str) -> BTreeMap<String, f64> {
    let mut keys = BTreeMap::new();
    for line in text.lines() {
        let Some((_, rest)) = line.split_once("BENCH ") else {
            continue;
        };
        for word in rest.split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                if let Ok(v) = v.trim_end_matches([',', ';']).parse::<f64>() {
                    keys.insert(k.to_string(), v);
                }
            }
        }
    }
    keys
}

/// Runs one program benchmark (`collector` or `symbolize`) and returns its
/// section, with its `BENCH` figures added to `figures`.
pub(crate) fn program_report(ctx: &Ctx, bench: &str, figures: &mut Figures) -> Result<String> {
    let program = PROGRAMS
        .iter()
        .find(|p| p.bench == bench)
        .copied()
        .context("not a program benchmark")?;
    let name = program.name;
    let binary = program.binary(&ctx.target_dir());
    if !binary.is_file() {
        bail!(
            "benchmark `{bench}`: {} was not built: does {} exist?",
            binary.display(),
            program.source
        );
    }
    let file = ctx.dir.join(format!("{name}.md"));
    let _ = fs::remove_file(&file);
    let mut args = vec!["--report".to_string(), file.display().to_string()];
    if ctx.plan.quick {
        args.push("--quick".into());
    }
    // How to run it by hand (`cargo run` takes one package).
    let features = program
        .features
        .map(|f| format!(" --features {f}"))
        .unwrap_or_default();
    let shown = format!(
        "cargo run{} -p {} {} {}{features} -- {}",
        if ctx.release { " --release" } else { "" },
        program.package,
        program.kind,
        program.name,
        args.join(" ")
    );
    step(&format!("{bench}: {shown}"));
    let started = Instant::now();
    let (st, stdout) = run_teed(Command::new(&binary).args(&args).current_dir(&ctx.root))?;
    let secs = started.elapsed().as_secs_f64();
    if !st.success() {
        bail!(
            "benchmark `{bench}`: `{shown}` failed ({st}): see its output above (a program \
             benchmark must accept `--report FILE [--quick]` and write its section to FILE)"
        );
    }
    let section = fs::read_to_string(&file).with_context(|| {
        format!(
            "benchmark `{bench}`: `{name}` exited successfully but did not write {}",
            file.display()
        )
    })?;
    if section.trim().is_empty() {
        bail!(
            "benchmark `{bench}`: `{name}` wrote an empty {}",
            file.display()
        );
    }
    let mut keys = bench_keys(&stdout);
    keys.extend(bench_keys(&section));
    eprintln!("    {name}: {} BENCH figure(s): {keys:?}", keys.len());
    figures.keys.extend(keys);

    let mut out = String::from("\n");
    if !section.trim_start().starts_with('#') {
        let title = match bench {
            "collector" => "Collector ingest and query",
            _ => "Symbolization",
        };
        let _ = writeln!(out, "## {title} (`{name}`)\n");
    }
    out += section.trim_end();
    let _ = writeln!(
        out,
        "\n\n*Section written by `{name}` ({}), run as `{shown}` in {secs:.0} s.*",
        program.source
    );
    Ok(out)
}

/// Builds the Criterion bench targets (release), or their test-mode
/// binaries for a smoke run on the debug build.
pub(crate) fn build_criterion(ctx: &Ctx) -> Result<()> {
    step("building the Criterion benchmarks");
    let mut args = vec![if ctx.release { "bench" } else { "test" }, "--no-run"];
    args.extend(super::WORKSPACE);
    for (_, bench) in CRITERION {
        args.extend(["--bench", bench]);
    }
    cargo(&args)
}

/// A number in a criterion JSON file: the first `"field":` after `after`.
fn json_number(json: &str, after: &str, field: &str) -> Option<f64> {
    let rest = &json[json.find(after)? + after.len()..];
    let rest = &rest[rest.find(field)? + field.len()..];
    let rest = rest.trim_start_matches([':', ' ']);
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn time_unit(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// The names of the benchmarks criterion reported on stdout: the text before
/// `time:`, or the line before when the name is long.
fn criterion_names(stdout: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut previous = "";
    for line in stdout.lines() {
        if let Some((name, rest)) = line.split_once("time:") {
            if rest.trim_start().starts_with('[') {
                let name = if name.trim().is_empty() {
                    previous.trim()
                } else {
                    name.trim()
                };
                // `change:` heads the comparison with the previous run.
                if !name.is_empty() && !name.ends_with(':') {
                    names.push(name.to_string());
                }
            }
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    names
}

pub(crate) fn criterion(ctx: &Ctx) -> Result<String> {
    let mut packages: Vec<&str> = super::WORKSPACE.to_vec();
    for (_, bench) in CRITERION {
        packages.extend(["--bench", bench]);
    }
    let cargo_bin = crate::cargo_bin();
    let mut out = String::from("\n## 5. Micro-benchmarks of the hot paths (Criterion)\n\n");
    if !ctx.release {
        step("criterion: each benchmark once (test mode, debug build)");
        let (st, stdout) = run_teed(Command::new(&cargo_bin).arg("test").args(&packages))?;
        if !st.success() {
            bail!("the Criterion benchmarks failed in test mode ({st})");
        }
        let ran = stdout.matches("Success").count();
        if ran == 0 {
            bail!("the Criterion benchmarks ran no benchmark in test mode");
        }
        let _ = writeln!(
            out,
            "Smoke run: `cargo test {}` ran each of {ran} benchmarks once (Criterion's \
             test mode, debug build); no timings.",
            packages.join(" ")
        );
        return Ok(out);
    }
    let timing: &[&str] = if ctx.plan.quick {
        &[
            "--warm-up-time",
            "0.2",
            "--measurement-time",
            "0.5",
            "--sample-size",
            "10",
        ]
    } else {
        &["--warm-up-time", "0.5", "--measurement-time", "2"]
    };
    let shown = format!("cargo bench {} -- {}", packages.join(" "), timing.join(" "));
    step(&format!("criterion: {shown}"));
    let (st, stdout) = run_teed(
        Command::new(&cargo_bin)
            .arg("bench")
            .args(&packages)
            .arg("--")
            .args(timing),
    )?;
    if !st.success() {
        bail!("`{shown}` failed ({st})");
    }
    let names = criterion_names(&stdout);
    if names.is_empty() {
        bail!("`{shown}` reported no benchmark");
    }
    let _ = writeln!(
        out,
        "`{shown}`: the benchmarks of docs/microbenchmarks.md (what one iteration does, and \
         what an element is in each) with a shorter warm-up and measurement than Criterion's \
         defaults. *Median* is Criterion's median time of one iteration; *throughput* is the \
         benchmark's elements or bytes per iteration divided by it.\n\n\
         | benchmark | median | throughput |\n|---|---:|---:|"
    );
    for name in &names {
        let dir = crate::target_dir().join("criterion").join(name).join("new");
        let estimates = fs::read_to_string(dir.join("estimates.json")).unwrap_or_default();
        let meta = fs::read_to_string(dir.join("benchmark.json")).unwrap_or_default();
        let Some(ns) = json_number(&estimates, "\"median\"", "\"point_estimate\"") else {
            let _ = writeln!(out, "| `{name}` | ? | ? |");
            continue;
        };
        let per_s = 1e9 / ns;
        let throughput = if let Some(n) = json_number(&meta, "\"throughput\"", "\"Elements\"") {
            si(n * per_s, "elements/s")
        } else if let Some(n) = json_number(&meta, "\"throughput\"", "\"Bytes\"") {
            format!("{:.0} MiB/s", n * per_s / (1024.0 * 1024.0))
        } else {
            "—".into()
        };
        let _ = writeln!(out, "| `{name}` | {} | {throughput} |", time_unit(ns));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bench_lines() {
        let text = "## Symbolization\n\nBENCH warm_frames_per_s=2500000 cold_frames_per_s=1.5e5\n\
                    <!-- BENCH query_24h_100_s=0.42 -->\nno figures here\n";
        let keys = bench_keys(text);
        assert_eq!(keys["warm_frames_per_s"], 2.5e6);
        assert_eq!(keys["cold_frames_per_s"], 1.5e5);
        assert_eq!(keys["query_24h_100_s"], 0.42);
        assert_eq!(keys.len(), 3);
    }

    #[test]
    fn reads_criterion_output() {
        let stdout = "drain/decode_2000_keys  time:   [565.05 µs 627.39 µs 695.79 µs]\n\
                      \x20                       thrpt:  [2.8745 Melem/s 3.1878 Melem/s]\n\
                      encode/build_batch_2000_stacks_with_a_long_name\n\
                      \x20                       time:   [4.1 ms 4.3 ms 4.5 ms]\n\
                      \x20                change:\n\
                      \x20                       time:   [−29.303% −17.748% −4.6799%] (p = 0.11 > 0.05)\n\
                      Found 3 outliers among 100 measurements (3.00%)\n";
        assert_eq!(
            criterion_names(stdout),
            [
                "drain/decode_2000_keys",
                "encode/build_batch_2000_stacks_with_a_long_name"
            ]
        );
        let est = r#"{"mean":{"point_estimate":627.0},"median":{"confidence_interval":{"lower_bound":1.0},"point_estimate":589.5,"standard_error":3.0}}"#;
        assert_eq!(
            json_number(est, "\"median\"", "\"point_estimate\""),
            Some(589.5)
        );
        let meta = r#"{"group_id":"fold","throughput":{"Bytes":3795521},"full_id":"x"}"#;
        assert_eq!(
            json_number(meta, "\"throughput\"", "\"Bytes\""),
            Some(3795521.0)
        );
        assert_eq!(json_number(meta, "\"throughput\"", "\"Elements\""), None);
    }
}
