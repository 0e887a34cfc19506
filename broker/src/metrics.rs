//! Metrics: the counters the data path bumps, and their Prometheus text
//! exposition (served by `http.rs` at `GET /metrics`).
//!
//! Two kinds of numbers, kept apart on purpose:
//! - **Event counters** (messages in and out, confirms, the confirm-latency
//!   histogram) are bumped where the event happens. They are shared atomics
//!   (STYLE.md allows atomics for counters): `prometheus-client` counters,
//!   and a histogram of our own (one relaxed add per bucket and sum, no
//!   lock) whose bucket counts can be read back: the status page's sampler
//!   (`series.rs`) takes the p99 of each second from their differences.
//!   Nothing on the data path allocates for metrics.
//! - **State** (role, epoch, peer, gateway, replication lag, connections,
//!   queue depths, failovers) already has one owner each; it is read once
//!   per scrape from the node's status (`node::GetNodeStatus`, the same
//!   report `/status` and `twinmq status` show), so the two views cannot
//!   disagree. Those gauges are built fresh for each scrape.
//!
//! The metric names are listed in README.md ("Admin HTTP endpoint").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

use crate::status::NodeStatus;

/// Every role a node can be in (`twinmq_role` is a state set over these).
const ROLES: [&str; 6] = ["active", "active-alone", "passive-syncing", "passive", "waiting", "isolated"];

/// The event counters of one broker. Cloning shares them.
#[derive(Clone, Debug)]
pub struct Metrics(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// Publish frames received from clients (before any check).
    messages_in: Counter,
    /// Deliver frames queued to consumers (redeliveries included).
    messages_out: Counter,
    /// Publish confirms queued to producers.
    confirms: Counter,
    /// Publish received by the session to confirm queued, seconds.
    confirm_latency: LatencyHistogram,
}

/// Finite buckets of the confirm-latency histogram: 50 µs doubling to
/// ~3.3 s (a `none` confirm is tens of µs, a replicated one milliseconds);
/// one more, +Inf, above them.
pub const LATENCY_BUCKETS: usize = 17;

/// The upper bound of finite bucket `i`, in seconds (as
/// `prometheus_client`'s `exponential_buckets(0.000_05, 2.0, 17)`, so the
/// exposed `le` labels are those of earlier releases).
pub fn latency_bound(i: usize) -> f64 {
    0.000_05 * 2f64.powf(i as f64)
}

/// A histogram of durations as atomics: a count per bucket (not
/// cumulative; the last is +Inf) and the sum in nanoseconds.
#[derive(Debug, Clone, Default)]
struct LatencyHistogram(Arc<LatencyCells>);

