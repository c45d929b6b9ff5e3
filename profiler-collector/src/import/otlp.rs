//! OTLP profiles (`ExportProfilesServiceRequest`) to batches: one batch
//! per Profile, labels from the resource's, the profile's and each
//! sample's attributes (semantic conventions mapped to our label names),
//! stacks root first from the request's dictionary.
use std::collections::HashMap;

use profiler_proto::{
    otlp::{
        collector::ExportProfilesServiceRequest,
        common::{any_value::Value, AnyValue, KeyValue},
        profiles::{Link, Location, Mapping, Profile, ProfilesDictionary, Stack},
    },
    v1::Batch,
};

use super::{
    frequency_hz, label_name, pprof::address_frame, sample_type, window, BatchBuilder, Frames,
    Header, ImportError, LabelsBuilder, Source,
};

/// Bounds on what one request may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpLimits {
    /// Most profiles in a request (all resources and scopes together).
    pub max_profiles: usize,
    /// Most entries of each dictionary table.
    pub max_table_entries: usize,
    /// Most samples of one profile.
    pub max_samples: usize,
    /// Most frames of one stack (inlined lines count as frames).
    pub max_frames: usize,
}

impl Default for OtlpLimits {
    fn default() -> Self {
        let validate = crate::validate::Limits::default();
        Self {
            max_profiles: 1_000,
            max_table_entries: 1 << 20,
            max_samples: validate.max_samples,
            max_frames: validate.max_frames,
        }
    }
}

/// Resource and sample attributes and the labels they are (other keys:
/// [`label_name`]).
pub const ATTRIBUTE_LABELS: [(&str, &str); 12] = [
    ("host.name", "node"),
    ("service.name", "service"),
    ("process.executable.name", "process"),
    ("process.executable.path", "exe"),
    ("process.pid", "pid"),
    ("container.id", "container_id"),
    ("k8s.pod.name", "pod"),
    ("k8s.namespace.name", "namespace"),
    ("k8s.container.name", "container"),
    ("process.runtime.name", "runtime"),
    ("process.runtime.version", "go_version"),
    ("thread.name", "thread"),
];

/// The location attribute that says what kind of code a frame is.
const FRAME_TYPE: &str = "profile.frame.type";

/// The batches of `request`: one per profile with samples of a non-zero
/// value. The agent id is `otlp/HOST` and the node `HOST` for a resource
/// with `host.name`; `source`'s otherwise.
pub fn to_batches(
    request: &ExportProfilesServiceRequest,
    limits: &OtlpLimits,
    source: &Source,
) -> Result<Vec<Batch>, ImportError> {
    let profiles: usize = request
        .resource_profiles
        .iter()
        .flat_map(|r| &r.scope_profiles)
        .map(|s| s.profiles.len())
        .sum();
    if profiles > limits.max_profiles {
        return Err(ImportError::TableTooLarge {
            path: "resource_profiles[*].scope_profiles[*].profiles".into(),
            len: profiles,
            limit: limits.max_profiles,
        });
    }
    if profiles == 0 {
        return Ok(Vec::new());
    }
    let empty = ProfilesDictionary::default();
    let mut frames = Frames::default();
    let dictionary = Dictionary::new(
        request.dictionary.as_ref().unwrap_or(&empty),
        limits,
        &mut frames,
    )?;

    let mut batches = Vec::new();
    for (r, resource_profiles) in request.resource_profiles.iter().enumerate() {
        let mut labels = LabelsBuilder::default();
        let (mut agent_id, mut node) = (source.agent_id.clone(), source.node.clone());
        let attributes = resource_profiles
            .resource
            .as_ref()
            .map_or(&[][..], |r| &r.attributes);
        for (a, attribute) in attributes.iter().enumerate() {
            let path = || format!("resource_profiles[{r}].resource.attributes[{a}]");
            let Some((key, value)) = dictionary.key_value(attribute, path)? else {
                continue;
            };
            if key == "host.name" && !value.is_empty() {
                agent_id = format!("otlp/{value}");
                node = value.clone();
            }
            labels.add(dictionary.label(&key, path)?, value);
        }
        for (s, scope_profiles) in resource_profiles.scope_profiles.iter().enumerate() {
            let agent_version = scope_profiles
                .scope
                .as_ref()
                .map(|scope| scope.version.clone())
                .unwrap_or_default();
            for (p, profile) in scope_profiles.profiles.iter().enumerate() {
                let path = format!("resource_profiles[{r}].scope_profiles[{s}].profiles[{p}]");
                let origin = Origin {
                    agent_id: &agent_id,
                    node: &node,
                    agent_version: &agent_version,
                };
                let batch =
                    dictionary.batch(profile, &path, &labels, &origin, limits, &mut frames)?;
                batches.extend(batch);
            }
        }
    }
    Ok(batches)
}

/// Who sent a profile: what its batch says besides its content.
struct Origin<'s> {
    agent_id: &'s str,
    node: &'s str,
    agent_version: &'s str,
}

/// The request's dictionary, checked: sizes, zero values at index 0, and
/// every index its entries hold.
struct Dictionary<'a> {
    d: &'a ProfilesDictionary,
    /// The frames of each location (caller first); the zero location's
    /// when the table is empty.
    locations: Vec<Vec<u32>>,
}

/// `index` into a table of `len` entries: 0 (the zero value, also of an
/// absent table) or less than `len`.
fn check(
    index: i32,
    len: usize,
    table: &'static str,
    path: impl FnOnce() -> String,
) -> Result<usize, ImportError> {
    match usize::try_from(index) {
        Ok(i) if i == 0 || i < len => Ok(i),
        _ => Err(ImportError::IndexOutOfRange {
            path: path(),
            index: index.into(),
            table,
            len,
        }),
    }
}

