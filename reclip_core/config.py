"""Run configurations: YAML files shipped in ``reclip_core/configs/`` plus ``--set k=v`` overrides.

A config is one flat-ish mapping (only ``clip`` and ``dataset_kwargs`` nest). Every key has a
declared type and default in :data:`SCHEMA`; a file or an override naming any other key is an
error whose message lists the valid keys, because a typo such as ``--set max_epochs=5`` would
otherwise be silently ignored and a long run would use the default.

    cfg = load_config("voc", ["lr=0.02", "clip.pretrained=/path/to/weights.safetensors"])
    cfg.lr, cfg.clip.arch, cfg["batch_size"]
"""
from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: datasets the readers know (``reclip_core.datasets.get_dataset`` names)
KNOWN_DATASETS = ("voc", "context", "ade", "cityscapes", "coco_stuff27", "toyworld", "folder")
#: what a config's ``profile`` may say: the paper's settings, the toy lab, or anything hand-made
KNOWN_PROFILES = ("paper", "toy", "quick", "custom")
MODEL_KINDS = ("reclip++", "reclip")
HYPOTHESIS_MODES = ("window", "threshold")
# Release options: the first value is the project's choice (the default), the second the release's.
CLASS_NAME_SETS = ("project", "release")
HYPOTHESIS_TILINGS = ("fit", "release")
HYPOTHESIS_CLIPS = ("model", "plain")
LOSS_NORMALISATIONS = ("nonempty", "batch")
BIAS_MODES = ("both", "class", "space")

_REQUIRED = object()  # marker: the key has no default and must come from the file


@dataclass(frozen=True)
class Key:
    """One config key: accepted Python types, default, and a one-line meaning (docs/training.md)."""

    types: Tuple[type, ...]
    default: Any
    help: str
    optional: bool = False  # None allowed
    choices: Optional[Tuple[Any, ...]] = None


def _k(types, default, help, optional=False, choices=None) -> Key:
    types = types if isinstance(types, tuple) else (types,)
    return Key(types, default, help, optional, choices)


