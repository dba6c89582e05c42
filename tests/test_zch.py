"""Zero-collision hashing (zch/): raw IDs, what ZCH buys over modulo hashing on real MovieLens data,
the ID-to-row mapping surviving checkpoint and resume, IDs never seen in training at serving time,
and the replicated remapper under 2 gloo processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from common.runtime import init_runtime, shutdown
from tests import dist_workers
from zch import main as zch_main
from zch.sparse_arch import build_remapper, salted_raw_ids


def test_salted_raw_ids_are_distinct_non_negative_int64_and_salt_dependent():
    ids = np.arange(200_000)
    a, b = salted_raw_ids(ids, 1), salted_raw_ids(ids, 2)
    assert a.dtype == np.int64 and (a >= 0).all() and (a < np.iinfo(np.int64).max).all()
    assert len(np.unique(a)) == len(ids)
    assert len(np.intersect1d(a, b)) == 0
    assert (salted_raw_ids(ids[:5], 1) == a[:5]).all()  # deterministic


def test_modulo_collides_and_zch_gives_frequent_ids_their_own_rows():
    rng = np.random.default_rng(0)
    stream = salted_raw_ids(rng.zipf(1.3, 20_000) % 2_000, 3)
    modulo = build_remapper("modulo", {"f": 200})
    zch = build_remapper("zch_lfu", {"f": 200})
    zch.train()
    for start in range(0, len(stream), 500):
        chunk = torch.as_tensor(stream[start : start + 500])
        zch(KeyedJaggedTensor(keys=["f"], values=chunk, lengths=torch.ones(len(chunk), dtype=torch.int32)))
    ids, counts = np.unique(stream, return_counts=True)
    top = torch.as_tensor(ids[np.argsort(-counts)[:50]])  # each seen about 30 times or more
    zch_rows, mod_rows = zch.rows("f", top), modulo.rows("f", top)
    assert len(torch.unique(zch_rows)) == 50  # the 50 most frequent IDs: 50 rows of their own
    assert (zch_rows < 199).all()  # none on the default row
    assert len(torch.unique(mod_rows)) < 48  # modulo: some of them already share rows
    assert zch.evictions > 0


@pytest.fixture(scope="module")
def half_size_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("zch")
    return zch_main.main(["--variants", "full", "modulo", "zch_lfu", "--ratios", "0.5", "--out", str(out)])


def test_zch_at_half_size_is_closer_to_unhashed_than_modulo(half_size_results):
    """The README's claim, on validation (seeded, 3 epochs in time order on ml-100k)."""
    by = {r["variant"]: r for r in half_size_results["results"]}
    full, modulo, zch = by["full"], by["modulo"], by["zch_lfu"]
    assert full["auc_valid"] > 0.68
    assert full["auc_valid"] - zch["auc_valid"] < full["auc_valid"] - modulo["auc_valid"] - 0.01
    assert zch["collision_rate_frequent"] < 0.02 < 0.3 < modulo["collision_rate_frequent"]
    assert full["collision_rate"] == 0.0 and full["evictions"] == 0
    assert zch["table_rows"] == modulo["table_rows"] == {"user_id": 472, "item_id": 841}


def test_results_are_written_as_json_and_markdown(half_size_results):
    out = half_size_results["config"]["out"]
    saved = json.loads((Path(out) / "results.json").read_text())
    assert [r["variant"] for r in saved["results"]] == ["full", "modulo", "zch_lfu"]
    table = (Path(out) / "results.md").read_text()
    assert "| zch_lfu | 0.5x | 472 / 841 |" in table


def _short_run(tmp_path, variant: str, *extra: str):
    cfg = zch_main.parse_args(
        [
            "--variants",
            variant,
            "--ratios",
            "0.25",
            "--epochs",
            "1",
            "--limit-batches",
            "40",
            "--out",
            str(tmp_path),
            *extra,
        ]
    )
    rt = init_runtime("cpu")
    data = zch_main.movielens_stream(cfg)
    rows = zch_main.table_rows_for(data, 0.25, None)
    return cfg, rt, data, rows


