//! Starting and stopping a broker.
//!
//! `run` is the whole life of a node: open the store, recover, start the
//! writer, the router and its destinations, serve on the listening sockets
//! it is given until `shutdown` resolves, then drain in order: stop
//! accepting, let connections finish their in-flight confirms, stop the
//! writer (it flushes what is left), close the store and report its error.
//!
//! The sockets are bound before `run` (by the daemon, from the
//! configuration or socket activation: `sockets.rs`; by a test, on port 0):
//! a connection that arrives while the store opens waits in the backlog
//! until the node serves it.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;
use twinmq_ha::Role;
use twinmq_store::{Store, StoreConfig, Writer, WriterConfig};

use crate::config::Config;
use crate::connection::ConnectionContext;
use crate::http;
use crate::listener::{self, Listener};
use crate::metrics::Metrics;
use crate::node::{Node, SetPair};
use crate::sockets::{self, Listeners};
use crate::{BrokerError, Shared};
use twinmq_ha::Pair;

/// Open the store. A pair member whose store fails its checks keeps the bad
/// copy aside (for inspection), starts from an empty one and resyncs from its
/// peer (DESIGN.md section 5: it never becomes active from a store it cannot
/// trust, and never stays down); a single node refuses to start.
fn open_store(config: &StoreConfig, pair_member: bool) -> Result<(Store, twinmq_store::Recovered), BrokerError> {
    match Store::open(config) {
        Err(e) if e.is_corruption() && pair_member => {
            let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let mut aside = config.path.clone().into_os_string();
            aside.push(format!(".corrupt-{stamp}"));
            let aside = std::path::PathBuf::from(aside);
            tracing::error!(
                error = %e,
                kept_at = %aside.display(),
                "the store fails its checks: keeping it aside and resyncing from the peer"
            );
            std::fs::rename(&config.path, &aside).map_err(|err| {
                BrokerError::Internal(format!("cannot move the corrupt store {} aside: {err}", config.path.display()))
            })?;
            Ok(Store::open(config)?)
        }
        other => Ok(other?),
    }
}

/// Serve as a broker on `listeners` until `shutdown` resolves. Must run
/// inside an actix `System`. `listeners` must fit `config`: an HA socket
/// exactly when it configures a pair, an HTTP socket exactly when
/// `http_listen` is set (see [`Listeners::bind`]). `ready` receives the
/// client address once every port is served.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<(), BrokerError> {
    let (_keep, reloads) = tokio::sync::mpsc::unbounded_channel();
    run_reloadable(config, listeners, shutdown, ready, reloads).await
}

/// The keys a reload applies while running (see [`Reload`]).
pub const RELOADABLE: [&str; 4] = ["tls_cert", "tls_key", "tls_client_ca", "users"];

/// A configuration read again while running (SIGHUP, `daemon.rs`): what
/// [`RELOADABLE`] names is applied from it, nothing else. The certificate
/// files are read again even when their paths did not change (a renewal
/// replaces the files in place).
#[derive(Debug)]
pub struct Reload {
    pub config: Config,
}

