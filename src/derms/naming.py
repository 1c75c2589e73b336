"""Checks of user-given element names against a model's, with messages that name them."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from derms.errors import InputError, ModelError


def require_known(names: Iterable[object], known: Collection[str], *, kind: str,
                  field: str, hint: str = "") -> list[str]:
    """Normalise ``names`` (stripped, lower case) and check each is in ``known`` and appears
    once; ModelError names the first unknown one, InputError reports duplicates."""
    out = [str(s).strip().lower() for s in names]
    unknown = [s for s in out if s not in known]
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise ModelError(f"unknown {kind} {unknown[0]!r}{more}{hint}")
    if len(set(out)) != len(out):
        raise InputError(f"{field} has duplicates")
    return out
