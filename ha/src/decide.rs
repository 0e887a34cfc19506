//! The role decision: a pure function of what this node sees and the time.
//!
//! Every rule of DESIGN.md section 4 is a branch here and a row in the table
//! test below. No I/O: the [`crate::role::RoleCore`] gathers the inputs,
//! calls [`decide`], and turns the returned [`Action`] into work.

use crate::Role;

/// What this node knows of its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerView {
    /// Heard within `peer_timeout` on at least one path.
    Up(PeerStatus),
    /// Silent on every path since `since_ms` (last heard, or this node's start).
    Silent { since_ms: u64 },
    /// Its connection was reset and every path refuses new connections: the
    /// host answers but the process is gone (the fast path: no lease wait).
    Dead,
}

/// What the peer last said about itself in a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStatus {
    pub role: Role,
    /// The epoch it serves in (active) or follows (passive).
    pub epoch: u64,
    /// The highest epoch it has heard of.
    pub floor: u64,
    /// Its store's rank: (epoch of its last op, last op).
    pub rank: (u64, u64),
    pub sees_gateway: bool,
    /// A passive peer: it holds everything this (active) node confirmed.
    pub in_sync: bool,
    /// Its store works (no failed disk, no half-loaded snapshot).
    pub serviceable: bool,
}

/// Everything the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    pub now_ms: u64,
    pub role: Role,
    /// The epoch this node serves in (active) or follows (passive).
    pub epoch: u64,
    /// This store's rank: (epoch of its last op, last op).
    pub rank: (u64, u64),
    /// Passive: holds everything the active confirmed (DESIGN.md section 4,
    /// "in sync expires": already false if this node stood still or was isolated).
    pub in_sync: bool,
    /// The store says nobody can have taken over since this node stopped
    /// serving (it was active with no in-sync peer): the cold-start rule.
    pub serve_alone: bool,
    /// This node's disk failed (an error, or a flush slower than `disk_stall_ms`).
    pub disk_failed: bool,
    /// A snapshot is half loaded: this store cannot serve.
    pub loading: bool,
    /// Active: the peer's store knows a higher epoch (it refused to follow).
    pub outranked: bool,
    /// This node wins ties (higher priority, then lower node id).
    pub preferred: bool,
    pub peer: PeerView,
    /// The gateway answers probes (after the prober's hysteresis).
    pub gateway: bool,
    /// How long the gateway has been unreachable (0 while it answers).
    pub gateway_down_ms: u64,
    /// Last time this node heard its peer or the gateway (the lease).
    pub last_heard_any_ms: u64,
    pub isolation_timeout_ms: u64,
    pub takeover_delay_ms: u64,
    pub failback_auto: bool,
    /// After handing the role over, do not take it back before this time.
    pub holdoff_until_ms: u64,
    /// The operator said `promote --force`.
    pub force_promote: bool,
    /// The operator said `switchover`.
    pub switchover_requested: bool,
}

/// What the role core must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond reporting `role` (which may change label only, e.g.
    /// `active` to `active-alone`, or `passive` to `isolated`).
    Stay,
    /// Become active now: the peer is gone and this node holds everything
    /// (in sync, or the cold-start rule), or the operator forces it.
    Promote,
    /// Both passive and this node's store ranks first: become active once
    /// the peer grants it (a vote, so that two stale views never both promote).
    Elect,
    /// Stop serving now (drop clients) and be passive.
    StepDown,
    /// Orderly switchover: drain, final sync, tell the peer to take over.
    HandOver,
    /// This node's disk failed while active: stop serving at once and tell
    /// the in-sync peer to take over (no drain: nothing more is confirmed here).
    HandOverNow,
}

/// The outcome: the action, the role to report, and why (for the INFO line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub role: Role,
    pub reason: &'static str,
}

fn d(action: Action, role: Role, reason: &'static str) -> Decision {
    Decision { action, role, reason }
}

/// Decide this node's next step. See DESIGN.md section 4 for the rules.
pub fn decide(i: &Inputs) -> Decision {
    if i.role.serves_clients() {
        decide_active(i)
    } else {
        decide_passive(i)
    }
}

