//! The committed seeds of the import targets, built here so they stay
//! readable and current: `FUZZ_BLESS=1 cargo test -p profiler-fuzz`
//! rewrites them, and `cargo test -p profiler-fuzz` fails while a file
//! differs from what is built here.
use std::{collections::HashMap, path::PathBuf};

use profiler_proto::{
    otlp::{
        collector::ExportProfilesServiceRequest,
        common::{any_value::Value, AnyValue, InstrumentationScope, KeyValue},
        profiles::{
            Function as OtlpFunction, KeyValueAndUnit, Line as OtlpLine, Link,
            Location as OtlpLocation, Mapping as OtlpMapping, Profile as OtlpProfile,
            ProfilesDictionary, ResourceProfiles, Sample as OtlpSample, ScopeProfiles,
            Stack as OtlpStack, ValueType as OtlpValueType,
        },
        resource::Resource,
    },
    pprof::{Function, Label, Line, Location, Mapping, Profile, Sample, ValueType},
};
use prost::Message;

use super::*;

/// When the seeds' profiles were collected (2023-11-14).
const T0: i64 = 1_700_000_000_000_000_000;

pub fn dir(target: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target)
}

/// A pprof profile built the way Go's runtime/pprof writes one.
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

    fn mapping(&mut self, file: &str, memory_start: u64, build_id: &str) -> u64 {
        let id = self.p.mapping.len() as u64 + 1;
        let (filename, build_id) = (self.s(file), self.s(build_id));
        self.p.mapping.push(Mapping {
            id,
            memory_start,
            memory_limit: memory_start + 0x40_0000,
            file_offset: 0,
            filename,
            build_id,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
        id
    }

    fn function(&mut self, name: &str) -> u64 {
        if let Some(f) = self
            .p
            .function
            .iter()
            .find(|f| self.p.string_table[f.name as usize] == name)
        {
            return f.id;
        }
        let id = self.p.function.len() as u64 + 1;
        let (name, filename) = (self.s(name), self.s("/src/server/main.go"));
        self.p.function.push(Function {
            id,
            name,
            system_name: name,
            filename,
            start_line: 1,
        });
        id
    }

    /// A location in mapping 1 whose lines are `names`, innermost first
    /// (more than one: the first ones are inlined into the last).
    fn location(&mut self, names: &[&str]) -> u64 {
        let line = names
            .iter()
            .map(|n| Line {
                function_id: self.function(n),
                line: 42,
            })
            .collect();
        let id = self.p.location.len() as u64 + 1;
        self.p.location.push(Location {
            id,
            mapping_id: 1,
            address: 0x40_1000 + id * 16,
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

/// A Go CPU profile: samples/count and cpu/nanoseconds at 100 Hz over
/// 10 s, an inlined frame, a goroutine label and a numeric one, a location
/// without lines in a second mapping, a sample of zero values.
pub fn go_cpu() -> Profile {
    let mut g = GoProfile::new();
    g.p.sample_type = vec![
        g.value_type("samples", "count"),
        g.value_type("cpu", "nanoseconds"),
    ];
    g.p.period_type = Some(g.value_type("cpu", "nanoseconds"));
    g.p.period = 10_000_000;
    g.p.time_nanos = T0;
    g.p.duration_nanos = 10_000_000_000;
    g.p.default_sample_type = g.s("cpu");
    g.mapping("/usr/local/bin/server", 0x40_0000, "9f2c1e");
    let libc = g.mapping("/lib/x86_64-linux-gnu/libc.so.6", 0x7f00_0000_0000, "");
    let goexit = g.location(&["runtime.goexit"]);
    let main = g.location(&["main.main"]);
    // (*T).step inlined into (*T).work.
    let work = g.location(&["main.(*T).step", "main.(*T).work"]);
    let malloc = g.location(&["runtime.mallocgc"]);
    let memmove = g.p.location.len() as u64 + 1;
    g.p.location.push(Location {
        id: memmove,
        mapping_id: libc,
        address: 0x7f00_0001_2345,
        line: Vec::new(),
        is_folded: false,
    });
    g.sample(&[work, main, goexit], &[7, 70_000_000], &[]);
    g.sample(
        &[malloc, work, main, goexit],
        &[2, 20_000_000],
        &[("handler", "/api")],
    );
    g.sample(&[memmove, main, goexit], &[1, 10_000_000], &[]);
    g.sample(&[main, goexit], &[0, 0], &[]);
    let (bytes, unit) = (g.s("bytes"), g.s("byte"));
    g.p.sample[0].label.push(Label {
        key: bytes,
        str: 0,
        num: 4096,
        num_unit: unit,
    });
    g.p
}

/// A Go mutex profile: contentions/count and delay/nanoseconds, no
/// duration, a contention without delay.
pub fn go_mutex() -> Profile {
    let mut g = GoProfile::new();
    g.p.sample_type = vec![
        g.value_type("contentions", "count"),
        g.value_type("delay", "nanoseconds"),
    ];
    g.p.period_type = Some(g.value_type("contentions", "count"));
    g.p.period = 1;
    g.p.time_nanos = T0;
    g.mapping("/usr/local/bin/server", 0x40_0000, "");
    let goexit = g.location(&["runtime.goexit"]);
    let unlock = g.location(&["sync.(*Mutex).Unlock"]);
    let handle = g.location(&["main.handle"]);
    g.sample(&[unlock, handle, goexit], &[3, 1_500_000], &[]);
    g.sample(&[handle, goexit], &[1, 0], &[]);
    g.p
}

/// A day: the longest window a batch may have.
const DAY_NS: i64 = 24 * 3600 * 1_000_000_000;

/// A frame name that makes a stack of 1024 (the most frames a batch may
/// have) as long as a folded stack may be: `1024 * (63 + 1) - 1` bytes.
fn edge_name() -> String {
    format!("main.{}", "x".repeat(58))
}

/// A profile at the limits a batch must keep: a window of a day, values
/// summing to 2^50 (the most of a type other than `cpu`), a stack of 1024
/// frames as long as a folded stack may be.
pub fn pprof_edge() -> Profile {
    let mut g = GoProfile::new();
    g.p.sample_type = vec![
        g.value_type("contentions", "count"),
        g.value_type("delay", "nanoseconds"),
    ];
    g.p.time_nanos = T0;
    g.p.duration_nanos = DAY_NS;
    g.mapping("/usr/local/bin/server", 0x40_0000, "");
    let deep = g.location(&[&edge_name()]);
    let main = g.location(&["main.main"]);
    g.sample(&vec![deep; 1024], &[1, 1 << 49], &[]);
    g.sample(&[main], &[1, 1 << 49], &[("handler", "/api")]);
    g.p
}

/// `data` as a gzip member of stored (not compressed) deflate blocks:
/// valid gzip, with no compressor needed.
pub fn gzip_stored(data: &[u8]) -> Vec<u8> {
    // Magic, deflate, no flags, no mtime, no extra flags, unknown OS.
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let chunks: Vec<&[u8]> = data.chunks(0xffff).collect();
    let chunks = if chunks.is_empty() {
        vec![&[][..]]
    } else {
        chunks
    };
    for (i, chunk) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        let len = chunk.len() as u16;
        out.extend(len.to_le_bytes());
        out.extend((!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend(crc32(data).to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// A request's dictionary, each table's zero value at index 0.
struct Dict(ProfilesDictionary);

impl Dict {
    fn new() -> Self {
        Dict(ProfilesDictionary {
            mapping_table: vec![OtlpMapping::default()],
            location_table: vec![OtlpLocation::default()],
            function_table: vec![OtlpFunction::default()],
            link_table: vec![Link::default()],
            string_table: vec![String::new()],
            attribute_table: vec![KeyValueAndUnit::default()],
            stack_table: vec![OtlpStack::default()],
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

    fn value_type(&mut self, t: &str, u: &str) -> OtlpValueType {
        OtlpValueType {
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

    /// A location of `lines` (innermost first) of frame type `kind`.
    fn location(&mut self, lines: &[&str], kind: &str) -> i32 {
        let lines = lines
            .iter()
            .map(|name| {
                let name_strindex = self.s(name);
                self.0.function_table.push(OtlpFunction {
                    name_strindex,
                    ..Default::default()
                });
                OtlpLine {
                    function_index: self.0.function_table.len() as i32 - 1,
                    line: 7,
                    column: 0,
                }
            })
            .collect();
        let kind = self.s(kind);
        let attribute = self.attribute("profile.frame.type", Value::StringValueStrindex(kind));
        self.0.location_table.push(OtlpLocation {
            mapping_index: 0,
            address: 0,
            lines,
            attribute_indices: vec![attribute],
        });
        self.0.location_table.len() as i32 - 1
    }

    /// A stack of `locations`, leaf first.
    fn stack(&mut self, locations: &[i32]) -> i32 {
        self.0.stack_table.push(OtlpStack {
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

fn otlp_sample(stack_index: i32, values: &[i64], attribute_indices: &[i32]) -> OtlpSample {
    OtlpSample {
        stack_index,
        attribute_indices: attribute_indices.to_vec(),
        link_index: 0,
        values: values.to_vec(),
        timestamps_unix_nano: Vec::new(),
    }
}

/// What this profiler's agent sends, and more: a CPU profile at 99 Hz with
/// kernel, JIT and inlined frames, an address-only frame in a mapping and
/// a sample counted by its timestamps; an off-CPU profile; resource
/// attributes by key and by string index.
pub fn otlp_request() -> ExportProfilesServiceRequest {
    let mut d = Dict::new();
    let start = d.location(&["_start"], "native");
    let main = d.location(&["main"], "native");
    let parse = d.location(&["next_token", "read_char", "parse"], "native");
    let write = d.location(&["write"], "native");
    let kernel = d.location(&["ksys_write", "__x64_sys_write"], "kernel");
    let jit = d.location(&["Interpreter::run"], "jit");
    let filename_strindex = d.s("/usr/lib/libz.so.1");
    d.0.mapping_table.push(OtlpMapping {
        memory_start: 0x7f00_0000_0000,
        memory_limit: 0x7f00_0010_0000,
        file_offset: 0x1000,
        filename_strindex,
        attribute_indices: Vec::new(),
    });
    d.0.location_table.push(OtlpLocation {
        mapping_index: d.0.mapping_table.len() as i32 - 1,
        address: 0x7f00_0000_4321,
        ..Default::default()
    });
    let inflate = d.0.location_table.len() as i32 - 1;
    let hot = d.stack(&[parse, main, start]);
    let sys = d.stack(&[kernel, write, main, start]);
    let jitted = d.stack(&[jit, main, start]);
    let zlib = d.stack(&[inflate, main, start]);
    let worker = d.attribute("thread.name", Value::StringValue("worker-1".into()));
    let retries = d.attribute("Request.Retries", Value::IntValue(3));
    let canary = d.attribute("deployment.canary", Value::BoolValue(true));

    let mut counted = otlp_sample(zlib, &[], &[worker]);
    counted.timestamps_unix_nano = vec![T0 as u64 + 1, T0 as u64 + 2];
    let cpu = OtlpProfile {
        sample_type: Some(d.value_type("cpu", "samples")),
        samples: vec![
            otlp_sample(hot, &[5], &[worker]),
            otlp_sample(sys, &[2], &[worker, retries]),
            otlp_sample(jitted, &[1], &[]),
            counted,
        ],
        time_unix_nano: T0 as u64,
        duration_nano: 10_000_000_000,
        period_type: Some(d.value_type("cpu", "nanoseconds")),
        period: 10_101_010,
        attribute_indices: vec![canary],
        ..Default::default()
    };
    let off_cpu = OtlpProfile {
        sample_type: Some(d.value_type("off_cpu", "nanoseconds")),
        samples: vec![otlp_sample(sys, &[1_500_000], &[worker])],
        time_unix_nano: T0 as u64,
        duration_nano: 10_000_000_000,
        ..Default::default()
    };
    let string = |s: &str| Value::StringValue(s.into());
    let region = KeyValue {
        key_strindex: d.s("cloud.region"),
        ..resource_attribute("", Value::StringValueStrindex(d.s("eu-west-1")))
    };
    let resource = vec![
        resource_attribute("host.name", string("node-7")),
        resource_attribute("service.name", string("checkout")),
        resource_attribute("process.executable.name", string("app")),
        resource_attribute("process.pid", Value::IntValue(4242)),
        resource_attribute("k8s.pod.name", string("checkout-5d9")),
        region,
    ];
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
                profiles: vec![cpu, off_cpu],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
        dictionary: Some(d.0),
    }
}

/// A request at the limits a batch must keep (see [`pprof_edge`]).
pub fn otlp_edge() -> ExportProfilesServiceRequest {
    let mut d = Dict::new();
    let deep = d.location(&[&edge_name()], "native");
    let main = d.location(&["main"], "native");
    let deep = d.stack(&[deep; 1024]);
    let main = d.stack(&[main]);
    let profile = OtlpProfile {
        sample_type: Some(d.value_type("off_cpu", "nanoseconds")),
        samples: vec![
            otlp_sample(deep, &[1 << 48, 1 << 48], &[]),
            otlp_sample(main, &[1 << 49], &[]),
        ],
        time_unix_nano: T0 as u64,
        duration_nano: DAY_NS as u64,
        ..Default::default()
    };
    let mut request = otlp_no_dictionary();
    request.resource_profiles[0].scope_profiles[0].profiles = vec![profile];
    request.dictionary = Some(d.0);
    request
}

/// The valid request with a sample whose stack index is past the table.
pub fn otlp_bad_index() -> ExportProfilesServiceRequest {
    let mut request = otlp_request();
    let stacks = request.dictionary.as_ref().unwrap().stack_table.len();
    request.resource_profiles[0].scope_profiles[0].profiles[0].samples[1].stack_index =
        stacks as i32 + 3;
    request
}

/// A profile with a sample and no dictionary: every index is the zero
/// value's, so its sample type has no name.
pub fn otlp_no_dictionary() -> ExportProfilesServiceRequest {
    ExportProfilesServiceRequest {
        resource_profiles: vec![ResourceProfiles {
            resource: None,
            scope_profiles: vec![ScopeProfiles {
                scope: None,
                profiles: vec![OtlpProfile {
                    sample_type: Some(OtlpValueType::default()),
                    samples: vec![otlp_sample(0, &[1], &[])],
                    time_unix_nano: T0 as u64,
                    ..Default::default()
                }],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
        dictionary: None,
    }
}

/// The seed files of the import targets and what each holds.
pub fn import_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let (cpu, mutex) = (go_cpu().encode_to_vec(), go_mutex().encode_to_vec());
    vec![
        ("pprof_import", "seed-go-cpu.pb", cpu.clone()),
        ("pprof_import", "seed-go-cpu.pb.gz", gzip_stored(&cpu)),
        ("pprof_import", "seed-go-mutex.pb", mutex.clone()),
        ("pprof_import", "seed-go-mutex.pb.gz", gzip_stored(&mutex)),
        ("pprof_import", "seed-edge.pb", pprof_edge().encode_to_vec()),
        ("otlp_import", "seed-edge.bin", otlp_edge().encode_to_vec()),
        (
            "otlp_import",
            "seed-valid.bin",
            otlp_request().encode_to_vec(),
        ),
        (
            "otlp_import",
            "seed-bad-index.bin",
            otlp_bad_index().encode_to_vec(),
        ),
        (
            "otlp_import",
            "seed-no-dictionary.bin",
            otlp_no_dictionary().encode_to_vec(),
        ),
    ]
}

#[test]
fn import_seeds_are_current() {
    let bless = std::env::var_os("FUZZ_BLESS").is_some();
    for (target, name, bytes) in import_seeds() {
        let path = dir(target).join(name);
        if bless {
            std::fs::create_dir_all(dir(target)).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == bytes,
            "{} is not current: FUZZ_BLESS=1 rewrites it",
            path.display()
        );
        assert!(bytes.len() < 4096, "{name}: {} bytes", bytes.len());
    }
}

fn source() -> Source {
    import_source()
}

/// The seeds reach what they are for: the profiles convert (the gzipped
/// ones to the same batches), the bad requests are refused for their fault.
#[test]
fn import_seeds_convert_or_are_refused_as_meant() {
    let labels = [("service".to_string(), "fuzz".to_string())];
    for profile in [go_cpu(), go_mutex()] {
        let plain = profile.encode_to_vec();
        assert_eq!(
            import::pprof::decode(&plain, MAX_PPROF_BYTES),
            Ok(profile.clone())
        );
        let gzipped = import::pprof::decode(&gzip_stored(&plain), MAX_PPROF_BYTES);
        assert_eq!(gzipped, Ok(profile.clone()));
        let batches = import::pprof::to_batches(&profile, &labels, &source()).unwrap();
        assert_eq!(batches.len(), 2);
        let labels = import::pprof::with_process(labels.to_vec(), &profile);
        assert_eq!(label(&labels, "process"), Some("server"));
    }
    let cpu = import::pprof::to_batches(&go_cpu(), &labels, &source()).unwrap();
    let frames: Vec<&[u8]> = cpu[0].strings.iter().map(Vec::as_slice).collect();
    for frame in [&b"main.(*T).step_[i]"[..], b"libc.so.6+0x12345"] {
        assert!(frames.contains(&frame), "{frames:?}");
    }

    let batches =
        import::otlp::to_batches(&otlp_request(), &OtlpLimits::default(), &source()).unwrap();
    assert_eq!(batches.len(), 2);
    assert_eq!(batch_totals(&batches), [10, 1_500_000]);
    let frames: Vec<&[u8]> = batches[0].strings.iter().map(Vec::as_slice).collect();
    for frame in [
        &b"__x64_sys_write_[k]"[..],
        b"Interpreter::run_[j]",
        b"read_char_[i]",
        b"libz.so.1+0x5321",
    ] {
        assert!(frames.contains(&frame), "{frames:?}");
    }
    // At the limits, but within them.
    let edge = import::pprof::to_batches(&pprof_edge(), &labels, &source()).unwrap();
    assert_eq!(batch_totals(&edge), [2, 1 << 50]);
    let edge = import::otlp::to_batches(&otlp_edge(), &OtlpLimits::default(), &source());
    assert_eq!(batch_totals(&edge.unwrap()), [1 << 50]);
    let tight = import::otlp::to_batches(&otlp_edge(), &tight_otlp_limits(), &source());
    assert_eq!(tight.unwrap_err().reason(), "stack_too_deep");

    let refused = |r: &ExportProfilesServiceRequest| {
        import::otlp::to_batches(r, &OtlpLimits::default(), &source()).unwrap_err()
    };
    let e = refused(&otlp_bad_index());
    assert!(matches!(e, ImportError::IndexOutOfRange { .. }), "{e}");
    let e = refused(&otlp_no_dictionary());
    assert_eq!(e.reason(), "bad_value", "{e}");
}
