//! Scrape targets from Kubernetes: the pods whose annotations ask for it,
//! listed from the API server (the collector's service account needs
//! `list` on `pods`).
//!
//! | annotation | meaning | default |
//! |---|---|---|
//! | `profiler.dev/scrape` | `"true"` to be scraped | — |
//! | `profiler.dev/port` | port of the pprof handlers | `6060` |
//! | `profiler.dev/path` | their path | `/debug/pprof` |
//! | `profiler.dev/scheme` | `http` or `https` | `http` |
//! | `profiler.dev/profiles` | which, comma-separated | `cpu,mutex,block,allocs,heap,goroutine` |
//! | `profiler.dev/service` | the `service` label | as the agent names it |
//!
//! Only running pods with an IP are scraped. Their samples carry
//! `namespace`, `pod`, `node` and `service`, the last named as the agent
//! names a pod's service (`app.kubernetes.io/name`, then `app`, then the
//! controlling workload, then the pod), so a Go service's own profiles and
//! the agent's profiles of it share one `service` value.
use std::{collections::HashMap, time::Duration};

use serde::Deserialize;

use super::{GoProfile, Target};

const ANNOTATION: &str = "profiler.dev/";
/// Most pods read from one list.
const MAX_PODS: usize = 100_000;

/// Where the API server is and how to reach it.
#[derive(Clone, Debug)]
pub struct Discovery {
    /// e.g. `https://10.0.0.1:443`, or `http://127.0.0.1:PORT` in tests;
    /// empty: in-cluster, found at each list ([`Discovery::in_cluster`]).
    pub api_url: String,
    /// Read at every list (service-account tokens rotate).
    pub token_file: Option<std::path::PathBuf>,
    /// PEM of the CA(s) of the API server's certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// Only this namespace (`None`: all).
    pub namespace: Option<String>,
}

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl Discovery {
    /// In-cluster: the API server of `KUBERNETES_SERVICE_HOST`/`_PORT`
    /// and the pod's service account, read when the pods are listed (so a
    /// configuration is checked anywhere, and works in a pod).
    pub fn in_cluster() -> Self {
        Self {
            api_url: String::new(),
            token_file: None,
            ca_pem: None,
            namespace: None,
        }
    }

    /// This discovery with the in-cluster API server and service account
    /// filled in, when it names no API server.
    fn resolved(&self) -> Result<Self, String> {
        if !self.api_url.is_empty() {
            return Ok(self.clone());
        }
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            "scrape_kubernetes without api_url needs to run in a pod \
             (KUBERNETES_SERVICE_HOST is not set)"
                .to_string()
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(Self {
            api_url: format!("https://{host}:{port}"),
            token_file: Some(format!("{SERVICE_ACCOUNT}/token").into()),
            ca_pem: std::fs::read(format!("{SERVICE_ACCOUNT}/ca.crt")).ok(),
            namespace: self.namespace.clone(),
        })
    }

    fn agent(&self) -> Result<ureq::Agent, String> {
        let mut builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(60)));
        if let Some(pem) = &self.ca_pem {
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err("the API server's CA bundle holds no certificate".into());
            }
            builder = builder.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .build(),
            );
        }
        Ok(builder.build().into())
    }

    /// The targets the pods ask for now.
    pub fn targets(&self) -> Result<Vec<Target>, String> {
        let this = self.resolved()?;
        this.list()
    }

    fn list(&self) -> Result<Vec<Target>, String> {
        let path = match &self.namespace {
            Some(ns) => format!("/api/v1/namespaces/{ns}/pods"),
            None => "/api/v1/pods".into(),
        };
        let url = format!("{}{path}", self.api_url.trim_end_matches('/'));
        let mut request = self.agent()?.get(&url);
        let token = self
            .token_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok());
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {}", token.trim()));
        }
        let response = request.call().map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .with_config()
            .limit(512 << 20)
            .read_to_vec()
            .map_err(|e| format!("reading the pod list: {e}"))?;
        if status != 200 {
            let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
            return Err(format!("listing pods: HTTP {status}: {text}"));
        }
        let list: PodList =
            serde_json::from_slice(&body).map_err(|e| format!("decoding the pod list: {e}"))?;
        Ok(targets_of(&list))
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct PodList {
    #[serde(default)]
    pub items: Vec<Pod>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Spec,
    #[serde(default)]
    pub status: Status,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub labels: HashMap<String, String>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Default, Deserialize)]
pub struct OwnerReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub controller: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub node_name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    #[serde(default)]
    pub phase: String,
    #[serde(default, rename = "podIP")]
    pub pod_ip: String,
}

/// The targets of the pods that ask to be scraped; a pod with a bad
/// annotation is left out, with a warning.
pub fn targets_of(list: &PodList) -> Vec<Target> {
    list.items
        .iter()
        .take(MAX_PODS)
        .filter_map(|pod| match target_of(pod) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(
                    pod = %pod.metadata.name,
                    namespace = %pod.metadata.namespace,
                    "not scraped: {e}"
                );
                None
            }
        })
        .collect()
}