fn decide_active(i: &Inputs) -> Decision {
    if i.disk_failed {
        return match i.peer {
            PeerView::Up(p) if !p.role.serves_clients() && p.in_sync && p.serviceable => d(
                Action::HandOverNow,
                Role::Waiting,
                "disk failed: handing the role to the in-sync peer; restart once the disk is fixed",
            ),
            _ => d(
                Action::StepDown,
                Role::Waiting,
                "disk failed and no in-sync peer to hand over to: serving nothing; restart once the disk is fixed",
            ),
        };
    }
    if i.outranked {
        return d(Action::StepDown, Role::Passive, "the peer's store is at a higher epoch: stepping down to follow it");
    }
    match i.peer {
        PeerView::Up(p) if p.role.serves_clients() => {
            // A healed split: the higher epoch stays, ties go to the preferred node.
            if p.epoch > i.epoch || (p.epoch == i.epoch && !i.preferred) {
                d(
                    Action::StepDown,
                    Role::Passive,
                    "healed split: the peer is active with a higher epoch or wins the tie",
                )
            } else {
                d(Action::Stay, Role::Active, "healed split: this node keeps the role (higher epoch or tie winner)")
            }
        }
        PeerView::Up(p) if p.floor > i.epoch => {
            d(Action::StepDown, Role::Passive, "the peer has heard of a higher epoch: stepping down")
        }
        PeerView::Up(p) => {
            if i.switchover_requested && p.in_sync {
                d(Action::HandOver, Role::Active, "operator switchover to the in-sync peer")
            } else if !i.gateway && i.gateway_down_ms >= i.isolation_timeout_ms && p.sees_gateway && p.in_sync {
                // Lost for a while, so that a gateway both nodes lose at once (the
                // peer's report lags by a heartbeat) does not move the role.
                d(
                    Action::HandOver,
                    Role::Active,
                    "lost the gateway while the peer sees it: this node left the client network",
                )
            } else if i.failback_auto && !i.preferred && p.in_sync && (p.sees_gateway || !i.gateway) {
                // Not to a peer that lost the gateway: it would hand straight back.
                d(Action::HandOver, Role::Active, "failback: the preferred peer has caught up")
            } else {
                d(Action::Stay, Role::Active, "peer up and passive")
            }
        }
        PeerView::Silent { .. } | PeerView::Dead
            if i.now_ms.saturating_sub(i.last_heard_any_ms) >= i.isolation_timeout_ms =>
        {
            d(Action::StepDown, Role::Isolated, "lease expired: neither peer nor gateway heard for isolation_timeout")
        }
        PeerView::Silent { .. } | PeerView::Dead if i.gateway => {
            d(Action::Stay, Role::ActiveAlone, "peer down, gateway up: serving alone (confirms are single-copy)")
        }
        // No majority: passive at once, not at the end of the lease (the
        // peer, if it sees the gateway, takes over once the lease is over).
        PeerView::Silent { .. } | PeerView::Dead => {
            d(Action::StepDown, Role::Isolated, "isolated: neither peer nor gateway; stepping down")
        }
    }
}

