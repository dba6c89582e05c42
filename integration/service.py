"""The online path: the two-stage pipeline behind an HTTP API.

    python -m integration.service                                   # runs/, http://127.0.0.1:8000
    python -m integration.service --redis-url redis://127.0.0.1:6379/0
    python -m integration.service --arm A=serving/dlrm-int8:0.9 --arm B=serving/dlrm-fp16:0.1
    python -m integration.service --workers 2 --events-log runs/events.jsonl   # a process per core

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``):

- ``POST /recommend`` ``{"user_id": 196, "k": 10}``, or ``{"features": {"age": 25, "gender": "F",
  "occupation": "student", "zip": "55414", "history": [50, 172]}}`` for a user the artifacts
  don't know. An unknown ``user_id`` gets the most popular movies (``"stage": "popular"``).
- ``POST /events`` ``{"user_id": 196, "item_id": 50, "event_id": "a1"}``: the user interacted with a
  movie. It joins their history, so their next candidates and ranking features change (and never
  hold that movie again); a retry with the same ``event_id`` is not applied twice.
- ``GET /health``, ``GET /ready``, ``GET /metrics`` (Prometheus; with per-arm request counts and
  latency).

It serves the system chosen on validation for the sources it finds (``python -m integration.ensemble``,
which the demo runs): the fused ensemble of the candidate sources, in its own order, or a source's
top 100 re-ranked by the ranker trained on them; ``--candidates`` picks another, ``--arm`` re-ranks.
Candidates (the served source's top 100) are cached per user and history, in process with a TTL by default,
in Redis when ``--redis-url`` is given; while Redis is down or hung the service answers without it
(``/ready`` says ``degraded``) and takes it up again when it is back. Ranking can be split
between A/B arms: a stable hash of the user ID picks the arm, so a user always lands in the same
one. Concurrent requests are batched (``inference_legacy.server.DynamicBatcher``).

``--workers N`` serves the port from N processes (Linux's SO_REUSEPORT spreads connections), each
with its own models and candidate cache (share one with ``--redis-url``); events reach every worker
through one journal file (``integration.journal``), so an acknowledged event is in the next answer
of whichever worker takes it. ``--events-log PATH`` keeps that journal and replays it at start.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from fastapi import Path as Path_
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from common.data.dataset import id_key
from common.data.load import dataset_ref, load_dataset
from common.data.movielens import user_record as movielens_user_record
from common.features import FeatureError
from inference_legacy.dlrm_predict import integer_id
from inference_legacy.server import (
    BODY_TIMEOUT_S,
    LATENCY_BUCKETS,
    BadRequest,
    DynamicBatcher,
    Metrics,
    Readiness,
    add_client_timeout,
    create_app,
    error_responses,
    listen_socket,
    serve,
)
from integration.journal import EventConflict, EventJournal

RawID = Annotated[int, Field(ge=0, le=2**31 - 1), BeforeValidator(integer_id)]
Int64ID = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), BeforeValidator(integer_id)]
TextID = Annotated[str, Field(min_length=1, max_length=256)]
# An event may be at most this far after the data's last interaction (MovieLens's clock stopped in
# 1998): a timestamp years ahead would move the user's "now", and with it the trend features, for good.
EVENT_CLOCK_SLACK_S = 86_400

log = logging.getLogger("integration.service")


class UserFeatures(BaseModel):
    model_config = ConfigDict(extra="forbid")
    age: int = Field(ge=1, le=129, description="years", examples=[25])
    gender: Literal["M", "F"] = Field(examples=["F"])
    occupation: str = Field(max_length=64, description="a MovieLens occupation, e.g. 'student'")
    zip: str = Field(
        pattern=r"^([0-9A-Za-z]{5}|[0-9]{5}-[0-9]{4})$",
        description="US zip code, or 5 letters and digits as MovieLens has for Canada (its first digit is the feature)",
        examples=["55414"],
    )
    history: list[RawID] = Field(
        default_factory=list, max_length=1000, description="raw MovieLens item IDs, oldest first"
    )


def _exactly_one(schema: dict[str, Any]) -> None:
    """The schema says what the validator does, so that clients and fuzzers send only bodies we
    accept: exactly one of ``user_id`` and ``features``, neither of them null."""
    for name in ("user_id", "features"):
        prop = schema["properties"][name]
        kept = [s for s in prop.pop("anyOf", []) if s != {"type": "null"}]
        prop.update(kept[0] if len(kept) == 1 else {"anyOf": kept} if kept else {})
        prop.pop("default", None)
    schema["oneOf"] = [{"required": ["user_id"]}, {"required": ["features"]}]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one)
    user_id: RawID | None = Field(None, description="a raw MovieLens user ID")
    features: UserFeatures | None = Field(None, description="for a user without a known ID")
    k: int = Field(10, ge=1, le=100, strict=True)

    @model_validator(mode="after")
    def one_of(self) -> RecommendRequest:
        if (self.user_id is None) == (self.features is None):
            raise ValueError("give exactly one of user_id and features")
        return self


MOVIELENS_USER = ("age_bucket", "gender", "occupation", "zip_region", "age")  # common.data.movielens.user_features


def request_model(pipeline) -> type[RecommendRequest]:
    """The request model for the served data set's user features, so that the OpenAPI schema lists
    them. MovieLens takes its raw fields (``UserFeatures``: age in years, zip code) with the
    occupation one of the data set's; any other data set takes its own user columns by name (a
    categorical's value as its data spells it, a number for a numeric column) and ``history``."""
    tables = pipeline.retriever.features
    if tuple(tables.user_vocab) + tuple(tables.user_numeric) == MOVIELENS_USER:
        vocab = tables.user_vocab["occupation"]
        features = create_model(
            "UserFeatures",
            __base__=UserFeatures,
            occupation=(
                Literal[tuple(vocab)],
                Field(
                    description=f"one of {pipeline.dataset.name}'s occupations",
                    examples=["student"] if "student" in vocab else list(vocab)[:1],
                ),
            ),
        )
    else:
        fields: dict[str, Any] = {
            name: (Literal[tuple(vocab)] | None, Field(None, description=f"one of {pipeline.dataset.name}'s {name}s"))
            for name, vocab in tables.user_vocab.items()
        }
        fields.update({name: (float | None, Field(None)) for name in tables.user_numeric})
        fields["history"] = (
            list[id_type(pipeline.dataset.item_raw_ids)],
            Field(default_factory=list, max_length=1000, description="raw item IDs, oldest first"),
        )
        features = create_model("UserFeatures", __config__=ConfigDict(extra="forbid"), **fields)
    return create_model(
        "RecommendRequest",
        __base__=RecommendRequest,
        user_id=(id_type(pipeline.dataset.user_raw_ids) | None, Field(None, description="a raw user ID")),
        features=(features | None, Field(None, description="for a user without a known ID")),
    )


