//! A batch as an OTLP profiles export request ([`to_otlp`]), following the
//! shared mapping (native batch <-> OTLP profiles):
//!
//! - one `ExportProfilesServiceRequest` per batch, with one
//!   `ResourceProfiles` per distinct set of resource labels (`node`,
//!   `service`, `process`, `exe`, `pid`, `container_id`, `pod`,
//!   `namespace`, `container`, `runtime`, `go_version`, as semantic
//!   convention attributes, `pid` an integer), each holding one
//!   `ScopeProfiles` (scope `profiler-agent`, the agent's version) with one
//!   `Profile` of the batch's sample type;
//! - the other labels are sample attributes: `thread` as `thread.name`,
//!   any other under its own name, with string values;
//! - a stack loses its first frame when it is the sample's `process` label
//!   (the resource says it); its frames become locations, leaf first: a
//!   frame and the `_[i]` frames after it (inlined into it) are one location
//!   whose lines go innermost first, `_[k]` and `_[j]` frames lose their
//!   suffix and their location says `profile.frame.type` `kernel` or `jit`,
//!   any other frame is `native`;
//! - one dictionary for the request, every entry once, the zero value at
//!   index 0 of every table;
//! - samples of one profile with the same stack and attributes are one
//!   sample whose value is their sum (OTLP: samples of one identity
//!   SHOULD be combined).
//!
//! The output depends only on the batch: tables and samples are in order of
//! first use, and the profile ids are hashes of the batch's identity, so a
//! re-sent batch encodes to the same bytes.
use std::collections::HashMap;

use profiler_proto::{
    otlp::{
        collector::ExportProfilesServiceRequest,
        common::{any_value, AnyValue, InstrumentationScope, KeyValue},
        profiles::{
            Function, KeyValueAndUnit, Line, Link, Location, Mapping, Profile, ProfilesDictionary,
            ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
        },
        resource::Resource,
    },
    v1::Batch,
};

use crate::{
    names::JIT_SUFFIX,
    sample_type::SampleType,
    symbolize::{INLINED_SUFFIX, KERNEL_SUFFIX},
};

/// The instrumentation scope name of the profiles the agent sends.
pub const SCOPE_NAME: &str = "profiler-agent";

/// Labels that describe the resource, with their attribute keys, in the
/// order resource attributes are listed.
pub const RESOURCE_LABELS: [(&str, &str); 11] = [
    ("node", "host.name"),
    ("service", "service.name"),
    ("process", "process.executable.name"),
    ("exe", "process.executable.path"),
    ("pid", "process.pid"),
    ("container_id", "container.id"),
    ("pod", "k8s.pod.name"),
    ("namespace", "k8s.namespace.name"),
    ("container", "k8s.container.name"),
    ("runtime", "process.runtime.name"),
    ("go_version", "process.runtime.version"),
];

/// The sample attribute key of the `thread` label.
pub const THREAD_NAME_KEY: &str = "thread.name";

/// The location attribute that says what kind of code a frame is.
pub const FRAME_TYPE_KEY: &str = "profile.frame.type";

/// Why a batch cannot be converted: what in it is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OtlpError {
    #[error("strings[{index}] ({what}) is not valid UTF-8")]
    InvalidUtf8 { what: String, index: u32 },
    #[error("{what} index {index} out of range ({table} has {len} entries)")]
    IndexOutOfRange {
        what: String,
        index: u32,
        table: &'static str,
        len: usize,
    },
    #[error("label_sets[{set}] has the label {name:?} twice")]
    DuplicateLabel { set: u32, name: String },
    #[error("label_sets[{set}]: pid {value:?} is not an integer")]
    InvalidPid { set: u32, value: String },
    #[error("samples[{index}].value {value} is not positive")]
    NonPositiveValue { index: usize, value: i64 },
    #[error("the values of samples[{index}]'s stack and attributes overflow an i64")]
    ValueOverflow { index: usize },
    #[error("window: {0}")]
    Window(String),
    #[error("sample_type.{0} is empty")]
    EmptySampleType(&'static str),
    #[error("the dictionary's {0} has more entries than an i32 indexes")]
    TableFull(&'static str),
}

type Result<T, E = OtlpError> = std::result::Result<T, E>;

/// The batch as one OTLP export request (see the module documentation).
pub fn to_otlp(batch: &Batch) -> Result<ExportProfilesServiceRequest> {
    Converter::new(batch)?.run()
}

/// What kind of code a location is, from its frame's suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum FrameType {
    Native,
    Kernel,
    Jit,
}

impl FrameType {
    /// The `profile.frame.type` value.
    fn name(self) -> &'static str {
        match self {
            FrameType::Native => "native",
            FrameType::Kernel => "kernel",
            FrameType::Jit => "jit",
        }
    }

    /// The frame's type and its name without the type's suffix.
    fn of(frame: &str) -> (Self, &str) {
        if let Some(name) = frame.strip_suffix(KERNEL_SUFFIX) {
            (FrameType::Kernel, name)
        } else if let Some(name) = frame.strip_suffix(JIT_SUFFIX) {
            (FrameType::Jit, name)
        } else {
            (FrameType::Native, frame)
        }
    }
}

/// The request's dictionary being built: each table starts with its zero
/// value, and each entry is added once (the maps find existing ones).
struct Dictionary {
    strings: Vec<String>,
    string_ids: HashMap<String, i32>,
    functions: Vec<Function>,
    /// By name index.
    function_ids: HashMap<i32, i32>,
    locations: Vec<Location>,
    /// By frame type and function indexes of the lines.
    location_ids: HashMap<(FrameType, Vec<i32>), i32>,
    stacks: Vec<Stack>,
    stack_ids: HashMap<Vec<i32>, i32>,
    attributes: Vec<KeyValueAndUnit>,
    /// By key index and string value.
    attribute_ids: HashMap<(i32, String), i32>,
}

