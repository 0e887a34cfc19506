//! Broker configuration: every key declared once, in [`Settings`].
//!
//! `Settings` is at once the TOML file's format (serde), the command line
//! (clap: each key a `--kebab-case` flag, its doc comment the help text) and
//! the environment (`TWINMQ_<KEY>`), so a key cannot exist in one of them and
//! be forgotten in another. figment layers them: built-in defaults, then the
//! file (`--config`), then the environment, then flags; a later layer
//! replaces the keys it sets, except the lists of things to create
//! (`queues`, `users`), which add up across layers. [`Config::from_settings`]
//! then applies the defaults and the validation rules, whose errors name the
//! key (`invalid value for `key`: ...`). The daemon exits with code 2 on any
//! configuration error. The reference table is in README.md.
//!
//! **The environment.** `TWINMQ_` and the key in capitals:
//! `TWINMQ_MAX_QUEUE_DEPTH=5000`, `TWINMQ_CLUSTER_SECRET=...`. Only names of
//! keys are read: the `TWINMQ_` prefix is shared with the `twinmq` tool
//! (`TWINMQ_SERVERS`, `TWINMQ_PASSWORD`) and the test knobs, so any other
//! `TWINMQ_*` variable is ignored, not refused (the daemon logs the names of
//! the keys it took from the environment, never their values). A value is
//! taken as written, without quotes or escapes, and converted to the key's
//! type (`true`/`false`/`yes`/`no`, numbers); a list takes a TOML array:
//! `TWINMQ_QUEUES='["orders", "audit"]'`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{CommandFactory, Parser};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::{Deserialize, Serialize};
use twinmq_store::Durability;

use crate::security::StaticUser;
use crate::BrokerError;

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A layer whose values cannot be layered (a path that is not UTF-8).
    #[error("{layer}: {message}")]
    Unusable { layer: &'static str, message: String },
    /// A `TWINMQ_<KEY>` variable whose value does not fit its key.
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    /// Listening sockets handed over by socket activation (`LISTEN_FDS`)
    /// that do not fit the configuration.
    #[error("socket activation: {0}")]
    Activation(String),
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// A user allowed to connect, defined in the file (static: `twinmq user`
/// commands cannot change it). Prefer `password_hash` (an argon2 PHC string
/// from `twinmq hash-password`); a plain `password` is hashed at start.
/// `grants` (`PERMISSION:PATTERN`, see `security.rs`) default to everything:
/// `produce:#`, `consume:#`, `admin:#`. On the command line: `--user NAME=HASH`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub password_hash: Option<String>,
    pub password: Option<String>,
    pub grants: Option<Vec<String>>,
}

impl UserConfig {
    /// The user's grants, parsed (defaults to everything).
    pub fn acl(&self) -> Result<Vec<twinmq_protocol::AclGrant>, String> {
        match &self.grants {
            None => Ok(["produce:#", "consume:#", "admin:#"].iter().filter_map(|g| g.parse().ok()).collect()),
            Some(gs) => gs
                .iter()
                .map(|g| {
                    let grant: twinmq_protocol::AclGrant = g.parse()?;
                    crate::security::Pattern::parse(&grant.pattern)?;
                    Ok(grant)
                })
                .collect(),
        }
    }
}

/// `--user NAME=HASH`: a user with a password hash and every grant.
fn user_flag(text: &str) -> Result<UserConfig, String> {
    let (name, hash) = text.split_once('=').ok_or_else(|| format!("`{text}` is not NAME=HASH"))?;
    Ok(UserConfig { name: name.into(), password_hash: Some(hash.into()), password: None, grants: None })
}

