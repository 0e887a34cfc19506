//! The pair under deterministic simulation: thousands of seeds, each a
//! different order of faults (see `twinmq_ha::sim`). A failing seed prints
//! its trace and replays exactly: `TWINMQ_SIM_SEED=N cargo test -p twinmq-ha --test sim`.

use twinmq_ha::sim::{run, SimConfig};

fn seeds() -> (u64, u64) {
    if let Ok(s) = std::env::var("TWINMQ_SIM_SEED") {
        let s: u64 = s.parse().expect("TWINMQ_SIM_SEED is a number");
        return (s, s + 1);
    }
    let n: u64 = std::env::var("TWINMQ_SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    (1, n + 1)
}

fn run_range(cfg: &SimConfig, from: u64, to: u64) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let mut seed = from + t;
                while seed < to {
                    if let Err(v) = run(seed, &cfg, false) {
                        failures.push(v.seed);
                    }
                    seed += threads;
                }
                failures
            })
        })
        .collect();
    let mut failed: Vec<u64> = handles.into_iter().flat_map(|h| h.join().expect("sim thread")).collect();
    failed.sort_unstable();
    if let Some(first) = failed.first() {
        let v = run(*first, cfg, true).expect_err("a failing seed fails again when replayed");
        panic!(
            "{} of {} seeds failed ({:?}...); the first, replayed:\n{v}",
            failed.len(),
            to - from,
            &failed[..failed.len().min(20)]
        );
    }
}

#[test]
fn replicated_pair_keeps_every_confirmed_message_under_every_fault_order() {
    let (from, to) = seeds();
    run_range(&SimConfig::default(), from, to);
}

#[test]
fn seeds_that_once_broke_an_invariant_hold() {
    // Found by long `pair-sim` runs; each replays its schedule exactly (while
    // the simulator's model and the pair's code do not change their dice).
    // 26989: a follower restarted right after a snapshot that cut off its own
    //   newer ops must start from the snapshot's end (the model kept the old
    //   end). 33368: a primary whose disk failed as its follower caught up
    //   told it so without having made "not serving alone" durable; it came
    //   back alone after the follower had taken over.
    // 75023: a node that saw its peer serve (forced, never attaching it)
    //   kept its claim to have served last, took over without being in sync.
    // 115283: the checker's own: a forced promotion whose meta reached the
    //   disk before the node died counts as the operator's order (what the
    //   wiped node lacked is what `--force` said may be lost).
    // 122091: a candidate whose floor rose past the voted epoch promoted
    //   one higher, where the peer (forced meanwhile) served too.
    // 150822: a passive kept counting itself in sync after its active had
    //   confirmed alone and then failed (its heartbeat said it served nothing).
    // 171514: the checker's own: a partition repaired and cut again at once
    //   is one split (the takeover rests on the silence of both).
    // 226793: a forced promotion ordered while the peer was gone, carried out
    //   seconds later (the store was busy) beside the peer, active again.
    for seed in [26989, 33368, 75023, 115283, 122091, 150822, 171514, 226793] {
        if let Err(v) = run(seed, &SimConfig::default(), true) {
            panic!("{v}");
        }
    }
}

#[test]
fn local_durability_pair_loses_nothing_once_both_return() {
    // `local` in a pair is asynchronous replication: a takeover may serve
    // without the newest confirms, which come back (handed over) when the old
    // active returns; the checks at promotion are off, convergence is not.
    let (from, to) = seeds();
    let n = (to - from).div_ceil(4);
    run_range(&SimConfig { durability: twinmq_store::Durability::Local, ..SimConfig::default() }, from, from + n);
}

use twinmq_ha::sim::{run_script, Fault::*};

/// Run a schedule under a few seeds (latencies, timings and publishes
/// differ); the longest wait for a confirm in each.
fn script(name: &str, steps: &[(u64, twinmq_ha::sim::Fault)]) -> Vec<twinmq_ha::sim::SimStats> {
    (1..=20)
        .map(|seed| match run_script(seed, steps, false) {
            Ok(stats) => stats,
            Err(_) => {
                let v = run_script(seed, steps, true).expect_err("a failing seed fails again when replayed");
                panic!("{name}, seed {seed}:\n{v}");
            }
        })
        .collect()
}

#[test]
fn issue_9_schedule_1_a_node_restarted_alone_after_its_peer_took_over_waits() {
    // m0 on a; kill a: b takes over, m1; kill b, restart b alone: it was
    // active alone, it serves, m2; kill b, restart a alone: it must wait for b
    // (b took over after it stopped); restart b: nothing confirmed is missing.
    let _ = script(
        "schedule 1",
        &[
            (1500, Kill(0)),
            (3500, Kill(1)),
            (4000, Restart(1)),
            (6000, Kill(1)),
            (6500, Restart(0)),
            (9000, Restart(1)),
        ],
    );
}

