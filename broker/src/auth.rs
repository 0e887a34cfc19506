//! Password hashing (argon2id) and the configured users.
//!
//! Who may connect and what they may do is `security.rs`. Verification runs
//! on tokio's blocking pool: argon2 is deliberately slow and must not stall
//! an event loop.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;

use crate::config::UserConfig;
use crate::security::StaticUser;
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

/// Resolve the configured users: hash plain passwords, parse grants.
pub fn static_users(users: &[UserConfig]) -> Result<Vec<StaticUser>, BrokerError> {
    users
        .iter()
        .map(|u| {
            let password_hash = match (&u.password_hash, &u.password) {
                (Some(h), _) => h.clone(),
                (None, Some(p)) => hash_password(p)?,
                (None, None) => return Err(BrokerError::Auth(format!("user `{}` has no password", u.name))),
            };
            let grants = u.acl().map_err(|e| BrokerError::Auth(format!("user `{}`: {e}", u.name)))?;
            Ok(StaticUser { name: u.name.clone(), password_hash, grants })
        })
        .collect()
}

/// Whether `hash` is an argon2 PHC string this broker can verify against.
pub fn valid_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC password hash: {e}"))?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err(format!("password hash uses {}, expected argon2", parsed.algorithm));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_users_get_hashes_and_default_grants() {
        let users = static_users(&[UserConfig {
            name: "app".into(),
            password_hash: None,
            password: Some("s3cret".into()),
            grants: None,
        }])
        .unwrap();
        assert!(valid_hash(&users[0].password_hash).is_ok());
        assert_eq!(users[0].grants.len(), 3, "no grants given: everything");
        assert!(valid_hash("plain").is_err());
    }
}
