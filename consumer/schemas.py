"""Wire formats: upload events in, verdicts out (DESIGN.md "Events" and "Verdicts")."""

from __future__ import annotations

import unicodedata
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

SCHEMA_VERSION = 1


class UploadEvent(BaseModel):
    """One image upload. Unknown fields are ignored, never copied into the verdict."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, strict=True)
    event_id: str = Field(min_length=1, max_length=512, strict=True)
    image_b64: str | None = None
    image_url: str | None = Field(default=None, max_length=8192)
    content_type: str | None = None
    uploaded_at: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_image(self) -> UploadEvent:
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is newer than supported ({SCHEMA_VERSION})"
            )
        if (self.image_b64 is None) == (self.image_url is None):
            raise ValueError("exactly one of image_b64 and image_url must be set")
        if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in self.event_id):
            raise ValueError("event_id must not contain control characters")
        return self


def _utc_iso(value: datetime) -> str:
    value = value.astimezone(timezone.utc)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: A time on the wire: RFC 3339, UTC, milliseconds (``2026-11-23T10:00:00.021Z``).
UtcTime = Annotated[
    datetime,
    PlainSerializer(_utc_iso, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]


class InputRef(BaseModel):
    """The input record a verdict answers."""

    topic: str
    partition: int
    offset: int
    #: The input record's Kafka timestamp (producer CreateTime, or LogAppendTime where the
    #: topic uses it), RFC 3339 UTC with milliseconds; null when the record has none.
    timestamp: UtcTime | None = None


class ModelRef(BaseModel):
    name: str
    version: str
    sha256: str


class PolicyRef(BaseModel):
    review_at: float
    block_at: float


class EvidenceRef(BaseModel):
    """One piece of provenance evidence (docs/provenance.md), as the verdict carries it."""

    kind: str
    claim: str
    generator: str | None = None
    trusted: bool = False
    detail: str = ""


class ErrorInfo(BaseModel):
    stage: str
    reason: str
    message: str | None = None


class Verdict(BaseModel):
    """The moderation outcome for one upload, keyed by ``event_id`` on the output topic."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    event_id: str
    decision: Literal["allow", "review", "block"]
    label: Literal["real", "ai_generated"] | None
    ai_score: float | None = Field(default=None, ge=0.0, le=1.0)
    source: str | None = None
    source_scores: dict[str, float] = Field(default_factory=dict)
    model: ModelRef
    policy: PolicyRef
    input: InputRef
    timings_ms: dict[str, float] = Field(default_factory=dict)
    decided_at: UtcTime
    metadata: dict[str, Any] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    #: Provenance read from the upload's bytes (empty when none was found or read).
    evidence: list[EvidenceRef] = Field(default_factory=list)
    #: What set ``decision``: the classifier, trusted provenance, or an operator hash list.
    decided_by: Literal["classifier", "provenance", "hash_list"] | None = "classifier"

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode("utf-8")