/// Every configuration key, declared once: the TOML file's format, the
/// flags of `twinmqd` and the `TWINMQ_<KEY>` environment. A key left unset
/// in every layer is `None` (or empty) here and gets its default in
/// [`Config::from_settings`]; the defaults are listed in README.md.
///
/// Each key's flag is its name in kebab case (`max_queue_depth` is
/// `--max-queue-depth`), except the repeatable `--queue` and `--user`
/// (one item each), whose keys are the lists `queues` and `users`.
#[derive(Debug, Clone, Default, PartialEq, Parser, Serialize, Deserialize)]
#[command(name = "twinmqd", version, about = "twinmq broker daemon", long_about = None)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// TOML configuration file; the environment (`TWINMQ_<KEY>`) and flags override its keys.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Validate FILE (with the environment and the other flags on top, as a
    /// start would), print what is wrong naming the key, and exit: 0 when it
    /// is valid, 2 when not. Nothing is bound or opened.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    #[serde(skip)]
    pub check_config: Option<PathBuf>,
    /// Name of this node (also recorded in the data directory).
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,
    /// Directory of the sled store.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Client listen address.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// When a publish is confirmed: none | local | replicated.
    #[arg(long, value_name = "MODE")]
    pub durability: Option<String>,
    /// Largest frame accepted, bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Largest message payload accepted, bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Most client connections at once.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most unconfirmed publishes one connection may have; past it the broker stops reading it.
    #[arg(long, value_name = "N")]
    pub max_inflight_per_connection: Option<usize>,
    /// Most messages one queue holds; publishes beyond are refused with LimitReached.
    #[arg(long, value_name = "N")]
    pub max_queue_depth: Option<usize>,
    /// Most bytes one queue (or subscription) holds: payloads, headers and 128 bytes per message.
    #[arg(long, value_name = "BYTES")]
    pub max_queue_bytes: Option<usize>,
    /// Most subscriptions one connection may hold open.
    #[arg(long, value_name = "N")]
    pub max_subscriptions_per_connection: Option<usize>,
    /// sled's page cache, bytes.
    #[arg(long, value_name = "BYTES")]
    pub cache_bytes: Option<usize>,
    /// Most bytes the data directory may take before new messages are refused (0: no limit of its own).
    #[arg(long, value_name = "BYTES")]
    pub max_disk_bytes: Option<u64>,
    /// New messages are refused while the data directory's file system has less free than this.
    #[arg(long, value_name = "BYTES")]
    pub min_free_disk_bytes: Option<u64>,
    /// Message bodies kept in memory (half for the newest messages of each queue, half read back from disk), bytes.
    #[arg(long, value_name = "BYTES")]
    pub body_cache_bytes: Option<usize>,
    /// Bytes a second the compactor may read and write, rewriting records pinned by a few live messages (0: none).
    #[arg(long, value_name = "BYTES")]
    pub compaction_bytes_per_sec: Option<u64>,
    /// No compaction while the store's records take less than this, bytes.
    #[arg(long, value_name = "BYTES")]
    pub compaction_min_bytes: Option<u64>,
    /// Records younger than this are not compacted (their messages may still be consumed), ms.
    #[arg(long, value_name = "MS")]
    pub compaction_min_age_ms: Option<u64>,
    /// Most destinations (queues, topics, durable subscriptions) a node holds.
    #[arg(long, value_name = "N")]
    pub max_destinations: Option<usize>,
    /// Unacked deliveries go back to the queue after this long (0: never).
    #[arg(long, value_name = "MS")]
    pub ack_timeout_ms: Option<u64>,
    /// Deliveries of one message before it moves to the dead-letter queue `<queue>.dlq`.
    #[arg(long, value_name = "N")]
    pub max_redeliveries: Option<u32>,
    /// Create queues on first use (true) or refuse unknown ones (false).
    #[arg(long, value_name = "BOOL")]
    pub auto_create: Option<bool>,
    /// Threads serving client connections.
    #[arg(long, value_name = "N")]
    pub io_threads: Option<usize>,
    /// Most ops in one group commit.
    #[arg(long, value_name = "N")]
    pub max_batch_ops: Option<usize>,
    /// A flush slower than this counts as a failed disk: nothing is confirmed after it on this node.
    #[arg(long, value_name = "MS")]
    pub disk_stall_ms: Option<u64>,
    /// Queue to create at start (repeatable; adds to the file's `queues`).
    #[arg(long = "queue", value_name = "NAME")]
    pub queues: Vec<String>,
    /// User allowed to connect, as NAME=ARGON2_PHC_HASH (repeatable; adds to the file's `[[users]]`).
    #[arg(long = "user", value_name = "NAME=HASH", value_parser = user_flag)]
    pub users: Vec<UserConfig>,
    /// Pair: this node's priority; the higher one is preferred (ties: lower node id).
    #[arg(long, value_name = "N")]
    pub priority: Option<u32>,
    /// Pair: listen address of the HA port (separate from the client port).
    #[arg(long, value_name = "HOST:PORT")]
    pub ha_listen: Option<String>,
    /// Pair: every path to the peer's HA port, the dedicated link first (comma-separated).
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT]", value_delimiter = ',')]
    pub peer_ha: Vec<String>,
    /// Pair: the peer's client address, given to clients as a redirect hint.
    #[arg(long, value_name = "HOST:PORT")]
    pub peer_client: Option<String>,
    /// Pair: the witness, tcp://HOST:PORT or icmp://IP.
    #[arg(long, value_name = "URL")]
    pub gateway: Option<String>,
    /// Pair: the shared secret both nodes prove on the HA link, as `twinmq gen-secret` writes it (prefer cluster_secret_file).
    #[arg(long, value_name = "SECRET")]
    pub cluster_secret: Option<String>,
    /// Pair: a file (mode 600) holding the cluster secret, one per line: the first is proved, all are accepted (rotation).
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Pair: heartbeat interval.
    #[arg(long, value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// Pair: the peer is down when every path is silent this long.
    #[arg(long, value_name = "MS")]
    pub peer_timeout_ms: Option<u64>,
    /// Pair: an active node that hears neither peer nor gateway this long steps down.
    #[arg(long, value_name = "MS")]
    pub isolation_timeout_ms: Option<u64>,
    /// Pair: a passive node waits this long after the peer went silent before taking over.
    #[arg(long, value_name = "MS")]
    pub takeover_delay_ms: Option<u64>,
    /// Pair: gateway probe interval.
    #[arg(long, value_name = "MS")]
    pub probe_interval_ms: Option<u64>,
    /// Pair: consecutive failed probes before the gateway counts as lost.
    #[arg(long, value_name = "N")]
    pub probe_failures: Option<u32>,
    /// Pair: auto (the preferred node takes the role back once caught up) or manual.
    #[arg(long, value_name = "auto|manual")]
    pub failback: Option<String>,
    /// Pair: with `replicated`, refuse publishes while no in-sync peer holds a copy.
    #[arg(long, value_name = "BOOL")]
    pub require_replica: Option<bool>,
    /// Pair: allow creating and deleting destinations while the peer is down (forced).
    #[arg(long, value_name = "BOOL")]
    pub admin_when_split: Option<bool>,
    /// Admin HTTP endpoint (/, /status, /metrics, POST /switchover); off when unset.
    #[arg(long, value_name = "HOST:PORT")]
    pub http_listen: Option<String>,
    /// Credential for the admin HTTP endpoint: Bearer token, or Basic password (prefer env TWINMQ_HTTP_TOKEN).
    #[arg(long, value_name = "TOKEN")]
    pub http_token: Option<String>,
    /// Serve the admin HTTP endpoint over HTTPS, with the client port's tls_cert and tls_key.
    #[arg(long, value_name = "BOOL")]
    pub http_tls: Option<bool>,
    /// Host names the admin HTTP endpoint answers to, besides IP addresses and localhost (comma-separated).
    #[arg(long, value_name = "NAME[,NAME]", value_delimiter = ',')]
    pub http_hosts: Vec<String>,
    /// TLS on the client port: this node's certificate chain (PEM); needs tls_key.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS on the client port: the private key of tls_cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// TLS on the client port: require client certificates signed by this CA (PEM; mutual TLS).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Pair: TLS on the HA port: this node's certificate chain (PEM); needs ha_tls_key and ha_tls_ca.
    #[arg(long, value_name = "FILE")]
    pub ha_tls_cert: Option<PathBuf>,
    /// Pair: the private key of ha_tls_cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub ha_tls_key: Option<PathBuf>,
    /// Pair: the CA (PEM) that signed the peer's HA certificate.
    #[arg(long, value_name = "FILE")]
    pub ha_tls_ca: Option<PathBuf>,
    /// Pair: the accepting side requires a client certificate signed by ha_tls_ca (mutual TLS).
    #[arg(long, value_name = "BOOL")]
    pub ha_tls_require_client_cert: Option<bool>,
    /// Pair: the DNS name verified in the peer's certificate (default: the IP address dialed).
    #[arg(long, value_name = "NAME")]
    pub ha_tls_server_name: Option<String>,
    /// Most consumers on one queue, topic or durable subscription; more are refused with LimitReached.
    #[arg(long, value_name = "N")]
    pub max_consumers_per_destination: Option<usize>,
    /// A publish to a full queue: reject (LimitReached) or block (held unconfirmed until there is room).
    #[arg(long, value_name = "reject|block")]
    pub queue_full: Option<String>,
    /// Close a client connection that sent nothing (not even a Ping) for this long (0: never).
    #[arg(long, value_name = "MS")]
    pub idle_timeout_ms: Option<u64>,
    /// STOMP 1.2 listen address (off when unset): the same users, ACLs, limits, TLS and durability as `listen`.
    #[arg(long, value_name = "HOST:PORT")]
    pub stomp_listen: Option<String>,
}

/// The keys whose values differ between two layered configurations, by
/// name (what a reload reports as applied or as needing a restart).
pub fn changed_keys(before: &Settings, after: &Settings) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(before), serde_json::to_value(after))
    else {
        // Only a path that is not UTF-8 fails to serialize: call every key changed.
        return keys().into_iter().map(|k| k.name).collect();
    };
    let mut changed: Vec<String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    changed.sort();
    changed.dedup();
    changed
}

/// The prefix of the environment layer: `TWINMQ_MAX_QUEUE_DEPTH` sets `max_queue_depth`.
pub const ENV_PREFIX: &str = "TWINMQ_";

/// Keys whose values add up across layers (things to create at start)
/// instead of being replaced by the later layer.
const ADDED_UP: [&str; 2] = ["queues", "users"];

/// One configuration key as the declaration in [`Settings`] gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    /// The TOML key (and, in capitals after `TWINMQ_`, the variable).
    name: String,
    /// A list (a repeatable flag, a TOML array).
    list: bool,
}

/// Every key, read off the clap side of the one declaration (the serde side
/// has the same names: a test holds them equal).
fn keys() -> Vec<Key> {
    Settings::command()
        .get_arguments()
        .filter(|a| {
            a.get_long().is_some() && !["config", "check_config", "help", "version"].contains(&a.get_id().as_str())
        })
        .map(|a| Key { name: a.get_id().to_string(), list: matches!(a.get_action(), clap::ArgAction::Append) })
        .collect()
}

impl Settings {
    /// The keys this layer sets, as figment data: unset keys (`None`, empty
    /// lists) are left out so that they do not hide a lower layer's value.
    /// Split in two: the keys that replace and the lists that add up.
    fn layer(&self, layer: &'static str) -> Result<(Dict, Dict), ConfigError> {
        let mut replace = Dict::new();
        let mut add = Dict::new();
        // Fails only on a path that is not UTF-8 (figment's values are text).
        let all = match Value::serialize(self) {
            Ok(Value::Dict(_, all)) => all,
            Ok(_) => return Err(ConfigError::Unusable { layer, message: "not a set of keys".into() }),
            Err(e) => return Err(ConfigError::Unusable { layer, message: e.to_string() }),
        };
        for (key, value) in all {
            match &value {
                Value::Empty(..) => {}
                Value::Array(_, items) if items.is_empty() => {}
                _ if ADDED_UP.contains(&key.as_str()) => {
                    add.insert(key, value);
                }
                _ => {
                    replace.insert(key, value);
                }
            }
        }
        Ok((replace, add))
    }

