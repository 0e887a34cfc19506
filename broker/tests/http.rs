//! The admin HTTP endpoint on real `twinmqd` processes: `/status` on both
//! nodes of a pair, `/metrics` counting real traffic, `/series` sampling
//! it, the credential, `POST /switchover` moving the role, the pair's
//! events surviving a node's restart (learned back from its peer), and the
//! status page rendered by headless Chromium with its charts and events
//! table (its screenshots are kept in `target/test-output/`).
//!
//! Chromium comes from Debian's `chromium` package (`.ci/run` installs it).
//! Without it the browser checks fail, unless `TWINMQ_SKIP_BROWSER=1`.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pair::{Pair, PairOptions};
use twinmq_client::{Client, Destination, Message, SubscribeOptions};

const TOKEN: &str = "http-test-token-0123456789";
const WAIT: Duration = Duration::from_secs(15);

/// One HTTP/1.1 response: status, headers (lower-case names), body.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    /// User name and password.
    Basic(&'a str, &'a str),
}

/// A plain HTTP request over a fresh connection (`Connection: close`).
fn request(addr: SocketAddr, method: &str, path: &str, auth: Auth) -> Response {
    request_with(addr, method, path, auth, &format!("Host: {addr}\r\n"))
}

/// The same with the given header lines (`Host` among them, or not).
fn request_with(addr: SocketAddr, method: &str, path: &str, auth: Auth, headers: &str) -> Response {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = match auth {
        Auth::None => String::new(),
        Auth::Bearer(t) => format!("Authorization: Bearer {t}\r\n"),
        Auth::Basic(u, p) => format!("Authorization: Basic {}\r\n", base64(format!("{u}:{p}").as_bytes())),
    };
    write!(s, "{method} {path} HTTP/1.1\r\n{headers}{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    assert!(
        !headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")),
        "this little client reads sized bodies only"
    );
    Response { status, headers, body: body.to_string() }
}

async fn call(addr: SocketAddr, method: &'static str, path: &'static str, auth: Auth<'static>) -> Response {
    tokio::task::spawn_blocking(move || request(addr, method, path, auth)).await.unwrap()
}

async fn series(addr: SocketAddr) -> serde_json::Value {
    let r = call(addr, "GET", "/series", Auth::Bearer(TOKEN)).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

/// The numbers of a `/series` list (its nulls left out).
fn numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().filter_map(serde_json::Value::as_f64).collect()
}

/// The depth series of `name` in a `/series` report, if charted.
fn depth_of(report: &serde_json::Value, name: &str) -> Option<Vec<f64>> {
    report["depth"].as_array().unwrap().iter().find(|d| d["name"] == name).map(|d| numbers(&d["points"]))
}

/// Whether `/status`'s `events` hold one of `kind` recorded on `node`.
fn has_event(status: &serde_json::Value, node: &str, kind: &str) -> bool {
    status["events"].as_array().is_some_and(|es| es.iter().any(|e| e["node"] == node && e["kind"] == kind))
}

/// The chart `id` in the page's DOM: how many points it drew.
fn chart_points(dom: &str, id: &str) -> usize {
    let at = dom.find(&format!("data-chart=\"{id}\"")).unwrap_or_else(|| panic!("no chart {id} in the page:\n{dom}"));
    let tag = &dom[dom[..at].rfind('<').unwrap()..at + dom[at..].find('>').unwrap()];
    let start = tag.find("data-points=\"").unwrap_or_else(|| panic!("chart {id} has no data-points: {tag}")) + 13;
    tag[start..].split('"').next().unwrap().parse().unwrap()
}

/// The page's events table holds a row of `kind` recorded on `node`.
fn assert_event_row(dom: &str, node: &str, kind: &str) {
    let needle = format!("class=\"event\" data-node=\"{node}\" data-kind=\"{kind}\"");
    assert!(dom.contains(&needle), "no {kind} event of {node} in the page's table (`{needle}`); DOM:\n{dom}");
}

