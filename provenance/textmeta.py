"""What generator front ends write into text metadata, and what it says about the image.

Stable Diffusion front ends and node editors store their settings beside the pixels:
AUTOMATIC1111 and its forks a ``parameters`` text (``Steps: 20, Sampler: ..., Model: ...``),
ComfyUI its node graph as ``prompt`` and ``workflow`` JSON, InvokeAI ``invokeai_metadata``,
Fooocus ``fooocus_scheme``, NovelAI ``Software: NovelAI``. In PNG these are text chunks;
in JPEG and WebP the same texts go into EXIF UserComment or a COM segment. This module
turns (key, text) pairs from any of those places into evidence. All of it is metadata
that anyone can write or strip, so it is never trusted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, NamedTuple

from clipguard.provenance.evidence import Evidence
from clipguard.provenance.generators import identify

MAX_JSON_CHARS = 256 * 1024
MAX_JSON_NODES = 20_000
MAX_EVIDENCE = 3

_A1111_MARKERS = ("Steps: ", "Sampler: ", "CFG scale: ", "Seed: ", "Negative prompt:")
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".gguf", ".sft", ".pt", ".pth", ".bin")
_MODEL_KEYS = ("ckpt_name", "unet_name", "model_name", "base_model", "model", "checkpoint")
_INVOKE_KEYS = ("invokeai_metadata", "invokeai_graph", "invokeai_workflow", "sd-metadata", "dream")
#: Keys whose value names software or a model (never a prompt).
_SOFTWARE_KEYS = ("software", "generator", "source", "model", "creator tool")


def _json(text: str) -> Any:
    """Parse a JSON object or array of bounded size; None when it is not one."""
    text = text.strip()
    if not text or text[0] not in "{[" or len(text) > MAX_JSON_CHARS:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    """(key, value) pairs of a parsed JSON document, depth first, at most MAX_JSON_NODES."""
    stack: list[tuple[str, Any]] = [("", value)]
    budget = MAX_JSON_NODES
    while stack and budget > 0:
        key, node = stack.pop()
        budget -= 1
        yield key, node
        if isinstance(node, dict):
            stack.extend((str(k), v) for k, v in islice(node.items(), budget))
        elif isinstance(node, list):
            stack.extend((key, v) for v in islice(node, budget))


def _model_names(document: Any) -> list[str]:
    """Model names stated in a JSON document: values of model keys, or model file names."""
    found: list[str] = []
    for key, value in _walk(document):
        if isinstance(value, dict) and key.lower() in _MODEL_KEYS:
            value = value.get("name") or value.get("model_name") or value.get("key")
        if not isinstance(value, str) or not value or len(value) > 200:
            continue
        is_model = key.lower() in _MODEL_KEYS or value.lower().endswith(_MODEL_SUFFIXES)
        if is_model and value not in found:
            found.append(value)
        if len(found) >= 5:
            break
    return found


def _a1111_fields(text: str) -> dict[str, str]:
    """``Steps: 20, Sampler: Euler a, Model: x`` (the last line) -> a dict."""
    last = text.strip().rsplit("\n", 1)[-1][:4096]
    fields: dict[str, str] = {}
    for part in last.split(", "):
        name, sep, value = part.partition(": ")
        if sep and len(name) < 40:
            fields[name.strip()] = value.strip().strip('"')
    return fields


class _Finding(NamedTuple):
    generator: str
    #: False when the generator is a default guess (A1111 output without a model name).
    stated: bool
    detail: str


def _from_parameters(where: str, key: str, text: str) -> _Finding | None:
    """AUTOMATIC1111-style text, or the JSON that Fooocus and SwarmUI put under the same key."""
    document = _json(text)
    if isinstance(document, dict):
        params = document.get("sui_image_params", document)
        if not isinstance(params, dict):
            return None
        models = _model_names(params)
        front = "swarmui" if "sui_image_params" in document else None
        if front is None and any("fooocus" in str(v).lower() for v in params.values()):
            front = "fooocus"
        if not models and front is None and not {"seed", "steps", "sampler"} & set(params):
            return None
        model = models[0] if models else ""
        stated = identify(model)
        generator = stated or ("swarmui" if front == "swarmui" else "stable_diffusion")
        detail = f"{where} '{key}': {front or 'generation settings'} JSON"
        return _Finding(generator, bool(stated), detail + (f", model {model}" if model else ""))
    if sum(marker in text for marker in _A1111_MARKERS) < 2:
        return None
    fields = _a1111_fields(text)
    model = fields.get("Model", "")
    stated = identify(model)
    version = fields.get("Version", "")
    detail = f"{where} '{key}': AUTOMATIC1111-style parameters"
    if model:
        detail += f", Model: {model}"
    if version:
        detail += f", Version: {version}"
    return _Finding(stated or "stable_diffusion", bool(stated), detail)


def _from_comfyui(where: str, key: str, text: str) -> _Finding | None:
    """ComfyUI's API graph (``prompt``: nodes with ``class_type``) or UI ``workflow``."""
    document = _json(text)
    if isinstance(document, dict) and key == "prompt":
        nodes = [n for n in list(document.values())[:5000] if isinstance(n, dict)]
        if not any("class_type" in n for n in nodes):
            return None
    elif isinstance(document, dict) and key == "workflow":
        if not isinstance(document.get("nodes"), list):
            return None
    else:
        return None
    models = _model_names(document)
    stated = next((g for g in map(identify, models) if g), None)
    shown = ", ".join(models[:3]) or "none stated"
    detail = f"{where} '{key}': ComfyUI graph, models: {shown}"
    return _Finding(stated or "comfyui", bool(stated), detail)


