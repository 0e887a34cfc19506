//! Frames on the HA link and the challenge/response that opens it.
//!
//! Same framing as the client protocol (`u32 length | u8 version |
//! MessagePack`), another set of frames. The link opens with a mutual
//! challenge/response over the cluster secret (HMAC-SHA256, keyed by the
//! handshake key HKDF derives from the secret, over both nonces, the
//! direction and both node ids): the dialer proves first, so whoever merely
//! connects learns nothing computed from the secret; neither side ever
//! sends the secret, and a peer without it never gets past the handshake.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use twinmq_protocol::VersionRange;
use twinmq_store::repl::ReplFrame;

use crate::Role;

/// Largest HA frame: a snapshot record or a group-commit batch fits.
pub const MAX_HA_FRAME: usize = 64 * 1024 * 1024;

pub type HaCodec = twinmq_protocol::FrameCodec<HaFrame, HaFrame>;

/// The versions of the HA protocol this node speaks. 2: the replication
/// protocol of `twinmq_store::repl` (histories, votes); nodes before it
/// speak 1 and are refused with a clear reason (stop both to upgrade from
/// them; later changes roll one node at a time within the range). 3: adds
/// `DivergentAdmin`/`DivergentAdminStored` (users and queues handed over),
/// never sent on a link at 2: they wait for a peer that speaks 3. 4: the
/// dialer proves first, keys derived by HKDF from a generated secret; the
/// handshake itself changed, so nodes before it are refused (stop both to
/// upgrade to it). 5: adds the catch-up from the log (`ReplFrame::Catchup`,
/// `Live`, `CatchupEnd`), sent only on a link at 5: a peer at 4 gets a
/// snapshot instead. 6: adds `NodeInfo` (what the node advertises, once per
/// link) and `Events` (the pair's recent events), sent only on a link at 6:
/// a peer at 4 or 5 links as before and hears neither.
pub const HA_VERSIONS: VersionRange = VersionRange::new(4, 6);
/// The first HA version with `NodeInfo` and `Events`.
pub const NODE_INFO_VERSION: u8 = 6;
/// The first HA version with `Events` (the same as `NodeInfo`'s).
pub const EVENTS_VERSION: u8 = NODE_INFO_VERSION;
/// The first HA version with the catch-up from the log.
pub const LOG_CATCHUP_VERSION: u8 = 5;
/// The first HA version with `DivergentAdmin`.
pub const DIVERGENT_ADMIN_VERSION: u8 = 3;

pub fn codec() -> HaCodec {
    HaCodec::new(MAX_HA_FRAME)
}

/// Until the peer has proved the secret, frames are small: a stranger must
/// not make us reserve a large buffer.
pub const MAX_HANDSHAKE_FRAME: usize = 64 * 1024;

pub fn handshake_codec() -> HaCodec {
    HaCodec::new(MAX_HANDSHAKE_FRAME)
}

/// What a node tells its peer every heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub role: Role,
    /// The epoch it serves in (active) or follows (passive).
    pub epoch: u64,
    /// The highest epoch it has heard of (its own, its peer's, a vote granted).
    pub floor: u64,
    pub last_seq: u64,
    /// The epoch of its last op (with `last_seq`, its store's rank).
    pub last_op_epoch: u64,
    pub sees_gateway: bool,
    /// Passive: holds a complete, current copy (in sync, and not expired).
    pub in_sync: bool,
    /// Active: whether it counts its follower in sync (with `replicated`,
    /// every confirm waits for it), and the generation of that state.
    pub holding: bool,
    pub holding_gen: u64,
    /// Its store works: no failed disk, no half-loaded snapshot.
    pub serviceable: bool,
    /// Its disk failed: it confirms nothing, and its store may be hung (the
    /// active stops waiting for it on this alone).
    #[serde(default)]
    pub disk_failed: bool,
    /// Its store (in `epoch`) confirmed ops without its follower since the
    /// follower was last in sync: that follower holds less than every
    /// confirmed message, whatever it last heard, and whatever role this
    /// node has now (it may have stepped down, or its disk failed).
    #[serde(default)]
    pub confirmed_alone: bool,
    /// Its disk is over `max_disk_bytes` or under `min_free_disk_bytes`
    /// (writes still succeed): while it is in sync its active refuses new
    /// messages, as for its own disk.
    #[serde(default)]
    pub disk_full: bool,
}

