"""The notebooks' run profiles (toy, paper): their datasets, their configs and the check of a run's
profile, dataset and device, made before any heavy work."""
from __future__ import annotations

from typing import Optional

from .datasets.names import BENCHMARK_NAMES

PROFILES = ("toy", "paper")
PAPER_DATASETS = BENCHMARK_NAMES
#: the toy default is the known-answer world: its bias is planted, so what a model removes is measured
DEFAULT_DATASET = {"toy": "known", "paper": "voc"}
#: the toy profile's worlds: ``known`` (a bias of known amplitudes planted in its CLIP) and
#: ``toyworld`` (its CLIP learned its biases from biased pretraining data)
TOY_DATASETS = ("known", "toyworld")
#: the config a (profile, dataset) runs with; the paper profile uses the dataset's own (voc.yaml, ...)
PROFILE_CONFIG = {("toy", "toyworld"): "toy", ("toy", "known"): "toy_known"}


def check_parameters(profile: str, dataset: Optional[str], device: str) -> str:
    """Validate the run before any heavy work; returns the dataset to use."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}.")
    dataset = dataset or DEFAULT_DATASET[profile]
    valid = TOY_DATASETS if profile == "toy" else PAPER_DATASETS
    if dataset not in valid:
        raise ValueError(f"dataset {dataset!r} is not part of profile {profile!r}; valid: {', '.join(valid)}.")
    if device not in ("auto", "cpu"):  # only these need no torch import (seconds) to be checked
        from .clip_loading import resolve_device  # torch: import time; a typo must fail in under a second

        resolve_device(device)  # raises with a message when e.g. CUDA is requested but absent
    return dataset


def config_name(profile: str, dataset: str) -> str:
    """The config file (``configs/<name>.yaml``) a profile/dataset pair runs with."""
    return PROFILE_CONFIG.get((profile, dataset), dataset)


__all__ = ("PROFILES", "PAPER_DATASETS", "TOY_DATASETS", "DEFAULT_DATASET", "PROFILE_CONFIG", "check_parameters",
           "config_name")
