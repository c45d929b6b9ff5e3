//! The simulated fleet: applications, nodes and the batch each node sends
//! per window.
use std::collections::HashMap;

#[allow(unused_imports)]
use super::*;
use profiler_testkit::rng::{zipf_cumulative, Rng};

/// An application: its binary and its stacks (frame names), shared by
/// every node that runs it.
pub(crate) struct App {
    pub(crate) name: String,
    pub(crate) exe: String,
    pub(crate) namespace: String,
    pub(crate) stacks: Vec<Vec<String>>,
}

pub(crate) fn apps(seed: u64) -> Vec<App> {
    const NAMES: [&str; 20] = [
        "nginx",
        "postgres",
        "java",
        "python3",
        "node",
        "envoy",
        "redis-server",
        "kubelet",
        "containerd",
        "etcd",
        "coredns",
        "prometheus",
        "grafana",
        "mysqld",
        "ruby",
        "php-fpm",
        "haproxy",
        "kafka",
        "elasticsearch",
        "fluent-bit",
    ];
    let mut rng = Rng::new(seed ^ 0xA11);
    (0..APPS)
        .map(|a| {
            let name = if a < NAMES.len() {
                NAMES[a].to_string()
            } else {
                format!("{}-{}", NAMES[a % NAMES.len()], a / NAMES.len())
            };
            // A call tree: stacks share a root path and diverge below it.
            let root: Vec<String> = [
                "_start".to_string(),
                "__libc_start_main".into(),
                format!("{name}::main"),
            ]
            .into();
            let stacks = (0..STACKS_PER_APP)
                .map(|_| {
                    let depth = 15 + rng.below(26);
                    let mut frames = root.clone();
                    let mut node = 0usize;
                    while frames.len() < depth {
                        // Few choices near the root, more further down.
                        let fan = 2 + frames.len() / 4;
                        node = node.wrapping_mul(7).wrapping_add(1 + rng.below(fan));
                        let module =
                            ["net", "db", "http", "alloc", "sync", "io", "codec"][node % 7];
                        frames.push(format!("{name}::{module}::fn_{}", node % 997));
                    }
                    if rng.below(3) == 0 {
                        for k in ["entry_SYSCALL_64", "do_syscall_64", "__x64_sys_read"] {
                            frames.push(format!("[k] {k}"));
                        }
                    }
                    frames
                })
                .collect();
            App {
                exe: format!("/usr/bin/{name}"),
                namespace: ["default", "prod", "monitoring", "kube-system", "payments"][a % 5]
                    .into(),
                name,
                stacks,
            }
        })
        .collect()
}

/// One process slot of a node.
pub(crate) struct Proc {
    pub(crate) app: usize,
    pub(crate) pid: u32,
    pub(crate) short_lived: bool,
    pub(crate) containerized: bool,
}

pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) procs: Vec<Proc>,
    pub(crate) proc_cum: Vec<f64>,
    pub(crate) stack_cum: Vec<f64>,
}

pub(crate) fn node(agent: usize, args: &Args) -> Node {
    let mut rng = Rng::new(args.seed ^ (agent as u64 + 1) << 20);
    let procs = (0..args.processes)
        .map(|p| Proc {
            app: rng.below(APPS),
            pid: 1000 + rng.below(60000) as u32,
            short_lived: p >= args.processes - args.short_lived.min(args.processes),
            containerized: p >= 4,
        })
        .collect();
    Node {
        name: format!("node-{agent:03}"),
        procs,
        proc_cum: zipf_cumulative(args.processes, 1.0),
        stack_cum: zipf_cumulative(STACKS_PER_APP, 1.1),
    }
}

/// Table of strings of one batch, each stored once.
#[derive(Default)]
pub(crate) struct Strings {
    pub(crate) table: Vec<Vec<u8>>,
    pub(crate) index: HashMap<String, u32>,
}
impl Strings {
    pub(crate) fn id(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as u32;
        self.table.push(s.as_bytes().to_vec());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// The batch of `node` for window number `w` (ending at `end_ns`).
pub(crate) fn batch(
    node: &Node,
    agent: usize,
    apps: &[App],
    w: u64,
    end_ns: i64,
    args: &Args,
) -> Batch {
    let mut rng = Rng::new(args.seed ^ (agent as u64) << 32 ^ w);
    let full = 8.0 * 19.0 * 10.0 * args.cpu_util;
    let n = (full * (0.9 + 0.2 * rng.unit())).round().max(1.0) as usize;
    let mut counts: HashMap<(usize, usize), i64> = HashMap::new();
    for _ in 0..n {
        let p = rng.pick(&node.proc_cum);
        let s = rng.pick(&node.stack_cum);
        *counts.entry((p, s)).or_default() += 1;
    }
    let mut strings = Strings::default();
    strings.id("");
    let mut label_sets = Vec::new();
    let mut set_of: HashMap<usize, u32> = HashMap::new();
    let mut stacks = Vec::new();
    let mut stack_of: HashMap<(usize, usize), u32> = HashMap::new();
    let mut samples = Vec::new();
    let mut keys: Vec<_> = counts.into_iter().collect();
    keys.sort_unstable();
    for ((p, s), count) in keys {
        let proc = &node.procs[p];
        let app = &apps[proc.app];
        let set = *set_of.entry(p).or_insert_with(|| {
            // Short-lived processes: a new pid every minute.
            let pid = if proc.short_lived {
                proc.pid + (w / 6) as u32 % 30000
            } else {
                proc.pid
            };
            let mut pairs = vec![
                ("node", node.name.clone()),
                ("process", app.name.clone()),
                ("pid", pid.to_string()),
                ("exe", app.exe.clone()),
            ];
            if proc.containerized {
                pairs.push(("container", app.name.clone()));
                pairs.push(("pod", format!("{}-{}-{p}", app.name, node.name)));
                pairs.push(("namespace", app.namespace.clone()));
            }
            label_sets.push(LabelSet {
                labels: pairs
                    .iter()
                    .map(|(k, v)| Label {
                        name: strings.id(k),
                        value: strings.id(v),
                    })
                    .collect(),
            });
            (label_sets.len() - 1) as u32
        });
        let stack = *stack_of.entry((proc.app, s)).or_insert_with(|| {
            stacks.push(Stack {
                frames: app.stacks[s].iter().map(|f| strings.id(f)).collect(),
            });
            (stacks.len() - 1) as u32
        });
        samples.push(Sample {
            label_set: set,
            stack,
            value: count,
        });
    }
    Batch {
        agent_id: format!("bench-{agent:03}"),
        sequence: w + 1,
        node: node.name.clone(),
        agent_version: "bench".into(),
        window_start_unix_nanos: end_ns - WINDOW_NS,
        window_end_unix_nanos: end_ns,
        frequency_hz: 19,
        strings: strings.table,
        stacks,
        label_sets,
        samples,
        sample_type: None,
    }
}
