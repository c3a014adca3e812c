"""One piece of provenance evidence: what a reader found beside the pixels.

It lands in the verdict as is, so every field is bounded: the kind and claim come from a
small vocabulary (usable as metric labels), the generator is a short name, and the
detail is cut to :data:`MAX_DETAIL` characters.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Kind = Literal["c2pa", "iptc", "generator_metadata", "exif", "hash_list"]
Claim = Literal["ai_generated", "real", "edited", "unknown"]

KINDS: tuple[Kind, ...] = ("c2pa", "iptc", "generator_metadata", "exif", "hash_list")
CLAIMS: tuple[Claim, ...] = ("ai_generated", "real", "edited", "unknown")

MAX_DETAIL = 300
MAX_GENERATOR = 64

# Control characters (C0 except tab, DEL, C1) never reach a verdict or a log line.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str, limit: int) -> str:
    """Printable, single-spaced and at most ``limit`` characters (an ellipsis marks a cut)."""
    text = _CONTROL.sub(" ", text[: limit * 4])
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


class Evidence(BaseModel):
    """A claim about the image's origin and how far it can be trusted.

    ``trusted`` is true only for claims nobody but a trusted party could have made: a C2PA
    manifest that validates and chains to a configured trust anchor, or a match in the
    operator's own hash list. Everything else is metadata that anyone can write or strip.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    claim: Claim
    generator: str | None = None
    trusted: bool = False
    detail: str = Field(default="", max_length=MAX_DETAIL)

    @field_validator("detail", mode="before")
    @classmethod
    def _bounded_detail(cls, value: object) -> object:
        return clean_text(value, MAX_DETAIL) if isinstance(value, str) else value

    @field_validator("generator", mode="before")
    @classmethod
    def _bounded_generator(cls, value: object) -> object:
        if isinstance(value, str):
            value = clean_text(value, MAX_GENERATOR)
            return value or None
        return value
