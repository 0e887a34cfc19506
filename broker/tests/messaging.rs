//! Messaging through a real `twinmqd`: queues, topics, durable subscriptions,
//! redelivery, TTL and dead-lettering.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{drain, Broker};
use twinmq_client::{Destination, Message, SubscribeOptions};

#[tokio::test]
async fn ten_thousand_messages_through_a_queue_arrive_exactly_once() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    let producer = client.producer(Destination::queue("bulk"));
    let mut confirms = Vec::new();
    for i in 0..10_000 {
        confirms.push(producer.send_nowait(Message::persistent(format!("m-{i}"))).await.expect("send"));
    }
    for c in confirms {
        c.await.expect("confirmed");
    }
    let mut consumer = client.subscribe(Destination::queue("bulk"), SubscribeOptions::default()).await.unwrap();
    let got = drain(&mut consumer, 10_001, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 10_000, "exactly 10,000 deliveries");
    let distinct: HashSet<&String> = got.iter().collect();
    assert_eq!(distinct.len(), 10_000, "no duplicates");
    assert_eq!(got[0], "m-0");
    assert_eq!(got[9_999], "m-9999", "one producer, one consumer: order kept");
}

#[tokio::test]
async fn a_confirm_names_the_id_every_consumer_gets_the_message_under() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    let mut on_queue = client.subscribe(Destination::queue("ids"), SubscribeOptions::default()).await.unwrap();
    let mut on_topic = client.subscribe(Destination::topic("ids"), SubscribeOptions::default()).await.unwrap();
    let mut confirmed = Vec::new();
    for (i, message) in
        [Message::persistent("p0"), Message::transient("t1"), Message::persistent("p2")].into_iter().enumerate()
    {
        for producer in [client.producer(Destination::queue("ids")), client.producer(Destination::topic("ids"))] {
            let c = producer.send(message.clone()).await.unwrap();
            assert!(!c.duplicate(), "{i}");
            confirmed.push(c.id().expect("a broker of this release names the id"));
        }
    }
    let mut delivered = Vec::new();
    for _ in 0..3 {
        for consumer in [&mut on_queue, &mut on_topic] {
            let d = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await.unwrap().unwrap().unwrap();
            delivered.push(d.id());
            d.ack().await.unwrap();
        }
    }
    assert_eq!(delivered, confirmed);
    let distinct: HashSet<_> = confirmed.iter().collect();
    assert_eq!(distinct.len(), 6, "six messages, six ids: {confirmed:?}");
}

#[tokio::test]
async fn competing_consumers_share_a_queue() {
    let broker = Broker::start(&[]);
    let c1 = broker.client().await;
    let c2 = broker.client().await;
    let q = Destination::queue("work");
    let mut a = c1.subscribe(q.clone(), SubscribeOptions::default().prefetch(10)).await.unwrap();
    let mut b = c2.subscribe(q.clone(), SubscribeOptions::default().prefetch(10)).await.unwrap();
    let producer = c1.producer(q);
    for i in 0..400 {
        producer.send(Message::persistent(format!("w-{i}"))).await.unwrap();
    }
    let (ga, gb) =
        tokio::join!(drain(&mut a, 400, Duration::from_millis(700)), drain(&mut b, 400, Duration::from_millis(700)));
    assert!(!ga.is_empty() && !gb.is_empty(), "both consumers got work: {} / {}", ga.len(), gb.len());
    let all: HashSet<String> = ga.iter().chain(gb.iter()).cloned().collect();
    assert_eq!(ga.len() + gb.len(), 400, "each message to one consumer");
    assert_eq!(all.len(), 400);
}

