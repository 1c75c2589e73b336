"""Request models whose numbers are JSON numbers and whose booleans are JSON booleans.

pydantic's lax mode, the default, turned ``true`` into ``1.0`` (a device registered with
``"s_max_kva": true`` got 1 kVA), ``"0.3"`` into ``0.3`` and ``"yes"`` into ``True``
(an independent sweep). :class:`StrictScalars` refuses, before pydantic validates the
model, every field value that only those coercions would let through (:func:`lax`):
a bool or text where the field takes a number, text or a number where it takes a
boolean, through ``Optional``, unions, ``Annotated`` and lists (``int | Literal["auto"]``
takes 4 or "auto", not ``true`` or "4"). Other mismatches are left to pydantic, which
names the field. A number is no datetime either (it was taken as Unix time). Text with a
lone UTF-16 surrogate or a NUL character (``\u0000``: PostgreSQL's text cannot hold it,
SQLite stored it) is refused in any field, naming the first one.
"""

from __future__ import annotations

import collections.abc
import re
import reprlib
import types
import typing
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, NaiveDatetime, model_validator

_DATETIMES = (datetime, AwareDatetime, NaiveDatetime)
_NUMERIC = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_SURROGATE = re.compile("[\ud800-\udfff]")

_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence)


def fits(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (as parsed from JSON) is of a type ``annotation`` admits, with
    numbers and booleans kept apart (module docstring)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return fits(value, args[0])
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in _SEQUENCES:
        return isinstance(value, list | tuple) and (
            not args or all(fits(v, args[0] if len(args) == 1 or args[-1] is Ellipsis
                                 else args[min(k, len(args) - 1)]) for k, v in enumerate(value)))
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict) and (len(args) < 2 or all(fits(v, args[1])
                                                                 for v in value.values()))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in _DATETIMES:  # ISO 8601 text only: 0 or "0.3" was taken as Unix time
        return isinstance(value, str) and not _NUMERIC.match(value)
    return True  # datetimes, enums, models, Any: pydantic's own validation


def _scalars(annotation: Any) -> tuple[set[type], Any]:
    """The scalar types (bool, int, float, str) an annotation admits, and the element
    annotation of a list it admits (None if it admits none)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _scalars(args[0])
    if origin in (typing.Union, types.UnionType):
        kinds, elem = set(), None
        for a in args:
            k, e = _scalars(a)
            kinds |= k
            elem = elem if e is None else e
        return kinds, elem
    if origin in _SEQUENCES:
        return set(), (args[0] if args else Any)
    if annotation in _DATETIMES:
        return {datetime}, None
    return ({annotation} if annotation in (bool, int, float, str) else set()), None


def lax(value: Any, annotation: Any) -> bool:
    """Whether ``value`` would reach a field of ``annotation`` only through pydantic's lax
    coercion: a bool or text for a number, text or a number for a boolean (inside lists
    too). Other mismatches are pydantic's to refuse, with the field's location."""
    if fits(value, annotation):
        return False
    kinds, elem = _scalars(annotation)
    if isinstance(value, list) and elem is not None:
        return any(lax(v, elem) for v in value)
    if datetime in kinds and not kinds & {int, float, str} and (
            (isinstance(value, int | float) and not isinstance(value, bool))
            or (isinstance(value, str) and _NUMERIC.match(value))):
        return True  # a datetime given as a number of seconds
    if isinstance(value, bool):
        return bool(kinds & {int, float})
    if isinstance(value, str):
        return bool(kinds & {int, float, bool}) and str not in kinds
    if isinstance(value, int | float):
        return bool in kinds and not kinds & {int, float}
    return False


class StrictScalars(BaseModel):
    """A request model whose fields take numbers and booleans only as such (see the
    module docstring). Checked before the model (a field validator may not touch the
    discriminator of a tagged union, such as the ADMS messages' ``type``): every field
    at fault is named in the one error; other mismatches are pydantic's, at the field."""

    @model_validator(mode="before")
    @classmethod
    def _strict_scalars(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if _has_surrogate(data):  # unencodable: echoed back it was a 500 after the write
            raise ValueError("a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)")
        bad = [f"{key}: {reprlib.repr(data[key])} is not {_shown(field.annotation)}"
               for name, field in cls.model_fields.items()
               if (key := field.alias or name) in data and lax(data[key], field.annotation)]
        if bad:
            raise ValueError("; ".join(bad))
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _no_nul(cls, data: Any, handler: Any) -> Any:
        # after the fields' own checks (those naming a field keep their place): text with
        # a NUL that no field refused. PostgreSQL's text cannot hold one (a generic 422
        # naming no field there; SQLite stored it)
        model = handler(data)
        if (isinstance(data, dict) and "\\x00" in repr(data)  # (repr: C speed; rarely true)
                and (where := _nul_at(data)) is not None):
            raise ValueError(f"{where}: text holds a NUL character (\\u0000)")
        return model


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_surrogate(v) for v in value)
    return False


def _nul_at(value: Any, path: str = "") -> str | None:
    """Where (``site_controls[2].connection_point``) the first string holding ``\\x00`` is,
    keys included; None if none does."""
    if isinstance(value, str):
        return (path or "value") if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and "\x00" in key:
                return here
            if (found := _nul_at(item, here)) is not None:
                return found
    elif isinstance(value, list | tuple):
        for k, item in enumerate(value):
            if (found := _nul_at(item, f"{path}[{k}]")) is not None:
                return found
    return None


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text",
          type(None): "null"}


def _shown(annotation: Any) -> str:
    """What an annotation admits, as a reader would say it ("a number or null")."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _shown(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_shown(a) for a in args))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin in _SEQUENCES:
        return f"a list of ({_shown(args[0])})" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "an object"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


__all__ = ["StrictScalars", "fits", "lax"]
