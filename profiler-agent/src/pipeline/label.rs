//! The label stage: which labels a sample carries (`node`, `process`, `pid`,
//! `thread`, `exe`, `runtime`, `go_version`, `container_id`, `pod`,
//! `namespace`, `container`, `service`), as a
//! pure function of the sample, what is known about its process, and what
//! the pod watch answered ([`labels`]).
//!
//! Rules:
//! - `process` is the process's name at first sight (`/proc/PID/comm`),
//!   else the sampled thread's `comm`; `thread` is the sampled thread's
//!   `comm` where it differs from `process`; `exe` and `container_id` when
//!   known;
//! - `runtime` is `go` for a Go executable (told from its build info, with
//!   `go_version` when the build info names it);
//! - `pod`, `namespace` (and `container`) only when the watch knows the pod:
//!   never guessed;
//! - `service`: the pod's service; for a process in a pod the watch does
//!   not know (yet), none rather than a made-up one; otherwise the systemd
//!   unit or the executable's name ([`crate::cgroup::fallback_service`]),
//!   when the process's cgroup is known.
use std::{collections::HashMap, sync::Arc, sync::Mutex};

use crate::{
    cgroup::CgroupInfo,
    kube::{ContainerMeta, PodCache},
    metrics::ProcessGauges,
    process::{ProcessCache, Swept},
};

/// What is known about a process at its first sight.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    /// `/proc/PID/comm` when the process was snapshotted.
    pub name: Option<String>,
    /// Path of the executable.
    pub exe: Option<String>,
    /// What its cgroup says (container, pod, systemd unit).
    pub cgroup: Option<CgroupInfo>,
    /// The Go version of a Go executable (empty when it does not say).
    pub go_version: Option<String>,
}

/// What the pod watch answered for a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodLookup {
    /// No watch runs (not on Kubernetes, or `--no-kube`).
    NoWatch,
    /// The watch runs and does not know this process's pod (or the process
    /// is in no pod).
    NotFound,
    /// The pod and container the process runs in.
    Found(ContainerMeta),
}

/// Labels of one sample, in the order they are added.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    /// The `process` label, also the root frame of the sample's stack.
    pub process: String,
    pub pairs: Vec<(&'static str, String)>,
}

impl Labels {
    /// The value of a label, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// (name, value) pairs borrowed, as a batch takes them.
    pub fn as_pairs(&self) -> Vec<(&str, &str)> {
        self.pairs.iter().map(|(n, v)| (*n, v.as_str())).collect()
    }
}

/// The labels of a sample of process `tgid`, sampled in a thread named
/// `comm`, on node `node`.
pub fn labels(node: &str, tgid: u32, comm: &str, facts: &ProcessFacts, pod: &PodLookup) -> Labels {
    let process = facts.name.clone().unwrap_or_else(|| comm.to_string());
    let mut pairs: Vec<(&'static str, String)> = vec![
        ("node", node.to_string()),
        ("process", process.clone()),
        ("pid", tgid.to_string()),
    ];
    // The sampled thread's name, where it is not the process's: per-thread
    // views (the wall view) select by it.
    if comm != process && !comm.is_empty() {
        pairs.push(("thread", comm.to_string()));
    }
    let exe = facts.exe.as_deref();
    if let Some(exe) = exe {
        pairs.push(("exe", exe.to_string()));
    }
    if let Some(version) = &facts.go_version {
        pairs.push(("runtime", "go".to_string()));
        if !version.is_empty() {
            pairs.push(("go_version", version.clone()));
        }
    }
    let cgroup = facts.cgroup.as_ref();
    if let Some(id) = cgroup.and_then(|c| c.container_id.as_deref()) {
        pairs.push(("container_id", id.to_string()));
    }
    let in_pod = cgroup.is_some_and(|c| c.pod_uid.is_some());
    let found = match pod {
        PodLookup::Found(meta) if in_pod => Some(meta),
        _ => None,
    };
    if let Some(meta) = found {
        pairs.push(("pod", meta.pod.clone()));
        pairs.push(("namespace", meta.namespace.clone()));
        if let Some(container) = &meta.container {
            pairs.push(("container", container.clone()));
        }
    }
    let in_unknown_pod = in_pod && matches!(pod, PodLookup::NotFound);
    let service = match found {
        Some(meta) => Some(meta.service.clone()),
        None => cgroup
            .filter(|_| !in_unknown_pod)
            .and_then(|c| crate::cgroup::fallback_service(c, exe)),
    };
    if let Some(service) = service {
        pairs.push(("service", service));
    }
    Labels { process, pairs }
}

