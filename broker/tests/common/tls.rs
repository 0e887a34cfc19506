//! Certificates made at run time with rcgen (none are committed): a CA, and
//! leaf certificates it signs, written as PEM files into a temp directory.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

/// A certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// Its certificate as a PEM file: what a peer or client trusts.
    pub pem: PathBuf,
}

/// A certificate and its key, as PEM files.
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Identity {
    /// `--PREFIXtls-cert FILE --PREFIXtls-key FILE` (prefix `""` or `"ha-"`).
    pub fn flags(&self, prefix: &str) -> Vec<String> {
        vec![
            format!("--{prefix}tls-cert"),
            self.cert.display().to_string(),
            format!("--{prefix}tls-key"),
            self.key.display().to_string(),
        ]
    }
}

impl Ca {
    /// A new CA named `name`, its certificate written to `dir/name.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, format!("twinmq test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).expect("write CA");
        Ca { cert, key, pem }
    }

    /// A certificate for `names` (IP addresses become IP SANs), usable by
    /// a server and a client, written to `dir/file.{crt,key}`.
    pub fn issue(&self, dir: &Path, file: &str, names: &[&str]) -> Identity {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign leaf");
        let id = Identity { cert: dir.join(format!("{file}.crt")), key: dir.join(format!("{file}.key")) };
        std::fs::write(&id.cert, cert.pem()).expect("write cert");
        std::fs::write(&id.key, key.serialize_pem()).expect("write key");
        id
    }
}
