"""The request bodies' OpenDSS element names: one shared type (``fields.ElementName``).

``DeviceIn`` and ``MeterIn`` each carried their own copy of the same strip-and-lower-case
validator for ``bus`` and ``service_transformer``; a third body (or a change to the rule)
had to copy it again."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from derms.api.fields import ElementName
from derms.api.routes_registry import DeviceIn, MeterIn

NAMES = ("bus", "service_transformer")


def test_element_names_are_stripped_and_lower_case():
    names = TypeAdapter(ElementName | None)
    assert names.validate_python(" RG60 ") == "rg60"
    assert names.validate_python("Transformer.XFM1") == "transformer.xfm1"
    assert names.validate_python(None) is None
    with pytest.raises(ValidationError):
        names.validate_python("x" * 65)  # the column holds 64
    with pytest.raises(ValidationError):
        names.validate_python("67\x001")  # PostgreSQL's text refuses NUL


@pytest.mark.parametrize("model", [DeviceIn, MeterIn])
def test_devices_and_meters_use_the_shared_type(model):
    assert not model.__pydantic_decorators__.field_validators, "a validator of its own"
    for name in NAMES:
        assert model.model_fields[name].annotation == ElementName | None, name


def test_devices_and_meters_read_names_alike():
    dev = DeviceIn(der_id="d", site_id="s", der_type="pv", s_max_kva=5.0,
                   p_gen_max_kw=5.0, bus=" 671.1.2 ", service_transformer="XFM1")
    met = MeterIn(meter_id="m", bus=" 671.1.2 ", service_transformer="XFM1")
    assert [getattr(dev, n) for n in NAMES] == [getattr(met, n) for n in NAMES] == [
        "671.1.2", "xfm1"]
