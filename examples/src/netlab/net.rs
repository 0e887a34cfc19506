//! The lab's network: five namespaces, the cables between them, and the
//! faults that act on cables (pull, replug, netem).
//!
//! Everything is created inside namespaces named `tmqlab-<tag>-<host>`; the
//! root namespace's interfaces, routes and addresses are never touched (each
//! veth is created in the switch namespace with its other end moved straight
//! into its host). Namespaces are registered before they are created, so the
//! signal handler, [`Net`]'s `Drop` and `cable-lab clean` can always remove
//! them and the processes inside them.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::{Mutex, Once};

use anyhow::{bail, Context};

/// Prefix of every namespace the lab creates.
pub const PREFIX: &str = "tmqlab";

/// The client network (the switch): node A, node B, the client host, the gateway.
pub const A_IP: &str = "10.203.0.1";
pub const B_IP: &str = "10.203.0.2";
pub const CLIENT_IP: &str = "10.203.0.100";
pub const GATEWAY_IP: &str = "10.203.0.254";
const CLIENT_NET_PREFIX: u8 = 24;
/// The dedicated HA cable between A and B.
pub const A_HA_IP: &str = "10.203.1.1";
pub const B_HA_IP: &str = "10.203.1.2";
const HA_NET_PREFIX: u8 = 30;

/// One machine of the lab, each its own network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// Holds the bridge `br0`: the switch of the client network.
    Switch,
    Gateway,
    A,
    B,
    Client,
}

impl Host {
    pub const ALL: [Host; 5] = [Host::Switch, Host::Gateway, Host::A, Host::B, Host::Client];

    fn suffix(self) -> &'static str {
        match self {
            Host::Switch => "sw",
            Host::Gateway => "gw",
            Host::A => "a",
            Host::B => "b",
            Host::Client => "client",
        }
    }

    /// This host's address on the client network, and the name of the
    /// switch port (in the switch namespace) its cable plugs into.
    fn switch_port(self) -> Option<(&'static str, &'static str)> {
        match self {
            Host::Switch => None,
            Host::Gateway => Some((GATEWAY_IP, "port-gw")),
            Host::A => Some((A_IP, "port-a")),
            Host::B => Some((B_IP, "port-b")),
            Host::Client => Some((CLIENT_IP, "port-client")),
        }
    }
}

/// A cable an operator can pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cable {
    /// Node A to the switch.
    ASwitch,
    /// Node B to the switch.
    BSwitch,
    /// The dedicated HA cable between A and B.
    Ha,
    /// The gateway to the switch.
    Gateway,
    /// The client host to the switch.
    Client,
}

impl Cable {
    pub const ALL: [Cable; 5] = [Cable::ASwitch, Cable::BSwitch, Cable::Ha, Cable::Gateway, Cable::Client];

    pub fn name(self) -> &'static str {
        match self {
            Cable::ASwitch => "a-switch",
            Cable::BSwitch => "b-switch",
            Cable::Ha => "ha",
            Cable::Gateway => "gateway",
            Cable::Client => "client",
        }
    }

    pub fn parse(s: &str) -> Option<Cable> {
        match s {
            "a-switch" | "a" => Some(Cable::ASwitch),
            "b-switch" | "b" => Some(Cable::BSwitch),
            "ha" => Some(Cable::Ha),
            "gateway" | "gw" => Some(Cable::Gateway),
            "client" => Some(Cable::Client),
            _ => None,
        }
    }

    /// The end that a pull sets down. Switch cables are pulled at the switch,
    /// so the host keeps its interface up with no carrier (its routes stay,
    /// packets vanish: a silent failure, as with a real cable). The HA cable
    /// is a direct veth pair: its A end goes down, B sees no carrier.
    fn pulled_end(self) -> (Host, &'static str) {
        match self {
            Cable::ASwitch => (Host::Switch, "port-a"),
            Cable::BSwitch => (Host::Switch, "port-b"),
            Cable::Gateway => (Host::Switch, "port-gw"),
            Cable::Client => (Host::Switch, "port-client"),
            Cable::Ha => (Host::A, "ha0"),
        }
    }

    /// Both ends, for netem (it shapes what a device sends: both directions).
    fn ends(self) -> [(Host, &'static str); 2] {
        match self {
            Cable::ASwitch => [(Host::Switch, "port-a"), (Host::A, "eth0")],
            Cable::BSwitch => [(Host::Switch, "port-b"), (Host::B, "eth0")],
            Cable::Gateway => [(Host::Switch, "port-gw"), (Host::Gateway, "eth0")],
            Cable::Client => [(Host::Switch, "port-client"), (Host::Client, "eth0")],
            Cable::Ha => [(Host::A, "ha0"), (Host::B, "ha0")],
        }
    }
}

