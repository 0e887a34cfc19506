//! Test harness: real `twinmqd` processes on loopback, each in a fresh temp
//! data directory, killed with SIGKILL or stopped with SIGTERM at will.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use twinmq_client::{Client, ClientConfig};

pub mod pair;
pub mod tls;

pub const TWINMQD: &str = env!("CARGO_BIN_EXE_twinmqd");

/// A free loopback port (bound, then released for the broker to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local addr").port()
}

pub struct Broker {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub extra: Vec<String>,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
    starts: u32,
}

impl Broker {
    /// Start a broker in a new temp directory with `extra` flags.
    pub fn start(extra: &[&str]) -> Broker {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut b = Broker {
            addr,
            data_dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            _tmp: Some(tmp),
            starts: 0,
        };
        b.launch();
        b
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.parent().expect("data dir has a parent").join(format!("twinmqd-{}.log", self.starts))
    }

    fn launch(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let child = Command::new(TWINMQD)
            .args(["--node-id", "test-node", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", &self.addr.to_string()])
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn twinmqd");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("twinmqd exited early with {status}; log:\n{}", self.log());
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "twinmqd not ready in 20 s; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
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

    /// Start again on the same data directory and port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.launch();
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
    let mut b = bytes::BytesMut::new();
    twinmq_protocol::encode_frame(f, twinmq_protocol::DEFAULT_MAX_FRAME_BYTES, &mut b).expect("encodable frame");
    b.to_vec()
}

/// An anonymous Hello as raw bytes.
pub fn hello() -> Vec<u8> {
    frame(&twinmq_protocol::ClientFrame::Hello { client_name: "raw".into(), user: None, password: None, admin: false })
}

/// Read the frames a broker sends on a raw socket until it closes the
/// connection or `timeout` passes without data.
pub fn read_frames(s: &mut TcpStream, timeout: Duration) -> Vec<twinmq_protocol::ServerFrame> {
    use std::io::Read;
    s.set_read_timeout(Some(timeout)).expect("set read timeout");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let mut frames = Vec::new();
    let mut rest = &buf[..];
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest.len() < 4 + len {
            break;
        }
        frames.push(twinmq_protocol::decode_body(&rest[4..4 + len]).expect("broker frames decode"));
        rest = &rest[4 + len..];
    }
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
