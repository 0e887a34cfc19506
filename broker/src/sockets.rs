//! The listening sockets a node serves on: bound here from the
//! configuration, or handed over already bound by the process that started
//! us (systemd-style socket activation).
//!
//! [`crate::run`] takes [`Listeners`] instead of binding, so that whoever
//! starts a broker owns its ports: a test binds `127.0.0.1:0` and knows the
//! port before the broker exists (no window in which another process can
//! take a port picked as free), and a service manager can hold the ports
//! across restarts.
//!
//! **Socket activation.** The parent passes listening TCP sockets as file
//! descriptors 3, 4, ... and sets `LISTEN_FDS` (how many),
//! `LISTEN_FDNAMES` (their names, colon-separated: `client`, `ha`, `http`,
//! `stomp`)
//! and, as systemd does, `LISTEN_PID` (our pid; when it names another
//! process the sockets are not ours and are left alone; when it is absent
//! they are taken, as `systemfd` and our test harnesses do). A lone unnamed
//! socket is the client port. A passed socket replaces binding the address
//! its key names (`listen`, `ha_listen`, `http_listen`); those keys still
//! decide which ports exist, so a socket for a port the configuration does
//! not enable (`ha` without `peer_ha`, `http` without `http_listen`) is a
//! configuration error, as are unknown or repeated names. The variables are
//! removed from our environment once read.

use std::net::{SocketAddr, TcpListener};

use crate::config::{Config, ConfigError};
use crate::{listener, BrokerError};

/// The bound listening sockets of one node.
#[derive(Debug)]
pub struct Listeners {
    /// The client port.
    pub client: TcpListener,
    /// The HA port: present exactly when the configuration makes this node
    /// one of a pair (`Config::pair`).
    pub ha: Option<TcpListener>,
    /// The admin HTTP port: present exactly when `http_listen` is set.
    pub http: Option<TcpListener>,
    /// The STOMP port: present exactly when `stomp_listen` is set.
    pub stomp: Option<TcpListener>,
}

impl Listeners {
    /// Bind every port the configuration enables, with the options
    /// `listener::bind` sets.
    pub fn bind(config: &Config) -> Result<Listeners, BrokerError> {
        Listeners::activated_or_bind(config, Activated::default())
    }

    /// Use the sockets handed over by socket activation where there is one,
    /// bind the configured address where there is none.
    pub fn activated_or_bind(config: &Config, mut passed: Activated) -> Result<Listeners, BrokerError> {
        let refuse = |name: &str, why: &str| -> BrokerError {
            ConfigError::Activation(format!("a socket named `{name}` was passed, but {why}")).into()
        };
        let ha = match (&config.pair, passed.ha.take()) {
            (Some(_), Some(l)) => Some(taken("ha", l)?),
            (Some(pair), None) => Some(listener::bind(pair.ha_listen)?),
            (None, Some(_)) => return Err(refuse("ha", "this node is not one of a pair (peer_ha is unset)")),
            (None, None) => None,
        };
        let http = match (config.http_listen, passed.http.take()) {
            (Some(_), Some(l)) => Some(taken("http", l)?),
            (Some(addr), None) => Some(listener::bind(addr)?),
            (None, Some(_)) => return Err(refuse("http", "http_listen is unset (the HTTP endpoint is off)")),
            (None, None) => None,
        };
        let stomp = match (config.stomp_listen, passed.stomp.take()) {
            (Some(_), Some(l)) => Some(taken("stomp", l)?),
            (Some(addr), None) => Some(listener::bind(addr)?),
            (None, Some(_)) => return Err(refuse("stomp", "stomp_listen is unset (the STOMP port is off)")),
            (None, None) => None,
        };
        let client = match passed.client.take() {
            Some(l) => taken("client", l)?,
            None => listener::bind(config.listen)?,
        };
        Ok(Listeners { client, ha, http, stomp })
    }

    /// Whether these sockets are the ones `config` needs; made non-blocking
    /// (a passed socket may not be) for the async accept loops.
    pub(crate) fn check(&self, config: &Config) -> Result<(), BrokerError> {
        if config.pair.is_some() != self.ha.is_some() {
            return Err(BrokerError::Listeners(if self.ha.is_some() {
                "an HA listener was given to a node that is not one of a pair"
            } else {
                "the configuration makes this node one of a pair: it needs an HA listener"
            }));
        }
        if config.http_listen.is_some() != self.http.is_some() {
            return Err(BrokerError::Listeners(if self.http.is_some() {
                "an HTTP listener was given but http_listen is unset"
            } else {
                "http_listen is set: the node needs an HTTP listener"
            }));
        }
        if config.stomp_listen.is_some() != self.stomp.is_some() {
            return Err(BrokerError::Listeners(if self.stomp.is_some() {
                "a STOMP listener was given but stomp_listen is unset"
            } else {
                "stomp_listen is set: the node needs a STOMP listener"
            }));
        }
        for l in [Some(&self.client), self.ha.as_ref(), self.http.as_ref(), self.stomp.as_ref()].into_iter().flatten() {
            let addr = local_addr(l);
            l.set_nonblocking(true).map_err(|source| BrokerError::Bind { addr, source })?;
        }
        Ok(())
    }
}

