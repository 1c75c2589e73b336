"""Settings of a derms installation: one pydantic-settings object read from ``DERMS_*``.

Nothing is read at import time; call :func:`get_settings` where the application starts
(CLI command, app factory) and pass the object down.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "derms"


class Settings(BaseSettings):
    """derms settings.

    Attributes
    ----------
    data_dir
        Folder for the embedded database and other local data (``DERMS_DATA_DIR``;
        default ``~/.local/share/derms``).
    database_url
        SQLAlchemy URL of the store (``DERMS_DATABASE_URL``). Default: the SQLite file
        ``<data_dir>/derms.db``. PostgreSQL URLs (``postgresql://...``) use psycopg 3.
    max_body_bytes
        Largest API request body; larger ones get 413 (``DERMS_MAX_BODY_BYTES``).
    mqtt_host, mqtt_port
        Broker of the MQTT telemetry subscriber (``DERMS_MQTT_HOST``, ``DERMS_MQTT_PORT``).
    """

    model_config = SettingsConfigDict(env_prefix="DERMS_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str = ""
    max_body_bytes: int = 32 * 1024 * 1024  # largest request body the API accepts
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_client_id: str = "derms-ingest"  # fixed: the broker keeps its session across restarts
    mqtt_topic_root: str = "derms/v1"  # telemetry on <root>/telemetry/<source>

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'derms.db').resolve()}"
        return self


def get_settings(**overrides: object) -> Settings:
    """Build the settings from the environment (``DERMS_*``), with explicit overrides."""
    return Settings(**overrides)  # type: ignore[arg-type]
