//! A deterministic simulator of the pair (DESIGN.md section 1).
//!
//! Two nodes and a gateway, each node made of the very cores a real node
//! runs, the [`RoleCore`] and the replication [`Replica`], around a model of
//! what a real node's threads do with their actions (a store with flushed and
//! unflushed writes, a writer's request queue, a peer monitor's connections
//! on two paths, a gateway prober), over a simulated network and clocks. One
//! seeded random generator decides everything: message latency, client
//! publishes, and faults in any order (crashes and restarts at any step,
//! freezes, cut paths and full partitions, connection resets with frames
//! delivered late, lost gateways, disk errors, stalled flushes, wiped disks,
//! clocks that drift and jump, switchovers, `promote --force`). A failing
//! seed replays exactly, with a trace ([`run`] with `trace`).
//!
//! Checked after every step (see [`Violation`]):
//! - a node that starts serving (a promotion that was not forced) holds
//!   every message confirmed so far, except those its peer confirmed during
//!   an ongoing split (every path between the nodes cut, both seeing the
//!   gateway: DESIGN.md allows both to serve there);
//! - at most one node can confirm at any moment (outside a split and a
//!   short grace after it heals);
//! - once the faults stop, the pair converges (one active, one passive in
//!   sync) and the active holds every message confirmed on either side,
//!   except those whose only copies were on a disk that was wiped.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

use bytes::Bytes;
use twinmq_store::repl::{Action as RA, ConnId, Promotion, ReplFrame, ReplMeta, Replica, ReplicaConfig};
use twinmq_store::Durability;

use crate::decide::PeerView;
use crate::role::{Out, RoleConfig, RoleCore, StoreView};
use crate::wire::{Heartbeat, RoleMsg};

/// A client message, by its unique id.
pub type MsgId = u64;

/// Simulated milliseconds per step.
const STEP_MS: u64 = 5;
/// How often each role core ticks.
const TICK_MS: u64 = 10;

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Steps with faults.
    pub steps: u64,
    /// Most steps to converge once faults stop.
    pub settle_steps: u64,
    /// Chance of a new fault per step.
    pub fault_rate: f64,
    /// Durability of the pair (`replicated` checks promotions; `local` only convergence).
    pub durability: Durability,
    /// How many of the last events a trace keeps.
    pub trace_lines: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            steps: 2000,
            settle_steps: 3000,
            fault_rate: 0.01,
            durability: Durability::Replicated,
            trace_lines: 400,
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct SimStats {
    pub steps: u64,
    pub faults: u64,
    pub confirmed: u64,
    pub promotions: u64,
    pub splits: u64,
    pub destroyed: u64,
    /// Followers caught up from the log, and snapshots sent.
    pub catchups: u64,
    pub snapshots: u64,
    /// The longest time without a confirm while clients were publishing
    /// (simulated ms): how long a fault held producers up.
    pub max_confirm_gap_ms: u64,
    /// The pair's timings in this run (they vary with the seed).
    pub takeover_delay_ms: u64,
    pub disk_stall_ms: u64,
}

/// A broken invariant: the seed, the step and what went wrong.
#[derive(Debug, Clone)]
pub struct Violation {
    pub seed: u64,
    pub step: u64,
    pub what: String,
    /// The last events before it (with `trace`).
    pub trace: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {} step {}: {}", self.seed, self.step, self.what)?;
        for t in &self.trace {
            writeln!(f, "  {t}")?;
        }
        Ok(())
    }
}

/// One fault or repair, for a scripted run ([`run_script`]); node 0 is `a`
/// (the preferred one), node 1 `b`; path 0 is the HA cable, path 1 the client network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// kill -9.
    Kill(usize),
    Restart(usize),
    /// Restart with an empty data directory (a replaced disk).
    RestartWiped(usize),
    /// SIGSTOP for this many milliseconds.
    Freeze(usize, u64),
    Cut(usize),
    Repair(usize),
    LoseGateway(usize),
    Gateway(usize),
    /// Every write and sync fails from now on (until `FixDisk`, which restarts the node).
    DiskFails(usize),
    /// Syncs hang for this many milliseconds.
    DiskStalls(usize, u64),
    /// The disk is nearly full (under `min_free_disk_bytes`) until `FixDisk`;
    /// every write still succeeds.
    DiskNearlyFull(usize),
    FixDisk(usize),
    /// One connection between the nodes is reset (what it carried may still arrive).
    Reset,
    /// The node's clock jumps this far ahead (a suspend).
    ClockJump(usize, u64),
    /// The operator's switchover on the active node.
    Switchover,
    /// The operator's `promote --force` on this node (only while its peer is down).
    ForcePromote(usize),
    /// Publishing stops (`false`) or resumes.
    Traffic(bool),
}

/// Run a fixed schedule of faults (`(ms, fault)`, in time order) instead of
/// random ones, with the same checks, then let the pair settle.
pub fn run_script(seed: u64, script: &[(u64, Fault)], trace: bool) -> Result<SimStats, Violation> {
    let cfg = SimConfig { steps: 0, fault_rate: 0.0, ..SimConfig::default() };
    let mut w = World::new(seed, cfg, trace);
    let end = script.last().map_or(0, |(t, _)| *t) + 1000;
    let mut next = 0;
    w.stats.takeover_delay_ms = w.role_cfg[0].takeover_delay_ms;
    w.stats.disk_stall_ms = w.role_cfg[0].disk_stall_ms;
    while w.now < end {
        w.step += 1;
        while let Some((t, f)) = script.get(next).filter(|(t, _)| *t <= w.now) {
            w.log(|| format!("SCRIPT at {t} ms: {f:?}"));
            w.apply(*f);
            next += 1;
        }
        w.advance();
        w.check_two_servers();
        if let Some(what) = w.violation.take() {
            return Err(w.fail(what));
        }
    }
    w.repair_all();
    // What the script's faults did to producers is measured; the settling is not.
    let faults_gap = w.stats.max_confirm_gap_ms;
    for _ in 0..w.cfg.settle_steps {
        w.step += 1;
        w.advance();
        w.check_two_servers();
        if let Some(what) = w.violation.take() {
            return Err(w.fail(what));
        }
        if w.converged() {
            w.stats.steps = w.step;
            w.stats.confirmed = w.confirmed.len() as u64;
            w.stats.max_confirm_gap_ms = faults_gap;
            return Ok(w.stats);
        }
    }
    let what = format!("stuck: no convergence after the script: {}", w.describe());
    Err(w.fail(what))
}

/// splitmix64: the same seed gives the same run on any machine and version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }
}

fn encode(epoch: u64, msgs: &[MsgId]) -> Bytes {
    let mut v = Vec::with_capacity(8 + 8 * msgs.len());
    v.extend_from_slice(&epoch.to_be_bytes());
    for m in msgs {
        v.extend_from_slice(&m.to_be_bytes());
    }
    Bytes::from(v)
}

fn decode(raw: &[u8]) -> (u64, Vec<MsgId>) {
    let word = |c: &[u8]| u64::from_be_bytes(c.try_into().expect("8 bytes"));
    let epoch = word(&raw[..8]);
    (epoch, raw[8..].chunks_exact(8).map(word).collect())
}

/// A record: (last seq, epoch, messages).
type Rec = (u64, u64, Vec<MsgId>);

/// What a store holds.
#[derive(Debug, Clone, Default)]
struct Image {
    records: BTreeMap<u64, Rec>,
    meta: ReplMeta,
    next_seq: u64,
    handover: BTreeSet<MsgId>,
}

impl Image {
    fn holds(&self, m: MsgId) -> bool {
        self.handover.contains(&m) || self.records.values().any(|(_, _, ms)| ms.contains(&m))
    }
    fn all(&self) -> BTreeSet<MsgId> {
        self.records.values().flat_map(|(_, _, ms)| ms.iter().copied()).collect()
    }
}

#[derive(Debug, Clone)]
enum Write {
    Record(u64, Rec),
    Meta(ReplMeta, u64),
    Handover(Vec<MsgId>, bool),
    Replace(BTreeMap<u64, Rec>),
    /// Records dropped by a catch-up's live lists.
    Drop(Vec<u64>),
    /// A follower's own ops past the fork dropped: the next sequence is `after + 1`.
    Truncate(u64),
}

fn apply_write(img: &mut Image, w: Write) {
    match w {
        Write::Record(first, rec) => {
            img.next_seq = img.next_seq.max(rec.0 + 1);
            img.records.insert(first, rec);
        }
        Write::Meta(m, next_seq) => {
            img.meta = m;
            img.next_seq = img.next_seq.max(next_seq);
        }
        Write::Handover(ids, add) => {
            for id in ids {
                if add {
                    img.handover.insert(id);
                } else {
                    img.handover.remove(&id);
                }
            }
        }
        Write::Replace(records) => {
            // As the store's swap of a loaded snapshot: the next sequence
            // is the snapshot's (set by the `Meta` written with it), not the
            // one of the records replaced.
            img.next_seq = records.values().map(|r| r.0 + 1).max().unwrap_or(1);
            img.records = records;
        }
        Write::Drop(keys) => {
            for k in keys {
                img.records.remove(&k);
            }
        }
        Write::Truncate(after) => {
            img.records.retain(|k, _| *k <= after);
            img.next_seq = after + 1;
        }
    }
}

/// One confirmed message.
#[derive(Debug, Clone, Copy)]
struct Confirmed {
    /// Global time.
    at: u64,
    by: usize,
    /// Single-copy since: the start of the confirming node's time without an
    /// in-sync follower.
    alone: Option<u64>,
    /// The confirming node saw a majority at its last decision (the gateway
    /// reachable, or its peer up): a single-copy confirm may then be one
    /// side of a split (DESIGN.md section 4). Without either it confirms
    /// nothing (it cuts its lease at that decision).
    majority: bool,
}

