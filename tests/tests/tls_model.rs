//! The model over HTTPS, as OpenRouter serves it: the stand-in with `--tls`
//! (a self-signed certificate made at start, ALPN h2 and http/1.1), workers
//! trusting it through NEXUS_MODEL_CA_FILE. Twenty workflows at once must all
//! complete, and the stand-in's own ledger must show that every call came
//! over HTTP/2, that the calls of a worker share its connection (at most one
//! busy connection per worker), and that they overlapped on it (multiplexed
//! streams, not one call at a time).

use nexus_proto::v1::WorkflowStatus;
use nexus_tests::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const WORKFLOWS: usize = 20;
const WORKERS: usize = 2;
const PHASES: usize = 6;

/// A client of the stand-in's control API that trusts only its certificate.
fn https_client(stand_in: &TlsStandIn) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(&stand_in.cert).expect("the stand-in wrote its certificate");
    let roots = reqwest::Certificate::from_pem_bundle(&pem).expect("the certificate is PEM");
    reqwest::Client::builder()
        .tls_certs_only(roots)
        .build()
        .expect("HTTPS client")
}

/// Every call the stand-in has seen, from its control API over HTTPS.
async fn ledger_of(stand_in: &TlsStandIn) -> Vec<Value> {
    https_client(stand_in)
        .get(format!("{}/_stand-in/requests", stand_in.base_url()))
        .send()
        .await
        .expect("the control API answers over HTTPS")
        .json()
        .await
        .expect("the ledger is JSON")
}

/// Most requests open at once on one connection, from the ledger's times.
fn most_concurrent_streams(requests: &[&Value]) -> usize {
    let mut edges: Vec<(u64, i64)> = Vec::new();
    for request in requests {
        let received = request["received_us"].as_u64().unwrap();
        let finished = request["finished_us"].as_u64().filter(|&f| f > 0).unwrap_or(u64::MAX);
        edges.push((received, 1));
        edges.push((finished, -1));
    }
    // At equal times, an end before a start: touching calls did not overlap.
    edges.sort();
    let (mut open, mut most) = (0i64, 0i64);
    for (_, step) in edges {
        open += step;
        most = most.max(open);
    }
    most as usize
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_multiplex_their_model_calls_over_a_few_http2_connections() {
    let redis = RedisServer::start();
    // A slow first token keeps calls open long enough to overlap.
    let model = StandIn::start_tls(&[
        "--first-token-latency-ms",
        "300",
        "--tokens-per-second",
        "2000",
        "--reply-words",
        "30",
    ]);
    assert!(model.base_url().starts_with("https://127.0.0.1:"));
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let ca_file = model.cert.to_str().unwrap();
    let _workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            // One connection per worker (the default is one per 100 calls in
            // flight): this test is about multiplexing over it.
            let env = [("NEXUS_MODEL_CA_FILE", ca_file), ("NEXUS_MODEL_CONNECTIONS", "1")];
            Worker::start(&redis.url(), &model.base_url(), &env)
        })
        .collect();

    let mut client = connect(&orchestrator.endpoint()).await;
    let mut ids = Vec::new();
    for n in 0..WORKFLOWS {
        ids.push(start(&mut client, &format!("TLS shop {n}")).await);
    }
    let finished = futures::future::join_all(ids.iter().map(|id| {
        let mut client = client.clone();
        async move { wait_terminal(&mut client, id, Duration::from_secs(120)).await }
    }))
    .await;
    for workflow in &finished {
        assert_eq!(
            workflow.status(),
            WorkflowStatus::Completed,
            "{}: {:?}",
            workflow.workflow_id,
            workflow.status()
        );
    }

    let ledger = ledger_of(&model).await;
    assert!(
        ledger.len() >= WORKFLOWS * PHASES,
        "{} model calls for {WORKFLOWS} workflows of {PHASES} phases",
        ledger.len()
    );
    let versions: BTreeSet<&str> = ledger.iter().map(|r| r["http_version"].as_str().unwrap()).collect();
    assert_eq!(versions, BTreeSet::from(["HTTP/2.0"]), "every model call over HTTP/2");

    let mut by_connection: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for request in &ledger {
        by_connection
            .entry(request["connection"].as_u64().unwrap())
            .or_default()
            .push(request);
    }
    let calls: Vec<usize> = by_connection.values().map(Vec::len).collect();
    let overlap: Vec<usize> = by_connection.values().map(|r| most_concurrent_streams(r)).collect();
    eprintln!(
        "{} calls over {} connections: calls per connection {calls:?}, most streams open at once {overlap:?}",
        ledger.len(),
        by_connection.len()
    );
    assert!(!by_connection.contains_key(&0), "the stand-in numbers every connection");
    // Each worker keeps one HTTP/2 connection for all its calls. Before its
    // first handshake ends a worker cannot know the connection will be
    // HTTP/2, so calls it starts together on a cold pool may each dial one;
    // hyper keeps the first and the others carry their one call and close.
    let shared = kept_connections(&calls_per_connection(&ledger));
    assert!(
        shared.len() <= WORKERS,
        "{} connections carried several calls, for {WORKERS} workers: {calls:?}",
        shared.len()
    );
    assert!(
        shared.iter().sum::<usize>() * 10 >= ledger.len() * 9,
        "most calls must share the workers' connections: {calls:?}"
    );
    assert!(
        overlap.iter().any(|&most| most >= 4),
        "calls did not overlap on a connection, so nothing was multiplexed: {overlap:?}"
    );
}

