//! [`RoleCore`]: the node's role, as a state machine around [`decide`].
//!
//! It takes what the peer monitor, the gateway prober and the store report,
//! and the lease clock's time (milliseconds, `CLOCK_BOOTTIME` in a real node,
//! so that a suspended host finds its lease expired); it returns [`Out`]s for
//! the `RoleArbiter` (or the simulator) to carry out. No I/O and no clock of
//! its own, so the pair simulator drives it through any order of faults.
//!
//! Beyond the table of [`decide`], it owns the rules that span time:
//! - **In sync expires** (DESIGN.md section 4): a passive that stood still
//!   (a gap in its own clock longer than the active would wait before
//!   declaring it down) or was isolated for `peer_timeout` stops counting
//!   itself in sync until the active says so again; so does one whose
//!   active's heartbeat says it stopped holding confirms for it.
//! - **Elections by vote**: when both are passive, the node whose store
//!   ranks first asks the peer for a vote on an epoch above every epoch
//!   either has heard of; the peer grants it only if the candidate outranks
//!   it by the peer's *current* store, and then never promotes at or below
//!   that epoch itself. Two stale views can never both promote.
//! - **Leases**: an active node writes and confirms only while it heard its
//!   peer or the gateway within `isolation_timeout`; a node whose clock
//!   jumped past its lease steps down before anything else.
//! - **A failing disk**: a flush slower than `disk_stall_ms` counts as failed.

use twinmq_store::repl::Promotion;

use crate::decide::{decide, Action, Inputs, PeerStatus, PeerView};
use crate::wire::{Heartbeat, RoleMsg};
use crate::Role;

/// How long a peer's switchover request stays valid.
const TAKEOVER_VALIDITY_MS: u64 = 5_000;
/// Ticks come every 20 ms; a gap this long means the process stood still.
const RESUME_GAP_MS: u64 = 250;

/// The timings and identity the role depends on.
#[derive(Debug, Clone)]
pub struct RoleConfig {
    pub node_id: String,
    pub priority: u32,
    pub heartbeat_ms: u64,
    pub peer_timeout_ms: u64,
    pub isolation_timeout_ms: u64,
    pub takeover_delay_ms: u64,
    pub failback_auto: bool,
    pub disk_stall_ms: u64,
}

impl RoleConfig {
    /// A gap in this node's own clock at least this long may have let the
    /// active declare it down (it waits `peer_timeout` from the last
    /// heartbeat it heard, sent up to a heartbeat before the gap).
    fn stall_ms(&self) -> u64 {
        self.peer_timeout_ms.saturating_sub(2 * self.heartbeat_ms).max(self.heartbeat_ms)
    }
}

/// What this node's store says now (the writer's counters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreView {
    /// The epoch it serves in (active) or follows.
    pub epoch: u64,
    /// The highest epoch it has heard of.
    pub floor: u64,
    pub last_seq: u64,
    pub last_op_epoch: u64,
    /// Follower: in sync under this generation of the active's holding.
    pub in_sync: Option<u64>,
    /// Primary: (generation, whether it counts its follower in sync).
    pub holding: (u64, bool),
    /// Primary: the follower's acknowledgement.
    pub follower_acked: u64,
    /// The cold-start rule (see `ReplMeta::serve_alone`).
    pub serve_alone: bool,
    /// It confirmed ops without its follower since that one was last in
    /// sync (`ReplMeta::alone_since`).
    pub confirmed_alone: bool,
    /// Primary: a follower refused for a higher epoch.
    pub outranked: bool,
    /// A write, flush or fsync failed.
    pub disk_failed: bool,
    /// Over `max_disk_bytes` or under `min_free_disk_bytes` (writes still succeed).
    pub disk_full: bool,
    /// How long the flush now running has taken (0: none running).
    pub flush_running_ms: u64,
    /// A snapshot is half loaded.
    pub loading: bool,
}

