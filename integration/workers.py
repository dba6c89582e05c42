"""Serving processes: one service on a socket (:func:`serve_one`), or ``--workers N`` processes
sharing one port with SO_REUSEPORT under a supervisor that restarts them (:func:`supervise`)."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from inference_legacy.server import Readiness, listen_socket, serve

log = logging.getLogger("integration.service")
# What a worker loads: (its args, the events journal) -> (the app, a line saying what it serves); a
# module-level function, so that a spawned worker process finds it by name.
Loader = Callable[[argparse.Namespace, "str | None"], tuple[Any, str]]


def serve_one(a: argparse.Namespace, sock, events_log: str | None, load: Loader, ready=None) -> None:
    """Load the service (``load(a, events_log)``: the app and a line saying what it serves) and serve
    it on ``sock``; ``ready`` (a multiprocessing Event), when given, is set once the service answers
    (a worker of :func:`supervise`, which prints the address)."""
    import torch

    torch.set_num_threads(1)
    app, banner = load(a, events_log)
    print(f"{'' if ready is None else f'worker {os.getpid()}: '}{banner}", flush=True)
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


def _worker(a: argparse.Namespace, port: int, events_log: str, load: Loader, ready) -> None:
    """One of :func:`supervise`'s processes: its own socket on the shared port; it stops when the
    supervisor is gone (even killed), rather than serve on alone."""
    import signal

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown

    threading.Thread(target=watch, daemon=True).start()
    serve_one(a, listen_socket(a.host, port, reuse_port=True), events_log, load, ready)


def supervise(a: argparse.Namespace, load: Loader) -> None:
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
    shared = a.events_log or getattr(a, "state", None)  # events shared through a file named, or Redis
    tmp = None if shared else tempfile.mkdtemp(prefix="recsys-events-")
    events_log = a.events_log or (None if tmp is None else os.path.join(tmp, "events.jsonl"))
    ctx = multiprocessing.get_context("spawn")  # nothing of this process (threads, locks) in the workers
    # Each worker's BLAS and OpenMP pools get its share of the cores (unless the caller chose): a
    # pool per worker as wide as the machine would spin against the others' (the ensemble's
    # catalog-wide matrix products ran at half the one-worker rate before this).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(max(1, (os.cpu_count() or 1) // a.workers)))

    def start(k: int) -> tuple[Any, Any, float]:
        ready = ctx.Event()
        proc = ctx.Process(target=_worker, args=(a, port, events_log, load, ready), name=f"worker-{k}")
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
        print(f"listening on {url} ({a.workers} workers: {pids}; events {events_log or shared})", flush=True)
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
