"""clipguard.detector: the model and everything needed to run it (no Kafka, no training)."""

from clipguard.detector.backbones import TINY_BACKBONE, BackboneSpec, Encoder, build_encoder
from clipguard.detector.checkpoint import (
    Calibration,
    Manifest,
    load_checkpoint,
    new_detector,
    read_manifest,
    save_checkpoint,
)
from clipguard.detector.decode import DecodeLimits, decode_image
from clipguard.detector.engine import EngineConfig, InferenceEngine, Prediction
from clipguard.detector.errors import ClipguardError, ImageError
from clipguard.detector.heads import Detector, DetectorOutput
from clipguard.detector.policy import Decision, Policy
from clipguard.detector.preprocess import PreprocessConfig, preprocess, preprocess_batch

__all__ = [
    "TINY_BACKBONE",
    "BackboneSpec",
    "Calibration",
    "ClipguardError",
    "Decision",
    "DecodeLimits",
    "Detector",
    "DetectorOutput",
    "Encoder",
    "EngineConfig",
    "ImageError",
    "InferenceEngine",
    "Manifest",
    "Policy",
    "Prediction",
    "PreprocessConfig",
    "build_encoder",
    "decode_image",
    "load_checkpoint",
    "new_detector",
    "preprocess",
    "preprocess_batch",
    "read_manifest",
    "save_checkpoint",
]
