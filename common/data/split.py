"""The project's one split: temporal leave-last-out per user, with a fixed hash for ties.

Every rating is an interaction (implicit feedback). Within a user, interactions are ordered by
``(timestamp, tie_key)``, where ``tie_key`` is the unsigned 64-bit big-endian integer formed by
the first 8 bytes of SHA-256 of the ASCII string ``"<raw user id>:<raw item id>"`` (raw IDs as
they appear in the data set's files, in decimal). The last interaction is test, the one before it
validation, the rest training. A user needs 3 interactions to get a validation target and 2 to
get a test target; with fewer, everything stays in training.

Why a hash: MovieLens timestamps are seconds, and people rate many movies in the same second.
The real order inside a second is unknown (in the files' own line order, same-second pairs run
from the lower to the higher item ID only 50.2% of the time). Breaking ties by item ID, the old
rule, made the test target of every user whose last two ratings share a second (415 of 943 on
ml-100k) the higher ID, and every same-second training transition run from lower to higher ID:
an order-aware model could learn "next = a higher ID among the items rated together", and the
split rewarded it. It also biased targets towards high IDs, which on MovieLens are obscure titles.
The hash orders ties in a way unrelated to the items, fixed and reproducible by anyone's scorer.

Evaluation on ``valid`` sees the training items as the user's history; on ``test`` it sees
training plus the validation item. That history is also what gets excluded from the ranking.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

STAGES = ("valid", "test")


def tie_keys(raw_user: np.ndarray, raw_item: np.ndarray) -> np.ndarray:
    """uint64 tie key of each (raw user ID, raw item ID) pair, as defined in the module docstring."""
    sha = hashlib.sha256
    digests = b"".join(
        sha(f"{u}:{i}".encode("ascii")).digest()[:8]
        for u, i in zip(np.asarray(raw_user).tolist(), np.asarray(raw_item).tolist())
    )
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def time_order(
    timestamp: np.ndarray, raw_user: np.ndarray, raw_item: np.ndarray, group: np.ndarray | None = None
) -> np.ndarray:
    """The permutation that sorts interactions by ``(group, timestamp, tie_key)``; ``group`` is the
    dense user index for per-user order, ``None`` for one global order. Only rows that share
    ``(group, timestamp)`` with another are hashed: elsewhere the key cannot change the order."""
    timestamp = np.asarray(timestamp, dtype=np.int64)
    group = np.zeros(len(timestamp), np.int64) if group is None else np.asarray(group, dtype=np.int64)
    order = np.lexsort((timestamp, group))
    g, t = group[order], timestamp[order]
    same = (g[1:] == g[:-1]) & (t[1:] == t[:-1])
    tied = np.zeros(len(order), dtype=bool)
    tied[1:] |= same
    tied[:-1] |= same
    rows = order[tied]
    key = np.zeros(len(order), dtype=np.uint64)
    key[rows] = tie_keys(np.asarray(raw_user)[rows], np.asarray(raw_item)[rows])
    return np.lexsort((key, timestamp, group))


@dataclass
class Split:
    num_users: int
    num_items: int
    train_user: np.ndarray  # int64, sorted by (user, time, tie key)
    train_item: np.ndarray
    train_time: np.ndarray
    valid_user: np.ndarray  # int64 [n_valid], one target per user
    valid_item: np.ndarray
    valid_time: np.ndarray
    test_user: np.ndarray  # int64 [n_test]
    test_item: np.ndarray
    test_time: np.ndarray
    eval_users: np.ndarray | None = None  # sorted; when set, only these users' targets are evaluated

    def targets(self, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """(users, target items) of ``stage`` ("valid" or "test"), of the evaluation sample if any."""
        _check_stage(stage)
        users, items = (self.valid_user, self.valid_item) if stage == "valid" else (self.test_user, self.test_item)
        if self.eval_users is not None:
            keep = np.isin(users, self.eval_users)
            users, items = users[keep], items[keep]
        return users, items

    def sample_eval_users(self, n: int, seed: int = 0) -> Split:
        """The same split, evaluated on a fixed sample of ``n`` users with a test target (drawn with
        ``seed`` and sorted; the same users for validation where they have a target). Training and
        histories are unchanged, and each sampled user is still ranked against the whole catalog.
        ``n <= 0`` or ``n`` at least the number of such users: everyone."""
        if n <= 0 or n >= len(self.test_user):
            return self
        chosen = np.sort(np.random.default_rng(seed).choice(self.test_user, size=n, replace=False))
        return dataclasses.replace(self, eval_users=chosen)

    def history(self, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """The interactions a model may see when predicting ``stage``'s targets, as CSR
        ``(indptr [num_users + 1], items)`` in split order: training, plus validation for test."""
        _check_stage(stage)
        user, item = self.train_user, self.train_item
        if stage == "test":
            # The validation item comes after every training item of its user in split order.
            user = np.concatenate([user, self.valid_user])
            item = np.concatenate([item, self.valid_item])
            order = np.argsort(user, kind="stable")
            user, item = user[order], item[order]
        indptr = np.zeros(self.num_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(user, minlength=self.num_users), out=indptr[1:])
        return indptr, item

    def item_counts(self, stage: str) -> np.ndarray:
        """Interactions per item visible before ``stage`` (for popularity and logQ correction)."""
        indptr, items = self.history(stage)
        return np.bincount(items, minlength=self.num_items)


def leave_last_out(
    user: np.ndarray,
    item: np.ndarray,
    timestamp: np.ndarray,
    num_users: int | None = None,
    num_items: int | None = None,
    *,
    user_raw_ids: np.ndarray | None = None,
    item_raw_ids: np.ndarray | None = None,
) -> Split:
    """Split interactions (dense indices) into train / valid / test as described above.

    ``user_raw_ids`` / ``item_raw_ids`` map dense indices to the raw IDs the tie key hashes;
    ``None`` means the dense index is the raw ID (synthetic data). For a data set use
    :func:`split_dataset`, which passes its ID maps.
    """
    user = np.asarray(user, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    timestamp = np.asarray(timestamp, dtype=np.int64)
    if not (len(user) == len(item) == len(timestamp)):
        raise ValueError(f"user, item, timestamp lengths differ: {len(user)}, {len(item)}, {len(timestamp)}")
    num_users = int(user.max()) + 1 if num_users is None else num_users
    num_items = int(item.max()) + 1 if num_items is None else num_items
    raw_user = user if user_raw_ids is None else np.asarray(user_raw_ids)[user]
    raw_item = item if item_raw_ids is None else np.asarray(item_raw_ids)[item]
    order = time_order(timestamp, raw_user, raw_item, group=user)
    user, item, timestamp = user[order], item[order], timestamp[order]
    count = np.bincount(user, minlength=num_users)
    end = np.cumsum(count)  # one past each user's last interaction
    has_test = count >= 2
    has_valid = count >= 3
    test_idx = end[has_test] - 1
    valid_idx = end[has_valid] - 2
    is_train = np.ones(len(user), dtype=bool)
    is_train[test_idx] = False
    is_train[valid_idx] = False
    return Split(
        num_users=num_users,
        num_items=num_items,
        train_user=user[is_train],
        train_item=item[is_train],
        train_time=timestamp[is_train],
        valid_user=user[valid_idx],
        valid_item=item[valid_idx],
        valid_time=timestamp[valid_idx],
        test_user=user[test_idx],
        test_item=item[test_idx],
        test_time=timestamp[test_idx],
    )


class Interactions(Protocol):
    """What :func:`split_dataset` reads: MovieLens, the synthetic generator's output."""

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    user_raw_ids: np.ndarray
    item_raw_ids: np.ndarray

    @property
    def num_users(self) -> int: ...

    @property
    def num_items(self) -> int: ...


def split_dataset(ds: Interactions, eval_users: int = 0) -> Split:
    """The shared split of a data set, its raw IDs feeding the tie key; ``eval_users`` > 0
    evaluates a fixed sample of that many users (:meth:`Split.sample_eval_users`)."""
    return leave_last_out(
        ds.user,
        ds.item,
        ds.timestamp,
        ds.num_users,
        ds.num_items,
        user_raw_ids=ds.user_raw_ids,
        item_raw_ids=ds.item_raw_ids,
    ).sample_eval_users(eval_users)


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
