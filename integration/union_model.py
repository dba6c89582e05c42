"""The union ranker as trained and as served: its rows, its artifact, its order.

    lists = union_lists(sources, weights, users, histories, k=100)   # candidates/provenance.py
    batch = list_batch(store.features, ranker.schema, lists, rows, histories, now, (queries, item_vectors),
                       history_times=times)                           # times: the store's timed_history
    ranker = UnionRanker.load(root / ARTIFACT)
    items, logits = ranker.order(lists, rows, batch)                  # each list, best first

A list is one user's union of every source's top 100 with each candidate's provenance
(candidates/provenance.py); its rows are the per-source rankers' features of each (user, candidate)
(golden_training/ranking_data.py, read from the feature store's tables, with the user's history as
the store holds it and the store's "now"; on a log with repeats, the days since and between the user's
purchases of the candidate and the share of their baskets that held it, from the history's timestamps)
plus the provenance features. :func:`list_batch` builds them, once, for both sides:
integration/union_ranker.py trains on the validation users' lists and the pipeline
(integration/pipeline.py) serves a request's lists through the same call, so a list is
scored the same way in training and in serving (tests/test_integration.py checks it, list by list).

The artifact (``<artifacts>/serving/union-ranker``): ``model.pt`` (the DLRM's weights and the dense
features' mean and scale) and ``manifest.json``, written last, which names what the lists were made
of (every source's digest, the ensemble's weights, the feature store's settings, the data) and the
cross-fitted validation figures the served system is chosen on. Compiled
(``python -m integration.union_model --artifacts runs``, the demo's last stage): ``model.aoti.pt2``,
the model with the standardisation as one AOTInductor program (:class:`UnionProgram`), the list rows
it was checked on (``check_inputs.pt``) and the manifest's ``compiled`` entry; :meth:`UnionRanker.load`
serves it where it matches this environment and reproduces the eager model on those rows (on the
ml-100k and Complete Journey artifacts: the same logits to the bit), else the eager model, and saving a
retrained model removes the old package.

INT8 (``--precision int8``): the package is compiled from the model with its embedding tables
quantized by TorchRec's inference quantization (FBGEMM's INT8 rows, as the per-source rankers'
artifacts, golden_training/model.py's ``quantize``); ``model.pt`` stays fp32, the manifest's ``compiled``
entry records the precision, the tables' bytes both ways, the largest logit difference from the fp32
model on the check rows, and, over every test user's list, both models' NDCG@10 and how many lists
keep the same top 10. It is the package's choice, not the model's: served where the package loads,
fp32 eager where it does not (the runtime says which). Without ``--ids`` the tables are the
categorical features' (a few thousand rows) and INT8 saves little; with ``--ids`` they hold a row per
user and per item.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from candidates.provenance import UnionLists
from common.compiled import Guarded, id_guard, load_package
from common.data.download import file_digest
from common.features import DenseFeature, FeatureBatch, FeatureSchema
from common.metrics import RankingReport, per_user_metrics, target_ranks
from golden_training.model import PRECISIONS, TorchRecDLRM, quantize
from golden_training.ranking_data import Examples, RankingFeatures
from golden_training.sequence_stats import TIMING_FEATURES
from inference_legacy import artifact as art
from integration.compatibility import ArtifactMismatch

log = logging.getLogger(__name__)
ARTIFACT = "serving/union-ranker"  # under the artifacts directory
COMPILED = "model.aoti.pt2"  # the AOTInductor package of UnionProgram (compile_artifact)
CHECK_INPUTS = "check_inputs.pt"  # real list rows the package is checked on, at compile time and each load
NAME = "union ranker"  # the served system's name
# Left out unless --ids: with one target per list and a few hundred lists, a user's and an item's own
# embedding memorise the training lists (on ml-100k's validation: in-sample NDCG@10 0.85, held out 0.05).
ID_FEATURES = ("user_id", "item_id", "history")


def ranker_schema(features: RankingFeatures, provenance: list[str], ids: bool, attention: int = 0) -> FeatureSchema:
    """The per-source rankers' features (without the IDs unless ``ids``, or unless the data set has no
    categorical feature: the DLRM needs a table), the provenance ones, with ``attention`` the target
    attention's (:func:`target_attention`) and, on a data set with repeats, the days since and between
    the user's purchases of the candidate and the share of their baskets that held it
    (golden_training/sequence_stats.py, ``TIMING_FEATURES``)."""
    sparse = [n for n in features.schema.sparse_names if ids or n not in ID_FEATURES]
    sparse = sparse or features.schema.sparse_names
    schema = features.schema.subset(sparse)
    extra = [
        *provenance,
        *(ATTENTION_FEATURES if attention else ()),
        *(TIMING_FEATURES if features.repeat_features else ()),
    ]
    return dataclasses.replace(schema, dense=schema.dense + tuple(DenseFeature(n) for n in extra))


ATTENTION_FEATURES = ("attention_sim", "recent_max_sim", "recent_mean_sim")
# On a log with repeats, added to the logit of a product new to the user (integration/union_ranker.py
# chooses it on validation): the manifest's key.
NEW_ITEM_BONUS = "new_item_bonus"
# The bonuses tried on validation (a log with repeats), in logits: integration/README.md.
BONUS_GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)


def choose_bonus(reports: dict[float, RankingReport], popularity_new: float) -> float:
    """Of the bonuses ``reports`` (cross-fitted validation reports, one per bonus), the one with the best
    NDCG@10 among those whose NDCG@10 on new-item targets is at least ``popularity_new`` (the smaller
    on a tie); 0 where none is. A shop wants "again" first, but no worse than popularity at what
    people have not bought yet."""
    fit = [b for b, rep in reports.items() if rep.means["NDCG@10 new"] >= popularity_new]
    return max(sorted(fit), key=lambda b: reports[b].means["NDCG@10"]) if fit else 0.0


def new_items(schema: FeatureSchema, batch: Batch) -> np.ndarray:
    """1.0 at the rows whose product the user never had (their ``times_had`` feature is 0), else 0."""
    if "times_had" not in schema.dense_names:
        raise ValueError("a new-item bonus needs the times_had feature: a data set with repeats")
    return (batch.dense_features[:, schema.dense_names.index("times_had")] == 0).numpy().astype(np.float32)


ATTENTION_TEMPERATURE = 0.1  # on cosine similarities of the two-tower's L2-normalised item vectors


def target_attention(
    item_vectors: np.ndarray, histories: list[np.ndarray], at: np.ndarray, items: np.ndarray, n: int
) -> dict[str, np.ndarray]:
    """Each candidate against its user's latest ``n`` items (``histories[at[r]]`` for row ``r``), in the
    two-tower's item space: the softmax-weighted similarity (the candidate attends over the history,
    DIN's target attention with the retrieval model's vectors as keys and values), the largest and the
    mean; 0 for a user with no history."""
    recent = [h[-n:] for h in histories]
    lengths = np.array([len(h) for h in recent], dtype=np.int64)
    keys = np.zeros((len(recent), n, item_vectors.shape[1]), np.float32)
    for r, h in enumerate(recent):
        keys[r, : len(h)] = item_vectors[h]
    mask = np.arange(n)[None, :] < lengths[:, None]
    # the similarities list by list ([lists, longest, n]: the rows' keys are never copied per row),
    # the same products to the bit as row by row
    sizes = np.bincount(at, minlength=len(recent))
    place = np.empty(len(at), np.int64)
    place[np.argsort(at, kind="stable")] = np.arange(len(at)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    grid = np.zeros((len(recent), int(sizes.max(initial=0))), np.int64)
    grid[at, place] = items
    sims = np.einsum("bld,bkd->blk", item_vectors[grid], keys)[at, place]
    valid = mask[at]
    has = valid.any(axis=1)
    logits = np.where(valid, sims / ATTENTION_TEMPERATURE, -np.inf)
    logits -= np.where(has, logits.max(axis=1), 0.0)[:, None]
    w = np.where(valid, np.exp(logits), 0.0)
    w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    count = np.maximum(valid.sum(axis=1), 1)
    return {
        "attention_sim": np.where(has, (w * sims).sum(axis=1), 0.0).astype(np.float32),
        "recent_max_sim": np.where(has, np.where(valid, sims, -np.inf).max(axis=1, initial=-np.inf), 0.0).astype(
            np.float32
        ),
        "recent_mean_sim": (np.where(valid, sims, 0.0).sum(axis=1) / count).astype(np.float32),
    }


def list_batch(
    features: RankingFeatures,
    schema: FeatureSchema,
    lists: UnionLists,
    rows: np.ndarray,
    histories: list[np.ndarray],
    now: np.ndarray,
    two_tower: tuple[np.ndarray, np.ndarray] | None,
    targets: np.ndarray | None = None,
    attention: int = 0,
    history_times: list[np.ndarray] | None = None,
) -> Batch:
    """The rows of the lists ``rows`` (indices into ``lists``), list by list, each in union order:
    ``histories[r]`` and ``now[r]`` are list ``r``'s user's history (oldest first) and time,
    ``history_times[r]`` its timestamps (needed where ``schema`` has the timing features);
    ``two_tower``: (each list's query, the item embeddings) for the ``retrieval_score`` feature (0
    without) and the target attention over the latest ``attention`` items (none with 0);
    ``targets[r]``: list ``r``'s target, for the labels (0 without)."""
    rows = np.asarray(rows, dtype=np.int64)
    valid = lists.items[rows] >= 0
    sizes = valid.sum(axis=1)
    of = np.repeat(rows, sizes)  # each row's list
    item = lists.items[rows][valid]
    hists = [histories[r] for r in rows.tolist()]
    lengths = np.array([len(h) for h in hists], dtype=np.int64)
    ends = np.cumsum(lengths)
    at = np.repeat(np.arange(len(rows)), sizes)
    times = None
    if TIMING_FEATURES[0] in schema.dense_names:
        if history_times is None:
            raise ValueError(f"the schema has {', '.join(TIMING_FEATURES)}: pass each history's timestamps")
        times = np.concatenate([history_times[r] for r in rows.tolist()]) if hists else np.zeros(0, np.int64)
        if len(times) != int(lengths.sum()):
            raise ValueError(f"{len(times)} history timestamps for {int(lengths.sum())} history items")
    ex = Examples(
        lists.users[of],
        item,
        np.zeros(len(item), np.float32) if targets is None else (item == targets[of]).astype(np.float32),
        (ends - lengths)[at],
        ends[at],
        of,
        now[of],
        np.concatenate(hists) if hists else np.zeros(0, np.int64),
        hist_times=times,
    )
    qs = (
        np.zeros(len(item), np.float32)
        if two_tower is None
        else np.einsum("nd,nd->n", two_tower[0][of], two_tower[1][item]).astype(np.float32)
    )
    seq = None if features.sequence is None else features.sequence.features(ex)
    cols = features.columns(ex.user, ex.item, ex.history(features.history_len), qs, seq)
    prov = lists.features[rows][valid]
    cols |= {name: prov[:, i] for i, name in enumerate(lists.names)}
    if attention:
        zeros = {name: np.zeros(len(item), np.float32) for name in ATTENTION_FEATURES}
        cols |= zeros if two_tower is None else target_attention(two_tower[1], hists, at, item, attention)
    wanted = set(schema.sparse_names) | set(schema.dense_names)
    fb = schema.from_columns({k: v for k, v in cols.items() if k in wanted}, batch_size=len(item))
    return Batch(dense_features=fb.dense, sparse_features=fb.sparse, labels=torch.from_numpy(ex.label))


