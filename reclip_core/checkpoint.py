"""Checkpoints: safetensors weights + torch optimizer state + a JSON state that commits them.

Layout of a checkpoint folder (``<run>/checkpoints``)::

    step00000120.safetensors   trainable weights and buffers (``model.trainable_state_dict()``)
    step00000120.optim.pt      optimizer state (``torch.save``; read back with ``weights_only=True``)
    latest.json                {"weights": "step00000120.safetensors", "optimizer": ..., epoch, step, ...}

Every file goes through :mod:`reclip_core.atomic_io`, and ``latest.json`` is written **last**: it
is the commit point. A process killed while writing the weights or the optimizer state leaves the
previous ``latest.json`` pointing at the previous, complete files, so the previous checkpoint stays
loadable. Older step files are deleted only after the new ``latest.json`` is on disk.

``convert_release_checkpoint`` maps the authors' ``best_weight.pth`` onto our parameter names.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .atomic_io import atomic_save_safetensors, atomic_torch_save, atomic_write_json
from .cli_errors import not_a_file
from .options import MODEL_KINDS
from .checkpoint_checks import check_identity, checkpoint_identity, validate_weights  # noqa: F401  (re-exported)

LATEST = "latest.json"
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights (CPU tensors), optimizer state (or None) and the JSON state."""

    weights: Dict[str, torch.Tensor]
    optimizer: Optional[Dict[str, Any]]
    state: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None


def _step_name(step: int) -> str:
    return f"step{int(step):08d}"


def save_checkpoint(
    folder: PathLike,
    weights: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    optimizer: Optional[Mapping[str, Any]] = None,
    keep: int = 2,
) -> Path:
    """Write weights, optimizer state and ``latest.json`` (in that order) atomically; keep the
    newest ``keep`` weight/optimizer pairs. ``state`` must be JSON-serialisable and hold ``step``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if "step" not in state:
        raise ValueError("checkpoint state needs a 'step' entry (the global optimizer step).")
    json.dumps(dict(state))  # fail before writing anything if the state is not serialisable
    stem = _step_name(state["step"])
    weights_file = f"{stem}.safetensors"
    meta = {"format": "reclip", "step": str(state["step"])}
    for key in ("identity", "class_names"):  # so that a bare weights file can be checked on its own too
        if key in state:
            meta[key] = json.dumps(state[key])
    atomic_save_safetensors(dict(weights), folder / weights_file, metadata=meta)
    optim_file = None
    if optimizer is not None:
        optim_file = f"{stem}.optim.pt"
        atomic_torch_save(dict(optimizer), folder / optim_file)
    record = dict(state)
    record.update({"format_version": FORMAT_VERSION, "weights": weights_file, "optimizer": optim_file})
    atomic_write_json(folder / LATEST, record)  # the commit point
    _prune(folder, keep=max(1, keep), current=stem)
    return folder / LATEST


def _prune(folder: Path, keep: int, current: str) -> None:
    # Temporary files of writes killed before their rename (``.step....tmp``, ``.latest.json....tmp``):
    # never loadable, but they would pile up. One writer per folder, so none is in flight now.
    for p in folder.glob(".*.tmp"):
        if p.name.startswith((".step", f".{LATEST}.")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    stems = sorted({m.group(1) for p in folder.iterdir() if (m := re.match(r"(step\d{8})\.", p.name))})
    doomed = [s for s in stems if s != current][: max(0, len(stems) - keep)]
    for s in doomed:
        for suffix in (".safetensors", ".optim.pt"):
            try:
                (folder / f"{s}{suffix}").unlink()
            except FileNotFoundError:
                pass


def find_checkpoint(path: PathLike) -> Optional[Path]:
    """``latest.json`` of a run folder, a checkpoint folder, or the file itself; None if absent."""
    p = Path(path)
    for cand in (p, p / LATEST, p / "checkpoints" / LATEST):
        if cand.is_file() and cand.name == LATEST:
            return cand
    return None


def load_checkpoint(path: PathLike, load_optimizer: bool = True) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (a run folder, its ``checkpoints``
    folder or ``latest.json``). The optimizer state is read with ``weights_only=True``."""
    latest = find_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint at {path} (expected {LATEST} in it or in its 'checkpoints' "
                                "folder); train first with `python -m reclip_core train --config ...`.")
    folder = latest.parent

    def unreadable(file: Path, err: BaseException) -> ValueError:
        return ValueError(
            f"checkpoint file {file} cannot be read ({type(err).__name__}: {err}): it is truncated, corrupt, or "
            "not a checkpoint written by reclip (optimizer files are read with torch.load(weights_only=True), "
            "which refuses pickled code). Restore it from a copy, or start over with --no-resume "
            f"(resume=False) after moving {folder} aside.")

    try:
        with open(latest, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("weights"), str):
            raise ValueError("no 'weights' entry")
    except (OSError, ValueError) as err:
        raise unreadable(latest, err) from err
    try:
        weights = load_file(str(folder / state["weights"]), device="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"{latest} names {state['weights']}, which is missing from {folder}; restore it "
                                "or start over with --no-resume (resume=False).") from None
    except Exception as err:  # safetensors raises its own SafetensorError on a truncated header/body
        raise unreadable(folder / state["weights"], err) from err
    optim = None
    if load_optimizer and state.get("optimizer"):
        try:
            optim = torch.load(folder / state["optimizer"], map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{latest} names {state['optimizer']}, which is missing from {folder}; restore "
                                    "it or start over with --no-resume (resume=False).") from None
        except Exception as err:  # UnpicklingError (refused global, truncated data), RuntimeError (zip)...
            raise unreadable(folder / state["optimizer"], err) from err
    return Checkpoint(weights=weights, optimizer=optim, state=state, path=latest)