    /// The environment layer from `(key, value)` pairs: keys already without
    /// the prefix, lowercase, and known. A scalar is taken as written and
    /// converted to its key's type; a list is a TOML array.
    fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<Settings, ConfigError> {
        let keys = keys();
        let var = |key: &str| format!("{ENV_PREFIX}{}", key.to_uppercase());
        let mut data = Dict::new();
        for (key, raw) in vars {
            let list = keys.iter().any(|k| k.name == key && k.list);
            let value = if list {
                let doc: toml::Table = toml::from_str(&format!("value = {raw}"))
                    .map_err(|e| ConfigError::Env { var: var(&key), message: format!("not a TOML array: {e}") })?;
                let item = doc.get("value").cloned().unwrap_or(toml::Value::Array(Vec::new()));
                Value::serialize(item).map_err(|e| ConfigError::Env { var: var(&key), message: e.to_string() })?
            } else {
                Value::from(raw)
            };
            // One key at a time, so that an error names its variable.
            let one = Dict::from([(key.clone(), value.clone())]);
            Figment::from(Serialized::defaults(one))
                .extract_lossy::<Settings>()
                .map_err(|e| ConfigError::Env { var: var(&key), message: e.kind.to_string() })?;
            data.insert(key, value);
        }
        Figment::from(Serialized::defaults(data))
            .extract_lossy()
            .map_err(|e| ConfigError::Env { var: ENV_PREFIX.into(), message: e.to_string() })
    }

    /// The three layers, lowest first: the file (its path for errors and its
    /// text), the environment, the flags.
    fn layered(file: Option<(&Path, &str)>, env: &Settings, flags: &Settings) -> Result<Settings, ConfigError> {
        let mut figment = Figment::new();
        if let Some((_, text)) = file {
            figment = figment.merge(Toml::string(text));
        }
        for (layer, name) in [(env, "the environment"), (flags, "the command line")] {
            let (replace, add) = layer.layer(name)?;
            figment = figment.merge(Serialized::defaults(replace)).admerge(Serialized::defaults(add));
        }
        // Only the file can fail here (unknown key, wrong type, bad TOML):
        // the other layers are `Settings` already.
        figment.extract().map_err(|e| ConfigError::Parse {
            path: file.map_or_else(|| PathBuf::from("<none>"), |(p, _)| p.to_path_buf()),
            message: file_error(&e),
        })
    }
}

/// A figment error in words, naming the key (figment's own text names the
/// provider and the profile too, which mean nothing to an operator).
fn file_error(e: &figment::Error) -> String {
    let e = e.clone().into_iter().next().unwrap_or_else(|| e.clone());
    if let figment::error::Kind::UnknownField(key, _) = &e.kind {
        // figment would list all the keys; README.md does that better.
        return format!("unknown key `{key}`");
    }
    if e.path.is_empty() {
        e.kind.to_string()
    } else {
        format!("key `{}`: {}", e.path.join("."), e.kind)
    }
}

/// What a publish to a full queue gets (`queue_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    /// Refused at once with `LimitReached`; the producer decides what to do.
    Reject,
    /// Held, unconfirmed, until the queue has room; the connection's
    /// `max_inflight_per_connection` window then stops the producer.
    Block,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub durability: Durability,
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    pub max_inflight_per_connection: usize,
    pub max_queue_depth: usize,
    pub max_queue_bytes: usize,
    pub max_subscriptions_per_connection: usize,
    /// sled's page cache.
    pub cache_bytes: usize,
    /// 0: no limit of its own (see `disk.rs`).
    pub max_disk_bytes: u64,
    pub min_free_disk_bytes: u64,
    /// Bodies in memory: half kept by queues, half the store's read cache.
    pub body_cache_bytes: usize,
    /// The compactor's bounds (see `twinmq_store::compactor`).
    pub compaction: twinmq_store::compactor::CompactionConfig,
    pub max_destinations: usize,
    /// `None`: unacked deliveries wait for their consumer forever.
    pub ack_timeout_ms: Option<u64>,
    pub max_redeliveries: u32,
    pub auto_create: bool,
    pub io_threads: usize,
    pub max_batch_ops: usize,
    pub queues: Vec<String>,
    pub users: Vec<UserConfig>,
    /// Set when this node is one of a pair.
    pub pair: Option<twinmq_ha::HaConfig>,
    pub require_replica: bool,
    /// Allow admin changes while the pair is split (DESIGN.md section 4: refused unless forced).
    pub admin_when_split: bool,
    /// The admin HTTP endpoint's address (`None`: no HTTP endpoint).
    pub http_listen: Option<SocketAddr>,
    /// Its credential (`None`: GET routes open, switchover refused). See `http.rs`.
    pub http_token: Option<String>,
    /// HTTPS on the admin HTTP endpoint (`http_tls = true`): the client port's
    /// certificate, no client certificates.
    pub http_tls: Option<Arc<rustls::ServerConfig>>,
    /// Host names (lowercase) the HTTP endpoint answers to besides IP
    /// addresses and `localhost`: anything else is refused (DNS rebinding).
    pub http_hosts: Vec<String>,
    /// TLS on the client port (`tls_cert` and `tls_key` set), loaded and checked at start.
    pub tls: Option<ClientPortTls>,
    pub max_consumers_per_destination: usize,
    pub queue_full: QueueFull,
    /// `None`: an idle connection is never closed.
    pub idle_timeout_ms: Option<u64>,
    /// The STOMP 1.2 port (`None`: off).
    pub stomp_listen: Option<SocketAddr>,
    /// A flush slower than this counts as a failed disk: nothing is confirmed
    /// after it on this node (DESIGN.md section 4, "a failing disk is a failed node").
    pub disk_stall_ms: u64,
}

/// TLS on the client port (and the STOMP port): the rustls server
/// configuration built from the files. Clones share one acceptor, which a
/// reload (SIGHUP, `daemon.rs`) replaces: connections accepted after it get
/// the new certificate, open ones keep theirs.
#[derive(Clone)]
pub struct ClientPortTls {
    acceptor: Arc<std::sync::RwLock<tokio_rustls::TlsAcceptor>>,
    /// Clients must present a certificate signed by `tls_client_ca`.
    pub mutual: bool,
}

impl ClientPortTls {
    pub fn new(acceptor: tokio_rustls::TlsAcceptor, mutual: bool) -> ClientPortTls {
        ClientPortTls { acceptor: Arc::new(std::sync::RwLock::new(acceptor)), mutual }
    }

    /// The acceptor of the moment.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        // A poisoned lock still holds a complete acceptor (replaced whole).
        self.acceptor.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Serve `new`'s certificate (and client CA) from now on. Refused when
    /// it changes whether client certificates are required: that changes
    /// who may connect at all, and needs a restart.
    pub fn replace(&self, new: &ClientPortTls) -> Result<(), &'static str> {
        if new.mutual != self.mutual {
            return Err("tls_client_ca was added or removed");
        }
        let acceptor = new.acceptor();
        *self.acceptor.write().unwrap_or_else(std::sync::PoisonError::into_inner) = acceptor;
        Ok(())
    }
}

