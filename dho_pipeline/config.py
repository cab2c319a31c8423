"""The experiment config (pipeline.yaml): typed sections, validated, errors that name the field."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dho_pipeline.errors import DhoError
from dho_pipeline.locations import Location, UrlPath, is_url, location


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
    render: Literal["workers", "device"] = "workers"  # stage one's views: cropped by the loader workers or on device
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
    pretrained_file: str | None = None  # local weights; None = random init (open_clip: text tower too)
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
    if hint is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:  # YAML reads 5e-4 (no dot) as a string
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # YAML's .inf and .nan
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "base_dir"}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        close = difflib.get_close_matches(unknown[0], names, n=1)
        guess = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field ({guess}known: {', '.join(sorted(names))})")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


DEVICE_PATTERN = re.compile(r"auto|cpu|mps(:0)?|(cuda|xpu)(:\d+)?")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, xpu, xpu:N or mps"


def _validate(cfg: PipelineConfig) -> None:
    """Refuse values no stage can use, naming the field, the value and what it takes."""
    t, v, a, e = cfg.train, cfg.views, cfg.teacher.adapter, cfg.eval
    checks: list[tuple[bool, str, Any, str]] = [
        (cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, "must be >= 0 (0: load in the process)"),
        (v.count >= 1, "views.count", v.count, "must be >= 1"),
        (len(v.scale) == 2 and 0 < v.scale[0] <= v.scale[1] <= 1,
         "views.scale", v.scale, "must be [min, max] with 0 < min <= max <= 1"),
        (len(v.ratio) == 2 and 0 < v.ratio[0] <= v.ratio[1],
         "views.ratio", v.ratio, "must be [min, max] with 0 < min <= max"),
        (v.seed >= 0, "views.seed", v.seed, "must be >= 0"),
        (cfg.teacher.batch_size >= 1, "teacher.batch_size", cfg.teacher.batch_size, "must be >= 1"),
        (cfg.teacher.image_size is None or cfg.teacher.image_size >= 1, "teacher.image_size", cfg.teacher.image_size,
         "must be >= 1, or null for the model's own"),
        (a.augment_epochs >= 1, "teacher.adapter.augment_epochs", a.augment_epochs, "must be >= 1"),
        (a.a > 0, "teacher.adapter.a", a.a, "must be > 0"),
        (a.b > 0, "teacher.adapter.b", a.b, "must be > 0"),
        (a.search_a_max > 0, "teacher.adapter.search_a_max", a.search_a_max, "must be > 0"),
        (a.search_a_steps >= 1, "teacher.adapter.search_a_steps", a.search_a_steps, "must be >= 1"),
        (a.search_b_max > 0, "teacher.adapter.search_b_max", a.search_b_max, "must be > 0"),
        (a.search_b_steps >= 1, "teacher.adapter.search_b_steps", a.search_b_steps, "must be >= 1"),
        (a.epochs >= 1, "teacher.adapter.epochs", a.epochs, "must be >= 1"),
        (a.lr > 0, "teacher.adapter.lr", a.lr, "must be > 0"),
        (a.eps > 0, "teacher.adapter.eps", a.eps, "must be > 0"),
        (a.batch_size >= 1, "teacher.adapter.batch_size", a.batch_size, "must be >= 1"),
        (cfg.cache.top_k is None or cfg.cache.top_k >= 1, "cache.top_k", cfg.cache.top_k,
         "must be >= 1, or null for every logit"),
        (cfg.student.image_size is None or cfg.student.image_size >= 1, "student.image_size", cfg.student.image_size,
         "must be >= 1, or null for the model's own"),
        (t.temperature > 0, "train.temperature", t.temperature, "must be > 0"),
        (t.batch_labelled >= 1, "train.batch_labelled", t.batch_labelled, "must be >= 1"),
        (t.batch_unlabelled >= 1, "train.batch_unlabelled", t.batch_unlabelled, "must be >= 1"),
        (t.steps is not None or t.epochs is not None, "train.epochs", t.epochs, "set epochs or steps"),
        (t.epochs is None or t.epochs > 0, "train.epochs", t.epochs, "must be > 0, or null with train.steps set"),
        (t.steps is None or t.steps >= 1, "train.steps", t.steps, "must be >= 1, or null to count by train.epochs"),
        (t.lr > 0, "train.lr", t.lr, "must be > 0"),
        (t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0"),
        (t.warmup >= 0, "train.warmup", t.warmup, "must be >= 0 (a fraction of the steps when < 1, else a count)"),
        (t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", t.grad_clip, "must be > 0, or null for none"),
        (t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1"),
        (t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1"),
        (t.seed >= 0, "train.seed", t.seed, "must be >= 0"),
        (DEVICE_PATTERN.fullmatch(t.device) is not None, "train.device", t.device, f"must be one of {DEVICE_CHOICES}"),
        (0 <= e.default_alpha <= 1, "eval.default_alpha", e.default_alpha, "must be in [0, 1]"),
        (e.default_beta > 0, "eval.default_beta", e.default_beta, "must be > 0"),
        (bool(e.alpha_grid) and all(0 <= x <= 1 for x in e.alpha_grid), "eval.alpha_grid", e.alpha_grid,
         "must be a non-empty list of values in [0, 1]"),
        (bool(e.beta_grid) and all(x > 0 for x in e.beta_grid), "eval.beta_grid", e.beta_grid,
         "must be a non-empty list of values > 0"),
        (e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1"),
    ]
    for section, c in (("teacher", cfg.teacher), ("student", cfg.student)):
        for name in ("image_mean", "image_std"):
            value = getattr(c, name)
            ok = value is None or (len(value) == 3 and (name == "image_mean" or all(x > 0 for x in value)))
            checks.append((ok, f"{section}.{name}", value, "must be 3 numbers (one a channel; std > 0), or null"))
    for ok, name, value, requirement in checks:
        if not ok:
            raise ConfigError(f"{name}: {requirement}, got {value!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into its key path and its YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.lr=5e-4")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: not valid YAML: {_yaml_problem(e)}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML found wrong, without its marks (they name no file): 'mapping values are not allowed here'."""
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    return "; ".join(p for p in parts if p) or str(error)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of the config file; bad YAML is named by file, line and column."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); save it as "
                          "UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def _is_section(keys: list[str]) -> bool:
    """Whether the dotted key path names a section (a dataclass field), e.g. ['teacher', 'adapter']."""
    hint: Any = PipelineConfig
    for k in keys:
        if not dataclasses.is_dataclass(hint):
            return False
        hint = typing.get_type_hints(hint).get(k)
    return dataclasses.is_dataclass(hint)