def event_model(dataset) -> type[EventRequest]:
    """The event model with the data set's kinds of raw IDs (integers, or text)."""
    return create_model(
        "EventRequest",
        __base__=EventRequest,
        user_id=(id_type(dataset.user_raw_ids), ...),
        item_id=(id_type(dataset.item_raw_ids), ...),
    )


def user_record(features: BaseModel) -> dict[str, Any]:
    """A request's features as the canonical record the retriever takes (MovieLens's raw fields
    mapped onto its columns; a generic data set's are already its columns)."""
    d = features.model_dump()
    if isinstance(features, UserFeatures):
        return {**movielens_user_record(d["age"], d["gender"], d["occupation"], d["zip"]), "history": d["history"]}
    return {k: v for k, v in d.items() if v is not None}


def id_type(raw_ids: np.ndarray) -> Any:
    """A data set's raw IDs as a request field: text where its IDs are text (a log's "sku-001"),
    else integers (MovieLens's and most logs' within 0..2**31-1, else any 64-bit integer)."""
    if raw_ids.dtype.kind in "OUS":
        return TextID
    return RawID if len(raw_ids) == 0 or (raw_ids.min() >= 0 and raw_ids.max() <= 2**31 - 1) else Int64ID


class Item(BaseModel):
    item_id: int | str
    title: str
    score: float


