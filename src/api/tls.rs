//! The TLS listener (`[global.tls]`): the same router as the plain listener, behind rustls.
//! Federation peers reach Hafen here (port 8448 by convention).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tower::ServiceExt;

use crate::{config::TlsConfig, service::Services};

/// Time a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate chain and key the listener presents, reloaded from their files while the
/// server runs (REQUIREMENTS.md A4: certificate renewal without a restart). A new handshake
/// takes whatever is current; open connections keep theirs.
pub struct CertStore {
    certs: std::path::PathBuf,
    key: std::path::PathBuf,
    current: parking_lot::RwLock<Loaded>,
}

struct Loaded {
    key: Arc<rustls::sign::CertifiedKey>,
    /// The files' modification times and sizes when they were read.
    stamp: Option<FileStamp>,
}

type FileStamp = [(std::time::SystemTime, u64); 2];

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("certs", &self.certs)
            .finish()
    }
}

fn stamp(tls_certs: &std::path::Path, tls_key: &std::path::Path) -> Option<FileStamp> {
    let one = |p: &std::path::Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    Some([one(tls_certs)?, one(tls_key)?])
}

/// Read and check the chain and key (the key must belong to the leaf certificate).
fn load(
    certs_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certs_path)
        .and_then(|i| i.collect())
        .map_err(|e| format!("tls.certs {}: {e}", certs_path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.certs {}: no certificate",
            certs_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("tls.key {}: {e}", key_path.display()))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let certified = rustls::sign::CertifiedKey::from_der(certs, key, &provider)
        .map_err(|e| format!("tls: {e}"))?;
    Ok(Arc::new(certified))
}

impl CertStore {
    pub fn open(tls: &TlsConfig) -> Result<Arc<CertStore>, String> {
        let key = load(&tls.certs, &tls.key)?;
        Ok(Arc::new(CertStore {
            certs: tls.certs.clone(),
            key: tls.key.clone(),
            current: parking_lot::RwLock::new(Loaded {
                key,
                stamp: stamp(&tls.certs, &tls.key),
            }),
        }))
    }

    /// Read the files again when they changed since the last read (or always with `force`).
    /// A broken new pair (unreadable, not matching) is reported and the current one stays.
    pub fn reload(&self, force: bool) -> Result<bool, String> {
        let now = stamp(&self.certs, &self.key);
        if !force && now.is_some() && now == self.current.read().stamp {
            return Ok(false);
        }
        let key = load(&self.certs, &self.key)?;
        *self.current.write() = Loaded { key, stamp: now };
        Ok(true)
    }

    /// Check the files every `interval` until `shutdown`.
    pub async fn watch(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            match self.reload(false) {
                Ok(true) => {
                    tracing::info!(certs = %self.certs.display(), "TLS certificate reloaded");
                    last_error = None;
                }
                Ok(false) => {}
                // Said once per distinct problem, not every interval (a renewal may write the
                // two files one after the other).
                Err(e) if last_error.as_deref() != Some(e.as_str()) => {
                    tracing::warn!(error = %e, "TLS certificate not reloaded; the previous one stays in use");
                    last_error = Some(e);
                }
                Err(_) => {}
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().key.clone())
    }
}

/// The acceptor presenting the store's current certificate.
pub fn acceptor(store: Arc<CertStore>) -> Result<tokio_rustls::TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serve until `shutdown` turns true; open connections are closed then too.
pub async fn serve(
    services: Arc<Services>,
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = super::router(services);
    loop {
        let (stream, addr) = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let (acceptor, app, mut stop) = (acceptor.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let service =
                hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo::<SocketAddr>(addr));
                    app.clone().oneshot(req.map(axum::body::Body::new))
                });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            tokio::select! {
                _ = connection => {}
                _ = stop.changed() => {}
            }
        });
    }
}
