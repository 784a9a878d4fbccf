"""The small CLIP of the toy world, built from open_clip's own classes.

* :func:`build_toy_clip` — an ``open_clip.CLIP`` from a model config in open_clip's JSON format
  (``reclip_core/configs/toy_clip.json``: ViT width 128, 4 layers, 4 heads, patch 8 on 64x64;
  text width 128, 3 layers, context 20; QuickGELU like OpenAI CLIP).
* :class:`ToyTokenizer` — a word-level tokenizer over a reduced vocabulary (the words of the
  toy-world captions and class names), the one the toy CLIP was pretrained with.
* :func:`load_toy_clip` — the committed pretrained weights (``reclip_core/pretrained/toy_clip/``,
  rebuilt by ``make toy-clip``), checked against the sha256 in their manifest, in eval mode, every
  parameter frozen, with ``model.tokenizer`` attached (docs/architecture.md).

Tokenizer contract (what ``reclip_core.text`` and ``ReferencePrompt`` rely on): calling it on a
list of strings returns a ``LongTensor[N, context_length]`` whose rows are
``[sot, word ids..., eot, 0, 0, ...]``; ``eot_token_id`` is the largest id of the vocabulary
(open_clip's ``argmax`` text pooling finds it); id 0 is padding and a real embedding row.

Vocabulary mapping (stored with the weights in ``config.json["tokenizer"]["vocab"]``): text is
lower-cased and split by the regular expression ``[a-z]+|[0-9]+|[^\\sa-z0-9]`` (words, digit runs,
single punctuation marks); a piece's id is its index in the vocabulary list, or 1 (``<unk>``) when
it is not listed. ``vocab[0] = "<pad>"``, ``vocab[1] = "<unk>"``, ``vocab[-2] = "<sot>"``,
``vocab[-1] = "<eot>"``. This replaces CLIP's 49,408-entry BPE table (most of a small CLIP's
weights) by a few dozen rows; pretraining captions contain out-of-vocabulary words on purpose
(see the presets' caption templates) so ``<unk>`` is a trained embedding.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_PATH = PACKAGE_DIR / "configs" / "toy_clip.json"
PRETRAINED_DIR = PACKAGE_DIR / "pretrained"
WEIGHTS_FILE = "toy_clip.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"

# open_clip model-config keys passed to open_clip.CLIP; the rest of the JSON is ours.
_MODEL_KEYS = ("embed_dim", "quick_gelu", "vision_cfg", "text_cfg")


def toy_clip_dir(preset: str = "biased") -> Path:
    """Folder of the committed toy CLIP pretrained on ``preset``: ``pretrained/toy_clip`` for
    ``biased`` (the default), ``pretrained/toy_clip_<preset>`` otherwise."""
    return PRETRAINED_DIR / ("toy_clip" if preset == "biased" else f"toy_clip_{preset}")


def load_toy_config(path: str | os.PathLike | None = None) -> dict:
    """Read a toy-CLIP config JSON (default ``reclip_core/configs/toy_clip.json``)."""
    path = Path(path) if path is not None else CONFIG_PATH
    if not path.is_file():
        raise FileNotFoundError(f"toy CLIP config {path} does not exist")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class ToyTokenizer:
    """Word-level tokenizer of the toy CLIP (see the module docstring for the id mapping).

    ``tok(texts, context_length=None) -> LongTensor[N, context_length]``. Texts longer than the
    context are truncated and end with ``eot`` (as open_clip does)."""

    def __init__(self, vocab: Sequence[str], context_length: int,
                 pattern: str = r"[a-z]+|[0-9]+|[^\sa-z0-9]", lowercase: bool = True):
        vocab = list(vocab)
        if len(vocab) < 5 or vocab[0] != "<pad>" or vocab[1] != "<unk>" \
                or vocab[-2] != "<sot>" or vocab[-1] != "<eot>":
            raise ValueError("toy tokenizer vocabulary must be ['<pad>', '<unk>', words..., "
                             "'<sot>', '<eot>']; regenerate reclip_core/configs/toy_clip.json")
        if len(set(vocab)) != len(vocab):
            raise ValueError("toy tokenizer vocabulary has duplicate entries")
        self.vocab = vocab
        self.encoder = {w: i for i, w in enumerate(vocab)}
        self.context_length = int(context_length)
        self.pad_token_id = 0
        self.unk_token_id = 1
        self.sot_token_id = len(vocab) - 2
        self.eot_token_id = len(vocab) - 1
        self.vocab_size = len(vocab)
        self.pattern = pattern
        self.lowercase = lowercase
        self._re = re.compile(pattern)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ToyTokenizer":
        t = config["tokenizer"]
        return cls(t["vocab"], config["text_cfg"]["context_length"],
                   pattern=t.get("pattern", r"[a-z]+|[0-9]+|[^\sa-z0-9]"),
                   lowercase=t.get("lowercase", True))

    def split(self, text: str) -> list[str]:
        return self._re.findall(text.lower() if self.lowercase else text)

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text`` (no sot/eot, no padding)."""
        return [self.encoder.get(w, self.unk_token_id) for w in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i in (self.pad_token_id, self.sot_token_id):
                continue
            if i == self.eot_token_id:
                break
            out.append(self.vocab[i])
        return " ".join(out)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None
                 ) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        n_ctx = int(context_length or self.context_length)
        out = torch.zeros(len(texts), n_ctx, dtype=torch.long)
        for k, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"the toy tokenizer takes strings, got {type(text).__name__}")
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > n_ctx:
                ids = ids[:n_ctx]
                ids[-1] = self.eot_token_id
            out[k, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __repr__(self) -> str:
        return f"ToyTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def build_toy_clip(config: str | os.PathLike | Mapping[str, Any] | None = None):
    """A randomly initialised ``open_clip.CLIP`` from a toy config (dict or JSON path; default
    ``reclip_core/configs/toy_clip.json``), with ``model.tokenizer`` attached and the CLIP image
    mean/std recorded on ``model.visual`` (``image_mean``/``image_std``)."""
    # open_clip takes ~2.7 s beyond torch to import; the toy world's readers load this module without it
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if config is None or isinstance(config, (str, os.PathLike)):
        config = load_toy_config(config)
    cfg = dict(config)
    if cfg["text_cfg"]["vocab_size"] != len(cfg["tokenizer"]["vocab"]):
        raise ValueError("toy CLIP config: text_cfg.vocab_size differs from the tokenizer "
                         "vocabulary length; fix the config")
    model = open_clip.CLIP(
        embed_dim=int(cfg["embed_dim"]),
        vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=bool(cfg.get("quick_gelu", False)),
    )
    model.visual.image_mean = tuple(cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073)))
    model.visual.image_std = tuple(cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711)))
    model.tokenizer = ToyTokenizer.from_config(cfg)
    return model


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_toy_clip(weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  preset: str = "biased"):
    """The pretrained toy CLIP: eval mode, all parameters frozen, ``model.tokenizer`` attached,
    ``model.toy_manifest`` holding its manifest (seed, steps, preset, data hash, metrics).

    ``weights_dir`` defaults to :func:`toy_clip_dir` of ``preset`` (``biased`` ->
    ``reclip_core/pretrained/toy_clip``, ``uniform`` -> ``.../toy_clip_uniform``). The weights'
    sha256 must equal the manifest's, else ``ValueError``."""
    wdir = Path(weights_dir) if weights_dir is not None else toy_clip_dir(preset)
    weights, cfg_path, man_path = wdir / WEIGHTS_FILE, wdir / CONFIG_FILE, wdir / MANIFEST_FILE
    for p in (weights, cfg_path, man_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"toy CLIP file {p} is missing; run `make toy-clip` (python -m "
                f"data_prep.pretrain_toy_clip --preset {preset}) to rebuild the weights")
    with open(man_path, encoding="utf-8") as f:
        manifest = json.load(f)
    digest = sha256_file(weights)
    if digest != manifest.get("sha256"):
        raise ValueError(
            f"toy CLIP weights {weights} have sha256 {digest}, but {man_path} records "
            f"{manifest.get('sha256')}; the file is corrupt or stale: run `make toy-clip` to "
            f"rebuild it (or restore it with git checkout)")
    config = load_toy_config(cfg_path)
    model = build_toy_clip(config)
    from open_clip.factory import load_state_dict  # loaded by build_toy_clip just above

    state = load_state_dict(str(weights))
    state = {k: v.float() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"toy CLIP weights {weights} do not fit the config {cfg_path} "
                         f"(missing {missing}, unexpected {unexpected}); run `make toy-clip`")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.toy_manifest = manifest
    model.toy_config = config
    return model
