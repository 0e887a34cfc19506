//! Client configuration: where the pair is, who we are, and the limits.

use std::time::Duration;

use twinmq_protocol::DEFAULT_MAX_FRAME_BYTES;

/// How to reach the broker pair and how much work to keep in flight.
///
/// ```
/// use twinmq_client::ClientConfig;
/// let config = ClientConfig::new(["10.0.0.1:5570", "10.0.0.2:5570"]).user("app").password("secret").window(512);
/// assert_eq!(config.servers.len(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client addresses (`host:port`) of both nodes, tried in order.
    pub servers: Vec<String>,
    pub user: Option<String>,
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

    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    pub fn max_frame_bytes(mut self, bytes: usize) -> Self {
        self.max_frame_bytes = bytes;
        self
    }

    pub fn window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn failover_timeout(mut self, timeout: Duration) -> Self {
        self.failover_timeout = timeout;
        self
    }

    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self
    }

    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    pub fn tls(mut self, tls: crate::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }
}
