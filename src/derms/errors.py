"""One exception hierarchy for derms; edges translate it (CLI exit 2, HTTP problem+json)."""

from __future__ import annotations


class DermsError(Exception):
    """Base of every error derms raises on purpose."""


class InputError(DermsError):
    """Bad input from a user: a missing file, a malformed value, a profile of the wrong length.

    ``field``: the input at fault where one is known (the API names it in its problem's
    ``errors``); set with :func:`input_error`."""

    field: str | None = None


def input_error(message: str, field: str | None) -> InputError:
    """An :class:`InputError` naming the input ``field`` at fault."""
    exc = InputError(message)
    exc.field = field
    return exc


class ModelError(DermsError):
    """A network model that cannot be built or used (compile error, unknown element or bus)."""


class ConvergenceError(DermsError):
    """A power flow that did not converge."""


class InfeasibleError(DermsError):
    """An optimisation with no feasible solution."""


class StoreUnavailable(DermsError):
    """The store (or a lookup in it) failed for a reason that is not the input's: the
    caller keeps what it has and retries (HTTP 503); nothing is refused or acknowledged."""
