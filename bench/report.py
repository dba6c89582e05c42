"""Charts from the results files: what the terminal tables say, drawn.

    python -m bench.report                  # make report: bench/results/ -> docs/charts/*.png
    python -m bench.report --collect runs   # first copy a run directory's results into bench/results/

Each chart is drawn only when its results file exists, so the command works on any subset:

- ``curves_<stage>.png`` from ``bench/results/curves/<stage>.jsonl`` (the ``metrics.jsonl`` every
  training script writes): training loss and throughput against the step, validation metrics per epoch;
  ``curves_zch.png``: the loss of every ZCH run in one chart;
- ``systems_test.png`` from ``demo_results.json`` (``make demo``): every system's test HR@10 and
  NDCG@10 with their 95% intervals, the demo's table as a chart;
- ``systems_compare.png`` from ``compare_ml100k.json`` (``make compare``): the same for every system,
  each the mean of three training seeds, the served row marked;
- ``systems_compare_bert4rec.png`` from ``compare_ml100k_bert4rec.json`` (``make compare
  SEQUENTIAL=sasrec,bert4rec``): the same with BERT4Rec as a source;
- ``serving_load.png`` from ``serving_load.json`` (``bench.serving_load``): requests/s and p99 against
  the number of clients, with and without dynamic batching;
- ``faiss_recall_qps.png`` from ``faiss_indexes.json`` (``bench.faiss_indexes``): recall@100 against
  queries/s per index type, single-threaded and batched;
- ``zch.png`` from ``zch.json`` (``zch.main``'s results.json): test AUC and collision rate against the
  table size, per ID-to-row variant.

``--collect DIR`` copies ``DIR/*/metrics.jsonl`` (and ``DIR/zch/*/metrics.jsonl``), ``DIR/demo_results.json``
and ``DIR/zch/results.json`` into the results folder first, so that the committed charts can be redrawn
from committed files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

STAGE_TITLES = {
    "two_tower": "two-tower retrieval",
    "dlrm": "DLRM ranker",
    "lr": "logistic-regression ranker",
    "bert4rec": "BERT4Rec",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(rows: list[dict], title: str, out: Path) -> Path:
    """Loss and throughput against the step; validation metrics per epoch."""
    train = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "valid"]
    fig, (ax_loss, ax_valid) = plt.subplots(1, 2, figsize=(11, 3.8))
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], color="#2d6cdf", label="training loss")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        if all("examples_per_s" in r for r in train):
            ax_rate = ax_loss.twinx()
            ax_rate.plot(
                steps,
                [r["examples_per_s"] / 1000 for r in train],
                color="#999",
                lw=0.8,
                ls="--",
                label="thousand examples/s",
            )
            ax_rate.set_ylabel("thousand examples/s", color="#777")
        ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_title(f"{title}: training")
    keys = [k for k in ("NDCG@10", "HR@10", "auc", "rerank_NDCG@10", "Recall@100") if any(k in r for r in valid)]
    for key in keys[:3]:
        pts = [(r["epoch"], r[key]) for r in valid if key in r]
        ax_valid.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax_valid.set_xlabel("epoch")
    ax_valid.set_title(f"{title}: validation")
    if keys:
        ax_valid.legend(fontsize=8)
    return _save(fig, out)


def systems(results: dict, out: Path) -> Path:
    """Every system's test HR@10 and NDCG@10 with 95% intervals; the served one marked."""
    table = results["test"]
    names = sorted(table, key=lambda n: table[n]["NDCG@10"])
    served = results.get("served")
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.5), sharey=True)
    for ax, metric in zip(axes, ("HR@10", "NDCG@10")):
        means = [table[n][metric] for n in names]
        lo = [table[n][metric] - table[n][f"{metric}_ci95"][0] for n in names]
        hi = [table[n][f"{metric}_ci95"][1] - table[n][metric] for n in names]
        colors = ["#2d6cdf" if n == served else "#9fb3d9" for n in names]
        ax.barh(names, means, xerr=[lo, hi], color=colors, capsize=3)
        ax.set_xlabel(f"{metric} ({results.get('stage', 'test')}, 95% interval over users)")
    users = table[names[0]].get("num_users", results.get("users"))
    fig.suptitle(f"{users} users, full ranking, seen items excluded; dark: the served system ({served})", fontsize=10)
    return _save(fig, out)


def compare_systems(results: dict, out: Path) -> Path:
    """:func:`systems` for ``integration.compare``'s results: means of the seeds, the served row marked."""
    one = len(set(results["served"])) == 1  # every seed chose the same system: mark its row
    table = {n: row for n, row in results["test"].items() if not (one and n == "served")}
    served = results["served"][0] if one else "served"
    seeds = ", ".join(str(s) for s in results["seeds"])
    return systems(
        {"test": table, "served": served, "users": results.get("users"), "stage": f"test, seeds {seeds}"}, out
    )


