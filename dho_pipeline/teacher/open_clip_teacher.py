"""The open_clip teacher: loading by (model, pretrained), its preprocessing, and the zero-shot head."""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch
import torch.nn.functional as F
import torch.utils.serialization

from dho_pipeline.atomic_write import atomic_write
from dho_pipeline.config import ConfigError, TeacherConfig
from dho_pipeline.data.shards import sha256_file
from dho_pipeline.errors import CheckpointError
from dho_pipeline.teacher.templates import resolve_templates

if TYPE_CHECKING:
    from dho_pipeline.teacher.tip_adapter import TipAdapter

BUILTIN_MODEL_CONFIGS = Path(__file__).parents[1] / "model_configs"  # dho_pipeline/model_configs (package data)
LOGIT_SCALE = 100.0


def register_model_configs(extra_dir: Path | None = None) -> None:
    """Make dho's own open_clip model configs (and the user's folder, if any) known to open_clip.

    Must run before `open_clip.get_tokenizer(name)`, which otherwise falls back to context length 77.
    """
    for folder in (BUILTIN_MODEL_CONFIGS, extra_dir):
        if folder is not None:
            open_clip.add_model_config(Path(folder))


TEACHER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def teacher_dtype(name: str, device: torch.device) -> str:
    """teacher.dtype resolved: 'auto' is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


@dataclass
class Teacher:
    """A CLIP image tower with its class weights: logits = 100 * normalise(f(x)) @ W.

    The tower runs in `dtype`; features, the class weights, the Tip-Adapter and the logits are fp32.
    """

    model: torch.nn.Module  # the image tower alone: the text tower is freed once the head is built
    classifier: torch.Tensor  # (D, C), columns L2-normalised
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: dict
    dtype: torch.dtype = torch.float32
    adapter: TipAdapter | None = None  # a fitted few-shot cache model: logits = adapter.logits(features, W)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 image features of normalised float images (N, 3, S, S)."""
        return F.normalize(self.model(images.to(self.dtype)).float(), dim=-1)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits: zero-shot, or through the few-shot adapter when one is attached."""
        return self.head(self.features(images))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            return self.adapter.logits(features, self.classifier)
        return self.zero_shot(features)

    def zero_shot(self, features: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * features @ self.classifier


def resolve_pretrained(pretrained: str | None, base: Path) -> tuple[str | None, str | None]:
    """(value for open_clip, sha256 of the file) where `pretrained` names a local file, else (tag, None)."""
    if pretrained is None:
        return None, None
    path = Path(pretrained).expanduser()
    path = path if path.is_absolute() else base / path
    if path.is_file():
        return str(path), checkpoint_sha256(path)
    if any(sep in pretrained for sep in ("/", "\\")) or pretrained.endswith((".pt", ".bin", ".safetensors")):
        raise FileNotFoundError(f"teacher.pretrained: checkpoint file {path} not found")
    return pretrained, None


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint file, remembered in `<file>.sha256.json` while its size and mtime stay the same.

    Hashing a multi-GB checkpoint costs seconds on every start; where the folder is read-only it is
    hashed each time.
    """
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = path.with_name(path.name + ".sha256.json")
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in key} == key and isinstance(known.get("sha256"), str):
            return known["sha256"]
    except (OSError, ValueError):
        pass
    sha = sha256_file(path)
    try:
        with atomic_write(memo, own_name=True) as tmp:  # other jobs may hash the same file at once
            tmp.write_text(json.dumps({**key, "sha256": sha}) + "\n")
    except OSError:
        pass
    return sha


def load_teacher(cfg: TeacherConfig, class_names: list[str], device: torch.device, base: Path = Path(".")) -> Teacher:
    """Build the teacher from (model, pretrained) and its zero-shot head from the class names and templates.

    The head is built in fp32; then the text tower is freed and the image tower cast to teacher.dtype.
    A `pretrained` file that open_clip cannot load as this model raises CheckpointError naming both.
    """
    register_model_configs(base / cfg.model_config_dir if cfg.model_config_dir else None)
    if open_clip.get_model_config(cfg.model) is None and not cfg.model.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"teacher.model: unknown open_clip model {cfg.model!r}; "
                          "add its JSON config folder as teacher.model_config_dir")
    pretrained, checkpoint_sha = resolve_pretrained(cfg.pretrained, base)
    if pretrained is not None and checkpoint_sha is None and ":" not in cfg.model:  # a hub tag, not a file
        _download_tag(cfg.model, pretrained, base)
    model = _create_model(cfg, pretrained, is_file=checkpoint_sha is not None, device=device)
    model.eval()
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess["size"]
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(cfg.image_mean or preprocess["mean"])
    std = tuple(cfg.image_std or preprocess["std"])
    templates = resolve_templates(cfg.templates, cfg.extra_templates)
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            model, open_clip.get_tokenizer(cfg.model), class_names, templates, num_classes_per_batch=10,
            device=device,
        ).float()
    dtype = teacher_dtype(cfg.dtype, device)
    fingerprint = {
        "model": cfg.model,
        "pretrained": Path(pretrained).name if checkpoint_sha else pretrained,
        "checkpoint_sha256": checkpoint_sha,
        "image_size": size,
        "image_mean": list(mean),
        "image_std": list(std),
        "quick_gelu": cfg.quick_gelu,
        "templates": templates,
        "head": "zero-shot",
        "logit_scale": LOGIT_SCALE,
        "dtype": dtype,
    }
    image_tower = model.visual.to(TEACHER_DTYPES[dtype])
    return Teacher(image_tower, classifier, size, mean, std, fingerprint, TEACHER_DTYPES[dtype])


