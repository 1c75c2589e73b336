"""The dispatch report names what the AC check leaves in the optimised plan."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from derms.analysis.constraints import VIOLATION_COLUMNS
from derms.reports.dispatch_html import _violations

COUNTS = {"violations_voltage": 0, "violations_undervoltage": 0,
          "violations_overvoltage": 0, "violations_thermal": 0,
          "pre_existing_voltage": 0, "pre_existing_thermal": 0}


def _case(events: pd.DataFrame, thermal: int = 0) -> SimpleNamespace:
    return SimpleNamespace(head_kw=np.array([1.0, 2.0]),
                           violations=SimpleNamespace(events=events, counts={
                               **COUNTS, "violations_thermal": thermal}))


def test_residual_violations_are_listed_with_their_values() -> None:
    """EPRI ckt5 seed 0 left a transformer at 101.0018 % (over 100 % + 1 %): the report
    said '2' and nothing else; it now lists the event, its value in full precision."""
    t0 = pd.Timestamp("2026-07-01T23:00Z")
    row = dict(zip(VIOLATION_COLUMNS, ["thermal", "transformer.x", 3, t0,
                                       t0 + pd.Timedelta("15min"), 0.25, 1, 101.0018046,
                                       100.0, False, False]))
    pre = {**row, "element": "line.old", "pre_existing": True}
    empty = pd.DataFrame(columns=VIOLATION_COLUMNS)
    st = SimpleNamespace(uncontrolled=_case(empty), rule_based=_case(empty),
                         optimised=_case(pd.DataFrame([row, pre]), thermal=1))
    html = _violations(st)
    assert "Left in the optimised plan" in html
    assert "transformer.x" in html and "101.0018" in html
    assert "line.old" not in html  # pre-existing and not worse: not left by the plan
    assert "Left in the optimised plan" not in _violations(SimpleNamespace(
        uncontrolled=_case(empty), rule_based=_case(empty), optimised=_case(empty)))