fn decide_passive(i: &Inputs) -> Decision {
    let idle = if i.in_sync { Role::Passive } else { Role::PassiveSyncing };
    if i.disk_failed {
        return d(Action::Stay, Role::Waiting, "disk failed: serving nothing; restart once the disk is fixed");
    }
    if i.loading {
        return match i.peer {
            PeerView::Up(p) if p.role.serves_clients() => d(Action::Stay, idle, "loading a snapshot from the peer"),
            _ => d(
                Action::Stay,
                Role::Waiting,
                "a snapshot from the peer is half loaded: this store cannot serve until the peer returns",
            ),
        };
    }
    if i.force_promote {
        return d(Action::Promote, Role::Active, "promoted by the operator (--force)");
    }
    match i.peer {
        PeerView::Up(p) if p.role.serves_clients() => d(Action::Stay, idle, "peer is active"),
        PeerView::Up(p) => {
            if i.now_ms < i.holdoff_until_ms {
                return d(Action::Stay, idle, "handed over recently: waiting for the peer to take the role");
            }
            if i.rank > p.rank || (i.rank == p.rank && i.preferred) || !p.serviceable && i.rank >= p.rank {
                d(Action::Elect, Role::Active, "both passive: this node has the newest store (or wins the tie)")
            } else if !p.serviceable {
                d(
                    Action::Stay,
                    Role::Waiting,
                    "both passive: the peer holds newer data but cannot serve (disk failed); `promote --force` says what may be lost, `--yes` overrides",
                )
            } else {
                d(Action::Stay, idle, "both passive: the peer has the newer store (or wins the tie)")
            }
        }
        PeerView::Silent { .. } | PeerView::Dead if !i.gateway => {
            d(Action::Stay, Role::Isolated, "isolated: neither peer nor gateway")
        }
        PeerView::Dead | PeerView::Silent { .. } if !(i.in_sync || i.serve_alone) => d(
            Action::Stay,
            Role::Waiting,
            "waiting for the peer: it may have confirmed messages this node lacks (not in sync, or it may have \
             taken over after this node stopped); `promote --force` says what may be lost, `--yes` overrides",
        ),
        PeerView::Dead => d(Action::Promote, Role::Active, "peer process gone (reset, every path refuses), gateway up"),
        PeerView::Silent { since_ms } => {
            if i.now_ms.saturating_sub(since_ms) >= i.takeover_delay_ms {
                d(Action::Promote, Role::Active, "peer silent on every path for takeover_delay, gateway up")
            } else {
                d(Action::Stay, idle, "peer silent: waiting out takeover_delay")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    const NOW: u64 = 100_000;

    fn base(role: Role) -> Inputs {
        Inputs {
            now_ms: NOW,
            role,
            epoch: 5,
            rank: (5, 1000),
            in_sync: true,
            serve_alone: false,
            disk_failed: false,
            loading: false,
            outranked: false,
            preferred: true,
            peer: PeerView::Up(peer(Role::Passive)),
            gateway: true,
            gateway_down_ms: 0,
            last_heard_any_ms: NOW,
            isolation_timeout_ms: 1000,
            takeover_delay_ms: 1500,
            failback_auto: false,
            holdoff_until_ms: 0,
            force_promote: false,
            switchover_requested: false,
        }
    }

    fn peer(role: Role) -> PeerStatus {
        PeerStatus { role, epoch: 5, floor: 5, rank: (5, 1000), sees_gateway: true, in_sync: true, serviceable: true }
    }

    fn up(role: Role, f: impl FnOnce(&mut PeerStatus)) -> PeerView {
        let mut p = peer(role);
        f(&mut p);
        PeerView::Up(p)
    }

    /// One row: a name, the inputs, the expected action and reported role.
    fn row(name: &str, i: Inputs, action: Action, role: Role) {
        let got = decide(&i);
        assert_eq!((got.action, got.role), (action, role), "row `{name}`: {got:?} from {i:?}");
    }

    #[test]
    fn every_rule_of_design_section_4() {
        use Role::*;
        let silent_long = PeerView::Silent { since_ms: NOW - 1500 };
        let silent_short = PeerView::Silent { since_ms: NOW - 500 };
        let table: Vec<(&str, Inputs, Action, Role)> = vec![
            // Neither peer nor gateway.
            (
                "passive, neither peer nor gateway: isolated",
                Inputs { peer: silent_long, gateway: false, ..base(Passive) },
                Stay,
                Isolated,
            ),
            (
                "passive, peer dead, no gateway: isolated",
                Inputs { peer: PeerView::Dead, gateway: false, ..base(Passive) },
                Stay,
                Isolated,
            ),
            (
                "active, neither, lease expired: step down",
                Inputs { peer: silent_long, gateway: false, last_heard_any_ms: NOW - 1000, ..base(Active) },
                StepDown,
                Isolated,
            ),
            (
                "active, neither, lease still running: passive at once (no majority)",
                Inputs { peer: silent_short, gateway: false, last_heard_any_ms: NOW - 400, ..base(Active) },
                StepDown,
                Isolated,
            ),
            (
                "active, peer process gone, no gateway: passive at once",
                Inputs { peer: PeerView::Dead, gateway: false, last_heard_any_ms: NOW - 100, ..base(Active) },
                StepDown,
                Isolated,
            ),
            // Peer up and active.
            ("passive, peer active: stay passive", Inputs { peer: up(Active, |_| {}), ..base(Passive) }, Stay, Passive),
            (
                "passive not in sync, peer active: syncing",
                Inputs { peer: up(Active, |_| {}), in_sync: false, ..base(Passive) },
                Stay,
                PassiveSyncing,
            ),
            (
                "healed split, peer higher epoch: step down",
                Inputs { peer: up(Active, |p| p.epoch = 6), ..base(Active) },
                StepDown,
                Passive,
            ),
            (
                "healed split, my higher epoch: stay",
                Inputs { peer: up(Active, |p| p.epoch = 4), preferred: false, ..base(Active) },
                Stay,
                Active,
            ),
            (
                "healed split, tie, I am preferred: stay",
                Inputs { peer: up(Active, |_| {}), ..base(Active) },
                Stay,
                Active,
            ),
            (
                "healed split, tie, peer preferred: step down",
                Inputs { peer: up(Active, |_| {}), preferred: false, ..base(Active) },
                StepDown,
                Passive,
            ),
            // Histories are ordered by epoch.
            (
                "active, passive peer has heard of a higher epoch: step down",
                Inputs { peer: up(Passive, |p| p.floor = 6), ..base(Active) },
                StepDown,
                Passive,
            ),
            (
                "active, a follower refused for a higher epoch: step down",
                Inputs { outranked: true, ..base(Active) },
                StepDown,
                Passive,
            ),
            // Both passive.
            (
                "both passive, my last op has the newer epoch: elect",
                Inputs { peer: up(Passive, |p| p.rank = (4, 5000)), preferred: false, ..base(Passive) },
                Elect,
                Active,
            ),
            (
                "both passive, my store longer: elect",
                Inputs { peer: up(Passive, |p| p.rank = (5, 999)), preferred: false, ..base(Passive) },
                Elect,
                Active,
            ),
            (
                "both passive, peer newer: stay",
                Inputs { peer: up(Passive, |p| p.rank = (5, 1001)), ..base(Passive) },
                Stay,
                Passive,
            ),
            (
                "both passive, a force-promoted empty peer at a high epoch does not outrank data",
                Inputs {
                    peer: up(Passive, |p| {
                        p.epoch = 9;
                        p.rank = (0, 0)
                    }),
                    preferred: false,
                    ..base(Passive)
                },
                Elect,
                Active,
            ),
            (
                "both passive, tie, preferred: elect",
                Inputs { peer: up(Passive, |_| {}), ..base(Passive) },
                Elect,
                Active,
            ),
            (
                "both passive, tie, not preferred: stay",
                Inputs { peer: up(Passive, |_| {}), preferred: false, ..base(Passive) },
                Stay,
                Passive,
            ),
            (
                "both passive after my handover: hold off",
                Inputs { peer: up(Passive, |_| {}), holdoff_until_ms: NOW + 1, ..base(Passive) },
                Stay,
                Passive,
            ),
            (
                "both passive, the peer is newer but its disk failed: wait",
                Inputs {
                    peer: up(Passive, |p| {
                        p.rank = (5, 2000);
                        p.serviceable = false
                    }),
                    ..base(Passive)
                },
                Stay,
                Waiting,
            ),
            (
                "both passive, the peer's disk failed and it is not newer: elect",
                Inputs { peer: up(Passive, |p| p.serviceable = false), preferred: false, ..base(Passive) },
                Elect,
                Active,
            ),
            // Active with the peer up and passive.
            ("active, peer passive, both see gateway: stay", base(Active), Stay, Active),
            (
                "active, peer passive, neither sees gateway: stay",
                Inputs { gateway: false, peer: up(Passive, |p| p.sees_gateway = false), ..base(Active) },
                Stay,
                Active,
            ),
            (
                "active lost gateway for isolation_timeout, peer sees it: hand over",
                Inputs { gateway: false, gateway_down_ms: 1000, ..base(Active) },
                HandOver,
                Active,
            ),
            (
                "active just lost gateway, the peer's report may lag: stay",
                Inputs { gateway: false, gateway_down_ms: 300, ..base(Active) },
                Stay,
                Active,
            ),
            (
                "active lost gateway, peer sees it but lags: stay",
                Inputs {
                    gateway: false,
                    gateway_down_ms: 5000,
                    peer: up(Passive, |p| p.in_sync = false),
                    ..base(Active)
                },
                Stay,
                Active,
            ),
            (
                "operator switchover to in-sync peer",
                Inputs { switchover_requested: true, ..base(Active) },
                HandOver,
                Active,
            ),
            (
                "failback auto, peer preferred and in sync: hand over",
                Inputs { failback_auto: true, preferred: false, ..base(Active) },
                HandOver,
                Active,
            ),
            (
                "failback auto, peer preferred but syncing: stay",
                Inputs {
                    failback_auto: true,
                    preferred: false,
                    peer: up(Passive, |p| p.in_sync = false),
                    ..base(Active)
                },
                Stay,
                Active,
            ),
            ("failback manual, peer preferred: stay", Inputs { preferred: false, ..base(Active) }, Stay, Active),
            (
                "failback auto, peer preferred but without the gateway: stay",
                Inputs {
                    failback_auto: true,
                    preferred: false,
                    peer: up(Passive, |p| p.sees_gateway = false),
                    ..base(Active)
                },
                Stay,
                Active,
            ),
            // A failing disk is a failed node.
            (
                "active, disk failed, in-sync peer: hand over at once",
                Inputs { disk_failed: true, ..base(Active) },
                HandOverNow,
                Waiting,
            ),
            (
                "active, disk failed, peer not in sync: step down",
                Inputs { disk_failed: true, peer: up(Passive, |p| p.in_sync = false), ..base(Active) },
                StepDown,
                Waiting,
            ),
            (
                "active, disk failed, peer down: step down",
                Inputs { disk_failed: true, peer: silent_long, ..base(Active) },
                StepDown,
                Waiting,
            ),
            (
                "passive, disk failed, peer down: wait",
                Inputs { disk_failed: true, peer: PeerView::Dead, ..base(Passive) },
                Stay,
                Waiting,
            ),
            // Peer down, gateway up.
            ("active, peer down, gateway up: alone", Inputs { peer: silent_long, ..base(Active) }, Stay, ActiveAlone),
            (
                "active woke from a freeze: stale gateway flag, lease expired: step down",
                Inputs { peer: silent_long, last_heard_any_ms: NOW - 2000, ..base(Active) },
                StepDown,
                Isolated,
            ),
            (
                "passive in sync, peer silent past takeover_delay: promote",
                Inputs { peer: silent_long, ..base(Passive) },
                Promote,
                Active,
            ),
            (
                "passive in sync, peer silent briefly: wait",
                Inputs { peer: silent_short, ..base(Passive) },
                Stay,
                Passive,
            ),
            (
                "passive in sync, peer process dead: promote at once",
                Inputs { peer: PeerView::Dead, ..base(Passive) },
                Promote,
                Active,
            ),
            (
                "passive not in sync, peer down, gateway up: waiting",
                Inputs { peer: silent_long, in_sync: false, ..base(Passive) },
                Stay,
                Waiting,
            ),
            (
                "passive not in sync, peer dead: waiting",
                Inputs { peer: PeerView::Dead, in_sync: false, ..base(Passive) },
                Stay,
                Waiting,
            ),
            (
                "passive with a half-loaded snapshot, peer dead: waiting",
                Inputs { peer: PeerView::Dead, loading: true, ..base(Passive) },
                Stay,
                Waiting,
            ),
            (
                "operator promote --force overrides",
                Inputs { peer: silent_long, in_sync: false, force_promote: true, ..base(Passive) },
                Promote,
                Active,
            ),
            // Cold start.
            (
                "cold start alone, was active with no in-sync peer, gateway up: promote",
                Inputs { peer: silent_long, in_sync: false, serve_alone: true, ..base(Passive) },
                Promote,
                Active,
            ),
            (
                "cold start alone, a peer may have taken over: waiting",
                Inputs { peer: silent_long, in_sync: false, ..base(Passive) },
                Stay,
                Waiting,
            ),
            (
                "cold start alone, may serve alone, no gateway: isolated",
                Inputs { peer: silent_long, in_sync: false, serve_alone: true, gateway: false, ..base(Passive) },
                Stay,
                Isolated,
            ),
        ];
        for (name, i, action, role) in table {
            row(name, i, action, role);
        }
    }

    #[test]
    fn a_cut_ha_cable_alone_never_makes_two_actives() {
        // The second path still carries heartbeats: both nodes see each other
        // as Up. Whatever the gateway, at most one of them ends up active.
        for gw_a in [true, false] {
            for gw_b in [true, false] {
                let a =
                    Inputs { gateway: gw_a, peer: up(Role::Passive, |p| p.sees_gateway = gw_b), ..base(Role::Active) };
                let b = Inputs {
                    gateway: gw_b,
                    preferred: false,
                    peer: up(Role::Active, |p| p.sees_gateway = gw_a),
                    ..base(Role::Passive)
                };
                let (da, db) = (decide(&a), decide(&b));
                assert!(
                    !matches!(db.action, Action::Promote | Action::Elect),
                    "passive never promotes while it sees the active"
                );
                assert!(!(da.action == Action::Stay && da.role.serves_clients() && db.role.serves_clients()));
            }
        }
    }
}