# ------------------------------------------------------------------------------------------------
# Released checkpoints of the authors
# ------------------------------------------------------------------------------------------------
# release name (after stripping "module.") → our ``trainable_state_dict()`` name
RELEASE_KEY_MAP = {
    "text_encoder.prompt_token": "reference.tokens",
    "pe_proj.weight": "positional.proj.weight",
    "pe_proj.bias": "positional.proj.bias",
    "decoder_conv2.weight": "decoder.conv.weight",
    "decoder_conv2.bias": "decoder.conv.bias",
    "decoder_norm2.weight": "decoder.norm.weight",
    "decoder_norm2.bias": "decoder.norm.bias",
    "decoder_norm2.running_mean": "decoder.norm.running_mean",
    "decoder_norm2.running_var": "decoder.norm.running_var",
    "decoder_norm2.num_batches_tracked": "decoder.norm.num_batches_tracked",
}


def _reclip_release_keys() -> Tuple[Dict[str, str], Dict[str, str]]:
    """ReCLIP (CVPR): its space net is ``proj_net`` (3×3 conv, BN, ReLU, three times), whose convs and
    BNs are also attributes ``conv1``..``conv3`` / ``norm1``..``norm3``, so the release's state dict
    holds each of these tensors under two names. → (release name → ours, alias → release name)."""
    layers = {"conv1": 0, "norm1": 1, "conv2": 3, "norm2": 4, "conv3": 6, "norm3": 7}  # index in proj_net
    keys, aliases = {"text_encoder.prompt_token": "reference.tokens"}, {}
    for attr, i in layers.items():
        tensors = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked") if attr.startswith("norm") \
            else ("weight", "bias")
        for t in tensors:
            keys[f"proj_net.{i}.{t}"] = f"space_net.{i}.{t}"  # our ReCLIP.space_net has the same layout
            aliases[f"{attr}.{t}"] = f"proj_net.{i}.{t}"
    return keys, aliases


RELEASE_RECLIP_KEY_MAP, RELEASE_RECLIP_ALIASES = _reclip_release_keys()
# frozen weights a released state dict also holds (the CLIP, its copy in ``vit``, the visual projection)
_RELEASE_FROZEN_PREFIXES = ("clip.", "clip_model.", "image_encoder.", "text_encoder.", "vit.")
_RELEASE_FROZEN_KEYS = ("proj.weight", "logit_scale")


