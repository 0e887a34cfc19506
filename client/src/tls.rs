//! TLS for the client: trust the broker by a CA file, optionally present a
//! client certificate (for a broker with `tls_client_ca`, mutual TLS).
//!
//! rustls with the `ring` provider, set explicitly. The name verified in the
//! broker's certificate is the host part of the address dialed (an IP
//! address or a DNS name), unless [`ClientTls::server_name`] sets one for
//! every address (a pair addressed by IP whose certificates carry a name).
//!
//! A TLS failure (a certificate the CA did not sign, a name that does not
//! match, our certificate refused, a server not speaking TLS) is a
//! configuration problem, not an outage: the client does not try other
//! nodes or retry, it fails at once with [`ClientError::Tls`].

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::ClientError;

fn setup_error(path: &Path, message: impl std::fmt::Display) -> ClientError {
    ClientError::TlsSetup { message: format!("{}: {message}", path.display()) }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| setup_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setup_error(path, e))?;
    if certs.is_empty() {
        return Err(setup_error(path, "no PEM certificate (-----BEGIN CERTIFICATE-----) in the file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ClientError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => setup_error(path, "no PEM private key in the file"),
        e => setup_error(path, e),
    })
}

/// How the client speaks TLS to the broker. Cheap to clone.
///
/// ```no_run
/// # fn demo() -> Result<(), twinmq_client::ClientError> {
/// use twinmq_client::{ClientConfig, ClientTls};
/// let tls = ClientTls::new("/etc/twinmq/ca.pem")?.server_name("twinmq.internal")?;
/// let config = ClientConfig::new(["10.0.0.1:5570", "10.0.0.2:5570"]).tls(tls);
/// # let _ = config; Ok(()) }
/// ```
#[derive(Clone)]
pub struct ClientTls {
    pub(crate) connector: tokio_rustls::TlsConnector,
    /// Verified in the broker's certificate instead of the host dialed.
    pub(crate) server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trust brokers whose certificate the CA in `ca_file` (PEM) signed.
    pub fn new(ca_file: impl AsRef<Path>) -> Result<ClientTls, ClientError> {
        Self::build(ca_file.as_ref(), None)
    }

    /// As [`ClientTls::new`], presenting the certificate chain in
    /// `cert_file` with the key in `key_file` (both PEM) when asked.
    pub fn with_client_cert(
        ca_file: impl AsRef<Path>,
        cert_file: impl AsRef<Path>,
        key_file: impl AsRef<Path>,
    ) -> Result<ClientTls, ClientError> {
        Self::build(ca_file.as_ref(), Some((cert_file.as_ref(), key_file.as_ref())))
    }

    /// Verify `name` in the broker's certificate, whatever address is dialed.
    pub fn server_name(mut self, name: &str) -> Result<ClientTls, ClientError> {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|_| ClientError::TlsSetup { message: format!("`{name}` is not a DNS name or IP address") })?;
        self.server_name = Some(name);
        Ok(self)
    }

    fn build(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientTls, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in load_certs(ca)? {
            roots.add(cert).map_err(|e| setup_error(ca, format!("not a usable CA certificate: {e}")))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::TlsSetup { message: e.to_string() })?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|e| ClientError::TlsSetup { message: format!("client certificate and key: {e}") })?,
        };
        Ok(ClientTls { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), server_name: None })
    }

    /// The name to verify when dialing `addr` (`host:port`, `[v6]:port`).
    pub(crate) fn name_for(&self, addr: &str) -> Result<ServerName<'static>, ClientError> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned()).map_err(|_| ClientError::TlsSetup {
            message: format!("cannot verify `{host}` (from {addr}) in a certificate; set a server name"),
        })
    }
}

/// Whether an I/O error from a TLS stream is a TLS failure rather than a
/// lost connection (tokio-rustls reports those as `InvalidData`).
pub(crate) fn is_tls_failure(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn ca_file(dir: &Path) -> std::path::PathBuf {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        path
    }

    #[test]
    fn the_name_comes_from_the_address_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        let tls = ClientTls::new(ca_file(dir.path())).unwrap();
        assert_eq!(format!("{:?}", tls.name_for("127.0.0.1:5570").unwrap()), "IpAddress(V4(Ipv4Addr([127, 0, 0, 1])))");
        assert!(matches!(tls.name_for("broker.example:5570").unwrap(), ServerName::DnsName(_)));
        assert!(matches!(tls.name_for("[::1]:5570").unwrap(), ServerName::IpAddress(_)));
        let named = tls.server_name("twinmq").unwrap();
        assert!(matches!(named.name_for("10.0.0.1:1").unwrap(), ServerName::DnsName(d) if d.as_ref() == "twinmq"));
    }

    #[test]
    fn unusable_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClientTls::new(dir.path().join("nope.pem")).unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        assert!(ClientTls::new(&junk).unwrap_err().to_string().contains("no PEM certificate"));
        let err = ClientTls::with_client_cert(ca_file(dir.path()), &junk, &junk).unwrap_err().to_string();
        assert!(err.contains("junk.pem"), "{err}");
    }
}
