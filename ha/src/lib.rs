//! twinmq-ha: the active/passive pair.
//!
//! Owns: the role an operator sees ([`Role`]), the pure role decision
//! ([`decide`]), the HA link (framing and the challenge/response on the
//! cluster secret), the `PeerMonitor` and `WitnessProber` actors and the
//! `RoleArbiter` that calls the decision and carries it out (DESIGN.md
//! sections 3 and 4). Replication itself is the store writer's job
//! (twinmq-store); this crate moves its records over the HA link.

pub mod decide;

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
            Role::Isolated => "isolated",
        })
    }
}
