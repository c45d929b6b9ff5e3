//! What the fuzz targets check, beyond "does not panic": each `check_*`
//! feeds one input to the real parsing path and asserts the invariants its
//! output must satisfy. The targets in `fuzz_targets/` are one-line wrappers,
//! so the tests below replay the committed seeds through the same code.
use std::collections::HashMap;

use profiler_agent::fold::{parse_folded, FoldedProfile};
use profiler_collector::{
    import::{self, ImportError, OtlpLimits, Source},
    model::{Profile, ValidBatch},
    render, selection,
    validate::{self, valid_label_name, validate, Limits},
};
use profiler_proto::{otlp::collector::ExportProfilesServiceRequest, v1::Batch};
use prost::Message;

#[cfg(test)]
mod seeds;

/// The clock the batch target validates against (2027-01-15).
pub const NOW: i64 = 1_800_000_000_000_000_000;

/// The clock the import targets validate against: after every window. A
/// conversion cannot know when its batches arrive, so "in the future" is
/// the one rejection it need not rule out (`validate` adds the allowed skew
/// with saturation: no window ends after `i64::MAX`).
pub const IMPORT_NOW: i64 = i64::MAX;

/// Largest pprof profile the import target decodes (inflated).
pub const MAX_PPROF_BYTES: usize = 1 << 20;

/// Limits small enough that short inputs reach every one of them.
pub fn tight_limits() -> Limits {
    Limits {
        max_frames: 16,
        max_future_ns: 60_000_000_000,
        max_samples: 64,
        max_string_bytes: 64,
        max_stack_bytes: 256,
        max_resolved_bytes: 2048,
        max_batch_count: 1 << 20,
        max_batch_value: 1 << 30,
        max_window_ns: 3_600_000_000_000,
    }
}

/// Raw bytes -> `Batch` -> validation, with the production and tight limits.
pub fn check_batch(data: &[u8]) {
    let Ok(batch) = Batch::decode(data) else {
        return;
    };
    for limits in [Limits::default(), tight_limits()] {
        match validate(&batch, &limits, NOW) {
            Ok(valid) => check_valid_batch(&batch, &valid, &limits, NOW),
            Err(rejection) => {
                assert!(!rejection.reason().is_empty());
                assert!(!rejection.to_string().is_empty());
            }
        }
    }
}

fn check_valid_batch(batch: &Batch, v: &ValidBatch, limits: &Limits, now: i64) {
    assert!(!v.agent_id.trim().is_empty());
    assert_eq!(
        (&v.agent_id, v.sequence, &v.node),
        (&batch.agent_id, batch.sequence, &batch.node)
    );
    let (start, end) = (v.window_start_ns, v.window_end_ns);
    assert!(0 < start && start <= end, "window {start}..{end}");
    assert!(end - start <= limits.max_window_ns);
    assert!(end <= now.saturating_add(limits.max_future_ns));
    if v.sample_type.name == "cpu" {
        assert!((1..=10_000).contains(&v.frequency_hz));
    } else {
        assert!(v.frequency_hz <= 10_000);
    }
    assert!(validate::valid_type_name(&v.sample_type.name));
    assert!(validate::valid_type_name(&v.sample_type.unit));

    let mut resolved = 0;
    assert_eq!(v.stacks.len(), batch.stacks.len());
    for (stack, raw) in v.stacks.iter().zip(&batch.stacks) {
        assert!(stack.len() <= limits.max_stack_bytes, "{stack:?}");
        // One folded frame per frame index: names cannot add separators.
        assert_eq!(stack.split(';').count(), raw.frames.len(), "{stack:?}");
        assert!(raw.frames.len() <= limits.max_frames);
        assert!(!stack.chars().any(char::is_control), "{stack:?}");
        resolved += stack.len();
    }
    assert_eq!(v.label_sets.len(), batch.label_sets.len());
    for set in &v.label_sets {
        for (name, value) in set {
            assert!(valid_label_name(name), "{name:?}");
            resolved += name.len() + value.len();
        }
        assert!(set.windows(2).all(|w| w[0].0 < w[1].0), "{set:?}");
    }
    assert!(resolved <= limits.max_resolved_bytes);

    assert_eq!(v.samples.len(), batch.samples.len());
    assert!(v.samples.len() <= limits.max_samples);
    let mut total = 0u64;
    let mut profile = Profile::default();
    for s in &v.samples {
        assert!(s.value > 0);
        assert!(s.label_set < v.label_sets.len() && s.stack < v.stacks.len());
        total += s.value;
        profile.add(&v.stacks[s.stack], s.value);
    }
    assert!(total <= limits.max_batch_count.max(limits.max_batch_value));
    assert_eq!(v.total(), total);

    // What the query side makes of these rows: one folded line per stack,
    // and every sample counted once.
    assert_eq!(profile.total(), total);
    let folded = profile.folded();
    assert_eq!(folded.lines().count(), profile.stacks.len());
    for line in folded.lines() {
        let (stack, count) = line.rsplit_once(' ').expect("`stack COUNT`");
        assert_eq!(profile.stacks.get(stack), count.parse().ok().as_ref());
    }
    for entry in render::top(&profile, 10) {
        assert!(entry.self_value <= entry.total && entry.total <= total);
    }
    assert_eq!(render::limit_nodes(&profile, 8).total(), total);
}

