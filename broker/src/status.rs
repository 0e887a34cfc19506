//! The node's status report, typed: built once by `node::GetNodeStatus`
//! and read by everyone who shows it: `twinmq status` (as JSON over the
//! client port), `GET /status` (JSON, and the status page that fetches it)
//! and `GET /metrics` (the gauges, read from these fields, not from JSON).
//!
//! The JSON is what `serde` makes of these structs; its keys are a
//! contract with scripts and dashboards (README "Admin HTTP endpoint"),
//! so a field is only ever added. A lone node (no pair) has `peer` and
//! `gateway` null and no `in_sync`, `sync_lag`, `last_role_reason`,
//! `failovers`, `floor` or `events`.

use serde::Serialize;

use crate::queue::QueueStats;

/// One node's status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    /// `active`, `active-alone`, `passive`, `passive-syncing`, `waiting`, `isolated`, ...
    pub role: String,
    /// The store's epoch (+1 on every promotion).
    pub epoch: u64,
    /// Sequence number of the last op in this node's store.
    pub last_op: u64,
    /// `[epoch, first op, forced]` per promotion: which epoch wrote which ops.
    pub history: Vec<(u64, u64, bool)>,
    /// The durability mode (`local`, `replicated`, ...).
    pub durability: String,
    /// Open client connections.
    pub connections: usize,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// The store's own counters (a passive writes too).
    pub store: StoreStatus,
    /// The peer as this node sees it; `None` for a lone node.
    pub peer: Option<PeerStatus>,
    /// The gateway witness; `None` for a lone node.
    pub gateway: Option<GatewayStatus>,
    #[serde(flatten)]
    pub pair: Option<PairStatus>,
    /// The first page of queues (and durable subscriptions), by name.
    pub queues: Vec<QueueStats>,
    /// The first page of topics with subscribers, by name.
    pub topics: Vec<TopicStatus>,
    /// How many queues there are in all (`twinmq queue list` pages through them).
    pub queues_total: usize,
    /// How many topics there are in all.
    pub topics_total: usize,
}

/// What only a node of a pair reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PairStatus {
    /// This node's store is in sync with its peer.
    pub in_sync: bool,
    /// Active: records the peer has not acknowledged yet.
    pub sync_lag: Option<u64>,
    /// Why the role last changed.
    pub last_role_reason: String,
    /// Times this node became active since it started.
    pub failovers: u64,
    /// The highest epoch this node has heard of.
    pub floor: u64,
    /// The pair's recent events, this node's and its peer's (learned over
    /// the HA link), oldest first: `{at_ms, node, kind, reason}`
    /// (`twinmq_ha::events`).
    pub events: Vec<twinmq_ha::events::PairEvent>,
}

/// The peer, from its heartbeats.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerStatus {
    pub node_id: Option<String>,
    /// `up`, `silent` or `dead`.
    pub state: String,
    pub role: Option<String>,
    pub epoch: Option<u64>,
    pub last_op: Option<u64>,
    /// The epoch of the peer's last op.
    pub last_op_epoch: Option<u64>,
    pub in_sync: Option<bool>,
    pub sees_gateway: Option<bool>,
    pub last_heard_ms_ago: Option<u64>,
    /// HA connections to the peer that are up.
    pub connections: usize,
    /// The STOMP address the peer advertises (HA 6), while it is up.
    pub stomp: Option<String>,
}

impl PeerStatus {
    /// The peer is heard on some path.
    pub fn is_up(&self) -> bool {
        self.state == "up"
    }
}

/// The gateway witness.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayStatus {
    /// What is probed (`tcp://ADDR`, `icmp://ADDR`).
    pub target: String,
    pub reachable: bool,
}

/// A topic with subscribers.
#[derive(Debug, Clone, Serialize)]
pub struct TopicStatus {
    /// `topic:NAME`.
    pub name: String,
    /// Non-durable subscribers connected now.
    pub subscribers: usize,
    pub durable_subscriptions: usize,
}

