//! The agent's error type: every variant names what failed and why.
use std::{io, path::PathBuf};

/// Result alias for the agent library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process lacks a capability the kernel asks for.
    #[error(
        "missing privileges: {what} needs {capability} (run as root, e.g. with `sudo -E`, or grant the capability)"
    )]
    MissingPrivilege {
        what: &'static str,
        capability: &'static str,
    },
    /// The running kernel lacks something the profiler needs.
    #[error("the running kernel does not support {feature}: {detail}")]
    KernelFeature {
        feature: &'static str,
        detail: String,
    },
    /// A user-supplied argument is wrong.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An output file cannot be written.
    #[error("cannot write {}: {source}", path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Loading, attaching or reading the eBPF program and maps failed.
    #[error("{what}: {source}")]
    Ebpf {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Any other I/O failure, with the operation that failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// Rendering the flame graph failed.
    #[error("rendering the flame graph: {0}")]
    Render(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
