//! twinmq-ha: the active/passive pair.
//!
//! Owns: the role an operator sees ([`Role`]), the pure role decision
//! ([`decide()`](fn@decide)), the HA link (framing, optional TLS — [`tls`] — and the
//! challenge/response on the cluster secret), the `PeerMonitor` and `WitnessProber` actors and the
//! `RoleArbiter` that calls the decision and carries it out (DESIGN.md
//! sections 3 and 4), and the pair's recent events ([`events`]), which the
//! two nodes exchange. Replication itself is the store writer's job
//! (twinmq-store); this crate moves its records over the HA link.

pub mod decide;
pub mod role;
pub mod sim;

pub use decide::{decide, Action, Decision, Inputs, PeerStatus, PeerView};

use serde::{Deserialize, Serialize};

/// The states an operator sees (DESIGN.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Active,
    ActiveAlone,
    PassiveSyncing,
    Passive,
    /// Not serving until the peer returns or an operator forces it: this
    /// node may lack what the peer confirmed (DESIGN.md section 4).
    Waiting,
    Isolated,
}

impl Role {
    /// Only active roles serve clients.
    pub fn serves_clients(self) -> bool {
        matches!(self, Role::Active | Role::ActiveAlone)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Active => "active",
            Role::ActiveAlone => "active-alone",
            Role::PassiveSyncing => "passive-syncing",
            Role::Passive => "passive",
            Role::Waiting => "waiting",
            Role::Isolated => "isolated",
        })
    }
}

pub mod arbiter;
pub mod config;
pub mod events;
pub mod link;
pub mod monitor;
pub mod secret;
pub mod tls;
pub mod wire;
pub mod witness;

pub use arbiter::{ForcePromote, HaStatus, RoleArbiter, RoleCommand, SetMonitor, Switchover};
pub use config::{Failback, Gateway, HaConfig};

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::watch;

/// The running pair machinery of one node.
pub struct Pair {
    pub arbiter: Addr<RoleArbiter>,
    pub status: watch::Receiver<HaStatus>,
    /// The HA actors' own thread, so a busy broker cannot delay heartbeats, probes or leases.
    thread: Arbiter,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").finish_non_exhaustive()
    }
}

impl Pair {
    /// Start the arbiter, the peer monitor (on `ha_listener`) and the witness prober.
    pub fn start(
        cfg: Arc<HaConfig>,
        writer: twinmq_store::Writer,
        broker: Recipient<RoleCommand>,
        divergent_to: Recipient<monitor::DivergentMessages>,
        ha_listener: std::net::TcpListener,
    ) -> Pair {
        let thread = Arbiter::new();
        let view = arbiter::view_of(&writer);
        let initial = HaStatus {
            role: Role::PassiveSyncing,
            epoch: view.epoch,
            floor: view.floor,
            last_seq: view.last_seq,
            in_sync: false,
            peer_id: None,
            peer_state: "silent",
            peer_role: None,
            peer_epoch: None,
            peer_last_seq: None,
            peer_last_op_epoch: None,
            peer_in_sync: None,
            peer_sees_gateway: None,
            peer_last_heard_ms_ago: None,
            peer_connections: 0,
            gateway: cfg.gateway.to_string(),
            gateway_reachable: false,
            sync_lag: None,
            last_reason: "starting",
            failovers: 0,
            disk_failure: None,
            peer_stomp: None,
            events: Default::default(),
        };
        let (status_tx, status) = watch::channel(initial);
        // The first heartbeat may go out before the arbiter's first tick: it
        // must already tell the truth about the store (elections compare it).
        let (hb_tx, hb_rx) = watch::channel(wire::Heartbeat {
            role: Role::PassiveSyncing,
            epoch: view.epoch,
            floor: view.floor,
            last_seq: view.last_seq,
            last_op_epoch: view.last_op_epoch,
            sees_gateway: false,
            in_sync: false,
            holding: false,
            holding_gen: 0,
            serviceable: !view.disk_failed && !view.loading,
            disk_failed: view.disk_failed,
            confirmed_alone: view.confirmed_alone,
            disk_full: view.disk_full,
        });
        let (c, w) = (cfg.clone(), writer.clone());
        let arbiter =
            RoleArbiter::start_in_arbiter(&thread.handle(), move |_| RoleArbiter::new(c, w, broker, status_tx, hb_tx));
        let (c, a, s) = (cfg.clone(), arbiter.clone(), status.clone());
        let monitor = monitor::PeerMonitor::start_in_arbiter(&thread.handle(), move |_| {
            monitor::PeerMonitor::new(c, writer, hb_rx, s, a, divergent_to, ha_listener)
        });
        let a = arbiter.clone();
        let (gw, interval, failures) = (cfg.gateway.clone(), cfg.probe_interval, cfg.probe_failures);
        witness::WitnessProber::start_in_arbiter(&thread.handle(), move |_| {
            witness::WitnessProber::new(gw, interval, failures, a.recipient())
        });
        arbiter.do_send(SetMonitor(monitor));
        Pair { arbiter, status, thread }
    }

    pub fn stop(&self) {
        self.thread.stop();
    }
}
