//! `twinmq`: the command-line tool for a twinmq pair.
//!
//! Parses flags, sets up tracing (RUST_LOG, default `warn`, on stderr) and
//! calls one command module. Output on stdout is part of a contract scripts
//! rely on (`confirmed N`, `received K`, `switchover done`, `promoted ADDR`,
//! the bench summary line); diagnostics go to stderr. Exit codes: 0 success,
//! 1 failure, 2 usage error (clap).
//!
//! `pub`, `sub` and `bench` use the failing-over client: given both nodes'
//! addresses they ride through a failover shorter than `--failover-timeout`.
//! `status`, `switchover` and `promote` use admin connections, which every
//! node accepts, the passive one too.

mod bench;
mod consume;
mod manage;
mod produce;

use std::io::BufRead;
use std::process::ExitCode;

use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{CommandFactory, Parser, Subcommand};
use twinmq_client::{AdminClient, ClientConfig, ClientTls, Destination};

#[derive(Debug, Parser)]
#[command(name = "twinmq", version, about = "Command-line client for a twinmq broker pair")]
struct Cli {
    /// Client addresses of the nodes: HOST:PORT, comma-separated (required by every command that connects).
    #[arg(long, env = "TWINMQ_SERVERS", value_delimiter = ',', global = true)]
    servers: Vec<String>,
    /// User name to authenticate as.
    #[arg(long, global = true)]
    user: Option<String>,
    /// Password of --user.
    #[arg(long, env = "TWINMQ_PASSWORD", hide_env_values = true, global = true)]
    password: Option<String>,
    /// How long to keep looking for an active node (at start, after a lost
    /// connection) before failing; also bounds each admin request.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_seconds, global = true)]
    failover_timeout: Duration,
    /// Speak TLS, trusting brokers whose certificate this CA (PEM file) signed.
    #[arg(long, value_name = "FILE", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// TLS client certificate (PEM), for a broker that requires one (tls_client_ca).
    #[arg(long, value_name = "FILE", global = true, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", global = true, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// The name to verify in the broker's certificate (default: the host of each address).
    #[arg(long, value_name = "NAME", global = true, requires = "tls_ca")]
    tls_server_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish COUNT persistent messages, pipelined; prints `confirmed K`.
    Pub(produce::PubArgs),
    /// Consume and ack until COUNT distinct messages (by body) arrived; prints `received K`.
    Sub(consume::SubArgs),
    /// Print the status (JSON) of the first node that answers (passive or active).
    Status,
    /// Hand the active role to the passive node (orderly); prints `switchover done`.
    Switchover,
    /// Make the passive node active even if it is not in sync. Without
    /// --yes, prints what that may lose and changes nothing (exit code 2);
    /// with it, prints `promoted ADDR`.
    Promote {
        /// Required: promoting a node that is not in sync can lose confirmed messages.
        #[arg(long, required = true)]
        force: bool,
        /// Promote after all, having read what it may lose.
        #[arg(long)]
        yes: bool,
    },
    /// Print an argon2id PHC hash of PASSWORD (read from stdin if omitted) for the broker's config.
    HashPassword { password: Option<String> },
    /// Write a new cluster secret (32 random bytes, base64) to FILE, readable
    /// by its owner only; never overwrites. Copy FILE to the other node and
    /// set `cluster_secret_file = FILE` on both.
    GenSecret {
        /// Where to write it (must not exist).
        file: std::path::PathBuf,
    },
    /// Measure produce/consume throughput and confirm latency.
    Bench(bench::BenchArgs),
    /// Users: add, passwd, rm, list (changes go to the active node).
    #[command(subcommand)]
    User(manage::UserCmd),
    /// ACLs: grant, revoke, list (PERMISSION:PATTERN, e.g. produce:orders.*).
    #[command(subcommand)]
    Acl(manage::AclCmd),
    /// Queues: create, rm, list, purge.
    #[command(subcommand)]
    Queue(manage::QueueCmd),
    /// Topics: list, rm-durable.
    #[command(subcommand)]
    Topic(manage::TopicCmd),
}

