"""Package a trained DLRM into a self-contained, quantized serving artifact.

    python -m inference_legacy.dlrm_packager                          # runs/ranking -> runs/serving/dlrm-int8
    python -m inference_legacy.dlrm_packager --quantize int4 --out runs/serving/dlrm-int4
    python -m inference_legacy.dlrm_packager --quantize fp16 --overwrite

Loads the latest checkpoint of ``golden_training/train_dlrm.py`` into one unsharded model,
quantizes its embedding tables with TorchRec's inference quantization (INT8 by default; INT4,
FP16, or none), exports the whole model with ``torch.export`` and writes an artifact directory
(see ``inference_legacy/artifact.py``). It then loads the artifact back from disk, the way the
server does, scores every held-out test row (each test user's next item and 100 sampled
negatives) with it and with the eager fp32 model, and records in the manifest:
the largest probability difference (the tolerance the artifact met), both AUCs, and the tables'
size against the fp32 checkpoint's.

The exported program takes ``dense [B, num_dense]`` float32, ``values [N]`` int64 and
``lengths [num_sparse * B]`` int64 (feature-major, in schema order: a KeyedJaggedTensor's
layout) and returns click probabilities ``[B]``. ``B`` is dynamic, 1 included.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import Dim
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from common.checkpoint import DamagedCheckpoint, UnsafeCheckpoint
from common.data.download import file_digest
from common.export import read_manifest
from common.features import FeatureBatch, FeatureSchema
from common.metrics import BinaryMetrics
from golden_training.evaluation import eval_set, make_batch
from golden_training.model import PRECISIONS, DLRMByUser, DLRMServing, TorchRecDLRM, quantize
from inference_legacy import artifact as art
from inference_legacy.aot_compile import compile_artifact
from prediction.predict_using_torchrec import Ranker

# how far the per-user program may be from the per-row one: the same arithmetic, grouped differently
BY_USER_TOLERANCE = 1e-5


def table_bytes(model: nn.Module) -> int:
    """Bytes of the embedding tables as served: FBGEMM's packed rows (scale and bias included)
    for a quantized model, the fp32 weights otherwise."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantEmbeddingBagCollection):
            total += sum(tbe.weights_host.numel() * tbe.weights_host.element_size() for tbe in m._emb_modules)
        elif isinstance(m, EmbeddingBagCollection):
            total += sum(p.numel() * p.element_size() for p in m.parameters())
    return total


@torch.no_grad()
def _score(fn, batches: list[FeatureBatch]) -> np.ndarray:
    return torch.cat([fn(*art.program_inputs(b)).reshape(-1) for b in batches]).numpy()


def _auc(probs: np.ndarray, labels: np.ndarray) -> float:
    bm = BinaryMetrics()
    bm.update(torch.from_numpy(probs), torch.from_numpy(labels))
    return bm.compute(gather=False)["auc"]


def package(
    ranker: Ranker,
    out: str | Path,
    precision: str = "int8",
    heldout_rows: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, object]:
    """Quantize, export, write, reload and verify a trained ranker; returns the manifest. The
    held-out rows are every test user's next item plus the evaluation's sampled negatives."""
    cfg, features = ranker.cfg, ranker.features
    ev = eval_set(ranker.split, features, "test", cfg, ranker.retr)
    batches, labels = [], []
    for lo in range(0, len(ev.auc), 8192):
        b = make_batch(
            features, ev.auc.take(np.arange(lo, min(lo + 8192, len(ev.auc)))), ev.queries, ranker.retr, cfg.history_len
        )
        batches.append(FeatureBatch(b.dense_features, b.sparse_features))
        labels.append(b.labels.numpy())
    source = {
        "checkpoint": str(ranker.checkpoint),
        "dataset": cfg.dataset,
        "data_fingerprint": ranker.dataset.fingerprint,
    }
    return package_model(
        ranker.model.model,
        features.schema,
        cfg,
        source,
        batches,
        np.concatenate(labels),
        out,
        precision,
        heldout_rows,
        seed,
        overwrite,
        user_features=features.user_features,
    )