/// Folded text -> `parse_folded`: lines are counted as good or bad, counts
/// add up, and rendering the result parses back to the same profile.
pub fn check_folded(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (profile, bad) = parse_folded(&text);
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(bad <= lines);
    assert!(profile.len() <= lines - bad);
    let mut sum = 0u64;
    for (stack, count) in profile.iter() {
        assert!(!stack.is_empty() && !stack.contains('\n'), "{stack:?}");
        sum = sum.saturating_add(count);
    }
    assert_eq!(profile.total(), sum);
    let top = (profile.top_self(5).iter()).fold(0u64, |t, (_, c)| t.saturating_add(*c));
    assert!(top <= profile.total());

    let mut rendered = Vec::new();
    profile.write_to(&mut rendered).expect("writing to memory");
    let rendered = String::from_utf8(rendered).expect("rendered from a str");
    let (back, bad_back): (FoldedProfile, usize) = parse_folded(&rendered);
    assert_eq!(bad_back, 0, "{rendered:?}");
    assert_eq!(back, profile, "{rendered:?}");
}

/// Who the import targets' batches are from.
pub fn import_source() -> Source {
    Source {
        agent_id: "fuzz".into(),
        node: "n".into(),
    }
}

/// Raw bytes -> `pprof::decode` (plain or gzipped) -> `pprof::to_batches`,
/// with the caller's labels and with those of `import::pprof::with_process`
/// (the program's name as the root of every stack). A profile converts
/// whole or is refused with a reason; what it converts to passes
/// validation, one batch per sample type with a non-zero sum, each value
/// counted once.
pub fn check_pprof(data: &[u8]) {
    let profile = match import::pprof::decode(data, MAX_PPROF_BYTES) {
        Ok(profile) => profile,
        Err(e) => return check_import_error(&e),
    };
    let labels = vec![("service".to_string(), "fuzz".to_string())];
    let process = import::pprof::process_name(&profile);
    if let Some(name) = &process {
        assert!(!name.is_empty() && name.len() <= 15, "{name:?}");
        assert!(!name.contains('/') && !name.starts_with('['), "{name:?}");
    }
    let with_process = import::pprof::with_process(labels.clone(), &profile);
    assert_eq!(label(&with_process, "process"), process.as_deref());
    assert_eq!(label(&with_process, "service"), Some("fuzz"));
    let mut variants = vec![labels];
    if process.is_some() {
        variants.push(with_process);
    }
    for labels in variants {
        match import::pprof::to_batches(&profile, &labels, &import_source()) {
            Ok(batches) => check_pprof_batches(&profile, &labels, &batches),
            Err(e) => check_import_error(&e),
        }
    }
}