# Keys shared with the benchmark configs (paper profile) come first, then the suite's own.
SCHEMA: Dict[str, Key] = {
    "dataset": _k(str, _REQUIRED, "dataset reader name", choices=KNOWN_DATASETS),
    "profile": _k(str, "custom", "which settings these are", choices=KNOWN_PROFILES),
    "class_names": _k((str, list), None, "class list: a dataset name for class_names(), a text file (one class per "
                      "line, comma-separated synonyms), or a list", optional=True),
    "class_name_set": _k(str, "project", "which list a dataset name reads: 'project' (class_names/<name>.txt) or "
                         "'release' (class_names/release/<name>.txt, the strings the authors' checkpoints were "
                         "trained with)", choices=CLASS_NAME_SETS),
    "num_classes": _k(int, None, "number of evaluated classes (checked against class_names)", optional=True),
    "test_size": _k(int, _REQUIRED, "evaluation short side (long side <= max_long_side)"),
    "crop": _k(int, _REQUIRED, "training crop side; also sets the hypothesis window int(crop/6)"),
    "pd_threshold": _k(float, _REQUIRED, "presence-filter threshold (PD)"),
    "pd_scale": _k(float, 10.0, "PD softmax scale s: p = softmax(s · logits) (ReCLIP++'s 10)"),
    "reclip_pd_threshold": _k(float, None, "PD threshold of a ReCLIP model's own head (release: TEST.ReCLIP_PD; "
                              "None: pd_threshold)", optional=True),
    "reclip_pd_scale": _k(float, None, "PD softmax scale of a ReCLIP model's own head (release: 100; None: "
                          "pd_scale)", optional=True),
    "max_epoch": _k(int, _REQUIRED, "MAX_EPOCH of the poly schedule"),
    "epoch": _k(int, _REQUIRED, "EPOCH: training stops after this many epochs"),
    "batch_size": _k(int, _REQUIRED, "global batch size (split over DDP processes)"),
    "lr": _k(float, _REQUIRED, "base learning rate"),
    "momentum": _k(float, 0.9, "SGD momentum"),
    "weight_decay": _k(float, 5e-4, "SGD weight decay"),
    "hypothesis_window": _k(int, None, "window side in pixels (None: int(crop/6))", optional=True),
    "hypothesis_stride": _k(int, None, "window stride (None: int(window/2))", optional=True),
    "hypothesis_tiling": _k(str, "fit", "window starts: 'fit' (every window that fits; one clipped window on a "
                            "smaller image) or 'release' (starts strictly below H - w and W - w)",
                            choices=HYPOTHESIS_TILINGS),
    "hypothesis_clip": _k(str, "model", "CLIP of the hypotheses: 'model' (with clip.ln_eps / clip.cls_token) or "
                          "'plain' (CLIP's own eps and class embedding, as the release)", choices=HYPOTHESIS_CLIPS),
    "reduce_zero_label": _k(bool, False, "label 0 is background -> ignore (reader option)"),
    "data_root": _k(str, None, "dataset root folder (None: the reader's default)", optional=True),
    "clip": {
        "arch": _k(str, "ViT-B-16-quickgelu", "open_clip architecture, 'toy', or a model-config .json"),
        "pretrained": _k(str, "openai", "weights tag or file (None: random)", optional=True),
        "ln_eps": _k(float, None, "LayerNorm eps in the visual blocks (release: 1e-6)", optional=True),
        "cls_token": _k(str, None, "path to a class-token tensor (release option)", optional=True),
    },
    # --- the suite's own keys --------------------------------------------------------------------
    "seed": _k(int, 0, "seed of sampling, augmentation and Gumbel noise"),
    "output_dir": _k(str, None, "run folder (None: runs/<config name>)", optional=True),
    "model": _k(str, "reclip++", "what to train", choices=MODEL_KINDS),
    "use_decoder": _k(bool, True, "ReCLIP++ mask decoder on (False: rectification only)"),
    "bias_mode": _k(str, "both", "ReCLIP++ bias ablation", choices=BIAS_MODES),
    "gumbel_scale": _k(float, None, "scale of the logits inside the loss's Gumbel-Softmax (None: the method's "
                       "constant, 100 for ReCLIP++ and 1000 for ReCLIP; other values are ablations)", optional=True),
    "loss_normalisation": _k(str, "nonempty", "divisor of a batch's loss: 'nonempty' (images with a hypothesis) "
                             "or 'batch' (the batch size, as the release)", choices=LOSS_NORMALISATIONS),
    "score_scale": _k((float, str), None, "scale s of the loss's class scores s · pooled_k · textᵀ (None: the method's "
                      "100, OpenAI CLIP's logit scale; 'clip': this CLIP's own logit scale exp(logit_scale), "
                      "≈ 100 for OpenAI's; a number: an ablation)", optional=True),
    "templates": _k((str, list), "all", "'all' (85 templates), 'single' ('a photo of a {}.') or a list"),
    "hypothesis_mode": _k(str, "window", "ReCLIP++ window vote or ReCLIP threshold/top-K", choices=HYPOTHESIS_MODES),
    "hypothesis_threshold": _k(float, 23.0, "ReCLIP: whole-image score (100*cos) threshold"),
    "hypothesis_topk": _k(int, 1, "ReCLIP: classes taken when none passes the threshold"),
    "hypothesis_batch_size": _k(int, 256, "windows per CLIP forward (bounds memory)"),
    "hypothesis_input_size": _k(int, None, "window input side (None: the CLIP's own image size)", optional=True),
    "max_long_side": _k(int, 2048, "long-side cap of evaluation and training resizes"),
    "scale_range": _k(list, [0.5, 2.0], "random rescale ratio range of training views"),
    "train_scale": _k(list, None, "[long, short] base scale of training views (None: [max_long_side, crop])", optional=True),
    "flip": _k(bool, True, "random horizontal flip of training views"),
    "photometric": _k(bool, True, "photometric distortion of training views"),
    "feature_cache": _k(bool, False, "cache frozen CLIP features of fixed views (see docs/training.md)"),
    "feature_cache_views": _k(int, 1, "fixed views per image when feature_cache is on"),
    "feature_cache_path": _k(str, None, "where the feature cache lives (None: <run>/feature_cache.safetensors); "
                             "runs with the same CLIP, data and views may share one", optional=True),
    "num_workers": _k(int, 0, "DataLoader workers"),
    "num_threads": _k(int, None, "torch CPU threads of a CLI command (None: torch's default)", optional=True),
    "eval_batch_size": _k(int, 8, "consecutive validation images of equal size run in one forward"),
    "device": _k(str, "auto", "'auto', 'cpu', 'cuda', 'cuda:1'..."),
    "log_every": _k(int, 10, "steps between progress lines and loss-CSV flushes"),
    "checkpoint_every": _k(int, 0, "steps between mid-epoch checkpoints (0: end of each epoch only)"),
    "keep_checkpoints": _k(int, 2, "checkpoints kept on disk (older ones are deleted)"),
    "max_train_images": _k(int, None, "use only the first N training images", optional=True),
    "max_val_images": _k(int, None, "evaluate only the first N validation images", optional=True),
    "train_split": _k(str, "train", "split of unlabeled training images"),
    "val_split": _k(str, "val", "split evaluated"),
    "dataset_kwargs": _k(dict, {}, "extra keyword arguments of the dataset reader (e.g. preset)"),
}
NESTED = ("clip",)