def _blame(error: ConfigError, set_by: dict[tuple[str, ...], str], source: str) -> ConfigError:
    """`error` prefixed with where its field's value came from: the --set that set it (or a section above it), else
    the config file (`source`, empty for the defaults)."""
    field, _, rest = str(error).partition(": ")
    keys = tuple(re.sub(r"\[\d+\]", "", field).split("."))
    setters = [k for k in set_by if keys[: len(k)] == k]  # the --set that set this field or a section above it
    below = [k for k in set_by if k[: len(keys)] == keys]  # or one that reached below it: a mistyped section
    if not setters and not below:
        return ConfigError(f"{source}{error}")
    key = max(setters, key=len) if setters else min(below, key=len)
    return ConfigError(f"--set {set_by[key]}: {rest if field == '.'.join(key) else error}")


def load_config(path: Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Read pipeline.yaml (or the defaults when `path` is None) and apply `key=value` overrides.

    An error names where the bad value came from: `pipeline.yaml: train.lr: ...` or `--set train.lr=x: ...`.
    """
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()  # absolute, so paths a checkpoint records hold from any working directory
    source = ""
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        base_dir = path.parent.absolute()
        source = f"{path}: "
    set_by: dict[tuple[str, ...], str] = {}  # key path -> the --set that gave it its value
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                if _is_section(keys[: i + 1]):  # the value there is wrong: the build names whoever set it
                    break
                raise ConfigError(f"--set {text}: {'.'.join(keys[: i + 1])} is a value, not a section")
        else:
            node[keys[-1]] = value
            set_by = {k: t for k, t in set_by.items() if k[: len(keys)] != tuple(keys)}  # values it replaced
            set_by[tuple(keys)] = text
            if ".".join(keys) in INPUT_PATHS and isinstance(value, str):
                _check_set_path(text, value, base_dir)
    try:
        cfg = _build(PipelineConfig, raw, "")
        cfg.base_dir = base_dir
        _validate(cfg)
    except ConfigError as e:
        raise _blame(e, set_by, source) from None
    return cfg


INPUT_PATHS = {"data.shards", "teacher.pretrained", "teacher.model_config_dir", "teacher.adapter.file", "cache.store",
               "student.pretrained_file"}


def _check_set_path(text: str, value: str, base_dir: Path) -> None:
    """Refuse a --set path that is missing where it resolves (from the config's folder) but found from the current
    directory: the user meant the latter."""
    given = Path(value).expanduser()
    if is_url(value) or given.is_absolute() or (base_dir / given).exists() or not given.exists():
        return
    raise ConfigError(f"--set {text}: paths are relative to the config's folder, so this is {base_dir / given}, which "
                      f"is not there; for the one in the current folder give {given.absolute()}")