#[tokio::test]
async fn topic_fans_out_to_three_subscribers() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    let t = Destination::topic("news");
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(client.subscribe(t.clone(), SubscribeOptions::default()).await.unwrap());
    }
    let producer = client.producer(t);
    for i in 0..100 {
        producer.send(Message::persistent(format!("n-{i}"))).await.unwrap();
    }
    for s in &mut subs {
        let got = drain(s, 100, Duration::from_secs(2)).await;
        assert_eq!(got, (0..100).map(|i| format!("n-{i}")).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn durable_subscription_keeps_messages_while_its_consumer_is_away_and_across_restart() {
    let mut broker = Broker::start(&[]);
    let t = Destination::topic("prices");
    {
        let client = broker.client().await;
        let sub = client.subscribe(t.clone(), SubscribeOptions::default().durable("audit")).await.unwrap();
        sub.unsubscribe().await.unwrap();
        let producer = client.producer(t.clone());
        for i in 0..50 {
            producer.send(Message::persistent(format!("p-{i}"))).await.unwrap();
        }
        client.close().await.unwrap();
    }
    broker.kill9();
    broker.restart();
    let client = broker.client().await;
    // A non-durable subscriber joining now sees none of the earlier messages.
    let mut late = client.subscribe(t.clone(), SubscribeOptions::default()).await.unwrap();
    let mut sub = client.subscribe(t.clone(), SubscribeOptions::default().durable("audit")).await.unwrap();
    let got = drain(&mut sub, 50, Duration::from_secs(2)).await;
    assert_eq!(got, (0..50).map(|i| format!("p-{i}")).collect::<Vec<_>>());
    assert!(drain(&mut late, 1, Duration::from_millis(300)).await.is_empty());
    client.delete_durable("prices", "audit").await.unwrap();
    assert!(client.delete_durable("prices", "audit").await.is_err(), "deleting twice is an error");
}

#[tokio::test]
async fn unacked_messages_are_redelivered_after_their_consumer_dies() {
    let broker = Broker::start(&[]);
    let producer_client = broker.client().await;
    let q = Destination::queue("jobs");
    let producer = producer_client.producer(q.clone());
    for i in 0..5 {
        producer.send(Message::persistent(format!("j-{i}"))).await.unwrap();
    }
    {
        let doomed = broker.client().await;
        let mut c = doomed.subscribe(q.clone(), SubscribeOptions::default().prefetch(5)).await.unwrap();
        for _ in 0..5 {
            let d = c.recv().await.unwrap().unwrap();
            assert!(!d.message().redelivered);
            // Not acked.
        }
        drop(c);
        drop(doomed); // the connection goes away without acking
    }
    let survivor = broker.client().await;
    let mut c = survivor.subscribe(q, SubscribeOptions::default()).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let d = tokio::time::timeout(Duration::from_secs(5), c.recv()).await.expect("redelivered").unwrap().unwrap();
        assert!(d.message().redelivered, "flagged redelivered");
        assert_eq!(d.message().delivery_count, 1);
        seen.push(String::from_utf8_lossy(d.payload()).into_owned());
        d.ack().await.unwrap();
    }
    assert_eq!(seen, (0..5).map(|i| format!("j-{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn unacked_delivery_comes_back_after_the_ack_timeout() {
    let broker = Broker::start(&["--ack-timeout-ms", "300"]);
    let client = broker.client().await;
    let q = Destination::queue("slow");
    client.producer(q.clone()).send(Message::persistent("once")).await.unwrap();
    let mut c = client.subscribe(q, SubscribeOptions::default()).await.unwrap();
    let first = c.recv().await.unwrap().unwrap();
    assert!(!first.message().redelivered);
    let again = tokio::time::timeout(Duration::from_secs(3), c.recv()).await.expect("redelivery").unwrap().unwrap();
    assert_eq!(again.payload(), b"once");
    assert!(again.message().redelivered);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn expired_messages_are_never_delivered() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    let q = Destination::queue("ttl");
    let producer = client.producer(q.clone());
    producer.send(Message::persistent("short").ttl(Duration::from_millis(100))).await.unwrap();
    producer.send(Message::persistent("long").ttl(Duration::from_secs(60))).await.unwrap();
    producer.send(Message::persistent("forever")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut c = client.subscribe(q, SubscribeOptions::default()).await.unwrap();
    let got = drain(&mut c, 3, Duration::from_millis(800)).await;
    assert_eq!(got, vec!["long".to_string(), "forever".to_string()]);
}

async fn recv(c: &mut twinmq_client::Consumer) -> Option<Result<twinmq_client::Delivery, twinmq_client::ClientError>> {
    tokio::time::timeout(Duration::from_secs(5), c.recv()).await.expect("a delivery within 5 s")
}

async fn queue_depth(client: &twinmq_client::Client, name: &str) -> u64 {
    let status = client.status().await.unwrap();
    status.queues.iter().find(|q| q.name == name).map_or(0, |q| q.depth)
}

#[tokio::test]
async fn a_nack_with_a_delay_holds_the_message_back_for_that_long_and_counts_it_meanwhile() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    let q = Destination::queue("later");
    for body in ["busy", "next"] {
        client.producer(q.clone()).send(Message::persistent(body)).await.unwrap();
    }
    let mut c = client.subscribe(q, SubscribeOptions::default()).await.unwrap();
    let busy = recv(&mut c).await.unwrap().unwrap();
    assert_eq!(busy.payload(), b"busy");
    let nacked = Instant::now();
    busy.nack_after(Duration::from_millis(600)).await.unwrap();
    let next = recv(&mut c).await.unwrap().unwrap();
    assert_eq!(next.payload(), b"next", "the held message does not block the queue");
    next.ack().await.unwrap();
    assert_eq!(queue_depth(&client, "queue:later").await, 1, "held back, still counted");
    let again = recv(&mut c).await.unwrap().unwrap();
    assert!(nacked.elapsed() >= Duration::from_millis(600), "redelivered after {:?}", nacked.elapsed());
    assert_eq!((again.payload(), again.message().redelivered), (&b"busy"[..], true));
    again.ack().await.unwrap();
    assert_eq!(queue_depth(&client, "queue:later").await, 0);
}

#[tokio::test]
async fn a_cumulative_ack_settles_the_earlier_deliveries_of_its_consumer_only() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    let q = Destination::queue("runs");
    for i in 0..5 {
        client.producer(q.clone()).send(Message::persistent(format!("m{i}"))).await.unwrap();
    }
    let mut c = client.subscribe(q.clone(), SubscribeOptions::default()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(recv(&mut c).await.unwrap().unwrap());
    }
    let fifth = got.pop().unwrap();
    let fourth = got.pop().unwrap();
    drop(got); // m0..m2: settled by the cumulative ack, never acked one by one
    fourth.ack_through().await.unwrap();
    // m4 is still held by this consumer; the other four are gone.
    assert_eq!(queue_depth(&client, "queue:runs").await, 1);
    drop(fifth);
    c.unsubscribe().await.unwrap();
    let mut again = client.subscribe(q, SubscribeOptions::default()).await.unwrap();
    let back = recv(&mut again).await.unwrap().unwrap();
    assert_eq!((back.payload(), back.message().redelivered), (&b"m4"[..], true));
    let more = tokio::time::timeout(Duration::from_millis(500), again.recv()).await;
    assert!(more.is_err(), "nothing else comes back: {more:?}");
}

#[tokio::test]
async fn a_terminated_message_goes_to_the_dead_letter_queue_at_once() {
    let broker = Broker::start(&["--max-redeliveries", "5"]);
    let client = broker.client().await;
    let q = Destination::queue("strict");
    client.producer(q.clone()).send(Message::persistent("poison").header("k", "v")).await.unwrap();
    let mut c = client.subscribe(q, SubscribeOptions::default()).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), c.recv()).await.unwrap().unwrap().unwrap();
    d.terminate().await.unwrap();
    let redelivered = tokio::time::timeout(Duration::from_millis(500), c.recv()).await;
    assert!(redelivered.is_err(), "never delivered again: {redelivered:?}");
    let mut dlq = client.subscribe(Destination::queue("strict.dlq"), SubscribeOptions::default()).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), dlq.recv()).await.expect("dead letter").unwrap().unwrap();
    assert_eq!(d.payload(), b"poison");
    let headers = &d.message().headers;
    assert_eq!(headers.get("k").map(String::as_str), Some("v"));
    assert_eq!(headers.get("x-dead-letter-from").map(String::as_str), Some("queue:strict"));
    d.ack().await.unwrap();
    assert_eq!(queue_depth(&client, "queue:strict").await, 0);
}

