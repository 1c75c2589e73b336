"""Settings of a derms installation: one pydantic-settings object read from ``DERMS_*``.

Nothing is read at import time; call :func:`get_settings` where the application starts
(CLI command, app factory) and pass the object down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


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
    forecast_period_s, forecast_retrain_period_s
        Seconds between scheduled forecast issues and model retrains
        (``DERMS_FORECAST_PERIOD_S``, ``DERMS_FORECAST_RETRAIN_PERIOD_S``); 0 = off.
    forecast_targets
        Series the schedule forecasts, ``owner:quantity:kind`` (owner a device or meter id,
        kind ``load`` or ``pv``), optionally ``:source``; comma-separated or a JSON list in
        ``DERMS_FORECAST_TARGETS``. One model per kind, named ``forecast_model_prefix-kind``.
    forecast_step_s, forecast_horizon_s, forecast_history_days, forecast_n_rounds
        Scheduled forecasts: interval length, horizon, days of history to train on,
        boosting rounds per quantile.
    ieee2030_5_notify_hosts
        Host names (".example.net" for a domain) and networks ("10.20.0.0/16") a device's
        subscription may send notifications to (``DERMS_IEEE2030_5_NOTIFY_HOSTS``,
        comma-separated); empty: any.
    forecast_tz, forecast_latitude, forecast_longitude
        Calendar time zone and location (PV clear-sky features) of scheduled forecasts.
    """

    model_config = SettingsConfigDict(env_prefix="DERMS_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str = ""
    max_body_bytes: int = 32 * 1024 * 1024  # largest request body the API accepts
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_client_id: str = "derms-ingest"  # fixed: the broker keeps its session across restarts
    mqtt_topic_root: str = "derms/v1"  # telemetry on <root>/telemetry/<source>
    # IEEE 2030.5: hosts/networks a subscription's notificationURI may name (empty: any)
    ieee2030_5_notify_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    forecast_period_s: float = Field(default=0.0, ge=0)
    forecast_retrain_period_s: float = Field(default=0.0, ge=0)
    forecast_targets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    forecast_model_prefix: str = "auto"
    forecast_step_s: int = Field(default=900, gt=0)
    forecast_horizon_s: int = Field(default=86_400, gt=0)
    forecast_history_days: int = Field(default=365, gt=0)
    forecast_n_rounds: int = Field(default=200, gt=0)
    forecast_tz: str = "UTC"
    forecast_latitude: float | None = None
    forecast_longitude: float | None = None

    @field_validator("forecast_targets", "ieee2030_5_notify_hosts", mode="before")
    @classmethod
    def _split_targets(cls, value: object) -> object:
        """Accept a JSON list or a comma-separated string (``m1:p_kw:load,pv1:p_kw:pv``)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'derms.db').resolve()}"
        return self


def get_settings(**overrides: object) -> Settings:
    """Build the settings from the environment (``DERMS_*``), with explicit overrides."""
    return Settings(**overrides)  # type: ignore[arg-type]
