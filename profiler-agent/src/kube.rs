//! Kubernetes metadata for the processes of this node: pod name, namespace,
//! container name and a `service` label, from a node-scoped pod watch
//! (`fieldSelector=spec.nodeName=NODE`) against the API server, with the
//! in-cluster service account.
//!
//! The watch lists the node's pods, then follows changes from the list's
//! `resourceVersion`; a watch that ends is resumed from the last version
//! seen, and one that is too old (`410 Gone`) starts again with a list. The
//! cache holds only this node's pods (at most `MAX_PODS`), so it is bounded.
//! A container that is not known yet gets no pod labels (nothing is
//! guessed); the next windows get them once the watch has caught up.
use std::{
    collections::HashMap,
    io::BufRead,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    retry::{self, Backoff},
    Error, Result,
};

/// Most pods kept (a node runs at most a few hundred).
pub const MAX_PODS: usize = 4096;
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where the API server is and how to talk to it.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// e.g. `https://10.0.0.1:443`, or `http://127.0.0.1:PORT` in tests.
    pub api_url: String,
    pub token: Option<String>,
    /// File to read the bearer token from at every request (service-account
    /// tokens are rotated); takes precedence over `token`.
    pub token_file: Option<std::path::PathBuf>,
    /// PEM of the CA(s) that signed the API server's certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// This node's name (`spec.nodeName` of its pods).
    pub node: String,
}

impl KubeConfig {
    /// The in-cluster configuration: `KUBERNETES_SERVICE_HOST`/`_PORT` and
    /// the service account's token and CA. `None` outside Kubernetes.
    pub fn in_cluster(node: &str) -> Option<Self> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Some(Self {
            api_url: format!("https://{host}:{port}"),
            token: None,
            token_file: Some(format!("{SERVICE_ACCOUNT}/token").into()),
            ca_pem: std::fs::read(format!("{SERVICE_ACCOUNT}/ca.crt")).ok(),
            node: node.to_string(),
        })
    }
}

/// What we know of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub name: String,
    pub namespace: String,
    pub service: String,
    /// Container id (without the `containerd://` prefix) → container name.
    pub containers: HashMap<String, String>,
}

/// Labels for one container of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerMeta {
    pub pod: String,
    pub namespace: String,
    pub container: Option<String>,
    pub service: String,
}

/// How long a deleted pod stays resolvable: samples taken before its
/// deletion are drained up to a drain interval later.
const DELETED_GRACE: Duration = Duration::from_secs(120);

struct Entry {
    meta: PodMeta,
    /// UID of the static pod this mirror pod stands for (`kubernetes.io/config.mirror`):
    /// the kubelet names the cgroup after it.
    mirror_of: Option<String>,
    deleted: Option<std::time::Instant>,
}

impl Entry {
    fn live(meta: PodMeta, mirror_of: Option<String>) -> Self {
        Self {
            meta,
            mirror_of,
            deleted: None,
        }
    }
}

/// The node's pods by UID, shared between the watcher and the agent.
#[derive(Clone, Default)]
pub struct PodCache {
    pods: Arc<RwLock<HashMap<String, Entry>>>,
}

