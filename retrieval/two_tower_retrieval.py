"""Serve the exported two-tower model: top-K candidates per user from a FAISS index.

    python -m retrieval.two_tower_retrieval                                      # runs/retrieval/export
    python -m retrieval.two_tower_retrieval --write-candidates runs/retrieval/candidates.jsonl
    python -m retrieval.two_tower_retrieval --export DIR --quantize none --k 50

The loader rebuilds the query tower from the export and loads every weight strictly (a missing
or unexpected key is an error), INT8-quantizes its embedding tables with TorchRec's inference
quantization, and checks that the index, the embeddings and the feature tables all belong to
the same export before serving anything. Works on CPU with faiss-cpu; uses CUDA and faiss-gpu
when they are there.

The command evaluates the served model (fp32 and INT8) on test under the shared protocol,
reports table sizes, the index's recall@K against exact search and the latency per batch, and
can write the top-K of every user as JSON lines:
``{"user_id": <raw MovieLens ID>, "item_ids": [...], "scores": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.inference.modules import quantize_embeddings
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from common.compiled import id_guard, load_package
from common.data.dataset import id_key, raw_ids
from common.data.load import load_dataset
from common.data.split import split_dataset
from common.data.tables import last_n
from common.export import ExportError
from common.export import read_manifest as read_export_manifest
from common.features import FeatureError, FeatureSchema
from common.metrics import evaluate_topk, top_unseen
from common.runtime import autodetect_device, write_json_atomic
from retrieval.modules.feature_processor import TwoTowerFeatures
from retrieval.modules.index import recall_against_exact, to_gpu_if_available
from retrieval.modules.two_tower import EXPORT_FORMATS, SERVING_ARRAYS, Tower, TwoTowerRetrieval

ArtifactError = ExportError  # the export is incomplete or its parts don't belong together; the message says which


@dataclass
class Recommendation:
    user_id: int  # raw MovieLens user ID
    item_ids: list[int]  # raw MovieLens item IDs, best first
    scores: list[float]
    cold_start: bool = False  # True: the user is unknown and got the most popular items


def read_manifest(export_dir: str | Path, verify_files: bool = True) -> dict:
    """The export's manifest, its format and (``verify_files``) every file checked (common/export.py)."""
    return read_export_manifest(
        export_dir,
        "train first (python -m retrieval.two_tower_train) or point --export at a directory written by it",
        EXPORT_FORMATS,
        verify_files,
    )


def read_serving_arrays(export_dir: str | Path, manifest: dict) -> dict:
    """features.json's feature tables, and the ID maps, histories and popularity (``.npy`` files, or
    JSON lists in a ``two_tower_retrieval/1`` export's features.json)."""
    export_dir = Path(export_dir)
    serving = json.loads((export_dir / "features.json").read_text())
    if manifest["format"] != "two_tower_retrieval/1":
        for name in SERVING_ARRAYS:
            serving[name] = np.load(export_dir / f"{name}.npy", allow_pickle=False)
    return serving


def load_query_tower(
    export_dir: str | Path, manifest: dict, quantize: str = "int8", device: torch.device | None = None
) -> Tower:
    """Rebuild the query tower from the export; every weight must load.

    ``quantize="int8"`` swaps its EmbeddingBagCollection for TorchRec's quantized one (rows are
    padded to 4 bytes on CPU, to FBGEMM's 16 on CUDA).
    """
    device = device or torch.device("cpu")
    schema = FeatureSchema.from_dict(manifest["query_schema"])
    tower = Tower(schema, manifest["embedding_dim"], manifest["layer_sizes"])
    weights = torch.load(Path(export_dir) / "weights.pt", map_location="cpu", weights_only=True)["query_tower"]
    try:
        tower.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"query tower weights don't fit the manifest's schema and sizes: {err}") from err
    if quantize == "int8":
        quant_prep_customize_row_alignment(tower, [EmbeddingBagCollection], 16 if device.type == "cuda" else 4)
        tower = quantize_embeddings(tower, dtype=torch.qint8, inplace=True)
    elif quantize != "none":
        raise ValueError(f"quantize must be 'int8' or 'none', got {quantize!r}")
    return tower.to(device).eval()


