"""Settings of the tunerd daemon, read from TUNERD_* environment variables (or given directly)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tunerd.schedules.strategies import DEFAULT as DEFAULT_STRATEGY

if TYPE_CHECKING:
    from tunerd.kernels.limits import Limits

MiB = 1 << 20


class Settings(BaseSettings):
    """Everything `tunerd serve` can be told; each field is also TUNERD_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="TUNERD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8521, ge=0, le=65535)
    db_url: str | None = Field(
        None, description="SQLAlchemy URL of the store (default: $TUNERD_DB, else the local SQLite file)"
    )

    # Auth. The admin token (TUNERD_TOKEN) allows every route; the read token (TUNERD_READ_TOKEN, what
    # training jobs hold) allows the read routes only. Reads are open unless a read token is set or
    # protect_reads is on. `tunerd serve` refuses a non-loopback host without a token unless insecure.
    token: SecretStr | None = Field(None, description="admin bearer token: write routes, and reads too")
    read_token: SecretStr | None = Field(None, description="bearer token for the read routes only")
    protect_reads: bool = False
    insecure: bool = Field(False, description="allow serving a non-loopback host without a token")

    # Requests naming another Host (DNS rebinding) or sent by a page of another Origin are refused with
    # 403. None: loopback names when serving loopback, any host otherwise (then the token guards).
    allowed_hosts: list[str] | None = None
    allowed_origins: list[str] = Field(
        default_factory=list, description="browser origins allowed to call the API besides the allowed hosts"
    )
    # When set, POST /v1/bundle reads only bundles signed by one of these ed25519 public keys (PEM or OpenSSH
    # files; TUNERD_TRUSTED_KEYS='["/etc/tunerd/ci.pub"]'), as `tunerd import --trusted-key` does.
    trusted_keys: list[str] = Field(default_factory=list, description="public key files bundles must be signed by")
    # GET /v1/bundle?arch=90 ships the ahead-of-time binaries the store keeps, signed with this ed25519 private key
    # (clients use no binary of an unsigned bundle); it compiles nothing: the idle worker compiles what was asked
    # for and is missing, at most aot_batch kernels per step, each step bounded by aot_timeout_s.
    signing_key: str | None = Field(None, description="ed25519 private key file GET /v1/bundle?arch= signs with")
    aot_batch: int = Field(16, ge=1, le=1024, description="kernels the idle worker compiles ahead of time per step")
    aot_timeout_s: float = Field(600.0, gt=0, description="wall-time limit of one ahead-of-time compile step")

    # Request limits, checked before a body is parsed.
    max_body_bytes: int = Field(1 * MiB, ge=1024)
    max_bundle_bytes: int = Field(256 * MiB, ge=1024)
    max_specs_per_lookup: int = Field(4096, ge=1)
    max_specs_per_job: int = Field(1024, ge=1)
    max_bundle_expanded_bytes: int = Field(512 * MiB, ge=1024, description="decompressed bundle size limit")
    max_json_depth: int = Field(32, ge=4, description="nesting depth of request and bundle JSON")
    max_misses: int = Field(
        100_000, ge=100, description="distinct (device, spec) misses kept; the oldest are dropped beyond it"
    )

    # Work one spec may cost (kernels.limits): checked before a miss is recorded or a job queued (422).
    max_tensor_elements: int = Field(2**31, ge=1)
    max_taps: int = Field(4096, ge=1)
    max_stride: int = Field(64, ge=1)
    max_measure_bytes: int = Field(8 << 30, ge=MiB)

    # Load shedding and slow clients (api.middleware.Admission): a request is answered 503 with Retry-After
    # at once when max_concurrent_requests are in flight, or when the daemon is overloaded: once more than
    # half the requests of a shed_interval_s window waited over shed_target_s for the event loop (a standing
    # queue, not a burst), requests that waited longer than shed_target_s are refused until none has for a
    # whole window. Headers must arrive within header_timeout_s, bodies within body_timeout_s.
    max_concurrent_requests: int = Field(32, ge=1)
    shed_target_s: float = Field(0.005, gt=0, le=10, description="queueing delay beyond which an overload sheds")
    shed_interval_s: float = Field(0.05, gt=0, le=60, description="window that tells a standing queue from a burst")
    max_connections: int = Field(2048, ge=16)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0)
    keep_alive_s: int = Field(5, ge=1)

    # Live (non-snapshot) hits are served from memory for this long; 0 reads the database every time.
    # Snapshot answers are immutable and always cached.
    live_cache_s: float = Field(1.0, ge=0, le=3600)
    # After an upgrade of a device's driver, CUDA, Triton, torch or generator, its old winners answer
    # marked stale ('stale') or as a stale miss, i.e. the default schedule ('default'), until re-validated.
    stale_answers: Literal["stale", "default"] = "stale"

    # The tuning worker that runs inside the daemon.
    worker: bool = True
    worker_id: str | None = None
    poll_s: float = Field(1.0, gt=0)
    heartbeat_s: float = Field(5.0, gt=0)
    stale_after_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1, description="claims before a job whose workers keep dying is failed")
    tune_misses: bool = True
    miss_strategy: str = DEFAULT_STRATEGY
    miss_budget_trials: int = Field(16, ge=1)
    miss_budget_seconds: float | None = Field(600.0, gt=0)
    miss_min_count: int = Field(1, ge=1, description="lookups a miss needs before the idle worker tunes it")

    # Measurement children: memory (resident bytes) and wall time per candidate.
    trial_memory_bytes: int | None = Field(None, ge=64 * MiB, description="default: half the machine's memory")
    trial_timeout_s: float = Field(120.0, gt=0)

    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @field_validator("token", "read_token")
    @classmethod
    def _non_empty_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value():
            raise ValueError("a token must not be empty (unset it to disable auth)")
        return v

    @field_validator("stale_after_s")
    @classmethod
    def _stale_after_heartbeat(cls, v: float, info) -> float:
        hb = info.data.get("heartbeat_s")
        if hb is not None and v <= 2 * hb:
            raise ValueError(f"stale_after_s ({v}) must exceed twice heartbeat_s ({hb}), or live jobs get requeued")
        return v

    def work_limits(self) -> Limits:
        """The per-spec work limits (kernels.limits) these settings ask for."""
        from tunerd.kernels.limits import Limits

        return Limits(
            max_tensor_elements=self.max_tensor_elements,
            max_taps=self.max_taps,
            max_stride=self.max_stride,
            max_measure_bytes=self.max_measure_bytes,
        )
