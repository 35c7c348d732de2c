//! HTTPS as OpenRouter serves it: TLS offering HTTP/2 and HTTP/1.1 by ALPN, so a client
//! multiplexes its calls over a few connections. The certificate is self-signed and made at
//! start (ECDSA P-256, for `localhost`, `127.0.0.1` and `::1`); clients trust it by its PEM.
//!
//! Handshakes run in tasks of their own, so a client that connects and never says hello holds
//! up nobody; only finished handshakes reach the HTTP server, which tells HTTP/2 from HTTP/1.1
//! by the connection preface.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The certificate's subject, which says what it is, like everything the stand-in writes.
const SUBJECT: &str = "Nexus stand-in model (self-signed, not OpenRouter)";
/// Finished handshakes waiting for the HTTP server to take them.
const READY_BACKLOG: usize = 128;

/// A certificate made at start and the server configuration that presents it.
#[derive(Clone)]
pub struct SelfSignedTls {
    cert_pem: String,
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for SelfSignedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSignedTls").finish_non_exhaustive()
    }
}

impl SelfSignedTls {
    /// Makes a fresh key and certificate for the loopback names, with ALPN `h2` then
    /// `http/1.1`, on rustls' ring provider.
    pub fn generate() -> io::Result<Self> {
        let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
        let mut params = rcgen::CertificateParams::new(names).map_err(io::Error::other)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, SUBJECT);
        let signing_key = rcgen::KeyPair::generate().map_err(io::Error::other)?;
        let cert = params.self_signed(&signing_key).map_err(io::Error::other)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .map_err(io::Error::other)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            cert_pem: cert.pem(),
            config: Arc::new(config),
        })
    }

    /// The certificate in PEM, for clients to add as a trusted root.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub(crate) fn listener(&self, tcp: TcpListener) -> io::Result<TlsListener> {
        let local_addr = tcp.local_addr()?;
        let (ready_tx, ready) = mpsc::channel(READY_BACKLOG);
        let acceptor = TlsAcceptor::from(self.config.clone());
        let accepting = tokio::spawn(accept_loop(tcp, acceptor, ready_tx));
        Ok(TlsListener {
            local_addr,
            ready,
            accepting,
        })
    }
}

/// Connections whose TLS handshake has finished, for `axum::serve`.
pub(crate) struct TlsListener {
    local_addr: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accepting: JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop only ends when this listener drops it.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

async fn accept_loop(tcp: TcpListener, acceptor: TlsAcceptor, ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::error!(%err, "accept failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // No Nagle, as in plain mode: a streamed answer is many small writes.
        let _ = stream.set_nodelay(true);
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(err)) => tracing::debug!(%peer, %err, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_is_pem_and_alpn_prefers_h2() {
        let tls = SelfSignedTls::generate().unwrap();
        assert!(tls.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(tls.config.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    }
}
