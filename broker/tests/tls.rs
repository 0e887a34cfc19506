//! TLS with real `twinmqd` processes and certificates made at run time: on
//! the client port (server verified by CA, mutual TLS refusing foreign and
//! missing client certificates, plaintext refused) and on the HA port
//! (mutual TLS pair that replicates and fails over; a peer with a foreign
//! certificate, or the right certificate and the wrong secret, never joins).

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::pair::{Pair, PairOptions};
use common::tls::Ca;
use common::{drain, Broker, TWINMQD};
use twinmq_client::{AdminClient, Client, ClientError, ClientTls, Destination, Message, SubscribeOptions};

const WAIT: Duration = Duration::from_secs(15);

fn flags(id: &common::tls::Identity, prefix: &str, more: &[&str]) -> Vec<String> {
    let mut v = id.flags(prefix);
    v.extend(more.iter().map(|s| s.to_string()));
    v
}

/// Wait (up to 10 s) until `pattern` occurs `count` times in the broker's log:
/// the broker logs a refusal after sending its alert, so the client may know first.
async fn wait_log(broker: &Broker, pattern: &str, count: usize) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = broker.log();
        if log.matches(pattern).count() >= count || std::time::Instant::now() > deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn start(args: &[String]) -> Broker {
    Broker::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_over_tls_and_plaintext_clients_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.issue(dir.path(), "server", &["127.0.0.1"]);
    let broker = start(&server.flags(""));
    let config = broker.config().tls(ClientTls::new(&ca.pem).unwrap());
    let client = Client::connect(config.clone()).await.unwrap();

    let mut topic = client.subscribe(Destination::topic("news"), SubscribeOptions::default()).await.unwrap();
    let queue = client.producer(Destination::queue("orders"));
    let news = client.producer(Destination::topic("news"));
    let sent: Vec<String> = (0..200).map(|i| format!("tls-{i}")).collect();
    for body in &sent {
        queue.send(Message::persistent(body.clone())).await.unwrap();
    }
    news.send(Message::persistent("headline")).await.unwrap();
    assert_eq!(drain(&mut topic, 1, Duration::from_secs(5)).await, vec!["headline".to_string()]);
    let mut consumer = client.subscribe(Destination::queue("orders"), SubscribeOptions::default()).await.unwrap();
    let got = drain(&mut consumer, sent.len(), Duration::from_secs(5)).await;
    assert_eq!(got, sent, "every message, in order, over TLS");
    client.close().await.unwrap();

    // Admin connections use the same port, hence TLS too.
    let mut admin = AdminClient::connect(&config).await.unwrap();
    assert!(admin.status().await.unwrap().json().contains("\"role\""));
    admin.close().await;

    // A client that does not speak TLS gets nowhere, and the broker says why.
    let plain = broker.config().failover_timeout(Duration::from_secs(60));
    let err = tokio::time::timeout(Duration::from_secs(20), Client::connect(plain)).await.expect("fails fast");
    match err {
        Err(ClientError::Tls { message, .. }) => assert!(message.contains("speaks TLS"), "{message}"),
        other => panic!("a plaintext client must not be served: {:?}", other.map(|_| "connected")),
    }
    let log = wait_log(&broker, "TLS handshake failed", 1).await;
    assert!(log.contains("TLS handshake failed"), "refusal logged with the peer:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_limit_a_tls_client_hears_limit_reached_not_a_tls_failure() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.issue(dir.path(), "server", &["127.0.0.1"]);
    let broker = start(&flags(&server, "", &["--max-connections", "1"]));
    let config = broker.config().tls(ClientTls::new(&ca.pem).unwrap());
    let first = Client::connect(config.clone()).await.unwrap();
    let second = Client::connect(config.failover_timeout(Duration::from_millis(300))).await;
    match second {
        Err(e) => assert_eq!(e.code(), Some(twinmq_client::ErrorCode::LimitReached), "{e}"),
        Ok(_) => panic!("a second connection must be refused"),
    }
    first.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_server_certificate_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let other = Ca::new(dir.path(), "other");
    let server = ca.issue(dir.path(), "server", &["127.0.0.1"]);
    let broker = start(&server.flags(""));

    // Trusting another CA: a clear TLS error, not a retry until failover_timeout.
    let config = broker.config().failover_timeout(Duration::from_secs(60)).tls(ClientTls::new(&other.pem).unwrap());
    let err = tokio::time::timeout(Duration::from_secs(20), Client::connect(config)).await.expect("fails fast");
    match err {
        Err(ClientError::Tls { addr, message }) => {
            assert_eq!(addr, broker.addr.to_string());
            assert!(message.contains("certificate"), "says it is the certificate: {message}");
        }
        other => panic!("expected a TLS error, got {:?}", other.map(|_| "connected")),
    }

    // The right CA but a name the certificate does not carry: refused too.
    let config = broker.config().tls(ClientTls::new(&ca.pem).unwrap().server_name("not-the-broker").unwrap());
    assert!(matches!(Client::connect(config).await, Err(ClientError::Tls { .. })));

    // A TLS client at a plaintext port: also a TLS error, at once.
    let plain_broker = Broker::start(&[]);
    let config = plain_broker.config().failover_timeout(Duration::from_secs(60)).tls(ClientTls::new(&ca.pem).unwrap());
    let err = tokio::time::timeout(Duration::from_secs(20), Client::connect(config)).await.expect("fails fast");
    assert!(matches!(err, Err(ClientError::Tls { .. })), "{:?}", err.map(|_| "connected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_foreign_and_missing_client_certificates_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let other = Ca::new(dir.path(), "other");
    let server = ca.issue(dir.path(), "server", &["127.0.0.1"]);
    let good = ca.issue(dir.path(), "good-client", &["good-client"]);
    let foreign = other.issue(dir.path(), "foreign-client", &["foreign-client"]);
    let broker = start(&flags(&server, "", &["--tls-client-ca", &ca.pem.display().to_string()]));

    let try_publish = |tls: ClientTls| {
        let config = broker.config().failover_timeout(Duration::from_secs(60)).tls(tls);
        async move {
            let client = Client::connect(config).await?;
            client.producer(Destination::queue("guarded")).send(Message::persistent("intruder")).await?;
            Ok::<_, ClientError>(())
        }
    };
    let foreign_tls = ClientTls::with_client_cert(&ca.pem, &foreign.cert, &foreign.key).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), try_publish(foreign_tls)).await.expect("fails fast");
    assert!(matches!(err, Err(ClientError::Tls { .. })), "foreign certificate: {err:?}");
    let err = tokio::time::timeout(Duration::from_secs(20), try_publish(ClientTls::new(&ca.pem).unwrap()))
        .await
        .expect("fails fast");
    assert!(matches!(err, Err(ClientError::Tls { .. })), "no certificate: {err:?}");
    let log = wait_log(&broker, "TLS handshake failed", 2).await;
    assert!(log.matches("TLS handshake failed").count() >= 2, "both refusals logged:\n{log}");
    assert!(log.contains("UnknownIssuer") && log.contains("no certificates"), "each for its reason:\n{log}");

    // The right certificate is served; the queue holds only what it sent.
    let good_tls = ClientTls::with_client_cert(&ca.pem, &good.cert, &good.key).unwrap();
    let client = Client::connect(broker.config().tls(good_tls)).await.unwrap();
    client.producer(Destination::queue("guarded")).send(Message::persistent("welcome")).await.unwrap();
    let mut consumer = client.subscribe(Destination::queue("guarded"), SubscribeOptions::default()).await.unwrap();
    let got = drain(&mut consumer, 10, Duration::from_millis(1000)).await;
    assert_eq!(got, vec!["welcome".to_string()], "nothing from the refused clients was stored");
    client.close().await.unwrap();
}

#[test]
fn unusable_tls_files_are_configuration_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not pem").unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.issue(dir.path(), "server", &["127.0.0.1"]);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(TWINMQD)
            .args(["--data-dir", &dir.path().join("data").display().to_string(), "--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (cert, key, junk) =
        (server.cert.display().to_string(), server.key.display().to_string(), junk.display().to_string());
    for (args, named) in [
        (vec!["--tls-cert", &cert], "`tls_key`"),
        (vec!["--tls-cert", &junk, "--tls-key", &key], "`tls_cert`"),
        (vec!["--tls-cert", &cert, "--tls-key", &junk], "`tls_key`"),
        (vec!["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", "/nonexistent/ca.pem"], "`tls_client_ca`"),
        // The certificate of one key with the key of another.
        (
            vec!["--tls-cert", &cert, "--tls-key", &ca.issue(dir.path(), "x", &["x"]).key.display().to_string()],
            "`tls_key`",
        ),
    ] {
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: exit 2 for a configuration error; stderr: {stderr}");
        assert!(stderr.contains(named), "{args:?}: the error names {named}: {stderr}");
    }
}

/// Pair flags for mutual TLS on the HA port: each node its own certificate.
fn ha_flags(id: &common::tls::Identity, ca: &Ca) -> Vec<String> {
    flags(id, "ha-", &["--ha-tls-ca", &ca.pem.display().to_string(), "--ha-tls-require-client-cert", "true"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_over_mutual_tls_replicates_and_a_kill_of_the_active_loses_no_confirmed_message() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ha-ca");
    // Peers are dialed by IP address: the certificates carry it as a SAN.
    let a = ca.issue(dir.path(), "node-a", &["127.0.0.1"]);
    let b = ca.issue(dir.path(), "node-b", &["127.0.0.1"]);
    let mut pair =
        Pair::start(PairOptions { a_extra: ha_flags(&a, &ca), b_extra: ha_flags(&b, &ca), ..Default::default() }).await;
    pair.wait_a_active_b_in_sync().await;
    assert!(pair.a.log().contains("HA connection up"));

    let client = Client::connect(pair.client_config()).await.unwrap();
    let producer = client.producer(Destination::queue("ha-tls"));
    let mut confirmed = HashSet::new();
    for i in 0..500 {
        let body = format!("m-{i}");
        producer.send(Message::persistent(body.clone())).await.unwrap();
        confirmed.insert(body);
    }
    // Confirmed with durability = replicated: b holds every one of them.
    pair.a.kill9();
    pair.b.wait_for("active", WAIT, |s| s["role"].as_str().is_some_and(|r| r.starts_with("active"))).await;
    for i in 500..600 {
        let body = format!("m-{i}");
        producer.send(Message::persistent(body.clone())).await.unwrap();
        confirmed.insert(body);
    }
    let mut consumer =
        client.subscribe(Destination::queue("ha-tls"), SubscribeOptions::default().prefetch(512)).await.unwrap();
    let received: HashSet<String> =
        drain(&mut consumer, 10_000, Duration::from_millis(1500)).await.into_iter().collect();
    let lost: Vec<&String> = confirmed.difference(&received).collect();
    assert!(lost.is_empty(), "{} confirmed messages lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_certificate_from_another_ca_never_joins() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ha-ca");
    let other = Ca::new(dir.path(), "other-ca");
    let a = ca.issue(dir.path(), "node-a", &["127.0.0.1"]);
    // b knows the secret and trusts the right CA, but its own certificate is foreign.
    let b = other.issue(dir.path(), "node-b", &["127.0.0.1"]);
    let opts = PairOptions { a_extra: ha_flags(&a, &ca), b_extra: ha_flags(&b, &ca), ..Default::default() };
    let mut pair = Pair::start(opts.with_root()).await;
    // A node that never held a copy: only a configured user may force it.
    let cfg = pair.as_root();
    let mut admin = AdminClient::connect_to(&pair.a.client.to_string(), &cfg).await.unwrap();
    admin.promote(true).await.unwrap();
    pair.a.wait_for("active", WAIT, |s| s["role"].as_str().is_some_and(|r| r.starts_with("active"))).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let a_status = pair.a.status().await.unwrap();
    assert_ne!(a_status["peer"]["state"], "up", "a must not accept b: {a_status}");
    let b_status = pair.b.status().await.unwrap();
    assert_eq!(b_status["in_sync"], false, "b received nothing: {b_status}");
    assert_ne!(b_status["role"], "active");
    // a refuses b both ways: b's server certificate when dialing, its client certificate when accepting.
    let log = pair.a.log();
    assert!(log.contains("HA connection refused") && log.contains("TLS"), "refusal logged:\n{log}");
    assert!(log.contains("HA peer refused or failed authentication"), "dial refusal logged:\n{log}");
    assert!(!log.contains("HA connection up"), "no HA connection was ever up:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_right_certificate_and_the_wrong_secret_never_joins() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ha-ca");
    let a = ca.issue(dir.path(), "node-a", &["127.0.0.1"]);
    let b = ca.issue(dir.path(), "node-b", &["127.0.0.1"]);
    let opts = PairOptions {
        a_extra: ha_flags(&a, &ca),
        b_extra: ha_flags(&b, &ca),
        b_secret: Some(common::pair::OTHER_SECRET.into()),
        ..Default::default()
    };
    let mut pair = Pair::start(opts.with_root()).await;
    let cfg = pair.as_root();
    let mut admin = AdminClient::connect_to(&pair.a.client.to_string(), &cfg).await.unwrap();
    admin.promote(true).await.unwrap();
    pair.a.wait_for("active", WAIT, |s| s["role"].as_str().is_some_and(|r| r.starts_with("active"))).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let a_status = pair.a.status().await.unwrap();
    assert_ne!(a_status["peer"]["state"], "up", "TLS alone does not admit a peer: {a_status}");
    assert!(pair.a.log().contains("does not know the cluster secret"), "refusal logged:\n{}", pair.a.log());
    assert_eq!(pair.b.status().await.unwrap()["in_sync"], false);
}

/// One HTTP/1.1 request over `stream`; the whole response as text.
async fn http_request<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut stream: S, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req =
        format!("GET /status HTTP/1.1\r\nHost: twinmq\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_http_endpoint_serves_https_with_the_client_port_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.issue(dir.path(), "server", &["127.0.0.1"]);
    let token = "https-test-token-0123456789";
    let args = flags(&server, "", &["--http-token", token, "--http-tls", "true"]);
    let broker = Broker::start_with_http(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let http = broker.http.unwrap();
    assert!(broker.log().contains("admin HTTP endpoint listening"), "ready means the HTTP port is served too");

    // A client trusting the CA gets the status over HTTPS.
    let roots = twinmq_ha::tls::load_roots(&ca.pem).unwrap();
    let connector = tokio_rustls::TlsConnector::from(twinmq_ha::tls::client_config(roots, None).unwrap());
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tcp = tokio::net::TcpStream::connect(&http).await.unwrap();
    let tls = connector.connect(name.clone(), tcp).await.expect("the HTTPS handshake succeeds");
    let response = http_request(tls, token).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"role\""), "{response}");

    // Plain HTTP gets no answer from it.
    let response = http_request(tokio::net::TcpStream::connect(&http).await.unwrap(), token).await;
    assert!(!response.contains("\"role\""), "plain HTTP must not be served: {response}");

    // A client trusting another CA cannot complete the handshake.
    let other = Ca::new(dir.path(), "other");
    let roots = twinmq_ha::tls::load_roots(&other.pem).unwrap();
    let connector = tokio_rustls::TlsConnector::from(twinmq_ha::tls::client_config(roots, None).unwrap());
    let tcp = tokio::net::TcpStream::connect(&http).await.unwrap();
    assert!(connector.connect(name, tcp).await.is_err(), "a foreign CA is refused");

    // http_tls without a certificate is a configuration error naming the key.
    let out = std::process::Command::new(TWINMQD)
        .args(["--data-dir", &dir.path().join("d2").display().to_string(), "--listen", "127.0.0.1:0"])
        .args(["--http-listen", "127.0.0.1:9", "--http-tls", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`http_tls`"), "{stderr}");
}