class RecommendResponse(BaseModel):
    user_id: int | str
    stage: str = Field(
        description="ranked | candidates (the served system is a candidate source's own order, e.g. the "
        "ensemble's) | retrieval (described by features) | popular (cold start)"
    )
    arm: str | None = Field(description="the A/B arm that ranked the list (null when no ranker did)")
    cached: bool = Field(description="whether the candidates came from the cache")
    items: list[Item]


class Movie(BaseModel):
    item_id: int | str
    title: str = Field(description="the raw item ID when the data set has no titles")


class UserView(BaseModel):
    user_id: int | str
    history_length: int
    recent: list[Movie] = Field(description="the latest interactions, most recent first")


class SearchResults(BaseModel):
    query: str
    items: list[Movie] = Field(
        description="titles starting with the query first, then containing it; the more popular first within each"
    )


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: RawID
    item_id: RawID
    timestamp: int | None = Field(
        None,
        ge=0,
        strict=True,
        description=(
            "unix seconds, at most one day after the data's last interaction (default: the user's latest "
            "interaction: the ranker's trend features count the 30 days before it, so a MovieLens user must stay "
            "on MovieLens's clock)"
        ),
    )
    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[!-~]+$",
        description=(
            "the client's unique ID for this event: a retry with the same ID is acknowledged without applying the "
            "event twice (the last 100,000 IDs are remembered)"
        ),
    )


class EventResponse(BaseModel):
    user_id: int | str
    history_length: int = Field(description="the user's history after the event (at most 1,000, the latest)")
    duplicate: bool = Field(False, description="an event_id seen before: acknowledged again, not applied twice")


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


# -- A/B routing ---------------------------------------------------------------------------------


class ABRouter:
    """A stable assignment of users to arms by traffic share: SHA-256 of ``salt:user`` mapped to
    [0, 1), then the arms' cumulative shares. The same user always gets the same arm, and
    changing the salt reshuffles everyone."""

    def __init__(self, shares: dict[str, float], salt: str = "ab-1") -> None:
        if not shares or any(s < 0 for s in shares.values()) or abs(sum(shares.values()) - 1.0) > 1e-6:
            raise ValueError(f"A/B shares must be >= 0 and sum to 1, got {shares}")
        self.shares, self.salt = dict(shares), salt
        self._edges = np.cumsum(list(shares.values()))
        self._arms = list(shares)

    def arm(self, user_id: int) -> str:
        h = int.from_bytes(hashlib.sha256(f"{self.salt}:{user_id}".encode()).digest()[:8], "big") / 2.0**64
        return self._arms[min(int(np.searchsorted(self._edges, h, side="right")), len(self._arms) - 1)]


# -- the app -------------------------------------------------------------------------------------


