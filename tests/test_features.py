"""Feature schema -> KeyedJaggedTensor: conversion, jagged features, and every bad-input error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagCollection

from common.features import DenseFeature, FeatureError, FeatureSchema, SparseFeature

SCHEMA = FeatureSchema(
    sparse=(
        SparseFeature("user_id", 10),
        SparseFeature("history", 20, pooling="mean", max_length=3, table="item"),
        SparseFeature("item_id", 20, pooling="mean", table="item"),
        SparseFeature("genres", 5, max_length=None),
    ),
    dense=(DenseFeature("age"), DenseFeature("popularity")),
)


def rec(**overrides):
    r = {"user_id": 1, "history": [4, 5], "item_id": 7, "genres": [0, 2], "age": 0.5, "popularity": 2.0}
    r.update(overrides)
    return r


def test_records_to_kjt_and_dense() -> None:
    b = SCHEMA.from_records([rec(), rec(user_id=2, history=[], genres=[], age=1.0)])
    assert b.sparse.keys() == ["user_id", "history", "item_id", "genres"]
    d = b.sparse.to_dict()
    assert [t.tolist() for t in d["history"].to_dense()] == [[4, 5], []]
    assert d["genres"].lengths().tolist() == [2, 0]
    assert d["user_id"].values().tolist() == [1, 2]
    assert b.dense.dtype == torch.float32 and b.dense.tolist() == [[0.5, 2.0], [1.0, 2.0]]
    assert b.batch_size == 2


def test_max_length_keeps_most_recent() -> None:
    b = SCHEMA.from_records([rec(history=[1, 2, 3, 4, 5])])
    assert b.sparse["history"].values().tolist() == [3, 4, 5]


def test_records_round_trip_and_list_ids_take_the_fast_path_or_the_named_error() -> None:
    rows = [rec(), rec(user_id=2, history=[1, 2, 3, 4], genres=[], age=1.0), rec(genres=[4, 1, 3])]
    back = SCHEMA.to_records(SCHEMA.from_records(rows))
    assert back[1]["history"] == [2, 3, 4] and back[1]["genres"] == [] and back[2]["genres"] == [4, 1, 3]
    assert back[0] == rows[0] and back[2] == rows[2]
    with pytest.raises(FeatureError, match=r"'genres' \(example 1\): expected integer IDs, got dtype float64"):
        SCHEMA.from_records([rec(), rec(genres=[1, 2.5])])
    with pytest.raises(FeatureError, match=r"'history': ID 99 in example 1 is out of range"):
        SCHEMA.from_records([rec(), rec(history=[1, 99])])


def test_columns_forms_agree_with_records() -> None:
    from_records = SCHEMA.from_records([rec(), rec(user_id=3, history=[9], genres=[4])])
    from_cols = SCHEMA.from_columns(
        {
            "user_id": np.array([1, 3]),
            "history": (np.array([4, 5, 9]), np.array([2, 1])),
            "item_id": torch.tensor([7, 7]),
            "genres": [[0, 2], [4]],
            "age": np.array([0.5, 0.5]),
            "popularity": [2.0, 2.0],
        }
    )
    for key in SCHEMA.sparse_names:
        assert torch.equal(from_records.sparse[key].values(), from_cols.sparse[key].values())
        assert torch.equal(from_records.sparse[key].lengths(), from_cols.sparse[key].lengths())
    assert torch.equal(from_records.dense, from_cols.dense)


def test_embedding_bag_configs_group_features_by_table_and_feed_an_ebc() -> None:
    configs = SCHEMA.embedding_bag_configs({"user_id": 4, "item": 8, "genres": 4})
    assert [(c.name, c.feature_names, c.num_embeddings, c.embedding_dim) for c in configs] == [
        ("user_id", ["user_id"], 10, 4),
        ("item", ["history", "item_id"], 20, 8),
        ("genres", ["genres"], 5, 4),
    ]
    ebc = EmbeddingBagCollection(tables=configs)
    out = ebc(SCHEMA.from_records([rec(), rec(history=[])]).sparse).to_dict()
    assert out["history"].shape == (2, 8) and out["genres"].shape == (2, 4)
    item_table = ebc.embedding_bags["item"].weight
    assert torch.allclose(out["history"][0], item_table[[4, 5]].mean(0))  # mean pooling, shared table
    assert torch.allclose(out["history"][1], torch.zeros(8))  # empty history pools to 0


def test_schema_round_trips_through_dict() -> None:
    assert FeatureSchema.from_dict(SCHEMA.to_dict()) == SCHEMA


@pytest.mark.parametrize(
    "record, message",
    [
        (rec(foo=1), r"record 0: unknown feature\(s\) \['foo'\]"),
        ({k: v for k, v in rec().items() if k != "item_id"}, r"record 0: missing feature\(s\) \['item_id'\]"),
        (rec(item_id=20), r"'item_id': ID 20 in example 0 is out of range \[0, 20\)"),
        (rec(history=[1, -1]), r"'history': ID -1 in example 0 is out of range"),
        (rec(age=math.nan), r"dense feature 'age': nan in example 0; impute"),
        (rec(popularity=math.inf), r"dense feature 'popularity': inf in example 0"),
        (rec(user_id=1.5), r"'user_id' \(example 0\): expected integer IDs, got dtype float64"),
        (rec(user_id="7"), r"'user_id', record 0: expected an integer ID or a list of IDs, got str"),
        (rec(age="old"), r"dense feature 'age': expected numbers, got dtype <U3"),
        (rec(user_id=[1, 2]), r"'user_id' is single-valued but example 0 has 2 IDs"),
        (rec(genres=[True]), r"'genres' \(example 0\): expected integer IDs, got dtype bool"),
    ],
)
def test_bad_records_name_the_feature(record, message) -> None:
    with pytest.raises(FeatureError, match=message):
        SCHEMA.from_records([rec(), record][1:])


def test_bad_columns_name_the_feature() -> None:
    good = {
        "user_id": [1, 2],
        "history": ([1, 2], [1, 1]),
        "item_id": [3, 4],
        "genres": ([0], [1, 0]),
        "age": [0.1, 0.2],
        "popularity": [1.0, 1.0],
    }
    with pytest.raises(FeatureError, match="'history': lengths sum to 2 but 3 values"):
        SCHEMA.from_columns({**good, "history": ([1, 2, 3], [1, 1])})
    with pytest.raises(FeatureError, match="'history': negative length at example 1"):
        SCHEMA.from_columns({**good, "history": ([1], [2, -1])})
    with pytest.raises(FeatureError, match="'item_id' has 3 examples, expected 2"):
        SCHEMA.from_columns({**good, "item_id": [3, 4, 5]})
    with pytest.raises(FeatureError, match="dense feature 'age' has 1 examples, expected 2"):
        SCHEMA.from_columns({**good, "age": [0.1]})
    with pytest.raises(FeatureError, match="'age': expected one value per example \\(1-D\\)"):
        SCHEMA.from_columns({**good, "age": [[0.1], [0.2]]})
    with pytest.raises(FeatureError, match=r"missing feature\(s\) \['genres'\]"):
        SCHEMA.from_columns({k: v for k, v in good.items() if k != "genres"})
    with pytest.raises(FeatureError, match="one dict: wrap it in a list"):
        SCHEMA.from_records(rec())


def test_bad_schemas_are_rejected() -> None:
    with pytest.raises(FeatureError, match="repeated: \\['a'\\]"):
        FeatureSchema(sparse=(SparseFeature("a", 3),), dense=(DenseFeature("a"),))
    with pytest.raises(FeatureError, match="sharing table 't' disagree on cardinality"):
        FeatureSchema(sparse=(SparseFeature("a", 3, table="t"), SparseFeature("b", 4, table="t")))
    with pytest.raises(FeatureError, match="cardinality must be >= 1"):
        SparseFeature("a", 0)
    with pytest.raises(FeatureError, match="pooling must be one of"):
        SparseFeature("a", 3, pooling="max")
    with pytest.raises(FeatureError, match="different poolings"):
        FeatureSchema(
            sparse=(SparseFeature("a", 3, table="t"), SparseFeature("b", 3, table="t", pooling="mean"))
        ).embedding_bag_configs(4)


def test_array_columns_take_the_fast_checks_and_give_what_lists_give() -> None:
    """NumPy columns (what the pipeline and the trainers pass) are checked in a few passes; the batch
    equals the one built from Python lists, and any bad array still gets the error naming it."""
    rng = np.random.default_rng(0)
    n = 50
    hist_len = rng.integers(0, 6, n)  # some over max_length 3: the last 3 are kept
    hist = rng.integers(0, 20, int(hist_len.sum()))
    genre_len = rng.integers(0, 3, n)
    genres = rng.integers(0, 5, int(genre_len.sum()))
    cols = {
        "user_id": rng.integers(0, 10, n),
        "history": (hist, hist_len),
        "item_id": rng.integers(0, 20, n).astype(np.int32),
        "genres": (genres, genre_len),
        "age": rng.random(n).astype(np.float32),
        "popularity": rng.random(n).astype(np.float32),
    }
    split = lambda v, lens: [x.tolist() for x in np.split(v, np.cumsum(lens)[:-1])]  # noqa: E731
    lists = {
        "user_id": cols["user_id"].tolist(),
        "history": split(hist, hist_len),
        "item_id": cols["item_id"].tolist(),
        "genres": split(genres, genre_len),
        "age": cols["age"].tolist(),
        "popularity": cols["popularity"].tolist(),
    }
    fast, slow = SCHEMA.from_columns(cols), SCHEMA.from_columns(lists)
    assert torch.equal(fast.sparse.values(), slow.sparse.values()) and fast.sparse.values().dtype == torch.int64
    assert torch.equal(fast.sparse.lengths(), slow.sparse.lengths()) and fast.sparse.lengths().dtype == torch.int32
    assert torch.equal(fast.dense, slow.dense)
    assert fast.sparse.to_dict()["history"].lengths().max() == 3

    bad = {
        "user_id": (np.r_[cols["user_id"][:-1], 10], r"'user_id': ID 10 in example 49 is out of range \[0, 10\)"),
        "history": ((hist, np.r_[hist_len[:-1], hist_len[-1] + 1]), "lengths sum to"),
        "genres": ((genres, np.r_[-1, genre_len[1:]]), "negative length"),
        "item_id": (np.r_[-1, cols["item_id"][1:]], r"'item_id': ID -1 in example 0 is out of range"),
        "age": (np.r_[np.nan, cols["age"][1:]].astype(np.float32), "'age': nan in example 0"),
    }
    for name, (col, message) in bad.items():
        with pytest.raises(FeatureError, match=message):
            SCHEMA.from_columns({**cols, name: col})
    with pytest.raises(FeatureError, match="'user_id' is single-valued but example 0 has 2 IDs"):
        SCHEMA.from_columns({**cols, "user_id": (np.arange(n + 1) % 10, np.r_[2, np.ones(n - 1, np.int64)])})
