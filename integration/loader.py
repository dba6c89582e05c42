"""Load the exported stages and check that they fit together, then build the pipeline.

    from integration.loader import create_pipeline
    pipeline = create_pipeline("runs")          # runs/retrieval/export + runs/serving/dlrm-int8 (+ the rest there)

``create_pipeline`` reads, in order: the two-tower export and the data set it names; the candidate
sources beside it (sequential exports, the item-to-item export); the served system chosen on
validation (``serving/served-<sources>.json``, written by ``python -m integration.ensemble``); the
rankers (the served one, A/B arms, each source's own); the feature store the rankers read. Every
step applies the rules of integration/compatibility.py before anything is served.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from candidates.again import AgainSource, fit_half_life
from candidates.sources import SEQUENCE_SOURCES, CandidateSource, ItemItemSource, SequenceSource, TwoTowerSource
from common.data.dataset import InteractionData
from common.data.download import file_digest
from common.data.load import load_dataset
from common.data.split import Split, split_dataset
from common.runtime import write_json_atomic
from inference_legacy.dlrm_predict import DLRMPredictor
from integration import compatibility as rules
from integration.compatibility import ArtifactMismatch, digest
from integration.feature_store import FeatureStore
from integration.pipeline import CANDIDATES, RecommendationPipeline
from integration.union_model import ARTIFACT as UNION_ARTIFACT
from integration.union_model import NAME as UNION_RANKER
from integration.union_model import UnionRanker, read_manifest, why_stale
from retrieval.item_item import NAMES as ITEM_ITEM
from retrieval.item_item import ItemItem
from retrieval.two_tower_retrieval import Retriever
from retrieval.two_tower_retrieval import read_manifest as read_retrieval_manifest


def sequential_exports(spec: str) -> str | list[str]:
    """``--sequential`` as the scripts take it (``sasrec``, ``bert4rec``, ``both``, a comma list of
    them, ``none`` or ``auto``) -> ``create_pipeline``'s ``sequential``: "auto", or export paths under
    the artifacts directory. An unknown name is refused, naming the choices."""
    names = [m.strip() for m in spec.split(",") if m.strip() and m.strip() != "none"]
    if names == ["auto"]:
        return "auto"
    names = [n for m in names for n in (list(SEQUENCE_SOURCES) if m == "both" else [m])]
    unknown = [m for m in names if m not in SEQUENCE_SOURCES]
    if unknown:
        raise ValueError(
            f"--sequential {spec}: {', '.join(unknown)} is not a sequential source; give "
            f"{', '.join(SEQUENCE_SOURCES)}, both, none or auto"
        )
    return [f"{m}/export" for m in dict.fromkeys(names)]


def choice_file(root: str | Path, sources: list[str]) -> Path:
    """Where the served system chosen among ``sources`` (names, two-tower first) is written. The
    item-to-item sources count as one, "item-item": one export holds them (EASE is left out of it
    for catalogs too large for its dense inverse)."""
    names = dict.fromkeys("item-item" if n in ITEM_ITEM else n.lower() for n in sources)
    return Path(root) / "serving" / f"served-{'-'.join(names)}.json"


def create_pipeline(
    artifacts_dir: str | Path = "runs",
    retrieval: str = "retrieval/export",
    ranking: str | dict[str, str] = "auto",
    data_dir: str | None = None,
    device: str = "auto",
    dataset: InteractionData | None = None,
    sequential: str | list[str] | None = "auto",
    candidate_source: str = "auto",
    served: bool = True,
    item_item: str | None = "auto",
    compiled: bool = True,
) -> RecommendationPipeline:
    """Load the exported stages from ``artifacts_dir`` and check that they fit together.

    Candidate sources: the two-tower retriever, plus each sequential export in ``sequential``
    (paths relative to ``artifacts_dir``; "auto": those of ``sasrec/export`` and
    ``bert4rec/export`` that exist; None: none), plus the item-to-item sources EASE and transitions
    of ``item_item`` (retrieval/item_item.py's export; "auto": ``item-item/export`` if it exists).

    The served system: with ``candidate_source="auto"`` and ``ranking="auto"``, the one chosen on
    validation for these sources by ``python -m integration.ensemble`` (``serving/served-<sources>.json``,
    which also holds the ensemble's weights; refused if any model changed since). Without that
    file: SASRec's candidates re-ranked by their ranker when SASRec is there, then BERT4Rec's, else
    the two-tower's. ``candidate_source`` names one: "two-tower", "SASRec", "BERT4Rec", "union" (of
    every source's top 100), re-ranked, "EASE" or "transitions", or "ensemble", served in its own
    order, or "union ranker" (integration/union_model.py: its own order is ranked; refused where its
    artifact does not fit). ``served=False`` ignores the choice file (the choice itself is made that way).

    Rankers: each source's own, trained on its candidates, is ``serving/dlrm-int8-<model>`` for a
    sequential source and ``serving/dlrm-int8`` for the two-tower (a source without one falls back
    to the two-tower's). ``ranking`` overrides the served one: an artifact or ``{arm: artifact}``
    for A/B tests ("auto": the served source's own). The ranking artifacts run on CPU; ``device``
    must agree ("auto" does). ``dataset`` passes a data set in memory (e.g. a synthetic one)
    instead of loading it by name. ``compiled``: the query tower, the sequential scorers and the
    rankers run their AOTInductor packages where they have checked-out ones
    (``python -m inference_legacy.aot_compile``), and so does the union ranker
    (``python -m integration.union_model``). Serving settings for the process: freed memory
    stays in the heap (:func:`retain_freed_memory`).
    """
    retain_freed_memory()
    rules.serving_device(device)
    root = Path(artifacts_dir)
    r_dir = root / retrieval
    r_manifest = read_retrieval_manifest(r_dir)
    ds = dataset if dataset is not None else load_dataset(r_manifest["dataset"], data_dir)
    rules.same_data(
        "retrieval export",
        r_dir,
        r_manifest["data_fingerprint"],
        ds,
        f"serve the data set it was trained on ({r_manifest['dataset']})",
    )
    scorers = _sequential_scorers(root, sequential, ds, compiled)
    digests = {name: file_digest(root / path / "weights.pt", "sha256") for name, (path, _) in scorers.items()}
    item_sources: list = _item_item_sources(root, item_item, ds)
    digests.update({src.name: src.export.digest(src.name) for src in item_sources})
    split = split_dataset(ds)
    for again in _again_source(root, ds, split):
        item_sources.append(again)
        digests[again.name] = digest({"half_life": again.half_life})

    choice, choice_path, fix = _choice(root, served, scorers, item_sources)
    candidate_source, rerank = _served_system(
        candidate_source, ranking, choice, scorers, item_sources, choice_path, fix
    )

    rankers, by_source, loaded = _rankers(root, ranking, candidate_source, scorers, compiled)
    for path, p in loaded.items():
        fp = p.manifest["source"]["data_fingerprint"]
        rules.same_data(
            "ranking artifact",
            root / path,
            fp,
            ds,
            "retrain it on this data, or point --data-dir at the data it was trained on",
        )
    for path, p in loaded.items():
        rules.ranker_saw_this_retrieval(root / path, p.manifest, r_dir, r_manifest["files"])
    for name, (path, _) in scorers.items():
        ranker = _own_ranker(root, name, scorers)
        rules.ranker_saw_these_candidates(root / ranker, by_source[name].manifest, name, root / path, digests[name])

    cfg = rules.one_feature_store({root / path: p.manifest for path, p in loaded.items()})
    # Rankers packaged before --history-match existed had the features whenever the data had the columns.
    store = FeatureStore.build(
        ds,
        split,
        cfg["history_len"],
        cfg["sequence_features"],
        cfg["trend_days"],
        history_match=cfg.get("history_match", True),
    )
    for path, p in loaded.items():
        rules.ranker_reads_the_store(root / path, p.schema, p.manifest, store.features.schema)
    retriever = Retriever(r_dir, device="cpu", k=CANDIDATES, compiled=compiled)
    rules.same_id_maps(r_dir, retriever.user_raw_ids, retriever.item_raw_ids, ds)
    item_embeddings = np.load(r_dir / "item_embeddings.npy")
    sources: list[CandidateSource] = [TwoTowerSource(retriever, item_embeddings, ds.repeats)]
    sources += [SequenceSource(sc, ds.item_raw_ids, ds.repeats) for _, sc in scorers.values()]

    models = _model_digests(r_manifest, digests, by_source)
    if choice is not None:
        rules.choice_still_stands(choice_path, choice["models"], models, fix)
    weights = choice["weights"] if choice else None
    names = [src.name for src in sources + item_sources]
    union_ranker = _union_ranker(
        root, names, models["sources"], weights, store.config, candidate_source, choice, fix, compiled
    )
    what = {"data": ds.fingerprint, "source": candidate_source, "k": CANDIDATES, "retrieval": r_manifest["files"]}
    if union_ranker is not None and candidate_source == UNION_RANKER:
        what["union_ranker"] = union_ranker.manifest["model_sha256"]
    identity = digest({**what, "rerank": rerank, "weights": weights, **digests})
    return RecommendationPipeline(
        retriever,
        rankers,
        store,
        ds,
        split,
        sources,
        item_embeddings,
        candidate_source,
        identity,
        by_source,
        weights,
        rerank,
        root,
        models,
        item_sources,
        union_ranker,
    )


def _union_ranker(
    root: Path,
    names: list[str],
    models: dict[str, str],
    weights: dict[str, float] | None,
    store_config: dict,
    candidate_source: str,
    choice: dict | None,
    choose: str,
    compiled: bool = True,
) -> UnionRanker | None:
    """The union ranker (integration/union_model.py) where one was trained for these sources, their
    ensemble weights and this feature store; refused with the fix where it is served and does not fit
    (not served: left out, and the pipeline has no "union ranker" system). ``compiled``: its
    AOTInductor package where it has one that checks out."""
    manifest = read_manifest(root)
    served = candidate_source == UNION_RANKER
    fix = f"retrain it with python -m integration.union_ranker --artifacts {root} (it chooses the served system again)"
    if manifest is None:
        if served:
            raise ArtifactMismatch(f"the union ranker is served but {root / UNION_ARTIFACT} is missing: {fix}")
        return None
    stale = why_stale(manifest, models, weights)
    if stale is None and manifest["sources"] != names:
        stale = f"its lists came from the sources {manifest['sources']}, here {names}"
    if stale is None and manifest["store"] != store_config:
        stale = f"it read ranking features with other settings ({manifest['store']}, here {store_config})"
    if stale is not None:
        if served:
            raise ArtifactMismatch(f"{root / UNION_ARTIFACT} does not fit this pipeline: {stale}; {fix}")
        return None
    chosen = (choice or {}).get("union_ranker", {}).get("model_sha256")
    if served and choice is not None and chosen != manifest["model_sha256"]:
        raise ArtifactMismatch(
            f"{root / UNION_ARTIFACT} is not the union ranker the served system was chosen with (retrained since): "
            f"{choose}"
        )
    try:
        return UnionRanker.load(root / UNION_ARTIFACT, compiled)
    except ArtifactMismatch:
        if served:
            raise
        return None  # not served: a broken artifact must not stop the pipeline (nor its retraining)


def _choice(root: Path, served: bool, scorers: dict, item_sources: list) -> tuple[dict | None, Path, str]:
    """The served system chosen on validation for these sources (None when not ``served`` or never
    chosen), its file, and the command that chooses it again."""
    names = ["two-tower", *scorers, *(src.name for src in item_sources)]
    path = choice_file(root, names)
    choice = json.loads(path.read_text()) if served and path.is_file() else None
    fix = (
        f"choose again with python -m integration.ensemble --artifacts {root} "
        f"--sequential {','.join(scorers[n][1].name for n in scorers) or 'none'}"
        + ("" if item_sources else " --item-item none")
    )
    return choice, path, fix


def _served_system(
    candidate_source: str, ranking, choice: dict | None, scorers: dict, item_sources: list, path: Path, fix: str
) -> tuple[str, bool]:
    """The candidate source served and whether the ranker re-orders it: as asked, else as the choice
    says, else SASRec's (then BERT4Rec's, then the two-tower's) candidates re-ranked."""
    names = ["two-tower", *scorers, *(src.name for src in item_sources)]
    if candidate_source in ("ensemble", UNION_RANKER) and choice is None:  # both read the fitted weights
        raise ArtifactMismatch(f"no ensemble was fitted for {names} ({path} is missing): {fix}")
    auto = candidate_source == "auto"
    if auto:
        fallback = next((n for n in ("SASRec", "BERT4Rec") if n in scorers), "two-tower")
        candidate_source = choice["candidate_source"] if choice else fallback
    rules.known_source(candidate_source, names)
    # re-ranked unless serving the ensemble or an item-to-item source (no ranker is trained on their
    # candidates) or the union ranker (its own order is ranked), or as the choice says; an explicit
    # ranker (A/B arms) always re-ranks
    if candidate_source == UNION_RANKER:
        return candidate_source, False
    if ranking != "auto":
        return candidate_source, True
    if auto and choice:
        return candidate_source, bool(choice["rerank"])
    return candidate_source, candidate_source not in ("ensemble", UNION_RANKER, *(src.name for src in item_sources))


def _model_digests(r_manifest: dict, digests: dict[str, str], by_source: dict) -> dict[str, dict[str, str]]:
    """What the served system was chosen among: every source's and every source's ranker's digest."""
    return {
        "sources": {"two-tower": digest(r_manifest["files"]), **digests},
        # the model, not how it runs: AOTInductor packages added later (the manifest's "compiled" and
        # "compiled_by_user" entries) score like the exported programs, so the choice still stands
        "rankers": {
            name: digest({k: v for k, v in p.manifest.items() if k not in ("compiled", "compiled_by_user")})
            for name, p in by_source.items()
        },
    }


def retain_freed_memory(threshold: int = 32 << 20, keep: int = 1 << 30) -> bool:
    """Have glibc's malloc serve allocations under ``threshold`` bytes from the heap and keep up to
    ``keep`` bytes of freed memory there, rather than map and unmap each large block (what PyTorch's
    CPU tuning guide gets from jemalloc or tcmalloc). A serving process allocates the same few-MB
    activations every call: with glibc's defaults they can go back to the OS after each call and
    fault in again on the next (page faults that cost the batched ranker a large share of its
    throughput: integration/README.md). Returns False where there is no glibc (nothing changes). Env vars
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do the same from outside."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return bool(
        mallopt(m_mmap_threshold, threshold) and mallopt(m_trim_threshold, keep) and mallopt(m_top_pad, 64 << 20)
    )


def _sequential_scorers(root: Path, sequential, ds: InteractionData, compiled: bool) -> dict[str, tuple]:
    """{source name: (path, NextItemScorer)} of the sequential exports asked for ("auto": those there)."""
    from bert4rec.scorer import NextItemScorer

    if sequential == "auto":
        sequential = [p for p in ("sasrec/export", "bert4rec/export") if (root / p / "manifest.json").is_file()]
    elif isinstance(sequential, str):
        sequential = [sequential]
    scorers = {}
    for path in sequential or []:
        scorer = NextItemScorer(root / path, compiled)
        name = SEQUENCE_SOURCES[scorer.name]
        rules.same_data(f"{name} export", root / path, scorer.data_fingerprint, ds, "retrain it")
        rules.same_items(f"{name} export", root / path, scorer.index_of, ds, "retrain it on this data")
        scorers[name] = (path, scorer)
    return scorers


def _item_item_sources(root: Path, item_item: str | None, ds: InteractionData) -> list[ItemItemSource]:
    """EASE and the transitions of the item-to-item export ("auto": ``item-item/export`` if there)."""
    if item_item == "auto":
        item_item = "item-item/export" if (root / "item-item/export/manifest.json").is_file() else None
    if not item_item:
        return []
    model = ItemItem.load(root / item_item)
    rules.item_item_fits(root / item_item, model.manifest, ds)
    return [ItemItemSource(name, model, ds.repeats) for name in model.names]


def _again_source(root: Path, ds: InteractionData, split: Split) -> list[AgainSource]:
    """On a data set with repeats, the "again" source (each user's own earlier items), its half-life
    chosen on validation the first time and kept in ``<root>/again/half_life.json`` for this data."""
    if not ds.repeats:
        return []
    path = root / "again" / "half_life.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("data_fingerprint") != ds.fingerprint:
        half_life, figures = fit_half_life(split)
        saved = {
            "data_fingerprint": ds.fingerprint,
            "half_life": half_life,
            "chosen_on": "valid NDCG@10",
            "valid_ndcg10": {str(h): v for h, v in figures.items()},
        }
        try:
            write_json_atomic(path, saved)
        except OSError as err:  # read-only artifacts: serve with the half-life chosen now
            print(f"note: could not keep again's half-life in {path} ({err}); chosen again at each start")
    return [AgainSource(ds.num_items, float(saved["half_life"]))]


def _own_ranker(root: Path, name: str, scorers: dict) -> str:
    """The artifact of the ranker trained on source ``name``'s candidates (the two-tower's when it has none)."""
    if name in scorers:
        path = f"serving/dlrm-int8-{scorers[name][1].name}"
        if (root / path / "manifest.json").is_file():
            return path
    return "serving/dlrm-int8"


def _rankers(root: Path, ranking, candidate_source: str, scorers: dict, compiled: bool) -> tuple[dict, dict, dict]:
    """The served rankers by A/B arm, each learned source's own ranker, and every artifact loaded
    (once each) by path."""
    if ranking == "auto":
        ranking = _own_ranker(root, "two-tower" if candidate_source == "union" else candidate_source, scorers)
    arms = {"A": ranking} if isinstance(ranking, str) else dict(ranking)
    rankers = {arm: DLRMPredictor(root / path, compiled) for arm, path in arms.items()}
    loaded = {path: rankers[arm] for arm, path in arms.items()}
    by_source = {}
    for name in ["two-tower", *scorers]:  # the item-to-item sources have no ranker of their own
        path = _own_ranker(root, name, scorers)
        if path not in loaded:
            loaded[path] = DLRMPredictor(root / path, compiled)
        by_source[name] = loaded[path]
    return rankers, by_source, loaded
