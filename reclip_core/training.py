"""The training loop of the bias-rectification heads (method.md §3), single process or DDP (torchrun).

A run is reproducible and exactly resumable: every random draw is a pure function of ``(seed,
purpose, epoch, sample index)`` (a view's augmentation, its loss's Gumbel noise, the sample order
of ``DistributedSampler(seed=seed)``, also used with one process), the poly learning rate depends
only on the epoch, and a checkpoint holds the trainable weights *and buffers*, the optimizer's
momentum and the position (epoch, batch within it). A DDP run with N processes follows the
1-process loss trajectory at equal global batch: each process takes every N-th sample of the same
permutation, the loss is the mean over the global batch (an all-reduced image count), and the
decoder's BatchNorm uses global statistics (:class:`~reclip_core.distributed.GlobalBatchNorm2d`).
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

from .atomic_io import StaleFileError, atomic_write_csv, atomic_write_json
from .clip_loading import resolve_device
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .checkpoint_checks import checkpoint_identity, validate_weights
from .cli_errors import RunStopped
from .datasets.head import Head
from .denormals import flushed_denormals
from .distributed import dist_info, process_device, use_global_batchnorm, wrap_ddp
from .feature_cache import shared_feature_cache
from .hypothesis import load_hypotheses, require_some_hypothesis
from .model_factory import build_model
from .provenance import check_hypothesis_file, config_fingerprint, fingerprint_matches
from .run_inputs import build_dataset, resolve_class_names
from .run_lock import run_folder_lock
from .transforms import sample_seed, train_transform_from_config
from .views import TrainViews, check_unlabeled


class NonFiniteLossError(RunStopped):
    """Training produced a NaN/Inf loss or gradient; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What :func:`train` did: the run folder, how far it got, its last checkpoint and loss rows."""
    run_dir: Path
    epochs_done: int
    steps: int
    last_loss: float
    checkpoint: Optional[Path]
    losses: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def poly_lr(base_lr: float, epoch: int, max_epoch: int, power: float = 0.9) -> float:
    """Poly decay per epoch: base_lr · (1 − epoch/max_epoch)^power (epoch counted from 0)."""
    return base_lr * (1.0 - epoch / max_epoch) ** power


def train(cfg: Mapping[str, Any], *, run_dir: Optional[os.PathLike] = None, **kwargs: Any) -> TrainResult:
    """Train the model of ``cfg`` on the unlabeled ``train_split`` with its hypotheses (see :func:`_train`
    for the arguments), holding the run folder's lock: a second writer is refused
    (:class:`~reclip_core.run_lock.RunFolderLocked`) instead of interleaving with this one. Denormal
    floats are flushed to zero meanwhile (:mod:`~reclip_core.denormals`: the same weights, faster)."""
    run = _run_folder(cfg, run_dir)
    with run_folder_lock(run, "train"), flushed_denormals():
        return _train(cfg, run_dir=run, **kwargs)


@dataclass
class _Run:
    """A run once set up (:func:`_setup`): what the loop reads, and its progress, which a
    checkpoint stores and :func:`_resume` restores."""
    cfg: Mapping[str, Any]
    dir: Path
    world: int
    rank: int
    device: torch.device
    per_rank: int  # this process's share of the global batch
    names: List[str]
    model: nn.Module
    data: Dataset  # TrainViews, or CachedViews with the feature cache
    optimizer: torch.optim.Optimizer
    fingerprint: Dict[str, Any]
    identity: Dict[str, Any]
    steps_per_epoch: int = 0
    start_epoch: int = 0
    skip_batches: int = 0  # batches of start_epoch already done before the checkpoint
    step: int = 0
    rows: List[Dict[str, Any]] = field(default_factory=list)
    last_loss: float = float("nan")

    def __post_init__(self) -> None:
        self.ckpt_dir: Path = self.dir / "checkpoints"
        self.loss_csv: Path = self.dir / "loss.csv"


def _train(cfg: Mapping[str, Any], *, dataset=None, hypotheses: Optional[Mapping[str, Sequence[int]]] = None,
           clip: Optional[nn.Module] = None, run_dir: Optional[os.PathLike] = None, resume: bool = True,
           progress: bool = True, callback: Optional[Callable[[Dict[str, Any]], None]] = None) -> TrainResult:
    """Train the model of ``cfg`` on the unlabeled ``train_split`` with its hypotheses.

    ``dataset``/``hypotheses``/``clip`` default to the config's reader, ``<run>/hypotheses.json``
    and ``load_clip(cfg.clip...)``. Writes ``<run>/checkpoints`` (end of every epoch, and every
    ``checkpoint_every`` steps), ``<run>/loss.csv`` (one row per step) and
    ``<run>/train_summary.json``. With ``resume`` an existing checkpoint of the same config is
    continued exactly. ``callback`` is called after each step with a dict (tests use it to
    interrupt a run). Under torchrun (an initialised process group) it trains with DDP.
    """
    t0 = time.monotonic()
    r = _setup(cfg, _run_folder(cfg, run_dir), dataset, hypotheses, clip, progress)
    _resume(r, resume)
    net = wrap_ddp(r.model, r.device)
    sampler = DistributedSampler(r.data, num_replicas=r.world, rank=r.rank, shuffle=True, seed=cfg["seed"],
                                 drop_last=True)
    r.steps_per_epoch = len(sampler) // r.per_rank
    if r.steps_per_epoch == 0:
        raise ValueError(f"{len(r.data)} training images are fewer than one global batch of {cfg['batch_size']}.")

    epochs_to_run = cfg["epoch"]
    for epoch in range(r.start_epoch, epochs_to_run):
        lr = poly_lr(cfg["lr"], epoch, cfg["max_epoch"])
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch)
        r.data.epoch = epoch  # seeds the views of this epoch (pure function of seed, epoch, index)
        batches = list(BatchSampler(sampler, r.per_rank, drop_last=True))[r.skip_batches:]
        loader = DataLoader(r.data, batch_sampler=batches, num_workers=cfg["num_workers"])
        r.model.train()
        for it, batch in enumerate(loader, start=r.skip_batches):
            loss_value, n_images = _step(net, r.model, r.optimizer, batch, r.device, cfg["seed"], epoch, r.world,
                                         cfg.get("loss_normalisation", "nonempty"))
            if not math.isfinite(loss_value):
                if r.rank == 0:
                    _write_losses(r.loss_csv, r.rows)
                raise NonFiniteLossError(
                    f"training stopped: non-finite loss or gradient ({loss_value}) at epoch {epoch + 1}, batch {it + 1} "
                    f"(step {r.step + 1}). The weights were not updated. {_retry_advice(find_checkpoint(r.ckpt_dir))}")
            r.step += 1
            r.last_loss = loss_value
            r.rows.append({"step": r.step, "epoch": epoch + 1, "iteration": it + 1, "lr": lr,
                           "loss": loss_value, "images": n_images, "elapsed_s": round(time.monotonic() - t0, 3)})
            if r.rank == 0 and (r.step % cfg["log_every"] == 0):
                _write_losses(r.loss_csv, r.rows)
                if progress:
                    _log(r.rank, f"epoch {epoch + 1}/{epochs_to_run} it {it + 1}/{r.steps_per_epoch} "
                                 f"loss {loss_value:.4f} lr {lr:.5f}")
            done_epoch = it + 1 == r.steps_per_epoch  # the end-of-epoch checkpoint follows anyway
            if cfg["checkpoint_every"] and r.step % cfg["checkpoint_every"] == 0 and not done_epoch:
                _checkpoint(r, epoch, it + 1, False, loss_value)
            if callback is not None:
                callback({"epoch": epoch, "iteration": it, "step": r.step, "loss": loss_value})
        r.skip_batches = 0
        _checkpoint(r, epoch + 1, 0, epoch + 1 == epochs_to_run, r.last_loss)
        _log(r.rank, f"epoch {epoch + 1}/{epochs_to_run} done: loss {r.last_loss:.4f} "
                     f"({time.monotonic() - t0:.1f}s)")
    return _finish(r, epochs_to_run, time.monotonic() - t0)


def _setup(cfg: Mapping[str, Any], run: Path, dataset: Any, hypotheses: Optional[Mapping[str, Sequence[int]]],
           clip: Optional[nn.Module], progress: bool) -> _Run:
    """Processes, data, model and optimizer of a fresh run (the checkpoint, if any, comes after)."""
    world, rank = dist_info()
    device = process_device(resolve_device(cfg["device"]))
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
        check_hypothesis_file(run / "hypotheses.json", cfg, model.clip, dataset)
    fingerprint = _jsonable(config_fingerprint(cfg, model.clip))  # hashes CLIP weights: once per run
    identity = checkpoint_identity(model)  # what evaluate/segment check the heads against
    _ = model.text  # text features once, before any wrapping
    views = TrainViews(dataset, hypotheses, len(names), train_transform_from_config(cfg), seed=cfg["seed"])
    data: Dataset = views
    if cfg["feature_cache"]:
        cache_path = Path(cfg["feature_cache_path"]) if cfg["feature_cache_path"] else run / "feature_cache.safetensors"
        data = shared_feature_cache(model, views, cfg["feature_cache_views"], max(per_rank, 16), device, cache_path,
                                    progress)
    if world > 1:
        use_global_batchnorm(model)

    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    return _Run(cfg, run, world, rank, device, per_rank, names, model, data, optimizer, fingerprint, identity)


def _resume(r: _Run, resume: bool) -> None:
    """Continue from the latest checkpoint of the same computation, or refuse a different one."""
    latest = find_checkpoint(r.ckpt_dir) if resume else None
    if latest is not None:
        ck = load_checkpoint(r.ckpt_dir)
        if not fingerprint_matches(ck.state.get("fingerprint") or {}, r.fingerprint) \
                or ck.state.get("identity") != r.identity:
            raise StaleFileError(r.dir, f"{r.ckpt_dir} holds a run with a different config (or one written before "
                                 "checkpoints recorded their CLIP weights and templates); use another output_dir "
                                 "or pass resume=False (--no-resume) to start over.")
        validate_weights(ck.weights, r.model, r.ckpt_dir / ck.state["weights"])
        r.model.load_trainable_state_dict({k: v.to(r.device) for k, v in ck.weights.items()})
        r.optimizer.load_state_dict(ck.optimizer)
        r.start_epoch, r.skip_batches, r.step = ck.state["epoch"], ck.state["step_in_epoch"], ck.state["step"]
        r.rows = _read_losses(r.loss_csv, r.step)
        r.last_loss = float(ck.state.get("loss", float("nan")))
        _log(r.rank, f"resuming from {latest} (epoch {r.start_epoch}, batch {r.skip_batches}, step {r.step})")
    elif resume is False and r.ckpt_dir.exists() and r.rank == 0:
        _log(r.rank, f"--no-resume: starting over; {r.ckpt_dir} will be overwritten")


def _checkpoint(r: _Run, epoch: int, step_in_epoch: int, finished: bool, loss: float) -> None:
    """Save weights, optimizer and position (rank 0), after checking the weights are finite."""
    weights = r.model.trainable_state_dict()
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a finite loss does not prove finite weights (e.g. a huge lr): never save them as "good"
        raise NonFiniteLossError(
            f"training stopped: the trained tensors {bad[:3]} became non-finite by step {r.step} although the "
            f"loss was finite; they were not saved. {_retry_advice(find_checkpoint(r.ckpt_dir))}")
    if r.rank == 0:
        state = {"epoch": epoch, "step_in_epoch": step_in_epoch, "step": r.step, "finished": finished,
                 "loss": loss, "steps_per_epoch": r.steps_per_epoch, "world_size": r.world,
                 "class_names": r.names, "config": _jsonable(dict(r.cfg)),
                 "fingerprint": r.fingerprint, "identity": r.identity, "torch": torch.__version__,
                 "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        save_checkpoint(r.ckpt_dir, weights, state, r.optimizer.state_dict(), keep=r.cfg["keep_checkpoints"])
        _write_losses(r.loss_csv, r.rows)
    if r.world > 1:
        dist.barrier()  # the other processes go on only once rank 0 has written the checkpoint


def _finish(r: _Run, epochs: int, seconds: float) -> TrainResult:
    """Write the final loss log and ``train_summary.json`` (rank 0); the run's result."""
    if r.rank == 0:
        _write_losses(r.loss_csv, r.rows)
        atomic_write_json(r.dir / "train_summary.json", {
            "epochs": epochs, "steps": r.step, "last_loss": r.last_loss, "seconds": seconds,
            "world_size": r.world, "images": len(r.data), "checkpoint": str(find_checkpoint(r.ckpt_dir))})
    return TrainResult(r.dir, epochs, r.step, r.last_loss, find_checkpoint(r.ckpt_dir), r.rows, seconds)


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


def _run_folder(cfg: Mapping[str, Any], run_dir: Optional[os.PathLike]) -> Path:
    return Path(run_dir) if run_dir is not None else Path(cfg["output_dir"] or Path("runs") / getattr(cfg, "name", "custom"))


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


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
    import pandas as pd  # here, not at the top: only the loss log needs it, and it takes ~0.4 s to import

    cols = ["step", "epoch", "iteration", "lr", "loss", "images", "elapsed_s"]
    atomic_write_csv(path, pd.DataFrame(rows, columns=cols))


def _read_losses(path: Path, up_to_step: int) -> List[Dict[str, Any]]:
    """Loss rows of an interrupted run up to its checkpoint (later rows are recomputed)."""
    import pandas as pd  # see _write_losses

    if not path.is_file():
        return []
    df = pd.read_csv(path)
    return df[df["step"] <= up_to_step].to_dict("records")


__all__ = ("train", "TrainResult", "poly_lr", "NonFiniteLossError")