#[derive(Debug, Default)]
struct LatencyCells {
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = (0..LATENCY_BUCKETS).find(|i| s <= latency_bound(*i)).unwrap_or(LATENCY_BUCKETS);
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn counts(&self) -> [u64; LATENCY_BUCKETS + 1] {
        std::array::from_fn(|i| self.0.buckets[i].load(Ordering::Relaxed))
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.counts();
        // prometheus-client writes f64::MAX as +Inf and makes the counts cumulative.
        let buckets: Vec<(f64, u64)> = counts
            .iter()
            .enumerate()
            .map(|(i, n)| (if i < LATENCY_BUCKETS { latency_bound(i) } else { f64::MAX }, *n))
            .collect();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The event counters at one moment (for the sampler: rates and the p99
/// come from the differences of two of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub messages_in: u64,
    pub messages_out: u64,
    /// Confirms per latency bucket (not cumulative; the last is +Inf).
    pub latency: [u64; LATENCY_BUCKETS + 1],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics(Arc::new(Inner {
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            confirms: Counter::default(),
            confirm_latency: LatencyHistogram::default(),
        }))
    }

    /// The event counters now.
    pub fn counters(&self) -> Counters {
        Counters {
            messages_in: self.0.messages_in.get(),
            messages_out: self.0.messages_out.get(),
            latency: self.0.confirm_latency.counts(),
        }
    }

    pub fn message_in(&self) {
        self.0.messages_in.inc();
    }

    pub fn message_out(&self) {
        self.0.messages_out.inc();
    }

    /// A confirm is on its way for a publish received at `received`.
    pub fn confirmed(&self, received: Instant) {
        self.0.confirms.inc();
        self.0.confirm_latency.observe(received.elapsed());
    }

    /// The Prometheus text exposition: the event counters plus the state in
    /// `status` (what `node::GetNodeStatus` answers).
    pub fn encode(&self, status: &NodeStatus) -> Result<String, std::fmt::Error> {
        let mut r = Registry::with_prefix("twinmq");
        r.register("messages_in", "Publish frames received from clients", self.0.messages_in.clone());
        r.register(
            "messages_out",
            "Messages delivered to consumers (redeliveries included)",
            self.0.messages_out.clone(),
        );
        r.register("confirms", "Publish confirms sent to producers", self.0.confirms.clone());
        r.register_with_unit(
            "confirm_latency",
            "From a publish received to its confirm queued to the producer",
            Unit::Seconds,
            self.0.confirm_latency.clone(),
        );

        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let role = status.role.as_str();
        let roles = Family::<Vec<(String, String)>, Gauge>::default();
        for name in ROLES {
            roles.get_or_create(&vec![("role".to_string(), name.to_string())]).set(i64::from(role == name));
        }
        r.register("role", "This node's role: 1 for the current one", roles);
        r.register("epoch", "The store's epoch (+1 on every promotion)", gauge(status.epoch));
        r.register("last_op", "Sequence number of the last op in this node's store", gauge(status.last_op));
        r.register("connections", "Open client connections", gauge(status.connections as u64));
        let store = &status.store;
        r.register("disk_bytes", "Bytes the data directory takes on disk", gauge(store.disk_bytes));
        r.register(
            "disk_headroom_bytes",
            "Bytes that may still be written before new messages are refused (max_disk_bytes, min_free_disk_bytes)",
            gauge(store.disk_headroom_bytes),
        );
        r.register(
            "disk_full",
            "1 while new messages are refused for the disk limits",
            gauge(u64::from(store.disk_full)),
        );
        r.register(
            "refusing_new_messages",
            "1 while new messages are refused for a nearly full disk (in a pair: the active, for its own disk or its in-sync passive's)",
            gauge(u64::from(store.refusing_new_messages)),
        );
        r.register("live_record_bytes", "Bytes of batch records still holding live messages", gauge(store.live_bytes));
        r.register(
            "live_message_bytes",
            "What the live messages weigh, each queue holding one counted (payload, headers, 128 bytes)",
            gauge(store.live_message_bytes),
        );
        r.register(
            "compacted_records",
            "Records the compactor rewrote without their dead messages",
            ConstCounter::new(store.compacted_records),
        );
        r.register(
            "compacted_bytes",
            "Bytes the records the compactor rewrote take less",
            ConstCounter::new(store.compacted_bytes),
        );
        r.register(
            "read_cache_bytes",
            "Bytes of message bodies read back from disk and cached",
            gauge(store.read_cache_bytes),
        );
        r.register(
            "read_cache_misses",
            "Reads of bodies from disk (one per record read ahead)",
            gauge(store.read_cache_misses),
        );
        // A lone node (no pair) has neither peer nor gateway; those gauges are omitted.
        if let (Some(peer), Some(pair)) = (&status.peer, &status.pair) {
            r.register("in_sync", "1 when this node's store is in sync with its peer", gauge(u64::from(pair.in_sync)));
            r.register("peer_up", "1 when the peer is heard on some path", gauge(u64::from(peer.is_up())));
            let reachable = status.gateway.as_ref().is_some_and(|g| g.reachable);
            r.register("gateway_reachable", "1 when this node's gateway probes succeed", gauge(u64::from(reachable)));
            // Active: ops the peer has not acknowledged. Passive: ops the active holds that this node lacks.
            let lag = status.replication_lag().unwrap_or(0);
            r.register("replication_lag_ops", "Ops between this node's store and its peer's", gauge(lag));
            r.register(
                "failovers",
                "Times this node became active (promotions since the process started)",
                ConstCounter::new(pair.failovers),
            );
        }
        let depth = Family::<Vec<(String, String)>, Gauge>::default();
        let consumers = Family::<Vec<(String, String)>, Gauge>::default();
        let in_flight = Family::<Vec<(String, String)>, Gauge>::default();
        for q in &status.queues {
            let labels = vec![("destination".to_string(), escape_label(&q.name))];
            let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
            depth.get_or_create(&labels).set(n(q.depth));
            consumers.get_or_create(&labels).set(n(q.consumers));
            in_flight.get_or_create(&labels).set(n(q.in_flight));
        }
        r.register("queue_depth", "Messages waiting in a queue or durable subscription", depth);
        r.register("queue_consumers", "Consumers attached to a queue or durable subscription", consumers);
        r.register("queue_in_flight", "Messages delivered and not yet acknowledged", in_flight);

        let mut text = String::new();
        encode(&mut text, &r)?;
        Ok(text)
    }
}

/// A label value as the exposition format needs it: `\\`, `\"` and `\n`
/// escaped. prometheus-client 0.23 writes values as given, so a queue named
/// `x",node="forged` would forge a label and one ending in `\` would break
/// the whole scrape (issue 10, finding 8).
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueStats;
    use crate::status::{GatewayStatus, PairStatus, PeerStatus, StoreStatus};