/// What the role core asks of its shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Promote the store (to an epoch of at least `at_least`; with
    /// `in_sync_gen`, only if still in sync under it; `forced` by the
    /// operator) and start serving. Answer with [`RoleCore::transition_done`].
    Activate { at_least: u64, in_sync_gen: Option<u64>, how: Promotion },
    /// Stop serving now and demote the store. Answer with `transition_done`.
    Deactivate { still_last_active: bool },
    /// Stop serving, wait until every commit is confirmed (acknowledged by the
    /// peer), demote. Answer with `transition_done`; then `TakeOver` goes out.
    Drain,
    /// A message to the peer's role core.
    Send(RoleMsg),
    /// The highest epoch heard of rose (persist it: never promote at or below).
    RaiseFloor(u64),
    /// Grant the peer's vote for `epoch`: persist the floor (as `RaiseFloor`),
    /// and only once it is durable send `RoleMsg::VoteReply { granted: true }`.
    GrantVote(u64),
    /// Active: the peer is down; release what waits for it. `alone`: this
    /// node sees the gateway (it serves alone; a restart may too).
    PeerDown { alone: bool },
    /// Passive: in sync expired (stood still, or isolated).
    ExpireInSync,
    /// Passive: the active's heartbeat says how it holds for this node.
    PrimaryHolds { gen: u64, holds: bool },
    /// Passive: the peer's position (the epoch it serves in or follows, and
    /// whether it serves): if it may have served after this node did, the
    /// cold-start rule ("nobody can have taken over since") is off, durably.
    PeerPosition { epoch: u64, serving: bool },
    /// Active: the in-sync follower thinks it is not: tell it again.
    ReaffirmInSync,
    /// Active: the peer's disk failed (its store may be hung and silent):
    /// stop waiting for it.
    PeerFailed,
    /// The lease: writes and confirms only before this time.
    Lease { until: u64 },
    /// The disk counts as failed (a stalled flush): confirm nothing more.
    DiskFailed(String),
    /// The reported role changed (one INFO line).
    RoleChanged { from: Role, to: Role, reason: &'static str },
    /// The operator's switchover ended.
    SwitchoverDone(Result<(), String>),
}

