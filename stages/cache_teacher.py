"""Stage one: run the open_clip teacher once over every shard and write its logits to the Zarr store.

Work is done shard by shard (a shard is one chunk of the store); a shard is written whole, checksummed and
then marked done, so a killed run resumes where it stopped and the result equals an uninterrupted run.
A rerun first verifies the finished shards and recomputes any whose chunks were lost or damaged. One
process writes a store at a time (a lock beside it); under torchrun, rank 0 holds the lock and rank r
takes every world_size-th pending shard. Each shard file is checked against its sha256 before use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from dho_pipeline.config import PipelineConfig
from dho_pipeline.errors import warn
from dho_pipeline.runtime import Runtime, autocast, init_runtime
from dho_pipeline.shards import Shard, load_manifest
from dho_pipeline.store import NOT_DONE, TeacherStore, build_fingerprint
from dho_pipeline.store_lock import rank_zero_lock
from dho_pipeline.store_lookup import store_path, view_recipe
from dho_pipeline.teacher import Teacher, load_teacher
from dho_pipeline.teacher_views import TeacherViewBatches
from dho_pipeline.tip_adapter import attach_adapter
from dho_pipeline.views import ViewRecipe, normalize


def run(cfg: PipelineConfig, overwrite: bool = False, max_shards: int | None = None) -> Path:
    """Fill the store for `cfg` and return its path; `max_shards` stops early (the rest on a later run)."""
    runtime = init_runtime(cfg.train.device)
    manifest = load_manifest(cfg.path(cfg.data.shards))
    recipe = view_recipe(cfg)
    teacher = load_teacher(cfg.teacher, manifest.class_names, runtime.device, cfg.base_dir)
    attach_adapter(teacher, cfg, manifest, runtime)  # Tip-Adapter(-F) teachers only
    fingerprint = build_fingerprint(teacher.fingerprint, dataclasses.asdict(recipe), manifest)
    path = store_path(cfg, fingerprint)

    with rank_zero_lock(path, runtime):  # one writer: rank 0 holds the lock for ranks that split the shards
        if runtime.is_main:
            store = TeacherStore.open_or_create(path, fingerprint, manifest, 1 + recipe.count, overwrite,
                                                with_zero_shot=teacher.adapter is not None)
            unmark_damaged(store)
        runtime.barrier()
        store = TeacherStore.open(path, mode="a")
        store.check_fingerprint(fingerprint)
        pending = [s for s in manifest.shards() if not store.shard_done(s)][runtime.rank:: runtime.world_size]
        pending = pending[:max_shards] if max_shards is not None else pending
        manifest.check_files(pending)
        write_pending(store, pending, teacher, recipe, cfg, runtime)
        runtime.barrier()
    return path


def unmark_damaged(store: TeacherStore) -> None:
    """Verify every shard marked done against its checksums; mark the damaged ones for recomputing."""
    for shard, problem in store.check_shards(progress=True).items():
        if problem not in (None, NOT_DONE):
            warn(f"{store.path}: shard {shard.name}: {problem}; recomputing it")
            store.unmark(shard)


def write_pending(store: TeacherStore, pending: list[Shard], teacher: Teacher, recipe: ViewRecipe,
                  cfg: PipelineConfig, runtime: Runtime) -> None:
    """Run the teacher over the pending shards' views and write each shard as soon as all its rows are in."""
    num_classes = store.num_classes
    dataset = TeacherViewBatches(pending, recipe, teacher.image_size, cfg.teacher.batch_size,
                                 skip_bad=cfg.data.on_bad_image == "skip")
    loader = DataLoader(dataset, batch_size=None, num_workers=min(cfg.data.num_workers, len(pending)),
                        pin_memory=runtime.device.type == "cuda")
    buffers: dict[int, dict[str, np.ndarray]] = {}
    filled: dict[int, int] = {}
    total = sum(s.count for s in pending)
    with tqdm(total=total, desc=f"cache-teacher [rank {runtime.rank}]", unit="img",
              disable=not runtime.is_main) as bar:
        for batch in loader:
            index = batch["shard"]
            shard = pending[index]
            if index not in buffers:
                buffers[index] = _empty_rows(shard.count, 1 + recipe.count, num_classes,
                                             with_zero_shot=teacher.adapter is not None)
                filled[index] = 0
            images = batch["images"].to(runtime.device, non_blocking=True)
            n, views = images.shape[:2]
            with autocast(runtime.device, cfg.train.amp):
                features = teacher.features(normalize(images.flatten(0, 1), teacher.mean, teacher.std))
                logits = teacher.head(features)
            at = batch["rows"] - shard.first_row
            buf = buffers[index]
            buf["logits"][at, :views] = logits.view(n, views, -1).float().cpu().numpy()
            buf["logits"][at[batch["bad"]]] = np.nan
            if "zero_shot" in buf:  # the clean view's zero-shot logits, to report what the adapter adds
                buf["zero_shot"][at] = teacher.zero_shot(features.view(n, views, -1)[:, 0]).float().cpu().numpy()
            buf["boxes"][at, :views] = batch["boxes"]
            buf["flips"][at, :views] = batch["flips"]
            buf["labels"][at] = batch["labels"]
            buf["bad"][at] = batch["bad"]
            filled[index] += n
            bar.update(n)
            if filled[index] == shard.count:
                store.write_shard(shard, **buffers.pop(index))


def _empty_rows(count: int, views: int, classes: int, with_zero_shot: bool) -> dict[str, np.ndarray]:
    rows = {
        "logits": np.full((count, views, classes), np.nan, np.float32),
        "boxes": np.zeros((count, views, 4), np.float32),
        "flips": np.zeros((count, views), bool),
        "labels": np.full(count, -1, np.int16),
        "bad": np.zeros(count, bool),
    }
    if with_zero_shot:
        rows["zero_shot"] = np.full((count, classes), np.nan, np.float32)
    return rows

