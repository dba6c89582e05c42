"""Serving machinery shared by every HTTP model service in this repo.

- :class:`DynamicBatcher`: concurrent requests wait in a queue; one worker thread merges them
  into a single model call of up to ``max_batch_rows`` rows, or whatever arrived within
  ``max_wait_ms`` of the first. ``enabled=False`` runs each request on its own (the baseline a
  benchmark compares against).
- :func:`create_app`: a FastAPI app with ``/health`` (liveness), ``/ready`` (503 until the model is
  loaded and has passed its self-check), ``/metrics`` (Prometheus text: request counts by
  endpoint and status, latency histogram, batch sizes), a request-size limit (413), and errors
  that are always JSON: 4xx for bad input naming the field, 500 only for bugs.
- :func:`serve`: uvicorn on 127.0.0.1 by default; ``port=0`` takes a free port and prints it.
- :func:`spawn`: start such a service in a subprocess and wait for ``/ready`` (tests, benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel

log = logging.getLogger("inference_legacy.server")

BODY_TIMEOUT_S = 10.0  # a request's body must arrive whole within this
HEADER_TIMEOUT_S = 10.0  # and its headers within this of the connection opening (or the last response)
INLINE_BODY_BYTES = 65_536  # larger bodies are parsed and validated off the event loop

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class BadRequest(ValueError):
    """Raised by a model function for input it cannot score; becomes a 422 naming the field."""


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: ``detail`` is a sentence, or for a body that fails its schema one entry
    per problem (``loc``, ``msg``, ``type``) with ``error`` summing up the first."""

    detail: str | list[dict[str, Any]]
    error: str | None = None


