"""--checkpoint-every: steps, wall time or epoch ends only."""

from __future__ import annotations

import argparse
import time

import pytest

from common.checkpoint import CheckpointSchedule, checkpoint_interval


def test_a_step_interval_saves_on_multiples() -> None:
    schedule = CheckpointSchedule("40")
    assert [s for s in range(1, 130) if schedule.due(s)] == [40, 80, 120]


def test_zero_saves_only_at_epoch_ends() -> None:
    schedule = CheckpointSchedule("0")
    assert not any(schedule.due(s) for s in range(1, 1000))


def test_a_time_interval_saves_once_the_interval_has_passed_and_restarts_the_clock() -> None:
    schedule = CheckpointSchedule("0.2s")
    assert not schedule.due(1)
    time.sleep(0.25)
    assert schedule.due(2)
    assert schedule.due(3)  # still due until a save restarts the clock
    schedule.saved()
    assert not schedule.due(4)
    assert CheckpointSchedule("5min").seconds == 300 and CheckpointSchedule("1h").seconds == 3600


@pytest.mark.parametrize("bad", ["ten", "5m", "-3", "1.5", "", "5 min 3"])
def test_a_bad_interval_says_what_is_accepted(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"number of steps \(200\), a time \(30s, 5min, 1h\)"):
        checkpoint_interval(bad)


@pytest.mark.multiprocess
def test_under_two_ranks_rank_0s_clock_decides_for_both() -> None:
    from tests.dist_workers import checkpoint_schedule_answers, launch

    answers = launch(checkpoint_schedule_answers, 2)
    assert answers == {0: [False, False, False, True], 1: [False, False, False, True]}