def valid_keys() -> List[str]:
    """Every settable key in dotted form (``clip.arch``)."""
    out = []
    for k, v in SCHEMA.items():
        if isinstance(v, dict):
            out += [f"{k}.{sub}" for sub in v]
        else:
            out.append(k)
    return out


def available_configs() -> List[str]:
    """Names of the run configs shipped in ``reclip_core/configs`` (``*.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


class Config(dict):
    """A validated config: a dict with attribute access (``cfg.lr``, ``cfg.clip.arch``)."""

    name: str = "custom"

    def __getattr__(self, key: str) -> Any:
        try:
            value = self[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}; valid keys: {', '.join(valid_keys())}") from None
        return Config(value) if isinstance(value, dict) and key in NESTED else value

    def to_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(dict(self))

    # Derived values: one place so hypothesis, training and docs agree.
    @property
    def window(self) -> int:
        """Hypothesis window side: ``hypothesis_window`` or int(crop/6) (method.md §3)."""
        return int(self["hypothesis_window"] or int(self["crop"] / 6))

    @property
    def stride(self) -> int:
        return int(self["hypothesis_stride"] or max(1, int(self.window / 2)))

    @property
    def run_dir(self) -> Path:
        return Path(self["output_dir"] or Path("runs") / self.name)


def _type_name(key: Key) -> str:
    names = "/".join(t.__name__ for t in key.types)
    return names + (" or null" if key.optional else "")


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _check_value(dotted: str, key: Key, value: Any) -> Any:
    """Return ``value`` (ints widened to float where a float is expected) or raise ValueError."""
    if value is None:
        if key.optional:
            return None
        raise ValueError(f"config key {dotted!r} must not be null; expected {_type_name(key)}.")
    ok = False
    if float in key.types and isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        # PyYAML follows YAML 1.1, where "1e-4" (no dot in the mantissa) is a string, not a float:
        # `--set lr=1e-4` or `lr: 1e-4` in a config file must still mean 0.0001.
        value = float(value)
    for t in key.types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value, ok = float(value), True
            break
        if t is int and isinstance(value, bool):
            continue  # YAML 'true' is not a count
        if isinstance(value, t):
            ok = True
            break
    if not ok:
        raise ValueError(
            f"config key {dotted!r} expects {_type_name(key)}, got {value!r} ({type(value).__name__})."
        )
    if isinstance(value, float) and not math.isfinite(value):
        # YAML reads `.nan` / `.inf` as floats: a NaN lr would train NaN weights and save them as "good"
        raise ValueError(f"config key {dotted!r} must be a finite number, got {value!r}.")
    if key.choices is not None and value not in key.choices:
        what = {"dataset": "dataset", "profile": "profile"}.get(dotted, "value")
        raise ValueError(f"unknown {what} {value!r} for {dotted!r}; valid: {', '.join(map(str, key.choices))}.")
    return value


def _unknown(dotted: str) -> ValueError:
    return ValueError(f"unknown config key {dotted!r}; valid keys: {', '.join(valid_keys())}.")


def validate(raw: Mapping[str, Any], name: str = "custom") -> Config:
    """Fill defaults, check every key and type, check cross-key constraints → :class:`Config`."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"a config must be a YAML mapping of keys to values, got {type(raw).__name__}.")
    out: Dict[str, Any] = {}
    for k, v in raw.items():
        if k not in SCHEMA:
            raise _unknown(str(k))
        spec = SCHEMA[k]
        if isinstance(spec, dict):
            if not isinstance(v, Mapping):
                raise ValueError(f"config key {k!r} must be a mapping with keys {sorted(spec)}.")
            sub = {}
            for sk, sv in v.items():
                if sk not in spec:
                    raise _unknown(f"{k}.{sk}")
                sub[sk] = _check_value(f"{k}.{sk}", spec[sk], sv)
            out[k] = sub
        else:
            out[k] = _check_value(k, spec, copy.deepcopy(v))
    for k, spec in SCHEMA.items():
        if isinstance(spec, dict):
            sub = out.setdefault(k, {})
            for sk, s in spec.items():
                sub.setdefault(sk, copy.deepcopy(s.default))
        elif k not in out:
            if spec.default is _REQUIRED:
                raise ValueError(f"config lacks the required key {k!r} ({spec.help}); "
                                 f"copy one of {available_configs()} from {CONFIG_DIR} and edit it.")
            out[k] = copy.deepcopy(spec.default)
    _check_constraints(out)
    cfg = Config(out)
    cfg.name = name
    return cfg