def create_service(
    pipeline,
    cache: MemoryCache | RedisCache | None = None,
    router: ABRouter | None = None,
    max_request_bytes: int = 100_000,
    client_timeout: float = BODY_TIMEOUT_S,
    events_log: str | Path | None = None,
) -> tuple[FastAPI, DynamicBatcher]:
    """The FastAPI app over a ``RecommendationPipeline`` (see ``integration.pipeline``); events go
    through an :class:`~integration.journal.EventJournal` on ``events_log`` (in memory when None)."""
    cache = cache if cache is not None else MemoryCache()
    router = router or ABRouter({arm: 1.0 / len(pipeline.rankers) for arm in pipeline.rankers})
    if set(router.shares) != set(pipeline.rankers):
        raise ValueError(
            f"A/B arms {sorted(router.shares)} and the pipeline's rankers {sorted(pipeline.rankers)} differ"
        )
    metrics, readiness = Metrics(), Readiness()
    arm_requests = Counter("ab_requests", "ranked requests per A/B arm", ["arm"], registry=metrics.registry)
    arm_latency = Histogram(
        "ab_request_latency_seconds",
        "recommend latency per A/B arm",
        ["arm"],
        buckets=LATENCY_BUCKETS,
        registry=metrics.registry,
    )
    cache_hits = Counter(
        "candidate_cache",
        "candidate cache lookups (invalid: an entry this model did not write, ignored and overwritten)",
        ["result"],
        registry=metrics.registry,
    )
    Gauge(
        "candidate_cache_up",
        "1 while the candidate cache answers, 0 while degraded (served without it)",
        registry=metrics.registry,
    ).set_function(lambda: float(cache.status()["state"] == "ok"))
    cache_errors = Counter("candidate_cache_errors", "failed calls to the candidate cache", registry=metrics.registry)
    if isinstance(cache, RedisCache):
        cache.on_failure = cache_errors.inc
    readiness.info = {
        "arms": router.shares,
        "dataset": pipeline.dataset.name,
        "titles": pipeline.dataset.item_title is not None,
    }
    readiness.extra = lambda: {"cache": cache.status()}
    app = create_app(
        "Two-stage recommender", "1", __doc__.split("\n\n")[0], metrics, readiness, max_request_bytes, client_timeout
    )
    dataset = pipeline.dataset
    clock, num_items = int(dataset.timestamp.max()), len(dataset.item_raw_ids)
    journal = EventJournal(pipeline.add_interaction, events_log, dataset.name)  # replays events_log's lines
    if journal.replayed:
        log.warning("replayed %d events from %s", journal.replayed, events_log)
    readiness.info["worker"] = os.getpid()  # which process answered, where several serve one port
    app.state.readiness, app.state.journal = readiness, journal

    def cached_candidates(users: list[int]) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[bool]]:
        """Each user's candidates from the cache, or computed (in one batch) and written back."""
        keys = [pipeline.candidate_key(user) for user in users]
        found: list[tuple[np.ndarray, np.ndarray] | None] = []
        for blob in cache.get_many(keys):
            hit = None if blob is None else unpack(blob, num_items)
            cache_hits.labels("hit" if hit is not None else "miss" if blob is None else "invalid").inc()
            found.append(hit)
        misses = [n for n, hit in enumerate(found) if hit is None]
        if misses:
            items, scores = pipeline.candidates(np.array([users[n] for n in misses]))
            for n, row_i, row_s in zip(misses, items, scores):
                found[n] = (row_i, row_s)
            cache.set_many({keys[n]: pack(*found[n]) for n in misses})
        computed = set(misses)
        return found, [n not in computed for n in range(len(users))]  # type: ignore[return-value]

    def run(batch: list[list[RecommendRequest]]) -> list[Any]:
        journal.catch_up()  # events other workers acknowledged before these requests arrived
        reqs = [r for (r,) in batch]
        out: list[Any] = [None] * len(reqs)
        known: dict[str, list[tuple[int, int]]] = {}
        for n, r in enumerate(reqs):
            if r.features is not None:
                try:
                    rec = pipeline.recommend_features(user_record(r.features), r.k)
                except (FeatureError, KeyError, ValueError) as err:
                    out[n] = BadRequest(f"features: {err}")
                    continue
                out[n] = (rec, None, False)
            elif r.user_id in pipeline.user_index:
                known.setdefault(router.arm(r.user_id), []).append((n, pipeline.user_index[r.user_id]))
            else:
                out[n] = (pipeline.recommend([r.user_id], r.k)[0], None, False)
        for arm, rows in known.items():
            users = [user for _, user in rows]
            cands, cached = cached_candidates(users)
            width = max(len(c[0]) for c in cands)
            items = np.stack([np.pad(c[0], (0, width - len(c[0])), constant_values=-1) for c in cands])
            scores = np.stack([np.pad(c[1], (0, width - len(c[1]))) for c in cands])
            ranked, probs = pipeline.order(np.array(users), items, scores, arm=arm)
            for (n, _), row_i, row_p, hit in zip(rows, ranked, probs, cached):
                k = reqs[n].k
                keep = row_i[:k] >= 0
                rec = pipeline.recommendation(
                    reqs[n].user_id, row_i[:k][keep], row_p[:k][keep], pipeline.stage, int((row_i >= 0).sum())
                )
                out[n] = (rec, arm if pipeline.rerank else None, hit)
        return out

    batcher = DynamicBatcher(run, max_batch_rows=256, max_wait_ms=0.0, enabled=True, metrics=metrics)

    async def recommend(req) -> JSONResponse:
        if not readiness.event.is_set():
            raise HTTPException(503, "not ready; poll /ready")
        start = time.perf_counter()
        rec, arm, cached = await batcher.submit([req])
        if arm is not None:
            arm_requests.labels(arm).inc()
            arm_latency.labels(arm).observe(time.perf_counter() - start)
        return JSONResponse(
            {"user_id": rec.user_id, "stage": rec.stage, "arm": arm, "cached": cached, "items": rec.to_dict()["items"]}
        )

    recommend.__annotations__["req"] = request_model(pipeline)  # built at run time, not a string annotation
    app.post(
        "/recommend",
        response_model=RecommendResponse,
        summary="Top K items for a user",
        responses=error_responses(_408="body not sent in time", _413="body over the size limit", _503="not ready"),
    )(recommend)

    # Searched by title, or by raw ID where the data set has no titles (what the page then shows).
    folded = [dataset.title(i).casefold() for i in range(num_items)]
    by_popularity = np.argsort(-np.asarray(pipeline.retriever.popularity), kind="stable").tolist()
    page = (Path(__file__).parent / "static" / "index.html").read_text()

    def movie(item: int) -> dict[str, Any]:
        return {"item_id": id_key(dataset.item_raw_ids[item]), "title": dataset.title(item)}

    @app.get("/", response_class=HTMLResponse, summary="A page to try the recommender in a browser")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    rng = np.random.default_rng()

    @app.get("/users/random", response_model=UserView, summary="A random known user")
    async def random_user(recent: Annotated[int, Query(ge=0, le=100)] = 10) -> dict[str, Any]:
        return user_view(id_key(dataset.user_raw_ids[rng.integers(len(dataset.user_raw_ids))]), recent)

    async def user(user_id, recent: Annotated[int, Query(ge=0, le=100)] = 10) -> dict[str, Any]:
        if user_id not in pipeline.user_index:
            raise HTTPException(404, f"user_id {user_id} is not a known user of {dataset.name}")
        return user_view(user_id, recent)

    kind = id_type(dataset.user_raw_ids)
    if kind is TextID:
        user.__annotations__["user_id"] = Annotated[str, Path_(min_length=1, max_length=256)]
    elif kind is RawID:
        user.__annotations__["user_id"] = Annotated[int, Path_(ge=0, le=2**31 - 1)]
    else:
        user.__annotations__["user_id"] = Annotated[int, Path_(ge=-(2**63), le=2**63 - 1)]
    app.get(
        "/users/{user_id}",
        response_model=UserView,
        summary="A user's latest items",
        responses=error_responses(_404="unknown user"),
    )(user)

    def user_view(user_id: int | str, recent: int) -> dict[str, Any]:
        journal.catch_up()
        history = pipeline.store.history(pipeline.user_index[user_id])
        return {
            "user_id": user_id,
            "history_length": len(history),
            "recent": [movie(int(i)) for i in history[::-1][:recent]],
        }

    @app.get("/items/search", response_model=SearchResults, summary="Items by title", responses=error_responses())
    def search(  # a plain def: FastAPI runs it in a thread, so a scan of a large catalog blocks no request
        q: Annotated[str, Query(min_length=1, max_length=100, description="part of a title (or raw item ID)")],
        limit: Annotated[int, Query(ge=1, le=50)] = 10,
    ) -> dict[str, Any]:
        needle = q.strip().casefold()
        starts: list[int] = []
        contains: list[int] = []
        for i in by_popularity if needle else ():  # one pass, stopped once `limit` titles start with it
            title = folded[i]
            if title.startswith(needle):
                starts.append(i)
                if len(starts) == limit:
                    break
            elif len(contains) < limit and needle in title:
                contains.append(i)
        return {"query": q, "items": [movie(i) for i in (starts + contains)[:limit]]}

    async def events(ev) -> EventResponse:
        # No await below: on the event loop, each event is applied whole before the next starts
        # (across workers, the journal's file lock orders them).
        if ev.user_id not in pipeline.user_index:
            raise HTTPException(
                404,
                f"user_id {ev.user_id} is not a known user of {dataset.name}; recommendations for "
                f"new users take their features and history in POST /recommend",
            )
        if ev.item_id not in pipeline.item_index:
            raise BadRequest(f"item_id: {ev.item_id} is not an item in {dataset.name}'s catalog")
        if ev.timestamp is not None and ev.timestamp > clock + EVENT_CLOCK_SLACK_S:
            raise BadRequest(
                f"timestamp: {ev.timestamp} is more than {EVENT_CLOCK_SLACK_S} s after the last "
                f"interaction in {dataset.name} ({clock}); send times on the data's clock, or none"
            )
        try:
            n, duplicate = journal.record(ev.user_id, ev.item_id, ev.timestamp, ev.event_id)
        except EventConflict as err:
            raise HTTPException(409, str(err)) from None
        return EventResponse(user_id=ev.user_id, history_length=n, duplicate=duplicate)

    events.__annotations__["ev"] = event_model(dataset)  # built at run time, like /recommend's
    app.post(
        "/events",
        response_model=EventResponse,
        summary="Record an interaction",
        responses=error_responses(
            _404="unknown user",
            _408="body not sent in time",
            _409="event_id reused for another event",
            _413="body over the size limit",
        ),
    )(events)

    def warm_up() -> None:
        try:
            pipeline.recommend([id_key(dataset.user_raw_ids[0])])
            readiness.event.set()
        except Exception as err:  # reported by /ready
            readiness.error = f"warm-up failed: {err}"

    threading.Thread(target=warm_up, daemon=True).start()
    return app, batcher