/// Without the CA knob the worker does not trust the stand-in's certificate:
/// no call reaches it (TLS is verified, not waved through), and the workflow
/// fails with a reason instead of hanging.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_without_the_certificate_refuses_the_connection() {
    let redis = RedisServer::start();
    let model = StandIn::start_tls(&["--first-token-latency-ms", "5"]);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);

    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Untrusted").await;
    let workflow = wait_terminal(&mut client, &id, Duration::from_secs(60)).await;
    eprintln!("{:?}: {:?}", workflow.status(), workflow.reason);
    assert_eq!(workflow.status(), WorkflowStatus::Failed);

    let ledger = ledger_of(&model).await;
    assert!(ledger.is_empty(), "no call got through the handshake: {ledger:?}");
}

/// Calls on one worker's connections, from the stand-in's ledger: how many
/// each connection carried, by its number.
fn calls_per_connection(ledger: &[Value]) -> BTreeMap<u64, usize> {
    let mut calls: BTreeMap<u64, usize> = BTreeMap::new();
    for request in ledger {
        *calls.entry(request["connection"].as_u64().unwrap()).or_default() += 1;
    }
    calls
}

/// Connections that carried more than one call: the ones kept. (A call
/// started on a cold pool may dial a connection of its own before the first
/// handshake says HTTP/2; hyper keeps one, and such a dial carries one call.)
fn kept_connections(calls: &BTreeMap<u64, usize>) -> Vec<usize> {
    calls.values().copied().filter(|&n| n > 1).collect()
}

/// `workflows` workflows at once on one worker with `env`, all completed;
/// the stand-in's ledger of their calls.
async fn run_on_one_worker(workflows: usize, env: &[(&str, &str)]) -> Vec<Value> {
    let redis = RedisServer::start();
    let model = StandIn::start_tls(&["--first-token-latency-ms", "300", "--reply-words", "5"]);
    let orchestrator = Orchestrator::start(&redis.url(), &[]);
    let ca_file = model.cert.to_str().unwrap();
    let mut env = env.to_vec();
    env.push(("NEXUS_MODEL_CA_FILE", ca_file));
    let _worker = Worker::start(&redis.url(), &model.base_url(), &env);
    let mut client = connect(&orchestrator.endpoint()).await;
    let mut ids = Vec::new();
    for n in 0..workflows {
        ids.push(start(&mut client, &format!("Spread {n}")).await);
    }
    assert_all_completed(&mut client, &ids, Duration::from_secs(120)).await;
    ledger_of(&model).await
}

/// A server allows only so many streams per HTTP/2 connection and makes the
/// rest wait, so a worker spreads its calls over up to
/// `NEXUS_MODEL_CONNECTIONS` connections, opening the next when one carries
/// `NEXUS_MODEL_STREAMS_PER_CONNECTION` calls. Twenty calls at once, four
/// per connection on four (the rest go to the least busy): the ledger shows
/// them on four connections, each kept full.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_worker_spreads_its_calls_over_its_connections() {
    const CONNECTIONS: usize = 4;
    let env = [
        ("NEXUS_MODEL_CONNECTIONS", "4"),
        ("NEXUS_MODEL_STREAMS_PER_CONNECTION", "4"),
    ];
    let ledger = run_on_one_worker(20, &env).await;
    let calls = calls_per_connection(&ledger);
    let kept = kept_connections(&calls);
    assert_eq!(
        kept.len(),
        CONNECTIONS,
        "the worker's calls shared exactly its {CONNECTIONS} connections: {calls:?}"
    );
    assert!(
        kept.iter().all(|&n| n >= ledger.len() / CONNECTIONS / 2),
        "spread evenly: {kept:?}"
    );
}

/// A worker allowed many calls keeps many clients (2,000 calls in flight:
/// 20), but opens a connection only when the ones before it are full: its
/// sixteen calls at once share one connection. (Taking the clients in turn,
/// it dialled one connection per call.)
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_opens_only_the_connections_its_calls_need() {
    let env = [("NEXUS_WORKER_MAX_IN_FLIGHT", "2000")];
    let ledger = run_on_one_worker(16, &env).await;
    let calls = calls_per_connection(&ledger);
    let kept = kept_connections(&calls);
    eprintln!("{} calls over {} connections: {calls:?}", ledger.len(), calls.len());
    assert_eq!(kept.len(), 1, "one connection carried the calls: {calls:?}");
    assert!(
        kept[0] * 10 >= ledger.len() * 9,
        "nearly every call on that connection: {calls:?}"
    );
}