#[test]
fn issue_9_schedule_2_a_stale_passive_never_promotes() {
    // b frozen past peer_timeout: a declares it down and confirms alone (s1);
    // kill a, thaw b: b must not serve without s1; a returns: all converge.
    let _ = script("schedule 2", &[(1500, Freeze(1, 3000)), (4000, Kill(0)), (7000, Restart(0))]);
}

#[test]
fn an_active_cut_off_from_everything_does_not_come_back_alone_over_a_takeover() {
    // a loses the gateway and every path: b takes over and confirms; b dies;
    // a's cables come back: a must not serve without what b confirmed.
    let _ = script(
        "isolated active",
        &[
            (1500, LoseGateway(0)),
            (1500, Cut(0)),
            (1500, Cut(1)),
            (4000, Kill(1)),
            (4500, Gateway(0)),
            (4500, Repair(0)),
            (4500, Repair(1)),
            (8000, Restart(1)),
        ],
    );
}

#[test]
fn an_active_that_sees_neither_peer_nor_gateway_confirms_nothing_alone() {
    // a loses the gateway and every path to b at once, while publishes wait
    // for b; b, seeing the gateway, takes over after takeover_delay. a must
    // not confirm what waited for b single-copy meanwhile (it has no
    // majority): killed before the cables return, it could never hand it over.
    // The gateway goes a little after the paths: a's lease (from the last
    // gateway answer) outlasts the moment it declares b down.
    for gw_later in [20, 50, 80] {
        let _ = script(
            "active cut off from everything, then killed",
            &[
                (1500, Cut(0)),
                (1500, Cut(1)),
                (1500 + gw_later, LoseGateway(0)),
                (3500, Kill(0)),
                (5000, Gateway(0)),
                (5000, Repair(0)),
                (5000, Repair(1)),
                (6000, Restart(0)),
            ],
        );
    }
}

#[test]
fn a_node_that_handed_the_role_over_and_took_it_back_does_not_wait_on_the_old_hand_over() {
    // a leaves the client network and hands over to b; b dies, a takes the
    // role back (epoch 3). a is then cut off from everything and steps down;
    // b restarts (it must wait for a). Once the cables return, a has the
    // newest store and is elected at once: the 5 s wait after its hand-over
    // is long over in spirit (the peer took the role, a served again).
    let steps = [
        (1500, LoseGateway(0)),
        (2500, Gateway(0)),
        (3000, Kill(1)),
        (3500, Cut(0)),
        (3500, Cut(1)),
        (3500, LoseGateway(0)),
        (3600, Restart(1)),
        (4000, Repair(0)),
        (4000, Repair(1)),
        (4000, Gateway(0)),
        (8000, Traffic(true)),
    ];
    for s in script("hand-over, then the role back", &steps) {
        // Cut off 500 ms, then an election: well under the 5 s hold-off.
        let bound = 500 + 4 * s.takeover_delay_ms;
        assert!(s.max_confirm_gap_ms <= bound, "no confirm for {} ms (bound {bound})", s.max_confirm_gap_ms);
    }
}

#[test]
fn a_failing_disk_on_either_node_holds_confirms_up_no_longer_than_a_takeover() {
    // Confirms resume on the healthy node within takeover_delay + 1 s of the
    // disk being found failed (at once for an error, after disk_stall_ms for
    // a stall), never hang.
    for (name, steps) in [
        ("active disk fails", vec![(1500, DiskFails(0)), (5000, FixDisk(0))]),
        ("passive disk fails", vec![(1500, DiskFails(1)), (5000, FixDisk(1))]),
        ("active disk stalls", vec![(1500, DiskStalls(0, 3000))]),
        ("passive disk stalls", vec![(1500, DiskStalls(1, 3000))]),
    ] {
        for s in script(name, &steps) {
            let bound = s.disk_stall_ms + s.takeover_delay_ms + 1000;
            assert!(
                s.max_confirm_gap_ms <= bound,
                "{name}: no confirm for {} ms (bound {bound})",
                s.max_confirm_gap_ms
            );
        }
    }
}