def read_manifest(root: str | Path) -> dict | None:
    """The union ranker's manifest under the artifacts directory ``root`` (None: never trained)."""
    path = Path(root) / ARTIFACT / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def why_stale(manifest: dict, models: dict[str, str], weights: dict[str, float] | None) -> str | None:
    """Why a union ranker no longer fits the pipeline (None: it fits): its lists were made of other
    sources (by digest) or fused with other ensemble weights than ``models`` and ``weights``."""
    if manifest["models"] != models:
        changed = sorted(n for n in set(models) | set(manifest["models"]) if models.get(n) != manifest["models"].get(n))
        return f"its lists came from other sources ({', '.join(changed)} changed since it was trained)"
    if manifest["weights"] != weights:
        return f"its lists were fused with other ensemble weights ({manifest['weights']}, now {weights})"
    return None


def pad_lists(rows: torch.Tensor, sizes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows laid out list by list -> ``[lists, longest]`` and its mask."""
    sizes_t = torch.as_tensor(sizes)
    mask = torch.arange(int(sizes_t.max()) if len(sizes) else 0) < sizes_t[:, None]
    out = torch.zeros(mask.shape, dtype=rows.dtype)
    out[mask] = rows
    return out, mask


class UnionProgram(nn.Module):
    """The served union ranker as plain tensors in, logits out: ``(dense, values, lengths)`` (a
    feature batch's dense matrix and its sparse features' values and lengths, feature-major), the
    standardisation of the dense inputs inside. What is exported and compiled (:func:`compile_artifact`)."""

    def __init__(self, model: TorchRecDLRM, mean: torch.Tensor, scale: torch.Tensor, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, list(keys)
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=values, lengths=lengths)
        return self.model((dense - self.mean) / self.scale, kjt)


def program_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch as the program's inputs, as the per-source rankers' programs take theirs."""
    return art.program_inputs(FeatureBatch(batch.dense_features, batch.sparse_features))


@dataclasses.dataclass
class UnionRanker:
    """A trained union ranker: the DLRM, the dense features' mean and scale (inputs are
    standardised by them), and the manifest that says what it was trained on. ``program``: its
    AOTInductor package where one was compiled and checks out (:meth:`load`), else None (eager)."""

    model: TorchRecDLRM
    mean: torch.Tensor
    scale: torch.Tensor
    schema: FeatureSchema
    manifest: dict
    program: Guarded | None = None
    precision: str = "none"  # the program's tables (quantize's precision); the eager model is fp32

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        if self.program is not None:
            return self.program(*program_inputs(batch))
        return self.model((batch.dense_features - self.mean) / self.scale, batch.sparse_features)

    @property
    def reads_times(self) -> bool:
        """Its rows need each history's timestamps (the timing features: a log with repeats)."""
        return TIMING_FEATURES[0] in self.schema.dense_names

    @property
    def runtime(self) -> str:
        if self.program is None:
            return "eager"
        return "AOTInductor" if self.precision == "none" else f"AOTInductor, {self.precision} tables"

    def as_program(self, precision: str = "none") -> UnionProgram:
        """The model as :class:`UnionProgram`, its tables quantized to ``precision`` (a copy)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
        model = self.model if precision == "none" else quantize(self.model, precision)
        return UnionProgram(model, self.mean, self.scale, self.schema.sparse_names).eval()

    def order(
        self, lists: UnionLists, rows: np.ndarray, batch: Batch, new_item_bonus: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The lists ``rows`` (whose rows ``batch`` holds) ordered by the model, best first (ties to
        the earlier place in the union): items and scores ``[len(rows), longest]``, -1 / -inf padding.
        The scores are the logits plus ``new_item_bonus`` (None: the manifest's, 0 without) at the
        products the user never had (``times_had`` 0; on a log with repeats: :func:`new_items`)."""
        sizes = (lists.items[rows] >= 0).sum(axis=1)
        logits = self.logits(batch)
        bonus = self.manifest.get(NEW_ITEM_BONUS, 0.0) if new_item_bonus is None else new_item_bonus
        if bonus:
            logits = logits + bonus * torch.from_numpy(new_items(self.schema, batch))
        scores, mask = pad_lists(logits, sizes)
        scores = scores.masked_fill(~mask, -torch.inf).numpy()
        items = np.where(mask.numpy(), lists.items[rows][:, : mask.shape[1]], -1)
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(items, order, 1), np.take_along_axis(scores, order, 1)

    def save(self, directory: str | Path) -> Path:
        """``model.pt`` then ``manifest.json`` (with the model's SHA-256), each by rename: a crash
        leaves the previous artifact or a model without a manifest, which is never loaded."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in (COMPILED, CHECK_INPUTS):  # the previous model's package: compile_artifact makes a new one
            (directory / stale).unlink(missing_ok=True)
        tmp = directory / f".model.pt.tmp{os.getpid()}"
        torch.save({"state_dict": self.model.state_dict(), "mean": self.mean, "scale": self.scale}, tmp)
        os.replace(tmp, directory / "model.pt")
        manifest = {
            **{k: v for k, v in self.manifest.items() if k != "compiled"},
            "schema": self.schema.to_dict(),
            "model_sha256": file_digest(directory / "model.pt", "sha256"),
        }
        tmp = directory / f".manifest.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, directory / "manifest.json")
        self.manifest = manifest
        return directory

    @classmethod
    def load(cls, directory: str | Path, compiled: bool = True) -> UnionRanker:
        """The artifact in ``directory``; with ``compiled``, its AOTInductor package where the manifest
        lists one that matches this environment and reproduces the eager model on the check rows
        (else eager, the reason logged: common/compiled.py)."""
        directory = Path(directory)
        manifest = json.loads((directory / "manifest.json").read_text())
        sha = file_digest(directory / "model.pt", "sha256")
        if sha != manifest["model_sha256"]:
            raise ArtifactMismatch(
                f"{directory}/model.pt has SHA-256 {sha[:16]}, its manifest {manifest['model_sha256'][:16]} (a "
                f"crash between the two writes, or a copied file): retrain with python -m integration.union_ranker"
            )
        schema = FeatureSchema.from_dict(manifest["schema"])
        arch = manifest["model"]
        model = TorchRecDLRM(schema, arch["embedding_dim"], arch["dense_arch"], arch["over_arch"])
        state = torch.load(directory / "model.pt", weights_only=True)
        model.load_state_dict(state["state_dict"])
        model.eval()
        ranker = cls(model, state["mean"], state["scale"], schema, manifest)
        if compiled and manifest.get("compiled"):
            precision = manifest["compiled"].get("precision", "none")
            try:  # the reference the package is checked against: a quantization that fails here serves eager
                reference = ranker.as_program(precision)
            except Exception as err:
                log.warning(
                    "%s: serving the eager model: no %s reference (%s: %s)",
                    directory,
                    precision,
                    type(err).__name__,
                    err,
                )
                return ranker
            ranker.program, _ = load_package(
                directory,
                manifest["compiled"],
                id_guard(schema),
                reference,
                lambda: torch.load(directory / CHECK_INPUTS, weights_only=True),
                f"python -m integration.union_model --artifacts {directory.parent.parent}",
            )
            ranker.precision = precision if ranker.program is not None else "none"
        return ranker


def compile_artifact(directory: str | Path, batch: Batch, precision: str = "none") -> tuple[dict, UnionRanker]:
    """Export the artifact's :class:`UnionProgram` (every row dimension dynamic, one row included),
    its tables quantized to ``precision``, compile it with AOTInductor, check it against the eager
    (quantized) model on ``batch`` (real list rows) and add ``model.aoti.pt2``, those rows
    (``check_inputs.pt``, which every load checks it on again) and the manifest's ``compiled`` entry
    (inference_legacy/compiler.py; with the precision, the tables' bytes and the largest logit
    difference from the fp32 model). Returns the entry and the ranker serving the package."""
    from torch.export import Dim

    from inference_legacy.compiler import compile_program, export_program, write_entry
    from inference_legacy.dlrm_packager import table_bytes

    directory = Path(directory)
    ranker = UnionRanker.load(directory, compiled=False)
    program, inputs = ranker.as_program(precision), program_inputs(batch)
    with torch.inference_mode():  # everything the entry needs but the package, before the package is written
        fp32 = ranker.as_program()(*inputs)
    sizes = {"table_bytes": table_bytes(program), "fp32_table_bytes": table_bytes(ranker.model)}
    rows = Dim("rows", min=1, max=1 << 24)
    exported = export_program(
        program,
        inputs,
        {
            "dense": {0: rows},
            "values": {0: Dim("nnz", min=0, max=1 << 30)},
            "lengths": {0: len(ranker.schema.sparse) * rows},
        },
    )
    tmp = directory / f".{CHECK_INPUTS}.tmp{os.getpid()}"
    torch.save(inputs, tmp)
    os.replace(tmp, directory / CHECK_INPUTS)
    entry, compiled = compile_program(exported, inputs, directory / COMPILED, id_guard(ranker.schema), program, inputs)
    with torch.inference_mode():
        entry["fp32_max_abs_diff"] = float((compiled(*inputs) - fp32).abs().max()) if fp32.numel() else 0.0
    entry |= {"precision": precision, **sizes, "model_sha256": ranker.manifest["model_sha256"]}
    write_entry(directory / "manifest.json", entry)
    served = dataclasses.replace(ranker, program=compiled, precision=precision)
    return entry, served


def agreement_on_test(pipeline, served: UnionRanker, batch_size: int = 256) -> dict:
    """Every test user's list ordered by the pipeline's (fp32, eager) union ranker and by ``served``:
    both NDCG@10 (the target's place; 0 where it is not in the top 10) and the share of lists with the
    same top 10."""
    p = pipeline.at_stage("test")
    users, targets = p.split.targets("test")
    ranks: list[list[np.ndarray]] = [[], []]
    same = 0
    for lo in range(0, len(users), batch_size):
        chunk = users[lo : lo + batch_size]
        lists, rows, batch = p.union_batch(chunk, [p.store.history(u) for u in chunk.tolist()])
        tops = [ranker.order(lists, rows, batch)[0][:, :10] for ranker in (pipeline.union_ranker, served)]
        same += int((tops[0] == tops[1]).all(axis=1).sum())
        for m, top in enumerate(tops):
            ranks[m].append(
                target_ranks(torch.from_numpy(top), torch.from_numpy(targets[lo : lo + batch_size])).numpy()
            )
    ndcg = [float(per_user_metrics(np.concatenate(r))["NDCG@10"].mean()) if r else 0.0 for r in ranks]
    return {
        "test_users": len(users),
        "ndcg10_fp32": ndcg[0],
        "ndcg10": ndcg[1],
        "same_top10": same / max(len(users), 1),
    }


def main(argv: list[str] | None = None) -> dict:
    """``python -m integration.union_model --artifacts runs``: compile the served union ranker with
    AOTInductor, as the per-source rankers are when packaged (the demo's last stage runs this)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--artifacts", default="runs", help="run directory holding the stages (default: %(default)s)")
    p.add_argument("--sequential", default="auto", help="as integration.union_ranker's (default: auto)")
    p.add_argument(
        "--data-dir", default=None, help="data cache (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
    )
    p.add_argument("--users", type=int, default=64, help="validation users whose lists check the package (default: 64)")
    p.add_argument(
        "--precision",
        default="none",
        choices=["none", "int8"],
        help="the package's embedding tables: none (fp32, the model's own numbers) or int8; an int8 package is "
        "also compared with the fp32 model on every test user's list (default: %(default)s)",
    )
    a = p.parse_args(argv)
    from integration.loader import create_pipeline, sequential_exports  # the loader imports this module

    pipeline = create_pipeline(
        a.artifacts, data_dir=a.data_dir, sequential=sequential_exports(a.sequential), compiled=False
    )
    if pipeline.union_ranker is None:
        raise SystemExit(
            f"{Path(a.artifacts) / ARTIFACT}: no union ranker fits these sources; train it first with "
            f"python -m integration.union_ranker --artifacts {a.artifacts}"
        )
    p_valid = pipeline.at_stage("valid")
    users = p_valid.split.targets("valid")[0][: a.users]
    _, _, batch = p_valid.union_batch(users, [p_valid.store.history(u) for u in users.tolist()])
    directory = Path(a.artifacts) / ARTIFACT
    entry, served = compile_artifact(directory, batch, a.precision)
    print(
        f"compiled {directory / COMPILED} ({a.precision if a.precision != 'none' else 'fp32'} tables, "
        f"{entry['table_bytes']:,} bytes against {entry['fp32_table_bytes']:,} in fp32) in "
        f"{entry['compile_seconds']:.0f} s, checked on {entry['check_rows']} rows of {len(users)} validation users' "
        f"lists: max |logit difference| {entry['max_abs_diff']:.2e} from the model it compiles, "
        f"{entry['fp32_max_abs_diff']:.2e} from fp32"
    )
    if a.precision != "none":
        from inference_legacy.compiler import write_entry

        entry["test"] = agreement_on_test(pipeline, served)
        write_entry(directory / "manifest.json", entry)
        t = entry["test"]
        print(
            f"test, {t['test_users']} users: NDCG@10 {t['ndcg10']:.4f} ({a.precision}) against {t['ndcg10_fp32']:.4f} "
            f"(fp32); the same top 10 in {t['same_top10']:.1%} of the lists"
        )
    return entry


if __name__ == "__main__":
    main()
