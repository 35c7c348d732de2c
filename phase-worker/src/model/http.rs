//! The HTTP side of a try: building the reqwest client (TLS roots, HTTP/2 pings), the
//! endpoint and fixed headers, the request encoded once per call, sending it, and turning a
//! non-2xx response or a transport failure into a [`ModelError`].
//!
//! Reading a successful response's body is `stream`'s job; this file ends where the status
//! says the stream has begun.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use secrecy::ExposeSecret;
use tokio::time::Instant;

use super::call::ChatRequest;
use super::client::ModelClient;
use super::config::ModelClientConfig;
use super::error::{ModelError, TimeoutKind, describe_reqwest_error, http_error};
use super::lanes::Lease;
use super::retry::parse_retry_after;
use super::wire::encode_request;

const CHAT_PATH: &str = "/api/v1/chat/completions";
const GENERATION_ID_HEADER: &str = "x-generation-id";
const TRACEPARENT_HEADER: &str = "traceparent";
/// Most of an error response's body that is read; the rest is dropped unread.
const MAX_ERROR_BODY_BYTES: usize = 16 * 1024;
// Over TLS, ALPN picks HTTP/2 when the server offers it (OpenRouter does), and then every
// call of this client is a stream on one shared connection. One connection that died
// silently (a dropped NAT entry, a vanished peer) would take every call with it until the TCP
// retransmission timeout, minutes later; pings find it within interval + timeout, close it,
// and the failed tries retry on a new one.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// reqwest is built without a default TLS crypto provider; this installs ring's. Safe to call
/// any number of times: "already installed" is not an error.
pub fn install_crypto_provider() {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS settings every reqwest client of a worker shares: the platform's roots plus
/// those of the CA file, ALPN offering HTTP/2 then HTTP/1.1 (as reqwest sets it). Built once:
/// a worker holds a client per `connections` (one per 100 calls in flight), and each client
/// building its own loaded and copied the system's roots again, 85 KB and 5 ms apiece (17 MB
/// and a second of start-up for 20,000 calls in flight). Clones share the verifier and the
/// session cache.
pub(super) fn tls_config(config: &ModelClientConfig) -> Result<rustls::ClientConfig, ModelError> {
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let verifier = match &config.ca_file {
        None => rustls_platform_verifier::Verifier::new(provider.clone()),
        Some(path) => rustls_platform_verifier::Verifier::new_with_extra_roots(ca_roots(path)?, provider.clone()),
    }
    .map_err(|e| ModelError::Config(format!("TLS roots: {e}")))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| ModelError::Config(format!("TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// The certificates of a CA file (PEM), trusted beside the platform's.
fn ca_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, ModelError> {
    let unusable = |why: String| ModelError::Config(format!("model CA file {}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| unusable(e.to_string()))?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unusable(format!("not a PEM certificate bundle ({e})")))?;
    if roots.is_empty() {
        return Err(unusable("no PEM certificate in it".into()));
    }
    Ok(roots)
}

/// A reqwest client for `config` on the shared `tls`: its connect timeout and HTTP/2 pings.
pub(super) fn build_http_client(
    config: &ModelClientConfig,
    tls: &rustls::ClientConfig,
) -> Result<reqwest::Client, ModelError> {
    reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(H2_PING_INTERVAL)
        .http2_keep_alive_timeout(H2_PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .tls_backend_preconfigured(tls.clone())
        .build()
        .map_err(|e| ModelError::Config(describe_reqwest_error(e)))
}

/// The chat completions URL under `base_url`: OpenRouter's path under a
/// bare host, or `/chat/completions` under a base that already names its API
/// version (`http://localhost:8000/v1`, as vLLM, llama.cpp's server, Ollama
/// and OpenAI itself document theirs).
/// Parsed once: parsing it for every request (host, IDNA) was 4% of the
/// worker's CPU.
pub(super) fn endpoint(base_url: &str) -> Result<reqwest::Url, ModelError> {
    let base = base_url.trim_end_matches('/');
    let endpoint = match base.ends_with("/v1") {
        true => format!("{base}/chat/completions"),
        false => format!("{base}{CHAT_PATH}"),
    };
    reqwest::Url::parse(&endpoint).map_err(|e| ModelError::Config(format!("model base URL is not a valid URL: {e}")))
}

/// The headers every request carries: content types, the key (marked sensitive) and
/// OpenRouter's attribution.
pub(super) fn request_headers(config: &ModelClientConfig) -> Result<HeaderMap, ModelError> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
    if let Some(key) = &config.api_key {
        let mut value = HeaderValue::try_from(format!("Bearer {}", key.expose_secret()))
            .map_err(|_| ModelError::Config("the API key has characters not allowed in a header".into()))?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    let optional = [("http-referer", &config.http_referer), ("x-title", &config.app_title)];
    for (name, value) in optional {
        if let Some(value) = value {
            let value = HeaderValue::try_from(value.as_str())
                .map_err(|_| ModelError::Config(format!("{name} is not a valid header value")))?;
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    Ok(headers)
}

/// A request ready to send by one try: encoded for it (a retry encodes the
/// request again), its body taken when sent. It holds only what is its
/// own, the body and its `traceparent`; the client's fixed
/// headers join them as each try is sent (a copy of them kept per call was
/// 1.6 KB of every call in flight).
pub(super) struct Prepared {
    /// Taken by the try that sends it.
    body: Option<bytes::Bytes>,
    traceparent: Option<HeaderValue>,
}

impl Prepared {
    /// Makes the request the one the try of `span` sends: its `traceparent`
    /// header names that span (kept as prepared when spans are not exported).
    pub(super) fn join_span(&mut self, span: &tracing::Span) {
        let traceparent = nexus_runtime::telemetry::traceparent_of(span).and_then(|v| HeaderValue::from_str(&v).ok());
        if traceparent.is_some() {
            self.traceparent = traceparent;
        }
    }
}

/// The provider's id for this generation, when it sent one.
pub(super) fn generation_id(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(GENERATION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl ModelClient {
    /// Encodes `request`, with its caller's `traceparent`.
    pub(super) fn prepare(&self, request: &ChatRequest) -> Result<Prepared, ModelError> {
        let traceparent = request
            .traceparent
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok());
        Ok(Prepared {
            body: Some(encode_request(request)?.into()),
            traceparent,
        })
    }

    /// The fixed headers and the request's `traceparent`.
    fn headers_for(&self, prepared: &Prepared) -> HeaderMap {
        let mut headers = self.headers.clone();
        if let Some(value) = &prepared.traceparent {
            headers.insert(HeaderName::from_static(TRACEPARENT_HEADER), value.clone());
        }
        headers
    }

    /// Sends the request on the leased client; a non-2xx answer becomes the matching error.
    /// The body goes to the HTTP client, which drops it once the response's headers have
    /// come: kept here, a call held open for minutes would hold its prompt a second time
    /// (a retry encodes it again).
    pub(super) async fn send(
        &self,
        lease: &Lease<'_>,
        prepared: &mut Prepared,
        first_token_due: Instant,
    ) -> Result<reqwest::Response, ModelError> {
        let headers = self.headers_for(prepared);
        let body = prepared.body.take().expect("a try's body is sent once");
        let request = lease
            .client
            .post(self.endpoint.clone())
            .headers(headers)
            .body(body)
            .send();
        let response = tokio::time::timeout_at(first_token_due, request)
            .await
            .map_err(|_| self.first_token_timeout())?
            .map_err(|e| self.transport_error(e))?;
        tracing::Span::current().record("http.response.status_code", response.status().as_u16());
        if response.status().is_success() {
            return Ok(response);
        }
        Err(self.error_from_response(response).await)
    }

    async fn error_from_response(&self, response: reqwest::Response) -> ModelError {
        let status = response.status().as_u16();
        let retry_after = parse_retry_after(response.headers(), SystemTime::now());
        let body = tokio::time::timeout(self.config.idle_timeout, read_bounded(response, MAX_ERROR_BODY_BYTES))
            .await
            .unwrap_or_default();
        // Scrubbed before any excerpt is cut, so no part of a key survives.
        http_error(status, &self.redact_text(body), retry_after)
    }

    pub(super) fn first_token_timeout(&self) -> ModelError {
        ModelError::Timeout {
            which: TimeoutKind::FirstToken,
            after: self.config.first_token_timeout,
        }
    }

    pub(super) fn transport_error(&self, error: reqwest::Error) -> ModelError {
        if error.is_connect() && error.is_timeout() {
            let after = self.config.connect_timeout;
            return ModelError::Timeout {
                which: TimeoutKind::Connect,
                after,
            };
        }
        ModelError::Transport(describe_reqwest_error(error))
    }
}

/// Up to `limit` bytes of a response body, as text; the rest is not read.
async fn read_bounded(response: reqwest::Response, limit: usize) -> String {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(Ok(chunk)) = chunks.next().await {
        let room = limit - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_path() {
        let dir = std::env::temp_dir().join(format!("nexus-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let missing = dir.join("missing.pem");
        for (path, why) in [(&empty, "no PEM certificate in it"), (&missing, "No such file")] {
            let config = ModelClientConfig {
                ca_file: Some(path.clone()),
                ..ModelClientConfig::default()
            };
            let error = tls_config(&config).unwrap_err().to_string();
            assert!(
                error.contains(&path.display().to_string()) && error.contains(why),
                "{error}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shared_tls_config_offers_http2_first() {
        install_crypto_provider();
        let tls = tls_config(&ModelClientConfig::default()).unwrap();
        assert_eq!(tls.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    #[test]
    fn headers_carry_the_key_only_when_set() {
        let anonymous = ModelClientConfig::default();
        assert!(request_headers(&anonymous).unwrap().get(AUTHORIZATION).is_none());
        let config = ModelClientConfig {
            api_key: Some("sk-or-TESTSECRET".into()),
            app_title: Some("Nexus".into()),
            ..ModelClientConfig::default()
        };
        let headers = request_headers(&config).unwrap();
        assert!(headers[AUTHORIZATION].is_sensitive());
        assert_eq!(headers["x-title"], "Nexus");
    }

    #[test]
    fn endpoint_appends_the_chat_path_once() {
        let expected = "http://127.0.0.1:1/api/v1/chat/completions";
        assert_eq!(endpoint("http://127.0.0.1:1/").unwrap().as_str(), expected);
        assert_eq!(endpoint("http://127.0.0.1:1/api/v1").unwrap().as_str(), expected);
        assert_eq!(
            endpoint("http://localhost:8000/v1/").unwrap().as_str(),
            "http://localhost:8000/v1/chat/completions",
            "an OpenAI-style base keeps its own version path"
        );
        assert!(matches!(endpoint("not a url"), Err(ModelError::Config(_))));
    }
}
