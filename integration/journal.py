"""The service's interaction events, applied in one order by every worker process.

``POST /events`` goes through :class:`EventJournal`. Without a file (one worker, no
``--events-log``) it applies each event to the process's histories, remembering event IDs so that a
retry is not applied twice. With a file (``--workers N`` makes one; ``--events-log PATH`` names a
lasting one) each event is first appended there as one JSON line, under an exclusive ``flock``,
after the lines other workers wrote since this one last read have been applied. Every worker applies
the same lines in the same order, so:

- an event one worker acknowledged is in every worker's next answer (``catch_up`` runs before each
  batch of recommendations: one ``fstat`` when nothing is new);
- a retried ``event_id`` is recognised whichever worker took the first try, and every worker
  reports the same history length;
- a service started on an existing ``--events-log`` replays it, so a crash or restart loses no
  acknowledged event (a machine crash can lose what the OS had not yet written: lines are not fsynced).

The first line names the data set; a log written for another is refused, naming both.

:class:`RedisJournal` is the same journal in Redis (``--state redis://...``), for service processes on
any number of hosts: one stream per data set holds every event in one order (``XADD``, its entry IDs
the order), a hash its event IDs; a Lua script checks the event ID and appends in one step, so a retry
sent to another replica is recognised there. Each replica applies the stream's new entries before
each batch of recommendations and before recording an event, as the file journal's workers apply its
new lines. While Redis cannot be reached, events are refused (:class:`StateUnavailable`: the service
answers 503, nothing is acknowledged) and recommendations are served from the histories the replica
has; ``status()`` says ``degraded`` until Redis answers again, and the replica then applies what it
missed. An acknowledged event survives a Redis restart only if Redis persists every write
(``appendonly yes``, ``appendfsync always``): a Redis that does not is named in a warning at start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("integration.journal")

RECENT_EVENT_IDS = 100_000  # event IDs remembered for idempotent retries
FORMAT = "recsys-events-v1"


class EventConflict(ValueError):
    """An ``event_id`` already used for another event."""


class StateUnavailable(RuntimeError):
    """The shared event store does not answer: the event was not recorded (the service answers 503)."""


class _Applied:
    """What both journals keep: the events' application, and the recent event IDs' first answers."""

    _apply: Callable[[Any, Any, int | None], int]
    recent: OrderedDict[str, tuple[tuple[Any, Any, int | None], int]]

    @staticmethod
    def _encode(what: tuple[Any, Any, int | None], event_id: str | None) -> str:
        """An event as both journals store it: one JSON object."""
        return json.dumps({"user_id": what[0], "item_id": what[1], "timestamp": what[2], "event_id": event_id})

    def _replayed(self, rec: dict[str, Any]) -> int:
        """Apply a stored event (:meth:`_encode`'s object)."""
        return self._applied((rec["user_id"], rec["item_id"], rec["timestamp"]), rec["event_id"])

    def _applied(self, what: tuple[Any, Any, int | None], event_id: str | None) -> int:
        n = self._apply(*what)
        if event_id is not None:
            self.recent[event_id] = (what, n)
            if len(self.recent) > RECENT_EVENT_IDS:
                self.recent.popitem(last=False)
        return n


class EventJournal(_Applied):
    """``apply(user_id, item_id, timestamp) -> history length`` is called for every event, in
    journal order; it must accept what the service validated (raw IDs the data set knows)."""

    def __init__(self, apply: Callable[[Any, Any, int | None], int], path: str | Path | None, dataset: str) -> None:
        self._apply, self.path, self.dataset = apply, Path(path) if path is not None else None, dataset
        self.recent: OrderedDict[str, tuple[tuple[Any, Any, int | None], int]] = OrderedDict()
        self._lock = threading.Lock()  # the event loop records, the batcher thread catches up
        self._fd: int | None = None
        self._offset = self._line = 0
        self.replayed = 0  # events applied from the file when it was opened
        if self.path is None:
            return
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        with self._lock, self._locked():
            if os.fstat(self._fd).st_size == 0:
                os.write(self._fd, (json.dumps({"format": FORMAT, "dataset": dataset}) + "\n").encode())
            self.replayed = self._read_new()

    def record(self, user_id: Any, item_id: Any, timestamp: int | None, event_id: str | None) -> tuple[int, bool]:
        """Apply one event; returns (the user's history length, whether ``event_id`` was seen
        before, in which case nothing is applied). Raises :class:`EventConflict` when ``event_id``
        was used for a different event."""
        what = (user_id, item_id, timestamp)
        with self._lock, self._locked():
            self._read_new()
            if event_id is not None and event_id in self.recent:
                seen, n = self.recent[event_id]
                if seen != what:
                    raise EventConflict(
                        f"event_id {event_id!r} was already used for user {seen[0]}, item {seen[1]}: "
                        f"give each event its own ID"
                    )
                return n, True
            if self._fd is not None:
                line = self._encode(what, event_id)
                data = (line + "\n").encode()
                os.write(self._fd, data)  # O_APPEND: at the end, whole, while the lock is held
                self._offset += len(data)
                self._line += 1
            return self._applied(what, event_id), False

    def catch_up(self) -> int:
        """Apply the lines other workers appended since the last call; returns how many."""
        if self._fd is None or os.fstat(self._fd).st_size == self._offset:
            return 0
        with self._lock:
            return self._read_new()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def status(self) -> dict[str, Any]:
        """What ``/ready`` says of the events' store."""
        return {"store": "file" if self.path is not None else "memory", "state": "ok"}

    def _read_new(self) -> int:
        """Apply every complete line past the offset (a line being written is left for later)."""
        if self._fd is None:
            return 0
        size = os.fstat(self._fd).st_size
        if size == self._offset:
            return 0
        data = os.pread(self._fd, size - self._offset, self._offset)
        end = data.rfind(b"\n") + 1
        applied = 0
        for raw in data[:end].splitlines():
            self._line += 1
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                raise ValueError(f"{self.path} line {self._line} is not JSON: {raw[:80]!r}") from None
            if self._line == 1:
                if rec != {"format": FORMAT, "dataset": self.dataset}:
                    raise ValueError(
                        f"{self.path} is not an events log of {self.dataset} (its first line: {raw[:200].decode()}); "
                        f"give --events-log a new file"
                    )
                continue
            try:
                self._replayed(rec)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{self.path} line {self._line}: cannot apply {raw[:200].decode()}: {err!r}") from None
            applied += 1
        self._offset += end
        return applied

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive ``flock`` on the file for a ``with`` block (nothing when there is none)."""
        if self._fd is None:
            yield
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


# Check the event ID and append, in one step on the server: two replicas given the same retried event
# at once cannot both append it. KEYS: the event-ID hash, the stream; ARGV: the event ID ('' for none),
# the event as JSON. Returns {1, entry ID} when appended, {0, the first event's JSON} for a known ID.
_RECORD = """
if ARGV[1] ~= '' then
  local seen = redis.call('HGET', KEYS[1], ARGV[1])
  if seen then return {0, seen} end
end
local id = redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return {1, id}
"""
READ_BATCH = 5000  # stream entries read a call
RETRY_S = 0.5  # after a failed catch-up, recommendations are served without asking Redis for this long


class RedisJournal(_Applied):
    """:class:`EventJournal`'s contract over a Redis stream shared by every replica (module docstring).
    ``length(user_id)`` is a user's history length here (the answer to a retry whose first answer this
    replica no longer remembers)."""

    def __init__(
        self,
        apply: Callable[[Any, Any, int | None], int],
        url: str,
        dataset: str,
        length: Callable[[Any], int],
        timeout: float = 1.0,
    ) -> None:
        import redis

        self._apply, self._length, self.url, self.dataset = apply, length, url, dataset
        self._errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.stream, self.ids = f"recsys:events:{dataset}", f"recsys:events:{dataset}:ids"
        self.recent: OrderedDict[str, tuple[tuple[Any, Any, int | None], int]] = OrderedDict()
        self._lock = threading.Lock()  # the event loop records, the batcher thread catches up
        self.last_id = "0-0"
        self.failures, self.error, self._failed_at = 0, None, 0.0
        header = json.dumps({"format": FORMAT, "dataset": dataset})
        try:
            self.client.set(f"{self.stream}:format", header, nx=True)
            found = self.client.get(f"{self.stream}:format").decode()
            self._record = self.client.register_script(_RECORD)
            if found != header:
                raise ValueError(f"{url} holds events in another format ({found}); use another Redis database")
            self.replayed, _ = self._read_new()
        except self._errors as err:
            raise ConnectionError(f"--state {url}: Redis does not answer ({err})") from None
        self.persistent = self._persists()

    def _persists(self) -> bool | None:
        """Whether Redis appends every write to its log before answering (None: it will not say)."""
        try:
            config = self.client.config_get("append*")
        except self._errors:
            return None
        persistent = config.get("appendonly") == "yes" and config.get("appendfsync") == "always"
        if not persistent:
            log.warning(
                "--state %s: Redis does not persist every write (appendonly %s, appendfsync %s): a Redis restart "
                "loses acknowledged events; run it with --appendonly yes --appendfsync always",
                self.url,
                config.get("appendonly"),
                config.get("appendfsync"),
            )
        return persistent

    def record(self, user_id: Any, item_id: Any, timestamp: int | None, event_id: str | None) -> tuple[int, bool]:
        """:meth:`EventJournal.record`; raises :class:`StateUnavailable` when Redis does not answer
        (the event may have reached the stream: a retry with its ``event_id`` is then a duplicate)."""
        what = (user_id, item_id, timestamp)
        event = self._encode(what, event_id)
        with self._lock:
            try:
                # no catch-up first: reading after the append applies every earlier entry, then this one
                appended, value = self._record(keys=[self.ids, self.stream], args=[event_id or "", event])
                if appended:
                    _, n = self._read_new(want=value.decode())
                    self._up()
                    return n, False
                self._read_new()  # the first time it was sent is applied here too, now
                self._up()
            except self._errors as err:
                self._down(err)
                raise StateUnavailable(
                    f"the event store {self.url} does not answer ({type(err).__name__}); the event was not recorded: "
                    f"send it again with the same event_id"
                ) from None
        first = json.loads(value)
        seen = (first["user_id"], first["item_id"], first["timestamp"])
        if seen != what:
            raise EventConflict(
                f"event_id {event_id!r} was already used for user {seen[0]}, item {seen[1]}: give each event its own ID"
            )
        return (self.recent[event_id][1] if event_id in self.recent else self._length(user_id)), True

    def catch_up(self) -> int:
        """Apply what other replicas appended; while Redis does not answer, nothing (served as it is:
        after a failure, Redis is asked again only ``RETRY_S`` later, so that a hung Redis does not
        hold every batch for its timeout)."""
        if self.error and time.monotonic() - self._failed_at < RETRY_S:
            return 0
        with self._lock:
            try:
                applied, _ = self._read_new()
                self._up()
                return applied
            except self._errors as err:
                self._down(err)
                return 0

    def close(self) -> None:
        self.client.close()

    def status(self) -> dict[str, Any]:
        out = {"store": "redis", "state": "degraded" if self.error else "ok", "failures": self.failures}
        return out | ({"error": self.error} if self.error else {}) | {"persistent": self.persistent}

    def _up(self) -> None:
        if self.error:
            log.warning("--state %s answers again", self.url)
        self.error = None

    def _down(self, err: Exception) -> None:
        if not self.error:
            log.warning(
                "--state %s does not answer (%s): events refused, recommendations from this replica's state",
                self.url,
                err,
            )
        self.failures += 1
        self.error = f"{type(err).__name__}: {err}"[:200]
        self._failed_at = time.monotonic()

    def _read_new(self, want: str | None = None) -> tuple[int, int | None]:
        """Apply every entry after ``last_id``; returns how many, and the history length the entry
        ``want`` left (None when not among them)."""
        applied, length = 0, None
        while True:
            found = self.client.xread({self.stream: self.last_id}, count=READ_BATCH)
            entries = found[0][1] if found else []
            for entry_id, fields in entries:
                n = self._replayed(json.loads(fields[b"e"]))
                self.last_id = entry_id.decode()
                if want is not None and self.last_id == want:
                    length = n
                applied += 1
            if len(entries) < READ_BATCH:
                return applied, length
