"""Table cells of the HTML reports: every float formats, however large (an RMSE of a
series with a 1e200 value overflowed ``int()``: a traceback instead of a report)."""

from __future__ import annotations

import math

import pytest

from derms.reports.html_format import fmt_float


@pytest.mark.parametrize(("value", "text"), [
    (math.nan, ""), (math.inf, "inf"), (-math.inf, "-inf"), (1e200, "1e+200"),
    (-3e300, "-3e+300"), (1234.0, "1,234"), (1234.56, "1,234.6"), (12.345, "12.35"),
    (0.5, "0.5"), (0.0, "0"), (2e-6, "2e-06"),
])
def test_every_float_formats(value, text):
    assert fmt_float(value) == text
