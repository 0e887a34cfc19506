//! `cable-lab nemesis`: every fault the lab has, in an order a seeded RNG
//! chooses, under a steady load, then the checker.
//!
//! The run is a series of **rounds**. A round injects one fault from the
//! menu, holds it for a random time (shorter or longer than the pair's
//! timeouts), sometimes injects a second one before the first is repaired
//! (on a cable, node or disk the first does not touch), and repairs each at
//! its own deadline, so repairs come in either order. Then, mostly, the
//! round ends with a `settle` mark in the fault log: from there the pair
//! must be back (one node `active`, the other passive and in sync) within
//! 30 s, or the checker calls it stuck; sometimes the next round starts at
//! once, on a pair still recovering.
//!
//! The menu (weights in `MENU`; the first rounds take each kind once, in
//! a seeded order, so that a run of 13 faults or more has them all):
//! - cables ([`Cable`]): one, or several at once (any combination,
//!   gateway and client included), plus what overlaps add;
//! - `kill -9` of the active, of the passive, of both at once, or of one
//!   and then the other; the restarts in random order, the second node
//!   often more than `takeover_delay` after the first (one node alone);
//! - SIGSTOP of either node, shorter or longer than `peer_timeout`;
//! - the stale passive: freeze the passive past `peer_timeout` (the active
//!   confirms alone), kill the active, thaw the passive (or thaw it, then
//!   kill the active at once); the passive must not serve without what the
//!   active confirmed alone; later the active restarts;
//! - a wiped disk: kill a node, empty its data directory, restart it, only
//!   while the other node serves (so every confirmed message is on the
//!   other disk); it must come back passive and resync;
//! - disk faults through faultfs (EIO, ENOSPC, read-only, full, fsyncs
//!   stalled past `disk_stall_ms`) on the active or the passive; the repair
//!   is `ok` and, if the node's status says its disk failed, a restart.
//!   Without faultfs (not root, no `/dev/fuse`) they are left out with a
//!   `SKIPPED:` line.
//!
//! One line is printed per fault (when, what, how long, the repair) and
//! one per round that settles (how long the pair took to be back). The
//! seed fixes the faults, their targets by role and their timings; what
//! the pair does in between is real, so two runs of one seed differ in
//! detail.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::checker::{Report, STUCK_AFTER_US};
use super::lab::{Lab, LabExtras, LabOptions, Node};
use super::monitor::Sample;
use super::net::Cable;
use super::proc::now_us;
use super::workload::Workload;
use crate::faultfs::{self, Fault as DiskFault};

/// The brokers' `disk_stall_ms` in a nemesis run unless told (the daemon's
/// default is 2,000): a flush stalled past 1 s counts as a failed disk, so
/// stalls of 2-4 s are enough.
pub const DISK_STALL_MS: u64 = 1000;

/// The workload's `failover_timeout` in a nemesis run (the lab's is 30 s).
pub const FAILOVER_TIMEOUT_S: u64 = 120;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Faults to inject (each overlap and each compound sequence is one).
    pub faults: usize,
    pub seed: u64,
    /// The brokers' `disk_stall_ms`; stall faults last 1-3 s longer.
    pub disk_stall_ms: u64,
    /// Fault kinds left out (names from [`KINDS`]).
    pub exclude: Vec<String>,
}

impl Options {
    pub fn new(faults: usize, seed: u64) -> Options {
        Options { faults, seed, disk_stall_ms: DISK_STALL_MS, exclude: Vec::new() }
    }
}

/// What a run did.
#[derive(Debug)]
pub struct Outcome {
    pub report: Report,
    pub faults: usize,
    pub rounds: usize,
    /// Faults injected, by kind.
    pub mix: BTreeMap<String, usize>,
    pub wall: Duration,
    /// Disk faults left out, and why.
    pub disks_skipped: Option<String>,
    /// The run stopped early (the lab failed, the pair did not come back).
    pub aborted: Option<String>,
    /// Rounds after which the pair was not back within 30 s, and what the
    /// nemesis did then as an operator would (restart a node whose status
    /// says its disk failed) to go on.
    pub stuck_rounds: Vec<(usize, String)>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.aborted.is_none() && self.report.passed()
    }

    /// One row of docs/FAILOVER.md's nemesis table.
    pub fn summary_line(&self, seed: u64) -> String {
        let r = &self.report;
        format!(
            "{seed} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} s | {}",
            self.faults,
            r.confirmed,
            r.lost.len(),
            r.phantom.len(),
            r.duplicates,
            r.double_active.len() + r.foreign_confirms.len(),
            r.stuck(),
            r.promotions_checked(),
            r.promotions_lacking(),
            self.wall.as_secs_f64(),
            if self.passed() { "pass" } else { "FAIL" }
        )
    }
}