COMPILED_TOWER = "query_tower.aoti.pt2"
CHECK_USERS = 256  # users whose queries both runtimes embed each time a compiled tower is loaded
EXACT_SCORES_PER_CALL = 1 << 22  # score-matrix entries one call of the exact search holds (16 MB)


class TowerProgram(torch.nn.Module):
    """(values, lengths) -> query vectors: the tower behind plain tensors, for torch.export."""

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        self.tower, self.output_dim = tower, tower.output_dim

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.tower(KeyedJaggedTensor.from_lengths_sync(self.tower.feature_names, values, lengths))


class CompiledTower(torch.nn.Module):
    """The AOTInductor-compiled query tower, called like the tower (a KeyedJaggedTensor in)."""

    def __init__(self, runner, output_dim: int) -> None:
        super().__init__()
        self.runner, self.output_dim = runner, output_dim

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.runner(features.values().long(), features.lengths().long())


def embedding_table_bytes(tower: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for k, t in tower.state_dict().items() if k.startswith("ebc."))


class Retriever:
    """Top-K candidates for users of the exported model, by raw MovieLens user ID."""

    def __init__(
        self, export_dir: str | Path, quantize: str = "int8", device: str = "auto", k: int = 100, compiled: bool = True
    ) -> None:
        """``compiled``: embed queries with the export's AOTInductor package (``query_tower.aoti.pt2``,
        ``python -m inference_legacy.aot_compile``) when it is there and checks out; CPU, INT8 only."""
        self.export_dir = Path(export_dir)
        self.manifest = m = read_manifest(self.export_dir)
        self.device = autodetect_device(device)
        serving = read_serving_arrays(self.export_dir, m)
        self.features = TwoTowerFeatures.from_dict(serving["features"])
        self.user_raw_ids = raw_ids(serving["user_raw_ids"])
        self.item_raw_ids = raw_ids(serving["item_raw_ids"])
        self.user_index = {id_key(u): k for k, u in enumerate(self.user_raw_ids.tolist())}
        self.history_indptr = np.asarray(serving["history_indptr"], dtype=np.int64)
        self.history_items = np.asarray(serving["history_items"], dtype=np.int64)
        # Trained on a data set with repeats: seen items stay in the lists (common/data/split.py).
        self.repeats = bool(m.get("repeats", False))
        counts = np.asarray(serving["item_counts"], dtype=np.float64)
        self.popular = np.argsort(-counts, kind="stable")
        self.popularity = counts / max(1.0, counts.sum())
        self._check_consistency(m)
        index = faiss.read_index(str(self.export_dir / "index.faiss"))
        if index.ntotal != m["num_items"] or index.d != m["output_dim"]:
            raise ArtifactError(
                f"index.faiss holds {index.ntotal} vectors of dimension {index.d}, but the model has "
                f"{m['num_items']} items and {m['output_dim']}-dim outputs: the index is from another model"
            )
        self.tower = load_query_tower(self.export_dir, m, quantize, self.device)
        self.runtime = "eager"
        tower: torch.nn.Module = self.tower
        if compiled and quantize == "int8" and self.device.type == "cpu":
            reference = TowerProgram(self.tower)
            runner, why = load_package(
                self.export_dir,
                m.get("compiled"),
                id_guard(self.features.query_schema),
                reference,
                self.check_inputs,
                f"python -m inference_legacy.aot_compile {self.export_dir}",
            )
            tower, self.runtime = (
                (CompiledTower(runner, self.tower.output_dim), "AOTInductor") if runner else (tower, f"eager: {why}")
            )
        self.model = TwoTowerRetrieval(to_gpu_if_available(index), tower, k=k, device=self.device)
        self.k = k
        # an exact index on the CPU is searched as torch ops (_search_exact) over a copy of its vectors
        served = self.model.faiss_index
        exact = isinstance(served, faiss.IndexFlat) and served.metric_type == faiss.METRIC_INNER_PRODUCT
        self.item_vectors = torch.from_numpy(served.reconstruct_n(0, served.ntotal)) if exact else None

    def check_inputs(self, n: int = CHECK_USERS) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower's (values, lengths) for the first ``n`` users with their stored histories."""
        users = np.arange(min(n, len(self.user_raw_ids)))
        kjt = self._query_batch(users, [self.history_of(u) for u in users]).sparse
        return kjt.values().long(), kjt.lengths().long()

    def _check_consistency(self, m: dict) -> None:
        f = self.features
        if FeatureSchema.from_dict(m["query_schema"]) != f.query_schema:
            raise ArtifactError(
                "the manifest's query schema and features.json disagree (feature keys or "
                f"cardinalities): manifest {FeatureSchema.from_dict(m['query_schema']).sparse_names}, "
                f"features {f.query_schema.sparse_names}"
            )
        if (len(self.user_raw_ids), len(self.item_raw_ids)) != (m["num_users"], m["num_items"]):
            raise ArtifactError(
                f"ID maps hold {len(self.user_raw_ids)} users and {len(self.item_raw_ids)} items; the "
                f"manifest says {m['num_users']} and {m['num_items']}"
            )

    def history_of(self, user: int) -> np.ndarray:
        return self.history_items[self.history_indptr[user] : self.history_indptr[user + 1]]

    @torch.no_grad()
    def top_k_indices(
        self,
        users: np.ndarray,
        k: int | None = None,
        exclude_seen: bool | None = None,
        histories: list[np.ndarray] | None = None,
        user_columns: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Dense item indices and scores ``[B, k]`` for dense user indices, best first.

        ``histories`` (dense item indices per user) replaces the stored histories, e.g. with
        interactions that arrived after the export; a user index of -1 (a new user) needs
        ``user_columns``, the user features from :meth:`TwoTowerFeatures.raw_user_columns`.
        """
        k = k or self.k
        users = np.asarray(users, dtype=np.int64)
        hists = histories if histories is not None else [self.history_of(u) for u in users]
        q = self.model.embed(self._query_batch(users, hists, user_columns).sparse).cpu().numpy().astype(np.float32)
        if exclude_seen is None:  # the protocol of the data the export was trained on
            exclude_seen = not self.repeats
        return self.search_unseen(q, k, hists if exclude_seen else None)

    def search_unseen(self, q: np.ndarray, k: int, hists: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        """Items and scores ``[B, k]`` for query embeddings, best first, each row without the items of
        its ``hists`` entry (None: nothing excluded); padded with -1 / -inf. An exact index on the CPU
        goes through :meth:`_search_exact`, any other through the FAISS index's own search."""
        if self.item_vectors is not None:
            return self._search_exact(q, k, hists)
        lengths = np.array([len(h) for h in hists] if hists is not None else [0] * len(q), dtype=np.int64)
        scores, items = self.search(q, k, lengths)
        keep = items >= 0
        if lengths.any():  # each row's seen items, as row * num_items + item keys, out in one pass
            n_items, rows = self.features.num_items, np.arange(len(q))
            seen = np.repeat(rows, lengths) * n_items + np.concatenate(hists).astype(np.int64)
            keep &= ~np.isin(rows[:, None] * n_items + items, seen)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the kept ones first, in score order
        kept = np.take_along_axis(keep, order, 1)
        out_items = np.full((len(q), k), -1, dtype=np.int64)
        out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_items[:, : order.shape[1]] = np.where(kept, np.take_along_axis(items, order, 1), -1)
        out_scores[:, : order.shape[1]] = np.where(kept, np.take_along_axis(scores, order, 1), -np.inf)
        return out_items, out_scores

    def _search_exact(self, q: np.ndarray, k: int, hists: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        """The exact index's search as a matrix product, each row's seen items set to -inf, then top-k:
        the same items as FAISS's flat search followed by removing the seen ones (up to float ties), on
        torch's threads. FAISS asks for k + the user's history to have k left after removing it, keeps
        them in a heap and leaves the removal to numpy, several times slower (integration/README.md)."""
        n_items = len(self.item_vectors)
        found = min(k, n_items)
        items = np.full((len(q), k), -1, dtype=np.int64)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        queries = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        step = max(1, EXACT_SCORES_PER_CALL // max(1, n_items))
        for lo in range(0, len(q), step):
            s = queries[lo : lo + step] @ self.item_vectors.T
            at, top = top_unseen(s, None if hists is None else hists[lo : lo + step], found)
            scores[lo : lo + len(s), :found] = top.numpy()
            items[lo : lo + len(s), :found] = np.where(np.isneginf(scores[lo : lo + len(s), :found]), -1, at.numpy())
        return items, scores

    def search(self, q: np.ndarray, k: int, room: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The FAISS index's top ``k`` + ``room[i]`` items for each query embedding (room for a user's seen
        items), ``[B, k + max(room)]`` padded with -1 / -inf. A search costs more the more results it
        keeps (room for the batch's longest history costs every user: integration/README.md), so a batch
        is searched in groups by room rounded up to a power of two."""
        width = min(k + int(room.max()) if len(room) else k, self.features.num_items)
        if len(q) > 1:
            room = np.where(room > 0, np.left_shift(1, np.ceil(np.log2(np.maximum(room, 1))).astype(np.int64)), 0)
        scores = np.full((len(q), width), -np.inf, dtype=np.float32)
        items = np.full((len(q), width), -1, dtype=np.int64)
        for r in np.unique(room):
            rows = np.flatnonzero(room == r)
            n = min(k + int(r), width)
            scores[rows, :n], items[rows, :n] = self.model.faiss_index.search(q[rows], n)
        return scores, items

    def _query_batch(
        self, users: np.ndarray, hists: list[np.ndarray], user_columns: dict[str, np.ndarray] | None = None
    ):
        lengths = np.array([len(h) for h in hists], dtype=np.int64)
        values = np.concatenate(hists).astype(np.int64) if len(hists) else np.zeros(0, np.int64)
        ends = np.cumsum(lengths)
        return self.features.query_batch(
            users, last_n(values, ends - lengths, ends, self.features.history_len), user_columns, sync=False
        )

    @torch.no_grad()
    def query_embeddings(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        """The query tower's output ``[B, dim]`` for dense user indices with these histories."""
        return self.model.embed(self._query_batch(np.asarray(users, dtype=np.int64), histories).sparse).cpu().numpy()

    def recommend(
        self,
        user_ids: list[int],
        k: int | None = None,
        exclude_seen: bool | None = None,
        extra_history: dict[int, list[int]] | None = None,
    ) -> list[Recommendation]:
        """Top-K raw item IDs per raw user ID. An unknown user gets the most popular items
        (``cold_start=True``). ``extra_history`` appends newly seen raw item IDs per user."""
        k = k or self.k
        item_index = {id_key(i): n for n, i in enumerate(self.item_raw_ids)}
        known = [(pos, self.user_index[id_key(u)]) for pos, u in enumerate(user_ids) if id_key(u) in self.user_index]
        out: list[Recommendation | None] = [None] * len(user_ids)
        if known:
            users = np.array([u for _, u in known])
            hists = [
                np.concatenate(
                    [
                        self.history_of(u),
                        [
                            item_index[i]
                            for i in (extra_history or {}).get(id_key(user_ids[pos]), [])
                            if i in item_index
                        ],
                    ]
                ).astype(np.int64)
                for pos, u in known
            ]
            items, scores = self.top_k_indices(users, k, exclude_seen, hists)
            for (pos, _), row_i, row_s in zip(known, items, scores):
                valid = row_i >= 0
                out[pos] = Recommendation(
                    id_key(user_ids[pos]), self.item_raw_ids[row_i[valid]].tolist(), row_s[valid].astype(float).tolist()
                )
        for pos, u in enumerate(user_ids):
            if out[pos] is None:
                top = self.popular[:k]
                out[pos] = Recommendation(
                    id_key(u),
                    self.item_raw_ids[top].tolist(),
                    self.popularity[top].astype(float).tolist(),
                    cold_start=True,
                )
        return out  # type: ignore[return-value]

    def recommend_features(
        self, records: list[dict], k: int | None = None, exclude_seen: bool | None = None
    ) -> list[Recommendation]:
        """Top-K for users described by raw features:
        ``{"user_id": raw ID or None, "age": years, "gender": "M"|"F", "occupation": name,
        "zip": code, "history": [raw item IDs, oldest first]}``.

        A known ``user_id`` uses its ID embedding; an unknown or missing one is served from the
        features and history alone. A user with no ID, no known ID and an empty history gets
        the popular items (``cold_start=True``). Unknown item IDs in a history are an error.
        """
        k = k or self.k
        item_index = {id_key(i): n for n, i in enumerate(self.item_raw_ids)}
        users, hists = [], []
        for r, rec in enumerate(records):
            bad = [i for i in rec.get("history", []) if id_key(i) not in item_index]
            if bad:
                raise FeatureError(f"record {r}: history has item IDs not in the catalog: {bad[:5]}")
            users.append(self.user_index.get(id_key(rec["user_id"]), -1) if rec.get("user_id") is not None else -1)
            hists.append(np.array([item_index[id_key(i)] for i in rec.get("history", [])], dtype=np.int64))
        cols = self.features.raw_user_columns(records)
        serve = [n for n, (u, h) in enumerate(zip(users, hists)) if u >= 0 or len(h)]
        out: list[Recommendation | None] = [None] * len(records)
        if serve:
            items, scores = self.top_k_indices(
                np.array(users)[serve],
                k,
                exclude_seen,
                [hists[n] for n in serve],
                {name: col[serve] for name, col in cols.items()},
            )
            for n, row_i, row_s in zip(serve, items, scores):
                valid = row_i >= 0
                out[n] = Recommendation(
                    records[n].get("user_id") or -1,
                    self.item_raw_ids[row_i[valid]].tolist(),
                    row_s[valid].astype(float).tolist(),
                )
        top = self.popular[:k]
        return [
            o
            if o is not None
            else Recommendation(
                records[n].get("user_id") or -1,
                self.item_raw_ids[top].tolist(),
                self.popularity[top].astype(float).tolist(),
                cold_start=True,
            )
            for n, o in enumerate(out)
        ]


def write_candidates(retriever: Retriever, path: str | Path, k: int, batch_size: int = 256) -> int:
    """Top-K for every known user as JSON lines (raw IDs); returns the number of lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for lo in range(0, len(retriever.user_raw_ids), batch_size):
            for rec in retriever.recommend(retriever.user_raw_ids[lo : lo + batch_size].tolist(), k):
                f.write(
                    json.dumps(
                        {"user_id": rec.user_id, "item_ids": rec.item_ids, "scores": [round(s, 6) for s in rec.scores]}
                    )
                    + "\n"
                )
    tmp.replace(path)
    return len(retriever.user_raw_ids)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--export",
        default="runs/retrieval/export",
        help="export directory written by two_tower_train (default: %(default)s)",
    )
    p.add_argument("--k", type=int, default=100, help="candidates per user (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="users per query batch (default: %(default)s)")
    p.add_argument(
        "--quantize",
        default="int8",
        choices=["int8", "none"],
        help="query tower embedding precision for --write-candidates (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: cuda if available (default: %(default)s)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="data cache, to evaluate on test (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)",
    )
    p.add_argument(
        "--write-candidates", default=None, help="write every user's top-K to this JSON-lines file (default: off)"
    )
    p.add_argument(
        "--eval-users",
        type=int,
        default=0,
        help="evaluate (and time the index on) a fixed sample of this many users (default: 0, every user)",
    )
    p.add_argument("--out", default=None, help="results JSON (default: <export>/../serving_results.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    a = parse_args(argv)
    manifest = read_manifest(a.export)
    ds = load_dataset(manifest["dataset"], a.data_dir)
    if ds.fingerprint != manifest["data_fingerprint"]:
        raise ArtifactError(
            f"the export was trained on data with fingerprint {manifest['data_fingerprint'][:16]}, "
            f"but {ds.name} here has {ds.fingerprint[:16]}"
        )
    split = split_dataset(ds, a.eval_users)
    results: dict[str, object] = {"export": a.export, "k": a.k, "index": manifest["index"]}
    retrievers = {}
    for mode in ("none", "int8"):
        r = Retriever(a.export, quantize=mode, device=a.device, k=a.k)
        retrievers[mode] = r
        rep = evaluate_topk(
            lambda users, r=r: r.top_k_indices(users, max(a.k, 100))[0], split, "test", batch_size=a.batch_size
        )
        results[f"test_{'fp32' if mode == 'none' else mode}"] = rep.to_dict()
        results[f"table_bytes_{'fp32' if mode == 'none' else mode}"] = embedding_table_bytes(r.tower)
    fp32, int8 = results["test_fp32"], results["test_int8"]
    ratio = results["table_bytes_fp32"] / results["table_bytes_int8"]
    results["int8_table_compression"] = ratio
    print(
        f"test (shared protocol)   fp32: HR@10 {fp32['HR@10']:.4f} Recall@100 {fp32['Recall@100']:.4f} | "
        f"int8: HR@10 {int8['HR@10']:.4f} Recall@100 {int8['Recall@100']:.4f} "
        f"(diff {int8['Recall@100'] - fp32['Recall@100']:+.4f})"
    )
    print(
        f"query tower tables       fp32 {results['table_bytes_fp32'] / 1e6:.3f} MB, int8 "
        f"{results['table_bytes_int8'] / 1e6:.3f} MB ({ratio:.2f}x smaller)"
    )

    # The index against exact search over the same item embeddings, and latency per batch.
    r = retrievers[a.quantize]
    users = split.eval_users if split.eval_users is not None else np.arange(len(r.user_raw_ids))
    queries = np.concatenate(
        [
            r.model.embed(
                r.features.query_batch(
                    users[lo : lo + a.batch_size],
                    last_n(
                        r.history_items,
                        r.history_indptr[users[lo : lo + a.batch_size]],
                        r.history_indptr[users[lo : lo + a.batch_size] + 1],
                        r.features.history_len,
                    ),
                ).sparse
            )
            .cpu()
            .numpy()
            for lo in range(0, len(users), a.batch_size)
        ]
    )
    exact = faiss.IndexFlatIP(queries.shape[1])
    exact.add(np.load(Path(a.export) / "item_embeddings.npy"))
    _, exact_ids = exact.search(queries, a.k)
    _, ann_ids = r.model.faiss_index.search(queries, a.k)
    results["index_recall_vs_exact"] = recall_against_exact(ann_ids, exact_ids)
    times = []
    for lo in range(0, len(users), a.batch_size):
        start = time.perf_counter()
        r.top_k_indices(users[lo : lo + a.batch_size], a.k)
        times.append((time.perf_counter() - start) * 1000)
    results["latency_ms_per_batch_median"] = statistics.median(times)
    results["batch_size"] = a.batch_size
    print(
        f"index {manifest['index']['type']}: recall@{a.k} vs exact {results['index_recall_vs_exact']:.4f}; "
        f"{statistics.median(times):.1f} ms per batch of {a.batch_size} users (median, {a.quantize})"
    )
    if a.write_candidates:
        n = write_candidates(r, a.write_candidates, a.k, a.batch_size)
        results["candidates_file"] = a.write_candidates
        print(f"wrote top-{a.k} for {n} users to {a.write_candidates}")
    write_json_atomic(a.out or Path(a.export).parent / "serving_results.json", results)
    return results


if __name__ == "__main__":
    main()
