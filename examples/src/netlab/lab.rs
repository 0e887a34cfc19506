//! [`Lab`]: the network plus the processes on it (the gateway's listener,
//! the two brokers, a role monitor beside each broker), the faults that act
//! on processes (kill -9, restart, SIGSTOP/SIGCONT), waits on the nodes'
//! reported roles, and the event log the checker reads.
//!
//! Every process is this program re-executed under `ip netns exec` (a
//! broker is `<exe> broker ARGS`, the daemon's own flags), so the lab needs
//! no other binary. Files of a run, in the lab directory: `events.jsonl`
//! (faults and repairs with their time), `roles-a.jsonl`/`roles-b.jsonl`
//! (monitor samples), `workload.jsonl`, broker logs `a-1.log`, `a-2.log` ...
//! (one per start), the data directories.
//!
//! With [`LabExtras::fault_disks`], each node's data directory is a faultfs
//! mount (served by this process) of `disks/a` or `disks/b` in the lab
//! directory, so that a node's disk can fail on command ([`Lab::disk_fault`]);
//! [`Lab::wipe`] empties a killed node's data directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use super::checker::{self, Report};
use super::monitor::Sample;
use super::net::{self, Cable, Host, Net};
use super::proc::{now_us, signal, JsonLines, LineTail};
use super::workload::{Workload, WorkloadArgs};
use crate::faultfs::{self, FaultMount, MountOptions};

pub const CLIENT_PORT: u16 = 5570;
pub const HA_PORT: u16 = 5571;
/// The gateway host's TCP port (for `--gateway tcp://...`; the lab probes by ICMP).
pub const GATEWAY_TCP_PORT: u16 = 5599;
/// A generated secret (`twinmq gen-secret`): the lab's nodes share it.
pub const CLUSTER_SECRET: &str = "Wc2o0X8Pj3b6T1kqVvN5yR9eLmA4uHsZdGfQx7iKpBw=";

pub use crate::lab::Timings;

/// One node of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    A,
    B,
}

