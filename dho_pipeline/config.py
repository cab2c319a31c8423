"""The experiment config (pipeline.yaml): typed sections, validated, errors that name the field."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dho_pipeline.errors import DhoError
from dho_pipeline.locations import Location, UrlPath, location


class ConfigError(DhoError, ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the field."""


@dataclass
class DataConfig:
    shards: str = "shards"  # folder or URL written by `dho make-shards` (holds manifest.json)
    num_workers: int = 2
    on_bad_image: Literal["error", "skip"] = "error"


@dataclass
class AdapterConfig:
    file: str | None = None  # a fitted adapter (dho fit-adapter); None = fit it when needed, kept under cache.root
    augment_epochs: int = 10  # augmented passes over the labelled images averaged into the keys
    a: float = 1.0  # residual ratio before the search
    b: float = 1.0  # sharpness before the search
    search_a_max: float = 5.0
    search_a_steps: int = 20
    search_b_max: float = 12.0
    search_b_steps: int = 200
    epochs: int = 20  # Tip-Adapter-F: training of the keys
    lr: float = 1e-3
    eps: float = 1e-4
    batch_size: int = 256


@dataclass
class TeacherConfig:
    model: str = "dho-tiny-clip"
    pretrained: str | None = None  # open_clip hub tag or a local checkpoint file
    model_config_dir: str | None = None  # extra folder of open_clip model configs (*.json)
    image_size: int | None = None  # overrides the model config's size (recorded in the fingerprint)
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    quick_gelu: bool = False
    templates: str | None = "generic"  # a registry entry in dho_pipeline/teacher/templates.py
    extra_templates: list[str] = field(default_factory=list)
    kind: Literal["zero-shot", "tip-adapter", "tip-adapter-f"] = "zero-shot"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    batch_size: int = 256
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # weights and activations; auto: bf16 on CUDA, fp32 on CPU
    mode: Literal["cached", "online"] = "cached"  # online runs the teacher every step (for comparison)
    online_views: Literal["cached", "fresh"] = "cached"


@dataclass
class ViewConfig:
    count: int = 10  # K random views per labelled/unlabelled image (plus one clean view); >= train.epochs
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip: bool = True
    seed: int = 0


@dataclass
class CacheConfig:
    root: str = "cache"
    store: str | None = None  # explicit store path; default: <root>/<teacher>-<fingerprint hash>.zarr
    top_k: int | None = None  # keep each view's k largest logits, their classes and the log-sum-exp; null = all


@dataclass
class StudentConfig:
    kind: Literal["timm", "open_clip"] = "timm"
    model: str = "resnet18"
    pretrained_file: str | None = None  # local weights; None = random init (timm) / teacher file (open_clip)
    image_size: int | None = None  # None = the model's own default input size
    image_mean: list[float] | None = None
    image_std: list[float] | None = None


@dataclass
class TrainConfig:
    method: Literal["dho", "single_head_kd", "ce_only"] = "dho"
    weighting: Literal["few_shot", "semi_supervised"] = "few_shot"
    temperature: float = 2.0
    batch_labelled: int = 64
    batch_unlabelled: int = 64
    epochs: float | None = 10.0  # passes over the unlabelled split, for every method (labelled if none)
    steps: int | None = None  # overrides epochs when set
    lr: float = 1e-3
    weight_decay: float = 0.01
    schedule: Literal["linear", "cosine"] = "linear"
    warmup: float = 0.1  # fraction of steps when < 1, else a step count
    grad_clip: float | None = None
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool = False
    compile: bool = False
    checkpoint_every: int = 500
    log_every: int = 20
    out_dir: str = "runs/default"
    tensorboard: bool = False  # also write TensorBoard scalars beside metrics.jsonl (the tensorboard extra)
    seed: int = 0
    device: str = "auto"


@dataclass
class EvalConfig:
    default_alpha: float = 0.4
    default_beta: float = 0.5
    alpha_grid: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(21)])
    beta_grid: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0])
    batch_size: int = 256


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    base_dir: Path = field(default=Path("."), repr=False)  # relative paths are resolved from here

    def path(self, value: str) -> Path:
        """Resolve a path from the config relative to the config file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def location(self, value: str) -> Location:
        """A folder of shards or stores, or a store: a URL as it is, a local path as `path` resolves it."""
        where = location(value)
        return where if isinstance(where, UrlPath) else self.path(str(where))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        return d


def _check(value: Any, hint: Any, where: str) -> Any:
    """Return `value` converted to `hint`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = " | ".join(map(str, typing.get_args(hint)))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:  # YAML reads 5e-4 (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "base_dir"}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _validate(cfg: PipelineConfig) -> None:
    checks = [
        (cfg.views.count >= 1, "views.count", "must be >= 1"),
        (len(cfg.views.scale) == 2 and 0 < cfg.views.scale[0] <= cfg.views.scale[1] <= 1,
         "views.scale", "must be [min, max] with 0 < min <= max <= 1"),
        (len(cfg.views.ratio) == 2 and 0 < cfg.views.ratio[0] <= cfg.views.ratio[1],
         "views.ratio", "must be [min, max] with 0 < min <= max"),
        (cfg.train.temperature > 0, "train.temperature", "must be > 0"),
        (cfg.train.batch_labelled >= 1, "train.batch_labelled", "must be >= 1"),
        (cfg.train.batch_unlabelled >= 1, "train.batch_unlabelled", "must be >= 1"),
        (cfg.train.steps is not None or cfg.train.epochs is not None, "train.epochs", "set epochs or steps"),
        (cfg.teacher.batch_size >= 1, "teacher.batch_size", "must be >= 1"),
        (cfg.cache.top_k is None or cfg.cache.top_k >= 1, "cache.top_k", "must be >= 1, or null for every logit"),
        (cfg.teacher.adapter.augment_epochs >= 1, "teacher.adapter.augment_epochs", "must be >= 1"),
        (cfg.teacher.adapter.search_a_steps >= 1, "teacher.adapter.search_a_steps", "must be >= 1"),
        (cfg.teacher.adapter.search_b_steps >= 1, "teacher.adapter.search_b_steps", "must be >= 1"),
        (0 <= cfg.eval.default_alpha <= 1, "eval.default_alpha", "must be in [0, 1]"),
        (cfg.eval.default_beta > 0, "eval.default_beta", "must be > 0"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise ConfigError(f"{name}: {message}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into its key path and its YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.lr=5e-4")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Read pipeline.yaml (or the defaults when `path` is None) and apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()  # absolute, so paths a checkpoint records hold from any working directory
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        base_dir = path.parent.absolute()
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {k} is not a section")
        node[keys[-1]] = value
    cfg = _build(PipelineConfig, raw, "")
    cfg.base_dir = base_dir
    _validate(cfg)
    return cfg