/// A disk: what survives a crash (`durable`), what the process sees (`current`).
#[derive(Debug, Default)]
struct Disk {
    durable: Image,
    current: Image,
    pending: Vec<Write>,
    staging: Option<BTreeMap<u64, Rec>>,
    /// Every write and flush fails from now on (EIO, ENOSPC, read-only).
    broken: bool,
    /// Under `min_free_disk_bytes`: writes still succeed; the active
    /// refuses new messages (not modelled here) and no role moves.
    nearly_full: bool,
    /// Flushes block until this global time.
    stall_until: u64,
}

impl Disk {
    fn write(&mut self, w: Write) -> Result<(), String> {
        if self.broken {
            return Err("EIO".into());
        }
        apply_write(&mut self.current, w.clone());
        self.pending.push(w);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), String> {
        if self.broken {
            return Err("EIO".into());
        }
        for w in self.pending.drain(..) {
            apply_write(&mut self.durable, w);
        }
        Ok(())
    }
    fn crash(&mut self) {
        self.pending.clear();
        self.staging = None;
        self.current = self.durable.clone();
    }
}

#[derive(Debug, Clone)]
enum Msg {
    Hb(Heartbeat),
    Repl(ReplFrame),
    Role(RoleMsg),
    Handover(Vec<MsgId>),
    HandoverStored(Vec<MsgId>),
}

#[derive(Debug)]
struct Conn {
    path: usize,
    /// Each end is open (the node has not closed it).
    open: [bool; 2],
    /// Messages to node i, with their delivery time.
    to: [VecDeque<(u64, Msg)>; 2],
    /// Each end learned the connection closed (RST/FIN processed).
    closed_seen: [bool; 2],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proc {
    Up,
    Frozen { until: u64 },
    Down,
}

/// Writer requests, processed in order (as the real writer's channel).
#[derive(Debug)]
enum WReq {
    Submit(Vec<MsgId>),
    Frame(ConnId, ReplFrame),
    Attach(ConnId),
    ConnLost(ConnId),
    PeerDown(bool),
    PeerFailed,
    ExpireInSync,
    PrimaryHolds(u64, u64),
    PeerPosition(u64, u64),
    Reaffirm,
    /// With `true`: a vote granted, answered once the floor is durable.
    RaiseFloor(u64, bool),
    Promote {
        at_least: u64,
        in_sync_gen: Option<u64>,
        how: Promotion,
    },
    Demote {
        still: bool,
    },
    Drain {
        deadline: u64,
    },
    StoreHandover(Vec<MsgId>),
    ForgetHandover(Vec<MsgId>),
    WatchdogFailed,
}

/// The shell's steps: a replica action, or what the writer does around it.
#[derive(Debug)]
enum Step {
    Act(RA),
    /// A local commit was flushed: tell the replica.
    Committed {
        first: u64,
        last: u64,
        raw: Bytes,
    },
    /// Flush before what follows.
    Flush,
    /// Promotion finished (after the take-back): report it. `takeover`: it
    /// relied on being in sync (the only kind a split's window excuses).
    Promoted {
        forced: bool,
        takeover: bool,
    },
    Done(Result<(), String>),
    /// A role message that must wait for what came before it to be durable.
    Reply(RoleMsg),
}

struct Node {
    name: &'static str,
    proc: Proc,
    /// Local clock: global * (1e6 + ppm) / 1e6 + offset.
    ppm: i64,
    offset: u64,
    role: RoleCore,
    replica: Replica,
    disk: Disk,
    inbox: VecDeque<WReq>,
    held: VecDeque<(u64, Vec<MsgId>)>,
    /// The writer hangs in a flush until `until` (global); then `rest` runs.
    blocked: Option<(u64, Vec<Step>)>,
    flush_started: Option<u64>,
    watchdog_failed: bool,
    snap: Option<(ConnId, twinmq_store::repl::AttachId, VecDeque<ReplFrame>)>,
    /// A catch-up from the log being sent: the next key to look at.
    catchup: Option<(ConnId, twinmq_store::repl::AttachId, u64)>,
    /// Its own ops dropped past the fork: `Want` goes after the `Live` list through it.
    wanting: Option<(ConnId, twinmq_store::repl::AttachId, u64)>,
    serving: bool,
    /// A drain waits for every held confirm.
    draining: Option<u64>,
    handover_replies: Vec<(u64, Vec<MsgId>)>,
    // The monitor.
    path_conn: [Option<ConnId>; 2],
    path_refused: [bool; 2],
    dial_after: [u64; 2],
    conn_heard: BTreeMap<ConnId, u64>,
    next_hb: u64,
    next_tick: u64,
    next_probe: u64,
    gw_failures: u32,
    gw_reachable: bool,
    /// At its last decision the role saw a majority (the gateway, or its
    /// peer up): what it acts on until the next (a confirm in between was
    /// allowed by it).
    majority: bool,
    attached: Option<(ConnId, u64)>,
    force_pending: bool,
    handover_sent: u64,
}

struct World {
    seed: u64,
    rng: Rng,
    cfg: SimConfig,
    role_cfg: [RoleConfig; 2],
    probe_ms: u64,
    tail_bytes: usize,
    /// Followers further back than the tail catch up from the log (else a snapshot).
    log_catchup: bool,
    now: u64,
    step: u64,
    nodes: Vec<Node>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    paths_up: [bool; 2],
    gw_up: [bool; 2],
    /// Start of the ongoing full partition (every path cut), if any.
    partition_since: Option<u64>,
    /// The last full partition ended here (a grace for the healed split).
    partition_ended: u64,
    /// And began here.
    partition_began: u64,
    /// An operator forced a promotion: the two histories may hold what the
    /// other lacks (like a split) until the pair converges again.
    forced_since: Option<u64>,
    /// A split happened (both nodes served at once, or one took over while
    /// the other served alone behind a partition): until the pair converges
    /// into one history again, what either confirmed alone since may be
    /// missing on the other (DESIGN.md section 4: checked after the heal).
    split_since: Option<u64>,
    next_msg: MsgId,
    /// No client publishes for now.
    quiet: bool,
    last_confirm: Option<u64>,
    /// Confirmed messages.
    confirmed: BTreeMap<MsgId, Confirmed>,
    /// Since when each node confirms without an in-sync follower.
    alone_from: [Option<u64>; 2],
    /// When each node served (promotion done to step-down), global times.
    served: [Vec<(u64, u64)>; 2],
    destroyed: BTreeSet<MsgId>,
    /// Pending repairs: (global time, what).
    repairs: Vec<(u64, Repair)>,
    stats: SimStats,
    trace: Option<VecDeque<String>>,
    violation: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Repair {
    Restart(usize, bool),
    Path(usize),
    Gateway(usize),
    Disk(usize),
}

/// Run `seed` for `cfg.steps` steps with faults, then let the pair settle.
/// `trace`: keep the last events, for a failure report.
pub fn run(seed: u64, cfg: &SimConfig, trace: bool) -> Result<SimStats, Violation> {
    let mut w = World::new(seed, cfg.clone(), trace);
    let total = cfg.steps + cfg.settle_steps;
    while w.step < total {
        w.step += 1;
        if w.step <= cfg.steps {
            w.maybe_fault();
        } else if w.step == cfg.steps + 1 {
            w.repair_all();
            // Settle in silence half of the time.
            w.quiet = w.rng.chance(0.5);
        }
        w.advance();
        w.check_two_servers();
        if (w.forced_since.is_some() || w.split_since.is_some()) && w.converged() {
            w.forced_since = None;
            w.split_since = None;
        }
        if w.violation.is_none() && w.step > cfg.steps + 20 && w.converged() {
            break;
        }
        if let Some(what) = w.violation.take() {
            return Err(w.fail(what));
        }
    }
    if !w.converged() {
        let what = format!(
            "stuck: no convergence within {} steps after the faults stopped: {}",
            cfg.settle_steps,
            w.describe()
        );
        return Err(w.fail(what));
    }
    w.stats.steps = w.step;
    w.stats.confirmed = w.confirmed.len() as u64;
    w.stats.destroyed = w.destroyed.len() as u64;
    Ok(w.stats)
}

impl World {
    fn new(seed: u64, cfg: SimConfig, trace: bool) -> World {
        let mut rng = Rng(seed);
        let hb = [10, 20, 30][rng.below(3) as usize];
        let peer_timeout = hb * rng.range(5, 10);
        // Half the pairs are configured with a longer lease than peer_timeout
        // (any isolation_timeout below takeover_delay is valid). Drawn from
        // a dice of its own, so that the other draws of a seed stay as they were.
        let mut lease_dice = Rng(seed ^ 0x6C65_6173_6520_6469);
        let isolation =
            if lease_dice.chance(0.5) { peer_timeout } else { peer_timeout + lease_dice.range(hb, peer_timeout) };
        let takeover = isolation + hb + rng.range(10, 100);
        let base = |id: &str, priority| RoleConfig {
            node_id: id.into(),
            priority,
            heartbeat_ms: hb,
            peer_timeout_ms: peer_timeout,
            isolation_timeout_ms: isolation,
            takeover_delay_ms: takeover,
            failback_auto: false,
            disk_stall_ms: 300,
        };
        let failback = rng.chance(0.3);
        let role_cfg = [
            RoleConfig { failback_auto: failback, ..base("a", 200) },
            RoleConfig { failback_auto: failback, ..base("b", 100) },
        ];
        let mut w = World {
            seed,
            cfg,
            role_cfg,
            probe_ms: 2 * hb,
            tail_bytes: 0,
            // From the seed, not the generator: the schedules of earlier seeds stay as they were.
            log_catchup: !seed.is_multiple_of(4),
            now: 0,
            step: 0,
            nodes: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            paths_up: [true; 2],
            gw_up: [true; 2],
            partition_since: None,
            partition_ended: 0,
            partition_began: u64::MAX,
            forced_since: None,
            split_since: None,
            next_msg: 1,
            quiet: false,
            last_confirm: None,
            confirmed: BTreeMap::new(),
            alone_from: [None; 2],
            served: [Vec::new(), Vec::new()],
            destroyed: BTreeSet::new(),
            repairs: Vec::new(),
            stats: SimStats::default(),
            trace: trace.then(VecDeque::new),
            violation: None,
            rng,
        };
        w.tail_bytes = [512, 4096, 65536][w.rng.below(3) as usize];
        for (idx, name) in [(0, "a"), (1, "b")] {
            let ppm = w.rng.range(0, 20_000) as i64 - 10_000;
            let node = w.boot(idx, name, ppm, 0, Image::default());
            w.nodes.push(node);
        }
        w
    }

