"""Criteo readers and generator; synthetic interactions with planted structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.synthetic import generate_interactions, oracle_scores, synthetic_dataset, truth_of
from common.data.split import split_dataset
from common.metrics import BinaryMetrics, evaluate_scores
from golden_training.criteo import (
    NUM_DENSE,
    NUM_SPARSE,
    generate_criteo_tsv,
    read_criteo_npy,
    read_criteo_tsv,
)


def test_criteo_tsv_parsing_hashing_and_missing_values(tmp_path) -> None:
    row1 = ["1", "5", "-1", ""] + ["0"] * 10 + ["0000000a", ""] + ["ffffffff"] * 24
    row2 = ["0"] + [""] * 13 + ["68fd1e64"] * 26
    path = tmp_path / "t.tsv"
    path.write_text("\t".join(row1) + "\n" + "\t".join(row2) + "\n")
    a = read_criteo_tsv(path, num_embeddings=7)
    assert a.labels.tolist() == [1.0, 0.0]
    assert a.dense[0, :3] == pytest.approx([np.log(6), 0.0, 0.0])  # log1p, negative -> 0, missing -> 0
    assert (a.dense[1] == 0).all() and a.dense.dtype == np.float32
    assert a.sparse[0, 0] == 0xA % 7 and a.sparse[0, 1] == 0 and a.sparse[0, 2] == 0xFFFFFFFF % 7
    assert a.sparse[1, 0] == 0x68FD1E64 % 7
    sizes = list(range(1, 27))
    b = read_criteo_tsv(path, num_embeddings=sizes)
    assert (b.sparse < np.array(sizes)).all()


def test_criteo_malformed_lines_are_named(tmp_path) -> None:
    short = tmp_path / "short.tsv"
    short.write_text("1\t2\t3\n")
    with pytest.raises(ValueError, match="line 1: has 3 fields, expected 40"):
        read_criteo_tsv(short, 10)
    bad_label = tmp_path / "label.tsv"
    bad_label.write_text("\t".join(["2"] + ["1"] * 13 + ["a"] * 26) + "\n")
    with pytest.raises(ValueError, match="line 1: label must be 0 or 1"):
        read_criteo_tsv(bad_label, 10)
    with pytest.raises(ValueError, match="26 of them"):
        read_criteo_tsv(bad_label, [10, 10])


def test_criteo_kaggle_test_file_without_labels(tmp_path) -> None:
    p = generate_criteo_tsv(tmp_path / "test.txt", 50, seed=3, has_label=False)
    a = read_criteo_tsv(p, 100, has_label=False)
    assert len(a) == 50 and (a.labels == -1).all()


def test_criteo_npy_matches_torchrec_preprocessing(tmp_path) -> None:
    """TorchRec's own tsv_to_npys output reads back to the same sparse IDs and labels."""
    from torchrec.datasets.criteo import BinaryCriteoUtils

    tsv = generate_criteo_tsv(tmp_path / "day_0.tsv", 2_000, seed=1)
    BinaryCriteoUtils.tsv_to_npys(
        str(tsv), *(str(tmp_path / f"day_0_{k}.npy") for k in ("dense", "sparse", "labels")), dataset_name="criteo_1tb"
    )  # "criteo_kaggle" treats any path containing
    # "test" (as pytest's tmp_path does) as the unlabeled Kaggle test file.
    ours, theirs = read_criteo_tsv(tsv, 1000), read_criteo_npy(tmp_path, 0, 1000)
    assert (ours.sparse == theirs.sparse).all() and (ours.labels == theirs.labels).all()
    assert theirs.dense.shape == (2_000, NUM_DENSE) and np.isfinite(theirs.dense).all()
    with pytest.raises(FileNotFoundError, match="day_1_dense.npy"):
        read_criteo_npy(tmp_path, 1, 1000)


def test_generated_criteo_has_a_learnable_signal(tmp_path) -> None:
    a = read_criteo_tsv(generate_criteo_tsv(tmp_path / "d.tsv", 20_000, seed=0), 100_000)
    assert a.sparse.shape == (20_000, NUM_SPARSE) and 0.1 < a.labels.mean() < 0.9
    train, test = slice(0, 15_000), slice(15_000, None)
    # Per-category click rates of cat_0 and cat_1 on train, as a score on test.
    score = np.zeros(5_000)
    for j in (0, 1):
        sums = np.bincount(a.sparse[train, j], weights=a.labels[train], minlength=100_000)
        cnts = np.bincount(a.sparse[train, j], minlength=100_000)
        rate = (sums + a.labels[train].mean()) / (cnts + 1)
        score += np.log(rate[a.sparse[test, j]])
    m = BinaryMetrics()
    m.update(torch.tensor(1 / (1 + np.exp(-score))), torch.tensor(a.labels[test]))
    assert m.compute()["auc"] > 0.65


