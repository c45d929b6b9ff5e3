//! Turning a stored [`Profile`] into what users read, in the unit of its
//! sample type: flame graph SVGs (inferno), differential flame graphs,
//! gzipped pprof, top-N functions, stack quality, and the titles they carry.
use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
};

use profiler_proto::{frames::stack_cut_of_folded, pprof};
use prost::Message;

use crate::model::{Profile, SampleType, Selector, CPU};

/// Options of a rendered flame graph.
#[derive(Clone, Debug)]
pub struct SvgOptions {
    pub title: String,
    /// Frames narrower than this many pixels are left out.
    pub min_width: f64,
    /// Keep at most about this many frames (nodes of the graph): the heaviest
    /// stacks are kept whole while they fit, the rest are summed into
    /// `[other stacks]`. Bounds the SVG's size.
    pub max_nodes: Option<usize>,
    /// What a frame's value is called in its tooltip ([`count_name`]).
    pub count_name: String,
}

impl Default for SvgOptions {
    fn default() -> Self {
        Self {
            title: "CPU profile".into(),
            min_width: 0.1,
            max_nodes: None,
            count_name: "samples".into(),
        }
    }
}

/// The word a flame graph puts after a frame's value: `samples` for `cpu`,
/// `ns` for nanoseconds, otherwise the unit itself.
pub fn count_name(unit: &str) -> String {
    match unit {
        "nanoseconds" => "ns".into(),
        unit => unit.into(),
    }
}

/// pprof's `sample_type` (also its `period_type`) for a type: `cpu` keeps
/// `samples`/`count`, what `go tool pprof` shows for sampled profiles;
/// other types are their own name and unit (`off_cpu`/`nanoseconds`).
pub fn pprof_value_type(sample_type: &SampleType) -> (&str, &str) {
    if sample_type.name == CPU {
        ("samples", "count")
    } else {
        (&sample_type.name, &sample_type.unit)
    }
}

/// Keeps the heaviest stacks while the graph has at most `max_nodes` frames
/// (one more for `[other stacks]`, where the rest is summed).
pub fn limit_nodes(profile: &Profile, max_nodes: usize) -> Profile {
    let mut by_weight: Vec<(&String, &u64)> = profile.stacks.iter().collect();
    by_weight.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    // A node is a distinct stack prefix.
    let mut nodes: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut out = Profile::default();
    let mut rest = 0u64;
    let budget = max_nodes.saturating_sub(1);
    for (stack, count) in by_weight {
        let prefixes: Vec<&str> = stack
            .match_indices(';')
            .map(|(i, _)| &stack[..i])
            .chain(std::iter::once(stack.as_str()))
            .filter(|p| !nodes.contains(p))
            .collect();
        if nodes.len() + prefixes.len() <= budget {
            nodes.extend(prefixes);
            out.add(stack, *count);
        } else {
            rest = rest.saturating_add(*count);
        }
    }
    if rest > 0 {
        out.add("[other stacks]", rest);
    }
    out
}

fn inferno_options(opts: &SvgOptions) -> inferno::flamegraph::Options<'static> {
    let mut options = inferno::flamegraph::Options::default();
    options.title = opts.title.clone();
    options.count_name = opts.count_name.clone();
    options.min_width = opts.min_width;
    options.hash = true;
    options.deterministic = true;
    options
}

