"""Shared fixtures: CLIP models with random weights (no downloads in tests)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
torch.set_num_threads(min(2, os.cpu_count() or 1))

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def vit_b16():
    """OpenAI-architecture ViT-B/16 (QuickGELU) with seeded random weights."""
    import reclip_core

    torch.manual_seed(0)
    return reclip_core.load_clip("ViT-B-16-quickgelu", pretrained=None, device="cpu")


@pytest.fixture(scope="session")
def tiny_clip():
    """A small custom open_clip architecture (patch 8, context 16, D=48) from a config file."""
    import reclip_core

    torch.manual_seed(0)
    return reclip_core.load_clip(str(FIXTURES / "tiny_clip.json"), pretrained=None, device="cpu")


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``after_notebooks`` read what the executed notebooks wrote: run them last."""
    items.sort(key=lambda item: item.get_closest_marker("after_notebooks") is not None)
