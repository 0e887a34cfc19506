//! The cable-pull scenarios (issue 4): a real pair in network namespaces,
//! a producer and a consumer on a client host, faults on cables and
//! processes, and the checker's invariants after each run: no confirmed
//! message lost, nothing received that was never sent, never two actives,
//! no error reaching the application, every fault recovered.
//!
//! Each scenario builds its own lab (A active at the start), runs alone (a
//! lock: two labs at once would fight over 2 cores), waits for states by
//! polling the role monitors with deadlines, and prints the checker's
//! report on stderr (uncaptured, so CI logs show it). Without root or
//! network namespaces each test prints `SKIPPED: <why>` and returns.
//! Files of a failed run stay in `target/tmp/cable-lab/<tag>/`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use twinmq_examples::netlab::lab::{Lab, LabOptions, Node, Timings};
use twinmq_examples::netlab::monitor::Sample;
use twinmq_examples::netlab::net::{self, Cable, Unavailable};
use twinmq_examples::netlab::proc::now_us;
use twinmq_examples::netlab::workload::Workload;

const EXE: &str = env!("CARGO_BIN_EXE_cable-lab");
/// Long enough for the slowest expected state change (a lease plus a failback).
const WAIT: Duration = Duration::from_secs(30);
/// Past `peer_timeout` + `takeover_delay` (2.5 s with the default timings):
/// whatever a fault would make happen has happened by then.
const SETTLE: Duration = Duration::from_secs(4);

static SERIAL: Mutex<()> = Mutex::new(());

/// Straight to the process's stderr: the test harness captures `eprintln!`
/// of passing tests, and these lines must show in CI logs.
fn loud(text: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{text}");
}

struct Scenario {
    lab: Lab,
    load: Workload,
    _serial: MutexGuard<'static, ()>,
}

