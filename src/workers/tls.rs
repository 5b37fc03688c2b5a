//! TLS for the coordinator's endpoint (`mount --workers-tls-cert/--workers-tls-key`) and its
//! workers (`--coordinator https://...`, `worker --ca-file`): rustls over the crypto provider
//! the S3 client already builds (aws-lc-rs), so TLS adds no second crypto library. The
//! exchange inside is the same one-request HTTP/1.1 of [`super::http`].

use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certs_of(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The coordinator's TLS: the certificate chain in `cert` (PEM, the server's first) and its
/// private key in `key` (PEM: PKCS#8, PKCS#1 or SEC1).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = certs_of(cert, "--workers-tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--workers-tls-key {}: {e}", key.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("--workers-tls-cert/--workers-tls-key: {e}"))?;
    Ok(Arc::new(cfg))
}

/// A worker's TLS: the coordinator's certificate checked against the CAs in `ca` (PEM), or
/// against the system's roots.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(p) => {
            for c in certs_of(p, "--ca-file")? {
                roots
                    .add(c)
                    .map_err(|e| format!("--ca-file {}: {e}", p.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "no system CA certificates to check the coordinator's with: give the CA \
                     that signed it with --ca-file"
                        .into(),
                );
            }
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The name `host` (`HOST:PORT`, `[V6]:PORT`) the coordinator's certificate must carry.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let name = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(name.to_string()).map_err(|e| format!("{name:?}: {e}"))
}

/// A client's TLS session over `conn`.
pub fn client(
    cfg: &Arc<rustls::ClientConfig>,
    name: &ServerName<'static>,
    conn: TcpStream,
) -> io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let c = rustls::ClientConnection::new(cfg.clone(), name.clone()).map_err(io::Error::other)?;
    Ok(rustls::StreamOwned::new(c, conn))
}

/// A server's TLS session over `conn`.
pub fn server(
    cfg: &Arc<rustls::ServerConfig>,
    conn: TcpStream,
) -> io::Result<rustls::StreamOwned<rustls::ServerConnection, TcpStream>> {
    let c = rustls::ServerConnection::new(cfg.clone()).map_err(io::Error::other)?;
    Ok(rustls::StreamOwned::new(c, conn))
}

/// Whether `e` says the coordinator's certificate was refused (not a transient error).
pub fn refused_certificate(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_to_check_is_the_host_without_its_port() {
        assert_eq!(
            server_name("10.0.0.5:9478").unwrap(),
            ServerName::try_from("10.0.0.5").unwrap()
        );
        assert_eq!(
            server_name("[::1]:9478").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        assert_eq!(
            server_name("coordinator.ns.svc:9478").unwrap(),
            ServerName::try_from("coordinator.ns.svc").unwrap()
        );
        assert!(server_name("bad name:1").is_err());
    }
}
