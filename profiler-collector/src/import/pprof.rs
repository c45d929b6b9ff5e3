//! pprof profiles (gzipped or plain) to batches: one batch per sample
//! type, stacks root first with inlined frames `_[i]`, the caller's labels
//! and each sample's string labels, the window of the file.
use std::collections::HashMap;

use profiler_proto::{
    pprof::{Function, Location, Mapping, Profile},
    v1::Batch,
};
use prost::Message;

use super::{
    frequency_hz, label_name, sample_type, window, BatchBuilder, Frames, Header, ImportError,
    LabelsBuilder, Source,
};
use crate::validate::Limits;

/// The profile in `body`, inflated first when it is gzipped (magic
/// `1f 8b`); more than `max_bytes` (inflated) is refused.
pub fn decode(body: &[u8], max_bytes: usize) -> Result<Profile, ImportError> {
    if body.is_empty() {
        return Err(ImportError::Empty);
    }
    let too_large = ImportError::TooLarge { limit: max_bytes };
    let inflated;
    let bytes = if body.starts_with(&[0x1f, 0x8b]) {
        inflated = super::inflate(body, max_bytes)?;
        &inflated[..]
    } else {
        body
    };
    if bytes.len() > max_bytes {
        return Err(too_large);
    }
    Profile::decode(bytes).map_err(|e| ImportError::Undecodable(e.to_string()))
}

/// The process name of the program a profile is of, as the agent names
/// processes (the kernel's `comm`: the executable's file name, at most 15
/// bytes): from the first mapping (Go puts its executable first). The root
/// frame of an imported stack, so Go's own profile and the agent's profile
/// of the same program line up in a diff.
pub fn process_name(profile: &Profile) -> Option<String> {
    let mapping = profile.mapping.first()?;
    let path = profile
        .string_table
        .get(usize::try_from(mapping.filename).ok()?)?;
    let name = path.rsplit('/').next()?.trim();
    if name.is_empty() || name.starts_with('[') {
        return None;
    }
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Some(name[..end].to_string())
}

/// `labels` with a `process` label, named after the profiled program
/// ([`process_name`]) when the caller gave none.
pub fn with_process(mut labels: Vec<(String, String)>, profile: &Profile) -> Vec<(String, String)> {
    if !labels.iter().any(|(k, _)| k == "process") {
        if let Some(name) = process_name(profile) {
            labels.push(("process".into(), name));
            labels.sort();
        }
    }
    labels
}

