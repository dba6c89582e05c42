"""Serving: the packaged artifact, the HTTP service and its client.

A tiny trained DLRM is packaged once (INT8); the tests check what the packager measured, a
round trip through a server subprocess against the eager model, loading without training code,
damaged and unsafe artifacts, every kind of bad request, readiness, dynamic batching, and a
schemathesis fuzz of the OpenAPI schema."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from common.compiled import Guarded
from inference_legacy import aot_compile, dlrm_packager
from inference_legacy import artifact as art
from inference_legacy.dlrm_client import DLRMClient, ServiceError, spawn
from inference_legacy.dlrm_predict import DLRMPredictor, create_dlrm_app
from inference_legacy.dlrm_predict import main as serve_main
from inference_legacy.server import BadRequest, DynamicBatcher
from tests.conftest import ready_client

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packaged(ranking_run, tmp_path_factory) -> tuple[dict, Path, Path]:
    """(manifest, artifact dir, checkpoints) for the session's tiny DLRM, INT8."""
    _, run = ranking_run
    out = tmp_path_factory.mktemp("serving") / "dlrm-int8"
    manifest = dlrm_packager.main(["--checkpoints", str(run / "checkpoints" / "dlrm"), "--out", str(out)])
    return manifest, out, run / "checkpoints" / "dlrm"


def _eager_fp32(checkpoints: Path, rows: list[dict]) -> np.ndarray:
    """The trained model, unquantized and not exported, on the same feature rows."""
    from prediction.predict_using_torchrec import Ranker

    ranker = Ranker(checkpoints, quantize="none")
    fb = ranker.features.schema.from_records(rows)
    with torch.no_grad():
        return ranker.model(fb.dense, fb.sparse).numpy()


def test_packager_measures_size_auc_and_tolerance(packaged) -> None:
    manifest, out, _ = packaged
    v, s = manifest["verification"], manifest["sizes"]
    assert s["table_reduction"] >= 3.5, s  # INT8 tables vs the fp32 checkpoint's
    assert abs(v["auc_change"]) <= 0.002, v  # on every held-out test row
    assert v["rows"] > 1000 and 0 < v["tolerance"] < 0.01
    assert manifest["quantization"]["embeddings"] == "int8" and manifest["exporter"] == "torch.export"
    assert set(manifest["files"]) == {"model.pt2", "schema.json", "heldout.jsonl", "model_by_user.pt2"}
    assert len(art.read_heldout(out)) == 1000
    art.check_pickle_free(out / "model.pt2")
    art.check_pickle_free(out / "model_by_user.pt2")


def test_round_trip_through_a_server_subprocess(packaged) -> None:
    manifest, out, checkpoints = packaged
    rows = [r["features"] for r in art.read_heldout(out)]
    proc, url = spawn(["-m", "inference_legacy.dlrm_predict", "--artifact", str(out)])
    try:
        with DLRMClient(url) as client:
            assert client.health()["ready"] is True
            served = np.array(client.predict(rows))
            metrics = client.metrics()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    eager = _eager_fp32(checkpoints, rows)
    assert served.shape == (1000,)
    assert np.abs(served - eager).max() <= manifest["verification"]["tolerance"] + 1e-6
    assert 'requests_total{endpoint="/predict",status="200"} 2.0' in metrics
    assert "batch_rows_count" in metrics and "request_latency_seconds_bucket" in metrics


