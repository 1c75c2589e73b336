"""Violation tables of the study report: counts by kind, new and pre-existing, capped."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from derms.reports.html_format import fmt_fixed, fmt_time, fmt_value, is_empty, note

MAX_VIOLATION_ROWS = 500
KIND_ORDER = ["undervoltage", "overvoltage", "thermal", "reverse_power"]
KIND_UNITS = {
    "undervoltage": "pu",
    "overvoltage": "pu",
    "thermal": "% of normal rating",
    "reverse_power": "kW (import +)",
}


def violations_html(violations: pd.DataFrame) -> str:
    """Counts by kind, then new and pre-existing violations as two capped tables."""
    if is_empty(violations):
        return note("No violations")
    frame = _sorted_violations(violations)
    pre = frame["pre_existing"].fillna(False).astype(bool)
    counts = ", ".join(f"{html.escape(str(k))}: {n}"
                       for k, n in frame["kind"].value_counts(sort=False).items())
    parts = [f"<p>{len(frame)} violation(s) — {int((~pre).sum())} new, "
             f"{int(pre.sum())} pre-existing (already in the base case). By kind: {counts}.</p>"]
    for heading, subset in (("New violations", frame[~pre]),
                            ("Pre-existing violations (present in the base case)", frame[pre])):
        parts.append(f"<h3>{heading}</h3>")
        parts.append(_violation_table(subset) if len(subset) else note("None."))
    return "\n".join(parts)


def _sorted_violations(violations: pd.DataFrame) -> pd.DataFrame:
    """Sorted by kind (fixed order, unknown kinds last) then by distance beyond the limit."""
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    worst = pd.to_numeric(violations["worst"], errors="coerce")
    limit = pd.to_numeric(violations["limit"], errors="coerce")
    frame = violations.assign(
        _rank=violations["kind"].map(rank).fillna(len(rank)),
        _severity=(worst - limit).abs().fillna(-np.inf),
    )
    return frame.sort_values(["_rank", "kind", "_severity"], ascending=[True, True, False],
                             kind="stable")


def _violation_table(frame: pd.DataFrame) -> str:
    header = ("<tr><th>kind</th><th>element</th><th>phase</th><th>start (UTC)</th>"
              "<th>end (UTC)</th><th>duration [h]</th><th>worst</th><th>limit</th>"
              "<th>unit</th><th>vs base case</th></tr>")
    rows = [_violation_row(r) for r in frame.head(MAX_VIOLATION_ROWS).itertuples(index=False)]
    more = len(frame) - MAX_VIOLATION_ROWS
    tail = note(f"… and {more} more not shown ({len(frame)} in total).") if more > 0 else ""
    return f"<table><thead>{header}</thead><tbody>{''.join(rows)}</tbody></table>{tail}"


def _violation_row(row) -> str:
    text = [str(row.kind), str(row.element), fmt_value(row.phase),
            fmt_time(row.start), fmt_time(row.end)]
    decimals = 4 if KIND_UNITS.get(str(row.kind)) == "pu" else 1
    numbers = [fmt_fixed(row.duration_h, 2), fmt_fixed(row.worst, decimals),
               fmt_fixed(row.limit, decimals)]
    unit = KIND_UNITS.get(str(row.kind), "")
    cells = [f"<td>{html.escape(t)}</td>" for t in text]
    cells += [f"<td class=\"num\">{html.escape(n)}</td>" for n in numbers]
    cells.append(f"<td>{html.escape(unit)}</td>")
    cells.append(f"<td>{_vs_base(row)}</td>")
    return f"<tr>{''.join(cells)}</tr>"


def _vs_base(row) -> str:
    """'worse' when a pre-existing violation got worse than the base case, else 'held'."""
    if not bool(getattr(row, "pre_existing", False)):
        return ""
    worsened = getattr(row, "worsened", False)
    return "worse" if bool(worsened) and not pd.isna(worsened) else "held"
