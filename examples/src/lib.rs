//! Library part of the twinmq example programs: [`lab`], the loopback pair
//! used by the demo and `failover-bench` (and the timings and re-exec every
//! lab shares), and [`netlab`], the network-namespace cable-pull lab used by
//! `cable-lab` and by `tests/cable_pull.rs`.

pub mod lab;
pub mod netlab;
