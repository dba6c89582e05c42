"""The rules that say whether exported stages fit together, each written once.

``integration.loader.create_pipeline`` applies them as it loads, before anything is served: every
broken rule is an :class:`ArtifactMismatch` naming the artifact, what differs and what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from common.data.dataset import InteractionData, id_key
from common.features import FeatureSchema


class ArtifactMismatch(ValueError):
    """The exported stages don't fit together; the message says which part and what to do."""


def serving_device(device: str) -> None:
    if device not in ("auto", "cpu"):
        raise ArtifactMismatch(
            f"device {device!r}: the packaged rankers run on CPU (FBGEMM's CPU kernels), so the "
            f"pipeline's stages must too; pass device='cpu' or 'auto'"
        )


def same_data(what: str, path: Path, fingerprint: str, ds: InteractionData, fix: str) -> None:
    """An export trained on the data set being served (by fingerprint)."""
    if fingerprint != ds.fingerprint:
        raise ArtifactMismatch(
            f"{what} {path} was trained on data with fingerprint {fingerprint[:16]}, not {ds.name}'s "
            f"{ds.fingerprint[:16]}: {fix}"
        )


def same_items(what: str, path: Path, known: dict | list, ds: InteractionData, fix: str) -> None:
    """An export that knows every item of the data set (``known``: its raw item IDs, or a map from them)."""
    missing = [id_key(i) for i in ds.item_raw_ids if id_key(i) not in known]
    if missing:
        raise ArtifactMismatch(f"{what} {path} lacks {len(missing)} of {ds.name}'s items (e.g. {missing[:3]}); {fix}")


def item_item_fits(path: Path, manifest: dict, ds: InteractionData) -> None:
    """The item-to-item export fitted on this data, with its item order."""
    if manifest["data_fingerprint"] != ds.fingerprint or manifest["item_raw_ids"] != [
        id_key(i) for i in ds.item_raw_ids
    ]:
        raise ArtifactMismatch(
            f"item-to-item export {path} was fitted on other data (fingerprint "
            f"{manifest['data_fingerprint'][:16]}, not {ds.name}'s {ds.fingerprint[:16]}): fit it "
            f"again with python -m retrieval.item_item --out {path.parent}"
        )


def known_source(candidate_source: str, names: list[str]) -> None:
    if candidate_source not in [*names, "union", "ensemble", "union ranker"]:
        raise ArtifactMismatch(
            f"candidate source {candidate_source!r}: this pipeline has {names} (or 'union', 'ensemble', 'union ranker')"
        )


def ranker_saw_this_retrieval(path: Path, manifest: dict, retrieval: Path, retrieval_files: dict) -> None:
    """The ranker's retrieval_score feature came from the retrieval model being served."""
    used = manifest["source"].get("retrieval_files")
    if used is None:
        raise ArtifactMismatch(
            f"ranking artifact {path} was trained without a retrieval export (its retrieval_score "
            f"feature was always 0); train it with python -m golden_training.train_dlrm --retrieval-export {retrieval}"
        )
    if used != retrieval_files:
        raise ArtifactMismatch(
            f"ranking artifact {path} learned its retrieval_score feature from another retrieval model "
            f"({manifest['source']['retrieval_export']}), not {retrieval}: serve the export it was trained "
            f"with, or retrain the ranker with --retrieval-export {retrieval}"
        )


def ranker_saw_these_candidates(path: Path, manifest: dict, name: str, export: Path, digest: str) -> None:
    """A source's own ranker was trained on that source's candidates, from these weights."""
    trained_on = manifest["source"].get("candidates_weights")
    if trained_on is not None and trained_on != digest:
        raise ArtifactMismatch(
            f"ranking artifact {path} was trained on the candidates of another {name} model "
            f"({manifest['source']['candidates_export']}), not {export}: retrain it with "
            f"python -m golden_training.train_dlrm --candidates-export {export}"
        )


def one_feature_store(manifests: dict[Path, dict]) -> dict:
    """Every ranker builds its features the same way (one store serves them all); returns that way."""
    feats = {json.dumps(m["features"], sort_keys=True) for m in manifests.values()}
    if len(feats) > 1:
        raise ArtifactMismatch(
            f"the rankers ({', '.join(str(p) for p in manifests)}) build their features differently "
            f"({sorted(feats)}); they must share one feature store"
        )
    return next(iter(manifests.values()))["features"]


def ranker_reads_the_store(path: Path, schema: FeatureSchema, manifest: dict, store_schema: FeatureSchema) -> None:
    """The ranker's inputs are what the feature store builds, with one table dim (DLRM's rule)."""
    if schema != store_schema:
        raise ArtifactMismatch(
            f"ranking artifact {path} expects features {_describe(schema)}, but the feature store builds "
            f"{_describe(store_schema)}: repackage the ranker with this checkout"
        )
    dims = {t["dim"] for t in manifest["dims"]["tables"].values()}
    if dims != {manifest["dims"]["embedding_dim"]}:
        raise ArtifactMismatch(
            f"ranking artifact {path}: table dims {sorted(dims)} differ from its embedding_dim "
            f"{manifest['dims']['embedding_dim']}; DLRM needs one dim"
        )


def same_id_maps(path: Path, user_raw_ids: np.ndarray, item_raw_ids: np.ndarray, ds: InteractionData) -> None:
    if not np.array_equal(user_raw_ids, ds.user_raw_ids) or not np.array_equal(item_raw_ids, ds.item_raw_ids):
        raise ArtifactMismatch(
            f"retrieval export {path} maps raw IDs to indices differently from {ds.name}: its "
            f"features.json is from another data set; export it again"
        )


def choice_still_stands(path: Path, chosen_among: dict, models: dict, fix: str) -> None:
    """The served system was chosen among exactly these models (their digests)."""
    if chosen_among == models:
        return
    changed = [
        f"{kind[:-1]} {name}"
        for kind in ("sources", "rankers")
        for name in sorted(set(models[kind]) | set(chosen_among.get(kind, {})))
        if models[kind].get(name) != chosen_among.get(kind, {}).get(name)
    ]
    raise ArtifactMismatch(
        f"{path} chose the served system among other models than these ({', '.join(changed)} changed since): {fix}"
    )


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _describe(schema: FeatureSchema) -> str:
    return ", ".join(f"{f.name}[{f.cardinality}]" for f in schema.sparse) + " + " + ", ".join(schema.dense_names)
