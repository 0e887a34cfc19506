//! Client authentication: user names and argon2 password hashes.
//!
//! With no users configured the broker accepts any client without
//! credentials (and the daemon warns about it at start). Verification runs
//! on tokio's blocking pool: argon2 is deliberately slow and must not stall
//! an event loop.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::config::UserConfig;
use crate::BrokerError;

/// The users allowed to connect, by name, with their PHC hash strings.
#[derive(Debug, Clone, Default)]
pub struct Users {
    hashes: Arc<HashMap<String, String>>,
}

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

impl Users {
    pub fn from_config(users: &[UserConfig]) -> Result<Users, BrokerError> {
        let mut hashes = HashMap::new();
        for u in users {
            let hash = match (&u.password_hash, &u.password) {
                (Some(h), _) => h.clone(),
                (None, Some(p)) => hash_password(p)?,
                (None, None) => return Err(BrokerError::Auth(format!("user `{}` has no password", u.name))),
            };
            hashes.insert(u.name.clone(), hash);
        }
        Ok(Users { hashes: Arc::new(hashes) })
    }

    pub fn is_open(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Check credentials (blocking: call from the blocking pool).
    pub fn check(&self, user: Option<&str>, password: Option<&str>) -> AuthOutcome {
        if self.is_open() {
            return AuthOutcome::Accepted(user.map(str::to_string));
        }
        let (Some(user), Some(password)) = (user, password) else {
            return AuthOutcome::Refused("this broker requires a user and password");
        };
        let Some(hash) = self.hashes.get(user) else {
            return AuthOutcome::Refused("unknown user or wrong password");
        };
        let ok = PasswordHash::new(hash)
            .map(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
            .unwrap_or(false);
        if ok {
            AuthOutcome::Accepted(Some(user.to_string()))
        } else {
            AuthOutcome::Refused("unknown user or wrong password")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_and_wrong_passwords() {
        let users = Users::from_config(&[UserConfig {
            name: "app".into(),
            password_hash: None,
            password: Some("s3cret".into()),
        }])
        .unwrap();
        assert_eq!(users.check(Some("app"), Some("s3cret")), AuthOutcome::Accepted(Some("app".into())));
        assert!(matches!(users.check(Some("app"), Some("nope")), AuthOutcome::Refused(_)));
        assert!(matches!(users.check(Some("eve"), Some("s3cret")), AuthOutcome::Refused(_)));
        assert!(matches!(users.check(None, None), AuthOutcome::Refused(_)));
    }

    #[test]
    fn open_broker_accepts_anyone() {
        assert_eq!(Users::default().check(None, None), AuthOutcome::Accepted(None));
    }
}