impl std::fmt::Debug for ClientPortTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPortTls").field("mutual", &self.mutual).finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "twinmq-1".into(),
            data_dir: PathBuf::from("twinmq-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 5570)),
            durability: Durability::Local,
            max_frame_bytes: twinmq_protocol::DEFAULT_MAX_FRAME_BYTES,
            max_message_bytes: 1024 * 1024,
            max_connections: 10_000,
            max_inflight_per_connection: 4096,
            max_queue_depth: 1_000_000,
            max_queue_bytes: 1 << 30,
            max_subscriptions_per_connection: 100,
            cache_bytes: 64 << 20,
            max_disk_bytes: 0,
            min_free_disk_bytes: 256 << 20,
            body_cache_bytes: 64 << 20,
            compaction: twinmq_store::compactor::CompactionConfig::default(),
            max_destinations: 10_000,
            ack_timeout_ms: Some(60_000),
            max_redeliveries: 5,
            auto_create: true,
            io_threads: 1,
            max_batch_ops: 1024,
            queues: Vec::new(),
            users: Vec::new(),
            pair: None,
            require_replica: false,
            admin_when_split: false,
            http_listen: None,
            http_token: None,
            http_tls: None,
            http_hosts: Vec::new(),
            tls: None,
            max_consumers_per_destination: 10_000,
            queue_full: QueueFull::Reject,
            // Far above the client's heartbeat (a Ping every 250 ms when silent),
            // short enough to reap half-open connections within a minute.
            idle_timeout_ms: Some(60_000),
            stomp_listen: None,
            // Far above a healthy flush (one fdatasync is ~70 us here, a
            // group commit a few ms), far below the minutes a hung disk hangs.
            disk_stall_ms: 2000,
        }
    }
}

impl Config {
    /// Build the configuration: the file named by `--config`, the
    /// `TWINMQ_<KEY>` environment, then the flags in `flags`.
    pub fn load(flags: &Settings) -> Result<Config, ConfigError> {
        Config::load_layered(flags).map(|(_, config)| config)
    }

    /// [`Config::load`], also returning the layered keys it was built from
    /// (what a reload compares, see [`changed_keys`]). The file is
    /// `--config`, or `--check-config` when that is the one given.
    pub fn load_layered(flags: &Settings) -> Result<(Settings, Config), ConfigError> {
        let path = flags.config.as_ref().or(flags.check_config.as_ref());
        let text = match path {
            Some(path) => {
                Some(std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?)
            }
            None => None,
        };
        let file = path.map(PathBuf::as_path).zip(text.as_deref());
        let names: Vec<String> = keys().into_iter().map(|k| k.name).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let vars: Vec<(String, String)> =
            Env::prefixed(ENV_PREFIX).only(&names).iter().map(|(k, v)| (k.as_str().to_lowercase(), v)).collect();
        if !vars.is_empty() {
            let taken: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
            tracing::info!(keys = ?taken, "configuration keys from the environment");
        }
        let env = Settings::from_env(vars)?;
        let layered = Settings::layered(file, &env, flags)?;
        let config = Config::from_settings(&layered)?;
        Ok((layered, config))
    }

    /// Parse a TOML document alone (no environment, no flags), for tests and embedding.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let s = Settings::layered(Some((Path::new("<inline>"), text)), &Settings::default(), &Settings::default())?;
        Config::from_settings(&s)
    }

    /// Apply the defaults and the validation rules to the layered keys.
    pub fn from_settings(s: &Settings) -> Result<Config, ConfigError> {
        let d = Config::default();
        let node_id = s.node_id.clone().unwrap_or(d.node_id);
        if node_id.is_empty()
            || node_id.len() > 64
            || !node_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid("node_id", format!("`{node_id}`: use 1-64 of A-Z a-z 0-9 - _ .")));
        }
        let listen_text = s.listen.clone();
        let listen = match listen_text {
            Some(t) => parse_addr(&t).ok_or_else(|| invalid("listen", format!("`{t}` is not HOST:PORT")))?,
            None => d.listen,
        };
        let pair = pair_config(s, &node_id, listen)?;
        let (http_listen, http_token) = http_config(s, listen, pair.as_ref())?;
        let http_tls = http_tls(s, http_listen.is_some())?;
        let tls = client_port_tls(s)?;
        let durability = match s.durability.clone() {
            Some(t) => t.parse::<Durability>().map_err(|m| invalid("durability", m))?,
            None if pair.is_some() => Durability::Replicated,
            None => d.durability,
        };
        if durability == Durability::Replicated && pair.is_none() {
            return Err(invalid("durability", "`replicated` needs a peer: set peer_ha (and the other pair keys)"));
        }
        let require_replica = s.require_replica.unwrap_or(false);
        if require_replica && durability != Durability::Replicated {
            return Err(invalid("require_replica", "only meaningful with durability = replicated"));
        }
        let max_frame_bytes = s.max_frame_bytes.unwrap_or(d.max_frame_bytes);
        // Bounded so that a record and its replication frame stay below the HA link's limit.
        if !(1024..=32 * 1024 * 1024).contains(&max_frame_bytes) {
            return Err(invalid("max_frame_bytes", format!("{max_frame_bytes} is outside 1024..=33554432")));
        }
        let max_message_bytes = s.max_message_bytes.unwrap_or(d.max_message_bytes);
        if max_message_bytes == 0 || max_message_bytes + 512 > max_frame_bytes {
            return Err(invalid(
                "max_message_bytes",
                format!(
                    "{max_message_bytes} must be above 0 and at least 512 below max_frame_bytes ({max_frame_bytes})"
                ),
            ));
        }
        let positive = |key: &'static str, v: Option<usize>, def: usize| {
            let v = v.unwrap_or(def);
            if v == 0 {
                Err(invalid(key, "must be at least 1"))
            } else {
                Ok(v)
            }
        };
        let max_connections = positive("max_connections", s.max_connections, d.max_connections)?;
        let max_inflight_per_connection =
            positive("max_inflight_per_connection", s.max_inflight_per_connection, d.max_inflight_per_connection)?;
        if max_inflight_per_connection > 1_000_000 {
            return Err(invalid(
                "max_inflight_per_connection",
                format!("{max_inflight_per_connection} is above 1000000"),
            ));
        }
        let max_queue_depth = positive("max_queue_depth", s.max_queue_depth, d.max_queue_depth)?;
        let cache_bytes = positive("cache_bytes", s.cache_bytes, d.cache_bytes)?;
        let body_cache_bytes = s.body_cache_bytes.unwrap_or(d.body_cache_bytes);
        let max_disk_bytes = s.max_disk_bytes.unwrap_or(d.max_disk_bytes);
        let min_free_disk_bytes = s.min_free_disk_bytes.unwrap_or(d.min_free_disk_bytes);
        let compaction = twinmq_store::compactor::CompactionConfig {
            bytes_per_sec: s.compaction_bytes_per_sec.unwrap_or(d.compaction.bytes_per_sec),
            min_bytes: s.compaction_min_bytes.unwrap_or(d.compaction.min_bytes),
            min_age: s.compaction_min_age_ms.map_or(d.compaction.min_age, std::time::Duration::from_millis),
        };
        let max_queue_bytes = positive("max_queue_bytes", s.max_queue_bytes, d.max_queue_bytes)?;
        if max_queue_bytes < max_message_bytes {
            return Err(invalid(
                "max_queue_bytes",
                format!("{max_queue_bytes} is below max_message_bytes ({max_message_bytes}): no message would fit"),
            ));
        }
        let max_destinations = positive("max_destinations", s.max_destinations, d.max_destinations)?;
        let max_subscriptions_per_connection = positive(
            "max_subscriptions_per_connection",
            s.max_subscriptions_per_connection,
            d.max_subscriptions_per_connection,
        )?;
        let io_threads = positive("io_threads", s.io_threads, d.io_threads)?;
        if io_threads > 64 {
            return Err(invalid("io_threads", format!("{io_threads} is above 64")));
        }
        let max_batch_ops = positive("max_batch_ops", s.max_batch_ops, d.max_batch_ops)?;
        let ack_timeout_ms = match s.ack_timeout_ms {
            Some(0) => None,
            Some(ms) if ms < 100 => {
                return Err(invalid("ack_timeout_ms", format!("{ms} is below 100 (use 0 for never)")))
            }
            Some(ms) => Some(ms),
            None => d.ack_timeout_ms,
        };
        let max_consumers_per_destination = positive(
            "max_consumers_per_destination",
            s.max_consumers_per_destination,
            d.max_consumers_per_destination,
        )?;
        let queue_full = match s.queue_full.clone().as_deref() {
            None => d.queue_full,
            Some("reject") => QueueFull::Reject,
            Some("block") => QueueFull::Block,
            Some(other) => return Err(invalid("queue_full", format!("`{other}`: use reject or block"))),
        };
        let idle_timeout_ms = match s.idle_timeout_ms {
            Some(0) => None,
            Some(ms) if !(100..=86_400_000).contains(&ms) => {
                return Err(invalid("idle_timeout_ms", format!("{ms} is outside 100..=86400000 (use 0 for never)")))
            }
            Some(ms) => Some(ms),
            None => d.idle_timeout_ms,
        };
        let stomp_listen = match s.stomp_listen.clone() {
            None => None,
            Some(t) => {
                let addr = parse_addr(&t).ok_or_else(|| invalid("stomp_listen", format!("`{t}` is not HOST:PORT")))?;
                let taken = [Some(listen), pair.as_ref().map(|p| p.ha_listen), http_listen];
                if addr.port() != 0 && taken.contains(&Some(addr)) {
                    return Err(invalid("stomp_listen", format!("{addr} is already the client, HA or HTTP port")));
                }
                Some(addr)
            }
        };
        // The peer learns our STOMP port over the HA link (a passive node's ERROR names it).
        let mut pair = pair;
        if let Some(p) = pair.as_mut() {
            p.advertise_stomp = stomp_listen.map(|a| a.to_string());
        }
        let disk_stall_ms = s.disk_stall_ms.unwrap_or(d.disk_stall_ms);
        if disk_stall_ms < 100 {
            return Err(invalid("disk_stall_ms", format!("{disk_stall_ms} is below 100")));
        }
        let max_redeliveries = s.max_redeliveries.unwrap_or(d.max_redeliveries);
        let auto_create = s.auto_create.unwrap_or(d.auto_create);
        let queues = s.queues.clone();
        for q in &queues {
            validate_name(q).map_err(|m| invalid("queues", m))?;
        }
        let users = s.users.clone();
        for u in &users {
            if u.name.is_empty() {
                return Err(invalid("users", "a user has an empty name"));
            }
            u.acl().map_err(|e| invalid("users", format!("user `{}`: {e}", u.name)))?;
            match (&u.password_hash, &u.password) {
                (Some(h), None) => {
                    argon2::PasswordHash::new(h).map_err(|e| {
                        invalid("users", format!("user `{}`: password_hash is not a PHC string: {e}", u.name))
                    })?;
                }
                (None, Some(_)) => {}
                _ => {
                    return Err(invalid(
                        "users",
                        format!("user `{}`: give exactly one of password_hash, password", u.name),
                    ))
                }
            }
        }
        Ok(Config {
            node_id,
            data_dir: s.data_dir.clone().unwrap_or(d.data_dir),
            listen,
            durability,
            max_frame_bytes,
            max_message_bytes,
            max_connections,
            max_inflight_per_connection,
            max_queue_depth,
            max_queue_bytes,
            max_subscriptions_per_connection,
            cache_bytes,
            body_cache_bytes,
            max_disk_bytes,
            min_free_disk_bytes,
            compaction,
            max_destinations,
            ack_timeout_ms,
            max_redeliveries,
            auto_create,
            io_threads,
            max_batch_ops,
            queues,
            users,
            pair,
            require_replica,
            admin_when_split: s.admin_when_split.unwrap_or(false),
            http_listen,
            http_token,
            http_tls,
            http_hosts: s.http_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).collect(),
            tls,
            max_consumers_per_destination,
            queue_full,
            idle_timeout_ms,
            stomp_listen,
            disk_stall_ms,
        })
    }
}

