"""End-to-end latency of the two-stage pipeline (integration/pipeline.py) on this machine.

    python -m bench.pipeline_latency                  # runs/ artifacts; about 3 minutes
    python -m bench.pipeline_latency --quick          # smoke run
    python -m bench.pipeline_latency --candidates two-tower --out bench/results/pipeline_latency_two_tower.json

Three measurements, on the ml-100k artifacts of the demo (``python -m integration.demo``):

- **single user**: ``pipeline.recommend([user])`` for users one at a time, serving what the
  pipeline serves by default (the system chosen on validation, integration/ensemble.py): the
  candidates (the two-tower's query tower and FAISS top 100, a sequential model's top 100 over the
  catalog, or the ensemble: every source's catalog scores, as reciprocal ranks, weighted and summed),
  and when the system re-ranks, feature enrichment of the 100 candidates and the INT8 DLRM over them; the top 10.
  p50 / p99 over every user, and each stage's median.
- **batched**: ``pipeline.recommend(users)`` in batches of 256, users per second, with torch
  using every core (offline batch inference).
- **compute limit**: the same models alone on inputs built beforehand (the two-tower's query
  tower and FAISS search, or a sequential model's forward; the ranker's forward over 100
  candidates), for one user and for batches of 256; the single-user and batched figures are also
  given as ratios to it (how far the serving path is from what its models cost).
- **HTTP**: ``integration.service --workers N`` (default: one per core) in its own processes,
  8 concurrent clients (one keep-alive connection each, on this process's asyncio loop, about
  0.06 ms of CPU per request) posting ``{"user_id": ...}`` back to back for 60 s, with the candidate
  cache off (``--cache-ttl 0``: every request runs both stages) and on, then cache off with one
  worker; then, cache off, as many service processes as workers, as replicas on their own ports
  sharing events through one Redis (``--state``), the clients spread over them; errors and p50 / p99.

- **1M items** (``--catalog 1000000``): the same pipeline over a synthetic catalog of a million
  items (planted topics, 20k users), untrained towers and DLRM (latency does not depend on the
  weights), the retrieval export with its default index for that size: single-user p50 / p99.

Torch runs one intra-op thread except in the batched run, as the service does.
Results: bench/results/pipeline_latency.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np
import torch

from bench.serving_load import run_load
from common.runtime import write_json_atomic
from inference_legacy.dlrm_client import spawn


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
        "n": int(len(a)),
    }


def single_user(pipeline, users: list[int], repeats: int) -> dict[str, object]:
    total: list[float] = []
    parts: dict[str, list[float]] = {"candidates": [], "enrichment + DLRM": []}
    for _ in range(repeats):
        for u in users:
            t0 = time.perf_counter()
            dense = np.array([pipeline.user_index[u]])
            cands = pipeline.candidates(dense)
            t1 = time.perf_counter()
            pipeline.order(dense, *cands)
            t2 = time.perf_counter()
            parts["candidates"].append((t1 - t0) * 1000)
            parts["enrichment + DLRM"].append((t2 - t1) * 1000)
    if not pipeline.rerank:  # served in the candidate source's own order
        del parts["enrichment + DLRM"]
    for u in users:  # the public path, with ID mapping and titles, as the service calls it
        t = time.perf_counter()
        pipeline.recommend([u])
        total.append((time.perf_counter() - t) * 1000)
    for _ in range(repeats - 1):
        for u in users:
            t = time.perf_counter()
            pipeline.recommend([u])
            total.append((time.perf_counter() - t) * 1000)
    return {**percentiles(total), "stages_median_ms": {k: float(np.median(v)) for k, v in parts.items()}}


def stages(result: dict[str, object]) -> str:
    return ", ".join(f"{k} {v:.2f} ms" for k, v in result["stages_median_ms"].items())


def batched(pipeline, users: list[int], batch_size: int, repeats: int) -> dict[str, float]:
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for lo in range(0, len(users), batch_size):
            pipeline.recommend(users[lo : lo + batch_size])
        rates.append(len(users) / (time.perf_counter() - t))
    # the median pass is the figure; every pass is kept (the limit is the fastest pass of each model)
    return {"users_per_s": float(np.median(rates)), "passes": rates, "batch_size": batch_size, "users": len(users)}


def _median_ms(fn, inputs: list, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        for x in inputs:
            t = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def _total_s(fn, inputs: list, repeats: int) -> float:
    """The fastest of ``repeats`` passes over ``inputs``, in seconds."""
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for x in inputs:
            fn(x)
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def compute_limit(pipeline, users: list, batch_size: int, repeats: int) -> dict[str, object] | None:
    """What the served path's models cost alone, on inputs built beforehand (no ID maps, feature
    building or other Python around them): the candidate source's model (the two-tower's query
    tower forward and index search without each user's seen items, or a sequential model's forward over the
    catalog, plus the query tower for the ranker's ``retrieval_score``) and the ranker's forward over
    each user's 100 candidates; each as the pipeline runs it (its AOTInductor package where one was
    loaded). For one user at a time (the
    median of each, summed; torch on one thread) and for batches of ``batch_size`` users (users/s;
    torch on every core, set by the caller). Served, the union ranker's: every source's scoring of the
    catalog, and its DLRM over the union lists' rows. None for the ensemble, the union and item-to-item
    sources served alone: their limit is not measured."""
    from bert4rec.sequences import padded_tokens, sequences_kjt
    from candidates.sources import SequenceSource
    from integration.feature_store import rank_chunk
    from integration.pipeline import CANDIDATES, UNION_RANKER

    dense = np.array([pipeline.user_index[u] for u in users])
    hists = [pipeline.store.history(u) for u in dense]
    union_ranked = pipeline.candidate_source == UNION_RANKER
    source = next((s for s in pipeline.sources if s.name == pipeline.candidate_source), None)
    if source is None and not union_ranked:
        return None
    batches = [slice(lo, lo + batch_size) for lo in range(0, len(dense), batch_size)]
    r = pipeline.retriever
    parts: dict[str, tuple] = {}  # stage -> (function, one-user inputs, batch inputs)

    def sequence_forward(source: SequenceSource) -> tuple:
        scorer = source.scorer
        model, compiled, one = scorer.model, scorer.compiled, scorer.compiled_one

        def seqs(sl: slice):
            tokens = model.query_sequences([source.order[h] for h in hists[sl]])
            if not compiled:
                return (sequences_kjt(tokens), None)
            if sl.stop - sl.start == 1 and one is not None:  # a lone user's program, as score_indices serves one
                return (padded_tokens(tokens, 1), one)
            return (padded_tokens(tokens), compiled)

        return (
            (lambda x: x[1](*x[0])) if compiled else (lambda x: model.last_scores(x[0])),
            [seqs(slice(i, i + 1)) for i in range(len(dense))],
            [seqs(sl) for sl in batches],
        )

    if isinstance(source, SequenceSource):
        parts[f"{source.name} forward"] = sequence_forward(source)
    if pipeline.rerank or not isinstance(source, SequenceSource):  # the ranker's retrieval_score needs the query

        def kjt(sl: slice):
            return r._query_batch(dense[sl], hists[sl]).sparse

        one, many = [kjt(slice(i, i + 1)) for i in range(len(dense))], [kjt(sl) for sl in batches]
        parts["query tower"] = (r.model.embed, one, many)
    if union_ranked:
        # every source scores the whole catalog (what the lists and the provenance features read): the
        # two-tower's product with the queries above, each sequential model's forward, the item-to-item
        # and "again" sources' scores; then the union ranker over the lists' rows, built beforehand
        queries = [(r.model.embed(x).numpy(), slice(i, i + 1)) for i, x in enumerate(one)]
        queries_b = [(r.model.embed(x).numpy(), sl) for x, sl in zip(many, batches)]
        for src in pipeline.all_sources:
            if isinstance(src, SequenceSource):
                parts[f"{src.name} forward"] = sequence_forward(src)
            elif src.name == "two-tower":
                parts["two-tower scores"] = (lambda x: x[0] @ pipeline.item_embeddings.T, queries, queries_b)
            else:
                parts[f"{src.name} scores"] = (
                    lambda x, src=src: src.scores(dense[x], hists[x]),
                    [slice(i, i + 1) for i in range(len(dense))],
                    batches,
                )
        ranker = pipeline.union_ranker
        one_b = [pipeline.union_batch(dense[i : i + 1], hists[i : i + 1])[2] for i in range(len(dense))]
        many_b = [pipeline.union_batch(dense[sl], hists[sl])[2] for sl in batches]
        rows = np.mean([len(b.labels) for b in one_b])
        parts[f"union ranker forward, {rows:.0f} rows ({ranker.runtime})"] = (ranker.logits, one_b, many_b)
    elif not isinstance(source, SequenceSource):
        # as top_k_indices searches: each user's seen items left out (masked in an exact index's scores,
        # or filtered from a search with room for them)
        parts["ANN search"] = (
            lambda x: r.search_unseen(x[0], CANDIDATES, x[1]),
            [(r.model.embed(x).numpy(), hists[i : i + 1]) for i, x in enumerate(one)],
            [(r.model.embed(x).numpy(), hists[sl]) for x, sl in zip(many, batches)],
        )
    if pipeline.rerank:
        items, scores = pipeline.candidates(dense)
        predictor = pipeline.rankers[pipeline.default_arm]
        # as rank() runs it: a batch through the per-user program where the artifact has one, one user per row
        # (integration.pipeline.BY_USER_MIN_USERS)
        by_user = predictor.by_user is not None
        step = rank_chunk(items.shape[1])  # a batch's rows go to the ranker in chunks, as rank() sends them
        chunks = [
            slice(lo, min(lo + step, sl.stop))
            for sl in batches
            for lo in range(sl.start, min(sl.stop, len(dense)), step)
        ]
        store = pipeline.store
        batch_inputs = (
            [(predictor.by_user, store.ranking_inputs_by_user(dense[c], items[c], scores[c])) for c in chunks]
            if by_user
            else [(predictor.model, store.ranking_inputs(dense[c], items[c], scores[c])) for c in chunks]
        )
        rank_key = f"ranker forward, {items.shape[1]} rows"
        parts[rank_key] = (
            lambda x: x[0](*x[1]),
            [
                (predictor.model, store.ranking_inputs(dense[i : i + 1], items[i : i + 1], scores[i : i + 1]))
                for i in range(len(dense))
            ],
            batch_inputs,
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single = {name: _median_ms(fn, one, repeats) for name, (fn, one, _) in parts.items()}
    torch.set_num_threads(threads)
    batch_s = {name: _total_s(fn, many, repeats) for name, (fn, _, many) in parts.items()}
    out = {
        "single_user_ms": single,
        "single_user_limit_ms": sum(single.values()),
        "batched_s": batch_s,
        "batched_limit_users_per_s": len(dense) / sum(batch_s.values()),
        "batch_size": batch_size,
    }
    if pipeline.rerank and by_user:
        # the per-row program on the same rows: what looking each user's features up once saves
        out["batched_ranker_program"] = "per-user"
        out["batched_ranker_s"] = batch_s[rank_key]
        out["batched_ranker_per_row_s"] = _total_s(
            lambda x: predictor.model(*x),
            [pipeline.store.ranking_inputs(dense[c], items[c], scores[c]) for c in chunks],
            repeats,
        )
    return out


def synthetic_data(num_users: int, num_items: int, seed: int = 0):
    """The synthetic generator's data set in canonical form (bench.synthetic): 64-bit raw IDs,
    a category and a price per item, a region and an age per user. The canonical form keeps only
    items with interactions, and 20 per user leave most of a 1M catalog unseen: each unseen item
    gets one interaction, from a random user at a random time, so that the catalog is whole."""
    import dataclasses

    from bench.synthetic import generate_interactions, synthetic_dataset

    d = generate_interactions(num_users, num_items, interactions_per_user=20.0, seed=seed)
    unseen = np.setdiff1d(np.arange(num_items), d.item)
    rng = np.random.default_rng([seed, 7])
    d = dataclasses.replace(
        d,
        user=np.r_[d.user, rng.integers(0, num_users, len(unseen))],
        item=np.r_[d.item, unseen],
        timestamp=np.r_[d.timestamp, rng.integers(d.timestamp.min(), d.timestamp.max() + 1, len(unseen))],
    )
    return synthetic_dataset(d, name=f"synthetic-{num_items}", seed=seed)


def synthetic_pipeline(root, num_items: int, num_users: int = 20_000, compiled: bool = True):
    """The pipeline over a synthetic catalog: untrained towers exported with an IVF-PQ index and
    an untrained DLRM packaged INT8, through the same export and packaging code as the real ones
    (and, with ``compiled``, the query tower and the ranker compiled with AOTInductor)."""
    from pathlib import Path

    from common.data.split import split_dataset
    from common.features import FeatureBatch
    from common.runtime import init_runtime
    from golden_training.model import TorchRecDLRM
    from golden_training.train_dlrm import Config as RankConfig
    from inference_legacy.dlrm_packager import package_model
    from integration.feature_store import FeatureStore
    from integration.loader import create_pipeline
    from retrieval.modules.feature_processor import TwoTowerFeatures
    from retrieval.two_tower_train import Config as RetrievalConfig
    from retrieval.two_tower_train import build_model, embed_items, export

    root = Path(root)
    rt = init_runtime("cpu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ds = synthetic_data(num_users, num_items)
    split = split_dataset(ds)
    features = TwoTowerFeatures.from_dataset(ds, history_len=50)
    rcfg = RetrievalConfig(dataset=ds.name)  # "auto": the default index for the catalog size
    model, _ = build_model(rcfg, features, split.item_counts("valid"), rt)
    item_emb = embed_items(model, features, rt.device)
    export(
        root / "retrieval" / "export",
        rcfg,
        model,
        features,
        ds,
        ds.name,
        item_emb,
    )
    build_s = time.perf_counter() - t0
    cfg = RankConfig(dataset=ds.name, retrieval_export=str(root / "retrieval" / "export"))
    store = FeatureStore.build(
        ds, split, cfg.history_len, cfg.sequence_features, cfg.trend_days, history_match=cfg.history_match
    )
    dlrm = TorchRecDLRM(store.features.schema, cfg.embedding_dim, list(cfg.dense_arch), list(cfg.over_arch))
    users = np.arange(256)
    items = np.random.default_rng(1).integers(0, num_items, (256, 100))
    dense, values, lengths = store.ranking_inputs(users, items, np.zeros(items.shape, np.float32))
    from torchrec import KeyedJaggedTensor

    kjt = KeyedJaggedTensor.from_lengths_sync(store.features.schema.sparse_names, values, lengths)
    labels = (np.random.default_rng(2).random(len(dense)) < 0.1).astype(np.float32)
    package_model(
        dlrm,
        store.features.schema,
        cfg,
        {"dataset": ds.name, "data_fingerprint": ds.fingerprint, "split": "random synthetic rows"},
        [FeatureBatch(dense, kjt)],
        labels,
        root / "serving" / "dlrm-int8",
        heldout_rows=200,
        user_features=store.features.user_features,
    )
    if compiled:  # as a user would: python -m inference_legacy.aot_compile on both
        from inference_legacy.aot_compile import compile_artifact, compile_query_tower

        compile_query_tower(root / "retrieval" / "export")
        compile_artifact(root / "serving" / "dlrm-int8")
    return create_pipeline(root, dataset=ds, compiled=compiled), build_s


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="runs", help="(default: %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of HTTP load per run (default: %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="passes over every user (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="100 users, 1 pass, 3 s of HTTP load")
    p.add_argument(
        "--catalog",
        type=int,
        default=0,
        help="also time the pipeline over a synthetic catalog of this many items, e.g. 1000000",
    )
    p.add_argument("--users", type=int, default=0, help="time this many users (seed 0), not every user")
    p.add_argument(
        "--candidates",
        default="auto",
        help="the candidate source, as the service's --candidates: auto (the served system), two-tower, SASRec, "
        "BERT4Rec, ... (default: %(default)s)",
    )
    p.add_argument("--no-http", action="store_true", help="skip the HTTP runs")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="the service's --workers in the HTTP runs (default: one per core, %(default)s)",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="run the exported models, not their AOTInductor packages (python -m inference_legacy.aot_compile)",
    )
    p.add_argument(
        "--data-dir", default=None, help="data cache (default: $RECSYS_DATA_DIR or ~/.cache/recsys-examples)"
    )
    p.add_argument("--out", default="bench/results/pipeline_latency.json", help="(default: %(default)s)")
    a = p.parse_args(argv)
    from integration.loader import create_pipeline

    torch.set_num_threads(1)
    pipeline = create_pipeline(a.artifacts, data_dir=a.data_dir, candidate_source=a.candidates, compiled=not a.eager)
    users = pipeline.dataset.user_raw_ids.tolist()[: 100 if a.quick else None]
    if a.users and a.users < len(users):
        users = [users[i] for i in np.sort(np.random.default_rng(0).choice(len(users), a.users, replace=False))]
    repeats, duration = (1, 3.0) if a.quick else (a.repeats, a.duration)
    pipeline.recommend(users[:8])  # warm-up
    results: dict[str, object] = {
        "artifacts": a.artifacts,
        "candidates": pipeline.candidate_source,
        "served": pipeline.served,
        "quick": a.quick,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": 1,
        # AOTInductor or the exported model (and why), as loaded
        "runtimes": {
            "query tower": pipeline.retriever.runtime,
            **{f"{src.name} scorer": src.scorer.runtime for src in pipeline.sources if hasattr(src, "scorer")},
            **{f"ranker {arm}": r.runtime for arm, r in pipeline.rankers.items()},
            **{f"ranker {arm}, per-user program": r.by_user_runtime for arm, r in pipeline.rankers.items()},
            **({"union ranker": pipeline.union_ranker.runtime} if pipeline.union_ranker is not None else {}),
        },
    }
    results["single_user"] = s = single_user(pipeline, users, repeats)
    print(f"served: {pipeline.served}; " + ", ".join(f"{k}: {v}" for k, v in results["runtimes"].items()), flush=True)
    print(
        f"single user: p50 {s['p50_ms']:.2f} ms | p99 {s['p99_ms']:.2f} ms | max {s['max_ms']:.2f} ms over "
        f"{s['n']} requests (median {stages(s)})",
        flush=True,
    )
    torch.set_num_threads(os.cpu_count() or 1)  # offline batch inference may use every core
    results["batched"] = b = batched(pipeline, users, 256, repeats)
    passes = ", ".join(f"{r:.0f}" for r in b["passes"])
    print(
        f"batched: {b['users_per_s']:.0f} users/s (batches of {b['batch_size']}; median of passes {passes})", flush=True
    )
    results["limit"] = lim = compute_limit(pipeline, users, 256, repeats)
    torch.set_num_threads(1)
    if lim is None:
        print(f"compute limit: not measured for {pipeline.candidate_source} candidates (several models)")
    else:
        results["ratio_to_limit"] = ratio = {
            "single_user_p50": s["p50_ms"] / lim["single_user_limit_ms"],
            "single_user_p99": s["p99_ms"] / lim["single_user_limit_ms"],
            "batched": lim["batched_limit_users_per_s"] / b["users_per_s"],
        }
        print(
            "compute limit, one user: "
            + " + ".join(f"{k} {v:.2f} ms" for k, v in lim["single_user_ms"].items())
            + f" = {lim['single_user_limit_ms']:.2f} ms; batched: {lim['batched_limit_users_per_s']:.0f} users/s",
            flush=True,
        )
        print(
            f"to the limit: single user p50 {ratio['single_user_p50']:.1f}x, p99 {ratio['single_user_p99']:.1f}x; "
            f"batched {ratio['batched']:.1f}x",
            flush=True,
        )
        if "batched_ranker_per_row_s" in lim:
            print(
                f"the ranker's batched forward: {len(users) / lim['batched_ranker_s']:.0f} users/s with the "
                f"per-user program, {len(users) / lim['batched_ranker_per_row_s']:.0f} with the per-row one",
                flush=True,
            )
    del pipeline
    bodies = [json.dumps({"user_id": u}).encode() for u in users]
    results["http"] = {}
    runs = [("cache off", "0", a.workers), ("cache on", "300", a.workers)]
    if a.workers > 1:
        runs.append(("cache off, 1 worker", "0", 1))
    results["http_workers"] = a.workers
    for mode, ttl, workers in () if a.no_http else runs:
        proc, url = spawn(
            ["-m", "integration.service", "--artifacts", a.artifacts, "--cache-ttl", ttl, "--candidates", a.candidates]
            + ["--workers", str(workers)]
            + (["--eager"] if a.eager else [])
        )
        try:
            run_load(url, "/recommend", bodies, a.clients, min(duration, 2.0))  # warm-up, not reported
            r = run_load(url, "/recommend", bodies, a.clients, duration)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        results["http"][mode] = r = {**r, "workers": workers}
        print(
            f"HTTP, {a.clients} clients, {workers} worker{'s' if workers > 1 else ''}, {mode.split(',')[0]}: "
            f"{r['requests_per_s']:.0f} req/s | p50 {r['p50_ms']:.2f} ms | "
            f"p99 {r['p99_ms']:.2f} ms | errors {r['errors']}",
            flush=True,
        )
    if not a.no_http and a.workers > 1:
        results["http"]["cache off, replicas, redis state"] = r = replicas_load(a, bodies, duration)
        base = results["http"]["cache off"]["requests_per_s"]
        print(
            f"HTTP, {a.clients} clients, {a.workers} replicas with --state redis, cache off: "
            f"{r['requests_per_s']:.0f} req/s ({r['requests_per_s'] / base:.2f}x {a.workers} workers with the "
            f"journal file) | p50 {r['p50_ms']:.2f} ms | p99 {r['p99_ms']:.2f} ms | errors {r['errors']}",
            flush=True,
        )
    if a.catalog:
        import tempfile

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            big, build_s = synthetic_pipeline(tmp, a.catalog, compiled=not a.eager)
            index = big.retriever.manifest["index"]
            some = big.dataset.user_raw_ids[: 200 if a.quick else 2000].tolist()
            big.recommend(some[:8])
            results["catalog"] = c = {
                "items": a.catalog,
                "users": len(big.dataset.user_raw_ids),
                "index": index,
                "build_seconds": build_s,
                **single_user(big, some, 1),
            }
        print(
            f"{a.catalog:,}-item catalog, {index['type']} {index['params']}: single user p50 {c['p50_ms']:.2f} ms | "
            f"p99 {c['p99_ms']:.2f} ms | max {c['max_ms']:.2f} ms over {c['n']} requests (median {stages(c)})",
            flush=True,
        )
    write_json_atomic(a.out, results)
    return results


def replicas_load(a: argparse.Namespace, bodies: list[bytes], duration: float) -> dict[str, object]:
    """``a.workers`` service processes of one worker each, on their own ports, sharing events through one
    Redis (``--state``, persisting every write), the clients spread over them: what the same cores
    serve as replicas rather than as workers of one port."""
    import tempfile

    from bench.service_chaos import RedisServer

    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(tmp, persistent=True).start()
        command = ["-m", "integration.service", "--artifacts", a.artifacts, "--cache-ttl", "0"]
        command += ["--candidates", a.candidates, "--state", redis.url] + (["--eager"] if a.eager else [])
        # each replica's BLAS and OpenMP pools get its share of the cores, as --workers gives each worker
        share = str(max(1, (os.cpu_count() or 1) // a.workers))
        threads = {v: share for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        procs = []
        try:
            for _ in range(a.workers):
                procs.append(spawn(command, env=threads))
            urls = [url for _, url in procs]
            run_load(urls, "/recommend", bodies, a.clients, min(duration, 2.0))  # warm-up, not reported
            return {**run_load(urls, "/recommend", bodies, a.clients, duration), "replicas": a.workers}
        finally:
            for proc, _ in procs:
                proc.terminate()
                proc.wait(timeout=30)
            redis.stop()


if __name__ == "__main__":
    main()
