//! The failover contract (crate docs, "Failover") against fake brokers: a
//! lost connection costs the application time, never an error, until
//! `failover_timeout`; then everything pending fails with `Disconnected`.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use twinmq_client::{Client, ClientError, ClientEvent, Destination, ErrorCode, Message, SubscribeOptions};
use twinmq_protocol::{ClientFrame, ServerFrame};

/// Events until (and including) the first that `last` accepts.
async fn events_until(
    events: &mut broadcast::Receiver<ClientEvent>,
    last: impl Fn(&ClientEvent) -> bool,
) -> Vec<ClientEvent> {
    within(async {
        let mut seen = Vec::new();
        loop {
            let event = events.recv().await.unwrap();
            let done = last(&event);
            seen.push(event);
            if done {
                return seen;
            }
        }
    })
    .await
}

fn publishes(frames: &[(usize, ClientFrame)], connection: usize) -> Vec<(u64, u64, Vec<u8>)> {
    frames
        .iter()
        .filter(|(c, _)| *c == connection)
        .filter_map(|(_, f)| match f {
            ClientFrame::Publish { producer_id, seq, message, .. } => {
                Some((*producer_id, *seq, message.payload.clone()))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_publish_stream_survives_a_dropped_connection_with_each_confirm_once_and_in_order() {
    const COUNT: u64 = 300;
    let mode = Mode::Active { auto_confirm: true, reject_seq: None, cut_at_seq: Some((120, Cut::Connection)) };
    let mut broker = FakeBroker::start(mode).await;
    let client = Client::connect(config(&[&broker.addr]).window(32)).await.unwrap();
    let mut events = client.events();
    let producer = client.producer(Destination::queue("q"));

    let (confirms, mut pending) = mpsc::channel(64);
    let sending = producer.clone();
    let sender = tokio::spawn(async move {
        for i in 0..COUNT {
            let confirm = sending.send_nowait(Message::persistent(format!("m{i}"))).await.unwrap();
            confirms.send((i, confirm)).await.unwrap();
        }
    });
    let mut confirmed = Vec::new();
    while let Some((i, confirm)) = pending.recv().await {
        within(confirm).await.unwrap();
        confirmed.push(i);
    }
    sender.await.unwrap();
    assert_eq!(confirmed, (0..COUNT).collect::<Vec<_>>(), "every message confirmed once, in order");
    assert_eq!(producer.in_flight(), 0, "no window permit leaked or released twice");

    // The broker stored each (producer id, seq) once; the cut one was stored
    // on the first connection and came again on the second.
    assert_eq!(broker.connections(), 2);
    let stored: BTreeMap<u64, usize> = broker
        .stored()
        .into_iter()
        .map(|((id, seq), n)| {
            assert_eq!(id, producer.id());
            (seq, n)
        })
        .collect();
    assert_eq!(stored.keys().copied().collect::<Vec<_>>(), (1..=COUNT).collect::<Vec<_>>());
    assert_eq!(stored[&120], 2, "the unconfirmed publish was resent with its producer id and seq");

    // First connection: 1..=120 then the cut. Second: a consecutive run from
    // the first unconfirmed seq, resends identical to what was sent before.
    let frames = broker.drain();
    let first = publishes(&frames, 1);
    let second = publishes(&frames, 2);
    assert_eq!(first.iter().map(|p| p.1).collect::<Vec<_>>(), (1..=120).collect::<Vec<_>>());
    let resent_from = second[0].1;
    assert!(resent_from <= 120, "resend starts at the first unconfirmed publish, not at {resent_from}");
    assert_eq!(second.iter().map(|p| p.1).collect::<Vec<_>>(), (resent_from..=COUNT).collect::<Vec<_>>());
    for (id, seq, payload) in &second {
        assert_eq!(*id, producer.id());
        assert_eq!(payload, format!("m{}", seq - 1).as_bytes(), "seq {seq} carries its original message");
    }

    let seen = events_until(&mut events, |e| matches!(e, ClientEvent::Resent { .. })).await;
    assert!(matches!(&seen[0], ClientEvent::Disconnected { addr, .. } if *addr == broker.addr), "{seen:?}");
    assert!(seen.contains(&ClientEvent::Reconnecting { attempt: 1 }), "{seen:?}");
    assert!(seen.contains(&ClientEvent::Connected { addr: broker.addr.clone(), node_id: broker.addr.clone() }));
    assert!(seen.contains(&ClientEvent::Resubscribed { count: 0 }), "{seen:?}");
    assert!(matches!(seen.last(), Some(ClientEvent::Resent { count }) if *count >= 1), "{seen:?}");
    client.close().await.unwrap();
}

#[tokio::test]
async fn subscriptions_are_recreated_after_a_reconnect() {
    let mut broker = FakeBroker::start(active()).await;
    let client = Client::connect(config(&[&broker.addr])).await.unwrap();
    let mut queue =
        client.subscribe(Destination::queue("orders"), SubscribeOptions::default().prefetch(7)).await.unwrap();
    let mut topic =
        client.subscribe(Destination::topic("prices"), SubscribeOptions::default().durable("audit")).await.unwrap();
    let subscribe = |connection: usize| {
        move |c: usize, f: ClientFrame| match f {
            ClientFrame::Subscribe { sub_id, destination, durable, prefetch } if c == connection => {
                Some((sub_id, destination, durable, prefetch))
            }
            _ => None,
        }
    };
    let before = vec![broker.next_on(subscribe(1)).await, broker.next_on(subscribe(1)).await];
    let (queue_id, topic_id) = (before[0].0, before[1].0);
    broker.send(ServerFrame::Deliver { sub_id: queue_id, message: delivered(1, "before") });
    let unacked = within(queue.recv()).await.unwrap().unwrap();

    let mut events = client.events();
    broker.drop_connection();
    let after = vec![broker.next_on(subscribe(2)).await, broker.next_on(subscribe(2)).await];
    assert_eq!(after, before, "same ids, destinations, durable names and prefetch");
    assert_eq!(before[0].3, 7);
    assert_eq!(before[1].2.as_deref(), Some("audit"));
    events_until(&mut events, |e| *e == ClientEvent::Resubscribed { count: 2 }).await;

    // A delivery of the old connection may be acked on the new one.
    unacked.ack().await.unwrap();
    let acked = broker.next_on(|c, f| matches!(f, ClientFrame::Ack { .. }).then_some(c)).await;
    assert_eq!(acked, 2);
    // The same consumers carry on, without an error in between.
    broker.send(ServerFrame::Deliver { sub_id: queue_id, message: delivered(1, "before") });
    broker.send(ServerFrame::Deliver { sub_id: topic_id, message: delivered(2, "after") });
    assert_eq!(within(queue.recv()).await.unwrap().unwrap().payload(), b"before");
    assert_eq!(within(topic.recv()).await.unwrap().unwrap().payload(), b"after");
}

#[tokio::test]
async fn a_refused_resubscription_ends_only_its_consumer() {
    let mut broker = FakeBroker::start(active()).await;
    let client = Client::connect(config(&[&broker.addr])).await.unwrap();
    let mut kept = client.subscribe(Destination::queue("kept"), SubscribeOptions::default()).await.unwrap();
    let mut gone = client.subscribe(Destination::queue("gone"), SubscribeOptions::default()).await.unwrap();
    let mut events = client.events();
    broker.refuse_subscriptions_to("gone");
    broker.drop_connection();
    let err = within(gone.recv()).await.unwrap().unwrap_err();
    assert!(matches!(err, ClientError::Broker { code: ErrorCode::UnknownDestination, .. }), "{err:?}");
    assert!(within(gone.recv()).await.is_none());
    events_until(&mut events, |e| *e == ClientEvent::Resubscribed { count: 1 }).await;
    let sub_id = broker
        .next_on(|c, f| match f {
            ClientFrame::Subscribe { sub_id, destination, .. } if c == 2 && destination.name == "kept" => Some(sub_id),
            _ => None,
        })
        .await;
    broker.send(ServerFrame::Deliver { sub_id, message: delivered(1, "still here") });
    assert_eq!(within(kept.recv()).await.unwrap().unwrap().payload(), b"still here");
}

#[tokio::test]
async fn a_not_active_hint_is_followed_when_reconnecting() {
    let first = FakeBroker::start(active()).await;
    let hinted = FakeBroker::start(active()).await;
    let passive = FakeBroker::start(Mode::Passive { hint: Some(hinted.addr.clone()) }).await;
    let client = Client::connect(config(&[&first.addr, &passive.addr])).await.unwrap();
    assert_eq!(client.server().addr, first.addr);
    let mut events = client.events();
    let producer = client.producer(Destination::queue("q"));
    producer.send(Message::persistent("before")).await.unwrap();

    first.kill();
    within(producer.send(Message::persistent("after"))).await.unwrap();
    assert_eq!(client.server().addr, hinted.addr, "the hint (not in the configured list) was followed");
    assert!(passive.connections() >= 1);
    let seen = events_until(&mut events, |e| matches!(e, ClientEvent::Connected { .. })).await;
    assert!(matches!(seen.last(), Some(ClientEvent::Connected { addr, .. }) if *addr == hinted.addr), "{seen:?}");
    assert_eq!(hinted.stored().len(), 1);
}

#[tokio::test]
async fn heartbeat_silence_triggers_a_reconnect() {
    let mut broker = FakeBroker::start(active()).await;
    let config = config(&[&broker.addr])
        .heartbeat_interval(Duration::from_millis(50))
        .heartbeat_timeout(Duration::from_millis(400));
    let client = Client::connect(config).await.unwrap();
    // An idle connection carries pings.
    broker.next_on(|c, f| (c == 1 && matches!(f, ClientFrame::Ping { .. })).then_some(())).await;
    let mut events = client.events();
    broker.freeze_connection().await;
    let frozen_at = Instant::now();
    // Written to the frozen socket: never answered there.
    let producer = client.producer(Destination::queue("q"));
    let confirm = producer.send_nowait(Message::persistent("m")).await.unwrap();
    within(confirm).await.unwrap();
    assert!(frozen_at.elapsed() >= Duration::from_millis(350), "not before the heartbeat timeout");
    assert_eq!(broker.connections(), 2);
    let (connection, seq) =
        broker.next_on(|c, f| if let ClientFrame::Publish { seq, .. } = f { Some((c, seq)) } else { None }).await;
    assert_eq!((connection, seq), (2, 1), "the publish stuck on the frozen connection was resent");
    let seen = events_until(&mut events, |e| matches!(e, ClientEvent::Connected { .. })).await;
    assert!(
        matches!(&seen[0], ClientEvent::Disconnected { reason, .. } if reason.contains("nothing received")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn work_issued_during_an_outage_waits_and_a_client_started_then_still_connects() {
    let first = FakeBroker::start(active()).await;
    let mut second = FakeBroker::start(Mode::Passive { hint: None }).await;
    // The fake serves one connection at a time: the late client gets its own pair.
    let third = FakeBroker::start(Mode::Passive { hint: None }).await;
    let client = Client::connect(config(&[&first.addr, &second.addr])).await.unwrap();
    let mut events = client.events();
    let producer = client.producer(Destination::queue("q"));
    first.kill();
    events_until(&mut events, |e| matches!(e, ClientEvent::Disconnected { .. })).await;

    // All of this waits for the next active node instead of failing.
    let confirm = producer.send_nowait(Message::persistent("during")).await.unwrap();
    let status = tokio::spawn({
        let client = client.clone();
        async move { client.status().await }
    });
    let subscribe = tokio::spawn({
        let client = client.clone();
        async move { client.subscribe(Destination::queue("q"), SubscribeOptions::default()).await }
    });
    let late = tokio::spawn(Client::connect(config(&[&first.addr, &third.addr])));
    // A round found no active node (the second one is still passive).
    events_until(&mut events, |e| *e == ClientEvent::Reconnecting { attempt: 2 }).await;
    assert!(!status.is_finished() && !subscribe.is_finished() && !late.is_finished());

    second.set_mode(active());
    third.set_mode(active());
    within(confirm).await.unwrap();
    assert_eq!(within(status).await.unwrap().unwrap().role, "active");
    let _consumer = within(subscribe).await.unwrap().unwrap();
    let late = within(late).await.unwrap().unwrap();
    assert_eq!((client.server().addr, late.server().addr), (second.addr.clone(), third.addr.clone()));
    let published = second.next(|f| if let ClientFrame::Publish { seq, .. } = f { Some(seq) } else { None }).await;
    assert_eq!(published, 1);
}

#[tokio::test]
async fn giving_up_after_the_failover_timeout_fails_pending_work_with_disconnected() {
    let failover_timeout = Duration::from_millis(300);
    let broker = FakeBroker::start(manual()).await;
    let client = Client::connect(config(&[&broker.addr]).failover_timeout(failover_timeout)).await.unwrap();
    let mut consumer = client.subscribe(Destination::queue("q"), SubscribeOptions::default()).await.unwrap();
    let producer = client.producer(Destination::queue("q"));
    let first = producer.send_nowait(Message::persistent("a")).await.unwrap();
    let second = producer.send_nowait(Message::persistent("b")).await.unwrap();
    let mut events = client.events();
    broker.kill();
    let lost_at = Instant::now();
    let during = producer.send_nowait(Message::persistent("c")).await.unwrap();

    assert!(matches!(within(first).await, Err(ClientError::Disconnected)));
    assert!(lost_at.elapsed() >= failover_timeout, "kept trying for the failover timeout");
    assert!(matches!(within(second).await, Err(ClientError::Disconnected)));
    assert!(matches!(within(during).await, Err(ClientError::Disconnected)));
    assert!(matches!(within(consumer.recv()).await, Some(Err(ClientError::Disconnected))));
    assert!(within(consumer.recv()).await.is_none());
    assert!(matches!(producer.send(Message::persistent("d")).await, Err(ClientError::Disconnected)));
    assert!(matches!(client.status().await, Err(ClientError::Disconnected)));
    assert_eq!(producer.in_flight(), 0);
    let seen = events_until(&mut events, |e| matches!(e, ClientEvent::GaveUp { .. })).await;
    assert!(matches!(&seen[0], ClientEvent::Disconnected { .. }), "{seen:?}");
    assert!(seen.iter().filter(|e| matches!(e, ClientEvent::Reconnecting { .. })).count() >= 2, "{seen:?}");
}

#[tokio::test]
async fn refused_credentials_on_reconnect_end_the_client_at_once() {
    let broker = FakeBroker::start(manual()).await;
    let client = Client::connect(config(&[&broker.addr])).await.unwrap();
    let producer = client.producer(Destination::queue("q"));
    let confirm = producer.send_nowait(Message::persistent("a")).await.unwrap();
    broker.set_mode(Mode::RefuseAuth);
    broker.drop_connection();
    // Well within the default failover timeout of 30 s.
    let err = within(confirm).await.unwrap_err();
    assert!(matches!(err, ClientError::Broker { code: ErrorCode::NotAuthenticated, .. }), "{err:?}");
}
