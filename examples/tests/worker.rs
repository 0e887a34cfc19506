//! The example worker (examples/src/worker.rs) against a real pair on
//! loopback: its demo kills the active node while the worker is half way
//! through the orders; this test reads the worker's ledger itself and
//! checks that every confirmed order is in it exactly once.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashSet;
use std::process::Command;

#[test]
fn the_worker_rides_a_kill_of_the_active_and_applies_every_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.txt");
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["--demo", "--orders", "1500", "--ledger"])
        .arg(&ledger)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("kill -9 node-a") && stdout.contains("node-b is active"), "{stdout}");
    let text = std::fs::read_to_string(&ledger).unwrap();
    let orders: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
    let distinct: HashSet<&str> = orders.iter().copied().collect();
    assert_eq!(orders.len(), distinct.len(), "an order applied twice");
    let expected: HashSet<String> = (0..1500).map(|i| format!("order-{i}")).collect();
    assert_eq!(distinct, expected.iter().map(String::as_str).collect::<HashSet<_>>(), "every order, nothing else");
}
