//! `WitnessProber`: is the gateway reachable from here?
//!
//! The gateway runs nothing of ours; it only answers. A TCP probe counts a
//! completed connect or a refusal (RST) as reachable: both prove the path
//! works. An ICMP probe sends an echo request through an unprivileged ICMP
//! datagram socket where the system allows it, else a raw socket (root).
//! Hysteresis: `probe_failures` consecutive failures to lose the gateway,
//! one success to see it again.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::config::Gateway;

/// The prober's verdict, sent on every change and every probe.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct GatewayReport {
    /// The verdict, after the hysteresis.
    pub reachable: bool,
    /// This probe was answered (it renews the lease).
    pub answered: bool,
}

pub struct WitnessProber {
    gateway: Gateway,
    interval: Duration,
    failures_to_lose: u32,
    report_to: Recipient<GatewayReport>,
    reachable: bool,
    failures: u32,
    probing: bool,
}

impl WitnessProber {
    pub fn new(
        gateway: Gateway,
        interval: Duration,
        failures_to_lose: u32,
        report_to: Recipient<GatewayReport>,
    ) -> Self {
        WitnessProber {
            gateway,
            interval,
            failures_to_lose: failures_to_lose.max(1),
            report_to,
            reachable: false,
            failures: 0,
            probing: false,
        }
    }
}

impl Actor for WitnessProber {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The first probe at once: a node that sees no gateway yet has no
        // majority without its peer (and steps down if the peer goes).
        self.probe_now(ctx);
        ctx.run_interval(self.interval, |w, ctx| w.probe_now(ctx));
    }
}

impl WitnessProber {
    fn probe_now(&mut self, ctx: &mut Context<Self>) {
        if self.probing {
            return;
        }
        self.probing = true;
        let gateway = self.gateway.clone();
        let timeout = self.interval.max(Duration::from_millis(50));
        ctx.spawn(probe(gateway, timeout).into_actor(self).map(|ok, w, _| {
            w.probing = false;
            w.record(ok);
        }));
    }

    fn record(&mut self, ok: bool) {
        let before = self.reachable;
        if ok {
            self.failures = 0;
            self.reachable = true;
        } else {
            self.failures += 1;
            if self.failures >= self.failures_to_lose {
                self.reachable = false;
            }
        }
        if before != self.reachable {
            tracing::info!(gateway = %self.gateway, reachable = self.reachable, "gateway reachability changed");
        }
        self.report_to.do_send(GatewayReport { reachable: self.reachable, answered: ok });
    }
}

/// One probe, bounded by `timeout`.
pub async fn probe(gateway: Gateway, timeout: Duration) -> bool {
    match gateway {
        Gateway::Tcp(addr) => probe_tcp(addr, timeout).await,
        Gateway::Icmp(ip) => tokio::task::spawn_blocking(move || probe_icmp(ip, timeout)).await.unwrap_or(false),
    }
}

async fn probe_tcp(addr: SocketAddr, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => true,
        // A refusal is an answer from the gateway's host.
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

fn probe_icmp(ip: IpAddr, timeout: Duration) -> bool {
    use socket2::{Domain, Protocol, Socket, Type};
    let IpAddr::V4(v4) = ip else {
        tracing::warn!(%ip, "ICMP probes support IPv4 only");
        return false;
    };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4))
        .or_else(|_| Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)));
    let Ok(socket) = socket else {
        tracing::warn!("cannot open an ICMP socket (no ping_group_range permission and not root)");
        return false;
    };
    let raw = socket.r#type().map(|t| t == Type::RAW).unwrap_or(false);
    let ident: u16 = rand::random();
    let seq: u16 = rand::random();
    let mut pkt = [8u8, 0, 0, 0, (ident >> 8) as u8, ident as u8, (seq >> 8) as u8, seq as u8, b't', b'w', b'i', b'n'];
    let sum = checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    let dest = SocketAddr::new(IpAddr::V4(v4), 0);
    let deadline = Instant::now() + timeout;
    // Only our gateway's packets: connect() filters replies by source address,
    // and lets us read with the safe `Read` impl.
    if socket.connect(&dest.into()).is_err() || socket.send(&pkt).is_err() {
        return false;
    }
    let mut socket = socket;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        let Ok(n) = std::io::Read::read(&mut socket, &mut buf) else { return false };
        let bytes = &buf[..n];
        // A raw socket hands us the IP header too.
        let icmp =
            if raw { bytes.get(((bytes.first().copied().unwrap_or(0x45) & 0x0f) as usize) * 4..) } else { Some(bytes) };
        if let Some(icmp) = icmp {
            // Echo reply (type 0); a datagram socket rewrites the identifier, so match the sequence.
            if icmp.len() >= 8 && icmp[0] == 0 && icmp[6..8] == pkt[6..8] {
                return true;
            }
        }
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_probe_counts_refusal_and_acceptance_as_reachable() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap();
        assert!(probe(Gateway::Tcp(open), Duration::from_millis(500)).await);
        drop(l);
        // Nothing listens now: loopback answers with a refusal.
        assert!(probe(Gateway::Tcp(open), Duration::from_millis(500)).await);
    }

    #[tokio::test]
    async fn tcp_probe_of_a_host_that_stopped_answering_fails_within_the_timeout() {
        use socket2::{Domain, Protocol, Socket, Type};
        // A loopback listener that never accepts: once its one-slot backlog is
        // full, further SYNs are dropped, as for a host that went away.
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        socket.listen(1).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let mut fill = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(100), tokio::net::TcpStream::connect(addr)).await
            {
                fill.push(s);
            }
        }
        let t = Instant::now();
        assert!(!probe(Gateway::Tcp(addr), Duration::from_millis(200)).await, "a full backlog does not answer");
        assert!(t.elapsed() < Duration::from_millis(400), "bounded by the probe timeout");
        drop(socket);
    }

    #[tokio::test]
    async fn icmp_probe_of_loopback_answers_where_icmp_sockets_are_allowed() {
        use socket2::{Domain, Protocol, Socket, Type};
        let allowed = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4)).is_ok()
            || Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).is_ok();
        if !allowed {
            eprintln!("SKIPPED: this user may not open ICMP sockets (ping_group_range, not root)");
            return;
        }
        assert!(probe(Gateway::Icmp("127.0.0.1".parse().unwrap()), Duration::from_millis(500)).await);
    }

    #[test]
    fn icmp_checksum_of_a_known_packet() {
        let pkt = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
        let sum = checksum(&pkt);
        let mut with = pkt;
        with[2..4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(checksum(&with), 0);
    }
}
