//! Broker configuration: a TOML file, every key also a command-line flag.
//!
//! Precedence: built-in defaults, then the file (`--config`), then flags.
//! Validation names the offending key; the daemon exits with code 2 on any
//! configuration error. The reference table is in README.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use serde::Deserialize;
use twinmq_store::Durability;

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
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// A user allowed to connect, defined in the file (static: `twinmq user`
/// commands cannot change it). Prefer `password_hash` (an argon2 PHC string
/// from `twinmq hash-password`); a plain `password` is hashed at start.
/// `grants` (`PERMISSION:PATTERN`, see `security.rs`) default to everything:
/// `produce:#`, `consume:#`, `admin:#`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
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

/// The file format. Every field is optional; defaults are in [`Config::default`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<String>,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    durability: Option<String>,
    max_frame_bytes: Option<usize>,
    max_message_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_inflight_per_connection: Option<usize>,
    max_queue_depth: Option<usize>,
    ack_timeout_ms: Option<u64>,
    max_redeliveries: Option<u32>,
    auto_create: Option<bool>,
    io_threads: Option<usize>,
    max_batch_ops: Option<usize>,
    queues: Option<Vec<String>>,
    users: Option<Vec<UserConfig>>,
    priority: Option<u32>,
    ha_listen: Option<String>,
    peer_ha: Option<Vec<String>>,
    peer_client: Option<String>,
    gateway: Option<String>,
    cluster_secret: Option<String>,
    heartbeat_ms: Option<u64>,
    peer_timeout_ms: Option<u64>,
    isolation_timeout_ms: Option<u64>,
    takeover_delay_ms: Option<u64>,
    probe_interval_ms: Option<u64>,
    probe_failures: Option<u32>,
    failback: Option<String>,
    require_replica: Option<bool>,
    admin_when_split: Option<bool>,
    http_listen: Option<String>,
    http_token: Option<String>,
    http_tls: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    ha_tls_cert: Option<PathBuf>,
    ha_tls_key: Option<PathBuf>,
    ha_tls_ca: Option<PathBuf>,
    ha_tls_require_client_cert: Option<bool>,
    ha_tls_server_name: Option<String>,
    max_consumers_per_destination: Option<usize>,
    queue_full: Option<String>,
    idle_timeout_ms: Option<u64>,
}

/// Command-line flags of `twinmqd`. Each overrides the config file key of the same name.
#[derive(Debug, Parser, Default)]
#[command(name = "twinmqd", version, about = "twinmq broker daemon")]
pub struct Args {
    /// TOML configuration file; flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
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
    /// Queue to create at start (repeatable).
    #[arg(long = "queue", value_name = "NAME")]
    pub queues: Vec<String>,
    /// User allowed to connect, as NAME=ARGON2_PHC_HASH (repeatable).
    #[arg(long = "user", value_name = "NAME=HASH")]
    pub users: Vec<String>,
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
    /// Pair: the shared secret both nodes prove on the HA link (env TWINMQ_CLUSTER_SECRET).
    #[arg(long, value_name = "SECRET", env = "TWINMQ_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
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
    /// Credential for the admin HTTP endpoint: Bearer token, or Basic password (env TWINMQ_HTTP_TOKEN).
    #[arg(long, value_name = "TOKEN", env = "TWINMQ_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Serve the admin HTTP endpoint over HTTPS, with the client port's tls_cert and tls_key.
    #[arg(long, value_name = "BOOL")]
    pub http_tls: Option<bool>,
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
    /// TLS on the client port (`tls_cert` and `tls_key` set), loaded and checked at start.
    pub tls: Option<ClientPortTls>,
    pub max_consumers_per_destination: usize,
    pub queue_full: QueueFull,
    /// `None`: an idle connection is never closed.
    pub idle_timeout_ms: Option<u64>,
}

/// TLS on the client port: the rustls server configuration built from the files.
#[derive(Clone)]
pub struct ClientPortTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Clients must present a certificate signed by `tls_client_ca`.
    pub mutual: bool,
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
            tls: None,
            max_consumers_per_destination: 10_000,
            queue_full: QueueFull::Reject,
            // Far above the client's heartbeat (a Ping every 250 ms when silent),
            // short enough to reap half-open connections within a minute.
            idle_timeout_ms: Some(60_000),
        }
    }
}

