//! The operator's side: `cable-lab up` keeps a lab running in the
//! foreground and takes commands from its prompt (stdin) and from other
//! terminals (`cable-lab pull a-switch` sends the same line over a Unix
//! socket, `/run/cable-lab/<tag>.sock`, and prints the answer). One lab
//! process owns every broker, so a restarted node is its child like the
//! first one and everything goes away with it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

use super::lab::{Lab, Node};
use super::monitor::Sample;
use super::net::Cable;
use super::proc::now_us;
use super::workload::Workload;

/// Where running labs listen for commands.
pub const SOCKET_DIR: &str = "/run/cable-lab";

pub const HELP: &str = "\
commands (at the prompt, or from another terminal as `cable-lab [--lab TAG] COMMAND`):
  pull CABLE...        pull cables at once: a-switch b-switch ha gateway client
  replug CABLE...      plug them back
  kill NODE...         kill -9 a node (a, b, or both: kill a b)
  restart NODE         start a killed node again on its data
  freeze NODE          SIGSTOP (the process stays, silent)
  thaw NODE            SIGCONT
  netem CABLE ARGS     tc netem on both ends, e.g. netem a-switch delay 50ms loss 5%
  netem CABLE off      remove it
  status               each node's role, epoch, peer and gateway view; cables pulled
  load start|stop      start a producer and a consumer on the client host / stop
                       them, drain, and print the checker's report
  report               the checker's report on what was recorded so far
  help                 this
  quit                 tear the lab down and exit (also Ctrl-C)";

/// One parsed command.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Pull(Vec<Cable>),
    Replug(Vec<Cable>),
    Kill(Vec<Node>),
    Restart(Node),
    Freeze(Node),
    Thaw(Node),
    Netem(Cable, Vec<String>),
    NetemOff(Cable),
    Status,
    LoadStart,
    LoadStop,
    Report,
    Help,
    Quit,
}

pub fn parse(words: &[&str]) -> Result<Op, String> {
    let cables = |ws: &[&str]| -> Result<Vec<Cable>, String> {
        if ws.is_empty() {
            return Err("name a cable: a-switch b-switch ha gateway client".into());
        }
        ws.iter().map(|w| Cable::parse(w).ok_or_else(|| format!("no cable `{w}`"))).collect()
    };
    let nodes = |ws: &[&str]| -> Result<Vec<Node>, String> {
        if ws.is_empty() {
            return Err("name a node: a or b".into());
        }
        ws.iter().map(|w| Node::parse(w).ok_or_else(|| format!("no node `{w}` (a or b)"))).collect()
    };
    let one_node = |ws: &[&str]| -> Result<Node, String> {
        match nodes(ws)?.as_slice() {
            [n] => Ok(*n),
            _ => Err("name one node: a or b".into()),
        }
    };
    match words {
        ["pull", rest @ ..] => cables(rest).map(Op::Pull),
        ["replug", rest @ ..] => cables(rest).map(Op::Replug),
        ["kill", rest @ ..] => nodes(rest).map(Op::Kill),
        ["restart", rest @ ..] => one_node(rest).map(Op::Restart),
        ["freeze", rest @ ..] => one_node(rest).map(Op::Freeze),
        ["thaw", rest @ ..] => one_node(rest).map(Op::Thaw),
        ["netem", cable, "off"] => cables(&[cable]).map(|c| Op::NetemOff(c[0])),
        ["netem", cable, args @ ..] if !args.is_empty() => {
            cables(&[cable]).map(|c| Op::Netem(c[0], args.iter().map(|s| s.to_string()).collect()))
        }
        ["status"] => Ok(Op::Status),
        ["load", "start"] => Ok(Op::LoadStart),
        ["load", "stop"] => Ok(Op::LoadStop),
        ["report"] => Ok(Op::Report),
        ["help"] | ["?"] => Ok(Op::Help),
        ["quit"] | ["exit"] => Ok(Op::Quit),
        [] => Err("empty command".into()),
        _ => Err(format!("unknown command `{}` (try `help`)", words.join(" "))),
    }
}

/// One line about a node's last sample.
pub fn describe(node: Node, s: Option<&Sample>) -> String {
    let Some(s) = s else { return format!("{}: no status yet", node.name()) };
    if s.role.is_none() {
        return format!("{}: no answer (killed, frozen or starting)", node.name());
    }
    format!(
        "{}: {}{} (epoch {}, last op {}, peer {}, gateway {})",
        node.name(),
        s.role(),
        if s.in_sync == Some(true) && !s.is_active() { ", in sync" } else { "" },
        s.epoch.unwrap_or(0),
        s.last_op.unwrap_or(0),
        s.peer.as_deref().unwrap_or("?"),
        if s.gateway == Some(true) { "reachable" } else { "unreachable" }
    )
}

/// A lab with an optional workload, driven by commands.
pub struct Session {
    pub lab: Lab,
    pub workload: Option<Workload>,
}

