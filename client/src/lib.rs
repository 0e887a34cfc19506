//! twinmq-client: the async client for applications of a twinmq broker pair.
//!
//! Owns: finding the active node (`dial`: configured order, `NotActive`
//! hints, retries), one connection task per [`Client`] that owns the socket
//! and all per-connection state and carries it over failovers, producers
//! with a window of unconfirmed messages, consumers with prefetch and acks,
//! admin connections ([`AdminClient`]). Does not own: the `twinmq` CLI (crate `twinmq-cli`),
//! the wire format (that is `twinmq-protocol`) or anything of the broker.
//!
//! What the calls promise:
//! - [`Producer::send`] resolves to [`Confirmed`] (with the message's
//!   [`MessageId`]) once the broker confirmed the message, i.e. made it
//!   durable as the broker's durability mode says. [`Producer::send_nowait`]
//!   returns a [`Confirm`] that resolves then, [`Producer::send_batch`] one
//!   per message; confirms of one producer resolve in send order, each
//!   exactly once.
//! - Delivery is at-least-once: a [`Consumer`] (a `futures` [`Stream`] of
//!   [`Delivery`]s, or [`Consumer::recv`]) hands each message over with its
//!   id; [`Delivery::ack`] removes it and says whether the ack went out
//!   (`Err(`[`ClientError::NotSettled`]`)` between connections),
//!   [`Delivery::ack_stored`] waits until the broker has stored it,
//!   [`Delivery::ack_through`] acks a run of deliveries at once; without
//!   an ack the message comes back, flagged `redelivered`.
//!   [`Delivery::nack_after`] and [`Delivery::terminate`] retry later or
//!   give up on a message (client protocol 2). Consumers should be
//!   idempotent: deduplicate by [`Delivery::id`] (`examples/src/worker.rs`).
//! - Payloads are [`bytes::Bytes`]: a payload is not copied on its way in
//!   ([`Message::persistent`] takes anything `Into<Bytes>`) nor out
//!   ([`Delivery::payload_bytes`]).
//!
//! The public types are this crate's own ([`Destination`], [`MessageId`],
//! [`ErrorCode`], [`Message`], [`ReceivedMessage`]), not the wire's, and
//! enums and configuration structs are `#[non_exhaustive]`, so that the
//! wire can grow without breaking applications; which client releases talk
//! to which brokers is written down in `docs/COMPATIBILITY.md`.
//!
//! [`Stream`]: futures_util::Stream
//!
//! # Failover
//!
//! Give the client both nodes' addresses. A connection counts as lost on
//! end of stream, reset, a write error, an error frame for the whole
//! connection (or any `NotActive`/`ShuttingDown` refusal), or when no frame
//! at all arrived for [`ClientConfig::heartbeat_timeout`] (default 1.5 s; the
//! client pings every [`ClientConfig::heartbeat_interval`], default 250 ms, so
//! a live broker always has something to answer). Then, without failing
//! anything:
//! 1. The client dials the configured addresses in rounds (a `NotActive`
//!    answer's hint first, an unanswering address never holding up the next
//!    for more than 150 ms), pausing between rounds as
//!    [`ClientConfig::reconnect_backoff`] says (20 ms, 40 ms, ... up to
//!    250 ms, each up to half shorter at random), until a node welcomes it.
//! 2. On the new connection it re-creates every subscription under the same
//!    id, destination, durable name and prefetch, and waits for the broker's
//!    answers; a subscription the broker now refuses ends its consumer with
//!    that error.
//! 3. Then it sends every unconfirmed publish of every producer again, in
//!    the original order and with the same producer id and sequence (the
//!    broker stores a resend once and confirms it normally), then the
//!    publishes and requests made during the outage, which waited (subject
//!    to each producer's window) instead of failing.
//!
//! So a failover shorter than [`ClientConfig::failover_timeout`] (default
//! 30 s, counted from the loss) costs the application only time: no error,
//! no lost or doubled confirm, no permit leaked. Deliveries already handed
//! to a consumer stay valid: acking them on the new connection is harmless;
//! the broker redelivers those it did not see acked, so a consumer may see a
//! message twice (at-least-once). An ack made while disconnected is not sent
//! and says so ([`ClientError::NotSettled`]; the message comes back). If no node accepts within `failover_timeout`,
//! every pending send, request and `subscribe` fails and every consumer ends
//! with [`ClientError::Disconnected`]; refused credentials end it at once
//! with the broker's `NotAuthenticated` error. Every call made after that
//! end returns the same error (after [`Client::close`]: [`ClientError::Closed`]).
//! [`Client::connect`] likewise
//! retries until `failover_timeout` while every node is passive or
//! unreachable, so an application started during a failover still connects.
//! Each step is a [`ClientEvent`] on [`Client::events`], a call of the
//! [`ClientConfig::on_event`] hook, and an INFO log line.
//!
//! # TLS
//!
//! [`ClientConfig::tls`] with a [`ClientTls`] (a CA file, optionally a
//! client certificate) makes every connection TLS. A failed TLS handshake is
//! final like refused credentials: [`ClientError::Tls`] at once, no retry.
//!
//! What a failover does not hide: a non-durable topic subscription lives
//! with its connection, so messages published between the loss and its
//! re-creation never reach it (durable subscriptions and queues keep them).
//! A request resent after a failover may find its first attempt done (a
//! second `delete_durable` is refused). [`Client::close`] during an outage
//! keeps reconnecting to collect outstanding confirms, up to `close_timeout`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), twinmq_client::ClientError> {
//! use twinmq_client::{Client, ClientConfig, Destination, Message, SubscribeOptions};
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:5570", "127.0.0.2:5570"])).await?;
//! let producer = client.producer(Destination::queue("orders"));
//! producer.send(Message::persistent("hello")).await?;
//! let mut consumer = client.subscribe(Destination::queue("orders"), SubscribeOptions::default()).await?;
//! if let Some(delivery) = consumer.recv().await {
//!     let delivery = delivery?;
//!     println!("{}", String::from_utf8_lossy(delivery.payload()));
//!     delivery.ack().await?;
//! }
//! client.close().await
//! # }
//! ```

#![warn(missing_docs)]

pub mod admin;
mod client;
mod config;
mod connection;
mod consumer;
mod dial;
mod error;
mod events;
mod link;
mod producer;
mod status;
mod tls;
mod types;

pub use admin::{AdminClient, PromoteRisk};
pub use client::Client;
pub use config::{ClientConfig, EventHook, ReconnectBackoff};
pub use consumer::{Consumer, Delivery, ReceivedMessage, SubscribeOptions};
pub use error::ClientError;
pub use events::ClientEvent;
pub use link::ServerInfo;
pub use producer::{Confirm, Confirmed, Message, Producer};
pub use status::{GatewayStatus, NodeStatus, PeerStatus, QueueStatus};
pub use tls::ClientTls;
pub use types::{Destination, DestinationKind, ErrorCode, MessageId};
