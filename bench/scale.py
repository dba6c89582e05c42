"""The whole chain at scale, from 10^5 to 2x10^7 interactions, through the path a team's own log takes.

    python -m bench.scale                          # 1e5, 1e6, 1e7 and 2e7 interactions (make scale)
    python -m bench.scale --sizes 1e5 1e6          # some of them
    python -m bench.scale --sizes 1e5 --smoke      # the CI-sized run (make test runs it)

For each size N the synthetic generator (bench/synthetic.py) writes N interactions over N/20
users and N/100 items (planted topics, power-law popularity, order within a session) as a sharded
Parquet log with a spec, and every stage runs in its own process on that spec, as on a user's log:

1. ``prepare``: read and check the log, map the 64-bit IDs, sort, split, write the memory-mapped
   cache (``common.prepare_data``);
2. ``two-tower``: one epoch of the two towers, with the FAISS index built into its export
   (``retrieval.two_tower_train``; the index's build time is reported as ``faiss index``);
3. ``candidates``: every sampled user's top 100 through the FAISS index, against exact search
   (``retrieval.two_tower_retrieval``);
4. ``ranker``: the DLRM on the two-tower's candidates, trained on a fixed sample of users' last
   interactions with popularity and retrieval (hard) negatives (``golden_training.train_dlrm``);
5. ``artifact``: the INT8 package of the ranker (``inference_legacy.dlrm_packager``);
6. ``latency``: the served pipeline, single user (p50 / p99) and batched (``bench.pipeline_latency``).

For each stage: wall time, throughput, peak resident memory of its process (``wait4``'s
``ru_maxrss``), artifact sizes. Quality on a fixed sample of users (10,000, seed 0), each ranked
against the whole catalog with their history excluded (README, "The evaluation protocol"):
popularity, the two-tower, two-tower + ranker and the generator's oracle (its planted per-user item
probabilities, order-free), HR@10, NDCG@10 and Recall@100 with 95% intervals, and the share of the
oracle's HR@10 each recovers. Results: bench/results/scale.json; chart: docs/charts/scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common.runtime import write_json_atomic

SIZES = (100_000, 1_000_000, 10_000_000, 20_000_000)
EVAL_USERS = 10_000
STAGES = ("prepare", "two-tower", "faiss index", "candidates", "ranker", "artifact", "latency")


def shape(n: int) -> tuple[int, int]:
    """(users, items) for ``n`` interactions: 20 per user, 100 per item."""
    return n // 20, max(1_000, n // 100)


def run_stage(name: str, argv: list[str], log: Path) -> dict[str, float]:
    """Run ``python <argv>`` to completion; its wall time and peak RSS. A failure stops the bench
    with the stage's log."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"stage '{name}' failed (exit {proc.returncode}); {log}:\n" + "\n".join(tail))
    return {"seconds": round(seconds, 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3)}