def _check_constraints(c: Dict[str, Any]) -> None:
    positive = ("test_size", "crop", "max_epoch", "epoch", "batch_size", "hypothesis_batch_size",
                "max_long_side", "feature_cache_views", "log_every", "keep_checkpoints", "eval_batch_size")
    for k in positive:
        if c[k] <= 0:
            raise ValueError(f"config key {k!r} must be > 0, got {c[k]}.")
    if c["epoch"] > c["max_epoch"]:
        raise ValueError(f"epoch ({c['epoch']}) must not exceed max_epoch ({c['max_epoch']}): the poly "
                         "schedule would reach a negative learning rate.")
    if c["lr"] <= 0:
        raise ValueError(f"lr must be > 0, got {c['lr']}.")
    for k in ("hypothesis_window", "hypothesis_stride", "max_train_images", "max_val_images", "hypothesis_input_size",
              "num_threads", "gumbel_scale", "reclip_pd_scale"):
        if c[k] is not None and c[k] <= 0:
            raise ValueError(f"config key {k!r} must be > 0 or null, got {c[k]}.")
    if c["pd_scale"] <= 0:
        raise ValueError(f"config key 'pd_scale' must be > 0, got {c['pd_scale']}.")
    ss = c["score_scale"]
    if isinstance(ss, str) and ss != "clip" or isinstance(ss, float) and ss <= 0:
        raise ValueError(f"score_scale must be null (the method's 100), 'clip' (the CLIP's own logit scale) "
                         f"or a number > 0, got {ss!r}.")
    if c["num_workers"] < 0 or c["checkpoint_every"] < 0 or c["hypothesis_topk"] < 1:
        raise ValueError("num_workers and checkpoint_every must be >= 0 and hypothesis_topk >= 1.")
    if not 0 <= c["momentum"] < 1 or c["weight_decay"] < 0:
        raise ValueError(f"momentum must lie in [0, 1) and weight_decay be >= 0, got {c['momentum']} and "
                         f"{c['weight_decay']}.")
    sr = c["scale_range"]
    if len(sr) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                               for x in sr) or not 0 < sr[0] <= sr[1]:
        raise ValueError(f"scale_range must be [low, high] with 0 < low <= high, got {sr}.")
    ts = c["train_scale"]
    if ts is not None and (len(ts) != 2 or not all(isinstance(x, int) and x > 0 for x in ts)):
        raise ValueError(f"train_scale must be [long, short] positive ints or null, got {ts}.")
    t = c["templates"]
    if isinstance(t, str) and t not in ("all", "single"):
        raise ValueError(f"templates must be 'all', 'single' or a list of strings with '{{}}', got {t!r}.")
    if isinstance(t, list) and (not t or not all(isinstance(s, str) and "{}" in s for s in t)):
        raise ValueError("templates must be a non-empty list of strings each containing '{}'.")


def parse_override(item: str) -> Tuple[str, Any]:
    """``"k=v"`` → (k, YAML-parsed v): ``lr=0.02`` → 0.02, ``flip=false`` → False, ``x=null`` → None."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r} (e.g. --set lr=0.02 --set clip.arch=toy).")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        raise ValueError(f"--set {item!r}: cannot parse the value as YAML ({err}).") from None
    return key, value


def apply_overrides(raw: Dict[str, Any], overrides: Iterable[Union[str, Tuple[str, Any]]]) -> Dict[str, Any]:
    """Apply ``k=v`` strings (or (k, v) pairs) to a raw mapping; unknown keys raise ValueError."""
    raw = copy.deepcopy(dict(raw))
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        parts = key.split(".")
        if len(parts) == 1 and key in SCHEMA and not isinstance(SCHEMA[key], dict):
            raw[key] = value
        elif len(parts) == 2 and parts[0] in NESTED and parts[1] in SCHEMA[parts[0]]:
            sub = dict(raw.get(parts[0]) or {})
            sub[parts[1]] = value
            raw[parts[0]] = sub
        elif len(parts) == 2 and parts[0] == "dataset_kwargs":
            sub = dict(raw.get("dataset_kwargs") or {})
            sub[parts[1]] = value
            raw["dataset_kwargs"] = sub
        else:
            raise _unknown(key)
    return raw


def resolve_config_path(name_or_path: Union[str, os.PathLike]) -> Path:
    """A config name (``voc``, ``toy``) or a YAML path → the file; unknown names list valid ones."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in str(name_or_path):
        if not p.is_file():
            from .cli_errors import not_a_file

            raise FileNotFoundError(f"config file {p} {not_a_file(p)}; use one of {available_configs()} "
                                    "or a path to a YAML file.")
        return p
    cand = CONFIG_DIR / f"{name_or_path}.yaml"
    if not cand.is_file():
        raise ValueError(f"unknown config {str(name_or_path)!r}; valid: {', '.join(available_configs())} "
                         "(or a path to a YAML file).")
    return cand


