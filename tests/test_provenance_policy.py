"""The combination order: hash list, trusted C2PA, untrusted metadata, classifier."""

from __future__ import annotations

import pytest

from clipguard.detector import Decision
from clipguard.provenance import Evidence, combine


def ev(kind: str, claim: str, trusted: bool = False, generator: str | None = None) -> Evidence:
    return Evidence(kind=kind, claim=claim, trusted=trusted, generator=generator)


HASH_AI = ev("hash_list", "ai_generated", True, "midjourney")
HASH_REAL = ev("hash_list", "real", True)
C2PA_AI = ev("c2pa", "ai_generated", True, "dall_e")
C2PA_REAL = ev("c2pa", "real", True)
C2PA_EDITED = ev("c2pa", "edited", True)
C2PA_UNTRUSTED_AI = ev("c2pa", "ai_generated", False, "firefly")
C2PA_INVALID = ev("c2pa", "unknown", False)
IPTC_AI = ev("iptc", "ai_generated", False, "imagen")
TEXT_AI = ev("generator_metadata", "ai_generated", False, "stable_diffusion")
EXIF_CAMERA = ev("exif", "real", False)
IPTC_REAL = ev("iptc", "real", False)

ALLOW, REVIEW, BLOCK = Decision.ALLOW, Decision.REVIEW, Decision.BLOCK


@pytest.mark.parametrize(
    "classifier,evidence,decision,decided_by",
    [
        # 1. the operator's hash list decides, whatever else is said
        (ALLOW, [HASH_AI], BLOCK, "hash_list"),
        (BLOCK, [HASH_REAL, C2PA_AI], ALLOW, "hash_list"),
        (ALLOW, [C2PA_REAL, HASH_AI], BLOCK, "hash_list"),
        # 2. trusted C2PA: generated blocks, capture allows, but a block only drops to review
        (ALLOW, [C2PA_AI], BLOCK, "provenance"),
        (REVIEW, [C2PA_REAL], ALLOW, "provenance"),
        (BLOCK, [C2PA_REAL], REVIEW, "provenance"),
        (ALLOW, [C2PA_EDITED], ALLOW, "classifier"),
        (BLOCK, [C2PA_EDITED], BLOCK, "classifier"),
        # 3. untrusted metadata raises allow to review, nothing else
        (ALLOW, [IPTC_AI], REVIEW, "provenance"),
        (ALLOW, [C2PA_UNTRUSTED_AI], REVIEW, "provenance"),
        (ALLOW, [TEXT_AI, EXIF_CAMERA], REVIEW, "provenance"),
        (REVIEW, [TEXT_AI], REVIEW, "classifier"),
        (BLOCK, [IPTC_REAL, EXIF_CAMERA], BLOCK, "classifier"),  # never lowered by metadata
        (REVIEW, [IPTC_REAL], REVIEW, "classifier"),  # untrusted "real" never allows
        # 4. failed validation is no evidence; nothing at all leaves the classifier alone
        (ALLOW, [C2PA_INVALID], ALLOW, "classifier"),
        (BLOCK, [C2PA_INVALID], BLOCK, "classifier"),
        (REVIEW, [], REVIEW, "classifier"),
    ],
)
def test_order(
    classifier: Decision, evidence: list[Evidence], decision: Decision, decided_by: str
) -> None:
    outcome = combine(classifier, evidence, label="ai_generated", source="gan_a")
    assert (outcome.decision, outcome.decided_by) == (decision, decided_by), outcome.reason


def test_untrusted_metadata_never_lowers_or_allows() -> None:
    untrusted = [IPTC_AI, TEXT_AI, C2PA_UNTRUSTED_AI, C2PA_INVALID, EXIF_CAMERA, IPTC_REAL]
    rank = {ALLOW: 0, REVIEW: 1, BLOCK: 2}
    for classifier in (ALLOW, REVIEW, BLOCK):
        for item in untrusted:
            outcome = combine(classifier, [item])
            assert rank[outcome.decision] >= rank[classifier]
            assert outcome.decision is not ALLOW or classifier is ALLOW


def test_source_takes_the_stated_generator() -> None:
    assert combine(ALLOW, [C2PA_AI], source="gan_a").source == "dall_e"
    assert combine(ALLOW, [HASH_AI]).source == "midjourney"
    # trusted evidence names the source before untrusted metadata does
    assert combine(BLOCK, [TEXT_AI, C2PA_AI]).source == "dall_e"
    # stated even where the classifier says real: the review flags the disagreement
    outcome = combine(ALLOW, [TEXT_AI], label="real", source=None)
    assert (outcome.decision, outcome.label, outcome.source) == (REVIEW, "real", "stable_diffusion")
    # evidence that decides real clears it; no named generator keeps the classifier's
    assert combine(BLOCK, [HASH_REAL], label="ai_generated", source="gan_a").source is None
    assert combine(BLOCK, [C2PA_INVALID], source="gan_a").source == "gan_a"


def test_labels_follow_deciding_evidence() -> None:
    assert combine(ALLOW, [C2PA_AI], label="real").label == "ai_generated"
    assert combine(REVIEW, [C2PA_REAL], label="ai_generated").label == "real"
    assert combine(BLOCK, [C2PA_REAL], label="ai_generated").label == "ai_generated"
    assert combine("allow", [], label="real").decision is ALLOW  # plain strings work too
