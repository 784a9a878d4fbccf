"""Checkpoints: round trip, atomic commit (a write killed midway leaves the previous checkpoint
loadable), pruning, and conversion of the authors' released weights."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from reclip_core.checkpoint import (LATEST, convert_release_checkpoint, find_checkpoint, load_checkpoint,
                                    load_model_weights, save_checkpoint)

from .checkpoint_fixtures import optim_state
from .train_fixtures import NAMES


def test_round_trip_with_weights_only_optimizer(tmp_path):
    w = {"a.weight": torch.randn(3, 4), "a.num_batches_tracked": torch.tensor(5)}
    opt = optim_state(0)
    save_checkpoint(tmp_path, w, {"step": 7, "epoch": 1, "note": "x"}, opt)
    ck = load_checkpoint(tmp_path)
    assert ck.state["step"] == 7 and ck.state["note"] == "x"
    assert torch.equal(ck.weights["a.weight"], w["a.weight"]) and ck.weights["a.num_batches_tracked"].item() == 5
    assert torch.equal(ck.optimizer["state"][0]["momentum_buffer"], opt["state"][0]["momentum_buffer"])
    assert (tmp_path / "step00000007.safetensors").is_file() and (tmp_path / "step00000007.optim.pt").is_file()


def test_optimizer_file_is_read_with_weights_only(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"w": torch.zeros(1)}, {"step": 1}, optim_state(0))
    seen = {}
    real = torch.load

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(tmp_path)
    assert seen.get("weights_only") is True


def test_prune_keeps_newest(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, {"w": torch.full((2,), float(step))}, {"step": step}, optim_state(step), keep=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != LATEST)
    assert names == ["step00000003.optim.pt", "step00000003.safetensors",
                     "step00000004.optim.pt", "step00000004.safetensors"]
    assert load_checkpoint(tmp_path).weights["w"][0].item() == 4.0


@pytest.mark.parametrize("fail_in", ["weights", "optimizer", "latest"])
def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch, fail_in):
    import reclip_core.checkpoint as ckmod

    save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"step": 1}, optim_state(1))

    def boom(*a, **k):
        raise KeyboardInterrupt("killed")

    target = {"weights": "atomic_save_safetensors", "optimizer": "atomic_torch_save", "latest": "atomic_write_json"}
    monkeypatch.setattr(ckmod, target[fail_in], boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"w": torch.full((3,), 2.0)}, {"step": 2}, optim_state(2))
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path)
    assert ck.state["step"] == 1 and torch.equal(ck.weights["w"], torch.ones(3))


WRITER = textwrap.dedent("""
    import sys, torch
    from reclip_core.checkpoint import save_checkpoint
    folder = sys.argv[1]
    step = 0
    big = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB: writes long enough to be killed inside one
    while True:
        step += 1
        save_checkpoint(folder, {"w": big + step, "step": torch.tensor(step)}, {"step": step},
                        {"state": {}, "param_groups": []}, keep=2)
        print(step, flush=True)
