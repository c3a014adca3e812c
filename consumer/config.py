"""Worker settings: flags > ``CLIPGUARD_*`` environment > TOML config file > defaults.

Built once by the command, frozen, and passed down; nothing reads the environment later.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from typing_extensions import Self

from clipguard.consumer.headers import (
    MAX_FORWARDED,
    MAX_NAME_CHARS,
    RESERVED_PREFIX,
    valid_header_name,
)
from clipguard.consumer.netguard import parse_cidrs, parse_host_patterns
from clipguard.detector.decode import DEFAULT_FORMATS
from clipguard.detector.gpu_decode import DEVICE_PATTERN
from clipguard.provenance import ProvenanceSettings


def _must_exist(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"checkpoint not found: {path}")
    return path


#: A checkpoint directory or ``.safetensors`` file that must exist when settings are built.
CheckpointPath = Annotated[Path, AfterValidator(_must_exist)]

log = logging.getLogger(__name__)

_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


class ClipguardSettings(BaseSettings):
    """Base for every command's settings: env prefix, TOML file, strict keys."""

    model_config = SettingsConfigDict(
        env_prefix="CLIPGUARD_", extra="forbid", frozen=True, validate_default=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Self:
        """Build settings from flags (``overrides``), environment and an optional TOML file."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        settings_cls = cls
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise SettingsError([f"config file not found: {path}"])
            file_config = {**cls.model_config, "toml_file": path}
            settings_cls = type(cls.__name__, (cls,), {"model_config": file_config})
        _warn_unknown_environment(cls)
        try:
            return settings_cls(**overrides)
        except ValidationError as exc:
            raise SettingsError.from_validation(exc) from None
        except ValueError as exc:  # a malformed TOML file, or an environment value
            where = f"config file {config_file}" if config_file else "CLIPGUARD_* environment"
            raise SettingsError([f"cannot read {where}: {exc}"]) from None


#: CLIPGUARD_* variables read by tools rather than by a settings class.
OTHER_VARIABLES = frozenset(
    {
        "CLIPGUARD_TANSU_BIN",
        "CLIPGUARD_TEST_BROKER",
        "CLIPGUARD_TEST_KAFKA_IMAGE",
        "CLIPGUARD_LOG_FORMAT",  # read by the command line for every command (cli/main.py)
    }
)


def _warn_unknown_environment(settings_cls: type[BaseSettings]) -> None:
    """A misspelt ``CLIPGUARD_*`` variable would be silently ignored: say so instead."""
    known = {f"CLIPGUARD_{name.upper()}" for name in settings_cls.model_fields} | OTHER_VARIABLES
    unknown = sorted(k for k in os.environ if k.startswith("CLIPGUARD_") and k not in known)
    if unknown:
        log.warning(
            "ignoring environment variables that are not settings of this command: %s",
            ", ".join(unknown),
        )


def comma_separated(value: Any) -> Any:
    """``"a,b"`` (a flag, a variable, a TOML string) as a tuple; lists pass through."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class SettingsError(Exception):
    """Settings that cannot be used, with one actionable line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems

    @classmethod
    def from_validation(cls, exc: ValidationError) -> SettingsError:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            if name:
                problems.append(f"invalid setting {setting_name(name)}: {message}")
            else:  # a rule across several settings: its message names each of them
                problems.append(f"invalid settings: {message}")
        return cls(problems)


def setting_name(name: str) -> str:
    """``max_inflight (--max-inflight / CLIPGUARD_MAX_INFLIGHT)``: how users can set it."""
    return f"{name} (--{name.replace('_', '-')} / CLIPGUARD_{name.upper()})"


class KafkaSettings(ClipguardSettings):
    """Connection to any Kafka-protocol cluster."""

    bootstrap_servers: str
    client_id: str = "clipguard"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        bad = [s for s in servers if not _HOST_PORT.match(s)]
        if not servers or bad:
            raise ValueError(f"expected HOST:PORT[,HOST:PORT...], got {value!r}")
        return ",".join(servers)

    def client_kwargs(self) -> dict[str, Any]:
        """kafka-python connection keywords shared by consumers, producers and admins."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            # A restarted broker is found again within seconds, not after kafka-python's
            # 30 s default backoff; bootstrap gives up after 10 s so the caller can retry.
            "reconnect_backoff_max_ms": 2000,
            "bootstrap_timeout_ms": 10_000,
        }
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.ssl_cafile:
            kwargs["ssl_cafile"] = str(self.ssl_cafile)
        return kwargs


