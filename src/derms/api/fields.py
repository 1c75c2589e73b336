"""Field types of the API's request bodies, bounded as the database columns are.

A string the database cannot hold (longer than its column, a NUL character that
PostgreSQL's text refuses) or a non-finite number used to pass validation: SQLite stored it
and PostgreSQL answered 500. Ids also have no leading or trailing blanks (ingest strips
series ids, so a device registered as ``" x"`` could never receive a reading).
OpenDSS element names (buses, transformers) are kept as OpenDSS reports them: stripped
and lower case (``ElementName``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, StringConstraints

_NO_NUL = r"^[^\x00]*$"
_ID = r"^[^\x00\s/](?:[^\x00/]*[^\x00\s/])?$"  # "/" could not be addressed in a URL path

Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=_ID)]
Text64 = Annotated[str, StringConstraints(max_length=64, pattern=_NO_NUL)]
Text200 = Annotated[str, StringConstraints(max_length=200, pattern=_NO_NUL)]
Text500 = Annotated[str, StringConstraints(max_length=500, pattern=_NO_NUL)]


def _opendss_name(value: str) -> str | None:
    """An OpenDSS element name as OpenDSS reports it: stripped, lower case; blank -> None
    (a blank bus was stored as "" and never checked against the feeder's model)."""
    return value.strip().lower() or None


# a bus ("671", "671.1.2") or service transformer name, at most 64 characters as given
ElementName = Annotated[Text64, AfterValidator(_opendss_name)]
