"""Service settings from the environment (prefix LATPRUNE_); defaults give the embedded one-machine set-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Everything the API, the workers and the client read from LATPRUNE_* variables."""

    model_config = SettingsConfigDict(env_prefix="LATPRUNE_", extra="ignore")

    home: Path = Field(Path(".latprune"), description="state directory of the embedded set-up")
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite in home")
    broker_url: str = Field("", description="Celery broker; default kombu's SQLAlchemy transport on SQLite")
    artifact_dir: Path | None = Field(None, description="artifact store root; default home/artifacts")
    data_root: Path | None = Field(None, description="dataset paths resolve under here; default home/data")
    max_upload_bytes: int = Field(512 * MIB, gt=0, description="largest accepted weights upload")
    max_body_bytes: int = Field(1 * MIB, gt=0, description="largest accepted JSON request body")
    max_arch_params: int = Field(200_000_000, gt=0, description="weights uploads for an architecture with more "
                                 "parameters (state-dict values) are refused before the file is read")
    visibility_timeout_s: int = Field(12 * 3600, gt=0, description="broker redelivery delay of unacked tasks")
    auth_cache_s: float = Field(10.0, ge=0, description="an authenticated API key is remembered this long; a key "
                                "revoked by another process (the CLI) stops working within it; 0: look up every "
                                "request")
    max_attempts: int = Field(3, ge=1, description="a job whose worker dies this many times fails")
    progress_interval_s: float = Field(0.5, ge=0, description="least time between two stored progress events")
    cancel_check_interval_s: float = Field(1.0, ge=0, description="least time between two cancel-flag reads")
    latency_tolerance: float = Field(0.05, ge=0, le=1, description="how far over a latency budget a result may "
                                     "measure (timing noise): the finisher's band for a job, and the fit of a "
                                     "subnet to a device's budget at download")
    auto_profile_samples: int = Field(200, ge=10, description="configurations profiled when a latency job "
                                      "finds no predictor for its device")
    prune_queue: str = "prune"
    worker_all_device_queues: bool = Field(False, description="worker also consumes every device's profile "
                                           "queue (the one-machine set-up of `latprune up`)")
    api_url: str = Field("http://127.0.0.1:8000", description="where the client finds the API")
    api_key: str | None = Field(None, description="client key; else read from home/client.json")
    host: str = "127.0.0.1"
    port: int = 8000

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.home = self.home.expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'latprune.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.db'}"
        self.artifact_dir = (self.artifact_dir or self.home / "artifacts").expanduser().absolute()
        self.data_root = (self.data_root or self.home / "data").expanduser().absolute()
        return self

    @property
    def is_embedded_broker(self) -> bool:
        """True when Celery runs over the database transport rather than a real broker."""
        return self.broker_url.startswith("sqla+")

    def ensure_dirs(self) -> None:
        """Create the local directories the embedded set-up writes to."""
        for path in (self.home, self.artifact_dir, self.data_root):
            path.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process from the environment."""
    return Settings()