def parse_arm(spec: str) -> tuple[str, str, float]:
    """``NAME=PATH:SHARE`` -> (name, path, share)."""
    try:
        name, rest = spec.split("=", 1)
        path, share = rest.rsplit(":", 1)
        return name, path, float(share)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--arm expects NAME=PATH:SHARE (e.g. A=serving/dlrm-int8:0.5), got {spec!r}"
        ) from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="runs", help="run directory holding the stages (default: %(default)s)")
    p.add_argument(
        "--arm",
        action="append",
        type=parse_arm,
        default=[],
        help="an A/B arm NAME=PATH:SHARE, PATH relative to --artifacts; repeat for more "
        "(default: one arm, the served candidate source's own ranker: serving/dlrm-int8-sasrec for "
        "SASRec's candidates, serving/dlrm-int8 for the two-tower's)",
    )
    p.add_argument("--ab-salt", default="ab-1", help="changing it reassigns users to arms (default: %(default)s)")
    p.add_argument(
        "--redis-url",
        default=None,
        help="cache candidates in Redis, e.g. redis://127.0.0.1:6379/0 (default: in process)",
    )
    p.add_argument(
        "--redis-timeout",
        type=float,
        default=0.05,
        help="seconds a Redis call may take before the cache counts as down (default: %(default)s)",
    )
    p.add_argument(
        "--cache-ttl", type=float, default=300.0, help="seconds a user's candidates stay cached (default: %(default)s)"
    )
    add_client_timeout(p)
    p.add_argument("--host", default="127.0.0.1", help="(default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    p.add_argument(
        "--candidates",
        default="auto",
        choices=["auto", "two-tower", "SASRec", "BERT4Rec", "union", "EASE", "transitions", "ensemble"],
        help="what the ranker re-orders, or 'ensemble' (the sources' fused scores, served as they are); auto: the "
        "system chosen on validation (python -m integration.ensemble), else SASRec's when "
        "<artifacts>/sasrec/export exists, then BERT4Rec's, else the two-tower's (default: %(default)s)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        type=dataset_ref,
        help="the data set to serve: a MovieLens variant or an interaction log's spec file; it must be the one "
        "the artifacts were trained on (default: the one their manifests name)",
    )
    p.add_argument(
        "--data-dir", default=None, help="data cache (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="run the exported models, not their AOTInductor packages (python -m inference_legacy.aot_compile)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes serving the one port, each with its own models and a core's worth of Python; they share "
        "events through a journal file (Linux: SO_REUSEPORT spreads connections) (default: %(default)s)",
    )
    p.add_argument(
        "--events-log",
        default=None,
        help="append every event to this file and replay it at start, so a restart loses none "
        "(default: events live in memory, or in a temporary journal with --workers > 1)",
    )
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error(f"--workers must be at least 1, got {a.workers}")
    if a.events_log and not os.access(Path(a.events_log).resolve().parent, os.W_OK):  # before the models load
        p.error(f"--events-log {a.events_log}: its directory does not exist or is not writable")
    if a.workers > 1:
        supervise(a)
        return
    sock = listen_socket(a.host, a.port)  # before the models load: a busy or invalid port fails at once
    serve_one(a, sock, a.events_log)


