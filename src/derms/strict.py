"""Request models whose numbers are JSON numbers and whose booleans are JSON booleans.

pydantic's lax mode, the default, turned ``true`` into ``1.0`` (a device registered with
``"s_max_kva": true`` got 1 kVA), ``"0.3"`` into ``0.3`` and ``"yes"`` into ``True``
(an independent sweep). :class:`StrictScalars` refuses them before validation, naming the
field; fields that also take text (``int | Literal["auto"]``) are left to their own types.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, model_validator


def _kinds(annotation: Any) -> set[type]:
    """The scalar types an annotation admits (through Optional, unions, Annotated,
    Literal)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    return {annotation} if isinstance(annotation, type) else set()


class StrictScalars(BaseModel):
    """A model whose number fields refuse booleans and text, and whose boolean fields
    refuse anything but booleans (see the module docstring)."""

    @model_validator(mode="before")
    @classmethod
    def _strict_scalars(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            key = field.alias or name
            if key not in data or data[key] is None:
                continue
            value, kinds = data[key], _kinds(field.annotation)
            if str in kinds:
                continue
            if kinds == {bool} or kinds == {bool, type(None)}:
                if not isinstance(value, bool):
                    raise ValueError(f"{key}: expected true or false, got {value!r}")
            elif kinds & {int, float} and isinstance(value, bool | str):
                raise ValueError(f"{key}: expected a number, got {value!r}")
        return data


__all__ = ["StrictScalars"]
