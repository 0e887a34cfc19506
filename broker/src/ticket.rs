//! Session-resumption tickets: a client that logged in with its password
//! gets a short-lived ticket in `Welcome` and shows it when it reconnects,
//! so that after a failover a thousand clients come back with a thousand
//! HMAC checks, not a thousand argon2 checks behind the login gate.
//!
//! Both nodes of a pair accept each other's tickets: the key is derived
//! from the cluster secret. A ticket names its user and expiry and is bound
//! to the user's current password hash, so a password change or a removed
//! user voids it; a single node keys its tickets from random bytes, good
//! for reconnects to the same process.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::security::SecurityDb;

/// How long a ticket is accepted after it was issued.
pub const TICKET_LIFETIME_MS: u64 = 10 * 60 * 1000;

const VERSION: u8 = 1;
const MAC_LEN: usize = 32;

/// Issues tickets with one key and accepts those of every key of the
/// pair's secrets (a secret being rotated in or out).
pub struct Tickets {
    keys: Keys,
}

enum Keys {
    /// A single node: random, this process only.
    Node([u8; 32]),
    /// A pair: the ticket keys HKDF derives from the cluster secrets.
    Pair(twinmq_ha::secret::ClusterSecret),
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets").finish_non_exhaustive()
    }
}

impl Tickets {
    /// A pair's nodes pass their cluster secret (same keys on both); a single node `None`.
    pub fn new(cluster_secret: Option<&twinmq_ha::secret::ClusterSecret>) -> Tickets {
        let keys = match cluster_secret {
            Some(secret) => Keys::Pair(secret.clone()),
            None => Keys::Node(rand::random()),
        };
        Tickets { keys }
    }

    /// A ticket for `user`, whose current password hash is `password_hash`.
    pub fn issue(&self, user: &str, password_hash: &str, now_ms: u64) -> Vec<u8> {
        let expiry = now_ms.saturating_add(TICKET_LIFETIME_MS);
        let name = user.as_bytes();
        let mut t = Vec::with_capacity(1 + 8 + 2 + name.len() + MAC_LEN);
        t.push(VERSION);
        t.extend_from_slice(&expiry.to_be_bytes());
        t.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
        t.extend_from_slice(&name[..name.len().min(usize::from(u16::MAX))]);
        let key = match &self.keys {
            Keys::Node(k) => *k,
            Keys::Pair(s) => s.keys()[0].tickets,
        };
        let tag = mac(&key, &t, password_hash).finalize().into_bytes();
        t.extend_from_slice(&tag);
        t
    }

    /// The user `ticket` stands for, if it is genuine, unexpired, names
    /// `user` and was issued under the user's current password.
    pub fn verify(&self, ticket: &[u8], user: &str, security: &SecurityDb, now_ms: u64) -> bool {
        let Some(body_len) = ticket.len().checked_sub(MAC_LEN) else { return false };
        let (body, tag) = ticket.split_at(body_len);
        if body.len() < 11 || body[0] != VERSION {
            return false;
        }
        let expiry = u64::from_be_bytes(body[1..9].try_into().unwrap_or_default());
        let len = usize::from(u16::from_be_bytes([body[9], body[10]]));
        if body.len() != 11 + len || &body[11..] != user.as_bytes() || now_ms > expiry {
            return false;
        }
        // Too far in the future: not one of ours (or a clock far apart).
        if expiry > now_ms.saturating_add(2 * TICKET_LIFETIME_MS) {
            return false;
        }
        let Some(hash) = security.password_hash(user) else { return false };
        match &self.keys {
            Keys::Node(k) => mac(k, body, hash).verify_slice(tag).is_ok(),
            Keys::Pair(s) => s.keys().iter().any(|k| mac(&k.tickets, body, hash).verify_slice(tag).is_ok()),
        }
    }
}

fn mac(key: &[u8; 32], body: &[u8], password_hash: &str) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(&(password_hash.len() as u64).to_be_bytes());
    mac.update(password_hash.as_bytes());
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use twinmq_store::UserRecord;

    use super::*;

    fn db(users: &[(&str, &str)]) -> SecurityDb {
        let stored: BTreeMap<String, UserRecord> = users
            .iter()
            .map(|(n, h)| (n.to_string(), UserRecord { password_hash: h.to_string(), grants: vec![] }))
            .collect();
        SecurityDb::build(&[], &stored, false)
    }

    #[test]
    fn a_ticket_stands_for_its_user_until_it_expires_or_the_password_changes() {
        use twinmq_ha::secret::{generate, ClusterSecret};
        let secret = generate();
        let pair = || ClusterSecret::inline(&secret).unwrap();
        let (a, b) = (Tickets::new(Some(&pair())), Tickets::new(Some(&pair())));
        let users = db(&[("app", "$argon2id$h1"), ("ops", "$argon2id$h2")]);
        let t = a.issue("app", "$argon2id$h1", 1_000);
        assert!(a.verify(&t, "app", &users, 1_000));
        assert!(b.verify(&t, "app", &users, 2_000), "the other node of the pair accepts it");
        assert!(!a.verify(&t, "ops", &users, 1_000), "only for its own user");
        assert!(!a.verify(&t, "app", &users, 1_000 + TICKET_LIFETIME_MS + 1), "expired");
        let other = ClusterSecret::inline(&generate()).unwrap();
        assert!(!Tickets::new(Some(&other)).verify(&t, "app", &users, 1_000), "another pair's key");
        assert!(!Tickets::new(None).verify(&t, "app", &users, 1_000), "a single node's random key");
        let changed = db(&[("app", "$argon2id$h3")]);
        assert!(!a.verify(&t, "app", &changed, 1_000), "a new password voids it");
        assert!(!a.verify(&t, "app", &db(&[]), 1_000), "a removed user's ticket is void");
        let mut forged = t.clone();
        forged[3] ^= 1; // a later expiry
        assert!(!a.verify(&forged, "app", &users, 1_000));
        assert!(!a.verify(&t[..t.len() - 1], "app", &users, 1_000));
        assert!(!a.verify(&[], "app", &users, 1_000));
    }
}
