"""The project's main job: a two-stage recommender on real MovieLens, end to end.

    python -m integration.demo                    # (make demo) trains what is missing, then recommends
    python -m integration.demo --users 1,405,655  # other users (raw MovieLens IDs)
    python -m integration.demo --artifacts DIR    # another run directory

    python -m integration.demo --sequential none  # the two-tower and its ranker only
    python -m integration.demo --with-bert4rec    # also BERT4Rec, a third candidate source
    python -m integration.demo --dataset ml-1m    # another MovieLens (from GroupLens), in runs/ml-1m

If the artifacts are missing it trains them first, each stage a subprocess with a progress line
(logs in <artifacts>/demo-logs/): the two-tower retrieval model and its FAISS index, the DLRM ranker
on retrieval's candidates and its INT8 serving artifact (under 2 minutes on 2 CPU cores); then
SASRec (``--sequential``; 7-20 minutes), a ranker trained on SASRec's candidates and its artifact;
with ``--with-bert4rec`` also BERT4Rec (about 20 minutes) and its ranker; EASE and the item-to-item
transitions (``retrieval.item_item``, seconds). Then the served system is chosen on validation
(``integration.ensemble``, under a minute): the sources fused by reciprocal ranks with weights
fitted there, and every system compared there; then one DLRM is trained over the union of every
source's lists (``integration.union_ranker``, under a minute on ml-100k) and the served system chosen
again with it among the others (by its cross-fitted figure). Last, the query tower and the sequential scorers are
compiled with AOTInductor (``inference_legacy.aot_compile``; the rankers were when packaged), and the
union ranker (``integration.union_model``), as the service runs them. An interrupted run resumes from its checkpoints; a retrained stage retrains every
stage that reads it. Then it:

- builds the pipeline (``integration.loader.create_pipeline``, which checks the stages fit),
  serving the chosen system: on ml-100k the union ranker over the four sources' lists (the
  ensemble of the four in its own order, and each source re-ranked by the ranker trained on its
  candidates, are compared, and lose);
- prints, for a few users, their most recent movies and their top 10 with scores;
- prints the offline evaluation on the test split (``--stage valid``: validation, the split that
  chose the system) under the shared protocol (943 users, full ranking, seen items excluded) with
  95% bootstrap intervals: popularity, each candidate source alone and re-ranked, with two
  sources their union alone and re-ranked, their ensemble and the union ranker; and the served system's paired gain
  over each other system.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from common.baselines import popularity_report
from common.data.download import DataIntegrityError
from common.data.load import dataset_ref, load_dataset
from common.data.logs import LogError
from common.data.movielens import DataUnavailable
from common.metrics import RankingReport, paired_difference
from common.runtime import write_json_atomic

METRICS = ("HR@10", "NDCG@10", "Recall@100")


QUICK = {
    "retrieval": ["--epochs", "1", "--limit-batches", "30", "--n-boot", "10"],
    "ranking": ["--limit-batches", "30", "--eval-negatives", "20", "--n-boot", "10"],
    "sasrec": ["--epochs", "2", "--eval-every", "2", "--window-step", "200", "--n-boot", "10"],
    "bert4rec": ["--epochs", "2", "--eval-every", "2", "--window-step", "50", "--n-boot", "10"],
}


@dataclass
class Stage:
    name: str
    output: Path  # the file whose presence means the stage is done
    command: list[str]  # after ``python``
    after: list[int] = field(default_factory=list)  # stages it reads: when one of them ran, it runs again


def ranker_stages(
    root: Path,
    at: int,
    src: str,
    out: str,
    serving: str,
    after: list[int],
    cands: list[str],
    extra: list[str],
    quick: bool,
    data_dir: list[str],
) -> list[Stage]:
    """The ranker trained on ``src``'s candidates (stage ``at``) and its artifact (``at + 1``)."""
    retrieval_export = str(root / "retrieval" / "export")
    return [
        Stage(
            f"ranking: DLRM on {src}'s candidates",
            root / out / "results.json",
            [
                "-m",
                "golden_training.train_dlrm",
                "--retrieval-export",
                retrieval_export,
                *cands,
                "--out",
                str(root / out),
                "--no-baseline",
                "--resume",
                *extra,
            ],
            after,
        ),
        Stage(
            f"serving: INT8 artifact of the {src} ranker",
            root / serving / "manifest.json",
            [
                "-m",
                "inference_legacy.dlrm_packager",
                "--checkpoints",
                str(root / out / "checkpoints" / "dlrm"),
                "--out",
                str(root / serving),
                "--overwrite",
                *([] if quick else ["--compile"]),  # the AOTInductor package (tens of seconds)
                *data_dir,
            ],
            [at],
        ),
    ]


