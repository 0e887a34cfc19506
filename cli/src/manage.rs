//! `twinmq user|acl|queue|topic ...`: manage the admin objects of a pair.
//!
//! Changes go to whichever configured node is active (it stores them and
//! replicates them to its peer); they are refused while the pair is split
//! unless `--force`. Passwords are hashed here (argon2id): the broker only
//! ever receives the hash. Output: one `done` line per change, tab-separated
//! rows for listings (stdout), diagnostics on stderr.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use twinmq_client::admin::{AclGrant, AdminCommand};
use twinmq_client::{AdminClient, ClientConfig};

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Create a user; the password comes from --new-password or the first line of stdin.
    Add {
        name: String,
        #[arg(long, env = "TWINMQ_NEW_PASSWORD", hide_env_values = true)]
        new_password: Option<String>,
        /// PERMISSION:PATTERN (produce|consume|admin), repeatable: `--grant produce:orders.*`.
        #[arg(long = "grant", value_parser = parse_grant)]
        grants: Vec<AclGrant>,
        #[command(flatten)]
        force: Force,
    },
    /// Change a user's password (from --new-password or stdin).
    Passwd {
        name: String,
        #[arg(long, env = "TWINMQ_NEW_PASSWORD", hide_env_values = true)]
        new_password: Option<String>,
        #[command(flatten)]
        force: Force,
    },
    /// Remove a user; their open connections are closed.
    Rm {
        name: String,
        #[command(flatten)]
        force: Force,
    },
    /// List users and their grants.
    List,
}

