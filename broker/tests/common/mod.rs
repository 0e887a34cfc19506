//! Test harness: real `twinmqd` processes on loopback, each in a fresh temp
//! data directory, killed with SIGKILL or stopped with SIGTERM at will.
//!
//! The harness binds each broker's ports itself (`127.0.0.1:0`) and hands
//! the listening sockets to the process by socket activation, so a port is
//! known before the broker starts and no other process can take it in
//! between. It keeps no copy: once the child is spawned only the child holds
//! the socket, so a killed broker's port refuses connections (the pair's
//! dead-process fast path depends on that). A restart binds the same port
//! again and hands it over anew. Readiness is the daemon's `READY=1` on
//! `NOTIFY_SOCKET`, not a connect that the kernel would accept anyway.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use twinmq_client::{Client, ClientConfig};

pub mod pair;
pub mod tls;

pub const TWINMQD: &str = env!("CARGO_BIN_EXE_twinmqd");

/// A listening socket on `addr`: a new port for `127.0.0.1:0`, or the port a
/// stopped broker had, bound again (SO_REUSEADDR: its old connections may
/// still be in TIME_WAIT).
pub fn listen_on(addr: SocketAddr) -> TcpListener {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.bind(&addr.into()).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    socket.listen(1024).expect("listen");
    socket.into()
}

