//! `cable-lab demo`: the lab with a chatty producer and consumer, walked
//! through the faults an operator fears, one line per event: who is
//! active, what the client saw, how long it took, and at the end how many
//! confirmed messages were lost (0).

use std::time::{Duration, Instant};

use anyhow::bail;

use super::lab::{Lab, LabOptions, Node};
use super::monitor::Sample;
use super::net::{self, Cable};
use super::operator::describe;
use super::workload::Workload;

struct Demo {
    lab: Lab,
    load: Workload,
    start: Instant,
}

impl Demo {
    fn say(&self, line: impl std::fmt::Display) {
        println!("[{:6.2}s] {line}", self.start.elapsed().as_secs_f64());
    }

    /// Print what happened since the last call: role changes, client events.
    fn pump(&mut self) -> anyhow::Result<()> {
        self.lab.refresh()?;
        for (_, node, from, to) in self.lab.role_changes() {
            self.say(format!("    {}: {from} -> {to}", node.name()));
        }
        for (_, text) in self.load.new_client_events() {
            self.say(format!("    client {text}"));
        }
        Ok(())
    }

    /// Follow events until `pred` holds on samples taken after `since`.
    fn until(
        &mut self,
        what: &str,
        since: u64,
        timeout: Duration,
        pred: impl Fn(&Sample, &Sample) -> bool,
    ) -> anyhow::Result<Duration> {
        let begun = Instant::now();
        loop {
            self.pump()?;
            if let (Some(a), Some(b)) = (self.lab.latest(Node::A, since), self.lab.latest(Node::B, since)) {
                if pred(a, b) {
                    return Ok(begun.elapsed());
                }
            }
            if begun.elapsed() > timeout {
                bail!("not reached within {timeout:?}: {what}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Let time pass, following events.
    fn hold(&mut self, d: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.pump()?;
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(())
    }

    /// Wait for the client's first confirm of a message sent after `t`.
    fn client_recovered(&mut self, t: u64, fault: &str) -> anyhow::Result<()> {
        let took = self.load.wait_confirm_after(t, Duration::from_secs(40))?;
        self.pump()?;
        self.say(format!(
            "==> the client's first confirmed send after {fault}: {:.0} ms after it ({} confirmed so far)",
            took.as_secs_f64() * 1e3,
            self.load.confirmed()
        ));
        Ok(())
    }

    fn roles(&self) -> String {
        format!(
            "{} | {}",
            describe(Node::A, self.lab.samples(Node::A).last()),
            describe(Node::B, self.lab.samples(Node::B).last())
        )
    }
}

fn active(s: &Sample) -> bool {
    s.role() == "active"
}

/// Run the demo; `Ok(false)` if the checker found a violation.
pub fn run(opts: LabOptions) -> anyhow::Result<bool> {
    let start = Instant::now();
    println!(
        "building the lab: namespaces {p}-sw (the switch), {p}-gw (the gateway, answers ping), {p}-a, {p}-b (the pair), {p}-client",
        p = format!("{}-{}", net::PREFIX, opts.tag)
    );
    println!(
        "  a {} and b {} on the switch, HA cable {} <-> {}, gateway icmp://{}, client host {}",
        net::A_IP,
        net::B_IP,
        net::A_HA_IP,
        net::B_HA_IP,
        net::GATEWAY_IP,
        net::CLIENT_IP
    );
    let mut lab = Lab::start(opts)?;
    let since = super::proc::now_us();
    lab.wait_stable(Node::A, since, Duration::from_secs(30))?;
    lab.wait("both nodes see the gateway", since, Duration::from_secs(30), |a, b| {
        a.gateway == Some(true) && b.gateway == Some(true)
    })?;
    let mut args = lab.workload_args();
    args.rate = 100;
    let load = lab.start_workload(&args)?;
    let mut d = Demo { lab, load, start };
    d.say(format!("pair up: {}", d.roles()));
    d.say("client host: a producer (100 persistent messages/s, confirmed) and a consumer, both given a and b");
    d.hold(Duration::from_secs(2))?;

    // 1. A's switch cable.
    d.say("PULL a's switch cable (a still sees b over the HA cable, but has lost the gateway)");
    let t = d.lab.pull(&[Cable::ASwitch])?;
    let took = d.until("b active", t, Duration::from_secs(20), |_, b| active(b))?;
    d.say(format!("==> b is active {:.0} ms after the pull: a handed over in order", took.as_secs_f64() * 1e3));
    d.client_recovered(t, "the pull")?;
    d.hold(Duration::from_secs(2))?;
    d.say("REPLUG a's switch cable (failback = auto: a is preferred)");
    let t = d.lab.replug(&[Cable::ASwitch])?;
    let took = d.until("a active again", t, Duration::from_secs(30), |a, b| active(a) && b.is_in_sync_passive())?;
    d.say(format!("==> a caught up and took the role back, {:.1} s after the replug", took.as_secs_f64()));
    d.client_recovered(t, "the failback")?;

    // 2. The HA cable alone.
    d.hold(Duration::from_secs(1))?;
    d.say("PULL the HA cable alone (the pair still sees itself over the client network)");
    let t = d.lab.pull(&[Cable::Ha])?;
    d.client_recovered(t, "the pull")?;
    d.hold(Duration::from_secs(4))?;
    d.say(format!("==> no role change after 4 s: {}", d.roles()));
    let t = d.lab.replug(&[Cable::Ha])?;
    d.say("REPLUG the HA cable");
    d.client_recovered(t, "the replug")?;

    // 3. The gateway.
    d.hold(Duration::from_secs(1))?;
    d.say("PULL the gateway (both nodes lose it at once: nothing should move)");
    let t = d.lab.pull(&[Cable::Gateway])?;
    d.until("both see the gateway gone", t, Duration::from_secs(10), |a, b| {
        a.gateway == Some(false) && b.gateway == Some(false)
    })?;
    d.hold(Duration::from_secs(3))?;
    d.say(format!("==> no role change: {}", d.roles()));
    let t = d.lab.replug(&[Cable::Gateway])?;
    d.say("REPLUG the gateway");
    d.until("both see the gateway", t, Duration::from_secs(10), |a, b| {
        a.gateway == Some(true) && b.gateway == Some(true)
    })?;

    // 4. kill -9 of the active.
    d.hold(Duration::from_secs(1))?;
    d.say("KILL -9 a (the active; its host stays up, so b sees the process gone at once)");
    let t = d.lab.kill(&[Node::A]);
    let took = d.until("b active", t, Duration::from_secs(20), |_, b| b.is_active())?;
    d.say(format!("==> b is active {:.0} ms after the kill", took.as_secs_f64() * 1e3));
    d.client_recovered(t, "the kill")?;
    d.hold(Duration::from_secs(2))?;
    d.say("RESTART a: it comes back passive, catches up, and takes the role back");
    let t = d.lab.restart(Node::A)?;
    let took = d.until("a active again", t, Duration::from_secs(30), |a, b| active(a) && b.is_in_sync_passive())?;
    d.say(format!("==> a is active again {:.1} s after the restart", took.as_secs_f64()));
    d.client_recovered(t, "the failback")?;
    d.hold(Duration::from_secs(1))?;

    d.say("stopping the load; the consumer drains the queue");
    d.load.stop(Duration::from_secs(120))?;
    d.pump()?;
    let report = d.lab.report("demo");
    d.say(format!(
        "confirmed {} | received {} distinct | duplicates {} | two actives at once: {} | errors seen by the app: {} | messages lost: {}",
        report.confirmed,
        report.received,
        report.duplicates,
        report.double_active.len(),
        report.errors.len(),
        report.lost.len()
    ));
    for v in report.violations() {
        d.say(format!("VIOLATION: {v}"));
    }
    d.say("demo done; tearing the lab down");
    Ok(report.passed())
}
