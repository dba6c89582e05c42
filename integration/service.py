"""The online path: the two-stage pipeline behind an HTTP API.

    python -m integration.service                                   # runs/, http://127.0.0.1:8000
    python -m integration.service --redis-url redis://127.0.0.1:6379/0
    python -m integration.service --arm A=serving/dlrm-int8:0.9 --arm B=serving/dlrm-fp16:0.1
    python -m integration.service --workers 2 --events-log runs/events.jsonl   # a process per core
    python -m integration.service --state redis://10.0.0.5:6379/1 --port 8001  # a replica; events in Redis

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
``--state redis://host:port/db`` keeps the events in Redis instead, shared by any number of service
processes on any number of hosts (replicas behind a load balancer); while that Redis is down, events
are refused with 503 and recommendations are served from each process's last state.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from fastapi import Path as Path_
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import Counter, Gauge, Histogram

from common.data.dataset import id_key
from common.data.load import dataset_ref, load_dataset
from common.features import FeatureError
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
)
from integration.api import (
    EVENT_CLOCK_SLACK_S,
    EventResponse,
    RawID,
    RecommendRequest,
    RecommendResponse,
    SearchResults,
    TextID,
    UserView,
    event_model,
    id_type,
    request_model,
    user_record,
)
from integration.caches import MemoryCache, RedisCache, pack, unpack
from integration.journal import EventConflict, EventJournal, RedisJournal, StateUnavailable
from integration.workers import serve_one, supervise

log = logging.getLogger("integration.service")


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
    state: str | None = None,
    state_timeout: float = 1.0,
) -> tuple[FastAPI, DynamicBatcher]:
    """The FastAPI app over a ``RecommendationPipeline`` (see ``integration.pipeline``); events go
    through an :class:`~integration.journal.EventJournal` on ``events_log`` (in memory when None), or
    with ``state`` (a Redis URL) a :class:`~integration.journal.RedisJournal` every replica shares."""
    cache = cache if cache is not None else MemoryCache()
    router = router or ABRouter({arm: 1.0 / len(pipeline.rankers) for arm in pipeline.rankers})
    if set(router.shares) != set(pipeline.rankers):
        raise ValueError(
            f"A/B arms {sorted(router.shares)} and the pipeline's rankers {sorted(pipeline.rankers)} differ"
        )
    metrics, readiness = Metrics(), Readiness()
    counters = ServiceMetrics(metrics, cache)
    readiness.info = {
        "arms": router.shares,
        "dataset": pipeline.dataset.name,
        "titles": pipeline.dataset.item_title is not None,
        "worker": os.getpid(),  # which process answered, where several serve one port
    }
    readiness.extra = lambda: {"cache": cache.status(), "events": journal.status()}
    app = create_app(
        "Two-stage recommender", "1", __doc__.split("\n\n")[0], metrics, readiness, max_request_bytes, client_timeout
    )
    journal: EventJournal | RedisJournal
    if state is not None:  # replays the stream
        journal = RedisJournal(
            pipeline.add_interaction,
            state,
            pipeline.dataset.name,
            lambda user: len(pipeline.store.history(pipeline.user_index[user])),
            state_timeout,
        )
    else:
        journal = EventJournal(pipeline.add_interaction, events_log, pipeline.dataset.name)  # replays its lines
    if journal.replayed:
        log.warning("replayed %d events from %s", journal.replayed, state or events_log)
    app.state.readiness, app.state.journal = readiness, journal
    batcher = DynamicBatcher(
        BatchRecommender(pipeline, cache, router, journal, counters),
        max_batch_rows=256,
        max_wait_ms=0.0,
        enabled=True,
        metrics=metrics,
    )
    add_recommend(app, pipeline, batcher, readiness, counters)
    add_browsing(app, pipeline, journal)
    add_events(app, pipeline, journal)

    def warm_up() -> None:
        try:
            pipeline.recommend([id_key(pipeline.dataset.user_raw_ids[0])])
            readiness.event.set()
        except Exception as err:  # reported by /ready
            readiness.error = f"warm-up failed: {err}"

    threading.Thread(target=warm_up, daemon=True).start()
    return app, batcher


class ServiceMetrics:
    """The service's own Prometheus series, beside the server's: per A/B arm, and the cache's."""

    def __init__(self, metrics: Metrics, cache: MemoryCache | RedisCache) -> None:
        registry = metrics.registry
        self.arm_requests = Counter("ab_requests", "ranked requests per A/B arm", ["arm"], registry=registry)
        self.arm_latency = Histogram(
            "ab_request_latency_seconds",
            "recommend latency per A/B arm",
            ["arm"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache = Counter(
            "candidate_cache",
            "candidate cache lookups (invalid: an entry this model did not write, ignored and overwritten)",
            ["result"],
            registry=registry,
        )
        Gauge(
            "candidate_cache_up",
            "1 while the candidate cache answers, 0 while degraded (served without it)",
            registry=registry,
        ).set_function(lambda: float(cache.status()["state"] == "ok"))
        errors = Counter("candidate_cache_errors", "failed calls to the candidate cache", registry=registry)
        if isinstance(cache, RedisCache):
            cache.on_failure = errors.inc


class BatchRecommender:
    """What the batcher runs on a batch of /recommend requests: users described by features, unknown
    users (popular items), and known users, whose candidates come from the cache or are computed
    together, then ordered by their A/B arm's ranker."""

    def __init__(self, pipeline, cache, router: ABRouter, journal: EventJournal, counters: ServiceMetrics) -> None:
        self.pipeline, self.cache, self.router, self.journal, self.counters = pipeline, cache, router, journal, counters
        self.num_items = len(pipeline.dataset.item_raw_ids)

    def __call__(self, batch: list[list[RecommendRequest]]) -> list[Any]:
        pipeline = self.pipeline
        self.journal.catch_up()  # events other workers acknowledged before these requests arrived
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
                known.setdefault(self.router.arm(r.user_id), []).append((n, pipeline.user_index[r.user_id]))
            else:
                out[n] = (pipeline.recommend([r.user_id], r.k)[0], None, False)
        for arm, rows in known.items():
            users = [user for _, user in rows]
            cands, cached = self.cached_candidates(users)
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

    def cached_candidates(self, users: list[int]) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[bool]]:
        """Each user's candidates from the cache, or computed (in one batch) and written back."""
        keys = [self.pipeline.candidate_key(user) for user in users]
        found: list[tuple[np.ndarray, np.ndarray] | None] = []
        for blob in self.cache.get_many(keys):
            hit = None if blob is None else unpack(blob, self.num_items)
            self.counters.cache.labels("hit" if hit is not None else "miss" if blob is None else "invalid").inc()
            found.append(hit)
        misses = [n for n, hit in enumerate(found) if hit is None]
        if misses:
            items, scores = self.pipeline.candidates(np.array([users[n] for n in misses]))
            for n, row_i, row_s in zip(misses, items, scores):
                found[n] = (row_i, row_s)
            self.cache.set_many({keys[n]: pack(*found[n]) for n in misses})
        computed = set(misses)
        return found, [n not in computed for n in range(len(users))]  # type: ignore[return-value]


def add_recommend(app: FastAPI, pipeline, batcher: DynamicBatcher, readiness: Readiness, counters: ServiceMetrics):
    """``POST /recommend``, its request model built for the served data set's user features."""

    async def recommend(req) -> JSONResponse:
        if not readiness.event.is_set():
            raise HTTPException(503, "not ready; poll /ready")
        start = time.perf_counter()
        rec, arm, cached = await batcher.submit([req])
        if arm is not None:
            counters.arm_requests.labels(arm).inc()
            counters.arm_latency.labels(arm).observe(time.perf_counter() - start)
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


def add_browsing(app: FastAPI, pipeline, journal: EventJournal) -> None:
    """The web page and what it reads: ``GET /``, ``/users/random``, ``/users/{user_id}``, ``/items/search``."""
    dataset = pipeline.dataset
    # Searched by title, or by raw ID where the data set has no titles (what the page then shows).
    folded = [dataset.title(i).casefold() for i in range(len(dataset.item_raw_ids))]
    by_popularity = np.argsort(-np.asarray(pipeline.retriever.popularity), kind="stable").tolist()
    page = (Path(__file__).parent / "static" / "index.html").read_text()
    rng = np.random.default_rng()

    def movie(item: int) -> dict[str, Any]:
        return {"item_id": id_key(dataset.item_raw_ids[item]), "title": dataset.title(item)}

    def user_view(user_id: int | str, recent: int) -> dict[str, Any]:
        journal.catch_up()
        history = pipeline.store.history(pipeline.user_index[user_id])
        return {
            "user_id": user_id,
            "history_length": len(history),
            "recent": [movie(int(i)) for i in history[::-1][:recent]],
        }

    @app.get("/", response_class=HTMLResponse, summary="A page to try the recommender in a browser")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

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


def add_events(app: FastAPI, pipeline, journal: EventJournal) -> None:
    """``POST /events``: an interaction joins the user's history, through the journal."""
    dataset = pipeline.dataset
    clock = int(dataset.timestamp.max())

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
        except StateUnavailable as err:  # refused, never acknowledged: the client sends it again
            raise HTTPException(503, str(err), headers={"Retry-After": "1"}) from None
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
            _503="the shared event store (--state) does not answer: not recorded, send it again",
            _413="body over the size limit",
        ),
    )(events)