/// A flame graph SVG of `profile`.
pub fn svg(profile: &Profile, opts: &SvgOptions) -> Result<Vec<u8>, String> {
    let profile = match opts.max_nodes {
        Some(max) => limit_nodes(profile, max),
        None => profile.clone(),
    };
    let mut options = inferno_options(opts);
    let folded = profile.folded();
    let mut out = Vec::new();
    let lines: Vec<&str> = if folded.is_empty() {
        options.subtitle = Some("no samples match this selection".into());
        vec!["[no samples] 1"]
    } else {
        folded.lines().collect()
    };
    inferno::flamegraph::from_lines(&mut options, lines, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A differential flame graph: the shape of `after`, red where it grew
/// against `before`, blue where it shrank (counts normalized).
pub fn diff_svg(before: &Profile, after: &Profile, opts: &SvgOptions) -> Result<Vec<u8>, String> {
    let (before, after) = match opts.max_nodes {
        Some(max) => (limit_nodes(before, max), limit_nodes(after, max)),
        None => (before.clone(), after.clone()),
    };
    let mut diff = Vec::new();
    inferno::differential::from_readers(
        inferno::differential::Options {
            normalize: true,
            ..Default::default()
        },
        before.folded().as_bytes(),
        after.folded().as_bytes(),
        &mut diff,
    )
    .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&diff).into_owned();
    let mut options = inferno_options(opts);
    let mut out = Vec::new();
    let lines: Vec<&str> = if text.trim().is_empty() {
        options.subtitle = Some("no samples in either selection".into());
        vec!["[no samples] 1 1"]
    } else {
        text.lines().collect()
    };
    inferno::flamegraph::from_lines(&mut options, lines, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A gzipped pprof profile (`go tool pprof` reads it) of values of
/// `sample_type` (see [`pprof_value_type`]): one function and one location
/// per distinct frame name, samples leaf first.
pub fn pprof_gz(
    profile: &Profile,
    sample_type: &SampleType,
    duration_ns: i64,
    time_ns: i64,
) -> Vec<u8> {
    let mut strings: Vec<String> = vec![String::new()];
    let mut string_ids: HashMap<String, i64> = HashMap::new();
    let mut intern = |s: &str, strings: &mut Vec<String>| -> i64 {
        if let Some(id) = string_ids.get(s) {
            return *id;
        }
        strings.push(s.to_string());
        let id = strings.len() as i64 - 1;
        string_ids.insert(s.to_string(), id);
        id
    };
    let (type_name, unit) = pprof_value_type(sample_type);
    let samples_type = pprof::ValueType {
        r#type: intern(type_name, &mut strings),
        unit: intern(unit, &mut strings),
    };
    let mut functions = Vec::new();
    let mut locations = Vec::new();
    let mut location_ids: HashMap<&str, u64> = HashMap::new();
    let mut samples = Vec::new();
    for (stack, value) in &profile.stacks {
        let mut ids = Vec::new();
        for frame in stack.split(';').rev() {
            let id = match location_ids.get(frame) {
                Some(id) => *id,
                None => {
                    let id = location_ids.len() as u64 + 1;
                    let name = intern(frame, &mut strings);
                    functions.push(pprof::Function {
                        id,
                        name,
                        system_name: name,
                        filename: 0,
                        start_line: 0,
                    });
                    locations.push(pprof::Location {
                        id,
                        mapping_id: 0,
                        address: 0,
                        line: vec![pprof::Line {
                            function_id: id,
                            line: 0,
                        }],
                        is_folded: false,
                    });
                    location_ids.insert(frame, id);
                    id
                }
            };
            ids.push(id);
        }
        samples.push(pprof::Sample {
            location_id: ids,
            value: vec![i64::try_from(*value).unwrap_or(i64::MAX)],
            label: Vec::new(),
        });
    }
    let profile = pprof::Profile {
        sample_type: vec![samples_type],
        sample: samples,
        mapping: Vec::new(),
        location: locations,
        function: functions,
        string_table: strings,
        time_nanos: time_ns,
        duration_nanos: duration_ns,
        period_type: Some(samples_type),
        period: 1,
        comment: Vec::new(),
        default_sample_type: 0,
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&profile.encode_to_vec())
        .expect("writing to memory");
    gz.finish().expect("writing to memory")
}

/// A function's share of a profile, in the unit of the profile's type.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TopEntry {
    pub function: String,
    /// Value of the stacks where it is the leaf.
    #[serde(rename = "self")]
    pub self_value: u64,
    /// Value of the stacks where it is anywhere.
    pub total: u64,
}

/// The `n` functions with the most self value (ties by total, then name).
/// The first frame of a stack (the process) is not a function.
pub fn top(profile: &Profile, n: usize) -> Vec<TopEntry> {
    let mut by_name: HashMap<&str, (u64, u64)> = HashMap::new();
    for (stack, value) in &profile.stacks {
        // An off-CPU wait's functions are those that waited, not its
        // waker's.
        let waited = profiler_proto::frames::waited_part(stack);
        let frames: Vec<&str> = waited.split(';').skip(1).collect();
        if let Some(leaf) = frames.last() {
            let entry = by_name.entry(leaf).or_default();
            entry.0 = entry.0.saturating_add(*value);
        }
        let mut seen: Vec<&str> = Vec::with_capacity(frames.len());
        for frame in frames {
            if !seen.contains(&frame) {
                seen.push(frame);
                let entry = by_name.entry(frame).or_default();
                entry.1 = entry.1.saturating_add(*value);
            }
        }
    }
    let mut entries: Vec<TopEntry> = by_name
        .into_iter()
        .map(|(f, (s, t))| TopEntry {
            function: f.to_string(),
            self_value: s,
            total: t,
        })
        .collect();
    entries.sort_by(|a, b| {
        b.self_value
            .cmp(&a.self_value)
            .then(b.total.cmp(&a.total))
            .then_with(|| a.function.cmp(&b.function))
    });
    entries.truncate(n);
    entries
}

/// How much of a profile's value has complete stacks: the stacks whose
/// second frame is a `[stack cut: REASON]` marker
/// ([`profiler_proto::frames`]) stopped early; any other stack, stored
/// before agents marked cut stacks too, counts as complete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackQuality {
    pub total: u64,
    /// Value of the cut stacks, by the reason their marker names.
    pub cut: BTreeMap<String, u64>,
}

impl StackQuality {
    pub fn of(profile: &Profile) -> Self {
        let mut quality = StackQuality::default();
        for (stack, value) in &profile.stacks {
            quality.total = quality.total.saturating_add(*value);
            if let Some(reason) = stack_cut_of_folded(stack) {
                let cut = quality.cut.entry(reason.to_string()).or_default();
                *cut = cut.saturating_add(*value);
            }
        }
        quality
    }

    /// Value of the stacks without a marker.
    pub fn complete(&self) -> u64 {
        self.total.saturating_sub(self.cut_total())
    }

    /// Value of the cut stacks.
    pub fn cut_total(&self) -> u64 {
        self.cut.values().fold(0u64, |t, v| t.saturating_add(*v))
    }

    /// `value`'s share of the total, 0-1; `None` for an empty profile.
    pub fn share(&self, value: u64) -> Option<f64> {
        (self.total > 0).then(|| value as f64 / self.total as f64)
    }

    /// The cut reasons, most value first (ties by name).
    pub fn reasons(&self) -> Vec<(&str, u64)> {
        let mut reasons: Vec<(&str, u64)> =
            self.cut.iter().map(|(r, v)| (r.as_str(), *v)).collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        reasons
    }
}

/// What a flame graph of a type is called: `CPU` for `cpu`, else the type.
pub fn type_title(sample_type: &SampleType) -> String {
    if sample_type.name == CPU {
        "CPU".to_string()
    } else {
        format!("{} ({})", sample_type.name, sample_type.unit)
    }
}

/// The title of a flame graph of `sel`: what it shows, its labels, its span.
pub fn title(sel: &Selector, what: &str) -> String {
    let labels: Vec<String> = sel
        .matchers
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let span = (sel.end_ns - sel.start_ns) as f64 / 1e9;
    let labels = if labels.is_empty() {
        "all".to_string()
    } else {
        labels.join(", ")
    };
    format!(
        "{what}: {labels} — {}",
        humantime::format_duration(std::time::Duration::from_secs(span as u64))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        let mut p = Profile::default();
        p.add("app;main;hot", 6);
        p.add("app;main;cold", 2);
        p.add("app;main;hot;memcpy", 2);
        p
    }

    #[test]
    fn top_counts_self_and_total() {
        let t = top(&profile(), 10);
        assert_eq!(
            t[0],
            TopEntry {
                function: "hot".into(),
                self_value: 6,
                total: 8
            }
        );
        let main = t.iter().find(|e| e.function == "main").unwrap();
        assert_eq!((main.self_value, main.total), (0, 10));
        assert!(
            t.iter().all(|e| e.function != "app"),
            "the process is not a function"
        );
        assert_eq!(top(&profile(), 1).len(), 1);
    }

    #[test]
    fn stack_quality_counts_marked_stacks_by_reason() {
        let mut p = profile();
        p.add("app;[stack cut: no_table];hot", 4);
        p.add("app;[stack cut: bad_read];x;hot", 3);
        p.add("other;[stack cut: no_table]", 1);
        // Not markers: not the second frame, or not a reason.
        p.add("app;main;[stack cut: no_table]", 5);
        p.add("app;[stack cut: ];main", 2);
        let q = StackQuality::of(&p);
        assert_eq!(q.total, 25);
        assert_eq!(q.cut_total(), 8);
        assert_eq!(q.complete(), 17);
        assert_eq!(q.reasons(), vec![("no_table", 5), ("bad_read", 3)]);
        assert_eq!(q.share(q.cut_total()), Some(0.32));
        let old = StackQuality::of(&profile());
        assert_eq!((old.complete(), old.total), (10, 10), "no marker: complete");
        let empty = StackQuality::of(&Profile::default());
        assert_eq!(empty.share(0), None);
        assert!(empty.reasons().is_empty());
    }

    #[test]
    fn svg_and_diff_render() {
        let text = String::from_utf8(svg(&profile(), &SvgOptions::default()).unwrap()).unwrap();
        assert!(text.contains("hot (8 samples, 80.00%)"), "{text}");
        let mut after = profile();
        after.add("app;main;cold", 10);
        let diff = String::from_utf8(diff_svg(&profile(), &after, &SvgOptions::default()).unwrap())
            .unwrap();
        assert!(diff.contains("cold"));
        let empty =
            String::from_utf8(svg(&Profile::default(), &SvgOptions::default()).unwrap()).unwrap();
        assert!(empty.contains("no samples match"));
    }

    #[test]
    fn an_off_cpu_flame_graph_counts_nanoseconds() {
        let mut p = Profile::default();
        p.add("app;main;read", 3_000_000_000);
        p.add("app;main;poll", 1_000_000_000);
        let opts = SvgOptions {
            count_name: count_name("nanoseconds"),
            ..SvgOptions::default()
        };
        let text = String::from_utf8(svg(&p, &opts).unwrap()).unwrap();
        assert!(text.contains("read (3,000,000,000 ns, 75.00%)"), "{text}");
        assert!(!text.contains(" samples,"), "{text}");
        assert_eq!(count_name("samples"), "samples");
        assert_eq!(count_name("bytes"), "bytes");
    }

    #[test]
    fn limit_keeps_heaviest_and_sums_the_rest() {
        // app;main;hot is 3 nodes; +1 for [other stacks].
        let l = limit_nodes(&profile(), 4);
        assert_eq!(l.folded(), "[other stacks] 4\napp;main;hot 6\n");
        assert_eq!(l.total(), profile().total());
        // memcpy adds one node under hot, cold one under main.
        let l = limit_nodes(&profile(), 6);
        assert_eq!(l.stacks.len(), 3);
        assert_eq!(limit_nodes(&profile(), 100), profile());
    }

    fn decode(gz: &[u8]) -> pprof::Profile {
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut raw).unwrap();
        pprof::Profile::decode(&raw[..]).unwrap()
    }

    #[test]
    fn pprof_value_types_follow_the_sample_type() {
        let value_type = |p: &pprof::Profile, t: &pprof::ValueType| {
            (
                p.string_table[t.r#type as usize].clone(),
                p.string_table[t.unit as usize].clone(),
            )
        };
        for (sample_type, want) in [
            (SampleType::cpu(), ("samples", "count")),
            (SampleType::off_cpu(), ("off_cpu", "nanoseconds")),
            (
                SampleType::new("alloc_space", "bytes"),
                ("alloc_space", "bytes"),
            ),
        ] {
            let p = decode(&pprof_gz(&profile(), &sample_type, 1, 1));
            let want = (want.0.to_string(), want.1.to_string());
            assert_eq!(p.sample_type.len(), 1);
            assert_eq!(value_type(&p, &p.sample_type[0]), want);
            assert_eq!(value_type(&p, p.period_type.as_ref().unwrap()), want);
        }
    }

    #[test]
    fn pprof_decodes_back() {
        let gz = pprof_gz(&profile(), &SampleType::cpu(), 10_000_000_000, 1);
        let p = decode(&gz);
        assert_eq!(p.sample.len(), 3);
        let total: i64 = p.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 10);
        // Leaf first: the first location of the memcpy sample names memcpy.
        let name = |loc: u64| {
            let f = &p.function[(loc - 1) as usize];
            p.string_table[f.name as usize].clone()
        };
        let memcpy = p.sample.iter().find(|s| s.location_id.len() == 4).unwrap();
        assert_eq!(name(memcpy.location_id[0]), "memcpy");
        assert_eq!(name(*memcpy.location_id.last().unwrap()), "app");
    }
}