fn is_zero_attribute(value: &Option<AnyValue>) -> bool {
    value.as_ref().is_none_or(|v| v.value.is_none())
}

impl<'a> Dictionary<'a> {
    fn new(
        d: &'a ProfilesDictionary,
        limits: &OtlpLimits,
        frames: &mut Frames,
    ) -> Result<Self, ImportError> {
        let tables = [
            ("mapping_table", d.mapping_table.len()),
            ("location_table", d.location_table.len()),
            ("function_table", d.function_table.len()),
            ("link_table", d.link_table.len()),
            ("string_table", d.string_table.len()),
            ("attribute_table", d.attribute_table.len()),
            ("stack_table", d.stack_table.len()),
        ];
        for (table, len) in tables {
            if len > limits.max_table_entries {
                return Err(ImportError::TableTooLarge {
                    path: format!("dictionary.{table}"),
                    len,
                    limit: limits.max_table_entries,
                });
            }
        }
        let zero = |table: &str, expected: &'static str| ImportError::ZeroValue {
            path: format!("dictionary.{table}[0]"),
            expected,
        };
        if d.string_table.first().is_some_and(|s| !s.is_empty()) {
            return Err(zero("string_table", "\"\""));
        }
        if d.mapping_table
            .first()
            .is_some_and(|m| *m != Mapping::default())
        {
            return Err(zero("mapping_table", "Mapping{}"));
        }
        if d.location_table
            .first()
            .is_some_and(|l| *l != Location::default())
        {
            return Err(zero("location_table", "Location{}"));
        }
        if d.function_table
            .first()
            .is_some_and(|f| *f != Default::default())
        {
            return Err(zero("function_table", "Function{}"));
        }
        if d.link_table.first().is_some_and(|l| *l != Link::default()) {
            return Err(zero("link_table", "Link{}"));
        }
        if d.attribute_table.first().is_some_and(|a| {
            a.key_strindex != 0 || a.unit_strindex != 0 || !is_zero_attribute(&a.value)
        }) {
            return Err(zero("attribute_table", "KeyValueAndUnit{}"));
        }
        if d.stack_table
            .first()
            .is_some_and(|s| *s != Stack::default())
        {
            return Err(zero("stack_table", "Stack{}"));
        }