fn target_of(pod: &Pod) -> Result<Option<Target>, String> {
    let a = |name: &str| {
        pod.metadata
            .annotations
            .get(&format!("{ANNOTATION}{name}"))
            .map(|v| v.trim())
    };
    if a("scrape") != Some("true") || pod.status.phase != "Running" || pod.status.pod_ip.is_empty()
    {
        return Ok(None);
    }
    let port: u16 = a("port")
        .unwrap_or("6060")
        .parse()
        .map_err(|_| format!("{ANNOTATION}port {:?} is not a port", a("port")))?;
    let scheme = a("scheme").unwrap_or("http");
    if scheme != "http" && scheme != "https" {
        return Err(format!("{ANNOTATION}scheme {scheme:?}: use http or https"));
    }
    let path = a("path").unwrap_or("/debug/pprof");
    let profiles = match a("profiles") {
        Some(list) => GoProfile::parse_list(list)?,
        None => GoProfile::ALL.to_vec(),
    };
    let ip = &pod.status.pod_ip;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.clone()
    };
    let service = match a("service") {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => service_of(pod),
    };
    let mut labels = vec![
        ("namespace".to_string(), pod.metadata.namespace.clone()),
        ("pod".to_string(), pod.metadata.name.clone()),
        ("service".to_string(), service),
    ];
    if !pod.spec.node_name.is_empty() {
        labels.push(("node".to_string(), pod.spec.node_name.clone()));
    }
    Ok(Some(Target {
        url: format!("{scheme}://{host}:{port}/{}", path.trim_matches('/')),
        labels,
        profiles,
    }))
}

/// A pod's `service`, named as the agent names it: `app.kubernetes.io/name`,
/// then `app`, then the controlling workload (a ReplicaSet's Deployment, a
/// CronJob's Job), then the pod's name.
fn service_of(pod: &Pod) -> String {
    let labels = &pod.metadata.labels;
    if let Some(name) = labels
        .get("app.kubernetes.io/name")
        .or_else(|| labels.get("app"))
    {
        return name.clone();
    }
    let mut owners: Vec<&OwnerReference> = pod.metadata.owner_references.iter().collect();
    owners.sort_by_key(|o| o.controller != Some(true));
    if let Some(owner) = owners.first() {
        if owner.kind == "ReplicaSet" {
            if let Some(deployment) = labels
                .get("pod-template-hash")
                .and_then(|hash| owner.name.strip_suffix(&format!("-{hash}")))
            {
                return deployment.to_string();
            }
        }
        if owner.kind == "Job" {
            if let Some((cronjob, stamp)) = owner.name.rsplit_once('-') {
                if stamp.len() >= 8 && stamp.bytes().all(|b| b.is_ascii_digit()) {
                    return cronjob.to_string();
                }
            }
        }
        return owner.name.clone();
    }
    pod.metadata.name.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"items": [
      {"metadata": {"name": "checkout-7d9f-abcde", "namespace": "shop",
                    "labels": {"pod-template-hash": "7d9f"},
                    "ownerReferences": [{"kind": "ReplicaSet", "name": "checkout-7d9f", "controller": true}],
                    "annotations": {"profiler.dev/scrape": "true", "profiler.dev/port": "8080",
                                    "profiler.dev/profiles": "cpu,mutex"}},
       "spec": {"nodeName": "n1"}, "status": {"phase": "Running", "podIP": "10.1.2.3"}},
      {"metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"},
                    "annotations": {"profiler.dev/scrape": "true"}},
       "spec": {"nodeName": "n2"}, "status": {"phase": "Running", "podIP": "fd00::5"}},
      {"metadata": {"name": "quiet", "namespace": "shop"},
       "status": {"phase": "Running", "podIP": "10.1.2.9"}},
      {"metadata": {"name": "pending", "namespace": "shop",
                    "annotations": {"profiler.dev/scrape": "true"}},
       "status": {"phase": "Pending"}},
      {"metadata": {"name": "typo", "namespace": "shop",
                    "annotations": {"profiler.dev/scrape": "true", "profiler.dev/port": "http"}},
       "status": {"phase": "Running", "podIP": "10.1.2.10"}}
    ]}"#;

    #[test]
    fn annotated_running_pods_become_targets() {
        let list: PodList = serde_json::from_str(LIST).unwrap();
        let targets = targets_of(&list);
        assert_eq!(targets.len(), 2, "{targets:?}");
        let checkout = &targets[0];
        assert_eq!(checkout.url, "http://10.1.2.3:8080/debug/pprof");
        assert_eq!(checkout.profiles, vec![GoProfile::Cpu, GoProfile::Mutex]);
        let label = |t: &Target, n: &str| {
            t.labels
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(label(checkout, "service").as_deref(), Some("checkout"));
        assert_eq!(label(checkout, "namespace").as_deref(), Some("shop"));
        assert_eq!(label(checkout, "node").as_deref(), Some("n1"));
        let web = &targets[1];
        assert_eq!(web.url, "http://[fd00::5]:6060/debug/pprof");
        assert_eq!(web.profiles, GoProfile::ALL.to_vec());
        assert_eq!(label(web, "service").as_deref(), Some("web"));
    }
}
