//! The pair's recent events, for the operator who opens the status page
//! after a fault: role changes, promotions (forced or not), the peer and
//! the gateway lost and found, a failed disk, switchovers.
//!
//! Each node records its own (the `RoleArbiter`, where they are decided or
//! seen: see `arbiter.rs`) in an [`EventRing`] of [`EVENT_RING`] events,
//! and the two nodes exchange them over the HA link (`HaFrame::Events`, HA
//! 6): the whole ring when a link comes up, then each new event as it is
//! recorded. So a node restarted after the fault, which lost its own
//! memory, learns from its peer what happened before, its own events
//! included. Both rings are merged without duplicates (the key is time,
//! node and kind) and ordered by time; times are each node's own clock
//! (ms since the Unix epoch), so the order across nodes is as good as
//! their clocks agree.
//!
//! What the peer sends is bounded before it is kept: at most
//! [`EVENT_RING`] events of a frame (the newest), node ids as configuration
//! allows them, reasons cut to [`MAX_REASON_BYTES`] with control
//! characters replaced. Nothing is persisted: a pair restarted whole starts
//! with no events.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::arbiter::HaStatus;

/// Events each node keeps (its own and its peer's, merged).
pub const EVENT_RING: usize = 200;

/// Longest reason kept (bytes; cut at a character boundary).
pub const MAX_REASON_BYTES: usize = 256;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The role changed, other than by a promotion.
    RoleChange,
    /// The node became active (a failover, a switchover's other half, a cold start).
    Promotion,
    /// The node became active because an operator forced it (`promote --force`).
    ForcedPromotion,
    PeerUp,
    PeerDown,
    GatewayLost,
    GatewayFound,
    DiskFailed,
    /// Asked by an operator, done or failed; or the peer handing the role over.
    Switchover,
    /// A kind a later release records: kept, shown as `other`.
    #[serde(other)]
    Other,
}

/// One event of the pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairEvent {
    /// When, in ms since the Unix epoch, on the clock of the node that recorded it.
    pub at_ms: u64,
    /// The node it happened on.
    pub node: String,
    pub kind: EventKind,
    /// What was seen, in words.
    pub reason: String,
}

impl PairEvent {
    /// An event of this node (its reason cut to [`MAX_REASON_BYTES`]).
    pub fn new(at_ms: u64, node: &str, kind: EventKind, reason: &str) -> PairEvent {
        PairEvent { at_ms, node: node.to_string(), kind, reason: clean(reason) }
    }

    /// An event as the peer sent it, made safe to keep and show: `None` if
    /// its node id is not one configuration allows; the reason cut and
    /// its control characters replaced.
    pub fn from_peer(self) -> Option<PairEvent> {
        if !crate::link::valid_node_id(&self.node) {
            return None;
        }
        Some(PairEvent { reason: clean(&self.reason), ..self })
    }

    fn key(&self) -> (u64, String, EventKind) {
        (self.at_ms, self.node.clone(), self.kind)
    }
}

