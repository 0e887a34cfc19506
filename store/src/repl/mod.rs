//! The replication protocol as a pure state machine (DESIGN.md sections 1
//! and 5): events in, actions out, no I/O and no clock. The store writer
//! performs its actions on sled; the pair simulator (twinmq-ha) performs them
//! on a model store, over a simulated network, under every fault order.

pub mod frame;
pub mod history;
pub mod replica;

pub use frame::{AttachId, ReplFrame};
pub use history::{rank, EpochStart, History};
pub use replica::{Action, Admitted, ConnId, Promotion, Refusal, ReplMeta, Replica, ReplicaConfig};