/// The batches of `profile`: one per sample type that has a non-zero
/// value, labeled with `labels` (query parameters; they win over a
/// sample's labels of the same name) and each sample's string labels.
/// The `process` label of `labels`, when given, is every stack's root.
pub fn to_batches(
    profile: &Profile,
    labels: &[(String, String)],
    source: &Source,
) -> Result<Vec<Batch>, ImportError> {
    let strings = Strings::new(&profile.string_table)?;
    check_strings(profile, &strings)?;
    let mappings = by_id(&profile.mapping, "mapping", |m| m.id)?;
    let functions = by_id(&profile.function, "function", |f| f.id)?;
    let mut frames = Frames::default();
    let mut locations: HashMap<u64, Vec<u32>> = HashMap::with_capacity(profile.location.len());
    for (i, location) in profile.location.iter().enumerate() {
        let resolved = location_frames(i, location, &mappings, &functions, &strings, &mut frames)?;
        if locations.insert(location.id, resolved).is_some() || location.id == 0 {
            return Err(bad_id("location", i, location.id));
        }
    }

    let mut caller = LabelsBuilder::default();
    for (i, (key, value)) in labels.iter().enumerate() {
        let name = label_name(key)
            .ok_or_else(|| ImportError::attribute(format!("labels[{i}]"), "has an empty name"))?;
        caller.add(name, value.clone());
    }
    let root = caller.get("process").map(|p| frames.id(p, ""));

    let mut builders = Vec::with_capacity(profile.sample_type.len());
    let mut headers = Vec::with_capacity(profile.sample_type.len());
    let period_unit = match &profile.period_type {
        Some(t) => Some(strings.get(t.unit, || "period_type.unit".into())?),
        None => None,
    };
    let window = window(profile.time_nanos, profile.duration_nanos)
        .map_err(|e| ImportError::value("time_nanos/duration_nanos", e))?;
    for (i, t) in profile.sample_type.iter().enumerate() {
        let path = || format!("sample_type[{i}]");
        let name = strings.get(t.r#type, || format!("sample_type[{i}].type"))?;
        let unit = strings.get(t.unit, || format!("sample_type[{i}].unit"))?;
        let sample_type = sample_type(name, unit).map_err(|e| ImportError::value(path(), e))?;
        let frequency_hz = frequency_hz(&sample_type.0, period_unit, profile.period)
            .map_err(|e| ImportError::value(path(), e))?;
        builders.push(BatchBuilder::new(path(), &sample_type.0));
        headers.push(Header {
            agent_id: source.agent_id.clone(),
            node: source.node.clone(),
            agent_version: String::new(),
            window,
            frequency_hz,
            sample_type,
        });
    }

    let max_frames = Limits::default().max_frames;
    let mut stack: Vec<u32> = Vec::new();
    for (s, sample) in profile.sample.iter().enumerate() {
        if sample.value.len() != builders.len() {
            return Err(ImportError::value(
                format!("sample[{s}].value"),
                format!(
                    "has {} entries, not one per sample type ({})",
                    sample.value.len(),
                    builders.len()
                ),
            ));
        }
        if let Some(v) = sample.value.iter().position(|v| *v < 0) {
            return Err(ImportError::value(
                format!("sample[{s}].value[{v}]"),
                format!("{} is negative", sample.value[v]),
            ));
        }
        stack.clear();
        stack.extend(root);
        for (l, id) in sample.location_id.iter().enumerate().rev() {
            let frames = locations.get(id).ok_or_else(|| ImportError::UnknownId {
                path: format!("sample[{s}].location_id[{l}]"),
                id: *id,
                table: "location",
            })?;
            stack.extend(frames);
            if stack.len() > max_frames {
                return Err(ImportError::StackTooDeep {
                    path: format!("sample[{s}]"),
                    limit: max_frames,
                });
            }
        }
        if stack.is_empty() {
            stack.push(frames.id("[unknown]", ""));
        }

        let mut labels = caller.clone();
        for (l, label) in sample.label.iter().enumerate() {
            let value = strings.get(label.str, || format!("sample[{s}].label[{l}].str"))?;
            if value.is_empty() {
                // A numeric label.
                continue;
            }
            let key = strings.get(label.key, || format!("sample[{s}].label[{l}].key"))?;
            let name = label_name(key).ok_or_else(|| {
                ImportError::attribute(format!("sample[{s}].label[{l}].key"), "is empty")
            })?;
            labels.add(name, value.to_string());
        }
        let labels = labels.sorted();
        if sample.value.iter().all(|v| *v == 0) {
            continue;
        }

        for (builder, value) in builders.iter_mut().zip(&sample.value) {
            if *value == 0 {
                continue;
            }
            let set = builder.label_set(&labels)?;
            let stack = builder.stack(&frames, &stack)?;
            builder.add(set, stack, *value, || format!("sample[{s}]"))?;
        }
    }
    Ok(builders
        .into_iter()
        .zip(headers)
        .filter_map(|(builder, header)| builder.finish(header))
        .collect())
}

/// The string table, its entry 0 checked.
struct Strings<'a>(&'a [String]);

impl<'a> Strings<'a> {
    fn new(table: &'a [String]) -> Result<Self, ImportError> {
        match table.first() {
            Some(first) if !first.is_empty() => Err(ImportError::ZeroValue {
                path: "string_table[0]".into(),
                expected: "\"\"",
            }),
            _ => Ok(Self(table)),
        }
    }

    /// Entry `index` (0 is "", also in an empty table); `path` names the
    /// field that holds it.
    fn get(&self, index: i64, path: impl FnOnce() -> String) -> Result<&'a str, ImportError> {
        if index == 0 && self.0.is_empty() {
            return Ok("");
        }
        usize::try_from(index)
            .ok()
            .and_then(|i| self.0.get(i))
            .map(String::as_str)
            .ok_or_else(|| ImportError::IndexOutOfRange {
                path: path(),
                index,
                table: "string_table",
                len: self.0.len(),
            })
    }
}

