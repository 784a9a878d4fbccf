"""Run configurations: YAML files shipped in ``reclip_core/configs/`` plus ``--set k=v`` overrides.

A config is one flat-ish mapping (only ``clip`` and ``dataset_kwargs`` nest). Every key has a
declared type and default in :data:`SCHEMA`, derived from the grouped dataclasses of
:mod:`reclip_core.config_schema`; a file or an override naming any other key is an error whose
message lists the valid keys, because a typo such as ``--set max_epochs=5`` would otherwise be
silently ignored and a long run would use the default.

    cfg = load_config("voc", ["lr=0.02", "clip.pretrained=/path/to/weights.safetensors"])
    cfg.lr, cfg.clip.arch, cfg["batch_size"], cfg.typed().optimisation.lr
"""
from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import Field, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .cli_errors import not_a_file
from .config_schema import (GROUPS, KNOWN_PROFILES, REQUIRED, ConfigGroups, accepted_types,
                            default_of, group_fields)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Key:
    """One config key: accepted Python types, default, and a one-line meaning (docs/training.md)."""

    types: Tuple[type, ...]
    default: Any
    help: str
    optional: bool = False  # None allowed
    choices: Optional[Tuple[Any, ...]] = None


def _key(f: Field, hint: Any) -> Union[Key, Dict[str, Key]]:
    """A dataclass field → its :class:`Key` (a nested group → a mapping of them)."""
    if is_dataclass(hint):
        return {g.name: _key(g, h) for g, h in group_fields(hint)}
    types, optional = accepted_types(hint)
    return Key(types, default_of(f), f.metadata["help"], optional, f.metadata["choices"])


def _schema() -> Dict[str, Any]:
    """Every key in the order of the groups (data, model, hypotheses, optimisation, evaluation, run)."""
    return {f.name: _key(f, hint) for g in GROUPS for f, hint in group_fields(g)}


SCHEMA: Dict[str, Any] = _schema()  # key -> Key, or (``clip``) sub-key -> Key
NESTED = tuple(k for k, v in SCHEMA.items() if isinstance(v, dict))


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

    def typed(self) -> ConfigGroups:
        """The config as typed, frozen groups (``cfg.typed().optimisation.lr``, ``cfg.typed().run``)."""
        return ConfigGroups.from_flat(self)

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
            if spec.default is REQUIRED:
                raise ValueError(f"config lacks the required key {k!r} ({spec.help}); "
                                 f"copy one of {available_configs()} from {CONFIG_DIR} and edit it.")
            out[k] = copy.deepcopy(spec.default)
    if out["clip"]["arch"] == "auto":
        # resolved here, once, so every command and file records the CLIP that was really used
        from .clip_choice import resolve_auto_clip

        out["clip"]["arch"], out["clip"]["pretrained"] = resolve_auto_clip()
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
    if c["train_split"] in ("val", c["val_split"]):
        # refused before any reader is built: a labelled split's reader opens its label files
        raise ValueError(f"train_split {c['train_split']!r} is the labelled evaluation split: training is "
                         "unsupervised and reads only unlabeled images. Use train_split=train (hypotheses of "
                         "the labelled split for diagnostics: `hypothesis --split val`).")
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


__all__ = ("SCHEMA", "Config", "load_config", "validate", "valid_keys", "available_configs",
           "apply_overrides", "parse_override", "resolve_config_path", "KNOWN_PROFILES")
