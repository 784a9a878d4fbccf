"""Release-style paths, written from the project's method description (docs/method.md).

These reproduce the *schedule of computation* of the authors' release as docs/method.md
describes it, on the same weights and with the same arithmetic as ours, so that a timing
difference is a difference of schedule only:

- evaluation: the Reference-prompt text features (C prompts × 77 tokens through the CLIP text
  encoder) and the positional feature are recomputed on **every forward**, although the bias map
  depends only on the input size (method.md §2: "for a given input size it can be computed
  once"); a per-image prediction file is written during evaluation;
- hypotheses: **one CLIP forward per sliding window** (method.md §3: "The release runs one
  forward per window; 88–1,081 windows per image");
- training: **batch 1** (method.md §3 table: batch 1 for VOC, Context, ADE, COCO-Stuff) and the
  loss as a **Python loop over the hypothesis classes** of each image (method.md §3, "For every
  class k of the image's hypothesis ...").

No code of the release is reproduced here; every function below follows the wording of
method.md and reuses the project's building blocks (the same modules, hence the same weights).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reclip_core.backbone import dense_features, encode_image_cls
from reclip_core.loss import gumbel_softmax_hard
from reclip_core.metrics import SegMetric
from reclip_core.rectify import bias_logits, clip_logits, presence_filter, rectify


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def release_forward(model, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """ReCLIP++ forward with the bias recomputed every call: dense features, CLIP logits, the
    positional feature of the resized positional embedding, the Reference-prompt features
    through the text encoder, the bias map, rectification, decoder."""
    feat, hw = dense_features(model.clip, images, ln_eps=model.ln_eps, cls_token=model.cls_token)
    logits = clip_logits(feat, model.text)
    pe_feat = model.positional(hw)          # recomputed per forward
    ref = model.reference()                 # C × 77 tokens through the text encoder, per forward
    bias = bias_logits(pe_feat, ref)
    rectified = rectify(logits, bias)
    out = model.decoder(feat, rectified) if model.use_decoder else rectified
    return {"feat": feat, "clip_logits": logits, "rectified": rectified, "logits": out}


@torch.no_grad()
def release_eval_image(model, item: dict, test_size: int, pd_threshold: float, pred_dir: Path, metric: SegMetric,
                       on_forward: Optional[Callable[[str, Optional[torch.Tensor]], None]] = None) -> None:
    """One evaluation image the release way: test-size resize, forward with the bias recomputed
    (:func:`release_forward`), PD, bilinear upsampling to the label size, argmax, a prediction PNG
    in ``pred_dir``, and the metric of the PD'd prediction. Uses the library's preprocessing and
    upsampling so the numbers equal ours. ``on_forward("start"|"end", tensor)`` brackets the
    forward (for timing)."""
    from reclip_core.evaluation import upsample_logits
    from reclip_core.transforms import eval_preprocess

    patch = model.clip.visual.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    label = np.asarray(item["label"])
    x = eval_preprocess(item["image"], test_size).to(model.clip.visual.conv1.weight.device)
    if on_forward:
        on_forward("start", x)
    logits = release_forward(model, x)["logits"]
    if on_forward:
        on_forward("end", logits)
    logits = presence_filter(logits, pd_threshold)
    up = upsample_logits(logits, patch, tuple(x.shape[-2:]), tuple(label.shape[-2:]))
    pred = up.argmax(dim=1)[0].cpu()
    Image.fromarray(pred.numpy().astype(np.uint8 if model.num_classes <= 256 else np.uint16)).save(
        Path(pred_dir) / f"{item['id']}.png")
    metric.update(pred, torch.from_numpy(label.astype(np.int64)))


@torch.no_grad()
def release_evaluate(model, dataset, test_size: int, pd_threshold: float, pred_dir: Path,
                     on_forward: Optional[Callable[[str, Optional[torch.Tensor]], None]] = None) -> SegMetric:
    """:func:`release_eval_image` over a labelled dataset → the dataset-level metric (PD)."""
    model.eval()
    metric = SegMetric(model.num_classes)
    for i in range(len(dataset)):
        release_eval_image(model, dataset[i], test_size, pd_threshold, pred_dir, metric, on_forward)
    return metric


# ---------------------------------------------------------------------------------------------
# Hypotheses
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def release_hypothesis(clip, image, text: torch.Tensor, window: int, stride: int, input_size: int,
                       ln_eps=None, cls_token=None) -> Tuple[List[int], List[int]]:
    """One CLIP image forward per window: each window is cropped and preprocessed on its own
    (the library's ``crop_windows`` with one box) and encoded alone. Returns (sorted hypothesis
    classes, per-window top-1 votes in window order)."""
    from reclip_core.transforms import crop_windows, to_image_tensor, window_boxes

    img = to_image_tensor(image)
    device = clip.visual.conv1.weight.device
    text = text.to(device)
    votes = []
    for box in window_boxes(img.shape[-2], img.shape[-1], window, stride):
        x = crop_windows(img, [box], window, input_size).to(device)  # [1, 3, S, S]
        emb = encode_image_cls(clip, x, ln_eps=ln_eps, cls_token=cls_token)
        votes.append(int((emb.float() @ text.float().t()).argmax(dim=-1)))
    return sorted(set(votes)), votes


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def release_loss_from_masks(masks: torch.Tensor, feat: torch.Tensor, text: torch.Tensor,
                            hypothesis: Sequence[int], score_scale: float = 100.0) -> torch.Tensor:
    """Loss of ONE image given its hard Gumbel masks ``masks`` [1, C, h, w]: a Python loop over
    the hypothesis classes k: pooled_k = Σ feat·m_k / (h·w); scores_k = 100·pooled_k·textᵀ;
    cross-entropy(scores_k, k); mean over k (method.md §3)."""
    _, _, h, w = masks.shape
    feat = feat.float()
    losses = []
    for k in hypothesis:
        pooled = (feat[0] * masks[0, k]).sum(dim=(1, 2)) / (h * w)          # [D]
        scores = score_scale * pooled @ text.float().t()                     # [C]
        target = torch.tensor([int(k)], device=scores.device)
        losses.append(F.cross_entropy(scores.unsqueeze(0), target))
    if not losses:
        return masks.sum() * 0.0
    return torch.stack(losses).mean()


def release_loss(logits: torch.Tensor, feat: torch.Tensor, text: torch.Tensor, hypothesis: Sequence[int],
                 gumbel_scale: float = 100.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Loss of ONE image ([1, C, h, w] logits): hard Gumbel-Softmax(gumbel_scale·logits, τ=1)
    over classes, then the per-class loop of :func:`release_loss_from_masks`."""
    masks = gumbel_softmax_hard(gumbel_scale * logits, tau=1.0, dim=1, generator=generator)
    return release_loss_from_masks(masks, feat, text, hypothesis)


