"""`make reproduce`: the main job. Profile `toy` (default) runs on CPU in minutes.

Until the notebooks exist this runs a smoke demonstration of the model on the selected
backbone; the notebook batch (papermill) replaces it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"
PROFILES = ("toy", "paper")


def smoke(profile: str, device: str) -> dict:
    """MaskCLIP and an untrained ReCLIP++ forward on random images: checks the install."""
    import reclip_core as rc

    torch.manual_seed(0)
    if profile == "toy":
        try:
            clip = rc.load_clip("toy", device=device)
        except (ImportError, FileNotFoundError, ValueError) as err:
            print(f"toy CLIP not available yet ({err}); using a random ViT-B/16", file=sys.stderr)
            clip = rc.load_clip(pretrained=None, device=device)
    else:
        clip = rc.load_clip(device=device)
    names = ["cat", "dog", "bird"]
    images = torch.randn(2, 3, 96, 128, device=next(clip.parameters()).device)
    model = rc.ReCLIPPP(clip, names, templates=["a photo of a {}."]).to(images.device).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(images)
    return {"profile": profile, "shapes": {k: list(v.shape) for k, v in out.items()},
            "forward_seconds": round(time.perf_counter() - t0, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="toy", choices=PROFILES)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    report = smoke(args.profile, args.device)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
