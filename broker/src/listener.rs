//! `Listener`: the client port.
//!
//! Owns the listening socket (options set here, through socket2, in one
//! place), the accept loop, and the limits on connections that have not
//! logged in yet. Each accepted connection is served on one of the I/O
//! arbiters, round robin.
//!
//! A connection is *pending* until its Hello is accepted (5 s at most,
//! TLS handshake included): at most [`MAX_PENDING`] of them, and
//! [`MAX_PENDING_PER_ADDRESS`] from one address, wait at once; beyond,
//! they are refused at once. `max_connections` counts logged-in ones, at
//! the Hello (`connection.rs`), so idle sockets re-opened by someone who
//! cannot log in take no place from those who can (issue 10, finding 11).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use futures_util::SinkExt;
use socket2::{Domain, Protocol, Socket, Type};
use tokio_util::codec::FramedWrite;
use twinmq_protocol::{ClientFrame, ErrorCode, ErrorContext, ErrorFrame, FrameCodec, ServerFrame};

use crate::config::ClientPortTls;
use crate::connection::{self, ConnectionContext};
use crate::BrokerError;

/// Bind the client port with the options we rely on.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, BrokerError> {
    let bind_err = |source| BrokerError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(bind_err)?;
    // A restarted broker must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true).map_err(bind_err)?;
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(1024).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    Ok(socket.into())
}

/// Options on each accepted connection.
pub fn configure_stream(stream: &std::net::TcpStream) -> std::io::Result<()> {
    let s = socket2::SockRef::from(stream);
    // Confirms are small and latency-bound: no Nagle delay.
    s.set_nodelay(true)?;
    s.set_keepalive(true)?;
    s.set_nonblocking(true)?;
    Ok(())
}

/// Which protocol a listener's connections speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireProtocol {
    /// twinmq's own (`connection.rs`).
    Native,
    /// STOMP 1.2 (`stomp.rs`), on `stomp_listen`.
    Stomp,
}

pub struct Listener {
    protocol: WireProtocol,
    listener: Option<tokio::net::TcpListener>,
    io: Vec<ArbiterHandle>,
    next_io: usize,
    cx: ConnectionContext,
    /// Connections waiting to log in (see the module doc).
    pending: Arc<Mutex<Pending>>,
    /// Refused for want of a pending place (logged at powers of two).
    refusals: u64,
}

impl Listener {
    pub fn new(listener: tokio::net::TcpListener, io: Vec<ArbiterHandle>, cx: ConnectionContext) -> Listener {
        Listener::for_protocol(WireProtocol::Native, listener, io, cx)
    }

    pub fn for_protocol(
        protocol: WireProtocol,
        listener: tokio::net::TcpListener,
        io: Vec<ArbiterHandle>,
        cx: ConnectionContext,
    ) -> Listener {
        Listener { protocol, listener: Some(listener), io, next_io: 0, cx, pending: Arc::default(), refusals: 0 }
    }
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(listener) = self.listener.take() else { return };
        let me = ctx.address();
        ctx.spawn(
            async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => match stream.into_std() {
                            Ok(s) => me.do_send(Accepted(s, peer)),
                            Err(e) => tracing::warn!(error = %e, "cannot take accepted socket"),
                        },
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            .into_actor(self),
        );
    }
}

/// Most connections waiting to log in, from everywhere.
pub const MAX_PENDING: usize = 2048;
/// Most connections waiting to log in from one address (IPv6: one /64).
pub const MAX_PENDING_PER_ADDRESS: u32 = 512;

/// Whom the per-address bound counts together: an IPv4 address, or an IPv6
/// /64 (one host usually holds the whole /64, so single addresses would
/// give it endless places).
fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[derive(Default)]
struct Pending {
    total: usize,
    by_address: HashMap<IpAddr, u32>,
}

/// A place among the pending connections, given back when dropped (the
/// connection logged in, or ended).
pub struct PendingSlot {
    pending: Arc<Mutex<Pending>>,
    ip: IpAddr,
}

