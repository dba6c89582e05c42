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
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RECENT_EVENT_IDS = 100_000  # event IDs remembered for idempotent retries
FORMAT = "recsys-events-v1"


class EventConflict(ValueError):
    """An ``event_id`` already used for another event."""


class EventJournal:
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
                line = json.dumps(
                    {"user_id": user_id, "item_id": item_id, "timestamp": timestamp, "event_id": event_id}
                )
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

    def _applied(self, what: tuple[Any, Any, int | None], event_id: str | None) -> int:
        n = self._apply(*what)
        if event_id is not None:
            self.recent[event_id] = (what, n)
            if len(self.recent) > RECENT_EVENT_IDS:
                self.recent.popitem(last=False)
        return n

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
                self._applied((rec["user_id"], rec["item_id"], rec["timestamp"]), rec["event_id"])
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