""")


def test_sigkill_during_writes_leaves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    folder = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for delay in (0.05, 0.4):
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, env=env)
        first = proc.stdout.readline()  # at least one checkpoint committed
        assert first.strip()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = load_checkpoint(folder)
        step = ck.state["step"]
        assert int(ck.weights["step"]) == step
        # weights and state come from the same, complete write
        assert torch.equal(ck.weights["w"], torch.arange(4_000_000, dtype=torch.float32) + step)


def _release_state(model, prompt_3d=True, prefix="module."):
    """A state dict with the authors' names and shapes, filled with distinct random values."""
    g = torch.Generator().manual_seed(1)
    own = model.trainable_state_dict()
    n_ctx, width = own["reference.tokens"].shape
    state = {
        "text_encoder.prompt_token": torch.randn(1, n_ctx, width, generator=g) if prompt_3d
        else torch.randn(n_ctx, width, generator=g),
        "pe_proj.weight": torch.randn(own["positional.proj.weight"].shape, generator=g),
        "pe_proj.bias": torch.randn(own["positional.proj.bias"].shape, generator=g),
        "decoder_conv2.weight": torch.randn(own["decoder.conv.weight"].shape, generator=g),
        "decoder_conv2.bias": torch.randn(own["decoder.conv.bias"].shape, generator=g),
        "decoder_norm2.weight": torch.rand(own["decoder.norm.weight"].shape, generator=g),
        "decoder_norm2.bias": torch.randn(own["decoder.norm.bias"].shape, generator=g),
        "decoder_norm2.running_mean": torch.randn(own["decoder.norm.running_mean"].shape, generator=g),
        "decoder_norm2.running_var": torch.rand(own["decoder.norm.running_var"].shape, generator=g) + 0.5,
        "decoder_norm2.num_batches_tracked": torch.tensor(123),
    }
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("prompt_3d", [True, False])
def test_convert_release_checkpoint(tmp_path, tiny_clip, prompt_3d):
    from reclip_core.model import ReCLIPPP

    model = ReCLIPPP(tiny_clip, NAMES, templates=["a photo of a {}."])
    release = _release_state(model, prompt_3d)
    path = tmp_path / "best_weight.pth"
    torch.save(release, path)
    converted = convert_release_checkpoint(path)
    assert set(converted) == set(model.trainable_state_dict())
    model.load_trainable_state_dict(converted)
    own = model.trainable_state_dict()
    tokens = release["module.text_encoder.prompt_token"]
    assert torch.equal(own["reference.tokens"], tokens[0] if prompt_3d else tokens)
    assert torch.equal(own["positional.proj.weight"], release["module.pe_proj.weight"])
    assert torch.equal(own["decoder.conv.weight"], release["module.decoder_conv2.weight"])
    assert torch.equal(own["decoder.norm.running_var"], release["module.decoder_norm2.running_var"])
    assert own["decoder.norm.num_batches_tracked"].item() == 123
    # the loader dispatches a .pth to the converter
    fresh = ReCLIPPP(tiny_clip, NAMES, templates=["a photo of a {}."])
    load_model_weights(fresh, path)
    assert torch.equal(fresh.trainable_state_dict()["decoder.conv.bias"], release["module.decoder_conv2.bias"])
    # segment on the authors' file: read, resized and upsampled the release's way; a bare file of ours: ours
    from reclip_core.segment import _load_for_checkpoint

    seg, kind, _ = _load_for_checkpoint(path, NAMES, tiny_clip, "cpu")
    assert (kind, seg.reference.read_slot, seg.eval_upsampling, seg.test_resize) == \
        ("reclip++", "release", "release", "release")
    ours = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in fresh.trainable_state_dict().items()}, str(ours))
    seg, _, _ = _load_for_checkpoint(ours, NAMES, tiny_clip, "cpu", allow_legacy=True)
    assert seg.reference.read_slot == "eot" and getattr(seg, "eval_upsampling", "crop") == "crop"


def test_convert_release_checkpoint_errors(tiny_clip):
    from reclip_core.model import ReCLIPPP

    model = ReCLIPPP(tiny_clip, NAMES, templates=["a photo of a {}."])
    state = _release_state(model, prefix="")
    del state["pe_proj.weight"]
    with pytest.raises(ValueError, match="positional.proj.weight"):
        convert_release_checkpoint(state)
    with pytest.raises(FileNotFoundError):
        convert_release_checkpoint("/nonexistent/best_weight.pth")
    # a checkpoint for another class count does not load silently
    other = ReCLIPPP(tiny_clip, NAMES + ["bus"], templates=["a photo of a {}."])
    with pytest.raises(ValueError, match="shape"):
        other.load_trainable_state_dict(convert_release_checkpoint(_release_state(model)))


def test_find_checkpoint_accepts_run_or_folder(tmp_path):
    save_checkpoint(tmp_path / "run" / "checkpoints", {"w": torch.zeros(1)}, {"step": 3})
    assert find_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / LATEST
    assert find_checkpoint(tmp_path / "run" / "checkpoints" / LATEST) is not None
    assert find_checkpoint(tmp_path / "nothing") is None
    with pytest.raises(FileNotFoundError, match="train first"):
        load_checkpoint(tmp_path / "nothing")