/// A new listening socket on a loopback port of the kernel's choosing.
pub fn loopback_listener() -> TcpListener {
    listen_on(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Spawn `cmd` (a twinmqd) with `sockets` passed by socket activation (as
/// fds 3, 4, ... named by `LISTEN_FDNAMES`) and `NOTIFY_SOCKET` at `notify`.
/// `cmd` is consumed: dropping it closes our copies of the sockets, so that
/// the child alone holds them. Wait for readiness with [`wait_ready`].
pub fn spawn_activated(mut cmd: Command, sockets: Vec<(&str, TcpListener)>, notify: &Path) -> (Child, UnixDatagram) {
    use command_fds::{CommandFdExt, FdMapping};
    let _ = std::fs::remove_file(notify);
    let ready = UnixDatagram::bind(notify).expect("bind the notify socket");
    let names: Vec<&str> = sockets.iter().map(|(name, _)| *name).collect();
    let mappings = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (_, l))| FdMapping { parent_fd: l.into(), child_fd: 3 + i as i32 })
        .collect();
    cmd.fd_mappings(mappings).expect("distinct child fds");
    cmd.env("LISTEN_FDS", names.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        .env("NOTIFY_SOCKET", notify);
    let child = cmd.spawn().expect("spawn twinmqd");
    drop(cmd);
    (child, ready)
}

/// Wait (at most 20 s) for the daemon's `READY=1`; panic with `log()` if it
/// exits first or stays silent.
pub fn wait_ready(child: &mut Child, ready: &UnixDatagram, what: &str, log: impl Fn() -> String) {
    ready.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 256];
    loop {
        if let Ok(n) = ready.recv(&mut buf) {
            if buf[..n].split(|&b| b == b'\n').any(|line| line == b"READY=1") {
                return;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}; log:\n{}", log());
        }
        assert!(Instant::now() < deadline, "{what} not ready in 20 s; log:\n{}", log());
    }
}

pub struct Broker {
    pub addr: SocketAddr,
    /// The admin HTTP endpoint, when started with [`Broker::start_with_http`].
    pub http: Option<SocketAddr>,
    /// The STOMP port, when started with [`Broker::start_with_stomp`].
    pub stomp: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub extra: Vec<String>,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
    starts: u32,
}

impl Broker {
    /// Start a broker in a new temp directory with `extra` flags.
    pub fn start(extra: &[&str]) -> Broker {
        Broker::start_on(extra, false)
    }

    /// The same, with an admin HTTP port too (`--http-listen`, passed like the client port).
    pub fn start_with_http(extra: &[&str]) -> Broker {
        Broker::start_on(extra, true)
    }

    /// The same, with a STOMP port too (`--stomp-listen`, passed like the client port).
    pub fn start_with_stomp(extra: &[&str]) -> Broker {
        Broker::start_ports(extra, false, true)
    }

    fn start_on(extra: &[&str], http: bool) -> Broker {
        Broker::start_ports(extra, http, false)
    }

    fn start_ports(extra: &[&str], http: bool, stomp: bool) -> Broker {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let client = loopback_listener();
        let http = http.then(loopback_listener);
        let stomp = stomp.then(loopback_listener);
        let mut b = Broker {
            addr: client.local_addr().expect("local addr"),
            http: http.as_ref().map(|l| l.local_addr().expect("local addr")),
            stomp: stomp.as_ref().map(|l| l.local_addr().expect("local addr")),
            data_dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            _tmp: Some(tmp),
            starts: 0,
        };
        b.launch(client, http, stomp);
        b
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.parent().expect("data dir has a parent").join(format!("twinmqd-{}.log", self.starts))
    }

    fn launch(&mut self, client: TcpListener, http: Option<TcpListener>, stomp: Option<TcpListener>) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let mut cmd = Command::new(TWINMQD);
        cmd.args(["--node-id", "test-node", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", &self.addr.to_string()])
            .args(self.http.iter().flat_map(|a| ["--http-listen".to_string(), a.to_string()]))
            .args(self.stomp.iter().flat_map(|a| ["--stomp-listen".to_string(), a.to_string()]))
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        let mut sockets = vec![("client", client)];
        sockets.extend(http.map(|l| ("http", l)));
        sockets.extend(stomp.map(|l| ("stomp", l)));
        let log_path = self.log_path();
        let (child, ready) = spawn_activated(cmd, sockets, &log_path.with_extension("notify"));
        // Ours before waiting, so that a panic below still kills it (Drop).
        let child = self.child.insert(child);
        wait_ready(child, &ready, "twinmqd", || std::fs::read_to_string(&log_path).unwrap_or_default());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
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
                panic!("twinmqd did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start again on the same data directory and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let client = listen_on(self.addr);
        let http = self.http.map(listen_on);
        let stomp = self.stomp.map(listen_on);
        self.launch(client, http, stomp);
    }

    pub fn config(&self) -> ClientConfig {
        ClientConfig::new([self.addr.to_string()])
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.config()).await.expect("connect to broker")
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One client frame as raw bytes, for tests that speak the protocol by hand.
pub fn frame(f: &twinmq_protocol::ClientFrame) -> Vec<u8> {
    // The Hello at the handshake's version, the rest at what `hello()` negotiates.
    let version = match f {
        twinmq_protocol::ClientFrame::Hello { .. } => twinmq_protocol::HANDSHAKE_VERSION,
        _ => twinmq_protocol::PROTOCOL_VERSION,
    };
    let mut b = bytes::BytesMut::new();
    twinmq_protocol::encode_frame_as(f, version, twinmq_protocol::DEFAULT_MAX_FRAME_BYTES, &mut b)
        .expect("encodable frame");
    b.to_vec()
}

/// An anonymous Hello as raw bytes, offering the versions this release speaks.
pub fn hello() -> Vec<u8> {
    hello_offering(twinmq_protocol::SUPPORTED_VERSIONS)
}

/// An anonymous Hello offering `versions`.
pub fn hello_offering(versions: twinmq_protocol::VersionRange) -> Vec<u8> {
    frame(&twinmq_protocol::ClientFrame::Hello {
        client_name: "raw".into(),
        user: None,
        password: None,
        admin: false,
        versions,
        ticket: None,
    })
}

/// A persistent publish of `payload` to queue `queue` as raw bytes.
pub fn publish(producer_id: u64, seq: u64, queue: &str, payload: &str) -> Vec<u8> {
    let message = twinmq_protocol::OutMessage {
        headers: Default::default(),
        payload: payload.as_bytes().to_vec(),
        ttl_ms: None,
        persistent: true,
    };
    frame(&twinmq_protocol::ClientFrame::Publish {
        producer_id,
        seq,
        destination: twinmq_protocol::Destination::queue(queue),
        message,
    })
}

/// The frames a broker sends on a raw socket, as they come.
#[derive(Default)]
pub struct Frames {
    got: Vec<u8>,
    buf: Vec<u8>,
}

impl Frames {
    /// What one read brings (waiting up to the socket's read timeout;
    /// nothing if it passes), as whole frames; panics if the broker closed.
    pub fn read(&mut self, s: &mut TcpStream) -> Vec<twinmq_protocol::ServerFrame> {
        use std::io::Read;
        self.buf.resize(64 * 1024, 0);
        match s.read(&mut self.buf) {
            Ok(0) => panic!("the broker closed the connection"),
            Ok(n) => self.got.extend_from_slice(&self.buf[..n]),
            Err(_) => {}
        }
        take_frames(&mut self.got)
    }
}

/// Read the frames a broker sends on a raw socket until it closes the
/// connection or `timeout` passes without data.
pub fn read_frames(s: &mut TcpStream, timeout: Duration) -> Vec<twinmq_protocol::ServerFrame> {
    use std::io::Read;
    s.set_read_timeout(Some(timeout)).expect("set read timeout");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    take_frames(&mut buf)
}

/// The whole frames at the start of `buf` (bytes read from a broker),
/// decoded and taken out; a partial frame at the end stays for the next read.
pub fn take_frames(buf: &mut Vec<u8>) -> Vec<twinmq_protocol::ServerFrame> {
    let mut frames = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 4 {
        let len = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        if buf.len() - at < 4 + len {
            break;
        }
        frames.push(twinmq_protocol::decode_body(&buf[at + 4..at + 4 + len]).expect("broker frames decode"));
        at += 4 + len;
    }
    buf.drain(..at);
    frames
}

/// Send `sig` (e.g. "TERM", "STOP") to a process we spawned.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("run kill").success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Receive until `n` deliveries or `idle` without one; acks each. Returns the bodies.
pub async fn drain(consumer: &mut twinmq_client::Consumer, n: usize, idle: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(idle, consumer.recv()).await {
            Ok(Some(Ok(d))) => {
                got.push(String::from_utf8_lossy(d.payload()).into_owned());
                d.ack().await.expect("ack");
            }
            Ok(Some(Err(e))) => panic!("consumer failed: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    got
}

/// Resident memory of process `pid` in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    twinmq_store::rss_kib_of(&pid.to_string())
}
