"""Pretrain the toy CLIP contrastively on the toy world's ``pretrain`` split.

CPU, seeded, step-based schedule (the result depends on ``--steps``, never on wall time),
open_clip's own ``CLIP`` and ``ClipLoss``. Writes, atomically (weights, then config, then the
manifest holding the weights' sha256):

    reclip_core/pretrained/toy_clip/{toy_clip.safetensors, config.json, manifest.json}
    reclip_core/pretrained/toy_clip_<preset>/...            (for --preset other than biased)

The manifest records the seed, steps, batch size, schedule, the preset and its hash (the data is a
deterministic function of it), wall time, throughput, the final training loss and the validation
metrics measured at the end (image-level zero-shot accuracy; MaskCLIP dense mIoU).

    python -m data_prep.pretrain_toy_clip --preset biased          # `make toy-clip`
    python -m data_prep.pretrain_toy_clip --preset uniform

Two extra losses, off by default: ``--dense-weight`` contrasts the image's mean MaskCLIP dense
feature with its caption; ``--region-weight`` classifies one object's box-pooled dense feature
against the class captions (region-caption pairs). The toy CLIPs of the biased and uniform worlds
were pretrained without them; the known-answer world's (``--preset known``, patch 4, ``make
toy-clip`` has its command) with ``--region-weight 1``.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# 1400 steps x 128 images (179k pairs, ~2 passes over the pretrain split) in bf16 autocast: 13.1 min
# on 2 free cores of the reference machine; the same pairs as 700 x 256 in float32 (~21 min there)
# but twice the updates, which gave a better model (docs: results/toy/bias_lab.md provenance).
DEFAULTS = dict(steps=1400, batch_size=128, lr=1e-3, warmup=100, weight_decay=0.1, seed=0,
                threads=2, amp="bf16", dense_weight=0.0, region_weight=0.0)


def decode_split(preset, split: str, root=None, limit: int | None = None):
    """All images of a split as a uint8 tensor [N, H, W, 3], plus its captions and masks."""
    import datasets
    from PIL import Image

    from reclip_core.datasets.toyworld_render import build_world
    from reclip_core.datasets.toyworld import world_dir

    path = world_dir(preset, root) / split
    if not (path / "dataset_info.json").is_file():
        build_world(preset, root=root, splits=[split])
    ds = datasets.load_from_disk(str(path))
    ds = ds.cast_column("image", datasets.Image(decode=False))
    ds = ds.cast_column("mask", datasets.Image(decode=False))
    n = len(ds) if limit is None else min(limit, len(ds))
    images, masks, captions = [], [], []
    for start in range(0, n, 4096):
        rows = ds[start:min(n, start + 4096)]
        images += [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in rows["image"]]
        masks += [np.asarray(Image.open(io.BytesIO(r["bytes"]))) for r in rows["mask"]]
        captions += rows["caption"]
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)), captions


def to_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> CLIP-normalised float [B, 3, H, W]."""
    from reclip_core.backbone import normalize_images

    return normalize_images(images_u8.permute(0, 3, 1, 2).float().div_(255.0))


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * t))


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def box_regions(masks_u8: torch.Tensor, hw, gen: torch.Generator):
    """Region-caption pairs (``--region-weight``): one object drawn at random per image → (weights
    [B, h*w] marking the patch cells of its bounding box, its class id [B]). Box-level captions of
    the pretraining images (the kind RegionCLIP/GLIP pretrain on) make the toy CLIP's dense features
    local, as a big CLIP's are from scale: without them a region's pooled dense features read it no
    better than its single patches (docs/training.md)."""
    B, H, W = masks_u8.shape
    C = int(masks_u8.max())
    present = torch.stack([(masks_u8 == c + 1).flatten(1).any(1) for c in range(C)], 1)
    target = torch.rand(B, C, generator=gen).masked_fill(~present, -1.0).argmax(1)
    obj = masks_u8 == (target + 1).to(masks_u8.dtype).view(B, 1, 1)
    (h, w) = hw
    rows = obj.any(2).view(B, h, H // h).any(2)  # patch rows the box spans
    cols = obj.any(1).view(B, w, W // w).any(2)
    return (rows[:, :, None] & cols[:, None, :]).flatten(1).float(), target


@torch.no_grad()
def evaluate(model, preset, root=None, n_val: int = 1000, batch: int = 250) -> dict:
    """Validation metrics of a toy CLIP on the first ``n_val`` val images.

    * ``zeroshot_top1_in_image``: the class-token image embedding's top-1 class (against text
      features from the preset's caption templates) is one of the image's classes;
    * ``zeroshot_top1_single``: accuracy on images with exactly one object;
    * ``maskclip_miou`` (mmseg definition, %) of the dense MaskCLIP logits, with the 85 CLIP
      prompt templates (``reclip_core.text.PROMPT_TEMPLATES``) and with the caption templates.
    """
    from reclip_core.backbone import dense_features
    from reclip_core.datasets.toyworld import load_preset, mask_to_label
    from reclip_core.metrics import SegMetric
    from reclip_core.text import PROMPT_TEMPLATES, text_embeddings

    p = load_preset(preset)
    names = [c["name"] for c in p["classes"]]
    C = len(names)
    was_training = model.training
    model.eval()
    images, masks, _ = decode_split(p, "val", root=root, limit=n_val)
    labels = torch.from_numpy(mask_to_label(masks.numpy()))
    text_cap = text_embeddings(model, names, p["captions"]["templates"])
    text_85 = text_embeddings(model, names, PROMPT_TEMPLATES)
    in_image, single_ok, single_n = 0, 0, 0
    seg = {"captions": SegMetric(C), "clip85": SegMetric(C)}
    for s in range(0, len(images), batch):
        x = to_input(images[s:s + batch])
        lab = labels[s:s + batch]
        emb = F.normalize(model.encode_image(x), dim=-1)
        top1 = (emb @ text_cap.T).argmax(-1)
        for k in range(len(x)):
            present = set(lab[k][lab[k] != 255].unique().tolist())
            in_image += int(top1[k].item() in present)
            if len(present) == 1:
                single_n += 1
                single_ok += int(top1[k].item() in present)
        feat, _ = dense_features(model, x)
        for key, text in (("captions", text_cap), ("clip85", text_85)):
            logits = torch.einsum("bdhw,cd->bchw", feat, text)
            logits = F.interpolate(logits, size=lab.shape[-2:], mode="bilinear", align_corners=False)
            seg[key].update(logits.argmax(1), lab)
    model.train(was_training)
    t85 = seg["clip85"].table()
    return {
        "n_val": int(len(images)),
        "zeroshot_top1_in_image": in_image / len(images),
        "zeroshot_top1_single": single_ok / max(1, single_n),
        "maskclip_miou_clip85_templates": float(seg["clip85"].miou()),
        "maskclip_miou_caption_templates": float(seg["captions"].miou()),
        "maskclip_iou_per_class_clip85": {str(k): round(float(v), 2)
                                           for k, v in zip(names, t85["iou"].tolist())},
    }


def train(args) -> dict:
    from open_clip.loss import ClipLoss
    from tqdm import tqdm

    from reclip_core.atomic_io import atomic_save_safetensors, atomic_write_json
    from reclip_core.backbone import image_and_dense_features
    from reclip_core.datasets.toyworld import GENERATOR_VERSION, load_preset, preset_hash
    from reclip_core.toy_clip import (CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, build_toy_clip,
                                      load_toy_config, sha256_file, toy_clip_dir)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    preset = load_preset(args.preset)
    out_dir = Path(args.out) if args.out else toy_clip_dir(preset["name"])
    config = load_toy_config(args.config)

    t_load = time.time()
    images, masks, captions = decode_split(preset, "pretrain", root=args.data_root, limit=args.limit)
    model = build_toy_clip(config)
    tokens = model.tokenizer(captions)
    unk = (tokens == model.tokenizer.unk_token_id).any(1).float().mean().item()
    print(f"pretrain: {len(images)} images, {len(set(captions))} distinct captions, "
          f"{unk:.1%} with <unk>, loaded in {time.time() - t_load:.0f}s", flush=True)

    class_names = [c["name"] for c in preset["classes"]]
    templates = preset["captions"]["templates"]
    model.train()
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(args.seed)
    n = len(images)
    perm, pos = torch.randperm(n, generator=gen), 0
    losses = []
    t0 = time.time()
    bar = tqdm(range(args.steps), desc=f"toy CLIP {preset['name']}", unit="step",
               mininterval=5.0, file=sys.stdout)
    for step in bar:
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        # bf16 autocast (--amp bf16) runs the matmuls in bfloat16 where the CPU has native support
        # (AVX512-BF16/AMX); weights, optimizer state and the loss stay float32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            if args.dense_weight or args.region_weight:  # one forward gives both
                img_f, dense, hw = image_and_dense_features(model, to_input(images[idx]))
            else:
                img_f = model.encode_image(to_input(images[idx]), normalize=True)
            txt_f = model.encode_text(tokens[idx], normalize=True)
            if args.region_weight:
                template = templates[int(torch.randint(len(templates), (1,), generator=gen))]
                class_f = model.encode_text(model.tokenizer([template.format(c) for c in class_names]),
                                            normalize=True)
        scale = model.logit_scale.exp()
        loss = loss_fn(img_f.float(), txt_f.float(), scale)
        if args.dense_weight:  # the whole image's mean dense feature against its caption
            loss = loss + args.dense_weight * loss_fn(F.normalize(dense.float().mean(1), dim=-1),
                                                      txt_f.float(), scale)
        if args.region_weight:  # one object's box-pooled dense feature against the class captions
            weight, target = box_regions(masks[idx], hw, gen)
            pooled = F.normalize((dense.float() * weight.unsqueeze(-1)).sum(1), dim=-1)
            loss = loss + args.region_weight * F.cross_entropy(scale * pooled @ class_f.float().T, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}",
                            scale=f"{model.logit_scale.exp().item():.1f}",
                            ips=f"{(step + 1) * args.batch_size / (time.time() - t0):.0f}")
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            m = evaluate(model, preset, root=args.data_root, n_val=300)
            print(f"\nstep {step}: " + json.dumps({k: round(v, 3) for k, v in m.items()
                                                   if isinstance(v, float)}), flush=True)
    wall = time.time() - t0
    bar.close()

    metrics = evaluate(model, preset, root=args.data_root, n_val=args.n_val)
    metrics["train_loss_last50"] = float(np.mean(losses[-50:]))
    metrics["logit_scale"] = float(model.logit_scale.exp().item())
    print("final: " + json.dumps(metrics, indent=1), flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    weights = out_dir / WEIGHTS_FILE
    atomic_save_safetensors(state, weights, metadata={"format": "pt", "preset": preset["name"]})
    atomic_write_json(out_dir / CONFIG_FILE, config, indent=2)
    import open_clip

    manifest = {
        "model": "toy CLIP (open_clip.CLIP), config.json beside the weights",
        "preset": preset["name"],
        "preset_hash": preset_hash(preset),
        "data_hash": preset_hash(preset),
        "data_note": "the toy world is a deterministic function of the preset content and the "
                     f"generator version ({GENERATOR_VERSION}); data_hash is that hash",
        "pretrain_images": int(n),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "images_seen": int(args.steps * args.batch_size),
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.98], "eps": 1e-6,
                      "weight_decay": args.weight_decay, "warmup_steps": args.warmup,
                      "schedule": "linear warm-up, cosine to 0"},
        "loss": "open_clip.loss.ClipLoss",
        "dense_weight": args.dense_weight,
        "region_weight": args.region_weight,
        "threads": args.threads,
        "amp": args.amp,
        "wall_time_s": round(wall, 1),
        "images_per_s": round(args.steps * args.batch_size / wall, 1),
        "metrics": metrics,
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                     "python": platform.python_version()},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sha256": sha256_file(weights),
        "weights_bytes": weights.stat().st_size,
    }
    atomic_write_json(out_dir / MANIFEST_FILE, manifest, indent=2)
    print(f"wrote {out_dir} (sha256 {manifest['sha256'][:16]}..., {wall / 60:.1f} min)")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="biased", help="toy-world preset (biased|uniform|path)")
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    ap.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    ap.add_argument("--amp", choices=["none", "bf16"], default=DEFAULTS["amp"],
                    help="bf16 autocast for the forward (faster on CPUs with native bfloat16)")
    ap.add_argument("--dense-weight", type=float, default=DEFAULTS["dense_weight"],
                    help="weight of a second contrastive loss on the mean MaskCLIP dense feature")
    ap.add_argument("--region-weight", type=float, default=DEFAULTS["region_weight"],
                    help="weight of the region-caption loss on box-pooled MaskCLIP dense features")
    ap.add_argument("--out", default=None, help="output folder (default reclip_core/pretrained/"
                    "toy_clip[_<preset>])")
    ap.add_argument("--config", default=None, help="model config JSON (default "
                    "reclip_core/configs/toy_clip.json)")
    ap.add_argument("--data-root", default=None, help="toy-world cache root")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N pretrain images")
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=0, help="quick val check every N steps")
    args = ap.parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
