"""The typed config groups of ``reclip_core.config_schema``: the validation table and the resume rule follow from them."""
from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, fields, is_dataclass
from pathlib import Path

import pytest

from reclip_core import config_schema as S
from reclip_core.config import SCHEMA, Key, available_configs, load_config, valid_keys, validate
from reclip_core.provenance import RESUME_FREE_KEYS, config_fingerprint, fingerprint_matches
from reclip_core.training import _jsonable

ROOT = Path(__file__).resolve().parents[1]
# Checkpoints already written store a fingerprint without exactly these keys: the set must not change.
FROZEN_RESUME_FREE = {"epoch", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "device",
                      "output_dir", "data_root", "max_val_images", "val_split", "hypothesis_batch_size",
                      "num_threads", "eval_batch_size"}


def _group_keys():
    return [f.name for g in S.GROUPS for f in fields(g)]


def test_every_schema_key_in_exactly_one_group():
    keys = _group_keys()
    assert len(keys) == len(set(keys))
    assert keys == list(SCHEMA)  # the groups' order is the schema's (and valid_keys' messages')
    assert [f.name for f in fields(S.ClipConfig)] == list(SCHEMA["clip"])
    assert valid_keys()[:3] == ["dataset", "profile", "class_names"] and "clip.arch" in valid_keys()


def test_group_fields_carry_help_and_match_the_schema():
    for g in S.GROUPS + (S.ClipConfig,):
        assert g.__doc__
        for f, hint in S.group_fields(g):
            if is_dataclass(hint):
                continue
            assert f.metadata["help"], f.name
            spec = SCHEMA["clip"][f.name] if g is S.ClipConfig else SCHEMA[f.name]
            assert isinstance(spec, Key) and spec.help == f.metadata["help"]
            assert (spec.types, spec.optional) == S.accepted_types(hint)
    assert SCHEMA["score_scale"].types == (float, str) and SCHEMA["score_scale"].optional
    assert SCHEMA["lr"].default is S.REQUIRED and SCHEMA["scale_range"].default == [0.5, 2.0]
    assert SCHEMA["dataset"].choices == S.DATASET_NAMES


def test_resume_free_keys_are_the_run_group():
    assert RESUME_FREE_KEYS == tuple(f.name for f in fields(S.RunConfig))
    assert set(RESUME_FREE_KEYS) == FROZEN_RESUME_FREE
    assert not {"profile", "seed"} & set(RESUME_FREE_KEYS)


@pytest.mark.parametrize("name", available_configs())
def test_typed_round_trips_every_shipped_config(name):
    cfg = load_config(name)
    groups = cfg.typed()
    assert groups.flat() == dict(cfg)
    assert groups.optimisation.lr == cfg.lr and groups.model.clip.arch == cfg.clip.arch
    assert groups.run.epoch == cfg["epoch"] and groups.data.dataset == cfg["dataset"]
    with pytest.raises(FrozenInstanceError):
        groups.optimisation.lr = 1.0  # type: ignore[misc]
    assert groups.optimisation.scale_range == cfg["scale_range"]
    assert groups.optimisation.scale_range is not cfg["scale_range"]  # copies: the frozen groups share nothing


def test_unknown_keys_still_refused_with_the_valid_keys():
    base = dict(load_config("toy"))
    for bad, dotted in (({**base, "max_epochs": 5}, "max_epochs"), ({**base, "clip": {"archh": "toy"}}, "clip.archh")):
        with pytest.raises(ValueError) as err:
            validate(bad)
        assert f"unknown config key {dotted!r}; valid keys: {', '.join(valid_keys())}." == str(err.value)
    with pytest.raises(ValueError, match="unknown config key 'max_epochs'"):
        load_config("toy", ["max_epochs=5"])
    with pytest.raises(ValueError, match="config lacks the required key 'dataset'"):
        validate({k: v for k, v in base.items() if k != "dataset"})


def _committed_checkpoints():
    return sorted((ROOT / "results").glob("toy/**/checkpoints/latest.json"))


@pytest.mark.skipif(not _committed_checkpoints(), reason="no committed toy runs")
def test_committed_toy_runs_keep_their_config_fingerprint():
    """What ``training._resume`` compares: the stored fingerprint against the config's (CLIP weights aside)."""
    for path in _committed_checkpoints():
        state = json.loads(path.read_text(encoding="utf-8"))
        stored = {k: v for k, v in state["fingerprint"].items() if k != "clip_weights"}
        assert fingerprint_matches(stored, _jsonable(config_fingerprint(validate(state["config"])))), path


def test_a_fingerprint_matches_up_to_new_keys_at_their_default():
    cfg = _jsonable(config_fingerprint(load_config("toy")))
    older = {k: v for k, v in cfg.items() if k not in ("loss_normalisation", "hypothesis_tiling")}
    older["clip"] = {k: v for k, v in cfg["clip"].items() if k != "ln_eps"}
    assert fingerprint_matches(older, cfg)  # keys added later, at their default: the same computation
    assert not fingerprint_matches(older, {**cfg, "loss_normalisation": "batch"})  # a new key not at its default
    assert not fingerprint_matches(older, {**cfg, "clip": {**cfg["clip"], "ln_eps": 1e-6}})
    assert not fingerprint_matches({**cfg, "lr": 1.0}, cfg)  # a differing key
    assert not fingerprint_matches(cfg, older)  # a key the config no longer has


def test_where_the_feature_cache_lies_is_not_part_of_the_computation():
    cfg = _jsonable(config_fingerprint(load_config("toy", ["feature_cache_path=/a/cache.safetensors"])))
    assert "feature_cache_path" not in cfg
    older = {**cfg, "feature_cache_path": "/b/cache.safetensors"}  # a checkpoint written before the key was left out
    assert fingerprint_matches(older, cfg) and fingerprint_matches(cfg, older)
    assert not fingerprint_matches({**older, "seed": 7}, cfg)  # every other key still counts