impl Config {
    /// Build the configuration from flags (and the file they name).
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?
            }
            None => FileConfig::default(),
        };
        Config::merge(file, args)
    }

    /// Parse a TOML document (no flags), for tests and embedding.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let file = toml::from_str::<FileConfig>(text)
            .map_err(|e| ConfigError::Parse { path: PathBuf::from("<inline>"), message: e.to_string() })?;
        Config::merge(file, &Args::default())
    }

    fn merge(file: FileConfig, args: &Args) -> Result<Config, ConfigError> {
        let d = Config::default();
        let node_id = args.node_id.clone().or(file.node_id.clone()).unwrap_or(d.node_id);
        if node_id.is_empty()
            || node_id.len() > 64
            || !node_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid("node_id", format!("`{node_id}`: use 1-64 of A-Z a-z 0-9 - _ .")));
        }
        let listen_text = args.listen.clone().or(file.listen.clone());
        let listen = match listen_text {
            Some(t) => parse_addr(&t).ok_or_else(|| invalid("listen", format!("`{t}` is not HOST:PORT")))?,
            None => d.listen,
        };
        let pair = pair_config(&file, args, &node_id, listen)?;
        let (http_listen, http_token) = http_config(&file, args, listen, pair.as_ref())?;
        let http_tls = http_tls(&file, args, http_listen.is_some())?;
        let tls = client_port_tls(&file, args)?;
        let durability = match args.durability.clone().or(file.durability.clone()) {
            Some(t) => t.parse::<Durability>().map_err(|m| invalid("durability", m))?,
            None if pair.is_some() => Durability::Replicated,
            None => d.durability,
        };
        if durability == Durability::Replicated && pair.is_none() {
            return Err(invalid("durability", "`replicated` needs a peer: set peer_ha (and the other pair keys)"));
        }
        let require_replica = args.require_replica.or(file.require_replica).unwrap_or(false);
        if require_replica && durability != Durability::Replicated {
            return Err(invalid("require_replica", "only meaningful with durability = replicated"));
        }
        let max_frame_bytes = args.max_frame_bytes.or(file.max_frame_bytes).unwrap_or(d.max_frame_bytes);
        // Bounded so that a record and its replication frame stay below the HA link's limit.
        if !(1024..=32 * 1024 * 1024).contains(&max_frame_bytes) {
            return Err(invalid("max_frame_bytes", format!("{max_frame_bytes} is outside 1024..=33554432")));
        }
        let max_message_bytes = args.max_message_bytes.or(file.max_message_bytes).unwrap_or(d.max_message_bytes);
        if max_message_bytes == 0 || max_message_bytes + 512 > max_frame_bytes {
            return Err(invalid(
                "max_message_bytes",
                format!(
                    "{max_message_bytes} must be above 0 and at least 512 below max_frame_bytes ({max_frame_bytes})"
                ),
            ));
        }
        let positive = |key: &'static str, v: Option<usize>, f: Option<usize>, def: usize| {
            let v = v.or(f).unwrap_or(def);
            if v == 0 {
                Err(invalid(key, "must be at least 1"))
            } else {
                Ok(v)
            }
        };
        let max_connections =
            positive("max_connections", args.max_connections, file.max_connections, d.max_connections)?;
        let max_inflight_per_connection = positive(
            "max_inflight_per_connection",
            args.max_inflight_per_connection,
            file.max_inflight_per_connection,
            d.max_inflight_per_connection,
        )?;
        if max_inflight_per_connection > 1_000_000 {
            return Err(invalid(
                "max_inflight_per_connection",
                format!("{max_inflight_per_connection} is above 1000000"),
            ));
        }
        let max_queue_depth =
            positive("max_queue_depth", args.max_queue_depth, file.max_queue_depth, d.max_queue_depth)?;
        let io_threads = positive("io_threads", args.io_threads, file.io_threads, d.io_threads)?;
        if io_threads > 64 {
            return Err(invalid("io_threads", format!("{io_threads} is above 64")));
        }
        let max_batch_ops = positive("max_batch_ops", args.max_batch_ops, file.max_batch_ops, d.max_batch_ops)?;
        let ack_timeout_ms = match args.ack_timeout_ms.or(file.ack_timeout_ms) {
            Some(0) => None,
            Some(ms) if ms < 100 => {
                return Err(invalid("ack_timeout_ms", format!("{ms} is below 100 (use 0 for never)")))
            }
            Some(ms) => Some(ms),
            None => d.ack_timeout_ms,
        };
        let max_consumers_per_destination = positive(
            "max_consumers_per_destination",
            args.max_consumers_per_destination,
            file.max_consumers_per_destination,
            d.max_consumers_per_destination,
        )?;
        let queue_full = match args.queue_full.clone().or(file.queue_full.clone()).as_deref() {
            None => d.queue_full,
            Some("reject") => QueueFull::Reject,
            Some("block") => QueueFull::Block,
            Some(other) => return Err(invalid("queue_full", format!("`{other}`: use reject or block"))),
        };
        let idle_timeout_ms = match args.idle_timeout_ms.or(file.idle_timeout_ms) {
            Some(0) => None,
            Some(ms) if !(100..=86_400_000).contains(&ms) => {
                return Err(invalid("idle_timeout_ms", format!("{ms} is outside 100..=86400000 (use 0 for never)")))
            }
            Some(ms) => Some(ms),
            None => d.idle_timeout_ms,
        };
        let max_redeliveries = args.max_redeliveries.or(file.max_redeliveries).unwrap_or(d.max_redeliveries);
        let auto_create = args.auto_create.or(file.auto_create).unwrap_or(d.auto_create);
        let mut queues = file.queues.unwrap_or_default();
        queues.extend(args.queues.iter().cloned());
        for q in &queues {
            validate_name(q).map_err(|m| invalid("queues", m))?;
        }
        let mut users = file.users.unwrap_or_default();
        for u in &args.users {
            let (name, hash) = u.split_once('=').ok_or_else(|| invalid("users", format!("`{u}` is not NAME=HASH")))?;
            users.push(UserConfig {
                name: name.into(),
                password_hash: Some(hash.into()),
                password: None,
                grants: None,
            });
        }
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
            data_dir: args.data_dir.clone().or(file.data_dir).unwrap_or(d.data_dir),
            listen,
            durability,
            max_frame_bytes,
            max_message_bytes,
            max_connections,
            max_inflight_per_connection,
            max_queue_depth,
            ack_timeout_ms,
            max_redeliveries,
            auto_create,
            io_threads,
            max_batch_ops,
            queues,
            users,
            pair,
            require_replica,
            admin_when_split: args.admin_when_split.or(file.admin_when_split).unwrap_or(false),
            http_listen,
            http_token,
            http_tls,
            tls,
            max_consumers_per_destination,
            queue_full,
            idle_timeout_ms,
        })
    }
}

