import numpy as np
import pandas as pd
import pytest

from derms.analysis.constraints import Limits, detect_violations
from derms.errors import InputError

T = pd.date_range("2026-01-01", periods=5, freq="15min", tz="UTC")
NODES = np.array(["a", "b", "c"], dtype=object)
V = np.array([[1.0, 0.94, 1.06], [1.0, 0.93, 1.0], [1.0, 1.0, 1.07],
              [0.94, 0.94, 1.0], [0.94, 1.0, 1.0]])
LOAD = np.array([[50, 120.0], [50, 130], [50, 90], [100.5, 80], [103, 80]])
BR = np.array(["l1", "l2"], dtype=object)


def _detect(**kw):
    args = dict(v_pu=V, node_names=NODES, node_phases=np.array([1, 2, 3]), loading_pct=LOAD,
                branch_names=BR, branch_phases=np.array([1, 1]))
    args.update(kw)
    return detect_violations(T, 0.25, **args)


def test_absolute_counts_and_events():
    rep = _detect(head_p_kw=np.array([1, -5, 3, -1, 0.0]), limits=Limits(reverse_power_kw=0))
    c = rep.counts
    assert c["violations_undervoltage"] == 5  # a x2, b x3
    assert c["violations_overvoltage"] == 2
    # 100.5 % is within the 1 % tolerance; 103, 120, 130 are not
    assert c["violations_thermal"] == 3
    assert c["violations_reverse_power"] == 2
    ev = rep.events
    b = ev[(ev.kind == "undervoltage") & (ev.element == "b")].sort_values("start")
    assert list(b.n_steps) == [2, 1]
    assert b.iloc[0].worst == pytest.approx(0.93)
    assert b.iloc[0].duration_h == pytest.approx(0.5)
    assert b.iloc[0].end == T[2]
    l2 = ev[(ev.kind == "thermal") & (ev.element == "l2")].iloc[0]
    assert l2.worst == 130 and l2.n_steps == 2


def test_pre_existing_held_to_base_value():
    base = V.copy()
    base[:, 1] = 0.935  # node b already under the limit in the base case
    rep = _detect(base_v_pu=base)
    c = rep.counts
    # b at 0.93 is worse than its base 0.935 by more than the tolerance: one violation
    assert c["violations_undervoltage"] == 1
    assert c["pre_existing_voltage"] == 7
    ev = rep.events
    assert ev.pre_existing.all() or (ev[ev.kind != "thermal"].pre_existing.all())
    worse = ev[(ev.element == "b") & ev.worsened.astype(bool)]
    assert len(worse) == 1 and worse.iloc[0].limit == pytest.approx(0.935)


def test_dead_and_neutral_nodes_are_ignored():
    v = V.copy()
    v[:, 0] = 0.0  # de-energised
    rep = detect_violations(T, 0.25, v_pu=v, node_names=NODES, node_phases=np.array([1, 4, 3]),
                            loading_pct=LOAD, branch_names=BR, branch_phases=np.array([1, 1]))
    assert set(rep.events[rep.events.kind != "thermal"].element) == {"c"}


def test_range_b_is_wider():
    rep = _detect(limits=Limits.ansi_range_b())
    assert rep.counts["violations_undervoltage"] == 0  # 0.93 is inside 0.9167
    assert rep.counts["violations_overvoltage"] == 2


def test_bad_shapes_and_limits():
    with pytest.raises(InputError, match="v_pu has shape"):
        _detect(v_pu=V[:, :2])
    with pytest.raises(InputError, match="voltage limits"):
        Limits(v_min_pu=1.1, v_max_pu=1.0)
    with pytest.raises(InputError, match="base case"):
        _detect(base_v_pu=V[:3])