/// Checks every string index of the tables (also those no conversion
/// step reads).
fn check_strings(profile: &Profile, strings: &Strings) -> Result<(), ImportError> {
    for (i, f) in profile.function.iter().enumerate() {
        strings.get(f.name, || format!("function[{i}].name"))?;
        strings.get(f.system_name, || format!("function[{i}].system_name"))?;
        strings.get(f.filename, || format!("function[{i}].filename"))?;
    }
    for (i, m) in profile.mapping.iter().enumerate() {
        strings.get(m.filename, || format!("mapping[{i}].filename"))?;
        strings.get(m.build_id, || format!("mapping[{i}].build_id"))?;
    }
    for (s, sample) in profile.sample.iter().enumerate() {
        for (l, label) in sample.label.iter().enumerate() {
            strings.get(label.key, || format!("sample[{s}].label[{l}].key"))?;
            strings.get(label.num_unit, || {
                format!("sample[{s}].label[{l}].num_unit")
            })?;
        }
    }
    if let Some(t) = &profile.period_type {
        strings.get(t.r#type, || "period_type.type".into())?;
    }
    for (i, c) in profile.comment.iter().enumerate() {
        strings.get(*c, || format!("comment[{i}]"))?;
    }
    strings.get(profile.default_sample_type, || "default_sample_type".into())?;
    Ok(())
}

fn bad_id(table: &str, index: usize, id: u64) -> ImportError {
    ImportError::BadId {
        path: format!("{table}[{index}].id"),
        message: if id == 0 {
            "0 is not an id (ids start at 1)".into()
        } else {
            format!("{id} is the id of another {table} too")
        },
    }
}

/// The entries of `table` (with their index) by their id (unique, not 0).
fn by_id<'a, T>(
    table: &'a [T],
    name: &str,
    id: impl Fn(&T) -> u64,
) -> Result<HashMap<u64, (usize, &'a T)>, ImportError> {
    let mut out = HashMap::with_capacity(table.len());
    for (i, entry) in table.iter().enumerate() {
        if id(entry) == 0 || out.insert(id(entry), (i, entry)).is_some() {
            return Err(bad_id(name, i, id(entry)));
        }
    }
    Ok(out)
}

/// The frames of location `i`, caller first: its lines reversed, every
/// one but the caller marked inlined (`_[i]`); `BASENAME+0xOFFSET` (or
/// `0xADDRESS`) for a location without lines.
fn location_frames(
    i: usize,
    location: &Location,
    mappings: &HashMap<u64, (usize, &Mapping)>,
    functions: &HashMap<u64, (usize, &Function)>,
    strings: &Strings,
    frames: &mut Frames,
) -> Result<Vec<u32>, ImportError> {
    let mapping = match location.mapping_id {
        0 => None,
        id => Some(mappings.get(&id).ok_or_else(|| ImportError::UnknownId {
            path: format!("location[{i}].mapping_id"),
            id,
            table: "mapping",
        })?),
    };
    if location.line.is_empty() {
        let name = match mapping {
            Some((m, mapping)) => {
                let file = strings.get(mapping.filename, || format!("mapping[{m}].filename"))?;
                address_frame(
                    file,
                    location.address,
                    mapping.memory_start,
                    mapping.file_offset,
                )
            }
            None => address_frame("", location.address, 0, 0),
        };
        return Ok(vec![frames.id(&name, "")]);
    }
    let mut out = Vec::with_capacity(location.line.len());
    for (l, line) in location.line.iter().enumerate().rev() {
        let name = match line.function_id {
            0 => "",
            id => {
                let (f, function) = functions.get(&id).ok_or_else(|| ImportError::UnknownId {
                    path: format!("location[{i}].line[{l}].function_id"),
                    id,
                    table: "function",
                })?;
                strings.get(function.name, || format!("function[{f}].name"))?
            }
        };
        let name = if name.is_empty() { "[unknown]" } else { name };
        let inlined = l + 1 < location.line.len();
        out.push(frames.id(name, if inlined { "_[i]" } else { "" }));
    }
    Ok(out)
}

