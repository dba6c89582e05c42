"""Two item-to-item candidate sources fitted in closed form on the training interactions: EASE and
sequential transitions. No training loop, no seed: a second or two on ml-100k.

    python -m retrieval.item_item                          # ml-100k -> runs/item-item (export + results)
    python -m retrieval.item_item --out runs/compare/seed-0/item-item
    python -m retrieval.item_item --search --no-test       # the validation grid behind the defaults

Both score the whole catalog from a user's history alone, so a new interaction changes the next list
with nothing retrained, and both are cheap beside the learned sources (integration/pipeline.py fuses
them with the two-tower and SASRec in the served ensemble, integration/ensemble.py):

- **EASE** (Steck, "Embarrassingly Shallow Autoencoders", WWW 2019): with X the binary user x item
  matrix of the training split, ``P = inv(X^T X + lambda I)`` and ``B = -P / diag(P)`` with a zero
  diagonal; a user's scores are the sum of B's rows over the items they have seen. The inverse is
  dense, ``items^2`` memory and ``items^3`` time: out of reach for catalogs of hundreds of thousands
  of items, where this stage refuses (``--max-ease-items``) and the transitions alone are exported
  (retrieval/README.md has the cost at each size).
- **transitions**: ``T[i, j]`` counts j following i within ``--window`` steps of a user's training
  sequence (split order: time, then the tie key), each pair weighted 1/distance, and each row
  divided by its sum. A user's scores are ``sum_k decay^k T[h_k]`` over their ``--last`` most recent
  items h_0, h_1, ... (most recent first). Sparse: at most ``window`` entries per interaction.

The defaults (lambda 100; window 8, last 20, decay 0.85) are the best of ``--search``'s grid on
validation NDCG@10 (full ranking, seen items excluded; the grid's figures are in retrieval/README.md).
Test is scored once with the defaults (``--no-test``: never).
Writes ``<out>/export`` (``ease.npy``, ``transitions.npz``, ``manifest.json`` with the item ID map
and the data fingerprint, which the pipeline checks) and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from common.data.download import file_digest
from common.data.load import add_dataset_args, load_dataset
from common.data.split import Split, split_dataset
from common.export import read_manifest
from common.metrics import evaluate_scores
from common.runtime import Progress, write_json_atomic, write_results

NAMES = ("EASE", "neighbours", "transitions")  # the sources, as the pipeline names them
SEARCH = {
    "ease_lambda": [10.0, 30.0, 60.0, 100.0, 300.0],
    "window": [1, 3, 8, 20],
    "last": [1, 5, 20],
    "decay": [0.5, 0.7, 0.85],
}


@dataclass(frozen=True)
class Config:
    dataset: str = "ml-100k"
    data_dir: str | None = None
    source: str = "auto"
    on_bad_row: str = "error"
    eval_users: int = 0
    ease_lambda: float = 100.0
    max_ease_items: int = 20_000
    neighbours: int = 100
    window: int = 8
    last: int = 20
    decay: float = 0.85
    out: str = "runs/item-item"
    search: bool = False
    no_test: bool = False
    n_boot: int = 1000


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data, model, out = (p.add_argument_group(g) for g in ("data", "model", "output"))
    add_dataset_args(data)
    model.add_argument(
        "--ease-lambda", type=float, default=d.ease_lambda, help="EASE's L2 penalty (default: %(default)s)"
    )
    model.add_argument(
        "--max-ease-items",
        type=int,
        default=d.max_ease_items,
        help="above this many items EASE's dense inverse is skipped, transitions only (default: %(default)s)",
    )
    model.add_argument(
        "--neighbours",
        type=int,
        default=d.neighbours,
        help="above --max-ease-items, the neighbour model in EASE's place keeps each item's this many most "
        "similar items (default: %(default)s)",
    )
    model.add_argument(
        "--window",
        type=int,
        default=d.window,
        help="transitions: pairs up to this many steps apart (default: %(default)s)",
    )
    model.add_argument(
        "--last",
        type=int,
        default=d.last,
        help="transitions: the user's most recent items scored from (default: %(default)s)",
    )
    model.add_argument(
        "--decay",
        type=float,
        default=d.decay,
        help="transitions: weight decay^k of the k-th most recent item (default: %(default)s)",
    )
    out.add_argument("--out", default=d.out, help="run directory (default: %(default)s)")
    out.add_argument("--search", action="store_true", help="print the validation grid of the settings first")
    out.add_argument("--no-test", action="store_true", help="never score test")
    out.add_argument("--n-boot", type=int, default=d.n_boot, help="bootstrap resamples for CIs (default: %(default)s)")
    cfg = Config(**vars(p.parse_args(argv)))
    for name in ("window", "last", "max_ease_items", "neighbours"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.ease_lambda <= 0:
        p.error(f"--ease-lambda {cfg.ease_lambda}: must be positive (the Gram matrix alone can be singular)")
    if not 0 < cfg.decay <= 1:
        p.error(f"--decay {cfg.decay}: must be in (0, 1]")
    return cfg


# -- fitting -----------------------------------------------------------------------------------


def fit_ease(split: Split, lam: float) -> np.ndarray:
    """EASE's item x item weights ``[num_items, num_items]`` (float32, zero diagonal) from the
    training split's binary user x item matrix."""
    n = split.num_items
    x = torch.zeros(split.num_users, n, dtype=torch.float64)
    x[torch.as_tensor(split.train_user), torch.as_tensor(split.train_item)] = 1.0
    gram = x.T @ x
    gram.diagonal().add_(lam)
    p = torch.linalg.inv(gram)
    b = -p / p.diagonal()[None, :]
    b.diagonal().zero_()
    return b.float().numpy()


