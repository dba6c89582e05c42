"""Every system of the project on a data set (ml-100k by default), each row the mean of several training seeds.

    python -m integration.compare                       # (make compare) seeds 0 1 2: trains what is missing, then the table
    python -m integration.compare --seeds 0 --stage valid
    python -m integration.compare --dataset completejourney --sequential sasrec   # (make compare DATASET=...)

For each seed it trains, under ``<root>/seed-<n>`` (default ``runs/compare``), everything the demo
trains (integration/demo.py: the two-tower and each ``--sequential`` source, each with a DLRM ranker
trained on its own candidates and that ranker's INT8 artifact; then the ensemble of the sources,
fitted on validation, and the served system, chosen there; an interrupted run resumes), then
evaluates every system under the shared protocol (full ranking, seen items excluded, or kept with
repeat and new-item columns on a data set with repeats):
popularity; each candidate source alone and re-ranked by its ranker; the union of the sources
alone and re-ranked; the ensemble; and "served", each seed's chosen system (what its demo and
service serve).

Validation chose every weight and the served system; test is evaluated once, after. The table gives,
per system, the mean over seeds with a 95% bootstrap interval over users (each user's metric
averaged over the seeds first, so the interval is about the users, and the seeds' spread is listed
beside it), every seed's figure, and the served system's paired difference with every other system
over the same users. Results in ``<root>/compare_<stage>.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common.data.load import dataset_ref, load_dataset
from common.metrics import bootstrap_ci, per_user_metrics, repeat_mask
from common.runtime import write_json_atomic

METRICS = ("HR@10", "NDCG@10", "Recall@100")
SEQUENTIAL = ("sasrec", "bert4rec")


def evaluate_seed(
    root: Path, stage: str, sequential: tuple[str, ...], data_dir: str | None = None
) -> tuple[dict[str, dict[str, np.ndarray]], str]:
    """Per system, per metric: the per-user values (users in index order) of one seed's run, with
    a "served" row (the system the run's pipeline serves), and that system's name. On a data set
    with repeats also "NDCG@10 repeat" and "NDCG@10 new": the values of the users of each kind."""
    from common.baselines import popularity_report
    from integration.loader import create_pipeline

    pipeline = create_pipeline(root, data_dir=data_dir, sequential=[f"{m}/export" for m in sequential])
    reports = {"popularity": popularity_report(pipeline.split, stage, n_boot=10), **pipeline.evaluate(stage, n_boot=10)}
    users = reports["popularity"].users
    repeat = repeat_mask(pipeline.split, stage, users)
    out = {}
    for name, rep in reports.items():
        assert np.array_equal(rep.users, users)
        out[name] = per_user_metrics(rep.ranks)
        if repeat is not None:
            out[name] |= {"NDCG@10 repeat": out[name]["NDCG@10"][repeat], "NDCG@10 new": out[name]["NDCG@10"][~repeat]}
    out["served"] = out[pipeline.served]
    return out, pipeline.served


def metrics_of(run: dict[str, dict[str, np.ndarray]]) -> tuple[str, ...]:
    """The reported metrics: with repeat and new-item columns where the runs have them."""
    return METRICS + tuple(m for m in ("NDCG@10 repeat", "NDCG@10 new") if m in run["popularity"])


def summarize(per_seed: list[dict[str, dict[str, np.ndarray]]], n_boot: int) -> dict[str, dict[str, object]]:
    """Per system and metric: mean over seeds, each seed's mean, and the users' bootstrap interval
    of the seed-averaged per-user values."""
    table = {}
    for name in per_seed[0]:
        row = {}
        for m in metrics_of(per_seed[0]):
            values = np.mean([s[name][m] for s in per_seed], axis=0)
            row[m] = float(values.mean())
            row[f"{m}_ci95"] = list(bootstrap_ci(values, n_boot=n_boot))
            row[f"{m}_seeds"] = [float(s[name][m].mean()) for s in per_seed]
        table[name] = row
    return table


def paired(per_seed: list[dict[str, dict[str, np.ndarray]]], a: str, b: str, n_boot: int) -> dict[str, object]:
    """``a`` minus ``b`` per user (averaged over seeds), mean and bootstrap interval, per metric."""
    out = {}
    for m in metrics_of(per_seed[0]):
        d = np.mean([s[a][m] - s[b][m] for s in per_seed], axis=0)
        out[m] = float(d.mean())
        out[f"{m}_ci95"] = list(bootstrap_ci(d, n_boot=n_boot))
        out[f"{m}_seeds"] = [float((s[a][m] - s[b][m]).mean()) for s in per_seed]
    return out


def print_table(
    table: dict[str, dict[str, object]],
    stage: str,
    served: str,
    seeds: list[int],
    name: str = "ml-100k",
    users: int = 943,
) -> None:
    metrics = [m for m in (*METRICS, "NDCG@10 repeat", "NDCG@10 new") if m in table["popularity"]]
    how = "seen items kept (repeats)" if "NDCG@10 repeat" in metrics else "seen items excluded"
    print(f"\n{name} {stage}, {users} users, full ranking, {how}; mean of seeds {seeds} [95% CI over users]")
    print(f"{'':20s} | " + " | ".join(f"{m:>24s}" for m in metrics) + " | NDCG@10 per seed")
    for name, row in table.items():
        cells = " | ".join(
            f"{row[m]:.4f} [{row[m + '_ci95'][0]:.3f}, {row[m + '_ci95'][1]:.3f}]".rjust(24) for m in metrics
        )
        per = " ".join(f"{v:.4f}" for v in row["NDCG@10_seeds"])
        print(f"{name:20s} | {cells} | {per}" + ("  <- served" if name == served else ""))


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument(
        "--dataset",
        default="ml-100k",
        type=dataset_ref,
        help="the data set (as every script takes it: ml-100k, completejourney, a spec) (default: %(default)s)",
    )
    p.add_argument(
        "--data-dir", default=None, help="data cache (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
    )
    p.add_argument(
        "--root",
        default=None,
        help="run directories <root>/seed-<n> (default: runs/compare, or runs/compare-<dataset> for others)",
    )
    p.add_argument(
        "--stage",
        default="test",
        choices=["valid", "test"],
        help="'test': choose the served system on validation, then evaluate test once; 'valid': validation only "
        "(default: %(default)s)",
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument(
        "--sequential",
        default=",".join(SEQUENTIAL),
        type=lambda v: tuple(x for x in v.split(",") if x),
        help="sequential sources beside the two-tower (default: sasrec,bert4rec)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny models (a smoke run of the command: its numbers mean nothing)"
    )
    a = p.parse_args(argv)
    from integration.demo import budget_flags, train_missing

    t0 = time.perf_counter()
    ds = load_dataset(a.dataset, a.data_dir)
    a.root = a.root or ("runs/compare" if a.dataset == "ml-100k" else f"runs/compare-{ds.name}")
    roots = [Path(a.root) / f"seed-{s}" for s in a.seeds]
    data = [] if a.dataset == "ml-100k" else ["--dataset", a.dataset]  # ml-100k: the commands as they were
    data += ["--data-dir", a.data_dir] if a.data_dir else []
    for seed, root in zip(a.seeds, roots):
        print(f"seed {seed}: {root}", flush=True)
        train_missing(root, a.quick, a.sequential, ["--seed", str(seed), *data], ds.repeats, budget_flags(ds))
    valid_runs, systems = zip(*(evaluate_seed(r, "valid", a.sequential, a.data_dir) for r in roots))
    valid = summarize(list(valid_runs), a.n_boot)
    results: dict[str, object] = {
        "seeds": a.seeds,
        "served": list(systems),  # each seed's, chosen on its validation by integration.ensemble
        "chosen_on": "valid NDCG@10",
        "users": int(len(valid_runs[0]["popularity"]["HR@10"])),
        "valid": valid,
    }
    runs = list(valid_runs)
    if a.stage == "test":
        runs = [evaluate_seed(r, "test", a.sequential, a.data_dir)[0] for r in roots]  # test, once, every system
        results["test"] = summarize(runs, a.n_boot)
    table = results[a.stage]
    print_table(table, a.stage, "served", a.seeds, ds.name, results["users"])
    print("served per seed: " + ", ".join(f"seed {s}: {n}" for s, n in zip(a.seeds, systems)))
    # Popularity too: on a data set with repeats its new-item column is the floor the served system must clear.
    others = [n for n in table if n != "served" and set(systems) != {n}]
    results[f"{a.stage}_served_minus"] = gains = {n: paired(runs, "served", n, a.n_boot) for n in others}
    for n, g in gains.items():
        cells = [m for m in ("NDCG@10", "NDCG@10 new") if m in g]
        print(
            f"served minus {n}: "
            + ", ".join(f"{m} {g[m]:+.4f} [{g[m + '_ci95'][0]:+.4f}, {g[m + '_ci95'][1]:+.4f}]" for m in cells)
        )
    if "again" in table and "again" not in systems:
        ratio = {m: table["served"][m] / table["again"][m] for m in ("NDCG@10", "HR@10")}
        results[f"{a.stage}_served_over_again"] = ratio
        print("served / again: " + ", ".join(f"{m} {r:.2f}x" for m, r in ratio.items()))
    results["seconds"] = time.perf_counter() - t0
    write_json_atomic(Path(a.root) / f"compare_{a.stage}.json", results)
    print(f"results in {Path(a.root) / f'compare_{a.stage}.json'}")
    return results


if __name__ == "__main__":
    main()
