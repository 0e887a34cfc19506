//! Pair harness: two real `twinmqd` processes on loopback, a gateway that
//! can be pulled, and TCP proxies standing in for the dedicated HA cable.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinmq_client::{AdminClient, ClientConfig};

use super::{listen_on, loopback_listener, signal, spawn_activated, wait_ready, TWINMQD};

/// A loopback "gateway" that answers TCP probes while plugged. Pulled, it
/// stops accepting; its one-slot backlog fills and further SYNs are dropped,
/// so probes time out exactly as they would for a host that went away.
pub struct Gateway {
    pub addr: SocketAddr,
    plugged: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Gateway {
    pub fn start() -> Gateway {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        socket.listen(1).unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let plugged = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (plugged.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if p.load(Ordering::Relaxed) {
                    while let Ok((conn, _)) = listener.accept() {
                        drop(conn);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Gateway { addr, plugged, stop }
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    pub fn pull(&self) {
        self.plugged.store(false, Ordering::Relaxed);
    }

    pub fn replug(&self) {
        self.plugged.store(true, Ordering::Relaxed);
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A TCP forwarder standing in for a cable; `cut` drops every connection
/// through it and refuses new ones until `restore`.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, cs) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                if c.load(Ordering::Relaxed) {
                    drop(inbound);
                    continue;
                }
                let Ok(outbound) = TcpStream::connect(target) else { continue };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                for (mut from, mut to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound.try_clone().unwrap(), inbound.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                cs.lock().unwrap().extend([inbound, outbound]);
            }
        });
        Proxy { addr, cut, conns }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }

    /// Cut several cables at (nearly) the same instant: refuse new
    /// connections on all of them first, then drop the open ones, so a node
    /// cannot move its replication to a second path between two cuts.
    pub fn cut_all(proxies: &[Proxy]) {
        for p in proxies {
            p.cut.store(true, Ordering::SeqCst);
        }
        let conns: Vec<TcpStream> =
            proxies.iter().flat_map(|p| p.conns.lock().unwrap().drain(..).collect::<Vec<_>>()).collect();
        for c in conns {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// One node of the pair.
pub struct Node {
    pub name: String,
    pub client: SocketAddr,
    pub ha: SocketAddr,
    /// The admin HTTP endpoint, when `PairOptions::http` asked for one.
    pub http: Option<SocketAddr>,
    /// The STOMP port, when `PairOptions::stomp` asked for one.
    pub stomp: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    child: Option<Child>,
    starts: u32,
    /// Credentials for status checks once the pair has users.
    pub admin_login: Option<(String, String)>,
    /// The sockets bound for the first start (both nodes' ports are bound
    /// before either starts: each names the other's); later starts bind the
    /// same ports again.
    sockets: Vec<(&'static str, TcpListener)>,
}

impl Node {
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.with_file_name(format!("{}-{}.log", self.name, self.starts))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Start the process on this node's ports (handed over by socket
    /// activation) and wait until it serves them.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let mut cmd = Command::new(TWINMQD);
        cmd.args(["--node-id", &self.name, "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", &self.client.to_string(), "--ha-listen", &self.ha.to_string()])
            .args(self.http.iter().flat_map(|a| ["--http-listen".to_string(), a.to_string()]))
            .args(self.stomp.iter().flat_map(|a| ["--stomp-listen".to_string(), a.to_string()]))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        let mut sockets = std::mem::take(&mut self.sockets);
        if sockets.is_empty() {
            sockets.push(("client", listen_on(self.client)));
            sockets.push(("ha", listen_on(self.ha)));
            sockets.extend(self.http.map(|a| ("http", listen_on(a))));
            sockets.extend(self.stomp.map(|a| ("stomp", listen_on(a))));
        }
        let log_path = self.log_path();
        let (child, ready) = spawn_activated(cmd, sockets, &log_path.with_extension("notify"));
        let child = self.child.insert(child);
        wait_ready(child, &ready, &self.name, || std::fs::read_to_string(&log_path).unwrap_or_default());
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (at most 30 s) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        signal(c.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("{} did not exit within 30 s of SIGTERM; log:\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn freeze(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The node's status JSON over an admin connection.
    pub async fn status(&self) -> Option<serde_json::Value> {
        let mut cfg = ClientConfig::new([self.client.to_string()]).connect_timeout(Duration::from_millis(500));
        if let Some((user, password)) = &self.admin_login {
            cfg = cfg.user(user).password(password);
        }
        let fut = async {
            let mut admin = AdminClient::connect_to(&self.client.to_string(), &cfg).await.ok()?;
            let json = admin.status().await.ok()?;
            serde_json::from_str(json.json()).ok()
        };
        tokio::time::timeout(Duration::from_secs(2), fut).await.ok().flatten()
    }

    pub async fn role(&self) -> Option<String> {
        self.status().await.and_then(|s| s["role"].as_str().map(str::to_string))
    }

    /// Wait until the node's status satisfies `pred`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status().await {
                if pred(&s) {
                    return s;
                }
                if Instant::now() > deadline {
                    panic!("{}: not {what} within {timeout:?}; status {s}\nlog:\n{}", self.name, self.log());
                }
            } else if Instant::now() > deadline {
                panic!("{}: no status within {timeout:?} (waiting for {what}); log:\n{}", self.name, self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_role(&self, role: &str, timeout: Duration) -> serde_json::Value {
        self.wait_for(&format!("role {role}"), timeout, |s| s["role"] == role).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A frozen process cannot die of SIGKILL until it is thawed? It can; but thaw anyway.
            let _ = Command::new("kill").arg("-CONT").arg(c.id().to_string()).status();
        }
        self.kill9();
    }
}

/// Options for a pair.
#[derive(Default, Clone)]
pub struct PairOptions {
    /// Put a cuttable proxy on each node's first HA path (the "HA cable"),
    /// with the direct address as the second path (the client network).
    pub ha_cable_proxy: bool,
    /// Put cuttable proxies on both paths (a full split between the nodes).
    pub all_paths_proxied: bool,
    pub failback_auto: bool,
    pub extra: Vec<String>,
    /// Node b's cluster secret, when it should differ.
    pub b_secret: Option<String>,
    /// Give each node an admin HTTP port (`--http-listen`); a token goes in `extra`.
    pub http: bool,
    /// Flags for node a only (after `extra`): its own certificate, say.
    pub a_extra: Vec<String>,
    /// Flags for node b only (after `extra`).
    pub b_extra: Vec<String>,
    /// Give each node a STOMP port (`--stomp-listen`).
    pub stomp: bool,
}

pub struct Pair {
    pub a: Node,
    pub b: Node,
    pub gateway: Gateway,
    /// Proxies a->b and b->a on the HA cable path.
    pub cable: Vec<Proxy>,
    _tmp: tempfile::TempDir,
}

/// A generated cluster secret (`twinmq gen-secret`), and another one.
pub const SECRET: &str = "q3ZCqjFPm9lCbf9PxbC1Bv6mwYJ7sfqKR2yR4yNfn4Q=";
pub const OTHER_SECRET: &str = "Zk1hQnqB0Yl3Wz8s2d6v9tXcRm4eJp7uLyHg5oTiKaE=";

impl PairOptions {
    /// Give both nodes the configured user `root` (password `rootpw`, admin
    /// on everything): the only login a node that never held a copy of the
    /// pair's store accepts (see [`Pair::as_root`]).
    pub fn with_root(mut self) -> PairOptions {
        let hash = twinmq_broker::auth::hash_password("rootpw").unwrap();
        self.extra.extend(["--user".to_string(), format!("root={hash}")]);
        self
    }
}

impl Pair {
    /// Start a (preferred, priority 200) and b (priority 100); a becomes active.
    pub async fn start(opts: PairOptions) -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let gateway = Gateway::start();
        // Every port bound now, before either node starts: each names the other's.
        let bound = |name: &'static str| {
            let l = loopback_listener();
            (l.local_addr().unwrap(), (name, l))
        };
        let (a_client, a_client_l) = bound("client");
        let (a_ha, a_ha_l) = bound("ha");
        let (b_client, b_client_l) = bound("client");
        let (b_ha, b_ha_l) = bound("ha");
        let (a_http, a_http_l) = opts.http.then(|| bound("http")).unzip();
        let (b_http, b_http_l) = opts.http.then(|| bound("http")).unzip();
        let (a_stomp, a_stomp_l) = opts.stomp.then(|| bound("stomp")).unzip();
        let (b_stomp, b_stomp_l) = opts.stomp.then(|| bound("stomp")).unzip();
        let mut cable = Vec::new();
        let (a_paths, b_paths) = if opts.all_paths_proxied {
            let proxies = [Proxy::start(b_ha), Proxy::start(b_ha), Proxy::start(a_ha), Proxy::start(a_ha)];
            let paths = (
                format!("{},{}", proxies[0].addr, proxies[1].addr),
                format!("{},{}", proxies[2].addr, proxies[3].addr),
            );
            cable.extend(proxies);
            paths
        } else if opts.ha_cable_proxy {
            let to_b = Proxy::start(b_ha);
            let to_a = Proxy::start(a_ha);
            let paths = (format!("{},{}", to_b.addr, b_ha), format!("{},{}", to_a.addr, a_ha));
            cable.push(to_b);
            cable.push(to_a);
            paths
        } else {
            (b_ha.to_string(), a_ha.to_string())
        };
        let common = |peer_ha: String, peer_client: SocketAddr, priority: &str, secret: &str| -> Vec<String> {
            let mut v: Vec<String> = [
                "--peer-ha",
                &peer_ha,
                "--peer-client",
                &peer_client.to_string(),
                "--gateway",
                &gateway.url(),
                "--cluster-secret",
                secret,
                "--priority",
                priority,
                "--failback",
                if opts.failback_auto { "auto" } else { "manual" },
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            v.extend(opts.extra.iter().cloned());
            v
        };
        let b_secret = opts.b_secret.clone().unwrap_or_else(|| SECRET.to_string());
        let mut a = Node {
            name: "node-a".into(),
            client: a_client,
            ha: a_ha,
            http: a_http,
            stomp: a_stomp,
            data_dir: tmp.path().join("a"),
            args: [common(a_paths, b_client, "200", SECRET), opts.a_extra.clone()].concat(),
            child: None,
            starts: 0,
            admin_login: None,
            sockets: [a_client_l, a_ha_l].into_iter().chain(a_http_l).chain(a_stomp_l).collect(),
        };
        let mut b = Node {
            name: "node-b".into(),
            client: b_client,
            ha: b_ha,
            http: b_http,
            stomp: b_stomp,
            data_dir: tmp.path().join("b"),
            args: [common(b_paths, a_client, "100", &b_secret), opts.b_extra.clone()].concat(),
            child: None,
            starts: 0,
            admin_login: None,
            sockets: [b_client_l, b_ha_l].into_iter().chain(b_http_l).chain(b_stomp_l).collect(),
        };
        a.start();
        b.start();
        Pair { a, b, gateway, cable, _tmp: tmp }
    }

    /// Log in as the configured `root` (see [`PairOptions::with_root`]),
    /// status checks included.
    pub fn as_root(&mut self) -> ClientConfig {
        for node in [&mut self.a, &mut self.b] {
            node.admin_login = Some(("root".into(), "rootpw".into()));
        }
        self.client_config().user("root").password("rootpw")
    }

    /// Client configuration with both nodes, failing over within 20 s.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new([self.a.client.to_string(), self.b.client.to_string()])
            .failover_timeout(Duration::from_secs(20))
    }

    /// Wait for a active and b passive and in sync.
    pub async fn wait_a_active_b_in_sync(&self) {
        self.a.wait_role("active", Duration::from_secs(10)).await;
        self.b
            .wait_for("passive and in sync", Duration::from_secs(10), |s| {
                s["role"] == "passive" && s["in_sync"] == true
            })
            .await;
    }
}