def error_responses(**codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error codes, e.g. ``error_responses(_404="unknown user")``, each with
    :class:`ErrorResponse` as its schema; 400 and 422 are always there."""
    out: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorResponse, "description": "a body that is not JSON text (e.g. not UTF-8)"},
        422: {"model": ErrorResponse, "description": "invalid input, named"},
    }
    out.update({int(code.lstrip("_")): {"model": ErrorResponse, "description": what} for code, what in codes.items()})
    return out


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only add noise here
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "request_latency_seconds",
            "HTTP request latency by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram("batch_rows", "rows per model call", buckets=SIZE_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram(
            "batch_requests", "requests merged into one model call", buckets=SIZE_BUCKETS, registry=self.registry
        )
        self.rows = Counter("rows_scored", "rows scored", registry=self.registry)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class DynamicBatcher:
    """Merges concurrent requests into one call of ``fn(list of requests) -> list of results``.

    Each request is a list of rows; ``fn`` gets the requests of a batch and returns one result
    per request, in order (an exception instance as a request's result fails that request
    alone). A request larger than ``max_batch_rows`` runs alone.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        max_batch_rows: int = 1024,
        max_wait_ms: float = 2.0,
        enabled: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.fn, self.max_rows, self.max_wait = fn, max_batch_rows, max_wait_ms / 1000.0
        self.enabled, self.metrics = enabled, metrics
        self._queue: queue.Queue[tuple[list[Any], Future] | None] = queue.Queue()
        self._pending: tuple[list[Any], Future] | None = None  # taken from the queue, next batch's first
        self._thread = threading.Thread(target=self._run, name="dynamic-batcher", daemon=True)
        self._thread.start()

    async def submit(self, rows: list[Any]) -> Any:
        fut: Future = Future()
        self._queue.put((rows, fut))
        return await asyncio.wrap_future(fut)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _collect(self, first: tuple[list[Any], Future]) -> list[tuple[list[Any], Future]]:
        batch, rows = [first], len(first[0])
        if not self.enabled:
            return batch
        deadline = time.perf_counter() + self.max_wait
        while rows < self.max_rows:
            try:  # take what is already queued without waiting, then wait out the window
                item = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if item is None:
                self._queue.put(None)
                break
            if rows + len(item[0]) > self.max_rows:
                self._pending = item
                break
            batch.append(item)
            rows += len(item[0])
        return batch

    def _run(self) -> None:
        while True:
            first = self._pending or self._queue.get()
            self._pending = None
            if first is None:
                return
            batch = self._collect(first)
            try:
                results = self.fn([rows for rows, _ in batch])
            except Exception as err:
                if len(batch) > 1:  # one request's bad rows must not fail the others: run each alone
                    for item in batch:
                        self._run_alone(item)
                else:
                    batch[0][1].set_exception(err)
                continue
            if self.metrics is not None:
                n = sum(len(rows) for rows, _ in batch)
                self.metrics.batch_rows.observe(n)
                self.metrics.batch_requests.observe(len(batch))
                self.metrics.rows.inc(n)
            for (_, fut), res in zip(batch, results):
                _deliver(fut, res)

    def _run_alone(self, item: tuple[list[Any], Future]) -> None:
        rows, fut = item
        try:
            _deliver(fut, self.fn([rows])[0])
        except Exception as err:  # the waiting request turns it into its response
            fut.set_exception(err)


def _deliver(fut: Future, result: Any) -> None:
    """A result, or an exception ``fn`` returned for that one request."""
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


class _LimitAndMeasure:
    """ASGI middleware: refuses bodies over ``max_bytes`` with 413 before the app parses them, and
    bodies that take longer than ``body_timeout`` seconds to arrive with 408 (a client that opens a
    request and trickles its body, slowloris, does not hold a connection for ever); records every
    request's latency and status."""

    def __init__(
        self,
        app: Any,
        max_bytes: int,
        metrics: Metrics,
        routes: Callable[[], set[str]],
        body_timeout: float = BODY_TIMEOUT_S,
    ) -> None:
        self.app, self.max_bytes, self.metrics, self.routes = app, max_bytes, metrics, routes
        self.body_timeout = body_timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in self.routes() else "other"
        status = {"code": 500, "started": False}

        async def send_and_record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
                return await self._too_large(send_and_record, declared.decode("latin-1"))
            body, more = [], True
            size = 0
            try:
                async with asyncio.timeout(self.body_timeout):
                    while more:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            status["code"] = 499  # the client went away (nginx's code): not a server error
                            return
                        chunk = message.get("body", b"")
                        size += len(chunk)
                        if size > self.max_bytes:
                            return await self._too_large(send_and_record, f"more than {self.max_bytes}")
                        body.append(chunk)
                        more = message.get("more_body", False)
            except TimeoutError:
                return await self._reply(
                    send_and_record,
                    408,
                    (
                        f"the request body did not arrive within {self.body_timeout:g} s ({size} bytes came); "
                        f"send it whole"
                    ),
                )
            payload = b"".join(body)
            sent = False

            async def replay() -> dict:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": payload, "more_body": False}
                return await receive()

            try:
                await self.app(scope, replay, send_and_record)
            except (asyncio.CancelledError, ConnectionError):
                if not status["started"]:
                    status["code"] = 499  # cancelled because the client disconnected
                raise
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _too_large(self, send: Callable, size: str) -> None:
        await self._reply(
            send,
            413,
            f"request body is {size} bytes; the limit is {self.max_bytes} "
            f"(--max-request-bytes): send fewer rows per request",
        )

    @staticmethod
    async def _reply(send: Callable, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class Readiness:
    """Set once the model has loaded and passed its self-check; ``error`` says why it never will.
    ``info`` and what ``extra()`` returns at the time (e.g. a cache's state) go into /health and /ready."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.extra: Callable[[], dict[str, Any]] | None = None

    def describe(self) -> dict[str, Any]:
        return {**self.info, **(self.extra() if self.extra is not None else {})}


def create_app(
    title: str,
    version: str,
    description: str,
    metrics: Metrics,
    readiness: Readiness,
    max_request_bytes: int = 1_000_000,
    body_timeout: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The app with its operational endpoints; the caller adds the model's routes."""
    app = FastAPI(title=title, version=version, description=description)

    @app.get("/health", summary="Liveness: the process is up")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "ready": readiness.event.is_set(), **readiness.describe()}

    @app.get(
        "/ready",
        summary="Readiness: 200 once the model is loaded and verified, 503 before",
        responses={503: {"description": "still loading, or failed its self-check"}},
    )
    async def ready() -> JSONResponse:
        if readiness.event.is_set():
            return JSONResponse({"status": "ready", **readiness.describe()})
        return JSONResponse(
            {"status": "failed" if readiness.error else "loading", "error": readiness.error}, status_code=503
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each bad input back, which fails on non-finite numbers
        # (1e999 parses to inf) and can be large; name the fields instead.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in err.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        return JSONResponse({"detail": errors, "error": f"{_field(first['loc'])}: {first['msg']}"}, status_code=422)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, err: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error: a bug in the service", exc_info=err)
        return JSONResponse(
            {"detail": f"internal error ({type(err).__name__}); this is a bug, please report it"}, status_code=500
        )

    paths: set[str] = set()

    def routes() -> set[str]:  # read once the caller has added its routes (label values stay bounded)
        if not paths:
            paths.update(r.path for r in app.routes)
        return paths

    app.add_middleware(
        _LimitAndMeasure, max_bytes=max_request_bytes, metrics=metrics, routes=routes, body_timeout=body_timeout
    )
    return app


_VALIDATOR: ThreadPoolExecutor | None = None


def _validation_thread() -> ThreadPoolExecutor:
    """One thread for every big body: validation holds the GIL, so more threads would not go
    faster, and each would make the event loop's thread wait longer for its turn."""
    global _VALIDATOR
    if _VALIDATOR is None:
        _VALIDATOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="validate-body")
    return _VALIDATOR


class JSONBody:
    """A request body of type ``model`` that big requests parse and validate off the event loop.

    FastAPI validates a typed body on the event loop: a body of megabytes holds the loop long enough
    that no other request, ``/health`` included, is answered. Used as ``Depends(JSONBody(app, M))``
    with ``openapi_extra=body.openapi`` on the route, bodies over ``inline_bytes`` go to one worker
    thread; smaller ones stay inline (a thread hop costs more than they do). Errors are FastAPI's: a
    422 naming the field. The OpenAPI schema documents the model as a typed body would.
    """

    def __init__(self, app: FastAPI, model: type[Any], inline_bytes: int = INLINE_BODY_BYTES) -> None:
        self.model, self.inline_bytes = model, inline_bytes
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        defs = {**schema.pop("$defs", {}), model.__name__: schema}
        self.openapi = {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        }
        generate = app.openapi

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                generate().setdefault("components", {}).setdefault("schemas", {}).update(defs)
            return app.openapi_schema

        app.openapi = openapi  # type: ignore[method-assign]

    def parse(self, body: bytes) -> Any:
        # pydantic's own JSON parser: json.loads would hold the GIL for a whole multi-megabyte body,
        # stalling the event loop's thread even from a worker thread.
        from pydantic import ValidationError

        try:
            return self.model.model_validate_json(body)
        except ValidationError as err:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()]) from None

    async def __call__(self, request: Request) -> Any:
        body = await request.body()
        if len(body) <= self.inline_bytes:
            return self.parse(body)
        return await asyncio.get_running_loop().run_in_executor(_validation_thread(), self.parse, body)