    #[test]
    fn destination_names_cannot_forge_labels_or_break_the_scrape() {
        let queue = |name: &str, depth| QueueStats { name: name.into(), depth, in_flight: 0, consumers: 0 };
        let status = NodeStatus {
            role: "active".into(),
            queues: vec![
                queue("queue:orders.x\",node=\"forged", 1),
                queue("queue:orders.y\\", 2),
                queue("queue:a\nb", 3),
            ],
            ..Default::default()
        };
        let text = Metrics::new().encode(&status).unwrap();
        assert!(!text.contains("node=\"forged\""), "{text}");
        assert_eq!(value(&text, r#"twinmq_queue_depth{destination="queue:orders.x\",node=\"forged"}"#), 1.0);
        assert_eq!(value(&text, r#"twinmq_queue_depth{destination="queue:orders.y\\"}"#), 2.0);
        assert_eq!(value(&text, r#"twinmq_queue_depth{destination="queue:a\nb"}"#), 3.0);
        // Every sample line is one well-formed line: name{labels} value.
        for line in text.lines().filter(|l| l.starts_with("twinmq_queue_depth{")) {
            assert!(line.ends_with("\"} 1") || line.ends_with("\"} 2") || line.ends_with("\"} 3"), "{line}");
        }
    }

    fn value(text: &str, line_start: &str) -> f64 {
        let line = text.lines().find(|l| l.starts_with(line_start)).unwrap_or_else(|| panic!("no {line_start}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn counters_and_status_gauges_are_exposed() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.message_in();
        }
        m.message_out();
        m.confirmed(Instant::now());
        let status = NodeStatus {
            role: "passive".into(),
            epoch: 7,
            last_op: 90,
            pair: Some(PairStatus { in_sync: true, sync_lag: None, failovers: 2, ..Default::default() }),
            peer: Some(PeerStatus { state: "up".into(), last_op: Some(100), ..Default::default() }),
            gateway: Some(GatewayStatus { target: "tcp://gw".into(), reachable: true }),
            queues: vec![QueueStats { name: "queue:orders".into(), depth: 4, consumers: 1, in_flight: 2 }],
            store: StoreStatus {
                live_bytes: 300,
                live_message_bytes: 200,
                compacted_records: 5,
                compacted_bytes: 4096,
                disk_full: false,
                refusing_new_messages: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let text = m.encode(&status).unwrap();
        assert_eq!(value(&text, "twinmq_live_record_bytes"), 300.0);
        assert_eq!(value(&text, "twinmq_live_message_bytes"), 200.0);
        assert_eq!(value(&text, "twinmq_compacted_records_total"), 5.0);
        assert_eq!(value(&text, "twinmq_compacted_bytes_total"), 4096.0);
        assert_eq!(value(&text, "twinmq_disk_full"), 0.0, "this node's own disk");
        assert_eq!(value(&text, "twinmq_refusing_new_messages"), 1.0, "the verdict: its passive's disk");
        assert_eq!(value(&text, "twinmq_messages_in_total"), 3.0);
        assert_eq!(value(&text, "twinmq_messages_out_total"), 1.0);
        assert_eq!(value(&text, "twinmq_confirms_total"), 1.0);
        assert_eq!(value(&text, "twinmq_confirm_latency_seconds_count"), 1.0);
        assert_eq!(value(&text, "twinmq_role{role=\"passive\"}"), 1.0);
        assert_eq!(value(&text, "twinmq_role{role=\"active\"}"), 0.0);
        assert_eq!(value(&text, "twinmq_epoch"), 7.0);
        assert_eq!(value(&text, "twinmq_replication_lag_ops"), 10.0, "passive: the active's last op minus ours");
        assert_eq!(value(&text, "twinmq_failovers_total"), 2.0);
        assert_eq!(value(&text, "twinmq_queue_depth{destination=\"queue:orders\"}"), 4.0);
        assert!(text.ends_with("# EOF\n"));
    }

    /// What the data path pays per message (docs/BENCHMARKS.md, "Metrics on the
    /// hot path"). Prints figures, asserts nothing about time:
    /// `cargo test -p twinmq-broker --lib hot_path_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn hot_path_cost() {
        const N: u32 = 2_000_000;
        let m = Metrics::new();
        for threads in [1, 2] {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    let m = m.clone();
                    s.spawn(move || {
                        for _ in 0..N {
                            let received = Instant::now();
                            m.message_in();
                            m.confirmed(received);
                            m.message_out();
                        }
                    });
                }
            });
            let ns = start.elapsed().as_nanos() as f64 / f64::from(N);
            println!("{threads} thread(s): in + confirm (histogram) + out = {ns:.0} ns per message per thread");
        }
    }

    /// The histogram of our own reads back per bucket (for the sampler) and
    /// is exposed exactly as prometheus-client's own histogram with the same
    /// buckets was, so dashboards and alert rules see no change.
    #[test]
    fn the_latency_histogram_reads_back_and_is_exposed_as_before() {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        let ours = LatencyHistogram::default();
        let theirs = Histogram::new(exponential_buckets(0.000_05, 2.0, LATENCY_BUCKETS as u16));
        let observed = [30e-6, 50e-6, 51e-6, 1e-3, 1e-3, 0.0016, 2.0, 10.0];
        for s in observed {
            ours.observe(Duration::from_secs_f64(s));
            theirs.observe(Duration::from_secs_f64(s).as_secs_f64());
        }
        let mut expected = [0u64; LATENCY_BUCKETS + 1];
        for (i, n) in [(0, 2), (1, 1), (5, 3), (16, 1), (LATENCY_BUCKETS, 1)] {
            expected[i] = n;
        }
        assert_eq!(ours.counts(), expected, "per bucket, the last +Inf");
        let text = |name: &str, m: Box<dyn Fn(&mut Registry)>| {
            let mut r = Registry::with_prefix("twinmq");
            m(&mut r);
            let mut t = String::new();
            encode(&mut t, &r).unwrap();
            t.lines().filter(|l| l.starts_with(name)).map(str::to_owned).collect::<Vec<_>>()
        };
        let (o, t) = (ours.clone(), theirs.clone());
        let ours_text = text(
            "twinmq_confirm_latency",
            Box::new(move |r| r.register_with_unit("confirm_latency", "h", Unit::Seconds, o.clone())),
        );
        let theirs_text = text(
            "twinmq_confirm_latency",
            Box::new(move |r| r.register_with_unit("confirm_latency", "h", Unit::Seconds, t.clone())),
        );
        let buckets = |v: &[String]| v.iter().filter(|l| !l.contains("_sum")).cloned().collect::<Vec<_>>();
        assert_eq!(buckets(&ours_text), buckets(&theirs_text));
        assert_eq!(buckets(&ours_text).len(), LATENCY_BUCKETS + 2, "17 bounds, +Inf and the count");
        let sum = |v: &[String]| -> f64 {
            v.iter().find(|l| l.contains("_sum")).unwrap().rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!((sum(&ours_text) - sum(&theirs_text)).abs() < 1e-6, "{ours_text:?} {theirs_text:?}");

        let m = Metrics::new();
        m.message_in();
        m.message_out();
        m.message_out();
        m.confirmed(Instant::now());
        let c = m.counters();
        assert_eq!((c.messages_in, c.messages_out, c.latency.iter().sum::<u64>()), (1, 2, 1));
    }

    #[test]
    fn a_lone_node_has_no_pair_gauges() {
        let text = Metrics::new().encode(&NodeStatus { role: "active".into(), ..Default::default() }).unwrap();
        assert_eq!(value(&text, "twinmq_role{role=\"active\"}"), 1.0);
        assert!(!text.contains("twinmq_peer_up"));
        assert!(!text.contains("twinmq_failovers_total"));
    }
}