def serve_one(a: argparse.Namespace, sock, events_log: str | None, ready=None) -> None:
    """Load the pipeline and serve it on ``sock``; ``ready`` (a multiprocessing Event), when given,
    is set once the service answers (a worker of :func:`supervise`, which prints the address)."""
    import torch

    from integration.pipeline import ArtifactMismatch, create_pipeline

    torch.set_num_threads(1)
    try:
        dataset = load_dataset(a.dataset, a.data_dir) if a.dataset else None
        pipeline = create_pipeline(
            a.artifacts,
            dataset=dataset,
            ranking={name: path for name, path, _ in a.arm} if a.arm else "auto",
            data_dir=a.data_dir,
            sequential=None if a.candidates == "two-tower" else "auto",
            candidate_source=a.candidates,
            compiled=not a.eager,
        )
        router = ABRouter({name: share for name, _, share in a.arm} if a.arm else {"A": 1.0}, a.ab_salt)
        cache = (
            RedisCache(a.redis_url, a.cache_ttl, timeout=a.redis_timeout) if a.redis_url else MemoryCache(a.cache_ttl)
        )
    except (ArtifactMismatch, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"cannot serve {Path(a.artifacts)}: {err}") from None
    except ConnectionError as err:  # Redis not there at start-up
        raise SystemExit(f"cannot serve: {err}") from None
    try:
        app, _ = create_service(pipeline, cache, router, client_timeout=a.client_timeout, events_log=events_log)
    except ValueError as err:  # an events log that is not this data set's
        raise SystemExit(f"cannot serve: {err}") from None
    except OSError as err:  # an events log that cannot be opened
        raise SystemExit(f"cannot serve: --events-log {events_log}: {err.strerror}") from None
    print(
        f"{'' if ready is None else f'worker {os.getpid()}: '}serving {pipeline.dataset.name}: {pipeline.served}, "
        f"arms {router.shares}, cache {cache.backend}; query tower {pipeline.retriever.runtime}, rankers "
        f"{', '.join(sorted({r.runtime.split(':')[0] for r in pipeline.rankers.values()}))} (per-user programs: "
        f"{', '.join(sorted({r.by_user_runtime.split(':')[0] for r in pipeline.rankers.values()}))})",
        flush=True,
    )
    if ready is not None:

        def signal_ready(readiness: Readiness = app.state.readiness) -> None:
            while not readiness.event.wait(0.2):
                if readiness.error is not None:  # a worker that can never answer stops, and says why
                    print(f"worker {os.getpid()}: {readiness.error}", flush=True)
                    os._exit(1)
            # Listening joins the port's SO_REUSEPORT group: only then do connections hash to this
            # worker (uvicorn may not have reached its own listen() yet; a second call is harmless).
            sock.listen(2048)
            ready.set()

        threading.Thread(target=signal_ready, daemon=True).start()
    serve(
        app,
        a.host,
        a.port,
        sock=sock,
        header_timeout=a.client_timeout,
        on_bind=None if ready is None else (lambda url: None),  # the supervisor prints it, once all are ready
    )


