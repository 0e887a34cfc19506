//! The cable-pull lab: each machine of a real deployment is its own Linux
//! network namespace, and faults are pulled cables, killed and frozen
//! processes.
//!
//! ```text
//!                       tmqlab-<tag>-sw: bridge br0 (the switch, 10.203.0.0/24)
//!        port-a        port-b          port-gw              port-client
//!          |             |                |                      |
//!   eth0 10.203.0.1  eth0 10.203.0.2  eth0 10.203.0.254     eth0 10.203.0.100
//!   [ -a: broker A ] [ -b: broker B ] [ -gw: the gateway ]  [ -client: workload ]
//!   ha0 10.203.1.1 ===== ha0 10.203.1.2      answers ping and TCP 5599
//!        the dedicated HA cable (10.203.1.0/30)
//! ```
//!
//! - [`net`]: namespaces, cables, pull/replug/netem, teardown (Drop, signals,
//!   `cable-lab clean`);
//! - [`lab`]: the processes (brokers, gateway listener, role monitors),
//!   process faults, waits on reported roles, the event log;
//! - [`monitor`]: the role monitor beside each broker;
//! - [`workload`]: producer and consumer on the client host;
//! - [`checker`]: lost / phantom / duplicates / two actives / recovery times;
//! - [`operator`]: `cable-lab up` and its commands; [`demo`]: `cable-lab demo`;
//! - [`nemesis`]: `cable-lab nemesis`, every fault in a seeded random order.
//!
//! Only root can build it (`ip netns`); [`net::preflight`] says why not.

pub mod checker;
pub mod demo;
pub mod lab;
pub mod monitor;
pub mod nemesis;
pub mod net;
pub mod operator;
pub mod proc;
pub mod workload;
