//! A local pair on loopback for the demos: two real daemon processes (this
//! binary re-executed as `broker ...`), a pullable gateway, status polling.
//! Also what every lab shares: the pair's timings and the re-exec.
//!
//! The lab binds every port itself (`127.0.0.1:0`) and hands the listening
//! sockets to the daemon by socket activation, keeping no copy: a killed
//! node's ports refuse connections, as a dead process's do. A restart binds
//! the same ports again. Readiness is the daemon's `READY=1` on
//! `NOTIFY_SOCKET`.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use twinmq_client::{AdminClient, ClientConfig};

/// If invoked as `<binary> broker ARGS...`, run `before`, then the daemon, and exit.
pub fn run_as_broker_if_asked(before: impl FnOnce()) {
    let mut args = std::env::args_os();
    let program = args.next();
    if args.next().is_some_and(|a| a == "broker") {
        before();
        let argv = program.into_iter().chain(args);
        std::process::exit(twinmq_broker::daemon::main_with_args(argv));
    }
}

/// Logs to stderr at `RUST_LOG` (default: errors only), for the example binaries.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
}

/// A listening socket on `addr` (port 0: a new one; a stopped node's port:
/// bound again, SO_REUSEADDR for its connections in TIME_WAIT).
fn listen_on(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into()).with_context(|| format!("bind {addr}"))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A new loopback listening socket and its address.
fn bound(name: &'static str) -> anyhow::Result<(SocketAddr, (&'static str, TcpListener))> {
    let l = listen_on(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    Ok((l.local_addr()?, (name, l)))
}

/// A loopback gateway that answers TCP probes while plugged; pulled, it stops
/// accepting, its one-slot backlog fills, and probes time out.
pub struct Gateway {
    pub addr: SocketAddr,
    plugged: Arc<AtomicBool>,
}

impl Gateway {
    pub fn start() -> anyhow::Result<Gateway> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
        socket.listen(1)?;
        socket.set_nonblocking(true)?;
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr()?;
        let plugged = Arc::new(AtomicBool::new(true));
        let p = plugged.clone();
        std::thread::spawn(move || loop {
            if p.load(Ordering::Relaxed) {
                while let Ok((c, _)) = listener.accept() {
                    drop(c);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        });
        Ok(Gateway { addr, plugged })
    }

    pub fn pull(&self) {
        self.plugged.store(false, Ordering::Relaxed);
    }

    pub fn replug(&self) {
        self.plugged.store(true, Ordering::Relaxed);
    }
}

/// Timings for the pair (milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub heartbeat: u64,
    pub peer_timeout: u64,
    pub isolation_timeout: u64,
    pub takeover_delay: u64,
    pub probe_interval: u64,
}

impl Timings {
    /// DESIGN.md section 4 defaults.
    pub const DEFAULT: Timings = Timings {
        heartbeat: 100,
        peer_timeout: 1000,
        isolation_timeout: 1000,
        takeover_delay: 1500,
        probe_interval: 200,
    };
    /// The tightest timings we support on this machine.
    pub const TIGHT: Timings =
        Timings { heartbeat: 20, peer_timeout: 150, isolation_timeout: 150, takeover_delay: 200, probe_interval: 30 };

    /// The `twinmqd` flags that set these timings.
    pub fn args(&self) -> Vec<String> {
        [
            ("--heartbeat-ms", self.heartbeat),
            ("--peer-timeout-ms", self.peer_timeout),
            ("--isolation-timeout-ms", self.isolation_timeout),
            ("--takeover-delay-ms", self.takeover_delay),
            ("--probe-interval-ms", self.probe_interval),
        ]
        .iter()
        .flat_map(|(flag, ms)| [flag.to_string(), ms.to_string()])
        .collect()
    }
}

pub struct Node {
    pub name: String,
    pub client: SocketAddr,
    pub ha: SocketAddr,
    /// The admin HTTP endpoint (status page, /status, /metrics); no token on loopback.
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    /// The executable started as `<exe> broker ARGS` (default: this one).
    pub exe: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    starts: u32,
    /// The sockets bound for the first start (both nodes' ports exist before
    /// either starts: each names the other's); later starts bind them again.
    sockets: Vec<(&'static str, TcpListener)>,
}

impl Node {
    /// The running process's resident memory, KiB (0 when it is not running).
    /// How many times it was started (its log is `<name>-<starts>.log` beside its data directory).
    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn rss_kib(&self) -> u64 {
        self.child.as_ref().map_or(0, |c| twinmq_store::rss_kib_of(&c.id().to_string()))
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        use command_fds::{CommandFdExt, FdMapping};
        self.starts += 1;
        let log_path = self.data_dir.with_file_name(format!("{}-{}.log", self.name, self.starts));
        let log = std::fs::File::create(&log_path)?;
        let exe = self.exe.clone();
        let mut sockets = std::mem::take(&mut self.sockets);
        if sockets.is_empty() {
            sockets =
                vec![("client", listen_on(self.client)?), ("ha", listen_on(self.ha)?), ("http", listen_on(self.http)?)];
        }
        let names: Vec<&str> = sockets.iter().map(|(name, _)| *name).collect();
        let notify_path = log_path.with_extension("notify");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).context("bind the readiness socket")?;
        let mut cmd = Command::new(exe);
        cmd.arg("broker")
            .args(["--node-id", &self.name, "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", &self.client.to_string(), "--ha-listen", &self.ha.to_string()])
            .args(["--http-listen", &self.http.to_string()])
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env("LISTEN_FDS", names.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env_remove("LISTEN_PID")
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(log);
        let mappings = sockets
            .into_iter()
            .enumerate()
            .map(|(i, (_, l))| FdMapping { parent_fd: l.into(), child_fd: 3 + i as i32 })
            .collect();
        cmd.fd_mappings(mappings)?;
        let child = cmd.spawn().context("start broker process")?;
        // The command owned our copies of the sockets: now only the child holds them.
        drop(cmd);
        let child = self.child.insert(child);
        notify.set_read_timeout(Some(Duration::from_millis(100)))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 256];
        loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if buf[..n].split(|&b| b == b'\n').any(|line| line == b"READY=1") {
                    return Ok(());
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!("{} exited with {status} before serving", self.name);
            }
            if Instant::now() > deadline {
                bail!("{} did not start serving within 20 s", self.name);
            }
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub async fn status(&self) -> Option<serde_json::Value> {
        let cfg = ClientConfig::new([self.client.to_string()]).connect_timeout(Duration::from_millis(300));
        let fut = async {
            let mut admin = AdminClient::connect_to(&self.client.to_string(), &cfg).await.ok()?;
            serde_json::from_str(admin.status().await.ok()?.json()).ok()
        };
        tokio::time::timeout(Duration::from_millis(800), fut).await.ok().flatten()
    }

    pub async fn role(&self) -> String {
        self.status().await.and_then(|s| s["role"].as_str().map(str::to_string)).unwrap_or_else(|| "down".into())
    }

    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status().await.is_some_and(|s| pred(&s)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: condition not reached within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_active(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for(timeout, |s| s["role"].as_str().is_some_and(|r| r.starts_with("active"))).await
    }

    pub async fn wait_in_sync_passive(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for(timeout, |s| s["role"] == "passive" && s["in_sync"] == true).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill9();
    }
}

pub struct Pair {
    pub a: Node,
    pub b: Node,
    pub gateway: Gateway,
    pub dir: tempfile::TempDir,
}

impl Pair {
    /// Start node-a (priority 200, preferred) and node-b on loopback.
    pub fn start(timings: Timings, extra: &[&str]) -> anyhow::Result<Pair> {
        let mut pair = Pair::new(timings, extra)?;
        pair.a.start()?;
        pair.b.start()?;
        Ok(pair)
    }

    /// The pair with its ports bound and nothing started: a test may change
    /// a node's `data_dir` or `exe` first.
    pub fn new(timings: Timings, extra: &[&str]) -> anyhow::Result<Pair> {
        let exe = std::env::current_exe().context("own executable")?;
        let dir = tempfile::tempdir()?;
        let gateway = Gateway::start()?;
        // Every port bound now, before either node starts: each names the other's.
        let (a_client, a_client_l) = bound("client")?;
        let (a_ha, a_ha_l) = bound("ha")?;
        let (a_http, a_http_l) = bound("http")?;
        let (b_client, b_client_l) = bound("client")?;
        let (b_ha, b_ha_l) = bound("ha")?;
        let (b_http, b_http_l) = bound("http")?;
        // A fresh secret per demo, as `twinmq gen-secret` makes them.
        let secret = twinmq_ha::secret::generate();
        let args = |peer_ha: SocketAddr, peer_client: SocketAddr, priority: &str| -> Vec<String> {
            let mut v: Vec<String> = vec![
                "--peer-ha".into(),
                peer_ha.to_string(),
                "--peer-client".into(),
                peer_client.to_string(),
                "--gateway".into(),
                format!("tcp://{}", gateway.addr),
                "--cluster-secret".into(),
                secret.clone(),
                "--priority".into(),
                priority.into(),
            ];
            v.extend(timings.args());
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let a = Node {
            name: "node-a".into(),
            client: a_client,
            ha: a_ha,
            http: a_http,
            data_dir: dir.path().join("a"),
            exe: exe.clone(),
            args: args(b_ha, b_client, "200"),
            child: None,
            starts: 0,
            sockets: vec![a_client_l, a_ha_l, a_http_l],
        };
        let b = Node {
            name: "node-b".into(),
            client: b_client,
            ha: b_ha,
            http: b_http,
            data_dir: dir.path().join("b"),
            exe,
            args: args(a_ha, a_client, "100"),
            child: None,
            starts: 0,
            sockets: vec![b_client_l, b_ha_l, b_http_l],
        };
        Ok(Pair { a, b, gateway, dir })
    }

    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new([self.a.client.to_string(), self.b.client.to_string()])
    }

    /// The node currently active, if exactly one is.
    pub async fn active(&self) -> Option<&Node> {
        let (ra, rb) = (self.a.role().await, self.b.role().await);
        match (ra.starts_with("active"), rb.starts_with("active")) {
            (true, false) => Some(&self.a),
            (false, true) => Some(&self.b),
            _ => None,
        }
    }
}
