//! HTTPS on the stand-in: a client that trusts the certificate made at start
//! gets HTTP/2 by ALPN and runs its calls as streams of one connection; a
//! client that only speaks HTTP/1.1 still gets through. The request ledger
//! says which HTTP version and which connection each call used.

use serde_json::{Value, json};
use stand_in_model::{SelfSignedTls, StandInConfig};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::net::TcpListener;

struct Server {
    base_url: String,
    cert_pem: String,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_tls() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let tls = SelfSignedTls::generate().unwrap();
    let config = StandInConfig {
        first_token_latency: Duration::from_millis(200),
        tokens_per_second: 0.0,
        reply_words: 5,
        ..StandInConfig::default()
    };
    let cert_pem = tls.cert_pem().to_string();
    let task = tokio::spawn(async move { stand_in_model::serve_tls(listener, config, &tls).await });
    Server {
        base_url,
        cert_pem,
        task,
    }
}

fn client(cert_pem: &str, http1_only: bool) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let roots = reqwest::Certificate::from_pem_bundle(cert_pem.as_bytes()).unwrap();
    let builder = reqwest::Client::builder().tls_certs_only(roots);
    let builder = if http1_only { builder.http1_only() } else { builder };
    builder.build().unwrap()
}

async fn chat(client: &reqwest::Client, base_url: &str) -> Value {
    let body = json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    let response = client
        .post(format!("{base_url}/api/v1/chat/completions"))
        .bearer_auth("sk-test")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.unwrap()
}

async fn ledger(client: &reqwest::Client, base_url: &str) -> Vec<Value> {
    let url = format!("{base_url}/_stand-in/requests");
    client.get(url).send().await.unwrap().json().await.unwrap()
}

fn versions_and_connections(requests: &[Value]) -> (BTreeSet<String>, BTreeSet<u64>) {
    let versions = requests.iter().map(|r| r["http_version"].as_str().unwrap().to_string());
    let connections = requests.iter().map(|r| r["connection"].as_u64().unwrap());
    (versions.collect(), connections.collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_http2_connection() {
    let server = start_tls().await;
    let h2 = client(&server.cert_pem, false);
    // One call first: on a cold pool a client cannot know before ALPN that
    // the connection will be HTTP/2, so calls started together may each dial
    // one (hyper keeps only the first; the others serve their one call).
    chat(&h2, &server.base_url).await;
    let answers = futures_join(&h2, &server.base_url, 8).await;
    assert!(
        answers
            .iter()
            .all(|a| a["choices"][0]["message"]["content"].is_string())
    );
    let (versions, connections) = versions_and_connections(&ledger(&h2, &server.base_url).await);
    assert_eq!(versions, BTreeSet::from(["HTTP/2.0".to_string()]));
    assert_eq!(
        connections.len(),
        1,
        "9 calls, 8 of them at once, on one connection: {connections:?}"
    );
    assert!(!connections.contains(&0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_counts_the_most_calls_open_at_once() {
    let server = start_tls().await;
    let h2 = client(&server.cert_pem, false);
    let counts = |client: reqwest::Client, base_url: String| async move {
        let url = format!("{base_url}/_stand-in/requests/counts");
        let counts: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        (counts["open"].as_u64().unwrap(), counts["peak_open"].as_u64().unwrap())
    };
    chat(&h2, &server.base_url).await;
    futures_join(&h2, &server.base_url, 6).await;
    futures_join(&h2, &server.base_url, 2).await;
    // Each call waits 200 ms for its first token, so the six overlap.
    assert_eq!(counts(h2.clone(), server.base_url.clone()).await, (0, 6));
    let clear = h2.delete(format!("{}/_stand-in/requests", server.base_url));
    clear.send().await.unwrap();
    chat(&h2, &server.base_url).await;
    assert_eq!(
        counts(h2, server.base_url.clone()).await,
        (0, 1),
        "a cleared ledger counts anew"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_gets_http1_over_tls() {
    let server = start_tls().await;
    let h1 = client(&server.cert_pem, true);
    futures_join(&h1, &server.base_url, 3).await;
    let (versions, connections) = versions_and_connections(&ledger(&h1, &server.base_url).await);
    assert_eq!(versions, BTreeSet::from(["HTTP/1.1".to_string()]));
    assert_eq!(connections.len(), 3, "HTTP/1.1 needs a connection per call in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_certificate_is_refused() {
    let server = start_tls().await;
    let stranger = SelfSignedTls::generate().unwrap();
    let result = client(stranger.cert_pem(), false)
        .get(format!("{}/_stand-in/health", server.base_url))
        .send()
        .await;
    assert!(
        result.is_err(),
        "a certificate made by another stand-in must not verify"
    );
}

/// `n` chat calls at once (spawned, so they really overlap).
async fn futures_join(client: &reqwest::Client, base_url: &str, n: usize) -> Vec<Value> {
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let (client, base_url) = (client.clone(), base_url.to_string());
            tokio::spawn(async move { chat(&client, &base_url).await })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    answers
}