fn check_pprof_batches(
    profile: &profiler_proto::pprof::Profile,
    labels: &[(String, String)],
    batches: &[Batch],
) {
    // Converted: every sample has one value per sample type.
    let totals: Vec<i128> = (0..profile.sample_type.len())
        .map(|t| profile.sample.iter().map(|s| i128::from(s.value[t])).sum())
        .filter(|total| *total != 0)
        .collect();
    assert_eq!(batch_totals(batches), totals);
    let process = label(labels, "process");
    for batch in batches {
        check_imported(batch);
        assert_eq!((&*batch.agent_id, &*batch.node), ("fuzz", "n"));
        assert_eq!(batch.window_start_unix_nanos, profile.time_nanos);
        for set in &batch.label_sets {
            let service = set
                .labels
                .iter()
                .find(|l| batch.strings[l.name as usize] == b"service");
            let value = service.map(|l| &batch.strings[l.value as usize][..]);
            assert_eq!(value, Some(&b"fuzz"[..]), "the caller's label wins");
        }
        if let Some(process) = process {
            for stack in &batch.stacks {
                let root = &batch.strings[stack.frames[0] as usize];
                assert_eq!(root, process.as_bytes(), "the process is the root");
            }
        }
    }
}

/// Limits small enough that short requests reach every one of them.
pub fn tight_otlp_limits() -> OtlpLimits {
    OtlpLimits {
        max_profiles: 4,
        max_table_entries: 32,
        max_samples: 16,
        max_frames: 8,
    }
}

/// Raw bytes -> `ExportProfilesServiceRequest` -> `otlp::to_batches`, with
/// the production and tight limits. A request converts whole or is refused
/// with a reason; what it converts to passes validation, one batch per
/// profile with a non-zero sum, each value counted once, within the
/// limits; tighter limits refuse more but never convert differently.
pub fn check_otlp(data: &[u8]) {
    let Ok(request) = ExportProfilesServiceRequest::decode(data) else {
        return;
    };
    let limits = OtlpLimits::default();
    let converted = import::otlp::to_batches(&request, &limits, &import_source());
    match &converted {
        Ok(batches) => check_otlp_batches(&request, &limits, batches),
        Err(e) => check_import_error(e),
    }
    let tight = tight_otlp_limits();
    match import::otlp::to_batches(&request, &tight, &import_source()) {
        Ok(batches) => {
            check_otlp_batches(&request, &tight, &batches);
            assert_eq!(Ok(&batches), converted.as_ref(), "tight limits differ");
        }
        Err(e) => check_import_error(&e),
    }
}

fn check_otlp_batches(
    request: &ExportProfilesServiceRequest,
    limits: &OtlpLimits,
    batches: &[Batch],
) {
    // A sample's value: the sum of its values, or the number of its
    // timestamps.
    let totals: Vec<i128> = (request.resource_profiles.iter())
        .flat_map(|r| &r.scope_profiles)
        .flat_map(|s| &s.profiles)
        .map(|p| {
            (p.samples.iter())
                .map(|s| match &s.values[..] {
                    [] => s.timestamps_unix_nano.len() as i128,
                    values => values.iter().map(|v| i128::from(*v)).sum(),
                })
                .sum()
        })
        .filter(|total| *total != 0)
        .collect();
    assert_eq!(batch_totals(batches), totals);
    for batch in batches {
        check_imported(batch);
        assert!(batch.samples.len() <= limits.max_samples);
        for stack in &batch.stacks {
            assert!(stack.frames.len() <= limits.max_frames);
        }
        match batch.agent_id.strip_prefix("otlp/") {
            // The resource's `host.name`.
            Some(host) => assert_eq!(host, batch.node),
            None => assert_eq!((&*batch.agent_id, &*batch.node), ("fuzz", "n")),
        }
    }
}