def test_artifact_loads_in_a_process_without_training_code(packaged) -> None:
    _, out, _ = packaged
    code = (
        "import sys; from inference_legacy.dlrm_predict import DLRMPredictor; p = DLRMPredictor(sys.argv[1]); "
        "print(p.self_check()['heldout_rows']); print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'golden_training', 'prediction', 'retrieval', 'bert4rec'}))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, capture_output=True, text=True, check=True)
    assert r.stdout.split("\n")[:2] == ["1000", "[]"], r.stdout


def test_the_served_module_skips_the_exports_shape_hook_and_scores_the_same(packaged) -> None:
    """load_program drops the exported module's per-call input-shape hook (the schema builds every
    input); for 1 row and for 1000 the scores are the hooked module's exactly."""
    _, out, _ = packaged
    served = DLRMPredictor(out)
    hooked = torch.export.load(out / "model.pt2").module()
    names = {getattr(h, "__name__", "") for h in hooked._forward_pre_hooks.values()}
    assert "_check_input_constraints_pre_hook" in names  # what the export adds, and load_program takes off
    assert "_check_input_constraints_pre_hook" not in {
        getattr(h, "__name__", "") for h in served.program._forward_pre_hooks.values()
    }
    rows = [r["features"] for r in art.read_heldout(out)]
    for part in (rows[:1], rows):
        fb = served.schema.from_records(part)
        args = (fb.dense, fb.sparse.values().long(), fb.sparse.lengths().long())
        with torch.inference_mode():
            assert torch.equal(served.program(*args), hooked(*args))


@pytest.fixture(scope="module")
def compiled(packaged, tmp_path_factory) -> Path:
    """The tiny DLRM packaged again with ``--compile`` (what the demo runs): with its AOTInductor package."""
    _, _, checkpoints = packaged
    dst = tmp_path_factory.mktemp("compiled") / "dlrm-int8"
    manifest = dlrm_packager.main(["--checkpoints", str(checkpoints), "--out", str(dst), "--compile"])
    assert manifest["compiled"]["file"] == aot_compile.COMPILED
    return dst


def _heldout_inputs(predictor: DLRMPredictor) -> tuple[torch.Tensor, ...]:
    fb = predictor.schema.from_records([r["features"] for r in art.read_heldout(predictor.path)])
    return fb.dense, fb.sparse.values().long(), fb.sparse.lengths().long()


@pytest.mark.slow
def test_the_compiled_package_scores_like_the_exported_program(compiled) -> None:
    """AOTInductor's package: served by default, equal to the exported program within the recorded
    tolerance on every held-out row, the fp32 self-check passed, and the ID check the compiled graph
    leaves out done before the call."""
    entry = json.loads((compiled / "manifest.json").read_text())["compiled"]
    assert entry["removed_ops"] == {"fbgemm.bounds_check_indices": 2}  # one per quantized table group
    assert entry["check_rows"] == 1000 and entry["max_abs_diff"] <= entry["tolerance"] <= 1e-5
    p = DLRMPredictor(compiled)
    assert p.runtime == "AOTInductor" and isinstance(p.model, Guarded)
    inputs = _heldout_inputs(p)
    with torch.inference_mode():
        got, want = p.model(*inputs), p.program(*inputs)
        fb = p.schema.from_records([art.read_heldout(p.path)[0]["features"]])
        one = p.model(fb.dense, fb.sparse.values().long(), fb.sparse.lengths().long())
    assert got.shape == (1000,) and float((got - want).abs().max()) <= entry["tolerance"]
    assert one.shape == (1,) and float(one[0]) == pytest.approx(float(want[0]), abs=entry["tolerance"])
    assert (
        p.self_check()["max_abs_diff"]
        <= json.loads((compiled / "manifest.json").read_text())["verification"]["tolerance"]
    )
    dense, values, lengths = inputs
    bad = values.clone()
    bad[0] = 10**6  # the first value belongs to the schema's first sparse feature
    with pytest.raises(ValueError, match=rf"sparse feature '{p.schema.sparse_names[0]}': ID 1000000 is out of range"):
        p.model(dense, bad, lengths)
    eager = DLRMPredictor(compiled, compiled=False)
    assert eager.model is eager.program and eager.runtime.startswith("exported program")


def _one_user_many_items(p: DLRMPredictor, users: int = 4, items: int = 25) -> tuple[torch.Tensor, ...]:
    """Per-row inputs for ``users`` held-out users with ``items`` candidates each (the serving shape)."""
    rows = art.read_heldout(p.path)
    firsts = list({r["features"]["user_id"]: r["features"] for r in rows}.values())[:users]
    item_ids = [r["features"]["item_id"] for r in rows[:items]]
    recs = [{**f, "item_id": i} for f in firsts for i in item_ids]
    fb = p.schema.from_records(recs)
    return fb.dense, fb.sparse.values().long(), fb.sparse.lengths().long()


@pytest.mark.slow
def test_the_per_user_program_scores_like_the_per_row_one(compiled) -> None:
    """The per-user program (each user's features looked up once for all their candidates): packaged,
    compiled and served by default, equal to the per-row program on held-out users' candidates, and
    its inputs checked before the compiled gather reads them."""
    m = json.loads((compiled / "manifest.json").read_text())
    assert (
        m["by_user"]["user_features"][:2] == ["user_id", "history"] and m["by_user"]["max_abs_diff_vs_program"] <= 1e-5
    )
    assert m["compiled_by_user"]["file"] == aot_compile.COMPILED_BY_USER
    p, eager = DLRMPredictor(compiled), DLRMPredictor(compiled, compiled=False)
    assert p.by_user_runtime == "AOTInductor" and eager.by_user_runtime.startswith("exported program")
    per_row = _one_user_many_items(p)
    inputs = art.by_user_inputs(p.schema, m["by_user"]["user_features"], per_row)
    dense, row_user, user_values, user_lengths, values, lengths = inputs
    assert row_user.tolist() == [u for u in range(4) for _ in range(25)]  # 100 rows, 4 users
    assert user_lengths.numel() == 4 * len(m["by_user"]["user_features"])
    with torch.inference_mode():
        want = p.model(*per_row)
        for served in (p.by_user, eager.by_user):
            assert float((served(*inputs) - want).abs().max()) <= m["compiled_by_user"]["tolerance"] + 1e-6
        # the held-out rows, each its own group of rows: the same as the per-row program
        held = _heldout_inputs(p)
        got = p.by_user(*art.by_user_inputs(p.schema, m["by_user"]["user_features"], held))
        assert float((got - p.model(*held)).abs().max()) <= m["compiled_by_user"]["tolerance"] + 1e-6
    with pytest.raises(ValueError, match=r"row_user must hold one user index in \[0, 4\)"):
        p.by_user(dense, row_user + 1, user_values, user_lengths, values, lengths)
    bad = user_values.clone()
    bad[0] = 10**6  # the first user-side value: the user ID
    with pytest.raises(ValueError, match=r"sparse feature 'user_id': ID 1000000 is out of range"):
        p.by_user(dense, row_user, bad, user_lengths, values, lengths)
    # an artifact from before the per-user program: served per row
    old = _copy(compiled, Path(str(compiled) + "-old"), "old")
    mm = json.loads((old / "manifest.json").read_text())
    for key in ("by_user", "compiled_by_user"):
        mm.pop(key)
    mm["files"].pop(art.BY_USER)
    (old / "manifest.json").write_text(json.dumps(mm))
    legacy = DLRMPredictor(old)
    assert legacy.by_user is None and legacy.by_user_runtime.startswith("not packaged")
    assert legacy.runtime == "AOTInductor"


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
@pytest.mark.parametrize("precision", ["none", "int8"])
def test_the_per_user_module_equals_the_per_row_one(interaction, precision) -> None:
    """DLRMByUser against DLRMServing, eager, on 5 users x 7 rows (some with empty histories): the
    same probabilities for TorchRec's DLRM and DLRM_DCN, fp32 and INT8 tables."""
    from common.features import DenseFeature, FeatureSchema, SparseFeature
    from golden_training.model import DLRMByUser, DLRMServing, TorchRecDLRM, quantize

    torch.manual_seed(0)
    schema = FeatureSchema(
        sparse=(
            SparseFeature("user_id", 50),
            SparseFeature("item_id", 40, pooling="mean", table="item"),
            SparseFeature("history", 40, pooling="mean", max_length=None, table="item"),
            SparseFeature("age", 7),
        ),
        dense=(DenseFeature("a"), DenseFeature("b")),
    )
    rng = np.random.default_rng(0)
    rows = []
    for u in range(5):
        history = rng.integers(0, 40, u).tolist()  # user 0 has none
        rows += [
            {"user_id": u, "item_id": int(i), "history": history, "age": u, "a": float(rng.random()), "b": 1.0}
            for i in rng.integers(0, 40, 7)
        ]
    x = art.program_inputs(schema.from_records(rows))
    model = TorchRecDLRM(schema, 16, [16, 16], [32, 1], interaction=interaction).eval()
    per_row = DLRMServing(quantize(model, precision), schema.sparse_names).eval()
    per_user = DLRMByUser(model, schema, ["user_id", "history", "age"], precision).eval()
    by_user = art.by_user_inputs(schema, ["user_id", "history", "age"], x)
    assert by_user[1].tolist() == [u for u in range(5) for _ in range(7)]
    with torch.no_grad():
        assert torch.allclose(per_user(*by_user), per_row(*x), atol=1e-6)


def test_by_user_inputs_share_each_users_ids_and_keep_each_rows_own() -> None:
    from common.features import FeatureSchema, SparseFeature

    schema = FeatureSchema(
        sparse=(SparseFeature("u", 10), SparseFeature("i", 10), SparseFeature("h", 10, max_length=None))
    )
    # rows: (u=7, i=1, h=[2,3]), (u=8, i=2, h=[]), (u=7, i=4, h=[2,3]); feature-major
    values = torch.tensor([7, 8, 7, 1, 2, 4, 2, 3, 2, 3])
    lengths = torch.tensor([1, 1, 1, 1, 1, 1, 2, 0, 2])
    dense = torch.zeros(3, 0)
    _, row_user, uv, ul, v, n = art.by_user_inputs(schema, ["u", "h"], (dense, values, lengths))
    assert row_user.tolist() == [0, 1, 0]
    assert uv.tolist() == [7, 8, 2, 3] and ul.tolist() == [1, 1, 2, 0]  # u for users 0, 1; then h
    assert v.tolist() == [1, 2, 4] and n.tolist() == [1, 1, 1]
    assert schema.subset(["h", "u"]).sparse_names == ["u", "h"]
    with pytest.raises(art.ArtifactError, match="not a non-empty subset"):
        art.by_user_inputs(schema, ["zip"], (dense, values, lengths))


@pytest.mark.slow  # each case loads the AOTInductor-compiled artifact
@pytest.mark.parametrize(
    "damage, reason",
    [
        ("absent", "no compiled package"),
        ("missing", "is missing"),
        ("altered", "does not match the manifest's size and SHA-256"),
        ("other-torch", "compiled with torch 2.0.0"),
        ("other-cpu", "compiled for cpu_capability VSX"),
        ("different-scores", "from the exported model's on the check inputs"),
    ],
)
def test_a_missing_or_mismatched_compiled_package_falls_back_with_the_reason(
    compiled, tmp_path, caplog, damage, reason
) -> None:
    path = _copy(compiled, tmp_path, damage)
    pkg = path / aot_compile.COMPILED
    entry = lambda **kv: lambda c: {**c, **kv}  # noqa: E731
    if damage == "absent":
        _rewrite_manifest(path, compiled=None)
        pkg.unlink()
    elif damage == "missing":
        pkg.unlink()
    elif damage == "altered":
        data = bytearray(pkg.read_bytes())
        data[len(data) // 2] ^= 1
        pkg.write_bytes(bytes(data))
    elif damage == "other-torch":
        _rewrite_manifest(path, compiled=lambda c: {**c, "versions": {**c["versions"], "torch": "2.0.0"}})
    elif damage == "other-cpu":
        _rewrite_manifest(path, compiled=entry(cpu_capability="VSX"))
    else:  # a tolerance nothing meets: the load-time comparison with the exported program fails
        _rewrite_manifest(path, compiled=entry(tolerance=-1.0))
    caplog.set_level("INFO", logger="common.compiled")
    p = DLRMPredictor(path)
    assert p.model is p.program and p.runtime.startswith("exported program") and reason in p.runtime
    assert any(reason in r.getMessage() and "serving the exported model" in r.getMessage() for r in caplog.records)
    assert p.self_check()["heldout_rows"] == 1000


def _copy(out: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(out, dst)
    return dst


def _rewrite_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "manifest.json").read_text())
    for key, value in changes.items():
        m[key] = value(m[key]) if callable(value) else value
    (path / "manifest.json").write_text(json.dumps(m))


def test_damaged_or_foreign_artifacts_fail_with_a_clear_message(packaged, tmp_path) -> None:
    _, out, _ = packaged
    truncated = _copy(out, tmp_path, "truncated")
    data = (truncated / "model.pt2").read_bytes()
    (truncated / "model.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(art.ArtifactError, match=r"model.pt2 is \d+ bytes, the manifest says \d+: a truncated"):
        DLRMPredictor(truncated)

    altered = _copy(out, tmp_path, "altered")
    schema = (altered / "schema.json").read_text()
    (altered / "schema.json").write_text(schema.replace('"sum"', '"Sum"', 1))
    with pytest.raises(art.ArtifactError, match="does not match the manifest's SHA-256"):
        DLRMPredictor(altered)

    newer = _copy(out, tmp_path, "newer")
    _rewrite_manifest(newer, format_version=2)
    with pytest.raises(art.ArtifactError, match="version 2; this loader reads .* version 1"):
        DLRMPredictor(newer)

    other_torch = _copy(out, tmp_path, "other-torch")
    _rewrite_manifest(other_torch, versions=lambda v: {**v, "torch": "2.0.0"})
    with pytest.raises(art.ArtifactError, match="packaged with torch 2.0.0, this environment has"):
        DLRMPredictor(other_torch)

    with pytest.raises(art.ArtifactError, match="package a model first"):
        DLRMPredictor(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="cannot serve .*truncated"):
        serve_main(["--artifact", str(truncated)])


def _repack(src: Path, dst: Path, extra: dict[str, bytes] | None = None, edit=None) -> None:
    """Copy a .pt2 archive, adding entries or editing JSON ones (``edit(name, dict)``)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = zin.read(info)
            if edit and info.filename.endswith("_config.json"):
                data = json.dumps(edit(info.filename, json.loads(data))).encode()
            zout.writestr(info, data)
        for name, data in (extra or {}).items():
            zout.writestr(f"{root}/{name}", data)


def test_archives_that_would_unpickle_are_refused(packaged, tmp_path) -> None:
    _, out, _ = packaged
    with_object = tmp_path / "object.pt2"
    _repack(out / "model.pt2", with_object, extra={"data/constants/custom_obj_0": b"\x80\x04K\x01."})
    with pytest.raises(art.ArtifactError, match="unexpected entry .*custom_obj_0"):
        art.check_pickle_free(with_object)

    def pickle_first(name: str, config: dict) -> dict:
        if "weights" in name:
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
        return config

    pickled = tmp_path / "pickled.pt2"
    _repack(out / "model.pt2", pickled, edit=pickle_first)
    with pytest.raises(art.ArtifactError, match="as pickles; refusing"):
        art.check_pickle_free(pickled)
    # The check runs on load, after the checksums: a re-checksummed copy is still refused.
    bad = _copy(out, tmp_path, "re-checksummed")
    shutil.copy(pickled, bad / "model.pt2")
    _rewrite_manifest(
        bad,
        files=lambda f: {
            **f,
            "model.pt2": {"sha256": art.sha256(bad / "model.pt2"), "bytes": (bad / "model.pt2").stat().st_size},
        },
    )
    with pytest.raises(art.ArtifactError, match="as pickles; refusing"):
        DLRMPredictor(bad)


@pytest.fixture(scope="module")
def client(packaged):
    _, out, _ = packaged
    app, _, batcher = create_dlrm_app(out, max_request_bytes=20_000, max_rows=8)
    with ready_client(app, batcher) as c:
        yield c


@pytest.fixture(scope="module")
def good_row(packaged) -> dict:
    return art.read_heldout(packaged[1])[0]["features"]


def test_bad_requests_get_4xx_naming_the_field(client, good_row) -> None:
    def post(rows=None, body=None):
        if body is not None:
            return client.post("/predict", content=body, headers={"content-type": "application/json"})
        return client.post("/predict", json={"rows": rows})

    assert post([good_row]).status_code == 200
    cases = [
        ([{k: v for k, v in good_row.items() if k != "item_id"}], "rows[0].item_id: Field required"),
        ([{**good_row, "bogus": 1}], "rows[0].bogus: Extra inputs are not permitted"),
        ([good_row, {**good_row, "item_id": 1682}], "rows[1].item_id: Input should be less than or equal to 1681"),
        ([{**good_row, "item_id": -1}], "rows[0].item_id: Input should be greater than or equal to 0"),
        ([{**good_row, "item_id": "50"}], "rows[0].item_id: Value error, expected an integer ID, got str"),
        ([{**good_row, "item_id": 3.5}], "rows[0].item_id: Value error, expected an integer ID, got 3.5"),
        ([{**good_row, "history": [1, 2, True]}], "rows[0].history[2]: Value error, expected an integer ID"),
        ([{**good_row, "user_activity": "high"}], "rows[0].user_activity: Input should be a valid number"),
        ([{**good_row, "user_activity": 1e7}], "rows[0].user_activity: Input should be less than or equal to"),
        ([], "rows: List should have at least 1 item"),
        ([good_row] * 9, "rows: List should have at most 8 items"),
    ]
    for rows, message in cases:
        r = post(rows)
        assert r.status_code == 422 and r.json()["error"].startswith(message), (message, r.text)
    nan = json.dumps({"rows": [{**good_row, "user_activity": 0.5}]}).replace("0.5", "NaN", 1)
    assert "NaN" in nan
    r = post(body=nan)
    assert r.status_code == 422 and "finite number" in r.json()["error"]
    r = post(body="{not json")
    assert r.status_code == 422 and "JSON" in r.json()["error"]
    r = post(body=json.dumps({"rows": [good_row] * 8}) + " " * 20_000)
    assert r.status_code == 413 and "limit is 20000" in r.json()["detail"]
    assert client.get("/predict").status_code == 405
    assert client.get("/nowhere").status_code == 404
    metrics = client.get("/metrics").text
    assert 'requests_total{endpoint="/predict",status="422"}' in metrics
    assert 'requests_total{endpoint="/predict",status="413"} 1.0' in metrics
    assert 'requests_total{endpoint="other",status="404"} 1.0' in metrics


def test_not_ready_until_the_self_check_passes(packaged, monkeypatch) -> None:
    _, out, _ = packaged

    def fails(self):
        raise art.ArtifactError("held-out rows differ from the fp32 model")

    monkeypatch.setattr(DLRMPredictor, "self_check", fails)
    app, _, batcher = create_dlrm_app(out)
    with TestClient(app) as c:
        time.sleep(0.2)
        assert c.get("/health").json()["ready"] is False
        r = c.get("/ready")
        assert r.status_code == 503 and r.json() == {
            "status": "failed",
            "error": "held-out rows differ from the fp32 model",
        }
        r = c.post("/predict", json={"rows": [art.read_heldout(out)[0]["features"]]})
        assert r.status_code == 503 and "held-out rows differ" in r.json()["detail"]
    batcher.close()


def _batcher_calls(enabled: bool, max_rows: int, requests: list[list[str]]) -> tuple[list[int], list]:
    """Submit ``requests`` together while the first model call is still running."""
    calls: list[int] = []
    started = threading.Event()

    def fn(batch: list[list[str]]) -> list:
        calls.append(sum(len(r) for r in batch))
        started.set()
        time.sleep(0.05)
        if any("bad" in rows for rows in batch):
            raise BadRequest("a bad row")
        return [[f"ok:{x}" for x in rows] for rows in batch]

    batcher = DynamicBatcher(fn, max_batch_rows=max_rows, max_wait_ms=0, enabled=enabled)

    async def go() -> list:
        first = asyncio.ensure_future(batcher.submit(requests[0]))
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        rest = [batcher.submit(r) for r in requests[1:]]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    try:
        return calls, asyncio.run(go())
    finally:
        batcher.close()


def test_dynamic_batching_merges_waiting_requests_within_the_limit() -> None:
    reqs = [[f"r{i}"] for i in range(10)]
    calls, results = _batcher_calls(True, 1024, reqs)
    assert calls == [1, 9] and results == [[f"ok:r{i}"] for i in range(10)]
    calls, _ = _batcher_calls(True, 4, reqs)
    assert calls == [1, 4, 4, 1]
    calls, _ = _batcher_calls(False, 1024, reqs)
    assert calls == [1] * 10
    # A request that fails inside a merged batch fails alone; its batch-mates are scored.
    calls, results = _batcher_calls(True, 1024, [["a"], ["b"], ["bad"], ["c"]])
    assert isinstance(results[2], BadRequest) and results[3] == ["ok:c"] and results[1] == ["ok:b"]


def test_fuzzing_the_openapi_schema_finds_no_server_error(client) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    def fuzz(strategy, seen: list[int]):
        @settings(
            max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        @given(case=strategy)
        def run(case) -> None:
            r = case.call()
            seen.append(r.status_code)
            assert r.status_code < 500, f"{case.method} {case.path} -> {r.status_code}: {r.text[:300]}"

        return run

    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    statuses: dict[tuple[str, str], list[int]] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            seen = statuses.setdefault((op.label, mode.value), [])
            try:
                fuzz(op.as_strategy(generation_mode=mode), seen)()
            except Unsatisfiable:  # GET endpoints without parameters have no invalid form
                assert mode is GenerationMode.NEGATIVE
    predict_ok = statuses[("POST /predict", "positive")]
    predict_bad = statuses[("POST /predict", "negative")]
    assert len(predict_ok) >= 30 and predict_ok.count(200) / len(predict_ok) >= 0.9  # valid bodies are scored
    assert len(predict_bad) >= 30 and all(400 <= s < 500 for s in predict_bad)  # invalid ones refused


@pytest.mark.slow
def test_load_benchmark_quick(packaged, tmp_path) -> None:
    from bench import serving_load

    _, out, _ = packaged
    res = serving_load.main(
        ["--quick", "--artifact", str(out), "--concurrency", "1,4", "--out", str(tmp_path / "load.json")]
    )
    levels = res["batching"] + res["no_batching"]
    assert [r["concurrency"] for r in levels] == [1, 4, 4]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in levels)
    assert json.loads((tmp_path / "load.json").read_text())["quick"] is True


def test_client_cli_scores_a_file_and_reports_refusals(packaged, tmp_path) -> None:
    _, out, _ = packaged
    rows = [r["features"] for r in art.read_heldout(out)[:3]]
    good, bad = tmp_path / "rows.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad.write_text(json.dumps({**rows[0], "item_id": 10**9}) + "\n")
    proc, url = spawn(["-m", "inference_legacy.dlrm_predict", "--artifact", str(out)])
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        r = subprocess.run(
            [sys.executable, "-m", "inference_legacy.dlrm_client", "--url", url, "--input", str(good)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"scored 3 rows from {good}" in r.stdout
        scores = [json.loads(x)["score"] for x in (tmp_path / "rows.jsonl.scores.jsonl").read_text().splitlines()]
        assert len(scores) == 3 and all(0 < s < 1 for s in scores)
        r = subprocess.run(
            [sys.executable, "-m", "inference_legacy.dlrm_client", "--url", url, "--input", str(bad)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode != 0 and "HTTP 422" in r.stderr and "item_id" in r.stderr
        with DLRMClient(url) as c, pytest.raises(ServiceError, match="rows\\[0\\].item_id"):
            c.predict([{**rows[0], "item_id": 10**9}])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("manifest_list", "manifest.json: holds a JSON list, not an object"),
        ("files_string", "'files' must be an object, got str"),
        ("file_entry_string", r"files\['model.pt2'\] must be \{'bytes': int, 'sha256': str\}"),
        ("schema_list", "schema.json is not a feature schema"),
        ("schema_cardinality", "feature 'user_id' has cardinality 944, but the model's table 'user_id' has 943 rows"),
        ("weights_config", "is not a weights config"),
    ],
)
def test_damaged_artifact_metadata_is_named_not_a_traceback(packaged, tmp_path, damage: str, message: str) -> None:
    """Issue 17.9: every piece of artifact metadata is validated before use, the schema against the model's tables."""
    _, out, _ = packaged
    bad = _copy(out, tmp_path, damage)

    def rechecksum(name: str) -> None:
        _rewrite_manifest(
            bad, files=lambda f: {**f, name: {"sha256": art.sha256(bad / name), "bytes": (bad / name).stat().st_size}}
        )

    if damage == "manifest_list":
        (bad / "manifest.json").write_text("[]")
    elif damage == "files_string":
        _rewrite_manifest(bad, files="model.pt2")
    elif damage == "file_entry_string":
        _rewrite_manifest(bad, files=lambda f: {**f, "model.pt2": "abc"})
    elif damage == "schema_list":
        (bad / "schema.json").write_text("[]")
        rechecksum("schema.json")
    elif damage == "schema_cardinality":
        schema = json.loads((bad / "schema.json").read_text())
        schema["sparse"][0]["cardinality"] += 1
        (bad / "schema.json").write_text(json.dumps(schema))
        rechecksum("schema.json")
    else:
        _repack(out / "model.pt2", bad / "model.pt2", edit=lambda name, config: [] if "weights" in name else config)
        rechecksum("model.pt2")
    with pytest.raises(art.ArtifactError, match=message):
        DLRMPredictor(bad)


def test_bad_ports_and_threads_fail_before_the_model_loads(packaged, monkeypatch) -> None:
    """Issue 17.8: a port in use or out of range and --threads 0 are one line, before loading anything."""
    import socket

    from integration.service import main as service_main

    _, out, _ = packaged
    monkeypatch.setattr(art, "load_program", lambda *a, **k: pytest.fail("the model loaded before the port check"))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        for main, extra in ((serve_main, ["--artifact", str(out)]), (service_main, ["--artifacts", str(out)])):
            with pytest.raises(SystemExit, match=rf"cannot listen on 127.0.0.1:{port}: Address already in use"):
                main([*extra, "--port", str(port)])
            with pytest.raises(SystemExit, match="--port 70000 is not a TCP port"):
                main([*extra, "--port", "70000"])
    finally:
        busy.close()
    with pytest.raises(SystemExit):
        serve_main(["--artifact", str(out), "--threads", "0"])


def test_a_client_that_disconnects_is_not_counted_as_a_server_error() -> None:
    from inference_legacy.server import Metrics, _LimitAndMeasure

    async def app(scope, receive, send) -> None:  # never reached: the client left while sending its body
        raise AssertionError("the app ran")

    metrics = Metrics()
    middleware = _LimitAndMeasure(app, 1000, metrics, lambda: {"/predict"})
    messages = iter([{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        raise AssertionError("nothing is sent to a client that left")

    asyncio.run(middleware({"type": "http", "path": "/predict", "headers": []}, receive, send))
    assert metrics.requests.labels("/predict", "499")._value.get() == 1
    assert metrics.requests.labels("/predict", "500")._value.get() == 0


@pytest.mark.slow
def test_slow_clients_are_cut_off_and_the_service_stays_up(packaged) -> None:
    """Issue 17.8, slowloris: a body that never finishes got no answer and held its connection for
    ever, and so did headers sent a byte at a time. Now the body gets a 408 and the connection a close."""
    import socket

    _, out, _ = packaged
    proc, url = spawn(["-m", "inference_legacy.dlrm_predict", "--artifact", str(out), "--client-timeout", "1"])
    host, port = url.rsplit("/", 1)[1].split(":")
    try:
        body = socket.create_connection((host, int(port)), timeout=10)
        body.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"rows": ['
        )
        t0 = time.monotonic()
        answer = b""
        while chunk := body.recv(4096):  # the server closes the connection after its answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer, answer
        assert time.monotonic() - t0 < 5
        headers = socket.create_connection((host, int(port)), timeout=10)
        t0, closed = time.monotonic(), False
        for byte in b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                headers.sendall(bytes([byte]))
            except OSError:  # reset by the server
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - t0 > 4:
                break
        if not closed:
            headers.settimeout(3)
            closed = headers.recv(1) == b""
        assert closed and time.monotonic() - t0 < 6, "a client trickling its headers kept its connection"
        client = DLRMClient(url)
        assert client.health()["status"] == "ok"
        assert 'requests_total{endpoint="/predict",status="408"} 1.0' in client.metrics()
        body.close()
        headers.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_big_bodies_are_validated_off_the_event_loop() -> None:
    """Issue 17.8: 4 MB bodies were validated on the event loop, so /health waited behind them
    (p50 0.94 s with seven such clients). Bodies over 64 KB are validated in a worker thread now, with
    the same 422 naming the field."""
    from fastapi import Depends, FastAPI
    from pydantic import BaseModel, field_validator

    from inference_legacy.server import INLINE_BODY_BYTES, JSONBody

    threads: list[str] = []

    class Row(BaseModel):
        x: int

        @field_validator("x")
        @classmethod
        def where(cls, v: int) -> int:
            threads.append(threading.current_thread().name)
            return v

    class Rows(BaseModel):
        rows: list[Row]

    app = FastAPI()
    body = JSONBody(app, Rows)

    @app.post("/rows", openapi_extra=body.openapi)
    async def rows(req: Rows = Depends(body)) -> dict:  # noqa: B008
        return {"n": len(req.rows), "loop": threading.current_thread().name}

    with TestClient(app) as c:
        small = c.post("/rows", json={"rows": [{"x": 1}]}).json()
        assert small["n"] == 1 and threads == [small["loop"]]  # inline: a thread hop costs more
        threads.clear()
        n = INLINE_BODY_BYTES // 8
        big = c.post("/rows", json={"rows": [{"x": i} for i in range(n)]}).json()
        assert big["n"] == n and set(threads) == {"validate-body_0"} != {big["loop"]}
        bad = c.post("/rows", json={"rows": [{"x": i} for i in range(n)] + [{"x": "no"}]})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "rows", n, "x"]
        bad = c.post("/rows", content=b"{" * 70_000, headers={"content-type": "application/json"})
        assert bad.status_code == 422 and "Invalid JSON" in bad.json()["detail"][0]["msg"]
        spec = c.get("/openapi.json").json()
        assert spec["paths"]["/rows"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Rows"
        }
        assert {"Rows", "Row"} <= set(spec["components"]["schemas"])
