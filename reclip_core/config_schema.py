"""The config keys as grouped, typed dataclasses: one field per key, with its type, default and meaning.

Each field's annotation gives the accepted types (``Optional[...]``: null allowed), its default is the
key's default (:data:`REQUIRED`: the file must set it), and its ``metadata`` holds the one-line help
and the accepted values. ``reclip_core.config`` derives its validation table from these classes; a
config file stays one flat mapping (only ``clip`` nests), and :class:`ConfigGroups` is its typed view.
:class:`RunConfig` holds the keys a resumed run may change; every other key is part of the checkpoint
fingerprint (``provenance.config_fingerprint``).
"""
from __future__ import annotations

import copy
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from .datasets.names import DATASET_NAMES
from .options import (BIAS_MODES, DECODER_INITS, LOSS_NORMALISATIONS, MODEL_KINDS, READ_SLOTS, TEST_RESIZES, UPSAMPLINGS,
                      WINDOW_RESIZES)

#: what a config's ``profile`` may say: the paper's settings, the toy lab, or anything hand-made
KNOWN_PROFILES = ("paper", "toy", "quick", "custom")
HYPOTHESIS_MODES = ("window", "threshold")
# Release options: the first value is the project's choice (the default), the second the release's.
CLASS_NAME_SETS = ("project", "release")
HYPOTHESIS_TILINGS = ("fit", "release")
HYPOTHESIS_CLIPS = ("model", "plain")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # marker: the key has no default and must come from the file


def key(default: Any, help: str, choices: Optional[Tuple[Any, ...]] = None) -> Any:
    """A config field: its default (:data:`REQUIRED`: none) and the validator's metadata."""
    meta = {"help": help, "choices": choices}
    if default is REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which dataset and classes a run reads, and how the readers load them."""

    # the reader ``datasets.get_dataset`` builds for every split
    dataset: str = key(REQUIRED, "dataset reader name", choices=DATASET_NAMES)
    # the family of settings the file belongs to (paper benchmark, toy lab, ...); reports name it
    profile: str = key("custom", "which settings these are", choices=KNOWN_PROFILES)
    # the classes text embeddings, PD and metrics use (None: the dataset's own list)
    class_names: Optional[Union[str, List[str]]] = key(
        None, "class list: a dataset name for class_names(), a text file (one class per line, comma-separated "
        "synonyms), or a list")
    # which shipped list a dataset name resolves to
    class_name_set: str = key(
        "project", "which list a dataset name reads: 'project' (class_names/<name>.txt) or 'release' "
        "(class_names/release/<name>.txt, the strings the authors' checkpoints were trained with)",
        choices=CLASS_NAME_SETS)
    # a guard: the resolved class list must have this length
    num_classes: Optional[int] = key(None, "number of evaluated classes (checked against class_names)")
    # the benchmarks' background convention: on-disk 0 becomes the ignore index 255
    reduce_zero_label: bool = key(False, "label 0 is background -> ignore (reader option)")
    # resize cap shared by training views and evaluation images
    max_long_side: int = key(2048, "long-side cap of evaluation and training resizes")
    # a prefix of the training split: what the hypotheses and the training loop read
    max_train_images: Optional[int] = key(None, "use only the first N training images")
    # the unlabeled images training learns from (their labels are never read)
    train_split: str = key("train", "split of unlabeled training images")
    # passed through to the reader (the toy world's preset, ...)
    dataset_kwargs: Dict[str, Any] = key({}, "extra keyword arguments of the dataset reader (e.g. preset)")


@dataclass(frozen=True, kw_only=True)
class ClipConfig:
    """The frozen CLIP: the ``clip:`` mapping of a config file."""

    # an open_clip model name, the toy CLIP, or a model-config file
    arch: str = key("ViT-B-16-quickgelu", "open_clip architecture, 'toy', a model-config .json, or 'auto' (the "
                    "paper's CLIP when its weights are cached, else the toy CLIP; sets pretrained too)")
    # the weights loaded into it (None: a seeded random CLIP)
    pretrained: Optional[str] = key("openai", "weights tag or file (None: random)")
    # a release option of the visual encoder (None: open_clip's eps)
    ln_eps: Optional[float] = key(None, "LayerNorm eps in the visual blocks (release: 1e-6)")
    # a release option: a stored class token replaces CLIP's own class embedding
    cls_token: Optional[str] = key(None, "path to a class-token tensor (release option)")
    # the known-answer toy world: a bias of known amplitudes added to the toy CLIP's dense features
    planted_bias: Optional[str] = key(None, "toy CLIP only: planted-bias spec name or YAML (planted_bias.py; None: none)")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The segmenter trained on top of the frozen CLIP, and the texts its classes are embedded with."""

    # ReCLIP++ (bias rectification + mask decoder) or ReCLIP
    model: str = key("reclip++", "what to train", choices=MODEL_KINDS)
    # the ``clip:`` mapping: which frozen CLIP, with which weights
    clip: ClipConfig = field(default_factory=ClipConfig)
    # ablation: without the decoder the rectified logits are the prediction
    use_decoder: bool = key(True, "ReCLIP++ mask decoder on (False: rectification only)")
    # ablation: which biases the rectification removes (class preference, space preference, both)
    bias_mode: str = key("both", "ReCLIP++ bias ablation", choices=BIAS_MODES)
    # a diagnostic: the decoder starts Kaiming-random (the method) or passing the rectified logits through
    decoder_init: str = key("kaiming", "ReCLIP++ decoder start: 'kaiming' (the method) or 'rectified'",
                            choices=DECODER_INITS)
    # prompt templates averaged into each class's text embedding
    templates: Union[str, List[str]] = key("all", "'all' (85 templates), 'single' ('a photo of a {}.') or a list")
    # a release option: where the Reference prompt's text-encoder output is read
    reference_slot: str = key(
        "eot", "Reference prompt read-out: 'eot' (the end-of-text slot, else the last name slot) or 'release' "
        "(the argmax of the 3 name token ids: a word token for names of 3+ tokens)", choices=READ_SLOTS)