impl PodCache {
    /// Labels for the container `container_id` of pod `pod_uid`, if known.
    pub fn lookup(&self, pod_uid: &str, container_id: Option<&str>) -> Option<ContainerMeta> {
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        let pod = match pods.get(pod_uid) {
            Some(entry) => &entry.meta,
            None => {
                &pods
                    .values()
                    .find(|e| e.mirror_of.as_deref() == Some(pod_uid))?
                    .meta
            }
        };
        Some(ContainerMeta {
            pod: pod.name.clone(),
            namespace: pod.namespace.clone(),
            container: container_id.and_then(|id| pod.containers.get(id).cloned()),
            service: pod.service.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.pods.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A fresh list: pods no longer listed are kept as deleted for a while.
    fn replace(&self, listed: Vec<(String, PodMeta, Option<String>)>) {
        let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let listed_uids: std::collections::HashSet<&String> =
            listed.iter().map(|(uid, _, _)| uid).collect();
        for (uid, entry) in pods.iter_mut() {
            if !listed_uids.contains(uid) && entry.deleted.is_none() {
                entry.deleted = Some(now);
            }
        }
        for (uid, meta, mirror_of) in listed {
            pods.insert(uid, Entry::live(meta, mirror_of));
        }
        Self::expire(&mut pods);
    }

    fn upsert(&self, uid: String, meta: PodMeta, mirror_of: Option<String>) {
        let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
        Self::expire(&mut pods);
        if pods.len() < MAX_PODS || pods.contains_key(&uid) {
            pods.insert(uid, Entry::live(meta, mirror_of));
        } else {
            tracing::warn!("pod cache full ({MAX_PODS} pods): {uid} not cached");
        }
    }

    /// Marks a pod deleted; it stays resolvable for `DELETED_GRACE`.
    fn remove(&self, uid: &str) {
        let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = pods.get_mut(uid) {
            entry.deleted.get_or_insert_with(std::time::Instant::now);
        }
        Self::expire(&mut pods);
    }

    fn expire(pods: &mut HashMap<String, Entry>) {
        pods.retain(|_, e| e.deleted.is_none_or(|at| at.elapsed() < DELETED_GRACE));
    }
}

// The few fields of the Kubernetes API objects we read.
#[derive(Deserialize)]
struct PodList {
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default)]
    resource_version: String,
}

#[derive(Deserialize)]
pub struct Pod {
    metadata: ObjectMeta,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    resource_version: String,
    #[serde(default)]
    labels: HashMap<String, String>,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    owner_references: Vec<OwnerReference>,
}

#[derive(Deserialize)]
struct OwnerReference {
    kind: String,
    name: String,
    #[serde(default)]
    controller: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    name: String,
    #[serde(default, rename = "containerID")]
    container_id: Option<String>,
}

#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

/// The `service` of a pod: `app.kubernetes.io/name`, then `app`, then the
/// workload that controls it (a ReplicaSet's Deployment, a CronJob's Job,
/// a StatefulSet, ...), then the pod's own name. `owners` lists the
/// controller first.
pub fn service_of(
    labels: &HashMap<String, String>,
    owners: &[(String, String)],
    pod: &str,
) -> String {
    if let Some(name) = labels
        .get("app.kubernetes.io/name")
        .or_else(|| labels.get("app"))
    {
        return name.clone();
    }
    if let Some((kind, name)) = owners.first() {
        if kind == "ReplicaSet" {
            // <deployment>-<pod-template-hash>
            if let Some(hash) = labels.get("pod-template-hash") {
                if let Some(deployment) = name.strip_suffix(&format!("-{hash}")) {
                    return deployment.to_string();
                }
            }
        }
        if kind == "Job" {
            // A CronJob's runs are <cronjob>-<scheduled minute>.
            if let Some((cronjob, stamp)) = name.rsplit_once('-') {
                if stamp.len() >= 8 && stamp.bytes().all(|b| b.is_ascii_digit()) {
                    return cronjob.to_string();
                }
            }
        }
        return name.clone();
    }
    pod.to_string()
}

fn pod_meta(pod: &Pod) -> PodMeta {
    let mut refs: Vec<&OwnerReference> = pod.metadata.owner_references.iter().collect();
    refs.sort_by_key(|o| o.controller != Some(true));
    let owners: Vec<(String, String)> = refs
        .iter()
        .map(|o| (o.kind.clone(), o.name.clone()))
        .collect();
    let containers = pod
        .status
        .container_statuses
        .iter()
        .chain(&pod.status.init_container_statuses)
        .filter_map(|c| {
            let id = c.container_id.as_deref()?;
            // "containerd://<id>", "cri-o://<id>", "docker://<id>"
            let id = id.rsplit_once("://").map_or(id, |(_, id)| id);
            Some((id.to_string(), c.name.clone()))
        })
        .collect();
    PodMeta {
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        service: service_of(&pod.metadata.labels, &owners, &pod.metadata.name),
        containers,
    }
}

/// What ended a watch.
#[derive(Debug, PartialEq, Eq)]
enum WatchEnd {
    /// The stream closed (server timeout, dropped connection): resume.
    Closed,
    /// The version is too old: list again.
    Gone,
}

/// Follows the node's pods, filling `cache`.
pub struct Watcher {
    config: KubeConfig,
    agent: ureq::Agent,
    cache: PodCache,
}

impl Watcher {
    pub fn new(config: KubeConfig, cache: PodCache) -> Result<Self> {
        // A dead connection must not hang the watch: the server ends
        // watches after `timeoutSeconds=300`, so no body lasts longer.
        let mut builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_recv_body(Some(Duration::from_secs(330)));
        if let Some(pem) = &config.ca_pem {
            // During a CA rotation the bundle holds several certificates.
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(Error::InvalidArgument(
                    "the service account's CA bundle holds no certificate".into(),
                ));
            }
            builder = builder.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .build(),
            );
        }
        Ok(Self {
            agent: builder.build().into(),
            config,
            cache,
        })
    }

    fn get(&self, query: &str) -> std::result::Result<ureq::http::Response<ureq::Body>, String> {
        let selector = format!("spec.nodeName={}", self.config.node);
        let url = format!(
            "{}/api/v1/pods?fieldSelector={}{query}",
            self.config.api_url.trim_end_matches('/'),
            url_encode(&selector)
        );
        let mut req = self.agent.get(&url);
        let token = match &self.config.token_file {
            Some(path) => std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string()),
            None => self.config.token.clone(),
        };
        if let Some(token) = token {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
        req.call().map_err(|e| format!("GET {url}: {e}"))
    }

    /// Lists the node's pods; returns the list's resource version.
    fn list(&self) -> std::result::Result<String, String> {
        let resp = self.get("")?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .map_err(|e| format!("reading the pod list: {e}"))?;
        if status != 200 {
            return Err(format!(
                "listing pods: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            ));
        }
        let list: PodList =
            serde_json::from_slice(&body).map_err(|e| format!("decoding the pod list: {e}"))?;
        let pods = list
            .items
            .iter()
            .take(MAX_PODS)
            .map(|p| (p.metadata.uid.clone(), pod_meta(p), mirror_of(p)))
            .collect();
        self.cache.replace(pods);
        Ok(list.metadata.resource_version)
    }

    /// Follows changes from `version`, updating it as events arrive.
    fn watch(&self, version: &mut String) -> std::result::Result<WatchEnd, String> {
        let resp = self.get(&format!(
            "&watch=1&allowWatchBookmarks=true&timeoutSeconds=300&resourceVersion={}",
            url_encode(version)
        ))?;
        match resp.status().as_u16() {
            200 => {}
            410 => return Ok(WatchEnd::Gone),
            s => return Err(format!("watching pods: HTTP {s}")),
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let Ok(line) = line else {
                return Ok(WatchEnd::Closed);
            };
            if line.trim().is_empty() {
                continue;
            }
            let event: WatchEvent = match serde_json::from_str(&line) {
                Ok(e) => e,
                Err(e) => return Err(format!("decoding a watch event: {e}")),
            };
            if event.kind == "ERROR" {
                let code = event.object.get("code").and_then(|c| c.as_u64());
                if code == Some(410) {
                    return Ok(WatchEnd::Gone);
                }
                return Err(format!("watch error: {}", event.object));
            }
            let pod: Pod = match serde_json::from_value(event.object) {
                Ok(p) => p,
                Err(e) => return Err(format!("decoding a watched pod: {e}")),
            };
            if !pod.metadata.resource_version.is_empty() {
                *version = pod.metadata.resource_version.clone();
            }
            match event.kind.as_str() {
                "ADDED" | "MODIFIED" => {
                    self.cache
                        .upsert(pod.metadata.uid.clone(), pod_meta(&pod), mirror_of(&pod))
                }
                "DELETED" => self.cache.remove(&pod.metadata.uid),
                _ => {} // BOOKMARK: only the version moves
            }
        }
        Ok(WatchEnd::Closed)
    }

    /// Lists, then watches forever. Relists when the version is gone or
    /// after three failed watches in a row; backs off on errors and on
    /// repeated relists, so a misbehaving API server is not hammered.
    pub fn run(self) {
        let mut version: Option<String> = None;
        let mut failures = Backoff::new(retry::Policy::DEFAULT);
        let mut relists = Backoff::new(retry::Policy::DEFAULT);
        loop {
            let result = match version.as_mut() {
                None => self.list().map(|v| {
                    version = Some(v);
                    None
                }),
                Some(v) => self.watch(v).map(Some),
            };
            match result {
                Ok(Some(WatchEnd::Gone)) => {
                    version = None;
                    // The first relist is at once; repeated ones back off.
                    let wait = relists.next_delay();
                    if relists.attempt() > 1 {
                        tracing::info!("pod watch too old again: listing in {wait:?}");
                        std::thread::sleep(wait);
                    }
                }
                Ok(Some(WatchEnd::Closed)) => {
                    failures.reset();
                    relists.reset();
                    // A server that closes watches at once must not spin us.
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(None) => failures.reset(),
                Err(e) => {
                    let wait = failures.next_delay();
                    if failures.attempt() >= 3 {
                        version = None;
                    }
                    tracing::warn!("Kubernetes API: {e}; retrying in {wait:?}");
                    std::thread::sleep(wait);
                }
            }
        }
    }

    /// Starts the watcher on its own thread.
    pub fn spawn(self) -> Result<()> {
        std::thread::Builder::new()
            .name("kube-watch".into())
            .spawn(move || self.run())
            .map(|_| ())
            .map_err(|e| Error::io("starting the Kubernetes watcher", e))
    }
}

/// The static pod a mirror pod stands for (its cgroup carries that UID).
fn mirror_of(pod: &Pod) -> Option<String> {
    pod.metadata
        .annotations
        .get("kubernetes.io/config.mirror")
        .cloned()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpListener,
        sync::Mutex,
    };

    use super::*;

    fn pod(uid: &str, name: &str, rv: &str, labels: &str, owner: &str, cid: &str) -> String {
        format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"shop","uid":"{uid}","resourceVersion":"{rv}","labels":{{{labels}}},"ownerReferences":[{owner}]}},"status":{{"containerStatuses":[{{"name":"web","containerID":"containerd://{cid}"}}]}}}}"#
        )
    }

    /// `run` lists again after three failed watches in a row.
    #[test]
    fn run_relists_after_repeated_watch_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = requests.clone();
        std::thread::spawn(move || {
            for _ in 0..5 {
                let (mut conn, _) = listener.accept().unwrap();
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).unwrap();
                let line = String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let list = !line.contains("watch=1");
                seen.lock().unwrap().push(line);
                let (status, body) = if list {
                    (
                        "200 OK",
                        r#"{"metadata":{"resourceVersion":"5"},"items":[]}"#,
                    )
                } else {
                    ("500 Internal Server Error", "{}")
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let watcher = Watcher::new(
            KubeConfig {
                api_url: format!("http://{addr}"),
                token: None,
                token_file: None,
                ca_pem: None,
                node: "n".into(),
            },
            PodCache::default(),
        )
        .unwrap();
        std::thread::spawn(move || watcher.run());
        for _ in 0..100 {
            if requests.lock().unwrap().len() >= 5 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let requests = requests.lock().unwrap();
        let kinds: Vec<bool> = requests.iter().map(|r| r.contains("watch=1")).collect();
        assert_eq!(
            kinds,
            [false, true, true, true, false],
            "list, 3 failed watches, list: {requests:?}"
        );
    }

    #[test]
    fn service_names() {
        let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let rs = vec![("ReplicaSet".to_string(), "checkout-7d9f8c6b5".to_string())];
        assert_eq!(
            service_of(
                &labels(&[("app.kubernetes.io/name", "cart"), ("app", "x")]),
                &rs,
                "p"
            ),
            "cart"
        );
        assert_eq!(service_of(&labels(&[("app", "x")]), &rs, "p"), "x");
        assert_eq!(
            service_of(&labels(&[("pod-template-hash", "7d9f8c6b5")]), &rs, "p"),
            "checkout"
        );
        let sts = vec![("StatefulSet".to_string(), "db".to_string())];
        assert_eq!(service_of(&labels(&[]), &sts, "db-0"), "db");
        let job = vec![("Job".to_string(), "nightly-report-29412345".to_string())];
        assert_eq!(service_of(&labels(&[]), &job, "p"), "nightly-report");
        let plain_job = vec![("Job".to_string(), "migrate".to_string())];
        assert_eq!(service_of(&labels(&[]), &plain_job, "p"), "migrate");
        assert_eq!(service_of(&labels(&[]), &[], "lonely"), "lonely");
    }

    /// A local server that speaks the pod list and watch API: the first
    /// watch sends one event and breaks; the resumed watch must ask for the
    /// version after it, gets a deletion and an expired version (410); the
    /// relist brings the final state.
    #[test]
    fn list_watch_break_resume_and_relist() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = requests.clone();
        let cid_a = "a".repeat(64);
        let cid_b = "b".repeat(64);
        let server = std::thread::spawn(move || {
            let responses = vec![
                // 1: list -> pod A at version 100
                format!(r#"{{"kind":"PodList","metadata":{{"resourceVersion":"100"}},"items":[{}]}}"#,
                    pod("uid-a", "checkout-7d9f8c6b5-x1", "100", r#""pod-template-hash":"7d9f8c6b5""#,
                        r#"{"kind":"ReplicaSet","name":"checkout-7d9f8c6b5"}"#, &cid_a)),
                // 2: watch from 100 -> pod B added at 101, then the connection breaks
                format!("{{\"type\":\"ADDED\",\"object\":{}}}\n",
                    pod("uid-b", "cart-0", "101", r#""app.kubernetes.io/name":"cart""#, "", &cid_b)),
                // 3: resumed watch from 101 -> A deleted at 102, then 410 Gone
                format!("{{\"type\":\"DELETED\",\"object\":{}}}\n{{\"type\":\"ERROR\",\"object\":{{\"kind\":\"Status\",\"code\":410,\"reason\":\"Expired\"}}}}\n",
                    pod("uid-a", "checkout-7d9f8c6b5-x1", "102", "", "", &cid_a)),
                // 4: relist -> only B
                format!(r#"{{"kind":"PodList","metadata":{{"resourceVersion":"200"}},"items":[{}]}}"#,
                    pod("uid-b", "cart-0", "200", r#""app.kubernetes.io/name":"cart""#, "", &cid_b)),
            ];
            for body in responses {
                let (mut conn, _) = listener.accept().unwrap();
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).unwrap();
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.lock()
                    .unwrap()
                    .push(request.lines().next().unwrap_or("").to_string());
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });

        let cache = PodCache::default();
        let watcher = Watcher::new(
            KubeConfig {
                api_url: format!("http://{addr}"),
                token: Some("t0ken".into()),
                token_file: None,
                ca_pem: None,
                node: "node-1".into(),
            },
            cache.clone(),
        )
        .unwrap();
        let mut version = watcher.list().unwrap();
        assert_eq!(version, "100");
        let a = cache.lookup("uid-a", Some(&"a".repeat(64))).unwrap();
        assert_eq!(
            (a.pod.as_str(), a.namespace.as_str(), a.service.as_str()),
            ("checkout-7d9f8c6b5-x1", "shop", "checkout")
        );
        assert_eq!(a.container.as_deref(), Some("web"));
        assert!(
            cache.lookup("uid-b", None).is_none(),
            "not known yet: no labels invented"
        );

        assert_eq!(watcher.watch(&mut version).unwrap(), WatchEnd::Closed);
        assert_eq!(version, "101");
        assert_eq!(cache.lookup("uid-b", None).unwrap().service, "cart");

        assert_eq!(watcher.watch(&mut version).unwrap(), WatchEnd::Gone);
        assert!(
            cache.lookup("uid-a", None).is_some(),
            "a deleted pod stays resolvable for samples still being drained"
        );
        let version = watcher.list().unwrap();
        assert_eq!(version, "200");
        assert!(cache.lookup("uid-b", None).is_some());
        server.join().unwrap();

        let requests = requests.lock().unwrap();
        assert!(
            requests[0].contains("fieldSelector=spec.nodeName%3Dnode-1"),
            "{requests:?}"
        );
        assert!(!requests[0].contains("watch=1"));
        assert!(
            requests[1].contains("watch=1") && requests[1].contains("resourceVersion=100"),
            "{requests:?}"
        );
        assert!(
            requests[2].contains("resourceVersion=101"),
            "resumed from the last event: {requests:?}"
        );
        assert!(
            !requests[3].contains("watch=1"),
            "relisted after 410: {requests:?}"
        );
    }
}