@dataclass
class Transitions:
    """Row-normalized item -> next-items weights as CSR arrays (``indptr [n + 1]``, ``indices``, ``values``)."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray

    @classmethod
    def fit(cls, split: Split, window: int) -> Transitions:
        u, i, n = split.train_user, split.train_item, split.num_items  # sorted by (user, time, tie key)
        keys, weights = [], []
        for k in range(1, min(window, max(len(u) - 1, 1)) + 1):
            same = u[k:] == u[:-k]
            keys.append(i[:-k][same] * n + i[k:][same])
            weights.append(np.full(int(same.sum()), 1.0 / k))
        keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        pair, inverse = np.unique(keys, return_inverse=True)
        value = np.bincount(inverse, weights=np.concatenate(weights) if weights else None, minlength=len(pair))
        rows = pair // n
        value /= np.bincount(rows, weights=value, minlength=n)[rows]
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return cls(indptr, (pair % n).astype(np.int64), value.astype(np.float32))

    @property
    def num_items(self) -> int:
        return len(self.indptr) - 1

    def scores(self, histories: list[np.ndarray], last: int, decay: float) -> np.ndarray:
        """``[len(histories), num_items]``: each history's ``last`` most recent items' rows, the
        k-th most recent weighted ``decay^k``."""
        n = self.num_items
        rows, items, weight = [], [], []
        for r, h in enumerate(histories):
            recent = np.asarray(h, dtype=np.int64)[::-1][:last]
            rows.append(np.full(len(recent), r))
            items.append(recent)
            weight.append(decay ** np.arange(len(recent)))
        if not histories:
            return np.zeros((0, n), dtype=np.float32)
        rows, items, weight = np.concatenate(rows), np.concatenate(items), np.concatenate(weight)
        starts, lens = self.indptr[items], self.indptr[items + 1] - self.indptr[items]
        at = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())  # the rows' entries
        out = np.bincount(
            np.repeat(rows, lens) * n + self.indices[at],
            weights=np.repeat(weight, lens) * self.values[at],
            minlength=len(histories) * n,
        )
        return out.reshape(len(histories), n).astype(np.float32)


def fit_neighbours(split: Split, k: int, block: int = 512) -> Transitions:
    """Each item's ``k`` most similar items by the cosine of who had them (the binary user x item
    matrix's columns), itself left out, as a row-CSR of similarities: the sparse stand-in for EASE
    where its dense inverse is out of reach. Counted a block of items at a time from every user's
    distinct items (work: the sum over users of their distinct items squared)."""
    n = split.num_items
    pairs = np.unique(split.train_user * n + split.train_item)  # by user, then item
    user, item = pairs // n, pairs % n
    count = np.bincount(user, minlength=split.num_users)
    start = np.r_[0, np.cumsum(count)[:-1]]
    norm = np.sqrt(np.bincount(item, minlength=n).astype(np.float32))
    by_item = np.argsort(item, kind="stable")
    item_order = item[by_item]
    indices, values, lengths = [], [], np.zeros(n, np.int64)
    bar = Progress(n, "neighbours", "items")
    for a in range(0, n, block):
        b = min(a + block, n)
        lo, hi = np.searchsorted(item_order, [a, b])
        rows = by_item[lo:hi]  # the (user, item) pairs of this block's items
        c = count[user[rows]]
        at = np.repeat(start[user[rows]] - np.cumsum(c) + c, c) + np.arange(c.sum())  # each user's items
        co = np.bincount(np.repeat(item[rows] - a, c) * n + item[at], minlength=(b - a) * n).reshape(b - a, n)
        co[np.arange(b - a), np.arange(a, b)] = 0
        sim = torch.from_numpy(co.astype(np.float32) / np.maximum(norm[a:b, None] * norm[None, :], 1.0))
        top, idx = torch.topk(sim, min(k, n), dim=1)
        keep = (top > 0).numpy()
        indices.append(idx.numpy()[keep])
        values.append(top.numpy()[keep])
        lengths[a:b] = keep.sum(axis=1)
        bar.update(b - a)
    bar.close()
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    cat = np.concatenate
    return Transitions(
        indptr,
        cat(indices).astype(np.int64) if indices else np.zeros(0, np.int64),
        cat(values) if values else np.zeros(0, np.float32),
    )


class ItemItem:
    """The fitted sources: from :meth:`fit`, or loaded from an export directory. EASE where the
    catalog allows its dense inverse, else the sparse neighbours; the transitions always."""

    def __init__(
        self,
        cfg: dict,
        ease: np.ndarray | None,
        transitions: Transitions,
        manifest: dict | None = None,
        neighbours: Transitions | None = None,
    ):
        self.cfg, self.ease, self.transitions, self.manifest = cfg, ease, transitions, manifest or {}
        self.neighbours = neighbours

    @classmethod
    def fit(cls, split: Split, cfg: Config) -> ItemItem:
        small = split.num_items <= cfg.max_ease_items
        ease = fit_ease(split, cfg.ease_lambda) if small else None
        neighbours = None if small else fit_neighbours(split, cfg.neighbours)
        return cls(asdict(cfg), ease, Transitions.fit(split, cfg.window), neighbours=neighbours)

    @property
    def names(self) -> list[str]:
        fitted = {"EASE": self.ease is not None, "neighbours": self.neighbours is not None, "transitions": True}
        return [n for n in NAMES if fitted[n]]

    def digest(self, name: str) -> str:
        """What one source's scores depend on: its fitted file (and for the transitions, the settings
        that score from it), so refitting one source leaves the other's digest as it was."""
        if name == "EASE":
            what = {"file": self.manifest["files"]["ease.npy"]}
        elif name == "neighbours":
            what = {
                "file": self.manifest["files"]["neighbours.npz"],
                "last": self.cfg["last"],
                "decay": self.cfg["decay"],
            }
        else:
            what = {
                "file": self.manifest["files"]["transitions.npz"],
                "last": self.cfg["last"],
                "decay": self.cfg["decay"],
            }
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def scores(self, name: str, histories: list[np.ndarray]) -> np.ndarray:
        if name == "transitions":
            return self.transitions.scores(histories, self.cfg["last"], self.cfg["decay"])
        if name == "neighbours":  # scored as the transitions are: the latest items' rows, decayed
            return self.neighbours.scores(histories, self.cfg["last"], self.cfg["decay"])
        x = np.zeros((len(histories), self.ease.shape[0]), dtype=np.float32)
        for r, h in enumerate(histories):
            x[r, h] = 1.0
        return x @ self.ease

    def save(self, out_dir: Path, ds) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        if self.ease is not None:
            np.save(out_dir / "ease.npy", self.ease)
            files["ease.npy"] = file_digest(out_dir / "ease.npy", "sha256")
        for stem, t in (("transitions", self.transitions), ("neighbours", self.neighbours)):
            if t is not None:
                np.savez(out_dir / f"{stem}.npz", indptr=t.indptr, indices=t.indices, values=t.values)
                files[f"{stem}.npz"] = file_digest(out_dir / f"{stem}.npz", "sha256")
        write_json_atomic(
            out_dir / "manifest.json",
            {
                "model": "item-item",
                "sources": self.names,
                "config": self.cfg,
                "dataset": ds.name,
                "data_fingerprint": ds.fingerprint,
                "num_items": ds.num_items,
                "item_raw_ids": ds.item_raw_ids.tolist(),
                "files": files,
            },
        )

    @classmethod
    def load(cls, export_dir: str | Path) -> ItemItem:
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir, f"fit it (again): python -m retrieval.item_item --out {export_dir.parent}")
        ease = np.load(export_dir / "ease.npy") if "ease.npy" in manifest["files"] else None
        graphs = {}
        for stem in ("transitions", "neighbours"):
            if f"{stem}.npz" in manifest["files"]:
                with np.load(export_dir / f"{stem}.npz") as z:
                    graphs[stem] = Transitions(z["indptr"], z["indices"], z["values"])
        return cls(manifest["config"], ease, graphs["transitions"], manifest, graphs.get("neighbours"))


