//! twinmq-ha: the active/passive pair.
//!
//! Will own the HA link, the `PeerMonitor` and `WitnessProber` actors, the pure
//! role decision and the `Replicator` (DESIGN.md sections 4 and 5). In the
//! single-node release it only defines the role a node reports; a single node
//! is always `active`.

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