def _download_tag(model: str, tag: str, base: Path) -> None:
    """Fetch the weights of hub tag `tag` into open_clip's cache, or raise ConfigError saying why that fails."""
    tag_cfg = open_clip.get_pretrained_cfg(model, tag)
    if not tag_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise ConfigError(f"teacher.pretrained: {tag!r} is no file (not at {base / tag}) and no hub tag of "
                          f"{model} (its tags: {tags})")
    try:
        open_clip.download_pretrained(tag_cfg)
    except Exception as e:
        raise ConfigError(f"teacher.pretrained: {tag!r} is a hub tag that needs a download, which failed "
                          f"({_first_sentence(e)}); give a local checkpoint file instead") from e


def _create_model(cfg: TeacherConfig, pretrained: str | None, is_file: bool, device: torch.device) -> torch.nn.Module:
    """open_clip.create_model on `device`; weights that will be loaded are not initialised first.

    A local checkpoint file open_clip cannot load is refused naming the file and the model.
    """
    mmap = is_file and _is_torch_zip(Path(pretrained))
    try:
        with _quiet_open_clip(), _skip_init(pretrained is not None), _mmap_load(mmap):
            return open_clip.create_model(
                cfg.model, pretrained=pretrained, device=device, force_quick_gelu=cfg.quick_gelu,
                force_image_size=cfg.image_size,
            )
    except MemoryError:
        raise
    except Exception as e:
        if not is_file or not _raised_in(e, open_clip.factory.load_checkpoint):
            raise
        raise CheckpointError(f"teacher.pretrained: {pretrained} is not a checkpoint of open_clip model "
                              f"{cfg.model!r} ({_why_not_loaded(e, Path(pretrained))})") from e


def _is_torch_zip(path: Path) -> bool:
    """A checkpoint in torch.save's zip format (which torch.load can memory-map), not a TorchScript archive."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return not any(name.endswith("/constants.pkl") for name in archive.namelist())


@contextlib.contextmanager
def _mmap_load(active: bool) -> Iterator[None]:
    """Let torch.load inside open_clip memory-map the checkpoint: weights are read once, straight into the model."""
    config = torch.utils.serialization.config.load
    saved, config.mmap = config.mmap, active or config.mmap
    try:
        yield
    finally:
        config.mmap = saved


@contextlib.contextmanager
def _skip_init(active: bool) -> Iterator[None]:
    """Make torch.nn.init's in-place initialisers no-ops while a model whose weights are loaded next is built.

    Random initialisation of a ViT-L-14 takes longer than loading its checkpoint; open_clip loads the full
    checkpoint with strict=True, so no parameter is left uninitialised.
    """
    if not active:
        yield
        return
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _raised_in(error: BaseException, function: Callable) -> bool:
    """Whether `function` is on the traceback of `error`."""
    return any(frame.f_code is function.__code__ for frame, _ in traceback.walk_tb(error.__traceback__))


def _why_not_loaded(error: Exception, path: Path) -> str:
    """A short reason why open_clip could not load `path`: unreadable, or weights that do not fit the model."""
    if path.stat().st_size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(2)
    if path.suffix != ".safetensors" and not head.startswith((b"PK", b"\x80")):
        return "not a file torch.save writes: neither a zip archive nor a pickle"
    if _raised_in(error, open_clip.factory.load_state_dict):
        return f"cannot be read as a state dict: {_first_sentence(error)}"
    clauses = str(error).split("\n\t")  # torch's load_state_dict error: one clause per kind of mismatch
    found = []
    for clause, what in (("Missing key(s)", "of its weights missing"), ("Unexpected key(s)", "not in it")):
        names = [name for c in clauses if c.startswith(clause) for name in c.split('"')[1::2]]
        if names:
            found.append(f"{len(names)} {what}, e.g. {names[0]!r}")
    shapes = [c.removeprefix("size mismatch for ").split(":")[0] for c in clauses if c.startswith("size mismatch")]
    if shapes:
        found.append(f"{len(shapes)} of another shape, e.g. {shapes[0]!r}")
    return "weights do not fit the model: " + "; ".join(found) if found else _first_sentence(error)


def _first_sentence(error: Exception, limit: int = 120) -> str:
    text = " ".join(str(error).split()).split(". ")[0]
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _quiet_open_clip:
    """Silence open_clip's 'no pretrained weights' warning: a random teacher is a deliberate choice here."""

    def __enter__(self) -> None:
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().setLevel(self.level)
