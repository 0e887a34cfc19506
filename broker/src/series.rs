//! The last minutes of a node, for the status page's charts: messages in
//! and out per second, the confirm latency's p99, the replication lag and
//! the depth of the deepest destinations, one sample a second for five
//! minutes ([`CAPACITY`] samples: memory is bounded whatever the traffic).
//!
//! The `Sampler` actor (started with the admin HTTP endpoint, `http.rs`,
//! on the main arbiter) takes a sample every [`SAMPLE_EVERY`]: the event
//! counters of `metrics.rs` (rates and the p99 come from the differences
//! with the previous sample, over the time that really passed between
//! them, so a late tick does not bend the rates), and the node's status
//! (`node::GetNodeStatus`: the replication lag, the queues' depths). It
//! runs whether or not anyone looks, so a page opened during an incident
//! shows the minutes before it. `GET /series` answers [`SeriesReport`].
//!
//! [`Series`] is the arithmetic alone, without actors or clocks, and is
//! what the unit tests drive.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Serialize;

use crate::metrics::{latency_bound, Counters, Metrics, LATENCY_BUCKETS};
use crate::node::{self, Node};
use crate::queue::QueueStats;

/// One sample a second...
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// ...for five minutes.
pub const CAPACITY: usize = 300;
/// Destinations charted: the deepest over the window.
pub const TOP_DESTINATIONS: usize = 5;
/// Destinations kept per sample (more than charted, so that one charted
/// has few gaps while others pass it for a while).
const KEPT_PER_SAMPLE: usize = 2 * TOP_DESTINATIONS;

/// One second of the node.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    at_ms: u64,
    in_per_s: f64,
    out_per_s: f64,
    p99_ms: Option<f64>,
    lag: Option<u64>,
    /// The deepest destinations then, deepest first.
    depths: Vec<(Arc<str>, u64)>,
}

/// The last [`CAPACITY`] samples and the counters of the last one.
#[derive(Debug, Clone)]
pub struct Series {
    capacity: usize,
    samples: VecDeque<Sample>,
    last: Option<Counters>,
}

impl Default for Series {
    fn default() -> Self {
        Series::new(CAPACITY)
    }
}

impl Series {
    pub fn new(capacity: usize) -> Series {
        Series { capacity: capacity.max(1), samples: VecDeque::new(), last: None }
    }

    /// Take a sample at `at_ms` (ms since the Unix epoch): `counters` now,
    /// `elapsed` since the counters of the previous sample were read, the
    /// replication lag and the destinations now. The first call only sets
    /// the baseline (a rate needs two readings); returns whether a sample
    /// was added.
    pub fn record(
        &mut self,
        at_ms: u64,
        counters: Counters,
        elapsed: Duration,
        lag: Option<u64>,
        queues: &[QueueStats],
    ) -> bool {
        let Some(prev) = self.last.replace(counters) else { return false };
        let secs = elapsed.as_secs_f64();
        if secs <= 0.0 {
            return false;
        }
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / secs;
        let sample = Sample {
            at_ms,
            in_per_s: rate(counters.messages_in, prev.messages_in),
            out_per_s: rate(counters.messages_out, prev.messages_out),
            p99_ms: p99_ms(&prev.latency, &counters.latency),
            lag,
            depths: self.deepest(queues),
        };
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        true
    }