/// The index the next entry of a table of `len` entries gets.
fn next_index(len: usize, table: &'static str) -> Result<i32> {
    i32::try_from(len).map_err(|_| OtlpError::TableFull(table))
}

impl Dictionary {
    fn new() -> Self {
        Self {
            strings: vec![String::new()],
            string_ids: HashMap::from([(String::new(), 0)]),
            functions: vec![Function::default()],
            function_ids: HashMap::from([(0, 0)]),
            locations: vec![Location::default()],
            location_ids: HashMap::new(),
            stacks: vec![Stack::default()],
            stack_ids: HashMap::from([(Vec::new(), 0)]),
            attributes: vec![KeyValueAndUnit::default()],
            attribute_ids: HashMap::new(),
        }
    }

    fn string(&mut self, s: &str) -> Result<i32> {
        if let Some(id) = self.string_ids.get(s) {
            return Ok(*id);
        }
        let id = next_index(self.strings.len(), "string_table")?;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), id);
        Ok(id)
    }

    fn function(&mut self, name: &str) -> Result<i32> {
        let name = self.string(name)?;
        if let Some(id) = self.function_ids.get(&name) {
            return Ok(*id);
        }
        let id = next_index(self.functions.len(), "function_table")?;
        self.functions.push(Function {
            name_strindex: name,
            ..Function::default()
        });
        self.function_ids.insert(name, id);
        Ok(id)
    }

    /// A string-valued attribute.
    fn attribute(&mut self, key: &str, value: &str) -> Result<i32> {
        let key = self.string(key)?;
        if let Some(id) = self.attribute_ids.get(&(key, value.to_string())) {
            return Ok(*id);
        }
        let id = next_index(self.attributes.len(), "attribute_table")?;
        self.attributes.push(KeyValueAndUnit {
            key_strindex: key,
            value: Some(string_value(value)),
            unit_strindex: 0,
        });
        self.attribute_ids.insert((key, value.to_string()), id);
        Ok(id)
    }

    /// A location of `frame_type` whose lines are the functions `names`
    /// (innermost first).
    fn location(&mut self, frame_type: FrameType, names: &[&str]) -> Result<i32> {
        let functions = names
            .iter()
            .map(|name| self.function(name))
            .collect::<Result<Vec<i32>>>()?;
        let key = (frame_type, functions);
        if let Some(id) = self.location_ids.get(&key) {
            return Ok(*id);
        }
        let id = next_index(self.locations.len(), "location_table")?;
        let frame_type_attribute = self.attribute(FRAME_TYPE_KEY, frame_type.name())?;
        self.locations.push(Location {
            mapping_index: 0,
            address: 0,
            lines: key
                .1
                .iter()
                .map(|function| Line {
                    function_index: *function,
                    line: 0,
                    column: 0,
                })
                .collect(),
            attribute_indices: vec![frame_type_attribute],
        });
        self.location_ids.insert(key, id);
        Ok(id)
    }

    /// A stack of `locations` (leaf first).
    fn stack(&mut self, locations: Vec<i32>) -> Result<i32> {
        if let Some(id) = self.stack_ids.get(&locations) {
            return Ok(*id);
        }
        let id = next_index(self.stacks.len(), "stack_table")?;
        self.stacks.push(Stack {
            location_indices: locations.clone(),
        });
        self.stack_ids.insert(locations, id);
        Ok(id)
    }

    fn finish(self) -> ProfilesDictionary {
        ProfilesDictionary {
            mapping_table: vec![Mapping::default()],
            location_table: self.locations,
            function_table: self.functions,
            link_table: vec![Link::default()],
            string_table: self.strings,
            attribute_table: self.attributes,
            stack_table: self.stacks,
        }
    }
}

fn string_value(value: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(value.to_string())),
    }
}

/// What a label set of the batch becomes.
struct LabelSetInfo<'a> {
    /// Index into [`Converter::resources`].
    resource: usize,
    /// Sample attribute indexes.
    attributes: Vec<i32>,
    /// The first label set with the same resource and attributes: samples
    /// of one stack and identity are one sample.
    identity: u32,
    /// The `process` label's value.
    process: Option<&'a str>,
}

/// Resource labels: (index into [`RESOURCE_LABELS`], value), in that order.
type ResourceKey<'a> = Vec<(usize, &'a str)>;

/// One resource's profile being built.
struct ResourceGroup<'a> {
    key: ResourceKey<'a>,
    attributes: Vec<KeyValue>,
    samples: Vec<Sample>,
    /// Index into `samples` by stack and label set identity.
    sample_ids: HashMap<(i32, u32), usize>,
}

struct Converter<'a> {
    batch: &'a Batch,
    dictionary: Dictionary,
    label_sets: Vec<Option<LabelSetInfo<'a>>>,
    resources: Vec<ResourceGroup<'a>>,
    resource_ids: HashMap<ResourceKey<'a>, usize>,
    /// Label set identities by resource and sample attributes.
    identities: HashMap<(usize, Vec<i32>), u32>,
    /// Stack indexes by batch stack and whether its first frame is dropped.
    stacks: HashMap<(u32, bool), i32>,
    sample_type: (&'a str, &'a str),
    time_unix_nano: u64,
    duration_nano: u64,
}

