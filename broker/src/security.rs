//! Who may connect, and what they may do: users, passwords and ACLs.
//!
//! Users come from two places: the configuration file (static, for
//! bootstrapping; they cannot be changed at run time) and the store (made
//! with `twinmq user add`, replicated to the peer like every admin object).
//! A [`SecurityDb`] is an immutable snapshot of both; the `Node` actor owns
//! the current one and publishes each new snapshot on a watch channel, so
//! sessions check every operation against the current rules and an ACL
//! change applies to open connections at once.
//!
//! With no user at all the broker is open: anyone connects without
//! credentials and may do everything (the daemon warns at start).
//!
//! Patterns match destination names as dot-separated words: `*` matches
//! exactly one word, `#` any number of words (none included), anything else
//! itself. A `queue:` or `topic:` prefix limits a pattern to that kind:
//! `orders.*` matches `orders.eu` (queue or topic), `topic:prices.#` matches
//! every topic under `prices`, `#` matches everything.

use std::collections::{BTreeMap, HashMap};

use twinmq_protocol::{AclGrant, DestKind, Destination, Permission};
use twinmq_store::{Grant, UserRecord};

use crate::auth::AuthOutcome;

/// A parsed destination pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    kind: Option<DestKind>,
    words: Vec<Word>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    Literal(String),
    /// `*`: exactly one word.
    One,
    /// `#`: zero or more words.
    Any,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let (kind, rest) = if let Some(r) = text.strip_prefix("queue:") {
            (Some(DestKind::Queue), r)
        } else if let Some(r) = text.strip_prefix("topic:") {
            (Some(DestKind::Topic), r)
        } else {
            (None, text)
        };
        if rest.is_empty() {
            return Err(format!("pattern `{text}` is empty"));
        }
        let mut words = Vec::new();
        for w in rest.split('.') {
            words.push(match w {
                "*" => Word::One,
                "#" => Word::Any,
                "" => return Err(format!("pattern `{text}` has an empty word")),
                w if w.contains(['*', '#']) => {
                    return Err(format!("pattern `{text}`: `*` and `#` must be whole words (like `orders.*`)"))
                }
                w => Word::Literal(w.to_string()),
            });
        }
        Ok(Pattern { kind, words })
    }

    pub fn matches(&self, dest: &Destination) -> bool {
        if self.kind.is_some_and(|k| k != dest.kind) {
            return false;
        }
        let name: Vec<&str> = dest.name.split('.').collect();
        matches_words(&self.words, &name)
    }

    /// `#` with no kind: every destination.
    fn is_everything(&self) -> bool {
        self.kind.is_none() && self.words == [Word::Any]
    }
}

/// Dynamic programming over (pattern word, name word): O(pattern x name),
/// whatever the number of `#` (backtracking would be exponential in them).
fn matches_words(pattern: &[Word], name: &[&str]) -> bool {
    // ok[j]: the pattern so far matches the first j words of the name.
    let mut ok = vec![false; name.len() + 1];
    ok[0] = true;
    for w in pattern {
        let mut next = vec![false; name.len() + 1];
        for j in 0..=name.len() {
            next[j] = match w {
                Word::Any => ok[j] || (j > 0 && next[j - 1]),
                Word::One => j > 0 && ok[j - 1],
                Word::Literal(l) => j > 0 && ok[j - 1] && name[j - 1] == l,
            };
        }
        ok = next;
    }
    ok[name.len()]
}

/// A configured (static) user, password already hashed.
#[derive(Debug, Clone)]
pub struct StaticUser {
    pub name: String,
    pub password_hash: String,
    pub grants: Vec<AclGrant>,
}

#[derive(Debug, Clone)]
struct Principal {
    password_hash: String,
    grants: Vec<(Permission, Pattern)>,
    /// From the configuration file: not changeable at run time.
    from_config: bool,
}

/// One snapshot of the users and their rights.
#[derive(Debug, Clone, Default)]
pub struct SecurityDb {
    principals: HashMap<String, Principal>,
    /// A pair member whose store never held a complete copy (a replaced
    /// disk, a first start): the pair's users are unknown here, so only the
    /// configured users may log in, and "no users" does not mean open.
    users_unknown: bool,
}