/// A fault of the menu.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    PullOne,
    PullSeveral,
    KillActive,
    KillPassive,
    KillBoth,
    KillStaggered,
    FreezeActive,
    FreezePassive,
    StalePassive,
    WipePassive,
    WipeActive,
    DiskActive,
    DiskPassive,
}

/// Every fault kind by the name `--exclude` takes.
pub const KINDS: [(&str, Kind); 13] = [
    ("pull-one", Kind::PullOne),
    ("pull-several", Kind::PullSeveral),
    ("kill-active", Kind::KillActive),
    ("kill-passive", Kind::KillPassive),
    ("kill-both", Kind::KillBoth),
    ("kill-staggered", Kind::KillStaggered),
    ("freeze-active", Kind::FreezeActive),
    ("freeze-passive", Kind::FreezePassive),
    ("stale-passive", Kind::StalePassive),
    ("wipe-passive", Kind::WipePassive),
    ("wipe-active", Kind::WipeActive),
    ("disk-active", Kind::DiskActive),
    ("disk-passive", Kind::DiskPassive),
];

impl Kind {
    fn needs_disks(self) -> bool {
        matches!(self, Kind::DiskActive | Kind::DiskPassive)
    }

    /// A fault held until its repair, which another can overlap; the others
    /// are sequences that repair themselves.
    fn simple(self) -> bool {
        matches!(
            self,
            Kind::PullOne
                | Kind::PullSeveral
                | Kind::KillActive
                | Kind::KillPassive
                | Kind::FreezeActive
                | Kind::FreezePassive
                | Kind::DiskActive
                | Kind::DiskPassive
        )
    }
}

/// The menu and each fault's weight.
const MENU: [(Kind, u32); 13] = [
    (Kind::PullOne, 14),
    (Kind::PullSeveral, 8),
    (Kind::KillActive, 9),
    (Kind::KillPassive, 5),
    (Kind::KillBoth, 6),
    (Kind::KillStaggered, 5),
    (Kind::FreezeActive, 6),
    (Kind::FreezePassive, 5),
    (Kind::StalePassive, 7),
    (Kind::WipePassive, 4),
    (Kind::WipeActive, 3),
    (Kind::DiskActive, 8),
    (Kind::DiskPassive, 7),
];

/// Chance that a second fault overlaps the first; that a round is not
/// waited out before the next (a fault on a recovering pair).
const OVERLAP: f64 = 0.3;
const CHAIN: f64 = 0.15;

/// What a held fault is, for its repair and for what may overlap it.
#[derive(Debug, Clone, PartialEq)]
enum Held {
    Cables(Vec<Cable>),
    Frozen(Node),
    Killed(Node),
    Disk(Node),
}

impl Held {
    fn node(&self) -> Option<Node> {
        match self {
            Held::Cables(_) => None,
            Held::Frozen(n) | Held::Killed(n) | Held::Disk(n) => Some(*n),
        }
    }
}

/// A fault in force and when it was injected.
struct Injected {
    number: usize,
    held: Held,
    what: String,
    at: Instant,
    hold: Duration,
}

struct Nemesis {
    lab: Lab,
    load: Workload,
    rng: StdRng,
    begun: Instant,
    injected: usize,
    limit: usize,
    rounds: usize,
    mix: BTreeMap<String, usize>,
    /// When each node was last started (status samples before it are stale).
    started_at: [u64; 2],
    /// Nodes whose disk had a fault since they last started: if their status
    /// says the disk failed, the repair includes a restart.
    disk_faulted: [bool; 2],
    /// A disk was repaired in this round.
    disk_repaired: bool,
    /// Kinds the menu offers (those not excluded, disks only with faultfs).
    menu: Vec<(Kind, u32)>,
    /// Kinds not picked yet: the first rounds take one of each.
    first_of_each: Vec<Kind>,
    /// Kinds injected at least once.
    done_kinds: std::collections::HashSet<Kind>,
    disk_stall_ms: u64,
    stuck_rounds: Vec<(usize, String)>,
}

fn secs(rng: &mut StdRng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(rng.gen_range(lo..hi))
}

fn idx(n: Node) -> usize {
    match n {
        Node::A => 0,
        Node::B => 1,
    }
}

