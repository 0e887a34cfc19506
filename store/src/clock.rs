//! The lease clock: milliseconds of `CLOCK_BOOTTIME`.
//!
//! Leases and every timeout that guards them count time the host spent
//! suspended (DESIGN.md section 4): `CLOCK_MONOTONIC`, behind
//! `std::time::Instant`, stops during a suspend, so a resumed active would
//! see no gap and keep serving while its peer has taken over.

/// Milliseconds since boot, suspended time included.
pub fn lease_now_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (t.tv_sec as u64).saturating_mul(1000) + (t.tv_nsec as u64) / 1_000_000
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_lease_clock_runs_forward_with_instant() {
        let (a, i) = (super::lease_now_ms(), std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (b, e) = (super::lease_now_ms(), i.elapsed().as_millis() as u64);
        assert!(b >= a + 19 && b <= a + e + 5, "boottime advanced {} ms, Instant {e} ms", b - a);
    }
}
