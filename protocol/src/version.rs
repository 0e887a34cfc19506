//! Protocol versions and their negotiation, so that a change to the wire can
//! be rolled out one node (or one client) at a time.
//!
//! Every frame carries a version byte (see [`crate::codec`]). A connection
//! starts at [`HANDSHAKE_VERSION`]: the opening frames (a client's `Hello`,
//! the broker's `Welcome` or refusal) are always framed and encoded as
//! version 1, which every release decodes, and they only ever gain fields
//! with serde defaults. The opener states the range of versions it speaks;
//! the other side picks the highest one both speak ([`negotiate`]) and says
//! which; from the next frame on, both frame everything at that version. A
//! peer that states no range predates negotiation and speaks version 1 only
//! ([`VersionRange::V1`], the serde default). No common version: the
//! accepting side answers with a typed error naming both ranges and closes.
//!
//! Pure: no I/O, so that the client handshake (broker and client) and the
//! HA handshake (ha, which has its own range of versions) can use the same
//! rule.

use serde::{Deserialize, Serialize};

/// An inclusive range of protocol versions, `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionRange {
    pub min: u8,
    pub max: u8,
}

impl VersionRange {
    /// Version 1 only: what a peer that sends no range speaks.
    pub const V1: VersionRange = VersionRange { min: 1, max: 1 };

    pub const fn new(min: u8, max: u8) -> VersionRange {
        VersionRange { min, max }
    }

    pub fn contains(&self, version: u8) -> bool {
        (self.min..=self.max).contains(&version)
    }
}

/// A range missing from a frame is that of a peer older than negotiation.
impl Default for VersionRange {
    fn default() -> Self {
        VersionRange::V1
    }
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..={}", self.min, self.max)
        }
    }
}

/// The versions of the client protocol this crate speaks. Raise `max` when
/// a frame changes meaning; raise `min` only once no supported peer needs
/// the old version.
///
/// 2: `Nack` with `delay_ms`, `Terminate`, and `Ack` with a `receipt` or
/// `through` (a broker at 1 would ignore the delay, the receipt and
/// `through` and fail to decode `Terminate`, so a client sends them only
/// on a connection at 2).
pub const SUPPORTED_VERSIONS: VersionRange = VersionRange::new(1, 2);

/// The version the opening frames of every connection are framed in.
pub const HANDSHAKE_VERSION: u8 = 1;

/// The two sides share no protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no common protocol version: this side speaks {ours}, the peer {theirs}")]
pub struct NoCommonVersion {
    pub ours: VersionRange,
    pub theirs: VersionRange,
}

/// The highest version in both `ours` and `theirs`. An empty range (`min >
/// max`) has no version in common with anything.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u8, NoCommonVersion> {
    let (low, high) = (ours.min.max(theirs.min), ours.max.min(theirs.max));
    if low <= high && ours.min <= ours.max && theirs.min <= theirs.max {
        Ok(high)
    } else {
        Err(NoCommonVersion { ours, theirs })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn r(min: u8, max: u8) -> VersionRange {
        VersionRange::new(min, max)
    }

    #[test]
    fn the_highest_common_version_is_chosen() {
        // (ours, theirs, chosen)
        let table = [
            (r(1, 1), r(1, 1), Some(1)),
            (r(1, 3), r(1, 1), Some(1)), // an old peer: version 1
            (r(1, 1), r(1, 3), Some(1)), // a newer peer, seen from the old side
            (r(1, 3), r(2, 5), Some(3)),
            (r(2, 5), r(1, 3), Some(3)), // symmetric
            (r(3, 3), r(1, 5), Some(3)),
            (r(2, 3), r(1, 1), None), // we dropped version 1
            (r(1, 1), r(2, 2), None),
            (r(1, 3), r(3, 1), None), // an empty range
            (r(3, 1), r(1, 3), None),
        ];
        for (ours, theirs, chosen) in table {
            let got = negotiate(ours, theirs);
            assert_eq!(got.ok(), chosen, "ours {ours}, theirs {theirs}");
            if let Err(e) = got {
                assert_eq!(e, NoCommonVersion { ours, theirs });
            }
        }
    }

    #[test]
    fn the_refusal_names_both_ranges() {
        let e = negotiate(r(2, 3), VersionRange::default()).unwrap_err();
        assert_eq!(e.to_string(), "no common protocol version: this side speaks 2..=3, the peer 1");
    }

    #[test]
    fn this_release_speaks_the_handshake_version() {
        assert!(SUPPORTED_VERSIONS.contains(HANDSHAKE_VERSION));
        assert!(SUPPORTED_VERSIONS.contains(crate::PROTOCOL_VERSION));
        assert_eq!(SUPPORTED_VERSIONS.max, crate::PROTOCOL_VERSION);
    }
}
