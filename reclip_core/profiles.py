"""The notebooks' run profiles (toy, paper): their datasets, their configs and the check of a run's
profile, dataset and device, made before any heavy work."""
from __future__ import annotations

from typing import Optional

from .datasets.names import BENCHMARK_NAMES

PROFILES = ("toy", "paper")
PAPER_DATASETS = BENCHMARK_NAMES
DEFAULT_DATASET = {"toy": "toyworld", "paper": "voc"}
#: the config a profile runs with; the paper profile uses the dataset's own config (voc.yaml, ...)
PROFILE_CONFIG = {"toy": "toy"}


def check_parameters(profile: str, dataset: Optional[str], device: str) -> str:
    """Validate the run before any heavy work; returns the dataset to use."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}.")
    dataset = dataset or DEFAULT_DATASET[profile]
    valid = ("toyworld",) if profile == "toy" else PAPER_DATASETS
    if dataset not in valid:
        raise ValueError(f"dataset {dataset!r} is not part of profile {profile!r}; valid: {', '.join(valid)}.")
    if device not in ("auto", "cpu"):  # only these need no torch import (seconds) to be checked
        from .clip_loading import resolve_device  # torch: import time; a typo must fail in under a second

        resolve_device(device)  # raises with a message when e.g. CUDA is requested but absent
    return dataset


def config_name(profile: str, dataset: str) -> str:
    """The config file (``configs/<name>.yaml``) a profile/dataset pair runs with."""
    return PROFILE_CONFIG.get(profile, dataset)


__all__ = ("PROFILES", "PAPER_DATASETS", "DEFAULT_DATASET", "PROFILE_CONFIG", "check_parameters", "config_name")
