"""Synthetic interactions with planted structure, from thousands to millions of users and items.

Each item belongs to one of ``num_clusters`` latent topics and has a Zipf popularity weight
(exponent ``zipf``) within its topic. Each user likes ``topics_per_user`` topics, with weights
drawn from a flat Dirichlet. An interaction picks a topic from the user's mixture, then an item from that
topic by popularity, with a ``repeat_topic`` chance of staying on the topic of the user's previous
item (so order carries signal, as in real watch histories). Timestamps increase per user.

Because the generator knows the truth, :func:`oracle_scores` gives each user's true item
probabilities: a model that learns the structure approaches it, popularity stays far below.
Generation is O(interactions) with vectorized sampling, so 10M interactions take seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SyntheticInteractions:
    user: np.ndarray  # int64 [n], sorted by (user, time)
    item: np.ndarray  # int64 [n]
    timestamp: np.ndarray  # int64 [n]
    num_users: int
    num_items: int
    item_topic: np.ndarray  # int64 [num_items]: the planted topic of each item
    item_weight: np.ndarray  # float64 [num_items]: popularity within its topic (sums to 1 per topic)
    user_topics: np.ndarray  # int64 [num_users, topics_per_user]: the planted liked topics
    user_topic_weight: np.ndarray  # float64 [num_users, topics_per_user]: their weights (sum to 1)
    num_clusters: int

    @property
    def num_interactions(self) -> int:
        return len(self.user)

    @property
    def user_raw_ids(self) -> np.ndarray:
        """The generator's IDs are the dense indices (what the split's tie key hashes)."""
        return np.arange(self.num_users, dtype=np.int64)

    @property
    def item_raw_ids(self) -> np.ndarray:
        return np.arange(self.num_items, dtype=np.int64)


def generate_interactions(
    num_users: int = 10_000,
    num_items: int = 5_000,
    interactions_per_user: float = 20.0,
    num_clusters: int = 50,
    topics_per_user: int = 3,
    zipf: float = 1.0,
    repeat_topic: float = 0.5,
    seed: int = 0,
) -> SyntheticInteractions:
    """Generate interactions as described in the module docstring.

    ``interactions_per_user`` is the mean; each user gets 3 + Poisson(mean - 3) so that every
    user has train, validation and test interactions under the shared split.
    """
    if num_clusters > num_items:
        raise ValueError(f"num_clusters ({num_clusters}) must not exceed num_items ({num_items})")
    if interactions_per_user < 3:
        raise ValueError(f"interactions_per_user must be >= 3 (train, valid, test), got {interactions_per_user}")
    rng = np.random.default_rng(seed)
    # Items: topic and popularity rank within topic.
    item_topic = rng.permutation(np.arange(num_items) % num_clusters).astype(np.int64)
    order = np.argsort(item_topic, kind="stable")  # items grouped by topic
    topic_start = np.searchsorted(item_topic[order], np.arange(num_clusters + 1))
    topic_size = np.diff(topic_start)
    rank = np.empty(num_items, dtype=np.int64)
    rank[order] = np.arange(num_items) - np.repeat(topic_start[:-1], topic_size)
    weight = 1.0 / (rank + 1.0) ** zipf
    weight /= np.bincount(item_topic, weights=weight)[item_topic]
    cdf_within = np.cumsum(weight[order]) - np.repeat(
        np.r_[0, np.cumsum(np.bincount(item_topic, weights=weight))[:-1]], topic_size
    )

    # Users: liked topics, their weights, and interaction counts.
    user_topics = rng.integers(0, num_clusters, size=(num_users, topics_per_user), dtype=np.int64)
    user_weight = rng.dirichlet(np.ones(topics_per_user), size=num_users)
    counts = 3 + rng.poisson(interactions_per_user - 3, size=num_users)
    user = np.repeat(np.arange(num_users, dtype=np.int64), counts)
    n = len(user)

    # Topics: from the user's liked topics, or (with prob repeat_topic) the previous interaction's.
    choice = (rng.random(n)[:, None] > np.cumsum(user_weight[user], axis=1)).sum(axis=1)
    fresh_topic = user_topics[user, np.minimum(choice, topics_per_user - 1)]
    repeat = rng.random(n) < repeat_topic
    first = np.r_[True, user[1:] != user[:-1]]
    repeat &= ~first
    # A repeat takes the topic of the last fresh draw before it (forward fill within the user).
    last_fresh = np.maximum.accumulate(np.where(~repeat, np.arange(n), 0))
    topic = fresh_topic[last_fresh]

    # Items: within the topic, by popularity.
    v = rng.random(n)
    pos = _segment_searchsorted(cdf_within, topic_start, topic_size, topic, v)
    item = order[topic_start[topic] + pos].astype(np.int64)

    # Timestamps: increasing per user, users interleaved over ~one year.
    start = rng.integers(0, 300 * 86_400, size=num_users)
    gaps = rng.exponential(3_600.0, size=n).astype(np.int64) + 1
    seg_start = np.r_[0, np.cumsum(counts)[:-1]]
    csum = np.cumsum(gaps)
    timestamp = 1_600_000_000 + start[user] + csum - np.repeat(csum[seg_start] - gaps[seg_start], counts)
    return SyntheticInteractions(
        user=user,
        item=item,
        timestamp=timestamp.astype(np.int64),
        num_users=num_users,
        num_items=num_items,
        item_topic=item_topic,
        item_weight=weight,
        user_topics=user_topics,
        user_topic_weight=user_weight,
        num_clusters=num_clusters,
    )


def oracle_scores(data: SyntheticInteractions, users: np.ndarray) -> np.ndarray:
    """The planted (order-free) probability of each item for each user: ``[len(users), num_items]``."""
    users = np.asarray(users)
    mixture = np.zeros((len(users), data.num_clusters))
    np.add.at(mixture, (np.arange(len(users))[:, None], data.user_topics[users]), data.user_topic_weight[users])
    return (mixture[:, data.item_topic] * data.item_weight[None, :]).astype(np.float32)


def _segment_searchsorted(
    cdf: np.ndarray, seg_start: np.ndarray, seg_size: np.ndarray, seg: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """Position within segment ``seg[i]`` of the concatenated per-segment CDFs where values[i] falls."""
    offset = np.repeat(np.arange(len(seg_size), dtype=np.float64) * 2.0, seg_size)
    flat = cdf + offset
    idx = np.searchsorted(flat, values * 1.0 + seg * 2.0, side="right") - seg_start[seg]
    return np.minimum(idx, seg_size[seg] - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# As a data set and as a log. Raw IDs are 64-bit integers (an offset, so that dense indices and raw
# IDs differ, as in real logs); features are what a shop's catalog would have: a category that
# mostly agrees with the planted topic, a price; users have a region and an age that carry nothing.

USER_ID_BASE, ITEM_ID_BASE = 10**12, 5 * 10**11
CATEGORY_AGREEMENT = 0.7  # share of items whose category is their planted topic


def synthetic_features(data: SyntheticInteractions, seed: int = 0) -> tuple[dict, dict]:
    """(user columns, item columns) as canonical features over the generator's indices."""
    from common.data.dataset import Feature

    rng = np.random.default_rng([seed, 7])
    k = data.num_clusters
    noisy = rng.random(data.num_items) >= CATEGORY_AGREEMENT
    category = np.where(noisy, rng.integers(0, k, data.num_items), data.item_topic)
    price = np.round(np.exp(rng.normal(3.0, 1.0, data.num_items)), 2)
    items = {
        "category": Feature("categorical", category.astype(np.int64), vocab=tuple(f"c{t:04d}" for t in range(k))),
        # Decile buckets for the ID-only towers: what the log's spec ("buckets": 10) makes of it.
        "price": Feature(
            "numeric",
            price,
            center=float(price.mean()),
            scale=float(price.std()),
            boundaries=tuple(float(b) for b in np.unique(np.quantile(price, np.linspace(0, 1, 11)[1:-1]))),
        ),
    }
    users = {
        "region": Feature(
            "categorical",
            rng.integers(0, 20, data.num_users).astype(np.int64),
            vocab=tuple(f"r{r:02d}" for r in range(20)),
        ),
        "age": Feature("numeric", rng.integers(18, 70, data.num_users).astype(np.float64), center=40.0, scale=15.0),
    }
    return users, items