def _export_programs(
    dlrm: TorchRecDLRM,
    served: nn.Module,
    schema: FeatureSchema,
    example: FeatureBatch,
    precision: str,
    user_features: list[str] | None,
):
    """``torch.export`` of the served per-row program, and of the per-user one with ``user_features``
    (else None); every batch dimension dynamic, 1 included."""
    batch = Dim("batch", min=1, max=1 << 20)
    program = art.export_program(
        served,
        art.program_inputs(example),
        dynamic_shapes={
            "dense": {0: batch},
            "values": {0: Dim("nnz", min=0, max=1 << 30)},
            "lengths": {0: len(schema.sparse) * batch},
        },
    )
    by_user = None
    if user_features:
        rows, users = Dim("rows", min=1, max=1 << 24), Dim("users", min=1, max=1 << 20)
        by_user = art.export_program(
            DLRMByUser(dlrm, schema, user_features, precision).eval(),
            art.by_user_inputs(schema, user_features, art.program_inputs(example)),
            dynamic_shapes={
                "dense": {0: rows},
                "row_user": {0: rows},
                "user_values": {0: Dim("user_nnz", min=0, max=1 << 30)},
                "user_lengths": {0: sum(n in user_features for n in schema.sparse_names) * users},
                "values": {0: Dim("nnz", min=0, max=1 << 30)},
                "lengths": {0: sum(n not in user_features for n in schema.sparse_names) * rows},
            },
        )
    return program, by_user


def _manifest(
    schema: FeatureSchema,
    cfg: Any,
    source: dict[str, object],
    precision: str,
    user_features: list[str] | None,
    fp32_bytes: int,
    served_bytes: int,
) -> dict[str, object]:
    """What the artifact's manifest says of the model: where it came from, how its features are built,
    its quantization, its programs' inputs and outputs, its dims and sizes (the writer adds the files
    and the verification)."""
    return {
        "model": "dlrm",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            **source,
            "retrieval_export": cfg.retrieval_export,
            # which retrieval model produced the retrieval_score feature (its files' checksums)
            "retrieval_files": _export_files(cfg.retrieval_export),
            # whose candidates it was trained to re-rank (None: retrieval's), and which weights
            "candidates_export": getattr(cfg, "candidates_export", None),
            "candidates_weights": _weights_digest(getattr(cfg, "candidates_export", None)),
        },
        # how the feature rows were built, for whoever builds them at serving time
        "features": {
            "history_len": cfg.history_len,
            "sequence_features": cfg.sequence_features,
            "trend_days": cfg.trend_days,
            "history_match": cfg.history_match,
        },
        "quantization": {
            "embeddings": precision,
            "kernel": "FBGEMM IntNBitTableBatchedEmbeddingBagsCodegen"
            if precision != "none"
            else "fp32 nn.EmbeddingBag",
            "row_alignment_bytes": 4,
        },
        "exporter": "torch.export",
        "inputs": {
            "dense": f"float32 [B, {len(schema.dense)}] in schema order",
            "values": "int64 [N]: the sparse IDs, feature-major",
            "lengths": f"int64 [{len(schema.sparse)} * B]: IDs per (feature, example), feature-major",
        },
        "output": "float32 [B] click probability",
        **(
            {
                "by_user": {
                    "file": art.BY_USER,
                    "user_features": list(user_features),
                    "inputs": "dense [B, dense], row_user int64 [B] (each row's user), user_values, user_lengths "
                    "[user features * U] (each user's IDs once), values, lengths [other features * B] (each "
                    "row's own IDs); feature-major in schema order: inference_legacy.artifact.by_user_inputs",
                }
            }
            if user_features
            else {}
        ),
        "dims": {
            "embedding_dim": cfg.embedding_dim,
            "dense_arch": list(cfg.dense_arch),
            "over_arch": list(cfg.over_arch),
            "interaction": cfg.interaction,
            "tables": {
                c.name: {"rows": c.num_embeddings, "dim": c.embedding_dim, "features": c.feature_names}
                for c in schema.embedding_bag_configs(cfg.embedding_dim)
            },
        },
        "sizes": {
            "fp32_table_bytes": fp32_bytes,
            "table_bytes": served_bytes,
            "table_reduction": fp32_bytes / served_bytes,
        },
    }


