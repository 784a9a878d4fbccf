"""Training of the bias-rectification heads (method.md §3) — single process or DDP (torchrun).

What makes a run reproducible and exactly resumable:

* every random draw is a pure function of ``(seed, purpose, epoch, sample index)``: the
  augmentation of a view (:class:`TrainViews`), the Gumbel noise of its loss (one generator per
  image), and the sample order (``DistributedSampler(seed=seed)`` + ``set_epoch``, also used with
  one process);
* the poly learning rate depends only on the epoch;
* a checkpoint holds the trainable weights *and buffers* (BatchNorm statistics), the optimizer's
  momentum, and the position (epoch, batch within the epoch).

So a run interrupted after any checkpoint and resumed ends with the same weights as an
uninterrupted one, and a DDP run with N processes follows the 1-process loss trajectory at equal
global batch: each process takes every N-th sample of the same permutation, the loss is the mean
over all images of the global batch (via an all-reduced image count), and the decoder's BatchNorm
uses statistics of the global batch (:class:`GlobalBatchNorm2d`, which also works with gloo on CPU,
where ``nn.SyncBatchNorm`` does not).

Training never sees a label: :class:`TrainViews` reads only ``item["id"]`` and ``item["image"]``
and refuses items that carry a ``label`` or ``mask``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from .hypothesis import Head, require_some_hypothesis  # shared with the hypothesis pass
from .atomic_io import StaleFileError, atomic_save_safetensors, atomic_write_csv, atomic_write_json
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .checkpoint_checks import checkpoint_identity, validate_weights
from .transforms import TrainTransform, sample_seed, train_transform_from_config

LABEL_KEYS = ("label", "mask", "labels", "masks", "seg", "gt")
# Keys that may change between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = ("epoch", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "device",
                    "output_dir", "data_root", "max_val_images", "val_split", "hypothesis_batch_size",
                    "num_threads", "eval_batch_size")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def check_unlabeled(item: Mapping[str, Any]) -> None:
    """Refuse a dataset item that carries a label: the training path must never see one."""
    leaked = [k for k in LABEL_KEYS if k in item]
    if leaked:
        raise ValueError(f"training received an item with {leaked}: training is unsupervised and must only "
                         "get {'id', 'image'} items. Use the dataset's unlabeled train split (train_split).")


class TrainViews(Dataset):
    """Augmented, label-free training views with their image-level hypotheses.

    Item ``i`` at epoch ``e`` → ``{"index": i, "image": [3, crop, crop], "hyp": bool [C]}``; the view
    is drawn with seed ``sample_seed(seed, "aug", e, i)`` (set ``views.epoch`` before each epoch).
    With ``fixed_view=v`` the view does not change with the epoch (seed ``(seed, "view", v, i)``):
    that is what the feature cache stores.
    """

    def __init__(self, dataset, hypotheses: Mapping[str, Sequence[int]], num_classes: int,
                 transform: TrainTransform, seed: int = 0):
        self.dataset = dataset
        self.hypotheses = hypotheses
        self.num_classes = int(num_classes)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.fixed_view: Optional[int] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def view_seed(self, index: int) -> int:
        if self.fixed_view is not None:
            return sample_seed(self.seed, "view", self.fixed_view, index)
        return sample_seed(self.seed, "aug", self.epoch, index)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.dataset[index]
        check_unlabeled(item)
        image_id = str(item["id"])
        if image_id not in self.hypotheses:
            raise KeyError(f"no hypothesis for image {image_id!r}: compute hypotheses for the training split first "
                           "(`python -m reclip_core hypothesis --config ...`).")
        hyp = torch.zeros(self.num_classes, dtype=torch.bool)
        for c in self.hypotheses[image_id]:
            hyp[int(c)] = True
        return {"index": index, "image": self.transform(item["image"], self.view_seed(index)), "hyp": hyp}


class CachedViews(Dataset):
    """Frozen CLIP features of ``V`` fixed views per image; epoch ``e`` uses view ``e % V``."""

    def __init__(self, feats: torch.Tensor, hyps: torch.Tensor):
        self.feats, self.hyps = feats, hyps  # [V, N, D, h, w] (float16), [N, C] bool
        self.epoch = 0

    def __len__(self) -> int:
        return self.feats.shape[1]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        v = self.epoch % self.feats.shape[0]
        return {"index": index, "feat": self.feats[v, index].float(), "hyp": self.hyps[index]}




# ------------------------------------------------------------------------------------------------
# Distributed helpers
# ------------------------------------------------------------------------------------------------
def dist_info() -> Tuple[int, int]:
    """(world size, rank); (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def init_distributed_from_env(device: str = "auto") -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1): NCCL with
    CUDA, gloo otherwise. Returns True when a group is (now) initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable all-reduce (sum); its backward sums the gradients of all processes.

    ``torch.distributed.nn.functional.all_reduce`` is deprecated in torch 2.14 in favour of the
    functional collectives, whose autograd support is still marked private; torch is pinned, so
    we keep the documented one and silence its FutureWarning."""
    import warnings

    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the whole global batch of a DDP run.

    Same parameters and buffers as ``nn.BatchNorm2d`` (checkpoints are interchangeable); with one
    process it *is* ``nn.BatchNorm2d``. With several, mean and variance are all-reduced
    (differentiably, two passes for accuracy); this works with gloo on CPU, unlike
    ``nn.SyncBatchNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world, _ = dist_info()
        if not self.training or world == 1:
            return super().forward(x)
        C = x.shape[1]
        count = torch.tensor([x.numel() / C], dtype=x.dtype, device=x.device)
        stats = _all_reduce_sum(torch.cat([x.sum(dim=(0, 2, 3)), count]))
        n = stats[C]
        mean = stats[:C] / n
        centred = x - mean.view(1, C, 1, 1)
        var = _all_reduce_sum(centred.pow(2).sum(dim=(0, 2, 3))) / n  # biased, used for normalising
        with torch.no_grad():
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / max(float(n) - 1, 1.0))
        y = centred / torch.sqrt(var + self.eps).view(1, C, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        return y


def use_global_batchnorm(model: nn.Module) -> nn.Module:
    """Switch every BatchNorm2d outside the frozen CLIP to :class:`GlobalBatchNorm2d` (in place)."""
    for name, module in model.named_modules():
        if not name.startswith("clip") and type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
    return model


# ------------------------------------------------------------------------------------------------
# Model and schedule
# ------------------------------------------------------------------------------------------------
def build_model(cfg: Mapping[str, Any], clip: Optional[nn.Module] = None, device: Any = None,
                kind: Optional[str] = None) -> nn.Module:
    """The segmenter a config describes (``kind`` overrides ``cfg["model"]``; ``"maskclip"`` too)."""
    from .backbone import load_clip, resolve_device
    from .config import resolve_class_names, resolve_templates
    from .model import ReCLIP, ReCLIPPP, MaskCLIP

    dev = resolve_device(device if device is not None else cfg["device"])
    if clip is None:
        if cfg["clip"]["pretrained"] is None:
            torch.manual_seed(cfg["seed"])  # a random CLIP must be the same in every command and process
        clip = load_clip(cfg["clip"]["arch"], cfg["clip"]["pretrained"], device=dev)
        # Building a CLIP draws from the RNG (random init before its weights are loaded): reseed so
        # the heads start from the same state whether the CLIP was loaded here (the CLI) or passed
        # in (the notebooks' Lab). Without this the same config trained to 6.4 vs 21.4 mIoU.
        torch.manual_seed(cfg["seed"])
    names, templates = resolve_class_names(cfg), resolve_templates(cfg)
    common = dict(templates=templates, ln_eps=cfg["clip"]["ln_eps"], cls_token=cfg["clip"]["cls_token"])
    kind = kind or cfg["model"]
    if kind == "reclip++":
        model = ReCLIPPP(clip, names, use_decoder=cfg["use_decoder"], bias_mode=cfg["bias_mode"], **common)
    elif kind == "reclip":
        model = ReCLIP(clip, names, **common)
    elif kind == "maskclip":
        model = MaskCLIP(clip, names, **common)
    else:
        raise ValueError(f"unknown model kind {kind!r}; use 'reclip++', 'reclip' or 'maskclip'.")
    if cfg["gumbel_scale"] is not None and kind != "maskclip":  # > 0, checked with the config
        model.gumbel_scale = float(cfg["gumbel_scale"])  # an instance attribute shadows the class constant
    if kind != "maskclip":
        from .rectify import presence_rule

        model.loss_normalisation = cfg.get("loss_normalisation", "nonempty")
        rule = presence_rule(cfg, kind)
        if rule != (float(cfg["pd_threshold"]), 10.0):
            model.pd_rule = rule  # the PD of this model's own heads (evaluation.evaluate reads it)
    if cfg["score_scale"] is not None and kind != "maskclip":
        # 'clip': the loss scores regions on this CLIP's own temperature. The method's 100 *is*
        # OpenAI CLIP's; on a CLIP that learned a lower one (the toy CLIP: 20.8) 100 saturates the
        # cross-entropy, which then prefers CLIP's own argmax to the hypotheses (docs/training.md).
        from .backbone import logit_scale

        model.score_scale = logit_scale(clip) if cfg["score_scale"] == "clip" else float(cfg["score_scale"])
    return model.to(dev)


def poly_lr(base_lr: float, epoch: int, max_epoch: int, power: float = 0.9) -> float:
    """Poly decay per epoch: base_lr · (1 − epoch/max_epoch)^power (epoch counted from 0)."""
    return base_lr * (1.0 - epoch / max_epoch) ** power


def config_fingerprint(cfg: Mapping[str, Any], clip: Optional[nn.Module] = None) -> Dict[str, Any]:
    """The part of a config that must match for a resumed run to continue the same computation,
    plus the frozen CLIP's weight digest (the config names the weights, e.g. ``pretrained: biased``,
    but retrained weights under the same name are another computation)."""
    fp = {k: v for k, v in dict(cfg).items() if k not in RESUME_FREE_KEYS}
    if clip is not None:
        from .backbone import clip_fingerprint

        fp["clip_weights"] = clip_fingerprint(clip)
    return fp


# ------------------------------------------------------------------------------------------------
# Feature cache
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def build_feature_cache(model: nn.Module, views: TrainViews, n_views: int, batch_size: int, device: torch.device,
                        path: Optional[Path] = None, progress: bool = True) -> CachedViews:
    """Dense CLIP features of ``n_views`` fixed views of every image, stored as float16 (memory:
    N · V · D · (crop/patch)² · 2 bytes). Reused from ``path`` when it was built with the same key."""
    from tqdm.auto import tqdm

    from .provenance import feature_cache_key, load_feature_cache

    key = feature_cache_key(model, views, n_views)  # a cache may be shared between runs (feature_cache_path)
    t = load_feature_cache(path, key) if path is not None else None
    if t is not None:
        return CachedViews(t["feats"], t["hyps"].bool())
    feats, hyps = [], None
    model.eval()
    bar = tqdm(total=n_views * len(views), desc="feature cache", disable=not progress, unit="view")
    for v in range(n_views):
        views.fixed_view = v
        per_view, per_hyp = [], []
        for start in range(0, len(views), batch_size):
            items = [views[i] for i in range(start, min(start + batch_size, len(views)))]
            x = torch.stack([it["image"] for it in items]).to(device)
            f, _ = model.features(x)
            per_view.append(f.to(torch.float16).cpu())
            per_hyp.append(torch.stack([it["hyp"] for it in items]))
            bar.update(len(items))
        feats.append(torch.cat(per_view))
        hyps = torch.cat(per_hyp)
    bar.close()
    views.fixed_view = None
    cache = CachedViews(torch.stack(feats), hyps)
    if path is not None:
        atomic_save_safetensors({"feats": cache.feats, "hyps": cache.hyps.to(torch.uint8)}, path, metadata={"key": key})
    return cache


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    steps: int
    last_loss: float
    checkpoint: Optional[Path]
    losses: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def train(cfg: Mapping[str, Any], *, run_dir: Optional[os.PathLike] = None, **kwargs: Any) -> TrainResult:
    """Train the model of ``cfg`` on the unlabeled ``train_split`` with its hypotheses (see :func:`_train`
    for the arguments), holding the run folder's lock: a second writer is refused
    (:class:`~reclip_core.run_lock.RunFolderLocked`) instead of interleaving with this one."""
    from .run_lock import run_folder_lock

    run = Path(run_dir) if run_dir is not None else Path(cfg["output_dir"] or Path("runs") / getattr(cfg, "name", "custom"))
    with run_folder_lock(run, "train"):
        return _train(cfg, run_dir=run, **kwargs)


def _train(
    cfg: Mapping[str, Any],
    *,
    dataset=None,
    hypotheses: Optional[Mapping[str, Sequence[int]]] = None,
    clip: Optional[nn.Module] = None,
    run_dir: Optional[os.PathLike] = None,
    resume: bool = True,
    progress: bool = True,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> TrainResult:
    """Train the model of ``cfg`` on the unlabeled ``train_split`` with its hypotheses.

    ``dataset``/``hypotheses``/``clip`` default to the config's reader, ``<run>/hypotheses.json``
    and ``load_clip(cfg.clip...)``. Writes ``<run>/checkpoints`` (end of every epoch, and every
    ``checkpoint_every`` steps), ``<run>/loss.csv`` (one row per step) and
    ``<run>/train_summary.json``. With ``resume`` an existing checkpoint of the same config is
    continued exactly. ``callback`` is called after each step with a dict (tests use it to
    interrupt a run). Under torchrun (an initialised process group) it trains with DDP.
    """
    from .backbone import resolve_device
    from .config import build_dataset, resolve_class_names
    from .hypothesis import load_hypotheses

    t0 = time.monotonic()
    world, rank = dist_info()
    run = Path(run_dir) if run_dir is not None else Path(cfg["output_dir"] or Path("runs") / getattr(cfg, "name", "custom"))
    ckpt_dir = run / "checkpoints"
    device = resolve_device(cfg["device"])
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cfg["batch_size"] % world:
        raise ValueError(f"batch_size {cfg['batch_size']} is the global batch: it must be divisible by the "
                         f"number of processes ({world}).")
    per_rank = cfg["batch_size"] // world

    names = resolve_class_names(cfg)
    if dataset is None:
        dataset = build_dataset(cfg, cfg["train_split"])
    if cfg["max_train_images"] is not None:
        dataset = Head(dataset, cfg["max_train_images"])
    # The label guard holds on every path, also when the feature cache means no view is ever read.
    if len(dataset):
        check_unlabeled(dataset[0])
    hyp_file = hypotheses is None
    if hyp_file:
        hypotheses = load_hypotheses(run / "hypotheses.json", names)
    require_some_hypothesis(hypotheses, dataset, run / "hypotheses.json")

    torch.manual_seed(cfg["seed"])  # identical head initialisation on every rank
    model = build_model(cfg, clip=clip, device=device)
    if hyp_file:  # made with this CLIP, window, mode and templates, from these images?
        from .provenance import check_hypothesis_file

        check_hypothesis_file(run / "hypotheses.json", cfg, model.clip, dataset)
    fingerprint = _jsonable(config_fingerprint(cfg, model.clip))  # hashes CLIP weights: once per run
    identity = checkpoint_identity(model)  # what evaluate/segment check the heads against
    _ = model.text  # text features once, before any wrapping
    views = TrainViews(dataset, hypotheses, len(names), train_transform_from_config(cfg), seed=cfg["seed"])
    data: Dataset = views
    if cfg["feature_cache"]:
        cache_path = Path(cfg["feature_cache_path"]) if cfg["feature_cache_path"] else run / "feature_cache.safetensors"
        if rank == 0:
            build_feature_cache(model, views, cfg["feature_cache_views"], max(per_rank, 16), device, cache_path, progress)
        if world > 1:
            dist.barrier()
        data = build_feature_cache(model, views, cfg["feature_cache_views"], max(per_rank, 16), device, cache_path, False)
    if world > 1:
        use_global_batchnorm(model)

    params = model.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])

    start_epoch, skip_batches, global_step, rows, last_loss = 0, 0, 0, [], float("nan")
    latest = find_checkpoint(ckpt_dir) if resume else None
    if latest is not None:
        ck = load_checkpoint(ckpt_dir)
        if ck.state.get("fingerprint") != fingerprint or ck.state.get("identity") != identity:
            raise StaleFileError(run, f"{ckpt_dir} holds a run with a different config (or one written before "
                                 "checkpoints recorded their CLIP weights and templates); use another output_dir "
                                 "or pass resume=False (--no-resume) to start over.")
        validate_weights(ck.weights, model, ckpt_dir / ck.state["weights"])
        model.load_trainable_state_dict({k: v.to(device) for k, v in ck.weights.items()})
        optimizer.load_state_dict(ck.optimizer)
        start_epoch, skip_batches, global_step = ck.state["epoch"], ck.state["step_in_epoch"], ck.state["step"]
        rows = _read_losses(run / "loss.csv", global_step)
        last_loss = float(ck.state.get("loss", float("nan")))
        _log(rank, f"resuming from {latest} (epoch {start_epoch}, batch {skip_batches}, step {global_step})")
    elif resume is False and ckpt_dir.exists() and rank == 0:
        _log(rank, f"--no-resume: starting over; {ckpt_dir} will be overwritten")

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False)  # BN statistics are already global: no per-step broadcast

    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"], drop_last=True)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} training images are fewer than one global batch of {cfg['batch_size']}.")

    def state(epoch: int, step_in_epoch: int, finished: bool, loss: float) -> Dict[str, Any]:
        return {"epoch": epoch, "step_in_epoch": step_in_epoch, "step": global_step, "finished": finished,
                "loss": loss, "steps_per_epoch": steps_per_epoch, "world_size": world,
                "class_names": names, "config": _jsonable(dict(cfg)),
                "fingerprint": fingerprint, "identity": identity, "torch": torch.__version__,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def checkpoint(epoch: int, step_in_epoch: int, finished: bool, loss: float) -> None:
        weights = model.trainable_state_dict()
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # a finite loss does not prove finite weights (e.g. a huge lr): never save them as "good"
            raise NonFiniteLossError(
                f"training stopped: the trained tensors {bad[:3]} became non-finite by step {global_step} although the "
                f"loss was finite; they were not saved. {_retry_advice(find_checkpoint(ckpt_dir))}")
        if rank == 0:
            save_checkpoint(ckpt_dir, weights, state(epoch, step_in_epoch, finished, loss),
                            optimizer.state_dict(), keep=cfg["keep_checkpoints"])
            _write_losses(run / "loss.csv", rows)
        if world > 1:
            dist.barrier()

    epochs_to_run = cfg["epoch"]
    for epoch in range(start_epoch, epochs_to_run):
        lr = poly_lr(cfg["lr"], epoch, cfg["max_epoch"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch)
        data.epoch = epoch  # seeds the views of this epoch (pure function of seed, epoch, index)
        batches = list(BatchSampler(sampler, per_rank, drop_last=True))[skip_batches:]
        loader = DataLoader(data, batch_sampler=batches, num_workers=cfg["num_workers"])
        model.train()
        for it, batch in enumerate(loader, start=skip_batches):
            loss_value, n_images = _step(net, model, optimizer, batch, device, cfg["seed"], epoch, world,
                                         cfg.get("loss_normalisation", "nonempty"))
            if not math.isfinite(loss_value):
                _write_losses(run / "loss.csv", rows) if rank == 0 else None
                raise NonFiniteLossError(
                    f"training stopped: non-finite loss or gradient ({loss_value}) at epoch {epoch + 1}, batch {it + 1} "
                    f"(step {global_step + 1}). The weights were not updated. {_retry_advice(find_checkpoint(ckpt_dir))}")
            global_step += 1
            last_loss = loss_value
            rows.append({"step": global_step, "epoch": epoch + 1, "iteration": it + 1, "lr": lr,
                         "loss": loss_value, "images": n_images, "elapsed_s": round(time.monotonic() - t0, 3)})
            if rank == 0 and (global_step % cfg["log_every"] == 0):
                _write_losses(run / "loss.csv", rows)
                if progress:
                    _log(rank, f"epoch {epoch + 1}/{epochs_to_run} it {it + 1}/{steps_per_epoch} "
                               f"loss {loss_value:.4f} lr {lr:.5f}")
            done_epoch = it + 1 == steps_per_epoch
            if cfg["checkpoint_every"] and global_step % cfg["checkpoint_every"] == 0 and not done_epoch:
                checkpoint(epoch, it + 1, False, loss_value)
            if callback is not None:
                callback({"epoch": epoch, "iteration": it, "step": global_step, "loss": loss_value})
        skip_batches = 0
        checkpoint(epoch + 1, 0, epoch + 1 == epochs_to_run, last_loss)
        _log(rank, f"epoch {epoch + 1}/{epochs_to_run} done: loss {last_loss:.4f} "
                   f"({time.monotonic() - t0:.1f}s)")

    seconds = time.monotonic() - t0
    if rank == 0:
        _write_losses(run / "loss.csv", rows)
        atomic_write_json(run / "train_summary.json", {
            "epochs": epochs_to_run, "steps": global_step, "last_loss": last_loss, "seconds": seconds,
            "world_size": world, "images": len(data), "checkpoint": str(find_checkpoint(ckpt_dir))})
    return TrainResult(run, epochs_to_run, global_step, last_loss, find_checkpoint(ckpt_dir), rows, seconds)


def _step(net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Dict[str, torch.Tensor],
          device: torch.device, seed: int, epoch: int, world: int,
          normalisation: str = "nonempty") -> Tuple[float, int]:
    """One optimisation step; returns (global mean loss, images with a hypothesis in the global batch).

    ``normalisation``: the loss is the sum over the global batch divided by the images with a
    hypothesis ("nonempty") or by the global batch size ("batch", the release's divisor).

    The loss of each image uses its own Gumbel generator (seeded by seed, epoch, index), so the
    noise of an image does not depend on which process or batch position it lands in."""
    hyp = batch["hyp"].to(device)
    if "feat" in batch:
        out = net(feat=batch["feat"].to(device))
    else:
        out = net(images=batch["image"].to(device))
    per_image = []
    for j, index in enumerate(batch["index"].tolist()):
        g = torch.Generator(device=out["logits"].device).manual_seed(sample_seed(seed, "gumbel", epoch, index))
        sub = {"logits": out["logits"][j:j + 1], "feat": out["feat"][j:j + 1]}
        per_image.append(model.loss(sub, hyp[j:j + 1], generator=g))
    local_sum = torch.stack(per_image).sum()
    counts = torch.stack([hyp.any(dim=1).sum().to(torch.float64), local_sum.detach().to(torch.float64)])
    if world > 1:
        dist.all_reduce(counts)
    n_global, sum_global = int(counts[0].item()), float(counts[1].item())
    # Each process's loss is scaled so that DDP's gradient average equals the gradient of the
    # global loss Σ_images loss_i / n; n counts the images with a hypothesis, or every image of the
    # global batch with "batch" (an empty hypothesis then adds 0 but counts).
    divisor = max(n_global, 1) if normalisation == "nonempty" else len(batch["index"]) * world
    loss = local_sum * (world / divisor)
    mean_loss = sum_global / divisor
    if not math.isfinite(mean_loss):
        return mean_loss, n_global
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads_ok = torch.tensor([all(bool(torch.isfinite(p.grad).all()) for p in model.trainable_parameters()
                                 if p.grad is not None)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(grads_ok, op=dist.ReduceOp.MIN)
    if not bool(grads_ok.item()):
        return float("nan"), n_global
    if n_global > 0:  # a batch without any hypothesis class has nothing to learn from
        optimizer.step()
    return mean_loss, n_global


def _retry_advice(last_good: Optional[Path]) -> str:
    """What to do after a non-finite loss. Resuming continues the same config (lr included: a changed
    lr would break the exact-resume guarantee and is refused), so the advice is a fresh run."""
    kept = f"The last good checkpoint is {last_good} (left untouched)." if last_good else "No checkpoint was written yet."
    return (f"{kept} Retry with a lower learning rate in a new run: --no-resume --set lr=... (or --set "
            "output_dir=<new folder> to keep this one), or check the input images.")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _write_losses(path: Path, rows: List[Dict[str, Any]]) -> None:
    import pandas as pd

    cols = ["step", "epoch", "iteration", "lr", "loss", "images", "elapsed_s"]
    atomic_write_csv(path, pd.DataFrame(rows, columns=cols))


def _read_losses(path: Path, up_to_step: int) -> List[Dict[str, Any]]:
    """Loss rows of an interrupted run up to its checkpoint (later rows are recomputed)."""
    import pandas as pd

    if not path.is_file():
        return []
    df = pd.read_csv(path)
    return df[df["step"] <= up_to_step].to_dict("records")


__all__ = ("train", "TrainResult", "TrainViews", "CachedViews", "build_model", "poly_lr", "build_feature_cache",
           "GlobalBatchNorm2d", "use_global_batchnorm", "NonFiniteLossError", "check_unlabeled",
           "init_distributed_from_env", "dist_info")