/// Where the label stage reads process facts, and what is swept between
/// windows: the [`ProcessCache`] for real, a table in tests.
pub trait ProcessTable {
    /// What is known about `pid` (empty when nothing is).
    fn facts(&self, pid: u32) -> ProcessFacts;
    /// Forgets processes gone since the previous call; what the symbolizer
    /// and the source must forget with them.
    fn sweep(&self) -> Swept {
        Swept::default()
    }
    /// Figures for `/metrics` and the summary.
    fn gauges(&self) -> ProcessGauges {
        ProcessGauges::default()
    }
}

impl ProcessTable for Mutex<ProcessCache> {
    fn facts(&self, pid: u32) -> ProcessFacts {
        let cache = self.lock().unwrap_or_else(|e| e.into_inner());
        ProcessFacts {
            name: cache.name(pid).map(str::to_string),
            exe: cache.exe(pid).map(str::to_string),
            cgroup: cache.cgroup(pid).cloned(),
            go_version: cache.go_build(pid).map(|b| b.version.clone()),
        }
    }

    fn sweep(&self) -> Swept {
        self.lock().unwrap_or_else(|e| e.into_inner()).sweep()
    }

    fn gauges(&self) -> ProcessGauges {
        let cache = self.lock().unwrap_or_else(|e| e.into_inner());
        ProcessGauges {
            stats: cache.stats(),
            processes: cache.process_count() as u64,
            binaries: cache.binary_count() as u64,
        }
    }
}

/// The pod watch's answers: the [`PodCache`] for real, a table in tests.
pub trait PodDirectory {
    /// Labels for container `container_id` of pod `pod_uid`, if known.
    fn lookup(&self, pod_uid: &str, container_id: Option<&str>) -> Option<ContainerMeta>;
    /// Pods known (a gauge on `/metrics`).
    fn pods_known(&self) -> usize;
}

impl PodDirectory for PodCache {
    fn lookup(&self, pod_uid: &str, container_id: Option<&str>) -> Option<ContainerMeta> {
        PodCache::lookup(self, pod_uid, container_id)
    }

    fn pods_known(&self) -> usize {
        PodCache::len(self)
    }
}

/// Asks the watch (if any) about a process's pod.
pub fn lookup_pod(facts: &ProcessFacts, pods: Option<&dyn PodDirectory>) -> PodLookup {
    let Some(pods) = pods else {
        return PodLookup::NoWatch;
    };
    let cgroup = facts.cgroup.as_ref();
    cgroup
        .and_then(|c| c.pod_uid.as_deref())
        .and_then(|uid| pods.lookup(uid, cgroup.and_then(|c| c.container_id.as_deref())))
        .map_or(PodLookup::NotFound, PodLookup::Found)
}

/// Labels of one window: each (process, thread name) looked up once.
pub(super) struct WindowLabeller<'a> {
    pub node: &'a str,
    pub processes: &'a dyn ProcessTable,
    pub pods: Option<&'a dyn PodDirectory>,
    pub seen: HashMap<(u32, String), Arc<Labels>>,
    /// Labels with a `thread_state` (off-CPU samples).
    pub seen_in_state: HashMap<(u32, String, &'static str), Arc<Labels>>,
}