def package_model(
    dlrm: TorchRecDLRM,
    schema: FeatureSchema,
    cfg: Any,
    source: dict[str, object],
    batches: list[FeatureBatch],
    labels_np: np.ndarray,
    out: str | Path,
    precision: str = "int8",
    heldout_rows: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    user_features: list[str] | None = None,
) -> dict[str, object]:
    """Package any fp32 ``TorchRecDLRM`` built by ``cfg`` (train_dlrm's settings, or a run's saved ones) for ``schema``,
    verified on ``batches`` (with their ``labels_np``, for AUC). With ``user_features`` (the sparse
    features that depend on the user alone) the artifact also holds the :class:`DLRMByUser` program."""
    fp32 = DLRMServing(dlrm, schema.sparse_names).eval()
    served = DLRMServing(quantize(dlrm, precision), schema.sparse_names).eval()
    t0 = time.perf_counter()
    program, by_user = _export_programs(dlrm, served, schema, batches[0], precision, user_features)
    export_s = time.perf_counter() - t0

    fp32_bytes, served_bytes = table_bytes(fp32), table_bytes(served)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(labels_np), size=min(heldout_rows, len(labels_np)), replace=False))
    p_fp32 = _score(fp32, batches)
    # The held-out file: rows as a client sends them, with the eager fp32 model's probabilities.
    rows = []
    for lo, b in zip(range(0, len(labels_np), 8192), batches):
        mine = pick[(pick >= lo) & (pick < lo + len(b.dense))] - lo
        if len(mine):
            recs = schema.to_records(FeatureBatch(b.dense[mine], _select(b.sparse, mine)))
            rows += [
                {"features": r, "label": float(labels_np[lo + i]), "fp32": float(p_fp32[lo + i])}
                for r, i in zip(recs, mine)
            ]
    manifest = _manifest(schema, cfg, source, precision, user_features, fp32_bytes, served_bytes)

    def verify(tmp: Path) -> dict[str, object]:
        """Load what was written the way the server loads it, and score every held-out row."""
        loaded = art.load_program(tmp, art.read_manifest(tmp))
        p_art = _score(loaded, batches)
        diff = np.abs(p_art - p_fp32)
        auc_fp32, auc_art = _auc(p_fp32, labels_np), _auc(p_art, labels_np)
        extra = {}
        if user_features:
            # the same quantized model with the lookups split: equal to the per-row program
            per_user = art.load_program(tmp, art.read_manifest(tmp), art.BY_USER)
            with torch.no_grad():
                got = torch.cat(
                    [per_user(*art.by_user_inputs(schema, user_features, art.program_inputs(b))) for b in batches]
                ).numpy()
            gap = float(np.abs(got - p_art).max())
            if not gap <= BY_USER_TOLERANCE:
                raise art.ArtifactError(
                    f"the per-user program differs from the per-row one by {gap:.2e} on the held-out rows "
                    f"(limit {BY_USER_TOLERANCE:.0e}); package_model(..., user_features=None) packages without it"
                )
            extra = {"by_user": {**manifest["by_user"], "max_abs_diff_vs_program": gap}}
        return {
            "verification": {
                "rows": int(len(diff)),
                "split": source.get("split", "test"),
                "max_abs_diff": float(diff.max()),
                "p99_abs_diff": float(np.quantile(diff, 0.99)),
                "tolerance": float(diff.max()),
                "auc_fp32": auc_fp32,
                "auc_artifact": auc_art,
                "auc_change": auc_art - auc_fp32,
                "export_seconds": export_s,
            },
            "sizes": {**manifest["sizes"], "program_bytes": (tmp / art.PROGRAM).stat().st_size},
            **extra,
        }

    path = art.write_artifact(out, program, schema, manifest, rows, overwrite=overwrite, verify=verify, by_user=by_user)
    manifest = read_manifest(path, "package it again", verify_files=False)  # as written, with its verification
    return manifest