def data_path_rate(spec: str, data_dir: str, steps: int = 300, batch_size: int = 512) -> float:
    """Training examples per second that the two-tower's data path alone produces (the batches it
    feeds the model, KeyedJaggedTensors included, no model): the rate the training loop cannot beat."""
    from common.data.load import load_dataset
    from common.data.split import split_dataset
    from retrieval.modules.feature_processor import TwoTowerFeatures
    from retrieval.two_tower_train import TrainExamples

    ds = load_dataset(spec, data_dir)
    split = split_dataset(ds)
    features = TwoTowerFeatures.from_dataset(ds, history_len=50)
    examples = TrainExamples(features, split, batch_size, 0, seed=0)
    batches = examples.batches(0, 0, steps + 20)
    for _ in range(20):  # the epoch's permutation and warm-up
        next(batches)
    t0 = time.perf_counter()
    n = sum(1 for _ in batches)
    return n * batch_size / (time.perf_counter() - t0)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def oracle_report(spec: Path, data_dir: Path, n: int, eval_users: int, n_boot: int, seed: int) -> dict[str, object]:
    """The generator's planted probabilities as a scorer, under the same protocol."""
    from bench.synthetic import generate_interactions, oracle_scores, truth_of
    from common.data.logs import load_log
    from common.data.split import split_dataset
    from common.metrics import MAX_K, report_from_ranks

    ds = load_log(spec, data_dir)
    split = split_dataset(ds, eval_users)
    users, targets = split.targets("test")
    num_users, num_items = shape(n)
    data = generate_interactions(num_users, num_items, interactions_per_user=20.0, seed=seed)
    gen_user, gen_item = truth_of(ds)
    indptr, hist = split.history("test")
    ranks = np.empty(len(users), np.int64)
    chunk = max(16, (1 << 26) // ds.num_items)
    for lo in range(0, len(users), chunk):
        batch = users[lo : lo + chunk]
        scores = oracle_scores(data, gen_user[batch])[:, gen_item]  # planted, over the catalog's items
        for r, u in enumerate(batch):
            scores[r, hist[indptr[u] : indptr[u + 1]]] = -np.inf
        target = scores[np.arange(len(batch)), targets[lo : lo + chunk]]
        # Rank of the target: items scoring higher, then ties at lower index (the protocol's tie rule).
        higher = (scores > target[:, None]).sum(axis=1)
        tied = np.array([(scores[r, : targets[lo + r]] == target[r]).sum() for r in range(len(batch))])
        ranks[lo : lo + len(batch)] = higher + tied
    ranks = np.where(ranks >= MAX_K, MAX_K, ranks)
    return report_from_ranks("test", users, ranks, n_boot=n_boot).to_dict()


def run_size(n: int, work: Path, a: argparse.Namespace) -> dict[str, object]:
    from bench.synthetic import generate_interactions, write_synthetic_log

    num_users, num_items = shape(n)
    root, cache, logs = work / f"n{n}", work / f"n{n}" / "cache", work / f"n{n}" / "logs"
    shutil.rmtree(root, ignore_errors=True)
    logs.mkdir(parents=True)
    out: dict[str, object] = {"interactions": n, "users": num_users, "items": num_items, "stages": {}}
    st = out["stages"]
    t0 = time.perf_counter()
    data = generate_interactions(num_users, num_items, interactions_per_user=20.0, seed=a.seed)
    spec = write_synthetic_log(data, root / "log", name=f"synthetic-{n}", shards=max(1, n // 2_000_000), seed=a.seed)
    out["generate_seconds"] = round(time.perf_counter() - t0, 2)
    out["log_bytes"] = folder_bytes(root / "log")
    del data
    print(f"\n{n:,} interactions: {num_users:,} users, {num_items:,} items; log written in {out['generate_seconds']} s")
    eval_users = min(a.eval_users, num_users)
    data_args = ["--dataset", str(spec), "--data-dir", str(cache)]
    boot = ["--n-boot", str(a.n_boot)]

    def stage(name: str, argv: list[str]) -> dict[str, float]:
        st[name] = r = run_stage(name, argv, logs / f"{name.replace(' ', '_')}.log")
        print(f"  {name:<12} {r['seconds']:>9.1f} s   peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        return r

    stage("prepare", ["-m", "common.prepare_data", *data_args, "--out", str(root / "prepare")])
    st["prepare"]["interactions_per_s"] = round(n / st["prepare"]["seconds"])
    st["prepare"]["cache_bytes"] = folder_bytes(cache)

    retrieval = root / "retrieval"
    tt_args = ["--epochs", str(a.epochs), "--eval-users", str(eval_users), "--log-every", "1000000000", *boot]
    stage("two-tower", ["-m", "retrieval.two_tower_train", *data_args, *tt_args, "--out", str(retrieval)])
    res = json.loads((retrieval / "results.json").read_text())
    manifest = json.loads((retrieval / "export" / "manifest.json").read_text())
    st["two-tower"]["train_examples_per_s"] = round(res["train_examples_per_s"])
    code = f"from bench.scale import data_path_rate; print(data_path_rate({str(spec)!r}, {str(cache)!r}))"
    rate = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    st["two-tower"]["data_path_examples_per_s"] = round(float(rate.strip().splitlines()[-1]))
    if a.reference_rate:
        st["two-tower"]["rate_vs_ml100k"] = round(res["train_examples_per_s"] / a.reference_rate, 3)
    st["two-tower"]["export_bytes"] = folder_bytes(retrieval / "export")
    st["faiss index"] = {
        "seconds": manifest["index"]["build_seconds"],
        "type": manifest["index"]["type"],
        "params": manifest["index"]["params"],
        "items_per_s": round(num_items / manifest["index"]["build_seconds"])
        if manifest["index"]["build_seconds"] >= 0.01
        else None,
        "index_bytes": (retrieval / "export" / "index.faiss").stat().st_size,
    }
    quality = {"popularity": res["popularity_test"], "two-tower": res["test"]}

    cand_args = ["--export", str(retrieval / "export"), "--data-dir", str(cache), "--eval-users", str(eval_users)]
    stage("candidates", ["-m", "retrieval.two_tower_retrieval", *cand_args, "--out", str(root / "candidates.json")])
    cres = json.loads((root / "candidates.json").read_text())
    st["candidates"].update(
        {
            "index_recall_at_100_vs_exact": cres["index_recall_vs_exact"],
            "ms_per_batch_of_256": cres["latency_ms_per_batch_median"],
            "users_per_s": round(256 / (cres["latency_ms_per_batch_median"] / 1000)),
        }
    )

    rank_args = [
        "--retrieval-export",
        str(retrieval / "export"),
        "--epochs",
        "1",
        "--train-last",
        str(a.train_last),
        "--train-users",
        str(min(a.train_users, num_users) if a.train_users else 0),
        "--eval-users",
        str(eval_users),
        "--no-baseline",
        "--log-every",
        "1000000000",
        *boot,
    ]
    stage("ranker", ["-m", "golden_training.train_dlrm", *data_args, *rank_args, "--out", str(root / "ranking")])
    rres = json.loads((root / "ranking" / "results.json").read_text())
    dl = rres["dlrm"]
    st["ranker"]["train_examples_per_s"] = dl.get("train_examples_per_s")
    quality["two-tower + ranker"] = dl["test_reranked"]
    quality["two-tower order (ranker's candidates)"] = rres["test_candidates_order"]
    out["ranker_gain_over_two_tower_order"] = dl["test_gain_over_candidates_order"]

    serving = root / "serving" / "dlrm-int8"
    pack = ["--checkpoints", str(root / "ranking" / "checkpoints" / "dlrm"), "--out", str(serving), "--overwrite"]
    stage("artifact", ["-m", "inference_legacy.dlrm_packager", *pack, "--data-dir", str(cache)])
    st["artifact"]["artifact_bytes"] = folder_bytes(serving)

    lat_args = ["--artifacts", str(root), "--data-dir", str(cache), "--no-http", "--repeats", "1"]
    lat_args += ["--users", str(min(a.latency_users, num_users)), "--out", str(root / "latency.json")]
    stage("latency", ["-m", "bench.pipeline_latency", *lat_args])
    lres = json.loads((root / "latency.json").read_text())
    st["latency"].update(
        {
            "served": lres["served"],
            "single_user_p50_ms": lres["single_user"]["p50_ms"],
            "single_user_p99_ms": lres["single_user"]["p99_ms"],
            "batched_users_per_s": lres["batched"]["users_per_s"],
        }
    )

    t0 = time.perf_counter()
    quality["oracle"] = oracle_report(spec, cache, n, eval_users, a.n_boot, a.seed)
    out["oracle_seconds"] = round(time.perf_counter() - t0, 2)
    out["eval_users"] = quality["two-tower"]["num_users"] if "num_users" in quality["two-tower"] else eval_users
    oracle_hr = quality["oracle"]["HR@10"]
    out["quality"] = {
        name: {
            **{m: rep[m] for m in ("HR@10", "NDCG@10", "Recall@100")},
            "ci95": {m: rep[f"{m}_ci95"] for m in ("HR@10", "NDCG@10", "Recall@100")},
            "share_of_oracle_HR@10": rep["HR@10"] / oracle_hr if oracle_hr else None,
        }
        for name, rep in quality.items()
        if rep is not None
    }
    out["chain_seconds"] = round(sum(s["seconds"] for k, s in st.items() if k != "faiss index"), 1)
    out["peak_rss_gb"] = max(s.get("peak_rss_gb", 0) for s in st.values())
    for name, q in out["quality"].items():
        print(
            f"  {name:<38} HR@10 {q['HR@10']:.4f}  NDCG@10 {q['NDCG@10']:.4f}  Recall@100 {q['Recall@100']:.4f}"
            f"  ({q['share_of_oracle_HR@10']:.0%} of the oracle's HR@10)"
        )
    g = out["ranker_gain_over_two_tower_order"]
    print(f"  ranker - two-tower order, NDCG@10 {g['NDCG@10']:+.4f} {g['NDCG@10_ci95']}")
    print(f"  chain {out['chain_seconds']:.0f} s, peak RSS {out['peak_rss_gb']:.2f} GB")
    if not a.keep:
        shutil.rmtree(root / "log", ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return out


def plans(sizes=(10**8, 10**9), world_sizes=(1, 8, 64), hbm_gb: float = 80.0, dim: int = 64) -> list[dict]:
    """What TorchRec's planner says the two-tower's tables need at ``sizes`` interactions on N GPUs
    with ``hbm_gb`` each (plan only: nothing is allocated). Tables as bench.scale grows them:
    ``user_id`` (N/20 rows), ``item_id`` and ``history`` (N/100 rows each), fused RowWiseAdagrad."""
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from sharding.planning import GB, meta_ebc, plan, topology

    out = []
    for n in sizes:
        users, items = shape(n)
        tables = [("user_id", users, dim), ("item_id", items, dim), ("history", items, dim)]
        for world in world_sizes:
            row: dict[str, object] = {"interactions": n, "gpus": world, "hbm_gb_per_gpu": hbm_gb}
            row["table_gb"] = round(sum(r * d * 4 for _, r, d in tables) / GB, 2)
            try:
                rep = plan(meta_ebc(tables, optimizer=RowWiseAdagrad), topology(world, "cuda", hbm_gb=hbm_gb))
            except Exception as err:  # noqa: BLE001 (the planner's PlannerError and friends: the answer is "no")
                row["plan"] = f"does not fit: {str(err).splitlines()[0][:200]}"
            else:
                t = rep.tables()
                row["plan"] = {name: f"{r.sharding_type} on {r.shards} shard(s)" for name, r in t.iterrows()}
                row["max_hbm_gb_per_gpu"] = round(float(rep.ranks["hbm_gb"].max()), 2)
                row["est_embedding_ms_per_step"] = round(rep.step_ms, 3)
            out.append(row)
    return out


def fit_exponents(sizes: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    """Per stage: the slope of log(time) and log(peak RSS) against log(interactions)."""
    out = {}
    for name in STAGES:
        # Stages that take under 0.05 s (an exact index has nothing to build) have no meaningful slope.
        rows = [
            (s["interactions"], s["stages"][name]) for s in sizes if s["stages"].get(name, {}).get("seconds", 0) >= 0.05
        ]
        if len(rows) < 2:
            continue
        x = np.log([n for n, _ in rows])
        fit = {"time": float(np.polyfit(x, np.log([max(r["seconds"], 1e-3) for _, r in rows]), 1)[0])}
        if all("peak_rss_gb" in r for _, r in rows):
            fit["peak_rss"] = float(np.polyfit(x, np.log([r["peak_rss_gb"] for _, r in rows]), 1)[0])
        out[name] = fit
    return out


def chart(results: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for c, name in enumerate(STAGES):  # one colour per stage in both panels
        rows = [(s["interactions"], s["stages"][name]) for s in sizes if name in s["stages"]]
        if not rows:
            continue
        x = [n for n, _ in rows]
        k = results["exponents"].get(name, {})
        axes[0].plot(
            x,
            [r["seconds"] for _, r in rows],
            marker="o",
            color=f"C{c}",
            label=f"{name} (n^{k['time']:.2f})" if "time" in k else name,
        )
        if all("peak_rss_gb" in r for _, r in rows):
            axes[1].plot(
                x,
                [r["peak_rss_gb"] for _, r in rows],
                marker="o",
                color=f"C{c}",
                label=f"{name} (n^{k['peak_rss']:.2f})" if "peak_rss" in k else name,
            )
    for ax, label in ((axes[0], "wall time (s)"), (axes[1], "peak RSS of the stage's process (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("interactions")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"The chain at scale on {results['machine']}: time and memory per stage (fitted exponents)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown(results: dict[str, object]) -> str:
    """The README's tables, from a results file: ``python -m bench.scale --markdown``."""
    sizes = results["sizes"]
    head = "| stage | " + " | ".join(f"{s['interactions']:.0e}".replace("e+0", "e") for s in sizes) + " |"
    rule = "|---" * (len(sizes) + 1) + "|"
    lines = ["Wall time in seconds (peak RSS of the stage's process in GB):", "", head, rule]
    for name in STAGES:
        cells = []
        for s in sizes:
            r = s["stages"].get(name)
            if r is None:
                cells.append("")
            elif "peak_rss_gb" in r:
                cells.append(f"{r['seconds']:.1f} ({r['peak_rss_gb']:.2f})")
            else:
                cells.append(f"{r['seconds']:.2f} ({r['type']})")
        k = results.get("exponents", {}).get(name, {})
        fit = f" (n^{k['time']:.2f})" if "time" in k else ""  # an exact index builds nothing to fit
        lines.append(f"| {name}{fit} | " + " | ".join(cells) + " |")
    lines.append(
        "| whole chain | " + " | ".join(f"{s['chain_seconds']:.0f} ({s['peak_rss_gb']:.2f})" for s in sizes) + " |"
    )
    lines += ["", "Throughput and sizes:", "", head, rule]

    def row(label: str, fn) -> None:
        vals = []
        for s in sizes:
            try:
                vals.append(fn(s))
            except (KeyError, TypeError):
                vals.append("")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")

    row("users / items", lambda s: f"{s['users']:,} / {s['items']:,}")
    row("prepare, interactions/s", lambda s: f"{s['stages']['prepare']['interactions_per_s']:,}")
    row("two-tower training, examples/s", lambda s: f"{s['stages']['two-tower']['train_examples_per_s']:,}")
    row("  its data path alone, examples/s", lambda s: f"{s['stages']['two-tower']['data_path_examples_per_s']:,}")
    row("  vs ml-100k's rate", lambda s: f"{s['stages']['two-tower']['rate_vs_ml100k']:.2f}")
    row("candidates (index), users/s", lambda s: f"{s['stages']['candidates']['users_per_s']:,}")
    row("  index recall@100 vs exact", lambda s: f"{s['stages']['candidates']['index_recall_at_100_vs_exact']:.3f}")
    row("ranker training, examples/s", lambda s: f"{s['stages']['ranker']['train_examples_per_s']:,.0f}")
    row(
        "single user p50 / p99, ms",
        lambda s: "{single_user_p50_ms:.1f} / {single_user_p99_ms:.1f}".format(**s["stages"]["latency"]),
    )
    row("batched, users/s", lambda s: f"{s['stages']['latency']['batched_users_per_s']:,.0f}")
    row(
        "log / cache, MB", lambda s: f"{s['log_bytes'] / 1e6:,.0f} / {s['stages']['prepare']['cache_bytes'] / 1e6:,.0f}"
    )
    row(
        "retrieval export / INT8 ranker, MB",
        lambda s: f"{s['stages']['two-tower']['export_bytes'] / 1e6:,.0f} / {s['stages']['artifact']['artifact_bytes'] / 1e6:,.1f}",
    )
    lines += [
        "",
        "Quality on the sample (test, HR@10 / NDCG@10 / Recall@100; share of the oracle's HR@10):",
        "",
        head,
        rule,
    ]
    for name in ("popularity", "two-tower", "two-tower + ranker", "oracle"):
        row(
            name,
            lambda s, name=name: "{:.4f} / {:.4f} / {:.4f} ({:.0%})".format(
                *(s["quality"][name][m] for m in ("HR@10", "NDCG@10", "Recall@100")),
                s["quality"][name]["share_of_oracle_HR@10"],
            ),
        )
    row(
        "ranker - two-tower order, NDCG@10 [95% CI]",
        lambda s: "{:+.4f} [{:+.4f}, {:+.4f}]".format(
            s["ranker_gain_over_two_tower_order"]["NDCG@10"], *s["ranker_gain_over_two_tower_order"]["NDCG@10_ci95"]
        ),
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=lambda v: int(float(v)), default=list(SIZES), help="interactions")
    p.add_argument("--work", default="runs/scale", help="scratch folder (default: %(default)s)")
    p.add_argument(
        "--eval-users", type=int, default=EVAL_USERS, help="users in the quality sample (default: %(default)s)"
    )
    p.add_argument("--epochs", type=int, default=1, help="two-tower epochs (default: %(default)s)")
    p.add_argument(
        "--train-users", type=int, default=0, help="users the ranker trains on, 0 = all (default: %(default)s)"
    )
    p.add_argument("--train-last", type=int, default=2, help="their last N interactions (default: %(default)s)")
    p.add_argument("--latency-users", type=int, default=1_000, help="users timed (default: %(default)s)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a CI-sized run: results to --out only, no chart")
    p.add_argument("--keep", action="store_true", help="keep each size's log and cache")
    p.add_argument("--append", action="store_true", help="keep the other sizes already in --out (replace these)")
    p.add_argument("--out", default="bench/results/scale.json", help="(default: %(default)s)")
    p.add_argument("--chart", default="docs/charts/scale.png", help="(default: %(default)s)")
    p.add_argument(
        "--markdown", action="store_true", help="print the README's tables from --out and the chart; run nothing"
    )
    p.add_argument(
        "--data-path-only",
        action="store_true",
        help="only (re)measure the two-tower's data path at --sizes, into the sizes already in --out",
    )
    p.add_argument("--plans-only", action="store_true", help="only (re)write the planner's answers into --out")
    a = p.parse_args(argv)
    if a.plans_only:
        results = json.loads(Path(a.out).read_text())
        results["plans"] = plans()
        write_json_atomic(a.out, results)
        return results
    if a.data_path_only:
        from bench.synthetic import generate_interactions, write_synthetic_log

        results = json.loads(Path(a.out).read_text())
        for n in a.sizes:
            (size,) = [s for s in results["sizes"] if s["interactions"] == n]
            root = Path(a.work) / f"n{n}-data-path"
            shutil.rmtree(root, ignore_errors=True)
            data = generate_interactions(*shape(n), interactions_per_user=20.0, seed=a.seed)
            spec = write_synthetic_log(
                data, root / "log", name=f"synthetic-{n}", shards=max(1, n // 2_000_000), seed=a.seed
            )
            del data
            rate = data_path_rate(str(spec), str(root / "cache"))
            size["stages"]["two-tower"]["data_path_examples_per_s"] = round(rate)
            print(f"{n:,}: the two-tower's data path alone, {rate:,.0f} examples/s", flush=True)
            shutil.rmtree(root, ignore_errors=True)
            write_json_atomic(a.out, results)
        return results
    if a.markdown:
        results = json.loads(Path(a.out).read_text())
        results["exponents"] = fit_exponents(results["sizes"])
        chart(results, Path(a.chart))
        print(markdown(results))
        return results
    work = Path(a.work)
    results: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "config": {k: v for k, v in vars(a).items() if k not in ("out", "chart")},
        "sizes": [],
    }
    if a.append and Path(a.out).is_file():
        kept = json.loads(Path(a.out).read_text())
        results["sizes"] = [s for s in kept["sizes"] if s["interactions"] not in a.sizes]
        if "ml100k_two_tower" in kept:
            results["ml100k_two_tower"] = kept["ml100k_two_tower"]
    # The two-tower's training rate on ml-100k in this same run: the yardstick for the data path at scale.
    a.reference_rate = None
    if not a.smoke:
        ref = work / "ml-100k"
        shutil.rmtree(ref, ignore_errors=True)  # scratch: an earlier run's checkpoints would be refused
        r = run_stage(
            "ml-100k",
            ["-m", "retrieval.two_tower_train", "--epochs", "1", "--n-boot", "10", "--out", str(ref)],
            Path(work.mkdir(parents=True, exist_ok=True) or work) / "ml-100k.log",
        )
        a.reference_rate = json.loads((ref / "results.json").read_text())["train_examples_per_s"]
        results["ml100k_two_tower"] = {**r, "train_examples_per_s": round(a.reference_rate)}
        print(f"ml-100k two-tower reference: {a.reference_rate:,.0f} training examples/s")
    for n in a.sizes:
        results["sizes"].append(run_size(n, work, a))
        results["sizes"].sort(key=lambda s: s["interactions"])
        results["exponents"] = fit_exponents(results["sizes"])
        write_json_atomic(a.out, results)  # after every size: a long run loses nothing done
    if not a.smoke:
        results["plans"] = plans()
        write_json_atomic(a.out, results)
    if not a.smoke and len(results["sizes"]) > 1:
        chart(results, Path(a.chart))
    return results


if __name__ == "__main__":
    main()