#[tokio::test]
async fn a_message_nacked_past_max_redeliveries_moves_to_the_dead_letter_queue() {
    let broker = Broker::start(&["--max-redeliveries", "2"]);
    let client = broker.client().await;
    let q = Destination::queue("fragile");
    client.producer(q.clone()).send(Message::persistent("poison").header("k", "v")).await.unwrap();
    client.producer(q.clone()).send(Message::persistent("fine")).await.unwrap();
    let mut c = client.subscribe(q, SubscribeOptions::default().prefetch(1)).await.unwrap();
    let mut poison_deliveries = 0;
    let mut fine = 0;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(800), c.recv()).await {
        if d.payload() == b"poison" {
            poison_deliveries += 1;
            d.nack().await.unwrap();
        } else {
            fine += 1;
            d.ack().await.unwrap();
        }
    }
    assert_eq!(poison_deliveries, 3, "first delivery plus max_redeliveries (2)");
    assert_eq!(fine, 1);
    let mut dlq = client.subscribe(Destination::queue("fragile.dlq"), SubscribeOptions::default()).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(2), dlq.recv()).await.expect("dead letter").unwrap().unwrap();
    assert_eq!(d.payload(), b"poison");
    assert_eq!(d.message().headers.get("k").map(String::as_str), Some("v"));
    assert_eq!(d.message().headers.get("x-dead-letter-from").map(String::as_str), Some("queue:fragile"));
    d.ack().await.unwrap();
}

