"""Tip-Adapter and Tip-Adapter-F: a few-shot cache model on top of the zero-shot head.

logits = 100 * f @ W + a * exp(-b * (1 - f @ K^T)) @ V, f the normalised image feature, K the
normalised mean features of the labelled images over augmented passes, V their one-hot labels.
a and b are searched on val; Tip-Adapter-F also trains K (AdamW, cosine), keeping the best on val.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from dho_pipeline.atomic_write import write_whole
from dho_pipeline.config import AdapterConfig, ConfigError, PipelineConfig
from dho_pipeline.data.shards import Manifest, Shard
from dho_pipeline.data.teacher_views import TeacherViewBatches, views_on
from dho_pipeline.data.views import CLEAN_VIEW, ViewRecipe, normalize
from dho_pipeline.errors import CheckpointError, one_line, warn
from dho_pipeline.locations import Location, location
from dho_pipeline.runtime import Runtime
from dho_pipeline.safe_load import safe_load
from dho_pipeline.store.lookup import view_recipe
from dho_pipeline.store.zarr_store import field_value, fingerprint_diff
from dho_pipeline.teacher.open_clip_teacher import LOGIT_SCALE, Teacher

ADAPTER_FORMAT = "dho-tip-adapter/1"


@dataclass
class TipAdapter:
    """The cache model: keys (N, D), values (N, C), residual ratio a and sharpness b."""

    kind: str
    keys: torch.Tensor
    values: torch.Tensor
    a: float
    b: float

    def logits(self, features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        return tip_logits(features, classifier, self.keys.to(features.device), self.values.to(features.device),
                          self.a, self.b)


def tip_logits(features: torch.Tensor, classifier: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               a: float, b: float) -> torch.Tensor:
    """100 * f W + a * exp(-b (1 - f K^T)) V."""
    affinity = features @ keys.T
    return LOGIT_SCALE * features @ classifier + a * torch.exp(-b * (1 - affinity)) @ values


@torch.no_grad()
def teacher_features(teacher: Teacher, shards: list[Shard], recipe: ViewRecipe, view_ids: list[int],
                     device: torch.device, batch_size: int = 256, num_workers: int = 0,
                     desc: str = "features", render_on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised teacher features (N, len(view_ids), D) of every sample of `shards`, and labels (N,)."""
    dataset = TeacherViewBatches(shards, recipe, teacher.image_size, batch_size, view_ids=view_ids,
                                 render_on_device=render_on_device)
    loader = DataLoader(dataset, batch_size=None, num_workers=min(num_workers, len(shards)))
    feats, labels, rows = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        images = views_on(batch, device, teacher.image_size)
        n, v = images.shape[:2]
        f = teacher.features(normalize(images.flatten(0, 1), teacher.mean, teacher.std))
        feats.append(f.view(n, v, -1).cpu())
        labels.append(torch.as_tensor(batch["labels"]).long())
        rows.append(torch.as_tensor(batch["rows"]))
    order = torch.cat(rows).argsort()  # workers interleave shards; row order is the manifest's
    return torch.cat(feats)[order], torch.cat(labels)[order]


def search_ab(features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, cfg: AdapterConfig) -> tuple[float, float, float]:
    """(a, b, accuracy) of the best point of the grid a in (0, a_max], b in (0, b_max]; first best wins."""
    best = (cfg.a, cfg.b, -1.0)
    affinity = features @ keys.T
    zero_shot = LOGIT_SCALE * features @ classifier
    for b in np.linspace(0, cfg.search_b_max, cfg.search_b_steps + 1)[1:]:
        cache = torch.exp(-float(b) * (1 - affinity)) @ values
        for a in np.linspace(0, cfg.search_a_max, cfg.search_a_steps + 1)[1:]:
            acc = float(((zero_shot + float(a) * cache).argmax(-1) == labels).float().mean())
            if acc > best[2]:
                best = (float(a), float(b), acc)
    return best


