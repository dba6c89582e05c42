"""Serve a packaged DLRM over HTTP, with dynamic batching.

    python -m inference_legacy.dlrm_predict                                   # runs/serving/dlrm-int8, 127.0.0.1:8080
    python -m inference_legacy.dlrm_predict --artifact DIR --port 0           # any free port (printed)
    python -m inference_legacy.dlrm_predict --no-batching                     # one model call per request

Endpoints (OpenAPI schema at ``/openapi.json``, browsable at ``/docs``):

- ``POST /predict`` ``{"rows": [{<feature>: <value>, ...}, ...]}`` -> ``{"scores": [...], "model": ...}``.
  A row has every feature of the artifact's schema: an integer ID for a single-valued sparse
  feature, a list of IDs for a list feature (a history keeps its last N), a finite number for a
  dense one. The request schema is generated from the artifact's ``schema.json``, so an unknown
  or missing feature, an ID out of range or a non-finite value is a 422 whose ``loc`` names it.
- ``GET /health`` (liveness), ``GET /ready`` (200 once the artifact has loaded and reproduced its
  held-out outputs within the manifest's tolerance), ``GET /metrics`` (Prometheus text).

The artifact is loaded by ``inference_legacy.artifact``: no training code, nothing unpickled.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from common.features import FeatureError, FeatureSchema
from inference_legacy import artifact as art
from inference_legacy.aot_compile import load_compiled
from inference_legacy.server import (
    BODY_TIMEOUT_S,
    BadRequest,
    DynamicBatcher,
    JSONBody,
    Metrics,
    Readiness,
    add_client_timeout,
    create_app,
    error_responses,
    listen_socket,
    serve,
)

log = logging.getLogger("inference_legacy.dlrm_predict")

MAX_IDS_PER_FEATURE = 1000


class DLRMPredictor:
    """A packaged DLRM: ``predict(rows)`` -> click probabilities."""

    def __init__(self, artifact_dir: str | Path, compiled: bool = True) -> None:
        """``compiled``: serve the artifact's AOTInductor package (``model.aoti.pt2``) when it is there
        and checks out (``inference_legacy.aot_compile``); otherwise, or with False, the exported program."""
        self.path = Path(artifact_dir)
        self.manifest = art.read_manifest(self.path)
        if self.manifest.get("model") != "dlrm" or "tolerance" not in self.manifest.get("verification", {}):
            raise art.ArtifactError(
                f"{self.path} is not a verified DLRM artifact (model {self.manifest.get('model')!r}); "
                f"package one with python -m inference_legacy.dlrm_packager"
            )
        self.schema = art.load_schema(self.path, self.manifest)
        self.program = art.load_program(self.path, self.manifest)
        self.model, self.runtime = self.program, "exported program (--eager)"
        if compiled:
            runner, why = load_compiled(self.path, self.manifest, self.program, self.schema)
            self.model, self.runtime = (runner, "AOTInductor") if runner else (self.program, f"exported program: {why}")
        # the per-user program (many candidates per user: each user's features looked up once), if packaged
        self.by_user, self.by_user_runtime = None, "not packaged (an artifact from before it, or no user features)"
        if "by_user" in self.manifest:
            self.by_user = art.load_program(self.path, self.manifest, art.BY_USER)
            self.by_user_runtime = "exported program (--eager)"
            if compiled:
                runner, why = load_compiled(self.path, self.manifest, self.by_user, self.schema, by_user=True)
                self.by_user, self.by_user_runtime = (
                    (runner, "AOTInductor") if runner else (self.by_user, f"exported program: {why}")
                )
        m = self.manifest
        self.name = f"{m['model']}-{m['quantization']['embeddings']}-{m['files'][art.PROGRAM]['sha256'][:12]}"

    @torch.inference_mode()
    def predict(self, rows: list[dict[str, Any]]) -> np.ndarray:
        try:
            fb = self.schema.from_records(rows)
        except FeatureError as err:
            raise BadRequest(str(err)) from err
        out = self.model(*art.program_inputs(fb)).numpy()
        bad = np.flatnonzero(~np.isfinite(out))
        if len(bad):
            raise BadRequest(
                f"rows {bad[:5].tolist()} have no finite score: their dense values are far outside "
                f"anything the model was trained on"
            )
        return out

    def self_check(self) -> dict[str, float]:
        """Score the artifact's held-out rows; they must match the eager fp32 model's probabilities
        within the tolerance the packager recorded."""
        rows = art.read_heldout(self.path)
        tol = self.manifest["verification"]["tolerance"]
        got = self.predict([r["features"] for r in rows])
        diff = float(np.abs(got - np.array([r["fp32"] for r in rows])).max()) if rows else 0.0
        if diff > tol + 1e-6:
            raise art.ArtifactError(
                f"{self.path}: held-out rows differ from the fp32 model by {diff:.2e}, more than the "
                f"recorded tolerance {tol:.2e}; this environment does not reproduce the artifact"
            )
        return {"heldout_rows": len(rows), "max_abs_diff": diff, "tolerance": tol}


def integer_id(v: Any) -> int:
    """JSON Schema's integer: an int, or a number with no fractional part (``68.0``); not a bool or a string."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected an integer ID, got {type(v).__name__}")
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"expected an integer ID, got {v!r}")
    return int(v)


# Dense features are normalized (log counts, probabilities, scaled years); this bound only keeps
# the MLPs' float32 arithmetic finite.
MAX_DENSE = 1e6


