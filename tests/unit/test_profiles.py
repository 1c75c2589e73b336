from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from derms.cli.main import parse_step
from derms.errors import InputError
from derms.powerflow.profiles import Profiles

START = datetime(2026, 1, 1, tzinfo=UTC)


def test_from_arrays_and_times():
    p = Profiles.from_arrays({"Load.A": np.ones(4), "load.b": np.arange(4.0)}, start=START,
                             step=timedelta(minutes=15))
    assert p.elements == ("load.a", "load.b")
    assert p.n_steps == 4 and p.dt_h == 0.25
    assert p.times[-1] == pd.Timestamp("2026-01-01 00:45", tz="UTC")


def test_wrong_length_names_the_element():
    with pytest.raises(InputError, match=r"load\.b has 3 values, expected 4"):
        Profiles.from_arrays({"load.a": np.ones(4), "load.b": np.ones(3)}, start=START,
                             step=timedelta(hours=1))


def test_non_finite_value_named():
    with pytest.raises(InputError, match=r"load\.a has a non-finite value at step 2"):
        Profiles.from_arrays({"load.a": np.array([1, 1, np.nan])}, start=START,
                             step=timedelta(hours=1))


@pytest.mark.parametrize("name", ["line.x", "nodot", "vsource.source"])
def test_unsupported_element_class(name):
    with pytest.raises(InputError, match="expected 'class.name'"):
        Profiles.from_arrays({name: np.ones(2)}, start=START, step=timedelta(hours=1))


def test_naive_start_and_bad_step():
    with pytest.raises(InputError, match="timezone-aware"):
        Profiles.from_arrays({"load.a": np.ones(2)}, start=datetime(2026, 1, 1),
                             step=timedelta(hours=1))
    with pytest.raises(InputError, match="step"):
        Profiles.from_arrays({"load.a": np.ones(2)}, start=START, step=timedelta(0))


def test_from_frame_regular_index():
    idx = pd.date_range("2026-01-01", periods=3, freq="1h", tz="UTC")
    p = Profiles.from_frame(pd.DataFrame({"load.a": [1.0, 2, 3]}, index=idx))
    assert p.step == timedelta(hours=1)
    with pytest.raises(InputError, match="not regular"):
        Profiles.from_frame(pd.DataFrame({"load.a": [1.0, 2, 3]}, index=idx[[0, 1]].append(
            pd.DatetimeIndex([idx[2] + pd.Timedelta(minutes=5)]))))
    with pytest.raises(InputError, match="timezone-aware"):
        Profiles.from_frame(pd.DataFrame({"load.a": [1.0]}, index=[pd.Timestamp("2026-01-01")]))


@pytest.mark.parametrize("text,minutes", [("15min", 15), ("1h", 60), ("300s", 5), ("5", 5)])
def test_parse_step(text, minutes):
    assert parse_step(text) == timedelta(minutes=minutes)


@pytest.mark.parametrize("text", ["", "abc", "15 parsecs", "-5min"])
def test_parse_step_rejects(text):
    with pytest.raises(InputError, match="--step"):
        parse_step(text)
