"""reclip_core — ReCLIP++ (Wang & Kang, arXiv 2408.06747) on open_clip.

One module per concept of the method; see docs/architecture.md. Names are imported lazily so
``import reclip_core`` stays fast and each notebook cell pulls only what it uses.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # backbone features
    "load_clip": "clip_loading", "dense_features": "backbone", "encode_image_cls": "backbone",
    "normalize_images": "backbone", "resolve_device": "clip_loading", "CLIP_MEAN": "backbone",
    "CLIP_STD": "backbone",
    # text embeddings
    "PROMPT_TEMPLATES": "text", "class_names": "datasets.class_lists", "text_embeddings": "text",
    # bias model
    "ReferencePrompt": "reference_prompt", "PositionalBias": "positional_bias",
    "resized_positional_embedding": "positional_bias", "bias_logits": "rectify", "rectify": "rectify",
    "presence_filter": "rectify", "MaskDecoder": "decoder",
    "gumbel_masked_contrastive_loss": "loss",
    "ReCLIPPP": "model", "ReCLIP": "model", "MaskCLIP": "model",
    # evaluation
    "SegMetric": "metrics",
}

# Submodules reachable as attributes (``rc.lab.setup``, ``rc.plots``) without an explicit import.
_SUBMODULES = ("backbone", "clip_loading", "text", "reference_prompt", "positional_bias", "rectify", "decoder", "loss",
               "model", "metrics", "bias_analysis", "atomic_io", "hypothesis", "views", "feature_cache",
               "distributed", "model_factory", "training", "evaluation", "eval_report", "diagnostics",
               "markdown", "bias_lab_report",
               "checkpoint", "config", "transforms", "segment", "lab", "plots", "toy_lab", "toy_clip",
               "datasets", "reproduce", "paths", "profiles", "palette", "result_files", "benchmark_report",
               "options", "config_schema", "run_inputs", "run_lock", "result_tables", "spread", "planted_bias",
               "bias_recovery", "known_answer", "known_answer_diagnostics")

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'reclip_core' has no attribute {name!r}")


def __dir__():
    return __all__