def fit_adapter(teacher: Teacher, manifest: Manifest, recipe: ViewRecipe, kind: str, cfg: AdapterConfig,
                device: torch.device, num_workers: int = 0, log=print,
                render_on_device: bool = False) -> tuple[TipAdapter, dict]:
    """Fit Tip-Adapter (or -F) on the labelled shards; search a, b on val. Returns it and a report."""
    augment_views = [1 + recipe.count + e for e in range(cfg.augment_epochs)]  # views no student sees
    train, labels = teacher_features(teacher, manifest.splits["labelled"], recipe, augment_views, device,
                                     num_workers=num_workers, desc="adapter keys", render_on_device=render_on_device)
    classifier = teacher.classifier.to(device)
    num_classes = classifier.shape[1]
    keys = F.normalize(train.mean(1), dim=-1).to(device)
    values = F.one_hot(labels, num_classes).float().to(device)
    per_class = torch.bincount(labels, minlength=num_classes)
    report = {"kind": kind, "labelled_images": len(labels)}
    if (per_class == per_class[0]).all():
        report["shots_per_class"] = int(per_class[0])
    a, b = cfg.a, cfg.b
    val_accuracy = None
    if manifest.splits.get("val"):
        val, val_labels = teacher_features(teacher, manifest.splits["val"], recipe, [CLEAN_VIEW], device,
                                           num_workers=num_workers, desc="adapter val",
                                           render_on_device=render_on_device)
        val, val_labels = val[:, 0].to(device), val_labels.to(device)

        def val_accuracy(k: torch.Tensor, a: float, b: float) -> float:
            return float((tip_logits(val, classifier, k, values, a, b).argmax(-1) == val_labels).float().mean())

        report["val_zero_shot"] = val_accuracy(keys, 0.0, b)  # a = 0 is the zero-shot head
        # the training-free optimum; -F trains the keys from there, then searches again
        a, b, _ = search_ab(val, val_labels, classifier, keys, values, cfg)
    if kind == "tip-adapter-f":
        keys = train_keys(keys, values, train.to(device), labels.to(device), classifier, a, b, cfg, val_accuracy, log)
    if val_accuracy:
        a, b, acc = search_ab(val, val_labels, classifier, keys, values, cfg)
        report.update(val_adapter=acc, a=a, b=b)
        log(f"{kind}: val top-1 {acc:.4f} at a={a:.3f} b={b:.3f} (zero-shot {report['val_zero_shot']:.4f})")
        warn_at_grid_top(a, b, cfg)
    return TipAdapter(kind, keys.cpu(), values.cpu(), a, b), report


def warn_at_grid_top(a: float, b: float, cfg: AdapterConfig) -> None:
    """Warn when the searched a or b is the largest of its grid: the best value may lie beyond it."""
    for name, value, top in (("a", a, cfg.search_a_max), ("b", b, cfg.search_b_max)):
        if value >= top:
            warn(f"Tip-Adapter: the searched {name}={value:g} is the top of its grid; the best {name} may be "
                 f"larger: raise teacher.adapter.search_{name}_max")


