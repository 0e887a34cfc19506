//! The checker: reads what a lab run recorded (the workload's records, the
//! role monitors' samples, the lab's fault log) and reports the invariants.
//!
//! - **lost**: confirmed, never received (must be 0);
//! - **phantom**: received, never sent (must be 0);
//! - **duplicates**: deliveries beyond the first of each message (allowed);
//! - **double-active**: intervals in which both nodes said they were active
//!   (`active` or `active-alone`) at once (must be none). A node counts as
//!   active from the answer of the first of a run of active samples to the
//!   request of the last one (samples at most 500 ms apart); a lone active
//!   sample counts at its midpoint. So a stale sample of a frozen node never
//!   stretches its activity over the time it said nothing;
//! - **recovery** of each event: from the event to the confirm of the first
//!   message sent at or after it (a confirm already on its way back at the
//!   event does not count). An event with no such confirm did not recover;
//! - errors the application saw (none: a failover shorter than the client's
//!   `failover_timeout` costs only time).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use super::monitor::Sample;
use super::proc::read_json_lines;

/// Samples further apart than this do not make one run of a role.
const MAX_SAMPLE_GAP_US: u64 = 500_000;

/// One event of the lab (a fault or a repair) and how the workload fared.
#[derive(Debug, Clone)]
pub struct EventOutcome {
    pub t: u64,
    pub name: String,
    /// A fault (pull, kill, freeze, netem), not a repair.
    pub fault: bool,
    pub recovery_ms: Option<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub title: String,
    /// Wall-clock microseconds of the lab's start: times are shown relative to it.
    pub t0: u64,
    pub duration_s: f64,
    pub sent: usize,
    pub confirmed: usize,
    pub received: usize,
    pub deliveries: usize,
    pub duplicates: usize,
    pub lost: Vec<String>,
    pub phantom: Vec<String>,
    pub double_active: Vec<(u64, u64)>,
    pub events: Vec<EventOutcome>,
    /// (t, node, from, to)
    pub transitions: Vec<(u64, String, String, String)>,
    pub client_reconnects: usize,
    pub errors: Vec<String>,
    /// The workload stopped by itself and drained (its `done` record).
    pub done: bool,
}

/// Check the run recorded in `dir` (`workload.jsonl`, `roles-a.jsonl`,
/// `roles-b.jsonl`, `events.jsonl`).
pub fn check(dir: &Path, title: &str) -> Report {
    let workload = read_json_lines(&dir.join("workload.jsonl"));
    let events = read_json_lines(&dir.join("events.jsonl"));
    let samples: Vec<Vec<Sample>> = ["a", "b"]
        .iter()
        .map(|n| {
            read_json_lines(&dir.join(format!("roles-{n}.jsonl")))
                .into_iter()
                .filter_map(|v| serde_json::from_value(v).ok())
                .collect()
        })
        .collect();

    let mut r = Report { title: title.to_string(), ..Default::default() };
    r.t0 = events.first().and_then(|e| e["t"].as_u64()).unwrap_or(0);
    let end = workload.iter().chain(&events).filter_map(|e| e["t"].as_u64()).max().unwrap_or(r.t0);
    r.duration_s = end.saturating_sub(r.t0) as f64 / 1e6;

    let ids = |ev: &str| -> Vec<String> {
        workload.iter().filter(|w| w["ev"] == ev).filter_map(|w| w["id"].as_str().map(str::to_string)).collect()
    };
    let sent: HashSet<String> = ids("sent").into_iter().collect();
    let confirmed: HashSet<String> = ids("ok").into_iter().collect();
    let deliveries = ids("recv");
    let received: HashSet<String> = deliveries.iter().cloned().collect();
    r.sent = sent.len();
    r.confirmed = confirmed.len();
    r.received = received.len();
    r.deliveries = deliveries.len();
    r.duplicates = deliveries.len() - received.len();
    r.lost = sorted(confirmed.difference(&received));
    r.phantom = sorted(received.difference(&sent));
    r.errors = workload
        .iter()
        .filter(|w| w["ev"] == "error")
        .map(|w| format!("{}: {}", w["who"].as_str().unwrap_or("?"), w["text"].as_str().unwrap_or("?")))
        .collect();
    r.done = workload.iter().any(|w| w["ev"] == "done");
    r.client_reconnects = workload
        .iter()
        .filter(|w| w["ev"] == "client" && w["text"].as_str().is_some_and(|t| t.starts_with("disconnected")))
        .count();

    // Confirms in send order (they resolve in that order): (sent, confirmed).
    let confirms: Vec<(u64, u64)> = workload
        .iter()
        .filter(|w| w["ev"] == "ok")
        .filter_map(|w| Some((w["sent"].as_u64()?, w["t"].as_u64()?)))
        .collect();
    for e in events.iter().skip(1) {
        let (Some(t), Some(name)) = (e["t"].as_u64(), e["ev"].as_str()) else { continue };
        let recovery_ms = confirms.iter().find(|(s, _)| *s >= t).map(|(_, c)| c.saturating_sub(t) as f64 / 1e3);
        r.events.push(EventOutcome { t, name: name.to_string(), fault: e["fault"] == true, recovery_ms });
    }

    for s in &samples {
        let mut prev: Option<&Sample> = None;
        for x in s {
            if prev.is_none_or(|p| p.role() != x.role()) {
                let from = prev.map_or("-", |p| p.role()).to_string();
                r.transitions.push((x.t1, x.node.clone(), from, x.role().to_string()));
            }
            prev = Some(x);
        }
    }
    r.transitions.sort();
    let (sa, sb) = (active_spans(&samples[0]), active_spans(&samples[1]));
    for &(a0, a1) in &sa {
        for &(b0, b1) in &sb {
            let (lo, hi) = (a0.max(b0), a1.min(b1));
            if lo <= hi {
                r.double_active.push((lo, hi));
            }
        }
    }
    r
}

