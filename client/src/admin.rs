//! Admin connections: status, switchover, promote, and the management of
//! destinations, users and ACLs, for operators and the CLI.
//!
//! An admin connection says `Hello { admin: true }`; every node accepts it,
//! the passive one too, and it carries only `Status` and `Admin` requests,
//! one at a time. It does not fail over: it talks to one node, which is the
//! point (promote goes to the passive node, switchover to the active one).
//! [`AdminClient::switchover_any`] and [`AdminClient::promote_any`] find the
//! right node among the configured ones.
//!
//! The commands ([`AdminCommand`], with [`AclGrant`] and [`Permission`])
//! are the wire protocol's own types, re-exported: the operator surface
//! follows the broker release it manages (see `docs/COMPATIBILITY.md`),
//! unlike the messaging types of this crate, which are its own.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tracing::debug;
pub use twinmq_protocol::{AclGrant, AdminCommand, Permission};
use twinmq_protocol::{ClientFrame, ErrorContext, ServerFrame};

use crate::dial::Dialer;
use crate::link::{frame_name, is_final, Link, ServerInfo, TicketSlot};
use crate::{ClientConfig, ClientError, ErrorCode, NodeStatus};

/// What `promote --force` on one node would risk (see [`AdminClient::promote_risks`]).
///
/// ```no_run
/// # async fn demo(config: twinmq_client::ClientConfig) {
/// for risk in twinmq_client::AdminClient::promote_risks(&config).await {
///     println!("{}", risk.describe()); // e.g. what the peer held that this node lacks
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PromoteRisk {
    /// The node's address.
    pub addr: String,
    /// The node's id.
    pub node_id: String,
    /// Its role now (`passive`, `isolated`, ...).
    pub role: String,
    /// Why it does not serve (its last role change's reason).
    pub reason: String,
    /// Its store: (epoch of its last op, last op).
    pub holds: (u64, u64),
    /// Its peer's store, live or as last heard of; `None`: never heard of.
    pub peer: Option<(u64, u64)>,
    /// `peer` is what the peer says now (not a memory).
    pub peer_live: bool,
}

impl PromoteRisk {
    /// Ops the peer held that this node lacks, when both are of one epoch;
    /// `None` when it cannot be counted (another epoch, or no peer known).
    pub fn ops_at_risk(&self) -> Option<u64> {
        let (peer_epoch, peer_last) = self.peer?;
        (peer_epoch == self.holds.0 || peer_last <= self.holds.1).then(|| peer_last.saturating_sub(self.holds.1))
    }

    /// A few lines for an operator.
    pub fn describe(&self) -> String {
        let (epoch, last) = self.holds;
        let mut s = format!(
            "node {} at {} is {} ({})\n  it holds ops through {last} (epoch {epoch})\n",
            self.node_id, self.addr, self.role, self.reason
        );
        match self.peer {
            None => s.push_str(
                "  its peer was never heard of: whatever the peer confirmed may be missing here (unknown amount)\n",
            ),
            Some((pe, pl)) => {
                let when = if self.peer_live { "now" } else { "when last heard of" };
                s.push_str(&format!("  its peer held ops through {pl} (epoch {pe}) {when}\n"));
                match self.ops_at_risk() {
                    Some(0) => s.push_str(
                        "  nothing the peer held then is missing here; whatever it confirmed after that would be\n",
                    ),
                    Some(n) => s.push_str(&format!(
                        "  forcing it may lose {n} ops the peer held (messages, acks, admin changes), and whatever the peer confirmed after that\n"
                    )),
                    None => s.push_str(&format!(
                        "  the peer's history is of epoch {pe}: every op it wrote in it may be missing here\n"
                    )),
                }
            }
        }
        s
    }
}

/// An admin connection to one node. Requests wait up to the configured
/// `failover_timeout` for their answer.
///
/// ```no_run
/// # async fn demo() -> Result<(), twinmq_client::ClientError> {
/// use twinmq_client::admin::AdminCommand;
/// use twinmq_client::{AdminClient, ClientConfig};
/// let config = ClientConfig::new(["10.0.0.1:5570", "10.0.0.2:5570"]).user("root").password("secret");
/// // Changes go to whichever node is active.
/// AdminClient::command_on_active(&config, AdminCommand::QueueCreate { name: "orders".into() }, false).await?;
/// // Status from one node, passive or active.
/// let mut admin = AdminClient::connect_to("10.0.0.2:5570", &config).await?;
/// println!("{}", admin.status().await?.role);
/// admin.close().await;
/// # Ok(()) }
/// ```
pub struct AdminClient {
    link: Link,
    server: ServerInfo,
    next_req: u64,
    request_timeout: Duration,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient").field("server", &self.server).finish_non_exhaustive()
    }
}