def test_resume_keeps_the_zch_mapping(tmp_path):
    """Two epochs straight, and one epoch then a resumed second: the same raw IDs hold the same rows;
    a model rebuilt from the checkpoint maps every training ID to the row it had."""
    try:
        cfg, rt, data, rows = _short_run(tmp_path / "straight", "zch_lru", "--epochs", "2")
        straight, model, remapper = zch_main.train_variant("zch_lru", "0.25x", rows, data, cfg, rt)

        cfg1, _, _, _ = _short_run(tmp_path / "resumed", "zch_lru", "--epochs", "1")
        zch_main.train_variant("zch_lru", "0.25x", rows, data, cfg1, rt)
        cfg2, _, _, _ = _short_run(tmp_path / "resumed", "zch_lru", "--epochs", "2", "--resume")
        resumed, _, _ = zch_main.train_variant("zch_lru", "0.25x", rows, data, cfg2, rt)
        assert resumed["mapping_digest"] == straight["mapping_digest"]
        assert resumed["evictions"] == straight["evictions"] > 0

        # a fresh model loaded from the straight run's last checkpoint: same rows for every ID seen
        from common.checkpoint import latest_checkpoint, load_checkpoint

        fresh, optimizer, fresh_remapper = zch_main.build("zch_lru", rows, data, cfg, rt)
        load_checkpoint(
            latest_checkpoint(tmp_path / "straight" / "zch_lru-0.25x" / "checkpoints"),
            {"model": fresh, "optimizer": optimizer},
        )
        for f in zch_main.FEATURES:
            ids = torch.as_tensor(np.unique(data.raw[f][data.train]))
            assert torch.equal(fresh_remapper.rows(f, ids), remapper.rows(f, ids))
        assert fresh_remapper.mapping_digest() == straight["mapping_digest"]
    finally:
        shutdown()


@pytest.mark.parametrize("variant", ["zch_lfu", "modulo", "full"])
def test_ids_never_seen_in_training_get_a_defined_row_when_serving(tmp_path, variant):
    try:
        cfg, rt, data, rows = _short_run(tmp_path, variant)
        _, model, remapper = zch_main.train_variant(variant, "0.25x", rows, data, cfg, rt)
        model.eval()
        n = 64
        unseen = {f: torch.as_tensor(salted_raw_ids(np.arange(n) + 10**9, 99)) for f in zch_main.FEATURES}
        for f, ids in unseen.items():
            assert not np.isin(ids.numpy(), data.vocab[f]).any()
            got = remapper.rows(f, ids)
            assert ((got >= 0) & (got < remapper.tables[f])).all()
            if variant != "modulo":  # ZCH's default row, or the unhashed model's unknown-ID row
                assert (got == remapper.tables[f] - 1).all()
        kjt = KeyedJaggedTensor(
            keys=list(zch_main.FEATURES),
            values=torch.cat(list(unseen.values())),
            lengths=torch.ones(2 * n, dtype=torch.int32),
        )
        with torch.no_grad():
            scores = model(torch.zeros(n, data.dense.shape[1]), kjt)
        assert scores.shape == (n, 1) and torch.isfinite(scores).all()
        if variant == "zch_lfu":  # serving admits nothing: the mapping is unchanged by unseen IDs
            before = remapper.mapping_digest()
            with torch.no_grad():
                model(torch.zeros(n, data.dense.shape[1]), kjt)
            assert remapper.mapping_digest() == before
    finally:
        shutdown()


def test_mpzch_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="read-only"):
        build_remapper("mpzch", {"f": 10})


@pytest.mark.multiprocess
def test_two_ranks_keep_one_mapping_equal_to_a_single_process(tmp_path):
    """The replicated remapper profiles the global batch on every rank: 2 ranks of 128 examples
    per step end with the same mapping as 1 process of 256 (same global batches)."""
    one = dist_workers.launch(dist_workers.zch_mapping, 1, str(tmp_path / "one"), 256)[0]
    two = dist_workers.launch(dist_workers.zch_mapping, 2, str(tmp_path / "two"), 128)
    assert two[0] == two[1] == one