/// The pair keys: all absent (a single node) or a complete, consistent set.
fn pair_config(s: &Settings, node_id: &str, listen: SocketAddr) -> Result<Option<twinmq_ha::HaConfig>, ConfigError> {
    use std::time::Duration;
    use twinmq_ha::secret::ClusterSecret;
    use twinmq_ha::{Failback, Gateway, HaConfig};
    let peer_ha_text = &s.peer_ha;
    let ha_listen_text = s.ha_listen.clone();
    if peer_ha_text.is_empty() {
        if ha_listen_text.is_some() || s.gateway.is_some() || s.ha_tls_cert.is_some() {
            return Err(invalid("peer_ha", "the pair keys are set but peer_ha (the peer's HA address) is missing"));
        }
        return Ok(None);
    }
    let ha_listen_text = ha_listen_text.ok_or_else(|| invalid("ha_listen", "required in a pair (the HA port)"))?;
    let ha_listen = parse_addr(&ha_listen_text)
        .ok_or_else(|| invalid("ha_listen", format!("`{ha_listen_text}` is not HOST:PORT")))?;
    if ha_listen == listen {
        return Err(invalid("ha_listen", "must differ from listen: the HA port is a port of its own"));
    }
    let mut peer_ha = Vec::new();
    for t in peer_ha_text {
        let a = parse_addr(t).ok_or_else(|| invalid("peer_ha", format!("`{t}` is not HOST:PORT")))?;
        if a == ha_listen || a == listen {
            return Err(invalid("peer_ha", format!("`{t}` is this node's own address: a node cannot be its own peer")));
        }
        peer_ha.push(a);
    }
    let gateway_text = s.gateway.clone().ok_or_else(|| invalid("gateway", "required in a pair (the witness)"))?;
    let gateway: Gateway = gateway_text.parse().map_err(|m: String| invalid("gateway", m))?;
    let cluster_secret = match (&s.cluster_secret, &s.cluster_secret_file) {
        (Some(_), Some(_)) => {
            return Err(invalid("cluster_secret", "set cluster_secret_file or cluster_secret, not both"))
        }
        (None, None) => {
            return Err(invalid(
                "cluster_secret_file",
                "required in a pair: `twinmq gen-secret FILE` writes one; copy FILE to the other node",
            ))
        }
        (Some(text), None) => ClusterSecret::inline(text).map_err(|m| invalid("cluster_secret", m))?,
        (None, Some(path)) => ClusterSecret::from_file(path).map_err(|m| invalid("cluster_secret_file", m))?,
    };
    let ms = |key: &'static str, v: Option<u64>, def: u64, min: u64| -> Result<Duration, ConfigError> {
        let v = v.unwrap_or(def);
        if v < min || v > 600_000 {
            return Err(invalid(key, format!("{v} ms is outside {min}..=600000")));
        }
        Ok(Duration::from_millis(v))
    };
    let heartbeat = ms("heartbeat_ms", s.heartbeat_ms, 100, 10)?;
    let peer_timeout = ms("peer_timeout_ms", s.peer_timeout_ms, 1000, 30)?;
    let isolation_timeout = ms("isolation_timeout_ms", s.isolation_timeout_ms, 1000, 30)?;
    let takeover_delay = ms("takeover_delay_ms", s.takeover_delay_ms, 1500, 30)?;
    let probe_interval = ms("probe_interval_ms", s.probe_interval_ms, 200, 10)?;
    if peer_timeout < heartbeat * 2 {
        return Err(invalid("peer_timeout_ms", "must be at least twice heartbeat_ms"));
    }
    // The lease: the active steps down within isolation_timeout; the passive
    // must wait longer than that (plus a margin of one heartbeat) so the two
    // are never active at once.
    if takeover_delay <= isolation_timeout + heartbeat {
        return Err(invalid(
            "takeover_delay_ms",
            format!(
                "{} ms must be above isolation_timeout_ms + heartbeat_ms ({} ms)",
                takeover_delay.as_millis(),
                (isolation_timeout + heartbeat).as_millis()
            ),
        ));
    }
    let failback = match s.failback.clone().as_deref() {
        None | Some("manual") => Failback::Manual,
        Some("auto") => Failback::Auto,
        Some(other) => return Err(invalid("failback", format!("`{other}`: use auto or manual"))),
    };
    let probe_failures = s.probe_failures.unwrap_or(2);
    if probe_failures == 0 {
        return Err(invalid("probe_failures", "must be at least 1"));
    }
    Ok(Some(HaConfig {
        node_id: node_id.to_string(),
        priority: s.priority.unwrap_or(100),
        ha_listen,
        peer_ha,
        peer_client: s.peer_client.clone(),
        gateway,
        cluster_secret,
        heartbeat,
        peer_timeout,
        isolation_timeout,
        takeover_delay,
        probe_interval,
        probe_failures,
        failback,
        // Validated with the other keys (at least 100 ms).
        disk_stall: std::time::Duration::from_millis(s.disk_stall_ms.unwrap_or(2000)),
        tls: ha_tls(s)?,
        // Set from the STOMP settings by their owner; nothing advertised until then.
        advertise_stomp: None,
    }))
}