    /// The deepest destinations of `queues` (ties by name), their names
    /// shared with the previous sample's where they are the same.
    fn deepest(&self, queues: &[QueueStats]) -> Vec<(Arc<str>, u64)> {
        let mut by_depth: Vec<&QueueStats> = queues.iter().collect();
        by_depth.sort_by(|a, b| b.depth.cmp(&a.depth).then_with(|| a.name.cmp(&b.name)));
        let before = self.samples.back().map(|s| s.depths.as_slice()).unwrap_or_default();
        by_depth
            .into_iter()
            .take(KEPT_PER_SAMPLE)
            .map(|q| {
                let name = match before.iter().find(|(n, _)| **n == *q.name) {
                    Some((n, _)) => n.clone(),
                    None => Arc::from(q.name.as_str()),
                };
                (name, q.depth as u64)
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The samples as the page charts them, oldest first.
    pub fn report(&self) -> SeriesReport {
        let s = &self.samples;
        // The destinations charted: the deepest at any moment of the window.
        let mut peaks: Vec<(Arc<str>, u64)> = Vec::new();
        for (name, depth) in s.iter().flat_map(|x| x.depths.iter()) {
            match peaks.iter_mut().find(|(n, _)| n == name) {
                Some((_, peak)) => *peak = (*peak).max(*depth),
                None => peaks.push((name.clone(), *depth)),
            }
        }
        peaks.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let depth = peaks
            .into_iter()
            .take(TOP_DESTINATIONS)
            .map(|(name, _)| DepthSeries {
                points: s.iter().map(|x| x.depths.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)).collect(),
                name: name.to_string(),
            })
            .collect();
        SeriesReport {
            interval_ms: SAMPLE_EVERY.as_millis() as u64,
            capacity: self.capacity,
            at_ms: s.iter().map(|x| x.at_ms).collect(),
            messages_in_per_s: s.iter().map(|x| x.in_per_s).collect(),
            messages_out_per_s: s.iter().map(|x| x.out_per_s).collect(),
            confirm_p99_ms: s.iter().map(|x| x.p99_ms).collect(),
            replication_lag: s.iter().map(|x| x.lag).collect(),
            depth,
        }
    }
}

/// The 99th percentile, in ms, of the confirms counted between two readings
/// of the latency buckets (`before`, `now`: counts per bucket, not
/// cumulative, the last +Inf). Interpolated linearly within its bucket, as
/// Prometheus' `histogram_quantile` does; in the +Inf bucket, the largest
/// finite bound. `None` without confirms in between.
pub fn p99_ms(before: &[u64; LATENCY_BUCKETS + 1], now: &[u64; LATENCY_BUCKETS + 1]) -> Option<f64> {
    let deltas: Vec<u64> = now.iter().zip(before).map(|(n, b)| n.saturating_sub(*b)).collect();
    let total: u64 = deltas.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the p99 observation, 1-based: ceil(0.99 * total).
    let rank = (total * 99).div_ceil(100);
    let mut below = 0u64;
    for (i, d) in deltas.iter().enumerate() {
        if *d > 0 && below + d >= rank {
            let lower = if i == 0 { 0.0 } else { latency_bound(i - 1) };
            if i == LATENCY_BUCKETS {
                return Some(lower * 1000.0);
            }
            let upper = latency_bound(i);
            let within = (rank - below) as f64 / *d as f64;
            return Some((lower + (upper - lower) * within) * 1000.0);
        }
        below += d;
    }
    None
}

/// `GET /series`: the last minutes, one entry per sample in every list,
/// oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesReport {
    /// Time between samples.
    pub interval_ms: u64,
    /// Samples kept at most.
    pub capacity: usize,
    /// When each sample was taken, ms since the Unix epoch.
    pub at_ms: Vec<u64>,
    /// Publish frames received per second.
    pub messages_in_per_s: Vec<f64>,
    /// Messages delivered to consumers per second.
    pub messages_out_per_s: Vec<f64>,
    /// The p99 of the confirms sent during the second, ms (`null`: none).
    pub confirm_p99_ms: Vec<Option<f64>>,
    /// Ops between this node's store and its peer's (`NodeStatus::replication_lag`:
    /// on the active, what the peer has not acknowledged); `null` on a lone node.
    pub replication_lag: Vec<Option<u64>>,
    /// The [`TOP_DESTINATIONS`] deepest destinations of the window.
    pub depth: Vec<DepthSeries>,
}

/// One destination's depth over the window.
#[derive(Debug, Clone, Serialize)]
pub struct DepthSeries {
    pub name: String,
    /// Its depth per sample; `null` where it was not among the deepest (or
    /// not served: a passive node has no destinations).
    pub points: Vec<Option<u64>>,
}

/// Takes a sample every [`SAMPLE_EVERY`]; answers [`GetSeries`].
pub struct Sampler {
    node: Addr<Node>,
    metrics: Metrics,
    series: Series,
    /// When the counters of the last sample were read.
    last_read: Option<Instant>,
    /// A status request is under way: a slow node skips a beat rather than
    /// queueing requests.
    asking: bool,
}

impl Sampler {
    pub fn new(node: Addr<Node>, metrics: Metrics) -> Sampler {
        Sampler { node, metrics, series: Series::default(), last_read: None, asking: false }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.asking {
            return;
        }
        self.asking = true;
        let status = self.node.send(node::GetNodeStatus);
        ctx.spawn(status.into_actor(self).map(|status, act, _| {
            act.asking = false;
            let Ok(status) = status else { return };
            // The counters are read as the status arrives, and the time
            // between two readings is what the rates divide by.
            let (read, counters) = (Instant::now(), act.metrics.counters());
            let elapsed = act.last_read.map_or(Duration::ZERO, |t| read.duration_since(t));
            act.last_read = Some(read);
            let at_ms =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            act.series.record(at_ms, counters, elapsed, status.replication_lag(), &status.queues);
        }));
    }
}

impl Actor for Sampler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.tick(ctx);
        ctx.run_interval(SAMPLE_EVERY, |s, ctx| s.tick(ctx));
    }
}

