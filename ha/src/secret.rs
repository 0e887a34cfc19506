//! The cluster secret: at least 32 random bytes, written by `twinmq
//! gen-secret`, shared by both nodes. It is never used as a key itself:
//! HKDF-SHA256 derives one key for the HA handshake and one for session
//! tickets, so a secret leaked from one use does not serve the other.
//!
//! A secret with less entropy is refused at start: the HA handshake makes
//! one HMAC of the secret observable to whoever the dialer reaches, and a
//! word-list secret falls to an offline guess in a second; 32 random bytes
//! do not. `cluster_secret_file` may hold several secrets, one per line: the
//! first is the one this node proves, every one is accepted from the peer,
//! which is how a secret is rotated without a moment where the nodes
//! disagree (docs/SECURITY.md). The file is read again when it changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64ct::{Base64, Base64Unpadded, Encoding};
use hkdf::Hkdf;
use sha2::Sha256;

/// Fewest bytes of key material a secret must decode to.
pub const MIN_SECRET_BYTES: usize = 32;
/// Fewest distinct byte values in it: 32 random bytes have about 30; a
/// repeated pattern (`AAAA...`, a word encoded many times) has few.
const MIN_DISTINCT_BYTES: usize = 16;
/// How often the file is looked at for a change, at most.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

const HKDF_SALT: &[u8] = b"twinmq cluster secret v1";

/// The keys derived from one secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKeys {
    /// Keys the HMAC proofs of the HA handshake.
    pub handshake: [u8; 32],
    /// Keys session tickets (broker).
    pub tickets: [u8; 32],
}

impl std::fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKeys(..)")
    }
}

impl SecretKeys {
    fn derive(material: &[u8]) -> SecretKeys {
        let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), material);
        let mut handshake = [0u8; 32];
        let mut tickets = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's limit of 8,160: cannot fail.
        hk.expand(b"ha handshake", &mut handshake).unwrap_or_default();
        hk.expand(b"session tickets", &mut tickets).unwrap_or_default();
        SecretKeys { handshake, tickets }
    }
}

/// The key material of one secret as written (base64 of the bytes, or hex),
/// or why it is not strong enough.
pub fn parse_secret(text: &str) -> Result<Vec<u8>, String> {
    let t = text.trim();
    let is_hex = t.len().is_multiple_of(2) && !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit());
    let bytes = if is_hex {
        (0..t.len()).step_by(2).map(|i| u8::from_str_radix(&t[i..i + 2], 16)).collect::<Result<Vec<u8>, _>>().ok()
    } else {
        Base64::decode_vec(t).ok().or_else(|| Base64Unpadded::decode_vec(t).ok())
    };
    let advice = "run `twinmq gen-secret FILE` on one node, copy FILE to the other, and set `cluster_secret_file = FILE` on both";
    let Some(bytes) = bytes else {
        return Err(format!(
            "not a generated secret (base64 or hex of {MIN_SECRET_BYTES} random bytes, {} characters of text): {advice}",
            t.chars().count()
        ));
    };
    if bytes.len() < MIN_SECRET_BYTES {
        return Err(format!("{} bytes of key material, {MIN_SECRET_BYTES} random bytes needed: {advice}", bytes.len()));
    }
    let mut seen = [false; 256];
    bytes.iter().for_each(|b| seen[usize::from(*b)] = true);
    if seen.iter().filter(|s| **s).count() < MIN_DISTINCT_BYTES {
        return Err(format!("{} bytes, but too repetitive to be random: {advice}", bytes.len()));
    }
    Ok(bytes)
}

/// A new secret as `twinmq gen-secret` writes it: base64 of 32 random bytes.
pub fn generate() -> String {
    use rand::RngCore;
    let mut b = [0u8; MIN_SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut b);
    Base64::encode_string(&b)
}

/// The secrets of a file: one per line, `#` comments and blank lines skipped.
pub fn parse_file_text(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_secret(line).map_err(|e| format!("line {}: {e}", n + 1))?);
    }
    if out.is_empty() {
        return Err("holds no secret".into());
    }
    Ok(out)
}

/// Read a secret file, refusing one that others can read.
pub fn read_file(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "{}: readable by others (mode {:o}): `chmod 600 {}` so only the service user reads it",
                path.display(),
                mode & 0o777,
                path.display()
            ));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_file_text(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where the secrets come from.
#[derive(Debug, Clone)]
enum Source {
    Inline,
    File(PathBuf),
}

#[derive(Debug)]
struct Loaded {
    keys: Arc<Vec<SecretKeys>>,
    checked: Instant,
    stamp: Option<Stamp>,
    /// The stamp of a version refused (said once).
    refused: Option<Stamp>,
}

/// What tells a changed file: modification time, length and mode (a
/// `chmod` alone makes a refused file usable).
type Stamp = (SystemTime, u64, u32);

/// The pair's secrets: the first is proved, all are accepted. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClusterSecret {
    source: Source,
    loaded: Arc<Mutex<Loaded>>,
}

