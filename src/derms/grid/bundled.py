"""Feeders bundled with the package (IEEE 13, 123 and 8500 node; BSD-3, see their License.txt)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from derms.errors import InputError

BUNDLED_FEEDERS: dict[str, str] = {
    "ieee13": "ieee13/IEEE13Nodeckt.dss",
    "ieee123": "ieee123/derms_ieee123.dss",
    "ieee8500": "ieee8500/Master.dss",
}


def data_dir() -> Path:
    """Folder of the package's bundled data (feeders, load shapes)."""
    return Path(str(resources.files("derms") / "data"))


def resolve_master(spec: str | Path) -> Path:
    """A master file path, or the name of a bundled feeder ("ieee123")."""
    key = str(spec).strip().lower()
    if key in BUNDLED_FEEDERS:
        return data_dir() / "feeders" / BUNDLED_FEEDERS[key]
    try:
        path = Path(spec).expanduser()
        exists = path.exists()
    except (OSError, RuntimeError) as exc:  # name too long, unknown ~user, no permission
        raise InputError(f"feeder file {str(spec)[:200]!r}: not usable ({exc})") from None
    if not exists:
        names = ", ".join(BUNDLED_FEEDERS)
        raise InputError(f"feeder file not found: {path} (bundled feeders: {names})")
    return path