/// Build a lab, wait for A active and B in sync, start the load; run `body`;
/// stop the load, check, print the report, and fail on any violation.
fn scenario(title: &str, failback_auto: bool, body: impl FnOnce(&mut Scenario) -> anyhow::Result<()>) {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = net::preflight() {
        loud(&format!("SKIPPED: {title}: {e}"));
        return;
    }
    let tag = LabOptions::unique_tag();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cable-lab").join(&tag);
    let _ = std::fs::remove_dir_all(&dir);
    let opts = LabOptions { tag, dir: dir.clone(), exe: EXE.into(), timings: Timings::DEFAULT, failback_auto };
    let started = Instant::now();
    let mut lab = match Lab::start(opts) {
        Ok(lab) => lab,
        Err(e) if e.downcast_ref::<Unavailable>().is_some() => {
            loud(&format!("SKIPPED: {title}: {e}"));
            return;
        }
        Err(e) => panic!("{title}: the lab did not start: {e:#}"),
    };
    let setup = lab.wait_stable(Node::A, 0, WAIT).and_then(|()| lab.start_workload(&lab.workload_args()));
    let load = match setup {
        Ok(load) => load,
        Err(e) => panic!("{title}: the pair did not come up: {e:#}\nfiles: {}", dir.display()),
    };
    let mut s = Scenario { lab, load, _serial: serial };
    let outcome = body(&mut s).and_then(|()| s.load.stop(Duration::from_secs(120)));
    let report = s.lab.report(title);
    loud(&format!("{report}files: {}; scenario took {:.1} s", dir.display(), started.elapsed().as_secs_f64()));
    loud(&format!("summary | {}", report.summary_line()));
    if let Err(e) = outcome {
        panic!("{title}: {e:#}\nfiles: {}", dir.display());
    }
    assert!(report.passed(), "{title}: {:?}\nfiles: {}", report.violations(), dir.display());
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

impl Scenario {
    fn confirm_after(&mut self, t: u64) -> anyhow::Result<Duration> {
        self.load.wait_confirm_after(t, WAIT)
    }

    /// Samples of `node` since `t` (read so far).
    fn since(&self, node: Node, t: u64) -> Vec<Sample> {
        self.lab.samples(node).iter().filter(|s| s.t0 >= t).cloned().collect()
    }

    /// Every sample of `node` since `t` that answered has a role satisfying `ok`.
    fn always(&self, node: Node, t: u64, what: &str, ok: impl Fn(&Sample) -> bool) -> anyhow::Result<()> {
        let samples = self.since(node, t);
        anyhow::ensure!(!samples.is_empty(), "no samples of {} since the fault", node.name());
        if let Some(bad) = samples.iter().find(|s| s.role.is_some() && !ok(s)) {
            anyhow::bail!("{} was not {what}: {bad:?}\n{}", node.name(), self.lab.log_tail(node, 30));
        }
        Ok(())
    }
}

/// Serving nothing: passive, isolated, or waiting for its peer.
fn passive_or_isolated(s: &Sample) -> bool {
    s.role().starts_with("passive") || s.role() == "isolated" || s.role() == "waiting"
}

/// 1. A's switch cable: A still sees B over the HA cable but lost the
///    gateway, B still sees it: an orderly handover to B; clients follow.
#[test]
fn s1_a_switch_cable_pulled_hands_the_role_to_b_in_order() {
    scenario("1: A's switch cable pulled", false, |s| {
        s.lab.hold(Duration::from_secs(1))?;
        let t = s.lab.pull(&[Cable::ASwitch])?;
        s.lab.wait("b active, a passive (handover)", t, WAIT, |a, b| b.role() == "active" && a.role() == "passive")?;
        let log = s.lab.log_tail(Node::A, 200);
        anyhow::ensure!(log.contains("left the client network"), "a handed over for its lost gateway:\n{log}");
        s.confirm_after(t)?;
        s.lab.hold(Duration::from_secs(2))?;
        let t = s.lab.replug(&[Cable::ASwitch])?;
        // failback = manual: B keeps the role, A is its in-sync passive.
        s.lab.wait_stable(Node::B, t, WAIT)?;
        s.confirm_after(t)?;
        Ok(())
    });
}

/// 2. The HA cable alone: no role change (the peer is still seen over the
///    client network).
#[test]
fn s2_ha_cable_pulled_alone_changes_no_role() {
    scenario("2: HA cable pulled alone", false, |s| {
        s.lab.hold(Duration::from_secs(1))?;
        let t = s.lab.pull(&[Cable::Ha])?;
        s.lab.hold(SETTLE)?;
        s.always(Node::A, t, "active", |x| x.role() == "active")?;
        s.always(Node::B, t, "passive", |x| x.role().starts_with("passive"))?;
        let (_, b) = s.lab.wait("b sees a over the client network", t, WAIT, |_, b| b.peer.as_deref() == Some("up"))?;
        anyhow::ensure!(b.role() == "passive", "b: {b:?}");
        s.confirm_after(t)?;
        let t = s.lab.replug(&[Cable::Ha])?;
        s.lab.wait_stable(Node::A, t, WAIT)?;
        s.always(Node::A, t, "active", |x| x.role() == "active")?;
        s.confirm_after(t)?;
        Ok(())
    });
}

/// 3. The gateway alone: no change.
#[test]
fn s3_gateway_pulled_alone_changes_nothing() {
    scenario("3: gateway pulled alone", false, |s| {
        s.lab.hold(Duration::from_secs(1))?;
        let t = s.lab.pull(&[Cable::Gateway])?;
        s.lab
            .wait("both see the gateway gone", t, WAIT, |a, b| a.gateway == Some(false) && b.gateway == Some(false))?;
        s.lab.hold(SETTLE)?;
        s.always(Node::A, t, "active", |x| x.role() == "active")?;
        s.always(Node::B, t, "passive", |x| x.role().starts_with("passive"))?;
        s.confirm_after(t)?;
        let t = s.lab.replug(&[Cable::Gateway])?;
        s.lab.wait("both see the gateway", t, WAIT, |a, b| a.gateway == Some(true) && b.gateway == Some(true))?;
        s.always(Node::A, t, "active", |x| x.role() == "active")?;
        s.confirm_after(t)?;
        Ok(())
    });
}

/// 4. A fully cut off (switch and HA cables): A steps down, B takes over
///    after the takeover delay; replugged, A comes back passive, catches up
///    and (failback = auto) takes the role back.
#[test]
fn s4_a_cut_off_steps_down_and_takes_the_role_back_after_the_replug() {
    scenario("4: A cut off (switch + HA), failback auto", true, |s| {
        s.lab.hold(Duration::from_secs(1))?;
        let t = s.lab.pull(&[Cable::ASwitch, Cable::Ha])?;
        s.lab.wait("a stepped down, b active", t, WAIT, |a, b| passive_or_isolated(a) && b.is_active())?;
        s.confirm_after(t)?;
        let cut = now_us();
        s.lab.hold(Duration::from_secs(3))?;
        s.always(Node::A, cut, "serving nothing while cut off", passive_or_isolated)?;
        let t = s.lab.replug(&[Cable::ASwitch, Cable::Ha])?;
        s.lab.wait_stable(Node::A, t, WAIT)?;
        // Back as passive first, then active: never straight to active.
        let back = s.since(Node::A, t);
        let first_active = back.iter().position(Sample::is_active).unwrap_or(back.len());
        anyhow::ensure!(
            back[..first_active].iter().any(|x| x.role().starts_with("passive")),
            "a was not passive before it took the role back: {:?}",
            &back[..first_active]
        );
        s.confirm_after(t)?;
        Ok(())
    });
}

/// 5. No majority anywhere: the gateway, then the HA cable and B's switch
///    cable: both nodes end passive and serve nothing; the gateway back
///    brings A back as active (the last active, and it sees the gateway).
#[test]
fn s5_no_majority_anywhere_serves_nothing_until_the_peers_meet_again() {
    scenario("5: no majority (gateway, then HA + B's switch cable)", false, |s| {
        s.lab.hold(Duration::from_secs(1))?;
        let t = s.lab.pull(&[Cable::Gateway])?;
        s.lab
            .wait("both see the gateway gone", t, WAIT, |a, b| a.gateway == Some(false) && b.gateway == Some(false))?;
        s.lab.hold(Duration::from_secs(2))?;
        s.always(Node::A, t, "active", |x| x.role() == "active")?;
        let t = s.lab.pull(&[Cable::Ha, Cable::BSwitch])?;
        s.lab.wait("both passive", t, WAIT, |a, b| passive_or_isolated(a) && passive_or_isolated(b))?;
        let none = now_us();
        s.lab.hold(Duration::from_secs(3))?;
        s.always(Node::A, none, "serving nothing", passive_or_isolated)?;
        s.always(Node::B, none, "serving nothing", passive_or_isolated)?;
        // The gateway returns, but A cannot know whether B (in sync when they
        // lost each other) took over meanwhile: it waits, and says so.
        let t = s.lab.replug(&[Cable::Gateway])?;
        s.lab.wait("a waiting", t, WAIT, |a, _| a.role() == "waiting")?;
        s.lab.hold(Duration::from_secs(2))?;
        s.always(Node::A, t, "not serving", |x| !x.is_active())?;
        s.always(Node::B, t, "not serving", |x| !x.is_active())?;
        // Once they see each other again, the newest store serves.
        let t = s.lab.replug(&[Cable::Ha, Cable::BSwitch])?;
        s.lab.wait_stable(Node::A, t, WAIT)?;
        s.confirm_after(t)?;
        Ok(())
    });
}

/// 6. A frozen (SIGSTOP) past the takeover delay: B takes over; A, resumed,
///    never serves as a second active.
#[test]
fn s6_a_frozen_past_the_takeover_delay_never_serves_as_a_second_active() {
    scenario("6: A frozen (SIGSTOP) 4 s, then resumed", false, |s| {
        s.lab.hold(Duration::from_secs(1))?;
        let t = s.lab.freeze(Node::A)?;
        s.lab.wait("b active", t, WAIT, |_, b| b.is_active())?;
        s.confirm_after(t)?;
        let frozen_for = Duration::from_micros(now_us() - t);
        s.lab.hold(Duration::from_secs(4).saturating_sub(frozen_for))?;
        let t = s.lab.thaw(Node::A)?;
        s.lab.wait_stable(Node::B, t, WAIT)?;
        s.always(Node::A, t, "anything but active", |x| !x.is_active())?;
        s.confirm_after(t)?;
        Ok(())
    });
}

/// 7. kill -9 of whichever node is active, 10 rounds, the killed node
///    restarted each time.
#[test]
fn s7_kill_of_the_active_ten_times_loses_nothing() {
    scenario("7: kill -9 of the active, 10 rounds", false, |s| {
        let mut since = 0;
        for round in 1..=10 {
            let active = s.lab.wait_any_stable(since, WAIT)?;
            s.confirm_after(since)?;
            s.lab.hold(Duration::from_millis(500))?;
            let t = s.lab.kill(&[active]);
            let other = active.other();
            s.lab.wait(&format!("round {round}: {} active", other.name()), t, WAIT, |a, b| {
                if other == Node::A {
                    a.is_active()
                } else {
                    b.is_active()
                }
            })?;
            s.confirm_after(t)?;
            since = s.lab.restart(active)?;
        }
        s.lab.wait_any_stable(since, WAIT)?;
        s.confirm_after(since)?;
        Ok(())
    });
}

/// 8. A flapping cable: A's switch cable pulled and replugged every few
///    hundred milliseconds for 20 s.
#[test]
fn s8_a_flapping_switch_cable_for_20_s() {
    // failback = auto: A takes the role back whenever its cable stays up long
    // enough, so the flapping keeps hitting the active node.
    scenario("8: A's switch cable flapping for 20 s, failback auto", true, |s| {
        s.lab.hold(Duration::from_secs(1))?;
        let (down, up) = ([200u64, 400, 800, 1500, 300, 600], [300u64, 600, 200]);
        let begun = Instant::now();
        let mut last = 0;
        for i in 0.. {
            if begun.elapsed() > Duration::from_secs(20) {
                break;
            }
            s.lab.pull(&[Cable::ASwitch])?;
            s.lab.hold(Duration::from_millis(down[i % down.len()]))?;
            last = s.lab.replug(&[Cable::ASwitch])?;
            s.lab.hold(Duration::from_millis(up[i % up.len()]))?;
        }
        s.lab.wait_stable(Node::A, last, WAIT)?;
        s.confirm_after(last)?;
        Ok(())
    });
}

/// 9. Both nodes killed at the same moment during confirmed sends, then
///    restarted: every confirmed message is still there, and the pair
///    elects the node with the newest store.
#[test]
fn s9_both_nodes_killed_at_once_keep_every_confirmed_message() {
    scenario("9: kill -9 of both nodes at once, restart", false, |s| {
        s.lab.hold(Duration::from_secs(2))?;
        s.lab.kill(&[Node::A, Node::B]);
        s.lab.hold(Duration::from_millis(500))?;
        let t = s.lab.restart(Node::A)?;
        s.lab.restart(Node::B)?;
        let winner = s.lab.wait_any_stable(t, WAIT)?;
        // Each store as it was opened at the restart (the election takes a
        // few ms, before any status poll): `store opened ... epoch=E next_seq=N`.
        let store = |n: Node| -> anyhow::Result<(u64, u64)> {
            let log = s.lab.log(n);
            let line = log
                .lines()
                .find(|l| l.contains("store opened"))
                .ok_or_else(|| anyhow::anyhow!("no `store opened` line in {}'s log", n.name()))?;
            let field = |k: &str| -> anyhow::Result<u64> {
                let v = line.split_whitespace().find_map(|w| w.strip_prefix(k));
                v.and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("no {k} in `{line}`"))
            };
            Ok((field("epoch=")?, field("next_seq=")?))
        };
        let (sw, sl) = (store(winner)?, store(winner.other())?);
        loud(&format!(
            "scenario 9: stores at the restart (epoch, next seq): {} {sw:?}, {} {sl:?}; elected {}",
            winner.name(),
            winner.other().name(),
            winner.name()
        ));
        anyhow::ensure!(
            sw > sl || (sw == sl && winner == Node::A),
            "elected {} with the store {sw:?} over {}'s {sl:?} (ties go to a, the higher priority)",
            winner.name(),
            winner.other().name()
        );
        let log = s.lab.log(winner);
        anyhow::ensure!(log.contains("newest store"), "the winner says why it won:\n{log}");
        s.confirm_after(t)?;
        Ok(())
    });
}