fn sorted<'a>(it: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut v: Vec<String> = it.cloned().collect();
    v.sort_by_key(|id| (id.len(), id.clone()));
    v
}

/// The intervals in which one node's samples say it was active for sure.
fn active_spans(samples: &[Sample]) -> Vec<(u64, u64)> {
    let mut spans = Vec::new();
    let mut run: Option<(&Sample, &Sample)> = None;
    let close = |run: Option<(&Sample, &Sample)>, spans: &mut Vec<(u64, u64)>| {
        if let Some((first, last)) = run {
            if first.t1 <= last.t0 {
                spans.push((first.t1, last.t0));
            } else {
                let mid = first.t0 / 2 + first.t1 / 2;
                spans.push((mid, mid));
            }
        }
    };
    for s in samples {
        run = match run {
            Some((first, last)) if s.is_active() && s.t0.saturating_sub(last.t1) <= MAX_SAMPLE_GAP_US => {
                Some((first, s))
            }
            _ => {
                close(run, &mut spans);
                s.is_active().then_some((s, s))
            }
        };
    }
    close(run, &mut spans);
    spans
}

impl Report {
    /// Every broken invariant, one line each; empty means the run passed.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.confirmed == 0 {
            v.push("the workload confirmed nothing".to_string());
        }
        if !self.lost.is_empty() {
            v.push(format!("{} confirmed messages lost, e.g. {:?}", self.lost.len(), head(&self.lost)));
        }
        if !self.phantom.is_empty() {
            v.push(format!(
                "{} messages received that were never sent, e.g. {:?}",
                self.phantom.len(),
                head(&self.phantom)
            ));
        }
        for (lo, hi) in &self.double_active {
            v.push(format!("both nodes active from {} to {}", self.at(*lo), self.at(*hi)));
        }
        for e in &self.events {
            if e.recovery_ms.is_none() {
                v.push(format!("no confirmed send after `{}` at {}", e.name, self.at(e.t)));
            }
        }
        if !self.errors.is_empty() {
            v.push(format!("the application saw {} errors, e.g. {:?}", self.errors.len(), head(&self.errors)));
        }
        if !self.done {
            v.push("the workload did not finish its drain".to_string());
        }
        v
    }

    pub fn passed(&self) -> bool {
        self.violations().is_empty()
    }

    fn at(&self, t: u64) -> String {
        format!("+{:.2}s", t.saturating_sub(self.t0) as f64 / 1e6)
    }

    /// Recovery times of the faults (not the repairs), grouped by event
    /// name: (name, count, median ms, max ms).
    pub fn recovery_by_fault(&self) -> Vec<(String, usize, f64, f64)> {
        let mut by: Vec<(String, Vec<f64>)> = Vec::new();
        for e in self.events.iter().filter(|e| e.fault) {
            let Some(ms) = e.recovery_ms else { continue };
            match by.iter_mut().find(|(k, _)| *k == e.name) {
                Some((_, v)) => v.push(ms),
                None => by.push((e.name.clone(), vec![ms])),
            }
        }
        by.into_iter()
            .map(|(k, mut v)| {
                v.sort_by(f64::total_cmp);
                let median = v[v.len() / 2];
                let max = *v.last().expect("a group has at least one entry");
                (k, v.len(), median, max)
            })
            .collect()
    }

    /// One line for docs/FAILOVER.md's table.
    pub fn summary_line(&self) -> String {
        let rec: Vec<String> = self
            .recovery_by_fault()
            .iter()
            .map(|(k, n, med, max)| {
                if *n == 1 {
                    format!("{k}: {med:.0} ms")
                } else {
                    format!("{k} ×{n}: median {med:.0} ms, max {max:.0} ms")
                }
            })
            .collect();
        format!(
            "{} | {} | {} | {} | {} | {} | {:.0} s | {}",
            self.title,
            rec.join("; "),
            self.confirmed,
            self.lost.len(),
            self.duplicates,
            self.double_active.len(),
            self.duration_s,
            if self.passed() { "pass" } else { "FAIL" }
        )
    }
}