def _field(loc: list[Any]) -> str:
    """``["body", "rows", 0, "item_id"]`` -> ``rows[0].item_id``."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "body"


def add_client_timeout(parser: Any) -> None:
    """``--client-timeout``, as every service here takes it: seconds a client has to send a request's
    headers (:func:`serve`), and again its body (:func:`create_app`)."""

    def positive(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
        return value

    parser.add_argument(
        "--client-timeout",
        type=positive,
        default=BODY_TIMEOUT_S,
        help="seconds a client has to send a request's headers, and again its body (default: %(default)s)",
    )


def listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: any free port). Services bind before they load their
    models, so a port in use or out of range is one line at once, not a traceback minutes later.
    ``reuse_port``: SO_REUSEPORT, so that several processes can bind and serve the one port."""
    if not 0 <= port <= 65535:
        raise SystemExit(f"--port {port} is not a TCP port (0-65535; 0 picks a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else small responses wait on delayed ACKs
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SystemExit(
            f"cannot listen on {host}:{port}: {err.strerror}; pick another --port (0 for any free one) or --host"
        ) from None
    return sock


def serve(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8080,
    on_bind: Callable[[str], None] | None = None,
    sock: socket.socket | None = None,
    header_timeout: float = HEADER_TIMEOUT_S,
) -> None:
    """Run uvicorn until interrupted, on ``sock`` (from :func:`listen_socket`) or a socket bound
    here, so that ``port=0`` works: the address actually bound goes to ``on_bind`` (default: printed).
    A connection whose request headers take longer than ``header_timeout`` seconds is closed."""
    import uvicorn

    sock = sock or listen_socket(host, port)
    bound = sock.getsockname()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}"
    (on_bind or (lambda u: print(f"listening on {u}", flush=True)))(url)
    # Everything loaded so far (torch, the model, FastAPI) lives as long as the process: freezing it
    # keeps the garbage collector's full passes from walking it, which otherwise stall requests.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=header_timeout,
        http=_protocol_with_header_timeout(header_timeout),
    )
    uvicorn.Server(config).run(sockets=[sock])


def _protocol_with_header_timeout(seconds: float) -> type:
    """uvicorn's HTTP protocol (httptools when installed, as uvicorn's "auto" picks, else h11),
    closing a connection whose request headers have not arrived ``seconds`` after it opened or after
    its last response. uvicorn alone waits for ever on a client that opens connections and trickles
    header bytes (slowloris)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class Protocol(Base):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._headers_due, self.cycle)

        def _headers_due(self, cycle: Any) -> None:
            if self.cycle is cycle and not self.transport.is_closing():  # no request began since
                self.transport.close()

    return Protocol