@dataclass(frozen=True, kw_only=True)
class HypothesisConfig:
    """How the image-level class hypotheses (the training targets) are computed; ``hypotheses.json``
    records these settings and is refused when they differ."""

    # window vote (ReCLIP++) or whole-image threshold (ReCLIP)
    hypothesis_mode: str = key("window", "ReCLIP++ window vote or ReCLIP threshold/top-K", choices=HYPOTHESIS_MODES)
    # the vote's window side (``Config.window`` resolves the default)
    hypothesis_window: Optional[int] = key(None, "window side in pixels (None: int(crop/6))")
    # the step between windows (``Config.stride`` resolves the default)
    hypothesis_stride: Optional[int] = key(None, "window stride (None: int(window/2))")
    # a release option: which window starts the grid has
    hypothesis_tiling: str = key(
        "fit", "window starts: 'fit' (every window that fits; one clipped window on a smaller image) or "
        "'release' (starts strictly below H - w and W - w)", choices=HYPOTHESIS_TILINGS)
    # a release option: the CLIP variant that scores the windows
    hypothesis_clip: str = key(
        "model", "CLIP of the hypotheses: 'model' (with clip.ln_eps / clip.cls_token) or 'plain' (CLIP's own "
        "eps and class embedding, as the release)", choices=HYPOTHESIS_CLIPS)
    # a release option: how a window is resized to the CLIP input
    hypothesis_resize: str = key(
        "torch", "window resize: 'torch' (bicubic + antialias on float tensors) or 'release' (PIL bicubic on the "
        "uint8 window, CLIP's own preprocessing)", choices=WINDOW_RESIZES)
    # threshold mode: an image's classes are those scoring above this
    hypothesis_threshold: float = key(23.0, "ReCLIP: whole-image score (100*cos) threshold")
    # threshold mode: the fallback when no class passes
    hypothesis_topk: int = key(1, "ReCLIP: classes taken when none passes the threshold")
    # windows are resized to this side before CLIP sees them
    hypothesis_input_size: Optional[int] = key(None, "window input side (None: the CLIP's own image size)")