#[test]
fn two_claims_to_have_served_last_in_one_epoch_do_not_both_stand() {
    // a dies, b takes over (epoch 2) and dies at once: b served last, so b
    // restarted alone may serve again (the cold-start rule). But a restarts
    // first and the operator forces it, into epoch 2 as well (it cannot know
    // b's); its disk stalls, so it never serves nor attaches b, yet its store
    // now says it served last too. b restarts and hears a in its own epoch:
    // b's claim may be stale, so when a dies b must wait, not serve alone
    // and confirm what a (restarted alone on its own claim) would never see.
    // Seed 75023 of the long run.
    let _ = script(
        "forced promotion over a node that served last",
        &[
            (1500, Kill(0)),
            (1620, Kill(1)),
            (2500, Restart(0)),
            (2600, DiskStalls(0, 2500)),
            (2800, ForcePromote(0)),
            (3000, Restart(1)),
            (5500, Kill(0)),
            (7000, Kill(1)),
            (7200, Restart(0)),
            (9000, Restart(1)),
        ],
    );
}

#[test]
fn a_passive_whose_active_confirmed_without_it_is_no_candidate_even_after_that_active_failed() {
    // Both paths cut for 300 ms (past peer_timeout, mostly short of
    // takeover_delay): b, active, declares a down and confirms alone. Then
    // b's disk fails: it stops serving. The paths come back, then go again:
    // a heard only heartbeats from a b that serves nothing, and must still
    // know it lacks what b confirmed alone: it waits. Seed 150822.
    let _ = script(
        "active confirms alone, then its disk fails",
        &[
            (1000, Switchover),
            (1500, Cut(0)),
            (1500, Cut(1)),
            (1790, DiskFails(1)),
            (1800, Repair(0)),
            (1800, Repair(1)),
            (2300, Cut(0)),
            (2300, Cut(1)),
            (5000, Repair(0)),
            (5000, Repair(1)),
            (6000, FixDisk(1)),
        ],
    );
}

#[test]
fn a_node_frozen_while_its_forced_promotion_was_under_way_does_not_serve_beside_its_peer() {
    // a serves alone (b killed), then dies: a holds the claim to have served
    // last. b restarts and waits; its disk stalls (under disk_stall_ms) as
    // the operator forces it, and the process freezes while the promotion is
    // being made durable. a restarts meanwhile and serves on its claim, in
    // the same epoch. b, thawed, finishes its promotion: it must step down,
    // not serve beside a (review of issue 9). The simulator does not hit the
    // window with these timings (this passes without the fix too); the role
    // core's unit test a_node_frozen_while_its_promotion_was_under_way_*
    // reproduces it. Kept as a neighbour schedule.
    let _ = script(
        "frozen while promoting",
        &[
            (1500, Kill(1)),
            (2500, Kill(0)),
            (3000, Restart(1)),
            (3200, DiskStalls(1, 200)),
            (3210, ForcePromote(1)),
            (3230, Freeze(1, 2500)),
            (3300, Restart(0)),
        ],
    );
}

#[test]
fn a_nearly_full_disk_moves_no_role_in_any_order_of_faults() {
    // A nearly full disk (writes still succeed) on either node: the active
    // refuses new messages (the limit is the pair's: the passive writes every
    // record too); no role moves: as many promotions as without the fault.
    let quiet = script("no fault", &[(5000, Traffic(true))]);
    for (name, steps) in [
        ("a nearly full", &[(1500, DiskNearlyFull(0)), (5000, FixDisk(0))][..]),
        ("b nearly full", &[(1500, DiskNearlyFull(1)), (5000, FixDisk(1))][..]),
        (
            "both nearly full",
            &[(1500, DiskNearlyFull(1)), (1600, DiskNearlyFull(0)), (4000, FixDisk(1)), (5000, FixDisk(0))][..],
        ),
    ] {
        for (seed, (q, f)) in quiet.iter().zip(script(name, steps)).enumerate() {
            assert_eq!(f.promotions, q.promotions, "{name}, seed {}: promotions with and without the fault", seed + 1);
        }
    }
    // Its neighbours, checked for the invariants: the peer killed meanwhile,
    // the passive's disk nearly full then the active killed (b promotes all
    // the same), a switchover while a disk is nearly full.
    let _ = script(
        "a nearly full, b killed",
        &[(1500, Kill(1)), (1600, DiskNearlyFull(0)), (3000, Restart(1)), (6000, FixDisk(0))],
    );
    let _ = script(
        "b nearly full, a killed",
        &[(1500, DiskNearlyFull(1)), (2000, Kill(0)), (4000, Restart(0)), (6000, FixDisk(1))],
    );
    let _ = script("switchover, a nearly full", &[(1500, DiskNearlyFull(0)), (2000, Switchover), (5000, FixDisk(0))]);
}