class WorkerSettings(KafkaSettings):
    """Everything ``clipguard serve`` needs; DESIGN.md "Command line" names the flags."""

    checkpoint: CheckpointPath
    input_topic: str = "uploads"
    output_topic: str = "verdicts"
    dlq_topic: str = "uploads.dlq"
    group_id: str = "clipguard"
    group_instance_id: str | None = None
    #: ``cooperative-sticky`` moves only the partitions that must move on a rebalance.
    partition_assignment: Literal["range", "cooperative-sticky"] = "range"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"

    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_batch_wait_ms: int = Field(default=20, ge=0, le=60_000)
    max_poll_records: int = Field(default=256, ge=1, le=10_000)
    #: Only the consumer thread's own cadence (~100 ms) must fit in it, never a batch.
    max_poll_interval_ms: int = Field(default=300_000, ge=200)
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    #: How long a fetch may wait for data; short, so a lone upload is not held back.
    fetch_max_wait_ms: int = Field(default=100, ge=0, le=10_000)
    produce_timeout_s: float = Field(default=30.0, gt=0)
    #: While the broker cannot be reached the worker is not ready and keeps retrying; after
    #: this long it exits with code 4 (a supervisor restarts it later, with backoff).
    broker_retry_timeout_s: float = Field(default=300.0, gt=0)
    #: How long without an answer from the broker before /readyz says not ready.
    broker_stale_after_s: float = Field(default=5.0, gt=0)
    #: A worker loop (consumer, inference) that makes no progress this long fails /livez,
    #: as do outputs left unacknowledged this long while the broker answers.
    stall_timeout_s: float = Field(default=60.0, gt=0)
    #: No partitions and no stable group membership this long fails /livez (a stuck join).
    assignment_timeout_s: float = Field(default=300.0, gt=0)
    #: Cap on one output record; default: the producer's cap and the output topics'
    #: ``max.message.bytes`` as the broker reports them, whichever is smaller.
    max_output_bytes: int | None = Field(default=None, ge=4096)

    #: Decode threads (Pillow releases the GIL while decoding); default: one per core.
    decode_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    #: Threads that fetch image URLs (waiting on the network, not on a core).
    fetch_workers: int = Field(default=16, ge=1, le=1024)
    #: One event's URL fetch, all attempts and backoff included, from its consumption.
    fetch_deadline_s: float = Field(default=30.0, gt=0, le=3600)
    #: Consumed-but-uncommitted events; above it partitions are paused, at half resumed.
    max_inflight: int = Field(default=256, ge=1, le=100_000)
    drain_timeout_s: float = Field(default=30.0, gt=0)
    #: Kafka transactions: verdicts, dead letters and offsets commit atomically.
    exactly_once: bool = False
    transactional_id: str | None = None
    dlq_max_consecutive: int = Field(default=200, ge=0)
    dlq_max_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    dlq_window: int = Field(default=1000, ge=1)

    metrics_port: int = Field(default=9400, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    metrics_enabled: bool = True

    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    torch_threads: int | None = Field(default=None, ge=1)
    torch_compile: bool = False
    #: Run the model in a process of its own (fed through shared memory), so the decode pool
    #: and the Kafka clients never hold its interpreter lock (docs/bench.md).
    model_process: bool = False
    #: Decode JPEGs in one batch on this CUDA device (nvJPEG) on the model's thread; ``cpu``
    #: (default) decodes every image on the decode pool. Falls back to the CPU, logged, when
    #: CUDA or torchvision's device decode is missing. Untested on a GPU (docs/bench.md).
    jpeg_decode_device: str = "cpu"
    #: Views per image and their aggregation; default: the checkpoint's input contract.
    views: int | None = Field(default=None, ge=1, le=16)
    view_aggregation: Literal["mean", "max"] | None = None

    max_image_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    image_formats: Annotated[tuple[str, ...], NoDecode] = DEFAULT_FORMATS
    file_root: Path | None = None

    # Image fetching over http(s) (DESIGN.md "Images"); the byte cap is max_image_bytes.
    fetch_enabled: bool = True
    #: Per connection attempt; never longer than what is left of the total timeout.
    fetch_connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    #: One attempt, redirects included: connect, TLS, headers and body must all fit.
    fetch_total_timeout_s: float = Field(default=10.0, gt=0, le=300)
    fetch_max_redirects: int = Field(default=3, ge=0, le=10)
    #: Ranges the SSRF guard would refuse but this deployment may fetch from
    #: (``10.0.0.0/8,fd00::/8``: comma-separated in flags and variables, or a TOML list).
    fetch_allow_cidrs: Annotated[tuple[str, ...], NoDecode] = ()
    #: When non-empty, only these hosts (``cdn.example.com``, ``*.example.com``) are fetched.
    fetch_allow_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    #: Extra attempts after a transient failure (timeout, reset, 5xx, 429); 0 = none.
    fetch_retries: int = Field(default=2, ge=0, le=10)
    #: Backoff before retry n: min(max, base * 2**(n-1)), jittered into its upper half.
    fetch_retry_base_s: float = Field(default=0.2, ge=0, le=60)
    fetch_retry_max_s: float = Field(default=2.0, ge=0, le=300)

    review_at: float | None = Field(default=None, ge=0.0, le=1.0)
    block_at: float | None = Field(default=None, ge=0.0, le=1.0)

    # Provenance evidence beside the classifier (docs/provenance.md).
    #: Read Content Credentials, XMP/IPTC, EXIF and generator text of every upload.
    provenance_enabled: bool = True
    #: PEM file of C2PA trust anchors; without it no Content Credential is trusted.
    c2pa_trust_anchors: Path | None = None
    #: Operator list of PDQ hashes (``<hex> <ai_generated|real> [generator]`` per line);
    #: reloaded when the file changes or on SIGHUP.
    hash_list: Path | None = None
    #: PDQ Hamming distance (of 256 bits) at or under which an upload matches the list.
    hash_list_threshold: int = Field(default=31, ge=0, le=256)

    #: Input headers copied to each verdict and dead letter besides W3C ``traceparent`` and
    #: ``tracestate`` (always carried): comma-separated names, matched case-insensitively.
    forward_headers: Annotated[tuple[str, ...], NoDecode] = ()

    def provenance(self) -> ProvenanceSettings:
        return ProvenanceSettings(
            c2pa_trust_anchors=self.c2pa_trust_anchors,
            hash_list=self.hash_list,
            hash_list_threshold=self.hash_list_threshold,
            max_bytes=max(self.max_image_bytes, 1),
        )

    @field_validator("input_topic", "output_topic", "dlq_topic", "group_id")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._\-]{1,249}", value):
            raise ValueError(f"{value!r} is not a valid Kafka name")
        return value

    @field_validator(
        "fetch_allow_cidrs", "fetch_allow_hosts", "image_formats", "forward_headers", mode="before"
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return comma_separated(value)

    @field_validator("jpeg_decode_device")
    @classmethod
    def _decode_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"expected cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("fetch_allow_cidrs")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(network) for network in parse_cidrs(value))

    @field_validator("fetch_allow_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return parse_host_patterns(value)

    @field_validator("forward_headers")
    @classmethod
    def _header_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [name for name in value if not valid_header_name(name)]
        if bad:
            raise ValueError(
                f"not forwardable header names: {', '.join(map(repr, bad))} (printable ASCII "
                f"without spaces, at most {MAX_NAME_CHARS} characters, not {RESERVED_PREFIX}*)"
            )
        if len(value) > MAX_FORWARDED:
            raise ValueError(f"at most {MAX_FORWARDED} names, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> WorkerSettings:
        n = setting_name
        if len({self.input_topic, self.output_topic, self.dlq_topic}) != 3:
            raise ValueError(
                f"{n('input_topic')}, {n('output_topic')} and {n('dlq_topic')} must all differ"
            )
        if self.max_inflight < self.max_batch_size:
            raise ValueError(
                f"{n('max_inflight')} = {self.max_inflight} must be at least "
                f"{n('max_batch_size')} = {self.max_batch_size}"
            )
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(
                f"{n('heartbeat_interval_ms')} = {self.heartbeat_interval_ms} must be below "
                f"{n('session_timeout_ms')} = {self.session_timeout_ms}"
            )
        review, block = self.review_at, self.block_at
        if review is not None and block is not None and review > block:
            raise ValueError(
                f"{n('review_at')} = {review} must not exceed {n('block_at')} = {block}"
            )
        if self.exactly_once and self.partition_assignment != "range":
            raise ValueError(
                f"{n('exactly_once')} needs {n('partition_assignment')} = range: a transaction "
                "is aborted on every rebalance, which must then revoke every partition"
            )
        return self