    fn boot(&mut self, idx: usize, name: &'static str, ppm: i64, offset: u64, image: Image) -> Node {
        let cfg = ReplicaConfig {
            durability: self.cfg.durability,
            require_replica: false,
            pair: true,
            tail_bytes: self.tail_bytes,
        };
        let next_seq = image.next_seq.max(image.records.values().map(|r| r.0 + 1).max().unwrap_or(1)).max(1);
        let replica = Replica::new(cfg, image.meta.clone(), next_seq, self.rng.next());
        let local = local_time(self.now, ppm, offset);
        let mut role = RoleCore::new(self.role_cfg[idx].clone(), local);
        let peer = &self.role_cfg[1 - idx];
        role.peer_identity(peer.node_id.clone(), peer.priority);
        Node {
            name,
            proc: Proc::Up,
            ppm,
            offset,
            role,
            replica,
            disk: Disk { durable: image.clone(), current: image, ..Disk::default() },
            inbox: VecDeque::new(),
            held: VecDeque::new(),
            blocked: None,
            flush_started: None,
            watchdog_failed: false,
            snap: None,
            catchup: None,
            wanting: None,
            serving: false,
            draining: None,
            handover_replies: Vec::new(),
            path_conn: [None; 2],
            path_refused: [false; 2],
            dial_after: [0; 2],
            conn_heard: BTreeMap::new(),
            next_hb: local,
            next_tick: local,
            next_probe: local,
            gw_failures: 0,
            gw_reachable: false,
            majority: false,
            attached: None,
            force_pending: false,
            handover_sent: 0,
        }
    }

    fn log(&mut self, f: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            if t.len() >= self.cfg.trace_lines.max(1) {
                t.pop_front();
            }
            t.push_back(format!("{:>6} ms  {}", self.now, f()));
        }
    }

    fn fail(&mut self, what: String) -> Violation {
        Violation {
            seed: self.seed,
            step: self.step,
            what,
            trace: self.trace.take().map(Vec::from).unwrap_or_default(),
        }
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let _ = write!(
                s,
                "[{}: {:?} role {} primary {} in_sync {:?} epoch {} floor {} last {} failed {:?} serving {}] ",
                n.name,
                n.proc,
                n.role.role(),
                n.replica.is_primary(),
                n.replica.in_sync(),
                n.replica.epoch(),
                n.replica.meta().floor,
                n.replica.next_seq() - 1,
                n.replica.failed(),
                n.serving
            );
        }
        let missing = self.missing_on_active();
        let _ = write!(
            s,
            "paths {:?} gw {:?} missing {} (of {} confirmed)",
            self.paths_up,
            self.gw_up,
            missing.len(),
            self.confirmed.len()
        );
        s
    }

    // ----- faults -----

    fn maybe_fault(&mut self) {
        let due: Vec<Repair> = {
            let now = self.now;
            let (due, keep): (Vec<_>, Vec<_>) = self.repairs.drain(..).partition(|(t, _)| *t <= now);
            self.repairs = keep;
            due.into_iter().map(|(_, r)| r).collect()
        };
        for r in due {
            self.repair(r);
        }
        if !self.rng.chance(self.cfg.fault_rate) || self.repairs.len() >= 3 {
            return;
        }
        self.stats.faults += 1;
        let n = self.rng.below(2) as usize;
        let later = |w: &mut World, lo: u64, hi: u64| w.now + w.rng.range(lo, hi);
        match self.rng.below(15) {
            0 | 1 => {
                // kill -9, restarted later (sometimes with a wiped disk).
                if self.nodes[n].proc != Proc::Down {
                    self.apply(Fault::Kill(n));
                    let wipe = self.rng.chance(0.08);
                    let t = later(self, 0, 3000);
                    self.repairs.push((t, Repair::Restart(n, wipe)));
                }
            }
            2 => {
                // Both killed; restarted in random order, one alone for a while.
                self.apply(Fault::Kill(0));
                self.apply(Fault::Kill(1));
                let first = later(self, 0, 500);
                let second = first + self.rng.range(0, 3000);
                let (x, y) = if self.rng.chance(0.5) { (0, 1) } else { (1, 0) };
                self.repairs.push((first, Repair::Restart(x, false)));
                self.repairs.push((second, Repair::Restart(y, false)));
            }
            3 | 4 => {
                let ms = self.rng.range(50, 3000);
                self.apply(Fault::Freeze(n, ms));
            }
            5 | 6 => {
                let p = self.rng.below(2) as usize;
                self.apply(Fault::Cut(p));
                let t = later(self, 50, 3000);
                self.repairs.push((t, Repair::Path(p)));
            }
            7 => {
                self.apply(Fault::Cut(0));
                self.apply(Fault::Cut(1));
                let t = later(self, 50, 3000);
                self.repairs.push((t, Repair::Path(0)));
                self.repairs.push((t, Repair::Path(1)));
            }
            8 => {
                self.apply(Fault::LoseGateway(n));
                let t = later(self, 50, 3000);
                self.repairs.push((t, Repair::Gateway(n)));
            }
            9 => {
                let fault = if self.rng.chance(0.3) { Fault::DiskNearlyFull(n) } else { Fault::DiskFails(n) };
                self.apply(fault);
                let t = later(self, 100, 3000);
                self.repairs.push((t, Repair::Disk(n)));
            }
            10 => {
                let ms = self.rng.range(50, 1500);
                self.apply(Fault::DiskStalls(n, ms));
                self.repairs.push((self.now + ms + 1, Repair::Disk(n)));
            }
            11 => {
                if self.rng.chance(0.5) {
                    self.apply(Fault::Reset);
                } else {
                    let jump = self.rng.range(10, 2000);
                    self.apply(Fault::ClockJump(n, jump));
                }
            }
            12 => self.apply(Fault::Switchover),
            13 => {
                // One node cut off from everything (its gateway and every path).
                self.apply(Fault::LoseGateway(n));
                self.apply(Fault::Cut(0));
                self.apply(Fault::Cut(1));
                let t = later(self, 50, 3000);
                self.repairs.push((t, Repair::Gateway(n)));
                let t = later(self, 50, 3000);
                self.repairs.push((t, Repair::Path(0)));
                self.repairs.push((t, Repair::Path(1)));
            }
            _ => self.apply(Fault::ForcePromote(n)),
        }
    }

    /// Apply one fault (or repair).
    fn apply(&mut self, f: Fault) {
        let name = |n: usize| ["a", "b"][n];
        match f {
            Fault::Kill(n) => {
                if self.nodes[n].proc != Proc::Down {
                    self.crash(n);
                }
            }
            Fault::Restart(n) => self.restart(n, false),
            Fault::RestartWiped(n) => self.restart(n, true),
            Fault::Freeze(n, ms) => {
                if self.nodes[n].proc == Proc::Up {
                    let until = self.now + ms;
                    self.log(|| format!("FAULT freeze {} until {until}", name(n)));
                    self.nodes[n].proc = Proc::Frozen { until };
                }
            }
            Fault::Cut(p) => self.cut_path(p),
            Fault::Repair(p) => self.repair(Repair::Path(p)),
            Fault::LoseGateway(n) => {
                self.gw_up[n] = false;
                self.log(|| format!("FAULT gateway lost by {}", name(n)));
            }
            Fault::Gateway(n) => self.repair(Repair::Gateway(n)),
            Fault::DiskFails(n) => {
                // A disk that fails (EIO, ENOSPC, read-only) until the node restarts.
                self.nodes[n].disk.broken = true;
                self.log(|| format!("FAULT disk of {} fails", name(n)));
            }
            Fault::DiskNearlyFull(n) => {
                self.nodes[n].disk.nearly_full = true;
                self.log(|| format!("FAULT disk of {} nearly full", name(n)));
            }
            Fault::DiskStalls(n, ms) => {
                let until = self.now + ms;
                self.nodes[n].disk.stall_until = until;
                self.log(|| format!("FAULT disk of {} stalls until {until}", name(n)));
            }
            Fault::FixDisk(n) => self.repair(Repair::Disk(n)),
            Fault::Reset => {
                // A connection reset (frames may still arrive late).
                if let Some((&id, _)) = self.conns.iter().find(|(_, c)| c.open.iter().any(|o| *o)) {
                    self.log(|| format!("FAULT reset of connection {id}"));
                    self.reset_conn(id, true);
                }
            }
            Fault::ClockJump(n, ms) => {
                self.nodes[n].offset += ms;
                self.log(|| format!("FAULT clock of {} jumps {ms} ms (suspend)", name(n)));
            }
            Fault::Switchover => {
                let active =
                    (0..2).find(|&i| self.nodes[i].proc == Proc::Up && self.nodes[i].role.role().serves_clients());
                if let Some(i) = active {
                    let r = self.nodes[i].role.switchover();
                    self.log(|| format!("OPERATOR switchover on {}: {r:?}", name(i)));
                }
            }
            Fault::Traffic(on) => self.quiet = !on,
            Fault::ForcePromote(n) => {
                // promote --force: an operator who knows the peer is dead.
                let other = 1 - n;
                if self.nodes[n].proc == Proc::Up
                    && self.nodes[other].proc == Proc::Down
                    && !self.nodes[n].role.role().serves_clients()
                {
                    self.nodes[n].force_pending = true;
                }
            }
        }
    }