def _from_invokeai(where: str, key: str, text: str) -> _Finding | None:
    document = _json(text)
    models = _model_names(document) if document is not None else []
    stated = next((g for g in map(identify, models) if g), None)
    shown = ", ".join(models[:3]) or "none stated"
    return _Finding(
        stated or "invokeai", bool(stated), f"{where} '{key}': InvokeAI, models: {shown}"
    )


def _analyze_one(where: str, key: str, text: str) -> _Finding | None:
    lowered = key.lower()
    if lowered in ("parameters", "comment", "usercomment", "imagedescription"):
        found = _from_parameters(where, key, text)
        if found or lowered == "parameters":
            return found
    if lowered in ("prompt", "workflow"):
        return _from_comfyui(where, lowered, text)
    if lowered in _INVOKE_KEYS:
        return _from_invokeai(where, key, text)
    if lowered == "fooocus_scheme":
        return _Finding("fooocus", False, f"{where} '{key}': Fooocus metadata")
    if lowered == "description" and "Job ID:" in text:
        detail = f"{where} '{key}': Midjourney-style 'Job ID' description"
        return _Finding("midjourney", True, detail)
    if lowered in _SOFTWARE_KEYS:
        generator = identify(text[:200])
        if generator:
            return _Finding(generator, True, f"{where} '{key}': {text[:120]}")
    return None


def analyze(items: Iterable[tuple[str, str]], where: str) -> list[Evidence]:
    """Evidence from (key, text) pairs found in one place (``where``, e.g. ``PNG text``).

    One evidence per generator named, at most :data:`MAX_EVIDENCE`; every claim is
    ``ai_generated`` and untrusted. ``items`` must already be bounded by the caller.
    """
    findings = [f for key, text in items if (f := _analyze_one(where, key, text)) is not None]
    stated = [f.generator for f in findings if f.stated]
    by_generator: dict[str, list[str]] = {}
    for finding in findings:
        # A guessed family joins a generator stated elsewhere (NovelAI's settings JSON).
        generator = finding.generator if finding.stated or not stated else stated[0]
        by_generator.setdefault(generator, []).append(finding.detail)
    return [
        Evidence(
            kind="generator_metadata",
            claim="ai_generated",
            generator=generator,
            trusted=False,
            detail="; ".join(details),
        )
        for generator, details in list(by_generator.items())[:MAX_EVIDENCE]
    ]