/// Why the lab cannot run here (not root, no `ip`, no namespaces): tests
/// skip loudly on it, the demo exits non-zero with it.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Checks that need no change to the system: root, and `ip` present.
pub fn preflight() -> Result<(), Unavailable> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse::<u32>().ok());
    if euid != Some(0) {
        return Err(Unavailable(format!(
            "the cable-pull lab needs root (network namespaces); running as uid {}",
            euid.map_or("?".into(), |u| u.to_string())
        )));
    }
    match Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => Ok(()),
        _ => Err(Unavailable("the cable-pull lab needs `ip` (Debian package iproute2)".into())),
    }
}

/// Run `ip ARGS`; an error carries the command and its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Names of the namespaces that exist now.
pub fn existing_namespaces() -> BTreeSet<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

/// The namespace of `host` in the lab tagged `tag`.
pub fn ns_name(tag: &str, host: Host) -> String {
    format!("{PREFIX}-{tag}-{}", host.suffix())
}

/// The shell command that removes these namespaces and everything in them.
pub fn cleanup_command(names: &[String]) -> String {
    format!(
        "for ns in {}; do for p in $(ip netns pids $ns); do kill -9 $p; done; ip netns del $ns; done",
        names.join(" ")
    )
}

/// Kill every process inside the lab's namespaces (they are all ours: the
/// brokers, monitors, gateway and workload the lab started there), then
/// delete the namespaces. Safe to call twice.
pub fn destroy(tag: &str) {
    let existing = existing_namespaces();
    for host in Host::ALL {
        let ns = ns_name(tag, host);
        if !existing.contains(&ns) {
            continue;
        }
        let pids = Command::new("ip").args(["netns", "pids", &ns]).output();
        let pids = pids.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
            // A frozen process dies of SIGKILL too; CONT first anyway, so no stopped process lingers.
            super::proc::signal(pid, "CONT");
            super::proc::signal(pid, "KILL");
        }
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
    }
}

/// Tags of labs alive in this process, for the signal handler.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Files and directories the signal handler removes too (control sockets,
/// temporary lab directories), since it exits without running destructors.
static PATHS: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());
/// faultfs mounts (served by this process) the signal handler unmounts
/// before it removes anything.
static MOUNTS: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());
static HANDLER: Once = Once::new();

/// Have the signal handler remove `path` (a file or a directory) as well.
pub fn remove_on_signal(path: &std::path::Path) {
    if let Ok(mut p) = PATHS.lock() {
        p.push(path.to_path_buf());
    }
}

/// Have the signal handler unmount the faultfs mount at `path` (after the
/// lab's processes are gone, before any path is removed).
pub fn unmount_on_signal(path: &std::path::Path) {
    if let Ok(mut m) = MOUNTS.lock() {
        m.push(path.to_path_buf());
    }
}

/// On SIGINT, SIGTERM or SIGHUP: tear down every live lab, then exit 130.
/// Installed once per process, before the first namespace is created.
fn install_signal_handler() {
    HANDLER.call_once(|| {
        let started = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            let Ok(rt) = rt else { return };
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut int), Ok(mut term), Ok(mut hup)) =
                    (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
                else {
                    return;
                };
                let _ = started.0.send(());
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
                let tags = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
                eprintln!("cable-lab: interrupted; tearing down {} lab(s)", tags.len());
                for tag in tags {
                    destroy(&tag);
                }
                for mount in MOUNTS.lock().map(|m| m.clone()).unwrap_or_default() {
                    let _ = crate::faultfs::umount(&mount);
                }
                for path in PATHS.lock().map(|p| p.clone()).unwrap_or_default() {
                    let _ = std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir_all(&path));
                }
                std::process::exit(130);
            });
        });
        // Signals arriving before the handler is registered would kill us
        // with namespaces left behind: wait until it is.
        let _ = started.1.recv_timeout(std::time::Duration::from_secs(5));
    });
}

/// The lab's namespaces and cables. Dropping it removes them all.
pub struct Net {
    pub tag: String,
}

