//! TLS configuration from PEM files, for the server and for clients.
//!
//! rustls with the `ring` provider (no cmake or NASM needed to build it).
//! Certificates and keys are read with `rustls-pki-types`' PEM parser. A
//! client with no CA file trusts the system's roots, read by
//! `rustls-native-certs`, so a CA the administrator installed is honoured.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::RootCertStore;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::WebPkiClientVerifier;

pub use tokio_rustls::rustls::pki_types::ServerName;
pub use tokio_rustls::rustls::{self, ClientConfig, ServerConfig};

/// Why a TLS configuration could not be built: names the file at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (a chain: leaf first). None is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| TlsError(format!("cannot read certificates from {shown}: {err}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError(format!("cannot read certificates from {shown}: {err}")))?;
    if certs.is_empty() {
        return Err(TlsError(format!("no PEM certificate found in {shown}")));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|err| {
        TlsError(format!(
            "cannot read a private key from {}: {err}",
            path.display()
        ))
    })
}

/// The CA certificates in a PEM file, as trust anchors.
fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|err| {
            TlsError(format!(
                "a CA certificate in {} is not usable: {err}",
                path.display()
            ))
        })?;
    }
    Ok(roots)
}

/// The system's trusted roots. Unreadable ones are skipped; none at all is
/// an error.
fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .first()
            .map(|err| format!(" ({err})"))
            .unwrap_or_default();
        return Err(TlsError(format!(
            "no trusted root certificates found on this system{why}; give a CA file"
        )));
    }
    Ok(roots)
}

/// A server configuration: the certificate chain and its key, and, with
/// `client_ca`, mutual TLS (a client must present a certificate signed by a
/// CA in that file).
pub fn server_config(
    cert_chain: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| TlsError(format!("TLS setup failed: {err}")))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
                    .build()
                    .map_err(|err| {
                        TlsError(format!(
                            "cannot verify clients with the CAs in {}: {err}",
                            ca.display()
                        ))
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(load_certs(cert_chain)?, load_key(key)?)
        .map_err(|err| {
            TlsError(format!(
                "the certificate {} and the key {} do not make a server identity: {err}",
                cert_chain.display(),
                key.display()
            ))
        })?;
    Ok(Arc::new(config))
}

/// A client configuration: trusts the CAs in `ca` (else the system's roots)
/// and, with `identity` (certificate chain, key), presents a client
/// certificate for mutual TLS.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca {
        Some(ca) => load_roots(ca)?,
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| TlsError(format!("TLS setup failed: {err}")))?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert_chain, key)) => builder
            .with_client_auth_cert(load_certs(cert_chain)?, load_key(key)?)
            .map_err(|err| {
                TlsError(format!(
                    "the certificate {} and the key {} do not make a client identity: {err}",
                    cert_chain.display(),
                    key.display()
                ))
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Parses a name to check the server's certificate against: a DNS name or
/// an IP address.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned())
        .map_err(|_| TlsError(format!("`{name}` is not a valid TLS server name")))
}