impl AdminClient {
    /// Connect to the first node of `config.servers` that welcomes an admin
    /// connection (in order; one that does not answer delays the next by at
    /// most 150 ms). One round, no retries: the error of the last attempt if
    /// no node answers.
    pub async fn connect(config: &ClientConfig) -> Result<AdminClient, ClientError> {
        if config.servers.is_empty() {
            return Err(ClientError::NoServers);
        }
        let (link, server) = Dialer::new(Arc::new(config.clone()), true, TicketSlot::default()).round().await?;
        Ok(Self::new(link, server, config))
    }

    /// Connect to the node at `addr`.
    pub async fn connect_to(addr: &str, config: &ClientConfig) -> Result<AdminClient, ClientError> {
        let (link, server) = Link::open(addr, config, true, &TicketSlot::default()).await?;
        Ok(Self::new(link, server, config))
    }

    fn new(link: Link, server: ServerInfo, config: &ClientConfig) -> Self {
        AdminClient { link, server, next_req: 1, request_timeout: config.failover_timeout }
    }

    /// The node this connection talks to.
    pub fn server(&self) -> &ServerInfo {
        &self.server
    }

    /// The node's status (see [`NodeStatus`]; the whole report is [`NodeStatus::json`]).
    pub async fn status(&mut self) -> Result<NodeStatus, ClientError> {
        match self.request(|req| ClientFrame::Status { req }).await? {
            Reply::Status(json) => NodeStatus::parse(json),
            Reply::Done => Err(ClientError::UnexpectedFrame("Done for a status request".into())),
        }
    }

    /// Hand the active role to the peer (orderly: drain, hand over, clients
    /// move). This node must be the active one; a passive node refuses with
    /// [`ErrorCode::NotActive`].
    pub async fn switchover(&mut self) -> Result<(), ClientError> {
        self.admin(AdminCommand::Switchover).await
    }

    /// Make this (passive) node active. `force` overrides the safety checks
    /// (peer still seen, store not in sync); an active node refuses with
    /// [`ErrorCode::InvalidRequest`].
    pub async fn promote(&mut self, force: bool) -> Result<(), ClientError> {
        self.admin(AdminCommand::Promote { force }).await
    }

    /// Say Bye and close.
    pub async fn close(mut self) {
        if let Err(e) = self.link.send(&ClientFrame::Bye).await {
            debug!(error = %e, "could not say Bye");
        }
    }

    /// Switchover on whichever configured node is active: each node in turn,
    /// skipping those that are unreachable or answer `NotActive`. The node
    /// that switched over, or the last error.
    pub async fn switchover_any(config: &ClientConfig) -> Result<ServerInfo, ClientError> {
        Ok(Self::on_first_accepting(config, ErrorCode::NotActive, AdminCommand::Switchover, false).await?.0)
    }

    /// What forcing each configured node that does not serve would risk:
    /// its store against what its peer held when last heard of. Nodes that
    /// serve or do not answer are left out. Nothing is changed.
    pub async fn promote_risks(config: &ClientConfig) -> Vec<PromoteRisk> {
        let mut out = Vec::new();
        for addr in &config.servers {
            let Ok(mut admin) = AdminClient::connect_to(addr, config).await else { continue };
            let Ok(status) = admin.status().await else { continue };
            let Ok(s) = serde_json::from_str::<serde_json::Value>(status.json()) else { continue };
            let role = s["role"].as_str().unwrap_or("unknown").to_string();
            if role.starts_with("active") {
                continue;
            }
            let op = |v: &serde_json::Value| (v["epoch"].as_u64().unwrap_or(0), v["last_op"].as_u64().unwrap_or(0));
            let live = (s["peer"]["state"] == "up").then(|| {
                (s["peer"]["last_op_epoch"].as_u64().unwrap_or(0), s["peer"]["last_op"].as_u64().unwrap_or(0))
            });
            out.push(PromoteRisk {
                addr: addr.clone(),
                node_id: s["node_id"].as_str().unwrap_or_default().to_string(),
                role,
                reason: s["last_role_reason"].as_str().unwrap_or_default().to_string(),
                holds: (s["store"]["last_op_epoch"].as_u64().unwrap_or(0), s["last_op"].as_u64().unwrap_or(0)),
                peer: live
                    .or_else(|| s["store"]["peer_last_known"].is_object().then(|| op(&s["store"]["peer_last_known"]))),
                peer_live: live.is_some(),
            });
        }
        out
    }

