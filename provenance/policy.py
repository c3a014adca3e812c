"""The classifier's decision combined with provenance evidence: who decides, in what order.

1. **Hash list** (the operator's own ruling on this very image): a match decides.
   ``ai_generated`` -> block, ``real`` -> allow. ``decided_by = hash_list``.
2. **Trusted C2PA** (a valid manifest whose signer chains to a configured anchor):
   ``ai_generated`` -> block. ``real`` (a capture claim) -> allow, except that a
   classifier *block* only drops to review: a generator has no reason to sign a false AI
   claim, but a forger has every reason to sign a false capture claim, and camera signing
   keys have been extracted before. ``edited``/``unknown`` decide nothing.
   ``decided_by = provenance``.
3. **Untrusted metadata** (XMP/IPTC, EXIF, generator text chunks, C2PA that validates but
   whose signer is not trusted): an ``ai_generated`` claim raises *allow* to *review*
   (``decided_by = provenance``). It never lowers a decision and never yields allow:
   anyone can write it, and stripping it is easier still.
4. Otherwise the classifier decides (``decided_by = classifier``).

``source`` becomes the generator the evidence names (trusted evidence first), even when
the classifier's label is ``real``: the review decision then flags the disagreement.
Evidence that decides ``real`` clears ``source``. Manifests that fail validation are
``unknown`` evidence and play no part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from clipguard.detector.policy import Decision
from clipguard.provenance.evidence import Evidence

DecidedBy = Literal["classifier", "provenance", "hash_list"]
Label = Literal["real", "ai_generated"]

# Which evidence names the source first: trusted before untrusted, then by kind.
_KIND_ORDER = {"hash_list": 0, "c2pa": 1, "iptc": 2, "generator_metadata": 3, "exif": 4}


class PolicyOutcome(BaseModel):
    """The verdict's decision, who made it, and the label and source it goes out with."""

    model_config = ConfigDict(frozen=True)

    decision: Decision
    decided_by: DecidedBy
    label: Label | None
    source: str | None
    #: One short sentence for logs: which rule applied.
    reason: str


def _stated_source(evidence: Sequence[Evidence]) -> str | None:
    named = [e for e in evidence if e.claim == "ai_generated" and e.generator]
    named.sort(key=lambda e: (not e.trusted, _KIND_ORDER.get(e.kind, 9)))
    return named[0].generator if named else None


def _first(evidence: Sequence[Evidence], kind: str, claim: str) -> Evidence | None:
    return next((e for e in evidence if e.kind == kind and e.trusted and e.claim == claim), None)


def combine(
    decision: Decision | str,
    evidence: Sequence[Evidence],
    *,
    label: Label | None = None,
    source: str | None = None,
) -> PolicyOutcome:
    """Combine the classifier's ``decision``, ``label`` and ``source`` with the evidence."""
    decision = Decision(decision)
    stated = _stated_source(evidence) or source

    if hit := _first(evidence, "hash_list", "ai_generated"):
        return PolicyOutcome(
            decision=Decision.BLOCK,
            decided_by="hash_list",
            label="ai_generated",
            source=hit.generator or stated,
            reason="hash list: a known generated image",
        )
    if _first(evidence, "hash_list", "real"):
        return PolicyOutcome(
            decision=Decision.ALLOW,
            decided_by="hash_list",
            label="real",
            source=None,
            reason="hash list: a known real image",
        )
    if hit := _first(evidence, "c2pa", "ai_generated"):
        return PolicyOutcome(
            decision=Decision.BLOCK,
            decided_by="provenance",
            label="ai_generated",
            source=hit.generator or stated,
            reason="trusted C2PA: the signer states the image is generated",
        )
    if _first(evidence, "c2pa", "real"):
        if decision is Decision.BLOCK:
            return PolicyOutcome(
                decision=Decision.REVIEW,
                decided_by="provenance",
                label=label,
                source=stated,
                reason="trusted C2PA capture claim against a classifier block: review",
            )
        return PolicyOutcome(
            decision=Decision.ALLOW,
            decided_by="provenance",
            label="real",
            source=None,
            reason="trusted C2PA: the signer states the image is a capture",
        )
    untrusted_ai = any(e.claim == "ai_generated" and not e.trusted for e in evidence)
    if untrusted_ai and decision is Decision.ALLOW:
        return PolicyOutcome(
            decision=Decision.REVIEW,
            decided_by="provenance",
            label=label,
            source=stated,
            reason="untrusted metadata claims a generator: raised to review",
        )
    return PolicyOutcome(
        decision=decision,
        decided_by="classifier",
        label=label,
        source=stated,
        reason="classifier",
    )