/// Between the two role cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoleMsg {
    /// Both passive: the sender's store ranks first; may it become active in `epoch`?
    VoteRequest { epoch: u64, rank: (u64, u64) },
    /// The answer; a grant means the sender never promotes at or below `epoch`.
    VoteReply { epoch: u64, granted: bool },
    /// Active to passive during a switchover (or when its disk failed):
    /// everything up to `last_seq` of `epoch` is yours; take the role.
    TakeOver { epoch: u64, last_seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HaFrame {
    /// Dialer to acceptor: who I am and my challenge.
    Hello {
        node_id: String,
        priority: u32,
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        /// The HA protocol versions the dialer speaks (absent: 1 only).
        #[serde(default)]
        versions: VersionRange,
    },
    /// Acceptor: its own challenge and the version it chose; no proof yet:
    /// a stranger that dials gets nothing computed from the secret.
    Challenge {
        node_id: String,
        priority: u32,
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        /// The HA protocol version the acceptor chose (absent: 1).
        #[serde(default)]
        version: Option<u8>,
    },
    /// Dialer: proves first, over both nonces and both ids.
    Proof {
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// Acceptor, once the dialer proved the secret: its own proof; the link
    /// is open when the dialer has checked it.
    Accepted {
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// Either side: the handshake failed (then the connection closes).
    Refused {
        reason: String,
    },
    Heartbeat(Heartbeat),
    /// Replication, both ways (see `twinmq_store::repl::frame`).
    Repl(ReplFrame),
    /// Between the role cores: votes and switchover.
    Role(RoleMsg),
    /// A node whose store diverged: messages it may have confirmed that the
    /// active's history lacks (queue key, message), for the active to store;
    /// at most [`MAX_HANDOVER_CHUNK`] bytes of payload per frame.
    Divergent {
        messages: Vec<(String, twinmq_store::StoredMessage)>,
    },
    /// The active to the node that handed messages over: it stored these
    /// (the messages' epoch and sequence on the sender); they can be forgotten.
    DivergentStored {
        ids: Vec<(u64, u64)>,
    },
    /// With `Divergent`, first: the users and queues the sender held when
    /// its history was replaced; the active creates those it lacks.
    DivergentAdmin(twinmq_store::HandoverAdmin),
    /// The active created what it lacked of a `DivergentAdmin`.
    DivergentAdminStored,
    /// HA 6, once per link as it comes up: the addresses this node
    /// advertises (`HaConfig::advertise_stomp`). The receiver keeps at most
    /// [`MAX_ADVERTISED_LEN`] bytes of printable ASCII, else nothing.
    NodeInfo {
        /// The STOMP address clients of this node may be sent to.
        #[serde(default)]
        stomp: Option<String>,
    },
    /// HA 6: the pair's recent events (`events.rs`), oldest first: the
    /// sender's whole ring as a link comes up, then each new one. The
    /// receiver keeps the newest `events::EVENT_RING`, checked
    /// (`events::from_peer`).
    Events {
        events: Vec<crate::events::PairEvent>,
    },
}

/// Longest advertised address accepted from the peer.
pub const MAX_ADVERTISED_LEN: usize = 255;

/// An advertised address as the peer may send it: 1 to
/// [`MAX_ADVERTISED_LEN`] bytes of printable ASCII without spaces (a host
/// name or IP literal and a port). Anything else is dropped on receipt: it
/// is shown to operators and handed to clients.
pub fn valid_advertised(address: &str) -> bool {
    !address.is_empty() && address.len() <= MAX_ADVERTISED_LEN && address.bytes().all(|b| b.is_ascii_graphic())
}

/// Most payload bytes of messages in one `Divergent` frame (far below the frame limit).
pub const MAX_HANDOVER_CHUNK: usize = 4 * 1024 * 1024;

/// The proof that `role_tag`'s side knows the secret whose handshake key
/// is `key`: an HMAC over both nonces (the dialer's first) and both node
/// ids, so a proof is good for one connection, one direction and one pair
/// of names only.
pub fn proof(
    key: &[u8; 32],
    role_tag: &str,
    dialer_nonce: &[u8],
    acceptor_nonce: &[u8],
    dialer: &str,
    acceptor: &str,
) -> Vec<u8> {
    mac(key, role_tag, dialer_nonce, acceptor_nonce, dialer, acceptor).finalize().into_bytes().to_vec()
}

/// Check a proof in constant time.
pub fn verify(
    key: &[u8; 32],
    role_tag: &str,
    dialer_nonce: &[u8],
    acceptor_nonce: &[u8],
    dialer: &str,
    acceptor: &str,
    got: &[u8],
) -> bool {
    mac(key, role_tag, dialer_nonce, acceptor_nonce, dialer, acceptor).verify_slice(got).is_ok()
}

fn mac(
    key: &[u8; 32],
    role_tag: &str,
    dialer_nonce: &[u8],
    acceptor_nonce: &[u8],
    dialer: &str,
    acceptor: &str,
) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in [role_tag.as_bytes(), dialer_nonce, acceptor_nonce, dialer.as_bytes(), acceptor.as_bytes()] {
        mac.update(&(part.len() as u32).to_be_bytes());
        mac.update(part);
    }
    mac
}

pub fn nonce() -> Vec<u8> {
    use rand::RngCore;
    let mut n = vec![0u8; 32];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_need_the_secret_and_bind_the_direction() {
        let (a, b) = (nonce(), nonce());
        let (k, other) = ([7u8; 32], [8u8; 32]);
        let p = proof(&k, "dialer", &a, &b, "node-a", "node-b");
        assert!(verify(&k, "dialer", &a, &b, "node-a", "node-b", &p));
        assert!(!verify(&other, "dialer", &a, &b, "node-a", "node-b", &p));
        assert!(!verify(&k, "acceptor", &a, &b, "node-a", "node-b", &p), "a reflected proof is refused");
        assert!(!verify(&k, "dialer", &b, &a, "node-a", "node-b", &p), "nonces are bound in order");
        assert!(!verify(&k, "dialer", &a, &b, "node-x", "node-b", &p), "the dialer's id is bound");
        assert!(!verify(&k, "dialer", &a, &b, "node-a", "node-x", &p), "the acceptor's id is bound");
    }

    #[test]
    fn advertised_addresses_from_the_peer_are_bounded_and_printable() {
        for ok in ["10.0.0.1:61613", "stomp.example.com:61613", "[fe80::1%eth0]:61613"] {
            assert!(valid_advertised(ok), "{ok}");
        }
        let long = "a".repeat(MAX_ADVERTISED_LEN + 1);
        for bad in ["", "host name:1", "a\nb:1", "\u{1b}[2J:1", "h\u{e9}te:1", long.as_str()] {
            assert!(!valid_advertised(bad), "{bad:?}");
        }
        assert!(valid_advertised(&long[1..]), "exactly the limit");
    }
}
