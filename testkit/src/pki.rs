//! Test certificates (rcgen): a CA, server certificates for IP addresses, client certificates, written as PEM files into a directory — the admin plane's TLS and mutual-TLS tests use them.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority that signs test certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// Its PEM certificate file.
    pub pem: PathBuf,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("pem", &self.pem)
            .finish_non_exhaustive()
    }
}

/// A signed certificate's files.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (mode 0600).
    pub key: PathBuf,
    /// The DER certificate (for fingerprints).
    pub der: Vec<u8>,
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
}

impl Ca {
    /// A new CA named `name`, its certificate written to `dir/NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        let pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem, cert.pem()).expect("write CA");
        Ca { cert, key, pem }
    }

    fn issue(
        &self,
        dir: &Path,
        name: &str,
        sans: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Issued {
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        let out = Issued {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&out.cert, cert.pem()).expect("write cert");
        write_private(&out.key, &key.serialize_pem());
        out
    }

    /// A server certificate for `hosts` (IP addresses or DNS names).
    pub fn server(&self, dir: &Path, name: &str, hosts: &[&str]) -> Issued {
        let sans = hosts.iter().map(|h| h.to_string()).collect();
        self.issue(dir, name, sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate named `name`.
    pub fn client(&self, dir: &Path, name: &str) -> Issued {
        self.issue(dir, name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }
}
