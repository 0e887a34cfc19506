//! Library part of the twinmq example programs: [`lab`], the loopback pair
//! used by the demo and `failover-bench` (and the timings and re-exec every
//! lab shares), [`netlab`], the network-namespace cable-pull lab used by
//! `cable-lab` and by `tests/cable_pull.rs`, and [`faultfs`], the
//! fault-injecting FUSE passthrough that gives a broker a failing disk.

pub mod faultfs;
pub mod lab;
pub mod netlab;