    /// Promote whichever configured node is passive: each node in turn,
    /// skipping those that are unreachable or answer `InvalidRequest`
    /// (already active). The node promoted, or the last error.
    pub async fn promote_any(config: &ClientConfig, force: bool) -> Result<ServerInfo, ClientError> {
        Ok(Self::on_first_accepting(config, ErrorCode::InvalidRequest, AdminCommand::Promote { force }, false).await?.0)
    }

    /// Run an operator command on this node: `Ok(None)` when done,
    /// `Ok(Some(json))` for listings. `force` lets a change of destinations,
    /// users or ACLs through while the pair is split.
    pub async fn command(&mut self, command: AdminCommand, force: bool) -> Result<Option<String>, ClientError> {
        match self.request(|req| ClientFrame::Admin { req, command, force }).await? {
            Reply::Done => Ok(None),
            Reply::Status(json) => Ok(Some(json)),
        }
    }

    /// Run an operator command on whichever configured node is active (changes
    /// must go to the active node; it replicates them to its peer).
    pub async fn command_on_active(
        config: &ClientConfig,
        command: AdminCommand,
        force: bool,
    ) -> Result<(ServerInfo, Option<String>), ClientError> {
        Self::on_first_accepting(config, ErrorCode::NotActive, command, force).await
    }

    async fn on_first_accepting(
        config: &ClientConfig,
        skip: ErrorCode,
        command: AdminCommand,
        force: bool,
    ) -> Result<(ServerInfo, Option<String>), ClientError> {
        let mut last_error = ClientError::NoServers;
        for addr in &config.servers {
            let mut admin = match Self::connect_to(addr, config).await {
                Ok(admin) => admin,
                Err(e) if is_final(&e) => return Err(e),
                Err(e) => {
                    debug!(addr, error = %e, "node not reachable for admin");
                    last_error = e;
                    continue;
                }
            };
            match admin.command(command.clone(), force).await {
                Ok(reply) => {
                    let server = admin.server.clone();
                    admin.close().await;
                    return Ok((server, reply));
                }
                Err(e) if e.code() == Some(skip) => {
                    debug!(addr, error = %e, "not the node for this command");
                    admin.close().await;
                    last_error = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error)
    }

    async fn admin(&mut self, command: AdminCommand) -> Result<(), ClientError> {
        match self.command(command, false).await? {
            None => Ok(()),
            Some(_) => Err(ClientError::UnexpectedFrame("a listing for a command that answers Done".into())),
        }
    }

    /// Send the request `frame(req)` and wait for its answer.
    async fn request(&mut self, frame: impl FnOnce(u64) -> ClientFrame) -> Result<Reply, ClientError> {
        let req = self.next_req;
        self.next_req += 1;
        self.link.send(&frame(req)).await?;
        let after = self.request_timeout;
        match tokio::time::timeout(after, self.answer(req)).await {
            Ok(answer) => answer,
            Err(_) => Err(ClientError::Timeout { what: format!("admin request to {}", self.server.addr), after }),
        }
    }

    async fn answer(&mut self, req: u64) -> Result<Reply, ClientError> {
        loop {
            let frame = match self.link.reader.next().await {
                Some(frame) => frame?,
                None => return Err(ClientError::Disconnected),
            };
            match frame {
                ServerFrame::Done { req: r } if r == req => return Ok(Reply::Done),
                ServerFrame::StatusReply { req: r, json } if r == req => return Ok(Reply::Status(json)),
                ServerFrame::AdminReply { req: r, json } if r == req => return Ok(Reply::Status(json)),
                ServerFrame::Error(e) if matches!(e.context, ErrorContext::Request { req: r } if r == req) => {
                    return Err(ClientError::Broker { code: ErrorCode::from_wire(e.code), message: e.message })
                }
                ServerFrame::Error(e) if e.context == ErrorContext::Connection => {
                    return Err(ClientError::Broker { code: ErrorCode::from_wire(e.code), message: e.message })
                }
                other => debug!(frame = frame_name(&other), "ignored on the admin connection"),
            }
        }
    }
}

enum Reply {
    Done,
    Status(String),
}
