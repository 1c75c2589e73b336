"""One exception hierarchy for derms; edges translate it (CLI exit 2, HTTP problem+json)."""

from __future__ import annotations


class DermsError(Exception):
    """Base of every error derms raises on purpose."""


class InputError(DermsError):
    """Bad input from a user: a missing file, a malformed value, a profile of the wrong length."""


class ModelError(DermsError):
    """A network model that cannot be built or used (compile error, unknown element or bus)."""


class ConvergenceError(DermsError):
    """A power flow that did not converge."""


class InfeasibleError(DermsError):
    """An optimisation with no feasible solution."""
