"""The planted bias of the known-answer toy CLIP and the recovery metric."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reclip_core.backbone import dense_features, encode_image_cls
from reclip_core.bias_recovery import bias_recovery
from reclip_core.clip_loading import clip_fingerprint
from reclip_core.planted_bias import PlantedBias, load_spec, plant_bias, planted_bias_from_spec, planted_map
from reclip_core.rectify import clip_logits
from reclip_core.run_inputs import load_config_clip
from reclip_core.text import PROMPT_TEMPLATES, text_embeddings
from reclip_core.toy_clip import build_toy_clip


def _random_toy_clip(seed: int = 0):
    torch.manual_seed(seed)
    clip = build_toy_clip().eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    return clip


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- the planted map
def test_planted_map_equals_its_definition_on_hand_made_inputs():
    text = torch.eye(3, 4)  # three orthonormal class texts in D = 4
    planted = PlantedBias(text, class_preference=torch.tensor([0.1, 0.0, -0.2]),
                          amplitude=torch.tensor([0.0, 0.5, 0.0]),
                          centre=torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]]),
                          sigma=torch.tensor([1.0, 0.2, 1.0]))
    bmap = planted.logit_map((2, 4))  # token centres x ∈ {1/8, 3/8, 5/8, 7/8}, y ∈ {1/4, 3/4}
    assert bmap.shape == (3, 2, 4)
    assert torch.allclose(bmap[0], torch.full((2, 4), 0.1))
    assert torch.allclose(bmap[2], torch.full((2, 4), -0.2))
    # class 1 at (x, y) = (3/8, 3/4): distance² to (1/4, 3/4) = 1/64
    assert bmap[1, 1, 1].item() == pytest.approx(0.5 * math.exp(-(1 / 64) / (2 * 0.04)), abs=1e-7)
    # (x, y) = (7/8, 1/4): distance² = (5/8)² + (1/2)²
    assert bmap[1, 0, 3].item() == pytest.approx(0.5 * math.exp(-((5 / 8) ** 2 + 0.25) / 0.08), abs=1e-7)
    # its offset moves each class text's score by exactly the map
    offset = planted.feature_offset((2, 4))  # [h*w, D]
    assert torch.allclose(offset @ text.T, bmap.flatten(1).T, atol=1e-6)


def test_offset_is_exact_for_correlated_class_texts():
    gen = torch.Generator().manual_seed(3)
    text = torch.nn.functional.normalize(torch.randn(5, 16, generator=gen) + 2.0, dim=-1)  # cosines ≈ 0.8
    planted = PlantedBias(text, torch.linspace(-0.1, 0.1, 5), torch.full((5,), 0.3),
                          torch.rand(5, 2, generator=gen), torch.full((5,), 0.3))
    offset = planted.feature_offset((6, 7))
    assert torch.allclose(offset @ text.T, planted.logit_map((6, 7)).flatten(1).T, atol=1e-5)


def test_dependent_class_texts_are_refused():
    text = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="linearly dependent"):
        PlantedBias(text, torch.zeros(2), torch.zeros(2), torch.zeros(2, 2), torch.ones(2))


def test_planted_clip_logits_move_by_exactly_the_map():
    plain = _random_toy_clip()
    planted = plant_bias(_random_toy_clip(), "known")
    x = _images()
    text = text_embeddings(plain, planted.planted_bias_names, PROMPT_TEMPLATES)
    f0, hw = dense_features(plain, x)
    f1, _ = dense_features(planted, x)
    moved = clip_logits(f1, text) - clip_logits(f0, text)  # [B, C, h, w]
    bmap = planted_map(planted, hw)
    assert bmap.shape[0] == len(planted.planted_bias_names) == 10 and bmap.abs().max() > 0.05
    assert torch.allclose(moved, bmap.expand_as(moved), atol=1e-5)


def test_zero_amplitude_leaves_the_clip_unchanged():
    plain = _random_toy_clip()
    zero = plant_bias(_random_toy_clip(), "known", scale=0.0)
    x = _images()
    assert torch.equal(dense_features(plain, x)[0], dense_features(zero, x)[0])


def test_class_token_path_is_untouched():
    plain = _random_toy_clip()
    planted = plant_bias(_random_toy_clip(), "known")
    x = _images()
    assert torch.equal(encode_image_cls(plain, x), encode_image_cls(planted, x))
    assert torch.equal(plain.encode_image(x), planted.encode_image(x))
    assert not torch.equal(dense_features(plain, x)[0], dense_features(planted, x)[0])


def test_a_planted_bias_changes_the_clip_fingerprint():
    plain, planted = _random_toy_clip(), plant_bias(_random_toy_clip(), "known")
    half = plant_bias(_random_toy_clip(), "known", scale=0.5)
    assert len({clip_fingerprint(plain), clip_fingerprint(planted), clip_fingerprint(half)}) == 3


def test_spec_errors_say_what_to_fix(tmp_path):
    with pytest.raises(ValueError, match="unknown planted-bias spec"):
        load_spec("nonesuch")
    bad = dict(load_spec("known"), space_preference={"red circle": {"amplitude": 1.0, "centre": [0.5]}})
    with pytest.raises(ValueError, match="centre"):
        load_spec(bad)
    spec = dict(load_spec("known"), class_preference={"green square": 0.1})
    with pytest.raises(ValueError, match="green square"):
        planted_bias_from_spec(spec, ["red circle", "blue star"], torch.eye(2, 4))
    with pytest.raises(ValueError, match="toy-CLIP option"):
        load_config_clip({"clip": {"arch": "ViT-B-16", "pretrained": None, "planted_bias": "known"}}, "cpu")


# ---------------------------------------------------------------------------------- patch noise
def _noisy(text: torch.Tensor, sigma: float = 0.2, patch: int = 2, seed: int = 0) -> PlantedBias:
    C = text.shape[0]
    projection = torch.randn(C, 3 * patch * patch, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return PlantedBias(text, torch.zeros(C), torch.zeros(C), torch.full((C, 2), 0.5), torch.ones(C),
                       noise_sigma=sigma, noise_projection=projection, patch=patch)


def test_patch_noise_equals_its_definition_on_a_hand_made_image():
    text = torch.eye(3, 5)
    planted = _noisy(text, sigma=0.2, patch=2)
    image = torch.arange(3 * 2 * 4, dtype=torch.float32).view(1, 3, 2, 4) ** 1.5 / 10  # two 2×2 patches
    noise = planted.patch_noise(image)  # [1, 2, 3]
    for p, cols in enumerate((slice(0, 2), slice(2, 4))):
        x = image[0, :, :, cols].double().reshape(3, 4)  # the patch's pixels per channel, row-major
        u = planted.noise_projection @ (x - x.mean(1, keepdim=True)).reshape(-1)
        assert torch.allclose(noise[0, p], 0.2 * 3 ** 0.5 * u / u.norm(), atol=1e-12)
    # its offset moves each class text's score by exactly the noise
    offset = planted.noise_offset(image)  # [1, 2, D]
    assert torch.allclose(offset @ text.T, noise.float(), atol=1e-6)


def test_patch_noise_ignores_colour_and_averages_away_over_a_region():
    gen = torch.Generator().manual_seed(4)
    text = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen) + 1.0, dim=-1)
    planted = _noisy(text, sigma=0.3, patch=4)
    image = torch.randn(2, 3, 64, 64, generator=gen)
    noise = planted.patch_noise(image)  # [2, 256, 6]
    assert torch.allclose(noise.norm(dim=-1), torch.full((2, 256), 0.3 * 6 ** 0.5, dtype=torch.float64))
    assert 0.2 < float(noise.std()) < 0.4  # each class's logit moves by about sigma
    assert float(noise.mean(1).abs().max()) < 0.1  # pooled over the image it is nearly gone
    # a colour added to every pixel of a patch (per channel) leaves its noise unchanged
    tinted = image + torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    assert torch.allclose(planted.patch_noise(tinted), noise, atol=1e-5)  # float32 image: rounding only
    assert not torch.allclose(planted.patch_noise(image.flip(-1)), noise)  # another image, other noise


def test_planted_clip_with_patch_noise_moves_the_logits_by_the_map_plus_the_noise():
    spec = dict(load_spec("known"), patch_noise={"sigma": 0.2, "seed": 0})
    plain = _random_toy_clip()
    noisy = plant_bias(_random_toy_clip(), spec)
    noise_only = plant_bias(_random_toy_clip(), spec, scale=0.0)
    x = _images()
    text = text_embeddings(plain, noisy.planted_bias_names, PROMPT_TEMPLATES)
    f0, hw = dense_features(plain, x)
    noise = noisy.visual.planted_bias.patch_noise(x).float()  # [B, h*w, C]
    noise = noise.transpose(1, 2).reshape(x.shape[0], -1, *hw)  # [B, C, h, w]
    moved = clip_logits(dense_features(noisy, x)[0], text) - clip_logits(f0, text)
    assert torch.allclose(moved, planted_map(noisy, hw) + noise, atol=1e-5)
    assert torch.allclose(clip_logits(dense_features(noise_only, x)[0], text) - clip_logits(f0, text), noise,
                          atol=1e-5)
    # the class-token path is untouched, the planted map does not contain the noise, and the
    # noise has its own fingerprint
    assert torch.equal(encode_image_cls(plain, x), encode_image_cls(noisy, x))
    assert torch.equal(planted_map(noisy, hw), planted_map(plant_bias(_random_toy_clip(), "known"), hw))
    louder = plant_bias(_random_toy_clip(), dict(spec, patch_noise={"sigma": 0.3, "seed": 0}))
    fingerprints = {clip_fingerprint(c) for c in (plant_bias(_random_toy_clip(), "known"), noisy, louder)}
    assert len(fingerprints) == 3
    # in the logits-only diagnostic the noise stays in the features: it is the CLIP's, not the bias
    in_logits = plant_bias(_random_toy_clip(), spec, where="logits")
    assert torch.allclose(clip_logits(dense_features(in_logits, x)[0], text) - clip_logits(f0, text), noise,
                          atol=1e-5)


def test_patch_noise_spec_errors_say_what_to_fix():
    for bad in ({"sigma": -0.1, "seed": 0}, {"sigma": 0.2}, 0.2):
        with pytest.raises(ValueError, match="patch_noise"):
            load_spec(dict(load_spec("known"), patch_noise=bad))
    with pytest.raises(ValueError, match="projection"):
        PlantedBias(torch.eye(2, 4), torch.zeros(2), torch.zeros(2), torch.zeros(2, 2), torch.ones(2),
                    noise_sigma=0.1, noise_projection=torch.zeros(2, 5), patch=2)


# ---------------------------------------------------------------------------------- recovery
def _planted_example() -> torch.Tensor:
    text = torch.eye(4, 8)
    planted = PlantedBias(text, torch.tensor([0.1, -0.05, 0.0, 0.0]), torch.tensor([0.0, 0.3, 0.2, 0.0]),
                          torch.tensor([[0.5, 0.5], [0.0, 0.0], [1.0, 1.0], [0.5, 0.5]]), torch.full((4,), 0.3))
    return planted.logit_map((8, 8))


def test_recovery_is_one_for_the_planted_map_plus_a_per_position_constant():
    bmap = _planted_example()
    per_position = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    r = bias_recovery(bmap + per_position, bmap, ["a", "b", "c", "d"])
    assert r.overall == pytest.approx(1.0, abs=1e-9)
    assert r.scale == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(r.per_class["recovery"], 1.0, atol=1e-9)
    assert np.allclose(r.per_class["scale"], 1.0, atol=1e-6)
    half = bias_recovery(0.5 * bmap, bmap)
    assert half.overall == pytest.approx(1.0, abs=1e-9) and half.scale == pytest.approx(0.5, abs=1e-6)
    assert np.allclose(half.per_class["scale"], 0.5, atol=1e-6)
    # one class learned at twice its size, the others exactly: only that class's scale moves
    doubled = bmap.clone()
    doubled[1] = bmap[1] + (bmap[1] - bmap.mean(0))  # class 1's centred row doubled, the class mean kept
    doubled -= (doubled.mean(0) - bmap.mean(0))  # the per-position mean back where it was
    per_class = bias_recovery(doubled, bmap).per_class
    assert per_class["scale"][1] > 1.5 and per_class["scale"][0] != pytest.approx(per_class["scale"][1])


def test_recovery_of_an_unrelated_map_is_near_zero():
    bmap = _planted_example()
    gen = torch.Generator().manual_seed(1)
    scores = [bias_recovery(torch.randn(4, 8, 8, generator=gen), bmap).overall for _ in range(20)]
    assert abs(float(np.mean(scores))) < 0.1 and max(abs(s) for s in scores) < 0.35
    assert bias_recovery(-bmap, bmap).overall == pytest.approx(-1.0, abs=1e-9)


def test_recovery_refuses_maps_of_other_shapes():
    with pytest.raises(ValueError, match=r"\[C, h, w\]"):
        bias_recovery(torch.zeros(4, 8, 7), _planted_example())


def test_bias_in_the_logits_only_moves_the_logits_and_leaves_the_features_clean():
    from reclip_core.model import MaskCLIP

    plain = _random_toy_clip()
    in_features = plant_bias(_random_toy_clip(), "known")
    in_logits = plant_bias(_random_toy_clip(), "known", where="logits")
    names = in_features.planted_bias_names
    x = _images()
    assert torch.equal(dense_features(plain, x)[0], dense_features(in_logits, x)[0])
    text = text_embeddings(plain, names, PROMPT_TEMPLATES)
    out_f = MaskCLIP(in_features, names, text=text)(images=x)
    out_l = MaskCLIP(in_logits, names, text=text)(images=x)
    assert torch.allclose(out_f["clip_logits"], out_l["clip_logits"], atol=1e-5)
    assert not torch.allclose(out_f["feat"], out_l["feat"])
    assert clip_fingerprint(in_features) != clip_fingerprint(in_logits)
    with pytest.raises(ValueError, match="where"):
        plant_bias(_random_toy_clip(), "known", where="pixels")


def test_bias_in_one_reader_of_the_features_loss_or_decoder():
    from reclip_core.model import ReCLIPPP

    x = _images()
    clips = {where: plant_bias(_random_toy_clip(), "known", where=where)
             for where in ("features", "logits", "loss", "decoder")}
    names = clips["features"].planted_bias_names
    text = text_embeddings(_random_toy_clip(), names, PROMPT_TEMPLATES)
    models = {}
    for where, clip in clips.items():
        torch.manual_seed(0)  # the same trainable weights in every model
        models[where] = ReCLIPPP(clip, names, text=text).eval()
    with torch.no_grad():
        out = {where: m(images=x) for where, m in models.items()}
    for where in ("loss", "decoder"):  # the CLIP logits are biased exactly as with the bias in the features
        assert torch.allclose(out[where]["clip_logits"], out["features"]["clip_logits"], atol=1e-5)
        assert torch.allclose(out[where]["rectified"], out["features"]["rectified"], atol=1e-5)
    # "loss": the loss pools the biased features, the decoder reads clean ones
    assert torch.allclose(out["loss"]["feat"], out["features"]["feat"], atol=1e-6)
    assert torch.allclose(out["loss"]["logits"], out["logits"]["logits"], atol=1e-4)
    # "decoder": the other way round
    assert torch.allclose(out["decoder"]["feat"], out["logits"]["feat"], atol=1e-6)
    assert torch.allclose(out["decoder"]["logits"], out["features"]["logits"], atol=1e-4)
    assert not torch.allclose(out["loss"]["logits"], out["decoder"]["logits"], atol=1e-3)
    assert len({clip_fingerprint(c) for c in clips.values()}) == 4


# ---------------------------------------------------------------------------------- the known world
def test_the_known_answer_config_loads_the_known_clip_with_its_planted_bias():
    from reclip_core.config import load_config
    from reclip_core.datasets.toyworld_presets import toyworld_class_names
    from reclip_core.profiles import check_parameters, config_name

    assert check_parameters("toy", "known", "cpu") == "known"
    assert config_name("toy", "known") == "toy_known" and config_name("toy", "toyworld") == "toy"
    cfg = load_config("toy_known")
    assert cfg["clip"]["planted_bias"] == "known" and cfg["dataset_kwargs"]["preset"] == "known"
    assert load_config("toy")["clip"]["planted_bias"] is None
    clip = load_config_clip(cfg, "cpu")
    assert clip.toy_manifest["preset"] == "known"
    assert clip.visual.patch_size == (4, 4) and clip.visual.grid_size == (16, 16)
    assert clip.planted_bias_names == toyworld_class_names("known")
    bmap = planted_map(clip, (16, 16))
    spec = load_spec("known")
    for name, value in spec["class_preference"].items():  # a class with no bump is its preference everywhere
        if name not in spec["space_preference"]:
            assert torch.allclose(bmap[clip.planted_bias_names.index(name)], torch.tensor(float(value)))


# ---------------------------------------------------------------------------------- the lab's tables
def _summary_rows(reclip_miou):
    import pandas as pd

    rows = [{"model": "MaskCLIP (no planted bias)", "seed": None, "mIoU": 70.0, "class TVD": 0.1, "space TVD": 0.1},
            {"model": "MaskCLIP (planted bias)", "seed": None, "mIoU": 50.0, "class TVD": 0.2, "space TVD": 0.3}]
    rows += [{"model": "ReCLIP++", "seed": s, "mIoU": m, "class TVD": 0.08, "space TVD": 0.2, "recovery": 0.9}
             for s, m in enumerate(reclip_miou)]
    return pd.DataFrame(rows)


def test_summary_takes_mean_and_sd_over_seeds():
    from reclip_core.known_answer import summarise

    by = summarise(_summary_rows([60.0, 62.0, 64.0])).set_index("model")
    assert by.loc["ReCLIP++", "mIoU"] == pytest.approx(62.0) and by.loc["ReCLIP++", "mIoU sd"] == pytest.approx(2.0)
    assert by.loc["ReCLIP++", "runs"] == 3 and by.loc["MaskCLIP (planted bias)", "runs"] == 1
    assert by.loc["MaskCLIP (planted bias)", "mIoU sd"] == 0.0
    assert np.isnan(by.loc["MaskCLIP (planted bias)", "recovery"]) and np.isnan(by.loc["MaskCLIP (planted bias)",
                                                                                       "recovery sd"])


def test_goals_are_met_or_missed_on_the_measured_numbers():
    from reclip_core.known_answer import goal_lines, summarise

    met = "\n".join(goal_lines(summarise(_summary_rows([63.0, 64.0, 65.0]))))
    assert "costs MaskCLIP 20.0 points" in met and "70% of U − B recovered (goal ≥ 60%; met)" in met
    assert "class TVD 0.080 ± 0.000, 60% below MaskCLIP's (goal ≥ 50% below: met)" in met
    assert "space TVD 0.200 ± 0.000, 33% below MaskCLIP's (goal ≥ 50% below: MISSED)" in met
    missed = "\n".join(goal_lines(summarise(_summary_rows([51.0, 55.0, 59.0]))))
    assert "25% of U − B recovered (goal ≥ 60%; MISSED)" in missed and "(goal ≥ +10: MISSED)" in missed


def test_mean_bias_map_averages_over_images():
    from types import SimpleNamespace

    from reclip_core.known_answer import MeanBiasMap

    acc = MeanBiasMap()
    acc.update(SimpleNamespace(outputs={"bias_logits": torch.ones(2, 3, 4, 4)}))
    acc.update(SimpleNamespace(outputs={"bias_logits": torch.full((1, 3, 4, 4), 4.0)}))
    assert torch.allclose(acc.mean(), torch.full((3, 4, 4), 2.0, dtype=torch.float64))
