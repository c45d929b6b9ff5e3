//! Transport security shared by the agent and the collector.
//!
//! - [`tls`]: rustls configurations from PEM files (server, with optional
//!   client certificates; client, with optional identity) and a plain-words
//!   explanation of why a handshake failed.
//! - [`token`]: bearer tokens read from a file that is re-read when it
//!   changes, so tokens rotate without a restart.
//! - [`door`]: the allow-list of client networks, checked first on every
//!   connection;
//! - [`accept`]: a TLS accept loop that handshakes connections concurrently
//!   and logs every rejected peer with the reason.
pub mod accept;
pub mod door;
pub mod tls;
pub mod token;

pub use door::AllowList;
pub use rustls;
pub use tls::{ClientTlsFiles, ServerTlsFiles, TlsError, TlsFailure};
pub use token::TokenFile;
pub use tokio_rustls;