#[tokio::test]
async fn sigterm_drains_and_keeps_every_confirmed_message() {
    let mut broker = Broker::start(&[]);
    let client = broker.client().await;
    let producer = client.producer(Destination::queue("drain"));
    for i in 0..1000 {
        producer.send(Message::persistent(format!("d-{i}"))).await.unwrap();
    }
    let status = broker.terminate();
    assert!(status.success(), "clean exit after SIGTERM, got {status}");
    assert!(broker.log().contains("store flushed and closed"), "log:\n{}", broker.log());
    broker.restart();
    let client = broker.client().await;
    let mut c = client.subscribe(Destination::queue("drain"), SubscribeOptions::default()).await.unwrap();
    assert_eq!(drain(&mut c, 1000, Duration::from_secs(2)).await.len(), 1000);
}

#[tokio::test]
async fn a_poison_message_reaches_the_dead_letter_queue_across_restarts() {
    // Issue 9: redelivery counts lived in memory only, so a message that
    // crashed its consumers was redelivered forever across failovers.
    let mut broker = Broker::start(&["--max-redeliveries", "2"]);
    let q = Destination::queue("crashy");
    broker.client().await.producer(q.clone()).send(Message::persistent("poison")).await.unwrap();
    for round in 1..=3u32 {
        let client = broker.client().await;
        let mut c = client.subscribe(q.clone(), SubscribeOptions::default().prefetch(1)).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), c.recv()).await.expect("delivered").unwrap().unwrap();
        assert_eq!(d.payload(), b"poison");
        assert_eq!(d.message().delivery_count, round - 1, "the count survives the restart");
        d.nack().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(client);
        // The node goes down with the nacked message in its queue.
        broker.kill9();
        broker.restart();
    }
    let client = broker.client().await;
    let mut dlq = client.subscribe(Destination::queue("crashy.dlq"), SubscribeOptions::default()).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), dlq.recv()).await.expect("dead letter").unwrap().unwrap();
    assert_eq!(d.payload(), b"poison");
    assert_eq!(d.message().headers.get("x-delivery-count").map(String::as_str), Some("3"));
}