def train_keys(keys: torch.Tensor, values: torch.Tensor, train: torch.Tensor, labels: torch.Tensor,
               classifier: torch.Tensor, a: float, b: float, cfg: AdapterConfig,
               val_accuracy: Callable[[torch.Tensor, float, float], float] | None = None,
               log: Callable[[str], None] = print) -> torch.Tensor:
    """Tip-Adapter-F: train the keys with CE on the augmented features (N, E, D) at fixed a, b.

    With `val_accuracy`, the best keys on val are kept (the initial keys included); without it, the last.
    """
    layer = torch.nn.Parameter(keys.clone())
    optimizer = torch.optim.AdamW([layer], lr=cfg.lr, eps=cfg.eps)
    feats = train.flatten(0, 1)
    targets = labels.repeat_interleave(train.shape[1])
    steps_per_epoch = max(1, -(-len(feats) // cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(0)
    best_keys = keys.clone()
    best = val_accuracy(keys, a, b) if val_accuracy else -1.0
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(feats), generator=generator).split(cfg.batch_size):
            idx = idx.to(feats.device)
            loss = F.cross_entropy(tip_logits(feats[idx], classifier, layer, values, a, b), targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        if val_accuracy:
            acc = val_accuracy(layer.detach(), a, b)
            if acc > best:
                best, best_keys = acc, layer.detach().clone()
        else:
            best_keys = layer.detach().clone()
    if val_accuracy:
        log(f"tip-adapter-f: best val top-1 during training {best:.4f} (a={a:.3f}, b={b:.3f})")
    return best_keys


def save_adapter(path: Location, adapter: TipAdapter, teacher_fingerprint: dict, report: dict) -> str:
    """Write the adapter with the fingerprint of the teacher it belongs to; returns its sha256."""
    path = location(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": ADAPTER_FORMAT, "kind": adapter.kind, "keys": adapter.keys, "values": adapter.values,
                "a": adapter.a, "b": adapter.b, "teacher": teacher_fingerprint, "report": report}, buf)
    data = buf.getvalue()
    # a name of its own: two jobs fitting the same adapter at once must not write one temporary file
    write_whole(path, data, own_name=True)
    return hashlib.sha256(data).hexdigest()


def load_adapter(path: Location, teacher_fingerprint: dict) -> tuple[TipAdapter, str]:
    """Read an adapter file; refuse one fitted for another teacher. Returns it and its sha256."""
    path = location(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher.adapter.file: {path} not found (make one with `dho fit-adapter`)")
    data = path.read_bytes()
    try:
        state = safe_load(io.BytesIO(data))
    except Exception as e:
        raise CheckpointError(f"{path}: not a dho adapter file ({type(e).__name__}: {one_line(e)})") from e
    if not isinstance(state, dict) or state.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: not a dho adapter file")
    differ = fingerprint_diff({"teacher": state["teacher"]}, {"teacher": teacher_fingerprint})
    if differ:
        values = "; ".join(f"{name}: file {field_value({'teacher': state['teacher']}, name)} vs config "
                           f"{field_value({'teacher': teacher_fingerprint}, name)}" for name in differ)
        raise ConfigError(f"{path}: fitted for another teacher ({values}); fit one for this teacher with `dho "
                          "fit-adapter`, or leave teacher.adapter.file unset to fit it under cache.root")
    adapter = TipAdapter(state["kind"], state["keys"], state["values"], state["a"], state["b"])
    return adapter, hashlib.sha256(data).hexdigest()


def fit_and_save(teacher: Teacher, cfg: PipelineConfig, manifest: Manifest, path: Location, device: torch.device,
                 log: Callable[[str], None] = print) -> tuple[str, dict]:
    """Fit the adapter teacher.kind asks for and write it to `path`; returns its sha256 and the fit report."""
    adapter, report = fit_adapter(teacher, manifest, view_recipe(cfg), cfg.teacher.kind, cfg.teacher.adapter,
                                  device, cfg.data.num_workers, log, render_on_device=cfg.teacher.render == "device")
    return save_adapter(path, adapter, teacher.fingerprint, report), report


def adapter_path(cfg: PipelineConfig, teacher_fingerprint: dict, manifest: Manifest) -> Location:
    """teacher.adapter.file, or a file under cache.root named from everything the fit depends on."""
    if cfg.teacher.adapter.file:
        return cfg.location(cfg.teacher.adapter.file)
    key = {"teacher": teacher_fingerprint, "kind": cfg.teacher.kind, "adapter": asdict(cfg.teacher.adapter),
           "views": asdict(cfg.views), "labelled": [s[3] for s in manifest.fingerprint()]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cfg.location(cfg.cache.root) / "adapters" / f"{cfg.teacher.kind}-{digest}.pt"


def attach_adapter(teacher: Teacher, cfg: PipelineConfig, manifest: Manifest, runtime: Runtime,
                   log: Callable[[str], None] = print) -> None:
    """For teacher.kind tip-adapter(-f): fit (rank 0, once) or load the adapter and put it on the teacher.

    The adapter's sha256 enters the teacher's fingerprint, so a store made with another adapter is refused.
    """
    if cfg.teacher.kind == "zero-shot":
        return
    path = adapter_path(cfg, teacher.fingerprint, manifest)
    if runtime.is_main and not path.exists():
        if cfg.teacher.adapter.file:
            raise FileNotFoundError(f"teacher.adapter.file: {path} not found (make one with `dho fit-adapter`)")
        fit_and_save(teacher, cfg, manifest, path, runtime.device, log)
    runtime.barrier()
    adapter, sha = load_adapter(path, teacher.fingerprint)
    if adapter.kind != cfg.teacher.kind:
        raise ConfigError(f"teacher.kind is {cfg.teacher.kind}, but {path} (teacher.adapter.file) holds a "
                          f"{adapter.kind} adapter: set teacher.kind {adapter.kind}, or fit a {cfg.teacher.kind} one "
                          "with `dho fit-adapter`")
    teacher.adapter = adapter
    teacher.fingerprint = {**teacher.fingerprint, "head": adapter.kind, "adapter_sha256": sha}