def stages(
    root: Path,
    quick: bool = False,
    sequential: tuple[str, ...] = ("sasrec",),
    data: list[str] | None = None,
    repeats: bool = False,
    budget: dict[str, list[str]] | None = None,
) -> list[Stage]:
    """Every stage, in order: the two-tower retriever, a ranker on its candidates and its INT8
    artifact; then for each sequential model (``sasrec``, ``bert4rec``) the model, a ranker trained
    on its candidates and that ranker's artifact; the query tower and the sequential scorers compiled
    (AOTInductor; not ``quick``); with a sequential model, the item-to-item sources
    (EASE and transitions, fitted in a second), the choice of the served system on validation
    (integration/ensemble.py), which reads every model before it, and last the union ranker over
    every source's lists (integration/union_ranker.py), which reads the choice's ensemble weights and
    chooses again with itself among the systems.
    ``quick``: tiny runs; ``data``: the data flags (--dataset, --data-dir) for the trainers; ``repeats``:
    the data set has them, so the "again" source is among those the served system is chosen from;
    ``budget``: more flags per trainer, a large log's (:func:`budget_flags`)."""
    data = data or []
    extra = {k: [*data, *(budget or {}).get(k, []), *(v if quick else [])] for k, v in QUICK.items()}
    data_dir = data[data.index("--data-dir") :][:2] if "--data-dir" in data else []
    dataset = data[data.index("--dataset") :][:2] if "--dataset" in data else []

    todo = [
        Stage(
            "retrieval: two-tower + FAISS",
            root / "retrieval" / "export" / "manifest.json",
            ["-m", "retrieval.two_tower_train", "--out", str(root / "retrieval"), "--resume", *extra["retrieval"]],
        ),
        *ranker_stages(
            root, 1, "two-tower", "ranking", "serving/dlrm-int8", [0], [], extra["ranking"], quick, data_dir
        ),
    ]
    names = ["two-tower"]  # the sources, as the pipeline names them
    # What is served compiled (not with --quick): the query tower and each sequential scorer, as the
    # rankers are by their packager's --compile; the figures of bench.pipeline_latency are of these.
    compile_after = (
        [] if quick else [(0, root / "retrieval" / "export", "query_tower.aoti.pt2", "two-tower query tower")]
    )
    for model in sequential:
        label = {"sasrec": "SASRec", "bert4rec": "BERT4Rec"}[model]
        names.append(label)
        export = root / model / "export"
        if not quick:
            compile_after.append((len(todo), export, "scorer.aoti.pt2", f"{label} scorer"))
        todo.append(
            Stage(
                f"{label}: sequential candidates",
                export / "manifest.json",
                ["-m", f"{model}.{model}_main", "--out", str(root / model), "--resume", *extra[model]],
            )
        )
        todo += ranker_stages(
            root,
            len(todo),
            label,
            f"ranking-{model}",
            f"serving/dlrm-int8-{model}",
            [0, len(todo) - 1],
            ["--candidates-export", str(export)],
            extra["ranking"],
            quick,
            data_dir,
        )
    compiles = [  # last: compiling changes no model, so no stage reads them
        Stage(
            f"serving: the {what} compiled (AOTInductor)",
            d / package,
            ["-m", "inference_legacy.aot_compile", str(d)],
            [at],
        )
        for at, d, package, what in compile_after
    ]
    if not sequential:  # the two-tower alone: re-ranked by its ranker, which its training shows beats its order
        return todo + compiles
    todo.append(
        Stage(
            "item-to-item: EASE + transitions",
            root / "item-item" / "export" / "manifest.json",
            ["-m", "retrieval.item_item", "--out", str(root / "item-item"), *dataset, *data_dir]
            + (["--n-boot", "10"] if quick else []),
        )
    )
    names.append("item-item")
    if repeats:
        names.append("again")
    models = list(range(len(todo)))
    from integration.loader import choice_file  # here: --help stays fast

    todo.append(
        Stage(
            "served system: ensemble fitted and systems compared on validation",
            choice_file(root, names),
            [
                "-m",
                "integration.ensemble",
                "--artifacts",
                str(root),
                "--sequential",
                ",".join(sequential) or "none",
                *data_dir,
            ],
            models,
        )
    )
    from integration.union_model import ARTIFACT, COMPILED  # here: --help stays fast

    todo.append(
        Stage(
            "union ranker: one DLRM over every source's lists, then the served system chosen again",
            root / ARTIFACT / "manifest.json",
            [
                "-m",
                "integration.union_ranker",
                "--artifacts",
                str(root),
                "--resume",  # a killed demo continues from its checkpoints (a finished run leaves none)
                "--sequential",
                ",".join(sequential) or "none",
                "--no-test",  # the table below scores test
                *data_dir,
                *(["--folds", "2", "--epochs", "1", "--n-boot", "10"] if quick else []),
            ],
            [len(todo) - 1],
        )
    )
    if not quick:  # retraining it removes its package, so this runs again after
        compiles.append(
            Stage(
                "serving: the union ranker compiled (AOTInductor)",
                root / ARTIFACT / COMPILED,
                [
                    "-m",
                    "integration.union_model",
                    "--artifacts",
                    str(root),
                    "--sequential",
                    ",".join(sequential) or "none",
                    *data_dir,
                ],
                [len(todo) - 1],
            )
        )
    return todo + compiles


