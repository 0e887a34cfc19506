//! Password hashing (argon2id) and the configured users.
//!
//! Who may connect and what they may do is `security.rs` (which also
//! resolves the configured users, with [`hash_password`] and [`valid_hash`]). Verification runs
//! on tokio's blocking pool: argon2 is deliberately slow and must not stall
//! an event loop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;
use tokio::sync::oneshot;

use crate::BrokerError;

/// Outcome of a credentials check (an expected result, not an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Authenticated as this user (`None`: open broker, anonymous).
    Accepted(Option<String>),
    Refused(&'static str),
}

/// Hash a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> Result<String, BrokerError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| BrokerError::Auth(e.to_string()))
}

/// Most memory one password check may take (argon2's `m`, KiB): with
/// [`LoginGate`]'s fixed number of checkers, what logins can cost in all is
/// bounded. argon2id's default is 19,456 KiB.
pub const MAX_ARGON2_MEMORY_KIB: u32 = 64 * 1024;
/// Most passes (argon2's `t`) and lanes (`p`) of a hash we accept.
const MAX_ARGON2_TIME: u32 = 10;
const MAX_ARGON2_LANES: u32 = 4;

/// Whether `hash` is an argon2 PHC string this broker can verify against,
/// at a cost within [`MAX_ARGON2_MEMORY_KIB`].
pub fn valid_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC password hash: {e}"))?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err(format!("password hash uses {}, expected argon2", parsed.algorithm));
    }
    let params = argon2::Params::try_from(&parsed).map_err(|e| format!("argon2 parameters: {e}"))?;
    within_limits(&params)
}

fn within_limits(params: &argon2::Params) -> Result<(), String> {
    if params.m_cost() > MAX_ARGON2_MEMORY_KIB
        || params.t_cost() > MAX_ARGON2_TIME
        || params.p_cost() > MAX_ARGON2_LANES
    {
        return Err(format!(
            "argon2 cost m={} t={} p={} is above what this broker verifies (m <= {MAX_ARGON2_MEMORY_KIB} KiB, \
             t <= {MAX_ARGON2_TIME}, p <= {MAX_ARGON2_LANES}); hash with `twinmq hash-password`",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        ));
    }
    Ok(())
}

/// A hash of nothing anyone knows, at the default cost: an unknown user's
/// password is checked against it, so that refusing one costs as much as
/// refusing a known user (no user enumeration by timing).
pub(crate) fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("twinmq: nobody's password").unwrap_or_default())
}

/// Verify `password` against the PHC string `hash`, in this thread's reused
/// argon2 memory: each check otherwise allocates its ~19 MiB anew, and under
/// a flood glibc keeps those in its arenas, fragmented (hundreds of MiB
/// measured with 36 checks). Here a checker thread holds one buffer, the
/// size of the largest cost it verified (at most [`MAX_ARGON2_MEMORY_KIB`]).
pub(crate) fn verify_password(password: &[u8], hash: &str) -> bool {
    thread_local! {
        static MEMORY: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let Ok(hash) = PasswordHash::new(hash) else { return false };
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else { return false };
    let Ok(params) = argon2::Params::try_from(&hash) else { return false };
    if within_limits(&params).is_err() {
        return false;
    }
    let Ok(algorithm) = argon2::Algorithm::try_from(hash.algorithm) else { return false };
    let Ok(version) = hash.version.map(argon2::Version::try_from).transpose() else { return false };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else { return false };
    let blocks = params.block_count();
    let argon2 = Argon2::new(algorithm, version.unwrap_or_default(), params);
    let mut out = vec![0u8; expected.len()];
    let hashed = MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::default());
        }
        argon2.hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
    });
    // Output's equality is constant-time.
    hashed.is_ok() && argon2::password_hash::Output::new(&out).is_ok_and(|o| o == expected)
}

/// Failed logins of one (user, address) before the pauses start.
const FREE_FAILURES: u32 = 5;
/// The first pause; each further failure doubles it, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// A (user, address) that has not failed for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Most (user, address) pairs remembered; the oldest go first.
const MAX_TRACKED: usize = 65_536;
/// Checks of one (user, address) under way at once; beyond, `Busy` (the
/// client retries). Guesses sent in parallel must not all run before the
/// first failure is counted.
const MAX_INFLIGHT_PER_KEY: u32 = 64;
/// Password checks waiting for a checker; beyond, a login is refused as busy.
const MAX_WAITING_CHECKS: usize = 1024;
/// How long a login waits for its check to start and finish; then it is
/// refused as busy (the client retries), well inside the client's 5 s
/// connect timeout. A check whose login gave up is skipped, not run: under
/// a login storm, work for connections already gone would otherwise crowd
/// out every live one.
const MAX_CHECK_WAIT: Duration = Duration::from_secs(3);

