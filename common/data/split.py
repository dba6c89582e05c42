"""The project's one split: temporal leave-last-out per user, with a fixed hash for ties.

Every rating is an interaction (implicit feedback). Within a user, interactions are ordered by
``(timestamp, tie_key)``, where ``tie_key`` is the unsigned 64-bit big-endian integer formed by
the first 8 bytes of SHA-256 of the ASCII string ``"<raw user id>:<raw item id>"`` (raw IDs as
they appear in the data set's files, in decimal). The last interaction is test, the one before it
validation, the rest training. A user needs 3 interactions to get a validation target and 2 to
get a test target; with fewer, everything stays in training.

Why a hash: MovieLens timestamps are seconds, and people rate many movies in the same second, in an
unknown order. Breaking ties by item ID, the old rule, made such a user's test target the higher ID
and every same-second training transition run from lower to higher ID, which an order-aware model
could learn and the split rewarded (README.md, "The evaluation protocol", has the figures). The hash
orders ties in a way unrelated to the items, fixed and reproducible by anyone's scorer.

The order itself is the canonical form's (:func:`common.data.dataset.time_order`): every data set is
stored in it, and the split reads it as it is.

Evaluation on ``valid`` sees the training items as the user's history; on ``test`` it sees
training plus the validation item. On a data set where each item is consumed once (MovieLens's
ratings) that history is also what gets excluded from the ranking. On a data set that declares
``repeats`` (a purchase log: people buy the same things again) a repeat is a valid target: the
history is still every model's input, but nothing is excluded, so earlier items may be in any list
and hit; the tie rule and the targets are the same. Reports then also give the metrics on repeat
targets (the target is in the user's history for the stage) and on new-item targets, apart
(:func:`common.metrics.report_from_ranks`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from common.data.dataset import InteractionData, time_order

STAGES = ("valid", "test")


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
    repeats: bool = False  # a repeat is a valid target: histories are inputs, never excluded

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
        chosen = _choose(self.test_user, n, seed)
        return self if chosen is None else dataclasses.replace(self, eval_users=chosen)

    def history(self, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """The interactions a model may see when predicting ``stage``'s targets, as CSR
        ``(indptr [num_users + 1], items)`` in split order: training, plus validation for test."""
        indptr, item, _ = self.timed_history(stage)
        return indptr, item

    def timed_history(self, stage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`history` with each interaction's timestamp: ``(indptr, items, times)``."""
        _check_stage(stage)
        user, item, time = self.train_user, self.train_item, self.train_time
        if stage == "test":
            # The validation item comes after every training item of its user in split order.
            user = np.concatenate([user, self.valid_user])
            order = np.argsort(user, kind="stable")
            user = user[order]
            item = np.concatenate([item, self.valid_item])[order]
            time = np.concatenate([time, self.valid_time])[order]
        indptr = np.zeros(self.num_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(user, minlength=self.num_users), out=indptr[1:])
        return indptr, item, time

    def excluded(self, stage: str, users: np.ndarray) -> list[np.ndarray] | None:
        """The items to leave out of each of ``users``' lists for ``stage``: their history, or
        ``None`` (nothing) on a data set with repeats. What the protocol hands
        :func:`common.metrics.top_unseen`."""
        if self.repeats:
            return None
        indptr, hist = self.history(stage)
        return [hist[indptr[u] : indptr[u + 1]] for u in np.asarray(users).tolist()]

    def is_repeat(self, stage: str, users: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Whether each ``targets[j]`` is in ``users[j]``'s history for ``stage``."""
        indptr, hist = self.history(stage)
        owner = np.repeat(np.arange(self.num_users, dtype=np.int64), np.diff(indptr))
        had = np.unique(owner * self.num_items + hist)
        return np.isin(np.asarray(users, np.int64) * self.num_items + np.asarray(targets, np.int64), had)

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
    repeats: bool = False,
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
    return _split_ordered(user[order], item[order], timestamp[order], num_users, num_items, repeats)


def _split_ordered(
    user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, num_users: int, num_items: int, repeats: bool = False
) -> Split:
    """The split of interactions already in split order (grouped by user, ascending; by time and
    tie key within a user). Any subset of whole users: absent users simply have no rows."""
    count = np.bincount(user, minlength=num_users)
    end = np.cumsum(count)  # one past each user's last interaction
    has_test, has_valid = held_out(count)
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
        repeats=repeats,
    )


