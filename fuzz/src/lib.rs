//! What the fuzz targets check, beyond "does not panic": each `check_*`
//! feeds one input to the real parsing path and asserts the invariants its
//! output must satisfy. The targets in `fuzz_targets/` are one-line wrappers,
//! so the tests below replay the committed seeds through the same code.
use std::collections::HashMap;

use profiler_agent::fold::{parse_folded, FoldedProfile};
use profiler_collector::{
    model::{Profile, ValidBatch},
    render, selection,
    validate::{self, valid_label_name, validate, Limits},
};
use profiler_proto::v1::Batch;
use prost::Message;

/// The clock the batch target validates against (2027-01-15).
pub const NOW: i64 = 1_800_000_000_000_000_000;

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
            Ok(valid) => check_valid_batch(&batch, &valid, &limits),
            Err(rejection) => {
                assert!(!rejection.reason().is_empty());
                assert!(!rejection.to_string().is_empty());
            }
        }
    }
}

fn check_valid_batch(batch: &Batch, v: &ValidBatch, limits: &Limits) {
    assert!(!v.agent_id.trim().is_empty());
    assert_eq!(
        (&v.agent_id, v.sequence, &v.node),
        (&batch.agent_id, batch.sequence, &batch.node)
    );
    let (start, end) = (v.window_start_ns, v.window_end_ns);
    assert!(0 < start && start <= end, "window {start}..{end}");
    assert!(end - start <= limits.max_window_ns);
    assert!(end <= NOW + limits.max_future_ns);
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
        for (target, check) in [
            ("batch_validate", check_batch as fn(&[u8])),
            ("parse_folded", check_folded),
            ("query_params", check_query_params),
        ] {
            let dir = seeds(target);
            let mut n = 0;
            for entry in std::fs::read_dir(&dir).unwrap() {
                check(&std::fs::read(entry.unwrap().path()).unwrap());
                n += 1;
            }
            assert!(n > 0, "no seeds in {}", dir.display());
        }
    }

    #[test]
    fn selectors_render_and_parse_back() {
        let m = vec![("process".to_string(), r#"a"b\c}"#.to_string())];
        assert_eq!(selection::parse_selector(&render_selector(&m)), Ok(m));
    }
}