def serving_load(results: dict, out: Path) -> Path:
    """Requests/s and p99 against clients, with and without dynamic batching."""
    fig, (ax_rate, ax_p99) = plt.subplots(1, 2, figsize=(11, 3.6))
    for mode, style in (("batching", "o-"), ("no_batching", "s--")):
        levels = results.get(mode) or []
        if not levels:
            continue
        clients = [r["concurrency"] for r in levels]
        label = "dynamic batching" if mode == "batching" else "batching off"
        ax_rate.plot(clients, [r["requests_per_s"] for r in levels], style, label=label)
        ax_p99.plot(clients, [r["p99_ms"] for r in levels], style, label=label)
    for ax, what in ((ax_rate, "requests/s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    ax_rate.set_title(f"DLRM service, {results.get('rows_per_request', 1)} row(s) per request", fontsize=10)
    return _save(fig, out)


def faiss_recall(results: dict, out: Path) -> Path:
    """Recall@k against queries/s, per index type; the exact search for reference."""
    by_type: dict[str, list[dict]] = defaultdict(list)
    for row in results["rows"]:
        by_type[row["type"]].append(row)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, key, what in ((axes[0], "qps_single_thread", "single-threaded"), (axes[1], "qps_batched", "batched")):
        for kind, rows in by_type.items():
            rows = sorted(rows, key=lambda r: r[key])
            ax.plot([r[key] for r in rows], [r["recall_at_k"] for r in rows], "o-", label=kind)
            for r in rows:
                if r.get("is_default"):
                    ax.annotate(
                        "default", (r[key], r["recall_at_k"]), fontsize=8, xytext=(4, -10), textcoords="offset points"
                    )
        ax.set_xscale("log")
        ax.set_xlabel(f"queries/s, {what}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"recall@{results.get('k', 100)}")
    axes[0].set_title(f"{results.get('items', 0):,} items x {results.get('dim', '')} dims", fontsize=10, loc="left")
    return _save(fig, out)


def zch(results: dict, out: Path) -> Path:
    """Test AUC and collision rate against the table size, per variant."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for row in results["results"]:
        by_variant[row["variant"]].append(row)
    fig, (ax_auc, ax_col) = plt.subplots(1, 2, figsize=(11, 3.6))
    for variant, rows in by_variant.items():
        rows = sorted(rows, key=lambda r: _size(r["table_size"]))
        sizes = [_size(r["table_size"]) for r in rows]
        style = "k*" if variant == "full" else "o-"
        ax_auc.plot(
            sizes, [r["auc_test"] for r in rows], style, label=variant, markersize=9 if variant == "full" else 5
        )
        ax_col.plot(sizes, [r["collision_rate"] for r in rows], style, label=variant)
    ax_auc.set_ylabel("test AUC")
    ax_col.set_ylabel("collision rate (test lookups)")
    for ax in (ax_auc, ax_col):
        ax.set_xlabel("table rows / distinct IDs")
        ax.legend(fontsize=8)
    ax_auc.set_title(str(results.get("data", "")), fontsize=10, loc="left")
    return _save(fig, out)


def zch_curves(runs: dict[str, list[dict]], out: Path) -> Path:
    """Training loss against the step for every ID-to-row variant and table size, in one chart."""
    fig, ax = plt.subplots(figsize=(11, 3.8))
    for name, rows in sorted(runs.items()):
        train = [r for r in rows if r["split"] == "train"]
        ax.plot(
            [r["step"] for r in train],
            [r["loss"] for r in train],
            lw=1,
            label=name,
            ls="-" if "zch" in name else "--" if "modulo" in name else ":",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (BCE)")
    ax.set_title("ZCH ranker: training loss per variant and table size", fontsize=10, loc="left")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out)


def _size(label: str) -> float:
    """'0.25x' -> 0.25; 'all IDs' (the unhashed model) -> 1."""
    return float(label.rstrip("x")) if label.endswith("x") else 1.0


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def collect(runs: Path, results: Path) -> list[Path]:
    """Copy a run directory's curves and results into the results folder."""
    copied = []
    curves_dir = results / "curves"
    for metrics in sorted([*runs.glob("*/metrics.jsonl"), *runs.glob("zch/*/metrics.jsonl")]):
        rows = read_jsonl(metrics)
        for stage in sorted({r["stage"] for r in rows}):
            dst = curves_dir / f"{stage}.jsonl"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text("".join(json.dumps(r) + "\n" for r in rows if r["stage"] == stage))
            copied.append(dst)
    results.mkdir(parents=True, exist_ok=True)
    for src, name in ((runs / "demo_results.json", "demo_results.json"), (runs / "zch" / "results.json", "zch.json")):
        if src.is_file():
            shutil.copyfile(src, results / name)
            copied.append(results / name)
    return copied


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="bench/results", help="where the results files are (default: %(default)s)")
    p.add_argument("--out", default="docs/charts", help="where the charts go (default: %(default)s)")
    p.add_argument(
        "--collect",
        default=None,
        metavar="RUNS",
        help="first copy this run directory's curves and results into --results",
    )
    a = p.parse_args(argv)
    results, out = Path(a.results), Path(a.out)
    if a.collect:
        for path in collect(Path(a.collect), results):
            print(f"collected {path}")
    made = []
    runs = sorted((results / "curves").glob("*.jsonl"))
    for path in [p for p in runs if not p.stem.startswith("zch-")]:
        made.append(curves(read_jsonl(path), STAGE_TITLES.get(path.stem, path.stem), out / f"curves_{path.stem}.png"))
    zch_runs = {p.stem.removeprefix("zch-"): read_jsonl(p) for p in runs if p.stem.startswith("zch-")}
    if zch_runs:
        made.append(zch_curves(zch_runs, out / "curves_zch.png"))
    for name, draw, chart in (
        ("demo_results.json", systems, "systems_test.png"),
        ("compare_ml100k.json", compare_systems, "systems_compare.png"),
        ("compare_ml100k_bert4rec.json", compare_systems, "systems_compare_bert4rec.png"),
        ("serving_load.json", serving_load, "serving_load.png"),
        ("faiss_indexes.json", faiss_recall, "faiss_recall_qps.png"),
        ("zch.json", zch, "zch.png"),
    ):
        if (results / name).is_file():
            made.append(draw(json.loads((results / name).read_text()), out / chart))
    for path in made:
        print(f"wrote {path}")
    if not made:
        print(f"no results under {results}: run the benchmarks or make demo first (see bench/README or the README)")
    return made


if __name__ == "__main__":
    main()