fn head(v: &[String]) -> &[String] {
    &v[..v.len().min(5)]
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let _ = writeln!(s, "== checker: {} ==", self.title);
        let _ = writeln!(
            s,
            "workload: sent {}, confirmed {}, received {} distinct in {} deliveries; client reconnects {}",
            self.sent, self.confirmed, self.received, self.deliveries, self.client_reconnects
        );
        let _ = writeln!(s, "confirmed messages lost:          {}", self.lost.len());
        let _ = writeln!(s, "received but never sent:          {}", self.phantom.len());
        let _ = writeln!(s, "duplicates (allowed):             {}", self.duplicates);
        let _ = writeln!(s, "intervals with two actives:       {}", self.double_active.len());
        let _ = writeln!(s, "errors seen by the application:   {}", self.errors.len());
        let _ = writeln!(s, "recovery (event -> first confirm of a message sent after it):");
        const MAX_LINES: usize = 40;
        for e in self.events.iter().take(MAX_LINES) {
            let took = e.recovery_ms.map_or("NOT RECOVERED".to_string(), |ms| format!("{ms:8.1} ms"));
            let _ = writeln!(s, "  {:>8} {:<28} {took}", self.at(e.t), e.name);
        }
        if self.events.len() > MAX_LINES {
            let _ = writeln!(s, "  ... {} more events", self.events.len() - MAX_LINES);
        }
        for (kind, n, med, max) in self.recovery_by_fault() {
            let _ = writeln!(s, "  {kind}: {n} time(s), median {med:.1} ms, max {max:.1} ms");
        }
        let _ = writeln!(s, "role changes (from the monitors beside each node):");
        let mut per_node: HashMap<&str, usize> = HashMap::new();
        for (t, node, from, to) in &self.transitions {
            let n = per_node.entry(node).or_default();
            *n += 1;
            if *n <= MAX_LINES / 2 {
                let _ = writeln!(s, "  {:>8} {node}: {from} -> {to}", self.at(*t));
            }
        }
        for (node, n) in per_node {
            if n > MAX_LINES / 2 {
                let _ = writeln!(s, "  ... {node}: {} more role changes", n - MAX_LINES / 2);
            }
        }
        let violations = self.violations();
        if violations.is_empty() {
            let _ = writeln!(s, "verdict: PASS ({:.1} s)", self.duration_s);
        } else {
            let _ = writeln!(s, "verdict: FAIL ({:.1} s)", self.duration_s);
            for v in violations {
                let _ = writeln!(s, "  - {v}");
            }
        }
        f.write_str(&s)
    }
}