async fn status(addr: SocketAddr) -> serde_json::Value {
    let r = call(addr, "GET", "/status", Auth::Bearer(TOKEN)).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

/// Poll `/status` until `pred` holds.
async fn wait_status(addr: SocketAddr, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(addr).await;
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{addr}: not {what} within {WAIT:?}; last status {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Standard base64 (the test's own, so the broker's decoder is checked against something else).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Parse Prometheus/OpenMetrics text into (series, value), skipping comments.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {l:?}"));
            (series.to_string(), value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect()
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v).unwrap_or_else(|| panic!("no series {series}"))
}

async fn metrics(addr: SocketAddr) -> Vec<(String, f64)> {
    let r = call(addr, "GET", "/metrics", Auth::Basic("prometheus", TOKEN)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/openmetrics-text")), "{r:?}");
    assert!(r.body.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    parse_metrics(&r.body)
}

/// Where screenshots go: `<target>/test-output/`.
fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("test-output");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The Chromium binary, or `None` when the browser checks are skipped.
fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].iter().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() {
        if std::env::var("TWINMQ_SKIP_BROWSER").as_deref() == Ok("1") {
            println!("SKIPPED: browser checks (no chromium; TWINMQ_SKIP_BROWSER=1)");
            return None;
        }
        panic!("chromium is not installed: `apt-get install chromium` (as .ci/run does) or set TWINMQ_SKIP_BROWSER=1");
    }
    found
}

/// Run headless Chromium on `url` with `what` (`--dump-dom` or `--screenshot=...`); returns stdout.
fn run_chromium(browser: &Path, url: &str, what: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            // Tall enough for the charts and the newest events below the nodes.
            "--window-size=1200,1500",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(what)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(status.success(), "chromium failed ({status}) on {url}:\n{err}");
    reader.join().unwrap()
}

/// The page's rendered DOM must show `node` in `role`.
fn assert_shows(dom: &str, node: &str, role: &str) {
    let needle = format!("data-node=\"{node}\" data-role=\"{role}\"");
    assert!(
        dom.contains(&needle),
        "the status page does not show {node} as {role} (looked for `{needle}`); DOM:\n{dom}"
    );
}

/// Load the page of the node at `addr` in the browser: check it shows both
/// nodes' roles and passes `check` on its DOM, and save a screenshot as
/// `name`. Returns the screenshot path.
async fn check_page(
    addr: SocketAddr,
    expect: [(&str, &str); 2],
    check: impl FnOnce(&str) + Send + 'static,
    name: &str,
) -> Option<PathBuf> {
    let browser = chromium()?;
    // Basic credentials in the URL: Chromium answers the page's 401 challenge with
    // them and reuses them for the page's own fetches of /status.
    let url = format!("http://operator:{TOKEN}@{addr}/");
    let shot = output_dir().join(name);
    let _ = std::fs::remove_file(&shot);
    let expect: Vec<(String, String)> = expect.iter().map(|(n, r)| (n.to_string(), r.to_string())).collect();
    let shot2 = shot.clone();
    tokio::task::spawn_blocking(move || {
        let dom = run_chromium(&browser, &url, &["--dump-dom".to_string()]);
        for (node, role) in &expect {
            assert_shows(&dom, node, role);
        }
        check(&dom);
        run_chromium(&browser, &url, &[format!("--screenshot={}", shot2.display())]);
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5_000, "{} is not a real PNG", shot.display());
    println!("status page screenshot: {}", shot.display());
    Some(shot)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoint_shows_both_nodes_counts_traffic_and_switches_over() {
    let extra = vec!["--http-token".to_string(), TOKEN.to_string()];
    let mut pair = Pair::start(PairOptions { http: true, extra, ..Default::default() }).await;
    pair.wait_a_active_b_in_sync().await;
    let (a, b) = (pair.a.http.unwrap(), pair.b.http.unwrap());

    // The credential: missing or wrong gets 401 with a JSON error and a Basic challenge.
    for path in ["/status", "/metrics", "/"] {
        let r = call(a, "GET", path, Auth::None).await;
        assert_eq!(r.status, 401, "{path} without a credential: {r:?}");
        assert!(r.json()["error"].as_str().unwrap().contains("credential required"), "{r:?}");
        assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"twinmq\""));
    }
    let r = call(a, "GET", "/status", Auth::Bearer("not-the-token-at-all")).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (401, Some("wrong credential")));
    let r = call(a, "GET", "/status", Auth::Basic("operator", "not-the-token-at-all")).await;
    assert_eq!(r.status, 401);
    let r = call(a, "POST", "/switchover", Auth::None).await;
    assert_eq!(r.status, 401, "switchover without a credential: {r:?}");
    let r = call(a, "GET", "/switchover", Auth::Bearer(TOKEN)).await;
    assert_eq!(r.status, 405, "{r:?}");
    let r = call(a, "GET", "/nowhere", Auth::Bearer(TOKEN)).await;
    assert_eq!(r.status, 404, "{r:?}");

    // /status on both nodes: each shows itself and its peer, the gateway and the sync state.
    // The peer's role as node-a last heard it: passive-syncing for the
    // heartbeat after the vote (CI saw it 20 ms before `passive`).
    let sa = wait_status(a, "seeing the gateway and a passive peer", |s| {
        s["gateway"]["reachable"] == true && s["peer"]["role"] == "passive"
    })
    .await;
    assert_eq!((sa["node_id"].as_str(), sa["role"].as_str()), (Some("node-a"), Some("active")), "{sa}");
    assert_eq!(sa["peer"]["node_id"], "node-b", "{sa}");
    assert_eq!(sa["peer"]["role"], "passive", "{sa}");
    assert_eq!(sa["peer"]["state"], "up", "{sa}");
    assert_eq!(sa["gateway"]["target"], pair.gateway.url(), "{sa}");
    assert_eq!(sa["gateway"]["reachable"], true, "{sa}");
    assert!(sa["sync_lag"].is_u64() && sa["queues"].is_array(), "{sa}");
    let sb = wait_status(b, "showing its peer in sync", |s| s["peer"]["sees_gateway"] == true).await;
    assert_eq!((sb["node_id"].as_str(), sb["role"].as_str()), (Some("node-b"), Some("passive")), "{sb}");
    assert_eq!(sb["in_sync"], true, "{sb}");
    assert_eq!(sb["peer"]["node_id"], "node-a", "{sb}");
    assert_eq!(sb["peer"]["role"], "active", "{sb}");
    assert!(sb["peer"]["in_sync"].is_boolean() && sb["peer"]["last_op"].is_u64(), "from the heartbeats: {sb}");

    // /metrics: the names exist, and the counters move with real traffic.
    let before = metrics(a).await;
    for name in [
        "twinmq_messages_in_total",
        "twinmq_messages_out_total",
        "twinmq_confirms_total",
        "twinmq_confirm_latency_seconds_count",
        "twinmq_confirm_latency_seconds_bucket{le=\"+Inf\"}",
        "twinmq_replication_lag_ops",
        "twinmq_failovers_total",
        "twinmq_connections",
        "twinmq_peer_up",
        "twinmq_in_sync",
    ] {
        sample(&before, name);
    }
    assert_eq!(sample(&before, "twinmq_role{role=\"active\"}"), 1.0);
    assert_eq!(sample(&before, "twinmq_role{role=\"passive\"}"), 0.0);
    assert_eq!(sample(&before, "twinmq_peer_up"), 1.0);
    let mb = metrics(b).await;
    assert_eq!(sample(&mb, "twinmq_role{role=\"passive\"}"), 1.0);
    assert_eq!(sample(&mb, "twinmq_in_sync"), 1.0);

    const N: usize = 60;
    let client = Client::connect(pair.client_config()).await.unwrap();
    let producer = client.producer(Destination::queue("http-orders"));
    for i in 0..N {
        producer.send(Message::persistent(format!("m{i}"))).await.unwrap();
    }
    let s = status(a).await;
    assert!(s["connections"].as_u64().is_some_and(|n| n >= 1), "the client's connection counts: {s}");
    let q = s["queues"].as_array().unwrap().iter().find(|q| q["name"] == "queue:http-orders").cloned();
    assert_eq!(q.as_ref().map(|q| q["depth"].as_u64()), Some(Some(N as u64)), "{s}");
    // /series: the node samples once a second; the queue's depth shows within a few.
    let deadline = Instant::now() + WAIT;
    let report = loop {
        let r = series(a).await;
        if depth_of(&r, "queue:http-orders").is_some_and(|d| d.contains(&(N as f64))) {
            break r;
        }
        assert!(Instant::now() < deadline, "the depth of queue:http-orders never charted: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((report["interval_ms"].as_u64(), report["capacity"].as_u64()), (Some(1000), Some(300)), "{report}");
    let samples = report["at_ms"].as_array().unwrap().len();
    for list in ["messages_in_per_s", "messages_out_per_s", "confirm_p99_ms", "replication_lag"] {
        assert_eq!(report[list].as_array().map(Vec::len), Some(samples), "{list} has a value per sample: {report}");
    }
    let rates = numbers(&report["messages_in_per_s"]);
    assert!(rates.iter().any(|r| *r > 0.0), "the publishes show as a rate: {report}");
    // Rate x interval adds up to what was published (the counters count every publish frame).
    let published: f64 = rates.iter().sum::<f64>() * report["interval_ms"].as_f64().unwrap() / 1000.0;
    assert!(published >= N as f64 * 0.7 && published <= N as f64 * 1.3 + 5.0, "{published} of {N}: {report}");
    let p99 = numbers(&report["confirm_p99_ms"]);
    assert!(!p99.is_empty() && p99.iter().all(|p| *p > 0.0 && *p < 5_000.0), "a p99 where confirms went out: {report}");
    assert!(!numbers(&report["replication_lag"]).is_empty(), "the active's lag is sampled: {report}");
    let mid = metrics(a).await;
    assert_eq!(sample(&mid, "twinmq_queue_depth{destination=\"queue:http-orders\"}"), N as f64);
    assert!(sample(&mid, "twinmq_connections") >= 1.0);
    let mut consumer =
        client.subscribe(Destination::queue("http-orders"), SubscribeOptions::default().prefetch(16)).await.unwrap();
    let got = common::drain(&mut consumer, N, Duration::from_secs(5)).await;
    assert_eq!(got.len(), N);
    // Acks are asynchronous: wait until the queue reports them.
    wait_status(a, "with the queue drained", |s| {
        s["queues"].as_array().unwrap().iter().any(|q| q["name"] == "queue:http-orders" && q["depth"] == 0)
    })
    .await;
    let after = metrics(a).await;
    let grew = |name: &str| sample(&after, name) - sample(&before, name);
    assert!(grew("twinmq_messages_in_total") >= N as f64, "messages in: {}", grew("twinmq_messages_in_total"));
    assert!(grew("twinmq_confirms_total") >= N as f64, "confirms: {}", grew("twinmq_confirms_total"));
    assert!(grew("twinmq_messages_out_total") >= N as f64, "messages out: {}", grew("twinmq_messages_out_total"));
    assert!(grew("twinmq_confirm_latency_seconds_count") >= N as f64);
    assert!(grew("twinmq_confirm_latency_seconds_sum") > 0.0, "confirms take some time");
    assert_eq!(sample(&after, "twinmq_queue_consumers{destination=\"queue:http-orders\"}"), 1.0);
    println!(
        "confirm latency over {N} replicated publishes: mean {:.2} ms",
        grew("twinmq_confirm_latency_seconds_sum") * 1000.0 / grew("twinmq_confirm_latency_seconds_count")
    );
    drop(consumer);
    client.close().await.unwrap();

    // The pair's events: each node's own, and its peer's learned over the link.
    let sa = wait_status(a, "holding b's events", |s| has_event(s, "node-b", "peer-up")).await;
    assert!(has_event(&sa, "node-a", "promotion"), "a's start as active: {sa}");
    let sb = wait_status(b, "holding a's events", |s| has_event(s, "node-a", "promotion")).await;
    assert!(sb["events"].as_array().unwrap().windows(2).all(|w| w[0]["at_ms"].as_u64() <= w[1]["at_ms"].as_u64()));

    // The status page, in a real browser, from the active node: both roles,
    // the charts drawn from the samples, the events table.
    check_page(
        a,
        [("node-a", "active"), ("node-b", "passive")],
        |dom| {
            assert!(chart_points(dom, "rates") > 0, "the rates chart draws the samples");
            assert!(chart_points(dom, "confirm-p99") > 0, "the p99 chart draws the samples");
            assert!(chart_points(dom, "replication-lag") > 0);
            assert!(chart_points(dom, "depth") > 0 && dom.contains("data-series=\"queue:http-orders\""), "{dom}");
            assert_event_row(dom, "node-a", "promotion");
            assert_event_row(dom, "node-b", "peer-up");
        },
        "status-page.png",
    )
    .await;

    // Switchover: refused on the passive (409), done by the active with the credential.
    let r = call(b, "POST", "/switchover", Auth::Bearer(TOKEN)).await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.json()["error"].as_str().unwrap().contains("not active"), "{r:?}");
    let failovers_b = sample(&metrics(b).await, "twinmq_failovers_total");
    // Issue 10, finding 9: a form on another site, posted with the browser's
    // cached Basic credential, swapped the roles. Refused now (another
    // site's Origin; Basic is for reads), and the roles stay.
    let csrf = format!(
        "Host: {a}\r\nOrigin: http://evil.example\r\nContent-Type: application/x-www-form-urlencoded\r\nSec-Fetch-Site: cross-site\r\n"
    );
    let r = tokio::task::spawn_blocking(move || {
        request_with(a, "POST", "/switchover", Auth::Basic("operator", TOKEN), &csrf)
    })
    .await
    .unwrap();
    assert_eq!(r.status, 403, "a cross-site form: {r:?}");
    let r = call(a, "POST", "/switchover", Auth::Basic("operator", TOKEN)).await;
    assert_eq!(r.status, 401, "Basic does not switch over: {r:?}");
    assert_eq!(status(a).await["role"], "active", "the roles did not move");
    let r = call(a, "POST", "/switchover", Auth::Bearer(TOKEN)).await;
    assert_eq!(r.status, 200, "{r:?}\nA:\n{}", pair.a.log());
    wait_status(b, "active after the switchover", |s| s["role"] == "active").await;
    wait_status(a, "passive and in sync after the switchover", |s| s["role"] == "passive" && s["in_sync"] == true)
        .await;
    let mb = metrics(b).await;
    assert_eq!(sample(&mb, "twinmq_role{role=\"active\"}"), 1.0);
    assert_eq!(sample(&mb, "twinmq_failovers_total"), failovers_b + 1.0, "b's promotion is counted");
    let r = call(a, "POST", "/switchover", Auth::Bearer(TOKEN)).await;
    assert_eq!(r.status, 409, "a passive node refuses: {r:?}");

    // The page follows: seen from either node, b is active and a passive now.
    wait_status(a, "seeing b active", |s| s["peer"]["role"] == "active").await;
    check_page(a, [("node-a", "passive"), ("node-b", "active")], |_| {}, "status-page-after-switchover.png").await;
    let sa = status(a).await;
    assert!(has_event(&sa, "node-a", "switchover"), "a's switchover, asked and done: {sa}");
    wait_status(b, "holding a's switchover", |s| {
        has_event(s, "node-a", "switchover") && has_event(s, "node-b", "promotion")
    })
    .await;

    // a restarts and has lost its own memory; its peer tells it the story,
    // a's own events from before the restart included.
    pair.a.kill9();
    wait_status(b, "seeing a gone", |s| has_event(s, "node-b", "peer-down")).await;
    pair.a.start();
    let sa = wait_status(a, "passive again, with the story from b", |s| {
        s["role"] == "passive" && has_event(s, "node-a", "switchover") && has_event(s, "node-b", "peer-down")
    })
    .await;
    let events = sa["events"].as_array().unwrap();
    assert!(events.windows(2).all(|w| w[0]["at_ms"].as_u64() <= w[1]["at_ms"].as_u64()), "by time: {sa}");
    let mut keys: Vec<String> = events.iter().map(|e| format!("{} {} {}", e["at_ms"], e["node"], e["kind"])).collect();
    keys.dedup();
    assert_eq!(keys.len(), events.len(), "no duplicates: {sa}");
    check_page(
        a,
        [("node-a", "passive"), ("node-b", "active")],
        |dom| {
            // Learned from b: a's switchover before its restart, b's promotion and its peer-down.
            assert_event_row(dom, "node-a", "switchover");
            assert_event_row(dom, "node-b", "promotion");
            assert_event_row(dom, "node-b", "peer-down");
            // A restarted node charts from its restart on: the charts are there, maybe empty.
            for id in ["rates", "confirm-p99", "replication-lag", "depth"] {
                chart_points(dom, id);
            }
        },
        "status-page-after-restart.png",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_reads_are_open_and_switchover_is_refused() {
    let broker = common::Broker::start_with_http(&["--durability", "none"]);
    let http = broker.http.unwrap();
    let r = call(http, "GET", "/status", Auth::None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let s = r.json();
    assert_eq!((s["role"].as_str(), s["node_id"].as_str()), (Some("active"), Some("test-node")), "{s}");
    assert!(s["peer"].is_null() && s["gateway"].is_null(), "a single node has no pair: {s}");
    let r = call(http, "GET", "/", Auth::None).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/html")) && r.body.contains("twinmq"));
    let r = call(http, "GET", "/series", Auth::None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert!(v["at_ms"].is_array() && v["depth"].is_array(), "{v}");
    assert!(v["replication_lag"].as_array().unwrap().iter().all(serde_json::Value::is_null), "a lone node: {v}");
    assert!(s.get("events").is_none(), "a lone node has no pair events: {s}");
    let r = call(http, "GET", "/metrics", Auth::None).await;
    assert_eq!(r.status, 200);
    let m = parse_metrics(&r.body);
    assert_eq!(sample(&m, "twinmq_role{role=\"active\"}"), 1.0);
    assert!(!r.body.contains("twinmq_peer_up"), "no pair gauges on a single node");
    let r = call(http, "POST", "/switchover", Auth::Bearer(TOKEN)).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.json()["error"].as_str().unwrap().contains("no http_token"), "{r:?}");
    // DNS rebinding (finding 9): a page at a name that resolves to this
    // address cannot read the open /status; IP addresses and localhost can.
    for (host, want) in [("evil.example", 421), ("evil.example:80", 421), ("localhost", 200), ("127.0.0.1", 200)] {
        let r = tokio::task::spawn_blocking(move || {
            request_with(http, "GET", "/status", Auth::None, &format!("Host: {host}\r\n"))
        })
        .await
        .unwrap();
        assert_eq!(r.status, want, "Host {host}: {r:?}");
    }
    drop(broker);
}