def synthetic_dataset(data: SyntheticInteractions, name: str = "synthetic", seed: int = 0):
    """The generator's output in the canonical form (in memory; :func:`write_synthetic_log` writes
    the same as a log)."""
    from common.data.dataset import build_dataset

    users, items = synthetic_features(data, seed)
    return build_dataset(
        name,
        "synthetic",
        USER_ID_BASE + data.user,
        ITEM_ID_BASE + data.item,
        data.timestamp,
        users=(USER_ID_BASE + np.arange(data.num_users), users),
        items=(ITEM_ID_BASE + np.arange(data.num_items), items),
    )


def write_synthetic_log(data: SyntheticInteractions, folder, name: str = "synthetic", shards: int = 1, seed: int = 0):
    """Write the generator's output as a Parquet log with a spec, the way a team's own log would
    arrive: interactions in global time order split into ``shards`` files, a users table and an
    items table (quantile price buckets). Returns the spec's path; :func:`truth_of` maps a dense
    index of the loaded data set back to the generator's."""
    import json
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    (folder / "interactions").mkdir(parents=True, exist_ok=True)
    order = np.argsort(data.timestamp, kind="stable")
    bounds = np.linspace(0, len(order), shards + 1).astype(np.int64)
    for s in range(shards):
        rows = order[bounds[s] : bounds[s + 1]]
        pq.write_table(
            pa.table(
                {
                    "user_id": pa.array(USER_ID_BASE + data.user[rows]),
                    "item_id": pa.array(ITEM_ID_BASE + data.item[rows]),
                    "ts": pa.array(data.timestamp[rows] * 1000),  # milliseconds, as event logs have them
                }
            ),
            folder / "interactions" / f"part-{s:05d}.parquet",
        )
    users, items = synthetic_features(data, seed)
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(USER_ID_BASE + np.arange(data.num_users)),
                "region": pa.array(users["region"].raw()),
                "age": pa.array(users["age"].values),
            }
        ),
        folder / "users.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(ITEM_ID_BASE + np.arange(data.num_items)),
                "category": pa.array(items["category"].raw()),
                "price": pa.array(items["price"].values),
            }
        ),
        folder / "items.parquet",
    )
    spec = {
        "name": name,
        "interactions": {
            "path": "interactions",
            "user": "user_id",
            "item": "item_id",
            "timestamp": "ts",
            "timestamp_unit": "ms",
        },
        "users": {
            "path": "users.parquet",
            "id": "user_id",
            "features": {"region": {"type": "categorical"}, "age": {"type": "numeric", "center": 40.0, "scale": 15.0}},
        },
        "items": {
            "path": "items.parquet",
            "id": "item_id",
            "features": {"category": {"type": "categorical"}, "price": {"type": "numeric", "buckets": 10}},
        },
    }
    path = folder / "dataset.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def truth_of(ds) -> tuple[np.ndarray, np.ndarray]:
    """(generator user index, generator item index) of each dense user / item of a loaded synthetic log."""
    return (np.asarray(ds.user_raw_ids) - USER_ID_BASE, np.asarray(ds.item_raw_ids) - ITEM_ID_BASE)