def _weights_digest(export: str | None) -> str | None:
    return file_digest(Path(export) / "weights.pt", "sha256") if export else None


def _export_files(export: str | None) -> dict[str, str] | None:
    if not export:
        return None
    return read_manifest(export, "train the retrieval export first", verify_files=False)["files"]


def _select(kjt: KeyedJaggedTensor, rows: np.ndarray) -> KeyedJaggedTensor:
    """The examples ``rows`` of a KJT, every key."""
    parts = {k: jt for k, jt in kjt.to_dict().items()}
    values, lengths = [], []
    for k in kjt.keys():
        lens, offs = parts[k].lengths(), parts[k].offsets()
        for r in rows.tolist():
            values.append(parts[k].values()[offs[r] : offs[r + 1]])
        lengths.append(lens[torch.as_tensor(rows)])
    return KeyedJaggedTensor.from_lengths_sync(kjt.keys(), torch.cat(values), torch.cat(lengths))


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoints",
        default="runs/ranking/checkpoints/dlrm",
        help="checkpoint directory of a train_dlrm run (default: %(default)s)",
    )
    p.add_argument(
        "--data-dir", default=None, help="MovieLens cache (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
    )
    p.add_argument(
        "--quantize", default="int8", choices=list(PRECISIONS), help="embedding precision (default: %(default)s)"
    )
    p.add_argument("--out", default=None, help="artifact directory (default: runs/serving/dlrm-<quantize>)")
    p.add_argument(
        "--heldout-rows",
        type=int,
        default=1000,
        help="held-out request rows stored in the artifact for self-checks (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also compile it with AOTInductor (model.aoti.pt2; python -m inference_legacy.aot_compile does it later)",
    )
    a = p.parse_args(argv)
    out = Path(a.out or f"runs/serving/dlrm-{a.quantize}")
    try:
        ranker = Ranker(a.checkpoints, a.data_dir, quantize="none")
    except (UnsafeCheckpoint, DamagedCheckpoint) as err:  # one line: which file, and why it is not loaded
        raise SystemExit(f"cannot package {a.checkpoints}: {err}") from None
    m = package(ranker, out, a.quantize, a.heldout_rows, overwrite=a.overwrite)
    v, s = m["verification"], m["sizes"]
    print(f"packaged {out} ({a.quantize} embeddings, torch.export; model.pt2 {s['program_bytes'] / 1e6:.3f} MB)")
    print(
        f"embedding tables: fp32 checkpoint {s['fp32_table_bytes'] / 1e6:.3f} MB -> artifact "
        f"{s['table_bytes'] / 1e6:.3f} MB ({s['table_reduction']:.2f}x smaller)"
    )
    print(
        f"test AUC over {v['rows']:,} held-out rows: eager fp32 {v['auc_fp32']:.4f} | artifact "
        f"{v['auc_artifact']:.4f} ({v['auc_change']:+.4f})"
    )
    print(
        f"max |p_artifact - p_fp32| {v['max_abs_diff']:.2e} (p99 {v['p99_abs_diff']:.2e}): the tolerance written "
        f"to {out / art.MANIFEST}"
    )
    if "by_user" in m:
        print(
            f"per-user program {art.BY_USER} (each user's {', '.join(m['by_user']['user_features'])} looked up "
            f"once for all their candidates): max |per-user - per-row| {m['by_user']['max_abs_diff_vs_program']:.1e}"
        )
    if a.compile:
        m["compiled"] = c = compile_artifact(out)
        print(
            f"compiled {out / c['file']} with AOTInductor in {c['compile_seconds']:.0f} s: max |compiled - "
            f"exported| {c['max_abs_diff']:.1e} over the held-out rows"
        )
        if "by_user" in c:
            print(
                f"compiled {out / c['by_user']['file']} in {c['by_user']['compile_seconds']:.0f} s: max |compiled - "
                f"exported| {c['by_user']['max_abs_diff']:.1e}"
            )
    return m


if __name__ == "__main__":
    main()