/// `BASENAME+0xOFFSET` of an address in the file `file` mapped at
/// `memory_start` from `file_offset`; `0xADDRESS` without a file name or
/// for an address below the mapping.
pub(crate) fn address_frame(
    file: &str,
    address: u64,
    memory_start: u64,
    file_offset: u64,
) -> String {
    let base = file.rsplit('/').next().unwrap_or_default();
    match address.checked_sub(memory_start) {
        Some(offset) if !base.is_empty() => {
            format!("{base}+0x{:x}", offset.wrapping_add(file_offset))
        }
        _ => format!("0x{address:x}"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use profiler_proto::pprof::{Label, Line, Sample, ValueType};

    use super::*;
    use crate::import::testing::{assert_valid, folded, kv, labeled, type_of};

    /// Builds a pprof profile the way Go's runtime/pprof writes one.
    #[derive(Default)]
    struct GoProfile {
        p: Profile,
        strings: HashMap<String, i64>,
    }

    impl GoProfile {
        fn new() -> Self {
            let mut g = GoProfile::default();
            g.s("");
            g
        }

        fn s(&mut self, s: &str) -> i64 {
            if let Some(i) = self.strings.get(s) {
                return *i;
            }
            let i = self.p.string_table.len() as i64;
            self.p.string_table.push(s.to_string());
            self.strings.insert(s.to_string(), i);
            i
        }

        fn value_type(&mut self, t: &str, u: &str) -> ValueType {
            ValueType {
                r#type: self.s(t),
                unit: self.s(u),
            }
        }

        fn function(&mut self, name: &str) -> u64 {
            let id = self.p.function.len() as u64 + 1;
            let name = self.s(name);
            let filename = self.s("/src/main.go");
            self.p.function.push(Function {
                id,
                name,
                system_name: name,
                filename,
                start_line: 1,
            });
            id
        }

        /// A location whose lines are `names`, innermost first.
        fn location(&mut self, names: &[&str]) -> u64 {
            let line = names
                .iter()
                .map(|n| Line {
                    function_id: self.function(n),
                    line: 10,
                })
                .collect();
            let id = self.p.location.len() as u64 + 1;
            self.p.location.push(Location {
                id,
                mapping_id: 1,
                address: 0x401000 + id * 16,
                line,
                is_folded: false,
            });
            id
        }

        fn sample(&mut self, locations: &[u64], values: &[i64], labels: &[(&str, &str)]) {
            let label = labels
                .iter()
                .map(|(k, v)| Label {
                    key: self.s(k),
                    str: self.s(v),
                    num: 0,
                    num_unit: 0,
                })
                .collect();
            self.p.sample.push(Sample {
                location_id: locations.to_vec(),
                value: values.to_vec(),
                label,
            });
        }
    }

    const T0: i64 = 1_700_000_000_000_000_000;

    /// A Go CPU profile: samples/count and cpu/nanoseconds at 100 Hz over
    /// 10 s, with an inlined frame and a goroutine label.
    fn go_cpu() -> Profile {
        let mut g = GoProfile::new();
        g.p.sample_type = vec![
            g.value_type("samples", "count"),
            g.value_type("cpu", "nanoseconds"),
        ];
        g.p.period_type = Some(g.value_type("cpu", "nanoseconds"));
        g.p.period = 10_000_000;
        g.p.time_nanos = T0;
        g.p.duration_nanos = 10_000_000_000;
        let file = g.s("/usr/local/bin/server");
        g.p.mapping.push(Mapping {
            id: 1,
            memory_start: 0x400000,
            memory_limit: 0x800000,
            file_offset: 0,
            filename: file,
            build_id: 0,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
        let goexit = g.location(&["runtime.goexit"]);
        let main = g.location(&["main.main"]);
        // (*T).step inlined into (*T).work.
        let work = g.location(&["main.(*T).step", "main.(*T).work"]);
        let malloc = g.location(&["runtime.mallocgc"]);
        g.sample(&[work, main, goexit], &[7, 70_000_000], &[]);
        g.sample(
            &[malloc, work, main, goexit],
            &[2, 20_000_000],
            &[("handler", "/api")],
        );
        g.sample(&[main, goexit], &[0, 0], &[]);
        g.p
    }

    /// A Go mutex profile: contentions/count and delay/nanoseconds.
    fn go_mutex() -> Profile {
        let mut g = GoProfile::new();
        g.p.sample_type = vec![
            g.value_type("contentions", "count"),
            g.value_type("delay", "nanoseconds"),
        ];
        g.p.period_type = Some(g.value_type("contentions", "count"));
        g.p.period = 1;
        g.p.time_nanos = T0;
        g.p.mapping.push(Mapping {
            id: 1,
            ..Default::default()
        });
        let goexit = g.location(&["runtime.goexit"]);
        let unlock = g.location(&["sync.(*Mutex).Unlock"]);
        let handle = g.location(&["main.handle"]);
        g.sample(&[unlock, handle, goexit], &[3, 1_500_000], &[]);
        // Contended, but no delay recorded.
        g.sample(&[handle, goexit], &[1, 0], &[]);
        g.p
    }

    fn source() -> Source {
        Source {
            agent_id: "pprof/upload".into(),
            node: "laptop".into(),
        }
    }

    fn convert(p: &Profile) -> Vec<Batch> {
        let batches = to_batches(p, &[kv("service", "api")], &source()).unwrap();
        assert_valid(&batches);
        batches
    }

    fn refuse(p: &Profile) -> ImportError {
        to_batches(p, &[], &source()).unwrap_err()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn a_go_cpu_profile_is_one_batch_per_sample_type() {
        let batches = convert(&go_cpu());
        assert_eq!(batches.len(), 2);
        assert_eq!(type_of(&batches[0]), "samples/count");
        assert_eq!(type_of(&batches[1]), "cpu_nanoseconds/nanoseconds");
        let work = "runtime.goexit;main.main;main.(*T).work;main.(*T).step_[i]";
        assert_eq!(
            folded(&batches[0]),
            [
                (work.to_string(), 7),
                (format!("{work};runtime.mallocgc"), 2)
            ]
            .into()
        );
        assert_eq!(
            folded(&batches[1]),
            [
                (work.to_string(), 70_000_000),
                (format!("{work};runtime.mallocgc"), 20_000_000)
            ]
            .into()
        );
        for b in &batches {
            assert_eq!(b.agent_id, "pprof/upload");
            assert_eq!(b.node, "laptop");
            assert_eq!(b.window_start_unix_nanos, T0);
            assert_eq!(b.window_end_unix_nanos, T0 + 10_000_000_000);
            // Not `cpu`: no sampling frequency (the store reads a non-zero
            // one as a CPU sampling frequency).
            assert_eq!(b.frequency_hz, 0);
        }
        assert_eq!(
            labeled(&batches[0]),
            vec![
                (work.to_string(), vec![kv("service", "api")], 7),
                (
                    format!("{work};runtime.mallocgc"),
                    vec![kv("handler", "/api"), kv("service", "api")],
                    2
                ),
            ]
        );
    }

    #[test]
    fn converted_batches_pass_validation() {
        use crate::{
            import::testing::NOW,
            model::SampleType,
            validate::{validate, Limits},
        };
        let labels = [kv("process", "server"), kv("Service.Name", "api")];
        for profile in [go_cpu(), go_mutex()] {
            for batch in to_batches(&profile, &labels, &source()).unwrap() {
                let valid = validate(&batch, &Limits::default(), NOW).unwrap();
                let t = batch.sample_type.as_ref().unwrap();
                assert_eq!(valid.sample_type, SampleType::new(&t.r#type, &t.unit));
                assert!(valid
                    .stacks
                    .iter()
                    .all(|s| s.starts_with("server;runtime.goexit")));
                assert!(valid
                    .label_sets
                    .iter()
                    .all(|l| l.contains(&kv("service_name", "api"))));
            }
        }
    }

    #[test]
    fn the_process_label_is_the_root_and_caller_labels_win() {
        let mut p = go_cpu();
        p.sample.truncate(2);
        let labels = [
            kv("process", "server"),
            kv("Handler", "caller"),
            kv("1x", "y"),
        ];
        let batches = to_batches(&p, &labels, &source()).unwrap();
        assert_valid(&batches);
        let samples = labeled(&batches[0]);
        assert!(samples
            .iter()
            .all(|(stack, _, _)| stack.starts_with("server;runtime.goexit;")));
        let expected = vec![
            kv("_1x", "y"),
            kv("handler", "caller"),
            kv("process", "server"),
        ];
        assert!(samples.iter().all(|(_, labels, _)| *labels == expected));
    }

    #[test]
    fn a_mutex_profile_leaves_out_zero_values() {
        let batches = convert(&go_mutex());
        assert_eq!(batches.len(), 2);
        assert_eq!(type_of(&batches[0]), "contentions/count");
        assert_eq!(
            folded(&batches[0]),
            [
                (
                    "runtime.goexit;main.handle;sync.(*Mutex).Unlock".to_string(),
                    3
                ),
                ("runtime.goexit;main.handle".to_string(), 1),
            ]
            .into()
        );
        assert_eq!(type_of(&batches[1]), "delay/nanoseconds");
        assert_eq!(
            folded(&batches[1]),
            [(
                "runtime.goexit;main.handle;sync.(*Mutex).Unlock".to_string(),
                1_500_000
            )]
            .into()
        );
        // Duration 0: a 1 ns window at the profile's time.
        assert_eq!(batches[1].window_start_unix_nanos, T0);
        assert_eq!(batches[1].window_end_unix_nanos, T0 + 1);
    }

    #[test]
    fn types_without_samples_give_no_batch() {
        let mut p = go_mutex();
        for s in &mut p.sample {
            s.value[1] = 0;
        }
        let batches = convert(&p);
        assert_eq!(batches.len(), 1);
        assert_eq!(type_of(&batches[0]), "contentions/count");
        p.sample.clear();
        assert!(convert(&p).is_empty());
    }

    #[test]
    fn a_cpu_samples_profile_keeps_its_frequency() {
        let mut g = GoProfile::new();
        g.p.sample_type = vec![g.value_type("cpu", "samples")];
        g.p.period_type = Some(g.value_type("cpu", "nanoseconds"));
        g.p.period = 10_101_010;
        g.p.time_nanos = T0;
        g.p.duration_nanos = 1_000_000_000;
        g.p.mapping.push(Mapping {
            id: 1,
            ..Default::default()
        });
        let f = g.location(&["f"]);
        g.sample(&[f], &[4], &[]);
        let batches = convert(&g.p);
        assert_eq!(type_of(&batches[0]), "cpu/samples");
        assert_eq!(batches[0].frequency_hz, 99);
        g.p.period_type = None;
        assert_eq!(refuse(&g.p).reason(), "bad_value");
    }

    #[test]
    fn locations_without_lines_are_addresses() {
        let mut p = go_cpu();
        p.mapping[0].file_offset = 0x1000;
        p.location[3].line.clear();
        p.location[3].address = 0x401234;
        p.location[2].mapping_id = 0;
        p.location[2].line.clear();
        p.location[2].address = 0xabc;
        p.sample.truncate(2);
        let stacks: Vec<String> = folded(&convert(&p)[0]).into_keys().collect();
        assert_eq!(
            stacks,
            [
                "runtime.goexit;main.main;0xabc",
                "runtime.goexit;main.main;0xabc;server+0x2234"
            ]
        );
        assert_eq!(address_frame("/lib/libc.so.6", 0x10, 0x20, 0), "0x10");
        assert_eq!(address_frame("", 0x30, 0x20, 0), "0x30");
    }

    #[test]
    fn functions_without_names_and_empty_stacks_are_unknown() {
        let mut p = go_mutex();
        let f = p.function.iter_mut().find(|f| f.id == 2).unwrap();
        f.name = 0;
        p.sample.push(Sample {
            location_id: vec![],
            value: vec![1, 5],
            label: vec![],
        });
        let batches = convert(&p);
        assert_eq!(
            folded(&batches[1]),
            [
                (
                    "runtime.goexit;main.handle;[unknown]".to_string(),
                    1_500_000
                ),
                ("[unknown]".to_string(), 5)
            ]
            .into()
        );
    }

    #[test]
    fn numeric_labels_are_ignored() {
        let mut p = go_mutex();
        let (key, unit) = (p.string_table.len() as i64, p.string_table.len() as i64 + 1);
        p.string_table
            .extend(["bytes".to_string(), "byte".to_string()]);
        p.sample[0].label.push(Label {
            key,
            str: 0,
            num: 4096,
            num_unit: unit,
        });
        let samples = labeled(&convert(&p)[0]);
        assert!(samples
            .iter()
            .all(|(_, l, _)| *l == vec![kv("service", "api")]));
    }

    #[test]
    fn the_sequence_is_a_stable_content_hash() {
        let a = convert(&go_cpu());
        let b = convert(&go_cpu());
        assert_eq!(a, b);
        assert_ne!(a[0].sequence, a[1].sequence);
        let mut p = go_cpu();
        p.sample[0].value[0] = 8;
        let c = convert(&p);
        assert_ne!(c[0].sequence, a[0].sequence);
        assert_eq!(c[1].sequence, a[1].sequence);
        // The agent id is not part of the content.
        let other = Source {
            agent_id: "other".into(),
            ..source()
        };
        let d = to_batches(&go_cpu(), &[kv("service", "api")], &other).unwrap();
        assert_eq!(d[0].sequence, a[0].sequence);
        let e = to_batches(&go_cpu(), &[kv("service", "web")], &source()).unwrap();
        assert_ne!(e[0].sequence, a[0].sequence);
    }

    #[test]
    fn decode_reads_gzipped_and_plain_profiles() {
        let plain = go_cpu().encode_to_vec();
        assert_eq!(decode(&plain, 1 << 20).unwrap(), go_cpu());
        assert_eq!(decode(&gzip(&plain), 1 << 20).unwrap(), go_cpu());
        let e = decode(&plain, 16).unwrap_err();
        assert_eq!(e, ImportError::TooLarge { limit: 16 });
    }

    #[test]
    fn decode_refuses_hostile_bodies() {
        // 64 MiB of zeros in about 64 KiB.
        let bomb = gzip(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 1 << 20);
        let e = decode(&bomb, 1 << 20).unwrap_err();
        assert_eq!(e.reason(), "too_large");
        assert!(e.to_string().contains("1048576 bytes"), "{e}");

        let gz = gzip(&go_cpu().encode_to_vec());
        let e = decode(&gz[..gz.len() / 2], 1 << 20).unwrap_err();
        assert_eq!(e.reason(), "bad_gzip", "{e}");

        let e = decode(b"\x0a\xff\xff\xff\xff\xff garbage", 1 << 20).unwrap_err();
        assert_eq!(e.reason(), "undecodable");
        assert!(
            e.to_string().contains("failed to decode Protobuf message"),
            "{e}"
        );

        assert_eq!(decode(b"", 1 << 20).unwrap_err().reason(), "empty");
    }

    #[test]
    fn bad_indices_are_refused_and_named() {
        let mut p = go_cpu();
        p.sample[1].location_id[0] = 99;
        let e = refuse(&p);
        assert_eq!(e.reason(), "bad_index");
        assert_eq!(
            e.to_string(),
            "sample[1].location_id[0] 99 is not the id of any location entry"
        );

        let mut p = go_cpu();
        p.location[1].line[0].function_id = 42;
        assert_eq!(
            refuse(&p).to_string(),
            "location[1].line[0].function_id 42 is not the id of any function entry"
        );

        let mut p = go_cpu();
        p.location[0].mapping_id = 7;
        assert_eq!(refuse(&p).reason(), "bad_index");

        let mut p = go_cpu();
        p.function[0].name = 1000;
        let e = refuse(&p);
        assert_eq!(e.reason(), "bad_index");
        assert!(
            e.to_string()
                .contains("1000 out of range (string_table has"),
            "{e}"
        );

        let mut p = go_cpu();
        p.function[0].filename = -1;
        assert_eq!(
            refuse(&p).to_string(),
            format!(
                "function[0].filename -1 out of range (string_table has {} entries)",
                p.string_table.len()
            )
        );

        let mut p = go_cpu();
        p.sample_type[1].unit = 500;
        assert!(refuse(&p)
            .to_string()
            .starts_with("sample_type[1].unit 500 out of range"));

        let mut p = go_cpu();
        p.sample.push(Sample {
            location_id: vec![1],
            value: vec![1, 1],
            label: vec![Label {
                key: 1,
                str: 9999,
                num: 0,
                num_unit: 0,
            }],
        });
        assert!(refuse(&p)
            .to_string()
            .starts_with("sample[3].label[0].str 9999"));

        let mut p = go_cpu();
        p.location[2].id = 1;
        assert_eq!(
            refuse(&p).to_string(),
            "location[2].id 1 is the id of another location too"
        );
        let mut p = go_cpu();
        p.function[0].id = 0;
        assert_eq!(refuse(&p).reason(), "bad_index");
    }

    #[test]
    fn bad_values_are_refused() {
        let mut p = go_cpu();
        p.string_table[0] = "x".into();
        let e = refuse(&p);
        assert_eq!(e.reason(), "zero_value_rule");
        assert_eq!(e.to_string(), "string_table[0] must be the zero value \"\"");

        let mut p = go_cpu();
        p.sample[0].value[1] = -5;
        let e = refuse(&p);
        assert_eq!(e.reason(), "bad_value");
        assert_eq!(e.to_string(), "sample[0].value[1] -5 is negative");

        let mut p = go_cpu();
        p.sample[0].value.pop();
        assert_eq!(refuse(&p).reason(), "bad_value");

        let mut p = go_cpu();
        p.time_nanos = 0;
        assert_eq!(refuse(&p).reason(), "bad_value");

        let mut p = go_cpu();
        p.sample_type[0].r#type = 0;
        assert!(refuse(&p).to_string().starts_with("sample_type[0] type"));

        let mut p = go_cpu();
        p.sample[1].value[0] = i64::MAX;
        p.sample.push(p.sample[1].clone());
        assert_eq!(refuse(&p).reason(), "bad_value");

        // What validation would refuse (found by the pprof_import fuzz
        // target): a window longer than a day, values summing to more than
        // a batch may hold, a frame name or a folded stack too long.
        let mut p = go_cpu();
        p.duration_nanos = 24 * 3600 * 1_000_000_000 + 1;
        assert!(refuse(&p)
            .to_string()
            .starts_with("time_nanos/duration_nanos duration 86400000000001 ns"));
        let mut p = go_cpu();
        p.sample[0].value[1] = 1 << 50;
        assert_eq!(
            refuse(&p).to_string(),
            "sample[1] makes the values of its type sum to more than 1125899906842624, the most of a batch"
        );
        let mut p = go_cpu();
        let name = p.function[0].name as usize;
        p.string_table[name] = "f".repeat(4097);
        assert_eq!(
            refuse(&p).to_string(),
            "sample_type[0] has a frame name of 4097 bytes, more than the limit of 4096"
        );
        let mut p = go_cpu();
        p.string_table[name] = "f".repeat(64);
        p.sample[0].location_id = vec![1; 1024];
        assert_eq!(
            refuse(&p).to_string(),
            "sample_type[0] has a stack of 66559 bytes (folded), more than the limit of 65535"
        );

        let mut p = go_cpu();
        let key = p.sample[1].label[0].key as usize;
        p.string_table[key] = String::new();
        p.string_table.push("v".into());
        p.sample[1].label[0].str = p.string_table.len() as i64 - 1;
        assert_eq!(refuse(&p).reason(), "bad_attribute");
    }

    #[test]
    fn deep_stacks_are_refused() {
        let mut p = go_cpu();
        p.sample[0].location_id = vec![1; 2000];
        let e = refuse(&p);
        assert_eq!(e.reason(), "stack_too_deep");
        assert_eq!(e.to_string(), "sample[0] has more than 1024 frames");
    }
}