/// Why a node whose store never held a complete copy refuses a login.
pub const USERS_UNKNOWN: &str = "this node has never held a complete copy of the pair's store, so it cannot \
     check users (only users from its configuration may log in); connect to its peer, or wait until it copied it";

pub fn to_store_grant(g: &AclGrant) -> Grant {
    let permission = match g.permission {
        Permission::Produce => twinmq_store::Permission::Produce,
        Permission::Consume => twinmq_store::Permission::Consume,
        Permission::Admin => twinmq_store::Permission::Admin,
    };
    Grant { permission, pattern: g.pattern.clone() }
}

pub fn from_store_grant(g: &Grant) -> AclGrant {
    let permission = match g.permission {
        twinmq_store::Permission::Produce => Permission::Produce,
        twinmq_store::Permission::Consume => Permission::Consume,
        twinmq_store::Permission::Admin => Permission::Admin,
    };
    AclGrant { permission, pattern: g.pattern.clone() }
}

fn parse_grants(user: &str, grants: impl Iterator<Item = AclGrant>) -> Vec<(Permission, Pattern)> {
    grants
        .filter_map(|g| match Pattern::parse(&g.pattern) {
            Ok(p) => Some((g.permission, p)),
            Err(e) => {
                // Patterns are checked when granted; a bad one here is skipped, never widened.
                tracing::warn!(user, error = %e, "ignoring an unreadable grant");
                None
            }
        })
        .collect()
}

impl SecurityDb {
    /// Static users first; a stored user of the same name is ignored (the
    /// admin commands refuse to make one).
    pub fn build(statics: &[StaticUser], stored: &BTreeMap<String, UserRecord>, users_unknown: bool) -> SecurityDb {
        let mut principals = HashMap::new();
        for (name, u) in stored {
            principals.insert(
                name.clone(),
                Principal {
                    password_hash: u.password_hash.clone(),
                    grants: parse_grants(name, u.grants.iter().map(from_store_grant)),
                    from_config: false,
                },
            );
        }
        for s in statics {
            principals.insert(
                s.name.clone(),
                Principal {
                    password_hash: s.password_hash.clone(),
                    grants: parse_grants(&s.name, s.grants.iter().cloned()),
                    from_config: true,
                },
            );
        }
        SecurityDb { principals, users_unknown }
    }

    /// No users at all (and their absence is known): anyone may connect and do everything.
    pub fn is_open(&self) -> bool {
        self.principals.is_empty() && !self.users_unknown
    }

    /// The current password hash of a user this node knows.
    pub fn password_hash(&self, user: &str) -> Option<&str> {
        self.principals.get(user).map(|p| p.password_hash.as_str())
    }

    /// See [`USERS_UNKNOWN`].
    pub fn users_unknown(&self) -> bool {
        self.users_unknown
    }

    pub fn is_static(&self, name: &str) -> bool {
        self.principals.get(name).is_some_and(|p| p.from_config)
    }

    /// Whether a connection authenticated as `user` may still be open.
    pub fn still_valid(&self, user: Option<&str>) -> bool {
        match user {
            _ if self.is_open() => true,
            None => false,
            Some(u) => self.principals.contains_key(u),
        }
    }

    /// Check credentials. Blocking (argon2 is slow by design): call it from
    /// the blocking pool.
    pub fn check_password(&self, user: Option<&str>, password: Option<&str>) -> AuthOutcome {
        if self.is_open() {
            return AuthOutcome::Accepted(user.map(str::to_string));
        }
        if self.users_unknown && !user.is_some_and(|u| self.is_static(u)) {
            return AuthOutcome::Refused(USERS_UNKNOWN);
        }
        let (Some(user), Some(password)) = (user, password) else {
            return AuthOutcome::Refused("this broker requires a user and password");
        };
        // An unknown user costs one argon2 check too, against a hash nobody
        // matches: refusals take as long whether or not the user exists.
        let (known, hash) = match self.principals.get(user) {
            Some(p) => (true, p.password_hash.as_str()),
            None => (false, crate::auth::dummy_hash()),
        };
        let ok = crate::auth::verify_password(password.as_bytes(), hash);
        if ok && known {
            AuthOutcome::Accepted(Some(user.to_string()))
        } else {
            AuthOutcome::Refused("unknown user or wrong password")
        }
    }