struct Failures {
    count: u32,
    /// Checks of this key under way.
    inflight: u32,
    last: Instant,
    retry_at: Instant,
}

/// The user name hashed: what an attacker sends as a name (up to a frame)
/// costs the map 16 bytes.
type Key = ([u8; 16], IpAddr);

fn key(user: Option<&str>, addr: IpAddr) -> Key {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(user.unwrap_or_default().as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&digest[..16]);
    (k, addr)
}

type Check = Box<dyn FnOnce() + Send>;

/// What failed logins may cost (issue 10, finding 2): password checks run on
/// a fixed set of threads (so memory held by argon2 stays at most one
/// check's worth per thread, whatever the flood), at most
/// `MAX_WAITING_CHECKS` wait for one, and a (user, source address) that
/// keeps failing is refused at once for a growing pause. Per address, so
/// that an attacker elsewhere cannot lock a user out.
pub struct LoginGate {
    checks: mpsc::SyncSender<Check>,
    failures: Mutex<HashMap<Key, Failures>>,
}

/// Why the gate refused to check a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateRefusal {
    /// This (user, address) failed too often: retry after this long.
    Paused(Duration),
    /// Too many checks are waiting.
    Busy,
}

impl LoginGate {
    /// `checkers` threads verify passwords (at least one).
    pub fn new(checkers: usize) -> Arc<LoginGate> {
        let (tx, rx) = mpsc::sync_channel::<Check>(MAX_WAITING_CHECKS);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..checkers.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("twinmq-login-{i}")).spawn(move || loop {
                let job = match rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password checker thread");
            }
        }
        Arc::new(LoginGate { checks: tx, failures: Mutex::new(HashMap::new()) })
    }

    /// Run `check` (argon2) on a checker thread, unless `(user, addr)` is paused.
    pub async fn check(
        &self,
        user: Option<&str>,
        addr: IpAddr,
        check: impl FnOnce() -> AuthOutcome + Send + 'static,
    ) -> Result<AuthOutcome, GateRefusal> {
        let key = key(user, addr);
        self.begin(key)?;
        let outcome = self.run(check).await;
        self.end(key, outcome.as_ref().ok());
        outcome
    }

    async fn run(&self, check: impl FnOnce() -> AuthOutcome + Send + 'static) -> Result<AuthOutcome, GateRefusal> {
        let (tx, rx) = oneshot::channel();
        let job: Check = Box::new(move || {
            if !tx.is_closed() {
                let _ = tx.send(check());
            }
        });
        if self.checks.try_send(job).is_err() {
            return Err(GateRefusal::Busy);
        }
        match tokio::time::timeout(MAX_CHECK_WAIT, rx).await {
            Err(_) => Err(GateRefusal::Busy),
            Ok(answer) => Ok(answer.unwrap_or(AuthOutcome::Refused("authentication failed"))),
        }
    }

    /// Admit a check of `key`, or say why not (paused, too many under way).
    fn begin(&self, key: Key) -> Result<(), GateRefusal> {
        let Ok(mut failures) = self.failures.lock() else { return Err(GateRefusal::Busy) };
        let now = Instant::now();
        if failures.len() >= MAX_TRACKED && !failures.contains_key(&key) {
            failures.retain(|_, f| f.inflight > 0 || now.duration_since(f.last) < FORGET_AFTER);
            if failures.len() >= MAX_TRACKED {
                if let Some(oldest) = failures.iter().min_by_key(|(_, f)| f.last).map(|(k, _)| *k) {
                    failures.remove(&oldest);
                }
            }
        }
        let f = failures.entry(key).or_insert(Failures { count: 0, inflight: 0, last: now, retry_at: now });
        if now.duration_since(f.last) >= FORGET_AFTER {
            f.count = 0;
        }
        if f.retry_at > now {
            return Err(GateRefusal::Paused(f.retry_at - now));
        }
        // Once it failed, what is under way counts as failing too: no more
        // than the free failures left in flight (one at a time once paused).
        if f.count > 0 && f.inflight > 0 && f.count + f.inflight >= FREE_FAILURES {
            return Err(GateRefusal::Paused(FIRST_PAUSE));
        }
        if f.inflight >= MAX_INFLIGHT_PER_KEY {
            return Err(GateRefusal::Busy);
        }
        f.inflight += 1;
        Ok(())
    }

    /// A check of `key` ended: `Some` with its outcome, `None` if it never ran.
    fn end(&self, key: Key, outcome: Option<&AuthOutcome>) {
        let Ok(mut failures) = self.failures.lock() else { return };
        let Some(f) = failures.get_mut(&key) else { return };
        f.inflight = f.inflight.saturating_sub(1);
        let now = Instant::now();
        match outcome {
            Some(AuthOutcome::Accepted(_)) => f.count = 0,
            Some(AuthOutcome::Refused(_)) => {
                f.count += 1;
                f.last = now;
                if f.count >= FREE_FAILURES {
                    let doublings = (f.count - FREE_FAILURES).min(16);
                    f.retry_at = now + FIRST_PAUSE.saturating_mul(1 << doublings).min(MAX_PAUSE);
                }
            }
            None => {}
        }
        if f.count == 0 && f.inflight == 0 {
            failures.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_too_costly_to_verify_are_refused() {
        let salt = SaltString::generate(&mut OsRng);
        let costly = argon2::Params::new(1024 * 1024, 1, 1, None).unwrap();
        let hash = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, costly)
            .hash_password(b"x", &salt)
            .unwrap()
            .to_string();
        let err = valid_hash(&hash).unwrap_err();
        assert!(err.contains("m=1048576"), "{err}");
    }

    #[test]
    fn verifying_in_reused_memory_agrees_with_the_argon2_crate() {
        let hash = hash_password("s3cret").unwrap();
        assert!(verify_password(b"s3cret", &hash));
        assert!(!verify_password(b"s3cres", &hash));
        assert!(!verify_password(b"s3cret", "not a hash"));
        // Another cost (argon2i, fewer blocks) in the same thread's buffer.
        let salt = SaltString::generate(&mut OsRng);
        let params = argon2::Params::new(4096, 2, 1, Some(16)).unwrap();
        let other = Argon2::new(argon2::Algorithm::Argon2i, argon2::Version::V0x10, params)
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        assert!(verify_password(b"pw", &other));
        assert!(!verify_password(b"pv", &other));
        assert!(verify_password(b"s3cret", &hash), "a smaller cost before does not spoil a larger one");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guesses_sent_in_parallel_do_not_all_run_before_the_first_failure_counts() {
        let gate = LoginGate::new(2);
        let addr: IpAddr = "10.0.0.1".parse().unwrap();
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut guesses = Vec::new();
        for _ in 0..200 {
            let (gate, ran) = (gate.clone(), ran.clone());
            guesses.push(tokio::spawn(async move {
                gate.check(Some("app"), addr, move || {
                    ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                    AuthOutcome::Refused("wrong")
                })
                .await
            }));
        }
        for g in guesses {
            let _ = g.await.unwrap();
        }
        let ran = ran.load(std::sync::atomic::Ordering::Relaxed);
        assert!(ran <= MAX_INFLIGHT_PER_KEY as usize, "{ran} guesses ran");
        // A name as long as a frame costs the map what a short one does.
        let long = "x".repeat(1 << 20);
        let _ = gate.check(Some(&long), addr, || AuthOutcome::Refused("wrong")).await;
        let map = gate.failures.lock().unwrap();
        assert!(map.len() <= 2);
    }

    #[tokio::test]
    async fn repeated_failures_pause_that_user_from_that_address_only() {
        let gate = LoginGate::new(1);
        let (here, there): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let refuse = || AuthOutcome::Refused("wrong");
        for _ in 0..FREE_FAILURES {
            assert_eq!(gate.check(Some("app"), here, refuse).await, Ok(AuthOutcome::Refused("wrong")));
        }
        let Err(GateRefusal::Paused(p)) = gate.check(Some("app"), here, refuse).await else { panic!("not paused") };
        assert!(p <= FIRST_PAUSE, "{p:?}");
        // The same user from elsewhere, and another user from here, are checked.
        let ok = || AuthOutcome::Accepted(Some("app".into()));
        assert!(matches!(gate.check(Some("app"), there, ok).await, Ok(AuthOutcome::Accepted(_))));
        assert!(matches!(gate.check(Some("ops"), here, refuse).await, Ok(AuthOutcome::Refused(_))));
        // After the pause, one more failure doubles it; a success forgets them all.
        tokio::time::sleep(p).await;
        assert!(gate.check(Some("app"), here, refuse).await.is_ok());
        let Err(GateRefusal::Paused(p)) = gate.check(Some("app"), here, refuse).await else { panic!("not paused") };
        assert!(p > FIRST_PAUSE && p <= FIRST_PAUSE * 2, "{p:?}");
        tokio::time::sleep(p).await;
        assert!(matches!(gate.check(Some("app"), here, ok).await, Ok(AuthOutcome::Accepted(_))));
        assert!(gate.check(Some("app"), here, refuse).await.is_ok(), "a success starts afresh");
    }
}