/// What every converted batch is: valid (a rejection is a conversion bug:
/// the import would be refused as an invalid batch rather than for its
/// fault, by name), with samples, tables without duplicates and its content
/// hash as its sequence.
fn check_imported(batch: &Batch) {
    let limits = Limits::default();
    let valid = validate(batch, &limits, IMPORT_NOW).unwrap_or_else(|rejection| {
        let t = batch.sample_type.as_ref().map(|t| (&t.r#type, &t.unit));
        panic!(
            "a converted batch of type {t:?} is rejected ({}): {rejection}",
            rejection.reason()
        )
    });
    check_valid_batch(batch, &valid, &limits, IMPORT_NOW);
    assert!(!batch.samples.is_empty());
    assert_eq!(batch.sequence, import::content_hash(batch));
    assert_eq!(batch.strings.first().map(Vec::len), Some(0));
    assert_unique(batch.strings.iter());
    assert_unique(batch.stacks.iter().map(|s| &s.frames));
    assert_unique(batch.label_sets.iter().map(|set| {
        let labels: Vec<_> = set.labels.iter().map(|l| (l.name, l.value)).collect();
        labels
    }));
    assert_unique(batch.samples.iter().map(|s| (s.label_set, s.stack)));
}

fn assert_unique<T: std::hash::Hash + Eq + std::fmt::Debug>(items: impl Iterator<Item = T>) {
    let mut seen = std::collections::HashSet::new();
    for item in items {
        assert!(!seen.contains(&item), "{item:?} twice");
        seen.insert(item);
    }
}

/// Each batch's sum of values.
fn batch_totals(batches: &[Batch]) -> Vec<i128> {
    (batches.iter())
        .map(|b| b.samples.iter().map(|s| i128::from(s.value)).sum())
        .collect()
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> Option<&'a str> {
    (labels.iter().find(|(n, _)| n == name)).map(|(_, v)| v.as_str())
}

/// A refusal names its kind and its fault.
fn check_import_error(e: &ImportError) {
    assert!(!e.reason().is_empty());
    assert!(!e.to_string().is_empty());
}

/// Renders matchers the way a user writes a selector.
pub fn render_selector(matchers: &[(String, String)]) -> String {
    let parts: Vec<String> = matchers
        .iter()
        .map(|(name, value)| {
            let value = value.replace('\\', "\\\\").replace('"', "\\\"");
            format!("{name}=\"{value}\"")
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// Query parameters as the HTTP API receives them. The whole input is a
/// selector; its lines are, in order, `query`, `start`, `end`, `min_width`,
/// `max_nodes`, `n`, `base_query`, `base_start`, `base_end`.
pub fn check_query_params(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_selector(&text);

    const KEYS: [&str; 9] = [
        "query",
        "start",
        "end",
        "min_width",
        "max_nodes",
        "n",
        "base_query",
        "base_start",
        "base_end",
    ];
    let params: HashMap<String, String> = KEYS
        .iter()
        .zip(text.split('\n'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for key in ["query", "base_query"] {
        if let Some(q) = params.get(key) {
            check_selector(q);
        }
    }
    for key in ["start", "end", "base_start", "base_end"] {
        if let Some(t) = params.get(key) {
            check_time(t);
        }
    }
    for prefix in ["", "base_"] {
        if let Ok(sel) = selection::selector(&params, prefix) {
            assert!(0 <= sel.start_ns && sel.start_ns < sel.end_ns, "{sel:?}");
            assert!(sel.end_ns - sel.start_ns <= 400 * 24 * 3600 * 1_000_000_000);
            let query = params
                .get(&format!("{prefix}query"))
                .or(params.get("query"))
                .map_or("", String::as_str);
            assert_eq!(Ok(sel.matchers), selection::parse_selector(query));
        }
    }
    if let Ok(opts) = selection::svg_options(&params, "t".into(), "samples") {
        assert!(opts.min_width.is_finite() && (0.0..=1000.0).contains(&opts.min_width));
        assert!(opts.max_nodes.is_none_or(|n| n >= 2));
    }
    if let Ok(n) = selection::top_n(&params) {
        assert!((1..=10_000).contains(&n));
    }
}

fn check_selector(text: &str) {
    if let Ok(matchers) = selection::parse_selector(text) {
        for (name, _) in &matchers {
            assert!(valid_label_name(name), "{name:?}");
        }
        let rendered = render_selector(&matchers);
        assert_eq!(
            selection::parse_selector(&rendered).as_ref(),
            Ok(&matchers),
            "{rendered:?}"
        );
    }
}

fn check_time(text: &str) {
    for now in [0, NOW, i64::MAX] {
        if let Ok(t) = selection::parse_time(text, now) {
            assert!(t >= 0, "{text:?} at {now} -> {t}");
            if text.trim() == "now" {
                assert_eq!(t, now);
            }
            if text.trim().starts_with("now-") {
                assert!(t <= now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use profiler_proto::v1::{Label, LabelSet, Sample, Stack};

    use super::*;

    fn seeds(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(target)
    }

    /// A target's name, and the name of the check it wraps and the check.
    type Target = (&'static str, &'static str, fn(&[u8]));

    /// Each target (fuzz_targets/NAME.rs) and the check it wraps.
    const TARGETS: [Target; 5] = [
        ("batch_validate", "check_batch", check_batch),
        ("parse_folded", "check_folded", check_folded),
        ("query_params", "check_query_params", check_query_params),
        ("pprof_import", "check_pprof", check_pprof),
        ("otlp_import", "check_otlp", check_otlp),
    ];

    /// A valid batch within the tight limits: two stacks, one label set.
    fn seed_batch() -> Batch {
        let strings = ["", "main", "hot", "cold;x", "process", "app", "node", "n1"];
        Batch {
            agent_id: "agent-1".into(),
            sequence: 7,
            node: "n1".into(),
            agent_version: "0.1.0".into(),
            window_start_unix_nanos: NOW - 10_000_000_000,
            window_end_unix_nanos: NOW,
            frequency_hz: 99,
            sample_type: None,
            strings: strings.iter().map(|s| s.as_bytes().to_vec()).collect(),
            stacks: vec![Stack { frames: vec![1, 2] }, Stack { frames: vec![1, 3] }],
            label_sets: vec![LabelSet {
                labels: vec![Label { name: 4, value: 5 }, Label { name: 6, value: 7 }],
            }],
            samples: vec![
                Sample {
                    label_set: 0,
                    stack: 0,
                    value: 3,
                },
                Sample {
                    label_set: 0,
                    stack: 1,
                    value: 1,
                },
            ],
        }
    }

    /// The committed binary seed is this batch, encoded; `FUZZ_BLESS=1`
    /// rewrites it.
    #[test]
    fn batch_seed_is_current() {
        let path = seeds("batch_validate").join("seed-valid.bin");
        let encoded = seed_batch().encode_to_vec();
        if std::env::var_os("FUZZ_BLESS").is_some() {
            std::fs::write(&path, &encoded).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            encoded,
            "FUZZ_BLESS=1 rewrites it"
        );
        validate(&seed_batch(), &tight_limits(), NOW).expect("the seed is valid");
    }

    #[test]
    fn seeds_pass_their_checks() {
        for (target, _, check) in TARGETS {
            let dir = seeds(target);
            let mut n = 0;
            for entry in std::fs::read_dir(&dir).unwrap() {
                check(&std::fs::read(entry.unwrap().path()).unwrap());
                n += 1;
            }
            assert!(n > 0, "no seeds in {}", dir.display());
        }
    }

    /// Every target in fuzz_targets/ is a `[[bin]]` of the manifest, wraps
    /// its check and has its seeds replayed above.
    #[test]
    fn every_target_is_declared_and_replayed() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let mut found = Vec::new();
        for entry in std::fs::read_dir(root.join("fuzz_targets")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            let (_, check, _) = TARGETS
                .iter()
                .find(|(t, _, _)| *t == name)
                .unwrap_or_else(|| panic!("{name} is not in TARGETS"));
            let source = std::fs::read_to_string(&path).unwrap();
            assert!(
                source.contains(&format!("profiler_fuzz::{check}(data)")),
                "{name} does not call {check}"
            );
            assert!(
                manifest.contains(&format!(
                    "name = \"{name}\"\npath = \"fuzz_targets/{name}.rs\""
                )),
                "no [[bin]] {name} in fuzz/Cargo.toml"
            );
            found.push(name);
        }
        found.sort();
        let mut expected: Vec<_> = TARGETS.iter().map(|(t, _, _)| t.to_string()).collect();
        expected.sort();
        assert_eq!(found, expected);
    }

    #[test]
    fn selectors_render_and_parse_back() {
        let m = vec![("process".to_string(), r#"a"b\c}"#.to_string())];
        assert_eq!(selection::parse_selector(&render_selector(&m)), Ok(m));
    }
}
