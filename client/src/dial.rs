//! Finding the active node of the pair: at [`crate::Client::connect`] and
//! after a lost connection.
//!
//! One *round* dials every configured address once, in the configured order.
//! A passive node answers `NotActive` with a hint where the active one is;
//! the hint is dialed next (once per round, so two confused nodes cannot
//! bounce us forever). Addresses are dialed one after the other, but the next
//! one does not wait longer than [`STAGGER`] for an address that does not
//! answer: a node behind a pulled cable swallows our SYN and would otherwise
//! hold every round for a whole `connect_timeout`. Its attempt stays in
//! flight (into later rounds too) and may still win. The first `Welcome`
//! wins; wrong credentials end the search at once, since the other node
//! shares the same users. Between rounds the caller backs off
//! ([`Backoff`], by [`crate::ReconnectBackoff`]: by default 20 ms, doubling,
//! at most 250 ms, each pause up to half shorter at random), because the
//! pair replaces a dead active node in well under a second and we want to be
//! there then.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::time::Instant;
use tracing::debug;

use crate::link::{is_final, Link, ServerInfo, TicketSlot};
use crate::{ClientConfig, ClientError, ReconnectBackoff};

/// How long one address may leave us without an answer before the next one
/// is dialed alongside it. A live node answers Hello within milliseconds.
const STAGGER: Duration = Duration::from_millis(150);

/// The outcome of dialing one address (or a whole round).
pub(crate) type Opened = Result<(Link, ServerInfo), ClientError>;

type Attempt = Pin<Box<dyn Future<Output = (String, Opened)> + Send>>;

/// Pause between rounds: starts short, doubles, capped, each pause
/// shortened at random by up to the jitter fraction.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    config: ReconnectBackoff,
}

impl Backoff {
    pub(crate) fn new(config: ReconnectBackoff) -> Self {
        Backoff { next: config.initial, config }
    }

    /// The pause to take now; the nominal one after it is twice as long, up to the cap.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let nominal = self.next;
        self.next = (nominal * 2).min(self.config.max);
        let cut = self.config.jitter * rand::random::<f64>();
        nominal.mul_f64(1.0 - cut.clamp(0.0, 1.0))
    }
}

/// Dials the configured addresses, round after round, keeping unanswered
/// attempts in flight across rounds. Dropping it abandons those attempts.
pub(crate) struct Dialer {
    config: Arc<ClientConfig>,
    /// Say Hello as an admin connection.
    admin: bool,
    ticket: TicketSlot,
    /// Attempts in flight, possibly started in an earlier round.
    attempts: FuturesUnordered<Attempt>,
    /// The addresses of `attempts`: never two attempts to one address.
    dialing: HashSet<String>,
}

impl Dialer {
    pub(crate) fn new(config: Arc<ClientConfig>, admin: bool, ticket: TicketSlot) -> Self {
        Dialer { config, admin, ticket, attempts: FuturesUnordered::new(), dialing: HashSet::new() }
    }

    fn start(&mut self, addr: String) {
        let (config, admin, ticket) = (self.config.clone(), self.admin, self.ticket.clone());
        self.dialing.insert(addr.clone());
        self.attempts.push(Box::pin(async move {
            let opened = Link::open(&addr, &config, admin, &ticket).await;
            (addr, opened)
        }));
    }

    fn abandon_all(&mut self) {
        self.attempts.clear();
        self.dialing.clear();
    }