impl<'a> Converter<'a> {
    fn new(batch: &'a Batch) -> Result<Self> {
        let sample_type = match &batch.sample_type {
            None => (SampleType::Cpu.name(), SampleType::Cpu.unit()),
            Some(t) => (t.r#type.as_str(), t.unit.as_str()),
        };
        if sample_type.0.is_empty() {
            return Err(OtlpError::EmptySampleType("type"));
        }
        if sample_type.1.is_empty() {
            return Err(OtlpError::EmptySampleType("unit"));
        }
        let (start, end) = (batch.window_start_unix_nanos, batch.window_end_unix_nanos);
        let time_unix_nano = u64::try_from(start)
            .map_err(|_| OtlpError::Window(format!("start {start} is negative")))?;
        let duration_nano = end
            .checked_sub(start)
            .and_then(|d| u64::try_from(d).ok())
            .ok_or_else(|| OtlpError::Window(format!("end {end} is before start {start}")))?;
        Ok(Self {
            batch,
            dictionary: Dictionary::new(),
            label_sets: (0..batch.label_sets.len()).map(|_| None).collect(),
            resources: Vec::new(),
            resource_ids: HashMap::new(),
            identities: HashMap::new(),
            stacks: HashMap::new(),
            sample_type,
            time_unix_nano,
            duration_nano,
        })
    }

    /// `strings[index]`, referenced by `what`.
    fn text(&self, index: u32, what: impl Fn() -> String) -> Result<&'a str> {
        let strings = &self.batch.strings;
        let bytes = strings
            .get(index as usize)
            .ok_or_else(|| OtlpError::IndexOutOfRange {
                what: what(),
                index,
                table: "strings",
                len: strings.len(),
            })?;
        std::str::from_utf8(bytes).map_err(|_| OtlpError::InvalidUtf8 {
            what: what(),
            index,
        })
    }

    fn run(mut self) -> Result<ExportProfilesServiceRequest> {
        let batch = self.batch;
        for (index, sample) in batch.samples.iter().enumerate() {
            if sample.value <= 0 {
                return Err(OtlpError::NonPositiveValue {
                    index,
                    value: sample.value,
                });
            }
            if sample.label_set as usize >= batch.label_sets.len() {
                return Err(OtlpError::IndexOutOfRange {
                    what: format!("samples[{index}].label_set"),
                    index: sample.label_set,
                    table: "label_sets",
                    len: batch.label_sets.len(),
                });
            }
            let (resource, identity, process) = self.label_set(sample.label_set)?;
            let stack = self.stack(index, sample.stack, process)?;
            let group = &mut self.resources[resource];
            match group.sample_ids.get(&(stack, identity)) {
                Some(&existing) => {
                    let value = &mut group.samples[existing].values[0];
                    *value = value
                        .checked_add(sample.value)
                        .ok_or(OtlpError::ValueOverflow { index })?;
                }
                None => {
                    let attributes = self.label_sets[sample.label_set as usize]
                        .as_ref()
                        .map(|info| info.attributes.clone())
                        .unwrap_or_default();
                    group
                        .sample_ids
                        .insert((stack, identity), group.samples.len());
                    group.samples.push(Sample {
                        stack_index: stack,
                        attribute_indices: attributes,
                        link_index: 0,
                        values: vec![sample.value],
                        timestamps_unix_nano: Vec::new(),
                    });
                }
            }
        }
        self.finish()
    }

    /// Converts label set `set` (in range) once, into a
    /// [`LabelSetInfo`]; returns its resource, identity and process.
    fn label_set(&mut self, set: u32) -> Result<(usize, u32, Option<&'a str>)> {
        if let Some(info) = &self.label_sets[set as usize] {
            return Ok((info.resource, info.identity, info.process));
        }
        let labels = &self.batch.label_sets[set as usize].labels;
        let mut names: Vec<&str> = Vec::with_capacity(labels.len());
        let mut resource: ResourceKey<'a> = Vec::new();
        let mut attributes = Vec::new();
        let mut process = None;
        for (i, label) in labels.iter().enumerate() {
            let name = self.text(label.name, || format!("label_sets[{set}].labels[{i}].name"))?;
            let value = self.text(label.value, || {
                format!("label_sets[{set}].labels[{i}].value")
            })?;
            if names.contains(&name) {
                return Err(OtlpError::DuplicateLabel {
                    set,
                    name: name.to_string(),
                });
            }
            names.push(name);
            if name == "process" {
                process = Some(value);
            }
            match RESOURCE_LABELS.iter().position(|(label, _)| *label == name) {
                Some(position) => resource.push((position, value)),
                None => {
                    let key = if name == "thread" {
                        THREAD_NAME_KEY
                    } else {
                        name
                    };
                    attributes.push(self.dictionary.attribute(key, value)?);
                }
            }
        }
        resource.sort_unstable();
        let resource = match self.resource_ids.get(&resource) {
            Some(id) => *id,
            None => {
                let id = self.resources.len();
                self.resources.push(ResourceGroup {
                    attributes: resource_attributes(set, &resource)?,
                    key: resource.clone(),
                    samples: Vec::new(),
                    sample_ids: HashMap::new(),
                });
                self.resource_ids.insert(resource, id);
                id
            }
        };
        let identity = *self
            .identities
            .entry((resource, attributes.clone()))
            .or_insert(set);
        self.label_sets[set as usize] = Some(LabelSetInfo {
            resource,
            attributes,
            identity,
            process,
        });
        Ok((resource, identity, process))
    }

