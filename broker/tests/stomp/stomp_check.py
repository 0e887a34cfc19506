#!/usr/bin/env python3
"""STOMP scenarios run with stomp.py (a real third-party client) against a
real twinmqd, driven by broker/tests/stomp.rs. Each scenario prints one JSON
line with what it saw, as its last line of output, and exits 0; a failure
raises (exit 1, the traceback on stderr). The Rust test checks the JSON.

    stomp_check.py SCENARIO --hosts HOST:PORT[,HOST:PORT] [options]
"""

import argparse
import base64
import json
import sys
import threading
import time
import uuid

import stomp

TIMEOUT = 30.0


class Collector(stomp.ConnectionListener):
    """Frames as they arrive, and conditions to wait on them."""

    def __init__(self):
        self.cond = threading.Condition()
        self.messages = []
        self.receipts = set()
        self.errors = []
        self.disconnected = 0

    def on_message(self, frame):
        with self.cond:
            self.messages.append(frame)
            self.cond.notify_all()

    def on_receipt(self, frame):
        with self.cond:
            self.receipts.add(frame.headers.get("receipt-id"))
            self.cond.notify_all()

    def on_error(self, frame):
        with self.cond:
            self.errors.append(frame)
            self.cond.notify_all()

    def on_disconnected(self):
        with self.cond:
            self.disconnected += 1
            self.cond.notify_all()

    def wait(self, what, predicate, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out waiting for {what}")
                self.cond.wait(left)


def hosts_of(text):
    out = []
    for h in text.split(","):
        host, port = h.rsplit(":", 1)
        out.append((host, int(port)))
    return out


def connect(hosts, args, collector, heartbeats=(0, 0)):
    conn = stomp.Connection12(hosts, heartbeats=heartbeats, reconnect_attempts_max=1, timeout=5)
    if args.ca:
        conn.set_ssl(for_hosts=hosts, ca_certs=args.ca)
    conn.set_listener("collector", collector)
    conn.connect(args.user, args.password, wait=True)
    return conn


def send_with_receipt(conn, collector, destination, body, headers=None):
    receipt = str(uuid.uuid4())
    conn.send(destination, body, headers=dict(headers or {}, receipt=receipt))
    collector.wait(f"the receipt of a SEND to {destination}", lambda: receipt in collector.receipts or collector.errors)
    if collector.errors:
        raise RuntimeError(f"ERROR instead of a receipt: {collector.errors[0].headers}")


def scenario_basic(args):
    """Persistent sends with receipts, client-individual acks, a NACK redelivered, headers kept."""
    hosts = hosts_of(args.hosts)
    c = Collector()
    conn = connect(hosts, args, c, heartbeats=(1000, 1000))
    n = args.count
    for i in range(n):
        send_with_receipt(conn, c, "/queue/stomp.basic", f"m-{i}", {"x-order": str(i)})
    conn.subscribe("/queue/stomp.basic", id="s1", ack="client-individual")
    nacked = None
    c.wait(f"{n} messages", lambda: len({m.body for m in c.messages}) >= n)
    seen = 0
    while True:
        with c.cond:
            batch = c.messages[seen:]
        for m in batch:
            if nacked is None:
                nacked = m.body
                conn.nack(m.headers["ack"])
            else:
                conn.ack(m.headers["ack"])
        seen += len(batch)
        with c.cond:
            redelivered = [m for m in c.messages if m.body == nacked and m.headers.get("redelivered") == "true"]
            if redelivered and seen == len(c.messages):
                break
        c.wait("the NACKed message again", lambda: len(c.messages) > seen, timeout=10)
    # Everything acked: nothing comes back after a while.
    time.sleep(0.5)
    receipt = str(uuid.uuid4())
    conn.disconnect(receipt=receipt)
    bodies = [m.body for m in c.messages]
    headers_ok = all(m.headers.get("x-order") == m.body.split("-")[1] for m in c.messages)
    print(json.dumps({
        "sent": n,
        "distinct": len(set(bodies)),
        "deliveries": len(bodies),
        "nacked": nacked,
        "nacked_deliveries": bodies.count(nacked),
        "headers_ok": headers_ok,
        "errors": [dict(e.headers) for e in c.errors],
    }))


def scenario_after(args):
    """What is left on a queue (a fresh connection, auto ack): none expected after `basic`."""
    hosts = hosts_of(args.hosts)
    c = Collector()
    conn = connect(hosts, args, c)
    conn.subscribe(args.destination, id="s1", ack="auto")
    time.sleep(1.0)
    conn.disconnect()
    print(json.dumps({"left": [m.body for m in c.messages]}))


def scenario_durable(args):
    """A durable topic subscription keeps what is published while its subscriber is away."""
    hosts = hosts_of(args.hosts)
    header = args.durable_header
    c1 = Collector()
    conn = connect(hosts, args, c1)
    receipt = str(uuid.uuid4())
    conn.subscribe("/topic/stomp.prices", id="d", ack="client", headers={header: "keeper", "receipt": receipt})
    c1.wait("the SUBSCRIBE receipt", lambda: receipt in c1.receipts)
    conn.disconnect(receipt=str(uuid.uuid4()))
    c2 = Collector()
    producer = connect(hosts, args, c2)
    for i in range(args.count):
        send_with_receipt(producer, c2, "/topic/stomp.prices", f"p-{i}")
    producer.disconnect()
    c3 = Collector()
    conn = connect(hosts, args, c3)
    conn.subscribe("/topic/stomp.prices", id="d", ack="client", headers={header: "keeper"})
    c3.wait(f"{args.count} kept messages", lambda: len(c3.messages) >= args.count)
    # client mode: one cumulative ACK of the last settles all.
    last = c3.messages[-1]
    receipt = str(uuid.uuid4())
    conn.ack(last.headers["ack"], receipt=receipt)
    c3.wait("the ACK receipt", lambda: receipt in c3.receipts)
    conn.disconnect()
    c4 = Collector()
    conn = connect(hosts, args, c4)
    conn.subscribe("/topic/stomp.prices", id="d", ack="client", headers={header: "keeper"})
    time.sleep(1.0)
    conn.disconnect()
    print(json.dumps({
        "kept": [m.body for m in c3.messages],
        "after_cumulative_ack": [m.body for m in c4.messages],
    }))


def scenario_refusals(args):
    """ACL refusal of a SEND (ERROR with receipt-id), a wrong password, an unknown destination prefix."""
    hosts = hosts_of(args.hosts)
    out = {}
    c = Collector()
    conn = connect(hosts, args, c)
    receipt = "r-denied"
    conn.send("/queue/secret.q", "x", headers={"receipt": receipt})
    c.wait("an ERROR", lambda: c.errors)
    out["denied"] = dict(c.errors[0].headers)
    out["denied_got_receipt"] = receipt in c.receipts
    c.wait("the close after the ERROR", lambda: c.disconnected > 0, timeout=10)
    c = Collector()
    conn = stomp.Connection12(hosts, reconnect_attempts_max=1, timeout=5)
    if args.ca:
        conn.set_ssl(for_hosts=hosts, ca_certs=args.ca)
    conn.set_listener("collector", c)
    try:
        conn.connect(args.user, "wrong-password", wait=True)
        out["wrong_password"] = "connected"
    except stomp.exception.ConnectFailedException:
        c.wait("an ERROR", lambda: c.errors, timeout=5)
        out["wrong_password"] = dict(c.errors[0].headers)
    c = Collector()
    conn = connect(hosts, args, c)
    conn.send("/exchange/x", "x")
    c.wait("an ERROR", lambda: c.errors)
    out["bad_destination"] = dict(c.errors[0].headers)
    print(json.dumps(out))


def scenario_send(args):
    """Send messages with receipts; with --binary one body of every byte value."""
    hosts = hosts_of(args.hosts)
    c = Collector()
    conn = connect(hosts, args, c)
    headers = json.loads(args.headers) if args.headers else {}
    if args.binary:
        body = bytes(range(256)) * 4
        send_with_receipt(conn, c, args.destination, body, headers)
    else:
        for i in range(args.count):
            send_with_receipt(conn, c, args.destination, f"s-{i}", headers)
    conn.disconnect(receipt=str(uuid.uuid4()))
    print(json.dumps({"sent": args.count, "receipts": len(c.receipts)}))


def scenario_receive(args):
    """Receive COUNT messages (client-individual, acked with receipts): their headers and bodies (base64)."""
    hosts = hosts_of(args.hosts)
    c = Collector()
    c_auto = False
    conn = stomp.Connection12(hosts, reconnect_attempts_max=1, timeout=5, auto_decode=False)
    if args.ca:
        conn.set_ssl(for_hosts=hosts, ca_certs=args.ca)
    conn.set_listener("collector", c)
    conn.connect(args.user, args.password, wait=True)
    conn.subscribe(args.destination, id="r", ack="client-individual")
    c.wait(f"{args.count} messages", lambda: len(c.messages) >= args.count)
    for m in c.messages:
        receipt = str(uuid.uuid4())
        conn.ack(m.headers["ack"], receipt=receipt)
        c.wait("the ACK receipt", lambda: receipt in c.receipts)
    conn.disconnect()
    print(json.dumps({
        "auto": c_auto,
        "messages": [{"headers": dict(m.headers), "body": base64.b64encode(m.body).decode()} for m in c.messages],
    }))


class FailoverClient:
    """A STOMP application riding a failover: both nodes' addresses, and on a
    lost connection (or a passive node's ERROR) it tries them in turn."""

    def __init__(self, args):
        self.args = args
        self.hosts = hosts_of(args.hosts)
        self.conn = None
        self.c = None
        self.reconnects = 0
        self.passive_errors = []

    def ensure(self, deadline=60.0):
        if self.conn is not None and self.conn.is_connected() and not self.c.errors:
            return
        end = time.monotonic() + deadline
        i = 0
        while time.monotonic() < end:
            host = self.hosts[i % len(self.hosts)]
            i += 1
            c = Collector()
            conn = stomp.Connection12([host], reconnect_attempts_max=1, timeout=2)
            conn.set_listener("collector", c)
            try:
                conn.connect(self.args.user, self.args.password, wait=True)
                if self.conn is not None:
                    self.reconnects += 1
                self.conn, self.c = conn, c
                return
            except Exception:
                if c.errors:
                    self.passive_errors.append(c.errors[0].headers.get("message", ""))
                time.sleep(0.05)
        raise RuntimeError("no node accepted a STOMP connection within 60 s")


def scenario_failover_produce(args):
    """Send COUNT messages with receipts across a failover; write each receipted body to --out."""
    fc = FailoverClient(args)
    receipted = open(args.out, "a", buffering=1)
    i = 0
    while i < args.count:
        fc.ensure()
        receipt = f"r-{i}"
        try:
            fc.conn.send("/queue/stomp.failover", f"f-{i}", headers={"receipt": receipt})
            fc.c.wait("a receipt", lambda: receipt in fc.c.receipts or fc.c.errors or fc.c.disconnected, timeout=10)
        except Exception:
            pass
        if receipt in fc.c.receipts:
            receipted.write(f"f-{i}\n")
            i += 1
        # No receipt (lost connection, ERROR): send it again to whichever node serves.
    print(json.dumps({"receipted": i, "reconnects": fc.reconnects, "passive_errors": fc.passive_errors[:3]}))


def scenario_failover_consume(args):
    """Receive until every body listed in --expect arrived (auto ack is not used: client-individual)."""
    expect = set(open(args.expect).read().split())
    fc = FailoverClient(args)
    got = set()
    deliveries = 0
    end = time.monotonic() + 60
    while not expect <= got and time.monotonic() < end:
        fc.ensure()
        fc.conn.subscribe("/queue/stomp.failover", id="f", ack="client-individual", headers={"activemq.prefetchSize": "500"})
        seen = 0
        while not expect <= got and fc.conn.is_connected():
            try:
                fc.c.wait("messages", lambda: len(fc.c.messages) > seen, timeout=5)
            except TimeoutError:
                break
            with fc.c.cond:
                batch = fc.c.messages[seen:]
            seen += len(batch)
            for m in batch:
                deliveries += 1
                got.add(m.body)
                fc.conn.ack(m.headers["ack"])
    print(json.dumps({"expected": len(expect), "missing": sorted(expect - got)[:20], "deliveries": deliveries}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--hosts", required=True)
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--ca")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--destination", default="/queue/stomp.interop")
    p.add_argument("--headers")
    p.add_argument("--binary", action="store_true")
    p.add_argument("--durable-header", default="durable-subscription-name")
    p.add_argument("--out")
    p.add_argument("--expect")
    args = p.parse_args()
    scenarios = {
        "basic": scenario_basic,
        "after": scenario_after,
        "durable": scenario_durable,
        "refusals": scenario_refusals,
        "send": scenario_send,
        "receive": scenario_receive,
        "failover-produce": scenario_failover_produce,
        "failover-consume": scenario_failover_consume,
    }
    scenarios[args.scenario](args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