fn cables(cs: &[Cable]) -> String {
    cs.iter().map(|c| c.name()).collect::<Vec<_>>().join("+")
}

impl Nemesis {
    fn say(&self, line: impl std::fmt::Display) {
        println!("[{:8.2}s] {line}", self.begun.elapsed().as_secs_f64());
    }

    fn count(&mut self, kind: impl Into<String>) -> usize {
        self.injected += 1;
        *self.mix.entry(kind.into()).or_default() += 1;
        self.injected
    }

    fn latest(&self, n: Node) -> Option<&Sample> {
        self.lab.samples(n).last()
    }

    /// The node the monitors last saw serving (`active` or `active-alone`).
    fn active(&self) -> Option<Node> {
        [Node::A, Node::B].into_iter().find(|n| self.latest(*n).is_some_and(Sample::is_active))
    }

    /// Serving now for sure: running, not frozen, its last sample (taken in
    /// the last 500 ms) says active.
    fn serving_now(&self, n: Node) -> bool {
        let fresh = now_us().saturating_sub(500_000);
        self.lab.running(n)
            && !self.lab.frozen(n)
            && self.latest(n).is_some_and(|s| s.is_active() && s.t0 >= fresh && s.t0 >= self.started_at[idx(n)])
    }

    fn by_role(&mut self, active: bool) -> Node {
        match self.active() {
            Some(n) if active => n,
            Some(n) => n.other(),
            None => *[Node::A, Node::B].choose(&mut self.rng).expect("two nodes"),
        }
    }

    /// The next round's fault: every kind of the menu once, in a seeded
    /// order, then by weight.
    fn pick(&mut self) -> Kind {
        if let Some(k) = self.first_of_each.pop() {
            return k;
        }
        let total: u32 = self.menu.iter().map(|(_, w)| w).sum();
        let mut x = self.rng.gen_range(0..total);
        for &(k, w) in &self.menu {
            if x < w {
                return k;
            }
            x -= w;
        }
        self.menu[0].0
    }

    fn offered(&self, kind: Kind) -> bool {
        self.menu.iter().any(|(k, _)| *k == kind)
    }

    fn restart(&mut self, n: Node) -> anyhow::Result<()> {
        self.lab.restart(n)?;
        self.started(n);
        Ok(())
    }

    fn started(&mut self, n: Node) {
        self.started_at[idx(n)] = now_us();
        if self.lab.disk(n) == DiskFault::Ok {
            self.disk_faulted[idx(n)] = false;
        }
    }

    // ---- simple faults ----

