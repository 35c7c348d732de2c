//! TLS on the gRPC port, from PEM files that are re-read when they change.
//!
//! Why the orchestrator does its own handshakes instead of tonic's
//! `tls_config`: certificates are short-lived (cert-manager, ACME, an
//! internal CA renewing daily), and tonic fixes its TLS configuration at
//! start, so a renewal would take a restart, and a restart ends every open
//! watch stream. Here the current `rustls::ServerConfig` sits behind a lock;
//! [`ReloadingTls::reload`] re-reads the files when their modification time
//! changes (checked every 2 s, like the tokens file) and swaps the new
//! configuration in. New connections get the new certificate, open ones keep
//! the one they were made with. Files that became unreadable or invalid (half
//! written, a key that does not match the certificate) keep the previous
//! configuration and the log says why, rather than taking the port down.
//!
//! With a client CA, the handshake requires a client certificate that CA
//! signed (mutual TLS), before any request reaches a handler. Handshakes run
//! in tasks of their own, with a timeout: a client that never finishes one
//! holds up nobody, and one that fails costs only its own connection.
//! Finished ones reach tonic through a channel. ALPN offers `h2`, and also
//! `http/1.1` when the web tracker is on: a browser fetches the page and
//! speaks gRPC-Web over HTTP/1.1 on the same port.

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the gRPC server to take them.
const READY_BACKLOG: usize = 128;

/// Where the server's certificate and key are, and the client CA if
/// clients must present a certificate.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// TLS is on when both the certificate and the key are given; one without
    /// the other, or a client CA without them, is a mistake worth stopping for.
    pub fn from_settings(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> anyhow::Result<Option<Self>> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(Self { cert, key, client_ca })),
            (None, None) if client_ca.is_none() => Ok(None),
            (None, None) => anyhow::bail!("NEXUS_TLS_CLIENT_CA needs NEXUS_TLS_CERT and NEXUS_TLS_KEY"),
            _ => anyhow::bail!("NEXUS_TLS_CERT and NEXUS_TLS_KEY go together: set both or neither"),
        }
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [
            Some(self.cert.as_path()),
            Some(self.key.as_path()),
            self.client_ca.as_deref(),
        ]
        .into_iter()
        .flatten()
    }

    /// The files' modification times, to notice a change.
    fn stamps(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// A server configuration from the files as they are now. Errors name
    /// the file, never its contents.
    fn server_config(&self, alpn: &[Vec<u8>]) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certificates(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| anyhow::anyhow!("reading a private key from {}: {e}", self.key.display()))?;
        let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            Some(client_ca) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certificates(client_ca)? {
                    roots
                        .add(cert)
                        .with_context(|| format!("a certificate in {} is no CA", client_ca.display()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .with_context(|| format!("client CA {}", client_ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .with_context(|| format!("{} and {}", self.cert.display(), self.key.display()))?;
        config.alpn_protocols = alpn.to_vec();
        Ok(Arc::new(config))
    }
}

fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("reading certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

/// The server's TLS configuration as the files say now; cheap to clone.
#[derive(Clone)]
pub struct ReloadingTls {
    files: Arc<TlsFiles>,
    alpn: Vec<Vec<u8>>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ReloadingTls {
    /// Reads the files once; at start-up, a file that cannot be used stops
    /// the process with the reason. `http1`: also offer HTTP/1.1 by ALPN.
    pub fn load(files: TlsFiles, http1: bool) -> anyhow::Result<Self> {
        let mut alpn = vec![b"h2".to_vec()];
        if http1 {
            alpn.push(b"http/1.1".to_vec());
        }
        let config = files.server_config(&alpn)?;
        Ok(Self {
            files: Arc::new(files),
            alpn,
            current: Arc::new(RwLock::new(config)),
        })
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("TLS config lock").clone())
    }

    /// Re-reads the files whenever one changes, until `shutdown`.
    pub async fn reload(self, shutdown: CancellationToken) {
        let mut seen = self.files.stamps();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let now = self.files.stamps();
            if now == seen {
                continue;
            }
            seen = now;
            match self.files.server_config(&self.alpn) {
                Ok(config) => {
                    *self.current.write().expect("TLS config lock") = config;
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded; new connections use it");
                }
                Err(error) => {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "TLS files not reloaded; keeping the previous certificate"
                    )
                }
            }
        }
    }

    /// Accepts connections on `listener` and hands those whose handshake
    /// succeeded to the gRPC server, until the server drops the stream.
    pub fn incoming(self, listener: TcpListener) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let (ready, incoming) = mpsc::channel(READY_BACKLOG);
        tokio::spawn(self.accept_loop(listener, ready));
        ReceiverStream::new(incoming)
    }

    async fn accept_loop(self, listener: TcpListener, ready: mpsc::Sender<io::Result<TlsStream<TcpStream>>>) {
        loop {
            let accepted = tokio::select! {
                () = ready.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::error!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // As in plaintext: with Nagle on, a response's frames wait for
            // the client's delayed ACK.
            let _ = stream.set_nodelay(true);
            let (acceptor, ready) = (self.acceptor(), ready.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = ready.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    }
}

fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::TlsFiles;
    use std::path::PathBuf;

    #[test]
    fn a_certificate_needs_its_key_and_a_client_ca_needs_both() {
        let path = |name: &str| Some(PathBuf::from(name));
        assert!(TlsFiles::from_settings(None, None, None).unwrap().is_none());
        assert!(
            TlsFiles::from_settings(path("c"), path("k"), path("ca"))
                .unwrap()
                .is_some()
        );
        assert!(TlsFiles::from_settings(path("c"), None, None).is_err());
        assert!(TlsFiles::from_settings(None, path("k"), None).is_err());
        assert!(TlsFiles::from_settings(None, None, path("ca")).is_err());
    }
}