def request_models(schema: FeatureSchema, max_rows: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """Pydantic models (and so the OpenAPI schema) of a predict request, from the feature schema."""
    fields: dict[str, Any] = {}
    for f in schema.sparse:
        fid = Annotated[int, Field(ge=0, le=f.cardinality - 1), BeforeValidator(integer_id)]
        if f.single_valued:
            fields[f.name] = (fid, Field(description=f"{f.name}: one ID in [0, {f.cardinality})"))
        else:
            keep = f"the last {f.max_length} are used" if f.max_length else "all are used"
            fields[f.name] = (
                list[fid],
                Field(max_length=MAX_IDS_PER_FEATURE, description=f"{f.name}: IDs in [0, {f.cardinality}); {keep}"),
            )
    for f in schema.dense:
        fields[f.name] = (
            Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_DENSE, le=MAX_DENSE)],
            Field(description=f"{f.name}: a number in [-1e6, 1e6]"),
        )
    row = create_model("Row", __config__=ConfigDict(extra="forbid"), **fields)
    request = create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        rows=(list[row], Field(min_length=1, max_length=max_rows, description=f"1 to {max_rows} rows to score")),
    )
    return row, request


class PredictResponse(BaseModel):
    scores: list[float] = Field(description="click probability per row, in request order")
    model: str = Field(description="the artifact that scored them: model-precision-checksum")


def create_dlrm_app(
    artifact_dir: str | Path,
    max_batch_rows: int = 1024,
    max_wait_ms: float = 0.0,
    batching: bool = True,
    max_request_bytes: int = 4_000_000,
    max_rows: int = 4096,
    client_timeout: float = BODY_TIMEOUT_S,
    compiled: bool = True,
) -> tuple[FastAPI, DLRMPredictor, DynamicBatcher]:
    """Load the artifact (errors surface here, before anything is served), build the app, and
    start the self-check that turns ``/ready`` to 200."""
    predictor = DLRMPredictor(artifact_dir, compiled)
    metrics, readiness = Metrics(), Readiness()
    readiness.info = {
        "model": predictor.name,
        "runtime": predictor.runtime,
        "batching": batching,
        "max_batch_rows": max_batch_rows,
        "max_wait_ms": max_wait_ms,
    }
    app = create_app(
        "DLRM ranking service", "1", __doc__.split("\n\n")[0], metrics, readiness, max_request_bytes, client_timeout
    )

    def run(requests: list[list[dict[str, Any]]]) -> list[list[float]]:
        scores = predictor.predict([row for rows in requests for row in rows]).tolist()
        out, lo = [], 0
        for rows in requests:
            out.append(scores[lo : lo + len(rows)])
            lo += len(rows)
        return out

    batcher = DynamicBatcher(run, max_batch_rows, max_wait_ms, batching, metrics)
    _, request_model = request_models(predictor.schema, max_rows)

    body = JSONBody(app, request_model)  # up to 4,096 rows: validated off the event loop

    async def predict(req) -> JSONResponse:
        if not readiness.event.is_set():
            raise HTTPException(503, f"not ready: {readiness.error or 'the model is loading'}; poll /ready")
        scores = await batcher.submit([r.__dict__ for r in req.rows])
        return JSONResponse({"scores": scores, "model": predictor.name})

    predict.__annotations__["req"] = Annotated[Any, Depends(body)]  # built at run time, not a string annotation
    app.post(
        "/predict",
        response_model=PredictResponse,
        summary="Click probabilities for feature rows",
        openapi_extra=body.openapi,
        responses=error_responses(
            _408="body not sent in time", _413="body over the size limit", _503="not ready yet (see /ready)"
        ),
    )(predict)

    def check() -> None:
        try:
            readiness.info["self_check"] = predictor.self_check()
            readiness.event.set()
        except Exception as err:  # reported by /ready and /predict; the process stays up for inspection
            readiness.error = str(err)
            log.error("self-check failed: %s", err)

    threading.Thread(target=check, name="self-check", daemon=True).start()
    return app, predictor, batcher


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="runs/serving/dlrm-int8", help="artifact directory (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--max-batch-rows", type=int, default=1024, help="rows per model call (default: %(default)s)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="how long the first request of a batch waits for others (default: %(default)s)",
    )
    p.add_argument("--no-batching", action="store_true", help="one model call per request")
    p.add_argument("--max-request-bytes", type=int, default=4_000_000, help="body size limit (default: %(default)s)")
    p.add_argument("--max-rows", type=int, default=4096, help="rows per request (default: %(default)s)")
    add_client_timeout(p)
    p.add_argument("--eager", action="store_true", help="serve the exported program, not the compiled package")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for the model (default: %(default)s; the event loop needs a core)",
    )
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error(f"--threads must be at least 1, got {a.threads}")
    sock = listen_socket(a.host, a.port)  # before the model loads: a busy or invalid port fails at once
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    try:
        app, predictor, _ = create_dlrm_app(
            a.artifact,
            a.max_batch_rows,
            a.max_wait_ms,
            not a.no_batching,
            a.max_request_bytes,
            a.max_rows,
            a.client_timeout,
            not a.eager,
        )
    except (art.ArtifactError, FileNotFoundError) as err:
        raise SystemExit(f"cannot serve {a.artifact}: {err}") from None
    print(
        f"loaded {predictor.name} from {a.artifact} in {time.perf_counter() - t0:.1f} s, {predictor.runtime} "
        f"(batching {'off' if a.no_batching else f'up to {a.max_batch_rows} rows / {a.max_wait_ms} ms'})",
        flush=True,
    )
    serve(app, a.host, a.port, sock=sock, header_timeout=a.client_timeout)


if __name__ == "__main__":
    main()
