//! TLS for the admin plane (rustls, ring): the server's `[admin.tls]` settings (certificate, key, and the CA whose client certificates it demands — mutual TLS) and the client's (the CA it trusts, the certificate it presents), each loaded into a rustls configuration or refused with the file and the reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// A loaded client configuration (what [`ClientTls::load`] gives).
pub type ClientConfig = rustls::ClientConfig;

/// Why TLS settings cannot be used. Every variant names the setting's file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file that cannot be read or holds nothing usable.
    #[error("{what} {}: {why}", file.display())]
    File {
        /// Which setting (`admin.tls.cert`, `tls.ca`, …).
        what: &'static str,
        /// The file.
        file: PathBuf,
        /// Why.
        why: String,
    },
    /// rustls refused the combination (a key that is not the certificate's, …).
    #[error("{what}: {why}")]
    Refused {
        /// Which settings.
        what: &'static str,
        /// Why.
        why: String,
    },
}

/// An admin endpoint's TLS (`[admin.tls]`): it answers HTTPS only, and with
/// `client_ca` it demands a client certificate that CA signed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain, the endpoint's own first.
    pub cert: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1). Keep it
    /// private: check-config refuses a key readable by every user.
    pub key: PathBuf,
    /// PEM CA certificates: when set, a client must present a certificate
    /// one of them signed (mutual TLS), or the handshake fails.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// What a client trusts and presents (stdctl's cluster file `[tls]`,
/// stdd's `[failover.tls]`): used for `https://` endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM CA certificates the endpoints' certificates must chain to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM certificate presented to endpoints that demand one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its PEM private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// ring's provider: rustls 0.23.48 deprecates it for want of post-quantum
/// key exchange (aws-lc-rs has it, at the price of a C/cmake build of
/// AWS-LC); an admin plane between a cluster's own hosts keeps ring
/// (docs/dependencies.md).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(what: &'static str, file: &Path, why: impl ToString) -> TlsError {
    TlsError::File {
        what,
        file: file.to_path_buf(),
        why: why.to_string(),
    }
}

/// Every certificate of a PEM file (at least one).
pub fn certificates(
    what: &'static str,
    file: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| file_error(what, file, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, file, e))?;
    if certs.is_empty() {
        return Err(file_error(what, file, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn private_key(what: &'static str, file: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(file).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            file_error(what, file, "no PEM private key in it")
        }
        e => file_error(what, file, e),
    })
}

fn roots(what: &'static str, file: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certificates(what, file)? {
        roots
            .add(c)
            .map_err(|e| file_error(what, file, format!("not a CA certificate: {e}")))?;
    }
    Ok(roots)
}

impl ServerTls {
    /// The rustls server configuration (TLS 1.2 and 1.3, HTTP/1.1).
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let certs = certificates("admin.tls.cert", &self.cert)?;
        let key = private_key("admin.tls.key", &self.key)?;
        let refused = |why: rustls::Error| TlsError::Refused {
            what: "admin.tls",
            why: why.to_string(),
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(refused)?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots("admin.tls.client_ca", ca)?),
                    provider(),
                )
                .build()
                .map_err(|e| file_error("admin.tls.client_ca", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Refused {
                what: "admin.tls.key",
                why: format!("{e} (is it the key of admin.tls.cert?)"),
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ClientTls {
    /// The rustls client configuration, or `None` when nothing is set (plain
    /// `http://` endpoints only). A certificate needs its key, and TLS needs
    /// the CA: there is no built-in trust.
    pub fn load(
        &self,
        section: &'static str,
    ) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
        let refused = |why: String| TlsError::Refused { what: section, why };
        let Some(ca) = &self.ca else {
            if self.cert.is_some() || self.key.is_some() {
                return Err(refused(
                    "ca is required with cert and key: the endpoints' certificates are checked against it".into(),
                ));
            }
            return Ok(None);
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| refused(e.to_string()))?
            .with_root_certificates(roots("tls.ca", ca)?);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    certificates("tls.cert", cert)?,
                    private_key("tls.key", key)?,
                )
                .map_err(|e| refused(format!("tls.cert and tls.key: {e}")))?,
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(refused("cert and key go together".into())),
        };
        Ok(Some(Arc::new(config)))
    }
}

/// The SHA-256 fingerprint of a DER certificate, as `openssl x509
/// -fingerprint -sha256` prints it but lower case without colons.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
