//! The collector's optional TOML configuration file. Command-line flags
//! override it; it overrides the defaults.
//!
//! ```toml
//! grpc_listen = "0.0.0.0:7070"
//! http_listen = "0.0.0.0:7080"
//! store = "sqlite:/var/lib/profiler/profiles.db"
//! retention = "14d"
//! max_message_mib = 16
//! ```
use std::{net::SocketAddr, path::Path};

use serde::Deserialize;

use crate::server::{CollectorConfig, StoreLocation};

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub grpc_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub store: Option<String>,
    pub retention: Option<String>,
    pub max_message_mib: Option<usize>,
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

    /// Applies the settings present in the file, checking each.
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
    }
}
