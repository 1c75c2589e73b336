"""StudyConfig: the horizon is a whole number of steps (it was rounded silently)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from derms.errors import InputError
from derms.studies.qsts_study import StudyConfig


@pytest.mark.parametrize(("days", "step_min", "n_steps"),
                         [(1.0, 15, 96), (1.0, 5, 288), (7 / 24, 60, 7), (1.0, 1, 1440)])
def test_whole_horizons_are_accepted(days: float, step_min: int, n_steps: int) -> None:
    assert StudyConfig(days=days, step=timedelta(minutes=step_min)).n_steps == n_steps


@pytest.mark.parametrize(("days", "step_min"),
                         [(1.0, 7), (1 / 24, 50), (1 / 48, 60), (0.3, 60)])
def test_a_horizon_not_a_whole_number_of_steps_is_refused(days: float,
                                                          step_min: int) -> None:
    """24 h of 7-min steps made 206 intervals (24 h 02 min); 1 h of 50 min made one."""
    with pytest.raises(InputError, match="not a whole number of"):
        StudyConfig(days=days, step=timedelta(minutes=step_min))