/// What the monitor knows of the peer.
#[derive(Debug, Clone, Default)]
struct PeerObs {
    last_heard_ms: Option<u64>,
    heartbeat: Option<Heartbeat>,
    id: Option<String>,
    priority: Option<u32>,
    dead: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    No,
    /// Activate, Deactivate: the role once done.
    Transition(Role, &'static str),
    /// Drain for a switchover or handover.
    Drain(&'static str),
}

/// The role of one node of the pair. See the module documentation.
#[derive(Debug)]
pub struct RoleCore {
    cfg: RoleConfig,
    role: Role,
    last_reason: &'static str,
    started_ms: u64,
    last_tick_ms: u64,
    /// When this process last resumed after standing still (SIGSTOP, a
    /// host pause): a flush running across that counts from here.
    resumed_ms: u64,
    peer: PeerObs,
    gateway: bool,
    last_gateway_ok_ms: Option<u64>,
    holdoff_until_ms: u64,
    force_promote: bool,
    switchover: bool,
    takeover: Option<(u64, u64, u64)>,
    busy: Busy,
    failovers: u64,
    /// A promotion starts a fresh lease.
    lease_granted_ms: u64,
    /// Peer silence is never counted from before this (a stall of this node).
    silence_floor_ms: u64,
    /// In-sync generations below this are not trusted (expired).
    gen_floor: u64,
    /// The vote this node asked for: (epoch, asked at).
    vote: Option<(u64, u64)>,
    /// The highest epoch this node granted a vote for.
    promised: u64,
    raised: u64,
    holds_told: Option<(u64, bool)>,
    /// The peer's position when this node last said `PeerPosition`.
    position_told: Option<(u64, bool)>,
    /// The process stood still past the lease while a promotion was under
    /// way: the peer may have taken over meanwhile, so the promotion, once
    /// done, steps down instead of serving.
    stale_activation: bool,
    last_reaffirm_ms: u64,
    disk_failed: Option<String>,
}

impl RoleCore {
    pub fn new(cfg: RoleConfig, now: u64) -> RoleCore {
        RoleCore {
            cfg,
            role: Role::PassiveSyncing,
            last_reason: "starting: a node starts passive",
            started_ms: now,
            last_tick_ms: now,
            resumed_ms: 0,
            peer: PeerObs::default(),
            gateway: false,
            last_gateway_ok_ms: None,
            holdoff_until_ms: 0,
            force_promote: false,
            switchover: false,
            takeover: None,
            busy: Busy::No,
            failovers: 0,
            lease_granted_ms: now,
            silence_floor_ms: now,
            gen_floor: 0,
            vote: None,
            promised: 0,
            raised: 0,
            holds_told: None,
            position_told: None,
            stale_activation: false,
            last_reaffirm_ms: 0,
            disk_failed: None,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn last_reason(&self) -> &'static str {
        self.last_reason
    }

    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    pub fn gateway_reachable(&self) -> bool {
        self.gateway
    }

    pub fn peer_heartbeat(&self) -> Option<Heartbeat> {
        self.peer.heartbeat
    }

    pub fn peer_id(&self) -> Option<&str> {
        self.peer.id.as_deref()
    }

    /// When the peer was last heard (lease-clock ms).
    pub fn peer_last_heard(&self) -> Option<u64> {
        self.peer.last_heard_ms
    }

    /// The peer as the decision sees it now.
    pub fn peer_view(&self, now: u64) -> PeerView {
        if self.peer.dead {
            return PeerView::Dead;
        }
        match (self.peer.last_heard_ms, self.peer.heartbeat) {
            (Some(t), Some(hb)) if now.saturating_sub(t) < self.cfg.peer_timeout_ms && t >= self.silence_floor_ms => {
                PeerView::Up(PeerStatus {
                    role: hb.role,
                    epoch: hb.epoch,
                    floor: hb.floor,
                    rank: (hb.last_op_epoch, hb.last_seq),
                    sees_gateway: hb.sees_gateway,
                    in_sync: hb.in_sync,
                    serviceable: hb.serviceable,
                })
            }
            (Some(t), _) => PeerView::Silent { since_ms: t.max(self.silence_floor_ms) },
            (None, _) => PeerView::Silent { since_ms: self.silence_floor_ms },
        }
    }

    fn preferred(&self) -> bool {
        match (&self.peer.id, self.peer.priority) {
            (Some(pid), Some(pp)) => {
                (self.cfg.priority, std::cmp::Reverse(self.cfg.node_id.as_str()))
                    > (pp, std::cmp::Reverse(pid.as_str()))
            }
            // Without knowing the peer, this node counts as preferred only by its own say.
            _ => true,
        }
    }

    /// This node is in sync, as far as this role core can trust it.
    fn in_sync(&self, store: &StoreView) -> Option<u64> {
        // In sync with the primary of the epoch followed, and no newer epoch
        // heard of (a vote granted, a peer's report): that one may confirm
        // without this node.
        if store.floor.max(self.promised) > store.epoch {
            return None;
        }
        let g = store.in_sync.filter(|g| *g >= self.gen_floor)?;
        // The primary stopped holding for this node, or confirmed without it
        // (and may have stepped down or failed since: seed 150822).
        let stopped = self.peer.heartbeat.is_some_and(|hb| {
            (hb.role.serves_clients() && !hb.holding && hb.holding_gen >= g)
                || (hb.confirmed_alone && hb.epoch == store.epoch)
        });
        (!stopped).then_some(g)
    }

    /// This active refuses new messages for a nearly full disk: its own, or
    /// that of the passive it counts in sync (which writes every record too:
    /// the limit is the pair's). A nearly full disk moves no role; a disk
    /// whose writes fail is a failed node (and no longer counted in sync).
    pub fn refuses_for_full_disk(&self, store: &StoreView) -> bool {
        let peer_full = store.holding.1 && self.peer.heartbeat.is_some_and(|hb| hb.disk_full);
        self.role.serves_clients() && (store.disk_full || peer_full)
    }

    fn disk_failed(&self, store: &StoreView) -> bool {
        store.disk_failed || self.disk_failed.is_some()
    }

    /// What this node tells its peer in every heartbeat.
    pub fn heartbeat(&self, store: &StoreView) -> Heartbeat {
        Heartbeat {
            role: self.role,
            epoch: store.epoch,
            floor: store.floor.max(self.promised),
            last_seq: store.last_seq,
            last_op_epoch: store.last_op_epoch,
            sees_gateway: self.gateway,
            in_sync: self.in_sync(store).is_some(),
            holding_gen: store.holding.0,
            holding: store.holding.1,
            serviceable: !self.disk_failed(store) && !store.loading,
            disk_failed: self.disk_failed(store),
            confirmed_alone: store.confirmed_alone,
            disk_full: store.disk_full,
        }
    }

    // ----- observations -----

    /// A heartbeat arrived from the peer (on any path).
    pub fn heard_peer(&mut self, now: u64, hb: Heartbeat, out: &mut Vec<Out>) {
        self.peer.last_heard_ms = Some(now);
        self.peer.heartbeat = Some(hb);
        self.peer.dead = false;
        let epoch = hb.epoch.max(hb.floor);
        if epoch > self.raised {
            self.raised = epoch;
            out.push(Out::RaiseFloor(epoch));
        }
        if !self.role.serves_clients() {
            let position = (hb.epoch, hb.role.serves_clients());
            if self.position_told != Some(position) {
                self.position_told = Some(position);
                out.push(Out::PeerPosition { epoch: position.0, serving: position.1 });
            }
        }
        if hb.role.serves_clients() && !self.role.serves_clients() {
            let told = (hb.holding_gen, hb.holding);
            if self.holds_told != Some(told) {
                self.holds_told = Some(told);
                out.push(Out::PrimaryHolds { gen: told.0, holds: told.1 });
            }
        }
    }

    /// Who the peer is (from the link's authentication).
    pub fn peer_identity(&mut self, id: String, priority: u32) {
        self.peer.id = Some(id);
        self.peer.priority = Some(priority);
    }

    /// The monitor's verdict on the peer's process: every connection gone
    /// and every path refusing (`dead`), or not.
    pub fn peer_links(&mut self, dead: bool) {
        self.peer.dead = dead;
    }

    /// The gateway prober's verdict.
    /// Returns true when the gateway was just lost: decide at once (an
    /// active alone must stop confirming single-copy), not at the next tick.
    pub fn gateway(&mut self, now: u64, reachable: bool, answered: bool) -> bool {
        let lost = self.gateway && !reachable;
        self.gateway = reachable;
        if answered {
            self.last_gateway_ok_ms = Some(now);
        }
        lost
    }

    // ----- the peer's role messages -----

    pub fn on_peer_msg(&mut self, now: u64, msg: RoleMsg, store: &StoreView, out: &mut Vec<Out>) {
        match msg {
            RoleMsg::VoteRequest { epoch, rank } => {
                let mine = (store.last_op_epoch, store.last_seq);
                let serviceable = !self.disk_failed(store) && !store.loading;
                let outranks = rank > mine || (rank == mine && !self.preferred()) || (!serviceable && rank >= mine);
                // The same request again (a resend): the same answer.
                let again = epoch == self.promised && epoch > 0;
                // A failed disk cannot make the promise durable: no vote.
                // Not while an operator's forced promotion is pending: it
                // would serve in the next epoch beside the candidate (seed 122091).
                let grant = !self.role.serves_clients()
                    && self.busy == Busy::No
                    && !self.force_promote
                    && !self.disk_failed(store)
                    && (again || epoch > store.floor.max(self.promised))
                    && outranks;
                if grant {
                    self.promised = epoch;
                    self.vote = None;
                    // The candidate will confirm in a new epoch without this
                    // node until it says otherwise: not in sync any more.
                    if let Some(g) = store.in_sync {
                        self.gen_floor = self.gen_floor.max(g + 1);
                    }
                    out.push(Out::GrantVote(epoch));
                } else {
                    out.push(Out::Send(RoleMsg::VoteReply { epoch, granted: false }));
                }
            }
            RoleMsg::VoteReply { epoch, granted } => {
                let Some((asked, _)) = self.vote else { return };
                if asked != epoch {
                    return;
                }
                self.vote = None;
                if granted && !self.role.serves_clients() && self.busy == Busy::No && !self.disk_failed(store) {
                    self.start(
                        Out::Activate { at_least: epoch, in_sync_gen: None, how: Promotion::Voted },
                        Role::Active,
                        "both passive: this node has the newest store; the peer granted the vote",
                        now,
                        out,
                    );
                }
            }
            RoleMsg::TakeOver { epoch, last_seq } => {
                self.takeover = Some((epoch, last_seq, now + TAKEOVER_VALIDITY_MS));
            }
        }
    }

    // ----- the operator -----

    /// Hand the role to the in-sync peer; answered by `SwitchoverDone`.
    pub fn switchover(&mut self) -> Result<(), String> {
        if !self.role.serves_clients() {
            return Err("this node is not active".into());
        }
        if self.switchover {
            return Err("a switchover is already under way".into());
        }
        self.switchover = true;
        Ok(())
    }

    /// Make this passive node active without its peer (`promote --force`).
    pub fn force_promote(&mut self, store: &StoreView) -> Result<(), String> {
        if self.role.serves_clients() {
            return Err("this node is already active".into());
        }
        if self.disk_failed(store) {
            return Err("this node's disk failed; it cannot serve".into());
        }
        if store.loading {
            return Err("a snapshot is half loaded; this store cannot serve".into());
        }
        self.force_promote = true;
        Ok(())
    }

    // ----- transitions -----

    fn set_role(&mut self, role: Role, reason: &'static str, out: &mut Vec<Out>) {
        if role != self.role {
            if role.serves_clients() && !self.role.serves_clients() {
                self.failovers += 1;
                // Once this node has served again, the peer's position is news.
                self.position_told = None;
            }
            out.push(Out::RoleChanged { from: self.role, to: role, reason });
            self.role = role;
            self.last_reason = reason;
        }
    }

    fn start(&mut self, what: Out, to: Role, reason: &'static str, now: u64, out: &mut Vec<Out>) {
        match &what {
            Out::Activate { .. } => {
                self.stale_activation = false;
                self.lease_granted_ms = now;
                out.push(Out::Lease { until: now + self.cfg.isolation_timeout_ms });
            }
            // The broker stops serving as the command arrives: say so at once.
            _ => self.set_role(to, reason, out),
        }
        self.busy = Busy::Transition(to, reason);
        self.vote = None;
        out.push(what);
    }

    /// The shell finished the transition asked for last.
    pub fn transition_done(&mut self, now: u64, result: Result<(), String>, store: &StoreView, out: &mut Vec<Out>) {
        match std::mem::replace(&mut self.busy, Busy::No) {
            Busy::No => {}
            Busy::Transition(to, reason) => match result {
                Ok(()) if to.serves_clients() && std::mem::take(&mut self.stale_activation) => {
                    self.takeover = None;
                    self.force_promote = false;
                    // Never serve on it: the lease it started with is long
                    // over and nothing renewed it (ticks wait while busy).
                    self.start(
                        Out::Deactivate { still_last_active: false },
                        Role::Passive,
                        "frozen while promoting: the peer may have taken over meanwhile; stepping down",
                        now,
                        out,
                    );
                }
                Ok(()) => {
                    self.takeover = None;
                    self.force_promote = false;
                    if to.serves_clients() {
                        // Serving again: an older hand-over's wait is over.
                        self.holdoff_until_ms = 0;
                    }
                    self.set_role(to, reason, out);
                }
                Err(_) if to.serves_clients() => {
                    self.force_promote = false;
                    self.stale_activation = false;
                }
                Err(_) => self.set_role(to, reason, out),
            },
            Busy::Drain(reason) => {
                let result = match result {
                    Ok(()) => {
                        out.push(Out::Send(RoleMsg::TakeOver { epoch: store.epoch, last_seq: store.last_seq }));
                        // Leave the peer time to take the role before the
                        // both-passive rule applies.
                        self.holdoff_until_ms = now + (self.cfg.takeover_delay_ms * 2).max(TAKEOVER_VALIDITY_MS);
                        self.set_role(Role::Passive, reason, out);
                        Ok(())
                    }
                    Err(e) => {
                        self.set_role(Role::Passive, "handover failed; the pair will elect", out);
                        Err(e)
                    }
                };
                if std::mem::take(&mut self.switchover) {
                    out.push(Out::SwitchoverDone(result));
                }
            }
        }
    }

    // ----- the clock -----

    /// Decide, every tick (20 ms in a real node).
    pub fn tick(&mut self, now: u64, store: &StoreView, out: &mut Vec<Out>) {
        let gap = now.saturating_sub(self.last_tick_ms);
        self.last_tick_ms = now;
        if gap >= RESUME_GAP_MS {
            self.resumed_ms = now;
        }
        // A stalled disk: a flush running for disk_stall_ms while this
        // process ran (ticks keep coming while only the writer waits). The
        // time the whole process stood still is not the disk's.
        let flush_started = now.saturating_sub(store.flush_running_ms);
        let stalled_ms = now.saturating_sub(flush_started.max(self.resumed_ms));
        if store.flush_running_ms > 0 && stalled_ms >= self.cfg.disk_stall_ms && self.disk_failed.is_none() {
            let reason = format!("a flush has taken {stalled_ms} ms (disk_stall_ms {})", self.cfg.disk_stall_ms);
            self.disk_failed = Some(reason.clone());
            out.push(Out::DiskFailed(reason));
        }
        if gap >= self.cfg.stall_ms() && !self.role.serves_clients() {
            // This node stood still: the active may have declared it down and
            // confirmed without it. Not in sync until the active says so
            // again; judge nothing on what was seen before.
            if let Some(g) = store.in_sync {
                self.gen_floor = self.gen_floor.max(g + 1);
            }
            out.push(Out::ExpireInSync);
            self.silence_floor_ms = now;
            self.gateway = false;
            self.takeover = None;
            self.vote = None;
        }
        if gap >= self.cfg.isolation_timeout_ms && matches!(self.busy, Busy::Transition(to, _) if to.serves_clients()) {
            // Frozen while promoting (its store was slow to make the
            // promotion durable): the peer may have taken over meanwhile.
            self.stale_activation = true;
        }
        if self.busy != Busy::No {
            return;
        }
        if gap >= self.cfg.isolation_timeout_ms && self.role.serves_clients() {
            // Frozen past the lease: the peer may have taken over meanwhile.
            // Step down before anything else, without renewing the lease.
            self.start(
                Out::Deactivate { still_last_active: false },
                Role::Passive,
                "frozen past the lease: stepping down",
                now,
                out,
            );
            return;
        }
        let mut peer = self.peer_view(now);
        if matches!(peer, PeerView::Up(p) if p.role.serves_clients()) {
            // The peer took the role: a hand-over's wait is over. And an
            // operator's forced promotion not yet carried out (this node's
            // store was busy) rested on the peer being gone: it lapses
            // (seed 226793); with the peer back, a switchover moves the role.
            self.holdoff_until_ms = 0;
            if self.force_promote && self.busy == Busy::No && !self.role.serves_clients() {
                self.force_promote = false;
            }
        }
        if let PeerView::Up(p) = &mut peer {
            if self.role.serves_clients() {
                // What the passive says of itself may be stale (sent before it
                // noticed it stood still): it is in sync only if this node also
                // counts it so (every confirm waits for it).
                p.in_sync &= store.holding.1;
            }
        }
        let last_heard_any = [self.peer.last_heard_ms, self.last_gateway_ok_ms].into_iter().flatten().max();
        if !self.role.serves_clients()
            && !matches!(peer, PeerView::Up(_))
            && now.saturating_sub(last_heard_any.unwrap_or(self.started_ms)) >= self.cfg.peer_timeout_ms
        {
            // Isolated long enough for the active to serve without this node.
            if let Some(g) = store.in_sync {
                self.gen_floor = self.gen_floor.max(g + 1);
                out.push(Out::ExpireInSync);
            }
        }
        if self.role.serves_clients() {
            let lease_from = last_heard_any.unwrap_or(self.started_ms).max(self.lease_granted_ms);
            let peer_up = matches!(peer, PeerView::Up(_));
            // No majority (neither peer nor gateway): the lease is over now,
            // before the step-down this tick decides reaches the store, so
            // that nothing queued meanwhile is committed or confirmed.
            let until = if peer_up || self.gateway { lease_from + self.cfg.isolation_timeout_ms } else { now };
            out.push(Out::Lease { until });
            if !peer_up {
                out.push(Out::PeerDown { alone: self.gateway });
            }
            if let PeerView::Up(p) = peer {
                if self.peer.heartbeat.is_some_and(|hb| hb.disk_failed) && store.holding.1 {
                    out.push(Out::PeerFailed);
                }
                if !p.role.serves_clients()
                    && !p.in_sync
                    && p.serviceable
                    && store.holding.1
                    && now.saturating_sub(self.last_reaffirm_ms) >= 4 * self.cfg.heartbeat_ms
                {
                    self.last_reaffirm_ms = now;
                    out.push(Out::ReaffirmInSync);
                }
            }
        }
        let in_sync = self.in_sync(store);
        // A switchover from the peer: promote once this node holds everything it had.
        if let Some((epoch, last_seq, deadline)) = self.takeover {
            // The peer's heartbeat may still say active (sent before it
            // stepped down): wait for one that says it is not, in that epoch.
            let same_epoch = matches!(peer, PeerView::Up(p) if p.epoch == epoch);
            let stepped_down = matches!(peer, PeerView::Up(p) if !p.role.serves_clients());
            if now > deadline || !same_epoch || self.role.serves_clients() {
                self.takeover = None;
            } else if stepped_down && store.last_seq >= last_seq && in_sync.is_some() && !self.disk_failed(store) {
                self.takeover = None;
                self.start(
                    Out::Activate {
                        at_least: epoch.max(store.floor) + 1,
                        in_sync_gen: in_sync,
                        how: Promotion::Claimed,
                    },
                    Role::Active,
                    "switchover: the peer handed over the role",
                    now,
                    out,
                );
                return;
            }
        }
        let peer_epoch = match peer {
            PeerView::Up(p) => p.epoch.max(p.floor),
            _ => self.peer.heartbeat.map_or(0, |h| h.epoch.max(h.floor)),
        };
        let inputs = Inputs {
            now_ms: now,
            role: self.role,
            epoch: store.epoch,
            rank: (store.last_op_epoch, store.last_seq),
            in_sync: in_sync.is_some(),
            serve_alone: store.serve_alone,
            disk_failed: self.disk_failed(store),
            loading: store.loading,
            outranked: store.outranked || (self.role.serves_clients() && store.floor > store.epoch),
            preferred: self.preferred(),
            peer,
            gateway: self.gateway,
            gateway_down_ms: if self.gateway {
                0
            } else {
                now.saturating_sub(self.last_gateway_ok_ms.unwrap_or(self.started_ms))
            },
            last_heard_any_ms: last_heard_any.unwrap_or(0),
            isolation_timeout_ms: self.cfg.isolation_timeout_ms,
            takeover_delay_ms: self.cfg.takeover_delay_ms,
            failback_auto: self.cfg.failback_auto,
            holdoff_until_ms: self.holdoff_until_ms,
            force_promote: self.force_promote,
            switchover_requested: self.switchover,
        };
        let d = decide(&inputs);
        match d.action {
            Action::Stay => {
                if self.switchover && !matches!(peer, PeerView::Up(p) if p.in_sync) {
                    self.switchover = false;
                    out.push(Out::SwitchoverDone(Err("the peer is not up and in sync; no switchover".into())));
                }
                self.set_role(d.role, d.reason, out);
            }
            Action::Promote => {
                let at_least = store.floor.max(peer_epoch).max(self.promised) + 1;
                // A takeover relies on being in sync; the store checks it again.
                let forced = self.force_promote;
                let in_sync_gen = if forced { None } else { in_sync };
                let how = if forced { Promotion::Forced } else { Promotion::Claimed };
                self.start(Out::Activate { at_least, in_sync_gen, how }, Role::Active, d.reason, now, out);
            }
            Action::Elect => {
                let stale = self.vote.is_some_and(|(_, at)| now.saturating_sub(at) >= self.cfg.peer_timeout_ms);
                if self.vote.is_none() || stale {
                    let epoch = store.floor.max(peer_epoch).max(self.promised) + 1;
                    self.vote = Some((epoch, now));
                    out.push(Out::Send(RoleMsg::VoteRequest { epoch, rank: inputs.rank }));
                }
                let idle = if in_sync.is_some() { Role::Passive } else { Role::PassiveSyncing };
                self.set_role(idle, "both passive: asking the peer for its vote", out);
            }
            Action::StepDown => {
                let still_last_active = d.role == Role::Isolated;
                self.start(Out::Deactivate { still_last_active }, d.role, d.reason, now, out);
            }
            Action::HandOver => {
                // The broker stops serving as the drain starts (what it
                // accepted is confirmed as the peer acknowledges it): it is
                // not active any more, and says so at once.
                self.set_role(Role::Passive, d.reason, out);
                self.busy = Busy::Drain(d.reason);
                out.push(Out::Drain);
            }
            Action::HandOverNow => {
                // Nothing more is confirmed here; the store may be hung, so
                // the peer is told at once, not after the demotion.
                out.push(Out::Send(RoleMsg::TakeOver { epoch: store.epoch, last_seq: store.follower_acked }));
                self.start(Out::Deactivate { still_last_active: false }, d.role, d.reason, now, out);
                // Do not wait for a store that may never answer.
                self.busy = Busy::No;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RoleConfig {
        RoleConfig {
            node_id: "a".into(),
            priority: 200,
            heartbeat_ms: 100,
            peer_timeout_ms: 1000,
            isolation_timeout_ms: 1000,
            takeover_delay_ms: 1500,
            failback_auto: false,
            disk_stall_ms: 2000,
        }
    }

    fn store(holding: bool) -> StoreView {
        StoreView {
            epoch: 1,
            floor: 1,
            last_seq: 10,
            last_op_epoch: 1,
            in_sync: None,
            holding: (1, holding),
            follower_acked: 10,
            serve_alone: false,
            confirmed_alone: false,
            outranked: false,
            disk_failed: false,
            disk_full: false,
            flush_running_ms: 0,
            loading: false,
        }
    }

    fn passive_peer() -> Heartbeat {
        Heartbeat {
            role: Role::Passive,
            epoch: 1,
            floor: 1,
            last_seq: 10,
            last_op_epoch: 1,
            sees_gateway: true,
            in_sync: true,
            holding: false,
            holding_gen: 0,
            serviceable: true,
            disk_failed: false,
            confirmed_alone: false,
            disk_full: false,
        }
    }

    /// Node a, active in epoch 1 at `t` ms, its peer passive and in sync.
    fn active_with_peer(t: u64) -> RoleCore {
        let mut core = RoleCore::new(cfg(), 0);
        core.peer_identity("b".into(), 100);
        let mut out = Vec::new();
        core.gateway(0, true, true);
        core.heard_peer(0, passive_peer(), &mut out);
        core.start(
            Out::Activate { at_least: 1, in_sync_gen: None, how: Promotion::Claimed },
            Role::Active,
            "test",
            0,
            &mut out,
        );
        core.transition_done(0, Ok(()), &store(true), &mut out);
        assert!(core.role().serves_clients());
        let mut now = 0;
        while now < t {
            now += 100;
            core.heard_peer(now, passive_peer(), &mut out);
            core.gateway(now, true, true);
            core.tick(now, &store(true), &mut out);
        }
        core
    }

    #[test]
    fn a_nearly_full_disk_on_either_node_makes_the_active_refuse_and_moves_no_role() {
        let mut core = active_with_peer(1000);
        let mut out = Vec::new();
        assert!(!core.refuses_for_full_disk(&store(true)));
        // Its own disk.
        let full = StoreView { disk_full: true, ..store(true) };
        core.tick(1100, &full, &mut out);
        assert!(core.role().serves_clients(), "a nearly full disk moves no role: {out:?}");
        assert!(core.refuses_for_full_disk(&full));
        // The in-sync passive's disk: it writes every record too.
        let peer_full = Heartbeat { disk_full: true, ..passive_peer() };
        core.heard_peer(1200, peer_full, &mut out);
        core.tick(1200, &store(true), &mut out);
        assert!(core.role().serves_clients(), "{out:?}");
        assert!(core.refuses_for_full_disk(&store(true)));
        // Not once the passive no longer counts (declared down, failed): single-copy.
        assert!(!core.refuses_for_full_disk(&store(false)));
    }

    #[test]
    fn a_node_frozen_while_its_promotion_was_under_way_steps_down_once_it_is_done() {
        // Forced while the peer was down; the store was slow to make the
        // promotion durable and the process then stood still past
        // takeover_delay: the peer, restarted meanwhile, may have taken over
        // on its own claim, in the same epoch (review of issue 9).
        let mut core = RoleCore::new(cfg(), 0);
        core.peer_identity("a".into(), 200);
        let mut out = Vec::new();
        core.gateway(0, true, true);
        assert_eq!(core.force_promote(&store(false)), Ok(()));
        core.tick(10, &store(false), &mut out);
        assert!(out.iter().any(|o| matches!(o, Out::Activate { .. })), "{out:?}");
        let thawed = 10 + cfg().takeover_delay_ms + 500;
        core.gateway(thawed, true, true);
        core.tick(thawed, &store(false), &mut out);
        out.clear();
        core.transition_done(thawed, Ok(()), &store(true), &mut out);
        assert!(out.iter().any(|o| matches!(o, Out::Deactivate { .. })), "{out:?}");
        assert!(!core.role().serves_clients(), "{:?}", core.role());
    }

    #[test]
    fn a_forced_promotion_not_yet_carried_out_lapses_when_the_peer_serves_again() {
        // Ordered while the peer was gone; the store was busy, so the order
        // waited; the peer is back and active: serving beside it would be two
        // actives (seed 226793).
        let mut core = RoleCore::new(cfg(), 0);
        core.peer_identity("a".into(), 200);
        let mut out = Vec::new();
        core.gateway(0, true, true);
        assert_eq!(core.force_promote(&store(false)), Ok(()));
        let active_peer = Heartbeat { role: Role::Active, ..passive_peer() };
        for now in [10, 110, 210] {
            core.heard_peer(now, active_peer, &mut out);
            core.tick(now, &store(false), &mut out);
        }
        assert!(!out.iter().any(|o| matches!(o, Out::Activate { .. })), "{out:?}");
        assert!(!core.role().serves_clients());
    }

    #[test]
    fn a_node_handing_over_reports_passive_as_the_drain_starts() {
        // It stops serving then (the broker drains): were the paths cut
        // meanwhile, the peer could take over while this one still said active.
        let mut core = active_with_peer(1000);
        let mut out = Vec::new();
        let mut now = 1000;
        while !out.iter().any(|o| matches!(o, Out::Drain)) {
            assert!(now < 5000, "no hand-over after the gateway was lost: {out:?}");
            now += 100;
            core.heard_peer(now, passive_peer(), &mut out);
            core.gateway(now, false, false);
            core.tick(now, &store(true), &mut out);
        }
        assert_eq!(core.role(), Role::Passive, "draining, it no longer says active");
    }

    #[test]
    fn without_peer_or_gateway_the_lease_ends_at_once() {
        // Declared down, the peer may see the gateway and take over: nothing
        // queued for the store may be confirmed single-copy meanwhile.
        let mut core = active_with_peer(1000);
        let mut out = Vec::new();
        // The peer falls silent; the gateway goes a little later.
        let mut now = 1000;
        let mut leases = Vec::new();
        while now < 2500 {
            now += 20;
            core.gateway(now, now < 1500, now < 1500);
            out.clear();
            core.tick(now, &store(false), &mut out);
            leases.extend(
                out.iter().filter_map(|o| if let Out::Lease { until } = o { Some((now, *until)) } else { None }),
            );
        }
        let (t, until) = *leases.last().expect("a lease while active");
        assert!(until <= t, "a lease running on without a majority: until {until} at {t}");
        assert!(!core.role().serves_clients(), "stepped down: {:?}", core.role());
    }

    #[test]
    fn a_flush_across_a_freeze_of_the_whole_process_is_not_a_stalled_disk() {
        let mut core = active_with_peer(1000);
        let mut out = Vec::new();
        let flushing = |ms| StoreView { flush_running_ms: ms, ..store(true) };
        // SIGSTOP for 4 s in the middle of a flush: the first tick after it
        // sees the flush running for 4 s.
        core.heard_peer(5000, passive_peer(), &mut out);
        core.tick(5000, &flushing(4010), &mut out);
        assert!(!out.iter().any(|o| matches!(o, Out::DiskFailed(_))), "{out:?}");
        // The same flush still hanging disk_stall_ms after the process resumed: failed.
        let mut now = 5000;
        while now < 5000 + 2000 {
            now += 20;
            core.heard_peer(now, passive_peer(), &mut out);
            core.tick(now, &flushing(4010 + now - 5000), &mut out);
        }
        assert!(out.iter().any(|o| matches!(o, Out::DiskFailed(_))), "{out:?}");
    }

    #[test]
    fn the_wait_after_a_hand_over_ends_once_the_peer_took_the_role() {
        let mut core = active_with_peer(1000);
        let mut out = Vec::new();
        core.gateway(1000, false, false);
        core.switchover().expect("active");
        core.tick(1000, &store(true), &mut out);
        assert!(out.iter().any(|o| matches!(o, Out::Drain)), "{out:?}");
        core.transition_done(1010, Ok(()), &store(true), &mut out);
        assert!(core.holdoff_until_ms > 1010);
        // The peer takes the role, then (say) dies; the wait is not still running.
        let active_peer = Heartbeat { role: Role::Active, epoch: 2, floor: 2, ..passive_peer() };
        core.heard_peer(1100, active_peer, &mut out);
        core.tick(1100, &store(false), &mut out);
        assert_eq!(core.holdoff_until_ms, 0);
    }
}