/// [`run`], applying each [`Reload`] received on `reloads`.
pub async fn run_reloadable(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
    mut reloads: tokio::sync::mpsc::UnboundedReceiver<Reload>,
) -> Result<(), BrokerError> {
    listeners.check(&config)?;
    let Listeners { client: client_listener, ha: ha_listener, http: http_listener, stomp: stomp_listener } = listeners;
    let config = Arc::new(config);
    let statics = Arc::new(crate::config::static_users(&config.users)?);

    let store_config = StoreConfig {
        cache_bytes: config.cache_bytes as u64,
        read_cache_bytes: config.body_cache_bytes / 2,
        // A pair member checks every record at open: a copy that fails its
        // checks is set aside and resynced from the peer (DESIGN.md section 5).
        checkpoints: config.pair.is_none(),
        ..StoreConfig::new(&config.data_dir)
    };
    let pair_member = config.pair.is_some();
    let (store, mut recovered) = {
        let sc = store_config.clone();
        tokio::task::spawn_blocking(move || open_store(&sc, pair_member))
            .await
            .map_err(|e| BrokerError::Internal(e.to_string()))??
    };
    store.claim_node_id(&config.node_id)?;
    let repl = store.repl_meta()?;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        epoch = recovered.epoch,
        next_seq = recovered.next_seq,
        batches = recovered.batches,
        queues = recovered.queues.len(),
        serve_alone = repl.serve_alone,
        "store opened"
    );
    let (writer, writer_thread) = Writer::start(
        store.clone(),
        &mut recovered,
        WriterConfig {
            durability: config.durability,
            max_batch_ops: config.max_batch_ops,
            // A pair member starts passive (DESIGN.md section 4, cold start).
            active: config.pair.is_none(),
            require_replica: config.require_replica,
            compaction: config.compaction.clone(),
            ..WriterConfig::default()
        },
    )?;

    let (role_tx, role_rx) = watch::channel(Role::Passive);
    let mut shared = Shared::new(role_rx, recovered.epoch);
    shared.disk = crate::disk::DiskUse::start(
        &config.data_dir,
        config.max_disk_bytes,
        config.min_free_disk_bytes,
        writer.stats_handle(),
        config.pair.is_some(),
    );
    let (router_tx, router_rx) = watch::channel(None);
    let (security_tx, security_rx) = watch::channel(Default::default());
    let mut node = Node::new(
        config.clone(),
        shared.clone(),
        writer.clone(),
        role_tx,
        router_tx,
        statics,
        recovered.users.clone(),
        security_tx,
    );
    if security_rx.borrow().is_open() {
        tracing::warn!("no users configured or stored: any client can connect without credentials");
    }
    let mut pair = None;
    let node = match &config.pair {
        None => {
            node.serve(recovered);
            node.start()
        }
        Some(ha) => {
            drop(recovered);
            let node = node.start();
            let ha_listener = ha_listener.ok_or(BrokerError::Listeners("a pair member needs an HA listener"))?;
            let ha_listen = sockets::local_addr(&ha_listener);
            tracing::info!(%ha_listen, peer_ha = ?ha.peer_ha, gateway = %ha.gateway, "pair member: starting passive");
            let p = Pair::start(
                Arc::new(ha.clone()),
                writer.clone(),
                node.clone().recipient(),
                node.clone().recipient(),
                ha_listener,
            );
            node.do_send(SetPair(p.arbiter.clone(), p.status.clone()));
            pair = Some(p);
            node
        }
    };

    let metrics = Metrics::new();
    // Bound before the client port, so a node that accepts clients answers HTTP too.
    let http = match http_listener {
        Some(l) => Some(http::start(
            l,
            node.clone(),
            metrics.clone(),
            config.http_token.clone(),
            config.http_tls.clone(),
            config.http_hosts.clone(),
        )?),
        None => None,
    };

    let local = sockets::local_addr(&client_listener);
    let tcp = tokio::net::TcpListener::from_std(client_listener)
        .map_err(|source| BrokerError::Bind { addr: local, source })?;
    let io: Vec<Arbiter> = (0..config.io_threads).map(|_| Arbiter::new()).collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let cx = ConnectionContext {
        config: config.clone(),
        router: router_rx,
        node: node.clone(),
        security: security_rx,
        shared: shared.clone(),
        shutdown: stop_rx,
        ha_status: pair.as_ref().map(|p: &Pair| p.status.clone()),
        metrics,
        logins: crate::auth::LoginGate::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
        tickets: Arc::new(crate::ticket::Tickets::new(config.pair.as_ref().map(|p| &p.cluster_secret))),
    };
    let stomp = match stomp_listener {
        Some(l) => {
            let addr = sockets::local_addr(&l);
            let tcp = tokio::net::TcpListener::from_std(l).map_err(|source| BrokerError::Bind { addr, source })?;
            tracing::info!(stomp_listen = %addr, "STOMP 1.2 listening");
            let io = io.iter().map(Arbiter::handle).collect();
            Some(Listener::for_protocol(listener::WireProtocol::Stomp, tcp, io, cx.clone()).start())
        }
        None => None,
    };
    let listener = Listener::new(tcp, io.iter().map(Arbiter::handle).collect(), cx).start();
    {
        let (config, node) = (config.clone(), node.clone());
        actix_rt::spawn(async move {
            while let Some(reload) = reloads.recv().await {
                apply_reload(&config, &node, reload).await;
            }
        });
    }
    let tls = match &config.tls {
        None => "off",
        Some(t) if t.mutual => "on, client certificates required",
        Some(_) => "on",
    };
    tracing::info!(node_id = %config.node_id, listen = %local, durability = %config.durability, tls, "listening");
    if let Some(ready) = ready {
        let _ = ready.send(local);
    }

    shutdown.await;
    tracing::info!("shutting down: no new connections, draining in-flight confirms");
    listener.do_send(listener::StopAccepting);
    if let Some(stomp) = &stomp {
        stomp.do_send(listener::StopAccepting);
    }
    let http_stopped = http.as_ref().map(http::HttpEndpoint::stop);
    shared.shutting_down.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    // Connections close once their in-flight publishes are confirmed (bounded wait).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while shared.connections.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(p) = &pair {
        p.stop();
        // Nobody will declare the peer down now: release what waits for it
        // (durable here) rather than wait forever.
        writer.shutting_down();
    }
    // Wait until every op submitted so far is committed.
    let (tx, rx) = tokio::sync::oneshot::channel();
    writer.barrier(Box::new(move |_| {
        let _ = tx.send(());
    }));
    if tokio::time::timeout(Duration::from_secs(10), rx).await.is_err() {
        tracing::error!("the store writer did not drain within 10 s; closing anyway");
    }
    if let Some(stopped) = http_stopped {
        stopped.await;
    }
    drop(node);
    for a in &io {
        a.stop();
    }
    drop(writer);
    // The writer thread ends when the last handle goes; destination actors
    // still hold handles until the System stops, so the final flush is ours.
    let _ = writer_thread;
    tokio::task::spawn_blocking(move || store.close()).await.map_err(|e| BrokerError::Internal(e.to_string()))??;
    tracing::info!("store flushed and closed; bye");
    Ok(())
}