/// A listener's address, for errors and logs (unspecified if the socket cannot say).
pub(crate) fn local_addr(l: &TcpListener) -> SocketAddr {
    l.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

fn taken(name: &str, l: TcpListener) -> Result<TcpListener, BrokerError> {
    tracing::info!(port = name, addr = %local_addr(&l), "using the listening socket passed by socket activation");
    Ok(l)
}

/// The listening sockets handed over by socket activation, by name.
#[derive(Debug, Default)]
pub struct Activated {
    pub client: Option<TcpListener>,
    pub ha: Option<TcpListener>,
    pub http: Option<TcpListener>,
    pub stomp: Option<TcpListener>,
}

/// Which port a passed socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Client,
    Ha,
    Http,
    Stomp,
}

impl Activated {
    /// Take the sockets passed to this process, if any (none: every port is
    /// bound from the configuration). Call it once, first thing in `main`:
    /// it reads and removes `LISTEN_*` from the environment.
    pub fn from_env() -> Result<Activated, ConfigError> {
        let mut fds = listenfd::ListenFd::from_env();
        let names = std::env::var("LISTEN_FDNAMES").ok();
        std::env::remove_var("LISTEN_FDNAMES");
        let ports = ports(names.as_deref(), fds.len()).map_err(ConfigError::Activation)?;
        let mut activated = Activated::default();
        for (i, port) in ports.into_iter().enumerate() {
            let l = fds
                .take_tcp_listener(i)
                .map_err(|e| ConfigError::Activation(format!("passed socket {i} ({port:?}): {e}")))?
                .ok_or_else(|| ConfigError::Activation(format!("passed socket {i} ({port:?}) is missing")))?;
            let slot = match port {
                Port::Client => &mut activated.client,
                Port::Ha => &mut activated.ha,
                Port::Http => &mut activated.http,
                Port::Stomp => &mut activated.stomp,
            };
            *slot = Some(l);
        }
        Ok(activated)
    }
}

/// The port of each of `count` passed sockets, from `LISTEN_FDNAMES`.
fn ports(names: Option<&str>, count: usize) -> Result<Vec<Port>, String> {
    if count == 0 {
        // Nothing passed (or passed to another process: LISTEN_PID): names mean nothing.
        return Ok(Vec::new());
    }
    let names: Vec<&str> = match names {
        None | Some("") if count == 1 => vec!["client"],
        None | Some("") => {
            return Err(format!("{count} sockets passed without LISTEN_FDNAMES (name them client, ha, http)"))
        }
        Some(text) => text.split(':').collect(),
    };
    if names.len() != count {
        return Err(format!("LISTEN_FDNAMES names {} sockets but LISTEN_FDS passes {count}", names.len()));
    }
    let mut ports = Vec::with_capacity(count);
    for name in names {
        let port = match name {
            "client" => Port::Client,
            "ha" => Port::Ha,
            "http" => Port::Http,
            "stomp" => Port::Stomp,
            other => return Err(format!("unknown socket name `{other}` (use client, ha, http, stomp)")),
        };
        if ports.contains(&port) {
            return Err(format!("two sockets named `{name}`"));
        }
        ports.push(port);
    }
    Ok(ports)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use Port::*;

    #[test]
    fn passed_sockets_are_named_by_listen_fdnames() {
        assert_eq!(ports(None, 0).unwrap(), []);
        assert_eq!(ports(Some("client"), 0).unwrap(), [], "LISTEN_PID named another process");
        assert_eq!(ports(None, 1).unwrap(), [Client], "a lone unnamed socket is the client port");
        assert_eq!(ports(Some("client:ha:http"), 3).unwrap(), [Client, Ha, Http]);
        assert_eq!(ports(Some("http:client"), 2).unwrap(), [Http, Client], "any order");
        for (names, count, why) in [
            (None, 2, "without LISTEN_FDNAMES"),
            (Some("client:ha"), 3, "names 2 sockets"),
            (Some("client:admin"), 2, "unknown socket name `admin`"),
            (Some("client:client"), 2, "two sockets named `client`"),
        ] {
            let e = ports(names, count).unwrap_err();
            assert!(e.contains(why), "{names:?} x{count}: {e}");
        }
    }

    fn config(toml: &str) -> Config {
        Config::from_toml(toml).unwrap()
    }

    fn loopback() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").unwrap()
    }

    #[test]
    fn a_passed_socket_replaces_binding_and_an_unused_one_is_refused() {
        let single = config("listen = \"127.0.0.1:0\"\n");
        let passed = loopback();
        let port = passed.local_addr().unwrap().port();
        let l =
            Listeners::activated_or_bind(&single, Activated { client: Some(passed), ..Default::default() }).unwrap();
        assert_eq!(l.client.local_addr().unwrap().port(), port, "the passed socket, not a new one");
        assert!(l.ha.is_none() && l.http.is_none());
        l.check(&single).unwrap();

        for (activated, name) in [
            (Activated { ha: Some(loopback()), ..Default::default() }, "`ha`"),
            (Activated { http: Some(loopback()), ..Default::default() }, "`http`"),
        ] {
            let e = Listeners::activated_or_bind(&single, activated).unwrap_err();
            assert!(matches!(&e, BrokerError::Config(ConfigError::Activation(m)) if m.contains(name)), "{e}");
        }
    }

    #[test]
    fn run_refuses_listeners_that_do_not_fit_the_configuration() {
        let with_http = config("listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:1\"\n");
        let without = Listeners { client: loopback(), ha: None, http: None, stomp: None };
        assert!(matches!(without.check(&with_http), Err(BrokerError::Listeners(_))));
        let extra = Listeners { client: loopback(), ha: Some(loopback()), http: None, stomp: None };
        assert!(matches!(extra.check(&config("")), Err(BrokerError::Listeners(_))));
    }
}
