//! The checker: reads what a lab run recorded (the workload's records, the
//! role monitors' samples, the lab's fault log) and reports the invariants.
//!
//! - **lost**: confirmed, never received (must be 0);
//! - **phantom**: received, never sent (must be 0);
//! - **duplicates**: deliveries beyond the first of each message (allowed);
//! - **double-active**, two forms (must be none of either): intervals in
//!   which both nodes said they were active (`active` or `active-alone`) at
//!   once; and a message sent and confirmed entirely inside one node's
//!   sure-active span by the other node (the workload's `ok` names the node
//!   its producer was connected to). A node counts as surely active from the
//!   answer of the first of a run of active samples to the request of the
//!   last one (samples at most 500 ms apart); a lone active sample counts at
//!   its midpoint. So a stale sample of a frozen node never stretches its
//!   activity over the time it said nothing;
//! - **promotions lacking confirmed messages** (must be none): when a node
//!   starts serving in a new epoch E (its first active sample in E), every
//!   message confirmed before its previous sample was taken must be in its
//!   store: delivered (at some point) with an id `(e, seq)` that its history
//!   (from its status) places before E: `e < E`, and its entry for `e`
//!   starts at or before `seq` and the next one after it. A message
//!   delivered only with ids of epoch `>= E` reached it later (a hand-over),
//!   so it was serving without it. A promotion an operator forced
//!   (`promote --force`) is exempt;
//! - **stuck** (must be none): after each repair the lab marks as the end of
//!   a round (`settle` in the fault log), one node active and the other
//!   passive and in sync within 30 s;
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

/// After a round's last repair, the pair must be back (one node active, the
/// other passive and in sync) within this.
pub const STUCK_AFTER_US: u64 = 30_000_000;

/// History entries a store keeps (the store's `MAX_ENTRIES`): an epoch
/// older than the first entry of a history this long may have been dropped
/// from it, so a message of that epoch cannot be placed.
const HISTORY_KEPT: usize = 256;

/// A node's start of service in a new epoch, checked against what had been
/// confirmed before it.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// Its first active sample's answer.
    pub t: u64,
    pub node: String,
    pub epoch: u64,
    /// Messages confirmed before the node's previous sample (and delivered).
    pub required: usize,
    /// Those it did not hold: (message, every id it was delivered with).
    pub lacking: Vec<(String, Vec<(u64, u64)>)>,
    /// Not checked, and why (no history in the samples; a forced promotion).
    pub unchecked: Option<String>,
}

/// A round's end (every fault repaired) and how long the pair took to be
/// back: one node active, the other passive and in sync.
#[derive(Debug, Clone)]
pub struct Settle {
    pub t: u64,
    pub name: String,
    /// `None`: not within [`STUCK_AFTER_US`].
    pub took_ms: Option<f64>,
}

/// A message one node confirmed while the other was surely active.
#[derive(Debug, Clone)]
pub struct ForeignConfirm {
    pub id: String,
    /// The node that confirmed it, and the one surely active meanwhile.
    pub by: String,
    pub active: String,
    pub sent: u64,
    pub confirmed: u64,
}

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
    /// The second form of double-active.
    pub foreign_confirms: Vec<ForeignConfirm>,
    pub promotions: Vec<Promotion>,
    pub settles: Vec<Settle>,
    pub events: Vec<EventOutcome>,
    /// (t, node, from, to)
    pub transitions: Vec<(u64, String, String, String)>,
    pub client_reconnects: usize,
    pub errors: Vec<String>,
    /// Publishes refused with `LimitReached` for a nearly full disk while the
    /// lab held either node's disk full (or at ENOSPC): the broker's promise
    /// (a clear refusal before the disk is full; the limit is the pair's), not
    /// a violation. Any other refusal is in `errors`.
    pub disk_refusals: usize,
    /// The workload stopped by itself and drained (its `done` record).
    pub done: bool,
}

/// The broker's refusal of a publish for its disk limits (broker/src/disk.rs).
fn is_disk_refusal(text: &str) -> bool {
    text.contains("LimitReached") && (text.contains("min_free_disk_bytes") || text.contains("max_disk_bytes"))
}