#[tokio::test]
async fn an_ack_naming_another_epoch_settles_nothing() {
    use std::io::Write;
    use twinmq_protocol::{ClientFrame, MessageId};
    let broker = Broker::start(&[]);
    broker.client().await.producer(Destination::queue("ids")).send(Message::persistent("x")).await.unwrap();
    // The delivery's id, then an ack for the same seq in another epoch.
    let (mut s, id) = raw_consumer(broker.addr, "ids");
    let other = MessageId { epoch: id.epoch + 7, seq: id.seq };
    s.write_all(&common::frame(&ClientFrame::Ack { sub_id: 1, id: other, receipt: None, through: false })).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    // Not acked: it comes back to the next consumer.
    let client = broker.client().await;
    let mut c = client.subscribe(Destination::queue("ids"), SubscribeOptions::default()).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), c.recv()).await.expect("redelivered").unwrap().unwrap();
    assert_eq!((d.payload(), d.message().redelivered), (&b"x"[..], true));
}

#[tokio::test]
async fn an_ack_with_a_receipt_is_answered_once_stored_and_refused_when_it_settles_nothing() {
    use std::io::Write;
    use twinmq_protocol::{ClientFrame, ErrorCode, ErrorContext, ServerFrame};
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    client.producer(Destination::queue("receipts")).send(Message::persistent("x")).await.unwrap();
    let (mut s, id) = raw_consumer(broker.addr, "receipts");
    // The same ack twice, each with a receipt: the first settles, the second nothing.
    for req in [41, 42] {
        s.write_all(&common::frame(&ClientFrame::Ack { sub_id: 1, id, receipt: Some(req), through: false })).unwrap();
    }
    let answers: Vec<_> = read_some(&mut s)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Done { req } => Some((req, None)),
            ServerFrame::Error(e) => match e.context {
                ErrorContext::Request { req } => Some((req, Some(e.code))),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(answers, vec![(41, None), (42, Some(ErrorCode::InvalidRequest))]);
    assert_eq!(queue_depth(&client, "queue:receipts").await, 0);
    drop(s);

    // Through the client: ack_stored resolves once stored.
    client.producer(Destination::queue("receipts")).send(Message::persistent("y")).await.unwrap();
    let mut c = client.subscribe(Destination::queue("receipts"), SubscribeOptions::default()).await.unwrap();
    let d = recv(&mut c).await.unwrap().unwrap();
    d.ack_stored().await.unwrap();
    assert_eq!(queue_depth(&client, "queue:receipts").await, 0);
}

/// A raw connection subscribed (sub 1, prefetch 1) to `queue`, and the id of its first delivery.
fn raw_consumer(addr: std::net::SocketAddr, queue: &str) -> (std::net::TcpStream, twinmq_protocol::MessageId) {
    use std::io::Write;
    use twinmq_protocol::{ClientFrame, ServerFrame};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(&common::hello()).unwrap();
    let subscribe = ClientFrame::Subscribe {
        sub_id: 1,
        destination: twinmq_protocol::Destination::queue(queue),
        durable: None,
        prefetch: 1,
    };
    s.write_all(&common::frame(&subscribe)).unwrap();
    let id = read_some(&mut s)
        .iter()
        .find_map(|f| match f {
            ServerFrame::Deliver { message, .. } => Some(message.id),
            _ => None,
        })
        .expect("delivered");
    (s, id)
}

/// The frames a broker sent within half a second (the connection stays open).
fn read_some(s: &mut std::net::TcpStream) -> Vec<twinmq_protocol::ServerFrame> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    common::take_frames(&mut got)
}

