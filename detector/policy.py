"""Thresholds -> allow / review / block."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Decision(str, Enum):
    ALLOW = "allow"
    REVIEW = "review"
    BLOCK = "block"


class Policy(BaseModel):
    """Scores at or above ``block_at`` are blocked, at or above ``review_at`` reviewed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    review_at: float = Field(default=0.5, ge=0.0, le=1.0)
    block_at: float = Field(default=0.9, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Policy:
        if self.review_at > self.block_at:
            raise ValueError(
                f"review_at ({self.review_at}) must not exceed block_at ({self.block_at})"
            )
        return self

    def decide(self, ai_score: float) -> Decision:
        if ai_score >= self.block_at:
            return Decision.BLOCK
        if ai_score >= self.review_at:
            return Decision.REVIEW
        return Decision.ALLOW