def train_missing(
    root: Path,
    quick: bool = False,
    sequential: tuple[str, ...] = ("sasrec",),
    data: list[str] | None = None,
    repeats: bool = False,
    budget: dict[str, list[str]] | None = None,
) -> list[str]:
    """Run every stage whose output is missing, and every stage that reads one that ran; returns their names."""
    todo = stages(root, quick, sequential, data, repeats, budget)
    ran: list[str] = []
    done: set[int] = set()
    for n, st in enumerate(todo):
        if st.output.is_file() and not done & set(st.after):
            continue
        log = root / "demo-logs" / f"{n + 1}-{st.command[1].split('.')[0]}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        head = f"[{n + 1}/{len(todo)}] {st.name}"
        with open(log, "w") as f, tqdm(desc=f"{head}: starting", bar_format="{desc} | {elapsed}") as bar:
            proc = subprocess.Popen(
                [sys.executable, *st.command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )
            for line in proc.stdout:
                f.write(line)
                if line.strip() and "Warning" not in line and not line.startswith((" ", "W1", "  ")):
                    bar.set_description_str(f"{head}: {line.strip()[:90]}")
            if proc.wait() != 0:
                raise SystemExit(f"stage '{st.name}' failed (exit {proc.returncode}); its output is in {log}")
            bar.set_description_str(f"{head}: done")
        ran.append(st.name)
        done.add(n)
    return ran


# A large log (above this many interactions; ml-100k is far below) is trained within the demo's time
# budget on 2 cores: the rankers on each user's latest interactions, about RANKER_POSITIVES positives in
# all (each with 8 negatives); the sequential models with a sampled softmax over the catalog, on
# windows that do not overlap, for a few epochs (integration/README.md has what each costs).
LARGE_LOG, RANKER_POSITIVES = 500_000, 200_000
LARGE_SEQUENTIAL = ["--sampled-softmax", "2048", "--window-step", "50", "--epochs", "6", "--eval-every", "1"]


def budget_flags(ds) -> dict[str, list[str]]:
    """More flags per trainer for a large log (none up to :data:`LARGE_LOG` interactions)."""
    if ds.num_interactions <= LARGE_LOG:
        return {}
    last = max(20, RANKER_POSITIVES // ds.num_users)
    return {"ranking": ["--train-last", str(last)], "sasrec": LARGE_SEQUENTIAL, "bert4rec": LARGE_SEQUENTIAL}


def show_user(pipeline, rec, recent: int = 5) -> None:
    ds = pipeline.dataset
    hist = pipeline.store.history(pipeline.user_index[rec.user_id])[-recent:]
    n_hist = len(pipeline.store.history(pipeline.user_index[rec.user_id]))
    print(f"\nuser {rec.user_id}: {n_hist} {'interactions' if ds.repeats else 'movies seen'}; most recent:")
    for i in hist[::-1]:
        print(f"    {ds.title(i)}")
    how = f"re-ranked from {rec.candidates} candidates" if rec.stage == "ranked" else pipeline.served
    if pipeline.served == "union ranker":
        how = f"the union ranker over {rec.candidates} candidates from {len(pipeline.all_sources)} sources"
    print(f"  top {len(rec.item_ids)} ({rec.stage}: {how}):")
    again = rec.again or [False] * len(rec.item_ids)
    for n, (i, s, a) in enumerate(zip(rec.item_ids, rec.scores, again), 1):
        print(f"    {n:2d}. {ds.title(pipeline.item_index[i])}  {s:.3f}" + ("  (again)" if a else ""))


def cell(rep: RankingReport, m: str) -> str:
    lo, hi = rep.ci95[m]
    return f"{rep.means[m]:.4f} [{lo:.3f}, {hi:.3f}]"


def print_table(ds, stage: str, reports: dict[str, RankingReport], served: str) -> None:
    """Every system's figures with their intervals; on a data set with repeats also on repeat and
    new-item targets apart."""
    first = reports["two-tower"]
    how, metrics = "seen items excluded", METRICS
    if ds.repeats:  # a repeat is a valid target: nothing excluded
        groups = first.group_users
        how = f"seen items kept; targets: {groups['repeat']} repeats, {groups['new']} new items"
        metrics = (*METRICS, "NDCG@10 repeat", "NDCG@10 new")
    print(f"\n{ds.name} {stage}, {first.num_users} users, full ranking, {how} (95% CI over users):")
    print(f"{'':22s} | " + " | ".join(f"{m:>23s}" for m in metrics))
    for name, rep in reports.items():
        mark = "  <- served" if name == served else ""
        print(f"{name:22s} | " + " | ".join(f"{cell(rep, m):>23s}" for m in metrics) + mark)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dataset",
        default="ml-100k",
        type=dataset_ref,
        help="a MovieLens variant (the larger ones come from GroupLens) or an interaction log's spec file "
        "(common/data/logs.py) (default: %(default)s)",
    )
    p.add_argument(
        "--artifacts",
        default=None,
        help="run directory holding every stage (default: runs, or runs/<dataset> for other data sets)",
    )
    p.add_argument(
        "--users", default=None, help="raw user IDs to show (default: 196,186,22 on ml-100k, else the first three)"
    )
    p.add_argument(
        "--data-dir", default=None, help="data cache (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
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
        "--sequential",
        default="sasrec",
        type=lambda v: tuple(x for x in v.split(",") if x and x != "none"),
        help="sequential candidate sources to train (if missing) and serve beside the two-tower: sasrec, "
        "bert4rec, both (sasrec,bert4rec) or none (default: sasrec)",
    )
    p.add_argument(
        "--with-bert4rec",
        action="store_true",
        help="also BERT4Rec (about 10 more minutes to train), with a ranker on its candidates",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="train tiny models if any are missing (a smoke run: its numbers are not the README's)",
    )
    a = p.parse_args(argv)
    from integration.loader import create_pipeline  # after argparse: --help stays fast

    t0 = time.perf_counter()
    try:  # fetch, verify or prepare it now: a data problem is reported before training, in one line
        ds = load_dataset(a.dataset, a.data_dir)
    except (DataUnavailable, DataIntegrityError, LogError) as err:
        raise SystemExit(f"error: {err}") from None
    root = Path(a.artifacts or ("runs" if a.dataset == "ml-100k" else f"runs/{ds.name}"))
    data = ["--dataset", a.dataset] + (["--data-dir", a.data_dir] if a.data_dir else [])
    sequential = tuple(dict.fromkeys(a.sequential + (("bert4rec",) if a.with_bert4rec else ())))
    bad = [m for m in sequential if m not in ("sasrec", "bert4rec")]
    if bad:
        p.error(f"--sequential {','.join(bad)}: the sequential sources are sasrec and bert4rec (or none)")
    trained = train_missing(root, a.quick, sequential, data, ds.repeats, budget_flags(ds))
    # served: the system chosen on validation (the last stage above)
    pipeline = create_pipeline(root, data_dir=a.data_dir, sequential=[f"{m}/export" for m in sequential])
    if a.users is None:
        users = [196, 186, 22] if a.dataset == "ml-100k" else ds.user_raw_ids[:3].tolist()
    else:
        users = [u.strip() if ds.user_raw_ids.dtype == object else int(u) for u in a.users.split(",") if u.strip()]
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
    final = pipeline.served
    print_table(pipeline.dataset, a.stage, reports, final)
    gains = {}
    for other in (n for n in reports if n not in (final, "popularity")):
        gains[other] = gain = paired_difference(reports[final], reports[other], n_boot=a.n_boot)
        lo, hi = gain["NDCG@10_ci95"]
        print(f"{final} minus {other}, NDCG@10: {gain['NDCG@10']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    # Peak resident memory: of the largest stage process (the getrusage of waited children is their
    # maximum) and of this one, which serves and evaluates.
    import resource

    peaks = {
        who: resource.getrusage(w).ru_maxrss / 2**20
        for who, w in (("stages", resource.RUSAGE_CHILDREN), ("demo", resource.RUSAGE_SELF))
    }
    print(
        f"{time.perf_counter() - t0:.0f} s in all; peak memory {peaks['stages']:.2f} GB (largest stage), {peaks['demo']:.2f} GB (this process)"
    )
    results = {
        "trained": trained,
        "peak_memory_gb": peaks,
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