    /// The stack index of batch stack `stack`, referenced by sample
    /// `sample` whose `process` label is `process`.
    fn stack(&mut self, sample: usize, stack: u32, process: Option<&str>) -> Result<i32> {
        let batch = self.batch;
        let frames = &batch
            .stacks
            .get(stack as usize)
            .ok_or_else(|| OtlpError::IndexOutOfRange {
                what: format!("samples[{sample}].stack"),
                index: stack,
                table: "stacks",
                len: batch.stacks.len(),
            })?
            .frames;
        let frame = |i: usize| self.text(frames[i], || format!("stacks[{stack}].frames[{i}]"));
        let drop_process = match (process, frames.is_empty()) {
            (Some(process), false) => frame(0)? == process,
            _ => false,
        };
        if let Some(id) = self.stacks.get(&(stack, drop_process)) {
            return Ok(*id);
        }
        let names = (usize::from(drop_process)..frames.len())
            .map(frame)
            .collect::<Result<Vec<&str>>>()?;
        let locations = frames_to_locations(&names)
            .iter()
            .rev()
            .map(|(frame_type, lines)| self.dictionary.location(*frame_type, lines))
            .collect::<Result<Vec<i32>>>()?;
        let id = self.dictionary.stack(locations)?;
        self.stacks.insert((stack, drop_process), id);
        Ok(id)
    }