    /// May `user` do `permission` on `dest`?
    ///
    /// A dead-letter queue carries the ACL of its source, not of its own
    /// name (issue 10, finding 7): `orders.dlq` is allowed exactly when
    /// queue `orders` is, whatever a grant on `orders.*` says, and
    /// `orders.payroll/audit.dlq` (the dead letters of durable subscription
    /// `audit` on topic `orders.payroll`) exactly when that topic is.
    pub fn allows(&self, user: Option<&str>, permission: Permission, dest: &Destination) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(p) = user.and_then(|u| self.principals.get(u)) else {
            return false;
        };
        let dest = dead_letter_source(dest);
        p.grants.iter().any(|(perm, pat)| *perm == permission && pat.matches(&dest))
    }

    /// Admin on `#`: may manage the pair, users and ACLs.
    pub fn is_global_admin(&self, user: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        user.and_then(|u| self.principals.get(u))
            .is_some_and(|p| p.grants.iter().any(|(perm, pat)| *perm == Permission::Admin && pat.is_everything()))
    }

    /// Someone holds admin on `#` (or nobody needs to: the broker is open).
    pub fn has_global_admin(&self) -> bool {
        self.is_open() || self.principals.keys().any(|u| self.is_global_admin(Some(u)))
    }

    /// Holds some admin grant: may read the node's status.
    pub fn is_some_admin(&self, user: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        user.and_then(|u| self.principals.get(u))
            .is_some_and(|p| p.grants.iter().any(|(perm, _)| *perm == Permission::Admin))
    }
}