def load_service(a: argparse.Namespace, events_log: str | None) -> tuple[FastAPI, str]:
    """The service ``main``'s flags describe: the pipeline loaded and checked, its A/B router and
    cache, the app; and a line saying what it serves. Errors a user can fix end the process with
    the reason."""
    from integration.compatibility import ArtifactMismatch
    from integration.loader import create_pipeline

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
        app, _ = create_service(
            pipeline,
            cache,
            router,
            client_timeout=a.client_timeout,
            events_log=events_log,
            state=a.state,
            state_timeout=a.state_timeout,
        )
    except (ValueError, ConnectionError) as err:  # an events log or store of another data set; Redis down
        raise SystemExit(f"cannot serve: {err}") from None
    except OSError as err:  # an events log that cannot be opened
        raise SystemExit(f"cannot serve: --events-log {events_log}: {err.strerror}") from None
    rankers = pipeline.rankers.values()
    return app, (
        f"serving {pipeline.dataset.name}: {pipeline.served}, arms {router.shares}, cache {cache.backend}; "
        f"query tower {pipeline.retriever.runtime}, rankers "
        f"{', '.join(sorted({r.runtime.split(':')[0] for r in rankers}))} (per-user programs: "
        f"{', '.join(sorted({r.by_user_runtime.split(':')[0] for r in rankers}))})"
    )


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
        choices=["auto", "two-tower", "SASRec", "BERT4Rec", "union", "EASE", "transitions", "ensemble", "union ranker"],
        help="what the ranker re-orders, or 'ensemble' (the sources' fused scores, served as they are), or 'union "
        "ranker' (one DLRM over every source's lists, integration/union_ranker.py); auto: the "
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
    p.add_argument(
        "--state",
        default=None,
        metavar="REDIS_URL",
        help="share events through Redis (redis://host:port/db): any number of service processes on any number "
        "of hosts apply the same events in one order; while Redis is down events get 503 and recommendations "
        "are served from each process's last state. Run that Redis with --appendonly yes --appendfsync always "
        "(default: the events journal)",
    )
    p.add_argument(
        "--state-timeout",
        type=float,
        default=1.0,
        help="seconds a call to the --state Redis may take before it counts as down; longer than the cache's: "
        "a replica that misses another's event for a slow answer may serve its item again (default: %(default)s)",
    )
    a = p.parse_args(argv)
    if a.state and a.events_log:
        p.error("--state and --events-log both name where events live: give one")
    if a.workers < 1:
        p.error(f"--workers must be at least 1, got {a.workers}")
    if a.events_log and not os.access(Path(a.events_log).resolve().parent, os.W_OK):  # before the models load
        p.error(f"--events-log {a.events_log}: its directory does not exist or is not writable")
    if a.workers > 1:
        supervise(a, load_service)
        return
    sock = listen_socket(a.host, a.port)  # before the models load: a busy or invalid port fails at once
    serve_one(a, sock, a.events_log, load_service)


if __name__ == "__main__":
    main()