impl ClusterSecret {
    /// One secret given in the configuration (or the environment).
    pub fn inline(text: &str) -> Result<ClusterSecret, String> {
        let keys = vec![SecretKeys::derive(&parse_secret(text)?)];
        Ok(ClusterSecret::with(Source::Inline, keys, None))
    }

    /// The secrets of `cluster_secret_file`, read again whenever it changes.
    pub fn from_file(path: &Path) -> Result<ClusterSecret, String> {
        let keys = read_file(path)?.iter().map(|m| SecretKeys::derive(m)).collect();
        Ok(ClusterSecret::with(Source::File(path.to_path_buf()), keys, stamp(path)))
    }

    fn with(source: Source, keys: Vec<SecretKeys>, stamp: Option<Stamp>) -> ClusterSecret {
        let loaded = Loaded { keys: Arc::new(keys), checked: Instant::now(), stamp, refused: None };
        ClusterSecret { source, loaded: Arc::new(Mutex::new(loaded)) }
    }

    /// The keys now: the first is this node's own, the others are accepted.
    /// A file that changed is read again; one that became unusable keeps the
    /// keys it had (and says why, once per change).
    pub fn keys(&self) -> Arc<Vec<SecretKeys>> {
        let mut l = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Source::File(path) = &self.source {
            if l.checked.elapsed() >= RELOAD_CHECK {
                l.checked = Instant::now();
                let now = stamp(path);
                if now != l.stamp {
                    match read_file(path) {
                        Ok(m) => {
                            tracing::info!(file = %path.display(), secrets = m.len(), "cluster secret file read again");
                            l.keys = Arc::new(m.iter().map(|m| SecretKeys::derive(m)).collect());
                            l.stamp = now;
                        }
                        // Looked at again at the next check: a `chmod 600`
                        // changes neither the time nor the length.
                        Err(e) if l.refused != now => {
                            tracing::warn!("cluster secret file not used, the previous secrets stay: {e}");
                            l.refused = now;
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        l.keys.clone()
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.permissions().mode()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_accepted_and_weak_ones_refused() {
        let s = generate();
        assert_eq!(parse_secret(&s).map(|b| b.len()), Ok(32));
        assert!(parse_secret(s.trim_end_matches('=')).is_ok(), "unpadded base64");
        let hex: String = parse_secret(&s).unwrap().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_secret(&hex), parse_secret(&s), "hex of the same bytes");
        for weak in [
            "change-me-please",
            "test-cluster-secret",
            "correct horse battery staple correct horse battery staple",
            "c2hvcnQ=",
            // 32 zero bytes, and one word repeated: long enough, not random.
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            &Base64::encode_string(b"passwordpasswordpasswordpassword"),
            "",
        ] {
            assert!(parse_secret(weak).is_err(), "`{weak}` must be refused");
        }
    }

    #[test]
    fn keys_are_derived_apart_and_files_hold_several_secrets() {
        let (a, b) = (generate(), generate());
        let k = SecretKeys::derive(&parse_secret(&a).unwrap());
        assert_ne!(k.handshake, k.tickets, "one key per use");
        assert_ne!(k, SecretKeys::derive(&parse_secret(&b).unwrap()));
        let text = format!("# new\n{b}\n\n# old, until both nodes have the new one\n{a}\n");
        assert_eq!(parse_file_text(&text).unwrap().len(), 2);
        assert!(parse_file_text("# nothing\n").is_err());
        let err = parse_file_text(&format!("{a}\nchange-me-please\n")).unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
    }

    #[test]
    fn a_file_others_can_read_is_refused_and_changes_are_read_again() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let (a, b) = (generate(), generate());
        std::fs::write(&path, format!("{a}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ClusterSecret::from_file(&path).unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = ClusterSecret::from_file(&path).unwrap();
        let first = s.keys();
        assert_eq!(first.len(), 1);
        std::fs::write(&path, format!("{b}\n{a}\n")).unwrap();
        s.loaded.lock().unwrap().checked = Instant::now() - RELOAD_CHECK;
        let now = s.keys();
        assert_eq!(now.len(), 2);
        assert_eq!(now[1], first[0], "the old secret is still accepted");
        // A broken edit keeps what worked.
        std::fs::write(&path, "change-me-please\n").unwrap();
        s.loaded.lock().unwrap().checked = Instant::now() - RELOAD_CHECK;
        assert_eq!(s.keys().len(), 2);
        // A new file readable by others is refused; the `chmod 600` that
        // fixes it (same time, same length) is noticed.
        let c = generate();
        std::fs::write(&path, format!("{c}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        s.loaded.lock().unwrap().checked = Instant::now() - RELOAD_CHECK;
        assert_eq!(s.keys().len(), 2, "refused: readable by others");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        s.loaded.lock().unwrap().checked = Instant::now() - RELOAD_CHECK;
        assert_eq!(s.keys().len(), 1, "read once it is private");
    }
}