impl PendingSlot {
    fn take(pending: &Arc<Mutex<Pending>>, ip: IpAddr) -> Result<PendingSlot, &'static str> {
        let mut p = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if p.total >= MAX_PENDING {
            return Err("too many connections waiting to log in");
        }
        let n = p.by_address.entry(ip).or_insert(0);
        if *n >= MAX_PENDING_PER_ADDRESS {
            return Err("too many connections waiting to log in from this address");
        }
        *n += 1;
        p.total += 1;
        Ok(PendingSlot { pending: pending.clone(), ip })
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut p = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        p.total = p.total.saturating_sub(1);
        if let Some(n) = p.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                p.by_address.remove(&self.ip);
            }
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Accepted(std::net::TcpStream, SocketAddr);

impl Handler<Accepted> for Listener {
    type Result = ();
    fn handle(&mut self, Accepted(stream, peer): Accepted, _: &mut Context<Self>) {
        if let Err(e) = configure_stream(&stream) {
            tracing::warn!(%peer, error = %e, "cannot set socket options; dropping connection");
            return;
        }
        let shared = self.cx.shared.clone();
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let arbiter = &self.io[self.next_io % self.io.len()];
        self.next_io += 1;
        let slot = match PendingSlot::take(&self.pending, address_group(peer.ip())) {
            Ok(slot) => slot,
            Err(why) => {
                self.refusals += 1;
                if self.refusals.is_power_of_two() {
                    tracing::warn!(%peer, refused = self.refusals, "{why}; refusing");
                }
                let tls = self.cx.config.tls.clone();
                let protocol = self.protocol;
                arbiter.spawn(async move {
                    refuse(stream, tls, protocol, why).await;
                    shared.connections.fetch_sub(1, Ordering::SeqCst);
                });
                return;
            }
        };
        let cx = self.cx.clone();
        let protocol = self.protocol;
        arbiter.spawn(async move {
            match protocol {
                WireProtocol::Native => connection::serve(stream, peer, cx, slot).await,
                WireProtocol::Stomp => crate::stomp::serve(stream, peer, cx, slot).await,
            }
            shared.connections.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Tell a connection over the limit why it is closed: in TLS when the port
/// speaks TLS (bounded), or the client would take the refusal for a TLS failure.
async fn refuse(stream: std::net::TcpStream, tls: Option<ClientPortTls>, protocol: WireProtocol, why: &'static str) {
    let Ok(s) = tokio::net::TcpStream::from_std(stream) else { return };
    match tls {
        None => send_refusal(s, protocol, why).await,
        Some(tls) => {
            if let Ok(Ok(s)) = tokio::time::timeout(REFUSAL_HANDSHAKE_TIMEOUT, tls.acceptor().accept(s)).await {
                send_refusal(s, protocol, why).await;
            }
        }
    }
}

/// A refused connection gets this long for its TLS handshake.
const REFUSAL_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn send_refusal<S: tokio::io::AsyncWrite + Unpin>(mut s: S, protocol: WireProtocol, why: &'static str) {
    match protocol {
        WireProtocol::Native => {
            let mut w = FramedWrite::new(s, FrameCodec::<ClientFrame, ServerFrame>::new(64 * 1024));
            let _ = w
                .send(ServerFrame::Error(ErrorFrame::new(ErrorCode::LimitReached, ErrorContext::Connection, why)))
                .await;
        }
        WireProtocol::Stomp => {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(&crate::stomp::refusal(why)).await;
            let _ = s.flush().await;
        }
    }
}

/// Stop accepting connections (shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAccepting;

impl Handler<StopAccepting> for Listener {
    type Result = ();
    fn handle(&mut self, _: StopAccepting, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap_or(IpAddr::from([0u8; 4]));
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap_or(IpAddr::from([0u8; 4]));
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(IpAddr::from([0u8; 4]));
        assert_eq!(address_group(a), address_group(b));
        assert_ne!(address_group(a), address_group(c));
        let v4: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([0u8; 4]));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap_or(IpAddr::from([0u8; 4]));
        assert_eq!(address_group(mapped), v4);
        assert_ne!(address_group("10.0.0.2".parse().unwrap_or(v4)), address_group(v4));
    }
}
