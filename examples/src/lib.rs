//! Library part of the twinmq example programs: [`netlab`], the
//! network-namespace cable-pull lab used by `cable-lab` and by
//! `tests/cable_pull.rs`. (The loopback demo and `failover-bench` are plain
//! binaries with their own `lab` module.)

pub mod netlab;