# -- the script --------------------------------------------------------------------------------


def evaluate(model: ItemItem, name: str, split: Split, stage: str, n_boot: int):
    indptr, hist = split.history(stage)

    def score(users: torch.Tensor) -> torch.Tensor:
        u = users.numpy()
        return torch.from_numpy(model.scores(name, [hist[indptr[x] : indptr[x + 1]] for x in u]))

    return evaluate_scores(score, split, stage, batch_size=256, n_boot=n_boot)


def search(split: Split, cfg: Config) -> list[dict[str, object]]:
    """Validation NDCG@10 of every setting in :data:`SEARCH` (EASE's lambda alone; the transitions'
    window x last x decay), best first within each source."""
    rows = []
    if split.num_items <= cfg.max_ease_items:
        for lam in SEARCH["ease_lambda"]:
            m = ItemItem({}, fit_ease(split, lam), Transitions.fit(split, 1))
            rows.append({"source": "EASE", "ease_lambda": lam, **evaluate(m, "EASE", split, "valid", 10).means})
    for window in SEARCH["window"]:
        t = Transitions.fit(split, window)
        for last, decay in itertools.product(SEARCH["last"], SEARCH["decay"]):
            if last == 1 and decay != SEARCH["decay"][0]:
                continue  # one item: the decay changes nothing
            m = ItemItem({"last": last, "decay": decay}, None, t)
            rep = evaluate(m, "transitions", split, "valid", 10)
            rows.append({"source": "transitions", "window": window, "last": last, "decay": decay, **rep.means})
    return sorted(rows, key=lambda r: (r["source"], -r["NDCG@10"]))