impl Net {
    /// Create the namespaces, the switch and the cables. Refuses (with the
    /// command that cleans them) if any of the lab's namespaces exist.
    pub fn create(tag: &str) -> anyhow::Result<Net> {
        preflight()?;
        let names: Vec<String> = Host::ALL.iter().map(|h| ns_name(tag, *h)).collect();
        let existing = existing_namespaces();
        let clash: Vec<String> = names.iter().filter(|n| existing.contains(*n)).cloned().collect();
        if !clash.is_empty() {
            bail!(
                "the lab's namespaces already exist ({}); remove them with:\n  {}\n(or `cable-lab clean` for every lab whose process is gone)",
                clash.join(", "),
                cleanup_command(&clash)
            );
        }
        install_signal_handler();
        LIVE.lock().expect("lab registry lock").push(tag.to_string());
        // From here on, Drop (or the signal handler) undoes whatever was created.
        let net = Net { tag: tag.to_string() };
        if let Err(e) = ip(&["netns", "add", &net.ns(Host::Switch)]) {
            return Err(Unavailable(format!("cannot create a network namespace: {e:#}")).into());
        }
        net.build().context("build the lab network")?;
        Ok(net)
    }

    pub fn ns(&self, host: Host) -> String {
        ns_name(&self.tag, host)
    }

    fn build(&self) -> anyhow::Result<()> {
        let sw = self.ns(Host::Switch);
        for host in Host::ALL {
            if host != Host::Switch {
                ip(&["netns", "add", &self.ns(host)])?;
            }
            ip(&["-n", &self.ns(host), "link", "set", "dev", "lo", "up"])?;
        }
        ip(&["-n", &sw, "link", "add", "name", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "dev", "br0", "up"])?;
        for host in [Host::A, Host::B, Host::Gateway, Host::Client] {
            let (addr, port) = host.switch_port().expect("every host but the switch has a switch port");
            let ns = self.ns(host);
            ip(&["-n", &sw, "link", "add", "name", port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &sw, "link", "set", "dev", port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", "dev", port, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/{CLIENT_NET_PREFIX}"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "dev", "eth0", "up"])?;
        }
        let (a, b) = (self.ns(Host::A), self.ns(Host::B));
        ip(&["-n", &a, "link", "add", "name", "ha0", "type", "veth", "peer", "name", "ha0", "netns", &b])?;
        ip(&["-n", &a, "addr", "add", &format!("{A_HA_IP}/{HA_NET_PREFIX}"), "dev", "ha0"])?;
        ip(&["-n", &b, "addr", "add", &format!("{B_HA_IP}/{HA_NET_PREFIX}"), "dev", "ha0"])?;
        ip(&["-n", &a, "link", "set", "dev", "ha0", "up"])?;
        ip(&["-n", &b, "link", "set", "dev", "ha0", "up"])?;
        Ok(())
    }

    pub fn pull(&self, cable: Cable) -> anyhow::Result<()> {
        let (host, dev) = cable.pulled_end();
        ip(&["-n", &self.ns(host), "link", "set", "dev", dev, "down"])
    }

    pub fn replug(&self, cable: Cable) -> anyhow::Result<()> {
        let (host, dev) = cable.pulled_end();
        ip(&["-n", &self.ns(host), "link", "set", "dev", dev, "up"])
    }

    /// `tc qdisc replace ... netem ARGS` on both ends of `cable` (e.g.
    /// `delay 50ms loss 5%`). Fails where the kernel has no sch_netem.
    pub fn netem(&self, cable: Cable, args: &[&str]) -> anyhow::Result<()> {
        for (host, dev) in cable.ends() {
            let ns = self.ns(host);
            let mut v = vec!["-n", &ns, "qdisc", "replace", "dev", dev, "root", "netem"];
            v.extend_from_slice(args);
            run("tc", &v).context("netem (the kernel needs the sch_netem module)")?;
        }
        Ok(())
    }

    /// Remove netem from both ends of `cable`.
    pub fn netem_off(&self, cable: Cable) -> anyhow::Result<()> {
        for (host, dev) in cable.ends() {
            // Nothing to delete is fine.
            let _ = run("tc", &["-n", &self.ns(host), "qdisc", "del", "dev", dev, "root"]);
        }
        Ok(())
    }

    /// `ip netns exec <host's namespace> program`: the way every process of
    /// the lab is started (ip execs the program, so the child's pid is it).
    pub fn command_in(&self, host: Host, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(program);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        destroy(&self.tag);
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|t| *t != self.tag);
        }
    }
}

/// Labs whose namespaces exist but whose owning process is gone (the tag
/// starts with the owner's pid): `cable-lab clean` removes them.
pub fn stale_tags() -> Vec<String> {
    let mut tags = BTreeSet::new();
    for ns in existing_namespaces() {
        let Some(rest) = ns.strip_prefix(&format!("{PREFIX}-")) else { continue };
        let Some((tag, _host)) = rest.rsplit_once('-') else { continue };
        let pid: String = tag.chars().take_while(char::is_ascii_digit).collect();
        let alive = !pid.is_empty() && std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            tags.insert(tag.to_string());
        }
    }
    tags.into_iter().collect()
}