impl Session {
    /// Carry out one command; the answer to print.
    pub fn execute(&mut self, op: Op) -> anyhow::Result<String> {
        let lab = &mut self.lab;
        Ok(match op {
            Op::Pull(c) => {
                lab.pull(&c)?;
                format!("pulled {}", cable_names(&c))
            }
            Op::Replug(c) => {
                lab.replug(&c)?;
                format!("replugged {}", cable_names(&c))
            }
            Op::Kill(n) => {
                lab.kill(&n);
                "killed (SIGKILL)".into()
            }
            Op::Restart(n) => {
                lab.restart(n)?;
                format!("{} restarted", n.name())
            }
            Op::Freeze(n) => {
                lab.freeze(n)?;
                format!("{} frozen (SIGSTOP)", n.name())
            }
            Op::Thaw(n) => {
                lab.thaw(n)?;
                format!("{} thawed (SIGCONT)", n.name())
            }
            Op::Netem(c, args) => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                lab.netem(c, &args)?;
                format!("netem on {}: {}", c.name(), args.join(" "))
            }
            Op::NetemOff(c) => {
                lab.netem_off(c)?;
                format!("netem off on {}", c.name())
            }
            Op::Status => {
                lab.refresh()?;
                let pulled = if lab.pulled.is_empty() { "none".to_string() } else { cable_names(&lab.pulled) };
                let load = match &mut self.workload {
                    Some(w) => {
                        w.refresh();
                        format!("running, {} confirmed", w.confirmed())
                    }
                    None => "stopped".into(),
                };
                format!(
                    "{}\n{}\ncables pulled: {pulled}; load: {load}; files: {}",
                    describe(Node::A, lab.samples(Node::A).last()),
                    describe(Node::B, lab.samples(Node::B).last()),
                    lab.dir().display()
                )
            }
            Op::LoadStart => {
                if self.workload.is_some() {
                    bail!("the load is running already");
                }
                let mut args = lab.workload_args();
                // A new file per load: the checker reads workload.jsonl, so rotate the old one.
                if args.out.exists() {
                    let old = args.out.with_extension(format!("{}.jsonl", now_us()));
                    std::fs::rename(&args.out, old)?;
                }
                args.rate = 100;
                self.workload = Some(lab.start_workload(&args)?);
                "load started: 100 messages/s from the client host, consumed there too".into()
            }
            Op::LoadStop => {
                let Some(mut w) = self.workload.take() else { bail!("no load is running") };
                w.stop(Duration::from_secs(120))?;
                lab.report("operator session").to_string()
            }
            Op::Report => lab.report("operator session (so far)").to_string(),
            Op::Help => HELP.into(),
            Op::Quit => "bye".into(),
        })
    }
}

fn cable_names(c: &[Cable]) -> String {
    c.iter().map(|c| c.name()).collect::<Vec<_>>().join(" ")
}

/// A command line and where its answer goes.
type Request = (String, mpsc::Sender<String>);

/// The control socket; removed when dropped.
struct ControlSocket(PathBuf);

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `cable-lab up`: the prompt loop. Returns when told to quit or stdin ends.
pub fn serve(mut session: Session, say: &dyn Fn(&str)) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<Request>();
    std::fs::create_dir_all(SOCKET_DIR)?;
    let path = PathBuf::from(SOCKET_DIR).join(format!("{}.sock", session.lab.opts.tag));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("bind {}", path.display()))?;
    super::net::remove_on_signal(&path);
    let _socket = ControlSocket(path);
    let stx = tx.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_err() {
                continue;
            }
            let (reply_tx, reply_rx) = mpsc::channel();
            if stx.send((line, reply_tx)).is_err() {
                break;
            }
            let reply = reply_rx.recv().unwrap_or_default();
            let _ = writeln!(&conn, "{reply}");
        }
    });
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        loop {
            print!("cable-lab> ");
            let _ = std::io::stdout().flush();
            let mut line = String::new();
            let line = match stdin.lock().read_line(&mut line) {
                Ok(0) | Err(_) => "quit".to_string(),
                Ok(_) => line,
            };
            let (reply_tx, reply_rx) = mpsc::channel();
            if tx.send((line, reply_tx)).is_err() {
                break;
            }
            match reply_rx.recv() {
                Ok(reply) if reply == "bye" => break,
                Ok(reply) => println!("{reply}"),
                Err(_) => break,
            }
        }
    });
    let t0 = now_us();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((line, reply)) => {
                let words: Vec<&str> = line.split_whitespace().collect();
                let answer = match parse(&words) {
                    Ok(Op::Quit) => {
                        let _ = reply.send("bye".into());
                        return Ok(());
                    }
                    Ok(op) => session.execute(op).unwrap_or_else(|e| format!("error: {e:#}")),
                    Err(e) => format!("error: {e}"),
                };
                let _ = reply.send(answer);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        if let Err(e) = session.lab.refresh() {
            say(&format!("{e:#}"));
        }
        for (t, node, from, to) in session.lab.role_changes() {
            say(&format!("[+{:.2}s] {}: {from} -> {to}", t.saturating_sub(t0) as f64 / 1e6, node.name()));
        }
        if let Some(w) = &mut session.workload {
            for (t, text) in w.new_client_events() {
                say(&format!("[+{:.2}s] client {text}", t.saturating_sub(t0) as f64 / 1e6));
            }
        }
    }
}

/// `cable-lab COMMAND`: send it to the running lab (`tag`, or the only one).
pub fn send(tag: Option<&str>, words: &[String]) -> anyhow::Result<String> {
    let line = words.join(" ");
    parse(&words.iter().map(String::as_str).collect::<Vec<_>>()).map_err(anyhow::Error::msg)?;
    let path = match tag {
        Some(t) => PathBuf::from(SOCKET_DIR).join(format!("{t}.sock")),
        None => {
            let socks: Vec<PathBuf> = std::fs::read_dir(SOCKET_DIR)
                .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "sock")).collect())
                .unwrap_or_default();
            match socks.as_slice() {
                [one] => one.clone(),
                [] => bail!("no lab is running (start one with `cable-lab up`)"),
                _ => bail!("several labs are running ({socks:?}): pick one with --lab TAG"),
            }
        }
    };
    let mut conn = UnixStream::connect(&path).with_context(|| format!("connect to {}", path.display()))?;
    writeln!(conn, "{line}")?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut conn, &mut reply)?;
    Ok(reply.trim_end().to_string())
}