def convert_release_checkpoint(path_or_state: Union[PathLike, Mapping[str, Any]],
                               model: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The authors' ``best_weight.pth`` → a state dict for ``load_trainable_state_dict`` of our
    ``ReCLIPPP`` (``model="reclip++"``) or ``ReCLIP`` (``model="reclip"``); ``None`` tells them apart
    by ReCLIP's ``proj_net`` keys.

    Accepts a path (loaded with ``torch.load(weights_only=True)``) or an already-loaded mapping.
    Handles a ``{"state_dict": ...}``/``{"model": ...}`` wrapper, the ``module.`` prefix of DDP,
    and a prompt token stored as [1, 73, D] or [73, D]. Keys of the frozen CLIP are dropped; any
    other unknown key is ignored with a warning; a missing one raises ``ValueError``. ReCLIP's
    tensors stored twice (``proj_net.i`` and ``convN``/``normN``) must be equal.
    """
    if isinstance(path_or_state, Mapping):
        raw = dict(path_or_state)
    else:
        p = Path(path_or_state)
        if not p.is_file():
            raise FileNotFoundError(f"release checkpoint {p} {not_a_file(p)}.")
        try:
            raw = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # a refused global (pickled code), a truncated or foreign file
            raise ValueError(f"cannot read release checkpoint {p} ({type(err).__name__}: {err}): it is truncated, "
                             "corrupt or holds pickled objects other than tensors (read with "
                             "torch.load(weights_only=True), which never runs pickled code). Download "
                             "best_weight.pth again from the authors' release.") from err
        if not isinstance(raw, Mapping):
            raise ValueError(f"release checkpoint {p} holds a {type(raw).__name__}, not a state dict.")
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(raw.get(wrapper), Mapping):
            raw = dict(raw[wrapper])
    bare = [key[len("module."):] if key.startswith("module.") else key for key in raw]
    if model is None:
        model = "reclip" if any(k.startswith("proj_net.") or k in RELEASE_RECLIP_ALIASES for k in bare) else "reclip++"
    if model not in MODEL_KINDS:
        raise ValueError(f"model must be 'reclip++' or 'reclip' (or None to detect it), got {model!r}.")
    key_map = RELEASE_KEY_MAP if model == "reclip++" else RELEASE_RECLIP_KEY_MAP
    aliases = RELEASE_RECLIP_ALIASES if model == "reclip" else {}
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, k, value in zip(raw, bare, raw.values()):
        k = aliases.get(k, k)
        if k in key_map:
            t = torch.as_tensor(value).detach().cpu()
            if k == "text_encoder.prompt_token" and t.ndim == 3:
                if t.shape[0] != 1:
                    raise ValueError(f"prompt_token has shape {tuple(t.shape)}; expected [1, n_ctx, D] or [n_ctx, D].")
                t = t[0]
            target = key_map[k]
            if target in out and not torch.equal(out[target], t):
                raise ValueError(f"release checkpoint holds two different tensors for {k} (under its two names, "
                                 f"{key} being one); the release stores one tensor under both.")
            out[target] = t.clone()
        elif k.startswith(_RELEASE_FROZEN_PREFIXES) or k in _RELEASE_FROZEN_KEYS:
            continue  # frozen CLIP weights (we load CLIP separately)
        else:
            unknown.append(key)
    what = "ReCLIP++" if model == "reclip++" else "ReCLIP"
    if unknown:
        # Warn rather than fail: we have not seen every variant of the released files, and the
        # keys we need are checked below.
        warnings.warn(f"release checkpoint keys ignored (not part of {what}'s trainable state): {unknown[:10]}"
                      f"{' ...' if len(unknown) > 10 else ''}", stacklevel=2)
    missing = [v for k, v in key_map.items() if v not in out and "num_batches" not in k]
    if missing:
        raise ValueError(f"release checkpoint lacks {missing}; is it a {what} best_weight.pth?")
    for k, v in key_map.items():
        if "num_batches" in k and v not in out:
            out[v] = torch.tensor(0, dtype=torch.long)
    return out


def load_model_weights(model: torch.nn.Module, path: PathLike, allow_legacy: bool = False) -> Dict[str, Any]:
    """Load trainable weights into ``model`` from a run/checkpoint folder, a ``.safetensors`` file or
    a release ``.pth``; returns the checkpoint's JSON state (empty for bare files).

    Checked before anything is loaded: the class list, the CLIP weights and templates (see
    :func:`check_identity`; ``allow_legacy`` accepts a file without that record) and every tensor
    (:func:`validate_weights`). The authors' ``.pth`` records no identity; it is checked as a tensor state only."""
    p = Path(path)
    wanted = getattr(model, "class_names", None)

    def check_classes(trained: Any, source: Path) -> None:
        if trained is not None and wanted is not None and list(trained) != list(wanted):
            # same count, other names would load without a shape error and mislabel every class
            raise ValueError(f"checkpoint {source} was trained for the classes {list(trained)}, but the model has "
                             f"{list(wanted)}; evaluate with the config the run was trained with, or train for "
                             "these classes.")

    if find_checkpoint(p) is not None:
        ck = load_checkpoint(p, load_optimizer=False)
        check_classes(ck.state.get("class_names"), ck.path)
        check_identity(ck.state.get("identity"), model, ck.path, allow_legacy, ck.state.get("config"))
        validate_weights(ck.weights, model, ck.path.parent / ck.state["weights"])
        model.load_trainable_state_dict(ck.weights)
        return ck.state
    if p.suffix == ".safetensors" and p.is_file():

        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
            weights = load_file(str(p), device="cpu")
        except Exception as err:  # SafetensorError on a truncated or foreign file
            raise ValueError(f"weights file {p} cannot be read ({type(err).__name__}: {err}); restore it or "
                             "retrain.") from err
        recorded = {k: json.loads(meta[k]) for k in ("identity", "class_names") if k in meta}
        check_classes(recorded.get("class_names"), p)
        check_identity(recorded.get("identity"), model, p, allow_legacy)
        validate_weights(weights, model, p)
        model.load_trainable_state_dict(weights)
        return {}
    if p.suffix in (".pth", ".pt") and p.is_file():
        weights = convert_release_checkpoint(p, "reclip" if hasattr(model, "space_net") else "reclip++")
        validate_weights(weights, model, p)
        model.load_trainable_state_dict(weights)
        return {}
    raise FileNotFoundError(f"no checkpoint at {p}: pass a run folder, a checkpoints folder, "
                            "a .safetensors file, or the authors' best_weight.pth.")


__all__ = ("Checkpoint", "save_checkpoint", "load_checkpoint", "find_checkpoint", "convert_release_checkpoint",
           "load_model_weights", "RELEASE_KEY_MAP", "RELEASE_RECLIP_KEY_MAP", "checkpoint_identity", "check_identity",
           "validate_weights")