    fn finish(mut self) -> Result<ExportProfilesServiceRequest> {
        let batch = self.batch;
        let (type_name, unit) = self.sample_type;
        let sample_type = ValueType {
            type_strindex: self.dictionary.string(type_name)?,
            unit_strindex: self.dictionary.string(unit)?,
        };
        let sampled = type_name == SampleType::Cpu.name() && batch.frequency_hz > 0;
        let (period_type, period) = if sampled {
            let period_type = ValueType {
                type_strindex: self.dictionary.string(SampleType::Cpu.name())?,
                unit_strindex: self.dictionary.string("nanoseconds")?,
            };
            let hz = u64::from(batch.frequency_hz);
            // Rounded to the nearest nanosecond.
            let period = (1_000_000_000 + hz / 2) / hz;
            (Some(period_type), period as i64)
        } else {
            (None, 0)
        };
        let resource_profiles = self
            .resources
            .into_iter()
            .map(|group| ResourceProfiles {
                resource: Some(Resource {
                    attributes: group.attributes,
                    dropped_attributes_count: 0,
                    entity_refs: Vec::new(),
                }),
                scope_profiles: vec![ScopeProfiles {
                    scope: Some(InstrumentationScope {
                        name: SCOPE_NAME.to_string(),
                        version: batch.agent_version.clone(),
                        attributes: Vec::new(),
                        dropped_attributes_count: 0,
                    }),
                    profiles: vec![Profile {
                        sample_type: Some(sample_type),
                        samples: group.samples,
                        time_unix_nano: self.time_unix_nano,
                        duration_nano: self.duration_nano,
                        period_type,
                        period,
                        profile_id: profile_id(batch, self.sample_type, &group.key).to_vec(),
                        ..Profile::default()
                    }],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect();
        Ok(ExportProfilesServiceRequest {
            resource_profiles,
            dictionary: Some(self.dictionary.finish()),
        })
    }
}

/// The resource attributes of label set `set`'s resource labels.
fn resource_attributes(set: u32, key: &ResourceKey<'_>) -> Result<Vec<KeyValue>> {
    key.iter()
        .map(|&(position, value)| {
            let (label, attribute) = RESOURCE_LABELS[position];
            let value = if label == "pid" {
                let pid = value.parse::<i64>().map_err(|_| OtlpError::InvalidPid {
                    set,
                    value: value.to_string(),
                })?;
                AnyValue {
                    value: Some(any_value::Value::IntValue(pid)),
                }
            } else {
                string_value(value)
            };
            Ok(KeyValue {
                key: attribute.to_string(),
                value: Some(value),
                ..KeyValue::default()
            })
        })
        .collect()
}

/// A root-first run of frames as locations, root first: each location's
/// frame type and its function names, innermost first. A frame and the
/// `_[i]` frames that follow it (each inlined into the one before) are one
/// location; an `_[i]` frame with nothing before it keeps its name whole.
fn frames_to_locations<'f>(frames: &[&'f str]) -> Vec<(FrameType, Vec<&'f str>)> {
    let mut locations: Vec<(FrameType, Vec<&'f str>)> = Vec::new();
    for frame in frames {
        if let (Some(inlined), Some((_, lines))) =
            (frame.strip_suffix(INLINED_SUFFIX), locations.last_mut())
        {
            lines.push(inlined);
            continue;
        }
        let (frame_type, name) = FrameType::of(frame);
        locations.push((frame_type, vec![name]));
    }
    for (_, lines) in &mut locations {
        lines.reverse();
    }
    locations
}

/// FNV-1a 64 over length-prefixed `parts`, its offset basis xor `seed`.
fn fnv1a64(seed: u64, parts: &[&[u8]]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET_BASIS ^ seed;
    for part in parts {
        let len = (part.len() as u64).to_le_bytes();
        for byte in len.iter().chain(part.iter()) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}

/// The id of the profile of one resource of a batch: a hash of the batch's
/// identity (agent id, sequence), its sample type and the resource's
/// labels, so a re-sent batch gives the same ids and the profiles of one
/// batch differ.
fn profile_id(batch: &Batch, (type_name, unit): (&str, &str), resource: &ResourceKey) -> [u8; 16] {
    let sequence = batch.sequence.to_le_bytes();
    let mut parts: Vec<&[u8]> = vec![
        batch.agent_id.as_bytes(),
        &sequence,
        type_name.as_bytes(),
        unit.as_bytes(),
    ];
    for (position, value) in resource {
        parts.push(RESOURCE_LABELS[*position].0.as_bytes());
        parts.push(value.as_bytes());
    }
    let mut id = [0; 16];
    id[..8].copy_from_slice(&fnv1a64(0, &parts).to_be_bytes());
    id[8..].copy_from_slice(&fnv1a64(0x9e37_79b9_7f4a_7c15, &parts).to_be_bytes());
    if id == [0; 16] {
        // All zeroes is not a valid id.
        id[15] = 1;
    }
    id
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use profiler_proto::v1::{Label, LabelSet, Sample as BatchSample, Stack as BatchStack};
    use prost::Message;

    use super::*;
    use crate::export::batch::{BatchBuilder, BatchHeader};

    const FREQUENCY_HZ: u32 = 99;

    fn header(sequence: u64) -> BatchHeader {
        BatchHeader {
            agent_id: "node-1-4242-abc".into(),
            sequence,
            node: "node-1".into(),
            window_start: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            window_end: UNIX_EPOCH + Duration::from_secs(1_700_000_010),
            frequency_hz: FREQUENCY_HZ,
        }
    }

    fn frames(folded: &str) -> Vec<String> {
        folded.split(';').map(str::to_string).collect()
    }

    const SRV: [(&str, &str); 11] = [
        ("node", "node-1"),
        ("process", "srv"),
        ("pid", "4242"),
        ("exe", "/usr/bin/srv"),
        ("service", "checkout"),
        ("pod", "checkout-7d9f"),
        ("namespace", "shop"),
        ("container", "app"),
        ("container_id", "3f2b4e1c9a8d"),
        ("runtime", "go"),
        ("go_version", "go1.22.3"),
    ];

    const DB: [(&str, &str); 5] = [
        ("node", "node-1"),
        ("process", "db"),
        ("pid", "7"),
        ("exe", "/usr/sbin/db"),
        ("service", "db.service"),
    ];

    fn with(
        labels: &[(&'static str, &'static str)],
        extra: &[(&'static str, &'static str)],
    ) -> Labels {
        labels.iter().chain(extra).copied().collect()
    }

    type Labels = Vec<(&'static str, &'static str)>;

    /// The folded stacks (root first, the process frame first) and values
    /// of the CPU batch the tests convert.
    fn cpu_samples() -> Vec<(Labels, &'static str, u64)> {
        vec![
            (
                with(&SRV, &[("thread", "worker-1")]),
                "srv;main;work;leaf",
                10,
            ),
            (
                with(&SRV, &[("thread", "worker-1")]),
                "srv;main;work;read;entry_SYSCALL_64_[k];schedule_[k]",
                3,
            ),
            (
                with(&SRV, &[("thread", "worker-2")]),
                "srv;main;a;b_[i];c_[i]",
                5,
            ),
            (
                with(&SRV, &[]),
                "srv;main;JS:*handle /srv/app.js:3_[j];leaf",
                2,
            ),
            (with(&DB, &[]), "db;main;vacuum;lib.so+0x1234", 4),
            (with(&DB, &[]), "db;[stack cut: no_table]", 1),
        ]
    }

    fn cpu_batch() -> Batch {
        let mut b = BatchBuilder::new();
        for (labels, folded, value) in cpu_samples() {
            b.add(&labels, &frames(folded), value);
        }
        b.finish(header(7))
    }

    fn dictionary(request: &ExportProfilesServiceRequest) -> &ProfilesDictionary {
        request.dictionary.as_ref().expect("a dictionary")
    }

    fn profiles(request: &ExportProfilesServiceRequest) -> Vec<&Profile> {
        request
            .resource_profiles
            .iter()
            .flat_map(|r| &r.scope_profiles)
            .flat_map(|s| &s.profiles)
            .collect()
    }

    fn string(d: &ProfilesDictionary, index: i32) -> &str {
        &d.string_table[index as usize]
    }

    /// A sample's stack as folded frames, root first, back from OTLP:
    /// locations reversed, lines reversed, the caller line suffixed by its
    /// frame type, the others with `_[i]`.
    fn folded(d: &ProfilesDictionary, sample: &Sample) -> String {
        let stack = &d.stack_table[sample.stack_index as usize];
        let mut frames = Vec::new();
        for location in stack.location_indices.iter().rev() {
            let location = &d.location_table[*location as usize];
            let suffix = match frame_type(d, location) {
                "kernel" => KERNEL_SUFFIX,
                "jit" => JIT_SUFFIX,
                "native" => "",
                other => panic!("frame type {other:?}"),
            };
            for (i, line) in location.lines.iter().rev().enumerate() {
                let function = &d.function_table[line.function_index as usize];
                let name = string(d, function.name_strindex);
                let suffix = if i == 0 { suffix } else { INLINED_SUFFIX };
                frames.push(format!("{name}{suffix}"));
            }
        }
        frames.join(";")
    }

    fn frame_type<'d>(d: &'d ProfilesDictionary, location: &Location) -> &'d str {
        let [attribute] = location.attribute_indices[..] else {
            panic!("one attribute per location: {location:?}");
        };
        let attribute = &d.attribute_table[attribute as usize];
        assert_eq!(string(d, attribute.key_strindex), FRAME_TYPE_KEY);
        match &attribute.value {
            Some(AnyValue {
                value: Some(any_value::Value::StringValue(v)),
            }) => v,
            other => panic!("frame type value {other:?}"),
        }
    }

    /// A sample's attributes as (key, string value).
    fn sample_attributes(d: &ProfilesDictionary, sample: &Sample) -> Vec<(String, String)> {
        sample
            .attribute_indices
            .iter()
            .map(|i| {
                let attribute = &d.attribute_table[*i as usize];
                let Some(AnyValue {
                    value: Some(any_value::Value::StringValue(value)),
                }) = &attribute.value
                else {
                    panic!("a string value: {attribute:?}");
                };
                (string(d, attribute.key_strindex).to_string(), value.clone())
            })
            .collect()
    }

    fn resource_attributes(r: &ResourceProfiles) -> Vec<(&str, &any_value::Value)> {
        r.resource
            .as_ref()
            .expect("a resource")
            .attributes
            .iter()
            .map(|kv| {
                (
                    kv.key.as_str(),
                    kv.value.as_ref().unwrap().value.as_ref().unwrap(),
                )
            })
            .collect()
    }

    fn s(value: &str) -> any_value::Value {
        any_value::Value::StringValue(value.to_string())
    }

    #[test]
    fn one_resource_per_resource_label_set_with_semconv_keys_and_an_int_pid() {
        let batch = cpu_batch();
        let request = to_otlp(&batch).unwrap();
        assert_eq!(request.resource_profiles.len(), 2, "srv and db");
        let srv = &request.resource_profiles[0];
        assert_eq!(
            resource_attributes(srv),
            [
                ("host.name", &s("node-1")),
                ("service.name", &s("checkout")),
                ("process.executable.name", &s("srv")),
                ("process.executable.path", &s("/usr/bin/srv")),
                ("process.pid", &any_value::Value::IntValue(4242)),
                ("container.id", &s("3f2b4e1c9a8d")),
                ("k8s.pod.name", &s("checkout-7d9f")),
                ("k8s.namespace.name", &s("shop")),
                ("k8s.container.name", &s("app")),
                ("process.runtime.name", &s("go")),
                ("process.runtime.version", &s("go1.22.3")),
            ]
        );
        let db = &request.resource_profiles[1];
        assert_eq!(
            resource_attributes(db),
            [
                ("host.name", &s("node-1")),
                ("service.name", &s("db.service")),
                ("process.executable.name", &s("db")),
                ("process.executable.path", &s("/usr/sbin/db")),
                ("process.pid", &any_value::Value::IntValue(7)),
            ]
        );
        for resource in &request.resource_profiles {
            let [scope] = &resource.scope_profiles[..] else {
                panic!("one scope per resource");
            };
            let scope_id = scope.scope.as_ref().unwrap();
            assert_eq!(scope_id.name, "profiler-agent");
            assert_eq!(scope_id.version, env!("CARGO_PKG_VERSION"));
            assert_eq!(scope.profiles.len(), 1, "one profile per resource");
        }
        let ids: Vec<&Vec<u8>> = profiles(&request).iter().map(|p| &p.profile_id).collect();
        assert!(ids.iter().all(|id| id.len() == 16));
        assert_ne!(ids[0], ids[1], "each profile its own id");
    }

    #[test]
    fn stacks_walk_back_to_the_folded_stacks_without_the_process_frame() {
        let request = to_otlp(&cpu_batch()).unwrap();
        let d = dictionary(&request);
        let mut got = Vec::new();
        for (resource, profile) in request.resource_profiles.iter().zip(profiles(&request)) {
            let process = match resource_attributes(resource)[2] {
                ("process.executable.name", any_value::Value::StringValue(p)) => p.clone(),
                other => panic!("{other:?}"),
            };
            for sample in &profile.samples {
                got.push((
                    process.clone(),
                    folded(d, sample),
                    sample_attributes(d, sample),
                    sample.values.clone(),
                ));
            }
        }
        let thread = |name: &str| vec![("thread.name".to_string(), name.to_string())];
        let want = vec![
            ("srv", "main;work;leaf", thread("worker-1"), 10),
            (
                "srv",
                "main;work;read;entry_SYSCALL_64_[k];schedule_[k]",
                thread("worker-1"),
                3,
            ),
            ("srv", "main;a;b_[i];c_[i]", thread("worker-2"), 5),
            ("srv", "main;JS:*handle /srv/app.js:3_[j];leaf", vec![], 2),
            ("db", "main;vacuum;lib.so+0x1234", vec![], 4),
            ("db", "[stack cut: no_table]", vec![], 1),
        ];
        let want: Vec<_> = want
            .into_iter()
            .map(|(p, f, a, v)| (p.to_string(), f.to_string(), a, vec![v]))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn frame_types_and_inlined_lines_innermost_first() {
        let request = to_otlp(&cpu_batch()).unwrap();
        let d = dictionary(&request);
        let profile = profiles(&request)[0];
        let names = |location: &Location| -> Vec<&str> {
            location
                .lines
                .iter()
                .map(|l| string(d, d.function_table[l.function_index as usize].name_strindex))
                .collect()
        };
        let locations = |sample: &Sample| -> Vec<&Location> {
            d.stack_table[sample.stack_index as usize]
                .location_indices
                .iter()
                .map(|i| &d.location_table[*i as usize])
                .collect()
        };
        // Leaf first: schedule, entry_SYSCALL_64, read, work, main.
        let kernel = locations(&profile.samples[1]);
        assert_eq!(names(kernel[0]), ["schedule"]);
        assert_eq!(frame_type(d, kernel[0]), "kernel");
        assert_eq!(names(kernel[1]), ["entry_SYSCALL_64"]);
        assert_eq!(frame_type(d, kernel[1]), "kernel");
        assert_eq!(frame_type(d, kernel[2]), "native");
        // `main;a;b_[i];c_[i]`: two locations, the leaf one with lines c, b, a.
        let inlined = locations(&profile.samples[2]);
        assert_eq!(inlined.len(), 2);
        assert_eq!(names(inlined[0]), ["c", "b", "a"]);
        assert_eq!(frame_type(d, inlined[0]), "native");
        assert_eq!(names(inlined[1]), ["main"]);
        let jit = locations(&profile.samples[3]);
        assert_eq!(names(jit[1]), ["JS:*handle /srv/app.js:3"]);
        assert_eq!(frame_type(d, jit[1]), "jit");
        for location in &d.location_table[1..] {
            assert_eq!((location.mapping_index, location.address), (0, 0));
        }
    }

    #[test]
    fn dictionary_tables_start_with_the_zero_value_and_hold_each_entry_once() {
        let request = to_otlp(&cpu_batch()).unwrap();
        let d = dictionary(&request);
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.mapping_table, [Mapping::default()]);
        assert_eq!(d.link_table, [Link::default()]);
        assert_eq!(d.function_table[0], Function::default());
        assert_eq!(d.location_table[0], Location::default());
        assert_eq!(d.stack_table[0], Stack::default());
        assert_eq!(d.attribute_table[0], KeyValueAndUnit::default());
        fn once<T: PartialEq + std::fmt::Debug>(table: &[T]) {
            for (i, entry) in table.iter().enumerate() {
                assert!(
                    !table[..i].contains(entry),
                    "{entry:?} twice in the same table"
                );
            }
        }
        once(&d.string_table);
        once(&d.function_table);
        once(&d.location_table);
        once(&d.stack_table);
        once(&d.attribute_table);
        // `main` is one function and one location shared by every stack.
        let main = d.string_table.iter().position(|s| s == "main").unwrap();
        assert_eq!(
            d.function_table
                .iter()
                .filter(|f| f.name_strindex == main as i32)
                .count(),
            1
        );
        // The process frame is in no function.
        for process in ["srv", "db"] {
            assert!(!d
                .function_table
                .iter()
                .any(|f| string(d, f.name_strindex) == process));
        }
        // Every index is in range.
        for profile in profiles(&request) {
            for sample in &profile.samples {
                let stack = &d.stack_table[sample.stack_index as usize];
                for location in &stack.location_indices {
                    for line in &d.location_table[*location as usize].lines {
                        assert!((line.function_index as usize) < d.function_table.len());
                    }
                }
                for attribute in &sample.attribute_indices {
                    assert!((*attribute as usize) < d.attribute_table.len());
                }
            }
        }
    }

    #[test]
    fn a_cpu_profile_has_its_type_window_and_period() {
        let batch = cpu_batch();
        let request = to_otlp(&batch).unwrap();
        let d = dictionary(&request);
        for profile in profiles(&request) {
            let sample_type = profile.sample_type.unwrap();
            assert_eq!(string(d, sample_type.type_strindex), "cpu");
            assert_eq!(string(d, sample_type.unit_strindex), "samples");
            let period_type = profile.period_type.unwrap();
            assert_eq!(string(d, period_type.type_strindex), "cpu");
            assert_eq!(string(d, period_type.unit_strindex), "nanoseconds");
            assert_eq!(profile.period, 10_101_010, "1e9 / 99 Hz");
            assert_eq!(profile.time_unix_nano, 1_700_000_000_000_000_000);
            assert_eq!(profile.duration_nano, 10_000_000_000);
            assert!(profile.samples.iter().all(|s| s.values.len() == 1));
        }
        let total: i64 = profiles(&request)
            .iter()
            .flat_map(|p| &p.samples)
            .map(|s| s.values[0])
            .sum();
        assert_eq!(total, 25);
    }

    #[test]
    fn an_off_cpu_profile_has_no_period_and_its_thread_state() {
        let mut b = BatchBuilder::for_type(SampleType::OffCpu);
        let labels = with(
            &SRV,
            &[("thread", "worker-1"), ("thread_state", "sleeping")],
        );
        b.add(
            &labels,
            &frames("srv;main;wait;futex_wait_[k];schedule_[k]"),
            3_000_000,
        );
        let labels = with(
            &SRV,
            &[("thread", "worker-1"), ("thread_state", "uninterruptible")],
        );
        b.add(&labels, &frames("srv;main;read;io_schedule_[k]"), 1_000);
        let mut h = header(8);
        h.frequency_hz = 0;
        let request = to_otlp(&b.finish(h)).unwrap();
        let d = dictionary(&request);
        let [profile] = profiles(&request)[..] else {
            panic!("one resource");
        };
        let sample_type = profile.sample_type.unwrap();
        assert_eq!(string(d, sample_type.type_strindex), "off_cpu");
        assert_eq!(string(d, sample_type.unit_strindex), "nanoseconds");
        assert_eq!((profile.period_type, profile.period), (None, 0));
        let attributes: Vec<_> = profile
            .samples
            .iter()
            .map(|s| (sample_attributes(d, s), s.values.clone()))
            .collect();
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            attributes,
            [
                (
                    vec![
                        pair("thread.name", "worker-1"),
                        pair("thread_state", "sleeping")
                    ],
                    vec![3_000_000]
                ),
                (
                    vec![
                        pair("thread.name", "worker-1"),
                        pair("thread_state", "uninterruptible")
                    ],
                    vec![1_000]
                ),
            ]
        );
        assert_eq!(
            folded(d, &profile.samples[0]),
            "main;wait;futex_wait_[k];schedule_[k]"
        );
    }

    #[test]
    fn samples_of_one_stack_and_attributes_are_summed() {
        let mut b = BatchBuilder::new();
        b.add(&SRV, &frames("srv;main;leaf"), 3);
        b.add(&SRV, &frames("srv;main;leaf"), 4);
        let request = to_otlp(&b.finish(header(1))).unwrap();
        let [profile] = profiles(&request)[..] else {
            panic!("one resource");
        };
        let values: Vec<_> = profile.samples.iter().map(|s| s.values.clone()).collect();
        assert_eq!(values, [vec![7]]);
    }

    #[test]
    fn the_process_frame_stays_when_it_is_not_the_process_label() {
        let mut b = BatchBuilder::new();
        b.add(&[("node", "n"), ("pid", "1")], &frames("init;main"), 1);
        b.add(
            &[("process", "srv"), ("pid", "2")],
            &frames("other;main"),
            1,
        );
        b.add(&[("process", "srv"), ("pid", "2")], &frames("srv"), 1);
        let request = to_otlp(&b.finish(header(1))).unwrap();
        let d = dictionary(&request);
        let stacks: Vec<_> = profiles(&request)
            .iter()
            .flat_map(|p| &p.samples)
            .map(|s| folded(d, s))
            .collect();
        assert_eq!(stacks, ["init;main", "other;main", ""]);
    }

    #[test]
    fn the_request_round_trips_with_prost_and_encodes_the_same_every_time() {
        let batch = cpu_batch();
        let request = to_otlp(&batch).unwrap();
        let bytes = request.encode_to_vec();
        assert_eq!(
            ExportProfilesServiceRequest::decode(bytes.as_slice()).unwrap(),
            request
        );
        for _ in 0..5 {
            assert_eq!(to_otlp(&batch).unwrap().encode_to_vec(), bytes);
            assert_eq!(to_otlp(&cpu_batch()).unwrap().encode_to_vec(), bytes);
        }
        // Another sequence is another profile.
        let mut next = batch.clone();
        next.sequence += 1;
        let ids = |r: &ExportProfilesServiceRequest| -> Vec<Vec<u8>> {
            profiles(r).iter().map(|p| p.profile_id.clone()).collect()
        };
        let next = to_otlp(&next).unwrap();
        assert!(ids(&request).iter().all(|id| !ids(&next).contains(id)));
    }

    #[test]
    fn an_empty_batch_is_a_request_without_profiles() {
        let request = to_otlp(&BatchBuilder::new().finish(header(1))).unwrap();
        assert!(request.resource_profiles.is_empty());
        assert_eq!(dictionary(&request).string_table[0], "");
    }

    #[test]
    fn bad_batches_are_refused_with_what_is_wrong() {
        let err = |batch: Batch| to_otlp(&batch).unwrap_err().to_string();
        let good = cpu_batch();

        let mut b = good.clone();
        b.strings.push(vec![0xff, 0xfe]);
        let bad = b.strings.len() as u32 - 1;
        b.stacks[0].frames[2] = bad;
        assert_eq!(
            err(b),
            format!("strings[{bad}] (stacks[0].frames[2]) is not valid UTF-8")
        );

        let mut b = good.clone();
        b.samples[1].stack = 99;
        assert_eq!(
            err(b),
            "samples[1].stack index 99 out of range (stacks has 6 entries)"
        );

        let mut b = good.clone();
        b.samples[0].label_set = 42;
        assert_eq!(
            err(b),
            "samples[0].label_set index 42 out of range (label_sets has 4 entries)"
        );

        let mut b = good.clone();
        b.label_sets[0].labels[0].value = 1000;
        let len = b.strings.len();
        assert_eq!(
            err(b),
            format!(
                "label_sets[0].labels[0].value index 1000 out of range (strings has {len} entries)"
            )
        );

        let mut b = good.clone();
        b.samples[2].value = 0;
        assert_eq!(err(b), "samples[2].value 0 is not positive");

        let mut b = good.clone();
        b.window_end_unix_nanos = b.window_start_unix_nanos - 1;
        assert!(err(b).starts_with("window: end "));

        let mut b = good.clone();
        b.sample_type.as_mut().unwrap().unit.clear();
        assert_eq!(err(b), "sample_type.unit is empty");

        let pid = |value: &str| {
            let mut b = BatchBuilder::new();
            b.add(
                &[("process", "srv"), ("pid", value)],
                &frames("srv;main"),
                1,
            );
            b.finish(header(1))
        };
        assert_eq!(
            err(pid("42x")),
            "label_sets[0]: pid \"42x\" is not an integer"
        );

        let twice = Batch {
            strings: ["", "pid", "1", "2", "main"]
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect(),
            stacks: vec![BatchStack { frames: vec![4] }],
            label_sets: vec![LabelSet {
                labels: vec![Label { name: 1, value: 2 }, Label { name: 1, value: 3 }],
            }],
            samples: vec![BatchSample {
                label_set: 0,
                stack: 0,
                value: 1,
            }],
            ..Batch::default()
        };
        assert_eq!(err(twice), "label_sets[0] has the label \"pid\" twice");
    }

    #[test]
    fn fnv1a64_is_the_reference_hash_with_seed_zero() {
        // FNV-1a 64 of the empty input is the offset basis; with the length
        // prefix, `parts` never collide by moving bytes between them.
        assert_eq!(fnv1a64(0, &[]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a64(0, &[b"ab", b"c"]), fnv1a64(0, &[b"a", b"bc"]));
        assert_ne!(fnv1a64(0, &[b"a"]), fnv1a64(1, &[b"a"]));
    }
}
