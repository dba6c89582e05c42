"""The project's one split: temporal leave-last-out per user.

Every rating is an interaction (implicit feedback). Per user, interactions are ordered by
timestamp with ties broken by item index (stable); the last one is the test target, the one
before it the validation target, the rest are training. A user needs 3 interactions to get a
validation target and 2 to get a test target; with fewer, everything stays in training.

Evaluation on ``valid`` sees the training items as the user's history; on ``test`` it sees
training plus the validation item. That history is also what gets excluded from the ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STAGES = ("valid", "test")


@dataclass
class Split:
    num_users: int
    num_items: int
    train_user: np.ndarray   # int64, sorted by (user, time, item)
    train_item: np.ndarray
    train_time: np.ndarray
    valid_user: np.ndarray   # int64 [n_valid], one target per user
    valid_item: np.ndarray
    valid_time: np.ndarray
    test_user: np.ndarray    # int64 [n_test]
    test_item: np.ndarray
    test_time: np.ndarray

    def targets(self, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """(users, target items) of ``stage`` ("valid" or "test")."""
        _check_stage(stage)
        return (self.valid_user, self.valid_item) if stage == "valid" else (self.test_user, self.test_item)

    def history(self, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """The interactions a model may see when predicting ``stage``'s targets, as CSR
        ``(indptr [num_users + 1], items)`` in time order: training, plus validation for test."""
        _check_stage(stage)
        user, item, time = self.train_user, self.train_item, self.train_time
        if stage == "test":
            user = np.concatenate([user, self.valid_user])
            item = np.concatenate([item, self.valid_item])
            time = np.concatenate([time, self.valid_time])
            order = np.lexsort((np.arange(len(user)), time, user))  # stable: valid follows train on ties
            user, item = user[order], item[order]
        indptr = np.zeros(self.num_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(user, minlength=self.num_users), out=indptr[1:])
        return indptr, item

    def item_counts(self, stage: str) -> np.ndarray:
        """Interactions per item visible before ``stage`` (for popularity and logQ correction)."""
        indptr, items = self.history(stage)
        return np.bincount(items, minlength=self.num_items)


def leave_last_out(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray,
                   num_users: int | None = None, num_items: int | None = None) -> Split:
    """Split interactions (dense indices) into train / valid / test as described above."""
    user = np.asarray(user, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    timestamp = np.asarray(timestamp, dtype=np.int64)
    if not (len(user) == len(item) == len(timestamp)):
        raise ValueError(f"user, item, timestamp lengths differ: {len(user)}, {len(item)}, {len(timestamp)}")
    num_users = int(user.max()) + 1 if num_users is None else num_users
    num_items = int(item.max()) + 1 if num_items is None else num_items
    order = np.lexsort((item, timestamp, user))
    user, item, timestamp = user[order], item[order], timestamp[order]
    count = np.bincount(user, minlength=num_users)
    end = np.cumsum(count)                      # one past each user's last interaction
    has_test = count >= 2
    has_valid = count >= 3
    test_idx = end[has_test] - 1
    valid_idx = end[has_valid] - 2
    is_train = np.ones(len(user), dtype=bool)
    is_train[test_idx] = False
    is_train[valid_idx] = False
    return Split(
        num_users=num_users, num_items=num_items,
        train_user=user[is_train], train_item=item[is_train], train_time=timestamp[is_train],
        valid_user=user[valid_idx], valid_item=item[valid_idx], valid_time=timestamp[valid_idx],
        test_user=user[test_idx], test_item=item[test_idx], test_time=timestamp[test_idx],
    )


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