def release_train_step(model, optimizer, image: torch.Tensor, hypothesis: Sequence[int],
                       generator: Optional[torch.Generator] = None) -> float:
    """One optimiser step at batch 1: forward (Reference features recomputed, as they must be
    while training), per-class-loop loss, backward, SGD step."""
    out = release_forward(model, image)
    loss = release_loss(out["logits"], out["feat"], model.text, hypothesis,
                        gumbel_scale=model.gumbel_scale, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def release_train_epoch(model, optimizer, views, epoch: int, device: torch.device, seed: int = 0) -> List[float]:
    """One epoch at batch 1 over the library's label-free views (``TrainViews``; the release has
    no feature cache). Each image's Gumbel
    noise comes from a generator seeded like the library's training step
    (``sample_seed(seed, "gumbel", epoch, index)``), so both paths draw the same masks."""
    from reclip_core.transforms import sample_seed

    model.train()
    views.epoch = epoch
    losses = []
    for i in range(len(views)):
        item = views[i]
        g = torch.Generator(device=device).manual_seed(sample_seed(seed, "gumbel", epoch, i))
        hyp = item["hyp"].nonzero().flatten().tolist()
        losses.append(release_train_step(model, optimizer, item["image"].unsqueeze(0).to(device), hyp, g))
    return losses


__all__ = ("release_forward", "release_eval_image", "release_evaluate", "release_hypothesis", "release_loss",
           "release_loss_from_masks", "release_train_step", "release_train_epoch")
