//! The role decision: a pure function of what this node sees and the time.
//!
//! Every rule of DESIGN.md section 4 is a branch here and a row in the table
//! test below. No I/O: the `RoleArbiter` gathers the inputs, calls
//! [`decide`], and carries out the returned [`Action`].

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
    pub epoch: u64,
    pub last_seq: u64,
    pub sees_gateway: bool,
    /// A passive peer that holds everything this (active) node confirmed.
    pub in_sync: bool,
}

/// Everything the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    pub now_ms: u64,
    pub role: Role,
    pub epoch: u64,
    pub last_seq: u64,
    /// Passive: holds everything the active confirmed, as of the last time the
    /// active was heard (the stream was live and caught up).
    pub in_sync: bool,
    /// The store says this node was the last active one (cold start rule).
    pub was_last_active: bool,
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

/// What the arbiter must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond reporting `role` (which may change label only, e.g.
    /// `active` to `active-alone`, or `passive` to `isolated`).
    Stay,
    /// Become active: epoch + 1, start serving.
    Promote,
    /// Stop serving now (drop clients) and be passive.
    StepDown,
    /// Orderly switchover: drain, final sync, tell the peer to take over.
    HandOver,
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
        PeerView::Silent { .. } | PeerView::Dead => {
            d(Action::Stay, Role::ActiveAlone, "neither peer nor gateway: lease still running")
        }
    }
}

fn decide_passive(i: &Inputs) -> Decision {
    let idle = if i.in_sync { Role::Passive } else { Role::PassiveSyncing };
    if i.force_promote {
        return d(Action::Promote, Role::Active, "promoted by the operator (--force)");
    }
    match i.peer {
        PeerView::Up(p) if p.role.serves_clients() => d(Action::Stay, idle, "peer is active"),
        PeerView::Up(p) => {
            if i.now_ms < i.holdoff_until_ms {
                return d(Action::Stay, idle, "handed over recently: waiting for the peer to take the role");
            }
            let mine = (i.epoch, i.last_seq);
            let theirs = (p.epoch, p.last_seq);
            if mine > theirs || (mine == theirs && i.preferred) {
                d(Action::Promote, Role::Active, "both passive: this node has the newest store (or wins the tie)")
            } else {
                d(Action::Stay, idle, "both passive: the peer has the newer store (or wins the tie)")
            }
        }
        PeerView::Silent { .. } | PeerView::Dead if !i.gateway => {
            d(Action::Stay, Role::Isolated, "isolated: neither peer nor gateway")
        }
        PeerView::Dead => {
            if i.in_sync || i.was_last_active {
                d(Action::Promote, Role::Active, "peer process gone (reset, every path refuses), gateway up")
            } else {
                d(
                    Action::Stay,
                    idle,
                    "peer gone but this node is not in sync: staying passive (promote --force overrides)",
                )
            }
        }
        PeerView::Silent { since_ms } => {
            if !(i.in_sync || i.was_last_active) {
                d(
                    Action::Stay,
                    idle,
                    "peer silent but this node is not in sync: staying passive (promote --force overrides)",
                )
            } else if i.now_ms.saturating_sub(since_ms) >= i.takeover_delay_ms {
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
            last_seq: 1000,
            in_sync: true,
            was_last_active: false,
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
        PeerStatus { role, epoch: 5, last_seq: 1000, sees_gateway: true, in_sync: true }
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
                "active, neither, lease running: stay",
                Inputs { peer: silent_short, gateway: false, last_heard_any_ms: NOW - 400, ..base(Active) },
                Stay,
                ActiveAlone,
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
            // Both passive.
            (
                "both passive, my store newer epoch: promote",
                Inputs { peer: up(Passive, |p| p.epoch = 4), preferred: false, ..base(Passive) },
                Promote,
                Active,
            ),
            (
                "both passive, my store longer: promote",
                Inputs { peer: up(Passive, |p| p.last_seq = 999), preferred: false, ..base(Passive) },
                Promote,
                Active,
            ),
            (
                "both passive, peer newer: stay",
                Inputs { peer: up(Passive, |p| p.last_seq = 1001), ..base(Passive) },
                Stay,
                Passive,
            ),
            (
                "both passive, tie, preferred: promote",
                Inputs { peer: up(Passive, |_| {}), ..base(Passive) },
                Promote,
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
                "passive not in sync, peer down, gateway up: stay passive",
                Inputs { peer: silent_long, in_sync: false, ..base(Passive) },
                Stay,
                PassiveSyncing,
            ),
            (
                "passive not in sync, peer dead: stay passive",
                Inputs { peer: PeerView::Dead, in_sync: false, ..base(Passive) },
                Stay,
                PassiveSyncing,
            ),
            (
                "operator promote --force overrides",
                Inputs { peer: silent_long, in_sync: false, force_promote: true, ..base(Passive) },
                Promote,
                Active,
            ),
            // Cold start.
            (
                "cold start alone, was last active, gateway up: promote",
                Inputs { peer: silent_long, in_sync: false, was_last_active: true, ..base(Passive) },
                Promote,
                Active,
            ),
            (
                "cold start alone, was not last active: wait for peer",
                Inputs { peer: silent_long, in_sync: false, ..base(Passive) },
                Stay,
                PassiveSyncing,
            ),
            (
                "cold start alone, last active, no gateway: isolated",
                Inputs { peer: silent_long, in_sync: false, was_last_active: true, gateway: false, ..base(Passive) },
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
                assert_ne!(db.action, Action::Promote, "passive never promotes while it sees the active");
                assert!(!(da.action == Action::Stay && da.role.serves_clients() && db.role.serves_clients()));
            }
        }
    }
}