/// `reason` cut to [`MAX_REASON_BYTES`] at a character boundary, control
/// characters (a newline, an escape sequence) replaced by spaces.
fn clean(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len().min(MAX_REASON_BYTES));
    for c in reason.chars() {
        if out.len() + c.len_utf8() > MAX_REASON_BYTES {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// At most `capacity` events, oldest dropped first, at most one per
/// (time, node, kind).
#[derive(Debug, Clone)]
pub struct EventRing {
    capacity: usize,
    events: BTreeMap<(u64, String, EventKind), String>,
}

impl EventRing {
    pub fn new(capacity: usize) -> EventRing {
        EventRing { capacity: capacity.max(1), events: BTreeMap::new() }
    }

    /// Keep `event` unless one of the same key is kept already. True if it
    /// is new and still kept (an event older than a full ring is not).
    pub fn insert(&mut self, event: PairEvent) -> bool {
        let key = event.key();
        if self.events.contains_key(&key) {
            return false;
        }
        self.events.insert(key.clone(), event.reason);
        while self.events.len() > self.capacity {
            self.events.pop_first();
        }
        self.events.contains_key(&key)
    }

    /// Record an event of this node: should one of the same key be kept
    /// already (two of a kind within a millisecond), it moves to the next
    /// free millisecond, so that neither is lost. Returns the event as kept,
    /// or `None` if it is older than a full ring.
    pub fn record(&mut self, mut event: PairEvent) -> Option<PairEvent> {
        while self.events.contains_key(&event.key()) {
            event.at_ms += 1;
        }
        self.insert(event.clone()).then_some(event)
    }

    /// Merge events from the peer; how many were new.
    pub fn merge(&mut self, events: impl IntoIterator<Item = PairEvent>) -> usize {
        events.into_iter().map(|e| usize::from(self.insert(e))).sum()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Every event kept, oldest first.
    pub fn to_vec(&self) -> Vec<PairEvent> {
        self.events
            .iter()
            .map(|((at_ms, node, kind), reason)| PairEvent {
                at_ms: *at_ms,
                node: node.clone(),
                kind: *kind,
                reason: reason.clone(),
            })
            .collect()
    }
}

/// What the peer sent in one `Events` frame, bounded: its newest
/// [`EVENT_RING`] events, each as [`PairEvent::from_peer`] keeps it.
pub fn from_peer(events: Vec<PairEvent>) -> Vec<PairEvent> {
    let skip = events.len().saturating_sub(EVENT_RING);
    events.into_iter().skip(skip).filter_map(PairEvent::from_peer).collect()
}

/// The events that going from status `prev` to `next` shows: the peer up
/// or down, the gateway found or lost, the disk failed. (Role changes are
/// recorded where they are decided: a status only shows the last of
/// several.)
pub fn changes(prev: &HaStatus, next: &HaStatus) -> Vec<(EventKind, String)> {
    let mut out = Vec::new();
    let peer = next.peer_id.as_deref().unwrap_or("the peer");
    match (prev.peer_state == "up", next.peer_state == "up") {
        (false, true) => {
            let role = next.peer_role.map_or_else(|| "role unknown".to_string(), |r| r.to_string());
            let epoch = next.peer_epoch.map_or_else(String::new, |e| format!(", epoch {e}"));
            out.push((EventKind::PeerUp, format!("{peer} heard: {role}{epoch}")))
        }
        (true, false) if next.peer_state == "dead" => out.push((
            EventKind::PeerDown,
            format!("{peer}: every connection gone and every path refused: its process is gone"),
        )),
        (true, false) => out.push((EventKind::PeerDown, format!("{peer}: no heartbeat on any path for peer_timeout"))),
        _ => {}
    }
    match (prev.gateway_reachable, next.gateway_reachable) {
        (false, true) => out.push((EventKind::GatewayFound, format!("the gateway {} answers", next.gateway))),
        (true, false) => out.push((EventKind::GatewayLost, format!("the gateway {} stopped answering", next.gateway))),
        _ => {}
    }
    if let (None, Some(why)) = (&prev.disk_failure, &next.disk_failure) {
        out.push((EventKind::DiskFailed, why.clone()));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::Role;

    fn ev(at_ms: u64, node: &str, kind: EventKind, reason: &str) -> PairEvent {
        PairEvent::new(at_ms, node, kind, reason)
    }

    fn keys(ring: &EventRing) -> Vec<(u64, String, EventKind)> {
        ring.to_vec().iter().map(PairEvent::key).collect()
    }

    #[test]
    fn the_ring_keeps_the_newest_events_in_time_order() {
        let mut ring = EventRing::new(3);
        for t in [50, 10, 40, 20, 30] {
            ring.record(ev(t, "a", EventKind::PeerUp, "x"));
        }
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.to_vec().iter().map(|e| e.at_ms).collect::<Vec<_>>(), [30, 40, 50]);
        // Older than everything in a full ring: not kept, and said so.
        assert!(!ring.insert(ev(5, "b", EventKind::PeerDown, "old")));
        assert!(ring.record(ev(5, "a", EventKind::PeerDown, "old")).is_none());
        assert_eq!(ring.to_vec().first().map(|e| e.at_ms), Some(30));
    }

    #[test]
    fn two_events_of_a_kind_in_one_millisecond_are_both_recorded() {
        let mut ring = EventRing::new(10);
        let first = ring.record(ev(7, "a", EventKind::RoleChange, "passive -> waiting")).unwrap();
        let second = ring.record(ev(7, "a", EventKind::RoleChange, "waiting -> passive")).unwrap();
        assert_eq!((first.at_ms, second.at_ms), (7, 8));
        assert_eq!(
            ring.to_vec().iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(),
            ["passive -> waiting", "waiting -> passive"]
        );
    }

    /// Node a restarts and learns from b what happened before, its own
    /// events included; b learns a's new ones; neither holds a duplicate.
    #[test]
    fn merging_both_nodes_rings_orders_by_time_without_duplicates() {
        let before = [
            ev(100, "node-a", EventKind::Switchover, "requested by the operator"),
            ev(105, "node-b", EventKind::Promotion, "switchover"),
            ev(105, "node-a", EventKind::RoleChange, "active -> passive"),
            ev(300, "node-b", EventKind::PeerDown, "silent"),
        ];
        let mut b = EventRing::new(EVENT_RING);
        b.merge(before.iter().cloned());
        let mut a = EventRing::new(EVENT_RING); // restarted: empty
        a.record(ev(400, "node-a", EventKind::PeerUp, "node-b heard"));
        // The link comes up: each sends its whole ring, the other merges.
        let (from_a, from_b) = (a.to_vec(), b.to_vec());
        assert_eq!(a.merge(from_b.clone()), 4);
        assert_eq!(b.merge(from_a.clone()), 1);
        // Sent again (a second path, a resend): nothing new.
        assert_eq!(a.merge(from_b), 0);
        assert_eq!(b.merge(from_a), 0);
        assert_eq!(a.to_vec(), b.to_vec(), "both tell the same story");
        let all = a.to_vec();
        let story: Vec<(u64, &str, EventKind)> = all.iter().map(|e| (e.at_ms, &e.node[5..], e.kind)).collect();
        assert_eq!(
            story,
            [
                (100, "a", EventKind::Switchover),
                (105, "a", EventKind::RoleChange),
                (105, "b", EventKind::Promotion),
                (300, "b", EventKind::PeerDown),
                (400, "a", EventKind::PeerUp),
            ]
        );
        // Same time and node, another kind: another event; same key, another reason: the same one.
        let mut c = EventRing::new(EVENT_RING);
        assert_eq!(c.merge([ev(1, "x", EventKind::PeerUp, "r1"), ev(1, "x", EventKind::PeerDown, "r2")]), 2);
        assert_eq!(c.merge([ev(1, "x", EventKind::PeerUp, "r3")]), 0);
        assert_eq!(keys(&c).len(), 2);
    }

    #[test]
    fn what_the_peer_sends_is_bounded_before_it_is_kept() {
        let long = "é".repeat(MAX_REASON_BYTES); // two bytes each
        let mut sent: Vec<PairEvent> = (0..5 * EVENT_RING as u64)
            .map(|t| PairEvent { at_ms: t, node: "node-b".into(), kind: EventKind::PeerUp, reason: long.clone() })
            .collect();
        sent.push(PairEvent {
            at_ms: 1,
            node: "b\n2026 INFO forged".into(),
            kind: EventKind::PeerUp,
            reason: "x".into(),
        });
        sent.push(PairEvent { at_ms: 2, node: String::new(), kind: EventKind::PeerUp, reason: "x".into() });
        sent.push(PairEvent {
            at_ms: 3_000,
            node: "node-b".into(),
            kind: EventKind::DiskFailed,
            reason: "EIO\n\u{1b}[2J".into(),
        });
        let kept = from_peer(sent);
        assert!(kept.len() <= EVENT_RING, "{}", kept.len());
        assert!(kept.iter().all(|e| e.reason.len() <= MAX_REASON_BYTES && !e.reason.chars().any(char::is_control)));
        assert!(kept.iter().all(|e| e.node == "node-b"), "invalid node ids are dropped");
        assert_eq!(kept.last().map(|e| e.reason.as_str()), Some("EIO  [2J"));
        assert_eq!(kept.first().map(|e| e.at_ms), Some(5 * EVENT_RING as u64 + 3 - EVENT_RING as u64), "the newest");
        assert_eq!(kept[0].reason.chars().count(), MAX_REASON_BYTES / 2, "cut at a character boundary");
    }

    #[test]
    fn an_unknown_kind_from_a_later_release_decodes_as_other() {
        #[derive(Serialize)]
        struct Later {
            at_ms: u64,
            node: String,
            kind: &'static str,
            reason: String,
        }
        let later = Later { at_ms: 1, node: "b".into(), kind: "clock-jumped", reason: "r".into() };
        let mut b = bytes::BytesMut::new();
        twinmq_protocol::encode_frame(&later, 1 << 20, &mut b).unwrap();
        let e: PairEvent = twinmq_protocol::decode_body(&b[4..]).unwrap();
        assert_eq!(e.kind, EventKind::Other);
        let mut b = bytes::BytesMut::new();
        twinmq_protocol::encode_frame(&ev(1, "a", EventKind::ForcedPromotion, "r"), 1 << 20, &mut b).unwrap();
        let e: PairEvent = twinmq_protocol::decode_body(&b[4..]).unwrap();
        assert_eq!(e.kind, EventKind::ForcedPromotion);
    }

    fn status() -> HaStatus {
        HaStatus {
            role: Role::Passive,
            epoch: 1,
            floor: 1,
            last_seq: 0,
            in_sync: true,
            peer_id: Some("node-b".into()),
            peer_state: "silent",
            peer_role: None,
            peer_epoch: None,
            peer_last_seq: None,
            peer_last_op_epoch: None,
            peer_in_sync: None,
            peer_sees_gateway: None,
            peer_last_heard_ms_ago: None,
            peer_connections: 0,
            gateway: "tcp://10.0.0.254:22".into(),
            gateway_reachable: false,
            sync_lag: None,
            last_reason: "starting",
            failovers: 0,
            disk_failure: None,
            peer_stomp: None,
            events: Default::default(),
        }
    }

    #[test]
    fn status_changes_are_events() {
        let start = status();
        assert!(changes(&start, &start).is_empty());
        let up = HaStatus { peer_state: "up", peer_role: Some(Role::Active), peer_epoch: Some(3), ..status() };
        assert_eq!(changes(&start, &up), [(EventKind::PeerUp, "node-b heard: active, epoch 3".to_string())]);
        assert!(changes(&up, &up).is_empty(), "no change, no event");
        let silent = status();
        assert_eq!(changes(&up, &silent).iter().map(|c| c.0).collect::<Vec<_>>(), [EventKind::PeerDown]);
        let dead = HaStatus { peer_state: "dead", ..status() };
        assert!(changes(&up, &dead)[0].1.contains("process is gone"));
        assert!(changes(&silent, &dead).is_empty(), "down is down, however it is seen");
        let gw = HaStatus { gateway_reachable: true, ..status() };
        assert_eq!(changes(&start, &gw), [(EventKind::GatewayFound, "the gateway tcp://10.0.0.254:22 answers".into())]);
        assert_eq!(changes(&gw, &start).iter().map(|c| c.0).collect::<Vec<_>>(), [EventKind::GatewayLost]);
        let disk = HaStatus { disk_failure: Some("fdatasync: EIO".into()), ..status() };
        assert_eq!(changes(&start, &disk), [(EventKind::DiskFailed, "fdatasync: EIO".into())]);
        assert!(changes(&disk, &disk).is_empty());
        // Several at once.
        let all = HaStatus { gateway_reachable: true, ..disk.clone() };
        assert_eq!(changes(&up, &all).len(), 3);
    }
}