def _worker(a: argparse.Namespace, port: int, events_log: str, ready) -> None:
    """One of :func:`supervise`'s processes: its own socket on the shared port; it stops when the
    supervisor is gone (even killed), rather than serve on alone."""
    import signal

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown

    threading.Thread(target=watch, daemon=True).start()
    serve_one(a, listen_socket(a.host, port, reuse_port=True), events_log, ready)


def supervise(a: argparse.Namespace) -> None:
    """``--workers N``: N processes, each binding the port with SO_REUSEPORT (the kernel spreads
    connections over them by address hash) and loading its own pipeline. Events reach all of them
    through one journal file (``--events-log``, or a temporary one). The address is printed once
    every worker is ready; a worker that dies is started again (it replays the journal), unless it
    dies within 30 s of starting, which stops the service. SIGTERM / SIGINT stop every worker."""
    import multiprocessing
    import shutil
    import signal
    import socket
    import tempfile

    if not hasattr(socket, "SO_REUSEPORT"):
        raise SystemExit("--workers > 1 needs SO_REUSEPORT (Linux); run one service per port behind a proxy instead")
    reserve = listen_socket(a.host, a.port, reuse_port=True)  # holds the port (bound, never listening)
    port = reserve.getsockname()[1]
    url = f"http://{a.host if ':' not in a.host else f'[{a.host}]'}:{port}"
    tmp = None if a.events_log else tempfile.mkdtemp(prefix="recsys-events-")
    events_log = a.events_log or os.path.join(tmp, "events.jsonl")
    ctx = multiprocessing.get_context("spawn")  # nothing of this process (threads, locks) in the workers
    # Each worker's BLAS and OpenMP pools get its share of the cores (unless the caller chose): a
    # pool per worker as wide as the machine would spin against the others' (the ensemble's
    # catalog-wide matrix products ran at half the one-worker rate before this).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(max(1, (os.cpu_count() or 1) // a.workers)))

    def start(k: int) -> tuple[Any, Any, float]:
        ready = ctx.Event()
        proc = ctx.Process(target=_worker, args=(a, port, events_log, ready), name=f"worker-{k}")
        proc.start()
        return proc, ready, time.monotonic()

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    workers = [start(k) for k in range(a.workers)]
    try:
        while not all(ready.is_set() for _, ready, _ in workers):
            for k, (proc, _, _) in enumerate(workers):
                if not proc.is_alive():
                    raise SystemExit(f"worker {k} exited with code {proc.exitcode} while loading (its output above)")
            if stopping.wait(0.1):
                return
        pids = ", ".join(str(proc.pid) for proc, _, _ in workers)
        print(f"listening on {url} ({a.workers} workers: {pids}; events journal {events_log})", flush=True)
        while not stopping.wait(0.5):
            for k, (proc, _, started) in enumerate(workers):
                if proc.is_alive():
                    continue
                lived = time.monotonic() - started
                if lived < 30:
                    raise SystemExit(f"worker {k} exited with code {proc.exitcode} {lived:.0f} s after it started")
                log.warning("worker %d (pid %d) exited with code %s; starting another", k, proc.pid, proc.exitcode)
                workers[k] = start(k)
    finally:
        for proc, _, _ in workers:
            if proc.is_alive():
                proc.terminate()
        for proc, _, _ in workers:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        reserve.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
