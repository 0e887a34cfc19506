//! A node's status as the client reads it: the fields an application or a
//! script acts on, typed, and the whole report as the broker sent it (JSON)
//! for everything else (`twinmq status` prints that).
//!
//! Read leniently: a field a broker does not send (an older release, a lone
//! node without a peer) takes its default, and fields this library does not
//! know are kept in [`NodeStatus::json`] only.

use serde::Deserialize;

/// One node's status ([`crate::Client::status`], [`crate::AdminClient::status`]).
///
/// ```no_run
/// # async fn demo(client: twinmq_client::Client) -> Result<(), twinmq_client::ClientError> {
/// let status = client.status().await?;
/// println!("{} is {} at op {}", status.node_id, status.role, status.last_op);
/// if let Some(orders) = status.queues.iter().find(|q| q.name == "queue:orders") {
///     println!("orders: {} waiting, {} in flight", orders.depth, orders.in_flight);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct NodeStatus {
    /// The node's id (its `node_id` setting).
    pub node_id: String,
    /// `active`, `active-alone`, `passive`, `passive-syncing`, `waiting`, `isolated`, ...
    pub role: String,
    /// The pair's epoch as this node's store has it (+1 on every promotion).
    pub epoch: u64,
    /// Sequence number of the last op in this node's store.
    pub last_op: u64,
    /// The durability mode: what a confirm promises.
    pub durability: String,
    /// Open client connections.
    pub connections: u64,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// In a pair: this node's store is in sync with its peer.
    pub in_sync: Option<bool>,
    /// In a pair: times this node became active since it started.
    pub failovers: Option<u64>,
    /// In a pair: why the role last changed.
    pub last_role_reason: Option<String>,
    /// The peer as this node sees it (`None` for a lone node).
    pub peer: Option<PeerStatus>,
    /// The gateway witness (`None` for a lone node).
    pub gateway: Option<GatewayStatus>,
    /// The first page of queues (and durable subscriptions), by name.
    pub queues: Vec<QueueStatus>,
    /// How many queues there are in all.
    pub queues_total: u64,
    #[serde(skip)]
    json: String,
}

impl NodeStatus {
    /// The whole report as the broker sent it (JSON), with the fields this
    /// type does not name (the store's counters, topics, history, ...).
    pub fn json(&self) -> &str {
        &self.json
    }

    pub(crate) fn parse(json: String) -> Result<NodeStatus, crate::ClientError> {
        let mut status: NodeStatus = serde_json::from_str(&json)
            .map_err(|e| crate::ClientError::UnexpectedFrame(format!("a status report that is not one: {e}")))?;
        status.json = json;
        Ok(status)
    }
}

/// The peer of a node, from its heartbeats.
///
/// ```no_run
/// # async fn demo(client: twinmq_client::Client) -> Result<(), twinmq_client::ClientError> {
/// let status = client.status().await?;
/// if let (Some(peer), Some(gateway)) = (&status.peer, &status.gateway) {
///     println!("peer {} ({:?}), gateway {} reachable: {}", peer.state, peer.role, gateway.target, gateway.reachable);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PeerStatus {
    /// The peer's id.
    pub node_id: Option<String>,
    /// `up`, `silent` or `dead`.
    pub state: String,
    /// The peer's role, as it last said.
    pub role: Option<String>,
    /// The peer's last op.
    pub last_op: Option<u64>,
    /// The peer says its store is in sync.
    pub in_sync: Option<bool>,
}

/// The gateway witness of a node (example: [`PeerStatus`]).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct GatewayStatus {
    /// What is probed (`tcp://ADDR`, `icmp://ADDR`).
    pub target: String,
    /// The probes succeed.
    pub reachable: bool,
}

/// One queue (or durable subscription) of a node (example: [`NodeStatus`]).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct QueueStatus {
    /// `queue:NAME`, or `topic:NAME (durable SUB)`.
    pub name: String,
    /// Messages waiting.
    pub depth: u64,
    /// Messages delivered and not yet acknowledged.
    pub in_flight: u64,
    /// Consumers attached.
    pub consumers: u64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn a_pair_members_report_and_a_lone_nodes_both_read() {
        let member = r#"{"node_id":"a","role":"passive","epoch":3,"last_op":90,"in_sync":true,"failovers":1,
            "peer":{"node_id":"b","state":"up","last_op":100,"epoch":3,"connections":2},
            "gateway":{"target":"tcp://gw","reachable":true},"store":{"fsyncs":5},
            "queues":[{"name":"queue:orders","depth":4,"in_flight":2,"consumers":1}],"queues_total":1}"#;
        let s = NodeStatus::parse(member.to_owned()).unwrap();
        assert_eq!((s.role.as_str(), s.epoch, s.in_sync), ("passive", 3, Some(true)));
        assert_eq!(s.peer.as_ref().map(|p| (p.state.as_str(), p.last_op)), Some(("up", Some(100))));
        assert_eq!(s.queues[0].depth, 4);
        assert!(s.json().contains("\"fsyncs\":5"), "the rest is kept");
        let lone = NodeStatus::parse(r#"{"role":"active","peer":null,"gateway":null}"#.to_owned()).unwrap();
        assert_eq!((lone.peer, lone.in_sync), (None, None));
        assert!(NodeStatus::parse("not json".to_owned()).is_err());
    }
}
