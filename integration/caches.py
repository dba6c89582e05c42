"""The candidate cache: a user's candidates, kept in process (:class:`MemoryCache`) or in Redis
(:class:`RedisCache`, which every replica can share), never a dependency of an answer."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

log = logging.getLogger("integration.service")

# -- candidate cache ----------------------------------------------------------------------------
#
# Entries are keyed by ``RecommendationPipeline.candidate_key``: the models' identity, the user and a
# digest of the user's history. An event changes the history and so the key: a list computed before
# it, even one written back after it (a /recommend in flight while the event arrives), is never read
# again, and events never touch the cache (they cannot fail on it, and a retry cannot apply them
# twice). Stale entries age out with the TTL.

CACHE_FORMAT = b"rc1:"
MAX_CACHED = 1_000  # candidates per entry, a bound for reading untrusted bytes back


def pack(items: np.ndarray, scores: np.ndarray) -> bytes:
    return CACHE_FORMAT + items.astype("<i4").tobytes() + scores.astype("<f4").tobytes()


def unpack(blob: object, num_items: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Candidates from a cache value, or None for anything this code did not write for this catalog
    (another format, a truncated value, item indices out of range, non-finite scores)."""
    if not isinstance(blob, bytes) or not blob.startswith(CACHE_FORMAT):
        return None
    body = blob[len(CACHE_FORMAT) :]
    n = len(body) // 8
    if len(body) % 8 or not 0 < n <= MAX_CACHED:
        return None
    items = np.frombuffer(body[: 4 * n], "<i4").astype(np.int64)
    scores = np.frombuffer(body[4 * n :], "<f4").astype(np.float32)
    if items.min() < -1 or items.max() >= num_items or not np.isfinite(scores[items >= 0]).all():
        return None
    return items, scores


class MemoryCache:
    """Values per key in this process, each for ``ttl`` seconds; at most ``max_entries`` (the
    oldest go first)."""

    backend = "memory"

    def __init__(self, ttl: float = 300.0, max_entries: int = 100_000) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._data: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        now, out = time.monotonic(), []
        with self._lock:
            for key in keys:
                hit = self._data.get(key)
                if hit is not None and hit[0] < now:
                    del self._data[key]
                    hit = None
                out.append(None if hit is None else hit[1])
        return out

    def set_many(self, entries: dict[str, bytes]) -> None:
        with self._lock:
            if len(self._data) + len(entries) > self.max_entries:
                for key in list(self._data)[: max(len(entries), self.max_entries // 10)]:
                    del self._data[key]
            expiry = time.monotonic() + self.ttl
            self._data.update((key, (expiry, blob)) for key, blob in entries.items())

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend, "state": "ok"}


class RedisCache:
    """The same in Redis (``redis://host:port/db``), which every replica of the service can share.

    Redis is an optimization, never a dependency of an answer: each call waits at most ``timeout``
    seconds (no retries), and after a failure the cache is *degraded*: requests skip Redis for
    ``retry_after`` seconds, are served without it (every lookup a miss), and the next call after that
    tries again; the first one that succeeds ends the outage. ``/ready`` and ``/metrics`` report the
    state. Calls run on the batcher's thread, never on the event loop.
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        ttl: float = 300.0,
        prefix: str = "recsys:candidates:",
        timeout: float = 0.05,
        retry_after: float = 1.0,
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
        try:
            self.client.ping()  # a wrong URL fails at start-up, not as a silent outage
        except redis.RedisError as err:
            raise ConnectionError(f"--redis-url {url}: {type(err).__name__}: {err}") from None
        self.ttl, self.prefix, self.retry_after = ttl, prefix, retry_after
        self._errors = (redis.RedisError, OSError)
        self.state, self.error, self.since = "ok", None, time.time()
        self.outages, self.failures = 0, 0
        self._down_until = 0.0
        self.on_failure: Any = None  # called once per failed call (a metrics counter)

    def _call(self, fn: Any) -> tuple[Any, bool]:
        if time.monotonic() < self._down_until:
            return None, False
        try:
            out = fn()
        except self._errors as err:
            self.failures += 1
            if self.on_failure is not None:
                self.on_failure()
            if self.state == "ok":
                self.state, self.since, self.outages = "degraded", time.time(), self.outages + 1
                log.warning(
                    "Redis cache unavailable (%s: %s): serving without it, retrying every %.1f s",
                    type(err).__name__,
                    err,
                    self.retry_after,
                )
            self.error = f"{type(err).__name__}: {err}"
            self._down_until = time.monotonic() + self.retry_after
            return None, False
        if self.state != "ok":
            log.warning("Redis cache back after %.1f s", time.time() - self.since)
            self.state, self.error, self.since = "ok", None, time.time()
        return out, True

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        out, ok = self._call(lambda: self.client.mget([self.prefix + k for k in keys]))
        return out if ok else [None] * len(keys)

    def set_many(self, entries: dict[str, bytes]) -> None:
        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key, blob in entries.items():
                pipe.set(self.prefix + key, blob, px=max(1, int(self.ttl * 1000)))
            pipe.execute()

        self._call(write)

    def status(self) -> dict[str, Any]:
        out = {"backend": self.backend, "state": self.state, "since": round(self.since, 3), "outages": self.outages}
        return out if self.error is None else {**out, "error": self.error}