/// The pair keys: all absent (a single node) or a complete, consistent set.
fn pair_config(
    file: &FileConfig,
    args: &Args,
    node_id: &str,
    listen: SocketAddr,
) -> Result<Option<twinmq_ha::HaConfig>, ConfigError> {
    use std::time::Duration;
    use twinmq_ha::{Failback, Gateway, HaConfig};
    let peer_ha_text: Vec<String> =
        if args.peer_ha.is_empty() { file.peer_ha.clone().unwrap_or_default() } else { args.peer_ha.clone() };
    let ha_listen_text = args.ha_listen.clone().or(file.ha_listen.clone());
    if peer_ha_text.is_empty() {
        if ha_listen_text.is_some()
            || args.gateway.is_some()
            || file.gateway.is_some()
            || args.ha_tls_cert.is_some()
            || file.ha_tls_cert.is_some()
        {
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
    for t in &peer_ha_text {
        let a = parse_addr(t).ok_or_else(|| invalid("peer_ha", format!("`{t}` is not HOST:PORT")))?;
        if a == ha_listen || a == listen {
            return Err(invalid("peer_ha", format!("`{t}` is this node's own address: a node cannot be its own peer")));
        }
        peer_ha.push(a);
    }
    let gateway_text = args
        .gateway
        .clone()
        .or(file.gateway.clone())
        .ok_or_else(|| invalid("gateway", "required in a pair (the witness)"))?;
    let gateway: Gateway = gateway_text.parse().map_err(|m: String| invalid("gateway", m))?;
    let cluster_secret = args
        .cluster_secret
        .clone()
        .or(file.cluster_secret.clone())
        .ok_or_else(|| invalid("cluster_secret", "required in a pair"))?;
    if cluster_secret.len() < 8 {
        return Err(invalid("cluster_secret", "use at least 8 characters"));
    }
    let ms = |key: &'static str, a: Option<u64>, f: Option<u64>, def: u64, min: u64| -> Result<Duration, ConfigError> {
        let v = a.or(f).unwrap_or(def);
        if v < min || v > 600_000 {
            return Err(invalid(key, format!("{v} ms is outside {min}..=600000")));
        }
        Ok(Duration::from_millis(v))
    };
    let heartbeat = ms("heartbeat_ms", args.heartbeat_ms, file.heartbeat_ms, 100, 10)?;
    let peer_timeout = ms("peer_timeout_ms", args.peer_timeout_ms, file.peer_timeout_ms, 1000, 30)?;
    let isolation_timeout = ms("isolation_timeout_ms", args.isolation_timeout_ms, file.isolation_timeout_ms, 1000, 30)?;
    let takeover_delay = ms("takeover_delay_ms", args.takeover_delay_ms, file.takeover_delay_ms, 1500, 30)?;
    let probe_interval = ms("probe_interval_ms", args.probe_interval_ms, file.probe_interval_ms, 200, 10)?;
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
    let failback = match args.failback.clone().or(file.failback.clone()).as_deref() {
        None | Some("manual") => Failback::Manual,
        Some("auto") => Failback::Auto,
        Some(other) => return Err(invalid("failback", format!("`{other}`: use auto or manual"))),
    };
    let probe_failures = args.probe_failures.or(file.probe_failures).unwrap_or(2);
    if probe_failures == 0 {
        return Err(invalid("probe_failures", "must be at least 1"));
    }
    Ok(Some(HaConfig {
        node_id: node_id.to_string(),
        priority: args.priority.or(file.priority).unwrap_or(100),
        ha_listen,
        peer_ha,
        peer_client: args.peer_client.clone().or(file.peer_client.clone()),
        gateway,
        cluster_secret,
        heartbeat,
        peer_timeout,
        isolation_timeout,
        takeover_delay,
        probe_interval,
        probe_failures,
        failback,
        disk_stall: std::time::Duration::from_millis(2000),
        tls: ha_tls(file, args)?,
    }))
}

/// The admin HTTP keys: an address of its own and an optional token.
fn http_config(
    file: &FileConfig,
    args: &Args,
    listen: SocketAddr,
    pair: Option<&twinmq_ha::HaConfig>,
) -> Result<(Option<SocketAddr>, Option<String>), ConfigError> {
    let http_listen = match args.http_listen.clone().or(file.http_listen.clone()) {
        None => None,
        Some(t) => {
            let a = parse_addr(&t).ok_or_else(|| invalid("http_listen", format!("`{t}` is not HOST:PORT")))?;
            if a == listen || pair.is_some_and(|p| p.ha_listen == a) {
                return Err(invalid("http_listen", "must differ from listen and ha_listen: the HTTP port is its own"));
            }
            Some(a)
        }
    };
    let http_token = args.http_token.clone().or(file.http_token.clone());
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
fn http_tls(file: &FileConfig, args: &Args, http: bool) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
    use twinmq_ha::tls;
    if !args.http_tls.or(file.http_tls).unwrap_or(false) {
        return Ok(None);
    }
    if !http {
        return Err(invalid("http_tls", "needs http_listen (there is no HTTP endpoint)"));
    }
    let cert = args.tls_cert.clone().or(file.tls_cert.clone());
    let key = args.tls_key.clone().or(file.tls_key.clone());
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
fn client_port_tls(file: &FileConfig, args: &Args) -> Result<Option<ClientPortTls>, ConfigError> {
    use twinmq_ha::tls;
    let cert = args.tls_cert.clone().or(file.tls_cert.clone());
    let key = args.tls_key.clone().or(file.tls_key.clone());
    let client_ca = args.tls_client_ca.clone().or(file.tls_client_ca.clone());
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
    Ok(Some(ClientPortTls { acceptor: tokio_rustls::TlsAcceptor::from(config), mutual: client_ca.is_some() }))
}

/// `ha_tls_cert` + `ha_tls_key` + `ha_tls_ca` (all or none), and the options on top.
fn ha_tls(file: &FileConfig, args: &Args) -> Result<Option<twinmq_ha::tls::HaTls>, ConfigError> {
    use twinmq_ha::tls;
    let cert = args.ha_tls_cert.clone().or(file.ha_tls_cert.clone());
    let key = args.ha_tls_key.clone().or(file.ha_tls_key.clone());
    let ca = args.ha_tls_ca.clone().or(file.ha_tls_ca.clone());
    let require_client_cert = args.ha_tls_require_client_cert.or(file.ha_tls_require_client_cert);
    let server_name = args.ha_tls_server_name.clone().or(file.ha_tls_server_name.clone());
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

/// Destination names: 1-200 characters, no control characters, no `/`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!("destination name `{name}` must be 1-200 bytes"));
    }
    if name.chars().any(|c| c.is_control() || c == '/') {
        return Err(format!("destination name `{name}` contains a control character or `/`"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn pair_combinations_are_checked() {
        let pair = "listen = \"127.0.0.1:7001\"\nha_listen = \"127.0.0.1:7101\"\npeer_ha = [\"127.0.0.1:7102\"]\ngateway = \"tcp://127.0.0.1:7200\"\ncluster_secret = \"s3cret-s3cret\"\n";
        let c = Config::from_toml(pair).unwrap();
        assert_eq!(c.durability, Durability::Replicated, "a pair defaults to replicated");
        assert!(c.pair.is_some());
        assert_eq!(err_key(&format!("{pair}takeover_delay_ms = 1000\n")), "takeover_delay_ms");
        assert_eq!(err_key(&pair.replace("127.0.0.1:7102", "127.0.0.1:7101")), "peer_ha");
        assert_eq!(err_key(&pair.replace("tcp://127.0.0.1:7200", "udp://x")), "gateway");
        assert_eq!(err_key(&pair.replace("cluster_secret = \"s3cret-s3cret\"\n", "")), "cluster_secret");
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
        let pair = "listen = \"127.0.0.1:7001\"\nha_listen = \"127.0.0.1:7101\"\npeer_ha = [\"127.0.0.1:7102\"]\ngateway = \"tcp://127.0.0.1:7200\"\ncluster_secret = \"s3cret-s3cret\"\n";
        assert!(Config::from_toml(pair).unwrap().pair.unwrap().tls.is_none(), "TLS is off by default");
        assert_eq!(err_key(&format!("{pair}ha_tls_cert = \"c.pem\"\n")), "ha_tls_key");
        assert_eq!(err_key(&format!("{pair}ha_tls_cert = \"c.pem\"\nha_tls_key = \"k.pem\"\n")), "ha_tls_ca");
        assert_eq!(err_key(&format!("{pair}ha_tls_require_client_cert = true\n")), "ha_tls_require_client_cert");
        assert_eq!(err_key(&format!("{pair}ha_tls_server_name = \"peer\"\n")), "ha_tls_server_name");
        let files = "ha_tls_cert = \"/nonexistent/c.pem\"\nha_tls_key = \"k.pem\"\nha_tls_ca = \"ca.pem\"\n";
        assert_eq!(err_key(&format!("{pair}{files}")), "ha_tls_cert");
        assert_eq!(err_key(&format!("{pair}{files}ha_tls_server_name = \"not a name\"\n")), "ha_tls_server_name");
    }

    #[test]
    fn flags_override_the_file() {
        let args = Args::parse_from(["twinmqd", "--listen", "127.0.0.1:7000", "--durability", "none", "--queue", "q1"]);
        let file: FileConfig = toml::from_str("listen = \"127.0.0.1:6000\"\nqueues = [\"q0\"]").unwrap();
        let c = Config::merge(file, &args).unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.durability, Durability::None);
        assert_eq!(c.queues, vec!["q0".to_string(), "q1".to_string()]);
    }
}
