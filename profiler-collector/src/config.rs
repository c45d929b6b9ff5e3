//! The collector's optional TOML configuration file. Command-line flags
//! override it; it overrides the defaults.
//!
//! ```toml
//! grpc_listen = "0.0.0.0:7070"
//! http_listen = "0.0.0.0:7080"
//! store = "sqlite:/var/lib/profiler/profiles.db"
//! # or, several collectors on one ClickHouse (docs/clickhouse.md):
//! # store = "clickhouse://clickhouse.example:8123/profiles"
//! retention = "14d"
//! max_message_mib = 16
//! # TLS on both ports; agents must present a certificate from client_ca.
//! tls_cert = "/etc/profiler/tls/tls.crt"
//! tls_key = "/etc/profiler/tls/tls.key"
//! tls_client_ca = "/etc/profiler/tls/ca.crt"
//! # or, explicitly: plaintext = true
//! token_file = "/etc/profiler/agent-tokens"
//! http_token_file = "/etc/profiler/ui-tokens"
//! # Only these client networks may connect, to any port (checked first).
//! allow_cidr = ["10.0.0.0/8", "fd00::/8"]
//! agent_rate_limit = 10.0   # batches per second per agent; 0: none
//! agent_rate_burst = 60
//! max_concurrent_batches = 8
//!
//! # Go services scraped for their own profiles (docs/formats.md).
//! scrape_interval = "15s"
//! scrape_seconds = 10
//! [[scrape]]
//! url = "http://10.0.0.5:6060/debug/pprof"
//! labels = { service = "checkout", process = "checkout" }
//! profiles = ["cpu", "mutex", "block", "allocs", "heap", "goroutine"]
//! # and the pods that ask for it (profiler.dev/scrape annotations):
//! [scrape_kubernetes]
//! # api_url = "https://10.0.0.1:443"   # default: in-cluster
//! # namespace = "shop"                  # default: all
//! ```
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use profiler_security::{AllowList, ServerTlsFiles};
use serde::Deserialize;

use crate::{
    scrape::{kubernetes::Discovery, GoProfile, Target},
    server::{CollectorConfig, StoreLocation},
};

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub grpc_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub store: Option<String>,
    pub retention: Option<String>,
    pub max_message_mib: Option<usize>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub plaintext: Option<bool>,
    pub token_file: Option<PathBuf>,
    pub http_token_file: Option<PathBuf>,
    pub allow_cidr: Option<Vec<String>>,
    pub agent_rate_limit: Option<f64>,
    pub agent_rate_burst: Option<u32>,
    pub max_concurrent_batches: Option<usize>,
    pub scrape_interval: Option<String>,
    pub scrape_seconds: Option<u64>,
    #[serde(default)]
    pub scrape: Vec<ScrapeTarget>,
    pub scrape_kubernetes: Option<ScrapeKubernetes>,
}

/// A `[[scrape]]` entry.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScrapeTarget {
    pub url: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub profiles: Option<Vec<String>>,
}

/// The `[scrape_kubernetes]` table.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScrapeKubernetes {
    pub api_url: Option<String>,
    pub namespace: Option<String>,
}

/// A scrape target from its parts: an http(s) URL, labels, profiles
/// (default: all).
pub fn scrape_target(
    url: &str,
    labels: Vec<(String, String)>,
    profiles: Option<&[String]>,
) -> Result<Target, String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "scrape target {url:?}: use http://HOST:PORT/debug/pprof"
        ));
    }
    for (name, _) in &labels {
        if crate::import::label_name(name).as_deref() != Some(name.as_str()) {
            return Err(format!(
                "scrape target {url}: label name {name:?} must be [a-z_][a-z0-9_]*"
            ));
        }
    }
    let profiles = match profiles {
        Some(list) => GoProfile::parse_list(&list.join(","))?,
        None => GoProfile::ALL.to_vec(),
    };
    if profiles.is_empty() {
        return Err(format!("scrape target {url}: no profiles"));
    }
    Ok(Target {
        url: url.trim_end_matches('/').to_string(),
        labels,
        profiles,
    })
}

/// `--scrape URL[,NAME=VALUE...][,profiles=cpu+mutex]`.
pub fn parse_scrape_flag(text: &str) -> Result<Target, String> {
    let mut parts = text.split(',');
    let url = parts.next().unwrap_or_default().trim();
    let mut labels = Vec::new();
    let mut profiles = None;
    for part in parts {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("--scrape {text:?}: {part:?} is not NAME=VALUE"))?;
        if name.trim() == "profiles" {
            profiles = Some(value.split('+').map(str::to_string).collect::<Vec<_>>());
        } else {
            labels.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    scrape_target(url, labels, profiles.as_deref())
}

/// A scrape interval and profile length: at least 1 s, the profile no
/// longer than the interval.
pub fn check_scrape_timing(interval: Duration, seconds: u64) -> Result<(), String> {
    if interval < Duration::from_secs(1) || seconds == 0 {
        return Err("scrape_interval and scrape_seconds must be at least 1 s".into());
    }
    if Duration::from_secs(seconds) > interval {
        return Err(format!(
            "scrape_seconds ({seconds}) is longer than scrape_interval ({interval:?})"
        ));
    }
    Ok(())
}

/// How the ports are secured, as asked for (file, then command line).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transport {
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub plaintext: Option<bool>,
}

