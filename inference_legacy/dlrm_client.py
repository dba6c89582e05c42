"""Client for the DLRM service (``inference_legacy/dlrm_predict.py``): a library and a CLI.

    python -m inference_legacy.dlrm_client --url http://127.0.0.1:8080 --input rows.jsonl
    python -m inference_legacy.dlrm_client --heldout runs/serving/dlrm-int8     # the artifact's held-out rows
    python -m inference_legacy.dlrm_client --url http://127.0.0.1:8080 --status

``rows.jsonl``: one row per line, ``{<feature>: <value>, ...}`` (or ``{"features": {...}}`` as in an
artifact's ``heldout.jsonl``). Scores are written to ``<input>.scores.jsonl`` (or ``--output``).

From Python::

    from inference_legacy.dlrm_client import DLRMClient
    with DLRMClient("http://127.0.0.1:8080") as c:
        c.wait_ready()
        probs = c.predict(rows)          # requests of up to 512 rows each

``spawn`` starts a service (this one or ``integration.service``) on a free port and returns once it
is ready: what the tests and the load benchmarks do.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from common.export import read_manifest


class ServiceError(RuntimeError):
    """A non-2xx answer; ``status`` and the service's ``detail`` (which names the bad field)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class DLRMClient:
    def __init__(self, url: str = "http://127.0.0.1:8080", timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> DLRMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _json(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:  # the service's one-line summary ("rows[0].item_id: ...") when it gives one
                body = r.json()
                detail = body.get("error") or body.get("detail", r.text)
            except (ValueError, AttributeError):
                detail = r.text
            raise ServiceError(r.status_code, detail)
        return r.json()

    def predict(self, rows: list[dict[str, Any]], rows_per_request: int = 512) -> list[float]:
        """Click probabilities for feature rows, in order."""
        out: list[float] = []
        for lo in range(0, len(rows), rows_per_request):
            out += self._json(self.http.post("/predict", json={"rows": rows[lo : lo + rows_per_request]}))["scores"]
        return out

    def health(self) -> dict[str, Any]:
        return self._json(self.http.get("/health"))

    def ready(self) -> bool:
        return self.http.get("/ready").status_code == 200

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll ``/ready`` until 200; raises with the service's reason if it never gets there."""
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            try:
                r = self.http.get("/ready")
                if r.status_code == 200:
                    return r.json()
                last = r.json()
                if last.get("status") == "failed":
                    break
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
            time.sleep(0.1)
        raise TimeoutError(f"{self.url} not ready after {timeout:.0f} s: {last}")

    def metrics(self) -> str:
        r = self.http.get("/metrics")
        r.raise_for_status()
        return r.text


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path}:{n}: not JSON ({err})") from None
            rows.append(rec["features"] if "features" in rec else rec)
    return rows


def spawn(args: list[str], timeout: float = 120.0, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``python <args> --port 0`` (a service whose main calls :func:`serve`; ``env``: variables set
    over this process's) and return the process and its URL once ``/ready`` answers 200; raises with
    the service's output if it dies."""
    proc = subprocess.Popen(
        [sys.executable, *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    deadline, url, lines = time.monotonic() + timeout, None, []
    while url is None:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"service exited with {proc.wait()}:\n" + "".join(lines[-20:]))
        lines.append(line)
        found = re.search(r"listening on (http://\S+?:\d+)", line)  # stderr may share the line
        if found:
            url = found.group(1)
        elif time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("service did not start:\n" + "".join(lines[-20:]))
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining its output
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=5)
            conn.request("GET", "/ready")
            r = conn.getresponse()
            body = r.read()
            if r.status == 200:
                return proc, url
            if json.loads(body or b"{}").get("status") == "failed":
                proc.kill()
                raise RuntimeError(f"{url} failed its self-check: {json.loads(body)['error']}")
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}:\n" + "".join(lines[-20:]))
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"{url} never became ready")


def main(argv: list[str] | None = None) -> list[float] | dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080", help="service URL (default: %(default)s)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="JSON lines of feature rows")
    src.add_argument("--heldout", metavar="ARTIFACT", help="score an artifact's heldout.jsonl")
    src.add_argument("--status", action="store_true", help="print /health and /ready")
    p.add_argument("--output", default=None, help="scores as JSON lines (default: <input>.scores.jsonl)")
    p.add_argument("--rows-per-request", type=int, default=512, help="(default: %(default)s)")
    a = p.parse_args(argv)
    with DLRMClient(a.url) as c:
        if a.status:
            status = {**c.health(), "ready_now": c.ready()}
            print(json.dumps(status, indent=2))
            return status
        path = Path(a.input) if a.input else Path(a.heldout) / "heldout.jsonl"
        rows = read_rows(path)
        try:
            scores = c.predict(rows, a.rows_per_request)
        except ServiceError as err:
            raise SystemExit(f"the service refused {path}: {err}") from None
    if a.heldout:  # the artifact's rows carry the eager fp32 model's probabilities: compare
        ref = [json.loads(line)["fp32"] for line in path.read_text().splitlines() if line.strip()]
        tol = read_manifest(a.heldout, "give --heldout an artifact directory", verify_files=False)["verification"][
            "tolerance"
        ]
        diff = max(abs(s - r) for s, r in zip(scores, ref))
        print(
            f"scored {len(scores)} held-out rows: max |served - eager fp32| {diff:.2e} (artifact tolerance {tol:.2e})"
        )
    if a.input or a.output:
        out = Path(a.output or f"{path}.scores.jsonl")
        out.write_text("".join(json.dumps({"score": s}) + "\n" for s in scores))
        print(f"scored {len(scores)} rows from {path} -> {out}")
    return scores


if __name__ == "__main__":
    main()