def test_synthetic_structure_is_learnable_and_seeded() -> None:
    d = generate_interactions(num_users=2_000, num_items=1_000, interactions_per_user=20, seed=0)
    assert d.num_interactions > 35_000 and np.bincount(d.user).min() >= 3
    same_user = d.user[1:] == d.user[:-1]
    assert (np.diff(d.user) >= 0).all() and (d.timestamp[1:][same_user] > d.timestamp[:-1][same_user]).all()
    counts = np.sort(np.bincount(d.item, minlength=d.num_items))[::-1]
    assert counts[:10].sum() > 5 * counts[-500:].sum() / 50  # power-law head vs tail
    ds = synthetic_dataset(d)  # the split reads the canonical form only
    split = split_dataset(ds)
    gen_user, gen_item = truth_of(ds)  # dense index -> the generator's
    pop = torch.as_tensor(split.item_counts("test"), dtype=torch.float32)
    popularity = evaluate_scores(lambda u: pop.expand(len(u), -1).clone(), split, "test", n_boot=10)
    oracle = evaluate_scores(
        lambda u: torch.as_tensor(oracle_scores(d, gen_user[u.numpy()])[:, gen_item]), split, "test", n_boot=10
    )
    assert oracle.means["HR@10"] > 5 * popularity.means["HR@10"] and oracle.means["HR@10"] > 0.15
    again = generate_interactions(num_users=2_000, num_items=1_000, interactions_per_user=20, seed=0)
    assert (again.item == d.item).all() and (again.timestamp == d.timestamp).all()
    with pytest.raises(ValueError, match="interactions_per_user must be >= 3"):
        generate_interactions(interactions_per_user=2)


def test_synthetic_scales_to_a_million_items() -> None:
    d = generate_interactions(
        num_users=200_000, num_items=1_000_000, interactions_per_user=5, num_clusters=1_000, seed=1
    )
    assert d.num_items == 1_000_000 and d.item.max() < 1_000_000 and d.num_interactions > 900_000


def test_criteo_bad_lines_are_named_or_skipped_and_counted(tmp_path) -> None:
    good = ["1"] + ["3"] * 13 + ["0a"] * 26
    rows = [
        good,
        ["1", "abc"] + ["1"] * 12 + ["a"] * 26,
        good[:-1] + ["xyz"],
        good[:5],
        ["0"] + ["2"] * 13 + ["b"] * 26,
    ]
    p = tmp_path / "x.tsv"
    p.write_text("".join("\t".join(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"x.tsv: line 2: int_0 must be an integer, got 'abc'.*on_bad_line='skip'"):
        read_criteo_tsv(p, 10)
    from collections import Counter

    skipped: Counter[str] = Counter()
    a = read_criteo_tsv(p, 10, on_bad_line="skip", skipped=skipped)
    assert a.labels.tolist() == [1.0, 0.0]  # lines 1 and 5
    assert sum(skipped.values()) == 3 and len(skipped) == 3
    assert any("cat_25 must be a hex hash" in k for k in skipped)


def test_criteo_negative_counts_are_clamped_and_counted_or_rejected(tmp_path) -> None:
    from collections import Counter

    good = ["1"] + ["3"] * 13 + ["0a"] * 26
    negative = ["0", "5", "-2"] + ["1"] * 11 + ["0b"] * 26
    p = tmp_path / "neg.tsv"
    p.write_text("".join("\t".join(r) + "\n" for r in (good, negative, good)))
    clamped: Counter[str] = Counter()
    a = read_criteo_tsv(p, 10, clamped=clamped)  # default: clamp, as DLRM's preprocessing does, but count
    assert len(a) == 3 and a.dense[1, 1] == 0.0 and clamped == Counter({"int_1": 1})
    with pytest.raises(ValueError, match=r"neg.tsv: line 2: int_1 is a negative count, got '-2'"):
        read_criteo_tsv(p, 10, negatives="bad_line")
    skipped: Counter[str] = Counter()
    b = read_criteo_tsv(p, 10, negatives="bad_line", on_bad_line="skip", skipped=skipped)
    assert len(b) == 2 and sum(skipped.values()) == 1
