"""Settings of the tunerd daemon, read from TUNERD_* environment variables (or given directly)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20


class Settings(BaseSettings):
    """Everything `tunerd serve` can be told; each field is also TUNERD_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="TUNERD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8521, ge=0, le=65535)
    db_url: Optional[str] = Field(None, description="SQLAlchemy URL of the store (default: $TUNERD_DB, else the "
                                                   "local SQLite file)")

    # Auth: write and admin routes always need the token when one is set; reads only if protect_reads.
    token: Optional[SecretStr] = Field(None, description="bearer token for write/admin routes")
    protect_reads: bool = False

    # Request limits, checked before a body is parsed.
    max_body_bytes: int = Field(1 * MiB, ge=1024)
    max_bundle_bytes: int = Field(256 * MiB, ge=1024)
    max_specs_per_lookup: int = Field(4096, ge=1)
    max_specs_per_job: int = Field(1024, ge=1)

    # Live (non-snapshot) hits are served from memory for this long; 0 reads the database every time.
    # Snapshot answers are immutable and always cached.
    live_cache_s: float = Field(1.0, ge=0, le=3600)

    # The tuning worker that runs inside the daemon.
    worker: bool = True
    worker_id: Optional[str] = None
    poll_s: float = Field(1.0, gt=0)
    heartbeat_s: float = Field(5.0, gt=0)
    stale_after_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1, description="claims before a job whose workers keep dying is failed")
    tune_misses: bool = True
    miss_strategy: str = "halving"
    miss_budget_trials: int = Field(16, ge=1)
    miss_budget_seconds: Optional[float] = Field(600.0, gt=0)
    miss_min_count: int = Field(1, ge=1, description="lookups a miss needs before the idle worker tunes it")

    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @field_validator("token")
    @classmethod
    def _non_empty_token(cls, v: Optional[SecretStr]) -> Optional[SecretStr]:
        if v is not None and not v.get_secret_value():
            raise ValueError("token must not be empty (unset it to disable auth)")
        return v

    @field_validator("stale_after_s")
    @classmethod
    def _stale_after_heartbeat(cls, v: float, info) -> float:
        hb = info.data.get("heartbeat_s")
        if hb is not None and v <= 2 * hb:
            raise ValueError(f"stale_after_s ({v}) must exceed twice heartbeat_s ({hb}), or live jobs get requeued")
        return v
