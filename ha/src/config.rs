//! Settings of the pair, validated by the broker's configuration loader.

use std::net::SocketAddr;
use std::time::Duration;

/// How the gateway (the witness) is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gateway {
    /// TCP connect; an answer or a refusal both prove the gateway is reachable.
    Tcp(SocketAddr),
    /// ICMP echo (unprivileged datagram socket, or raw socket as root).
    Icmp(std::net::IpAddr),
}

impl std::str::FromStr for Gateway {
    type Err = String;
    fn from_str(s: &str) -> Result<Gateway, String> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            use std::net::ToSocketAddrs;
            let addr = rest
                .to_socket_addrs()
                .map_err(|e| format!("`{s}`: {e}"))?
                .next()
                .ok_or_else(|| format!("`{s}` resolves to nothing"))?;
            Ok(Gateway::Tcp(addr))
        } else if let Some(rest) = s.strip_prefix("icmp://") {
            rest.parse().map(Gateway::Icmp).map_err(|_| format!("`{s}`: icmp:// takes an IP address"))
        } else {
            Err(format!("`{s}`: use tcp://HOST:PORT or icmp://IP"))
        }
    }
}

impl std::fmt::Display for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gateway::Tcp(a) => write!(f, "tcp://{a}"),
            Gateway::Icmp(a) => write!(f, "icmp://{a}"),
        }
    }
}

/// Whether the preferred node takes the role back once it has caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failback {
    Auto,
    Manual,
}

/// Everything the pair needs to know.
#[derive(Debug, Clone)]
pub struct HaConfig {
    pub node_id: String,
    /// Higher wins ties; equal priorities fall back to the lower node id.
    pub priority: u32,
    pub ha_listen: SocketAddr,
    /// Every path to the peer's HA port: the dedicated link first, then the client network.
    pub peer_ha: Vec<SocketAddr>,
    /// The peer's client address, given to clients as a redirect hint.
    pub peer_client: Option<String>,
    pub gateway: Gateway,
    /// From `cluster_secret_file` (read again when it changes) or `cluster_secret`.
    pub cluster_secret: crate::secret::ClusterSecret,
    pub heartbeat: Duration,
    pub peer_timeout: Duration,
    pub isolation_timeout: Duration,
    pub takeover_delay: Duration,
    pub probe_interval: Duration,
    /// Consecutive failed probes before the gateway counts as lost.
    pub probe_failures: u32,
    pub failback: Failback,
    /// A sync slower than this counts as a failed disk.
    pub disk_stall: Duration,
    /// TLS on the HA port (under the cluster secret, not instead of it).
    pub tls: Option<crate::tls::HaTls>,
    /// This node's STOMP address as its peer should give it to clients
    /// (`HOST:PORT`), told to the peer once per link (`HaFrame::NodeInfo`,
    /// HA 6); the peer shows it as `HaStatus::peer_stomp`. `None`: nothing
    /// advertised. The peer drops an address `wire::valid_advertised` refuses.
    pub advertise_stomp: Option<String>,
}