        let mut dictionary = Dictionary {
            d,
            locations: Vec::new(),
        };
        dictionary.check_indices()?;
        let zero_location = [Location::default()];
        let locations = match d.location_table.as_slice() {
            [] => &zero_location[..],
            table => table,
        };
        dictionary.locations = locations
            .iter()
            .map(|l| dictionary.location_frames(l, frames))
            .collect();
        Ok(dictionary)
    }

    fn string_index(&self, index: i32, path: impl FnOnce() -> String) -> Result<(), ImportError> {
        check(index, self.d.string_table.len(), "string_table", path).map(drop)
    }

    /// Entry `index` of the string table; `path` names the field holding it.
    fn string(&self, index: i32, path: impl FnOnce() -> String) -> Result<&'a str, ImportError> {
        let i = check(index, self.d.string_table.len(), "string_table", path)?;
        Ok(self.d.string_table.get(i).map_or("", String::as_str))
    }

    fn attribute_indices(
        &self,
        indices: &[i32],
        path: impl Fn() -> String,
    ) -> Result<(), ImportError> {
        for (a, index) in indices.iter().enumerate() {
            check(
                *index,
                self.d.attribute_table.len(),
                "attribute_table",
                || format!("{}.attribute_indices[{a}]", path()),
            )?;
        }
        Ok(())
    }

    /// Checks every index held by the tables' entries.
    fn check_indices(&self) -> Result<(), ImportError> {
        let d = self.d;
        for (i, m) in d.mapping_table.iter().enumerate() {
            let path = || format!("dictionary.mapping_table[{i}]");
            self.string_index(m.filename_strindex, || {
                format!("{}.filename_strindex", path())
            })?;
            self.attribute_indices(&m.attribute_indices, path)?;
        }
        for (i, l) in d.location_table.iter().enumerate() {
            let path = || format!("dictionary.location_table[{i}]");
            check(
                l.mapping_index,
                d.mapping_table.len(),
                "mapping_table",
                || format!("{}.mapping_index", path()),
            )?;
            for (n, line) in l.lines.iter().enumerate() {
                check(
                    line.function_index,
                    d.function_table.len(),
                    "function_table",
                    || format!("{}.lines[{n}].function_index", path()),
                )?;
            }
            self.attribute_indices(&l.attribute_indices, path)?;
        }
        for (i, f) in d.function_table.iter().enumerate() {
            let path = |field: &str| format!("dictionary.function_table[{i}].{field}");
            self.string_index(f.name_strindex, || path("name_strindex"))?;
            self.string_index(f.system_name_strindex, || path("system_name_strindex"))?;
            self.string_index(f.filename_strindex, || path("filename_strindex"))?;
        }
        for (i, a) in d.attribute_table.iter().enumerate() {
            let path = |field: &str| format!("dictionary.attribute_table[{i}].{field}");
            self.string_index(a.key_strindex, || path("key_strindex"))?;
            self.string_index(a.unit_strindex, || path("unit_strindex"))?;
            if let Some(Value::StringValueStrindex(s)) =
                a.value.as_ref().and_then(|v| v.value.as_ref())
            {
                self.string_index(*s, || path("value.string_value_strindex"))?;
            }
        }
        for (i, s) in d.stack_table.iter().enumerate() {
            for (n, l) in s.location_indices.iter().enumerate() {
                check(*l, d.location_table.len(), "location_table", || {
                    format!("dictionary.stack_table[{i}].location_indices[{n}]")
                })?;
            }
        }
        Ok(())
    }

    /// The frame suffix of a location's `profile.frame.type`: `_[k]` for
    /// kernel, `_[j]` for JIT code, none for other kinds.
    fn frame_suffix(&self, location: &Location) -> &'static str {
        for index in &location.attribute_indices {
            let Some(a) = self.d.attribute_table.get(*index as usize) else {
                continue;
            };
            if self
                .d
                .string_table
                .get(a.key_strindex as usize)
                .map(String::as_str)
                != Some(FRAME_TYPE)
            {
                continue;
            }
            let value = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.as_str(),
                Some(Value::StringValueStrindex(s)) => self
                    .d
                    .string_table
                    .get(*s as usize)
                    .map_or("", String::as_str),
                _ => "",
            };
            return match value {
                "kernel" => "_[k]",
                "jit" => "_[j]",
                _ => "",
            };
        }
        ""
    }

    /// A location's frames, caller first: its lines reversed, every one but
    /// the caller marked inlined (`_[i]`), the caller marked with its frame
    /// type; `BASENAME+0xOFFSET` (or `0xADDRESS`) without lines. Its
    /// indices are checked.
    fn location_frames(&self, location: &Location, frames: &mut Frames) -> Vec<u32> {
        let d = self.d;
        let suffix = self.frame_suffix(location);
        if location.lines.is_empty() {
            let name = match d.mapping_table.get(location.mapping_index as usize) {
                Some(m) if location.mapping_index != 0 => {
                    let file = d
                        .string_table
                        .get(m.filename_strindex as usize)
                        .map_or("", String::as_str);
                    address_frame(file, location.address, m.memory_start, m.file_offset)
                }
                _ => address_frame("", location.address, 0, 0),
            };
            return vec![frames.id(&name, suffix)];
        }
        let last = location.lines.len() - 1;
        location
            .lines
            .iter()
            .enumerate()
            .rev()
            .map(|(l, line)| {
                let name = d
                    .function_table
                    .get(line.function_index as usize)
                    .and_then(|f| d.string_table.get(f.name_strindex as usize))
                    .map_or("", String::as_str);
                let name = if name.is_empty() { "[unknown]" } else { name };
                frames.id(name, if l == last { suffix } else { "_[i]" })
            })
            .collect()
    }

    /// The key and value (as text) of a resource attribute; `None` for a
    /// value that is not a label (see [`Self::value`]).
    fn key_value(
        &self,
        attribute: &KeyValue,
        path: impl Fn() -> String,
    ) -> Result<Option<(String, String)>, ImportError> {
        let key = if attribute.key.is_empty() {
            self.string(attribute.key_strindex, || {
                format!("{}.key_strindex", path())
            })?
        } else {
            &attribute.key
        };
        let value = self.value(attribute.value.as_ref(), key, &path)?;
        Ok(value.map(|v| (key.to_string(), v)))
    }

    /// An attribute's value as label text. Arrays, key-value lists, bytes
    /// and empty values (valid OTLP, e.g. `process.command_args`) are not
    /// labels: `None`, and the attribute is left out.
    fn value(
        &self,
        value: Option<&AnyValue>,
        _key: &str,
        path: impl Fn() -> String,
    ) -> Result<Option<String>, ImportError> {
        Ok(match value.and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => Some(s.clone()),
            Some(Value::StringValueStrindex(s)) => Some(
                self.string(*s, || format!("{}.value.string_value_strindex", path()))?
                    .to_string(),
            ),
            Some(Value::IntValue(i)) => Some(i.to_string()),
            Some(Value::BoolValue(b)) => Some(b.to_string()),
            Some(Value::DoubleValue(f)) => Some(f.to_string()),
            Some(Value::ArrayValue(_) | Value::KvlistValue(_) | Value::BytesValue(_)) | None => {
                None
            }
        })
    }

    /// The label name of an attribute key.
    fn label(&self, key: &str, path: impl Fn() -> String) -> Result<String, ImportError> {
        if let Some((_, name)) = ATTRIBUTE_LABELS.iter().find(|(k, _)| *k == key) {
            return Ok(name.to_string());
        }
        label_name(key).ok_or_else(|| ImportError::attribute(path(), "has an empty key"))
    }

    /// Adds the attributes `indices` (checked) to `labels`.
    fn add_attributes(
        &self,
        indices: &[i32],
        labels: &mut LabelsBuilder,
        path: impl Fn() -> String,
    ) -> Result<(), ImportError> {
        for (a, index) in indices.iter().enumerate() {
            let path = || format!("{}.attribute_indices[{a}]", path());
            let i = check(
                *index,
                self.d.attribute_table.len(),
                "attribute_table",
                path,
            )?;
            let Some(attribute) = self.d.attribute_table.get(i).filter(|_| i != 0) else {
                continue;
            };
            let key = self.string(attribute.key_strindex, || {
                format!("{}.key_strindex", path())
            })?;
            let Some(value) = self.value(attribute.value.as_ref(), key, path)? else {
                continue;
            };
            labels.add(self.label(key, path)?, value);
        }
        Ok(())
    }

    /// The batch of `profile` (at `path`); `None` when no sample has a
    /// value.
    fn batch(
        &self,
        profile: &Profile,
        path: &str,
        resource: &LabelsBuilder,
        origin: &Origin,
        limits: &OtlpLimits,
        frames: &mut Frames,
    ) -> Result<Option<Batch>, ImportError> {
        let d = self.d;
        let t = profile
            .sample_type
            .as_ref()
            .ok_or_else(|| ImportError::value(format!("{path}.sample_type"), "is missing"))?;
        let name = self.string(t.type_strindex, || {
            format!("{path}.sample_type.type_strindex")
        })?;
        let unit = self.string(t.unit_strindex, || {
            format!("{path}.sample_type.unit_strindex")
        })?;
        let sample_type = sample_type(name, unit)
            .map_err(|e| ImportError::value(format!("{path}.sample_type"), e))?;
        let period_unit = match &profile.period_type {
            Some(p) => {
                self.string(p.type_strindex, || {
                    format!("{path}.period_type.type_strindex")
                })?;
                Some(self.string(p.unit_strindex, || {
                    format!("{path}.period_type.unit_strindex")
                })?)
            }
            None => None,
        };
        let frequency_hz = frequency_hz(&sample_type.0, period_unit, profile.period)
            .map_err(|e| ImportError::value(format!("{path}.period"), e))?;
        let time = |field: &str, value: u64| {
            i64::try_from(value).map_err(|_| {
                ImportError::value(format!("{path}.{field}"), format!("{value} is too large"))
            })
        };
        let (start, duration) = (
            time("time_unix_nano", profile.time_unix_nano)?,
            time("duration_nano", profile.duration_nano)?,
        );
        let window = window(start, duration)
            .map_err(|e| ImportError::value(format!("{path}.time_unix_nano"), e))?;
        let header = Header {
            agent_id: origin.agent_id.to_string(),
            node: origin.node.to_string(),
            agent_version: origin.agent_version.to_string(),
            window,
            frequency_hz,
            sample_type,
        };

        let mut profile_labels = resource.clone();
        self.add_attributes(&profile.attribute_indices, &mut profile_labels, || {
            path.to_string()
        })?;
        if profile.samples.len() > limits.max_samples {
            return Err(ImportError::TableTooLarge {
                path: format!("{path}.samples"),
                len: profile.samples.len(),
                limit: limits.max_samples,
            });
        }

        let mut builder = BatchBuilder::new(path.to_string(), &header.sample_type.0);
        // Batch stack of a (stack_index, root frame).
        let mut stacks: HashMap<(usize, Option<u32>), u32> = HashMap::new();
        let mut ids: Vec<u32> = Vec::new();
        for (s, sample) in profile.samples.iter().enumerate() {
            let path = || format!("{path}.samples[{s}]");
            let stack_index = check(
                sample.stack_index,
                d.stack_table.len(),
                "stack_table",
                || format!("{}.stack_index", path()),
            )?;
            check(sample.link_index, d.link_table.len(), "link_table", || {
                format!("{}.link_index", path())
            })?;
            let mut labels = profile_labels.clone();
            self.add_attributes(&sample.attribute_indices, &mut labels, path)?;
            let value = sample_value(sample, path)?;

            let root = labels.get("process").map(|p| frames.id(p, ""));
            let stack = match stacks.get(&(stack_index, root)) {
                Some(stack) => *stack,
                None => {
                    ids.clear();
                    ids.extend(root);
                    let locations = d
                        .stack_table
                        .get(stack_index)
                        .map_or(&[][..], |s| &s.location_indices);
                    for index in locations.iter().rev() {
                        ids.extend(&self.locations[*index as usize]);
                        if ids.len() > limits.max_frames {
                            return Err(ImportError::StackTooDeep {
                                path: format!("dictionary.stack_table[{stack_index}]"),
                                limit: limits.max_frames,
                            });
                        }
                    }
                    if ids.is_empty() {
                        ids.push(frames.id("[unknown]", ""));
                    }
                    let stack = builder.stack(frames, &ids)?;
                    stacks.insert((stack_index, root), stack);
                    stack
                }
            };
            if value == 0 {
                continue;
            }
            let set = builder.label_set(&labels.sorted())?;
            builder.add(set, stack, value, path)?;
        }
        Ok(builder.finish(header))
    }
}

