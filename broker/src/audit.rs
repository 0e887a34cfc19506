//! The audit log: one line per operator command, at target `twinmq::audit`
//! and starting `audit:`
//! (who, from where, what, with `--force` or not, and the result), and on a
//! passive node one line per admin change it applies from the active, so
//! that either node tells who changed users, ACLs, destinations and roles.
//! Select it with `RUST_LOG=info,twinmq::audit=info` (it is on at the
//! default level) or route the target to a file of its own. The passive's
//! lines come from the store writer as it applies the change
//! (`twinmq_store::writer`, same target).
//!
//! What a command carries is described, never dumped: a password hash
//! stays out of the log.

use std::net::SocketAddr;

use twinmq_protocol::AdminCommand;

/// What `command` does, in words fit for a log line (names are those the
/// broker validated or escaped; no secret).
pub fn describe(command: &AdminCommand) -> String {
    let n = |s: &str| crate::log_safe(s, 80);
    match command {
        AdminCommand::Promote { .. } => "promote --force".into(),
        AdminCommand::UserAdd { name, grants, .. } => {
            let gs: Vec<String> = grants.iter().map(|g| n(&g.to_string())).collect();
            format!("user add {} [{}]", n(name), gs.join(" "))
        }
        AdminCommand::UserPasswd { name, .. } => format!("user passwd {}", n(name)),
        AdminCommand::UserRm { name } => format!("user rm {}", n(name)),
        AdminCommand::AclGrant { user, grant } => format!("acl grant {} {}", n(user), n(&grant.to_string())),
        AdminCommand::AclRevoke { user, grant } => format!("acl revoke {} {}", n(user), n(&grant.to_string())),
        AdminCommand::QueueCreate { name } => format!("queue create {}", n(name)),
        AdminCommand::QueueRm { name } => format!("queue rm {}", n(name)),
        AdminCommand::QueuePurge { name } => format!("queue purge {}", n(name)),
        AdminCommand::TopicRmDurable { topic, name } => format!("topic rm-durable {} {}", n(topic), n(name)),
        other => other.name().to_string(),
    }
}

/// Whether a command only reads (listings): those are not audited.
pub fn reads_only(command: &AdminCommand) -> bool {
    matches!(
        command,
        AdminCommand::UserList
            | AdminCommand::AclList { .. }
            | AdminCommand::QueueList
            | AdminCommand::TopicList
            | AdminCommand::ListPage { .. }
    )
}

/// One operator command and its outcome.
pub fn command(who: &str, from: SocketAddr, what: &AdminCommand, force: bool, result: Result<(), &str>) {
    if reads_only(what) {
        return;
    }
    let what = describe(what);
    let who = crate::log_safe(who, 64);
    match result {
        Ok(()) => {
            tracing::info!(target: "twinmq::audit", %who, %from, %what, force, result = %"done", "audit: operator command")
        }
        Err(e) => {
            let why = crate::log_safe(e, 200);
            tracing::info!(target: "twinmq::audit", %who, %from, %what, force, result = %"refused", %why, "audit: operator command")
        }
    }
}