/// The admin HTTP keys: an address of its own and an optional token.
fn http_config(
    s: &Settings,
    listen: SocketAddr,
    pair: Option<&twinmq_ha::HaConfig>,
) -> Result<(Option<SocketAddr>, Option<String>), ConfigError> {
    let http_listen = match s.http_listen.clone() {
        None => None,
        Some(t) => {
            let a = parse_addr(&t).ok_or_else(|| invalid("http_listen", format!("`{t}` is not HOST:PORT")))?;
            if a == listen || pair.is_some_and(|p| p.ha_listen == a) {
                return Err(invalid("http_listen", "must differ from listen and ha_listen: the HTTP port is its own"));
            }
            Some(a)
        }
    };
    let http_token = s.http_token.clone();
    if let Some(t) = &http_token {
        if t.len() < 16 {
            return Err(invalid("http_token", "use at least 16 characters"));
        }
        if !t.chars().all(|c| c.is_ascii_graphic()) {
            return Err(invalid("http_token", "use printable ASCII without spaces (it travels in an HTTP header)"));
        }
    }
    Ok((http_listen, http_token))
}

/// `http_tls = true`: the HTTP endpoint serves HTTPS with the client port's
/// certificate and key (clients are not asked for certificates: the token
/// authenticates them).
fn http_tls(s: &Settings, http: bool) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
    use twinmq_ha::tls;
    if !s.http_tls.unwrap_or(false) {
        return Ok(None);
    }
    if !http {
        return Err(invalid("http_tls", "needs http_listen (there is no HTTP endpoint)"));
    }
    let cert = s.tls_cert.clone();
    let key = s.tls_key.clone();
    let (Some(cert), Some(key)) = (cert, key) else {
        return Err(invalid(
            "http_tls",
            "needs tls_cert and tls_key (the HTTP endpoint uses the client port's certificate)",
        ));
    };
    let certs = tls::load_certs(&cert).map_err(|e| tls_invalid("tls_cert", e))?;
    let key = tls::load_key(&key).map_err(|e| tls_invalid("tls_key", e))?;
    let config = tls::server_config(certs, key, None).map_err(|e| tls_invalid("tls_key", e))?;
    Ok(Some(config))
}

/// A TLS file error, named by the key that gave the file.
fn tls_invalid(key: &'static str, e: twinmq_ha::link::LinkError) -> ConfigError {
    invalid(key, e.to_string())
}

/// `tls_cert` + `tls_key` (both or neither), optional `tls_client_ca`.
fn client_port_tls(s: &Settings) -> Result<Option<ClientPortTls>, ConfigError> {
    use twinmq_ha::tls;
    let cert = s.tls_cert.clone();
    let key = s.tls_key.clone();
    let client_ca = s.tls_client_ca.clone();
    let (cert, key) = match (cert, key) {
        (None, None) => {
            if client_ca.is_some() {
                return Err(invalid("tls_client_ca", "needs tls_cert and tls_key (TLS on the client port)"));
            }
            return Ok(None);
        }
        (Some(_), None) => return Err(invalid("tls_key", "tls_cert is set: give its private key too")),
        (None, Some(_)) => return Err(invalid("tls_cert", "tls_key is set: give its certificate too")),
        (Some(c), Some(k)) => (c, k),
    };
    let certs = tls::load_certs(&cert).map_err(|e| tls_invalid("tls_cert", e))?;
    let key = tls::load_key(&key).map_err(|e| tls_invalid("tls_key", e))?;
    let roots = match &client_ca {
        Some(path) => Some(tls::load_roots(path).map_err(|e| tls_invalid("tls_client_ca", e))?),
        None => None,
    };
    let config = tls::server_config(certs, key, roots).map_err(|e| tls_invalid("tls_key", e))?;
    Ok(Some(ClientPortTls::new(tokio_rustls::TlsAcceptor::from(config), client_ca.is_some())))
}

/// `ha_tls_cert` + `ha_tls_key` + `ha_tls_ca` (all or none), and the options on top.
fn ha_tls(s: &Settings) -> Result<Option<twinmq_ha::tls::HaTls>, ConfigError> {
    use twinmq_ha::tls;
    let cert = s.ha_tls_cert.clone();
    let key = s.ha_tls_key.clone();
    let ca = s.ha_tls_ca.clone();
    let require_client_cert = s.ha_tls_require_client_cert;
    let server_name = s.ha_tls_server_name.clone();
    let (cert, key, ca) = match (cert, key, ca) {
        (None, None, None) => {
            if require_client_cert.is_some() {
                return Err(invalid("ha_tls_require_client_cert", "needs ha_tls_cert, ha_tls_key and ha_tls_ca"));
            }
            if server_name.is_some() {
                return Err(invalid("ha_tls_server_name", "needs ha_tls_cert, ha_tls_key and ha_tls_ca"));
            }
            return Ok(None);
        }
        (Some(c), Some(k), Some(a)) => (c, k, a),
        (c, k, _) => {
            let key = if c.is_none() {
                "ha_tls_cert"
            } else if k.is_none() {
                "ha_tls_key"
            } else {
                "ha_tls_ca"
            };
            return Err(invalid(key, "TLS on the HA port needs all of ha_tls_cert, ha_tls_key and ha_tls_ca"));
        }
    };
    let server_name = match server_name {
        None => None,
        Some(name) => Some(
            rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|_| invalid("ha_tls_server_name", format!("`{name}` is not a DNS name or IP address")))?,
        ),
    };
    let certs = tls::load_certs(&cert).map_err(|e| tls_invalid("ha_tls_cert", e))?;
    let key = tls::load_key(&key).map_err(|e| tls_invalid("ha_tls_key", e))?;
    let roots = tls::load_roots(&ca).map_err(|e| tls_invalid("ha_tls_ca", e))?;
    tls::HaTls::new(certs, key, roots, require_client_cert.unwrap_or(false), server_name)
        .map(Some)
        .map_err(|e| tls_invalid("ha_tls_key", e))
}

fn parse_addr(text: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    text.to_socket_addrs().ok()?.next()
}

/// The destination-name alphabet (issue 10, finding 15): 1-200 bytes of
/// dot-separated words, each word one or more of `A-Z a-z 0-9 _ -`. So no
/// empty word (`orders.` would match `orders.*`), no `*` or `#` (pattern
/// syntax), no spaces, control, zero-width or look-alike characters: two
/// names that look the same are the same name. Durable subscription names
/// follow it too. The error says which rule a name breaks, never echoing
/// bytes that could upset a terminal or a log.
pub fn validate_name(name: &str) -> Result<(), String> {
    let shown = name.escape_debug().take(80).collect::<String>();
    if name.is_empty() || name.len() > 200 {
        return Err(format!("destination name \"{shown}\" must be 1-200 bytes"));
    }
    for word in name.split('.') {
        if word.is_empty() {
            return Err(format!("destination name \"{shown}\" has an empty word (a leading, trailing or double `.`)"));
        }
        if let Some(c) = word.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
            return Err(format!(
                "destination name \"{shown}\" contains {:?}: use words of A-Z a-z 0-9 _ - separated by `.`",
                c
            ));
        }
    }
    Ok(())
}

