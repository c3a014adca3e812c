"""The published JSON Schemas (docs/schemas/) match the models, and mean what the worker does."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
from jsonschema import Draft202012Validator

from clipguard.cli.main import main
from clipguard.consumer.contract import SCHEMAS, DeadLetterHeaders, json_schema, schema_text
from clipguard.consumer.outcomes import DeadLetter, input_ref
from clipguard.consumer.records import RecordRef
from clipguard.consumer.schemas import (
    ErrorInfo,
    EvidenceRef,
    ModelRef,
    PolicyRef,
    UploadEvent,
    Verdict,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((DOCS / f"{name}.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_matches_the_models(name: str) -> None:
    committed = (DOCS / f"{name}.schema.json").read_text()
    assert committed == schema_text(name), (
        f"docs/schemas/{name}.schema.json is out of date: regenerate it with "
        f"`clipguard schema {name} --out docs/schemas/{name}.schema.json` and mind the "
        "versioning rules in docs/schemas/README.md"
    )


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_cli_prints_the_schema(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", name]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema(name)


def test_schema_agrees_with_the_event_model_on_examples() -> None:
    check = validator("event")
    b64 = base64.b64encode(b"\x89PNG").decode()
    good = [
        {"event_id": "e-1", "image_b64": b64},
        {"schema_version": 1, "event_id": "e-2", "image_url": "https://cdn.example/x.jpg",
         "uploaded_at": "2026-11-23T10:00:00Z", "metadata": {"user": 1}, "extra": True},
    ]  # fmt: skip
    bad = [
        {"event_id": "e-3"},  # no image
        {"event_id": "e-4", "image_b64": b64, "image_url": "https://cdn.example/x"},  # both
        {"event_id": "", "image_b64": b64},
        {"event_id": "a\x00b", "image_b64": b64},
        {"schema_version": 2, "event_id": "e-5", "image_b64": b64},
        {"schema_version": "1", "event_id": "e-6", "image_b64": b64},
        {"event_id": 12345, "image_b64": b64},
    ]
    for event in good:
        UploadEvent.model_validate(event)
        check.validate(event)
    for event in bad:
        with pytest.raises(ValueError):
            UploadEvent.model_validate_json(json.dumps(event))
        assert not check.is_valid(event), event


def test_every_verdict_the_model_writes_validates() -> None:
    check = validator("verdict")
    record = RecordRef("uploads", 1, 5, b"e-1", b"x", (), 1_700_000_000_000)
    common = {
        "model": ModelRef(name="m", version="v", sha256="0" * 64),
        "policy": PolicyRef(review_at=0.5, block_at=0.9),
        "input": input_ref(record),
        "decided_at": datetime.now(timezone.utc),
    }
    judged = Verdict(event_id="e-1", decision="block", label="ai_generated", ai_score=0.97,
                     source="sd", source_scores={"real": 0.03, "sd": 0.97},
                     evidence=[EvidenceRef(kind="c2pa", claim="ai_generated", trusted=True)],
                     decided_by="provenance", **common)  # fmt: skip
    failed = Verdict(event_id="e-2", decision="review", label=None, decided_by=None,
                     error=ErrorInfo(stage="decode", reason="undecodable"), **common)  # fmt: skip
    for verdict in (judged, failed):
        check.validate(json.loads(verdict.to_bytes()))
    sent = json.loads(judged.to_bytes())
    del sent["input"]["timestamp"]  # every field is always written
    assert not check.is_valid(sent)
    with pytest.raises(jsonschema.ValidationError):
        check.validate({**json.loads(failed.to_bytes()), "unknown": 1})


def test_dead_letter_headers_schema_names_every_header_the_worker_writes() -> None:
    check = validator("dead-letter")
    record = RecordRef("uploads", 0, 42, None, b"x")
    dead = DeadLetter(record, "decode", "DecodeError", "undecodable", "cannot identify image")
    headers = {name: value.decode() for name, value in dead.headers()}
    check.validate(headers)
    aliases = {field.alias for field in DeadLetterHeaders.model_fields.values()}
    assert set(headers) <= aliases
    assert not check.is_valid({**headers, "clipguard.original.offset": "-1"})
    assert not check.is_valid({k: v for k, v in headers.items() if "reason" not in k})
