//! Client configuration: where the pair is, who we are, and the limits.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use twinmq_protocol::DEFAULT_MAX_FRAME_BYTES;

use crate::ClientEvent;

/// How to reach the broker pair and how much work to keep in flight.
///
/// ```
/// use twinmq_client::ClientConfig;
/// let config = ClientConfig::new(["10.0.0.1:5570", "10.0.0.2:5570"]).user("app").password("secret").window(512);
/// assert_eq!(config.servers.len(), 2);
/// ```
///
/// Fields are public for reading; build it with [`ClientConfig::new`] and
/// the setters (the struct is `#[non_exhaustive]`: later releases add
/// settings with defaults).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Client addresses (`host:port`) of both nodes, tried in order.
    pub servers: Vec<String>,
    /// The user to log in as (`None`: anonymous, if the broker allows it).
    pub user: Option<String>,
    /// The password of `user`.
    pub password: Option<String>,
    /// Shown by the broker in its status and logs.
    pub client_name: String,
    /// Largest frame accepted from the broker; frames sent are also limited by
    /// what the broker announces in its `Welcome`.
    pub max_frame_bytes: usize,
    /// Maximum unconfirmed publishes per producer (at least 1): `send_nowait`
    /// waits for a slot beyond that, which bounds the memory the client keeps
    /// for resending.
    pub window: usize,
    /// Per address and attempt: TCP connect plus the Hello/Welcome handshake.
    pub connect_timeout: Duration,
    /// How long the client keeps trying to reach an active node, counted from
    /// the moment the connection was lost (or from the start of
    /// [`crate::Client::connect`]). Within it a failover costs only time;
    /// past it pending operations fail with
    /// [`crate::ClientError::Disconnected`] (see the crate docs).
    pub failover_timeout: Duration,
    /// A `Ping` goes out when nothing was received from (or sent to) the
    /// broker for this long, so that a quiet connection still carries frames
    /// both ways.
    pub heartbeat_interval: Duration,
    /// The connection counts as lost when no frame at all arrived from the
    /// broker for this long: this is what notices a pulled cable or a frozen
    /// node, which close nothing. Keep it a few `heartbeat_interval`s long.
    pub heartbeat_timeout: Duration,
    /// How long [`crate::Client::close`] waits for outstanding confirms.
    pub close_timeout: Duration,
    /// Speak TLS to the broker (`None`: plain TCP). See [`crate::ClientTls`].
    pub tls: Option<crate::ClientTls>,
    /// The pause between rounds over the addresses while no node is active.
    pub reconnect_backoff: ReconnectBackoff,
    /// Called with every [`ClientEvent`], on the connection task, as it
    /// happens (keep it short: it holds up the connection).
    pub on_event: Option<EventHook>,
}

/// The pause between reconnect rounds: `initial`, doubling up to `max`,
/// each pause shortened by a random fraction of up to `jitter` (0 to 1) so
/// that many clients losing one node do not dial the other in lockstep.
/// The first round after a loss starts at once. The defaults (20 ms, 250 ms,
/// 0.5) find a new active node within a quarter second of its promotion.
///
/// ```
/// use std::time::Duration;
/// use twinmq_client::{ClientConfig, ReconnectBackoff};
/// let calm = ReconnectBackoff::new(Duration::from_millis(100), Duration::from_secs(2)).jitter(0.3);
/// let config = ClientConfig::new(["10.0.0.1:5570"]).reconnect_backoff(calm);
/// assert_eq!(config.reconnect_backoff.max, Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct ReconnectBackoff {
    /// The first pause.
    pub initial: Duration,
    /// The longest pause.
    pub max: Duration,
    /// Up to this fraction of each pause is taken off at random (0: none).
    pub jitter: f64,
}

impl ReconnectBackoff {
    /// `initial` doubling up to `max`, with the default jitter (0.5).
    pub fn new(initial: Duration, max: Duration) -> Self {
        ReconnectBackoff { initial, max: max.max(initial), jitter: 0.5 }
    }

    /// Take up to `fraction` (clamped to 0..=1) of each pause off at random.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_nan() { 0.0 } else { fraction.clamp(0.0, 1.0) };
        self
    }
}

impl Default for ReconnectBackoff {
    fn default() -> Self {
        ReconnectBackoff::new(Duration::from_millis(20), Duration::from_millis(250))
    }
}

/// A callback for [`ClientEvent`]s, made by [`ClientConfig::on_event`].
///
/// ```
/// let config = twinmq_client::ClientConfig::new(["10.0.0.1:5570"]).on_event(|e| eprintln!("twinmq: {e}"));
/// assert!(config.on_event.is_some());
/// ```
#[derive(Clone)]
pub struct EventHook(pub(crate) Arc<dyn Fn(&ClientEvent) + Send + Sync>);

impl fmt::Debug for EventHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EventHook")
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            servers: Vec::new(),
            user: None,
            password: None,
            client_name: "twinmq-client".to_owned(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            window: 256,
            connect_timeout: Duration::from_secs(5),
            failover_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_millis(250),
            heartbeat_timeout: Duration::from_millis(1500),
            close_timeout: Duration::from_secs(10),
            tls: None,
            reconnect_backoff: ReconnectBackoff::default(),
            on_event: None,
        }
    }
}

impl ClientConfig {
    /// Defaults for everything but the server addresses.
    pub fn new<I, S>(servers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig { servers: servers.into_iter().map(Into::into).collect(), ..Default::default() }
    }

    /// The user to log in as.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The password of [`ClientConfig::user`].
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// The name the broker shows in its status and logs.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    /// See [`ClientConfig::max_frame_bytes`](#structfield.max_frame_bytes).
    pub fn max_frame_bytes(mut self, bytes: usize) -> Self {
        self.max_frame_bytes = bytes;
        self
    }

    /// See [`ClientConfig::window`](#structfield.window).
    pub fn window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }

    /// See [`ClientConfig::connect_timeout`](#structfield.connect_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// See [`ClientConfig::failover_timeout`](#structfield.failover_timeout).
    pub fn failover_timeout(mut self, timeout: Duration) -> Self {
        self.failover_timeout = timeout;
        self
    }

    /// See [`ClientConfig::heartbeat_interval`](#structfield.heartbeat_interval).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// See [`ClientConfig::heartbeat_timeout`](#structfield.heartbeat_timeout).
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self
    }

    /// See [`ClientConfig::close_timeout`](#structfield.close_timeout).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Speak TLS (see [`crate::ClientTls`]).
    pub fn tls(mut self, tls: crate::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// See [`ReconnectBackoff`].
    pub fn reconnect_backoff(mut self, backoff: ReconnectBackoff) -> Self {
        self.reconnect_backoff = backoff;
        self
    }

    /// Call `hook` with every connection event (a failover's steps), on the
    /// connection task, as it happens: for metrics or alerts. Events are
    /// also logged at INFO and offered by [`crate::Client::events`].
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    /// use twinmq_client::{ClientConfig, ClientEvent};
    /// let failovers = Arc::new(AtomicU64::new(0));
    /// let counter = failovers.clone();
    /// let config = ClientConfig::new(["10.0.0.1:5570", "10.0.0.2:5570"]).on_event(move |event| {
    ///     if matches!(event, ClientEvent::Disconnected { .. }) {
    ///         counter.fetch_add(1, Ordering::Relaxed);
    ///     }
    /// });
    /// # let _ = config;
    /// ```
    pub fn on_event(mut self, hook: impl Fn(&ClientEvent) + Send + Sync + 'static) -> Self {
        self.on_event = Some(EventHook(Arc::new(hook)));
        self
    }
}