    /// Inject a fault of `kind` that touches nothing `held` touches; `None`
    /// if there is none to inject.
    fn inject(&mut self, kind: Kind, held: &[Held]) -> anyhow::Result<Option<Injected>> {
        let busy_node = |n: Node| held.iter().any(|h| h.node() == Some(n));
        let pulled: Vec<Cable> = held
            .iter()
            .flat_map(|h| match h {
                Held::Cables(c) => c.clone(),
                _ => Vec::new(),
            })
            .collect();
        let short_or_long = |rng: &mut StdRng, short: (f64, f64), long: (f64, f64)| {
            if rng.gen_bool(0.5) {
                secs(rng, short.0, short.1)
            } else {
                secs(rng, long.0, long.1)
            }
        };
        let injected = match kind {
            Kind::PullOne | Kind::PullSeveral => {
                let mut free: Vec<Cable> = Cable::ALL.iter().copied().filter(|c| !pulled.contains(c)).collect();
                if free.is_empty() {
                    return Ok(None);
                }
                free.shuffle(&mut self.rng);
                let n = if kind == Kind::PullOne { 1 } else { self.rng.gen_range(2..=free.len().max(2)) };
                free.truncate(n);
                let hold = short_or_long(&mut self.rng, (0.2, 1.2), (1.5, 6.0));
                self.lab.pull(&free)?;
                let number = self.count(if free.len() == 1 { "pull one cable" } else { "pull cables at once" });
                Injected {
                    number,
                    what: format!("pull {}", cables(&free)),
                    held: Held::Cables(free),
                    at: Instant::now(),
                    hold,
                }
            }
            Kind::KillActive | Kind::KillPassive => {
                let n = self.by_role(kind == Kind::KillActive);
                if busy_node(n) {
                    return Ok(None);
                }
                let role = self.latest(n).map_or("?", Sample::role).to_string();
                let hold = secs(&mut self.rng, 0.3, 5.0);
                self.lab.kill(&[n]);
                let number =
                    self.count(if kind == Kind::KillActive { "kill -9 the active" } else { "kill -9 the passive" });
                Injected {
                    number,
                    what: format!("kill -9 {} ({role})", n.name()),
                    held: Held::Killed(n),
                    at: Instant::now(),
                    hold,
                }
            }
            Kind::FreezeActive | Kind::FreezePassive => {
                let n = self.by_role(kind == Kind::FreezeActive);
                if busy_node(n) || !self.lab.running(n) {
                    return Ok(None);
                }
                let role = self.latest(n).map_or("?", Sample::role).to_string();
                let long = self.rng.gen_bool(0.5);
                let hold = if long { secs(&mut self.rng, 1.3, 5.0) } else { secs(&mut self.rng, 0.2, 0.8) };
                self.lab.freeze(n)?;
                let whom = if kind == Kind::FreezeActive { "the active" } else { "the passive" };
                let how = if long { "past peer_timeout" } else { "under peer_timeout" };
                let number = self.count(format!("freeze {whom}, {how}"));
                Injected {
                    number,
                    what: format!("freeze {} ({role})", n.name()),
                    held: Held::Frozen(n),
                    at: Instant::now(),
                    hold,
                }
            }
            Kind::DiskActive | Kind::DiskPassive => {
                let n = self.by_role(kind == Kind::DiskActive);
                // Up and answering since its last start: a store that cannot
                // open at start is a refusal to start, not this fault.
                let up = self.latest(n).is_some_and(|s| s.role.is_some() && s.t0 > self.started_at[idx(n)]);
                if busy_node(n) || !self.lab.running(n) || !up {
                    return Ok(None);
                }
                let role = self.latest(n).map_or("?", Sample::role).to_string();
                let (fault, hold) = match self.rng.gen_range(0..5) {
                    0 => (DiskFault::Eio, secs(&mut self.rng, 1.0, 4.0)),
                    1 => (DiskFault::Enospc, secs(&mut self.rng, 1.0, 4.0)),
                    2 => (DiskFault::ReadOnly, secs(&mut self.rng, 1.0, 4.0)),
                    3 => {
                        // Full a little above what the disk holds now.
                        let used = dir_size(&self.lab.dir().join("disks").join(n.name()));
                        let bytes = used + self.rng.gen_range(0..256 * 1024);
                        (DiskFault::Full { bytes }, secs(&mut self.rng, 1.0, 4.0))
                    }
                    _ => {
                        let ms = self.disk_stall_ms + self.rng.gen_range(1000..3000);
                        let writes = self.rng.gen_bool(0.5);
                        let hold = Duration::from_millis(ms) + secs(&mut self.rng, 0.5, 1.5);
                        (DiskFault::Stall { ms, writes }, hold)
                    }
                };
                self.lab.disk_fault(n, fault)?;
                self.disk_faulted[idx(n)] = true;
                let what = match fault {
                    DiskFault::Stall { .. } => "stall".to_string(),
                    DiskFault::Full { .. } => "full".to_string(),
                    f => f.to_string(),
                };
                let whom = if kind == Kind::DiskActive { "the active" } else { "the passive" };
                let kind = format!("disk {what}, {whom}");
                let number = self.count(kind);
                Injected {
                    number,
                    what: format!("disk {} {fault} ({role})", n.name()),
                    held: Held::Disk(n),
                    at: Instant::now(),
                    hold,
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(injected))
    }

    fn repair(&mut self, f: Injected) -> anyhow::Result<()> {
        let held_for = f.at.elapsed().as_secs_f64();
        let repair = match &f.held {
            Held::Cables(cs) => {
                if cs.len() > 1 && self.rng.gen_bool(0.5) {
                    // One at a time, in random order.
                    let mut order = cs.clone();
                    order.shuffle(&mut self.rng);
                    for (i, c) in order.iter().enumerate() {
                        if i > 0 {
                            let gap = secs(&mut self.rng, 0.0, 0.8);
                            self.lab.hold(gap)?;
                        }
                        self.lab.replug(&[*c])?;
                    }
                    format!("replug {} one by one", cables(&order))
                } else {
                    self.lab.replug(cs)?;
                    format!("replug {}", cables(cs))
                }
            }
            Held::Frozen(n) => {
                self.lab.thaw(*n)?;
                format!("thaw {}", n.name())
            }
            Held::Killed(n) => {
                self.restart(*n)?;
                format!("restart {}", n.name())
            }
            Held::Disk(n) => {
                self.lab.disk_fault(*n, DiskFault::Ok)?;
                self.disk_repaired = true;
                format!("disk {} ok", n.name())
            }
        };
        self.say(format!("#{} {} for {held_for:.2} s -> {repair}", f.number, f.what));
        Ok(())
    }

    /// A simple fault, maybe a second one over it, each repaired at its own deadline.
    fn simple_round(&mut self, kind: Kind) -> anyhow::Result<()> {
        let Some(first) = self.inject(kind, &[])? else { return Ok(()) };
        let mut open = vec![first];
        if self.injected < self.limit && self.rng.gen_bool(OVERLAP) {
            let lead = open[0].hold.mul_f64(self.rng.gen_range(0.2..0.9));
            self.lab.hold(lead)?;
            let simple: Vec<Kind> = self.menu.iter().map(|(k, _)| *k).filter(|k| k.simple()).collect();
            let second = *simple.choose(&mut self.rng).expect("a simple kind");
            let held: Vec<Held> = open.iter().map(|f| f.held.clone()).collect();
            if let Some(f) = self.inject(second, &held)? {
                self.say(format!("#{} {} (over #{})", f.number, f.what, open[0].number));
                open.push(f);
            }
        }
        while !open.is_empty() {
            open.sort_by_key(|f| f.at + f.hold);
            let f = open.remove(0);
            self.lab.hold((f.at + f.hold).saturating_duration_since(Instant::now()))?;
            self.repair(f)?;
        }
        Ok(())
    }

    // ---- sequences ----

    /// Restart both (killed) nodes in random order: the second one either
    /// soon after the first or after more than `takeover_delay` (1.5 s),
    /// with the first one alone meanwhile.
    fn restart_both(&mut self) -> anyhow::Result<String> {
        let first = *[Node::A, Node::B].choose(&mut self.rng).expect("two nodes");
        let gap = if self.rng.gen_bool(0.5) { secs(&mut self.rng, 0.0, 1.0) } else { secs(&mut self.rng, 1.6, 6.0) };
        self.restart(first)?;
        self.lab.hold(gap)?;
        let alone = self.latest(first).map_or("?", Sample::role).to_string();
        self.restart(first.other())?;
        Ok(format!(
            "restart {}, {} {:.2} s later (meanwhile {} was {alone})",
            first.name(),
            first.other().name(),
            gap.as_secs_f64(),
            first.name()
        ))
    }

    fn kill_both(&mut self) -> anyhow::Result<bool> {
        self.lab.kill(&[Node::A, Node::B]);
        let number = self.count("kill -9 both at once");
        let down = secs(&mut self.rng, 0.3, 2.0);
        self.lab.hold(down)?;
        let repair = self.restart_both()?;
        self.say(format!("#{number} kill -9 a+b, down {:.2} s -> {repair}", down.as_secs_f64()));
        Ok(true)
    }

    fn kill_staggered(&mut self) -> anyhow::Result<bool> {
        let active_first = self.rng.gen_bool(0.5);
        let first = self.by_role(active_first);
        let role = self.latest(first).map_or("?", Sample::role).to_string();
        self.lab.kill(&[first]);
        let number = self.count("kill -9 one, then the other");
        let between = secs(&mut self.rng, 0.2, 3.0);
        self.lab.hold(between)?;
        let second = first.other();
        let role2 = self.latest(second).map_or("?", Sample::role).to_string();
        self.lab.kill(&[second]);
        let down = secs(&mut self.rng, 0.3, 2.0);
        self.lab.hold(down)?;
        let repair = self.restart_both()?;
        self.say(format!(
            "#{number} kill -9 {} ({role}), {:.2} s later {} ({role2}), down {:.2} s -> {repair}",
            first.name(),
            between.as_secs_f64(),
            second.name(),
            down.as_secs_f64()
        ));
        Ok(true)
    }

    /// Freeze the in-sync passive past `peer_timeout` (the active goes on
    /// alone), kill the active, thaw the passive, which must wait for it.
    fn stale_passive(&mut self) -> anyhow::Result<bool> {
        let Some(a) = self.active().filter(|a| self.serving_now(*a)) else { return Ok(false) };
        let p = a.other();
        if !self.latest(p).is_some_and(Sample::is_in_sync_passive) {
            return Ok(false);
        }
        self.lab.freeze(p)?;
        let number = self.count("stale passive");
        let frozen = secs(&mut self.rng, 1.3, 4.0);
        self.lab.hold(frozen)?;
        let alone = self.latest(a).map_or("?", Sample::role).to_string();
        let order = if self.rng.gen_bool(0.6) {
            self.lab.kill(&[a]);
            let gap = secs(&mut self.rng, 0.0, 0.5);
            self.lab.hold(gap)?;
            self.lab.thaw(p)?;
            format!("kill -9 {}, {:.2} s later thaw {}", a.name(), gap.as_secs_f64(), p.name())
        } else {
            self.lab.thaw(p)?;
            let gap = secs(&mut self.rng, 0.0, 0.3);
            self.lab.hold(gap)?;
            self.lab.kill(&[a]);
            format!("thaw {}, {:.2} s later kill -9 {}", p.name(), gap.as_secs_f64(), a.name())
        };
        let wait = secs(&mut self.rng, 1.5, 5.0);
        self.lab.hold(wait)?;
        let meanwhile = self.latest(p).map_or("?", Sample::role).to_string();
        self.restart(a)?;
        self.say(format!(
            "#{number} stale passive: freeze {} {:.2} s ({} was {alone}), {order}; {:.2} s later ({} {meanwhile}) restart {}",
            p.name(),
            frozen.as_secs_f64(),
            a.name(),
            wait.as_secs_f64(),
            p.name(),
            a.name()
        ));
        Ok(true)
    }

    /// Kill a node, empty its disk while the other serves, restart it.
    fn wipe(&mut self, active: bool) -> anyhow::Result<bool> {
        let Some(serving) = self.active().filter(|a| self.serving_now(*a)) else { return Ok(false) };
        let target = if active { serving } else { serving.other() };
        if self.lab.disk(target) != DiskFault::Ok {
            return Ok(false);
        }
        let role = self.latest(target).map_or("?", Sample::role).to_string();
        let killed = self.lab.kill(&[target]);
        let number = self.count(if active { "wipe the active" } else { "wipe the passive" });
        // The other node must serve (taking over, if the target was active).
        let other = target.other();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.serving_now(other) && self.latest(other).is_some_and(|s| s.t0 > killed)) {
            if Instant::now() > deadline {
                self.restart(target)?;
                self.say(format!(
                    "#{number} kill -9 {} ({role}); not wiped: {} did not serve within 10 s -> restart {}",
                    target.name(),
                    other.name(),
                    target.name()
                ));
                return Ok(true);
            }
            self.lab.hold(Duration::from_millis(25))?;
        }
        self.lab.wipe(target)?;
        let down = secs(&mut self.rng, 0.5, 3.0);
        self.lab.hold(down)?;
        self.restart(target)?;
        self.say(format!(
            "#{number} kill -9 {} ({role}), wipe its disk while {} serves, {:.2} s -> restart {} (blank)",
            target.name(),
            other.name(),
            down.as_secs_f64(),
            target.name()
        ));
        Ok(true)
    }

    // ---- rounds ----

    fn round(&mut self) -> anyhow::Result<()> {
        self.rounds += 1;
        for _ in 0..10 {
            let kind = self.pick();
            let done = match kind {
                Kind::KillBoth => self.kill_both()?,
                Kind::KillStaggered => self.kill_staggered()?,
                Kind::StalePassive => self.stale_passive()?,
                Kind::WipePassive => self.wipe(false)?,
                Kind::WipeActive => self.wipe(true)?,
                simple => {
                    let before = self.injected;
                    self.simple_round(simple)?;
                    self.injected > before
                }
            };
            if done {
                self.done_kinds.insert(kind);
                return Ok(());
            }
            // Not possible in this state: if it never ran, it gets its turn later.
            if !self.done_kinds.contains(&kind) && !self.first_of_each.contains(&kind) {
                self.first_of_each.insert(0, kind);
            }
        }
        // Nothing fitted the pair's state (no active?): a cable then.
        let kind = if self.offered(Kind::PullOne) { Kind::PullOne } else { self.menu[0].0 };
        self.simple_round(kind)
    }

    /// Nodes running and answering whose status, since they last started,
    /// says their disk failed; with `faulted_only`, only those whose disk
    /// had a fault (the repair of a disk fault is `ok`, then a restart).
    fn failed_disks(&self, faulted_only: bool) -> Vec<(Node, String)> {
        [Node::A, Node::B]
            .into_iter()
            .filter(|n| !faulted_only || self.disk_faulted[idx(*n)])
            .filter(|n| self.lab.disk(*n) == DiskFault::Ok && self.lab.running(*n) && !self.lab.frozen(*n))
            .filter_map(|n| {
                let s = self.latest(n).filter(|s| s.t0 > self.started_at[idx(n)])?;
                Some((n, s.disk_failure.clone()?))
            })
            .collect()
    }

    fn reboot(&mut self, n: Node) -> anyhow::Result<()> {
        self.lab.reboot(n)?;
        self.started(n);
        Ok(())
    }

    /// The second half of a disk fault's repair: restart a node whose disk
    /// had a fault and whose status says it failed.
    fn restart_failed_disks(&mut self) -> anyhow::Result<()> {
        for (n, why) in self.failed_disks(true) {
            self.reboot(n)?;
            self.say(format!("    {}'s disk had failed ({why}): restart {}", n.name(), n.name()));
        }
        Ok(())
    }

    /// Wait until one node is active and the other passive and in sync,
    /// completing disk repairs meanwhile; how long it took, or `None`.
    fn wait_back(&mut self, since: u64, timeout: Duration) -> anyhow::Result<Option<(Node, f64)>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.lab.refresh()?;
            if let (Some(a), Some(b)) = (self.lab.latest(Node::A, since), self.lab.latest(Node::B, since)) {
                let back = |x: &Sample, y: &Sample| x.role() == "active" && y.is_in_sync_passive();
                let active = if back(a, b) {
                    Some(Node::A)
                } else if back(b, a) {
                    Some(Node::B)
                } else {
                    None
                };
                if let Some(n) = active {
                    return Ok(Some((n, now_us().saturating_sub(since) as f64 / 1e6)));
                }
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            self.restart_failed_disks()?;
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// After the last repair: mark it, wait until one node is active and
    /// the other in sync, then for a confirm of a message sent after it.
    /// Not back within 30 s is stuck (the checker counts it from the mark):
    /// then, as an operator would, restart a node whose status says its disk
    /// failed, and go on if that brings the pair back.
    fn settle(&mut self) -> anyhow::Result<()> {
        // A fresh status from a node whose disk was just repaired.
        if self.disk_repaired {
            self.lab.hold(Duration::from_millis(300))?;
            self.disk_repaired = false;
        }
        self.restart_failed_disks()?;
        let t = self.lab.mark_settle(&format!("round {} repaired", self.rounds));
        match self.wait_back(t, Duration::from_micros(STUCK_AFTER_US))? {
            Some((n, took)) => {
                self.say(format!("    back in {took:.2} s: {} active, {} in sync", n.name(), n.other().name()));
            }
            None => {
                let show = |n: Node| self.latest(n).map_or("none".into(), |s| format!("{s:?}"));
                self.say(format!(
                    "    STUCK: not back within 30 s of round {}'s last repair\n      a: {}\n      b: {}",
                    self.rounds,
                    show(Node::A),
                    show(Node::B)
                ));
                let failed = self.failed_disks(false);
                if failed.is_empty() {
                    anyhow::bail!(
                        "stuck after round {}, and no node says its disk failed\n--- log a:\n{}\n--- log b:\n{}",
                        self.rounds,
                        self.lab.log_tail(Node::A, 25),
                        self.lab.log_tail(Node::B, 25)
                    );
                }
                let mut what = Vec::new();
                for (n, why) in failed {
                    self.reboot(n)?;
                    what.push(format!("restart {} (its status: disk failed: {why})", n.name()));
                }
                let what = what.join(", ");
                self.say(format!("    operator: {what}"));
                self.stuck_rounds.push((self.rounds, what));
                let again = now_us();
                match self.wait_back(again, Duration::from_micros(STUCK_AFTER_US))? {
                    Some((n, took)) => self.say(format!(
                        "    back {took:.2} s after the operator's restart: {} active, {} in sync",
                        n.name(),
                        n.other().name()
                    )),
                    None => anyhow::bail!("still stuck 30 s after the operator's restart"),
                }
            }
        }
        self.load.wait_confirm_after(t, Duration::from_secs(30)).context("after the pair was back")?;
        Ok(())
    }

    fn run(&mut self) -> anyhow::Result<()> {
        while self.injected < self.limit {
            self.round()?;
            let last = self.injected >= self.limit;
            if last || !self.rng.gen_bool(CHAIN) {
                self.settle()?;
            } else {
                self.restart_failed_disks()?;
                self.say("    (next round at once, on a pair still recovering)");
            }
        }
        Ok(())
    }
}

/// Total size of the files under `dir` (apparent, in bytes).
pub fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Build the lab (data directories on faultfs where possible), start the
/// load, inject `opts.faults` faults, stop the load and check.
pub fn run(lab_opts: LabOptions, opts: &Options) -> anyhow::Result<Outcome> {
    let begun = Instant::now();
    let mut excluded = Vec::new();
    for name in &opts.exclude {
        match KINDS.iter().find(|(n, _)| n == name) {
            Some((_, k)) => excluded.push(*k),
            None => anyhow::bail!(
                "no fault kind `{name}`; kinds: {}",
                KINDS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    // The compactor (off by default) rewrites every record as soon as less
    // than half of it is live: its rewrites meet every fault.
    let broker_args: Vec<String> = [
        "--disk-stall-ms",
        &opts.disk_stall_ms.to_string(),
        "--compaction-bytes-per-sec",
        "33554432",
        "--compaction-min-bytes",
        "0",
        "--compaction-min-age-ms",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut disks_skipped = faultfs::preflight().err().map(|e| format!("{e:#}"));
    let mut lab = None;
    if disks_skipped.is_none() {
        let extras = LabExtras { broker_args: broker_args.clone(), fault_disks: true };
        match Lab::start_with(lab_opts.clone(), extras) {
            Ok(l) => lab = Some(l),
            Err(e) => disks_skipped = Some(format!("faultfs did not mount: {e:#}")),
        }
    }
    if let Some(why) = &disks_skipped {
        println!("SKIPPED: disk faults: {why}");
    }
    let mut lab = match lab {
        Some(l) => l,
        None => Lab::start_with(lab_opts, LabExtras { broker_args, fault_disks: false })?,
    };
    let disks = disks_skipped.is_none();
    let menu: Vec<(Kind, u32)> =
        MENU.iter().copied().filter(|(k, _)| !excluded.contains(k) && (disks || !k.needs_disks())).collect();
    anyhow::ensure!(menu.iter().any(|(k, _)| k.simple()), "every fault that can be held is excluded");
    lab.wait_stable(Node::A, 0, Duration::from_secs(30))?;
    let mut args = lab.workload_args();
    args.max_messages = 100_000_000;
    // Bounded: a round takes seconds; this is far beyond any run that works.
    args.max_seconds = 600 + 60 * opts.faults as u64;
    // Longer than a stuck round (30 s) and the operator's restart after it,
    // so that the run goes on and the checker counts it as stuck; no fault
    // of the menu keeps the pair from serving for more than ~15 s.
    args.failover_timeout_s = FAILOVER_TIMEOUT_S;
    // A slow queue beside the busy one, drained at the end: its messages pin
    // records for the whole run, so the compactor works under every fault.
    args.slow_every = 16;
    args.size = 512;
    let load = lab.start_workload(&args)?;
    let started = now_us();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut first_of_each: Vec<Kind> = menu.iter().map(|(k, _)| *k).collect();
    first_of_each.shuffle(&mut rng);
    let mut n = Nemesis {
        lab,
        load,
        rng,
        begun,
        injected: 0,
        limit: opts.faults,
        rounds: 0,
        mix: BTreeMap::new(),
        started_at: [started; 2],
        disk_faulted: [false; 2],
        disk_repaired: false,
        menu,
        first_of_each,
        done_kinds: std::collections::HashSet::new(),
        disk_stall_ms: opts.disk_stall_ms,
        stuck_rounds: Vec::new(),
    };
    n.say(format!(
        "nemesis seed {}: {} faults; files in {}; a active, b in sync, load running",
        opts.seed,
        opts.faults,
        n.lab.dir().display()
    ));
    if !excluded.is_empty() {
        n.say(format!("left out: {}", opts.exclude.join(", ")));
    }
    let aborted = n.run().err().map(|e| format!("{e:#}"));
    if let Some(e) = &aborted {
        n.say(format!("run stopped: {e}"));
    } else {
        n.lab.hold(Duration::from_secs(1))?;
    }
    n.say("stopping the load; the consumer drains the queue");
    let stopped = n.load.stop(Duration::from_secs(180));
    let report = n.lab.report(&format!("nemesis seed {}", opts.seed));
    let aborted = match (aborted, stopped) {
        (Some(e), _) => Some(e),
        (None, Err(e)) => Some(format!("{e:#}")),
        (None, Ok(())) => None,
    };
    Ok(Outcome {
        report,
        faults: n.injected,
        rounds: n.rounds,
        mix: n.mix,
        wall: begun.elapsed(),
        disks_skipped,
        aborted,
        stuck_rounds: n.stuck_rounds,
    })
}