/// The destination whose ACL governs `dest`: the source of a dead-letter
/// queue (`X.dlq` -> queue `X`; `T/N.dlq` -> topic `T`, through any number
/// of `.dlq`), else `dest` itself.
pub fn dead_letter_source(dest: &Destination) -> Destination {
    let mut d = dest.clone();
    while d.kind == DestKind::Queue {
        let Some(base) = d.name.strip_suffix(".dlq") else { break };
        d = match base.split_once('/') {
            Some((topic, _name)) => Destination::topic(topic),
            None => Destination::queue(base),
        };
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn patterns_match_words() {
        let q = Destination::queue;
        let t = Destination::topic;
        assert!(p("orders.*").matches(&q("orders.eu")));
        assert!(!p("orders.*").matches(&q("orders")));
        assert!(!p("orders.*").matches(&q("orders.eu.north")));
        assert!(p("orders.#").matches(&q("orders")));
        assert!(p("orders.#").matches(&q("orders.eu.north")));
        assert!(!p("orders.#").matches(&q("ordersx")));
        assert!(p("#").matches(&t("anything.at.all")));
        assert!(p("*.audit").matches(&q("billing.audit")));
        assert!(!p("*.audit").matches(&q("audit")));
        assert!(p("a.#.z").matches(&q("a.z")));
        assert!(p("a.#.z").matches(&q("a.b.c.z")));
        assert!(!p("a.#.z").matches(&q("a.b.c")));
        assert!(p("topic:prices.#").matches(&t("prices.eur")));
        assert!(!p("topic:prices.#").matches(&q("prices.eur")));
        assert!(p("queue:jobs").matches(&q("jobs")));
        assert!(!p("jobs").matches(&q("jobs2")));
    }

    #[test]
    fn many_hashes_match_in_polynomial_time() {
        let name = vec!["w"; 100].join(".");
        let pattern = format!("{}.x", vec!["#"; 20].join("."));
        // Backtracking would not finish this; the table does it at once.
        assert!(!p(&pattern).matches(&Destination::queue(name.clone())));
        assert!(p(&vec!["#"; 20].join(".")).matches(&Destination::queue(name)));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "queue:", "a..b", "orders*", "a.#x", "."] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    fn db() -> SecurityDb {
        let stored = BTreeMap::from([(
            "app".to_string(),
            UserRecord {
                password_hash: crate::auth::hash_password("pw").unwrap(),
                grants: vec![
                    to_store_grant(&"produce:orders.*".parse().unwrap()),
                    to_store_grant(&"consume:queue:orders.#".parse().unwrap()),
                    to_store_grant(&"admin:orders.tmp".parse().unwrap()),
                ],
            },
        )]);
        let statics = vec![StaticUser {
            name: "root".into(),
            password_hash: crate::auth::hash_password("rootpw").unwrap(),
            grants: vec!["admin:#".parse().unwrap()],
        }];
        SecurityDb::build(&statics, &stored, false)
    }

    /// Issue 10, finding 7: a durable subscription's dead letters were
    /// readable with a queue-only grant and not by the topic's consumer, and
    /// `orders.*` covered `orders.dlq`.
    #[test]
    fn dead_letter_queues_carry_the_acl_of_their_source() {
        let user = |grants: &[&str]| {
            let stored = BTreeMap::from([(
                "u".to_string(),
                UserRecord {
                    password_hash: "$argon2id$x".into(),
                    grants: grants.iter().map(|g| to_store_grant(&g.parse().unwrap())).collect(),
                },
            )]);
            SecurityDb::build(&[], &stored, false)
        };
        let consume = |db: &SecurityDb, d: Destination| db.allows(Some("u"), Permission::Consume, &d);
        let q = Destination::queue;
        // A grant on orders.* covers orders.eu, not the dead letters of queue `orders`.
        let wide = user(&["consume:orders.*"]);
        assert!(consume(&wide, q("orders.eu")));
        assert!(!consume(&wide, q("orders.dlq")));
        assert!(consume(&user(&["consume:queue:orders"]), q("orders.dlq")), "the source queue's consumer reads them");
        // A durable subscription's dead letters: the topic's ACL.
        let dlq = q("orders.payroll/audit.dlq");
        assert!(!consume(&user(&["consume:queue:orders.payroll.audit", "consume:queue:#"]), dlq.clone()));
        assert!(consume(&user(&["consume:topic:orders.payroll"]), dlq.clone()), "the topic's consumer reads them");
        assert_eq!(dead_letter_source(&q("a.dlq.dlq")), q("a"));
    }

    #[test]
    fn grants_decide_each_permission() {
        let db = db();
        let orders = Destination::queue("orders.eu");
        assert!(db.allows(Some("app"), Permission::Produce, &orders));
        assert!(db.allows(Some("app"), Permission::Consume, &orders));
        assert!(!db.allows(Some("app"), Permission::Consume, &Destination::topic("orders.eu")));
        assert!(!db.allows(Some("app"), Permission::Produce, &Destination::queue("billing")));
        assert!(!db.allows(Some("app"), Permission::Admin, &orders));
        assert!(!db.allows(None, Permission::Produce, &orders), "anonymous on a closed broker");
        assert!(!db.allows(Some("eve"), Permission::Produce, &orders));
        assert!(db.is_some_admin(Some("app")) && !db.is_global_admin(Some("app")));
        assert!(db.is_global_admin(Some("root")));
        assert!(!db.allows(Some("root"), Permission::Produce, &orders), "admin is not produce");
        assert!(db.is_static("root") && !db.is_static("app"));
    }

    #[test]
    fn passwords_and_open_broker() {
        let db = db();
        assert_eq!(db.check_password(Some("app"), Some("pw")), AuthOutcome::Accepted(Some("app".into())));
        assert!(matches!(db.check_password(Some("app"), Some("nope")), AuthOutcome::Refused(_)));
        assert!(matches!(db.check_password(None, None), AuthOutcome::Refused(_)));
        let open = SecurityDb::default();
        assert!(open.is_open());
        assert!(open.allows(None, Permission::Admin, &Destination::queue("x")));
        assert_eq!(open.check_password(None, None), AuthOutcome::Accepted(None));
        assert!(db.still_valid(Some("app")) && !db.still_valid(Some("eve")) && !db.still_valid(None));
    }
}
