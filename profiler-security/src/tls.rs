//! rustls configurations from PEM files, and why a handshake failed.
use std::{
    error::Error as StdError,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    client::WebPkiServerVerifier,
    crypto::{ring, CryptoProvider},
    server::WebPkiClientVerifier,
    AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// A configuration that cannot be built; names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    #[error("{0}")]
    Config(String),
}

fn file_error(path: &Path, what: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

/// The collector's certificate and key, and the CA its agents' client
/// certificates must chain to (`None`: no client certificates asked for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// What an agent trusts (`ca`; `None`: the public web PKI roots) and the
/// client certificate it presents (both or neither of `cert` and `key`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_error(path, format!("no usable PEM private key: {e}")))
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn builder_error(e: rustls::Error) -> TlsError {
    TlsError::Config(e.to_string())
}

/// The collector side. `alpn`: protocols offered (`h2` for gRPC; `h2` and
/// `http/1.1` for the web UI).
pub fn server_config(
    files: &ServerTlsFiles,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(builder_error)?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
                    .build()
                    .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| file_error(&files.cert, format!("certificate and key: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The agent side.
pub fn client_config(files: &ClientTlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match &files.ca {
        Some(ca) => load_roots(ca)?,
        None => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    };
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(builder_error)?
        .with_webpki_verifier(verifier);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| file_error(cert, format!("client certificate and key: {e}")))?,
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(TlsError::Config(
                "a client certificate needs its private key too (--tls-key)".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(TlsError::Config(
                "a client private key needs its certificate too (--tls-cert)".into(),
            ))
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Why a TLS handshake failed, in the words an operator needs. "Ours" is
/// the side that reports it; "the peer" the other end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The peer's certificate does not chain to a CA we trust.
    UnknownCa,
    /// The peer's certificate has expired.
    Expired,
    /// The peer's certificate is not valid yet.
    NotYetValid,
    /// The peer's certificate is not for the name we connected to.
    WrongName,
    /// The peer's certificate is unusable for another reason.
    BadCertificate(String),
    /// The peer (a client) sent no certificate, and one is required.
    NoClientCertificate,
    /// The peer does not trust our certificate's CA.
    PeerSaysUnknownCa,
    /// The peer says our certificate has expired.
    PeerSaysExpired,
    /// The peer (a server) requires a client certificate we did not send.
    PeerRequiresCertificate,
    /// The peer refused our certificate for another reason.
    PeerRejectedCertificate(String),
    /// The peer does not speak TLS (plain text on a TLS port, or the reverse).
    NotTls,
    /// The handshake did not finish in time.
    Timeout,
    Other(String),
}

impl TlsFailure {
    /// Classifies a rustls error.
    pub fn from_rustls(e: &rustls::Error) -> Self {
        use rustls::Error as E;
        match e {
            E::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => Self::UnknownCa,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Self::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::NotYetValid
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Self::WrongName,
                other => Self::BadCertificate(format!("{other:?}")),
            },
            E::NoCertificatesPresented => Self::NoClientCertificate,
            E::AlertReceived(alert) => match alert {
                AlertDescription::UnknownCA => Self::PeerSaysUnknownCa,
                AlertDescription::CertificateExpired => Self::PeerSaysExpired,
                AlertDescription::CertificateRequired => Self::PeerRequiresCertificate,
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied => {
                    Self::PeerRejectedCertificate(format!("{alert:?}"))
                }
                other => Self::Other(format!("the peer sent the alert {other:?}")),
            },
            E::InvalidMessage(_) => Self::NotTls,
            other => Self::Other(other.to_string()),
        }
    }

    /// Finds the TLS failure behind an error from any layer above (I/O,
    /// HTTP/2, gRPC), if there is one.
    pub fn find(err: &(dyn StdError + 'static)) -> Option<Self> {
        let mut current = Some(err);
        while let Some(e) = current {
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Some(Self::from_rustls(tls));
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if let Some(found) = io.get_ref().and_then(|inner| Self::find(inner)) {
                    return Some(found);
                }
            }
            current = e.source();
        }
        None
    }

    /// A short name, for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "certificate_expired",
            Self::NotYetValid => "certificate_not_yet_valid",
            Self::WrongName => "certificate_wrong_name",
            Self::BadCertificate(_) => "bad_certificate",
            Self::NoClientCertificate => "no_client_certificate",
            Self::PeerSaysUnknownCa => "peer_unknown_ca",
            Self::PeerSaysExpired => "peer_certificate_expired",
            Self::PeerRequiresCertificate => "peer_requires_certificate",
            Self::PeerRejectedCertificate(_) => "peer_rejected_certificate",
            Self::NotTls => "not_tls",
            Self::Timeout => "handshake_timeout",
            Self::Other(_) => "other",
        }
    }

    /// The failure told about `peer` (e.g. "the collector", "agent
    /// 10.0.0.7:51234").
    pub fn describe(&self, peer: &str) -> String {
        match self {
            Self::UnknownCa => format!("{peer} presented a certificate signed by an unknown CA"),
            Self::Expired => format!("{peer} presented an expired certificate"),
            Self::NotYetValid => format!("{peer} presented a certificate that is not valid yet"),
            Self::WrongName => {
                format!("{peer} presented a certificate that is not valid for its address")
            }
            Self::BadCertificate(why) => {
                format!("{peer} presented an unusable certificate ({why})")
            }
            Self::NoClientCertificate => format!("{peer} sent no client certificate"),
            Self::PeerSaysUnknownCa => {
                format!("{peer} does not trust our certificate (unknown CA)")
            }
            Self::PeerSaysExpired => format!("{peer} says our certificate has expired"),
            Self::PeerRequiresCertificate => format!("{peer} requires a client certificate"),
            Self::PeerRejectedCertificate(why) => {
                format!("{peer} rejected our certificate ({why})")
            }
            Self::NotTls => format!("{peer} does not speak TLS (plain text?)"),
            Self::Timeout => format!("{peer} did not finish the TLS handshake in time"),
            Self::Other(why) => format!("TLS with {peer} failed: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_found_through_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(TlsFailure::find(&io), Some(TlsFailure::UnknownCa));
        let alert = std::io::Error::other(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired,
        ));
        assert_eq!(
            TlsFailure::find(&alert),
            Some(TlsFailure::PeerRequiresCertificate)
        );
        assert_eq!(TlsFailure::find(&std::io::Error::other("plain")), None);
    }

    #[test]
    fn bad_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let e = server_config(
            &ServerTlsFiles {
                cert: junk.clone(),
                key: junk.clone(),
                client_ca: None,
            },
            &[b"h2"],
        )
        .unwrap_err();
        assert!(e.to_string().contains("junk.pem"), "{e}");
        let e = client_config(&ClientTlsFiles {
            ca: Some(dir.path().join("missing.pem")),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = client_config(&ClientTlsFiles {
            cert: Some(junk),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("--tls-key"), "{e}");
    }
}
