"""integration/journal.py: the events every worker of the service applies, in one order."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from integration.journal import EventConflict, EventJournal


class Histories:
    """A stand-in for the pipeline's ``add_interaction``: per-user lists, and every call in order."""

    def __init__(self) -> None:
        self.users: dict[object, list[object]] = {}
        self.calls: list[tuple[object, object, int | None]] = []

    def __call__(self, user: object, item: object, timestamp: int | None) -> int:
        self.calls.append((user, item, timestamp))
        self.users.setdefault(user, []).append(item)
        return len(self.users[user])


def _share_events(ja, jb, a: Histories, b: Histories) -> None:
    """Two journals over one store (``ja`` applying to ``a``, ``jb`` to ``b``): each applies the other's
    events in one order, a retry through the other is recognised, a reused ID is a conflict."""
    assert ja.record(1, 50, None, "e1") == (1, False)
    assert jb.record(1, 60, 881250949, "e2") == (2, False)  # b applied a's event first
    assert ja.catch_up() == 1 and jb.catch_up() == 0
    assert a.calls == b.calls == [(1, 50, None), (1, 60, 881250949)]
    # a retry through the other worker is recognised, with the length the first try reported
    assert jb.record(1, 50, None, "e1") == (1, True) and ja.record(1, 60, 881250949, "e2") == (2, True)
    with pytest.raises(EventConflict, match="event_id 'e1' was already used for user 1, item 50"):
        jb.record(2, 50, None, "e1")
    assert len(a.calls) == len(b.calls) == 2  # duplicates and conflicts apply nothing
    # string IDs survive the file as strings
    assert ja.record("cust-7", "sku-1", None, None) == (1, False)
    assert jb.catch_up() == 1 and b.users["cust-7"] == ["sku-1"]


def test_two_workers_see_each_others_events_and_retries(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    a, b = Histories(), Histories()
    _share_events(EventJournal(a, path, "ml-100k"), EventJournal(b, path, "ml-100k"), a, b)


def test_a_restart_replays_the_log(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    first = Histories()
    j = EventJournal(first, path, "ml-100k")
    for n in range(5):
        j.record(7, n, None, f"e{n}")
    j.close()
    again = Histories()
    j2 = EventJournal(again, path, "ml-100k")
    assert j2.replayed == 5 and again.calls == first.calls
    assert j2.record(7, 3, None, "e3") == (4, True)  # event IDs are remembered across the restart


def test_a_line_being_written_waits_and_a_foreign_log_is_refused(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    h = Histories()
    j = EventJournal(h, path, "ml-100k")
    line = json.dumps({"user_id": 3, "item_id": 9, "timestamp": None, "event_id": None}) + "\n"
    with open(path, "a") as f:  # another writer, halfway through its line
        f.write(line[:20])
    assert j.catch_up() == 0 and h.calls == []
    with open(path, "a") as f:
        f.write(line[20:])
    assert j.catch_up() == 1 and h.calls == [(3, 9, None)]
    with pytest.raises(ValueError, match="not an events log of ml-1m.*give --events-log a new file"):
        EventJournal(Histories(), path, "ml-1m")
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        EventJournal(Histories(), path, "ml-100k")


def test_in_memory_without_a_file() -> None:
    h = Histories()
    j = EventJournal(h, None, "ml-100k")
    assert j.record(1, 2, None, "e") == (1, False) and j.record(1, 2, None, "e") == (1, True)
    assert j.catch_up() == 0 and h.calls == [(1, 2, None)]


def _writer(path: str, worker: int, n: int, barrier, out) -> None:
    h = Histories()
    j = EventJournal(h, path, "ml-100k")
    barrier.wait(timeout=120)  # both start writing together
    for k in range(n):
        j.record(k % 5, f"w{worker}-{k}", None, f"w{worker}-{k}")
        if k % 7 == 0:
            j.catch_up()
    barrier.wait(timeout=120)  # both done writing
    j.catch_up()
    out.put(h.calls)


def test_concurrent_writers_in_two_processes_agree_on_one_order(tmp_path) -> None:
    """Two processes appending 2000 events each at once: none lost or torn, and each writer's own
    view and a reader of the file agree on one order."""
    path = str(tmp_path / "events.jsonl")
    ctx = multiprocessing.get_context("spawn")
    q, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(path, w, 2000, barrier, q)) for w in range(2)]
    for p in procs:
        p.start()
    views = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    reader = Histories()
    EventJournal(reader, path, "ml-100k")
    assert views[0] == views[1] == reader.calls
    assert len(reader.calls) == 4000 and len({item for _, item, _ in reader.calls}) == 4000
    for w in range(2):  # each writer's events in the order it wrote them
        mine = [item for _, item, _ in reader.calls if item.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{k}" for k in range(2000)]
    lines = open(path).read().splitlines()
    assert len(lines) == 4001 and all(json.loads(x) for x in lines)


def test_service_refuses_bad_worker_and_log_flags_before_loading(tmp_path, capsys) -> None:
    from integration.service import main

    for flags, message in (
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--events-log", str(tmp_path / "missing" / "events.jsonl")], "its directory does not exist"),
    ):
        with pytest.raises(SystemExit):
            main(["--artifacts", str(tmp_path / "no-artifacts-here"), *flags])
        assert message in capsys.readouterr().err


def test_replicas_share_events_through_redis_and_refuse_them_while_it_is_down(tmp_path) -> None:
    """RedisJournal (``--state``) on a real redis-server that persists every write: two replicas see
    each other's events in one order, a retry through the other replica is recognised, a reused ID
    is a conflict; with Redis down an event raises StateUnavailable (nothing recorded) and catch-up
    serves what the replica has, ``degraded``; restarted, Redis still holds every acknowledged event,
    which a new replica replays; another data set's events live apart."""
    import time

    from bench.service_chaos import RedisServer
    from integration.journal import RETRY_S, RedisJournal, StateUnavailable

    server = RedisServer(tmp_path, persistent=True).start()
    try:
        a, b = Histories(), Histories()
        ja = RedisJournal(a, server.url, "ml-100k", lambda u: len(a.users.get(u, [])))
        jb = RedisJournal(b, server.url, "ml-100k", lambda u: len(b.users.get(u, [])))
        assert ja.persistent is True and ja.status() == {
            "store": "redis",
            "state": "ok",
            "failures": 0,
            "persistent": True,
        }
        _share_events(ja, jb, a, b)
        assert len(a.calls) == len(b.calls) == 3

        server.stop()
        with pytest.raises(StateUnavailable, match="not recorded: send it again with the same event_id"):
            ja.record(1, 70, None, "e3")
        assert ja.catch_up() == 0 and ja.status()["state"] == "degraded" and len(a.calls) == 3
        server.start()  # the same directory: its append-only file read back
        time.sleep(RETRY_S)
        assert ja.catch_up() == 0 and ja.status()["state"] == "ok"
        assert jb.record(1, 70, None, "e3") == (3, False) and ja.catch_up() == 1
        c = Histories()
        jc = RedisJournal(c, server.url, "ml-100k", lambda u: len(c.users.get(u, [])))
        assert jc.replayed == 4 and c.calls == a.calls == b.calls
        other = RedisJournal(Histories(), server.url, "ml-1m", len)  # another data set: its own stream
        assert other.replayed == 0 and other.catch_up() == 0
    finally:
        server.stop()
