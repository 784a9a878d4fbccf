"""Command line: ``python -m reclip_core {hypothesis,train,evaluate,segment} --config NAME [--set k=v ...]``.

Each command calls the same library function a notebook would (``compute_hypotheses``, ``train``,
``evaluate_run``, ``segment``). Multi-process training: ``torchrun --nproc_per_node N -m reclip_core
train --config ...`` (DDP; gloo on CPU, NCCL on GPUs). Bad input exits with status 2 and a message
that says what to do (unknown config keys and datasets list the valid ones).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reclip_core", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, config_required: bool = True) -> None:
        sp.add_argument("--config", required=config_required,
                        help="a shipped config name (voc, context, ade, cityscapes, coco_stuff27, toy) or a YAML path")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set lr=0.02 --set clip.pretrained=null")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    def legacy(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--allow-legacy-checkpoint", action="store_true",
                        help="load a checkpoint that does not record its CLIP weights and templates (written before "
                        "that record); only if you know it was trained with this config's CLIP and templates")

    h = sub.add_parser("hypothesis", help="image-level hypotheses of a split (JSON keyed by image id, resumable)")
    common(h)
    h.add_argument("--split", default=None, help="split (default: the config's train_split); on a labelled split "
                   "the precision/recall against ground truth is reported")
    h.add_argument("--out", default=None, help="output JSON (default <run>/hypotheses.json, or hypotheses_<split>.json)")
    h.add_argument("--no-resume", action="store_true", help="recompute every image")

    t = sub.add_parser("train", help="train the rectification heads (torchrun for DDP)")
    common(t)
    t.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")

    e = sub.add_parser("evaluate", help="MaskCLIP / rectified / ReCLIP++ val mIoU side by side (last checkpoint)")
    common(e)
    e.add_argument("--checkpoint", default=None, help="run folder, checkpoints folder, .safetensors or best_weight.pth")
    legacy(e)

    s = sub.add_parser("segment", help="segment one image (an overlay PNG) or a folder (--images: masks + overlays)")
    common(s, config_required=False)
    one = s.add_mutually_exclusive_group(required=True)
    one.add_argument("--image", help="one image file")
    one.add_argument("--images", help="a folder of images (nested allowed): a mask and an overlay PNG each, "
                     "into --out DIR; resumable (docs/your-images.md)")
    s.add_argument("--classes", default=None, help="comma-separated class names (default: the config's classes)")
    s.add_argument("--checkpoint", default=None, help="trained run/checkpoint (default: MaskCLIP, no training)")
    s.add_argument("--out", default=None, help="overlay figure path (default segmentation.png); with --images "
                   "the output folder (required)")
    s.add_argument("--pd", type=float, default=None, help="presence-filter threshold (default: off)")
    s.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images above N pixels (default 40 million, or $RECLIP_MAX_IMAGE_PIXELS)")
    legacy(s)
    return p


def _run_dir(cfg) -> Path:
    return cfg.run_dir


def _load_clip(cfg):
    import torch

    from .run_inputs import load_config_clip

    if cfg.clip.pretrained is None:
        torch.manual_seed(cfg.seed)  # a random CLIP: the same one `train` and `evaluate` build
    return load_config_clip(cfg, cfg.device)


def cmd_hypothesis(args, cfg) -> int:
    from .run_inputs import build_dataset, resolve_class_names
    from .hypothesis import hypotheses_from_config, hypothesis_stats
    from .run_lock import run_folder_lock

    split = args.split or cfg.train_split
    out = Path(args.out) if args.out else _run_dir(cfg) / (
        "hypotheses.json" if split == cfg.train_split else f"hypotheses_{split}.json")
    names = resolve_class_names(cfg)
    dataset = build_dataset(cfg, split)
    limit = cfg.max_train_images if split == cfg.train_split else cfg.max_val_images
    clip = _load_clip(cfg)
    t0 = time.monotonic()
    with run_folder_lock(out.parent, "hypothesis"):  # train reads this file: one writer per folder
        hyps = hypotheses_from_config(cfg, clip, split, out, resume=not args.no_resume, progress=not args.quiet)
    stats = hypothesis_stats(hyps, len(names))
    print(f"hypotheses: {stats['images']} images of split {split!r} in {time.monotonic() - t0:.1f}s, "
          f"{stats['mean_classes']:.2f} classes per image, {stats['empty']} empty -> {out}")
    probe = dataset[0]
    if "label" in probe:  # a labelled split: score the hypotheses (evaluation code reads the labels)
        from .diagnostics import hypothesis_quality

        q = hypothesis_quality(hyps, dataset, len(names), max_images=limit)
        print(f"hypothesis precision {100 * q['precision']:.1f}%  recall {100 * q['recall']:.1f}%  "
              f"exact {100 * q['exact_match']:.1f}%  ({q['images']} images)")
    return 0


def cmd_train(args, cfg) -> int:
    import torch.distributed as dist

    from .distributed import init_distributed_from_env
    from .training import train

    launched = init_distributed_from_env(cfg.device)
    try:
        res = train(cfg, run_dir=_run_dir(cfg), resume=not args.no_resume, progress=not args.quiet)
        if not launched or dist.get_rank() == 0:
            print(f"trained {res.epochs_done} epochs, {res.steps} steps in {res.seconds:.1f}s; "
                  f"last loss {res.last_loss:.4f}; checkpoint {res.checkpoint}")
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cmd_evaluate(args, cfg) -> int:
    from .evaluation import evaluate_run

    t0 = time.monotonic()
    report = evaluate_run(cfg, checkpoint=args.checkpoint, run_dir=_run_dir(cfg), progress=not args.quiet,
                          allow_legacy=args.allow_legacy_checkpoint)
    print(report.format())
    info = report.info
    if "epoch" in info:
        print(f"checkpoint: {info.get('checkpoint')} (epoch {info.get('epoch')}, last epoch, no selection)")
    print(f"evaluation took {time.monotonic() - t0:.1f}s; per-class tables in {_run_dir(cfg) / 'eval'}")
    return 0


def cmd_segment(args, cfg) -> int:
    from .atomic_io import atomic_save_figure
    from .run_inputs import resolve_class_names
    from .segment import segment

    if args.max_pixels is not None:  # read by transforms.open_image (image_limits.pixel_limit)
        import os

        from .image_limits import ENV

        os.environ[ENV] = str(args.max_pixels)
    if args.classes:
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
    elif cfg is not None:
        names = resolve_class_names(cfg)
    else:
        raise ValueError("pass --classes 'a,b,c' or a --config whose classes to use.")
    clip = _load_clip(cfg) if cfg is not None else None
    if args.images:
        return _segment_folder(args, cfg, names, clip)
    args.out = args.out or "segmentation.png"
    res = segment(args.image, names, checkpoint=args.checkpoint, clip=clip, pd_threshold=args.pd,
                  test_size=cfg.test_size if cfg is not None else None, allow_legacy=args.allow_legacy_checkpoint)
    atomic_save_figure(res.figure, args.out, dpi=120)
    counts = {res.class_names[c]: int(n) for c, n in zip(*__import__("numpy").unique(res.mask, return_counts=True))}
    print(f"{res.model}: {counts} -> {args.out}")
    return 0


def _segment_folder(args, cfg, names: List[str], clip) -> int:
    from .run_inputs import resolve_templates
    from .segment_folder import segment_folder

    if not args.out:
        raise ValueError("segment --images DIR needs --out DIR, the folder for masks/ and overlays/.")
    res = segment_folder(args.images, args.out, names, checkpoint=args.checkpoint, clip=clip, pd_threshold=args.pd,
                         test_size=cfg.test_size if cfg is not None else None,
                         templates=resolve_templates(cfg) if cfg is not None else None,
                         device=cfg.device if cfg is not None else "auto",
                         allow_legacy=args.allow_legacy_checkpoint, progress=not args.quiet)
    print(f"{res.model}: {len(res.written)} images segmented, {len(res.existing)} already done, "
          f"{len(res.unreadable)} unreadable skipped -> {res.out}/masks, {res.out}/overlays (legend.png)")
    return 0


COMMANDS = {"hypothesis": cmd_hypothesis, "train": cmd_train, "evaluate": cmd_evaluate, "segment": cmd_segment}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m reclip_core`` and the ``reclip`` script; returns the exit status."""
    from .config import load_config
    from .run_lock import RunFolderLocked

    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides) if args.config else None
        if cfg is not None and cfg.num_threads:
            import torch

            # Small models on a shared CPU run faster on one thread than on two contended ones.
            torch.set_num_threads(cfg.num_threads)
        return COMMANDS[args.command](args, cfg)
    except (ValueError, FileNotFoundError, KeyError, RunFolderLocked) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the run folder's lock was released on the way out
        print("error: interrupted; a training run continues from its last checkpoint when started again.",
              file=sys.stderr)
        return 130
    except Exception as err:
        # Faults whose message says what to do (cli_errors): one line, no traceback to dig through.
        from .cli_errors import explain

        known = explain(err)
        if known is None:
            raise
        print(f"error: {known[1]}", file=sys.stderr)
        return known[0]


__all__ = ("main",)