impl Node {
    pub fn name(self) -> &'static str {
        match self {
            Node::A => "a",
            Node::B => "b",
        }
    }

    pub fn parse(s: &str) -> Option<Node> {
        match s {
            "a" => Some(Node::A),
            "b" => Some(Node::B),
            _ => None,
        }
    }

    pub fn other(self) -> Node {
        match self {
            Node::A => Node::B,
            Node::B => Node::A,
        }
    }

    fn host(self) -> Host {
        match self {
            Node::A => Host::A,
            Node::B => Host::B,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Its client address, as the client host dials it.
    pub fn client_addr(self) -> String {
        match self {
            Node::A => format!("{}:{CLIENT_PORT}", net::A_IP),
            Node::B => format!("{}:{CLIENT_PORT}", net::B_IP),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Namespaces are `tmqlab-<tag>-<host>`; the tag starts with our pid.
    pub tag: String,
    /// Where the run's files go (created; not removed).
    pub dir: PathBuf,
    /// The cable-lab executable, re-executed for every process of the lab.
    pub exe: PathBuf,
    pub timings: Timings,
    pub failback_auto: bool,
}

impl LabOptions {
    /// A fresh tag for this process: `<pid>-<n>`.
    pub fn unique_tag() -> String {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}-{n}", std::process::id())
    }
}

/// What a lab may add to the default one (the nemesis uses both).
#[derive(Debug, Clone, Default)]
pub struct LabExtras {
    /// More daemon flags for both brokers (e.g. `--disk-stall-ms 1000`).
    pub broker_args: Vec<String>,
    /// Serve each node's data directory through faultfs (root and
    /// `/dev/fuse`; see [`faultfs::preflight`]).
    pub fault_disks: bool,
}

/// A broker process and how many times it was started.
struct Broker {
    node: Node,
    child: Option<Child>,
    starts: u32,
    frozen: bool,
}

pub struct Lab {
    pub opts: LabOptions,
    brokers: [Broker; 2],
    helpers: Vec<Child>,
    roles: [LineTail; 2],
    /// Every sample read so far, per node.
    samples: [Vec<Sample>; 2],
    /// How many samples per node `role_changes` has looked at.
    seen: [usize; 2],
    /// Cables pulled now (for `status`).
    pub pulled: Vec<Cable>,
    events: JsonLines,
    pub started: Instant,
    extras: LabExtras,
    /// The faultfs mounts under the data directories, if any: dropped (so
    /// unmounted) after every process is gone.
    disks: [Option<FaultMount>; 2],
    /// The fault each disk has now.
    disk_faults: [faultfs::Fault; 2],
    /// Declared last: dropped after every process is gone.
    pub net: Net,
}

impl Lab {
    /// Build the network and start the gateway, both brokers (A preferred)
    /// and their monitors. Returns once both brokers answer their monitors.
    pub fn start(opts: LabOptions) -> anyhow::Result<Lab> {
        Lab::start_with(opts, LabExtras::default())
    }

    /// [`Lab::start`] with more: broker flags, data directories on faultfs.
    pub fn start_with(opts: LabOptions, extras: LabExtras) -> anyhow::Result<Lab> {
        std::fs::create_dir_all(&opts.dir).with_context(|| format!("create {}", opts.dir.display()))?;
        let net = Net::create(&opts.tag)?;
        let events = JsonLines::create(&opts.dir.join("events.jsonl"))?;
        events.write(&json!({"t": now_us(), "ev": "lab started", "fault": false}));
        let roles = [LineTail::new(opts.dir.join("roles-a.jsonl")), LineTail::new(opts.dir.join("roles-b.jsonl"))];
        let mut lab = Lab {
            brokers: [Node::A, Node::B].map(|node| Broker { node, child: None, starts: 0, frozen: false }),
            helpers: Vec::new(),
            roles,
            samples: [Vec::new(), Vec::new()],
            seen: [0, 0],
            pulled: Vec::new(),
            events,
            started: Instant::now(),
            extras,
            disks: [None, None],
            disk_faults: [faultfs::Fault::Ok; 2],
            opts,
            net,
        };
        if lab.extras.fault_disks {
            for node in [Node::A, Node::B] {
                lab.mount_disk(node)?;
            }
        }
        let gw = lab
            .spawn(Host::Gateway, &["gateway-serve".into(), GATEWAY_TCP_PORT.to_string()], "gateway.log")
            .context("start the gateway's listener")?;
        lab.helpers.push(gw);
        for node in [Node::A, Node::B] {
            lab.start_broker(node)?;
            let out = lab.opts.dir.join(format!("roles-{}.jsonl", node.name()));
            let args = [
                "monitor".to_string(),
                "--node".into(),
                node.name().into(),
                "--addr".into(),
                format!("127.0.0.1:{CLIENT_PORT}"),
                "--out".into(),
                out.display().to_string(),
            ];
            let m = lab.spawn(node.host(), &args, &format!("monitor-{}.log", node.name()))?;
            lab.helpers.push(m);
        }
        let since = now_us();
        lab.wait("both brokers answering", since, Duration::from_secs(30), |a, b| {
            a.role.is_some() && b.role.is_some()
        })?;
        Ok(lab)
    }

    fn spawn(&self, host: Host, args: &[String], log: &str) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.opts.dir.join(log))?;
        self.net
            .command_in(host, &self.opts.exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start `{}` in {}", args.join(" "), self.net.ns(host)))
    }

    /// The node's data directory (a faultfs mount with `fault_disks`).
    pub fn data_dir(&self, node: Node) -> PathBuf {
        self.opts.dir.join(format!("{}-data", node.name()))
    }

    fn mount_disk(&mut self, node: Node) -> anyhow::Result<()> {
        let backing = self.opts.dir.join("disks").join(node.name());
        let mnt = self.data_dir(node);
        std::fs::create_dir_all(&backing)?;
        std::fs::create_dir_all(&mnt)?;
        let mount = faultfs::mount(&MountOptions::new(&backing, &mnt))
            .with_context(|| format!("faultfs for {}'s data directory", node.name()))?;
        net::unmount_on_signal(&mnt);
        self.disks[node.index()] = Some(mount);
        Ok(())
    }

    fn broker_args(&self, node: Node) -> Vec<String> {
        let t = self.opts.timings;
        let (peer_ha, peer_switch, priority) = match node {
            Node::A => (net::B_HA_IP, net::B_IP, "200"),
            Node::B => (net::A_HA_IP, net::A_IP, "100"),
        };
        let data = self.data_dir(node);
        let mut v = vec![
            "broker".to_string(),
            "--node-id".into(),
            node.name().into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            format!("0.0.0.0:{CLIENT_PORT}"),
            "--ha-listen".into(),
            format!("0.0.0.0:{HA_PORT}"),
            // The dedicated cable first, the client network second.
            "--peer-ha".into(),
            format!("{peer_ha}:{HA_PORT},{peer_switch}:{HA_PORT}"),
            "--peer-client".into(),
            format!("{peer_switch}:{CLIENT_PORT}"),
            "--gateway".into(),
            format!("icmp://{}", net::GATEWAY_IP),
            "--cluster-secret".into(),
            CLUSTER_SECRET.into(),
            "--priority".into(),
            priority.into(),
            "--failback".into(),
            (if self.opts.failback_auto { "auto" } else { "manual" }).into(),
        ];
        v.extend(t.args());
        v.extend(self.extras.broker_args.iter().cloned());
        v
    }

    fn start_broker(&mut self, node: Node) -> anyhow::Result<()> {
        let args = self.broker_args(node);
        let starts = self.brokers[node.index()].starts + 1;
        let log = std::fs::File::create(self.log_path(node, starts))?;
        let child = self
            .net
            .command_in(node.host(), &self.opts.exe)
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start broker {}", node.name()))?;
        let b = &mut self.brokers[node.index()];
        b.child = Some(child);
        b.starts = starts;
        b.frozen = false;
        Ok(())
    }

    pub fn log_path(&self, node: Node, start: u32) -> PathBuf {
        self.opts.dir.join(format!("{}-{start}.log", node.name()))
    }

    /// The node's current log (since its last start), colour codes removed.
    pub fn log(&self, node: Node) -> String {
        let text = std::fs::read_to_string(self.log_path(node, self.brokers[node.index()].starts)).unwrap_or_default();
        strip_ansi(&text)
    }

    /// The last `lines` lines of the node's current log.
    pub fn log_tail(&self, node: Node, lines: usize) -> String {
        let text = self.log(node);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    fn event(&self, name: &str, fault: bool) -> u64 {
        let t = now_us();
        self.events.write(&json!({"t": t, "ev": name, "fault": fault}));
        t
    }

    // ---- faults: cables ----
    //
    // Each event is timestamped once the fault is in effect (the `ip`
    // command returned, the signal was sent), so that nothing sent after
    // that time can still slip through the old path.

    /// Pull these cables at once; returns the event's time.
    pub fn pull(&mut self, cables: &[Cable]) -> anyhow::Result<u64> {
        for c in cables {
            self.net.pull(*c)?;
            if !self.pulled.contains(c) {
                self.pulled.push(*c);
            }
        }
        Ok(self.event(&format!("pull {}", names(cables)), true))
    }

    pub fn replug(&mut self, cables: &[Cable]) -> anyhow::Result<u64> {
        for c in cables {
            self.net.replug(*c)?;
            self.pulled.retain(|p| p != c);
        }
        Ok(self.event(&format!("replug {}", names(cables)), false))
    }

    pub fn netem(&mut self, cable: Cable, args: &[&str]) -> anyhow::Result<u64> {
        self.net.netem(cable, args)?;
        Ok(self.event(&format!("netem {} {}", cable.name(), args.join(" ")), true))
    }

    pub fn netem_off(&mut self, cable: Cable) -> anyhow::Result<u64> {
        self.net.netem_off(cable)?;
        Ok(self.event(&format!("netem {} off", cable.name()), false))
    }

    // ---- faults: processes ----

    /// `kill -9` of these nodes, back to back (SIGKILL first to all, then reap).
    pub fn kill(&mut self, nodes: &[Node]) -> u64 {
        for n in nodes {
            if let Some(c) = &mut self.brokers[n.index()].child {
                let _ = c.kill();
            }
        }
        let label: Vec<&str> = nodes.iter().map(|n| n.name()).collect();
        let t = self.event(&format!("kill -9 {}", label.join("+")), true);
        for n in nodes {
            let b = &mut self.brokers[n.index()];
            if let Some(mut c) = b.child.take() {
                let _ = c.wait();
            }
            b.frozen = false;
        }
        t
    }

    /// Start a killed node again on its data directory.
    pub fn restart(&mut self, node: Node) -> anyhow::Result<u64> {
        if self.brokers[node.index()].child.is_some() {
            bail!("{} is running: kill it first", node.name());
        }
        self.start_broker(node)?;
        Ok(self.event(&format!("restart {}", node.name()), false))
    }

    /// `kill -9` and start again at once: a repair (a node whose disk
    /// failed is restarted once the disk is fixed), logged as one event.
    pub fn reboot(&mut self, node: Node) -> anyhow::Result<u64> {
        let b = &mut self.brokers[node.index()];
        if let Some(mut c) = b.child.take() {
            if b.frozen {
                signal(c.id(), "CONT");
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.start_broker(node)?;
        Ok(self.event(&format!("reboot {}", node.name()), false))
    }

    /// SIGSTOP: the process stays, silent.
    pub fn freeze(&mut self, node: Node) -> anyhow::Result<u64> {
        signal(self.pid(node)?, "STOP");
        self.brokers[node.index()].frozen = true;
        Ok(self.event(&format!("freeze {}", node.name()), true))
    }

    pub fn thaw(&mut self, node: Node) -> anyhow::Result<u64> {
        signal(self.pid(node)?, "CONT");
        self.brokers[node.index()].frozen = false;
        Ok(self.event(&format!("thaw {}", node.name()), false))
    }

    /// Whether the node's process runs (frozen or not).
    pub fn running(&self, node: Node) -> bool {
        self.brokers[node.index()].child.is_some()
    }

    pub fn frozen(&self, node: Node) -> bool {
        self.brokers[node.index()].frozen
    }

    // ---- faults: disks ----

    /// Whether the data directories are faultfs mounts.
    pub fn has_fault_disks(&self) -> bool {
        self.disks.iter().all(Option::is_some)
    }

    /// Give the node's disk `fault` (`Fault::Ok` repairs it); returns the
    /// event's time. Only with [`LabExtras::fault_disks`].
    pub fn disk_fault(&mut self, node: Node, fault: faultfs::Fault) -> anyhow::Result<u64> {
        let Some(disk) = &self.disks[node.index()] else {
            bail!("{}'s data directory is not on faultfs", node.name());
        };
        disk.set(fault)?;
        self.disk_faults[node.index()] = fault;
        Ok(self.event(&format!("disk {} {fault}", node.name()), fault != faultfs::Fault::Ok))
    }

    /// The fault the node's disk has now (`Ok` without faultfs).
    pub fn disk(&self, node: Node) -> faultfs::Fault {
        self.disk_faults[node.index()]
    }

    /// The faultfs status of the node's disk (requests served, injected, ...).
    pub fn disk_status(&self, node: Node) -> Option<faultfs::Status> {
        self.disks[node.index()].as_ref().map(FaultMount::status)
    }

    /// Empty a killed node's data directory (a new, blank disk).
    pub fn wipe(&mut self, node: Node) -> anyhow::Result<u64> {
        if self.running(node) {
            bail!("{} is running: kill it first", node.name());
        }
        let dir = self.data_dir(node);
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.with_context(|| format!("remove {}", path.display()))?;
        }
        Ok(self.event(&format!("wipe {}", node.name()), true))
    }

    /// Mark the end of a round in the fault log: every fault repaired, from
    /// here the pair must be back (the checker's `stuck`).
    pub fn mark_settle(&self, name: &str) -> u64 {
        let t = now_us();
        self.events.write(&json!({"t": t, "ev": name, "fault": false, "settle": true}));
        t
    }

    fn pid(&self, node: Node) -> anyhow::Result<u32> {
        match &self.brokers[node.index()].child {
            Some(c) => Ok(c.id()),
            None => bail!("{} is not running", node.name()),
        }
    }

    // ---- roles ----

    /// Read the monitors' new samples; fail if a broker died on its own.
    pub fn refresh(&mut self) -> anyhow::Result<()> {
        for i in 0..2 {
            for line in self.roles[i].read() {
                if let Ok(s) = serde_json::from_str::<Sample>(&line) {
                    self.samples[i].push(s);
                }
            }
        }
        for i in 0..2 {
            let node = self.brokers[i].node;
            if let Some(c) = &mut self.brokers[i].child {
                if let Ok(Some(status)) = c.try_wait() {
                    self.brokers[i].child = None;
                    bail!("broker {} exited by itself ({status}); log:\n{}", node.name(), self.log_tail(node, 40));
                }
            }
        }
        Ok(())
    }

    /// Role changes in the samples read since the last call: (time, node, from, to).
    pub fn role_changes(&mut self) -> Vec<(u64, Node, String, String)> {
        let mut out = Vec::new();
        for node in [Node::A, Node::B] {
            let i = node.index();
            for k in self.seen[i].max(1)..self.samples[i].len() {
                let (prev, s) = (&self.samples[i][k - 1], &self.samples[i][k]);
                if prev.role() != s.role() {
                    out.push((s.t1, node, prev.role().to_string(), s.role().to_string()));
                }
            }
            self.seen[i] = self.samples[i].len();
        }
        out.sort_by_key(|c| c.0);
        out
    }

    /// Every sample of `node` read so far.
    pub fn samples(&self, node: Node) -> &[Sample] {
        &self.samples[node.index()]
    }

    /// The latest sample of `node` whose request went out at or after `since`.
    pub fn latest(&self, node: Node, since: u64) -> Option<&Sample> {
        self.samples[node.index()].last().filter(|s| s.t0 >= since)
    }

    /// Poll the monitors until `pred(a, b)` holds for samples taken after
    /// `since` (microseconds), or fail after `timeout` with both nodes'
    /// last status and log lines.
    pub fn wait(
        &mut self,
        what: &str,
        since: u64,
        timeout: Duration,
        pred: impl Fn(&Sample, &Sample) -> bool,
    ) -> anyhow::Result<(Sample, Sample)> {
        let deadline = Instant::now() + timeout;
        loop {
            self.refresh()?;
            if let (Some(a), Some(b)) = (self.latest(Node::A, since), self.latest(Node::B, since)) {
                if pred(a, b) {
                    return Ok((a.clone(), b.clone()));
                }
            }
            if Instant::now() > deadline {
                let show = |n: Node| self.samples[n.index()].last().map_or("none".into(), |s| format!("{s:?}"));
                bail!(
                    "not reached within {timeout:?}: {what}\nlast sample of a: {}\nlast sample of b: {}\n--- log a:\n{}\n--- log b:\n{}",
                    show(Node::A),
                    show(Node::B),
                    self.log_tail(Node::A, 25),
                    self.log_tail(Node::B, 25)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Wait until `active` is active (`active`, not alone) and the other
    /// node is passive and in sync.
    pub fn wait_stable(&mut self, active: Node, since: u64, timeout: Duration) -> anyhow::Result<()> {
        let what = format!("{} active, {} passive and in sync", active.name(), active.other().name());
        self.wait(&what, since, timeout, |a, b| {
            let (x, y) = if active == Node::A { (a, b) } else { (b, a) };
            x.role() == "active" && y.is_in_sync_passive()
        })
        .map(|_| ())
    }

    /// Wait until one node is active and the other in sync; returns the active one.
    pub fn wait_any_stable(&mut self, since: u64, timeout: Duration) -> anyhow::Result<Node> {
        let (a, _) = self.wait("one active, the other passive and in sync", since, timeout, |a, b| {
            (a.role() == "active" && b.is_in_sync_passive()) || (b.role() == "active" && a.is_in_sync_passive())
        })?;
        Ok(if a.role() == "active" { Node::A } else { Node::B })
    }

    /// Let `d` pass (during a fault), reading the monitors meanwhile.
    pub fn hold(&mut self, d: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.refresh()?;
            std::thread::sleep(Duration::from_millis(25).min(end.saturating_duration_since(Instant::now())));
        }
        self.refresh()
    }

    // ---- workload and checker ----

    /// The workload's flags: both nodes, queue `lab`, 200 messages/s with
    /// up to 32 in flight, at most 15 minutes and 200,000 messages, a
    /// failover of up to 30 s without errors.
    pub fn workload_args(&self) -> WorkloadArgs {
        WorkloadArgs {
            servers: vec![Node::A.client_addr(), Node::B.client_addr()],
            queue: "lab".into(),
            out: self.opts.dir.join("workload.jsonl"),
            rate: 200,
            window: 32,
            size: 128,
            max_messages: 200_000,
            max_seconds: 900,
            failover_timeout_s: 30,
            slow_every: 0,
        }
    }

    /// Start a workload on the client host and wait for its first message to
    /// go round (which also creates the queue, before any fault).
    pub fn start_workload(&self, args: &WorkloadArgs) -> anyhow::Result<Workload> {
        let command = self.net.command_in(Host::Client, &self.opts.exe);
        let mut w = Workload::spawn(command, args, &self.opts.dir.join("workload.log"))?;
        w.wait_ready(Duration::from_secs(30))?;
        Ok(w)
    }

    /// Run the checker on what was recorded so far.
    pub fn report(&self, title: &str) -> Report {
        self.events.flush();
        checker::check(&self.opts.dir, title)
    }

    fn stop_processes(&mut self) {
        for b in &mut self.brokers {
            if let Some(mut c) = b.child.take() {
                if b.frozen {
                    signal(c.id(), "CONT");
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for mut h in self.helpers.drain(..) {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_processes();
        // `net` drops next: it deletes the namespaces.
    }
}

/// Data directories of labs (`.../a-data`, `.../b-data`) still mounted on a
/// faultfs whose server is gone (a nemesis killed before it unmounted):
/// listing them fails with ENOTCONN. Live mounts are left alone.
pub fn stale_disk_mounts() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (fields, rest) = l.split_once(" - ")?;
            let mut tail = rest.split(' ');
            let (fstype, source) = (tail.next()?, tail.next()?);
            let mnt = PathBuf::from(fields.split(' ').nth(4)?);
            let data_dir = mnt.file_name().is_some_and(|n| n == "a-data" || n == "b-data");
            (fstype.starts_with("fuse") && source == "faultfs" && data_dir).then_some(mnt)
        })
        .filter(|mnt| {
            std::fs::read_dir(mnt).err().and_then(|e| e.raw_os_error()) == Some(nix::errno::Errno::ENOTCONN as i32)
        })
        .collect()
}

/// The daemon colours its log even into a file; drop the escape sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn names(cables: &[Cable]) -> String {
    cables.iter().map(|c| c.name()).collect::<Vec<_>>().join("+")
}