impl Transport {
    /// Settings present in `other` win.
    pub fn merge(&mut self, other: Transport) {
        self.tls_cert = other.tls_cert.or(self.tls_cert.take());
        self.tls_key = other.tls_key.or(self.tls_key.take());
        self.tls_client_ca = other.tls_client_ca.or(self.tls_client_ca.take());
        self.plaintext = other.plaintext.or(self.plaintext);
    }

    /// TLS files, or `None` for plain text, which must be asked for.
    pub fn resolve(&self) -> Result<Option<ServerTlsFiles>, String> {
        let plaintext = self.plaintext.unwrap_or(false);
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), Some(_)) if plaintext => {
                Err("plaintext and a TLS certificate are both set: choose one".into())
            }
            (Some(cert), Some(key)) => Ok(Some(ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            })),
            (Some(_), None) => Err("tls_cert needs tls_key (--tls-key)".into()),
            (None, Some(_)) => Err("tls_key needs tls_cert (--tls-cert)".into()),
            (None, None) if self.tls_client_ca.is_some() => {
                Err("tls_client_ca needs tls_cert and tls_key".into())
            }
            (None, None) if plaintext => Ok(None),
            (None, None) => Err("no TLS certificate: set tls_cert and tls_key \
                 (--tls-cert, --tls-key), or ask for plain text with plaintext = true \
                 (--plaintext)"
                .into()),
        }
    }
}

impl FileConfig {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The file's TLS settings.
    pub fn transport(&self) -> Transport {
        Transport {
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            plaintext: self.plaintext,
        }
    }

    /// Applies the settings present in the file, checking each (TLS
    /// settings are resolved with the command line's: see [`Transport`]).
    pub fn apply(&self, config: &mut CollectorConfig) -> Result<(), String> {
        if let Some(a) = self.grpc_listen {
            config.grpc_listen = a;
        }
        if let Some(a) = self.http_listen {
            config.http_listen = a;
        }
        if let Some(s) = &self.store {
            config.store = s.parse::<StoreLocation>()?;
        }
        if let Some(r) = &self.retention {
            config.retention =
                humantime::parse_duration(r).map_err(|e| format!("retention {r:?}: {e}"))?;
        }
        if let Some(m) = self.max_message_mib {
            config.max_message_bytes = check_message_mib(m)? << 20;
        }
        if let Some(p) = &self.token_file {
            config.token_file = Some(p.clone());
        }
        if let Some(p) = &self.http_token_file {
            config.http_token_file = Some(p.clone());
        }
        if let Some(nets) = &self.allow_cidr {
            config.allow = AllowList::parse(nets).map_err(|e| format!("allow_cidr: {e}"))?;
        }
        if let Some(r) = self.agent_rate_limit {
            config.agent_rate_limit = check_rate(r)?;
        }
        if let Some(b) = self.agent_rate_burst {
            config.agent_rate_burst = b.max(1);
        }
        if let Some(n) = self.max_concurrent_batches {
            config.max_concurrent_batches = Some(check_concurrency(n)?);
        }
        if let Some(i) = &self.scrape_interval {
            config.scrape.interval =
                humantime::parse_duration(i).map_err(|e| format!("scrape_interval {i:?}: {e}"))?;
        }
        if let Some(s) = self.scrape_seconds {
            config.scrape.seconds = s;
        }
        for t in &self.scrape {
            config.scrape.targets.push(scrape_target(
                &t.url,
                t.labels.clone().into_iter().collect(),
                t.profiles.as_deref(),
            )?);
        }
        if let Some(k) = &self.scrape_kubernetes {
            let mut discovery = Discovery::in_cluster();
            if let Some(url) = &k.api_url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!(
                        "scrape_kubernetes.api_url {url:?}: use https://HOST:PORT"
                    ));
                }
                discovery.api_url = url.clone();
            }
            discovery.namespace = k.namespace.clone();
            config.scrape.kubernetes = Some(discovery);
        }
        check_scrape_timing(config.scrape.interval, config.scrape.seconds)?;
        Ok(())
    }
}