#[derive(Debug, Subcommand)]
pub enum AclCmd {
    /// Allow USER PERMISSION:PATTERN (e.g. `consume:orders.#`); applies to open connections at once.
    Grant {
        // Its own id: sharing `user` with the global `--user` made the tool
        // log in as the target user (issue 10, finding 12).
        #[arg(id = "target_user", value_name = "USER")]
        user: String,
        #[arg(value_parser = parse_grant)]
        grant: AclGrant,
        #[command(flatten)]
        force: Force,
    },
    /// Remove exactly that grant; applies to open connections at once.
    Revoke {
        #[arg(id = "target_user", value_name = "USER")]
        user: String,
        #[arg(value_parser = parse_grant)]
        grant: AclGrant,
        #[command(flatten)]
        force: Force,
    },
    /// List the grants of USER, or of every user.
    List {
        #[arg(id = "target_user", value_name = "USER")]
        user: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCmd {
    Create {
        name: String,
        #[command(flatten)]
        force: Force,
    },
    /// Delete a queue and every message in it; its consumers are closed.
    Rm {
        name: String,
        #[command(flatten)]
        force: Force,
    },
    /// Queues (and durable subscriptions) with depth, in flight and consumers.
    List,
    /// Drop the messages waiting in a queue (not those out for delivery); prints `purged N`.
    Purge { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TopicCmd {
    /// Topics with their subscribers and durable subscriptions.
    List,
    /// Delete the durable subscription NAME on TOPIC and the messages it holds.
    RmDurable {
        topic: String,
        name: String,
        #[command(flatten)]
        force: Force,
    },
}

#[derive(Debug, Args)]
pub struct Force {
    /// Apply even while the pair is split (the two stores may then disagree on it).
    #[arg(long)]
    force: bool,
}

fn parse_grant(text: &str) -> Result<AclGrant, String> {
    text.parse()
}

fn new_password(given: Option<String>) -> anyhow::Result<String> {
    match given {
        Some(p) => Ok(p),
        None => super::read_stdin_line().context("could not read the new password from stdin"),
    }
}

async fn change(config: &ClientConfig, command: AdminCommand, force: bool, done: String) -> anyhow::Result<ExitCode> {
    let name = command.name();
    AdminClient::command_on_active(config, command, force).await.with_context(|| format!("{name} failed"))?;
    println!("{done}");
    Ok(ExitCode::SUCCESS)
}

async fn listing(config: &ClientConfig, command: AdminCommand) -> anyhow::Result<serde_json::Value> {
    let name = command.name();
    let (_, json) =
        AdminClient::command_on_active(config, command, false).await.with_context(|| format!("{name} failed"))?;
    let json = json.with_context(|| format!("{name}: the broker sent no listing"))?;
    serde_json::from_str(&json).with_context(|| format!("{name}: unreadable listing"))
}

/// Every queue (`kind` "queues") or topic ("topics"), page by page: the
/// broker answers at most a thousand of each per request.
async fn pages(config: &ClientConfig, kind: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let v = listing(config, AdminCommand::ListPage { after: after.take(), limit: 1000 }).await?;
        all.extend(v[kind].as_array().into_iter().flatten().cloned());
        match v[format!("{kind}_next")].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return Ok(all),
        }
    }
}

fn print_users(v: &serde_json::Value) {
    println!("NAME\tSOURCE\tGRANTS");
    for u in v["users"].as_array().into_iter().flatten() {
        let grants: Vec<&str> = u["grants"].as_array().into_iter().flatten().filter_map(|g| g.as_str()).collect();
        println!(
            "{}\t{}\t{}",
            u["name"].as_str().unwrap_or("?"),
            u["source"].as_str().unwrap_or("?"),
            grants.join(" ")
        );
    }
}

pub async fn user(config: ClientConfig, cmd: UserCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        UserCmd::Add { name, new_password: p, grants, force } => {
            let password_hash = super::phc_hash(&new_password(p)?)?;
            let done = format!("user added {name}");
            change(&config, AdminCommand::UserAdd { name, password_hash, grants }, force.force, done).await
        }
        UserCmd::Passwd { name, new_password: p, force } => {
            let password_hash = super::phc_hash(&new_password(p)?)?;
            let done = format!("password changed {name}");
            change(&config, AdminCommand::UserPasswd { name, password_hash }, force.force, done).await
        }
        UserCmd::Rm { name, force } => {
            let done = format!("user removed {name}");
            change(&config, AdminCommand::UserRm { name }, force.force, done).await
        }
        UserCmd::List => {
            print_users(&listing(&config, AdminCommand::UserList).await?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn acl(config: ClientConfig, cmd: AclCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AclCmd::Grant { user, grant, force } => {
            let done = format!("granted {user} {grant}");
            change(&config, AdminCommand::AclGrant { user, grant }, force.force, done).await
        }
        AclCmd::Revoke { user, grant, force } => {
            let done = format!("revoked {user} {grant}");
            change(&config, AdminCommand::AclRevoke { user, grant }, force.force, done).await
        }
        AclCmd::List { user } => {
            print_users(&listing(&config, AdminCommand::AclList { user }).await?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn queue(config: ClientConfig, cmd: QueueCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        QueueCmd::Create { name, force } => {
            let done = format!("queue created {name}");
            change(&config, AdminCommand::QueueCreate { name }, force.force, done).await
        }
        QueueCmd::Rm { name, force } => {
            let done = format!("queue removed {name}");
            change(&config, AdminCommand::QueueRm { name }, force.force, done).await
        }
        QueueCmd::Purge { name } => {
            let v = listing(&config, AdminCommand::QueuePurge { name }).await?;
            println!("purged {}", v["purged"]);
            Ok(ExitCode::SUCCESS)
        }
        QueueCmd::List => {
            println!("NAME\tDEPTH\tIN_FLIGHT\tCONSUMERS");
            for q in pages(&config, "queues").await? {
                println!(
                    "{}\t{}\t{}\t{}",
                    q["name"].as_str().unwrap_or("?"),
                    q["depth"],
                    q["in_flight"],
                    q["consumers"]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn topic(config: ClientConfig, cmd: TopicCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TopicCmd::RmDurable { topic, name, force } => {
            let done = format!("durable subscription removed {name} on {topic}");
            change(&config, AdminCommand::TopicRmDurable { topic, name }, force.force, done).await
        }
        TopicCmd::List => {
            println!("NAME\tSUBSCRIBERS\tDURABLE_SUBSCRIPTIONS");
            for t in pages(&config, "topics").await? {
                println!("{}\t{}\t{}", t["name"].as_str().unwrap_or("?"), t["subscribers"], t["durable_subscriptions"]);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