/// A destination a client may name, checked before ACLs and logs see it:
/// 1-200 bytes without control or invisible (zero-width, bidirectional)
/// characters and without `/`, except in a durable subscription's
/// dead-letter queue `topic/name.dlq`. Looser than [`validate_name`], which
/// every *new* destination must pass (the router checks it when creating):
/// a queue or durable subscription made before the alphabet existed, under
/// another name, keeps its messages reachable.
pub fn validate_destination(d: &twinmq_protocol::Destination) -> Result<(), String> {
    let shown = d.name.escape_debug().take(80).collect::<String>();
    if d.name.is_empty() || d.name.len() > 200 {
        return Err(format!("destination name \"{shown}\" must be 1-200 bytes"));
    }
    if d.name.chars().any(crate::invisible) {
        return Err(format!("destination name \"{shown}\" contains a control or invisible character"));
    }
    let dlq = d.kind == twinmq_protocol::DestKind::Queue
        && d.name
            .strip_suffix(".dlq")
            .and_then(|b| b.split_once('/'))
            .is_some_and(|(t, n)| !t.is_empty() && !n.contains('/'));
    if d.name.contains('/') && !dlq {
        return Err(format!("destination name \"{shown}\" contains `/`"));
    }
    Ok(())
}

/// Resolve the configured users: hash plain passwords, parse grants.
pub fn static_users(users: &[UserConfig]) -> Result<Vec<StaticUser>, BrokerError> {
    users
        .iter()
        .map(|u| {
            let password_hash = match (&u.password_hash, &u.password) {
                (Some(h), _) => h.clone(),
                (None, Some(p)) => crate::auth::hash_password(p)?,
                (None, None) => return Err(BrokerError::Auth(format!("user `{}` has no password", u.name))),
            };
            let grants = u.acl().map_err(|e| BrokerError::Auth(format!("user `{}`: {e}", u.name)))?;
            crate::auth::valid_hash(&password_hash)
                .map_err(|e| BrokerError::Auth(format!("user `{}`: {e}", u.name)))?;
            Ok(StaticUser { name: u.name.clone(), password_hash, grants })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_users_get_hashes_and_default_grants() {
        let users = static_users(&[UserConfig {
            name: "app".into(),
            password_hash: None,
            password: Some("s3cret".into()),
            grants: None,
        }])
        .unwrap();
        assert!(crate::auth::valid_hash(&users[0].password_hash).is_ok());
        assert_eq!(users[0].grants.len(), 3, "no grants given: everything");
        assert!(crate::auth::valid_hash("plain").is_err());
    }

    fn err_key(text: &str) -> String {
        match Config::from_toml(text) {
            Err(ConfigError::Invalid { key, .. }) => key.to_string(),
            Err(ConfigError::Parse { message, .. }) => message,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.durability, Durability::Local);
        assert_eq!(c.max_redeliveries, 5);
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(err_key("listen = \"nowhere\""), "listen");
        assert_eq!(err_key("durability = \"maybe\""), "durability");
        assert_eq!(err_key("max_connections = 0"), "max_connections");
        assert_eq!(err_key("max_consumers_per_destination = 0"), "max_consumers_per_destination");
        assert_eq!(err_key("queue_full = \"drop\""), "queue_full");
        assert_eq!(err_key("idle_timeout_ms = 5"), "idle_timeout_ms");
        assert_eq!(Config::from_toml("idle_timeout_ms = 0").unwrap().idle_timeout_ms, None);
        assert_eq!(Config::from_toml("queue_full = \"block\"").unwrap().queue_full, QueueFull::Block);
        assert_eq!(err_key("ack_timeout_ms = 5"), "ack_timeout_ms");
        assert_eq!(err_key("node_id = \"a b\""), "node_id");
        assert_eq!(err_key("[[users]]\nname = \"u\""), "users");
        assert!(err_key("colour = 3").contains("colour"), "unknown keys are named");
        assert_eq!(err_key("http_listen = \"nowhere\""), "http_listen");
        assert_eq!(err_key("http_listen = \"127.0.0.1:5570\""), "http_listen");
        assert_eq!(err_key("http_token = \"short\""), "http_token");
        assert_eq!(err_key("http_token = \"sixteen chars and spaces\""), "http_token");
        let c = Config::from_toml("http_listen = \"127.0.0.1:8080\"\nhttp_token = \"0123456789abcdef\"").unwrap();
        assert_eq!(c.http_listen.map(|a| a.port()), Some(8080));
    }

    /// A generated secret (`twinmq gen-secret`).
    const SECRET: &str = "q3ZCqjFPm9lCbf9PxbC1Bv6mwYJ7sfqKR2yR4yNfn4Q=";

    fn pair_toml() -> String {
        format!("listen = \"127.0.0.1:7001\"\nha_listen = \"127.0.0.1:7101\"\npeer_ha = [\"127.0.0.1:7102\"]\ngateway = \"tcp://127.0.0.1:7200\"\ncluster_secret = \"{SECRET}\"\n")
    }

    /// Finding 3 of issue 10: `change-me-please` fell to a word list in 0.28 s.
    #[test]
    fn a_weak_cluster_secret_is_refused_and_a_file_is_read() {
        use std::os::unix::fs::PermissionsExt;
        let pair = pair_toml();
        for weak in ["change-me-please", "s3cret-s3cret", "a-long-passphrase-that-is-still-only-words-and-dashes"] {
            let text = pair.replace(SECRET, weak);
            assert_eq!(err_key(&text), "cluster_secret", "`{weak}` must be refused");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, format!("{SECRET}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with_file =
            pair.replace(&format!("cluster_secret = \"{SECRET}\""), &format!("cluster_secret_file = {:?}", file));
        assert!(Config::from_toml(&with_file).is_ok());
        assert_eq!(err_key(&format!("{pair}cluster_secret_file = {file:?}\n")), "cluster_secret", "not both");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(err_key(&with_file), "cluster_secret_file", "a file others can read");
    }

    #[test]
    fn pair_combinations_are_checked() {
        let pair = &pair_toml();
        let c = Config::from_toml(pair).unwrap();
        assert_eq!(c.durability, Durability::Replicated, "a pair defaults to replicated");
        assert!(c.pair.is_some());
        assert_eq!(err_key(&format!("{pair}takeover_delay_ms = 1000\n")), "takeover_delay_ms");
        assert_eq!(err_key(&pair.replace("127.0.0.1:7102", "127.0.0.1:7101")), "peer_ha");
        assert_eq!(err_key(&pair.replace("tcp://127.0.0.1:7200", "udp://x")), "gateway");
        assert_eq!(err_key(&pair.replace(&format!("cluster_secret = \"{SECRET}\"\n"), "")), "cluster_secret_file");
        assert_eq!(err_key("durability = \"replicated\""), "durability");
        assert_eq!(err_key("ha_listen = \"127.0.0.1:1\""), "peer_ha");
    }

    #[test]
    fn tls_keys_come_in_sets() {
        assert_eq!(err_key("tls_cert = \"c.pem\""), "tls_key");
        assert_eq!(err_key("tls_key = \"k.pem\""), "tls_cert");
        assert_eq!(err_key("tls_client_ca = \"ca.pem\""), "tls_client_ca");
        assert_eq!(err_key("tls_cert = \"/nonexistent/c.pem\"\ntls_key = \"k.pem\""), "tls_cert");
        assert_eq!(err_key("ha_tls_cert = \"c.pem\""), "peer_ha", "HA TLS without a pair");
        let pair = &pair_toml();
        assert!(Config::from_toml(pair).unwrap().pair.unwrap().tls.is_none(), "TLS is off by default");
        assert_eq!(err_key(&format!("{pair}ha_tls_cert = \"c.pem\"\n")), "ha_tls_key");
        assert_eq!(err_key(&format!("{pair}ha_tls_cert = \"c.pem\"\nha_tls_key = \"k.pem\"\n")), "ha_tls_ca");
        assert_eq!(err_key(&format!("{pair}ha_tls_require_client_cert = true\n")), "ha_tls_require_client_cert");
        assert_eq!(err_key(&format!("{pair}ha_tls_server_name = \"peer\"\n")), "ha_tls_server_name");
        let files = "ha_tls_cert = \"/nonexistent/c.pem\"\nha_tls_key = \"k.pem\"\nha_tls_ca = \"ca.pem\"\n";
        assert_eq!(err_key(&format!("{pair}{files}")), "ha_tls_cert");
        assert_eq!(err_key(&format!("{pair}{files}ha_tls_server_name = \"not a name\"\n")), "ha_tls_server_name");
    }

    /// The three layers from text: the file, `(KEY, value)` variables (the
    /// part after `TWINMQ_`), and a command line.
    fn layered(file: &str, env: &[(&str, &str)], argv: &[&str]) -> Result<Settings, ConfigError> {
        let env = Settings::from_env(env.iter().map(|(k, v)| (k.to_lowercase(), v.to_string())))?;
        let flags = Settings::try_parse_from(std::iter::once("twinmqd").chain(argv.iter().copied())).unwrap();
        Settings::layered(Some((Path::new("twinmq.toml"), file)), &env, &flags)
    }

    #[test]
    fn flags_override_the_file() {
        let s = layered(
            "listen = \"127.0.0.1:6000\"\nqueues = [\"q0\"]",
            &[],
            &["--listen", "127.0.0.1:7000", "--durability", "none", "--queue", "q1"],
        )
        .unwrap();
        let c = Config::from_settings(&s).unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.durability, Durability::None);
        assert_eq!(c.queues, vec!["q0".to_string(), "q1".to_string()]);
    }

    #[test]
    fn precedence_is_file_then_environment_then_flags() {
        let file = "max_queue_depth = 10\n";
        let env = [("MAX_QUEUE_DEPTH", "20")];
        let flag = ["--max-queue-depth", "30"];
        let depth = |s: Result<Settings, ConfigError>| Config::from_settings(&s.unwrap()).unwrap().max_queue_depth;
        assert_eq!(depth(layered("", &[], &[])), 1_000_000, "the default");
        assert_eq!(depth(layered(file, &[], &[])), 10, "the file over the default");
        assert_eq!(depth(layered(file, &env, &[])), 20, "the environment over the file");
        assert_eq!(depth(layered(file, &env, &flag)), 30, "a flag over the environment");
        assert_eq!(depth(layered("", &[], &flag)), 30);
        // Lists of things to create add up across the layers; other lists are replaced.
        let s = layered(
            "queues = [\"a\"]\npeer_ha = [\"127.0.0.1:1\"]\n",
            &[("QUEUES", "[\"b\"]"), ("PEER_HA", "[\"127.0.0.1:2\"]")],
            &["--queue", "c", "--peer-ha", "127.0.0.1:3,127.0.0.1:4"],
        )
        .unwrap();
        assert_eq!(s.queues, ["a", "b", "c"]);
        assert_eq!(s.peer_ha, ["127.0.0.1:3", "127.0.0.1:4"]);
    }

    #[test]
    fn environment_values_are_taken_as_written_and_typed_by_their_key() {
        let s = layered(
            "",
            &[("CLUSTER_SECRET", "12345678"), ("HTTP_TOKEN", "\"quoted\"-0123456789"), ("AUTO_CREATE", "false")],
            &[],
        )
        .unwrap();
        assert_eq!(s.cluster_secret.as_deref(), Some("12345678"), "digits stay a string for a string key");
        assert_eq!(s.http_token.as_deref(), Some("\"quoted\"-0123456789"), "no unquoting");
        assert_eq!(s.auto_create, Some(false));
        let u = layered("", &[("USERS", "[{ name = \"ops\", password = \"pw\" }]")], &["--user", "x=h"]).unwrap();
        assert_eq!(u.users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["ops", "x"]);
    }

    #[test]
    fn an_unknown_file_key_or_a_bad_value_is_refused_naming_the_key() {
        match layered("max_queue_depth = 5\ncolour = \"blue\"\n", &[], &[]) {
            Err(e @ ConfigError::Parse { .. }) => {
                let text = e.to_string();
                assert!(text.contains("`colour`") && text.contains("twinmq.toml"), "{text}");
            }
            other => panic!("an unknown key must be refused: {other:?}"),
        }
        match layered("max_queue_depth = \"lots\"\n", &[], &[]) {
            Err(e @ ConfigError::Parse { .. }) => assert!(e.to_string().contains("`max_queue_depth`"), "{e}"),
            other => panic!("a string for a number must be refused: {other:?}"),
        }
        match layered("", &[("MAX_QUEUE_DEPTH", "lots")], &[]) {
            Err(ConfigError::Env { var, .. }) => assert_eq!(var, "TWINMQ_MAX_QUEUE_DEPTH"),
            other => panic!("a bad environment value must be refused: {other:?}"),
        }
        match layered("", &[("QUEUES", "orders")], &[]) {
            Err(ConfigError::Env { var, .. }) => assert_eq!(var, "TWINMQ_QUEUES"),
            other => panic!("a list must be a TOML array: {other:?}"),
        }
        let s = layered("max_queue_depth = 0\n", &[], &[]).unwrap();
        let e = Config::from_settings(&s).unwrap_err();
        assert_eq!(e.to_string(), "invalid value for `max_queue_depth`: must be at least 1");
        let s = layered("", &[], &["--disk-stall-ms", "99"]).unwrap();
        assert!(matches!(Config::from_settings(&s), Err(ConfigError::Invalid { key: "disk_stall_ms", .. })));
        assert!(Settings::try_parse_from(["twinmqd", "--user", "no-hash"]).is_err(), "NAME=HASH");
    }

    #[test]
    fn a_layer_that_cannot_be_layered_is_an_error_not_dropped() {
        use std::os::unix::ffi::OsStrExt;
        let flags = Settings {
            data_dir: Some(PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/\xff"))),
            max_queue_depth: Some(5),
            ..Settings::default()
        };
        match Settings::layered(None, &Settings::default(), &flags) {
            Err(ConfigError::Unusable { layer: "the command line", .. }) => {}
            other => panic!("the flags must not vanish silently: {other:?}"),
        }
    }

    #[test]
    fn disk_stall_ms_defaults_to_two_seconds() {
        assert_eq!(Config::from_toml("").unwrap().disk_stall_ms, 2000);
        assert_eq!(Config::from_toml("disk_stall_ms = 100").unwrap().disk_stall_ms, 100);
        assert_eq!(err_key("disk_stall_ms = 50"), "disk_stall_ms");
    }

    /// The one declaration has one name per key: the serde field, the clap
    /// argument (whence the `TWINMQ_<KEY>` variable) and the flag agree.
    #[test]
    fn every_key_is_a_file_key_a_flag_and_a_variable() {
        let Ok(Value::Dict(_, serde_keys)) = Value::serialize(Settings::default()) else { panic!("a dict") };
        let mut serde_keys: Vec<String> = serde_keys.into_keys().collect();
        let mut clap_keys: Vec<String> = keys().into_iter().map(|k| k.name).collect();
        serde_keys.sort();
        clap_keys.sort();
        assert_eq!(serde_keys, clap_keys);
        assert!(clap_keys.len() > 40, "{clap_keys:?}");
        for arg in Settings::command().get_arguments() {
            let (id, long) = (arg.get_id().as_str(), arg.get_long().unwrap_or_default());
            let expected = match id {
                "queues" => "queue".to_string(),
                "users" => "user".to_string(),
                _ => id.replace('_', "-"),
            };
            assert_eq!(long, expected, "the flag of `{id}`");
            assert!(arg.get_help().is_some(), "`{id}` has help text");
        }
        let lists: Vec<String> = keys().into_iter().filter(|k| k.list).map(|k| k.name).collect();
        assert_eq!(lists, ["queues", "users", "peer_ha", "http_hosts"]);
    }
}
