"""Batched inference with the DLRM ranker trained by golden_training/train_dlrm.py.

    python -m prediction.predict_using_torchrec                                    # runs/ranking/checkpoints/dlrm
    python -m prediction.predict_using_torchrec --input pairs.jsonl --output scores.jsonl

Loads the latest checkpoint (saved by any number of ranks) into one unsharded model, checks it
against the data it was trained on, and scores (user, item) pairs: from Python with
``Ranker.score`` or from a JSON-lines file (``{"user_id": ..., "item_id": ...}`` per line, raw
MovieLens IDs). The command also reports test AUC and re-ranking for fp32 and for INT8
embeddings (TorchRec's inference quantization), with the tables' size in each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.inference.modules import quantize_embeddings
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from candidates.sources import RetrievalScorer
from common.checkpoint import latest_checkpoint, load_checkpoint
from common.data.dataset import id_key
from common.data.load import load_dataset
from common.data.split import split_dataset
from common.features import FeatureError
from common.runtime import write_json_atomic
from golden_training.ctr_data import CLICK_LOGS
from golden_training.evaluation import eval_set, evaluate, make_batch
from golden_training.model import TorchRecDLRM
from golden_training.ranking_data import Examples, RankingFeatures, reference_time


class DLRMRatingWrapper(nn.Module):
    """Wraps a DLRM and returns click probabilities instead of logits."""

    def __init__(self, model: TorchRecDLRM) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        return torch.sigmoid(self.model(dense_features, sparse_features))


def embedding_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if "embedding_bags" in k)


class Ranker:
    """A trained ranker, unsharded, ready to score (user, item) pairs by raw MovieLens IDs."""

    def __init__(self, checkpoints: str | Path, data_dir: str | None = None, quantize: str = "none") -> None:
        path = latest_checkpoint(checkpoints)
        if path is None:
            raise FileNotFoundError(
                f"no complete checkpoint under {checkpoints}; train first: python -m golden_training.train_dlrm"
            )
        run = json.loads((path / "meta.json").read_text()).get("run_config")
        if run is None:
            raise ValueError(f"{path} has no run_config in meta.json; it was not written by golden_training.train_dlrm")
        # The run's own settings, as its checkpoint recorded them (runs from before --history-match
        # had those features; n_boot is not part of a run)
        self.cfg = SimpleNamespace(**{"history_match": True, "n_boot": 1000, **run})
        if self.cfg.dataset in CLICK_LOGS:
            raise ValueError(
                f"{path} is a DLRM trained on {self.cfg.dataset} click logs; the Ranker scores MovieLens "
                f"(user, item) pairs. Evaluate click-log models with golden_training.train_click_logs's results.json"
            )
        ds = load_dataset(self.cfg.dataset, data_dir)
        if ds.fingerprint != run["data_fingerprint"]:
            raise ValueError(
                f"{path} was trained on data with fingerprint {run['data_fingerprint'][:16]}, "
                f"but {ds.name} here has {ds.fingerprint[:16]}"
            )
        self.dataset, self.split = ds, split_dataset(ds, self.cfg.eval_users)  # the sample it was evaluated on
        self.features = RankingFeatures.build(
            ds,
            self.split,
            self.cfg.history_len,
            self.cfg.sequence_features,
            self.cfg.trend_days,
            self.cfg.history_match,
        )
        self.retr = (
            RetrievalScorer(self.cfg.retrieval_export, ds.fingerprint, self.features)
            if self.cfg.retrieval_export
            else None
        )
        dlrm = TorchRecDLRM(
            self.features.schema,
            self.cfg.embedding_dim,
            list(self.cfg.dense_arch),
            list(self.cfg.over_arch),
            self.cfg.interaction,
        )
        load_checkpoint(path, {"model": dlrm})  # every weight must be there (DCP raises on a missing key)
        self.fp32_bytes = embedding_bytes(dlrm)
        if quantize == "int8":
            quant_prep_customize_row_alignment(dlrm, [EmbeddingBagCollection], 4)
            dlrm = quantize_embeddings(dlrm, dtype=torch.qint8, inplace=True)
        elif quantize != "none":
            raise ValueError(f"quantize must be 'none' or 'int8', got {quantize!r}")
        self.model = DLRMRatingWrapper(dlrm).eval()
        self.bytes = embedding_bytes(dlrm)
        self.checkpoint = path

    @torch.no_grad()
    def score(self, user_ids: list[int], item_ids: list[int], batch_size: int = 8192) -> np.ndarray:
        """Click probability for each (raw user ID, raw item ID) pair, with the user's history up
        to the test item (training plus validation)."""
        uidx = {id_key(u): k for k, u in enumerate(self.dataset.user_raw_ids)}
        iidx = {id_key(i): k for k, i in enumerate(self.dataset.item_raw_ids)}
        bad_u = [u for u in user_ids if id_key(u) not in uidx]
        bad_i = [i for i in item_ids if id_key(i) not in iidx]
        if bad_u or bad_i:
            raise FeatureError(
                f"unknown IDs: users {bad_u[:5]}, items {bad_i[:5]}; the ranker scores known users and items"
            )
        users = np.array([uidx[id_key(u)] for u in user_ids], dtype=np.int64)
        items = np.array([iidx[id_key(i)] for i in item_ids], dtype=np.int64)
        indptr, hist = self.split.history("test")
        queries = None if self.retr is None else self.retr.queries(users, hist, indptr[users], indptr[users + 1])
        ex = Examples(
            users,
            items,
            np.zeros(len(users), np.float32),
            indptr[users],
            indptr[users + 1],
            np.arange(len(users)),
            reference_time(self.split, "test", users),
            hist,
        )
        out = []
        for lo in range(0, len(ex), batch_size):
            b = make_batch(
                self.features,
                ex.take(np.arange(lo, min(lo + batch_size, len(ex)))),
                queries,
                self.retr,
                self.cfg.history_len,
            )
            out.append(self.model(b.dense_features, b.sparse_features))
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def evaluate_test(self) -> dict[str, object]:
        """Test AUC / NE and re-ranking, as train_dlrm reports them."""
        ev = eval_set(self.split, self.features, "test", self.cfg, self.retr)
        m = evaluate(_Logits(self.model.model), self.features, ev, self.retr, self.cfg)
        return {"auc": m["binary"]["auc"], "ne": m["binary"]["ne"], "reranked": m["rerank"].to_dict()}


class _Logits(nn.Module):
    """Adapter: golden_training's evaluation calls ``module.model(dense, sparse)`` for logits."""

    def __init__(self, dlrm: TorchRecDLRM) -> None:
        super().__init__()
        self.model = dlrm
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # gives the evaluator a device


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
        "--input", default=None, help="JSON lines of {user_id, item_id} to score (default: evaluate on test only)"
    )
    p.add_argument(
        "--output", default=None, help="where to write the scores as JSON lines (default: <input>.scores.jsonl)"
    )
    p.add_argument(
        "--quantize",
        default="int8",
        choices=["none", "int8"],
        help="embedding precision for --input scoring (default: %(default)s)",
    )
    p.add_argument("--out", default=None, help="results JSON (default: <checkpoints>/../../prediction_results.json)")
    a = p.parse_args(argv)
    results: dict[str, object] = {}
    rankers = {mode: Ranker(a.checkpoints, a.data_dir, mode) for mode in ("none", "int8")}
    for mode, r in rankers.items():
        name = "fp32" if mode == "none" else mode
        results[name] = {**r.evaluate_test(), "embedding_bytes": r.bytes}
    f, q = results["fp32"], results["int8"]
    results["auc_change"] = q["auc"] - f["auc"]
    results["size_reduction"] = f["embedding_bytes"] / q["embedding_bytes"]
    print(
        f"test AUC fp32 {f['auc']:.4f} | int8 {q['auc']:.4f} ({results['auc_change']:+.4f}); re-ranked NDCG@10 "
        f"fp32 {f['reranked']['NDCG@10']:.4f} | int8 {q['reranked']['NDCG@10']:.4f}"
    )
    print(
        f"embedding tables fp32 {f['embedding_bytes'] / 1e6:.3f} MB | int8 {q['embedding_bytes'] / 1e6:.3f} MB "
        f"({results['size_reduction']:.2f}x smaller)"
    )
    if a.input:
        pairs = [json.loads(line) for line in Path(a.input).read_text().splitlines() if line.strip()]
        probs = rankers[a.quantize].score([x["user_id"] for x in pairs], [x["item_id"] for x in pairs])
        output = Path(a.output or f"{a.input}.scores.jsonl")
        output.write_text("".join(json.dumps({**x, "score": round(float(s), 6)}) + "\n" for x, s in zip(pairs, probs)))
        results["scored"] = {"input": a.input, "output": str(output), "pairs": len(pairs)}
        print(f"scored {len(pairs)} pairs -> {output}")
    write_json_atomic(a.out or Path(a.checkpoints).parent.parent / "prediction_results.json", results)
    return results


if __name__ == "__main__":
    main()
