//! TLS for the HA port, and the PEM and rustls helpers the broker's client
//! port shares (the broker depends on this crate; the client does not, and
//! keeps its own few lines for the client side).
//!
//! rustls with the `ring` provider, chosen explicitly here so that no
//! process-wide default is needed and aws-lc-rs is never built.
//!
//! On the HA link TLS is optional and comes *under* the cluster secret's
//! challenge/response (`wire.rs`), never instead of it: a peer must present
//! a certificate the configured CA signed (when `ha_tls_require_client_cert`
//! is on, also as the dialing side) *and* prove the secret.
//!
//! Which name a dialing node verifies in the peer's certificate: by default
//! the IP address it dialed (`ServerName::IpAddress`), so each node's
//! certificate carries every address the peer dials it on (the dedicated
//! link and the client network) as IP SANs. With `ha_tls_server_name` the
//! dialer verifies that DNS name instead, on every path: one name per node
//! (or one shared by both) and no addresses in the certificates.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::link::LinkError;

fn file_error(path: &Path, message: impl std::fmt::Display) -> LinkError {
    LinkError::TlsFile { path: path.to_path_buf(), message: message.to_string() }
}

/// The process uses ring, whatever other crates may have enabled.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (a chain: the leaf first). At least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, LinkError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate (-----BEGIN CERTIFICATE-----) in the file"));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, LinkError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => file_error(path, "no PEM private key in the file"),
        e => file_error(path, e),
    })
}

/// The trust anchors of a CA file: every certificate in it.
pub fn load_roots(path: &Path) -> Result<RootCertStore, LinkError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// A server configuration presenting `certs`/`key`; with `client_roots`,
/// clients must present a certificate one of those CAs signed (mutual TLS).
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<RootCertStore>,
) -> Result<Arc<ServerConfig>, LinkError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkError::TlsConfig(e.to_string()))?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| LinkError::TlsConfig(format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config =
        builder.with_single_cert(certs, key).map_err(|e| LinkError::TlsConfig(format!("certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

/// A client configuration trusting `roots`; with `identity`, it presents
/// that certificate when the server asks for one.
pub fn client_config(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, LinkError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| LinkError::TlsConfig(format!("certificate and key: {e}")))?,
    };
    Ok(Arc::new(config))
}

/// TLS on the HA port: both sides of it, since each node dials and accepts.
#[derive(Clone)]
pub struct HaTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
    /// The name verified in the peer's certificate; `None`: the IP address dialed.
    pub server_name: Option<ServerName<'static>>,
    /// The accepting side requires a client certificate signed by the CA.
    pub require_client_cert: bool,
}

impl std::fmt::Debug for HaTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaTls")
            .field("server_name", &self.server_name)
            .field("require_client_cert", &self.require_client_cert)
            .finish_non_exhaustive()
    }
}

impl HaTls {
    /// From loaded material: this node's certificate chain and key (served,
    /// and presented as a client certificate), and the CA that signs the peer's.
    pub fn new(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: RootCertStore,
        require_client_cert: bool,
        server_name: Option<ServerName<'static>>,
    ) -> Result<HaTls, LinkError> {
        let server =
            server_config(certs.clone(), key.clone_key(), if require_client_cert { Some(ca.clone()) } else { None })?;
        let client = client_config(ca, Some((certs, key)))?;
        Ok(HaTls {
            acceptor: tokio_rustls::TlsAcceptor::from(server),
            connector: tokio_rustls::TlsConnector::from(client),
            server_name,
            require_client_cert,
        })
    }
}

/// Whether an I/O error out of a TLS stream is a TLS failure (a certificate
/// refused, an alert, bytes that are not TLS) rather than a lost connection.
/// tokio-rustls reports those as `InvalidData`.
pub fn is_tls_failure(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData
}

/// A TCP connection, plain or under TLS: what an HA link runs on.
pub enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl AsyncRead for MaybeTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = load_certs(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.pem"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a pem file\n").unwrap();
        assert!(load_certs(&junk).unwrap_err().to_string().contains("no PEM certificate"));
        assert!(load_key(&junk).unwrap_err().to_string().contains("no PEM private key"));
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused() {
        let one = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["b".into()]).unwrap();
        let certs = vec![one.cert.der().clone()];
        let key = PrivateKeyDer::try_from(other.key_pair.serialize_der()).unwrap();
        assert!(server_config(certs, key, None).is_err());
    }
}