/// Apply what a reload may change: the client port's certificate (new
/// connections get it; open ones keep theirs) and the configuration's users
/// (connections of a removed user are closed, as for `twinmq user rm`).
async fn apply_reload(running: &Config, node: &Addr<Node>, Reload { config }: Reload) {
    match (&running.tls, &config.tls) {
        (Some(now), Some(new)) => match now.replace(new) {
            Ok(()) => tracing::info!("SIGHUP: client TLS certificate reloaded (for new connections)"),
            Err(why) => tracing::warn!("SIGHUP: client TLS not reloaded: {why}; needs a restart"),
        },
        (None, None) => {}
        _ => tracing::warn!("SIGHUP: TLS was turned on or off on the client port; needs a restart"),
    }
    if running.http_tls.is_some() {
        tracing::info!("SIGHUP: the HTTP endpoint keeps its certificate until a restart");
    }
    match crate::config::static_users(&config.users) {
        Ok(statics) => {
            let n = statics.len();
            match node.send(crate::node::ReplaceStaticUsers(Arc::new(statics))).await {
                Ok(()) => tracing::info!(users = n, "SIGHUP: users of the configuration reloaded"),
                Err(e) => tracing::warn!(error = %e, "SIGHUP: users not reloaded"),
            }
        }
        Err(e) => tracing::error!(error = %e, "SIGHUP: users not reloaded"),
    }
}
