"""The published contract as JSON Schema (draft 2020-12), generated from the models.

``clipguard schema event|verdict|dead-letter`` prints these; docs/schemas/ holds the
committed copies and a test fails when they differ from what this module generates.

- ``event``: what the worker accepts on the input topic (pydantic's validation schema, plus
  the rules the model checks in code: exactly one image field, no newer schema_version).
- ``verdict``: what the worker writes on the output topic (the serialization schema; every
  field is always present, nulls included, so every field is required).
- ``dead-letter``: the headers of a dead-letter record, as an object of header name to its
  UTF-8 value (the record's value is the original input bytes, not JSON).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from clipguard.consumer.headers import MAX_TRACESTATE_BYTES
from clipguard.consumer.outcomes import MAX_HEADER_MESSAGE
from clipguard.consumer.schemas import SCHEMA_VERSION, UploadEvent, Verdict

DRAFT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "urn:clipguard:schema:"
DECIMAL = r"^(0|[1-9][0-9]*)$"
TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$"


class DeadLetterHeaders(BaseModel):
    """Headers of a dead-letter record: why it could not be judged and where it came from.

    Besides these, a dead letter carries the input's ``traceparent``/``tracestate`` and the
    ``forward_headers`` allow-list (any other names), like the verdict does.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    stage: str = Field(alias="clipguard.error.stage", description="pipeline stage that failed")
    error_class: str = Field(alias="clipguard.error.class", description="error type name")
    reason: str = Field(
        alias="clipguard.error.reason",
        pattern=r"^[a-z0-9_]+$",
        description="bounded reason code (the same as the dead_letters_total label)",
    )
    message: str = Field(
        alias="clipguard.error.message",
        max_length=MAX_HEADER_MESSAGE,
        description="human-readable detail",
    )
    original_topic: str = Field(alias="clipguard.original.topic")
    original_partition: str = Field(alias="clipguard.original.partition", pattern=DECIMAL)
    original_offset: str = Field(alias="clipguard.original.offset", pattern=DECIMAL)
    original_size: str | None = Field(
        default=None,
        alias="clipguard.original.size",
        pattern=DECIMAL,
        description="only when the value was truncated: the original's size in bytes",
    )
    original_sha256: str | None = Field(
        default=None, alias="clipguard.original.sha256", pattern=r"^[0-9a-f]{64}$"
    )
    original_truncated: str | None = Field(
        default=None, alias="clipguard.original.truncated", pattern=r"^true$"
    )
    original_key_size: str | None = Field(
        default=None, alias="clipguard.original.key_size", pattern=DECIMAL
    )
    traceparent: str | None = Field(default=None, pattern=TRACEPARENT)
    tracestate: str | None = Field(default=None, max_length=MAX_TRACESTATE_BYTES)


def _event() -> dict[str, Any]:
    schema = UploadEvent.model_json_schema(mode="validation")
    props = schema["properties"]
    props["schema_version"]["maximum"] = SCHEMA_VERSION
    props["event_id"]["pattern"] = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"
    props["event_id"]["description"] = (
        "1-512 characters, no control or format characters; the verdict's key"
    )
    # The model checks this in code: exactly one of the two image fields is set.
    schema["oneOf"] = [
        {"required": [name], "properties": {name: {"type": "string"}}}
        for name in ("image_b64", "image_url")
    ]
    return schema


def _all_required(schema: dict[str, Any]) -> None:
    for node in [schema, *schema.get("$defs", {}).values()]:
        if "properties" in node:
            node["required"] = list(node["properties"])


def _verdict() -> dict[str, Any]:
    schema = Verdict.model_json_schema(mode="serialization")
    _all_required(schema)  # to_bytes() writes every field, nulls included
    schema["properties"]["schema_version"]["const"] = SCHEMA_VERSION
    return schema


def _dead_letter() -> dict[str, Any]:
    schema = DeadLetterHeaders.model_json_schema(by_alias=True, mode="validation")
    schema["title"] = "DeadLetterHeaders"
    schema["additionalProperties"] = {"type": "string"}
    return schema


SCHEMAS = {"event": _event, "verdict": _verdict, "dead-letter": _dead_letter}


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema called ``name`` (one of :data:`SCHEMAS`)."""
    body = SCHEMAS[name]()
    return {"$schema": DRAFT, "$id": f"{ID_BASE}{name}", **body}


def schema_text(name: str) -> str:
    """The schema as committed under docs/schemas/: two-space JSON, newline at the end."""
    return json.dumps(json_schema(name), indent=2, ensure_ascii=False) + "\n"