/// The store writer's counters and the data directory's disk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStatus {
    pub live_batches: u64,
    /// Bytes of batch records still holding live messages.
    pub live_bytes: u64,
    /// What the live messages weigh (payload, headers, 128 bytes each).
    pub live_message_bytes: u64,
    pub compacted_records: u64,
    pub compacted_bytes: u64,
    pub batches_written: u64,
    pub ops_written: u64,
    pub flushes: u64,
    pub fsyncs: u64,
    pub last_flush_us: u64,
    /// Why the disk counts as failed, if it does.
    pub disk_failure: Option<String>,
    pub handover_pending: u64,
    pub loading_snapshot: bool,
    pub serve_alone: bool,
    /// The peer's store as last heard of: `{epoch, last_op}`.
    pub peer_last_known: Option<StorePosition>,
    pub last_op_epoch: u64,
    /// Bytes the data directory takes on disk.
    pub disk_bytes: u64,
    pub disk_free_bytes: u64,
    /// Bytes that may still be written before new messages are refused.
    pub disk_headroom_bytes: u64,
    /// New messages are refused for the disk limits.
    pub disk_full: bool,
    /// New messages are refused (this disk, or in a pair the in-sync passive's).
    pub refusing_new_messages: bool,
    pub read_cache_bytes: u64,
    pub read_cache_hits: u64,
    pub read_cache_misses: u64,
}

/// A store's rank: the epoch and sequence of its last op.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StorePosition {
    pub epoch: u64,
    pub last_op: u64,
}

impl NodeStatus {
    /// Ops between this node's store and its peer's: the active's unacknowledged
    /// ops, or what the active holds that this passive lacks.
    pub fn replication_lag(&self) -> Option<u64> {
        let peer = self.peer.as_ref()?;
        Some(match self.pair.as_ref().and_then(|p| p.sync_lag) {
            Some(lag) => lag,
            None => peer.last_op.unwrap_or(0).saturating_sub(self.last_op),
        })
    }
}

/// The report as JSON text, as the client port's `StatusReply` carries it.
pub fn status_json(status: &NodeStatus) -> String {
    // Plain data: serializing cannot fail; an empty object if it ever did.
    serde_json::to_string(status).unwrap_or_else(|_| "{}".to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    /// The keys scripts, dashboards and the status page read are where they were.
    #[test]
    fn the_json_keeps_its_keys_for_a_lone_node_and_a_pair_member() {
        let lone = serde_json::to_value(NodeStatus { role: "active".into(), ..Default::default() }).unwrap();
        assert!(lone["peer"].is_null() && lone["gateway"].is_null());
        for absent in ["in_sync", "sync_lag", "failovers", "last_role_reason", "floor", "events"] {
            assert!(lone.get(absent).is_none(), "{absent} on a lone node");
        }
        let member = NodeStatus {
            role: "passive".into(),
            history: vec![(1, 1, false), (2, 40, true)],
            peer: Some(PeerStatus { state: "up".into(), ..Default::default() }),
            gateway: Some(GatewayStatus { target: "tcp://gw".into(), reachable: true }),
            pair: Some(PairStatus {
                in_sync: true,
                failovers: 3,
                events: vec![twinmq_ha::events::PairEvent::new(
                    1_780_000_000_000,
                    "node-b",
                    twinmq_ha::events::EventKind::ForcedPromotion,
                    "an operator forced it",
                )],
                ..Default::default()
            }),
            store: StoreStatus { peer_last_known: Some(StorePosition { epoch: 2, last_op: 9 }), ..Default::default() },
            ..Default::default()
        };
        let v = serde_json::to_value(&member).unwrap();
        let mut expected = vec![
            "connections",
            "durability",
            "epoch",
            "events",
            "failovers",
            "floor",
            "gateway",
            "history",
            "in_sync",
            "last_op",
            "last_role_reason",
            "node_id",
            "peer",
            "queues",
            "queues_total",
            "role",
            "store",
            "sync_lag",
            "topics",
            "topics_total",
            "uptime_s",
        ];
        expected.sort_unstable();
        assert_eq!(keys(&v), expected);
        assert!(v["sync_lag"].is_null(), "present, null while nothing is owed");
        assert_eq!(v["history"], serde_json::json!([[1, 1, false], [2, 40, true]]));
        assert_eq!((v["peer"]["state"].as_str(), v["gateway"]["reachable"].as_bool()), (Some("up"), Some(true)));
        assert_eq!(v["store"]["peer_last_known"], serde_json::json!({"epoch": 2, "last_op": 9}));
        assert_eq!(
            v["events"],
            serde_json::json!([{"at_ms": 1_780_000_000_000u64, "node": "node-b", "kind": "forced-promotion",
                "reason": "an operator forced it"}]),
            "what the page's events table reads"
        );
        assert!(v["peer"]["stomp"].is_null());
        assert_eq!(member.replication_lag(), Some(0));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&status_json(&member)).unwrap(), v);
    }
}