    fn repair(&mut self, r: Repair) {
        match r {
            Repair::Restart(i, wipe) => self.apply(if wipe { Fault::RestartWiped(i) } else { Fault::Restart(i) }),
            Repair::Path(p) => {
                if !self.paths_up[p] {
                    self.paths_up[p] = true;
                    self.log(|| format!("REPAIR path {p}"));
                    // With a node down, the path works again (dials are refused):
                    // the split is over as surely as by a new connection.
                    if self.nodes.iter().any(|n| n.proc == Proc::Down) {
                        if let Some(began) = self.partition_since.take() {
                            self.partition_began = began;
                            self.partition_ended = self.now;
                        }
                    }
                }
            }
            Repair::Gateway(i) => {
                self.gw_up[i] = true;
                self.log(|| format!("REPAIR gateway of {}", ["a", "b"][i]));
            }
            Repair::Disk(i) => {
                let n = &mut self.nodes[i];
                n.disk.stall_until = 0;
                n.disk.nearly_full = false;
                if n.disk.broken {
                    // A failed disk is a failed node: the operator fixes it and restarts.
                    n.disk.broken = false;
                    if n.proc != Proc::Down {
                        self.log(|| format!("REPAIR disk of {} (restart)", ["a", "b"][i]));
                        self.crash(i);
                        self.restart(i, false);
                    }
                }
            }
        }
    }

    fn repair_all(&mut self) {
        self.log(|| "REPAIR everything; faults stop".into());
        let pending: Vec<Repair> = self.repairs.drain(..).map(|(_, r)| r).collect();
        for r in pending {
            self.repair(r);
        }
        for i in 0..2 {
            self.nodes[i].disk.stall_until = 0;
            if let Some((until, _)) = &mut self.nodes[i].blocked {
                *until = self.now;
            }
            if let Proc::Frozen { .. } = self.nodes[i].proc {
                self.nodes[i].proc = Proc::Up;
            }
            if self.nodes[i].proc == Proc::Down {
                self.restart(i, false);
            }
            let stalled = self.nodes[i].flush_started.is_some();
            if self.nodes[i].disk.broken
                || self.nodes[i].replica.failed().is_some()
                || self.nodes[i].watchdog_failed
                || stalled
            {
                self.nodes[i].disk.broken = false;
                self.crash(i);
                self.restart(i, false);
            }
            self.gw_up[i] = true;
        }
        for p in 0..2 {
            self.repair(Repair::Path(p));
        }
    }

    fn cut_path(&mut self, p: usize) {
        if !self.paths_up[p] {
            return;
        }
        self.paths_up[p] = false;
        self.log(|| format!("FAULT path {p} cut"));
        // What is in flight waits (TCP retransmits once the cable is back),
        // unless a connection is given up meanwhile.
        if !self.paths_up[0] && !self.paths_up[1] {
            // A path repaired and cut again before the nodes reached each
            // other: the partition that began earlier goes on (seed 171514).
            // Cut again within the grace of the last partition: the same
            // split to the nodes (their takeovers may rest on the silence of
            // both), not a new one.
            let grace = 2 * self.role_cfg[0].peer_timeout_ms + self.role_cfg[0].takeover_delay_ms;
            let again = self.partition_began != u64::MAX && self.now < self.partition_ended + grace;
            let began = if again { self.partition_began } else { self.now };
            self.partition_since.get_or_insert(began);
            self.stats.splits += 1;
        }
    }

    fn stop_serving(&mut self, i: usize) {
        self.nodes[i].serving = false;
        self.end_served(i);
    }

    fn end_served(&mut self, i: usize) {
        if let Some(last) = self.served[i].last_mut().filter(|(_, e)| *e == u64::MAX) {
            last.1 = self.now;
        }
    }

