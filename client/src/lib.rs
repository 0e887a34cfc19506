//! twinmq-client: the async client for applications of a twinmq broker pair.
//!
//! Owns: finding the active node ([`Client::connect`] follows `NotActive`
//! hints), one connection task per [`Client`] that owns the socket and all
//! per-connection state, producers with a window of unconfirmed messages,
//! consumers with prefetch and acks. Does not own: the wire format (that is
//! `twinmq-protocol`) or anything of the broker.
//!
//! What the calls promise:
//! - [`Producer::send`] resolves `Ok` once the broker confirmed the message,
//!   i.e. made it durable as the broker's durability mode says.
//!   [`Producer::send_nowait`] returns a [`Confirm`] that resolves then;
//!   confirms of one producer resolve in send order.
//! - Delivery is at-least-once: [`Delivery::ack`] removes the message;
//!   without it the message comes back, flagged `redelivered`.
//! - Not yet: reconnecting after a lost connection. The state needed to
//!   resend unconfirmed publishes and re-create subscriptions is kept, but a
//!   lost connection currently fails every pending operation and ends every
//!   consumer with [`ClientError::Disconnected`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), twinmq_client::ClientError> {
//! use twinmq_client::{Client, ClientConfig, Destination, Message, SubscribeOptions};
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7878", "127.0.0.2:7878"])).await?;
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

mod client;
mod config;
mod connect;
mod connection;
mod consumer;
mod error;
mod link;
mod producer;

pub use client::Client;
pub use config::ClientConfig;
pub use consumer::{Consumer, Delivery, SubscribeOptions};
pub use error::ClientError;
pub use link::ServerInfo;
pub use producer::{Confirm, Message, Producer};
pub use twinmq_protocol::{Delivered, DestKind, Destination, ErrorCode, MessageId, OutMessage};