/// The largest-batch setting must be 1–1024 MiB.
pub fn check_message_mib(mib: usize) -> Result<usize, String> {
    if (1..=1024).contains(&mib) {
        Ok(mib)
    } else {
        Err(format!("max_message_mib must be 1-1024, got {mib}"))
    }
}

/// Batches per second per agent: 0 (no limit) or positive.
pub fn check_rate(rate: f64) -> Result<f64, String> {
    if rate.is_finite() && rate >= 0.0 {
        Ok(rate)
    } else {
        Err(format!("agent_rate_limit must be 0 or more, got {rate}"))
    }
}

/// Batches handled at once: 1-1024.
pub fn check_concurrency(n: usize) -> Result<usize, String> {
    if (1..=1024).contains(&n) {
        Ok(n)
    } else {
        Err(format!("max_concurrent_batches must be 1-1024, got {n}"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn file_settings_apply_over_defaults() {
        let file = FileConfig::parse(
            r#"
            grpc_listen = "0.0.0.0:9000"
            store = "sqlite:/tmp/x.db"
            retention = "14d"
            max_message_mib = 8
            "#,
        )
        .unwrap();
        let mut config = CollectorConfig::default();
        file.apply(&mut config).unwrap();
        assert_eq!(config.grpc_listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.http_listen, CollectorConfig::default().http_listen);
        assert_eq!(config.store, StoreLocation::Sqlite("/tmp/x.db".into()));
        assert_eq!(config.retention, Duration::from_secs(14 * 86400));
        assert_eq!(config.max_message_bytes, 8 << 20);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert!(FileConfig::parse("grpc_port = 1")
            .unwrap_err()
            .contains("grpc_port"));
        assert!(FileConfig::parse("grpc_listen = \"nowhere\"").is_err());
        let mut config = CollectorConfig::default();
        let e = FileConfig::parse("store = \"mysql:x\"")
            .unwrap()
            .apply(&mut config)
            .unwrap_err();
        assert!(e.contains("sqlite:PATH"), "{e}");
        let e = FileConfig::parse("max_message_mib = 0")
            .unwrap()
            .apply(&mut config)
            .unwrap_err();
        assert!(e.contains("1-1024"), "{e}");
        let e = FileConfig::parse("retention = \"forever\"")
            .unwrap()
            .apply(&mut config)
            .unwrap_err();
        assert!(e.contains("retention"), "{e}");
        assert!(FileConfig::load(Path::new("/nonexistent.toml"))
            .unwrap_err()
            .contains("cannot read"));
        let e = FileConfig::parse("agent_rate_limit = -1.0")
            .unwrap()
            .apply(&mut config)
            .unwrap_err();
        assert!(e.contains("agent_rate_limit"), "{e}");
    }

    #[test]
    fn security_settings_apply() {
        let file = FileConfig::parse(
            r#"
            tls_cert = "/c.pem"
            tls_key = "/k.pem"
            tls_client_ca = "/ca.pem"
            token_file = "/tokens"
            http_token_file = "/ui-tokens"
            agent_rate_limit = 2.5
            agent_rate_burst = 7
            max_concurrent_batches = 3
            "#,
        )
        .unwrap();
        let mut config = CollectorConfig::default();
        file.apply(&mut config).unwrap();
        assert_eq!(config.token_file, Some("/tokens".into()));
        assert_eq!(config.http_token_file, Some("/ui-tokens".into()));
        assert_eq!(config.agent_rate_limit, 2.5);
        assert_eq!(config.agent_rate_burst, 7);
        assert_eq!(config.max_concurrent_batches, Some(3));
        assert_eq!(
            file.transport().resolve().unwrap(),
            Some(ServerTlsFiles {
                cert: "/c.pem".into(),
                key: "/k.pem".into(),
                client_ca: Some("/ca.pem".into()),
            })
        );
    }

    #[test]
    fn plain_text_must_be_asked_for() {
        let none = Transport::default();
        assert!(none.resolve().unwrap_err().contains("--plaintext"));
        let plain = Transport {
            plaintext: Some(true),
            ..Transport::default()
        };
        assert_eq!(plain.resolve().unwrap(), None);
        let mut both = plain.clone();
        both.merge(Transport {
            tls_cert: Some("/c".into()),
            tls_key: Some("/k".into()),
            ..Transport::default()
        });
        assert!(both.resolve().unwrap_err().contains("choose one"));
        let half = Transport {
            tls_cert: Some("/c".into()),
            ..Transport::default()
        };
        assert!(half.resolve().unwrap_err().contains("tls_key"));
        // The command line overrides the file.
        let mut file = Transport {
            plaintext: Some(true),
            ..Transport::default()
        };
        file.merge(Transport {
            plaintext: Some(false),
            ..Transport::default()
        });
        assert!(file.resolve().is_err());
    }
}