/// The samples so far.
#[derive(Message)]
#[rtype(result = "SeriesReport")]
pub struct GetSeries;

impl Handler<GetSeries> for Sampler {
    type Result = MessageResult<GetSeries>;
    fn handle(&mut self, _: GetSeries, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.series.report())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn counters(messages_in: u64, messages_out: u64, latency: &[(usize, u64)]) -> Counters {
        let mut c = Counters { messages_in, messages_out, ..Default::default() };
        for (i, n) in latency {
            c.latency[*i] = *n;
        }
        c
    }

    fn queue(name: &str, depth: usize) -> QueueStats {
        QueueStats { name: name.into(), depth, in_flight: 0, consumers: 0 }
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn the_p99_comes_from_the_bucket_deltas_of_the_interval() {
        // Bounds in ms: 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, ...
        assert!((latency_bound(5) * 1000.0 - 1.6).abs() < 1e-9);
        let before = counters(0, 0, &[(0, 500), (10, 1_000)]).latency;
        // 98 fast ones and 2 in (0.8, 1.6] ms since: the 99th of 100 is
        // half way into that bucket. The 1,000 slow ones before do not count.
        let now = counters(0, 0, &[(0, 598), (5, 2), (10, 1_000)]).latency;
        let p = p99_ms(&before, &now).unwrap();
        assert!((p - 1.2).abs() < 1e-9, "{p}");
        // All in the first bucket: interpolated from 0.
        let now = counters(0, 0, &[(0, 600), (10, 1_000)]).latency;
        assert!((p99_ms(&before, &now).unwrap() - 0.05 * 0.99).abs() < 1e-9);
        // Nothing confirmed in between: no p99 (not 0).
        assert_eq!(p99_ms(&before, &before), None);
        // One slow confirm among 10: the p99 is in its bucket.
        let now = counters(0, 0, &[(0, 509), (10, 1_001)]).latency;
        let p = p99_ms(&before, &now).unwrap();
        assert!(p > latency_bound(9) * 1000.0 && p <= latency_bound(10) * 1000.0, "{p}");
        // Beyond the last bound: the largest finite bound.
        let now = counters(0, 0, &[(0, 500), (10, 1_000), (LATENCY_BUCKETS, 3)]).latency;
        let p = p99_ms(&before, &now).unwrap();
        assert!((p - latency_bound(LATENCY_BUCKETS - 1) * 1000.0).abs() < 1e-9, "{p}");
    }

    #[test]
    fn rates_divide_by_the_time_that_passed() {
        let mut s = Series::new(10);
        assert!(!s.record(1_000, counters(100, 50, &[]), SEC, None, &[]), "the first reading is the baseline");
        assert!(s.is_empty());
        assert!(s.record(2_000, counters(400, 80, &[]), SEC, Some(7), &[]));
        // A late tick: 600 more in 2 s is 300/s, not 600/s.
        assert!(s.record(4_000, counters(1_000, 80, &[]), 2 * SEC, Some(0), &[]));
        // No time at all (a clock that did not move): no sample.
        assert!(!s.record(4_000, counters(1_000, 80, &[]), Duration::ZERO, None, &[]));
        let r = s.report();
        assert_eq!(r.at_ms, [2_000, 4_000]);
        assert_eq!(r.messages_in_per_s, [300.0, 300.0]);
        assert_eq!(r.messages_out_per_s, [30.0, 0.0]);
        assert_eq!(r.replication_lag, [Some(7), Some(0)]);
        assert_eq!(r.confirm_p99_ms, [None, None]);
    }

    #[test]
    fn five_minutes_are_kept_and_no_more() {
        let mut s = Series::default();
        let many: Vec<QueueStats> = (0..50).map(|i| queue(&format!("queue:q{i:02}"), i)).collect();
        for t in 0..=(CAPACITY as u64 + 100) {
            s.record(t * 1000, counters(t, t, &[]), SEC, None, &many);
        }
        assert_eq!(s.len(), CAPACITY);
        let r = s.report();
        assert_eq!(r.at_ms.len(), CAPACITY);
        assert_eq!(r.at_ms.first(), Some(&101_000), "the oldest went first");
        assert_eq!(r.depth.len(), TOP_DESTINATIONS);
        assert!(s.samples.iter().all(|x| x.depths.len() == KEPT_PER_SAMPLE), "a bounded few per sample");
        // The names are shared between samples, not copied each second.
        let a = &s.samples[0].depths[0].0;
        let b = &s.samples[CAPACITY - 1].depths[0].0;
        assert!(Arc::ptr_eq(a, b));
    }

    #[test]
    fn the_deepest_destinations_of_the_window_are_charted() {
        let mut s = Series::new(10);
        s.record(0, Counters::default(), SEC, None, &[]);
        let steps: [&[QueueStats]; 3] = [
            &[queue("queue:a", 5), queue("queue:b", 1), queue("queue:c", 0)],
            &[queue("queue:a", 2), queue("queue:b", 90), queue("queue:c", 3)],
            &[queue("queue:a", 0), queue("queue:b", 80), queue("queue:c", 4)],
        ];
        for (i, qs) in steps.iter().enumerate() {
            s.record(1_000 * (i as u64 + 1), Counters::default(), SEC, None, qs);
        }
        let r = s.report();
        let names: Vec<&str> = r.depth.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["queue:b", "queue:a", "queue:c"], "by their peak in the window");
        assert_eq!(r.depth[0].points, [Some(1), Some(90), Some(80)]);
        assert_eq!(r.depth[1].points, [Some(5), Some(2), Some(0)]);

        // With more destinations than are kept, one that is not among the
        // deepest in a sample has no point there (not a made-up 0).
        let mut s = Series::new(10);
        s.record(0, Counters::default(), SEC, None, &[]);
        let crowd: Vec<QueueStats> = (0..KEPT_PER_SAMPLE).map(|i| queue(&format!("queue:z{i}"), 100 + i)).collect();
        s.record(1_000, Counters::default(), SEC, None, &[vec![queue("queue:spike", 1_000)], crowd.clone()].concat());
        s.record(2_000, Counters::default(), SEC, None, &[vec![queue("queue:spike", 1)], crowd].concat());
        let r = s.report();
        assert_eq!(r.depth[0].name, "queue:spike");
        assert_eq!(r.depth[0].points, [Some(1_000), None]);
    }

    #[test]
    fn the_report_is_the_json_the_page_reads() {
        let mut s = Series::new(10);
        s.record(0, Counters::default(), SEC, None, &[]);
        s.record(1_000, counters(10, 5, &[(3, 10)]), SEC, Some(2), &[queue("queue:orders", 4)]);
        let v = serde_json::to_value(s.report()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "at_ms",
                "capacity",
                "confirm_p99_ms",
                "depth",
                "interval_ms",
                "messages_in_per_s",
                "messages_out_per_s",
                "replication_lag"
            ]
        );
        assert_eq!(v["depth"], serde_json::json!([{"name": "queue:orders", "points": [4]}]));
        assert_eq!(v["replication_lag"], serde_json::json!([2]));
        assert!(v["confirm_p99_ms"][0].as_f64().is_some_and(|p| p > 0.2 && p <= 0.4), "{v}");
    }
}