def load_config(name_or_path: Union[str, os.PathLike, Mapping[str, Any]],
                overrides: Sequence[Union[str, Tuple[str, Any]]] = ()) -> Config:
    """Load a shipped config by name, a YAML file, or a mapping; apply ``overrides``; validate."""
    if isinstance(name_or_path, Mapping):
        raw, name = dict(name_or_path), "custom"
    else:
        path = resolve_config_path(name_or_path)
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config {path} is not a YAML mapping.")
        name = path.stem
    return validate(apply_overrides(raw, overrides), name=name)


# ------------------------------------------------------------------------------------------------
# Things every command derives from a config
# ------------------------------------------------------------------------------------------------
def resolve_class_names(cfg: Mapping[str, Any]) -> List[str]:
    """The class list: ``class_names`` (list, dataset name or text file) else ``text.class_names(dataset)``;
    a dataset name reads the ``class_name_set`` list (the project's or the release's), any other
    string is a class-name file (``text.read_class_file``)."""
    from .text import DATASETS, class_names, read_class_file, validate_class_names

    cn = cfg.get("class_names")
    source = cfg.get("class_name_set", "project")
    if isinstance(cn, list):
        names = validate_class_names(cn)
    elif isinstance(cn, str) and cn not in DATASETS:
        if not Path(cn).is_file():
            raise ValueError(f"class_names {cn!r} is neither a dataset name ({', '.join(DATASETS)}) nor an existing "
                             "class-name file; pass a file with one class per line (docs/your-images.md).")
        names = read_class_file(cn)
    elif isinstance(cn, str):
        names = class_names(cn, source=source)
    elif cfg["dataset"] == "folder":
        raise ValueError("the folder dataset needs your class names: --set class_names=FILE (one class per line, "
                         "see docs/your-images.md) or a list --set 'class_names=[cat, dog]'.")
    elif cfg["dataset"] == "toyworld" and source == "project":
        from .datasets.toyworld import toyworld_class_names

        names = toyworld_class_names(cfg.get("dataset_kwargs", {}).get("preset", "biased"))
    else:
        names = class_names(cfg["dataset"], source=source)
    if cfg.get("num_classes") is not None and cfg["num_classes"] != len(names):
        raise ValueError(f"num_classes is {cfg['num_classes']} but the class list has {len(names)} names.")
    return names


def resolve_templates(cfg: Mapping[str, Any]) -> List[str]:
    from .text import PROMPT_TEMPLATES

    t = cfg["templates"]
    if t == "all":
        return list(PROMPT_TEMPLATES)
    if t == "single":
        return ["a photo of a {}."]
    return list(t)


def build_dataset(cfg: Mapping[str, Any], split: str):
    """The dataset reader for ``split`` (``get_dataset`` when the readers are installed)."""
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if cfg["dataset"] == "folder":  # label ids are checked against the class count
        kwargs.setdefault("num_classes", len(resolve_class_names(cfg)))
    try:
        from .datasets import get_dataset  # the benchmark readers' entry point
    except ImportError:
        get_dataset = None
    if get_dataset is not None:
        return get_dataset(cfg["dataset"], split, root=cfg.get("data_root"), **kwargs)
    if cfg["dataset"] == "toyworld":
        from .datasets.toyworld import ToyWorld

        return ToyWorld(split, root=cfg.get("data_root"), **kwargs)
    raise ValueError(f"no reader for dataset {cfg['dataset']!r} is installed (reclip_core.datasets.get_dataset).")


__all__ = ("SCHEMA", "Config", "load_config", "validate", "valid_keys", "available_configs",
           "apply_overrides", "parse_override", "resolve_config_path", "resolve_class_names",
           "resolve_templates", "build_dataset", "KNOWN_DATASETS", "KNOWN_PROFILES")