impl WindowLabeller<'_> {
    pub fn labels(&mut self, tgid: u32, comm: &str) -> Arc<Labels> {
        if let Some(labels) = self.seen.get(&(tgid, comm.to_string())) {
            return labels.clone();
        }
        let facts = self.processes.facts(tgid);
        let pod = lookup_pod(&facts, self.pods);
        let labels = Arc::new(labels(self.node, tgid, comm, &facts, &pod));
        self.seen.insert((tgid, comm.to_string()), labels.clone());
        labels
    }

    /// [`Self::labels`], plus `thread_state` when given (off-CPU samples).
    pub fn labels_in_state(
        &mut self,
        tgid: u32,
        comm: &str,
        state: Option<&'static str>,
    ) -> Arc<Labels> {
        let Some(state) = state else {
            return self.labels(tgid, comm);
        };
        let key = (tgid, comm.to_string(), state);
        if let Some(labels) = self.seen_in_state.get(&key) {
            return labels.clone();
        }
        let mut labels = (*self.labels(tgid, comm)).clone();
        labels.pairs.push(("thread_state", state.to_string()));
        let labels = Arc::new(labels);
        self.seen_in_state.insert(key, labels.clone());
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2b4e1c9a8d7f6e5d4c3b2a19080706f5e4d3c2b1a09f8e7d6c5b4a39281706";
    const UID: &str = "6a1f1e3c-2b4d-4e5f-8a9b-0c1d2e3f4a5b";

    fn pairs(l: &Labels) -> Vec<(&str, &str)> {
        l.as_pairs()
    }

    fn in_pod() -> ProcessFacts {
        ProcessFacts {
            name: Some("server".into()),
            exe: Some("/app/server".into()),
            cgroup: Some(CgroupInfo {
                container_id: Some(ID.into()),
                pod_uid: Some(UID.into()),
                systemd_unit: None,
            }),
            go_version: None,
        }
    }

    fn meta(container: Option<&str>) -> ContainerMeta {
        ContainerMeta {
            pod: "web-0".into(),
            namespace: "shop".into(),
            container: container.map(str::to_string),
            service: "web".into(),
        }
    }

    #[test]
    fn host_process_gets_its_unit_as_service() {
        let facts = ProcessFacts {
            name: Some("postgres".into()),
            exe: Some("/usr/lib/postgresql/15/bin/postgres".into()),
            cgroup: Some(CgroupInfo {
                systemd_unit: Some("postgresql@15-main.service".into()),
                ..CgroupInfo::default()
            }),
            go_version: None,
        };
        let l = labels("n1", 42, "postgres: wal", &facts, &PodLookup::NoWatch);
        assert_eq!(
            l.process, "postgres",
            "the name at first sight, not the thread's"
        );
        assert_eq!(
            pairs(&l),
            vec![
                ("node", "n1"),
                ("process", "postgres"),
                ("pid", "42"),
                ("thread", "postgres: wal"),
                ("exe", "/usr/lib/postgresql/15/bin/postgres"),
                ("service", "postgresql@15-main"),
            ]
        );
    }

    #[test]
    fn a_go_executable_is_labelled_with_its_runtime_and_version() {
        let mut facts = ProcessFacts {
            name: Some("api".into()),
            exe: Some("/srv/api".into()),
            go_version: Some("go1.22.3".into()),
            ..ProcessFacts::default()
        };
        let l = labels("n1", 7, "api", &facts, &PodLookup::NoWatch);
        assert_eq!(l.get("runtime"), Some("go"));
        assert_eq!(l.get("go_version"), Some("go1.22.3"));
        facts.go_version = Some(String::new());
        let l = labels("n1", 7, "api", &facts, &PodLookup::NoWatch);
        assert_eq!(l.get("runtime"), Some("go"));
        assert_eq!(l.get("go_version"), None, "an old binary names no version");
        facts.go_version = None;
        let l = labels("n1", 7, "api", &facts, &PodLookup::NoWatch);
        assert_eq!(l.get("runtime"), None);
    }

    #[test]
    fn host_process_without_unit_is_named_after_its_executable() {
        let facts = ProcessFacts {
            name: None,
            exe: Some("/usr/sbin/nginx".into()),
            cgroup: Some(CgroupInfo::default()),
            go_version: None,
        };
        let l = labels("n1", 7, "nginx", &facts, &PodLookup::NotFound);
        assert_eq!(
            l.process, "nginx",
            "the thread's comm when no name is known"
        );
        assert_eq!(l.get("service"), Some("nginx"));
        assert_eq!(l.get("pod"), None);
    }

    #[test]
    fn unknown_process_gets_only_what_the_sample_says() {
        let l = labels(
            "n1",
            9,
            "kworker/0:1",
            &ProcessFacts::default(),
            &PodLookup::NoWatch,
        );
        assert_eq!(
            pairs(&l),
            vec![("node", "n1"), ("process", "kworker/0:1"), ("pid", "9")]
        );
        // An executable but no cgroup: no service is made up either.
        let exe_only = ProcessFacts {
            exe: Some("/bin/true".into()),
            ..ProcessFacts::default()
        };
        let l = labels("n1", 9, "true", &exe_only, &PodLookup::NoWatch);
        assert_eq!(l.get("exe"), Some("/bin/true"));
        assert_eq!(l.get("service"), None);
    }

    #[test]
    fn known_pod_gives_pod_namespace_container_and_service() {
        let l = labels(
            "n1",
            100,
            "server",
            &in_pod(),
            &PodLookup::Found(meta(Some("app"))),
        );
        assert_eq!(
            pairs(&l),
            vec![
                ("node", "n1"),
                ("process", "server"),
                ("pid", "100"),
                ("exe", "/app/server"),
                ("container_id", ID),
                ("pod", "web-0"),
                ("namespace", "shop"),
                ("container", "app"),
                ("service", "web"),
            ]
        );
        let no_container = labels(
            "n1",
            100,
            "server",
            &in_pod(),
            &PodLookup::Found(meta(None)),
        );
        assert_eq!(no_container.get("container"), None);
        assert_eq!(no_container.get("pod"), Some("web-0"));
    }

    #[test]
    fn pod_the_watch_does_not_know_gets_no_pod_labels_and_no_service() {
        let l = labels("n1", 100, "server", &in_pod(), &PodLookup::NotFound);
        assert_eq!(l.get("container_id"), Some(ID));
        for name in ["pod", "namespace", "container", "service"] {
            assert_eq!(l.get(name), None, "{name} must not be guessed");
        }
    }

    #[test]
    fn pod_process_without_a_watch_falls_back_to_its_executable() {
        let l = labels("n1", 100, "server", &in_pod(), &PodLookup::NoWatch);
        assert_eq!(l.get("pod"), None);
        assert_eq!(l.get("service"), Some("server"));
    }

    #[test]
    fn a_pod_answer_for_a_process_in_no_pod_is_ignored() {
        let facts = ProcessFacts {
            exe: Some("/usr/bin/dockerd".into()),
            cgroup: Some(CgroupInfo {
                container_id: Some(ID.into()),
                ..CgroupInfo::default()
            }),
            ..ProcessFacts::default()
        };
        let l = labels("n1", 5, "dockerd", &facts, &PodLookup::Found(meta(None)));
        assert_eq!(l.get("pod"), None);
        assert_eq!(l.get("service"), Some("dockerd"));
    }

    #[test]
    fn the_watch_is_asked_with_the_pod_uid_and_container_id() {
        struct One;
        impl PodDirectory for One {
            fn lookup(&self, uid: &str, id: Option<&str>) -> Option<ContainerMeta> {
                (uid == UID && id == Some(ID)).then(|| meta(Some("app")))
            }
            fn pods_known(&self) -> usize {
                1
            }
        }
        assert_eq!(lookup_pod(&in_pod(), None), PodLookup::NoWatch);
        assert_eq!(
            lookup_pod(&in_pod(), Some(&One)),
            PodLookup::Found(meta(Some("app")))
        );
        assert_eq!(
            lookup_pod(&ProcessFacts::default(), Some(&One)),
            PodLookup::NotFound
        );
    }
}
