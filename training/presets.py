"""Reproduction presets: named sets of training-setting defaults.

A preset only fills settings the user did not give (flag, environment or config file all
win over it). Keys are the ``clipguard train`` setting names.

``paper``  arXiv 2404.08788: fine-tune all of a pretrained CLIP with Adam for 12 epochs,
           binary and source heads together. What the paper does not pin down here is our
           choice and is marked: ViT-B/32 OpenAI weights, a constant learning rate of 1e-5,
           batch 32, CLIP's own resize preprocessing, no blur/JPEG augmentation.
``ufd``    UniversalFakeDetect (Ojha et al. 2023): frozen CLIP ViT-L/14 (OpenAI) and a
           linear probe, centre crop without resize, random 224 crops and flips for
           training, Adam lr 1e-4, batch 256, early stopping on validation AP.
"""

from __future__ import annotations

from typing import Any

#: ``clipguard train --data`` without --preprocess/--views/--crop-grid: chosen from the
#: measurements in docs/training.md "Choosing the preprocessing" (the bench measures the cost
#: of DATA_VIEWS against one view).
DATA_PREPROCESS = "crop"
DATA_VIEWS = 5
DATA_CROP_GRID = 8

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "mode": "full",
        "epochs": 12,
        "backbone": "ViT-B-32",  # our choice
        "pretrained": "openai",
        "lr": 1e-5,  # our choice
        "schedule": "constant",
        "batch_size": 32,  # our choice
        "preprocess": "resize",
        "blur_prob": 0.0,
        "jpeg_prob": 0.0,
        "crop_prob": 0.0,
        "flip_prob": 0.5,
    },
    "ufd": {
        "mode": "linear",
        "backbone": "ViT-L-14",
        "pretrained": "openai",
        "preprocess": "crop",
        "views": 1,  # UFD scores one centre crop
        "lr": 1e-4,
        "batch_size": 256,
        "epochs": 50,
        "patience": 5,
        "schedule": "constant",
        "blur_prob": 0.0,
        "jpeg_prob": 0.0,
        "crop_prob": 1.0,
        "flip_prob": 0.5,
    },
}


def preset_defaults(name: str | None, given: set[str]) -> dict[str, Any]:
    """The preset's values for every setting not in ``given``."""
    if name is None:
        return {}
    return {k: v for k, v in PRESETS[name].items() if k not in given}