impl Cli {
    /// The client configuration, or a usage error when no server is given.
    fn client_config(&self) -> Result<ClientConfig, clap::Error> {
        let servers: Vec<String> =
            self.servers.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).map(Into::into).collect();
        if servers.is_empty() {
            return Err(Cli::command().error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--servers HOST:PORT[,HOST:PORT] (or TWINMQ_SERVERS) is required for this command",
            ));
        }
        let mut config = ClientConfig::new(servers)
            .client_name(format!("twinmq-cli/{}", std::process::id()))
            .failover_timeout(self.failover_timeout);
        config.user = self.user.clone();
        config.password = self.password.clone();
        Ok(config)
    }

    /// TLS as the flags say (`None` without --tls-ca); unusable files are an error.
    fn client_tls(&self) -> anyhow::Result<Option<ClientTls>> {
        let Some(ca) = &self.tls_ca else { return Ok(None) };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => ClientTls::with_client_cert(ca, cert, key)?,
            _ => ClientTls::new(ca)?,
        };
        Ok(Some(match &self.tls_server_name {
            Some(name) => tls.server_name(name)?,
            None => tls,
        }))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Command::HashPassword { password } = &cli.command {
        return report(hash_password(password.clone()));
    }
    if let Command::GenSecret { file } = &cli.command {
        return report(gen_secret(file));
    }
    let mut config = match cli.client_config() {
        Ok(config) => config,
        Err(e) => e.exit(),
    };
    match cli.client_tls() {
        Ok(tls) => config.tls = tls,
        Err(e) => return report(Err(e)),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return report(Err(anyhow!(e).context("could not start the runtime"))),
    };
    report(runtime.block_on(run(cli.command, config)))
}

async fn run(command: Command, config: ClientConfig) -> anyhow::Result<ExitCode> {
    match command {
        Command::Pub(args) => produce::run(config, args).await,
        Command::Sub(args) => consume::run(config, args).await,
        Command::Bench(args) => bench::run(config, args).await,
        Command::Status => status(config).await,
        Command::Switchover => {
            let server = AdminClient::switchover_any(&config).await.context("switchover failed")?;
            tracing::info!(node = %server.node_id, addr = %server.addr, "switchover done");
            println!("switchover done");
            Ok(ExitCode::SUCCESS)
        }
        Command::Promote { force, yes: false } => {
            let risks = AdminClient::promote_risks(&config).await;
            if risks.is_empty() {
                anyhow::bail!("no configured node answered as a node that does not serve; nothing to promote");
            }
            for r in &risks {
                println!("{}", r.describe());
            }
            let servers = config.servers.join(",");
            let again = if force { "promote --force --yes" } else { "promote --force" };
            println!("nothing was changed; to promote anyway: twinmq --servers {servers} {again}");
            Ok(ExitCode::from(2))
        }
        Command::Promote { force, yes: true } => {
            let server = AdminClient::promote_any(&config, force).await.context("promote failed")?;
            println!("promoted {}", server.addr);
            Ok(ExitCode::SUCCESS)
        }
        Command::User(cmd) => manage::user(config, cmd).await,
        Command::Acl(cmd) => manage::acl(config, cmd).await,
        Command::Queue(cmd) => manage::queue(config, cmd).await,
        Command::Topic(cmd) => manage::topic(config, cmd).await,
        Command::HashPassword { .. } | Command::GenSecret { .. } => unreachable!("handled before connecting"),
    }
}

fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

/// A queue, or a topic with `--topic`.
fn destination(name: &str, topic: bool) -> Destination {
    if topic {
        Destination::topic(name)
    } else {
        Destination::queue(name)
    }
}

/// Seconds, fractions allowed: `10`, `0.25`.
pub(crate) fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{e}"))
}

async fn status(config: ClientConfig) -> anyhow::Result<ExitCode> {
    let mut admin = AdminClient::connect(&config).await?;
    let status = admin.status().await.context("status request failed")?;
    let value: serde_json::Value = serde_json::from_str(status.json())?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    admin.close().await;
    Ok(ExitCode::SUCCESS)
}

