"""Known image generators and front ends: a stated name to one canonical generator name.

Matching is a case-insensitive substring test over a short table (no regular expressions
on untrusted text, so no catastrophic backtracking). It is applied only to fields that
name software or a model (a creator tool, a claim generator, a model file), never to a
prompt, where "in the style of midjourney" proves nothing.
"""

from __future__ import annotations

import re

# (canonical name, needles). Earlier rows win, so specific names come before families.
_TABLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("novelai", ("novelai",)),
    ("midjourney", ("midjourney",)),
    ("dall_e", ("dall-e", "dall·e", "dalle", "dall e", "dall_e")),
    ("openai", ("gpt-image", "gpt-4o", "chatgpt", "openai", "sora")),
    ("firefly", ("firefly",)),
    (
        "imagen",
        (
            "google imagen",
            "imagen 3",
            "imagen 4",
            "imagen-",
            "imagen_",
            "made with google ai",
            "gemini",
            "nano banana",
            "synthid",
        ),
    ),
    (
        "bing_image_creator",
        ("bing image creator", "image creator from microsoft", "microsoft designer"),
    ),
    ("meta_ai", ("imagine with meta", "meta ai")),
    ("grok", ("grok", "xai aurora")),
    ("ideogram", ("ideogram",)),
    ("leonardo", ("leonardo.ai", "leonardo ai")),
    ("recraft", ("recraft",)),
    ("runway", ("runwayml", "runway gen", "runway ml")),
    ("kandinsky", ("kandinsky",)),
    ("playground", ("playground v", "playgroundai", "playground ai")),
    ("pixart", ("pixart",)),
    ("hunyuan", ("hunyuan",)),
    ("kolors", ("kolors",)),
    ("qwen_image", ("qwen-image", "qwen_image")),
    ("flux", ("flux",)),
    (
        "stable_diffusion",
        (
            "stable diffusion",
            "stable-diffusion",
            "stable_diffusion",
            "stablediffusion",
            "stability ai",
            "dreamstudio",
            "sdxl",
            "sd_xl",
            "sd-xl",
            "sd3",
            "sd_3",
            "sd 3",
            "sd1.5",
            "sd-v1",
            "sd_v1",
            "v1-5-pruned",
            "v2-1_",
            "juggernaut",
            "realvis",
            "dreamshaper",
            "pony",
            "illustrious",
        ),
    ),
    # Front ends: they run many models, so they name the generator only when no model does.
    ("comfyui", ("comfyui",)),
    (
        "automatic1111",
        (
            "automatic1111",
            "stable-diffusion-webui",
            "a1111",
            "sd.next",
            "webui forge",
            "webui-forge",
        ),
    ),
    ("invokeai", ("invokeai",)),
    ("fooocus", ("fooocus",)),
    ("swarmui", ("swarmui", "stableswarm")),
    ("draw_things", ("draw things",)),
    ("diffusionbee", ("diffusionbee",)),
    ("easy_diffusion", ("easy diffusion",)),
    ("nightcafe", ("nightcafe",)),
    ("civitai", ("civitai",)),
)

#: Photo and image editors: software that changes pixels without generating them.
_EDITORS = (
    "photoshop",
    "lightroom",
    "gimp",
    "affinity",
    "pixelmator",
    "capture one",
    "darktable",
    "rawtherapee",
    "snapseed",
    "paint.net",
    "picsart",
    "canva",
    "luminar",
    "photopea",
    "krita",
)

_NOT_SLUG = re.compile(r"[^a-z0-9]+")


def identify(name: str | None) -> str | None:
    """The canonical generator a software or model name refers to, or None."""
    if not name:
        return None
    lowered = name[:512].lower()
    for canonical, needles in _TABLE:
        if any(needle in lowered for needle in needles):
            return canonical
    return None


def is_editor(name: str | None) -> bool:
    """True when a software name is a known image editor (edits, does not generate)."""
    if not name:
        return False
    lowered = name[:512].lower()
    return any(editor in lowered for editor in _EDITORS)


def slug(name: str, limit: int = 40) -> str | None:
    """A stated but unknown generator name as a short identifier (``My Gen 2`` -> ``my_gen_2``)."""
    value = _NOT_SLUG.sub("_", name[:256].lower()).strip("_")
    return value[:limit].rstrip("_") or None


def generator_name(stated: str | None) -> str | None:
    """Canonical name when known, else a slug of the stated name, else None."""
    if not stated:
        return None
    return identify(stated) or slug(stated)