/// A sample's value: the sum of its values, or with none the number of
/// its timestamps (each one event).
fn sample_value(
    sample: &profiler_proto::otlp::profiles::Sample,
    path: impl Fn() -> String,
) -> Result<i64, ImportError> {
    let (values, timestamps) = (&sample.values, &sample.timestamps_unix_nano);
    if values.is_empty() {
        if timestamps.is_empty() {
            return Err(ImportError::value(
                path(),
                "has neither values nor timestamps_unix_nano",
            ));
        }
        return i64::try_from(timestamps.len())
            .map_err(|_| ImportError::value(path(), "has too many timestamps"));
    }
    if !timestamps.is_empty() && timestamps.len() != values.len() {
        return Err(ImportError::value(
            format!("{}.values", path()),
            format!(
                "has {} entries and timestamps_unix_nano {}: they must be as many",
                values.len(),
                timestamps.len()
            ),
        ));
    }
    let mut total: i64 = 0;
    for (v, value) in values.iter().enumerate() {
        if *value < 0 {
            return Err(ImportError::value(
                format!("{}.values[{v}]", path()),
                format!("{value} is negative"),
            ));
        }
        total = total
            .checked_add(*value)
            .ok_or_else(|| ImportError::value(format!("{}.values", path()), "overflow"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use profiler_proto::otlp::{
        common::InstrumentationScope,
        profiles::{
            Function, KeyValueAndUnit, Line, ResourceProfiles, Sample, ScopeProfiles, ValueType,
        },
        resource::Resource,
    };

    use super::*;
    use crate::import::testing::{assert_valid, folded, kv, labeled, type_of};

    const T0: u64 = 1_700_000_000_000_000_000;

    /// Builds a request's dictionary with each table's zero value at 0.
    struct Dict(ProfilesDictionary);

    impl Dict {
        fn new() -> Self {
            Dict(ProfilesDictionary {
                mapping_table: vec![Mapping::default()],
                location_table: vec![Location::default()],
                function_table: vec![Function::default()],
                link_table: vec![Link::default()],
                string_table: vec![String::new()],
                attribute_table: vec![KeyValueAndUnit::default()],
                stack_table: vec![Stack::default()],
            })
        }

        fn s(&mut self, s: &str) -> i32 {
            let t = &mut self.0.string_table;
            match t.iter().position(|x| x == s) {
                Some(i) => i as i32,
                None => {
                    t.push(s.to_string());
                    t.len() as i32 - 1
                }
            }
        }

        fn value_type(&mut self, t: &str, u: &str) -> ValueType {
            ValueType {
                type_strindex: self.s(t),
                unit_strindex: self.s(u),
            }
        }

        fn attribute(&mut self, key: &str, value: Value) -> i32 {
            let key_strindex = self.s(key);
            self.0.attribute_table.push(KeyValueAndUnit {
                key_strindex,
                value: Some(AnyValue { value: Some(value) }),
                unit_strindex: 0,
            });
            self.0.attribute_table.len() as i32 - 1
        }

        fn string_attribute(&mut self, key: &str, value: &str) -> i32 {
            self.attribute(key, Value::StringValue(value.into()))
        }

        /// A location of `lines` (innermost first) of frame type `kind`.
        fn location(&mut self, lines: &[&str], kind: &str) -> i32 {
            let lines = lines
                .iter()
                .map(|name| {
                    let name_strindex = self.s(name);
                    self.0.function_table.push(Function {
                        name_strindex,
                        ..Default::default()
                    });
                    Line {
                        function_index: self.0.function_table.len() as i32 - 1,
                        line: 7,
                        column: 0,
                    }
                })
                .collect();
            let attribute = self.string_attribute(FRAME_TYPE, kind);
            self.0.location_table.push(Location {
                mapping_index: 0,
                address: 0,
                lines,
                attribute_indices: vec![attribute],
            });
            self.0.location_table.len() as i32 - 1
        }

        /// A stack of `locations`, leaf first.
        fn stack(&mut self, locations: &[i32]) -> i32 {
            self.0.stack_table.push(Stack {
                location_indices: locations.to_vec(),
            });
            self.0.stack_table.len() as i32 - 1
        }
    }

    fn resource_attribute(key: &str, value: Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            key_strindex: 0,
        }
    }

    fn string(value: &str) -> Value {
        Value::StringValue(value.into())
    }

    fn sample(stack_index: i32, values: &[i64], attribute_indices: &[i32]) -> Sample {
        Sample {
            stack_index,
            attribute_indices: attribute_indices.to_vec(),
            link_index: 0,
            values: values.to_vec(),
            timestamps_unix_nano: Vec::new(),
        }
    }

    fn request(
        dict: Dict,
        resource: Vec<KeyValue>,
        profiles: Vec<Profile>,
    ) -> ExportProfilesServiceRequest {
        ExportProfilesServiceRequest {
            resource_profiles: vec![ResourceProfiles {
                resource: Some(Resource {
                    attributes: resource,
                    ..Default::default()
                }),
                scope_profiles: vec![ScopeProfiles {
                    scope: Some(InstrumentationScope {
                        name: "profiler-agent".into(),
                        version: "0.9.0".into(),
                        ..Default::default()
                    }),
                    profiles,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
            dictionary: Some(dict.0),
        }
    }

    /// What this profiler's agent sends: a CPU profile at 99 Hz of one
    /// process with kernel frames and an inlined function, and an off-CPU
    /// profile of the same process.
    fn agent_request() -> ExportProfilesServiceRequest {
        let mut d = Dict::new();
        let start = d.location(&["_start"], "native");
        let main = d.location(&["main"], "native");
        // parse and its inlined callees: lines innermost first.
        let parse = d.location(&["next_token", "read_char", "parse"], "native");
        let syscall = d.location(&["write"], "native");
        let kernel = d.location(&["ksys_write", "__x64_sys_write"], "kernel");
        let jit = d.location(&["Interpreter::run"], "jit");
        let hot = d.stack(&[parse, main, start]);
        let sys = d.stack(&[kernel, syscall, main, start]);
        let jitted = d.stack(&[jit, main, start]);
        let worker = d.string_attribute("thread.name", "worker-1");
        let custom = d.attribute("Request.Retries", Value::IntValue(3));
        let env = d.attribute("deployment.canary", Value::BoolValue(true));

        let cpu = Profile {
            sample_type: Some(d.value_type("cpu", "samples")),
            samples: vec![
                sample(hot, &[5], &[worker]),
                sample(sys, &[2], &[worker, custom]),
                sample(jitted, &[1], &[]),
                sample(hot, &[3], &[worker]),
            ],
            time_unix_nano: T0,
            duration_nano: 10_000_000_000,
            period_type: Some(d.value_type("cpu", "nanoseconds")),
            period: 10_101_010,
            attribute_indices: vec![env],
            ..Default::default()
        };
        let off_cpu = Profile {
            sample_type: Some(d.value_type("off_cpu", "nanoseconds")),
            samples: vec![sample(sys, &[1_500_000], &[worker])],
            time_unix_nano: T0,
            duration_nano: 10_000_000_000,
            ..Default::default()
        };
        let resource = vec![
            resource_attribute("host.name", string("node-7")),
            resource_attribute("service.name", string("checkout")),
            resource_attribute("process.executable.name", string("app")),
            resource_attribute("process.executable.path", string("/usr/bin/app")),
            resource_attribute("process.pid", Value::IntValue(4242)),
            resource_attribute("k8s.pod.name", string("checkout-5d9")),
            resource_attribute("Cloud.Region", string("eu-west-1")),
        ];
        request(d, resource, vec![cpu, off_cpu])
    }

    fn source() -> Source {
        Source {
            agent_id: "otlp".into(),
            node: "unknown".into(),
        }
    }

    fn convert(request: &ExportProfilesServiceRequest) -> Vec<Batch> {
        let batches = to_batches(request, &OtlpLimits::default(), &source()).unwrap();
        assert_valid(&batches);
        batches
    }

    fn refuse(request: &ExportProfilesServiceRequest) -> ImportError {
        to_batches(request, &OtlpLimits::default(), &source()).unwrap_err()
    }

    fn dict(request: &mut ExportProfilesServiceRequest) -> &mut ProfilesDictionary {
        request.dictionary.as_mut().unwrap()
    }

    fn profile(request: &mut ExportProfilesServiceRequest, p: usize) -> &mut Profile {
        &mut request.resource_profiles[0].scope_profiles[0].profiles[p]
    }

    #[test]
    fn an_agent_request_is_one_batch_per_profile() {
        let batches = convert(&agent_request());
        assert_eq!(batches.len(), 2);
        let cpu = &batches[0];
        assert_eq!(type_of(cpu), "cpu/samples");
        assert_eq!(cpu.frequency_hz, 99);
        assert_eq!(cpu.agent_id, "otlp/node-7");
        assert_eq!(cpu.node, "node-7");
        assert_eq!(cpu.agent_version, "0.9.0");
        assert_eq!(cpu.window_start_unix_nanos, T0 as i64);
        assert_eq!(cpu.window_end_unix_nanos, T0 as i64 + 10_000_000_000);
        assert_eq!(
            folded(cpu),
            [
                (
                    "app;_start;main;parse;read_char_[i];next_token_[i]".to_string(),
                    8
                ),
                (
                    "app;_start;main;write;__x64_sys_write_[k];ksys_write_[i]".to_string(),
                    2
                ),
                ("app;_start;main;Interpreter::run_[j]".to_string(), 1),
            ]
            .into()
        );
        let resource = [
            kv("cloud_region", "eu-west-1"),
            kv("deployment_canary", "true"),
            kv("exe", "/usr/bin/app"),
            kv("node", "node-7"),
            kv("pid", "4242"),
            kv("pod", "checkout-5d9"),
            kv("process", "app"),
            kv("service", "checkout"),
        ];
        let with = |extra: &[(String, String)]| {
            let mut labels: Vec<_> = resource.iter().chain(extra).cloned().collect();
            labels.sort();
            labels
        };
        let samples = labeled(cpu);
        let jit = samples.iter().find(|s| s.0.ends_with("_[j]")).unwrap();
        assert_eq!(jit.1, with(&[]));
        let sys = samples
            .iter()
            .find(|s| s.0.ends_with("_[i]") && s.2 == 2)
            .unwrap();
        assert_eq!(
            sys.1,
            with(&[kv("request_retries", "3"), kv("thread", "worker-1")])
        );

        let off_cpu = &batches[1];
        assert_eq!(type_of(off_cpu), "off_cpu/nanoseconds");
        assert_eq!(off_cpu.frequency_hz, 0);
        assert_eq!(
            folded(off_cpu),
            [(
                "app;_start;main;write;__x64_sys_write_[k];ksys_write_[i]".to_string(),
                1_500_000
            )]
            .into()
        );
    }

    #[test]
    fn without_host_name_the_source_names_the_agent() {
        let mut r = agent_request();
        let resource = r.resource_profiles[0].resource.as_mut().unwrap();
        resource.attributes.retain(|a| a.key != "host.name");
        let batches = convert(&r);
        assert!(batches
            .iter()
            .all(|b| b.agent_id == "otlp" && b.node == "unknown"));
    }

    #[test]
    fn an_ebpf_profiler_request_counts_timestamps() {
        // The OpenTelemetry eBPF profiler: samples/count with a timestamp
        // per event and no values; frames of unsymbolized code are
        // addresses in their mapping.
        let mut d = Dict::new();
        let file = d.s("/usr/lib/x86_64-linux-gnu/libc.so.6");
        d.0.mapping_table.push(Mapping {
            memory_start: 0x7f00_0000_0000,
            memory_limit: 0x7f00_0020_0000,
            file_offset: 0x28000,
            filename_strindex: file,
            attribute_indices: vec![],
        });
        let native = d.string_attribute(FRAME_TYPE, "native");
        d.0.location_table.push(Location {
            mapping_index: 1,
            address: 0x7f00_0000_1234,
            lines: vec![],
            attribute_indices: vec![native],
        });
        let libc = d.0.location_table.len() as i32 - 1;
        let py = d.location(&["handle_request"], "python");
        let stack = d.stack(&[libc, py]);
        let thread = d.string_attribute("thread.name", "gunicorn");
        let mut s = sample(stack, &[], &[thread]);
        s.timestamps_unix_nano = vec![T0 + 1, T0 + 2, T0 + 3];
        let mut off = sample(stack, &[1_000, 2_000], &[thread]);
        off.timestamps_unix_nano = vec![T0 + 1, T0 + 2];
        let samples = Profile {
            sample_type: Some(d.value_type("samples", "count")),
            samples: vec![s],
            time_unix_nano: T0,
            duration_nano: 5_000_000_000,
            period_type: Some(d.value_type("cpu", "nanoseconds")),
            period: 50_000_000,
            ..Default::default()
        };
        let off_cpu = Profile {
            sample_type: Some(d.value_type("off_cpu", "nanoseconds")),
            samples: vec![off],
            time_unix_nano: T0,
            duration_nano: 5_000_000_000,
            ..Default::default()
        };
        let r = request(d, vec![], vec![samples, off_cpu]);
        let batches = convert(&r);
        assert_eq!(type_of(&batches[0]), "samples/count");
        assert_eq!(batches[0].frequency_hz, 0);
        assert_eq!(
            labeled(&batches[0]),
            vec![(
                "handle_request;libc.so.6+0x29234".to_string(),
                vec![kv("thread", "gunicorn")],
                3
            )]
        );
        assert_eq!(
            folded(&batches[1]),
            [("handle_request;libc.so.6+0x29234".to_string(), 3_000)].into()
        );
    }

    #[test]
    fn foreign_types_follow_the_naming_rule() {
        let mut r = agent_request();
        let t = dict(&mut r).string_table.len() as i32;
        dict(&mut r)
            .string_table
            .extend(["CPU".into(), "nanoseconds".into()]);
        profile(&mut r, 0).sample_type = Some(ValueType {
            type_strindex: t,
            unit_strindex: t + 1,
        });
        let batches = convert(&r);
        assert_eq!(type_of(&batches[0]), "cpu_nanoseconds/nanoseconds");
        assert_eq!(batches[0].frequency_hz, 0);
    }

    #[test]
    fn zero_values_profiles_without_samples_and_empty_requests_give_no_batch() {
        let mut r = agent_request();
        profile(&mut r, 1).samples[0].values = vec![0];
        profile(&mut r, 0).samples.clear();
        assert!(convert(&r).is_empty());
        assert!(convert(&ExportProfilesServiceRequest::default()).is_empty());
    }

    #[test]
    fn the_sequence_is_a_stable_content_hash() {
        let a = convert(&agent_request());
        assert_eq!(a, convert(&agent_request()));
        assert_ne!(a[0].sequence, a[1].sequence);
        let mut r = agent_request();
        profile(&mut r, 0).samples[2].values = vec![2];
        let b = convert(&r);
        assert_ne!(b[0].sequence, a[0].sequence);
        assert_eq!(b[1].sequence, a[1].sequence);
        let mut r = agent_request();
        r.resource_profiles[0].resource.as_mut().unwrap().attributes[1] =
            resource_attribute("service.name", string("cart"));
        assert_ne!(convert(&r)[1].sequence, a[1].sequence);
    }

    #[test]
    fn bad_indices_name_their_path() {
        let mut r = agent_request();
        profile(&mut r, 0).samples[3].stack_index = 99;
        let e = refuse(&r);
        assert_eq!(e.reason(), "bad_index");
        assert_eq!(
            e.to_string(),
            "resource_profiles[0].scope_profiles[0].profiles[0].samples[3].stack_index 99 \
             out of range (stack_table has 4 entries)"
        );

        let mut r = agent_request();
        dict(&mut r).stack_table[2].location_indices[1] = -1;
        assert_eq!(
            refuse(&r).to_string(),
            "dictionary.stack_table[2].location_indices[1] -1 out of range \
             (location_table has 7 entries)"
        );

        let mut r = agent_request();
        dict(&mut r).location_table[3].lines[0].function_index = 100;
        assert!(refuse(&r)
            .to_string()
            .starts_with("dictionary.location_table[3].lines[0].function_index 100 out of range"));

        let mut r = agent_request();
        dict(&mut r).function_table[1].name_strindex = 1000;
        assert!(refuse(&r)
            .to_string()
            .starts_with("dictionary.function_table[1].name_strindex 1000 out of range"));

        let mut r = agent_request();
        profile(&mut r, 0).samples[1].attribute_indices[1] = 77;
        assert!(refuse(&r).to_string().starts_with(
            "resource_profiles[0].scope_profiles[0].profiles[0].samples[1].attribute_indices[1] 77"
        ));

        let mut r = agent_request();
        profile(&mut r, 1).samples[0].link_index = 3;
        assert_eq!(refuse(&r).reason(), "bad_index");

        let mut r = agent_request();
        profile(&mut r, 1)
            .sample_type
            .as_mut()
            .unwrap()
            .unit_strindex = 500;
        let strings = dict(&mut r).string_table.len();
        assert!(refuse(&r).to_string().ends_with(&format!(
            "profiles[1].sample_type.unit_strindex 500 out of range (string_table has {strings} entries)"
        )));

        let mut r = agent_request();
        dict(&mut r).location_table[1].mapping_index = 1;
        assert_eq!(refuse(&r).reason(), "bad_index");
    }

    #[test]
    fn index_0_must_be_the_zero_value() {
        type Break = fn(&mut ProfilesDictionary);
        let cases: [(&str, Break); 7] = [
            ("string_table", |d| d.string_table[0] = "x".into()),
            ("mapping_table", |d| d.mapping_table[0].memory_start = 1),
            ("location_table", |d| d.location_table[0].address = 1),
            ("function_table", |d| d.function_table[0].name_strindex = 1),
            ("link_table", |d| d.link_table[0].span_id = vec![1; 8]),
            ("attribute_table", |d| d.attribute_table[0].key_strindex = 1),
            ("stack_table", |d| {
                d.stack_table[0].location_indices = vec![1]
            }),
        ];
        for (table, break_it) in cases {
            let mut r = agent_request();
            break_it(dict(&mut r));
            let e = refuse(&r);
            assert_eq!(e.reason(), "zero_value_rule", "{table}");
            assert!(
                e.to_string()
                    .starts_with(&format!("dictionary.{table}[0] must be the zero value")),
                "{e}"
            );
        }
        // Absent tables are all zero values.
        let mut r = agent_request();
        dict(&mut r).link_table.clear();
        dict(&mut r).mapping_table.clear();
        assert_eq!(convert(&r).len(), 2);
    }

    #[test]
    fn limits_are_enforced() {
        let r = agent_request();
        let limits = OtlpLimits {
            max_table_entries: 16,
            ..Default::default()
        };
        let e = to_batches(&r, &limits, &source()).unwrap_err();
        assert_eq!(e.reason(), "table_too_large");
        assert_eq!(
            e.to_string(),
            format!(
                "dictionary.string_table has {} entries, more than the limit of 16",
                r.dictionary.as_ref().unwrap().string_table.len()
            )
        );
        let limits = OtlpLimits {
            max_samples: 3,
            ..Default::default()
        };
        let e = to_batches(&r, &limits, &source()).unwrap_err();
        assert_eq!(e.reason(), "table_too_large");
        assert!(
            e.to_string().contains("profiles[0].samples has 4 entries"),
            "{e}"
        );
        let limits = OtlpLimits {
            max_profiles: 1,
            ..Default::default()
        };
        assert_eq!(
            to_batches(&r, &limits, &source()).unwrap_err().reason(),
            "table_too_large"
        );
        let limits = OtlpLimits {
            max_frames: 5,
            ..Default::default()
        };
        let e = to_batches(&r, &limits, &source()).unwrap_err();
        assert_eq!(e.reason(), "stack_too_deep");
        assert_eq!(
            e.to_string(),
            "dictionary.stack_table[1] has more than 5 frames"
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let mut r = agent_request();
        profile(&mut r, 0).samples[2].values = vec![-1];
        let e = refuse(&r);
        assert_eq!(e.reason(), "bad_value");
        assert!(
            e.to_string()
                .ends_with("samples[2].values[0] -1 is negative"),
            "{e}"
        );

        let mut r = agent_request();
        profile(&mut r, 0).samples[2].timestamps_unix_nano = vec![1, 2];
        assert_eq!(refuse(&r).reason(), "bad_value");

        let mut r = agent_request();
        profile(&mut r, 0).samples[2].values.clear();
        assert!(refuse(&r)
            .to_string()
            .ends_with("has neither values nor timestamps_unix_nano"));

        let mut r = agent_request();
        profile(&mut r, 1)
            .sample_type
            .as_mut()
            .unwrap()
            .unit_strindex = 0;
        let e = refuse(&r);
        assert_eq!(e.reason(), "bad_value");
        assert!(e.to_string().contains("profiles[1].sample_type "), "{e}");

        let mut r = agent_request();
        profile(&mut r, 1).sample_type = None;
        assert_eq!(refuse(&r).reason(), "bad_value");

        let mut r = agent_request();
        profile(&mut r, 0).period_type = None;
        assert!(refuse(&r)
            .to_string()
            .contains("profiles[0].period type cpu needs"));

        let mut r = agent_request();
        profile(&mut r, 0).time_unix_nano = 0;
        assert!(refuse(&r)
            .to_string()
            .ends_with("profiles[0].time_unix_nano 0 is not a collection time"));
        let mut r = agent_request();
        profile(&mut r, 0).duration_nano = u64::MAX;
        assert_eq!(refuse(&r).reason(), "bad_value");

        // What validation would refuse (found by the otlp_import fuzz
        // target): a window longer than a day, values summing to more
        // than a batch may hold (2^50 ns of off-CPU time).
        let mut r = agent_request();
        profile(&mut r, 1).duration_nano = 24 * 3600 * 1_000_000_000 + 1;
        assert!(refuse(&r)
            .to_string()
            .contains("profiles[1].time_unix_nano duration"));
        let mut r = agent_request();
        profile(&mut r, 1).samples[0].values = vec![1 << 49, (1 << 49) + 1];
        let e = refuse(&r);
        assert!(
            e.to_string().ends_with(
                "profiles[1].samples[0] makes the values of its type sum to more than 1125899906842624, the most of a batch"
            ),
            "{e}"
        );
    }

    #[test]
    fn attributes_that_are_not_labels_are_left_out_and_empty_keys_refused() {
        let mut r = agent_request();
        r.resource_profiles[0]
            .resource
            .as_mut()
            .unwrap()
            .attributes
            .push(KeyValue {
                key: "process.command_args".into(),
                value: Some(AnyValue {
                    value: Some(Value::ArrayValue(Default::default())),
                }),
                key_strindex: 0,
            });
        let batches = to_batches(&r, &OtlpLimits::default(), &Source::default()).unwrap();
        assert!(batches.iter().all(|b| !b
            .strings
            .iter()
            .any(|s| s.as_slice() == b"process_command_args")));

        let mut r = agent_request();
        dict(&mut r).attribute_table[9].key_strindex = 0;
        let e = refuse(&r);
        assert_eq!(e.reason(), "bad_attribute");
        assert!(e.to_string().ends_with("has an empty key"), "{e}");
    }

    #[test]
    fn resource_keys_may_be_string_indices() {
        let mut r = agent_request();
        let key = dict(&mut r).string_table.len() as i32;
        dict(&mut r).string_table.push("k8s.namespace.name".into());
        r.resource_profiles[0]
            .resource
            .as_mut()
            .unwrap()
            .attributes
            .push(KeyValue {
                key: String::new(),
                value: Some(AnyValue {
                    value: Some(Value::StringValueStrindex(1)),
                }),
                key_strindex: key,
            });
        let batches = convert(&r);
        let (_, labels, _) = &labeled(&batches[1])[0];
        let first = dict(&mut r).string_table[1].clone();
        assert!(labels.contains(&kv("namespace", &first)), "{labels:?}");
    }
}