def held_out(count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which users have a test and a validation target, from their interaction counts: the last
    interaction is the test target when a user has 2 or more, the one before it the validation
    target when 3 or more; the rest is training."""
    return count >= 2, count >= 3


def split_dataset(ds: InteractionData, eval_users: int = 0) -> Split:
    """The shared split of a data set; ``eval_users`` > 0 evaluates a fixed sample of that many
    users (:meth:`Split.sample_eval_users`). The data set is already in split order
    (``build_dataset`` sorts it by the tie rule), so this reads it without sorting again."""
    return split_users(ds).sample_eval_users(eval_users)


def split_users(ds: InteractionData, users: np.ndarray | tuple[int, int] | None = None) -> Split:
    """The split of ``users`` only (sorted dense indices, a ``(lo, hi)`` range, or ``None`` for
    everyone), read from the data set's split order through its per-user row offsets: only those
    users' rows are touched (a range is one contiguous slice of a memory-mapped cache). Each user's
    targets and history are exactly those of :func:`split_dataset`."""
    indptr = ds.indptr
    if users is None:
        users = (0, ds.num_users)
    if isinstance(users, tuple):
        lo, hi = users
        rows: slice | np.ndarray = slice(int(indptr[lo]), int(indptr[hi]))
    else:
        users = np.asarray(users, dtype=np.int64)
        if len(users) > 1 and not (np.diff(users) > 0).all():
            raise ValueError("users must be sorted and distinct")
        start, count = indptr[users], indptr[users + 1] - indptr[users]
        rows = np.repeat(start - np.r_[0, np.cumsum(count)[:-1]], count) + np.arange(count.sum())
    user = np.asarray(ds.user[rows], dtype=np.int64)
    timestamp = np.asarray(ds.timestamp[rows], dtype=np.int64)
    same_user = user[1:] == user[:-1]
    if (user[1:] < user[:-1]).any() or (timestamp[1:][same_user] < timestamp[:-1][same_user]).any():
        raise ValueError(
            f"{ds.name}: interactions are not in split order (by user, then time); build the data set "
            f"with common.data.dataset.build_dataset, which sorts them"
        )
    item = np.asarray(ds.item[rows], dtype=np.int64)
    return _split_ordered(user, item, timestamp, ds.num_users, ds.num_items, ds.repeats)


def eval_user_sample(indptr: np.ndarray, n: int, seed: int = 0) -> np.ndarray | None:
    """The users :meth:`Split.sample_eval_users` picks, from per-user row offsets alone (users with
    a test target are those with 2 interactions or more); ``None``: evaluate everyone."""
    return _choose(np.flatnonzero(held_out(np.diff(indptr))[0]), n, seed)


def _choose(test_users: np.ndarray, n: int, seed: int) -> np.ndarray | None:
    if n <= 0 or n >= len(test_users):
        return None
    return np.sort(np.random.default_rng(seed).choice(test_users, size=n, replace=False))


def user_share(indptr: np.ndarray, rank: int, world_size: int, holdout_last: int = 0) -> tuple[int, int]:
    """The users ``[lo, hi)`` that are ``rank``'s share of ``world_size``: contiguous in split order
    and balanced by training examples (each user's training interactions less its last
    ``holdout_last``), so that the ranks' step counts, cut to the smallest, lose at most about one
    user's rows. Each boundary is the first user starting at or after ``rank / world_size`` of them."""
    count = np.diff(indptr)
    has_test, has_valid = held_out(count)
    train = np.maximum(count - has_test - has_valid - holdout_last, 0)
    starts = np.zeros(len(indptr), dtype=np.int64)
    np.cumsum(train, out=starts[1:])
    n, num_users = int(starts[-1]), len(indptr) - 1

    def bound(r: int) -> int:
        return num_users if r == world_size else int(np.searchsorted(starts, r * n // world_size, side="left"))

    return bound(rank), bound(rank + 1)


def rank_splits(
    ds: InteractionData, rank: int, world_size: int, eval_users: int = 0, holdout_last: int = 0
) -> tuple[Split, Split]:
    """What a rank of a distributed run reads: (its share of the users, as a split, to train on;
    the evaluated users, as a split, to evaluate on). The share is :func:`user_share`'s range; the
    evaluated users are ``eval_users``' fixed sample (everyone when 0: then every rank also reads
    every user's rows, to evaluate them) and the same on every rank, with their targets and
    histories as in :func:`split_dataset`. In one process both are the whole split (one copy), so a
    single-process run reads what it read before."""
    sample = eval_user_sample(ds.indptr, eval_users)
    if world_size == 1:
        train = split_users(ds)
        return train, dataclasses.replace(train, eval_users=sample)
    train = split_users(ds, user_share(ds.indptr, rank, world_size, holdout_last))
    return train, dataclasses.replace(split_users(ds, sample), eval_users=sample)


def history_before_test(ds: InteractionData) -> tuple[np.ndarray, np.ndarray]:
    """Every user's interactions before their test target, as CSR ``(indptr, items)`` in split
    order: :meth:`Split.history` ("test") of the whole split, without building the split."""
    indptr = ds.indptr
    count = np.diff(indptr)
    has_test = held_out(count)[0]
    keep = np.ones(int(indptr[-1]), dtype=bool)
    keep[indptr[1:][has_test] - 1] = False  # each test target: the user's last row
    out = np.zeros_like(indptr)
    np.cumsum(count - has_test, out=out[1:])
    return out, np.asarray(ds.item, dtype=np.int64)[keep]


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