@dataclass(frozen=True, kw_only=True)
class OptimisationConfig:
    """What the training loop computes: schedule, optimizer, training views, loss and its randomness."""

    # every random draw of a run is a function of (seed, purpose, epoch, image index)
    seed: int = key(0, "seed of sampling, augmentation and Gumbel noise")
    # the poly schedule's horizon; ``epoch`` (RunConfig) may stop earlier
    max_epoch: int = key(REQUIRED, "MAX_EPOCH of the poly schedule")
    # images per optimizer step over all processes
    batch_size: int = key(REQUIRED, "global batch size (split over DDP processes)")
    # the schedule's starting learning rate
    lr: float = key(REQUIRED, "base learning rate")
    # SGD's momentum
    momentum: float = key(0.9, "SGD momentum")
    # SGD's L2 penalty
    weight_decay: float = key(5e-4, "SGD weight decay")
    # the side of a training view
    crop: int = key(REQUIRED, "training crop side; also sets the hypothesis window int(crop/6)")
    # training views: the random rescale ratio around train_scale
    scale_range: List[float] = key([0.5, 2.0], "random rescale ratio range of training views")
    # training views: the size the ratio multiplies
    train_scale: Optional[List[int]] = key(
        None, "[long, short] base scale of training views (None: [max_long_side, crop])")
    # training views: horizontal flip
    flip: bool = key(True, "random horizontal flip of training views")
    # training views: brightness, contrast, saturation, hue
    photometric: bool = key(True, "photometric distortion of training views")
    # the loss: temperature of its Gumbel-Softmax region sampling
    gumbel_scale: Optional[float] = key(
        None, "scale of the logits inside the loss's Gumbel-Softmax (None: the method's constant, 100 for "
        "ReCLIP++ and 1000 for ReCLIP; other values are ablations)")
    # the loss: what a batch's summed loss is divided by
    loss_normalisation: str = key(
        "nonempty", "divisor of a batch's loss: 'nonempty' (images with a hypothesis) or 'batch' (the batch "
        "size, as the release)", choices=LOSS_NORMALISATIONS)
    # the loss: temperature of its class scores
    score_scale: Optional[Union[float, str]] = key(
        None, "scale s of the loss's class scores s · pooled_k · textᵀ (None: the method's 100, OpenAI CLIP's "
        "logit scale; 'clip': this CLIP's own logit scale exp(logit_scale), ≈ 100 for OpenAI's; a number: "
        "an ablation)")
    # fixed views whose frozen CLIP features are computed once instead of every epoch
    feature_cache: bool = key(False, "cache frozen CLIP features of fixed views (see docs/training.md)")
    # how many fixed views of each image the cache holds
    feature_cache_views: int = key(1, "fixed views per image when feature_cache is on")
    # the cache file
    feature_cache_path: Optional[str] = key(
        None, "where the feature cache lives (None: <run>/feature_cache.safetensors); runs with the same CLIP, "
        "data and views may share one")


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """How predictions are made at test time: the evaluation size and the presence filter (PD)."""

    # images are resized to this short side before inference
    test_size: int = key(REQUIRED, "evaluation short side (long side <= max_long_side)")
    # PD keeps a class only if its image-level probability passes this
    pd_threshold: float = key(REQUIRED, "presence-filter threshold (PD)")
    # PD's softmax temperature
    pd_scale: float = key(10.0, "PD softmax scale s: p = softmax(s · logits) (ReCLIP++'s 10)")
    # a release option: a ReCLIP model's PD threshold
    reclip_pd_threshold: Optional[float] = key(
        None, "PD threshold of a ReCLIP model's own head (release: TEST.ReCLIP_PD; None: pd_threshold)")
    # a release option: a ReCLIP model's PD temperature
    reclip_pd_scale: Optional[float] = key(
        None, "PD softmax scale of a ReCLIP model's own head (release: 100; None: pd_scale)")
    # a release option: how the token-grid logits reach the label size
    eval_upsampling: str = key(
        "crop", "'crop' (bilinear to the padded input, crop the padding, bilinear to the label) or 'release' "
        "(the padded grid bilinear straight to the unpadded input size, then to the label)",
        choices=UPSAMPLINGS)
    # a release option: how evaluation images are resized to the test size
    test_resize: str = key(
        "torch", "'torch' (bilinear with antialiasing) or 'release' (OpenCV-style bilinear on the 8-bit image, "
        "no antialiasing)", choices=TEST_RESIZES)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How and where this run executes; may change when a run is resumed (``provenance.RESUME_FREE_KEYS``).

    None of these changes the trained weights, so a checkpoint's fingerprint leaves them out:
    ``epoch`` only says when to stop (the schedule runs against ``max_epoch``, so a finished run can be
    extended); ``log_every``, ``checkpoint_every`` and ``keep_checkpoints`` say when progress is written;
    ``num_workers``, ``num_threads`` and ``device`` say where it is computed (every random draw depends
    on the seed, epoch and image, not on the worker); ``output_dir`` and ``data_root`` say where the
    files are; ``hypothesis_batch_size`` and ``eval_batch_size`` bound memory; ``max_val_images`` and
    ``val_split`` choose what is evaluated, which training never reads. The set is frozen: checkpoints
    already written store a fingerprint without exactly these keys and compare it on resume.
    """

    # when training stops (<= max_epoch)
    epoch: int = key(REQUIRED, "EPOCH: training stops after this many epochs")
    # how often progress is printed and the loss log written
    log_every: int = key(10, "steps between progress lines and loss-CSV flushes")
    # how often a checkpoint is written within an epoch
    checkpoint_every: int = key(0, "steps between mid-epoch checkpoints (0: end of each epoch only)")
    # how many checkpoints stay on disk
    keep_checkpoints: int = key(2, "checkpoints kept on disk (older ones are deleted)")
    # DataLoader processes
    num_workers: int = key(0, "DataLoader workers")
    # where tensors live
    device: str = key("auto", "'auto', 'cpu', 'cuda', 'cuda:1'...")
    # the run folder: hypotheses, checkpoints, loss log, evaluation results
    output_dir: Optional[str] = key(None, "run folder (None: runs/<config name>)")
    # where the dataset files are
    data_root: Optional[str] = key(None, "dataset root folder (None: the reader's default)")
    # a prefix of the evaluated split
    max_val_images: Optional[int] = key(None, "evaluate only the first N validation images")
    # the labeled split evaluation scores
    val_split: str = key("val", "split evaluated")
    # memory bound of the hypothesis pass
    hypothesis_batch_size: int = key(256, "windows per CLIP forward (bounds memory)")
    # CPU threads
    num_threads: Optional[int] = key(None, "torch CPU threads of a CLI command (None: torch's default)")
    # memory bound of evaluation
    eval_batch_size: int = key(8, "consecutive validation images of equal size run in one forward")


@dataclass(frozen=True)
class ConfigGroups:
    """A validated config as its typed groups (``Config.typed()``); :meth:`flat` gives the mapping back."""

    data: DataConfig
    model: ModelConfig
    hypotheses: HypothesisConfig
    optimisation: OptimisationConfig
    evaluation: EvaluationConfig
    run: RunConfig

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> ConfigGroups:
        """Split a complete flat mapping (every key present, as :func:`config.validate` returns) into groups."""
        return cls(**{f.name: _build(hint, flat) for f, hint in group_fields(cls)})

    def flat(self) -> Dict[str, Any]:
        """The flat mapping (``clip`` a nested dict), in group order."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            out.update(asdict(getattr(self, f.name)))
        return out