/// When the lab held a node's disk full or at ENOSPC (`disk N full BYTES`
/// or `disk N enospc` .. `disk N ok` in the event log), as (from, to) in
/// microseconds, whichever the node (the limit is the pair's); `to` runs on
/// for the broker's measure (once a second) and the refusal's way back to
/// the client.
fn disk_full_windows(events: &[serde_json::Value]) -> Vec<(u64, u64)> {
    const AFTER_US: u64 = 2_500_000;
    let mut open: HashMap<String, u64> = HashMap::new();
    let mut windows = Vec::new();
    for e in events {
        let (Some(name), Some(t)) = (e["ev"].as_str(), e["t"].as_u64()) else { continue };
        let words: Vec<&str> = name.split_whitespace().collect();
        match words.as_slice() {
            ["disk", node, "full" | "enospc", ..] => {
                open.entry((*node).to_string()).or_insert(t);
            }
            ["disk", node, ..] => {
                if let Some(from) = open.remove(*node) {
                    windows.push((from, t + AFTER_US));
                }
            }
            _ => {}
        }
    }
    windows.extend(open.into_values().map(|from| (from, u64::MAX)));
    windows
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
    let full = disk_full_windows(&events);
    let refusal_ok = |t: u64| full.iter().any(|(from, to)| (*from..=*to).contains(&t));
    for w in workload.iter().filter(|w| w["ev"] == "error") {
        let text = w["text"].as_str().unwrap_or("?");
        let t = w["t"].as_u64().unwrap_or(0);
        if is_disk_refusal(text) && refusal_ok(t) {
            r.disk_refusals += 1;
        } else {
            r.errors.push(format!("{}: {text}", w["who"].as_str().unwrap_or("?")));
        }
    }
    r.done = workload.iter().any(|w| w["ev"] == "done");
    r.client_reconnects = workload
        .iter()
        .filter(|w| w["ev"] == "client" && w["text"].as_str().is_some_and(|t| t.starts_with("disconnected")))
        .count();

    // Confirms in send order (they resolve in that order): (sent, confirmed).
    let mut confirms: Vec<(u64, u64)> = workload
        .iter()
        .filter(|w| w["ev"] == "ok")
        .filter_map(|w| Some((w["sent"].as_u64()?, w["t"].as_u64()?)))
        .collect();
    confirms.sort_unstable();
    // The first confirm of a message sent at or after each time.
    let first_after = |t: u64| confirms.get(confirms.partition_point(|(s, _)| *s < t)).map(|(_, c)| *c);
    for e in events.iter().skip(1) {
        let (Some(t), Some(name)) = (e["t"].as_u64(), e["ev"].as_str()) else { continue };
        let recovery_ms = first_after(t).map(|c| c.saturating_sub(t) as f64 / 1e3);
        r.events.push(EventOutcome { t, name: name.to_string(), fault: e["fault"] == true, recovery_ms });
        if e["settle"] == true {
            let took_ms = settled_at(&samples[0], &samples[1], t).map(|at| at.saturating_sub(t) as f64 / 1e3);
            r.settles.push(Settle { t, name: name.to_string(), took_ms });
        }
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
    for w in workload.iter().filter(|w| w["ev"] == "ok") {
        let (Some(by), Some(sent), Some(confirmed)) = (w["node"].as_str(), w["sent"].as_u64(), w["t"].as_u64()) else {
            continue;
        };
        for (active, spans) in [("a", &sa), ("b", &sb)] {
            if active != by && within_a_span(spans, sent, confirmed) {
                let id = w["id"].as_str().unwrap_or("?").to_string();
                r.foreign_confirms.push(ForeignConfirm { id, by: by.into(), active: active.into(), sent, confirmed });
            }
        }
    }
    r.promotions = promotions(&workload, &samples);
    r
}

/// When (the later answer of the two) the pair was first seen back after
/// `t`: one node `active`, the other passive and in sync, judged on each
/// node's latest sample requested at or after `t`. `None` if not within
/// [`STUCK_AFTER_US`].
fn settled_at(a: &[Sample], b: &[Sample], t: u64) -> Option<u64> {
    let from = |s: &[Sample]| s.partition_point(|x| x.t0 < t);
    let (mut i, mut j) = (from(a), from(b));
    let (mut la, mut lb): (Option<&Sample>, Option<&Sample>) = (None, None);
    let stable = |x: &Sample, y: &Sample| {
        (x.role() == "active" && y.is_in_sync_passive()) || (y.role() == "active" && x.is_in_sync_passive())
    };
    // Both monitors' samples in the order their answers arrived.
    loop {
        let next_a = a.get(i).map(|x| x.t1);
        let next_b = b.get(j).map(|x| x.t1);
        let take_a = match (next_a, next_b) {
            (None, None) => return None,
            (Some(x), Some(y)) => x <= y,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        let at = if take_a {
            la = Some(&a[i]);
            i += 1;
            a[i - 1].t1
        } else {
            lb = Some(&b[j]);
            j += 1;
            b[j - 1].t1
        };
        if at > t + STUCK_AFTER_US {
            return None;
        }
        if let (Some(x), Some(y)) = (la, lb) {
            if stable(x, y) {
                return Some(at);
            }
        }
    }
}

/// Whether `[from, to]` lies inside one of `spans` (sorted, disjoint).
fn within_a_span(spans: &[(u64, u64)], from: u64, to: u64) -> bool {
    let k = spans.partition_point(|(s0, _)| *s0 <= from);
    k > 0 && spans[k - 1].1 >= to
}

/// A confirmed message: its confirm time, its name, every id it was delivered with.
type Confirmed<'a> = (u64, &'a str, &'a [(u64, u64)]);

/// Every start of service in a new epoch, checked (see the module doc).
fn promotions(workload: &[serde_json::Value], samples: &[Vec<Sample>]) -> Vec<Promotion> {
    // Each message's delivered ids.
    let mut delivered: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for w in workload.iter().filter(|w| w["ev"] == "recv") {
        let (Some(id), Some(e), Some(s)) = (w["id"].as_str(), w["epoch"].as_u64(), w["seq"].as_u64()) else {
            continue;
        };
        let ids = delivered.entry(id).or_default();
        if !ids.contains(&(e, s)) {
            ids.push((e, s));
        }
    }
    // Confirms in confirm order, each with its delivered ids (a message never
    // delivered is counted as lost, not here).
    let mut confirms: Vec<Confirmed> = workload
        .iter()
        .filter(|w| w["ev"] == "ok")
        .filter_map(|w| {
            let id = w["id"].as_str()?;
            Some((w["t"].as_u64()?, id, delivered.get(id)?.as_slice()))
        })
        .collect();
    confirms.sort_by_key(|c| c.0);

    let mut out = Vec::new();
    for node in samples {
        let mut history: Option<&[(u64, u64, bool)]> = None;
        let mut seen: HashSet<u64> = HashSet::new();
        let mut prev: Option<&Sample> = None;
        // While the node is active: the request time of the sample before
        // its first active one (the promotion came after it).
        let mut run_cutoff: Option<u64> = None;
        // A new epoch seen active whose history entry has not shown yet
        // (role, epoch and history are read at slightly different moments):
        // (first active sample, epoch, cutoff).
        let mut pending: Option<(&Sample, u64, u64)> = None;
        for s in node {
            if let Some(h) = &s.history {
                history = Some(h);
            }
            if s.is_active() {
                let cutoff = *run_cutoff.get_or_insert(prev.map_or(0, |p| p.t0));
                if let Some(epoch) = s.epoch.filter(|e| seen.insert(*e)) {
                    if let Some((first, e, _)) = pending.take() {
                        out.push(unchecked(first, e, "its history never showed the epoch"));
                    }
                    pending = Some((s, epoch, cutoff));
                }
            } else {
                run_cutoff = None;
            }
            if let (Some((first, epoch, cutoff)), Some(h)) = (pending, history) {
                if let Some(i) = h.iter().position(|x| x.0 == epoch) {
                    let before = &confirms[..confirms.partition_point(|c| c.0 < cutoff)];
                    out.push(check_promotion(first, epoch, &h[..=i], before));
                    pending = None;
                }
            }
            prev = Some(s);
        }
        if let Some((first, e, _)) = pending {
            out.push(unchecked(first, e, "its history never showed the epoch"));
        }
    }
    out.sort_by_key(|p| p.t);
    out
}

fn unchecked(s: &Sample, epoch: u64, why: &str) -> Promotion {
    Promotion {
        t: s.t1,
        node: s.node.clone(),
        epoch,
        required: 0,
        lacking: Vec::new(),
        unchecked: Some(why.to_string()),
    }
}

/// Check one promotion to `epoch` (`s`: its first active sample) against
/// the messages confirmed before it; `h`: the node's history through the
/// entry of `epoch`.
fn check_promotion(s: &Sample, epoch: u64, h: &[(u64, u64, bool)], before: &[Confirmed]) -> Promotion {
    let mut p = Promotion {
        t: s.t1,
        node: s.node.clone(),
        epoch,
        required: before.len(),
        lacking: Vec::new(),
        unchecked: None,
    };
    if h.last().is_some_and(|e| e.2) {
        p.unchecked = Some("forced by an operator".into());
        return p;
    }
    for &(_, id, ids) in before {
        if !ids.iter().any(|&(e, seq)| e < epoch && held(h, e, seq)) {
            p.lacking.push((id.to_string(), ids.to_vec()));
        }
    }
    p
}

/// Whether op `seq` of epoch `e` is in the store whose history is `h` (whose
/// last entry is the epoch being checked, `e` is older): the entry for `e`
/// starts at or before `seq`, and the next entry after it.
fn held(h: &[(u64, u64, bool)], e: u64, seq: u64) -> bool {
    if h.len() >= HISTORY_KEPT && h.first().is_some_and(|first| e < first.0) {
        // Dropped from a long history: cannot be placed; not counted against it.
        return true;
    }
    match h.iter().position(|x| x.0 == e) {
        Some(i) => h[i].1 <= seq && h.get(i + 1).is_some_and(|next| seq < next.1),
        None => false,
    }
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
        for c in self.foreign_confirms.iter().take(5) {
            v.push(format!(
                "{} confirmed {} (sent {}, confirmed {}) while {} was surely active",
                c.by,
                c.id,
                self.at(c.sent),
                self.at(c.confirmed),
                c.active
            ));
        }
        if self.foreign_confirms.len() > 5 {
            v.push(format!(
                "... {} confirms in all by a node while the other was surely active",
                self.foreign_confirms.len()
            ));
        }
        for p in self.promotions.iter().filter(|p| !p.lacking.is_empty()) {
            let (id, ids) = &p.lacking[0];
            let ids: Vec<String> = ids.iter().map(|(e, s)| format!("{e}:{s}")).collect();
            v.push(format!(
                "{} started serving in epoch {} at {} without {} of the {} messages confirmed before, e.g. {id} (delivered as {})",
                p.node,
                p.epoch,
                self.at(p.t),
                p.lacking.len(),
                p.required,
                ids.join(", ")
            ));
        }
        for s in self.settles.iter().filter(|s| s.took_ms.is_none()) {
            v.push(format!(
                "stuck: no node active with the other passive and in sync within {} s of `{}` at {}",
                STUCK_AFTER_US / 1_000_000,
                s.name,
                self.at(s.t)
            ));
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

    /// Promotions checked against what was confirmed before them.
    pub fn promotions_checked(&self) -> usize {
        self.promotions.iter().filter(|p| p.unchecked.is_none()).count()
    }

    /// Promotions of a node that lacked a message confirmed before.
    pub fn promotions_lacking(&self) -> usize {
        self.promotions.iter().filter(|p| !p.lacking.is_empty()).count()
    }

    /// Rounds after which the pair did not come back within 30 s.
    pub fn stuck(&self) -> usize {
        self.settles.iter().filter(|s| s.took_ms.is_none()).count()
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
        let _ = writeln!(s, "confirms inside the other's span: {}", self.foreign_confirms.len());
        let unchecked = self.promotions.len() - self.promotions_checked();
        let _ = writeln!(
            s,
            "promotions lacking confirmed msgs: {} of {} checked{}",
            self.promotions_lacking(),
            self.promotions_checked(),
            if unchecked > 0 { format!(" ({unchecked} not checked)") } else { String::new() }
        );
        if !self.settles.is_empty() {
            let mut took: Vec<f64> = self.settles.iter().filter_map(|s| s.took_ms).collect();
            took.sort_by(f64::total_cmp);
            let _ = writeln!(
                s,
                "stuck after a repair (30 s):      {} of {} rounds; back in median {:.0} ms, max {:.0} ms",
                self.stuck(),
                self.settles.len(),
                took.get(took.len() / 2).copied().unwrap_or(0.0),
                took.last().copied().unwrap_or(0.0)
            );
        }
        let _ = writeln!(s, "errors seen by the application:   {}", self.errors.len());
        if self.disk_refusals > 0 {
            let _ = writeln!(
                s,
                "refused for a nearly full disk:   {} (LimitReached while a disk of the pair was held full)",
                self.disk_refusals
            );
        }
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

#[cfg(test)]
mod tests {
    //! Each invariant against small recorded runs (JSON lines as the lab
    //! writes them) that break it, and against the same run repaired.
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use super::*;

    /// Seconds of the run as wall-clock microseconds (the run starts at 1,000 s).
    fn at(s: f64) -> u64 {
        1_000_000_000 + (s * 1e6) as u64
    }

    fn sample(node: &str, t: f64, role: &str, epoch: u64, in_sync: bool, history: Option<&str>) -> String {
        let h = history.map_or(String::new(), |h| format!(r#","history":{h}"#));
        format!(
            r#"{{"node":"{node}","t0":{},"t1":{},"role":"{role}","epoch":{epoch},"last_op":1,"in_sync":{in_sync},"peer":"up","gateway":true{h}}}"#,
            at(t),
            at(t) + 2_000
        )
    }

    /// Samples every 50 ms from `from` to `to` (seconds).
    fn samples(node: &str, from: f64, to: f64, role: &str, epoch: u64, in_sync: bool) -> Vec<String> {
        let n = ((to - from) / 0.05).round() as usize;
        (0..n).map(|k| sample(node, from + k as f64 * 0.05, role, epoch, in_sync, None)).collect()
    }

    fn sent_ok(id: &str, sent: f64, ok: f64, node: &str) -> Vec<String> {
        vec![
            format!(r#"{{"ev":"sent","t":{},"id":"{id}"}}"#, at(sent)),
            format!(r#"{{"ev":"ok","t":{},"id":"{id}","sent":{},"node":"{node}"}}"#, at(ok), at(sent)),
        ]
    }

    fn recv(id: &str, t: f64, epoch: u64, seq: u64) -> String {
        format!(r#"{{"ev":"recv","t":{},"id":"{id}","redelivered":false,"epoch":{epoch},"seq":{seq}}}"#, at(t))
    }

    fn event(t: f64, name: &str, fault: bool, settle: bool) -> String {
        format!(r#"{{"t":{},"ev":"{name}","fault":{fault},"settle":{settle}}}"#, at(t))
    }

    /// A recorded run: the lab's four files.
    struct Run {
        workload: Vec<String>,
        a: Vec<String>,
        b: Vec<String>,
        events: Vec<String>,
    }

    impl Run {
        /// a active in epoch 1 and b in sync from 0 to 2 s; m0 goes round.
        fn new() -> Run {
            let mut workload = sent_ok("m0", 0.5, 0.51, "a");
            workload.push(recv("m0", 0.52, 1, 3));
            let mut a = vec![sample("a", 0.0, "active", 1, false, Some("[[1,1,false]]"))];
            a.extend(samples("a", 0.05, 2.0, "active", 1, false));
            let mut b = vec![sample("b", 0.0, "passive", 1, true, Some("[[1,1,false]]"))];
            b.extend(samples("b", 0.05, 2.0, "passive", 1, true));
            Run { workload, a, b, events: vec![event(0.0, "lab started", false, false)] }
        }

        fn check(mut self) -> Report {
            self.workload.push(format!(r#"{{"ev":"done","t":{}}}"#, at(100.0)));
            let dir = tempfile::tempdir().unwrap();
            for (name, lines) in [
                ("workload.jsonl", &self.workload),
                ("roles-a.jsonl", &self.a),
                ("roles-b.jsonl", &self.b),
                ("events.jsonl", &self.events),
            ] {
                std::fs::write(dir.path().join(name), lines.join("\n") + "\n").unwrap();
            }
            check(dir.path(), "fixture")
        }
    }

    #[test]
    fn a_pair_that_stays_up_passes() {
        let r = Run::new().check();
        assert!(r.passed(), "{:?}", r.violations());
        assert_eq!(r.promotions_checked(), 1, "a's first active sample counts: {:?}", r.promotions);
    }

    #[test]
    fn both_nodes_answering_active_at_once_is_a_double_active() {
        let mut run = Run::new();
        run.b.extend(samples("b", 2.0, 3.0, "active", 2, false));
        run.a.extend(samples("a", 2.0, 3.0, "active", 1, false));
        let r = run.check();
        assert_eq!(r.double_active.len(), 1, "{:?}", r.double_active);
        assert!(!r.passed());
    }

    #[test]
    fn a_confirm_by_one_node_inside_the_others_active_span_is_a_double_active() {
        // b's samples say nothing (it is frozen), but the producer got a
        // confirm from b while a answered active throughout.
        let mut run = Run::new();
        run.workload.extend(sent_ok("m1", 1.0, 1.2, "b"));
        run.workload.push(recv("m1", 1.3, 1, 9));
        let r = run.check();
        assert_eq!(r.foreign_confirms.len(), 1, "{:?}", r.foreign_confirms);
        assert!(r.violations().iter().any(|v| v.contains("b confirmed m1")), "{:?}", r.violations());

        // Sent before a's span began: b may have confirmed it before a took over.
        let mut run = Run::new();
        run.workload.extend(sent_ok("m1", -0.5, 1.2, "b"));
        run.workload.push(recv("m1", 1.3, 1, 9));
        assert!(run.check().foreign_confirms.is_empty());
    }

    #[test]
    fn a_disk_refusal_counts_apart_only_while_a_disk_was_held_full() {
        let refused = |t: f64| {
            format!(
                r#"{{"ev":"error","t":{},"who":"producer","text":"confirm of m1: broker error LimitReached: the node's disk is nearly full (4096 bytes free, min_free_disk_bytes 268435456)"}}"#,
                at(t)
            )
        };
        // b (the passive) held full from 1.0 to 1.8 s: a refuses meanwhile.
        let mut run = Run::new();
        run.events.push(event(1.0, "disk b full 1048576", true, false));
        run.events.push(event(1.8, "disk b ok", false, true));
        run.workload.push(refused(1.5));
        run.workload.extend(sent_ok("m2", 1.9, 1.92, "a"));
        run.workload.push(recv("m2", 1.93, 1, 5));
        let r = run.check();
        assert_eq!((r.errors.len(), r.disk_refusals), (0, 1), "{:?}", r.errors);
        assert!(r.passed(), "{:?}", r.violations());

        // The same refusal long after the repair, or with no disk held full: an error.
        let mut run = Run::new();
        run.events.push(event(0.2, "disk b full 1048576", true, false));
        run.events.push(event(0.3, "disk b ok", false, true));
        run.workload.push(refused(1.5));
        run.workload.push(refused(3.5));
        let r = run.check();
        assert_eq!((r.errors.len(), r.disk_refusals), (1, 1), "{:?}", r.errors);
        assert!(!r.passed());
    }

    /// Schedule 2 of issue 9: a confirms m1 alone (b frozen, so b's samples
    /// stop), a dies, b promotes to epoch 2 at op 20 (its store ends at op 19)
    /// without m1 (op 50 of epoch 1). m2 reached b only later, by a hand-over
    /// (delivered only as an id of epoch 2).
    fn stale_promotion(b_history: &str) -> Run {
        let mut run = Run::new();
        run.workload.extend(sent_ok("m1", 2.5, 2.6, "a"));
        run.workload.push(recv("m1", 9.0, 1, 50));
        run.workload.extend(sent_ok("m2", 2.7, 2.8, "a"));
        run.workload.push(recv("m2", 9.1, 2, 80));
        run.a.extend(samples("a", 2.0, 4.0, "active-alone", 1, false));
        run.b.push(sample("b", 4.5, "passive", 1, false, None));
        run.b.push(sample("b", 4.55, "active-alone", 2, false, Some(b_history)));
        // Sent after b was last seen passive: not required of it.
        run.workload.extend(sent_ok("m3", 4.52, 4.6, "b"));
        run.workload.push(recv("m3", 9.2, 2, 81));
        run
    }

    #[test]
    fn a_promotion_without_a_message_confirmed_before_it_is_a_violation() {
        let r = stale_promotion("[[1,1,false],[2,20,false]]").check();
        let p = r.promotions.iter().find(|p| p.node == "b").unwrap();
        assert_eq!((p.epoch, p.required), (2, 3), "{p:?}");
        let lacking: Vec<&str> = p.lacking.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(lacking, ["m1", "m2"], "{p:?}");
        assert_eq!(r.promotions_lacking(), 1);
        assert!(r.violations().iter().any(|v| v.contains("b started serving in epoch 2")), "{:?}", r.violations());
    }

    #[test]
    fn a_promotion_holding_every_confirmed_message_passes() {
        // b's store ran to op 59 of epoch 1 when it promoted: m1 (op 50) is
        // in it; m2 was handed over, delivered also with its first id.
        let mut run = stale_promotion("[[1,1,false],[2,60,false]]");
        run.workload.push(recv("m2", 9.3, 1, 51));
        let r = run.check();
        assert_eq!(r.promotions_lacking(), 0, "{:?}", r.promotions);
        assert_eq!(r.promotions_checked(), 2);
        assert!(r.passed(), "{:?}", r.violations());
    }

    #[test]
    fn a_promotion_is_checked_once_its_history_shows_the_epoch() {
        // The first active sample still shows the old history.
        let mut run = stale_promotion("[[1,1,false]]");
        run.b.push(sample("b", 4.6, "active-alone", 2, false, Some("[[1,1,false],[2,20,false]]")));
        let r = run.check();
        let p = r.promotions.iter().find(|p| p.node == "b").unwrap();
        assert!(p.unchecked.is_none() && p.lacking.len() == 2, "{p:?}");
    }

    #[test]
    fn a_forced_promotion_is_exempt() {
        let r = stale_promotion("[[1,1,false],[2,20,true]]").check();
        let p = r.promotions.iter().find(|p| p.node == "b").unwrap();
        assert!(p.unchecked.is_some() && p.lacking.is_empty(), "{p:?}");
        assert_eq!(r.promotions_lacking(), 0);
    }

    #[test]
    fn a_message_of_an_epoch_dropped_from_a_long_history_is_not_held_against_it() {
        let long: Vec<(u64, u64, bool)> = (10..10 + HISTORY_KEPT as u64).map(|e| (e, e * 100, false)).collect();
        assert!(held(&long, 3, 5), "epoch 3 was dropped from the history");
        assert!(held(&long, 10, 1050));
        assert!(!held(&long, 10, 1100), "op 1100 is epoch 11's");
        assert!(!held(&long[..5], 3, 5), "a short history lacks epoch 3");
    }

    #[test]
    fn a_pair_not_back_within_30_s_of_the_last_repair_is_stuck() {
        let mut run = Run::new();
        run.events.push(event(2.0, "restart b", false, true));
        run.a.extend(samples("a", 2.0, 40.0, "active-alone", 1, false));
        run.b.extend(samples("b", 2.5, 40.0, "passive-syncing", 1, false));
        let r = run.check();
        assert_eq!(r.stuck(), 1, "{:?}", r.settles);
        assert!(r.violations().iter().any(|v| v.starts_with("stuck")), "{:?}", r.violations());

        let mut run = Run::new();
        run.events.push(event(2.0, "restart b", false, true));
        run.a.extend(samples("a", 2.0, 40.0, "active", 1, false));
        run.b.extend(samples("b", 2.5, 4.0, "passive-syncing", 1, false));
        run.b.extend(samples("b", 4.0, 40.0, "passive", 1, true));
        let r = run.check();
        assert_eq!(r.stuck(), 0, "{:?}", r.settles);
        let took = r.settles[0].took_ms.unwrap();
        assert!((2000.0..2100.0).contains(&took), "back when b was in sync, 2 s after the repair: {took}");
    }

    #[test]
    fn samples_taken_before_the_repair_do_not_count_as_back() {
        let mut run = Run::new();
        // Stable until 2 s, the repair at 2.2 s, never back after it.
        run.events.push(event(2.2, "thaw b", false, true));
        run.a.extend(samples("a", 2.0, 40.0, "active-alone", 1, false));
        run.b.extend(samples("b", 2.0, 40.0, "waiting", 1, false));
        assert_eq!(run.check().stuck(), 1);
    }
}