/// The connection hands its session every frame the socket holds in one go
/// (issue 12): written in one piece, 600 publishes of one producer to three
/// queues nobody named before (each waits for its name to be resolved) with
/// the permits running out (`max_inflight_per_connection` 64) are stored
/// all, in the producer's order; a frame out of order would be a lower
/// sequence after a higher one, confirmed as a duplicate and not stored.
#[tokio::test]
async fn publishes_read_in_one_go_keep_their_order_across_name_lookups_and_permits() {
    use std::io::Write;
    use twinmq_protocol::ServerFrame;
    let broker = Broker::start(&["--max-inflight-per-connection", "64"]);
    let mut s = std::net::TcpStream::connect(broker.addr).unwrap();
    let mut bytes = common::hello();
    let queues = ["batch-a", "batch-b", "batch-c"];
    for seq in 1..=600u64 {
        let q = queues[(seq % 3) as usize];
        bytes.extend(common::publish(7, seq, q, &format!("{q}-{seq}")));
    }
    s.write_all(&bytes).unwrap();
    let mut confirmed = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut frames = common::Frames::default();
    while confirmed.len() < 600 && std::time::Instant::now() < deadline {
        for f in frames.read(&mut s) {
            match f {
                ServerFrame::Confirm { producer_id: 7, seq, duplicate, .. } => {
                    assert!(!duplicate, "seq {seq} confirmed as a duplicate: a frame overtook it");
                    confirmed.push(seq);
                }
                ServerFrame::Welcome { .. } => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
    confirmed.sort_unstable();
    assert_eq!(confirmed, (1..=600).collect::<Vec<u64>>(), "every publish confirmed once");
    let client = broker.client().await;
    for (i, q) in queues.iter().enumerate() {
        let mut c = client.subscribe(Destination::queue(*q), SubscribeOptions::default()).await.unwrap();
        let got = drain(&mut c, 201, Duration::from_secs(2)).await;
        let want: Vec<String> = (1..=600u64).filter(|s| (s % 3) as usize == i).map(|s| format!("{q}-{s}")).collect();
        assert_eq!(got, want, "{q}: every message, in the producer's order");
    }
}

/// Resends among new publishes read in one go (one store submission since
/// issue 12 groups a turn's publishes per queue): each resend is confirmed
/// as a duplicate and the new ones are stored. With the store's old check
/// (one resend made the whole submission a duplicate) the new ones were
/// confirmed as duplicates and lost.
#[tokio::test]
async fn resends_among_new_publishes_read_together_lose_none_of_the_new() {
    use std::io::Write;
    use twinmq_protocol::ServerFrame;
    let broker = Broker::start(&[]);
    let mut s = std::net::TcpStream::connect(broker.addr).unwrap();
    let publish = |seq: u64| common::publish(5, seq, "resend", &format!("m{seq}"));
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut frames = common::Frames::default();
    let mut confirms = |s: &mut std::net::TcpStream, n: usize| {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while out.len() < n && std::time::Instant::now() < deadline {
            for f in frames.read(s) {
                match f {
                    ServerFrame::Confirm { producer_id: 5, seq, duplicate, .. } => out.push((seq, duplicate)),
                    ServerFrame::Welcome { .. } => {}
                    other => panic!("unexpected frame {other:?}"),
                }
            }
        }
        out.sort_unstable();
        out
    };
    let mut first = common::hello();
    for seq in 1..=3 {
        first.extend(publish(seq));
    }
    s.write_all(&first).unwrap();
    assert_eq!(confirms(&mut s, 3), [(1, false), (2, false), (3, false)]);
    // Written in one piece, so read (and submitted) together.
    // 6 twice: the first is stored, the second is its resend (review: both
    // were confirmed as duplicates, the stored one included).
    let second: Vec<u8> = [2, 4, 5, 3, 6, 6].into_iter().flat_map(publish).collect();
    s.write_all(&second).unwrap();
    assert_eq!(
        confirms(&mut s, 6),
        [(2, true), (3, true), (4, false), (5, false), (6, false), (6, true)],
        "resends confirmed as duplicates, the new ones stored"
    );
    let client = broker.client().await;
    let mut c = client.subscribe(Destination::queue("resend"), SubscribeOptions::default()).await.unwrap();
    let got = drain(&mut c, 7, Duration::from_secs(2)).await;
    assert_eq!(got, ["m1", "m2", "m3", "m4", "m5", "m6"], "each message stored once");
}

/// Acks and then an unsubscribe, written in one piece: the acks count
/// (nothing comes back to the next consumer). Since issue 12 a session
/// gathers a turn's acks per queue; a frame that acts on a subscription must
/// not overtake them (the unsubscribe took the deliveries back first, the
/// acks then named deliveries that were no longer the consumer's, and all
/// three were delivered again).
#[tokio::test]
async fn acks_then_an_unsubscribe_read_together_are_acks() {
    use std::io::Write;
    use twinmq_protocol::{ClientFrame, ServerFrame};
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    let producer = client.producer(Destination::queue("acked"));
    for i in 0..3 {
        producer.send(Message::persistent(format!("m{i}").into_bytes())).await.unwrap();
    }
    let mut s = std::net::TcpStream::connect(broker.addr).unwrap();
    let mut hello = common::hello();
    hello.extend(common::frame(&ClientFrame::Subscribe {
        sub_id: 1,
        destination: twinmq_protocol::Destination::queue("acked"),
        durable: None,
        prefetch: 16,
    }));
    s.write_all(&hello).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let (mut frames, mut ids) = (common::Frames::default(), Vec::new());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ids.len() < 3 && std::time::Instant::now() < deadline {
        for f in frames.read(&mut s) {
            if let ServerFrame::Deliver { sub_id: 1, message } = f {
                ids.push(message.id);
            }
        }
    }
    assert_eq!(ids.len(), 3, "three deliveries");
    let mut settle: Vec<u8> = ids
        .iter()
        .flat_map(|id| common::frame(&ClientFrame::Ack { sub_id: 1, id: *id, receipt: None, through: false }))
        .collect();
    settle.extend(common::frame(&ClientFrame::Unsubscribe { sub_id: 1 }));
    s.write_all(&settle).unwrap();
    // Once the unsubscribe is through, the next consumer gets nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = client.subscribe(Destination::queue("acked"), SubscribeOptions::default()).await.unwrap();
    let again = drain(&mut c, 3, Duration::from_millis(700)).await;
    assert!(again.is_empty(), "acked messages delivered again: {again:?}");
}

/// Acks and then a publish to the same full queue, written in one piece:
/// the acks make the room the publish takes. Review of the grouping (issue
/// 12): a turn's publishes were handed over before its acks, so the publish
/// found the queue still full and was refused with LimitReached.
#[tokio::test]
async fn acks_read_before_a_publish_make_room_for_it() {
    use std::io::Write;
    use twinmq_protocol::{ClientFrame, ServerFrame};
    let broker = Broker::start(&["--max-queue-depth", "2"]);
    let publish = |seq: u64| common::publish(9, seq, "room", &format!("m{seq}"));
    let mut s = std::net::TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut frames = common::Frames::default();
    let mut read = |s: &mut std::net::TcpStream| frames.read(s);
    // Two publishes fill the queue (and make the queue's address known to
    // the session: no name lookup, which would send the acks first anyway).
    let mut first = common::hello();
    first.extend(publish(1));
    first.extend(publish(2));
    s.write_all(&first).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut confirmed = 0;
    while confirmed < 2 && std::time::Instant::now() < deadline {
        confirmed += read(&mut s).iter().filter(|f| matches!(f, ServerFrame::Confirm { .. })).count();
    }
    s.write_all(&common::frame(&ClientFrame::Subscribe {
        sub_id: 1,
        destination: twinmq_protocol::Destination::queue("room"),
        durable: None,
        prefetch: 2,
    }))
    .unwrap();
    let mut ids = Vec::new();
    while ids.len() < 2 && std::time::Instant::now() < deadline {
        for f in read(&mut s) {
            if let ServerFrame::Deliver { sub_id: 1, message } = f {
                ids.push(message.id);
            }
        }
    }
    assert_eq!(ids.len(), 2, "two deliveries");
    // The queue is full (two delivered, unacked): ack both, then publish.
    let mut bytes: Vec<u8> = ids
        .iter()
        .flat_map(|id| common::frame(&ClientFrame::Ack { sub_id: 1, id: *id, receipt: None, through: false }))
        .collect();
    bytes.extend(publish(3));
    s.write_all(&bytes).unwrap();
    let mut answer = None;
    while answer.is_none() && std::time::Instant::now() < deadline {
        answer = read(&mut s).into_iter().find(|f| matches!(f, ServerFrame::Confirm { .. } | ServerFrame::Error(_)));
    }
    assert!(
        matches!(answer, Some(ServerFrame::Confirm { producer_id: 9, seq: 3, duplicate: false, .. })),
        "the publish after the acks: {answer:?}"
    );
}

/// A client that keeps the broker reading (its socket never empty, the
/// permits running out all the time) is heard all along: each frame counts
/// as heard, and a turn of the connection's read-ahead ends after at most
/// 256 frames or a wait for a permit, so its checks (idle, back-pressure,
/// shutdown) run between turns. Review of the read-ahead (issue 12): a turn
/// that never ended kept the time of its first frame, and the idle timeout
/// closed a client that was sending all the while.
#[tokio::test]
async fn a_client_streaming_publishes_is_never_taken_for_idle() {
    use std::io::{Read, Write};
    use twinmq_protocol::{ClientFrame, OutMessage, ServerFrame};
    let broker = Broker::start(&["--max-inflight-per-connection", "4", "--idle-timeout-ms", "1000"]);
    let mut s = std::net::TcpStream::connect(broker.addr).unwrap();
    s.write_all(&common::hello()).unwrap();
    // Read everything the broker sends (confirms), so that nothing backs
    // up, until 300 ms after the answer to the ping that ends the stream
    // (less than the idle timeout: from then on the client is idle).
    let mut rd = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        rd.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let (mut got, mut frames, mut buf) = (Vec::new(), Vec::new(), vec![0u8; 64 * 1024]);
        let mut until = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < until {
            match rd.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => continue,
            }
            for f in common::take_frames(&mut got) {
                if matches!(f, ServerFrame::Pong { nonce: 42 }) {
                    until = std::time::Instant::now() + Duration::from_millis(300);
                }
                if !matches!(f, ServerFrame::Confirm { .. }) {
                    frames.push(f);
                }
            }
        }
        frames
    });
    // 20,000 persistent publishes with 4 permits: the broker reads them for
    // longer than the idle timeout (each 4 wait for a group commit), its
    // socket never empty meanwhile; then the ping.
    let mut stream: Vec<u8> = (1..=20_000u64)
        .flat_map(|seq| {
            let message =
                OutMessage { headers: Default::default(), payload: vec![b'x'; 32], ttl_ms: None, persistent: true };
            common::frame(&ClientFrame::Publish {
                producer_id: 0,
                seq,
                destination: twinmq_protocol::Destination::queue("stream"),
                message,
            })
        })
        .collect();
    stream.extend(common::frame(&ClientFrame::Ping { nonce: 42 }));
    s.write_all(&stream).expect("the broker keeps reading a client that sends");
    let frames = reader.join().unwrap();
    let errors: Vec<&ServerFrame> = frames.iter().filter(|f| matches!(f, ServerFrame::Error(_))).collect();
    assert!(errors.is_empty(), "no error for a client that was sending all the while: {errors:?}");
    assert!(
        frames.iter().any(|f| matches!(f, ServerFrame::Pong { nonce: 42 })),
        "the ping after the stream is answered"
    );
}
