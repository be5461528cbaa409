//! TLS material: PEM files → rustls configs, for the https listener and for https upstreams.
//!
//! The server side offers HTTP/2 and HTTP/1.1 by ALPN and, with `[tls] client_ca`, verifies
//! client certificates signed by that CA. With `client_auth = "optional"` (the default) a client
//! without a certificate may still connect (the load balancer has none); it is just not a
//! verified peer, so hop headers from it are refused (docs/routing.md). With `"required"` its
//! handshake fails. The client side, toward peer routers and the Loom whose URLs are
//! `https://`, presents this router's own certificate and trusts `client_ca` (peers) and
//! `[loom] ca` (Loom). Both use the ring provider, explicitly, so no process-wide default is
//! needed.
//!
//! This file reads files and builds configs; it does not accept connections (`proxy/listener.rs`)
//! or send requests (`http/forward.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ClientAuth, Config};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{key}: {path} holds no certificate")]
    NoCertificate { key: &'static str, path: PathBuf },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls.client_ca: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("listen.https: an https listener needs a [tls] section")]
    NoServerConfig,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        key: "tls.key",
        path: path.to_owned(),
        source,
    })
}

fn roots(key: &'static str, path: &Path, store: &mut RootCertStore) -> Result<(), TlsError> {
    for cert in certificates(key, path)? {
        store.add(cert)?;
    }
    Ok(())
}

/// The https listener's config, if `[tls]` is set.
pub fn server_config(config: &Config) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let chain = certificates("tls.cert", &tls.cert)?;
    let key = private_key(&tls.key)?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let mut server = match &tls.client_ca {
        Some(ca) => {
            let mut store = RootCertStore::empty();
            roots("tls.client_ca", ca, &mut store)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider());
            let verifier = match tls.client_auth {
                // The load balancer connects without a certificate; only peers present one.
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                // nginx's `ssl_verify_client on`: no certificate from client_ca, no handshake.
                ClientAuth::Required => verifier,
            }
            .build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
    };
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(server)))
}

/// The client config for https upstreams: trusts `client_ca` (peer routers) and `[loom] ca`,
/// and presents this router's certificate when `[tls]` is set.
pub fn client_config(config: &Config) -> Result<Arc<ClientConfig>, TlsError> {
    let mut store = RootCertStore::empty();
    if let Some(ca) = config.tls.as_ref().and_then(|t| t.client_ca.as_ref()) {
        roots("tls.client_ca", ca, &mut store)?;
    }
    if let Some(ca) = &config.loom.ca {
        roots("loom.ca", ca, &mut store)?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store);
    let client = match &config.tls {
        Some(tls) => builder
            .with_client_auth_cert(certificates("tls.cert", &tls.cert)?, private_key(&tls.key)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(client))
}