def main(argv: list[str] | None = None) -> dict[str, object]:
    cfg = parse_args(argv)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.source, cfg.on_bad_row)
    split = split_dataset(ds, cfg.eval_users)
    print(f"{ds.name}: {ds.num_users} users, {ds.num_items} items, {len(split.train_user)} training interactions")
    results: dict[str, object] = {"model": "item-item", "dataset": ds.name, "config": asdict(cfg)}
    if cfg.search:
        results["search"] = grid = search(split, cfg)
        print("validation grid (NDCG@10, best first per source):")
        for row in grid:
            setting = {k: v for k, v in row.items() if k in ("ease_lambda", "window", "last", "decay")}
            print(f"  {row['source']:12s} {setting}  HR@10 {row['HR@10']:.4f}  NDCG@10 {row['NDCG@10']:.4f}")
    t0 = time.perf_counter()
    model = ItemItem.fit(split, cfg)
    results["fit_seconds"] = fit_seconds = time.perf_counter() - t0
    if model.ease is None:
        print(
            f"EASE skipped: {ds.num_items} items > --max-ease-items {cfg.max_ease_items} (a dense {ds.num_items}^2 "
            f"inverse); the neighbour model in its place ({len(model.neighbours.values)} item pairs, "
            f"{cfg.neighbours} per item)"
        )
    ease = f"EASE (lambda {cfg.ease_lambda:g}), " if model.ease is not None else ""
    print(
        f"fitted in {fit_seconds:.2f} s: {ease}transitions ({len(model.transitions.values)} item pairs, "
        f"window {cfg.window}, last {cfg.last}, decay {cfg.decay})"
    )
    for stage in ("valid",) if cfg.no_test else ("valid", "test"):
        for name in model.names:
            rep = evaluate(model, name, split, stage, cfg.n_boot)
            results.setdefault(stage, {})[name] = rep.to_dict()
            cells = " | ".join(
                f"{k} {v:.4f} [{rep.ci95[k][0]:.3f}, {rep.ci95[k][1]:.3f}]" for k, v in rep.means.items()
            )
            print(f"{name:12s} {stage:5s} | {cells}")
    out = Path(cfg.out)
    model.save(out / "export", ds)
    write_results(out, results)
    print(f"export in {out / 'export'}, results in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