    /// One round (see the module docs): the first node to welcome us, a
    /// final refusal, or else the error of the last attempt to fail.
    pub(crate) async fn round(&mut self) -> Opened {
        let mut queue: VecDeque<String> =
            self.config.servers.iter().filter(|a| !self.dialing.contains(*a)).cloned().collect();
        // Started in this round and not answered yet: the round waits for them.
        let mut ours: HashSet<String> = HashSet::new();
        let mut hint_followed = false;
        let mut last_error: Option<ClientError> = None;
        let mut next_start = Instant::now();
        // Once every address was tried and one answered "not active", a node that
        // accepted the TCP connection but never answers (a frozen process) must
        // not hold the round: end it soon and let that attempt run on.
        let mut round_end: Option<Instant> = None;
        loop {
            if round_end.is_none() && queue.is_empty() && !ours.is_empty() && last_error.is_some() {
                round_end = Some(Instant::now() + STAGGER);
            }
            if !queue.is_empty() && (ours.is_empty() || Instant::now() >= next_start) {
                if let Some(addr) = queue.pop_front() {
                    if !self.dialing.contains(&addr) {
                        ours.insert(addr.clone());
                        self.start(addr);
                        next_start = Instant::now() + STAGGER;
                    }
                }
                continue;
            }
            if queue.is_empty() && ours.is_empty() {
                if let Some(e) = last_error.take() {
                    return Err(e);
                }
                if self.attempts.is_empty() {
                    return Err(ClientError::NoServers);
                }
                // Only attempts of earlier rounds are left: wait for one of them.
            }
            tokio::select! {
                Some((addr, opened)) = self.attempts.next() => {
                    self.dialing.remove(&addr);
                    ours.remove(&addr);
                    match opened {
                        Ok(opened) => {
                            self.abandon_all();
                            return Ok(opened);
                        }
                        Err(e) if is_final(&e) => {
                            self.abandon_all();
                            return Err(e);
                        }
                        Err(e) => {
                            debug!(addr, error = %e, "node not usable");
                            if let ClientError::NotActive { active_hint: Some(hint), .. } = &e {
                                if !hint_followed && !self.dialing.contains(hint) {
                                    hint_followed = true;
                                    queue.retain(|a| a != hint);
                                    queue.push_front(hint.clone());
                                    next_start = Instant::now();
                                }
                            }
                            last_error = Some(e);
                        }
                    }
                }
                () = tokio::time::sleep_until(next_start), if !queue.is_empty() => {}
                () = tokio::time::sleep_until(round_end.unwrap_or(next_start)), if round_end.is_some() && queue.is_empty() => {
                    return Err(last_error.take().unwrap_or(ClientError::NoServers));
                }
                else => return Err(last_error.unwrap_or(ClientError::NoServers)),
            }
        }
    }
}

/// Connect to whichever node of `config.servers` is active, retrying rounds
/// (with [`Backoff`]) while none is, until `failover_timeout` has passed
/// since the call: an application started during a failover still connects.
/// The first round always runs to its end. Wrong credentials fail at once;
/// otherwise the error of the last attempt.
pub(crate) async fn find_active(config: Arc<ClientConfig>, ticket: TicketSlot) -> Opened {
    if config.servers.is_empty() {
        return Err(ClientError::NoServers);
    }
    let give_up_at = Instant::now() + config.failover_timeout;
    let mut backoff = Backoff::new(config.reconnect_backoff);
    let mut dialer = Dialer::new(config, false, ticket);
    let mut result = dialer.round().await;
    loop {
        let error = match result {
            Ok(opened) => return Ok(opened),
            Err(e) if is_final(&e) => return Err(e),
            Err(e) => e,
        };
        let wake = Instant::now() + backoff.next_pause();
        if wake >= give_up_at {
            return Err(error);
        }
        debug!(error = %error, "no active node yet; retrying");
        tokio::time::sleep_until(wake).await;
        result = match tokio::time::timeout_at(give_up_at, dialer.round()).await {
            Ok(result) => result,
            Err(_) => return Err(error),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut backoff = Backoff::new(ReconnectBackoff::default().jitter(0.0));
        let pauses: Vec<u64> = (0..6).map(|_| backoff.next_pause().as_millis() as u64).collect();
        assert_eq!(pauses, vec![20, 40, 80, 160, 250, 250]);
    }

    #[test]
    fn jitter_shortens_each_pause_by_at_most_its_fraction_and_varies() {
        let config = ReconnectBackoff::new(Duration::from_millis(100), Duration::from_millis(100)).jitter(0.5);
        let mut backoff = Backoff::new(config);
        let pauses: Vec<Duration> = (0..200).map(|_| backoff.next_pause()).collect();
        assert!(pauses.iter().all(|p| (Duration::from_millis(50)..=Duration::from_millis(100)).contains(p)));
        let distinct: std::collections::HashSet<_> = pauses.iter().collect();
        assert!(distinct.len() > 100, "random, not one fixed pause: {} distinct", distinct.len());
    }
}