fn hash_password(password: Option<String>) -> anyhow::Result<ExitCode> {
    let password = match password {
        Some(password) => password,
        None => read_stdin_line().context("could not read the password from stdin")?,
    };
    println!("{}", phc_hash(&password)?);
    Ok(ExitCode::SUCCESS)
}

/// 32 bytes from the OS's generator, base64, in a new file of mode 600.
fn gen_secret(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    use base64ct::Encoding;
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).with_context(|| {
            format!("could not create {} (an existing secret is never overwritten)", path.display())
        })?;
    writeln!(f, "{}", base64ct::Base64::encode_string(&bytes))?;
    f.sync_all()?;
    println!("wrote a new cluster secret to {}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// The first line of stdin, without its line ending.
fn read_stdin_line() -> std::io::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// argon2id with the crate's default parameters and a random salt, as a PHC string.
fn phc_hash(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};

    if password.is_empty() {
        anyhow::bail!("the password is empty");
    }
    let salt = SaltString::generate(&mut OsRng);
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow!("could not hash the password: {e}"))?;
    Ok(hash.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("twinmq").chain(args.iter().copied()))
    }

    #[test]
    fn servers_split_on_commas() {
        let cli = parse(&["--servers", "a:1,b:2", "status"]).unwrap();
        assert_eq!(cli.client_config().unwrap().servers, vec!["a:1", "b:2"]);
    }

    #[test]
    fn hash_password_needs_no_servers() {
        let cli = parse(&["hash-password", "secret"]).unwrap();
        assert!(matches!(cli.command, Command::HashPassword { password: Some(ref p) } if p == "secret"));
    }

    #[test]
    fn connecting_commands_need_servers() {
        let cli = Cli {
            servers: Vec::new(),
            user: None,
            password: None,
            failover_timeout: Duration::from_secs(30),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_server_name: None,
            command: Command::Status,
        };
        let err = cli.client_config().unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn global_flags_go_before_or_after_the_command() {
        let cli = parse(&["sub", "q", "--count", "3", "--servers", "h:1", "--user", "u", "--password", "p"]).unwrap();
        let config = cli.client_config().unwrap();
        assert_eq!(
            (config.servers, config.user, config.password),
            (vec!["h:1".into()], Some("u".into()), Some("p".into()))
        );
    }

    #[test]
    fn durable_requires_topic() {
        let err = parse(&["--servers", "h:1", "sub", "t", "--count", "1", "--durable", "d"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let cli = parse(&["--servers", "h:1", "sub", "t", "--count", "1", "--topic", "--durable", "d"]).unwrap();
        let Command::Sub(args) = cli.command else { panic!("expected sub") };
        assert_eq!(args.durable.as_deref(), Some("d"));
        assert!(args.topic);
    }

    #[test]
    fn pub_defaults() {
        let cli = parse(&["--servers", "h:1", "pub", "orders", "--count", "5"]).unwrap();
        let Command::Pub(args) = cli.command else { panic!("expected pub") };
        assert_eq!((args.dest.as_str(), args.count, args.size, args.prefix.as_str()), ("orders", 5, 0, "msg"));
        assert_eq!((args.topic, args.window), (false, 256));
    }

    /// Issue 10, finding 12: `twinmq acl grant bob ... --user root` logged
    /// in as bob (the positional shared the global `--user`'s id).
    #[test]
    fn acl_commands_name_their_target_apart_from_the_login() {
        let cli = parse(&["acl", "grant", "bob", "consume:x", "--user", "root", "--servers", "h:1"]).unwrap();
        assert_eq!(cli.user.as_deref(), Some("root"));
        assert!(matches!(&cli.command, Command::Acl(manage::AclCmd::Grant { user, .. }) if user == "bob"));
        let cli = parse(&["acl", "revoke", "bob", "consume:x"]).unwrap();
        assert_eq!(cli.user, None, "no login user unless --user");
        assert!(matches!(&cli.command, Command::Acl(manage::AclCmd::Revoke { user, .. }) if user == "bob"));
        let cli = parse(&["--user", "root", "acl", "list", "bob"]).unwrap();
        assert_eq!(cli.user.as_deref(), Some("root"));
        assert!(matches!(&cli.command, Command::Acl(manage::AclCmd::List { user: Some(u) }) if u == "bob"));
        let cli = parse(&["--user", "root", "acl", "list"]).unwrap();
        assert!(matches!(&cli.command, Command::Acl(manage::AclCmd::List { user: None })));
    }

    #[test]
    fn gen_secret_writes_32_random_bytes_for_the_owner_only_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;

        use base64ct::Encoding;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.secret");
        assert!(matches!(parse(&["gen-secret", "x"]).unwrap().command, Command::GenSecret { .. }));
        gen_secret(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(base64ct::Base64::decode_vec(text.trim()).unwrap().len(), 32);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(gen_secret(&path).is_err(), "an existing secret is kept");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        let other = dir.path().join("other");
        gen_secret(&other).unwrap();
        assert_ne!(std::fs::read_to_string(&other).unwrap(), text);
    }

    #[test]
    fn count_is_required_and_window_positive() {
        assert!(parse(&["--servers", "h:1", "pub", "q"]).is_err());
        assert!(parse(&["--servers", "h:1", "pub", "q", "--count", "1", "--window", "0"]).is_err());
    }

    #[test]
    fn bench_defaults() {
        let cli = parse(&["--servers", "h:1", "bench"]).unwrap();
        let Command::Bench(args) = cli.command else { panic!("expected bench") };
        assert_eq!((args.count, args.size, args.window, args.queue.as_str()), (200_000, 1024, 256, "bench"));
        assert!(!args.no_consumer);
    }

    #[test]
    fn failover_timeout_is_global_with_a_default() {
        let cli = parse(&["--servers", "h:1", "status"]).unwrap();
        assert_eq!(cli.client_config().unwrap().failover_timeout, Duration::from_secs(30));
        let cli = parse(&["pub", "q", "--count", "1", "--servers", "h:1", "--failover-timeout", "2.5"]).unwrap();
        assert_eq!(cli.client_config().unwrap().failover_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn tls_flags_go_together() {
        assert!(parse(&["--servers", "h:1", "--tls-cert", "c.pem", "status"]).is_err(), "a cert needs its key");
        assert!(parse(&["--servers", "h:1", "--tls-key", "k.pem", "status"]).is_err(), "a key needs its cert");
        assert!(parse(&["--servers", "h:1", "--tls-server-name", "n", "status"]).is_err(), "a name needs a CA");
        let cli = parse(&["--servers", "h:1", "--tls-ca", "/nonexistent/ca.pem", "status"]).unwrap();
        let err = cli.client_tls().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        assert!(parse(&["status", "--servers", "h:1", "--tls-ca", "a", "--tls-cert", "c", "--tls-key", "k"]).is_ok());
    }

    #[test]
    fn promote_requires_force() {
        let err = parse(&["--servers", "h:1", "promote"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let cli = parse(&["--servers", "h:1", "promote", "--force"]).unwrap();
        assert!(matches!(cli.command, Command::Promote { force: true, yes: false }));
        let cli = parse(&["--servers", "h:1", "promote", "--force", "--yes"]).unwrap();
        assert!(matches!(cli.command, Command::Promote { force: true, yes: true }));
        assert!(matches!(parse(&["--servers", "h:1", "switchover"]).unwrap().command, Command::Switchover));
    }

    #[test]
    fn timeout_takes_fractions_and_refuses_negatives() {
        assert_eq!(parse_seconds("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
    }

    #[test]
    fn hashed_password_verifies() {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        let hash = phc_hash("pw").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let parsed = PasswordHash::new(&hash).unwrap();
        assert!(argon2::Argon2::default().verify_password(b"pw", &parsed).is_ok());
        assert!(phc_hash("").is_err());
    }
}
