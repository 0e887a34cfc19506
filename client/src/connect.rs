//! Finding the active node of the pair.
//!
//! Addresses are tried in the configured order. A passive node answers
//! `NotActive` with a hint where the active one is; the hint is tried next
//! (once per attempt, so two confused nodes cannot bounce us forever), then the
//! remaining addresses. Wrong credentials end the search at once: the other
//! node shares the same users, so it would refuse us too.

use std::collections::VecDeque;

use tracing::debug;

use crate::link::{is_final, Link, ServerInfo};
use crate::{ClientConfig, ClientError};

/// Open a connection to whichever node of `config.servers` is active.
/// If none is, the error of the last attempt.
pub(crate) async fn find_active(config: &ClientConfig) -> Result<(Link, ServerInfo), ClientError> {
    let mut queue: VecDeque<String> = config.servers.iter().cloned().collect();
    let mut hint_followed = false;
    let mut last_error = ClientError::NoServers;
    while let Some(addr) = queue.pop_front() {
        match Link::open(&addr, config).await {
            Ok(opened) => return Ok(opened),
            Err(e) if is_final(&e) => return Err(e),
            Err(e) => {
                debug!(addr, error = %e, "node not usable");
                if let ClientError::NotActive { active_hint: Some(hint), .. } = &e {
                    if !hint_followed {
                        hint_followed = true;
                        queue.retain(|a| a != hint);
                        queue.push_front(hint.clone());
                    }
                }
                last_error = e;
            }
        }
    }
    Err(last_error)
}