def _build(cls: type, flat: Mapping[str, Any]) -> Any:
    kwargs = {}
    for f, hint in group_fields(cls):
        value = flat[f.name]
        kwargs[f.name] = _build(hint, value) if is_dataclass(hint) else copy.deepcopy(value)
    return cls(**kwargs)


#: the groups of a config, in :class:`ConfigGroups` order
GROUPS: Tuple[type, ...] = (DataConfig, ModelConfig, HypothesisConfig, OptimisationConfig, EvaluationConfig,
                            RunConfig)


def group_fields(cls: type) -> List[Tuple[Field, Any]]:
    """A dataclass's fields with their annotations resolved to types."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in fields(cls)]


def accepted_types(hint: Any) -> Tuple[Tuple[type, ...], bool]:
    """An annotation → (the accepted Python types, in order; whether None is allowed)."""
    args = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    optional = type(None) in args
    return tuple(typing.get_origin(a) or a for a in args if a is not type(None)), optional


def default_of(f: Field) -> Any:
    """A field's default (a fresh copy for lists and dicts), or :data:`REQUIRED`."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return REQUIRED if f.default is MISSING else f.default


__all__ = ("REQUIRED", "key", "DataConfig", "ClipConfig", "ModelConfig", "HypothesisConfig", "OptimisationConfig",
           "EvaluationConfig", "RunConfig", "ConfigGroups", "GROUPS", "group_fields", "accepted_types", "default_of",
           "KNOWN_PROFILES")