    fn crash(&mut self, i: usize) {
        self.stop_serving(i);
        self.log(|| format!("FAULT kill -9 {}", ["a", "b"][i]));
        self.nodes[i].proc = Proc::Down;
        self.nodes[i].disk.crash();
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            // The kernel closes the process's sockets: the peer sees the reset
            // if the path works.
            let path = self.conns[&id].path;
            let c = self.conns.get_mut(&id).expect("exists");
            c.open[i] = false;
            c.to[i].clear();
            if self.paths_up[path] {
                c.open[1 - i] = false;
            }
        }
    }

    fn restart(&mut self, i: usize, wipe: bool) {
        if self.nodes[i].proc != Proc::Down {
            return;
        }
        self.log(|| format!("RESTART {}{}", ["a", "b"][i], if wipe { " with a wiped disk" } else { "" }));
        let mut image = self.nodes[i].disk.durable.clone();
        if wipe {
            // Whatever only this disk held is gone for good.
            let other = &self.nodes[1 - i].disk.durable;
            for m in self.confirmed.keys() {
                if !other.holds(*m) {
                    self.destroyed.insert(*m);
                }
            }
            image = Image::default();
        }
        let (ppm, offset, name) = (self.nodes[i].ppm, self.nodes[i].offset, self.nodes[i].name);
        let mut node = self.boot(i, name, ppm, offset, image);
        node.disk.broken = false;
        self.nodes[i] = node;
    }

    fn reset_conn(&mut self, id: ConnId, late: bool) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.open = [false, false];
            if !late {
                c.to[0].clear();
                c.to[1].clear();
            }
        }
    }

    // ----- time -----

    fn advance(&mut self) {
        self.now += STEP_MS;
        let order = if self.rng.chance(0.5) { [0, 1] } else { [1, 0] };
        for i in order {
            if let Proc::Frozen { until } = self.nodes[i].proc {
                if self.now >= until {
                    self.log(|| format!("thaw {}", ["a", "b"][i]));
                    self.nodes[i].proc = Proc::Up;
                }
            }
            if self.nodes[i].proc != Proc::Up {
                continue;
            }
            self.deliver(i);
            self.monitor(i);
            self.role_tick(i);
            self.writer(i);
            self.stream_snapshot(i);
        }
        self.client();
    }

    fn local(&self, i: usize) -> u64 {
        local_time(self.now, self.nodes[i].ppm, self.nodes[i].offset)
    }

    /// The longest stretch without a confirm while publishing goes on.
    fn confirm_gap(&mut self, confirmed: bool) {
        if self.quiet {
            self.last_confirm = None;
            return;
        }
        let since = *self.last_confirm.get_or_insert(self.now);
        self.stats.max_confirm_gap_ms = self.stats.max_confirm_gap_ms.max(self.now - since);
        if confirmed {
            self.last_confirm = Some(self.now);
        }
    }

    fn client(&mut self) {
        self.confirm_gap(false);
        // Traffic comes and goes while faults happen; a quiet pair must
        // converge too (the settle phase keeps its choice).
        if self.step <= self.cfg.steps && self.rng.chance(0.002) {
            self.quiet = !self.quiet;
        }
        if self.quiet || !self.rng.chance(0.6) {
            return;
        }
        let serving: Vec<usize> = (0..2).filter(|&i| self.nodes[i].proc == Proc::Up && self.nodes[i].serving).collect();
        if serving.is_empty() {
            return;
        }
        let i = serving[self.rng.below(serving.len() as u64) as usize];
        let m = self.next_msg;
        self.next_msg += 1;
        self.nodes[i].inbox.push_back(WReq::Submit(vec![m]));
    }

    // ----- network -----

    fn send(&mut self, from: usize, conn: ConnId, msg: Msg) {
        let lat = self.rng.range(0, 3);
        let now = self.now;
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if !c.open[from] || !c.open[1 - from] && self.paths_up[c.path] {
            return;
        }
        let to = &mut c.to[1 - from];
        let at = to.back().map_or(now + lat, |(t, _)| (*t).max(now + lat));
        to.push_back((at, msg));
    }

    /// On one connection; role messages now and then on every one (a resend
    /// arrives twice: the cores must answer duplicates alike).
    fn send_any(&mut self, from: usize, msg: Msg) {
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.open[from] && c.open[1 - from] && self.paths_up[c.path])
            .map(|(id, _)| *id)
            .collect();
        let all = matches!(msg, Msg::Role(_)) && self.rng.chance(0.3);
        for id in ids.iter().take(if all { ids.len() } else { 1 }) {
            self.send(from, *id, msg.clone());
        }
    }

    fn deliver(&mut self, i: usize) {
        let now = self.now;
        let local = self.local(i);
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            loop {
                let c = self.conns.get_mut(&id).expect("exists");
                if !self.paths_up[c.path] {
                    break; // held until the cable is back
                }
                match c.to[i].front() {
                    Some((t, _)) if *t <= now => {}
                    _ => break,
                }
                let (_, msg) = c.to[i].pop_front().expect("front exists");
                self.conn_heard_at(i, id, local);
                self.receive(i, id, msg);
            }
            let c = &self.conns[&id];
            if !c.open[i] && !c.closed_seen[i]
                || c.open[i] && !c.open[1 - i] && c.to[i].is_empty() && self.paths_up[c.path]
            {
                // The other end closed (RST/FIN arrives once the path works).
                self.close_conn(i, id, "closed by the peer");
            }
        }
        self.conns.retain(|_, c| !(c.closed_seen[0] && c.closed_seen[1]));
    }

    fn conn_heard_at(&mut self, i: usize, id: ConnId, local: u64) {
        if let Some(t) = self.nodes[i].conn_heard.get_mut(&id) {
            *t = local;
        }
    }

    fn receive(&mut self, i: usize, conn: ConnId, msg: Msg) {
        let local = self.local(i);
        match msg {
            Msg::Hb(hb) => {
                let mut out = Vec::new();
                self.nodes[i].role.heard_peer(local, hb, &mut out);
                self.do_outs(i, out);
            }
            Msg::Repl(f) => {
                if !matches!(f, ReplFrame::Batch { .. } | ReplFrame::Ack { .. } | ReplFrame::SnapRecord { .. }) {
                    let name = self.nodes[i].name;
                    // The frames that decide what a follower keeps, in full.
                    let what = match &f {
                        ReplFrame::AttachReply { .. } | ReplFrame::Resume { .. } | ReplFrame::Snapshot { .. } => {
                            format!("{f:?}")
                        }
                        _ => f.kind().to_string(),
                    };
                    self.log(|| format!("{name}: receives {what} on {conn}"));
                }
                self.nodes[i].inbox.push_back(WReq::Frame(conn, f))
            }
            Msg::Role(m) => {
                let name = self.nodes[i].name;
                self.log(|| format!("{name}: receives {m:?}"));
                let view = self.view(i);
                let mut out = Vec::new();
                self.nodes[i].role.on_peer_msg(local, m, &view, &mut out);
                self.do_outs(i, out);
            }
            Msg::Handover(ids) => {
                if self.nodes[i].serving {
                    self.nodes[i].inbox.push_back(WReq::StoreHandover(ids));
                }
            }
            Msg::HandoverStored(ids) => self.nodes[i].inbox.push_back(WReq::ForgetHandover(ids)),
        }
    }

    fn close_conn(&mut self, i: usize, id: ConnId, why: &str) {
        if let Some(c) = self.conns.get_mut(&id) {
            if c.closed_seen[i] {
                return;
            }
            c.closed_seen[i] = true;
            c.open[i] = false;
        }
        let n = &mut self.nodes[i];
        n.conn_heard.remove(&id);
        for p in 0..2 {
            if n.path_conn[p] == Some(id) {
                n.path_conn[p] = None;
            }
        }
        if n.attached.is_some_and(|(c, _)| c == id) {
            n.attached = None;
        }
        n.inbox.push_back(WReq::ConnLost(id));
        let name = n.name;
        self.log(|| format!("{name}: connection {id} down ({why})"));
    }

    // ----- the monitor -----

    fn monitor(&mut self, i: usize) {
        let local = self.local(i);
        let cfg = self.role_cfg[i].clone();
        let other = 1 - i;
        // Connections silent for peer_timeout are closed.
        let silent: Vec<ConnId> = self.nodes[i]
            .conn_heard
            .iter()
            .filter(|(_, t)| local.saturating_sub(**t) >= cfg.peer_timeout_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            if let Some(c) = self.conns.get_mut(&id) {
                c.open[i] = false;
                c.to[i].clear();
            }
            self.close_conn(i, id, "silent for peer_timeout");
        }
        // Dial every path without a connection.
        for p in 0..2 {
            if self.nodes[i].path_conn[p].is_some() || local < self.nodes[i].dial_after[p] {
                continue;
            }
            self.nodes[i].dial_after[p] = local + cfg.heartbeat_ms;
            if !self.paths_up[p] {
                self.nodes[i].path_refused[p] = false; // a timeout, not a refusal
                continue;
            }
            match self.nodes[other].proc {
                Proc::Down => self.nodes[i].path_refused[p] = true,
                Proc::Frozen { .. } => self.nodes[i].path_refused[p] = false,
                Proc::Up => {
                    if self.nodes[other].path_conn[p].is_some() {
                        continue; // the peer's own dial on this path is up
                    }
                    let id = self.next_conn;
                    self.next_conn += 1;
                    self.conns.insert(
                        id,
                        Conn {
                            path: p,
                            open: [true, true],
                            to: [VecDeque::new(), VecDeque::new()],
                            closed_seen: [false; 2],
                        },
                    );
                    let peer_local = self.local(other);
                    for (n, t) in [(i, local), (other, peer_local)] {
                        self.nodes[n].path_conn[p] = Some(id);
                        self.nodes[n].path_refused[p] = false;
                        self.nodes[n].conn_heard.insert(id, t);
                    }
                    self.log(|| format!("connection {id} up on path {p}"));
                    // The split ends when the nodes reach each other again.
                    if let Some(began) = self.partition_since.take() {
                        self.partition_began = began;
                        self.partition_ended = self.now;
                    }
                    // Say who we are at once.
                    let hb = self.nodes[i].role.heartbeat(&self.view(i));
                    self.send(i, id, Msg::Hb(hb));
                    let hb = self.nodes[other].role.heartbeat(&self.view(other));
                    self.send(other, id, Msg::Hb(hb));
                }
            }
        }
        let n = &self.nodes[i];
        let dead = n.conn_heard.is_empty() && n.path_refused.iter().all(|r| *r);
        self.nodes[i].role.peer_links(dead);
        if local >= self.nodes[i].next_hb {
            self.nodes[i].next_hb = local + cfg.heartbeat_ms;
            let hb = self.nodes[i].role.heartbeat(&self.view(i));
            let ids: Vec<ConnId> = self.nodes[i].conn_heard.keys().copied().collect();
            for id in ids {
                self.send(i, id, Msg::Hb(hb));
            }
            self.maybe_attach(i, local);
            // A hand-over not yet acknowledged is sent again now and then.
            if !self.nodes[i].disk.current.handover.is_empty() && local >= self.nodes[i].handover_sent + 1000 {
                self.nodes[i].handover_sent = local;
                let ids: Vec<MsgId> = self.nodes[i].disk.current.handover.iter().copied().collect();
                for chunk in ids.chunks(64) {
                    self.send_any(i, Msg::Handover(chunk.to_vec()));
                }
            }
        }
        // The gateway prober.
        if local >= self.nodes[i].next_probe {
            self.nodes[i].next_probe = local + self.probe_ms;
            let ok = self.gw_up[i];
            let n = &mut self.nodes[i];
            if ok {
                n.gw_failures = 0;
                n.gw_reachable = true;
            } else {
                n.gw_failures += 1;
                if n.gw_failures >= 2 {
                    n.gw_reachable = false;
                }
            }
            let reachable = n.gw_reachable;
            if n.role.gateway(local, reachable, ok) {
                // As the arbiter does: decide at once.
                n.next_tick = local;
                self.role_tick(i);
            }
        }
    }

    /// The active attaches its passive peer as follower on the best connection.
    fn maybe_attach(&mut self, i: usize, local: u64) {
        let n = &self.nodes[i];
        if !n.replica.is_primary() || !n.serving {
            return;
        }
        let peer_passive = n.role.peer_heartbeat().is_some_and(|h| !h.role.serves_clients());
        // A link that never got past its handshake is tried again.
        let stuck = n.replica.handshaking()
            && n.attached.is_some_and(|(_, at)| local.saturating_sub(at) >= 2 * self.role_cfg[i].peer_timeout_ms);
        let linked = n.replica.follower().is_some() && !stuck;
        let recent = n.attached.is_some_and(|(_, at)| local.saturating_sub(at) < 2 * self.role_cfg[i].heartbeat_ms);
        if !peer_passive || linked || recent {
            return;
        }
        let Some(conn) = n.path_conn.iter().flatten().copied().next() else { return };
        self.nodes[i].attached = Some((conn, local));
        self.nodes[i].inbox.push_back(WReq::Attach(conn));
        let name = self.nodes[i].name;
        self.log(|| format!("{name}: attaches the peer on {conn}"));
    }

    // ----- the role core -----

    fn view(&self, i: usize) -> StoreView {
        let n = &self.nodes[i];
        let r = &n.replica;
        let last_seq = r.next_seq() - 1;
        StoreView {
            epoch: r.epoch(),
            floor: r.meta().floor,
            last_seq,
            last_op_epoch: r.meta().history.last_op_epoch(last_seq),
            in_sync: r.in_sync(),
            holding: r.holding(),
            follower_acked: r.follower().map_or(0, |f| f.0),
            serve_alone: r.meta().serve_alone,
            confirmed_alone: r.meta().alone_since.is_some(),
            outranked: r.outranked(),
            disk_failed: r.failed().is_some() || n.watchdog_failed,
            disk_full: n.disk.nearly_full,
            flush_running_ms: n.flush_started.map_or(0, |t| self.local(i).saturating_sub(t)),
            loading: r.loading(),
        }
    }

    fn role_tick(&mut self, i: usize) {
        let local = self.local(i);
        if local < self.nodes[i].next_tick {
            return;
        }
        self.nodes[i].next_tick = local + TICK_MS;
        let view = self.view(i);
        if std::mem::take(&mut self.nodes[i].force_pending) {
            let r = self.nodes[i].role.force_promote(&view);
            self.log(|| format!("OPERATOR promote --force on {}: {r:?}", ["a", "b"][i]));
        }
        let mut out = Vec::new();
        self.nodes[i].role.tick(local, &view, &mut out);
        let role = &self.nodes[i].role;
        self.nodes[i].majority = role.gateway_reachable() || matches!(role.peer_view(local), PeerView::Up(_));
        self.do_outs(i, out);
    }

    fn do_outs(&mut self, i: usize, outs: Vec<Out>) {
        for o in outs {
            match o {
                Out::Activate { at_least, in_sync_gen, how } => {
                    self.nodes[i].inbox.push_back(WReq::Promote { at_least, in_sync_gen, how })
                }
                Out::Deactivate { still_last_active } => {
                    self.stop_serving(i);
                    self.nodes[i].inbox.push_back(WReq::Demote { still: still_last_active });
                }
                Out::Drain => {
                    self.stop_serving(i);
                    let deadline = self.now + 5000;
                    self.nodes[i].inbox.push_back(WReq::Drain { deadline });
                }
                Out::Send(m) => self.send_any(i, Msg::Role(m)),
                Out::RaiseFloor(e) => self.nodes[i].inbox.push_back(WReq::RaiseFloor(e, false)),
                Out::GrantVote(e) => self.nodes[i].inbox.push_back(WReq::RaiseFloor(e, true)),
                Out::PeerDown { alone } => self.nodes[i].inbox.push_back(WReq::PeerDown(alone)),
                Out::ExpireInSync => self.nodes[i].inbox.push_back(WReq::ExpireInSync),
                Out::PeerPosition { epoch, serving } => {
                    self.nodes[i].inbox.push_back(WReq::PeerPosition(epoch, u64::from(serving)))
                }
                Out::PrimaryHolds { gen, holds } => {
                    self.nodes[i].inbox.push_back(WReq::PrimaryHolds(gen, u64::from(holds)))
                }
                Out::ReaffirmInSync => self.nodes[i].inbox.push_back(WReq::Reaffirm),
                Out::PeerFailed => self.nodes[i].inbox.push_back(WReq::PeerFailed),
                Out::Lease { until } => self.nodes[i].replica.set_lease(until),
                Out::DiskFailed(reason) => {
                    let name = self.nodes[i].name;
                    self.log(|| format!("{name}: {reason}"));
                    self.nodes[i].watchdog_failed = true;
                    self.nodes[i].inbox.push_back(WReq::WatchdogFailed);
                }
                Out::RoleChanged { from, to, reason } => {
                    let name = self.nodes[i].name;
                    self.log(|| format!("{name}: role {from} -> {to}: {reason}"));
                }
                Out::SwitchoverDone(r) => {
                    let name = self.nodes[i].name;
                    self.log(|| format!("{name}: switchover done: {r:?}"));
                }
            }
        }
    }

    // ----- the writer -----

    fn writer(&mut self, i: usize) {
        if let Some((until, _)) = &self.nodes[i].blocked {
            if self.now < *until {
                return;
            }
            let (_, rest) = self.nodes[i].blocked.take().expect("blocked");
            self.nodes[i].flush_started = None;
            if self.nodes[i].watchdog_failed {
                self.disk_failed(i, "flush stalled past disk_stall_ms".into());
            } else {
                self.run_steps(i, rest);
            }
        }
        loop {
            if let Some(deadline) = self.nodes[i].draining {
                if self.nodes[i].held.is_empty() || self.now >= deadline {
                    let ok = self.nodes[i].held.is_empty();
                    self.nodes[i].draining = None;
                    let mut out = Vec::new();
                    self.nodes[i].replica.demote(false, &mut out);
                    let mut steps: Vec<Step> = out.into_iter().map(Step::Act).collect();
                    steps.push(Step::Done(if ok { Ok(()) } else { Err("drain timed out".into()) }));
                    self.run_steps(i, steps);
                }
            }
            if self.nodes[i].blocked.is_some() {
                break;
            }
            let Some(req) = self.nodes[i].inbox.pop_front() else { break };
            self.writer_req(i, req);
        }
    }

    fn writer_req(&mut self, i: usize, req: WReq) {
        let local = self.local(i);
        let mut out = Vec::new();
        let n = &mut self.nodes[i];
        match req {
            WReq::Submit(mut msgs) => {
                while let Some(WReq::Submit(more)) = n.inbox.front() {
                    msgs.extend(more);
                    n.inbox.pop_front();
                }
                self.commit(i, msgs, local, None);
                return;
            }
            WReq::Frame(conn, f) => {
                // One frame at a time (what it wrote is done before the next
                // is looked at); the flush point after the last waiting one.
                n.replica.on_frame(conn, f, local, &mut out);
                self.run_steps(i, out.into_iter().map(Step::Act).collect());
                let n = &mut self.nodes[i];
                if n.blocked.is_none() && !matches!(n.inbox.front(), Some(WReq::Frame(..))) {
                    let mut out = Vec::new();
                    n.replica.flush_point(&mut out);
                    self.run_steps(i, out.into_iter().map(Step::Act).collect());
                }
                return;
            }
            WReq::Attach(conn) => n.replica.attach(conn, self.log_catchup, &mut out),
            WReq::ConnLost(conn) => {
                if n.snap.as_ref().is_some_and(|(c, _, _)| *c == conn) {
                    n.snap = None;
                }
                if n.catchup.as_ref().is_some_and(|(c, _, _)| *c == conn) {
                    n.catchup = None;
                }
                n.replica.connection_lost(conn, &mut out)
            }
            WReq::PeerDown(alone) => n.replica.peer_down(local, alone, &mut out),
            WReq::PeerFailed => n.replica.peer_failed(local, &mut out),
            WReq::ExpireInSync => n.replica.expire_in_sync(),
            WReq::PrimaryHolds(gen, holds) => n.replica.primary_holds(gen, holds == 1),
            WReq::PeerPosition(epoch, serving) => n.replica.peer_position(epoch, serving == 1, &mut out),
            WReq::Reaffirm => n.replica.reaffirm_in_sync(&mut out),
            WReq::RaiseFloor(e, vote) => {
                let possible = n.replica.raise_floor(e, vote, &mut out);
                let mut steps: Vec<Step> = out.into_iter().map(Step::Act).collect();
                if vote && possible {
                    steps.push(Step::Reply(RoleMsg::VoteReply { epoch: e, granted: true }));
                }
                self.run_steps(i, steps);
                return;
            }
            WReq::Promote { at_least, in_sync_gen, how } => {
                let id = self.rng.next();
                let n = &mut self.nodes[i];
                let forced = how == Promotion::Forced;
                match n.replica.promote(at_least, id, in_sync_gen, how, &mut out) {
                    Ok(epoch) => {
                        let name = n.name;
                        self.log(|| {
                            format!("{name}: promoted to epoch {epoch}{}", if forced { " (forced)" } else { "" })
                        });
                        // Primary from here, even if it never gets to serve.
                        self.served[i].push((self.now, u64::MAX));
                        if forced {
                            // The operator's order stands from here: the forced
                            // meta may reach the disk (and a restart serve on it)
                            // even if the node dies before it serves (seed 115283).
                            self.forced_since.get_or_insert(self.now);
                        }
                        self.alone_from[i] = None;
                        let mut steps: Vec<Step> = out.into_iter().map(Step::Act).collect();
                        steps.push(Step::Promoted { forced, takeover: in_sync_gen.is_some() });
                        self.run_steps(i, steps);
                    }
                    Err(e) => {
                        let name = n.name;
                        self.log(|| format!("{name}: promotion refused: {e}"));
                        self.run_steps(i, vec![Step::Done(Err(e))]);
                    }
                }
                return;
            }
            WReq::Demote { still } => {
                n.replica.demote(still, &mut out);
                let mut steps: Vec<Step> = out.into_iter().map(Step::Act).collect();
                steps.push(Step::Done(Ok(())));
                self.run_steps(i, steps);
                return;
            }
            WReq::Drain { deadline } => {
                n.draining = Some(deadline);
                return;
            }
            WReq::StoreHandover(ids) => {
                if !n.replica.is_primary() {
                    return;
                }
                // Store only what this node lacks; answer once confirmed.
                let lacking: Vec<MsgId> = ids.iter().copied().filter(|m| !n.disk.current.holds(*m)).collect();
                if lacking.is_empty() {
                    self.send_any(i, Msg::HandoverStored(ids));
                } else {
                    self.commit(i, lacking, local, Some(ids));
                }
                return;
            }
            WReq::ForgetHandover(ids) => {
                let r = n.disk.write(Write::Handover(ids, false)).and_then(|_| n.disk.flush());
                if let Err(e) = r {
                    self.disk_failed(i, e);
                }
                return;
            }
            WReq::WatchdogFailed => {
                self.disk_failed(i, "a flush stalled past disk_stall_ms".into());
                return;
            }
        }
        self.run_steps(i, out.into_iter().map(Step::Act).collect());
    }

    /// A group commit; `reply`: a hand-over to acknowledge once confirmed.
    fn commit(&mut self, i: usize, msgs: Vec<MsgId>, local: u64, reply: Option<Vec<MsgId>>) {
        let n = &mut self.nodes[i];
        if n.watchdog_failed {
            return;
        }
        let adm = match n.replica.admit(local) {
            Ok(a) => a,
            Err(_) => return, // refused: never confirmed, the client resends elsewhere
        };
        let (first, last) = (adm.first_seq, adm.first_seq + msgs.len() as u64 - 1);
        let raw = encode(adm.epoch, &msgs);
        let mut r = Ok(());
        if adm.persist_meta {
            r = n.disk.write(Write::Meta(n.replica.meta().clone(), first));
        }
        let r = r.and_then(|_| n.disk.write(Write::Record(first, (last, adm.epoch, msgs.clone()))));
        if let Err(e) = r {
            self.disk_failed(i, e);
            return;
        }
        let name = self.nodes[i].name;
        let first_msg = msgs.first().copied();
        self.log(|| format!("{name}: commits {first}..={last} (messages from {first_msg:?})"));
        self.nodes[i].held.push_back((last, msgs));
        if let Some(ids) = reply {
            self.nodes[i].handover_replies.push((last, ids));
        }
        self.run_steps(i, vec![Step::Flush, Step::Committed { first, last, raw }]);
    }

    fn disk_failed(&mut self, i: usize, reason: String) {
        let name = self.nodes[i].name;
        self.log(|| format!("{name}: disk failed: {reason}"));
        let mut out = Vec::new();
        self.nodes[i].replica.disk_failed(reason, &mut out);
        // Only what needs no disk: refusals and frames.
        for a in out {
            match a {
                RA::Send(c, f) => self.send(i, c, Msg::Repl(f)),
                RA::FailHeld(_) => self.nodes[i].held.clear(),
                _ => {}
            }
        }
    }

    /// Perform steps in order; a writer hung in a flush does them after it.
    fn run_steps(&mut self, i: usize, steps: Vec<Step>) {
        let mut steps = VecDeque::from(steps);
        while !steps.is_empty() {
            if let Some((_, waiting)) = &mut self.nodes[i].blocked {
                waiting.extend(steps.drain(..));
                return;
            }
            let step = steps.pop_front().expect("not empty");
            if let Err(e) = self.run_step(i, step, &mut steps) {
                self.disk_failed(i, e);
                return;
            }
        }
    }

    fn flush(&mut self, i: usize) -> Result<(), String> {
        let n = &mut self.nodes[i];
        if n.disk.stall_until > self.now && !n.disk.broken {
            // The writer hangs in fsync until the stall ends.
            n.flush_started = Some(local_time(self.now, n.ppm, n.offset));
            n.disk.flush()?;
            n.blocked = Some((n.disk.stall_until, Vec::new()));
            return Ok(());
        }
        n.disk.flush()
    }

    fn run_step(&mut self, i: usize, step: Step, rest: &mut VecDeque<Step>) -> Result<(), String> {
        let local = self.local(i);
        match step {
            Step::Flush => self.flush(i)?,
            Step::Committed { first, last, raw } => {
                let mut out = Vec::new();
                self.nodes[i].replica.committed(first, last, raw, &mut out);
                for (k, a) in out.into_iter().enumerate() {
                    rest.insert(k, Step::Act(a));
                }
            }
            Step::Promoted { forced, takeover } => {
                // Take back what was kept for a hand-over the peer never confirmed.
                let n = &mut self.nodes[i];
                let back: Vec<MsgId> = n.disk.current.handover.iter().copied().collect();
                if !back.is_empty() {
                    let adm = n.replica.admit(local).map_err(|e| format!("take-back refused: {e:?}"))?;
                    let last = adm.first_seq + back.len() as u64 - 1;
                    let raw = encode(adm.epoch, &back);
                    if adm.persist_meta {
                        n.disk.write(Write::Meta(n.replica.meta().clone(), adm.first_seq))?;
                    }
                    n.disk.write(Write::Record(adm.first_seq, (last, adm.epoch, back.clone())))?;
                    n.disk.write(Write::Handover(back.clone(), false))?;
                    n.disk.flush()?;
                    let mut out = Vec::new();
                    n.replica.committed(adm.first_seq, last, raw, &mut out);
                    for a in out {
                        if let RA::Send(c, f) = a {
                            self.send(i, c, Msg::Repl(f));
                        }
                    }
                }
                self.nodes[i].serving = true;
                self.stats.promotions += 1;
                if forced {
                    self.forced_since.get_or_insert(self.now);
                } else if self.forced_since.is_none() {
                    self.check_promotion(i, takeover);
                }
                let view = self.view(i);
                let mut out = Vec::new();
                self.nodes[i].role.transition_done(local, Ok(()), &view, &mut out);
                self.do_outs(i, out);
            }
            Step::Done(r) => {
                let view = self.view(i);
                let mut out = Vec::new();
                self.nodes[i].role.transition_done(local, r, &view, &mut out);
                self.do_outs(i, out);
            }
            Step::Act(a) => self.act(i, a, local)?,
            Step::Reply(m) => self.send_any(i, Msg::Role(m)),
        }
        Ok(())
    }

    fn act(&mut self, i: usize, a: RA, local: u64) -> Result<(), String> {
        match a {
            RA::Send(c, f) => self.send(i, c, Msg::Repl(f)),
            RA::PersistMeta { flush } => {
                let n = &mut self.nodes[i];
                let next = n.replica.next_seq();
                n.disk.write(Write::Meta(n.replica.meta().clone(), next))?;
                if flush {
                    self.flush(i)?;
                }
            }
            RA::Confirm { through } => {
                let name = self.nodes[i].name;
                self.log(|| format!("{name}: confirms through {through}"));
                let n = &mut self.nodes[i];
                let mut done = Vec::new();
                while n.held.front().is_some_and(|(l, _)| *l <= through) {
                    let (_, ms) = n.held.pop_front().expect("front");
                    done.extend(ms);
                }
                let replies: Vec<Vec<MsgId>> = {
                    let (ready, keep): (Vec<_>, Vec<_>) =
                        n.handover_replies.drain(..).partition(|(l, _)| *l <= through);
                    n.handover_replies = keep;
                    ready.into_iter().map(|(_, ids)| ids).collect()
                };
                let alone = if self.nodes[i].replica.holding().1 {
                    self.alone_from[i] = None;
                    None
                } else {
                    Some(*self.alone_from[i].get_or_insert(self.now))
                };
                let c = Confirmed { at: self.now, by: i, alone, majority: self.nodes[i].majority };
                for m in done {
                    self.confirmed.entry(m).or_insert(c);
                }
                self.confirm_gap(true);
                for ids in replies {
                    self.send_any(i, Msg::HandoverStored(ids));
                }
            }
            RA::FailHeld(_) => {
                self.nodes[i].held.clear();
                self.nodes[i].handover_replies.clear();
            }
            RA::StreamSnapshot { conn, attach, through } => {
                self.stats.snapshots += 1;
                let frames: VecDeque<ReplFrame> = self.nodes[i]
                    .disk
                    .current
                    .records
                    .range(..=through)
                    .map(|(first, (_, epoch, ms))| ReplFrame::SnapRecord { key: *first, raw: encode(*epoch, ms) })
                    .collect();
                self.nodes[i].snap = Some((conn, attach, frames));
            }
            RA::StreamLog { conn, attach, from, wanted } => {
                self.stats.catchups += 1;
                for key in wanted {
                    if let Some((_, (last, epoch, ms))) = self.nodes[i].disk.current.records.range(key..=key).next() {
                        let f = ReplFrame::SnapRecord { key, raw: encode(*epoch, ms) };
                        debug_assert!(*last >= key);
                        self.send(i, conn, Msg::Repl(f));
                    }
                }
                self.nodes[i].catchup = Some((conn, attach, from));
            }
            RA::ListLive { conn, through } => {
                let keys: Vec<u64> = self.nodes[i].disk.current.records.range(..=through).map(|(k, _)| *k).collect();
                self.send(i, conn, Msg::Repl(ReplFrame::Live { from: 1, to: through, keys }));
            }
            RA::BeginCatchup => self.nodes[i].wanting = None,
            RA::Truncate { conn, attach, after } => {
                let name = self.nodes[i].name;
                self.log(|| format!("{name}: drops its own ops past {after}"));
                self.nodes[i].disk.write(Write::Truncate(after))?;
                self.flush(i)?;
                self.nodes[i].wanting = Some((conn, attach, after));
            }
            RA::Catchup(ReplFrame::Live { from, to, keys }) => {
                let n = &mut self.nodes[i];
                let gone: Vec<u64> =
                    n.disk.current.records.range(from..=to).map(|(k, _)| *k).filter(|k| !keys.contains(k)).collect();
                if !gone.is_empty() {
                    n.disk.write(Write::Drop(gone))?;
                }
                if let Some((conn, attach, after)) = n.wanting.filter(|w| w.2 == to) {
                    // The model's own ops only enqueue: it lacks a record
                    // through the fork only if it never had it.
                    let want: Vec<u64> =
                        keys.iter().copied().filter(|k| !n.disk.current.records.contains_key(k)).collect();
                    n.wanting = None;
                    let name = n.name;
                    self.log(|| format!("{name}: wants {} records through {after}", want.len()));
                    self.send(i, conn, Msg::Repl(ReplFrame::Want { attach, keys: want }));
                }
            }
            RA::Catchup(ReplFrame::SnapRecord { key, raw }) => {
                let (epoch, ms) = decode(&raw);
                let last = key + ms.len() as u64 - 1;
                self.nodes[i].disk.write(Write::Record(key, (last, epoch, ms)))?;
            }
            RA::Catchup(_) => {}
            RA::EndCatchup { next_seq } => {
                let n = &mut self.nodes[i];
                n.disk.write(Write::Meta(n.replica.meta().clone(), next_seq))?;
                self.flush(i)?;
            }
            RA::ApplyBatch { first_seq, last_seq, epoch, raw } => {
                let (rec_epoch, ms) = decode(&raw);
                if rec_epoch != epoch {
                    let mut out = Vec::new();
                    let reason = format!("record of epoch {rec_epoch}, expected {epoch}");
                    self.nodes[i].replica.apply_failed(first_seq, reason, &mut out);
                    for a in out {
                        if let RA::Send(c, f) = a {
                            self.send(i, c, Msg::Repl(f));
                        }
                    }
                    return Ok(());
                }
                self.nodes[i].disk.write(Write::Record(first_seq, (last_seq, epoch, ms)))?;
            }
            RA::Flush => self.flush(i)?,
            RA::KeepHandover { after, all } => {
                let n = &mut self.nodes[i];
                let alone = if all || self.cfg.durability != Durability::Replicated {
                    Some(0)
                } else {
                    n.replica.meta().alone_since
                };
                let keep: Vec<MsgId> = match alone {
                    None => Vec::new(),
                    Some(from) => n
                        .disk
                        .current
                        .records
                        .range(after + 1..)
                        .filter(|(_, (last, _, _))| *last >= from)
                        .flat_map(|(_, (_, _, ms))| ms.iter().copied())
                        .collect(),
                };
                let (name, count, last) = (n.name, keep.len(), n.replica.next_seq() - 1);
                self.log(|| format!("{name}: keeps {count} messages for the hand-over (after {after}, all {all}, alone since {alone:?}, last {last})"));
                if !keep.is_empty() {
                    self.nodes[i].disk.write(Write::Handover(keep, true))?;
                    self.flush(i)?;
                }
            }
            RA::BeginStaging => self.nodes[i].disk.staging = Some(BTreeMap::new()),
            RA::Stage(f) => {
                let staging = self.nodes[i].disk.staging.get_or_insert_with(BTreeMap::new);
                match f {
                    ReplFrame::SnapRecord { key, raw } => {
                        let (epoch, ms) = decode(&raw);
                        let last = key + ms.len() as u64 - 1;
                        staging.insert(key, (last, epoch, ms));
                    }
                    ReplFrame::Batch { first_seq, last_seq, raw } => {
                        let (epoch, ms) = decode(&raw);
                        staging.insert(first_seq, (last_seq, epoch, ms));
                    }
                    _ => {}
                }
            }
            RA::CommitStaging { next_seq } => {
                let n = &mut self.nodes[i];
                let records = n.disk.staging.take().unwrap_or_default();
                n.disk.write(Write::Replace(records))?;
                n.disk.write(Write::Meta(n.replica.meta().clone(), next_seq))?;
                self.flush(i)?;
            }
            RA::DiscardStaging => self.nodes[i].disk.staging = None,
            RA::SendHandover(conn) => {
                self.nodes[i].handover_sent = local;
                let ids: Vec<MsgId> = self.nodes[i].disk.current.handover.iter().copied().collect();
                for chunk in ids.chunks(64) {
                    self.send(i, conn, Msg::Handover(chunk.to_vec()));
                }
            }
        }
        Ok(())
    }

    fn stream_snapshot(&mut self, i: usize) {
        if self.nodes[i].blocked.is_some() {
            return; // the streamer is the writer's work too
        }
        self.stream_catchup(i);
        // Back-pressure: a few frames per step.
        for _ in 0..8 {
            let Some((conn, attach, _)) = &self.nodes[i].snap else { return };
            let (conn, attach) = (*conn, *attach);
            if !self.nodes[i].replica.snapshot_wanted(&attach) {
                self.nodes[i].snap = None;
                return;
            }
            let Some((_, _, frames)) = &mut self.nodes[i].snap else { return };
            match frames.pop_front() {
                Some(f) => self.send(i, conn, Msg::Repl(f)),
                None => {
                    self.nodes[i].snap = None;
                    let mut out = Vec::new();
                    self.nodes[i].replica.snapshot_streamed(attach, &mut out);
                    self.run_steps(i, out.into_iter().map(Step::Act).collect());
                    return;
                }
            }
        }
    }

    /// A catch-up from the log, a few records per step, to the end of the
    /// log as it is then (records written meanwhile included); then the
    /// live list and the end, in one go.
    fn stream_catchup(&mut self, i: usize) {
        for _ in 0..8 {
            let Some((conn, attach, next)) = self.nodes[i].catchup else { return };
            if !self.nodes[i].replica.snapshot_wanted(&attach) {
                self.nodes[i].catchup = None;
                return;
            }
            let n = &mut self.nodes[i];
            match n.disk.current.records.range(next..).next().map(|(k, r)| (*k, r.clone())) {
                Some((first, (last, epoch, ms))) => {
                    n.catchup = Some((conn, attach, last + 1));
                    let f = ReplFrame::Batch { first_seq: first, last_seq: last, raw: encode(epoch, &ms) };
                    self.send(i, conn, Msg::Repl(f));
                }
                None => {
                    n.catchup = None;
                    let end = n.replica.next_seq() - 1;
                    let keys: Vec<u64> = n.disk.current.records.range(..=end).map(|(k, _)| *k).collect();
                    self.send(i, conn, Msg::Repl(ReplFrame::Live { from: 1, to: end, keys }));
                    let mut out = Vec::new();
                    self.nodes[i].replica.catchup_streamed(attach, &mut out);
                    self.run_steps(i, out.into_iter().map(Step::Act).collect());
                    return;
                }
            }
        }
    }

    // ----- invariants -----

    /// A node starts serving: it must hold every confirmed message, but for
    /// those its peer confirmed single-copy during a split: while the peer
    /// still serves (both serve: DESIGN.md allows it when every path between
    /// them is cut, which `check_two_servers` holds to), a takeover decided
    /// behind a partition that began before the confirm (the split's window
    /// between the active declaring its peer down and the passive taking
    /// over), or when this node itself served during the peer's time alone
    /// (a split not yet healed into one history; the hand-over brings them,
    /// checked at convergence).
    fn check_promotion(&mut self, i: usize, takeover: bool) {
        let other = 1 - i;
        let peer_serves = self.nodes[other].proc == Proc::Up
            && !self.nodes[other].watchdog_failed
            && self.nodes[other].replica.can_confirm(self.local(other));
        let now = self.now;
        let grace = 2 * self.role_cfg[0].peer_timeout_ms + self.role_cfg[0].takeover_delay_ms;
        let served_during = |from: u64| self.served[i].iter().any(|(s, e)| *s < now && *e > from);
        let held = self.nodes[i].disk.current.all();
        let mut missing = Vec::new();
        let mut new_split = false;
        for (m, c) in &self.confirmed {
            if held.contains(m) || self.destroyed.contains(m) {
                continue;
            }
            // Behind a partition (or just after it: the takeover was decided
            // on the silence it caused, before the first heartbeat arrives).
            let t = c.at;
            let partitioned = takeover
                && (self.partition_since.is_some_and(|s| s <= t)
                    || (t >= self.partition_began && now < self.partition_ended + grace));
            let split = peer_serves || partitioned;
            // One side of a split: confirmed single-copy by the peer while it
            // had a majority (never without one).
            let one_side = c.by == other && c.majority && c.alone.is_some();
            if one_side && c.alone.is_some_and(|a| split || served_during(a)) {
                new_split = true;
                continue;
            }
            if one_side && self.split_since.is_some_and(|s| s <= t) {
                continue;
            }
            missing.push((*m, t, c.by, c.alone, c.majority));
        }
        if new_split || peer_serves {
            self.split_since.get_or_insert(now);
        }
        if !missing.is_empty() && self.cfg.durability == Durability::Replicated {
            let first = missing[0];
            self.violation = Some(format!(
                "{} started serving without {} confirmed message(s), e.g. {} confirmed by {} at {} ms \
                 (alone since {:?}, majority {}; partition {:?}, last {}..{})",
                self.nodes[i].name,
                missing.len(),
                first.0,
                ["a", "b"][first.2],
                first.1,
                first.3,
                first.4,
                self.partition_since,
                self.partition_began,
                self.partition_ended,
            ));
        }
    }

    fn check_two_servers(&mut self) {
        let can: Vec<usize> = (0..2)
            .filter(|&i| {
                let n = &self.nodes[i];
                n.proc == Proc::Up && !n.watchdog_failed && n.replica.can_confirm(self.local(i))
            })
            .collect();
        if can.len() < 2 {
            return;
        }
        let grace = 2 * self.role_cfg[0].peer_timeout_ms + self.role_cfg[0].takeover_delay_ms;
        let split = self.partition_since.is_some() || self.now < self.partition_ended + grace;
        if split {
            self.split_since.get_or_insert(self.now);
        }
        if !split && self.violation.is_none() {
            self.violation = Some(format!("two nodes can confirm at once outside a split: {}", self.describe()));
        }
    }

    fn missing_on_active(&self) -> Vec<MsgId> {
        let Some(a) = (0..2).find(|&i| self.nodes[i].serving && self.nodes[i].replica.is_primary()) else {
            return self.confirmed.keys().copied().collect();
        };
        let held = self.nodes[a].disk.current.all();
        self.confirmed.keys().filter(|m| !held.contains(m) && !self.destroyed.contains(m)).copied().collect()
    }

    fn converged(&self) -> bool {
        let active: Vec<usize> = (0..2)
            .filter(|&i| self.nodes[i].proc == Proc::Up && self.nodes[i].serving && self.nodes[i].replica.is_primary())
            .collect();
        if active.len() != 1 {
            return false;
        }
        let (a, p) = (&self.nodes[active[0]], &self.nodes[1 - active[0]]);
        let last = a.replica.next_seq() - 1;
        p.proc == Proc::Up
            && p.replica.in_sync().is_some()
            && p.role.role() == crate::Role::Passive
            && a.replica.follower() == Some((last, true))
            && p.replica.next_seq() - 1 == last
            && p.disk.current.handover.is_empty()
            && a.disk.current.handover.is_empty()
            && self.missing_on_active().is_empty()
    }
}

fn local_time(global: u64, ppm: i64, offset: u64) -> u64 {
    let skew = (global as i128 * ppm as i128 / 1_000_000) as i64;
    (global as i64 + skew).max(0) as u64 + offset + 1_000
}
