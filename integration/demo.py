"""The project's main job: a two-stage recommender on real MovieLens, end to end.

    python -m integration.demo                    # (make demo) trains what is missing, then recommends
    python -m integration.demo --users 1,405,655  # other users (raw MovieLens IDs)
    python -m integration.demo --artifacts DIR    # another run directory

    python -m integration.demo --with-bert4rec    # also BERT4Rec, the second candidate source
    python -m integration.demo --dataset ml-1m    # another MovieLens (from GroupLens), in runs/ml-1m

If the artifacts are missing it trains them first, each stage a subprocess with a progress line
(under 2 minutes on 2 CPU cores; logs in <artifacts>/demo-logs/): the two-tower retrieval model
and its FAISS index, the DLRM ranker on retrieval's candidates, and the ranker's INT8 serving
artifact; with ``--with-bert4rec`` also BERT4Rec (about 10 minutes). An interrupted run resumes
from its checkpoints. Then it:

- builds the pipeline (``integration.pipeline.create_pipeline``, which checks the stages fit);
  when ``<artifacts>/bert4rec/export`` exists the ranker re-orders BERT4Rec's candidates (the
  best re-ranked system on validation), else the two-tower's;
- prints, for a few users, their most recent movies and their top 10 with scores;
- prints the offline evaluation on the test split (``--stage valid``: validation, the split that
  chooses between systems) under the shared protocol (943 users, full ranking, seen items
  excluded) with 95% bootstrap intervals: popularity, each candidate source alone and re-ranked,
  and with two sources their union alone and re-ranked; and the served system's paired gain over
  each source alone and each other re-ranked system.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from common.baselines import popularity_report
from common.data.download import DataIntegrityError
from common.data.movielens import ARCHIVES, DataUnavailable, load_movielens
from common.metrics import RankingReport, paired_difference
from common.runtime import write_json_atomic

METRICS = ("HR@10", "NDCG@10", "Recall@100")


QUICK = {
    "retrieval": ["--epochs", "1", "--limit-batches", "30", "--n-boot", "10"],
    "ranking": ["--limit-batches", "30", "--eval-negatives", "20", "--n-boot", "10"],
    "bert4rec": ["--epochs", "2", "--eval-every", "2", "--window-step", "50", "--n-boot", "10"],
}


def stages(
    root: Path, quick: bool = False, bert4rec: bool = False, data: list[str] | None = None
) -> list[tuple[str, Path, list[str]]]:
    """(name, what it produces, command) for each stage, in order; ``quick``: tiny runs; ``data``:
    the data flags (--dataset, --data-dir) for the trainers."""
    extra = QUICK if quick else {"retrieval": [], "ranking": [], "bert4rec": []}
    data = data or []
    extra = {k: [*data, *v] for k, v in extra.items()}
    data_dir = data[data.index("--data-dir") :][:2] if "--data-dir" in data else []
    b4r = [
        (
            "BERT4Rec: sequential candidates",
            root / "bert4rec" / "export" / "manifest.json",
            ["-m", "bert4rec.bert4rec_main", "--out", str(root / "bert4rec"), "--resume", *extra["bert4rec"]],
        )
    ]
    return [
        (
            "retrieval: two-tower + FAISS",
            root / "retrieval" / "export" / "manifest.json",
            ["-m", "retrieval.two_tower_train", "--out", str(root / "retrieval"), "--resume", *extra["retrieval"]],
        ),
        (
            "ranking: DLRM on retrieval's candidates",
            root / "ranking" / "results.json",
            [
                "-m",
                "golden_training.train_dlrm",
                "--retrieval-export",
                str(root / "retrieval" / "export"),
                "--out",
                str(root / "ranking"),
                "--no-baseline",
                "--resume",
                *extra["ranking"],
            ],
        ),
        (
            "serving: INT8 ranking artifact",
            root / "serving" / "dlrm-int8" / "manifest.json",
            [
                "-m",
                "inference_legacy.dlrm_packager",
                "--checkpoints",
                str(root / "ranking" / "checkpoints" / "dlrm"),
                "--out",
                str(root / "serving" / "dlrm-int8"),
                "--overwrite",
                *data_dir,
            ],
        ),
    ] + (b4r if bert4rec else [])


def train_missing(root: Path, quick: bool = False, bert4rec: bool = False, data: list[str] | None = None) -> list[str]:
    """Run every stage whose output is missing (and every later one of the chain); returns their names."""
    todo = stages(root, quick, bert4rec, data)
    chain = 3  # retrieval -> ranking (on retrieval's candidates) -> its artifact: a missing link redoes the rest
    first = next((n for n, (_, out, _) in enumerate(todo[:chain]) if not out.is_file()), chain)
    run = list(range(first, chain)) + [n for n in range(chain, len(todo)) if not todo[n][1].is_file()]
    ran = []
    for n, (name, _, cmd) in [(n + 1, todo[n]) for n in run]:
        log = root / "demo-logs" / f"{n}-{cmd[1].split('.')[0]}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        head = f"[{n}/{len(todo)}] {name}"
        with open(log, "w") as f, tqdm(desc=f"{head}: starting", bar_format="{desc} | {elapsed}") as bar:
            proc = subprocess.Popen(
                [sys.executable, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )
            for line in proc.stdout:
                f.write(line)
                if line.strip() and "Warning" not in line and not line.startswith((" ", "W1", "  ")):
                    bar.set_description_str(f"{head}: {line.strip()[:90]}")
            if proc.wait() != 0:
                raise SystemExit(f"stage '{name}' failed (exit {proc.returncode}); its output is in {log}")
            bar.set_description_str(f"{head}: done")
        ran.append(name)
    return ran


def show_user(pipeline, rec, recent: int = 5) -> None:
    ds = pipeline.dataset
    hist = pipeline.store.history(pipeline.user_index[rec.user_id])[-recent:]
    print(
        f"\nuser {rec.user_id}: {len(pipeline.store.history(pipeline.user_index[rec.user_id]))} movies seen; "
        f"most recent:"
    )
    for i in hist[::-1]:
        print(f"    {ds.item_title[i]} ({ds.item_year[i]})")
    print(f"  top {len(rec.item_ids)} ({rec.stage}, re-ranked from {rec.candidates} candidates):")
    for n, (t, i, s) in enumerate(zip(rec.titles, rec.item_ids, rec.scores), 1):
        year = ds.item_year[pipeline.item_index[i]]
        print(f"    {n:2d}. {t} ({year})  {s:.3f}")


def cell(rep: RankingReport, m: str) -> str:
    lo, hi = rep.ci95[m]
    return f"{rep.means[m]:.4f} [{lo:.3f}, {hi:.3f}]"


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dataset",
        default="ml-100k",
        choices=sorted(ARCHIVES),
        help="MovieLens variant; the larger ones come from GroupLens (default: %(default)s)",
    )
    p.add_argument(
        "--artifacts",
        default=None,
        help="run directory holding every stage (default: runs, or runs/<dataset> for other data sets)",
    )
    p.add_argument("--users", default="196,186,22", help="raw MovieLens user IDs to show (default: %(default)s)")
    p.add_argument(
        "--data-dir", default=None, help="MovieLens cache (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
    )
    p.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals (default: %(default)s)"
    )
    p.add_argument(
        "--stage",
        default="test",
        choices=["valid", "test"],
        help="split to evaluate on; 'valid' for choosing between systems, test untouched (default: %(default)s)",
    )
    p.add_argument("--write-topk", default=None, help="also write every user's top 10 as JSON lines to this file")
    p.add_argument(
        "--with-bert4rec",
        action="store_true",
        help="also train BERT4Rec if it is missing (about 10 minutes): the second candidate source",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="train tiny models if any are missing (a smoke run: its numbers are not the README's)",
    )
    a = p.parse_args(argv)
    from integration.pipeline import create_pipeline  # after argparse: --help stays fast

    root = Path(a.artifacts or ("runs" if a.dataset == "ml-100k" else f"runs/{a.dataset}"))
    t0 = time.perf_counter()
    try:  # fetch and verify it now: a data problem is reported before training, in one line
        load_movielens(a.dataset, a.data_dir)
    except (DataUnavailable, DataIntegrityError) as err:
        raise SystemExit(f"error: {err}") from None
    data = ["--dataset", a.dataset] + (["--data-dir", a.data_dir] if a.data_dir else [])
    trained = train_missing(root, a.quick, a.with_bert4rec, data)
    pipeline = create_pipeline(root, data_dir=a.data_dir)  # with BERT4Rec's candidates when its export exists
    users = [int(u) for u in a.users.split(",") if u.strip()]
    for rec in pipeline.recommend(users):
        if rec.stage == "popular":
            print(
                f"\nuser {rec.user_id} is not in {pipeline.dataset.name}; the most popular movies: "
                + "; ".join(rec.titles)
            )
        else:
            show_user(pipeline, rec)

    reports = {
        "popularity": popularity_report(pipeline.split, a.stage, n_boot=a.n_boot),
        **pipeline.evaluate(a.stage, n_boot=a.n_boot),
    }
    final = f"{pipeline.candidate_source} + ranker"
    print(
        f"\n{pipeline.dataset.name} {a.stage}, {reports['two-tower'].num_users} users, full ranking, seen items "
        f"excluded (95% CI over users):"
    )
    print(f"{'':22s} | " + " | ".join(f"{m:>23s}" for m in METRICS))
    for name, rep in reports.items():
        mark = "  <- served" if name == final else ""
        print(f"{name:22s} | " + " | ".join(f"{cell(rep, m):>23s}" for m in METRICS) + mark)
    gains = {}
    others = [src.name for src in pipeline.sources] + [name for name in reports if name.endswith("+ ranker")]
    for single in dict.fromkeys(n for n in others if n != final):
        gains[single] = gain = paired_difference(reports[final], reports[single], n_boot=a.n_boot)
        lo, hi = gain["NDCG@10_ci95"]
        alone = "" if single.endswith("+ ranker") else " alone"
        print(f"{final} minus {single}{alone}, NDCG@10: {gain['NDCG@10']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    results = {
        "trained": trained,
        "users": [r.to_dict() for r in pipeline.recommend(users)],
        "stage": a.stage,
        a.stage: {name: rep.to_dict() for name, rep in reports.items()},
        "served": final,
        "gains_ndcg10": gains,
        "seconds": time.perf_counter() - t0,
    }
    if a.write_topk:
        n = pipeline.write_topk(a.write_topk)
        print(f"wrote the top 10 of {n} users to {a.write_topk}")
    write_json_atomic(root / ("demo_results.json" if a.stage == "test" else "demo_results_valid.json"), results)
    return results


if __name__ == "__main__":
    main()
