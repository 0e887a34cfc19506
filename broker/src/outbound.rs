//! `Outbound`: the frames on their way to one client, shared by the
//! client's session and the queues and topics that deliver to it and
//! confirm its publishes (so that they need nothing else of the session).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::mpsc::UnboundedSender;
use twinmq_protocol::{MessageId, ServerFrame};

use crate::metrics::Metrics;

/// Bytes of deliveries waiting for one slow client past which its queues
/// stop handing it more (they look again on their next tick): what a
/// consumer that stops reading can cost, whatever its prefetch.
pub const MAX_OUTBOUND_BYTES: usize = 8 * 1024 * 1024;

/// Frames on their way to one client, counted in frames and in (estimated)
/// bytes: the connection's reader stops reading while too many frames wait,
/// and queues stop delivering while too many bytes do (a client that does
/// not read must not grow the broker's memory).
#[derive(Clone, Debug)]
pub struct Outbound {
    tx: UnboundedSender<ServerFrame>,
    queued: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
    /// Every delivery and confirm passes here, so they are counted here.
    metrics: Metrics,
}

impl Outbound {
    pub fn new(
        tx: UnboundedSender<ServerFrame>,
        queued: Arc<AtomicUsize>,
        bytes: Arc<AtomicUsize>,
        metrics: Metrics,
    ) -> Outbound {
        Outbound { tx, queued, bytes, metrics }
    }

    /// What a frame costs while it waits, roughly: its payload and headers.
    pub fn cost(frame: &ServerFrame) -> usize {
        match frame {
            ServerFrame::Deliver { message, .. } => {
                128 + message.payload.len() + message.headers.iter().map(|(k, v)| k.len() + v.len() + 16).sum::<usize>()
            }
            _ => 64,
        }
    }

    /// Queue a frame; `Err` when the connection is gone (the frame is dropped).
    pub fn send(&self, frame: ServerFrame) -> Result<(), Closed> {
        if matches!(frame, ServerFrame::Deliver { .. }) {
            self.metrics.message_out();
        }
        let cost = Self::cost(&frame);
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(cost, Ordering::Relaxed);
        self.tx.send(frame).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub(cost, Ordering::Relaxed);
            Closed
        })
    }

    /// Queue the confirm of a publish received at `received` (counted, with
    /// its latency); `id`: the message's id as consumers will see it.
    pub fn confirm(&self, producer_id: u64, seq: u64, received: Instant, id: Option<MessageId>) -> Result<(), Closed> {
        self.metrics.confirmed(received);
        self.send(ServerFrame::Confirm { producer_id, seq, duplicate: false, id })
    }

    /// The confirm of a resend: nothing was stored now, the producer id and
    /// sequence were stored before (the client is told so, never misled).
    pub fn confirm_duplicate(&self, producer_id: u64, seq: u64, received: Instant) -> Result<(), Closed> {
        self.metrics.confirmed(received);
        self.send(ServerFrame::Confirm { producer_id, seq, duplicate: true, id: None })
    }

    /// More than [`MAX_OUTBOUND_BYTES`] wait for this client: deliver no more for now.
    pub fn backed_up(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) > MAX_OUTBOUND_BYTES
    }

    /// The connection is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The connection ended: what [`Outbound::send`] answers then, and what the
/// connection tells its session.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Closed;
